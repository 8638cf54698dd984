//! A thin, bounded wrapper over one io_uring instance owned by one thread.
//!
//! * Setup asks for `SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN | SUBMIT_ALL` and steps down
//!   to plainer flag sets on kernels that refuse them (`EINVAL`).
//! * Completions are copied into the caller's fixed array, so reaping never allocates.
//! * Waits always carry a timeout (`IORING_ENTER_EXT_ARG`), so a stalled peer can never hang
//!   the thread; `EINTR` and `ETIME` are not errors.
//!
//! The ring must be created on the thread that uses it (`SINGLE_ISSUER`).

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use crate::pool::BufferPool;

/// `IORING_SEND_ZC_REPORT_USAGE`: ask the notification to say whether the data was copied.
pub(crate) const ZC_REPORT_USAGE: u16 = 8;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a notification's `res` when the kernel copied.
pub(crate) const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// One completion, copied out of the CQ ring.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Completion {
    /// The SQE's user_data.
    pub(crate) user_data: u64,
    /// Result: bytes, or a negative errno.
    pub(crate) res: i32,
    /// `IORING_CQE_F_*` flags.
    pub(crate) flags: u32,
}

impl Completion {
    /// `IORING_CQE_F_MORE`: another CQE (a SEND_ZC notification) will follow.
    pub(crate) fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// `IORING_CQE_F_NOTIF`: this is a SEND_ZC buffer-release notification.
    pub(crate) fn notif(&self) -> bool {
        cqueue::notif(self.flags)
    }
}

/// One ring, owned by one thread.
pub(crate) struct Ring {
    ring: IoUring,
    /// Setup flags that the kernel accepted, in words (for reports).
    pub(crate) setup: &'static str,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("setup", &self.setup).finish_non_exhaustive()
    }
}

impl Ring {
    /// Creates a ring with `sq_entries` submission and `cq_entries` completion slots.
    ///
    /// # Errors
    /// The setup errno of the plainest flag set (`EPERM` when io_uring is disabled by sysctl
    /// or seccomp, `ENOSYS` without io_uring, `ENOMEM` without locked memory for the rings).
    pub(crate) fn new(sq_entries: u32, cq_entries: u32) -> io::Result<Ring> {
        type Apply = fn(&mut io_uring::Builder);
        let attempts: [(&'static str, Apply); 3] = [
            ("SINGLE_ISSUER|DEFER_TASKRUN|COOP_TASKRUN|SUBMIT_ALL", |b| {
                b.setup_single_issuer().setup_defer_taskrun().setup_coop_taskrun().setup_submit_all();
            }),
            ("COOP_TASKRUN|SUBMIT_ALL", |b| {
                b.setup_coop_taskrun().setup_submit_all();
            }),
            ("plain", |_| {}),
        ];
        let mut last = io::Error::from_raw_os_error(libc::EINVAL);
        for (name, apply) in attempts {
            let mut b = IoUring::builder();
            b.setup_cqsize(cq_entries.max(sq_entries * 2));
            apply(&mut b);
            match b.build(sq_entries) {
                Ok(ring) => return Ok(Ring { ring, setup: name }),
                // EINVAL: an older kernel that lacks a flag; try a plainer set.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Registers the whole pool as fixed buffer 0.
    ///
    /// # Safety
    /// `pool` must stay mapped until this ring is dropped, and the caller must not unmap it
    /// while any operation that uses it may still be in flight.
    pub(crate) unsafe fn register_pool(&self, pool: &BufferPool) -> io::Result<()> {
        let (base, len) = pool.region();
        let iov = [libc::iovec { iov_base: base.cast(), iov_len: len }];
        // SAFETY: the iovec describes a live anonymous mapping that, by this function's
        // contract, outlives the registration.
        unsafe { self.ring.submitter().register_buffers(&iov) }
    }

    /// Registers `fds` as fixed files `0..fds.len()`.
    ///
    /// # Errors
    /// The kernel's errno (`EBADF` for a closed fd, `EMFILE` above `RLIMIT_NOFILE`).
    pub(crate) fn register_files(&self, fds: &[RawFd]) -> io::Result<()> {
        self.ring.submitter().register_files(fds)
    }

    /// Replaces fixed files `offset..offset + fds.len()` (a receive channel that connected
    /// after the ring was set up takes its place in the table).
    ///
    /// # Errors
    /// The kernel's errno (`EBADF` for a closed fd, `EINVAL` for an offset past the table).
    pub(crate) fn update_files(&self, offset: u32, fds: &[RawFd]) -> io::Result<()> {
        self.ring.submitter().register_files_update(offset, fds).map(|_| ())
    }

    /// Caps io-wq workers (bounded, unbounded) for this ring.
    ///
    /// # Errors
    /// The kernel's errno.
    pub(crate) fn limit_workers(&self, bounded: u32, unbounded: u32) -> io::Result<()> {
        let mut v = [bounded, unbounded];
        self.ring.submitter().register_iowq_max_workers(&mut v)
    }

    /// Queues `entries` as one all-or-nothing batch (a linked chain never straddles a
    /// submission boundary). Submits first if the SQ has no room.
    ///
    /// # Safety
    /// Every buffer and fd an entry refers to must stay valid until the operation's last CQE
    /// (for SEND_ZC: until its notification), and `user_data` must let the caller find and
    /// retire the operation.
    pub(crate) unsafe fn push(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        for _ in 0..2 {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push_multiple(entries) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
        Err(io::Error::new(io::ErrorKind::WouldBlock, "submission queue full after submit"))
    }

    /// Submits queued entries without waiting.
    ///
    /// # Errors
    /// Any errno but `EINTR` and `EBUSY` (CQ overflow backlog; retried on the next wait).
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits and waits for at least one completion or `timeout`, whichever comes first.
    ///
    /// # Errors
    /// Any errno but `EINTR`, `ETIME` and `EBUSY`.
    pub(crate) fn submit_and_wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            // ETIME: the timeout passed with nothing to reap. EINTR: a signal. EBUSY: the CQ
            // overflowed and the kernel wants us to reap first.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Copies up to `out.len()` available completions into `out` and returns how many.
    pub(crate) fn reap_into(&mut self, out: &mut [Completion]) -> usize {
        let mut cq = self.ring.completion();
        cq.sync();
        let mut n = 0;
        for slot in out.iter_mut() {
            let Some(cqe) = cq.next() else { break };
            *slot = Completion { user_data: cqe.user_data(), res: cqe.result(), flags: cqe.flags() };
            n += 1;
        }
        n
    }

    /// Whether the kernel supports `op` (`IORING_REGISTER_PROBE`).
    pub(crate) fn supports(&self, op: u8) -> bool {
        let mut p = Probe::new();
        self.ring.submitter().register_probe(&mut p).is_ok() && p.is_supported(op)
    }

    /// Whether the kernel knows `IORING_ASYNC_CANCEL_ANY` (5.19): on an idle ring a cancel of
    /// anything finds nothing (0 cancelled on 6.18, `-ENOENT` elsewhere); an older kernel
    /// refuses the flag (`-EINVAL`).
    fn cancel_any_supported(&mut self) -> bool {
        if self.cancel_all(u64::MAX).is_err() || self.submit_and_wait(Duration::from_secs(1)).is_err() {
            return false;
        }
        let mut c = [Completion::default(); 1];
        self.reap_into(&mut c) == 1 && (c[0].res >= 0 || c[0].res == -libc::ENOENT)
    }

    /// Queues a cancel of every in-flight request (`IORING_ASYNC_CANCEL_ANY`).
    ///
    /// # Errors
    /// Submission failures.
    pub(crate) fn cancel_all(&mut self, user_data: u64) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(user_data);
        // SAFETY: a cancel request refers to no buffer or fd.
        unsafe { self.push(&[e]) }?;
        self.submit()
    }
}

/// The ops the engine uses, by name; all are required except SEND_ZC (used where it helps).
pub(crate) const OPS: [(&str, u8); 9] = [
    ("READ_FIXED", opcode::ReadFixed::CODE),
    ("WRITE_FIXED", opcode::WriteFixed::CODE),
    ("READ", opcode::Read::CODE),
    ("WRITE", opcode::Write::CODE),
    ("SEND", opcode::Send::CODE),
    ("SEND_ZC", opcode::SendZc::CODE),
    ("RECV", opcode::Recv::CODE),
    ("POLL_ADD", opcode::PollAdd::CODE),
    ("ASYNC_CANCEL", opcode::AsyncCancel::CODE),
];

/// Why io_uring cannot be used here, in words an operator can act on, or `None` if a ring
/// can be created and the kernel has every operation and feature the engine needs
/// (`IORING_FEAT_EXT_ARG` for bounded waits, 5.11; READ_FIXED, WRITE_FIXED, READ, WRITE, SEND,
/// RECV, POLL_ADD, ASYNC_CANCEL).
pub(crate) fn uring_unavailable_reason() -> Option<String> {
    let mut ring = match Ring::new(4, 8) {
        Ok(r) => r,
        Err(e) => return Some(describe_setup_error(&e)),
    };
    if !ring.ring.params().is_feature_ext_arg() {
        return Some("io_uring lacks IORING_FEAT_EXT_ARG (kernel older than 5.11)".into());
    }
    let mut p = Probe::new();
    if let Err(e) = ring.ring.submitter().register_probe(&mut p) {
        return Some(format!("IORING_REGISTER_PROBE: {e} (kernel older than 5.6)"));
    }
    let required = OPS.iter().filter(|&&(n, _)| n != "SEND_ZC");
    let missing: Vec<&str> = required.filter(|(_, c)| !p.is_supported(*c)).map(|(n, _)| *n).collect();
    if !missing.is_empty() {
        return Some(format!("io_uring lacks IORING_OP_{}", missing.join(", IORING_OP_")));
    }
    if !ring.cancel_any_supported() {
        // Teardown cancels everything in flight at once; without CANCEL_ANY every run would wait
        // out the drain and leak its ring.
        return Some("io_uring lacks IORING_ASYNC_CANCEL_ANY (kernel older than 5.19)".into());
    }
    None
}

/// Explains an `io_uring_setup` failure.
pub(crate) fn describe_setup_error(e: &io::Error) -> String {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok();
    let sysctl = sysctl.as_deref().map(str::trim);
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring_setup: ENOSYS (the kernel was built without io_uring)".into(),
        Some(libc::EPERM) => match sysctl {
            Some("2") => "io_uring_setup: EPERM (kernel.io_uring_disabled=2: io_uring is disabled for all processes)".into(),
            Some("1") => "io_uring_setup: EPERM (kernel.io_uring_disabled=1: only members of kernel.io_uring_group may use io_uring)".into(),
            _ => "io_uring_setup: EPERM (blocked by a seccomp filter, e.g. a container runtime's default profile)".into(),
        },
        Some(libc::ENOMEM) => "io_uring_setup: ENOMEM (not enough locked memory for the rings; raise RLIMIT_MEMLOCK)".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => format!("io_uring_setup: {e} (out of file descriptors)"),
        _ => format!("io_uring_setup: {e}"),
    }
}

/// Meaning of a negative CQE result for an operation, for error messages.
pub(crate) fn cqe_error(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}
