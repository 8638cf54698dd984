//! The destination's bookkeeping, shared by both backends: where each packet's payload goes,
//! when a channel must wait, and which packet each device writes next.
//!
//! # Memory: blocks, a byte budget and one reserve per device
//!
//! The receive pool is an array of equal **blocks** (`block_bytes`, a page multiple of at most
//! 64 KiB). An admitted packet takes `max(1, ceil(len / block_bytes))` blocks, linked into a
//! chain (`next`), not necessarily adjacent: a held packet costs what it holds, rounded up to
//! one block, never a whole largest-packet slot. The pool has `budget_blocks + devices ×
//! blocks_per_max` blocks:
//!
//! * a device's **lowest missing** packet is admitted through the device's **reserve** (one at
//!   a time per device, at most one largest packet) and is not charged to the budget;
//! * every other packet is charged its blocks against the **budget**, in bytes held; there is
//!   no index window: a packet any distance ahead is held if its bytes fit.
//!
//! Hence free blocks always cover the unused budget plus one largest packet per idle reserve,
//! and admission never fails for want of blocks. Free blocks are a bitmap; a packet takes the
//! first run of adjacent free blocks long enough for it (first fit), and only when there is
//! none the first free blocks in pool order, so a packet is usually one contiguous range (one
//! receive, one write); `piece` gives the backends each contiguous range of a chain. Held packets are found by `(device, index)` in a hash map (random keys)
//! whose capacity, the pool's block count, is allocated up front: the per-packet path neither
//! allocates nor copies.
//!
//! # Why progress is guaranteed (see also DESIGN.md §5)
//!
//! The sender issues one send at a time per channel, and each device's packets in index order.
//! Order all packets by the time their send was issued: every channel's byte stream is a
//! subsequence of that order. Take the earliest packet `P` (device `D`, index `i`) not yet
//! admitted. Everything before `P` on its channel is earlier, hence admitted, so `P`'s header
//! is the next thing its channel delivers; and every index of `D` below `i` was issued earlier,
//! hence admitted, so `P` is `D`'s lowest missing index. Admission never refuses a device's
//! lowest missing packet for long: the device's reserve takes exactly that packet, outside the
//! budget, and when the reserve is busy it holds a packet of `D` below `i` whose predecessors
//! are all admitted, so `D`'s writer drains it without waiting for the network. Writers depend
//! only on their device. Hence some channel can always move, and a state where every open
//! channel waits for memory while no write is pending can only come from a sender that breaks
//! the ordering rules: the receiver reports it as an error instead of waiting forever.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;

use crate::error::{Error, Missing, ProtocolViolation, Result};
use crate::ids::{ChannelId, DeviceIndex, PacketIndex};
use crate::wire::{DeviceId, DeviceStateHeader, VfioPacketHeader, VFIO_HEADER_LEN};

/// The end of a block chain.
const NIL: u32 = u32::MAX;

/// Where an admitted packet's payload goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admitted {
    pub(crate) dev: DeviceIndex,
    /// The first block of the packet's chain (its handle until it is written).
    pub(crate) head: u32,
    pub(crate) len: usize,
    pub(crate) idx: PacketIndex,
}

/// Why a packet was refused for now: what holding it would take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) dev: DeviceIndex,
    pub(crate) idx: PacketIndex,
    /// The device's lowest missing index: the packet whose arrival lets it write again.
    pub(crate) awaited: PacketIndex,
    /// Out-of-order bytes held if this packet were admitted too (its blocks included).
    pub(crate) needed: u64,
    /// Out-of-order bytes held now, and by how many packets.
    pub(crate) held: u64,
    pub(crate) held_packets: usize,
}

/// The outcome of offering a packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Receive the payload into this packet's blocks.
    Accept(Admitted),
    /// No budget for it now; offer it again after memory was freed.
    Wait(Refusal),
}

/// The next thing a device's writer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NextWrite {
    /// Write the `len` bytes of packet `idx` (chain `head`) to the resume fd.
    Data { head: u32, len: usize, idx: PacketIndex },
    /// Every data packet is written: apply the config held in chain `head`.
    Config { head: u32, len: usize },
    /// The device's initial-data marker: every packet before it is written. Nothing to write;
    /// the backend acknowledges it on the return path, then calls `written`.
    Marker { idx: PacketIndex },
}

/// One contiguous range of a packet's chain: `len` bytes from byte `at` of block `block`
/// (the range may run on into the following blocks of the pool when they are the chain's
/// next ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) block: u32,
    pub(crate) at: usize,
    pub(crate) len: usize,
}

#[derive(Debug)]
struct Dev {
    id: DeviceId,
    next_write: u32,
    /// First index at or above `next_write` not yet admitted.
    lowest_missing: u32,
    config_idx: Option<u32>,
    max_data_idx: Option<u32>,
    reserve_busy: bool,
    writing: bool,
    finished: bool,
    data_bytes: u64,
    packets: u64,
    ooo: u64,
}

/// What a held packet's first block records.
#[derive(Debug, Clone, Copy)]
struct Held {
    len: usize,
    blocks: u32,
    /// Admitted through the device's reserve (not charged to the budget).
    reserve: bool,
    /// An initial-data marker (no payload; nothing to write).
    marker: bool,
    /// The payload is complete.
    ready: bool,
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
    /// `(device << 32 | index)` → the packet's first block.
    held: HashMap<u64, u32, RandomState>,
    /// Per block: the next block of its held packet's chain.
    next: Vec<u32>,
    /// One bit per block, set while the block is free.
    free: Vec<u64>,
    /// Per block: set on a held packet's first block.
    info: Vec<Option<Held>>,
    free_blocks: usize,
    block_bytes: usize,
    max_len: usize,
    budget_blocks: usize,
    ooo_blocks: usize,
    ooo_packets: usize,
    held_bytes: u64,
    peak_held: u64,
    peak_ooo: u64,
    markers: bool,
}

fn key(d: usize, idx: u32) -> u64 {
    ((d as u64) << 32) | u64::from(idx)
}

/// The receive pool's geometry for packets of at most `max_len` bytes: the block size, and the
/// blocks of one largest packet. Blocks are 1/16 of the largest packet, rounded down to a page,
/// within 4 KiB ..= 64 KiB: a 1 MiB packet is 16 blocks, a 64 MiB one 1024.
pub(crate) fn geometry(max_len: usize) -> (usize, usize) {
    let page = crate::pool::PAGE;
    let block = (max_len / 16 / page * page).clamp(page, 64 << 10);
    (block, max_len.div_ceil(block).max(1))
}

impl Reassembly {
    /// A budget of `budget_bytes` (rounded down to whole blocks, at least one) for out-of-order
    /// packets, plus one reserve of a largest packet (`max_len` bytes of payload) per device.
    /// `markers`: the return path was agreed on, so initial-data markers are allowed.
    pub(crate) fn new(ids: Vec<DeviceId>, budget_bytes: usize, max_len: usize, markers: bool) -> Reassembly {
        let (block_bytes, per_max) = geometry(max_len);
        let budget_blocks = (budget_bytes / block_bytes).max(1);
        let nblocks = budget_blocks + ids.len() * per_max;
        Reassembly {
            devs: ids
                .into_iter()
                .map(|id| Dev {
                    id,
                    next_write: 0,
                    lowest_missing: 0,
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
            held: HashMap::with_capacity_and_hasher(nblocks, RandomState::new()),
            next: vec![NIL; nblocks],
            free: (0..nblocks.div_ceil(64))
                .map(|w| if (w + 1) * 64 <= nblocks { u64::MAX } else { (1u64 << (nblocks % 64)) - 1 })
                .collect(),
            info: vec![None; nblocks],
            free_blocks: nblocks,
            block_bytes,
            max_len,
            budget_blocks,
            ooo_blocks: 0,
            ooo_packets: 0,
            held_bytes: 0,
            peak_held: 0,
            peak_ooo: 0,
            markers,
        }
    }

    /// Blocks in the pool (the pool to allocate has this many blocks of [`Self::block_bytes`]).
    pub(crate) fn block_count(&self) -> usize {
        self.next.len()
    }

    /// Bytes per block.
    pub(crate) fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// The budget for out-of-order packets, in bytes (whole blocks).
    pub(crate) fn budget_bytes(&self) -> u64 {
        (self.budget_blocks * self.block_bytes) as u64
    }

    /// The identity of device `d`.
    pub(crate) fn id(&self, d: DeviceIndex) -> &DeviceId {
        &self.devs[d.index()].id
    }

    fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.block_bytes).max(1)
    }

    /// The stream rules a packet of device `d` must obey (DESIGN.md §4).
    fn check(&self, d: usize, pidx: PacketIndex, len: usize, vfio: VfioPacketHeader) -> Result<(), ProtocolViolation> {
        let idx = pidx.get();
        let at = |i: u32| PacketIndex::new(i).unwrap_or(PacketIndex::MAX);
        if len > self.max_len {
            return Err(ProtocolViolation::TooLarge { idx: pidx, len, limit: self.max_len });
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
        if idx < dev.next_write || self.held.contains_key(&key(d, idx)) {
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
    /// packet, a packet after the device completed, a payload above the packet limit.
    pub(crate) fn admit(
        &mut self,
        channel: ChannelId,
        hdr: &DeviceStateHeader,
        vfio: VfioPacketHeader,
    ) -> Result<Admit> {
        let Some(d) = self.devs.iter().position(|x| x.id.matches(hdr)) else {
            return Err(Error::UnknownDevice { channel, idstr: hdr.idstr_lossy(), instance_id: hdr.instance_id });
        };
        let len = (hdr.next_packet_size as usize).saturating_sub(VFIO_HEADER_LEN);
        let Some(pidx) = PacketIndex::new(vfio.idx) else {
            // The decoder refuses u32::MAX before a header gets here.
            return Err(Error::internal("a packet index of u32::MAX passed the decoder"));
        };
        self.check(d, pidx, len, vfio).map_err(|violation| Error::Protocol {
            channel,
            device: Some(self.devs[d].id.clone()),
            violation,
        })?;
        Ok(self.place(d, pidx, len, vfio))
    }

    /// Admission of a packet that passed `check`.
    fn place(&mut self, d: usize, pidx: PacketIndex, len: usize, vfio: VfioPacketHeader) -> Admit {
        let idx = pidx.get();
        let blocks = self.blocks_for(len);
        let dev = &self.devs[d];
        let in_order = idx == dev.lowest_missing;
        let reserve = in_order && !dev.reserve_busy;
        if !reserve && self.ooo_blocks + blocks > self.budget_blocks {
            return Admit::Wait(Refusal {
                dev: DeviceIndex::new(d),
                idx: pidx,
                awaited: PacketIndex::new(dev.lowest_missing).unwrap_or(PacketIndex::MAX),
                needed: ((self.ooo_blocks + blocks) * self.block_bytes) as u64,
                held: (self.ooo_blocks * self.block_bytes) as u64,
                held_packets: self.ooo_packets,
            });
        }
        let head = self.take(blocks);
        if reserve {
            self.devs[d].reserve_busy = true;
        } else {
            self.ooo_blocks += blocks;
            self.ooo_packets += 1;
            self.peak_ooo = self.peak_ooo.max((self.ooo_blocks * self.block_bytes) as u64);
        }
        self.info[head as usize] =
            Some(Held { len, blocks: blocks as u32, reserve, marker: vfio.is_marker(), ready: false });
        self.held.insert(key(d, idx), head);
        self.held_bytes += len as u64;
        self.peak_held = self.peak_held.max(self.held_bytes);
        let dev = &mut self.devs[d];
        if vfio.is_config() {
            dev.config_idx = Some(idx);
        } else {
            dev.max_data_idx = Some(dev.max_data_idx.map_or(idx, |m| m.max(idx)));
            if !in_order {
                dev.ooo += 1;
            }
        }
        while self.held.contains_key(&key(d, dev.lowest_missing)) {
            dev.lowest_missing += 1;
        }
        Admit::Accept(Admitted { dev: DeviceIndex::new(d), head, len, idx: pidx })
    }

    /// Takes `n` free blocks as one chain: the first run of `n` adjacent free blocks (one
    /// piece), else the first `n` free blocks in pool order (adjacent ones still merge into
    /// pieces). The budget and the reserves guarantee there are enough (see the module docs).
    fn take(&mut self, n: usize) -> u32 {
        assert!(n <= self.free_blocks, "block accounting: {n} blocks wanted, {} free", self.free_blocks);
        let head = match self.free_run(n) {
            Some(start) => {
                for b in start..start + n {
                    self.free[b / 64] &= !(1 << (b % 64));
                    self.next[b] = if b + 1 < start + n { b as u32 + 1 } else { NIL };
                }
                start as u32
            }
            None => {
                let (mut head, mut last, mut left) = (NIL, NIL, n);
                for w in 0..self.free.len() {
                    while left > 0 && self.free[w] != 0 {
                        let b = w * 64 + self.free[w].trailing_zeros() as usize;
                        self.free[w] &= self.free[w] - 1;
                        if last == NIL {
                            head = b as u32;
                        } else {
                            self.next[last as usize] = b as u32;
                        }
                        last = b as u32;
                        left -= 1;
                    }
                }
                self.next[last as usize] = NIL;
                head
            }
        };
        self.free_blocks -= n;
        head
    }

    /// The first block of the lowest run of `n` adjacent free blocks, if any (whole free or
    /// whole used words are stepped over at once).
    fn free_run(&self, n: usize) -> Option<usize> {
        let total = self.next.len();
        let (mut start, mut len, mut b) = (0, 0, 0);
        while b < total {
            let word = self.free[b / 64];
            if b % 64 == 0 && word == 0 {
                len = 0;
                b += 64;
                continue;
            }
            if b % 64 == 0 && word == u64::MAX {
                if len == 0 {
                    start = b;
                }
                len += 64;
                if len >= n {
                    return Some(start);
                }
                b += 64;
                continue;
            }
            if word >> (b % 64) & 1 == 1 {
                if len == 0 {
                    start = b;
                }
                len += 1;
                if len >= n {
                    return Some(start);
                }
            } else {
                len = 0;
            }
            b += 1;
        }
        None
    }

    /// Returns a chain's blocks to the free set.
    fn give_back(&mut self, head: u32, n: u32) {
        let mut b = head;
        for _ in 0..n {
            self.free[b as usize / 64] |= 1 << (b % 64);
            b = self.next[b as usize];
        }
        self.free_blocks += n as usize;
    }

    /// The contiguous range of admitted packet `head`'s payload that starts at byte `off`
    /// (`off < len`). With `merge`, the range runs on over the chain's blocks that follow each
    /// other in the pool; without, it stops at the end of a block.
    pub(crate) fn piece(&self, head: u32, off: usize, merge: bool) -> Piece {
        let len = self.info[head as usize].map_or(0, |h| h.len);
        let mut block = head;
        for _ in 0..off / self.block_bytes {
            block = self.next[block as usize];
        }
        let at = off % self.block_bytes;
        let mut end = (off - at + self.block_bytes).min(len);
        let mut b = block;
        while merge && end < len && self.next[b as usize] == b + 1 {
            b += 1;
            end = (end + self.block_bytes).min(len);
        }
        Piece { block, at, len: end - off }
    }

    /// The payload of an admitted packet is fully in its blocks.
    pub(crate) fn received(&mut self, a: Admitted) {
        if let Some(h) = self.info[a.head as usize].as_mut() {
            debug_assert!(!h.ready);
            h.ready = true;
        }
    }

    /// The held packet device `d` writes next, if it is complete.
    fn ready_next(&self, d: usize) -> Option<(u32, Held)> {
        let head = *self.held.get(&key(d, self.devs[d].next_write))?;
        let h = self.info[head as usize]?;
        h.ready.then_some((head, h))
    }

    /// What device `d` writes next, if anything is ready and no write is in flight. Marks the
    /// device as writing.
    pub(crate) fn next_write(&mut self, d: DeviceIndex) -> Option<NextWrite> {
        let dev = &self.devs[d.index()];
        if dev.writing || dev.finished {
            return None;
        }
        let (head, h) = self.ready_next(d.index())?;
        let dev = &mut self.devs[d.index()];
        dev.writing = true;
        let idx = PacketIndex::new(dev.next_write)?;
        if dev.config_idx == Some(dev.next_write) {
            Some(NextWrite::Config { head, len: h.len })
        } else if h.marker {
            Some(NextWrite::Marker { idx })
        } else {
            Some(NextWrite::Data { head, len: h.len, idx })
        }
    }

    /// Device `d` finished writing its next packet (data, or the config was applied): frees
    /// its blocks and moves on. Returns whether the device is now complete.
    pub(crate) fn written(&mut self, d: DeviceIndex) -> bool {
        let di = d.index();
        let k = key(di, self.devs[di].next_write);
        let Some(head) = self.held.remove(&k) else { unreachable!("written() without a held packet") };
        let Some(h) = self.info[head as usize].take() else { unreachable!("a held packet without its record") };
        let dev = &mut self.devs[di];
        dev.writing = false;
        let is_config = dev.config_idx == Some(dev.next_write);
        if is_config {
            dev.finished = true;
        } else if !h.marker {
            dev.data_bytes += h.len as u64;
            dev.packets += 1;
        }
        dev.next_write += 1;
        if h.reserve {
            dev.reserve_busy = false;
        } else {
            self.ooo_blocks -= h.blocks as usize;
            self.ooo_packets -= 1;
        }
        self.held_bytes -= h.len as u64;
        self.give_back(head, h.blocks);
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
        (0..self.devs.len()).any(|d| {
            let x = &self.devs[d];
            !x.finished && (x.writing || self.ready_next(d).is_some())
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

    /// Most out-of-order bytes held at once, as charged to the budget (whole blocks): the
    /// smallest budget under which this run's arrivals would never have waited.
    #[cfg(test)]
    pub(crate) fn peak_out_of_order(&self) -> u64 {
        self.peak_ooo
    }

    /// Checks the bookkeeping's invariants (tests and fuzzing): every block is free or in
    /// exactly one held chain, the charges add up, and free blocks cover the unused budget
    /// plus one largest packet per idle reserve.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn check_invariants(&self) {
        let n = self.next.len();
        let mut seen: Vec<bool> = (0..n).map(|b| self.free[b / 64] >> (b % 64) & 1 == 1).collect();
        assert_eq!(seen.iter().filter(|&&f| f).count(), self.free_blocks);
        assert!(
            self.free.iter().map(|w| w.count_ones() as usize).sum::<usize>() == self.free_blocks,
            "bits past the pool"
        );
        let mut walk = |mut b: u32, count: usize| {
            for _ in 0..count {
                assert!(!seen[b as usize], "block {b} free or in two chains");
                seen[b as usize] = true;
                b = self.next[b as usize];
            }
        };
        let (mut ooo_blocks, mut ooo_packets, mut bytes) = (0, 0, 0u64);
        for (&k, &head) in &self.held {
            let h = self.info[head as usize].expect("held packet has a record");
            walk(head, h.blocks as usize);
            assert_eq!(h.blocks as usize, self.blocks_for(h.len));
            assert!((k & 0xffff_ffff) as u32 >= self.devs[(k >> 32) as usize].next_write);
            bytes += h.len as u64;
            if !h.reserve {
                ooo_blocks += h.blocks as usize;
                ooo_packets += 1;
            }
        }
        assert!(seen.iter().all(|&s| s), "a block is lost");
        assert_eq!((ooo_blocks, ooo_packets, bytes), (self.ooo_blocks, self.ooo_packets, self.held_bytes));
        assert!(self.ooo_blocks <= self.budget_blocks);
        let idle_reserves = self.devs.iter().filter(|d| !d.reserve_busy).count();
        let (_, per_max) = geometry(self.max_len);
        assert!(self.free_blocks >= self.budget_blocks - self.ooo_blocks + idle_reserves * per_max);
    }

    /// The first index of device `d` at or above its next write whose payload is not complete:
    /// not admitted, or admitted with its payload still arriving (the packet a stalled device
    /// really waits for; `lowest_missing` skips a packet whose header came). Walks at most the
    /// held packets.
    fn first_unready(&self, d: usize) -> u32 {
        let mut i = self.devs[d].next_write;
        while i < self.devs[d].lowest_missing
            && self.held.get(&key(d, i)).is_some_and(|&h| self.info[h as usize].is_some_and(|h| h.ready))
        {
            i += 1;
        }
        i
    }

    /// The first incomplete device, as an error.
    pub(crate) fn incomplete_error(&self) -> Option<Error> {
        let at = |i: u32| PacketIndex::new(i).unwrap_or(PacketIndex::MAX);
        let d = self.devs.iter().position(|d| !d.finished)?;
        let dev = &self.devs[d];
        let next = self.first_unready(d);
        Some(Error::Incomplete {
            device: dev.id.clone(),
            missing: match dev.config_idx {
                None if dev.next_write == 0 && dev.lowest_missing == 0 => Missing::Everything,
                None => Missing::Config { written: dev.next_write, next: at(next) },
                Some(c) => Missing::Packet {
                    idx: at(next),
                    config_idx: PacketIndex::new(c).unwrap_or(PacketIndex::MAX),
                    written: dev.next_write,
                },
            },
        })
    }

    /// The first device whose write to its data fd is in flight, with the packet index being
    /// written: in a stall, a device (or a sink's reader) that stopped taking data.
    pub(crate) fn write_in_flight(&self) -> Option<(&DeviceId, u32)> {
        self.devs.iter().find(|d| d.writing && !d.finished).map(|d| (&d.id, d.next_write))
    }

    /// Which incomplete device waits for which packet, for an error report.
    pub(crate) fn waits_report(&self) -> String {
        let parts: Vec<String> = (0..self.devs.len())
            .filter(|&d| !self.devs[d].finished)
            .map(|d| {
                let dev = &self.devs[d];
                format!(
                    "{} waits for packet {} ({} written{})",
                    dev.id,
                    self.first_unready(d),
                    dev.next_write,
                    if dev.reserve_busy { ", its reserve busy" } else { "" }
                )
            })
            .collect();
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode_packet_header, PACKET_OVERHEAD};

    const B: usize = 4096;

    fn hdr(dev: &DeviceId, idx: u32, config: bool, len: usize) -> (DeviceStateHeader, VfioPacketHeader) {
        let mut b = [0u8; PACKET_OVERHEAD];
        encode_packet_header(dev, VfioPacketHeader { idx, flags: u32::from(config) }, len, &mut b).unwrap();
        (DeviceStateHeader::decode(&b, u32::MAX).unwrap(), VfioPacketHeader::decode(&b[276..]).unwrap())
    }

    fn ids(n: usize) -> Vec<DeviceId> {
        (0..n).map(|i| DeviceId::new(&format!("d{i}/vfio"), 0).unwrap()).collect()
    }

    fn offer_len(r: &mut Reassembly, dev: &DeviceId, idx: u32, config: bool, len: usize) -> Result<Admit> {
        let (h, v) = hdr(dev, idx, config, len);
        let out = r.admit(ChannelId::new(0), &h, v);
        r.check_invariants();
        out
    }

    fn offer(r: &mut Reassembly, dev: &DeviceId, idx: u32, config: bool) -> Result<Admit> {
        offer_len(r, dev, idx, config, 10)
    }

    fn accept(a: Result<Admit>) -> Admitted {
        match a {
            Ok(Admit::Accept(a)) => a,
            other => panic!("expected an admission, got {other:?}"),
        }
    }

    fn drain(r: &mut Reassembly, d: usize) -> Vec<u32> {
        let d = DeviceIndex::new(d);
        let mut out = Vec::new();
        while let Some(w) = r.next_write(d) {
            if let NextWrite::Data { idx, .. } = w {
                out.push(idx.get());
            }
            r.written(d);
            r.check_invariants();
        }
        out
    }

    #[test]
    fn in_order_and_out_of_order() {
        let id = ids(1);
        // Three blocks of budget: packet 2 (out of order), packet 1 (in order, but the reserve
        // holds 0) and the config packet each take one.
        let mut r = Reassembly::new(id.clone(), 3 * B, B, false);
        let a2 = accept(offer(&mut r, &id[0], 2, false));
        r.received(a2);
        assert_eq!(r.next_write(DeviceIndex::new(0)), None, "index 0 missing");
        let a0 = accept(offer(&mut r, &id[0], 0, false));
        r.received(a0);
        let a1 = accept(offer(&mut r, &id[0], 1, false));
        r.received(a1);
        let c = accept(offer(&mut r, &id[0], 3, true));
        r.received(c);
        assert_eq!(drain(&mut r, 0), vec![0, 1, 2]);
        assert!(r.finished(DeviceIndex::new(0)));
        assert_eq!(r.counters(DeviceIndex::new(0)).out_of_order, 1);
        assert!(r.all_finished());
    }

    /// A packet whose header came but whose payload is still arriving is what the device waits
    /// for: the stall and incomplete reports name it, not the first index never announced.
    #[test]
    fn reports_name_the_packet_still_arriving() {
        let id = ids(1);
        let mut r = Reassembly::new(id.clone(), 8 * B, B, false);
        let a0 = accept(offer(&mut r, &id[0], 0, false));
        r.received(a0);
        assert_eq!(drain(&mut r, 0), vec![0]);
        let _a1 = accept(offer(&mut r, &id[0], 1, false)); // header only: payload arriving
        let a2 = accept(offer(&mut r, &id[0], 2, false));
        r.received(a2);
        let c = accept(offer(&mut r, &id[0], 3, true));
        r.received(c);
        match r.incomplete_error() {
            Some(Error::Incomplete { missing: Missing::Packet { idx, config_idx, written }, .. }) => {
                assert_eq!((idx.get(), config_idx.get(), written), (1, 3, 1));
            }
            other => panic!("expected packet 1 missing, got {other:?}"),
        }
        assert!(r.waits_report().contains("waits for packet 1 (1 written"), "{}", r.waits_report());
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
        let mut r = Reassembly::new(id.clone(), 4 * B, B, false);
        let a = accept(offer(&mut r, &id[0], 0, false));
        assert_eq!(violation(offer(&mut r, &id[0], 0, false)), DuplicateIndex { idx: pi(0) });
        r.received(a);
        drain(&mut r, 0);
        assert_eq!(violation(offer(&mut r, &id[0], 0, false)), DuplicateIndex { idx: pi(0) });
        let _ = accept(offer(&mut r, &id[0], 3, true));
        assert_eq!(violation(offer(&mut r, &id[0], 4, true)), SecondConfig { idx: pi(4), first: pi(3) });
        assert_eq!(violation(offer(&mut r, &id[0], 3, false)), DuplicateIndex { idx: pi(3) });
        assert_eq!(violation(offer(&mut r, &id[0], 5, false)), DataAfterConfig { idx: pi(5), config_idx: pi(3) });
        let other = DeviceId::new("nope", 0).unwrap();
        assert!(matches!(offer(&mut r, &other, 0, false), Err(Error::UnknownDevice { .. })));
        let (h, v) = hdr(&id[0], 1, false, 5000);
        assert_eq!(violation(r.admit(ChannelId::new(0), &h, v)), TooLarge { idx: pi(1), len: 5000, limit: B });
        // Config index not after the highest data index.
        let mut r = Reassembly::new(id.clone(), 4 * B, B, false);
        let _ = offer(&mut r, &id[0], 2, false).unwrap();
        assert_eq!(violation(offer(&mut r, &id[0], 2, true)), DuplicateIndex { idx: pi(2) });
        assert_eq!(violation(offer(&mut r, &id[0], 1, true)), ConfigNotLast { idx: pi(1), data_idx: pi(2) });
    }

    /// The budget fills with out-of-order packets; the in-order packet still gets in through
    /// the device's reserve, and draining frees the budget.
    #[test]
    fn reserve_guarantees_progress() {
        let id = ids(2);
        let mut r = Reassembly::new(id.clone(), 2 * B, B, false);
        for idx in [2, 3] {
            let a = accept(offer(&mut r, &id[0], idx, false));
            r.received(a);
        }
        let Ok(Admit::Wait(why)) = offer(&mut r, &id[0], 4, false) else { panic!("budget full") };
        assert_eq!((why.awaited, why.needed, why.held, why.held_packets), (pi(0), 3 * B as u64, 2 * B as u64, 2));
        assert!(matches!(offer(&mut r, &id[1], 1, false), Ok(Admit::Wait(_))));
        let a = accept(offer(&mut r, &id[1], 0, false));
        r.received(a);
        // Device 1's reserve is busy until index 0 is written; index 1 has to wait.
        assert!(matches!(offer(&mut r, &id[1], 1, false), Ok(Admit::Wait(_))));
        assert_eq!(drain(&mut r, 1), vec![0]);
        assert!(matches!(offer(&mut r, &id[1], 1, false), Ok(Admit::Accept(_))));
    }

    /// The budget counts bytes held, in blocks, not largest-packet slots; and there is no index
    /// window: a packet any distance ahead is held when its bytes fit.
    #[test]
    fn budget_counts_bytes_with_no_window() {
        let id = ids(1);
        let max = 1 << 20;
        let (block, per_max) = geometry(max);
        assert_eq!((block, per_max), (64 << 10, 16));
        // A budget of one largest packet holds 16 small packets, far ahead of the next write.
        let mut r = Reassembly::new(id.clone(), max, max, false);
        assert_eq!(r.block_count(), 32);
        for i in 0..16 {
            let a = accept(offer_len(&mut r, &id[0], 1_000_000 + i, false, 100));
            r.received(a);
        }
        let Ok(Admit::Wait(why)) = offer_len(&mut r, &id[0], 5, false, 0) else { panic!("budget full") };
        assert_eq!((why.idx, why.awaited, why.needed, why.held), (pi(5), pi(0), (max + block) as u64, max as u64));
        // The in-order packet still goes through the reserve, a largest one included.
        let a = accept(offer_len(&mut r, &id[0], 0, false, max));
        r.received(a);
        assert_eq!(r.piece(a.head, 0, true), Piece { block: a.head, at: 0, len: max }, "fresh blocks are adjacent");
        assert_eq!(r.piece(a.head, 5, false).len, block - 5);
        assert_eq!(drain(&mut r, 0), vec![0]);
    }

    /// A packet takes the first run of adjacent free blocks; when there is none it takes
    /// scattered blocks, which come back as several pieces covering the payload exactly once.
    #[test]
    fn pieces_cover_scattered_chains() {
        let id = ids(1);
        let max = 16 * B;
        let mut r = Reassembly::new(id.clone(), 8 * B, max, false);
        assert_eq!((r.block_bytes(), r.block_count()), (B, 24));
        // Packet 0 (reserve) takes block 0, packets 2..=9 (budget) blocks 1..=8.
        let a0 = accept(offer_len(&mut r, &id[0], 0, false, B));
        r.received(a0);
        for idx in 2..=9 {
            let a = accept(offer_len(&mut r, &id[0], idx, false, B));
            assert_eq!(r.piece(a.head, 0, true), Piece { block: idx - 1, at: 0, len: B });
            r.received(a);
        }
        assert_eq!(drain(&mut r, 0), vec![0]);
        // Free now: block 0 and blocks 9..=23 (15): no run of 16 for a largest packet 1.
        let a = accept(offer_len(&mut r, &id[0], 1, false, max));
        let mut off = 0;
        let mut pieces = Vec::new();
        while off < a.len {
            let p = r.piece(a.head, off, true);
            assert!(p.len > 0 && off + p.len <= a.len);
            off += p.len;
            pieces.push(p);
        }
        assert_eq!(pieces, vec![Piece { block: 0, at: 0, len: B }, Piece { block: 9, at: 0, len: 15 * B }]);
        assert_eq!(r.piece(a.head, 2 * B + 5, false), Piece { block: 10, at: 5, len: B - 5 });
        r.received(a);
        assert_eq!(drain(&mut r, 0), (1..=9).collect::<Vec<_>>());
    }

    /// First fit keeps a packet in one piece under reordering: a long random run of largest
    /// packets (with some short ones) needs barely more than one piece per packet.
    #[test]
    fn first_fit_keeps_packets_contiguous() {
        let max = 1 << 20;
        let id = ids(2);
        let mut r = Reassembly::new(id.clone(), 4 * max, max, false);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut next = [0u32; 2];
        let (mut pieces, mut packets) = (0usize, 0usize);
        let mut receiving: Vec<Admitted> = Vec::new();
        for _ in 0..5000 {
            let d = rng.usize(0..2);
            let len = if rng.u8(0..20) == 0 { rng.usize(1..max) } else { max };
            if let Admit::Accept(a) = offer_len(&mut r, &id[d], next[d], false, len).unwrap() {
                next[d] += 1;
                let mut off = 0;
                while off < a.len {
                    off += r.piece(a.head, off, true).len;
                    pieces += 1;
                }
                packets += 1;
                receiving.push(a);
            }
            if !receiving.is_empty() && (rng.bool() || receiving.len() > 6) {
                let a = receiving.swap_remove(rng.usize(0..receiving.len()));
                r.received(a);
            }
            for d in 0..2 {
                drain(&mut r, d);
            }
        }
        assert!(packets > 2000 && pieces * 100 < packets * 110, "{pieces} pieces for {packets} packets");
    }

    /// One random legal run: `ndev` devices with random packet sizes, issued in a random
    /// interleaving (each device in index order), spread over `nch` channels, and delivered in a
    /// random merge of the channels. `budget`: `None` admits everything; `Some` retries refused
    /// channels. Returns the peak out-of-order bytes and whether any packet had to wait.
    struct Run {
        ndev: usize,
        max: usize,
        /// Per channel, in order: (device, index, config, len).
        chans: Vec<Vec<(usize, u32, bool, usize)>>,
        /// The random merge: which channel delivers next, and whether writers run after it.
        picks: Vec<(usize, bool)>,
    }

    impl Run {
        fn random(rng: &mut fastrand::Rng) -> Run {
            let ndev = rng.usize(1..=4);
            let nch = rng.usize(1..=8);
            let max = [B, 16 * B, 1 << 20][rng.usize(0..3)];
            let counts: Vec<u32> = (0..ndev).map(|_| rng.u32(0..24)).collect();
            let mut next = vec![0u32; ndev];
            let mut chans = vec![Vec::new(); nch];
            loop {
                let live: Vec<usize> = (0..ndev).filter(|&d| next[d] <= counts[d]).collect();
                if live.is_empty() {
                    break;
                }
                let d = live[rng.usize(0..live.len())];
                let idx = next[d];
                next[d] += 1;
                let len = if rng.u8(0..8) == 0 { 0 } else { rng.usize(1..=max) };
                chans[rng.usize(0..nch)].push((d, idx, idx == counts[d], len));
            }
            let total: usize = chans.iter().map(Vec::len).sum();
            let mut left: Vec<usize> = chans.iter().map(Vec::len).collect();
            let mut picks = Vec::with_capacity(total);
            for _ in 0..total {
                let open: Vec<usize> = (0..nch).filter(|&c| left[c] > 0).collect();
                let c = open[rng.usize(0..open.len())];
                left[c] -= 1;
                picks.push((c, rng.u8(0..3) == 0));
            }
            Run { ndev, max, chans, picks }
        }

        /// Replays the run; with a budget, refused channels park and retry after writes.
        /// Returns (peak out-of-order bytes, refusals).
        fn replay(&self, budget: Option<usize>, rng: &mut fastrand::Rng) -> (u64, usize) {
            let id = ids(self.ndev);
            let block = geometry(self.max).0;
            let all: usize = self.chans.iter().flatten().map(|p| p.3.div_ceil(block).max(1) * block).sum();
            let mut r = Reassembly::new(id.clone(), budget.unwrap_or(all), self.max, false);
            let mut pos = vec![0usize; self.chans.len()];
            let mut refusals = 0;
            let write_all = |r: &mut Reassembly| {
                for d in DeviceIndex::all(self.ndev) {
                    if r.next_write(d).is_some() {
                        r.written(d);
                    }
                }
            };
            let deliver = |r: &mut Reassembly, c: usize, pos: &mut [usize]| -> bool {
                let (d, idx, cfg, len) = self.chans[c][pos[c]];
                match offer_len(r, &id[d], idx, cfg, len).unwrap() {
                    Admit::Accept(a) => {
                        r.received(a);
                        pos[c] += 1;
                        true
                    }
                    Admit::Wait(_) => false,
                }
            };
            // The planned merge first; with a small budget, channels that were refused are
            // retried in random order until everything is in.
            for &(c, writes) in &self.picks {
                if pos[c] < self.chans[c].len() && !deliver(&mut r, c, &mut pos) {
                    refusals += 1;
                }
                if writes {
                    write_all(&mut r);
                }
            }
            let mut steps = 0;
            while !r.all_finished() {
                steps += 1;
                assert!(steps < 1_000_000, "no progress");
                let open: Vec<usize> = (0..self.chans.len()).filter(|&c| pos[c] < self.chans[c].len()).collect();
                let moved = !open.is_empty() && deliver(&mut r, open[rng.usize(0..open.len())], &mut pos);
                if !moved || rng.bool() {
                    write_all(&mut r);
                }
            }
            assert!(pos.iter().zip(&self.chans).all(|(&p, c)| p == c.len()));
            (r.peak_out_of_order(), refusals)
        }
    }

    /// The property of the byte budget: any legal interleaving of several devices over several
    /// channels, with random packet sizes, completes; and with a budget that holds the run's
    /// largest reorder (the peak out-of-order bytes when everything is admitted), no packet
    /// ever waits: there is no index window or slot count tighter than the bytes. With any
    /// smaller budget it still completes (the reserves), waiting instead.
    #[test]
    fn budget_property_random_interleavings() {
        let seed = std::env::var("BUDGET_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_b0d9_e7d1_u64);
        let mut rng = fastrand::Rng::with_seed(seed);
        for round in 0..400 {
            let run = Run::random(&mut rng);
            let (peak, refusals) = run.replay(None, &mut rng);
            assert_eq!(refusals, 0, "seed {seed} round {round}");
            let (again, refusals) = run.replay(Some(peak as usize), &mut rng);
            assert_eq!((again, refusals), (peak, 0), "seed {seed} round {round}: refused within the peak budget");
            let small = rng.usize(1..=(peak as usize).max(1));
            let (within, _) = run.replay(Some(small), &mut rng);
            assert!(within <= (small as u64).max(geometry(run.max).0 as u64), "seed {seed} round {round}");
        }
    }
}
