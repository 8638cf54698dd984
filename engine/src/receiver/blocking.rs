//! The blocking destination: one thread per channel receiving packets, one writer thread per
//! device writing them in index order, sharing the same rules (`reassembly`, `core`) under a
//! mutex as the io_uring workers. Used where io_uring is unavailable, or when forced.

use std::os::fd::BorrowedFd;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::backend::{StallClock, TICK};
use crate::blocking::{recv_exact, write_all, Bounds, Fail};
use crate::error::{Error, Result, Stage};
use crate::ids::{ChannelId, DeviceIndex};
use crate::pool::BufferPool;
use crate::receiver::core::RecvState;
use crate::receiver::reassembly::{Admit, NextWrite, Reassembly};
use crate::receiver::{RecvShared, Target};
use crate::sys::Kernel;
use crate::wire::{DEVICE_STATE_HEADER_LEN, PACKET_OVERHEAD};

struct Shared<'r, 's, 'c> {
    st: Mutex<RecvState<'r>>,
    cv: Condvar,
    /// The packet slots (disjoint slices of one pool). `reassembly` gives each slot to one
    /// owner at a time (a channel while it receives, then the device's writer), so each lock is
    /// uncontended; it only makes that hand-over safe without raw pointers.
    slots: Vec<Mutex<&'r mut [u8]>>,
    run: &'s RecvShared<'c>,
    clock: StallClock,
}

impl<'r> Shared<'r, '_, '_> {
    fn lock(&self) -> MutexGuard<'_, RecvState<'r>> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, s: u32) -> MutexGuard<'_, &'r mut [u8]> {
        self.slots[s as usize].lock().unwrap_or_else(|p| p.into_inner())
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
    let mut pool = BufferPool::new(reassembly.slot_count(), 0, run.cfg.slot_bytes())
        .map_err(|e| Error::sys("mmap receive pool", e))?;
    let slots = pool.slots_mut().map(Mutex::new).collect();
    let shared = Shared {
        st: Mutex::new(RecvState::new(reassembly, run.channels, &run.warnings)),
        cv: Condvar::new(),
        slots,
        run,
        clock: StallClock::new(),
    };
    std::thread::scope(|s| {
        for c in ChannelId::all(run.channels.count()) {
            let shared = &shared;
            s.spawn(move || {
                if let Err(e) = channel_thread(shared, c) {
                    shared.channel_failed(c, e);
                }
            });
        }
        for (t, d) in targets.iter_mut().zip(DeviceIndex::all(usize::MAX)) {
            let shared = &shared;
            s.spawn(move || {
                if let Err(e) = writer_thread(shared, d, t) {
                    shared.fail(e);
                }
            });
        }
    });
    shared.st.into_inner().unwrap_or_else(|p| p.into_inner()).finish()
}

/// Maps a receive failure on channel `c` inside `stage`.
fn recv_error(shared: &Shared<'_, '_, '_>, c: ChannelId, stage: Stage, f: Fail) -> Error {
    match f {
        Fail::Eof { got } => Error::ChannelClosed {
            channel: c,
            during: match stage {
                Stage::Header { got: base } => Stage::Header { got: base + got },
                Stage::Payload { device, idx, len, .. } => Stage::Payload { device, idx, got, len },
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
                if g.failed() {
                    return Err(Error::Aborted);
                }
                match g.admit(c, &h, v)? {
                    Admit::Accept(a) => break a,
                    Admit::Wait => {
                        if g.stuck() {
                            return Err(g.stuck_error());
                        }
                        g = shared.wait(g);
                    }
                }
            }
        };
        if a.len > 0 {
            // The slot was admitted to this channel alone until `received` hands it on.
            let mut slot = shared.slot(a.slot);
            recv_exact(&Kernel, fd, &mut slot[..a.len], shared.bounds()).map_err(|f| {
                let device = shared.lock().reassembly.id(a.dev).clone();
                recv_error(shared, c, Stage::Payload { device, idx: a.idx, got: 0, len: a.len }, f)
            })?;
        }
        shared.lock().received(c, a);
        shared.clock.touch();
        shared.cv.notify_all();
    }
}

fn writer_thread(shared: &Shared<'_, '_, '_>, d: DeviceIndex, t: &mut Target<'_>) -> Result<()> {
    let mut stream_off = 0u64;
    loop {
        let next = {
            let mut g = shared.lock();
            loop {
                if g.failed() || shared.run.abort.is_aborted() || g.reassembly.finished(d) {
                    return Ok(());
                }
                if let Some(w) = g.reassembly.next_write(d) {
                    break w;
                }
                // Every channel closed and nothing more can come for this device.
                if g.all_closed() {
                    return Ok(());
                }
                if shared.clock.idle_for() > shared.run.cfg.stall_timeout {
                    return Err(shared.stalled(Some(&g), format!("device {}: no packet to write", t.id)));
                }
                g = shared.wait(g);
            }
        };
        match next {
            NextWrite::Data { slot, len, idx } => {
                // The slot is Ready and belongs to this device's writer until `written` below.
                let slot = shared.slot(slot);
                let buf = &slot[..len];
                let fd = t.data_fd().ok_or_else(|| Error::internal("a device is written outside RESUMING"))?;
                let mut short = 0;
                let r = write_all(&Kernel, fd, buf, shared.bounds(), &mut short);
                t.short_writes += short;
                r.map_err(|(off, f)| match f {
                    Fail::Aborted => Error::Aborted,
                    Fail::Stalled => {
                        shared.stalled(None, format!("device {}: its resume data fd accepts nothing", t.id))
                    }
                    Fail::Os(source) => {
                        Error::DeviceWrite { device: t.id.clone(), idx, offset: stream_off + off as u64, source }
                    }
                    Fail::Eof { .. } => Error::internal("a write reported an end of stream"),
                })?;
                stream_off += len as u64;
                shared.run.progress.add(len as u64);
            }
            NextWrite::Config { slot, len } => {
                let slot = shared.slot(slot);
                t.apply_config(&slot[..len])?;
            }
            NextWrite::Marker { .. } => shared.run.initial_data_loaded(&t.id)?,
        }
        {
            let mut g = shared.lock();
            g.reassembly.written(d);
            g.freed();
        }
        shared.clock.touch();
        shared.cv.notify_all();
    }
}
