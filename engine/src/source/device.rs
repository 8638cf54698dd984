//! One source device: the state changes of a session, which the controller makes
//! ([`DeviceSlot::change`]), and the device as its thread sees it ([`DeviceCtx`]: its data fd,
//! what it may read now). Written once, for both backends:
//!
//! | command | device with the flag | state change (uAPI) |
//! |---|---|---|
//! | `PreCopy` | PRE_COPY | RUNNING → PRE_COPY (new save data fd) |
//! | `Quiesce` | P2P | PRE_COPY → PRE_COPY_P2P, or RUNNING → RUNNING_P2P |
//! | `StopCopy` | any | → STOP_COPY: the same fd from PRE_COPY(_P2P), a new fd from STOP |
//!
//! A device without the flag of a row stays where it is for that row. The abort flag is checked
//! before every state change, so a cancelled session never stops a running device. A raw data fd
//! (`Source::add_data_fd`) is walked by its owner; for it the commands only change what is read.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use vfio_migration::{transition, MigFlags, MigState, MigrationDevice, ReadOutcome};

use crate::abort::AbortHandle;
use crate::error::{Error, Result};
use crate::ids::DeviceIndex;
use crate::source::control::{Command, DeviceControl, SessionEvent, SourcePhase};
use crate::wire::DeviceId;

/// What the device loop may read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// Nothing: not started, quiesced, or a device without PRE_COPY before STOP_COPY.
    Nothing,
    /// PRE_COPY data, synchronously through the uAPI layer and bounded by PRECOPY_INFO.
    PreCopy,
    /// The STOP_COPY stream, as raw reads on the data fd until EOF.
    Stream,
}

/// One step of a pre-copy read.
pub(crate) enum PrecopyStep {
    /// `n` bytes were read into the buffer.
    Data(usize),
    /// Nothing to read now (`ENOMSG`, mtty's 0, both PRECOPY_INFO counters 0, or the pre-copy
    /// byte cap reached): try again later, without spinning.
    Idle,
}

/// A device the session walks, shared by the controller (the VMM's thread), which makes every
/// state change of the session itself (`change`), and the device's thread, which reads the
/// device's data and config between them. The lock serialises the two, so a state change
/// never races a pre-copy read or a `PRECOPY_INFO` of the same device.
///
/// The controller makes the changes, one device after the other, as QEMU does at `vm_stop`:
/// a hand-off to the device threads and back costs two thread wake-ups per device and phase,
/// which on a busy 2-CPU host is most of a switchover that moves no data.
pub(crate) struct DeviceSlot<'d> {
    id: DeviceId,
    walk: Mutex<Walk<'d>>,
}

/// A device after its session: its id, the device (if the engine walks it) with where a
/// successful session leaves it, and the error of a state change that failed.
pub(crate) type Walked<'d> = (DeviceId, Option<(&'d mut (dyn MigrationDevice + 'd), MigState)>, Option<Error>);

/// What the lock of a [`DeviceSlot`] guards.
struct Walk<'d> {
    /// `None` for a raw data fd (walked by its owner: the commands only change what is read).
    dev: Option<&'d mut (dyn MigrationDevice + 'd)>,
    flags: MigFlags,
    /// Where a successful session leaves the device (`None` for a raw data fd).
    final_state: Option<MigState>,
    /// The last command whose state change was made.
    made: Command,
    /// RUNNING → PRE_COPY gave the save data fd (handed to the device thread).
    precopy_fd: bool,
    /// A data fd a state change created, until the device thread takes it.
    handoff: Option<OwnedFd>,
    /// A state change that failed: the device's own error, the session's root cause.
    failure: Option<Error>,
}

impl<'d> DeviceSlot<'d> {
    /// A device the engine walks, in RUNNING; `final_state`: where a successful session
    /// leaves it.
    ///
    /// # Errors
    /// [`Error::Device`] when its migration flags cannot be read.
    pub(crate) fn device(
        id: DeviceId,
        dev: &'d mut (dyn MigrationDevice + 'd),
        final_state: MigState,
    ) -> Result<DeviceSlot<'d>> {
        let flags = dev.migration_flags().map_err(|e| Error::Device { device: id.clone(), source: e })?;
        Ok(DeviceSlot::new(id, Some(dev), flags, Some(final_state)))
    }

    /// A raw data stream, walked by its owner.
    pub(crate) fn raw(id: DeviceId) -> DeviceSlot<'d> {
        DeviceSlot::new(id, None, MigFlags::STOP_COPY, None)
    }

    fn new(
        id: DeviceId,
        dev: Option<&'d mut (dyn MigrationDevice + 'd)>,
        flags: MigFlags,
        final_state: Option<MigState>,
    ) -> DeviceSlot<'d> {
        let walk =
            Walk { dev, flags, final_state, made: Command::Prepare, precopy_fd: false, handoff: None, failure: None };
        DeviceSlot { id, walk: Mutex::new(walk) }
    }

    /// The device's id.
    pub(crate) fn id(&self) -> &DeviceId {
        &self.id
    }

    fn lock(&self) -> MutexGuard<'_, Walk<'d>> {
        self.walk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device (if the engine walks it), where a successful session leaves it, and the
    /// error of a state change that failed.
    pub(crate) fn into_parts(self) -> Walked<'d> {
        let w = self.walk.into_inner().unwrap_or_else(|p| p.into_inner());
        (self.id, w.dev.zip(w.final_state), w.failure)
    }

    /// Makes the state change of command `c` (the table above) on the controller's thread;
    /// the caller then tells the device thread (`DeviceControl::command`). A command already
    /// made (or skipped: `PreCopy` is optional) is not made again.
    ///
    /// # Errors
    /// [`Error::Aborted`] when the session was aborted before the change, or when the change
    /// failed: the device's own error is then kept for the session's result, the device is
    /// marked failed and the session aborted.
    pub(crate) fn change(&self, c: Command, control: &DeviceControl, abort: &AbortHandle) -> Result<()> {
        let mut w = self.lock();
        if w.made >= c {
            return Ok(());
        }
        if abort.is_aborted() {
            return Err(Error::Aborted);
        }
        match w.make(&self.id, c, control) {
            Ok(()) => {
                w.made = c;
                drop(w);
                control.status().phase = match c {
                    Command::Prepare => SourcePhase::Prepared,
                    Command::PreCopy => SourcePhase::PreCopy,
                    Command::Quiesce => SourcePhase::Quiesced,
                    Command::StopCopy => SourcePhase::StopCopy,
                };
                Ok(())
            }
            Err(e) => {
                w.failure.get_or_insert(e);
                drop(w);
                abort.abort();
                control.fail();
                Err(Error::Aborted)
            }
        }
    }
}

impl Walk<'_> {
    fn make(&mut self, id: &DeviceId, c: Command, control: &DeviceControl) -> Result<()> {
        let protocol = |dev: &dyn MigrationDevice, what: &str| Error::Device {
            device: id.clone(),
            source: vfio_migration::Error::Protocol { device: dev.name().to_owned(), what: what.into() },
        };
        let flags = self.flags;
        let Some(dev) = self.dev.as_deref_mut() else { return Ok(()) };
        let walk = |dev: &mut dyn MigrationDevice, to: MigState| {
            transition(dev, to).map(|t| t.data_fd).map_err(|e| Error::Device { device: id.clone(), source: e })
        };
        match c {
            Command::Prepare => {}
            Command::PreCopy => {
                control.status().stop_copy_size = dev.stop_copy_size().ok();
                if flags.contains(MigFlags::PRE_COPY) {
                    let fd = walk(dev, MigState::PreCopy)?
                        .ok_or_else(|| protocol(dev, "RUNNING -> PRE_COPY gave no data fd"))?;
                    control.status().precopy = true;
                    refresh_status(id, dev, fd.as_fd(), control)?;
                    self.precopy_fd = true;
                    self.handoff = Some(fd);
                } else {
                    // No pre-copy stream: no initial data to wait for (QEMU does not count such
                    // a device for switchover-ack either).
                    control.status().initial_data_sent = true;
                }
            }
            Command::Quiesce => {
                if flags.contains(MigFlags::P2P) {
                    let target = if self.precopy_fd { MigState::PreCopyP2p } else { MigState::RunningP2p };
                    if walk(dev, target)?.is_some() {
                        return Err(protocol(dev, "a walk to a P2P state created a data fd"));
                    }
                }
            }
            Command::StopCopy => {
                match (walk(dev, MigState::StopCopy)?, self.precopy_fd) {
                    // Only a walk through STOP makes a new fd: the pre-copy stream would be lost.
                    (Some(_), true) => return Err(protocol(dev, "PRE_COPY -> STOP_COPY created a new data fd")),
                    (Some(fd), false) => self.handoff = Some(fd),
                    (None, true) => {}
                    (None, false) => {
                        return Err(protocol(
                            dev,
                            "the device was already in STOP_COPY: its data stream was started by someone else",
                        ))
                    }
                }
                let mut st = control.status();
                st.initial_bytes = 0;
                st.dirty_bytes = 0;
            }
        }
        Ok(())
    }
}

/// Reads PRECOPY_INFO and MIG_DATA_SIZE into the status; returns how many bytes may be read
/// now. Marks the initial data sent once PRECOPY_INFO reports none left.
fn refresh_status(
    id: &DeviceId,
    dev: &dyn MigrationDevice,
    fd: BorrowedFd<'_>,
    control: &DeviceControl,
) -> Result<u64> {
    let info = dev.precopy_info(fd).map_err(|e| Error::Device { device: id.clone(), source: e })?;
    let size = dev.stop_copy_size().ok();
    let mut st = control.status();
    st.initial_bytes = info.initial_bytes;
    st.dirty_bytes = info.dirty_bytes;
    st.stop_copy_size = size.or(st.stop_copy_size);
    drop(st);
    if info.initial_bytes == 0 {
        initial_data_sent(control);
    }
    Ok(info.initial_bytes.saturating_add(info.dirty_bytes))
}

/// Marks the initial data as read and queued (once), with its event.
fn initial_data_sent(control: &DeviceControl) {
    let mut st = control.status();
    if !st.initial_data_sent {
        st.initial_data_sent = true;
        let id = st.id.clone();
        drop(st);
        control.event(SessionEvent::InitialDataSent(id));
    }
}

/// What a backend's device loop reads from and reports to.
/// `'a`: what the device thread borrows for its run; `'d`: the device itself.
pub(crate) struct DeviceCtx<'a, 'd: 'a> {
    pub(crate) id: &'a DeviceId,
    pub(crate) dev_no: DeviceIndex,
    pub(crate) control: &'a DeviceControl,
    abort: &'a AbortHandle,
    slot: &'a DeviceSlot<'d>,
    raw_config: &'a [u8],
    /// A raw stream's expected length (a regular file's size from its offset when added).
    raw_len: Option<u64>,
    owned_fd: Option<OwnedFd>,
    raw_fd: Option<BorrowedFd<'a>>,
    /// The last command taken over from the controller.
    applied: Command,
    phase: SourcePhase,
    marker_sent: bool,
    precopy_cap: u64,
    pub(crate) stop_copy_start: Instant,
}

impl<'a, 'd> DeviceCtx<'a, 'd> {
    /// A context for a device the engine walks (the controller makes its state changes).
    pub(crate) fn device(
        slot: &'a DeviceSlot<'d>,
        dev_no: DeviceIndex,
        control: &'a DeviceControl,
        abort: &'a AbortHandle,
        precopy_cap: u64,
    ) -> DeviceCtx<'a, 'd> {
        DeviceCtx::new(slot, dev_no, control, abort, &[], None, precopy_cap)
    }

    /// A context for a raw readable stream (already in STOP_COPY, or a file) and its config;
    /// `len`: the stream's length when known (a regular file's), checked before the config.
    pub(crate) fn raw(
        slot: &'a DeviceSlot<'d>,
        dev_no: DeviceIndex,
        control: &'a DeviceControl,
        abort: &'a AbortHandle,
        fd: BorrowedFd<'a>,
        (config, len): (&'a [u8], Option<u64>),
    ) -> DeviceCtx<'a, 'd> {
        let mut ctx = DeviceCtx::new(slot, dev_no, control, abort, config, Some(fd), 0);
        ctx.raw_len = len;
        ctx
    }

    fn new(
        slot: &'a DeviceSlot<'d>,
        dev_no: DeviceIndex,
        control: &'a DeviceControl,
        abort: &'a AbortHandle,
        raw_config: &'a [u8],
        raw_fd: Option<BorrowedFd<'a>>,
        precopy_cap: u64,
    ) -> DeviceCtx<'a, 'd> {
        DeviceCtx {
            id: &slot.id,
            dev_no,
            control,
            abort,
            slot,
            raw_config,
            raw_len: None,
            owned_fd: None,
            raw_fd,
            applied: Command::Prepare,
            phase: SourcePhase::Prepared,
            marker_sent: false,
            precopy_cap,
            stop_copy_start: Instant::now(),
        }
    }

    /// Closes the data fd: the save session ends with the walk that follows (the session's
    /// epilogue).
    pub(crate) fn close_data_fd(&mut self) {
        self.owned_fd = None;
    }

    /// The fd to read: the save data fd, or the raw stream.
    pub(crate) fn data_fd(&self) -> Option<BorrowedFd<'_>> {
        self.owned_fd.as_ref().map(|f| f.as_fd()).or(self.raw_fd)
    }

    /// What may be read now.
    pub(crate) fn read_mode(&self) -> ReadMode {
        match self.phase {
            SourcePhase::PreCopy if self.owned_fd.is_some() => ReadMode::PreCopy,
            SourcePhase::StopCopy => ReadMode::Stream,
            _ => ReadMode::Nothing,
        }
    }

    fn derr(&self, e: vfio_migration::Error) -> Error {
        Error::Device { device: self.id.clone(), source: e }
    }

    /// Takes over every state change the controller made since the last call, in order: the
    /// data fd a change created, and what may be read now. Returns whether there was any.
    ///
    /// # Errors
    /// [`Error::Aborted`] when the session was aborted.
    pub(crate) fn apply_commands(&mut self) -> Result<bool> {
        let mut any = false;
        while let Some(c) = self.control.pending(self.applied) {
            if self.abort.is_aborted() {
                return Err(Error::Aborted);
            }
            // The fd of RUNNING → PRE_COPY, or of STOP → STOP_COPY (a device without
            // PRE_COPY); a device thread that missed `PreCopy` gets its fd with `Quiesce`.
            if let Some(fd) = self.slot.lock().handoff.take() {
                self.owned_fd = Some(fd);
            }
            self.phase = match c {
                Command::Prepare => SourcePhase::Prepared,
                Command::PreCopy => SourcePhase::PreCopy,
                Command::Quiesce => SourcePhase::Quiesced,
                Command::StopCopy => {
                    self.stop_copy_start = Instant::now();
                    SourcePhase::StopCopy
                }
            };
            self.applied = c;
            self.control.ack(c);
            any = true;
        }
        Ok(any)
    }

    /// Reads at most `buf.len()` bytes of pre-copy data (initial and dirty), bounded by what
    /// PRECOPY_INFO reports as available and by the pre-copy byte cap. Nothing is read once
    /// the controller moved the device on (the next [`DeviceCtx::apply_commands`] takes it
    /// over).
    ///
    /// # Errors
    /// [`Error::Device`] for a failed ioctl or read.
    pub(crate) fn precopy_read(&mut self, buf: &mut [u8]) -> Result<PrecopyStep> {
        let slot = self.slot;
        let w = slot.lock();
        let (Some(dev), Some(fd), Command::PreCopy) = (w.dev.as_deref(), self.owned_fd.as_ref(), w.made) else {
            return Ok(PrecopyStep::Idle);
        };
        let avail = refresh_status(self.id, dev, fd.as_fd(), self.control)?;
        let room = self.precopy_cap.saturating_sub(self.control.status().precopy_bytes);
        let want = buf.len().min(usize::try_from(avail.min(room)).unwrap_or(usize::MAX));
        if want == 0 {
            self.control.status().precopy_rounds += 1;
            return Ok(PrecopyStep::Idle);
        }
        match dev.read_data(fd.as_fd(), &mut buf[..want]) {
            Ok(ReadOutcome::Data(n)) => {
                drop(w);
                let mut st = self.control.status();
                st.precopy_bytes += n as u64;
                let from_initial = st.initial_bytes.min(n as u64);
                st.initial_bytes -= from_initial;
                st.dirty_bytes = st.dirty_bytes.saturating_sub(n as u64 - from_initial);
                let initial_done = st.initial_bytes == 0;
                drop(st);
                if initial_done {
                    initial_data_sent(self.control);
                }
                Ok(PrecopyStep::Data(n))
            }
            // The temporary end of the pre-copy stream (ENOMSG; mtty's 0): nothing for now.
            Ok(ReadOutcome::Eof | ReadOutcome::NoMsg) => {
                drop(w);
                let mut st = self.control.status();
                st.initial_bytes = 0;
                st.dirty_bytes = 0;
                st.precopy_rounds += 1;
                drop(st);
                initial_data_sent(self.control);
                Ok(PrecopyStep::Idle)
            }
            Err(e) => Err(self.derr(e)),
        }
    }

    /// Whether the initial-data marker is due now (once): the device is in PRE_COPY, its
    /// initial data was read and queued, and the destination agreed to the return path
    /// (`return_path`). The caller sends it as the device's next packet, after all the
    /// initial data in index order.
    pub(crate) fn marker_due(&mut self, return_path: bool) -> bool {
        let due = return_path
            && !self.marker_sent
            && self.phase == SourcePhase::PreCopy
            && self.owned_fd.is_some()
            && self.control.status().initial_data_sent;
        self.marker_sent |= due;
        due
    }

    /// Counts bytes read in STOP_COPY into the status.
    pub(crate) fn stop_copy_read(&self, n: usize) {
        self.control.status().stop_copy_bytes += n as u64;
    }

    /// The device sent its last packet.
    pub(crate) fn done(&mut self) {
        self.phase = SourcePhase::Done;
        self.control.status().phase = SourcePhase::Done;
        self.control.event(SessionEvent::DeviceDone(self.id.clone()));
    }

    /// The config packet's payload, read after the data stream ended with `streamed` bytes.
    /// The rule that guards a raw stream of known length: the config (which lets the
    /// destination load the device) goes only after every byte the stream held when it was
    /// added.
    ///
    /// # Errors
    /// [`Error::Device`] when the device cannot produce it; [`Error::SourceChanged`] when a
    /// raw stream of known length gave another number of bytes.
    pub(crate) fn config(&mut self, streamed: u64) -> Result<Vec<u8>> {
        if let Some(expected) = self.raw_len.filter(|&l| l != streamed) {
            return Err(Error::SourceChanged { device: self.id.clone(), sent: streamed, expected });
        }
        match self.slot.lock().dev.as_deref_mut() {
            Some(dev) => dev.save_config().map_err(|e| Error::Device { device: self.id.clone(), source: e }),
            None => Ok(self.raw_config.to_vec()),
        }
    }
}

/// The controller's view of the devices: their state changes by device number. (It keeps the
/// devices' own lifetime out of the VMM's [`crate::SessionControl`].)
pub(crate) trait Walker: Sync {
    /// [`DeviceSlot::change`] of device `no`.
    ///
    /// # Errors
    /// As [`DeviceSlot::change`].
    fn change(&self, no: usize, c: Command, control: &DeviceControl, abort: &AbortHandle) -> Result<()>;
}

impl Walker for Vec<DeviceSlot<'_>> {
    fn change(&self, no: usize, c: Command, control: &DeviceControl, abort: &AbortHandle) -> Result<()> {
        self.get(no)
            .ok_or_else(|| Error::internal("a state change of a device that does not exist"))?
            .change(c, control, abort)
    }
}

impl std::fmt::Debug for dyn Walker + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Walker")
    }
}
