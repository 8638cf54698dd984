//! `recv --sink file:PATH`: where a received stream goes, so that an output never looks complete
//! when it is not.
//!
//! A regular file (or a new path) is written under a temporary name in the same directory
//! (`.NAME.partial-PID`); only a successful receive renames it and its config (written the same
//! way) into place: first the old `PATH.config` is removed, then the stream is renamed, then the
//! config. A crash between the steps leaves a stream without its config, which `send --source`
//! refuses, never a new stream with an old config. A failed or interrupted receive removes the
//! temporary file and leaves a previous save untouched.
//!
//! A FIFO is opened non-blocking before the port listens, waiting (bounded) for its reader, and
//! stays non-blocking, so a reader that stops makes the receiver's write wait with the stall
//! timeout instead of blocking in the kernel. Other special files (`/dev/null`) are written
//! directly.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// `PATH.config`.
pub fn config_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".config");
    PathBuf::from(s)
}

/// A temporary name next to `p`: `.NAME.partial-PID`.
fn partial_path(p: &Path) -> PathBuf {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    p.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// An open sink; dropped without [`Sink::commit`], it removes what it wrote.
#[derive(Debug)]
pub struct Sink {
    path: PathBuf,
    /// The temporary name, for a regular file.
    partial: Option<PathBuf>,
    file: File,
}

impl Sink {
    /// Opens the sink for `path`; a FIFO waits at most `wait` for its reader.
    pub fn open(path: &Path, wait: Duration) -> Result<Sink> {
        let meta = std::fs::metadata(path).ok();
        let ft = meta.as_ref().map(std::fs::Metadata::file_type);
        if ft.is_some_and(|t| t.is_fifo()) {
            return Ok(Sink { path: path.to_owned(), partial: None, file: open_fifo(path, wait)? });
        }
        if ft.is_some_and(|t| !t.is_file()) {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening sink {} for writing", path.display()))?;
            return Ok(Sink { path: path.to_owned(), partial: None, file });
        }
        let partial = partial_path(path);
        let _ = std::fs::remove_file(&partial); // a leftover of a crashed run with this PID
        let file = OpenOptions::new().write(true).create_new(true).mode(0o644).open(&partial).with_context(|| {
            format!("creating the sink's temporary file {} (is the directory writable?)", partial.display())
        })?;
        crate::signals::remove_on_signal(&partial);
        Ok(Sink { path: path.to_owned(), partial: Some(partial), file })
    }

    /// The file the receiver writes.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path it will have.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// After a successful receive: syncs the stream, writes `config` to `PATH.config`, and puts
    /// both in place.
    pub fn commit(mut self, config: &[u8]) -> Result<()> {
        let what = || format!("saving the stream to {}", self.path.display());
        if self.partial.is_some() {
            self.file.sync_all().with_context(what)?;
        }
        let cp = config_path(&self.path);
        let cpart = partial_path(&cp);
        let mut c = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&cpart)
            .with_context(|| format!("creating {}", cpart.display()))?;
        let written = c.write_all(config).and_then(|()| c.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&cpart);
            return Err(e).with_context(|| format!("writing the config blob {}", cpart.display()));
        }
        if let Some(p) = self.partial.take() {
            crate::signals::forget_partial(&p);
            // Never a new stream next to an old config: the old config goes first.
            match std::fs::remove_file(&cp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    let _ = std::fs::remove_file(&p);
                    let _ = std::fs::remove_file(&cpart);
                    return Err(e).with_context(|| format!("removing the old config {}", cp.display()));
                }
            }
            if let Err(e) = std::fs::rename(&p, &self.path) {
                let _ = std::fs::remove_file(&p);
                let _ = std::fs::remove_file(&cpart);
                return Err(e).with_context(what);
            }
        }
        std::fs::rename(&cpart, &cp).with_context(|| format!("renaming the config blob to {}", cp.display()))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(p) = self.partial.take() {
            crate::signals::forget_partial(&p);
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Opens a FIFO for writing without blocking: `ENXIO` (no reader yet) is retried until `wait`.
fn open_fifo(path: &Path, wait: Duration) -> Result<File> {
    let deadline = Instant::now() + wait;
    loop {
        match OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(path) {
            Ok(f) => return Ok(f),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => bail!(
                "sink {} is a FIFO and nothing opened it for reading within {} s (--accept-timeout): start its \
                 reader first",
                path.display(),
                wait.as_secs()
            ),
            Err(e) => return Err(e).with_context(|| format!("opening sink FIFO {}", path.display())),
        }
    }
}
