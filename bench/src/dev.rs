//! `vfio-multifd dev ...`: thin wrappers over [`VfioDevice`] and the migration uAPI layer.
//!
//! Output formats are parsed by `vm/guest-test.sh`: `state` prints one state name, `info`
//! prints `migration flags: 0x7 (...)` and `stop_copy size: N bytes`, `region-read` prints
//! `OFFSET: xx xx ...` lines (hex only), `precopy` prints `initial_bytes: N`, `dirty_bytes: N`
//! and `total: N bytes`.

use std::os::fd::AsFd;

use anyhow::{anyhow, bail, Context, Result};
use vfio_migration::vfio::VfioDevice;
use vfio_migration::{transition, MigState, MigrationDevice, ReadOutcome};

use crate::cli::DevCmd;
use crate::transfer::open_vfio;

fn state_of(d: &VfioDevice) -> Result<MigState> {
    d.state().with_context(|| format!("{}: reading the migration state (is it a migratable VFIO device?)", d.name()))
}

/// Runs one `dev` subcommand.
pub fn run(cmd: &DevCmd) -> Result<()> {
    match cmd {
        DevCmd::Info { dev } => info(&open_vfio(dev)?),
        DevCmd::State { dev, state } => {
            let mut d = open_vfio(dev)?;
            match state {
                None => println!("{}", state_of(&d)?),
                Some(target) => {
                    let from = state_of(&d)?;
                    let t = transition(&mut d, *target)
                        .with_context(|| format!("{}: moving from {from} to {target}", d.name()))?;
                    let path: Vec<String> = t.arcs.iter().map(|(_, b)| b.name().to_owned()).collect();
                    // The data fd (if the last arc made one) is closed here; the state stays.
                    drop(t.data_fd);
                    if path.is_empty() {
                        println!("{target} (already)");
                    } else {
                        println!("{from} -> {}", path.join(" -> "));
                    }
                }
            }
            Ok(())
        }
        DevCmd::Reset { dev } => {
            let mut d = open_vfio(dev)?;
            d.reset().with_context(|| format!("{}: VFIO_DEVICE_RESET", d.name()))?;
            println!("reset; state {}", state_of(&d)?);
            Ok(())
        }
        DevCmd::RegionRead { dev, region, offset, len } => {
            let d = open_vfio(dev)?;
            let mut buf = vec![0u8; *len];
            d.region_read(*region, *offset, &mut buf)
                .with_context(|| format!("{}: reading {len} byte(s) at {offset:#x} of region {region}", d.name()))?;
            for (i, line) in buf.chunks(16).enumerate() {
                let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
                println!("{:08x}: {}", offset + (i * 16) as u64, hex.join(" "));
            }
            Ok(())
        }
        DevCmd::RegionWrite { dev, region, offset, hex } => {
            let d = open_vfio(dev)?;
            let hex = &hex.0;
            d.region_write(*region, *offset, hex).with_context(|| {
                format!("{}: writing {} byte(s) at {offset:#x} of region {region}", d.name(), hex.len())
            })?;
            println!("wrote {} byte(s) at {offset:#x} of region {region}", hex.len());
            Ok(())
        }
        DevCmd::CheckReset { dev } => check_reset(&mut open_vfio(dev)?),
        DevCmd::Precopy { dev } => precopy(&mut open_vfio(dev)?),
    }
}

fn info(d: &VfioDevice) -> Result<()> {
    println!("device: {}", d.name());
    let di = d.device_info().with_context(|| format!("{}: VFIO_DEVICE_GET_INFO", d.name()))?;
    println!("device flags: {:#x}, regions: {}, irqs: {}", di.flags, di.num_regions, di.num_irqs);
    match d.migration_flags() {
        Ok(f) => println!("migration flags: {:#x} ({f})", f.bits()),
        Err(e) => println!("migration: not supported ({e})"),
    }
    match d.state() {
        Ok(s) => println!("state: {s}"),
        Err(e) => println!("state: unavailable ({e})"),
    }
    match d.stop_copy_size() {
        Ok(n) => println!("stop_copy size: {n} bytes (MIG_DATA_SIZE estimate)"),
        Err(e) => println!("stop_copy size: unavailable ({e})"),
    }
    for i in 0..di.num_regions {
        if let Ok(r) = d.region_info(i) {
            if r.size > 0 {
                println!(
                    "region {i}: {} bytes at fd offset {:#x}, flags {:#x}{}{}",
                    r.size,
                    r.offset,
                    r.flags,
                    if r.readable() { " read" } else { "" },
                    if r.writable() { " write" } else { "" }
                );
            }
        }
    }
    Ok(())
}

/// STOP_COPY, reset, the old data fd must read ENODEV, the device must be RUNNING.
fn check_reset(d: &mut VfioDevice) -> Result<()> {
    let name = d.name().to_owned();
    let from = state_of(d)?;
    let t = transition(d, MigState::StopCopy).with_context(|| format!("{name}: moving from {from} to STOP_COPY"))?;
    let fd = t.data_fd.ok_or_else(|| anyhow!("{name}: already in STOP_COPY without a data fd here; reset it first"))?;
    d.reset().with_context(|| format!("{name}: VFIO_DEVICE_RESET"))?;
    let mut buf = vec![0u8; 4096];
    let r = d.read_data(fd.as_fd(), &mut buf);
    let st = state_of(d)?;
    println!("state after reset: {st}");
    match r {
        Err(e) if e.errno() == Some(libc::ENODEV) => println!("old data fd after reset: ENODEV (session ended)"),
        Err(e) => bail!("{name}: reading the old data fd after reset gave {e}, expected ENODEV"),
        Ok(ReadOutcome::Data(n)) => {
            bail!("{name}: the old data fd still returned {n} bytes after reset, expected ENODEV")
        }
        Ok(o) => bail!("{name}: the old data fd returned {o:?} after reset, expected ENODEV"),
    }
    if st != MigState::Running {
        bail!("{name}: state after reset is {st}, expected RUNNING");
    }
    println!("check-reset: ok");
    Ok(())
}

fn read_until_end(d: &VfioDevice, fd: std::os::fd::BorrowedFd<'_>, what: &str) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match d.read_data(fd, &mut buf).with_context(|| format!("{}: reading the {what} stream", d.name()))? {
            ReadOutcome::Data(k) => n += k as u64,
            ReadOutcome::Eof | ReadOutcome::NoMsg => return Ok(n),
        }
        if n > 1 << 40 {
            bail!("{}: the {what} stream never ends (over 1 TiB)", d.name());
        }
    }
}

/// PRE_COPY, info, read to the temporary end, STOP_COPY, read to EOF, RUNNING.
fn precopy(d: &mut VfioDevice) -> Result<()> {
    let name = d.name().to_owned();
    let flags = d.migration_flags().with_context(|| format!("{name}: reading migration flags"))?;
    if !flags.contains(vfio_migration::MigFlags::PRE_COPY) {
        bail!("{name}: the device has no PRE_COPY support (migration flags {:#x})", flags.bits());
    }
    let v2 = d.enable_precopy_info_v2().unwrap_or(false);
    let from = state_of(d)?;
    let t = transition(d, MigState::PreCopy).with_context(|| format!("{name}: moving from {from} to PRE_COPY"))?;
    let fd = t.data_fd.ok_or_else(|| anyhow!("{name}: already in PRE_COPY without a data fd here; reset it first"))?;
    let res = (|| -> Result<()> {
        let info = d.precopy_info(fd.as_fd()).with_context(|| format!("{name}: VFIO_MIG_GET_PRECOPY_INFO"))?;
        println!("initial_bytes: {}", info.initial_bytes);
        println!("dirty_bytes: {}", info.dirty_bytes);
        println!("precopy_info_v2: {}{}", if v2 { "on" } else { "off" }, if info.reinit { " (reinit)" } else { "" });
        let pre = read_until_end(d, fd.as_fd(), "PRE_COPY")?;
        println!("precopy read: {pre} bytes (to the temporary end)");
        transition(d, MigState::StopCopy).with_context(|| format!("{name}: PRE_COPY -> STOP_COPY"))?;
        let stop = read_until_end(d, fd.as_fd(), "STOP_COPY")?;
        println!("stop_copy read: {stop} bytes (to end of stream)");
        println!("total: {} bytes", pre + stop);
        Ok(())
    })();
    drop(fd);
    let back = transition(d, MigState::Running);
    res?;
    back.with_context(|| format!("{name}: returning to RUNNING"))?;
    println!("state: {}", state_of(d)?);
    Ok(())
}
