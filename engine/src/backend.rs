//! Which backend runs a transfer: io_uring, or the blocking one where io_uring cannot be used.
//!
//! Both backends drive the same rule cores (`source::core`, `receiver::core`,
//! `receiver::reassembly`, `device_io`); they differ only in how they turn the cores'
//! decisions into system calls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::Backend;
use crate::error::{Error, Result};
use crate::stats::BackendKind;
use crate::uring::uring_unavailable_reason;

/// How often a waiting thread re-checks abort and the stall clock when nothing happens
/// (every wait in the engine is bounded by it: rings through `IORING_ENTER_EXT_ARG`, blocking
/// code through `poll` timeouts and `Condvar::wait_timeout`).
pub(crate) const TICK: Duration = Duration::from_millis(250);

/// Picks the backend: `Auto` falls back to blocking when a ring cannot be created or lacks an
/// op the engine needs, and says why (`fallback_reason`).
///
/// # Errors
/// [`Error::UringUnavailable`] when `Uring` was asked for and cannot be had.
pub(crate) fn choose(want: Backend) -> Result<(BackendKind, Option<String>)> {
    match want {
        Backend::Blocking => Ok((BackendKind::Blocking, None)),
        Backend::Uring => match uring_unavailable_reason() {
            None => Ok((BackendKind::Uring, None)),
            Some(reason) => Err(Error::UringUnavailable { reason }),
        },
        Backend::Auto => match uring_unavailable_reason() {
            None => Ok((BackendKind::Uring, None)),
            Some(reason) => Ok((BackendKind::Blocking, Some(format!("{reason}; using the blocking backend")))),
        },
    }
}

/// When something last moved, shared by every thread of one side (the receiver's workers and
/// channel threads share one: a quiet channel is fine while others make progress).
#[derive(Debug)]
pub(crate) struct StallClock {
    start: Instant,
    last_ns: AtomicU64,
}

impl StallClock {
    pub(crate) fn new() -> StallClock {
        StallClock { start: Instant::now(), last_ns: AtomicU64::new(0) }
    }

    /// Something moved now.
    pub(crate) fn touch(&self) {
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_ns.store(ns, Ordering::Relaxed);
    }

    /// Time since anything last moved.
    pub(crate) fn idle_for(&self) -> Duration {
        let last = Duration::from_nanos(self.last_ns.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}
