//! The destination's reading of a live device's save stream: the base image (paused after
//! its pre-copy portion if dirty records were sent in PRE_COPY), dirty records, the rest of
//! the base image, dirty records. Every byte is verified and nothing is kept but one version
//! per page.

use super::content::DIRTY_RECORD_MAGIC;
use super::content::{page_count, page_len, stream_byte, verify, verify_page, DirtyRecord, DIRTY_RECORD_HEADER};

/// Parses and verifies a live device's resume stream incrementally (any segmentation), and
/// keeps the version of every page the records carry.
///
/// Where the source may have paused its base image (after `pause` bytes, its pre-copy
/// portion), what follows is either a record or the base image again. The two are told apart
/// by content: the first byte that matches only the record magic or only the expected base
/// byte decides (the base is pseudo-random, so an 8-byte tie has probability 2^-64).
#[derive(Debug)]
pub(super) struct LiveStreamParser {
    seed: u64,
    size: u64,
    /// Where the base image may pause for records.
    pause: u64,
    /// Base bytes verified so far.
    base_done: u64,
    /// Header bytes of the current record so far (or, undecided, the look-ahead bytes at the
    /// pause that match both the magic and the base).
    hdr: [u8; DIRTY_RECORD_HEADER],
    have: usize,
    /// `hdr` holds a record header for sure.
    decided: bool,
    /// The current record (header complete) and the payload bytes verified so far.
    cur: Option<(DirtyRecord, usize)>,
    /// Stream offset of the current record.
    start: u64,
    /// The version of every page as loaded so far (0: only the base).
    pub(super) versions: Vec<u32>,
    /// Records verified and applied.
    pub(super) records: u64,
}

/// Where a stream went wrong: the stream offset of the first bad byte, and why.
pub(super) type Bad = (u64, String);

impl LiveStreamParser {
    /// A parser for an image of `size` bytes of `seed` whose base may pause after `pause`.
    pub(super) fn new(seed: u64, size: u64, pause: u64) -> LiveStreamParser {
        let pages = usize::try_from(page_count(size)).unwrap_or(0);
        LiveStreamParser {
            seed,
            size,
            pause: pause.min(size),
            base_done: 0,
            hdr: [0; DIRTY_RECORD_HEADER],
            have: 0,
            decided: false,
            cur: None,
            start: 0,
            versions: vec![0; pages],
            records: 0,
        }
    }

    /// Why the stream so far is not a complete one, if it is not.
    pub(super) fn incomplete(&self) -> Option<String> {
        if self.cur.is_some() || (self.decided && self.have > 0) {
            return Some(format!("it ends inside the dirty record at stream offset {}", self.start));
        }
        // Undecided look-ahead bytes matched the base: they count if they end it.
        let base = self.base_done + if self.decided { 0 } else { self.have as u64 };
        (base != self.size).then(|| format!("it ends inside the base image ({base} of {} bytes)", self.size))
    }

    /// Takes the stream bytes `data`, which start at stream offset `off`.
    ///
    /// # Errors
    /// The stream offset of the first bad byte (a bad header: its record's first byte), and why.
    pub(super) fn feed(&mut self, mut data: &[u8], mut off: u64) -> Result<(), Bad> {
        while !data.is_empty() {
            let n = if self.cur.is_some() {
                self.feed_payload(data, off)?
            } else if self.decided || self.base_done >= self.size {
                self.feed_header(data, off)?
            } else if self.base_done < self.pause {
                self.feed_base(data, off)?
            } else {
                self.feed_pause(data, off)?
            };
            data = &data[n..];
            off += n as u64;
        }
        Ok(())
    }

    /// Base bytes up to the pause (or the end).
    fn feed_base(&mut self, data: &[u8], off: u64) -> Result<usize, Bad> {
        let take = ((self.pause - self.base_done).min(data.len() as u64)) as usize;
        if let Err(i) = verify(self.seed, self.base_done, &data[..take]) {
            let at = self.base_done + i as u64;
            return Err((
                off + i as u64,
                format!("resume stream content differs from the expected at base offset {at}"),
            ));
        }
        self.base_done += take as u64;
        Ok(take)
    }

    /// At the pause: decides, byte by byte, between a record and the base resuming.
    fn feed_pause(&mut self, data: &[u8], off: u64) -> Result<usize, Bad> {
        if self.have == 0 {
            self.start = off;
        }
        for (i, &b) in data.iter().enumerate() {
            let k = self.have;
            let at = self.base_done + k as u64;
            let is_base = at < self.size && b == stream_byte(self.seed, at);
            let is_magic = b == DIRTY_RECORD_MAGIC[k];
            self.hdr[k] = b;
            match (is_magic, is_base) {
                (true, false) => {
                    self.have += 1;
                    self.decided = true;
                    return Ok(i + 1);
                }
                (false, true) => {
                    // The base resumes; the look-ahead bytes were base bytes too.
                    self.base_done = at + 1;
                    self.have = 0;
                    self.pause = self.size;
                    return Ok(i + 1);
                }
                (true, true) => {
                    self.have += 1;
                    if self.have == DIRTY_RECORD_MAGIC.len() {
                        self.decided = true;
                        return Ok(i + 1);
                    }
                }
                (false, false) => {
                    let why = format!(
                        "stream offset {}: neither a dirty record nor the base image at base offset {}",
                        off + i as u64,
                        self.base_done
                    );
                    return Err((off + i as u64, why));
                }
            }
        }
        Ok(data.len())
    }

    /// Header bytes of a record; a complete header is checked.
    fn feed_header(&mut self, data: &[u8], off: u64) -> Result<usize, Bad> {
        if self.have == 0 {
            self.start = off;
            self.decided = true;
        }
        let take = (DIRTY_RECORD_HEADER - self.have).min(data.len());
        self.hdr[self.have..self.have + take].copy_from_slice(&data[..take]);
        self.have += take;
        if self.have == DIRTY_RECORD_HEADER {
            let r = self.check_header().map_err(|why| (self.start, why))?;
            self.have = 0;
            self.decided = false;
            self.cur = Some((r, 0));
        }
        Ok(take)
    }

    /// Checks a complete header against the image and what was loaded so far.
    fn check_header(&self) -> Result<DirtyRecord, String> {
        let at = self.start;
        let r = DirtyRecord::parse(&self.hdr)
            .ok_or_else(|| format!("dirty record at stream offset {at}: bad magic {:02x?}", &self.hdr[..8]))?;
        let Some(&last) = self.versions.get(usize::try_from(r.page).unwrap_or(usize::MAX)) else {
            return Err(format!("dirty record at stream offset {at}: page {} is past the image's end", r.page));
        };
        let want = page_len(self.size, r.page);
        if u64::from(r.len) != want {
            return Err(format!(
                "dirty record at stream offset {at}: page {} with {} bytes, not {want}",
                r.page, r.len
            ));
        }
        if r.version <= last {
            return Err(format!(
                "dirty record at stream offset {at}: version {} of page {} does not follow version {last}",
                r.version, r.page
            ));
        }
        Ok(r)
    }

    /// Payload bytes of the current record; a complete record is applied.
    fn feed_payload(&mut self, data: &[u8], off: u64) -> Result<usize, Bad> {
        let Some((r, done)) = &mut self.cur else {
            return Ok(0);
        };
        let take = (r.len as usize - *done).min(data.len());
        if let Err(i) = verify_page(self.seed, r.page, r.version, *done, &data[..take]) {
            let why = format!(
                "dirty record at stream offset {}: page {} version {} differs from the expected at byte {}",
                self.start,
                r.page,
                r.version,
                *done + i
            );
            return Err((off + i as u64, why));
        }
        *done += take;
        if *done == r.len as usize {
            self.versions[r.page as usize] = r.version;
            self.records += 1;
            self.cur = None;
        }
        Ok(take)
    }
}
