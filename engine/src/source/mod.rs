//! The source side: devices in, multifd packets out.
//!
//! * `mod.rs` (this file): the public [`Source`], the per-device thread (state walks, PRE_COPY,
//!   recovery) and the run's epilogue.
//! * `core`: the rules both backends obey (packet indexes, stream accounting and cap, the
//!   config packet, post-send tallies), without I/O.
//! * `lease`: fair leasing of channels to device threads.
//! * `uring` and `blocking`: the two backends' device loops.

mod blocking;
pub(crate) mod core;
mod lease;
mod uring;

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use vfio_migration::{recover, transition, MigState, MigrationDevice, ReadOutcome};

use self::core::Tallies;
use self::lease::ChannelLeases;
use crate::abort::AbortHandle;
use crate::config::{SourceConfig, ZeroCopy};
use crate::error::{Error, Result};
use crate::ids::{ChannelId, DeviceIndex};
use crate::stats::{BackendKind, ChannelCounters, Latency, Progress, SourceReport};
use crate::sys;
use crate::wire::{DeviceId, InitPacket, INIT_PACKET_LEN};

/// Per-device options for [`Source::add_device_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Go through PRE_COPY first (when the device supports it), streaming the initial data
    /// while the VM still runs, then enter STOP_COPY on the same data fd.
    pub precopy: bool,
    /// Where to leave the device after a successful transfer (default STOP, as QEMU does; the
    /// save session ends either way). On failure the device is always recovered to RUNNING.
    pub final_state: MigState,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions { precopy: false, final_state: MigState::Stop }
    }
}

pub(crate) enum SourceKind<'a> {
    Device { dev: &'a mut dyn MigrationDevice, opts: DeviceOptions },
    Fd { fd: BorrowedFd<'a>, config: &'a [u8] },
}

pub(crate) struct SourceDevice<'a> {
    pub(crate) id: DeviceId,
    pub(crate) kind: SourceKind<'a>,
}

/// Sends the migration state of one or more devices over N multifd channels.
///
/// ```no_run
/// use std::net::TcpStream;
/// use vfio_multifd::{DeviceId, Source, SourceConfig};
/// # fn device() -> Box<dyn vfio_migration::MigrationDevice> { unimplemented!() }
/// let channels: Vec<_> = (0..4)
///     .map(|_| TcpStream::connect("192.0.2.1:4444").map(Into::into))
///     .collect::<Result<_, _>>()?;
/// let mut dev = device();
/// let mut src = Source::new(SourceConfig::new(), channels)?;
/// src.add_device(DeviceId::new("0000:00:02.0/vfio", 0)?, dev.as_mut());
/// let report = src.run()?;
/// println!("{} bytes in {:?}", report.data_bytes(), report.elapsed);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Source<'a> {
    cfg: SourceConfig,
    channels: Vec<OwnedFd>,
    devices: Vec<SourceDevice<'a>>,
    abort: AbortHandle,
    progress: Progress,
}

impl std::fmt::Debug for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("cfg", &self.cfg)
            .field("channels", &self.channels.len())
            .field("devices", &self.devices.iter().map(|d| d.id.clone()).collect::<Vec<_>>())
            .finish()
    }
}

/// Shared, read-only context of one source run.
pub(crate) struct SourceShared<'c> {
    pub(crate) cfg: &'c SourceConfig,
    pub(crate) channels: Vec<BorrowedFd<'c>>,
    pub(crate) leases: ChannelLeases,
    pub(crate) counters: Vec<ChannelCounters>,
    pub(crate) abort: AbortHandle,
    pub(crate) zerocopy: bool,
    pub(crate) progress: Progress,
}

/// What a backend's device loop reads from and reports to.
pub(crate) struct DeviceCtx<'a, 'd> {
    pub(crate) id: &'a DeviceId,
    pub(crate) dev_no: DeviceIndex,
    dev: Option<&'a mut (dyn MigrationDevice + 'd)>,
    raw_config: &'a [u8],
    owned_fd: Option<OwnedFd>,
    raw_fd: Option<BorrowedFd<'a>>,
    pub(crate) in_precopy: bool,
    pub(crate) precopy_bytes: u64,
    pub(crate) stop_copy_start: Instant,
}

/// One step of the PRE_COPY phase.
pub(crate) enum PrecopyStep {
    /// `n` bytes were read into the buffer.
    Data(usize),
    /// The phase is over; the device is now in STOP_COPY on the same fd.
    Switched,
}

impl DeviceCtx<'_, '_> {
    /// The fd to read in STOP_COPY.
    pub(crate) fn data_fd(&self) -> BorrowedFd<'_> {
        match (&self.owned_fd, self.raw_fd) {
            (Some(fd), _) => fd.as_fd(),
            (None, Some(fd)) => fd,
            (None, None) => unreachable!("a device context always holds a data fd"),
        }
    }

    /// Reads at most `buf.len()` bytes of pre-copy data, bounded by what the device reports as
    /// available; at the temporary end (ENOMSG, or 0 as mtty does) or past the pre-copy byte
    /// cap, walks the device to STOP_COPY and reports [`PrecopyStep::Switched`].
    pub(crate) fn precopy_read(&mut self, buf: &mut [u8], cap: u64) -> Result<PrecopyStep> {
        let id = self.id;
        let dev = self.dev.as_deref_mut().expect("pre-copy only runs on devices");
        let fd = self.owned_fd.as_ref().expect("pre-copy holds a data fd").as_fd();
        let info = dev.precopy_info(fd).map_err(|e| Error::Device { device: id.clone(), source: e })?;
        let avail = info.initial_bytes.saturating_add(info.dirty_bytes);
        // Stream only the initial data: dirty data would be re-sent in STOP_COPY anyway, and a
        // device that keeps dirtying must not keep the source in PRE_COPY forever.
        if info.initial_bytes > 0 && self.precopy_bytes < cap {
            let want = buf.len().min(usize::try_from(avail).unwrap_or(usize::MAX));
            match dev.read_data(fd, &mut buf[..want]) {
                Ok(ReadOutcome::Data(n)) => {
                    self.precopy_bytes += n as u64;
                    return Ok(PrecopyStep::Data(n));
                }
                Ok(ReadOutcome::Eof) | Ok(ReadOutcome::NoMsg) => {}
                Err(e) => return Err(Error::Device { device: id.clone(), source: e }),
            }
        }
        self.enter_stop_copy()?;
        Ok(PrecopyStep::Switched)
    }

    fn enter_stop_copy(&mut self) -> Result<()> {
        let id = self.id;
        let dev = self.dev.as_deref_mut().expect("devices only");
        let t = transition(dev, MigState::StopCopy).map_err(|e| Error::Device { device: id.clone(), source: e })?;
        if let Some(fd) = t.data_fd {
            // Only a walk that passed through STOP makes a new fd; the pre-copy stream would
            // be lost, so that is a protocol error for a device that was in PRE_COPY.
            if self.in_precopy {
                return Err(Error::Device {
                    device: id.clone(),
                    source: vfio_migration::Error::Protocol {
                        device: dev.name().to_owned(),
                        what: "PRE_COPY -> STOP_COPY created a new data fd".into(),
                    },
                });
            }
            self.owned_fd = Some(fd);
        }
        self.in_precopy = false;
        self.stop_copy_start = Instant::now();
        Ok(())
    }

    /// The config packet's payload, read after the data stream ended.
    pub(crate) fn config(&mut self) -> Result<Vec<u8>> {
        match self.dev.as_deref_mut() {
            Some(dev) => dev.save_config().map_err(|e| Error::Device { device: self.id.clone(), source: e }),
            None => Ok(self.raw_config.to_vec()),
        }
    }
}

/// Largest config blob a source sends or a receiver accepts in one packet is the packet size.
fn check_unique_ids(devs: &[SourceDevice<'_>]) -> Result<()> {
    for (i, a) in devs.iter().enumerate() {
        if devs[..i].iter().any(|b| b.id == a.id) {
            return Err(Error::Config(format!("device {} added twice", a.id)));
        }
    }
    Ok(())
}

impl<'a> Source<'a> {
    /// A source over already connected stream sockets (TCP or Unix), channel `i` being
    /// `channels[i]`. The sockets are closed when the transfer ends.
    ///
    /// # Errors
    /// [`Error::Config`] for no channels or more than 256; eventfd creation failures.
    pub fn new(cfg: SourceConfig, channels: Vec<OwnedFd>) -> Result<Source<'a>> {
        if channels.is_empty() || channels.len() > crate::wire::MAX_CHANNELS {
            return Err(Error::Config(format!("{} channels outside 1..=256", channels.len())));
        }
        let abort = AbortHandle::new().map_err(|e| Error::sys("eventfd", e))?;
        Ok(Source { cfg, channels, devices: Vec::new(), abort, progress: Progress::default() })
    }

    /// Connects `n` TCP channels to `addr` (each with `TCP_NODELAY`).
    ///
    /// # Errors
    /// [`Error::Sys`] naming the address and channel when a connection fails.
    pub fn connect(cfg: SourceConfig, addr: impl ToSocketAddrs + std::fmt::Debug, n: usize) -> Result<Source<'a>> {
        let mut chans = Vec::with_capacity(n);
        for i in 0..n {
            let s = TcpStream::connect(&addr).map_err(|e| Error::sys(format!("connect channel {i} to {addr:?}"), e))?;
            s.set_nodelay(true).map_err(|e| Error::sys("TCP_NODELAY", e))?;
            chans.push(OwnedFd::from(s));
        }
        Source::new(cfg, chans)
    }

    /// Adds a migratable device with default options: the engine walks it to STOP_COPY,
    /// streams its state, sends its config last, and leaves it in STOP.
    pub fn add_device(&mut self, id: DeviceId, dev: &'a mut dyn MigrationDevice) -> &mut Self {
        self.add_device_with(id, dev, DeviceOptions::default())
    }

    /// Adds a migratable device with explicit options.
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
    /// stream file) plus the config blob to send last.
    pub fn add_data_fd(&mut self, id: DeviceId, fd: BorrowedFd<'a>, config: &'a [u8]) -> &mut Self {
        self.devices.push(SourceDevice { id, kind: SourceKind::Fd { fd, config } });
        self
    }

    /// A handle that aborts this transfer from any thread.
    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    /// A handle to watch the bytes sent so far from any thread.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Runs the transfer to completion: sends the init packet on every channel, runs one
    /// thread per device, and closes the channels.
    ///
    /// # Errors
    /// The first failure (later ones caused by the abort it triggers are dropped). Devices
    /// handed over as [`MigrationDevice`] are recovered to RUNNING on failure.
    pub fn run(mut self) -> Result<SourceReport> {
        self.cfg.validate(self.channels.len(), self.devices.len()).map_err(Error::Config)?;
        check_unique_ids(&self.devices)?;
        let started = Instant::now();
        let (backend, fallback_reason) = crate::backend::choose(self.cfg.backend)?;
        let zerocopy = zerocopy_decision(backend, self.cfg.zerocopy, &self.channels)?;
        for (ch, fd) in ChannelId::all(self.channels.len()).zip(&self.channels) {
            send_init(fd.as_fd(), &InitPacket { uuid: self.cfg.uuid, id: ch.get() }).map_err(|e| Error::Channel {
                channel: ch,
                op: "send init packet".into(),
                source: e,
            })?;
        }
        let shared = SourceShared {
            cfg: &self.cfg,
            channels: self.channels.iter().map(|c| c.as_fd()).collect(),
            leases: ChannelLeases::new(self.channels.len(), self.devices.len())
                .map_err(|e| Error::sys("eventfd", e))?,
            counters: (0..self.channels.len()).map(|_| ChannelCounters::default()).collect(),
            abort: self.abort.clone(),
            zerocopy,
            progress: self.progress.clone(),
        };
        let devices = std::mem::take(&mut self.devices);
        let results = run_devices(&shared, backend, devices);
        // Closing our write side tells the receiver the stream ended at a packet boundary. A
        // failure here (the peer already reset the connection) changes nothing the devices'
        // results do not already say.
        for ch in &shared.channels {
            let _ = sys::shutdown_write(*ch);
        }
        let mut reports = Vec::new();
        let mut latency = Latency::new();
        let (mut zc, mut copied) = (0, 0);
        let mut first_err: Option<Error> = None;
        for r in results {
            match r {
                Ok(t) => {
                    latency.merge(&t.latency);
                    zc += t.zerocopy_bytes;
                    copied += t.copied_bytes;
                    reports.push(t.report);
                }
                // Keep the root cause, not the "aborted" echoes it caused in other threads.
                Err(e) => Error::keep_root_cause(&mut first_err, e),
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(SourceReport {
            backend,
            fallback_reason,
            zerocopy,
            zerocopy_bytes: zc,
            copied_bytes: copied,
            elapsed: started.elapsed(),
            devices: reports,
            channels: ChannelId::all(shared.counters.len()).map(|c| shared.counters[c.index()].report(c)).collect(),
            latency: latency.summary(),
        })
    }
}

/// Runs every device on its own scoped thread and collects each one's outcome.
fn run_devices(
    shared: &SourceShared<'_>,
    backend: BackendKind,
    devices: Vec<SourceDevice<'_>>,
) -> Vec<Result<Tallies>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .into_iter()
            .enumerate()
            .map(|(no, d)| {
                std::thread::Builder::new()
                    .name(format!("vfmfd-src-{no}"))
                    .spawn_scoped(s, move || run_device(shared, backend, DeviceIndex::new(no), d))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => {
                    h.join().unwrap_or_else(|_| Err(Error::sys("device thread", std::io::Error::other("panicked"))))
                }
                Err(e) => {
                    shared.abort.abort();
                    Err(Error::sys("spawn device thread", e))
                }
            })
            .collect()
    })
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
            let remote = channels.iter().all(|c| !peer_is_loopback(c.as_fd()));
            Ok(all_tcp && supported && (z == ZeroCopy::On || remote))
        }
    }
}

/// Whether a TCP socket's peer is on the loopback network (127.0.0.0/8, ::1, or a v4-mapped
/// 127.x address), where SEND_ZC always falls back to copying.
fn peer_is_loopback(fd: BorrowedFd<'_>) -> bool {
    match sys::peer_ip(fd) {
        Some(std::net::IpAddr::V6(ip)) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        Some(ip) => ip.is_loopback(),
        None => false,
    }
}

fn send_init(fd: BorrowedFd<'_>, p: &InitPacket) -> std::io::Result<()> {
    let mut b = [0u8; INIT_PACKET_LEN];
    p.encode(&mut b).map_err(std::io::Error::other)?;
    // A cloned std stream over the same fd: write_all handles partial writes and EINTR.
    let mut s = std::fs::File::from(sys::dup(fd)?);
    s.write_all(&b)
}

/// What a device thread starts from: the device (or raw fd) and the data fd to read.
struct Started<'a, 'd> {
    dev: Option<&'a mut (dyn MigrationDevice + 'd)>,
    raw_config: &'a [u8],
    opts: DeviceOptions,
    raw_fd: Option<BorrowedFd<'a>>,
    owned_fd: Option<OwnedFd>,
    in_precopy: bool,
}

/// Walks a device to PRE_COPY or STOP_COPY and takes its data fd; on failure the device is
/// recovered to RUNNING (the VM keeps running).
fn start_device<'a, 'd>(id: &DeviceId, kind: SourceKind<'a>) -> Result<Started<'a, 'd>>
where
    'a: 'd,
{
    let (dev, opts) = match kind {
        SourceKind::Fd { fd, config } => {
            return Ok(Started {
                dev: None,
                raw_config: config,
                opts: DeviceOptions::default(),
                raw_fd: Some(fd),
                owned_fd: None,
                in_precopy: false,
            })
        }
        SourceKind::Device { dev, opts } => (dev, opts),
    };
    let derr = |e| Error::Device { device: id.clone(), source: e };
    let walk = |dev: &mut dyn MigrationDevice| -> Result<(OwnedFd, bool)> {
        let flags = dev.migration_flags().map_err(derr)?;
        let precopy = opts.precopy && flags.contains(vfio_migration::MigFlags::PRE_COPY);
        let target = if precopy { MigState::PreCopy } else { MigState::StopCopy };
        let t = transition(dev, target).map_err(derr)?;
        let fd = t.data_fd.ok_or_else(|| {
            derr(vfio_migration::Error::Protocol {
                device: dev.name().to_owned(),
                what: format!("device was already in {target}: its data stream was started by someone else"),
            })
        })?;
        Ok((fd, precopy))
    };
    match walk(&mut *dev) {
        Ok((fd, in_precopy)) => {
            Ok(Started { dev: Some(dev), raw_config: &[], opts, raw_fd: None, owned_fd: Some(fd), in_precopy })
        }
        Err(e) => Err(match recover(dev, MigState::Running) {
            Ok(_) => e,
            Err(r) => Error::Unrecovered { device: id.clone(), cause: Box::new(e), source: r },
        }),
    }
}

/// Runs one device on its own thread: state transitions, the backend's loop, recovery.
fn run_device(
    shared: &SourceShared<'_>,
    backend: BackendKind,
    dev_no: DeviceIndex,
    d: SourceDevice<'_>,
) -> Result<Tallies> {
    let started = Instant::now();
    let SourceDevice { id, kind } = d;
    let st = start_device(&id, kind).inspect_err(|_| shared.abort.abort())?;
    let final_state = st.opts.final_state;
    let mut ctx = DeviceCtx {
        id: &id,
        dev_no,
        dev: st.dev,
        raw_config: st.raw_config,
        owned_fd: st.owned_fd,
        raw_fd: st.raw_fd,
        in_precopy: st.in_precopy,
        precopy_bytes: 0,
        stop_copy_start: Instant::now(),
    };
    let res = match backend {
        BackendKind::Uring => uring::run(shared, &mut ctx),
        BackendKind::Blocking => blocking::run(shared, &mut ctx),
    };
    shared.leases.withdraw(dev_no);
    // The save session ends with the walk below (or the recovery); the fd goes first.
    ctx.owned_fd = None;
    let res = res.and_then(|mut out| {
        if let Some(dev) = ctx.dev.as_deref_mut() {
            transition(dev, final_state).map_err(|e| Error::Device { device: id.clone(), source: e })?;
        }
        out.report.precopy_bytes = ctx.precopy_bytes;
        out.report.elapsed = started.elapsed();
        Ok(out)
    });
    res.map_err(|e| {
        shared.abort.abort();
        // Keep the VM running: the migration failed, the source carries on.
        match ctx.dev.as_deref_mut().map(|dev| recover(dev, MigState::Running)) {
            Some(Err(r)) => Error::Unrecovered { device: id.clone(), cause: Box::new(e), source: r },
            _ => e,
        }
    })
}
