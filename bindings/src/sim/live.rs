//! The device's shared core: its migration state, the live image (page versions and their
//! dirtying) and the save-session bookkeeping that turns dirtied pages into dirty records.
//!
//! The core is shared by the [`SimDevice`](super::SimDevice), its save producer thread and
//! every [`SimHandle`](super::SimHandle). Lock order: a device core, then (in
//! [`SimHandle::dma_write_to`](super::SimHandle::dma_write_to)) a second core with a higher
//! id, then the save session's I/O lock or the fabric's lock; nothing is taken while one of
//! the last two is held.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::config::{DirtyRelease, SimConfig};
use super::content::{page_count, page_len, splitmix64, DirtyRecord, DIRTY_RECORD_HEADER, SIM_PAGE_SIZE};
use super::fabric::Fabric;
use crate::state::MigState;
use crate::sys::{self, EventFd};

/// Source of [`DevCore::id`]s (the lock order between two cores).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Salt of the dirtying sequence (which page the n-th dirtying hits).
const DIRTY_SALT: u64 = 0xD127_7A6E_5EED_0001;

/// Whether a device in `s` is running: it changes its state (dirtying, guest writes and
/// incoming P2P DMA land).
pub(super) const fn is_running(s: MigState) -> bool {
    matches!(s, MigState::Running | MigState::PreCopy | MigState::RunningP2p | MigState::PreCopyP2p)
}

/// Whether a device in `s` may initiate new P2P DMA (the P2P states must not).
pub(super) const fn may_initiate_p2p(s: MigState) -> bool {
    matches!(s, MigState::Running | MigState::PreCopy)
}

/// Record bytes (header and payload) of page `page` of an image of `size` bytes.
fn record_bytes(size: u64, page: u64) -> u64 {
    DIRTY_RECORD_HEADER as u64 + page_len(size, page)
}

/// What a device, its producer and its handles share.
#[derive(Debug)]
pub(super) struct DevCore {
    /// Unique per core: the order in which two cores are locked.
    pub(super) id: u64,
    /// The device's name, for the fabric's messages.
    pub(super) name: String,
    /// Pages of the device's image (also for a device that is not live).
    pub(super) pages: u64,
    inner: Mutex<CoreState>,
}

impl DevCore {
    /// A RUNNING device; live (with an image of version-0 pages whose dirtying clock starts
    /// now) if `cfg` has a dirty rate.
    pub(super) fn new(cfg: &SimConfig) -> Arc<DevCore> {
        let live = cfg.dirty_rate_bytes_per_sec.map(|rate| LiveImage::new(cfg, rate));
        Arc::new(DevCore {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: cfg.name.clone(),
            pages: page_count(cfg.size),
            inner: Mutex::new(CoreState { state: MigState::Running, live, fabric: None }),
        })
    }

    /// Locks the core (a poisoned lock is taken over: the state is plain data).
    pub(super) fn lock(&self) -> MutexGuard<'_, CoreState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Page versions now (dirtying brought up to date first).
    pub(super) fn page_versions(&self) -> Vec<u32> {
        let mut g = self.lock();
        g.tick();
        match &g.live {
            Some(l) => l.versions.clone(),
            None => vec![0; usize::try_from(self.pages).unwrap_or(0)],
        }
    }
}

/// The state behind [`DevCore`]'s lock.
#[derive(Debug)]
pub(super) struct CoreState {
    /// The device's migration state.
    pub(super) state: MigState,
    /// The live image, for a device with a dirty rate.
    pub(super) live: Option<LiveImage>,
    /// The fabric the device joined.
    pub(super) fabric: Option<Fabric>,
}

impl CoreState {
    /// Applies the dirtying due since the last call (only time spent running counts).
    pub(super) fn tick(&mut self) {
        let running = is_running(self.state);
        if let Some(l) = &mut self.live {
            l.advance(Instant::now(), running);
        }
    }

    /// One write into page `page` (taken modulo the page count) lands: its version is
    /// bumped. A device that is not live has no versions: nothing changes.
    pub(super) fn write_page(&mut self, page: u64) {
        if let Some(l) = &mut self.live {
            if l.pages > 0 {
                l.bump(page % l.pages);
            }
        }
    }
}

/// Time-based dirtying: how many pages are due after so much running time.
#[derive(Debug)]
struct DirtyClock {
    /// Bytes per second (one dirtying = one page = 4 KiB).
    rate: u64,
    /// When the clock was last advanced.
    last: Instant,
    /// Nanoseconds spent running so far.
    run_nanos: u128,
    /// Dirtyings applied so far.
    done: u64,
}

impl DirtyClock {
    /// Advances to `now`; returns how many new dirtyings are due.
    fn advance(&mut self, now: Instant, running: bool) -> u64 {
        if running {
            self.run_nanos += now.saturating_duration_since(self.last).as_nanos();
        }
        self.last = self.last.max(now);
        let due = self.run_nanos * u128::from(self.rate) / (u128::from(SIM_PAGE_SIZE) * 1_000_000_000);
        let due = u64::try_from(due).unwrap_or(u64::MAX);
        let n = due.saturating_sub(self.done);
        self.done = self.done.max(due);
        n
    }

    /// Running time until the next dirtying is due (`None` at rate 0).
    fn until_next(&self) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        let next = u128::from(self.done) + 1;
        let at = (next * u128::from(SIM_PAGE_SIZE) * 1_000_000_000).div_ceil(u128::from(self.rate));
        let wait = at.saturating_sub(self.run_nanos);
        Some(Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX)))
    }
}

/// A live device's state: one version per page, and the current save session's bookkeeping.
#[derive(Debug)]
pub(super) struct LiveImage {
    seed: u64,
    size: u64,
    pages: u64,
    release: DirtyRelease,
    /// The version of every page (index = page number). Version 0 is the base content.
    pub(super) versions: Vec<u32>,
    clock: DirtyClock,
    /// How many dirtyings the clock has applied (the index into the page sequence).
    picks: u64,
    /// The save session's bookkeeping, while one exists.
    pub(super) track: Option<SaveTrack>,
}

/// What one save session has streamed, and what it still owes.
#[derive(Debug)]
pub(super) struct SaveTrack {
    /// Base bytes streamed in PRE_COPY (the rest follows in STOP_COPY).
    pub(super) precopy_len: u64,
    /// Base bytes handed to the producer so far (it produces them in order).
    pub(super) base_reserved: u64,
    /// Pages whose base bytes were all handed to the producer: a record may follow them.
    covered: u64,
    /// The version the stream carries for each page: 0 (the base) or its last record's.
    sent: Vec<u32>,
    /// Covered pages whose version differs from `sent`, released for production, in order.
    queue: VecDeque<u64>,
    /// Record bytes of `queue`.
    pub(super) queue_bytes: u64,
    /// Like `queue`, but not yet released ([`DirtyRelease::OnPrecopyInfo`]).
    held: Vec<u64>,
    /// Record bytes of `held`.
    pub(super) held_bytes: u64,
    /// STOP_COPY was seen: everything is released from now on.
    release_all: bool,
    /// Wakes the producer.
    wake: Arc<EventFd>,
}

impl SaveTrack {
    /// Record bytes owed by the stream and not yet produced (released or not).
    pub(super) fn pending_bytes(&self) -> u64 {
        self.queue_bytes + self.held_bytes
    }
}

/// The producer's next step, decided under the core lock.
#[derive(Debug)]
pub(super) enum Plan {
    /// Produce base bytes `off..off + len`.
    Base {
        /// Offset in the base image.
        off: u64,
        /// Length.
        len: usize,
    },
    /// Produce these records (already taken off the queue and marked sent).
    Records(Vec<DirtyRecord>),
    /// Nothing to produce now: wait for a wake-up, or at most this long.
    Idle(Option<Duration>),
    /// Everything is produced: end the stream.
    Eof,
}

impl Plan {
    /// Stream bytes the plan produces.
    pub(super) fn bytes(&self) -> u64 {
        match self {
            Plan::Base { len, .. } => *len as u64,
            Plan::Records(r) => r.iter().map(DirtyRecord::encoded_len).sum(),
            Plan::Idle(_) | Plan::Eof => 0,
        }
    }
}

impl LiveImage {
    fn new(cfg: &SimConfig, rate: u64) -> LiveImage {
        let pages = page_count(cfg.size);
        LiveImage {
            seed: cfg.seed,
            size: cfg.size,
            pages,
            release: cfg.dirty_release,
            versions: vec![0; usize::try_from(pages).unwrap_or(0)],
            clock: DirtyClock { rate, last: Instant::now(), run_nanos: 0, done: 0 },
            picks: 0,
            track: None,
        }
    }

    /// Applies the dirtyings due at `now`; each hits a page chosen by the seed's sequence.
    fn advance(&mut self, now: Instant, running: bool) {
        let n = self.clock.advance(now, running);
        if self.pages == 0 {
            return;
        }
        for _ in 0..n {
            let p = splitmix64(self.seed ^ DIRTY_SALT ^ self.picks.wrapping_mul(0x9E37_79B9_7F4A_7C15)) % self.pages;
            self.picks = self.picks.wrapping_add(1);
            self.bump(p);
        }
    }

    /// Bumps page `p`'s version; a covered page that becomes pending is queued (or held).
    fn bump(&mut self, p: u64) {
        let i = p as usize;
        let old = self.versions[i];
        let new = old.saturating_add(1);
        self.versions[i] = new;
        let Some(t) = &mut self.track else {
            return;
        };
        if p < t.covered && t.sent[i] == old && new != old {
            enqueue(t, self.release, self.size, p);
        }
    }

    /// Starts a save session's bookkeeping: the stream carries version 0 of every page.
    pub(super) fn start_track(&mut self, precopy_len: u64, wake: Arc<EventFd>) {
        self.track = Some(SaveTrack {
            precopy_len: precopy_len.min(self.size),
            base_reserved: 0,
            covered: 0,
            sent: vec![0; self.versions.len()],
            queue: VecDeque::new(),
            queue_bytes: 0,
            held: Vec::new(),
            held_bytes: 0,
            release_all: false,
            wake,
        });
    }

    /// The power-on state (a reset, or a driver preparing to resume): every page at version 0.
    pub(super) fn clear(&mut self) {
        self.versions.iter_mut().for_each(|v| *v = 0);
    }

    /// Makes `versions` the device state (a successful resume).
    pub(super) fn install(&mut self, versions: Vec<u32>) {
        if versions.len() == self.versions.len() {
            self.versions = versions;
        }
    }

    /// Releases held records for production ([`DirtyRelease::OnPrecopyInfo`]); returns
    /// whether any were held.
    pub(super) fn release(&mut self) -> bool {
        let Some(t) = &mut self.track else {
            return false;
        };
        if t.held.is_empty() {
            return false;
        }
        t.queue.extend(t.held.drain(..));
        t.queue_bytes += std::mem::take(&mut t.held_bytes);
        sys::eventfd_signal(&t.wake);
        true
    }

    /// Record bytes a STOP_COPY would still stream for pages not yet covered (their base
    /// bytes are still to come, and a record must follow them). Without a session: records
    /// for every page not at version 0.
    pub(super) fn owed_uncovered_bytes(&self) -> u64 {
        let (from, sent) = match &self.track {
            Some(t) => (t.covered, Some(&t.sent)),
            None => (0, None),
        };
        (from..self.pages)
            .filter(|&p| self.versions[p as usize] != sent.map_or(0, |s| s[p as usize]))
            .map(|p| record_bytes(self.size, p))
            .sum()
    }

    /// The producer's next step. `finale`: the device is in STOP_COPY (the rest of the base,
    /// then every pending record, then EOF); `room`: at most this many bytes (at least one
    /// record is taken if any is due); `running`: the device may still dirty pages.
    pub(super) fn plan(&mut self, finale: bool, room: u64, running: bool) -> Plan {
        let (size, release) = (self.size, self.release);
        let idle = self.idle_wait(finale, running);
        let Some(t) = &mut self.track else {
            return Plan::Eof;
        };
        if finale && !t.release_all {
            t.release_all = true;
            t.queue.extend(t.held.drain(..));
            t.queue_bytes += std::mem::take(&mut t.held_bytes);
        }
        let limit = if finale { size } else { t.precopy_len };
        if t.base_reserved < limit {
            let len = (limit - t.base_reserved).min(room).max(1);
            let off = t.base_reserved;
            t.base_reserved += len;
            let covered = if t.base_reserved >= size { self.pages } else { t.base_reserved / SIM_PAGE_SIZE };
            for p in t.covered..covered {
                if self.versions[p as usize] != t.sent[p as usize] {
                    enqueue(t, release, size, p);
                }
            }
            t.covered = t.covered.max(covered);
            return Plan::Base { off, len: len as usize };
        }
        let mut recs = Vec::new();
        let mut bytes = 0u64;
        while bytes < room || recs.is_empty() {
            let Some(p) = t.queue.pop_front() else { break };
            let version = self.versions[p as usize];
            t.sent[p as usize] = version;
            let len = page_len(size, p);
            t.queue_bytes -= DIRTY_RECORD_HEADER as u64 + len;
            bytes += DIRTY_RECORD_HEADER as u64 + len;
            recs.push(DirtyRecord { page: p, version, len: len as u32 });
        }
        if !recs.is_empty() {
            Plan::Records(recs)
        } else if finale && !running {
            Plan::Eof
        } else {
            Plan::Idle(idle)
        }
    }

    /// In STOP_COPY (`running` false): whether the stream has nothing left to produce, as
    /// [`LiveImage::plan`] would find with `finale` (everything held is released first, as
    /// `plan` does).
    pub(super) fn finale_empty(&mut self, running: bool) -> bool {
        let size = self.size;
        let Some(t) = &mut self.track else { return true };
        if !t.release_all {
            t.release_all = true;
            t.queue.extend(t.held.drain(..));
            t.queue_bytes += std::mem::take(&mut t.held_bytes);
        }
        !running && t.base_reserved >= size && t.queue.is_empty()
    }

    /// How long an idle producer waits before it looks for new dirtying by itself: only in
    /// PRE_COPY with continuous release and background dirtying (otherwise new records come
    /// with a wake-up: a guest write, PRECOPY_INFO, a state change).
    fn idle_wait(&self, finale: bool, running: bool) -> Option<Duration> {
        if finale || !running || self.release != DirtyRelease::Continuous {
            return None;
        }
        self.clock.until_next().map(|d| d.clamp(Duration::from_millis(1), Duration::from_millis(100)))
    }
}

/// Puts covered page `p` (now pending) on the queue, or holds it until the next release.
fn enqueue(t: &mut SaveTrack, release: DirtyRelease, size: u64, p: u64) {
    let bytes = record_bytes(size, p);
    if release == DirtyRelease::Continuous || t.release_all {
        t.queue.push_back(p);
        t.queue_bytes += bytes;
        sys::eventfd_signal(&t.wake);
    } else {
        t.held.push(p);
        t.held_bytes += bytes;
    }
}
