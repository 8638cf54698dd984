//! The command's own output, without panics: `std`'s `println!` panics when stdout is a closed
//! pipe (`vfio-multifd ... | head -1`); these record the error instead, and `main` reports it
//! once (exit 1) after the transfer has wound down normally.

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;

/// The first error writing stdout.
static FAILED: Mutex<Option<io::ErrorKind>> = Mutex::new(None);

/// Writes one line to stdout; an error is kept for [`failed`] and later lines are dropped.
pub fn line(args: fmt::Arguments<'_>) {
    let mut f = FAILED.lock().unwrap_or_else(|p| p.into_inner());
    if f.is_some() {
        return;
    }
    let mut o = io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.write_all(b"\n")) {
        *f = Some(e.kind());
    }
}

/// Writes one line to stderr, ignoring errors.
pub fn err_line(args: fmt::Arguments<'_>) {
    let mut e = io::stderr().lock();
    let _ = e.write_fmt(args).and_then(|()| e.write_all(b"\n"));
}

/// The first stdout error, if any (after a final flush).
pub fn failed() -> Option<io::Error> {
    let flushed = io::stdout().lock().flush();
    let f = *FAILED.lock().unwrap_or_else(|p| p.into_inner());
    f.map(io::Error::from).or(flushed.err())
}
