//! How the session's controller (the VMM's thread) and the device threads talk: a command
//! mailbox per device with an eventfd that wakes the device's loop, an acknowledgement the
//! controller waits for (set-up done), and the device's live status.
//!
//! Commands only move forward (`Prepare` → `PreCopy` → `Quiesce` → `StopCopy`). The controller
//! makes each command's state changes itself, on every device, before it posts the command
//! (`device::DeviceSlot`): every device is quiesced before any goes to STOP_COPY, which is the
//! P2P ordering rule. A device thread takes over what a change left (a data fd, what it may
//! read now) between I/O steps.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::abort::AbortHandle;
use crate::backend::TICK;
use crate::error::{Error, Result};
use crate::sys::EventFd;
use crate::wire::DeviceId;

/// Where a source device is in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum SourcePhase {
    /// Set up (ring, buffers, thread, channels); the device is untouched (RUNNING).
    Prepared,
    /// Streaming PRE_COPY data while the VM runs (a device without PRE_COPY stays RUNNING and
    /// sends nothing yet).
    PreCopy,
    /// In its P2P-quiesced state (PRE_COPY_P2P or RUNNING_P2P; unchanged without P2P), waiting
    /// for every other device to get there.
    Quiesced,
    /// In STOP_COPY, streaming the rest of its state and then its config.
    StopCopy,
    /// Its last packet (the config) was sent.
    Done,
    /// It failed, or the session was cancelled.
    Failed,
}

/// A command from the controller. Values only grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Command {
    Prepare = 0,
    PreCopy = 1,
    Quiesce = 2,
    StopCopy = 3,
}

impl Command {
    fn from_u8(v: u8) -> Command {
        match v {
            0 => Command::Prepare,
            1 => Command::PreCopy,
            2 => Command::Quiesce,
            _ => Command::StopCopy,
        }
    }
}

/// A device's live status, readable from any thread (see [`crate::SourceSession`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceStatus {
    /// The device.
    pub id: DeviceId,
    /// Its phase.
    pub phase: SourcePhase,
    /// `initial_bytes` of the last `VFIO_MIG_GET_PRECOPY_INFO` (uAPI), minus what was read
    /// since; 0 outside PRE_COPY.
    pub initial_bytes: u64,
    /// `dirty_bytes` of the last `VFIO_MIG_GET_PRECOPY_INFO`, minus what was read since.
    pub dirty_bytes: u64,
    /// Device bytes read and queued for sending while in PRE_COPY.
    pub precopy_bytes: u64,
    /// Device bytes read and queued in STOP_COPY.
    pub stop_copy_bytes: u64,
    /// The device's estimate of its STOP_COPY size (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`,
    /// uAPI), queried when pre-copy starts and while pre-copy is idle; `None` if unknown.
    pub stop_copy_size: Option<u64>,
    /// Whether the device streams pre-copy data in this session (it has PRE_COPY and pre-copy
    /// was started).
    pub precopy: bool,
    /// Whether its initial pre-copy data has all been read and queued (`initial_bytes`
    /// reached 0 in PRE_COPY; QEMU's `VFIO_MIG_FLAG_DEV_INIT_DATA_SENT` point).
    pub initial_data_sent: bool,
    /// Whether the destination acknowledged that every byte of the initial data is in its
    /// device (switchover-ack over the return path; QEMU's `MIG_RP_MSG_SWITCHOVER_ACK`).
    pub initial_data_acked: bool,
    /// Pre-copy rounds: times the device reported nothing more to read for now and was read
    /// again later.
    pub precopy_rounds: u64,
}

impl DeviceStatus {
    pub(crate) fn new(id: DeviceId) -> DeviceStatus {
        DeviceStatus {
            id,
            phase: SourcePhase::Prepared,
            initial_bytes: 0,
            dirty_bytes: 0,
            precopy_bytes: 0,
            stop_copy_bytes: 0,
            stop_copy_size: None,
            precopy: false,
            initial_data_sent: false,
            initial_data_acked: false,
            precopy_rounds: 0,
        }
    }
}

/// Something a VMM may want to react to, from [`crate::SessionControl::next_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// Every byte of the device's initial pre-copy data was read and queued.
    InitialDataSent(DeviceId),
    /// The destination wrote every byte of the device's initial data into its device
    /// (switchover-ack, over the return path).
    InitialDataAcked(DeviceId),
    /// The device's last packet (its config) was sent.
    DeviceDone(DeviceId),
    /// The device failed (the error comes from the session's result).
    DeviceFailed(DeviceId),
}

/// The session's event queue: bounded, with an eventfd that is readable while events wait.
#[derive(Debug)]
pub(crate) struct Events {
    queue: Mutex<std::collections::VecDeque<SessionEvent>>,
    pub(crate) fd: EventFd,
}

/// Most events kept; a VMM that never reads them loses the oldest.
const MAX_EVENTS: usize = 1024;

impl Events {
    pub(crate) fn new() -> std::io::Result<Events> {
        Ok(Events { queue: Mutex::new(std::collections::VecDeque::with_capacity(64)), fd: EventFd::new()? })
    }

    pub(crate) fn push(&self, e: SessionEvent) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == MAX_EVENTS {
            q.pop_front();
        }
        q.push_back(e);
        drop(q);
        self.fd.signal();
    }

    pub(crate) fn pop(&self) -> Option<SessionEvent> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let e = q.pop_front();
        if q.is_empty() {
            self.fd.drain();
        }
        e
    }
}

/// What a device thread has acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ack {
    /// Still setting up.
    NotReady,
    /// The last command applied.
    Applied(Command),
    /// The device failed.
    Failed,
}

/// The mailbox between the controller and one device thread.
#[derive(Debug)]
pub(crate) struct DeviceControl {
    want: AtomicU8,
    /// Wakes the device loop (a ring reads it; blocking waits poll it).
    pub(crate) waker: EventFd,
    /// What the device acknowledged; with `cv`.
    acked: Mutex<Ack>,
    cv: Condvar,
    status: Mutex<DeviceStatus>,
    events: std::sync::Arc<Events>,
}

impl DeviceControl {
    pub(crate) fn new(id: DeviceId, events: std::sync::Arc<Events>) -> std::io::Result<DeviceControl> {
        Ok(DeviceControl {
            want: AtomicU8::new(Command::Prepare as u8),
            waker: EventFd::new()?,
            acked: Mutex::new(Ack::NotReady),
            cv: Condvar::new(),
            status: Mutex::new(DeviceStatus::new(id)),
            events,
        })
    }

    /// Reports an event of this device.
    pub(crate) fn event(&self, e: SessionEvent) {
        self.events.push(e);
    }

    /// Tells the device thread that the session moved on to `c` (never backwards) and wakes
    /// its loop.
    pub(crate) fn command(&self, c: Command) {
        self.post(c);
        self.waker.signal();
    }

    /// As [`DeviceControl::command`], without the wake-up: for a change after which the
    /// device thread has nothing to do (it learns of it with the next command, or when it
    /// next looks).
    pub(crate) fn post(&self, c: Command) {
        self.want.fetch_max(c as u8, Ordering::SeqCst);
    }

    /// The next command to apply after `applied`, if one is waiting. `PreCopy` is optional
    /// (a one-shot transfer goes from `Prepare` straight to `Quiesce`); `Quiesce` never is.
    pub(crate) fn pending(&self, applied: Command) -> Option<Command> {
        let want = Command::from_u8(self.want.load(Ordering::SeqCst));
        if want <= applied {
            return None;
        }
        Some(match applied {
            Command::Prepare if want == Command::PreCopy => Command::PreCopy,
            Command::Prepare | Command::PreCopy => Command::Quiesce,
            Command::Quiesce | Command::StopCopy => Command::StopCopy,
        })
    }

    fn lock_ack(&self) -> MutexGuard<'_, Ack> {
        self.acked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device applied `c` (`Command::Prepare`: its set-up is done).
    pub(crate) fn ack(&self, c: Command) {
        let mut g = self.lock_ack();
        if *g != Ack::Failed {
            *g = Ack::Applied(c);
        }
        drop(g);
        self.cv.notify_all();
    }

    /// The device failed: every waiter gives up on it (once: its event is reported once).
    pub(crate) fn fail(&self) {
        let was = std::mem::replace(&mut *self.lock_ack(), Ack::Failed);
        self.cv.notify_all();
        if was == Ack::Failed {
            return;
        }
        let id = {
            let mut st = self.status();
            st.phase = SourcePhase::Failed;
            st.id.clone()
        };
        self.event(SessionEvent::DeviceFailed(id));
    }

    /// Waits until the device applied `c`, it failed, the session was aborted or `limit`
    /// passed.
    ///
    /// # Errors
    /// [`Error::Aborted`] when the device failed or the session was aborted (the failure
    /// itself is reported by the device thread); [`Error::Timeout`] after `limit`.
    pub(crate) fn wait_ack(&self, c: Command, abort: &AbortHandle, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let mut g = self.lock_ack();
        loop {
            match *g {
                Ack::Failed => return Err(Error::Aborted),
                Ack::Applied(done) if done >= c => return Ok(()),
                Ack::Applied(_) | Ack::NotReady => {}
            }
            if abort.is_aborted() {
                return Err(Error::Aborted);
            }
            let now = Instant::now();
            if now >= deadline {
                let device = self.status().id.clone();
                return Err(Error::Timeout { what: format!("device {device} did not reach {c:?}"), after: limit });
            }
            g = self.cv.wait_timeout(g, TICK.min(deadline - now)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The device's status, for updating or reading.
    pub(crate) fn status(&self) -> MutexGuard<'_, DeviceStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_only_move_forward_one_at_a_time() {
        let events = std::sync::Arc::new(Events::new().unwrap());
        let c = DeviceControl::new(DeviceId::new("a/vfio", 0).unwrap(), events.clone()).unwrap();
        let a = AbortHandle::new().unwrap();
        assert!(matches!(c.wait_ack(Command::Prepare, &a, Duration::from_millis(10)), Err(Error::Timeout { .. })));
        assert_eq!(c.pending(Command::Prepare), None);
        c.command(Command::PreCopy);
        assert_eq!(c.pending(Command::Prepare), Some(Command::PreCopy));
        c.command(Command::StopCopy);
        c.command(Command::PreCopy);
        assert_eq!(c.pending(Command::Prepare), Some(Command::Quiesce), "pre-copy is skipped once past it");
        assert_eq!(c.pending(Command::PreCopy), Some(Command::Quiesce));
        assert_eq!(c.pending(Command::Quiesce), Some(Command::StopCopy));
        assert_eq!(c.pending(Command::StopCopy), None);
        c.ack(Command::Quiesce);
        c.wait_ack(Command::PreCopy, &a, Duration::from_millis(10)).unwrap();
        assert!(matches!(c.wait_ack(Command::StopCopy, &a, Duration::from_millis(10)), Err(Error::Timeout { .. })));
        c.fail();
        assert!(matches!(c.wait_ack(Command::StopCopy, &a, Duration::from_secs(1)), Err(Error::Aborted)));
        assert!(matches!(events.pop(), Some(SessionEvent::DeviceFailed(_))));
        assert_eq!(events.pop(), None);
    }
}
