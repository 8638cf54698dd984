//! Loopback transfers of simulated devices: sizes, channel and device counts, both backends,
//! zero-copy on and off, short reads. Every byte and the config blob are verified at the
//! destination.

use vfio_migration::sim::SimConfig;
use vfio_multifd::{Backend, ReceiverConfig, SourceConfig, ZeroCopy};
use vfio_multifd_tests::{assert_verified, migrate};

const CHUNK: usize = 64 * 1024;

fn cfgs(n: usize, size: u64, max_read: usize) -> Vec<SimConfig> {
    (0..n).map(|i| SimConfig::new(format!("sim{i}"), size, 1000 + i as u64).with_max_read(max_read)).collect()
}

fn scfg(b: Backend, z: ZeroCopy) -> SourceConfig {
    SourceConfig::new().chunk_bytes(CHUNK).backend(b).zerocopy(z)
}

fn rcfg(b: Backend) -> ReceiverConfig {
    ReceiverConfig::new().max_packet_bytes(CHUNK).backend(b)
}

#[test]
fn sizes_around_the_chunk() {
    for b in [Backend::Uring, Backend::Blocking] {
        for size in [0u64, 1, CHUNK as u64 - 1, CHUNK as u64, CHUNK as u64 + 1, 5 * CHUNK as u64 + 17] {
            let m = migrate(&cfgs(1, size, CHUNK), 2, scfg(b, ZeroCopy::Auto), rcfg(b), false);
            if let Err(e) = &m.source {
                panic!("{b:?} size {size}: source: {e}");
            }
            if let Err(e) = &m.receiver {
                panic!("{b:?} size {size}: receiver: {e}");
            }
            assert_verified(&m);
        }
    }
}

#[test]
fn channels_by_devices_matrix() {
    for b in [Backend::Uring, Backend::Blocking] {
        for ch in [1usize, 2, 4, 8] {
            for devs in [1usize, 2, 4] {
                let m = migrate(&cfgs(devs, 3 << 20, CHUNK), ch, scfg(b, ZeroCopy::Auto), rcfg(b), false);
                if m.source.is_err() || m.receiver.is_err() {
                    panic!(
                        "{b:?} {ch}ch {devs}dev: source: {:?} receiver: {:?}",
                        m.source.as_ref().err(),
                        m.receiver.as_ref().err()
                    );
                }
                assert_verified(&m);
            }
        }
    }
}

#[test]
fn zerocopy_auto_stays_off_on_loopback() {
    // Loopback always copies and holds SEND_ZC buffers until the peer reads: auto picks SEND.
    let m = migrate(&cfgs(1, 1 << 20, CHUNK), 2, scfg(Backend::Uring, ZeroCopy::Auto), rcfg(Backend::Uring), false);
    assert_verified(&m);
    assert!(!m.source.as_ref().unwrap().zerocopy);
}

#[test]
fn zerocopy_on_and_off_with_short_reads() {
    for z in [ZeroCopy::On, ZeroCopy::Off] {
        // 4 KiB reads: every read is short against a 64 KiB chunk, so every linked send is
        // cancelled and re-sent alone with a patched header.
        let m = migrate(&cfgs(2, 2 << 20, 4096), 4, scfg(Backend::Uring, z), rcfg(Backend::Uring), false);
        assert_verified(&m);
        let sr = m.source.as_ref().unwrap();
        assert_eq!(sr.zerocopy, z == ZeroCopy::On);
        assert!(sr.devices.iter().all(|d| d.short_reads > 0));
        if z == ZeroCopy::On {
            // Loopback always copies; the notification says so.
            assert!(sr.copied_bytes > 0);
        }
    }
}

/// The real sender against the smallest receive budget (one out-of-order packet), with many
/// channels shared by several devices and reads of every size: it must complete, never stall.
#[test]
fn smallest_budget_with_the_real_sender() {
    for b in [Backend::Uring, Backend::Blocking] {
        for max_read in [4096, 20_000, CHUNK] {
            let m = migrate(&cfgs(4, 1 << 20, max_read), 8, scfg(b, ZeroCopy::Off), rcfg(b).budget_bytes(CHUNK), false);
            if m.source.is_err() || m.receiver.is_err() {
                panic!("{b:?} max_read {max_read}: {:?} / {:?}", m.source.as_ref().err(), m.receiver.as_ref().err());
            }
            assert_verified(&m);
        }
    }
}

#[test]
fn receiver_reports_when_each_device_was_loaded() {
    let m = migrate(&cfgs(2, 2 << 20, CHUNK), 2, scfg(Backend::Uring, ZeroCopy::Off), rcfg(Backend::Uring), false);
    assert_verified(&m);
    let r = m.receiver.as_ref().unwrap();
    for d in &r.devices {
        let t = d.loaded_after.expect("loaded");
        assert!(t > std::time::Duration::ZERO && t <= r.elapsed, "{t:?} vs {:?}", r.elapsed);
    }
}

/// A device goes RESUMING -> STOP (its validation) as soon as its own stream is complete, while
/// a slower device is still loading: its validation leaves the switchover's downtime. Seen from
/// a destination fabric, the fast device sits in STOP while the slow one is still RESUMING, for
/// about as long as the slow one's source takes to finish (about 250 ms; at least 50 ms is
/// asserted, where validating only after the last device gives well under 1 ms).
#[test]
fn each_device_is_validated_as_soon_as_its_stream_is_complete() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    use vfio_migration::sim::{Fabric, SimDevice};
    use vfio_migration::{MigState, MigrationDevice};
    use vfio_multifd::{DeviceOptions, Receiver, Source};
    use vfio_multifd_tests::{dev_id, each_backend, tcp_pairs};

    each_backend(|b| {
        let cfgs = [
            SimConfig::new("fast", 64 << 10, 11),
            SimConfig::new("slow", 2 << 20, 12).with_throughput(8 << 20).with_max_read(CHUNK),
        ];
        let mut sources: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
        let fabric = Fabric::new();
        let mut dests: Vec<SimDevice> = cfgs.iter().cloned().map(|c| SimDevice::new(c).with_fabric(&fabric)).collect();
        let (c, s) = tcp_pairs(2);
        let done = AtomicBool::new(false);
        let (source, receiver, apart) = std::thread::scope(|sc| {
            let (dests, fabric, done) = (&mut dests, &fabric, &done);
            let watch = sc.spawn(move || {
                // How long the fast device was seen in STOP while the slow one was RESUMING.
                let mut apart = Duration::ZERO;
                let mut last = Instant::now();
                while !done.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                    let now = Instant::now();
                    let st = fabric.devices();
                    let of = |n: &str| st.iter().find(|(m, _)| m == n).map(|&(_, s)| s);
                    if of("fast") == Some(MigState::Stop) && of("slow") == Some(MigState::Resuming) {
                        apart += now - last;
                    }
                    last = now;
                }
                apart
            });
            let rx = sc.spawn(move || {
                let mut r = Receiver::new(rcfg(b)).expect("receiver");
                for (i, d) in dests.iter_mut().enumerate() {
                    r.add_device(dev_id(i), d);
                }
                let res = r.run(s);
                done.store(true, Ordering::Release);
                res
            });
            let mut src = Source::new(scfg(b, ZeroCopy::Off), c).expect("source");
            for (i, d) in sources.iter_mut().enumerate() {
                src.add_device_with(dev_id(i), d, DeviceOptions::default());
            }
            let source = src.run();
            let receiver = rx.join().expect("receiver thread");
            (source, receiver, watch.join().expect("watcher"))
        });
        source.unwrap_or_else(|e| panic!("{b:?}: source: {e}"));
        receiver.unwrap_or_else(|e| panic!("{b:?}: receiver: {e}"));
        for d in &dests {
            assert_eq!(d.state().unwrap(), MigState::Stop, "{b:?}: {}", d.name());
            assert!(d.resume_report().unwrap().verified_ok, "{b:?}: {}", d.name());
        }
        assert!(
            apart >= Duration::from_millis(50),
            "{b:?}: the fast device was in STOP beside a loading one for {apart:?}"
        );
    });
}

/// `Receiver::on_started` runs once, on success, when every device is RUNNING and before the
/// receiver returns (a VMM resumes its vCPUs there); never when the receive fails.
#[test]
fn on_started_runs_once_with_every_device_running_and_never_on_failure() {
    use std::sync::Mutex;
    use std::time::Instant;
    use vfio_migration::sim::{Fabric, SimDevice};
    use vfio_migration::MigState;
    use vfio_multifd::{DeviceOptions, Receiver, Source};
    use vfio_multifd_tests::{dev_id, each_backend, tcp_pairs};

    each_backend(|b| {
        for fail in [false, true] {
            let size = 1 << 20;
            let src_cfgs = [SimConfig::new("a", size, 21), SimConfig::new("b", size, 22)];
            let dst_b = if fail { src_cfgs[1].clone().with_write_error_at(300_000) } else { src_cfgs[1].clone() };
            let mut sources: Vec<SimDevice> = src_cfgs.iter().cloned().map(SimDevice::new).collect();
            let fabric = Fabric::new();
            let mut dests: Vec<SimDevice> =
                [src_cfgs[0].clone(), dst_b].into_iter().map(|c| SimDevice::new(c).with_fabric(&fabric)).collect();
            let (c, s) = tcp_pairs(2);
            let seen: Mutex<Vec<(Instant, Vec<MigState>)>> = Mutex::new(Vec::new());
            let (receiver, returned) = std::thread::scope(|sc| {
                let (dests, fabric, seen) = (&mut dests, &fabric, &seen);
                let rx = sc.spawn(move || {
                    let mut r = Receiver::new(rcfg(b)).expect("receiver");
                    for (i, d) in dests.iter_mut().enumerate() {
                        r.add_device_with(dev_id(i), d, MigState::Running);
                    }
                    r.on_started(move || {
                        let states = fabric.devices().into_iter().map(|(_, s)| s).collect();
                        seen.lock().unwrap().push((Instant::now(), states));
                    });
                    let res = r.run(s);
                    (res, Instant::now())
                });
                let mut src = Source::new(scfg(b, ZeroCopy::Off), c).expect("source");
                for (i, d) in sources.iter_mut().enumerate() {
                    src.add_device_with(dev_id(i), d, DeviceOptions::default());
                }
                let _ = src.run();
                rx.join().expect("receiver thread")
            });
            let seen = seen.into_inner().unwrap();
            if fail {
                assert!(receiver.is_err(), "{b:?}: the receive must fail");
                assert!(seen.is_empty(), "{b:?}: on_started ran for a failed receive");
                continue;
            }
            receiver.unwrap_or_else(|e| panic!("{b:?}: receiver: {e}"));
            assert_eq!(seen.len(), 1, "{b:?}: on_started runs exactly once");
            let (at, states) = &seen[0];
            assert_eq!(states, &[MigState::Running, MigState::Running], "{b:?}: every device RUNNING at the hook");
            assert!(*at <= returned, "{b:?}: the hook runs before the receiver returns");
        }
    });
}
