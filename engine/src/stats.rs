//! Transfer statistics: byte and packet counters, and packet latency percentiles.
//!
//! Histograms are per thread (recording never allocates or locks) and merged at the end. The
//! public summary types hold plain numbers only, so no foreign crate type leaks into the API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use hdrhistogram::Histogram;

use crate::ids::ChannelId;

use crate::wire::DeviceId;

/// Which backend moved the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// io_uring with registered buffers and linked SQEs.
    Uring,
    /// Plain blocking `read`/`write`/`send`/`recv`.
    Blocking,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Uring => "io_uring",
            BackendKind::Blocking => "blocking",
        })
    }
}

/// Latency distribution in nanoseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Smallest sample.
    pub min_ns: u64,
    /// Largest sample.
    pub max_ns: u64,
    /// Mean.
    pub mean_ns: f64,
    /// Standard deviation.
    pub stddev_ns: f64,
    /// 50th percentile.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
}

/// A latency recorder (nanoseconds, 3 significant digits, 1 ns to 10 minutes), one per thread:
/// recording never allocates or locks. Merge the threads' recorders at the end and read a
/// [`LatencySummary`].
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    /// An empty recorder.
    pub fn new() -> Latency {
        // Bounds fixed at start-up: recording below never resizes (no allocation per packet).
        let h = Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("static histogram bounds are valid");
        Latency(h)
    }

    /// Records one sample (clamped to the recorder's range).
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).clamp(1, 600_000_000_000);
        self.0.saturating_record(ns);
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so `add` cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// Count, extremes, mean, deviation and the 50/90/99/99.9th percentiles.
    pub fn summary(&self) -> LatencySummary {
        let h = &self.0;
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            min_ns: h.min(),
            max_ns: h.max(),
            mean_ns: h.mean(),
            stddev_ns: h.stdev(),
            p50_ns: h.value_at_quantile(0.50),
            p90_ns: h.value_at_quantile(0.90),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
        }
    }
}

/// Live progress of a transfer, readable from any thread while it runs (for progress bars and
/// downtime decisions). Updated once per packet with one relaxed atomic add.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    bytes: std::sync::Arc<CachePadded<AtomicU64>>,
}

impl Progress {
    /// Device-state bytes moved so far (sent by a source, written by a receiver).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
}

/// Per-channel counters, shared by every thread that sends on or receives from the channel.
/// Each channel's pair sits on its own cache line: device threads on different CPUs update
/// different channels without false sharing.
#[derive(Debug, Default)]
pub(crate) struct ChannelCounters(CachePadded<ChannelCountersInner>);

#[derive(Debug, Default)]
pub(crate) struct ChannelCountersInner {
    bytes: AtomicU64,
    packets: AtomicU64,
}

impl ChannelCounters {
    pub(crate) fn add(&self, bytes: u64) {
        self.0.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.0.packets.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn report(&self, id: ChannelId) -> ChannelReport {
        ChannelReport {
            id,
            bytes: self.0.bytes.load(Ordering::Relaxed),
            packets: self.0.packets.load(Ordering::Relaxed),
        }
    }
}

/// What one channel carried (wire bytes: headers included, init packet excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelReport {
    /// Channel id.
    pub id: ChannelId,
    /// Bytes.
    pub bytes: u64,
    /// Packets.
    pub packets: u64,
}

/// What the source sent for one device.
#[derive(Debug, Clone)]
pub struct SourceDeviceReport {
    /// The device's wire identity.
    pub id: DeviceId,
    /// Device-state bytes read and sent (config excluded).
    pub data_bytes: u64,
    /// Of which read during PRE_COPY (while the VM ran).
    pub precopy_bytes: u64,
    /// Data packets.
    pub packets: u64,
    /// Reads that returned less than a full chunk.
    pub short_reads: u64,
    /// Size of the config packet's payload.
    pub config_bytes: u64,
    /// From entering STOP_COPY (or starting, for a raw fd) to the config packet's send
    /// completing: the device's share of the downtime.
    pub stop_copy_time: Duration,
    /// Whole time on this device's thread.
    pub elapsed: Duration,
    /// The migration succeeded (every byte sent and, with the two-phase commit, the
    /// destination committed: it may run the VM now), but this device did not reach the
    /// session's final state (`DeviceOptions::final_state`): why. It is stopped or in ERROR and
    /// must not be resumed here; reset it. `None` when it got there (or is a raw stream).
    pub final_state_error: Option<String>,
}

impl SourceDeviceReport {
    pub(crate) fn empty(id: DeviceId) -> SourceDeviceReport {
        SourceDeviceReport {
            id,
            data_bytes: 0,
            precopy_bytes: 0,
            packets: 0,
            short_reads: 0,
            config_bytes: 0,
            stop_copy_time: Duration::ZERO,
            elapsed: Duration::ZERO,
            final_state_error: None,
        }
    }
}

/// What a source transfer did.
#[derive(Debug, Clone)]
pub struct SourceReport {
    /// The backend that ran.
    pub backend: BackendKind,
    /// Why the blocking backend was chosen automatically, if it was.
    pub fallback_reason: Option<String>,
    /// Whether SEND_ZC was used.
    pub zerocopy: bool,
    /// Bytes the kernel sent without copying (SEND_ZC notifications without the COPIED flag).
    pub zerocopy_bytes: u64,
    /// Bytes copied (plain sends, and SEND_ZC the kernel had to copy, e.g. on loopback).
    pub copied_bytes: u64,
    /// Wall time of the whole transfer, set-up and the close's wait for the destination's EOF
    /// included.
    pub elapsed: Duration,
    /// When every device had sent its last packet (before the wait for the verdicts): the end
    /// of the downtime as far as the source knows without a verdict.
    pub sent_at: Instant,
    /// When the destination's verdicts were in (its `SHUT`) and, with the two-phase commit,
    /// the commit sent: the end of the downtime as the source sees it. `None` without
    /// verdicts. The close's wait that follows (every channel read to the destination's EOF,
    /// at most 2 s once the verdicts are in; DESIGN.md §7.3) is not in it.
    pub verdicts_at: Option<Instant>,
    /// What did not fail the session but should be known: a destination that confirmed every
    /// device loaded and then did not close its channels within 2 s (closed anyway), or sent
    /// bytes after its verdicts (read and discarded).
    pub warnings: Vec<String>,
    /// Per device.
    pub devices: Vec<SourceDeviceReport>,
    /// Per channel.
    pub channels: Vec<ChannelReport>,
    /// Per-packet latency from read submission to send completion.
    pub latency: LatencySummary,
    /// The destination's verdict per device, from the return path; `None` when the
    /// destination did not take part in it (a QEMU-format receiver, or the return path off):
    /// then the source only knows that every byte was sent.
    pub verdicts: Option<Vec<(DeviceId, crate::Verdict)>>,
}

impl SourceReport {
    /// Device-state bytes sent, all devices (config excluded).
    pub fn data_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.data_bytes).sum()
    }

    /// Of those, the bytes read in PRE_COPY (while the VM ran), all devices.
    pub fn precopy_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.precopy_bytes).sum()
    }
}

/// What the destination received for one device.
#[derive(Debug, Clone)]
pub struct ReceiverDeviceReport {
    /// The device's wire identity.
    pub id: DeviceId,
    /// Device-state bytes written to the resume data fd.
    pub data_bytes: u64,
    /// Data packets.
    pub packets: u64,
    /// Packets that arrived before an earlier index of the same device.
    pub out_of_order_packets: u64,
    /// Size of the config packet's payload.
    pub config_bytes: u64,
    /// Short writes to the resume fd that were continued.
    pub short_writes: u64,
    /// The state the device was moved to (None for a raw fd).
    pub reached_state: Option<vfio_migration::MigState>,
    /// From the first init packet read to this device's config applied and the device moved on:
    /// the destination's share of the downtime.
    pub loaded_after: Option<Duration>,
}

/// What a receive did.
#[derive(Debug, Clone)]
pub struct ReceiverReport {
    /// The backend that ran.
    pub backend: BackendKind,
    /// Why the blocking backend was chosen automatically, if it was.
    pub fallback_reason: Option<String>,
    /// Wall time from the first channel accepted to the last device loaded.
    pub elapsed: Duration,
    /// Per device.
    pub devices: Vec<ReceiverDeviceReport>,
    /// Per channel.
    pub channels: Vec<ChannelReport>,
    /// Most payload bytes held at once (receiving or waiting to be written).
    pub peak_held_bytes: u64,
    /// Memory reserved for packets: the receive pool, the budget plus one largest packet per
    /// device (each device's next packet), in whole blocks.
    pub reserved_bytes: u64,
    /// From the first init packet read to every device validated (RESUMING → STOP) and in its
    /// final state (started, for devices added to run): the destination's end of the downtime.
    pub devices_ready_after: Duration,
    /// Whether the source offered the return path and this side accepted it (acks and
    /// verdicts were sent).
    pub return_path: bool,
    /// What did not fail the receive but should be known: connections dropped because they
    /// were not channels (port scanners, strays), channels that never connected, and what came
    /// on a channel after every device completed (a reset, an extra packet). At most 16, plus
    /// a line counting the rest.
    pub warnings: Vec<String>,
}

impl ReceiverReport {
    /// Device-state bytes written, all devices (config excluded).
    pub fn data_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.data_bytes).sum()
    }
}
