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
    /// How far the consumer's end has come.
    ending: Ending,
    bytes: u64,
    first_bad: Option<u64>,
    /// Why the stream is bad, where more can be said than "content differs".
    why: Option<String>,
    overflow: bool,
    closed: bool,
    /// Live device: the parser of the whole stream (base image and dirty records).
    records: Option<LiveStreamParser>,
}

/// The end of a consumer: told to stop, it closes the read end and waits to be joined. Values
/// only grow.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ending {
    /// Consuming the stream.
    #[default]
    Consuming,
    /// Told to close the read end.
    Stop,
    /// The read end is closed (writers get `EPIPE`); waiting to be joined.
    Closed,
    /// Told to return: the session is being joined.
    Exit,
}

/// Control shared between the device and its consumer thread.
#[derive(Debug)]
struct ResumeShared {
    ctl: Mutex<ResumeCtl>,
    /// The pipe's read end. Held across a read and the accounting of what it read, by the
    /// consumer (one chunk at a time) or by RESUMING→STOP (which drains what is queued itself,
    /// without waking the consumer); only the consumer closes it.
    rfd: Mutex<Option<Arc<OwnedFd>>>,
    wake: EventFd,
    /// Signalled when the consumer closed the read end after a stop (`Ending::Closed`).
    end_closed_cv: Condvar,
}

impl ResumeShared {
    fn lock(&self) -> MutexGuard<'_, ResumeCtl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rfd(&self) -> MutexGuard<'_, Option<Arc<OwnedFd>>> {
        self.rfd.lock().unwrap_or_else(|p| p.into_inner())
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
    /// What the consumer checks against, for the drain in RESUMING→STOP.
    params: ConsumerParams,
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
        let mut ctl = ResumeCtl { records, ..Default::default() };
        let p = ConsumerParams {
            seed: cfg.seed,
            size: cfg.size,
            fail_at: cfg.write_error_at,
            throughput: cfg.resume_throughput_bytes_per_sec.filter(|&r| r > 0),
        };
        if p.fail_at == Some(0) {
            ctl.closed = true;
        }
        let rfd = Mutex::new((p.fail_at != Some(0)).then(|| Arc::new(r)));
        let shared =
            Arc::new(ResumeShared { ctl: Mutex::new(ctl), rfd, wake: sys::eventfd()?, end_closed_cv: Condvar::new() });
        let sh = Arc::clone(&shared);
        let thread =
            std::thread::Builder::new().name(format!("sim-resume-{}", cfg.name)).spawn(move || consume(&sh, &p))?;
        let s = ResumeSession {
            shared,
            id,
            size: cfg.size,
            bounded: !cfg.is_live(),
            accepted: AtomicU64::new(0),
            params: p,
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

    /// Drains everything queued in the pipe on the caller's thread (as a driver consumes the
    /// rest of what was written when it leaves RESUMING), then reports. The consumer is not
    /// woken: it is between two chunks while this holds the read end.
    pub(super) fn drain_and_report(&self) -> (ResumeReport, Option<String>) {
        let ConsumerParams { seed, size, fail_at, .. } = self.params;
        let rfd = self.shared.rfd();
        if let Some(fd) = rfd.as_ref() {
            let mut buf = vec![0u8; 64 << 10];
            // Bounded: a pipe holds at most its capacity, and nothing writes meanwhile.
            for _ in 0..1_000_000 {
                let cap = read_cap(&self.shared, fail_at, buf.len());
                match sys::SysOps::read(&sys::Kernel, fd.as_fd(), &mut buf[..cap]) {
                    Ok(0) => break,
                    Ok(n) => {
                        if !take_chunk(&self.shared, seed, size, fail_at, &buf[..n]) {
                            break; // the consumer closes its end (`closed`)
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(_) => break, // EAGAIN: empty
                }
            }
        }
        drop(rfd);
        self.report()
    }

    /// Tells the consumer to close the read end (writers then get `EPIPE`), without waiting
    /// for it; it exits only when the session is joined ([`ResumeSession::stop`]), so that its
    /// exit (0.1 to 0.4 ms of CPU on a small VM) does not fall into a switchover.
    pub(super) fn signal_stop(&self) {
        let mut c = self.shared.lock();
        c.ending = c.ending.max(Ending::Stop);
        drop(c);
        sys::eventfd_signal(&self.shared.wake);
    }

    /// Waits (at most `limit`) until the consumer, told to stop, has closed the read end, so
    /// that a raw write to the session's fd now fails with `EPIPE`.
    pub(super) fn wait_end_closed(&self, limit: Duration) {
        let g = self.shared.lock();
        let _ = self.shared.end_closed_cv.wait_timeout_while(g, limit, |c| c.ending < Ending::Closed);
    }

    pub(super) fn stop(&mut self) {
        {
            self.shared.lock().ending = Ending::Exit;
        }
        sys::eventfd_signal(&self.shared.wake);
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

/// How much the next read may take: a chunk, or up to the injected write error.
fn read_cap(sh: &ResumeShared, fail_at: Option<u64>, buf: usize) -> usize {
    let bytes = sh.lock().bytes;
    let cap = fail_at.map_or(buf as u64, |f| f.saturating_sub(bytes).min(buf as u64));
    cap.max(1) as usize
}

/// What one step of the consumer found.
enum Took {
    /// A chunk (or nothing yet): the pipe is open.
    Open,
    /// End of file: every writer closed.
    Eof,
    /// The read end is closed.
    Closed,
}

/// The consumer reads what is queued now (one chunk) under the read end's lock, and closes the
/// end when the stream is over-long or the injected write error is reached.
fn consume_some(sh: &ResumeShared, p: &ConsumerParams, buf: &mut [u8]) -> Took {
    let mut rfd = sh.rfd();
    loop {
        if sh.lock().closed {
            *rfd = None; // writers now get EPIPE
        }
        let Some(fd) = rfd.as_ref() else { return Took::Closed };
        let cap = read_cap(sh, p.fail_at, buf.len());
        match sys::SysOps::read(&sys::Kernel, fd.as_fd(), &mut buf[..cap]) {
            Ok(0) => return Took::Eof,
            Ok(n) => {
                if !take_chunk(sh, p.seed, p.size, p.fail_at, &buf[..n]) {
                    *rfd = None;
                    return Took::Closed;
                }
                return Took::Open;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(_) => return Took::Open, // EAGAIN: empty for now
        }
    }
}

/// The consumer thread's body: drain the pipe, verify, count. A paced consumer takes at most one
/// pipe's worth per step and then waits for its rate (RESUMING→STOP drains the rest itself,
/// [`ResumeSession::drain_and_report`]).
fn consume(sh: &ResumeShared, p: &ConsumerParams) {
    let mut paced_since: Option<Instant> = None;
    let mut buf = vec![0u8; 1 << 20];
    let mut open = true;
    loop {
        if sh.lock().ending >= Ending::Stop {
            // The read end closes with it: writers now get EPIPE. Then wait to be joined.
            *sh.rfd() = None;
            let mut c = sh.lock();
            c.ending = c.ending.max(Ending::Closed);
            drop(c);
            sh.end_closed_cv.notify_all();
            while sh.lock().ending != Ending::Exit {
                let _ = sys::poll(&mut [PollFd::new(sh.wake.as_fd(), PollFlags::POLLIN)], None);
                sys::eventfd_drain(&sh.wake);
            }
            return;
        }
        if paced_since.is_none() && p.throughput.is_some() && sh.lock().bytes > 0 {
            paced_since = Some(Instant::now());
        }
        if let Some(wait) = pace_wait(p.throughput, paced_since, sh.lock().bytes) {
            // A slow device: nothing more is taken from the pipe until it is due, so the
            // writer sees the pipe fill up. Control requests still wake it.
            let _ = sys::poll(&mut [PollFd::new(sh.wake.as_fd(), PollFlags::POLLIN)], Some(wait));
            sys::eventfd_drain(&sh.wake);
            continue;
        }
        // A reference of its own keeps the read end open while it is polled without the lock
        // (only this thread closes it, by dropping the shared one and then this one).
        let data_fd = if open { sh.rfd().clone() } else { None };
        let (woken, readable) = {
            let wake = PollFd::new(sh.wake.as_fd(), PollFlags::POLLIN);
            // The pipe is polled only while it is open and not at EOF.
            let data = data_fd.as_ref().map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            let n = if data.is_some() { 2 } else { 1 };
            let mut fds = [wake.clone(), data.unwrap_or(wake)];
            let _ = sys::poll(&mut fds[..n], None);
            (sys::ready(&fds[0]), n == 2 && sys::ready(&fds[1]))
        };
        drop(data_fd);
        if woken {
            sys::eventfd_drain(&sh.wake);
        }
        if readable {
            match consume_some(sh, p, &mut buf) {
                Took::Open => {}
                Took::Eof | Took::Closed => open = false,
            }
        }
    }
}
