//! Adversarial checks (from a fresh tester's trial) of the destination's early validation and endgame (validators per
//! device, verdicts while the workers wind down, the commit), on both backends.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Duration;

use vfio_migration::sim::{ArcFault, FaultLeave, SimConfig, SimDevice};
use vfio_migration::{MigState, MigrationDevice};
use vfio_multifd::wire::{EXT_COMMIT, EXT_RETURN_PATH, PACKET_OVERHEAD};
use vfio_multifd::{Backend, Error, Receiver, ReceiverConfig, SourceConfig};
use vfio_multifd_tests::{dev_id, each_backend, migrate_with, receive_from, sim_bytes, RawSender};

const PKT: usize = 4096;

/// The tests count the process's fds and threads: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn rcfg(b: Backend, stall: Duration) -> ReceiverConfig {
    ReceiverConfig::new().backend(b).max_packet_bytes(PKT).stall_timeout(stall).accept_timeout(Duration::from_secs(5))
}

/// Device `dev`'s whole stream of `packets` data packets and its config, as wire bytes.
fn stream(dev: usize, cfg: &SimConfig, packets: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for idx in 0..=packets {
        let config = idx == packets;
        let data = if config { SimDevice::expected_config(cfg) } else { sim_bytes(cfg.seed, (idx * PKT) as u64, PKT) };
        out.extend(packet(dev, idx as u32, config, &data));
    }
    out
}

fn packet(dev: usize, idx: u32, config: bool, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; PACKET_OVERHEAD];
    let v = vfio_multifd::wire::VfioPacketHeader { idx, flags: u32::from(config) };
    vfio_multifd::wire::encode_packet_header(&dev_id(dev), v, data.len(), &mut b).unwrap();
    b.extend_from_slice(data);
    b
}

fn offer_commit(s: &mut RawSender) {
    s.init_offering(0, 0, EXT_RETURN_PATH | EXT_COMMIT);
}

/// Reads return-path frames until SHUT; returns SHUT's status byte.
fn read_until_shut(s: &mut TcpStream) -> u8 {
    vfio_multifd_tests::read_until_shut_status(s).1
}

/// Runs a real source and a receiver over `channels` loopback channels; `watch` gets the
/// receiver's abort handle and progress while they run. Returns (source ok, receiver result,
/// sources, destinations).
fn migrate_watched(
    b: Backend,
    src: &[SimConfig],
    dst: &[SimConfig],
    channels: usize,
    watch: impl FnOnce(vfio_multifd::AbortHandle, vfio_multifd::Progress) + Send,
) -> (Result<(), String>, vfio_multifd::Result<vfio_multifd::ReceiverReport>, Vec<SimDevice>, Vec<SimDevice>) {
    let mut sources: Vec<SimDevice> = src.iter().cloned().map(SimDevice::new).collect();
    let mut dests: Vec<SimDevice> = dst.iter().cloned().map(SimDevice::new).collect();
    let (c, s) = vfio_multifd_tests::tcp_pairs(channels);
    let (source, receiver) = std::thread::scope(|sc| {
        let mut r = Receiver::new(rcfg(b, Duration::from_secs(5)).max_packet_bytes(64 << 10)).unwrap();
        let (abort, progress) = (r.abort_handle(), r.progress());
        for (i, d) in dests.iter_mut().enumerate() {
            r.add_device_with(dev_id(i), d, MigState::Running);
        }
        let rx = sc.spawn(move || r.run(s));
        let w = sc.spawn(move || watch(abort, progress));
        let mut src = vfio_multifd::Source::new(
            SourceConfig::new().backend(b).chunk_bytes(64 << 10).stall_timeout(Duration::from_secs(5)),
            c,
        )
        .unwrap();
        for (i, d) in sources.iter_mut().enumerate() {
            src.add_device_with(
                dev_id(i),
                d,
                vfio_multifd::DeviceOptions { precopy: false, final_state: MigState::Stop },
            );
        }
        let source = src.run().map(|_| ()).map_err(|e| e.to_string());
        let receiver = rx.join().expect("receiver thread");
        w.join().expect("watcher");
        (source, receiver)
    });
    (source, receiver, sources, dests)
}

/// Exactly one side runs the devices: a successful source left its devices stopped and every
/// destination device runs; a failed source runs its devices and no destination device runs.
fn assert_one_side_runs(b: Backend, source: &Result<(), String>, sources: &[SimDevice], dests: &[SimDevice]) {
    let src_running = sources.iter().filter(|d| d.state().unwrap() == MigState::Running).count();
    let dst_running = dests.iter().filter(|d| d.state().unwrap() == MigState::Running).count();
    match source {
        Ok(()) => assert!(
            src_running == 0 && dst_running == dests.len(),
            "{b:?}: the source reported success, but {dst_running} of {} destination devices run",
            dests.len()
        ),
        Err(e) => assert!(
            src_running == sources.len() && dst_running == 0,
            "{b:?}: the source failed ({e}); {src_running} source and {dst_running} destination devices run"
        ),
    }
}

/// 16 devices over 2 channels; the destination rejects device 7 at RESUMING -> STOP. The
/// receive fails naming it, the source fails and carries on, and no destination device runs.
#[test]
fn endgame_one_of_sixteen_rejected_at_validation() {
    let _g = serial();
    each_backend(|b| {
        let src: Vec<SimConfig> = (0..16).map(|i| SimConfig::new(format!("d{i}"), 64 << 10, i as u64 + 1)).collect();
        let mut dst = src.clone();
        let f = ArcFault { from: MigState::Resuming, to: MigState::Stop, errno: libc::EIO, leave: FaultLeave::Stay };
        dst[7] = dst[7].clone().with_fail_arc(f);
        let fds = vfio_multifd_tests::open_fds();
        let sc = SourceConfig::new().backend(b).chunk_bytes(PKT);
        let m = migrate_with(&src, &dst, 2, sc, ReceiverConfig::new().backend(b).max_packet_bytes(PKT), false);
        match &m.receiver {
            Err(Error::Device { device, .. }) => assert_eq!(*device, dev_id(7), "{b:?}"),
            other => panic!("{b:?}: expected device 7's rejection, got {other:?}"),
        }
        assert!(m.source.is_err(), "{b:?}: the source must not succeed: {:?}", m.source.as_ref().map(|_| ()));
        for (i, d) in m.dests.iter().enumerate() {
            let st = d.state().unwrap();
            assert_ne!(st, MigState::Running, "{b:?}: device {i} started although device 7 failed");
            if i != 7 {
                assert_eq!(st, MigState::Stop, "{b:?}: device {i}");
            }
        }
        for (i, s) in m.sources.iter().enumerate() {
            assert_eq!(s.state().unwrap(), MigState::Running, "{b:?}: source device {i} back to RUNNING");
        }
        drop(m);
        assert_eq!(vfio_multifd_tests::open_fds(), fds, "{b:?}: fds leaked");
    });
}

/// Device 0's stream completes (and is validated early) while device 1's channel is reset in
/// the middle of a packet: the receive fails, device 0 is in STOP, device 1 in RESUMING, and
/// the source hears the failure on the return path (failed verdicts, SHUT(1)) although the
/// failure raised the run's abort (failure verdicts are bounded by time alone).
#[test]
fn endgame_failed_receive_sends_failed_verdicts() {
    let _g = serial();
    each_backend(|b| {
        let heard = std::sync::Mutex::new(Vec::new());
        let cfgs = [SimConfig::new("a", (4 * PKT) as u64, 3), SimConfig::new("b", (4 * PKT) as u64, 4)];
        let (res, dests) = receive_from(&cfgs, 2, rcfg(b, Duration::from_secs(5)), |addr| {
            let mut s = RawSender::connect(addr, 2);
            offer_commit(&mut s);
            s.init(1, 1);
            s.raw(0, &stream(0, &cfgs[0], 4));
            s.raw(1, &packet(1, 0, false, &sim_bytes(4, 0, PKT)));
            // Let device 0 complete and be validated first.
            std::thread::sleep(Duration::from_millis(300));
            let mut half = packet(1, 1, false, &sim_bytes(4, PKT as u64, PKT));
            half.truncate(PACKET_OVERHEAD + 100);
            s.raw(1, &half);
            std::thread::sleep(Duration::from_millis(50));
            let l = libc::linger { l_onoff: 1, l_linger: 0 };
            nix::sys::socket::setsockopt(&s.chans[1], nix::sys::socket::sockopt::Linger, &l).unwrap();
            let c1 = s.chans.remove(1);
            drop(c1);
            // What the source hears on the return path: HELLO, then (best effort, `conclude`)
            // the failed verdicts and SHUT(failed).
            let mut got = Vec::new();
            s.chans[0].set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.chans[0].read_to_end(&mut got);
            *heard.lock().unwrap() = got;
        });
        let e = res.expect_err("the receive must fail");
        eprintln!("{b:?}: {e}");
        assert_eq!(dests[0].state().unwrap(), MigState::Stop, "{b:?}: device 0 validated early");
        assert!(dests[0].resume_report().unwrap().verified_ok, "{b:?}");
        assert_eq!(dests[1].state().unwrap(), MigState::Resuming, "{b:?}: device 1 left in RESUMING");
        let got = heard.into_inner().unwrap();
        // HELLO is 6 bytes; anything after it is the verdicts and SHUT.
        assert!(got.len() > 6, "{b:?}: the source heard only {got:?} on the return path, no failed verdicts");
        assert_eq!(got.last(), Some(&1), "{b:?}: SHUT(failed) last");
    });
}

/// A destination device whose RESUMING -> STOP panics (a buggy `MigrationDevice`): the receive
/// should fail with an error (the old `validate_targets` gave `Error::Internal("validating ..
/// panicked")`). Now `Receiver::run` panics on both backends: io_uring's validator panics, its
/// device is left without an outcome, and the endgame walks it again on the caller's thread
/// (`walk_stop(first)`), which panics there; the blocking writer thread's `t.validate()`
/// panics a scoped thread, which `std::thread::scope` re-raises.
struct PanicAtStop(SimDevice, Hook);

/// What the wrapper does besides delegating.
#[derive(Clone, Copy)]
enum Hook {
    /// Panic in RESUMING -> STOP.
    PanicAtStop,
    /// Sleep this long before STOP -> RESUMING (a slow driver).
    SlowResuming(Duration),
}

impl MigrationDevice for PanicAtStop {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn migration_flags(&self) -> vfio_migration::Result<vfio_migration::MigFlags> {
        self.0.migration_flags()
    }
    fn state(&self) -> vfio_migration::Result<MigState> {
        self.0.state()
    }
    fn set_state_raw(&mut self, target: MigState) -> vfio_migration::Result<Option<OwnedFd>> {
        match self.1 {
            Hook::PanicAtStop if target == MigState::Stop && self.0.state()? == MigState::Resuming => {
                panic!("driver bug while validating")
            }
            Hook::SlowResuming(d) if target == MigState::Resuming => std::thread::sleep(d),
            _ => {}
        }
        self.0.set_state_raw(target)
    }
    fn stop_copy_size(&self) -> vfio_migration::Result<u64> {
        self.0.stop_copy_size()
    }
    fn precopy_info(&self, fd: std::os::fd::BorrowedFd<'_>) -> vfio_migration::Result<vfio_migration::PrecopyInfo> {
        self.0.precopy_info(fd)
    }
    fn enable_precopy_info_v2(&mut self) -> vfio_migration::Result<bool> {
        self.0.enable_precopy_info_v2()
    }
    fn reset(&mut self) -> vfio_migration::Result<()> {
        self.0.reset()
    }
    fn read_data(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        buf: &mut [u8],
    ) -> vfio_migration::Result<vfio_migration::ReadOutcome> {
        self.0.read_data(fd, buf)
    }
    fn write_data(&self, fd: std::os::fd::BorrowedFd<'_>, buf: &[u8]) -> vfio_migration::Result<usize> {
        self.0.write_data(fd, buf)
    }
    fn load_config(&mut self, blob: &[u8]) -> vfio_migration::Result<()> {
        self.0.load_config(blob)
    }
    fn save_config(&mut self) -> vfio_migration::Result<Vec<u8>> {
        self.0.save_config()
    }
}

#[test]
fn endgame_panicking_validation_fails_that_device() {
    let _g = serial();
    each_backend(|b| {
        let cfgs = [SimConfig::new("a", (2 * PKT) as u64, 3), SimConfig::new("b", (2 * PKT) as u64, 4)];
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut d0 = PanicAtStop(SimDevice::new(cfgs[0].clone()), Hook::PanicAtStop);
        let mut d1 = SimDevice::new(cfgs[1].clone());
        let outcome = std::thread::scope(|sc| {
            let (d0, d1, l) = (&mut d0, &mut d1, &l);
            let h = sc.spawn(move || {
                let mut r = Receiver::new(rcfg(b, Duration::from_secs(3))).unwrap();
                r.add_device(dev_id(0), d0);
                r.add_device(dev_id(1), d1);
                r.run_listener(l, 2)
            });
            let mut s = RawSender::connect(addr, 2);
            s.init(0, 0);
            s.init(1, 1);
            s.raw(0, &stream(0, &cfgs[0], 2));
            s.raw(1, &stream(1, &cfgs[1], 2));
            s.finish();
            let r = h.join();
            drop(s);
            r
        });
        match outcome {
            Ok(Err(e)) => eprintln!("{b:?}: error as expected: {e}"),
            Ok(Ok(_)) => panic!("{b:?}: a device whose validation panicked was reported loaded"),
            Err(_) => panic!("{b:?}: Receiver::run panicked instead of returning an error"),
        }
    });
}

/// The receiver is aborted while the devices validate (RESUMING -> STOP drains a slow consumer):
/// the receive fails with `Aborted`, and exactly one side runs the devices.
#[test]
fn endgame_abort_while_validating_leaves_one_side_running() {
    let _g = serial();
    each_backend(|b| {
        let size = 256u64 << 10;
        let src: Vec<SimConfig> = (0..3).map(|i| SimConfig::new(format!("v{i}"), size, 40 + i)).collect();
        let dst: Vec<SimConfig> =
            src.iter().map(|c| c.clone().with_resume_pipe_bytes(1 << 20).with_resume_throughput(1 << 20)).collect();
        let total = size * 3;
        let (source, receiver, sources, dests) = migrate_watched(b, &src, &dst, 2, |abort, progress| {
            let t0 = std::time::Instant::now();
            while progress.bytes() < total && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(50));
            abort.abort();
        });
        eprintln!("{b:?}: source {source:?}, receiver {:?}", receiver.as_ref().map(|_| ()));
        assert!(matches!(receiver, Err(Error::Aborted)), "{b:?}: {:?}", receiver.as_ref().map(|_| ()));
        assert_one_side_runs(b, &source, &sources, &dests);
    });
}

/// 16 targets over 2 channels, every fourth a regular file (`add_data_fd`) among simulated
/// devices: every device is loaded and started, every file holds its stream and config, and no
/// fd or thread is left behind once the devices are dropped.
#[test]
fn endgame_sixteen_mixed_targets_few_channels_no_leaks() {
    let _g = serial();
    each_backend(|b| {
        let size = 96u64 << 10;
        let src: Vec<SimConfig> = (0..16).map(|i| SimConfig::new(format!("m{i}"), size, 70 + i)).collect();
        let (fds, threads) = (vfio_multifd_tests::open_fds(), vfio_multifd_tests::threads());
        {
            let dir = std::env::temp_dir().join(format!("trial-endgame-{}-{b:?}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let files: Vec<std::fs::File> =
                (0..4).map(|k| std::fs::File::create(dir.join(format!("f{k}"))).unwrap()).collect();
            let mut configs: Vec<Vec<u8>> = vec![Vec::new(); 4];
            let mut sources: Vec<SimDevice> = src.iter().cloned().map(SimDevice::new).collect();
            let mut dests: Vec<SimDevice> =
                src.iter().enumerate().filter(|(i, _)| i % 4 != 3).map(|(_, c)| SimDevice::new(c.clone())).collect();
            let (c, s) = vfio_multifd_tests::tcp_pairs(2);
            let (source, receiver) = std::thread::scope(|sc| {
                let mut r = Receiver::new(rcfg(b, Duration::from_secs(5)).max_packet_bytes(16 << 10)).unwrap();
                let mut devs = dests.iter_mut();
                let mut cfgs = configs.iter_mut();
                for i in 0..16 {
                    if i % 4 == 3 {
                        let f = std::os::fd::AsFd::as_fd(&files[i / 4]);
                        r.add_data_fd(dev_id(i), f, cfgs.next().unwrap());
                    } else {
                        r.add_device_with(dev_id(i), devs.next().unwrap(), MigState::Running);
                    }
                }
                let rx = sc.spawn(move || r.run(s));
                let mut src =
                    vfio_multifd::Source::new(SourceConfig::new().backend(b).chunk_bytes(16 << 10), c).unwrap();
                for (i, d) in sources.iter_mut().enumerate() {
                    src.add_device_with(
                        dev_id(i),
                        d,
                        vfio_multifd::DeviceOptions { precopy: false, final_state: MigState::Stop },
                    );
                }
                let source = src.run();
                (source, rx.join().expect("receiver thread"))
            });
            let rep = receiver.unwrap_or_else(|e| panic!("{b:?}: {e}"));
            source.unwrap_or_else(|e| panic!("{b:?}: source {e}"));
            for (k, d) in dests.iter().enumerate() {
                assert!(d.resume_report().unwrap().verified_ok, "{b:?}: device {k}");
                assert_eq!(d.state().unwrap(), MigState::Running, "{b:?}: device {k}");
            }
            for (k, config) in configs.iter().enumerate() {
                let i = 4 * k + 3;
                let got = std::fs::read(dir.join(format!("f{k}"))).unwrap();
                assert_eq!(got, sim_bytes(src[i].seed, 0, size as usize), "{b:?}: file {k}");
                assert_eq!(*config, SimDevice::expected_config(&src[i]), "{b:?}: config {k}");
                assert_eq!(rep.devices[i].reached_state, None, "{b:?}: a file has no state");
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
        // The sims' consumer threads are joined on drop; a joined thread can stay listed for a
        // moment, longer on a loaded machine (every receive thread exits at the receive's end):
        // give them up to 5 s, as the abort test does.
        let t0 = std::time::Instant::now();
        while (vfio_multifd_tests::threads() > threads || vfio_multifd_tests::open_fds() != fds)
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(vfio_multifd_tests::open_fds(), fds, "{b:?}: fds leaked");
        assert_eq!(
            vfio_multifd_tests::threads(),
            threads,
            "{b:?}: threads leaked: {:?}",
            vfio_multifd_tests::thread_names()
        );
    });
}

/// A source that resets channel 0 right after its last packet (it was cancelled before the
/// verdicts), at a few timings: the destination never starts the device.
#[test]
fn endgame_reset_right_after_last_packet_never_starts() {
    let _g = serial();
    each_backend(|b| {
        for delay_ms in [0u64, 0, 1, 2, 5, 20] {
            let cfg = SimConfig::new("dst0", (4 * PKT) as u64, 17);
            let (res, dests) = receive_from(std::slice::from_ref(&cfg), 2, rcfg(b, Duration::from_secs(3)), |addr| {
                let mut s = RawSender::connect(addr, 2);
                offer_commit(&mut s);
                s.init(1, 1);
                s.chans[0].write_all(&stream(0, &cfg, 4)).unwrap();
                s.chans[1].shutdown(Shutdown::Write).unwrap();
                std::thread::sleep(Duration::from_millis(delay_ms));
                let l = libc::linger { l_onoff: 1, l_linger: 0 };
                nix::sys::socket::setsockopt(&s.chans[0], nix::sys::socket::sockopt::Linger, &l).unwrap();
                drop(s);
            });
            let st = dests[0].state().unwrap();
            eprintln!("{b:?} +{delay_ms}ms: {:?}, device {st:?}", res.as_ref().map(|r| r.warnings.clone()));
            assert!(res.is_err(), "{b:?} +{delay_ms}ms: a reset source must not be taken for a commit");
            assert_ne!(st, MigState::Running, "{b:?} +{delay_ms}ms");
        }
    });
}

/// A destination whose device takes 1.2 s to enter RESUMING (before its channel set-up starts,
/// so HELLO leaves after the source's `HELLO_WAIT` of 1 s): the source carries on without the
/// return path and closes channel 0 after its last packet, while the destination, which then
/// accepts the return path late, sees the commit negotiated, takes that FIN for an early one
/// and leaves the device stopped. Exactly one side must run the device.
#[test]
fn endgame_late_hello_leaves_one_side_running() {
    let _g = serial();
    each_backend(|b| {
        let cfg = SimConfig::new("late", 64 << 10, 5);
        let mut source = SimDevice::new(cfg.clone());
        let mut dest = PanicAtStop(SimDevice::new(cfg), Hook::SlowResuming(Duration::from_millis(1200)));
        let (c, s) = vfio_multifd_tests::tcp_pairs(2);
        let (src_res, rx_res) = std::thread::scope(|sc| {
            let dest = &mut dest;
            let rx = sc.spawn(move || {
                let mut r = Receiver::new(rcfg(b, Duration::from_secs(3))).unwrap();
                r.add_device_with(dev_id(0), dest, MigState::Running);
                r.run(s)
            });
            let mut src = vfio_multifd::Source::new(
                SourceConfig::new().backend(b).chunk_bytes(PKT).stall_timeout(Duration::from_secs(3)),
                c,
            )
            .unwrap();
            src.add_device_with(
                dev_id(0),
                &mut source,
                vfio_multifd::DeviceOptions { precopy: false, final_state: MigState::Stop },
            );
            let r = src.run().map(|_| ()).map_err(|e| e.to_string());
            (r, rx.join().expect("receiver thread"))
        });
        eprintln!("{b:?}: source {src_res:?}; receiver {:?}", rx_res.as_ref().map(|r| r.return_path));
        assert_one_side_runs(b, &src_res, std::slice::from_ref(&source), std::slice::from_ref(&dest.0));
    });
}

/// What a raw source does on channel 0 once it has read every verdict.
#[derive(Debug, Clone, Copy)]
enum After {
    /// One byte, then FIN: no commit.
    ByteThenFin,
    /// FIN, then a reset 20 ms later: the FIN was the commit.
    FinThenReset,
    /// A reset while the destination may still wind down its workers: no commit.
    ResetAtOnce,
    /// FIN, then a reset at once (a source killed right after its commit): the FIN, which came
    /// first, was the commit.
    FinThenResetAtOnce,
}

/// Each way a source can end channel 0 after the verdicts, on both backends, with the device's
/// stream spread over 3 channels (channel 0 carrying its last packets): only a FIN commits.
#[test]
fn endgame_after_the_verdicts_only_a_fin_commits() {
    let _g = serial();
    each_backend(|b| {
        for after in [After::ByteThenFin, After::FinThenReset, After::ResetAtOnce, After::FinThenResetAtOnce] {
            let cfg = SimConfig::new("dst0", (6 * PKT) as u64, 23);
            let fds = vfio_multifd_tests::open_fds();
            let (res, dests) = receive_from(std::slice::from_ref(&cfg), 3, rcfg(b, Duration::from_secs(3)), |addr| {
                let mut s = RawSender::connect(addr, 3);
                offer_commit(&mut s);
                s.init(1, 1);
                s.init(2, 2);
                let all = stream(0, &cfg, 6);
                let per = PACKET_OVERHEAD + PKT;
                s.raw(1, &all[..2 * per]);
                s.raw(2, &all[2 * per..4 * per]);
                s.raw(0, &all[4 * per..]);
                s.chans[1].shutdown(Shutdown::Write).unwrap();
                s.chans[2].shutdown(Shutdown::Write).unwrap();
                assert_eq!(read_until_shut(&mut s.chans[0]), 0, "{b:?}");
                let reset = |c: &TcpStream| {
                    let l = libc::linger { l_onoff: 1, l_linger: 0 };
                    nix::sys::socket::setsockopt(c, nix::sys::socket::sockopt::Linger, &l).unwrap();
                };
                match after {
                    After::ByteThenFin => {
                        s.chans[0].write_all(&[7]).unwrap();
                        s.chans[0].shutdown(Shutdown::Write).unwrap();
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    After::FinThenReset => {
                        s.chans[0].shutdown(Shutdown::Write).unwrap();
                        std::thread::sleep(Duration::from_millis(20));
                        reset(&s.chans[0]);
                    }
                    After::ResetAtOnce => reset(&s.chans[0]),
                    After::FinThenResetAtOnce => {
                        s.chans[0].shutdown(Shutdown::Write).unwrap();
                        reset(&s.chans[0]);
                    }
                }
                drop(s);
            });
            let st = dests[0].state().unwrap();
            eprintln!("{b:?} {after:?}: {:?}, device {st:?}", res.as_ref().map(|r| r.warnings.clone()));
            match after {
                After::FinThenReset | After::FinThenResetAtOnce => {
                    res.unwrap_or_else(|e| panic!("{b:?} {after:?}: the FIN committed: {e}"));
                    assert_eq!(st, MigState::Running, "{b:?} {after:?}");
                }
                _ => {
                    assert!(matches!(res, Err(Error::NotCommitted { .. })), "{b:?} {after:?}: {res:?}");
                    assert_eq!(st, MigState::Stop, "{b:?} {after:?}");
                }
            }
            drop(dests);
            if vfio_multifd_tests::open_fds() != fds {
                let l = std::process::Command::new("ls")
                    .arg("-l")
                    .arg(format!("/proc/{}/fd", std::process::id()))
                    .output()
                    .unwrap();
                eprintln!("FDS {}", String::from_utf8_lossy(&l.stdout));
                std::thread::sleep(Duration::from_millis(200));
                eprintln!("after 200ms: {} vs {fds}", vfio_multifd_tests::open_fds());
            }
            assert_eq!(vfio_multifd_tests::open_fds(), fds, "{b:?} {after:?}: fds leaked");
        }
    });
}

/// The source is aborted at a sweep of moments around its last packets, the verdicts and the
/// commit (4 devices over 2 channels, the destination validating each as it completes): exactly
/// one side runs the devices every time, and no fd is left behind.
#[test]
fn endgame_source_abort_sweep_leaves_one_side_running() {
    let _g = serial();
    each_backend(|b| abort_sweep(b, Side::Source));
}

/// As the source sweep, aborting the destination instead, at moments from the receiver's
/// progress: exactly one side runs, except in the gap shown by
/// the in-doubt window (DESIGN 7.3), which this counts and fails on
/// (the project's own source and receiver reach it).
#[test]
fn endgame_destination_abort_sweep_leaves_one_side_running() {
    let _g = serial();
    each_backend(|b| abort_sweep(b, Side::Destination));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

fn abort_sweep(b: Backend, side: Side) {
    let mut gaps = Vec::new();
    {
        let size = 256u64 << 10;
        let cfgs: Vec<SimConfig> = (0..4).map(|i| SimConfig::new(format!("s{i}"), size, 90 + i)).collect();
        let total = size * 4;
        // Abort when the source has sent this share of the data, then after a delay.
        for (share, delay_us) in
            [(50u64, 0u64), (100, 0), (100, 200), (100, 500), (100, 1000), (100, 2000), (100, 5000)]
        {
            let fds = vfio_multifd_tests::open_fds();
            let mut sources: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
            let mut dests: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
            let (c, s) = vfio_multifd_tests::tcp_pairs(2);
            let (source, receiver) = std::thread::scope(|sc| {
                let dests = &mut dests;
                let r = {
                    let mut r = Receiver::new(rcfg(b, Duration::from_secs(3)).max_packet_bytes(64 << 10)).unwrap();
                    for (i, d) in dests.iter_mut().enumerate() {
                        r.add_device_with(dev_id(i), d, MigState::Running);
                    }
                    r
                };
                let (rx_abort, rx_progress) = (r.abort_handle(), r.progress());
                let rx = sc.spawn(move || r.run(s));
                let mut src = vfio_multifd::Source::new(
                    SourceConfig::new().backend(b).chunk_bytes(64 << 10).stall_timeout(Duration::from_secs(3)),
                    c,
                )
                .unwrap();
                let (abort, progress) = match side {
                    Side::Source => (src.abort_handle(), src.progress()),
                    Side::Destination => (rx_abort, rx_progress),
                };
                for (i, d) in sources.iter_mut().enumerate() {
                    src.add_device_with(
                        dev_id(i),
                        d,
                        vfio_multifd::DeviceOptions { precopy: false, final_state: MigState::Stop },
                    );
                }
                let w = sc.spawn(move || {
                    let t0 = std::time::Instant::now();
                    while progress.bytes() < total * share / 100 && t0.elapsed() < Duration::from_secs(5) {
                        std::hint::spin_loop();
                    }
                    std::thread::sleep(Duration::from_micros(delay_us));
                    abort.abort();
                });
                let source = src.run().map(|_| ()).map_err(|e| e.to_string());
                w.join().unwrap();
                (source, rx.join().expect("receiver thread"))
            });
            eprintln!(
                "{b:?} {share}% +{delay_us}us: source {:?}, receiver {:?}",
                source.as_ref().map_err(|e| e.chars().take(60).collect::<String>()),
                receiver.as_ref().map(|_| ()).map_err(|e| e.to_string().chars().take(60).collect::<String>())
            );
            let nowhere = source.is_ok()
                && matches!(receiver, Err(Error::Aborted))
                && dests.iter().all(|d| d.state().unwrap() == MigState::Stop);
            if nowhere {
                gaps.push(format!("{share}% +{delay_us}us"));
            } else {
                assert_one_side_runs(b, &source, &sources, &dests);
            }
            drop((sources, dests));
            assert_eq!(vfio_multifd_tests::open_fds(), fds, "{b:?}: fds leaked");
        }
    }
    // Never both. Neither only in the documented in-doubt window: the destination aborted after
    // its "loaded" verdicts and before the commit (DESIGN 7.3), never after a source abort.
    if side == Side::Source {
        assert!(gaps.is_empty(), "{b:?} {side:?}: neither side runs the devices after an abort at {gaps:?}");
    } else if !gaps.is_empty() {
        eprintln!("{b:?}: in doubt (documented) after a destination abort at {gaps:?}");
    }
}

/// 16 devices over 2 channels with one fault each run: a destination write error on device 3,
/// or a source stream truncated on device 11 (rejected at validation). Others complete and are
/// validated early; the receive fails naming the device, the source fails and carries on, no
/// destination device runs, and no fd is left behind.
#[test]
fn endgame_sixteen_devices_one_fault_leaves_one_side_running() {
    let _g = serial();
    each_backend(|b| {
        for fault in ["write error on 3", "truncated 11"] {
            let mut src: Vec<SimConfig> =
                (0..16).map(|i| SimConfig::new(format!("w{i}"), 128 << 10, 300 + i as u64)).collect();
            let mut dst = src.clone();
            let bad = if fault.starts_with("write") {
                dst[3] = dst[3].clone().with_write_error_at(40 << 10);
                3
            } else {
                src[11] = src[11].clone().with_truncate_at(100 << 10);
                11
            };
            let fds = vfio_multifd_tests::open_fds();
            let sc = SourceConfig::new().backend(b).chunk_bytes(16 << 10);
            let m = migrate_with(&src, &dst, 2, sc, ReceiverConfig::new().backend(b).max_packet_bytes(16 << 10), false);
            let err = m.receiver.as_ref().err().unwrap_or_else(|| panic!("{b:?} {fault}: the receive succeeded"));
            eprintln!("{b:?} {fault}: receiver: {err}; source: {:?}", m.source.as_ref().err().map(ToString::to_string));
            assert!(err.to_string().contains(&dev_id(bad).to_string()), "{b:?} {fault}: {err}");
            let source = m.source.as_ref().map(|_| ()).map_err(ToString::to_string);
            assert_one_side_runs(b, &source, &m.sources, &m.dests);
            drop(m);
            assert_eq!(vfio_multifd_tests::open_fds(), fds, "{b:?} {fault}: fds leaked");
        }
    });
}
