//! A multifd channel: the init packet, then RAM/SYNC packets (framing checked, pages skipped)
//! and device-state packets (every header field kept). Source of the layouts: QEMU 10.0
//! `migration/multifd.h` (`MultiFDInit_t`, `MultiFDPacket_t`, `MultiFDPacketDeviceState_t`)
//! and `hw/vfio/migration-multifd.c` (`VFIODeviceStatePacket`).

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use vfio_multifd::wire::{
    encode_packet_header, DeviceId, DeviceStateHeader, InitPacket, VfioPacketHeader, COMMON_HEADER_LEN,
    DEVICE_STATE_HEADER_LEN, INIT_PACKET_LEN, MULTIFD_FLAG_COMPRESSION_MASK, MULTIFD_FLAG_DEVICE_STATE,
    MULTIFD_FLAG_SYNC, MULTIFD_MAGIC, MULTIFD_VERSION, PACKET_OVERHEAD,
};

use super::input::Input;

/// Fixed part of `MultiFDPacket_t` before the page offsets.
pub const RAM_FIXED_LEN: u64 = 320;
/// Most device-state packets kept over all channels of one dump.
pub const MAX_DEVICE_PACKETS: usize = 1 << 20;

/// RAM and SYNC packets of one channel.
#[derive(Debug, Default, Clone)]
pub struct RamStats {
    /// RAM packets (SYNC included).
    pub packets: u64,
    /// Packets with `MULTIFD_FLAG_SYNC`.
    pub sync_packets: u64,
    /// Pages whose data followed (`normal_pages`).
    pub normal_pages: u64,
    /// Pages sent as zero (`zero_pages`, offsets only).
    pub zero_pages: u64,
    /// Header bytes plus page data.
    pub bytes: u64,
    /// Distinct `ramblock` names.
    pub ramblocks: BTreeSet<String>,
    /// Largest `packet_num` seen.
    pub packet_num_max: Option<u64>,
}

/// One device-state packet, every field of both headers.
#[derive(Debug, Clone)]
pub struct DevPacket {
    /// Index of the capture file.
    pub file: usize,
    /// Offset of the packet in its file.
    pub offset: u64,
    /// The 288 header bytes as captured (device-state header, then the VFIO header).
    pub header: [u8; PACKET_OVERHEAD],
    /// `idstr`.
    pub idstr: String,
    /// `instance_id`.
    pub instance_id: u32,
    /// `next_packet_size`: VFIO header plus data.
    pub next_packet_size: u32,
    /// VFIO `idx`.
    pub idx: u32,
    /// VFIO `flags` (`1` = config state).
    pub flags: u32,
    /// Offset of the data (after the VFIO header).
    pub data_offset: u64,
    /// Data bytes.
    pub data_len: u64,
    /// Whether our encoder gives the same 288 bytes for these fields.
    pub encoder_identical: bool,
}

/// A decoded multifd channel.
#[derive(Debug, Clone)]
pub struct Channel {
    /// `MultiFDInit_t.id`.
    pub id: u8,
    /// `MultiFDInit_t.uuid`.
    pub uuid: [u8; 16],
    /// The 64 init packet bytes as captured.
    pub init: [u8; INIT_PACKET_LEN],
    /// File length (every byte is decoded, or the dump fails).
    pub bytes: u64,
    /// RAM and SYNC packets.
    pub ram: RamStats,
    /// Device-state packets in channel order.
    pub packets: Vec<DevPacket>,
}

/// Decodes a whole multifd channel. `page_count` and `page_size` give the RAM packet layout
/// (128 and 4096 for x86 with QEMU's 512 KiB `MULTIFD_PACKET_SIZE`); `budget` is how many more
/// device-state packets may be kept.
pub fn decode(inp: &mut Input, file: usize, page_count: u32, page_size: u32, budget: usize) -> Result<Channel> {
    let mut init = [0u8; INIT_PACKET_LEN];
    inp.bytes(&mut init, "the init packet (MultiFDInit_t)")?;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&init[8..24]);
    let ip = InitPacket::decode(&init, 256, &uuid).with_context(|| format!("{}: init packet", inp.path.display()))?;
    let mut ch = Channel { id: ip.id, uuid, init, bytes: inp.len, ram: RamStats::default(), packets: Vec::new() };
    while inp.remaining() > 0 {
        let at = inp.off;
        let mut hdr = [0u8; PACKET_OVERHEAD];
        inp.bytes(&mut hdr[..COMMON_HEADER_LEN], "a packet header (MultiFDPacketHdr_t)")?;
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let version = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        let flags = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        if magic != MULTIFD_MAGIC || version != MULTIFD_VERSION {
            bail!(
                "{}: offset {at}: packet header magic {magic:#010x} version {version} (expected {MULTIFD_MAGIC:#010x} \
                 version {MULTIFD_VERSION}): the previous packet's length is wrong or this is not a multifd channel",
                inp.path.display()
            );
        }
        if flags & MULTIFD_FLAG_DEVICE_STATE != 0 {
            if ch.packets.len() >= budget {
                bail!("more than {MAX_DEVICE_PACKETS} device-state packets in this dump");
            }
            let p = device_packet(inp, file, at, hdr)?;
            ch.packets.push(p);
        } else {
            ram_packet(inp, at, flags, page_count, page_size, &mut ch.ram)?;
        }
    }
    Ok(ch)
}

fn device_packet(inp: &mut Input, file: usize, at: u64, mut hdr: [u8; PACKET_OVERHEAD]) -> Result<DevPacket> {
    let path = inp.path.clone();
    let here = |e: &dyn std::fmt::Display| format!("{}: device-state packet at offset {at}: {e}", path.display());
    inp.bytes(&mut hdr[COMMON_HEADER_LEN..DEVICE_STATE_HEADER_LEN], "a device-state header")?;
    let d =
        DeviceStateHeader::decode(&hdr[..DEVICE_STATE_HEADER_LEN], u32::MAX).map_err(|e| anyhow::anyhow!(here(&e)))?;
    let payload = u64::from(d.next_packet_size);
    if payload > inp.remaining() {
        bail!(here(&format_args!(
            "next_packet_size {payload} but only {} bytes left (capture cut short?)",
            inp.remaining()
        )));
    }
    inp.bytes(&mut hdr[DEVICE_STATE_HEADER_LEN..], "a VFIO packet header (VFIODeviceStatePacket)")?;
    let v = VfioPacketHeader::decode(&hdr[DEVICE_STATE_HEADER_LEN..]).map_err(|e| anyhow::anyhow!(here(&e)))?;
    let data_len = payload - 12;
    let data_offset = inp.off;
    inp.skip(data_len, "device-state data")?;
    let idstr = d.idstr_lossy();
    let encoder_identical = reencode(&idstr, d.instance_id, v, data_len).is_some_and(|mine| mine == hdr);
    Ok(DevPacket {
        file,
        offset: at,
        header: hdr,
        idstr,
        instance_id: d.instance_id,
        next_packet_size: d.next_packet_size,
        idx: v.idx,
        flags: v.flags,
        data_offset,
        data_len,
        encoder_identical,
    })
}

/// The project's encoding of a packet header for these fields.
pub fn reencode(idstr: &str, instance_id: u32, v: VfioPacketHeader, data_len: u64) -> Option<[u8; PACKET_OVERHEAD]> {
    let dev = DeviceId::new(idstr, instance_id).ok()?;
    let mut mine = [0u8; PACKET_OVERHEAD];
    encode_packet_header(&dev, v, usize::try_from(data_len).ok()?, &mut mine).ok()?;
    Some(mine)
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn ram_packet(inp: &mut Input, at: u64, flags: u32, page_count: u32, page_size: u32, st: &mut RamStats) -> Result<()> {
    let path = inp.path.clone();
    let here = |m: String| anyhow::anyhow!("{}: RAM packet at offset {at}: {m}", path.display());
    if flags & MULTIFD_FLAG_COMPRESSION_MASK != 0 {
        return Err(here(format!("flags {flags:#x}: compressed RAM packets are not decoded")));
    }
    if flags & !(MULTIFD_FLAG_SYNC) != 0 {
        return Err(here(format!("unknown flags {flags:#x}")));
    }
    let len = RAM_FIXED_LEN + 8 * u64::from(page_count);
    let mut b = vec![0u8; usize::try_from(len)?];
    inp.bytes(&mut b[COMMON_HEADER_LEN..], "a RAM packet header (MultiFDPacket_t)")?;
    let pages_alloc = be32(&b, 12);
    let normal = be32(&b, 16);
    let next = be32(&b, 20);
    let packet_num = u64::from_be_bytes(b[24..32].try_into()?);
    let zero = be32(&b, 32);
    if pages_alloc > page_count {
        return Err(here(format!(
            "pages_alloc {pages_alloc} exceeds the page count {page_count} (see --ram-page-count)"
        )));
    }
    if u64::from(normal) + u64::from(zero) > u64::from(page_count) {
        return Err(here(format!("normal_pages {normal} + zero_pages {zero} exceed the page count {page_count}")));
    }
    if u64::from(next) != u64::from(normal) * u64::from(page_size) {
        return Err(here(format!("next_packet_size {next} is not normal_pages {normal} x page size {page_size}")));
    }
    let name = &b[64..320];
    let end = name.iter().position(|&c| c == 0).ok_or_else(|| here("ramblock name is not NUL-terminated".into()))?;
    let n = (normal + zero) as usize;
    for i in 0..n {
        let o = u64::from_be_bytes(b[320 + 8 * i..328 + 8 * i].try_into()?);
        if o % u64::from(page_size) != 0 {
            return Err(here(format!("page offset {o:#x} (entry {i}) is not page-aligned")));
        }
    }
    inp.skip(u64::from(next), "RAM page data")?;
    st.packets += 1;
    st.sync_packets += u64::from(flags & MULTIFD_FLAG_SYNC != 0);
    st.normal_pages += u64::from(normal);
    st.zero_pages += u64::from(zero);
    st.bytes += len + u64::from(next);
    if end > 0 {
        st.ramblocks.insert(String::from_utf8_lossy(&name[..end]).into_owned());
    }
    st.packet_num_max = Some(st.packet_num_max.map_or(packet_num, |m| m.max(packet_num)));
    Ok(())
}
