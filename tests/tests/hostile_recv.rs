//! Hostile peers around the receiver's channel set-up and the end of a transfer, on both
//! backends (issue 10, items 1, 2, 8 and 11): port scanners and strays before a correct source,
//! the set-up deadline, a source that streams on channel 0 before it connects channel 1, a
//! source with more channels than the receiver, a reset or open channels or one more packet
//! after a complete stream, impossible settings, and what a stall error names.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{MigState, MigrationDevice};
use vfio_multifd::{Backend, DeviceOptions, Error, ReceiverConfig, ReceiverReport, Source, SourceConfig};
use vfio_multifd_tests::{dev_id, each_backend, receive_from, sim_bytes, RawSender};

const PKT: usize = 4096;

fn rcfg(b: Backend) -> ReceiverConfig {
    ReceiverConfig::new()
        .backend(b)
        .max_packet_bytes(PKT)
        .stall_timeout(Duration::from_secs(5))
        .accept_timeout(Duration::from_secs(5))
}

fn sim(packets: usize) -> SimConfig {
    SimConfig::new("dst0", (packets * PKT) as u64, 91)
}

/// A real source of one simulated device (`cfg`) over `n` new connections to `addr`.
fn real_source(addr: SocketAddr, n: usize, cfg: &SimConfig, b: Backend) -> vfio_multifd::Result<()> {
    let socks: Vec<OwnedFd> = (0..n).map(|_| OwnedFd::from(TcpStream::connect(addr).expect("connect"))).collect();
    let mut dev = SimDevice::new(cfg.clone());
    let scfg = SourceConfig::new().chunk_bytes(PKT).backend(b).stall_timeout(Duration::from_secs(5));
    let mut src = Source::new(scfg, socks)?;
    src.add_device_with(dev_id(0), &mut dev, DeviceOptions { precopy: false, final_state: MigState::Stop });
    src.run().map(|_| ())
}

/// The whole stream of device 0 (`packets` data packets, then its config) as wire bytes.
fn stream_bytes(cfg: &SimConfig, packets: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for idx in 0..=packets {
        let config = idx == packets;
        let data = if config { SimDevice::expected_config(cfg) } else { sim_bytes(cfg.seed, (idx * PKT) as u64, PKT) };
        out.extend(packet_bytes(idx as u32, config, &data));
    }
    out
}

fn packet_bytes(idx: u32, config: bool, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; vfio_multifd::wire::PACKET_OVERHEAD];
    let v = vfio_multifd::wire::VfioPacketHeader { idx, flags: u32::from(config) };
    vfio_multifd::wire::encode_packet_header(&dev_id(0), v, data.len(), &mut b).unwrap();
    b.extend_from_slice(data);
    b
}

fn loaded(res: &vfio_multifd::Result<ReceiverReport>, dests: &[SimDevice], what: &str) {
    let rep = res.as_ref().unwrap_or_else(|e| panic!("{what}: the receive failed: {e}"));
    assert_eq!(rep.devices.len(), dests.len());
    for d in dests {
        let r = d.resume_report().expect("resumed");
        assert!(r.verified_ok, "{what}: {r:?}");
        assert_eq!(d.state().unwrap(), MigState::Running, "{what}");
    }
}

fn warned(rep: &ReceiverReport, needle: &str) -> bool {
    rep.warnings.iter().any(|w| w.contains(needle))
}

/// 1000 connect-and-close connections (a port scanner) before a correct source: each is
/// dropped with a warning and the transfer succeeds on both sides.
#[test]
fn hostile_port_scanner_before_the_source_is_dropped() {
    each_backend(|b| {
        let cfg = sim(8);
        let mut src = None;
        // A long set-up deadline: on a loaded host a full backlog delays connects by seconds.
        let rc = rcfg(b).accept_timeout(Duration::from_secs(30));
        let (res, dests) = receive_from(std::slice::from_ref(&cfg), 2, rc, |addr| {
            for _ in 0..1000 {
                drop(TcpStream::connect(addr).expect("scanner connect"));
            }
            src = Some(real_source(addr, 2, &cfg, b));
        });
        loaded(&res, &dests, "after 1000 scanner connections");
        src.unwrap().expect("the source succeeds too");
        let rep = res.unwrap();
        assert!(warned(&rep, "closed after 0 of 64 init packet bytes"), "{:?}", rep.warnings);
        assert!(rep.warnings.len() <= 17, "warnings are bounded: {}", rep.warnings.len());
    });
}

/// An idle connection and one that sends 64 bytes of something else (no multifd magic) before
/// a correct source: neither is a channel, neither blocks the transfer.
#[test]
fn hostile_idle_and_garbage_connections_do_not_block_the_source() {
    each_backend(|b| {
        let cfg = sim(8);
        let mut src = None;
        let mut idle = None;
        let (res, dests) = receive_from(std::slice::from_ref(&cfg), 2, rcfg(b), |addr| {
            idle = Some(TcpStream::connect(addr).expect("idle connect"));
            let mut g = TcpStream::connect(addr).expect("garbage connect");
            let mut junk = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
            junk.resize(64, b' ');
            g.write_all(&junk).unwrap();
            src = Some(real_source(addr, 2, &cfg, b));
        });
        loaded(&res, &dests, "with an idle and a garbage connection");
        src.unwrap().expect("the source succeeds too");
        let rep = res.unwrap();
        assert!(warned(&rep, "not a multifd connection"), "{:?}", rep.warnings);
        assert!(warned(&rep, "no complete init packet"), "{:?}", rep.warnings);
    });
}

/// The accept timeout is one deadline from the start of set-up: a silent connection arriving
/// just before it does not extend it, and the error says how many channels came.
#[test]
fn hostile_set_up_deadline_counts_from_the_start() {
    each_backend(|b| {
        let limit = Duration::from_millis(800);
        let t0 = Instant::now();
        let mut keep = Vec::new();
        let (res, _) = receive_from(&[sim(2)], 2, rcfg(b).accept_timeout(limit), |addr| {
            let mut s = RawSender::connect(addr, 1);
            s.init(0, 0);
            std::thread::sleep(Duration::from_millis(700));
            keep.push(TcpStream::connect(addr).expect("late silent connection"));
            keep.extend(s.chans);
        });
        let took = t0.elapsed();
        let e = res.expect_err("only one of two channels connected");
        assert!(matches!(e, Error::ChannelSetup { connected: 1, expected: 2, after, .. } if after == limit), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("1 of 2 channel(s) connected") && msg.contains("missing channel(s) 1"), "{msg}");
        assert!(!msg.contains("without progress"), "not a stall: {msg}");
        assert!(took < limit + Duration::from_millis(600), "failed after {took:?}, the limit is {limit:?}");
    });
}

/// A source that sends 32 MiB on channel 0 before it connects channel 1 (an ordering QEMU once
/// had): channel 0 is received from as soon as its init packet is valid, far beyond what the
/// socket buffers hold.
#[test]
fn hostile_data_before_the_second_channel_connects() {
    each_backend(|b| {
        let packets = 32;
        let chunk = 1 << 20;
        let cfg = SimConfig::new("dst0", (packets * chunk) as u64, 93);
        let rc = ReceiverConfig::new()
            .backend(b)
            .stall_timeout(Duration::from_secs(5))
            .accept_timeout(Duration::from_secs(5));
        let (res, dests) = receive_from(std::slice::from_ref(&cfg), 2, rc, |addr| {
            let mut c0 = TcpStream::connect(addr).expect("connect channel 0");
            let mut init = [0u8; vfio_multifd::wire::INIT_PACKET_LEN];
            vfio_multifd::wire::InitPacket { uuid: [0; 16], id: 0, offer: 0, devices: 0 }.encode(&mut init).unwrap();
            c0.write_all(&init).unwrap();
            for idx in 0..packets {
                let data = sim_bytes(cfg.seed, (idx * chunk) as u64, chunk);
                c0.write_all(&packet_bytes(idx as u32, false, &data))
                    .expect("channel 0 is read before channel 1 exists");
            }
            let mut c1 = TcpStream::connect(addr).expect("connect channel 1");
            vfio_multifd::wire::InitPacket { uuid: [0; 16], id: 1, offer: 0, devices: 0 }.encode(&mut init).unwrap();
            c1.write_all(&init).unwrap();
            c1.write_all(&packet_bytes(packets as u32, true, &SimDevice::expected_config(&cfg))).unwrap();
            let _ = c0.shutdown(std::net::Shutdown::Write);
            let _ = c1.shutdown(std::net::Shutdown::Write);
        });
        loaded(&res, &dests, "32 MiB on channel 0 before channel 1");
    });
}

/// A source with 4 channels against a receiver that expects 2: the receiver fails naming the
/// channel counts, and the source (told by the verdict on the return path) fails too.
#[test]
fn hostile_more_channels_than_the_receiver_expects() {
    each_backend(|b| {
        let cfg = sim(64);
        let mut src = None;
        let (res, _) = receive_from(std::slice::from_ref(&cfg), 2, rcfg(b), |addr| {
            src = Some(real_source(addr, 4, &cfg, b));
        });
        let e = res.expect_err("a source with more channels");
        assert!(matches!(e, Error::ChannelCount { expected: 2, id: 2 | 3, .. }), "{e}");
        assert!(e.to_string().contains("expects 2 channel(s)"), "{e}");
        assert!(src.unwrap().is_err(), "the source must not report success");
    });
}

/// A source with fewer channels than the receiver expects: every device completes over the
/// channels it has, so the receive succeeds, warning about the channel that never connected.
#[test]
fn hostile_fewer_channels_than_the_receiver_expects() {
    each_backend(|b| {
        let cfg = sim(16);
        let mut src = None;
        let (res, dests) = receive_from(std::slice::from_ref(&cfg), 3, rcfg(b), |addr| {
            src = Some(real_source(addr, 2, &cfg, b));
        });
        loaded(&res, &dests, "2 source channels to 3");
        src.unwrap().expect("the source succeeds too");
        let rep = res.unwrap();
        assert!(warned(&rep, "channel(s) 2 never connected"), "{:?}", rep.warnings);
    });
}

/// A complete stream, then a reset instead of a FIN on every channel: the device is loaded and
/// the receive succeeds.
#[test]
fn hostile_reset_after_a_complete_stream() {
    each_backend(|b| {
        let cfg = sim(6);
        let (res, dests) = receive_from(std::slice::from_ref(&cfg), 2, rcfg(b), |addr| {
            let mut s = RawSender::connect(addr, 2);
            s.init(0, 0);
            s.init(1, 1);
            s.raw(0, &stream_bytes(&cfg, 6));
            std::thread::sleep(Duration::from_millis(100));
            for c in &s.chans {
                let l = libc::linger { l_onoff: 1, l_linger: 0 };
                nix::sys::socket::setsockopt(c, nix::sys::socket::sockopt::Linger, &l).unwrap();
            }
        });
        loaded(&res, &dests, "a reset after the last packet");
    });
}

/// A complete stream whose channels stay open (QEMU leaves them open): the receive ends when
/// the device is loaded, not at the stall timeout.
#[test]
fn hostile_channels_left_open_after_the_last_packet() {
    each_backend(|b| {
        let cfg = sim(6);
        let mut keep = None;
        let t0 = Instant::now();
        let rc = rcfg(b).stall_timeout(Duration::from_secs(20));
        let (res, dests) = receive_from(std::slice::from_ref(&cfg), 3, rc, |addr| {
            let mut s = RawSender::connect(addr, 3);
            for c in 0..3 {
                s.init(c, c as u8);
            }
            s.raw(1, &stream_bytes(&cfg, 6));
            keep = Some(s);
        });
        loaded(&res, &dests, "channels left open");
        assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
        drop(keep);
    });
}

/// One more packet after the device completed (in the same write as the config packet): the
/// receive succeeds, with a warning naming it.
#[test]
fn hostile_one_packet_after_completion() {
    each_backend(|b| {
        let cfg = sim(4);
        let (res, dests) = receive_from(std::slice::from_ref(&cfg), 1, rcfg(b), |addr| {
            let mut s = RawSender::connect(addr, 1);
            s.init(0, 0);
            let mut bytes = stream_bytes(&cfg, 4);
            bytes.extend(packet_bytes(0, false, &[]));
            s.raw(0, &bytes);
            s.finish();
        });
        loaded(&res, &dests, "one packet after completion");
        let rep = res.unwrap();
        assert!(warned(&rep, "ignored"), "{:?}", rep.warnings);
    });
}

/// Impossible settings are refused by validation alone, before anything is bound or connected.
#[test]
fn hostile_impossible_settings_fail_validation() {
    let bad_rx = [
        (ReceiverConfig::new().max_packet_bytes(64 << 20), 64, 1, "registered-buffer limit"),
        (ReceiverConfig::new().budget_bytes(2 << 30), 4, 1, "registered-buffer limit"),
        (ReceiverConfig::new().stall_timeout(Duration::ZERO), 4, 1, "stall timeout"),
        (ReceiverConfig::new(), 4, 65, "65 devices"),
        (ReceiverConfig::new(), 257, 1, "257 channels"),
    ];
    for (c, channels, devices, needle) in bad_rx {
        let e = c.validate(channels, devices).expect_err(needle);
        assert!(matches!(e, Error::Config(_)) && e.to_string().contains(needle), "{e}");
    }
    ReceiverConfig::new().validate(4, 2).expect("defaults are valid");
    let e = SourceConfig::new().stall_timeout(Duration::ZERO).validate(4, 1).expect_err("stall 0");
    assert!(e.to_string().contains("stall timeout"), "{e}");
    assert!(SourceConfig::new().validate(4, 65).is_err());
    let e = SourceConfig::new()
        .backend(Backend::Blocking)
        .zerocopy(vfio_multifd::ZeroCopy::On)
        .validate(4, 1)
        .expect_err("zero-copy on the blocking backend");
    assert!(e.to_string().contains("zero-copy"), "{e}");
    SourceConfig::new().validate(4, 64).expect("defaults are valid");
}

/// A stall names the channel that stalled inside a packet and every other channel's state, and
/// does not claim that channels closed when none did.
#[test]
fn hostile_stall_error_names_the_channels() {
    each_backend(|b| {
        let mut keep = None;
        let rc = rcfg(b).stall_timeout(Duration::from_millis(600));
        let (res, _) = receive_from(&[sim(2)], 3, rc, |addr| {
            let mut s = RawSender::connect(addr, 3);
            for c in 0..3 {
                s.init(c, c as u8);
            }
            let mut p = packet_bytes(0, false, &[5u8; PKT]);
            p.truncate(vfio_multifd::wire::PACKET_OVERHEAD + 100);
            s.raw(1, &p);
            keep = Some(s);
        });
        let e = res.expect_err("a stalled channel");
        let msg = e.to_string();
        assert!(matches!(e, Error::Timeout { .. }), "{msg}");
        assert!(msg.contains("channel 1 inside packet 0 of device"), "{msg}");
        assert!(msg.contains("channel 0 open") && msg.contains("channel 2 open"), "{msg}");
        assert!(!msg.contains("closed"), "{msg}");
        drop(keep);
    });
}

/// Sockets a VMM accepted itself (`Receiver::run`) are the channels: one whose init packet is
/// not valid fails the receive at once (nothing is waited for), and valid ones still work.
#[test]
fn hostile_accepted_sockets_with_a_bad_init_packet_fail_at_once() {
    each_backend(|b| {
        let (clients, servers) = vfio_multifd_tests::tcp_pairs(2);
        let mut c: Vec<TcpStream> = clients.into_iter().map(TcpStream::from).collect();
        let mut init = [0u8; vfio_multifd::wire::INIT_PACKET_LEN];
        vfio_multifd::wire::InitPacket { uuid: [0; 16], id: 0, offer: 0, devices: 0 }.encode(&mut init).unwrap();
        c[0].write_all(&init).unwrap();
        c[1].write_all(&[0u8; vfio_multifd::wire::INIT_PACKET_LEN]).unwrap();
        let mut dst = SimDevice::new(sim(2));
        let mut rx = vfio_multifd::Receiver::new(rcfg(b)).unwrap();
        rx.add_device_with(dev_id(0), &mut dst, MigState::Running);
        let t0 = Instant::now();
        let e = rx.run(servers).expect_err("a bad init packet");
        assert!(matches!(e, Error::InitPacket { connection: 1, .. }), "{e}");
        assert!(e.to_string().contains("bad magic"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2), "took {:?}", t0.elapsed());
        vfio_migration::recover(&mut dst, MigState::Running).unwrap();
    });
}
