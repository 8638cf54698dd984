//! The receiver's run-wide rules, written once and driven by both backends: which channels
//! are parked waiting for memory and since when, which have closed, the first error, when the
//! receive is stuck for good, and how it ends. Per-packet rules (admission, write order) are in
//! `reassembly`.

use std::time::Duration;

use crate::error::{BudgetStall, Error, Result};
use crate::ids::ChannelId;
use crate::receiver::reassembly::{Reassembly, Refusal};

/// How long a receive waits for memory when a channel's packet was refused, no device write is
/// pending (so only the network can free memory) and nothing arrives on any channel, before it
/// fails with [`Error::BudgetExceeded`] (at most the stall timeout). A sender that keeps the
/// ordering rules has the awaited packet already on its way, so this only has to cover a
/// network hiccup (a TCP retransmission: 200 ms minimum on Linux).
pub(crate) const REORDER_WAIT: Duration = Duration::from_secs(1);

/// The reorder wait for a receive whose stall timeout is `stall`: [`REORDER_WAIT`], at most
/// `stall`.
pub(crate) fn reorder_wait(stall: Duration) -> Duration {
    stall.min(REORDER_WAIT)
}

/// A channel waiting for memory.
#[derive(Debug, Clone, Copy)]
struct Parked {
    /// The epoch at which its packet was last refused.
    epoch: u64,
    why: Refusal,
}

/// The state both backends share under one mutex.
#[derive(Debug)]
pub(crate) struct RecvState<'r> {
    /// The per-packet bookkeeping.
    pub(crate) reassembly: &'r mut Reassembly,
    /// Bumped whenever a write frees memory: a parked channel must retry.
    epoch: u64,
    /// Per channel, while it is parked: when and why its packet was last refused.
    parked_at: Vec<Option<Parked>>,
    /// Per channel: the peer closed it at a packet boundary.
    closed: Vec<bool>,
    err: Option<Error>,
}

impl<'r> RecvState<'r> {
    /// The state of a receive over `channels` channels.
    pub(crate) fn new(reassembly: &'r mut Reassembly, channels: usize) -> RecvState<'r> {
        RecvState { reassembly, epoch: 0, parked_at: vec![None; channels], closed: vec![false; channels], err: None }
    }

    /// `ch`'s packet was refused for lack of memory: it waits for the next write.
    pub(crate) fn park(&mut self, ch: ChannelId, why: Refusal) {
        self.parked_at[ch.index()] = Some(Parked { epoch: self.epoch, why });
    }

    /// `ch`'s packet was admitted.
    pub(crate) fn unpark(&mut self, ch: ChannelId) {
        self.parked_at[ch.index()] = None;
    }

    /// Whether `ch` waits for memory.
    pub(crate) fn parked(&self, ch: ChannelId) -> bool {
        self.parked_at[ch.index()].is_some()
    }

    /// A write (or a config applied) freed memory.
    pub(crate) fn freed(&mut self) {
        self.epoch += 1;
    }

    /// `ch` ended cleanly (EOF at a packet boundary).
    pub(crate) fn close(&mut self, ch: ChannelId) {
        self.closed[ch.index()] = true;
    }

    /// Whether every channel ended.
    pub(crate) fn all_closed(&self) -> bool {
        self.closed.iter().all(|&c| c)
    }

    /// Every open channel waits for memory it was refused *since the last write*, and no write
    /// is pending that could free any: nothing can ever move again (DESIGN.md §5 says why this
    /// only happens with a sender that breaks the ordering rules).
    pub(crate) fn stuck(&self) -> bool {
        let mut open = self.parked_at.iter().zip(&self.closed).filter(|(_, &c)| !c).peekable();
        open.peek().is_some()
            && open.all(|(p, _)| p.is_some_and(|p| p.epoch == self.epoch))
            && !self.reassembly.write_pending()
    }

    /// The budget verdict, checked whenever a channel parks and on every tick: an error when
    /// waiting for memory cannot help. Either every open channel waits ([`Self::stuck`]), or a
    /// channel waits, no write is pending (only the network can free memory), and nothing has
    /// arrived for `idle` ≥ `limit` (the reorder wait): a packet far ahead while the channels
    /// that should carry the awaited one are idle fails promptly, not at the stall timeout.
    ///
    /// # Errors
    /// [`Error::BudgetExceeded`] for the first waiting channel, with the numbers.
    pub(crate) fn check_budget(&self, idle: Duration, limit: Duration) -> Result<()> {
        let cause = if self.stuck() {
            BudgetStall::EveryChannelWaits
        } else if idle >= limit && !self.reassembly.write_pending() && self.parked_at.iter().any(Option::is_some) {
            BudgetStall::NothingMoved { after: idle }
        } else {
            return Ok(());
        };
        let Some((ch, p)) =
            ChannelId::all(self.parked_at.len()).zip(&self.parked_at).find_map(|(c, p)| p.map(|p| (c, p)))
        else {
            return Err(Error::internal("a budget verdict with no channel waiting"));
        };
        let w = p.why;
        Err(Error::BudgetExceeded {
            channel: ch,
            device: self.reassembly.id(w.dev).clone(),
            idx: w.idx,
            awaited: w.awaited,
            needed: w.needed,
            budget: self.reassembly.budget_bytes(),
            held: w.held,
            held_packets: w.held_packets,
            cause,
            waits: self.reassembly.waits_report(),
        })
    }

    /// Records a failure; the first root cause wins (an `Aborted` echo never replaces it).
    pub(crate) fn fail(&mut self, e: Error) {
        Error::keep_root_cause(&mut self.err, e);
    }

    /// Whether a failure was recorded.
    pub(crate) fn failed(&self) -> bool {
        self.err.is_some()
    }

    /// The run's outcome: the first failure, else a device still incomplete, else success.
    ///
    /// # Errors
    /// As described.
    pub(crate) fn finish(self) -> Result<()> {
        if let Some(e) = self.err {
            return Err(e);
        }
        self.reassembly.incomplete_error().map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::DeviceId;

    fn refusal() -> Refusal {
        let i = |n| crate::ids::PacketIndex::new(n).unwrap();
        Refusal {
            dev: crate::ids::DeviceIndex::new(0),
            idx: i(70),
            awaited: i(0),
            needed: 8192,
            held: 4096,
            held_packets: 1,
        }
    }

    #[test]
    fn stuck_needs_every_open_channel_parked_at_this_epoch() {
        let mut reassembly = Reassembly::new(vec![DeviceId::new("a/vfio", 0).unwrap()], 4096, 4096, false);
        let mut st = RecvState::new(&mut reassembly, 2);
        let (c0, c1) = (ChannelId::new(0), ChannelId::new(1));
        let long = Duration::from_secs(9);
        assert!(!st.stuck());
        st.park(c0, refusal());
        assert!(!st.stuck(), "channel 1 can still deliver");
        assert!(st.check_budget(Duration::ZERO, long).is_ok());
        // Channel 1 idle for the reorder wait while channel 0 waits and nothing is written.
        match st.check_budget(long, long) {
            Err(Error::BudgetExceeded { channel, idx, awaited, needed, budget, cause, .. }) => {
                assert_eq!((channel, idx.get(), awaited.get(), needed, budget), (c0, 70, 0, 8192, 4096));
                assert_eq!(cause, BudgetStall::NothingMoved { after: long });
            }
            other => panic!("{other:?}"),
        }
        st.close(c1);
        assert!(st.stuck());
        let e = st.check_budget(Duration::ZERO, long).unwrap_err();
        assert!(matches!(e, Error::BudgetExceeded { cause: BudgetStall::EveryChannelWaits, .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("packet 70 of a/vfio")
                && text.contains("packet 0 is awaited")
                && text.contains("needs 8 KiB, the budget is 4 KiB")
                && text.contains("--budget"),
            "{text}"
        );
        st.freed();
        assert!(!st.stuck(), "a write since the refusal: retry first");
        st.park(c0, refusal());
        assert!(st.stuck());
        st.close(c0);
        assert!(!st.stuck(), "nothing open");
        assert!(st.all_closed());
        st.fail(Error::Aborted);
        st.fail(Error::Config("root".into()));
        assert!(matches!(st.finish(), Err(Error::Config(_))));
    }
}
