//! The io_uring device loop of the source.
//!
//! One thread, one ring, one registered pool of `buffers_per_device + 1` slots (the extra one
//! is kept for the config packet). Each chunk is `READ_FIXED` into a slot's payload, linked to
//! `SEND`/`SEND_ZC` of header + payload when a channel is idle at that moment; otherwise the
//! read runs alone and the send follows when a channel is granted. One read is in flight at a
//! time (stream fds share one position); the next one is submitted as soon as the previous
//! completes, so reading chunk n+1 overlaps sending chunk n. How a read is issued depends on
//! the data fd: a regular file is read with `read(2)` on this thread (io_uring would hand each
//! buffered read of a filesystem without async buffered reads, such as tmpfs, to io-wq), only
//! once a channel is in hand, and its send is submitted at once, while the data is still in
//! this CPU's cache; a pipe
//! or socket with a plain `READ_FIXED` (inline, or after a poll); anything else, a VFIO data fd
//! without `FMODE_NOWAIT`, with `IOSQE_ASYNC` (io-wq). After a short read (a stream), the next
//! read is not linked to a send: it would likely be short too, and its send cancelled. The rules (indexes, accounting,
//! the config packet) come from `core`; the loop itself is the shared skeleton in `uring`.
//!
//! A slot's state is a [`Slot`] whose variants carry their data:
//!
//! ```text
//!            submit_read (+ linked send)           full read, linked: the kernel sends
//!   Free ─────────────────────────────▶ Reading ───────────────────────────────▶ Sending
//!    ▲                                   │  │                                      │
//!    │ EOF / EINTR / EAGAIN (index given │  │ short or unlinked read                │ send CQE
//!    │ back; chain settled)              │  ▼                                      │ (+ SEND_ZC
//!    ├───────────────────────────────────┘ Ready ──── channel granted ───────────▶ │  notification)
//!    └─────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! [`DeviceLoop::settle`] decides a `Reading` slot once every CQE of its chain is in: a linked
//! read that came back short breaks the link and its send completes `-ECANCELED` without
//! being issued; only when both CQEs are in does the packet (re)enter the `Ready` queue, so the
//! next read never overtakes it and each device's packets go out in index order. A slot is
//! `Free` again only after its send CQE and, for SEND_ZC, its notification: the kernel never
//! reads a buffer that was reused. Every SQE carries the slot's generation in its token, and a
//! completion whose generation is not the slot's current one is a bug.

use std::collections::VecDeque;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Instant;

use io_uring::{opcode, squeue, types};

use crate::config::ZeroCopy;
use crate::device_io::{classify, from_cqe, IoStep, Retries};
use crate::error::{Error, Result};
use crate::ids::{ChannelId, PacketIndex};
use crate::pool::BufferPool;
use crate::source::control::Command;
use crate::source::core::{check_config_len, Stream, Tallies};
use crate::source::device::{DeviceCtx, PrecopyStep, ReadMode};
use crate::source::{SourceShared, PRECOPY_POLL};
use crate::sys::{self, FdKind};
use crate::uring::{
    self, cqe_error, describe_setup_error, Completion, Driver, Ring, StallClock, Token, Uring, CQ_ENTRIES,
    NOTIF_USAGE_ZC_COPIED, SQ_ENTRIES, ZC_REPORT_USAGE,
};
use crate::wire::{
    encode_packet_header, patch_packet_header, VfioPacketHeader, PACKET_OVERHEAD, VFIO_FLAG_CONFIG_STATE,
    VFIO_FLAG_INIT_DATA_SENT,
};

/// `READ`/`READ_FIXED` of a slot's payload.
const K_READ: u8 = Token::FIRST_DRIVER_KIND;
/// `POLL_ADD(POLLIN)` on the data fd, linked before a read after `EAGAIN`.
const K_POLL: u8 = Token::FIRST_DRIVER_KIND + 1;
/// `SEND`/`SEND_ZC` of a slot's header + payload.
const K_SEND: u8 = Token::FIRST_DRIVER_KIND + 2;
/// `READ` of the channel-grant eventfd.
const K_WAKE: u8 = Token::FIRST_DRIVER_KIND + 3;
/// `READ` of the controller's command eventfd.
const K_CONTROL: u8 = Token::FIRST_DRIVER_KIND + 4;

/// A packet held by a slot.
#[derive(Debug, Clone, Copy)]
struct Packet {
    idx: PacketIndex,
    /// Payload bytes (a full chunk while its read is in flight).
    len: usize,
    /// VFIO packet flags: 0 (data), `VFIO_FLAG_CONFIG_STATE`, or the extension's
    /// `VFIO_FLAG_INIT_DATA_SENT` marker.
    flags: u32,
    /// When its read was issued (for the latency histogram).
    t0: Instant,
}

/// The send half of a linked chain, as its CQE reported it.
#[derive(Debug, Clone, Copy)]
struct SendCqe {
    res: i32,
    more: bool,
}

/// A slot's state; each variant carries what that state needs.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Free,
    /// A read (after a `POLL_ADD`, or linked to a send on `link`) is in flight; `read` and
    /// `send` hold the chain's CQEs as they arrive.
    Reading {
        pkt: Packet,
        link: Option<ChannelId>,
        read: Option<i32>,
        send: Option<SendCqe>,
    },
    /// Read, header final, waiting for a channel.
    Ready {
        pkt: Packet,
    },
    /// A send on `ch` is in flight (`sent == false`), or its CQE is in and a SEND_ZC
    /// notification is still due (`notif_due`).
    Sending {
        pkt: Packet,
        ch: ChannelId,
        sent: bool,
        notif_due: bool,
    },
}

/// The slots, their generations, and the queues over them.
#[derive(Debug)]
struct SlotTable {
    slots: Vec<Slot>,
    gens: Vec<u32>,
    /// Free data slots (the config slot, the last one, never enters it).
    free: Vec<usize>,
    /// Slots in `Ready`, oldest first.
    ready: VecDeque<usize>,
}

impl SlotTable {
    fn new(n: usize) -> SlotTable {
        SlotTable {
            slots: vec![Slot::Free; n],
            gens: vec![0; n],
            free: (0..n - 1).rev().collect(),
            ready: VecDeque::with_capacity(n),
        }
    }

    fn config_slot(&self) -> usize {
        self.slots.len() - 1
    }

    /// A new generation for slot `s`'s next submission.
    fn bump(&mut self, s: usize) -> u32 {
        self.gens[s] = self.gens[s].wrapping_add(1);
        self.gens[s]
    }

    /// Whether a data packet is being read, waits for a channel, or is being sent: the config
    /// packet must wait for all of them.
    fn data_unsettled(&self) -> bool {
        self.slots.iter().any(|s| match s {
            Slot::Free => false,
            Slot::Sending { sent, .. } => !sent,
            Slot::Reading { .. } | Slot::Ready { .. } => true,
        })
    }

    fn all_free(&self) -> bool {
        self.slots.iter().all(|s| matches!(s, Slot::Free))
    }

    fn count(&self, f: impl Fn(&Slot) -> bool) -> usize {
        self.slots.iter().filter(|s| f(s)).count()
    }
}

struct DeviceLoop<'s, 'c, 'a, 'd> {
    /// Dropped by hand in `Drop`: the ring before the pool it registered, and neither if the
    /// kernel did not give every operation back.
    uring: ManuallyDrop<Uring>,
    pool: ManuallyDrop<BufferPool>,
    /// Read targets of the grant (0) and command (1) eventfds (stable addresses; leaked with
    /// the ring).
    wake_bufs: ManuallyDrop<Box<[u64; 2]>>,
    run: &'s SourceShared<'c>,
    ctx: &'s mut DeviceCtx<'a, 'd>,
    table: SlotTable,
    stream: Stream,
    tallies: Tallies,
    /// Channels granted to this device and not in use.
    held: Vec<ChannelId>,
    /// The slot whose read chain is open (one read per data fd).
    reading: Option<usize>,
    /// What the last read said about the next one: link it to a send, or wait for `POLLIN`.
    last_read: LastRead,
    retries: Retries,
    config_done: bool,
    /// The data fd's kind (by number): how its reads are issued (see
    /// [`DeviceLoop::read_async`], [`DeviceLoop::read_sync`]).
    data_kind: Option<(i32, FdKind)>,
    /// An idle pre-copy asks the device again at this time.
    next_poll: Option<Instant>,
    /// Whether the pool could be registered with the ring.
    buffers: Buffers,
    /// Whether this device sends with SEND_ZC: the run's choice, unless its pool could not be
    /// registered and the choice was only `auto`'s.
    zerocopy: bool,
    chunk: usize,
}

impl Drop for DeviceLoop<'_, '_, '_, '_> {
    fn drop(&mut self) {
        if self.uring.busy() {
            // The kernel may still write into these: leak them rather than free them.
            return;
        }
        // SAFETY: taken or dropped exactly once, here, and never used again; every operation
        // was reaped (not leaked). The ring and the pool are kept idle until the session
        // returns, the ring released first (`Deferred`'s order).
        unsafe {
            self.run.deferred.keep_ring(ManuallyDrop::take(&mut self.uring));
            self.run.deferred.keep_pool(ManuallyDrop::take(&mut self.pool));
            ManuallyDrop::drop(&mut self.wake_bufs);
        }
    }
}

/// What the last read of the data fd said about the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LastRead {
    /// It filled its chunk: the next read may be linked to a send.
    Full,
    /// It came back short (a stream): the next is likely short too, and a linked send would only
    /// be cancelled, so it is not linked.
    Short,
    /// It said `EAGAIN`: the next one waits for `POLLIN` first (a linked `POLL_ADD`).
    WouldBlock,
}

/// Whether the pool is registered with the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Buffers {
    /// Registered: READ_FIXED, and SEND_ZC where chosen.
    Registered,
    /// RLIMIT_MEMLOCK could not pin it: plain READ and copying SEND.
    Unregistered,
}

/// Fixed files: 0..N = the channels, N = the grant eventfd, N+1 = abort, N+2 = commands. The
/// data fd is not registered: it appears only when the device enters PRE_COPY or STOP_COPY.
fn channel_file(ch: ChannelId) -> types::Fixed {
    types::Fixed(u32::from(ch.get()))
}

/// Runs one device's transfer on io_uring and hands its outcome to `report`: on success as soon
/// as the last packet was sent, before the ring gives back its idle operations (their cancel
/// and reap took up to 2 ms here, in the downtime; `report` may wait for the session's end
/// meanwhile); on failure after that drain.
pub(crate) fn run(run: &SourceShared<'_>, ctx: &mut DeviceCtx<'_, '_>, report: impl FnOnce(Result<Tallies>)) {
    let mut lp = match setup(run, ctx) {
        Ok(lp) => lp,
        Err(e) => return report(Err(e)),
    };
    let clock = StallClock::new();
    match lp.prepare().and_then(|()| uring::run(&mut lp, &run.abort, &clock, run.cfg.stall_timeout)) {
        Ok(()) => {
            let mut t = std::mem::replace(&mut lp.tallies, Tallies::new(lp.ctx.id.clone()));
            t.report.stop_copy_time = lp.ctx.stop_copy_start.elapsed();
            t.zerocopy = lp.zerocopy;
            report(Ok(t));
            // Only eventfd reads and the abort poll are left, nothing that carries data: a
            // ring that does not give them back is leaked on purpose (`finish`).
            let _ = lp.finish(false);
        }
        Err(e) => {
            // The loop's failure is the outcome; a drain that timed out only leaks the ring.
            let _ = lp.finish(true);
            report(Err(e));
        }
    }
}

/// The ring, the pool and the loop of one device.
///
/// # Errors
/// [`Error::Sys`] when the ring or the pool cannot be set up.
fn setup<'s, 'c, 'a, 'd>(
    run: &'s SourceShared<'c>,
    ctx: &'s mut DeviceCtx<'a, 'd>,
) -> Result<DeviceLoop<'s, 'c, 'a, 'd>> {
    let cfg = run.cfg;
    let nslots = cfg.buffers_for(run.zerocopy) + 1;
    let ring = Ring::new(SQ_ENTRIES, CQ_ENTRIES).map_err(|e| Error::sys(describe_setup_error(&e), e))?;
    let pool =
        BufferPool::new(nslots, PACKET_OVERHEAD, cfg.chunk_bytes).map_err(|e| Error::sys("mmap buffer pool", e))?;
    // SAFETY: the pool moves into the same `DeviceLoop` as the ring, whose `Drop` unmaps it only
    // after the ring, and only if `finish` reaped every operation.
    let buffers = match unsafe { ring.register_pool(&pool) } {
        Ok(()) => Buffers::Registered,
        // ENOMEM: RLIMIT_MEMLOCK too low to pin the pool (no CAP_IPC_LOCK). Plain READ and
        // copying SEND need no pinned memory: only an explicit `zerocopy on` fails.
        Err(_) if !(run.zerocopy && cfg.zerocopy == ZeroCopy::On) => Buffers::Unregistered,
        Err(e) => {
            return Err(Error::sys(
                "IORING_REGISTER_BUFFERS for zero-copy sends (raise RLIMIT_MEMLOCK, e.g. `ulimit -l`, grant \
                 CAP_IPC_LOCK, or use --zerocopy auto/off)",
                e,
            ))
        }
    };
    let zerocopy = run.zerocopy && buffers == Buffers::Registered;
    let mut files: Vec<i32> = run.channels.iter().map(|c| c.as_raw_fd()).collect();
    files.push(run.leases.waker(ctx.dev_no).as_fd().as_raw_fd());
    files.push(run.abort.as_fd().as_raw_fd());
    files.push(ctx.control.waker.as_fd().as_raw_fd());
    ring.register_files(&files).map_err(|e| Error::sys("IORING_REGISTER_FILES", e))?;
    // Bound the kernel's helper threads for blocking device reads.
    let _ = ring.limit_workers(2, 2);
    let id = ctx.id.clone();
    let abort_fixed = run.channels.len() as u32 + 1;
    let lp = DeviceLoop {
        uring: ManuallyDrop::new(Uring::new(ring, abort_fixed)),
        pool: ManuallyDrop::new(pool),
        wake_bufs: ManuallyDrop::new(Box::new([0; 2])),
        run,
        ctx,
        table: SlotTable::new(nslots),
        stream: Stream::new(cfg.max_stream_bytes),
        tallies: Tallies::new(id.clone()),
        held: Vec::with_capacity(run.channels.len()),
        reading: None,
        last_read: LastRead::Full,
        retries: Retries::default(),
        config_done: false,
        data_kind: None,
        next_poll: None,
        buffers,
        zerocopy,
        chunk: cfg.chunk_bytes,
    };
    Ok(lp)
}

impl Driver for DeviceLoop<'_, '_, '_, '_> {
    fn uring(&mut self) -> &mut Uring {
        &mut self.uring
    }

    fn pump(&mut self) -> Result<bool> {
        self.schedule()?;
        let done = self.config_done && self.table.all_free();
        if done {
            self.ctx.done();
        }
        Ok(done)
    }

    fn idle(&self) -> bool {
        // Set up, quiesced or in an idle pre-copy, with nothing in flight: waiting for the
        // device or the VMM is not a stall.
        self.ctx.read_mode() != ReadMode::Stream && !self.table.data_unsettled()
    }

    fn wait_limit(&self) -> std::time::Duration {
        self.next_poll.map_or(uring::TICK, |t| t.saturating_duration_since(Instant::now()).min(uring::TICK))
    }

    fn complete(&mut self, tok: Token, c: Completion) -> Result<()> {
        let s = tok.at();
        if tok.kind != K_WAKE && tok.kind != K_CONTROL && self.table.gens.get(s) != Some(&tok.gen) {
            if c.notif() {
                // The notification of a SEND_ZC that a broken link cancelled before it was
                // issued, on a kernel that flagged it F_MORE: it refers to no buffer.
                return Ok(());
            }
            return Err(Error::internal(format!("completion {tok:?} does not match its slot's generation")));
        }
        match tok.kind {
            K_WAKE => self.on_wake(c.res),
            K_CONTROL => self.on_control(c.res),
            // The poll's outcome shows in the read linked after it.
            K_POLL => Ok(()),
            K_READ => match &mut self.table.slots[s] {
                Slot::Reading { read, .. } if read.is_none() => {
                    *read = Some(c.res);
                    self.settle(s)
                }
                other => Err(Error::internal(format!("read completion for a slot in {other:?}"))),
            },
            K_SEND if c.notif() => self.on_notif(s, c.res),
            K_SEND => match &mut self.table.slots[s] {
                Slot::Reading { send, .. } if send.is_none() => {
                    *send = Some(SendCqe { res: c.res, more: c.more() });
                    self.settle(s)
                }
                Slot::Sending { sent: false, .. } => self.on_sent(s, SendCqe { res: c.res, more: c.more() }),
                other => Err(Error::internal(format!("send completion for a slot in {other:?}"))),
            },
            k => Err(Error::internal(format!("completion of unknown kind {k}"))),
        }
    }

    fn retire(&mut self, _tok: Token, _c: Completion) {
        // The skeleton's accounting (in-flight count, due notifications) is all a failed loop
        // needs: no slot is reused after a failure.
    }

    fn stall_report(&self) -> String {
        format!(
            "device {}: {} sends and {} reads in flight, {} zero-copy buffers the kernel has not given back \
             (sent, unacknowledged by the peer), {} packets ready without a channel",
            self.ctx.id,
            self.table.count(|s| matches!(s, Slot::Sending { sent: false, .. })),
            usize::from(self.reading.is_some()),
            self.table.count(|s| matches!(s, Slot::Sending { sent: true, notif_due: true, .. })),
            self.table.ready.len()
        )
    }
}

impl DeviceLoop<'_, '_, '_, '_> {
    /// Encodes every slot's header once (the device identity; each packet patches its index,
    /// flags and size), arms the grant and command eventfds' reads, and tells the controller
    /// that set-up is done.
    fn prepare(&mut self) -> Result<()> {
        for s in 0..self.table.slots.len() {
            // SAFETY: no operation is in flight yet; we own every slot.
            let hdr = unsafe { self.pool.slot_bytes_mut(s, PACKET_OVERHEAD, 0) };
            encode_packet_header(self.ctx.id, VfioPacketHeader { idx: 0, flags: 0 }, 0, hdr)
                .map_err(|e| Error::Config(e.to_string()))?;
        }
        self.arm_eventfd(K_WAKE)?;
        self.arm_eventfd(K_CONTROL)?;
        self.ctx.control.ack(Command::Prepare);
        Ok(())
    }

    /// Arms the `READ` of the grant (`K_WAKE`) or command (`K_CONTROL`) eventfd.
    fn arm_eventfd(&mut self, kind: u8) -> Result<()> {
        let n = self.run.channels.len() as u32;
        let (file, i) = if kind == K_WAKE { (n, 0) } else { (n + 2, 1) };
        let buf: *mut u64 = &mut self.wake_bufs[i];
        let e = opcode::Read::new(types::Fixed(file), buf.cast(), 8).build().user_data(Token::new(kind, 0, 0).encode());
        // SAFETY: `wake_bufs` is boxed (stable address) and is freed only after every operation
        // was reaped (or never, if the ring is leaked); each element has one read in flight at
        // most; the fixed file stays registered.
        unsafe { self.uring.push(&[e]) }
    }

    fn on_control(&mut self, res: i32) -> Result<()> {
        match res {
            r if r == -libc::ECANCELED => Ok(()),
            r if r >= 0 || r == -libc::EAGAIN || r == -libc::EINTR => {
                // The commands themselves are applied by `schedule`, between I/O steps.
                self.next_poll = None;
                self.arm_eventfd(K_CONTROL)
            }
            r => Err(Error::sys("read command eventfd", cqe_error(r))),
        }
    }

    fn on_wake(&mut self, res: i32) -> Result<()> {
        match res {
            // Cancelled at teardown.
            r if r == -libc::ECANCELED => return Ok(()),
            // EAGAIN: another reader drained the counter first; EINTR: nothing happened.
            r if r >= 0 || r == -libc::EAGAIN || r == -libc::EINTR => {}
            r => return Err(Error::sys("read channel-grant eventfd", cqe_error(r))),
        }
        while let Some(ch) = self.run.leases.take_granted(self.ctx.dev_no) {
            self.held.push(ch);
        }
        self.arm_eventfd(K_WAKE)
    }

    fn take_channel(&mut self, enqueue: bool) -> Option<ChannelId> {
        self.held.pop().or_else(|| self.run.leases.try_lease(self.ctx.dev_no, enqueue))
    }

    /// Schedules whatever can run now.
    fn schedule(&mut self) -> Result<()> {
        // 0. The controller's commands (state changes), between I/O steps: no read of this
        //    device is in flight in the phases that take commands (pre-copy reads are
        //    synchronous).
        self.ctx.apply_commands()?;
        // 1. The config packet, strictly after every data packet was sent; it joins the queue
        //    of packets waiting for a channel, served just below.
        let unsettled = self.table.data_unsettled();
        if let Some(idx) = self.stream.config_due(unsettled) {
            self.queue_config(idx)?;
        }
        // 2. Packets waiting for a channel, oldest first.
        while let Some(&s) = self.table.ready.front() {
            let Some(ch) = self.take_channel(true) else { break };
            self.table.ready.pop_front();
            self.submit_send(s, ch)?;
        }
        // 2b. The initial-data marker, right after the initial data (return path only).
        if !self.table.free.is_empty() && self.ctx.marker_due(self.run.rp.enabled()) {
            let s = self.table.free.pop().ok_or_else(|| Error::internal("no free slot for the marker"))?;
            let idx = self.stream.reserve().map_err(|l| self.limit_err(l))?;
            self.make_ready(s, Packet { idx, len: 0, flags: VFIO_FLAG_INIT_DATA_SENT, t0: Instant::now() })?;
            return self.schedule();
        }
        // 3. The next read (one in flight per data fd), as the device's phase allows.
        let mode = self.ctx.read_mode();
        let poll_due = self.next_poll.is_none_or(|t| Instant::now() >= t);
        if mode != ReadMode::Nothing && !self.stream.ended() && self.reading.is_none() && poll_due {
            if let Some(s) = self.table.free.pop() {
                if mode == ReadMode::PreCopy {
                    if self.precopy_read(s)? {
                        // A pre-copy read completes synchronously: queue its send right away.
                        return self.schedule();
                    }
                } else {
                    // Link a send only to a read that cannot push the stream past its cap: the
                    // cap is checked before anything is sent, as on the blocking backend.
                    if self.read_sync() {
                        // Read only with a channel in hand, and send at once: this thread
                        // both reads and sends, so reading ahead would only let the data go
                        // cold in the cache before its send copies it.
                        if self.table.ready.is_empty() {
                            if let Some(ch) = self.take_channel(true) {
                                self.held.push(ch);
                                self.sync_read(s)?;
                                self.send_ready_now()?;
                                return self.schedule();
                            }
                        }
                        self.table.free.push(s);
                        return Ok(());
                    }
                    let fits = self.stream.fits(self.chunk);
                    let link = self.table.ready.is_empty() && fits && self.last_read == LastRead::Full;
                    let ch = if link { self.take_channel(false) } else { None };
                    self.submit_read(s, ch)?;
                }
            }
        }
        // 4. Channels we hold but cannot use right now go back to other devices.
        if self.table.ready.is_empty() && (self.reading.is_some() || self.stream.ended()) {
            while let Some(ch) = self.held.pop() {
                self.run.leases.release(ch);
            }
        }
        Ok(())
    }

    fn limit_err(&self, limit: crate::error::StreamLimit) -> Error {
        Error::StreamLimit { device: self.ctx.id.clone(), limit }
    }

    /// Patches slot `s`'s header and queues it for a channel.
    fn make_ready(&mut self, s: usize, pkt: Packet) -> Result<()> {
        // SAFETY: slot `s` has no operation in flight (its chain settled, or it was never
        // submitted).
        let hdr = unsafe { self.pool.slot_bytes_mut(s, PACKET_OVERHEAD, 0) };
        patch_packet_header(hdr, VfioPacketHeader { idx: pkt.idx.get(), flags: pkt.flags }, pkt.len)
            .map_err(|e| Error::Config(e.to_string()))?;
        self.table.slots[s] = Slot::Ready { pkt };
        self.table.ready.push_back(s);
        Ok(())
    }

    /// One synchronous pre-copy read into slot `s`; returns whether it brought data (else
    /// the next one waits for the poll interval).
    fn precopy_read(&mut self, s: usize) -> Result<bool> {
        let t0 = Instant::now();
        // SAFETY: slot `s` was just taken from the free list: no operation refers to it.
        let buf = unsafe { self.pool.slot_bytes_mut(s, 0, self.chunk) };
        match self.ctx.precopy_read(buf)? {
            PrecopyStep::Data(n) => {
                self.next_poll = None;
                let idx = self.stream.reserve().map_err(|l| self.limit_err(l))?;
                self.stream.account(n).map_err(|l| self.limit_err(l))?;
                self.tallies.read(n, self.chunk);
                self.make_ready(s, Packet { idx, len: n, flags: 0, t0 })?;
                Ok(true)
            }
            PrecopyStep::Idle => {
                self.table.free.push(s);
                self.next_poll = Some(Instant::now() + PRECOPY_POLL);
                Ok(false)
            }
        }
    }

    fn submit_read(&mut self, s: usize, link: Option<ChannelId>) -> Result<()> {
        let idx = self.stream.reserve().map_err(|l| self.limit_err(l))?;
        let pkt = Packet { idx, len: self.chunk, flags: 0, t0: Instant::now() };
        // Pre-fill the header for a full chunk: a linked send carries it as is; a short read
        // patches it before the packet is queued.
        // SAFETY: slot `s` came from the free list: nothing in flight touches it.
        let hdr = unsafe { self.pool.slot_bytes_mut(s, PACKET_OVERHEAD, 0) };
        patch_packet_header(hdr, VfioPacketHeader { idx: idx.get(), flags: 0 }, self.chunk)
            .map_err(|e| Error::Config(e.to_string()))?;
        let gen = self.table.bump(s);
        let ptr = self.pool.payload_ptr(s);
        let data = self.ctx.data_fd().ok_or_else(|| Error::internal("a read without a data fd"))?.as_raw_fd();
        let fd = types::Fd(data);
        let mut rd = if self.buffers == Buffers::Registered {
            opcode::ReadFixed::new(fd, ptr, self.chunk as u32, 0).offset(u64::MAX).build()
        } else {
            opcode::Read::new(fd, ptr, self.chunk as u32).offset(u64::MAX).build()
        }
        .user_data(Token::new(K_READ, s, gen).encode());
        if self.read_async() {
            rd = rd.flags(squeue::Flags::ASYNC);
        }
        self.reading = Some(s);
        if self.last_read == LastRead::WouldBlock {
            self.last_read = LastRead::Short;
            // The fd said EAGAIN last time: wait until it is readable, then read. No send is
            // linked: the channel would sit idle for as long as the device takes.
            if let Some(ch) = link {
                self.held.push(ch);
            }
            self.table.slots[s] = Slot::Reading { pkt, link: None, read: None, send: None };
            let poll = opcode::PollAdd::new(fd, libc::POLLIN as u32)
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(Token::new(K_POLL, s, gen).encode());
            // SAFETY: the poll refers to no memory; the read's payload range belongs to slot `s`
            // until the chain settles; the fixed files stay registered.
            return unsafe { self.uring.push(&[poll, rd]) };
        }
        self.table.slots[s] = Slot::Reading { pkt, link, read: None, send: None };
        match link {
            Some(ch) => {
                let tx = self.send_entry(s, ch, gen, self.chunk);
                // SAFETY: the slot's header and payload stay mapped and owned by this chain until
                // both CQEs (and a SEND_ZC notification) are reaped; the fixed files stay
                // registered.
                unsafe { self.uring.push(&[rd.flags(squeue::Flags::IO_LINK), tx]) }
            }
            // SAFETY: as above, for the read alone.
            None => unsafe { self.uring.push(&[rd]) },
        }
    }

    /// The data fd's kind, learnt once per data fd (by number).
    fn data_kind(&mut self) -> FdKind {
        let Some(fd) = self.ctx.data_fd() else { return FdKind::Other };
        let raw = fd.as_raw_fd();
        match self.data_kind {
            Some((f, k)) if f == raw => k,
            _ => {
                let k = sys::fd_kind(fd);
                self.data_kind = Some((raw, k));
                k
            }
        }
    }

    /// Pipes and sockets complete reads inline (or arm a poll); anything else but a regular
    /// file (a VFIO data fd is an anon inode without FMODE_NOWAIT) would first fail a
    /// non-blocking attempt, so its reads go straight to io-wq.
    fn read_async(&mut self) -> bool {
        self.data_kind() == FdKind::Other
    }

    /// Regular files are read with `read(2)` on this thread: a buffered read of a filesystem
    /// without async buffered reads (tmpfs) would go to io-wq, one cross-thread hop per chunk,
    /// and it never waits for a peer.
    fn read_sync(&mut self) -> bool {
        self.data_kind() == FdKind::Regular
    }

    /// Submits the send of the oldest ready packet on a held channel right away (not at the
    /// loop's next wait), so that it copies data this thread has just read.
    fn send_ready_now(&mut self) -> Result<()> {
        let Some(&s) = self.table.ready.front() else { return Ok(()) };
        let Some(ch) = self.held.pop() else { return Ok(()) };
        self.table.ready.pop_front();
        self.submit_send(s, ch)?;
        self.uring.submit()
    }

    /// One `read(2)` into slot `s`'s payload, settled at once like an unlinked read.
    fn sync_read(&mut self, s: usize) -> Result<()> {
        let idx = self.stream.reserve().map_err(|l| self.limit_err(l))?;
        let pkt = Packet { idx, len: self.chunk, flags: 0, t0: Instant::now() };
        let fd = self.ctx.data_fd().ok_or_else(|| Error::internal("a read without a data fd"))?;
        // SAFETY: slot `s` came from the free list: no operation refers to it.
        let buf = unsafe { self.pool.slot_bytes_mut(s, 0, self.chunk) };
        let res = match sys::FdIo::read(&sys::Kernel, fd, buf) {
            Ok(n) => n as i32,
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        };
        self.reading = Some(s);
        self.table.slots[s] = Slot::Reading { pkt, link: None, read: Some(res), send: None };
        self.settle(s)
    }

    fn send_entry(&self, s: usize, ch: ChannelId, gen: u32, len: usize) -> squeue::Entry {
        let total = (PACKET_OVERHEAD + len) as u32;
        let ptr = self.pool.header_ptr(s, PACKET_OVERHEAD);
        // MSG_WAITALL: a short send must fail the request (and any link), never pass silently.
        // MSG_NOSIGNAL: a closed peer is an error code, not a SIGPIPE.
        let flags = libc::MSG_WAITALL | libc::MSG_NOSIGNAL;
        let e = if self.zerocopy {
            opcode::SendZc::new(channel_file(ch), ptr, total)
                .buf_index(Some(0))
                .flags(flags)
                .zc_flags(ZC_REPORT_USAGE)
                .build()
        } else {
            opcode::Send::new(channel_file(ch), ptr, total).flags(flags).build()
        };
        e.user_data(Token::new(K_SEND, s, gen).encode())
    }

    fn submit_send(&mut self, s: usize, ch: ChannelId) -> Result<()> {
        let Slot::Ready { pkt } = self.table.slots[s] else {
            return Err(Error::internal(format!("send of a slot in {:?}", self.table.slots[s])));
        };
        let gen = self.table.bump(s);
        self.table.slots[s] = Slot::Sending { pkt, ch, sent: false, notif_due: false };
        let tx = self.send_entry(s, ch, gen, pkt.len);
        // SAFETY: the slot is owned by this send until its CQE and notification are reaped.
        unsafe { self.uring.push(&[tx]) }
    }

    fn queue_config(&mut self, idx: PacketIndex) -> Result<()> {
        let s = self.table.config_slot();
        let blob = self.ctx.config(self.stream.bytes())?;
        check_config_len(self.ctx.id, blob.len(), self.chunk).map_err(Error::Config)?;
        // SAFETY: the config slot is never used for data, and this runs once.
        let buf = unsafe { self.pool.slot_bytes_mut(s, 0, blob.len()) };
        buf.copy_from_slice(&blob);
        self.tallies.report.config_bytes = blob.len() as u64;
        self.make_ready(s, Packet { idx, len: blob.len(), flags: VFIO_FLAG_CONFIG_STATE, t0: Instant::now() })
    }

    /// Decides a `Reading` slot once the CQEs its chain needs are in.
    fn settle(&mut self, s: usize) -> Result<()> {
        let Slot::Reading { pkt, link, read, send } = self.table.slots[s] else {
            return Err(Error::internal("settle of a slot that is not reading"));
        };
        let Some(res) = read else { return Ok(()) };
        self.last_read = if res == self.chunk as i32 { LastRead::Full } else { LastRead::Short };
        match link {
            Some(ch) if res == self.chunk as i32 => {
                // A full read: the kernel issued the linked send; the slot is now sending.
                self.reading = None;
                self.retries.reset();
                self.stream.account(self.chunk).map_err(|l| self.limit_err(l))?;
                self.tallies.read(self.chunk, self.chunk);
                self.ctx.stop_copy_read(self.chunk);
                self.table.slots[s] = Slot::Sending { pkt, ch, sent: false, notif_due: false };
                match send {
                    Some(cqe) => self.on_sent(s, cqe),
                    None => Ok(()),
                }
            }
            Some(ch) => {
                // A short, empty or failed read broke the link: its send completes -ECANCELED
                // without being issued. Until that CQE is in, the chain stays open (and the
                // next read waits), so packet n+1 can never go out before packet n.
                let Some(cqe) = send else { return Ok(()) };
                if cqe.res != -libc::ECANCELED {
                    if cqe.res < 0 {
                        // The send failed on its own (e.g. an old kernel refused it at prep).
                        let op = format!("send packet {} of device {}", pkt.idx, self.ctx.id);
                        return Err(Error::Channel { channel: ch, op, source: cqe_error(cqe.res) });
                    }
                    return Err(Error::internal(format!("linked send completed {} after a short read", cqe.res)));
                }
                self.held.push(ch);
                self.reading = None;
                self.after_read(s, pkt, res)
            }
            None => {
                self.reading = None;
                self.after_read(s, pkt, res)
            }
        }
    }

    /// A read whose packet goes nowhere yet: queue its data, or give its index back.
    fn after_read(&mut self, s: usize, pkt: Packet, res: i32) -> Result<()> {
        match classify(from_cqe(res)) {
            IoStep::Moved(n) => {
                self.retries.reset();
                self.stream.account(n).map_err(|l| self.limit_err(l))?;
                self.tallies.read(n, self.chunk);
                self.ctx.stop_copy_read(n);
                return self.make_ready(s, Packet { len: n, ..pkt });
            }
            IoStep::End => self.stream.end(),
            IoStep::Retry => self.retries.again().map_err(|e| self.read_err(e))?,
            IoStep::WaitReady => self.last_read = LastRead::WouldBlock,
            IoStep::Fatal(e) => return Err(self.read_err(e)),
        }
        // Nothing was read: the index reserved for it stays unused.
        self.stream.give_back(pkt.idx);
        self.table.slots[s] = Slot::Free;
        self.table.free.push(s);
        Ok(())
    }

    fn read_err(&self, source: io::Error) -> Error {
        Error::DeviceRead { device: self.ctx.id.clone(), offset: self.stream.bytes(), source }
    }

    fn on_sent(&mut self, s: usize, cqe: SendCqe) -> Result<()> {
        let Slot::Sending { pkt, ch, sent: false, .. } = self.table.slots[s] else {
            return Err(Error::internal("send result for a slot that is not sending"));
        };
        let total = PACKET_OVERHEAD + pkt.len;
        if cqe.res != total as i32 {
            let source = if cqe.res < 0 {
                cqe_error(cqe.res)
            } else {
                // A MSG_WAITALL send on a stream socket ends short only when the connection
                // failed under it (the peer's reset or close, or our own reset after a failure).
                io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!(
                        "short send: {} of {total} bytes (the connection was closed or reset during the send, \
                         usually by the destination)",
                        cqe.res
                    ),
                )
            };
            let op = format!("send packet {} of device {}", pkt.idx, self.ctx.id);
            return Err(Error::Channel { channel: ch, op, source });
        }
        self.tallies.sent(self.run, ch, pkt.len, pkt.t0, !self.zerocopy);
        self.run.leases.release(ch);
        self.table.slots[s] = Slot::Sending { pkt, ch, sent: true, notif_due: cqe.more };
        self.release_if_done(s);
        Ok(())
    }

    fn on_notif(&mut self, s: usize, res: i32) -> Result<()> {
        let Slot::Sending { pkt, ch, sent, notif_due: true } = self.table.slots[s] else {
            // The notification of a linked SEND_ZC that was cancelled before it was issued (a
            // short read broke the link; the kernel flagged its CQE F_MORE): no buffer is
            // concerned, the slot already went on.
            return Ok(());
        };
        self.tallies.zerocopy_done(pkt.len, (res as u32) & NOTIF_USAGE_ZC_COPIED != 0);
        self.table.slots[s] = Slot::Sending { pkt, ch, sent, notif_due: false };
        self.release_if_done(s);
        Ok(())
    }

    /// A slot is free only when its send CQE and any SEND_ZC notification are in.
    fn release_if_done(&mut self, s: usize) {
        if let Slot::Sending { pkt, sent: true, notif_due: false, .. } = self.table.slots[s] {
            self.table.slots[s] = Slot::Free;
            if pkt.flags == VFIO_FLAG_CONFIG_STATE {
                self.config_done = true;
            } else {
                self.table.free.push(s);
            }
        }
    }

    /// Gives back the channels held between packets, raises the abort on failure (so every
    /// other device stops), then cancels and drains what is in flight (or leaks the ring and
    /// pool on purpose). Channels held by slots are never released on failure: a linked or
    /// in-flight send may still be issued on them, and a second sender on the same socket would
    /// interleave partial writes.
    fn finish(&mut self, failed: bool) -> Result<()> {
        while let Some(ch) = self.held.pop() {
            self.run.leases.release(ch);
        }
        if failed {
            self.run.abort.abort();
            if self.zerocopy && self.uring.busy() {
                // A SEND_ZC buffer comes back only when the peer acknowledged its bytes or the
                // connection dropped them: a peer that stopped reading would hold them past
                // any drain. The session failed and resets its channels anyway: reset them
                // now, so the kernel frees their send queues and notifies.
                for ch in &self.run.channels {
                    disconnect(*ch);
                }
            }
        }
        let who = format!("device {}", self.ctx.id);
        uring::finish(self, &who)
    }
}

/// Drops a TCP connection at once: `connect(2)` to `AF_UNSPEC` runs the kernel's
/// `tcp_disconnect`, which sends a reset and frees the send queue (and so gives back the SEND_ZC
/// buffers in it), although the ring and the session still hold references to the socket. A
/// socket of another kind, or one already closed, is left as it is.
fn disconnect(fd: BorrowedFd<'_>) {
    // SAFETY: `sockaddr` is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: `sa` is a valid `sockaddr` of the length given, alive for the call; `fd` is open
    // (borrowed for the call); connect(2) reads the address and writes no memory.
    let _ = unsafe { libc::connect(fd.as_raw_fd(), &sa, std::mem::size_of::<libc::sockaddr>() as libc::socklen_t) };
}
