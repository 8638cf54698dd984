//! The receiver's run-wide rules, written once and driven by both backends: which channels
//! are parked waiting for memory and since when, which have closed, the first error, when the
//! receive is stuck for good, and how it ends. Per-packet rules (admission, write order) are in
//! `reassembly`.

use crate::error::{Error, Result};
use crate::ids::ChannelId;
use crate::receiver::reassembly::Reassembly;

/// The state both backends share under one mutex.
#[derive(Debug)]
pub(crate) struct RecvState<'r> {
    /// The per-packet bookkeeping.
    pub(crate) reassembly: &'r mut Reassembly,
    /// Bumped whenever a write frees memory: a parked channel must retry.
    epoch: u64,
    /// Per channel: the epoch at which its packet was last refused, while it is parked.
    parked_at: Vec<Option<u64>>,
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
    pub(crate) fn park(&mut self, ch: ChannelId) {
        self.parked_at[ch.index()] = Some(self.epoch);
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
        open.peek().is_some() && open.all(|(p, _)| *p == Some(self.epoch)) && !self.reassembly.write_pending()
    }

    /// The error to report when [`RecvState::stuck`].
    pub(crate) fn stuck_error(&self) -> Error {
        Error::BudgetExceeded { what: self.reassembly.stuck_report() }
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

    #[test]
    fn stuck_needs_every_open_channel_parked_at_this_epoch() {
        let mut reassembly = Reassembly::new(vec![DeviceId::new("a/vfio", 0).unwrap()], 1, 4096, false);
        let mut st = RecvState::new(&mut reassembly, 2);
        let (c0, c1) = (ChannelId::new(0), ChannelId::new(1));
        assert!(!st.stuck());
        st.park(c0);
        assert!(!st.stuck(), "channel 1 can still deliver");
        st.close(c1);
        assert!(st.stuck());
        st.freed();
        assert!(!st.stuck(), "a write since the refusal: retry first");
        st.park(c0);
        assert!(st.stuck());
        st.close(c0);
        assert!(!st.stuck(), "nothing open");
        assert!(st.all_closed());
        st.fail(Error::Aborted);
        st.fail(Error::Config("root".into()));
        assert!(matches!(st.finish(), Err(Error::Config(_))));
    }
}
