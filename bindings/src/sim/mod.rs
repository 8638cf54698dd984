//! A simulated migratable device that follows the kernel's VFIO migration semantics.
//!
//! The host kernels this project runs on have no VFIO, so tests and benchmarks drive a
//! [`SimDevice`] instead. It behaves like a VFIO variant driver as seen from user space:
//!
//! * **States and arcs.** [`MigrationDevice::set_state_raw`] walks the kernel's next-step table
//!   ([`crate::state::next_step`]) exactly like a driver's `set_state` loop: one SET may take
//!   several direct arcs, a data fd is returned only when the *final* arc is one of the four
//!   that create one, and a failing arc leaves the device where [`ArcFault::leave`] says.
//! * **Save fd.** The read end of a real pipe (`O_CLOEXEC`, blocking), filled by a producer
//!   thread; io_uring and plain `read(2)` see it like a VFIO data fd (a stream: `pread` gives
//!   `ESPIPE`). PRE_COPY, PRE_COPY_P2P and STOP_COPY share one stream: PRE_COPY streams the
//!   first [`SimConfig::precopy_bytes`], and after →STOP_COPY the same fd continues with the
//!   rest, so the concatenation is byte-identical to a plain STOP_COPY stream. STOP_COPY ends
//!   with `read() == 0`.
//! * **Resume fd.** The write end of a pipe drained by a consumer thread that verifies every
//!   byte against the expected content (seed, size) without keeping a copy.
//! * **Content.** The byte at stream offset `o` is a pure function of `(seed, o)`: see
//!   [`fill`] and [`verify`].
//!
//! # Where a pipe differs from a VFIO fd, and what the sim does about it
//!
//! * **PRE_COPY temporary end.** A VFIO driver answers `ENOMSG` (mlx5) or `0` (mtty) at once.
//!   A pipe cannot: a raw `read(2)` at the temporary end **blocks** until the device moves to
//!   STOP_COPY (more data) or the session ends (EOF). [`SimDevice::read_data`] decodes it
//!   exactly as a driver would ([`ReadOutcome::NoMsg`] or [`ReadOutcome::Eof`] per
//!   [`SimConfig::precopy_end`]). An engine issuing raw reads must stop at the temporary end
//!   using [`MigrationDevice::precopy_info`] (`initial_bytes == 0 && dirty_bytes == 0`), as the
//!   uAPI recommends anyway.
//! * **Disabled files.** When a session ends (leaving the saving group, leaving RESUMING,
//!   reset, drop), [`SimDevice::read_data`] / [`SimDevice::write_data`] on its fd give
//!   `ENODEV` like the kernel. The raw fd itself then sees EOF (save: the producer's end is
//!   closed and the pipe drained) or `EPIPE` (resume: the consumer's end is closed).
//! * **Write past the end.** [`SimDevice::write_data`] refuses a write that would exceed the
//!   expected length with `ENOMEM` (mtty). Raw writes cannot be refused; the consumer then
//!   marks the stream over-long, closes its end (further writes get `EPIPE`) and the
//!   RESUMING→STOP SET fails with `EINVAL`.
//! * **Faults.** [`SimConfig::read_error_at`] turns the save fd into an `AF_UNIX` stream
//!   socket: after N bytes the reader gets `ECONNRESET` (a real kernel error; see
//!   [`SimConfig::read_error_at`]). [`SimConfig::write_error_at`]: the consumer closes its end
//!   after N bytes, so the writer gets `EPIPE` (within one pipe capacity after byte N).

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::device::{MigrationDevice, PrecopyInfo, ReadOutcome};
use crate::error::{Error, Result};
use crate::state::{next_step, MigFlags, MigState};
use crate::sys;

// =============================================================================================
// Content: a pure function of (seed, offset)
// =============================================================================================

/// Bytes in one pattern block.
const BLOCK: usize = 64 * 1024;
/// 64-bit words in one pattern block.
const BLOCK_WORDS: usize = BLOCK / 8;

/// splitmix64 finaliser (Steele, Lea, Flood 2014).
const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Word `i` (0..8192) of the seed's 64 KiB pattern block.
const fn pattern_word(seed: u64, i: u64) -> u64 {
    splitmix64(seed.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ i)
}

/// The key XORed into every word of block `b`.
const fn block_key(seed: u64, b: u64) -> u64 {
    splitmix64(!seed ^ b.wrapping_mul(0xA076_1D64_78BD_642F))
}

/// The 64-bit word at word index `w` (byte offset `8 * w`) of the stream for `seed`.
///
/// The content definition: with `b = w / 8192` and `i = w % 8192`,
/// `word(w) = pattern_word(seed, i) ^ block_key(seed, b)`, and the byte at offset `o` is byte
/// `o % 8` of `word(o / 8)` in little-endian order. Every 64 KiB block differs from every other
/// (its key), and every word within a block differs (the pattern), so reordered, duplicated,
/// shifted or dropped data is detected.
pub fn stream_word(seed: u64, w: u64) -> u64 {
    pattern_word(seed, w % BLOCK_WORDS as u64) ^ block_key(seed, w / BLOCK_WORDS as u64)
}

/// The byte at stream offset `o` for `seed` (slow path; [`fill`] is the fast one).
pub fn stream_byte(seed: u64, o: u64) -> u8 {
    stream_word(seed, o / 8).to_le_bytes()[(o % 8) as usize]
}

thread_local! {
    /// The pattern block of the last seed used on this thread (8192 words, 64 KiB).
    static PATTERN: std::cell::RefCell<(u64, Option<Box<[u64]>>)> =
        const { std::cell::RefCell::new((0, None)) };
}

/// Runs `f` with the pattern block of `seed`, computed once per thread and seed.
fn with_pattern<R>(seed: u64, f: impl FnOnce(&[u64]) -> R) -> R {
    PATTERN.with(|cell| {
        let mut c = cell.borrow_mut();
        if c.1.is_none() || c.0 != seed {
            let p: Box<[u64]> = (0..BLOCK_WORDS as u64).map(|i| pattern_word(seed, i)).collect();
            *c = (seed, Some(p));
        }
        match &c.1 {
            Some(p) => f(p),
            None => f(&[]),
        }
    })
}

/// Reads a little-endian u64 from the first 8 bytes of `b` (which has exactly 8).
#[inline(always)]
fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

/// Fills `buf` with the stream content of `seed` starting at stream offset `offset`.
///
/// Runs at memory speed (several GB/s per core): whole aligned words are one XOR of a cached
/// 64 KiB pattern word and a per-block key. Offsets wrap modulo 2^64.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    with_pattern(seed, |pat| {
        if pat.len() != BLOCK_WORDS {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = stream_byte(seed, offset.wrapping_add(i as u64));
            }
            return;
        }
        let mut o = offset;
        let mut rest = buf;
        // Unaligned head.
        while !rest.is_empty() && o % 8 != 0 {
            rest[0] = stream_byte(seed, o);
            rest = &mut rest[1..];
            o = o.wrapping_add(1);
        }
        // Aligned words, one block segment at a time.
        while rest.len() >= 8 {
            let w = o / 8;
            let i = (w % BLOCK_WORDS as u64) as usize;
            let key = block_key(seed, w / BLOCK_WORDS as u64);
            let n = (BLOCK_WORDS - i).min(rest.len() / 8);
            let (seg, tail) = rest.split_at_mut(n * 8);
            for (dst, &pw) in seg.chunks_exact_mut(8).zip(&pat[i..i + n]) {
                dst.copy_from_slice(&(pw ^ key).to_le_bytes());
            }
            rest = tail;
            o = o.wrapping_add((n * 8) as u64);
        }
        // Tail.
        for b in rest.iter_mut() {
            *b = stream_byte(seed, o);
            o = o.wrapping_add(1);
        }
    })
}

/// Checks that `buf` holds the stream content of `seed` starting at stream offset `offset`.
///
/// # Errors
/// `Err(i)`: the index **in `buf`** of the first byte that differs (its stream offset is
/// `offset + i`).
pub fn verify(seed: u64, offset: u64, buf: &[u8]) -> Result<(), usize> {
    with_pattern(seed, |pat| {
        let first_bad_byte = |from: usize, o: u64, len: usize| -> Option<usize> {
            (0..len).find(|&k| buf[from + k] != stream_byte(seed, o.wrapping_add(k as u64))).map(|k| from + k)
        };
        if pat.len() != BLOCK_WORDS {
            return match first_bad_byte(0, offset, buf.len()) {
                Some(i) => Err(i),
                None => Ok(()),
            };
        }
        let mut pos = 0usize;
        let mut o = offset;
        // Unaligned head.
        let head = ((8 - (o % 8)) % 8).min(buf.len() as u64) as usize;
        if let Some(i) = first_bad_byte(0, o, head) {
            return Err(i);
        }
        pos += head;
        o = o.wrapping_add(head as u64);
        // Aligned words, one block segment at a time.
        while buf.len() - pos >= 8 {
            let w = o / 8;
            let i = (w % BLOCK_WORDS as u64) as usize;
            let key = block_key(seed, w / BLOCK_WORDS as u64);
            let n = (BLOCK_WORDS - i).min((buf.len() - pos) / 8);
            let seg = &buf[pos..pos + n * 8];
            // Compare 8 words at a time with a branch per group: vectorises, and a mismatch
            // is located exactly below.
            let mut bad = false;
            let pw = &pat[i..i + n];
            let mut groups = seg.chunks_exact(64).zip(pw.chunks_exact(8));
            for (g, p) in &mut groups {
                let mut acc = 0u64;
                for k in 0..8 {
                    acc |= le64(&g[k * 8..k * 8 + 8]) ^ p[k] ^ key;
                }
                if acc != 0 {
                    bad = true;
                    break;
                }
            }
            if !bad {
                let done = (n / 8) * 8;
                for (k, &p) in pw.iter().enumerate().skip(done) {
                    if le64(&seg[k * 8..k * 8 + 8]) != p ^ key {
                        bad = true;
                        break;
                    }
                }
            }
            if bad {
                if let Some(idx) = first_bad_byte(pos, o, n * 8) {
                    return Err(idx);
                }
            }
            pos += n * 8;
            o = o.wrapping_add((n * 8) as u64);
        }
        match first_bad_byte(pos, o, buf.len() - pos) {
            Some(i) => Err(i),
            None => Ok(()),
        }
    })
}

// =============================================================================================
// Configuration
// =============================================================================================

/// What a read at the temporary end of the PRE_COPY stream returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrecopyEnd {
    /// `-ENOMSG`, as the uAPI text says and mlx5 does.
    #[default]
    NoMsg,
    /// `0`, as mtty does.
    Zero,
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
    /// STOP_COPY stream length in bytes (also what MIG_DATA_SIZE reports).
    pub size: u64,
    /// Content seed: the stream is [`fill`]`(seed, 0, ..size)`.
    pub seed: u64,
    /// Migration flags the device reports. Without STOP_COPY it is "not migratable".
    pub flags: MigFlags,
    /// Upper bound on the bytes one read returns. Implemented as the save pipe's capacity
    /// (`F_SETPIPE_SZ`, rounded up by the kernel to a power-of-two number of pages, at least
    /// one page), and as a cap in [`SimDevice::read_data`], which is therefore exact. Raw
    /// reads are bounded by the pipe capacity (`max_read` rounded up). In read-error mode (a
    /// socket, see [`SimConfig::read_error_at`]) only the `read_data` cap applies.
    pub max_read: usize,
    /// Bytes of initial data available in PRE_COPY (clamped to the stream length).
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
    /// then sets `ECONNRESET` on the reader, reported once its queue is empty.
    pub read_error_at: Option<u64>,
    /// The resume stream fails after this many bytes: the consumer closes its end of the
    /// pipe, so the writer gets `EPIPE`.
    pub write_error_at: Option<u64>,
    /// A direct arc that fails.
    pub fail_arc: Option<ArcFault>,
    /// The save stream ends early with EOF after this many bytes (a truncated stream).
    pub truncate_at: Option<u64>,
}

impl SimConfig {
    /// A device of `size` stream bytes with content `seed`: every flag, 1 MiB reads,
    /// `min(size, 64 KiB)` of pre-copy data ending in `ENOMSG`, unpaced, a 64-byte config
    /// blob, no faults.
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

    /// Whether the save fd is a socket that fails (see [`SimConfig::read_error_at`]).
    fn read_error_mode(&self) -> bool {
        self.read_error_at.is_some_and(|e| e <= self.eof_len())
    }
}

// =============================================================================================
// Config blob
// =============================================================================================

/// Magic at the start of a simulated config blob.
pub const SIM_CONFIG_MAGIC: [u8; 8] = *b"VFSIMCF1";
/// Header of a simulated config blob: magic (8) + total length as LE u32 (4) + reserved (4).
pub const SIM_CONFIG_HEADER: usize = 16;
/// Salt that separates config-blob content from stream content of the same seed.
const CONFIG_SALT: u64 = 0xC0F1_6C0F_1600_0001;

/// The config blob a source with `cfg` saves, and so what a destination with `cfg` expects:
/// [`SIM_CONFIG_MAGIC`], the total length (`max(config_len, 16)`, LE u32, saturating), four
/// zero bytes, then [`fill`]`(seed ^ salt, 0, ..)`.
pub fn expected_config(cfg: &SimConfig) -> Vec<u8> {
    let len = cfg.config_len.clamp(SIM_CONFIG_HEADER, u32::MAX as usize);
    let mut v = vec![0u8; len];
    v[..8].copy_from_slice(&SIM_CONFIG_MAGIC);
    v[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    fill(cfg.seed ^ CONFIG_SALT, 0, &mut v[SIM_CONFIG_HEADER..]);
    v
}

// =============================================================================================
// Save session: a producer thread filling a pipe (or, in read-error mode, a socket)
// =============================================================================================

/// Control shared between the device and its producer thread.
#[derive(Debug)]
struct SaveShared {
    /// End the session now.
    stop: AtomicBool,
    /// The device is in STOP_COPY: produce up to the end and close.
    finale: AtomicBool,
    /// Bytes written into the fd so far. Updated under `io_lock` together with the write
    /// itself, so `produced - FIONREAD` taken under the same lock is the exact number of bytes
    /// the reader has consumed (a reader can't drain bytes the count doesn't yet include).
    produced: AtomicU64,
    /// Held by the producer across one `write` + `produced` update, and by the device while it
    /// snapshots `produced` and FIONREAD.
    io_lock: Mutex<()>,
    /// The producer has exited (EOF or error delivered, or stopped).
    done: AtomicBool,
    /// Wakes the producer (control changed).
    wake: OwnedFd,
}

/// Parameters the producer thread needs.
#[derive(Debug, Clone)]
struct ProducerParams {
    seed: u64,
    precopy_len: u64,
    eof_len: u64,
    error_at: Option<u64>,
    chunk: usize,
    throughput: Option<u64>,
    latency: Option<Duration>,
}

/// One save session (PRE_COPY..STOP_COPY), alive until the device leaves the saving group.
#[derive(Debug)]
struct SaveSession {
    shared: Arc<SaveShared>,
    /// Our dup of the reader's end: for FIONREAD, and to drain the stream when it ends.
    reader: OwnedFd,
    /// Identity of the session's fd.
    id: (u64, u64),
    precopy_len: u64,
    thread: Option<JoinHandle<()>>,
}

/// Rounds a requested read cap to a pipe capacity: a power-of-two number of pages.
fn pipe_capacity_for(max_read: usize) -> usize {
    let page = sys::page_size();
    let pages = max_read.max(1).div_ceil(page);
    pages.checked_next_power_of_two().and_then(|p| p.checked_mul(page)).unwrap_or(1 << 20)
}

impl SaveSession {
    /// Creates the fd and starts the producer. `finale` is true for STOP→STOP_COPY.
    fn start(cfg: &SimConfig, finale: bool) -> io::Result<(SaveSession, OwnedFd)> {
        let socket = cfg.read_error_mode();
        let (caller_end, producer_end) = if socket { sys::socketpair_stream()? } else { sys::pipe()? };
        let mut chunk = cfg.max_read.clamp(1, 8 << 20);
        if !socket {
            let want = pipe_capacity_for(cfg.max_read);
            // Best effort: above /proc/sys/fs/pipe-max-size an unprivileged process gets
            // EPERM; the cap in read_data still holds then.
            let _ = sys::set_pipe_size(producer_end.as_fd(), want);
            chunk = sys::pipe_size(producer_end.as_fd()).unwrap_or(chunk).clamp(1, 8 << 20);
        }
        sys::set_nonblocking(producer_end.as_fd())?;
        let reader = caller_end.try_clone()?;
        let trick_end = if socket { Some(caller_end.try_clone()?) } else { None };
        let id = sys::file_id(caller_end.as_fd())?;
        let shared = Arc::new(SaveShared {
            stop: AtomicBool::new(false),
            finale: AtomicBool::new(finale),
            produced: AtomicU64::new(0),
            io_lock: Mutex::new(()),
            done: AtomicBool::new(false),
            wake: sys::eventfd()?,
        });
        let params = ProducerParams {
            seed: cfg.seed,
            precopy_len: cfg.precopy_len(),
            eof_len: cfg.eof_len(),
            error_at: if socket { cfg.read_error_at } else { None },
            chunk,
            throughput: cfg.throughput_bytes_per_sec.filter(|&r| r > 0),
            latency: cfg.read_latency,
        };
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name(format!("sim-save-{}", cfg.name)).spawn(move || {
            produce(&sh, &params, producer_end, trick_end, socket);
            sh.done.store(true, Ordering::Release);
        })?;
        Ok((SaveSession { shared, reader, id, precopy_len: cfg.precopy_len(), thread: Some(thread) }, caller_end))
    }

    /// PRE_COPY(_P2P) → STOP_COPY: the same stream continues to the end.
    fn enter_stop_copy(&self) {
        self.shared.finale.store(true, Ordering::Release);
        sys::eventfd_signal(self.shared.wake.as_fd());
    }

    /// Bytes the reader has consumed so far: produced minus what is still queued, taken
    /// atomically with respect to the producer's writes (exact, never a stale count).
    fn consumed(&self) -> u64 {
        let _g = self.shared.io_lock.lock().unwrap_or_else(|p| p.into_inner());
        let p = self.shared.produced.load(Ordering::Acquire);
        p.saturating_sub(sys::fionread(self.reader.as_fd()).unwrap_or(0) as u64)
    }

    /// Whether a read now would be at the PRE_COPY temporary end: every pre-copy byte is
    /// produced and the reader has taken them all. Exact: in PRE_COPY the producer writes
    /// nothing past `precopy_len`, and the check is atomic with its writes.
    fn at_precopy_end(&self) -> bool {
        let _g = self.shared.io_lock.lock().unwrap_or_else(|p| p.into_inner());
        !self.shared.done.load(Ordering::Acquire)
            && !self.shared.finale.load(Ordering::Acquire)
            && self.shared.produced.load(Ordering::Acquire) >= self.precopy_len
            && sys::fionread(self.reader.as_fd()).unwrap_or(1) == 0
    }

    /// Ends the session: stops and joins the producer (which closes its end), then drains
    /// what is still queued so the caller's raw fd sees EOF. Returns the bytes consumed.
    fn end(mut self) -> u64 {
        self.shared.stop.store(true, Ordering::Release);
        sys::eventfd_signal(self.shared.wake.as_fd());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let consumed = self.consumed();
        let mut scratch = vec![0u8; 64 * 1024];
        // No writer remains, so these reads never block; bound the loop anyway.
        for _ in 0..1_000_000 {
            match sys::SysOps::read(&sys::Kernel, self.reader.as_fd(), &mut scratch) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {}
                Err(_) => break,
            }
        }
        consumed
    }
}

impl Drop for SaveSession {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        sys::eventfd_signal(self.shared.wake.as_fd());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until the wake eventfd fires or `timeout` passes (`None`: forever); resets it.
fn wait_wake(wake: BorrowedFd<'_>, timeout: Option<Duration>) {
    let ms = timeout.map_or(-1, |d| {
        let ms = d.as_millis().min(i32::MAX as u128) as i32;
        if ms == 0 && !d.is_zero() {
            1
        } else {
            ms
        }
    });
    let mut p = [libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&wake), events: libc::POLLIN, revents: 0 }];
    let _ = sys::poll(&mut p, ms);
    sys::eventfd_drain(wake);
}

/// Sleeps for `d` unless the session is stopped first; returns false if stopped.
fn paced_sleep(sh: &SaveShared, d: Duration) -> bool {
    let until = Instant::now() + d;
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        wait_wake(sh.wake.as_fd(), Some(until - now));
    }
}

/// The producer thread's body.
fn produce(sh: &SaveShared, p: &ProducerParams, out: OwnedFd, trick_end: Option<OwnedFd>, socket: bool) {
    let mut buf = vec![0u8; p.chunk];
    let start = Instant::now();
    let mut produced = 0u64;
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        let finale = sh.finale.load(Ordering::Acquire);
        if p.error_at == Some(produced) {
            // Real kernel error for the reader: put a byte in our own receive queue and
            // close our end with it unread, so the kernel sets ECONNRESET on the peer.
            if let Some(t) = &trick_end {
                let _ = sys::send_nosignal(t.as_fd(), &[0xEE]);
            }
            drop(trick_end);
            drop(out);
            return;
        }
        let end = p.error_at.map_or(p.eof_len, |e| e.min(p.eof_len));
        if finale && produced >= end {
            drop(out); // EOF for the reader once it has drained the pipe.
            return;
        }
        let limit = if finale { end } else { p.precopy_len.min(end) };
        if produced >= limit {
            wait_wake(sh.wake.as_fd(), None);
            continue;
        }
        if let Some(lat) = p.latency {
            if !paced_sleep(sh, lat) {
                return;
            }
        }
        let n = (limit - produced).min(p.chunk as u64) as usize;
        let data = &mut buf[..n];
        fill(p.seed, produced, data);
        let mut off = 0usize;
        while off < n {
            if sh.stop.load(Ordering::Acquire) {
                return;
            }
            // The fd is non-blocking, so the lock is held for one short copy only.
            let guard = sh.io_lock.lock().unwrap_or_else(|p| p.into_inner());
            let r = if socket {
                sys::send_nosignal(out.as_fd(), &data[off..])
            } else {
                sys::SysOps::write(&sys::Kernel, out.as_fd(), &data[off..])
            };
            if let Ok(k) = r {
                produced += k as u64;
                sh.produced.store(produced, Ordering::Release);
            }
            drop(guard);
            match r {
                Ok(k) => off += k,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    let mut fds = [
                        libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&out), events: libc::POLLOUT, revents: 0 },
                        libc::pollfd {
                            fd: std::os::fd::AsRawFd::as_raw_fd(&sh.wake),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    let _ = sys::poll(&mut fds, -1);
                    if fds[1].revents != 0 {
                        sys::eventfd_drain(sh.wake.as_fd());
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // EPIPE / ECONNRESET: the reader closed its fd; nothing more to do.
                Err(_) => return,
            }
        }
        if let Some(rate) = p.throughput {
            let due = Duration::from_secs_f64(produced as f64 / rate as f64);
            let el = start.elapsed();
            if due > el && !paced_sleep(sh, due - el) {
                return;
            }
        }
    }
}

// =============================================================================================
// Resume session: a consumer thread draining and verifying a pipe
// =============================================================================================

/// What the consumer has seen of a resume stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumeReport {
    /// Bytes written into the resume fd that the device consumed.
    pub bytes_written: u64,
    /// Every byte matched, no byte was missing and none was extra.
    pub verified_ok: bool,
    /// Stream offset of the first byte that did not match, if any.
    pub first_bad_offset: Option<u64>,
}

/// Consumer progress, guarded by `ResumeShared::ctl`.
#[derive(Debug, Default)]
struct ResumeCtl {
    stop: bool,
    drain_req: u64,
    drained: u64,
    bytes: u64,
    first_bad: Option<u64>,
    overflow: bool,
    closed: bool,
}

/// Control shared between the device and its consumer thread.
#[derive(Debug)]
struct ResumeShared {
    ctl: Mutex<ResumeCtl>,
    cv: Condvar,
    wake: OwnedFd,
}

impl ResumeShared {
    fn lock(&self) -> MutexGuard<'_, ResumeCtl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One resume session (RESUMING).
#[derive(Debug)]
struct ResumeSession {
    shared: Arc<ResumeShared>,
    id: (u64, u64),
    size: u64,
    /// Bytes accepted by [`SimDevice::write_data`] (raw writes are not counted here).
    accepted: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

impl ResumeSession {
    fn start(cfg: &SimConfig) -> io::Result<(ResumeSession, OwnedFd)> {
        let (r, w) = sys::pipe()?;
        let _ = sys::set_pipe_size(r.as_fd(), 1 << 20);
        sys::set_nonblocking(r.as_fd())?;
        let id = sys::file_id(w.as_fd())?;
        let shared =
            Arc::new(ResumeShared { ctl: Mutex::new(ResumeCtl::default()), cv: Condvar::new(), wake: sys::eventfd()? });
        let sh = Arc::clone(&shared);
        let (seed, size, fail_at) = (cfg.seed, cfg.size, cfg.write_error_at);
        let thread = std::thread::Builder::new()
            .name(format!("sim-resume-{}", cfg.name))
            .spawn(move || consume(&sh, r, seed, size, fail_at))?;
        Ok((ResumeSession { shared, id, size: cfg.size, accepted: AtomicU64::new(0), thread: Some(thread) }, w))
    }

    /// Snapshot without draining.
    fn report(&self) -> (ResumeReport, bool) {
        let c = self.shared.lock();
        let ok = c.first_bad.is_none() && !c.overflow && c.bytes == self.size;
        (ResumeReport { bytes_written: c.bytes, verified_ok: ok, first_bad_offset: c.first_bad }, c.overflow)
    }

    /// Makes the consumer drain everything queued, then reports.
    fn drain_and_report(&self) -> io::Result<(ResumeReport, bool)> {
        let req = {
            let mut c = self.shared.lock();
            c.drain_req += 1;
            c.drain_req
        };
        sys::eventfd_signal(self.shared.wake.as_fd());
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut c = self.shared.lock();
        while c.drained < req {
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
            }
            c = match self.shared.cv.wait_timeout(c, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        drop(c);
        Ok(self.report())
    }

    fn stop(&mut self) {
        self.shared.lock().stop = true;
        sys::eventfd_signal(self.shared.wake.as_fd());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ResumeSession {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Verifies and counts one chunk the consumer read; returns false to close the read end.
fn take_chunk(sh: &ResumeShared, seed: u64, size: u64, fail_at: Option<u64>, data: &[u8]) -> bool {
    let mut c = sh.lock();
    let at = c.bytes;
    let n = data.len() as u64;
    let in_range = size.saturating_sub(at).min(n) as usize;
    if c.first_bad.is_none() {
        if let Err(i) = verify(seed, at, &data[..in_range]) {
            c.first_bad = Some(at + i as u64);
        }
    }
    c.bytes = at.saturating_add(n);
    if in_range < data.len() {
        c.overflow = true;
        c.closed = true;
        return false;
    }
    if fail_at.is_some_and(|f| c.bytes >= f) {
        c.closed = true;
        return false;
    }
    true
}

/// The consumer thread's body: drain the pipe, verify, count; answer drain requests.
fn consume(sh: &ResumeShared, r: OwnedFd, seed: u64, size: u64, fail_at: Option<u64>) {
    let mut buf = vec![0u8; 1 << 20];
    let mut rfd = Some(r);
    if fail_at == Some(0) {
        sh.lock().closed = true;
        rfd = None;
    }
    let mut eof = false;
    // Reads what is queued now; returns when the pipe is empty (EAGAIN) or closed.
    let mut read_some = |rfd: &mut Option<OwnedFd>, eof: &mut bool, until_empty: bool| {
        while let Some(fd) = rfd.as_ref() {
            let bytes = sh.lock().bytes;
            let cap = fail_at.map_or(buf.len() as u64, |f| f.saturating_sub(bytes).min(buf.len() as u64));
            let cap = cap.max(1) as usize;
            match sys::SysOps::read(&sys::Kernel, fd.as_fd(), &mut buf[..cap]) {
                Ok(0) => {
                    *eof = true;
                    return;
                }
                Ok(n) => {
                    if !take_chunk(sh, seed, size, fail_at, &buf[..n]) {
                        *rfd = None; // writers now get EPIPE
                        return;
                    }
                    if !until_empty {
                        return;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => return, // EAGAIN: empty for now
            }
        }
    };
    loop {
        let (stop, want) = {
            let c = sh.lock();
            (c.stop, c.drain_req)
        };
        if stop {
            return;
        }
        if want > sh.lock().drained {
            read_some(&mut rfd, &mut eof, true);
            let mut c = sh.lock();
            c.drained = want;
            drop(c);
            sh.cv.notify_all();
            continue;
        }
        let mut fds = [
            libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&sh.wake), events: libc::POLLIN, revents: 0 },
            libc::pollfd {
                fd: match (&rfd, eof) {
                    (Some(fd), false) => std::os::fd::AsRawFd::as_raw_fd(fd),
                    _ => -1, // poll ignores negative fds
                },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let _ = sys::poll(&mut fds, -1);
        if fds[0].revents != 0 {
            sys::eventfd_drain(sh.wake.as_fd());
        }
        if fds[1].revents != 0 {
            read_some(&mut rfd, &mut eof, false);
        }
    }
}

// =============================================================================================
// The device
// =============================================================================================

/// A simulated VFIO migratable device. See the [module documentation](self).
///
/// `Send`, so the engine can move it into a per-device thread. Dropping it ends every session
/// and joins every thread it started; fds it handed out stay the caller's to close.
pub struct SimDevice {
    cfg: SimConfig,
    state: MigState,
    save: Option<SaveSession>,
    resume: Option<ResumeSession>,
    arcs: Vec<(MigState, MigState)>,
    last_resume: Option<ResumeReport>,
    last_bytes_read: u64,
    applied_config: Option<Vec<u8>>,
    precopy_v2: bool,
    resets: u32,
}

impl fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimDevice")
            .field("name", &self.cfg.name)
            .field("state", &self.state)
            .field("size", &self.cfg.size)
            .field("seed", &self.cfg.seed)
            .field("save_session", &self.save.is_some())
            .field("resume_session", &self.resume.is_some())
            .finish()
    }
}

impl SimDevice {
    /// A device in RUNNING with the given parameters. No thread or fd exists until a session
    /// starts.
    pub fn new(cfg: SimConfig) -> SimDevice {
        SimDevice {
            cfg,
            state: MigState::Running,
            save: None,
            resume: None,
            arcs: Vec::new(),
            last_resume: None,
            last_bytes_read: 0,
            applied_config: None,
            precopy_v2: false,
            resets: 0,
        }
    }

    /// The parameters the device was made with.
    pub fn sim_config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Every direct arc taken so far, in order, including each arc inside a multi-arc SET.
    /// A failed arc is not listed; a reset is not an arc (see [`SimDevice::reset_count`]).
    pub fn transitions(&self) -> Vec<(MigState, MigState)> {
        self.arcs.clone()
    }

    /// How many times [`MigrationDevice::reset`] was called.
    pub fn reset_count(&self) -> u32 {
        self.resets
    }

    /// The resume stream's report: live while RESUMING (bytes consumed so far), else the last
    /// session's (as of its last RESUMING→STOP attempt or its end). `None` before any resume.
    pub fn resume_report(&self) -> Option<ResumeReport> {
        match &self.resume {
            Some(s) => Some(s.report().0),
            None => self.last_resume,
        }
    }

    /// Bytes the reader has consumed from the current save stream, or from the last one once
    /// it ended (raw `read(2)`s and io_uring reads included).
    pub fn bytes_read(&self) -> u64 {
        match &self.save {
            Some(s) => s.consumed(),
            None => self.last_bytes_read,
        }
    }

    /// The config blob applied by [`MigrationDevice::load_config`], if any.
    pub fn config(&self) -> Option<Vec<u8>> {
        self.applied_config.clone()
    }

    /// The config blob a device with `cfg` saves (and a destination with `cfg` expects).
    pub fn expected_config(cfg: &SimConfig) -> Vec<u8> {
        expected_config(cfg)
    }

    fn err(&self, op: impl Into<String>, errno: i32) -> Error {
        Error::sys(&self.cfg.name, op, errno)
    }

    fn end_save(&mut self) {
        if let Some(s) = self.save.take() {
            self.last_bytes_read = s.end();
        }
    }

    fn end_resume(&mut self) {
        if let Some(mut s) = self.resume.take() {
            s.stop();
            self.last_resume = Some(s.report().0);
        }
    }

    fn end_all(&mut self) {
        self.end_save();
        self.end_resume();
    }

    /// One direct arc, as a driver's `step_state` does it.
    fn step(&mut self, from: MigState, to: MigState) -> Result<Option<OwnedFd>> {
        use MigState::{PreCopy, PreCopyP2p, Resuming, Running, RunningP2p, Stop, StopCopy};
        let op = || format!("VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE arc {from} -> {to}");
        if let Some(f) = self.cfg.fail_arc.filter(|f| f.from == from && f.to == to) {
            if f.leave == FaultLeave::Error {
                self.end_all();
                self.state = MigState::Error;
            }
            return Err(self.err(format!("{} (injected fault)", op()), f.errno));
        }
        let mut fd = None;
        match (from, to) {
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) | (Stop, StopCopy) => {
                self.end_save();
                let (s, f) = SaveSession::start(&self.cfg, to == StopCopy).map_err(|e| Error::Sys {
                    device: self.cfg.name.clone(),
                    op: op(),
                    source: e,
                })?;
                self.save = Some(s);
                fd = Some(f);
            }
            (PreCopy, StopCopy) | (PreCopyP2p, StopCopy) => {
                if let Some(s) = &self.save {
                    s.enter_stop_copy();
                }
            }
            (StopCopy, Stop) | (PreCopy, Running) | (PreCopyP2p, RunningP2p) => self.end_save(),
            (Stop, Resuming) => {
                self.end_resume();
                let (s, f) = ResumeSession::start(&self.cfg).map_err(|e| Error::Sys {
                    device: self.cfg.name.clone(),
                    op: op(),
                    source: e,
                })?;
                self.resume = Some(s);
                fd = Some(f);
            }
            (Resuming, Stop) => {
                let Some(s) = &self.resume else {
                    return Err(self.err(op(), libc::EINVAL));
                };
                let (rep, overflow) = s.drain_and_report().map_err(|e| Error::Sys {
                    device: self.cfg.name.clone(),
                    op: op(),
                    source: e,
                })?;
                self.last_resume = Some(rep);
                if !rep.verified_ok {
                    let why = if let Some(b) = rep.first_bad_offset {
                        format!("resume stream content differs from the expected at offset {b}")
                    } else if overflow {
                        format!(
                            "resume stream is longer than the expected {} bytes ({} written)",
                            self.cfg.size, rep.bytes_written
                        )
                    } else {
                        format!("resume stream is short: {} of {} bytes", rep.bytes_written, self.cfg.size)
                    };
                    // Like mtty: EINVAL, the device stays in RESUMING with its file open.
                    return Err(self.err(format!("{} ({why})", op()), libc::EINVAL));
                }
                self.end_resume();
            }
            _ => {}
        }
        self.arcs.push((from, to));
        self.state = to;
        Ok(fd)
    }

    /// Which session `fd` belongs to.
    fn classify(&self, fd: BorrowedFd<'_>) -> FdKind {
        let Ok(id) = sys::file_id(fd) else {
            return FdKind::Other;
        };
        if self.save.as_ref().is_some_and(|s| s.id == id) {
            FdKind::Save
        } else if self.resume.as_ref().is_some_and(|s| s.id == id) {
            FdKind::Resume
        } else {
            FdKind::Other
        }
    }
}

/// Which live session an fd belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FdKind {
    Save,
    Resume,
    /// An ended session's fd, or a foreign one: the kernel's "disabled file".
    Other,
}

/// Bounded retries of a syscall interrupted by a signal.
const EINTR_RETRIES: u32 = 16;

impl MigrationDevice for SimDevice {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn migration_flags(&self) -> Result<MigFlags> {
        if !self.cfg.flags.contains(MigFlags::STOP_COPY) {
            return Err(Error::NotMigratable {
                device: self.cfg.name.clone(),
                reason: format!("migration flags {} lack STOP_COPY", self.cfg.flags),
            });
        }
        Ok(self.cfg.flags)
    }

    fn state(&self) -> Result<MigState> {
        if !self.cfg.flags.contains(MigFlags::STOP_COPY) {
            return Err(self.err("VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE", libc::ENOTTY));
        }
        Ok(self.state)
    }

    fn set_state_raw(&mut self, target: MigState) -> Result<Option<OwnedFd>> {
        let flags = self.cfg.flags;
        if !flags.contains(MigFlags::STOP_COPY) {
            return Err(self.err("VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE", libc::ENOTTY));
        }
        let mut fd: Option<OwnedFd> = None;
        while self.state != target {
            let Some(next) = next_step(flags, self.state, target) else {
                return Err(self.err(
                    format!("VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE={target} from {}", self.state),
                    libc::EINVAL,
                ));
            };
            let from = self.state;
            fd = self.step(from, next)?;
            if fd.is_some() && self.state != target {
                // The kernel WARNs and fails: an fd can only be made on the final arc.
                return Err(self.err(
                    format!("VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE={target}: fd on a non-final arc"),
                    libc::EINVAL,
                ));
            }
        }
        Ok(fd)
    }

    fn stop_copy_size(&self) -> Result<u64> {
        Ok(self.cfg.size)
    }

    fn precopy_info(&self, data_fd: BorrowedFd<'_>) -> Result<PrecopyInfo> {
        let op = "VFIO_MIG_GET_PRECOPY_INFO";
        let kind = self.classify(data_fd);
        if kind == FdKind::Resume {
            return Err(self.err(op, libc::ENOTTY));
        }
        if !matches!(self.state, MigState::PreCopy | MigState::PreCopyP2p) {
            return Err(self.err(op, libc::EINVAL));
        }
        let Some(s) = self.save.as_ref().filter(|_| kind == FdKind::Save) else {
            return Err(self.err(op, libc::ENODEV));
        };
        Ok(PrecopyInfo { initial_bytes: s.precopy_len.saturating_sub(s.consumed()), dirty_bytes: 0, reinit: false })
    }

    fn enable_precopy_info_v2(&mut self) -> Result<bool> {
        // The kernel answers EINVAL without PRE_COPY, which the real device maps to false.
        self.precopy_v2 = self.cfg.flags.contains(MigFlags::PRE_COPY);
        Ok(self.precopy_v2)
    }

    fn reset(&mut self) -> Result<()> {
        self.end_all();
        self.state = MigState::Running;
        self.resets = self.resets.saturating_add(1);
        Ok(())
    }

    fn read_data(&self, data_fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<ReadOutcome> {
        let op = "read(save data fd)";
        match self.classify(data_fd) {
            FdKind::Save => {}
            FdKind::Resume => return Err(self.err(op, libc::EINVAL)),
            FdKind::Other => return Err(self.err(op, libc::ENODEV)),
        }
        let Some(s) = &self.save else {
            return Err(self.err(op, libc::ENODEV));
        };
        if buf.is_empty() {
            return Ok(ReadOutcome::Eof);
        }
        if matches!(self.state, MigState::PreCopy | MigState::PreCopyP2p) && s.at_precopy_end() {
            return match self.cfg.precopy_end {
                PrecopyEnd::NoMsg => Ok(ReadOutcome::NoMsg),
                PrecopyEnd::Zero => Ok(ReadOutcome::Eof),
            };
        }
        let cap = buf.len().min(self.cfg.max_read.max(1));
        let mut tries = 0;
        loop {
            match sys::SysOps::read(&sys::Kernel, data_fd, &mut buf[..cap]) {
                Ok(0) => return Ok(ReadOutcome::Eof),
                Ok(n) => return Ok(ReadOutcome::Data(n)),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) && tries < EINTR_RETRIES => tries += 1,
                Err(e) => return Err(Error::Sys { device: self.cfg.name.clone(), op: op.into(), source: e }),
            }
        }
    }

    fn write_data(&self, data_fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize> {
        let op = "write(resume data fd)";
        match self.classify(data_fd) {
            FdKind::Resume => {}
            FdKind::Save => return Err(self.err(op, libc::EINVAL)),
            FdKind::Other => return Err(self.err(op, libc::ENODEV)),
        }
        let Some(s) = &self.resume else {
            return Err(self.err(op, libc::ENODEV));
        };
        let have = s.accepted.load(Ordering::Acquire).max(s.shared.lock().bytes);
        let fits = have.checked_add(buf.len() as u64).is_some_and(|end| end <= s.size);
        if !fits {
            return Err(self.err(op, libc::ENOMEM));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let mut tries = 0;
        loop {
            match sys::SysOps::write(&sys::Kernel, data_fd, buf) {
                Ok(n) => {
                    s.accepted.fetch_add(n as u64, Ordering::AcqRel);
                    return Ok(n);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) && tries < EINTR_RETRIES => tries += 1,
                Err(e) => return Err(Error::Sys { device: self.cfg.name.clone(), op: op.into(), source: e }),
            }
        }
    }

    fn save_config(&mut self) -> Result<Vec<u8>> {
        Ok(expected_config(&self.cfg))
    }

    fn load_config(&mut self, blob: &[u8]) -> Result<()> {
        let bad = |reason: String| Error::BadConfig { device: self.cfg.name.clone(), reason };
        if blob.len() < SIM_CONFIG_HEADER {
            return Err(bad(format!("blob of {} bytes is shorter than its 16-byte header", blob.len())));
        }
        if blob[..8] != SIM_CONFIG_MAGIC {
            return Err(bad(format!("bad magic {:02x?}", &blob[..8])));
        }
        let stated = u32::from_le_bytes([blob[8], blob[9], blob[10], blob[11]]) as usize;
        if stated != blob.len() {
            return Err(bad(format!("header says {stated} bytes, blob has {}", blob.len())));
        }
        let want = self.cfg.config_len.clamp(SIM_CONFIG_HEADER, u32::MAX as usize);
        if blob.len() != want {
            return Err(bad(format!("blob has {} bytes, this device expects {want}", blob.len())));
        }
        self.applied_config = Some(blob.to_vec());
        Ok(())
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        // Session drops stop and join their threads; this also drains the save pipe.
        self.end_all();
    }
}
