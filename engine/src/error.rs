//! The engine's error type: every variant says what went wrong and where, in typed fields
//! (which channel, which device, which packet index), so that callers match on data instead of
//! message text.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::ids::{ChannelId, PacketIndex};
use crate::wire::{DeviceId, WireError};

/// Why a receive that ran out of budget could not wait for memory any longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BudgetStall {
    /// Every open channel waits for memory and no device write is pending: nothing can move
    /// again (a sender that keeps the ordering rules never gets here).
    #[error("every open channel waits for memory and no device write is pending")]
    EveryChannelWaits,
    /// A channel waits for memory, no device write is pending, and no byte arrived on any
    /// channel for this long.
    #[error("nothing arrived on any channel for {:.1} s and no device write is pending", after.as_secs_f64())]
    NothingMoved {
        /// How long nothing moved.
        after: Duration,
    },
}

/// `n` bytes for a message: whole MiB or KiB when exact, else MiB with two decimals.
pub(crate) fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// A packet that is well framed but breaks the rules of a device's stream (DESIGN.md §4). Each
/// carries the index it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// The index was already received (or written).
    #[error("duplicate packet index {idx}")]
    DuplicateIndex {
        /// The repeated index.
        idx: PacketIndex,
    },
    /// A data packet at or after the config packet's index.
    #[error("data packet index {idx} at or after the config packet's index {config_idx}")]
    DataAfterConfig {
        /// The data packet's index.
        idx: PacketIndex,
        /// The config packet's index.
        config_idx: PacketIndex,
    },
    /// A second config packet.
    #[error("second config packet (index {idx}; the first had index {first})")]
    SecondConfig {
        /// The second one's index.
        idx: PacketIndex,
        /// The first one's index.
        first: PacketIndex,
    },
    /// A config packet whose index is not above every data index received.
    #[error("config packet index {idx} is not after data packet index {data_idx}")]
    ConfigNotLast {
        /// The config packet's index.
        idx: PacketIndex,
        /// A data index at or above it.
        data_idx: PacketIndex,
    },
    /// A packet for a device whose config was already applied.
    #[error("packet {idx} arrived after the device completed")]
    AfterCompletion {
        /// Its index.
        idx: PacketIndex,
    },
    /// A payload larger than the receiver's packet limit.
    #[error("packet {idx} carries {len} bytes, above the {limit}-byte limit")]
    TooLarge {
        /// Its index.
        idx: PacketIndex,
        /// Payload bytes announced.
        len: usize,
        /// The limit (`ReceiverConfig::max_packet_bytes`, rounded up to a page).
        limit: usize,
    },
    /// An initial-data marker (`VFIO_FLAG_INIT_DATA_SENT`) where none may be: the return path
    /// was not agreed on, or the marker carries data.
    #[error("packet {idx}: unexpected initial-data marker ({why})")]
    UnexpectedMarker {
        /// Its index.
        idx: PacketIndex,
        /// Why it is not allowed.
        why: &'static str,
    },
    /// Two connections announced the same channel id in their init packets.
    #[error("channel id {channel} announced twice (second time on connection {connection})")]
    DuplicateChannelId {
        /// The id.
        channel: ChannelId,
        /// Accept order of the second connection, from 0.
        connection: u32,
    },
}

/// Where in the protocol a channel ended early.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// Inside the 64-byte init packet.
    InitPacket {
        /// Bytes received of it.
        got: usize,
    },
    /// Inside a 288-byte packet header.
    Header {
        /// Bytes received of it.
        got: usize,
    },
    /// Inside a packet's payload.
    Payload {
        /// The packet's device.
        device: DeviceId,
        /// The packet's index.
        idx: PacketIndex,
        /// Bytes received of the payload.
        got: usize,
        /// The payload's length.
        len: usize,
    },
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::InitPacket { got } => {
                write!(f, "during its init packet ({got} of {} bytes)", crate::wire::INIT_PACKET_LEN)
            }
            Stage::Header { got } => {
                write!(f, "in the middle of a packet header ({got} of {} bytes)", crate::wire::PACKET_OVERHEAD)
            }
            Stage::Payload { device, idx, got, len } => {
                write!(f, "in the middle of packet {idx} of device {device} ({got} of {len} bytes)")
            }
        }
    }
}

/// What a device's stream was missing when every channel had closed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Missing {
    /// No packet of the device arrived at all.
    Everything,
    /// Its config packet never came.
    Config {
        /// Data packets written.
        written: u32,
        /// The next index expected.
        next: PacketIndex,
    },
    /// A packet below the config packet never came.
    Packet {
        /// The missing index.
        idx: PacketIndex,
        /// The config packet's index.
        config_idx: PacketIndex,
        /// Data packets written.
        written: u32,
    },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Everything => f.write_str("no packet of this device arrived before every channel closed"),
            Missing::Config { written, next } => write!(
                f,
                "all channels closed before its config packet; {written} data packets written, next expected index {next}"
            ),
            Missing::Packet { idx, config_idx, written } => write!(
                f,
                "all channels closed with packet {idx} missing (config packet index {config_idx}, {written} data packets written)"
            ),
        }
    }
}

/// A limit of one device's stream at the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamLimit {
    /// More bytes than `SourceConfig::max_stream_bytes`.
    Bytes {
        /// The configured maximum.
        max: u64,
    },
    /// More packets than a `u32` index can number ([`PacketIndex::MAX`], config included).
    Packets,
}

impl fmt::Display for StreamLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamLimit::Bytes { max } => {
                write!(f, "the stream exceeds the configured maximum of {max} bytes (max_stream_bytes)")
            }
            StreamLimit::Packets => write!(f, "the stream needs more than {} packets", u64::from(u32::MAX)),
        }
    }
}

/// Everything that can stop a transfer. Each variant says what went wrong and where: which
/// channel, which device, which packet index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration or the set of devices and channels is not usable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A session was driven in an order the API does not allow (see `SessionControl`).
    #[error("session used out of order: {what}")]
    Usage {
        /// What was wrong.
        what: &'static str,
    },
    /// A device's migration uAPI call failed (state change, config, size).
    #[error("device {device}: {source}")]
    Device {
        /// The device.
        device: DeviceId,
        /// What the uAPI layer said.
        #[source]
        source: vfio_migration::Error,
    },
    /// The transfer failed and the source device could not be put back into RUNNING either
    /// (neither by a walk nor by a reset): the VM's device needs attention.
    #[error("device {device}: {cause}; then putting the device back to RUNNING failed too: {source}")]
    Unrecovered {
        /// The device.
        device: DeviceId,
        /// The failure that stopped the transfer.
        cause: Box<Error>,
        /// Why recovery failed.
        #[source]
        source: vfio_migration::Error,
    },
    /// Reading the source device's data fd failed.
    #[error("device {device}: reading the migration data fd failed after {offset} bytes: {source}")]
    DeviceRead {
        /// The device.
        device: DeviceId,
        /// Stream bytes read before the failure.
        offset: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A device's stream at the source went past a limit.
    #[error("device {device}: {limit}")]
    StreamLimit {
        /// The device.
        device: DeviceId,
        /// Which limit.
        limit: StreamLimit,
    },
    /// Writing the destination device's data fd failed.
    #[error(
        "device {device}: writing packet {idx} to the resume data fd failed after {offset} stream bytes: {source}"
    )]
    DeviceWrite {
        /// The device.
        device: DeviceId,
        /// Packet index being written.
        idx: PacketIndex,
        /// Stream bytes written before the failure.
        offset: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A channel socket failed.
    #[error("channel {channel}: {op} failed: {source}")]
    Channel {
        /// The channel.
        channel: ChannelId,
        /// What was being done (`"send packet 3 of device 0000:00:02.0/vfio (instance 0)"`).
        op: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A connection failed before its init packet said which channel it is.
    #[error("connection {connection} (accept order): {op} failed: {source}")]
    Connection {
        /// Accept order, from 0.
        connection: u32,
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A channel ended where the protocol does not allow it.
    #[error("channel {channel}: peer closed the connection {during}")]
    ChannelClosed {
        /// The channel.
        channel: ChannelId,
        /// Where in the protocol.
        during: Stage,
    },
    /// A connection ended inside its init packet.
    #[error("connection {connection} (accept order): peer closed the connection {during}")]
    ConnectionClosed {
        /// Accept order, from 0.
        connection: u32,
        /// Where in the protocol.
        during: Stage,
    },
    /// The peer sent bytes that are not a valid packet.
    #[error("channel {channel}: invalid {what}: {source}")]
    Wire {
        /// The channel.
        channel: ChannelId,
        /// Which structure.
        what: &'static str,
        /// Decode error.
        #[source]
        source: WireError,
    },
    /// A connection's init packet is not valid.
    #[error("connection {connection} (accept order): invalid init packet: {source}")]
    InitPacket {
        /// Accept order, from 0.
        connection: u32,
        /// Decode error.
        #[source]
        source: WireError,
    },
    /// A connection announced a channel id at or above the receiver's channel count: the source
    /// opened more channels than the receiver expects (the two sides' channel counts differ).
    #[error(
        "connection {connection} (accept order) announced channel {id}, but this receiver expects {expected} \
         channel(s) (ids 0..{expected}): the source opened more channels than the receiver; both sides must \
         use the same channel count"
    )]
    ChannelCount {
        /// Accept order of the connection, from 0.
        connection: u32,
        /// The channel id it announced.
        id: u8,
        /// The receiver's channel count.
        expected: usize,
    },
    /// Channel set-up did not complete within the accept timeout
    /// ([`crate::ReceiverConfig::accept_timeout`], counted from the start of set-up): fewer
    /// channels than expected sent a valid init packet. Other channels may have streamed
    /// meanwhile; this is not a stall.
    #[error(
        "channel set-up incomplete at the accept timeout ({after:?} from its start): {connected} of {expected} \
         channel(s) connected with a valid init packet; {what}"
    )]
    ChannelSetup {
        /// Channels that connected with a valid init packet.
        connected: usize,
        /// The receiver's channel count.
        expected: usize,
        /// The missing channels, the connections still inside their init packet and those
        /// dropped as not channels.
        what: String,
        /// The accept timeout.
        after: Duration,
    },
    /// The source announced (in its return-path offer, `wire::InitPacket::devices`) that it
    /// migrates a number of devices other than the number this receiver expects: one side
    /// would wait for a device the other never sends, or get one it does not know.
    #[error(
        "the source migrates {source_devices} device(s), but this destination expects {expected}: both sides must \
         migrate the same devices (same idstr and instance_id, in any order); check the device lists of both \
         commands"
    )]
    DeviceCount {
        /// The source's device count (from its init packet).
        source_devices: usize,
        /// The receiver's device count.
        expected: usize,
    },
    /// Valid framing, but the packet breaks the transfer's rules.
    #[error("channel {channel}: {}{violation}", device.as_ref().map(|d| format!("device {d}: ")).unwrap_or_default())]
    Protocol {
        /// The channel.
        channel: ChannelId,
        /// The device, when the violation concerns one.
        device: Option<DeviceId>,
        /// What is wrong.
        violation: ProtocolViolation,
    },
    /// The return path (channel 0, destination to source) failed or carried bytes that are not a
    /// valid message.
    #[error("return path: {what}")]
    ReturnPath {
        /// What was wrong.
        what: String,
    },
    /// The destination sent bytes on a channel where the protocol has none for it to send (any
    /// channel but a return path's channel 0, or channel 0 after the return path's `SHUT`, or
    /// before it was accepted): something other than a vfio-multifd or QEMU destination is
    /// talking (a proxy, a keepalive, an ack). Never discarded silently: closing a socket with
    /// unread input resets it, which may destroy the end of the stream at the destination.
    #[error(
        "channel {channel}: the destination sent {bytes} unexpected byte(s) (first: {first:02x?}); multifd \
         channels carry nothing back but the negotiated return path: is a proxy or another program listening?"
    )]
    UnexpectedInput {
        /// The channel.
        channel: ChannelId,
        /// Bytes received in the read that found them (at least this many came).
        bytes: usize,
        /// Their first bytes (at most 8).
        first: Vec<u8>,
    },
    /// A raw source stream (`add_data_fd` on a regular file) did not deliver the bytes its file
    /// held when it was added: the file was truncated (or grew) while it was sent. The device's
    /// config packet was not sent, so the destination cannot load the short stream.
    #[error(
        "device {device}: the source file gave {sent} bytes but held {expected} when the transfer started (was it \
         truncated or rewritten while being sent?); its config was not sent, so the destination will not load it"
    )]
    SourceChanged {
        /// The device.
        device: DeviceId,
        /// Stream bytes read before the end of the file.
        sent: u64,
        /// The file's size (from its offset) when it was added.
        expected: u64,
    },
    /// The destination reported that a device failed there (its verdict on the return path),
    /// or that the migration as a whole did not complete: the source must not report success.
    #[error("destination: device {device}: {what}")]
    Destination {
        /// The device (the first one that failed).
        device: DeviceId,
        /// The destination's error, in its words.
        what: String,
    },
    /// The destination loaded and validated every device and said so, but the source did not
    /// commit the switchover (`wire::EXT_COMMIT`: channel 0's FIN after the verdicts): it
    /// cancelled or failed (a reset), sent bytes instead, or said nothing within the stall
    /// timeout. The devices stay in STOP, not started: the source keeps the VM.
    #[error(
        "the source did not commit the switchover: {why}; every device is loaded and validated but left in \
         STOP, not started (the source keeps the VM)"
    )]
    NotCommitted {
        /// What came instead of the commit.
        why: String,
    },
    /// A packet names a device the receiver does not expect.
    #[error(
        "channel {channel}: packet for unknown device {idstr:?} instance {instance_id}: this destination does not \
         expect it; both sides must migrate the same devices (same idstr and instance_id)"
    )]
    UnknownDevice {
        /// The channel.
        channel: ChannelId,
        /// The `idstr` received.
        idstr: String,
        /// The `instance_id` received.
        instance_id: u32,
    },
    /// Every channel ended but a device is still missing packets.
    #[error("device {device}: transfer incomplete: {missing}")]
    Incomplete {
        /// The device.
        device: DeviceId,
        /// What is missing.
        missing: Missing,
    },
    /// A packet could not be held within the receive budget, and nothing that would free
    /// memory was on its way: every open channel waited for memory with no device write
    /// pending, or nothing moved for a while with a channel waiting and no write pending
    /// (DESIGN.md §5). A sender that keeps the ordering rules needs a budget that holds its
    /// largest reorder to never wait; the message names the numbers and the knob.
    #[error(
        "receive budget exhausted: packet {idx} of {device} arrived on channel {channel} while packet \
         {awaited} is awaited: holding it needs {}, the budget is {} ({} held in {held_packets} \
         out-of-order packets); {cause}; raise the budget (--budget, ReceiverConfig::budget_bytes){}",
        human_bytes(*needed),
        human_bytes(*budget),
        human_bytes(*held),
        if waits.is_empty() { String::new() } else { format!(" ({waits})") }
    )]
    BudgetExceeded {
        /// The channel whose packet could not be held.
        channel: ChannelId,
        /// The packet's device.
        device: DeviceId,
        /// The packet's index.
        idx: PacketIndex,
        /// The device's lowest missing index: the packet whose arrival would let it write.
        awaited: PacketIndex,
        /// Out-of-order bytes that holding the packet needs (what is held plus the packet,
        /// each charged in whole pool blocks).
        needed: u64,
        /// The budget, bytes.
        budget: u64,
        /// Out-of-order bytes held now.
        held: u64,
        /// Out-of-order packets held now.
        held_packets: usize,
        /// Why waiting longer could not help.
        cause: BudgetStall,
        /// Which incomplete device waits for which packet.
        waits: String,
    },
    /// Nothing happened for longer than the configured timeout.
    #[error("timed out after {after:?} without progress: {what}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// The limit.
        after: Duration,
    },
    /// The transfer was aborted through an [`crate::AbortHandle`] (or because another part
    /// failed first).
    #[error("transfer aborted")]
    Aborted,
    /// io_uring was requested explicitly but cannot be used.
    #[error("io_uring backend unavailable: {reason}")]
    UringUnavailable {
        /// Why, in words.
        reason: String,
    },
    /// A local system call failed outside any channel or device (ring setup, mmap, thread
    /// spawn, accept...).
    #[error("{op}: {source}")]
    Sys {
        /// What was attempted.
        op: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Something the engine's own rules say cannot happen did (a completion of an unknown kind
    /// or generation, a slot in the wrong state). A bug: please report it with this text.
    #[error("internal error (a bug in vfio-multifd): {what}")]
    Internal {
        /// What was impossible.
        what: String,
    },
}

impl Error {
    pub(crate) fn sys(op: impl Into<String>, source: io::Error) -> Error {
        Error::Sys { op: op.into(), source }
    }

    pub(crate) fn internal(what: impl Into<String>) -> Error {
        Error::Internal { what: what.into() }
    }

    /// Records `e` in `slot` unless `slot` already holds a root cause: the first error wins,
    /// except that a real failure replaces an [`Error::Aborted`] echo of it.
    pub(crate) fn keep_root_cause(slot: &mut Option<Error>, e: Error) {
        if slot.as_ref().is_none_or(|f| f.is_aborted() && !e.is_aborted()) {
            *slot = Some(e);
        }
    }

    /// Whether this error only reports that the transfer was aborted (by the caller or
    /// because another thread failed first), as opposed to the original failure.
    pub fn is_aborted(&self) -> bool {
        matches!(self, Error::Aborted)
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
