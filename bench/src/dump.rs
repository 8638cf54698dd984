//! `vfio-multifd dump`: decodes the captured connections of a real QEMU migration (as recorded
//! by `vfio-multifd tee`, one file per connection).
//!
//! Multifd channels are decoded to the last byte: the init packet, every RAM and SYNC packet
//! (framing checked, pages skipped, counted) and every device-state packet (both headers, every
//! field). The main channel (`QEVM`) is recognised and decoded as far as this decoder knows its
//! records: RAM and VFIO sections fully, other devices' sections framed by their footers. Each
//! device's packets are reassembled by `idx` and, with `--out`, written to files together with
//! the VFIO device's pre-copy bytes from the main channel's `DEV_DATA_STATE` records.

mod input;
mod main_channel;
mod multifd;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use vfio_multifd::wire::{format_uuid, MULTIFD_MAGIC};

use self::input::{copy_range, Input};
use self::main_channel::{command_name, kind_name, MainChannel, Payload, QEVM_MAGIC};
use self::multifd::{Channel, DevPacket, MAX_DEVICE_PACKETS};
use crate::util::fmt_bytes;

/// `dump` options.
#[derive(Debug, Clone, Args)]
pub struct DumpArgs {
    /// Captured connections, one file each (the client's bytes, e.g. `tee`'s `conn-N.bin`):
    /// multifd channels and, optionally, the main channel. Each is recognised by its magic.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Write each device's reassembled state into this directory: `<dev>.bin` (the whole device
    /// stream: main-channel pre-copy bytes, then the multifd data packets in idx order),
    /// `<dev>.precopy`, `<dev>.stopcopy` and `<dev>.qemu-config` (the config packet's data,
    /// QEMU's vfio-pci config vmstate). `<dev>` is the idstr with `/` and `:` as `_`, then
    /// `-<instance>`.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// RAM packet page slots (`MULTIFD_PACKET_SIZE` / target page size; 128 for QEMU's 512 KiB
    /// packets of 4 KiB pages): RAM packet headers are 320 + 8 x this bytes.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub ram_page_count: u32,
    /// Target page size in bytes (4096 on x86).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(512..=65536))]
    pub page_size: u32,
    /// JSON output.
    #[arg(short = 'J', long)]
    pub json: bool,
}

/// One input file, decoded.
#[derive(Debug)]
enum Decoded {
    Multifd(Channel),
    Main(MainChannel),
}

/// A device's packets from every channel, reassembled.
#[derive(Debug, Default)]
struct Device {
    /// Packets sorted by idx.
    packets: Vec<DevPacket>,
    /// Data bytes of the non-config packets.
    stopcopy_bytes: u64,
    /// Config packet data bytes.
    config_bytes: u64,
    /// The main channel's view of it.
    main: Option<main_channel::VfioMain>,
    /// Files written.
    files: Vec<PathBuf>,
}

/// `vfio-multifd dump`.
pub fn run(a: &DumpArgs) -> Result<()> {
    if !a.page_size.is_power_of_two() {
        bail!("--page-size {} is not a power of two", a.page_size);
    }
    let mut decoded = Vec::with_capacity(a.files.len());
    let mut budget = MAX_DEVICE_PACKETS;
    let mut main_file: Option<&Path> = None;
    for (i, p) in a.files.iter().enumerate() {
        let mut inp = Input::open(p)?;
        if inp.len == 0 {
            bail!("{} is empty: a capture starts with an init packet or the QEVM header", p.display());
        }
        let magic = inp.window(4)?;
        let magic = if magic.len() == 4 { u32::from_be_bytes([magic[0], magic[1], magic[2], magic[3]]) } else { 0 };
        let d = match magic {
            MULTIFD_MAGIC => {
                let ch = multifd::decode(&mut inp, i, a.ram_page_count, a.page_size, budget)?;
                budget -= ch.packets.len();
                Decoded::Multifd(ch)
            }
            QEVM_MAGIC => {
                if let Some(m) = main_file {
                    bail!("{} and {} are both main channels: a migration has one", m.display(), p.display());
                }
                main_file = Some(p);
                Decoded::Main(main_channel::decode(&mut inp, a.page_size)?)
            }
            _ => bail!(
                "{}: starts with {magic:#010x}, neither a multifd channel (0x11223344) nor a main channel (QEVM); \
                 give the client->server capture of each connection",
                p.display()
            ),
        };
        decoded.push(d);
    }
    let mut devices = reassemble(&decoded)?;
    if let Some(dir) = &a.out {
        write_devices(dir, &a.files, main_file, &mut devices)?;
    }
    let mismatched: Vec<String> = decoded
        .iter()
        .filter_map(|d| if let Decoded::Multifd(c) = d { Some(c) } else { None })
        .flat_map(|c| c.packets.iter())
        .filter(|p| !p.encoder_identical)
        .map(|p| format!("{} offset {}", a.files[p.file].display(), p.offset))
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&to_json(a, &decoded, &devices))?);
    } else {
        print_text(a, &decoded, &devices);
    }
    if !mismatched.is_empty() {
        bail!(
            "the project's encoder does not reproduce {} captured device-state header(s): {}",
            mismatched.len(),
            mismatched.join(", ")
        );
    }
    Ok(())
}

/// Groups device-state packets by (idstr, instance), checks each device's idx sequence and
/// attaches the main channel's VFIO records.
fn reassemble(decoded: &[Decoded]) -> Result<BTreeMap<(String, u32), Device>> {
    let mut devs: BTreeMap<(String, u32), Device> = BTreeMap::new();
    for d in decoded {
        match d {
            Decoded::Multifd(c) => {
                for p in &c.packets {
                    devs.entry((p.idstr.clone(), p.instance_id)).or_default().packets.push(p.clone());
                }
            }
            Decoded::Main(m) => {
                for (k, v) in &m.vfio {
                    devs.entry(k.clone()).or_default().main = Some(v.clone());
                }
            }
        }
    }
    for ((idstr, inst), d) in &mut devs {
        d.packets.sort_by_key(|p| p.idx);
        let mut config = None;
        for (i, p) in d.packets.iter().enumerate() {
            if i > 0 && d.packets[i - 1].idx == p.idx {
                bail!("device {idstr} (instance {inst}): packet idx {} appears twice", p.idx);
            }
            if p.idx as usize != i {
                bail!("device {idstr} (instance {inst}): packet idx {i} is missing (the next one is idx {})", p.idx);
            }
            if p.flags & vfio_multifd::wire::VFIO_FLAG_CONFIG_STATE != 0 {
                config = Some(p.idx);
                d.config_bytes = p.data_len;
            } else {
                d.stopcopy_bytes += p.data_len;
            }
        }
        match config {
            Some(c) if c as usize + 1 == d.packets.len() => {}
            Some(c) => bail!("device {idstr} (instance {inst}): config packet idx {c} is not the last packet"),
            None if d.packets.is_empty() => {}
            None => bail!("device {idstr} (instance {inst}): no config packet (flags 0x1): capture cut short?"),
        }
    }
    Ok(devs)
}

fn file_stem(idstr: &str, inst: u32) -> String {
    let s: String =
        idstr.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    format!("{s}-{inst}")
}

/// Writes `path` under a temporary name, then renames it.
fn write_file(path: &Path, parts: &mut dyn FnMut(&mut dyn Write) -> Result<()>) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?);
    parts(&mut f)?;
    f.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn write_devices(
    dir: &Path,
    files: &[PathBuf],
    main_file: Option<&Path>,
    devs: &mut BTreeMap<(String, u32), Device>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for ((idstr, inst), d) in devs.iter_mut() {
        let stem = dir.join(file_stem(idstr, *inst));
        let with = |ext: &str| PathBuf::from(format!("{}{ext}", stem.display()));
        let pre: Vec<(u64, u64)> = d.main.as_ref().map(|m| m.precopy.clone()).unwrap_or_default();
        let main_stop: Vec<(u64, u64)> = d.main.as_ref().map(|m| m.stopcopy.clone()).unwrap_or_default();
        let data: Vec<&DevPacket> = d.packets.iter().filter(|p| p.flags & 1 == 0).collect();
        let put_main = |w: &mut dyn Write, ranges: &[(u64, u64)]| -> Result<()> {
            for &(off, len) in ranges {
                copy_range(main_file.context("main-channel ranges without a main channel")?, off, len, w)?;
            }
            Ok(())
        };
        let put_packets = |w: &mut dyn Write| -> Result<()> {
            for p in &data {
                copy_range(&files[p.file], p.data_offset, p.data_len, w)?;
            }
            Ok(())
        };
        write_file(&with(".precopy"), &mut |w| put_main(w, &pre))?;
        write_file(&with(".stopcopy"), &mut |w| {
            put_main(w, &main_stop)?;
            put_packets(w)
        })?;
        write_file(&with(".bin"), &mut |w| {
            put_main(w, &pre)?;
            put_main(w, &main_stop)?;
            put_packets(w)
        })?;
        d.files = vec![with(".bin"), with(".precopy"), with(".stopcopy")];
        if let Some(c) = d.packets.iter().find(|p| p.flags & 1 != 0) {
            write_file(&with(".qemu-config"), &mut |w| copy_range(&files[c.file], c.data_offset, c.data_len, w))?;
            d.files.push(with(".qemu-config"));
        }
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn packet_json(p: &DevPacket) -> Value {
    let h = &p.header;
    let be = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    json!({
        "offset": p.offset, "magic": be(0), "version": be(4), "flags": be(8), "idstr": p.idstr,
        "instance_id": p.instance_id, "next_packet_size": p.next_packet_size,
        "vfio": {"version": be(276), "idx": p.idx, "flags": p.flags},
        "data_offset": p.data_offset, "data_len": p.data_len,
        "encoder_identical": p.encoder_identical, "header_hex": hex(h),
    })
}

fn main_json(m: &MainChannel) -> Value {
    let sections: Vec<Value> = m
        .sections
        .iter()
        .map(|s| {
            json!({"offset": s.offset, "type": kind_name(s.kind), "section_id": s.id, "idstr": s.idstr,
                   "instance_id": s.instance_id, "payload_len": s.payload_len,
                   "payload": match s.payload { Payload::Ram => "ram", Payload::Vfio => "vfio", Payload::Framed => "framed" }})
        })
        .collect();
    let commands: Vec<Value> =
        m.commands.iter().map(|&(o, c, l)| json!({"offset": o, "cmd": c, "name": command_name(c), "len": l})).collect();
    let vfio: Vec<Value> = m
        .vfio
        .iter()
        .map(|((id, inst), v)| {
            json!({"idstr": id, "instance_id": inst, "precopy_bytes": v.precopy_bytes(),
                   "precopy_chunks": v.precopy.len(), "stopcopy_bytes": v.stopcopy.iter().map(|r| r.1).sum::<u64>(),
                   "init_data_sent": v.init_data_sent, "config_on_main": v.config_on_main})
        })
        .collect();
    json!({"kind": "main", "bytes": m.bytes, "decoded_bytes": m.decoded, "stopped": m.stopped,
           "machine": m.machine, "eof": m.eof, "vmdesc_len": m.vmdesc_len, "sections": sections,
           "commands": commands, "vfio": vfio,
           "ramblocks": m.ramblocks.iter().map(|(n, l)| json!({"name": n, "used_length": l})).collect::<Vec<_>>()})
}

fn to_json(a: &DumpArgs, decoded: &[Decoded], devs: &BTreeMap<(String, u32), Device>) -> Value {
    let channels: Vec<Value> = decoded
        .iter()
        .zip(&a.files)
        .map(|(d, f)| {
            let mut v = match d {
                Decoded::Multifd(c) => json!({
                    "kind": "multifd", "id": c.id, "uuid": format_uuid(&c.uuid), "init_hex": hex(&c.init), "bytes": c.bytes,
                    "decoded_bytes": c.bytes,
                    "ram": {"packets": c.ram.packets, "sync_packets": c.ram.sync_packets,
                            "normal_pages": c.ram.normal_pages, "zero_pages": c.ram.zero_pages,
                            "bytes": c.ram.bytes, "ramblocks": c.ram.ramblocks, "packet_num_max": c.ram.packet_num_max},
                    "device_packets": c.packets.iter().map(packet_json).collect::<Vec<_>>(),
                }),
                Decoded::Main(m) => main_json(m),
            };
            v["file"] = json!(f.display().to_string());
            v
        })
        .collect();
    let devices: Vec<Value> = devs
        .iter()
        .map(|((id, inst), d)| {
            json!({"idstr": id, "instance_id": inst, "packets": d.packets.len(),
                   "data_packets": d.packets.iter().filter(|p| p.flags & 1 == 0).count(),
                   "stopcopy_bytes": d.stopcopy_bytes, "config_bytes": d.config_bytes,
                   "precopy_bytes": d.main.as_ref().map(main_channel::VfioMain::precopy_bytes),
                   "channels": d.packets.iter().map(|p| p.file).collect::<std::collections::BTreeSet<_>>().len(),
                   "files": d.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>()})
        })
        .collect();
    let all: Vec<&DevPacket> = devs.values().flat_map(|d| d.packets.iter()).collect();
    json!({"channels": channels, "devices": devices,
           "encoder": {"headers": all.len(), "identical": all.iter().filter(|p| p.encoder_identical).count()}})
}

fn print_packet(p: &DevPacket) {
    let h = &p.header;
    let be = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    println!(
        "  device-state packet @{}: magic {:#010x} version {} flags {:#x} idstr {:?} instance_id {} \
         next_packet_size {} | VFIO version {} idx {} flags {:#x} | {} data bytes{}",
        p.offset,
        be(0),
        be(4),
        be(8),
        p.idstr,
        p.instance_id,
        p.next_packet_size,
        be(276),
        p.idx,
        p.flags,
        p.data_len,
        if p.flags & 1 != 0 { " (config state)" } else { "" }
    );
}

fn print_main(m: &MainChannel) {
    println!("  QEVM version 3, machine {}", m.machine.as_deref().unwrap_or("?"));
    let count = |k: u8| m.sections.iter().filter(|s| s.kind == k).count();
    let framed = m.sections.iter().filter(|s| s.payload == Payload::Framed).count();
    println!(
        "  sections: {} START, {} PART, {} END, {} FULL ({framed} device vmstate payloads framed by their footers, not decoded)",
        count(1),
        count(2),
        count(3),
        count(4)
    );
    let cmds: Vec<&str> = m.commands.iter().map(|c| command_name(c.1)).collect();
    println!("  commands: {}", if cmds.is_empty() { "none".into() } else { cmds.join(", ") });
    if !m.ramblocks.is_empty() {
        let b: Vec<String> = m.ramblocks.iter().map(|(n, l)| format!("{n} ({})", fmt_bytes(*l))).collect();
        println!("  RAM blocks: {}", b.join(", "));
    }
    for ((id, inst), v) in &m.vfio {
        println!(
            "  {id} (instance {inst}): pre-copy {} bytes in {} DEV_DATA_STATE record(s){}{}",
            v.precopy_bytes(),
            v.precopy.len(),
            if v.init_data_sent { ", DEV_INIT_DATA_SENT" } else { "" },
            if v.config_on_main { ", config state on the main channel" } else { "" }
        );
    }
    match &m.stopped {
        None => println!("  decoded: every byte ({} of {})", m.decoded, m.bytes),
        Some(why) => println!("  decoded: {} of {} bytes; stopped: {why}", m.decoded, m.bytes),
    }
}

fn print_text(a: &DumpArgs, decoded: &[Decoded], devs: &BTreeMap<(String, u32), Device>) {
    for (d, f) in decoded.iter().zip(&a.files) {
        match d {
            Decoded::Multifd(c) => {
                println!(
                    "{}: multifd channel {} (uuid {}), {} bytes",
                    f.display(),
                    c.id,
                    format_uuid(&c.uuid),
                    c.bytes
                );
                let r = &c.ram;
                let blocks: Vec<&str> = r.ramblocks.iter().map(String::as_str).collect();
                println!(
                    "  RAM: {} packets ({} SYNC), {} normal pages, {} zero pages, {} in all; ramblocks: {}",
                    r.packets,
                    r.sync_packets,
                    r.normal_pages,
                    r.zero_pages,
                    fmt_bytes(r.bytes),
                    if blocks.is_empty() { "none".into() } else { blocks.join(", ") }
                );
                c.packets.iter().for_each(print_packet);
                println!("  decoded: every byte ({} of {})", c.bytes, c.bytes);
            }
            Decoded::Main(m) => {
                println!("{}: main channel, {} bytes", f.display(), m.bytes);
                print_main(m);
            }
        }
    }
    for ((id, inst), d) in devs {
        let channels = d.packets.iter().map(|p| p.file).collect::<std::collections::BTreeSet<_>>().len();
        let pre =
            d.main.as_ref().map_or("no main channel given".to_string(), |m| format!("{} bytes", m.precopy_bytes()));
        println!(
            "device {id} (instance {inst}): {} packet(s) on {channels} channel(s): stop-copy {} bytes in {} data packet(s), \
             config {} bytes; pre-copy {pre}",
            d.packets.len(),
            d.stopcopy_bytes,
            d.packets.len().saturating_sub(1),
            d.config_bytes
        );
        if d.main.is_none() && !d.files.is_empty() {
            println!(
                "  note: no main channel given, so .bin holds the multifd packets only (QEMU sends a device's \
                 pre-copy bytes on the main channel)"
            );
        }
        for f in &d.files {
            println!("  wrote {}", f.display());
        }
    }
    let all: Vec<&DevPacket> = devs.values().flat_map(|d| d.packets.iter()).collect();
    println!(
        "encoder: {} of {} device-state header(s) re-encoded byte-identical (288 bytes each)",
        all.iter().filter(|p| p.encoder_identical).count(),
        all.len()
    );
}
