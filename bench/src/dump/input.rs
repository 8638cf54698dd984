//! A captured connection read front to back with its offset, with messages that say where.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// One capture file, read sequentially.
#[derive(Debug)]
pub struct Input {
    r: BufReader<File>,
    /// Offset of the next byte.
    pub off: u64,
    /// File length.
    pub len: u64,
    /// The file, for messages.
    pub path: PathBuf,
}

impl Input {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<Input> {
        let f = File::open(path).with_context(|| format!("opening capture {}", path.display()))?;
        let len = f.metadata().with_context(|| format!("reading the size of {}", path.display()))?.len();
        Ok(Input { r: BufReader::with_capacity(1 << 16, f), off: 0, len, path: path.to_path_buf() })
    }

    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        self.len - self.off
    }

    fn check(&self, n: u64, what: &str) -> Result<()> {
        if n > self.remaining() {
            bail!(
                "{}: truncated at offset {}: {what} needs {n} bytes, only {} left (capture cut short?)",
                self.path.display(),
                self.off,
                self.remaining()
            );
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes of `what`.
    pub fn bytes(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.check(buf.len() as u64, what)?;
        self.r
            .read_exact(buf)
            .with_context(|| format!("{}: reading {what} at offset {}", self.path.display(), self.off))?;
        self.off += buf.len() as u64;
        Ok(())
    }

    /// A byte.
    pub fn u8(&mut self, what: &str) -> Result<u8> {
        let mut b = [0u8; 1];
        self.bytes(&mut b, what)?;
        Ok(b[0])
    }

    /// A big-endian u16.
    pub fn be16(&mut self, what: &str) -> Result<u16> {
        let mut b = [0u8; 2];
        self.bytes(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    /// A big-endian u32.
    pub fn be32(&mut self, what: &str) -> Result<u32> {
        let mut b = [0u8; 4];
        self.bytes(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }

    /// A big-endian u64.
    pub fn be64(&mut self, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.bytes(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }

    /// A `u8` length and that many bytes, as text (QEMU's idstr encoding).
    pub fn short_str(&mut self, what: &str) -> Result<String> {
        let n = self.u8(what)?;
        let mut b = vec![0u8; usize::from(n)];
        self.bytes(&mut b, what)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Skips `n` bytes of `what`.
    pub fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        self.check(n, what)?;
        let d = i64::try_from(n).context("skip too large")?;
        self.r
            .seek_relative(d)
            .with_context(|| format!("{}: skipping {what} at offset {}", self.path.display(), self.off))?;
        self.off += n;
        Ok(())
    }

    /// The next byte without consuming it (`None` at the end).
    pub fn peek(&mut self) -> Result<Option<u8>> {
        let b =
            self.r.fill_buf().with_context(|| format!("{}: reading at offset {}", self.path.display(), self.off))?;
        Ok(b.first().copied())
    }

    /// Up to `max` bytes from the current offset, without consuming them.
    pub fn window(&mut self, max: u64) -> Result<Vec<u8>> {
        let n = max.min(self.remaining());
        let mut v = vec![0u8; usize::try_from(n).context("window too large")?];
        let here = self.off;
        self.bytes(&mut v, "window")?;
        self.r.seek_relative(-i64::try_from(n).context("window too large")?).context("seeking back")?;
        self.off = here;
        Ok(v)
    }
}

/// Copies `len` bytes at `off` of `path` into `w`, 1 MiB at a time (for reassembly).
pub fn copy_range(path: &Path, off: u64, len: u64, w: &mut dyn std::io::Write) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; usize::try_from(len.min(1 << 20)).context("range too large")?];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from((len - done).min(buf.len() as u64)).context("range too large")?;
        f.read_exact_at(&mut buf[..n], off + done)
            .with_context(|| format!("reading {len} bytes at offset {off} of {}", path.display()))?;
        w.write_all(&buf[..n]).context("writing a reassembled file")?;
        done += n as u64;
    }
    Ok(())
}
