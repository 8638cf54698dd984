//! Loopback transfers of simulated devices: sizes, channel and device counts, both backends,
//! zero-copy on and off, short reads. Every byte and the config blob are verified at the
//! destination.

use vfio_migration::sim::SimConfig;
use vfio_multifd::{Backend, ReceiverConfig, SourceConfig, ZeroCopy};
use vfio_multifd_tests::{assert_verified, migrate};

const CHUNK: usize = 64 * 1024;

fn cfgs(n: usize, size: u64, max_read: usize) -> Vec<SimConfig> {
    (0..n).map(|i| SimConfig::new(format!("sim{i}"), size, 1000 + i as u64).with_max_read(max_read)).collect()
}

fn scfg(b: Backend, z: ZeroCopy) -> SourceConfig {
    SourceConfig::new().chunk_bytes(CHUNK).backend(b).zerocopy(z)
}

fn rcfg(b: Backend) -> ReceiverConfig {
    ReceiverConfig::new().max_packet_bytes(CHUNK).backend(b)
}

#[test]
fn sizes_around_the_chunk() {
    for b in [Backend::Uring, Backend::Blocking] {
        for size in [0u64, 1, CHUNK as u64 - 1, CHUNK as u64, CHUNK as u64 + 1, 5 * CHUNK as u64 + 17] {
            let m = migrate(&cfgs(1, size, CHUNK), 2, scfg(b, ZeroCopy::Auto), rcfg(b), false);
            if let Err(e) = &m.source {
                panic!("{b:?} size {size}: source: {e}");
            }
            if let Err(e) = &m.receiver {
                panic!("{b:?} size {size}: receiver: {e}");
            }
            assert_verified(&m);
        }
    }
}

#[test]
fn channels_by_devices_matrix() {
    for b in [Backend::Uring, Backend::Blocking] {
        for ch in [1usize, 2, 4, 8] {
            for devs in [1usize, 2, 4] {
                let m = migrate(&cfgs(devs, 3 << 20, CHUNK), ch, scfg(b, ZeroCopy::Auto), rcfg(b), false);
                if m.source.is_err() || m.receiver.is_err() {
                    panic!(
                        "{b:?} {ch}ch {devs}dev: source: {:?} receiver: {:?}",
                        m.source.as_ref().err(),
                        m.receiver.as_ref().err()
                    );
                }
                assert_verified(&m);
            }
        }
    }
}

#[test]
fn zerocopy_auto_stays_off_on_loopback() {
    // Loopback always copies and holds SEND_ZC buffers until the peer reads: auto picks SEND.
    let m = migrate(&cfgs(1, 1 << 20, CHUNK), 2, scfg(Backend::Uring, ZeroCopy::Auto), rcfg(Backend::Uring), false);
    assert_verified(&m);
    assert!(!m.source.as_ref().unwrap().zerocopy);
}

#[test]
fn zerocopy_on_and_off_with_short_reads() {
    for z in [ZeroCopy::On, ZeroCopy::Off] {
        // 4 KiB reads: every read is short against a 64 KiB chunk, so every linked send is
        // cancelled and re-sent alone with a patched header.
        let m = migrate(&cfgs(2, 2 << 20, 4096), 4, scfg(Backend::Uring, z), rcfg(Backend::Uring), false);
        assert_verified(&m);
        let sr = m.source.as_ref().unwrap();
        assert_eq!(sr.zerocopy, z == ZeroCopy::On);
        assert!(sr.devices.iter().all(|d| d.short_reads > 0));
        if z == ZeroCopy::On {
            // Loopback always copies; the notification says so.
            assert!(sr.copied_bytes > 0);
        }
    }
}

/// The real sender against the smallest receive budget (one out-of-order packet), with many
/// channels shared by several devices and reads of every size: it must complete, never stall.
#[test]
fn smallest_budget_with_the_real_sender() {
    for b in [Backend::Uring, Backend::Blocking] {
        for max_read in [4096, 20_000, CHUNK] {
            let m = migrate(&cfgs(4, 1 << 20, max_read), 8, scfg(b, ZeroCopy::Off), rcfg(b).budget_bytes(CHUNK), false);
            if m.source.is_err() || m.receiver.is_err() {
                panic!("{b:?} max_read {max_read}: {:?} / {:?}", m.source.as_ref().err(), m.receiver.as_ref().err());
            }
            assert_verified(&m);
        }
    }
}

#[test]
fn receiver_reports_when_each_device_was_loaded() {
    let m = migrate(&cfgs(2, 2 << 20, CHUNK), 2, scfg(Backend::Uring, ZeroCopy::Off), rcfg(Backend::Uring), false);
    assert_verified(&m);
    let r = m.receiver.as_ref().unwrap();
    for d in &r.devices {
        let t = d.loaded_after.expect("loaded");
        assert!(t > std::time::Duration::ZERO && t <= r.elapsed, "{t:?} vs {:?}", r.elapsed);
    }
}
