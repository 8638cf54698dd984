//! A multi-GiB transfer: memory stays within the source pools plus the receive budget, however
//! large the device state is. One test in this binary, so the process's peak RSS is its own.

use vfio_migration::sim::SimConfig;
use vfio_multifd::{ReceiverConfig, SourceConfig};
use vfio_multifd_tests::{assert_verified, migrate};

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn three_gib_in_bounded_memory() {
    let before = vm_hwm_kib();
    let cfgs: Vec<_> = (0..2).map(|i| SimConfig::new(format!("big{i}"), 3 << 29, 900 + i)).collect();
    let m = migrate(&cfgs, 4, SourceConfig::new(), ReceiverConfig::new(), false);
    assert_verified(&m);
    let rr = m.receiver.as_ref().unwrap();
    assert!(rr.peak_held_bytes <= rr.reserved_bytes);
    // Source: 2 devices x 5 slots of 1 MiB; receiver: 16 + 2 slots of 1 MiB; sim pipes 1 MiB
    // each. Everything else is code and stacks: far below the 3 GiB moved.
    let grew_mib = (vm_hwm_kib().saturating_sub(before)) / 1024;
    assert!(grew_mib < 160, "peak RSS grew by {grew_mib} MiB for a 3 GiB transfer");
    eprintln!("3 GiB moved; peak RSS grew {grew_mib} MiB; receiver held at most {} KiB", rr.peak_held_bytes / 1024);
}
