//! Every ioctl and raw syscall on a VFIO container, group, device or data fd.
//!
//! This is the only module of the crate that issues VFIO ioctls. Device-level calls go through
//! the [`SysOps`] trait so that [`crate::vfio::VfioDevice`] can be unit-tested against a fake
//! kernel (see the tests of `vfio.rs`) without `/dev/vfio`; [`Kernel`] is the real
//! implementation. Opening a group and container (which needs the real `/dev/vfio`) uses the
//! free functions at the bottom.
//!
//! Plain syscalls (`read`/`write`/`pread`/`pwrite`, pipes, socketpairs, eventfds, `fcntl`,
//! `fstat`, `poll`, `send`) go through nix's safe wrappers. Raw `libc` is left only where nix
//! has no call: the VFIO ioctls (whose numbers are pinned by the tests below) and `FIONREAD`.
//!
//! Safety rationale shared by every `unsafe` block here (the rust-vmm convention):
//! - the kernel is trusted to only read and write within the `argsz` we pass;
//! - every pointer we pass points to a live, properly aligned object of at least the size we
//!   announce, borrowed for the duration of the call;
//! - an invalid fd, parameter or buffer makes the kernel return an error, never corrupt memory.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::PollTimeout;
use nix::sys::eventfd::EfdFlags;
use nix::sys::socket;

use vfio_bindings::bindings::vfio::{
    vfio_device_feature, vfio_device_feature_mig_state, vfio_device_info, vfio_group_status, vfio_precopy_info,
    vfio_region_info,
};

/// `VFIO_TYPE`: the ioctl "magic" character `';'`.
pub(crate) const VFIO_TYPE: u32 = b';' as u32;
/// `VFIO_BASE`: first VFIO ioctl number.
pub(crate) const VFIO_BASE: u32 = 100;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`: VFIO ioctls encode no direction or size.
pub(crate) const fn vfio_io(n: u32) -> u64 {
    ((VFIO_TYPE << 8) | (VFIO_BASE + n)) as u64
}

/// `VFIO_GET_API_VERSION` (container).
pub(crate) const VFIO_GET_API_VERSION: u64 = vfio_io(0);
/// `VFIO_CHECK_EXTENSION` (container).
pub(crate) const VFIO_CHECK_EXTENSION: u64 = vfio_io(1);
/// `VFIO_SET_IOMMU` (container).
pub(crate) const VFIO_SET_IOMMU: u64 = vfio_io(2);
/// `VFIO_GROUP_GET_STATUS` (group).
pub(crate) const VFIO_GROUP_GET_STATUS: u64 = vfio_io(3);
/// `VFIO_GROUP_SET_CONTAINER` (group).
pub(crate) const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(4);
/// `VFIO_GROUP_GET_DEVICE_FD` (group).
pub(crate) const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
/// `VFIO_DEVICE_GET_INFO` (device).
pub(crate) const VFIO_DEVICE_GET_INFO: u64 = vfio_io(7);
/// `VFIO_DEVICE_GET_REGION_INFO` (device).
pub(crate) const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
/// `VFIO_DEVICE_RESET` (device).
pub(crate) const VFIO_DEVICE_RESET: u64 = vfio_io(11);
/// `VFIO_DEVICE_FEATURE` (device).
pub(crate) const VFIO_DEVICE_FEATURE: u64 = vfio_io(17);
/// `VFIO_MIG_GET_PRECOPY_INFO` (save data fd).
pub(crate) const VFIO_MIG_GET_PRECOPY_INFO: u64 = vfio_io(21);

/// Size of `struct vfio_device_feature` (the header before the payload).
pub(crate) const FEATURE_HDR: u32 = std::mem::size_of::<vfio_device_feature>() as u32;

/// A `VFIO_DEVICE_FEATURE` buffer: the 8-byte header followed by up to 8 bytes of payload, in
/// one 8-aligned allocation (payloads hold `__aligned_u64`). Covers every ready-made buffer of
/// the reference's §1.4 table except DMA logging, which this crate does not issue.
#[repr(C, align(8))]
#[derive(Debug, Default)]
pub(crate) struct FeatureBuf {
    /// `argsz` and `flags`.
    pub hdr: vfio_device_feature,
    /// The payload bytes, native-endian.
    pub payload: [u8; 8],
}

impl FeatureBuf {
    /// A buffer for feature `flags` (index | GET/SET/PROBE) with `payload_len` payload bytes
    /// (0 or 8), zero payload.
    pub fn new(flags: u32, payload_len: u32) -> FeatureBuf {
        let mut b = FeatureBuf::default();
        b.hdr.argsz = FEATURE_HDR + payload_len.min(8);
        b.hdr.flags = flags;
        b
    }

    /// The payload as a `u64` (MIGRATION flags, MIG_DATA_SIZE).
    pub fn payload_u64(&self) -> u64 {
        u64::from_ne_bytes(self.payload)
    }

    /// Sets the payload from a `u64`.
    #[cfg(test)]
    pub fn set_payload_u64(&mut self, v: u64) {
        self.payload = v.to_ne_bytes();
    }

    /// The payload as `struct vfio_device_feature_mig_state`.
    pub fn mig_state(&self) -> vfio_device_feature_mig_state {
        let p = self.payload;
        vfio_device_feature_mig_state {
            device_state: u32::from_ne_bytes([p[0], p[1], p[2], p[3]]),
            data_fd: i32::from_ne_bytes([p[4], p[5], p[6], p[7]]),
        }
    }

    /// Sets the payload from `struct vfio_device_feature_mig_state`.
    pub fn set_mig_state(&mut self, s: vfio_device_feature_mig_state) {
        self.payload[..4].copy_from_slice(&s.device_state.to_ne_bytes());
        self.payload[4..].copy_from_slice(&s.data_fd.to_ne_bytes());
    }
}

/// The device-level syscalls [`crate::vfio::VfioDevice`] needs, injectable for tests.
///
/// Every method returns the raw `io::Error` (errno); decoding is the caller's job.
pub(crate) trait SysOps: Send + Sync + fmt::Debug {
    /// `VFIO_DEVICE_FEATURE` with `buf` (argsz/flags already set).
    fn device_feature(&self, dev: BorrowedFd<'_>, buf: &mut FeatureBuf) -> io::Result<()>;
    /// `VFIO_MIG_GET_PRECOPY_INFO` on a save data fd.
    fn precopy_info(&self, data: BorrowedFd<'_>, info: &mut vfio_precopy_info) -> io::Result<()>;
    /// `VFIO_DEVICE_RESET`.
    fn reset(&self, dev: BorrowedFd<'_>) -> io::Result<()>;
    /// `VFIO_DEVICE_GET_INFO`.
    fn device_info(&self, dev: BorrowedFd<'_>, info: &mut vfio_device_info) -> io::Result<()>;
    /// `VFIO_DEVICE_GET_REGION_INFO` (`info.index` set by the caller).
    fn region_info(&self, dev: BorrowedFd<'_>, info: &mut vfio_region_info) -> io::Result<()>;
    /// One `read(2)`.
    fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize>;
    /// One `write(2)`.
    fn write(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize>;
    /// One `pread(2)` at an absolute file offset.
    fn pread(&self, fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// One `pwrite(2)` at an absolute file offset.
    fn pwrite(&self, fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<usize>;
}

/// The real kernel.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Kernel;

/// Maps an ioctl/syscall return value to `io::Result`.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Converts a file offset to `off_t`, rejecting values the kernel cannot take.
fn to_off(off: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Issues an ioctl whose argument is a pointer.
///
/// # Safety
/// `arg` must be null or point to a live, writable object that is at least as large as the
/// size the ioctl `req` reads and writes for this call (for VFIO: the `argsz` stored in it).
unsafe fn ioctl_ptr<T>(fd: BorrowedFd<'_>, req: u64, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: the fd is valid for the borrow; the caller guarantees `arg` covers what the
    // kernel accesses. The request number is a compile-time VFIO constant that fits the type.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, arg) })
}

/// Issues an ioctl whose argument is an integer (or none).
fn ioctl_val(fd: BorrowedFd<'_>, req: u64, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: these VFIO ioctls take their argument by value (an integer or nothing), so the
    // kernel dereferences no user memory; the fd is valid for the borrow.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, arg) })
}

impl SysOps for Kernel {
    fn device_feature(&self, dev: BorrowedFd<'_>, buf: &mut FeatureBuf) -> io::Result<()> {
        debug_assert!(buf.hdr.argsz as usize <= std::mem::size_of::<FeatureBuf>());
        // SAFETY: `buf` is a live 16-byte, 8-aligned FeatureBuf and its argsz is at most 16
        // (FeatureBuf::new clamps the payload to 8 bytes), so the kernel stays inside it.
        unsafe { ioctl_ptr(dev, VFIO_DEVICE_FEATURE, buf as *mut FeatureBuf) }.map(|_| ())
    }

    fn precopy_info(&self, data: BorrowedFd<'_>, info: &mut vfio_precopy_info) -> io::Result<()> {
        info.argsz = std::mem::size_of::<vfio_precopy_info>() as u32;
        info.flags = 0;
        // SAFETY: `info` is a live vfio_precopy_info whose argsz is its own size.
        unsafe { ioctl_ptr(data, VFIO_MIG_GET_PRECOPY_INFO, info as *mut vfio_precopy_info) }.map(|_| ())
    }

    fn reset(&self, dev: BorrowedFd<'_>) -> io::Result<()> {
        ioctl_val(dev, VFIO_DEVICE_RESET, 0).map(|_| ())
    }

    fn device_info(&self, dev: BorrowedFd<'_>, info: &mut vfio_device_info) -> io::Result<()> {
        info.argsz = std::mem::size_of::<vfio_device_info>() as u32;
        // SAFETY: `info` is a live vfio_device_info whose argsz is its own size.
        unsafe { ioctl_ptr(dev, VFIO_DEVICE_GET_INFO, info as *mut vfio_device_info) }.map(|_| ())
    }

    fn region_info(&self, dev: BorrowedFd<'_>, info: &mut vfio_region_info) -> io::Result<()> {
        info.argsz = std::mem::size_of::<vfio_region_info>() as u32;
        // SAFETY: `info` is a live vfio_region_info whose argsz is its own size (capability
        // chains, which need a larger buffer, are not requested).
        unsafe { ioctl_ptr(dev, VFIO_DEVICE_GET_REGION_INFO, info as *mut vfio_region_info) }.map(|_| ())
    }

    fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(fd, buf)?)
    }

    fn write(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        Ok(nix::unistd::write(fd, buf)?)
    }

    fn pread(&self, fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
        Ok(nix::sys::uio::pread(fd, buf, to_off(off)?)?)
    }

    fn pwrite(&self, fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<usize> {
        Ok(nix::sys::uio::pwrite(fd, buf, to_off(off)?)?)
    }
}

/// `VFIO_GET_API_VERSION` on a container fd.
pub(crate) fn get_api_version(container: BorrowedFd<'_>) -> io::Result<i32> {
    ioctl_val(container, VFIO_GET_API_VERSION, 0)
}

/// `VFIO_CHECK_EXTENSION`: whether the container supports IOMMU type `ext`.
pub(crate) fn check_extension(container: BorrowedFd<'_>, ext: u32) -> io::Result<bool> {
    ioctl_val(container, VFIO_CHECK_EXTENSION, libc::c_ulong::from(ext)).map(|r| r > 0)
}

/// `VFIO_SET_IOMMU` with IOMMU type `ty` (after a group was added to the container).
pub(crate) fn set_iommu(container: BorrowedFd<'_>, ty: u32) -> io::Result<()> {
    ioctl_val(container, VFIO_SET_IOMMU, libc::c_ulong::from(ty)).map(|_| ())
}

/// `VFIO_GROUP_GET_STATUS`: the group's flags (`VFIO_GROUP_FLAGS_*`).
pub(crate) fn group_get_status(group: BorrowedFd<'_>) -> io::Result<u32> {
    let mut st = vfio_group_status { argsz: std::mem::size_of::<vfio_group_status>() as u32, flags: 0 };
    // SAFETY: `st` is a live vfio_group_status whose argsz is its own size.
    unsafe { ioctl_ptr(group, VFIO_GROUP_GET_STATUS, &mut st as *mut vfio_group_status) }?;
    Ok(st.flags)
}

/// `VFIO_GROUP_SET_CONTAINER`: adds the group to the container.
pub(crate) fn group_set_container(group: BorrowedFd<'_>, container: BorrowedFd<'_>) -> io::Result<()> {
    let mut cfd: libc::c_int = container.as_raw_fd();
    // SAFETY: the ioctl reads one int (the container fd) through the pointer; `cfd` is a live
    // c_int for the duration of the call.
    unsafe { ioctl_ptr(group, VFIO_GROUP_SET_CONTAINER, &mut cfd as *mut libc::c_int) }.map(|_| ())
}

/// `VFIO_GROUP_GET_DEVICE_FD`: opens the device called `name` in the group.
pub(crate) fn group_get_device_fd(group: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: the ioctl reads a NUL-terminated string through the pointer; `name` is a live
    // CStr for the duration of the call and the kernel does not write through it.
    let fd = unsafe { ioctl_ptr(group, VFIO_GROUP_GET_DEVICE_FD, name.as_ptr().cast_mut()) }?;
    // SAFETY: on success the ioctl returns a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---------------------------------------------------------------------------------------------
// Plain-fd helpers for the simulated device (pipes, socketpairs, eventfds, poll, FIONREAD),
// through nix's safe wrappers wherever nix has the call.
// ---------------------------------------------------------------------------------------------

pub(crate) use nix::poll::{PollFd, PollFlags};
pub(crate) use nix::sys::eventfd::EventFd;

/// `pipe2(O_CLOEXEC)`: `(read end, write end)`, both blocking.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// `socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC)`.
pub(crate) fn socketpair_stream() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(socket::AddressFamily::Unix, socket::SockType::Stream, None, socket::SockFlag::SOCK_CLOEXEC)?)
}

/// A non-blocking, close-on-exec eventfd used as a wake-up/stop signal.
pub(crate) fn eventfd() -> io::Result<EventFd> {
    Ok(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?)
}

/// Adds 1 to an eventfd (wakes a poller). Errors (a saturated counter) are harmless: the
/// eventfd is then readable anyway.
pub(crate) fn eventfd_signal(ev: &EventFd) {
    let _ = ev.write(1);
}

/// Resets an eventfd's counter (non-blocking; nothing to read is fine).
pub(crate) fn eventfd_drain(ev: &EventFd) {
    let _ = ev.read();
}

/// The fd's open file description flags (`F_GETFL`).
fn status_flags(fd: BorrowedFd<'_>) -> io::Result<OFlag> {
    Ok(OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?))
}

/// Sets `O_NONBLOCK` on the fd's open file description.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fl = status_flags(fd)?;
    fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// `F_SETPIPE_SZ`: asks for a pipe capacity; returns the capacity the kernel set.
pub(crate) fn set_pipe_size(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<usize> {
    let arg = libc::c_int::try_from(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let r = fcntl(fd, FcntlArg::F_SETPIPE_SZ(arg))?;
    Ok(usize::try_from(r).unwrap_or(0))
}

/// `F_GETPIPE_SZ`: the pipe's capacity in bytes.
pub(crate) fn pipe_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let r = fcntl(fd, FcntlArg::F_GETPIPE_SZ)?;
    Ok(usize::try_from(r).unwrap_or(0))
}

/// `FIONREAD`: bytes queued for reading on a pipe or socket. nix has no wrapper for it (only
/// the `ioctl_*!` macros, which generate `unsafe fn`s), so it goes through [`ioctl_ptr`].
pub(crate) fn fionread(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // FIONREAD's type differs between libcs (c_ulong on glibc, c_int on musl).
    #[allow(clippy::unnecessary_cast)]
    let req = libc::FIONREAD as u64;
    // SAFETY: FIONREAD writes one int through the pointer; `n` is a live c_int.
    unsafe { ioctl_ptr(fd, req, &mut n as *mut libc::c_int) }?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// `(st_dev, st_ino)` of an open file: the identity of a pipe (both ends share it) or socket.
pub(crate) fn file_id(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = nix::sys::stat::fstat(fd)?;
    // st_dev/st_ino are u64 on Linux; the casts are for libcs where they are narrower.
    #[allow(clippy::unnecessary_cast)]
    Ok((st.st_dev as u64, st.st_ino as u64))
}

/// `poll(2)` with a timeout (`None`: forever, rounded up to whole milliseconds); `EINTR` is
/// reported as "nothing ready" (the callers loop anyway).
pub(crate) fn poll(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<usize> {
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(d) => {
            let ms = d.as_millis().saturating_add(u128::from(d.subsec_nanos() % 1_000_000 != 0));
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    };
    match nix::poll::poll(fds, timeout) {
        Ok(n) => Ok(usize::try_from(n).unwrap_or(0)),
        Err(Errno::EINTR) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Whether a [`PollFd`] reported any event (readiness, error or hang-up) in the last poll.
pub(crate) fn ready(p: &PollFd<'_>) -> bool {
    p.revents().is_some_and(|r| !r.is_empty())
}

/// `send(MSG_NOSIGNAL)` on a stream socket (no SIGPIPE when the peer is gone).
pub(crate) fn send_nosignal(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    Ok(socket::send(fd.as_raw_fd(), buf, socket::MsgFlags::MSG_NOSIGNAL)?)
}

/// The system page size (4096 where sysconf has no answer).
pub(crate) fn page_size() -> usize {
    let r = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten();
    r.and_then(|p| usize::try_from(p).ok()).filter(|p| p.is_power_of_two()).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers as the reference (and `_IO(';', 100 + n)`) gives them; a change here is
    /// an ABI break, never a refactor.
    #[test]
    fn test_vfio_ioctl_code() {
        assert_eq!(VFIO_TYPE, 0x3B);
        assert_eq!(VFIO_GET_API_VERSION, 0x3B64);
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3B65);
        assert_eq!(VFIO_SET_IOMMU, 0x3B66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3B67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3B68);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3B6A);
        assert_eq!(VFIO_DEVICE_GET_INFO, 0x3B6B);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3B6C);
        assert_eq!(VFIO_DEVICE_RESET, 0x3B6F);
        assert_eq!(VFIO_DEVICE_FEATURE, 0x3B75);
        assert_eq!(VFIO_MIG_GET_PRECOPY_INFO, 0x3B79);
    }

    #[test]
    fn feature_buffers_match_reference_table() {
        use vfio_bindings::bindings::vfio as v;
        assert_eq!(std::mem::size_of::<FeatureBuf>(), 16);
        assert_eq!(std::mem::align_of::<FeatureBuf>(), 8);
        assert_eq!(std::mem::size_of::<vfio_precopy_info>(), 24);
        let get_mig = FeatureBuf::new(v::VFIO_DEVICE_FEATURE_GET | v::VFIO_DEVICE_FEATURE_MIGRATION, 8);
        assert_eq!((get_mig.hdr.argsz, get_mig.hdr.flags), (16, 0x0001_0001));
        let probe = FeatureBuf::new(
            v::VFIO_DEVICE_FEATURE_PROBE | v::VFIO_DEVICE_FEATURE_SET | v::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            0,
        );
        assert_eq!((probe.hdr.argsz, probe.hdr.flags), (8, 0x0006_0002));
        let set = FeatureBuf::new(v::VFIO_DEVICE_FEATURE_SET | v::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 8);
        assert_eq!((set.hdr.argsz, set.hdr.flags), (16, 0x0002_0002));
        let get = FeatureBuf::new(v::VFIO_DEVICE_FEATURE_GET | v::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 8);
        assert_eq!((get.hdr.argsz, get.hdr.flags), (16, 0x0001_0002));
        let size = FeatureBuf::new(v::VFIO_DEVICE_FEATURE_GET | v::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 8);
        assert_eq!((size.hdr.argsz, size.hdr.flags), (16, 0x0001_0009));
        let v2 = FeatureBuf::new(v::VFIO_DEVICE_FEATURE_SET | v::VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2, 0);
        assert_eq!((v2.hdr.argsz, v2.hdr.flags), (8, 0x0002_000C));
        // Payload too large is clamped to the buffer.
        assert_eq!(FeatureBuf::new(0, 1000).hdr.argsz, 16);
    }

    #[test]
    fn mig_state_payload_layout() {
        let mut b = FeatureBuf::new(0, 8);
        b.set_mig_state(vfio_device_feature_mig_state { device_state: 3, data_fd: -1 });
        let mut want = [0u8; 8];
        want[..4].copy_from_slice(&3u32.to_ne_bytes());
        want[4..].copy_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(b.payload, want);
        assert_eq!(b.mig_state().device_state, 3);
        assert_eq!(b.mig_state().data_fd, -1);
        b.set_payload_u64(0x7);
        assert_eq!(b.payload_u64(), 7);
    }

    #[test]
    fn kernel_ops_on_a_pipe() {
        let (r, w) = pipe().unwrap();
        let k = Kernel;
        assert_eq!(k.write(w.as_fd(), b"abc").unwrap(), 3);
        let mut b = [0u8; 8];
        assert_eq!(k.read(r.as_fd(), &mut b).unwrap(), 3);
        // A pipe is not a VFIO device: every VFIO ioctl fails with a clean errno.
        let mut fb = FeatureBuf::new(0x0001_0001, 8);
        assert!(k.device_feature(r.as_fd(), &mut fb).is_err());
        assert!(k.reset(r.as_fd()).is_err());
        assert_eq!(k.pread(r.as_fd(), &mut b, 0).unwrap_err().raw_os_error(), Some(libc::ESPIPE));
        assert_eq!(k.pwrite(w.as_fd(), &b, u64::MAX).unwrap_err().raw_os_error(), Some(libc::EOVERFLOW));
    }

    use std::os::fd::AsFd;
}
