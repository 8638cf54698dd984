//! The blocking destination: one thread per channel receiving packets, one writer thread per
//! device writing them in index order, sharing the same rules (`reassembly`, `core`) under a
//! mutex as the io_uring workers. Used where io_uring is unavailable, or when forced.

use std::os::fd::BorrowedFd;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::backend::{StallClock, TICK};
use crate::blocking::{recv_exact, write_all, Bounds, Fail};
use crate::error::{Error, Result, Stage};
use crate::ids::{ChannelId, DeviceIndex};
use crate::pool::{BufferPool, SpanGuard, SpanLocks};
use crate::receiver::core::{reorder_wait, RecvState, WriterNext};
use crate::receiver::reassembly::{Admit, Admitted, NextWrite, Piece, Reassembly};
use crate::receiver::{RecvShared, Target};
use crate::sys::Kernel;
use crate::wire::{DEVICE_STATE_HEADER_LEN, PACKET_OVERHEAD};

struct Shared<'r, 's, 'c> {
    st: Mutex<RecvState<'r>>,
    cv: Condvar,
    /// The pool's blocks. `reassembly` gives each block to one owner at a time (a channel while
    /// it receives, then the device's writer); the span locks make that hand-over safe without
    /// raw pointers, and let one `recv`/`write` cover a contiguous piece of a packet.
    blocks: SpanLocks<'r>,
    run: &'s RecvShared<'c>,
    clock: StallClock,
}

impl<'r> Shared<'r, '_, '_> {
    fn lock(&self) -> MutexGuard<'_, RecvState<'r>> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Exclusive access to a piece of a packet's blocks.
    fn piece(&self, p: Piece) -> SpanGuard<'_> {
        self.blocks.lock(p.block as usize, p.at, p.len)
    }

    fn fail(&self, e: Error) {
        self.lock().fail(e);
        self.run.abort.abort();
        self.run.channels.finish_reading();
        self.cv.notify_all();
    }

    fn wait<'g>(&self, g: MutexGuard<'g, RecvState<'r>>) -> MutexGuard<'g, RecvState<'r>> {
        self.cv.wait_timeout(g, TICK).unwrap_or_else(|p| p.into_inner()).0
    }

    fn bounds(&self) -> Bounds<'_> {
        Bounds { abort: &self.run.abort, stall: self.run.cfg.stall_timeout, clock: Some(&self.clock) }
    }

    /// A stall noticed by one thread (`what`), with the core's report of every channel and
    /// device; `g` when the caller holds the state already.
    fn stalled(&self, g: Option<&RecvState<'r>>, what: String) -> Error {
        let report = match g {
            Some(g) => g.stall_report(),
            None => self.lock().stall_report(),
        };
        Error::Timeout { what: format!("{what}; {report}"), after: self.run.cfg.stall_timeout }
    }

    /// Channel `c`'s thread ended with `e`: the core decides whether the receive fails.
    fn channel_failed(&self, c: ChannelId, e: Error) {
        let r = self.lock().channel_failed(c, e);
        match r {
            Ok(()) => self.cv.notify_all(),
            Err(e) => self.fail(e),
        }
    }
}

pub(crate) fn run(run: &RecvShared<'_>, reassembly: &mut Reassembly, targets: &mut [Target<'_>]) -> Result<()> {
    let mut pool = BufferPool::new(reassembly.block_count(), 0, reassembly.block_bytes())
        .map_err(|e| Error::sys("mmap receive pool", e))?;
    let blocks = SpanLocks::new(&mut pool);
    let shared = Shared {
        st: Mutex::new(RecvState::new(reassembly, run.channels, &run.warnings)),
        cv: Condvar::new(),
        blocks,
        run,
        clock: StallClock::new(),
    };
    std::thread::scope(|s| {
        // A thread that cannot be spawned fails the receive (the others see the abort and
        // return); the scope joins those that were.
        for c in ChannelId::all(run.channels.count()) {
            let shared = &shared;
            let h = std::thread::Builder::new().name(format!("vfmfd-rx-{}", c.index())).spawn_scoped(s, move || {
                if let Err(e) = channel_thread(shared, c) {
                    shared.channel_failed(c, e);
                }
            });
            if let Err(e) = h {
                shared.fail(Error::sys("spawn receive channel thread", e));
            }
        }
        for (t, d) in targets.iter_mut().zip(DeviceIndex::all(usize::MAX)) {
            let shared = &shared;
            let h = std::thread::Builder::new().name(format!("vfmfd-wr-{}", d.index())).spawn_scoped(s, move || {
                if let Err(e) = writer_thread(shared, d, t) {
                    shared.fail(e);
                }
            });
            if let Err(e) = h {
                shared.fail(Error::sys("spawn receive writer", e));
            }
        }
    });
    let r = shared.st.into_inner().unwrap_or_else(|p| p.into_inner()).finish();
    run.deferred.keep_pool(pool);
    r
}

/// Maps a receive failure on channel `c` inside `stage`.
fn recv_error(shared: &Shared<'_, '_, '_>, c: ChannelId, stage: Stage, f: Fail) -> Error {
    match f {
        Fail::Eof { got } => Error::ChannelClosed {
            channel: c,
            during: match stage {
                Stage::Header { got: base } => Stage::Header { got: base + got },
                Stage::Payload { device, idx, len, got: base } => Stage::Payload { device, idx, got: base + got, len },
                other => other,
            },
        },
        Fail::Os(e) => Error::Channel { channel: c, op: format!("receive {}", stage_name(&stage)), source: e },
        Fail::Stalled => shared.stalled(None, format!("channel {c}: {}", stage_name(&stage))),
        Fail::Aborted => Error::Aborted,
    }
}

fn stage_name(s: &Stage) -> String {
    match s {
        Stage::InitPacket { .. } => "the init packet".into(),
        Stage::Header { .. } => "a packet header".into(),
        Stage::Payload { device, idx, .. } => format!("packet {idx} of device {device}"),
    }
}

/// Receives the first byte of a header: `Ok(false)` at a clean end of stream, or once every
/// device completed. A channel may stay quiet for long while the others carry the data: only a
/// receive-wide stall is an error.
fn first_byte(shared: &Shared<'_, '_, '_>, fd: BorrowedFd<'_>, c: ChannelId, hdr: &mut [u8]) -> Result<bool> {
    loop {
        if shared.run.abort.is_aborted() {
            return Err(Error::Aborted);
        }
        // Woken when every device completed (or this receive failed); the run's abort is
        // checked every tick.
        let tick = Bounds::new(shared.run.channels.readers_done(), TICK);
        match recv_exact(&Kernel, fd, &mut hdr[..1], tick) {
            Ok(()) => return Ok(true),
            Err(Fail::Eof { got: 0 }) => return Ok(false),
            Err(Fail::Aborted | Fail::Stalled) if shared.lock().complete() => return Ok(false),
            Err(Fail::Aborted) => return Err(Error::Aborted),
            Err(Fail::Stalled) if shared.clock.idle_for() <= shared.run.cfg.stall_timeout => {}
            Err(f) => return Err(recv_error(shared, c, Stage::Header { got: 0 }, f)),
        }
    }
}

/// Waits until channel `c` is connected; `None` when it is not needed any more (every device
/// completed without it). Abort and failures end the wait; stalls are the writers' to report.
fn connected<'c>(shared: &Shared<'_, '_, 'c>, c: ChannelId) -> Result<Option<BorrowedFd<'c>>> {
    let chans = shared.run.channels;
    loop {
        if let Some(fd) = chans.wait_for(c, TICK) {
            return Ok(Some(fd));
        }
        // Waiting for a channel to connect is set-up, bounded by the accept timeout (the set-up
        // thread's), not a stall.
        shared.clock.touch();
        let mut g = shared.lock();
        if g.failed() || shared.run.abort.is_aborted() {
            return Err(Error::Aborted);
        }
        if g.complete() {
            g.close(c);
            return Ok(None);
        }
    }
}

fn channel_thread(shared: &Shared<'_, '_, '_>, c: ChannelId) -> Result<()> {
    let Some(fd) = connected(shared, c)? else { return Ok(()) };
    let mut hdr = [0u8; PACKET_OVERHEAD];
    loop {
        // A clean end of stream is a 0-byte read exactly at a packet boundary.
        if !first_byte(shared, fd, c, &mut hdr)? {
            shared.lock().close(c);
            shared.cv.notify_all();
            return Ok(());
        }
        recv_exact(&Kernel, fd, &mut hdr[1..], shared.bounds())
            .map_err(|f| recv_error(shared, c, Stage::Header { got: 1 }, f))?;
        let (h, v) = shared.run.decode_header(c, &hdr)?;
        shared.run.counters[c.index()].add(u64::from(h.next_packet_size) + DEVICE_STATE_HEADER_LEN as u64);
        let a = {
            let mut g = shared.lock();
            loop {
                // The abort too: a writer stops at it, and memory then never comes back.
                if g.failed() || shared.run.abort.is_aborted() {
                    return Err(Error::Aborted);
                }
                match g.admit(c, &h, v)? {
                    Admit::Accept(a) => break a,
                    Admit::Wait(_) => {
                        g.check_budget(shared.clock.idle_for(), reorder_wait(shared.run.cfg.stall_timeout))?;
                        // Memory comes back only as the writers write: a destination whose
                        // write does not progress (a sink pipe whose reader stopped, a resume
                        // fd that blocks) stalls the receive here too.
                        if shared.clock.idle_for() > shared.run.cfg.stall_timeout {
                            return Err(shared.stalled(
                                Some(&g),
                                format!(
                                    "channel {c}: packet {} of device {:?} instance {} waits for memory, and no \
                                     device write finished meanwhile",
                                    v.idx,
                                    h.idstr_lossy(),
                                    h.instance_id
                                ),
                            ));
                        }
                        g = shared.wait(g);
                    }
                }
            }
        };
        recv_payload(shared, fd, c, a)?;
        shared.lock().received(c, a);
        shared.clock.touch();
        shared.cv.notify_all();
    }
}

/// Receives admitted packet `a`'s payload on channel `c`, one contiguous piece at a time.
fn recv_payload(shared: &Shared<'_, '_, '_>, fd: BorrowedFd<'_>, c: ChannelId, a: Admitted) -> Result<()> {
    let mut got = 0;
    while got < a.len {
        let p = shared.lock().reassembly.piece(a.head, got, true);
        // The blocks were admitted to this channel alone until `received` hands them on.
        let mut buf = shared.piece(p);
        recv_exact(&Kernel, fd, &mut buf, shared.bounds()).map_err(|f| {
            let device = shared.lock().reassembly.id(a.dev).clone();
            recv_error(shared, c, Stage::Payload { device, idx: a.idx, got, len: a.len }, f)
        })?;
        got += p.len;
    }
    Ok(())
}

/// The contiguous pieces of packet `head` (`len` bytes).
fn pieces<'s, 'r, 'x, 'y>(
    shared: &'s Shared<'r, 'x, 'y>,
    head: u32,
    len: usize,
) -> impl Iterator<Item = Piece> + use<'s, 'r, 'x, 'y> {
    let mut off = 0;
    std::iter::from_fn(move || {
        (off < len).then(|| {
            let p = shared.lock().reassembly.piece(head, off, true);
            off += p.len;
            p
        })
    })
}

/// Writes data packet `idx` (chain `head`, `len` bytes, at stream offset `stream_off`) to
/// device `t`, one contiguous piece at a time.
fn write_packet(
    shared: &Shared<'_, '_, '_>,
    t: &mut Target<'_>,
    (head, len, idx): (u32, usize, crate::ids::PacketIndex),
    stream_off: u64,
) -> Result<()> {
    let fd = t.data_fd().ok_or_else(|| Error::internal("a device is written outside RESUMING"))?;
    let (mut done, mut short) = (0, 0);
    let mut r = Ok(());
    for p in pieces(shared, head, len) {
        // The blocks are Ready and belong to this device's writer until `written`.
        let buf = shared.piece(p);
        r = write_all(&Kernel, fd, &buf, shared.bounds(), &mut short).map_err(|(off, f)| (done + off, f));
        if r.is_err() {
            break;
        }
        done += p.len;
    }
    t.short_writes += short;
    r.map_err(|(off, f)| match f {
        Fail::Aborted => Error::Aborted,
        Fail::Stalled => shared.stalled(None, format!("device {}: its resume data fd accepts nothing", t.id)),
        Fail::Os(source) => Error::DeviceWrite { device: t.id.clone(), idx, offset: stream_off + off as u64, source },
        Fail::Eof { .. } => Error::internal("a write reported an end of stream"),
    })
}

/// Applies device `t`'s config blob held in chain `head`: in place when it is one contiguous
/// piece (the usual case), else gathered into one buffer (once per device).
fn apply_config(shared: &Shared<'_, '_, '_>, t: &mut Target<'_>, head: u32, len: usize) -> Result<()> {
    if len == 0 {
        return t.apply_config(&[]);
    }
    let first = shared.lock().reassembly.piece(head, 0, true);
    if first.len == len {
        return t.apply_config(&shared.piece(first));
    }
    let mut blob = Vec::with_capacity(len);
    for p in pieces(shared, head, len) {
        blob.extend_from_slice(&shared.piece(p));
    }
    t.apply_config(&blob)
}

fn writer_thread(shared: &Shared<'_, '_, '_>, d: DeviceIndex, t: &mut Target<'_>) -> Result<()> {
    let mut stream_off = 0u64;
    loop {
        let next = {
            let mut g = shared.lock();
            loop {
                match g.writer_next(d, shared.run.abort.is_aborted()) {
                    WriterNext::Write(w) => break w,
                    WriterNext::End => return Ok(()),
                    WriterNext::Wait => {}
                }
                if shared.clock.idle_for() > shared.run.cfg.stall_timeout {
                    return Err(shared.stalled(Some(&g), format!("device {}: no packet to write", t.id)));
                }
                g = shared.wait(g);
            }
        };
        let complete = matches!(next, NextWrite::Config { .. });
        match next {
            NextWrite::Data { head, len, idx } => {
                write_packet(shared, t, (head, len, idx), stream_off)?;
                stream_off += len as u64;
                shared.run.progress.add(len as u64);
            }
            NextWrite::Config { head, len } => apply_config(shared, t, head, len)?,
            NextWrite::Marker { .. } => shared.run.initial_data_loaded(&t.id)?,
        }
        {
            let mut g = shared.lock();
            g.reassembly.written(d);
            g.freed();
        }
        shared.clock.touch();
        shared.cv.notify_all();
        if complete {
            // This device's own thread: its validation holds up no other device.
            t.validate();
        }
    }
}
