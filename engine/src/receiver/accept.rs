//! Channel set-up: connections become channels as soon as their own init packet is valid.
//!
//! One thread (`vfmfd-accept`) reads the init packets of every connection at once
//! (`recv(MSG_DONTWAIT)` on each, one `poll` over all of them and the listener), under one
//! deadline: the accept timeout, counted from the start of channel set-up. A valid init packet
//! publishes its channel at once ([`Channels`]), so the backends receive on it while other
//! channels are still connecting (a source that streams on channel 0 before it connects
//! channel 1 works, whatever the socket buffers hold).
//!
//! On a listener, a connection that sends nothing valid (a port scanner, a connect-and-close,
//! an idle stray past the accept timeout, bytes without the multifd magic) is dropped with a
//! warning and does not count; at most `channels + MAX_STRAYS` connections wait for their init
//! packet at once (the oldest is dropped for a newer one). A connection with the multifd magic
//! but an invalid init packet (version, UUID, reserved bytes, a duplicate id) is a misconfigured
//! source and fails the receive at once, as does a channel id at or above the channel count
//! ([`Error::ChannelCount`]) and a device count in channel 0's offer other than the receiver's
//! ([`Error::DeviceCount`], after `HELLO`, so that the source hears why in the verdicts). Once
//! every channel is in, the listener is still watched until the receive ends, so an extra
//! channel is caught even after the data started. On sockets the caller accepted itself
//! ([`crate::Receiver::run`]) every problem is an error: they are the channels, there is
//! nothing else to wait for.

use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::abort::AbortHandle;
use crate::backend::TICK;
use crate::error::{Error, ProtocolViolation, Result, Stage};
use crate::ids::ChannelId;
use crate::receiver::{RecvShared, ACCEPTED_FEATURES};
use crate::rp::{Message, Writer};
use crate::sys::{self, EventFd, FdIo, Kernel};
use crate::wire::{InitPacket, WireError, EXT_RETURN_PATH, INIT_PACKET_LEN};

/// Connections beyond the channel count that may wait for their init packet at once.
pub(crate) const MAX_STRAYS: usize = 64;
/// New connections taken from the listener per wake-up (the rest wait in the backlog).
const ACCEPT_BATCH: usize = 64;

/// The channels of one receive, published as their init packets are validated.
#[derive(Debug)]
pub(crate) struct Channels {
    socks: Vec<OnceLock<OwnedFd>>,
    /// One kick eventfd per io_uring receive worker (channel `c` wakes worker `c % W`); empty
    /// for the blocking backend.
    pub(crate) kicks: Vec<EventFd>,
    arrived: Mutex<usize>,
    /// Every channel arrived (read on every io_uring loop turn, so without the mutex).
    all_in: AtomicBool,
    cv: Condvar,
    /// Tells the set-up thread that the receive ended (the flag, then the eventfd).
    stop: EventFd,
    stopped: AtomicBool,
    /// Fired when every device completed (or a blocking receive failed): channel readers
    /// waiting for a packet header stop waiting.
    readers_done: AbortHandle,
    /// The extension features agreed on with the source (`HELLO` sent; `wire::EXT_*`), 0 until
    /// channel 0 offered them: initial-data markers are allowed once the return path is agreed.
    features: AtomicU8,
    /// Channel 0 ended with a failure of what it delivered (bytes that are no packet, a reset)
    /// while the receive ran: with the two-phase commit, no FIN after it is a commit.
    ch0_failure: OnceLock<String>,
}

impl Channels {
    /// `n` channels, none connected yet; `workers` kick eventfds.
    ///
    /// # Errors
    /// eventfd creation (out of descriptors).
    pub(crate) fn new(n: usize, workers: usize) -> Result<Channels> {
        let ev = || EventFd::new().map_err(|e| Error::sys("eventfd", e));
        Ok(Channels {
            socks: (0..n).map(|_| OnceLock::new()).collect(),
            kicks: (0..workers).map(|_| ev()).collect::<Result<_>>()?,
            arrived: Mutex::new(0),
            all_in: AtomicBool::new(n == 0),
            cv: Condvar::new(),
            stop: ev()?,
            stopped: AtomicBool::new(false),
            readers_done: AbortHandle::new().map_err(|e| Error::sys("eventfd", e))?,
            features: AtomicU8::new(0),
            ch0_failure: OnceLock::new(),
        })
    }

    /// The channel count.
    pub(crate) fn count(&self) -> usize {
        self.socks.len()
    }

    /// Channel `c`'s socket, once its init packet was valid.
    pub(crate) fn get(&self, c: ChannelId) -> Option<BorrowedFd<'_>> {
        self.socks[c.index()].get().map(AsFd::as_fd)
    }

    /// Whether every channel is connected.
    pub(crate) fn all_arrived(&self) -> bool {
        self.all_in.load(Ordering::SeqCst)
    }

    /// Whether the return path was agreed on.
    pub(crate) fn rp_agreed(&self) -> bool {
        self.features() & EXT_RETURN_PATH != 0
    }

    /// Records that channel `c` ended with the input failure `why` (kept for channel 0, the
    /// first one only: see `ch0_failure`).
    pub(crate) fn input_failed(&self, c: ChannelId, why: &str) {
        if c == ChannelId::new(0) {
            let _ = self.ch0_failure.set(why.to_owned());
        }
    }

    /// How channel 0 failed while the receive ran, if it did.
    pub(crate) fn ch0_failure(&self) -> Option<&str> {
        self.ch0_failure.get().map(String::as_str)
    }

    /// The extension features agreed on with the source.
    pub(crate) fn features(&self) -> u8 {
        self.features.load(Ordering::SeqCst)
    }

    /// Waits at most `timeout` for channel `c` to connect.
    pub(crate) fn wait_for(&self, c: ChannelId, timeout: Duration) -> Option<BorrowedFd<'_>> {
        let g = self.arrived.lock().unwrap_or_else(|p| p.into_inner());
        if self.get(c).is_none() {
            drop(self.cv.wait_timeout(g, timeout).unwrap_or_else(|p| p.into_inner()));
        }
        self.get(c)
    }

    /// Channel `c` (its socket already stored) may be read now: wakes whoever serves it.
    fn publish(&self, c: ChannelId) {
        let mut g = self.arrived.lock().unwrap_or_else(|p| p.into_inner());
        *g += 1;
        if *g == self.count() {
            self.all_in.store(true, Ordering::SeqCst);
        }
        drop(g);
        self.cv.notify_all();
        if !self.kicks.is_empty() {
            self.kicks[c.index() % self.kicks.len()].signal();
        }
    }

    /// Every device is complete (or a blocking receive failed): nothing more is read. Wakes
    /// every reader and worker; the sockets are left as they are (nothing is consumed or shut
    /// down: channel 0 may still carry the source's commit, and what is queued is reported).
    pub(crate) fn finish_reading(&self) {
        self.readers_done.abort();
        for k in &self.kicks {
            k.signal();
        }
        let _g = self.arrived.lock().unwrap_or_else(|p| p.into_inner());
        self.cv.notify_all();
    }

    /// Fired by [`Channels::finish_reading`].
    pub(crate) fn readers_done(&self) -> &AbortHandle {
        &self.readers_done
    }

    /// The receive ended: the set-up thread takes what is already queued and returns.
    pub(crate) fn stop_accepting(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.stop.signal();
    }
}

/// A connection whose init packet is not complete yet.
struct Pending {
    sock: OwnedFd,
    /// Accept order, from 0.
    conn: u32,
    peer: String,
    buf: [u8; INIT_PACKET_LEN],
    got: usize,
    since: Instant,
}

/// What one non-blocking receive on a pending connection gave.
enum Step {
    Wait,
    Complete,
    Closed,
    Failed(std::io::Error),
}

impl Pending {
    fn new(sock: OwnedFd, conn: u32, peer: String) -> Pending {
        Pending { sock, conn, peer, buf: [0; INIT_PACKET_LEN], got: 0, since: Instant::now() }
    }

    fn step(&mut self) -> Step {
        match Kernel.recv(self.sock.as_fd(), &mut self.buf[self.got..]) {
            Ok(0) => Step::Closed,
            Ok(k) => {
                self.got += k;
                if self.got == INIT_PACKET_LEN {
                    Step::Complete
                } else {
                    Step::Wait
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {
                Step::Wait
            }
            Err(e) => Step::Failed(e),
        }
    }

    fn name(&self) -> String {
        format!("connection {}{}", self.conn, self.peer)
    }
}

/// The set-up thread's state.
struct Acceptor<'a, 'c> {
    s: &'a RecvShared<'c>,
    listener: Option<&'a TcpListener>,
    pending: Vec<Pending>,
    next_conn: u32,
    dropped: u64,
    start: Instant,
}

/// Runs channel set-up until the receive ends (`Channels::stop_accepting`), or, without a
/// listener, until every given socket is a channel.
///
/// # Errors
/// [`Error::ChannelSetup`] when fewer than N channels had a valid init packet by the accept
/// timeout (naming the connections dropped), [`Error::ChannelCount`], [`Error::DeviceCount`],
/// [`Error::InitPacket`], [`Error::Protocol`] (a channel id twice), and, for sockets the caller accepted,
/// [`Error::ConnectionClosed`] and [`Error::Connection`]. The caller aborts the receive on an
/// error.
pub(crate) fn run(s: &RecvShared<'_>, listener: Option<&TcpListener>, socks: Vec<OwnedFd>) -> Result<()> {
    if let Some(l) = listener {
        l.set_nonblocking(true).map_err(|e| Error::sys("O_NONBLOCK on the listener", e))?;
    }
    let pending: Vec<Pending> =
        (0u32..).zip(socks).map(|(conn, sock)| Pending::new(sock, conn, String::new())).collect();
    let mut a = Acceptor { s, listener, next_conn: pending.len() as u32, pending, dropped: 0, start: Instant::now() };
    let r = a.run();
    if r.is_err() {
        // Closed only when the receive returns, after the failure verdicts: a connection closed
        // now with unread input would reset, and the source would see that reset before the
        // verdicts that say why (at most `channels + MAX_STRAYS` sockets).
        let mut held = s.held.lock().unwrap_or_else(|p| p.into_inner());
        held.extend(a.pending.drain(..).map(|p| p.sock));
    }
    if let Some(l) = listener {
        let _ = l.set_nonblocking(false);
    }
    r
}

impl Acceptor<'_, '_> {
    fn run(&mut self) -> Result<()> {
        let deadline = self.start + self.s.cfg.accept_timeout;
        loop {
            if self.s.abort.is_aborted() {
                return Err(Error::Aborted);
            }
            let all = self.s.channels.all_arrived();
            if all && self.listener.is_none() {
                return Ok(());
            }
            let now = Instant::now();
            // A receive that already ended (it may complete without a channel) is not failed by
            // the set-up deadline.
            if !all && now >= deadline && !self.s.channels.stopped.load(Ordering::SeqCst) {
                return Err(self.timeout());
            }
            self.expire(now);
            let wait = if all { TICK } else { TICK.min(deadline.saturating_duration_since(now)) };
            let ready = self.poll(wait)?;
            let stopping = ready[0];
            // In accept order, so that of two connections with one id the later is named.
            let due: Vec<u32> = (self.pending.iter().zip(ready.iter().skip(3)))
                .filter(|(_, &r)| r || stopping)
                .map(|(p, _)| p.conn)
                .collect();
            for conn in due {
                self.step_conn(conn)?;
            }
            if ready[2] || stopping {
                self.accept()?;
            }
            if stopping {
                for p in std::mem::take(&mut self.pending) {
                    self.drop_stray(p, "no complete init packet before the receive ended");
                }
                return Ok(());
            }
        }
    }

    /// Polls the stop and abort eventfds, the listener and every pending connection.
    /// `[stop, abort, listener, pending...]`; the listener slot is `false` without one.
    fn poll(&self, wait: Duration) -> Result<Vec<bool>> {
        let mut fds = vec![self.s.channels.stop.as_fd(), self.s.abort.as_fd()];
        // Without a listener, poll the stop eventfd twice to keep the layout.
        fds.push(self.listener.map_or(self.s.channels.stop.as_fd(), AsFd::as_fd));
        fds.extend(self.pending.iter().map(|p| p.sock.as_fd()));
        let mut r = sys::poll_readable(&fds, wait).map_err(|e| Error::sys("poll channel set-up", e))?;
        if self.listener.is_none() {
            r[2] = false;
        }
        Ok(r)
    }

    /// Takes new connections from the listener (at most a batch per wake-up).
    fn accept(&mut self) -> Result<()> {
        let Some(l) = self.listener else { return Ok(()) };
        for _ in 0..ACCEPT_BATCH {
            let (sock, addr) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                // A connection reset while in the backlog: the next one is tried at the next
                // wake-up.
                Err(e) if is_transient_accept_error(&e) => return Ok(()),
                Err(e) => return Err(Error::sys("accept", e)),
            };
            let _ = sock.set_nodelay(true);
            let conn = self.next_conn;
            self.next_conn = self.next_conn.saturating_add(1);
            if self.pending.len() >= self.s.channels.count() + MAX_STRAYS {
                let oldest = self.pending.remove(0);
                self.drop_stray(oldest, "too many connections without an init packet (the oldest goes)");
            }
            self.pending.push(Pending::new(OwnedFd::from(sock), conn, format!(" from {addr}")));
            // Its init packet (or its close) may be there already.
            self.step_conn(conn)?;
        }
        Ok(())
    }

    /// [`Acceptor::step`] on the pending connection numbered `conn`, if it is still pending.
    fn step_conn(&mut self, conn: u32) -> Result<()> {
        match self.pending.iter().position(|p| p.conn == conn) {
            Some(i) => self.step(i),
            None => Ok(()),
        }
    }

    /// Drops pending connections that sent no complete init packet within the accept timeout
    /// of their own arrival (once every channel is in; before, the set-up deadline applies).
    fn expire(&mut self, now: Instant) {
        let limit = self.s.cfg.accept_timeout;
        let mut i = 0;
        while i < self.pending.len() {
            if now.saturating_duration_since(self.pending[i].since) >= limit && self.listener.is_some() {
                let p = self.pending.remove(i);
                self.drop_stray(p, &format!("no complete init packet within {limit:?}"));
            } else {
                i += 1;
            }
        }
    }

    /// One non-blocking receive on pending connection `i`, and what follows from it.
    fn step(&mut self, i: usize) -> Result<()> {
        let p = &mut self.pending[i];
        match p.step() {
            Step::Wait => Ok(()),
            Step::Closed => {
                let p = self.pending.remove(i);
                if self.listener.is_none() {
                    return Err(Error::ConnectionClosed {
                        connection: p.conn,
                        during: Stage::InitPacket { got: p.got },
                    });
                }
                let why = format!("closed after {} of {INIT_PACKET_LEN} init packet bytes", p.got);
                self.drop_stray(p, &why);
                Ok(())
            }
            Step::Failed(e) => {
                let p = self.pending.remove(i);
                if self.listener.is_none() {
                    return Err(Error::Connection { connection: p.conn, op: "receive init packet", source: e });
                }
                let why = format!("failed inside its init packet: {e}");
                self.drop_stray(p, &why);
                Ok(())
            }
            Step::Complete => {
                let p = self.pending.remove(i);
                self.validate(p)
            }
        }
    }

    /// A complete init packet: a channel, a stray, or a fatal error.
    fn validate(&mut self, p: Pending) -> Result<()> {
        let n = self.s.channels.count();
        let init = match InitPacket::decode(&p.buf, n, &self.s.cfg.uuid) {
            Ok(init) => init,
            Err(WireError::BadChannelId { id, .. }) => {
                return Err(Error::ChannelCount { connection: p.conn, id, expected: n });
            }
            Err(e @ WireError::BadMagic { .. }) if self.listener.is_some() => {
                self.drop_stray(p, &format!("not a multifd connection: {e}"));
                return Ok(());
            }
            Err(source) => return Err(Error::InitPacket { connection: p.conn, source }),
        };
        let channel = ChannelId::new(init.id);
        if self.s.channels.socks[channel.index()].set(p.sock).is_err() {
            return Err(Error::Protocol {
                channel,
                device: None,
                violation: ProtocolViolation::DuplicateChannelId { channel, connection: p.conn },
            });
        }
        let accepted = if self.s.cfg.return_path { init.offer & ACCEPTED_FEATURES } else { 0 };
        if channel.get() == 0 && accepted & EXT_RETURN_PATH != 0 {
            let chans = self.s.channels;
            let fd = chans.get(channel).ok_or_else(|| Error::internal("channel 0 vanished"))?;
            let w = self.s.rp.get_or_init(|| Writer::new(fd, self.s.abort.clone(), self.s.cfg.stall_timeout));
            // Agreed before HELLO leaves: the source sends markers (on any channel) only after it.
            chans.features.store(accepted, Ordering::SeqCst);
            w.send(&Message::Hello { features: accepted })?;
        }
        if channel.get() == 0 {
            // After HELLO: the source then reads the verdicts that say why (`conclude`).
            check_devices(init.devices, self.s.devices)?;
        }
        self.s.channels.publish(channel);
        Ok(())
    }

    fn drop_stray(&mut self, p: Pending, why: &str) {
        self.dropped += 1;
        self.s
            .warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{} dropped, not a channel: {why}", p.name()));
    }

    fn timeout(&self) -> Error {
        let n = self.s.channels.count();
        let got = (0..n).filter(|&c| self.s.channels.socks[c].get().is_some()).count();
        let missing: Vec<String> =
            (0..n).filter(|&c| self.s.channels.socks[c].get().is_none()).take(8).map(|c| c.to_string()).collect();
        let waiting: Vec<String> =
            self.pending.iter().map(|p| format!("{} ({} of {INIT_PACKET_LEN} bytes)", p.name(), p.got)).collect();
        let mut what = format!("missing channel(s) {}", missing.join(", "));
        if !waiting.is_empty() {
            what += &format!("; still waiting for the init packet of {}", waiting.join(", "));
        }
        if self.dropped > 0 {
            what += &format!("; {} connection(s) dropped as not channels (see the warnings)", self.dropped);
            let w = self.s.warnings.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(first) = w.first() {
                what += &format!(", first: {first}");
            }
        }
        Error::ChannelSetup { connected: got, expected: n, what, after: self.s.cfg.accept_timeout }
    }
}

/// The source's device count from channel 0's offer (`InitPacket::devices`; 0: not given, a
/// source before the field or one that offered nothing) against the receiver's `expected`.
///
/// # Errors
/// [`Error::DeviceCount`] when they differ.
fn check_devices(given: u8, expected: usize) -> Result<()> {
    if given != 0 && usize::from(given) != expected {
        return Err(Error::DeviceCount { source_devices: usize::from(given), expected });
    }
    Ok(())
}

/// Accept errors that concern one connection, not the listener (out of descriptors is not one:
/// the listener would stay readable and the loop would spin).
fn is_transient_accept_error(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO))
}
