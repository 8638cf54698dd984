//! Page-aligned buffer pool for registered I/O.
//!
//! One anonymous mapping (memmap2) holds `slots` equal slots. Each slot is
//! `[header page | payload]`: the payload starts page-aligned and the packet header is written
//! into the last [`crate::wire::PACKET_OVERHEAD`] bytes of the header page, so a send of
//! header + payload is one contiguous range inside one registered buffer. The whole mapping is
//! registered as buffer index 0 of a ring.
//!
//! The pool hands out raw pointers because the kernel writes into it behind Rust's back; the
//! owner of a slot index is the only one who touches it, and it never frees or reuses a slot
//! while an operation the kernel may still complete refers to it (see `DESIGN.md`).

use std::io;

use memmap2::{MmapMut, MmapOptions};

/// Page size assumed for alignment (x86_64 and arm64 base pages).
pub(crate) const PAGE: usize = 4096;

/// Largest registered buffer the kernel accepts (`io_buffer_validate`: 1 GiB).
pub(crate) const MAX_REGISTERED: usize = 1 << 30;

/// Size of the huge pages the pool asks for (x86_64 and arm64 with 4 KiB base pages).
const HUGE: usize = 2 << 20;

/// What backs the pool's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backing {
    /// Reserved hugetlb pages (`MAP_HUGETLB`): the host has a huge page pool.
    Hugetlb,
    /// Base pages with `MADV_HUGEPAGE`: transparent huge pages where the kernel can.
    TransparentHuge,
    /// Base pages (a pool smaller than one huge page).
    Base,
}

/// A fixed set of page-aligned slots in one mapping.
#[derive(Debug)]
pub(crate) struct BufferPool {
    map: MmapMut,
    slot_bytes: usize,
    header_bytes: usize,
    payload_bytes: usize,
    slots: usize,
    #[cfg_attr(not(test), allow(dead_code))] // reported by tests; kept for diagnostics
    backing: Backing,
}

fn round_up(v: usize, to: usize) -> Option<usize> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

impl BufferPool {
    /// Maps `slots` slots, each with `header_bytes` (rounded up to a page; may be 0) in front of
    /// `payload_bytes` (rounded up to a page). A pool of at least one huge page comes from the
    /// hugetlb pool when the host has free huge pages (fewer TLB misses, and io_uring and
    /// SEND_ZC coalesce each huge page into one segment), else from base pages advised for
    /// transparent huge pages. The mapping is pre-faulted so that registration and the first
    /// reads do not fault.
    ///
    /// # Errors
    /// `InvalidInput` for a zero or overflowing size, or the mmap error.
    pub(crate) fn new(slots: usize, header_bytes: usize, payload_bytes: usize) -> io::Result<BufferPool> {
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, "buffer pool size out of range");
        if slots == 0 || payload_bytes == 0 {
            return Err(bad());
        }
        let header_bytes = round_up(header_bytes, PAGE).ok_or_else(bad)?;
        let payload_bytes = round_up(payload_bytes, PAGE).ok_or_else(bad)?;
        let slot_bytes = header_bytes.checked_add(payload_bytes).ok_or_else(bad)?;
        let total = slot_bytes.checked_mul(slots).ok_or_else(bad)?;
        let (mut map, backing) = if total >= HUGE {
            let rounded = round_up(total, HUGE).ok_or_else(bad)?;
            // MAP_HUGETLB reserves the pages at mmap time: without enough free huge pages it
            // fails at once (ENOMEM), and the pool falls back to base pages.
            match MmapOptions::new().len(rounded).huge(Some(21)).map_anon() {
                Ok(m) => (m, Backing::Hugetlb),
                Err(_) => {
                    let m = MmapOptions::new().len(total).map_anon()?;
                    // THP is only a hint: the kernel may or may not use huge pages.
                    let advised = m.advise(memmap2::Advice::HugePage).is_ok();
                    (m, if advised { Backing::TransparentHuge } else { Backing::Base })
                }
            }
        } else {
            (MmapOptions::new().len(total).map_anon()?, Backing::Base)
        };
        // Pre-fault: registration pins the pages anyway, and a blocking backend should not
        // take page faults in its first reads.
        for off in (0..map.len()).step_by(PAGE) {
            map[off] = 0;
        }
        Ok(BufferPool { map, slot_bytes, header_bytes, payload_bytes, slots, backing })
    }

    /// Payload capacity of one slot.
    #[cfg(test)]
    pub(crate) fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }

    /// What backs the mapping.
    #[cfg(test)]
    pub(crate) fn backing(&self) -> Backing {
        self.backing
    }

    /// Total mapped bytes.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The whole mapping, `(base, len)`, to register as one buffer.
    pub(crate) fn region(&self) -> (*mut u8, usize) {
        (self.map.as_ptr() as *mut u8, self.map.len())
    }

    /// Every slot as its own exclusive slice `[header space | payload]`, for code that owns
    /// the whole pool and hands slots to threads itself (the blocking backends: no kernel
    /// operation ever refers to this memory, so plain borrows are enough).
    pub(crate) fn slots_mut(&mut self) -> impl Iterator<Item = &mut [u8]> {
        self.map.chunks_exact_mut(self.slot_bytes).take(self.slots)
    }

    /// Bytes of header space in front of each payload.
    pub(crate) fn header_space(&self) -> usize {
        self.header_bytes
    }

    /// Pointer to the first payload byte of `slot`.
    ///
    /// # Panics
    /// If `slot >= self.slots()` (an engine bug, not an input error).
    pub(crate) fn payload_ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.slots, "slot {slot} out of range");
        let off = slot * self.slot_bytes + self.header_bytes;
        // SAFETY: `off` is inside the mapping (slot < slots, header_bytes < slot_bytes), so the
        // pointer stays within the same allocation.
        unsafe { self.map.as_ptr().add(off) as *mut u8 }
    }

    /// Pointer `back` bytes before the payload of `slot` (where a header of that length goes).
    ///
    /// # Panics
    /// If `back` exceeds the slot's header space or `slot` is out of range.
    pub(crate) fn header_ptr(&self, slot: usize, back: usize) -> *mut u8 {
        assert!(back <= self.header_bytes, "header of {back} bytes does not fit");
        let p = self.payload_ptr(slot);
        // SAFETY: `back <= header_bytes`, so the result is inside this slot's header page.
        unsafe { p.sub(back) }
    }

    /// Mutable view of `len` bytes ending at the payload of `slot` plus `extra` payload bytes:
    /// `[payload - back, payload + extra)`.
    ///
    /// # Safety
    /// The caller must own `slot` (no in-flight kernel operation may read or write that range,
    /// and no other reference to it may be alive).
    #[allow(clippy::mut_from_ref)] // The pool is shared memory; exclusivity is per slot, by contract.
    pub(crate) unsafe fn slot_bytes_mut(&self, slot: usize, back: usize, extra: usize) -> &mut [u8] {
        assert!(extra <= self.payload_bytes, "range beyond the slot payload");
        let p = self.header_ptr(slot, back);
        // SAFETY: the range lies inside the slot (checked above); exclusivity is the caller's
        // contract.
        unsafe { std::slice::from_raw_parts_mut(p, back + extra) }
    }

    /// Pointer to byte `at` of `slot`'s payload, for an operation on `len` bytes from there that
    /// may run on into the following slots (a receive pool without header space, whose
    /// consecutive slots are one contiguous range).
    ///
    /// # Panics
    /// If the range leaves the mapping (an engine bug, not an input error).
    pub(crate) fn span_ptr(&self, slot: usize, at: usize, len: usize) -> *mut u8 {
        let off = slot
            .checked_mul(self.slot_bytes)
            .and_then(|o| o.checked_add(self.header_bytes + at))
            .filter(|o| o.checked_add(len).is_some_and(|end| end <= self.slots * self.slot_bytes));
        let Some(off) = off else { panic!("span of {len} bytes at {at} of slot {slot} leaves the pool") };
        // SAFETY: `off + len` is inside the mapping (checked above), so the pointer stays within
        // the same allocation.
        unsafe { self.map.as_ptr().add(off) as *mut u8 }
    }

    /// Shared view of `len` bytes from byte `at` of `slot`'s payload, as [`BufferPool::span_ptr`].
    ///
    /// # Safety
    /// No kernel operation may be writing the range, and no mutable reference to it may be alive.
    pub(crate) unsafe fn span(&self, slot: usize, at: usize, len: usize) -> &[u8] {
        let p = self.span_ptr(slot, at, len);
        // SAFETY: the range lies inside the mapping (`span_ptr` checks it); no concurrent
        // writer is the caller's contract.
        unsafe { std::slice::from_raw_parts(p, len) }
    }
}

/// Checked exclusive access to ranges of a pool's slots, for code that hands slots between
/// threads itself and uses no kernel operation on them (the blocking receiver): a range may run
/// over several consecutive slots, so one `recv`/`write` covers a contiguous piece of a packet.
/// Each slot has a busy flag; taking a range claims its slots, and the guard releases them.
/// Claiming a slot that is already claimed is an engine bug and panics (it would be an alias).
#[derive(Debug)]
pub(crate) struct SpanLocks<'p> {
    pool: &'p mut BufferPool,
    busy: Vec<std::sync::atomic::AtomicBool>,
}

/// Exclusive access to `len` bytes of a pool (see [`SpanLocks`]); derefs to the bytes.
#[derive(Debug)]
pub(crate) struct SpanGuard<'l> {
    busy: &'l [std::sync::atomic::AtomicBool],
    ptr: *mut u8,
    len: usize,
    slots: std::ops::Range<usize>,
}

impl<'p> SpanLocks<'p> {
    /// Takes the whole pool (nothing else may touch it while this lives).
    pub(crate) fn new(pool: &'p mut BufferPool) -> SpanLocks<'p> {
        let busy = (0..pool.slots).map(|_| std::sync::atomic::AtomicBool::new(false)).collect();
        SpanLocks { pool, busy }
    }

    /// Claims `len` bytes from byte `at` of `slot`'s payload, running on over the next slots.
    ///
    /// # Panics
    /// If the range leaves the pool or overlaps a range claimed by a live guard.
    pub(crate) fn lock(&self, slot: usize, at: usize, len: usize) -> SpanGuard<'_> {
        use std::sync::atomic::Ordering;
        let ptr = self.pool.span_ptr(slot, at, len);
        let first = slot + at / self.pool.slot_bytes;
        let end = (slot * self.pool.slot_bytes + at + len.max(1)).div_ceil(self.pool.slot_bytes);
        for s in first..end {
            if self.busy[s].swap(true, Ordering::Acquire) {
                for t in first..s {
                    self.busy[t].store(false, Ordering::Release);
                }
                panic!("pool slot {s} claimed twice");
            }
        }
        SpanGuard { busy: &self.busy, ptr, len, slots: first..end }
    }
}

impl std::ops::Deref for SpanGuard<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is inside the mapping (`span_ptr` checked it), and every slot
        // it touches is claimed by this guard alone (busy flags), so nothing else reads or
        // writes it while the guard lives; `SpanLocks` holds the pool exclusively.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for SpanGuard<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `deref`; `&mut self` makes this the only reference from this guard.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for SpanGuard<'_> {
    fn drop(&mut self) {
        for s in self.slots.clone() {
            self.busy[s].store(false, std::sync::atomic::Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let p = BufferPool::new(3, 288, 1000).unwrap();
        assert_eq!(p.payload_bytes(), 4096);
        assert_eq!(p.len(), 3 * 8192);
        for s in 0..3 {
            assert_eq!(p.payload_ptr(s) as usize % PAGE, 0);
            assert_eq!(p.payload_ptr(s) as usize - p.header_ptr(s, 288) as usize, 288);
        }
        assert!(BufferPool::new(0, 0, 1).is_err());
        // 4 MiB: hugetlb if this host has a pool of free huge pages, else THP-advised pages.
        let big = BufferPool::new(4, 0, 1 << 20).unwrap();
        assert_ne!(big.backing(), Backing::Base);
        assert_eq!(p.backing(), Backing::Base);
        assert!(BufferPool::new(1, 0, usize::MAX).is_err());
    }

    #[test]
    fn span_locks_are_exclusive_and_cover_runs() {
        let mut p = BufferPool::new(4, 0, PAGE).unwrap();
        let locks = SpanLocks::new(&mut p);
        {
            let mut a = locks.lock(1, 100, 2 * PAGE);
            assert_eq!(a.len(), 2 * PAGE);
            a.fill(7);
            // Slots 1..=3 are claimed; slot 0 is free.
            let b = locks.lock(0, 0, PAGE);
            assert_eq!(b.len(), PAGE);
            let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(locks.lock(3, 0, 1))));
            assert!(again.is_err(), "an overlapping claim must fail");
        }
        assert!(locks.lock(1, 0, 3 * PAGE).iter().skip(100).take(2 * PAGE).all(|&x| x == 7));
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(locks.lock(3, 1, PAGE))));
        assert!(out.is_err(), "a range past the pool must fail");
    }
}
