//! The io_uring destination: `W` worker threads, each with its own ring running the shared loop
//! skeleton (`crate::uring`), sharing one registered pool and one [`RecvState`]; plus one writer
//! thread per device whose stream goes to a regular file.
//!
//! Channel `c` belongs to worker `c % W`. A worker has one `RECV` in flight per channel: first
//! the 288 bytes of a packet header (into a small per-channel buffer), then the payload straight
//! into the packet's registered blocks (one `RECV` per contiguous piece of its chain: usually
//! one). Device writes (one in flight per device, one contiguous piece at a time) go as the fd
//! allows:
//!
//! * a regular file: `write(2)` on the device's own writer thread (`vfmfd-wr-D`), woken through
//!   a condition variable by the worker that made its next packet writable. io_uring would hand
//!   every buffered write on a filesystem without async buffered writes (tmpfs) to io-wq, a
//!   cross-thread hop per packet; and a `write(2)` on the worker itself held up the receives of
//!   that worker's channels for as long as it copied, so with several devices the channel
//!   carrying the next in-order packet went unread while the others' packets filled the budget
//!   and parked (same-run A/B, 4 devices into tmpfs files: 1.14x the throughput; the profile is
//!   in README, Benchmarks);
//! * a pipe or socket: a plain `WRITE_FIXED`, issued by whichever worker made the next packet
//!   writable (by receiving it, or by finishing the write before it), completed inline or after
//!   a poll when the fd is full;
//! * anything else (a VFIO resume fd has no `FMODE_NOWAIT`): `WRITE_FIXED` with `IOSQE_ASYNC`.
//!
//! A short write continues where it stopped, and an `EAGAIN` from an `O_NONBLOCK` resume fd
//! waits for `POLLOUT` (a linked `POLL_ADD`) instead of spinning. A channel whose packet has no
//! memory yet parks with its decoded header; a worker or writer that frees memory kicks the
//! workers with parked channels through their eventfds (see `reassembly` for why that cannot
//! deadlock).

use std::cell::UnsafeCell;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use io_uring::{opcode, squeue, types};

use crate::backend::TICK;
use crate::device_io::{classify, classify_write, from_cqe, IoStep, Retries};
use crate::error::{Error, Result, Stage};
use crate::ids::{ChannelId, DeviceIndex, PacketIndex};
use crate::pool::BufferPool;
use crate::receiver::core::{reorder_wait, RecvState, WriterNext};
use crate::receiver::reassembly::{Admit, Admitted, NextWrite, Reassembly};
use crate::receiver::{RecvShared, Target};
use crate::uring::{
    self, describe_setup_error, Completion, Driver, Ring, StallClock, Token, Uring, CQ_ENTRIES, SQ_ENTRIES,
};
use crate::wire::{DeviceStateHeader, VfioPacketHeader, DEVICE_STATE_HEADER_LEN, PACKET_OVERHEAD};

/// `RECV` on a channel (index: the worker's local channel).
const K_RECV: u8 = Token::FIRST_DRIVER_KIND;
/// `WRITE`/`WRITE_FIXED` to a device's resume fd (index: the device).
const K_WRITE: u8 = Token::FIRST_DRIVER_KIND + 1;
/// `POLL_ADD(POLLOUT)` linked before a write after `EAGAIN` (index: the device).
const K_WPOLL: u8 = Token::FIRST_DRIVER_KIND + 2;
/// `READ` of this worker's kick eventfd.
const K_KICK: u8 = Token::FIRST_DRIVER_KIND + 3;
/// `ASYNC_CANCEL` of a long payload receive (index: the local channel), to collect its partial
/// bytes: a `MSG_WAITALL` receive completes only when full, so a packet arriving slowly but
/// steadily would otherwise look like a stall. The cancelled receive completes with the bytes it
/// got (or `-ECANCELED` with none) and is submitted again for the rest.
const K_HARVEST: u8 = Token::FIRST_DRIVER_KIND + 4;

struct Shared<'r, 's, 'c, 'a, 'shared> {
    st: Mutex<RecvState<'r>>,
    targets: Vec<Mutex<&'shared mut Target<'a>>>,
    /// Unmapped only if no worker had to leak its ring (`leaked`).
    pool: ManuallyDrop<BufferPool>,
    leaked: AtomicBool,
    run: &'s RecvShared<'c>,
    workers: usize,
    clock: StallClock,
    /// Devices whose stream is complete (config applied), for their validators.
    loaded: Mutex<Loaded>,
    /// Wakes the endgame's wait ([`Shared::wait_complete`]).
    loaded_cv: Condvar,
    /// Per device: wakes its validator (one each: a completion wakes no other thread).
    validate_cv: Vec<Condvar>,
    /// The receive's threads may exit (they wait for it after their work, see `run`), and
    /// what wakes them.
    released: Mutex<bool>,
    release_cv: Condvar,
    /// How each device's writes are issued (learnt once, from its fd's kind).
    modes: Vec<WriteMode>,
    /// Per device: a duplicate of its data fd, taken before any worker starts, from which the
    /// workers register their file tables. A worker that starts late (a loaded machine) does
    /// so without a device's lock, which the endgame may hold once the last device completed,
    /// and after a validator may have closed the device's own fd (RESUMING → STOP). The
    /// duplicates live as long as the registrations they feed would anyway (a registered file
    /// is referenced until its ring is dropped).
    data_fds: Vec<Option<OwnedFd>>,
    /// Per device: wakes its writer thread ([`WriteMode::Thread`]) when a packet became
    /// writable or the receive failed; unused for the other modes.
    wake: Vec<Condvar>,
}

/// What the validators and the endgame wait for.
struct Loaded {
    /// Per device: its config was applied.
    complete: Vec<bool>,
    /// The receive ended: a validator whose device is not complete exits.
    ended: bool,
    /// Every device completed (the last config was applied).
    all_complete: bool,
    /// Workers and writer threads that have returned (or panicked).
    exited: usize,
    /// The worker of channel 0 (worker 0) has returned: nothing of it reads channel 0 any more.
    ch0_released: bool,
}

/// Releases the threads of the receive when dropped (the scope's end, or a panic through it).
struct ReleaseOnDrop<'x, 'r, 's, 'c, 'a, 'shared>(&'x Shared<'r, 's, 'c, 'a, 'shared>);

impl Drop for ReleaseOnDrop<'_, '_, '_, '_, '_, '_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Counts its worker or writer thread as exited when dropped (also when it panics).
/// `.2`: the thread is the worker of channel 0.
struct ExitNote<'x>(&'x Mutex<Loaded>, &'x Condvar, bool);

impl Drop for ExitNote<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.exited += 1;
        g.ch0_released |= self.2;
        drop(g);
        self.1.notify_all();
    }
}

impl<'r, 'a, 'shared> Shared<'r, '_, '_, 'a, 'shared> {
    fn lock(&self) -> MutexGuard<'_, RecvState<'r>> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn target(&self, d: DeviceIndex) -> MutexGuard<'_, &'shared mut Target<'a>> {
        self.targets[d.index()].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands device `d`, whose config was just applied, to its validator.
    fn loaded(&self, d: DeviceIndex) {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner()).complete[d.index()] = true;
        self.validate_cv[d.index()].notify_one();
    }

    /// The last device completed: the endgame may run.
    fn all_complete(&self) {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner()).all_complete = true;
        self.loaded_cv.notify_all();
    }

    /// Waits until every device completed without a failure (true), or until all `spawned`
    /// workers returned (false).
    fn wait_complete(&self, spawned: usize) -> bool {
        let mut g = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if g.all_complete {
                drop(g);
                return !self.lock().failed();
            }
            if g.exited >= spawned {
                return false;
            }
            g = self.loaded_cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until the worker of channel 0 has returned (what it took from channel 0 after the
    /// last device completed is then in `ch0_after`), or every thread (`spawned`) has.
    fn wait_ch0_released(&self, spawned: usize) {
        let mut g = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        while !g.ch0_released && g.exited < spawned {
            g = self.loaded_cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Holds a thread of the receive, its work done, until [`Shared::release`]: a thread's
    /// exit took 0.1 to 0.4 ms of CPU each here (`perf sched` on this 2-CPU VM), which would
    /// otherwise fall into the downtime.
    fn wait_release(&self) {
        let mut g = self.released.lock().unwrap_or_else(|p| p.into_inner());
        while !*g {
            g = self.release_cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Lets every thread of the receive exit.
    fn release(&self) {
        *self.released.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.release_cv.notify_all();
    }

    /// Every device is complete: the endgame (validation of the rest, verdicts) runs now,
    /// while the workers cancel their receives and return; then, once no worker reads channel
    /// 0 any more (what it took from it is known), the commit and the start, before any thread
    /// of the receive exits. Nothing of a worker touches a device any more (not even a worker
    /// that starts only now: its set-up takes the duplicates in `data_fds`). A validator still
    /// walking its device holds its lock until done; one that did not start yet finds it
    /// validated.
    fn endgame(&self, spawned: usize) {
        self.end_validators();
        let mut guards: Vec<_> = self.targets.iter().map(|t| t.lock().unwrap_or_else(|p| p.into_inner())).collect();
        let mut ts: Vec<&mut Target<'_>> = guards.iter_mut().map(|g| &mut ***g).collect();
        crate::receiver::endgame(self.run, &mut ts);
        self.wait_ch0_released(spawned);
        crate::receiver::finish_early(self.run, &mut ts);
    }

    /// The receive ended: validators of incomplete devices exit.
    fn end_validators(&self) {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner()).ended = true;
        for cv in &self.validate_cv {
            cv.notify_one();
        }
    }

    /// A device's validator, started with the workers (before the switchover): waits until
    /// its stream is complete, then walks it RESUMING → STOP (`Target::validate`, once per
    /// device whoever comes first: this or the endgame) off the receive path, so a driver's
    /// check neither holds up a worker nor waits for the last device.
    fn validator(&self, d: DeviceIndex) {
        let mut g = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        while !g.complete[d.index()] {
            if g.ended {
                return;
            }
            g = self.validate_cv[d.index()].wait(g).unwrap_or_else(|p| p.into_inner());
        }
        drop(g);
        self.target(d).validate();
    }

    fn fail(&self, e: Error) {
        self.lock().fail(e);
        self.run.abort.abort();
        for cv in &self.wake {
            cv.notify_all();
        }
    }

    /// Device `d`'s packet was written (or applied) by worker `me` (`usize::MAX`: its writer
    /// thread): frees its memory and wakes the workers that wait for that, or every worker once
    /// the last device completed.
    fn written(&self, me: usize, d: DeviceIndex) {
        let mut g = self.lock();
        g.reassembly.written(d);
        g.freed();
        if g.complete() {
            // The last device is done: the other workers, waiting on receives that may never
            // complete (the source holds its FINs until its devices are joined), end now.
            self.kick_all_others(me);
            self.all_complete();
        } else {
            self.kick_others(me, &g);
        }
    }

    /// Wakes every other worker.
    fn kick_all_others(&self, me: usize) {
        for w in (0..self.workers).filter(|&w| w != me) {
            self.run.channels.kicks[w].signal();
        }
    }

    /// Wakes every other worker that has a parked channel: memory was freed.
    fn kick_others(&self, me: usize, g: &RecvState<'_>) {
        for w in (0..self.workers).filter(|&w| w != me) {
            let parked = ChannelId::all(self.run.channels.count()).skip(w).step_by(self.workers).any(|c| g.parked(c));
            if parked {
                self.run.channels.kicks[w].signal();
            }
        }
    }
}

pub(crate) fn run(run: &RecvShared<'_>, reassembly: &mut Reassembly, targets: &mut [Target<'_>]) -> Result<()> {
    let n = run.channels.count();
    // One kick eventfd per worker, made with the channels (an arriving channel kicks its worker).
    let workers = run.channels.kicks.len();
    if workers == 0 || workers > n {
        return Err(Error::internal(format!("{workers} receive workers for {n} channels")));
    }
    let pool = BufferPool::new(reassembly.block_count(), 0, reassembly.block_bytes())
        .map_err(|e| Error::sys("mmap receive pool", e))?;
    let ndev = targets.len();
    let devices: Vec<DeviceIndex> = DeviceIndex::all(ndev).filter(|d| targets[d.index()].is_device()).collect();
    let modes: Vec<WriteMode> = targets.iter().map(|t| write_mode(t.data_fd())).collect();
    let data_fds = targets
        .iter()
        .map(|t| t.data_fd().map(|f| f.try_clone_to_owned()).transpose())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::sys("duplicate a device's data fd for the receive rings", e))?;
    let mut shared = Shared {
        data_fds,
        wake: modes.iter().map(|_| Condvar::new()).collect(),
        modes,
        st: Mutex::new(RecvState::new(reassembly, run.channels, &run.warnings)),
        targets: targets.iter_mut().map(Mutex::new).collect(),
        pool: ManuallyDrop::new(pool),
        leaked: AtomicBool::new(false),
        run,
        workers,
        clock: StallClock::new(),
        loaded: Mutex::new(Loaded {
            complete: vec![false; ndev],
            ended: false,
            all_complete: false,
            exited: 0,
            ch0_released: false,
        }),
        loaded_cv: Condvar::new(),
        validate_cv: (0..ndev).map(|_| Condvar::new()).collect(),
        released: Mutex::new(false),
        release_cv: Condvar::new(),
    };
    std::thread::scope(|s| {
        // Whatever happens in this closure (a panic too), the threads are let go before the
        // scope joins them.
        let _release = ReleaseOnDrop(&shared);
        // A validator that cannot be spawned leaves its device to `validate_targets`.
        let validators: Vec<_> = devices
            .iter()
            .map(|&d| {
                let shared = &shared;
                std::thread::Builder::new().name("vfmfd-validate".into()).spawn_scoped(s, move || {
                    shared.validator(d);
                    shared.wait_release();
                })
            })
            .filter_map(std::result::Result::ok)
            .collect();
        let mut handles = Vec::with_capacity(workers);
        spawn_workers(s, &shared, &mut handles);
        spawn_writers(s, &shared, &mut handles);
        if shared.wait_complete(handles.len()) {
            shared.endgame(handles.len());
        }
        shared.release();
        for h in handles {
            if h.join().is_err() {
                shared.fail(Error::sys("receive thread", std::io::Error::other("panicked")));
            }
        }
        shared.end_validators();
        for v in validators {
            // A validator that panicked left its device without an outcome: `validate_targets`
            // reports it.
            let _ = v.join();
        }
    });
    if !shared.leaked.load(Ordering::SeqCst) {
        // SAFETY: every worker has returned and reaped all its operations (none leaked), so no
        // operation refers to the pool any more; it is taken once, here. The rings that
        // registered it are released before it (`Deferred`'s order).
        let pool = unsafe { ManuallyDrop::take(&mut shared.pool) };
        run.deferred.keep_pool(pool);
    }
    shared.st.into_inner().unwrap_or_else(|p| p.into_inner()).finish()
}

/// Starts the receive workers; each counts as exited when it returns (`ExitNote`), and then
/// waits for the release.
fn spawn_workers<'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    shared: &'scope Shared<'_, '_, '_, '_, '_>,
    handles: &mut Vec<std::thread::ScopedJoinHandle<'scope, ()>>,
) {
    for w in 0..shared.workers {
        let h = spawn_counted(s, shared, format!("vfmfd-rx-{w}"), w == 0, move || worker(shared, w));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => shared.fail(Error::sys("spawn receive worker", e)),
        }
    }
}

/// Starts the writer thread of every device written by one ([`WriteMode::Thread`]); each counts
/// as exited like a worker, and joins with the workers.
fn spawn_writers<'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    shared: &'scope Shared<'_, '_, '_, '_, '_>,
    handles: &mut Vec<std::thread::ScopedJoinHandle<'scope, ()>>,
) {
    for d in DeviceIndex::all(shared.modes.len()).filter(|d| shared.modes[d.index()] == WriteMode::Thread) {
        let h = spawn_counted(s, shared, format!("vfmfd-wr-{}", d.index()), false, move || writer(shared, d));
        match h {
            Ok(h) => handles.push(h),
            Err(e) => shared.fail(Error::sys("spawn receive writer", e)),
        }
    }
}

/// A worker or writer thread running `body`: its failure fails the receive, its return counts
/// as exited (`ExitNote`; `ch0`: it is the worker of channel 0), and it then waits for the
/// release.
fn spawn_counted<'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    shared: &'scope Shared<'_, '_, '_, '_, '_>,
    name: String,
    ch0: bool,
    body: impl FnOnce() -> Result<()> + Send + 'scope,
) -> std::io::Result<std::thread::ScopedJoinHandle<'scope, ()>> {
    std::thread::Builder::new().name(name).spawn_scoped(s, move || {
        {
            let _note = ExitNote(&shared.loaded, &shared.loaded_cv, ch0);
            if let Err(e) = body() {
                shared.fail(e);
            }
        }
        shared.wait_release();
    })
}

/// Device `d`'s writer thread (a regular-file sink): writes its packets in index order as they
/// become writable, frees their memory and kicks the workers with parked channels.
fn writer(shared: &Shared<'_, '_, '_, '_, '_>, d: DeviceIndex) -> Result<()> {
    let mut base = 0u64;
    loop {
        let next = {
            let mut g = shared.lock();
            loop {
                match g.writer_next(d, shared.run.abort.is_aborted()) {
                    WriterNext::Write(w) => break w,
                    WriterNext::End => return Ok(()),
                    WriterNext::Wait => {}
                }
                g = shared.wake[d.index()].wait_timeout(g, TICK).unwrap_or_else(|p| p.into_inner()).0;
            }
        };
        match next {
            NextWrite::Data { head, len, idx } => {
                write_packet(shared, d, (head, len, idx), base)?;
                base += len as u64;
                shared.run.progress.add(len as u64);
            }
            NextWrite::Config { head, len } => apply_config(shared, d, head, len)?,
            NextWrite::Marker { .. } => {
                let id = shared.lock().reassembly.id(d).clone();
                shared.run.initial_data_loaded(&id)?;
            }
        }
        if matches!(next, NextWrite::Config { .. }) {
            shared.loaded(d);
        }
        shared.written(usize::MAX, d);
        shared.clock.touch();
    }
}

/// Writes data packet `idx` (chain `head`, `len` bytes, at stream offset `base`) to device `d`
/// with `write(2)`, one contiguous piece at a time.
fn write_packet(
    shared: &Shared<'_, '_, '_, '_, '_>,
    d: DeviceIndex,
    (head, len, idx): (u32, usize, PacketIndex),
    base: u64,
) -> Result<()> {
    use crate::blocking::{write_all, Bounds, Fail};
    let mut t = shared.target(d);
    let fd = t.data_fd().ok_or_else(|| Error::internal("a device is written outside RESUMING"))?;
    let b = Bounds { abort: &shared.run.abort, stall: shared.run.cfg.stall_timeout, clock: Some(&shared.clock) };
    let (mut off, mut short) = (0, 0);
    let mut r = Ok(());
    while off < len {
        let p = shared.lock().reassembly.piece(head, off, true);
        // SAFETY: the packet is Ready: its receives completed, and only this writer refers to
        // its blocks until `written` frees them; the pool stays mapped for the whole receive.
        let buf = unsafe { shared.pool.span(p.block as usize, p.at, p.len) };
        r = write_all(&crate::sys::Kernel, fd, buf, b, &mut short).map_err(|(at, f)| (off + at, f));
        if r.is_err() {
            break;
        }
        off += p.len;
    }
    t.short_writes += short;
    r.map_err(|(at, f)| match f {
        Fail::Aborted => Error::Aborted,
        Fail::Stalled => Error::Timeout {
            what: format!("device {}: its sink accepts nothing", t.id),
            after: shared.run.cfg.stall_timeout,
        },
        Fail::Os(source) => Error::DeviceWrite { device: t.id.clone(), idx, offset: base + at as u64, source },
        Fail::Eof { .. } => Error::internal("a write reported an end of stream"),
    })
}

/// Applies device `d`'s config blob, held in chain `head`: in place when the chain is one
/// contiguous range (the usual case), else gathered into one buffer (once per device).
fn apply_config(shared: &Shared<'_, '_, '_, '_, '_>, d: DeviceIndex, head: u32, len: usize) -> Result<()> {
    let pieces: Vec<_> = {
        let g = shared.lock();
        let mut out = Vec::new();
        let mut off = 0;
        while off < len {
            let p = g.reassembly.piece(head, off, true);
            off += p.len;
            out.push(p);
        }
        out
    };
    let one = |p: crate::receiver::reassembly::Piece| -> &[u8] {
        // SAFETY: the config chain is Ready: its receives completed, and nothing else refers
        // to its blocks until `written` frees them after this call.
        unsafe { shared.pool.span(p.block as usize, p.at, p.len) }
    };
    let blob: std::borrow::Cow<'_, [u8]> = match pieces[..] {
        [] => std::borrow::Cow::Borrowed(&[]),
        [p] => std::borrow::Cow::Borrowed(one(p)),
        _ => std::borrow::Cow::Owned(pieces.iter().flat_map(|&p| one(p).iter().copied()).collect()),
    };
    shared.target(d).apply_config(&blob)
}

/// A channel's receive state; each variant carries what that state needs.
#[derive(Debug, Clone, Copy)]
enum Chan {
    /// Not connected yet (its fixed file is empty until its init packet is valid).
    Waiting,
    /// Receiving a header into the channel's header buffer.
    Header { got: usize },
    /// Receiving a payload into an admitted packet's blocks.
    Payload { a: Admitted, got: usize },
    /// The header (still in the channel's header buffer, which no receive touches now) waits
    /// for memory.
    Parked,
    /// The peer closed the channel at a packet boundary.
    Closed,
}

/// How a device's writes are issued, by what its fd supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteMode {
    /// `IOSQE_ASYNC`: straight to io-wq (an fd without `FMODE_NOWAIT`, e.g. a VFIO resume fd,
    /// whose non-blocking attempt would only fail first).
    Async,
    /// Submitted plainly: the kernel completes it inline, or arms a poll when the fd is full
    /// (pipes, sockets).
    Inline,
    /// `write(2)` on the device's own writer thread (a regular file: io_uring would hand every
    /// buffered write to io-wq on filesystems without async buffered writes, such as tmpfs, and
    /// a write on a worker would hold up the receives of that worker's channels meanwhile).
    Thread,
}

/// A device's write mode, by its fd's kind.
fn write_mode(fd: Option<std::os::fd::BorrowedFd<'_>>) -> WriteMode {
    use crate::sys::FdKind;
    match fd.map_or(FdKind::Other, crate::sys::fd_kind) {
        FdKind::Other => WriteMode::Async,
        FdKind::Regular => WriteMode::Thread,
        FdKind::Pipe | FdKind::Socket => WriteMode::Inline,
    }
}

/// A device write this worker has in flight.
#[derive(Debug, Clone, Copy)]
struct Write {
    /// The packet's block chain.
    head: u32,
    len: usize,
    off: usize,
    /// Bytes of the write in flight (one contiguous piece of the chain).
    chunk: usize,
    idx: PacketIndex,
    /// Stream offset of the packet's first byte.
    base: u64,
}

struct Worker<'w, 'r, 's, 'c, 'a, 'shared> {
    /// Leaked together with `hdrs` and `kick_buf` when the kernel did not give every
    /// operation back.
    uring: ManuallyDrop<Uring>,
    shared: &'w Shared<'r, 's, 'c, 'a, 'shared>,
    me: usize,
    /// Global ids of this worker's channels; local index `i` is fixed file `i`.
    chans: Vec<ChannelId>,
    /// Per local channel, the header being received. Cells: the kernel writes one entry while
    /// this thread reads another, so no reference to the whole slice's bytes is ever made.
    hdrs: ManuallyDrop<Box<[UnsafeCell<[u8; PACKET_OVERHEAD]>]>>,
    ch: Vec<Chan>,
    /// Writes this worker has in flight, per device.
    wr: Vec<Option<Write>>,
    kick_buf: ManuallyDrop<Box<u64>>,
    need_unpark: bool,
    registered: bool,
    retries: Retries,
    /// Per local channel: when its payload receive was submitted, and whether a harvest
    /// (`K_HARVEST`) was issued for it.
    recv_since: Vec<Option<(Instant, bool)>>,
}

impl Drop for Worker<'_, '_, '_, '_, '_, '_> {
    fn drop(&mut self) {
        if self.uring.busy() {
            // The kernel may still write into these and into the shared pool: leak them, and keep
            // the pool mapped, rather than free them.
            self.shared.leaked.store(true, Ordering::SeqCst);
            return;
        }
        // SAFETY: taken or dropped exactly once, here, after `finish` reaped every operation;
        // the ring goes first. It is kept (registered buffers, files) until after the
        // switchover, with nothing in flight.
        unsafe {
            self.shared.run.deferred.keep_ring(ManuallyDrop::take(&mut self.uring));
            ManuallyDrop::drop(&mut self.hdrs);
            ManuallyDrop::drop(&mut self.kick_buf);
        }
    }
}

fn worker(shared: &Shared<'_, '_, '_, '_, '_>, me: usize) -> Result<()> {
    let ring = Ring::new(SQ_ENTRIES, CQ_ENTRIES).map_err(|e| Error::sys(describe_setup_error(&e), e))?;
    // SAFETY: the pool lives in `Shared`, which outlives every worker (scoped threads), and it
    // is unmapped only if every worker reaped all its operations.
    let registered = match unsafe { ring.register_pool(&shared.pool) } {
        Ok(()) => true,
        // ENOMEM: RLIMIT_MEMLOCK cannot pin the pool (once per worker ring, without
        // CAP_IPC_LOCK). Plain WRITE from the same memory needs no pinning.
        Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => false,
        Err(e) => return Err(Error::sys("IORING_REGISTER_BUFFERS for the receive budget", e)),
    };
    let chans: Vec<ChannelId> = ChannelId::all(shared.run.channels.count()).skip(me).step_by(shared.workers).collect();
    let ndev = shared.targets.len();
    // Fixed files: channels 0..C (empty until connected), devices C..C+D, abort, kick.
    let present: Vec<Option<i32>> = chans.iter().map(|&c| shared.run.channels.get(c).map(|f| f.as_raw_fd())).collect();
    let mut files: Vec<i32> = present.iter().map(|f| f.unwrap_or(-1)).collect();
    files.extend(shared.data_fds.iter().map(|f| f.as_ref().map_or(-1, AsRawFd::as_raw_fd)));
    files.push(shared.run.abort.as_fd().as_raw_fd());
    files.push(shared.run.channels.kicks[me].as_fd().as_raw_fd());
    ring.register_files(&files).map_err(|e| Error::sys("IORING_REGISTER_FILES", e))?;
    let _ = ring.limit_workers(2, 2);
    let nloc = chans.len();
    let abort_fixed = (nloc + ndev) as u32;
    let mut w = Worker {
        uring: ManuallyDrop::new(Uring::new(ring, abort_fixed)),
        shared,
        me,
        hdrs: ManuallyDrop::new((0..nloc).map(|_| UnsafeCell::new([0u8; PACKET_OVERHEAD])).collect()),
        ch: present.iter().map(|f| if f.is_some() { Chan::Header { got: 0 } } else { Chan::Waiting }).collect(),
        chans,
        wr: vec![None; ndev],
        kick_buf: ManuallyDrop::new(Box::new(0)),
        need_unpark: false,
        registered,
        retries: Retries::default(),
        recv_since: vec![None; nloc],
    };
    let r =
        w.prepare().and_then(|()| uring::run(&mut w, &shared.run.abort, &shared.clock, shared.run.cfg.stall_timeout));
    let f = uring::finish(&mut w, &format_args!("receive worker {me}"));
    if w.uring.busy() {
        shared.leaked.store(true, Ordering::SeqCst);
    }
    r.and(f)
}

impl Driver for Worker<'_, '_, '_, '_, '_, '_> {
    fn uring(&mut self) -> &mut Uring {
        &mut self.uring
    }

    fn pump(&mut self) -> Result<bool> {
        if std::mem::take(&mut self.need_unpark) {
            self.unpark()?;
        }
        self.harvest()?;
        let own_writes = self.wr.iter().any(Option::is_some);
        let g = self.shared.lock();
        // A channel that never connected ends when the core gives up on it (every device
        // completed without it).
        let ended = |(c, gc): (&Chan, &ChannelId)| match c {
            Chan::Closed => true,
            Chan::Waiting => g.is_closed(*gc),
            _ => false,
        };
        // Once every device completed, channels still open (QEMU leaves them open) are not
        // waited for: their receives are cancelled by `finish`.
        if (g.complete() || self.ch.iter().zip(&self.chans).all(ended)) && !own_writes {
            return Ok(true);
        }
        g.check_budget(self.shared.clock.idle_for(), reorder_wait(self.shared.run.cfg.stall_timeout))?;
        Ok(false)
    }

    fn complete(&mut self, tok: Token, c: Completion) -> Result<()> {
        match tok.kind {
            K_KICK => match c.res {
                // Cancelled at teardown.
                r if r == -libc::ECANCELED => Ok(()),
                // EAGAIN: another reader drained the counter; EINTR: nothing happened.
                r if r >= 0 || r == -libc::EAGAIN || r == -libc::EINTR => {
                    self.arm_kick()?;
                    self.adopt()?;
                    self.unpark()
                }
                r => Err(Error::sys("read receive-worker kick eventfd", crate::uring::cqe_error(r))),
            },
            K_RECV => {
                let r = self.on_recv(tok.at(), c.res);
                self.settle(tok.at(), r)
            }
            K_WRITE => self.on_write(DeviceIndex::new(tok.at()), c.res),
            // The poll's outcome shows in the write linked after it.
            K_WPOLL => Ok(()),
            // The cancelled receive reports what it got.
            K_HARVEST => Ok(()),
            k => Err(Error::internal(format!("receive completion of unknown kind {k}"))),
        }
    }

    fn progress(&self, tok: Token, c: &Completion) -> bool {
        match tok.kind {
            K_HARVEST => false,
            K_RECV => c.res != -libc::ECANCELED,
            _ => true,
        }
    }

    fn retire(&mut self, tok: Token, c: Completion) {
        // The skeleton's in-flight accounting is all a failed worker needs.
        if tok.kind == K_RECV {
            self.note_late(tok.at(), c.res);
        }
    }

    fn stall_report(&self) -> String {
        self.shared.lock().stall_report()
    }

    /// Until every channel connected, waiting is channel set-up, bounded by the accept timeout
    /// (the set-up thread's), not a stall.
    fn idle(&self) -> bool {
        !self.shared.run.channels.all_arrived()
    }
}

impl Worker<'_, '_, '_, '_, '_, '_> {
    fn device_file(&self, d: DeviceIndex) -> types::Fixed {
        types::Fixed((self.chans.len() + d.index()) as u32)
    }

    fn kick_file(&self) -> types::Fixed {
        types::Fixed((self.chans.len() + self.wr.len() + 1) as u32)
    }

    fn prepare(&mut self) -> Result<()> {
        self.arm_kick()?;
        for i in 0..self.chans.len() {
            self.recv_next(i)?;
        }
        self.adopt()
    }

    fn push(&mut self, entries: &[squeue::Entry]) -> Result<()> {
        // SAFETY: every entry built in this file points into the shared pool (alive for the
        // whole receive and unmapped only if every worker drained), a boxed header or kick
        // buffer owned by this worker until `finish` (leaked with the ring otherwise), or
        // nothing; fixed files stay registered for the ring's life.
        unsafe { self.uring.push(entries) }
    }

    fn arm_kick(&mut self) -> Result<()> {
        let buf: *mut u64 = &mut **self.kick_buf;
        let e = opcode::Read::new(self.kick_file(), buf.cast(), 8).build().user_data(Token::new(K_KICK, 0, 0).encode());
        self.push(&[e])
    }

    fn recv_next(&mut self, i: usize) -> Result<()> {
        let (ptr, len) = match self.ch[i] {
            // SAFETY: `got < PACKET_OVERHEAD`: inside the channel's header cell.
            Chan::Header { got } => (unsafe { self.hdrs[i].get().cast::<u8>().add(got) }, PACKET_OVERHEAD - got),
            Chan::Payload { a, got } => {
                // The next contiguous piece of the packet's blocks (`got < a.len`).
                let piece = self.shared.lock().reassembly.piece(a.head, got, true);
                (self.shared.pool.span_ptr(piece.block as usize, piece.at, piece.len), piece.len)
            }
            Chan::Waiting | Chan::Parked | Chan::Closed => return Ok(()),
        };
        self.recv_since[i] = matches!(self.ch[i], Chan::Payload { .. }).then(|| (Instant::now(), false));
        let e = opcode::Recv::new(types::Fixed(i as u32), ptr, len as u32)
            .flags(libc::MSG_WAITALL)
            .build()
            .user_data(Token::new(K_RECV, i, 0).encode());
        self.push(&[e])
    }

    /// Cancels every payload receive in flight for longer than a quarter of the stall timeout
    /// (once per submission), so its partial bytes count as progress (see [`K_HARVEST`]).
    fn harvest(&mut self) -> Result<()> {
        let after = (self.shared.run.cfg.stall_timeout / 4).max(TICK);
        for i in 0..self.recv_since.len() {
            let Some((t, false)) = self.recv_since[i] else { continue };
            if t.elapsed() < after {
                continue;
            }
            self.recv_since[i] = Some((t, true));
            let e = opcode::AsyncCancel::new(Token::new(K_RECV, i, 0).encode())
                .build()
                .user_data(Token::new(K_HARVEST, i, 0).encode());
            self.push(&[e])?;
        }
        Ok(())
    }

    /// After every device completed, a receive that still got bytes (or a reset) is worth a
    /// warning, and is not read as packets; on channel 0 it is kept for the commit (the
    /// source's FIN there is the commit; an EOF stays visible, a reset is reported once).
    /// Returns whether it was such a receive.
    fn note_late(&self, i: usize, res: i32) -> bool {
        if res == 0 || res == -libc::ECANCELED || !self.shared.lock().complete() {
            return false;
        }
        let what =
            if res > 0 { format!("{res} byte(s) received") } else { format!("{}", crate::uring::cqe_error(res)) };
        self.shared.lock().late(self.chans[i], &what);
        if self.chans[i] == ChannelId::new(0) {
            let got = usize::try_from(res).map_err(|_| crate::uring::cqe_error(res));
            *self.shared.run.ch0_after.lock().unwrap_or_else(|p| p.into_inner()) = Some(got);
        }
        true
    }

    fn on_recv(&mut self, i: usize, res: i32) -> Result<()> {
        let gc = self.chans[i];
        self.recv_since[i] = None;
        if self.note_late(i, res) {
            return Ok(());
        }
        if res == -libc::ECANCELED {
            // A harvest found nothing received yet (only harvests cancel a receive while the
            // loop runs): receive again.
            return self.recv_next(i);
        }
        let n = match classify(from_cqe(res)) {
            IoStep::Moved(n) => n,
            IoStep::End => return self.on_eof(i),
            // Nothing happened; receive again.
            IoStep::Retry | IoStep::WaitReady => return self.recv_next(i),
            IoStep::Fatal(e) => {
                let op = match &self.ch[i] {
                    Chan::Payload { a, .. } => {
                        format!("receive packet {} of {}", a.idx, self.shared.lock().reassembly.id(a.dev))
                    }
                    _ => "receive packet header".to_string(),
                };
                return Err(Error::Channel { channel: gc, op, source: e });
            }
        };
        match self.ch[i] {
            Chan::Header { got } if got + n < PACKET_OVERHEAD => {
                self.ch[i] = Chan::Header { got: got + n };
                self.recv_next(i)
            }
            Chan::Header { .. } => {
                let (h, v) = self.decode(i)?;
                self.shared.run.counters[gc.index()]
                    .add(u64::from(h.next_packet_size) + DEVICE_STATE_HEADER_LEN as u64);
                self.offer(i, &h, v)
            }
            Chan::Payload { a, got } if got + n < a.len => {
                self.ch[i] = Chan::Payload { a, got: got + n };
                self.recv_next(i)
            }
            Chan::Payload { a, .. } => self.payload_done(i, a),
            Chan::Waiting | Chan::Parked | Chan::Closed => {
                Err(Error::internal(format!("a receive completed on channel {gc} with no receive in flight")))
            }
        }
    }

    fn on_eof(&mut self, i: usize) -> Result<()> {
        let gc = self.chans[i];
        let during = match &self.ch[i] {
            Chan::Header { got: 0 } => {
                self.ch[i] = Chan::Closed;
                self.shared.lock().close(gc);
                return Ok(());
            }
            Chan::Header { got } => Stage::Header { got: *got },
            Chan::Payload { a, got } => Stage::Payload {
                device: self.shared.lock().reassembly.id(a.dev).clone(),
                idx: a.idx,
                got: *got,
                len: a.len,
            },
            Chan::Waiting | Chan::Parked | Chan::Closed => {
                return Err(Error::internal("end of stream with no receive in flight"))
            }
        };
        Err(Error::ChannelClosed { channel: gc, during })
    }

    fn decode(&self, i: usize) -> Result<(DeviceStateHeader, VfioPacketHeader)> {
        // SAFETY: no receive is in flight for channel `i` (its header RECV completed, or the
        // channel is parked): the kernel does not write this entry now.
        let hdr = unsafe { &*self.hdrs[i].get() };
        self.shared.run.decode_header(self.chans[i], hdr)
    }

    fn offer(&mut self, i: usize, h: &DeviceStateHeader, v: VfioPacketHeader) -> Result<()> {
        let gc = self.chans[i];
        let admit = self.shared.lock().admit(gc, h, v)?;
        match admit {
            Admit::Accept(a) if a.len == 0 => self.payload_done(i, a),
            Admit::Accept(a) => {
                self.ch[i] = Chan::Payload { a, got: 0 };
                self.recv_next(i)
            }
            Admit::Wait(_) => {
                self.ch[i] = Chan::Parked;
                Ok(())
            }
        }
    }

    fn payload_done(&mut self, i: usize, a: Admitted) -> Result<()> {
        self.shared.lock().received(self.chans[i], a);
        self.ch[i] = Chan::Header { got: 0 };
        self.recv_next(i)?;
        self.try_write(a.dev)
    }

    fn try_write(&mut self, d: DeviceIndex) -> Result<()> {
        if self.shared.modes[d.index()] == WriteMode::Thread {
            // Its writer thread writes it (the state changed under the lock before this).
            self.shared.wake[d.index()].notify_one();
            return Ok(());
        }
        loop {
            let (next, base) = {
                let mut g = self.shared.lock();
                (g.reassembly.next_write(d), g.reassembly.counters(d).data_bytes)
            };
            match next {
                None => return Ok(()),
                Some(NextWrite::Data { head, len, idx }) if len > 0 => {
                    self.wr[d.index()] = Some(Write { head, len, off: 0, chunk: 0, idx, base });
                    return self.submit_write(d, false);
                }
                // An empty data packet: nothing to write.
                Some(NextWrite::Data { .. }) => self.written(d),
                Some(NextWrite::Marker { .. }) => {
                    let id = self.shared.lock().reassembly.id(d).clone();
                    self.shared.run.initial_data_loaded(&id)?;
                    self.written(d);
                }
                Some(NextWrite::Config { head, len }) => {
                    apply_config(self.shared, d, head, len)?;
                    // Its validator first: `written` may complete the receive and start the
                    // endgame.
                    self.shared.loaded(d);
                    self.written(d);
                }
            }
            // Memory was freed: this worker's parked channels retry after this batch.
            self.need_unpark = true;
        }
    }

    fn written(&mut self, d: DeviceIndex) {
        self.shared.written(self.me, d);
    }

    fn submit_write(&mut self, d: DeviceIndex, poll_first: bool) -> Result<()> {
        let w = self.wr[d.index()].ok_or_else(|| Error::internal("a write without its packet"))?;
        // The next contiguous piece of the packet's blocks (`off < len`).
        let piece = self.shared.lock().reassembly.piece(w.head, w.off, true);
        let ptr = self.shared.pool.span_ptr(piece.block as usize, piece.at, piece.len);
        self.wr[d.index()] = Some(Write { chunk: piece.len, ..w });
        let fd = self.device_file(d);
        let len = piece.len as u32;
        let mode = self.shared.modes[d.index()];
        let e = if self.registered {
            opcode::WriteFixed::new(fd, ptr, len, 0).offset(u64::MAX).build()
        } else {
            opcode::Write::new(fd, ptr, len).offset(u64::MAX).build()
        }
        .user_data(Token::new(K_WRITE, d.index(), 0).encode());
        // IOSQE_ASYNC only for an fd that cannot do non-blocking I/O (a VFIO resume fd): its
        // inline attempt would fail and go to io-wq anyway.
        let e = if mode == WriteMode::Async { e.flags(squeue::Flags::ASYNC) } else { e };
        if !poll_first {
            return self.push(&[e]);
        }
        let poll = opcode::PollAdd::new(fd, libc::POLLOUT as u32)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(Token::new(K_WPOLL, d.index(), 0).encode());
        self.push(&[poll, e])
    }

    fn on_write(&mut self, d: DeviceIndex, res: i32) -> Result<()> {
        let w = self.wr[d.index()].ok_or_else(|| Error::internal("a write completed that was not issued"))?;
        let fail = |source| Error::DeviceWrite {
            device: self.shared.lock().reassembly.id(d).clone(),
            idx: w.idx,
            offset: w.base + w.off as u64,
            source,
        };
        let n = match classify_write(from_cqe(res)) {
            IoStep::Moved(n) => n,
            IoStep::Retry => {
                self.retries.again().map_err(fail)?;
                return self.submit_write(d, false);
            }
            // An O_NONBLOCK resume fd that is full: wait for POLLOUT, never spin.
            IoStep::WaitReady => return self.submit_write(d, true),
            IoStep::Fatal(e) => return Err(fail(e)),
            IoStep::End => return Err(Error::internal("classify_write returned End")),
        };
        self.retries.reset();
        let off = w.off + n;
        if off < w.len {
            if n < w.chunk {
                self.shared.target(d).short_writes += 1;
            }
            self.wr[d.index()] = Some(Write { off, ..w });
            return self.submit_write(d, false);
        }
        self.wr[d.index()] = None;
        self.shared.run.progress.add(w.len as u64);
        self.written(d);
        self.try_write(d)?;
        self.unpark()
    }

    /// Memory was freed: this worker's parked channels try again.
    fn unpark(&mut self) -> Result<()> {
        for i in 0..self.ch.len() {
            if matches!(self.ch[i], Chan::Parked) {
                let (h, v) = self.decode(i)?;
                let r = self.offer(i, &h, v);
                self.settle(i, r)?;
            }
        }
        Ok(())
    }

    /// The outcome of channel `i`'s last step: a failure goes to the core, which says whether
    /// it fails the receive or only ends the channel (no receive is in flight on it then).
    fn settle(&mut self, i: usize, r: Result<()>) -> Result<()> {
        let Err(e) = r else { return Ok(()) };
        self.shared.lock().channel_failed(self.chans[i], e)?;
        self.ch[i] = Chan::Closed;
        Ok(())
    }

    /// Channels that connected since the last look: each takes its place in the fixed-file
    /// table and starts receiving (unless the core no longer needs it).
    fn adopt(&mut self) -> Result<()> {
        for i in 0..self.ch.len() {
            if !matches!(self.ch[i], Chan::Waiting) {
                continue;
            }
            let gc = self.chans[i];
            let Some(fd) = self.shared.run.channels.get(gc) else { continue };
            if self.shared.lock().is_closed(gc) {
                continue;
            }
            self.uring
                .update_files(i as u32, &[fd.as_raw_fd()])
                .map_err(|e| Error::sys("IORING_REGISTER_FILES_UPDATE for a new channel", e))?;
            self.ch[i] = Chan::Header { got: 0 };
            self.recv_next(i)?;
        }
        Ok(())
    }
}
