//! A simulated migratable device that follows the kernel's VFIO migration semantics.
//!
//! The host kernels this project runs on have no VFIO, so tests and benchmarks drive a
//! [`SimDevice`] instead. It behaves like a VFIO variant driver as seen from user space:
//!
//! * **States and arcs.** [`MigrationDevice::set_state_raw`] walks the kernel's next-step table
//!   ([`crate::state::next_step`]) exactly like a driver's `set_state` loop: one SET may take
//!   several direct arcs, a data fd is returned only when the *final* arc is one of the four
//!   that create one, and a failing arc leaves the device where [`ArcFault::leave`] says.
//! * **Save fd.** The read end of a real pipe (`O_CLOEXEC`, blocking unless
//!   [`SimConfig::nonblocking_save`], as mlx5 honours `O_NONBLOCK`), filled by a producer
//!   thread; io_uring and plain `read(2)` see it like a VFIO data fd (a stream: `pread` gives
//!   `ESPIPE`). PRE_COPY, PRE_COPY_P2P and STOP_COPY share one stream: PRE_COPY streams the
//!   first [`SimConfig::precopy_bytes`], and after →STOP_COPY the same fd continues with the
//!   rest, so the concatenation is byte-identical to a plain STOP_COPY stream. STOP_COPY ends
//!   with `read() == 0`. A [live](#live-devices-dirty-pages-and-dirty-records) device adds
//!   dirty records to that stream.
//! * **Resume fd.** The write end of a pipe ([`SimConfig::resume_pipe_bytes`], blocking unless
//!   [`SimConfig::nonblocking_resume`]) drained by a consumer thread that verifies every byte
//!   against the expected content (seed, size) without keeping a copy. The consumer can be
//!   slow ([`SimConfig::resume_throughput_bytes_per_sec`]), so writers meet a full pipe.
//! * **Content.** The byte at stream offset `o` is a pure function of `(seed, o)`: see
//!   [`fill`] and [`verify`]. A live device's pages change version; page `p` at version `v` is
//!   a pure function of `(seed, p, v)`: see [`fill_page`] and [`verify_page`].
//! * **The VM around it.** A [`Fabric`] shared by the devices of one VM sees their state
//!   changes and records what would lose data in a real VM; [`SimHandle`]s play the guest
//!   and the devices' P2P DMA ([below](#the-fabric-guest-writes-p2p-dma-and-the-ordering-rule)).
//!
//! # Where a pipe differs from a VFIO fd, and what the sim does about it
//!
//! * **PRE_COPY temporary end.** A VFIO driver answers `ENOMSG` (mlx5) or `0` (mtty) at once.
//!   A pipe cannot: a raw `read(2)` at the temporary end **blocks** until the device moves to
//!   STOP_COPY (more data) or the session ends (EOF). [`SimDevice::read_data`] decodes it
//!   exactly as a driver would ([`ReadOutcome::NoMsg`] or [`ReadOutcome::Eof`] per
//!   [`SimConfig::precopy_end`]). An engine issuing raw reads must stop at the temporary end
//!   using [`MigrationDevice::precopy_info`] (`initial_bytes == 0 && dirty_bytes == 0`), as the
//!   uAPI recommends anyway. With [`SimConfig::nonblocking_save`] the raw read there gives
//!   `EAGAIN` instead of blocking. (On a live device with [`DirtyRelease::Continuous`] a
//!   blocked raw read also returns when the device dirties a page it owes a record for.)
//! * **`EAGAIN` in `read_data` / `write_data`.** On an `O_NONBLOCK` fd
//!   ([`SimConfig::nonblocking_save`], [`SimConfig::nonblocking_resume`]) a raw `read(2)` /
//!   `write(2)` gives `EAGAIN` when the pipe is empty / full, as mlx5's save fd does. The
//!   [`MigrationDevice`] calls have no such outcome ([`ReadOutcome`] has none, and a caller of
//!   `write_data` expects progress), so [`SimDevice::read_data`] and
//!   [`SimDevice::write_data`] wait with `poll(2)` for `POLLIN` / `POLLOUT` and try again,
//!   like a driver's blocking path. `EINTR` is retried a bounded number of times, as
//!   [`crate::vfio::VfioDevice`] does.
//! * **Disabled files.** When a session ends (leaving the saving group, leaving RESUMING,
//!   reset, drop), [`SimDevice::read_data`] / [`SimDevice::write_data`] on its fd give
//!   `ENODEV` like the kernel. The raw fd itself then sees EOF (save: the producer's end is
//!   closed and the pipe drained) or `EPIPE` (resume: the consumer's end is closed).
//! * **Write past the end.** [`SimDevice::write_data`] refuses a write that would exceed the
//!   expected length with `ENOMEM` (mtty). Raw writes cannot be refused; the consumer then
//!   marks the stream over-long, closes its end (further writes get `EPIPE`) and the
//!   RESUMING→STOP SET fails with `EINVAL`.
//! * **Faults.** [`SimConfig::read_error_at`] turns the save fd into an `AF_UNIX` stream
//!   socket: after N bytes the reader gets `ECONNRESET` (a real kernel error; see
//!   [`SimConfig::read_error_at`]). [`SimConfig::write_error_at`]: the consumer closes its end
//!   after N bytes, so the writer gets `EPIPE` (within one pipe capacity after byte N).
//!
//! # Live devices: dirty pages and dirty records
//!
//! With [`SimConfig::dirty_rate_bytes_per_sec`] (`with_dirty_rate`) the device's state is an
//! image of `size` bytes in 4 KiB pages ([`SIM_PAGE_SIZE`]), each with a `u32` version. Only
//! the versions are kept (4 bytes a page, plus 4 more during a save session for the version
//! each page was last sent at), never the bytes: page `p` at version `v` is
//! [`fill_page`]`(seed, p, v)`, and version 0 is exactly the non-live stream content.
//!
//! * **Dirtying.** While the device runs (RUNNING, PRE_COPY, RUNNING_P2P, PRE_COPY_P2P) it
//!   dirties `rate / 4096` pages a second; in STOP, STOP_COPY, RESUMING and ERROR nothing
//!   changes. The dirtying due is computed lazily from the time spent running, whenever the
//!   device is looked at (a SET, PRECOPY_INFO, a read, MIG_DATA_SIZE, a [`SimHandle`] call)
//!   and by the save producer while it waits for work. Each dirtying bumps one page's version;
//!   the n-th hits page `splitmix64(seed ^ salt ^ n·φ) mod pages`, so the sequence of pages is
//!   the seed's (when they are hit depends on the clock). Guest writes and P2P DMA
//!   ([`SimHandle`]) bump versions too; `with_dirty_rate(0)` is a live device that changes
//!   only through them. A reset brings every page back to version 0 (the power-on state), and
//!   so does STOP→RESUMING (a driver may reset the device before loading).
//! * **Save stream.** One stream on one fd across PRE_COPY → PRE_COPY_P2P → STOP_COPY:
//!
//!   ```text
//!   base[0 .. B]        PRE_COPY: the pre-copy portion, B = SimConfig::precopy_len()
//!   record*             PRE_COPY(_P2P): dirty records, as pages are dirtied
//!   base[B .. size]     STOP_COPY: the rest of the base image
//!   record*             STOP_COPY: every record still owed, then EOF (read 0)
//!   ```
//!
//!   The base is always version-0 bytes, byte-identical to a non-live device's stream (a
//!   STOP→STOP_COPY session, or one with nothing dirty, is base only); the records carry every
//!   change, including those made before the session. A page is owed a record when its
//!   version differs from the one the stream carries for it (0 for the base, else its last
//!   record's) and its base bytes were produced; the record carries the version the page has
//!   when the producer takes it, so ten writes between two reads cost one record, and the
//!   versions of a page increase along the stream. Pages past `B` are owed nothing before
//!   STOP_COPY: their base bytes come first. For a device dirtied as a whole in pre-copy, set
//!   `precopy_bytes` to `size`.
//! * **Record format** ([`DirtyRecord`]): a 24-byte header, magic `"VFSIMDR1"`
//!   ([`DIRTY_RECORD_MAGIC`]), page (LE u64), version (LE u32, > 0), payload length (LE u32,
//!   [`page_len`]: 4096, less for a partial last page), then the page's bytes at that
//!   version.
//! * **PRECOPY_INFO** is exact at the moment of the call. `initial_bytes` is the unread part
//!   of `base[0 .. B]`: it starts at `B` and only falls. `dirty_bytes` is every other byte the
//!   pre-copy stream owes the reader: records in the fd, being written, queued, or held (see
//!   below). It grows as owed pages are dirtied and falls as records are read. After a
//!   PRECOPY_INFO with `initial + dirty > 0` a read returns data; with both 0 a read is at the
//!   temporary end (until the device dirties more).
//! * **Temporary end.** `read_data` answers `ENOMSG` or `0` ([`SimConfig::precopy_end`]) when
//!   nothing is readable now. When the new dirty data becomes readable is
//!   [`SimConfig::dirty_release`]: [`DirtyRelease::Continuous`] (default) as soon as it is
//!   dirtied; [`DirtyRelease::OnPrecopyInfo`] is **mlx5**, where data after `-ENOMSG` appears
//!   only once `VFIO_MIG_GET_PRECOPY_INFO` is called (it starts a new SAVE), so a reader that
//!   never calls it keeps getting `ENOMSG` and the held records go out in STOP_COPY. (QEMU
//!   calls it only in its setup and exact-size passes.) `PrecopyEnd::Zero` gives
//!   **mtty**'s `0` at the temporary end; mtty itself has no dirty data (its pre-copy stream is
//!   a fixed 24-byte header), so an mtty-like device that dirties is hypothetical, but an
//!   engine must read that `0` as "nothing now" in PRE_COPY either way.
//! * **MIG_DATA_SIZE** ([`MigrationDevice::stop_copy_size`]) is what a STOP_COPY entered now
//!   would still stream: the unread base image and every record owed (in the fd, in flight,
//!   queued, held, and for pages whose base bytes are still to come). In STOP_COPY it is
//!   exactly the bytes left to read. (A non-live device keeps reporting `size`.)
//! * **Destination.** A live [`SimDevice`] in RESUMING expects such a stream; its config must
//!   match the source's `size`, `seed` and `precopy_bytes`, and have a dirty rate. The consumer
//!   verifies the base, and at `B`, where the source may have paused it, tells a record from
//!   the base's continuation by content (the first byte that matches only the magic or only
//!   the base decides). Every record's header is checked (magic, page in range, length,
//!   version above the page's last) and its payload verified. RESUMING→STOP fails with
//!   `EINVAL` (leaving RESUMING, as mtty) if anything was wrong or the stream ends inside the
//!   base or a record; on success the device takes the loaded versions as its state. The
//!   stream has no fixed length, so `write_data`'s `ENOMEM` bound does not apply.
//!   [`ResumeReport::dirty_records`] counts the records applied.
//! * **Checking a migration.** [`SimDevice::page_versions`] and [`SimDevice::state_digest`]
//!   (also on a [`SimHandle`], usable once the device is inside the engine): on a source, its
//!   state now (frozen once stopped); on a destination after RESUMING→STOP, the state
//!   loaded. A correct live migration gives equal digests.
//! * **Faults.** [`SimConfig::truncate_at`] and [`SimConfig::read_error_at`] count bytes of
//!   the whole stream (base and records).
//!
//! # The fabric: guest writes, P2P DMA and the ordering rule
//!
//! A [`Fabric`] is the VM around its devices ([`SimDevice::join`], [`SimDevice::with_fabric`]).
//! It sees every state change of every member (each direct arc of a SET, a failed arc into
//! ERROR, a reset: [`Fabric::state_log`]) and records [`Violation`]s:
//!
//! * [`Violation::StoppedWhilePeerMayDma`]: a device went from a running state to STOP or
//!   STOP_COPY while another member was in RUNNING or PRE_COPY, so it could still initiate
//!   P2P DMA into it. The uAPI's P2P states exist for this ("must prevent the device from
//!   initiating any new P2P DMA transactions"), and QEMU's rule is: every device to
//!   RUNNING_P2P / PRE_COPY_P2P first, then STOP / STOP_COPY.
//! * [`Violation::StartedWhilePeerStopped`]: the start order's twin: a device entered RUNNING
//!   or PRE_COPY (it may initiate again) while a member was in STOP, STOP_COPY or RESUMING.
//! * [`Violation::GuestWriteLost`], [`Violation::DmaLost`]: writes that could not land.
//!
//! [`SimHandle::guest_write`] is a vCPU's MMIO write: it lands on a running device and is lost
//! on a stopped one. [`SimHandle::dma_write_to`] is P2P DMA: only a device in RUNNING or
//! PRE_COPY initiates it (a quiesced initiator simply does not, which is no violation); it
//! lands on a running target (the P2P states still accept DMA) and is lost on one in STOP,
//! STOP_COPY or RESUMING. Both devices are locked for the write, so a DMA in flight completes
//! before either device's next arc returns, as the uAPI requires. [`Fabric::stats`] counts
//! landed, lost and not-initiated writes. A fabric models a running VM: a destination's
//! devices, which are RUNNING only nominally until they enter RESUMING, should join once they
//! are RESUMING (or use their own fabric).

use std::fmt;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::device::{MigrationDevice, PrecopyInfo, ReadOutcome};
use crate::error::{Error, Result};
use crate::state::{next_step, MigFlags, MigState};
use crate::sys::{self, PollFd, PollFlags};

mod config;
mod content;
mod fabric;
mod live;
mod records;
mod resume;
mod save;

pub use config::{ArcFault, DirtyRelease, FaultLeave, PrecopyEnd, SimConfig};
pub use content::{
    expected_config, fill, fill_page, page_count, page_len, state_digest, stream_byte, stream_word, verify,
    verify_page, DirtyRecord, DIRTY_RECORD_HEADER, DIRTY_RECORD_MAGIC, SIM_CONFIG_HEADER, SIM_CONFIG_MAGIC,
    SIM_PAGE_SIZE,
};
pub use fabric::{Fabric, FabricStats, SimHandle, StateChange, Violation};
use live::{DevCore, SaveTrack};
pub use resume::ResumeReport;
use resume::ResumeSession;
use save::{IoSnapshot, SaveSession};

/// A simulated VFIO migratable device. See the [module documentation](self).
///
/// `Send`, so the engine can move it into a per-device thread. Dropping it ends every session
/// and joins every thread it started; fds it handed out stay the caller's to close.
pub struct SimDevice {
    cfg: SimConfig,
    /// The migration state, the live image and the fabric, shared with the save producer and
    /// the device's [`SimHandle`]s.
    core: Arc<DevCore>,
    save: Option<SaveSession>,
    resume: Option<ResumeSession>,
    /// The last resume session after RESUMING→STOP, its consumer exiting (joined on drop).
    retired: Option<ResumeSession>,
    arcs: Vec<(MigState, MigState)>,
    last_resume: Option<ResumeReport>,
    last_bytes_read: u64,
    applied_config: Option<Vec<u8>>,
    precopy_v2: bool,
    resets: u32,
}

impl fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimDevice")
            .field("name", &self.cfg.name)
            .field("state", &self.cur_state())
            .field("size", &self.cfg.size)
            .field("seed", &self.cfg.seed)
            .field("save_session", &self.save.is_some())
            .field("resume_session", &self.resume.is_some())
            .finish()
    }
}

impl SimDevice {
    /// A device in RUNNING with the given parameters. No thread or fd exists until a session
    /// starts.
    pub fn new(cfg: SimConfig) -> SimDevice {
        SimDevice {
            core: DevCore::new(&cfg),
            cfg,
            save: None,
            resume: None,
            retired: None,
            arcs: Vec::new(),
            last_resume: None,
            last_bytes_read: 0,
            applied_config: None,
            precopy_v2: false,
            resets: 0,
        }
    }

    /// The parameters the device was made with.
    pub fn sim_config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Every direct arc taken so far, in order, including each arc inside a multi-arc SET.
    /// A failed arc is not listed; a reset is not an arc (see [`SimDevice::reset_count`]).
    pub fn transitions(&self) -> Vec<(MigState, MigState)> {
        self.arcs.clone()
    }

    /// How many times [`MigrationDevice::reset`] was called.
    pub fn reset_count(&self) -> u32 {
        self.resets
    }

    /// The resume stream's report: live while RESUMING (bytes consumed so far), else the last
    /// session's (as of its last RESUMING→STOP attempt or its end). `None` before any resume.
    pub fn resume_report(&self) -> Option<ResumeReport> {
        match &self.resume {
            Some(s) => Some(s.report().0),
            None => self.last_resume,
        }
    }

    /// Bytes the reader has consumed from the current save stream, or from the last one once
    /// it ended (raw `read(2)`s and io_uring reads included).
    pub fn bytes_read(&self) -> u64 {
        match &self.save {
            Some(s) => s.consumed(),
            None => self.last_bytes_read,
        }
    }

    /// The config blob applied by [`MigrationDevice::load_config`], if any.
    pub fn config(&self) -> Option<Vec<u8>> {
        self.applied_config.clone()
    }

    /// The config blob a device with `cfg` saves (and a destination with `cfg` expects).
    pub fn expected_config(cfg: &SimConfig) -> Vec<u8> {
        expected_config(cfg)
    }

    /// A handle for guest writes, P2P DMA and state checks that stays usable after the device
    /// is moved into the engine.
    pub fn handle(&self) -> SimHandle {
        SimHandle { core: Arc::clone(&self.core) }
    }

    /// Joins `fabric` (leaving the one it was on, if any): from now on the fabric sees every
    /// state change of this device and checks it against its other devices.
    pub fn join(&mut self, fabric: &Fabric) {
        let mut g = self.core.lock();
        if let Some(old) = g.fabric.take() {
            old.unregister(self.core.id);
        }
        fabric.register(self.core.id, &self.core.name, g.state);
        g.fabric = Some(fabric.clone());
    }

    /// [`SimDevice::join`] as a builder.
    pub fn with_fabric(mut self, fabric: &Fabric) -> SimDevice {
        self.join(fabric);
        self
    }

    /// The fabric the device is on.
    pub fn fabric(&self) -> Option<Fabric> {
        self.core.lock().fabric.clone()
    }

    /// The device's page versions (index = page): its state now on a source (it changes
    /// while the device runs, and is frozen once it is stopped), the state loaded from the
    /// stream on a destination after RESUMING→STOP. All zero for a device that is not live.
    pub fn page_versions(&self) -> Vec<u32> {
        self.core.page_versions()
    }

    /// [`state_digest`] of [`SimDevice::page_versions`]: a correct live migration gives the
    /// destination (after RESUMING→STOP) the source's digest at its stop.
    pub fn state_digest(&self) -> u64 {
        state_digest(&self.core.page_versions())
    }

    /// The migration state.
    fn cur_state(&self) -> MigState {
        self.core.lock().state
    }

    /// Enters `to` (dirtying up to now counted in the old state) and tells the fabric.
    fn set_state(&self, to: MigState) {
        let mut g = self.core.lock();
        g.tick();
        let from = g.state;
        g.state = to;
        if let Some(f) = &g.fabric {
            f.note_state(self.core.id, &self.core.name, from, to);
        }
    }

    fn err(&self, op: impl Into<String>, errno: i32) -> Error {
        Error::sys(&self.cfg.name, op, errno)
    }

    fn end_save(&mut self) {
        if let Some(s) = self.save.take() {
            self.last_bytes_read = s.end();
        }
    }

    /// Ends the resume session after an accepted drain: tells its consumer to close the read
    /// end (writers then get `EPIPE`) and joins it later, at the next STOP→RESUMING or the
    /// device's drop, so that neither RESUMING→STOP nor starting the device waits for a thread
    /// (or pays for its exit).
    fn retire_resume(&mut self) {
        if let Some(s) = self.resume.take() {
            s.signal_stop();
            self.last_resume = Some(s.report().0);
            self.retired = Some(s);
        }
    }

    fn end_resume(&mut self) {
        self.retired = None;
        if let Some(mut s) = self.resume.take() {
            s.stop();
            self.last_resume = Some(s.report().0);
        }
    }

    fn end_all(&mut self) {
        self.end_save();
        self.end_resume();
    }

    /// One direct arc, as a driver's `step_state` does it.
    fn step(&mut self, from: MigState, to: MigState) -> Result<Option<OwnedFd>> {
        use MigState::{PreCopy, PreCopyP2p, Resuming, Running, RunningP2p, Stop, StopCopy};
        let op = format!("VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE arc {from} -> {to}");
        if let Some(f) = self.cfg.fail_arc.filter(|f| f.from == from && f.to == to) {
            if f.leave == FaultLeave::Error {
                self.end_all();
                self.set_state(MigState::Error);
            }
            return Err(self.err(format!("{op} (injected fault)"), f.errno));
        }
        if from == Stop {
            // The consumer retired by RESUMING→STOP closed its end by now (writes to the old
            // fd fail with EPIPE); it is joined later, so its exit costs nothing here.
            if let Some(r) = &self.retired {
                r.wait_end_closed(std::time::Duration::from_secs(5));
            }
        }
        let mut fd = None;
        match (from, to) {
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) | (Stop, StopCopy) => {
                self.end_save();
                let core = self.cfg.is_live().then(|| Arc::clone(&self.core));
                let (s, f) = SaveSession::start(&self.cfg, to == StopCopy, core).map_err(|e| self.sys(&op, e))?;
                self.save = Some(s);
                fd = Some(f);
            }
            (StopCopy, Stop) | (PreCopy, Running) | (PreCopyP2p, RunningP2p) => self.end_save(),
            (Stop, Resuming) => {
                self.end_resume();
                // A driver may reset the device's state when it prepares to load another.
                if let Some(l) = &mut self.core.lock().live {
                    l.clear();
                }
                let (s, f) = ResumeSession::start(&self.cfg).map_err(|e| self.sys(&op, e))?;
                self.resume = Some(s);
                fd = Some(f);
            }
            (Resuming, Stop) => self.finish_resume(&op)?,
            _ => {}
        }
        self.arcs.push((from, to));
        self.set_state(to);
        if matches!(from, PreCopy | PreCopyP2p) && to == StopCopy {
            // After the state change, so a live producer sees a stopped device when it
            // decides the stream is complete.
            if let Some(s) = &self.save {
                s.enter_stop_copy();
            }
        }
        Ok(fd)
    }

    /// RESUMING→STOP: the final check of the stream; on success a live device takes the
    /// state it carried. Like mtty, a failure is EINVAL and leaves the device in RESUMING with
    /// its file open.
    fn finish_resume(&mut self, op: &str) -> Result<()> {
        let Some(s) = &self.resume else {
            return Err(self.err(op, libc::EINVAL));
        };
        let (rep, why) = s.drain_and_report();
        self.last_resume = Some(rep);
        if let Some(why) = why {
            return Err(self.err(format!("{op} ({why})"), libc::EINVAL));
        }
        let versions = s.take_versions();
        self.retire_resume();
        if let (Some(v), Some(l)) = (versions, self.core.lock().live.as_mut()) {
            l.install(v);
        }
        Ok(())
    }

    fn sys(&self, op: &str, source: std::io::Error) -> Error {
        Error::Sys { device: self.cfg.name.clone(), op: op.to_owned(), source }
    }

    /// Whether a read now would be at the PRE_COPY temporary end (dirtying brought up to date).
    fn at_precopy_end(&self, s: &SaveSession) -> bool {
        if !self.cfg.is_live() {
            return s.at_precopy_end();
        }
        let mut g = self.core.lock();
        g.tick();
        let track = g.live.as_ref().and_then(|l| l.track.as_ref());
        track.is_some_and(|t| live_at_end(t, &s.io_snapshot()))
    }

    /// PRECOPY_INFO of a live device: `initial_bytes` is the unread part of the base image's
    /// pre-copy portion, `dirty_bytes` every other unread byte the pre-copy stream owes (dirty
    /// records in the fd, being written, queued or held). With
    /// [`DirtyRelease::OnPrecopyInfo`] a call at the temporary end releases the held records.
    fn live_precopy_info(&self, s: &SaveSession) -> PrecopyInfo {
        let mut g = self.core.lock();
        g.tick();
        let Some(l) = &mut g.live else {
            return PrecopyInfo::default();
        };
        if self.cfg.dirty_release == DirtyRelease::OnPrecopyInfo
            && l.track.as_ref().is_some_and(|t| live_at_end(t, &s.io_snapshot()))
        {
            l.release();
        }
        let Some(t) = &l.track else {
            return PrecopyInfo::default();
        };
        let io = s.io_snapshot();
        let b = t.precopy_len;
        let consumed = io.produced.saturating_sub(io.queued);
        let initial = b - consumed.min(b);
        let unread = (b - t.base_reserved.min(b)) + io.inflight + io.queued + t.pending_bytes();
        PrecopyInfo { initial_bytes: initial, dirty_bytes: unread.saturating_sub(initial), reinit: false }
    }

    /// MIG_DATA_SIZE of a live device: what a STOP_COPY entered now would still stream (the
    /// unread base image and every record owed).
    fn live_stop_copy_size(&self) -> u64 {
        let size = self.cfg.size;
        let mut g = self.core.lock();
        g.tick();
        let Some(l) = &g.live else {
            return size;
        };
        let owed = l.owed_uncovered_bytes();
        match (&self.save, &l.track) {
            (Some(s), Some(t)) => {
                let io = s.io_snapshot();
                (size - t.base_reserved.min(size)) + io.inflight + io.queued + t.pending_bytes() + owed
            }
            _ => size + owed,
        }
    }

    /// Which session `fd` belongs to.
    fn classify(&self, fd: BorrowedFd<'_>) -> FdKind {
        let Ok(id) = sys::file_id(fd) else {
            return FdKind::Other;
        };
        if self.save.as_ref().is_some_and(|s| s.id == id) {
            FdKind::Save
        } else if self.resume.as_ref().is_some_and(|s| s.id == id) {
            FdKind::Resume
        } else {
            FdKind::Other
        }
    }
}

/// Whether a live device's pre-copy stream is at its temporary end: the pre-copy base is
/// produced, nothing is in flight or in the fd, and no released record waits (held records
/// do not count: they wait for PRECOPY_INFO).
fn live_at_end(t: &SaveTrack, io: &IoSnapshot) -> bool {
    t.base_reserved >= t.precopy_len
        && io.inflight == 0
        && io.queued == 0
        && t.queue_bytes == 0
        && !io.finale
        && !io.done
}

/// Which live session an fd belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FdKind {
    Save,
    Resume,
    /// An ended session's fd, or a foreign one: the kernel's "disabled file".
    Other,
}

/// Bounded retries of a syscall interrupted by a signal.
const EINTR_RETRIES: u32 = 16;

impl MigrationDevice for SimDevice {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn migration_flags(&self) -> Result<MigFlags> {
        if !self.cfg.flags.contains(MigFlags::STOP_COPY) {
            return Err(Error::NotMigratable {
                device: self.cfg.name.clone(),
                reason: format!("migration flags {} lack STOP_COPY", self.cfg.flags),
            });
        }
        Ok(self.cfg.flags)
    }

    fn state(&self) -> Result<MigState> {
        if !self.cfg.flags.contains(MigFlags::STOP_COPY) {
            return Err(self.err("VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE", libc::ENOTTY));
        }
        Ok(self.cur_state())
    }

    fn set_state_raw(&mut self, target: MigState) -> Result<Option<OwnedFd>> {
        let flags = self.cfg.flags;
        if !flags.contains(MigFlags::STOP_COPY) {
            return Err(self.err("VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE", libc::ENOTTY));
        }
        let mut fd: Option<OwnedFd> = None;
        while self.cur_state() != target {
            let from = self.cur_state();
            let Some(next) = next_step(flags, from, target) else {
                return Err(
                    self.err(format!("VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE={target} from {from}"), libc::EINVAL)
                );
            };
            fd = self.step(from, next)?;
            if fd.is_some() && self.cur_state() != target {
                // The kernel WARNs and fails: an fd can only be made on the final arc.
                return Err(self.err(
                    format!("VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE={target}: fd on a non-final arc"),
                    libc::EINVAL,
                ));
            }
        }
        Ok(fd)
    }

    fn stop_copy_size(&self) -> Result<u64> {
        if self.cfg.is_live() {
            return Ok(self.live_stop_copy_size());
        }
        Ok(self.cfg.size)
    }

    fn precopy_info(&self, data_fd: BorrowedFd<'_>) -> Result<PrecopyInfo> {
        let op = "VFIO_MIG_GET_PRECOPY_INFO";
        let kind = self.classify(data_fd);
        if kind == FdKind::Resume {
            return Err(self.err(op, libc::ENOTTY));
        }
        if !matches!(self.cur_state(), MigState::PreCopy | MigState::PreCopyP2p) {
            return Err(self.err(op, libc::EINVAL));
        }
        let Some(s) = self.save.as_ref().filter(|_| kind == FdKind::Save) else {
            return Err(self.err(op, libc::ENODEV));
        };
        if self.cfg.is_live() {
            return Ok(self.live_precopy_info(s));
        }
        Ok(PrecopyInfo { initial_bytes: s.precopy_len.saturating_sub(s.consumed()), dirty_bytes: 0, reinit: false })
    }

    fn enable_precopy_info_v2(&mut self) -> Result<bool> {
        // The kernel answers EINVAL without PRE_COPY, which the real device maps to false.
        self.precopy_v2 = self.cfg.flags.contains(MigFlags::PRE_COPY);
        Ok(self.precopy_v2)
    }

    fn reset(&mut self) -> Result<()> {
        self.end_all();
        // A reset returns the device to its power-on state.
        if let Some(l) = &mut self.core.lock().live {
            l.clear();
        }
        self.set_state(MigState::Running);
        self.resets = self.resets.saturating_add(1);
        Ok(())
    }

    fn read_data(&self, data_fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<ReadOutcome> {
        let op = "read(save data fd)";
        match self.classify(data_fd) {
            FdKind::Save => {}
            FdKind::Resume => return Err(self.err(op, libc::EINVAL)),
            FdKind::Other => return Err(self.err(op, libc::ENODEV)),
        }
        let Some(s) = &self.save else {
            return Err(self.err(op, libc::ENODEV));
        };
        if buf.is_empty() {
            return Ok(ReadOutcome::Eof);
        }
        if matches!(self.cur_state(), MigState::PreCopy | MigState::PreCopyP2p) && self.at_precopy_end(s) {
            return match self.cfg.precopy_end {
                PrecopyEnd::NoMsg => Ok(ReadOutcome::NoMsg),
                PrecopyEnd::Zero => Ok(ReadOutcome::Eof),
            };
        }
        let cap = buf.len().min(self.cfg.max_read.max(1));
        let mut tries = 0;
        loop {
            match sys::SysOps::read(&sys::Kernel, data_fd, &mut buf[..cap]) {
                Ok(0) => return Ok(ReadOutcome::Eof),
                Ok(n) => return Ok(ReadOutcome::Data(n)),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) && tries < EINTR_RETRIES => tries += 1,
                // O_NONBLOCK save fd (SimConfig::nonblocking_save) with nothing queued yet:
                // this is the blocking driver path, so wait for data (or EOF) and read again.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    sys::poll(&mut [PollFd::new(data_fd, PollFlags::POLLIN)], None).map_err(|e| Error::Sys {
                        device: self.cfg.name.clone(),
                        op: op.into(),
                        source: e,
                    })?;
                }
                Err(e) => return Err(Error::Sys { device: self.cfg.name.clone(), op: op.into(), source: e }),
            }
        }
    }

    fn write_data(&self, data_fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize> {
        let op = "write(resume data fd)";
        match self.classify(data_fd) {
            FdKind::Resume => {}
            FdKind::Save => return Err(self.err(op, libc::EINVAL)),
            FdKind::Other => return Err(self.err(op, libc::ENODEV)),
        }
        let Some(s) = &self.resume else {
            return Err(self.err(op, libc::ENODEV));
        };
        let have = s.stream_len();
        let fits = have.checked_add(buf.len() as u64).is_some_and(|end| end <= s.size);
        if s.bounded && !fits {
            return Err(self.err(op, libc::ENOMEM));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let mut tries = 0;
        loop {
            match sys::SysOps::write(&sys::Kernel, data_fd, buf) {
                Ok(n) => {
                    s.accept(n);
                    return Ok(n);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) && tries < EINTR_RETRIES => tries += 1,
                // O_NONBLOCK resume fd (SimConfig::nonblocking_resume) and a full pipe: wait
                // until the consumer makes room (or goes away: then EPIPE) and write again.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    sys::poll(&mut [PollFd::new(data_fd, PollFlags::POLLOUT)], None).map_err(|e| Error::Sys {
                        device: self.cfg.name.clone(),
                        op: op.into(),
                        source: e,
                    })?;
                }
                Err(e) => return Err(Error::Sys { device: self.cfg.name.clone(), op: op.into(), source: e }),
            }
        }
    }

    fn save_config(&mut self) -> Result<Vec<u8>> {
        Ok(expected_config(&self.cfg))
    }

    fn load_config(&mut self, blob: &[u8]) -> Result<()> {
        let bad = |reason: String| Error::BadConfig { device: self.cfg.name.clone(), reason };
        if blob.len() < SIM_CONFIG_HEADER {
            return Err(bad(format!("blob of {} bytes is shorter than its 16-byte header", blob.len())));
        }
        if blob[..8] != SIM_CONFIG_MAGIC {
            return Err(bad(format!("bad magic {:02x?}", &blob[..8])));
        }
        let stated = u32::from_le_bytes([blob[8], blob[9], blob[10], blob[11]]) as usize;
        if stated != blob.len() {
            return Err(bad(format!("header says {stated} bytes, blob has {}", blob.len())));
        }
        let want = self.cfg.config_len.clamp(SIM_CONFIG_HEADER, u32::MAX as usize);
        if blob.len() != want {
            return Err(bad(format!("blob has {} bytes, this device expects {want}", blob.len())));
        }
        self.applied_config = Some(blob.to_vec());
        Ok(())
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        // Session drops stop and join their threads; this also drains the save pipe.
        self.end_all();
        if let Some(f) = self.core.lock().fabric.take() {
            f.unregister(self.core.id);
        }
    }
}
