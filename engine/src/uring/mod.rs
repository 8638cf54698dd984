//! io_uring: the ring wrapper (`ring`), and the one event-loop skeleton that the source's
//! device loops and the receiver's workers both run.
//!
//! The skeleton owns everything that is not specific to a side:
//!
//! * **Tokens.** Every SQE's `user_data` is a [`Token`]: an op kind, a slot or channel index,
//!   and a generation. The skeleton's own kinds ([`Token::ABORT`], [`Token::CANCEL`]) are
//!   below [`Token::FIRST_DRIVER_KIND`]; a kind a driver does not know is a bug and fails the
//!   loop (it is never ignored).
//! * **In-flight accounting.** `push` counts SQEs; every CQE without `F_MORE` retires one; a
//!   CQE with `F_MORE` announces a SEND_ZC notification, which the skeleton remembers by
//!   token. A notification whose token it does not remember is the stray one of a SEND_ZC
//!   that a broken link cancelled (on 6.18 it completes `-ECANCELED` without `F_MORE` and a
//!   notification still follows): it refers to no buffer and is dropped here, so a driver
//!   never sees it and can never release a reused buffer because of it.
//! * **The loop.** Check abort → let the driver schedule (`pump`) → submit and wait at most
//!   one [`TICK`] → reap batches into a fixed local array → dispatch each completion → on an
//!   error, account the rest of the batch and of the CQ without acting on it → when nothing
//!   completed, check the stall clock.
//! * **Teardown.** `finish` cancels everything still in flight and reaps for at most
//!   [`DRAIN_LIMIT`]; if the kernel still holds operations then, the ring is leaked on purpose
//!   (its registered buffers stay pinned) and the caller must not unmap any memory an
//!   operation may use: unmapping memory the kernel may still write is worse than a leak.

mod ring;

use std::mem::ManuallyDrop;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};

pub(crate) use ring::{cqe_error, describe_setup_error, uring_unavailable_reason, Completion, Ring, OPS};
pub(crate) use ring::{NOTIF_USAGE_ZC_COPIED, ZC_REPORT_USAGE};

use crate::abort::AbortHandle;
pub(crate) use crate::backend::StallClock;
use crate::error::{Error, Result};
use crate::pool::BufferPool;

/// How often a waiting loop wakes to re-check abort and the stall clock when nothing happens.
pub(crate) const TICK: Duration = crate::backend::TICK;

/// Longest teardown drain before a ring is leaked.
pub(crate) const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Completions reaped per batch (a fixed local array: reaping never allocates).
const BATCH: usize = 64;

/// Entries of every ring the engine creates: submission queue, completion queue.
pub(crate) const SQ_ENTRIES: u32 = 64;
pub(crate) const CQ_ENTRIES: u32 = 256;

/// An SQE's `user_data`: `kind << 56 | index << 32 | generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    /// The op kind (the skeleton's, or a driver's from [`Token::FIRST_DRIVER_KIND`]).
    pub(crate) kind: u8,
    /// Slot, channel or device index, as the kind defines.
    pub(crate) index: u16,
    /// The slot's generation at submission.
    pub(crate) gen: u32,
}

impl Token {
    /// The skeleton's `POLL_ADD` on the abort eventfd.
    pub(crate) const ABORT: u8 = 0;
    /// The skeleton's `ASYNC_CANCEL` at teardown.
    pub(crate) const CANCEL: u8 = 1;
    /// Drivers number their kinds from here.
    pub(crate) const FIRST_DRIVER_KIND: u8 = 2;

    /// A token.
    pub(crate) fn new(kind: u8, index: usize, gen: u32) -> Token {
        debug_assert!(index <= usize::from(u16::MAX));
        Token { kind, index: index as u16, gen }
    }

    pub(crate) fn encode(self) -> u64 {
        (u64::from(self.kind) << 56) | (u64::from(self.index) << 32) | u64::from(self.gen)
    }

    pub(crate) fn decode(v: u64) -> Token {
        Token { kind: (v >> 56) as u8, index: (v >> 32) as u16, gen: v as u32 }
    }

    /// The slot/channel/device index as a table position.
    pub(crate) fn at(self) -> usize {
        usize::from(self.index)
    }
}

/// The side-specific part of a loop: what to schedule and what a completion means.
pub(crate) trait Driver {
    /// The ring the driver pushes to.
    fn uring(&mut self) -> &mut Uring;
    /// Schedules whatever can run now. `Ok(true)`: the work is complete and the loop returns.
    fn pump(&mut self) -> Result<bool>;
    /// Acts on one completion of a driver kind. A kind or generation that cannot occur is a
    /// bug: return [`Error::Internal`].
    fn complete(&mut self, tok: Token, c: Completion) -> Result<()>;
    /// Bookkeeping only, after a failure: a completion that will not be acted on.
    fn retire(&mut self, tok: Token, c: Completion);
    /// Why the loop stalled, for the error (who waits for what).
    fn stall_report(&self) -> String;
    /// Whether the loop waits for something that is not progress (a command, an idle device):
    /// such a wait never counts as a stall.
    fn idle(&self) -> bool {
        false
    }
    /// The longest the next wait may take (at most [`TICK`]): a driver that must act at a
    /// given time (an idle pre-copy's next poll) says so.
    fn wait_limit(&self) -> Duration {
        TICK
    }
    /// Whether a completion of a driver kind is progress for the stall clock (default: every
    /// completion is). A driver's own bookkeeping operations (a cancel that collects a long
    /// receive's partial bytes) say no, so that they never hide a stall.
    fn progress(&self, _tok: Token, _c: &Completion) -> bool {
        true
    }
}

/// Rings and pools a transfer is done with, released only when the transfer returns (after
/// the switchover, not inside it). Closing a ring (the kernel unpins its registered buffers and
/// ends its io-wq) and unmapping a touched pool cost 0.1 to 1.5 ms each here (2 CPUs), and a
/// device thread or receive worker that did it as it finished took that time from the last
/// devices' transfer, their validation and their start. Only idle rings are kept: nothing is
/// in flight, and no buffer of a kept pool is in use.
#[derive(Default)]
pub(crate) struct Deferred {
    // Field order is drop order: the rings before the pools they registered.
    rings: Mutex<Vec<Uring>>,
    pools: Mutex<Vec<BufferPool>>,
}

impl Deferred {
    /// Keeps an idle ring (no operation in flight) until `self` is dropped.
    pub(crate) fn keep_ring(&self, ring: Uring) {
        debug_assert!(!ring.busy(), "a ring with operations in flight is kept, not leaked");
        self.rings.lock().unwrap_or_else(|p| p.into_inner()).push(ring);
    }

    /// Keeps a pool no operation refers to until `self` is dropped (after the rings).
    pub(crate) fn keep_pool(&self, pool: BufferPool) {
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).push(pool);
    }
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred").finish_non_exhaustive()
    }
}

/// A ring plus the skeleton's accounting of what the kernel still owns.
pub(crate) struct Uring {
    /// Leaked (never dropped) when the kernel did not give every operation back.
    ring: ManuallyDrop<Ring>,
    /// Operations that will still produce a CQE.
    inflight: usize,
    /// Tokens of SEND_ZC requests whose notification is still due (bounded by the SQEs the
    /// driver can have in flight; allocated once).
    notifs: Vec<u64>,
    leaked: bool,
    abort_fixed: u32,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring").field("inflight", &self.inflight).field("leaked", &self.leaked).finish()
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if !self.busy() {
            // SAFETY: dropped once, here; nothing is in flight (every operation was reaped).
            unsafe { ManuallyDrop::drop(&mut self.ring) };
        }
    }
}

impl Uring {
    /// Wraps `ring`, whose fixed file `abort_fixed` is the abort eventfd.
    pub(crate) fn new(ring: Ring, abort_fixed: u32) -> Uring {
        Uring {
            ring: ManuallyDrop::new(ring),
            inflight: 0,
            notifs: Vec::with_capacity(CQ_ENTRIES as usize),
            leaked: false,
            abort_fixed,
        }
    }

    /// Replaces fixed files from `offset` (see [`Ring::update_files`]).
    ///
    /// # Errors
    /// The kernel's errno.
    pub(crate) fn update_files(&self, offset: u32, fds: &[std::os::fd::RawFd]) -> std::io::Result<()> {
        self.ring.update_files(offset, fds)
    }

    /// Whether the kernel may still use buffers this ring's operations refer to: the ring was
    /// leaked at teardown, or operations are still in flight (an unwind skipped `finish`).
    /// Their owners must then leak those buffers too.
    pub(crate) fn busy(&self) -> bool {
        self.leaked || self.inflight > 0
    }

    /// Queues `entries` (one linked chain at most) and counts them in flight.
    ///
    /// # Safety
    /// As [`Ring::push`]: every buffer and fd an entry refers to stays valid until its last CQE
    /// (for SEND_ZC, its notification), which `finish` guarantees by draining or leaking.
    pub(crate) unsafe fn push(&mut self, entries: &[squeue::Entry]) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.ring.push(entries) }.map_err(|e| Error::sys("io_uring push", e))?;
        self.inflight += entries.len();
        Ok(())
    }

    /// Submits what is queued now, without waiting.
    ///
    /// # Errors
    /// The ring's errno.
    pub(crate) fn submit(&mut self) -> Result<()> {
        self.ring.submit().map_err(|e| Error::sys("io_uring_enter", e))
    }

    fn arm_abort(&mut self) -> Result<()> {
        let e = opcode::PollAdd::new(types::Fixed(self.abort_fixed), libc::POLLIN as u32)
            .build()
            .user_data(Token::new(Token::ABORT, 0, 0).encode());
        // SAFETY: a poll refers to no memory; the fixed file stays registered for the ring's life.
        unsafe { self.push(&[e]) }
    }

    /// Accounts one CQE; returns its token if a driver must see it (not a stray notification,
    /// not the skeleton's own).
    fn account(&mut self, c: &Completion) -> Option<Token> {
        let tok = Token::decode(c.user_data);
        if c.notif() {
            let Some(i) = self.notifs.iter().position(|&t| t == c.user_data) else {
                return None; // stray: see the module docs
            };
            self.notifs.swap_remove(i);
            self.inflight -= 1;
            return Some(tok);
        }
        if tok.kind == Token::CANCEL {
            // The cancel request itself is not counted in flight.
            return None;
        }
        if !c.more() {
            self.inflight = self.inflight.saturating_sub(1);
        } else {
            self.notifs.push(c.user_data);
        }
        (tok.kind != Token::ABORT).then_some(tok)
    }
}

/// Runs `d` until its `pump` reports completion, abort, a stall of `stall`, or an error.
///
/// # Errors
/// [`Error::Aborted`], [`Error::Timeout`] (stall), ring errors, the driver's errors.
pub(crate) fn run<D: Driver>(d: &mut D, abort: &AbortHandle, clock: &StallClock, stall: Duration) -> Result<()> {
    d.uring().arm_abort()?;
    let mut batch = [Completion::default(); BATCH];
    loop {
        if abort.is_aborted() {
            return Err(Error::Aborted);
        }
        if d.pump()? {
            return Ok(());
        }
        // Never past the stall deadline (a TICK-long wait would overshoot it by up to a TICK).
        let to_stall = stall.saturating_sub(clock.idle_for()) + Duration::from_millis(1);
        let wait = d.wait_limit().min(TICK).min(to_stall);
        d.uring().ring.submit_and_wait(wait).map_err(|e| Error::sys("io_uring_enter", e))?;
        let mut moved = false;
        loop {
            let n = d.uring().ring.reap_into(&mut batch);
            for i in 0..n {
                let Some(tok) = d.uring().account(&batch[i]) else {
                    moved = true;
                    continue;
                };
                moved |= d.progress(tok, &batch[i]);
                if let Err(e) = d.complete(tok, batch[i]) {
                    // The rest of this batch (and of the CQ) completed too: account it so that
                    // `finish` knows exactly what the kernel still holds.
                    retire_all(d, &batch[i + 1..n]);
                    return Err(e);
                }
            }
            if n < BATCH {
                break;
            }
        }
        if moved || d.idle() {
            clock.touch();
        } else if clock.idle_for() > stall {
            return Err(Error::Timeout { what: d.stall_report(), after: stall });
        }
    }
}

fn retire_all<D: Driver>(d: &mut D, cs: &[Completion]) {
    for c in cs {
        if let Some(tok) = d.uring().account(c) {
            d.retire(tok, *c);
        }
    }
}

/// Cancels whatever `d` still has in flight and reaps until the kernel has given everything
/// back, for at most [`DRAIN_LIMIT`]. Past that the ring is leaked on purpose.
///
/// # Errors
/// [`Error::Timeout`] naming `who` when operations were still in flight at the limit; the
/// caller must then leak every buffer those operations may use.
pub(crate) fn finish<D: Driver>(d: &mut D, who: &dyn std::fmt::Display) -> Result<()> {
    if d.uring().inflight == 0 {
        return Ok(());
    }
    let _ = d.uring().ring.cancel_all(Token::new(Token::CANCEL, 0, 0).encode());
    let deadline = Instant::now() + DRAIN_LIMIT;
    let mut batch = [Completion::default(); BATCH];
    while d.uring().inflight > 0 && Instant::now() < deadline {
        if d.uring().ring.submit_and_wait(Duration::from_millis(100)).is_err() {
            break;
        }
        let n = d.uring().ring.reap_into(&mut batch);
        retire_all(d, &batch[..n]);
    }
    let left = d.uring().inflight;
    if left == 0 {
        return Ok(());
    }
    d.uring().leaked = true;
    Err(Error::Timeout {
        what: format!("{who}: {left} operations did not complete after cancel; their buffers are leaked on purpose"),
        after: DRAIN_LIMIT,
    })
}

/// Whether this kernel offers `IORING_OP_SEND_ZC` (probed once per process).
pub(crate) fn send_zc_supported() -> bool {
    static ZC: OnceLock<bool> = OnceLock::new();
    *ZC.get_or_init(|| Ring::new(4, 8).map(|r| r.supports(opcode::SendZc::CODE)).unwrap_or(false))
}

/// What this host's io_uring offers the engine (plain data, for a `probe` command).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UringCapabilities {
    /// Why the engine cannot use io_uring here (in words an operator can act on), or `None`.
    pub unavailable: Option<String>,
    /// The ring setup flags the kernel accepted (e.g. `SINGLE_ISSUER|DEFER_TASKRUN|...`).
    pub setup_flags: Option<&'static str>,
    /// `(opcode name, supported)` for every op the engine may use, in a fixed order:
    /// READ_FIXED, WRITE_FIXED, READ, WRITE, SEND, SEND_ZC, RECV, POLL_ADD, ASYNC_CANCEL.
    pub ops: Vec<(&'static str, bool)>,
}

impl UringCapabilities {
    /// Whether the op named `name` (as in [`UringCapabilities::ops`]) is supported.
    pub fn supports(&self, name: &str) -> bool {
        self.ops.iter().any(|&(n, ok)| ok && n == name)
    }
}

/// Probes this host's io_uring: whether the engine can use it and which ops it has.
pub fn uring_capabilities() -> UringCapabilities {
    let unavailable = uring_unavailable_reason();
    match Ring::new(4, 8) {
        Ok(r) => UringCapabilities {
            unavailable,
            setup_flags: Some(r.setup),
            ops: OPS.iter().map(|&(n, code)| (n, r.supports(code))).collect(),
        },
        Err(_) => {
            UringCapabilities { unavailable, setup_flags: None, ops: OPS.iter().map(|&(n, _)| (n, false)).collect() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        let t = Token::new(7, 65535, 0xdead_beef);
        assert_eq!(Token::decode(t.encode()), t);
        assert_eq!(t.at(), 65535);
    }
}
