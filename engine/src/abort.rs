//! A cross-thread abort signal that can also be polled as a file descriptor.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::sys::EventFd;

#[derive(Debug)]
struct Inner {
    flag: AtomicBool,
    efd: EventFd,
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
        let efd = EventFd::new()?;
        Ok(AbortHandle { inner: Arc::new(Inner { flag: AtomicBool::new(false), efd }) })
    }

    /// Aborts the transfer. Idempotent.
    pub fn abort(&self) {
        if !self.inner.flag.swap(true, Ordering::SeqCst) {
            self.inner.efd.signal();
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
        let readable = || crate::sys::wait_readable(&[b.as_fd()], std::time::Duration::ZERO).unwrap();
        assert!(!readable());
        a.abort();
        a.abort();
        assert!(b.is_aborted());
        assert!(readable());
    }
}
