//! What the result of one read or write on a descriptor means, for both backends: the one
//! place where an errno becomes a decision. A blocking call's `io::Result` and an io_uring
//! CQE's `res` (through [`from_cqe`]) go through the same [`classify`].

use std::io;

/// The decision for one read or write result.
#[derive(Debug)]
pub(crate) enum IoStep {
    /// `n > 0` bytes moved.
    Moved(usize),
    /// A read returned 0: the end of the stream (for a write: see [`classify_write`]).
    End,
    /// `EINTR`: a signal interrupted the call before anything moved (the blocking backend
    /// without `SA_RESTART`, or an io-wq worker that was signalled). Issue it again at once,
    /// at most [`MAX_RETRIES`] times in a row.
    Retry,
    /// `EAGAIN`/`EWOULDBLOCK`: an `O_NONBLOCK` descriptor with nothing ready (mlx5 honours
    /// `O_NONBLOCK` on its data fds; a pipe or socket sink does too). Wait until it is ready
    /// (`POLLIN`/`POLLOUT`), never spin.
    WaitReady,
    /// Anything else: `ENODEV` (the session's fd was disabled: the device left the state or
    /// was reset), `EIO`/`EFAULT` (the driver rejected the data), `ECONNRESET`, `EPIPE`
    /// (the other end is gone), `ENOMEM` (mtty: a write past the expected length).
    Fatal(io::Error),
}

/// Longest run of `EINTR` tolerated on one descriptor before it counts as a failure.
pub(crate) const MAX_RETRIES: u32 = 1000;

/// A CQE's `res` as the `io::Result` the same call made blocking would have returned.
pub(crate) fn from_cqe(res: i32) -> io::Result<usize> {
    usize::try_from(res).map_err(|_| io::Error::from_raw_os_error(-res))
}

/// Classifies a read result.
pub(crate) fn classify(res: io::Result<usize>) -> IoStep {
    match res {
        Ok(0) => IoStep::End,
        Ok(n) => IoStep::Moved(n),
        Err(e) => match e.raw_os_error() {
            Some(libc::EINTR) => IoStep::Retry,
            Some(libc::EAGAIN) => IoStep::WaitReady,
            _ => IoStep::Fatal(e),
        },
    }
}

/// Classifies a write of a non-empty buffer: a descriptor that accepts 0 bytes will never
/// accept more, so that is fatal rather than the end of anything.
pub(crate) fn classify_write(res: io::Result<usize>) -> IoStep {
    match classify(res) {
        IoStep::End => IoStep::Fatal(io::Error::new(io::ErrorKind::WriteZero, "the fd accepted 0 bytes")),
        other => other,
    }
}

/// Counts consecutive `EINTR`s on one descriptor.
#[derive(Debug, Default)]
pub(crate) struct Retries(u32);

impl Retries {
    /// One more `EINTR`; an error once [`MAX_RETRIES`] have come in a row.
    pub(crate) fn again(&mut self) -> io::Result<()> {
        self.0 += 1;
        if self.0 > MAX_RETRIES {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                format!("interrupted {MAX_RETRIES} times in a row"),
            ));
        }
        Ok(())
    }

    /// Something moved: the run is over.
    pub(crate) fn reset(&mut self) {
        self.0 = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_table_for_both_backends() {
        assert!(matches!(classify(from_cqe(5)), IoStep::Moved(5)));
        assert!(matches!(classify(from_cqe(0)), IoStep::End));
        assert!(matches!(classify(from_cqe(-libc::EINTR)), IoStep::Retry));
        assert!(matches!(classify(from_cqe(-libc::EAGAIN)), IoStep::WaitReady));
        assert!(matches!(classify(from_cqe(-libc::ENODEV)), IoStep::Fatal(_)));
        assert!(matches!(classify(Err(io::Error::from_raw_os_error(libc::EAGAIN))), IoStep::WaitReady));
        assert!(matches!(classify_write(Ok(0)), IoStep::Fatal(_)));
        let mut r = Retries::default();
        for _ in 0..MAX_RETRIES {
            r.again().unwrap();
        }
        assert!(r.again().is_err());
        r.reset();
        assert!(r.again().is_ok());
    }
}
