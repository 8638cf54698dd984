//! The simulated device's parameters: [`SimConfig`] and its builders, and the fault kinds.

use std::time::Duration;

use crate::state::{MigFlags, MigState};

/// What a read at the temporary end of the PRE_COPY stream returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrecopyEnd {
    /// `-ENOMSG`, as the uAPI text says and mlx5 does.
    #[default]
    NoMsg,
    /// `0`, as mtty does.
    Zero,
}

/// When dirty records of a live device ([`SimConfig::dirty_rate_bytes_per_sec`]) become
/// readable in PRE_COPY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyRelease {
    /// As soon as a page is dirtied (after its base bytes were produced): a read at the
    /// temporary end returns `ENOMSG`/`0` only while nothing is pending, and new records show
    /// up on the fd (a blocked raw read returns them) without any ioctl.
    #[default]
    Continuous,
    /// Like mlx5: once the reader has reached the temporary end, new dirty data is put into
    /// the stream only by a `VFIO_MIG_GET_PRECOPY_INFO` call (mlx5 starts a new SAVE there).
    /// Until then reads keep answering `ENOMSG`/`0` while PRECOPY_INFO reports the pending
    /// `dirty_bytes`. In STOP_COPY everything pending is streamed regardless.
    OnPrecopyInfo,
}

/// Where a failing arc leaves the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultLeave {
    /// The arc is rolled back: the device stays at the arc's start.
    Stay,
    /// The arc could not be rolled back: the device goes to ERROR (every session ends).
    Error,
}

/// A direct arc that fails every time it is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArcFault {
    /// The arc's start.
    pub from: MigState,
    /// The arc's end.
    pub to: MigState,
    /// The errno the SET returns (e.g. `libc::EIO`).
    pub errno: i32,
    /// Where the failure leaves the device.
    pub leave: FaultLeave,
}

/// The simulated device's parameters. For a destination, `(seed, size)` (and `config_len`)
/// are the **expectation** the resume stream and config blob are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Device name for messages.
    pub name: String,
    /// STOP_COPY stream length in bytes (also what MIG_DATA_SIZE reports). On a live device,
    /// the size of its image: the base image of its stream, which dirty records follow.
    pub size: u64,
    /// Content seed: the stream is [`fill`](super::fill)`(seed, 0, ..size)`.
    pub seed: u64,
    /// Migration flags the device reports. Without STOP_COPY it is "not migratable".
    pub flags: MigFlags,
    /// Upper bound on the bytes one read returns. Implemented as the save pipe's capacity
    /// (`F_SETPIPE_SZ`, rounded up by the kernel to a power-of-two number of pages, at least
    /// one page), and as a cap in [`SimDevice::read_data`](crate::MigrationDevice::read_data),
    /// which is therefore exact. Raw reads are bounded by the pipe capacity (`max_read` rounded
    /// up). In read-error mode (a socket, see [`SimConfig::read_error_at`]) only the
    /// `read_data` cap applies.
    pub max_read: usize,
    /// Bytes of initial data available in PRE_COPY (clamped to the stream length). On a live
    /// device, also where its base image pauses for dirty records in PRE_COPY: a live
    /// destination must be given the same value.
    pub precopy_bytes: u64,
    /// What a read at the temporary end of PRE_COPY returns.
    pub precopy_end: PrecopyEnd,
    /// Average production rate of the save stream (a slow device); `None` is unpaced.
    pub throughput_bytes_per_sec: Option<u64>,
    /// Delay before each chunk (up to `max_read` bytes) of the save stream is produced.
    pub read_latency: Option<Duration>,
    /// Length of the config blob (at least the 16-byte header).
    pub config_len: usize,
    /// The save stream fails after this many bytes: the reader gets the first N bytes, then
    /// `ECONNRESET` (then EOF). In this mode the save fd is an `AF_UNIX` stream socket: the
    /// producer, after sending N bytes, writes one byte into its *own* receive queue through
    /// a dup of the reader's end and closes its socket; the kernel (`unix_release_sock`)
    /// then sets `ECONNRESET` on the reader, reported once its queue is empty. On a live
    /// device N counts bytes of the whole stream (base image and dirty records).
    pub read_error_at: Option<u64>,
    /// The resume stream fails after this many bytes: the consumer closes its end of the
    /// pipe, so the writer gets `EPIPE`.
    pub write_error_at: Option<u64>,
    /// A direct arc that fails.
    pub fail_arc: Option<ArcFault>,
    /// The save stream ends early with EOF after this many bytes (a truncated stream). On a
    /// live device this counts bytes of the whole stream (base image and dirty records).
    pub truncate_at: Option<u64>,
    /// The save data fd handed out by the SET that creates it is `O_NONBLOCK`, as when a VMM
    /// (or its migration helper) sets `O_NONBLOCK` on it to read it from an event loop or
    /// inline in io_uring. Of the in-tree drivers only **mlx5** honours it: a `read(2)` with
    /// no STOP_COPY data ready gives `EAGAIN` instead of waiting (mtty, xe, hisi_acc, virtio
    /// and pds ignore the flag and block). Here a raw `read(2)` of an empty pipe gives
    /// `EAGAIN`; with a paced producer ([`SimConfig::throughput_bytes_per_sec`],
    /// [`SimConfig::read_latency`]) that happens between chunks, and at the PRE_COPY temporary
    /// end a raw read gives `EAGAIN` rather than blocking (mlx5 gives `ENOMSG` there).
    /// [`SimDevice::read_data`](crate::MigrationDevice::read_data) is the driver-facing
    /// blocking path and never reports `EAGAIN`: it waits with `poll(POLLIN)` and reads
    /// again, so its outcomes are the same as on a blocking fd.
    pub nonblocking_save: bool,
    /// The resume data fd handed out by STOP→RESUMING is `O_NONBLOCK`. No in-tree driver's
    /// resume fd returns `EAGAIN` (mlx5 loads each image synchronously inside `write()`; mtty
    /// copies into a buffer), but the engine also writes caller-supplied fds (`add_data_fd`),
    /// which may be a non-blocking pipe or socket to a helper process, and those do. With a
    /// slow consumer ([`SimConfig::resume_throughput_bytes_per_sec`]) and a small pipe
    /// ([`SimConfig::resume_pipe_bytes`]), a raw `write(2)` then gives short counts and
    /// `EAGAIN`. [`SimDevice::write_data`](crate::MigrationDevice::write_data) never reports
    /// `EAGAIN`: it waits with `poll(POLLOUT)` and writes again (it may still return a short
    /// count, as a `write(2)` may).
    pub nonblocking_resume: bool,
    /// Average rate at which the destination device consumes its resume stream (a slow
    /// device, like mlx5 loading each image synchronously inside `write()`); `None` is
    /// unpaced. The clock starts at the first byte consumed. With a pipe smaller than the
    /// writer's chunks, the writer then sees a full pipe: blocked (or, with `EINTR`, short)
    /// writes on a blocking fd, short writes and `EAGAIN` with
    /// [`SimConfig::nonblocking_resume`]. Every byte is still verified.
    pub resume_throughput_bytes_per_sec: Option<u64>,
    /// Capacity requested for the resume pipe (`F_SETPIPE_SZ`; the kernel rounds it up to a
    /// power-of-two number of pages, at least one page). Default 1 MiB. Best effort: above
    /// `/proc/sys/fs/pipe-max-size` an unprivileged process keeps the default 64 KiB.
    pub resume_pipe_bytes: usize,
    /// Makes the device **live**: its state is an image of `size` bytes in 4 KiB pages, each
    /// with a version, and while it runs (RUNNING, PRE_COPY, RUNNING_P2P, PRE_COPY_P2P) it
    /// dirties pages at this average rate (bytes per second; each dirtying bumps one page's
    /// version). Its save stream is the base image (exactly the stream of a non-live device)
    /// followed by dirty records, and a destination with the same setting expects and checks
    /// them; see the [module documentation](super#live-devices-dirty-pages-and-dirty-records).
    /// `Some(0)` is a live device that changes only through
    /// [`SimHandle`](super::SimHandle) writes. `None` (the default): the state never changes
    /// and the stream is exactly `fill(seed, 0..size)`.
    pub dirty_rate_bytes_per_sec: Option<u64>,
    /// When dirty records become readable in PRE_COPY (live devices only).
    pub dirty_release: DirtyRelease,
}

impl SimConfig {
    /// A device of `size` stream bytes with content `seed`: every flag, 1 MiB reads,
    /// `min(size, 64 KiB)` of pre-copy data ending in `ENOMSG`, unpaced, a 64-byte config
    /// blob, no faults, blocking data fds, an unpaced consumer behind a 1 MiB resume pipe.
    pub fn new(name: impl Into<String>, size: u64, seed: u64) -> SimConfig {
        SimConfig {
            name: name.into(),
            size,
            seed,
            flags: MigFlags::ALL,
            max_read: 1 << 20,
            precopy_bytes: size.min(64 * 1024),
            precopy_end: PrecopyEnd::NoMsg,
            throughput_bytes_per_sec: None,
            read_latency: None,
            config_len: 64,
            read_error_at: None,
            write_error_at: None,
            fail_arc: None,
            truncate_at: None,
            nonblocking_save: false,
            nonblocking_resume: false,
            resume_throughput_bytes_per_sec: None,
            resume_pipe_bytes: 1 << 20,
            dirty_rate_bytes_per_sec: None,
            dirty_release: DirtyRelease::Continuous,
        }
    }

    /// Sets [`SimConfig::flags`].
    pub fn with_flags(mut self, flags: MigFlags) -> SimConfig {
        self.flags = flags;
        self
    }

    /// Sets [`SimConfig::max_read`].
    pub fn with_max_read(mut self, bytes: usize) -> SimConfig {
        self.max_read = bytes;
        self
    }

    /// Sets [`SimConfig::precopy_bytes`].
    pub fn with_precopy_bytes(mut self, bytes: u64) -> SimConfig {
        self.precopy_bytes = bytes;
        self
    }

    /// Sets [`SimConfig::precopy_end`].
    pub fn with_precopy_end(mut self, end: PrecopyEnd) -> SimConfig {
        self.precopy_end = end;
        self
    }

    /// Sets [`SimConfig::throughput_bytes_per_sec`].
    pub fn with_throughput(mut self, bytes_per_sec: u64) -> SimConfig {
        self.throughput_bytes_per_sec = Some(bytes_per_sec);
        self
    }

    /// Sets [`SimConfig::read_latency`].
    pub fn with_read_latency(mut self, latency: Duration) -> SimConfig {
        self.read_latency = Some(latency);
        self
    }

    /// Sets [`SimConfig::config_len`].
    pub fn with_config_len(mut self, len: usize) -> SimConfig {
        self.config_len = len;
        self
    }

    /// Sets [`SimConfig::read_error_at`].
    pub fn with_read_error_at(mut self, at: u64) -> SimConfig {
        self.read_error_at = Some(at);
        self
    }

    /// Sets [`SimConfig::write_error_at`].
    pub fn with_write_error_at(mut self, at: u64) -> SimConfig {
        self.write_error_at = Some(at);
        self
    }

    /// Sets [`SimConfig::fail_arc`].
    pub fn with_fail_arc(mut self, fault: ArcFault) -> SimConfig {
        self.fail_arc = Some(fault);
        self
    }

    /// Sets [`SimConfig::truncate_at`].
    pub fn with_truncate_at(mut self, at: u64) -> SimConfig {
        self.truncate_at = Some(at);
        self
    }

    /// Sets [`SimConfig::nonblocking_save`].
    pub fn with_nonblocking_save(mut self, on: bool) -> SimConfig {
        self.nonblocking_save = on;
        self
    }

    /// Sets [`SimConfig::nonblocking_resume`].
    pub fn with_nonblocking_resume(mut self, on: bool) -> SimConfig {
        self.nonblocking_resume = on;
        self
    }

    /// Sets [`SimConfig::resume_throughput_bytes_per_sec`].
    pub fn with_resume_throughput(mut self, bytes_per_sec: u64) -> SimConfig {
        self.resume_throughput_bytes_per_sec = Some(bytes_per_sec);
        self
    }

    /// Sets [`SimConfig::resume_pipe_bytes`].
    pub fn with_resume_pipe_bytes(mut self, bytes: usize) -> SimConfig {
        self.resume_pipe_bytes = bytes;
        self
    }

    /// Sets [`SimConfig::dirty_rate_bytes_per_sec`] (a live device).
    pub fn with_dirty_rate(mut self, bytes_per_sec: u64) -> SimConfig {
        self.dirty_rate_bytes_per_sec = Some(bytes_per_sec);
        self
    }

    /// Sets [`SimConfig::dirty_release`].
    pub fn with_dirty_release(mut self, release: DirtyRelease) -> SimConfig {
        self.dirty_release = release;
        self
    }

    /// Whether the device is live ([`SimConfig::dirty_rate_bytes_per_sec`] is set).
    pub fn is_live(&self) -> bool {
        self.dirty_rate_bytes_per_sec.is_some()
    }

    /// Where the save stream ends with EOF: `min(size, truncate_at)`.
    pub fn eof_len(&self) -> u64 {
        self.truncate_at.map_or(self.size, |t| t.min(self.size))
    }

    /// Bytes a full save stream delivers before EOF or the read error.
    pub fn saved_len(&self) -> u64 {
        let eof = self.eof_len();
        self.read_error_at.map_or(eof, |e| e.min(eof))
    }

    /// Bytes of PRE_COPY initial data: `min(precopy_bytes, saved_len())`.
    pub fn precopy_len(&self) -> u64 {
        self.precopy_bytes.min(self.saved_len())
    }

    /// Whether the save fd is a socket that fails (see [`SimConfig::read_error_at`]). A live
    /// device's stream has no fixed length, so there any `read_error_at` not after
    /// `truncate_at` counts.
    pub(super) fn read_error_mode(&self) -> bool {
        if self.is_live() {
            return self.read_error_at.is_some_and(|e| self.truncate_at.is_none_or(|t| e <= t));
        }
        self.read_error_at.is_some_and(|e| e <= self.eof_len())
    }
}
