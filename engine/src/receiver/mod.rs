//! The destination side: multifd packets in, device state out.
//!
//! * `mod.rs` (this file): the public [`Receiver`], device targets and the report.
//! * `accept`: channel set-up (connections, init packets, strays, extra channels), running
//!   next to the backend for the whole receive.
//! * `reassembly`: per-packet admission within the memory budget and the write order (why it
//!   cannot deadlock is in its module docs).
//! * `core`: the run-wide rules (parked and closed channels, stuck detection, first error,
//!   the epilogue), shared by both backends.
//! * `uring` and `blocking`: the two backends.

pub(crate) mod accept;
mod blocking;
pub(crate) mod core;
pub(crate) mod reassembly;
mod uring;

use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use vfio_migration::{transition, MigFlags, MigState, MigrationDevice};

use self::accept::Channels;
use self::core::Warnings;
use self::reassembly::Reassembly;
use crate::abort::AbortHandle;
use crate::blocking::{recv_exact, Bounds, Fail};
use crate::config::ReceiverConfig;
use crate::error::{Error, Result};
use crate::ids::{ChannelId, DeviceIndex};
use crate::rp::{Message, Verdict};
use crate::stats::{BackendKind, ChannelCounters, Progress, ReceiverDeviceReport, ReceiverReport};
use crate::sys::Kernel;
use crate::wire::{
    DeviceId, DeviceStateHeader, VfioPacketHeader, DEVICE_STATE_HEADER_LEN, EXT_COMMIT, EXT_RETURN_PATH,
    VFIO_HEADER_LEN,
};

pub(crate) enum TargetKind<'a> {
    Device { dev: &'a mut dyn MigrationDevice, wanted_state: MigState, fd: Option<OwnedFd> },
    Fd { fd: BorrowedFd<'a>, config: &'a mut Vec<u8> },
}

/// The extension features this receiver accepts when the source offers them (channel set-up
/// answers channel 0's offer with them). `EXT_COMMIT` needs the receive to end when every
/// device is complete while channel 0 stays open (the source holds its FIN as the commit): it
/// does (`RecvState::freed`), and the sockets are left untouched for `wait_commit`.
pub(crate) const ACCEPTED_FEATURES: u8 = EXT_RETURN_PATH | EXT_COMMIT;

/// One destination device: where its stream is written and its config applied.
pub(crate) struct Target<'a> {
    pub(crate) id: DeviceId,
    pub(crate) kind: TargetKind<'a>,
    pub(crate) config_bytes: u64,
    pub(crate) short_writes: u64,
    /// The state the device reached after its config was applied.
    pub(crate) reached_state: Option<MigState>,
    /// When the device finished loading (config applied, device moved on).
    pub(crate) loaded_at: Option<Instant>,
    /// The outcome of RESUMING → STOP, once walked ([`Target::validate`]).
    pub(crate) validated: Option<Result<()>>,
    /// [`validate_targets`] took the outcome: the device is not walked again.
    collected: bool,
}

impl Target<'_> {
    /// The fd the stream is written to (`None` for a device before RESUMING or after its walk).
    pub(crate) fn data_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.kind {
            TargetKind::Device { fd, .. } => fd.as_ref().map(|f| f.as_fd()),
            TargetKind::Fd { fd, .. } => Some(*fd),
        }
    }

    /// Applies the config blob: the device's stream is complete. [`Target::validate`] follows
    /// (the backend calls it off its receive path).
    pub(crate) fn apply_config(&mut self, blob: &[u8]) -> Result<()> {
        self.config_bytes = blob.len() as u64;
        match &mut self.kind {
            TargetKind::Fd { config, .. } => {
                config.clear();
                config.extend_from_slice(blob);
            }
            TargetKind::Device { dev, .. } => {
                dev.load_config(blob).map_err(|e| Error::Device { device: self.id.clone(), source: e })?;
            }
        }
        self.loaded_at = Some(Instant::now());
        Ok(())
    }

    /// One pass of [`finish_targets`]: STOP (every device), RUNNING_P2P (devices that are to
    /// run and have P2P) or RUNNING (devices that are to run). Records where the device got;
    /// the resume fd is closed once the device left RESUMING.
    /// RESUMING → STOP as soon as this device's stream is complete (config applied), where the
    /// kernel validates it: a device's validation overlaps the other devices' transfer. The
    /// uAPI orders only that no device starts before every device is in STOP, which
    /// [`start_targets`] keeps. Once per device; the outcome is kept for [`validate_targets`].
    pub(crate) fn validate(&mut self) {
        if self.validated.is_none() && !self.collected && self.loaded_at.is_some() {
            self.validated = Some(self.walk_stop_once());
        }
    }

    /// RESUMING → STOP; a driver that panics there fails this device (its validation is not
    /// tried again), not the whole receive.
    fn walk_stop_once(&mut self) -> Result<()> {
        let id = self.id.clone();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.walk(MigState::Stop)))
            .unwrap_or_else(|_| Err(Error::internal(format!("validating {id} panicked (RESUMING -> STOP)"))))
    }

    /// Whether [`Target::validate`] has work to do once the stream is complete (a raw fd has
    /// no state to walk).
    pub(crate) fn is_device(&self) -> bool {
        matches!(self.kind, TargetKind::Device { .. })
    }

    fn walk(&mut self, pass: MigState) -> Result<()> {
        let TargetKind::Device { dev, wanted_state, fd } = &mut self.kind else { return Ok(()) };
        let flags = dev.migration_flags().map_err(|e| Error::Device { device: self.id.clone(), source: e })?;
        let to = match pass {
            MigState::Stop => MigState::Stop,
            // The P2P pass: devices that will run, and have P2P, stop there first.
            MigState::RunningP2p if *wanted_state != MigState::Stop && flags.contains(MigFlags::P2P) => {
                MigState::RunningP2p
            }
            MigState::Running if *wanted_state == MigState::Running => MigState::Running,
            _ => return Ok(()),
        };
        let r = transition(&mut **dev, to);
        if to == MigState::Stop {
            *fd = None;
        }
        r.map_err(|e| Error::Device { device: self.id.clone(), source: e })?;
        self.reached_state = Some(to);
        Ok(())
    }
}

/// What [`endgame`] found.
pub(crate) struct Endgame {
    /// Every device validated (RESUMING → STOP), or the first failure.
    validation: Result<()>,
    /// With the commit: why no FIN on channel 0 can be the commit any more (it came before the
    /// verdicts were sent, or channel 0 failed before them).
    no_commit: Option<String>,
    /// Sending the verdicts (an error only after a successful validation).
    verdicts: Result<()>,
    /// The commit wait and the start ([`commit_and_start`]), when the backend ran them
    /// ([`finish_early`]).
    started: Option<Result<()>>,
}

/// The steps after every device is complete and before the commit, written once for both
/// backends: the devices not validated yet are ([`validate_targets`]), and the verdicts go to
/// the source. The io_uring backend runs it as soon as the last device completed, while its
/// workers wind down (their rings cancel and close, their threads exit: 0.3 to 1 ms here);
/// else [`Receiver::run`] runs it after the backend returned. Its outcome is kept in
/// [`RecvShared::endgame`].
pub(crate) fn endgame(shared: &RecvShared<'_>, targets: &mut [&mut Target<'_>]) {
    let validation = validate_targets(targets);
    let no_commit = if validation.is_ok() && shared.commit_negotiated() { no_commit(shared) } else { None };
    // The verdicts say so, so that no source that reads them reports success while these
    // devices stay stopped.
    let early = no_commit.clone().map(|why| Error::NotCommitted { why });
    let failure = validation.as_ref().err().or(early.as_ref());
    let verdicts = shared.rp.get().map_or(Ok(()), |rp| send_verdicts(rp, targets.iter().map(|t| &t.id), failure));
    *shared.endgame.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(Endgame { validation, no_commit, verdicts, started: None });
}

/// With the commit, before the verdicts: why no later FIN on channel 0 can be the commit, if
/// none can. A FIN already there came before the source could see a verdict; a failure of
/// channel 0 (bytes that are no packet, a reset) while devices were still loading leaves no
/// channel the commit could come on.
fn no_commit(shared: &RecvShared<'_>) -> Option<String> {
    let early_fin = shared
        .channels
        .get(ChannelId::new(0))
        .is_some_and(|c| crate::sys::peek(c, &mut [0u8; 1]).is_ok_and(|n| n == 0));
    if early_fin {
        return Some("it closed channel 0 before the verdicts were sent, which is no commit".into());
    }
    shared
        .channels
        .ch0_failure()
        .map(|e| format!("channel 0, which carries the commit, failed before the verdicts: {e}"))
}

/// After every device is loaded: the devices not yet validated ([`Target::validate`], as each
/// stream completed) go RESUMING → STOP, where the kernel validates each stream, in parallel,
/// one scoped thread each (a driver may take long to check and load its state, and the
/// downtime runs meanwhile; the uAPI orders only that no device starts before all are in
/// STOP). Every device is validated even after another failed; the first failure in device
/// order is returned and the devices stay where it left them.
///
/// # Errors
/// [`Error::Device`] for the first device whose walk failed (a rejected stream fails
/// RESUMING → STOP with the driver's errno); [`Error::Internal`] for a device whose
/// validation thread could not be spawned or panicked.
fn validate_targets(targets: &mut [&mut Target<'_>]) -> Result<()> {
    let mut pending: Vec<&mut Target<'_>> =
        targets.iter_mut().filter(|t| t.validated.is_none()).map(|t| &mut **t).collect();
    if let Some((first, rest)) = pending.split_first_mut() {
        std::thread::scope(|s| {
            // The first device on this thread, the others on one scoped thread each.
            let handles: Vec<_> = rest
                .iter_mut()
                .map(|t| {
                    std::thread::Builder::new().name("vfmfd-validate".into()).spawn_scoped(s, move || walk_stop(t))
                })
                .collect();
            walk_stop(first);
            // A failed spawn or a panic leaves its device without an outcome: reported below.
            for h in handles.into_iter().flatten() {
                let _ = h.join();
            }
        });
    }
    let outcomes: Vec<Result<()>> = targets
        .iter_mut()
        .map(|t| {
            t.collected = true;
            t.validated.take().unwrap_or_else(|| {
                Err(Error::internal(format!("the validation thread of {} could not be spawned or panicked", t.id)))
            })
        })
        .collect();
    outcomes.into_iter().find_map(Result::err).map_or(Ok(()), Err)
}

fn walk_stop(t: &mut Target<'_>) {
    t.validated = Some(t.walk_stop_once());
}

/// After a successful [`endgame`], with every receive done: [`commit_and_start`], its outcome
/// kept in the endgame's. The io_uring backend runs it before its threads exit (their exits
/// would otherwise fall into the downtime); else [`Receiver::run`] runs it.
pub(crate) fn finish_early(shared: &RecvShared<'_>, targets: &mut [&mut Target<'_>]) {
    let mut g = shared.endgame.lock().unwrap_or_else(|p| p.into_inner());
    let Some(end) = g.as_mut() else { return };
    if end.validation.is_ok() && end.verdicts.is_ok() && end.started.is_none() {
        end.started = Some(commit_and_start(shared, targets, end.no_commit.as_deref()));
    }
}

/// With the two-phase commit, waits for it ([`wait_commit`]; `no_commit`: why none can come,
/// [`no_commit`]); then starts the devices ([`start_targets`]).
///
/// # Errors
/// [`Error::NotCommitted`], [`Error::Aborted`], or a device's failure to start.
fn commit_and_start(shared: &RecvShared<'_>, targets: &mut [&mut Target<'_>], no_commit: Option<&str>) -> Result<()> {
    if shared.commit_negotiated() {
        let ch0 =
            shared.channels.get(ChannelId::new(0)).ok_or_else(|| Error::internal("a commit without channel 0"))?;
        if let Some(why) = no_commit {
            return Err(Error::NotCommitted { why: why.to_owned() });
        }
        let taken = shared.ch0_after.lock().unwrap_or_else(|p| p.into_inner()).take();
        wait_commit(ch0, taken, shared.cfg.stall_timeout, &shared.abort)?;
    }
    start_targets(targets)?;
    let _ = shared.ready_at.set(Instant::now());
    let hook = shared.on_started.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(f) = hook {
        f();
    }
    Ok(())
}

/// After [`validate_targets`], P2P-safely, the devices that are to run: all to RUNNING_P2P,
/// then all to RUNNING (uAPI §2; QEMU's `vm_start` order).
///
/// # Errors
/// [`Error::Device`] for the first device that failed; the others stay where they are.
fn start_targets(targets: &mut [&mut Target<'_>]) -> Result<()> {
    for pass in [MigState::RunningP2p, MigState::Running] {
        for t in targets.iter_mut() {
            t.walk(pass)?;
        }
    }
    Ok(())
}

/// With the two-phase commit (`wire::EXT_COMMIT`), after the verdicts: waits (at most `limit`)
/// for the source's commit, the FIN on channel 0 right after its last packet. `taken`: what a
/// receive worker already took from channel 0 after the last device completed.
///
/// # Errors
/// [`Error::NotCommitted`] for a reset, bytes, or silence instead; [`Error::Aborted`].
fn wait_commit(
    ch0: BorrowedFd<'_>,
    taken: Option<std::result::Result<usize, std::io::Error>>,
    limit: Duration,
    abort: &AbortHandle,
) -> Result<()> {
    let mut b = [0u8; 1];
    let got = match taken {
        // A worker's receive already took it.
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(Fail::Os(e)),
        // What is already there first: a commit queued wins over an abort raised meanwhile
        // (the source, which saw "loaded" verdicts, has reported success). A socket error is
        // reported once, by this peek if it is pending: it is the answer then.
        None => match crate::sys::peek(ch0, &mut b) {
            Ok(0) => return Ok(()),
            Err(e) if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {
                Err(Fail::Os(e))
            }
            // Bytes (taken, as before) or nothing yet.
            _ => recv_exact(&Kernel, ch0, &mut b, Bounds::new(abort, limit)),
        },
    };
    let why = match got {
        Err(Fail::Eof { .. }) => return Ok(()),
        Err(Fail::Aborted) => return Err(Error::Aborted),
        Ok(()) => "it sent more bytes after its last packet".to_owned(),
        Err(Fail::Stalled) => format!("no FIN on channel 0 within the stall timeout ({limit:?})"),
        Err(Fail::Os(e)) if e.raw_os_error() == Some(libc::ECONNRESET) => {
            "it reset channel 0 (it cancelled or failed after the verdicts)".to_owned()
        }
        Err(Fail::Os(e)) => format!("reading channel 0: {e}"),
    };
    Err(Error::NotCommitted { why })
}

/// Receives the migration state of expected devices from N multifd channels and loads it.
///
/// ```no_run
/// use std::net::TcpListener;
/// use vfio_multifd::{DeviceId, Receiver, ReceiverConfig};
/// # fn device() -> Box<dyn vfio_migration::MigrationDevice> { unimplemented!() }
/// let listener = TcpListener::bind("0.0.0.0:4444")?;
/// let mut dev = device();
/// let mut rx = Receiver::new(ReceiverConfig::new())?;
/// rx.add_device(DeviceId::new("0000:00:02.0/vfio", 0)?, dev.as_mut());
/// let report = rx.run_listener(&listener, 4)?;
/// println!("loaded {} bytes", report.data_bytes());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Receiver<'a> {
    cfg: ReceiverConfig,
    targets: Vec<Target<'a>>,
    abort: AbortHandle,
    progress: Progress,
    on_started: Option<StartedHook<'a>>,
}

/// What [`Receiver::on_started`] calls.
type StartedHook<'a> = Box<dyn FnOnce() + Send + 'a>;

impl std::fmt::Debug for Receiver<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("cfg", &self.cfg)
            .field("devices", &self.targets.iter().map(|t| t.id.clone()).collect::<Vec<_>>())
            .finish()
    }
}

/// Shared context of one receive.
pub(crate) struct RecvShared<'c> {
    pub(crate) cfg: &'c ReceiverConfig,
    /// How many devices this receiver expects.
    pub(crate) devices: usize,
    /// Channel sockets by channel id, published as their init packets are validated.
    pub(crate) channels: &'c Channels,
    /// The return path on channel 0, once the source offered it and this side accepted.
    pub(crate) rp: OnceLock<crate::rp::Writer<'c>>,
    pub(crate) counters: Vec<ChannelCounters>,
    pub(crate) abort: AbortHandle,
    pub(crate) progress: Progress,
    /// What did not fail the receive but should be known (bounded).
    pub(crate) warnings: Mutex<Warnings>,
    /// Worker rings and the pool, released when the receiver returns (after the switchover).
    pub(crate) deferred: crate::uring::Deferred,
    /// The outcome of [`endgame`], once run.
    pub(crate) endgame: Mutex<Option<Endgame>>,
    /// What a worker's receive still took from channel 0 after every device completed (bytes
    /// or an error such as a reset), for the commit: the io_uring workers may still have a
    /// receive there while the verdicts go out, and a reset is reported only once.
    pub(crate) ch0_after: Mutex<Option<std::result::Result<usize, std::io::Error>>>,
    /// [`Receiver::on_started`]'s hook, until called.
    on_started: Mutex<Option<StartedHook<'c>>>,
    /// Connections that were not channels yet when channel set-up failed, closed when the
    /// receive returns (after the failure verdicts; `accept::run`).
    pub(crate) held: Mutex<Vec<OwnedFd>>,
    /// When every device reached its final state.
    ready_at: OnceLock<Instant>,
}

impl RecvShared<'_> {
    /// Whether the two-phase commit was negotiated (return path and `EXT_COMMIT`).
    pub(crate) fn commit_negotiated(&self) -> bool {
        self.rp.get().is_some() && self.channels.features() & EXT_COMMIT != 0
    }

    /// Decodes a whole packet header received on `ch` (both parts, every rule of
    /// `wire.rs`, the size bound from `max_packet_bytes`).
    ///
    /// # Errors
    /// [`Error::Wire`] naming the channel and which part is invalid.
    pub(crate) fn decode_header(&self, ch: ChannelId, hdr: &[u8]) -> Result<(DeviceStateHeader, VfioPacketHeader)> {
        let max = u32::try_from(self.cfg.max_packet_bytes + VFIO_HEADER_LEN).unwrap_or(u32::MAX);
        let wire = |what| move |source| Error::Wire { channel: ch, what, source };
        let h = DeviceStateHeader::decode(hdr, max).map_err(wire("device state packet header"))?;
        let v = VfioPacketHeader::decode(&hdr[DEVICE_STATE_HEADER_LEN..])
            .map_err(wire("VFIO device state packet header"))?;
        Ok((h, v))
    }

    /// A device's initial-data marker was reached: every packet before it is in the device.
    /// Tells the source (QEMU's switchover-ack, per device).
    ///
    /// # Errors
    /// [`Error::ReturnPath`] when the message cannot be sent.
    pub(crate) fn initial_data_loaded(&self, device: &DeviceId) -> Result<()> {
        match self.rp.get() {
            Some(rp) => rp.send(&Message::SwitchoverAck { device: device.clone() }),
            None => Err(Error::internal("a marker was admitted without a return path")),
        }
    }
}

impl<'a> Receiver<'a> {
    /// A receiver with no devices yet.
    ///
    /// # Errors
    /// eventfd creation failures (for the abort handle: the process is out of descriptors).
    pub fn new(cfg: ReceiverConfig) -> Result<Receiver<'a>> {
        let abort = AbortHandle::new().map_err(|e| Error::sys("eventfd", e))?;
        Ok(Receiver { cfg, targets: Vec::new(), abort, progress: Progress::default(), on_started: None })
    }

    /// Expects a device: with every other device, it is walked to RESUMING before the channels
    /// are read; its stream is written in order and its config loaded; then it goes RESUMING →
    /// STOP (the kernel validates the stream there) while the other devices may still arrive,
    /// and it stays in STOP for the VMM to start.
    pub fn add_device(&mut self, id: DeviceId, dev: &'a mut dyn MigrationDevice) -> &mut Self {
        self.add_device_with(id, dev, MigState::Stop)
    }

    /// As [`Receiver::add_device`], leaving the device in `final_state`: STOP, RUNNING_P2P or
    /// RUNNING. Devices that are to run are started together after every device was validated:
    /// all to RUNNING_P2P first (those with P2P), then all to RUNNING.
    pub fn add_device_with(
        &mut self,
        id: DeviceId,
        dev: &'a mut dyn MigrationDevice,
        final_state: MigState,
    ) -> &mut Self {
        self.targets.push(Target {
            id,
            kind: TargetKind::Device { dev, wanted_state: final_state, fd: None },
            config_bytes: 0,
            short_writes: 0,
            reached_state: None,
            loaded_at: None,
            validated: None,
            collected: false,
        });
        self
    }

    /// Expects a device whose stream goes to a writable fd (a RESUMING data fd the VMM owns, or
    /// a file); its config blob is stored into `config`.
    ///
    /// A pipe or FIFO is switched to `O_NONBLOCK` (on its open file description, so its other
    /// users see it too): a blocking write to a pipe whose reader stopped would wait in the
    /// kernel past any timeout, while a non-blocking one waits for `POLLOUT` under the stall
    /// timeout.
    pub fn add_data_fd(&mut self, id: DeviceId, fd: BorrowedFd<'a>, config: &'a mut Vec<u8>) -> &mut Self {
        crate::sys::nonblocking_if_pipe(fd);
        self.targets.push(Target {
            id,
            kind: TargetKind::Fd { fd, config },
            config_bytes: 0,
            short_writes: 0,
            reached_state: None,
            loaded_at: None,
            validated: None,
            collected: false,
        });
        self
    }

    /// A handle that aborts this receive from any thread.
    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    /// A handle to watch the bytes written to devices so far from any thread.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Calls `f` once, after a successful receive, as soon as every device is validated and in
    /// its final state (started, for devices added to run; after the commit when one was
    /// agreed) and before the receive's threads are joined and its rings and memory released:
    /// the end of the destination's share of the downtime. A VMM resumes its vCPUs here rather
    /// than when [`Receiver::run`] returns, which adds that teardown (0.3 to 0.6 ms with four
    /// devices on a 2-CPU VM). It runs on the receive's thread and must not block; it is not
    /// called when the receive fails.
    pub fn on_started(&mut self, f: impl FnOnce() + Send + 'a) -> &mut Self {
        self.on_started = Some(Box::new(f));
        self
    }

    /// Takes `channels` channels from `listener` and runs. Connections are validated
    /// concurrently: a connection becomes a channel as soon as its init packet is valid (and is
    /// received from at once), one that sends nothing valid is dropped with a warning, and the
    /// accept timeout bounds the whole set-up, counted from its start. The listener is watched
    /// until the receive ends: a connection announcing a channel id at or above `channels`
    /// fails the receive ([`Error::ChannelCount`]).
    ///
    /// # Errors
    /// As [`Receiver::run`], plus accept failures, [`Error::ChannelCount`] and the accept
    /// timeout ([`Error::Timeout`], naming the channels missing and the connections dropped).
    pub fn run_listener(self, listener: &TcpListener, channels: usize) -> Result<ReceiverReport> {
        self.run_with(Some(listener), channels, Vec::new())
    }

    /// Walks every device to RESUMING (they all enter it before any channel is read).
    fn enter_resuming(&mut self) -> Result<()> {
        for t in &mut self.targets {
            if let TargetKind::Device { dev, fd, .. } = &mut t.kind {
                let tr = transition(&mut **dev, MigState::Resuming)
                    .map_err(|e| Error::Device { device: t.id.clone(), source: e })?;
                let Some(f) = tr.data_fd else {
                    return Err(Error::Device {
                        device: t.id.clone(),
                        source: vfio_migration::Error::Protocol {
                            device: dev.name().to_owned(),
                            what: "device was already RESUMING: its resume session belongs to someone else".into(),
                        },
                    });
                };
                *fd = Some(f);
            }
        }
        Ok(())
    }

    /// Runs on already accepted sockets (any order: each one's init packet says which channel it
    /// is; each is received from as soon as its init packet is valid). Returns once every
    /// device is loaded; channels still open then (QEMU leaves them open) are not waited for.
    ///
    /// # Errors
    /// The first failure, naming the channel, device and packet index. Devices are left where
    /// the failure left them (RESUMING, typically; STOP for a device whose own stream was
    /// complete and validated before), which a reset recovers.
    pub fn run(self, socks: Vec<OwnedFd>) -> Result<ReceiverReport> {
        let n = socks.len();
        self.run_with(None, n, socks)
    }

    fn run_with(mut self, listener: Option<&TcpListener>, n: usize, socks: Vec<OwnedFd>) -> Result<ReceiverReport> {
        self.cfg.validate(n, self.targets.len())?;
        for (i, a) in self.targets.iter().enumerate() {
            if self.targets[..i].iter().any(|b| b.id == a.id) {
                return Err(Error::Config(format!("device {} expected twice", a.id)));
            }
        }
        let (backend, fallback_reason) = crate::backend::choose(self.cfg.backend)?;
        self.enter_resuming()?;
        let started = Instant::now();
        let workers = if backend == BackendKind::Uring { self.cfg.workers_for(n) } else { 0 };
        let chans = Channels::new(n, workers)?;
        let shared = RecvShared {
            cfg: &self.cfg,
            devices: self.targets.len(),
            channels: &chans,
            rp: OnceLock::new(),
            counters: (0..n).map(|_| ChannelCounters::default()).collect(),
            abort: self.abort.clone(),
            progress: self.progress.clone(),
            warnings: Mutex::new(Warnings::default()),
            deferred: crate::uring::Deferred::default(),
            endgame: Mutex::new(None),
            ch0_after: Mutex::new(None),
            on_started: Mutex::new(self.on_started.take()),
            held: Mutex::new(Vec::new()),
            ready_at: OnceLock::new(),
        };
        let budget = self.cfg.budget_for(n);
        let ids = self.targets.iter().map(|t| t.id.clone()).collect();
        let mut reassembly = Reassembly::new(ids, budget, self.cfg.max_packet_bytes, false);
        let res = receive(&shared, backend, listener, socks, &mut reassembly, &mut self.targets);
        let end = conclude(&shared, &mut self.targets, res)?;
        end.verdicts?;
        end.validation?;
        match end.started {
            Some(started) => started?,
            None => {
                commit_and_start(&shared, &mut self.targets.iter_mut().collect::<Vec<_>>(), end.no_commit.as_deref())?
            }
        }
        let devices_ready_after = shared.ready_at.get().map_or_else(|| started.elapsed(), |t| *t - started);
        let devices = device_reports(&self.targets, &reassembly, started);
        let warnings = std::mem::take(&mut *shared.warnings.lock().unwrap_or_else(|p| p.into_inner())).into_vec();
        Ok(ReceiverReport {
            backend,
            fallback_reason,
            elapsed: started.elapsed(),
            devices,
            channels: ChannelId::all(n).map(|c| shared.counters[c.index()].report(c)).collect(),
            peak_held_bytes: reassembly.peak_held(),
            reserved_bytes: (reassembly.block_count() * reassembly.block_bytes()) as u64,
            devices_ready_after,
            return_path: shared.rp.get().is_some(),
            warnings,
        })
    }
}

/// Each device's part of the report; `loaded_after` counts from `started`.
fn device_reports(targets: &[Target<'_>], reassembly: &Reassembly, started: Instant) -> Vec<ReceiverDeviceReport> {
    targets
        .iter()
        .zip(DeviceIndex::all(targets.len()))
        .map(|(t, d)| {
            let c = reassembly.counters(d);
            ReceiverDeviceReport {
                id: t.id.clone(),
                data_bytes: c.data_bytes,
                packets: c.packets,
                out_of_order_packets: c.out_of_order,
                config_bytes: t.config_bytes,
                short_writes: t.short_writes,
                reached_state: t.reached_state,
                loaded_after: t.loaded_at.map(|t| t.saturating_duration_since(started)),
            }
        })
        .collect()
}

/// The receive's outcome taken to the endgame's: the endgame run by the backend (a failure
/// after it is a warning), else run now after a success; after a failure, the verdicts say so
/// (best effort).
///
/// # Errors
/// The receive's failure.
fn conclude(shared: &RecvShared<'_>, targets: &mut [Target<'_>], res: Result<()>) -> Result<Endgame> {
    let ran = shared.endgame.lock().unwrap_or_else(|p| p.into_inner()).take();
    match (ran, res) {
        (Some(end), Ok(())) => Ok(end),
        (Some(end), Err(e)) => {
            // Every device was complete, validated and its verdict sent: what failed while
            // the backend wound down no longer changes the outcome (the abort is still
            // honoured by the commit wait).
            let w = format!("{e} (after every device was complete; ignored)");
            shared.warnings.lock().unwrap_or_else(|p| p.into_inner()).push(w);
            Ok(end)
        }
        (None, Ok(())) => {
            endgame(shared, &mut targets.iter_mut().collect::<Vec<_>>());
            shared.endgame.lock().unwrap_or_else(|p| p.into_inner()).take().ok_or_else(|| Error::internal("no endgame"))
        }
        (None, Err(e)) => {
            if let Some(rp) = shared.rp.get() {
                // Best effort: the source may be gone.
                let _ = send_verdicts(rp, targets.iter().map(|t| &t.id), Some(&e));
            }
            Err(e)
        }
    }
}

/// The receive itself: channel set-up on its own thread, next to the backend, for the whole
/// receive.
///
/// # Errors
/// A set-up failure (an extra channel, the accept timeout) before whatever the backend saw
/// after it; else the backend's.
fn receive(
    shared: &RecvShared<'_>,
    backend: BackendKind,
    listener: Option<&TcpListener>,
    socks: Vec<OwnedFd>,
    reassembly: &mut Reassembly,
    targets: &mut [Target<'_>],
) -> Result<()> {
    std::thread::scope(|s| {
        let acc = std::thread::Builder::new()
            .name("vfmfd-accept".into())
            .spawn_scoped(s, move || {
                let r = accept::run(shared, listener, socks);
                if r.as_ref().is_err_and(|e| !e.is_aborted()) {
                    shared.abort.abort();
                }
                r
            })
            .map_err(|e| Error::sys("spawn the channel set-up thread", e))?;
        let res = match backend {
            BackendKind::Uring => uring::run(shared, reassembly, targets),
            BackendKind::Blocking => blocking::run(shared, reassembly, targets),
        };
        shared.channels.stop_accepting();
        if res.is_ok() {
            note_leftovers(shared);
        }
        let acc = acc.join().unwrap_or_else(|_| Err(Error::internal("the channel set-up thread panicked")));
        match (acc, res) {
            (Err(e), _) if !e.is_aborted() => Err(e),
            (_, r) => r,
        }
    })
}

/// After every device completed: what is still queued on a channel (one more packet, bytes, a
/// reset) is a warning. Nothing is consumed: channel 0 may still carry the source's commit.
fn note_leftovers(shared: &RecvShared<'_>) {
    // With the commit, channel 0 is the commit's to judge (`wait_commit`): a peek would
    // consume a reset, which the kernel reports once.
    let first = usize::from(shared.commit_negotiated());
    for c in ChannelId::all(shared.channels.count()).skip(first) {
        let Some(fd) = shared.channels.get(c) else { continue };
        let mut b = [0u8; 4096];
        let what = match crate::sys::peek(fd, &mut b) {
            // The peer closed, or nothing is queued on a channel that stays open (as QEMU's do).
            Ok(0) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Ok(n) if n == b.len() => format!("{n} or more unread bytes"),
            Ok(n) => format!("{n} unread byte(s)"),
            Err(e) => e.to_string(),
        };
        let w = format!("channel {c}: {what} after every device completed (ignored)");
        shared.warnings.lock().unwrap_or_else(|p| p.into_inner()).push(w);
    }
}

/// How long failure verdicts may wait for room on channel 0 (they are best effort).
const FAILURE_VERDICTS_WAIT: Duration = Duration::from_secs(2);

/// Tells the source, per device, whether it was loaded, validated and put in its final state
/// (else the error), then `SHUT`. Best effort after a failure (at most
/// [`FAILURE_VERDICTS_WAIT`], even after the abort): the source may be gone.
fn send_verdicts<'t>(
    rp: &crate::rp::Writer<'_>,
    ids: impl Iterator<Item = &'t DeviceId>,
    failure: Option<&Error>,
) -> Result<()> {
    let what = failure.map(ToString::to_string);
    let mut msgs: Vec<Message> = ids
        .map(|id| {
            let verdict = match &what {
                None => Verdict::Loaded,
                Some(e) => Verdict::Failed { what: e.clone() },
            };
            Message::Verdict { device: id.clone(), verdict }
        })
        .collect();
    msgs.push(Message::Shut { ok: failure.is_none() });
    // One write: the verdicts are a few hundred bytes, and each write would wake the source.
    if failure.is_none() {
        return rp.send_batch(&msgs);
    }
    // Best effort, and even after the abort the failure raised: the source may be gone.
    let _ = rp.send_batch_after_failure(&msgs, FAILURE_VERDICTS_WAIT);
    Ok(())
}
