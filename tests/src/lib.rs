//! Helpers shared by the integration tests: loopback transfers of simulated devices between a
//! source and a receiver in one process, and fd counting for leak checks.

use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Duration;

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::MigState;
use vfio_multifd::{
    Backend, DeviceId, DeviceOptions, Receiver, ReceiverConfig, ReceiverReport, Result, Source, SourceConfig,
    SourceReport,
};

/// Number of open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// `n` connected loopback TCP pairs: (client ends, server ends), server ends in accept order.
pub fn tcp_pairs(n: usize) -> (Vec<OwnedFd>, Vec<OwnedFd>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().expect("local addr");
    let mut c = Vec::new();
    let mut s = Vec::new();
    for _ in 0..n {
        let a = TcpStream::connect(addr).expect("connect loopback");
        a.set_nodelay(true).ok();
        let (b, _) = l.accept().expect("accept loopback");
        c.push(OwnedFd::from(a));
        s.push(OwnedFd::from(b));
    }
    (c, s)
}

/// The wire identity tests give simulated device `i`.
pub fn dev_id(i: usize) -> DeviceId {
    DeviceId::new(&format!("0000:00:{:02x}.0/vfio", i + 2), 0).expect("valid id")
}

/// Outcome of [`migrate`].
#[allow(missing_debug_implementations)]
pub struct Migration {
    /// The source's result.
    pub source: Result<SourceReport>,
    /// The receiver's result.
    pub receiver: Result<ReceiverReport>,
    /// Source devices after the transfer.
    pub sources: Vec<SimDevice>,
    /// Destination devices after the transfer.
    pub dests: Vec<SimDevice>,
}

/// Migrates simulated devices `cfgs` (destination expectations equal to the sources) over
/// `channels` loopback TCP channels, source and receiver on two threads.
pub fn migrate(
    cfgs: &[SimConfig],
    channels: usize,
    scfg: SourceConfig,
    rcfg: ReceiverConfig,
    precopy: bool,
) -> Migration {
    migrate_with(cfgs, cfgs, channels, scfg, rcfg, precopy)
}

/// As [`migrate`], with separate destination expectations.
pub fn migrate_with(
    src_cfgs: &[SimConfig],
    dst_cfgs: &[SimConfig],
    channels: usize,
    scfg: SourceConfig,
    rcfg: ReceiverConfig,
    precopy: bool,
) -> Migration {
    let mut sources: Vec<SimDevice> = src_cfgs.iter().cloned().map(SimDevice::new).collect();
    let mut dests: Vec<SimDevice> = dst_cfgs.iter().cloned().map(SimDevice::new).collect();
    let (c, s) = tcp_pairs(channels);
    let (source, receiver) = std::thread::scope(|sc| {
        let dests = &mut dests;
        let rx = sc.spawn(move || {
            let mut r = Receiver::new(rcfg.stall_timeout(Duration::from_secs(30))).expect("receiver");
            for (i, d) in dests.iter_mut().enumerate() {
                r.add_device_with(dev_id(i), d, MigState::Running);
            }
            r.run(s)
        });
        let mut src = Source::new(scfg.stall_timeout(Duration::from_secs(30)), c).expect("source");
        for (i, d) in sources.iter_mut().enumerate() {
            src.add_device_with(dev_id(i), d, DeviceOptions { precopy, final_state: MigState::Stop });
        }
        let source = src.run();
        let receiver = rx.join().expect("receiver thread");
        (source, receiver)
    });
    Migration { source, receiver, sources, dests }
}

/// Asserts that every destination verified its whole stream and holds the source's config.
pub fn assert_verified(m: &Migration) {
    let sr = m.source.as_ref().expect("source ok");
    let rr = m.receiver.as_ref().expect("receiver ok");
    for (i, d) in m.dests.iter().enumerate() {
        let cfg = d.sim_config();
        let rep = d.resume_report().expect("destination resumed");
        assert!(rep.verified_ok, "device {i}: stream did not verify: {rep:?}");
        assert_eq!(rep.bytes_written, cfg.size, "device {i}: bytes");
        assert_eq!(d.config(), Some(SimDevice::expected_config(m.sources[i].sim_config())), "device {i}: config blob");
        assert_eq!(d.state().ok(), Some(MigState::Running), "device {i}: destination state");
        assert_eq!(rr.devices[i].data_bytes, cfg.size);
        assert_eq!(sr.devices[i].data_bytes, cfg.size);
    }
    let sent: u64 = sr.channels.iter().map(|c| c.bytes).sum();
    let got: u64 = rr.channels.iter().map(|c| c.bytes).sum();
    assert_eq!(sent, got, "wire bytes sent and received");
}

/// Asserts that every destination in `dests` verified its whole stream and is RUNNING (for
/// receives driven by a hand-written sender, where there is no source report).
pub fn assert_dests_verified(dests: &[SimDevice]) {
    for (i, d) in dests.iter().enumerate() {
        let r = d.resume_report().expect("resumed");
        assert!(r.verified_ok, "device {i}: {r:?}");
        assert_eq!(d.state().ok(), Some(MigState::Running), "device {i}: destination state");
    }
}

pub use vfio_migration::MigrationDevice;

/// A hand-driven sender for protocol tests: writes init packets and device-state packets
/// exactly as it is told, in any order, on any channel.
#[allow(missing_debug_implementations)]
pub struct RawSender {
    /// Channel sockets.
    pub chans: Vec<TcpStream>,
}

impl RawSender {
    /// Connects `n` channels to `addr`.
    pub fn connect(addr: std::net::SocketAddr, n: usize) -> RawSender {
        RawSender { chans: (0..n).map(|_| TcpStream::connect(addr).expect("connect")).collect() }
    }

    /// Writes raw bytes on channel `c` (errors ignored: the receiver may have hung up).
    pub fn raw(&mut self, c: usize, b: &[u8]) {
        use std::io::Write;
        let _ = self.chans[c].write_all(b);
    }

    /// Sends a valid init packet with id `id` and the all-zero UUID on channel `c`.
    pub fn init(&mut self, c: usize, id: u8) {
        self.init_offering(c, id, 0);
    }

    /// As [`RawSender::init`], offering the extension bits `offer` (on channel 0, the return
    /// path and the commit: `wire::EXT_RETURN_PATH | wire::EXT_COMMIT`).
    pub fn init_offering(&mut self, c: usize, id: u8, offer: u8) {
        let mut b = [0u8; vfio_multifd::wire::INIT_PACKET_LEN];
        vfio_multifd::wire::InitPacket { uuid: [0; 16], id, offer, devices: 0 }.encode(&mut b).unwrap();
        self.raw(c, &b);
    }

    /// Sends a packet of device `dev` with index `idx` carrying `data` on channel `c`.
    pub fn packet(&mut self, c: usize, dev: &DeviceId, idx: u32, config: bool, data: &[u8]) {
        let mut b = vec![0u8; vfio_multifd::wire::PACKET_OVERHEAD];
        let v = vfio_multifd::wire::VfioPacketHeader { idx, flags: u32::from(config) };
        vfio_multifd::wire::encode_packet_header(dev, v, data.len(), &mut b).unwrap();
        b.extend_from_slice(data);
        self.raw(c, &b);
    }

    /// Closes every channel's write side.
    pub fn finish(&mut self) {
        for c in &self.chans {
            let _ = c.shutdown(std::net::Shutdown::Write);
        }
    }
}

/// The device-state bytes of a simulated stream `[off, off+len)`.
pub fn sim_bytes(seed: u64, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    vfio_migration::sim::fill(seed, off, &mut v);
    v
}

/// Device `dev`'s whole stream as wire bytes: `packets` data packets of `pkt` bytes of `cfg`'s
/// content (indexes 0..packets), then its config packet.
pub fn device_stream(dev: usize, cfg: &SimConfig, packets: usize, pkt: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for idx in 0..=packets {
        let config = idx == packets;
        let data = if config { SimDevice::expected_config(cfg) } else { sim_bytes(cfg.seed, (idx * pkt) as u64, pkt) };
        let mut b = vec![0u8; vfio_multifd::wire::PACKET_OVERHEAD];
        let v = vfio_multifd::wire::VfioPacketHeader { idx: idx as u32, flags: u32::from(config) };
        vfio_multifd::wire::encode_packet_header(&dev_id(dev), v, data.len(), &mut b).expect("encode a packet header");
        b.extend_from_slice(&data);
        out.extend(b);
    }
    out
}

/// Runs a receiver for destination sims `cfgs` on a loopback listener with `channels`
/// channels; `drive` gets the listener address and plays the sender. Returns the receiver's
/// result and the destination devices.
pub fn receive_from<F: FnOnce(std::net::SocketAddr)>(
    cfgs: &[SimConfig],
    channels: usize,
    rcfg: ReceiverConfig,
    drive: F,
) -> (Result<ReceiverReport>, Vec<SimDevice>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().unwrap();
    let mut dests: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
    let res = std::thread::scope(|sc| {
        let dests = &mut dests;
        let l = &l;
        let h = sc.spawn(move || {
            let mut r = Receiver::new(rcfg).expect("receiver");
            for (i, d) in dests.iter_mut().enumerate() {
                r.add_device_with(dev_id(i), d, MigState::Running);
            }
            r.run_listener(l, channels)
        });
        drive(addr);
        h.join().expect("receiver thread")
    });
    (res, dests)
}

/// Number of live threads the engine (`vfmfd-*`) and the simulated devices (`sim-*`) started:
/// every thread they start is named so. Other threads are not counted: the test harness starts
/// and ends its own (one per running test, even while it waits for a `serial()` lock) on its own
/// schedule, and the kernel's io_uring workers (`iou-wrk-*`, `iou-sqp-*`) come and go on
/// demand, so neither is anyone's leak.
pub fn threads() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return 0 };
    dir.filter_map(std::result::Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("vfmfd-") || c.starts_with("sim-"))
        })
        .count()
}

/// Names of the threads [`threads`] counts, for a leak message.
pub fn thread_names() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    dir.filter_map(std::result::Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim_end().to_owned())
        .filter(|c| c.starts_with("vfmfd-") || c.starts_with("sim-"))
        .collect()
}

/// Why the io_uring backend cannot run on this machine, or `None` if it can. The only place
/// the tests ask the engine's probe, so a rename there is a one-line change here.
pub fn uring_unavailable_reason() -> Option<String> {
    vfio_multifd::uring_capabilities().unavailable
}

/// Whether this run is under CI (`CI=true`), where a missing io_uring is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Runs the same case `f` on both engine backends, io_uring first, and fails if it failed on
/// either, naming which. Both halves always run, so one failing backend does not hide the
/// other's outcome.
///
/// Without io_uring the io_uring half fails under CI (`CI=true`); elsewhere it is skipped with
/// `skipped io_uring half: <reason>` on stderr, and the blocking half still runs.
pub fn each_backend(f: impl Fn(Backend)) {
    let mut failed = Vec::new();
    match uring_unavailable_reason() {
        None => {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(Backend::Uring))).is_err() {
                failed.push("io_uring");
            }
        }
        Some(why) if in_ci() => {
            eprintln!("io_uring unavailable under CI=true: {why}");
            failed.push("io_uring (unavailable under CI=true)");
        }
        Some(why) => eprintln!("skipped io_uring half: {why}"),
    }
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(Backend::Blocking))).is_err() {
        failed.push("blocking");
    }
    assert!(failed.is_empty(), "failed on backend(s): {} (see the panic messages above)", failed.join(", "));
}

/// A globally ordered log of state changes: `(device, from, to)` per SET, across devices.
#[derive(Debug, Clone, Default)]
pub struct StateLog(std::sync::Arc<std::sync::Mutex<Vec<(usize, MigState, MigState)>>>);

impl StateLog {
    /// Every SET so far, in the order they happened.
    pub fn entries(&self) -> Vec<(usize, MigState, MigState)> {
        self.0.lock().expect("log").clone()
    }

    /// Position of the first SET of `device` to `to`, if any.
    pub fn first(&self, device: usize, to: MigState) -> Option<usize> {
        self.entries().iter().position(|&(d, _, t)| d == device && t == to)
    }
}

/// Called after each successful SET of a [`Logged`] device: its number, from, to.
pub type AfterSet = std::sync::Arc<dyn Fn(usize, MigState, MigState) + Send + Sync>;

/// A [`SimDevice`] whose every SET is written into a shared [`StateLog`] (the order checker of
/// the live-migration tests: P2P before any stop, RUNNING_P2P before RUNNING), and that calls
/// `after` after each successful one (to time a cancel exactly).
#[allow(missing_debug_implementations)]
pub struct Logged<'a> {
    /// The device.
    pub dev: &'a mut SimDevice,
    /// Its number in the log.
    pub no: usize,
    /// The shared log.
    pub log: StateLog,
    /// Called after each successful SET.
    pub after: Option<AfterSet>,
}

impl MigrationDevice for Logged<'_> {
    fn name(&self) -> &str {
        self.dev.name()
    }
    fn migration_flags(&self) -> vfio_migration::Result<vfio_migration::MigFlags> {
        self.dev.migration_flags()
    }
    fn state(&self) -> vfio_migration::Result<MigState> {
        self.dev.state()
    }
    fn set_state_raw(&mut self, target: MigState) -> vfio_migration::Result<Option<OwnedFd>> {
        let from = self.dev.state()?;
        let r = self.dev.set_state_raw(target);
        self.log.0.lock().expect("log").push((self.no, from, target));
        if let (Ok(_), Some(f)) = (&r, &self.after) {
            f(self.no, from, target);
        }
        r
    }
    fn stop_copy_size(&self) -> vfio_migration::Result<u64> {
        self.dev.stop_copy_size()
    }
    fn precopy_info(&self, fd: std::os::fd::BorrowedFd<'_>) -> vfio_migration::Result<vfio_migration::PrecopyInfo> {
        self.dev.precopy_info(fd)
    }
    fn enable_precopy_info_v2(&mut self) -> vfio_migration::Result<bool> {
        self.dev.enable_precopy_info_v2()
    }
    fn reset(&mut self) -> vfio_migration::Result<()> {
        self.dev.reset()
    }
    fn read_data(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        buf: &mut [u8],
    ) -> vfio_migration::Result<vfio_migration::ReadOutcome> {
        self.dev.read_data(fd, buf)
    }
    fn write_data(&self, fd: std::os::fd::BorrowedFd<'_>, buf: &[u8]) -> vfio_migration::Result<usize> {
        self.dev.write_data(fd, buf)
    }
    fn save_config(&mut self) -> vfio_migration::Result<Vec<u8>> {
        self.dev.save_config()
    }
    fn load_config(&mut self, blob: &[u8]) -> vfio_migration::Result<()> {
        self.dev.load_config(blob)
    }
}

/// Outcome of [`live_migrate`].
#[allow(missing_debug_implementations)]
pub struct LiveMigration<R> {
    /// The source session's result (the drive closure's value and the report).
    pub source: Result<(R, SourceReport)>,
    /// The receiver's result.
    pub receiver: Result<ReceiverReport>,
    /// Source devices afterwards.
    pub sources: Vec<SimDevice>,
    /// Destination devices afterwards.
    pub dests: Vec<SimDevice>,
    /// Every source SET, in order.
    pub log: StateLog,
}

/// A live migration of simulated devices `cfgs` over `channels` loopback channels: a
/// [`vfio_multifd::SourceSession`] driven by `drive` on this thread, a receiver that starts the
/// destination devices (RUNNING) on another. Every source SET is logged in order.
pub fn live_migrate<R>(
    cfgs: &[SimConfig],
    channels: usize,
    scfg: SourceConfig,
    rcfg: ReceiverConfig,
    drive: impl FnOnce(&mut vfio_multifd::SessionControl<'_>) -> Result<R>,
) -> LiveMigration<R> {
    let sources: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
    let dests: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
    live_migrate_devices(sources, dests, channels, scfg, rcfg, drive)
}

/// As [`live_migrate`], with devices the test built itself (joined to a fabric, say).
pub fn live_migrate_devices<R>(
    mut sources: Vec<SimDevice>,
    mut dests: Vec<SimDevice>,
    channels: usize,
    scfg: SourceConfig,
    rcfg: ReceiverConfig,
    drive: impl FnOnce(&mut vfio_multifd::SessionControl<'_>) -> Result<R>,
) -> LiveMigration<R> {
    let log = StateLog::default();
    let (c, s) = tcp_pairs(channels);
    let (source, receiver) = std::thread::scope(|sc| {
        let dests = &mut dests;
        let rx = sc.spawn(move || {
            let mut r = Receiver::new(rcfg).expect("receiver");
            for (i, d) in dests.iter_mut().enumerate() {
                r.add_device_with(dev_id(i), d, MigState::Running);
            }
            r.run(s)
        });
        let mut logged: Vec<Logged<'_>> =
            sources.iter_mut().enumerate().map(|(no, dev)| Logged { dev, no, log: log.clone(), after: None }).collect();
        let mut session = vfio_multifd::SourceSession::new(scfg, c).expect("session");
        for (i, d) in logged.iter_mut().enumerate() {
            session.add_device(dev_id(i), d);
        }
        let source = session.run(drive);
        let receiver = rx.join().expect("receiver thread");
        (source, receiver)
    });
    LiveMigration { source, receiver, sources, dests, log }
}

/// Reads return-path frames from channel 0 (as a raw source) until `SHUT` (type 4, DESIGN 7.3),
/// at most 10 s; returns the frame types seen, in order, and `SHUT`'s status byte (0: every
/// device loaded).
///
/// # Panics
/// When the stream ends or times out before `SHUT`.
pub fn read_until_shut_status(s: &mut std::net::TcpStream) -> (Vec<u16>, u8) {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let mut seen = Vec::new();
    loop {
        let mut h = [0u8; 4];
        s.read_exact(&mut h).expect("a return-path frame header");
        let (t, n) = (u16::from_be_bytes([h[0], h[1]]), u16::from_be_bytes([h[2], h[3]]));
        let mut p = vec![0u8; usize::from(n)];
        s.read_exact(&mut p).expect("a return-path payload");
        seen.push(t);
        if t == 4 {
            return (seen, p.first().copied().unwrap_or(u8::MAX));
        }
    }
}
