//! The source's rules, written once and driven by both backends (sans I/O): which index the
//! next packet gets, how a device's stream is accounted and capped, when the config packet is
//! due, and what a completed send adds to the tallies. The backends only turn these decisions
//! into system calls (`blocking`) or SQEs (`uring`).

use std::time::Instant;

use crate::error::StreamLimit;
use crate::ids::{ChannelId, PacketIndex};
use crate::source::SourceShared;
use crate::stats::{Latency, SourceDeviceReport};
use crate::wire::{DeviceId, PACKET_OVERHEAD};

/// One device's stream cursor: the next packet index, the bytes read, and whether the stream
/// ended and its config packet was issued.
#[derive(Debug)]
pub(crate) struct Stream {
    next: PacketIndex,
    bytes: u64,
    max_bytes: u64,
    ended: bool,
    config_issued: bool,
}

impl Stream {
    /// A stream that may carry at most `max_bytes` of device data.
    pub(crate) fn new(max_bytes: u64) -> Stream {
        Stream { next: PacketIndex::FIRST, bytes: 0, max_bytes, ended: false, config_issued: false }
    }

    /// Reserves the index of the next data packet (before its read is issued, so that a linked
    /// send can carry it). The one overflow rule: a data index is handed out only if an index
    /// after it exists for the config packet.
    ///
    /// # Errors
    /// [`StreamLimit::Packets`] past [`PacketIndex::MAX`].
    pub(crate) fn reserve(&mut self) -> Result<PacketIndex, StreamLimit> {
        let idx = self.next;
        self.next = idx.next().ok_or(StreamLimit::Packets)?;
        Ok(idx)
    }

    /// Gives back the index reserved last (its read brought no data: end of stream, or a read
    /// to issue again).
    pub(crate) fn give_back(&mut self, idx: PacketIndex) {
        debug_assert_eq!(idx.next(), Some(self.next), "only the last reserved index can be given back");
        self.next = idx;
    }

    /// Counts `n` bytes read into a data packet.
    ///
    /// # Errors
    /// [`StreamLimit::Bytes`] once the stream exceeds its maximum (a device that never reaches
    /// its end of stream).
    pub(crate) fn account(&mut self, n: usize) -> Result<(), StreamLimit> {
        self.bytes += n as u64;
        if self.bytes > self.max_bytes {
            return Err(StreamLimit::Bytes { max: self.max_bytes });
        }
        Ok(())
    }

    /// Whether `n` more bytes stay within the stream's maximum.
    pub(crate) fn fits(&self, n: usize) -> bool {
        self.bytes.saturating_add(n as u64) <= self.max_bytes
    }

    /// The device reported the end of its stream (a read of 0).
    pub(crate) fn end(&mut self) {
        self.ended = true;
    }

    /// Whether the stream ended.
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// Device bytes read so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The config rule: the config packet goes strictly after every data packet, so it is due
    /// once the stream ended and no data packet is being read, waiting or being sent
    /// (`data_unsettled`). Returns its index, once.
    pub(crate) fn config_due(&mut self, data_unsettled: bool) -> Option<PacketIndex> {
        if !self.ended || self.config_issued || data_unsettled {
            return None;
        }
        self.config_issued = true;
        Some(self.next)
    }
}

/// Whether a config blob fits one packet of `chunk` bytes.
///
/// # Errors
/// The message for [`crate::Error::Config`].
pub(crate) fn check_config_len(device: &DeviceId, len: usize, chunk: usize) -> Result<(), String> {
    if len > chunk {
        return Err(format!("device {device}: config blob of {len} bytes exceeds the chunk size {chunk}"));
    }
    Ok(())
}

/// What one device's transfer did: its report, its packet latencies, and how its bytes were
/// sent (zero-copy or copied).
#[derive(Debug)]
pub(crate) struct Tallies {
    pub(crate) report: SourceDeviceReport,
    pub(crate) latency: Latency,
    pub(crate) zerocopy_bytes: u64,
    pub(crate) copied_bytes: u64,
    /// Whether this device sent with SEND_ZC (the run's choice, unless it fell back).
    pub(crate) zerocopy: bool,
}

impl Tallies {
    pub(crate) fn new(id: DeviceId) -> Tallies {
        Tallies {
            report: SourceDeviceReport::empty(id),
            latency: Latency::new(),
            zerocopy_bytes: 0,
            copied_bytes: 0,
            zerocopy: false,
        }
    }

    /// A data packet of `n` bytes was read (`chunk`: a full read).
    pub(crate) fn read(&mut self, n: usize, chunk: usize) {
        self.report.data_bytes += n as u64;
        self.report.packets += 1;
        if n < chunk {
            self.report.short_reads += 1;
        }
    }

    /// A packet with `len` payload bytes went out on `ch` (its send completed in full), `t0`
    /// being when its read was issued. `copied`: sent with a copying send (a SEND_ZC's bytes
    /// are counted when its notification says how they went).
    pub(crate) fn sent(&mut self, run: &SourceShared<'_>, ch: ChannelId, len: usize, t0: Instant, copied: bool) {
        let wire = (PACKET_OVERHEAD + len) as u64;
        run.counters[ch.index()].add(wire);
        run.progress.add(len as u64);
        if copied {
            self.copied_bytes += wire;
        }
        self.latency.record(t0.elapsed());
    }

    /// A SEND_ZC notification for a packet of `len` payload bytes: the kernel sent it without
    /// copying, or (`copied`) had to copy after all (loopback, a device without SG).
    pub(crate) fn zerocopy_done(&mut self, len: usize, copied: bool) {
        let wire = (PACKET_OVERHEAD + len) as u64;
        if copied {
            self.copied_bytes += wire;
        } else {
            self.zerocopy_bytes += wire;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_leave_room_for_the_config_packet() {
        let mut s = Stream::new(u64::MAX);
        let a = s.reserve().unwrap();
        assert_eq!(a, PacketIndex::FIRST);
        s.give_back(a);
        assert_eq!(s.reserve().unwrap(), PacketIndex::FIRST);
        assert_eq!(s.config_due(false), None, "not before the end of stream");
        s.end();
        assert_eq!(s.config_due(true), None, "not while data is unsettled");
        assert_eq!(s.config_due(false).map(PacketIndex::get), Some(1));
        assert_eq!(s.config_due(false), None, "once");
        // A data index is handed out only if one remains after it (for the config packet, or for
        // the read that finds the end of the stream): never u32::MAX.
        let mut s = Stream { next: PacketIndex::new(u32::MAX - 2).unwrap(), ..Stream::new(u64::MAX) };
        assert_eq!(s.reserve().unwrap().get(), u32::MAX - 2);
        assert_eq!(s.reserve(), Err(StreamLimit::Packets));
    }

    #[test]
    fn stream_cap() {
        let mut s = Stream::new(10);
        s.account(10).unwrap();
        assert_eq!(s.account(1), Err(StreamLimit::Bytes { max: 10 }));
        assert_eq!(s.bytes(), 11);
    }
}
