//! Aborts in the middle of a transfer, on either side and with either backend: both ends stop
//! with an error within a bound, the source device is back in RUNNING, and no thread, fd or
//! buffer is left behind. One test function, so the fd and thread counts are this test's own.

use std::time::{Duration, Instant};

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{MigState, MigrationDevice};
use vfio_multifd::{Backend, DeviceOptions, Error, Receiver, ReceiverConfig, Source, SourceConfig};
use vfio_multifd_tests::{assert_verified, dev_id, migrate, open_fds, tcp_pairs, threads};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Source,
    Receiver,
}

fn aborted_run(b: Backend, side: Side) {
    // A slow device (32 MiB/s for 64 MiB) so the transfer is surely in the middle at 300 ms.
    let cfg = SimConfig::new("slow", 64 << 20, 11).with_throughput(32 << 20);
    let mut src_dev = SimDevice::new(cfg.clone());
    let mut dst_dev = SimDevice::new(cfg);
    let (c, s) = tcp_pairs(4);
    let scfg = SourceConfig::new().backend(b).stall_timeout(Duration::from_secs(20));
    let rcfg = ReceiverConfig::new().backend(b).stall_timeout(Duration::from_secs(20));
    let mut src = Source::new(scfg, c).unwrap();
    src.add_device_with(dev_id(0), &mut src_dev, DeviceOptions::default());
    let mut rx = Receiver::new(rcfg).unwrap();
    rx.add_device(dev_id(0), &mut dst_dev);
    let (sa, ra) = (src.abort_handle(), rx.abort_handle());
    let t0 = Instant::now();
    let (sres, rres, t_abort) = std::thread::scope(|sc| {
        let r = sc.spawn(move || (rx.run(s), Instant::now()));
        let h = sc.spawn(move || (src.run(), Instant::now()));
        std::thread::sleep(Duration::from_millis(300));
        let t_abort = Instant::now();
        match side {
            Side::Source => sa.abort(),
            Side::Receiver => ra.abort(),
        }
        let (sres, st) = h.join().unwrap();
        let (rres, rt) = r.join().unwrap();
        for t in [st, rt] {
            assert!(
                t.duration_since(t_abort) < Duration::from_secs(3),
                "{b:?} {side:?}: stopped {:?} after abort",
                t - t_abort
            );
        }
        (sres, rres, t_abort)
    });
    assert!(t_abort.duration_since(t0) >= Duration::from_millis(300));
    match side {
        Side::Source => assert!(matches!(sres, Err(Error::Aborted)), "{b:?}: {sres:?}"),
        Side::Receiver => assert!(matches!(rres, Err(Error::Aborted)), "{b:?}: {rres:?}"),
    }
    // The other side fails too (its peer went away), with its own error.
    assert!(sres.is_err() && rres.is_err(), "{b:?} {side:?}: {:?} / {:?}", sres.is_ok(), rres.is_ok());
    assert_eq!(src_dev.state().unwrap(), MigState::Running, "{b:?} {side:?}: source must keep running");
    assert_eq!(dst_dev.state().unwrap(), MigState::Resuming, "{b:?} {side:?}");
}

#[test]
fn abort_either_side_stops_both_and_leaks_nothing() {
    // Warm up lazily created process state (the io_uring probe) before counting.
    let m = migrate(&[SimConfig::new("w", 1 << 20, 1)], 2, SourceConfig::new(), ReceiverConfig::new(), false);
    assert_verified(&m);
    drop(m);
    std::thread::sleep(Duration::from_millis(200));
    let (fds, thr) = (open_fds(), threads());
    for b in [Backend::Uring, Backend::Blocking] {
        for side in [Side::Source, Side::Receiver] {
            aborted_run(b, side);
        }
        let m = migrate(
            &[SimConfig::new("ok", 8 << 20, 2)],
            4,
            SourceConfig::new().backend(b),
            ReceiverConfig::new().backend(b),
            false,
        );
        assert_verified(&m);
    }
    // Kernel-side teardown (io-wq workers) is asynchronous: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (open_fds() != fds || threads() != thr) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(open_fds(), fds, "file descriptors leaked");
    assert_eq!(threads(), thr, "threads leaked: {:?}", vfio_multifd_tests::thread_names());
}
