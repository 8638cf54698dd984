//! Trial of a source cancelled while it waits for the verdicts (every packet sent, the device
//! threads parked): it must not commit (channel 0 ends with a reset, not a FIN), and every
//! device is back in RUNNING, on both backends.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{MigFlags, MigState, MigrationDevice};
use vfio_multifd::wire::{EXT_COMMIT, EXT_RETURN_PATH, EXT_VERSION, INIT_PACKET_LEN};
use vfio_multifd::{Error, SourceConfig, SourceSession};
use vfio_multifd_tests::{dev_id, each_backend};

/// A destination that accepts the return path and the commit, reads everything, and never
/// gives a verdict. Returns how channel 0 ended: `Ok(())` for a FIN, `Err` for a reset.
fn silent_destination(l: &TcpListener, n: usize) -> std::io::Result<()> {
    let mut chans: Vec<_> = (0..n).map(|_| l.accept().unwrap().0).collect();
    for c in &mut chans {
        let mut init = [0u8; INIT_PACKET_LEN];
        c.read_exact(&mut init).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    // HELLO: type 1, length 2, version, features.
    chans[0].write_all(&[0, 1, 0, 2, EXT_VERSION, EXT_RETURN_PATH | EXT_COMMIT]).unwrap();
    let mut rest = chans.split_off(1);
    let drain = std::thread::spawn(move || {
        let mut b = vec![0u8; 1 << 16];
        for c in &mut rest {
            while c.read(&mut b).is_ok_and(|n| n > 0) {}
        }
    });
    let mut b = vec![0u8; 1 << 16];
    let end = loop {
        match chans[0].read(&mut b) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    drain.join().unwrap();
    end
}

#[test]
fn trial_cancel_while_waiting_for_the_verdicts_does_not_commit() {
    each_backend(|b| {
        let cfgs = [
            SimConfig::new("v0", 256 << 10, 1),
            SimConfig::new("v1", 256 << 10, 2).with_flags(MigFlags::STOP_COPY | MigFlags::P2P),
        ];
        let mut devs: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (source, ch0_end, took) = std::thread::scope(|s| {
            let dest = s.spawn(|| silent_destination(&l, 2));
            let cfg = SourceConfig::new().backend(b).stall_timeout(Duration::from_secs(10));
            let mut session = SourceSession::connect(cfg, addr, 2).unwrap();
            let abort = session.abort_handle();
            for (i, d) in devs.iter_mut().enumerate() {
                session.add_device(dev_id(i), d);
            }
            let t = s.spawn(move || {
                std::thread::sleep(Duration::from_millis(500));
                abort.abort();
                Instant::now()
            });
            let source = session.run(|ctl| ctl.switchover()).map(|_| ());
            let cancelled_at = t.join().unwrap();
            (source, dest.join().unwrap(), cancelled_at.elapsed())
        });
        assert!(matches!(source, Err(Error::Aborted)), "{b:?}: {source:?}");
        assert!(took < Duration::from_secs(2), "{b:?}: returned {took:?} after the cancel");
        assert!(ch0_end.is_err(), "{b:?}: a cancelled source sent the commit (FIN on channel 0)");
        for (i, d) in devs.iter().enumerate() {
            assert_eq!(d.state().unwrap(), MigState::Running, "{b:?}: device {i}");
        }
    });
}

/// The destination committed and runs the devices; then a source device's walk to its final
/// state (STOP_COPY -> STOP) fails. A VMM that reads an ordinary failure resumes its guest on
/// the source (QEMU does on a failed migration), and both sides would run the VM: the result
/// must not look like a failed migration whose devices are back in RUNNING.
#[test]
fn trial_final_state_failure_after_the_commit_is_not_a_failed_migration() {
    each_backend(|b| {
        let cfg = SimConfig::new("f", 256 << 10, 4).with_fail_arc(vfio_migration::sim::ArcFault {
            from: MigState::StopCopy,
            to: MigState::Stop,
            errno: libc::EIO,
            leave: vfio_migration::sim::FaultLeave::Stay,
        });
        let m = vfio_multifd_tests::live_migrate(
            &[cfg],
            2,
            SourceConfig::new().backend(b),
            vfio_multifd::ReceiverConfig::new().backend(b),
            |ctl| ctl.switchover(),
        );
        m.receiver.as_ref().unwrap_or_else(|e| panic!("{b:?}: receiver: {e}"));
        assert_eq!(m.dests[0].state().unwrap(), MigState::Running, "{b:?}: the destination runs the device");
        match &m.source {
            Ok((_, rep)) => {
                let why = rep.devices[0].final_state_error.as_deref();
                assert!(
                    why.is_some_and(|w| w.contains("STOP")),
                    "{b:?}: the report says which device and why: {why:?}"
                );
            }
            Err(e) => panic!(
                "{b:?}: the source reports a failed migration after the destination committed and runs \
                 the device (source device in {}): {e}",
                m.sources[0].state().unwrap()
            ),
        }
    });
}
