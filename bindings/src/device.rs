//! The one trait the engine talks to: a device whose migration state can be saved and restored.
//!
//! [`MigrationDevice`] is deliberately the *raw* uAPI surface (one `SET` is one ioctl, which the
//! kernel may itself walk over several arcs). The walking, recovery and bounds that every user
//! needs live in the provided functions of this module, written once for the real VFIO device
//! ([`crate::vfio::VfioDevice`]) and the simulated one ([`crate::sim::SimDevice`]).

use std::os::fd::{BorrowedFd, OwnedFd};

use crate::error::{Error, Result};
use crate::state::{arc_creates_data_fd, next_step, MigFlags, MigState};

/// `struct vfio_precopy_info` as returned by `VFIO_MIG_GET_PRECOPY_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrecopyInfo {
    /// Bytes of initial pre-copy data still to be read; falls as the stream is read.
    pub initial_bytes: u64,
    /// Bytes of state that changed since the initial data (an estimate).
    pub dirty_bytes: u64,
    /// `VFIO_PRECOPY_INFO_REINIT`: new initial data was put into the stream. Only meaningful
    /// after a successful [`MigrationDevice::enable_precopy_info_v2`].
    pub reinit: bool,
}

/// Outcome of one read from a save data fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// `n > 0` bytes were read.
    Data(usize),
    /// `read()` returned 0. In STOP_COPY this is the permanent end of the stream; in PRE_COPY
    /// some drivers (mtty) use it for "nothing more for now".
    Eof,
    /// `ENOMSG`: the temporary end of the pre-copy stream (mlx5 and the uAPI text).
    NoMsg,
}

/// A device whose migration state can be saved and restored with the VFIO migration uAPI v2.
///
/// Implemented by [`crate::vfio::VfioDevice`] (a real VFIO device) and
/// [`crate::sim::SimDevice`] (a simulation that follows the kernel's semantics). Every method
/// is the device-side half of one uAPI call; the sequencing lives in [`transition`] and
/// [`recover`].
pub trait MigrationDevice: Send {
    /// A short name for messages (a PCI address, mdev UUID or simulation name).
    fn name(&self) -> &str;

    /// `VFIO_DEVICE_FEATURE_MIGRATION` (GET): the states the device supports.
    ///
    /// # Errors
    /// [`Error::NotMigratable`] when the device has no migration support.
    fn migration_flags(&self) -> Result<MigFlags>;

    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (GET).
    fn state(&self) -> Result<MigState>;

    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (SET) exactly as one ioctl: the kernel walks the
    /// next-step table itself and returns a new data fd only when the final arc is one of the
    /// four that create one. On failure the device may be left at any intermediate step; call
    /// [`MigrationDevice::state`] to learn where.
    fn set_state_raw(&mut self, target: MigState) -> Result<Option<OwnedFd>>;

    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` (GET): the device's estimate of the STOP_COPY
    /// stream length. Untrusted: see [`bounded_data_size`].
    fn stop_copy_size(&self) -> Result<u64>;

    /// `VFIO_MIG_GET_PRECOPY_INFO` on the save data fd (valid in PRE_COPY and PRE_COPY_P2P).
    fn precopy_info(&self, data_fd: BorrowedFd<'_>) -> Result<PrecopyInfo>;

    /// Opt in to `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` so that
    /// [`PrecopyInfo::reinit`] is reported truthfully. Returns `Ok(false)` where the kernel
    /// does not know the feature.
    fn enable_precopy_info_v2(&mut self) -> Result<bool>;

    /// `VFIO_DEVICE_RESET`: back to RUNNING, every data fd disabled.
    fn reset(&mut self) -> Result<()>;

    /// One `read()` of the save data fd, with the uAPI's special results decoded.
    fn read_data(&self, data_fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<ReadOutcome>;

    /// One `write()` to the resume data fd; returns the bytes accepted (may be short).
    fn write_data(&self, data_fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize>;

    /// The device's config blob (what QEMU sends as the CONFIG_STATE packet): saved last,
    /// after the data stream.
    fn save_config(&mut self) -> Result<Vec<u8>>;

    /// Applies a config blob produced by [`MigrationDevice::save_config`] on the source.
    fn load_config(&mut self, blob: &[u8]) -> Result<()>;
}

/// Result of a successful [`transition`].
#[derive(Debug)]
pub struct Transition {
    /// Every arc taken, in order (empty when the device was already there).
    pub arcs: Vec<(MigState, MigState)>,
    /// The data fd created by the last arc, if it is one of the four that make one.
    pub data_fd: Option<OwnedFd>,
}

/// Moves `dev` to `target` one legal arc at a time (one `SET` per arc), so that any request
/// works on any device whatever its optional states, and a failure says exactly which arc
/// failed and where the device really is.
///
/// # Errors
/// [`Error::NoPath`] if the kernel table has no path; [`Error::Transition`] if an arc fails, or
/// if the device hands back a data fd on an arc that must not create one (or none where it must);
/// its `reached` field is the state read back afterwards.
pub fn transition(dev: &mut dyn MigrationDevice, target: MigState) -> Result<Transition> {
    let flags = dev.migration_flags()?;
    let from = dev.state()?;
    let mut at = from;
    let mut arcs = Vec::new();
    let mut data_fd = None;
    while at != target {
        let next = next_step(flags, at, target).ok_or_else(|| Error::NoPath {
            device: dev.name().to_owned(),
            from: at,
            to: target,
        })?;
        // A failed arc, or one that succeeded but broke the data-fd rule: either way, say which
        // arc and where the device really is now (read back after the SET).
        let failed = |dev: &mut dyn MigrationDevice, source: Error| Error::Transition {
            device: dev.name().to_owned(),
            from,
            to: target,
            arc_from: at,
            arc_to: next,
            reached: dev.state().unwrap_or(MigState::Error),
            source: Box::new(source),
        };
        let fd = dev.set_state_raw(next).map_err(|e| failed(dev, e))?;
        let wrong = match (fd, arc_creates_data_fd(at, next)) {
            (Some(fd), true) => {
                data_fd = Some(fd);
                None
            }
            (None, true) => Some(format!("arc {at} -> {next} returned no data fd")),
            (Some(_), false) => Some(format!("arc {at} -> {next} returned a data fd it must not create")),
            (None, false) => None,
        };
        if let Some(what) = wrong {
            let source = Error::Protocol { device: dev.name().to_owned(), what };
            return Err(failed(dev, source));
        }
        arcs.push((at, next));
        at = next;
        if arcs.len() > 8 {
            return Err(Error::Protocol {
                device: dev.name().to_owned(),
                what: format!("walk from {from} to {target} did not converge"),
            });
        }
    }
    Ok(Transition { arcs, data_fd })
}

/// How [`recover`] got the device back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// It was already in the wanted state.
    AlreadyThere,
    /// A walk to the wanted state succeeded.
    Transitioned,
    /// The walk failed and `VFIO_DEVICE_RESET` brought it to RUNNING.
    Reset,
}

/// Puts `dev` back into `want` (usually RUNNING, so the VM keeps running): first by a walk,
/// and where that fails, by `VFIO_DEVICE_RESET` (which leaves it RUNNING), then a walk again.
///
/// # Errors
/// The reset's error if even the reset fails, or the error of the walk after a successful reset
/// (the device is then wherever that walk stopped; [`MigrationDevice::state`] tells).
pub fn recover(dev: &mut dyn MigrationDevice, want: MigState) -> Result<Recovery> {
    if dev.state().ok() == Some(want) {
        return Ok(Recovery::AlreadyThere);
    }
    if transition(dev, want).is_ok() {
        return Ok(Recovery::Transitioned);
    }
    dev.reset()?;
    if dev.state()? != want {
        transition(dev, want)?;
    }
    Ok(Recovery::Reset)
}

/// Reads the device's STOP_COPY size estimate and bounds it: the uAPI size ioctls are hints
/// that may report garbage, so a value above `max` is an error rather than an allocation.
///
/// # Errors
/// [`Error::Protocol`] above `max`, or the ioctl's error.
pub fn bounded_data_size(dev: &dyn MigrationDevice, max: u64) -> Result<u64> {
    let v = dev.stop_copy_size()?;
    if v > max {
        return Err(Error::Protocol {
            device: dev.name().to_owned(),
            what: format!("MIG_DATA_SIZE reported {v} bytes, above the bound of {max}"),
        });
    }
    Ok(v)
}
