//! A cross-thread abort signal that can also be polled as a file descriptor.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug)]
struct Inner {
    flag: AtomicBool,
    efd: OwnedFd,
}

/// Stops a transfer promptly from any thread.
///
/// Cloning is cheap; every clone controls the same transfer. The handle is also an eventfd
/// ([`AsFd`]) that becomes readable once aborted, so a VMM can put it in its own poll loop and
/// the engine's rings wake on it without polling.
#[derive(Debug, Clone)]
pub struct AbortHandle {
    inner: Arc<Inner>,
}

impl AbortHandle {
    /// Creates a handle in the "not aborted" state.
    ///
    /// # Errors
    /// `eventfd(2)` failures (out of file descriptors).
    pub fn new() -> io::Result<AbortHandle> {
        // SAFETY: eventfd has no memory arguments; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(AbortHandle { inner: Arc::new(Inner { flag: AtomicBool::new(false), efd }) })
    }

    /// Aborts the transfer. Idempotent.
    pub fn abort(&self) {
        if !self.inner.flag.swap(true, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A failure (counter
            // overflow) cannot happen for a single write of 1, and the flag is set regardless.
            let _ = unsafe { libc::write(self.inner.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Whether [`AbortHandle::abort`] was called.
    pub fn is_aborted(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }
}

impl AsFd for AbortHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.efd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_is_visible_and_pollable() {
        let a = AbortHandle::new().unwrap();
        let b = a.clone();
        assert!(!b.is_aborted());
        let mut pfd = libc::pollfd { fd: b.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
        a.abort();
        a.abort();
        assert!(b.is_aborted());
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1);
    }
}
