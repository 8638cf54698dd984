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
use crate::wire::{DeviceStateHeader, VfioPacketHeader, DEVICE_STATE_HEADER_LEN, PACKET_OVERHEAD, VFIO_HEADER_LEN};

struct Shared<'r, 's, 'c> {
    st: Mutex<RecvState<'r>>,
    cv: Condvar,
    /// The packet slots (disjoint slices of one pool). `reassembly` gives each slot to one
    /// owner at a time (a channel while it receives, then the device's writer), so each lock is
    /// uncontended; it only makes that hand-over safe without raw pointers.
    slots: Vec<Mutex<&'r mut [u8]>>,
    sh: &'s RecvShared<'c>,
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
        self.sh.abort.abort();
        self.cv.notify_all();
    }

    fn wait<'g>(&self, g: MutexGuard<'g, RecvState<'r>>) -> MutexGuard<'g, RecvState<'r>> {
        self.cv.wait_timeout(g, TICK).unwrap_or_else(|p| p.into_inner()).0
    }

    fn bounds(&self) -> Bounds<'_> {
        Bounds { abort: &self.sh.abort, stall: self.sh.cfg.stall_timeout }
    }

    fn stalled(&self, what: String) -> Error {
        Error::Timeout { what, after: self.sh.cfg.stall_timeout }
    }
}

pub(crate) fn run(sh: &RecvShared<'_>, re: &mut Reassembly, targets: &mut [Target<'_>]) -> Result<()> {
    let mut pool =
        BufferPool::new(re.slot_count(), 0, sh.cfg.slot_bytes()).map_err(|e| Error::sys("mmap receive pool", e))?;
    let slots = pool.slots_mut().map(Mutex::new).collect();
    let shared = Shared {
        st: Mutex::new(RecvState::new(re, sh.channels.len())),
        cv: Condvar::new(),
        slots,
        sh,
        clock: StallClock::new(),
    };
    std::thread::scope(|s| {
        for c in ChannelId::all(sh.channels.len()) {
            let shared = &shared;
            s.spawn(move || {
                if let Err(e) = channel_thread(shared, c) {
                    shared.fail(e);
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
fn recv_error(x: &Shared<'_, '_, '_>, c: ChannelId, stage: Stage, f: Fail) -> Error {
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
        Fail::Stalled => x.stalled(format!("channel {c}: {}", stage_name(&stage))),
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

/// Receives the first byte of a header: `Ok(false)` at a clean end of stream. A channel may
/// stay quiet for long while the others carry the data: only a receive-wide stall is an error.
fn first_byte(x: &Shared<'_, '_, '_>, fd: BorrowedFd<'_>, c: ChannelId, hdr: &mut [u8]) -> Result<bool> {
    loop {
        let tick = Bounds { abort: &x.sh.abort, stall: TICK * 4 };
        match recv_exact(&Kernel, fd, &mut hdr[..1], tick) {
            Ok(()) => return Ok(true),
            Err(Fail::Eof { got: 0 }) => return Ok(false),
            Err(Fail::Stalled) if x.clock.idle_for() <= x.sh.cfg.stall_timeout => {}
            Err(f) => return Err(recv_error(x, c, Stage::Header { got: 0 }, f)),
        }
    }
}

fn channel_thread(x: &Shared<'_, '_, '_>, c: ChannelId) -> Result<()> {
    let fd = x.sh.channels[c.index()];
    let max = u32::try_from(x.sh.cfg.max_packet_bytes + VFIO_HEADER_LEN).unwrap_or(u32::MAX);
    let mut hdr = [0u8; PACKET_OVERHEAD];
    loop {
        // A clean end of stream is a 0-byte read exactly at a packet boundary.
        if !first_byte(x, fd, c, &mut hdr)? {
            x.lock().close(c);
            x.cv.notify_all();
            return Ok(());
        }
        recv_exact(&Kernel, fd, &mut hdr[1..], x.bounds())
            .map_err(|f| recv_error(x, c, Stage::Header { got: 1 }, f))?;
        let h = DeviceStateHeader::decode(&hdr, max).map_err(|e| Error::Wire {
            channel: c,
            what: "device state packet header",
            source: e,
        })?;
        let v = VfioPacketHeader::decode(&hdr[DEVICE_STATE_HEADER_LEN..]).map_err(|e| Error::Wire {
            channel: c,
            what: "VFIO device state packet header",
            source: e,
        })?;
        x.sh.counters[c.index()].add(u64::from(h.next_packet_size) + DEVICE_STATE_HEADER_LEN as u64);
        let a = {
            let mut g = x.lock();
            loop {
                if g.failed() {
                    return Err(Error::Aborted);
                }
                match g.re.admit(c, &h, v)? {
                    Admit::Accept(a) => break a,
                    Admit::Wait => {
                        g.park(c);
                        if g.stuck() {
                            return Err(g.stuck_error());
                        }
                        g = x.wait(g);
                    }
                }
            }
        };
        x.lock().unpark(c);
        if a.len > 0 {
            // The slot was admitted to this channel alone until `received` hands it on.
            let mut slot = x.slot(a.slot);
            recv_exact(&Kernel, fd, &mut slot[..a.len], x.bounds()).map_err(|f| {
                let device = x.lock().re.id(a.dev).clone();
                recv_error(x, c, Stage::Payload { device, idx: a.idx, got: 0, len: a.len }, f)
            })?;
        }
        x.lock().re.received(a);
        x.clock.touch();
        x.cv.notify_all();
    }
}

fn writer_thread(x: &Shared<'_, '_, '_>, d: DeviceIndex, t: &mut Target<'_>) -> Result<()> {
    let mut stream_off = 0u64;
    loop {
        let next = {
            let mut g = x.lock();
            loop {
                if g.failed() || x.sh.abort.is_aborted() || g.re.finished(d) {
                    return Ok(());
                }
                if let Some(w) = g.re.next_write(d) {
                    break w;
                }
                // Every channel closed and nothing more can come for this device.
                if g.all_closed() {
                    return Ok(());
                }
                if x.clock.idle_for() > x.sh.cfg.stall_timeout {
                    return Err(x.stalled(format!("device {}: no packet to write", t.id)));
                }
                g = x.wait(g);
            }
        };
        match next {
            NextWrite::Data { slot, len, idx } => {
                // The slot is Ready and belongs to this device's writer until `written` below.
                let slot = x.slot(slot);
                let buf = &slot[..len];
                let fd = t.data_fd().ok_or_else(|| Error::internal("a device is written outside RESUMING"))?;
                let mut short = 0;
                let r = write_all(&Kernel, fd, buf, x.bounds(), &mut short);
                t.short_writes += short;
                r.map_err(|(off, f)| match f {
                    Fail::Aborted => Error::Aborted,
                    Fail::Stalled => x.stalled(format!("device {}: its resume data fd accepts nothing", t.id)),
                    Fail::Os(source) => {
                        Error::DeviceWrite { device: t.id.clone(), idx, offset: stream_off + off as u64, source }
                    }
                    Fail::Eof { .. } => Error::internal("a write reported an end of stream"),
                })?;
                stream_off += len as u64;
                x.sh.progress.add(len as u64);
            }
            NextWrite::Config { slot, len } => {
                let slot = x.slot(slot);
                t.apply_config(&slot[..len])?;
            }
        }
        {
            let mut g = x.lock();
            g.re.written(d);
            g.freed();
        }
        x.clock.touch();
        x.cv.notify_all();
    }
}
