//! The main migration channel (`QEVM`): the file header, the configuration section, the
//! iterable sections of RAM and VFIO devices decoded, commands skipped, and the non-iterable
//! (`QEMU_VM_SECTION_FULL`) sections of other devices framed by their footers. Sources: QEMU 10.0
//! `migration/savevm.c` (section types, header, footer, commands), `migration/ram.c`
//! (`RAM_SAVE_FLAG_*`, the block list), `hw/vfio/migration.c` (`VFIO_MIG_FLAG_*`).

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use super::input::Input;

/// `QEMU_VM_FILE_MAGIC` ("QEVM").
pub const QEVM_MAGIC: u32 = 0x5145_564d;
const FILE_VERSION: u32 = 3;
const SEC_EOF: u8 = 0x00;
const SEC_START: u8 = 0x01;
const SEC_PART: u8 = 0x02;
const SEC_END: u8 = 0x03;
const SEC_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const VMDESCRIPTION: u8 = 0x06;
const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
const FOOTER: u8 = 0x7e;
const MIG_CMD_PACKAGED: u16 = 8;
/// Largest non-iterable section payload searched for its footer.
const FOOTER_WINDOW: u64 = 16 << 20;

/// `VFIO_MIG_FLAG_*` markers (be64) inside a VFIO device's sections.
pub mod vfio_flag {
    /// `VFIO_MIG_FLAG_END_OF_STATE`.
    pub const END_OF_STATE: u64 = 0xffff_ffff_ef10_0001;
    /// `VFIO_MIG_FLAG_DEV_CONFIG_STATE`.
    pub const DEV_CONFIG_STATE: u64 = 0xffff_ffff_ef10_0002;
    /// `VFIO_MIG_FLAG_DEV_SETUP_STATE`.
    pub const DEV_SETUP_STATE: u64 = 0xffff_ffff_ef10_0003;
    /// `VFIO_MIG_FLAG_DEV_DATA_STATE`.
    pub const DEV_DATA_STATE: u64 = 0xffff_ffff_ef10_0004;
    /// `VFIO_MIG_FLAG_DEV_INIT_DATA_SENT`.
    pub const DEV_INIT_DATA_SENT: u64 = 0xffff_ffff_ef10_0005;
    /// `VFIO_MIG_FLAG_DEV_CONFIG_LOAD_READY` (QEMU 10.1).
    pub const DEV_CONFIG_LOAD_READY: u64 = 0xffff_ffff_ef10_0006;
}

const RAM_ZERO: u64 = 0x02;
const RAM_MEM_SIZE: u64 = 0x04;
const RAM_PAGE: u64 = 0x08;
const RAM_EOS: u64 = 0x10;
const RAM_CONTINUE: u64 = 0x20;
const RAM_XBZRLE: u64 = 0x40;
const RAM_MULTIFD_FLUSH: u64 = 0x200;

/// How a section's payload was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// RAM: every record decoded.
    Ram,
    /// A VFIO device: every marker decoded.
    Vfio,
    /// Another device's vmstate: framed by its footer, not decoded.
    Framed,
}

/// One section.
#[derive(Debug, Clone)]
pub struct Section {
    /// Offset of its type byte.
    pub offset: u64,
    /// `QEMU_VM_SECTION_*`.
    pub kind: u8,
    /// `section_id`.
    pub id: u32,
    /// The handler's idstr.
    pub idstr: String,
    /// `instance_id`.
    pub instance_id: u32,
    /// Payload bytes (between the header and the footer).
    pub payload_len: u64,
    /// How the payload was read.
    pub payload: Payload,
}

/// A VFIO device's bytes on the main channel, as ranges of the capture file.
#[derive(Debug, Clone, Default)]
pub struct VfioMain {
    /// `DEV_DATA_STATE` chunks of START/PART sections (pre-copy): (offset, len).
    pub precopy: Vec<(u64, u64)>,
    /// `DEV_DATA_STATE` chunks of END sections (stop-copy over the main channel, without
    /// multifd device state).
    pub stopcopy: Vec<(u64, u64)>,
    /// `DEV_INIT_DATA_SENT` seen (switchover-ack).
    pub init_data_sent: bool,
    /// A `DEV_CONFIG_STATE` section (config on the main channel, without multifd transfer).
    pub config_on_main: bool,
}

impl VfioMain {
    /// Pre-copy bytes.
    pub fn precopy_bytes(&self) -> u64 {
        self.precopy.iter().map(|r| r.1).sum()
    }
}

/// The decoded main channel.
#[derive(Debug, Clone, Default)]
pub struct MainChannel {
    /// File length.
    pub bytes: u64,
    /// Bytes decoded or framed from the start.
    pub decoded: u64,
    /// Why decoding stopped before the end, if it did.
    pub stopped: Option<String>,
    /// Machine type from the configuration section.
    pub machine: Option<String>,
    /// Every section in order.
    pub sections: Vec<Section>,
    /// Commands: (offset, `MIG_CMD_*`, length).
    pub commands: Vec<(u64, u16, u16)>,
    /// `QEMU_VM_EOF` seen.
    pub eof: bool,
    /// Length of the trailing JSON `QEMU_VM_VMDESCRIPTION`, if any.
    pub vmdesc_len: Option<u32>,
    /// VFIO devices by (idstr, instance).
    pub vfio: BTreeMap<(String, u32), VfioMain>,
    /// RAM blocks announced at setup: (name, used_length).
    pub ramblocks: Vec<(String, u64)>,
}

/// `MIG_CMD_*` names (`migration/savevm.c`).
pub fn command_name(c: u16) -> &'static str {
    match c {
        1 => "OPEN_RETURN_PATH",
        2 => "PING",
        3 => "POSTCOPY_ADVISE",
        4 => "POSTCOPY_LISTEN",
        5 => "POSTCOPY_RUN",
        6 => "POSTCOPY_RAM_DISCARD",
        7 => "POSTCOPY_RESUME",
        8 => "PACKAGED",
        9 => "RECV_BITMAP",
        10 => "ENABLE_COLO",
        11 => "SWITCHOVER_START",
        _ => "unknown",
    }
}

/// Section type names.
pub fn kind_name(k: u8) -> &'static str {
    match k {
        SEC_START => "START",
        SEC_PART => "PART",
        SEC_END => "END",
        SEC_FULL => "FULL",
        _ => "?",
    }
}

/// Decodes the main channel as far as it can; a stop in the middle is reported in
/// [`MainChannel::stopped`], except inside RAM and VFIO payloads, which must decode.
pub fn decode(inp: &mut Input, page_size: u32) -> Result<MainChannel> {
    let mut m = MainChannel { bytes: inp.len, ..MainChannel::default() };
    let magic = inp.be32("the file magic")?;
    let version = inp.be32("the file version")?;
    if magic != QEVM_MAGIC || version != FILE_VERSION {
        bail!("{}: not a QEMU migration stream version 3 (magic {magic:#x}, version {version})", inp.path.display());
    }
    let mut caps: Vec<String> = Vec::new();
    loop {
        m.decoded = inp.off;
        let Some(t) = inp.peek()? else {
            if !m.eof {
                m.stopped = Some("the stream ends without QEMU_VM_EOF (capture cut short?)".into());
            }
            return Ok(m);
        };
        if m.eof {
            if t == VMDESCRIPTION && m.vmdesc_len.is_none() {
                inp.u8("type")?;
                let n = inp.be32("the vmdesc length")?;
                inp.skip(u64::from(n), "the JSON vmdesc")?;
                m.vmdesc_len = Some(n);
                continue;
            }
            m.stopped = Some(format!("{} bytes after QEMU_VM_EOF", inp.remaining()));
            return Ok(m);
        }
        let at = inp.off;
        inp.u8("a section type")?;
        match t {
            SEC_EOF => m.eof = true,
            CONFIGURATION => configuration(inp, &mut m, &mut caps)?,
            COMMAND => {
                let cmd = inp.be16("a command")?;
                let len = inp.be16("a command length")?;
                if cmd == MIG_CMD_PACKAGED {
                    m.stopped = Some(format!("offset {at}: a postcopy PACKAGED command (not decoded)"));
                    return Ok(m);
                }
                inp.skip(u64::from(len), "command data")?;
                m.commands.push((at, cmd, len));
            }
            SEC_START | SEC_FULL | SEC_PART | SEC_END => {
                if let Err(why) = section(inp, &mut m, at, t, page_size, &caps)? {
                    m.stopped = Some(why);
                    return Ok(m);
                }
            }
            _ => {
                m.stopped = Some(format!("offset {at}: unknown section type {t:#04x}"));
                return Ok(m);
            }
        }
    }
}

fn configuration(inp: &mut Input, m: &mut MainChannel, caps: &mut Vec<String>) -> Result<()> {
    let len = inp.be32("the machine type length")?;
    if len > 256 {
        bail!("{}: offset {}: machine type of {len} bytes", inp.path.display(), inp.off);
    }
    let mut name = vec![0u8; len as usize];
    inp.bytes(&mut name, "the machine type")?;
    m.machine = Some(String::from_utf8_lossy(&name).into_owned());
    while inp.peek()? == Some(SUBSECTION) {
        inp.u8("a subsection")?;
        let sub = inp.short_str("a subsection name")?;
        inp.be32("a subsection version")?;
        match sub.as_str() {
            "configuration/target-page-bits" => {
                inp.be32("target-page-bits")?;
            }
            "configuration/capabilities" => {
                let n = inp.be32("the capability count")?;
                for _ in 0..n.min(256) {
                    caps.push(inp.short_str("a capability")?);
                }
            }
            "configuration/uuid" => inp.skip(16, "the uuid")?,
            _ => bail!("{}: configuration subsection {sub:?} is not known to this decoder", inp.path.display()),
        }
    }
    Ok(())
}

/// One section; `Ok(Err(why))` stops the decode without failing it.
fn section(
    inp: &mut Input,
    m: &mut MainChannel,
    at: u64,
    t: u8,
    page_size: u32,
    caps: &[String],
) -> Result<std::result::Result<(), String>> {
    let id = inp.be32("a section id")?;
    let (idstr, instance_id) = if t == SEC_START || t == SEC_FULL {
        let idstr = inp.short_str("a section idstr")?;
        let inst = inp.be32("an instance id")?;
        inp.be32("a version id")?;
        (idstr, inst)
    } else {
        match m.sections.iter().find(|s| s.id == id && s.kind == SEC_START) {
            Some(s) => (s.idstr.clone(), s.instance_id),
            None => return Ok(Err(format!("offset {at}: {} of section {id}, which never started", kind_name(t)))),
        }
    };
    let start = inp.off;
    let payload = if idstr == "ram" && t != SEC_FULL {
        ram_payload(inp, m, page_size, caps)?;
        Payload::Ram
    } else if idstr.ends_with("/vfio") && vfio_payload(inp, m, t, &idstr, instance_id)? {
        Payload::Vfio
    } else {
        match find_footer(inp, m, id)? {
            Some(n) => {
                inp.skip(n, "a section payload")?;
                Payload::Framed
            }
            None => {
                return Ok(Err(format!(
                    "offset {at}: {} section {id} '{idstr}': no footer found for its payload (not decoded)",
                    kind_name(t)
                )))
            }
        }
    };
    let payload_len = inp.off - start;
    let f = inp.u8("a section footer")?;
    let fid = inp.be32("a section footer id")?;
    if f != FOOTER || fid != id {
        bail!(
            "{}: offset {}: section {id} '{idstr}' ends with {f:#04x} {fid} instead of its footer 0x7e {id}",
            inp.path.display(),
            inp.off - 5
        );
    }
    m.sections.push(Section { offset: at, kind: t, id, idstr, instance_id, payload_len, payload });
    Ok(Ok(()))
}

/// The RAM records of one section, up to `RAM_SAVE_FLAG_EOS`.
fn ram_payload(inp: &mut Input, m: &mut MainChannel, page_size: u32, caps: &[String]) -> Result<()> {
    let mask = u64::from(page_size) - 1;
    loop {
        let at = inp.off;
        let v = inp.be64("a RAM record")?;
        let (flags, addr) = (v & mask, v & !mask);
        let cont = flags & RAM_CONTINUE != 0;
        match flags & !RAM_CONTINUE {
            RAM_EOS => return Ok(()),
            RAM_MULTIFD_FLUSH => {}
            RAM_MEM_SIZE => {
                let mut left = addr;
                while left > 0 {
                    let name = inp.short_str("a RAM block name")?;
                    let used = inp.be64("a RAM block length")?;
                    if caps.iter().any(|c| c == "x-ignore-shared") {
                        inp.be64("a RAM block address")?;
                    }
                    if used > left {
                        bail!("{}: offset {at}: RAM block lengths exceed the announced total", inp.path.display());
                    }
                    left -= used;
                    m.ramblocks.push((name, used));
                }
            }
            RAM_ZERO | RAM_PAGE | RAM_XBZRLE => {
                if !cont {
                    inp.short_str("a RAM block name")?;
                }
                match flags & !RAM_CONTINUE {
                    RAM_ZERO => inp.skip(1, "a zero page fill byte")?,
                    RAM_PAGE => inp.skip(u64::from(page_size), "a RAM page")?,
                    _ => {
                        inp.u8("XBZRLE flags")?;
                        let n = inp.be16("XBZRLE length")?;
                        inp.skip(u64::from(n), "XBZRLE data")?;
                    }
                }
            }
            f => bail!("{}: offset {at}: RAM record with flags {f:#x} is not decoded", inp.path.display()),
        }
    }
}

/// A VFIO section's markers. `false` (nothing consumed) when the payload is a config-state
/// vmstate, which is framed by its footer instead.
fn vfio_payload(inp: &mut Input, m: &mut MainChannel, t: u8, idstr: &str, inst: u32) -> Result<bool> {
    use vfio_flag::{
        DEV_CONFIG_LOAD_READY, DEV_CONFIG_STATE, DEV_DATA_STATE, DEV_INIT_DATA_SENT, DEV_SETUP_STATE, END_OF_STATE,
    };
    let w = inp.window(8)?;
    if w.len() == 8 && u64::from_be_bytes(w[..8].try_into()?) == DEV_CONFIG_STATE {
        m.vfio.entry((idstr.to_string(), inst)).or_default().config_on_main = true;
        return Ok(false);
    }
    let dev = m.vfio.entry((idstr.to_string(), inst)).or_default();
    loop {
        let at = inp.off;
        match inp.be64("a VFIO marker")? {
            END_OF_STATE | DEV_CONFIG_LOAD_READY => return Ok(true),
            DEV_INIT_DATA_SENT => {
                dev.init_data_sent = true;
                return Ok(true);
            }
            DEV_SETUP_STATE => {}
            DEV_DATA_STATE => {
                let n = inp.be64("a VFIO data size")?;
                let r = (inp.off, n);
                inp.skip(n, "VFIO device data")?;
                if t == SEC_END || t == SEC_FULL {
                    dev.stopcopy.push(r);
                } else {
                    dev.precopy.push(r);
                }
            }
            x => bail!("{}: offset {at}: unknown VFIO marker {x:#018x} in '{idstr}'", inp.path.display()),
        }
    }
}

/// Length of the payload from here to `0x7e <id>` followed by a plausible next item.
fn find_footer(inp: &mut Input, m: &MainChannel, id: u32) -> Result<Option<u64>> {
    let w = inp.window(FOOTER_WINDOW)?;
    let pat = {
        let mut p = [FOOTER, 0, 0, 0, 0];
        p[1..].copy_from_slice(&id.to_be_bytes());
        p
    };
    let mut i = 0;
    while i + 5 <= w.len() {
        if w[i..i + 5] == pat && plausible_next(&w[i + 5..], m, inp.remaining() - (i as u64 + 5)) {
            return Ok(Some(i as u64));
        }
        i += 1;
    }
    Ok(None)
}

/// Whether `b` starts with a valid next item of the stream (`left` bytes remain after the footer).
fn plausible_next(b: &[u8], m: &MainChannel, left: u64) -> bool {
    let be32 = |o: usize| b.get(o..o + 4).map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]));
    match b.first() {
        None => left == 0,
        Some(&SEC_EOF) => left == 1 || (b.get(1) == Some(&VMDESCRIPTION) && be32(2).map(u64::from) == Some(left - 6)),
        Some(&(SEC_START | SEC_FULL)) => {
            let Some(id) = be32(1) else { return false };
            let n = b.get(5).map_or(0, |&n| usize::from(n));
            let Some(name) = b.get(6..6 + n) else { return false };
            // A new section id, or the one an iterable handler started under the same idstr
            // (a VFIO device's FULL section reuses its START section's id).
            n > 0
                && name.iter().all(|c| (0x20..0x7f).contains(c))
                && m.sections.iter().all(|s| s.id != id || s.idstr.as_bytes() == name)
                && b.len() >= 6 + n + 8
        }
        Some(&(SEC_PART | SEC_END)) => {
            be32(1).is_some_and(|id| m.sections.iter().any(|s| s.id == id && s.kind == SEC_START))
        }
        Some(&COMMAND) => b.get(1..3).is_some_and(|c| (1..=11).contains(&u16::from_be_bytes([c[0], c[1]]))),
        _ => false,
    }
}
