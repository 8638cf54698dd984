//! The live-migration source session a VMM drives: set-up before the guest stops, pre-copy
//! while it runs, a switchover the VMM decides, P2P-safe ordering, cancel from any thread.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vfio_migration::{recover, transition, MigFlags, MigState, MigrationDevice};

use crate::abort::AbortHandle;
use crate::config::{SourceConfig, ZeroCopy};
use crate::error::{Error, Result};
use crate::ids::{ChannelId, DeviceIndex};
use crate::source::control::{Command, DeviceControl, DeviceStatus, Events, SessionEvent};
use crate::source::core::Tallies;
use crate::source::device::{DeviceCtx, DeviceSlot, Walker};
use crate::source::lease::ChannelLeases;
use crate::source::rpath::{self, RpState, Verdicts};
use crate::source::{blocking, close, uring, DeviceOptions, SourceShared};
use crate::stats::{BackendKind, ChannelCounters, Latency, Progress, SourceReport};
use crate::sys;
use crate::wire::{DeviceId, InitPacket, EXT_COMMIT, EXT_RETURN_PATH, INIT_PACKET_LEN};
use crate::Verdict;

pub(crate) enum SourceKind<'a> {
    Device { dev: &'a mut dyn MigrationDevice, opts: DeviceOptions },
    Fd { fd: BorrowedFd<'a>, config: &'a [u8], len: Option<u64> },
}

pub(crate) struct SourceDevice<'a> {
    pub(crate) id: DeviceId,
    pub(crate) kind: SourceKind<'a>,
}

/// The last rate sample `(when, bytes sent)`, and the smoothed rate so far.
type RateSample = (Option<(Instant, u64)>, Option<f64>);

/// The slowest rate the switchover estimate assumes (bytes per second): a pre-copy that moved
/// only a few bytes says nothing about what the channels carry.
const MIN_RATE: f64 = 10.0 * 1024.0 * 1024.0;

/// The shortest window over which the channels' rate is measured.
const RATE_WINDOW: Duration = Duration::from_millis(100);

/// How long set-up waits for the destination to accept the return path it was offered.
const HELLO_WAIT: Duration = Duration::from_secs(1);

/// A live-migration source: the devices' state over N multifd channels, driven by a VMM.
///
/// [`SourceSession::run`] does all set-up first (init packets on every channel, one thread
/// with its ring and registered buffers per device) while the guest still runs, then hands the
/// VMM a [`SessionControl`] on the calling thread. The VMM starts pre-copy
/// ([`SessionControl::start_precopy`]: devices with PRE_COPY stream their initial and dirty
/// data), watches [`SessionControl::status`] or [`SessionControl::next_event`] for its
/// convergence decision, stops its vCPUs, and calls [`SessionControl::switchover`]: every device
/// reaches its P2P-quiesced state before any device stops, then each streams the rest of its
/// state and its config. The engine never changes a device's state on its own schedule.
///
/// On any failure or cancel ([`SessionControl::cancel`], [`SourceSession::abort_handle`]), every
/// device, including those that had finished, is put back to RUNNING, P2P-safely: all to
/// RUNNING_P2P first, then all to RUNNING.
///
/// ```no_run
/// use std::time::Duration;
/// use vfio_multifd::{DeviceId, SourceConfig, SourceSession};
/// # fn device() -> Box<dyn vfio_migration::MigrationDevice> { unimplemented!() }
/// # fn pause_vcpus() {}
/// let mut dev = device();
/// let mut session = SourceSession::connect(SourceConfig::new(), "192.0.2.1:4444", 4)?;
/// session.add_device(DeviceId::new("0000:00:02.0/vfio", 0)?, dev.as_mut());
/// let ((), report) = session.run(|ctl| {
///     ctl.start_precopy()?;
///     // Converge: until the initial data is out and the rest fits the downtime budget.
///     while !ctl.status().converged(Duration::from_millis(300)) {
///         ctl.next_event(Duration::from_millis(50));
///     }
///     pause_vcpus();
///     ctl.switchover()
/// })?;
/// println!("{} bytes, {} in pre-copy", report.data_bytes(), report.precopy_bytes());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SourceSession<'a> {
    cfg: SourceConfig,
    channels: Vec<OwnedFd>,
    devices: Vec<SourceDevice<'a>>,
    abort: AbortHandle,
    progress: Progress,
}

impl std::fmt::Debug for SourceSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceSession")
            .field("cfg", &self.cfg)
            .field("channels", &self.channels.len())
            .field("devices", &self.devices.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
            .finish()
    }
}

/// A session's live status, from [`SessionControl::status`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SessionStatus {
    /// Per device, in the order they were added.
    pub devices: Vec<DeviceStatus>,
    /// Device bytes sent so far (all phases).
    pub sent_bytes: u64,
    /// What the channels can carry (bytes per second): `SourceConfig::switchover_bandwidth` if
    /// set, else the fastest window (≥ 100 ms, sampled at each `status()` call) since pre-copy
    /// started; an idle or nearly idle pre-copy does not lower it.
    pub rate_bytes_per_sec: Option<f64>,
    /// What is left to send at switchover, per the devices' own estimates: each device's
    /// `stop_copy_size` (MIG_DATA_SIZE) where known, else its pending pre-copy bytes.
    pub remaining_bytes: u64,
    /// `remaining_bytes` at the measured rate (at least 10 MiB/s): the data part of the
    /// downtime, without the switchover's fixed costs.
    pub estimated_switchover: Option<Duration>,
    /// Whether the destination accepted the return path (then it acknowledges initial data
    /// and reports a verdict per device).
    pub return_path: bool,
}

impl SessionStatus {
    /// Whether every device with PRE_COPY has sent its initial data and the estimated
    /// switchover time is at most `downtime_limit` (QEMU's rule, with its default of 300 ms).
    ///
    /// With a return path, "sent" means acknowledged: the destination wrote every byte of each
    /// device's initial data into its device (QEMU's switchover-ack). Without one (a QEMU peer),
    /// it means read and queued.
    pub fn converged(&self, downtime_limit: Duration) -> bool {
        self.initial_data_done() && self.estimated_switchover.is_some_and(|t| t <= downtime_limit)
    }

    /// Whether every device's initial data is done: acknowledged with a return path, sent
    /// without one (devices without a pre-copy stream have none).
    pub fn initial_data_done(&self) -> bool {
        self.devices
            .iter()
            .all(|d| !d.precopy || if self.return_path { d.initial_data_acked } else { d.initial_data_sent })
    }
}

impl<'a> SourceSession<'a> {
    /// A session over already connected stream sockets (TCP or Unix), channel `i` being
    /// `channels[i]`. The sockets are closed when the session ends.
    ///
    /// # Errors
    /// [`Error::Config`] for no channels or more than 256; eventfd creation failures.
    pub fn new(cfg: SourceConfig, channels: Vec<OwnedFd>) -> Result<SourceSession<'a>> {
        if channels.is_empty() || channels.len() > crate::wire::MAX_CHANNELS {
            return Err(Error::Config(format!("{} channels outside 1..=256", channels.len())));
        }
        let abort = AbortHandle::new().map_err(|e| Error::sys("eventfd", e))?;
        Ok(SourceSession { cfg, channels, devices: Vec::new(), abort, progress: Progress::default() })
    }

    /// Connects `n` TCP channels to `addr` (each with `TCP_NODELAY`).
    ///
    /// # Errors
    /// [`Error::Sys`] naming the address and channel when a connection fails.
    pub fn connect(
        cfg: SourceConfig,
        addr: impl ToSocketAddrs + std::fmt::Debug,
        n: usize,
    ) -> Result<SourceSession<'a>> {
        let mut chans = Vec::with_capacity(n);
        for i in 0..n {
            let s = TcpStream::connect(&addr).map_err(|e| Error::sys(format!("connect channel {i} to {addr:?}"), e))?;
            s.set_nodelay(true).map_err(|e| Error::sys("TCP_NODELAY", e))?;
            chans.push(OwnedFd::from(s));
        }
        SourceSession::new(cfg, chans)
    }

    /// Adds a migratable device (RUNNING) with default options: it stays in STOP after a
    /// successful switchover.
    pub fn add_device(&mut self, id: DeviceId, dev: &'a mut dyn MigrationDevice) -> &mut Self {
        self.add_device_with(id, dev, DeviceOptions::default())
    }

    /// Adds a migratable device with explicit options (`precopy` is ignored here: the VMM
    /// starts pre-copy with [`SessionControl::start_precopy`]).
    pub fn add_device_with(
        &mut self,
        id: DeviceId,
        dev: &'a mut dyn MigrationDevice,
        opts: DeviceOptions,
    ) -> &mut Self {
        self.devices.push(SourceDevice { id, kind: SourceKind::Device { dev, opts } });
        self
    }

    /// Adds a raw readable stream (a data fd the VMM already put in STOP_COPY, or a saved
    /// stream file) plus the config blob to send last. It is read from the switchover on.
    ///
    /// A regular file must give exactly the bytes from its offset to its size as `fstat(2)`
    /// reports them now: if it is truncated (or grows) while it is sent, the run fails with
    /// [`Error::SourceChanged`] and the config is not sent, so the destination never loads a
    /// short stream.
    pub fn add_data_fd(&mut self, id: DeviceId, fd: BorrowedFd<'a>, config: &'a [u8]) -> &mut Self {
        let len = sys::file_remaining(fd);
        self.devices.push(SourceDevice { id, kind: SourceKind::Fd { fd, config, len } });
        self
    }

    /// A handle that cancels this session from any thread (also a pollable fd).
    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    /// A handle to watch the device bytes sent so far from any thread.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Sets the session up, then calls `drive` on this thread with the session's controls;
    /// `drive` must end with [`SessionControl::switchover`] (or an error, which cancels the
    /// session). Returns `drive`'s value and the report once every device sent its last packet.
    ///
    /// # Errors
    /// The first failure (set-up, a state change, a device read, a channel), or `drive`'s
    /// error. Every device is then back in RUNNING, or [`Error::Unrecovered`] names the one
    /// that could not be put back.
    pub fn run<R>(mut self, drive: impl FnOnce(&mut SessionControl<'_>) -> Result<R>) -> Result<(R, SourceReport)> {
        self.cfg.validate(self.channels.len(), self.devices.len())?;
        check_unique_ids(&self.devices)?;
        let started = Instant::now();
        let (backend, fallback_reason) = crate::backend::choose(self.cfg.backend)?;
        let zerocopy = zerocopy_decision(backend, self.cfg.zerocopy, &self.channels)?;
        let (slots, streams) = slots(std::mem::take(&mut self.devices))?;
        self.send_inits(slots.len())?;
        let events = Arc::new(Events::new().map_err(|e| Error::sys("eventfd", e))?);
        let ids: Vec<DeviceId> = slots.iter().map(|d| d.id().clone()).collect();
        let controls = ids
            .iter()
            .map(|id| DeviceControl::new(id.clone(), events.clone()))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::sys("eventfd", e))?;
        let rp = RpState::new(ids.len()).map_err(|e| Error::sys("eventfd", e))?;
        let shared = SourceShared {
            cfg: &self.cfg,
            channels: self.channels.iter().map(|c| c.as_fd()).collect(),
            leases: ChannelLeases::new(self.channels.len(), ids.len()).map_err(|e| Error::sys("eventfd", e))?,
            counters: (0..self.channels.len()).map(|_| ChannelCounters::default()).collect(),
            abort: self.abort.clone(),
            zerocopy,
            progress: self.progress.clone(),
            rp: &rp,
            deferred: crate::uring::Deferred::default(),
        };
        let mut ctl = self.control(&controls, &events, &rp, &slots);
        let park = Park::new(ids.len());
        let (driven, outcomes, ending, all_sent) = std::thread::scope(|s| {
            // Released when this closure ends, even by a panic: the scope then joins them.
            let _release = ReleaseOnDrop(&park);
            let reader = self.cfg.return_path.then(|| {
                let (fd, rp, ids, controls, abort) = (shared.channels[0], &rp, &ids, &controls, &self.abort);
                let h = std::thread::Builder::new()
                    .name("vfmfd-rpath".into())
                    .spawn_scoped(s, move || rpath::read(fd, rp, ids, controls, abort));
                h.inspect_err(|e| rp.reader_not_started(e)).ok()
            });
            let handles = spawn_devices(s, &shared, backend, (&slots, streams), &controls, &park);
            let driven = ctl.drive(drive);
            let outcomes = collect_devices(handles, &park, &shared);
            let all_sent = driven.is_ok() && outcomes.iter().all(|o| o.result.is_ok());
            let ending = end_session(&shared, &rp, &ids, all_sent, reader.flatten());
            // Only now, with the destination done: the device threads' exits.
            park.release();
            (driven, outcomes, ending, all_sent)
        });
        let Ending { verdicts, echoed, sent_at, verdicts_at, warning } = ending;
        let (verdicts, destination_err) = judge(verdicts);
        close::before_close(&shared.channels, !all_sent || destination_err.is_some());
        let counters = &shared.counters;
        let channels = ChannelId::all(counters.len()).map(|c| counters[c.index()].report(c)).collect();
        let panicked = ctl.panicked.take();
        let epilogue = epilogue(outcomes, slots, driven.is_err(), destination_err);
        if let Some(payload) = panicked {
            // Every device is back (or Unrecovered was reported to no one): let the panic go on.
            std::panic::resume_unwind(payload);
        }
        let tallies = match (epilogue, driven) {
            (Ok(t), Ok(r)) => (t, r),
            // The VMM's own error is the root cause when no device failed by itself.
            (Err(Error::Aborted), Err(d)) => return Err(d),
            (Err(e), _) | (Ok(_), Err(e)) => return Err(prefer_destination(e, echoed)),
        };
        let (tallies, r) = tallies;
        let (elapsed, warnings) = (started.elapsed(), warning.into_iter().collect());
        let run = RunFacts { backend, fallback_reason, zerocopy, elapsed, verdicts, sent_at, verdicts_at, warnings };
        Ok((r, report(run, channels, tallies)))
    }

    /// The VMM's handle on the running session.
    fn control<'s>(
        &'s self,
        controls: &'s [DeviceControl],
        events: &'s Events,
        rp: &'s RpState,
        walker: &'s (dyn Walker + 's),
    ) -> SessionControl<'s> {
        SessionControl {
            controls,
            walker,
            events,
            abort: &self.abort,
            progress: &self.progress,
            rp,
            offered: self.cfg.return_path,
            limit: self.cfg.stall_timeout,
            bandwidth: self.cfg.switchover_bandwidth,
            precopy_started: None,
            rate: std::cell::Cell::new((None, None)),
            switched: false,
            panicked: None,
        }
    }

    /// Writes the init packet on every channel, with the return-path offer if configured (and
    /// in it, the device count: a destination expecting another number fails at once).
    fn send_inits(&self, devices: usize) -> Result<()> {
        let offer = if self.cfg.return_path { EXT_RETURN_PATH | EXT_COMMIT } else { 0 };
        // `validate` bounds the count by MAX_DEVICES (64); 0 (not given) is never sent.
        let devices = u8::try_from(devices).map_err(|_| Error::Config(format!("{devices} devices")))?;
        for (ch, fd) in ChannelId::all(self.channels.len()).zip(&self.channels) {
            send_init(fd.as_fd(), &InitPacket { uuid: self.cfg.uuid, id: ch.get(), offer, devices })
                .map_err(|e| Error::Channel { channel: ch, op: "send init packet".into(), source: e })?;
        }
        Ok(())
    }
}

/// After every device thread ended: the destination's verdicts, the commit, the return-path
/// reader's end and the close's wait (see `close`). `all_sent`: every packet was sent; else the
/// verdicts are only those of a destination that failed ([`early_failure`], which also gives
/// the second result).
fn end_session(
    shared: &SourceShared<'_>,
    rp: &RpState,
    ids: &[DeviceId],
    all_sent: bool,
    reader: Option<std::thread::ScopedJoinHandle<'_, ()>>,
) -> Ending {
    let (cfg, channels, abort) = (shared.cfg, &shared.channels, &shared.abort);
    let sent_at = Instant::now();
    if all_sent {
        // With the two-phase commit, channel 0's FIN waits for the verdicts.
        close::shutdown_all(&channels[usize::from(rp.commit())..]);
    }
    // Success is reported only for what the destination says it loaded, if it says.
    let verdicts = if all_sent { rp.verdicts(ids, cfg.stall_timeout, abort) } else { Ok(Verdicts::None) };
    // The commit as soon as the verdicts allow it (the destination's devices start on it),
    // before any thread of this session is joined.
    let verdicts = if all_sent { commit_if_loaded(channels, rp, verdicts, abort) } else { verdicts };
    let verdicts_at = matches!(verdicts, Ok(Verdicts::Given(_))).then(Instant::now);
    rp.stop();
    // Channel 0 has one reader at a time: the return path's, then the close's.
    if let Some(Err(_)) = reader.map(std::thread::ScopedJoinHandle::join) {
        abort.abort();
    }
    if !all_sent {
        let (verdicts, echoed) = early_failure(rp, ids);
        return Ending { verdicts, echoed, sent_at, verdicts_at: None, warning: None };
    }
    let (verdicts, warning) = closing(channels, rp, verdicts, cfg, abort);
    Ending { verdicts, echoed: None, sent_at, verdicts_at, warning }
}

/// What [`end_session`] found.
struct Ending {
    /// The destination's verdicts, or why there are none.
    verdicts: Result<Verdicts>,
    /// A destination's failure that replaces a cause echoing it ([`early_failure`]).
    echoed: Option<Error>,
    /// When every device thread had ended (every packet sent, on success).
    sent_at: Instant,
    /// When the verdicts were in and the commit sent (if agreed), before the close's wait.
    verdicts_at: Option<Instant>,
    /// What the close's wait found after a confirmed success.
    warning: Option<String>,
}

/// The two-phase commit (`wire::EXT_COMMIT`): every device loaded at the destination, so
/// channel 0's FIN lets it start them.
///
/// # Errors
/// [`Error::Channel`] when the FIN cannot be sent: the destination will not start the
/// devices, so the source must carry on with its own.
fn commit(ch0: BorrowedFd<'_>) -> Result<()> {
    sys::shutdown_write(ch0).map_err(|source| Error::Channel {
        channel: ChannelId::new(0),
        op: "commit the switchover (FIN after the verdicts)".into(),
        source,
    })
}

/// Whether every verdict says loaded.
fn all_loaded(v: &Verdicts) -> bool {
    matches!(v, Verdicts::Given(v) if v.iter().all(|(_, x)| *x == Verdict::Loaded))
}

/// With the two-phase commit, once every verdict says loaded: channel 0's FIN, the commit.
///
/// # Errors
/// The verdicts' error, or [`Error::Channel`] when the FIN cannot be sent.
fn commit_if_loaded(
    channels: &[BorrowedFd<'_>],
    rp: &RpState,
    verdicts: Result<Verdicts>,
    abort: &AbortHandle,
) -> Result<Verdicts> {
    let verdicts = verdicts?;
    if rp.commit() && all_loaded(&verdicts) {
        // A session cancelled up to here does not commit: its devices go back to RUNNING, and
        // the destination, which sees a reset instead, leaves its own stopped.
        if abort.is_aborted() {
            return Err(Error::Aborted);
        }
        commit(channels[0])?;
    }
    Ok(verdicts)
}

/// After every packet was sent and the write sides shut down: with the two-phase commit, once
/// every verdict says loaded, channel 0's FIN commits; then reads every channel to the
/// destination's EOF (see `close`), so that closing destroys nothing it has not read. Its
/// failure (or bytes the return path does not account for) fails the session, unless the
/// destination already gave its verdicts: then the outcome is decided. A failed verdict fails
/// the session (`judge`) and the close is a reset; after "loaded" verdicts the wait is at most
/// [`close::CONFIRMED_CLOSE_WAIT`] in all, bytes are discarded, and what it finds is a warning
/// (the second result).
fn closing(
    channels: &[BorrowedFd<'_>],
    rp: &RpState,
    verdicts: Result<Verdicts>,
    cfg: &SourceConfig,
    abort: &AbortHandle,
) -> (Result<Verdicts>, Option<String>) {
    let verdicts = match verdicts {
        Ok(v) => v,
        Err(e) => return (Err(e), None),
    };
    if !matches!(verdicts, Verdicts::Given(_)) {
        // No verdicts (nor a commit): the destination's EOF is what says it has everything.
        let closed =
            rp.unexpected().map_or(Ok(()), Err).and_then(|()| close::await_eof(channels, cfg.stall_timeout, abort));
        return (closed.map(|()| verdicts), None);
    }
    if !all_loaded(&verdicts) {
        // The session fails on the verdicts (`judge`): no commit, and the close is a reset.
        return (Ok(verdicts), None);
    }
    let limit = cfg.stall_timeout.min(close::CONFIRMED_CLOSE_WAIT);
    let mut discarded = 0;
    let closed = close::await_eof_confirmed(channels, limit, &mut discarded, abort);
    let mut notes = Vec::new();
    if let Some(e) = rp.unexpected() {
        notes.push(format!("{e}"));
    }
    if discarded > 0 {
        notes.push(format!("the destination sent {discarded} byte(s) after its verdicts (discarded)"));
    }
    match closed {
        Ok(()) => {}
        Err(Error::Timeout { .. }) => notes.push(format!(
            "the destination did not close its channels within {limit:?} of its verdicts; closed anyway"
        )),
        Err(e) => notes.push(e.to_string()),
    }
    let warning = (!notes.is_empty())
        .then(|| format!("{} (ignored: the destination had confirmed every device loaded)", notes.join("; ")));
    (Ok(verdicts), warning)
}

/// On a session that did not send everything: the destination's failure, if its `SHUT` said it
/// failed. When it failed first (its `SHUT` aborted the session), its verdicts fail the
/// session (the first result); when its verdicts were only found queued after this session
/// failed, its error (the second) replaces a cause that merely echoes it
/// ([`prefer_destination`]).
fn early_failure(rp: &RpState, ids: &[DeviceId]) -> (Result<Verdicts>, Option<Error>) {
    match rp.early(ids) {
        (v, true) => (Ok(v), None),
        (v, false) => (Ok(Verdicts::None), judge(Ok(v)).1),
    }
}

/// `e`, the session's error, unless it is only the echo of a destination that failed and said
/// why (`destination`): the abort, or a channel the destination closed or reset.
fn prefer_destination(e: Error, destination: Option<Error>) -> Error {
    let echo = |e: &Error| matches!(e, Error::Aborted | Error::Channel { .. });
    match (e, destination) {
        (e, Some(d)) if echo(&e) => d,
        (Error::Unrecovered { device, cause, source }, Some(d)) if echo(&cause) => {
            Error::Unrecovered { device, cause: Box::new(d), source }
        }
        (e, _) => e,
    }
}

/// The destination's verdicts for the report, and the error that fails the session when the
/// destination failed a device or its return path broke.
fn judge(v: Result<Verdicts>) -> (Option<Vec<(DeviceId, Verdict)>>, Option<Error>) {
    match v {
        Ok(Verdicts::None) => (None, None),
        Ok(Verdicts::Given(list)) => {
            let failed = list.iter().find_map(|(d, v)| match v {
                Verdict::Failed { what } => Some(Error::Destination { device: d.clone(), what: what.clone() }),
                Verdict::Loaded => None,
            });
            (Some(list), failed)
        }
        Err(e) => (None, Some(e)),
    }
}

/// What a run knows besides its devices' tallies.
struct RunFacts {
    backend: BackendKind,
    fallback_reason: Option<String>,
    zerocopy: bool,
    elapsed: Duration,
    verdicts: Option<Vec<(DeviceId, Verdict)>>,
    sent_at: Instant,
    verdicts_at: Option<Instant>,
    warnings: Vec<String>,
}

fn report(run: RunFacts, channels: Vec<crate::stats::ChannelReport>, tallies: Vec<Tallies>) -> SourceReport {
    let mut latency = Latency::new();
    for t in &tallies {
        latency.merge(&t.latency);
    }
    SourceReport {
        backend: run.backend,
        fallback_reason: run.fallback_reason,
        // `auto` falls back to copying sends per device when its pool cannot be pinned.
        zerocopy: run.zerocopy && tallies.iter().all(|t| t.zerocopy),
        zerocopy_bytes: tallies.iter().map(|t| t.zerocopy_bytes).sum(),
        copied_bytes: tallies.iter().map(|t| t.copied_bytes).sum(),
        elapsed: run.elapsed,
        devices: tallies.into_iter().map(|t| t.report).collect(),
        channels,
        latency: latency.summary(),
        verdicts: run.verdicts,
        sent_at: run.sent_at,
        verdicts_at: run.verdicts_at,
        warnings: run.warnings,
    }
}

/// The VMM's controls of a running [`SourceSession`], valid inside [`SourceSession::run`].
#[derive(Debug)]
pub struct SessionControl<'s> {
    controls: &'s [DeviceControl],
    /// The state changes, which this (the VMM's) thread makes.
    walker: &'s (dyn Walker + 's),
    events: &'s Events,
    abort: &'s AbortHandle,
    progress: &'s Progress,
    rp: &'s RpState,
    offered: bool,
    limit: Duration,
    bandwidth: Option<u64>,
    precopy_started: Option<(Instant, u64)>,
    /// The last rate sample `(when, bytes sent)` and the smoothed rate of the windows in which
    /// data moved (an idle pre-copy says nothing about what the channels can carry).
    rate: std::cell::Cell<RateSample>,
    switched: bool,
    /// A panic caught in the VMM's `drive`, resumed once every device is back.
    panicked: Option<Box<dyn std::any::Any + Send>>,
}

impl SessionControl<'_> {
    /// Waits until every device thread finished its set-up and, when the return path was
    /// offered, for the destination's answer (at most [`HELLO_WAIT`]: a destination that
    /// accepts answers as soon as it has read the init packets; a QEMU peer never does).
    fn prepared(&self) -> Result<()> {
        self.wait_prepared()?;
        if self.offered {
            self.rp.wait_enabled(HELLO_WAIT.min(self.limit), self.abort);
        }
        Ok(())
    }

    /// Runs the VMM's `drive` after set-up; any failure (or a panic) aborts the session.
    fn drive<R>(&mut self, drive: impl FnOnce(&mut SessionControl<'_>) -> Result<R>) -> Result<R> {
        // A panic in `drive` must neither leave the device threads waiting for commands nor
        // skip the epilogue that puts every device back: it is caught here, the session is
        // aborted and wound down, and `run` resumes the panic afterwards.
        let driven =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.prepared().and_then(|()| drive(self))));
        let driven = match driven {
            Ok(r) => r,
            Err(payload) => {
                self.panicked = Some(payload);
                Err(Error::Aborted)
            }
        };
        let driven = driven.and_then(|r| match () {
            () if self.abort.is_aborted() => Err(Error::Aborted),
            () if !self.switched => {
                Err(Error::Usage { what: "the session was driven to its end without a switchover" })
            }
            () => Ok(r),
        });
        if driven.is_err() {
            self.abort.abort();
        }
        driven
    }

    /// Waits until every device thread finished its set-up (`Command::Prepare`).
    fn wait_prepared(&self) -> Result<()> {
        self.controls.iter().try_for_each(|d| d.wait_ack(Command::Prepare, self.abort, self.limit))
    }

    /// Makes the state change of `c` on every device, in device order, on this thread, then
    /// tells the device threads. Told one by one, a woken device thread would take the CPU
    /// from the changes still to make (a woken thread tends to preempt its waker); after
    /// `Quiesce` they have nothing to do, so they are not woken at all.
    fn change_all(&self, c: Command) -> Result<()> {
        let made = self.controls.iter().enumerate().try_for_each(|(no, d)| self.walker.change(no, c, d, self.abort));
        if made.is_ok() {
            for d in self.controls {
                if c == Command::Quiesce {
                    d.post(c);
                } else {
                    d.command(c);
                }
            }
        }
        made
    }

    /// Starts pre-copy: every device with PRE_COPY goes RUNNING → PRE_COPY and streams its
    /// initial data, then its dirty data as it appears, continuously, until the switchover. An
    /// idle pre-copy (nothing to read) never counts as a stall. Returns once every device
    /// made the change.
    ///
    /// # Errors
    /// [`Error::Aborted`] (the device's own error is the session's result), or
    /// [`Error::Timeout`] after the stall timeout.
    pub fn start_precopy(&mut self) -> Result<()> {
        if self.switched || self.precopy_started.is_some() {
            return Err(Error::Usage { what: "start_precopy after pre-copy started or after the switchover" });
        }
        // The rate baseline is taken first: a small device's initial data may be sent before
        // every device has acknowledged the command.
        let started = (Instant::now(), self.progress.bytes());
        self.change_all(Command::PreCopy)?;
        self.precopy_started = Some(started);
        Ok(())
    }

    /// The switchover, once the VMM has stopped its vCPUs: every device to its P2P-quiesced
    /// state (PRE_COPY_P2P or RUNNING_P2P, where it has P2P), and only when all are there,
    /// every device to STOP_COPY. Returns when every device is in STOP_COPY; the rest of the
    /// state and the configs are then sent, and [`SourceSession::run`] returns when all are.
    ///
    /// # Errors
    /// As [`SessionControl::start_precopy`]; the session is then cancelled.
    pub fn switchover(&mut self) -> Result<()> {
        if self.switched {
            return Err(Error::Usage { what: "switchover called twice" });
        }
        self.change_all(Command::Quiesce)?;
        self.change_all(Command::StopCopy)?;
        self.switched = true;
        Ok(())
    }

    /// Waits until every device with PRE_COPY has sent its initial data (bounded by the
    /// stall timeout without progress).
    ///
    /// # Errors
    /// [`Error::Aborted`], or [`Error::Timeout`] when no device moves for the stall timeout.
    pub fn wait_initial_data(&mut self) -> Result<()> {
        let mut last = (self.progress.bytes(), Instant::now());
        loop {
            let st = self.status();
            if st.devices.iter().all(|d| !d.precopy || d.initial_data_sent) {
                return Ok(());
            }
            if self.abort.is_aborted() {
                return Err(Error::Aborted);
            }
            if st.sent_bytes != last.0 {
                last = (st.sent_bytes, Instant::now());
            } else if last.1.elapsed() > self.limit {
                return Err(Error::Timeout { what: "waiting for the initial pre-copy data".into(), after: self.limit });
            }
            let _ = self.next_event(crate::backend::TICK);
        }
    }

    /// Cancels the session: device threads stop, and every device goes back to RUNNING
    /// (P2P-safely) before [`SourceSession::run`] returns [`Error::Aborted`].
    pub fn cancel(&self) {
        self.abort.abort();
    }

    /// Each device's status and the session's rate and switchover estimate.
    pub fn status(&self) -> SessionStatus {
        let devices: Vec<DeviceStatus> = self.controls.iter().map(|d| d.status().clone()).collect();
        let sent_bytes = self.progress.bytes();
        let rate_bytes_per_sec = self.measured_rate(sent_bytes);
        let remaining_bytes = devices
            .iter()
            .map(|d| d.stop_copy_size.unwrap_or(d.initial_bytes.saturating_add(d.dirty_bytes)))
            .sum::<u64>();
        // A pre-copy of a few bytes (mtty's 24) measures the device, not the channels: the
        // estimate assumes at least MIN_RATE.
        let estimated_switchover =
            rate_bytes_per_sec.map(|r| Duration::from_secs_f64(remaining_bytes as f64 / r.max(MIN_RATE)));
        SessionStatus {
            devices,
            sent_bytes,
            rate_bytes_per_sec,
            remaining_bytes,
            estimated_switchover,
            return_path: self.rp.enabled(),
        }
    }

    /// What the channels can carry (bytes per second): `SourceConfig::switchover_bandwidth`
    /// when set (QEMU's `avail-switchover-bandwidth`), else the fastest window of at least
    /// [`RATE_WINDOW`] seen since pre-copy started: a pre-copy that has little left to send, or
    /// is idle, says nothing about the channels and never lowers it. Windows are taken when
    /// [`SessionControl::status`] is called. Before the first window, the average since
    /// pre-copy started.
    fn measured_rate(&self, sent: u64) -> Option<f64> {
        if let Some(bw) = self.bandwidth {
            return Some(bw as f64);
        }
        let (start, base) = self.precopy_started?;
        let now = Instant::now();
        let (sample, mut rate) = self.rate.get();
        let (t, b) = sample.unwrap_or((start, base));
        let dt = now.duration_since(t);
        if dt >= RATE_WINDOW {
            if sent > b {
                let window = (sent - b) as f64 / dt.as_secs_f64();
                rate = Some(rate.map_or(window, |r| r.max(window)));
            }
            self.rate.set((Some((now, sent)), rate));
        }
        rate.or_else(|| {
            let secs = now.duration_since(start).as_secs_f64();
            (sent > base && secs > 0.0).then(|| (sent - base) as f64 / secs)
        })
    }

    /// The next event, waiting at most `timeout` for one.
    pub fn next_event(&self, timeout: Duration) -> Option<SessionEvent> {
        if let Some(e) = self.events.pop() {
            return Some(e);
        }
        let _ = sys::wait_readable(&[self.events.fd.as_fd(), self.abort.as_fd()], timeout);
        self.events.pop()
    }

    /// A descriptor that is readable while events wait (for a VMM's own poll loop).
    pub fn event_fd(&self) -> BorrowedFd<'_> {
        self.events.fd.as_fd()
    }
}

/// What a device thread hands back.
struct Outcome {
    result: Result<Tallies>,
}

/// A raw stream a device thread reads (`SourceSession::add_data_fd`): fd, config, length.
type RawStream<'a> = (BorrowedFd<'a>, &'a [u8], Option<u64>);

/// Splits the devices into what the controller walks (a slot per device, in order) and what
/// their threads read from a raw stream.
///
/// # Errors
/// [`Error::Device`] when a device's migration flags cannot be read.
fn slots(devices: Vec<SourceDevice<'_>>) -> Result<(Vec<DeviceSlot<'_>>, Vec<Option<RawStream<'_>>>)> {
    let mut slots = Vec::with_capacity(devices.len());
    let mut streams = Vec::with_capacity(devices.len());
    for SourceDevice { id, kind } in devices {
        match kind {
            SourceKind::Device { dev, opts } => {
                slots.push(DeviceSlot::device(id, dev, opts.final_state)?);
                streams.push(None);
            }
            SourceKind::Fd { fd, config, len } => {
                slots.push(DeviceSlot::raw(id));
                streams.push(Some((fd, config, len)));
            }
        }
    }
    Ok((slots, streams))
}

type Handle<'s> = std::thread::ScopedJoinHandle<'s, ()>;

/// Where the device threads leave their outcome and then wait until the session releases them
/// (after the commit): their exit (a ring's task teardown in the kernel) would otherwise take
/// CPU from the switchover's last steps here and at a destination on the same host.
struct Park {
    st: Mutex<ParkState>,
    cv: Condvar,
}

struct ParkState {
    outcomes: Vec<Option<Outcome>>,
    released: bool,
}

impl Park {
    fn new(n: usize) -> Park {
        Park {
            st: Mutex::new(ParkState { outcomes: (0..n).map(|_| None).collect(), released: false }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ParkState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver(&self, no: usize, o: Outcome) {
        self.lock().outcomes[no] = Some(o);
        self.cv.notify_all();
    }

    fn wait_release(&self) {
        let mut g = self.lock();
        while !g.released {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn release(&self) {
        self.lock().released = true;
        self.cv.notify_all();
    }

    /// Waits until device `no`'s thread delivered its outcome, and takes it.
    fn take(&self, no: usize) -> Option<Outcome> {
        let mut g = self.lock();
        loop {
            if let Some(o) = g.outcomes[no].take() {
                return Some(o);
            }
            if g.released {
                return None;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Releases the parked device threads when dropped (the scope's end, or a panic through it).
struct ReleaseOnDrop<'p>(&'p Park);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

fn spawn_devices<'s, 'e, 'a: 's>(
    s: &'s std::thread::Scope<'s, 'e>,
    shared: &'s SourceShared<'_>,
    backend: BackendKind,
    (slots, streams): (&'s [DeviceSlot<'a>], Vec<Option<RawStream<'a>>>),
    controls: &'s [DeviceControl],
    park: &'s Park,
) -> Vec<std::io::Result<Handle<'s>>> {
    slots
        .iter()
        .zip(streams)
        .zip(controls)
        .enumerate()
        .map(|(no, ((slot, stream), control))| {
            let h = std::thread::Builder::new().name(format!("vfmfd-src-{no}")).spawn_scoped(s, move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_device(shared, backend, DeviceIndex::new(no), (slot, stream), control, park);
                }));
                if ran.is_err() {
                    shared.abort.abort();
                    let e = Error::sys("device thread", std::io::Error::other("panicked"));
                    park.deliver(no, Outcome { result: Err(e) });
                    park.wait_release();
                }
            });
            if h.is_err() {
                shared.abort.abort();
                control.fail();
            }
            h
        })
        .collect()
}

/// Every device thread's outcome, as each delivers it (the threads stay parked until released).
fn collect_devices(handles: Vec<std::io::Result<Handle<'_>>>, park: &Park, shared: &SourceShared<'_>) -> Vec<Outcome> {
    handles
        .into_iter()
        .enumerate()
        .map(|(no, h)| match h {
            Ok(_) => park.take(no).unwrap_or_else(|| {
                shared.abort.abort();
                Outcome { result: Err(Error::internal("a device thread ended without its outcome")) }
            }),
            Err(e) => Outcome { result: Err(Error::sys("spawn device thread", e)) },
        })
        .collect()
}

/// One device's thread: its context, the backend's loop from set-up to the last packet. Its
/// outcome goes to `park` as soon as it is known, and the thread then waits there until the
/// session releases it (after the commit): what is left (the ring's drain, the thread's exit)
/// would otherwise take CPU from the switchover's last steps, here and at a destination on
/// the same host.
fn run_device(
    shared: &SourceShared<'_>,
    backend: BackendKind,
    dev_no: DeviceIndex,
    (slot, stream): (&DeviceSlot<'_>, Option<RawStream<'_>>),
    control: &DeviceControl,
    park: &Park,
) {
    let cap = shared.cfg.precopy_max_bytes;
    let mut ctx = match stream {
        None => DeviceCtx::device(slot, dev_no, control, &shared.abort, cap),
        Some((fd, config, len)) => DeviceCtx::raw(slot, dev_no, control, &shared.abort, fd, (config, len)),
    };
    let started = Instant::now();
    let report = |result: Result<Tallies>| {
        let result = result.map(|mut t| {
            t.report.precopy_bytes = control.status().precopy_bytes;
            t.report.elapsed = started.elapsed();
            t
        });
        shared.leases.withdraw(dev_no);
        if result.is_err() {
            shared.abort.abort();
            control.fail();
        }
        park.deliver(dev_no.index(), Outcome { result });
        park.wait_release();
    };
    match backend {
        BackendKind::Uring => uring::run(shared, &mut ctx, report),
        BackendKind::Blocking => report(blocking::run(shared, &mut ctx)),
    }
    // The session's epilogue walks the device only after this thread ended.
    ctx.close_data_fd();
}

/// After every device thread ended: on success each device goes to its final state (STOP by
/// default) and the tallies come back; on any failure, or when the VMM's `drive` failed
/// (`drive_failed`), every device goes back to RUNNING, P2P-safely, and the root cause comes
/// back ([`Error::Aborted`] when no device failed on its own). `destination`: the destination
/// failed a device (or its verdict could not be had), so the source must carry on too.
fn epilogue(
    outcomes: Vec<Outcome>,
    slots: Vec<DeviceSlot<'_>>,
    drive_failed: bool,
    destination: Option<Error>,
) -> Result<Vec<Tallies>> {
    let walked: Vec<_> = slots.into_iter().map(DeviceSlot::into_parts).collect();
    let failed = walked.iter().any(|(_, _, failure)| failure.is_some());
    if failed || drive_failed || destination.is_some() || outcomes.iter().any(|o| o.result.is_err()) {
        let mut cause: Option<Error> = destination;
        let mut devs = Vec::with_capacity(walked.len());
        for (id, dev, failure) in walked {
            if let Some(e) = failure {
                Error::keep_root_cause(&mut cause, e);
            }
            if let Some((dev, _)) = dev {
                devs.push((id, dev));
            }
        }
        for o in outcomes {
            if let Err(e) = o.result {
                // Keep the root cause, not the "aborted" echoes it caused in other threads.
                Error::keep_root_cause(&mut cause, e);
            }
        }
        let cause = cause.unwrap_or(Error::Aborted);
        return Err(match recover_all(devs) {
            Ok(()) => cause,
            Err((device, source)) => Error::Unrecovered { device, cause: Box::new(cause), source },
        });
    }
    // The migration succeeded: the destination may run the VM by now. A device that does not
    // reach its final state is reported with it, not as a failed migration (a VMM resumes its
    // guest on a failed one), and every device is walked.
    let mut tallies = Vec::with_capacity(outcomes.len());
    for ((id, dev, _), o) in walked.into_iter().zip(outcomes) {
        let mut t = o.result?;
        if let Some((dev, state)) = dev {
            if let Err(e) = transition(dev, state) {
                t.report.final_state_error = Some(Error::Device { device: id, source: e }.to_string());
            }
        }
        tallies.push(t);
    }
    Ok(tallies)
}

/// Every device back to RUNNING: those with P2P to RUNNING_P2P first, then all to RUNNING, so
/// that no device runs (and can DMA) while a peer is still stopped. A device that cannot reach
/// RUNNING_P2P (it is left stopped or in ERROR) goes to RUNNING before the others, while they
/// are still in RUNNING_P2P. Returns the first device that could not be put back into RUNNING
/// and why; a failed RUNNING_P2P step of a device that then reached RUNNING is no such failure.
fn recover_all(mut devs: Vec<(DeviceId, &mut dyn MigrationDevice)>) -> Result<(), (DeviceId, vfio_migration::Error)> {
    let mut p2p_failed = vec![false; devs.len()];
    for ((_, dev), failed) in devs.iter_mut().zip(&mut p2p_failed) {
        let p2p = dev.migration_flags().is_ok_and(|f| f.contains(MigFlags::P2P));
        let running = dev.state().is_ok_and(|s| s == MigState::Running);
        if p2p && !running {
            *failed = recover(&mut **dev, MigState::RunningP2p).is_err();
        }
    }
    let order: Vec<usize> =
        (0..devs.len()).filter(|&i| p2p_failed[i]).chain((0..devs.len()).filter(|&i| !p2p_failed[i])).collect();
    let mut first: Option<(DeviceId, vfio_migration::Error)> = None;
    for i in order {
        let (id, dev) = &mut devs[i];
        if let Err(e) = recover(&mut **dev, MigState::Running) {
            first.get_or_insert((id.clone(), e));
        }
    }
    first.map_or(Ok(()), Err)
}

fn check_unique_ids(devs: &[SourceDevice<'_>]) -> Result<()> {
    for (i, a) in devs.iter().enumerate() {
        if devs[..i].iter().any(|b| b.id == a.id) {
            return Err(Error::Config(format!("device {} added twice", a.id)));
        }
    }
    Ok(())
}

/// Whether this run sends with SEND_ZC: `On` always (an error where impossible); `Auto` only
/// where it can avoid the copy: the kernel has the op, every channel is TCP, and no peer is on
/// the loopback network (where the kernel always copies and only holds buffers longer).
fn zerocopy_decision(backend: BackendKind, want: ZeroCopy, channels: &[OwnedFd]) -> Result<bool> {
    match (backend, want) {
        (BackendKind::Blocking, ZeroCopy::On) => Err(Error::Config("zero-copy needs the io_uring backend".into())),
        (BackendKind::Blocking, _) | (_, ZeroCopy::Off) => Ok(false),
        (BackendKind::Uring, z) => {
            let all_tcp = channels.iter().all(|c| sys::is_inet_stream(c.as_fd()));
            let supported = crate::uring::send_zc_supported();
            if z == ZeroCopy::On && !(all_tcp && supported) {
                return Err(Error::Config(format!(
                    "zero-copy requested but unavailable ({})",
                    if supported { "a channel is not a TCP socket" } else { "the kernel lacks IORING_OP_SEND_ZC" }
                )));
            }
            let remote = assume_remote() || channels.iter().all(|c| !peer_is_loopback(c.as_fd()));
            Ok(all_tcp && supported && (z == ZeroCopy::On || remote))
        }
    }
}

#[cfg(test)]
fn send_zc_supported_here() -> bool {
    crate::uring::send_zc_supported()
}

/// Tests only: whether `auto` takes every peer as remote (to exercise SEND_ZC's fallbacks on
/// one host).
#[cfg(test)]
static ASSUME_REMOTE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(test)]
fn assume_remote() -> bool {
    ASSUME_REMOTE.load(std::sync::atomic::Ordering::SeqCst)
}

#[cfg(not(test))]
fn assume_remote() -> bool {
    false
}

/// Whether a TCP socket's peer is this host: on the loopback network (127.0.0.0/8, ::1, or a
/// v4-mapped 127.x address) or at any address of this host's interfaces (`getifaddrs(3)`), where
/// SEND_ZC always falls back to copying.
fn peer_is_loopback(fd: BorrowedFd<'_>) -> bool {
    sys::peer_ip(fd).is_some_and(sys::is_local_ip)
}

fn send_init(fd: BorrowedFd<'_>, p: &InitPacket) -> std::io::Result<()> {
    use std::io::Write;
    let mut b = [0u8; INIT_PACKET_LEN];
    p.encode(&mut b).map_err(std::io::Error::other)?;
    // A std stream over a duplicate of the fd: write_all handles partial writes and EINTR.
    let mut s = std::fs::File::from(sys::dup(fd)?);
    s.write_all(&b)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::process::Command;

    use vfio_migration::sim::{SimConfig, SimDevice};

    use super::*;
    use crate::{Backend, Receiver, ReceiverConfig};

    const CHILD: &str = "VFMFD_MEMLOCK_CHILD";
    const NAME: &str = "source::session::tests::zerocopy_auto_falls_back_when_the_pool_cannot_be_pinned";

    /// One 32 MiB device in 4 MiB packets to a loopback receiver, `auto` taking the peer as
    /// remote (so it chooses SEND_ZC).
    fn send(z: ZeroCopy) -> Result<SourceReport> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let cfg = SimConfig::new("d", 32 << 20, 4);
        let mut dst = SimDevice::new(cfg.clone());
        let mut src = SimDevice::new(cfg);
        let id = DeviceId::new("0000:00:02.0/vfio", 0).unwrap();
        std::thread::scope(|s| {
            let (l, id2, dst) = (&l, id.clone(), &mut dst);
            let h = s.spawn(move || {
                let rcfg = ReceiverConfig::new().max_packet_bytes(4 << 20).backend(Backend::Uring);
                let mut rx = Receiver::new(rcfg).unwrap();
                rx.add_device_with(id2, dst, MigState::Running);
                rx.run_listener(l, 2)
            });
            let chans = (0..2).map(|_| OwnedFd::from(TcpStream::connect(addr).unwrap())).collect();
            let scfg = SourceConfig::new().chunk_bytes(4 << 20).backend(Backend::Uring).zerocopy(z);
            let mut session = SourceSession::new(scfg, chans).unwrap();
            session.add_device(id, &mut src);
            let r = session.run(|c| c.switchover()).map(|((), rep)| rep);
            // After a failure the receiver fails on its own: the source reset its channels.
            let _ = h.join();
            r
        })
    }

    /// Under an ordinary 8 MiB RLIMIT_MEMLOCK without CAP_IPC_LOCK, a 5 x 4 MiB pool cannot be
    /// pinned: `auto` (which chose SEND_ZC for a remote peer) falls back to copying sends from
    /// unregistered buffers; only `on` fails. Runs itself again in a child under `prlimit` and
    /// `setpriv` (limits and capabilities of the whole test process must not change).
    #[test]
    fn zerocopy_auto_falls_back_when_the_pool_cannot_be_pinned() {
        if std::env::var_os(CHILD).is_none() {
            if let Some(why) = crate::uring::uring_unavailable_reason() {
                assert!(std::env::var("CI").as_deref() != Ok("true"), "io_uring unavailable under CI=true: {why}");
                eprintln!("skipped: io_uring unavailable: {why}");
                return;
            }
            let exe = std::env::current_exe().unwrap();
            let o = Command::new("prlimit")
                .args(["--memlock=8388608", "setpriv", "--inh-caps", "-ipc_lock", "--bounding-set", "-ipc_lock"])
                .arg(exe)
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .output();
            let Ok(o) = o else {
                assert!(std::env::var("CI").as_deref() != Ok("true"), "prlimit/setpriv (util-linux) missing under CI");
                eprintln!("skipped: prlimit or setpriv (util-linux) missing");
                return;
            };
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success() && out.contains("1 passed"), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
            return;
        }
        ASSUME_REMOTE.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(super::send_zc_supported_here(), "the kernel lacks SEND_ZC");
        let rep = send(ZeroCopy::Auto).unwrap_or_else(|e| panic!("auto: {e}"));
        assert!(!rep.zerocopy, "auto must report the fallback to copying sends");
        assert!(rep.copied_bytes >= 32 << 20 && rep.zerocopy_bytes == 0, "{rep:?}");
        match send(ZeroCopy::On) {
            Err(Error::Sys { op, .. }) => assert!(op.contains("RLIMIT_MEMLOCK"), "{op}"),
            other => panic!("on: expected a registration error, got {other:?}"),
        }
    }
}
