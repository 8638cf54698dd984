//! Live simulated devices: pages dirtied while the device runs, dirty records in the save
//! stream, PRECOPY_INFO accounting, a destination that verifies and reconstructs the state,
//! and the fabric that records guest writes, P2P DMA and P2P ordering violations.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_migration::sim::{
    self, DirtyRecord, DirtyRelease, Fabric, SimConfig, SimDevice, Violation, DIRTY_RECORD_HEADER, SIM_PAGE_SIZE,
};
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
/// it), and its handle's writes change nothing.
#[test]
fn a_device_that_is_not_live_is_unchanged() {
    let cfg = SimConfig::new("plain", 300_000, 3).with_precopy_bytes(100_000);
    assert!(!cfg.is_live());
    let mut d = SimDevice::new(cfg);
    let h = d.handle();
    let fd = transition(&mut d, MigState::PreCopy).unwrap().data_fd.unwrap();
    assert!(h.guest_write(1));
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

/// Exact PRECOPY_INFO accounting, driven by guest writes only (dirty rate 0): initial falls as
/// the base is read, dirty grows with each write into a page whose base bytes were already
/// streamed and falls as its record is read; pages beyond the streamed base are sent after
/// their base bytes in STOP_COPY. The destination reconstructs the source's state.
#[test]
fn precopy_info_accounting_with_guest_writes() {
    let size = 1024 * 1024 + 100; // a partial last page
    let pre = 256 * 1024;
    let cfg = SimConfig::new("acct", size, 21).with_precopy_bytes(pre).with_max_read(16 * 1024).with_dirty_rate(0);
    let mut src = SimDevice::new(cfg.clone());
    let h = src.handle();
    let fd = transition(&mut src, MigState::PreCopy).unwrap().data_fd.unwrap();
    assert_eq!(info(&src, &fd), PrecopyInfo { initial_bytes: pre, dirty_bytes: 0, reinit: false });
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 10_000];
    while (stream.len() as u64) < 100_000 {
        read_once(&src, &fd, &mut buf, &mut stream);
        let i = info(&src, &fd);
        assert_eq!((i.initial_bytes, i.dirty_bytes), (pre - stream.len() as u64, 0));
    }
    // Page 3's base bytes were streamed: a write there owes a record; page 200's were not.
    assert!(h.guest_write(3));
    assert_eq!(info(&src, &fd).dirty_bytes, REC);
    assert!(h.guest_write(200));
    assert!(h.guest_write(3));
    assert_eq!(info(&src, &fd).dirty_bytes, REC, "page 3 owes one record, at its newest version");
    assert!(h.guest_write(10));
    assert_eq!(info(&src, &fd).dirty_bytes, 2 * REC);
    let mut last = info(&src, &fd);
    loop {
        match read_once(&src, &fd, &mut buf, &mut stream) {
            ReadOutcome::Data(_) => {}
            end => {
                assert_eq!(end, ReadOutcome::NoMsg);
                break;
            }
        }
        let i = info(&src, &fd);
        assert!(i.initial_bytes <= last.initial_bytes && i.dirty_bytes <= last.dirty_bytes, "{i:?} after {last:?}");
        assert_eq!(i.initial_bytes + i.dirty_bytes, pre + 2 * REC - stream.len() as u64);
        last = i;
    }
    assert_eq!(stream.len() as u64, pre + 2 * REC);
    assert_eq!((last.initial_bytes, last.dirty_bytes), (0, 0));
    // At the temporary end a new write becomes readable without any ioctl.
    assert_eq!(read_once(&src, &fd, &mut buf, &mut stream), ReadOutcome::NoMsg);
    assert!(h.guest_write(5));
    assert_eq!(read_to_end(&src, &fd, &mut stream), ReadOutcome::NoMsg);
    assert_eq!(stream.len() as u64, pre + 3 * REC);
    // PRE_COPY_P2P still runs: writes land. STOP_COPY: they are lost, the state is frozen.
    transition(&mut src, MigState::PreCopyP2p).unwrap();
    assert!(h.guest_write(6));
    assert_eq!(info(&src, &fd).dirty_bytes, REC);
    // MIG_DATA_SIZE: the unread base, page 6's record, and page 200's (after its base).
    assert_eq!(src.stop_copy_size().unwrap(), (size - pre) + 2 * REC);
    transition(&mut src, MigState::StopCopy).unwrap();
    assert!(!h.guest_write(7));
    let digest = src.state_digest();
    assert_eq!(read_to_end(&src, &fd, &mut stream), ReadOutcome::Eof);
    let (recs, versions) = parse(21, size, pre, &stream);
    let mut pages: Vec<(u64, u32)> = recs.iter().map(|r| (r.page, r.version)).collect();
    assert_eq!(pages[..3], [(3, 2), (10, 1), (5, 1)]);
    // Page 6's record was queued in PRE_COPY_P2P: it is in the stream before the rest of the
    // base if the producer wrote it before the STOP_COPY SET, after it otherwise.
    pages[3..].sort_unstable();
    assert_eq!(pages[3..], [(6, 1), (200, 1)]);
    assert_eq!(versions, src.page_versions());
    assert_eq!(sim::state_digest(&versions), digest);
    // The destination takes the stream as it came and ends with the same state.
    let (dst, r) = load(&cfg, &stream);
    r.unwrap();
    assert_eq!(dst.state_digest(), digest);
    let rep = dst.resume_report().unwrap();
    assert_eq!((rep.verified_ok, rep.bytes_written, rep.dirty_records), (true, stream.len() as u64, 5));
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

/// mlx5's rule: once the reader is at the temporary end, new dirty data enters the stream
/// only when PRECOPY_INFO is called.
#[test]
fn mlx5_release_on_precopy_info() {
    let size = 64 * 1024;
    let cfg = SimConfig::new("mlx5", size, 4)
        .with_precopy_bytes(size)
        .with_dirty_rate(0)
        .with_dirty_release(DirtyRelease::OnPrecopyInfo);
    let mut src = SimDevice::new(cfg.clone());
    let h = src.handle();
    let fd = transition(&mut src, MigState::PreCopy).unwrap().data_fd.unwrap();
    let mut stream = Vec::new();
    assert_eq!(read_to_end(&src, &fd, &mut stream), ReadOutcome::NoMsg);
    assert!(h.guest_write(2));
    let mut buf = vec![0u8; 8192];
    assert_eq!(read_once(&src, &fd, &mut buf, &mut stream), ReadOutcome::NoMsg, "held until PRECOPY_INFO");
    assert_eq!(info(&src, &fd).dirty_bytes, REC);
    assert_eq!(read_to_end(&src, &fd, &mut stream), ReadOutcome::NoMsg);
    assert_eq!(stream.len() as u64, size + REC);
    // Held records still go out in STOP_COPY.
    assert!(h.guest_write(9));
    transition(&mut src, MigState::StopCopy).unwrap();
    assert_eq!(read_to_end(&src, &fd, &mut stream), ReadOutcome::Eof);
    assert_eq!(stream.len() as u64, size + 2 * REC);
    let (dst, r) = load(&cfg, &stream);
    r.unwrap();
    assert_eq!(dst.state_digest(), src.state_digest());
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

/// The stream faults count bytes of the whole live stream (base and records).
#[test]
fn faults_cut_the_whole_live_stream() {
    let size = 64 * 1024;
    let dirty = |cfg: SimConfig| {
        let mut d = SimDevice::new(cfg.with_precopy_bytes(size).with_dirty_rate(0).with_max_read(8192));
        let fd = transition(&mut d, MigState::PreCopy).unwrap().data_fd.unwrap();
        let h = d.handle();
        let mut got = Vec::new();
        assert_eq!(read_to_end(&d, &fd, &mut got), ReadOutcome::NoMsg);
        for p in 0..4 {
            assert!(h.guest_write(p));
        }
        transition(&mut d, MigState::StopCopy).unwrap();
        let mut buf = vec![0u8; 8192];
        let end = loop {
            match d.read_data(fd.as_fd(), &mut buf) {
                Ok(ReadOutcome::Data(n)) => got.extend_from_slice(&buf[..n]),
                other => break other,
            }
        };
        (got, end)
    };
    let cut = size + 2 * REC + 100;
    let (got, end) = dirty(SimConfig::new("t", size, 5).with_truncate_at(cut));
    assert_eq!((got.len() as u64, end.unwrap()), (cut, ReadOutcome::Eof));
    let (got, end) = dirty(SimConfig::new("e", size, 5).with_read_error_at(cut));
    assert_eq!(got.len() as u64, cut);
    assert_eq!(end.unwrap_err().errno(), Some(libc::ECONNRESET));
    // The truncated stream is refused by the destination, the full one accepted.
    let cfg = SimConfig::new("t", size, 5).with_precopy_bytes(size).with_dirty_rate(0);
    let (_, r) = load(&cfg, &got);
    assert!(r.unwrap_err().to_string().contains("ends inside the dirty record"));
    let (full, _) = dirty(SimConfig::new("f", size, 5));
    assert_eq!(full.len() as u64, size + 4 * REC);
    load(&cfg, &full).1.unwrap();
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

// ---------------------------------------------------------------------------------------------
// The fabric: guest writes, P2P DMA, the P2P ordering rule.
// ---------------------------------------------------------------------------------------------

fn pair(fabric: &Fabric) -> (SimDevice, SimDevice) {
    let a = SimDevice::new(SimConfig::new("a", 64 * 1024, 1).with_dirty_rate(0)).with_fabric(fabric);
    let b = SimDevice::new(SimConfig::new("b", 64 * 1024, 2).with_dirty_rate(0)).with_fabric(fabric);
    (a, b)
}

#[test]
fn p2p_safe_switchover_records_nothing() {
    let fabric = Fabric::new();
    let (mut a, mut b) = pair(&fabric);
    let (ha, hb) = (a.handle(), b.handle());
    let _fa = transition(&mut a, MigState::PreCopy).unwrap().data_fd.unwrap();
    let _fb = transition(&mut b, MigState::PreCopy).unwrap().data_fd.unwrap();
    assert!(ha.guest_write(1));
    assert!(ha.dma_write_to(&hb, 2), "PRE_COPY initiates and accepts P2P DMA");
    // Prepare pass: every device to its P2P state first.
    transition(&mut a, MigState::PreCopyP2p).unwrap();
    assert!(!ha.dma_write_to(&hb, 3), "a quiesced initiator issues no P2P DMA");
    assert!(hb.dma_write_to(&ha, 4), "a P2P state still accepts incoming DMA");
    transition(&mut b, MigState::PreCopyP2p).unwrap();
    assert!(hb.guest_write(5), "the guest may still write until the VM stops");
    // Main pass: then stop them.
    transition(&mut a, MigState::StopCopy).unwrap();
    transition(&mut b, MigState::StopCopy).unwrap();
    assert!(!hb.dma_write_to(&ha, 6), "a stopped device initiates nothing");
    assert_eq!(fabric.violations(), []);
    let st = fabric.stats();
    assert_eq!((st.guest_writes_landed, st.dma_landed, st.dma_not_initiated), (2, 2, 2));
    assert_eq!((fabric.writes_landed(), fabric.writes_lost()), (4, 0));
    assert_eq!(ha.page_versions()[..5], [0, 1, 0, 0, 1]);
    assert_eq!(hb.page_versions()[..6], [0, 0, 1, 0, 0, 1]);
    // The fabric saw every arc of both devices.
    let log = fabric.state_log();
    assert_eq!(log.len(), 6);
    assert_eq!((log[4].device.as_str(), log[4].from, log[4].to), ("a", MigState::PreCopyP2p, MigState::StopCopy));
    assert_eq!(fabric.devices(), [("a".to_owned(), MigState::StopCopy), ("b".to_owned(), MigState::StopCopy)]);
    drop(a);
    assert_eq!(fabric.devices().len(), 1, "a dropped device leaves the fabric");
}

#[test]
fn unsafe_stop_and_lost_writes_are_recorded() {
    let fabric = Fabric::new();
    let (mut a, mut b) = pair(&fabric);
    let (ha, hb) = (a.handle(), b.handle());
    // a stops while b still runs: b could DMA into it. Recorded once (not again at STOP_COPY).
    transition(&mut a, MigState::StopCopy).unwrap();
    let v = fabric.violations();
    assert_eq!(
        v,
        [Violation::StoppedWhilePeerMayDma {
            device: "a".into(),
            state: MigState::Stop,
            peer: "b".into(),
            peer_state: MigState::Running,
        }]
    );
    assert!(v[0].to_string().contains("device a stopped (STOP) while peer b (RUNNING) could still DMA into it"));
    // And b does: the write is lost. So is a guest write to the stopped device.
    assert!(!hb.dma_write_to(&ha, 1));
    assert!(!ha.guest_write(2));
    let v = fabric.violations();
    assert_eq!(v.len(), 3);
    assert_eq!(v[1], Violation::DmaLost { from: "b".into(), to: "a".into(), to_state: MigState::StopCopy, page: 1 });
    assert_eq!(v[2].to_string(), "guest write to device a in STOP_COPY lost (page 2)");
    let st = fabric.stats();
    assert_eq!((st.dma_lost, st.guest_writes_lost, fabric.writes_lost()), (1, 1, 2));
    assert!(ha.page_versions().iter().all(|&x| x == 0), "lost writes change nothing");
    // The start rule: b stops too (no violation: a can no longer DMA), then a runs again while
    // b is still RESUMING, so a could DMA into a device that must not be touched.
    let _r = transition(&mut b, MigState::Resuming).unwrap().data_fd.unwrap();
    let n = fabric.violations().len();
    transition(&mut a, MigState::Running).unwrap();
    assert!(matches!(
        &fabric.violations()[n..],
        [Violation::StartedWhilePeerStopped { device, peer_state: MigState::Resuming, .. }] if device == "a"
    ));
}

/// A VM: the guest writes into both devices from its own thread while they pre-copy; the VMM
/// stops the vCPUs, quiesces both, stops both, and each destination rebuilds its source's
/// state. No write is lost and no rule is broken.
#[test]
fn vm_with_a_guest_writer_migrates_without_loss() {
    let fabric = Fabric::new();
    let cfgs: Vec<SimConfig> = (0..2u64)
        .map(|i| {
            SimConfig::new(format!("dev{i}"), 512 * 1024, 40 + i)
                .with_precopy_bytes(512 * 1024)
                .with_dirty_rate(4 << 20)
        })
        .collect();
    let mut devs: Vec<SimDevice> = cfgs.iter().map(|c| SimDevice::new(c.clone()).with_fabric(&fabric)).collect();
    let handles: Vec<_> = devs.iter().map(SimDevice::handle).collect();
    let running = Arc::new(AtomicBool::new(true));
    let guest = {
        let (hs, run) = (handles.clone(), Arc::clone(&running));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while run.load(Ordering::Acquire) {
                assert!(hs[(n % 2) as usize].guest_write(n * 7));
                assert!(hs[(n % 2) as usize].dma_write_to(&hs[((n + 1) % 2) as usize], n * 13));
                n += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let fds: Vec<OwnedFd> =
        devs.iter_mut().map(|d| transition(d, MigState::PreCopy).unwrap().data_fd.unwrap()).collect();
    let mut streams = [Vec::new(), Vec::new()];
    for _ in 0..5 {
        for (i, d) in devs.iter().enumerate() {
            read_to_end(d, &fds[i], &mut streams[i]);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    running.store(false, Ordering::Release); // vm_stop: the vCPUs first
    guest.join().unwrap();
    for d in &mut devs {
        transition(d, MigState::PreCopyP2p).unwrap();
    }
    for d in &mut devs {
        transition(d, MigState::StopCopy).unwrap();
    }
    for (i, d) in devs.iter().enumerate() {
        assert_eq!(read_to_end(d, &fds[i], &mut streams[i]), ReadOutcome::Eof);
        let (dst, r) = load(&cfgs[i], &streams[i]);
        r.unwrap();
        assert_eq!(dst.state_digest(), d.state_digest());
    }
    assert_eq!(fabric.violations(), []);
    assert_eq!(fabric.writes_lost(), 0);
    assert!(fabric.writes_landed() > 20);
}
