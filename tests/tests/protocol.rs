//! The receiver against a hand-driven sender: adversarial orderings that must complete,
//! orderings that can never complete (a clear error, never a hang), and every kind of bad
//! input, each with an error that names the channel, device and packet.

use std::time::{Duration, Instant};

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{MigState, MigrationDevice};
use vfio_multifd::{Backend, Error, Missing, ProtocolViolation, ReceiverConfig, Stage};
use vfio_multifd_tests::{assert_dests_verified, dev_id, receive_from, sim_bytes, RawSender};

const PKT: usize = 4096;

fn rcfg(b: Backend) -> ReceiverConfig {
    ReceiverConfig::new()
        .backend(b)
        .max_packet_bytes(PKT)
        .stall_timeout(Duration::from_secs(2))
        .accept_timeout(Duration::from_secs(5))
}

fn sim(i: usize, packets: usize) -> SimConfig {
    SimConfig::new(format!("dst{i}"), (packets * PKT) as u64, 77 + i as u64)
}

/// Sends device `d`'s packet `idx` (data or, at `idx == packets`, its config) on channel `c`.
fn send(s: &mut RawSender, c: usize, d: usize, idx: usize, packets: usize) {
    let cfg = sim(d, packets);
    if idx == packets {
        s.packet(c, &dev_id(d), idx as u32, true, &SimDevice::expected_config(&cfg));
    } else {
        s.packet(c, &dev_id(d), idx as u32, false, &sim_bytes(cfg.seed, (idx * PKT) as u64, PKT));
    }
}

/// Every packet of two devices in reverse index order, spread over four channels, with one
/// channel stalled for a while: the receive budget is large enough, so it must complete.
#[test]
fn reversed_and_stalled_channels_complete() {
    for b in [Backend::Uring, Backend::Blocking] {
        let n = 6;
        let cfgs = [sim(0, n), sim(1, n)];
        let (res, dests) = receive_from(&cfgs, 4, rcfg(b).budget_bytes(64 * PKT), |addr| {
            let mut s = RawSender::connect(addr, 4);
            for c in 0..4 {
                s.init(c, c as u8);
            }
            for idx in (0..=n).rev() {
                for d in 0..2 {
                    send(&mut s, (idx + d) % 3, d, idx, n);
                }
            }
            // Channel 3 carries nothing for 300 ms, then closes.
            std::thread::sleep(Duration::from_millis(300));
            s.finish();
        });
        res.unwrap_or_else(|e| panic!("{b:?}: {e}"));
        assert_dests_verified(&dests);
    }
}

/// The deadlock case: many devices share few channels with a one-packet budget, and the sender
/// interleaves them as the engine's ordering rules allow (per channel in issue order, per device
/// in index order) while the lowest packets ride on the most congested channel.
#[test]
fn tiny_budget_many_devices_never_deadlocks() {
    for b in [Backend::Uring, Backend::Blocking] {
        let n = 40;
        let cfgs: Vec<_> = (0..4).map(|d| sim(d, n)).collect();
        let (res, dests) = receive_from(&cfgs, 3, rcfg(b).budget_bytes(PKT), |addr| {
            let mut s = RawSender::connect(addr, 3);
            for c in 0..3 {
                s.init(c, c as u8);
            }
            let mut c = 0;
            for idx in 0..=n {
                for d in 0..4 {
                    send(&mut s, c % 3, d, idx, n);
                    c += 1 + idx % 2;
                }
            }
            s.finish();
        });
        res.unwrap_or_else(|e| panic!("{b:?}: {e}"));
        assert_dests_verified(&dests);
    }
}

/// A sender that puts later packets in front of earlier ones on every channel can never be
/// served within the budget: the receiver must say so, not wait forever.
#[test]
fn order_violation_beyond_budget_is_an_error() {
    for b in [Backend::Uring, Backend::Blocking] {
        let n = 10;
        let t0 = Instant::now();
        let (res, _d) = receive_from(&[sim(0, n)], 2, rcfg(b).budget_bytes(PKT), |addr| {
            let mut s = RawSender::connect(addr, 2);
            s.init(0, 0);
            s.init(1, 1);
            send(&mut s, 0, 0, 5, n);
            send(&mut s, 1, 0, 6, n);
            send(&mut s, 0, 0, 7, n);
            send(&mut s, 1, 0, 0, n);
            std::thread::sleep(Duration::from_millis(200));
            s.finish();
        });
        match res {
            Err(e @ Error::BudgetExceeded { .. }) => assert!(e.to_string().contains("is awaited"), "{e}"),
            other => panic!("{b:?}: expected a budget error, got {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}

fn expect_err(b: Backend, channels: usize, drive: impl FnOnce(&mut RawSender), check: impl Fn(&Error) -> bool) {
    expect_err_with(rcfg(b), channels, drive, check);
}

fn expect_err_with(
    cfg: ReceiverConfig,
    channels: usize,
    drive: impl FnOnce(&mut RawSender),
    check: impl Fn(&Error) -> bool,
) {
    let b = format!("{cfg:?}");
    let (res, dests) = receive_from(&[sim(0, 2)], channels, cfg, |addr| {
        let mut s = RawSender::connect(addr, channels);
        drive(&mut s);
        std::thread::sleep(Duration::from_millis(50));
        s.finish();
    });
    match res {
        Err(e) => assert!(check(&e), "{b}: unexpected error: {e}"),
        Ok(_) => panic!("{b}: bad input accepted"),
    }
    // The destination is left where the kernel would leave it, and a reset recovers it.
    let mut d = dests.into_iter().next().unwrap();

    if d.state().unwrap() != MigState::Running {
        vfio_migration::recover(&mut d, MigState::Running).unwrap();
    }
    assert_eq!(d.state().unwrap(), MigState::Running);
}

#[test]
fn bad_init_packets_give_clear_errors() {
    for b in [Backend::Uring, Backend::Blocking] {
        // Init packet: wrong magic (not a multifd connection: dropped, and named when the
        // accept timeout ends the set-up), a channel id beyond the count, a duplicate id.
        expect_err_with(
            rcfg(b).accept_timeout(Duration::from_millis(500)),
            1,
            |s| s.raw(0, &[0u8; 64]),
            |e| matches!(e, Error::ChannelSetup { .. }) && e.to_string().contains("bad magic"),
        );
        expect_err(b, 1, |s| s.init(0, 1), |e| matches!(e, Error::ChannelCount { id: 1, expected: 1, .. }));
        expect_err(
            b,
            2,
            |s| {
                s.init(0, 0);
                s.init(1, 0);
            },
            |e| {
                matches!(
                    e,
                    Error::Protocol { violation: ProtocolViolation::DuplicateChannelId { connection: 1, .. }, .. }
                )
            },
        );
    }
}

#[test]
fn bad_packets_give_clear_errors() {
    for b in [Backend::Uring, Backend::Blocking] {
        // Unknown device, bad flags, duplicate index, data after config, mid-packet EOF.
        expect_err(
            b,
            1,
            |s| {
                s.init(0, 0);
                s.packet(0, &vfio_multifd::DeviceId::new("who/vfio", 0).unwrap(), 0, false, &[1, 2, 3]);
            },
            |e| matches!(e, Error::UnknownDevice { idstr, .. } if idstr == "who/vfio"),
        );
        expect_err(
            b,
            1,
            |s| {
                s.init(0, 0);
                let mut p = vec![0u8; 288];
                let v = vfio_multifd::wire::VfioPacketHeader { idx: 0, flags: 0 };
                vfio_multifd::wire::encode_packet_header(&dev_id(0), v, 0, &mut p).unwrap();
                p[11] = 0x41;
                s.raw(0, &p);
            },
            |e| e.to_string().contains("SYNC is not allowed"),
        );
        expect_err(
            b,
            1,
            |s| {
                s.init(0, 0);
                send(s, 0, 0, 0, 2);
                send(s, 0, 0, 0, 2);
            },
            |e| matches!(e, Error::Protocol { violation: ProtocolViolation::DuplicateIndex { idx }, .. } if idx.get() == 0),
        );
        expect_err(
            b,
            1,
            |s| {
                s.init(0, 0);
                send(s, 0, 0, 2, 2);
                send(s, 0, 0, 3, 2);
            },
            |e| matches!(e, Error::Protocol { violation: ProtocolViolation::DataAfterConfig { .. }, .. }),
        );
        expect_err(
            b,
            1,
            |s| {
                s.init(0, 0);
                let mut p = vec![0u8; 288];
                let v = vfio_multifd::wire::VfioPacketHeader { idx: 0, flags: 0 };
                vfio_multifd::wire::encode_packet_header(&dev_id(0), v, PKT, &mut p).unwrap();
                s.raw(0, &p);
                s.raw(0, &[7u8; 100]);
            },
            |e| matches!(e, Error::ChannelClosed { during: Stage::Payload { device, idx, got: 100, len: 4096 }, .. } if idx.get() == 0 && *device == dev_id(0)),
        );
        // Oversized packet: above --max-packet.
        expect_err(
            b,
            1,
            |s| {
                s.init(0, 0);
                s.packet(0, &dev_id(0), 0, false, &vec![0u8; PKT + 1]);
            },
            |e| e.to_string().contains("next_packet_size 4109 out of bounds"),
        );
    }
}

#[test]
fn incomplete_or_rejected_streams_give_clear_errors() {
    for b in [Backend::Uring, Backend::Blocking] {
        // Missing packet: every channel closes without packet 1.
        expect_err(
            b,
            1,
            |s| {
                s.init(0, 0);
                send(s, 0, 0, 0, 2);
                send(s, 0, 0, 2, 2);
            },
            |e| matches!(e, Error::Incomplete { missing: Missing::Packet { idx, .. }, .. } if idx.get() == 1),
        );
        // Missing device: nothing at all arrives for it.
        expect_err(b, 1, |s| s.init(0, 0), |e| matches!(e, Error::Incomplete { missing: Missing::Everything, .. }));
        // Wrong content: the device rejects the stream when it leaves RESUMING.
        expect_err(
            b,
            1,
            |s| {
                s.init(0, 0);
                s.packet(0, &dev_id(0), 0, false, &[0u8; PKT]);
                send(s, 0, 0, 1, 2);
                send(s, 0, 0, 2, 2);
            },
            |e| matches!(e, Error::Device { .. }) && e.to_string().contains("RESUMING"),
        );
    }
}
