//! Identities: which channel, which device of a transfer, which packet of a device's stream.
//!
//! Each is a newtype so that a channel id can never be passed where a device position is
//! meant, and so that the one rule about packet indexes (QEMU's `idx` is a `u32` and this
//! engine treats `u32::MAX` as invalid, see [`PacketIndex::next`]) is written once.

use std::fmt;

/// A multifd channel's id: the `id` byte of its init packet (`MultiFDInit_t.id`, QEMU), from 0.
/// A transfer has at most [`crate::wire::MAX_CHANNELS`] channels, so every id fits a `u8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChannelId(u8);

impl ChannelId {
    /// The channel with init-packet id `id`.
    pub const fn new(id: u8) -> ChannelId {
        ChannelId(id)
    }

    /// The id as sent in the init packet.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The id as a position into per-channel tables.
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// Channel ids `0..n` (`n` at most 256; larger counts are refused by configuration checks
    /// before this is called).
    pub(crate) fn all(n: usize) -> impl Iterator<Item = ChannelId> {
        debug_assert!(n <= crate::wire::MAX_CHANNELS);
        (0..n.min(crate::wire::MAX_CHANNELS)).map(|i| ChannelId(i as u8))
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A device's position in a transfer: the order in which it was added to a `Source` or
/// `Receiver`, from 0 (at most [`crate::MAX_DEVICES`]). Not on the wire: the wire names a
/// device by its [`crate::DeviceId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceIndex(u16);

impl DeviceIndex {
    /// The device added in position `i`.
    pub(crate) fn new(i: usize) -> DeviceIndex {
        debug_assert!(i <= crate::MAX_DEVICES);
        DeviceIndex(u16::try_from(i).unwrap_or(u16::MAX))
    }

    /// The position, for per-device tables.
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// Positions `0..n`.
    pub(crate) fn all(n: usize) -> impl Iterator<Item = DeviceIndex> {
        (0..n).map(DeviceIndex::new)
    }
}

impl fmt::Display for DeviceIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A packet's index within one device's stream (`VFIODeviceStatePacket.idx`, QEMU 10): data
/// packets from 0, the config packet after the last data packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PacketIndex(u32);

impl PacketIndex {
    /// The first packet of every stream.
    pub const FIRST: PacketIndex = PacketIndex(0);
    /// The largest valid index. `u32::MAX` is refused on the wire by this engine (so that a
    /// "next index" always exists and can never wrap to 0).
    pub const MAX: PacketIndex = PacketIndex(u32::MAX - 1);

    /// An index as read from the wire, or `None` for `u32::MAX`.
    pub const fn new(idx: u32) -> Option<PacketIndex> {
        if idx > Self::MAX.0 {
            None
        } else {
            Some(PacketIndex(idx))
        }
    }

    /// The value on the wire.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The index after this one, or `None` past [`PacketIndex::MAX`]: the one overflow rule of
    /// the engine (a stream has at most `u32::MAX` packets, its config packet included).
    pub const fn next(self) -> Option<PacketIndex> {
        PacketIndex::new(self.0.wrapping_add(1))
    }
}

impl fmt::Display for PacketIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_index_limit() {
        assert_eq!(PacketIndex::new(u32::MAX), None);
        assert_eq!(PacketIndex::MAX.next(), None);
        assert_eq!(PacketIndex::new(u32::MAX - 2).and_then(PacketIndex::next), Some(PacketIndex::MAX));
        assert_eq!(PacketIndex::FIRST.next().map(PacketIndex::get), Some(1));
    }

    #[test]
    fn channel_ids_cover_256() {
        let v: Vec<_> = ChannelId::all(256).collect();
        assert_eq!(v.len(), 256);
        assert_eq!(v[255].get(), 255);
    }
}
