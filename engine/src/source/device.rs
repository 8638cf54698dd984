//! One source device as its thread sees it: the device (or a raw fd), its data fd, and the
//! phase machine that applies the controller's commands. The state changes of a session are
//! written here once, for both backends:
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

/// What a backend's device loop reads from and reports to.
/// `'a`: what the device thread borrows for its run; `'d`: the device itself, handed back at the
/// end for the session's epilogue.
pub(crate) struct DeviceCtx<'a, 'd: 'a> {
    pub(crate) id: &'a DeviceId,
    pub(crate) dev_no: DeviceIndex,
    pub(crate) control: &'a DeviceControl,
    abort: &'a AbortHandle,
    dev: Option<&'d mut (dyn MigrationDevice + 'd)>,
    flags: MigFlags,
    raw_config: &'a [u8],
    /// A raw stream's expected length (a regular file's size from its offset when added).
    raw_len: Option<u64>,
    owned_fd: Option<OwnedFd>,
    raw_fd: Option<BorrowedFd<'a>>,
    applied: Command,
    phase: SourcePhase,
    marker_sent: bool,
    precopy_cap: u64,
    pub(crate) stop_copy_start: Instant,
}

impl<'a, 'd> DeviceCtx<'a, 'd> {
    /// A context for a device the engine walks.
    ///
    /// # Errors
    /// [`Error::Device`] when its migration flags cannot be read.
    pub(crate) fn device(
        id: &'a DeviceId,
        dev_no: DeviceIndex,
        control: &'a DeviceControl,
        abort: &'a AbortHandle,
        dev: &'d mut (dyn MigrationDevice + 'd),
        precopy_cap: u64,
    ) -> Result<DeviceCtx<'a, 'd>> {
        let flags = dev.migration_flags().map_err(|e| Error::Device { device: id.clone(), source: e })?;
        Ok(DeviceCtx::new(id, dev_no, control, abort, Some(dev), flags, &[], None, precopy_cap))
    }

    /// A context for a raw readable stream (already in STOP_COPY, or a file) and its config;
    /// `len`: the stream's length when known (a regular file's), checked before the config.
    pub(crate) fn raw(
        id: &'a DeviceId,
        dev_no: DeviceIndex,
        control: &'a DeviceControl,
        abort: &'a AbortHandle,
        fd: BorrowedFd<'a>,
        (config, len): (&'a [u8], Option<u64>),
    ) -> DeviceCtx<'a, 'd> {
        let mut ctx = DeviceCtx::new(id, dev_no, control, abort, None, MigFlags::STOP_COPY, config, Some(fd), 0);
        ctx.raw_len = len;
        ctx
    }

    #[allow(clippy::too_many_arguments)] // the two constructors above are the interface
    fn new(
        id: &'a DeviceId,
        dev_no: DeviceIndex,
        control: &'a DeviceControl,
        abort: &'a AbortHandle,
        dev: Option<&'d mut (dyn MigrationDevice + 'd)>,
        flags: MigFlags,
        raw_config: &'a [u8],
        raw_fd: Option<BorrowedFd<'a>>,
        precopy_cap: u64,
    ) -> DeviceCtx<'a, 'd> {
        DeviceCtx {
            id,
            dev_no,
            control,
            abort,
            dev,
            flags,
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

    /// Gives the device back (for the session's epilogue), closing the data fd first: the save
    /// session ends with the walk that follows.
    pub(crate) fn into_device(mut self) -> Option<&'d mut (dyn MigrationDevice + 'd)> {
        self.owned_fd = None;
        self.dev.take()
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

    /// Applies every command waiting for this device, in order; returns whether any was
    /// applied.
    ///
    /// # Errors
    /// [`Error::Aborted`] when the session was aborted before a state change;
    /// [`Error::Device`] when a state change failed.
    pub(crate) fn apply_commands(&mut self) -> Result<bool> {
        let mut any = false;
        while let Some(c) = self.control.pending(self.applied) {
            if self.abort.is_aborted() {
                return Err(Error::Aborted);
            }
            self.apply(c)?;
            self.applied = c;
            self.control.status().phase = self.phase;
            self.control.ack(c);
            any = true;
        }
        Ok(any)
    }

    fn apply(&mut self, c: Command) -> Result<()> {
        match c {
            Command::Prepare => {}
            Command::PreCopy => {
                if let Some(dev) = self.dev.as_deref() {
                    self.control.status().stop_copy_size = dev.stop_copy_size().ok();
                }
                if self.flags.contains(MigFlags::PRE_COPY) && self.dev.is_some() {
                    let fd = self.walk(MigState::PreCopy)?;
                    self.owned_fd = Some(fd.ok_or_else(|| self.protocol("RUNNING -> PRE_COPY gave no data fd"))?);
                    self.control.status().precopy = true;
                    self.refresh_status()?;
                } else {
                    // No pre-copy stream: no initial data to wait for (QEMU does not count such
                    // a device for switchover-ack either).
                    self.control.status().initial_data_sent = true;
                }
                self.phase = SourcePhase::PreCopy;
            }
            Command::Quiesce => {
                if self.flags.contains(MigFlags::P2P) && self.dev.is_some() {
                    let target = if self.owned_fd.is_some() { MigState::PreCopyP2p } else { MigState::RunningP2p };
                    if self.walk(target)?.is_some() {
                        return Err(self.protocol("a walk to a P2P state created a data fd"));
                    }
                }
                self.phase = SourcePhase::Quiesced;
            }
            Command::StopCopy => {
                if self.dev.is_some() {
                    match (self.walk(MigState::StopCopy)?, &self.owned_fd) {
                        (Some(_), Some(_)) => {
                            // Only a walk through STOP makes a new fd: the pre-copy stream would
                            // be lost.
                            return Err(self.protocol("PRE_COPY -> STOP_COPY created a new data fd"));
                        }
                        (Some(fd), None) => self.owned_fd = Some(fd),
                        (None, Some(_)) => {}
                        (None, None) => {
                            return Err(self.protocol(
                                "the device was already in STOP_COPY: its data stream was started by someone else",
                            ))
                        }
                    }
                }
                self.phase = SourcePhase::StopCopy;
                self.stop_copy_start = Instant::now();
                let mut st = self.control.status();
                st.initial_bytes = 0;
                st.dirty_bytes = 0;
            }
        }
        Ok(())
    }

    fn walk(&mut self, to: MigState) -> Result<Option<OwnedFd>> {
        let id = self.id;
        let dev = self.dev.as_deref_mut().ok_or_else(|| Error::internal("walk of a raw fd"))?;
        transition(dev, to).map(|t| t.data_fd).map_err(|e| Error::Device { device: id.clone(), source: e })
    }

    fn protocol(&self, what: &str) -> Error {
        let device = self.dev.as_deref().map_or_else(|| self.id.to_string(), |d| d.name().to_owned());
        self.derr(vfio_migration::Error::Protocol { device, what: what.into() })
    }

    /// Reads PRECOPY_INFO and MIG_DATA_SIZE into the status; returns how many bytes may be
    /// read now.
    fn refresh_status(&mut self) -> Result<u64> {
        let (Some(dev), Some(fd)) = (self.dev.as_deref(), self.owned_fd.as_ref()) else { return Ok(0) };
        let info = dev.precopy_info(fd.as_fd()).map_err(|e| Error::Device { device: self.id.clone(), source: e })?;
        let size = dev.stop_copy_size().ok();
        let mut st = self.control.status();
        st.initial_bytes = info.initial_bytes;
        st.dirty_bytes = info.dirty_bytes;
        st.stop_copy_size = size.or(st.stop_copy_size);
        drop(st);
        if info.initial_bytes == 0 {
            self.initial_data_sent();
        }
        Ok(info.initial_bytes.saturating_add(info.dirty_bytes))
    }

    /// Reads at most `buf.len()` bytes of pre-copy data (initial and dirty), bounded by what
    /// PRECOPY_INFO reports as available and by the pre-copy byte cap.
    ///
    /// # Errors
    /// [`Error::Device`] for a failed ioctl or read.
    pub(crate) fn precopy_read(&mut self, buf: &mut [u8]) -> Result<PrecopyStep> {
        let avail = self.refresh_status()?;
        let room = self.precopy_cap.saturating_sub(self.control.status().precopy_bytes);
        let want = buf.len().min(usize::try_from(avail.min(room)).unwrap_or(usize::MAX));
        if want == 0 {
            self.control.status().precopy_rounds += 1;
            return Ok(PrecopyStep::Idle);
        }
        let (Some(dev), Some(fd)) = (self.dev.as_deref(), self.owned_fd.as_ref()) else { return Ok(PrecopyStep::Idle) };
        match dev.read_data(fd.as_fd(), &mut buf[..want]) {
            Ok(ReadOutcome::Data(n)) => {
                let mut st = self.control.status();
                st.precopy_bytes += n as u64;
                let from_initial = st.initial_bytes.min(n as u64);
                st.initial_bytes -= from_initial;
                st.dirty_bytes = st.dirty_bytes.saturating_sub(n as u64 - from_initial);
                let initial_done = st.initial_bytes == 0;
                drop(st);
                if initial_done {
                    self.initial_data_sent();
                }
                Ok(PrecopyStep::Data(n))
            }
            // The temporary end of the pre-copy stream (ENOMSG; mtty's 0): nothing for now.
            Ok(ReadOutcome::Eof | ReadOutcome::NoMsg) => {
                let mut st = self.control.status();
                st.initial_bytes = 0;
                st.dirty_bytes = 0;
                st.precopy_rounds += 1;
                drop(st);
                self.initial_data_sent();
                Ok(PrecopyStep::Idle)
            }
            Err(e) => Err(self.derr(e)),
        }
    }

    /// Marks the initial data as read and queued (once), with its event.
    fn initial_data_sent(&self) {
        let mut st = self.control.status();
        if !st.initial_data_sent {
            st.initial_data_sent = true;
            let id = st.id.clone();
            drop(st);
            self.control.event(SessionEvent::InitialDataSent(id));
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
        match self.dev.as_deref_mut() {
            Some(dev) => dev.save_config().map_err(|e| Error::Device { device: self.id.clone(), source: e }),
            None => Ok(self.raw_config.to_vec()),
        }
    }
}
