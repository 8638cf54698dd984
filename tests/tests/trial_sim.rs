//! Trials of the simulated device's lifetime rules since the retired resume consumer is joined
//! late: a raw write to an old resume fd fails with EPIPE from the next arc out of STOP on
//! (every such arc, every consumer kind), and the same device objects migrate again and again,
//! back and forth, through the engine on both backends, without threads piling up.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{transition, MigFlags, MigState, MigrationDevice, ReadOutcome};
use vfio_multifd::{Backend, Receiver, ReceiverConfig, SourceConfig, SourceSession};
use vfio_multifd_tests::{dev_id, each_backend, tcp_pairs, threads};

/// The two tests run one at a time: one counts this process's threads.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn raw_write(fd: BorrowedFd<'_>, buf: &[u8]) -> std::io::Result<usize> {
    Ok(nix::unistd::write(fd, buf)?)
}

fn read_all(d: &SimDevice, fd: &OwnedFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match d.read_data(fd.as_fd(), &mut buf).unwrap() {
            ReadOutcome::Data(n) => out.extend_from_slice(&buf[..n]),
            ReadOutcome::Eof => return out,
            ReadOutcome::NoMsg => panic!("NoMsg in STOP_COPY"),
        }
    }
}

fn write_all(d: &SimDevice, fd: &OwnedFd, mut data: &[u8]) {
    while !data.is_empty() {
        let n = d.write_data(fd.as_fd(), data).unwrap();
        assert!(n > 0);
        data = &data[n..];
    }
}

/// Loads `src`'s STOP_COPY stream and config into `dst` (RESUMING → STOP); returns the old
/// resume fd.
fn load(src: &mut SimDevice, dst: &mut SimDevice) -> OwnedFd {
    let sfd = transition(src, MigState::StopCopy).unwrap().data_fd.unwrap();
    let data = read_all(src, &sfd);
    drop(sfd);
    let rfd = transition(dst, MigState::Resuming).unwrap().data_fd.unwrap();
    write_all(dst, &rfd, &data);
    let blob = src.save_config().unwrap();
    dst.load_config(&blob).unwrap();
    transition(src, MigState::Stop).unwrap();
    transition(dst, MigState::Stop).unwrap();
    let rep = dst.resume_report().unwrap();
    assert!(rep.verified_ok, "{rep:?}");
    rfd
}

/// Every direct arc out of STOP, for every kind of consumer, three times with the same devices:
/// right after the arc, a raw write to the old resume fd fails with EPIPE.
#[test]
fn trial_old_resume_fd_gets_epipe_after_every_arc_out_of_stop() {
    let size = (256 << 10) + 13;
    let kinds: Vec<(&str, SimConfig)> = vec![
        ("plain", SimConfig::new("p", size, 3)),
        ("paced", SimConfig::new("p", size, 3).with_resume_throughput(64 << 20).with_resume_pipe_bytes(4096)),
        ("nonblocking", SimConfig::new("p", size, 3).with_nonblocking_resume(true)),
        ("stop-copy only", SimConfig::new("p", size, 3).with_flags(MigFlags::STOP_COPY)),
    ];
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let before = threads();
    for (kind, cfg) in kinds {
        let arcs: &[MigState] = if cfg.flags.contains(MigFlags::P2P) {
            &[MigState::RunningP2p, MigState::StopCopy, MigState::Resuming]
        } else {
            &[MigState::Running, MigState::StopCopy, MigState::Resuming]
        };
        let mut src = SimDevice::new(cfg.clone());
        let mut dst = SimDevice::new(cfg.clone());
        for round in 0..3 {
            for &next in arcs {
                let what = format!("{kind} round {round} STOP -> {next}");
                let old = load(&mut src, &mut dst);
                let fd = dst.set_state_raw(next).unwrap_or_else(|e| panic!("{what}: {e}"));
                let e = raw_write(old.as_fd(), b"late").expect_err(&format!("{what}: a late raw write was taken"));
                assert_eq!(e.raw_os_error(), Some(libc::EPIPE), "{what}: {e}");
                drop(fd);
                // Back to RUNNING for the next round (resets what the arc left).
                vfio_migration::recover(&mut dst, MigState::Running).unwrap();
                vfio_migration::recover(&mut src, MigState::Running).unwrap();
                assert!(threads() <= before + 4, "{what}: {} threads, {before} before", threads());
            }
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(threads() <= before, "a retired consumer or a producer was left running: {} > {before}", threads());
}

/// One live migration `a` → `b` (pre-copy, then the switchover) through the engine.
fn migrate(b: Backend, a: &mut [SimDevice], to: &mut [SimDevice]) {
    let (c, s) = tcp_pairs(2);
    let (src, rx) = std::thread::scope(|sc| {
        let dests = &mut *to;
        let rx = sc.spawn(move || {
            let mut r = Receiver::new(ReceiverConfig::new().backend(b).max_packet_bytes(64 << 10)).unwrap();
            for (i, d) in dests.iter_mut().enumerate() {
                r.add_device_with(dev_id(i), d, MigState::Running);
            }
            r.run(s)
        });
        let mut session = SourceSession::new(SourceConfig::new().backend(b).chunk_bytes(64 << 10), c).unwrap();
        for (i, d) in a.iter_mut().enumerate() {
            session.add_device_with(
                dev_id(i),
                d,
                vfio_multifd::DeviceOptions { precopy: false, final_state: MigState::Running },
            );
        }
        let src = session.run(|ctl| {
            ctl.start_precopy()?;
            ctl.wait_initial_data()?;
            ctl.switchover()
        });
        (src, rx.join().unwrap())
    });
    src.unwrap_or_else(|e| panic!("{b:?}: source: {e}"));
    rx.unwrap_or_else(|e| panic!("{b:?}: receiver: {e}"));
    for (i, d) in to.iter().enumerate() {
        assert!(d.resume_report().unwrap().verified_ok, "{b:?}: device {i}");
        assert_eq!(d.state().unwrap(), MigState::Running, "{b:?}: device {i}");
    }
    for (i, d) in a.iter().enumerate() {
        assert_eq!(d.state().unwrap(), MigState::Running, "{b:?}: source device {i}");
    }
}

/// The same device objects migrate back and forth five times: each side is source and
/// destination in turn, and every migration verifies.
#[test]
fn trial_same_devices_migrate_back_and_forth() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    each_backend(|b| {
        let cfgs: Vec<SimConfig> = (0..3)
            .map(|i| {
                SimConfig::new(format!("r{i}"), (1 << 20) + i * 511, 40 + i)
                    .with_precopy_bytes(256 << 10)
                    .with_flags(if i == 1 { MigFlags::STOP_COPY } else { MigFlags::ALL })
            })
            .collect();
        let mut x: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
        let mut y: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
        for round in 0..5 {
            if round % 2 == 0 {
                migrate(b, &mut x, &mut y);
            } else {
                migrate(b, &mut y, &mut x);
            }
        }
    });
}
