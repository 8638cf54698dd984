//! Errors of the VFIO migration layer.

use std::io;

use crate::state::MigState;

/// Everything that can go wrong while driving a device's migration uAPI.
///
/// Every variant names the device (as [`crate::MigrationDevice::name`] reports it) and what
/// was being done, so a message alone tells an operator where to look.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An ioctl or syscall on the device, group, container or data fd failed.
    #[error("{device}: {op} failed: {source}")]
    Sys {
        /// Device name.
        device: String,
        /// What was attempted, e.g. `"VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE=STOP_COPY"`.
        op: String,
        /// The errno the kernel returned.
        #[source]
        source: io::Error,
    },
    /// The device has no migration support (`VFIO_DEVICE_FEATURE_MIGRATION` gave `ENOTTY`,
    /// or it lacks the mandatory STOP_COPY flag).
    #[error("{device}: device is not migratable ({reason})")]
    NotMigratable {
        /// Device name.
        device: String,
        /// Why, in words.
        reason: String,
    },
    /// The device does not support a state or feature that was asked for.
    #[error("{device}: {what} is not supported by this device (migration flags {flags:#x})")]
    Unsupported {
        /// Device name.
        device: String,
        /// The state or feature, in words.
        what: String,
        /// The device's migration flags.
        flags: u64,
    },
    /// There is no legal path between two states (the kernel would answer `EINVAL`).
    #[error("{device}: no legal transition from {from} to {to}")]
    NoPath {
        /// Device name.
        device: String,
        /// Current state.
        from: MigState,
        /// Requested state.
        to: MigState,
    },
    /// One arc of a multi-arc transition failed; `reached` is the state the device was really
    /// left in (read back with GET after the failed SET).
    #[error(
        "{device}: transition {from} -> {to} failed on arc {arc_from} -> {arc_to}; device is now {reached}: {source}"
    )]
    Transition {
        /// Device name.
        device: String,
        /// Where the walk started.
        from: MigState,
        /// Where the walk was going.
        to: MigState,
        /// The failing arc's start.
        arc_from: MigState,
        /// The failing arc's end.
        arc_to: MigState,
        /// The state the device reports after the failure (`Error` if even GET failed).
        reached: MigState,
        /// Why the arc failed.
        #[source]
        source: Box<Error>,
    },
    /// The kernel returned a value this crate cannot accept (an unknown state, an fd where none
    /// may be made, a size above the caller's bound...).
    #[error("{device}: {what}")]
    Protocol {
        /// Device name.
        device: String,
        /// What was wrong, in words.
        what: String,
    },
    /// The device could not be opened (sysfs lookup, group, container).
    #[error("{device}: cannot open: {what}")]
    Open {
        /// Device name or path as given.
        device: String,
        /// What was wrong.
        what: String,
        /// Underlying error, when there is one.
        #[source]
        source: Option<io::Error>,
    },
    /// A config blob (see [`crate::MigrationDevice::load_config`]) is malformed or does not
    /// fit this device.
    #[error("{device}: bad config blob: {reason}")]
    BadConfig {
        /// Device name.
        device: String,
        /// What was wrong, in words.
        reason: String,
    },
    /// A device region access falls outside the region.
    #[error("{device}: region {index} access {offset:#x}+{len:#x} is outside its {size:#x} bytes")]
    RegionBounds {
        /// Device name.
        device: String,
        /// Region index.
        index: u32,
        /// Offset in the region.
        offset: u64,
        /// Access length.
        len: u64,
        /// Region size.
        size: u64,
    },
}

impl Error {
    /// The raw errno behind this error, if it came from the kernel (or the simulated kernel).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Sys { source, .. } => source.raw_os_error(),
            Error::Transition { source, .. } => source.errno(),
            Error::Open { source: Some(s), .. } => s.raw_os_error(),
            _ => None,
        }
    }

    /// Convenience constructor for [`Error::Sys`] from an errno value.
    pub fn sys(device: &str, op: impl Into<String>, errno: i32) -> Error {
        Error::Sys { device: device.to_owned(), op: op.into(), source: io::Error::from_raw_os_error(errno) }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
