//! Every system call of the engine outside io_uring and the buffer pool: poll, non-blocking
//! send/recv, read/write on data fds, socket introspection, shutdown, fstat, eventfd.
//!
//! Built on nix's safe wrappers, so this module needs no `unsafe`. The blocking backend reaches
//! the descriptors only through the [`FdIo`] trait: [`Kernel`] is the real implementation, and
//! the test twin `Scripted` (in tests) replays a script of results (`EAGAIN`, `EINTR`, short
//! counts, `EPIPE`, ...) so that every errno path of the blocking loops is exercised without a
//! kernel that misbehaves on cue (the rust-vmm `SysOps` convention).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd as NixEventFd};
use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, Shutdown, SockType, SockaddrLike, SockaddrStorage};
use nix::sys::stat::{fstat, SFlag};

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// What a descriptor waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interest {
    /// `POLLIN`.
    Read,
    /// `POLLOUT`.
    Write,
}

/// Why a [`FdIo::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The descriptor is ready (or has an error or hang-up to report on the next call).
    Ready,
    /// The abort eventfd fired.
    Aborted,
    /// The timeout passed, or a signal interrupted the wait.
    Timeout,
}

/// The descriptor calls of the blocking backend, one system call each, errno unchanged.
pub(crate) trait FdIo {
    /// `read(2)`.
    fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize>;
    /// `write(2)`.
    fn write(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize>;
    /// `send(2)` with `MSG_NOSIGNAL | MSG_DONTWAIT`: never blocks, never raises `SIGPIPE`.
    fn send(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize>;
    /// `recv(2)` with `MSG_DONTWAIT`.
    fn recv(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize>;
    /// `poll(2)` on `fd` for `interest` and on `abort` for `POLLIN`, at most `timeout`.
    fn wait(
        &self,
        fd: BorrowedFd<'_>,
        interest: Interest,
        abort: BorrowedFd<'_>,
        timeout: Duration,
    ) -> io::Result<Wake>;
}

/// The real system calls.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Kernel;

fn poll_timeout(d: Duration) -> PollTimeout {
    PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX)
}

impl FdIo for Kernel {
    fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        nix::unistd::read(fd, buf).map_err(io_err)
    }

    fn write(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        nix::unistd::write(fd, buf).map_err(io_err)
    }

    fn send(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        socket::send(fd.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT).map_err(io_err)
    }

    fn recv(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        socket::recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT).map_err(io_err)
    }

    fn wait(
        &self,
        fd: BorrowedFd<'_>,
        interest: Interest,
        abort: BorrowedFd<'_>,
        timeout: Duration,
    ) -> io::Result<Wake> {
        let ev = match interest {
            Interest::Read => PollFlags::POLLIN,
            Interest::Write => PollFlags::POLLOUT,
        };
        let mut p = [PollFd::new(abort, PollFlags::POLLIN), PollFd::new(fd, ev)];
        match nix::poll::poll(&mut p, poll_timeout(timeout)) {
            Ok(0) | Err(Errno::EINTR) => Ok(Wake::Timeout),
            Ok(_) if p[0].any().unwrap_or(false) => Ok(Wake::Aborted),
            Ok(_) => Ok(Wake::Ready),
            Err(e) => Err(io_err(e)),
        }
    }
}

/// Waits until one of `fds` is readable or `timeout` passes; `EINTR` counts as a timeout.
///
/// # Errors
/// `poll(2)` errors other than `EINTR`.
pub(crate) fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<bool> {
    let mut p: Vec<PollFd<'_>> = fds.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)).collect();
    match nix::poll::poll(&mut p, poll_timeout(timeout)) {
        Ok(n) => Ok(n > 0),
        Err(Errno::EINTR) => Ok(false),
        Err(e) => Err(io_err(e)),
    }
}

/// Which of `fds` are readable (or have an error or hang-up to report), waiting at most
/// `timeout` for any; `EINTR` counts as a timeout (nothing ready).
///
/// # Errors
/// `poll(2)` errors other than `EINTR`.
pub(crate) fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut p: Vec<PollFd<'_>> = fds.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)).collect();
    match nix::poll::poll(&mut p, poll_timeout(timeout)) {
        Ok(_) => Ok(p.iter().map(|f| f.any().unwrap_or(false)).collect()),
        Err(Errno::EINTR) => Ok(vec![false; fds.len()]),
        Err(e) => Err(io_err(e)),
    }
}

/// What kind of file a descriptor is, as far as io_uring's non-blocking attempts care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FdKind {
    /// A pipe or FIFO.
    Pipe,
    /// A socket.
    Socket,
    /// A regular file.
    Regular,
    /// Anything else: a VFIO migration data fd (an anon inode), a character device...
    Other,
}

/// `fstat(2)` the descriptor; an error reads as [`FdKind::Other`].
pub(crate) fn fd_kind(fd: BorrowedFd<'_>) -> FdKind {
    let Ok(st) = fstat(fd) else { return FdKind::Other };
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFIFO => FdKind::Pipe,
        SFlag::S_IFSOCK => FdKind::Socket,
        SFlag::S_IFREG => FdKind::Regular,
        _ => FdKind::Other,
    }
}

/// For a regular file: the bytes from its offset to its end (`fstat(2)`'s `st_size` minus
/// `lseek(fd, 0, SEEK_CUR)`); `None` for anything else or when either call fails.
pub(crate) fn file_remaining(fd: BorrowedFd<'_>) -> Option<u64> {
    if fd_kind(fd) != FdKind::Regular {
        return None;
    }
    let size = u64::try_from(fstat(fd).ok()?.st_size).ok()?;
    let pos = u64::try_from(nix::unistd::lseek(fd, 0, nix::unistd::Whence::SeekCur).ok()?).ok()?;
    Some(size.saturating_sub(pos))
}

/// Sets `O_NONBLOCK` on a pipe or FIFO (`fcntl(2)` `F_SETFL`); anything else, or a failure,
/// is left as it is.
pub(crate) fn nonblocking_if_pipe(fd: BorrowedFd<'_>) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if fd_kind(fd) != FdKind::Pipe {
        return;
    }
    if let Ok(bits) = fcntl(fd, FcntlArg::F_GETFL) {
        let fl = OFlag::from_bits_truncate(bits) | OFlag::O_NONBLOCK;
        let _ = fcntl(fd, FcntlArg::F_SETFL(fl));
    }
}

/// Whether `fd` is a TCP-like stream socket (`AF_INET`/`AF_INET6`, `SOCK_STREAM`): the only
/// kind SEND_ZC can avoid copying on.
pub(crate) fn is_inet_stream(fd: BorrowedFd<'_>) -> bool {
    let stream = socket::getsockopt(&fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
    let family = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd()).ok().and_then(|a| a.family());
    stream && matches!(family, Some(AddressFamily::Inet | AddressFamily::Inet6))
}

fn addr_ip(a: &SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

/// The IP address of a connected socket's peer, if it has one.
pub(crate) fn peer_ip(fd: BorrowedFd<'_>) -> Option<IpAddr> {
    socket::getpeername::<SockaddrStorage>(fd.as_raw_fd()).ok().as_ref().and_then(addr_ip)
}

/// Whether `ip` is this host's: a loopback address (127.0.0.0/8, ::1, a v4-mapped 127.x), or
/// an address of one of its interfaces (`getifaddrs(3)`; a failure of it reads as "no").
pub(crate) fn is_local_ip(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    if ip.is_loopback() {
        return true;
    }
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return false };
    addrs.filter_map(|a| a.address).any(|a| addr_ip(&a) == Some(ip))
}

/// `shutdown(fd, SHUT_WR)`: the peer reads EOF after the bytes already queued.
///
/// # Errors
/// The errno (`ENOTCONN` when the peer already reset the connection, `ENOTSOCK`).
pub(crate) fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    socket::shutdown(fd.as_raw_fd(), Shutdown::Write).map_err(io_err)
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)`: what is queued on a socket, without consuming it (`Ok(0)`:
/// the peer closed; `WouldBlock`: nothing queued, still open).
///
/// # Errors
/// The errno (`ECONNRESET` after a reset, `EAGAIN`).
pub(crate) fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    socket::recv(fd.as_raw_fd(), buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).map_err(io_err)
}

/// Makes the next close of a socket send a reset (`SO_LINGER` 0): for a failed transfer, so the
/// peer learns at once and drops what it buffered instead of loading a stream that will never
/// be confirmed.
pub(crate) fn reset_on_close(fd: BorrowedFd<'_>) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    let _ = socket::setsockopt(&fd, sockopt::Linger, &l);
}

/// A non-blocking eventfd (`EFD_CLOEXEC | EFD_NONBLOCK`): the one wake-up primitive of the
/// engine (abort, channel grants, receive-worker kicks). Rings read it with `IORING_OP_READ`;
/// blocking code polls it.
#[derive(Debug)]
pub(crate) struct EventFd(NixEventFd);

impl EventFd {
    /// A new eventfd with a zero counter.
    ///
    /// # Errors
    /// `EMFILE`/`ENFILE` when the process or system is out of descriptors.
    pub(crate) fn new() -> io::Result<EventFd> {
        NixEventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map(EventFd).map_err(io_err)
    }

    /// Adds 1 to the counter, making the fd readable. `EAGAIN` (counter saturated) is
    /// harmless: the fd is readable already.
    pub(crate) fn signal(&self) {
        let _ = self.0.write(1);
    }

    /// Resets the counter; nothing to read (`EAGAIN`) is fine.
    pub(crate) fn drain(&self) {
        let _ = self.0.read();
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A duplicate of `fd` (`F_DUPFD_CLOEXEC`), for handing a borrowed descriptor to std I/O.
///
/// # Errors
/// `EMFILE` when out of descriptors.
pub(crate) fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

#[cfg(test)]
pub(crate) use twin::{Scripted, Step};

#[cfg(test)]
mod twin {
    //! The test twin of [`Kernel`]: each call takes the next step of a script.

    use std::collections::VecDeque;
    use std::io;
    use std::os::fd::BorrowedFd;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::{FdIo, Interest, Wake};

    /// One scripted result.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Step {
        /// Transfer up to this many bytes (a short count when smaller than asked).
        Bytes(usize),
        /// Fail with this errno.
        Errno(i32),
        /// A `wait` result.
        Wait(Wake),
    }

    /// Replays a script; a call past its end fails the test. Records every byte transferred.
    #[derive(Debug, Default)]
    pub(crate) struct Scripted {
        steps: Mutex<VecDeque<Step>>,
        /// Bytes written or sent, in order.
        pub(crate) out: Mutex<Vec<u8>>,
        /// Calls made, by name, in order.
        pub(crate) calls: Mutex<Vec<&'static str>>,
    }

    impl Scripted {
        pub(crate) fn new(steps: &[Step]) -> Scripted {
            Scripted { steps: Mutex::new(steps.iter().copied().collect()), ..Scripted::default() }
        }

        fn next(&self, call: &'static str) -> Step {
            self.calls.lock().unwrap().push(call);
            self.steps.lock().unwrap().pop_front().unwrap_or_else(|| panic!("script ended before {call}"))
        }

        pub(crate) fn remaining(&self) -> usize {
            self.steps.lock().unwrap().len()
        }

        fn transfer_in(&self, call: &'static str, buf: &mut [u8]) -> io::Result<usize> {
            match self.next(call) {
                Step::Bytes(n) => {
                    let n = n.min(buf.len());
                    for (i, b) in buf[..n].iter_mut().enumerate() {
                        *b = i as u8;
                    }
                    Ok(n)
                }
                Step::Errno(e) => Err(io::Error::from_raw_os_error(e)),
                Step::Wait(w) => panic!("{call} got a wait step {w:?}"),
            }
        }

        fn transfer_out(&self, call: &'static str, buf: &[u8]) -> io::Result<usize> {
            match self.next(call) {
                Step::Bytes(n) => {
                    let n = n.min(buf.len());
                    self.out.lock().unwrap().extend_from_slice(&buf[..n]);
                    Ok(n)
                }
                Step::Errno(e) => Err(io::Error::from_raw_os_error(e)),
                Step::Wait(w) => panic!("{call} got a wait step {w:?}"),
            }
        }
    }

    impl FdIo for Scripted {
        fn read(&self, _fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
            self.transfer_in("read", buf)
        }
        fn write(&self, _fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
            self.transfer_out("write", buf)
        }
        fn send(&self, _fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
            self.transfer_out("send", buf)
        }
        fn recv(&self, _fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
            self.transfer_in("recv", buf)
        }
        fn wait(&self, _fd: BorrowedFd<'_>, _i: Interest, _a: BorrowedFd<'_>, _t: Duration) -> io::Result<Wake> {
            match self.next("wait") {
                Step::Wait(w) => Ok(w),
                Step::Errno(e) => Err(io::Error::from_raw_os_error(e)),
                Step::Bytes(_) => panic!("wait got a bytes step"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_signal_and_drain() {
        let e = EventFd::new().unwrap();
        assert!(!wait_readable(&[e.as_fd()], Duration::ZERO).unwrap());
        e.signal();
        assert!(wait_readable(&[e.as_fd()], Duration::ZERO).unwrap());
        e.drain();
        assert!(!wait_readable(&[e.as_fd()], Duration::ZERO).unwrap());
    }

    #[test]
    fn fd_kinds_and_sockets() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(fd_kind(c.as_fd()), FdKind::Socket);
        assert!(is_inet_stream(c.as_fd()));
        assert!(peer_ip(c.as_fd()).unwrap().is_loopback());
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert_eq!(fd_kind(r.as_fd()), FdKind::Pipe);
        assert!(!is_inet_stream(r.as_fd()));
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        assert_eq!(fd_kind(f.as_fd()), FdKind::Regular);
        let e = EventFd::new().unwrap();
        assert_eq!(fd_kind(e.as_fd()), FdKind::Other);
        shutdown_write(c.as_fd()).unwrap();
    }

    #[test]
    fn every_address_of_this_host_is_local() {
        assert!(is_local_ip("127.3.4.5".parse().unwrap()));
        assert!(is_local_ip("::1".parse().unwrap()));
        assert!(is_local_ip("::ffff:127.0.0.1".parse().unwrap()));
        // TEST-NET-3 is never a host's address.
        assert!(!is_local_ip("203.0.113.7".parse().unwrap()));
        let mine: Vec<IpAddr> =
            nix::ifaddrs::getifaddrs().unwrap().filter_map(|a| a.address).filter_map(|a| addr_ip(&a)).collect();
        assert!(!mine.is_empty());
        for ip in mine {
            assert!(is_local_ip(ip), "{ip} is an address of this host");
            if let IpAddr::V4(v4) = ip {
                assert!(is_local_ip(IpAddr::V6(v4.to_ipv6_mapped())), "{ip} v4-mapped");
            }
        }
    }
}
