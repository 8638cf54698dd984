//! QEMU 10.x multifd device-state wire format.
//!
//! Every multifd channel starts with a 64-byte [`InitPacket`] (`MultiFDInit_t`). Then come
//! device-state packets: a 276-byte [`DeviceStateHeader`] (`MultiFDPacketDeviceState_t`, which
//! begins with the 12-byte `MultiFDPacketHdr_t`) and `next_packet_size` payload bytes, which for
//! VFIO start with the 12-byte [`VfioPacketHeader`] (`VFIODeviceStatePacket`). All integers are
//! big-endian and all structs packed, exactly as QEMU writes them.
//!
//! Encoding writes into a caller's buffer and never allocates (the sender writes headers
//! straight into registered buffers). Decoding validates every byte QEMU defines and returns a
//! typed [`WireError`].

/// `MULTIFD_MAGIC`.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// `MULTIFD_VERSION`.
pub const MULTIFD_VERSION: u32 = 1;
/// `MULTIFD_FLAG_DEVICE_STATE`: the only flag a device-state packet may carry.
pub const MULTIFD_FLAG_DEVICE_STATE: u32 = 0x40;
/// `MULTIFD_FLAG_SYNC`.
pub const MULTIFD_FLAG_SYNC: u32 = 0x01;
/// `MULTIFD_FLAG_COMPRESSION_MASK`.
pub const MULTIFD_FLAG_COMPRESSION_MASK: u32 = 0x3e;
/// `VFIO_DEVICE_STATE_CONFIG_STATE`: the VFIO packet carries the device config (the last one).
pub const VFIO_FLAG_CONFIG_STATE: u32 = 1;
/// `VFIO_DEVICE_STATE_PACKET_VER_CURRENT`.
pub const VFIO_PACKET_VERSION: u32 = 0;
/// vfio-multifd extension, sent only after the destination accepted the offer (never to a
/// QEMU peer): an empty packet in a device's stream marking the end of its initial pre-copy
/// data (QEMU's `VFIO_MIG_FLAG_DEV_INIT_DATA_SENT` semantics, in-band). The destination acks
/// it on the return path once every packet before it was written to the device.
pub const VFIO_FLAG_INIT_DATA_SENT: u32 = 2;

/// vfio-multifd extension offer in the init packet's `unused1` bytes (offsets 25..31), which
/// QEMU 10 ignores: this magic, then [`EXT_VERSION`], then the offered feature bits.
pub const EXT_MAGIC: [u8; 4] = *b"VFMX";
/// Version of the extension offer.
pub const EXT_VERSION: u8 = 1;
/// Feature bit: a return path on channel 0 (HELLO, switchover-ack, per-device verdicts,
/// SHUT; see DESIGN.md) and the `VFIO_FLAG_INIT_DATA_SENT` marker.
pub const EXT_RETURN_PATH: u8 = 1;
/// Feature bit (with [`EXT_RETURN_PATH`] only): the switchover commits in two phases. The
/// source keeps channel 0 open for writing after its last packet and closes it (FIN, its
/// *commit*) only once the destination's verdicts said every device was loaded and
/// validated; a source that fails or is cancelled resets the channel instead. The destination
/// starts no device before that FIN, so the two sides never both run the devices.
pub const EXT_COMMIT: u8 = 2;
/// Every feature bit this version knows.
pub const EXT_FEATURES: u8 = EXT_RETURN_PATH | EXT_COMMIT;

/// Size of `MultiFDInit_t`.
pub const INIT_PACKET_LEN: usize = 64;
/// Size of `MultiFDPacketHdr_t`.
pub const COMMON_HEADER_LEN: usize = 12;
/// Size of `MultiFDPacketDeviceState_t`.
pub const DEVICE_STATE_HEADER_LEN: usize = 276;
/// Size of `VFIODeviceStatePacket` without its data.
pub const VFIO_HEADER_LEN: usize = 12;
/// Bytes in front of a VFIO packet's data: device-state header plus VFIO header.
pub const PACKET_OVERHEAD: usize = DEVICE_STATE_HEADER_LEN + VFIO_HEADER_LEN;
/// Size of the `idstr` field, NUL terminator included.
pub const IDSTR_LEN: usize = 256;
/// The largest channel count the wire allows (`MultiFDInit_t.id` is a `uint8_t`).
pub const MAX_CHANNELS: usize = 256;

/// A session UUID as QEMU's `-uuid` (all zeros by default).
pub type Uuid = [u8; 16];

/// Why a byte sequence is not a valid packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The buffer is shorter than the structure.
    #[error("{what}: need {need} bytes, got {got}")]
    Short {
        /// Which structure.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// Magic is not `0x11223344`.
    #[error("{what}: bad magic {got:#010x} (expected 0x11223344)")]
    BadMagic {
        /// Which structure.
        what: &'static str,
        /// Value read.
        got: u32,
    },
    /// Version is not 1.
    #[error("{what}: unsupported version {got} (expected 1)")]
    BadVersion {
        /// Which structure.
        what: &'static str,
        /// Value read.
        got: u32,
    },
    /// The packet header flags are not exactly `MULTIFD_FLAG_DEVICE_STATE`.
    #[error("packet flags {flags:#x} not supported: {why}")]
    BadFlags {
        /// Flags read.
        flags: u32,
        /// In words (SYNC, compression, RAM packet...).
        why: &'static str,
    },
    /// A reserved field QEMU always zeroes is not zero.
    #[error("{what}: reserved byte at offset {offset} is {value:#04x}, must be 0")]
    Reserved {
        /// Which structure.
        what: &'static str,
        /// Byte offset inside the structure.
        offset: usize,
        /// Value found.
        value: u8,
    },
    /// `idstr` has no NUL terminator, or bytes after the first NUL are not NUL.
    #[error("idstr is {why}")]
    BadIdstr {
        /// What is wrong.
        why: &'static str,
    },
    /// `idstr` is too long to encode (at most 255 bytes) or contains a NUL.
    #[error("idstr of {len} bytes cannot be encoded: {why}")]
    IdstrTooLong {
        /// Length given.
        len: usize,
        /// Why not.
        why: &'static str,
    },
    /// `next_packet_size` is out of bounds.
    #[error("next_packet_size {size} out of bounds [{min}, {max}]")]
    BadPacketSize {
        /// Value read.
        size: u32,
        /// Smallest allowed (the VFIO header).
        min: u32,
        /// Largest allowed (the configured limit).
        max: u32,
    },
    /// VFIO packet version is not 0.
    #[error("VFIO device state packet version {got} not supported (expected 0)")]
    BadVfioVersion {
        /// Value read.
        got: u32,
    },
    /// VFIO packet flags other than CONFIG_STATE.
    #[error("VFIO device state packet flags {flags:#x} unknown (only CONFIG_STATE=1 is defined)")]
    BadVfioFlags {
        /// Flags read.
        flags: u32,
    },
    /// `idx == u32::MAX` is reserved as invalid by QEMU.
    #[error("VFIO packet index {idx:#x} is invalid")]
    BadIndex {
        /// Value read.
        idx: u32,
    },
    /// Channel id not below the expected channel count.
    #[error("channel id {id} out of range (expecting {channels} channels)")]
    BadChannelId {
        /// Value read.
        id: u8,
        /// Expected channel count.
        channels: usize,
    },
    /// The init packet's UUID is not the session's.
    #[error("session uuid mismatch: got {got}, expected {expected}")]
    UuidMismatch {
        /// Received, formatted.
        got: String,
        /// Expected, formatted.
        expected: String,
    },
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn get_u32(buf: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), WireError> {
    if buf.len() < n {
        Err(WireError::Short { what, need: n, got: buf.len() })
    } else {
        Ok(())
    }
}

/// Checks the length, then the leading `MULTIFD_MAGIC` and `MULTIFD_VERSION` every multifd
/// structure starts with.
fn check_magic_version(what: &'static str, buf: &[u8], len: usize) -> Result<(), WireError> {
    need(what, buf, len)?;
    let magic = get_u32(buf, 0);
    if magic != MULTIFD_MAGIC {
        return Err(WireError::BadMagic { what, got: magic });
    }
    let version = get_u32(buf, 4);
    if version != MULTIFD_VERSION {
        return Err(WireError::BadVersion { what, got: version });
    }
    Ok(())
}

/// Formats a UUID in the usual 8-4-4-4-12 form.
pub fn format_uuid(u: &Uuid) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Parses a UUID in 8-4-4-4-12 form (or 32 hex digits).
pub fn parse_uuid(s: &str) -> Option<Uuid> {
    let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// `MultiFDInit_t`: the first 64 bytes on every channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitPacket {
    /// Session UUID (QEMU's `-uuid`; all zeros by default).
    pub uuid: Uuid,
    /// Channel index, `0..N`.
    pub id: u8,
    /// vfio-multifd extension features offered (`EXT_*` bits); 0 = none, and then the packet
    /// is byte-for-byte QEMU's.
    pub offer: u8,
    /// With an offer only (byte 31, after the feature bits): how many devices the source
    /// migrates, `1..=`[`crate::MAX_DEVICES`], so that a destination expecting another number
    /// fails at once instead of waiting for a device that never comes; 0 = not given (a source
    /// before this field, or no offer). Ignored without an offer.
    pub devices: u8,
}

impl InitPacket {
    /// Encodes into `buf[..64]`.
    ///
    /// # Errors
    /// [`WireError::Short`] if `buf` is shorter than 64 bytes.
    pub fn encode(&self, buf: &mut [u8]) -> Result<(), WireError> {
        need("init packet", buf, INIT_PACKET_LEN)?;
        let b = &mut buf[..INIT_PACKET_LEN];
        b.fill(0);
        put_u32(b, 0, MULTIFD_MAGIC);
        put_u32(b, 4, MULTIFD_VERSION);
        b[8..24].copy_from_slice(&self.uuid);
        b[24] = self.id;
        if self.offer != 0 {
            b[25..29].copy_from_slice(&EXT_MAGIC);
            b[29] = EXT_VERSION;
            b[30] = self.offer;
            b[31] = self.devices;
        }
        Ok(())
    }

    /// Decodes and validates magic, version, reserved bytes (zero, except a well-formed
    /// extension offer), the channel id (`< channels`) and the session UUID.
    ///
    /// # Errors
    /// The first violation found.
    pub fn decode(buf: &[u8], channels: usize, session: &Uuid) -> Result<InitPacket, WireError> {
        const W: &str = "init packet";
        check_magic_version(W, buf, INIT_PACKET_LEN)?;
        // An offer: the magic, our version, and feature bits we know (unknown bits, from a newer
        // peer, are simply not accepted; nor is an offer of another extension version, which a
        // newer peer may send: it gets no answer and goes on without the extension).
        // Byte 31 of an offer is the source's device count (0: not given); a destination before
        // it reads a non-zero byte 31 as a reserved byte set and fails at once.
        let ours = buf[25..29] == EXT_MAGIC;
        let offer = if ours && buf[29] == EXT_VERSION { buf[30] & EXT_FEATURES } else { 0 };
        let devices = if offer != 0 { buf[31] } else { 0 };
        let reserved_from = if ours { 32 } else { 25 };
        if let Some(off) = (reserved_from..INIT_PACKET_LEN).find(|&i| buf[i] != 0) {
            return Err(WireError::Reserved { what: W, offset: off, value: buf[off] });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&buf[8..24]);
        if &uuid != session {
            return Err(WireError::UuidMismatch { got: format_uuid(&uuid), expected: format_uuid(session) });
        }
        let id = buf[24];
        if usize::from(id) >= channels {
            return Err(WireError::BadChannelId { id, channels });
        }
        Ok(InitPacket { uuid, id, offer, devices })
    }
}

/// A device's identity on the wire: QEMU's `idstr` (e.g. `0000:00:02.0/vfio`) and
/// `instance_id`.
///
/// The `idstr` is kept as a fixed 256-byte NUL-padded array (shared: cloning is a reference
/// count) so that comparing an incoming header against known devices never allocates.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DeviceId {
    idstr: std::sync::Arc<[u8; IDSTR_LEN]>,
    len: u8,
    /// `instance_id`.
    pub instance_id: u32,
}

impl std::fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.idstr(), self.instance_id)
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (instance {})", self.idstr(), self.instance_id)
    }
}

impl DeviceId {
    /// Builds an identity.
    ///
    /// # Errors
    /// [`WireError::IdstrTooLong`] if `idstr` is empty, longer than 255 bytes or contains a NUL.
    pub fn new(idstr: &str, instance_id: u32) -> Result<DeviceId, WireError> {
        let b = idstr.as_bytes();
        if b.len() >= IDSTR_LEN {
            return Err(WireError::IdstrTooLong { len: b.len(), why: "at most 255 bytes fit" });
        }
        if b.is_empty() {
            return Err(WireError::IdstrTooLong { len: 0, why: "it must not be empty" });
        }
        if b.contains(&0) {
            return Err(WireError::IdstrTooLong { len: b.len(), why: "it contains a NUL byte" });
        }
        let mut idstr = [0u8; IDSTR_LEN];
        idstr[..b.len()].copy_from_slice(b);
        Ok(DeviceId { idstr: std::sync::Arc::new(idstr), len: b.len() as u8, instance_id })
    }

    /// The `idstr` (lossy if the peer sent non-UTF-8 bytes).
    pub fn idstr(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.idstr[..usize::from(self.len)])
    }

    /// The raw NUL-padded field.
    pub fn idstr_field(&self) -> &[u8; IDSTR_LEN] {
        &self.idstr
    }

    /// Whether this identity equals a decoded header's, without allocating.
    pub fn matches(&self, hdr: &DeviceStateHeader) -> bool {
        self.instance_id == hdr.instance_id && *self.idstr == hdr.idstr
    }
}

/// `MultiFDPacketDeviceState_t` (276 bytes; it embeds the 12-byte common header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStateHeader {
    /// NUL-terminated, NUL-padded `idstr`.
    pub idstr: [u8; IDSTR_LEN],
    /// `instance_id`.
    pub instance_id: u32,
    /// Payload bytes that follow (the VFIO header included).
    pub next_packet_size: u32,
}

impl DeviceStateHeader {
    /// Encodes a device-state header for `dev` with `payload_len` following bytes into
    /// `buf[..276]`, without allocating.
    ///
    /// # Errors
    /// [`WireError::Short`] if `buf` is too small.
    pub fn encode(dev: &DeviceId, payload_len: u32, buf: &mut [u8]) -> Result<(), WireError> {
        need("device state header", buf, DEVICE_STATE_HEADER_LEN)?;
        put_u32(buf, 0, MULTIFD_MAGIC);
        put_u32(buf, 4, MULTIFD_VERSION);
        put_u32(buf, 8, MULTIFD_FLAG_DEVICE_STATE);
        buf[12..12 + IDSTR_LEN].copy_from_slice(&dev.idstr[..]);
        put_u32(buf, 268, dev.instance_id);
        put_u32(buf, 272, payload_len);
        Ok(())
    }

    /// Rewrites only `next_packet_size` of an already encoded header.
    ///
    /// # Errors
    /// [`WireError::Short`] if `buf` is too small.
    pub fn patch_size(buf: &mut [u8], payload_len: u32) -> Result<(), WireError> {
        need("device state header", buf, DEVICE_STATE_HEADER_LEN)?;
        put_u32(buf, 272, payload_len);
        Ok(())
    }

    /// Decodes and validates: magic, version, flags exactly `0x40` (no SYNC, no compression,
    /// no RAM packets), `idstr` NUL-terminated and NUL-padded, and
    /// `12 <= next_packet_size <= max_packet_size`.
    ///
    /// # Errors
    /// The first violation found.
    pub fn decode(buf: &[u8], max_packet_size: u32) -> Result<DeviceStateHeader, WireError> {
        const W: &str = "device state header";
        check_magic_version(W, buf, DEVICE_STATE_HEADER_LEN)?;
        let flags = get_u32(buf, 8);
        if flags != MULTIFD_FLAG_DEVICE_STATE {
            let why = if flags & MULTIFD_FLAG_DEVICE_STATE == 0 {
                "not a device-state packet (RAM packets are not accepted on these channels)"
            } else if flags & MULTIFD_FLAG_SYNC != 0 {
                "SYNC is not allowed on device-state packets"
            } else if flags & MULTIFD_FLAG_COMPRESSION_MASK != 0 {
                "compression is not supported for device state"
            } else {
                "unknown flag bits"
            };
            return Err(WireError::BadFlags { flags, why });
        }
        let mut idstr = [0u8; IDSTR_LEN];
        idstr.copy_from_slice(&buf[12..12 + IDSTR_LEN]);
        let Some(nul) = idstr.iter().position(|&b| b == 0) else {
            return Err(WireError::BadIdstr { why: "not NUL-terminated" });
        };
        if nul == 0 {
            return Err(WireError::BadIdstr { why: "empty" });
        }
        if idstr[nul..].iter().any(|&b| b != 0) {
            return Err(WireError::BadIdstr { why: "not NUL-padded after its terminator" });
        }
        let instance_id = get_u32(buf, 268);
        let size = get_u32(buf, 272);
        let min = VFIO_HEADER_LEN as u32;
        if size < min || size > max_packet_size {
            return Err(WireError::BadPacketSize { size, min, max: max_packet_size });
        }
        Ok(DeviceStateHeader { idstr, instance_id, next_packet_size: size })
    }

    /// The `idstr` as text (lossy), for messages.
    pub fn idstr_lossy(&self) -> String {
        let end = self.idstr.iter().position(|&b| b == 0).unwrap_or(IDSTR_LEN);
        String::from_utf8_lossy(&self.idstr[..end]).into_owned()
    }
}

/// `VFIODeviceStatePacket` header: version, per-device index, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfioPacketHeader {
    /// 0-based per-device packet index.
    pub idx: u32,
    /// `VFIO_FLAG_CONFIG_STATE` on the last packet, else 0.
    pub flags: u32,
}

impl VfioPacketHeader {
    /// Whether this is the config packet (the last one of its device).
    pub fn is_config(&self) -> bool {
        self.flags & VFIO_FLAG_CONFIG_STATE != 0
    }

    /// Whether this is the extension's initial-data marker ([`VFIO_FLAG_INIT_DATA_SENT`]).
    pub fn is_marker(&self) -> bool {
        self.flags & VFIO_FLAG_INIT_DATA_SENT != 0
    }

    /// Encodes into `buf[..12]`.
    ///
    /// # Errors
    /// [`WireError::Short`] if `buf` is too small.
    pub fn encode(&self, buf: &mut [u8]) -> Result<(), WireError> {
        need("VFIO packet header", buf, VFIO_HEADER_LEN)?;
        put_u32(buf, 0, VFIO_PACKET_VERSION);
        put_u32(buf, 4, self.idx);
        put_u32(buf, 8, self.flags);
        Ok(())
    }

    /// Decodes and validates version 0, known flags (the config flag, or the extension's
    /// marker alone; whether a marker is allowed on this connection is the receiver's rule) and
    /// `idx != u32::MAX`.
    ///
    /// # Errors
    /// The first violation found.
    pub fn decode(buf: &[u8]) -> Result<VfioPacketHeader, WireError> {
        need("VFIO packet header", buf, VFIO_HEADER_LEN)?;
        let version = get_u32(buf, 0);
        if version != VFIO_PACKET_VERSION {
            return Err(WireError::BadVfioVersion { got: version });
        }
        let idx = get_u32(buf, 4);
        let flags = get_u32(buf, 8);
        if flags & !(VFIO_FLAG_CONFIG_STATE | VFIO_FLAG_INIT_DATA_SENT) != 0
            || flags == VFIO_FLAG_CONFIG_STATE | VFIO_FLAG_INIT_DATA_SENT
        {
            return Err(WireError::BadVfioFlags { flags });
        }
        if idx == u32::MAX {
            return Err(WireError::BadIndex { idx });
        }
        Ok(VfioPacketHeader { idx, flags })
    }
}

/// `next_packet_size` for `data_len` bytes of device data (the VFIO header included).
fn packet_size(data_len: usize) -> Result<u32, WireError> {
    data_len.checked_add(VFIO_HEADER_LEN).and_then(|s| u32::try_from(s).ok()).ok_or(WireError::BadPacketSize {
        size: u32::MAX,
        min: VFIO_HEADER_LEN as u32,
        max: u32::MAX,
    })
}

/// Encodes a whole packet header (device-state header + VFIO header, 288 bytes) for a packet
/// carrying `data_len` bytes of device data into `buf[..288]`.
///
/// # Errors
/// [`WireError::Short`] if `buf` is too small; [`WireError::BadPacketSize`] if the data does not
/// fit a `u32` size field.
pub fn encode_packet_header(
    dev: &DeviceId,
    vfio: VfioPacketHeader,
    data_len: usize,
    buf: &mut [u8],
) -> Result<(), WireError> {
    need("packet header", buf, PACKET_OVERHEAD)?;
    let size = packet_size(data_len)?;
    DeviceStateHeader::encode(dev, size, &mut buf[..DEVICE_STATE_HEADER_LEN])?;
    vfio.encode(&mut buf[DEVICE_STATE_HEADER_LEN..PACKET_OVERHEAD])
}

/// Rewrites the size and index of an encoded 288-byte packet header in place (used after a
/// short read, and to pre-fill headers without re-encoding the `idstr`).
///
/// # Errors
/// As [`encode_packet_header`].
pub fn patch_packet_header(buf: &mut [u8], vfio: VfioPacketHeader, data_len: usize) -> Result<(), WireError> {
    need("packet header", buf, PACKET_OVERHEAD)?;
    let size = packet_size(data_len)?;
    DeviceStateHeader::patch_size(buf, size)?;
    vfio.encode(&mut buf[DEVICE_STATE_HEADER_LEN..PACKET_OVERHEAD])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// Golden vector written from the struct definition: magic, version, uuid, id, zeros.
    #[test]
    fn init_packet_golden() {
        let uuid = parse_uuid("00112233-4455-6677-8899-aabbccddeeff").unwrap();
        let mut buf = [0xffu8; 64];
        InitPacket { uuid, id: 3, offer: 0, devices: 0 }.encode(&mut buf).unwrap();
        let mut want = hex("11223344 00000001 00112233445566778899aabbccddeeff 03");
        want.resize(64, 0);
        assert_eq!(buf.to_vec(), want);
        assert_eq!(InitPacket::decode(&buf, 4, &uuid).unwrap(), InitPacket { uuid, id: 3, offer: 0, devices: 0 });
    }

    #[test]
    fn init_packet_errors() {
        let uuid = [0u8; 16];
        let mut good = [0u8; 64];
        InitPacket { uuid, id: 1, offer: 0, devices: 0 }.encode(&mut good).unwrap();
        assert!(matches!(InitPacket::decode(&good[..63], 2, &uuid), Err(WireError::Short { .. })));
        let mut b = good;
        b[0] = 0x12;
        assert!(matches!(InitPacket::decode(&b, 2, &uuid), Err(WireError::BadMagic { .. })));
        let mut b = good;
        b[7] = 2;
        assert!(matches!(InitPacket::decode(&b, 2, &uuid), Err(WireError::BadVersion { got: 2, .. })));
        for off in 25..64 {
            let mut b = good;
            b[off] = 1;
            assert_eq!(
                InitPacket::decode(&b, 2, &uuid),
                Err(WireError::Reserved { what: "init packet", offset: off, value: 1 })
            );
        }
        assert_eq!(InitPacket::decode(&good, 1, &uuid), Err(WireError::BadChannelId { id: 1, channels: 1 }));
        let other = [7u8; 16];
        assert!(matches!(InitPacket::decode(&good, 2, &other), Err(WireError::UuidMismatch { .. })));
    }

    /// Golden vector of a full data packet header for `0000:00:02.0/vfio`, instance 0, idx 5,
    /// 4096 data bytes: next_packet_size = 4108 = 0x100c.
    #[test]
    fn packet_header_golden() {
        let dev = DeviceId::new("0000:00:02.0/vfio", 0).unwrap();
        let mut buf = [0xaau8; PACKET_OVERHEAD];
        encode_packet_header(&dev, VfioPacketHeader { idx: 5, flags: 0 }, 4096, &mut buf).unwrap();
        let mut want = hex("11223344 00000001 00000040");
        let mut idstr = b"0000:00:02.0/vfio".to_vec();
        idstr.resize(256, 0);
        want.extend_from_slice(&idstr);
        want.extend_from_slice(&hex("00000000 0000100c"));
        want.extend_from_slice(&hex("00000000 00000005 00000000"));
        assert_eq!(buf.len(), 288);
        assert_eq!(buf.to_vec(), want);

        let h = DeviceStateHeader::decode(&buf, 1 << 20).unwrap();
        assert!(dev.matches(&h));
        assert_eq!(h.next_packet_size, 4108);
        assert_eq!(h.idstr_lossy(), "0000:00:02.0/vfio");
        let v = VfioPacketHeader::decode(&buf[276..]).unwrap();
        assert_eq!(v, VfioPacketHeader { idx: 5, flags: 0 });
        assert!(!v.is_config());

        // Config packet: idx K, flags 1, instance 9.
        let dev9 = DeviceId::new("x/vfio", 9).unwrap();
        encode_packet_header(&dev9, VfioPacketHeader { idx: 0x0102_0304, flags: 1 }, 0, &mut buf).unwrap();
        assert_eq!(&buf[268..276], &hex("00000009 0000000c")[..]);
        assert_eq!(&buf[276..288], &hex("00000000 01020304 00000001")[..]);
        assert!(VfioPacketHeader::decode(&buf[276..]).unwrap().is_config());

        patch_packet_header(&mut buf, VfioPacketHeader { idx: 7, flags: 0 }, 100).unwrap();
        assert_eq!(&buf[272..288], &hex("00000070 00000000 00000007 00000000")[..]);
    }

    /// Captured from QEMU 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1) migrating an mtty-2 mdev
    /// at guest PCI slot 00:01.0 to another QEMU over 2 multifd channels (`make vm-test`,
    /// case qemu-interop, `vfio-multifd dump -J`): the data packet, idx 0 with mtty's 72 bytes
    /// of STOP_COPY data (next_packet_size 84).
    const QEMU_10_0_13_DATA_HEADER: &str = concat!(
        "112233440000000100000040303030303a30303a30312e302f7666696f00000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000054000000000000000000000000",
    );
    /// The same migration's config packet: idx 1, flags CONFIG_STATE, 4132 bytes of QEMU's
    /// vfio-pci config state (next_packet_size 4144).
    const QEMU_10_0_13_CONFIG_HEADER: &str = concat!(
        "112233440000000100000040303030303a30303a30312e302f7666696f00000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000000000000000000000000000000000000000000000000000000000000000000001030000000000000000100000001",
    );
    /// The same migration's init packet of channel 1 (uuid all zero: no `-uuid`).
    const QEMU_10_0_13_INIT_1: &str = concat!(
        "1122334400000001000000000000000000000000000000000100000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000",
    );

    /// QEMU 10.0.13's own bytes: the decoders accept them with the fields QEMU meant, and the
    /// encoders reproduce them byte for byte.
    #[test]
    fn qemu_10_0_13_golden() {
        let dev = DeviceId::new("0000:00:01.0/vfio", 0).unwrap();
        for (hexstr, idx, flags, data_len) in
            [(QEMU_10_0_13_DATA_HEADER, 0, 0, 72usize), (QEMU_10_0_13_CONFIG_HEADER, 1, VFIO_FLAG_CONFIG_STATE, 4132)]
        {
            let qemu = hex(hexstr);
            assert_eq!(qemu.len(), PACKET_OVERHEAD);
            let h = DeviceStateHeader::decode(&qemu[..DEVICE_STATE_HEADER_LEN], 1 << 20).unwrap();
            assert!(dev.matches(&h));
            assert_eq!(h.next_packet_size as usize, VFIO_HEADER_LEN + data_len);
            let v = VfioPacketHeader::decode(&qemu[DEVICE_STATE_HEADER_LEN..]).unwrap();
            assert_eq!(v, VfioPacketHeader { idx, flags });
            let mut ours = [0x5au8; PACKET_OVERHEAD];
            encode_packet_header(&dev, v, data_len, &mut ours).unwrap();
            assert_eq!(ours.to_vec(), qemu, "idx {idx}: our header differs from QEMU's");
        }
        let qemu = hex(QEMU_10_0_13_INIT_1);
        let p = InitPacket::decode(&qemu, 2, &[0; 16]).unwrap();
        assert_eq!(p, InitPacket { uuid: [0; 16], id: 1, offer: 0, devices: 0 });
        let mut ours = [0x5au8; INIT_PACKET_LEN];
        p.encode(&mut ours).unwrap();
        assert_eq!(ours.to_vec(), qemu);
    }

    fn good_header() -> [u8; PACKET_OVERHEAD] {
        let mut buf = [0u8; PACKET_OVERHEAD];
        encode_packet_header(&DeviceId::new("d/vfio", 0).unwrap(), VfioPacketHeader { idx: 0, flags: 0 }, 10, &mut buf)
            .unwrap();
        buf
    }

    #[test]
    fn header_decode_errors() {
        let g = good_header();
        let max = 1 << 20;
        let mut b = g;
        b[3] = 0;
        assert!(matches!(DeviceStateHeader::decode(&b, max), Err(WireError::BadMagic { .. })));
        let mut b = g;
        b[7] = 9;
        assert!(matches!(DeviceStateHeader::decode(&b, max), Err(WireError::BadVersion { got: 9, .. })));
        for (flags, frag) in [(0x41u32, "SYNC"), (0x42, "compression"), (0x00, "RAM"), (0xc0, "unknown"), (0x01, "RAM")]
        {
            let mut b = g;
            b[8..12].copy_from_slice(&flags.to_be_bytes());
            match DeviceStateHeader::decode(&b, max) {
                Err(WireError::BadFlags { flags: f, why }) => {
                    assert_eq!(f, flags);
                    assert!(why.contains(frag), "{why} for {flags:#x}");
                }
                other => panic!("{other:?}"),
            }
        }
        let mut b = g;
        b[12..12 + 256].fill(b'a');
        assert_eq!(DeviceStateHeader::decode(&b, max), Err(WireError::BadIdstr { why: "not NUL-terminated" }));
        let mut b = g;
        b[12 + 200] = b'x';
        assert_eq!(
            DeviceStateHeader::decode(&b, max),
            Err(WireError::BadIdstr { why: "not NUL-padded after its terminator" })
        );
        let mut b = g;
        b[12] = 0;
        b[13..12 + 256].fill(0);
        assert_eq!(DeviceStateHeader::decode(&b, max), Err(WireError::BadIdstr { why: "empty" }));
        let mut b = g;
        b[272..276].copy_from_slice(&11u32.to_be_bytes());
        assert_eq!(DeviceStateHeader::decode(&b, max), Err(WireError::BadPacketSize { size: 11, min: 12, max }));
        let mut b = g;
        b[272..276].copy_from_slice(&(max + 1).to_be_bytes());
        assert!(matches!(DeviceStateHeader::decode(&b, max), Err(WireError::BadPacketSize { .. })));
        b[272..276].copy_from_slice(&max.to_be_bytes());
        assert!(DeviceStateHeader::decode(&b, max).is_ok());
        assert!(matches!(DeviceStateHeader::decode(&g[..275], max), Err(WireError::Short { .. })));
    }

    #[test]
    fn init_packet_extension_offer() {
        let uuid = [7u8; 16];
        let mut b = [0u8; 64];
        InitPacket { uuid, id: 0, offer: EXT_RETURN_PATH, devices: 0 }.encode(&mut b).unwrap();
        assert_eq!(&b[25..31], b"VFMX\x01\x01");
        assert_eq!(InitPacket::decode(&b, 1, &uuid).unwrap().offer, EXT_RETURN_PATH);
        // Unknown feature bits of a newer peer are not accepted, but not an error either.
        b[30] = 0x81;
        assert_eq!(InitPacket::decode(&b, 1, &uuid).unwrap().offer, EXT_RETURN_PATH);
        // Another extension version (a newer peer): no offer, no error.
        b[29] = 2;
        assert_eq!(InitPacket::decode(&b, 1, &uuid).unwrap().offer, 0);
        b[29] = EXT_VERSION;
        // Byte 31: the source's device count (0: not given).
        b[31] = 3;
        assert_eq!(InitPacket::decode(&b, 1, &uuid).unwrap().devices, 3);
        // Anything else in the unused bytes still is an error.
        b[32] = 1;
        assert!(matches!(InitPacket::decode(&b, 1, &uuid), Err(WireError::Reserved { offset: 32, .. })));
        b[32] = 0;
        b[30] = EXT_RETURN_PATH;
        let mut c = [0u8; 64];
        InitPacket { uuid, id: 0, offer: EXT_RETURN_PATH, devices: 3 }.encode(&mut c).unwrap();
        assert_eq!(c, b, "the count is encoded at byte 31");
        // A count without an offer is not encoded (the packet stays QEMU's).
        InitPacket { uuid, id: 0, offer: 0, devices: 3 }.encode(&mut c).unwrap();
        assert!(c[25..].iter().all(|&x| x == 0));
        // No offer: byte-for-byte QEMU's packet.
        let mut q = [0u8; 64];
        InitPacket { uuid, id: 0, offer: 0, devices: 0 }.encode(&mut q).unwrap();
        assert!(q[25..].iter().all(|&x| x == 0));
    }

    #[test]
    fn vfio_header_errors() {
        let mut b = [0u8; 12];
        VfioPacketHeader { idx: 1, flags: 0 }.encode(&mut b).unwrap();
        let mut x = b;
        x[3] = 1;
        assert_eq!(VfioPacketHeader::decode(&x), Err(WireError::BadVfioVersion { got: 1 }));
        let mut x = b;
        x[11] = 4;
        assert_eq!(VfioPacketHeader::decode(&x), Err(WireError::BadVfioFlags { flags: 4 }));
        x[11] = 3;
        assert_eq!(VfioPacketHeader::decode(&x), Err(WireError::BadVfioFlags { flags: 3 }), "marker and config");
        x[11] = 2;
        assert!(VfioPacketHeader::decode(&x).unwrap().is_marker());
        let mut x = b;
        x[4..8].fill(0xff);
        assert_eq!(VfioPacketHeader::decode(&x), Err(WireError::BadIndex { idx: u32::MAX }));
        assert!(matches!(VfioPacketHeader::decode(&b[..11]), Err(WireError::Short { .. })));
    }

    #[test]
    fn device_id_rules() {
        assert!(DeviceId::new("", 0).is_err());
        assert!(DeviceId::new(&"a".repeat(255), 0).is_ok());
        assert!(DeviceId::new(&"a".repeat(256), 0).is_err());
        assert!(DeviceId::new("a\0b", 0).is_err());
        let id = DeviceId::new("dev/vfio", 3).unwrap();
        assert_eq!(id.to_string(), "dev/vfio (instance 3)");
    }

    /// Arbitrary bytes never panic a decoder: every input is either a packet or an error.
    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut buf = [0u8; PACKET_OVERHEAD];
        let mut accepted = 0;
        for round in 0..200_000u32 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // Half the rounds start from a valid header with a few bytes flipped, so the
            // decoders get past their first checks.
            if round % 2 == 0 {
                let dev = DeviceId::new("0000:00:02.0/vfio", round).unwrap();
                encode_packet_header(&dev, VfioPacketHeader { idx: round, flags: round & 1 }, 100, &mut buf).unwrap();
                for k in 0..3 {
                    let i = (x >> (k * 9)) as usize % PACKET_OVERHEAD;
                    buf[i] ^= (x >> (k * 8 + 30)) as u8;
                }
            }
            let len = if round % 2 == 0 { PACKET_OVERHEAD } else { (x as usize) % (PACKET_OVERHEAD + 1) };
            let _ = InitPacket::decode(&buf[..len.min(INIT_PACKET_LEN)], 1 + (x as usize % 256), &[0; 16]);
            if let Ok(h) = DeviceStateHeader::decode(&buf[..len], 1 << 20) {
                assert!(h.next_packet_size >= 12 && h.next_packet_size <= 1 << 20);
                if VfioPacketHeader::decode(&buf[276..len.max(276)]).is_ok() {
                    accepted += 1;
                }
            }
        }
        // Most flips land in the NUL padding of idstr, which the decoder rejects; some survive.
        assert!(accepted > 20, "some mutated headers should stay valid ({accepted})");
    }

    #[test]
    fn round_trip_many() {
        let mut buf = [0u8; PACKET_OVERHEAD];
        for (i, name) in ["a", "0000:00:02.0/vfio", &"z".repeat(255)].iter().enumerate() {
            for idx in [0u32, 1, 0xfffe, u32::MAX - 1] {
                for flags in [0u32, 1] {
                    let dev = DeviceId::new(name, i as u32 * 77).unwrap();
                    encode_packet_header(&dev, VfioPacketHeader { idx, flags }, 12345, &mut buf).unwrap();
                    let h = DeviceStateHeader::decode(&buf, u32::MAX).unwrap();
                    assert!(dev.matches(&h));
                    assert_eq!(h.next_packet_size, 12357);
                    assert_eq!(VfioPacketHeader::decode(&buf[276..]).unwrap(), VfioPacketHeader { idx, flags });
                }
            }
        }
        let u = parse_uuid("0123456789abcdef0123456789ABCDEF").unwrap();
        assert_eq!(parse_uuid(&format_uuid(&u)), Some(u));
        assert_eq!(parse_uuid("xyz"), None);
    }
}
