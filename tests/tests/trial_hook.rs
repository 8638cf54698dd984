//! Trial of `Receiver::on_started` when the VMM's hook panics: the panic comes out of
//! `Receiver::run` (the devices did start), and the receive leaves no thread or fd behind, on
//! both backends. One test function, so the counts are this test's own.

use std::time::{Duration, Instant};

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{MigState, MigrationDevice};
use vfio_multifd::{Backend, Receiver, ReceiverConfig, SourceConfig, SourceSession};
use vfio_multifd_tests::{dev_id, each_backend, open_fds, tcp_pairs, threads};

fn once(b: Backend, panic: bool) {
    let cfg = SimConfig::new("h", 1 << 20, 5);
    let mut src = SimDevice::new(cfg.clone());
    let mut dst = SimDevice::new(cfg);
    let (c, s) = tcp_pairs(2);
    let (source, receiver) = std::thread::scope(|sc| {
        let dst = &mut dst;
        let rx = sc.spawn(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut r = Receiver::new(ReceiverConfig::new().backend(b)).unwrap();
                r.add_device_with(dev_id(0), dst, MigState::Running);
                r.on_started(move || {
                    assert!(!panic, "trial: the VMM's on_started hook panicked");
                });
                r.run(s).map(|_| ())
            }))
        });
        let mut session = SourceSession::new(SourceConfig::new().backend(b), c).unwrap();
        session.add_device(dev_id(0), &mut src);
        let source = session.run(|ctl| ctl.switchover()).map(|_| ());
        (source, rx.join().unwrap())
    });
    // The commit was sent before the hook ran: the source succeeded, the destination started.
    source.unwrap_or_else(|e| panic!("{b:?}: source: {e}"));
    assert_eq!(dst.state().unwrap(), MigState::Running, "{b:?}");
    match receiver {
        Err(_) => assert!(panic, "{b:?}: the receiver panicked"),
        Ok(r) => {
            assert!(!panic, "{b:?}: the hook's panic was swallowed");
            r.unwrap_or_else(|e| panic!("{b:?}: receiver: {e}"));
        }
    }
}

#[test]
fn trial_on_started_panic_leaks_nothing() {
    each_backend(|b| once(b, false));
    std::thread::sleep(Duration::from_millis(200));
    let (fds, thr) = (open_fds(), threads());
    each_backend(|b| {
        once(b, true);
        once(b, false);
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while (open_fds() != fds || threads() != thr) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(open_fds(), fds, "file descriptors leaked");
    assert_eq!(threads(), thr, "threads leaked: {:?}", vfio_multifd_tests::thread_names());
}
