//! Live migration as a VMM drives it: a `SourceSession` with pre-copy while the guest runs, a
//! switchover the test decides, P2P-safe ordering, cancel in every phase, on both backends.

use std::time::Duration;

use vfio_migration::sim::SimConfig;
use vfio_migration::sim::{Fabric, SimDevice};
use vfio_migration::{MigState, MigrationDevice};
use vfio_multifd::{Backend, Error, ReceiverConfig, SessionEvent, SourceConfig, SourcePhase};
use vfio_multifd_tests::{dev_id, each_backend, live_migrate, live_migrate_devices, StateLog};

const CHUNK: usize = 64 * 1024;

fn sc(b: Backend) -> SourceConfig {
    SourceConfig::new().backend(b).chunk_bytes(CHUNK).stall_timeout(Duration::from_secs(20))
}

fn rc(b: Backend) -> ReceiverConfig {
    ReceiverConfig::new().backend(b).max_packet_bytes(CHUNK).stall_timeout(Duration::from_secs(20))
}

fn devices(n: u64) -> Vec<SimConfig> {
    (0..n)
        .map(|i| SimConfig::new(format!("l{i}"), (2 << 20) + i * 4099, 70 + i).with_precopy_bytes(512 << 10))
        .collect()
}

/// Every device reached its P2P state before any device was stopped (STOP or STOP_COPY).
fn assert_p2p_before_stop(log: &StateLog, n: usize) {
    let e = log.entries();
    let last_p2p = (0..n)
        .map(|d| {
            e.iter()
                .position(|&(x, _, t)| x == d && matches!(t, MigState::PreCopyP2p | MigState::RunningP2p))
                .unwrap_or_else(|| panic!("device {d} never reached a P2P state: {e:?}"))
        })
        .max()
        .unwrap();
    let first_stop = e.iter().position(|&(_, _, t)| matches!(t, MigState::Stop | MigState::StopCopy));
    if let Some(stop) = first_stop {
        assert!(last_p2p < stop, "a device stopped before every device was quiesced: {e:?}");
    }
}

#[test]
fn live_precopy_then_switchover_is_p2p_safe_and_verified() {
    each_backend(|b| {
        let cfgs = devices(3);
        let m = live_migrate(&cfgs, 3, sc(b), rc(b), |ctl| {
            ctl.start_precopy()?;
            ctl.wait_initial_data()?;
            let st = ctl.status();
            assert!(st.devices.iter().all(|d| d.initial_data_sent && d.phase == SourcePhase::PreCopy), "{st:?}");
            ctl.switchover()
        });
        let (_, report) = m.source.as_ref().expect("source ok");
        let rr = m.receiver.as_ref().expect("receiver ok");
        for (i, d) in m.dests.iter().enumerate() {
            let rep = d.resume_report().expect("resumed");
            assert!(rep.verified_ok, "{b:?} device {i}: {rep:?}");
            assert_eq!(rep.bytes_written, cfgs[i].size);
            assert_eq!(d.state().unwrap(), MigState::Running);
            assert_eq!(report.devices[i].precopy_bytes, 512 << 10, "{b:?} device {i}");
            assert_eq!(rr.devices[i].data_bytes, cfgs[i].size);
            assert_eq!(m.sources[i].state().unwrap(), MigState::Stop, "{b:?}: source left in STOP");
        }
        assert_p2p_before_stop(&m.log, 3);
        // The pre-copy stream continues on the same fd: PRE_COPY_P2P -> STOP_COPY, no new session.
        for d in 0..3 {
            assert!(m.log.first(d, MigState::PreCopy).is_some());
            assert!(m
                .log
                .entries()
                .iter()
                .any(|&(x, f, t)| x == d && f == MigState::PreCopyP2p && t == MigState::StopCopy));
        }
    });
}

#[test]
fn live_stop_copy_only_session_is_p2p_safe() {
    each_backend(|b| {
        let cfgs = devices(2);
        let m = live_migrate(&cfgs, 2, sc(b), rc(b), |ctl| ctl.switchover());
        assert!(m.source.is_ok(), "{b:?}: {:?}", m.source.err());
        assert!(m.receiver.is_ok(), "{b:?}: {:?}", m.receiver.err());
        assert_p2p_before_stop(&m.log, 2);
        assert!(m.log.entries().iter().all(|&(_, _, t)| t != MigState::PreCopy), "no pre-copy was asked for");
    });
}

#[test]
fn live_idle_precopy_longer_than_the_stall_timeout_is_not_a_stall() {
    each_backend(|b| {
        let cfgs = devices(1);
        let stall = Duration::from_millis(300);
        let m = live_migrate(&cfgs, 1, sc(b).stall_timeout(stall), rc(b), |ctl| {
            ctl.start_precopy()?;
            ctl.wait_initial_data()?;
            // Nothing more to read for over three stall timeouts.
            std::thread::sleep(stall * 3);
            assert!(ctl.status().devices[0].precopy_rounds > 0);
            ctl.switchover()
        });
        assert!(m.source.is_ok(), "{b:?}: {:?}", m.source.err());
        assert!(m.receiver.is_ok(), "{b:?}: {:?}", m.receiver.err());
    });
}

#[test]
fn live_events_report_initial_data_and_completion() {
    each_backend(|b| {
        let cfgs = devices(2);
        let m = live_migrate(&cfgs, 2, sc(b), rc(b), |ctl| {
            ctl.start_precopy()?;
            let (mut sent, mut acked) = (0, 0);
            // With the return path (our receiver), each device's initial data is also acked,
            // and only after it was sent.
            while acked < 2 {
                match ctl.next_event(Duration::from_secs(5)) {
                    Some(SessionEvent::InitialDataSent(_)) => sent += 1,
                    Some(SessionEvent::InitialDataAcked(d)) => {
                        acked += 1;
                        assert!(sent >= acked, "{d} acked before it was sent");
                    }
                    Some(other) => panic!("unexpected event {other:?}"),
                    None => panic!("no event within 5 s ({sent} sent, {acked} acked)"),
                }
            }
            assert!(ctl.status().initial_data_done() && ctl.status().return_path);
            ctl.switchover()?;
            let mut done = 0;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while done < 2 && std::time::Instant::now() < deadline {
                if let Some(SessionEvent::DeviceDone(_)) = ctl.next_event(Duration::from_secs(1)) {
                    done += 1;
                }
            }
            Ok(done)
        });
        assert_eq!(m.source.as_ref().map(|(d, _)| *d).ok(), Some(2), "{b:?}");
    });
}

/// Cancel before pre-copy, during pre-copy, and after the switchover started (a device fails
/// to enter STOP_COPY): every source device ends RUNNING, P2P-safely.
#[test]
fn live_cancel_in_every_phase_puts_every_device_back_to_running() {
    each_backend(|b| {
        // Before pre-copy: no device state change at all.
        let m = live_migrate(&devices(2), 2, sc(b), rc(b), |ctl| -> vfio_multifd::Result<()> {
            ctl.cancel();
            Err(Error::Aborted)
        });
        assert!(matches!(m.source, Err(Error::Aborted)), "{b:?}: {:?}", m.source.as_ref().err());
        assert!(m.log.entries().is_empty(), "{b:?}: a cancelled session touched a device: {:?}", m.log.entries());
        // During pre-copy.
        let m = live_migrate(&devices(3), 2, sc(b), rc(b), |ctl| -> vfio_multifd::Result<()> {
            ctl.start_precopy()?;
            std::thread::sleep(Duration::from_millis(50));
            ctl.cancel();
            Err(Error::Aborted)
        });
        assert!(m.source.is_err(), "{b:?}");
        for (i, d) in m.sources.iter().enumerate() {
            assert_eq!(d.state().unwrap(), MigState::Running, "{b:?} device {i}");
        }
        // A device whose STOP -> STOP_COPY fails during the switchover: all back, P2P-safely.
        let mut cfgs = devices(3);
        cfgs[2] = cfgs[2].clone().with_flags(vfio_migration::MigFlags::STOP_COPY | vfio_migration::MigFlags::P2P);
        cfgs[2].fail_arc = Some(vfio_migration::sim::ArcFault {
            from: MigState::Stop,
            to: MigState::StopCopy,
            errno: libc::EIO,
            leave: vfio_migration::sim::FaultLeave::Stay,
        });
        let m = live_migrate(&cfgs, 2, sc(b), rc(b), |ctl| {
            ctl.start_precopy()?;
            ctl.switchover()
        });
        match &m.source {
            Err(Error::Device { device, .. }) => assert_eq!(*device, dev_id(2)),
            other => panic!("{b:?}: expected device 2's error, got {:?}", other.as_ref().err()),
        }
        for (i, d) in m.sources.iter().enumerate() {
            assert_eq!(d.state().unwrap(), MigState::Running, "{b:?} device {i}");
        }
        let e = m.log.entries();
        let first_running = e.iter().position(|&(_, f, t)| t == MigState::Running && f != MigState::Running);
        let last_p2p = e.iter().rposition(|&(_, _, t)| t == MigState::RunningP2p);
        if let (Some(run), Some(p2p)) = (first_running, last_p2p) {
            assert!(p2p < run, "{b:?}: a device ran again while a peer was not yet back in RUNNING_P2P: {e:?}");
        }
    });
}

/// A device that fails late (a read error in STOP_COPY) while the others have finished: the
/// finished ones are put back to RUNNING too.
#[test]
fn live_late_failure_recovers_finished_devices() {
    each_backend(|b| {
        let mut cfgs = devices(3);
        cfgs[1] = cfgs[1].clone().with_read_error_at(1 << 20).with_throughput(16 << 20);
        let m = live_migrate(&cfgs, 3, sc(b), rc(b), |ctl| ctl.switchover());
        assert!(matches!(m.source, Err(Error::DeviceRead { .. })), "{b:?}: {:?}", m.source.as_ref().err());
        for (i, d) in m.sources.iter().enumerate() {
            assert_eq!(d.state().unwrap(), MigState::Running, "{b:?} device {i}");
        }
    });
}

/// The VMM's view of a live migration: three live devices that dirty their state, a guest that
/// writes into them and devices that DMA into each other while pre-copy runs; the "vCPUs" stop
/// before the switchover. No write may be lost, no device may stop while a peer can still DMA
/// into it, and each destination device must end with its source's final state.
#[test]
fn live_peer_dma_and_guest_writes_lose_nothing() {
    each_backend(|b| {
        let size = 4u64 << 20;
        let fabric = Fabric::new();
        let src_cfgs: Vec<SimConfig> = (0..3)
            .map(|i| SimConfig::new(format!("v{i}"), size, 90 + i).with_precopy_bytes(size).with_dirty_rate(8 << 20))
            .collect();
        let sources: Vec<SimDevice> =
            src_cfgs.iter().cloned().map(|c| SimDevice::new(c).with_fabric(&fabric)).collect();
        // The destination expects the same live stream; it dirties nothing itself.
        let dests: Vec<SimDevice> = src_cfgs.iter().cloned().map(|c| SimDevice::new(c.with_dirty_rate(0))).collect();
        let handles: Vec<_> = sources.iter().map(SimDevice::handle).collect();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let m = std::thread::scope(|s| {
            let (handles, stop) = (&handles, &stop);
            let vcpus = s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let (a, b) = ((n % 3) as usize, ((n + 1) % 3) as usize);
                    handles[a].guest_write(n * 7 % 1024);
                    handles[a].dma_write_to(&handles[b], n * 13 % 1024);
                    n += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                n
            });
            let m = live_migrate_devices(sources, dests, 3, sc(b), rc(b), |ctl| {
                ctl.start_precopy()?;
                std::thread::sleep(Duration::from_millis(150));
                ctl.wait_initial_data()?;
                // The VMM stops its vCPUs (the guest and the devices' DMA initiators) first.
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                assert!(vcpus.join().expect("vcpu thread") > 10, "the guest barely ran");
                ctl.switchover()
            });
            m
        });
        assert!(m.source.is_ok(), "{b:?}: {:?}", m.source.as_ref().err());
        assert!(m.receiver.is_ok(), "{b:?}: {:?}", m.receiver.as_ref().err());
        assert!(fabric.violations().is_empty(), "{b:?}: {:?}", fabric.violations());
        assert_eq!(fabric.writes_lost(), 0, "{b:?}: {:?}", fabric.stats());
        assert!(fabric.writes_landed() > 0);
        for (i, h) in handles.iter().enumerate() {
            assert_eq!(m.dests[i].state_digest(), h.state_digest(), "{b:?} device {i}: destination state");
            assert!(m.dests[i].resume_report().expect("resumed").dirty_records > 0, "{b:?} device {i}");
        }
        let (_, report) = m.source.as_ref().unwrap();
        assert_eq!(report.verdicts.as_ref().map(Vec::len), Some(3), "{b:?}: every device has a verdict");
    });
}

/// Without the P2P barrier the same fabric would catch a device stopped under a running peer:
/// proves the checker itself can fail.
#[test]
fn live_fabric_catches_a_stop_under_a_running_peer() {
    let fabric = Fabric::new();
    let mut a = SimDevice::new(SimConfig::new("a", 1 << 20, 1)).with_fabric(&fabric);
    let _b = SimDevice::new(SimConfig::new("b", 1 << 20, 2)).with_fabric(&fabric);
    vfio_migration::transition(&mut a, MigState::StopCopy).unwrap();
    assert!(!fabric.violations().is_empty());
}

/// The receiver says whether the return path was used and when its devices were ready.
#[test]
fn live_receiver_reports_return_path_and_readiness() {
    each_backend(|b| {
        let m = live_migrate(&devices(1), 1, sc(b), rc(b), |ctl| ctl.switchover());
        let rr = m.receiver.as_ref().expect("receiver ok");
        assert!(rr.return_path, "{b:?}");
        assert!(rr.devices_ready_after <= rr.elapsed, "{b:?}");
        let m = live_migrate(&devices(1), 1, sc(b).return_path(false), rc(b), |ctl| ctl.switchover());
        assert!(!m.receiver.as_ref().expect("receiver ok").return_path, "{b:?}");
        assert!(m.source.as_ref().expect("source ok").1.verdicts.is_none(), "{b:?}: no verdict without a return path");
    });
}

/// A panic in the VMM's drive closure still puts every source device back to RUNNING before
/// it propagates.
#[test]
fn live_panic_in_drive_recovers_devices() {
    use vfio_multifd::{Receiver, SourceSession};
    let mut srcs: Vec<SimDevice> = devices(2).into_iter().map(SimDevice::new).collect();
    let mut dsts: Vec<SimDevice> = devices(2).into_iter().map(SimDevice::new).collect();
    let (c, s) = vfio_multifd_tests::tcp_pairs(2);
    let panicked = std::thread::scope(|sc| {
        let dsts = &mut dsts;
        let rx = sc.spawn(move || {
            let mut r = Receiver::new(rc(Backend::Uring)).unwrap();
            for (i, d) in dsts.iter_mut().enumerate() {
                r.add_device(dev_id(i), d);
            }
            r.run(s)
        });
        let mut session = SourceSession::new(sc_for_panic(), c).unwrap();
        for (i, d) in srcs.iter_mut().enumerate() {
            session.add_device(dev_id(i), d);
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            session.run(|ctl| -> vfio_multifd::Result<()> {
                ctl.start_precopy()?;
                ctl.switchover()?;
                panic!("the VMM's drive panicked");
            })
        }));
        let _ = rx.join();
        r.is_err()
    });
    assert!(panicked, "the panic reaches the caller");
    for (i, d) in srcs.iter().enumerate() {
        assert_eq!(d.state().unwrap(), MigState::Running, "device {i}");
    }
}

fn sc_for_panic() -> SourceConfig {
    sc(Backend::Uring)
}

/// Calls out of order are errors, and a cancelled session reports Aborted.
#[test]
fn live_misuse_is_reported() {
    let m = live_migrate(&devices(1), 1, sc(Backend::Uring), rc(Backend::Uring), |ctl| {
        ctl.switchover()?;
        assert!(matches!(ctl.start_precopy(), Err(Error::Usage { .. })));
        assert!(matches!(ctl.switchover(), Err(Error::Usage { .. })));
        Ok(())
    });
    // The out-of-order calls failed and changed nothing; the migration itself went through.
    assert!(m.source.is_ok(), "{:?}", m.source.as_ref().err());
    let m = live_migrate(&devices(1), 1, sc(Backend::Uring), rc(Backend::Uring), |ctl| {
        ctl.cancel();
        Ok(())
    });
    assert!(matches!(m.source, Err(Error::Aborted)), "{:?}", m.source.as_ref().err());
    let m = live_migrate(&devices(1), 1, sc(Backend::Uring), rc(Backend::Uring), |_| Ok(()));
    assert!(matches!(m.source, Err(Error::Usage { .. })), "{:?}", m.source.as_ref().err());
    assert_eq!(m.sources[0].state().unwrap(), MigState::Running);
}
