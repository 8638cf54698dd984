//! Conformance: every case runs the same transfer on both engine backends (io_uring and
//! blocking) and expects the same outcome on both, against data fds that behave the way real
//! ones do: `O_NONBLOCK` save fds that give `EAGAIN` (mlx5), resume fds that give short writes
//! and `EAGAIN`, `EINTR` on every blocking call, short reads, zero-length streams, and the
//! reserved packet index. A case that passes on one backend and fails on the other is drift
//! between the backends, i.e. an engine bug.
//!
//! Without io_uring, [`each_backend`] skips the io_uring half (and says so on stderr), except
//! under `CI=true`, where that is a failure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use vfio_migration::sim::{PrecopyEnd, SimConfig, SimDevice};
use vfio_migration::{MigState, MigrationDevice};
use vfio_multifd::wire::WireError;
use vfio_multifd::{Backend, Error, ReceiverConfig, SourceConfig};
use vfio_multifd_tests::{
    assert_verified, dev_id, each_backend, migrate, migrate_with, receive_from, sim_bytes, Migration, RawSender,
};

const CHUNK: usize = 64 * 1024;

fn sc(b: Backend) -> SourceConfig {
    SourceConfig::new().chunk_bytes(CHUNK).backend(b)
}

fn rc(b: Backend) -> ReceiverConfig {
    ReceiverConfig::new().max_packet_bytes(CHUNK).backend(b)
}

/// The `EINTR` case signals every thread of the process, so it runs alone: every other case
/// holds this for reading, the `EINTR` case for writing.
static SIGNAL_STORM: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    SIGNAL_STORM.read().unwrap_or_else(|p| p.into_inner())
}

/// Panics with both sides' errors (and the backend) unless both sides succeeded, then checks
/// every byte and the config blob at the destination.
fn verified(b: Backend, what: &str, m: &Migration) {
    if m.source.is_err() || m.receiver.is_err() {
        panic!("{b:?} {what}: source: {:?}\n  receiver: {:?}", m.source.as_ref().err(), m.receiver.as_ref().err());
    }
    assert_verified(m);
}

fn sims(n: usize, size: u64, seed: u64, f: impl Fn(SimConfig) -> SimConfig) -> Vec<SimConfig> {
    (0..n).map(|i| f(SimConfig::new(format!("c{i}"), size + i as u64 * 4099, seed + i as u64))).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. O_NONBLOCK save fd: a paced producer makes raw reads give EAGAIN.
// ---------------------------------------------------------------------------------------------

#[test]
fn conformance_nonblocking_save_fd_eagain() {
    let _g = shared();
    each_backend(|b| {
        for (devs, chans, precopy) in [(1usize, 2usize, false), (3, 4, false), (2, 3, true)] {
            // 2 MiB per device at 24 MiB/s in 64 KiB chunks: the pipe is empty most of the time.
            let cfgs = sims(devs, 2 << 20, 100, |c| {
                c.with_nonblocking_save(true)
                    .with_throughput(24 << 20)
                    .with_max_read(CHUNK)
                    .with_precopy_bytes(256 << 10)
            });
            let m = migrate(&cfgs, chans, sc(b), rc(b), precopy);
            verified(b, &format!("{devs} dev / {chans} ch / precopy {precopy}"), &m);
        }
        // Latency instead of throughput: a wait before every 16 KiB.
        let cfgs = sims(2, 1 << 20, 110, |c| {
            c.with_nonblocking_save(true).with_read_latency(Duration::from_micros(500)).with_max_read(16 << 10)
        });
        let m = migrate(&cfgs, 2, sc(b), rc(b), false);
        verified(b, "read latency", &m);
    });
}

// ---------------------------------------------------------------------------------------------
// 2. O_NONBLOCK resume fd: a slow consumer makes writes short or EAGAIN.
// ---------------------------------------------------------------------------------------------

fn slow_nonblocking_dest(c: SimConfig) -> SimConfig {
    c.with_nonblocking_resume(true).with_resume_pipe_bytes(16 << 10).with_resume_throughput(24 << 20)
}

#[test]
fn conformance_nonblocking_resume_fd_eagain() {
    let _g = shared();
    each_backend(|b| {
        for (devs, chans) in [(1usize, 2usize), (3, 4)] {
            let src = sims(devs, 2 << 20, 200, |c| c);
            let dst = sims(devs, 2 << 20, 200, slow_nonblocking_dest);
            let m = migrate_with(&src, &dst, chans, sc(b), rc(b), false);
            verified(b, &format!("{devs} dev / {chans} ch"), &m);
            let r = m.receiver.as_ref().unwrap();
            for (i, d) in r.devices.iter().enumerate() {
                assert_eq!(d.data_bytes, dst[i].size, "{b:?}: device {i} bytes written");
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 3. EINTR on every blocking call: a signal without SA_RESTART to every thread, every ~1 ms.
// ---------------------------------------------------------------------------------------------

static SIGNALS_HANDLED: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    // Async-signal-safe: one atomic add.
    SIGNALS_HANDLED.fetch_add(1, Ordering::Relaxed);
}

/// Installs the counting handler for SIGUSR1 without SA_RESTART, and puts the old one back on
/// drop.
struct SignalHandler {
    old: SigAction,
}

impl SignalHandler {
    fn install() -> SignalHandler {
        let act = SigAction::new(SigHandler::Handler(count_signal), SaFlags::empty(), SigSet::empty());
        // SAFETY: the handler only does an atomic add, which is async-signal-safe, and it stays
        // valid for the life of the process.
        let old = unsafe { sigaction(Signal::SIGUSR1, &act) }.expect("sigaction(SIGUSR1)");
        SignalHandler { old }
    }
}

impl Drop for SignalHandler {
    fn drop(&mut self) {
        // SAFETY: puts back the action that was installed before (the default one, normally).
        let _ = unsafe { sigaction(Signal::SIGUSR1, &self.old) };
    }
}

/// Sends SIGUSR1 to every thread of this process except the caller and the kernel's io_uring
/// workers (`iou-*`, which block every signal: a signal sent to them would stay pending).
fn signal_every_thread() {
    let me = nix::unistd::gettid().as_raw();
    let pid = nix::unistd::getpid().as_raw();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<libc::pid_t>().ok()) else { continue };
        if tid == me {
            continue;
        }
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("iou-") {
            continue;
        }
        // SAFETY: tgkill takes no pointers; a thread that exited in the meantime gives ESRCH.
        unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR1) };
    }
}

#[test]
fn conformance_eintr_on_device_fds() {
    let _alone = SIGNAL_STORM.write().unwrap_or_else(|p| p.into_inner());
    let _handler = SignalHandler::install();
    each_backend(|b| {
        // A paced producer (reads block) and a slow consumer behind a small blocking pipe
        // (writes block), so every thread is often inside a blocking call when a signal lands.
        let src = sims(2, 3 << 20, 300, |c| c.with_throughput(24 << 20).with_max_read(CHUNK));
        let dst = sims(2, 3 << 20, 300, |c| c.with_resume_pipe_bytes(16 << 10).with_resume_throughput(24 << 20));
        let stop = AtomicBool::new(false);
        let before = SIGNALS_HANDLED.load(Ordering::Relaxed);
        let m = std::thread::scope(|s| {
            let stop = &stop;
            let storm = s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    signal_every_thread();
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            let m = migrate_with(&src, &dst, 2, sc(b), rc(b), false);
            stop.store(true, Ordering::Relaxed);
            storm.join().expect("signal thread");
            m
        });
        // Let signals still in flight land while the handler is installed.
        std::thread::sleep(Duration::from_millis(20));
        let handled = SIGNALS_HANDLED.load(Ordering::Relaxed) - before;
        verified(b, "under signals", &m);
        assert!(handled >= 50, "{b:?}: only {handled} signals were handled: the case did not test EINTR");
    });
}

// ---------------------------------------------------------------------------------------------
// 4. Short reads: every read returns at most 4 KiB of a 64 KiB chunk.
// ---------------------------------------------------------------------------------------------

#[test]
fn conformance_short_reads() {
    let _g = shared();
    each_backend(|b| {
        for size in [CHUNK as u64 - 1, CHUNK as u64 + 1, 5 * CHUNK as u64 + 17] {
            let cfgs = [SimConfig::new("sr", size, 400).with_max_read(4096)];
            let m = migrate(&cfgs, 2, sc(b), rc(b), false);
            verified(b, &format!("size {size}"), &m);
            let d = &m.source.as_ref().unwrap().devices[0];
            assert!(d.short_reads > 0, "{b:?} size {size}: no short read reported: {d:?}");
            assert_eq!(d.short_reads, d.packets, "{b:?} size {size}: every read is short: {d:?}");
            assert!(d.packets >= size.div_ceil(4096), "{b:?} size {size}: a packet of more than 4 KiB: {d:?}");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 5. Short writes: partial writes to the resume fd are continued, and counted.
// ---------------------------------------------------------------------------------------------

#[test]
fn conformance_short_writes() {
    let _g = shared();
    each_backend(|b| {
        // 64 KiB packets into a 4 KiB O_NONBLOCK pipe behind a slow consumer: a write can never
        // take a whole packet.
        let src = sims(2, 1 << 20, 500, |c| c);
        let dst = sims(2, 1 << 20, 500, |c| {
            c.with_nonblocking_resume(true).with_resume_pipe_bytes(4096).with_resume_throughput(32 << 20)
        });
        let m = migrate_with(&src, &dst, 2, sc(b), rc(b), false);
        verified(b, "short writes", &m);
        for (i, d) in m.receiver.as_ref().unwrap().devices.iter().enumerate() {
            assert!(d.short_writes > 0, "{b:?}: device {i}: no short write reported: {d:?}");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 6. Zero-length streams, with and without PRE_COPY.
// ---------------------------------------------------------------------------------------------

#[test]
fn conformance_zero_length_streams() {
    let _g = shared();
    each_backend(|b| {
        // A 0-byte device alone, and next to a non-empty one.
        let m = migrate(&[SimConfig::new("z", 0, 600)], 2, sc(b), rc(b), false);
        verified(b, "0 bytes", &m);
        let m = migrate(&[SimConfig::new("z", 0, 601), SimConfig::new("n", 300_000, 602)], 2, sc(b), rc(b), false);
        verified(b, "0 bytes next to 300000", &m);
        for end in [PrecopyEnd::Zero, PrecopyEnd::NoMsg] {
            // PRE_COPY with an empty stream, and with 0 initial bytes before a non-empty
            // STOP_COPY: the first pre-copy read is already at the temporary end (mtty's 0, or
            // ENOMSG).
            let cfgs = [
                SimConfig::new("pz", 0, 610).with_precopy_end(end),
                SimConfig::new("p0", 400_000, 611).with_precopy_bytes(0).with_precopy_end(end),
            ];
            let m = migrate(&cfgs, 2, sc(b), rc(b), true);
            verified(b, &format!("PRE_COPY with 0 initial bytes, end {end:?}"), &m);
            for (i, d) in m.source.as_ref().unwrap().devices.iter().enumerate() {
                assert_eq!(d.precopy_bytes, 0, "{b:?} {end:?}: device {i}");
                let t = m.sources[i].transitions();
                assert!(t.contains(&(MigState::Running, MigState::PreCopy)), "{b:?} {end:?}: {t:?}");
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 7. The reserved packet index u32::MAX is rejected, identically on both backends.
// ---------------------------------------------------------------------------------------------

#[test]
fn conformance_index_limit() {
    let _g = shared();
    let pkt = 4096usize;
    let dst = SimConfig::new("ix", 2 * pkt as u64, 700);
    let messages = Mutex::new(Vec::new());
    each_backend(|b| {
        for config in [false, true] {
            let rcfg = ReceiverConfig::new()
                .backend(b)
                .max_packet_bytes(pkt)
                .stall_timeout(Duration::from_secs(3))
                .accept_timeout(Duration::from_secs(5));
            let t0 = Instant::now();
            let (res, dests) = receive_from(std::slice::from_ref(&dst), 1, rcfg, |addr| {
                let mut s = RawSender::connect(addr, 1);
                s.init(0, 0);
                let payload = if config { SimDevice::expected_config(&dst) } else { sim_bytes(dst.seed, 0, pkt) };
                s.packet(0, &dev_id(0), u32::MAX, config, &payload);
                std::thread::sleep(Duration::from_millis(50));
                s.finish();
            });
            let what = if config { "config packet" } else { "data packet" };
            match &res {
                Err(e @ Error::Wire { source: WireError::BadIndex { idx: u32::MAX }, .. }) => {
                    let text = e.to_string();
                    assert!(text.contains("0xffffffff"), "{b:?} {what}: the error does not name the index: {text}");
                    messages.lock().unwrap().push((b, what, text));
                }
                other => panic!("{b:?} {what} with idx u32::MAX: expected Error::Wire(BadIndex), got {other:?}"),
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "{b:?} {what}: took {:?}", t0.elapsed());
            // Nothing was written: the destination is still RESUMING with an empty stream.
            let d = &dests[0];
            assert_eq!(d.state().ok(), Some(MigState::Resuming), "{b:?} {what}");
            assert_eq!(d.resume_report().map(|r| r.bytes_written), Some(0), "{b:?} {what}");
        }
    });
    // Identically: the same message from both backends for the same input.
    let msgs = messages.into_inner().unwrap();
    for what in ["data packet", "config packet"] {
        let texts: Vec<_> = msgs.iter().filter(|m| m.1 == what).map(|m| (m.0, m.2.as_str())).collect();
        if let [(_, a), (_, b)] = texts[..] {
            assert_eq!(a, b, "{what}: the backends describe the same error differently: {texts:?}");
        }
    }
}
