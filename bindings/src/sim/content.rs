//! The simulated device's content: a pure function of `(seed, offset)` for the stream, and the
//! config blob derived from the same seed.

use super::config::SimConfig;

/// Bytes in one pattern block.
const BLOCK: usize = 64 * 1024;
/// 64-bit words in one pattern block.
const BLOCK_WORDS: usize = BLOCK / 8;

/// splitmix64 finaliser (Steele, Lea, Flood 2014).
const fn splitmix64(x: u64) -> u64 {
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
