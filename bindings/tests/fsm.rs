//! The next-step table against the reference text, and `transition()` over every pair of
//! states on the simulated device.

use vfio_migration::sim::{ArcFault, FaultLeave, SimConfig, SimDevice};
use vfio_migration::state::{arc_creates_data_fd, path};
use vfio_migration::{
    next_step, recover, transition, Error as MigError, MigFlags, MigState, MigrationDevice, Recovery,
};

/// Copied verbatim from the reference (§2.2, `vfio_mig_get_next_state`'s table).
const REFERENCE_TABLE: &str = "
cur\\tgt      STOP   RUN    PC     PCP    SC     RES    RP     ERR
STOP         STOP   RP     RP     RP     SC     RES    RP     ERR
RUNNING      RP     RUN    PC     RP     RP     RP     RP     ERR
PRE_COPY     RUN    RUN    PC     PCP    PCP    RUN    RUN    ERR
PRE_COPY_P2P RP     RP     PC     PCP    SC     RP     RP     ERR
STOP_COPY    STOP   STOP   ERR    ERR    SC     STOP   STOP   ERR
RESUMING     STOP   STOP   STOP   STOP   STOP   RES    STOP   ERR
RUNNING_P2P  STOP   RUN    RUN    PCP    STOP   STOP   RP     ERR
ERROR        ERR    ERR    ERR    ERR    ERR    ERR    ERR    ERR
";

fn parse_state(s: &str) -> MigState {
    match s {
        "STOP" => MigState::Stop,
        "RUN" | "RUNNING" => MigState::Running,
        "PC" | "PRE_COPY" => MigState::PreCopy,
        "PCP" | "PRE_COPY_P2P" => MigState::PreCopyP2p,
        "SC" | "STOP_COPY" => MigState::StopCopy,
        "RES" | "RESUMING" => MigState::Resuming,
        "RP" | "RUNNING_P2P" => MigState::RunningP2p,
        "ERR" | "ERROR" => MigState::Error,
        other => panic!("unknown state {other}"),
    }
}

/// `table[cur][tgt]` parsed from the reference text.
fn reference_table() -> [[MigState; 8]; 8] {
    let mut lines = REFERENCE_TABLE.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<MigState> = lines.next().unwrap().split_whitespace().skip(1).map(parse_state).collect();
    let mut t = [[MigState::Error; 8]; 8];
    let mut rows = 0;
    for l in lines {
        let mut w = l.split_whitespace();
        let cur = parse_state(w.next().unwrap());
        for (tgt, cell) in header.iter().zip(w) {
            t[cur as usize][*tgt as usize] = parse_state(cell);
        }
        rows += 1;
    }
    assert_eq!(rows, 8);
    t
}

/// The kernel's `state_flags_table`: ERROR needs only STOP_COPY.
fn kernel_supports(flags: MigFlags, s: MigState) -> bool {
    let need = match s {
        MigState::RunningP2p => MigFlags::STOP_COPY | MigFlags::P2P,
        MigState::PreCopy => MigFlags::STOP_COPY | MigFlags::PRE_COPY,
        MigState::PreCopyP2p => MigFlags::STOP_COPY | MigFlags::P2P | MigFlags::PRE_COPY,
        _ => MigFlags::STOP_COPY,
    };
    flags.contains(need)
}

/// `vfio_mig_get_next_state()` transcribed from the kernel, over the parsed table.
fn kernel_next(t: &[[MigState; 8]; 8], flags: MigFlags, cur: MigState, tgt: MigState) -> Option<MigState> {
    if !kernel_supports(flags, cur) || !kernel_supports(flags, tgt) {
        return None;
    }
    let mut next = t[cur as usize][tgt as usize];
    while !kernel_supports(flags, next) {
        next = t[next as usize][tgt as usize];
    }
    (next != MigState::Error).then_some(next)
}

const FLAG_SETS: [MigFlags; 4] =
    [MigFlags::STOP_COPY, MigFlags::from_bits(0b011), MigFlags::from_bits(0b101), MigFlags::ALL];

#[test]
fn every_cell_matches_the_reference_for_every_flag_set() {
    let t = reference_table();
    for flags in FLAG_SETS {
        for cur in MigState::ALL {
            for tgt in MigState::ALL {
                assert_eq!(
                    next_step(flags, cur, tgt),
                    kernel_next(&t, flags, cur, tgt),
                    "flags {flags}: {cur} -> {tgt}"
                );
            }
        }
    }
    // With no flags at all nothing is legal.
    assert_eq!(next_step(MigFlags::from_bits(0), MigState::Running, MigState::Stop), None);
}

#[test]
fn reference_examples() {
    use MigState::*;
    let all = MigFlags::ALL;
    assert_eq!(path(all, Running, StopCopy).unwrap(), vec![RunningP2p, Stop, StopCopy]);
    assert_eq!(path(MigFlags::STOP_COPY, Running, StopCopy).unwrap(), vec![Stop, StopCopy]);
    assert_eq!(path(all, PreCopy, StopCopy).unwrap(), vec![PreCopyP2p, StopCopy]);
    assert_eq!(path(MigFlags::from_bits(0b101), PreCopy, StopCopy).unwrap(), vec![StopCopy]);
    assert_eq!(path(all, Resuming, Running).unwrap(), vec![Stop, RunningP2p, Running]);
    assert_eq!(path(all, StopCopy, PreCopy), None);
    assert_eq!(path(all, Running, MigState::Error), None);
    assert!(arc_creates_data_fd(Stop, Resuming) && !arc_creates_data_fd(PreCopy, StopCopy));
}

fn sim(flags: MigFlags) -> SimDevice {
    // Size 0: an empty resume stream is complete, so leaving RESUMING succeeds.
    SimDevice::new(SimConfig::new("fsm", 0, 7).with_flags(flags))
}

/// Every (from, to) pair, every flag set: the arcs, the data fd and the final state.
#[test]
fn transition_over_every_pair() {
    for flags in FLAG_SETS {
        for from in MigState::ALL.into_iter().filter(|&s| s != MigState::Error && flags.supports(s)) {
            for to in MigState::ALL {
                let mut d = sim(flags);
                let setup = transition(&mut d, from).unwrap_or_else(|e| panic!("{flags}: to {from}: {e}"));
                drop(setup);
                let before = d.transitions().len();
                let expect = path(flags, from, to);
                match transition(&mut d, to) {
                    Ok(t) => {
                        let p = expect.unwrap_or_else(|| panic!("{flags}: {from}->{to} should fail"));
                        let mut at = from;
                        let want: Vec<_> = p
                            .iter()
                            .map(|&n| {
                                let a = (at, n);
                                at = n;
                                a
                            })
                            .collect();
                        assert_eq!(t.arcs, want, "{flags}: {from} -> {to}");
                        assert_eq!(d.transitions()[before..], want[..], "sim records the same arcs");
                        let fd_expected = want.last().is_some_and(|&(a, b)| arc_creates_data_fd(a, b));
                        assert_eq!(t.data_fd.is_some(), fd_expected, "{flags}: {from} -> {to}");
                        assert_eq!(d.state().unwrap(), to);
                    }
                    Err(MigError::NoPath { .. }) => {
                        assert!(expect.is_none(), "{flags}: {from} -> {to} should work");
                        assert_eq!(d.state().unwrap(), from, "a refused request changes nothing");
                    }
                    Err(e) => panic!("{flags}: {from} -> {to}: {e}"),
                }
            }
        }
    }
}

/// One SET may walk several arcs; only the final arc may make the fd.
#[test]
fn multi_arc_set_in_one_call() {
    use MigState::*;
    let mut d = sim(MigFlags::ALL);
    let fd = d.set_state_raw(StopCopy).unwrap();
    assert!(fd.is_some());
    assert_eq!(d.transitions(), vec![(Running, RunningP2p), (RunningP2p, Stop), (Stop, StopCopy)]);
    drop(fd);
    let fd = d.set_state_raw(PreCopy);
    assert_eq!(fd.unwrap_err().errno(), Some(libc::EINVAL), "STOP_COPY -> PRE_COPY is forbidden");
    assert_eq!(d.state().unwrap(), StopCopy);
    let fd = d.set_state_raw(Running).unwrap();
    assert!(fd.is_none());
    let fd = d.set_state_raw(PreCopy).unwrap();
    assert!(fd.is_some(), "RUNNING -> PRE_COPY makes the fd");
    // STOP -> PRE_COPY walks STOP->RP->RUN->PC, fd on the last arc.
    let mut d = sim(MigFlags::ALL);
    d.set_state_raw(Stop).unwrap();
    assert!(d.set_state_raw(PreCopy).unwrap().is_some());
    assert_eq!(d.transitions()[2..], [(Stop, RunningP2p), (RunningP2p, Running), (Running, PreCopy)]);
    // Same-state SET is a no-op; ERROR is never a target.
    assert!(d.set_state_raw(PreCopy).unwrap().is_none());
    assert_eq!(d.set_state_raw(Error).unwrap_err().errno(), Some(libc::EINVAL));
    // Unsupported target.
    let mut d = sim(MigFlags::STOP_COPY);
    assert_eq!(d.set_state_raw(RunningP2p).unwrap_err().errno(), Some(libc::EINVAL));
}

#[test]
fn failing_arc_stay_and_error() {
    use MigState::*;
    // Stay: the device is left at the failing arc's start.
    let cfg = SimConfig::new("f", 4096, 1).with_fail_arc(ArcFault {
        from: RunningP2p,
        to: Stop,
        errno: libc::EIO,
        leave: FaultLeave::Stay,
    });
    let mut d = SimDevice::new(cfg);
    match transition(&mut d, StopCopy).unwrap_err() {
        MigError::Transition { reached, arc_from, arc_to, source, .. } => {
            assert_eq!((reached, arc_from, arc_to), (RunningP2p, RunningP2p, Stop));
            assert_eq!(source.errno(), Some(libc::EIO));
        }
        e => panic!("{e}"),
    }
    // A multi-arc raw SET stops at the same intermediate state.
    let mut d2 = SimDevice::new(d.sim_config().clone());
    assert_eq!(d2.set_state_raw(StopCopy).unwrap_err().errno(), Some(libc::EIO));
    assert_eq!(d2.state().unwrap(), RunningP2p);
    assert_eq!(d2.transitions(), vec![(Running, RunningP2p)]);
    // recover(RUNNING): RP -> RUN walks fine.
    assert_eq!(recover(&mut d, Running).unwrap(), Recovery::Transitioned);
    assert_eq!(d.reset_count(), 0);
    // recover(STOP) must go through the failing arc: the walk fails, reset, then the walk
    // fails again, so the reset's own result is all recover() can give.
    assert!(recover(&mut d, Stop).is_err());
    assert_eq!(d.state().unwrap(), RunningP2p);
    assert_eq!(d.reset_count(), 1);

    // Error: the device goes to ERROR, and only a reset leaves it.
    let cfg = SimConfig::new("e", 4096, 1).with_fail_arc(ArcFault {
        from: Stop,
        to: StopCopy,
        errno: libc::EIO,
        leave: FaultLeave::Error,
    });
    let mut d = SimDevice::new(cfg);
    match transition(&mut d, StopCopy).unwrap_err() {
        MigError::Transition { reached, .. } => assert_eq!(reached, Error),
        e => panic!("{e}"),
    }
    assert!(matches!(transition(&mut d, Running), Err(MigError::NoPath { .. })));
    assert_eq!(d.set_state_raw(Stop).unwrap_err().errno(), Some(libc::EINVAL));
    assert_eq!(recover(&mut d, Running).unwrap(), Recovery::Reset);
    assert_eq!(d.state().unwrap(), Running);
    assert_eq!(recover(&mut d, Running).unwrap(), Recovery::AlreadyThere);
}

#[test]
fn not_migratable_sim() {
    let d = SimDevice::new(SimConfig::new("nm", 1, 1).with_flags(MigFlags::P2P));
    assert!(matches!(d.migration_flags(), Err(MigError::NotMigratable { .. })));
}
