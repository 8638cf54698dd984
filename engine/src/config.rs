//! Configuration of a source and a receiver. Every knob has a bound.

use std::time::Duration;

use crate::error::Error;
use crate::wire::{Uuid, MAX_CHANNELS};

/// A builder setter: `pub fn field(mut self, v: T) -> Self`, with its doc comment.
macro_rules! setter {
    ($(#[doc = $doc:expr])* $name:ident: $ty:ty) => {
        $(#[doc = $doc])*
        pub fn $name(mut self, v: $ty) -> Self {
            self.$name = v;
            self
        }
    };
}

/// Which I/O backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// io_uring when a ring can be set up, else the blocking backend (with a message saying why).
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// Plain blocking system calls.
    Blocking,
}

/// Whether to send with `IORING_OP_SEND_ZC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroCopy {
    /// Where it can pay off: the kernel supports it and every channel is TCP to a peer that is
    /// not on the loopback network (loopback always copies, and holds each buffer until the
    /// peer reads it, so SEND_ZC is only slower there).
    #[default]
    Auto,
    /// Always (fails where impossible).
    On,
    /// Never.
    Off,
}

/// Largest chunk (bytes of device data per packet) a source may use.
pub const MAX_CHUNK_BYTES: usize = 64 << 20;
/// Largest number of buffers per device thread.
pub const MAX_BUFFERS_PER_DEVICE: usize = 64;
/// Largest number of devices in one transfer.
pub const MAX_DEVICES: usize = 64;

/// Source settings. Defaults: 1 MiB chunks (QEMU's), 2 buffers per device (reading chunk n+1
/// while chunk n is sent; deeper read-ahead only evicts the data from the CPU caches before it
/// is sent, measured in `bench/README.md`), zero-copy auto,
/// backend auto, all-zero session UUID (QEMU's default), 60 s stall timeout.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub(crate) chunk_bytes: usize,
    pub(crate) buffers_per_device: Option<usize>,
    pub(crate) zerocopy: ZeroCopy,
    pub(crate) backend: Backend,
    pub(crate) uuid: Uuid,
    pub(crate) stall_timeout: Duration,
    pub(crate) max_stream_bytes: u64,
    pub(crate) precopy_max_bytes: u64,
    pub(crate) return_path: bool,
    pub(crate) switchover_bandwidth: Option<u64>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            chunk_bytes: 1 << 20,
            buffers_per_device: None,
            zerocopy: ZeroCopy::Auto,
            backend: Backend::Auto,
            uuid: [0; 16],
            stall_timeout: Duration::from_secs(60),
            max_stream_bytes: 1 << 40,
            precopy_max_bytes: 1 << 40,
            return_path: true,
            switchover_bandwidth: None,
        }
    }
}

impl SourceConfig {
    /// The defaults.
    pub fn new() -> SourceConfig {
        SourceConfig::default()
    }
    setter! {
        /// Device bytes per packet (4 KiB ..= 64 MiB).
        chunk_bytes: usize
    }
    /// Registered buffers per device thread (2 ..= 64): bounds read-ahead and sends in flight.
    /// Default: 2 with copying sends; 4 with SEND_ZC, whose buffers stay with the kernel until
    /// the peer acknowledges the data.
    pub fn buffers_per_device(mut self, v: usize) -> Self {
        self.buffers_per_device = Some(v);
        self
    }

    pub(crate) fn buffers_for(&self, zerocopy: bool) -> usize {
        self.buffers_per_device.unwrap_or(if zerocopy { 4 } else { 2 })
    }
    setter! {
        /// Zero-copy send policy.
        zerocopy: ZeroCopy
    }
    setter! {
        /// Backend policy.
        backend: Backend
    }
    setter! {
        /// Session UUID written into every init packet (must equal the destination's).
        uuid: Uuid
    }
    setter! {
        /// Longest time without any progress before the transfer fails (100 ms ..= 1 h).
        stall_timeout: Duration
    }
    setter! {
        /// Most bytes one device's stream may produce before the transfer fails (guards against a
        /// device that never reaches end of stream).
        max_stream_bytes: u64
    }
    setter! {
        /// Most bytes read in PRE_COPY; past them pre-copy reads nothing more until the
        /// switchover.
        precopy_max_bytes: u64
    }
    setter! {
        /// Offer the return path (default on): the init packets carry the offer in bytes QEMU
        /// ignores; if the destination accepts, it acknowledges each device's initial data and
        /// reports its verdict, and the source succeeds only if the destination did. Off: the
        /// wire is byte-for-byte QEMU 10.x. On, set-up waits up to 1 s for the destination to
        /// accept (a QEMU peer never does; then the session runs without it).
        return_path: bool
    }
    /// The bandwidth (bytes per second) the switchover estimate assumes, instead of the
    /// fastest rate measured in pre-copy (QEMU's `avail-switchover-bandwidth`).
    pub fn switchover_bandwidth(mut self, bytes_per_sec: u64) -> Self {
        self.switchover_bandwidth = Some(bytes_per_sec);
        self
    }
    /// The chunk size in effect.
    pub fn get_chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// Checks every setting against its bounds for a transfer of `devices` devices over
    /// `channels` channels, before anything is connected: [`crate::SourceSession`] does it
    /// again, but a caller that checks first never opens a connection it cannot use.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting, its value and its bounds: the chunk (4 KiB ..=
    /// 64 MiB), buffers per device (2 ..= 64), zero-copy `On` with the blocking backend, a
    /// device pool above the 1 GiB registered-buffer limit, channels (1 ..= 256), devices
    /// (1 ..= 64), the stall timeout (100 ms ..= 1 h).
    pub fn validate(&self, channels: usize, devices: usize) -> Result<(), Error> {
        if !(4096..=MAX_CHUNK_BYTES).contains(&self.chunk_bytes) {
            return Err(Error::Config(format!(
                "chunk of {} bytes outside 4096..={MAX_CHUNK_BYTES} (chunk_bytes)",
                self.chunk_bytes
            )));
        }
        if let Some(b) = self.buffers_per_device {
            if !(2..=MAX_BUFFERS_PER_DEVICE).contains(&b) {
                return Err(Error::Config(format!("{b} buffers per device outside 2..={MAX_BUFFERS_PER_DEVICE}")));
            }
        }
        if self.backend == Backend::Blocking && self.zerocopy == ZeroCopy::On {
            return Err(Error::Config("zero-copy (on) needs the io_uring backend, not blocking".into()));
        }
        let pool = (self.buffers_for(true) + 1).saturating_mul(self.chunk_bytes + crate::pool::PAGE);
        if pool > crate::pool::MAX_REGISTERED {
            return Err(Error::Config(format!(
                "a device's buffer pool of {pool} bytes exceeds the 1 GiB registered-buffer limit"
            )));
        }
        validate_common(channels, devices, self.stall_timeout).map_err(Error::Config)
    }
}

fn validate_common(channels: usize, devices: usize, t: Duration) -> Result<(), String> {
    if !(1..=MAX_CHANNELS).contains(&channels) {
        return Err(format!("{channels} channels outside 1..={MAX_CHANNELS}"));
    }
    if !(1..=MAX_DEVICES).contains(&devices) {
        return Err(format!("{devices} devices outside 1..={MAX_DEVICES}"));
    }
    if t < Duration::from_millis(100) || t > Duration::from_secs(3600) {
        return Err(format!("stall timeout {t:?} outside 100 ms ..= 1 h (stall_timeout)"));
    }
    Ok(())
}

/// Receiver settings. Defaults: packets up to 1 MiB of device data (QEMU's chunk) plus the
/// header, a budget of one packet per channel (at least two) for out-of-order data on top of one
/// in-order packet per device, backend auto, all-zero UUID, 60 s stall timeout.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub(crate) max_packet_bytes: usize,
    pub(crate) budget_bytes: Option<usize>,
    pub(crate) backend: Backend,
    pub(crate) uuid: Uuid,
    pub(crate) stall_timeout: Duration,
    pub(crate) accept_timeout: Duration,
    pub(crate) workers: Option<usize>,
    pub(crate) return_path: bool,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            max_packet_bytes: 1 << 20,
            budget_bytes: None,
            backend: Backend::Auto,
            uuid: [0; 16],
            stall_timeout: Duration::from_secs(60),
            accept_timeout: Duration::from_secs(60),
            workers: None,
            return_path: true,
        }
    }
}

impl ReceiverConfig {
    /// The defaults.
    pub fn new() -> ReceiverConfig {
        ReceiverConfig::default()
    }
    setter! {
        /// Largest device-data payload per packet accepted (4 KiB ..= 64 MiB); a sender using
        /// bigger chunks gets a clear error.
        max_packet_bytes: usize
    }
    /// Bytes of out-of-order packets held at most (default: one largest packet per channel, at
    /// least two). A held packet is charged its payload rounded up to the receive pool's block
    /// (1/16 of the max packet, 4 KiB ..= 64 KiB; one block for an empty packet); the budget is
    /// rounded down to whole blocks, at least one. Each device's lowest missing packet is held
    /// outside the budget, so any budget completes a sender that keeps the ordering rules; a
    /// budget that holds the sender's largest reorder never makes a channel wait (DESIGN.md §5).
    pub fn budget_bytes(mut self, v: usize) -> Self {
        self.budget_bytes = Some(v);
        self
    }
    setter! {
        /// Backend policy.
        backend: Backend
    }
    setter! {
        /// Session UUID every init packet must carry.
        uuid: Uuid
    }
    setter! {
        /// Longest time without progress once all channels are up.
        stall_timeout: Duration
    }
    setter! {
        /// Longest wait for all channels to connect and send their init packet (100 ms ..= 1 h).
        accept_timeout: Duration
    }
    setter! {
        /// Accept a source's return-path offer (default on): answer on channel 0, acknowledge
        /// each device's initial data once written, and report a verdict per device. A source
        /// that does not offer it (QEMU) is served exactly as before.
        return_path: bool
    }

    /// Receive threads of the io_uring backend, each with its own ring and a share of the
    /// channels (1 ..= 64; default: one per CPU, at most one per channel).
    pub fn workers(mut self, v: usize) -> Self {
        self.workers = Some(v);
        self
    }

    pub(crate) fn workers_for(&self, channels: usize) -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.workers.unwrap_or(cpus).clamp(1, 64).min(channels)
    }

    pub(crate) fn slot_bytes(&self) -> usize {
        self.max_packet_bytes.div_ceil(crate::pool::PAGE) * crate::pool::PAGE
    }

    /// The out-of-order budget in bytes: as set, else one largest packet (page-rounded) per
    /// channel, at least two.
    pub(crate) fn budget_for(&self, channels: usize) -> usize {
        self.budget_bytes.unwrap_or_else(|| channels.max(2).saturating_mul(self.slot_bytes()))
    }

    /// Bytes of the receive pool: the budget in whole blocks (at least one) plus one largest
    /// packet per device (`receiver::reassembly::geometry`).
    pub(crate) fn pool_bytes(&self, channels: usize, devices: usize) -> usize {
        let (block, per_max) = crate::receiver::reassembly::geometry(self.max_packet_bytes);
        let budget_blocks = (self.budget_for(channels) / block).max(1);
        budget_blocks.saturating_add(devices.saturating_mul(per_max)).saturating_mul(block)
    }

    /// Checks every setting against its bounds for a receive of `devices` devices over
    /// `channels` channels, before anything is bound or accepted: [`crate::Receiver::run`] does
    /// it again, but a caller that checks first never makes a source connect to a receiver that
    /// cannot run.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting, its value and its bounds: the max packet (4 KiB
    /// ..= 64 MiB), the accept and stall timeouts (100 ms ..= 1 h), channels (1 ..= 256),
    /// devices (1 ..= 64), and the receive pool, `(budget + devices) x max packet`, which must
    /// fit the 1 GiB registered-buffer limit.
    pub fn validate(&self, channels: usize, devices: usize) -> Result<(), Error> {
        if !(4096..=MAX_CHUNK_BYTES).contains(&self.max_packet_bytes) {
            return Err(Error::Config(format!(
                "max packet of {} bytes outside 4096..={MAX_CHUNK_BYTES} (max_packet_bytes)",
                self.max_packet_bytes
            )));
        }
        if self.accept_timeout < Duration::from_millis(100) || self.accept_timeout > Duration::from_secs(3600) {
            return Err(Error::Config(format!(
                "accept timeout {:?} outside 100 ms ..= 1 h (accept_timeout)",
                self.accept_timeout
            )));
        }
        validate_common(channels, devices, self.stall_timeout).map_err(Error::Config)?;
        let pool = self.pool_bytes(channels, devices);
        if pool > crate::pool::MAX_REGISTERED {
            return Err(Error::Config(format!(
                "the receive pool of {} MiB (a budget of {} MiB plus one {} KiB packet for each of {devices} \
                 devices) exceeds the 1 GiB registered-buffer limit: lower the budget (budget_bytes, --budget; \
                 default: one largest packet per channel), the max packet size or the channel count",
                pool >> 20,
                self.budget_for(channels) >> 20,
                self.max_packet_bytes >> 10,
            )));
        }
        Ok(())
    }
}
