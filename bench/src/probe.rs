//! `vfio-multifd probe`: what this host supports and what the engine would choose.

use anyhow::Result;
use serde_json::{json, Value};
use vfio_migration::vfio::{list_vfio_devices, Bus, VfioDevice};
use vfio_migration::MigrationDevice;
use vfio_multifd::{uring_capabilities, UringCapabilities};

use crate::util::{fmt_bytes, kernel_version};

/// io_uring availability: `Ok(capabilities)` or the reason it cannot be used.
fn uring() -> Result<UringCapabilities, String> {
    let caps = uring_capabilities();
    match &caps.unavailable {
        Some(r) => Err(r.clone()),
        None => Ok(caps),
    }
}

/// `(soft, hard)` RLIMIT_MEMLOCK in bytes (`None` = unlimited).
fn memlock() -> (Option<libc::rlim_t>, Option<libc::rlim_t>) {
    let Ok((cur, max)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK) else {
        return (None, None);
    };
    let f = |v: libc::rlim_t| if v == libc::RLIM_INFINITY { None } else { Some(v) };
    (f(cur), f(max))
}

/// Whether CAP_IPC_LOCK is in the effective set (from /proc/self/status).
fn cap_ipc_lock() -> Option<bool> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim().to_owned();
    let v = u64::from_str_radix(&hex, 16).ok()?;
    const CAP_IPC_LOCK: u32 = 14; // linux/capability.h
    Some(v & (1 << CAP_IPC_LOCK) != 0)
}

fn read_trim(p: &str) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

fn meminfo(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let l = s.lines().find(|l| l.starts_with(key))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

/// The THP mode in brackets (`always [madvise] never` -> `madvise`).
fn thp_mode() -> Option<String> {
    let s = read_trim("/sys/kernel/mm/transparent_hugepage/enabled")?;
    let a = s.find('[')?;
    let b = s.find(']')?;
    Some(s[a + 1..b].to_owned())
}

/// Capabilities as JSON (also embedded in every transfer's `start`).
pub fn capabilities_json() -> Value {
    let u = uring();
    let (soft, hard) = memlock();
    json!({
        "io_uring": match &u {
            Ok(o) => json!({"available": true, "ops": ops_json(o)}),
            Err(r) => json!({"available": false, "reason": r}),
        },
        "io_uring_disabled_sysctl": read_trim("/proc/sys/kernel/io_uring_disabled"),
        "rlimit_memlock": {"soft": soft, "hard": hard},
        "cap_ipc_lock": cap_ipc_lock(),
        "thp": thp_mode(),
        "hugetlb": {"total": meminfo("HugePages_Total:"), "free": meminfo("HugePages_Free:"),
                    "page_kib": meminfo("Hugepagesize:")},
    })
}

fn ops_json(o: &UringCapabilities) -> Value {
    o.ops.iter().map(|&(name, ok)| (name.to_string(), Value::Bool(ok))).collect::<serde_json::Map<_, _>>().into()
}

/// `vfio-multifd probe`.
pub fn run(json_out: bool) -> Result<()> {
    let u = uring();
    let devs: Vec<Value> = list_vfio_devices()
        .into_iter()
        .map(|l| {
            let mig = match VfioDevice::open(&l.name) {
                Ok(d) => match d.migration_flags() {
                    Ok(f) => json!({"flags": f.bits(), "text": f.to_string(),
                        "state": d.state().ok().map(|s| s.name())}),
                    Err(e) => json!({"error": e.to_string()}),
                },
                Err(e) => json!({"error": format!("cannot open: {e}")}),
            };
            json!({"name": l.name, "bus": if l.bus == Bus::Pci { "pci" } else { "mdev" }, "group": l.group,
                   "driver": l.driver, "sysfs": l.sysfs_path.display().to_string(), "migration": mig})
        })
        .collect();
    let (backend, zc) = match &u {
        Ok(o) => (
            "io_uring",
            if o.supports("SEND_ZC") {
                "SEND_ZC to remote TCP peers (auto; plain SEND on loopback, which always copies)"
            } else {
                "off (kernel lacks SEND_ZC)"
            },
        ),
        Err(_) => ("blocking", "off (needs io_uring)"),
    };
    if json_out {
        let mut v = capabilities_json();
        v["kernel"] = json!(kernel_version());
        v["vfio_devices"] = json!(devs);
        v["engine_choice"] = json!({"backend": backend, "zerocopy": zc});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("kernel: {}", kernel_version());
    match &u {
        Ok(o) => {
            println!("io_uring: available");
            let ops: Vec<String> =
                o.ops.iter().map(|&(name, ok)| format!("{name} {}", if ok { "yes" } else { "NO" })).collect();
            println!("  ops: {}", ops.join("  "));
            if let Some(flags) = o.setup_flags {
                println!("  ring setup: {flags}");
            }
        }
        Err(r) => println!("io_uring: unavailable: {r}"),
    }
    if let Some(s) = read_trim("/proc/sys/kernel/io_uring_disabled") {
        println!("  kernel.io_uring_disabled = {s}");
    }
    let (soft, hard) = memlock();
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 here, but not on every target
    let show = |v: Option<libc::rlim_t>| v.map_or("unlimited".to_owned(), |b| fmt_bytes(b as u64));
    println!("RLIMIT_MEMLOCK: soft {}, hard {}", show(soft), show(hard));
    println!(
        "CAP_IPC_LOCK: {}",
        match cap_ipc_lock() {
            Some(true) => "yes (locked memory is not limited)",
            Some(false) => "no",
            None => "unknown",
        }
    );
    println!("transparent huge pages: {}", thp_mode().unwrap_or_else(|| "unavailable".into()));
    println!(
        "hugetlb: {} pages of {} KiB ({} free)",
        meminfo("HugePages_Total:").unwrap_or(0),
        meminfo("Hugepagesize:").unwrap_or(0),
        meminfo("HugePages_Free:").unwrap_or(0)
    );
    if devs.is_empty() {
        println!("VFIO devices: none (no device bound to vfio-pci or an mdev driver on this host)");
    } else {
        println!("VFIO devices:");
        for d in &devs {
            println!(
                "  {} ({}, group {}, driver {}): migration {}",
                d["name"].as_str().unwrap_or("?"),
                d["bus"].as_str().unwrap_or("?"),
                d["group"],
                d["driver"].as_str().unwrap_or("-"),
                if d["migration"]["text"].is_string() {
                    format!(
                        "flags {:#x} ({}), state {}",
                        d["migration"]["flags"].as_u64().unwrap_or(0),
                        d["migration"]["text"].as_str().unwrap_or(""),
                        d["migration"]["state"].as_str().unwrap_or("?")
                    )
                } else {
                    d["migration"]["error"].as_str().unwrap_or("?").to_owned()
                }
            );
        }
    }
    println!("engine would use: backend {backend}, zero-copy {zc}");
    Ok(())
}
