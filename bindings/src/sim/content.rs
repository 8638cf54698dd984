//! The simulated device's content: a pure function of `(seed, offset)` for the stream, and the
//! config blob derived from the same seed.

use super::config::SimConfig;

/// Bytes in one pattern block.
const BLOCK: usize = 64 * 1024;
/// 64-bit words in one pattern block.
const BLOCK_WORDS: usize = BLOCK / 8;

/// splitmix64 finaliser (Steele, Lea, Flood 2014).
pub(super) const fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Word `i` (0..8192) of the seed's 64 KiB pattern block.
const fn pattern_word(seed: u64, i: u64) -> u64 {
    splitmix64(seed.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ i)
}

/// The key XORed into every word of block `b`.
const fn block_key(seed: u64, b: u64) -> u64 {
    splitmix64(!seed ^ b.wrapping_mul(0xA076_1D64_78BD_642F))
}

/// The 64-bit word at word index `w` (byte offset `8 * w`) of the stream for `seed`.
///
/// The content definition: with `b = w / 8192` and `i = w % 8192`,
/// `word(w) = pattern_word(seed, i) ^ block_key(seed, b)`, and the byte at offset `o` is byte
/// `o % 8` of `word(o / 8)` in little-endian order. Every 64 KiB block differs from every other
/// (its key), and every word within a block differs (the pattern), so reordered, duplicated,
/// shifted or dropped data is detected.
pub fn stream_word(seed: u64, w: u64) -> u64 {
    pattern_word(seed, w % BLOCK_WORDS as u64) ^ block_key(seed, w / BLOCK_WORDS as u64)
}

/// The byte at stream offset `o` for `seed` (slow path; [`fill`] is the fast one).
pub fn stream_byte(seed: u64, o: u64) -> u8 {
    stream_word(seed, o / 8).to_le_bytes()[(o % 8) as usize]
}

thread_local! {
    /// The pattern block of the last seed used on this thread (8192 words, 64 KiB).
    static PATTERN: std::cell::RefCell<(u64, Option<Box<[u64]>>)> =
        const { std::cell::RefCell::new((0, None)) };
}

/// Runs `f` with the pattern block of `seed`, computed once per thread and seed.
fn with_pattern<R>(seed: u64, f: impl FnOnce(&[u64]) -> R) -> R {
    PATTERN.with(|cell| {
        let mut c = cell.borrow_mut();
        if c.1.is_none() || c.0 != seed {
            let p: Box<[u64]> = (0..BLOCK_WORDS as u64).map(|i| pattern_word(seed, i)).collect();
            *c = (seed, Some(p));
        }
        match &c.1 {
            Some(p) => f(p),
            None => f(&[]),
        }
    })
}

/// Reads a little-endian u64 from the first 8 bytes of `b` (which has exactly 8).
#[inline(always)]
fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

/// Fills `buf` with the stream content of `seed` starting at stream offset `offset`.
///
/// Runs at memory speed (several GB/s per core): whole aligned words are one XOR of a cached
/// 64 KiB pattern word and a per-block key. Offsets wrap modulo 2^64.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    with_pattern(seed, |pat| {
        if pat.len() != BLOCK_WORDS {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = stream_byte(seed, offset.wrapping_add(i as u64));
            }
            return;
        }
        let mut o = offset;
        let mut rest = buf;
        // Unaligned head.
        while !rest.is_empty() && o % 8 != 0 {
            rest[0] = stream_byte(seed, o);
            rest = &mut rest[1..];
            o = o.wrapping_add(1);
        }
        // Aligned words, one block segment at a time.
        while rest.len() >= 8 {
            let w = o / 8;
            let i = (w % BLOCK_WORDS as u64) as usize;
            let key = block_key(seed, w / BLOCK_WORDS as u64);
            let n = (BLOCK_WORDS - i).min(rest.len() / 8);
            let (seg, tail) = rest.split_at_mut(n * 8);
            for (dst, &pw) in seg.chunks_exact_mut(8).zip(&pat[i..i + n]) {
                dst.copy_from_slice(&(pw ^ key).to_le_bytes());
            }
            rest = tail;
            o = o.wrapping_add((n * 8) as u64);
        }
        // Tail.
        for b in rest.iter_mut() {
            *b = stream_byte(seed, o);
            o = o.wrapping_add(1);
        }
    })
}

/// Checks that `buf` holds the stream content of `seed` starting at stream offset `offset`.
///
/// # Errors
/// `Err(i)`: the index **in `buf`** of the first byte that differs (its stream offset is
/// `offset + i`).
pub fn verify(seed: u64, offset: u64, buf: &[u8]) -> Result<(), usize> {
    with_pattern(seed, |pat| {
        let first_bad_byte = |from: usize, o: u64, len: usize| -> Option<usize> {
            (0..len).find(|&k| buf[from + k] != stream_byte(seed, o.wrapping_add(k as u64))).map(|k| from + k)
        };
        if pat.len() != BLOCK_WORDS {
            return match first_bad_byte(0, offset, buf.len()) {
                Some(i) => Err(i),
                None => Ok(()),
            };
        }
        let mut pos = 0usize;
        let mut o = offset;
        // Unaligned head.
        let head = ((8 - (o % 8)) % 8).min(buf.len() as u64) as usize;
        if let Some(i) = first_bad_byte(0, o, head) {
            return Err(i);
        }
        pos += head;
        o = o.wrapping_add(head as u64);
        // Aligned words, one block segment at a time.
        while buf.len() - pos >= 8 {
            let w = o / 8;
            let i = (w % BLOCK_WORDS as u64) as usize;
            let key = block_key(seed, w / BLOCK_WORDS as u64);
            let n = (BLOCK_WORDS - i).min((buf.len() - pos) / 8);
            let seg = &buf[pos..pos + n * 8];
            // Compare 8 words at a time with a branch per group: vectorises, and a mismatch
            // is located exactly below.
            let mut bad = false;
            let pw = &pat[i..i + n];
            let mut groups = seg.chunks_exact(64).zip(pw.chunks_exact(8));
            for (g, p) in &mut groups {
                let mut acc = 0u64;
                for k in 0..8 {
                    acc |= le64(&g[k * 8..k * 8 + 8]) ^ p[k] ^ key;
                }
                if acc != 0 {
                    bad = true;
                    break;
                }
            }
            if !bad {
                let done = (n / 8) * 8;
                for (k, &p) in pw.iter().enumerate().skip(done) {
                    if le64(&seg[k * 8..k * 8 + 8]) != p ^ key {
                        bad = true;
                        break;
                    }
                }
            }
            if bad {
                if let Some(idx) = first_bad_byte(pos, o, n * 8) {
                    return Err(idx);
                }
            }
            pos += n * 8;
            o = o.wrapping_add((n * 8) as u64);
        }
        match first_bad_byte(pos, o, buf.len() - pos) {
            Some(i) => Err(i),
            None => Ok(()),
        }
    })
}

// =============================================================================================
// Config blob
// =============================================================================================

/// Magic at the start of a simulated config blob.
pub const SIM_CONFIG_MAGIC: [u8; 8] = *b"VFSIMCF1";
/// Header of a simulated config blob: magic (8) + total length as LE u32 (4) + reserved (4).
pub const SIM_CONFIG_HEADER: usize = 16;
/// Salt that separates config-blob content from stream content of the same seed.
const CONFIG_SALT: u64 = 0xC0F1_6C0F_1600_0001;

/// The config blob a source with `cfg` saves, and so what a destination with `cfg` expects:
/// [`SIM_CONFIG_MAGIC`], the total length (`max(config_len, 16)`, LE u32, saturating), four
/// zero bytes, then [`fill`]`(seed ^ salt, 0, ..)`.
pub fn expected_config(cfg: &SimConfig) -> Vec<u8> {
    let len = cfg.config_len.clamp(SIM_CONFIG_HEADER, u32::MAX as usize);
    let mut v = vec![0u8; len];
    v[..8].copy_from_slice(&SIM_CONFIG_MAGIC);
    v[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    fill(cfg.seed ^ CONFIG_SALT, 0, &mut v[SIM_CONFIG_HEADER..]);
    v
}

// =============================================================================================
// Live device state: pages, versions, dirty records
// =============================================================================================

/// Page size of the live device image ([`SimConfig::dirty_rate_bytes_per_sec`]): the unit
/// that is dirtied, versioned and re-sent.
///
/// [`SimConfig::dirty_rate_bytes_per_sec`]: super::SimConfig::dirty_rate_bytes_per_sec
pub const SIM_PAGE_SIZE: u64 = 4096;

/// Magic at the start of every dirty record.
pub const DIRTY_RECORD_MAGIC: [u8; 8] = *b"VFSIMDR1";
/// Length of a dirty record's header: magic (8), page (LE u64), version (LE u32), payload
/// length (LE u32).
pub const DIRTY_RECORD_HEADER: usize = 24;

/// Salt that separates a page's version keys from everything else derived from the seed.
const VERSION_SALT: u64 = 0x5645_5253_494F_4E31;
/// Salt of [`state_digest`].
const DIGEST_SALT: u64 = 0xD16E_57D1_6E57_0001;

/// Pages of an image of `size` bytes (the last one may be partial).
pub const fn page_count(size: u64) -> u64 {
    size.div_ceil(SIM_PAGE_SIZE)
}

/// Bytes of page `page` in an image of `size` bytes: [`SIM_PAGE_SIZE`], less for a partial
/// last page, 0 past the end.
pub const fn page_len(size: u64, page: u64) -> u64 {
    let start = page.saturating_mul(SIM_PAGE_SIZE);
    if start >= size {
        0
    } else if size - start < SIM_PAGE_SIZE {
        size - start
    } else {
        SIM_PAGE_SIZE
    }
}

/// The key of `page` at `version` (> 0): word `i` of the page is XORed with
/// `splitmix64(key ^ i)`.
const fn version_key(seed: u64, page: u64, version: u32) -> u64 {
    splitmix64(
        seed ^ VERSION_SALT
            ^ page.wrapping_mul(0x9FB2_1C65_1E98_DF25)
            ^ (version as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
    )
}

/// Fills `buf` with bytes `off..off + buf.len()` of page `page` at `version`.
///
/// The content definition: version 0 is the stream content, `fill(seed, page * 4096 + off)`;
/// at version `v > 0`, every 64-bit word `i` of the page (byte offset `8 * i` in the page) is
/// that word XOR `splitmix64(k ^ i)` with `k` a hash of `(seed, page, v)`. So every version of
/// every page differs from every other, and a record at the wrong version, of the wrong page or
/// at the wrong place is detected.
pub fn fill_page(seed: u64, page: u64, version: u32, off: usize, buf: &mut [u8]) {
    fill(seed, page.wrapping_mul(SIM_PAGE_SIZE).wrapping_add(off as u64), buf);
    if version == 0 || buf.is_empty() {
        return;
    }
    let key = version_key(seed, page, version);
    let mut pos = 0usize;
    while pos < buf.len() {
        let o = off + pos;
        let word = splitmix64(key ^ (o / 8) as u64).to_le_bytes();
        let n = (8 - o % 8).min(buf.len() - pos);
        for (k, b) in buf[pos..pos + n].iter_mut().enumerate() {
            *b ^= word[o % 8 + k];
        }
        pos += n;
    }
}

/// Checks that `buf` holds bytes `off..off + buf.len()` of page `page` at `version`.
///
/// # Errors
/// `Err(i)`: the index **in `buf`** of the first byte that differs.
pub fn verify_page(seed: u64, page: u64, version: u32, off: usize, buf: &[u8]) -> Result<(), usize> {
    if version == 0 {
        return verify(seed, page.wrapping_mul(SIM_PAGE_SIZE).wrapping_add(off as u64), buf);
    }
    let mut want = [0u8; 4096];
    for (c, chunk) in buf.chunks(want.len()).enumerate() {
        let at = c * want.len();
        let w = &mut want[..chunk.len()];
        fill_page(seed, page, version, off + at, w);
        if let Some(i) = chunk.iter().zip(w.iter()).position(|(a, b)| a != b) {
            return Err(at + i);
        }
    }
    Ok(())
}

/// The header of one dirty record in a live device's save stream: [`DIRTY_RECORD_MAGIC`],
/// then `page` (LE u64), `version` (LE u32) and `len` (LE u32), followed by `len` bytes of
/// the page at that version ([`fill_page`]). `len` is [`page_len`] of the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRecord {
    /// Page number (byte offset `page * 4096` in the image).
    pub page: u64,
    /// The page's version (> 0) whose bytes follow.
    pub version: u32,
    /// Payload bytes after the header.
    pub len: u32,
}

impl DirtyRecord {
    /// The 24-byte header.
    pub fn header(&self) -> [u8; DIRTY_RECORD_HEADER] {
        let mut h = [0u8; DIRTY_RECORD_HEADER];
        h[..8].copy_from_slice(&DIRTY_RECORD_MAGIC);
        h[8..16].copy_from_slice(&self.page.to_le_bytes());
        h[16..20].copy_from_slice(&self.version.to_le_bytes());
        h[20..24].copy_from_slice(&self.len.to_le_bytes());
        h
    }

    /// Parses a header; `None` if the magic is wrong.
    pub fn parse(h: &[u8; DIRTY_RECORD_HEADER]) -> Option<DirtyRecord> {
        if h[..8] != DIRTY_RECORD_MAGIC {
            return None;
        }
        let mut p = [0u8; 8];
        p.copy_from_slice(&h[8..16]);
        let mut v = [0u8; 4];
        v.copy_from_slice(&h[16..20]);
        let mut l = [0u8; 4];
        l.copy_from_slice(&h[20..24]);
        Some(DirtyRecord { page: u64::from_le_bytes(p), version: u32::from_le_bytes(v), len: u32::from_le_bytes(l) })
    }

    /// Header plus payload bytes.
    pub fn encoded_len(&self) -> u64 {
        DIRTY_RECORD_HEADER as u64 + u64::from(self.len)
    }

    /// The whole record (header and payload) for the content of `seed`.
    pub fn encode(&self, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; DIRTY_RECORD_HEADER + self.len as usize];
        v[..DIRTY_RECORD_HEADER].copy_from_slice(&self.header());
        fill_page(seed, self.page, self.version, 0, &mut v[DIRTY_RECORD_HEADER..]);
        v
    }
}

/// A digest of a device state given as one version per page (index = page): a hash of the
/// page count and of every `(page, version)` pair with `version != 0`, in page order. Two
/// states have the same digest exactly when they have the same pages at the same versions
/// (up to hash collisions).
pub fn state_digest(versions: &[u32]) -> u64 {
    let mut h = splitmix64(DIGEST_SALT ^ versions.len() as u64);
    for (p, &v) in versions.iter().enumerate().filter(|(_, &v)| v != 0) {
        h = splitmix64(h ^ splitmix64((p as u64).wrapping_mul(0xA24B_AED4_963E_E407) ^ u64::from(v)));
    }
    h
}
