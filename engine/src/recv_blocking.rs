//! The blocking destination: one thread per channel receiving packets, one writer thread per
//! device writing them in index order, sharing the same reassembly bookkeeping (under a mutex)
//! as the io_uring loop. Used where io_uring is unavailable, or when forced.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::pool::BufferPool;
use crate::reassembly::{Admit, NextWrite, Reassembly};
use crate::recv::{recv_exact, RecvExactError, RecvShared, Target};
use crate::wire::{DeviceStateHeader, VfioPacketHeader, DEVICE_STATE_HEADER_LEN, PACKET_OVERHEAD, VFIO_HEADER_LEN};

struct State<'r> {
    re: &'r mut Reassembly,
    /// Bumped whenever a write frees memory: a parked channel must retry.
    epoch: u64,
    /// Per channel: the epoch at which its packet was last refused, while it is parked.
    parked_at: Vec<Option<u64>>,
    eof: usize,
    err: Option<Error>,
}

impl State<'_> {
    /// Every open channel waits for memory it was refused *since the last write*, and no write
    /// is pending that could free any: nothing can ever move again.
    fn stuck(&self, nch: usize) -> bool {
        let parked = self.parked_at.iter().filter(|p| **p == Some(self.epoch)).count();
        parked + self.eof == nch && !self.re.write_pending()
    }
}

struct Shared<'r, 's, 'c> {
    st: Mutex<State<'r>>,
    cv: Condvar,
    pool: BufferPool,
    sh: &'s RecvShared<'c>,
    nch: usize,
    start: Instant,
    /// Nanoseconds after `start` of the last packet received or written by anyone: a quiet
    /// channel is fine while the others make progress.
    last_progress_ns: std::sync::atomic::AtomicU64,
}

impl<'r> Shared<'r, '_, '_> {
    fn lock(&self) -> MutexGuard<'_, State<'r>> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, e: Error) {
        let mut g = self.lock();
        Error::keep_root_cause(&mut g.err, e);
        self.sh.abort.abort();
        drop(g);
        self.cv.notify_all();
    }

    fn touch(&self) {
        let ns = self.start.elapsed().as_nanos() as u64;
        self.last_progress_ns.store(ns, std::sync::atomic::Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_nanos(self.last_progress_ns.load(std::sync::atomic::Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    fn wait<'g>(&self, g: MutexGuard<'g, State<'r>>) -> MutexGuard<'g, State<'r>> {
        self.cv.wait_timeout(g, crate::source::TICK).unwrap_or_else(|p| p.into_inner()).0
    }
}

pub(crate) fn run(sh: &RecvShared<'_>, re: &mut Reassembly, targets: &mut [Target<'_>]) -> Result<()> {
    let pool =
        BufferPool::new(re.slot_count(), 0, sh.cfg.slot_bytes()).map_err(|e| Error::sys("mmap receive pool", e))?;
    let shared = Shared {
        st: Mutex::new(State { re, epoch: 0, parked_at: vec![None; sh.channels.len()], eof: 0, err: None }),
        cv: Condvar::new(),
        pool,
        sh,
        nch: sh.channels.len(),
        start: Instant::now(),
        last_progress_ns: std::sync::atomic::AtomicU64::new(0),
    };
    std::thread::scope(|s| {
        for c in 0..shared.nch {
            let shared = &shared;
            s.spawn(move || {
                if let Err(e) = channel_thread(shared, c) {
                    shared.fail(e);
                }
            });
        }
        for (d, t) in targets.iter_mut().enumerate() {
            let shared = &shared;
            s.spawn(move || {
                if let Err(e) = writer_thread(shared, d, t) {
                    shared.fail(e);
                }
            });
        }
    });
    let st = shared.st.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = st.err {
        return Err(e);
    }
    match st.re.incomplete_error() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Maps a receive failure; `what` names the structure and `base`/`total` place the bytes
/// received so far within it (for "in the middle of ..." messages).
fn map_recv(c: usize, what: String, e: RecvExactError, stall: Duration, base: usize, total: usize) -> Error {
    match e {
        RecvExactError::Eof(got) => Error::ChannelClosed {
            channel: c,
            during: format!("in the middle of {what} ({} of {total} bytes)", base + got),
        },
        RecvExactError::Io(e) => Error::Channel { channel: c, op: format!("receive {what}"), source: e },
        RecvExactError::Timeout => Error::Timeout { what: format!("channel {c}: {what}"), after: stall },
        RecvExactError::Aborted => Error::Aborted,
    }
}

fn channel_thread(x: &Shared<'_, '_, '_>, c: usize) -> Result<()> {
    let fd = x.sh.channels[c];
    let stall = x.sh.cfg.stall_timeout;
    let max = u32::try_from(x.sh.cfg.max_packet_bytes + VFIO_HEADER_LEN).unwrap_or(u32::MAX);
    let mut hdr = [0u8; PACKET_OVERHEAD];
    loop {
        // A clean end of stream is a 0-byte read exactly at a packet boundary. A channel may
        // stay quiet for long while the others carry the data: only a receive-wide stall of
        // `stall` is an error.
        let first = loop {
            match recv_exact(fd, &mut hdr[..1], Instant::now() + crate::source::TICK * 4, &x.sh.abort) {
                Err(RecvExactError::Timeout) if x.idle_for() <= stall => continue,
                other => break other,
            }
        };
        match first {
            Err(RecvExactError::Eof(0)) => {
                let mut g = x.lock();
                g.eof += 1;
                drop(g);
                x.cv.notify_all();
                return Ok(());
            }
            Err(e) => return Err(map_recv(c, "a packet header".into(), e, stall, 0, PACKET_OVERHEAD)),
            Ok(()) => {}
        }
        recv_exact(fd, &mut hdr[1..], Instant::now() + stall, &x.sh.abort)
            .map_err(|e| map_recv(c, "a packet header".into(), e, stall, 1, PACKET_OVERHEAD))?;
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
        x.sh.counters[c].add(u64::from(h.next_packet_size) + DEVICE_STATE_HEADER_LEN as u64);
        let a = {
            let mut g = x.lock();
            let a = loop {
                if let Some(e) = g.err.take() {
                    g.err = Some(e);
                    return Err(Error::Aborted);
                }
                match g.re.admit(c, &h, v)? {
                    Admit::Accept(a) => break a,
                    Admit::Wait => {
                        let epoch = g.epoch;
                        g.parked_at[c] = Some(epoch);
                        if g.stuck(x.nch) {
                            let what = g.re.stuck_report();
                            return Err(Error::BudgetExceeded { what });
                        }
                        g = x.wait(g);
                    }
                }
            };
            g.parked_at[c] = None;
            a
        };
        if a.len > 0 {
            // SAFETY: the slot was admitted to this channel alone; no other thread touches it
            // until `received` hands it to the device's writer.
            let buf = unsafe { std::slice::from_raw_parts_mut(x.pool.payload_ptr(a.slot as usize), a.len) };
            recv_exact(fd, buf, Instant::now() + stall, &x.sh.abort).map_err(|e| {
                let what = format!("packet {} of device {}", a.idx, x.lock().re.id(a.dev));
                map_recv(c, what, e, stall, 0, a.len)
            })?;
        }
        x.lock().re.received(a);
        x.touch();
        x.cv.notify_all();
    }
}

fn writer_thread(x: &Shared<'_, '_, '_>, d: usize, t: &mut Target<'_>) -> Result<()> {
    let fd = t.data_fd();
    let mut stream_off = 0u64;
    let mut idle_since = Instant::now();
    loop {
        let next = {
            let mut g = x.lock();
            loop {
                if g.err.is_some() || x.sh.abort.is_aborted() {
                    return Ok(());
                }
                if g.re.finished(d) {
                    return Ok(());
                }
                if let Some(w) = g.re.next_write(d) {
                    break w;
                }
                // Every channel closed and nothing more can come for this device.
                if g.eof == x.nch {
                    return Ok(());
                }
                if idle_since.elapsed() > x.sh.cfg.stall_timeout {
                    return Err(Error::Timeout {
                        what: format!("device {}: no packet to write", t.id),
                        after: x.sh.cfg.stall_timeout,
                    });
                }
                g = x.wait(g);
            }
        };
        match next {
            NextWrite::Data { slot, len, idx } => {
                // SAFETY: the slot is Ready (its payload fully received) and belongs to this
                // device's writer until `written` below.
                let buf = unsafe { std::slice::from_raw_parts(x.pool.payload_ptr(slot as usize), len) };
                write_all(fd, buf, &mut t.short_writes).map_err(|(off, e)| Error::DeviceWrite {
                    device: t.id.idstr().into_owned(),
                    idx,
                    offset: stream_off + off as u64,
                    source: e,
                })?;
                stream_off += len as u64;
                x.sh.progress.add(len as u64);
            }
            NextWrite::Config { slot, len } => {
                // SAFETY: as above.
                let blob = unsafe { std::slice::from_raw_parts(x.pool.payload_ptr(slot as usize), len) };
                t.apply_config(blob)?;
            }
        }
        {
            let mut g = x.lock();
            g.re.written(d);
            g.epoch += 1;
        }
        x.touch();
        idle_since = Instant::now();
        x.cv.notify_all();
    }
}

fn write_all(fd: RawFd, mut buf: &[u8], short: &mut u64) -> Result<(), (usize, io::Error)> {
    let total = buf.len();
    let mut spins = 0;
    while !buf.is_empty() {
        // SAFETY: `buf` is a live slice of `buf.len()` bytes.
        let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if r > 0 {
            if (r as usize) < buf.len() {
                *short += 1;
            }
            buf = &buf[r as usize..];
            continue;
        }
        let e = if r == 0 {
            io::Error::new(io::ErrorKind::WriteZero, "resume data fd accepted 0 bytes")
        } else {
            io::Error::last_os_error()
        };
        if e.raw_os_error() == Some(libc::EINTR) && spins < 1000 {
            spins += 1;
            continue;
        }
        return Err((total - buf.len(), e));
    }
    Ok(())
}
