//! The VM around simulated devices: a [`Fabric`] that sees every state change of its devices
//! and records what would corrupt a migration, and [`SimHandle`]s through which a test plays
//! the guest (MMIO writes from vCPUs) and the devices themselves (peer-to-peer DMA).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use super::content::state_digest;
use super::live::{is_running, may_initiate_p2p, CoreState, DevCore};
use crate::state::MigState;

/// Something that, in a real VM, would lose data or corrupt a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// `device` stopped (entered STOP or STOP_COPY from a running state) while `peer` was in
    /// RUNNING or PRE_COPY, so the peer could still initiate P2P DMA into it. The VMM must
    /// first move every device to its P2P state (RUNNING_P2P / PRE_COPY_P2P), then stop them.
    /// Recorded once per stop and peer (not again on STOP→STOP_COPY).
    StoppedWhilePeerMayDma {
        /// The device that stopped.
        device: String,
        /// The state it entered.
        state: MigState,
        /// A peer that could still initiate P2P DMA.
        peer: String,
        /// The peer's state.
        peer_state: MigState,
    },
    /// `device` entered RUNNING or PRE_COPY (it may initiate P2P DMA again) while `peer` was
    /// in STOP, STOP_COPY or RESUMING. The VMM must first move every device to RUNNING_P2P,
    /// then to RUNNING (QEMU's start order).
    StartedWhilePeerStopped {
        /// The device that may initiate P2P DMA again.
        device: String,
        /// The state it entered.
        state: MigState,
        /// A peer that must not be touched.
        peer: String,
        /// The peer's state.
        peer_state: MigState,
    },
    /// A guest (vCPU MMIO) write to a device that was not running was lost.
    GuestWriteLost {
        /// The device written.
        device: String,
        /// Its state.
        state: MigState,
        /// The page written.
        page: u64,
    },
    /// A P2P DMA write from a device allowed to initiate it into a device that was not
    /// running was lost.
    DmaLost {
        /// The initiator.
        from: String,
        /// The target.
        to: String,
        /// The target's state.
        to_state: MigState,
        /// The page written.
        page: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::StoppedWhilePeerMayDma { device, state, peer, peer_state } => {
                write!(f, "device {device} stopped ({state}) while peer {peer} ({peer_state}) could still DMA into it")
            }
            Violation::StartedWhilePeerStopped { device, state, peer, peer_state } => {
                write!(f, "device {device} entered {state} (may initiate P2P DMA) while peer {peer} is in {peer_state}")
            }
            Violation::GuestWriteLost { device, state, page } => {
                write!(f, "guest write to device {device} in {state} lost (page {page})")
            }
            Violation::DmaLost { from, to, to_state, page } => {
                write!(f, "P2P DMA from {from} into device {to} in {to_state} lost (page {page})")
            }
        }
    }
}

/// Counters of the writes a [`Fabric`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FabricStats {
    /// Guest writes that landed (the device was running).
    pub guest_writes_landed: u64,
    /// Guest writes that were lost (each is also a [`Violation::GuestWriteLost`]).
    pub guest_writes_lost: u64,
    /// P2P DMA writes that landed.
    pub dma_landed: u64,
    /// P2P DMA writes that were lost (each is also a [`Violation::DmaLost`]).
    pub dma_lost: u64,
    /// P2P DMA writes a quiesced initiator (P2P state, or not running) did not issue: the
    /// P2P states working as intended, not a violation.
    pub dma_not_initiated: u64,
}

impl FabricStats {
    /// Guest and DMA writes that landed.
    pub fn writes_landed(&self) -> u64 {
        self.guest_writes_landed + self.dma_landed
    }

    /// Guest and DMA writes that were lost.
    pub fn writes_lost(&self) -> u64 {
        self.guest_writes_lost + self.dma_lost
    }
}

/// One state change of a device on a [`Fabric`]: a direct arc of a SET, a failed arc that
/// left the device in ERROR, or a reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// The device.
    pub device: String,
    /// Its state before.
    pub from: MigState,
    /// Its state after.
    pub to: MigState,
}

/// A device as the fabric sees it.
#[derive(Debug)]
struct Member {
    id: u64,
    name: String,
    state: MigState,
}

/// Behind the fabric's lock.
#[derive(Debug, Default)]
struct FabricState {
    members: Vec<Member>,
    log: Vec<StateChange>,
    violations: Vec<Violation>,
    stats: FabricStats,
}

/// The devices of one VM and what connects them: it sees every state change of every device
/// that [joined](super::SimDevice::join) it, counts guest and P2P DMA writes, and records
/// [`Violation`]s: lost writes, and state changes that break the P2P ordering rule (all
/// devices to a P2P state before any stops; all to RUNNING_P2P before any runs again).
///
/// Cheap to clone (a shared handle); `Send + Sync`. A fabric models a *running* VM: a
/// destination's devices, RUNNING only nominally until they enter RESUMING, should join it
/// (or their own fabric) once they are RESUMING.
#[derive(Debug, Clone, Default)]
pub struct Fabric {
    inner: Arc<Mutex<FabricState>>,
}

impl Fabric {
    /// An empty fabric.
    pub fn new() -> Fabric {
        Fabric::default()
    }

    fn lock(&self) -> MutexGuard<'_, FabricState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every violation so far, in order.
    pub fn violations(&self) -> Vec<Violation> {
        self.lock().violations.clone()
    }

    /// The write counters.
    pub fn stats(&self) -> FabricStats {
        self.lock().stats
    }

    /// Guest and DMA writes that landed.
    pub fn writes_landed(&self) -> u64 {
        self.stats().writes_landed()
    }

    /// Guest and DMA writes that were lost.
    pub fn writes_lost(&self) -> u64 {
        self.stats().writes_lost()
    }

    /// Every state change of every member, in order.
    pub fn state_log(&self) -> Vec<StateChange> {
        self.lock().log.clone()
    }

    /// The members and their states.
    pub fn devices(&self) -> Vec<(String, MigState)> {
        self.lock().members.iter().map(|m| (m.name.clone(), m.state)).collect()
    }

    pub(super) fn register(&self, id: u64, name: &str, state: MigState) {
        let mut f = self.lock();
        f.members.retain(|m| m.id != id);
        f.members.push(Member { id, name: name.to_owned(), state });
    }

    pub(super) fn unregister(&self, id: u64) {
        self.lock().members.retain(|m| m.id != id);
    }

    /// Device `id` went from `from` to `to`: log it and check the ordering rules.
    pub(super) fn note_state(&self, id: u64, name: &str, from: MigState, to: MigState) {
        let mut f = self.lock();
        let f = &mut *f;
        f.log.push(StateChange { device: name.to_owned(), from, to });
        if let Some(m) = f.members.iter_mut().find(|m| m.id == id) {
            m.state = to;
        }
        let stops = matches!(to, MigState::Stop | MigState::StopCopy) && is_running(from);
        let starts = may_initiate_p2p(to) && !may_initiate_p2p(from);
        for peer in f.members.iter().filter(|m| m.id != id) {
            let (device, state, peer_name, peer_state) = (name.to_owned(), to, peer.name.clone(), peer.state);
            if stops && may_initiate_p2p(peer.state) {
                f.violations.push(Violation::StoppedWhilePeerMayDma { device, state, peer: peer_name, peer_state });
            } else if starts && matches!(peer.state, MigState::Stop | MigState::StopCopy | MigState::Resuming) {
                f.violations.push(Violation::StartedWhilePeerStopped { device, state, peer: peer_name, peer_state });
            }
        }
    }

    fn note_guest_write(&self, device: &str, state: MigState, page: u64, landed: bool) {
        let mut f = self.lock();
        if landed {
            f.stats.guest_writes_landed += 1;
        } else {
            f.stats.guest_writes_lost += 1;
            f.violations.push(Violation::GuestWriteLost { device: device.to_owned(), state, page });
        }
    }

    fn note_dma(&self, from: &str, to: &str, to_state: MigState, page: u64, outcome: Option<bool>) {
        let mut f = self.lock();
        match outcome {
            None => f.stats.dma_not_initiated += 1,
            Some(true) => f.stats.dma_landed += 1,
            Some(false) => {
                f.stats.dma_lost += 1;
                f.violations.push(Violation::DmaLost { from: from.to_owned(), to: to.to_owned(), to_state, page });
            }
        }
    }
}

/// A handle on a [`SimDevice`](super::SimDevice) that stays usable after the device was moved
/// into the engine: the guest's vCPUs writing to it, the device initiating P2P DMA, and its
/// state as a test wants to check it. `Clone + Send + Sync`; from
/// [`SimDevice::handle`](super::SimDevice::handle).
///
/// A write that lands bumps the page's version on a live device
/// ([`SimConfig::dirty_rate_bytes_per_sec`](super::SimConfig::dirty_rate_bytes_per_sec),
/// `with_dirty_rate(0)` for one that changes only through these writes), so it is migrated
/// like any dirtied page. A device that is not live has a fixed state: its writes are counted
/// and checked but change nothing.
#[derive(Clone)]
pub struct SimHandle {
    pub(super) core: Arc<DevCore>,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle").field("name", &self.core.name).finish()
    }
}

impl SimHandle {
    /// The device's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The device's migration state.
    pub fn state(&self) -> MigState {
        self.core.lock().state
    }

    /// A vCPU writes (MMIO) into page `page` (modulo the page count) of the device. It lands
    /// (returns true) if the device is running (RUNNING, PRE_COPY, RUNNING_P2P,
    /// PRE_COPY_P2P); otherwise it is lost, and the device's fabric records
    /// [`Violation::GuestWriteLost`]: the VMM stopped the device while its guest still ran.
    pub fn guest_write(&self, page: u64) -> bool {
        let mut g = self.core.lock();
        g.tick();
        let state = g.state;
        let landed = is_running(state);
        if landed {
            g.write_page(page);
        }
        if let Some(f) = &g.fabric {
            f.note_guest_write(&self.core.name, state, page, landed);
        }
        landed
    }

    /// This device initiates a P2P DMA write into page `page` of `target`. Only a device in
    /// RUNNING or PRE_COPY initiates one: in a P2P state (or stopped) it does not happen
    /// (false; counted as not initiated, not a violation). An initiated write lands (true) if
    /// the target is running (the P2P states still accept incoming DMA); otherwise it is lost
    /// (false) and recorded as [`Violation::DmaLost`] on the initiator's fabric (or the
    /// target's). Both devices are locked for the whole write, so a write in flight completes
    /// before either device's next state change, as the uAPI requires of the P2P arcs.
    pub fn dma_write_to(&self, target: &SimHandle, page: u64) -> bool {
        if Arc::ptr_eq(&self.core, &target.core) {
            let mut g = self.core.lock();
            g.tick();
            return self.dma_locked(&mut g, None, target, page);
        }
        let (a, b) = (&self.core, &target.core);
        let (mut ga, mut gb) = if a.id < b.id {
            let ga = a.lock();
            (ga, b.lock())
        } else {
            let gb = b.lock();
            (a.lock(), gb)
        };
        ga.tick();
        gb.tick();
        self.dma_locked(&mut ga, Some(&mut gb), target, page)
    }

    /// [`SimHandle::dma_write_to`] with the initiator's core (and, unless it writes into
    /// itself, the target's) locked.
    fn dma_locked(&self, a: &mut CoreState, b: Option<&mut CoreState>, target: &SimHandle, page: u64) -> bool {
        let initiates = may_initiate_p2p(a.state);
        let fabric = a.fabric.clone().or_else(|| b.as_ref().and_then(|b| b.fabric.clone()));
        let b = match b {
            Some(b) => b,
            None => a,
        };
        let to_state = b.state;
        let outcome = initiates.then(|| is_running(to_state));
        if outcome == Some(true) {
            b.write_page(page);
        }
        if let Some(f) = fabric {
            f.note_dma(&self.core.name, &target.core.name, to_state, page, outcome);
        }
        outcome == Some(true)
    }

    /// The device's page versions (index = page): its state now on a source (frozen once it
    /// is stopped), the state loaded from the stream on a destination after RESUMING→STOP.
    /// All zero for a device that is not live.
    pub fn page_versions(&self) -> Vec<u32> {
        self.core.page_versions()
    }

    /// [`state_digest`](super::state_digest) of [`SimHandle::page_versions`].
    pub fn state_digest(&self) -> u64 {
        state_digest(&self.core.page_versions())
    }
}
