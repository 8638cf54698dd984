//! The two-phase commit of the switchover (`wire::EXT_COMMIT`, DESIGN.md §7.3), on both
//! backends: the destination validates every device, sends its verdicts, and starts the devices
//! only on the source's commit (channel 0's FIN). A source that resets channel 0 instead (it was
//! cancelled or failed after the verdicts), or says nothing, leaves the devices loaded and
//! validated but stopped: the two sides never both run them.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{MigState, MigrationDevice};
use vfio_multifd::wire::{EXT_COMMIT, EXT_RETURN_PATH, PACKET_OVERHEAD};
use vfio_multifd::{Backend, Error, ReceiverConfig};
use vfio_multifd_tests::{dev_id, each_backend, receive_from, RawSender};

const PKT: usize = 4096;
const PACKETS: usize = 5;

fn rcfg(b: Backend, stall: Duration) -> ReceiverConfig {
    ReceiverConfig::new().backend(b).max_packet_bytes(PKT).stall_timeout(stall).accept_timeout(Duration::from_secs(5))
}

/// Device 0's whole stream (data packets, then its config) as wire bytes.
fn stream(cfg: &SimConfig) -> Vec<u8> {
    stream_of(0, cfg)
}

/// Return-path message types read back (`rp.rs`): HELLO, VERDICT, SHUT.
const T_HELLO: u16 = 1;
const T_VERDICT: u16 = 3;
const T_SHUT: u16 = 4;

/// Reads return-path frames from `s` until `SHUT`; returns the types seen, in order.
fn read_until_shut(s: &mut TcpStream) -> Vec<u16> {
    let (seen, ok) = read_until_shut_status(s);
    assert!(ok, "SHUT says every device loaded");
    seen
}

/// The frame types up to `SHUT`, and whether `SHUT` said every device loaded.
fn read_until_shut_status(s: &mut TcpStream) -> (Vec<u16>, bool) {
    let (seen, status) = vfio_multifd_tests::read_until_shut_status(s);
    (seen, status == 0)
}

/// What the raw source does once it has every verdict.
#[derive(Debug, Clone, Copy)]
enum Then {
    /// FIN on channel 0: the commit.
    Commit,
    /// A reset on channel 0 (a cancelled source).
    Reset,
    /// Nothing, channel 0 left open.
    Silence,
}

/// A raw source offering the return path and the commit over 2 channels: the whole stream on
/// channel 0, then `then`. Returns the receiver's result and the destination device.
fn run(b: Backend, then: Then, stall: Duration) -> (vfio_multifd::Result<vfio_multifd::ReceiverReport>, SimDevice) {
    let cfg = SimConfig::new("dst0", (PACKETS * PKT) as u64, 17);
    let (res, mut dests) = receive_from(std::slice::from_ref(&cfg), 2, rcfg(b, stall), |addr| {
        let mut s = RawSender::connect(addr, 2);
        s.init_offering(0, 0, EXT_RETURN_PATH | EXT_COMMIT);
        s.init(1, 1);
        s.chans[0].write_all(&stream(&cfg)).unwrap();
        s.chans[1].shutdown(Shutdown::Write).unwrap();
        let seen = read_until_shut(&mut s.chans[0]);
        assert_eq!(seen, [T_HELLO, T_VERDICT, T_SHUT], "{b:?}: HELLO, one verdict, SHUT");
        match then {
            Then::Commit => s.chans[0].shutdown(Shutdown::Write).unwrap(),
            Then::Reset => {
                let l = libc::linger { l_onoff: 1, l_linger: 0 };
                nix::sys::socket::setsockopt(&s.chans[0], nix::sys::socket::sockopt::Linger, &l).unwrap();
                drop(s);
                return;
            }
            Then::Silence => {}
        }
        // Keep the sockets open until the receiver is done (its own timeout ends a silence).
        std::thread::spawn(move || {
            std::thread::sleep(stall * 3);
            drop(s);
        });
    });
    (res, dests.remove(0))
}

#[test]
fn commit_fin_after_the_verdicts_starts_the_devices() {
    each_backend(|b| {
        let (res, dev) = run(b, Then::Commit, Duration::from_secs(5));
        let rep = res.unwrap_or_else(|e| panic!("{b:?}: {e}"));
        assert!(rep.return_path, "{b:?}");
        assert!(dev.resume_report().expect("resumed").verified_ok, "{b:?}");
        assert_eq!(dev.state().unwrap(), MigState::Running, "{b:?}: started after the commit");
    });
}

#[test]
fn commit_reset_instead_leaves_the_devices_stopped() {
    each_backend(|b| {
        let (res, dev) = run(b, Then::Reset, Duration::from_secs(5));
        match res {
            Err(Error::NotCommitted { why }) => assert!(why.contains("reset"), "{b:?}: {why}"),
            other => panic!("{b:?}: expected NotCommitted, got {other:?}"),
        }
        assert!(dev.resume_report().expect("resumed").verified_ok, "{b:?}: loaded and validated");
        assert_eq!(dev.state().unwrap(), MigState::Stop, "{b:?}: never started without the commit");
    });
}

#[test]
fn commit_silence_times_out_and_leaves_the_devices_stopped() {
    each_backend(|b| {
        let t0 = Instant::now();
        let (res, dev) = run(b, Then::Silence, Duration::from_secs(1));
        match res {
            Err(Error::NotCommitted { why }) => assert!(why.contains("stall timeout"), "{b:?}: {why}"),
            other => panic!("{b:?}: expected NotCommitted, got {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(8), "{b:?}: bounded by the stall timeout: {:?}", t0.elapsed());
        assert_eq!(dev.state().unwrap(), MigState::Stop, "{b:?}: never started without the commit");
    });
}

/// A source that closes channel 0 right after its last packet, before it could have seen a
/// verdict, has not committed: the destination does not start.
#[test]
fn commit_fin_before_the_verdicts_is_no_commit() {
    each_backend(|b| {
        let cfg = SimConfig::new("dst0", (PACKETS * PKT) as u64, 17);
        let (res, mut dests) = receive_from(std::slice::from_ref(&cfg), 2, rcfg(b, Duration::from_secs(5)), |addr| {
            let mut s = RawSender::connect(addr, 2);
            s.init_offering(0, 0, EXT_RETURN_PATH | EXT_COMMIT);
            s.init(1, 1);
            s.chans[0].write_all(&stream(&cfg)).unwrap();
            s.finish();
            let (_, ok) = read_until_shut_status(&mut s.chans[0]);
            // The verdicts say it: a source that reads them does not report success.
            assert!(!ok, "SHUT after an early FIN must say failed");
        });
        match res {
            Err(Error::NotCommitted { why }) => assert!(why.contains("before the verdicts"), "{b:?}: {why}"),
            other => panic!("{b:?}: expected NotCommitted, got {other:?}"),
        }
        assert_eq!(dests.remove(0).state().unwrap(), MigState::Stop, "{b:?}: never started");
    });
}

/// A destination that answers with `frames` (raw return-path frames) after reading the whole
/// stream of one simulated source device; returns the source's result.
fn source_against(b: Backend, frames: Vec<u8>) -> vfio_multifd::Result<()> {
    use std::net::TcpListener;
    use std::os::fd::OwnedFd;
    use vfio_multifd::{DeviceOptions, Source, SourceConfig};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let mut chans: Vec<TcpStream> = (0..2).map(|_| l.accept().unwrap().0).collect();
        // HELLO accepting the return path only: the source closes every channel after its data.
        chans[0].write_all(&[0, T_HELLO as u8, 0, 2, 1, EXT_RETURN_PATH]).unwrap();
        for c in &mut chans {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut sink = Vec::new();
            c.read_to_end(&mut sink).unwrap();
        }
        chans[0].write_all(&frames).unwrap();
    });
    let socks: Vec<OwnedFd> = (0..2).map(|_| OwnedFd::from(TcpStream::connect(addr).unwrap())).collect();
    let mut dev = SimDevice::new(SimConfig::new("src0", (PACKETS * PKT) as u64, 17));
    let scfg = SourceConfig::new().chunk_bytes(PKT).backend(b).stall_timeout(Duration::from_secs(5));
    let mut src = Source::new(scfg, socks)?;
    src.add_device_with(dev_id(0), &mut dev, DeviceOptions { precopy: false, final_state: MigState::Stop });
    let r = src.run().map(|_| ());
    peer.join().unwrap();
    r
}

/// `VERDICT` for device 0 with `status` (0 loaded, 1 failed) and `text`.
fn verdict(status: u8, text: &str) -> Vec<u8> {
    verdict_for(0, status, text)
}

/// `VERDICT` for device `dev` (`dev_id(dev)`).
fn verdict_for(dev: usize, status: u8, text: &str) -> Vec<u8> {
    let id = dev_id(dev);
    let mut p = id.instance_id.to_be_bytes().to_vec();
    p.push(id.idstr().len() as u8);
    p.extend_from_slice(id.idstr().as_bytes());
    p.push(status);
    p.extend_from_slice(&(text.len() as u16).to_be_bytes());
    p.extend_from_slice(text.as_bytes());
    let mut f = T_VERDICT.to_be_bytes().to_vec();
    f.extend_from_slice(&(p.len() as u16).to_be_bytes());
    f.extend(p);
    f
}

fn shut(status: u8) -> Vec<u8> {
    let mut f = T_SHUT.to_be_bytes().to_vec();
    f.extend_from_slice(&[0, 1, status]);
    f
}

/// A failed verdict followed by a "loaded" one for the same device, a failed verdict for a
/// device the source does not migrate, or a `SHUT` that reports a failure after "loaded": the
/// source fails every time (the last word never overrides a failure).
#[test]
fn commit_a_later_message_never_turns_a_failure_into_success() {
    each_backend(|b| {
        let twice = [verdict(1, "oops"), verdict(0, ""), shut(0)].concat();
        match source_against(b, twice) {
            Err(Error::ReturnPath { what }) => assert!(what.contains("second verdict"), "{b:?}: {what}"),
            other => panic!("{b:?}: two verdicts: expected a return-path error, got {other:?}"),
        }
        // A failed verdict for a device the source does not migrate, with every device of its
        // own loaded and SHUT saying all is well: still a failure, with the destination's words.
        let foreign = [verdict(0, ""), verdict_for(5, 1, "not loaded here"), shut(0)].concat();
        match source_against(b, foreign) {
            Err(Error::Destination { device, what }) => {
                assert_eq!(device, dev_id(5), "{b:?}");
                assert_eq!(what, "not loaded here", "{b:?}");
            }
            other => panic!("{b:?}: a foreign failed verdict: expected Error::Destination, got {other:?}"),
        }
        let shut_fails = [verdict(0, ""), shut(1)].concat();
        match source_against(b, shut_fails) {
            Err(Error::ReturnPath { what }) => assert!(what.contains("SHUT reports a failure"), "{b:?}: {what}"),
            other => panic!("{b:?}: SHUT failure: expected a return-path error, got {other:?}"),
        }
    });
}

/// A "loaded" verdict for a device the source does not migrate fails the send with a
/// return-path error naming that device, its text said once (not "return path: return path:").
#[test]
fn commit_a_verdict_for_an_unknown_device_is_a_return_path_error() {
    each_backend(|b| {
        let unknown = [verdict(0, ""), verdict_for(5, 0, ""), shut(0)].concat();
        match source_against(b, unknown) {
            Err(e @ Error::ReturnPath { .. }) => {
                let text = e.to_string();
                assert!(text.contains(&*dev_id(5).idstr()), "{b:?}: {text}");
                assert_eq!(text.matches("return path:").count(), 1, "{b:?}: {text}");
            }
            other => panic!("{b:?}: a verdict for an unknown device: expected a return-path error, got {other:?}"),
        }
    });
}

/// A second `HELLO` (after the source's data, before "loaded" verdicts) is a protocol
/// violation: the send fails with a return-path error instead of believing what follows.
#[test]
fn commit_a_second_hello_is_a_return_path_error() {
    each_backend(|b| {
        let hello = vec![0, T_HELLO as u8, 0, 2, 1, EXT_RETURN_PATH];
        match source_against(b, [hello, verdict(0, ""), shut(0)].concat()) {
            Err(Error::ReturnPath { what }) => assert!(what.contains("second HELLO"), "{b:?}: {what}"),
            other => panic!("{b:?}: a second HELLO: expected a return-path error, got {other:?}"),
        }
    });
}

/// A destination that sends its verdict and closes without `SHUT`: the send fails saying the
/// `SHUT` is missing and that the verdict did come (it used to say "before its verdict").
#[test]
fn commit_a_close_without_shut_names_what_is_missing() {
    each_backend(|b| match source_against(b, verdict(0, "")) {
        Err(Error::ReturnPath { what }) => {
            assert!(what.contains("before its SHUT") && what.contains("1 of 1 verdict"), "{b:?}: {what}");
        }
        other => panic!("{b:?}: no SHUT: expected a return-path error, got {other:?}"),
    });
}

/// A `SHUT` reporting a failure with no verdict at all: the send fails with the device's
/// `Error::Destination` saying the destination reported a failure (not merely "no verdict").
#[test]
fn commit_a_failing_shut_without_verdicts_says_the_destination_failed() {
    each_backend(|b| match source_against(b, shut(1)) {
        Err(Error::Destination { device, what }) => {
            assert_eq!(device, dev_id(0), "{b:?}");
            assert!(what.contains("reported a failure"), "{b:?}: {what}");
        }
        other => panic!("{b:?}: a failing SHUT alone: expected Error::Destination, got {other:?}"),
    });
}

/// Device `dev`'s whole stream (data packets, then its config) as wire bytes.
fn stream_of(dev: usize, cfg: &SimConfig) -> Vec<u8> {
    vfio_multifd_tests::device_stream(dev, cfg, PACKETS, PKT)
}

/// Bytes on channel 0 that are no packet, after every packet was admitted but while a device
/// was still being written, spoil the channel that carries the commit: the FIN that follows the
/// verdicts is no commit, the verdicts say so, and the devices stay stopped.
#[test]
fn commit_after_stray_bytes_on_channel_0_is_no_commit() {
    each_backend(|b| {
        let c0 = SimConfig::new("dst0", (PACKETS * PKT) as u64, 17);
        // A slow device behind a small pipe: its writes take about a second.
        let c1 = SimConfig::new("dst1", (PACKETS * PKT) as u64, 18)
            .with_resume_throughput((PACKETS * PKT) as u64)
            .with_resume_pipe_bytes(4096);
        let cfgs = [c0.clone(), c1.clone()];
        let (res, dests) = receive_from(&cfgs, 2, rcfg(b, Duration::from_secs(5)), |addr| {
            let mut s = RawSender::connect(addr, 2);
            s.init_offering(0, 0, EXT_RETURN_PATH | EXT_COMMIT);
            s.init(1, 1);
            s.chans[0].write_all(&stream_of(0, &c0)).unwrap();
            s.chans[1].write_all(&stream_of(1, &c1)).unwrap();
            // Every packet is admitted by now; device 1 is still being written.
            std::thread::sleep(Duration::from_millis(300));
            s.chans[0].write_all(&[0xA5; PACKET_OVERHEAD]).unwrap();
            let (_, ok) = read_until_shut_status(&mut s.chans[0]);
            assert!(!ok, "{b:?}: SHUT after stray bytes on channel 0 must say failed");
            s.chans[0].shutdown(Shutdown::Write).unwrap();
            s.chans[1].shutdown(Shutdown::Write).unwrap();
        });
        match res {
            Err(Error::NotCommitted { why }) => assert!(why.contains("channel 0"), "{b:?}: {why}"),
            other => panic!("{b:?}: expected NotCommitted, got {other:?}"),
        }
        for (i, d) in dests.iter().enumerate() {
            assert_eq!(d.state().unwrap(), MigState::Stop, "{b:?}: device {i} never started");
        }
    });
}

/// How a destination that never closes answers: with the two-phase commit (one channel: it
/// reads packets until the config packet, sends its verdicts, then reads the commit's FIN), or
/// with the return path alone (two channels, each read to the source's EOF first).
#[derive(Debug, Clone, Copy)]
enum Peer {
    Commit,
    ReturnPathOnly,
    /// As `ReturnPathOnly`, then 100 bytes on channel 1 after the verdicts.
    Junk,
}

/// Reads device-state packets from `s` until the config packet (`VFIO_FLAG_CONFIG_STATE`).
fn read_until_config(s: &mut TcpStream) {
    loop {
        let mut h = [0u8; PACKET_OVERHEAD];
        s.read_exact(&mut h).expect("a packet header");
        let size = u32::from_be_bytes(h[272..276].try_into().unwrap()) as usize;
        let flags = u32::from_be_bytes(h[284..288].try_into().unwrap());
        let mut payload = vec![0u8; size - 12];
        s.read_exact(&mut payload).expect("a payload");
        if flags & 1 != 0 {
            return;
        }
    }
}

/// A destination peer on `l` (`n` channels) that confirms every device loaded and never closes
/// until `done` says the source returned; then checks that the source's close was a FIN.
/// Returns when it sent `SHUT` and whether it read the commit's FIN.
fn never_closing_destination(
    l: std::net::TcpListener,
    n: usize,
    peer: Peer,
    done_rx: std::sync::mpsc::Receiver<()>,
) -> (Instant, bool) {
    let mut chans: Vec<TcpStream> = (0..n).map(|_| l.accept().unwrap().0).collect();
    for c in &mut chans {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.read_exact(&mut [0u8; 64]).unwrap();
    }
    let features = match peer {
        Peer::Commit => EXT_RETURN_PATH | EXT_COMMIT,
        Peer::ReturnPathOnly | Peer::Junk => EXT_RETURN_PATH,
    };
    chans[0].write_all(&[0, T_HELLO as u8, 0, 2, 1, features]).unwrap();
    match peer {
        Peer::Commit => read_until_config(&mut chans[0]),
        Peer::ReturnPathOnly | Peer::Junk => {
            for c in &mut chans {
                c.read_to_end(&mut Vec::new()).unwrap();
            }
        }
    }
    chans[0].write_all(&[verdict(0, ""), shut(0)].concat()).unwrap();
    let shut_sent = Instant::now();
    if matches!(peer, Peer::Junk) {
        std::thread::sleep(Duration::from_millis(100));
        chans[1].write_all(&[0x5a; 100]).unwrap();
    }
    // The commit: channel 0's FIN after the verdicts.
    let committed = matches!(peer, Peer::Commit) && chans[0].read(&mut [0u8; 1]).unwrap() == 0;
    // Never closes while the source runs.
    let _ = done_rx.recv_timeout(Duration::from_secs(20));
    // The source closed with a FIN, never a reset: it read everything first.
    std::thread::sleep(Duration::from_millis(100));
    for c in &mut chans {
        let r = c.read(&mut [0u8; 1]);
        assert!(matches!(r, Ok(0)), "{peer:?}: the source's close is a FIN, got {r:?}");
    }
    (shut_sent, committed)
}

/// A source against a destination that confirms every device loaded and then never closes its
/// channels: the send succeeds within the short close wait (2 s, not the 6 s stall timeout),
/// with a warning, and `verdicts_at` (the downtime's end) comes before that wait.
#[test]
fn commit_destination_that_never_closes_is_bounded() {
    use std::net::TcpListener;
    use std::os::fd::OwnedFd;
    use vfio_multifd::{DeviceOptions, Source, SourceConfig};
    const STALL: Duration = Duration::from_secs(6);
    each_backend(|b| {
        for peer in [Peer::Commit, Peer::ReturnPathOnly, Peer::Junk] {
            let n = match peer {
                Peer::Commit => 1,
                Peer::ReturnPathOnly | Peer::Junk => 2,
            };
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let dest = std::thread::spawn(move || never_closing_destination(l, n, peer, done_rx));
            let socks: Vec<OwnedFd> = (0..n).map(|_| OwnedFd::from(TcpStream::connect(addr).unwrap())).collect();
            let mut dev = SimDevice::new(SimConfig::new("src0", (PACKETS * PKT) as u64, 17));
            let scfg = SourceConfig::new().chunk_bytes(PKT).backend(b).stall_timeout(STALL);
            let mut src = Source::new(scfg, socks).unwrap();
            src.add_device_with(dev_id(0), &mut dev, DeviceOptions { precopy: false, final_state: MigState::Stop });
            let res = src.run();
            let returned = Instant::now();
            done_tx.send(()).unwrap();
            let (shut_sent, committed) = dest.join().unwrap();
            let rep = res.unwrap_or_else(|e| panic!("{b:?} {peer:?}: {e}"));
            assert!(rep.verdicts.is_some(), "{b:?} {peer:?}");
            if matches!(peer, Peer::Commit) {
                assert!(committed, "{b:?} {peer:?}: the destination read the commit's FIN");
            }
            let waited = returned.saturating_duration_since(shut_sent);
            assert!(
                waited < Duration::from_secs(4),
                "{b:?} {peer:?}: returned {waited:?} after SHUT (stall {STALL:?})"
            );
            assert!(
                rep.warnings.iter().any(|w| w.contains("did not close")),
                "{b:?} {peer:?}: a warning says the destination did not close: {:?}",
                rep.warnings
            );
            if matches!(peer, Peer::Junk) {
                assert!(rep.warnings[0].contains("100 byte(s) after its verdicts"), "{b:?}: {:?}", rep.warnings);
            }
            let verdicts_at = rep.verdicts_at.expect("verdicts_at with verdicts");
            assert!(
                verdicts_at.saturating_duration_since(shut_sent) < Duration::from_secs(1),
                "{b:?} {peer:?}: verdicts_at is when SHUT came"
            );
            assert!(
                returned.saturating_duration_since(verdicts_at) >= Duration::from_millis(1500),
                "{b:?} {peer:?}: the close's wait comes after verdicts_at"
            );
            assert!(rep.sent_at <= verdicts_at, "{b:?} {peer:?}");
            assert_eq!(dev.state().unwrap(), MigState::Stop, "{b:?} {peer:?}: success, final state");
        }
    });
}
