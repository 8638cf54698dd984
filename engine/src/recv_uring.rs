//! The io_uring loop of the destination: one thread, one ring, every channel and device.
//!
//! Each channel has one `RECV` in flight: first the 288 bytes of a packet header (into a small
//! per-channel buffer), then the payload straight into a registered slot. Each device has at
//! most one `WRITE_FIXED` in flight, from the slot of its next packet index; a short write is
//! continued where it stopped. A channel whose packet has no memory yet parks until a write
//! frees a slot (see `reassembly` for why that cannot deadlock).

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use crate::error::{Error, Result};
use crate::pool::BufferPool;
use crate::reassembly::{Admit, Admitted, NextWrite, Reassembly};
use crate::recv::{RecvShared, Target};
use crate::ring::{cqe_error, Ring};
use crate::source::TICK;
use crate::wire::{DeviceStateHeader, VfioPacketHeader, DEVICE_STATE_HEADER_LEN, PACKET_OVERHEAD};

const K_RECV: u64 = 1;
const K_WRITE: u64 = 2;
const K_ABORT: u64 = 3;
const K_CANCEL: u64 = 4;

fn ud(kind: u64, n: usize) -> u64 {
    (kind << 56) | n as u64
}

#[derive(Debug, Clone, Copy)]
enum Ch {
    Header { got: usize },
    Payload { a: Admitted, got: usize },
    Parked,
    Eof,
}

#[derive(Debug, Clone, Copy, Default)]
struct Wr {
    slot: u32,
    len: usize,
    off: usize,
    idx: u32,
    stream_off: u64,
}

struct Loop<'s, 'c, 'a, 't> {
    ring: Ring,
    pool: BufferPool,
    hdrs: Box<[[u8; PACKET_OVERHEAD]]>,
    sh: &'s RecvShared<'c>,
    re: &'s mut Reassembly,
    targets: &'s mut [Target<'a>],
    ch: Vec<Ch>,
    parked_hdr: Vec<Option<(DeviceStateHeader, VfioPacketHeader)>>,
    wr: Vec<Wr>,
    inflight: usize,
    abort_seen: bool,
    last_progress: Instant,
    _t: std::marker::PhantomData<&'t ()>,
}

pub(crate) fn run(sh: &RecvShared<'_>, re: &mut Reassembly, targets: &mut [Target<'_>]) -> Result<()> {
    let ring = Ring::new(64, 256).map_err(|e| Error::sys(crate::ring::describe_setup_error(&e), e))?;
    let pool =
        BufferPool::new(re.slot_count(), 0, sh.cfg.slot_bytes()).map_err(|e| Error::sys("mmap receive pool", e))?;
    // SAFETY: `pool` lives in the same `Loop` after `ring` (dropped after it), and `finish`
    // drains every operation before either is dropped.
    unsafe { ring.register_pool(&pool) }.map_err(|e| {
        Error::sys("IORING_REGISTER_BUFFERS for the receive budget (raise RLIMIT_MEMLOCK or lower the budget)", e)
    })?;
    let mut files: Vec<i32> = sh.channels.clone();
    files.extend(targets.iter().map(|t| t.data_fd()));
    files.push(std::os::fd::AsFd::as_fd(&sh.abort).as_raw_fd());
    ring.register_files(&files).map_err(|e| Error::sys("IORING_REGISTER_FILES", e))?;
    let _ = ring.limit_workers(2, 2);
    let n = sh.channels.len();
    let mut lp = Loop {
        ring,
        pool,
        hdrs: vec![[0u8; PACKET_OVERHEAD]; n].into_boxed_slice(),
        sh,
        re,
        targets,
        ch: vec![Ch::Header { got: 0 }; n],
        parked_hdr: vec![None; n],
        wr: Vec::new(),
        inflight: 0,
        abort_seen: false,
        last_progress: Instant::now(),
        _t: std::marker::PhantomData,
    };
    lp.wr = vec![Wr::default(); lp.targets.len()];
    let r = lp.run();
    let f = lp.finish();
    r.and(f)
}

impl Loop<'_, '_, '_, '_> {
    fn run(&mut self) -> Result<()> {
        let abort_fd = types::Fixed((self.sh.channels.len() + self.targets.len()) as u32);
        let e = opcode::PollAdd::new(abort_fd, libc::POLLIN as u32).build().user_data(ud(K_ABORT, 0));
        // SAFETY: a poll refers to no memory; the fixed file stays registered.
        unsafe { self.ring.push(&[e]) }.map_err(|e| Error::sys("io_uring push", e))?;
        self.inflight += 1;
        for c in 0..self.sh.channels.len() {
            self.recv_next(c)?;
        }
        loop {
            if self.abort_seen || self.sh.abort.is_aborted() {
                return Err(Error::Aborted);
            }
            let all_eof = self.ch.iter().all(|c| matches!(c, Ch::Eof));
            if all_eof && !self.re.write_pending() {
                return match self.re.incomplete_error() {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
            if self.ch.iter().all(|c| matches!(c, Ch::Eof | Ch::Parked)) && !self.re.write_pending() && !all_eof {
                return Err(Error::BudgetExceeded { what: self.re.stuck_report() });
            }
            self.ring.submit_and_wait(TICK).map_err(|e| Error::sys("io_uring_enter", e))?;
            let n = self.ring.reap().len();
            if n > 0 {
                self.last_progress = Instant::now();
            } else if self.last_progress.elapsed() > self.sh.cfg.stall_timeout {
                return Err(Error::Timeout { what: self.waiting_for(), after: self.sh.cfg.stall_timeout });
            }
            for i in 0..n {
                let c = self.ring.reap_cached(i);
                if let Err(e) = self.handle(c) {
                    // The rest of this batch completed too: keep the in-flight count exact so
                    // `finish` knows what the kernel still holds.
                    for j in i + 1..n {
                        let c = self.ring.reap_cached(j);
                        self.account_only(c);
                    }
                    return Err(e);
                }
            }
        }
    }

    fn waiting_for(&self) -> String {
        let open: Vec<String> = self
            .ch
            .iter()
            .enumerate()
            .filter(|(_, c)| !matches!(c, Ch::Eof))
            .map(|(i, c)| match c {
                Ch::Payload { a, got } => {
                    format!("channel {i} in packet {} of {} ({got} of {} bytes)", a.idx, self.re.id(a.dev), a.len)
                }
                Ch::Parked => format!("channel {i} waiting for memory"),
                _ => format!("channel {i} waiting for a packet header"),
            })
            .collect();
        match self.re.incomplete_error() {
            Some(e) => format!("{e}; {}", open.join(", ")),
            None => format!("all devices complete; waiting for channels to close: {}", open.join(", ")),
        }
    }

    fn recv_next(&mut self, c: usize) -> Result<()> {
        let (ptr, len) = match self.ch[c] {
            Ch::Header { got } => (self.hdrs[c][got..].as_mut_ptr(), PACKET_OVERHEAD - got),
            Ch::Payload { a, got } => {
                // SAFETY: `got < a.len <= payload_bytes`, so the pointer stays inside the slot.
                (unsafe { self.pool.payload_ptr(a.slot as usize).add(got) }, a.len - got)
            }
            Ch::Parked | Ch::Eof => return Ok(()),
        };
        let e = opcode::Recv::new(types::Fixed(c as u32), ptr, len as u32)
            .flags(libc::MSG_WAITALL)
            .build()
            .user_data(ud(K_RECV, c));
        // SAFETY: the header buffers are boxed for the loop's life and the slot is owned by this
        // channel until the payload is complete; `finish` reaps every RECV before unmapping.
        unsafe { self.ring.push(&[e]) }.map_err(|e| Error::sys("io_uring push", e))?;
        self.inflight += 1;
        Ok(())
    }

    fn handle(&mut self, c: crate::ring::Completion) -> Result<()> {
        let kind = c.user_data >> 56;
        let n = (c.user_data & 0xffff_ffff) as usize;
        match kind {
            K_ABORT => {
                self.inflight -= 1;
                if c.res != -libc::ECANCELED {
                    self.abort_seen = true;
                }
                Ok(())
            }
            K_RECV => {
                self.inflight -= 1;
                self.on_recv(n, c.res)
            }
            K_WRITE => {
                self.inflight -= 1;
                self.on_write(n, c.res)
            }
            _ => Ok(()),
        }
    }

    fn on_recv(&mut self, c: usize, res: i32) -> Result<()> {
        if res < 0 {
            // EINTR/EAGAIN: nothing happened; receive again.
            if res == -libc::EINTR || res == -libc::EAGAIN {
                return self.recv_next(c);
            }
            let what = match self.ch[c] {
                Ch::Payload { a, .. } => format!("receive packet {} of {}", a.idx, self.re.id(a.dev)),
                _ => "receive packet header".to_string(),
            };
            return Err(Error::Channel { channel: c, op: what, source: cqe_error(res) });
        }
        let r = res as usize;
        match self.ch[c] {
            Ch::Header { got } => {
                if r == 0 {
                    if got == 0 {
                        self.ch[c] = Ch::Eof;
                        return Ok(());
                    }
                    return Err(Error::ChannelClosed {
                        channel: c,
                        during: format!("in the middle of a packet header ({got} of {PACKET_OVERHEAD} bytes)"),
                    });
                }
                let got = got + r;
                if got < PACKET_OVERHEAD {
                    self.ch[c] = Ch::Header { got };
                    return self.recv_next(c);
                }
                let max =
                    u32::try_from(self.sh.cfg.max_packet_bytes + crate::wire::VFIO_HEADER_LEN).unwrap_or(u32::MAX);
                let h = DeviceStateHeader::decode(&self.hdrs[c], max).map_err(|e| Error::Wire {
                    channel: c,
                    what: "device state packet header",
                    source: e,
                })?;
                let v = VfioPacketHeader::decode(&self.hdrs[c][DEVICE_STATE_HEADER_LEN..])
                    .map_err(|e| Error::Wire { channel: c, what: "VFIO device state packet header", source: e })?;
                self.sh.counters[c].add(u64::from(h.next_packet_size) + DEVICE_STATE_HEADER_LEN as u64);
                self.offer(c, h, v)
            }
            Ch::Payload { a, got } => {
                if r == 0 {
                    return Err(Error::ChannelClosed {
                        channel: c,
                        during: format!(
                            "in the middle of packet {} of device {} ({got} of {} bytes)",
                            a.idx,
                            self.re.id(a.dev),
                            a.len
                        ),
                    });
                }
                let got = got + r;
                if got < a.len {
                    self.ch[c] = Ch::Payload { a, got };
                    return self.recv_next(c);
                }
                self.payload_done(c, a)
            }
            Ch::Parked | Ch::Eof => Ok(()),
        }
    }

    fn offer(&mut self, c: usize, h: DeviceStateHeader, v: VfioPacketHeader) -> Result<()> {
        match self.re.admit(c, &h, v)? {
            Admit::Accept(a) => {
                self.parked_hdr[c] = None;
                if a.len == 0 {
                    return self.payload_done(c, a);
                }
                self.ch[c] = Ch::Payload { a, got: 0 };
                self.recv_next(c)
            }
            Admit::Wait => {
                self.parked_hdr[c] = Some((h, v));
                self.ch[c] = Ch::Parked;
                Ok(())
            }
        }
    }

    fn payload_done(&mut self, c: usize, a: Admitted) -> Result<()> {
        self.re.received(a);
        self.ch[c] = Ch::Header { got: 0 };
        self.recv_next(c)?;
        self.try_write(a.dev)
    }

    fn try_write(&mut self, d: usize) -> Result<()> {
        loop {
            match self.re.next_write(d) {
                None => return Ok(()),
                Some(NextWrite::Data { slot, len, idx }) => {
                    let stream_off = self.wr[d].stream_off;
                    self.wr[d] = Wr { slot, len, off: 0, idx, stream_off };
                    return self.submit_write(d);
                }
                Some(NextWrite::Config { slot, len }) => {
                    // SAFETY: the config slot is Ready: its RECV completed and nothing else
                    // refers to it until `written` frees it below.
                    let blob = unsafe { self.pool.slot_bytes(slot as usize, 0, len) };
                    self.targets[d].apply_config(blob)?;
                    self.re.written(d);
                    self.unpark()?;
                }
            }
        }
    }

    fn submit_write(&mut self, d: usize) -> Result<()> {
        let w = self.wr[d];
        // SAFETY: `off < len <= payload_bytes`: inside the slot.
        let ptr = unsafe { self.pool.payload_ptr(w.slot as usize).add(w.off) };
        let fd = types::Fixed((self.sh.channels.len() + d) as u32);
        let e = opcode::WriteFixed::new(fd, ptr, (w.len - w.off) as u32, 0)
            .offset(u64::MAX)
            .build()
            .user_data(ud(K_WRITE, d));
        // SAFETY: the slot is Ready and owned by this device's writer until `written`; the
        // registered pool outlives the operation (drained in `finish`).
        unsafe { self.ring.push(&[e]) }.map_err(|e| Error::sys("io_uring push", e))?;
        self.inflight += 1;
        Ok(())
    }

    fn on_write(&mut self, d: usize, res: i32) -> Result<()> {
        let w = self.wr[d];
        if res < 0 {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                return self.submit_write(d);
            }
            return Err(Error::DeviceWrite {
                device: self.re.id(d).idstr().into_owned(),
                idx: w.idx,
                offset: w.stream_off + w.off as u64,
                source: cqe_error(res),
            });
        }
        if res == 0 {
            return Err(Error::DeviceWrite {
                device: self.re.id(d).idstr().into_owned(),
                idx: w.idx,
                offset: w.stream_off + w.off as u64,
                source: std::io::Error::new(std::io::ErrorKind::WriteZero, "resume data fd accepted 0 bytes"),
            });
        }
        let off = w.off + res as usize;
        if off < w.len {
            self.targets[d].short_writes += 1;
            self.wr[d].off = off;
            return self.submit_write(d);
        }
        self.wr[d].stream_off += w.len as u64;
        self.sh.progress.add(w.len as u64);
        self.re.written(d);
        self.try_write(d)?;
        self.unpark()
    }

    /// A slot was freed: parked channels try again, oldest channel id first.
    fn unpark(&mut self) -> Result<()> {
        for c in 0..self.ch.len() {
            if let (Ch::Parked, Some((h, v))) = (self.ch[c], self.parked_hdr[c].clone()) {
                self.offer(c, h, v)?;
            }
        }
        Ok(())
    }

    /// Retires a completion without acting on it (after a failure).
    fn account_only(&mut self, c: crate::ring::Completion) {
        if c.user_data >> 56 != K_CANCEL {
            self.inflight = self.inflight.saturating_sub(1);
        }
    }

    /// Cancels what is in flight and reaps every CQE before the pool may be unmapped; leaks
    /// the pool on purpose if the kernel does not give it back in time.
    fn finish(&mut self) -> Result<()> {
        if self.inflight == 0 {
            return Ok(());
        }
        let _ = self.ring.cancel_all(ud(K_CANCEL, 0));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.inflight > 0 && Instant::now() < deadline {
            if self.ring.submit_and_wait(Duration::from_millis(100)).is_err() {
                break;
            }
            let n = self.ring.reap().len();
            for i in 0..n {
                let c = self.ring.reap_cached(i);
                self.account_only(c);
            }
        }
        if self.inflight > 0 {
            let ring = std::mem::replace(&mut self.ring, Ring::new(2, 4).map_err(|e| Error::sys("io_uring_setup", e))?);
            let pool =
                std::mem::replace(&mut self.pool, BufferPool::new(1, 0, 4096).map_err(|e| Error::sys("mmap", e))?);
            std::mem::forget(ring);
            std::mem::forget(pool);
            return Err(Error::Timeout {
                what: format!(
                    "{} receive operations did not complete after cancel; buffers leaked on purpose",
                    self.inflight
                ),
                after: Duration::from_secs(10),
            });
        }
        Ok(())
    }
}
