//! How a source leaves its channels after the last packet, written once for both backends.
//!
//! A close with unread input makes the kernel answer with a reset, and a reset destroys what the
//! peer has not read yet: a destination that wrote a byte back (a keepalive, a proxy, an ack)
//! would lose the tail of the stream while the source reported success. So a successful source
//! shuts its write side down (the destination reads EOF after the last packet), then reads every
//! channel until the destination's EOF, bounded by the stall timeout, and only then closes.
//! Bytes that arrive meanwhile are a protocol error, never discarded: the multifd channels carry
//! nothing from the destination to the source but the negotiated return path on channel 0
//! (read by `rpath`, which reports what it could not account for).

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use crate::abort::AbortHandle;
use crate::backend::TICK;
use crate::device_io::{classify, IoStep};
use crate::error::{Error, Result};
use crate::ids::ChannelId;
use crate::sys::{self, FdIo, Kernel};

/// Closing our write side tells the receiver the stream ended at a packet boundary (a failure
/// here, the peer already gone, shows as its EOF or reset in [`await_eof`]).
pub(crate) fn shutdown_all(channels: &[BorrowedFd<'_>]) {
    for ch in channels {
        let _ = sys::shutdown_write(*ch);
    }
}

/// How long a source waits for the destination to close its channels once the destination
/// confirmed every device loaded (and the commit, if agreed, was sent): the outcome is decided
/// then, so this wait is short and in all (not per channel that closes). Bytes the destination
/// sends meanwhile are read and discarded (counted), so that the close finds nothing unread: a
/// destination still open after it is closed on with a warning (`SourceReport::warnings`), with
/// a FIN, not a reset, and the commit's FIN left two seconds before.
pub(crate) const CONFIRMED_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Reads every channel until the destination's EOF, so that closing never resets a connection
/// whose peer has not read everything. Bounded by `limit` without progress (a channel reaching
/// its EOF is progress).
///
/// # Errors
/// [`Error::UnexpectedInput`] when the destination sent bytes; [`Error::Channel`] when a
/// channel failed (a reset: the destination may have lost the end of the stream);
/// [`Error::Timeout`] naming the first channel still open after `limit`; [`Error::Aborted`].
pub(crate) fn await_eof(channels: &[BorrowedFd<'_>], limit: Duration, abort: &AbortHandle) -> Result<()> {
    read_to_eof(channels, limit, None, abort)
}

/// After the destination confirmed every device ([`CONFIRMED_CLOSE_WAIT`]): as [`await_eof`],
/// bounded by `limit` in all (a channel reaching its EOF does not extend it), and bytes are
/// read and discarded instead of failing, counted in `discarded`.
///
/// # Errors
/// As [`await_eof`], without [`Error::UnexpectedInput`].
pub(crate) fn await_eof_confirmed(
    channels: &[BorrowedFd<'_>],
    limit: Duration,
    discarded: &mut usize,
    abort: &AbortHandle,
) -> Result<()> {
    read_to_eof(channels, limit, Some(discarded), abort)
}

/// [`await_eof`]; with `discarded`, [`await_eof_confirmed`]'s rules.
fn read_to_eof(
    channels: &[BorrowedFd<'_>],
    limit: Duration,
    mut discarded: Option<&mut usize>,
    abort: &AbortHandle,
) -> Result<()> {
    let mut open: Vec<(ChannelId, BorrowedFd<'_>)> =
        ChannelId::all(channels.len()).zip(channels.iter().copied()).collect();
    let mut last = Instant::now();
    let mut buf = [0u8; 4096];
    while let Some(&(first, _)) = open.first() {
        if abort.is_aborted() {
            return Err(Error::Aborted);
        }
        if last.elapsed() > limit {
            return Err(Error::Timeout {
                what: format!(
                    "channel {first}: waiting for the destination to close the connection after the end of the \
                     stream ({} channel(s) still open; it may not have read all of it)",
                    open.len()
                ),
                after: limit,
            });
        }
        let mut fds: Vec<BorrowedFd<'_>> = open.iter().map(|c| c.1).collect();
        fds.push(abort.as_fd());
        sys::wait_readable(&fds, TICK.min(limit)).map_err(|e| Error::sys("poll", e))?;
        let mut i = 0;
        while i < open.len() {
            let (ch, fd) = open[i];
            match classify(Kernel.recv(fd, &mut buf)) {
                IoStep::End => {
                    open.swap_remove(i);
                    if discarded.is_none() {
                        last = Instant::now();
                    }
                    continue;
                }
                IoStep::Moved(n) if discarded.is_some() => {
                    if let Some(d) = discarded.as_deref_mut() {
                        *d = d.saturating_add(n);
                    }
                }
                IoStep::Moved(n) => {
                    let mut first = [0u8; 8];
                    let shown = n.min(first.len());
                    first[..shown].copy_from_slice(&buf[..shown]);
                    return Err(Error::UnexpectedInput { channel: ch, bytes: n, first: first[..shown].to_vec() });
                }
                IoStep::Retry | IoStep::WaitReady => {}
                // Not a socket (a test's pipe): there is no EOF to wait for and nothing to reset.
                IoStep::Fatal(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
                    open.swap_remove(i);
                    continue;
                }
                IoStep::Fatal(e) => {
                    return Err(Error::Channel {
                        channel: ch,
                        op: "waiting for the destination to close the connection after the end of the stream \
                             (a reset here may have destroyed data it had not read)"
                            .into(),
                        source: e,
                    })
                }
            }
            i += 1;
        }
    }
    Ok(())
}

/// Before the channels close: after a failure, makes the close a reset, so the destination drops
/// what it buffered instead of loading a stream that will never be confirmed. After a success
/// every channel was read to its EOF ([`await_eof`]) and closes with nothing unread.
pub(crate) fn before_close(channels: &[BorrowedFd<'_>], failed: bool) {
    if failed {
        for ch in channels {
            sys::reset_on_close(*ch);
        }
    }
}
