//! The downtime scenario's live-path variants: the engine's stop-and-copy and a live migration
//! with pre-copy, on the same live simulated devices, through the command's own live path
//! ([`run_engine_live`], as `loopback` runs it).
//!
//! Both variants measure the downtime the same way: from just before `switchover()` (the
//! source devices stop from there on) to the moment every destination device is loaded,
//! validated (RESUMING -> STOP) and RUNNING, the receiver's `on_started` hook, where a VMM
//! resumes its vCPUs (`downtime_measured_to` = `destination_running`). The receiver's teardown
//! after it (threads joined, rings and memory released) is reported apart, to the receiver's
//! return. Set-up (connect, init packets, rings, device threads) happens before, while the
//! devices run, and is not part of it.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use vfio_multifd::{Backend, ZeroCopy};

use super::{spread, Spread};
use crate::live::{DriveOpts, Trigger};
use crate::transfer::{run_engine_live, EngineParams, LiveParams};

/// How long the fixed-cost variant waits after the switchover decision (every device's initial
/// data acknowledged as written into its destination device) before it stops the vCPUs: the
/// simulated destination devices still verify what sits in their pipes (up to 1 MiB each) for a
/// few ms, which is pre-copy data still being loaded, not the switchover's fixed cost.
const FIXED_COST_SETTLE: Duration = Duration::from_millis(200);

/// The live-path variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Variant {
    /// Stop-and-copy: switch over as soon as the session is set up.
    StopCopy,
    /// Pre-copy of the whole image while the devices dirty pages, `auto` switchover.
    Precopy,
    /// Pre-copy of the whole image of devices that dirty nothing, then [`FIXED_COST_SETTLE`]:
    /// the switchover moves no data, so its downtime is the switchover's fixed cost (state
    /// changes, the configs, validation and start at the destination, the last messages).
    FixedCost,
}

impl Variant {
    pub(super) const ALL: [Variant; 3] = [Variant::StopCopy, Variant::Precopy, Variant::FixedCost];

    pub(super) fn name(self) -> &'static str {
        match self {
            Variant::StopCopy => "engine-stop-copy",
            Variant::Precopy => "engine-precopy",
            Variant::FixedCost => "engine-switchover-fixed-cost",
        }
    }
}

/// What both variants share: the same devices, channels and chunk.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scenario {
    /// Simulated devices.
    pub(super) devices: usize,
    /// Image bytes per device.
    pub(super) size: u64,
    /// Channels.
    pub(super) channels: usize,
    /// Device bytes per packet.
    pub(super) chunk: usize,
    /// Bytes each device dirties a second while it runs (both variants: the devices are the
    /// same; in stop-and-copy they only run during set-up).
    pub(super) dirty_rate: u64,
    /// `auto`'s limit on the estimated switchover time.
    pub(super) downtime_limit: Duration,
    /// Longest pre-copy.
    pub(super) max_precopy: Duration,
}

/// One repetition of one variant.
#[derive(Debug, Clone)]
pub(super) struct LiveRep {
    /// Switchover call -> every destination device loaded, validated, RUNNING.
    pub(super) downtime: Duration,
    /// Switchover call -> the receiver returned (its teardown included).
    pub(super) to_return: Duration,
    /// Pre-copy start -> the switchover decision.
    pub(super) precopy_time: Duration,
    /// Device bytes read in PRE_COPY, all devices.
    pub(super) precopy_bytes: u64,
    /// Device bytes sent after `switchover()` was called, all devices.
    pub(super) switchover_bytes: u64,
    /// The whole migration: connect to the receiver returning.
    pub(super) total: Duration,
    /// What ended pre-copy.
    pub(super) trigger: Trigger,
    /// The engine's estimate of the switchover (remaining bytes at the pre-copy rate) when it
    /// decided; `None` without pre-copy.
    pub(super) estimated: Option<Duration>,
    /// The run's `end.switchover` object, as `loopback -J` prints it.
    pub(super) switchover: Value,
}

/// Runs one variant once. Every destination verifies every byte and its state digest against
/// its source's at stop (the devices are live in both variants).
pub(super) fn run_once(v: Variant, s: &Scenario) -> Result<LiveRep> {
    let precopy = v != Variant::StopCopy;
    let ep = EngineParams {
        devices: s.devices,
        size: s.size,
        channels: s.channels,
        chunk: s.chunk,
        max_read: 1 << 20,
        precopy,
        zerocopy: ZeroCopy::Off,
        backend: Backend::Uring,
        budget: None,
        stall: Duration::from_secs(30),
    };
    let live = LiveParams {
        drive: DriveOpts {
            precopy,
            downtime_limit: s.downtime_limit,
            max_precopy: s.max_precopy,
            // Nothing in flight: the switchover moves no data at all.
            settle: if v == Variant::FixedCost { FIXED_COST_SETTLE } else { Duration::ZERO },
        },
        dirty_rate: Some(if v == Variant::FixedCost { 0 } else { s.dirty_rate }),
        peer_dma: false,
    };
    let r = run_engine_live(&ep, &live, None, false, Duration::from_secs(1))?;
    if !r.digests_checked {
        bail!("the devices were not live: their final state could not be checked");
    }
    let sw = &r.switchover;
    Ok(LiveRep {
        downtime: sw.downtime,
        to_return: sw.to_receiver_return.unwrap_or(sw.downtime),
        precopy_time: sw.sw.precopy_time,
        precopy_bytes: sw.precopy_bytes,
        switchover_bytes: sw.switchover_bytes,
        total: r.wall,
        trigger: sw.sw.trigger,
        estimated: sw.sw.status.estimated_switchover.filter(|_| precopy),
        switchover: sw.json(),
    })
}

/// One variant's repetitions, aggregated.
#[derive(Debug, Clone)]
pub(super) struct LiveResult {
    pub(super) variant: Variant,
    /// Downtime, ms.
    pub(super) ms: Spread,
    /// Switchover call to the receiver's return, ms.
    pub(super) to_return_ms: Spread,
    pub(super) precopy_seconds: Spread,
    pub(super) precopy_bytes: Spread,
    pub(super) switchover_bytes: Spread,
    pub(super) total_seconds: Spread,
    /// The engine's estimate at the decision, ms (pre-copy only).
    pub(super) estimated_ms: Option<Spread>,
    /// How often each trigger ended pre-copy.
    pub(super) triggers: BTreeMap<&'static str, usize>,
    pub(super) reps: Vec<LiveRep>,
}

pub(super) fn aggregate(variant: Variant, reps: Vec<LiveRep>) -> LiveResult {
    let f = |g: fn(&LiveRep) -> f64| spread(reps.iter().map(g).collect());
    let mut triggers = BTreeMap::new();
    for r in &reps {
        *triggers.entry(r.trigger.name()).or_insert(0) += 1;
    }
    LiveResult {
        variant,
        ms: f(|r| r.downtime.as_secs_f64() * 1000.0),
        to_return_ms: f(|r| r.to_return.as_secs_f64() * 1000.0),
        precopy_seconds: f(|r| r.precopy_time.as_secs_f64()),
        precopy_bytes: f(|r| r.precopy_bytes as f64),
        switchover_bytes: f(|r| r.switchover_bytes as f64),
        total_seconds: f(|r| r.total.as_secs_f64()),
        estimated_ms: reps
            .iter()
            .any(|r| r.estimated.is_some())
            .then(|| spread(reps.iter().filter_map(|r| r.estimated).map(|d| d.as_secs_f64() * 1000.0).collect())),
        triggers,
        reps,
    }
}

impl LiveResult {
    /// The variant's entry in the JSON `downtime` array (`design` and `ms` as the whole-run
    /// entries have them).
    pub(super) fn json(&self, stop_copy: Option<&LiveResult>) -> Value {
        let mut v = json!({
            "design": self.variant.name(),
            "ms": self.ms.json(),
            "measured_from": "switchover_call",
            "downtime_measured_to": "destination_running",
            "receiver_returned_ms": self.to_return_ms.json(),
            "backend": "uring",
            "mode": if self.variant == Variant::StopCopy { "stop-copy" } else { "precopy" },
            "precopy_seconds": self.precopy_seconds.json(),
            "precopy_bytes": self.precopy_bytes.json(),
            "switchover_bytes": self.switchover_bytes.json(),
            "total_seconds": self.total_seconds.json(),
            "estimated_switchover_ms": self.estimated_ms.as_ref().map(Spread::json),
            "triggers": self.triggers,
            "state_digests_verified": true,
            "reps": self.reps.iter().map(|r| json!({
                "downtime_ms": r.downtime.as_secs_f64() * 1000.0,
                "receiver_returned_ms": r.to_return.as_secs_f64() * 1000.0,
                "precopy_seconds": r.precopy_time.as_secs_f64(),
                "precopy_bytes": r.precopy_bytes,
                "switchover_bytes": r.switchover_bytes,
                "total_seconds": r.total.as_secs_f64(),
                "estimated_switchover_ms": r.estimated.map(|d| d.as_secs_f64() * 1000.0),
                "switchover": r.switchover,
            })).collect::<Vec<_>>(),
        });
        if let Some(sc) = stop_copy.filter(|_| self.variant != Variant::StopCopy) {
            v["downtime_vs_stop_copy"] = json!(self.ms.median / sc.ms.median.max(1e-9));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both variants on tiny devices: the numbers mean what the report says they mean.
    #[test]
    fn both_variants_measure_the_switchover() {
        if let Some(why) = vfio_multifd::uring_capabilities().unavailable {
            eprintln!("skipped: io_uring unavailable ({why})");
            return;
        }
        let s = Scenario {
            devices: 2,
            size: 4 << 20,
            channels: 2,
            chunk: 1 << 20,
            dirty_rate: 4 << 20,
            downtime_limit: Duration::from_millis(300),
            max_precopy: Duration::from_secs(10),
        };
        let image = s.size * s.devices as u64;
        let sc = run_once(Variant::StopCopy, &s).unwrap();
        assert_eq!(sc.trigger, Trigger::Immediate);
        assert_eq!(sc.precopy_bytes, 0);
        assert!(sc.switchover_bytes >= image, "{sc:?}");
        assert!(sc.downtime > Duration::ZERO && sc.downtime <= sc.total, "{sc:?}");
        let pc = run_once(Variant::Precopy, &s).unwrap();
        assert!(matches!(pc.trigger, Trigger::Converged | Trigger::MaxPrecopy), "{pc:?}");
        assert!(pc.precopy_bytes >= image, "{pc:?}");
        assert!(pc.downtime > Duration::ZERO && pc.downtime <= pc.total, "{pc:?}");
        assert_eq!(pc.switchover["downtime_measured_to"], "destination_running");
        assert!(sc.estimated.is_none(), "{sc:?}");
        let a = aggregate(Variant::Precopy, vec![pc]);
        let j = a.json(Some(&aggregate(Variant::StopCopy, vec![sc])));
        assert!(j["downtime_vs_stop_copy"].is_f64(), "{j}");
        assert_eq!(j["triggers"].as_object().map(|o| o.values().filter_map(Value::as_u64).sum::<u64>()), Some(1));
    }
}
