//! Every thread the engine starts is named `vfmfd-*` (an operator sees them in `top -H`, and
//! the leak checks of the other tests count them by that name), on both backends: the source's
//! device threads and return-path reader, the receiver's channel set-up, workers, writers and
//! validators. One test function, so the threads listed are this test's own.

use std::collections::HashSet;
use std::sync::Mutex;

use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::MigState;
use vfio_multifd::{Receiver, ReceiverConfig, SourceConfig, SourceSession};
use vfio_multifd_tests::{dev_id, each_backend, tcp_pairs};

/// `(tid, comm)` of every thread of this process.
fn tasks() -> Vec<(String, String)> {
    let dir = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    dir.filter_map(Result::ok)
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            Some((t.file_name().to_string_lossy().into_owned(), comm.trim_end().to_owned()))
        })
        .collect()
}

/// The calling thread's tid.
fn own_tid() -> String {
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    link.file_name().unwrap().to_string_lossy().into_owned()
}

/// The threads started since `before` whose name is none of the allowed ones (a thread left
/// unnamed inherits its creator's name: the test's).
fn unnamed(before: &Mutex<HashSet<String>>) -> Vec<String> {
    const ALLOWED: [&str; 3] = ["vfmfd-", "sim-", "iou-"];
    let before = before.lock().unwrap();
    tasks()
        .into_iter()
        .filter(|(tid, comm)| !before.contains(tid) && !ALLOWED.iter().any(|p| comm.starts_with(p)))
        .map(|(tid, comm)| format!("{tid} {comm:?}"))
        .collect()
}

#[test]
fn threads_every_engine_thread_is_named() {
    each_backend(|b| {
        let before: Mutex<HashSet<String>> = Mutex::new(tasks().into_iter().map(|(tid, _)| tid).collect());
        let cfg = SimConfig::new("n", 1 << 20, 9).with_precopy_bytes(256 << 10);
        let mut src = [SimDevice::new(cfg.clone()), SimDevice::new(SimConfig::new("f", 256 << 10, 10))];
        let mut dst = SimDevice::new(cfg);
        let file = tempfile_in_target();
        let mut config = Vec::new();
        let (c, s) = tcp_pairs(2);
        let seen = Mutex::new(Vec::new());
        let (source, receiver) = std::thread::scope(|sc| {
            let (dst, file, config, seen, before) = (&mut dst, &file, &mut config, &seen, &before);
            let rx = std::thread::Builder::new()
                .name("test-rx".into())
                .spawn_scoped(sc, move || {
                    // The test's own thread is not the engine's.
                    before.lock().unwrap().insert(own_tid());
                    let mut r = Receiver::new(ReceiverConfig::new().backend(b)).unwrap();
                    r.add_device_with(dev_id(0), dst, MigState::Running);
                    r.add_data_fd(dev_id(1), std::os::fd::AsFd::as_fd(file), config);
                    r.on_started(move || seen.lock().unwrap().extend(unnamed(before)));
                    r.run(s).map(|_| ())
                })
                .unwrap();
            let mut session = SourceSession::new(SourceConfig::new().backend(b).return_path(true), c).unwrap();
            let [a, f] = &mut src;
            session.add_device(dev_id(0), a);
            session.add_device_with(
                dev_id(1),
                f,
                vfio_multifd::DeviceOptions { precopy: false, final_state: MigState::Stop },
            );
            let source = session.run(|ctl| {
                // Pre-copy runs: the source's device threads, return-path reader and the
                // receiver's threads are up.
                std::thread::sleep(std::time::Duration::from_millis(50));
                seen.lock().unwrap().extend(unnamed(before));
                ctl.switchover()
            });
            (source.map(|_| ()), rx.join().unwrap())
        });
        source.unwrap_or_else(|e| panic!("{b:?}: source: {e}"));
        receiver.unwrap_or_else(|e| panic!("{b:?}: receiver: {e}"));
        let seen = seen.into_inner().unwrap();
        assert!(seen.is_empty(), "{b:?}: threads not named vfmfd-* (or sim-*): {seen:?}");
    });
}

/// A fresh empty file for the regular-file target, removed when the test's process ends.
fn tempfile_in_target() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("vfmfd-threads-{}", std::process::id()));
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}
