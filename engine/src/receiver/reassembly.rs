//! The destination's bookkeeping, shared by both backends: which packet goes into which slot,
//! when a channel must wait, and which packet each device writes next.
//!
//! # Why progress is guaranteed (see also DESIGN.md)
//!
//! The sender issues one send at a time per channel, and each device's packets in index order.
//! Order all packets by the time their send was issued: every channel's byte stream is a
//! subsequence of that order. Take the earliest packet `P` (device `D`, index `i`) not yet
//! admitted. Everything before `P` on its channel is earlier, hence admitted, so `P`'s header
//! is the next thing its channel delivers; and every index of `D` below `i` was issued earlier,
//! hence admitted, so `P` is `D`'s lowest missing index. Admission never refuses a device's
//! lowest missing packet for long: each device owns one reserved slot for exactly that packet,
//! outside the out-of-order budget, and when that slot is busy it holds a packet of `D` below
//! `i` whose predecessors are all admitted, so `D`'s writer drains it without waiting for the
//! network. Writers depend only on their device. Hence some channel can always move, and a
//! state where every open channel waits for memory while no write is pending can only come
//! from a sender that breaks the ordering rules: the receiver reports it as an error instead
//! of waiting forever.

use crate::error::{Error, Missing, ProtocolViolation, Result};
use crate::ids::{ChannelId, DeviceIndex, PacketIndex};
use crate::wire::{DeviceId, DeviceStateHeader, VfioPacketHeader, VFIO_HEADER_LEN};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Empty,
    Receiving(u32),
    Ready(u32),
}

/// Where an admitted packet's payload goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admitted {
    pub(crate) dev: DeviceIndex,
    pub(crate) slot: u32,
    pub(crate) len: usize,
    pub(crate) idx: PacketIndex,
}

/// The outcome of offering a packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Receive the payload into this slot.
    Accept(Admitted),
    /// No memory for it now; offer it again after a slot is freed.
    Wait,
}

/// The next thing a device's writer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NextWrite {
    /// Write `len` bytes of `slot` (packet `idx`) to the resume fd.
    Data { slot: u32, len: usize, idx: PacketIndex },
    /// Every data packet is written: apply the config in `slot`.
    Config { slot: u32, len: usize },
    /// The device's initial-data marker: every packet before it is written. Nothing to write;
    /// the backend acknowledges it on the return path, then calls `written`.
    Marker { idx: PacketIndex },
}

#[derive(Debug)]
struct Dev {
    id: DeviceId,
    next_write: u32,
    /// First index at or above `next_write` not yet admitted.
    lowest_missing: u32,
    ring: Vec<Entry>,
    config_idx: Option<u32>,
    max_data_idx: Option<u32>,
    reserve_busy: bool,
    writing: bool,
    finished: bool,
    data_bytes: u64,
    packets: u64,
    ooo: u64,
}

#[derive(Debug, Clone, Copy)]
struct SlotInfo {
    len: usize,
    reserve: bool,
    /// An initial-data marker (no payload; nothing to write).
    marker: bool,
}

/// Per-device counters for the report.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DevCounters {
    pub(crate) data_bytes: u64,
    pub(crate) packets: u64,
    pub(crate) out_of_order: u64,
}

/// The reassembly state of one receive.
#[derive(Debug)]
pub(crate) struct Reassembly {
    devs: Vec<Dev>,
    free: Vec<u32>,
    slots: Vec<Option<SlotInfo>>,
    slot_bytes: usize,
    budget: usize,
    ooo_used: usize,
    window: u32,
    held_bytes: u64,
    peak_held: u64,
    markers: bool,
}

impl Reassembly {
    /// `budget` out-of-order slots plus one reserved slot per device, each `slot_bytes` large.
    /// `markers`: the return path was agreed on, so initial-data markers are allowed.
    pub(crate) fn new(ids: Vec<DeviceId>, budget: usize, slot_bytes: usize, markers: bool) -> Reassembly {
        let nslots = budget + ids.len();
        let window = (nslots + 1) as u32;
        Reassembly {
            devs: ids
                .into_iter()
                .map(|id| Dev {
                    id,
                    next_write: 0,
                    lowest_missing: 0,
                    ring: vec![Entry::Empty; window as usize],
                    config_idx: None,
                    max_data_idx: None,
                    reserve_busy: false,
                    writing: false,
                    finished: false,
                    data_bytes: 0,
                    packets: 0,
                    ooo: 0,
                })
                .collect(),
            free: (0..nslots as u32).rev().collect(),
            slots: vec![None; nslots],
            slot_bytes,
            budget,
            ooo_used: 0,
            window,
            held_bytes: 0,
            peak_held: 0,
            markers,
        }
    }

    /// Total slots (the pool to allocate).
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The identity of device `d`.
    pub(crate) fn id(&self, d: DeviceIndex) -> &DeviceId {
        &self.devs[d.index()].id
    }

    /// The stream rules a packet of device `d` must obey (DESIGN.md §4).
    fn check(&self, d: usize, pidx: PacketIndex, len: usize, vfio: VfioPacketHeader) -> Result<(), ProtocolViolation> {
        let idx = pidx.get();
        let at = |i: u32| PacketIndex::new(i).unwrap_or(PacketIndex::MAX);
        if len > self.slot_bytes {
            return Err(ProtocolViolation::TooLarge { idx: pidx, len, limit: self.slot_bytes });
        }
        if vfio.is_marker() && !self.markers {
            return Err(ProtocolViolation::UnexpectedMarker { idx: pidx, why: "the return path was not agreed on" });
        }
        if vfio.is_marker() && len != 0 {
            return Err(ProtocolViolation::UnexpectedMarker { idx: pidx, why: "it carries data" });
        }
        let dev = &self.devs[d];
        if dev.finished {
            return Err(ProtocolViolation::AfterCompletion { idx: pidx });
        }
        if idx < dev.next_write
            || (idx - dev.next_write < self.window && dev.ring[(idx % self.window) as usize] != Entry::Empty)
        {
            return Err(ProtocolViolation::DuplicateIndex { idx: pidx });
        }
        match (vfio.is_config(), dev.config_idx, dev.max_data_idx) {
            (true, Some(c), _) => Err(ProtocolViolation::SecondConfig { idx: pidx, first: at(c) }),
            (true, None, Some(m)) if idx <= m => Err(ProtocolViolation::ConfigNotLast { idx: pidx, data_idx: at(m) }),
            (false, Some(c), _) if idx >= c => Err(ProtocolViolation::DataAfterConfig { idx: pidx, config_idx: at(c) }),
            _ => Ok(()),
        }
    }

    /// Offers a decoded packet header that arrived on `channel`.
    ///
    /// # Errors
    /// Unknown device, duplicate index, a data index after the config packet, a second config
    /// packet, a packet after the device completed, a payload above the slot size.
    pub(crate) fn admit(
        &mut self,
        channel: ChannelId,
        hdr: &DeviceStateHeader,
        vfio: VfioPacketHeader,
    ) -> Result<Admit> {
        let Some(d) = self.devs.iter().position(|x| x.id.matches(hdr)) else {
            return Err(Error::UnknownDevice { channel, idstr: hdr.idstr_lossy(), instance_id: hdr.instance_id });
        };
        let len = hdr.next_packet_size as usize - VFIO_HEADER_LEN;
        let Some(pidx) = PacketIndex::new(vfio.idx) else {
            // The decoder refuses u32::MAX before a header gets here.
            return Err(Error::internal("a packet index of u32::MAX passed the decoder"));
        };
        let idx = vfio.idx;
        self.check(d, pidx, len, vfio).map_err(|violation| Error::Protocol {
            channel,
            device: Some(self.devs[d].id.clone()),
            violation,
        })?;
        let dev = &self.devs[d];
        if idx - dev.next_write >= self.window {
            return Ok(Admit::Wait);
        }
        let in_order = idx == dev.lowest_missing;
        let reserve = in_order && !dev.reserve_busy;
        if !reserve && self.ooo_used >= self.budget {
            return Ok(Admit::Wait);
        }
        let slot = self.free.pop().expect("slot accounting: budget + reserves always leave a free slot");
        if reserve {
            self.devs[d].reserve_busy = true;
        } else {
            self.ooo_used += 1;
        }
        self.slots[slot as usize] = Some(SlotInfo { len, reserve, marker: vfio.is_marker() });
        self.held_bytes += len as u64;
        self.peak_held = self.peak_held.max(self.held_bytes);
        let dev = &mut self.devs[d];
        dev.ring[(idx % self.window) as usize] = Entry::Receiving(slot);
        if vfio.is_config() {
            dev.config_idx = Some(idx);
        } else {
            dev.max_data_idx = Some(dev.max_data_idx.map_or(idx, |m| m.max(idx)));
            if !in_order {
                dev.ooo += 1;
            }
        }
        while dev.lowest_missing - dev.next_write < self.window
            && dev.ring[(dev.lowest_missing % self.window) as usize] != Entry::Empty
        {
            dev.lowest_missing += 1;
        }
        Ok(Admit::Accept(Admitted { dev: DeviceIndex::new(d), slot, len, idx: pidx }))
    }

    /// The payload of an admitted packet is fully in its slot.
    pub(crate) fn received(&mut self, a: Admitted) {
        let w = self.window;
        let dev = &mut self.devs[a.dev.index()];
        let e = &mut dev.ring[(a.idx.get() % w) as usize];
        debug_assert_eq!(*e, Entry::Receiving(a.slot));
        *e = Entry::Ready(a.slot);
    }

    /// What device `d` writes next, if anything is ready and no write is in flight. Marks the
    /// device as writing.
    pub(crate) fn next_write(&mut self, d: DeviceIndex) -> Option<NextWrite> {
        let w = self.window;
        let dev = &mut self.devs[d.index()];
        if dev.writing || dev.finished {
            return None;
        }
        let Entry::Ready(slot) = dev.ring[(dev.next_write % w) as usize] else { return None };
        let info = self.slots[slot as usize].expect("ready slot has info");
        dev.writing = true;
        let idx = PacketIndex::new(dev.next_write)?;
        if dev.config_idx == Some(dev.next_write) {
            Some(NextWrite::Config { slot, len: info.len })
        } else if info.marker {
            Some(NextWrite::Marker { idx })
        } else {
            Some(NextWrite::Data { slot, len: info.len, idx })
        }
    }

    /// Device `d` finished writing its next packet (data, or the config was applied): frees
    /// the slot and moves on. Returns whether the device is now complete.
    pub(crate) fn written(&mut self, d: DeviceIndex) -> bool {
        let w = self.window;
        let dev = &mut self.devs[d.index()];
        let i = (dev.next_write % w) as usize;
        let Entry::Ready(slot) = dev.ring[i] else { unreachable!("written() without a ready packet") };
        dev.ring[i] = Entry::Empty;
        dev.writing = false;
        let info = self.slots[slot as usize].take().expect("slot info");
        let is_config = dev.config_idx == Some(dev.next_write);
        if is_config {
            dev.finished = true;
        } else if !info.marker {
            dev.data_bytes += info.len as u64;
            dev.packets += 1;
        }
        dev.next_write += 1;
        if info.reserve {
            dev.reserve_busy = false;
        } else {
            self.ooo_used -= 1;
        }
        self.held_bytes -= info.len as u64;
        self.free.push(slot);
        is_config
    }

    /// Whether device `d` has applied its config.
    pub(crate) fn finished(&self, d: DeviceIndex) -> bool {
        self.devs[d.index()].finished
    }

    /// Whether every device has completed.
    pub(crate) fn all_finished(&self) -> bool {
        self.devs.iter().all(|d| d.finished)
    }

    /// Whether initial-data markers are allowed from now on (the return path was agreed on).
    pub(crate) fn allow_markers(&mut self, yes: bool) {
        self.markers = yes;
    }

    /// Whether the stream of the device named `id` is complete on arrival: it finished, or its
    /// config packet and every index below it were admitted (nothing more may come for it).
    pub(crate) fn stream_admitted(&self, id: &crate::wire::DeviceId) -> bool {
        self.devs.iter().find(|d| d.id == *id).is_some_and(Self::dev_admitted)
    }

    /// Whether every device's stream is complete on arrival (see `stream_admitted`).
    pub(crate) fn all_streams_admitted(&self) -> bool {
        self.devs.iter().all(Self::dev_admitted)
    }

    fn dev_admitted(d: &Dev) -> bool {
        d.finished || d.config_idx.is_some_and(|c| d.lowest_missing > c)
    }

    /// Whether any device has a write in flight or a packet ready to write: if not, and every
    /// channel waits for memory, nothing can ever move again.
    pub(crate) fn write_pending(&self) -> bool {
        self.devs.iter().any(|d| {
            !d.finished && (d.writing || matches!(d.ring[(d.next_write % self.window) as usize], Entry::Ready(_)))
        })
    }

    /// Counters of device `d`.
    pub(crate) fn counters(&self, d: DeviceIndex) -> DevCounters {
        let x = &self.devs[d.index()];
        DevCounters { data_bytes: x.data_bytes, packets: x.packets, out_of_order: x.ooo }
    }

    /// Most payload bytes held at once.
    pub(crate) fn peak_held(&self) -> u64 {
        self.peak_held
    }

    /// The first incomplete device, as an error.
    pub(crate) fn incomplete_error(&self) -> Option<Error> {
        let at = |i: u32| PacketIndex::new(i).unwrap_or(PacketIndex::MAX);
        self.devs.iter().find(|d| !d.finished).map(|d| Error::Incomplete {
            device: d.id.clone(),
            missing: match d.config_idx {
                None if d.next_write == 0 && d.lowest_missing == 0 => Missing::Everything,
                None => Missing::Config { written: d.next_write, next: at(d.lowest_missing) },
                Some(c) => Missing::Packet {
                    idx: at(d.lowest_missing),
                    config_idx: PacketIndex::new(c).unwrap_or(PacketIndex::MAX),
                    written: d.next_write,
                },
            },
        })
    }

    pub(crate) fn stuck_report(&self) -> String {
        let mut parts = Vec::new();
        for d in &self.devs {
            if !d.finished {
                parts.push(format!(
                    "{} waits for packet {} ({} written{})",
                    d.id,
                    d.lowest_missing,
                    d.next_write,
                    if d.reserve_busy { ", reserve slot busy" } else { "" }
                ));
            }
        }
        format!(
            "{} of {} out-of-order packets held ({} bytes); {}; the sender is not delivering packets in per-channel order or exceeds the budget",
            self.ooo_used,
            self.budget,
            self.held_bytes,
            parts.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode_packet_header, PACKET_OVERHEAD};

    fn hdr(dev: &DeviceId, idx: u32, config: bool, len: usize) -> (DeviceStateHeader, VfioPacketHeader) {
        let mut b = [0u8; PACKET_OVERHEAD];
        encode_packet_header(dev, VfioPacketHeader { idx, flags: u32::from(config) }, len, &mut b).unwrap();
        (DeviceStateHeader::decode(&b, u32::MAX).unwrap(), VfioPacketHeader::decode(&b[276..]).unwrap())
    }

    fn ids(n: usize) -> Vec<DeviceId> {
        (0..n).map(|i| DeviceId::new(&format!("d{i}/vfio"), 0).unwrap()).collect()
    }

    fn offer(r: &mut Reassembly, dev: &DeviceId, idx: u32, config: bool) -> Result<Admit> {
        let (h, v) = hdr(dev, idx, config, 10);
        r.admit(ChannelId::new(0), &h, v)
    }

    fn drain(r: &mut Reassembly, d: usize) -> Vec<u32> {
        let d = DeviceIndex::new(d);
        let mut out = Vec::new();
        while let Some(w) = r.next_write(d) {
            if let NextWrite::Data { idx, .. } = w {
                out.push(idx.get());
            }
            r.written(d);
        }
        out
    }

    #[test]
    fn in_order_and_out_of_order() {
        let id = ids(1);
        // Budget 3: packet 2 (out of order), packet 1 (in order, but the reserve holds 0) and
        // the config packet each take a budget slot.
        let mut r = Reassembly::new(id.clone(), 3, 4096, false);
        let a2 = match offer(&mut r, &id[0], 2, false).unwrap() {
            Admit::Accept(a) => a,
            Admit::Wait => panic!(),
        };
        r.received(a2);
        assert_eq!(r.next_write(DeviceIndex::new(0)), None, "index 0 missing");
        let Admit::Accept(a0) = offer(&mut r, &id[0], 0, false).unwrap() else { panic!() };
        r.received(a0);
        let Admit::Accept(a1) = offer(&mut r, &id[0], 1, false).unwrap() else { panic!() };
        r.received(a1);
        let Admit::Accept(c) = offer(&mut r, &id[0], 3, true).unwrap() else { panic!() };
        r.received(c);
        assert_eq!(drain(&mut r, 0), vec![0, 1, 2]);
        assert!(r.finished(DeviceIndex::new(0)));
        assert_eq!(r.counters(DeviceIndex::new(0)).out_of_order, 1);
        assert!(r.all_finished());
    }

    fn violation(r: Result<Admit>) -> ProtocolViolation {
        match r {
            Err(Error::Protocol { violation, .. }) => violation,
            other => panic!("expected a protocol violation, got {other:?}"),
        }
    }

    fn pi(i: u32) -> PacketIndex {
        PacketIndex::new(i).unwrap()
    }

    #[test]
    fn protocol_errors() {
        use ProtocolViolation::*;
        let id = ids(1);
        let mut r = Reassembly::new(id.clone(), 4, 4096, false);
        let Admit::Accept(a) = offer(&mut r, &id[0], 0, false).unwrap() else { panic!() };
        assert_eq!(violation(offer(&mut r, &id[0], 0, false)), DuplicateIndex { idx: pi(0) });
        r.received(a);
        drain(&mut r, 0);
        assert_eq!(violation(offer(&mut r, &id[0], 0, false)), DuplicateIndex { idx: pi(0) });
        let Admit::Accept(_) = offer(&mut r, &id[0], 3, true).unwrap() else { panic!() };
        assert_eq!(violation(offer(&mut r, &id[0], 4, true)), SecondConfig { idx: pi(4), first: pi(3) });
        assert_eq!(violation(offer(&mut r, &id[0], 3, false)), DuplicateIndex { idx: pi(3) });
        assert_eq!(violation(offer(&mut r, &id[0], 5, false)), DataAfterConfig { idx: pi(5), config_idx: pi(3) });
        let other = DeviceId::new("nope", 0).unwrap();
        assert!(matches!(offer(&mut r, &other, 0, false), Err(Error::UnknownDevice { .. })));
        let (h, v) = hdr(&id[0], 1, false, 5000);
        assert_eq!(violation(r.admit(ChannelId::new(0), &h, v)), TooLarge { idx: pi(1), len: 5000, limit: 4096 });
        // Config index not after the highest data index.
        let mut r = Reassembly::new(id.clone(), 4, 4096, false);
        let _ = offer(&mut r, &id[0], 2, false).unwrap();
        assert_eq!(violation(offer(&mut r, &id[0], 2, true)), DuplicateIndex { idx: pi(2) });
        assert_eq!(violation(offer(&mut r, &id[0], 1, true)), ConfigNotLast { idx: pi(1), data_idx: pi(2) });
    }

    /// The budget fills with out-of-order packets; the in-order packet still gets in through
    /// the device's reserved slot, and draining frees the budget.
    #[test]
    fn reserve_slot_guarantees_progress() {
        let id = ids(2);
        let mut r = Reassembly::new(id.clone(), 2, 4096, false);
        for idx in [2, 3] {
            let Admit::Accept(a) = offer(&mut r, &id[0], idx, false).unwrap() else { panic!() };
            r.received(a);
        }
        assert_eq!(offer(&mut r, &id[0], 4, false).unwrap(), Admit::Wait);
        // Beyond the reorder window (slots + 1 = 5 indices ahead): wait, whatever the budget.
        assert_eq!(offer(&mut r, &id[1], 5, false).unwrap(), Admit::Wait);
        assert_eq!(offer(&mut r, &id[1], 1, false).unwrap(), Admit::Wait);
        let Admit::Accept(a) = offer(&mut r, &id[1], 0, false).unwrap() else { panic!() };
        r.received(a);
        // Device 1's reserve is busy until index 0 is written; index 1 has to wait.
        assert_eq!(offer(&mut r, &id[1], 1, false).unwrap(), Admit::Wait);
        assert_eq!(drain(&mut r, 1), vec![0]);
        assert!(matches!(offer(&mut r, &id[1], 1, false).unwrap(), Admit::Accept(_)));
    }

    /// Randomised interleavings: every packet offered in an arbitrary order of per-channel
    /// streams that respect issue order; retrying waiters must always complete.
    #[test]
    fn random_interleavings_complete() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for round in 0..300 {
            let ndev = 1 + rnd(4);
            let nch = 1 + rnd(8);
            let budget = 1 + rnd(4);
            let id = ids(ndev);
            let mut r = Reassembly::new(id.clone(), budget, 4096, false);
            // Issue order: interleave devices randomly, each device in index order.
            let counts: Vec<u32> = (0..ndev).map(|_| rnd(20) as u32).collect();
            let mut next = vec![0u32; ndev];
            let mut chans: Vec<std::collections::VecDeque<(usize, u32, bool)>> = vec![Default::default(); nch];
            loop {
                let live: Vec<usize> = (0..ndev).filter(|&d| next[d] <= counts[d]).collect();
                if live.is_empty() {
                    break;
                }
                let d = live[rnd(live.len())];
                let idx = next[d];
                next[d] += 1;
                chans[rnd(nch)].push_back((d, idx, idx == counts[d]));
            }
            let mut steps = 0;
            while !r.all_finished() {
                steps += 1;
                assert!(steps < 100_000, "round {round}: no progress");
                let mut moved = false;
                // Receivers pick channels in random order; writers run sometimes.
                let c = rnd(nch);
                if let Some(&(d, idx, cfg)) = chans[c].front() {
                    if let Admit::Accept(a) = offer(&mut r, &id[d], idx, cfg).unwrap() {
                        r.received(a);
                        chans[c].pop_front();
                        moved = true;
                    }
                }
                if rnd(3) == 0 || !moved {
                    for d in 0..ndev {
                        if let Some(_w) = r.next_write(DeviceIndex::new(d)) {
                            r.written(DeviceIndex::new(d));
                        }
                    }
                }
            }
            assert!(chans.iter().all(|c| c.is_empty()));
        }
    }
}
