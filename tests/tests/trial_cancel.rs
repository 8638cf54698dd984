//! Trials of cancels and `drive` failures at every point of a live session whose controller makes
//! the state changes itself, timed by hooks on the devices' own state changes (so "between the
//! quiesce and STOP_COPY" is exact), on both backends: every source device back in RUNNING, no
//! destination device started, the right error, no fd or thread left. One test function, so
//! the fd and thread counts are this test's own.

use std::os::fd::AsFd;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{transition, MigFlags, MigState, MigrationDevice};
use vfio_multifd::{
    AbortHandle, Backend, Error, Receiver, ReceiverConfig, SessionControl, SessionEvent, SourceConfig, SourceSession,
};
use vfio_multifd_tests::{dev_id, each_backend, open_fds, tcp_pairs, threads};

const CHUNK: usize = 64 * 1024;
const STALL: Duration = Duration::from_secs(5);

type Hook = Arc<dyn Fn(usize, MigState, MigState, &AbortHandle) + Send + Sync>;

/// Four devices (every flag; STOP_COPY only; P2P without PRE_COPY; PRE_COPY without P2P), the
/// last one slow (`slow`: bytes per second), plus a raw data fd.
fn cfgs(slow: Option<u64>) -> Vec<SimConfig> {
    let base = |i: u64| SimConfig::new(format!("c{i}"), (1 << 20) + i * 4099, 50 + i).with_precopy_bytes(256 << 10);
    let mut last = base(3).with_flags(MigFlags::STOP_COPY | MigFlags::PRE_COPY);
    if let Some(rate) = slow {
        last = last.with_throughput(rate);
    }
    vec![
        base(0),
        base(1).with_flags(MigFlags::STOP_COPY),
        base(2).with_flags(MigFlags::STOP_COPY | MigFlags::P2P),
        last,
    ]
}

struct Run<R> {
    source: vfio_multifd::Result<R>,
    receiver: vfio_multifd::Result<vfio_multifd::ReceiverReport>,
    started: bool,
    sources: Vec<SimDevice>,
    dests: Vec<SimDevice>,
    elapsed: Duration,
}

fn run_case<R>(
    b: Backend,
    cfgs: &[SimConfig],
    hook: Hook,
    drive: impl FnOnce(&mut SessionControl<'_>, &AbortHandle) -> vfio_multifd::Result<R>,
) -> Run<R> {
    let mut sources: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
    let raw_cfg = SimConfig::new("raw", (512 << 10) + 17, 99).with_flags(MigFlags::STOP_COPY);
    let mut raw_dev = SimDevice::new(raw_cfg.clone());
    let raw_fd = transition(&mut raw_dev, MigState::StopCopy).unwrap().data_fd.unwrap();
    let raw_config = raw_dev.save_config().unwrap();
    let mut dests: Vec<SimDevice> = cfgs.iter().cloned().chain([raw_cfg]).map(SimDevice::new).collect();
    let abort: Arc<OnceLock<AbortHandle>> = Arc::new(OnceLock::new());
    let (c, s) = tcp_pairs(3);
    let started = std::sync::atomic::AtomicBool::new(false);
    let t0 = Instant::now();
    let (source, receiver) = std::thread::scope(|sc| {
        let (dests, started) = (&mut dests, &started);
        let rx = sc.spawn(move || {
            let rcfg = ReceiverConfig::new().backend(b).max_packet_bytes(CHUNK).stall_timeout(STALL);
            let mut r = Receiver::new(rcfg).expect("receiver");
            for (i, d) in dests.iter_mut().enumerate() {
                r.add_device_with(dev_id(i), d, MigState::Running);
            }
            r.on_started(move || started.store(true, std::sync::atomic::Ordering::SeqCst));
            r.run(s)
        });
        let after: vfio_multifd_tests::AfterSet = {
            let (hook, abort) = (hook.clone(), abort.clone());
            Arc::new(move |no, from, to| {
                if let Some(a) = abort.get() {
                    hook(no, from, to, a);
                }
            })
        };
        let log = vfio_multifd_tests::StateLog::default();
        let mut hooked: Vec<vfio_multifd_tests::Logged<'_>> = sources
            .iter_mut()
            .enumerate()
            .map(|(no, dev)| vfio_multifd_tests::Logged { dev, no, log: log.clone(), after: Some(after.clone()) })
            .collect();
        let scfg = SourceConfig::new().backend(b).chunk_bytes(CHUNK).stall_timeout(STALL);
        let mut session = SourceSession::new(scfg, c).expect("session");
        let _ = abort.set(session.abort_handle());
        let n = hooked.len();
        for (i, d) in hooked.iter_mut().enumerate() {
            session.add_device(dev_id(i), d);
        }
        session.add_data_fd(dev_id(n), raw_fd.as_fd(), &raw_config);
        let a = session.abort_handle();
        let source = session.run(|ctl| drive(ctl, &a)).map(|(r, _)| r);
        let receiver = rx.join().expect("receiver thread");
        (source, receiver)
    });
    let elapsed = t0.elapsed();
    let started = started.into_inner();
    Run { source, receiver, started, sources, dests, elapsed }
}

fn check_failed<R: std::fmt::Debug>(what: &str, r: &Run<R>) {
    assert!(r.source.is_err(), "{what}: the source succeeded: {:?}", r.source);
    assert!(r.receiver.is_err(), "{what}: the receiver succeeded");
    assert!(!r.started, "{what}: on_started ran for a failed receive");
    for (i, d) in r.sources.iter().enumerate() {
        assert_eq!(d.state().unwrap(), MigState::Running, "{what}: source device {i} not back in RUNNING");
    }
    for (i, d) in r.dests.iter().enumerate() {
        let st = d.state().unwrap();
        assert!(st != MigState::Running, "{what}: destination device {i} started without a commit");
    }
    assert!(r.elapsed < STALL + Duration::from_secs(3), "{what}: took {:?}", r.elapsed);
}

/// Aborts after device `dev`'s SET `from -> to` (a cancel from inside the controller's walk).
fn abort_after(dev: usize, from: MigState, to: MigState) -> Hook {
    Arc::new(move |d, f, t, a| {
        if d == dev && f == from && t == to {
            a.abort();
        }
    })
}

fn no_hook() -> Hook {
    Arc::new(|_, _, _, _| {})
}

fn precopy_then_switch(ctl: &mut SessionControl<'_>, _: &AbortHandle) -> vfio_multifd::Result<()> {
    ctl.start_precopy()?;
    ctl.switchover()
}

fn cancels(b: Backend) {
    use MigState::{PreCopy, PreCopyP2p, Running, RunningP2p, StopCopy};
    // Cancels timed by the controller's own changes: after the first device's PRE_COPY, in the
    // middle of the quiesce, after the last quiesce (between quiesce and STOP_COPY), after the
    // first STOP_COPY, after the last STOP_COPY.
    let points = [
        ("after device 0 RUNNING->PRE_COPY", abort_after(0, Running, PreCopy)),
        ("after device 0 quiesced", abort_after(0, PreCopy, PreCopyP2p)),
        ("between the last quiesce and STOP_COPY", abort_after(2, Running, RunningP2p)),
        ("after device 0 STOP_COPY", abort_after(0, PreCopyP2p, StopCopy)),
        ("after the last STOP_COPY", abort_after(3, PreCopy, StopCopy)),
    ];
    for (what, hook) in points {
        let what = format!("{b:?} cancel {what}");
        let r = run_case(b, &cfgs(None), hook, precopy_then_switch);
        check_failed(&what, &r);
        assert!(matches!(r.source, Err(Error::Aborted)), "{what}: {:?}", r.source);
    }
    // A cancel from another thread before start_precopy, during pre-copy, and after a device
    // finished while a slow one still streams.
    let r = run_case(b, &cfgs(None), no_hook(), |ctl, a| {
        std::thread::scope(|s| {
            s.spawn(|| a.abort());
        });
        ctl.start_precopy()?;
        ctl.switchover()
    });
    check_failed(&format!("{b:?} cancel before start_precopy"), &r);
    let r = run_case(b, &cfgs(None), no_hook(), |ctl, a| {
        ctl.start_precopy()?;
        std::thread::sleep(Duration::from_millis(30));
        std::thread::scope(|s| {
            s.spawn(|| a.abort());
        });
        ctl.switchover()
    });
    check_failed(&format!("{b:?} cancel during pre-copy"), &r);
    let r = run_case(b, &cfgs(Some(4 << 20)), no_hook(), |ctl, _| {
        ctl.switchover()?;
        let deadline = Instant::now() + STALL;
        while Instant::now() < deadline {
            if let Some(SessionEvent::DeviceDone(_)) = ctl.next_event(Duration::from_millis(20)) {
                ctl.cancel();
                return Ok(());
            }
        }
        panic!("no device finished");
    });
    check_failed(&format!("{b:?} cancel after a device finished"), &r);
}

fn drive_failures(b: Backend) {
    let fail = || Error::Config("the VMM gave up".into());
    // An error returned, and a panic, before start_precopy, after it, and after the switchover.
    for at in 0..3 {
        let what = format!("{b:?} drive error at point {at}");
        let r: Run<()> = run_case(b, &cfgs(Some(8 << 20)), no_hook(), |ctl, _| {
            if at == 0 {
                return Err(fail());
            }
            ctl.start_precopy()?;
            if at == 1 {
                return Err(fail());
            }
            ctl.switchover()?;
            Err(fail())
        });
        check_failed(&what, &r);
        assert!(matches!(r.source, Err(Error::Config(_))), "{what}: not the VMM's own error: {:?}", r.source);
        let what = format!("{b:?} drive panic at point {at}");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_case(b, &cfgs(Some(8 << 20)), no_hook(), |ctl, _| -> vfio_multifd::Result<()> {
                if at >= 1 {
                    ctl.start_precopy()?;
                }
                if at >= 2 {
                    ctl.switchover()?;
                }
                panic!("trial: the VMM panicked");
            })
        }));
        assert!(r.is_err(), "{what}: the panic did not come through");
    }
}

#[test]
fn trial_cancel_and_drive_failure_at_every_point_leak_nothing() {
    // Warm up lazily created process state (the io_uring probe) before counting.
    let _ = run_case(Backend::Blocking, &cfgs(None), no_hook(), precopy_then_switch);
    each_backend(|b| {
        let r = run_case(b, &cfgs(None), no_hook(), precopy_then_switch);
        assert!(r.source.is_ok() && r.receiver.is_ok() && r.started, "{b:?}: {:?}", r.source.as_ref().err());
    });
    std::thread::sleep(Duration::from_millis(200));
    let (fds, thr) = (open_fds(), threads());
    each_backend(|b| {
        cancels(b);
        drive_failures(b);
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while (open_fds() != fds || threads() != thr) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(open_fds(), fds, "file descriptors leaked");
    assert_eq!(threads(), thr, "threads leaked: {:?}", vfio_multifd_tests::thread_names());
}
