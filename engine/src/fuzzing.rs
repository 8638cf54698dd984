//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; not an API).
//!
//! [`reassembly`] drives the receiver's reassembly state machine (`receiver::reassembly`) with
//! a sequence of admit / received / write operations decoded from arbitrary bytes, legal or
//! not, and checks after every step what must hold whatever the peer sends: the bookkeeping's
//! invariants (every block free or in exactly one chain, the budget never exceeded, enough
//! free blocks for every idle reserve), a refusal only when the bytes do not fit, each
//! device's packets written in index order from 0 with nothing skipped, and no panic.

use crate::ids::{ChannelId, DeviceIndex};
use crate::receiver::reassembly::{Admit, Admitted, NextWrite, Reassembly};
use crate::wire::{encode_packet_header, DeviceId, DeviceStateHeader, VfioPacketHeader, PACKET_OVERHEAD};

/// Reads bytes off the front of the input; zeros once it is used up.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else { return 0 };
        self.0 = rest;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

/// Runs one fuzz case (see the module docs).
///
/// # Panics
/// When a property above does not hold: that is the bug the fuzzer reports.
pub fn reassembly(data: &[u8]) {
    let mut input = Input(data);
    let ndev = usize::from(input.u8() % 4) + 1;
    let max_len = [4096, 64 << 10, 1 << 20][usize::from(input.u8() % 3)];
    // Up to 512 KiB: small pools keep each case fast, and every geometry still fills up.
    let budget = usize::from(input.u16() % 2048) * 256;
    let markers = input.u8() & 1 == 1;
    let ids: Vec<DeviceId> =
        (0..ndev).map(|i| DeviceId::new(&format!("fuzz{i}/vfio"), 0).expect("a valid id")).collect();
    let stranger = DeviceId::new("stranger/vfio", 7).expect("a valid id");
    let mut r = Reassembly::new(ids.clone(), budget, max_len, markers);
    let mut receiving: Vec<Admitted> = Vec::new();
    let mut written = vec![0u32; ndev];
    let mut steps = 0;
    while !input.0.is_empty() && steps < 4096 {
        steps += 1;
        match input.u8() % 4 {
            0 => {
                let d = usize::from(input.u8()) % (ndev + 1);
                let idx = if input.u8() & 0x80 == 0 { u32::from(input.u16() % 64) } else { input.u32() };
                let flags = u32::from(input.u8() % 4);
                let len = input.u32() as usize % (max_len + 2);
                let dev = ids.get(d).unwrap_or(&stranger);
                offer(&mut r, dev, VfioPacketHeader { idx, flags }, len, &mut receiving);
            }
            1 if !receiving.is_empty() => {
                let a = receiving.swap_remove(usize::from(input.u8()) % receiving.len());
                walk_pieces(&r, a);
                r.received(a);
            }
            2 => {
                let d = usize::from(input.u8()) % ndev;
                write_next(&mut r, d, &mut written);
            }
            _ => {
                let _ = (r.write_pending(), r.incomplete_error(), r.waits_report(), r.all_finished());
            }
        }
        r.check_invariants();
    }
}

fn offer(r: &mut Reassembly, dev: &DeviceId, v: VfioPacketHeader, len: usize, receiving: &mut Vec<Admitted>) {
    let mut b = [0u8; PACKET_OVERHEAD];
    if encode_packet_header(dev, v, len, &mut b).is_err() {
        return;
    }
    let Ok(h) = DeviceStateHeader::decode(&b, u32::MAX) else { return };
    // The decoder refuses what the receiver never sees (index u32::MAX, unknown flags).
    let Ok(v) = VfioPacketHeader::decode(&b[crate::wire::DEVICE_STATE_HEADER_LEN..]) else { return };
    match r.admit(ChannelId::new(0), &h, v) {
        Ok(Admit::Accept(a)) => {
            assert_eq!((a.len, a.idx.get()), (len, v.idx));
            receiving.push(a);
        }
        Ok(Admit::Wait(why)) => {
            assert!(why.needed > r.budget_bytes(), "refused within the budget: {why:?}");
            assert!(why.held <= r.budget_bytes() && why.held < why.needed, "{why:?}");
        }
        Err(_) => {}
    }
}

/// The pieces of a packet being received cover its payload exactly once.
fn walk_pieces(r: &Reassembly, a: Admitted) {
    for merge in [false, true] {
        let mut off = 0;
        while off < a.len {
            let p = r.piece(a.head, off, merge);
            let end = p.block as usize * r.block_bytes() + p.at + p.len;
            assert!(p.len > 0 && off + p.len <= a.len && end <= r.block_bytes() * r.block_count(), "{p:?}");
            off += p.len;
        }
    }
}

fn write_next(r: &mut Reassembly, d: usize, written: &mut [u32]) {
    let di = DeviceIndex::new(d);
    let Some(w) = r.next_write(di) else { return };
    match w {
        NextWrite::Data { idx, .. } | NextWrite::Marker { idx } => {
            assert_eq!(idx.get(), written[d], "written out of order")
        }
        NextWrite::Config { .. } => {}
    }
    written[d] += 1;
    let done = r.written(di);
    assert_eq!(done, r.finished(di));
}
