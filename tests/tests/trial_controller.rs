//! Trials of the source session whose controller makes every state change itself: injected
//! faults on each arc the controller walks, devices with and without PRE_COPY / P2P mixed with
//! a raw data fd, cancels and `drive` failures at each point, on both backends. Every source
//! device must end in RUNNING (P2P-safely), the error must name the faulty device, and nothing
//! may hang past the stall timeout.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use vfio_migration::sim::{ArcFault, FaultLeave, SimConfig, SimDevice};
use vfio_migration::{transition, MigFlags, MigState, MigrationDevice};
use vfio_multifd::{Backend, Error, Receiver, ReceiverConfig, SessionControl, SourceConfig, SourceSession};
use vfio_multifd_tests::{dev_id, each_backend, tcp_pairs, Logged, StateLog};

const CHUNK: usize = 64 * 1024;
const STALL: Duration = Duration::from_secs(5);
/// The stall timeout of the trials that wait for it.
const SHORT: Duration = Duration::from_secs(2);

fn sc(b: Backend) -> SourceConfig {
    SourceConfig::new().backend(b).chunk_bytes(CHUNK).stall_timeout(STALL)
}

fn rc(b: Backend) -> ReceiverConfig {
    ReceiverConfig::new().backend(b).max_packet_bytes(CHUNK).stall_timeout(STALL)
}

/// Four devices: every flag; STOP_COPY only; `flags` (the faulty one's, at position 2, so the
/// controller changed devices before it and has some left after it); PRE_COPY without P2P.
fn mixed(flags: MigFlags, fault: Option<ArcFault>) -> Vec<SimConfig> {
    let base = |i: u64| SimConfig::new(format!("t{i}"), (1 << 20) + i * 4099, 30 + i).with_precopy_bytes(256 << 10);
    let mut c2 = base(2).with_flags(flags);
    c2.fail_arc = fault;
    vec![
        base(0),
        base(1).with_flags(MigFlags::STOP_COPY),
        c2,
        base(3).with_flags(MigFlags::STOP_COPY | MigFlags::PRE_COPY),
    ]
}

struct Run<R> {
    source: vfio_multifd::Result<R>,
    receiver: vfio_multifd::Result<vfio_multifd::ReceiverReport>,
    sources: Vec<SimDevice>,
    log: StateLog,
    elapsed: Duration,
}

/// A live migration of `cfgs` plus, with `raw`, one raw data fd (a sim device the test itself
/// put in STOP_COPY) as the last device.
fn run_case<R>(
    b: Backend,
    cfgs: &[SimConfig],
    raw: bool,
    drive: impl FnOnce(&mut SessionControl<'_>) -> vfio_multifd::Result<R>,
) -> Run<R> {
    let mut sources: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
    let mut dcfgs: Vec<SimConfig> = cfgs
        .iter()
        .cloned()
        .map(|mut c| {
            c.fail_arc = None;
            c
        })
        .collect();
    let raw_cfg = SimConfig::new("raw", (512 << 10) + 17, 99).with_flags(MigFlags::STOP_COPY);
    let mut raw_dev = SimDevice::new(raw_cfg.clone());
    let (raw_fd, raw_config): (Option<OwnedFd>, Vec<u8>) = if raw {
        dcfgs.push(raw_cfg);
        let fd = transition(&mut raw_dev, MigState::StopCopy).unwrap().data_fd.unwrap();
        (Some(fd), raw_dev.save_config().unwrap())
    } else {
        (None, Vec::new())
    };
    let mut dests: Vec<SimDevice> = dcfgs.into_iter().map(SimDevice::new).collect();
    let log = StateLog::default();
    let (c, s) = tcp_pairs(3);
    let t0 = Instant::now();
    let (source, receiver) = std::thread::scope(|scope| {
        let dests = &mut dests;
        let rx = scope.spawn(move || {
            let mut r = Receiver::new(rc(b)).expect("receiver");
            for (i, d) in dests.iter_mut().enumerate() {
                r.add_device_with(dev_id(i), d, MigState::Running);
            }
            r.run(s)
        });
        let mut logged: Vec<Logged<'_>> =
            sources.iter_mut().enumerate().map(|(no, dev)| Logged { dev, no, log: log.clone(), after: None }).collect();
        let mut session = SourceSession::new(sc(b), c).expect("session");
        let n = logged.len();
        for (i, d) in logged.iter_mut().enumerate() {
            session.add_device(dev_id(i), d);
        }
        if let Some(fd) = &raw_fd {
            session.add_data_fd(dev_id(n), fd.as_fd(), &raw_config);
        }
        let source = session.run(drive).map(|(r, _)| r);
        let receiver = rx.join().expect("receiver thread");
        (source, receiver)
    });
    let elapsed = t0.elapsed();
    drop(raw_fd);
    Run { source, receiver, sources, log, elapsed }
}

/// Every source device is back in RUNNING, and no device ran again while a P2P peer was not
/// yet back in RUNNING_P2P.
fn assert_all_back<R>(what: &str, r: &Run<R>) {
    for (i, d) in r.sources.iter().enumerate() {
        assert_eq!(d.state().unwrap(), MigState::Running, "{what}: source device {i} not back in RUNNING");
    }
    // Replay the log: a device that starts running again (into RUNNING or PRE_COPY from a state
    // that does not run) must find no P2P peer stopped (STOP, STOP_COPY, ERROR).
    let e = r.log.entries();
    let mut at: Vec<MigState> = vec![MigState::Running; r.sources.len()];
    let runs = |s: MigState| matches!(s, MigState::Running | MigState::PreCopy);
    let stopped = |s: MigState| matches!(s, MigState::Stop | MigState::StopCopy | MigState::Error);
    for (k, &(d, from, to)) in e.iter().enumerate() {
        // The log has every SET tried; one took effect if the device's next SET starts from its
        // target (or, for its last, it ends there).
        let next_from = e[k + 1..].iter().find(|x| x.0 == d).map(|x| x.1);
        let took = next_from.map_or_else(|| r.sources[d].state().ok() == Some(to), |f| f == to);
        if !took {
            continue;
        }
        if runs(to) && !runs(from) {
            for (p, dev) in r.sources.iter().enumerate() {
                let p2p = dev.migration_flags().is_ok_and(|f| f.contains(MigFlags::P2P));
                assert!(
                    p == d || !p2p || !stopped(at[p]),
                    "{what}: device {d} ran again (SET #{k}) while P2P peer {p} was in {}: {e:?}",
                    at[p]
                );
            }
        }
        at[d] = to;
    }
    assert!(r.elapsed < STALL + Duration::from_secs(3), "{what}: took {:?}", r.elapsed);
}

fn fault(from: MigState, to: MigState, leave: FaultLeave) -> ArcFault {
    ArcFault { from, to, errno: libc::EIO, leave }
}

/// A failing state change on each arc the controller walks, for a device in the middle of a
/// mix of devices with and without PRE_COPY and P2P and a raw data fd: the session's error is
/// that device's own, and every source device is back in RUNNING.
#[test]
fn trial_fault_on_each_controller_arc_names_the_device_and_recovers_all() {
    use MigState::{PreCopy, PreCopyP2p, Running, RunningP2p, Stop, StopCopy};
    let all = MigFlags::ALL;
    let p2p = MigFlags::STOP_COPY | MigFlags::P2P;
    let pre = MigFlags::STOP_COPY | MigFlags::PRE_COPY;
    let plain = MigFlags::STOP_COPY;
    let arcs = [
        (all, Running, PreCopy),
        (all, PreCopy, PreCopyP2p),
        (all, PreCopyP2p, StopCopy),
        (p2p, Running, RunningP2p),
        (p2p, RunningP2p, Stop),
        (p2p, Stop, StopCopy),
        (pre, Running, PreCopy),
        (pre, PreCopy, StopCopy),
        (plain, Running, Stop),
        (plain, Stop, StopCopy),
    ];
    each_backend(|b| {
        for (flags, from, to) in arcs {
            for leave in [FaultLeave::Stay, FaultLeave::Error] {
                for raw in [false, true] {
                    let what = format!("{b:?} {from}->{to} {leave:?} raw={raw}");
                    let r = run_case(b, &mixed(flags, Some(fault(from, to, leave))), raw, |ctl| {
                        ctl.start_precopy()?;
                        ctl.switchover()
                    });
                    match &r.source {
                        Err(Error::Device { device, .. }) => assert_eq!(*device, dev_id(2), "{what}"),
                        // Not `Unrecovered` (it says the device could not be put back into
                        // RUNNING): every device is checked to be back in RUNNING below.
                        other => panic!("{what}: expected device 2's own error, got {:?}", other.as_ref().err()),
                    }
                    assert!(r.receiver.is_err(), "{what}: the receiver succeeded");
                    assert_all_back(&what, &r);
                }
            }
        }
    });
}

/// A raw data fd that never ends (a pipe whose writer stays open, with part of a stream in
/// it) among live devices: the session fails within the stall timeout and every device is
/// back in RUNNING.
#[test]
fn trial_raw_stream_without_eof_times_out_and_recovers() {
    each_backend(|b| {
        let cfgs = mixed(MigFlags::ALL, None);
        let mut sources: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
        let mut dests: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
        let raw_cfg = SimConfig::new("raw", 64 << 10, 99).with_flags(MigFlags::STOP_COPY);
        dests.push(SimDevice::new(raw_cfg.clone()));
        let (r, w) = nix::unistd::pipe().unwrap();
        let head = vfio_multifd_tests::sim_bytes(99, 0, 4096);
        nix::unistd::write(&w, &head).unwrap();
        let config = SimDevice::expected_config(&raw_cfg);
        let (c, s) = tcp_pairs(3);
        let t0 = Instant::now();
        let (source, receiver) = std::thread::scope(|scope| {
            let dests = &mut dests;
            let rx = scope.spawn(move || {
                let mut rx = Receiver::new(rc(b).stall_timeout(SHORT)).unwrap();
                for (i, d) in dests.iter_mut().enumerate() {
                    rx.add_device_with(dev_id(i), d, MigState::Running);
                }
                rx.run(s)
            });
            let mut session = SourceSession::new(sc(b).stall_timeout(SHORT), c).unwrap();
            let n = sources.len();
            for (i, d) in sources.iter_mut().enumerate() {
                session.add_device(dev_id(i), d);
            }
            session.add_data_fd(dev_id(n), r.as_fd(), &config);
            let source = session.run(|ctl| {
                ctl.start_precopy()?;
                ctl.switchover()
            });
            (source.map(|_| ()), rx.join().unwrap())
        });
        let took = t0.elapsed();
        drop(w);
        assert!(source.is_err() && receiver.is_err(), "{b:?}");
        assert!(took < SHORT + Duration::from_secs(3), "{b:?}: took {took:?}");
        for (i, d) in sources.iter().enumerate() {
            assert_eq!(d.state().unwrap(), MigState::Running, "{b:?}: device {i}");
        }
        // The stall report must say what the device waits for: its read of the pipe, and no
        // zero-copy buffer (loopback sends copy).
        match &source {
            Err(Error::Timeout { what, .. }) if b == Backend::Uring => {
                assert!(what.contains("1 reads in flight") && what.contains(" 0 zero-copy buffers"), "{what}");
            }
            Err(Error::Timeout { what, .. }) => assert!(what.contains("gave nothing to read"), "{what}"),
            other => panic!("{b:?}: expected a stall timeout, got {:?}", other.as_ref().err()),
        }
    });
}

/// A device whose pre-copy read fails (its save stream breaks inside the initial data) while
/// the VMM waits for the initial data: the session's error is that device's read error, not
/// the `Aborted` the VMM's wait saw, and every device is back in RUNNING.
#[test]
fn trial_precopy_read_error_names_the_device() {
    each_backend(|b| {
        for raw in [false, true] {
            let mut cfgs = mixed(MigFlags::ALL, None);
            cfgs[2] = cfgs[2].clone().with_read_error_at(64 << 10);
            let what = format!("{b:?} raw={raw}");
            let r = run_case(b, &cfgs, raw, |ctl| {
                ctl.start_precopy()?;
                ctl.wait_initial_data()?;
                ctl.switchover()
            });
            match &r.source {
                Err(Error::DeviceRead { device, .. } | Error::Device { device, .. }) => {
                    assert_eq!(*device, dev_id(2), "{what}");
                }
                other => panic!("{what}: expected device 2's read error, got {:?}", other.as_ref().err()),
            }
            assert_all_back(&what, &r);
        }
    });
}
