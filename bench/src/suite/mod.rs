//! `vfio-multifd bench`: the benchmark suite of issue 4.
//!
//! Every design moves the same simulated devices (whose producer threads generate and whose
//! consumer threads verify the content) over loopback TCP in this process. Each point is run
//! `reps` times with the designs interleaved, and reported as the median with min..max.
//! CPU is `getrusage(RUSAGE_SELF)` user + sys over the run (the simulated devices' own threads
//! included, the same for every design).

mod baselines;
mod downtime;
pub mod peers;
mod procs;
mod qemu;
mod svg;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::MigrationDevice;
use vfio_multifd::{Backend, LatencySummary, ZeroCopy};

use crate::transfer::{run_engine, sim_configs, EngineParams};
use crate::util::{fmt_bytes, fmt_size_short, kernel_version, parse_duration, parse_size, rusage_self, timestamp};
use downtime::{LiveResult, Scenario, Variant};

/// `bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Small sizes and fewer points: finishes in under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Directory for latest.json, latest.md and throughput.svg.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Repetitions per point (default 5, 3 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub reps: Option<u32>,
    /// Bytes per run, all devices together (default 512MiB, 128MiB with --quick).
    #[arg(long, value_parser = parse_size)]
    pub bytes: Option<u64>,
    /// Only these designs (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub designs: Vec<Design>,
    /// Skip the downtime scenario.
    #[arg(long)]
    pub no_downtime: bool,
    /// Downtime scenario, live variants: bytes each simulated device dirties a second while
    /// it runs (in 4 KiB pages).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub dirty_rate: u64,
    /// Downtime scenario, `engine-precopy`: switch over once the estimated switchover time is
    /// at most this (and every device's initial data is acknowledged).
    #[arg(long, value_name = "DUR", default_value = "300ms", value_parser = parse_duration)]
    pub downtime_limit: Duration,
    /// Downtime scenario, `engine-precopy`: switch over after this much pre-copy at the latest
    /// (default 20s, 5s with --quick).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub max_precopy: Option<Duration>,
    /// The process scenarios (each design as separate sender and receiver processes, files,
    /// pipes and a pty at the ends): `also` after the in-process suite, `skip`, or `only`.
    #[arg(long, value_enum, default_value_t)]
    pub processes: Processes,
    /// Only these process scenarios (comma-separated): file-1dev (1 device x 1 GiB, file to
    /// file), file-4dev (4 x 256 MiB), pipe (1 x 1 GiB, FIFO to FIFO), pty-sink (1 x 32 MiB,
    /// file to pty).
    #[arg(long, value_delimiter = ',')]
    pub scenario: Vec<String>,
    /// Process scenarios: also run `engine-uring-alt`, the io_uring engine of another build of
    /// vfio-multifd (e.g. before a change), interleaved with this one's.
    #[arg(long, value_name = "PATH")]
    pub compare_exe: Option<PathBuf>,
    /// Also print the JSON on stdout.
    #[arg(short = 'J', long)]
    pub json: bool,
}

/// Whether the process scenarios run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Processes {
    /// After the in-process suite.
    #[default]
    Also,
    /// Not at all.
    Skip,
    /// Instead of the in-process suite and the downtime scenario.
    Only,
}

/// The designs compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Design {
    /// The engine on io_uring with plain SEND.
    EngineUringSend,
    /// The engine on io_uring with SEND_ZC.
    EngineUringZc,
    /// The engine's blocking backend.
    EngineBlocking,
    /// QEMU 10's design (read, copy into a queued packet, writev; recv, copy, ordered write).
    QemuStyle,
    /// One blocking thread pair per channel, read->send and recv->write, no protocol.
    MinCopy,
    /// Loopback TCP memory to memory.
    RawTcp,
    /// The engine on io_uring with SEND, from another build (`--compare-exe`): an alternative
    /// measured in the same run.
    #[value(skip)]
    EngineUringAlt,
}

impl Design {
    const ALL: [Design; 6] = [
        Design::EngineUringSend,
        Design::EngineUringZc,
        Design::EngineBlocking,
        Design::QemuStyle,
        Design::MinCopy,
        Design::RawTcp,
    ];

    fn name(self) -> &'static str {
        match self {
            Design::EngineUringSend => "engine-uring-send",
            Design::EngineUringZc => "engine-uring-zc",
            Design::EngineBlocking => "engine-blocking",
            Design::QemuStyle => "qemu-style",
            Design::MinCopy => "min-copy",
            Design::RawTcp => "raw-tcp",
            Design::EngineUringAlt => "engine-uring-alt",
        }
    }

    fn has_devices(self) -> bool {
        self != Design::RawTcp
    }
}

/// Blocking I/O helpers on raw fds (EINTR retried).
pub(crate) mod io {
    use std::io;
    use std::os::fd::RawFd;

    fn ret(r: isize) -> io::Result<Option<usize>> {
        if r >= 0 {
            return Ok(Some(r as usize));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// One `read()`.
    pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the kernel writes at most `buf.len()` bytes into the live, exclusive `buf`.
            let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if let Some(n) = ret(r)? {
                return Ok(n);
            }
        }
    }

    /// One `write()`.
    pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the kernel reads at most `buf.len()` bytes from the live `buf`.
            let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
            if let Some(n) = ret(r)? {
                return Ok(n);
            }
        }
    }

    /// One `writev()` of two buffers.
    pub fn writev2(fd: RawFd, a: &[u8], b: &[u8]) -> io::Result<usize> {
        let iov = [
            libc::iovec { iov_base: a.as_ptr() as *mut _, iov_len: a.len() },
            libc::iovec { iov_base: b.as_ptr() as *mut _, iov_len: b.len() },
        ];
        loop {
            // SAFETY: both iovecs describe live buffers that the kernel only reads.
            let r = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
            if let Some(n) = ret(r)? {
                return Ok(n);
            }
        }
    }

    /// Writes all of `b`, continuing after partial writes.
    pub fn write_all(fd: RawFd, mut b: &[u8]) -> io::Result<()> {
        while !b.is_empty() {
            let n = write(fd, b)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
            }
            b = &b[n..];
        }
        Ok(())
    }

    /// Reads exactly `len` bytes to `ptr`: `Ok(false)` on EOF before the first byte, an error
    /// on EOF in the middle.
    ///
    /// # Safety
    /// `ptr` must be valid for writes of `len` bytes for the duration of the call.
    pub unsafe fn read_exact_raw(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<bool> {
        let mut got = 0;
        while got < len {
            // SAFETY: `ptr + got .. ptr + len` is writable by this function's contract.
            let r = unsafe { libc::read(fd, ptr.add(got).cast(), len - got) };
            match ret(r)? {
                None => continue,
                Some(0) if got == 0 => return Ok(false),
                Some(0) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("EOF after {got} of {len} bytes")))
                }
                Some(n) => got += n,
            }
        }
        Ok(true)
    }

    /// [`read_exact_raw`] into a slice.
    pub fn read_exact(fd: RawFd, buf: &mut [u8]) -> io::Result<bool> {
        // SAFETY: the slice is live and exclusively borrowed for the call.
        unsafe { read_exact_raw(fd, buf.as_mut_ptr(), buf.len()) }
    }
}

/// Failure propagation inside one baseline run: the first failing thread trips it, which
/// shuts the run's sockets down so that every blocked thread wakes up.
#[derive(Debug, Default)]
pub(crate) struct Abort {
    tripped: AtomicBool,
    sockets: Mutex<Vec<RawFd>>,
}

impl Abort {
    pub(crate) fn set_sockets(&self, fds: Vec<RawFd>) {
        *self.sockets.lock().unwrap_or_else(|p| p.into_inner()) = fds;
    }

    pub(crate) fn trip(&self) {
        if !self.tripped.swap(true, Ordering::AcqRel) {
            for &fd in self.sockets.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                // SAFETY: the sockets stay open until every thread of the run has been joined.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.tripped.load(Ordering::Acquire) {
            bail!("aborted (another thread of this run failed)");
        }
        Ok(())
    }
}

/// What one baseline run measured.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) wall: Duration,
    pub(crate) latency: Option<LatencySummary>,
}

/// Every destination verified its whole stream (and, with `config`, got the source's blob).
pub(crate) fn verify_streams(cfgs: &[SimConfig], dsts: &[SimDevice], config: bool) -> Result<()> {
    if config {
        return crate::transfer::verify_sims(cfgs, dsts);
    }
    for (i, (c, d)) in cfgs.iter().zip(dsts).enumerate() {
        let r = d.resume_report().ok_or_else(|| anyhow!("device {i} never finished resuming"))?;
        if !r.verified_ok || r.bytes_written != c.size {
            bail!("device {i}: stream did not verify ({r:?})");
        }
        if d.state().ok() != Some(vfio_migration::MigState::Running) {
            bail!("device {i}: destination not RUNNING");
        }
    }
    Ok(())
}

/// One point of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Point {
    channels: usize,
    devices: usize,
    chunk: usize,
}

/// One repetition's numbers.
#[derive(Debug, Clone)]
struct Rep {
    secs: f64,
    bytes: u64,
    cpu: f64,
    lat: Option<LatencySummary>,
}

impl Rep {
    fn gibps(&self) -> f64 {
        self.bytes as f64 / self.secs.max(1e-9) / (1u64 << 30) as f64
    }
    fn cpu_per_gib(&self) -> f64 {
        self.cpu / (self.bytes as f64 / (1u64 << 30) as f64)
    }
}

/// Median, min, max.
#[derive(Debug, Clone, Copy, Default)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(mut v: Vec<f64>) -> Spread {
    if v.is_empty() {
        return Spread::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Spread { median, min: v[0], max: v[n - 1] }
}

impl Spread {
    fn json(&self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

/// Aggregated result of one design at one point.
#[derive(Debug, Clone)]
struct PointResult {
    design: Design,
    point: Point,
    gibps: Spread,
    cpu: Spread,
    lat: Option<(f64, f64, f64)>,
    reps: Vec<Rep>,
}

fn aggregate(design: Design, point: Point, reps: Vec<Rep>) -> PointResult {
    let gibps = spread(reps.iter().map(Rep::gibps).collect());
    let cpu = spread(reps.iter().map(Rep::cpu_per_gib).collect());
    let lats: Vec<&LatencySummary> = reps.iter().filter_map(|r| r.lat.as_ref()).filter(|l| l.count > 0).collect();
    let lat = (!lats.is_empty()).then(|| {
        (
            spread(lats.iter().map(|l| l.p50_ns as f64).collect()).median,
            spread(lats.iter().map(|l| l.p99_ns as f64).collect()).median,
            spread(lats.iter().map(|l| l.p999_ns as f64).collect()).median,
        )
    });
    PointResult { design, point, gibps, cpu, lat, reps }
}

/// Runs one design once at one point over `bytes` bytes in all.
fn run_once(design: Design, p: Point, bytes: u64) -> Result<Rep> {
    let size = (bytes / p.devices as u64) & !4095;
    let cfgs = sim_configs(p.devices, size, 1 << 20);
    let abort = Abort::default();
    let (cpu0, _) = rusage_self();
    let engine = |backend, zerocopy| -> Result<Outcome> {
        let ep = EngineParams {
            devices: p.devices,
            size,
            channels: p.channels,
            chunk: p.chunk,
            max_read: 1 << 20,
            precopy: false,
            zerocopy,
            backend,
            budget: None,
            stall: Duration::from_secs(30),
        };
        let r = run_engine(&ep, false, Duration::from_secs(1))?;
        Ok(Outcome { wall: r.wall, latency: Some(r.source.latency) })
    };
    let out = match design {
        Design::EngineUringSend | Design::EngineUringAlt => engine(Backend::Uring, ZeroCopy::Off)?,
        Design::EngineUringZc => engine(Backend::Uring, ZeroCopy::On)?,
        Design::EngineBlocking => engine(Backend::Blocking, ZeroCopy::Off)?,
        Design::QemuStyle => qemu::run(&cfgs, p.channels, p.chunk, &abort)?,
        Design::MinCopy => baselines::min_copy(&cfgs, p.channels, p.chunk, &abort)?,
        Design::RawTcp => baselines::raw_tcp(size * p.devices as u64, p.channels, p.chunk, &abort)?,
    };
    let (cpu1, _) = rusage_self();
    let moved = if design == Design::RawTcp {
        (size * p.devices as u64 / p.channels as u64) * p.channels as u64
    } else {
        size * p.devices as u64
    };
    Ok(Rep {
        secs: out.wall.as_secs_f64(),
        bytes: moved,
        cpu: cpu1.saturating_sub(cpu0).as_secs_f64(),
        lat: out.latency,
    })
}

const BASE: Point = Point { channels: 4, devices: 2, chunk: 1 << 20 };

fn points(quick: bool) -> Vec<Point> {
    let mut v = Vec::new();
    let mut push = |p: Point| {
        if !v.contains(&p) {
            v.push(p);
        }
    };
    if quick {
        // The quick form keeps the channel extremes at the base point; the process scenarios
        // carry the rest.
        for c in [1, 4] {
            push(Point { channels: c, ..BASE });
        }
        return v;
    }
    for c in [1, 2, 4, 8] {
        push(Point { channels: c, ..BASE });
    }
    for d in [1, 2, 4] {
        push(Point { devices: d, ..BASE });
    }
    for k in [64 << 10, 256 << 10, 1 << 20, 4 << 20] {
        push(Point { chunk: k, ..BASE });
    }
    v
}

/// Which designs can run here, and why the others cannot.
fn available(wanted: &[Design]) -> (Vec<Design>, Vec<(Design, String)>) {
    let mut ok = Vec::new();
    let mut skipped = Vec::new();
    let caps = vfio_multifd::uring_capabilities();
    let uring = caps.unavailable.clone();
    let zc = caps.supports("SEND_ZC");
    for &d in wanted {
        match d {
            Design::EngineUringSend | Design::EngineUringZc if uring.is_some() => {
                skipped.push((d, uring.clone().unwrap_or_default()));
            }
            Design::EngineUringZc if !zc => skipped.push((d, "the kernel lacks IORING_OP_SEND_ZC".into())),
            _ => ok.push(d),
        }
    }
    (ok, skipped)
}

/// `vfio-multifd bench`.
pub fn run(a: &BenchArgs) -> Result<()> {
    let quick = a.quick;
    let reps = a.reps.map_or(if quick { 3 } else { 5 }, |r| r as usize);
    let bytes = a.bytes.unwrap_or(if quick { 128 << 20 } else { 512 << 20 });
    if bytes < (4 << 20) {
        bail!("--bytes {bytes}: use at least 4MiB per run so that timings mean something");
    }
    let wanted: Vec<Design> = if a.designs.is_empty() { Design::ALL.to_vec() } else { a.designs.clone() };
    let (designs, skipped) = available(&wanted);
    for (d, why) in &skipped {
        eprintln!("bench: skipping {}: {why}", d.name());
    }
    let pts = if a.processes == Processes::Only { Vec::new() } else { points(quick) };
    let loadavg = read_loadavg();
    let machine0 = MachineSample::take();
    let started = std::time::Instant::now();
    eprintln!(
        "bench: {} points x {} designs x {reps} reps, {} per run{}",
        pts.len(),
        designs.len(),
        crate::util::fmt_bytes(bytes),
        if quick { " (quick)" } else { "" }
    );
    // Warm-up: one small run of each design (page cache, allocator, TCP autotuning).
    for &d in designs.iter().filter(|_| !pts.is_empty()) {
        run_once(d, BASE, (bytes / 4).max(4 << 20)).with_context(|| format!("warm-up of {}", d.name()))?;
    }
    let mut results = Vec::new();
    for (pi, &p) in pts.iter().enumerate() {
        let mut per: Vec<Vec<Rep>> = designs.iter().map(|_| Vec::new()).collect();
        for _ in 0..reps {
            for (di, &d) in designs.iter().enumerate() {
                let r = run_once(d, p, bytes).with_context(|| {
                    format!(
                        "{} at {} channels, {} devices, chunk {}",
                        d.name(),
                        p.channels,
                        p.devices,
                        fmt_size_short(p.chunk as u64)
                    )
                })?;
                per[di].push(r);
            }
        }
        let line: Vec<String> = designs
            .iter()
            .zip(per.iter())
            .map(|(d, r)| format!("{} {:.2}", d.name(), spread(r.iter().map(Rep::gibps).collect()).median))
            .collect();
        eprintln!(
            "bench: [{}/{}] P={} devices={} chunk={}: {} GiB/s ({:.0} s)",
            pi + 1,
            pts.len(),
            p.channels,
            p.devices,
            fmt_size_short(p.chunk as u64),
            line.join(", "),
            started.elapsed().as_secs_f64()
        );
        for (d, r) in designs.iter().zip(per) {
            results.push(aggregate(*d, p, r));
        }
    }
    // Downtime: 4 devices x 400 MiB (100 MiB in quick mode), P=4, 1 MiB chunks, one loop with
    // the repetitions interleaved. The whole-run designs: a stop-and-copy run from its start
    // (connect and set-up included) to the last device loaded. The engine's live path, on the
    // same live devices (dirtying at --dirty-rate): stop-and-copy and pre-copy, each from the
    // switchover call to every destination device loaded, validated and RUNNING.
    let dt_size: u64 = if quick { 100 << 20 } else { 400 << 20 };
    let whole_reps = if quick { 1 } else { 3 };
    let live_reps = if quick { 1 } else { 5 };
    let scenario = Scenario {
        devices: 4,
        size: dt_size,
        channels: 4,
        chunk: 1 << 20,
        dirty_rate: a.dirty_rate,
        downtime_limit: a.downtime_limit,
        max_precopy: a.max_precopy.unwrap_or(Duration::from_secs(if quick { 5 } else { 20 })),
    };
    let no_downtime = a.no_downtime || (a.processes == Processes::Only);
    let live_skipped: Option<String> = if no_downtime {
        Some(if a.processes == Processes::Only { "--processes only" } else { "--no-downtime" }.into())
    } else if designs.contains(&Design::EngineUringSend) {
        None
    } else if let Some((_, why)) = skipped.iter().find(|(d, _)| *d == Design::EngineUringSend) {
        Some(why.clone())
    } else {
        Some("engine-uring-send is not among --designs".into())
    };
    let mut downtime = Vec::new();
    let mut live: Vec<LiveResult> = Vec::new();
    if !no_downtime {
        let p = Point { channels: 4, devices: 4, chunk: 1 << 20 };
        let whole: Vec<Design> = designs.iter().copied().filter(|d| d.has_devices()).collect();
        let variants: Vec<Variant> = if live_skipped.is_none() { Variant::ALL.to_vec() } else { Vec::new() };
        if let Some(why) = &live_skipped {
            eprintln!("bench: skipping the live downtime variants: {why}");
        }
        // Warm-up of the live path (live devices, pre-copy), small.
        for &v in &variants {
            downtime::run_once(v, &Scenario { size: 8 << 20, ..scenario })
                .with_context(|| format!("warm-up of {}", v.name()))?;
        }
        let mut whole_ms: Vec<Vec<f64>> = whole.iter().map(|_| Vec::new()).collect();
        let mut live_runs: Vec<Vec<downtime::LiveRep>> = variants.iter().map(|_| Vec::new()).collect();
        for rep in 0..whole_reps.max(live_reps) {
            let mut line = Vec::new();
            if rep < whole_reps {
                for (i, &d) in whole.iter().enumerate() {
                    let r =
                        run_once(d, p, dt_size * 4).with_context(|| format!("downtime scenario of {}", d.name()))?;
                    whole_ms[i].push(r.secs * 1000.0);
                    line.push(format!("{} {:.0}", d.name(), r.secs * 1000.0));
                }
            }
            if rep < live_reps {
                // The two variants alternate which goes first.
                let mut order: Vec<usize> = (0..variants.len()).collect();
                if rep % 2 == 1 {
                    order.reverse();
                }
                for i in order {
                    let v = variants[i];
                    let r = downtime::run_once(v, &scenario)
                        .with_context(|| format!("downtime scenario of {}", v.name()))?;
                    line.push(format!("{} {:.0}", v.name(), r.downtime.as_secs_f64() * 1000.0));
                    live_runs[i].push(r);
                }
            }
            eprintln!(
                "bench: downtime [{}/{}]: {} ms ({:.0} s)",
                rep + 1,
                whole_reps.max(live_reps),
                line.join(", "),
                started.elapsed().as_secs_f64()
            );
        }
        downtime = whole.into_iter().zip(whole_ms).map(|(d, v)| (d, spread(v))).collect();
        live = variants.into_iter().zip(live_runs).map(|(v, r)| downtime::aggregate(v, r)).collect();
        for l in &live {
            eprintln!(
                "bench: downtime {}: {:.0} ms [{:.0}..{:.0}], {} in pre-copy, {} at the switchover",
                l.variant.name(),
                l.ms.median,
                l.ms.min,
                l.ms.max,
                fmt_bytes(l.precopy_bytes.median as u64),
                fmt_bytes(l.switchover_bytes.median as u64)
            );
        }
    }
    let procs = if a.processes == Processes::Skip {
        Vec::new()
    } else {
        let mut scs = procs::scenarios(quick);
        if !a.scenario.is_empty() {
            scs.retain(|sc| a.scenario.iter().any(|n| n == sc.name));
            if scs.is_empty() {
                bail!("--scenario {:?}: no such scenario", a.scenario);
            }
        }
        let mut ds = procs::designs(&designs, quick);
        if a.compare_exe.is_some() && ds.contains(&Design::EngineUringSend) {
            ds.insert(1, Design::EngineUringAlt);
        }
        procs::run_all(&scs, &ds, reps, started, a.compare_exe.as_deref(), quick)?
    };
    let machine = MachineSample::take().json_since(&machine0);
    let targets = targets(&results);
    let doc = json!({
        "start": {
            "version": format!("vfio-multifd {}", env!("CARGO_PKG_VERSION")),
            "timestamp": timestamp(),
            "kernel": kernel_version(),
            "loadavg": loadavg,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "capabilities": crate::probe::capabilities_json(),
            "machine": machine0.json(),
            "config": {"quick": quick, "reps": reps, "bytes_per_run": bytes, "sim_max_read": 1 << 20,
                       "base_point": {"channels": BASE.channels, "devices": BASE.devices, "chunk": BASE.chunk},
                       "downtime": {"devices": 4, "size_per_device": dt_size, "channels": 4, "chunk": 1 << 20,
                                    "reps_whole_run": whole_reps, "reps_live": live_reps,
                                    "live_variants": live.iter().map(|l| l.variant.name()).collect::<Vec<_>>(),
                                    "live_skipped": live_skipped,
                                    "dirty_rate_bytes_per_sec": scenario.dirty_rate,
                                    "downtime_limit_ms": crate::util::ms(scenario.downtime_limit),
                                    "max_precopy_seconds": scenario.max_precopy.as_secs_f64()}},
            "skipped": skipped.iter().map(|(d, w)| json!({"design": d.name(), "reason": w})).collect::<Vec<_>>(),
        },
        "results": results.iter().map(|r| json!({
            "design": r.design.name(), "channels": r.point.channels, "devices": r.point.devices, "chunk": r.point.chunk,
            "gib_per_sec": r.gibps.json(), "cpu_seconds_per_gib": r.cpu.json(),
            "latency_ns": r.lat.map(|(a, b, c)| json!({"p50": a, "p99": b, "p99.9": c})),
            "reps": r.reps.iter().map(|x| json!({"seconds": x.secs, "bytes": x.bytes, "cpu_seconds": x.cpu,
                "latency": x.lat.as_ref().map(crate::util::lat_json)})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "downtime": downtime
            .iter()
            .map(|(d, s)| json!({"design": d.name(), "ms": s.json(), "measured_from": "run_start"}))
            .chain(live.iter().map(|l| l.json(live.iter().find(|x| x.variant == Variant::StopCopy))))
            .collect::<Vec<_>>(),
        "targets": targets,
        "processes": procs.iter().map(procs::ScenarioResult::json).collect::<Vec<_>>(),
        "machine": machine,
        "elapsed_seconds": started.elapsed().as_secs_f64(),
        "loadavg_end": read_loadavg(),
    });
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let jp = a.out.join("latest.json");
    std::fs::write(&jp, serde_json::to_string_pretty(&doc)?).with_context(|| format!("writing {}", jp.display()))?;
    let mut md = markdown(&doc, &results, &downtime, &live, &scenario, quick, reps, bytes);
    procs_markdown(&mut md, &doc, &procs);
    let mp = a.out.join("latest.md");
    std::fs::write(&mp, &md).with_context(|| format!("writing {}", mp.display()))?;
    let sp = a.out.join("throughput.svg");
    std::fs::write(
        &sp,
        svg::throughput(
            &results
                .iter()
                .filter(|r| r.point.devices == BASE.devices && r.point.chunk == BASE.chunk)
                .map(|r| (r.design.name(), r.point.channels, r.gibps.median, r.gibps.min, r.gibps.max))
                .collect::<Vec<_>>(),
        ),
    )
    .with_context(|| format!("writing {}", sp.display()))?;
    if !procs.is_empty() {
        let pp = a.out.join("scenarios.svg");
        std::fs::write(&pp, svg::scenarios(&procs_bars(&procs)))
            .with_context(|| format!("writing {}", pp.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("{md}");
        println!(
            "wrote {}, {}, {} in {:.0} s",
            jp.display(),
            mp.display(),
            sp.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`): how busy the machine was.
fn read_loadavg() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

fn find(results: &[PointResult], d: Design, p: Point) -> Option<&PointResult> {
    results.iter().find(|r| r.design == d && r.point == p)
}

/// The targets at the base point, as ratios from this run.
fn targets(results: &[PointResult]) -> Value {
    let q = find(results, Design::QemuStyle, BASE);
    let m = find(results, Design::MinCopy, BASE);
    let mut out = Vec::new();
    for e in [Design::EngineUringSend, Design::EngineUringZc, Design::EngineBlocking] {
        let Some(er) = find(results, e, BASE) else { continue };
        let mut t = json!({"engine": e.name()});
        if let Some(q) = q {
            let thr = er.gibps.median / q.gibps.median;
            let cpu = er.cpu.median / q.cpu.median;
            t["throughput_vs_qemu"] = json!({"ratio": thr, "target": ">= 1.4", "met": thr >= 1.4});
            t["cpu_per_gib_vs_qemu"] = json!({"ratio": cpu, "target": "<= 0.7", "met": cpu <= 0.7});
        }
        if let Some(m) = m {
            let r = er.gibps.median / m.gibps.median;
            t["throughput_vs_min_copy"] = json!({"ratio": r, "target": ">= 0.9", "met": r >= 0.9});
        }
        out.push(t);
    }
    json!(out)
}

#[allow(clippy::too_many_arguments)]
fn markdown(
    doc: &Value,
    results: &[PointResult],
    downtime: &[(Design, Spread)],
    live: &[LiveResult],
    sc: &Scenario,
    quick: bool,
    reps: usize,
    bytes: u64,
) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "# vfio-multifd benchmark{}\n", if quick { " (quick)" } else { "" });
    let _ = writeln!(
        s,
        "{} on {} CPUs, {}, load average {} at the start; {} per run, median of {reps} runs [min..max]; simulated devices (reads up to 1 MiB), loopback TCP.\n",
        doc["start"]["timestamp"]["time"].as_str().unwrap_or("?"),
        doc["start"]["cpus"],
        doc["start"]["kernel"].as_str().unwrap_or("?"),
        doc["start"]["loadavg"][0].as_f64().map_or("?".to_owned(), |l| format!("{l:.2}")),
        crate::util::fmt_bytes(bytes)
    );
    let _ = writeln!(s, "## Targets (P=4, 2 devices, 1 MiB chunks)\n");
    let _ = writeln!(s, "| engine | throughput / qemu-style (>= 1.4) | CPU per GiB / qemu-style (<= 0.7) | throughput / min-copy (>= 0.9) |");
    let _ = writeln!(s, "|---|---|---|---|");
    let cell = |v: &Value| {
        v["ratio"].as_f64().map_or("-".to_owned(), |r| {
            format!("{r:.2}x {}", if v["met"] == json!(true) { "met" } else { "**missed**" })
        })
    };
    for t in doc["targets"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            t["engine"].as_str().unwrap_or("?"),
            cell(&t["throughput_vs_qemu"]),
            cell(&t["cpu_per_gib_vs_qemu"]),
            cell(&t["throughput_vs_min_copy"])
        );
    }
    let _ = writeln!(s, "\n## Sweep\n");
    let _ = writeln!(s, "| design | P | devices | chunk | GiB/s | CPU s/GiB | p50 | p99 | p99.9 |");
    let _ = writeln!(s, "|---|---:|---:|---:|---|---|---:|---:|---:|");
    let us = |ns: f64| format!("{:.0} us", ns / 1000.0);
    for r in results {
        let (a, b, c) = r.lat.map_or(("-".into(), "-".into(), "-".into()), |(a, b, c)| (us(a), us(b), us(c)));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} [{:.2}..{:.2}] | {:.2} [{:.2}..{:.2}] | {a} | {b} | {c} |",
            r.design.name(),
            r.point.channels,
            r.point.devices,
            fmt_size_short(r.point.chunk as u64),
            r.gibps.median,
            r.gibps.min,
            r.gibps.max,
            r.cpu.median,
            r.cpu.min,
            r.cpu.max
        );
    }
    if !downtime.is_empty() {
        let _ = writeln!(
            s,
            "\n## Downtime, whole run: 4 devices x {}, P=4, stop-and-copy from the run's start (set-up included) to the last device loaded\n",
            crate::util::fmt_bytes(sc.size)
        );
        let _ = writeln!(s, "| design | ms |");
        let _ = writeln!(s, "|---|---|");
        for (d, sp) in downtime {
            let _ = writeln!(s, "| {} | {:.0} [{:.0}..{:.0}] |", d.name(), sp.median, sp.min, sp.max);
        }
    }
    if !live.is_empty() {
        let _ = writeln!(
            s,
            "\n## Downtime, live path: 4 devices x {}, P=4, dirtying {}/s each, {} runs\n",
            fmt_bytes(sc.size),
            fmt_bytes(sc.dirty_rate),
            live[0].reps.len()
        );
        let _ = writeln!(
            s,
            "From the switchover call (source devices stopping) to every destination device loaded, validated \
             (RESUMING -> STOP) and RUNNING: the receiver's `on_started` hook, where a VMM resumes its vCPUs. \
             `to receiver return` adds the receiver's teardown after it (threads joined, rings and memory \
             released). `engine-precopy` switches over once converged \
             (estimated switchover <= {}) or after {} of pre-copy. `engine-switchover-fixed-cost` pre-copies \
             devices that dirty nothing and switches over 200 ms after the decision (nothing still in flight or \
             being loaded), so its switchover moves no data: its downtime is the switchover's fixed cost. Same channels and process for all; simulated devices, loopback TCP.\n",
            crate::util::fmt_dur(sc.downtime_limit),
            crate::util::fmt_dur(sc.max_precopy)
        );
        let _ = writeln!(
            s,
            "| variant | downtime ms | to receiver return ms | estimated ms | pre-copy s | moved in pre-copy | moved at switchover | whole migration s | switched over on |"
        );
        let _ = writeln!(s, "|---|---|---|---:|---|---:|---:|---|---|");
        for l in live {
            let trig: Vec<String> = l.triggers.iter().map(|(t, n)| format!("{t} x{n}")).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.2} [{:.2}..{:.2}] | {} | {} | {:.2} [{:.2}..{:.2}] | {} |",
                l.variant.name(),
                fmt_downtime(&l.ms),
                fmt_downtime(&l.to_return_ms),
                l.estimated_ms.map_or("-".to_owned(), |e| format!("{:.0}", e.median)),
                l.precopy_seconds.median,
                l.precopy_seconds.min,
                l.precopy_seconds.max,
                fmt_bytes(l.precopy_bytes.median as u64),
                fmt_bytes(l.switchover_bytes.median as u64),
                l.total_seconds.median,
                l.total_seconds.min,
                l.total_seconds.max,
                trig.join(", ")
            );
        }
    }
    let _ = writeln!(s, "\n![throughput vs channels](throughput.svg)");
    s
}

/// The process scenarios' section of the Markdown report, with the machine's state.
fn procs_markdown(s: &mut String, doc: &Value, procs: &[procs::ScenarioResult]) {
    use std::fmt::Write;
    if procs.is_empty() {
        return;
    }
    let m = &doc["machine"];
    let _ = writeln!(s, "\n## Process scenarios: each design as separate sender and receiver processes\n");
    let _ = writeln!(
        s,
        "Loopback TCP, sources and sinks on tmpfs; pipes at their default size with separate producer and \
         consumer processes; the pty (a character device that the engine drives like a VFIO data fd, through io-wq) drained by a \
         consumer on its master. Median of interleaved repetitions [min..max]; CPU and context switches are the \
         sender's and receiver's whole processes (wait4 rusage, io-wq workers included); latency is the \
         sender's, from a read's submission to its packet's send completing (min-copy: per chunk read + send)."
    );
    let _ = writeln!(
        s,
        "\nMachine: {:.1} GiB available memory at the start, load average {} at the start and {} at the end; \
         other processes used {:.2} CPUs on average while the benchmark ran ({:.0}% of the machine).",
        m["mem_available_start_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
        fmt_load(&doc["start"]["loadavg"]),
        fmt_load(&doc["loadavg_end"]),
        m["other_cpus_busy"].as_f64().unwrap_or(f64::NAN),
        m["other_cpu_fraction"].as_f64().unwrap_or(f64::NAN) * 100.0
    );
    for p in procs {
        p.markdown(s);
    }
    let _ = writeln!(s, "\n![process scenarios](scenarios.svg)");
}

fn fmt_load(v: &Value) -> String {
    v.as_array().map_or("?".into(), |a| {
        a.iter().map(|x| x.as_f64().map_or("?".into(), |f| format!("{f:.2}"))).collect::<Vec<_>>().join(" ")
    })
}

/// `(scenario, design, median, min, max)` GiB/s for the scenarios' chart.
fn procs_bars(procs: &[procs::ScenarioResult]) -> Vec<(String, &'static str, f64, f64, f64)> {
    procs
        .iter()
        .flat_map(|p| {
            p.results
                .iter()
                .map(move |r| (p.sc.name.to_owned(), r.design.name(), r.gibps.median, r.gibps.min, r.gibps.max))
        })
        .collect()
}

/// The machine's state: memory, and CPU time of all processes (`/proc/stat`) against this
/// process's and its waited-for children's, to say how busy the rest of the machine was.
#[derive(Debug, Clone, Copy)]
struct MachineSample {
    at: std::time::Instant,
    mem_available: u64,
    mem_free: u64,
    /// Busy CPU seconds of the whole machine since boot.
    busy: f64,
    /// CPU seconds of this process and its reaped children.
    own: f64,
}

impl MachineSample {
    fn take() -> MachineSample {
        let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kb = |k: &str| {
            mem.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(0, |v| v * 1024)
        };
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu  user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
        let f: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse::<f64>().ok())
            .collect();
        // SAFETY: sysconf has no memory arguments.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let busy = f.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum::<f64>() / hz;
        let own = rusage(libc::RUSAGE_SELF) + rusage(libc::RUSAGE_CHILDREN);
        MachineSample {
            at: std::time::Instant::now(),
            mem_available: kb("MemAvailable:"),
            mem_free: kb("MemFree:"),
            busy,
            own,
        }
    }

    fn json(&self) -> Value {
        json!({"mem_available_bytes": self.mem_available, "mem_free_bytes": self.mem_free})
    }

    /// The state at the end, and how much CPU other processes used since `start`.
    fn json_since(&self, start: &MachineSample) -> Value {
        let wall = self.at.duration_since(start.at).as_secs_f64().max(1e-9);
        let other = ((self.busy - start.busy) - (self.own - start.own)).max(0.0);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        json!({
            "mem_available_start_bytes": start.mem_available, "mem_free_start_bytes": start.mem_free,
            "mem_available_end_bytes": self.mem_available, "mem_free_end_bytes": self.mem_free,
            "other_cpu_seconds": other, "other_cpus_busy": other / wall, "other_cpu_fraction": other / wall / cpus,
            "wall_seconds": wall,
        })
    }
}

/// User + system CPU seconds of `who` (`getrusage`).
fn rusage(who: libc::c_int) -> f64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is live and exclusively borrowed for the call.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A downtime spread in ms: whole ms, or two decimals under 10 ms (the switchover's fixed
/// cost is a few ms, where whole ms hide what a change did).
fn fmt_downtime(ms: &Spread) -> String {
    let p = if ms.max < 10.0 { 2 } else { 0 };
    format!("{:.p$} [{:.p$}..{:.p$}]", ms.median, ms.min, ms.max)
}
