//! The wire decoder (`engine/src/wire.rs`) on arbitrary bytes: the init packet, the device
//! state header and the VFIO packet header never panic, and whatever they accept encodes back
//! to what was decoded (a packet header byte for byte: its encoding is canonical).
#![no_main]

use vfio_multifd::wire::{
    encode_packet_header, DeviceId, DeviceStateHeader, InitPacket, VfioPacketHeader, DEVICE_STATE_HEADER_LEN,
    INIT_PACKET_LEN, PACKET_OVERHEAD,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let channels = data.first().map_or(1, |&b| usize::from(b) + 1);
    // The session UUID the packet carries, so that the checks after it are reached.
    let mut session = [0u8; 16];
    if data.len() >= 24 {
        session.copy_from_slice(&data[8..24]);
    }
    if let Ok(p) = InitPacket::decode(data, channels, &session) {
        assert!(usize::from(p.id) < channels && data.len() >= INIT_PACKET_LEN);
        let mut b = [0u8; INIT_PACKET_LEN];
        p.encode(&mut b).expect("64 bytes");
        assert_eq!(InitPacket::decode(&b, channels, &session), Ok(p));
    }
    let max = data.get(1).map_or(u32::MAX, |&b| u32::from(b) << 16 | 0xffff);
    let Ok(h) = DeviceStateHeader::decode(data, max) else { return };
    assert!(h.next_packet_size >= 12 && h.next_packet_size <= max);
    let Some(vbytes) = data.get(DEVICE_STATE_HEADER_LEN..) else { return };
    let Ok(v) = VfioPacketHeader::decode(vbytes) else { return };
    assert!(v.idx != u32::MAX);
    let end = h.idstr.iter().position(|&b| b == 0).expect("NUL-terminated");
    let Ok(name) = std::str::from_utf8(&h.idstr[..end]) else { return };
    let dev = DeviceId::new(name, h.instance_id).expect("an idstr the decoder accepted");
    assert!(dev.matches(&h));
    let mut b = [0u8; PACKET_OVERHEAD];
    encode_packet_header(&dev, v, h.next_packet_size as usize - 12, &mut b).expect("288 bytes");
    assert_eq!(&b[..], &data[..PACKET_OVERHEAD], "a decoded header encodes back to its bytes");
});
