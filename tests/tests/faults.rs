//! Faults on either side: device read and write errors, failing arcs, truncated streams,
//! PRE_COPY. Every failure is a clear error, and every device is left where it can recover
//! (a source back in RUNNING so the VM keeps running; a destination in RESUMING or RUNNING).

use vfio_migration::sim::{ArcFault, FaultLeave, PrecopyEnd, SimConfig};
use vfio_migration::{MigState, MigrationDevice};
use vfio_multifd::{Backend, Error, ReceiverConfig, SourceConfig};
use vfio_multifd_tests::{assert_verified, migrate, migrate_with};

const CHUNK: usize = 64 * 1024;
const BACKENDS: [Backend; 2] = [Backend::Uring, Backend::Blocking];

fn sc(b: Backend) -> SourceConfig {
    SourceConfig::new().chunk_bytes(CHUNK).backend(b)
}

fn rc(b: Backend) -> ReceiverConfig {
    ReceiverConfig::new().max_packet_bytes(CHUNK).backend(b)
}

#[test]
fn device_read_error_recovers_source_to_running() {
    for b in BACKENDS {
        let cfg = SimConfig::new("src", 4 << 20, 5).with_read_error_at(1 << 20);
        let dst = SimConfig::new("src", 4 << 20, 5);
        let m = migrate_with(&[cfg], &[dst], 2, sc(b), rc(b), false);
        match &m.source {
            Err(Error::DeviceRead { device, offset, .. }) => {
                assert_eq!(device.idstr(), "0000:00:02.0/vfio");
                assert!(*offset >= 1 << 20, "{b:?}: offset {offset}");
            }
            other => panic!("{b:?}: expected a device read error, got {other:?}"),
        }
        assert!(m.receiver.is_err(), "{b:?}: the receiver cannot have completed");
        assert_eq!(m.sources[0].state().unwrap(), MigState::Running, "{b:?}: source must keep running");
        assert_eq!(m.dests[0].state().unwrap(), MigState::Resuming, "{b:?}: destination left in RESUMING");
    }
}

#[test]
fn destination_write_error_is_reported_with_the_packet() {
    for b in BACKENDS {
        let src = SimConfig::new("d", 2 << 20, 9);
        let dst = SimConfig::new("d", 2 << 20, 9).with_write_error_at(300_000);
        let m = migrate_with(&[src], &[dst], 2, sc(b), rc(b), false);
        match &m.receiver {
            Err(Error::DeviceWrite { device, idx, offset, source }) => {
                assert_eq!(device.idstr(), "0000:00:02.0/vfio");
                assert_eq!(source.raw_os_error(), Some(libc::EPIPE));
                // The pipe in front of the device buffers up to 1 MiB, so EPIPE shows up at most
                // that far past the failing byte.
                assert!(*offset + CHUNK as u64 >= 300_000 && *offset <= 300_000 + (1 << 20), "{b:?}: offset {offset}");
                assert_eq!(u64::from(idx.get()), *offset / CHUNK as u64);
            }
            other => panic!("{b:?}: expected a device write error, got {other:?}"),
        }
        // The source may have finished sending before the destination failed (then it is in
        // its final state, STOP); if it failed, it is back in RUNNING.
        let want = if m.source.is_ok() { MigState::Stop } else { MigState::Running };
        assert_eq!(m.sources[0].state().unwrap(), want);
    }
}

#[test]
fn failing_arc_at_source_leaves_it_running() {
    for leave in [FaultLeave::Stay, FaultLeave::Error] {
        let f = ArcFault { from: MigState::Stop, to: MigState::StopCopy, errno: libc::EIO, leave };
        let cfg = SimConfig::new("f", 1 << 20, 1).with_fail_arc(f);
        let m = migrate_with(
            std::slice::from_ref(&cfg),
            &[SimConfig::new("f", 1 << 20, 1)],
            1,
            sc(Backend::Uring),
            rc(Backend::Uring),
            false,
        );
        match &m.source {
            Err(Error::Device { source, .. }) => {
                let s = source.to_string();
                assert!(s.contains("STOP -> STOP_COPY"), "{s}");
                assert_eq!(source.errno(), Some(libc::EIO));
            }
            other => panic!("expected a device error, got {other:?}"),
        }
        // Stay: walked back to RUNNING. Error: reset, then RUNNING.
        assert_eq!(m.sources[0].state().unwrap(), MigState::Running, "{leave:?}");
        if leave == FaultLeave::Error {
            assert!(m.sources[0].reset_count() >= 1);
        }
    }
}

#[test]
fn truncated_stream_is_rejected_when_leaving_resuming() {
    for b in BACKENDS {
        let src = SimConfig::new("t", 1 << 20, 3).with_truncate_at(500_000);
        let dst = SimConfig::new("t", 1 << 20, 3);
        let m = migrate_with(&[src], &[dst], 2, sc(b), rc(b), false);
        // The source sent a short but well-formed stream; the destination's verdict (return
        // path) says the kernel rejected it, so the source fails too and carries on.
        match &m.source {
            Err(Error::Destination { device, what }) => {
                assert_eq!(device.idstr(), "0000:00:02.0/vfio");
                assert!(what.contains("RESUMING -> STOP"), "{b:?}: {what}");
            }
            other => panic!("{b:?}: expected the destination's verdict, got {other:?}"),
        }
        assert_eq!(m.sources[0].state().unwrap(), MigState::Running, "{b:?}: the source carries on");
        match &m.receiver {
            Err(Error::Device { source, .. }) => {
                assert!(source.to_string().contains("RESUMING -> STOP"), "{source}");
                assert_eq!(source.errno(), Some(libc::EINVAL));
            }
            other => panic!("{b:?}: expected RESUMING -> STOP to fail, got {other:?}"),
        }
        let mut d = m.dests.into_iter().next().unwrap();
        assert_eq!(d.state().unwrap(), MigState::Resuming);
        vfio_migration::recover(&mut d, MigState::Running).unwrap();
        assert_eq!(d.state().unwrap(), MigState::Running);
    }
}

#[test]
fn precopy_then_stop_copy_is_one_stream() {
    for b in BACKENDS {
        for end in [PrecopyEnd::NoMsg, PrecopyEnd::Zero] {
            let cfgs: Vec<_> = (0..2)
                .map(|i| {
                    SimConfig::new(format!("p{i}"), 3 << 20, 40 + i)
                        .with_precopy_bytes(1 << 20)
                        .with_precopy_end(end)
                        .with_max_read(CHUNK)
                })
                .collect();
            let m = migrate(&cfgs, 3, sc(b), rc(b), true);
            assert_verified(&m);
            for (i, d) in m.source.as_ref().unwrap().devices.iter().enumerate() {
                assert_eq!(d.precopy_bytes, 1 << 20, "{b:?} {end:?}");
                let t = m.sources[i].transitions();
                assert!(t.contains(&(MigState::Running, MigState::PreCopy)), "{t:?}");
                assert!(!t.contains(&(MigState::Stop, MigState::StopCopy)), "one stream, no new fd: {t:?}");
            }
        }
    }
}

#[test]
fn device_without_precopy_goes_straight_to_stop_copy() {
    let cfg = SimConfig::new("n", 1 << 20, 2).with_flags(vfio_migration::MigFlags::STOP_COPY);
    let m = migrate(&[cfg], 2, sc(Backend::Uring), rc(Backend::Uring), true);
    assert_verified(&m);
    assert_eq!(m.source.as_ref().unwrap().devices[0].precopy_bytes, 0);
    // Without P2P the walk is RUNNING -> STOP -> STOP_COPY.
    let t = m.sources[0].transitions();
    assert_eq!(&t[..2], &[(MigState::Running, MigState::Stop), (MigState::Stop, MigState::StopCopy)]);
}
