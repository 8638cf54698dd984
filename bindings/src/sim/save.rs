//! Save session: a producer thread filling a pipe (or, in read-error mode, a socket).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::config::SimConfig;
use super::content::{fill, fill_page};
use super::live::{is_running, DevCore, Plan};
use crate::sys::{self, EventFd, PollFd, PollFlags};

/// Control shared between the device and its producer thread.
#[derive(Debug)]
struct SaveShared {
    /// End the session now.
    stop: AtomicBool,
    /// The device is in STOP_COPY: produce up to the end and close.
    finale: AtomicBool,
    /// Bytes written into the fd so far. Updated under `io_lock` together with the write
    /// itself, so `produced - FIONREAD` taken under the same lock is the exact number of bytes
    /// the reader has consumed (a reader can't drain bytes the count doesn't yet include).
    produced: AtomicU64,
    /// Held by the producer across one `write` + `produced` update, and by the device while it
    /// snapshots `produced` and FIONREAD.
    io_lock: Mutex<()>,
    /// Live device: bytes the producer has planned (taken off the device's books) but not yet
    /// written into the fd. Updated under `io_lock`, like `produced`.
    inflight: AtomicU64,
    /// The producer has exited (EOF or error delivered, or stopped).
    done: AtomicBool,
    /// Wakes the producer (control changed, or new dirty records).
    wake: Arc<EventFd>,
    /// A live producer's end of the fd while it waits for work with nothing in flight; the
    /// device may close it there (`enter_stop_copy`) to end the stream without a wake-up.
    parked: Mutex<Option<Output>>,
    /// The producer may be bypassed so (a live stream without `truncate_at` or a read error).
    may_bypass: bool,
}

/// Parameters the producer thread needs.
#[derive(Debug, Clone)]
struct ProducerParams {
    seed: u64,
    precopy_len: u64,
    eof_len: u64,
    /// Live device: the stream (base and records) ends after this many bytes (`truncate_at`).
    cap: u64,
    error_at: Option<u64>,
    chunk: usize,
    throughput: Option<u64>,
    latency: Option<Duration>,
}

/// One save session (PRE_COPY..STOP_COPY), alive until the device leaves the saving group.
#[derive(Debug)]
pub(super) struct SaveSession {
    shared: Arc<SaveShared>,
    /// Our dup of the reader's end: for FIONREAD, and to drain the stream when it ends.
    reader: OwnedFd,
    /// Identity of the session's fd.
    pub(super) id: (u64, u64),
    pub(super) precopy_len: u64,
    /// A live device's core: the producer takes base ranges and records from its books.
    core: Option<Arc<DevCore>>,
    thread: Option<JoinHandle<()>>,
}

/// The save fd's I/O counters, taken together under the I/O lock.
#[derive(Debug, Clone, Copy)]
pub(super) struct IoSnapshot {
    /// Bytes written into the fd.
    pub(super) produced: u64,
    /// Bytes written and not yet read (FIONREAD).
    pub(super) queued: u64,
    /// Bytes planned and not yet written (live device).
    pub(super) inflight: u64,
    /// The producer has exited.
    pub(super) done: bool,
    /// STOP_COPY: the producer streams to the end.
    pub(super) finale: bool,
}

/// Rounds a requested read cap to a pipe capacity: a power-of-two number of pages.
fn pipe_capacity_for(max_read: usize) -> usize {
    let page = sys::page_size();
    let pages = max_read.max(1).div_ceil(page);
    pages.checked_next_power_of_two().and_then(|p| p.checked_mul(page)).unwrap_or(1 << 20)
}

impl SaveSession {
    /// Creates the fd and starts the producer. `finale` is true for STOP→STOP_COPY. `core` is
    /// given for a live device: the session then streams base ranges and dirty records from
    /// its books (and opens them here, before the producer starts).
    pub(super) fn start(
        cfg: &SimConfig,
        finale: bool,
        core: Option<Arc<DevCore>>,
    ) -> io::Result<(SaveSession, OwnedFd)> {
        let socket = cfg.read_error_mode();
        let (caller_end, producer_end) = if socket { sys::socketpair_stream()? } else { sys::pipe()? };
        let mut chunk = cfg.max_read.clamp(1, 8 << 20);
        if !socket {
            let want = pipe_capacity_for(cfg.max_read);
            // Best effort: above /proc/sys/fs/pipe-max-size an unprivileged process gets
            // EPERM; the cap in read_data still holds then.
            let _ = sys::set_pipe_size(producer_end.as_fd(), want);
            chunk = sys::pipe_size(producer_end.as_fd()).unwrap_or(chunk).clamp(1, 8 << 20);
        }
        sys::set_nonblocking(producer_end.as_fd())?;
        if cfg.nonblocking_save {
            // On the open file description, so our dup below shares it; its drain in `end`
            // runs when no writer is left and never sees EAGAIN.
            sys::set_nonblocking(caller_end.as_fd())?;
        }
        let reader = caller_end.try_clone()?;
        let trick_end = if socket { Some(caller_end.try_clone()?) } else { None };
        let id = sys::file_id(caller_end.as_fd())?;
        let shared = Arc::new(SaveShared {
            stop: AtomicBool::new(false),
            finale: AtomicBool::new(finale),
            produced: AtomicU64::new(0),
            io_lock: Mutex::new(()),
            inflight: AtomicU64::new(0),
            done: AtomicBool::new(false),
            wake: Arc::new(sys::eventfd()?),
            parked: Mutex::new(None),
            may_bypass: core.is_some() && !socket && cfg.truncate_at.is_none(),
        });
        let params = ProducerParams {
            seed: cfg.seed,
            precopy_len: cfg.precopy_len(),
            eof_len: cfg.eof_len(),
            cap: cfg.truncate_at.unwrap_or(u64::MAX),
            error_at: if socket { cfg.read_error_at } else { None },
            chunk,
            throughput: cfg.throughput_bytes_per_sec.filter(|&r| r > 0),
            latency: cfg.read_latency,
        };
        if let Some(c) = &core {
            if let Some(l) = &mut c.lock().live {
                l.start_track(cfg.precopy_len(), Arc::clone(&shared.wake));
            }
        }
        let sh = Arc::clone(&shared);
        let live = core.clone();
        let spawned = std::thread::Builder::new().name(format!("sim-save-{}", cfg.name)).spawn(move || {
            let out = Output { fd: producer_end, trick_end, socket };
            match live {
                Some(c) => produce_live(&sh, &params, &c, out),
                None => produce(&sh, &params, out),
            }
            sh.done.store(true, Ordering::Release);
        });
        // Dropped without a thread if the spawn failed: that closes the books again.
        let mut s = SaveSession { shared, reader, id, precopy_len: cfg.precopy_len(), core, thread: None };
        s.thread = Some(spawned?);
        Ok((s, caller_end))
    }

    /// The fd's I/O counters, consistent with each other and with the producer's writes.
    pub(super) fn io_snapshot(&self) -> IoSnapshot {
        let _g = self.shared.io_lock.lock().unwrap_or_else(|p| p.into_inner());
        IoSnapshot {
            produced: self.shared.produced.load(Ordering::Acquire),
            queued: sys::fionread(self.reader.as_fd()).unwrap_or(0) as u64,
            inflight: self.shared.inflight.load(Ordering::Acquire),
            done: self.shared.done.load(Ordering::Acquire),
            finale: self.shared.finale.load(Ordering::Acquire),
        }
    }

    /// Stops and joins the producer; closes a live device's books for this session.
    fn stop_producer(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        sys::eventfd_signal(&self.shared.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // A producer stopped while it waited leaves its end here: close it.
        drop(self.shared.parked.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(c) = &self.core {
            if let Some(l) = &mut c.lock().live {
                l.track = None;
            }
        }
    }

    /// PRE_COPY(_P2P) → STOP_COPY: the same stream continues to the end. When a live
    /// device's producer waits with nothing in flight and nothing is left to produce, the
    /// stream ends here, on the caller's thread (as a driver that saves its last state in the
    /// state change itself): the producer's wake-up would add to the switchover.
    pub(super) fn enter_stop_copy(&self) {
        self.shared.finale.store(true, Ordering::Release);
        if self.shared.may_bypass {
            if let Some(core) = &self.core {
                let mut g = core.lock();
                g.tick();
                let running = is_running(g.state);
                let at_end = g.live.as_mut().is_some_and(|l| l.finale_empty(running));
                let mut parked = self.shared.parked.lock().unwrap_or_else(|p| p.into_inner());
                if at_end && parked.is_some() {
                    // EOF for the reader once it has drained the pipe. The producer stays
                    // parked until the session ends (`stop_producer` wakes it).
                    drop(parked.take());
                    self.shared.done.store(true, Ordering::Release);
                    return;
                }
            }
        }
        sys::eventfd_signal(&self.shared.wake);
    }

    /// Bytes the reader has consumed so far: produced minus what is still queued, taken
    /// atomically with respect to the producer's writes (exact, never a stale count).
    pub(super) fn consumed(&self) -> u64 {
        let _g = self.shared.io_lock.lock().unwrap_or_else(|p| p.into_inner());
        let p = self.shared.produced.load(Ordering::Acquire);
        p.saturating_sub(sys::fionread(self.reader.as_fd()).unwrap_or(0) as u64)
    }

    /// Whether a read now would be at the PRE_COPY temporary end: every pre-copy byte is
    /// produced and the reader has taken them all. Exact: in PRE_COPY the producer writes
    /// nothing past `precopy_len`, and the check is atomic with its writes.
    pub(super) fn at_precopy_end(&self) -> bool {
        let _g = self.shared.io_lock.lock().unwrap_or_else(|p| p.into_inner());
        !self.shared.done.load(Ordering::Acquire)
            && !self.shared.finale.load(Ordering::Acquire)
            && self.shared.produced.load(Ordering::Acquire) >= self.precopy_len
            && sys::fionread(self.reader.as_fd()).unwrap_or(1) == 0
    }

    /// Ends the session: stops and joins the producer (which closes its end), then drains
    /// what is still queued so the caller's raw fd sees EOF. Returns the bytes consumed.
    pub(super) fn end(mut self) -> u64 {
        self.stop_producer();
        let consumed = self.consumed();
        let mut scratch = vec![0u8; 64 * 1024];
        // No writer remains, so these reads never block; bound the loop anyway.
        for _ in 0..1_000_000 {
            match sys::SysOps::read(&sys::Kernel, self.reader.as_fd(), &mut scratch) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {}
                Err(_) => break,
            }
        }
        consumed
    }
}

impl Drop for SaveSession {
    fn drop(&mut self) {
        self.stop_producer();
    }
}

/// Waits until the wake eventfd fires or `timeout` passes (`None`: forever); resets it.
fn wait_wake(wake: &EventFd, timeout: Option<Duration>) {
    let _ = sys::poll(&mut [PollFd::new(wake.as_fd(), PollFlags::POLLIN)], timeout);
    sys::eventfd_drain(wake);
}

/// Sleeps for `d` unless the session is stopped first; returns false if stopped.
fn paced_sleep(sh: &SaveShared, d: Duration) -> bool {
    let until = Instant::now() + d;
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        wait_wake(&sh.wake, Some(until - now));
    }
}

/// The producer's end of the save fd.
#[derive(Debug)]
struct Output {
    /// The pipe's write end, or our socket.
    fd: OwnedFd,
    /// Read-error mode: a dup of the reader's socket, to leave a byte unread in (see
    /// [`SimConfig::read_error_at`]).
    trick_end: Option<OwnedFd>,
    /// The fd is a socket (read-error mode).
    socket: bool,
}

impl Output {
    /// Delivers the read error: put a byte in our own receive queue and close our end with
    /// it unread, so the kernel sets ECONNRESET on the peer.
    fn fail(self) {
        let Output { fd, trick_end, .. } = self;
        if let Some(t) = &trick_end {
            let _ = sys::send_nosignal(t.as_fd(), &[0xEE]);
        }
        drop(trick_end);
        drop(fd);
    }

    /// Writes all of `data` (waiting for room), counting each write into `produced` (and out
    /// of `inflight` for a live device) under the I/O lock. False if the session was stopped
    /// or the reader is gone.
    fn write_all(&self, sh: &SaveShared, data: &[u8], produced: &mut u64, live: bool) -> bool {
        let mut off = 0usize;
        while off < data.len() {
            if sh.stop.load(Ordering::Acquire) {
                return false;
            }
            // The fd is non-blocking, so the lock is held for one short copy only.
            let guard = sh.io_lock.lock().unwrap_or_else(|p| p.into_inner());
            let r = if self.socket {
                sys::send_nosignal(self.fd.as_fd(), &data[off..])
            } else {
                sys::SysOps::write(&sys::Kernel, self.fd.as_fd(), &data[off..])
            };
            if let Ok(k) = r {
                *produced += k as u64;
                sh.produced.store(*produced, Ordering::Release);
                if live {
                    sh.inflight.fetch_sub(k as u64, Ordering::AcqRel);
                }
            }
            drop(guard);
            match r {
                Ok(k) => off += k,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    let mut fds = [
                        PollFd::new(self.fd.as_fd(), PollFlags::POLLOUT),
                        PollFd::new(sh.wake.as_fd(), PollFlags::POLLIN),
                    ];
                    let _ = sys::poll(&mut fds, None);
                    if sys::ready(&fds[1]) {
                        sys::eventfd_drain(&sh.wake);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // EPIPE / ECONNRESET: the reader closed its fd; nothing more to do.
                Err(_) => return false,
            }
        }
        true
    }
}

/// Sleeps as long as a producer paced at `rate` must after `produced` bytes since `start`;
/// false if the session was stopped meanwhile.
fn pace(sh: &SaveShared, rate: Option<u64>, start: Instant, produced: u64) -> bool {
    if let Some(rate) = rate {
        let due = Duration::from_secs_f64(produced as f64 / rate as f64);
        let el = start.elapsed();
        if due > el && !paced_sleep(sh, due - el) {
            return false;
        }
    }
    true
}

/// The producer thread's body for a device that is not live: `fill(seed, 0..)`, the first
/// `precopy_len` bytes in PRE_COPY, the rest in STOP_COPY.
fn produce(sh: &SaveShared, p: &ProducerParams, out: Output) {
    let mut buf = vec![0u8; p.chunk];
    let start = Instant::now();
    let mut produced = 0u64;
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        let finale = sh.finale.load(Ordering::Acquire);
        if p.error_at == Some(produced) {
            return out.fail();
        }
        let end = p.error_at.map_or(p.eof_len, |e| e.min(p.eof_len));
        if finale && produced >= end {
            drop(out); // EOF for the reader once it has drained the pipe.
            return;
        }
        let limit = if finale { end } else { p.precopy_len.min(end) };
        if produced >= limit {
            wait_wake(&sh.wake, None);
            continue;
        }
        if let Some(lat) = p.latency {
            if !paced_sleep(sh, lat) {
                return;
            }
        }
        let n = (limit - produced).min(p.chunk as u64) as usize;
        let data = &mut buf[..n];
        fill(p.seed, produced, data);
        if !out.write_all(sh, data, &mut produced, false) || !pace(sh, p.throughput, start, produced) {
            return;
        }
    }
}

/// The producer thread's body for a live device: it asks the device's books what comes next
/// (base bytes, dirty records, nothing for now, or the end) and writes it.
fn produce_live(sh: &SaveShared, p: &ProducerParams, core: &DevCore, mut out: Output) {
    let mut buf = Vec::with_capacity(p.chunk);
    let start = Instant::now();
    let mut produced = 0u64;
    let cap = p.error_at.map_or(p.cap, |e| e.min(p.cap));
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        if p.error_at == Some(produced) {
            return out.fail();
        }
        let finale = sh.finale.load(Ordering::Acquire);
        if produced >= cap {
            if finale {
                return; // truncated: EOF
            }
            wait_wake(&sh.wake, None);
            continue;
        }
        let plan = next_plan(sh, core, finale, (cap - produced).min(p.chunk as u64));
        match plan {
            Plan::Idle(t) => {
                // Nothing in flight: the device may end the stream meanwhile.
                *sh.parked.lock().unwrap_or_else(|q| q.into_inner()) = Some(out);
                wait_wake(&sh.wake, t);
                let Some(o) = sh.parked.lock().unwrap_or_else(|q| q.into_inner()).take() else {
                    return; // the device ended the stream
                };
                out = o;
                continue;
            }
            Plan::Eof => return,
            Plan::Base { off, len } => {
                buf.resize(len, 0);
                fill(p.seed, off, &mut buf);
            }
            Plan::Records(recs) => {
                buf.clear();
                for r in recs {
                    buf.extend_from_slice(&r.header());
                    let at = buf.len();
                    buf.resize(at + r.len as usize, 0);
                    fill_page(p.seed, r.page, r.version, 0, &mut buf[at..]);
                }
            }
        }
        if let Some(lat) = p.latency {
            if !paced_sleep(sh, lat) {
                return;
            }
        }
        let n = (buf.len() as u64).min(cap - produced) as usize;
        if !out.write_all(sh, &buf[..n], &mut produced, true) || !pace(sh, p.throughput, start, produced) {
            return;
        }
    }
}

/// Takes the producer's next step off a live device's books (dirtying brought up to date
/// first) and counts its bytes as in flight, atomically with respect to PRECOPY_INFO.
fn next_plan(sh: &SaveShared, core: &DevCore, finale: bool, room: u64) -> Plan {
    let mut g = core.lock();
    g.tick();
    let running = is_running(g.state);
    let plan = match &mut g.live {
        Some(l) => l.plan(finale, room, running),
        None => Plan::Eof,
    };
    let n = plan.bytes();
    if n > 0 {
        let _io = sh.io_lock.lock().unwrap_or_else(|p| p.into_inner());
        sh.inflight.fetch_add(n, Ordering::AcqRel);
    }
    plan
}
