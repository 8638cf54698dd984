//! A real VFIO device driven through the migration uAPI v2.
//!
//! Open it by sysfs path, PCI address or mdev UUID ([`VfioDevice::open`]), by group number
//! ([`VfioDevice::open_group`], or the spec `group:N/name`), or take over a device fd a VMM
//! already opened ([`VfioDevice::from_device_fd`]). Every ioctl goes through the crate's private
//! `sys` module.

use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_bindings::bindings::vfio as v;

use crate::device::{MigrationDevice, PrecopyInfo, ReadOutcome};
use crate::error::{Error, Result};
use crate::state::{MigFlags, MigState};
use crate::sys::{self, FeatureBuf, SysOps};

/// `VFIO_PCI_CONFIG_REGION_INDEX`: the PCI config space region.
pub const PCI_CONFIG_REGION_INDEX: u32 = v::VFIO_PCI_CONFIG_REGION_INDEX;
/// How much of the config space [`MigrationDevice::save_config`] saves (the standard header
/// and capability area; extended config space is not saved).
pub const CONFIG_SAVE_LEN: usize = 256;
/// Magic at the start of a [`VfioDevice`] config blob.
pub const CONFIG_MAGIC: [u8; 8] = *b"VFIOPCFG";
/// Config blob header: magic (8) + payload length as LE u32 (4) + reserved zero (4).
pub const CONFIG_HEADER: usize = 16;
/// Bounded retries of a read/write interrupted by a signal.
const EINTR_RETRIES: u32 = 16;

/// `struct vfio_region_info`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// Region size in bytes.
    pub size: u64,
    /// Offset of the region in the device fd (for `pread`/`pwrite`/`mmap`).
    pub offset: u64,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
}

impl RegionInfo {
    /// Whether the region may be read.
    pub fn readable(&self) -> bool {
        self.flags & v::VFIO_REGION_INFO_FLAG_READ != 0
    }

    /// Whether the region may be written.
    pub fn writable(&self) -> bool {
        self.flags & v::VFIO_REGION_INFO_FLAG_WRITE != 0
    }
}

/// `struct vfio_device_info`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ indexes.
    pub num_irqs: u32,
}

/// The bus a listed device sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// A PCI device (bound to `vfio-pci` or a `*_vfio_pci` variant driver).
    Pci,
    /// A mediated device (e.g. mtty).
    Mdev,
}

/// One device found by [`list_vfio_devices`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceListing {
    /// PCI address or mdev UUID: what [`VfioDevice::open`] takes.
    pub name: String,
    /// Its bus.
    pub bus: Bus,
    /// Its IOMMU group number, if it has one.
    pub group: Option<u32>,
    /// The bound driver's name, if any.
    pub driver: Option<String>,
    /// Its sysfs directory.
    pub sysfs_path: PathBuf,
}

/// A VFIO device fd (plus the group and container that keep it open, when this crate opened
/// them).
pub struct VfioDevice {
    name: String,
    // Field order is drop order: the device fd closes before its group and container.
    device: OwnedFd,
    group: Option<OwnedFd>,
    container: Option<OwnedFd>,
    precopy_v2: bool,
    ops: Arc<dyn SysOps>,
}

impl fmt::Debug for VfioDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioDevice")
            .field("name", &self.name)
            .field("device_fd", &self.device.as_raw_fd())
            .field("group_fd", &self.group.as_ref().map(|g| g.as_raw_fd()))
            .field("container_fd", &self.container.as_ref().map(|c| c.as_raw_fd()))
            .field("precopy_v2", &self.precopy_v2)
            .finish()
    }
}

impl AsFd for VfioDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }
}

fn open_err(device: &str, what: impl Into<String>, source: Option<io::Error>) -> Error {
    Error::Open { device: device.to_owned(), what: what.into(), source }
}

/// Resolves a device spec to `(group number, device name)` using the real `/sys`.
///
/// Accepted: `group:N/name`; a sysfs device directory (`/sys/bus/pci/devices/0000:00:02.0`,
/// `/sys/bus/mdev/devices/<uuid>`, or any path whose `iommu_group` link names the group); a
/// PCI address (`0000:00:02.0`, or `00:02.0` for domain 0); an mdev UUID.
///
/// # Errors
/// [`Error::Open`] if the spec is malformed or the device or its group cannot be found.
pub fn resolve_group(spec: &str) -> Result<(u32, String)> {
    resolve_group_in(Path::new("/sys"), spec)
}

/// [`resolve_group`] against a sysfs tree rooted at `sys_root` (for tests and chroots).
///
/// # Errors
/// As [`resolve_group`].
pub fn resolve_group_in(sys_root: &Path, spec: &str) -> Result<(u32, String)> {
    if let Some(rest) = spec.strip_prefix("group:") {
        let (n, name) = rest.split_once('/').ok_or_else(|| open_err(spec, "expected group:N/name", None))?;
        let n: u32 = n.parse().map_err(|_| open_err(spec, format!("bad group number {n:?}"), None))?;
        check_name(spec, name)?;
        return Ok((n, name.to_owned()));
    }
    let dir = if spec.starts_with('/') {
        PathBuf::from(spec)
    } else {
        check_name(spec, spec)?;
        let full = if is_short_pci_address(spec) { format!("0000:{spec}") } else { spec.to_owned() };
        let pci = sys_root.join("bus/pci/devices").join(&full);
        let mdev = sys_root.join("bus/mdev/devices").join(&full);
        if pci.exists() {
            pci
        } else if mdev.exists() {
            mdev
        } else {
            return Err(open_err(spec, "no such PCI or mdev device in sysfs (is VFIO set up?)", None));
        }
    };
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .ok_or_else(|| open_err(spec, "sysfs path has no device name", None))?;
    check_name(spec, &name)?;
    let group =
        read_group(&dir).map_err(|e| open_err(spec, format!("cannot read {}/iommu_group", dir.display()), Some(e)))?;
    Ok((group, name))
}

/// `xx:yy.z` without the PCI domain.
fn is_short_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 7 && b[2] == b':' && b[5] == b'.' && s.chars().filter(|c| c.is_ascii_hexdigit()).count() == 5
}

/// Rejects device names the group ioctl cannot take (empty, `/`, NUL, absurdly long).
fn check_name(spec: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 || name.contains('/') || name.contains('\0') {
        return Err(open_err(spec, format!("bad device name {name:?}"), None));
    }
    Ok(())
}

/// The group number behind `<dir>/iommu_group` (a link to `.../iommu_groups/N`).
fn read_group(dir: &Path) -> io::Result<u32> {
    let link = fs::read_link(dir.join("iommu_group"))?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad iommu_group link {}", link.display())))
}

/// The driver bound to the device in `dir`, if any.
fn read_driver(dir: &Path) -> Option<String> {
    fs::read_link(dir.join("driver")).ok()?.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Whether a PCI driver name is vfio-pci or a vfio-pci variant driver
/// (`mlx5_vfio_pci`, `hisi_acc_vfio_pci`, `virtio_vfio_pci`, `xe_vfio_pci`, `pds_vfio_pci`...).
pub fn is_vfio_pci_driver(driver: &str) -> bool {
    let d = driver.replace('-', "_");
    d == "vfio_pci" || d.ends_with("_vfio_pci") || d.starts_with("vfio_pci")
}

/// Every VFIO-usable device on this host: PCI devices bound to a vfio-pci-like driver, and all
/// mediated devices. Empty (never an error) on a host without VFIO.
pub fn list_vfio_devices() -> Vec<DeviceListing> {
    list_vfio_devices_in(Path::new("/sys"))
}

/// [`list_vfio_devices`] against a sysfs tree rooted at `sys_root`.
pub fn list_vfio_devices_in(sys_root: &Path) -> Vec<DeviceListing> {
    let mut out = Vec::new();
    for (bus, sub) in [(Bus::Pci, "bus/pci/devices"), (Bus::Mdev, "bus/mdev/devices")] {
        let Ok(rd) = fs::read_dir(sys_root.join(sub)) else { continue };
        for ent in rd.flatten() {
            let dir = ent.path();
            let name = ent.file_name().to_string_lossy().into_owned();
            let driver = read_driver(&dir);
            if bus == Bus::Pci && !driver.as_deref().is_some_and(is_vfio_pci_driver) {
                continue;
            }
            out.push(DeviceListing { name, bus, group: read_group(&dir).ok(), driver, sysfs_path: dir });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

impl VfioDevice {
    /// Opens a device by spec (see [`resolve_group`]): group `/dev/vfio/N`, a new container
    /// `/dev/vfio/vfio` with a TYPE1v2 IOMMU (TYPE1 where v2 is missing) unless the group
    /// already has one, then `VFIO_GROUP_GET_DEVICE_FD`.
    ///
    /// # Errors
    /// [`Error::Open`] on any step.
    pub fn open(spec: &str) -> Result<VfioDevice> {
        let (group, name) = resolve_group(spec)?;
        VfioDevice::open_group(group, &name)
    }

    /// Opens device `name` of IOMMU group `group` (see [`VfioDevice::open`]).
    ///
    /// # Errors
    /// [`Error::Open`] on any step.
    pub fn open_group(group: u32, name: &str) -> Result<VfioDevice> {
        check_name(name, name)?;
        let gpath = format!("/dev/vfio/{group}");
        let gfd: OwnedFd = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&gpath)
            .map_err(|e| open_err(name, format!("open {gpath}"), Some(e)))?
            .into();
        let status =
            sys::group_get_status(gfd.as_fd()).map_err(|e| open_err(name, "VFIO_GROUP_GET_STATUS", Some(e)))?;
        if status & v::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(open_err(
                name,
                format!("group {group} is not viable (bind every device in it to a VFIO driver)"),
                None,
            ));
        }
        let mut container = None;
        if status & v::VFIO_GROUP_FLAGS_CONTAINER_SET == 0 {
            let cfd: OwnedFd = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/vfio/vfio")
                .map_err(|e| open_err(name, "open /dev/vfio/vfio", Some(e)))?
                .into();
            let api = sys::get_api_version(cfd.as_fd()).map_err(|e| open_err(name, "VFIO_GET_API_VERSION", Some(e)))?;
            if api != v::VFIO_API_VERSION as i32 {
                return Err(open_err(name, format!("VFIO API version {api}, expected {}", v::VFIO_API_VERSION), None));
            }
            let ty = if sys::check_extension(cfd.as_fd(), v::VFIO_TYPE1v2_IOMMU).unwrap_or(false) {
                v::VFIO_TYPE1v2_IOMMU
            } else if sys::check_extension(cfd.as_fd(), v::VFIO_TYPE1_IOMMU).unwrap_or(false) {
                v::VFIO_TYPE1_IOMMU
            } else {
                return Err(open_err(name, "container supports neither TYPE1v2 nor TYPE1 IOMMU", None));
            };
            sys::group_set_container(gfd.as_fd(), cfd.as_fd())
                .map_err(|e| open_err(name, "VFIO_GROUP_SET_CONTAINER", Some(e)))?;
            sys::set_iommu(cfd.as_fd(), ty).map_err(|e| open_err(name, format!("VFIO_SET_IOMMU({ty})"), Some(e)))?;
            container = Some(cfd);
        }
        let cname = CString::new(name).map_err(|_| open_err(name, "device name contains NUL", None))?;
        let dfd = sys::group_get_device_fd(gfd.as_fd(), &cname)
            .map_err(|e| open_err(name, format!("VFIO_GROUP_GET_DEVICE_FD in group {group}"), Some(e)))?;
        Ok(VfioDevice {
            name: name.to_owned(),
            device: dfd,
            group: Some(gfd),
            container,
            precopy_v2: false,
            ops: Arc::new(sys::Kernel),
        })
    }

    /// Takes over a device fd that a VMM already opened (group/container or iommufd cdev).
    /// The fd is checked with `VFIO_DEVICE_GET_INFO`.
    ///
    /// # Errors
    /// [`Error::Open`] if the fd is not a VFIO device.
    pub fn from_device_fd(fd: OwnedFd, name: impl Into<String>) -> Result<VfioDevice> {
        let dev = VfioDevice::with_ops(fd, name.into(), Arc::new(sys::Kernel));
        dev.device_info()
            .map_err(|e| open_err(&dev.name, "not a VFIO device fd (VFIO_DEVICE_GET_INFO failed)", sys_source(e)))?;
        Ok(dev)
    }

    /// A device over any [`SysOps`] (the test twin uses this).
    pub(crate) fn with_ops(fd: OwnedFd, name: String, ops: Arc<dyn SysOps>) -> VfioDevice {
        VfioDevice { name, device: fd, group: None, container: None, precopy_v2: false, ops }
    }

    /// A second handle on the same device: a duplicate of its device fd (`F_DUPFD_CLOEXEC`),
    /// for region access from another thread while this handle is lent to a migration (the
    /// guest's MMIO, in tests and tools). It shares the device's state with this handle: a
    /// state change through either is seen by both. The group and container stay with this
    /// handle; the kernel keeps them alive while any device fd is open.
    ///
    /// # Errors
    /// [`Error::Sys`] when the fd cannot be duplicated (`EMFILE`).
    pub fn try_clone(&self) -> Result<VfioDevice> {
        let fd = self.device.try_clone().map_err(|e| self.sys_err("F_DUPFD_CLOEXEC", e))?;
        let mut d = VfioDevice::with_ops(fd, self.name.clone(), Arc::clone(&self.ops));
        d.precopy_v2 = self.precopy_v2;
        Ok(d)
    }

    fn sys_err(&self, op: impl Into<String>, source: io::Error) -> Error {
        Error::Sys { device: self.name.clone(), op: op.into(), source }
    }

    /// `VFIO_DEVICE_GET_INFO`.
    ///
    /// # Errors
    /// [`Error::Sys`] with the kernel's errno.
    pub fn device_info(&self) -> Result<DeviceInfo> {
        let mut info = v::vfio_device_info::default();
        self.ops.device_info(self.device.as_fd(), &mut info).map_err(|e| self.sys_err("VFIO_DEVICE_GET_INFO", e))?;
        Ok(DeviceInfo { flags: info.flags, num_regions: info.num_regions, num_irqs: info.num_irqs })
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for region `index`.
    ///
    /// # Errors
    /// [`Error::Sys`] (`EINVAL` for an index the device lacks).
    pub fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let mut info = v::vfio_region_info { index, ..Default::default() };
        self.ops
            .region_info(self.device.as_fd(), &mut info)
            .map_err(|e| self.sys_err(format!("VFIO_DEVICE_GET_REGION_INFO({index})"), e))?;
        Ok(RegionInfo { index, size: info.size, offset: info.offset, flags: info.flags })
    }

    /// Checks `offset..offset+len` against the region and returns the absolute fd offset.
    fn region_span(&self, r: &RegionInfo, offset: u64, len: usize) -> Result<u64> {
        let end = offset.checked_add(len as u64);
        match end {
            Some(end) if end <= r.size => r.offset.checked_add(offset).ok_or_else(|| Error::RegionBounds {
                device: self.name.clone(),
                index: r.index,
                offset,
                len: len as u64,
                size: r.size,
            }),
            _ => Err(Error::RegionBounds {
                device: self.name.clone(),
                index: r.index,
                offset,
                len: len as u64,
                size: r.size,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` of region `index` (`pread` on the device fd).
    ///
    /// # Errors
    /// [`Error::RegionBounds`] outside the region, [`Error::Unsupported`] for a region that
    /// cannot be read, [`Error::Sys`] from the kernel, [`Error::Protocol`] on a short read.
    pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.region_info(index)?;
        let len = buf.len();
        self.region_io(&r, r.readable(), "read", offset, len, |done, at| {
            self.ops.pread(self.device.as_fd(), &mut buf[done..], at)
        })
    }

    /// Writes `buf` at `offset` of region `index` (`pwrite` on the device fd).
    ///
    /// # Errors
    /// As [`VfioDevice::region_read`].
    pub fn region_write(&self, index: u32, offset: u64, buf: &[u8]) -> Result<()> {
        let r = self.region_info(index)?;
        self.region_io(&r, r.writable(), "write", offset, buf.len(), |done, at| {
            self.ops.pwrite(self.device.as_fd(), &buf[done..], at)
        })
    }

    /// Moves `len` bytes at `offset` of region `r` with `step(done, device offset)`, which
    /// returns the bytes one `pread`/`pwrite` moved: checks access and bounds, continues
    /// partial transfers, retries EINTR a bounded number of times.
    fn region_io(
        &self,
        r: &RegionInfo,
        allowed: bool,
        verb: &str,
        offset: u64,
        len: usize,
        mut step: impl FnMut(usize, u64) -> std::io::Result<usize>,
    ) -> Result<()> {
        let index = r.index;
        if !allowed {
            return Err(Error::Unsupported {
                device: self.name.clone(),
                what: format!("{verb}ing region {index}"),
                flags: 0,
            });
        }
        let mut at = self.region_span(r, offset, len)?;
        let mut done = 0usize;
        let mut tries = 0;
        while done < len {
            match step(done, at) {
                Ok(0) => {
                    return Err(Error::Protocol {
                        device: self.name.clone(),
                        what: format!("region {index} {verb} stopped after {done} of {len} bytes"),
                    })
                }
                Ok(n) => {
                    done += n;
                    at = at.saturating_add(n as u64);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) && tries < EINTR_RETRIES => tries += 1,
                Err(e) => return Err(self.sys_err(format!("p{verb} region {index} @ {offset:#x}"), e)),
            }
        }
        Ok(())
    }

    /// The config region, or `None` where the device has none (not PCI).
    fn config_region(&self) -> Result<Option<RegionInfo>> {
        let info = self.device_info()?;
        if info.num_regions <= PCI_CONFIG_REGION_INDEX {
            return Ok(None);
        }
        match self.region_info(PCI_CONFIG_REGION_INDEX) {
            Ok(r) if r.size > 0 && r.readable() => Ok(Some(r)),
            Ok(_) => Ok(None),
            Err(e) if e.errno() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One feature ioctl on the device fd.
    fn feature(&self, buf: &mut FeatureBuf) -> io::Result<()> {
        self.ops.device_feature(self.device.as_fd(), buf)
    }
}

/// The `io::Error` inside an [`Error::Sys`], for re-wrapping.
fn sys_source(e: Error) -> Option<io::Error> {
    match e {
        Error::Sys { source, .. } => Some(source),
        _ => None,
    }
}

/// Decodes a config blob: the payload, or why it is malformed.
fn parse_config_blob(blob: &[u8]) -> std::result::Result<&[u8], String> {
    if blob.len() < CONFIG_HEADER {
        return Err(format!("blob of {} bytes is shorter than its {CONFIG_HEADER}-byte header", blob.len()));
    }
    if blob[..8] != CONFIG_MAGIC {
        return Err(format!("bad magic {:02x?}", &blob[..8]));
    }
    let len = u32::from_le_bytes([blob[8], blob[9], blob[10], blob[11]]) as usize;
    if blob[12..16] != [0; 4] {
        return Err("reserved header bytes are not zero".into());
    }
    if len > CONFIG_SAVE_LEN {
        return Err(format!("payload of {len} bytes exceeds {CONFIG_SAVE_LEN}"));
    }
    if CONFIG_HEADER + len != blob.len() {
        return Err(format!("header says {len} payload bytes, blob carries {}", blob.len() - CONFIG_HEADER));
    }
    Ok(&blob[CONFIG_HEADER..])
}

impl MigrationDevice for VfioDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn migration_flags(&self) -> Result<MigFlags> {
        let mut b = FeatureBuf::new(v::VFIO_DEVICE_FEATURE_GET | v::VFIO_DEVICE_FEATURE_MIGRATION, 8);
        match self.feature(&mut b) {
            Ok(()) => {
                let flags = MigFlags::from_bits(b.payload_u64());
                if !flags.contains(MigFlags::STOP_COPY) {
                    return Err(Error::NotMigratable {
                        device: self.name.clone(),
                        reason: format!("migration flags {flags} lack the mandatory STOP_COPY"),
                    });
                }
                Ok(flags)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Err(Error::NotMigratable {
                device: self.name.clone(),
                reason: "VFIO_DEVICE_FEATURE_MIGRATION: ENOTTY (the driver has no migration support)".into(),
            }),
            Err(e) => Err(self.sys_err("VFIO_DEVICE_FEATURE GET MIGRATION", e)),
        }
    }

    fn state(&self) -> Result<MigState> {
        let mut b = FeatureBuf::new(v::VFIO_DEVICE_FEATURE_GET | v::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 8);
        b.set_mig_state(v::vfio_device_feature_mig_state { device_state: 0, data_fd: -1 });
        self.feature(&mut b).map_err(|e| self.sys_err("VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE", e))?;
        let raw = b.mig_state().device_state;
        MigState::from_raw(raw).ok_or_else(|| Error::Protocol {
            device: self.name.clone(),
            what: format!("kernel reported unknown migration state {raw}"),
        })
    }

    fn set_state_raw(&mut self, target: MigState) -> Result<Option<OwnedFd>> {
        let mut b = FeatureBuf::new(v::VFIO_DEVICE_FEATURE_SET | v::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 8);
        b.set_mig_state(v::vfio_device_feature_mig_state { device_state: target.raw(), data_fd: -1 });
        self.feature(&mut b)
            .map_err(|e| self.sys_err(format!("VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE={target}"), e))?;
        let fd = b.mig_state().data_fd;
        if fd < 0 {
            return Ok(None);
        }
        // SAFETY: on success the kernel put a new data fd in the buffer that nothing else owns;
        // the caller now owns (and closes) it.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn stop_copy_size(&self) -> Result<u64> {
        let mut b = FeatureBuf::new(v::VFIO_DEVICE_FEATURE_GET | v::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 8);
        self.feature(&mut b).map_err(|e| self.sys_err("VFIO_DEVICE_FEATURE GET MIG_DATA_SIZE", e))?;
        Ok(b.payload_u64())
    }

    fn precopy_info(&self, data_fd: BorrowedFd<'_>) -> Result<PrecopyInfo> {
        // flags = 0 on input, always (old kernels echo back what we send).
        let mut info =
            v::vfio_precopy_info { argsz: std::mem::size_of::<v::vfio_precopy_info>() as u32, ..Default::default() };
        self.ops.precopy_info(data_fd, &mut info).map_err(|e| self.sys_err("VFIO_MIG_GET_PRECOPY_INFO", e))?;
        Ok(PrecopyInfo {
            initial_bytes: info.initial_bytes,
            dirty_bytes: info.dirty_bytes,
            reinit: self.precopy_v2 && info.flags & v::VFIO_PRECOPY_INFO_REINIT != 0,
        })
    }

    fn enable_precopy_info_v2(&mut self) -> Result<bool> {
        let mut b = FeatureBuf::new(v::VFIO_DEVICE_FEATURE_SET | v::VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2, 0);
        match self.feature(&mut b) {
            Ok(()) => {
                self.precopy_v2 = true;
                Ok(true)
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) => {
                self.precopy_v2 = false;
                Ok(false)
            }
            Err(e) => Err(self.sys_err("VFIO_DEVICE_FEATURE SET MIG_PRECOPY_INFOv2", e)),
        }
    }

    fn reset(&mut self) -> Result<()> {
        self.ops.reset(self.device.as_fd()).map_err(|e| self.sys_err("VFIO_DEVICE_RESET", e))
    }

    fn read_data(&self, data_fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<ReadOutcome> {
        let mut tries = 0;
        loop {
            match self.ops.read(data_fd, buf) {
                Ok(0) => return Ok(ReadOutcome::Eof),
                Ok(n) => return Ok(ReadOutcome::Data(n)),
                Err(e) => match e.raw_os_error() {
                    Some(libc::ENOMSG) => return Ok(ReadOutcome::NoMsg),
                    Some(libc::EINTR) if tries < EINTR_RETRIES => tries += 1,
                    _ => return Err(self.sys_err("read(save data fd)", e)),
                },
            }
        }
    }

    fn write_data(&self, data_fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize> {
        let mut tries = 0;
        loop {
            match self.ops.write(data_fd, buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) && tries < EINTR_RETRIES => tries += 1,
                Err(e) => return Err(self.sys_err("write(resume data fd)", e)),
            }
        }
    }

    /// The PCI config space (first [`CONFIG_SAVE_LEN`] bytes at most) behind a 16-byte header
    /// ([`CONFIG_MAGIC`], payload length LE u32, 4 zero bytes). A device without a config
    /// region gives a header with an empty payload.
    fn save_config(&mut self) -> Result<Vec<u8>> {
        let mut payload = Vec::new();
        if let Some(r) = self.config_region()? {
            let len = r.size.min(CONFIG_SAVE_LEN as u64) as usize;
            payload.resize(len, 0);
            self.region_read(PCI_CONFIG_REGION_INDEX, 0, &mut payload)?;
        }
        let mut blob = Vec::with_capacity(CONFIG_HEADER + payload.len());
        blob.extend_from_slice(&CONFIG_MAGIC);
        blob.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        blob.extend_from_slice(&[0; 4]);
        blob.extend_from_slice(&payload);
        Ok(blob)
    }

    /// Validates the blob (header, length, and that vendor/device ID match this device), then
    /// restores **only the PCI command register** (bytes 0x04..0x06). BARs, MSI/MSI-X and
    /// capability state are the VMM's to restore through its own emulation (as QEMU does);
    /// writing them blindly through the config region is not safe on every driver.
    fn load_config(&mut self, blob: &[u8]) -> Result<()> {
        let payload =
            parse_config_blob(blob).map_err(|reason| Error::BadConfig { device: self.name.clone(), reason })?;
        if payload.is_empty() {
            return Ok(());
        }
        if payload.len() < 6 {
            return Err(Error::BadConfig {
                device: self.name.clone(),
                reason: format!("payload of {} bytes has no command register", payload.len()),
            });
        }
        if self.config_region()?.is_none() {
            return Err(Error::Unsupported {
                device: self.name.clone(),
                what: "loading a PCI config blob into a device without a config region".into(),
                flags: 0,
            });
        }
        let mut ids = [0u8; 4];
        self.region_read(PCI_CONFIG_REGION_INDEX, 0, &mut ids)?;
        if ids != payload[..4] {
            return Err(Error::BadConfig {
                device: self.name.clone(),
                reason: format!("blob is for vendor:device {:02x?}, this device is {ids:02x?}", &payload[..4]),
            });
        }
        self.region_write(PCI_CONFIG_REGION_INDEX, 4, &payload[4..6])
    }
}

#[cfg(test)]
mod tests;
