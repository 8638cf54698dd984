//! The scenarios users run: every design as a separate sender and receiver process (the
//! engine's `send` and `recv` commands; the QEMU-style and minimum-copy designs as
//! `bench-peer` processes), with files, pipes or a pty at both ends, and separate producer and
//! consumer processes on pipes and ptys.
//!
//! One repetition of one design: fresh sinks (files removed, FIFOs and ptys made anew), the
//! consumers and the receiver started, the receiver's port seen listening in `/proc/net/tcp`,
//! then the clock starts, the producers and the sender are started, and it stops when every
//! process has exited. CPU time and context switches are each process's own (`wait4`'s
//! rusage: every thread, io-wq workers included). Designs are interleaved within a repetition
//! and rotate which goes first.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::peers::{checksum_file, write_pattern};
use super::{spread, Design, Spread};
use crate::util::fmt_bytes;

/// What a scenario's device streams come from or go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// A regular file on tmpfs (the sink created fresh each run).
    File,
    /// A FIFO with a producer (source) or consumer (sink) process, default pipe size.
    Pipe,
    /// A pty with a consumer process on the master: a character device that is a stream with
    /// short writes, which the engine drives as it drives a VFIO data fd (io-wq).
    Pty,
}

impl End {
    fn name(self) -> &'static str {
        match self {
            End::File => "file",
            End::Pipe => "pipe",
            End::Pty => "pty",
        }
    }
}

/// One scenario.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scenario {
    pub(super) name: &'static str,
    pub(super) devices: usize,
    pub(super) size: u64,
    pub(super) channels: usize,
    pub(super) chunk: usize,
    pub(super) src: End,
    pub(super) dst: End,
}

impl Scenario {
    fn bytes(&self) -> u64 {
        self.size * self.devices as u64
    }
}

/// The scenarios, full or quick.
pub(super) fn scenarios(quick: bool) -> Vec<Scenario> {
    let g = |full: u64, q: u64| if quick { q } else { full };
    let base = Scenario { name: "", devices: 1, size: 0, channels: 4, chunk: 1 << 20, src: End::File, dst: End::File };
    vec![
        Scenario { name: "file-1dev", size: g(1 << 30, 128 << 20), ..base },
        Scenario { name: "file-4dev", devices: 4, size: g(256 << 20, 32 << 20), ..base },
        Scenario { name: "pipe", size: g(1 << 30, 128 << 20), src: End::Pipe, dst: End::Pipe, ..base },
        Scenario { name: "pty-sink", size: g(32 << 20, 4 << 20), dst: End::Pty, ..base },
    ]
}

/// One repetition's numbers.
#[derive(Debug, Clone)]
pub(super) struct ProcRep {
    secs: f64,
    /// CPU seconds of the sender and receiver processes.
    cpu: f64,
    /// CPU seconds of the producers and consumers.
    aux_cpu: f64,
    /// Voluntary + involuntary context switches of the sender and receiver.
    csw: u64,
    /// Packet latency p50, p99 (ns), where the sender reports it.
    lat: Option<(f64, f64)>,
}

/// One design's result in one scenario.
#[derive(Debug, Clone)]
pub(super) struct ProcResult {
    pub(super) design: Design,
    pub(super) gibps: Spread,
    pub(super) cpu: Spread,
    pub(super) aux_cpu: Spread,
    pub(super) csw: Spread,
    pub(super) p50: Option<Spread>,
    pub(super) p99: Option<Spread>,
    pub(super) reps: Vec<ProcRep>,
}

/// A scenario's results.
#[derive(Debug, Clone)]
pub(super) struct ScenarioResult {
    pub(super) sc: Scenario,
    pub(super) results: Vec<ProcResult>,
}

/// Which designs run as processes (raw TCP has no devices).
pub(super) fn designs(all: &[Design], quick: bool) -> Vec<Design> {
    all.iter().copied().filter(|d| *d != Design::RawTcp && !(quick && *d == Design::EngineUringZc)).collect()
}

/// A scratch directory on tmpfs, removed on drop.
pub(super) struct Scratch(PathBuf);

impl Scratch {
    pub(super) fn new() -> Result<Scratch> {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let p = base.join(format!("vfio-multifd-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Scratch(p))
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs every scenario with `designs` interleaved, `reps` times each.
pub(super) fn run_all(
    scs: &[Scenario],
    designs: &[Design],
    reps: usize,
    started: Instant,
    alt: Option<&Path>,
    quick: bool,
) -> Result<Vec<ScenarioResult>> {
    let dir = Scratch::new()?;
    let mut out = Vec::new();
    for (si, sc) in scs.iter().enumerate() {
        let sums = prepare_sources(&dir, sc)?;
        // Warm-up: one run of each design (page cache, TCP autotuning, binaries); the quick
        // form warms up before the first scenario only.
        for &d in designs.iter().filter(|_| !quick || si == 0) {
            run_once(&dir, sc, d, &sums, alt).with_context(|| format!("{}: warm-up of {}", sc.name, d.name()))?;
        }
        let mut per: Vec<Vec<ProcRep>> = designs.iter().map(|_| Vec::new()).collect();
        for rep in 0..reps {
            for k in 0..designs.len() {
                let di = (k + rep) % designs.len();
                let d = designs[di];
                let r = run_once(&dir, sc, d, &sums, alt).with_context(|| format!("{}: {}", sc.name, d.name()))?;
                per[di].push(r);
            }
        }
        let results: Vec<ProcResult> = designs.iter().zip(per).map(|(&d, r)| aggregate(d, sc, r)).collect();
        let line: Vec<String> = results.iter().map(|r| format!("{} {:.2}", r.design.name(), r.gibps.median)).collect();
        eprintln!(
            "bench: processes [{}/{}] {}: {} GiB/s ({:.0} s)",
            si + 1,
            scs.len(),
            sc.name,
            line.join(", "),
            started.elapsed().as_secs_f64()
        );
        remove_sources(&dir, sc);
        out.push(ScenarioResult { sc: *sc, results });
    }
    Ok(out)
}

fn aggregate(design: Design, sc: &Scenario, reps: Vec<ProcRep>) -> ProcResult {
    let gib = sc.bytes() as f64 / (1u64 << 30) as f64;
    let lats: Vec<(f64, f64)> = reps.iter().filter_map(|r| r.lat).collect();
    ProcResult {
        design,
        gibps: spread(reps.iter().map(|r| gib / r.secs.max(1e-9)).collect()),
        cpu: spread(reps.iter().map(|r| r.cpu / gib).collect()),
        aux_cpu: spread(reps.iter().map(|r| r.aux_cpu / gib).collect()),
        csw: spread(reps.iter().map(|r| r.csw as f64 / gib).collect()),
        p50: (!lats.is_empty()).then(|| spread(lats.iter().map(|l| l.0).collect())),
        p99: (!lats.is_empty()).then(|| spread(lats.iter().map(|l| l.1).collect())),
        reps,
    }
}

fn src_path(dir: &Scratch, d: usize) -> PathBuf {
    dir.path(&format!("src{d}"))
}

fn dst_path(dir: &Scratch, d: usize) -> PathBuf {
    dir.path(&format!("dst{d}"))
}

/// Writes the source files (file sources) and returns each device's pattern checksum.
fn prepare_sources(dir: &Scratch, sc: &Scenario) -> Result<Vec<u64>> {
    (0..sc.devices)
        .map(|d| {
            let seed = d as u64 + 1;
            if sc.src == End::File {
                let f = File::create(src_path(dir, d))?;
                write_pattern(f.as_raw_fd(), seed, sc.size, |_, b, off| {
                    use std::os::unix::fs::FileExt;
                    Ok(f.write_all_at(b, off)?)
                })
            } else {
                write_pattern(-1, seed, sc.size, |_, _, _| Ok(()))
            }
        })
        .collect()
}

fn remove_sources(dir: &Scratch, sc: &Scenario) {
    for d in 0..sc.devices {
        let _ = std::fs::remove_file(src_path(dir, d));
        let _ = std::fs::remove_file(dst_path(dir, d));
        let mut c = dst_path(dir, d).into_os_string();
        c.push(".config");
        let _ = std::fs::remove_file(c);
    }
}

fn mkfifo(p: &Path) -> Result<()> {
    let _ = std::fs::remove_file(p);
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .with_context(|| format!("mkfifo {}", p.display()))
}

/// A pty in raw mode: the master (for the consumer) and a symlink to the slave at `link` (the
/// sink path; its `.config` then lands next to it, on tmpfs).
fn make_pty(link: &Path) -> Result<(OwnedFd, OwnedFd)> {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let pty = nix::pty::openpty(None, None).context("openpty")?;
    let mut t = tcgetattr(pty.slave.as_fd()).context("tcgetattr on the pty")?;
    cfmakeraw(&mut t);
    tcsetattr(pty.slave.as_fd(), SetArg::TCSANOW, &t).context("tcsetattr raw on the pty")?;
    let name = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).context("pty slave name")?;
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(&name, link).with_context(|| format!("symlink {}", link.display()))?;
    // The slave stays open here too, so its raw settings hold while the receiver opens it.
    Ok((pty.master, pty.slave))
}

/// A spawned process, with its stdout collected by a thread.
struct Proc {
    role: String,
    child: Child,
    out: std::thread::JoinHandle<String>,
    err: PathBuf,
}

fn spawn(role: &str, args: &[String], stdin: Option<OwnedFd>, err: PathBuf) -> Result<Proc> {
    spawn_exe(role, args, stdin, err, None)
}

/// Starts `role` from `exe` (default: this binary).
fn spawn_exe(role: &str, args: &[String], stdin: Option<OwnedFd>, err: PathBuf, exe: Option<&Path>) -> Result<Proc> {
    let exe = match exe {
        Some(e) => e.to_path_buf(),
        None => std::env::current_exe().context("locating the vfio-multifd binary")?,
    };
    let mut c = Command::new(exe);
    c.args(args).stdout(Stdio::piped()).stderr(File::create(&err)?);
    c.stdin(stdin.map_or(Stdio::null(), Stdio::from));
    let mut child = c.spawn().with_context(|| format!("starting {role}"))?;
    let mut so = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut so, &mut s);
        s
    });
    Ok(Proc { role: role.to_owned(), child, out, err })
}

/// What `wait4` said about one process.
struct Exit {
    role: String,
    ok: bool,
    status: String,
    cpu: f64,
    csw: u64,
    stdout: String,
    stderr: String,
}

/// The longest any benchmark process may run: past it, it is killed and the run fails (a
/// sink that never drains, a peer that never connects).
const PROC_LIMIT: Duration = Duration::from_secs(300);

fn wait(mut p: Proc) -> Exit {
    let pid = p.child.id() as libc::pid_t;
    let deadline = Instant::now() + PROC_LIMIT;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let mut killed = false;
    let r = loop {
        let flags = if killed { 0 } else { libc::WNOHANG };
        // SAFETY: `status` and `ru` are live and exclusively borrowed for the call; `pid` is our
        // own child, not yet reaped (std's `Child` is never waited for).
        let r = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
        if r == 0 {
            if Instant::now() > deadline {
                let _ = p.child.kill();
                killed = true;
            } else {
                std::thread::sleep(Duration::from_micros(250));
            }
            continue;
        }
        if r > 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break r;
        }
    };
    let stdout = p.out.join().unwrap_or_default();
    let stderr = std::fs::read_to_string(&p.err).unwrap_or_default();
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let ok = r == pid && !killed && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let status = if r != pid {
        format!("wait4: {}", std::io::Error::last_os_error())
    } else if killed {
        format!("killed after {} s", PROC_LIMIT.as_secs())
    } else if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else {
        format!("killed by signal {}", libc::WTERMSIG(status))
    };
    Exit {
        role: p.role,
        ok,
        status,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        csw: (ru.ru_nvcsw + ru.ru_nivcsw) as u64,
        stdout,
        stderr,
    }
}

/// Kills and reaps what is still running (after a failure).
fn kill_all(ps: Vec<Proc>) {
    for mut p in ps {
        let _ = p.child.kill();
        let _ = wait(p);
    }
}

/// Waits until something listens on 127.0.0.1:`port` (`/proc/net/tcp`, state LISTEN), or
/// the receiver exits, or 10 s pass.
fn await_listen(port: u16, rx: &mut Proc) -> Result<()> {
    let want = format!("0100007F:{port:04X}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        if t.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        }) {
            return Ok(());
        }
        if let Ok(Some(st)) = rx.child.try_wait() {
            let e = std::fs::read_to_string(&rx.err).unwrap_or_default();
            bail!("{} exited ({st}) before listening: {}", rx.role, e.trim());
        }
        if Instant::now() > deadline {
            bail!("{} did not listen on port {port} within 10 s", rx.role);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn paths(v: &[PathBuf], flag: &str) -> Vec<String> {
    v.iter().flat_map(|p| [flag.to_owned(), format!("file:{}", p.display())]).collect()
}

fn plain(v: &[PathBuf], flag: &str) -> Vec<String> {
    v.iter().flat_map(|p| [flag.to_owned(), p.display().to_string()]).collect()
}

/// The sender's and receiver's command lines for `d`.
fn commands(d: Design, sc: &Scenario, port: u16, srcs: &[PathBuf], dsts: &[PathBuf]) -> (Vec<String>, Vec<String>) {
    let p = sc.channels.to_string();
    let chunk = sc.chunk.to_string();
    let addr = format!("127.0.0.1:{port}");
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<String>>();
    let engine = |backend: &str, zc: &str| {
        let mut tx =
            s(&["send", "-c", &addr, "-P", &p, "--backend", backend, "--zerocopy", zc, "--chunk", &chunk, "-J"]);
        // The sources are bare streams, with no config blob next to them.
        tx.push("--no-config".into());
        tx.extend(paths(srcs, "--source"));
        let mut rx = s(&["recv", "-l", &addr, "-P", &p, "--backend", backend, "--max-packet", &chunk, "-J"]);
        rx.extend(paths(dsts, "--sink"));
        (tx, rx)
    };
    let peer = |send: &str, recv: &str| {
        let mut tx = s(&["bench-peer", send, "--connect", &addr, "-P", &p, "--chunk", &chunk]);
        tx.extend(plain(srcs, "--source"));
        if sc.src != End::File || sc.dst != End::File {
            tx.push("--stream".into());
        }
        let mut rx = s(&["bench-peer", recv, "--listen", &addr, "-P", &p, "--chunk", &chunk]);
        rx.extend(plain(dsts, "--sink"));
        (tx, rx)
    };
    match d {
        Design::EngineUringSend | Design::EngineUringAlt => engine("uring", "off"),
        Design::EngineUringZc => engine("uring", "on"),
        Design::EngineBlocking => engine("blocking", "off"),
        Design::QemuStyle => peer("qemu-send", "qemu-recv"),
        Design::MinCopy | Design::RawTcp => peer("min-copy-send", "min-copy-recv"),
    }
}

/// One run of design `d` in `sc`.
fn run_once(dir: &Scratch, sc: &Scenario, d: Design, sums: &[u64], alt: Option<&Path>) -> Result<ProcRep> {
    let exe = if d == Design::EngineUringAlt { alt } else { None };
    let srcs: Vec<PathBuf> = (0..sc.devices).map(|i| src_path(dir, i)).collect();
    let dsts: Vec<PathBuf> = (0..sc.devices).map(|i| dst_path(dir, i)).collect();
    let mut aux: Vec<Proc> = Vec::new();
    let mut keep: Vec<OwnedFd> = Vec::new();
    let err = |n: &str| dir.path(&format!("{n}.err"));
    let r = (|| -> Result<ProcRep> {
        // Sinks: fresh files, FIFOs with a consumer, ptys with a consumer on the master.
        for (i, p) in dsts.iter().enumerate() {
            let _ = std::fs::remove_file(p);
            let bytes = sc.size.to_string();
            match sc.dst {
                End::File => {}
                End::Pipe => {
                    mkfifo(p)?;
                    let a = ["bench-peer", "consume", "--bytes", &bytes, "--path", &p.display().to_string()];
                    aux.push(spawn("consumer", &a.map(String::from), None, err(&format!("consume{i}")))?);
                }
                End::Pty => {
                    let (master, slave) = make_pty(p)?;
                    keep.push(slave);
                    let a = ["bench-peer", "consume", "--bytes", &bytes];
                    aux.push(spawn("consumer", &a.map(String::from), Some(master), err(&format!("consume{i}")))?);
                }
            }
        }
        let port = free_port()?;
        let (txa, rxa) = commands(d, sc, port, &srcs, &dsts);
        let mut rx = spawn_exe("receiver", &rxa, None, err("recv"), exe)?;
        if let Err(e) = await_listen(port, &mut rx) {
            kill_all(vec![rx]);
            return Err(e);
        }
        let t0 = Instant::now();
        let mut producers = Vec::new();
        if sc.src == End::Pipe {
            for (i, p) in srcs.iter().enumerate() {
                mkfifo(p)?;
                let a = [
                    "bench-peer".to_owned(),
                    "produce".into(),
                    "--bytes".into(),
                    sc.size.to_string(),
                    "--seed".into(),
                    (i + 1).to_string(),
                    "--path".into(),
                    p.display().to_string(),
                ];
                producers.push(spawn("producer", &a, None, err(&format!("produce{i}")))?);
            }
        }
        let tx = match spawn_exe("sender", &txa, None, err("send"), exe) {
            Ok(t) => wait(t),
            Err(e) => {
                kill_all(producers);
                kill_all(vec![rx]);
                return Err(e);
            }
        };
        if !tx.ok {
            // The receiver, producers and consumers may wait for a peer that is gone.
            kill_all(producers);
            kill_all(vec![rx]);
            bail!("sender failed ({}): {}", tx.status, tx.stderr.trim());
        }
        let rx = wait(rx);
        let auxe: Vec<Exit> = producers.into_iter().chain(aux.drain(..)).map(wait).collect();
        let secs = t0.elapsed().as_secs_f64();
        for e in [&rx].into_iter().chain(auxe.iter()) {
            if !e.ok {
                bail!("{} failed ({}): {}", e.role, e.status, e.stderr.trim());
            }
        }
        verify(sc, &dsts, sums, &auxe)?;
        Ok(ProcRep {
            secs,
            cpu: tx.cpu + rx.cpu,
            aux_cpu: auxe.iter().map(|e| e.cpu).sum(),
            csw: tx.csw + rx.csw,
            lat: latency(&tx.stdout),
        })
    })();
    kill_all(aux);
    drop(keep);
    r
}

/// The sender's packet latency p50 and p99 (ns) from its JSON (`end.latency.lat_ns` for the
/// engine, `latency` for the peers).
fn latency(stdout: &str) -> Option<(f64, f64)> {
    let v: Value = serde_json::from_str(stdout.trim()).ok()?;
    let l = if v["end"]["latency"]["lat_ns"].is_object() { &v["end"]["latency"]["lat_ns"] } else { &v["latency"] };
    let p = &l["percentile"];
    Some((p["50.000000"].as_f64()?, p["99.000000"].as_f64()?))
}

/// Every sink got exactly the source's bytes: file sinks are checksummed here; a consumer
/// reports the checksum of what it read.
fn verify(sc: &Scenario, dsts: &[PathBuf], sums: &[u64], aux: &[Exit]) -> Result<()> {
    let consumers: Vec<&Exit> = aux.iter().filter(|e| e.role == "consumer").collect();
    for (i, p) in dsts.iter().enumerate() {
        let (bytes, sum) = match sc.dst {
            End::File => checksum_file(p)?,
            End::Pipe | End::Pty => {
                let e = consumers.get(i).ok_or_else(|| anyhow!("no consumer for device {i}"))?;
                let v: Value = serde_json::from_str(e.stdout.trim()).context("consumer output")?;
                (v["bytes"].as_u64().unwrap_or(0), v["checksum"].as_u64().unwrap_or(0))
            }
        };
        if bytes != sc.size || sum != sums[i] {
            bail!(
                "device {i}: the sink got {} (checksum {sum:#x}), expected {} (checksum {:#x})",
                fmt_bytes(bytes),
                fmt_bytes(sc.size),
                sums[i]
            );
        }
    }
    Ok(())
}

impl ScenarioResult {
    fn find(&self, d: Design) -> Option<&ProcResult> {
        self.results.iter().find(|r| r.design == d)
    }

    /// The targets for this scenario as ratios of medians from this run: file sinks
    /// (throughput >= 1.1x blocking, >= 1.35x QEMU-style, >= 0.9x min-copy; CPU per GiB <=
    /// 0.55x QEMU-style) and pipe sinks (>= 1.0x blocking, >= 1.2x QEMU-style, CPU <= 0.8x).
    pub(super) fn targets(&self) -> Value {
        let Some(u) = self.find(Design::EngineUringSend) else { return json!([]) };
        let file = self.sc.dst == End::File;
        let pipe = self.sc.dst == End::Pipe;
        let mut out = Vec::new();
        let mut t = |what: &str, other: Design, thr: Option<f64>, cpu: Option<f64>| {
            let Some(o) = self.find(other) else { return };
            if let Some(min) = thr {
                let r = u.gibps.median / o.gibps.median;
                out.push(json!({"what": format!("{what} vs {}", other.name()), "metric": "throughput",
                    "ratio": r, "target": format!(">= {min}"), "met": r >= min}));
            }
            if let Some(max) = cpu {
                let r = u.cpu.median / o.cpu.median;
                out.push(json!({"what": format!("{what} vs {}", other.name()), "metric": "cpu_per_gib",
                    "ratio": r, "target": format!("<= {max}"), "met": r <= max}));
            }
        };
        if file {
            t("engine-uring-send", Design::EngineBlocking, Some(1.1), None);
            t("engine-uring-send", Design::QemuStyle, Some(1.35), Some(0.55));
            t("engine-uring-send", Design::MinCopy, Some(0.9), None);
        } else if pipe {
            t("engine-uring-send", Design::EngineBlocking, Some(1.0), None);
            t("engine-uring-send", Design::QemuStyle, Some(1.2), Some(0.8));
        }
        json!(out)
    }

    pub(super) fn json(&self) -> Value {
        let sc = &self.sc;
        json!({
            "scenario": sc.name, "source": sc.src.name(), "sink": sc.dst.name(), "devices": sc.devices,
            "bytes_per_device": sc.size, "channels": sc.channels, "chunk": sc.chunk,
            "results": self.results.iter().map(|r| json!({
                "design": r.design.name(),
                "gib_per_sec": r.gibps.json(),
                "cpu_seconds_per_gib": r.cpu.json(),
                "producer_consumer_cpu_seconds_per_gib": r.aux_cpu.json(),
                "context_switches_per_gib": r.csw.json(),
                "latency_ns": r.p50.zip(r.p99).map(|(a, b)| json!({"p50": a.json(), "p99": b.json()})),
                "reps": r.reps.iter().map(|x| json!({"seconds": x.secs, "cpu_seconds": x.cpu,
                    "producer_consumer_cpu_seconds": x.aux_cpu, "context_switches": x.csw,
                    "latency_ns": x.lat.map(|(a, b)| json!({"p50": a, "p99": b}))})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "targets": self.targets(),
        })
    }

    pub(super) fn markdown(&self, s: &mut String) {
        use std::fmt::Write;
        let sc = &self.sc;
        let _ = writeln!(
            s,
            "\n### {}: {} -> {} x{} device(s) of {}, P={}\n",
            sc.name,
            sc.src.name(),
            sc.dst.name(),
            sc.devices,
            fmt_bytes(sc.size),
            sc.channels
        );
        let _ = writeln!(
            s,
            "| design | GiB/s | CPU s/GiB (sender+receiver) | ctx switches/GiB | p50 | p99 | producer+consumer CPU s/GiB |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        let ms = |x: &Spread| format!("{:.2} [{:.2}..{:.2}] ms", x.median / 1e6, x.min / 1e6, x.max / 1e6);
        for r in &self.results {
            let _ = writeln!(
                s,
                "| {} | {:.2} [{:.2}..{:.2}] | {:.2} [{:.2}..{:.2}] | {:.0} [{:.0}..{:.0}] | {} | {} | {} |",
                r.design.name(),
                r.gibps.median,
                r.gibps.min,
                r.gibps.max,
                r.cpu.median,
                r.cpu.min,
                r.cpu.max,
                r.csw.median,
                r.csw.min,
                r.csw.max,
                r.p50.as_ref().map_or("-".into(), ms),
                r.p99.as_ref().map_or("-".into(), ms),
                if sc.src == End::File && sc.dst == End::File {
                    "-".into()
                } else {
                    format!("{:.2}", r.aux_cpu.median)
                }
            );
        }
        let t = self.targets();
        let ts: Vec<String> = t
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| {
                format!(
                    "{} {} {:.2}x ({}: {})",
                    x["what"].as_str().unwrap_or("?"),
                    x["metric"].as_str().unwrap_or("?"),
                    x["ratio"].as_f64().unwrap_or(f64::NAN),
                    x["target"].as_str().unwrap_or("?"),
                    if x["met"] == json!(true) { "met" } else { "**missed**" }
                )
            })
            .collect();
        if !ts.is_empty() {
            let _ = writeln!(s, "\nTargets: {}.", ts.join("; "));
        }
    }
}
