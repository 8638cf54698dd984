//! No fd or thread outlives a simulated device. Alone in its own test binary, so no other
//! test opens fds concurrently and the count in /proc/self/fd is meaningful.

use std::os::fd::AsFd;

use vfio_migration::sim::{ArcFault, FaultLeave, SimConfig, SimDevice};
use vfio_migration::{recover, transition, MigState, MigrationDevice, ReadOutcome};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

#[test]
fn no_fd_or_thread_leaks() {
    let fds0 = open_fds();
    let th0 = threads();
    for round in 0..20u64 {
        let cfg = SimConfig::new("leak", 200_000, round).with_max_read(8192);
        let mut src = SimDevice::new(cfg.clone());
        let mut dst = SimDevice::new(cfg.clone());
        // PRE_COPY -> STOP_COPY, read half, then abandon.
        let sfd = transition(&mut src, MigState::PreCopy).unwrap().data_fd.unwrap();
        let rfd = transition(&mut dst, MigState::Resuming).unwrap().data_fd.unwrap();
        let mut buf = vec![0u8; 8192];
        while let ReadOutcome::Data(n) = src.read_data(sfd.as_fd(), &mut buf).unwrap() {
            dst.write_data(rfd.as_fd(), &buf[..n]).unwrap();
        }
        transition(&mut src, MigState::StopCopy).unwrap();
        if round % 2 == 0 {
            // Finish properly.
            while let ReadOutcome::Data(n) = src.read_data(sfd.as_fd(), &mut buf).unwrap() {
                let mut off = 0;
                while off < n {
                    off += dst.write_data(rfd.as_fd(), &buf[off..n]).unwrap();
                }
            }
            transition(&mut dst, MigState::Running).unwrap();
            transition(&mut src, MigState::Running).unwrap();
        } else {
            // Abandon mid-stream: failed resume, reset, and sessions still open at drop.
            assert!(transition(&mut dst, MigState::Stop).is_err());
            recover(&mut dst, MigState::Running).unwrap();
            let _ = transition(&mut dst, MigState::Resuming).unwrap();
        }
        // Faulty devices too.
        let mut f = SimDevice::new(cfg.clone().with_read_error_at(1000).with_fail_arc(ArcFault {
            from: MigState::StopCopy,
            to: MigState::Stop,
            errno: libc::EIO,
            leave: FaultLeave::Error,
        }));
        let ffd = transition(&mut f, MigState::StopCopy).unwrap().data_fd.unwrap();
        let _ = f.read_data(ffd.as_fd(), &mut buf);
        assert!(transition(&mut f, MigState::Stop).is_err());
        drop((src, dst, f, sfd, rfd, ffd));
    }
    assert_eq!(open_fds(), fds0, "fds leaked");
    // A joined thread can still be listed in /proc/self/task for a moment: pthread_join
    // returns once the kernel clears the thread id, before the task is released. Under load
    // that window is long enough to be seen, so give it a bounded grace period.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while threads() != th0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(threads(), th0, "threads leaked");
}
