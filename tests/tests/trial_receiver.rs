//! Trials of the receiver's end (threads parked after their work, the commit wait and the start
//! inside the scope, `on_started`, `no_commit`) against a hostile raw source, on both backends:
//! resets, stray bytes and FINs around the verdicts, an abort after them. No device starts
//! without a commit, and `on_started` runs only when they did.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{MigState, MigrationDevice};
use vfio_multifd::wire::{EXT_COMMIT, EXT_RETURN_PATH, PACKET_OVERHEAD};
use vfio_multifd::{AbortHandle, Backend, Error, Receiver, ReceiverConfig, ReceiverReport};
use vfio_multifd_tests::{dev_id, each_backend, read_until_shut_status, RawSender};

const PKT: usize = 4096;
const PACKETS: usize = 5;
const STALL: Duration = Duration::from_secs(3);

fn rcfg(b: Backend) -> ReceiverConfig {
    ReceiverConfig::new().backend(b).max_packet_bytes(PKT).stall_timeout(STALL).accept_timeout(Duration::from_secs(5))
}

/// Device `dev`'s whole stream (data packets, then its config) as wire bytes.
fn stream_of(dev: usize, cfg: &SimConfig) -> Vec<u8> {
    vfio_multifd_tests::device_stream(dev, cfg, PACKETS, PKT)
}

fn reset(s: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &l).unwrap();
}

struct Out {
    res: vfio_multifd::Result<ReceiverReport>,
    dests: Vec<SimDevice>,
    started: bool,
    elapsed: Duration,
}

/// Two devices (device 1 slow to write, about a second, when `slow`), two channels offering
/// the commit; `play` is the hostile source.
fn against(b: Backend, slow: bool, play: impl FnOnce(RawSender, &AbortHandle)) -> Out {
    against_with(b, slow, None, play)
}

/// As [`against`], with `workers` receive workers on io_uring (default: one per CPU).
fn against_with(b: Backend, slow: bool, workers: Option<usize>, play: impl FnOnce(RawSender, &AbortHandle)) -> Out {
    let c0 = SimConfig::new("dst0", (PACKETS * PKT) as u64, 17);
    let mut c1 = SimConfig::new("dst1", (PACKETS * PKT) as u64, 18);
    if slow {
        c1 = c1.with_resume_throughput((PACKETS * PKT) as u64).with_resume_pipe_bytes(4096);
    }
    let mut dests = vec![SimDevice::new(c0.clone()), SimDevice::new(c1.clone())];
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let started = AtomicBool::new(false);
    let t0 = Instant::now();
    let res = std::thread::scope(|sc| {
        let (dests, l, started) = (&mut dests, &l, &started);
        let cfg = workers.map_or_else(|| rcfg(b), |w| rcfg(b).workers(w));
        let mut r = Receiver::new(cfg).unwrap();
        let abort = r.abort_handle();
        let h = sc.spawn(move || {
            for (i, d) in dests.iter_mut().enumerate() {
                r.add_device_with(dev_id(i), d, MigState::Running);
            }
            r.on_started(move || started.store(true, Ordering::SeqCst));
            r.run_listener(l, 2)
        });
        let mut s = RawSender::connect(addr, 2);
        s.init_offering(0, 0, EXT_RETURN_PATH | EXT_COMMIT);
        s.init(1, 1);
        s.chans[0].write_all(&stream_of(0, &c0)).unwrap();
        s.chans[1].write_all(&stream_of(1, &c1)).unwrap();
        play(s, &abort);
        h.join().unwrap()
    });
    Out { res, dests, started: started.into_inner(), elapsed: t0.elapsed() }
}

fn assert_not_started(what: &str, o: &Out) {
    assert!(o.res.is_err(), "{what}: the receive succeeded");
    assert!(!o.started, "{what}: on_started ran although the receive failed");
    for (i, d) in o.dests.iter().enumerate() {
        assert_ne!(d.state().unwrap(), MigState::Running, "{what}: device {i} started without a commit");
    }
    assert!(o.elapsed < STALL * 2 + Duration::from_secs(2), "{what}: took {:?}", o.elapsed);
}

/// Keeps the sockets open for a while in the background (the receiver's own timeout decides).
fn linger(s: RawSender) {
    std::thread::spawn(move || {
        std::thread::sleep(STALL * 3);
        drop(s);
    });
}

/// The good path with the hook: it runs once, after the devices started.
#[test]
fn trial_commit_runs_on_started_once_devices_run() {
    each_backend(|b| {
        let o = against(b, true, |mut s, _| {
            let (_, st) = read_until_shut_status(&mut s.chans[0]);
            assert_eq!(st, 0, "{b:?}: SHUT says loaded");
            s.finish();
            linger(s);
        });
        o.res.as_ref().unwrap_or_else(|e| panic!("{b:?}: {e}"));
        assert!(o.started, "{b:?}: on_started did not run");
        for d in &o.dests {
            assert_eq!(d.state().unwrap(), MigState::Running, "{b:?}");
        }
    });
}

/// A reset of channel 0 while device 1 is still being written (every packet admitted): no
/// commit can come any more. The receiver must not start anything.
#[test]
fn trial_reset_of_channel_0_before_the_verdicts_is_no_commit() {
    each_backend(|b| {
        let o = against(b, true, |s, _| {
            std::thread::sleep(Duration::from_millis(300));
            reset(&s.chans[0]);
            drop(s);
        });
        assert_not_started(&format!("{b:?} reset ch0 before verdicts"), &o);
    });
}

/// Stray bytes on channel 0 after the verdicts, then the FIN: the bytes are no commit.
#[test]
fn trial_bytes_after_the_verdicts_then_fin_is_no_commit() {
    each_backend(|b| {
        let o = against(b, false, |mut s, _| {
            let (_, st) = read_until_shut_status(&mut s.chans[0]);
            assert_eq!(st, 0, "{b:?}");
            s.raw(0, &[0x5A; 7]);
            s.finish();
            linger(s);
        });
        assert_not_started(&format!("{b:?} bytes after verdicts"), &o);
        assert!(matches!(o.res, Err(Error::NotCommitted { .. })), "{b:?}: {:?}", o.res.as_ref().err());
    });
}

/// A FIN on channel 0 while device 1 is still being written, then the reset of channel 1:
/// no commit.
#[test]
fn trial_fin_on_channel_0_while_loading_is_no_commit() {
    each_backend(|b| {
        let o = against(b, true, |mut s, _| {
            std::thread::sleep(Duration::from_millis(200));
            s.chans[0].shutdown(Shutdown::Write).unwrap();
            let (_, st) = read_until_shut_status(&mut s.chans[0]);
            assert_ne!(st, 0, "{b:?}: SHUT after an early FIN must say failed");
            s.chans[1].shutdown(Shutdown::Write).unwrap();
            linger(s);
        });
        assert_not_started(&format!("{b:?} fin while loading"), &o);
    });
}

/// A reset of channel 1 (not the commit's) after every packet was admitted, then the commit:
/// the devices start (channel 1 has nothing left to carry).
#[test]
fn trial_reset_of_channel_1_then_commit_starts() {
    each_backend(|b| {
        let o = against(b, true, |mut s, _| {
            std::thread::sleep(Duration::from_millis(200));
            reset(&s.chans[1]);
            let c1 = s.chans.remove(1);
            drop(c1);
            let (_, st) = read_until_shut_status(&mut s.chans[0]);
            assert_eq!(st, 0, "{b:?}: every device was loaded");
            s.chans[0].shutdown(Shutdown::Write).unwrap();
            linger(s);
        });
        o.res.as_ref().unwrap_or_else(|e| panic!("{b:?}: {e}"));
        assert!(o.started, "{b:?}");
    });
}

/// The destination aborted after its verdicts, before the commit: nothing starts, Aborted.
#[test]
fn trial_abort_after_the_verdicts_starts_nothing() {
    each_backend(|b| {
        let o = against(b, false, |mut s, abort| {
            let (_, st) = read_until_shut_status(&mut s.chans[0]);
            assert_eq!(st, 0, "{b:?}");
            abort.abort();
            std::thread::sleep(Duration::from_millis(100));
            s.finish();
            linger(s);
        });
        assert_not_started(&format!("{b:?} abort after verdicts"), &o);
        assert!(matches!(o.res, Err(Error::Aborted)), "{b:?}: {:?}", o.res.as_ref().err());
    });
}

/// A reset of channel 0 right after the verdicts (a cancelled source): no start.
#[test]
fn trial_reset_after_the_verdicts_starts_nothing() {
    each_backend(|b| {
        let o = against(b, true, |mut s, _| {
            let _ = read_until_shut_status(&mut s.chans[0]);
            reset(&s.chans[0]);
            drop(s);
        });
        assert_not_started(&format!("{b:?} reset after verdicts"), &o);
        assert!(matches!(o.res, Err(Error::NotCommitted { .. })), "{b:?}: {:?}", o.res.as_ref().err());
    });
}

/// What a hostile source can put on channel 0 after every packet was admitted while device 1
/// is still being written, before it reads the verdicts and sends the FIN: none of it may let
/// the devices start.
#[test]
fn trial_stray_input_on_channel_0_before_the_verdicts_never_starts() {
    let init = || {
        let mut b = [0u8; vfio_multifd::wire::INIT_PACKET_LEN];
        vfio_multifd::wire::InitPacket { uuid: [0; 16], id: 0, offer: EXT_RETURN_PATH | EXT_COMMIT, devices: 0 }
            .encode(&mut b)
            .unwrap();
        b.to_vec()
    };
    let packet = |dev: usize, idx: u32, config: bool, len: usize| {
        let mut b = vec![0u8; PACKET_OVERHEAD];
        let v = vfio_multifd::wire::VfioPacketHeader { idx, flags: u32::from(config) };
        vfio_multifd::wire::encode_packet_header(&dev_id(dev), v, len, &mut b).unwrap();
        b.extend(std::iter::repeat_n(0x33u8, len));
        b
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a second init packet", init()),
        ("a packet of device 0 after its config", packet(0, PACKETS as u32 + 1, false, 16)),
        ("a second config of device 0", packet(0, PACKETS as u32, true, 64)),
        ("a duplicate packet of device 1", packet(1, 0, false, PKT)),
        ("a packet of an unknown device", packet(7, 0, false, 16)),
        ("half a header", packet(0, 9, false, 0)[..PACKET_OVERHEAD / 2].to_vec()),
    ];
    each_backend(|b| {
        for (what, bytes) in &cases {
            let o = against(b, true, |mut s, _| {
                std::thread::sleep(Duration::from_millis(250));
                s.raw(0, bytes);
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let _ = read_until_shut_status(&mut s.chans[0]);
                }));
                s.finish();
                linger(s);
            });
            assert_not_started(&format!("{b:?}: {what}"), &o);
        }
    });
}

/// One io_uring worker serving both channels (the worker of channel 0 is the only one): the
/// commit, a reset of channel 1 before it, and bytes after the verdicts behave as with more.
#[test]
fn trial_one_worker_commit_paths() {
    each_backend(|b| {
        let o = against_with(b, true, Some(1), |mut s, _| {
            std::thread::sleep(Duration::from_millis(200));
            reset(&s.chans[1]);
            let c1 = s.chans.remove(1);
            drop(c1);
            let (_, st) = read_until_shut_status(&mut s.chans[0]);
            assert_eq!(st, 0, "{b:?}");
            s.chans[0].shutdown(Shutdown::Write).unwrap();
            linger(s);
        });
        o.res.as_ref().unwrap_or_else(|e| panic!("{b:?}: {e}"));
        assert!(o.started, "{b:?}");
        let o = against_with(b, true, Some(1), |mut s, _| {
            let _ = read_until_shut_status(&mut s.chans[0]);
            s.raw(0, &[1]);
            s.finish();
            linger(s);
        });
        assert_not_started(&format!("{b:?} one worker, bytes after verdicts"), &o);
    });
}
