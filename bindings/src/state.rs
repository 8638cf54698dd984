//! Migration states, capability flags and the kernel's next-step table.
//!
//! This mirrors `vfio_mig_get_next_state()` in `drivers/vfio/vfio_main.c`: a
//! device only implements *direct* arcs, and any other request is walked one
//! arc at a time through this table. The table is pure data; it is shared by
//! the real device (to walk arcs from user space, one `SET` per arc) and by the
//! simulated device (to behave exactly like the kernel core does).

use std::fmt;

/// `enum vfio_device_mig_state` from the VFIO uAPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum MigState {
    /// The device failed an arc it could not roll back; only a reset leaves it.
    Error = 0,
    /// Not running, no DMA, no interrupts; config space still works.
    Stop = 1,
    /// Running normally.
    Running = 2,
    /// Stopped, saving: the save data fd streams the final state.
    StopCopy = 3,
    /// Stopped, loading: the resume data fd accepts a saved stream.
    Resuming = 4,
    /// Running but no new peer-to-peer DMA.
    RunningP2p = 5,
    /// Running and saving its pre-copy (initial and dirty) state.
    PreCopy = 6,
    /// Pre-copy with peer-to-peer DMA quiesced.
    PreCopyP2p = 7,
}

impl MigState {
    /// All states, in uAPI order.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    /// The uAPI value.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// Parses a uAPI value; `None` for values the uAPI does not define.
    pub const fn from_raw(v: u32) -> Option<MigState> {
        Some(match v {
            0 => MigState::Error,
            1 => MigState::Stop,
            2 => MigState::Running,
            3 => MigState::StopCopy,
            4 => MigState::Resuming,
            5 => MigState::RunningP2p,
            6 => MigState::PreCopy,
            7 => MigState::PreCopyP2p,
            _ => return None,
        })
    }

    /// Whether the state belongs to the "saving group" that shares one save data fd.
    pub const fn is_saving(self) -> bool {
        matches!(self, MigState::PreCopy | MigState::PreCopyP2p | MigState::StopCopy)
    }

    /// Short upper-case name as the uAPI spells it.
    pub const fn name(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }
}

impl fmt::Display for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `VFIO_DEVICE_FEATURE_MIGRATION` flags: which optional states a device supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MigFlags(u64);

impl MigFlags {
    /// `VFIO_MIGRATION_STOP_COPY`: mandatory for any migratable device.
    pub const STOP_COPY: MigFlags = MigFlags(1 << 0);
    /// `VFIO_MIGRATION_P2P`: adds RUNNING_P2P (and PRE_COPY_P2P with PRE_COPY).
    pub const P2P: MigFlags = MigFlags(1 << 1);
    /// `VFIO_MIGRATION_PRE_COPY`: adds PRE_COPY.
    pub const PRE_COPY: MigFlags = MigFlags(1 << 2);
    /// Every flag this crate knows.
    pub const ALL: MigFlags = MigFlags(0b111);

    /// Wraps raw flag bits as the kernel reports them (unknown bits are kept).
    pub const fn from_bits(bits: u64) -> MigFlags {
        MigFlags(bits)
    }

    /// Raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: MigFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Union.
    pub const fn union(self, other: MigFlags) -> MigFlags {
        MigFlags(self.0 | other.0)
    }

    /// Whether a device with these flags has `state` at all (`vfio_mig_get_next_state`'s
    /// `state_flags_table`).
    pub const fn supports(self, state: MigState) -> bool {
        let need = match state {
            MigState::Running | MigState::Stop | MigState::StopCopy | MigState::Resuming => MigFlags::STOP_COPY.0,
            MigState::RunningP2p => MigFlags::STOP_COPY.0 | MigFlags::P2P.0,
            MigState::PreCopy => MigFlags::STOP_COPY.0 | MigFlags::PRE_COPY.0,
            MigState::PreCopyP2p => MigFlags::STOP_COPY.0 | MigFlags::P2P.0 | MigFlags::PRE_COPY.0,
            // ERROR is always "supported" as a current state, never as a target.
            MigState::Error => 0,
        };
        self.0 & need == need
    }
}

impl std::ops::BitOr for MigFlags {
    type Output = MigFlags;
    fn bitor(self, rhs: MigFlags) -> MigFlags {
        self.union(rhs)
    }
}

impl fmt::Display for MigFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.contains(MigFlags::STOP_COPY) {
            parts.push("STOP_COPY");
        }
        if self.contains(MigFlags::P2P) {
            parts.push("P2P");
        }
        if self.contains(MigFlags::PRE_COPY) {
            parts.push("PRE_COPY");
        }
        if parts.is_empty() {
            parts.push("none");
        }
        write!(f, "{} ({:#x})", parts.join("|"), self.0)
    }
}

use MigState::{
    Error as ERR, PreCopy as PC, PreCopyP2p as PCP, Resuming as RES, Running as RUN, RunningP2p as RP, Stop as STOP,
    StopCopy as SC,
};

/// The kernel's next-step table, indexed `[current][target]` by uAPI value.
const NEXT: [[MigState; 8]; 8] = [
    //            ERROR STOP  RUN   SC    RES   RP    PC    PCP
    /* ERROR */
    [ERR, ERR, ERR, ERR, ERR, ERR, ERR, ERR],
    /* STOP  */ [ERR, STOP, RP, SC, RES, RP, RP, RP],
    /* RUN   */ [ERR, RP, RUN, RP, RP, RP, PC, RP],
    /* SC    */ [ERR, STOP, STOP, SC, STOP, STOP, ERR, ERR],
    /* RES   */ [ERR, STOP, STOP, STOP, RES, STOP, STOP, STOP],
    /* RP    */ [ERR, STOP, RUN, STOP, STOP, RP, RUN, PCP],
    /* PC    */ [ERR, RUN, RUN, PCP, RUN, RUN, PC, PCP],
    /* PCP   */ [ERR, RP, RP, SC, RP, RP, PC, PCP],
];

/// The next direct arc the kernel takes from `cur` towards `target` on a device with `flags`,
/// or `None` where the kernel answers `-EINVAL` (unsupported current or target state, a
/// target of ERROR, or a path that would end in ERROR, such as STOP_COPY → PRE_COPY).
///
/// `next_step(f, s, s) == Some(s)` for any supported `s`: no arc is needed.
pub fn next_step(flags: MigFlags, cur: MigState, target: MigState) -> Option<MigState> {
    if !flags.contains(MigFlags::STOP_COPY) {
        return None;
    }
    if target == MigState::Error || !flags.supports(target) {
        return None;
    }
    if cur != MigState::Error && !flags.supports(cur) {
        return None;
    }
    let mut next = NEXT[cur as usize][target as usize];
    // Skip states the device lacks by looking up again from the unsupported one, as the
    // kernel does ("while (!(state_flags_table[*next_fsm] & device->migration_flags))").
    let mut guard = 0;
    while next != MigState::Error && !flags.supports(next) {
        next = NEXT[next as usize][target as usize];
        guard += 1;
        if guard > 8 {
            return None;
        }
    }
    if next == MigState::Error {
        None
    } else {
        Some(next)
    }
}

/// Whether `from → to` is a direct arc that creates a new data fd (the only four that do).
pub const fn arc_creates_data_fd(from: MigState, to: MigState) -> bool {
    matches!(
        (from, to),
        (MigState::Running, MigState::PreCopy)
            | (MigState::RunningP2p, MigState::PreCopyP2p)
            | (MigState::Stop, MigState::StopCopy)
            | (MigState::Stop, MigState::Resuming)
    )
}

/// The full list of direct arcs the kernel walks from `cur` to `target`, or `None` where it
/// answers `-EINVAL`. The result is empty when `cur == target`.
pub fn path(flags: MigFlags, cur: MigState, target: MigState) -> Option<Vec<MigState>> {
    let mut out = Vec::new();
    let mut at = cur;
    while at != target {
        let n = next_step(flags, at, target)?;
        out.push(n);
        at = n;
        if out.len() > 8 {
            return None;
        }
    }
    if cur == target && next_step(flags, cur, target).is_none() {
        return None;
    }
    Some(out)
}
