//! Hostile peers and faults around the source's end of a transfer, on both backends: a
//! destination that writes back, one that never closes, a source file that changes while it is
//! sent. The source never reports success for data a reset may have destroyed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{MigState, MigrationDevice};
use vfio_multifd::{Backend, DeviceOptions, Error, Source, SourceConfig};
use vfio_multifd_tests::{dev_id, each_backend, open_fds, tcp_pairs};

const CHUNK: usize = 64 * 1024;

/// The tests of this file run one at a time: the leak checks count the process's descriptors.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn sc(b: Backend, return_path: bool) -> SourceConfig {
    SourceConfig::new()
        .chunk_bytes(CHUNK)
        .backend(b)
        .return_path(return_path)
        .zerocopy(vfio_multifd::ZeroCopy::Off)
        .stall_timeout(Duration::from_secs(2))
}

/// What the fake destination does besides reading every channel to its end.
#[derive(Clone, Copy)]
struct Peer {
    /// Writes one byte on this channel first.
    write_back_on: Option<usize>,
    /// Keeps its connections open after the sender's EOF until told.
    never_close: bool,
}

/// Runs a source of one simulated device of `size` bytes over `n` channels to a fake
/// destination that reads every channel to its EOF (counting bytes) and behaves as `peer` says.
/// Returns the source's result, the bytes the destination read, and the source device's state.
fn run(b: Backend, return_path: bool, n: usize, size: u64, peer: Peer) -> (vfio_multifd::Result<()>, u64, MigState) {
    let (c, s) = tcp_pairs(n);
    let mut dev = SimDevice::new(SimConfig::new("d", size, 3));
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc_| {
        let done = &done;
        let readers: Vec<_> = s
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                sc_.spawn(move || {
                    let mut t = TcpStream::from(fd);
                    if peer.write_back_on == Some(i) {
                        t.write_all(&[0x5a]).unwrap();
                    }
                    let mut buf = vec![0u8; 1 << 16];
                    let mut got = 0u64;
                    loop {
                        match t.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => got += k as u64,
                        }
                    }
                    while peer.never_close && !done.load(std::sync::atomic::Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    got
                })
            })
            .collect();
        let mut src = Source::new(sc(b, return_path), c).unwrap();
        src.add_device_with(dev_id(0), &mut dev, DeviceOptions { precopy: false, final_state: MigState::Stop });
        let r = src.run().map(|_| ());
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let got = readers.into_iter().map(|h| h.join().unwrap()).sum();
        (r, got, dev.state().unwrap())
    })
}

const NORMAL: Peer = Peer { write_back_on: None, never_close: false };

#[test]
fn hostile_control_a_peer_that_reads_and_closes_gets_everything() {
    let _g = serial();
    each_backend(|b| {
        let (r, got, st) = run(b, false, 2, 4 << 20, NORMAL);
        r.unwrap_or_else(|e| panic!("{b:?}: {e}"));
        assert!(got > 4 << 20, "{b:?}: the destination read {got} bytes");
        assert_eq!(st, MigState::Stop);
    });
}

#[test]
fn hostile_peer_writes_one_byte_back_fails_the_send() {
    let _g = serial();
    each_backend(|b| {
        for (return_path, ch) in [(false, 0), (false, 1), (true, 0), (true, 1)] {
            let peer = Peer { write_back_on: Some(ch), never_close: false };
            let (r, _, st) = run(b, return_path, 2, 4 << 20, peer);
            let what = format!("{b:?}, return path offered {return_path}, byte on channel {ch}");
            match r {
                Err(Error::UnexpectedInput { channel, bytes: 1, first }) => {
                    assert_eq!(channel.get(), ch as u8, "{what}");
                    assert_eq!(first, [0x5a], "{what}");
                }
                // The return path's reader on channel 0 takes it: it is no HELLO.
                Err(Error::ReturnPath { what: w }) if return_path && ch == 0 => {
                    assert!(w.contains("1 byte(s) on channel 0 without accepting"), "{what}: {w}");
                }
                other => panic!("{what}: expected an unexpected-input error, got {other:?}"),
            }
            assert_eq!(st, MigState::Running, "{what}: a failed send puts the source device back");
        }
    });
}

#[test]
fn hostile_peer_that_never_closes_fails_within_the_stall_timeout() {
    let _g = serial();
    each_backend(|b| {
        let fds = open_fds();
        let t0 = Instant::now();
        let peer = Peer { write_back_on: None, never_close: true };
        let (r, got, st) = run(b, false, 2, 1 << 20, peer);
        let took = t0.elapsed();
        match r {
            Err(Error::Timeout { what, after }) => {
                assert_eq!(after, Duration::from_secs(2));
                assert!(what.contains("close the connection after the end of the stream"), "{b:?}: {what}");
            }
            other => panic!("{b:?}: expected a timeout, got {other:?}"),
        }
        assert!(got > 1 << 20, "{b:?}: everything was sent ({got} bytes)");
        assert!(took < Duration::from_secs(5), "{b:?}: took {took:?}");
        assert_eq!(st, MigState::Running);
        assert_eq!(open_fds(), fds, "{b:?}: descriptors leaked");
    });
}

/// `Source::new` takes any stream sockets; a byte written back on a Unix socket is caught too.
#[test]
fn hostile_peer_writes_back_on_a_unix_socket() {
    let _g = serial();
    each_backend(|b| {
        let (a, z) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut dev = SimDevice::new(SimConfig::new("d", 256 << 10, 3));
        let r = std::thread::scope(|s| {
            let h = s.spawn(move || {
                let mut z = z;
                z.write_all(b"ok").unwrap();
                let mut v = Vec::new();
                let _ = z.read_to_end(&mut v);
                v.len()
            });
            let mut src = Source::new(sc(b, false), vec![OwnedFd::from(a)]).unwrap();
            src.add_device(dev_id(0), &mut dev);
            let r = src.run().map(|_| ());
            assert!(h.join().unwrap() > 256 << 10);
            r
        });
        assert!(matches!(r, Err(Error::UnexpectedInput { bytes: 2, .. })), "{b:?}: {r:?}");
    });
}

/// Sends a saved stream file whose size changes between `add_data_fd` and the end of its
/// stream (`change` runs after it was added) to a destination that drains every channel.
fn send_changing_file(b: Backend, change: impl FnOnce(&std::fs::File)) -> vfio_multifd::Result<()> {
    let path = std::env::temp_dir().join(format!("vfmfd-hostile-{}-{b:?}", std::process::id()));
    std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let (c, s) = tcp_pairs(2);
    let config = b"config".to_vec();
    std::thread::scope(|sc_| {
        let drains: Vec<_> = s
            .into_iter()
            .map(|fd| {
                sc_.spawn(move || {
                    let _ = std::io::copy(&mut TcpStream::from(fd), &mut std::io::sink());
                })
            })
            .collect();
        let mut src = Source::new(sc(b, false), c).unwrap();
        src.add_data_fd(dev_id(0), std::os::fd::AsFd::as_fd(&file), &config);
        change(&file);
        let r = src.run().map(|_| ());
        drains.into_iter().for_each(|h| h.join().unwrap());
        r
    })
}

#[test]
fn fault_source_file_truncated_while_sent_fails_without_its_config() {
    let _g = serial();
    each_backend(|b| {
        let r = send_changing_file(b, |f| f.set_len(300_000).unwrap());
        match r {
            Err(Error::SourceChanged { sent: 300_000, expected, .. }) => assert_eq!(expected, 1 << 20),
            other => panic!("{b:?}: expected SourceChanged, got {other:?}"),
        }
        let r = send_changing_file(b, |f| f.set_len(2 << 20).unwrap());
        assert!(matches!(r, Err(Error::SourceChanged { sent, .. }) if sent == 2 << 20), "{b:?}: grown: {r:?}");
        send_changing_file(b, |_| {}).unwrap_or_else(|e| panic!("{b:?}: unchanged file: {e}"));
    });
}

/// SEND_ZC to a peer that stays connected without reading: the send fails at the stall timeout
/// (not 10 s later, after a drain the kernel cannot finish), says what the kernel still held,
/// and leaks neither the ring nor its pool.
#[test]
fn hostile_zero_copy_to_a_peer_that_never_reads_fails_at_the_stall_timeout_without_leaks() {
    let _g = serial();
    if let Some(why) = vfio_multifd_tests::uring_unavailable_reason() {
        assert!(!vfio_multifd_tests::in_ci(), "io_uring unavailable under CI=true: {why}");
        eprintln!("skipped: io_uring unavailable: {why}");
        return;
    }
    let fds = open_fds();
    for attempt in 0..2 {
        let (c, s) = tcp_pairs(2);
        let mut dev = SimDevice::new(SimConfig::new("d", 256 << 20, 3));
        let cfg = SourceConfig::new()
            .chunk_bytes(1 << 20)
            .backend(Backend::Uring)
            .zerocopy(vfio_multifd::ZeroCopy::On)
            .return_path(false)
            .stall_timeout(Duration::from_secs(2));
        let t0 = Instant::now();
        let mut src = Source::new(cfg, c).unwrap();
        src.add_device(dev_id(0), &mut dev);
        let r = src.run();
        let took = t0.elapsed();
        drop(s);
        match r {
            Err(Error::Timeout { what, .. }) => {
                assert!(what.contains("zero-copy buffers the kernel has not given back"), "{attempt}: {what}");
            }
            other => panic!("attempt {attempt}: expected a stall, got {other:?}"),
        }
        assert!(took < Duration::from_secs(5), "attempt {attempt}: took {took:?} for a 2 s stall timeout");
        assert_eq!(dev.state().unwrap(), MigState::Running);
    }
    assert_eq!(open_fds(), fds, "descriptors leaked (a ring kept by a drain that could not finish)");
}

/// A packet that arrives slowly but steadily (1 MiB at 256 KiB/s, 4 s with a 1 s stall timeout)
/// is progress, not a stall, on both backends: progress counts bytes, not whole packets.
#[test]
fn hostile_slow_but_steady_packet_is_not_a_stall() {
    let _g = serial();
    each_backend(|b| {
        const LEN: usize = 1 << 20;
        let cfg = SimConfig::new("d", LEN as u64, 11);
        let rcfg = vfio_multifd::ReceiverConfig::new()
            .max_packet_bytes(LEN)
            .backend(b)
            .return_path(false)
            .stall_timeout(Duration::from_secs(1));
        let (res, dests) = vfio_multifd_tests::receive_from(std::slice::from_ref(&cfg), 1, rcfg, |addr| {
            let mut s = vfio_multifd_tests::RawSender::connect(addr, 1);
            s.init(0, 0);
            let data = vfio_multifd_tests::sim_bytes(11, 0, LEN);
            let mut pkt = Vec::new();
            let mut hdr = vec![0u8; vfio_multifd::wire::PACKET_OVERHEAD];
            let v = vfio_multifd::wire::VfioPacketHeader { idx: 0, flags: 0 };
            vfio_multifd::wire::encode_packet_header(&dev_id(0), v, LEN, &mut hdr).unwrap();
            pkt.extend_from_slice(&hdr);
            pkt.extend_from_slice(&data);
            // 16 KiB every 62.5 ms: 256 KiB/s.
            for piece in pkt.chunks(16 << 10) {
                s.raw(0, piece);
                std::thread::sleep(Duration::from_micros(62_500));
            }
            s.packet(0, &dev_id(0), 1, true, &SimDevice::expected_config(&cfg));
            s.finish();
        });
        let rep = res.unwrap_or_else(|e| panic!("{b:?}: {e}"));
        assert_eq!(rep.devices[0].data_bytes, LEN as u64, "{b:?}");
        assert!(dests[0].resume_report().unwrap().verified_ok, "{b:?}");
    });
}

/// The other side of byte progress: a packet that stops arriving half-way is a stall at the
/// stall timeout on both backends (the harvests that collect its partial bytes never count as
/// progress by themselves), and the error names the packet.
#[test]
fn hostile_packet_that_stops_half_way_is_a_stall_naming_the_packet() {
    let _g = serial();
    each_backend(|b| {
        const LEN: usize = 1 << 20;
        let cfg = SimConfig::new("d", LEN as u64, 11);
        let rcfg = vfio_multifd::ReceiverConfig::new()
            .max_packet_bytes(LEN)
            .backend(b)
            .return_path(false)
            .stall_timeout(Duration::from_secs(1));
        let t0 = Instant::now();
        let (res, _) = vfio_multifd_tests::receive_from(&[cfg], 1, rcfg, |addr| {
            let mut s = vfio_multifd_tests::RawSender::connect(addr, 1);
            s.init(0, 0);
            let mut pkt = vec![0u8; vfio_multifd::wire::PACKET_OVERHEAD];
            let v = vfio_multifd::wire::VfioPacketHeader { idx: 0, flags: 0 };
            vfio_multifd::wire::encode_packet_header(&dev_id(0), v, LEN, &mut pkt).unwrap();
            pkt.extend_from_slice(&vfio_multifd_tests::sim_bytes(11, 0, LEN / 2));
            s.raw(0, &pkt);
            // Stay connected, silent, until the receiver gave up.
            std::thread::sleep(Duration::from_millis(2500));
        });
        match res {
            Err(Error::Timeout { what, .. }) => {
                assert!(what.contains("packet 0 of device 0000:00:02.0/vfio"), "{b:?}: {what}");
            }
            other => panic!("{b:?}: expected a stall, got {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(6), "{b:?}");
    });
}

/// A destination fd whose writes block (a pipe whose reader stopped reading, opened blocking):
/// the receive fails at the stall timeout on both backends instead of hanging in write(2).
#[test]
fn fault_destination_pipe_whose_reader_stops_fails_at_the_stall_timeout() {
    let _g = serial();
    each_backend(|b| {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (c, s) = tcp_pairs(2);
        let mut dev = SimDevice::new(SimConfig::new("d", 16 << 20, 3));
        let mut config = Vec::new();
        let t0 = Instant::now();
        let (src, rx) = std::thread::scope(|sc_| {
            let config = &mut config;
            let w = &w;
            let h = sc_.spawn(move || {
                let rcfg = vfio_multifd::ReceiverConfig::new()
                    .max_packet_bytes(CHUNK)
                    .backend(b)
                    .return_path(false)
                    .stall_timeout(Duration::from_secs(1));
                let mut rx = vfio_multifd::Receiver::new(rcfg).unwrap();
                rx.add_data_fd(dev_id(0), std::os::fd::AsFd::as_fd(w), config);
                rx.run(s)
            });
            let mut src = Source::new(sc(b, false), c).unwrap();
            src.add_device(dev_id(0), &mut dev);
            let src = src.run();
            (src, h.join().unwrap())
        });
        let took = t0.elapsed();
        drop(r);
        match rx {
            Err(Error::Timeout { after, .. }) => assert_eq!(after, Duration::from_secs(1)),
            other => panic!("{b:?}: expected a stall, got {other:?}"),
        }
        assert!(src.is_err(), "{b:?}: the source succeeded");
        assert!(took < Duration::from_secs(6), "{b:?}: took {took:?}");
    });
}

/// A scratch regular file on tmpfs (`/dev/shm` when there is one), removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let p = dir.join(format!("vfmfd-test-{}-{name}", std::process::id()));
        std::fs::write(&p, b"").unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Sends `devs` simulated devices over `channels` channels to a receiver that writes each
/// device's stream into `sinks[i]`, with an out-of-order budget of `budget` bytes.
fn send_into_fds(
    b: Backend,
    devs: &mut [SimDevice],
    sinks: &[std::fs::File],
    channels: usize,
    budget: usize,
) -> (vfio_multifd::Result<()>, vfio_multifd::Result<vfio_multifd::ReceiverReport>) {
    let (c, s) = tcp_pairs(channels);
    let mut configs: Vec<Vec<u8>> = sinks.iter().map(|_| Vec::new()).collect();
    std::thread::scope(|sc_| {
        let configs = &mut configs;
        let h = sc_.spawn(move || {
            let rcfg = vfio_multifd::ReceiverConfig::new()
                .max_packet_bytes(CHUNK)
                .budget_bytes(budget)
                .backend(b)
                .return_path(false)
                .stall_timeout(Duration::from_secs(2));
            let mut rx = vfio_multifd::Receiver::new(rcfg).unwrap();
            for (i, (f, cfg)) in sinks.iter().zip(configs.iter_mut()).enumerate() {
                rx.add_data_fd(dev_id(i), std::os::fd::AsFd::as_fd(f), cfg);
            }
            rx.run(s)
        });
        let mut src = Source::new(sc(b, false), c).unwrap();
        for (i, d) in devs.iter_mut().enumerate() {
            src.add_device(dev_id(i), d);
        }
        let src = src.run().map(|_| ());
        (src, h.join().unwrap())
    })
}

/// Four regular-file destinations (each written by its own writer thread on io_uring) over
/// three channels, with a budget of one packet so that channels park and are kicked by the
/// writers: every file holds exactly its device's stream, on both backends.
#[test]
fn hostile_file_destinations_with_a_one_packet_budget_are_written_whole() {
    let _g = serial();
    each_backend(|b| {
        const SIZE: u64 = 3 << 20;
        let cfgs: Vec<SimConfig> = (0..4).map(|i| SimConfig::new(format!("f{i}"), SIZE, 40 + i)).collect();
        let mut devs: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
        let scratch: Vec<Scratch> = (0..4).map(|i| Scratch::new(&format!("whole{i}"))).collect();
        let sinks: Vec<std::fs::File> =
            scratch.iter().map(|s| std::fs::OpenOptions::new().write(true).open(&s.0).unwrap()).collect();
        let (src, rx) = send_into_fds(b, &mut devs, &sinks, 3, CHUNK);
        src.unwrap_or_else(|e| panic!("{b:?}: source: {e}"));
        let report = rx.unwrap_or_else(|e| panic!("{b:?}: receiver: {e}"));
        assert_eq!(report.devices.len(), 4);
        for (i, (s, c)) in scratch.iter().zip(&cfgs).enumerate() {
            let got = std::fs::read(&s.0).unwrap();
            assert_eq!(got.len() as u64, SIZE, "{b:?}: device {i}: file length");
            assert!(
                got == vfio_multifd_tests::sim_bytes(c.seed, 0, SIZE as usize),
                "{b:?}: device {i}: content differs"
            );
        }
    });
}

/// A regular-file destination that refuses writes (opened read-only: `EBADF`): the receive
/// fails with the device-write error naming the device, on both backends, and nothing hangs.
#[test]
fn fault_destination_file_that_refuses_writes_fails_with_a_device_write_error() {
    let _g = serial();
    each_backend(|b| {
        let mut devs =
            vec![SimDevice::new(SimConfig::new("a", 4 << 20, 51)), SimDevice::new(SimConfig::new("r", 4 << 20, 52))];
        let scratch = [Scratch::new("ok"), Scratch::new("ro")];
        let sinks = [
            std::fs::OpenOptions::new().write(true).open(&scratch[0].0).unwrap(),
            std::fs::File::open(&scratch[1].0).unwrap(),
        ];
        let t0 = Instant::now();
        let (_src, rx) = send_into_fds(b, &mut devs, &sinks, 2, 2 * CHUNK);
        match rx {
            Err(Error::DeviceWrite { device, source, .. }) => {
                assert_eq!(device, dev_id(1), "{b:?}");
                assert_eq!(source.raw_os_error(), Some(libc::EBADF), "{b:?}");
            }
            other => panic!("{b:?}: expected a device write error, got {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(6), "{b:?}: took {:?}", t0.elapsed());
    });
}

/// Two devices, one quiet for three stall timeouts while the other streams: legal, and it
/// completes on both backends (progress is receive-wide, not per device).
#[test]
fn hostile_quiet_device_while_another_streams_is_not_a_stall() {
    let _g = serial();
    each_backend(|b| {
        const LEN: usize = 64 << 10;
        let a = SimConfig::new("a", 24 * LEN as u64, 21);
        let q = SimConfig::new("q", LEN as u64, 22);
        let rcfg = vfio_multifd::ReceiverConfig::new()
            .max_packet_bytes(LEN)
            .backend(b)
            .return_path(false)
            .stall_timeout(Duration::from_secs(1));
        let cfgs = [a.clone(), q.clone()];
        let (res, dests) = vfio_multifd_tests::receive_from(&cfgs, 2, rcfg, |addr| {
            let mut s = vfio_multifd_tests::RawSender::connect(addr, 2);
            s.init(0, 0);
            s.init(1, 1);
            // The quiet device's data first, then nothing from it for 3 s.
            s.packet(1, &dev_id(1), 0, false, &vfio_multifd_tests::sim_bytes(22, 0, LEN));
            for i in 0..24u32 {
                let off = u64::from(i) * LEN as u64;
                s.packet(0, &dev_id(0), i, false, &vfio_multifd_tests::sim_bytes(21, off, LEN));
                std::thread::sleep(Duration::from_millis(125));
            }
            s.packet(0, &dev_id(0), 24, true, &SimDevice::expected_config(&a));
            s.packet(1, &dev_id(1), 1, true, &SimDevice::expected_config(&q));
            s.finish();
        });
        res.unwrap_or_else(|e| panic!("{b:?}: {e}"));
        assert!(dests.iter().all(|d| d.resume_report().unwrap().verified_ok), "{b:?}");
    });
}

/// A destination that reads a few bytes and resets the connection while a 1 MiB packet is
/// being sent: the send fails naming the channel and saying the connection was closed or
/// reset, on both backends (io_uring's `MSG_WAITALL` send then returns short, which used to
/// be reported as a bare "short send").
#[test]
fn hostile_peer_reset_during_a_send_says_the_connection_was_reset() {
    let _g = serial();
    each_backend(|b| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            c.read_exact(&mut buf).unwrap();
            // SO_LINGER 0: the close is a reset.
            let s2 = reset_on_drop(c);
            drop(s2);
        });
        let sock = OwnedFd::from(TcpStream::connect(addr).unwrap());
        let mut dev = SimDevice::new(SimConfig::new("src0", 64 << 20, 3));
        let cfg = sc(b, false).chunk_bytes(1 << 20);
        let mut src = Source::new(cfg, vec![sock]).unwrap();
        src.add_device_with(dev_id(0), &mut dev, DeviceOptions { precopy: false, final_state: MigState::Stop });
        let r = src.run();
        peer.join().unwrap();
        match r {
            Err(e @ Error::Channel { .. }) => {
                let text = e.to_string();
                assert!(
                    ["reset", "closed", "Broken pipe"].iter().any(|w| text.contains(w)),
                    "{b:?}: the error does not say the connection went away: {text}"
                );
            }
            other => panic!("{b:?}: expected a channel error, got {other:?}"),
        }
    });
}

/// Sets `SO_LINGER` 0 on `c` so that dropping it resets the connection.
fn reset_on_drop(c: TcpStream) -> TcpStream {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    nix::sys::socket::setsockopt(&c, nix::sys::socket::sockopt::Linger, &l).unwrap();
    c
}
