//! Live simulated devices: pages dirtied while the device runs, dirty records in the save
//! stream, PRECOPY_INFO accounting, and a destination that verifies and reconstructs the
//! state.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use vfio_migration::sim::{self, DirtyRecord, SimConfig, SimDevice, DIRTY_RECORD_HEADER, SIM_PAGE_SIZE};
use vfio_migration::{transition, MigState, MigrationDevice, PrecopyInfo, ReadOutcome};

const REC: u64 = DIRTY_RECORD_HEADER as u64 + SIM_PAGE_SIZE;

/// One `read_data` into `out`; the outcome.
fn read_once(d: &SimDevice, fd: &OwnedFd, buf: &mut [u8], out: &mut Vec<u8>) -> ReadOutcome {
    let r = d.read_data(fd.as_fd(), buf).unwrap();
    if let ReadOutcome::Data(n) = r {
        out.extend_from_slice(&buf[..n]);
    }
    r
}

/// Reads until the first non-data outcome (the temporary end in PRE_COPY, EOF in STOP_COPY).
fn read_to_end(d: &SimDevice, fd: &OwnedFd, out: &mut Vec<u8>) -> ReadOutcome {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match read_once(d, fd, &mut buf, out) {
            ReadOutcome::Data(_) => {}
            other => return other,
        }
    }
}

fn info(d: &SimDevice, fd: &OwnedFd) -> PrecopyInfo {
    d.precopy_info(fd.as_fd()).unwrap()
}

/// Walks a live stream as documented: the base image's first `pre` bytes, dirty records, the
/// rest of the base image, dirty records. Checks every record's content and that the versions
/// of a page increase; returns the records and the versions they leave.
fn parse(seed: u64, size: u64, pre: u64, stream: &[u8]) -> (Vec<DirtyRecord>, Vec<u32>) {
    let mut versions = vec![0u32; sim::page_count(size) as usize];
    let mut recs = Vec::new();
    let mut rest = stream;
    for (from, to) in [(0, pre), (pre, size)] {
        let n = (to - from) as usize;
        assert!(rest.len() >= n, "stream ends inside the base image");
        assert_eq!(sim::verify(seed, from, &rest[..n]), Ok(()));
        rest = &rest[n..];
        while rest.len() >= DIRTY_RECORD_HEADER && rest[..8] == sim::DIRTY_RECORD_MAGIC {
            let r = DirtyRecord::parse(rest[..DIRTY_RECORD_HEADER].try_into().unwrap()).unwrap();
            assert_eq!(u64::from(r.len), sim::page_len(size, r.page));
            let body = &rest[DIRTY_RECORD_HEADER..DIRTY_RECORD_HEADER + r.len as usize];
            assert_eq!(sim::verify_page(seed, r.page, r.version, 0, body), Ok(()));
            assert!(r.version > versions[r.page as usize], "versions of page {} must increase", r.page);
            versions[r.page as usize] = r.version;
            recs.push(r);
            rest = &rest[DIRTY_RECORD_HEADER + r.len as usize..];
        }
    }
    assert!(rest.is_empty(), "{} bytes after the last record", rest.len());
    (recs, versions)
}

fn write_all(d: &SimDevice, fd: &OwnedFd, mut data: &[u8]) {
    while !data.is_empty() {
        let n = d.write_data(fd.as_fd(), &data[..data.len().min(100_000)]).unwrap();
        data = &data[n..];
    }
}

/// A destination with `cfg` loads `stream`; the RESUMING→STOP result.
fn load(cfg: &SimConfig, stream: &[u8]) -> (SimDevice, vfio_migration::Result<()>) {
    let mut dst = SimDevice::new(cfg.clone());
    let fd = transition(&mut dst, MigState::Resuming).unwrap().data_fd.unwrap();
    write_all(&dst, &fd, stream);
    let r = transition(&mut dst, MigState::Stop).map(|_| ());
    (dst, r)
}

#[test]
fn page_content_and_records() {
    let seed = 99;
    // Version 0 is the plain stream; other versions differ from it and from each other.
    let mut v0 = vec![0u8; 4096];
    sim::fill_page(seed, 7, 0, 0, &mut v0);
    let mut plain = vec![0u8; 4096];
    sim::fill(seed, 7 * 4096, &mut plain);
    assert_eq!(v0, plain);
    let mut v1 = vec![0u8; 4096];
    let mut v2 = vec![0u8; 4096];
    sim::fill_page(seed, 7, 1, 0, &mut v1);
    sim::fill_page(seed, 7, 2, 0, &mut v2);
    assert_ne!(v0, v1);
    assert_ne!(v1, v2);
    assert!(sim::verify_page(seed, 8, 1, 0, &v1).is_err(), "another page");
    assert!(sim::verify_page(seed, 7, 2, 0, &v1).is_err(), "another version");
    // Any sub-range, at any offset, fills and verifies the same bytes.
    for (off, len) in [(0usize, 1usize), (3, 9), (8, 8), (4000, 96), (1, 4095)] {
        let mut part = vec![0u8; len];
        sim::fill_page(seed, 7, 1, off, &mut part);
        assert_eq!(part, v1[off..off + len]);
        assert_eq!(sim::verify_page(seed, 7, 1, off, &part), Ok(()));
        part[len - 1] ^= 1;
        assert_eq!(sim::verify_page(seed, 7, 1, off, &part), Err(len - 1));
    }
    // The record format round-trips.
    let r = DirtyRecord { page: 7, version: 1, len: 4096 };
    let bytes = r.encode(seed);
    assert_eq!(bytes.len() as u64, r.encoded_len());
    assert_eq!(&bytes[..8], b"VFSIMDR1");
    assert_eq!(DirtyRecord::parse(bytes[..24].try_into().unwrap()), Some(r));
    assert_eq!(&bytes[24..], &v1[..]);
    assert_eq!(DirtyRecord::parse(&[0u8; 24]), None);
    // Pages of a partial image.
    assert_eq!((sim::page_count(8193), sim::page_len(8193, 2), sim::page_len(8193, 3)), (3, 1, 0));
    // The digest tells states apart.
    assert_eq!(sim::state_digest(&[0, 1, 0]), sim::state_digest(&[0, 1, 0]));
    assert_ne!(sim::state_digest(&[0, 1, 0]), sim::state_digest(&[0, 2, 0]));
    assert_ne!(sim::state_digest(&[0, 0, 0]), sim::state_digest(&[0, 0]));
}

/// A device that is not live keeps today's stream and accounting (the engine's tests rely on
/// it).
#[test]
fn a_device_that_is_not_live_is_unchanged() {
    let cfg = SimConfig::new("plain", 300_000, 3).with_precopy_bytes(100_000);
    assert!(!cfg.is_live());
    let mut d = SimDevice::new(cfg);
    let fd = transition(&mut d, MigState::PreCopy).unwrap().data_fd.unwrap();
    let i = info(&d, &fd);
    assert_eq!((i.initial_bytes, i.dirty_bytes), (100_000, 0));
    let mut got = Vec::new();
    assert_eq!(read_to_end(&d, &fd, &mut got), ReadOutcome::NoMsg);
    transition(&mut d, MigState::StopCopy).unwrap();
    assert_eq!(read_to_end(&d, &fd, &mut got), ReadOutcome::Eof);
    assert_eq!(got.len(), 300_000);
    assert_eq!(sim::verify(3, 0, &got), Ok(()));
    assert_eq!(d.stop_copy_size().unwrap(), 300_000);
    assert!(d.page_versions().iter().all(|&v| v == 0));
}

/// Background dirtying: the device keeps producing dirty data while it runs in PRE_COPY and
/// PRE_COPY_P2P, nothing changes once it is stopped, and the whole stream (read across
/// PRE_COPY → PRE_COPY_P2P → STOP_COPY) rebuilds the source's state on a destination.
#[test]
fn dirtying_device_migrates_live() {
    let size = 4 << 20;
    let cfg = SimConfig::new("live", size, 7).with_precopy_bytes(size).with_dirty_rate(32 << 20);
    let mut src = SimDevice::new(cfg.clone());
    let fd = transition(&mut src, MigState::PreCopy).unwrap().data_fd.unwrap();
    let i0 = info(&src, &fd);
    assert_eq!(i0.initial_bytes, size);
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut initial = i0.initial_bytes;
    // Read the initial data; initial_bytes only falls.
    while initial > 0 {
        assert!(matches!(read_once(&src, &fd, &mut buf, &mut stream), ReadOutcome::Data(_)));
        let i = info(&src, &fd);
        assert!(i.initial_bytes <= initial);
        initial = i.initial_bytes;
    }
    // While it runs, dirty data accumulates (32 MiB/s: ~8 pages a millisecond).
    std::thread::sleep(Duration::from_millis(30));
    let grown = info(&src, &fd).dirty_bytes;
    assert!(grown >= 50 * REC, "only {grown} dirty bytes after 30 ms at 32 MiB/s");
    // Reading makes it fall: reads take records far faster than the device dirties pages.
    let before = stream.len();
    assert_eq!(read_to_end(&src, &fd, &mut stream), ReadOutcome::NoMsg);
    assert!(info(&src, &fd).dirty_bytes < grown);
    // Read to the temporary end, several times: new records keep appearing.
    let mut rounds = 0;
    while rounds < 3 {
        if read_to_end(&src, &fd, &mut stream) == ReadOutcome::NoMsg {
            rounds += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(stream.len() > before + 50 * REC as usize);
    // The P2P-safe switchover: PRE_COPY_P2P (still dirtying), then STOP_COPY.
    transition(&mut src, MigState::PreCopyP2p).unwrap();
    let v = src.page_versions();
    std::thread::sleep(Duration::from_millis(10));
    assert_ne!(src.page_versions(), v, "PRE_COPY_P2P still runs");
    transition(&mut src, MigState::StopCopy).unwrap();
    let digest = src.state_digest();
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(src.state_digest(), digest, "a stopped device does not change");
    assert_eq!(read_to_end(&src, &fd, &mut stream), ReadOutcome::Eof);
    // The stream is the whole base, then only records.
    let (recs, versions) = parse(7, size, size, &stream);
    assert!(recs.len() > 100);
    assert_eq!(versions, src.page_versions());
    transition(&mut src, MigState::Stop).unwrap();
    assert_eq!(src.state_digest(), digest);
    let (dst, r) = load(&cfg, &stream);
    r.unwrap();
    assert_eq!(dst.state_digest(), digest);
    assert_eq!(dst.page_versions(), versions);
}

/// Dirtying happens before PRE_COPY too (RUNNING), and a STOP→STOP_COPY stream carries it.
#[test]
fn stop_copy_only_session_carries_earlier_dirtying() {
    let size = 1 << 20;
    let cfg = SimConfig::new("sc", size, 8).with_dirty_rate(64 << 20);
    let mut src = SimDevice::new(cfg.clone());
    std::thread::sleep(Duration::from_millis(10));
    let fd = transition(&mut src, MigState::StopCopy).unwrap().data_fd.unwrap();
    let digest = src.state_digest();
    assert_ne!(digest, sim::state_digest(&vec![0; 256]), "no page dirtied while RUNNING");
    let owed = src.stop_copy_size().unwrap();
    let mut stream = Vec::new();
    assert_eq!(read_to_end(&src, &fd, &mut stream), ReadOutcome::Eof);
    assert_eq!(stream.len() as u64, owed, "MIG_DATA_SIZE is what STOP_COPY streams");
    let (dst, r) = load(&cfg, &stream);
    r.unwrap();
    assert_eq!(dst.state_digest(), digest);
}

/// How an io_uring engine reads: raw `read(2)`s, gated by PRECOPY_INFO. While the device
/// dirties pages, every read that PRECOPY_INFO announces returns data (no reader hangs), and
/// the reader carries on across the STOP_COPY SET.
#[test]
fn raw_reads_gated_by_precopy_info_never_hang() {
    let size = 2 << 20;
    let cfg =
        SimConfig::new("raw", size, 12).with_precopy_bytes(size).with_dirty_rate(16 << 20).with_max_read(64 * 1024);
    let mut src = SimDevice::new(cfg.clone());
    let fd = transition(&mut src, MigState::PreCopy).unwrap().data_fd.unwrap();
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let until = Instant::now() + Duration::from_millis(100);
    while Instant::now() < until {
        let i = info(&src, &fd);
        if i.initial_bytes + i.dirty_bytes == 0 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let n = nix::unistd::read(fd.as_fd(), &mut buf).unwrap();
        assert!(n > 0);
        stream.extend_from_slice(&buf[..n]);
    }
    transition(&mut src, MigState::PreCopyP2p).unwrap();
    transition(&mut src, MigState::StopCopy).unwrap();
    loop {
        let n = nix::unistd::read(fd.as_fd(), &mut buf).unwrap();
        if n == 0 {
            break;
        }
        stream.extend_from_slice(&buf[..n]);
    }
    let (recs, versions) = parse(12, size, size, &stream);
    assert!(!recs.is_empty());
    assert_eq!(sim::state_digest(&versions), src.state_digest());
}

/// The destination checks every record: content, page, length, increasing versions, a
/// complete last record. A bad stream fails RESUMING→STOP with EINVAL and leaves RESUMING.
#[test]
fn destination_rejects_bad_records() {
    let size = 5 * 4096 + 10;
    let seed = 31;
    let cfg = SimConfig::new("dst", size, seed).with_dirty_rate(0);
    let mut base = vec![0u8; size as usize];
    sim::fill(seed, 0, &mut base);
    let rec =
        |page: u64, version: u32| DirtyRecord { page, version, len: sim::page_len(size, page) as u32 }.encode(seed);
    let good = [base.clone(), rec(1, 1), rec(5, 1), rec(1, 3)].concat();
    let (dst, r) = load(&cfg, &good);
    r.unwrap();
    assert_eq!(dst.page_versions(), [0, 3, 0, 0, 0, 1]);
    // The base alone is a valid stream too (nothing was dirtied).
    let (dst, r) = load(&cfg, &base);
    r.unwrap();
    assert!(dst.page_versions().iter().all(|&v| v == 0));

    let fails = |stream: &[u8], what: &str| {
        let (dst, r) = load(&cfg, stream);
        let e = r.unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
        assert!(e.to_string().contains(what), "{what:?} not in: {e}");
        assert_eq!(dst.state().unwrap(), MigState::Resuming);
        dst.resume_report().unwrap()
    };
    // A corrupted payload byte: found at its exact stream offset.
    let mut bad = good.clone();
    let at = size as usize + 24 + 4096 + 24 + 5;
    bad[at] ^= 0x10;
    assert_eq!(fails(&bad, "page 5 version 1 differs").first_bad_offset, Some(at as u64));
    // A record at the wrong version has the wrong content.
    let mut bad = good.clone();
    bad[size as usize + 16] = 2;
    fails(&bad, "differs");
    fails(&[base.clone(), rec(1, 2), rec(1, 2)].concat(), "does not follow version 2");
    fails(&[base.clone(), rec(1, 0)].concat(), "does not follow version 0");
    let mut bad = rec(1, 1);
    bad[0] = b'X';
    fails(&[base.clone(), bad].concat(), "bad magic");
    let mut bad = rec(2, 1);
    bad[8] = 6;
    fails(&[base.clone(), bad].concat(), "past the image's end");
    let mut bad = rec(2, 1);
    bad[20] = 8;
    fails(&[base.clone(), bad].concat(), "not 4096");
    fails(&good[..good.len() - 1], "ends inside the dirty record");
    fails(&good[..size as usize + 10], "ends inside the dirty record");
    fails(&base[..size as usize - 1], "short");

    // Like mtty, the file stays open: a stream cut inside a record can still be completed.
    let mut dst = SimDevice::new(cfg.clone());
    let fd = transition(&mut dst, MigState::Resuming).unwrap().data_fd.unwrap();
    let cut = size as usize + 100;
    write_all(&dst, &fd, &good[..cut]);
    assert_eq!(transition(&mut dst, MigState::Stop).unwrap_err().errno(), Some(libc::EINVAL));
    write_all(&dst, &fd, &good[cut..]);
    transition(&mut dst, MigState::Stop).unwrap();
    assert_eq!(dst.page_versions(), [0, 3, 0, 0, 0, 1]);
}

/// Records only where the source may put them: a record in the middle of the base image's
/// pre-copy portion is not part of the base.
#[test]
fn destination_finds_records_only_at_the_pause() {
    let (size, pre, seed) = (64 * 1024u64, 16 * 1024u64, 3);
    let cfg = SimConfig::new("p", size, seed).with_precopy_bytes(pre).with_dirty_rate(0);
    let mut base = vec![0u8; size as usize];
    sim::fill(seed, 0, &mut base);
    let rec = |page: u64| DirtyRecord { page, version: 1, len: 4096 }.encode(seed);
    let b = |from: u64, to: u64| base[from as usize..to as usize].to_vec();
    // At the pause: fine, before or after the rest of the base.
    let good = [b(0, pre), rec(1), b(pre, size), rec(9)].concat();
    assert_eq!(load(&cfg, &good).0.page_versions()[..10], [0, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
    // Anywhere else: the base does not match.
    let bad = [b(0, 8192), rec(1), b(8192, size)].concat();
    let e = load(&cfg, &bad).1.unwrap_err();
    assert!(e.to_string().contains("differs from the expected at base offset 8192"), "{e}");
    let bad = [b(0, pre), b"garbage!".to_vec(), b(pre, size)].concat();
    let e = load(&cfg, &bad).1.unwrap_err();
    assert!(e.to_string().contains("neither a dirty record nor the base image"), "{e}");
}
