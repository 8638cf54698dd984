//! Resume session: a consumer thread draining a pipe and verifying every byte.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::config::SimConfig;
use super::content::verify;
use super::records::LiveStreamParser;
use crate::sys::{self, EventFd, PollFd, PollFlags};

/// What the consumer has seen of a resume stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumeReport {
    /// Bytes written into the resume fd that the device consumed.
    pub bytes_written: u64,
    /// Every byte matched, no byte was missing and none was extra.
    pub verified_ok: bool,
    /// Stream offset of the first byte that did not match, if any (for a bad dirty-record
    /// header: the record's first byte).
    pub first_bad_offset: Option<u64>,
    /// Live device: dirty records verified and applied so far.
    pub dirty_records: u64,
}

/// Consumer progress, guarded by `ResumeShared::ctl`.
#[derive(Debug, Default)]
struct ResumeCtl {
    stop: bool,
    drain_req: u64,
    drained: u64,
    bytes: u64,
    first_bad: Option<u64>,
    /// Why the stream is bad, where more can be said than "content differs".
    why: Option<String>,
    overflow: bool,
    closed: bool,
    /// Live device: the parser of the whole stream (base image and dirty records).
    records: Option<LiveStreamParser>,
}

/// Control shared between the device and its consumer thread.
#[derive(Debug)]
struct ResumeShared {
    ctl: Mutex<ResumeCtl>,
    cv: Condvar,
    wake: EventFd,
}

impl ResumeShared {
    fn lock(&self) -> MutexGuard<'_, ResumeCtl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One resume session (RESUMING).
#[derive(Debug)]
pub(super) struct ResumeSession {
    shared: Arc<ResumeShared>,
    pub(super) id: (u64, u64),
    pub(super) size: u64,
    /// A stream of a device that is not live has exactly `size` bytes; a live device's
    /// stream (base image and dirty records) has no fixed length.
    pub(super) bounded: bool,
    /// Bytes accepted by [`SimDevice::write_data`](crate::MigrationDevice::write_data) (raw
    /// writes are not counted here).
    accepted: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl ResumeSession {
    pub(super) fn start(cfg: &SimConfig) -> io::Result<(ResumeSession, OwnedFd)> {
        let (r, w) = sys::pipe()?;
        // Best effort, as for the save pipe: the kernel's default capacity stays otherwise.
        let _ = sys::set_pipe_size(r.as_fd(), cfg.resume_pipe_bytes.max(1));
        sys::set_nonblocking(r.as_fd())?;
        if cfg.nonblocking_resume {
            sys::set_nonblocking(w.as_fd())?;
        }
        let id = sys::file_id(w.as_fd())?;
        // Where a live source pauses its base image for dirty records: after its pre-copy
        // portion (the destination's config must say the same as the source's).
        let pause = cfg.precopy_bytes.min(cfg.size);
        let records = cfg.is_live().then(|| LiveStreamParser::new(cfg.seed, cfg.size, pause));
        let ctl = ResumeCtl { records, ..Default::default() };
        let shared = Arc::new(ResumeShared { ctl: Mutex::new(ctl), cv: Condvar::new(), wake: sys::eventfd()? });
        let sh = Arc::clone(&shared);
        let p = ConsumerParams {
            seed: cfg.seed,
            size: cfg.size,
            fail_at: cfg.write_error_at,
            throughput: cfg.resume_throughput_bytes_per_sec.filter(|&r| r > 0),
        };
        let thread =
            std::thread::Builder::new().name(format!("sim-resume-{}", cfg.name)).spawn(move || consume(&sh, r, &p))?;
        let s = ResumeSession {
            shared,
            id,
            size: cfg.size,
            bounded: !cfg.is_live(),
            accepted: AtomicU64::new(0),
            thread: Some(thread),
        };
        Ok((s, w))
    }

    /// Bytes of the stream so far: the larger of what [`SimDevice::write_data`](crate::MigrationDevice::write_data)
    /// accepted and what the consumer has taken (raw writes included).
    pub(super) fn stream_len(&self) -> u64 {
        self.accepted.load(Ordering::Acquire).max(self.shared.lock().bytes)
    }

    /// Records `n` bytes accepted by [`SimDevice::write_data`](crate::MigrationDevice::write_data).
    pub(super) fn accept(&self, n: usize) {
        self.accepted.fetch_add(n as u64, Ordering::AcqRel);
    }

    /// Snapshot without draining: the report, and why the stream is not (yet) acceptable.
    pub(super) fn report(&self) -> (ResumeReport, Option<String>) {
        let c = self.shared.lock();
        let why = why_bad(&c, self.size);
        let rep = ResumeReport {
            bytes_written: c.bytes,
            verified_ok: why.is_none(),
            first_bad_offset: c.first_bad,
            dirty_records: c.records.as_ref().map_or(0, |r| r.records),
        };
        (rep, why)
    }

    /// Live device: the page versions the stream loaded (call after an accepted drain).
    pub(super) fn take_versions(&self) -> Option<Vec<u32>> {
        self.shared.lock().records.as_mut().map(|r| std::mem::take(&mut r.versions))
    }

    /// Makes the consumer drain everything queued, then reports (RESUMING→STOP). When the
    /// stream is then acceptable, the consumer closes its end first, so that a write fails with
    /// `EPIPE` as soon as the transition returned.
    pub(super) fn drain_and_report(&self) -> io::Result<(ResumeReport, Option<String>)> {
        let req = {
            let mut c = self.shared.lock();
            c.drain_req += 1;
            c.drain_req
        };
        sys::eventfd_signal(&self.shared.wake);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut c = self.shared.lock();
        while c.drained < req {
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
            }
            c = match self.shared.cv.wait_timeout(c, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        drop(c);
        Ok(self.report())
    }

    /// Tells the consumer to exit, without waiting for it.
    pub(super) fn signal_stop(&self) {
        self.shared.lock().stop = true;
        sys::eventfd_signal(&self.shared.wake);
    }

    pub(super) fn stop(&mut self) {
        self.signal_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why the stream so far is not (yet) acceptable, if it is not.
fn why_bad(c: &ResumeCtl, size: u64) -> Option<String> {
    if let Some(b) = c.first_bad {
        Some(c.why.clone().unwrap_or_else(|| format!("resume stream content differs from the expected at offset {b}")))
    } else if c.overflow {
        Some(format!("resume stream is longer than the expected {size} bytes ({} written)", c.bytes))
    } else if let Some(r) = &c.records {
        r.incomplete().map(|why| format!("resume stream is short: {why}"))
    } else if c.bytes != size {
        Some(format!("resume stream is short: {} of {size} bytes", c.bytes))
    } else {
        None
    }
}

impl Drop for ResumeSession {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Verifies and counts one chunk the consumer read; returns false to close the read end.
fn take_chunk(sh: &ResumeShared, seed: u64, size: u64, fail_at: Option<u64>, data: &[u8]) -> bool {
    let mut c = sh.lock();
    let c = &mut *c;
    let at = c.bytes;
    let n = data.len() as u64;
    c.bytes = at.saturating_add(n);
    if let Some(r) = &mut c.records {
        // A live device's stream: base image and dirty records, no fixed length.
        if c.first_bad.is_none() {
            if let Err((bad, why)) = r.feed(data, at) {
                c.first_bad = Some(bad);
                c.why = Some(why);
            }
        }
    } else {
        let in_range = size.saturating_sub(at).min(n) as usize;
        if c.first_bad.is_none() {
            if let Err(i) = verify(seed, at, &data[..in_range]) {
                c.first_bad = Some(at + i as u64);
            }
        }
        if in_range < data.len() {
            c.overflow = true;
            c.closed = true;
            return false;
        }
    }
    if fail_at.is_some_and(|f| c.bytes >= f) {
        c.closed = true;
        return false;
    }
    true
}

/// Parameters the consumer thread needs.
#[derive(Debug, Clone, Copy)]
struct ConsumerParams {
    seed: u64,
    size: u64,
    fail_at: Option<u64>,
    /// Average consumption rate (a slow device); `None` is unpaced.
    throughput: Option<u64>,
}

/// How long a paced consumer that took `bytes` since `since` must wait before it takes more.
fn pace_wait(rate: Option<u64>, since: Option<Instant>, bytes: u64) -> Option<Duration> {
    let (rate, since) = (rate?, since?);
    let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
    due.checked_sub(since.elapsed()).filter(|d| !d.is_zero())
}

/// The consumer thread's body: drain the pipe, verify, count; answer drain requests. A paced
/// consumer takes at most one pipe's worth per step and then waits for its rate; a drain
/// request (RESUMING→STOP) takes what is queued at once.
fn consume(sh: &ResumeShared, r: OwnedFd, p: &ConsumerParams) {
    let ConsumerParams { seed, size, fail_at, throughput } = *p;
    let mut paced_since: Option<Instant> = None;
    let mut buf = vec![0u8; 1 << 20];
    let mut rfd = Some(r);
    if fail_at == Some(0) {
        sh.lock().closed = true;
        rfd = None;
    }
    let mut eof = false;
    // Reads what is queued now; returns when the pipe is empty (EAGAIN) or closed.
    let mut read_some = |rfd: &mut Option<OwnedFd>, eof: &mut bool, until_empty: bool| {
        while let Some(fd) = rfd.as_ref() {
            let bytes = sh.lock().bytes;
            let cap = fail_at.map_or(buf.len() as u64, |f| f.saturating_sub(bytes).min(buf.len() as u64));
            let cap = cap.max(1) as usize;
            match sys::SysOps::read(&sys::Kernel, fd.as_fd(), &mut buf[..cap]) {
                Ok(0) => {
                    *eof = true;
                    return;
                }
                Ok(n) => {
                    if !take_chunk(sh, seed, size, fail_at, &buf[..n]) {
                        *rfd = None; // writers now get EPIPE
                        return;
                    }
                    if !until_empty {
                        return;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => return, // EAGAIN: empty for now
            }
        }
    };
    loop {
        let (stop, want) = {
            let c = sh.lock();
            (c.stop, c.drain_req)
        };
        if stop {
            return;
        }
        if want > sh.lock().drained {
            read_some(&mut rfd, &mut eof, true);
            let mut c = sh.lock();
            if why_bad(&c, size).is_none() {
                // RESUMING→STOP will succeed: writers get EPIPE from its return on. (A failed
                // one leaves the device in RESUMING with its file open, as mtty does.)
                rfd = None;
            }
            c.drained = want;
            drop(c);
            sh.cv.notify_all();
            continue;
        }
        if paced_since.is_none() && throughput.is_some() && sh.lock().bytes > 0 {
            paced_since = Some(Instant::now());
        }
        if let Some(wait) = pace_wait(throughput, paced_since, sh.lock().bytes) {
            // A slow device: nothing more is taken from the pipe until it is due, so the
            // writer sees the pipe fill up. Control requests still wake it.
            let _ = sys::poll(&mut [PollFd::new(sh.wake.as_fd(), PollFlags::POLLIN)], Some(wait));
            sys::eventfd_drain(&sh.wake);
            continue;
        }
        let (woken, readable) = {
            let wake = PollFd::new(sh.wake.as_fd(), PollFlags::POLLIN);
            // The pipe is polled only while it is open and not at EOF.
            let data = rfd.as_ref().filter(|_| !eof).map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            let n = if data.is_some() { 2 } else { 1 };
            let mut fds = [wake.clone(), data.unwrap_or(wake)];
            let _ = sys::poll(&mut fds[..n], None);
            (sys::ready(&fds[0]), n == 2 && sys::ready(&fds[1]))
        };
        if woken {
            sys::eventfd_drain(&sh.wake);
        }
        if readable {
            read_some(&mut rfd, &mut eof, false);
        }
    }
}
