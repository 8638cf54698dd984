//! The two sides disagree on the devices (a count, or an id), with the return path on: both
//! fail fast with a clear error, on both backends, far below the stall timeout (which is what
//! a mismatch used to wait out on both sides). DESIGN.md §4 and §7.3.

use std::time::{Duration, Instant};

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{MigState, MigrationDevice};
use vfio_multifd::{Backend, DeviceOptions, Error, Receiver, ReceiverConfig, Source, SourceConfig};
use vfio_multifd_tests::{dev_id, each_backend, tcp_pairs};

const PKT: usize = 4096;
/// Long enough that a run waiting it out is told apart from a fast failure.
const STALL: Duration = Duration::from_secs(6);
/// What a fast failure may take at most (loaded CI machines included).
const FAST: Duration = Duration::from_secs(2);

/// The outcome of a migration of `src` source devices (ids `dev_id(i)` for `i` in `src`) to a
/// destination expecting `dst` devices, with the time each side took.
struct Outcome {
    source: vfio_multifd::Result<vfio_multifd::SourceReport>,
    source_took: Duration,
    receiver: vfio_multifd::Result<vfio_multifd::ReceiverReport>,
    receiver_took: Duration,
    sources: Vec<SimDevice>,
}

fn sim(i: usize) -> SimConfig {
    SimConfig::new(format!("dev{i}"), (8 * PKT) as u64, 40 + i as u64)
}

fn migrate(b: Backend, src: &[usize], dst: &[usize], channels: usize) -> Outcome {
    let mut sources: Vec<SimDevice> = src.iter().map(|&i| SimDevice::new(sim(i))).collect();
    let mut dests: Vec<SimDevice> = dst.iter().map(|&i| SimDevice::new(sim(i))).collect();
    let (c, s) = tcp_pairs(channels);
    let t0 = Instant::now();
    let ((source, source_took), (receiver, receiver_took)) = std::thread::scope(|sc| {
        let dests = &mut dests;
        let rx = sc.spawn(move || {
            let rcfg = ReceiverConfig::new().backend(b).max_packet_bytes(PKT).stall_timeout(STALL);
            let mut r = Receiver::new(rcfg).expect("receiver");
            for (&i, d) in dst.iter().zip(dests.iter_mut()) {
                r.add_device_with(dev_id(i), d, MigState::Running);
            }
            let res = r.run(s);
            (res, t0.elapsed())
        });
        let scfg = SourceConfig::new().backend(b).chunk_bytes(PKT).stall_timeout(STALL);
        let mut source = Source::new(scfg, c).expect("source");
        for (&i, d) in src.iter().zip(sources.iter_mut()) {
            source.add_device_with(dev_id(i), d, DeviceOptions { precopy: false, final_state: MigState::Stop });
        }
        let res = source.run();
        let took = t0.elapsed();
        ((res, took), rx.join().expect("receiver thread"))
    });
    Outcome { source, source_took, receiver, receiver_took, sources }
}

/// Both sides failed within [`FAST`], and every source device is back in RUNNING.
fn assert_fast(b: Backend, o: &Outcome) {
    eprintln!("{b:?}: source failed after {:?}, receiver after {:?}", o.source_took, o.receiver_took);
    if let (Err(s), Err(r)) = (&o.source, &o.receiver) {
        eprintln!("{b:?}: source: {s}\n{b:?}: receiver: {r}");
    }
    assert!(o.source.is_err(), "{b:?}: the source must fail: {:?}", o.source.as_ref().map(|_| ()));
    assert!(o.receiver.is_err(), "{b:?}: the receiver must fail");
    assert!(o.source_took < FAST, "{b:?}: the source took {:?} (stall timeout {STALL:?})", o.source_took);
    assert!(o.receiver_took < FAST, "{b:?}: the receiver took {:?} (stall timeout {STALL:?})", o.receiver_took);
    for (i, d) in o.sources.iter().enumerate() {
        assert_eq!(d.state().unwrap(), MigState::Running, "{b:?}: source device {i} back in RUNNING");
    }
}

/// The source's error carries the destination's words, which name both counts.
fn assert_source_told(b: Backend, o: &Outcome, needles: &[&str]) {
    match &o.source {
        Err(Error::Destination { what, .. }) => {
            for n in needles {
                assert!(what.contains(n), "{b:?}: source error {what:?} lacks {n:?}");
            }
        }
        other => panic!("{b:?}: expected Error::Destination, got {:?}", other.as_ref().map(|_| ())),
    }
}

#[test]
fn mismatch_source_sends_fewer_devices_fails_fast() {
    each_backend(|b| {
        let o = migrate(b, &[0], &[0, 1], 2);
        assert_fast(b, &o);
        match &o.receiver {
            Err(e @ Error::DeviceCount { source_devices: 1, expected: 2 }) => {
                assert!(e.to_string().contains("same devices"), "{b:?}: {e}");
            }
            other => panic!("{b:?}: expected DeviceCount 1 vs 2, got {:?}", other.as_ref().map(|_| ())),
        }
        assert_source_told(b, &o, &["1 device", "expects 2"]);
    });
}

#[test]
fn mismatch_source_sends_more_devices_fails_fast() {
    each_backend(|b| {
        let o = migrate(b, &[0, 1], &[0], 3);
        assert_fast(b, &o);
        match &o.receiver {
            Err(Error::DeviceCount { source_devices: 2, expected: 1 }) => {}
            other => panic!("{b:?}: expected DeviceCount 2 vs 1, got {:?}", other.as_ref().map(|_| ())),
        }
        assert_source_told(b, &o, &["2 device", "expects 1"]);
    });
}

/// Equal counts, different ids: the first packet of the unknown device fails the receive, and
/// the source hears why although the destination's verdicts name devices it does not know.
#[test]
fn mismatch_unknown_device_with_equal_counts_fails_fast() {
    each_backend(|b| {
        let o = migrate(b, &[0, 1], &[0, 2], 2);
        assert_fast(b, &o);
        match &o.receiver {
            Err(Error::UnknownDevice { idstr, .. }) => assert_eq!(idstr.as_str(), dev_id(1).idstr(), "{b:?}"),
            other => panic!("{b:?}: expected UnknownDevice, got {:?}", other.as_ref().map(|_| ())),
        }
        assert_source_told(b, &o, &["unknown device", &dev_id(1).idstr()]);
        // One device each, no id in common: the source hears of the destination's device.
        let o = migrate(b, &[0], &[3], 1);
        assert_fast(b, &o);
        assert!(matches!(o.receiver, Err(Error::UnknownDevice { .. })), "{b:?}");
        assert_source_told(b, &o, &["does not migrate", &dev_id(3).idstr(), "unknown device"]);
    });
}
