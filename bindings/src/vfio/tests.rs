//! The test twin: a fake kernel behind [`SysOps`] that answers VFIO ioctls the way the
//! reference says the kernel does, so `VfioDevice`'s encoding and errno decoding are tested
//! without `/dev/vfio`.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::sync::{Arc, Mutex};

use super::*;
use crate::device::{recover, transition, Recovery};
use crate::state::{arc_creates_data_fd, next_step};

/// What the fake kernel does and what it saw.
#[derive(Debug)]
struct FakeState {
    /// GET MIGRATION answer: flags, or an errno.
    migration: std::result::Result<u64, i32>,
    state: u32,
    /// errno for the next SET (consumed).
    set_errno: Option<i32>,
    /// errno for SET PRECOPY_INFOv2, or success.
    v2_errno: Option<i32>,
    data_size: u64,
    precopy: (u64, u64, u32),
    /// Scripted results for read()/write() on data fds.
    io_script: VecDeque<std::result::Result<usize, i32>>,
    /// (argsz, flags, payload) of every feature ioctl.
    feature_calls: Vec<(u32, u32, [u8; 8])>,
    /// flags we sent in vfio_precopy_info.
    precopy_flags_in: Vec<u32>,
    resets: u32,
    /// Config region (index 7) contents; None: device without one.
    config: Option<Vec<u8>>,
    num_regions: u32,
    config_writes: Vec<(u64, Vec<u8>)>,
}

impl Default for FakeState {
    fn default() -> FakeState {
        let mut cfg = vec![0u8; 256];
        cfg[..4].copy_from_slice(&[0x86, 0x80, 0x10, 0x15]);
        cfg[4] = 0x07;
        FakeState {
            migration: Ok(0x7),
            state: MigState::Running.raw(),
            set_errno: None,
            v2_errno: None,
            data_size: 96,
            precopy: (24, 0, 0),
            io_script: VecDeque::new(),
            feature_calls: Vec::new(),
            precopy_flags_in: Vec::new(),
            resets: 0,
            config: Some(cfg),
            num_regions: 9,
            config_writes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

const CONFIG_OFFSET: u64 = 7 << 40;

fn err(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl SysOps for Fake {
    fn device_feature(&self, _dev: BorrowedFd<'_>, buf: &mut FeatureBuf) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        s.feature_calls.push((buf.hdr.argsz, buf.hdr.flags, buf.payload));
        let idx = buf.hdr.flags & v::VFIO_DEVICE_FEATURE_MASK;
        let get = buf.hdr.flags & v::VFIO_DEVICE_FEATURE_GET != 0;
        let set = buf.hdr.flags & v::VFIO_DEVICE_FEATURE_SET != 0;
        match idx {
            v::VFIO_DEVICE_FEATURE_MIGRATION if get => {
                let f = s.migration.map_err(err)?;
                buf.set_payload_u64(f);
                Ok(())
            }
            v::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE if get => {
                s.migration.map_err(err)?;
                let st = s.state;
                buf.set_mig_state(v::vfio_device_feature_mig_state { device_state: st, data_fd: -1 });
                Ok(())
            }
            v::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE if set => {
                let flags = MigFlags::from_bits(s.migration.map_err(err)?);
                let want = buf.mig_state().device_state;
                if let Some(e) = s.set_errno.take() {
                    // The core copies the struct back with data_fd = -1 on failure.
                    buf.set_mig_state(v::vfio_device_feature_mig_state { device_state: want, data_fd: -1 });
                    return Err(err(e));
                }
                let cur = MigState::from_raw(s.state).ok_or_else(|| err(libc::EINVAL))?;
                let tgt = MigState::from_raw(want).ok_or_else(|| err(libc::EINVAL))?;
                let mut at = cur;
                let mut fd = -1;
                while at != tgt {
                    let next = next_step(flags, at, tgt).ok_or_else(|| err(libc::EINVAL))?;
                    if arc_creates_data_fd(at, next) {
                        fd = File::open("/dev/null").map_err(|_| err(libc::EMFILE))?.into_raw_fd();
                    }
                    at = next;
                    s.state = at.raw();
                }
                buf.set_mig_state(v::vfio_device_feature_mig_state { device_state: want, data_fd: fd });
                Ok(())
            }
            v::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE if get => {
                s.migration.map_err(err)?;
                buf.set_payload_u64(s.data_size);
                Ok(())
            }
            v::VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 if set => match s.v2_errno {
                Some(e) => Err(err(e)),
                None => Ok(()),
            },
            _ => Err(err(libc::ENOTTY)),
        }
    }

    fn precopy_info(&self, _data: BorrowedFd<'_>, info: &mut v::vfio_precopy_info) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        s.precopy_flags_in.push(info.flags);
        assert_eq!(info.argsz, 24);
        let st = MigState::from_raw(s.state);
        if !matches!(st, Some(MigState::PreCopy) | Some(MigState::PreCopyP2p)) {
            return Err(err(libc::EINVAL));
        }
        info.initial_bytes = s.precopy.0;
        info.dirty_bytes = s.precopy.1;
        info.flags = s.precopy.2;
        Ok(())
    }

    fn reset(&self, _dev: BorrowedFd<'_>) -> io::Result<()> {
        let mut s = self.0.lock().unwrap();
        s.resets += 1;
        s.state = MigState::Running.raw();
        Ok(())
    }

    fn device_info(&self, _dev: BorrowedFd<'_>, info: &mut v::vfio_device_info) -> io::Result<()> {
        let s = self.0.lock().unwrap();
        info.num_regions = s.num_regions;
        info.num_irqs = 5;
        info.flags = v::VFIO_DEVICE_FLAGS_PCI;
        Ok(())
    }

    fn region_info(&self, _dev: BorrowedFd<'_>, info: &mut v::vfio_region_info) -> io::Result<()> {
        let s = self.0.lock().unwrap();
        if info.index >= s.num_regions {
            return Err(err(libc::EINVAL));
        }
        if info.index == 7 {
            let len = s.config.as_ref().map_or(0, |c| c.len());
            info.size = len as u64;
            info.offset = CONFIG_OFFSET;
            info.flags = v::VFIO_REGION_INFO_FLAG_READ | v::VFIO_REGION_INFO_FLAG_WRITE;
        } else {
            info.size = 0;
            info.offset = u64::from(info.index) << 40;
            info.flags = 0;
        }
        Ok(())
    }

    fn read(&self, _fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.0.lock().unwrap();
        match s.io_script.pop_front() {
            Some(Ok(n)) => Ok(n.min(buf.len())),
            Some(Err(e)) => Err(err(e)),
            None => Ok(0),
        }
    }

    fn write(&self, _fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.0.lock().unwrap();
        match s.io_script.pop_front() {
            Some(Ok(n)) => Ok(n.min(buf.len())),
            Some(Err(e)) => Err(err(e)),
            None => Ok(buf.len()),
        }
    }

    fn pread(&self, _fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let s = self.0.lock().unwrap();
        let c = s.config.as_ref().ok_or_else(|| err(libc::EINVAL))?;
        let o = off.checked_sub(CONFIG_OFFSET).ok_or_else(|| err(libc::EINVAL))? as usize;
        let n = buf.len().min(c.len().saturating_sub(o)).min(4); // short reads, like dword access
        buf[..n].copy_from_slice(&c[o..o + n]);
        Ok(n)
    }

    fn pwrite(&self, _fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<usize> {
        let mut s = self.0.lock().unwrap();
        let o = off.checked_sub(CONFIG_OFFSET).ok_or_else(|| err(libc::EINVAL))?;
        s.config_writes.push((o, buf.to_vec()));
        let c = s.config.as_mut().ok_or_else(|| err(libc::EINVAL))?;
        let o = o as usize;
        c[o..o + buf.len()].copy_from_slice(buf);
        Ok(buf.len())
    }
}

fn dev() -> (VfioDevice, Fake) {
    let fake = Fake::default();
    let fd: OwnedFd = File::open("/dev/null").unwrap().into();
    (VfioDevice::with_ops(fd, "0000:00:02.0".into(), Arc::new(fake.clone())), fake)
}

#[test]
fn flags_decode() {
    let (d, f) = dev();
    assert_eq!(d.migration_flags().unwrap(), MigFlags::ALL);
    let (argsz, flags, _) = f.0.lock().unwrap().feature_calls[0];
    assert_eq!((argsz, flags), (16, 0x0001_0001));

    f.0.lock().unwrap().migration = Ok(0x6);
    assert!(matches!(d.migration_flags(), Err(Error::NotMigratable { .. })));
    f.0.lock().unwrap().migration = Err(libc::ENOTTY);
    assert!(matches!(d.migration_flags(), Err(Error::NotMigratable { .. })));
    f.0.lock().unwrap().migration = Err(libc::EIO);
    assert_eq!(d.migration_flags().unwrap_err().errno(), Some(libc::EIO));
}

#[test]
fn state_get_and_set_encoding() {
    let (mut d, f) = dev();
    assert_eq!(d.state().unwrap(), MigState::Running);
    let fd = d.set_state_raw(MigState::PreCopy).unwrap();
    assert!(fd.is_some(), "RUNNING -> PRE_COPY makes a data fd");
    {
        let s = f.0.lock().unwrap();
        let (argsz, flags, payload) = *s.feature_calls.last().unwrap();
        assert_eq!((argsz, flags), (16, 0x0002_0002));
        assert_eq!(&payload[..4], &6u32.to_ne_bytes());
        assert_eq!(&payload[4..], &(-1i32).to_ne_bytes(), "data_fd = -1 going in");
    }
    assert!(d.set_state_raw(MigState::PreCopyP2p).unwrap().is_none());
    f.0.lock().unwrap().state = 42;
    assert!(matches!(d.state(), Err(Error::Protocol { .. })));
    f.0.lock().unwrap().state = MigState::Stop.raw();
    f.0.lock().unwrap().set_errno = Some(libc::EIO);
    let e = d.set_state_raw(MigState::StopCopy).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EIO));
}

#[test]
fn transition_and_recover_over_the_twin() {
    let (mut d, f) = dev();
    let t = transition(&mut d, MigState::StopCopy).unwrap();
    assert_eq!(
        t.arcs,
        vec![
            (MigState::Running, MigState::RunningP2p),
            (MigState::RunningP2p, MigState::Stop),
            (MigState::Stop, MigState::StopCopy)
        ]
    );
    assert!(t.data_fd.is_some());
    // A failing SET: the walk GETs the real state afterwards.
    f.0.lock().unwrap().set_errno = Some(libc::EIO);
    let e = transition(&mut d, MigState::Running).unwrap_err();
    match e {
        Error::Transition { reached, arc_from, arc_to, .. } => {
            assert_eq!(reached, MigState::StopCopy);
            assert_eq!((arc_from, arc_to), (MigState::StopCopy, MigState::Stop));
        }
        other => panic!("unexpected {other}"),
    }
    f.0.lock().unwrap().state = MigState::Error.raw();
    assert_eq!(recover(&mut d, MigState::Running).unwrap(), Recovery::Reset);
    assert_eq!(f.0.lock().unwrap().resets, 1);
    assert_eq!(d.state().unwrap(), MigState::Running);
}

#[test]
fn data_size_and_precopy_info_v2() {
    let (mut d, f) = dev();
    assert_eq!(d.stop_copy_size().unwrap(), 96);
    let (argsz, flags, _) = *f.0.lock().unwrap().feature_calls.last().unwrap();
    assert_eq!((argsz, flags), (16, 0x0001_0009));

    let fd = d.set_state_raw(MigState::PreCopy).unwrap().unwrap();
    // REINIT is not trusted before the v2 opt-in (old kernels echo flags back).
    f.0.lock().unwrap().precopy = (24, 0, v::VFIO_PRECOPY_INFO_REINIT);
    let i = d.precopy_info(fd.as_fd()).unwrap();
    assert_eq!((i.initial_bytes, i.dirty_bytes, i.reinit), (24, 0, false));

    f.0.lock().unwrap().v2_errno = Some(libc::ENOTTY);
    assert!(!d.enable_precopy_info_v2().unwrap());
    f.0.lock().unwrap().v2_errno = Some(libc::EINVAL);
    assert!(!d.enable_precopy_info_v2().unwrap());
    f.0.lock().unwrap().v2_errno = Some(libc::EIO);
    assert_eq!(d.enable_precopy_info_v2().unwrap_err().errno(), Some(libc::EIO));
    f.0.lock().unwrap().v2_errno = None;
    assert!(d.enable_precopy_info_v2().unwrap());
    let (argsz, flags, _) = *f.0.lock().unwrap().feature_calls.last().unwrap();
    assert_eq!((argsz, flags), (8, 0x0002_000C));
    assert!(d.precopy_info(fd.as_fd()).unwrap().reinit);
    assert!(f.0.lock().unwrap().precopy_flags_in.iter().all(|&fl| fl == 0), "flags in are always 0");

    f.0.lock().unwrap().state = MigState::StopCopy.raw();
    assert_eq!(d.precopy_info(fd.as_fd()).unwrap_err().errno(), Some(libc::EINVAL));
}

#[test]
fn read_write_decode() {
    let (d, f) = dev();
    let null = File::open("/dev/null").unwrap();
    let mut buf = [0u8; 64];
    f.0.lock().unwrap().io_script = VecDeque::from(vec![
        Ok(10),
        Ok(0),
        Err(libc::ENOMSG),
        Err(libc::EINTR),
        Err(libc::EINTR),
        Ok(7),
        Err(libc::ENODEV),
    ]);
    assert_eq!(d.read_data(null.as_fd(), &mut buf).unwrap(), ReadOutcome::Data(10));
    assert_eq!(d.read_data(null.as_fd(), &mut buf).unwrap(), ReadOutcome::Eof);
    assert_eq!(d.read_data(null.as_fd(), &mut buf).unwrap(), ReadOutcome::NoMsg);
    assert_eq!(d.read_data(null.as_fd(), &mut buf).unwrap(), ReadOutcome::Data(7), "EINTR retried");
    assert_eq!(d.read_data(null.as_fd(), &mut buf).unwrap_err().errno(), Some(libc::ENODEV));
    // EINTR forever: bounded retries, then the error.
    f.0.lock().unwrap().io_script = std::iter::repeat_n(Err(libc::EINTR), 100).collect();
    assert_eq!(d.read_data(null.as_fd(), &mut buf).unwrap_err().errno(), Some(libc::EINTR));
    f.0.lock().unwrap().io_script = VecDeque::from(vec![Err(libc::EINTR), Ok(3), Err(libc::ENOMEM)]);
    assert_eq!(d.write_data(null.as_fd(), &buf).unwrap(), 3);
    assert_eq!(d.write_data(null.as_fd(), &buf).unwrap_err().errno(), Some(libc::ENOMEM));
}

#[test]
fn regions_bounds_checked() {
    let (d, _f) = dev();
    let r = d.region_info(PCI_CONFIG_REGION_INDEX).unwrap();
    assert_eq!((r.size, r.offset), (256, CONFIG_OFFSET));
    let mut b = [0u8; 8];
    d.region_read(7, 0, &mut b).unwrap();
    assert_eq!(&b[..4], &[0x86, 0x80, 0x10, 0x15]);
    assert!(matches!(d.region_read(7, 252, &mut b), Err(Error::RegionBounds { .. })));
    assert!(matches!(d.region_read(7, u64::MAX, &mut b), Err(Error::RegionBounds { .. })));
    assert!(matches!(d.region_write(7, 255, &b[..2]), Err(Error::RegionBounds { .. })));
    assert!(matches!(d.region_read(2, 0, &mut b), Err(Error::Unsupported { .. })));
    assert_eq!(d.region_info(20).unwrap_err().errno(), Some(libc::EINVAL));
}

#[test]
fn a_clone_reaches_the_same_device_through_its_own_fd() {
    let (d, f) = dev();
    let c = d.try_clone().unwrap();
    assert_ne!(c.as_fd().as_raw_fd(), d.as_fd().as_raw_fd(), "a duplicate fd, not the same number");
    drop(d);
    c.region_write(PCI_CONFIG_REGION_INDEX, 0x3c, &[0x0b]).unwrap();
    assert_eq!(f.0.lock().unwrap().config_writes, vec![(0x3c, vec![0x0b])]);
}

#[test]
fn config_blob_round_trip_restores_only_command() {
    let (mut src, _) = dev();
    let blob = src.save_config().unwrap();
    assert_eq!(blob.len(), CONFIG_HEADER + 256);
    assert_eq!(&blob[..8], &CONFIG_MAGIC);
    assert_eq!(u32::from_le_bytes(blob[8..12].try_into().unwrap()), 256);

    let (mut dst, f) = dev();
    f.0.lock().unwrap().config.as_mut().unwrap()[4] = 0;
    dst.load_config(&blob).unwrap();
    let s = f.0.lock().unwrap();
    assert_eq!(s.config_writes, vec![(4, vec![0x07, 0x00])]);
    drop(s);

    // Malformed blobs: typed errors, nothing written.
    let mut bad_magic = blob.clone();
    bad_magic[0] ^= 1;
    let mut bad_len = blob.clone();
    bad_len[8] = 5;
    let mut other_dev = blob.clone();
    other_dev[CONFIG_HEADER] ^= 0xff;
    for b in [&blob[..3], &bad_magic[..], &bad_len[..], &blob[..blob.len() - 1]] {
        assert!(matches!(dst.load_config(b), Err(Error::BadConfig { .. })), "{b:?}");
    }
    assert!(matches!(dst.load_config(&other_dev), Err(Error::BadConfig { .. })));
    assert_eq!(f.0.lock().unwrap().config_writes.len(), 1);
}

#[test]
fn config_blob_without_config_region_is_empty() {
    let (mut d, f) = dev();
    f.0.lock().unwrap().num_regions = 3;
    let blob = d.save_config().unwrap();
    assert_eq!(blob.len(), CONFIG_HEADER);
    d.load_config(&blob).unwrap();
}

#[test]
fn from_device_fd_rejects_non_vfio() {
    let fd: OwnedFd = File::open("/dev/null").unwrap().into();
    let e = VfioDevice::from_device_fd(fd, "x").unwrap_err();
    assert!(matches!(e, Error::Open { .. }), "{e}");
}

#[test]
fn open_without_vfio_is_a_clean_error() {
    assert!(matches!(VfioDevice::open("0000:00:02.0"), Err(Error::Open { .. })));
    assert!(matches!(VfioDevice::open("group:x/y"), Err(Error::Open { .. })));
    assert!(matches!(VfioDevice::open("group:1"), Err(Error::Open { .. })));
    assert!(matches!(VfioDevice::open_group(99999, "a/b"), Err(Error::Open { .. })));
    assert!(matches!(VfioDevice::open_group(99999, "0000:00:02.0"), Err(Error::Open { .. })));
}

/// A throwaway sysfs tree.
fn fake_sysfs() -> PathBuf {
    use std::os::unix::fs::symlink;
    let root =
        std::env::temp_dir().join(format!("vfio-sysfs-{}-{:?}", std::process::id(), std::thread::current().id()));
    let _ = fs::remove_dir_all(&root);
    let pci = root.join("bus/pci/devices");
    let mdev = root.join("bus/mdev/devices");
    fs::create_dir_all(&pci).unwrap();
    fs::create_dir_all(&mdev).unwrap();
    fs::create_dir_all(root.join("kernel/iommu_groups/12")).unwrap();
    fs::create_dir_all(root.join("kernel/iommu_groups/3")).unwrap();
    fs::create_dir_all(root.join("bus/pci/drivers/vfio-pci")).unwrap();
    fs::create_dir_all(root.join("bus/pci/drivers/e1000e")).unwrap();
    fs::create_dir_all(root.join("bus/pci/drivers/mlx5_vfio_pci")).unwrap();
    for (name, grp, drv) in [
        ("0000:00:02.0", "12", Some("vfio-pci")),
        ("0000:00:03.0", "3", Some("e1000e")),
        ("0000:00:04.0", "3", Some("mlx5_vfio_pci")),
        ("0000:00:05.0", "3", None),
    ] {
        let d = pci.join(name);
        fs::create_dir_all(&d).unwrap();
        symlink(root.join("kernel/iommu_groups").join(grp), d.join("iommu_group")).unwrap();
        if let Some(drv) = drv {
            symlink(root.join("bus/pci/drivers").join(drv), d.join("driver")).unwrap();
        }
    }
    let u = mdev.join("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");
    fs::create_dir_all(&u).unwrap();
    symlink(root.join("kernel/iommu_groups/3"), u.join("iommu_group")).unwrap();
    root
}

#[test]
fn resolve_specs_in_fake_sysfs() {
    let root = fake_sysfs();
    assert_eq!(resolve_group_in(&root, "0000:00:02.0").unwrap(), (12, "0000:00:02.0".into()));
    assert_eq!(resolve_group_in(&root, "00:02.0").unwrap(), (12, "0000:00:02.0".into()));
    assert_eq!(
        resolve_group_in(&root, "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001").unwrap(),
        (3, "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001".into())
    );
    let p = root.join("bus/pci/devices/0000:00:03.0");
    assert_eq!(resolve_group_in(&root, p.to_str().unwrap()).unwrap(), (3, "0000:00:03.0".into()));
    assert_eq!(resolve_group_in(&root, "group:7/abc").unwrap(), (7, "abc".into()));
    for bad in ["group:7", "group:x/abc", "group:7/", "nope", "../etc", "", "0000:00:09.0"] {
        assert!(matches!(resolve_group_in(&root, bad), Err(Error::Open { .. })), "{bad}");
    }
    let list = list_vfio_devices_in(&root);
    let names: Vec<_> = list.iter().map(|l| (l.name.as_str(), l.bus, l.group, l.driver.as_deref())).collect();
    assert_eq!(
        names,
        vec![
            ("0000:00:02.0", Bus::Pci, Some(12), Some("vfio-pci")),
            ("0000:00:04.0", Bus::Pci, Some(3), Some("mlx5_vfio_pci")),
            ("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001", Bus::Mdev, Some(3), None),
        ]
    );
    let _ = fs::remove_dir_all(&root);
}

#[test]
fn listing_on_a_host_without_vfio_is_empty_not_an_error() {
    let _ = list_vfio_devices();
    assert!(list_vfio_devices_in(Path::new("/nonexistent")).is_empty());
    assert!(is_vfio_pci_driver("vfio-pci"));
    assert!(is_vfio_pci_driver("hisi_acc_vfio_pci"));
    assert!(!is_vfio_pci_driver("e1000e"));
}

#[test]
fn device_debug_names_fds() {
    let (d, _) = dev();
    let s = format!("{d:?}");
    assert!(s.contains("0000:00:02.0") && s.contains(&d.as_fd().as_raw_fd().to_string()));
}
