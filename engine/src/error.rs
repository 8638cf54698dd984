//! The engine's error type.

use std::io;
use std::time::Duration;

use crate::wire::WireError;

/// Everything that can stop a transfer. Each variant says what went wrong and where: which
/// channel, which device (its `idstr`), which packet index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration or the set of devices and channels is not usable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A device's migration uAPI call failed (state change, config, size).
    #[error("device {device}: {source}")]
    Device {
        /// The device's `idstr`.
        device: String,
        /// What the uAPI layer said.
        #[source]
        source: vfio_migration::Error,
    },
    /// The transfer failed and the source device could not be put back into RUNNING either
    /// (neither by a walk nor by a reset): the VM's device needs attention.
    #[error("device {device}: {cause}; then putting the device back to RUNNING failed too: {source}")]
    Unrecovered {
        /// The device's `idstr`.
        device: String,
        /// The failure that stopped the transfer.
        cause: Box<Error>,
        /// Why recovery failed.
        #[source]
        source: vfio_migration::Error,
    },
    /// Reading the source device's data fd failed.
    #[error("device {device}: reading the migration data fd failed after {offset} bytes: {source}")]
    DeviceRead {
        /// The device's `idstr`.
        device: String,
        /// Stream bytes read before the failure.
        offset: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Writing the destination device's data fd failed.
    #[error(
        "device {device}: writing packet {idx} to the resume data fd failed after {offset} stream bytes: {source}"
    )]
    DeviceWrite {
        /// The device's `idstr`.
        device: String,
        /// Packet index being written.
        idx: u32,
        /// Stream bytes written before the failure.
        offset: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A channel socket failed.
    #[error("channel {channel}: {op} failed: {source}")]
    Channel {
        /// Channel id.
        channel: usize,
        /// What was being done (`"send packet 3 of dev/vfio"`, `"recv header"`...).
        op: String,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A channel ended where the protocol does not allow it.
    #[error("channel {channel}: peer closed the connection {during}")]
    ChannelClosed {
        /// Channel id.
        channel: usize,
        /// Where in the protocol (`"in the middle of a packet header (100 of 288 bytes)"`...).
        during: String,
    },
    /// The peer sent bytes that are not a valid packet.
    #[error("channel {channel}: invalid {what}: {source}")]
    Wire {
        /// Channel id (or the accept order for init packets).
        channel: usize,
        /// Which structure.
        what: &'static str,
        /// Decode error.
        #[source]
        source: WireError,
    },
    /// Valid framing, but the packet breaks the transfer's rules.
    #[error("channel {channel}: device {device}: {what}")]
    Protocol {
        /// Channel id.
        channel: usize,
        /// The device's `idstr` (and instance).
        device: String,
        /// What is wrong (duplicate index, index after the config packet...).
        what: String,
    },
    /// A packet names a device the receiver does not expect.
    #[error("channel {channel}: packet for unknown device {idstr:?} instance {instance_id}")]
    UnknownDevice {
        /// Channel id.
        channel: usize,
        /// The `idstr` received.
        idstr: String,
        /// The `instance_id` received.
        instance_id: u32,
    },
    /// Every channel ended but a device is still missing packets.
    #[error("device {device}: transfer incomplete: {what}")]
    Incomplete {
        /// The device's `idstr`.
        device: String,
        /// What is missing (next packet index, config packet...).
        what: String,
    },
    /// The sender holds more out-of-order data than the receive budget allows and no
    /// channel can deliver the packet that would let the receiver progress.
    #[error("receive budget exhausted: {what}")]
    BudgetExceeded {
        /// Which devices wait for which packet, and what is held.
        what: String,
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
}

impl Error {
    pub(crate) fn sys(op: impl Into<String>, source: io::Error) -> Error {
        Error::Sys { op: op.into(), source }
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
