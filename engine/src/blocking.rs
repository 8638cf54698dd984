//! The blocking backend's descriptor loops, shared by its source and receiver: read once,
//! write all, send all, receive exactly. Each turns [`crate::device_io`]'s decisions into
//! system calls through [`FdIo`], so the same errno means the same thing as on io_uring, and
//! every wait is bounded: it wakes at least every [`TICK`] to re-check abort, and fails after
//! the stall timeout without progress.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use crate::abort::AbortHandle;
use crate::backend::{StallClock, TICK};
use crate::device_io::{classify, classify_write, IoStep, Retries};
use crate::sys::{FdIo, Interest, Wake};

/// Why a blocking loop stopped before it finished.
#[derive(Debug)]
pub(crate) enum Fail {
    /// The peer closed (or the stream ended) after `got` bytes of what was expected.
    Eof {
        /// Bytes received before the end.
        got: usize,
    },
    /// The abort handle fired.
    Aborted,
    /// Nothing moved for the stall timeout (or past the deadline).
    Stalled,
    /// The system call failed.
    Os(io::Error),
}

/// Abort and stall bounds of one loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds<'a> {
    /// Checked before every call and watched during every wait.
    pub(crate) abort: &'a AbortHandle,
    /// Longest time without a byte moving.
    pub(crate) stall: Duration,
    /// Progress shared with other threads of the same side (the receiver's): a quiet
    /// descriptor is fine while others move, as on io_uring. `None`: this call's own progress.
    pub(crate) clock: Option<&'a StallClock>,
}

impl<'a> Bounds<'a> {
    /// Bounds measured by this call's own progress.
    pub(crate) fn new(abort: &'a AbortHandle, stall: Duration) -> Bounds<'a> {
        Bounds { abort, stall, clock: None }
    }

    /// Something moved.
    fn moved(&self) {
        if let Some(c) = self.clock {
            c.touch();
        }
    }
}

impl Bounds<'_> {
    /// Waits (at most one tick) until `fd` is ready for `interest`; returns whether it is (a
    /// timeout or a signal: `false`); fails on abort, or when nothing moved since `since` for
    /// the stall timeout.
    fn wait<I: FdIo>(&self, io: &I, fd: BorrowedFd<'_>, interest: Interest, since: Instant) -> Result<bool, Fail> {
        if self.abort.is_aborted() {
            return Err(Fail::Aborted);
        }
        let idle = self.clock.map_or_else(|| since.elapsed(), |c| c.idle_for().min(since.elapsed()));
        if idle > self.stall {
            return Err(Fail::Stalled);
        }
        match io.wait(fd, interest, self.abort.as_fd(), TICK.min(self.stall)).map_err(Fail::Os)? {
            Wake::Aborted => Err(Fail::Aborted),
            Wake::Ready => Ok(true),
            Wake::Timeout => Ok(false),
        }
    }
}

/// Reads once into `buf` (`Ok(0)`: end of stream). Reads only once `poll` says `POLLIN`, so
/// abort and the stall timeout are honoured while the device has nothing to give (a descriptor
/// without poll support reads as always ready: the read then blocks as the driver decides).
/// `EINTR` retries, `EAGAIN` waits.
pub(crate) fn read_once<I: FdIo>(io: &I, fd: BorrowedFd<'_>, buf: &mut [u8], b: Bounds<'_>) -> Result<usize, Fail> {
    let since = Instant::now();
    let mut retries = Retries::default();
    loop {
        if !b.wait(io, fd, Interest::Read, since)? {
            continue;
        }
        match classify(io.read(fd, buf)) {
            IoStep::Moved(n) => {
                b.moved();
                return Ok(n);
            }
            IoStep::End => return Ok(0),
            IoStep::Retry => retries.again().map_err(Fail::Os)?,
            IoStep::WaitReady => {}
            IoStep::Fatal(e) => return Err(Fail::Os(e)),
        }
    }
}

/// Writes all of `buf` to a data fd; counts continued short writes in `short`. On failure,
/// returns the bytes written before it.
pub(crate) fn write_all<I: FdIo>(
    io: &I,
    fd: BorrowedFd<'_>,
    buf: &[u8],
    b: Bounds<'_>,
    short: &mut u64,
) -> Result<(), (usize, Fail)> {
    let mut done = 0;
    let mut since = Instant::now();
    let mut retries = Retries::default();
    while done < buf.len() {
        if b.abort.is_aborted() {
            return Err((done, Fail::Aborted));
        }
        match classify_write(io.write(fd, &buf[done..])) {
            IoStep::Moved(n) => {
                done += n;
                if done < buf.len() {
                    *short += 1;
                }
                b.moved();
                since = Instant::now();
                retries.reset();
            }
            IoStep::Retry => retries.again().map_err(|e| (done, Fail::Os(e)))?,
            IoStep::WaitReady => {
                b.wait(io, fd, Interest::Write, since).map_err(|f| (done, f))?;
            }
            IoStep::End => unreachable!("classify_write never ends a write"),
            IoStep::Fatal(e) => return Err((done, Fail::Os(e))),
        }
    }
    Ok(())
}

/// Sends all of `buf` on a channel socket without ever blocking past a tick (so abort and the
/// stall timeout are honoured) and without `SIGPIPE`.
pub(crate) fn send_all<I: FdIo>(io: &I, fd: BorrowedFd<'_>, buf: &[u8], b: Bounds<'_>) -> Result<(), Fail> {
    let mut done = 0;
    let mut since = Instant::now();
    let mut retries = Retries::default();
    while done < buf.len() {
        if b.abort.is_aborted() {
            return Err(Fail::Aborted);
        }
        match classify_write(io.send(fd, &buf[done..])) {
            IoStep::Moved(n) => {
                done += n;
                b.moved();
                since = Instant::now();
                retries.reset();
            }
            IoStep::Retry => retries.again().map_err(Fail::Os)?,
            IoStep::WaitReady => {
                b.wait(io, fd, Interest::Write, since)?;
            }
            IoStep::End => unreachable!("classify_write never ends a write"),
            IoStep::Fatal(e) => return Err(Fail::Os(e)),
        }
    }
    Ok(())
}

/// Receives exactly `buf.len()` bytes from a channel socket; fails with [`Fail::Stalled`] when
/// nothing arrives for the stall timeout, and with [`Fail::Eof`] when the peer closes first.
pub(crate) fn recv_exact<I: FdIo>(io: &I, fd: BorrowedFd<'_>, buf: &mut [u8], b: Bounds<'_>) -> Result<(), Fail> {
    let mut got = 0;
    let mut since = Instant::now();
    let mut retries = Retries::default();
    while got < buf.len() {
        if !b.wait(io, fd, Interest::Read, since)? {
            continue;
        }
        match classify(io.recv(fd, &mut buf[got..])) {
            IoStep::Moved(n) => {
                got += n;
                b.moved();
                since = Instant::now();
                retries.reset();
            }
            IoStep::End => return Err(Fail::Eof { got }),
            IoStep::Retry => retries.again().map_err(Fail::Os)?,
            IoStep::WaitReady => {}
            IoStep::Fatal(e) => return Err(Fail::Os(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{EventFd, Scripted, Step};

    fn bounds(a: &AbortHandle) -> Bounds<'_> {
        Bounds::new(a, Duration::from_secs(5))
    }

    #[test]
    fn read_waits_on_eagain_and_retries_eintr() {
        let a = AbortHandle::new().unwrap();
        let fd = EventFd::new().unwrap();
        let io = Scripted::new(&[
            Step::Wait(Wake::Ready),
            Step::Errno(libc::EAGAIN),
            // A timeout is not readiness: no read until the fd is ready.
            Step::Wait(Wake::Timeout),
            Step::Wait(Wake::Ready),
            Step::Errno(libc::EINTR),
            Step::Wait(Wake::Ready),
            Step::Bytes(100),
        ]);
        let mut buf = [0u8; 4096];
        assert_eq!(read_once(&io, fd.as_fd(), &mut buf, bounds(&a)).unwrap(), 100);
        assert_eq!(io.remaining(), 0);
    }

    #[test]
    fn read_fails_on_abort_and_errors() {
        let a = AbortHandle::new().unwrap();
        let fd = EventFd::new().unwrap();
        let io = Scripted::new(&[Step::Wait(Wake::Ready), Step::Errno(libc::ENODEV)]);
        let mut buf = [0u8; 16];
        assert!(
            matches!(read_once(&io, fd.as_fd(), &mut buf, bounds(&a)), Err(Fail::Os(e)) if e.raw_os_error() == Some(libc::ENODEV))
        );
        let io = Scripted::new(&[Step::Wait(Wake::Aborted)]);
        assert!(matches!(read_once(&io, fd.as_fd(), &mut buf, bounds(&a)), Err(Fail::Aborted)));
    }

    #[test]
    fn write_continues_short_writes_and_waits_on_eagain() {
        let a = AbortHandle::new().unwrap();
        let fd = EventFd::new().unwrap();
        let io = Scripted::new(&[
            Step::Bytes(3),
            Step::Errno(libc::EAGAIN),
            Step::Wait(Wake::Ready),
            Step::Errno(libc::EINTR),
            Step::Bytes(7),
        ]);
        let data: Vec<u8> = (0..10).collect();
        let mut short = 0;
        write_all(&io, fd.as_fd(), &data, bounds(&a), &mut short).unwrap();
        assert_eq!(*io.out.lock().unwrap(), data);
        assert_eq!(short, 1);
    }

    #[test]
    fn write_reports_epipe_with_offset() {
        let a = AbortHandle::new().unwrap();
        let fd = EventFd::new().unwrap();
        let io = Scripted::new(&[Step::Bytes(4), Step::Errno(libc::EPIPE)]);
        let mut short = 0;
        match write_all(&io, fd.as_fd(), &[0u8; 10], bounds(&a), &mut short) {
            Err((4, Fail::Os(e))) => assert_eq!(e.raw_os_error(), Some(libc::EPIPE)),
            other => panic!("{other:?}"),
        }
        let io = Scripted::new(&[Step::Bytes(0)]);
        assert!(matches!(write_all(&io, fd.as_fd(), &[0u8; 10], bounds(&a), &mut short), Err((0, Fail::Os(_)))));
    }

    #[test]
    fn send_handles_short_sends_eagain_and_epipe() {
        let a = AbortHandle::new().unwrap();
        let fd = EventFd::new().unwrap();
        let io = Scripted::new(&[
            Step::Bytes(1),
            Step::Errno(libc::EAGAIN),
            Step::Wait(Wake::Timeout),
            Step::Bytes(2),
            Step::Errno(libc::EINTR),
            Step::Bytes(100),
        ]);
        send_all(&io, fd.as_fd(), &[9u8; 5], bounds(&a)).unwrap();
        assert_eq!(io.out.lock().unwrap().len(), 5);
        let io = Scripted::new(&[Step::Bytes(2), Step::Errno(libc::EPIPE)]);
        assert!(matches!(send_all(&io, fd.as_fd(), &[9u8; 5], bounds(&a)), Err(Fail::Os(_))));
    }

    #[test]
    fn send_stalls_when_the_peer_stops_reading() {
        let a = AbortHandle::new().unwrap();
        let fd = EventFd::new().unwrap();
        let io = Scripted::new(&[Step::Errno(libc::EAGAIN); 1]);
        let b = Bounds::new(&a, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(send_all(&io, fd.as_fd(), &[1u8; 5], b), Err(Fail::Stalled)));
    }

    #[test]
    fn recv_exact_reports_eof_position() {
        let a = AbortHandle::new().unwrap();
        let fd = EventFd::new().unwrap();
        let io = Scripted::new(&[
            Step::Wait(Wake::Ready),
            Step::Bytes(3),
            Step::Wait(Wake::Ready),
            Step::Errno(libc::EAGAIN),
            Step::Wait(Wake::Ready),
            Step::Bytes(0),
        ]);
        let mut buf = [0u8; 8];
        assert!(matches!(recv_exact(&io, fd.as_fd(), &mut buf, bounds(&a)), Err(Fail::Eof { got: 3 })));
    }
}
