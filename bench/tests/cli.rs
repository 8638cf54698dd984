//! Runs the built `vfio-multifd` binary: loopback, send/recv between two processes, a
//! `--sink file:` / `--source file:` round trip, probe, and argument errors.

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
    let _ = run(&["send", "--connect", &addr, "-P", "1", "--sim", "1M,2"]);
    let ro = wait(r, Duration::from_secs(60));
    assert!(!ro.status.success(), "{}", text(&ro));
    let err = String::from_utf8_lossy(&ro.stderr);
    assert!(err.contains("differs from the expected"), "{err}");
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
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown unit"), "{}", text(&o));
    let o = run(&["send", "--connect", "127.0.0.1:1", "--sim", "1M", "--idstr", "a/vfio", "--idstr", "b/vfio"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--idstr"), "{}", text(&o));
    let o = run(&["send", "--connect", "127.0.0.1:1", "--sim", "1M", "--connect-timeout", "0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("recv --listen"), "{}", text(&o));
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
