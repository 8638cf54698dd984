//! Live simulated devices: versioned page content, dirty records and state digests.

use vfio_migration::sim::{self, DirtyRecord};

#[test]
fn page_content_and_records() {
    let seed = 99;
    // Version 0 is the plain stream; other versions differ from it and from each other.
    let mut v0 = vec![0u8; 4096];
    sim::fill_page(seed, 7, 0, 0, &mut v0);
    let mut plain = vec![0u8; 4096];
    sim::fill(seed, 7 * 4096, &mut plain);
    assert_eq!(v0, plain);
    let mut v1 = vec![0u8; 4096];
    let mut v2 = vec![0u8; 4096];
    sim::fill_page(seed, 7, 1, 0, &mut v1);
    sim::fill_page(seed, 7, 2, 0, &mut v2);
    assert_ne!(v0, v1);
    assert_ne!(v1, v2);
    assert!(sim::verify_page(seed, 8, 1, 0, &v1).is_err(), "another page");
    assert!(sim::verify_page(seed, 7, 2, 0, &v1).is_err(), "another version");
    // Any sub-range, at any offset, fills and verifies the same bytes.
    for (off, len) in [(0usize, 1usize), (3, 9), (8, 8), (4000, 96), (1, 4095)] {
        let mut part = vec![0u8; len];
        sim::fill_page(seed, 7, 1, off, &mut part);
        assert_eq!(part, v1[off..off + len]);
        assert_eq!(sim::verify_page(seed, 7, 1, off, &part), Ok(()));
        part[len - 1] ^= 1;
        assert_eq!(sim::verify_page(seed, 7, 1, off, &part), Err(len - 1));
    }
    // The record format round-trips.
    let r = DirtyRecord { page: 7, version: 1, len: 4096 };
    let bytes = r.encode(seed);
    assert_eq!(bytes.len() as u64, r.encoded_len());
    assert_eq!(&bytes[..8], b"VFSIMDR1");
    assert_eq!(DirtyRecord::parse(bytes[..24].try_into().unwrap()), Some(r));
    assert_eq!(&bytes[24..], &v1[..]);
    assert_eq!(DirtyRecord::parse(&[0u8; 24]), None);
    // Pages of a partial image.
    assert_eq!((sim::page_count(8193), sim::page_len(8193, 2), sim::page_len(8193, 3)), (3, 1, 0));
    // The digest tells states apart.
    assert_eq!(sim::state_digest(&[0, 1, 0]), sim::state_digest(&[0, 1, 0]));
    assert_ne!(sim::state_digest(&[0, 1, 0]), sim::state_digest(&[0, 2, 0]));
    assert_ne!(sim::state_digest(&[0, 0, 0]), sim::state_digest(&[0, 0]));
}
