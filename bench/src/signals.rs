//! SIGINT, SIGTERM and SIGHUP (a closed terminal or ssh session) become the library's abort:
//! the transfer stops, the source devices are
//! put back to RUNNING by the engine, the command says "interrupted" and exits 130, 143 or 129.
//!
//! [`install`] blocks both signals in the main thread before any other thread starts (threads
//! inherit the mask) and reads them from a signalfd on a thread of its own. Each transfer
//! registers its abort handle for as long as it runs ([`register`] returns a guard); a signal
//! aborts the running ones. With none running (probe, dev, bench between runs) the command exits
//! at once, as without the handler.
//! If the aborted transfer has not wound down within [`GRACE`], the process exits anyway.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vfio_multifd::AbortHandle;

/// How long an interrupted transfer may take to put its devices back before the process exits.
const GRACE: Duration = Duration::from_secs(15);

/// Temporary outputs (a sink's `.partial-PID` file) to remove if a signal ends the process
/// before a transfer is registered to wind down (and remove them itself).
static PARTIAL: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

/// Removes `path` if a signal ends the process outside a registered transfer, until
/// [`forget_partial`].
pub fn remove_on_signal(path: &std::path::Path) {
    PARTIAL.lock().unwrap_or_else(|p| p.into_inner()).push(path.to_owned());
}

/// `path` is no longer partial (renamed into place, or removed).
pub fn forget_partial(path: &std::path::Path) {
    PARTIAL.lock().unwrap_or_else(|p| p.into_inner()).retain(|p| p != path);
}

/// The running transfers' abort handles, by registration number.
static HANDLES: Mutex<Vec<(u64, AbortHandle)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);
static CAUGHT: AtomicI32 = AtomicI32::new(0);

/// Blocks SIGINT, SIGTERM and SIGHUP and starts the thread that turns them into aborts. Call first in
/// `main`.
pub fn install() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    if set.thread_block().is_err() {
        return; // keep the default behaviour
    }
    let Ok(fd) = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC) else { return };
    // The signal thread must not take SIGUSR1 either (`--switchover manual` reads it from its
    // own signalfd): it inherits a mask with SIGUSR1 blocked; the main thread gets it back.
    let mut usr1 = SigSet::empty();
    usr1.add(Signal::SIGUSR1);
    let _ = usr1.thread_block();
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        while let Ok(Some(info)) = fd.read_signal() {
            let sig = info.ssi_signo as i32;
            CAUGHT.store(sig, Ordering::SeqCst);
            let handles = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
            if handles.is_empty() {
                // No transfer to wind down (set-up: connect retries, a FIFO's reader; or
                // between runs): what is partial goes now, and the command says why it ends.
                let mut removed = Vec::new();
                for p in PARTIAL.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    if std::fs::remove_file(p).is_ok() {
                        removed.push(p.display().to_string());
                    }
                }
                let removed = if removed.is_empty() {
                    String::new()
                } else {
                    format!("; removed the partial output {}", removed.join(", "))
                };
                eprintln!(
                    "vfio-multifd: interrupted by {} while no transfer was running (still setting up, or between \
                     runs){removed}; exiting",
                    name(sig)
                );
                std::process::exit(128 + sig);
            }
            eprintln!("vfio-multifd: interrupted by {}; stopping the transfer", name(sig));
            for (_, h) in handles.iter() {
                h.abort();
            }
            drop(handles);
            std::thread::spawn(move || {
                std::thread::sleep(GRACE);
                eprintln!("vfio-multifd: interrupted: the transfer did not stop within {GRACE:?}; exiting");
                std::process::exit(128 + sig);
            });
        }
    });
    let _ = usr1.thread_unblock();
    drop(spawned);
}

/// A running transfer's abort handle, aborted on SIGINT or SIGTERM until the guard drops.
#[must_use = "the handle is unregistered when the guard drops"]
pub struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        HANDLES.lock().unwrap_or_else(|p| p.into_inner()).retain(|(id, _)| *id != self.0);
    }
}

/// Registers a running transfer's abort handle.
pub fn register(h: AbortHandle) -> Registration {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    HANDLES.lock().unwrap_or_else(|p| p.into_inner()).push((id, h));
    Registration(id)
}

/// The signal that interrupted the command, if one did.
pub fn caught() -> Option<i32> {
    match CAUGHT.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The signal's name.
pub fn name(sig: i32) -> &'static str {
    match sig {
        s if s == Signal::SIGINT as i32 => "SIGINT",
        s if s == Signal::SIGTERM as i32 => "SIGTERM",
        s if s == Signal::SIGHUP as i32 => "SIGHUP",
        _ => "a signal",
    }
}
