//! Runs the built `vfio-multifd` binary: loopback, send/recv between two processes, a
//! `--sink file:` / `--source file:` round trip, probe, argument errors, and live migrations
//! (pre-copy with dirtying devices and peer DMA, auto and manual switchover, verdicts).

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vfio-multifd");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run vfio-multifd")
}

fn text(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(o)))
}

/// A free loopback port (bound then released; good enough for tests).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn_recv(args: &[&str]) -> Child {
    Command::new(BIN).arg("recv").args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn recv")
}

/// Waits for a child with a deadline, killing it if it hangs.
fn wait(mut c: Child, limit: Duration) -> Output {
    let t = Instant::now();
    loop {
        if c.try_wait().expect("try_wait").is_some() {
            return c.wait_with_output().expect("output");
        }
        if t.elapsed() > limit {
            let _ = c.kill();
            let o = c.wait_with_output().expect("output");
            panic!("recv hung for {limit:?}:\n{}", text(&o));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vfio-multifd-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn loopback_json() {
    let o = run(&["loopback", "--devices", "2", "--size", "6M", "-P", "3", "--chunk", "256K", "-J"]);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    assert_eq!(v["start"]["config"]["channels"], 3);
    assert!(v["intervals"].is_array());
    let end = &v["end"];
    assert_eq!(end["sum"]["bytes"], 12 << 20);
    assert!(end["sum"]["bits_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(end["streams"].as_array().unwrap().len(), 3);
    assert!(end["latency"]["lat_ns"]["percentile"]["99.900000"].as_u64().is_some());
    assert_eq!(end["verified"], true);
    assert_eq!(end["receiver"]["devices"][1]["final_state"], "RUNNING");
    assert!(end["zerocopy"]["copied_bytes"].as_u64().is_some());
}

#[test]
fn loopback_text_blocking_precopy() {
    let o = run(&["loopback", "--devices", "1", "--size", "3M", "-P", "2", "--backend", "blocking", "--precopy"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("backend: blocking"), "{s}");
    assert!(s.contains("GiB/s") && s.contains("Gbit/s") && s.contains("verified"), "{s}");
}

#[test]
fn send_recv_two_processes() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let r = spawn_recv(&["--listen", &addr, "-P", "4", "--sim", "5M", "--sim", "3M,77", "--verify", "-J"]);
    let s = run(&["send", "--connect", &addr, "-P", "4", "--sim", "5M", "--sim", "3M,77", "--chunk", "512K", "-J"]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(s.status.success(), "send: {}", text(&s));
    assert!(ro.status.success(), "recv: {}", text(&ro));
    assert_eq!(json(&s)["end"]["sum"]["bytes"], 8 << 20);
    let rv = json(&ro);
    assert_eq!(rv["end"]["verified_devices"], serde_json::json!([0, 1]));
}

#[test]
fn send_recv_mismatch_fails_with_a_message() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let r = spawn_recv(&["--listen", &addr, "-P", "1", "--sim", "1M,1"]);
    let s = run(&["send", "--connect", &addr, "-P", "1", "--sim", "1M,2"]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(!ro.status.success(), "{}", text(&ro));
    let err = String::from_utf8_lossy(&ro.stderr);
    assert!(err.contains("differs from the expected"), "{err}");
    // The destination's verdict reached the source, which fails too.
    assert!(!s.status.success(), "send succeeded although the destination failed: {}", text(&s));
    let err = String::from_utf8_lossy(&s.stderr);
    assert!(err.contains("destination: device 0000:00:02.0/vfio"), "{err}");
}

#[test]
fn file_sink_and_source_round_trip() {
    let d = tmpdir("files");
    let stream = d.join("dev0.bin");
    let sink = format!("file:{}", stream.display());
    // 1. recv --sink file: from a simulated send.
    let addr = format!("127.0.0.1:{}", free_port());
    let r = spawn_recv(&["--listen", &addr, "-P", "2", "--sink", &sink]);
    let s = run(&["send", "--connect", &addr, "-P", "2", "--sim", "2M,42", "--chunk", "64K"]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(s.status.success(), "send: {}", text(&s));
    assert!(ro.status.success(), "recv: {}", text(&ro));
    assert_eq!(std::fs::metadata(&stream).unwrap().len(), 2 << 20);
    let cfg = std::fs::read(d.join("dev0.bin.config")).unwrap();
    assert_eq!(&cfg[..8], b"VFSIMCF1");
    // 2. send --source file: that stream to a simulated destination that verifies it.
    let addr = format!("127.0.0.1:{}", free_port());
    let r = spawn_recv(&["--listen", &addr, "-P", "3", "--sim", "2M,42", "--verify", "--backend", "blocking"]);
    let s = run(&["send", "--connect", &addr, "-P", "3", "--source", &sink]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(s.status.success(), "send: {}", text(&s));
    assert!(ro.status.success(), "recv: {}", text(&ro));
    assert!(String::from_utf8_lossy(&ro.stdout).contains("verified: 1"), "{}", text(&ro));
    // 3. --sink together with a destination device: saved and loaded.
    let stream2 = d.join("dev1.bin");
    let sink2 = format!("file:{}", stream2.display());
    let addr = format!("127.0.0.1:{}", free_port());
    let r = spawn_recv(&["--listen", &addr, "-P", "2", "--sim", "1M,5", "--sink", &sink2, "--verify"]);
    let s = run(&["send", "--connect", &addr, "-P", "2", "--sim", "1M,5"]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(s.status.success() && ro.status.success(), "{}\n{}", text(&s), text(&ro));
    assert_eq!(std::fs::metadata(&stream2).unwrap().len(), 1 << 20);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn probe_reports_the_host() {
    let o = run(&["probe"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    for want in
        ["kernel:", "io_uring", "RLIMIT_MEMLOCK", "CAP_IPC_LOCK", "huge pages", "VFIO devices", "engine would use"]
    {
        assert!(s.contains(want), "missing {want:?} in:\n{s}");
    }
    let v = json(&run(&["probe", "-J"]));
    assert!(v["io_uring"]["available"].is_boolean());
    assert!(v["vfio_devices"].is_array());
    assert!(v["engine_choice"]["backend"].is_string());
}

#[test]
fn bad_arguments_say_what_to_do() {
    let o = run(&["loopback", "--size", "12Q"]);
    assert_eq!(o.status.code(), Some(2), "the parser's refusal exits 2 (README): {}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown unit"), "{}", text(&o));
    let o = run(&["send", "--connect", "127.0.0.1:1", "--sim", "1M", "--idstr", "a/vfio", "--idstr", "b/vfio"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--idstr"), "{}", text(&o));
    let o = run(&["send", "--connect", "127.0.0.1:1", "--sim", "1M", "--connect-timeout", "0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("recv --listen"), "{}", text(&o));
    // A fractional timeout is reported as given, not rounded down to whole seconds.
    let o = run(&["send", "--connect", "127.0.0.1:1", "--sim", "1M", "--connect-timeout", "300ms"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("retried for 300ms"), "{}", text(&o));
    // A negative timeout is a value out of range, not an unknown flag "-1".
    for flag in ["--stall-timeout", "--connect-timeout"] {
        let o = run(&["send", "--connect", "127.0.0.1:1", "--sim", "1M", flag, "-1"]);
        assert_eq!(o.status.code(), Some(2), "{flag} -1: {}", text(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains("out of range"), "{flag} -1: {}", text(&o));
    }
    let o = run(&["recv", "--listen", "127.0.0.1:1", "--sim", "1M", "--accept-timeout", "-1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("out of range"), "--accept-timeout -1: {}", text(&o));
    let o = run(&["dev", "state", "/nonexistent/device"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("probe"), "{}", text(&o));
}

/// Runs the binary with a seccomp filter that makes `io_uring_setup` fail with EPERM, as a
/// container runtime's default profile does.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn run_without_io_uring(args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    // SAFETY: the closure runs in the forked child before exec and only makes two prctl calls on
    // data that lives on its own stack: async-signal-safe, no allocation.
    unsafe {
        cmd.pre_exec(|| {
            const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
            let stmt = |code: u16, k: u32| libc::sock_filter { code, jt: 0, jf: 0, k };
            let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter { code: 0x05 | 0x10, jt, jf, k };
            let filter = [
                stmt(0x20, 4), // ld [arch]
                jeq(AUDIT_ARCH_X86_64, 1, 0),
                stmt(0x06, libc::SECCOMP_RET_ALLOW),
                stmt(0x20, 0), // ld [nr]
                jeq(libc::SYS_io_uring_setup as u32, 0, 1),
                stmt(0x06, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
                stmt(0x06, libc::SECCOMP_RET_ALLOW),
            ];
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run vfio-multifd under seccomp")
}

/// Without io_uring (seccomp), `auto` falls back to the blocking backend, says why, and still
/// migrates every byte; forcing io_uring fails with that reason.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[test]
fn falls_back_to_blocking_when_seccomp_blocks_io_uring() {
    let o = run_without_io_uring(&["loopback", "--devices", "1", "--size", "4M", "-P", "2", "-J"]);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    let end = &v["end"];
    assert_eq!(end["verified"], true);
    let all = v.to_string();
    assert!(all.contains("\"blocking\""), "backend not blocking: {all}");
    assert!(all.contains("seccomp"), "no reason given: {all}");
    let o = run_without_io_uring(&["loopback", "--devices", "1", "--size", "4M", "--backend", "uring"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("io_uring backend unavailable") && t.contains("EPERM"), "{t}");
}

/// The keys of `end.switchover` every live run reports.
fn check_switchover_keys(sw: &serde_json::Value) {
    for k in ["downtime_ms", "precopy_bytes", "switchover_bytes", "precopy_rounds"] {
        assert!(sw[k].is_number(), "end.switchover.{k} missing: {sw}");
    }
    assert!(sw["acked"].is_boolean(), "{sw}");
    assert!(sw["verdict"].is_string(), "{sw}");
    assert!(sw["downtime_measured_to"].is_string(), "{sw}");
    assert!(sw["trigger"].is_string(), "{sw}");
}

#[test]
fn loopback_live_precopy_with_dirtying_devices_converges() {
    let o = run(&[
        "loopback",
        "--devices",
        "3",
        "--size",
        "8MiB",
        "-P",
        "2",
        "--chunk",
        "256K",
        "--precopy",
        "--dirty-rate",
        "8MiB",
        "--switchover",
        "auto",
        "-J",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    let end = &v["end"];
    let sw = &end["switchover"];
    check_switchover_keys(sw);
    assert_eq!(sw["mode"], "precopy", "{sw}");
    assert_eq!(sw["trigger"], "converged", "{sw}");
    assert_eq!(sw["acked"], true, "{sw}");
    assert_eq!(sw["verdict"], "loaded", "{sw}");
    assert_eq!(sw["downtime_measured_to"], "destination_running", "{sw}");
    let pre = sw["precopy_bytes"].as_u64().unwrap();
    let post = sw["switchover_bytes"].as_u64().unwrap();
    assert!(pre >= 3 * (8 << 20), "the whole image goes in pre-copy: {sw}");
    assert!(pre > post, "{sw}");
    assert!(sw["downtime_ms"].as_f64().unwrap() > 0.0, "{sw}");
    assert_eq!(sw["devices"].as_array().unwrap().len(), 3);
    assert_eq!(end["verified"], true);
    assert_eq!(end["state_digests_verified"], true);
    assert_eq!(v["start"]["config"]["dirty_rate_bytes_per_sec"], 8 << 20);
}

#[test]
fn loopback_live_with_peer_dma_loses_nothing() {
    let o = run(&[
        "loopback",
        "--devices",
        "3",
        "--size",
        "4MiB",
        "-P",
        "2",
        "--chunk",
        "256K",
        "--precopy",
        "--dirty-rate",
        "4MiB",
        "--peer-dma",
        "--backend",
        "blocking",
        "-J",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v = json(&o);
    let f = &v["end"]["fabric"];
    assert_eq!(f["violations"], 0, "{f}");
    assert_eq!(f["guest_writes_lost"], 0, "{f}");
    assert_eq!(f["dma_lost"], 0, "{f}");
    assert!(f["guest_writes_landed"].as_u64().unwrap() > 0, "the guest wrote while pre-copy ran: {f}");
    assert_eq!(v["end"]["state_digests_verified"], true);
    assert_eq!(v["end"]["switchover"]["verdict"], "loaded");
    // In words, too.
    let o = run(&["loopback", "--devices", "2", "--size", "2MiB", "-P", "2", "--precopy", "--peer-dma"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("no ordering violation") && s.contains("downtime:") && s.contains("verdict: loaded"), "{s}");
}

/// Spawns a `loopback --switchover manual` with stdin piped and waits for its notice on stderr.
fn spawn_manual(extra: &[&str]) -> (Child, std::io::BufReader<std::process::ChildStderr>) {
    let mut c = Command::new(BIN)
        .args(["loopback", "--devices", "2", "--size", "2MiB", "-P", "2", "--precopy", "--switchover", "manual"])
        .args(["--max-precopy", "15s", "-J"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn loopback");
    let mut err = std::io::BufReader::new(c.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("SIGUSR1") && line.contains("stdin"), "no manual-switchover notice: {line:?}");
    (c, err)
}

/// What is left of a child's stderr (for failure messages).
fn rest(err: &mut impl std::io::Read) -> String {
    let mut s = String::new();
    let _ = err.read_to_string(&mut s);
    s
}

#[test]
fn loopback_manual_switchover_on_a_line_or_sigusr1() {
    // A line on stdin, after two console commands that are not switchovers (no --device
    // here: the region write names what is wrong and pre-copy goes on).
    let (mut c, mut err) = spawn_manual(&[]);
    c.stdin.as_mut().unwrap().write_all(b"region-write 0 0 0 41\nregion-write 0\ngo\n").unwrap();
    let o = wait(c, Duration::from_secs(20));
    let e = rest(&mut err);
    assert!(o.status.success(), "{}{e}", text(&o));
    assert!(e.contains("no --device at position 0"), "{e}");
    assert!(e.contains("expected `region-write N REGION OFFSET HEX`"), "{e}");
    let sw = &json(&o)["end"]["switchover"];
    check_switchover_keys(sw);
    assert_eq!(sw["trigger"], "stdin", "{sw}");
    assert_eq!(sw["verdict"], "loaded", "{sw}");
    // SIGUSR1, stdin left open and silent; pre-copy runs until the signal.
    let (c, mut err) = spawn_manual(&["--dirty-rate", "1MiB"]);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) with a child's pid and a valid signal number touches no memory.
    assert_eq!(unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGUSR1) }, 0);
    let o = wait(c, Duration::from_secs(20));
    assert!(o.status.success(), "{}{}", text(&o), rest(&mut err));
    let sw = &json(&o)["end"]["switchover"];
    assert_eq!(sw["trigger"], "sigusr1", "{sw}");
    assert!(sw["precopy_seconds"].as_f64().unwrap() > 0.1, "pre-copy ran until the signal: {sw}");
    assert_eq!(json(&o)["end"]["state_digests_verified"], true);
}

#[test]
fn send_recv_live_reports_the_destination_verdict() {
    let addr = format!("127.0.0.1:{}", free_port());
    let r = spawn_recv(&["--listen", &addr, "-P", "3", "--sim", "5M", "--sim", "3M,77", "--verify", "-J"]);
    // Plain simulated devices stream 64 KiB in pre-copy and keep a full stop-copy estimate, so
    // a generous limit lets `auto` converge once the initial data is acknowledged.
    let s = run(&[
        "send",
        "--connect",
        &addr,
        "-P",
        "3",
        "--sim",
        "5M",
        "--sim",
        "3M,77",
        "--precopy",
        "--downtime-limit",
        "60s",
        "--max-precopy",
        "10s",
        "-J",
    ]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(s.status.success(), "send: {}", text(&s));
    assert!(ro.status.success(), "recv: {}", text(&ro));
    let v = json(&s);
    let sw = &v["end"]["switchover"];
    check_switchover_keys(sw);
    assert_eq!(sw["verdict"], "loaded", "{sw}");
    assert_eq!(sw["acked"], true, "{sw}");
    assert_eq!(sw["return_path"], true, "{sw}");
    assert_eq!(sw["downtime_measured_to"], "destination_verdict", "{sw}");
    assert_eq!(sw["precopy_bytes"], 2 * (64 << 10), "{sw}");
    assert_eq!(v["end"]["sum"]["bytes"], 8 << 20);
    assert_eq!(json(&ro)["end"]["verified_devices"], serde_json::json!([0, 1]));
}

#[test]
fn send_without_return_path_succeeds_without_a_verdict() {
    // The source does not offer it: QEMU-exact wire.
    let addr = format!("127.0.0.1:{}", free_port());
    let r = spawn_recv(&["--listen", &addr, "-P", "2", "--sim", "2M", "--verify"]);
    let s = run(&["send", "--connect", &addr, "-P", "2", "--sim", "2M", "--no-return-path"]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(s.status.success(), "send: {}", text(&s));
    assert!(ro.status.success(), "recv: {}", text(&ro));
    let out = String::from_utf8_lossy(&s.stdout);
    assert!(out.contains("the destination gave no verdict"), "{out}");
    // The destination declines the offer.
    let addr = format!("127.0.0.1:{}", free_port());
    let r = spawn_recv(&["--listen", &addr, "-P", "2", "--sim", "2M", "--verify", "--no-return-path"]);
    let s = run(&["send", "--connect", &addr, "-P", "2", "--sim", "2M", "--precopy", "--downtime-limit", "60s", "-J"]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(s.status.success(), "send: {}", text(&s));
    assert!(ro.status.success(), "recv: {}", text(&ro));
    let sw = &json(&s)["end"]["switchover"];
    assert_eq!(sw["verdict"], "none", "{sw}");
    assert_eq!(sw["return_path"], false, "{sw}");
    assert_eq!(sw["acked"], false, "{sw}");
    assert_eq!(sw["downtime_measured_to"], "source_done", "{sw}");
    // Without a return path, "converged" counts initial data sent, not acknowledged.
    assert_eq!(sw["trigger"], "converged", "{sw}");
}

/// SIGINT and SIGTERM abort the transfer through the library: the command says it was
/// interrupted and exits 128 + the signal, after the engine wound the transfer down.
#[test]
fn interrupted_transfer_exits_with_the_signal() {
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let c = Command::new(BIN)
            .args(["loopback", "--size", "8GiB"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn loopback");
        std::thread::sleep(Duration::from_millis(800));
        // SAFETY: kill(2) with a child's pid and a valid signal number touches no memory.
        assert_eq!(unsafe { libc::kill(c.id() as libc::pid_t, sig) }, 0);
        let t0 = Instant::now();
        let out = c.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{err}");
        assert!(err.contains("interrupted by SIG"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10), "took {:?} to stop", t0.elapsed());
    }
}

/// A signal while `send` still retries its connection (nothing listens): the command says it
/// was interrupted before any transfer ran and exits 128 + the signal, at once.
#[test]
fn interrupted_while_connecting_says_so() {
    let port = free_port();
    let c = Command::new(BIN)
        .args(["send", "--connect", &format!("127.0.0.1:{port}"), "--sim", "1M", "--connect-timeout", "30s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn send");
    std::thread::sleep(Duration::from_millis(500));
    signal(&c, libc::SIGINT);
    let t0 = Instant::now();
    let out = c.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted by SIGINT while no transfer was running"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?} to stop", t0.elapsed());
}

/// Impossible receiver settings are refused before the port is bound (the port here is held by
/// the test, so a late check would fail on the bind instead), and impossible sender settings
/// before anything connects (nothing listens here: a late check would retry for 10 s).
#[test]
fn impossible_settings_are_refused_before_bind_or_connect() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let many_sims: Vec<&str> = std::iter::repeat_n(["--sim", "4K"], 65).flatten().collect();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-P", "64", "--max-packet", "64M", "--sim", "1M"], "registered-buffer limit"),
        (vec!["--budget", "2G", "--sim", "1M"], "registered-buffer limit"),
        (vec!["--stall-timeout", "0", "--sim", "1M"], "stall timeout"),
        (many_sims, "65 devices"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["recv", "--listen", &addr];
        args.extend(extra.iter().copied());
        let o = run(&args);
        assert!(!o.status.success(), "{args:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("invalid receiver settings") && err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("listening on"), "{args:?}: checked after the bind: {err}");
    }
    drop(held);
    let port = free_port();
    let t = Instant::now();
    let o = run(&["send", "--connect", &format!("127.0.0.1:{port}"), "--sim", "1M", "--stall-timeout", "0"]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("invalid sender settings") && err.contains("stall timeout"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5), "send retried connecting before checking: {:?}", t.elapsed());
}

/// A source whose chunks exceed the receiver's --max-packet: the receiver says which flag to
/// raise, and, with only simulated devices, gives no device-reset advice.
#[test]
fn chunk_above_max_packet_gets_a_hint_and_no_reset_advice_for_sims() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let r = spawn_recv(&["--listen", &addr, "-P", "2", "--sim", "4M", "--max-packet", "64K", "--stall-timeout", "5"]);
    let s = run(&["send", "--connect", &addr, "-P", "2", "--sim", "4M", "--chunk", "1M", "--stall-timeout", "5"]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(!ro.status.success(), "{}", text(&ro));
    assert!(!s.status.success(), "send succeeded although the destination failed: {}", text(&s));
    let err = String::from_utf8_lossy(&ro.stderr);
    assert!(err.contains("raise --max-packet to at least 1.00 MiB"), "{err}");
    assert!(!err.contains("dev reset"), "no real device was used: {err}");
}

/// A packet header whose size field is corrupt (near 4 GiB): `recv` says the stream is corrupt
/// or the peer is not a source, not to raise --max-packet to 4 GiB.
#[test]
fn corrupt_packet_size_is_called_corrupt() {
    use vfio_multifd::wire::{encode_packet_header, InitPacket, VfioPacketHeader, INIT_PACKET_LEN, PACKET_OVERHEAD};
    let addr = format!("127.0.0.1:{}", free_port());
    let r = spawn_recv(&["--listen", &addr, "-P", "1", "--sim", "1M", "--stall-timeout", "10"]);
    let t = Instant::now();
    let mut s = loop {
        match std::net::TcpStream::connect(&addr) {
            Ok(s) => break s,
            Err(e) if t.elapsed() > Duration::from_secs(20) => panic!("connect: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut init = [0u8; INIT_PACKET_LEN];
    InitPacket { uuid: [0; 16], id: 0, offer: 0, devices: 0 }.encode(&mut init).unwrap();
    let id = vfio_multifd::DeviceId::new("0000:00:02.0/vfio", 0).unwrap();
    let mut hdr = vec![0u8; PACKET_OVERHEAD];
    encode_packet_header(&id, VfioPacketHeader { idx: 0, flags: 0 }, 4096, &mut hdr).unwrap();
    hdr[272..276].copy_from_slice(&0xfff0_0000u32.to_be_bytes()); // next_packet_size
    s.write_all(&init).unwrap();
    s.write_all(&hdr).unwrap();
    let ro = wait(r, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&ro.stderr);
    assert!(!ro.status.success(), "{err}");
    assert!(err.contains("the stream is corrupt") && !err.contains("raise --max-packet"), "{err}");
}

/// A hand-driven source that sends a whole stream of one device, one more packet, and leaves
/// its channels open (as QEMU does): `recv --sink` succeeds, writes the stream and its config,
/// and warns about the extra packet.
#[test]
fn sink_is_complete_when_channels_stay_open_after_the_last_packet() {
    use vfio_multifd::wire::{encode_packet_header, InitPacket, VfioPacketHeader, INIT_PACKET_LEN, PACKET_OVERHEAD};
    let d = tmpdir("open-channels");
    let sink = d.join("dev0.bin");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let sink_arg = format!("file:{}", sink.display());
    let r = spawn_recv(&["--listen", &addr, "-P", "2", "--sink", &sink_arg, "--stall-timeout", "30"]);
    let connect = || {
        let t = Instant::now();
        loop {
            match std::net::TcpStream::connect(&addr) {
                Ok(s) => return s,
                Err(e) if t.elapsed() > Duration::from_secs(20) => panic!("connect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    };
    let id = vfio_multifd::DeviceId::new("0000:00:02.0/vfio", 0).unwrap();
    let packet = |idx: u32, config: bool, data: &[u8]| {
        let mut b = vec![0u8; PACKET_OVERHEAD];
        encode_packet_header(&id, VfioPacketHeader { idx, flags: u32::from(config) }, data.len(), &mut b).unwrap();
        b.extend_from_slice(data);
        b
    };
    let mut chans = Vec::new();
    for c in 0..2u8 {
        let mut s = connect();
        let mut init = [0u8; INIT_PACKET_LEN];
        InitPacket { uuid: [0; 16], id: c, offer: 0, devices: 0 }.encode(&mut init).unwrap();
        s.write_all(&init).unwrap();
        chans.push(s);
    }
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    for idx in 0..3u32 {
        let data = vec![idx as u8 + 1; 4096];
        want.extend_from_slice(&data);
        bytes.extend(packet(idx, false, &data));
    }
    bytes.extend(packet(3, true, b"config blob"));
    bytes.extend(packet(4, false, &[9; 16]));
    chans[0].write_all(&bytes).unwrap();
    let ro = wait(r, Duration::from_secs(15));
    drop(chans);
    assert!(ro.status.success(), "{}", text(&ro));
    assert_eq!(std::fs::read(&sink).unwrap(), want);
    let mut cp = sink.as_os_str().to_owned();
    cp.push(".config");
    assert_eq!(std::fs::read(&cp).unwrap(), b"config blob");
    let err = String::from_utf8_lossy(&ro.stderr);
    assert!(err.contains("warning:") && err.contains("ignored"), "{err}");
}

/// `send -P 4` to `recv -P 2`: the receiver fails naming the channel counts, and the sender
/// does not report success.
#[test]
fn channel_count_mismatch_fails_on_both_sides() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let r = spawn_recv(&["--listen", &addr, "-P", "2", "--sim", "8M", "--stall-timeout", "10"]);
    let s = run(&["send", "--connect", &addr, "-P", "4", "--sim", "8M", "--stall-timeout", "10"]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(!ro.status.success(), "{}", text(&ro));
    let err = String::from_utf8_lossy(&ro.stderr);
    assert!(err.contains("but this receiver expects 2 channel(s)") && err.contains("same channel count"), "{err}");
    assert!(!s.status.success(), "send succeeded against a receiver with fewer channels: {}", text(&s));
}

/// Sends `kill(pid, sig)`.
fn signal(c: &Child, sig: i32) {
    // SAFETY: kill(2) with a child's pid and a valid signal number touches no memory.
    assert_eq!(unsafe { libc::kill(c.id() as libc::pid_t, sig) }, 0);
}

/// The names in `d`, sorted.
fn names(d: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// A good save of a 1 MiB simulated device at `stream` (and `stream.config`).
fn good_save(stream: &std::path::Path) {
    let addr = format!("127.0.0.1:{}", free_port());
    let sink = format!("file:{}", stream.display());
    let r = spawn_recv(&["--listen", &addr, "-P", "2", "--sink", &sink]);
    let s = run(&["send", "--connect", &addr, "-P", "2", "--sim", "1M,9", "--chunk", "64K"]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(s.status.success() && ro.status.success(), "{}\n{}", text(&s), text(&ro));
}

/// A failed or interrupted receive never touches a previous save and leaves no partial file:
/// the stream is written under a temporary name and renamed with its config only on success.
#[test]
fn fault_sink_failure_keeps_the_previous_save_and_leaves_no_partial_file() {
    let d = tmpdir("sinkfail");
    let stream = d.join("dev0.bin");
    good_save(&stream);
    let (old, old_cfg) = (std::fs::read(&stream).unwrap(), std::fs::read(d.join("dev0.bin.config")).unwrap());
    let sink = format!("file:{}", stream.display());
    for backend in ["uring", "blocking"] {
        // 1. No sender: the accept timeout fails the receive.
        let addr = format!("127.0.0.1:{}", free_port());
        let o = run(&[
            "recv",
            "--listen",
            &addr,
            "-P",
            "2",
            "--sink",
            &sink,
            "--accept-timeout",
            "1",
            "--backend",
            backend,
        ]);
        assert_eq!(o.status.code(), Some(1), "{backend}: {}", text(&o));
        // 2. Interrupted mid-stream (SIGINT): "interrupted", exit 130, partial output removed.
        let addr = format!("127.0.0.1:{}", free_port());
        let r = spawn_recv(&["--listen", &addr, "-P", "2", "--sink", &sink, "--backend", backend]);
        let mut s = Command::new(BIN)
            .args(["send", "--connect", &addr, "-P", "2", "--sim", "64G", "--chunk", "1M"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until data is flowing into the temporary file.
        let t0 = Instant::now();
        let flowing = || {
            names(&d).iter().any(|n| n.contains(".partial-") && std::fs::metadata(d.join(n)).is_ok_and(|m| m.len() > 0))
        };
        while !flowing() && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        signal(&r, libc::SIGINT);
        let ro = wait(r, Duration::from_secs(20));
        let _ = s.kill();
        let _ = s.wait();
        let err = String::from_utf8_lossy(&ro.stderr);
        assert_eq!(ro.status.code(), Some(130), "{backend}: {}", text(&ro));
        assert!(err.contains("interrupted by SIGINT"), "{backend}: {err}");
        assert_eq!(names(&d), ["dev0.bin", "dev0.bin.config"], "{backend}: partial output left behind");
        assert!(std::fs::read(&stream).unwrap() == old, "{backend}: the previous save was changed");
        assert_eq!(std::fs::read(d.join("dev0.bin.config")).unwrap(), old_cfg, "{backend}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// `send --source file:P` needs `P.config` unless `--no-config` says to send an empty one.
#[test]
fn fault_source_without_its_config_is_refused_unless_asked() {
    let d = tmpdir("nocfg");
    let stream = d.join("dev0.bin");
    std::fs::write(&stream, vec![1u8; 100_000]).unwrap();
    let src = format!("file:{}", stream.display());
    let addr = format!("127.0.0.1:{}", free_port());
    let o = run(&["send", "--connect", &addr, "--source", &src]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(err.contains("dev0.bin.config") && err.contains("--no-config"), "{err}");
    // With --no-config: sent with an empty config, saved on the other side with an empty config.
    let out = d.join("copy.bin");
    let sink = format!("file:{}", out.display());
    let r = spawn_recv(&["--listen", &addr, "-P", "2", "--sink", &sink]);
    let s = run(&["send", "--connect", &addr, "-P", "2", "--source", &src, "--no-config"]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(s.status.success() && ro.status.success(), "{}\n{}", text(&s), text(&ro));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&stream).unwrap());
    assert_eq!(std::fs::read(d.join("copy.bin.config")).unwrap(), b"");
    let _ = std::fs::remove_dir_all(&d);
}

fn mkfifo(p: &std::path::Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// A `--sink` FIFO without a reader fails before the port listens, within --accept-timeout.
#[test]
fn fault_sink_fifo_without_a_reader_fails_before_listening() {
    let d = tmpdir("fifo");
    let fifo = d.join("pipe");
    mkfifo(&fifo);
    let addr = format!("127.0.0.1:{}", free_port());
    let sink = format!("file:{}", fifo.display());
    let t0 = Instant::now();
    let r = spawn_recv(&["--listen", &addr, "-P", "1", "--sink", &sink, "--accept-timeout", "2"]);
    std::thread::sleep(Duration::from_millis(700));
    assert!(std::net::TcpStream::connect(&addr).is_err(), "the port listens although the sink cannot be written");
    let o = wait(r, Duration::from_secs(10));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(err.contains("FIFO") && err.contains("reading"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(6), "took {:?}", t0.elapsed());
    let _ = std::fs::remove_dir_all(&d);
}

/// A `--sink` FIFO whose reader stops reading: the receive fails at the stall timeout on both
/// backends instead of blocking in write(2) forever.
#[test]
fn fault_sink_fifo_whose_reader_stops_fails_at_the_stall_timeout() {
    let d = tmpdir("fifostall");
    let fifo = d.join("pipe");
    mkfifo(&fifo);
    let sink = format!("file:{}", fifo.display());
    for backend in ["uring", "blocking"] {
        // A reader that opens the FIFO and never reads.
        let f2 = fifo.clone();
        let reader = std::thread::spawn(move || std::fs::File::open(f2).unwrap());
        let addr = format!("127.0.0.1:{}", free_port());
        let t0 = Instant::now();
        let r =
            spawn_recv(&["--listen", &addr, "-P", "2", "--sink", &sink, "--stall-timeout", "2", "--backend", backend]);
        let held = reader.join().unwrap();
        let s = Command::new(BIN)
            .args(["send", "--connect", &addr, "-P", "2", "--sim", "64M", "--stall-timeout", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let ro = wait(r, Duration::from_secs(20));
        let took = t0.elapsed();
        let so = wait(s, Duration::from_secs(40));
        drop(held);
        let err = String::from_utf8_lossy(&ro.stderr);
        assert_eq!(ro.status.code(), Some(1), "{backend}: {}", text(&ro));
        assert!(err.contains("timed out after 2s"), "{backend}: {err}");
        assert!(err.contains("its write of packet 0 to its data fd has not finished"), "{backend}: {err}");
        assert!(took < Duration::from_secs(12), "{backend}: took {took:?}");
        assert!(!so.status.success(), "{backend}: the sender succeeded: {}", text(&so));
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// The command's own output errors (stdout closed, a full disk) are reported, never a panic.
#[test]
fn fault_closed_or_full_stdout_is_an_error_not_a_panic() {
    for args in [&["probe"][..], &["loopback", "--size", "2M", "-P", "1"]] {
        let full = Command::new(BIN)
            .args(args)
            .stdout(std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap())
            .output()
            .unwrap();
        let mut c = Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(c.stdout.take()); // the reader is gone: EPIPE
        let closed = c.wait_with_output().unwrap();
        for (what, o) in [("/dev/full", full), ("closed pipe", closed)] {
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{args:?} {what}: {err}");
            assert!(!err.contains("panicked"), "{args:?} {what}: {err}");
            assert!(err.contains("writing the report to standard output"), "{args:?} {what}: {err}");
        }
    }
}

/// Under an ordinary 8 MiB RLIMIT_MEMLOCK without CAP_IPC_LOCK (`prlimit`, `setpriv`), a pool
/// that cannot be pinned makes `--zerocopy auto` and `off` fall back to unregistered buffers
/// and copying sends; only `--zerocopy on` fails, saying what to change.
#[test]
fn fault_zero_copy_under_an_ordinary_memlock_limit_falls_back_unless_on() {
    let tools = ["prlimit", "setpriv"].iter().all(|t| Command::new(t).arg("--version").output().is_ok());
    if !tools {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "prlimit and setpriv (util-linux) are needed under CI");
        eprintln!("skipped: prlimit or setpriv (util-linux) missing");
        return;
    }
    let uring = run(&["probe", "-J"]);
    if json(&uring)["io_uring"]["available"] != true {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "io_uring unavailable under CI=true");
        eprintln!("skipped: io_uring unavailable here; nothing is pinned on the blocking backend");
        return;
    }
    for (z, ok) in [("auto", true), ("off", true), ("on", false)] {
        let o = Command::new("prlimit")
            .args(["--memlock=8388608", "setpriv", "--inh-caps", "-ipc_lock", "--bounding-set", "-ipc_lock", BIN])
            .args(["loopback", "--size", "32M", "--chunk", "4M", "-P", "2", "--backend", "uring", "--zerocopy", z])
            .output()
            .unwrap();
        assert_eq!(o.status.success(), ok, "--zerocopy {z}: {}", text(&o));
        if ok {
            assert!(String::from_utf8_lossy(&o.stdout).contains("zero-copy: off (SEND)"), "{z}: {}", text(&o));
        } else {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("IORING_REGISTER_BUFFERS") && err.contains("RLIMIT_MEMLOCK"), "{err}");
        }
    }
}

/// SIGTERM to a `send` mid-stream on either backend: the engine aborts, the command says it
/// was interrupted and exits 143; the receiver fails instead of loading a partial stream.
#[test]
fn fault_send_interrupted_by_sigterm_on_both_backends() {
    for backend in ["uring", "blocking"] {
        let addr = format!("127.0.0.1:{}", free_port());
        let r = spawn_recv(&["--listen", &addr, "-P", "2", "--sim", "64G", "--backend", backend]);
        let s = Command::new(BIN)
            .args(["send", "--connect", &addr, "-P", "2", "--sim", "64G", "--backend", backend])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        signal(&s, libc::SIGTERM);
        let so = wait(s, Duration::from_secs(20));
        let ro = wait(r, Duration::from_secs(80));
        let err = String::from_utf8_lossy(&so.stderr);
        assert_eq!(so.status.code(), Some(143), "{backend}: {}", text(&so));
        assert!(err.contains("interrupted by SIGTERM") && !err.contains("panicked"), "{backend}: {err}");
        assert_eq!(ro.status.code(), Some(1), "{backend}: the receiver did not fail: {}", text(&ro));
    }
}

/// `send` to a destination that confirms every device loaded, reads the commit, and then never
/// closes: the send succeeds after the short close wait (2 s, not `--stall-timeout`), warns,
/// and the downtime it reports ends with the verdicts, without that wait.
#[test]
fn send_to_a_destination_that_never_closes_reports_the_downtime_without_the_wait() {
    use std::io::Read;
    use vfio_multifd::wire::{EXT_COMMIT, EXT_RETURN_PATH, PACKET_OVERHEAD};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.read_exact(&mut [0u8; 64]).unwrap();
        s.write_all(&[0, 1, 0, 2, 1, EXT_RETURN_PATH | EXT_COMMIT]).unwrap();
        loop {
            let mut h = [0u8; PACKET_OVERHEAD];
            s.read_exact(&mut h).unwrap();
            let size = u32::from_be_bytes(h[272..276].try_into().unwrap()) as usize;
            s.read_exact(&mut vec![0u8; size - 12]).unwrap();
            if u32::from_be_bytes(h[284..288].try_into().unwrap()) & 1 != 0 {
                break;
            }
        }
        let idstr = b"0000:00:02.0/vfio";
        let mut v = vec![0, 0, 0, 0, idstr.len() as u8];
        v.extend_from_slice(idstr);
        v.extend_from_slice(&[0, 0, 0]);
        let mut frames = vec![0, 3, 0, v.len() as u8];
        frames.extend(v);
        frames.extend_from_slice(&[0, 4, 0, 1, 0]);
        s.write_all(&frames).unwrap();
        assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0, "the commit: channel 0's FIN");
        let _ = done_rx.recv_timeout(Duration::from_secs(30));
    });
    let t0 = Instant::now();
    let o = run(&["send", "--connect", &addr, "-P", "1", "--sim", "1M", "--stall-timeout", "6", "-J"]);
    let took = t0.elapsed();
    done_tx.send(()).unwrap();
    peer.join().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(took < Duration::from_secs(5), "bounded by the close wait, not --stall-timeout 6: {took:?}");
    let v = json(&o);
    let sw = &v["end"]["switchover"];
    assert_eq!(sw["verdict"], "loaded", "{sw}");
    assert_eq!(sw["downtime_measured_to"], "destination_verdict", "{sw}");
    let downtime = sw["downtime_ms"].as_f64().unwrap();
    assert!(downtime < 1500.0, "the downtime ends with the verdicts, not the close wait: {downtime} ms");
    let warned = v["end"]["source_warnings"].as_array().unwrap();
    assert!(warned.iter().any(|w| w.as_str().unwrap().contains("did not close")), "{v}");
}

/// `send` with one device to a `recv` expecting two (and the reverse): both commands fail at
/// once, far below `--stall-timeout`, the receiver naming both counts and what to do, the
/// source carrying the destination's words.
#[test]
fn send_recv_device_count_mismatch_fails_fast_on_both_sides() {
    for (send_sims, recv_sims) in [(1, 2), (2, 1)] {
        let addr = format!("127.0.0.1:{}", free_port());
        let sims = |n: usize| (0..n).flat_map(|_| ["--sim", "1M"]).collect::<Vec<_>>();
        let mut rargs = vec!["--listen", addr.as_str(), "-P", "2", "--stall-timeout", "30"];
        rargs.extend(sims(recv_sims));
        let t0 = Instant::now();
        let r = spawn_recv(&rargs);
        let mut sargs = vec!["send", "--connect", addr.as_str(), "-P", "2", "--stall-timeout", "30"];
        sargs.extend(sims(send_sims));
        let s = run(&sargs);
        let ro = wait(r, Duration::from_secs(40));
        let took = t0.elapsed();
        assert!(!s.status.success() && !ro.status.success(), "both fail:\n{}\n{}", text(&s), text(&ro));
        assert!(took < Duration::from_secs(10), "not the stall timeout (30 s): {took:?}");
        let want = format!("the source migrates {send_sims} device(s), but this destination expects {recv_sims}");
        let (serr, rerr) = (String::from_utf8_lossy(&s.stderr), String::from_utf8_lossy(&ro.stderr));
        assert!(rerr.contains(&want) && rerr.contains("same devices"), "recv: {rerr}");
        assert!(serr.contains(&want), "send: {serr}");
    }
}
