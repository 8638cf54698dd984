//! The io_uring device loop of the source.
//!
//! One thread, one ring, one registered pool of `buffers_per_device + 1` slots (the extra one
//! is kept for the config packet). Each chunk is `READ_FIXED` into a slot's payload, linked
//! to `SEND`/`SEND_ZC` of header + payload when a channel is idle at that moment; otherwise the
//! read runs alone and the send follows when a channel is granted. One read is in flight at a
//! time (stream fds share one position); the next one is submitted as soon as the previous
//! completes, so reading chunk n+1 overlaps sending chunk n.
//!
//! Slot lifecycle: `Free → Reading → (Ready →) Sending → Free`. A slot returns to `Free` only
//! when its send has completed *and*, for SEND_ZC, its notification has arrived. A slot's
//! generation is bumped at every submission and is part of `user_data`, so a stray
//! notification of a cancelled SEND_ZC can never release a slot that was reused.

use std::collections::VecDeque;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};

use crate::error::{Error, Result};
use crate::pool::BufferPool;
use crate::ring::{cqe_error, Ring, NOTIF_USAGE_ZC_COPIED, ZC_REPORT_USAGE};
use crate::source::{DeviceCtx, PrecopyStep, SourceShared, TICK};
use crate::stats::{Latency, SourceDeviceReport};
use crate::wire::{
    encode_packet_header, patch_packet_header, VfioPacketHeader, PACKET_OVERHEAD, VFIO_FLAG_CONFIG_STATE,
};

const K_READ: u64 = 1;
const K_SEND: u64 = 2;
const K_WAKE: u64 = 3;
const K_ABORT: u64 = 4;
const K_CANCEL: u64 = 5;
const K_POLL: u64 = 6;

fn ud(kind: u64, slot: usize, gen: u32) -> u64 {
    (kind << 56) | ((slot as u64) << 32) | u64::from(gen)
}

fn ud_parts(v: u64) -> (u64, usize, u32) {
    (v >> 56, ((v >> 32) & 0xffff) as usize, v as u32)
}

/// Whether this kernel offers `IORING_OP_SEND_ZC` (probed once per process).
pub(crate) fn send_zc_supported() -> bool {
    static ZC: OnceLock<bool> = OnceLock::new();
    *ZC.get_or_init(|| Ring::new(4, 8).and_then(|r| r.probe_ops()).map(|o| o.send_zc).unwrap_or(false))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Free,
    /// A read (maybe with a linked send) is in flight.
    Reading,
    /// Data read, header final, waiting for a channel.
    Ready,
    /// A send is in flight or its notification is pending.
    Sending,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    phase: Phase,
    gen: u32,
    idx: u32,
    len: usize,
    channel: Option<usize>,
    linked: bool,
    read_done: bool,
    read_res: i32,
    send_cancelled: bool,
    send_done: bool,
    zc_pending: bool,
    config: bool,
    t0: Instant,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            phase: Phase::Free,
            gen: 0,
            idx: 0,
            len: 0,
            channel: None,
            linked: false,
            read_done: false,
            read_res: 0,
            send_cancelled: false,
            send_done: false,
            zc_pending: false,
            config: false,
            t0: Instant::now(),
        }
    }
}

struct Loop<'s, 'c, 'a, 'd> {
    // Dropped by hand in `Drop`: the ring before the pool it registered, and neither if the
    // kernel did not give every buffer back (`leaked`).
    ring: ManuallyDrop<Ring>,
    pool: ManuallyDrop<BufferPool>,
    leaked: bool,
    /// The last read got EAGAIN (an O_NONBLOCK fd with nothing ready): wait for POLLIN before
    /// the next one instead of spinning.
    poll_first: bool,
    sh: &'s SourceShared<'c>,
    ctx: &'s mut DeviceCtx<'a, 'd>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    ready: VecDeque<usize>,
    held: Vec<usize>,
    reading: Option<usize>,
    /// Operations that will still produce a CQE (notifications included).
    inflight: usize,
    sends_inflight: usize,
    next_idx: u32,
    eof: bool,
    config_sent: bool,
    config_done: bool,
    read_async: bool,
    registered: bool,
    chunk: usize,
    wake_buf: Box<u64>,
    abort_seen: bool,
    last_progress: Instant,
    stream_bytes: u64,
    report: SourceDeviceReport,
    latency: Latency,
    zc_bytes: u64,
    copied_bytes: u64,
}

impl crate::ring::Drain for Loop<'_, '_, '_, '_> {
    fn ring(&mut self) -> &mut Ring {
        &mut self.ring
    }
    fn retire(&mut self, c: crate::ring::Completion) {
        self.account_only(c);
    }
    fn pending(&self) -> bool {
        self.inflight > 0
    }
}

impl Drop for Loop<'_, '_, '_, '_> {
    fn drop(&mut self) {
        if self.leaked {
            // The kernel may still write into the pool: leak both rather than free them.
            return;
        }
        // SAFETY: dropped exactly once, here, and never used again; the ring goes first so the
        // pool it registered is unmapped only after the registration is gone.
        unsafe {
            ManuallyDrop::drop(&mut self.ring);
            ManuallyDrop::drop(&mut self.pool);
        }
    }
}

/// Runs one device's transfer on io_uring.
pub(crate) fn run(
    sh: &SourceShared<'_>,
    ctx: &mut DeviceCtx<'_, '_>,
) -> Result<(SourceDeviceReport, Latency, u64, u64)> {
    let cfg = sh.cfg;
    let nslots = cfg.buffers_for(sh.zerocopy) + 1;
    let chunk = cfg.chunk_bytes;
    let ring = Ring::new(64, 256).map_err(|e| Error::sys(ring_err_op(&e), e))?;
    let pool = BufferPool::new(nslots, PACKET_OVERHEAD, chunk).map_err(|e| Error::sys("mmap buffer pool", e))?;
    // SAFETY: `pool` is a field of the same `Loop` declared after `ring`, so it is unmapped only
    // after the ring is dropped, and `finish` drains every operation before that.
    let registered = match unsafe { ring.register_pool(&pool) } {
        Ok(()) => true,
        // ENOMEM: RLIMIT_MEMLOCK too low to pin the pool. Fall back to unregistered READ +
        // copying SEND, which needs no pinned memory.
        Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && !sh.zerocopy => false,
        Err(e) => return Err(Error::sys("IORING_REGISTER_BUFFERS (raise RLIMIT_MEMLOCK or use --zerocopy off)", e)),
    };
    let mut files = vec![ctx.data_fd()];
    files.extend_from_slice(&sh.channels);
    files.push(std::os::fd::AsFd::as_fd(sh.leases.waker(ctx.dev_no)).as_raw_fd());
    files.push(std::os::fd::AsFd::as_fd(&sh.abort).as_raw_fd());
    ring.register_files(&files).map_err(|e| Error::sys("IORING_REGISTER_FILES", e))?;
    // Bound the kernel's helper threads for blocking device reads.
    let _ = ring.limit_workers(2, 2);
    let read_async = needs_async(ctx.data_fd());
    let id = ctx.id.clone();
    let mut lp = Loop {
        ring: ManuallyDrop::new(ring),
        pool: ManuallyDrop::new(pool),
        leaked: false,
        poll_first: false,
        sh,
        ctx,
        slots: vec![Slot::new(); nslots],
        free: (0..nslots - 1).rev().collect(),
        ready: VecDeque::with_capacity(nslots),
        held: Vec::with_capacity(sh.channels.len()),
        reading: None,
        inflight: 0,
        sends_inflight: 0,
        next_idx: 0,
        eof: false,
        config_sent: false,
        config_done: false,
        read_async,
        registered,
        chunk,
        wake_buf: Box::new(0),
        abort_seen: false,
        last_progress: Instant::now(),
        stream_bytes: 0,
        report: SourceDeviceReport::empty(id),
        latency: Latency::new(),
        zc_bytes: 0,
        copied_bytes: 0,
    };
    let r = lp.run();
    let drained = lp.finish(r.is_err());
    match (r, drained) {
        (Ok(()), Ok(())) => {
            lp.report.stop_copy_time = lp.ctx.stop_copy_start.elapsed();
            Ok((lp.report.clone(), lp.latency.clone(), lp.zc_bytes, lp.copied_bytes))
        }
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
    }
}

fn ring_err_op(e: &io::Error) -> String {
    crate::ring::describe_setup_error(e)
}

/// Pipes, sockets and regular files complete reads inline; anything else (a VFIO migration fd
/// is an anon inode without `FMODE_NOWAIT`) would first fail a non-blocking attempt, and a
/// pollable one would spin through up to 128 poll retries, so send it straight to io-wq.
fn needs_async(fd: i32) -> bool {
    // SAFETY: fstat writes into a zeroed, live `stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the duration of this call; `st` is a valid out pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return true;
    }
    let t = st.st_mode & libc::S_IFMT;
    !(t == libc::S_IFIFO || t == libc::S_IFSOCK || t == libc::S_IFREG)
}

impl Loop<'_, '_, '_, '_> {
    fn name(&self) -> String {
        self.ctx.name()
    }

    fn run(&mut self) -> Result<()> {
        self.arm_wake()?;
        self.arm_abort()?;
        // Every slot's header carries the device identity; encode it once, patch per packet.
        for s in 0..self.slots.len() {
            // SAFETY: no operation is in flight yet; we own every slot.
            let hdr = unsafe { self.pool.slot_bytes_mut(s, PACKET_OVERHEAD, 0) };
            encode_packet_header(self.ctx.id, VfioPacketHeader { idx: 0, flags: 0 }, 0, hdr)
                .map_err(|e| Error::Config(e.to_string()))?;
        }
        loop {
            if self.abort_seen || self.sh.abort.is_aborted() {
                return Err(Error::Aborted);
            }
            self.pump()?;
            if self.config_done && self.inflight_data_free() {
                return Ok(());
            }
            self.ring.submit_and_wait(TICK).map_err(|e| Error::sys("io_uring_enter", e))?;
            let n = self.ring.reap().len();
            if n > 0 {
                self.last_progress = Instant::now();
            } else if self.last_progress.elapsed() > self.sh.cfg.stall_timeout {
                return Err(Error::Timeout {
                    what: format!(
                        "device {}: {} sends and {} reads in flight, {} packets ready without a channel",
                        self.name(),
                        self.sends_inflight,
                        usize::from(self.reading.is_some()),
                        self.ready.len()
                    ),
                    after: self.sh.cfg.stall_timeout,
                });
            }
            for i in 0..n {
                let c = self.ring_completion(i);
                if let Err(e) = self.handle(c) {
                    // The rest of this batch completed too: keep the in-flight count exact so
                    // `finish` knows which buffers the kernel still holds.
                    for j in i + 1..n {
                        let c = self.ring_completion(j);
                        self.account_only(c);
                    }
                    return Err(e);
                }
            }
        }
    }

    fn ring_completion(&mut self, i: usize) -> crate::ring::Completion {
        // `reap` filled the scratch vector; `handle` never reaps, so index `i` is stable.
        self.ring.reap_cached(i)
    }

    fn inflight_data_free(&self) -> bool {
        self.slots.iter().all(|s| s.phase == Phase::Free)
    }

    fn arm_wake(&mut self) -> Result<()> {
        let wake_fd = types::Fixed((self.sh.channels.len() + 1) as u32);
        let e =
            opcode::Read::new(wake_fd, (&mut *self.wake_buf as *mut u64).cast(), 8).build().user_data(ud(K_WAKE, 0, 0));
        // SAFETY: `wake_buf` is boxed (stable address) and lives in `self` until `finish` has
        // drained every operation; the fixed file stays registered for the ring's life.
        unsafe { self.ring.push(&[e]) }.map_err(|e| Error::sys("io_uring push", e))?;
        self.inflight += 1;
        Ok(())
    }

    fn arm_abort(&mut self) -> Result<()> {
        let abort_fd = types::Fixed((self.sh.channels.len() + 2) as u32);
        let e = opcode::PollAdd::new(abort_fd, libc::POLLIN as u32).build().user_data(ud(K_ABORT, 0, 0));
        // SAFETY: a poll refers to no memory; the fixed file stays registered.
        unsafe { self.ring.push(&[e]) }.map_err(|e| Error::sys("io_uring push", e))?;
        self.inflight += 1;
        Ok(())
    }

    fn take_channel(&mut self, enqueue: bool) -> Option<usize> {
        self.held.pop().or_else(|| self.sh.leases.try_lease(self.ctx.dev_no, enqueue))
    }

    /// Schedules whatever can run now.
    fn pump(&mut self) -> Result<()> {
        // 1. The config packet, strictly after every data packet was sent; it joins the queue
        //    of packets waiting for a channel, served just below.
        if self.eof && self.reading.is_none() && self.ready.is_empty() && self.sends_inflight == 0 && !self.config_sent
        {
            self.send_config()?;
        }
        // 2. Packets waiting for a channel, oldest first.
        while let Some(&s) = self.ready.front() {
            let Some(ch) = self.take_channel(true) else { break };
            self.ready.pop_front();
            self.submit_send(s, ch)?;
        }
        // 3. The next read (one in flight per data fd).
        if !self.eof && self.reading.is_none() {
            if let Some(s) = self.free.pop() {
                if self.ctx.in_precopy {
                    self.precopy_read(s)?;
                    // A pre-copy read completes synchronously: queue its send right away.
                    return self.pump();
                }
                let ch = if self.ready.is_empty() { self.take_channel(false) } else { None };
                self.submit_read(s, ch)?;
            }
        }
        // 4. Channels we hold but cannot use right now go back to other devices.
        if self.ready.is_empty() && (self.reading.is_some() || self.eof) {
            while let Some(ch) = self.held.pop() {
                self.sh.leases.release(ch);
            }
        }
        Ok(())
    }

    fn precopy_read(&mut self, s: usize) -> Result<()> {
        let cap = self.sh.cfg.precopy_max_bytes;
        // SAFETY: slot `s` was just taken from the free list: no operation refers to it.
        let buf = unsafe { self.pool.slot_bytes_mut(s, 0, self.chunk) };
        match self.ctx.precopy_read(buf, cap)? {
            PrecopyStep::Data(n) => {
                self.account_read(n)?;
                let idx = self.take_idx()?;
                self.prepare_ready(s, idx, n)?;
            }
            PrecopyStep::Switched => self.free.push(s),
        }
        Ok(())
    }

    fn account_read(&mut self, n: usize) -> Result<()> {
        self.stream_bytes += n as u64;
        self.report.data_bytes += n as u64;
        self.report.packets += 1;
        if n < self.chunk {
            self.report.short_reads += 1;
        }
        if self.stream_bytes > self.sh.cfg.max_stream_bytes {
            return Err(Error::DeviceRead {
                device: self.name(),
                offset: self.stream_bytes,
                source: io::Error::other(format!(
                    "stream exceeds the configured maximum of {} bytes",
                    self.sh.cfg.max_stream_bytes
                )),
            });
        }
        Ok(())
    }

    fn prepare_ready(&mut self, s: usize, idx: u32, n: usize) -> Result<()> {
        // SAFETY: slot `s` has no operation in flight (its read completed or was synchronous).
        let hdr = unsafe { self.pool.slot_bytes_mut(s, PACKET_OVERHEAD, 0) };
        patch_packet_header(hdr, VfioPacketHeader { idx, flags: 0 }, n).map_err(|e| Error::Config(e.to_string()))?;
        let sl = &mut self.slots[s];
        sl.phase = Phase::Ready;
        sl.idx = idx;
        sl.len = n;
        sl.t0 = Instant::now();
        self.ready.push_back(s);
        Ok(())
    }

    fn send_entry(&self, s: usize, ch: usize, gen: u32) -> squeue::Entry {
        let sl = &self.slots[s];
        let total = PACKET_OVERHEAD + sl.len;
        let ptr = self.pool.header_ptr(s, PACKET_OVERHEAD);
        let fd = types::Fixed((ch + 1) as u32);
        // MSG_WAITALL: a short send must fail the request (and any link), never pass silently.
        // MSG_NOSIGNAL: a closed peer is an error code, not a SIGPIPE.
        let flags = libc::MSG_WAITALL | libc::MSG_NOSIGNAL;
        let e = if self.sh.zerocopy {
            opcode::SendZc::new(fd, ptr, total as u32).buf_index(Some(0)).flags(flags).zc_flags(ZC_REPORT_USAGE).build()
        } else {
            opcode::Send::new(fd, ptr, total as u32).flags(flags).build()
        };
        e.user_data(ud(K_SEND, s, gen))
    }

    fn take_idx(&mut self) -> Result<u32> {
        let idx = self.next_idx;
        // u32::MAX is reserved as invalid on the wire, and the config packet needs one more.
        self.next_idx = idx.checked_add(1).filter(|&n| n < u32::MAX).ok_or_else(|| Error::DeviceRead {
            device: self.name(),
            offset: self.stream_bytes,
            source: io::Error::other("more than 2^32-2 packets for one device"),
        })?;
        Ok(idx)
    }

    fn submit_read(&mut self, s: usize, ch: Option<usize>) -> Result<()> {
        let idx = self.take_idx()?;
        // Pre-fill the header for a full chunk; a short read rewrites it before resending.
        // SAFETY: slot `s` came from the free list: nothing in flight touches it.
        let hdr = unsafe { self.pool.slot_bytes_mut(s, PACKET_OVERHEAD, 0) };
        patch_packet_header(hdr, VfioPacketHeader { idx, flags: 0 }, self.chunk)
            .map_err(|e| Error::Config(e.to_string()))?;
        let gen = self.slots[s].gen.wrapping_add(1);
        {
            let sl = &mut self.slots[s];
            *sl = Slot {
                gen,
                idx,
                len: self.chunk,
                channel: ch,
                linked: ch.is_some(),
                t0: Instant::now(),
                ..Slot::new()
            };
            sl.phase = Phase::Reading;
        }
        let ptr = self.pool.payload_ptr(s);
        let mut rd = if self.registered {
            opcode::ReadFixed::new(types::Fixed(0), ptr, self.chunk as u32, 0).offset(u64::MAX).build()
        } else {
            opcode::Read::new(types::Fixed(0), ptr, self.chunk as u32).offset(u64::MAX).build()
        }
        .user_data(ud(K_READ, s, gen));
        if self.read_async {
            rd = rd.flags(squeue::Flags::ASYNC);
        }
        if std::mem::take(&mut self.poll_first) {
            // The fd said EAGAIN last time: wait until it is readable, then read. No send is
            // linked: the channel would sit idle for as long as the device takes.
            if let Some(ch) = ch {
                self.held.push(ch);
            }
            self.slots[s].channel = None;
            self.slots[s].linked = false;
            let poll = opcode::PollAdd::new(types::Fixed(0), libc::POLLIN as u32)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(ud(K_POLL, s, gen));
            // SAFETY: as below; the poll refers to no memory and precedes the read in one chain.
            unsafe { self.ring.push(&[poll, rd]) }.map_err(|e| Error::sys("io_uring push", e))?;
            self.inflight += 2;
            self.reading = Some(s);
            return Ok(());
        }
        match ch {
            Some(ch) => {
                let rd = rd.flags(squeue::Flags::IO_LINK);
                let tx = self.send_entry(s, ch, gen);
                // SAFETY: the slot's payload and header stay mapped and owned by this chain
                // until both CQEs (and a SEND_ZC notification) are reaped; the fixed files
                // stay registered.
                unsafe { self.ring.push(&[rd, tx]) }.map_err(|e| Error::sys("io_uring push", e))?;
                self.inflight += 2;
                self.sends_inflight += 1;
            }
            None => {
                // SAFETY: as above, for the read alone.
                unsafe { self.ring.push(&[rd]) }.map_err(|e| Error::sys("io_uring push", e))?;
                self.inflight += 1;
            }
        }
        self.reading = Some(s);
        Ok(())
    }

    fn submit_send(&mut self, s: usize, ch: usize) -> Result<()> {
        let gen = self.slots[s].gen.wrapping_add(1);
        {
            let sl = &mut self.slots[s];
            sl.gen = gen;
            sl.phase = Phase::Sending;
            sl.channel = Some(ch);
            sl.linked = false;
            sl.send_done = false;
            sl.send_cancelled = false;
            sl.zc_pending = false;
        }
        let tx = self.send_entry(s, ch, gen);
        // SAFETY: the slot is owned by this send until its CQE and notification are reaped.
        unsafe { self.ring.push(&[tx]) }.map_err(|e| Error::sys("io_uring push", e))?;
        self.inflight += 1;
        self.sends_inflight += 1;
        Ok(())
    }

    fn send_config(&mut self) -> Result<()> {
        let s = self.slots.len() - 1;
        let blob = self.ctx.config()?;
        if blob.len() > self.chunk {
            return Err(Error::Config(format!(
                "device {}: config blob of {} bytes exceeds the chunk size {}",
                self.name(),
                blob.len(),
                self.chunk
            )));
        }
        // SAFETY: the config slot is never used for data, and this runs once.
        let buf = unsafe { self.pool.slot_bytes_mut(s, PACKET_OVERHEAD, blob.len()) };
        buf[PACKET_OVERHEAD..].copy_from_slice(&blob);
        patch_packet_header(
            &mut buf[..PACKET_OVERHEAD],
            VfioPacketHeader { idx: self.next_idx, flags: VFIO_FLAG_CONFIG_STATE },
            blob.len(),
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        self.report.config_bytes = blob.len() as u64;
        let sl = &mut self.slots[s];
        sl.phase = Phase::Ready;
        sl.idx = self.next_idx;
        sl.len = blob.len();
        sl.config = true;
        sl.t0 = Instant::now();
        self.ready.push_back(s);
        self.config_sent = true;
        Ok(())
    }

    fn release_slot_if_done(&mut self, s: usize) {
        let sl = &mut self.slots[s];
        if sl.phase == Phase::Sending && sl.send_done && !sl.zc_pending {
            sl.phase = Phase::Free;
            if sl.config {
                self.config_done = true;
            } else {
                self.free.push(s);
            }
        }
    }

    fn handle(&mut self, c: crate::ring::Completion) -> Result<()> {
        let (kind, s, gen) = ud_parts(c.user_data);
        match kind {
            K_WAKE => {
                self.inflight -= 1;
                if c.res < 0 && c.res != -libc::EAGAIN && c.res != -libc::EINTR {
                    if c.res == -libc::ECANCELED {
                        return Ok(());
                    }
                    return Err(Error::sys("read channel-grant eventfd", cqe_error(c.res)));
                }
                while let Some(ch) = self.sh.leases.take_granted(self.ctx.dev_no) {
                    self.held.push(ch);
                }
                self.arm_wake()
            }
            K_ABORT => {
                self.inflight -= 1;
                if c.res != -libc::ECANCELED {
                    self.abort_seen = true;
                }
                Ok(())
            }
            K_CANCEL => Ok(()),
            K_POLL => {
                self.inflight -= 1;
                Ok(())
            }
            K_READ => {
                self.inflight -= 1;
                if self.slots[s].gen != gen {
                    return Ok(());
                }
                self.on_read(s, c.res)
            }
            K_SEND => self.on_send(s, gen, c),
            _ => Ok(()),
        }
    }

    fn on_read(&mut self, s: usize, res: i32) -> Result<()> {
        let linked = self.slots[s].linked;
        // A linked read that came back short (or empty) has cancelled its send; until that
        // cancellation is reaped the packet is neither sent nor re-queued, so the next read
        // stays blocked: otherwise packet n+1 could go out before packet n is re-sent, and the
        // receiver's no-deadlock argument needs each device's packets sent in index order.
        let chain_open = linked && res != self.chunk as i32 && !self.slots[s].send_cancelled;
        if !chain_open {
            self.reading = None;
        }
        self.slots[s].read_done = true;
        self.slots[s].read_res = res;
        if res > 0 {
            let n = res as usize;
            self.account_read(n)?;
            self.slots[s].len = n;
            if linked {
                if n == self.chunk {
                    // The linked send carries it; the slot is now sending.
                    self.slots[s].phase = Phase::Sending;
                } else if self.slots[s].send_cancelled {
                    self.resend_after_short(s)?;
                }
                // Else: the short read broke the link; the send's -ECANCELED is on its way.
            } else {
                let idx = self.slots[s].idx;
                self.prepare_ready(s, idx, n)?;
            }
            return Ok(());
        }
        if res == 0 {
            // End of stream: the index reserved for this read stays unused.
            self.eof = true;
            self.next_idx -= 1;
            if !linked || self.slots[s].send_cancelled {
                self.retire_read_slot(s);
            }
            return Ok(());
        }
        // EINTR/EAGAIN: nothing was read; read again (after the linked send is cancelled).
        if res == -libc::EINTR || res == -libc::EAGAIN {
            self.next_idx -= 1;
            self.slots[s].read_res = 0;
            if res == -libc::EAGAIN {
                self.poll_first = true;
            }
            if !linked || self.slots[s].send_cancelled {
                self.retire_read_slot(s);
            } else {
                self.slots[s].read_res = -libc::EAGAIN;
            }
            return Ok(());
        }
        Err(Error::DeviceRead { device: self.name(), offset: self.stream_bytes, source: cqe_error(res) })
    }

    /// A read slot whose data went nowhere (EOF or retry) goes back to the free list, and the
    /// channel its cancelled send held goes back to the lease table.
    fn retire_read_slot(&mut self, s: usize) {
        if let Some(ch) = self.slots[s].channel.take() {
            self.held.push(ch);
        }
        self.slots[s].phase = Phase::Free;
        self.slots[s].gen = self.slots[s].gen.wrapping_add(1);
        self.free.push(s);
    }

    fn resend_after_short(&mut self, s: usize) -> Result<()> {
        let ch = self.slots[s].channel.take().expect("a linked slot holds its channel");
        let (idx, n) = (self.slots[s].idx, self.slots[s].len);
        // SAFETY: the read completed and the linked send was cancelled before it was issued,
        // so the kernel touches neither header nor payload now.
        let hdr = unsafe { self.pool.slot_bytes_mut(s, PACKET_OVERHEAD, 0) };
        patch_packet_header(hdr, VfioPacketHeader { idx, flags: 0 }, n).map_err(|e| Error::Config(e.to_string()))?;
        self.submit_send(s, ch)
    }

    fn on_send(&mut self, s: usize, gen: u32, c: crate::ring::Completion) -> Result<()> {
        if c.notif() {
            // A notification of the current generation releases the buffer; one of an older
            // generation is the stray NOTIF of a cancelled SEND_ZC and is ignored.
            if self.slots[s].gen == gen && self.slots[s].zc_pending {
                self.inflight -= 1;
                self.slots[s].zc_pending = false;
                let bytes = (PACKET_OVERHEAD + self.slots[s].len) as u64;
                if (c.res as u32) & NOTIF_USAGE_ZC_COPIED != 0 {
                    self.copied_bytes += bytes;
                } else {
                    self.zc_bytes += bytes;
                }
                self.release_slot_if_done(s);
            }
            return Ok(());
        }
        if self.slots[s].gen != gen {
            return Ok(());
        }
        self.inflight -= 1;
        self.sends_inflight -= 1;
        if c.more() {
            // The notification will still come for this generation.
            self.inflight += 1;
            self.slots[s].zc_pending = true;
        }
        let total = (PACKET_OVERHEAD + self.slots[s].len) as i32;
        if c.res == -libc::ECANCELED && self.slots[s].linked {
            // The linked read was short, hit EOF or failed: the send was never issued.
            self.slots[s].send_cancelled = true;
            self.slots[s].zc_pending = false;
            if c.more() {
                self.inflight -= 1;
            }
            if self.slots[s].read_done {
                if self.reading == Some(s) {
                    self.reading = None;
                }
                let r = self.slots[s].read_res;
                if r > 0 {
                    self.resend_after_short(s)?;
                } else if r == 0 || r == -libc::EAGAIN {
                    self.retire_read_slot(s);
                }
            }
            return Ok(());
        }
        let ch = self.slots[s].channel.expect("a sending slot has a channel");
        if c.res != total {
            let idx = self.slots[s].idx;
            let src = if c.res < 0 {
                cqe_error(c.res)
            } else {
                io::Error::new(io::ErrorKind::WriteZero, format!("short send: {} of {} bytes", c.res, total))
            };
            return Err(Error::Channel {
                channel: ch,
                op: format!("send packet {idx} of device {}", self.name()),
                source: src,
            });
        }
        self.sh.counters[ch].add(total as u64);
        self.sh.progress.add(self.slots[s].len as u64);
        if !self.sh.zerocopy {
            self.copied_bytes += total as u64;
        }
        self.latency.record(self.slots[s].t0.elapsed());
        self.slots[s].channel = None;
        self.slots[s].send_done = true;
        self.slots[s].phase = Phase::Sending;
        self.sh.leases.release(ch);
        self.release_slot_if_done(s);
        Ok(())
    }

    /// Retires a completion without acting on it (after a failure): only the in-flight count
    /// and the SEND_ZC notification bookkeeping move.
    fn account_only(&mut self, c: crate::ring::Completion) {
        let (kind, s, gen) = ud_parts(c.user_data);
        match kind {
            K_WAKE | K_ABORT | K_READ | K_POLL => self.inflight = self.inflight.saturating_sub(1),
            K_SEND => {
                if c.notif() {
                    if self.slots[s].gen == gen && self.slots[s].zc_pending {
                        self.slots[s].zc_pending = false;
                        self.inflight = self.inflight.saturating_sub(1);
                    }
                } else if self.slots[s].gen == gen {
                    self.inflight = self.inflight.saturating_sub(1);
                    if c.more() {
                        self.slots[s].zc_pending = true;
                        self.inflight += 1;
                    }
                }
            }
            _ => {}
        }
    }

    /// Cancels whatever is still in flight and reaps until the kernel has given back every
    /// buffer. If the kernel does not finish within the bound, the pool and ring are leaked on
    /// purpose rather than unmapped under an operation that may still write into them.
    fn finish(&mut self, failed: bool) -> Result<()> {
        while let Some(ch) = self.held.pop() {
            self.sh.leases.release(ch);
        }
        if failed {
            // Stop every other device first. Channels held by slots are never released here:
            // a linked or in-flight send may still be issued on them, and a second sender on
            // the same socket would interleave partial writes.
            self.sh.abort.abort();
        }
        if self.inflight == 0 {
            return Ok(());
        }
        if !crate::ring::cancel_and_drain(self, ud(K_CANCEL, 0, 0), Duration::from_secs(10)) {
            self.leaked = true;
            return Err(Error::Timeout {
                what: format!(
                    "device {}: {} operations did not complete after cancel; buffers leaked on purpose",
                    self.name(),
                    self.inflight
                ),
                after: Duration::from_secs(10),
            });
        }
        Ok(())
    }
}
