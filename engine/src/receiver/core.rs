//! The receiver's run-wide rules, written once and driven by both backends: which channels
//! are parked waiting for memory and since when, which have closed, the first error, when the
//! receive is stuck for good, and how it ends. Per-packet rules (admission, write order) are in
//! `reassembly`.

use std::sync::Mutex;
use std::time::Duration;

use crate::error::{BudgetStall, Error, Missing, Result};
use crate::ids::{ChannelId, DeviceIndex};
use crate::receiver::accept::Channels;
use crate::receiver::reassembly::{Admit, Admitted, NextWrite, Reassembly, Refusal};
use crate::wire::{DeviceStateHeader, VfioPacketHeader};

/// Most warnings kept word for word; the rest are counted.
const MAX_WARNINGS: usize = 16;
/// Most channels described one by one in a stall report.
const MAX_REPORTED_CHANNELS: usize = 16;

/// What a receive noticed that did not fail it (connections that were not channels, what came
/// after every device completed), bounded.
#[derive(Debug, Default)]
pub(crate) struct Warnings {
    list: Vec<String>,
    more: u64,
}

impl Warnings {
    /// Keeps `w` (counts it only, past [`MAX_WARNINGS`]).
    pub(crate) fn push(&mut self, w: String) {
        if self.list.len() < MAX_WARNINGS {
            self.list.push(w);
        } else {
            self.more += 1;
        }
    }

    /// The first warning.
    pub(crate) fn first(&self) -> Option<&String> {
        self.list.first()
    }

    /// Every warning kept, plus one line for those only counted.
    pub(crate) fn into_vec(self) -> Vec<String> {
        let mut v = self.list;
        if self.more > 0 {
            v.push(format!("{} more warning(s) not shown", self.more));
        }
        v
    }
}

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
    channels: &'r Channels,
    warnings: &'r Mutex<Warnings>,
    /// Bumped whenever a write frees memory: a parked channel must retry.
    epoch: u64,
    /// Per channel, while it is parked: when and why its packet was last refused.
    parked_at: Vec<Option<Parked>>,
    /// Per channel: it ended (the peer closed it at a packet boundary, it failed in a way that
    /// was excused, or it is not needed any more).
    closed: Vec<bool>,
    /// Per channel: the admitted packet whose payload it is receiving.
    receiving: Vec<Option<Admitted>>,
    /// Per channel: why it ended early, when it did.
    ended: Vec<Option<String>>,
    /// The first channel failure excused so far: the outcome if a device stays incomplete.
    deferred: Option<Error>,
    /// Every device completed; nothing more is read.
    complete: bool,
    err: Option<Error>,
}

impl<'r> RecvState<'r> {
    /// The state of a receive over `channels`; warnings go to `warnings`.
    pub(crate) fn new(
        reassembly: &'r mut Reassembly,
        channels: &'r Channels,
        warnings: &'r Mutex<Warnings>,
    ) -> RecvState<'r> {
        let n = channels.count();
        RecvState {
            reassembly,
            channels,
            warnings,
            epoch: 0,
            parked_at: vec![None; n],
            closed: vec![false; n],
            receiving: vec![None; n],
            ended: vec![None; n],
            deferred: None,
            complete: false,
            err: None,
        }
    }

    fn warn(&self, w: String) {
        self.warnings.lock().unwrap_or_else(|p| p.into_inner()).push(w);
    }

    /// Offers a header that arrived on `ch` to the reassembly (markers are allowed only once
    /// the return path was agreed on), and records what `ch` does next: receive the payload,
    /// or wait for memory.
    ///
    /// # Errors
    /// As `Reassembly::admit`.
    pub(crate) fn admit(&mut self, ch: ChannelId, h: &DeviceStateHeader, v: VfioPacketHeader) -> Result<Admit> {
        self.reassembly.allow_markers(self.channels.rp_agreed());
        let r = self.reassembly.admit(ch, h, v)?;
        match r {
            Admit::Wait(why) => self.park(ch, why),
            Admit::Accept(a) => {
                self.unpark(ch);
                self.receiving[ch.index()] = (a.len > 0).then_some(a);
            }
        }
        Ok(r)
    }

    /// The payload of `a`, admitted on `ch`, is complete.
    pub(crate) fn received(&mut self, ch: ChannelId, a: Admitted) {
        self.reassembly.received(a);
        self.receiving[ch.index()] = None;
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

    /// A write (or a config applied) freed memory. When that completed the last device, the
    /// receive is complete: every channel stops reading (a channel that is still open, as QEMU
    /// leaves them, or never connected, is not waited for), and so does channel set-up.
    pub(crate) fn freed(&mut self) {
        self.epoch += 1;
        if !self.complete && self.reassembly.all_finished() {
            self.complete = true;
            // Channel set-up ends now (its thread exits meanwhile), not after the endgame.
            self.channels.stop_accepting();
            let missing: Vec<String> = ChannelId::all(self.closed.len())
                .filter(|&c| self.channels.get(c).is_none())
                .map(|c| c.to_string())
                .collect();
            if !missing.is_empty() {
                self.warn(format!(
                    "channel(s) {} never connected; every device completed without them (does the source use \
                     fewer channels than this receiver?)",
                    missing.join(", ")
                ));
            }
            for c in ChannelId::all(self.closed.len()) {
                if self.channels.get(c).is_none() {
                    self.closed[c.index()] = true;
                }
            }
            self.channels.finish_reading();
        }
    }

    /// Something arrived on `ch` after every device completed (`what`): a warning.
    pub(crate) fn late(&self, ch: ChannelId, what: &str) {
        self.warn(format!("channel {ch}: {what} after every device completed (ignored)"));
    }

    /// Whether every device completed (nothing more is read).
    pub(crate) fn complete(&self) -> bool {
        self.complete
    }

    /// `ch` ended cleanly (EOF at a packet boundary).
    pub(crate) fn close(&mut self, ch: ChannelId) {
        self.closed[ch.index()] = true;
    }

    /// Whether `ch` ended (or is not needed any more).
    pub(crate) fn is_closed(&self, ch: ChannelId) -> bool {
        self.closed[ch.index()]
    }

    /// Whether every channel ended.
    pub(crate) fn all_closed(&self) -> bool {
        self.closed.iter().all(|&c| c)
    }

    /// Channel `ch` failed with `e`. Whether that fails the receive is decided here, for both
    /// backends:
    ///
    /// * after every device completed, anything on a channel is a warning, never an error (a
    ///   reset instead of a FIN, one more packet, bytes that are not a packet);
    /// * a local failure, or one inside a payload (that packet can never arrive now), is the
    ///   error at once;
    /// * a reset or close between packets, or bytes or a packet arriving once the stream they
    ///   concern was complete (every packet of the device, or of every device, admitted), end
    ///   the channel only: the error is the outcome only if a device is still incomplete when
    ///   every channel ended (`finish`), and a warning if every device completes.
    ///
    /// # Errors
    /// `e`, when it fails the receive now.
    pub(crate) fn channel_failed(&mut self, ch: ChannelId, e: Error) -> Result<()> {
        if !is_channel_input(&e) {
            return Err(e);
        }
        // Channel 0 carries the commit (a FIN): after this, none can come on it.
        self.channels.input_failed(ch, &e.to_string());
        if self.complete || self.reassembly.all_finished() {
            self.warn(format!("{e} (after every device completed; ignored)"));
        } else if self.excusable(ch, &e) {
            self.ended[ch.index()] = Some(e.to_string());
            Error::keep_root_cause(&mut self.deferred, e);
        } else {
            return Err(e);
        }
        self.closed[ch.index()] = true;
        self.parked_at[ch.index()] = None;
        self.receiving[ch.index()] = None;
        Ok(())
    }

    /// Whether `e` on `ch` leaves every device able to complete without `ch`.
    fn excusable(&self, ch: ChannelId, e: &Error) -> bool {
        match e {
            Error::Channel { .. } | Error::ChannelClosed { .. } => self.receiving[ch.index()].is_none(),
            Error::Protocol { device: Some(id), .. } => self.reassembly.stream_admitted(id),
            _ => self.reassembly.all_streams_admitted(),
        }
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

    /// Who waits for what, for a stall error: the first incomplete device, then every channel
    /// (the first [`MAX_REPORTED_CHANNELS`]) with its state.
    pub(crate) fn stall_report(&self) -> String {
        let mut dev = match self.reassembly.incomplete_error() {
            Some(Error::Incomplete { device, missing }) => format!("device {device}: {}", waiting_for(&missing)),
            _ => "every device complete".to_string(),
        };
        if let Some((device, idx)) = self.reassembly.write_in_flight() {
            dev = format!(
                "device {device}: its write of packet {idx} to its data fd has not finished (the device, or the \
                 reader of a pipe or FIFO it writes to, stopped taking data); {dev}"
            );
        }
        let n = self.closed.len();
        let mut chans: Vec<String> = ChannelId::all(n).take(MAX_REPORTED_CHANNELS).map(|c| self.describe(c)).collect();
        if n > MAX_REPORTED_CHANNELS {
            let open = ChannelId::all(n).skip(MAX_REPORTED_CHANNELS).filter(|&c| !self.closed[c.index()]).count();
            chans.push(format!("{} more channel(s), {open} of them open", n - MAX_REPORTED_CHANNELS));
        }
        format!("{dev}; {}", chans.join(", "))
    }

    fn describe(&self, c: ChannelId) -> String {
        let i = c.index();
        let state = if let Some(why) = &self.ended[i] {
            format!("ended ({why})")
        } else if self.closed[i] {
            "closed".to_string()
        } else if self.parked(c) {
            "waiting for memory for its next packet".to_string()
        } else if let Some(a) = self.receiving[i] {
            format!("inside packet {} of device {} ({} bytes)", a.idx, self.reassembly.id(a.dev), a.len)
        } else if self.channels.get(c).is_none() {
            "not connected".to_string()
        } else {
            "open, waiting for a packet header".to_string()
        };
        format!("channel {c} {state}")
    }

    /// Records a failure; the first root cause wins (an `Aborted` echo never replaces it).
    pub(crate) fn fail(&mut self, e: Error) {
        Error::keep_root_cause(&mut self.err, e);
    }

    /// What device `d`'s writer thread does next (both backends' writer threads): write the
    /// next packet in index order, wait for it, or end (its stream is complete, the receive
    /// failed or was aborted, or every channel ended and nothing more can come).
    pub(crate) fn writer_next(&mut self, d: DeviceIndex, aborted: bool) -> WriterNext {
        if self.failed() || aborted || self.reassembly.finished(d) {
            return WriterNext::End;
        }
        if let Some(w) = self.reassembly.next_write(d) {
            return WriterNext::Write(w);
        }
        if self.all_closed() {
            return WriterNext::End;
        }
        WriterNext::Wait
    }

    /// Whether a failure was recorded.
    pub(crate) fn failed(&self) -> bool {
        self.err.is_some()
    }

    /// The run's outcome: the first failure; else success when every device completed (a
    /// channel failure excused on the way is then a warning); else that channel failure, or
    /// the first incomplete device.
    ///
    /// # Errors
    /// As described.
    pub(crate) fn finish(self) -> Result<()> {
        if let Some(e) = self.err {
            return Err(e);
        }
        if self.reassembly.all_finished() {
            if let Some(e) = &self.deferred {
                self.warn(format!("{e} (after its stream was complete; every device completed, so it is ignored)"));
            }
            return Ok(());
        }
        if let Some(e) = self.deferred {
            return Err(e);
        }
        self.reassembly.incomplete_error().map_or(Ok(()), Err)
    }
}

/// A writer thread's next step ([`RecvState::writer_next`]).
pub(crate) enum WriterNext {
    /// Write (or apply) this.
    Write(NextWrite),
    /// Nothing writable yet.
    Wait,
    /// The writer is done.
    End,
}

/// Errors about what a channel delivered (as opposed to local or device failures).
fn is_channel_input(e: &Error) -> bool {
    matches!(
        e,
        Error::Channel { .. }
            | Error::ChannelClosed { .. }
            | Error::Wire { .. }
            | Error::Protocol { .. }
            | Error::UnknownDevice { .. }
    )
}

/// What an incomplete device waits for, while channels may still deliver it.
fn waiting_for(m: &Missing) -> String {
    match m {
        Missing::Everything => "no packet received yet".to_string(),
        Missing::Config { written, next } => {
            format!("{written} data packets written, waiting for packet {next} (its config packet has not arrived)")
        }
        Missing::Packet { idx, config_idx, written } => {
            format!("waiting for packet {idx} (config packet index {config_idx}, {written} data packets written)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::DeviceIndex;
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
        let chans = Channels::new(2, 0).unwrap();
        let warnings = Mutex::new(Warnings::default());
        let mut st = RecvState::new(&mut reassembly, &chans, &warnings);
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

    fn header(id: &DeviceId, idx: u32, config: bool, len: usize) -> (DeviceStateHeader, VfioPacketHeader) {
        let mut b = vec![0u8; crate::wire::PACKET_OVERHEAD];
        let v = VfioPacketHeader { idx, flags: u32::from(config) };
        crate::wire::encode_packet_header(id, v, len, &mut b).unwrap();
        let h = DeviceStateHeader::decode(&b, u32::MAX - 1).unwrap();
        (h, VfioPacketHeader::decode(&b[crate::wire::DEVICE_STATE_HEADER_LEN..]).unwrap())
    }

    fn closed_between_packets(c: ChannelId) -> Error {
        Error::ChannelClosed { channel: c, during: crate::error::Stage::Header { got: 3 } }
    }

    #[test]
    fn channel_failures_are_fatal_deferred_or_warnings() {
        let id = DeviceId::new("a/vfio", 0).unwrap();
        let mut reassembly = Reassembly::new(vec![id.clone()], 2, 4096, false);
        let chans = Channels::new(3, 0).unwrap();
        let warnings = Mutex::new(Warnings::default());
        let mut st = RecvState::new(&mut reassembly, &chans, &warnings);
        let (c0, c1, c2) = (ChannelId::new(0), ChannelId::new(1), ChannelId::new(2));
        // Between packets, with the device incomplete: only the channel ends.
        st.channel_failed(c0, closed_between_packets(c0)).unwrap();
        assert!(st.is_closed(c0));
        assert!(st.stall_report().contains("channel 0 ended"), "{}", st.stall_report());
        // Inside a payload: fatal at once.
        let (h, v) = header(&id, 0, false, 100);
        let Admit::Accept(a) = st.admit(c1, &h, v).unwrap() else { panic!("admitted") };
        assert!(st.stall_report().contains("channel 1 inside packet 0"), "{}", st.stall_report());
        let e = Error::Channel { channel: c1, op: "receive".into(), source: std::io::Error::other("reset") };
        assert!(st.channel_failed(c1, e).is_err());
        // A local failure is never excused.
        assert!(st.channel_failed(c2, Error::Config("x".into())).is_err());
        // The device completes: the deferred failure becomes a warning, and what comes after
        // is one too.
        st.received(c1, a);
        let (h, v) = header(&id, 1, true, 0);
        let Admit::Accept(a) = st.admit(c1, &h, v).unwrap() else { panic!("admitted") };
        st.received(c1, a);
        while let Some(_w) = st.reassembly.next_write(DeviceIndex::new(0)) {
            st.reassembly.written(DeviceIndex::new(0));
            st.freed();
        }
        assert!(st.complete());
        st.channel_failed(c1, closed_between_packets(c1)).unwrap();
        assert!(st.finish().is_ok());
        let w = warnings.into_inner().unwrap().into_vec();
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w.iter().all(|w| w.contains("ignored") || w.contains("never connected")), "{w:?}");
    }
}
