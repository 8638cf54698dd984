//! The io_uring destination: `W` worker threads, each with its own ring, sharing one
//! registered pool and one reassembly state.
//!
//! Channel `c` belongs to worker `c % W`. A worker has one `RECV` in flight per channel: first
//! the 288 bytes of a packet header (into a small per-channel buffer), then the payload straight
//! into a registered slot. Device writes (`WRITE_FIXED`, one in flight per device) are issued by
//! whichever worker made the next packet writable (by receiving it, or by finishing the write
//! before it), and complete on that worker's ring; a short write continues where it stopped.
//! A channel whose packet has no memory yet parks; a worker that frees memory kicks the others
//! through their eventfds (see `reassembly` for why that cannot deadlock).

use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};

use crate::error::{Error, Result};
use crate::event::EventFd;
use crate::pool::BufferPool;
use crate::reassembly::{Admit, Admitted, NextWrite, Reassembly};
use crate::recv::{RecvShared, Target};
use crate::ring::{cqe_error, Completion, Ring};
use crate::source::TICK;
use crate::wire::{DeviceStateHeader, VfioPacketHeader, DEVICE_STATE_HEADER_LEN, PACKET_OVERHEAD, VFIO_HEADER_LEN};

const K_RECV: u64 = 1;
const K_WRITE: u64 = 2;
const K_ABORT: u64 = 3;
const K_CANCEL: u64 = 4;
const K_KICK: u64 = 5;

fn ud(kind: u64, n: usize) -> u64 {
    (kind << 56) | n as u64
}

struct State<'r> {
    re: &'r mut Reassembly,
    /// Bumped whenever a write frees memory: parked channels must retry.
    epoch: u64,
    /// Per channel: the epoch at which its packet was last refused, while parked.
    parked_at: Vec<Option<u64>>,
    eof: Vec<bool>,
    err: Option<Error>,
}

impl State<'_> {
    fn stuck(&self) -> bool {
        let waiting = self.parked_at.iter().zip(&self.eof).all(|(p, e)| *e || *p == Some(self.epoch));
        waiting && self.eof.iter().any(|e| !e) && !self.re.write_pending()
    }
}

struct Shared<'r, 's, 'c, 'a, 'x> {
    st: Mutex<State<'r>>,
    targets: Vec<Mutex<&'x mut Target<'a>>>,
    /// Unmapped only if no worker had to leak its ring (`leaked`).
    pool: ManuallyDrop<BufferPool>,
    leaked: AtomicBool,
    sh: &'s RecvShared<'c>,
    kicks: Vec<EventFd>,
    workers: usize,
    start: Instant,
    last_progress_ns: AtomicU64,
}

impl<'r> Shared<'r, '_, '_, '_, '_> {
    fn lock(&self) -> MutexGuard<'_, State<'r>> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, e: Error) {
        let mut g = self.lock();
        Error::keep_root_cause(&mut g.err, e);
        drop(g);
        self.sh.abort.abort();
    }

    fn touch(&self) {
        self.last_progress_ns.store(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_nanos(self.last_progress_ns.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Wakes every other worker that has a parked channel: memory was freed.
    fn kick_others(&self, me: usize, g: &State<'_>) {
        for w in 0..self.workers {
            if w == me {
                continue;
            }
            let parked = (w..g.parked_at.len()).step_by(self.workers).any(|c| g.parked_at[c].is_some());
            if parked {
                self.kicks[w].signal();
            }
        }
    }
}

pub(crate) fn run(sh: &RecvShared<'_>, re: &mut Reassembly, targets: &mut [Target<'_>]) -> Result<()> {
    let n = sh.channels.len();
    let workers = sh.cfg.workers_for(n);
    let pool =
        BufferPool::new(re.slot_count(), 0, sh.cfg.slot_bytes()).map_err(|e| Error::sys("mmap receive pool", e))?;
    let kicks = (0..workers)
        .map(|_| EventFd::new())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::sys("eventfd", e))?;
    let mut x = Shared {
        st: Mutex::new(State { re, epoch: 0, parked_at: vec![None; n], eof: vec![false; n], err: None }),
        targets: targets.iter_mut().map(Mutex::new).collect(),
        pool: ManuallyDrop::new(pool),
        leaked: AtomicBool::new(false),
        sh,
        kicks,
        workers,
        start: Instant::now(),
        last_progress_ns: AtomicU64::new(0),
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let x = &x;
                std::thread::Builder::new().name(format!("vfmfd-rx-{w}")).spawn_scoped(s, move || {
                    if let Err(e) = worker(x, w) {
                        x.fail(e);
                    }
                })
            })
            .collect();
        for h in handles {
            match h {
                Ok(h) => {
                    if h.join().is_err() {
                        x.fail(Error::sys("receive worker", std::io::Error::other("panicked")));
                    }
                }
                Err(e) => x.fail(Error::sys("spawn receive worker", e)),
            }
        }
    });
    if !x.leaked.load(Ordering::SeqCst) {
        // SAFETY: every worker has returned and reaped all its operations (none leaked), so
        // nothing refers to the pool any more; it is dropped once, here.
        unsafe { ManuallyDrop::drop(&mut x.pool) };
    }
    let st = x.st.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = st.err {
        return Err(e);
    }
    match st.re.incomplete_error() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[derive(Debug, Clone, Copy)]
enum Ch {
    Header { got: usize },
    Payload { a: Admitted, got: usize },
    Parked,
    Eof,
}

#[derive(Debug, Clone, Copy)]
struct Wr {
    slot: u32,
    len: usize,
    off: usize,
    idx: u32,
    /// Stream offset of the packet's first byte.
    base: u64,
}

struct Worker<'w, 'r, 's, 'c, 'a, 'x> {
    /// Leaked instead of dropped when the kernel did not give every buffer back.
    ring: ManuallyDrop<Ring>,
    x: &'w Shared<'r, 's, 'c, 'a, 'x>,
    me: usize,
    /// Global ids of this worker's channels; local index `i` is fixed file `i`.
    chans: Vec<usize>,
    hdrs: ManuallyDrop<Box<[[u8; PACKET_OVERHEAD]]>>,
    ch: Vec<Ch>,
    parked_hdr: Vec<Option<(DeviceStateHeader, VfioPacketHeader)>>,
    /// Writes this worker has in flight, per device.
    wr: Vec<Option<Wr>>,
    inflight: usize,
    kick_buf: ManuallyDrop<Box<u64>>,
    leaked: bool,
    need_unpark: bool,
    abort_seen: bool,
    max_size: u32,
    registered: bool,
}

impl crate::ring::Drain for Worker<'_, '_, '_, '_, '_, '_> {
    fn ring(&mut self) -> &mut Ring {
        &mut self.ring
    }
    fn retire(&mut self, c: Completion) {
        self.account_only(c);
    }
    fn pending(&self) -> bool {
        self.inflight > 0
    }
}

impl Drop for Worker<'_, '_, '_, '_, '_, '_> {
    fn drop(&mut self) {
        if self.leaked {
            // The kernel may still write into these: leak them rather than free them.
            return;
        }
        // SAFETY: dropped exactly once, here, after `finish` reaped every operation; the ring
        // goes first.
        unsafe {
            ManuallyDrop::drop(&mut self.ring);
            ManuallyDrop::drop(&mut self.hdrs);
            ManuallyDrop::drop(&mut self.kick_buf);
        }
    }
}

fn worker(x: &Shared<'_, '_, '_, '_, '_>, me: usize) -> Result<()> {
    let ring = Ring::new(64, 256).map_err(|e| Error::sys(crate::ring::describe_setup_error(&e), e))?;
    // SAFETY: the pool lives in `Shared`, which outlives every worker (scoped threads), and the
    // worker drains its ring in `finish` before returning.
    let registered = match unsafe { ring.register_pool(&x.pool) } {
        Ok(()) => true,
        // ENOMEM: RLIMIT_MEMLOCK cannot pin the pool (once per worker ring, without
        // CAP_IPC_LOCK). Plain WRITE from the same memory needs no pinning; only the per-op page
        // lookup is lost.
        Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => false,
        Err(e) => return Err(Error::sys("IORING_REGISTER_BUFFERS for the receive budget", e)),
    };
    let chans: Vec<usize> = (me..x.sh.channels.len()).step_by(x.workers).collect();
    let ndev = x.targets.len();
    let mut files: Vec<i32> = chans.iter().map(|&c| x.sh.channels[c]).collect();
    for t in &x.targets {
        files.push(t.lock().unwrap_or_else(|p| p.into_inner()).data_fd());
    }
    files.push(x.sh.abort.as_fd().as_raw_fd());
    files.push(x.kicks[me].as_fd().as_raw_fd());
    ring.register_files(&files).map_err(|e| Error::sys("IORING_REGISTER_FILES", e))?;
    let _ = ring.limit_workers(2, 2);
    let nloc = chans.len();
    let mut w = Worker {
        ring: ManuallyDrop::new(ring),
        x,
        me,
        hdrs: ManuallyDrop::new(vec![[0u8; PACKET_OVERHEAD]; nloc].into_boxed_slice()),
        ch: vec![Ch::Header { got: 0 }; nloc],
        parked_hdr: vec![None; nloc],
        chans,
        wr: vec![None; ndev],
        inflight: 0,
        kick_buf: ManuallyDrop::new(Box::new(0)),
        leaked: false,
        need_unpark: false,
        abort_seen: false,
        max_size: u32::try_from(x.sh.cfg.max_packet_bytes + VFIO_HEADER_LEN).unwrap_or(u32::MAX),
        registered,
    };
    let r = w.run();
    let f = w.finish();
    r.and(f)
}

impl Worker<'_, '_, '_, '_, '_, '_> {
    fn abort_file(&self) -> types::Fixed {
        types::Fixed((self.chans.len() + self.wr.len()) as u32)
    }

    fn kick_file(&self) -> types::Fixed {
        types::Fixed((self.chans.len() + self.wr.len() + 1) as u32)
    }

    fn push(&mut self, e: squeue::Entry) -> Result<()> {
        // SAFETY: every entry built in this file points into the shared pool (alive for the
        // whole receive and drained in `finish`), a boxed header or kick buffer owned by this
        // worker until `finish`, or nothing; fixed files stay registered for the ring's life.
        unsafe { self.ring.push(&[e]) }.map_err(|e| Error::sys("io_uring push", e))?;
        self.inflight += 1;
        Ok(())
    }

    fn arm_kick(&mut self) -> Result<()> {
        let e = opcode::Read::new(self.kick_file(), (&mut **self.kick_buf as *mut u64).cast(), 8)
            .build()
            .user_data(ud(K_KICK, 0));
        self.push(e)
    }

    fn run(&mut self) -> Result<()> {
        let e = opcode::PollAdd::new(self.abort_file(), libc::POLLIN as u32).build().user_data(ud(K_ABORT, 0));
        self.push(e)?;
        self.arm_kick()?;
        for i in 0..self.chans.len() {
            self.recv_next(i)?;
        }
        loop {
            if self.abort_seen || self.x.sh.abort.is_aborted() {
                return Err(Error::Aborted);
            }
            let own_writes = self.wr.iter().any(Option::is_some);
            if self.ch.iter().all(|c| matches!(c, Ch::Eof)) && !own_writes {
                return Ok(());
            }
            if self.x.lock().stuck() {
                return Err(Error::BudgetExceeded { what: self.x.lock().re.stuck_report() });
            }
            self.ring.submit_and_wait(TICK).map_err(|e| Error::sys("io_uring_enter", e))?;
            let n = self.ring.reap().len();
            if n > 0 {
                self.x.touch();
            } else if self.x.idle_for() > self.x.sh.cfg.stall_timeout {
                return Err(Error::Timeout { what: self.waiting_for(), after: self.x.sh.cfg.stall_timeout });
            }
            if std::mem::take(&mut self.need_unpark) {
                self.unpark()?;
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
        let g = self.x.lock();
        let open: Vec<String> = self
            .ch
            .iter()
            .enumerate()
            .filter(|(_, c)| !matches!(c, Ch::Eof))
            .map(|(i, c)| {
                let gc = self.chans[i];
                match c {
                    Ch::Payload { a, got } => {
                        format!("channel {gc} in packet {} of {} ({got} of {} bytes)", a.idx, g.re.id(a.dev), a.len)
                    }
                    Ch::Parked => format!("channel {gc} waiting for memory"),
                    _ => format!("channel {gc} waiting for a packet header"),
                }
            })
            .collect();
        match g.re.incomplete_error() {
            Some(e) => format!("{e}; {}", open.join(", ")),
            None => format!("all devices complete; waiting for channels to close: {}", open.join(", ")),
        }
    }

    fn recv_next(&mut self, i: usize) -> Result<()> {
        let (ptr, len) = match self.ch[i] {
            Ch::Header { got } => (self.hdrs[i][got..].as_mut_ptr(), PACKET_OVERHEAD - got),
            // SAFETY: `got < a.len <= payload_bytes`, so the pointer stays inside the slot.
            Ch::Payload { a, got } => (unsafe { self.x.pool.payload_ptr(a.slot as usize).add(got) }, a.len - got),
            Ch::Parked | Ch::Eof => return Ok(()),
        };
        let e = opcode::Recv::new(types::Fixed(i as u32), ptr, len as u32)
            .flags(libc::MSG_WAITALL)
            .build()
            .user_data(ud(K_RECV, i));
        self.push(e)
    }

    fn handle(&mut self, c: Completion) -> Result<()> {
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
            K_KICK => {
                self.inflight -= 1;
                if c.res == -libc::ECANCELED {
                    return Ok(());
                }
                self.arm_kick()?;
                self.unpark()
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

    fn on_recv(&mut self, i: usize, res: i32) -> Result<()> {
        let gc = self.chans[i];
        if res < 0 {
            // EINTR/EAGAIN: nothing happened; receive again.
            if res == -libc::EINTR || res == -libc::EAGAIN {
                return self.recv_next(i);
            }
            let what = match self.ch[i] {
                Ch::Payload { a, .. } => format!("receive packet {} of {}", a.idx, self.x.lock().re.id(a.dev)),
                _ => "receive packet header".to_string(),
            };
            return Err(Error::Channel { channel: gc, op: what, source: cqe_error(res) });
        }
        let r = res as usize;
        match self.ch[i] {
            Ch::Header { got } => {
                if r == 0 {
                    if got == 0 {
                        self.ch[i] = Ch::Eof;
                        self.x.lock().eof[gc] = true;
                        return Ok(());
                    }
                    return Err(Error::ChannelClosed {
                        channel: gc,
                        during: format!("in the middle of a packet header ({got} of {PACKET_OVERHEAD} bytes)"),
                    });
                }
                let got = got + r;
                if got < PACKET_OVERHEAD {
                    self.ch[i] = Ch::Header { got };
                    return self.recv_next(i);
                }
                let h = DeviceStateHeader::decode(&self.hdrs[i], self.max_size).map_err(|e| Error::Wire {
                    channel: gc,
                    what: "device state packet header",
                    source: e,
                })?;
                let v = VfioPacketHeader::decode(&self.hdrs[i][DEVICE_STATE_HEADER_LEN..])
                    .map_err(|e| Error::Wire { channel: gc, what: "VFIO device state packet header", source: e })?;
                self.x.sh.counters[gc].add(u64::from(h.next_packet_size) + DEVICE_STATE_HEADER_LEN as u64);
                self.offer(i, h, v)
            }
            Ch::Payload { a, got } => {
                if r == 0 {
                    return Err(Error::ChannelClosed {
                        channel: gc,
                        during: format!(
                            "in the middle of packet {} of device {} ({got} of {} bytes)",
                            a.idx,
                            self.x.lock().re.id(a.dev),
                            a.len
                        ),
                    });
                }
                let got = got + r;
                if got < a.len {
                    self.ch[i] = Ch::Payload { a, got };
                    return self.recv_next(i);
                }
                self.payload_done(i, a)
            }
            Ch::Parked | Ch::Eof => Ok(()),
        }
    }

    fn offer(&mut self, i: usize, h: DeviceStateHeader, v: VfioPacketHeader) -> Result<()> {
        let gc = self.chans[i];
        let admit = {
            let mut g = self.x.lock();
            let r = g.re.admit(gc, &h, v)?;
            g.parked_at[gc] = match r {
                Admit::Wait => Some(g.epoch),
                Admit::Accept(_) => None,
            };
            r
        };
        match admit {
            Admit::Accept(a) => {
                self.parked_hdr[i] = None;
                if a.len == 0 {
                    return self.payload_done(i, a);
                }
                self.ch[i] = Ch::Payload { a, got: 0 };
                self.recv_next(i)
            }
            Admit::Wait => {
                self.parked_hdr[i] = Some((h, v));
                self.ch[i] = Ch::Parked;
                Ok(())
            }
        }
    }

    fn payload_done(&mut self, i: usize, a: Admitted) -> Result<()> {
        self.x.lock().re.received(a);
        self.ch[i] = Ch::Header { got: 0 };
        self.recv_next(i)?;
        self.try_write(a.dev)
    }

    fn try_write(&mut self, d: usize) -> Result<()> {
        loop {
            let (next, base) = {
                let mut g = self.x.lock();
                (g.re.next_write(d), g.re.counters(d).data_bytes)
            };
            match next {
                None => return Ok(()),
                Some(NextWrite::Data { slot, len, idx }) => {
                    self.wr[d] = Some(Wr { slot, len, off: 0, idx, base });
                    return self.submit_write(d);
                }
                Some(NextWrite::Config { slot, len }) => {
                    // SAFETY: the config slot is Ready: its RECV completed and nothing else
                    // refers to it until `written` frees it below.
                    let blob = unsafe { self.x.pool.slot_bytes(slot as usize, 0, len) };
                    self.x.targets[d].lock().unwrap_or_else(|p| p.into_inner()).apply_config(blob)?;
                    self.written(d);
                    // A slot was freed: this worker's parked channels retry after this batch.
                    self.need_unpark = true;
                }
            }
        }
    }

    fn written(&mut self, d: usize) {
        let mut g = self.x.lock();
        g.re.written(d);
        g.epoch += 1;
        self.x.kick_others(self.me, &g);
    }

    fn submit_write(&mut self, d: usize) -> Result<()> {
        let w = self.wr[d].expect("a write is owned");
        // SAFETY: `off < len <= payload_bytes`: inside the slot.
        let ptr = unsafe { self.x.pool.payload_ptr(w.slot as usize).add(w.off) };
        let fd = types::Fixed((self.chans.len() + d) as u32);
        // IOSQE_ASYNC: the copy into the device runs on an io-wq worker, in parallel with this
        // ring's receives (a VFIO resume fd, having no FMODE_NOWAIT, goes there anyway).
        let len = (w.len - w.off) as u32;
        let e = if self.registered {
            opcode::WriteFixed::new(fd, ptr, len, 0).offset(u64::MAX).build()
        } else {
            opcode::Write::new(fd, ptr, len).offset(u64::MAX).build()
        }
        .flags(squeue::Flags::ASYNC)
        .user_data(ud(K_WRITE, d));
        self.push(e)
    }

    fn on_write(&mut self, d: usize, res: i32) -> Result<()> {
        let w = self.wr[d].expect("a write is owned");
        let device = || self.x.lock().re.id(d).idstr().into_owned();
        if res < 0 {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                return self.submit_write(d);
            }
            return Err(Error::DeviceWrite {
                device: device(),
                idx: w.idx,
                offset: w.base + w.off as u64,
                source: cqe_error(res),
            });
        }
        if res == 0 {
            return Err(Error::DeviceWrite {
                device: device(),
                idx: w.idx,
                offset: w.base + w.off as u64,
                source: std::io::Error::new(std::io::ErrorKind::WriteZero, "resume data fd accepted 0 bytes"),
            });
        }
        let off = w.off + res as usize;
        if off < w.len {
            self.x.targets[d].lock().unwrap_or_else(|p| p.into_inner()).short_writes += 1;
            self.wr[d] = Some(Wr { off, ..w });
            return self.submit_write(d);
        }
        self.wr[d] = None;
        self.x.sh.progress.add(w.len as u64);
        self.written(d);
        self.try_write(d)?;
        self.unpark()
    }

    /// Memory was freed: this worker's parked channels try again.
    fn unpark(&mut self) -> Result<()> {
        for i in 0..self.ch.len() {
            if let (Ch::Parked, Some((h, v))) = (self.ch[i], self.parked_hdr[i].clone()) {
                self.offer(i, h, v)?;
            }
        }
        Ok(())
    }

    /// Retires a completion without acting on it (after a failure).
    fn account_only(&mut self, c: Completion) {
        if c.user_data >> 56 != K_CANCEL {
            self.inflight = self.inflight.saturating_sub(1);
        }
    }

    /// Cancels what is in flight and reaps every CQE before returning (the pool may then be
    /// unmapped); leaks the ring on purpose if the kernel does not finish in time, and reports
    /// it, so that the caller never unmaps memory an operation may still write.
    fn finish(&mut self) -> Result<()> {
        if self.inflight == 0 {
            return Ok(());
        }
        if !crate::ring::cancel_and_drain(self, ud(K_CANCEL, 0), Duration::from_secs(10)) {
            self.leaked = true;
            self.x.leaked.store(true, Ordering::SeqCst);
            return Err(Error::Timeout {
                what: format!(
                    "{} receive operations did not complete after cancel; their buffers are leaked on purpose",
                    self.inflight
                ),
                after: Duration::from_secs(10),
            });
        }
        Ok(())
    }
}
