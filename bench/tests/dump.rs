//! `vfio-multifd dump` on synthetic captures laid out as QEMU 10 writes them (the real thing
//! runs in the VM test's qemu-interop case), and `vfio-multifd tee` relaying and recording.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vfio_multifd::wire::{encode_packet_header, DeviceId, InitPacket, VfioPacketHeader, PACKET_OVERHEAD};

const BIN: &str = env!("CARGO_BIN_EXE_vfio-multifd");
const IDSTR: &str = "0000:00:01.0/vfio";

fn text(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vfio-multifd-dump-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn init(id: u8) -> Vec<u8> {
    let mut b = vec![0u8; 64];
    InitPacket { uuid: [0; 16], id, offer: 0, devices: 0 }.encode(&mut b).unwrap();
    b
}

/// A RAM packet (`MultiFDPacket_t`, 128 page slots): `normal` pages of data, `zero` zero pages.
fn ram(flags: u32, normal: u32, zero: u32, num: u64) -> Vec<u8> {
    let mut b = vec![0u8; 320 + 8 * 128];
    b[0..4].copy_from_slice(&0x1122_3344u32.to_be_bytes());
    b[4..8].copy_from_slice(&1u32.to_be_bytes());
    b[8..12].copy_from_slice(&flags.to_be_bytes());
    if normal + zero > 0 {
        b[12..16].copy_from_slice(&128u32.to_be_bytes());
        b[64..70].copy_from_slice(b"pc.ram");
    }
    b[16..20].copy_from_slice(&normal.to_be_bytes());
    b[20..24].copy_from_slice(&(normal * 4096).to_be_bytes());
    b[24..32].copy_from_slice(&num.to_be_bytes());
    b[32..36].copy_from_slice(&zero.to_be_bytes());
    for i in 0..(normal + zero) as usize {
        b[320 + 8 * i..328 + 8 * i].copy_from_slice(&(i as u64 * 4096).to_be_bytes());
    }
    b.extend(std::iter::repeat_n(0xab, normal as usize * 4096));
    b
}

fn dev_packet(idx: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; PACKET_OVERHEAD];
    encode_packet_header(&DeviceId::new(IDSTR, 0).unwrap(), VfioPacketHeader { idx, flags }, data.len(), &mut b)
        .unwrap();
    b.extend_from_slice(data);
    b
}

fn sec_start(b: &mut Vec<u8>, kind: u8, id: u32, idstr: &str) {
    b.push(kind);
    b.extend_from_slice(&id.to_be_bytes());
    b.push(idstr.len() as u8);
    b.extend_from_slice(idstr.as_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&1u32.to_be_bytes());
}

fn footer(b: &mut Vec<u8>, id: u32) {
    b.push(0x7e);
    b.extend_from_slice(&id.to_be_bytes());
}

fn be64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_be_bytes());
}

/// A main channel: header, configuration, RAM and VFIO iterable sections with 24 pre-copy
/// bytes, the switchover command, another device's opaque FULL section, EOF and a vmdesc.
fn main_channel(pre: &[u8]) -> Vec<u8> {
    const EOS: u64 = 0xffff_ffff_ef10_0001;
    let mut b = b"QEVM\0\0\0\x03".to_vec();
    b.push(0x07);
    b.extend_from_slice(&11u32.to_be_bytes());
    b.extend_from_slice(b"pc-q35-10.0");
    sec_start(&mut b, 0x01, 2, "ram");
    be64(&mut b, (1 << 20) | 0x04);
    b.push(6);
    b.extend_from_slice(b"pc.ram");
    be64(&mut b, 1 << 20);
    be64(&mut b, 0x200);
    be64(&mut b, 0x10);
    footer(&mut b, 2);
    sec_start(&mut b, 0x01, 9, IDSTR);
    be64(&mut b, 0xffff_ffff_ef10_0003);
    be64(&mut b, EOS);
    footer(&mut b, 9);
    b.extend_from_slice(&[0x02, 0, 0, 0, 9]);
    be64(&mut b, 0xffff_ffff_ef10_0004);
    be64(&mut b, pre.len() as u64);
    b.extend_from_slice(pre);
    be64(&mut b, EOS);
    footer(&mut b, 9);
    b.extend_from_slice(&[0x08, 0, 11, 0, 0]);
    b.extend_from_slice(&[0x03, 0, 0, 0, 9]);
    be64(&mut b, EOS);
    footer(&mut b, 9);
    sec_start(&mut b, 0x04, 3, "timer");
    b.extend_from_slice(&[1, 2, 3, 0x7e, 0, 0, 0, 3, 0x55, 9]);
    footer(&mut b, 3);
    sec_start(&mut b, 0x04, 9, IDSTR);
    be64(&mut b, EOS);
    footer(&mut b, 9);
    b.push(0);
    let desc = br#"{"page_size": 4096}"#;
    b.push(0x06);
    b.extend_from_slice(&(desc.len() as u32).to_be_bytes());
    b.extend_from_slice(desc);
    b
}

struct Capture {
    dir: PathBuf,
    files: Vec<PathBuf>,
}

/// Two multifd channels (RAM, SYNC, the device's data packet idx 0 on one, its config idx 1
/// on the other) and the main channel.
fn capture(name: &str, stop: &[u8], pre: &[u8]) -> Capture {
    let dir = tmpdir(name);
    let mut c0 = init(0);
    c0.extend(ram(0, 2, 100, 0));
    c0.extend(ram(1, 0, 0, 2));
    c0.extend(dev_packet(0, 0, stop));
    let mut c1 = init(1);
    c1.extend(ram(0, 0, 128, 1));
    c1.extend(dev_packet(1, 1, b"config-blob"));
    c1.extend(ram(1, 0, 0, 3));
    let mut files = Vec::new();
    for (i, bytes) in [main_channel(pre), c0, c1].iter().enumerate() {
        let p = dir.join(format!("conn-{i}.bin"));
        std::fs::write(&p, bytes).unwrap();
        files.push(p);
    }
    Capture { dir, files }
}

fn dump(args: &[&str], files: &[PathBuf]) -> Output {
    Command::new(BIN).arg("dump").args(args).args(files).output().unwrap()
}

#[test]
fn dump_decodes_and_reassembles() {
    let pre: Vec<u8> = (0..24).collect();
    let stop: Vec<u8> = (100..172).collect();
    let cap = capture("ok", &stop, &pre);
    let out = cap.dir.join("out");
    let o = dump(&["-J", "--out", out.to_str().unwrap()], &cap.files);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ch = v["channels"].as_array().unwrap();
    assert_eq!(ch[0]["kind"], "main");
    assert_eq!(ch[0]["stopped"], serde_json::Value::Null, "{}", ch[0]);
    assert_eq!(ch[0]["decoded_bytes"], ch[0]["bytes"]);
    assert_eq!(ch[0]["machine"], "pc-q35-10.0");
    assert_eq!(ch[0]["vfio"][0]["precopy_bytes"], 24);
    assert_eq!(ch[0]["commands"][0]["name"], "SWITCHOVER_START");
    assert_eq!(ch[1]["kind"], "multifd");
    assert_eq!(ch[1]["ram"]["packets"], 2);
    assert_eq!(ch[1]["ram"]["sync_packets"], 1);
    assert_eq!(ch[1]["ram"]["normal_pages"], 2);
    assert_eq!(ch[2]["id"], 1);
    assert_eq!(ch[2]["ram"]["zero_pages"], 128);
    let p = &ch[1]["device_packets"][0];
    assert_eq!((p["idstr"].as_str(), &p["vfio"]["idx"], &p["next_packet_size"]), (Some(IDSTR), &0.into(), &84.into()));
    assert_eq!(v["encoder"]["headers"], 2);
    assert_eq!(v["encoder"]["identical"], 2);
    let d = &v["devices"][0];
    assert_eq!((&d["stopcopy_bytes"], &d["config_bytes"], &d["precopy_bytes"]), (&72.into(), &11.into(), &24.into()));
    let stem = out.join("0000_00_01.0_vfio-0");
    let read = |ext: &str| std::fs::read(format!("{}{ext}", stem.display())).unwrap();
    assert_eq!(read(".bin"), [pre.clone(), stop.clone()].concat());
    assert_eq!(read(".precopy"), pre);
    assert_eq!(read(".stopcopy"), stop);
    assert_eq!(read(".qemu-config"), b"config-blob");
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e.unwrap().path().to_string_lossy().ends_with(".tmp")));

    // Text output names every header field.
    let o = dump(&[], &cap.files);
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    for want in ["idx 0 flags 0x0 | 72 data bytes", "idx 1 flags 0x1", "decoded: every byte", "2 of 2 device-state"] {
        assert!(t.contains(want), "no {want:?} in\n{t}");
    }
    let _ = std::fs::remove_dir_all(&cap.dir);
}

fn expect_err(files: &[PathBuf], want: &str) {
    let o = dump(&[], files);
    assert!(!o.status.success(), "dump accepted it:\n{}", text(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains(want), "error lacks {want:?}:\n{e}");
    assert_eq!(e.lines().count(), 1, "one line: {e}");
}

fn rewrite(p: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(p).unwrap();
    f(&mut b);
    std::fs::write(p, b).unwrap();
}

#[test]
fn dump_rejects_damaged_captures() {
    let cap = capture("bad", &[7; 72], &[1; 24]);
    let c1 = &cap.files[1];
    let orig = std::fs::read(c1).unwrap();
    // Cut short in the device packet's data.
    rewrite(c1, |b| b.truncate(b.len() - 1));
    expect_err(&cap.files, "next_packet_size 84 but only 83 bytes left (capture cut short?)");
    rewrite(c1, |b| b.truncate(64 + 100));
    expect_err(
        &cap.files,
        "truncated at offset 76: a RAM packet header (MultiFDPacket_t) needs 1332 bytes, only 88 left",
    );
    // A RAM header length that does not match --ram-page-count: the next header is misread.
    std::fs::write(c1, &orig).unwrap();
    let o = dump(&["--ram-page-count", "64"], &cap.files);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("pages_alloc 128 exceeds the page count 64"), "{}", text(&o));
    // The config packet missing: the device is incomplete.
    expect_err(&cap.files[..2], "no config packet");
    // The same data packet twice.
    let mut twice = orig.clone();
    twice.extend(dev_packet(0, 0, &[7; 72]));
    std::fs::write(c1, &twice).unwrap();
    expect_err(&cap.files, "packet idx 0 appears twice");
    // A gap in the indexes, and data after the config packet.
    let mut gap = orig.clone();
    gap.extend(dev_packet(3, 0, &[7; 72]));
    std::fs::write(c1, &gap).unwrap();
    expect_err(&cap.files, "packet idx 2 is missing (the next one is idx 3)");
    let mut late = orig.clone();
    late.extend(dev_packet(2, 0, &[7; 72]));
    std::fs::write(c1, &late).unwrap();
    expect_err(&cap.files, "config packet idx 1 is not the last packet");
    // Garbage where a packet header should start.
    let mut junk = orig.clone();
    junk.extend_from_slice(&[0xde; 12]);
    std::fs::write(c1, &junk).unwrap();
    expect_err(&cap.files, "packet header magic 0xdededede");
    // Not a capture at all.
    std::fs::write(c1, b"hello world").unwrap();
    expect_err(&cap.files, "neither a multifd channel");
    let _ = std::fs::remove_dir_all(&cap.dir);
}

fn wait(mut c: std::process::Child, limit: Duration) -> Output {
    let t = Instant::now();
    while c.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = c.kill();
            panic!("tee hung:\n{}", text(&c.wait_with_output().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    c.wait_with_output().unwrap()
}

#[test]
fn tee_relays_and_records() {
    let dir = tmpdir("tee");
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let sport = server.local_addr().unwrap().port();
    let tport = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let rec = dir.join("rec");
    let tee = Command::new(BIN)
        .args(["tee", "--listen", &format!("127.0.0.1:{tport}"), "--connect", &format!("127.0.0.1:{sport}")])
        .args(["--record", rec.to_str().unwrap(), "--connections", "2", "--timeout", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The server answers each connection with its reversed bytes.
    let srv = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut s, _) = server.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got.reverse();
            s.write_all(&got).unwrap();
        }
    });
    for i in 0..2u8 {
        let t = Instant::now();
        let mut c = loop {
            match TcpStream::connect(("127.0.0.1", tport)) {
                Ok(c) => break c,
                Err(_) if t.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("tee not listening: {e}"),
            }
        };
        let msg: Vec<u8> = (0..100_000u32).map(|x| (x % 251) as u8 ^ i).collect();
        c.write_all(&msg).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        let mut rev = msg.clone();
        rev.reverse();
        assert!(back == rev, "relayed answer: {} bytes", back.len());
        let recorded = std::fs::read(rec.join(format!("conn-{i}.bin"))).ok();
        assert!(recorded.as_ref() == Some(&msg), "recorded request {i}: {:?} bytes", recorded.map(|r| r.len()));
    }
    srv.join().unwrap();
    let o = wait(tee, Duration::from_secs(20));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(rec.join("conn-1.rev.bin")).unwrap().len(), 100_000);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tee_times_out_without_connections() {
    let dir = tmpdir("tee-timeout");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let t = Instant::now();
    let o = Command::new(BIN)
        .args(["tee", "--listen", &format!("127.0.0.1:{port}"), "--connect", "127.0.0.1:9"])
        .args(["--record", dir.to_str().unwrap(), "--timeout", "1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("timed out after 1 s waiting for connection 0"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The project's own `send` through `tee` into `recv --sink`: `dump` decodes the capture and
/// its reassembled stream equals the one the receiver saved.
#[test]
fn dump_decodes_the_projects_own_transfer() {
    let dir = tmpdir("own");
    let free = || TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (rport, tport) = (free(), free());
    let sink = dir.join("sink.bin");
    let recv = Command::new(BIN)
        .args(["recv", "--listen", &format!("127.0.0.1:{rport}"), "-P", "2", "--sim", "3M", "--verify"])
        .args(["--sink", &format!("file:{}", sink.display()), "--accept-timeout", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rec = dir.join("rec");
    let tee = Command::new(BIN)
        .args(["tee", "--listen", &format!("127.0.0.1:{tport}"), "--connect", &format!("127.0.0.1:{rport}")])
        .args(["--record", rec.to_str().unwrap(), "--connections", "2", "--timeout", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let send = Command::new(BIN)
        .args(["send", "--connect", &format!("127.0.0.1:{tport}"), "-P", "2", "--sim", "3M", "--chunk", "256K"])
        .output()
        .unwrap();
    assert!(send.status.success(), "{}", text(&send));
    let r = wait(recv, Duration::from_secs(30));
    assert!(r.status.success(), "{}", text(&r));
    let t = wait(tee, Duration::from_secs(30));
    assert!(t.status.success(), "{}", text(&t));
    let out = dir.join("out");
    let files = [rec.join("conn-0.bin"), rec.join("conn-1.bin")];
    let o = dump(&["-J", "--out", out.to_str().unwrap()], &files);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["devices"][0]["idstr"], "0000:00:02.0/vfio");
    assert_eq!(v["devices"][0]["stopcopy_bytes"], 3 << 20);
    assert_eq!(v["encoder"]["identical"], v["encoder"]["headers"]);
    let stem = out.join("0000_00_02.0_vfio-0");
    let got = std::fs::read(format!("{}.bin", stem.display())).unwrap();
    assert!(got == std::fs::read(&sink).unwrap(), "dump's stream differs from recv --sink's");
    let config = std::fs::read(format!("{}.qemu-config", stem.display())).unwrap();
    assert_eq!(config, std::fs::read(dir.join("sink.bin.config")).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}
