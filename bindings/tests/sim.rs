//! The simulated device's stream semantics: what tests and benchmarks of the engine rely on.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use vfio_migration::sim::{self, PrecopyEnd, SimConfig, SimDevice};
use vfio_migration::{recover, transition, Error, MigState, MigrationDevice, ReadOutcome, Recovery};

/// One `read(2)`, bypassing the device.
fn raw_read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<usize> {
    Ok(nix::unistd::read(fd, buf)?)
}

/// One `write(2)`, bypassing the device.
fn raw_write(fd: BorrowedFd<'_>, buf: &[u8]) -> std::io::Result<usize> {
    Ok(nix::unistd::write(fd, buf)?)
}

/// Reads with `read_data` until EOF (or NoMsg when `stop_at_nomsg`); returns the bytes and
/// the largest single read.
fn read_all(d: &SimDevice, fd: &OwnedFd, stop_at_temp_end: bool) -> (Vec<u8>, usize, ReadOutcome) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut max = 0;
    loop {
        match d.read_data(fd.as_fd(), &mut buf).unwrap() {
            ReadOutcome::Data(n) => {
                max = max.max(n);
                out.extend_from_slice(&buf[..n]);
            }
            end @ ReadOutcome::Eof => return (out, max, end),
            end @ ReadOutcome::NoMsg => {
                assert!(stop_at_temp_end, "NoMsg outside PRE_COPY");
                return (out, max, end);
            }
        }
    }
}

fn write_all(d: &SimDevice, fd: &OwnedFd, mut data: &[u8]) {
    while !data.is_empty() {
        let n = d.write_data(fd.as_fd(), data).unwrap();
        assert!(n > 0);
        data = &data[n..];
    }
}

fn stream(seed: u64, from: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    sim::fill(seed, from, &mut v);
    v
}

// The engine moves devices into per-device threads: checked at compile time, not by a test
// that cannot fail at run time.
const _: () = {
    const fn is_send<T: Send>() {}
    is_send::<SimDevice>();
    is_send::<vfio_migration::vfio::VfioDevice>();
};

#[test]
fn fill_and_verify_agree_everywhere() {
    let seed = 0xDEAD_BEEF;
    // Unaligned starts and lengths, across a 64 KiB block boundary.
    for start in [0u64, 1, 7, 8, 65_530, 65_536, 1 << 40] {
        for len in [0usize, 1, 7, 9, 100, 70_000] {
            let v = stream(seed, start, len);
            assert_eq!(sim::verify(seed, start, &v), Ok(()));
            for (i, &b) in v.iter().enumerate().step_by(997) {
                assert_eq!(b, sim::stream_byte(seed, start + i as u64));
            }
        }
    }
    // A split fill equals a whole fill.
    let whole = stream(seed, 3, 200_000);
    let mut parts = vec![0u8; 200_000];
    let (a, b) = parts.split_at_mut(65_541);
    sim::fill(seed, 3, a);
    sim::fill(seed, 3 + 65_541, b);
    assert_eq!(whole, parts);
    // Every single-byte corruption is found at its exact index.
    let mut v = stream(seed, 5, 1000);
    for i in 0..v.len() {
        v[i] ^= 0x40;
        assert_eq!(sim::verify(seed, 5, &v), Err(i));
        v[i] ^= 0x40;
    }
    // Another seed, a shifted offset, or a swapped block is different content.
    assert!(sim::verify(seed + 1, 5, &v).is_err());
    assert!(sim::verify(seed, 6, &v).is_err());
    let blk = stream(seed, 0, 65_536);
    assert!(sim::verify(seed, 65_536, &blk).is_err());
}

#[test]
fn stop_copy_stream_is_bounded_by_max_read_and_ends_with_eof() {
    let size = 300_000u64;
    let d0 = SimConfig::new("sc", size, 42).with_max_read(5000);
    let mut d = SimDevice::new(d0);
    let t = transition(&mut d, MigState::StopCopy).unwrap();
    let fd = t.data_fd.unwrap();
    let (data, max, _) = read_all(&d, &fd, false);
    assert_eq!(data.len() as u64, size);
    assert!(max <= 5000, "read_data returned {max} > max_read");
    assert_eq!(sim::verify(42, 0, &data), Ok(()));
    assert_eq!(d.bytes_read(), size);
    // EOF is permanent.
    let mut b = [0u8; 16];
    assert_eq!(d.read_data(fd.as_fd(), &mut b).unwrap(), ReadOutcome::Eof);
    assert_eq!(d.stop_copy_size().unwrap(), size);
    transition(&mut d, MigState::Stop).unwrap();
    assert_eq!(d.bytes_read(), size);
}

#[test]
fn raw_reads_are_bounded_by_the_pipe_capacity() {
    let mut d = SimDevice::new(SimConfig::new("raw", 200_000, 9).with_max_read(4096));
    let fd = transition(&mut d, MigState::StopCopy).unwrap().data_fd.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = Vec::new();
    loop {
        let n = raw_read(fd.as_fd(), &mut buf).unwrap();
        if n == 0 {
            break;
        }
        assert!(n <= 4096, "raw read of {n}");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got.len(), 200_000);
    assert_eq!(sim::verify(9, 0, &got), Ok(()));
    // A stream fd: no positioned reads.
    assert_eq!(nix::sys::uio::pread(&fd, &mut buf[..4], 0), Err(nix::errno::Errno::ESPIPE));
}

fn precopy_then_stop_copy(end: PrecopyEnd) {
    let size = 500_000u64;
    let pre = 100_000u64;
    let cfg = SimConfig::new("pc", size, 77).with_precopy_bytes(pre).with_precopy_end(end).with_max_read(16_384);
    let mut d = SimDevice::new(cfg);
    let fd = transition(&mut d, MigState::PreCopy).unwrap().data_fd.unwrap();
    let i0 = d.precopy_info(fd.as_fd()).unwrap();
    assert_eq!((i0.initial_bytes, i0.dirty_bytes, i0.reinit), (pre, 0, false));
    // Read the initial data in small steps; initial_bytes falls to 0.
    let mut buf = vec![0u8; 10_000];
    let mut got = Vec::new();
    let mut last = pre;
    let temp_end = loop {
        match d.read_data(fd.as_fd(), &mut buf).unwrap() {
            ReadOutcome::Data(n) => {
                got.extend_from_slice(&buf[..n]);
                let i = d.precopy_info(fd.as_fd()).unwrap();
                assert!(i.initial_bytes <= last, "initial_bytes rose");
                last = i.initial_bytes;
            }
            other => break other,
        }
    };
    let want_end = if end == PrecopyEnd::NoMsg { ReadOutcome::NoMsg } else { ReadOutcome::Eof };
    assert_eq!(temp_end, want_end);
    assert_eq!(got.len() as u64, pre);
    assert_eq!(d.precopy_info(fd.as_fd()).unwrap().initial_bytes, 0);
    // The temporary end repeats.
    assert_eq!(d.read_data(fd.as_fd(), &mut buf).unwrap(), want_end);
    // P2P in between keeps the same fd and stream.
    let t = transition(&mut d, MigState::PreCopyP2p).unwrap();
    assert!(t.data_fd.is_none());
    assert_eq!(d.read_data(fd.as_fd(), &mut buf).unwrap(), want_end);
    let t = transition(&mut d, MigState::StopCopy).unwrap();
    assert!(t.data_fd.is_none(), "PRE_COPY_P2P -> STOP_COPY makes no new fd");
    assert_eq!(d.precopy_info(fd.as_fd()).unwrap_err().errno(), Some(libc::EINVAL));
    let (rest, _, _) = read_all(&d, &fd, false);
    got.extend_from_slice(&rest);
    assert_eq!(got.len() as u64, size);
    // Byte-identical to a plain STOP_COPY stream of the same device.
    let mut plain = SimDevice::new(SimConfig::new("plain", size, 77));
    let pfd = transition(&mut plain, MigState::StopCopy).unwrap().data_fd.unwrap();
    let (p, _, _) = read_all(&plain, &pfd, false);
    assert_eq!(p, got);
}

#[test]
fn precopy_enomsg_mode() {
    precopy_then_stop_copy(PrecopyEnd::NoMsg);
}

#[test]
fn precopy_zero_mode() {
    precopy_then_stop_copy(PrecopyEnd::Zero);
}

#[test]
fn precopy_info_only_in_precopy_and_only_for_the_live_fd() {
    let mut d = SimDevice::new(SimConfig::new("pi", 10_000, 1));
    let fd = transition(&mut d, MigState::PreCopy).unwrap().data_fd.unwrap();
    assert!(d.enable_precopy_info_v2().unwrap());
    assert_eq!(d.precopy_info(fd.as_fd()).unwrap().initial_bytes, 10_000);
    transition(&mut d, MigState::Running).unwrap();
    assert_eq!(d.precopy_info(fd.as_fd()).unwrap_err().errno(), Some(libc::EINVAL));
    let fd2 = transition(&mut d, MigState::PreCopy).unwrap().data_fd.unwrap();
    assert_eq!(d.precopy_info(fd.as_fd()).unwrap_err().errno(), Some(libc::ENODEV), "old session's fd");
    assert!(d.precopy_info(fd2.as_fd()).is_ok());
}

#[test]
fn session_end_disables_the_fd() {
    let mut d = SimDevice::new(SimConfig::new("end", 1 << 20, 3).with_max_read(65_536));
    let fd = transition(&mut d, MigState::StopCopy).unwrap().data_fd.unwrap();
    let mut buf = vec![0u8; 1000];
    assert!(matches!(d.read_data(fd.as_fd(), &mut buf).unwrap(), ReadOutcome::Data(_)));
    transition(&mut d, MigState::Stop).unwrap();
    assert_eq!(d.read_data(fd.as_fd(), &mut buf).unwrap_err().errno(), Some(libc::ENODEV));
    // The raw fd sees EOF at once, not a hang.
    assert_eq!(raw_read(fd.as_fd(), &mut buf).unwrap(), 0);

    // Reset mid-session: RUNNING, fd disabled.
    let fd = transition(&mut d, MigState::PreCopy).unwrap().data_fd.unwrap();
    d.reset().unwrap();
    assert_eq!(d.state().unwrap(), MigState::Running);
    assert_eq!(d.read_data(fd.as_fd(), &mut buf).unwrap_err().errno(), Some(libc::ENODEV));
    assert_eq!(raw_read(fd.as_fd(), &mut buf).unwrap(), 0);
}

#[test]
fn resume_round_trip_and_the_destination_becomes_the_source() {
    let size = 1_000_003u64;
    let mut src = SimDevice::new(SimConfig::new("src", size, 5));
    let mut dst = SimDevice::new(SimConfig::new("dst", size, 5));
    let sfd = transition(&mut src, MigState::StopCopy).unwrap().data_fd.unwrap();
    let rfd = transition(&mut dst, MigState::Resuming).unwrap().data_fd.unwrap();
    let (data, _, _) = read_all(&src, &sfd, false);
    write_all(&dst, &rfd, &data);
    let blob = src.save_config().unwrap();
    dst.load_config(&blob).unwrap();
    transition(&mut dst, MigState::Running).unwrap();
    let rep = dst.resume_report().unwrap();
    assert_eq!((rep.bytes_written, rep.verified_ok, rep.first_bad_offset), (size, true, None));
    assert_eq!(dst.config(), Some(SimDevice::expected_config(dst.sim_config())));
    // The old resume fd is disabled.
    assert_eq!(dst.write_data(rfd.as_fd(), b"x").unwrap_err().errno(), Some(libc::ENODEV));
    assert_eq!(raw_write(rfd.as_fd(), b"x").unwrap_err().raw_os_error(), Some(libc::EPIPE));
    // Its own STOP_COPY now streams the same bytes.
    let fd = transition(&mut dst, MigState::StopCopy).unwrap().data_fd.unwrap();
    let (again, _, _) = read_all(&dst, &fd, false);
    assert_eq!(again, data);
}

#[test]
fn resume_missing_bytes_stays_resuming_and_can_be_completed() {
    let size = 100_000u64;
    let mut d = SimDevice::new(SimConfig::new("miss", size, 8));
    let fd = transition(&mut d, MigState::Resuming).unwrap().data_fd.unwrap();
    let data = stream(8, 0, size as usize);
    write_all(&d, &fd, &data[..90_000]);
    match transition(&mut d, MigState::Stop).unwrap_err() {
        Error::Transition { reached, source, .. } => {
            assert_eq!(reached, MigState::Resuming);
            assert_eq!(source.errno(), Some(libc::EINVAL));
            assert!(source.to_string().contains("short"), "{source}");
        }
        e => panic!("{e}"),
    }
    assert_eq!(d.resume_report().unwrap().bytes_written, 90_000);
    // Like mtty, the file is still open: finish the stream and retry.
    write_all(&d, &fd, &data[90_000..]);
    transition(&mut d, MigState::Stop).unwrap();
    assert!(d.resume_report().unwrap().verified_ok);
}

#[test]
fn resume_extra_bytes_enomem() {
    let mut d = SimDevice::new(SimConfig::new("extra", 1000, 8));
    let fd = transition(&mut d, MigState::Resuming).unwrap().data_fd.unwrap();
    let data = stream(8, 0, 1001);
    assert_eq!(d.write_data(fd.as_fd(), &data).unwrap_err().errno(), Some(libc::ENOMEM));
    write_all(&d, &fd, &data[..1000]);
    assert_eq!(d.write_data(fd.as_fd(), &data[1000..]).unwrap_err().errno(), Some(libc::ENOMEM));
    transition(&mut d, MigState::Stop).unwrap();
}

#[test]
fn resume_raw_overflow_fails_at_stop() {
    let mut d = SimDevice::new(SimConfig::new("rawx", 1000, 8));
    let fd = transition(&mut d, MigState::Resuming).unwrap().data_fd.unwrap();
    let data = stream(8, 0, 1500);
    assert_eq!(raw_write(fd.as_fd(), &data).unwrap(), 1500);
    let e = transition(&mut d, MigState::Stop).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL));
    assert!(e.to_string().contains("longer"), "{e}");
}

#[test]
fn resume_wrong_bytes_marks_the_stream_bad_and_recover_resets() {
    let size = 200_000u64;
    let mut d = SimDevice::new(SimConfig::new("bad", size, 8));
    let fd = transition(&mut d, MigState::Resuming).unwrap().data_fd.unwrap();
    let mut data = stream(8, 0, size as usize);
    data[123_457] ^= 1;
    write_all(&d, &fd, &data); // the writes themselves succeed
    let e = transition(&mut d, MigState::Running).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL));
    assert!(e.to_string().contains("123457"), "{e}");
    assert_eq!(d.state().unwrap(), MigState::Resuming);
    let rep = d.resume_report().unwrap();
    assert_eq!((rep.verified_ok, rep.first_bad_offset), (false, Some(123_457)));
    assert_eq!(recover(&mut d, MigState::Running).unwrap(), Recovery::Reset);
    assert_eq!(d.write_data(fd.as_fd(), b"x").unwrap_err().errno(), Some(libc::ENODEV));
}

#[test]
fn read_error_fault_is_a_real_kernel_error() {
    let mut d = SimDevice::new(SimConfig::new("rerr", 100_000, 4).with_read_error_at(30_000).with_max_read(8192));
    let fd = transition(&mut d, MigState::StopCopy).unwrap().data_fd.unwrap();
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    let err = loop {
        match d.read_data(fd.as_fd(), &mut buf) {
            Ok(ReadOutcome::Data(n)) => got.extend_from_slice(&buf[..n]),
            Ok(o) => panic!("unexpected {o:?} after {} bytes", got.len()),
            Err(e) => break e,
        }
    };
    assert_eq!(got.len(), 30_000);
    assert_eq!(sim::verify(4, 0, &got), Ok(()));
    assert_eq!(err.errno(), Some(libc::ECONNRESET));
    transition(&mut d, MigState::Stop).unwrap();
}

#[test]
fn write_error_fault_gives_epipe() {
    let size = 4u64 << 20;
    let mut d = SimDevice::new(SimConfig::new("werr", size, 4).with_write_error_at(100_000));
    let fd = transition(&mut d, MigState::Resuming).unwrap().data_fd.unwrap();
    let data = stream(4, 0, size as usize);
    let mut off = 0usize;
    let err = loop {
        match d.write_data(fd.as_fd(), &data[off..(off + 65_536).min(data.len())]) {
            Ok(n) => off += n,
            Err(e) => break e,
        }
        assert!(off < data.len(), "never failed");
    };
    assert_eq!(err.errno(), Some(libc::EPIPE));
    assert!(off >= 100_000);
    assert_eq!(transition(&mut d, MigState::Stop).unwrap_err().errno(), Some(libc::EINVAL));
    assert_eq!(d.resume_report().unwrap().bytes_written, 100_000);
}

#[test]
fn truncated_stream_ends_early() {
    let mut d = SimDevice::new(SimConfig::new("trunc", 100_000, 4).with_truncate_at(12_345));
    let fd = transition(&mut d, MigState::StopCopy).unwrap().data_fd.unwrap();
    let (got, _, _) = read_all(&d, &fd, false);
    assert_eq!(got.len(), 12_345);
    assert_eq!(sim::verify(4, 0, &got), Ok(()));
}

#[test]
fn config_blob_validation() {
    let cfg = SimConfig::new("cfg", 1, 99);
    let mut d = SimDevice::new(cfg.clone());
    let blob = d.save_config().unwrap();
    assert_eq!(blob.len(), 64);
    assert_eq!(blob, SimDevice::expected_config(&cfg));
    assert_eq!(&blob[..8], &sim::SIM_CONFIG_MAGIC);
    let mut bad_magic = blob.clone();
    bad_magic[1] ^= 1;
    let mut bad_len = blob.clone();
    bad_len[8] = 63;
    let other_len = SimDevice::expected_config(&cfg.clone().with_config_len(128));
    for b in [&blob[..10], &bad_magic[..], &bad_len[..], &blob[..63], &other_len[..]] {
        assert!(matches!(d.load_config(b), Err(Error::BadConfig { .. })));
    }
    assert_eq!(d.config(), None);
    d.load_config(&blob).unwrap();
    assert_eq!(d.config(), Some(blob));
    // Tiny config_len still gives a valid, self-describing blob.
    let tiny = SimDevice::expected_config(&cfg.with_config_len(0));
    assert_eq!(tiny.len(), sim::SIM_CONFIG_HEADER);
}

#[test]
fn throughput_paces_the_producer_and_drop_is_prompt() {
    let mut d = SimDevice::new(SimConfig::new("slow", 1 << 20, 2).with_throughput(8 << 20).with_max_read(65_536));
    let t0 = Instant::now();
    let fd = transition(&mut d, MigState::StopCopy).unwrap().data_fd.unwrap();
    let (got, _, _) = read_all(&d, &fd, false);
    let el = t0.elapsed();
    assert_eq!(got.len(), 1 << 20);
    assert!(el >= Duration::from_millis(100), "1 MiB at 8 MiB/s took only {el:?}");

    // A very slow device: drop mid-stream returns promptly and the raw fd ends.
    let mut d = SimDevice::new(
        SimConfig::new("slower", 1 << 30, 2).with_throughput(1000).with_read_latency(Duration::from_secs(5)),
    );
    let fd = transition(&mut d, MigState::StopCopy).unwrap().data_fd.unwrap();
    let t0 = Instant::now();
    drop(d);
    assert!(t0.elapsed() < Duration::from_secs(2), "drop took {:?}", t0.elapsed());
    let mut b = [0u8; 8];
    assert_eq!(raw_read(fd.as_fd(), &mut b).unwrap(), 0);
}

#[test]
fn zero_size_and_empty_buffers() {
    let mut d = SimDevice::new(SimConfig::new("z", 0, 2));
    let fd = transition(&mut d, MigState::PreCopy).unwrap().data_fd.unwrap();
    assert_eq!(d.precopy_info(fd.as_fd()).unwrap().initial_bytes, 0);
    let mut b = [0u8; 8];
    assert_eq!(d.read_data(fd.as_fd(), &mut b).unwrap(), ReadOutcome::NoMsg);
    transition(&mut d, MigState::StopCopy).unwrap();
    assert_eq!(d.read_data(fd.as_fd(), &mut b).unwrap(), ReadOutcome::Eof);
    assert_eq!(d.read_data(fd.as_fd(), &mut []).unwrap(), ReadOutcome::Eof);
    // A resume fd is not a save fd and vice versa.
    transition(&mut d, MigState::Stop).unwrap();
    let rfd = transition(&mut d, MigState::Resuming).unwrap().data_fd.unwrap();
    assert_eq!(d.read_data(rfd.as_fd(), &mut b).unwrap_err().errno(), Some(libc::EINVAL));
    assert_eq!(d.precopy_info(rfd.as_fd()).unwrap_err().errno(), Some(libc::ENOTTY));
    assert_eq!(d.write_data(rfd.as_fd(), &[]).unwrap(), 0);
}

/// How an io_uring engine uses the fd: raw reads, with PRECOPY_INFO deciding when the
/// pre-copy data is exhausted (a raw read at the temporary end would block), and a reader
/// thread that keeps reading across the PRE_COPY -> STOP_COPY SET made on another thread.
#[test]
fn raw_reader_thread_across_precopy_and_stop_copy() {
    let size = 3_000_000u64;
    let cfg = SimConfig::new("io", size, 31).with_precopy_bytes(1_000_000).with_max_read(65_536);
    let mut d = SimDevice::new(cfg);
    let fd = transition(&mut d, MigState::PreCopy).unwrap().data_fd.unwrap();
    let mut buf = vec![0u8; 65_536];
    let mut got = Vec::new();
    loop {
        let i = d.precopy_info(fd.as_fd()).unwrap();
        if i.initial_bytes == 0 && i.dirty_bytes == 0 {
            break;
        }
        let n = raw_read(fd.as_fd(), &mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got.len(), 1_000_000);
    assert_eq!(d.bytes_read(), 1_000_000);
    let reader_fd = fd.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        let mut got = Vec::new();
        loop {
            let n = raw_read(reader_fd.as_fd(), &mut buf).unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
        }
    });
    std::thread::sleep(Duration::from_millis(20)); // the reader is now blocked in read()
    transition(&mut d, MigState::StopCopy).unwrap();
    got.extend_from_slice(&reader.join().unwrap());
    assert_eq!(got.len() as u64, size);
    assert_eq!(sim::verify(31, 0, &got), Ok(()));
    assert_eq!(d.bytes_read(), size);
}

// ---------------------------------------------------------------------------------------------
// Quirks of real data fds: O_NONBLOCK save and resume fds, a slow consumer, a small resume pipe.
// ---------------------------------------------------------------------------------------------

fn fd_flags(fd: BorrowedFd<'_>) -> OFlag {
    OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL).unwrap())
}

fn wait_for(fd: BorrowedFd<'_>, ev: PollFlags) {
    let _ = poll(&mut [PollFd::new(fd, ev)], PollTimeout::from(100u16));
}

/// mlx5 with `O_NONBLOCK`: a raw read of a slow device's save fd gives `EAGAIN` while no data
/// is ready; the stream is still complete and in order, and ends with EOF.
#[test]
fn nonblocking_save_fd_gives_eagain_on_a_slow_device() {
    let size = 256 * 1024;
    let cfg =
        SimConfig::new("nb", size, 17).with_max_read(16 * 1024).with_throughput(4 << 20).with_nonblocking_save(true);
    let mut d = SimDevice::new(cfg);
    let fd = transition(&mut d, MigState::StopCopy).unwrap().data_fd.unwrap();
    assert!(fd_flags(fd.as_fd()).contains(OFlag::O_NONBLOCK), "the SET hands out an O_NONBLOCK fd");
    let mut buf = vec![0u8; 64 * 1024];
    let (mut got, mut eagain) = (Vec::new(), 0u32);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "stream did not end");
        match raw_read(fd.as_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                eagain += 1;
                wait_for(fd.as_fd(), PollFlags::POLLIN);
            }
            Err(e) => panic!("raw read: {e}"),
        }
    }
    assert!(eagain > 0, "a paced producer behind an O_NONBLOCK fd never gave EAGAIN");
    assert_eq!(got.len() as u64, size);
    assert_eq!(sim::verify(17, 0, &got), Ok(()));
    // EOF is permanent, never EAGAIN.
    assert_eq!(raw_read(fd.as_fd(), &mut buf).unwrap(), 0);

    // The device's own read path hides EAGAIN: it waits like a blocking driver read.
    let cfg =
        SimConfig::new("nb2", size, 18).with_max_read(16 * 1024).with_throughput(4 << 20).with_nonblocking_save(true);
    let mut d = SimDevice::new(cfg);
    let fd = transition(&mut d, MigState::StopCopy).unwrap().data_fd.unwrap();
    let (data, max, end) = read_all(&d, &fd, false);
    assert_eq!((data.len() as u64, end), (size, ReadOutcome::Eof));
    assert!(max <= 16 * 1024);
    assert_eq!(sim::verify(18, 0, &data), Ok(()));

    // Without the quirk the fd stays blocking.
    let mut d = SimDevice::new(SimConfig::new("b", 1, 1));
    let fd = transition(&mut d, MigState::StopCopy).unwrap().data_fd.unwrap();
    assert!(!fd_flags(fd.as_fd()).contains(OFlag::O_NONBLOCK));
}

/// At the PRE_COPY temporary end a raw read of an O_NONBLOCK save fd gives EAGAIN (a blocking
/// one would block), while `read_data` still reports the driver's outcome.
#[test]
fn nonblocking_save_fd_at_the_precopy_temporary_end() {
    let cfg = SimConfig::new("pe", 200_000, 5).with_precopy_bytes(50_000).with_nonblocking_save(true);
    let mut d = SimDevice::new(cfg);
    let fd = transition(&mut d, MigState::PreCopy).unwrap().data_fd.unwrap();
    let (data, _, end) = read_all(&d, &fd, true);
    assert_eq!((data.len(), end), (50_000, ReadOutcome::NoMsg));
    let mut b = [0u8; 16];
    assert_eq!(raw_read(fd.as_fd(), &mut b).unwrap_err().raw_os_error(), Some(libc::EAGAIN));
    transition(&mut d, MigState::StopCopy).unwrap();
    let (rest, _, end) = read_all(&d, &fd, false);
    assert_eq!((rest.len(), end), (150_000, ReadOutcome::Eof));
    assert_eq!(sim::verify(5, 50_000, &rest), Ok(()));
}

/// A slow consumer behind a small O_NONBLOCK resume pipe: raw writes larger than the pipe come
/// back short, and a full pipe gives EAGAIN. Every byte is still verified.
#[test]
fn nonblocking_resume_fd_gives_short_writes_and_eagain_with_a_slow_consumer() {
    let size = 1 << 20;
    let cfg = SimConfig::new("nr", size, 23)
        .with_nonblocking_resume(true)
        .with_resume_pipe_bytes(16 * 1024)
        .with_resume_throughput(16 << 20);
    let mut d = SimDevice::new(cfg);
    let fd = transition(&mut d, MigState::Resuming).unwrap().data_fd.unwrap();
    assert!(fd_flags(fd.as_fd()).contains(OFlag::O_NONBLOCK));
    assert_eq!(fcntl(fd.as_fd(), FcntlArg::F_GETPIPE_SZ).unwrap(), 16 * 1024, "resume pipe capacity");
    let data = stream(23, 0, size as usize);
    let (mut off, mut eagain, mut short) = (0usize, 0u32, 0u32);
    let deadline = Instant::now() + Duration::from_secs(10);
    while off < data.len() {
        assert!(Instant::now() < deadline, "consumer stalled at {off}");
        let want = (data.len() - off).min(64 * 1024);
        match raw_write(fd.as_fd(), &data[off..off + want]) {
            Ok(n) => {
                assert!(n > 0);
                if n < want {
                    short += 1;
                }
                off += n;
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                eagain += 1;
                wait_for(fd.as_fd(), PollFlags::POLLOUT);
            }
            Err(e) => panic!("raw write: {e}"),
        }
    }
    assert!(eagain > 0, "a slow consumer behind an O_NONBLOCK fd never gave EAGAIN");
    assert!(short > 0, "64 KiB writes into a 16 KiB pipe were never short");
    transition(&mut d, MigState::Stop).unwrap();
    let rep = d.resume_report().unwrap();
    assert!(rep.verified_ok, "{rep:?}");
    assert_eq!(rep.bytes_written, size);

    // write_data hides EAGAIN: every call makes progress.
    let cfg = SimConfig::new("nr2", 256 * 1024, 24)
        .with_nonblocking_resume(true)
        .with_resume_pipe_bytes(4096)
        .with_resume_throughput(8 << 20);
    let mut d = SimDevice::new(cfg);
    let fd = transition(&mut d, MigState::Resuming).unwrap().data_fd.unwrap();
    write_all(&d, &fd, &stream(24, 0, 256 * 1024));
    transition(&mut d, MigState::Running).unwrap();
    assert!(d.resume_report().unwrap().verified_ok);
}

/// A slow consumer behind a small blocking resume pipe: a raw write larger than the pipe
/// blocks until the consumer has taken (almost) all of it.
#[test]
fn slow_consumer_blocks_a_blocking_writer() {
    let size = 512 * 1024;
    let rate = 4u64 << 20;
    let cfg = SimConfig::new("sb", size, 29).with_resume_pipe_bytes(8 * 1024).with_resume_throughput(rate);
    let mut d = SimDevice::new(cfg);
    let fd = transition(&mut d, MigState::Resuming).unwrap().data_fd.unwrap();
    assert!(!fd_flags(fd.as_fd()).contains(OFlag::O_NONBLOCK));
    let data = stream(29, 0, size as usize);
    let t0 = Instant::now();
    let mut off = 0;
    while off < data.len() {
        off += raw_write(fd.as_fd(), &data[off..]).unwrap();
    }
    // The pipe holds 8 KiB; the rest went through the consumer at `rate` (0.125 s at 4 MiB/s).
    let el = t0.elapsed();
    assert!(el >= Duration::from_millis(80), "512 KiB through a 4 MiB/s consumer took only {el:?}");
    transition(&mut d, MigState::Stop).unwrap();
    let rep = d.resume_report().unwrap();
    assert!(rep.verified_ok && rep.bytes_written == size, "{rep:?}");
}
