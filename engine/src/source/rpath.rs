//! The source's end of the return path (see `crate::rp`): a thread that reads channel 0 for
//! the destination's messages while the session runs, and what they said.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::abort::AbortHandle;
use crate::backend::TICK;
use crate::device_io::{classify, IoStep};
use crate::error::{Error, Result};
use crate::rp::{Decoder, Message, Verdict};
use crate::source::control::{DeviceControl, SessionEvent};
use crate::sys::{self, EventFd, FdIo, Kernel};
use crate::wire::{DeviceId, EXT_COMMIT};

#[derive(Debug, Default)]
struct Inner {
    verdicts: Vec<Option<Verdict>>,
    /// `SHUT`'s status, once it came.
    shut: Option<bool>,
    /// A `SHUT` reporting a failure came while the session still ran (not aborted): the
    /// destination failed first (a device count or id it does not expect, a stream it
    /// rejected), and the reader aborted the session with its reason.
    failed_first: bool,
    /// The first failed verdict for a device this source does not migrate (the two sides'
    /// device lists differ): the destination's reason, kept for the session's error.
    foreign: Option<(DeviceId, String)>,
    /// Why the reader stopped early (a broken message, a read error).
    error: Option<String>,
    ended: bool,
    /// Bytes read from channel 0 in all.
    received: usize,
    /// Bytes read but not taken as a message when the reader stopped (after `SHUT`, or a part).
    leftover: usize,
}

/// What the destination said so far.
#[derive(Debug)]
pub(crate) struct RpState {
    /// The destination answered `HELLO`: markers may be sent, acks and verdicts will come.
    enabled: AtomicBool,
    /// The feature bits the destination accepted in its `HELLO`.
    features: AtomicU8,
    inner: Mutex<Inner>,
    cv: Condvar,
    /// Tells the reader to stop.
    stop: EventFd,
}

/// Most bytes the reader still takes from channel 0 once the session is aborted (the verdicts of
/// a destination that failed first: 64 devices of at most ~1.3 KiB each).
const DRAIN_AFTER_ABORT: usize = 256 << 10;

/// The destination's verdicts, after the session.
#[derive(Debug)]
pub(crate) enum Verdicts {
    /// The destination never answered the offer (a QEMU peer, or the return path off).
    None,
    /// Per device, in the session's order; a device without a verdict failed to get one.
    Given(Vec<(DeviceId, Verdict)>),
}

impl RpState {
    pub(crate) fn new(devices: usize) -> std::io::Result<RpState> {
        let inner = Inner { verdicts: vec![None; devices], ..Inner::default() };
        Ok(RpState {
            enabled: AtomicBool::new(false),
            features: AtomicU8::new(0),
            inner: Mutex::new(inner),
            cv: Condvar::new(),
            stop: EventFd::new()?,
        })
    }

    /// Whether the destination accepted the return path.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Whether the destination accepted the two-phase commit ([`crate::wire::EXT_COMMIT`]):
    /// it starts no device before channel 0's FIN.
    pub(crate) fn commit(&self) -> bool {
        self.enabled() && self.features.load(Ordering::SeqCst) & EXT_COMMIT != 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (at most `limit`) for the destination's `HELLO`; returns whether it came.
    pub(crate) fn wait_enabled(&self, limit: Duration, abort: &AbortHandle) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = self.lock();
        while !self.enabled() && !g.ended && !abort.is_aborted() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self.cv.wait_timeout(g, left.min(TICK)).unwrap_or_else(|p| p.into_inner()).0;
        }
        self.enabled()
    }

    /// The reader thread could not be started (`e`, from the spawn): the return path ends
    /// before it began, and [`RpState::unexpected`] fails the session with the reason.
    pub(crate) fn reader_not_started(&self, e: &std::io::Error) {
        let mut g = self.lock();
        g.ended = true;
        g.error = Some(format!("could not start the return-path reader thread: {e}"));
        drop(g);
        self.cv.notify_all();
    }

    /// Stops the reader.
    pub(crate) fn stop(&self) {
        self.stop.signal();
    }

    /// After the reader stopped, on a session that sent everything: what came on channel 0 that
    /// the return path does not account for (bytes from a destination that never accepted it,
    /// bytes after `SHUT`, a read that failed), as the error that fails the session. A failure
    /// of an accepted return path is [`RpState::verdicts`]' to report.
    pub(crate) fn unexpected(&self) -> Option<Error> {
        let g = self.lock();
        if self.enabled() {
            return (g.leftover > 0).then(|| Error::ReturnPath {
                what: format!("{} byte(s) after the destination's last message (SHUT)", g.leftover),
            });
        }
        if g.received > 0 {
            return Some(Error::ReturnPath {
                what: format!(
                    "the destination sent {} byte(s) on channel 0 without accepting the return path (no HELLO): \
                     is a proxy or another program listening?",
                    g.received
                ),
            });
        }
        g.error.clone().map(|what| Error::ReturnPath { what })
    }

    /// Waits (at most `limit`) for the destination's `SHUT`, then returns the verdicts.
    ///
    /// # Errors
    /// [`Error::ReturnPath`] when the return path broke, or gave no `SHUT` within `limit`;
    /// [`Error::Destination`] when every device of this session was loaded but the destination
    /// failed one this session does not migrate.
    pub(crate) fn verdicts(&self, ids: &[DeviceId], limit: Duration, abort: &AbortHandle) -> Result<Verdicts> {
        if !self.enabled() {
            return Ok(Verdicts::None);
        }
        let deadline = Instant::now() + limit;
        let mut g = self.lock();
        while g.shut.is_none() && !g.ended && !abort.is_aborted() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::ReturnPath {
                    what: format!("no SHUT from the destination within {limit:?} ({})", verdicts_in(&g)),
                });
            }
            g = self.cv.wait_timeout(g, left.min(TICK)).unwrap_or_else(|p| p.into_inner()).0;
        }
        if let Some(e) = &g.error {
            return Err(Error::ReturnPath { what: e.clone() });
        }
        if g.shut.is_none() && abort.is_aborted() {
            return Err(Error::Aborted);
        }
        if g.shut.is_none() {
            return Err(Error::ReturnPath {
                what: format!("the destination closed the return path before its SHUT ({})", verdicts_in(&g)),
            });
        }
        let every_loaded = g.verdicts.iter().all(|v| matches!(v, Some(Verdict::Loaded)));
        if let (true, Some((device, what))) = (every_loaded, &g.foreign) {
            // A device this source does not migrate failed there: never a success.
            return Err(Error::Destination { device: device.clone(), what: what.clone() });
        }
        if g.shut == Some(false) && every_loaded {
            return Err(Error::ReturnPath {
                what: "the destination's SHUT reports a failure although every verdict said loaded".into(),
            });
        }
        Ok(given(&g, ids))
    }

    /// After the reader stopped, on a session that did not send everything: the destination's
    /// verdicts if its `SHUT` said it failed, and whether it failed first (its `SHUT` aborted
    /// the session: its reason is the session's error); else [`Verdicts::None`].
    pub(crate) fn early(&self, ids: &[DeviceId]) -> (Verdicts, bool) {
        let g = self.lock();
        match g.shut {
            Some(false) => (given(&g, ids), g.failed_first),
            _ => (Verdicts::None, false),
        }
    }

    fn handle(&self, m: Message, ids: &[DeviceId], controls: &[DeviceControl], abort: &AbortHandle) -> Result<bool> {
        let find = |d: &DeviceId| {
            ids.iter()
                .position(|x| x == d)
                .ok_or_else(|| Error::ReturnPath { what: format!("message for unknown device {d}") })
        };
        match m {
            Message::Hello { .. } if self.enabled.load(Ordering::SeqCst) => {
                return Err(Error::ReturnPath { what: "a second HELLO (the destination sends one, first)".into() });
            }
            Message::Hello { features } => {
                self.features.store(features, Ordering::SeqCst);
                self.enabled.store(true, Ordering::SeqCst);
                self.cv.notify_all();
            }
            Message::SwitchoverAck { device } => {
                let c = &controls[find(&device)?];
                c.status().initial_data_acked = true;
                c.event(SessionEvent::InitialDataAcked(device));
            }
            Message::Verdict { device, verdict: Verdict::Failed { what } } if !ids.contains(&device) => {
                // The destination expects a device this source does not migrate: keep its
                // reason (the first), which the source's error reports.
                self.lock().foreign.get_or_insert((device, what));
            }
            Message::Verdict { device, verdict } => {
                let i = find(&device)?;
                let mut g = self.lock();
                if g.verdicts[i].is_some() {
                    // One verdict per device: a second could turn a failure into a success.
                    return Err(Error::ReturnPath { what: format!("a second verdict for device {device}") });
                }
                g.verdicts[i] = Some(verdict);
            }
            Message::Shut { ok } => {
                let mut g = self.lock();
                g.shut = Some(ok);
                if !ok && !abort.is_aborted() {
                    // The destination failed while this session still runs (it may still be
                    // sending, to a destination that no longer reads): stop it now.
                    g.failed_first = true;
                    abort.abort();
                }
                drop(g);
                self.cv.notify_all();
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Per device, in the session's order, what the destination said; a device without a verdict
/// failed to get one (with the destination's reason for a device of its own, if it gave one).
fn given(g: &Inner, ids: &[DeviceId]) -> Verdicts {
    let missing = || {
        let what = if g.shut == Some(false) {
            "the destination reported a failure (its SHUT) without a verdict for this device: its output says why"
        } else {
            "the destination gave no verdict for this device"
        }
        .to_owned();
        Verdict::Failed {
            what: match &g.foreign {
                Some((d, why)) => format!("{what}; of its device {d}, which this source does not migrate: {why}"),
                None => what,
            },
        }
    };
    Verdicts::Given(ids.iter().cloned().zip(g.verdicts.iter().map(|v| v.clone().unwrap_or_else(missing))).collect())
}

/// How many of the verdicts came, in words, for an error that ends the wait for them.
fn verdicts_in(g: &Inner) -> String {
    let n = g.verdicts.iter().filter(|v| v.is_some()).count();
    format!("{n} of {} verdict(s) received", g.verdicts.len())
}

/// The reader thread: channel 0's incoming bytes, until `SHUT`, the peer's EOF, an error, or
/// [`RpState::stop`]. Once the session is aborted it still takes what is already queued (at
/// most [`DRAIN_AFTER_ABORT`] bytes, without waiting): a destination that failed first sent
/// its verdicts before it closed, and they say why.
pub(crate) fn read(
    fd: BorrowedFd<'_>,
    st: &RpState,
    ids: &[DeviceId],
    controls: &[DeviceControl],
    abort: &AbortHandle,
) {
    let mut dec = Decoder::default();
    let mut buf = [0u8; 2048];
    let error = loop {
        let fds = [fd, st.stop.as_fd(), abort.as_fd()];
        if let Err(e) = sys::wait_readable(&fds, TICK) {
            break Some(format!("poll: {e}"));
        }
        if abort.is_aborted() {
            break drain_queued(fd, &mut dec, st, ids, controls, abort);
        }
        if sys::wait_readable(&[st.stop.as_fd()], Duration::ZERO).unwrap_or(true) {
            break None;
        }
        match classify(Kernel.recv(fd, &mut buf)) {
            IoStep::Moved(n) => {
                st.lock().received += n;
                dec.feed(&buf[..n]);
                match drain(&mut dec, st, ids, controls, abort) {
                    Ok(true) => break None,
                    Ok(false) => {}
                    Err(e) => break Some(error_text(e)),
                }
            }
            IoStep::End => break dec.partial().then(|| "the destination closed channel 0 inside a message".into()),
            IoStep::Retry | IoStep::WaitReady => {}
            IoStep::Fatal(e) => break Some(crate::rp::io_what(&e)),
        }
    };
    let mut g = st.lock();
    g.ended = true;
    g.leftover = dec.buffered();
    if g.error.is_none() {
        g.error = error;
    }
    drop(g);
    st.cv.notify_all();
}

fn drain(
    dec: &mut Decoder,
    st: &RpState,
    ids: &[DeviceId],
    controls: &[DeviceControl],
    abort: &AbortHandle,
) -> Result<bool> {
    while let Some(m) = dec.next()? {
        if st.handle(m, ids, controls, abort)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// After the abort: the messages already queued on channel 0, without waiting (until `SHUT`,
/// nothing more queued, the peer's EOF or reset, or [`DRAIN_AFTER_ABORT`] bytes). Returns why
/// the reader stopped early, if a message was broken.
/// A failed message's text for [`RpState`]'s error, which becomes an `Error::ReturnPath`
/// again: a return-path error's own text, so that "return path:" is said once.
fn error_text(e: Error) -> String {
    match e {
        Error::ReturnPath { what } => what,
        e => e.to_string(),
    }
}

fn drain_queued(
    fd: BorrowedFd<'_>,
    dec: &mut Decoder,
    st: &RpState,
    ids: &[DeviceId],
    controls: &[DeviceControl],
    abort: &AbortHandle,
) -> Option<String> {
    let mut buf = [0u8; 2048];
    let mut taken = 0;
    while taken < DRAIN_AFTER_ABORT {
        let IoStep::Moved(n) = classify(Kernel.recv(fd, &mut buf)) else { return None };
        taken += n;
        st.lock().received += n;
        dec.feed(&buf[..n]);
        match drain(dec, st, ids, controls, abort) {
            Ok(true) => return None,
            Ok(false) => {}
            Err(e) => return Some(error_text(e)),
        }
    }
    None
}
