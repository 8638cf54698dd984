//! The source side: devices in, multifd packets out.
//!
//! * `session.rs`: the public [`SourceSession`] a VMM drives (set-up, pre-copy, switchover,
//!   cancel), device threads and the P2P-safe epilogue.
//! * `mod.rs` (this file): the one-shot [`Source`], a thin layer over the session.
//! * `control.rs`: the controller ↔ device-thread mailbox, status and events.
//! * `device.rs`: one device's phase machine (the state changes of a session, written once).
//! * `core.rs`: the stream rules both backends obey (packet indexes, accounting and cap, the
//!   config packet, post-send tallies), without I/O.
//! * `close.rs`: how the channels end after the last packet (read to the peer's EOF first).
//! * `lease.rs`: fair leasing of channels to device threads.
//! * `uring.rs` and `blocking.rs`: the two backends' device loops.

mod blocking;
mod close;
pub(crate) mod control;
pub(crate) mod core;
pub(crate) mod device;
mod lease;
mod rpath;
pub(crate) mod session;
mod uring;

use std::net::ToSocketAddrs;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use vfio_migration::{MigState, MigrationDevice};

use self::lease::ChannelLeases;
use crate::abort::AbortHandle;
use crate::config::SourceConfig;
use crate::error::Result;
use crate::stats::{ChannelCounters, Progress, SourceReport};
use crate::wire::DeviceId;
pub use session::{SessionControl, SessionStatus, SourceSession};

/// How often an idle pre-copy asks the device again (PRECOPY_INFO, then a read): new dirty data
/// is picked up within this, and no thread spins meanwhile.
pub(crate) const PRECOPY_POLL: Duration = Duration::from_millis(20);

/// Per-device options for [`Source::add_device_with`] and [`SourceSession::add_device_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceOptions {
    /// One-shot [`Source::run`] only: go through PRE_COPY first (when the device supports it),
    /// stream the initial data, then switch over. A VMM that runs its guest meanwhile drives a
    /// [`SourceSession`] instead and decides the switchover itself.
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

/// A one-shot transfer of one or more devices' state over N multifd channels, for a VM that is
/// already paused (or a saved stream): a [`SourceSession`] that switches over at once, P2P-safely.
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
#[derive(Debug)]
pub struct Source<'a> {
    session: SourceSession<'a>,
    precopy: bool,
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
    /// What the destination said on the return path (whether it accepted it, verdicts).
    pub(crate) rp: &'c rpath::RpState,
    /// The device threads' rings and pools, released when the session returns (after the
    /// verdicts), not inside the switchover.
    pub(crate) deferred: crate::uring::Deferred,
}

impl<'a> Source<'a> {
    /// A source over already connected stream sockets (TCP or Unix), channel `i` being
    /// `channels[i]`. The sockets are closed when the transfer ends.
    ///
    /// # Errors
    /// [`crate::Error::Config`] for no channels or more than 256; eventfd creation failures.
    pub fn new(cfg: SourceConfig, channels: Vec<OwnedFd>) -> Result<Source<'a>> {
        Ok(Source { session: SourceSession::new(cfg, channels)?, precopy: false })
    }

    /// Connects `n` TCP channels to `addr` (each with `TCP_NODELAY`).
    ///
    /// # Errors
    /// [`crate::Error::Sys`] naming the address and channel when a connection fails.
    pub fn connect(cfg: SourceConfig, addr: impl ToSocketAddrs + std::fmt::Debug, n: usize) -> Result<Source<'a>> {
        Ok(Source { session: SourceSession::connect(cfg, addr, n)?, precopy: false })
    }

    /// Adds a migratable device with default options: the engine walks it to STOP_COPY
    /// (P2P-safely with the other devices), streams its state, sends its config last, and
    /// leaves it in STOP.
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
        self.precopy |= opts.precopy;
        self.session.add_device_with(id, dev, opts);
        self
    }

    /// Adds a raw readable stream (a data fd the VMM already put in STOP_COPY, or a saved
    /// stream file) plus the config blob to send last. A regular file must give the bytes it
    /// holds now (see [`SourceSession::add_data_fd`]).
    pub fn add_data_fd(&mut self, id: DeviceId, fd: BorrowedFd<'a>, config: &'a [u8]) -> &mut Self {
        self.session.add_data_fd(id, fd, config);
        self
    }

    /// A handle that aborts this transfer from any thread.
    pub fn abort_handle(&self) -> AbortHandle {
        self.session.abort_handle()
    }

    /// A handle to watch the bytes sent so far from any thread.
    pub fn progress(&self) -> Progress {
        self.session.progress()
    }

    /// Runs the transfer to completion: init packets on every channel, one thread per device,
    /// (with `precopy`: pre-copy until every device's initial data is out), the switchover,
    /// the rest of every stream and the configs.
    ///
    /// # Errors
    /// The first failure (later ones caused by the abort it triggers are dropped). Devices
    /// handed over as [`MigrationDevice`] are then back in RUNNING.
    pub fn run(self) -> Result<SourceReport> {
        let precopy = self.precopy;
        self.session
            .run(|ctl| {
                if precopy {
                    ctl.start_precopy()?;
                    ctl.wait_initial_data()?;
                }
                ctl.switchover()
            })
            .map(|((), report)| report)
    }
}
