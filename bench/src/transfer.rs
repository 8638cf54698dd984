//! `loopback`, `send` and `recv`: transfers through the engine, with progress and reports.

use std::fs::File;
use std::io::Read;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use vfio_migration::sim::{Fabric, FabricStats, SimConfig, SimDevice, SimHandle};
use vfio_migration::vfio::VfioDevice;
use vfio_migration::{transition, MigState, MigrationDevice};
use vfio_multifd::{
    Backend, DeviceId, DeviceOptions, Receiver, ReceiverConfig, ReceiverReport, SourceConfig, SourceReport,
    SourceSession, ZeroCopy,
};

use crate::cli::{check_positions, device_id, LiveArgs, LoopbackArgs, RecvArgs, SendArgs, SimSpec, SwitchoverArg};
use crate::guest::Vcpus;
use crate::live::{drive, failed_text, DowntimeEnd, DriveOpts, ManualTrigger, Summary};
use crate::sink::{config_path, Sink};
use crate::util::{
    fmt_bytes, fmt_dur, fmt_ns, fmt_rate, kernel_version, lat_json, ms, rusage_self, timestamp, with_progress,
    Interval, StatusLine,
};

/// Which option gave a device, in command-line order: `(option, k-th value of it)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevOpt {
    /// `--device`.
    Device(usize),
    /// `--sim`.
    Sim(usize),
}

/// Engine loopback parameters (shared with the benchmark suite).
#[derive(Debug, Clone)]
pub struct EngineParams {
    /// Simulated devices.
    pub devices: usize,
    /// Stream bytes per device.
    pub size: u64,
    /// Channels.
    pub channels: usize,
    /// Device bytes per packet.
    pub chunk: usize,
    /// Largest simulated read.
    pub max_read: usize,
    /// Through PRE_COPY.
    pub precopy: bool,
    /// Zero-copy policy.
    pub zerocopy: ZeroCopy,
    /// Backend policy.
    pub backend: Backend,
    /// Receive budget.
    pub budget: Option<usize>,
    /// Stall timeout.
    pub stall: Duration,
}

/// Live-migration parameters of an engine loopback run (the defaults: stop-and-copy of plain
/// simulated devices).
#[derive(Debug, Clone, Default)]
pub struct LiveParams {
    /// How the session is driven (`precopy` is taken from [`EngineParams::precopy`]).
    pub drive: DriveOpts,
    /// Live devices dirtying this many bytes a second.
    pub dirty_rate: Option<u64>,
    /// Guest and P2P DMA writers on a fabric, checked at the end.
    pub peer_dma: bool,
}

/// Outcome of one engine loopback run.
#[derive(Debug)]
pub struct EngineRun {
    /// Source report.
    pub source: SourceReport,
    /// Receiver report.
    pub receiver: ReceiverReport,
    /// From the source's start to the receiver's end (the last device loaded).
    pub wall: Duration,
    /// User + system CPU of the process over the run.
    pub cpu: Duration,
    /// Receiver-side intervals.
    pub intervals: Vec<Interval>,
    /// Peak RSS of the process.
    pub max_rss: u64,
    /// The switchover: how pre-copy ended, downtime, bytes on each side of it.
    pub switchover: Summary,
    /// The fabric's counters (`--peer-dma`).
    pub fabric: Option<FabricStats>,
    /// Whether the devices were live and every destination's state digest was checked
    /// against its source's at stop.
    pub digests_checked: bool,
}

/// The simulated device configs of a run: device `i` is `sim<i>` with seed `i + 1`.
pub fn sim_configs(n: usize, size: u64, max_read: usize) -> Vec<SimConfig> {
    (0..n).map(|i| SimConfig::new(format!("sim{i}"), size, i as u64 + 1).with_max_read(max_read)).collect()
}

/// Checks that every destination verified its whole stream and got its source's config blob.
/// A live device's stream is its image and dirty records: at least `size` bytes.
pub fn verify_sims(srcs: &[SimConfig], dsts: &[SimDevice]) -> Result<()> {
    for (i, (s, d)) in srcs.iter().zip(dsts).enumerate() {
        let rep = d.resume_report().ok_or_else(|| anyhow!("device {i}: the destination never finished resuming"))?;
        let len_ok = if s.is_live() { rep.bytes_written >= s.size } else { rep.bytes_written == s.size };
        if !rep.verified_ok || !len_ok {
            bail!(
                "device {i}: destination stream did not verify: {} bytes for an image of {}, first bad offset {:?}",
                rep.bytes_written,
                s.size,
                rep.first_bad_offset
            );
        }
        if d.config() != Some(SimDevice::expected_config(s)) {
            bail!("device {i}: the destination's config blob differs from the source's");
        }
    }
    Ok(())
}

/// The source and destination configs of a loopback run. With pre-copy, a dirty rate or peer
/// DMA the devices are live and their whole image goes in pre-copy. A destination expects the
/// same stream (live, same size, seed and `precopy_bytes`) but with a dirty rate of 0: it
/// then changes nothing on its own once started, so its state can still be compared with the
/// source's after the receiver started it.
fn loopback_configs(p: &EngineParams, live: &LiveParams) -> (Vec<SimConfig>, Vec<SimConfig>) {
    let cfgs = sim_configs(p.devices, p.size, p.max_read);
    if !(p.precopy || live.dirty_rate.is_some() || live.peer_dma) {
        return (cfgs.clone(), cfgs);
    }
    let src: Vec<SimConfig> = cfgs
        .into_iter()
        .map(|c| {
            let size = c.size;
            c.with_dirty_rate(live.dirty_rate.unwrap_or(0)).with_precopy_bytes(size)
        })
        .collect();
    let dst = src.iter().map(|c| c.clone().with_dirty_rate(0)).collect();
    (src, dst)
}

/// Fails on any ordering violation or lost write the fabric recorded.
fn check_fabric(f: &Fabric) -> Result<()> {
    let v = f.violations();
    let st = f.stats();
    if !v.is_empty() {
        let first: Vec<String> = v.iter().take(5).map(ToString::to_string).collect();
        bail!(
            "peer DMA: {} ordering violation(s) or lost write(s) ({} write(s) lost), first: {}",
            v.len(),
            st.writes_lost(),
            first.join("; ")
        );
    }
    if st.writes_lost() > 0 {
        bail!("peer DMA: {} write(s) lost", st.writes_lost());
    }
    Ok(())
}

/// Runs the engine between simulated devices over loopback TCP in this process (stop-and-copy).
pub fn run_engine(p: &EngineParams, bar: bool, interval: Duration) -> Result<EngineRun> {
    run_engine_live(p, &LiveParams::default(), None, bar, interval)
}

/// Runs the engine between simulated devices over loopback TCP in this process: a source
/// session driven as `live` says, a receiver that starts its devices.
pub fn run_engine_live(
    p: &EngineParams,
    live: &LiveParams,
    manual: Option<&ManualTrigger>,
    bar: bool,
    interval: Duration,
) -> Result<EngineRun> {
    let (src_cfgs, dst_cfgs) = loopback_configs(p, live);
    let mut srcs: Vec<SimDevice> = src_cfgs.iter().cloned().map(SimDevice::new).collect();
    let mut dsts: Vec<SimDevice> = dst_cfgs.iter().cloned().map(SimDevice::new).collect();
    let fabric = live.peer_dma.then(Fabric::new);
    if let Some(f) = &fabric {
        for d in &mut srcs {
            d.join(f);
        }
    }
    let handles: Vec<SimHandle> = srcs.iter().map(SimDevice::handle).collect();
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr().context("loopback listener address")?;
    let scfg = SourceConfig::new().chunk_bytes(p.chunk).zerocopy(p.zerocopy).backend(p.backend).stall_timeout(p.stall);
    let mut rcfg = ReceiverConfig::new()
        .max_packet_bytes(p.chunk)
        .backend(p.backend)
        .stall_timeout(p.stall)
        .accept_timeout(Duration::from_secs(20));
    if let Some(b) = p.budget {
        rcfg = rcfg.budget_bytes(b);
    }
    let ids: Vec<DeviceId> = (0..p.devices).map(|i| device_id(i, &[], &[])).collect::<Result<_>>()?;
    // The end of the downtime: every destination device RUNNING (before the receiver's
    // teardown, as a VMM resumes its vCPUs then).
    let running_at: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let mut rx = Receiver::new(rcfg).context("creating the receiver")?;
    let _signals = crate::signals::register(rx.abort_handle());
    for (i, d) in dsts.iter_mut().enumerate() {
        rx.add_device_with(ids[i].clone(), d, MigState::Running);
    }
    rx.on_started(|| {
        let _ = running_at.set(Instant::now());
    });
    let progress = rx.progress();
    let rx_abort = rx.abort_handle();
    // Dirty records make the stream longer than the image: no total then.
    let total = live.dirty_rate.is_none().then_some(p.size * p.devices as u64);
    let opts = DriveOpts { precopy: p.precopy, ..live.drive };
    let line = StatusLine::default();
    let mut vcpus = if live.peer_dma { Vcpus::start(&handles)? } else { Vcpus::none() };
    let (cpu0, _) = rusage_self();
    let t0 = Instant::now();
    let ((sres, rres, wall, rx_end), intervals) =
        with_progress(&progress, total, bar, Some(&line), "loopback", interval, || {
            std::thread::scope(|s| {
                let listener = &listener;
                let h = s.spawn(move || {
                    let r = rx.run_listener(listener, p.channels);
                    (r, t0.elapsed(), Instant::now())
                });
                let sres = (|| {
                    let mut session = SourceSession::connect(scfg, addr, p.channels)?;
                    let _signals = crate::signals::register(session.abort_handle());
                    for (i, d) in srcs.iter_mut().enumerate() {
                        session.add_device_with(
                            ids[i].clone(),
                            d,
                            DeviceOptions { precopy: p.precopy, final_state: MigState::Stop },
                        );
                    }
                    session.run(|ctl| drive(ctl, &opts, manual, &line, &mut || vcpus.stop()))
                })();
                if sres.is_err() {
                    rx_abort.abort();
                }
                let (rres, wall, end) =
                    h.join().unwrap_or_else(|_| (Err(vfio_multifd::Error::Aborted), t0.elapsed(), Instant::now()));
                (sres, rres, wall, end)
            })
        });
    vcpus.stop();
    let (cpu1, max_rss) = rusage_self();
    const HINT: &str =
        "(try --backend blocking to rule out io_uring, or `vfio-multifd probe` to see what this host supports)";
    let ((sw, source), receiver) = match (sres, rres) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), Ok(_)) | (Err(e), Err(vfio_multifd::Error::Aborted)) => {
            return Err(e).context(format!("source failed {HINT}"))
        }
        (Ok(_), Err(e)) => return Err(e).context(format!("receiver failed {HINT}")),
        (Err(se), Err(re)) => return Err(anyhow!("source failed: {se}; receiver failed: {re} {HINT}")),
    };
    verify_sims(&dst_cfgs, &dsts).context("verification failed")?;
    if let Some(f) = &fabric {
        check_fabric(f)?;
    }
    let digests_checked = src_cfgs.iter().all(SimConfig::is_live);
    if digests_checked {
        for (i, (s, d)) in handles.iter().zip(&dsts).enumerate() {
            let (a, b) = (s.state_digest(), d.state_digest());
            if a != b {
                bail!(
                    "device {i} ({}): the destination's state (digest {b:#018x}) differs from the source's at stop \
                     ({a:#018x}): a dirty page was not migrated",
                    s.name()
                );
            }
        }
    }
    let stopped_at = sw.stopped_at;
    let mut switchover =
        Summary::new(sw, opts, &source, running_at.get().copied().unwrap_or(rx_end), DowntimeEnd::DestinationRunning);
    switchover.to_receiver_return = Some(rx_end.saturating_duration_since(stopped_at));
    Ok(EngineRun {
        source,
        receiver,
        wall,
        cpu: cpu1.saturating_sub(cpu0),
        intervals,
        max_rss,
        switchover,
        fabric: fabric.as_ref().map(Fabric::stats),
        digests_checked,
    })
}

/// Blocks SIGUSR1 for `--switchover manual` (before any thread starts) and says how to
/// trigger the switchover.
fn manual_trigger(live: &LiveArgs) -> Result<Option<ManualTrigger>> {
    if !(live.precopy && live.switchover == SwitchoverArg::Manual) {
        return Ok(None);
    }
    let t = ManualTrigger::new()?;
    eprintln!(
        "vfio-multifd: manual switchover: send SIGUSR1 to process {} or enter a line on stdin \
         (pre-copy ends after --max-precopy {} at the latest)",
        std::process::id(),
        fmt_dur(live.max_precopy)
    );
    Ok(Some(t))
}

/// `vfio-multifd loopback`.
pub fn loopback(a: &LoopbackArgs) -> Result<()> {
    let p = EngineParams {
        devices: a.devices as usize,
        size: a.size,
        channels: a.common.channels,
        chunk: a.chunk,
        max_read: a.max_read,
        precopy: a.live.precopy,
        zerocopy: a.zerocopy.into(),
        backend: a.common.backend.into(),
        budget: a.budget,
        stall: a.common.stall_timeout,
    };
    if a.size == 0 {
        bail!("--size 0: each device needs at least one byte of state");
    }
    let manual = manual_trigger(&a.live)?;
    let live = LiveParams { drive: DriveOpts::from(&a.live), dirty_rate: a.dirty_rate, peer_dma: a.peer_dma };
    let bar = crate::util::bars_allowed(a.common.json);
    let r = run_engine_live(&p, &live, manual.as_ref(), bar, Duration::from_secs_f64(a.common.interval))
        .context("loopback failed")?;
    let config = json!({
        "mode": "loopback", "devices": p.devices, "size_per_device": p.size, "channels": p.channels,
        "chunk": p.chunk, "max_read": p.max_read, "precopy": p.precopy,
        "switchover": format!("{:?}", a.live.switchover).to_lowercase(),
        "downtime_limit_ms": ms(a.live.downtime_limit), "max_precopy_seconds": a.live.max_precopy.as_secs_f64(),
        "dirty_rate_bytes_per_sec": a.dirty_rate, "peer_dma": a.peer_dma,
        "zerocopy": format!("{:?}", a.zerocopy).to_lowercase(), "backend": format!("{:?}", a.common.backend).to_lowercase(),
        "interval": a.common.interval,
    });
    if a.common.json {
        let mut v = report_json(config, Some(&r.source), Some(&r.receiver), r.wall, r.cpu, &r.intervals);
        v["end"]["verified"] = json!(true);
        v["end"]["state_digests_verified"] = json!(r.digests_checked);
        v["end"]["max_rss_bytes"] = json!(r.max_rss);
        v["end"]["switchover"] = r.switchover.json();
        if let Some(f) = &r.fabric {
            v["end"]["fabric"] = json!({
                "guest_writes_landed": f.guest_writes_landed, "guest_writes_lost": f.guest_writes_lost,
                "dma_landed": f.dma_landed, "dma_lost": f.dma_lost, "dma_not_initiated": f.dma_not_initiated,
                "violations": 0,
            });
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "vfio-multifd loopback: {} device(s) x {}, {} channel(s), chunk {}{}{}",
            p.devices,
            fmt_bytes(p.size),
            p.channels,
            fmt_bytes(p.chunk as u64),
            if p.precopy { ", live (pre-copy)" } else { "" },
            a.dirty_rate.map(|d| format!(", dirtying {}/s per device", fmt_bytes(d))).unwrap_or_default()
        );
        print_text(Some(&r.source), Some(&r.receiver), r.wall, r.cpu);
        r.switchover.print_text();
        if let Some(f) = &r.fabric {
            println!(
                "peer DMA: {} guest write(s) and {} P2P DMA write(s) landed, none lost, {} DMA not initiated \
                 (initiator quiesced); no ordering violation",
                f.guest_writes_landed, f.dma_landed, f.dma_not_initiated
            );
        }
        println!("process peak RSS: {}", fmt_bytes(r.max_rss));
        println!(
            "verified: {} device(s), every byte and the config blob{}",
            p.devices,
            if r.digests_checked { ", and each destination's state equals its source's at stop" } else { "" }
        );
    }
    Ok(())
}

/// iperf3-style JSON of a transfer.
pub fn report_json(
    config: Value,
    s: Option<&SourceReport>,
    r: Option<&ReceiverReport>,
    wall: Duration,
    cpu: Duration,
    intervals: &[Interval],
) -> Value {
    let secs = wall.as_secs_f64().max(1e-9);
    let data = s.map(|s| s.data_bytes()).or(r.map(|r| r.data_bytes())).unwrap_or(0);
    let chans = s.map(|s| &s.channels).or(r.map(|r| &r.channels));
    let streams: Vec<Value> = chans
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    json!({"id": c.id.get(), "bytes": c.bytes, "packets": c.packets, "seconds": secs,
                           "bits_per_second": c.bytes as f64 * 8.0 / secs})
                })
                .collect()
        })
        .unwrap_or_default();
    let backend =
        s.map(|s| (s.backend, s.fallback_reason.clone())).or(r.map(|r| (r.backend, r.fallback_reason.clone())));
    let mut end = json!({
        "sum": {"start": 0.0, "end": secs, "seconds": secs, "bytes": data, "bits_per_second": data as f64 * 8.0 / secs},
        "streams": streams,
        "backend": backend.as_ref().map(|b| b.0.to_string()),
        "fallback_reason": backend.and_then(|b| b.1),
        "cpu_utilization": {"seconds": cpu.as_secs_f64(),
            "seconds_per_gib": if data > 0 { cpu.as_secs_f64() / (data as f64 / (1u64 << 30) as f64) } else { 0.0 }},
    });
    if let Some(s) = s {
        end["latency"] =
            json!({"what": "packet: device read submitted to send completed", "lat_ns": lat_json(&s.latency)});
        end["zerocopy"] =
            json!({"used": s.zerocopy, "zerocopy_bytes": s.zerocopy_bytes, "copied_bytes": s.copied_bytes});
        end["source_warnings"] = json!(s.warnings);
        end["source_devices"] = s
            .devices
            .iter()
            .map(|d| {
                json!({"idstr": d.id.idstr(), "instance_id": d.id.instance_id, "data_bytes": d.data_bytes,
                   "precopy_bytes": d.precopy_bytes, "packets": d.packets, "short_reads": d.short_reads,
                   "config_bytes": d.config_bytes, "stop_copy_seconds": d.stop_copy_time.as_secs_f64(),
                   "seconds": d.elapsed.as_secs_f64(), "final_state_error": d.final_state_error})
            })
            .collect();
    }
    if let Some(r) = r {
        end["receiver"] = json!({
            "seconds": r.elapsed.as_secs_f64(), "peak_held_bytes": r.peak_held_bytes, "reserved_bytes": r.reserved_bytes,
            "devices": r.devices.iter().map(|d| json!({
                "idstr": d.id.idstr(), "instance_id": d.id.instance_id, "data_bytes": d.data_bytes, "packets": d.packets,
                "out_of_order_packets": d.out_of_order_packets, "config_bytes": d.config_bytes,
                "short_writes": d.short_writes, "final_state": d.reached_state.map(|s| s.name()),
                "loaded_after_seconds": d.loaded_after.map(|t| t.as_secs_f64()),
            })).collect::<Vec<_>>(),
            "warnings": r.warnings,
        });
    }
    json!({
        "start": {
            "version": format!("vfio-multifd {}", env!("CARGO_PKG_VERSION")),
            "timestamp": timestamp(),
            "kernel": kernel_version(),
            "capabilities": crate::probe::capabilities_json(),
            "config": config,
        },
        "intervals": intervals.iter().map(Interval::json).collect::<Vec<_>>(),
        "end": end,
    })
}

/// Human summary of a transfer.
pub fn print_text(s: Option<&SourceReport>, r: Option<&ReceiverReport>, wall: Duration, cpu: Duration) {
    let secs = wall.as_secs_f64();
    let data = s.map(|s| s.data_bytes()).or(r.map(|r| r.data_bytes())).unwrap_or(0);
    if let Some(s) = s {
        println!(
            "backend: {}{}; zero-copy: {}",
            s.backend,
            s.fallback_reason.as_deref().map(|w| format!(" ({w})")).unwrap_or_default(),
            if s.zerocopy { "SEND_ZC" } else { "off (SEND)" }
        );
    } else if let Some(r) = r {
        println!(
            "backend: {}{}",
            r.backend,
            r.fallback_reason.as_deref().map(|w| format!(" ({w})")).unwrap_or_default()
        );
    }
    let chans = s.map(|s| &s.channels).or(r.map(|r| &r.channels));
    if let Some(cs) = chans {
        let wire: u64 = cs.iter().map(|c| c.bytes).sum::<u64>().max(1);
        println!("{:<8} {:>12} {:>9} {:>7}  rate", "channel", "wire bytes", "packets", "share");
        for c in cs {
            println!(
                "{:<8} {:>12} {:>9} {:>6.1}%  {}",
                c.id,
                fmt_bytes(c.bytes),
                c.packets,
                c.bytes as f64 * 100.0 / wire as f64,
                fmt_rate(c.bytes, secs)
            );
        }
    }
    println!("total: {} of device state in {secs:.3} s = {}", fmt_bytes(data), fmt_rate(data, secs));
    if data > 0 {
        println!(
            "cpu: {:.2} s user+sys, {:.3} s per GiB",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() / (data as f64 / (1u64 << 30) as f64)
        );
    }
    if let Some(s) = s {
        let l = &s.latency;
        if l.count > 0 {
            println!(
                "packet latency (read submitted -> send completed), {} packets: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                l.count,
                fmt_ns(l.p50_ns),
                fmt_ns(l.p90_ns),
                fmt_ns(l.p99_ns),
                fmt_ns(l.p999_ns),
                fmt_ns(l.max_ns)
            );
        }
        println!("zero-copy bytes: {}; copied bytes: {}", fmt_bytes(s.zerocopy_bytes), fmt_bytes(s.copied_bytes));
        for w in &s.warnings {
            println!("  warning: {w}");
        }
        for d in &s.devices {
            println!(
                "  sent {}: {} ({} pre-copy), {} packets, config {} B, stop-copy {:.3} s",
                d.id,
                fmt_bytes(d.data_bytes),
                fmt_bytes(d.precopy_bytes),
                d.packets,
                d.config_bytes,
                d.stop_copy_time.as_secs_f64()
            );
            if let Some(e) = &d.final_state_error {
                println!("  warning: {} did not reach its final state after the migration succeeded: {e}", d.id);
            }
        }
    }
    if let Some(r) = r {
        println!(
            "receiver: peak held {} (reserved {}), {} out-of-order packets",
            fmt_bytes(r.peak_held_bytes),
            fmt_bytes(r.reserved_bytes),
            r.devices.iter().map(|d| d.out_of_order_packets).sum::<u64>()
        );
        for d in &r.devices {
            println!(
                "  loaded {}: {}, {} packets, config {} B, now {}",
                d.id,
                fmt_bytes(d.data_bytes),
                d.packets,
                d.config_bytes,
                d.reached_state.map_or("(file)", |s| s.name())
            );
        }
    }
}

/// A source-side entry.
enum SrcEntry {
    Sim(Box<SimDevice>),
    Vfio(Box<VfioDevice>),
    File { file: File, config: Vec<u8> },
}

/// Opens a VFIO device with an actionable error.
pub fn open_vfio(spec: &str) -> Result<VfioDevice> {
    VfioDevice::open(spec).with_context(|| {
        format!(
            "opening VFIO device {spec:?} (give a sysfs path, PCI address, mdev UUID or group:N/name of a device bound \
             to vfio-pci or an mdev driver; `vfio-multifd probe` lists them; opening needs access to /dev/vfio)"
        )
    })
}

fn sim_cfg(i: usize, s: &SimSpec) -> SimConfig {
    SimConfig::new(format!("sim{i}"), s.size, s.seed.unwrap_or(i as u64 + 1))
}

/// Connects `n` channels to `addr`, retrying refused connections until `timeout`.
fn connect_channels(addr: &str, n: usize, timeout: Duration) -> Result<Vec<OwnedFd>> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving --connect {addr:?} (expected HOST:PORT, e.g. 192.0.2.1:4444)"))?
        .collect();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    for ch in 0..n {
        let s = loop {
            let mut last = None;
            let mut ok = None;
            for a in &addrs {
                match TcpStream::connect_timeout(a, Duration::from_secs(5)) {
                    Ok(s) => {
                        ok = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if let Some(s) = ok {
                break s;
            }
            let e = last.unwrap_or_else(|| std::io::Error::other("no address"));
            let retry = matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::TimedOut
            );
            if !retry || Instant::now() >= deadline {
                return Err(e).with_context(|| {
                    format!(
                        "connecting channel {ch} to {addr} (is `vfio-multifd recv --listen {addr} -P {n}` running there? \
                         retried for {timeout:?})"
                    )
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        s.set_nodelay(true).context("setting TCP_NODELAY")?;
        out.push(OwnedFd::from(s));
    }
    Ok(out)
}

/// `vfio-multifd send`.
pub fn send(a: &SendArgs, order: &[DevOpt]) -> Result<()> {
    let n = order.len().max(a.source.len());
    check_positions(n, &a.idstr, &a.instance)?;
    let manual = manual_trigger(&a.live)?;
    let mut entries: Vec<(DeviceId, SrcEntry)> = Vec::with_capacity(n);
    let mut total: Option<u64> = Some(0);
    for i in 0..n {
        let id = device_id(i, &a.idstr, &a.instance)?;
        let e = if let Some(path) = a.source.get(i) {
            let file = File::open(path).with_context(|| {
                format!("opening saved stream {} (write one with `vfio-multifd recv --sink file:PATH`)", path.display())
            })?;
            let len = file.metadata().map(|m| m.len()).ok();
            total = total.zip(len).map(|(t, l)| t + l);
            let cp = config_path(path);
            let config = match std::fs::read(&cp) {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && a.no_config => Vec::new(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                    "{} has no config blob {} (a save by `recv --sink` has both; a save without one is \
                     incomplete). To send the stream with an empty config anyway, add --no-config",
                    path.display(),
                    cp.display()
                ),
                Err(e) => return Err(e).with_context(|| format!("reading config blob {}", cp.display())),
            };
            SrcEntry::File { file, config }
        } else {
            match order.get(i).copied().ok_or_else(|| anyhow!("no device at position {i}"))? {
                DevOpt::Sim(k) => {
                    let c = sim_cfg(i, &a.sim[k]);
                    total = total.map(|t| t + c.size);
                    SrcEntry::Sim(Box::new(SimDevice::new(c)))
                }
                DevOpt::Device(k) => {
                    let d = open_vfio(&a.device[k])?;
                    if let Some(m) = &manual {
                        // The console's `region-write k ...` (the guest's MMIO stand-in).
                        m.add_device(k, d.try_clone().with_context(|| format!("{}: a second handle", a.device[k]))?);
                    }
                    let hint = vfio_migration::bounded_data_size(&d, 1 << 40).ok();
                    total = total.zip(hint).map(|(t, h)| t + h);
                    SrcEntry::Vfio(Box::new(d))
                }
            }
        };
        entries.push((id, e));
    }
    let cfg = SourceConfig::new()
        .chunk_bytes(a.chunk)
        .zerocopy(a.zerocopy.into())
        .backend(a.common.backend.into())
        .uuid(a.common.uuid.unwrap_or([0; 16]))
        .stall_timeout(a.common.stall_timeout)
        .return_path(!a.no_return_path);
    // Every setting is checked before a connection is opened: the receiver never sees a source
    // that connects and then gives up.
    cfg.validate(a.common.channels, n).context("invalid sender settings")?;
    let chans = connect_channels(&a.connect, a.common.channels, a.connect_timeout)?;
    let mut session = SourceSession::new(cfg, chans).context("setting up the source")?;
    let _signals = crate::signals::register(session.abort_handle());
    let dev_opts = DeviceOptions { precopy: a.live.precopy, final_state: a.final_state };
    for (id, e) in entries.iter_mut() {
        match e {
            SrcEntry::Sim(d) => session.add_device_with(id.clone(), d.as_mut(), dev_opts),
            SrcEntry::Vfio(d) => session.add_device_with(id.clone(), d.as_mut(), dev_opts),
            SrcEntry::File { file, config } => {
                let f: &File = file;
                session.add_data_fd(id.clone(), f.as_fd(), config)
            }
        };
    }
    let progress = session.progress();
    let bar = crate::util::bars_allowed(a.common.json);
    let opts = DriveOpts::from(&a.live);
    let line = StatusLine::default();
    let (cpu0, _) = rusage_self();
    let t0 = Instant::now();
    let ((res, ended), intervals) = with_progress(
        &progress,
        total.filter(|&t| t > 0),
        bar,
        Some(&line),
        "send",
        Duration::from_secs_f64(a.common.interval),
        || {
            let r = session.run(|ctl| drive(ctl, &opts, manual.as_ref(), &line, &mut || {}));
            (r, Instant::now())
        },
    );
    let wall = t0.elapsed();
    let cpu = rusage_self().0.saturating_sub(cpu0);
    let config = json!({"mode": "send", "connect": a.connect, "channels": a.common.channels, "chunk": a.chunk,
        "devices": n, "precopy": a.live.precopy, "switchover": format!("{:?}", a.live.switchover).to_lowercase(),
        "downtime_limit_ms": ms(a.live.downtime_limit), "max_precopy_seconds": a.live.max_precopy.as_secs_f64(),
        "return_path": !a.no_return_path, "final_state": a.final_state.name(), "interval": a.common.interval});
    let (sw, rep) = match res {
        Ok(x) => x,
        Err(e) => {
            if let (true, vfio_multifd::Error::Destination { device, what }) = (a.common.json, &e) {
                // Say it in the JSON too: the destination's verdict is the result.
                let mut v = report_json(config, None, None, wall, cpu, &intervals);
                v["end"]["switchover"] = json!({"verdict": failed_text(device, what)});
                v["error"] = json!(e.to_string());
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            return Err(e).with_context(|| {
                format!(
                    "sending to {} failed (source devices were put back to RUNNING; the receiver's output says more)",
                    a.connect
                )
            });
        }
    };
    // The downtime ends with the verdicts (or the last packet sent), not with the close's wait
    // for the destination's EOF that follows them.
    let (end, ended) = match rep.verdicts_at {
        Some(t) if rep.verdicts.is_some() => (DowntimeEnd::DestinationVerdict, t.min(ended)),
        _ => (DowntimeEnd::SourceDone, rep.sent_at.min(ended)),
    };
    let summary = Summary::new(sw, opts, &rep, ended, end);
    if a.common.json {
        let mut v = report_json(config, Some(&rep), None, wall, cpu, &intervals);
        v["end"]["switchover"] = summary.json();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("vfio-multifd send: {n} device(s) to {} over {} channel(s)", a.connect, a.common.channels);
        print_text(Some(&rep), None, wall, cpu);
        summary.print_text();
    }
    Ok(())
}

/// A destination device.
enum DstDev {
    Sim(Box<SimDevice>),
    Vfio(Box<VfioDevice>),
}

impl DstDev {
    fn as_dyn(&mut self) -> &mut dyn MigrationDevice {
        match self {
            DstDev::Sim(d) => d.as_mut(),
            DstDev::Vfio(d) => d.as_mut(),
        }
    }
}

struct DstEntry {
    id: DeviceId,
    dev: Option<DstDev>,
    sink: Option<Sink>,
    config: Vec<u8>,
}

/// Loads a saved stream into a device: RESUMING, write it all, apply the config, final state.
fn load_saved_stream(dev: &mut dyn MigrationDevice, path: &Path, config: &[u8], final_state: MigState) -> Result<()> {
    let name = dev.name().to_owned();
    let t = transition(dev, MigState::Resuming).with_context(|| format!("{name}: entering RESUMING"))?;
    let fd = t
        .data_fd
        .ok_or_else(|| anyhow!("{name}: was already RESUMING (someone else's resume session); reset it first"))?;
    let mut f = File::open(path).with_context(|| format!("re-opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        let mut off = 0;
        while off < n {
            let w = dev
                .write_data(fd.as_fd(), &buf[off..n])
                .with_context(|| format!("{name}: writing the saved stream"))?;
            if w == 0 {
                bail!("{name}: the resume data fd accepted 0 bytes");
            }
            off += w;
        }
    }
    dev.load_config(config).with_context(|| format!("{name}: applying the config blob"))?;
    transition(dev, final_state)
        .with_context(|| format!("{name}: leaving RESUMING (the device rejected the stream)"))?;
    drop(fd);
    Ok(())
}

/// The receiver settings of `recv`.
fn recv_config(a: &RecvArgs) -> ReceiverConfig {
    let mut cfg = ReceiverConfig::new()
        .max_packet_bytes(a.max_packet)
        .backend(a.common.backend.into())
        .uuid(a.common.uuid.unwrap_or([0; 16]))
        .stall_timeout(a.common.stall_timeout)
        .accept_timeout(a.accept_timeout)
        .return_path(!a.no_return_path);
    if let Some(b) = a.budget {
        cfg = cfg.budget_bytes(b);
    }
    cfg
}

/// What to add to a `recv` failure: the sink file a write failed on, the flag to raise when
/// the source's chunks are too large, and how to recover a real destination device (only when
/// one was used: a simulated device or a sink needs no reset).
fn recv_failure_hint(e: &vfio_multifd::Error, sinks: &[(DeviceId, PathBuf)], real_devices: bool) -> String {
    use vfio_multifd::wire::WireError;
    use vfio_multifd::{Error, ProtocolViolation};
    let mut hint = String::new();
    if let Error::DeviceWrite { device, .. } = e {
        if let Some((_, p)) = sinks.iter().find(|(id, _)| id == device) {
            hint += &format!(" (writing sink file:{})", p.display());
        }
    }
    let too_large = match e {
        Error::Protocol { violation: ProtocolViolation::TooLarge { len, .. }, .. } => Some(*len),
        Error::Wire { source: WireError::BadPacketSize { size, max, .. }, .. } if size > max => {
            Some((*size as usize).saturating_sub(vfio_multifd::wire::VFIO_HEADER_LEN))
        }
        _ => None,
    };
    if let Some(len) = too_large.filter(|&l| l > vfio_multifd::MAX_CHUNK_BYTES) {
        hint += &format!(
            " (a packet of {} is above the largest a vfio-multifd source sends ({}; QEMU's are at most 1 MiB, \
             VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE): the stream is corrupt, or the peer is not a multifd device-state \
             source; check what connects to this port)",
            fmt_bytes(len as u64),
            fmt_bytes(vfio_multifd::MAX_CHUNK_BYTES as u64)
        );
    } else if let Some(len) = too_large {
        hint += &format!(
            " (the source's --chunk is above this receiver's --max-packet: raise --max-packet to at least {}, \
             or lower the source's --chunk)",
            fmt_bytes(len as u64)
        );
    }
    if real_devices {
        hint +=
            "; a destination device may be left in RESUMING: `vfio-multifd dev reset DEV` brings it back to RUNNING";
    }
    hint
}

/// `vfio-multifd recv`.
pub fn recv(a: &RecvArgs, order: &[DevOpt]) -> Result<()> {
    let n = order.len().max(a.sink.len());
    check_positions(n, &a.idstr, &a.instance)?;
    if a.verify && a.sim.is_empty() {
        bail!("--verify checks simulated destinations: give --sim SIZE[,SEED] (the sender's size and seed)");
    }
    let cfg = recv_config(a);
    // Every setting is checked before the port is bound: a source never connects to a receiver
    // that cannot run (it would only see a broken pipe).
    // The engine's message names the setting, its value and its bounds (the pool's says which
    // flags make it).
    cfg.validate(a.common.channels, n).context("invalid receiver settings")?;
    // Sinks first: a FIFO waits for its reader before the port listens (a sender must not
    // connect to a receiver that cannot write).
    let mut sinks = Vec::with_capacity(n);
    for i in 0..n {
        sinks.push(a.sink.get(i).map(|p| Sink::open(p, a.accept_timeout)).transpose()?);
    }
    let mut sinks = sinks.into_iter();
    let listener = TcpListener::bind(&a.listen)
        .with_context(|| format!("listening on {:?} (expected HOST:PORT that is free on this host)", a.listen))?;
    let mut entries = Vec::with_capacity(n);
    let mut total: Option<u64> = Some(0);
    let mut sim_cfgs: Vec<Option<SimConfig>> = Vec::new();
    for i in 0..n {
        let id = device_id(i, &a.idstr, &a.instance)?;
        let dev = match order.get(i) {
            Some(DevOpt::Sim(k)) => {
                let c = sim_cfg(i, &a.sim[*k]);
                total = total.map(|t| t + c.size);
                sim_cfgs.push(Some(c.clone()));
                Some(DstDev::Sim(Box::new(SimDevice::new(c))))
            }
            Some(DevOpt::Device(k)) => {
                total = None;
                sim_cfgs.push(None);
                Some(DstDev::Vfio(Box::new(open_vfio(&a.device[*k])?)))
            }
            None => {
                total = None;
                sim_cfgs.push(None);
                None
            }
        };
        let sink = sinks.next().flatten();
        entries.push(DstEntry { id, dev, sink, config: Vec::new() });
    }
    let mut rx = Receiver::new(cfg).context("setting up the receiver")?;
    let _signals = crate::signals::register(rx.abort_handle());
    for e in entries.iter_mut() {
        let DstEntry { id, dev, sink, config } = e;
        match (sink, dev) {
            (Some(sk), _) => {
                rx.add_data_fd(id.clone(), sk.file().as_fd(), config);
            }
            (None, Some(d)) => {
                rx.add_device_with(id.clone(), d.as_dyn(), a.final_state);
            }
            (None, None) => unreachable!("every position has a device or a sink"),
        }
    }
    let progress = rx.progress();
    let bar = crate::util::bars_allowed(a.common.json);
    let (cpu0, _) = rusage_self();
    let t0 = Instant::now();
    let (res, intervals) =
        with_progress(&progress, total, bar, None, "recv", Duration::from_secs_f64(a.common.interval), || {
            rx.run_listener(&listener, a.common.channels)
        });
    let wall = t0.elapsed();
    let (cpu1, _) = rusage_self();
    let sinks: Vec<(DeviceId, PathBuf)> =
        entries.iter().filter_map(|e| e.sink.as_ref().map(|sk| (e.id.clone(), sk.path().to_owned()))).collect();
    // A device is touched by the receive only where no sink takes its stream first.
    let real_devices = entries.iter().any(|e| e.sink.is_none() && matches!(e.dev, Some(DstDev::Vfio(_))));
    let rep = match res {
        Ok(r) => r,
        Err(e) => {
            let hint = recv_failure_hint(&e, &sinks, real_devices);
            return Err(e).context(format!("receiving failed{hint}"));
        }
    };
    for w in &rep.warnings {
        eprintln!("vfio-multifd: warning: {w}");
    }
    // Sinks: store the config next to the stream, then load into a device given with it.
    for (i, e) in entries.iter_mut().enumerate() {
        if let Some(sk) = e.sink.take() {
            let path = sk.path().to_owned();
            sk.commit(&e.config)?;
            if let Some(d) = e.dev.as_mut() {
                load_saved_stream(d.as_dyn(), &path, &e.config, a.final_state)
                    .with_context(|| format!("loading the saved stream {} into device {i}", path.display()))?;
            }
        }
    }
    let mut verified = Vec::new();
    if a.verify {
        for (i, e) in entries.iter().enumerate() {
            if let (Some(DstDev::Sim(d)), Some(c)) = (&e.dev, &sim_cfgs[i]) {
                verify_sims(std::slice::from_ref(c), std::slice::from_ref(d.as_ref()))
                    .with_context(|| format!("device {i} ({}) failed verification", e.id))?;
                verified.push(i);
            }
        }
    }
    let config = json!({"mode": "recv", "listen": a.listen, "channels": a.common.channels, "max_packet": a.max_packet,
        "devices": n, "final_state": a.final_state.name(), "return_path": !a.no_return_path,
        "interval": a.common.interval});
    if a.common.json {
        let mut v = report_json(config, None, Some(&rep), wall, cpu1.saturating_sub(cpu0), &intervals);
        v["end"]["verified_devices"] = json!(verified);
        v["end"]["sinks"] = json!(a.sink.iter().map(|p| p.display().to_string()).collect::<Vec<_>>());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("vfio-multifd recv: {n} device(s) on {} over {} channel(s)", a.listen, a.common.channels);
        print_text(None, Some(&rep), wall, cpu1.saturating_sub(cpu0));
        for p in &a.sink {
            println!("saved stream: {} (config: {})", p.display(), config_path(p).display());
        }
        if a.verify {
            println!("verified: {} simulated device(s), every byte and the config blob", verified.len());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> DeviceId {
        DeviceId::new(&format!("0000:00:0{i}.0/vfio"), 0).unwrap()
    }

    #[test]
    fn recv_failure_hint_names_the_sink_and_advises_reset_only_for_real_devices() {
        let sinks = vec![(id(3), PathBuf::from("/tmp/x/dev1.bin"))];
        let write = |d: DeviceId| vfio_multifd::Error::DeviceWrite {
            device: d,
            idx: vfio_multifd::PacketIndex::new(2).unwrap(),
            offset: 8192,
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let h = recv_failure_hint(&write(id(3)), &sinks, false);
        assert!(h.contains("sink file:/tmp/x/dev1.bin") && !h.contains("dev reset"), "{h}");
        let h = recv_failure_hint(&write(id(2)), &sinks, true);
        assert!(!h.contains("sink") && h.contains("dev reset DEV"), "{h}");
    }
}
