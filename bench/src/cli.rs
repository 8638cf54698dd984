//! Command-line definitions (clap derive) and argument validation.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vfio_migration::MigState;
use vfio_multifd::wire::Uuid;

use crate::util::{parse_duration, parse_size, parse_size_usize, parse_timeout};

/// Migrates VFIO device state over parallel QEMU-compatible multifd channels, and measures it.
#[derive(Debug, Parser)]
#[command(name = "vfio-multifd", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Migrate simulated devices to a receiver in this process over loopback TCP and verify
    /// every byte (the default job of `make run`).
    Loopback(LoopbackArgs),
    /// Send device state to a `recv` (QEMU 10.x multifd device-state wire format).
    Send(SendArgs),
    /// Receive device state from a `send` (or a QEMU-compatible peer) and load it.
    Recv(RecvArgs),
    /// Show what this host supports: io_uring ops, locked memory, huge pages, VFIO devices.
    Probe(ProbeArgs),
    /// Inspect or drive one VFIO device directly (state, regions, reset).
    Dev(DevArgs),
    /// Run the benchmark suite: the engine against a QEMU-style design, a minimum-copy
    /// ceiling and raw TCP, on the same simulated devices.
    Bench(crate::suite::BenchArgs),
    /// Decode the captured connections of a real QEMU migration (multifd channels to the last
    /// byte, the main channel's RAM and VFIO sections) and reassemble each device's state.
    Dump(crate::dump::DumpArgs),
    /// Relay TCP connections to another address and record each one (capture a migration).
    Tee(crate::tee::TeeArgs),
    /// One process of the benchmark's process scenarios (used by `bench`).
    #[command(hide = true)]
    BenchPeer(crate::suite::peers::PeerArgs),
}

/// `auto|on|off` for zero-copy sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum ZeroCopyArg {
    /// SEND_ZC where the kernel supports it and every channel is TCP.
    #[default]
    Auto,
    /// Always SEND_ZC (fails where impossible).
    On,
    /// Plain SEND.
    Off,
}

impl From<ZeroCopyArg> for vfio_multifd::ZeroCopy {
    fn from(z: ZeroCopyArg) -> Self {
        match z {
            ZeroCopyArg::Auto => vfio_multifd::ZeroCopy::Auto,
            ZeroCopyArg::On => vfio_multifd::ZeroCopy::On,
            ZeroCopyArg::Off => vfio_multifd::ZeroCopy::Off,
        }
    }
}

/// `auto|uring|blocking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum BackendArg {
    /// io_uring when a ring can be set up, else blocking (saying why).
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// Plain blocking system calls.
    Blocking,
}

impl From<BackendArg> for vfio_multifd::Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => vfio_multifd::Backend::Auto,
            BackendArg::Uring => vfio_multifd::Backend::Uring,
            BackendArg::Blocking => vfio_multifd::Backend::Blocking,
        }
    }
}

/// `auto|manual`: who decides the switchover of a live migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum SwitchoverArg {
    /// When every pre-copy device's initial data is acknowledged (sent, without a return
    /// path) and the estimated switchover time is at most --downtime-limit; or at
    /// --max-precopy.
    #[default]
    Auto,
    /// On SIGUSR1 or a line on stdin; or at --max-precopy.
    Manual,
}

/// Live-migration options of `send` and `loopback`.
#[derive(Debug, Clone, Args)]
pub struct LiveArgs {
    /// Live migration: set everything up, stream PRE_COPY data (initial and dirty) while the VM
    /// runs, then stop the vCPUs and switch over (see --switchover). Without it: stop-and-copy
    /// (the devices are switched over as soon as the session is set up).
    #[arg(long)]
    pub precopy: bool,
    /// When to switch over: `auto` when every pre-copy device's initial data is acknowledged
    /// by the destination (sent, without a return path) and the estimated switchover time is
    /// at most --downtime-limit; `manual` on SIGUSR1 or a line on stdin (stdin at EOF is
    /// ignored; a line `region-write N REGION OFFSET HEX` instead writes into the Nth --device
    /// while it runs, as a guest would). Either way at most --max-precopy after pre-copy
    /// started.
    #[arg(long, value_enum, default_value_t, requires = "precopy")]
    pub switchover: SwitchoverArg,
    /// Largest estimated switchover time `auto` accepts (like QEMU's downtime-limit), e.g.
    /// 300ms, 1s.
    #[arg(long, value_name = "DURATION", default_value = "300ms", value_parser = parse_duration, requires = "precopy")]
    pub downtime_limit: Duration,
    /// Longest pre-copy: the switchover happens then whatever the estimate (auto) or without a
    /// signal (manual), e.g. 60s, 2m.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration, requires = "precopy")]
    pub max_precopy: Duration,
}

/// Options every transfer has.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Parallel multifd channels (TCP connections), 1..=256.
    #[arg(short = 'P', long = "channels", visible_alias = "parallel", default_value_t = 4, value_parser = parse_channels)]
    pub channels: usize,
    /// I/O backend.
    #[arg(long, value_enum, default_value_t)]
    pub backend: BackendArg,
    /// Session UUID carried in every channel's init packet (QEMU's -uuid); both sides must
    /// agree. Default: all zeros, as QEMU.
    #[arg(long, value_parser = parse_uuid_arg)]
    pub uuid: Option<Uuid>,
    /// Print iperf3-style JSON (start, intervals, end) on stdout instead of text.
    #[arg(short = 'J', long)]
    pub json: bool,
    /// Seconds between JSON intervals.
    #[arg(short = 'i', long, default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,
    /// Time without progress before the transfer fails: seconds, or with a unit (90, 500ms,
    /// 1.5s, 2m).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_timeout, allow_negative_numbers = true)]
    pub stall_timeout: Duration,
}

/// `loopback` options.
#[derive(Debug, Clone, Args)]
pub struct LoopbackArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub devices: u32,
    /// Device state per device (e.g. 1GiB, 256M, bytes).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Device bytes per packet (4K..=64M).
    #[arg(long, default_value = "1M", value_parser = parse_chunk)]
    pub chunk: usize,
    /// Largest read the simulated device returns (its pipe capacity).
    #[arg(long, default_value = "1M", value_parser = parse_size_usize)]
    pub max_read: usize,
    /// Zero-copy sends (SEND_ZC).
    #[arg(long, value_enum, default_value_t)]
    pub zerocopy: ZeroCopyArg,
    /// Simulated devices dirty this many bytes a second (in 4 KiB pages) while they run, and
    /// stream dirty records in pre-copy (e.g. 8MiB). The destinations' final state is checked
    /// against the sources' state at stop.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub dirty_rate: Option<u64>,
    /// Put the source devices on one simulated VM fabric with a guest thread writing into
    /// random devices and a thread doing P2P DMA between random device pairs (about 1000 and
    /// 500 writes a second) until the vCPUs are stopped for the switchover. The run fails if a
    /// write is lost or a P2P ordering rule is broken.
    #[arg(long)]
    pub peer_dma: bool,
    /// Live migration.
    #[command(flatten)]
    pub live: LiveArgs,
    /// Receive budget: bytes of out-of-order packets the receiver holds (default: one
    /// max-size packet per channel, at least two). Raise it when a receive fails with "receive
    /// budget exhausted".
    #[arg(long, value_parser = parse_size_usize)]
    pub budget: Option<usize>,
    /// Transfer options.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `send` options. Devices are `--device`, `--sim` and `--source` in command-line order;
/// `--idstr`, `--instance` (and a `--source` given together with a `--device`/`--sim`) are
/// matched to them by position.
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// Receiver address (HOST:PORT). Connections are retried until --connect-timeout.
    #[arg(long, short = 'c')]
    pub connect: String,
    /// A VFIO device: sysfs path, PCI address, mdev UUID or group:N/name (repeatable).
    #[arg(long = "device", value_name = "DEV")]
    pub device: Vec<String>,
    /// A simulated device of SIZE bytes of state, content seed SEED (default: position + 1).
    #[arg(long = "sim", value_name = "SIZE[,SEED]", value_parser = parse_sim)]
    pub sim: Vec<SimSpec>,
    /// A saved stream file:PATH and its config blob PATH.config (required unless --no-config).
    /// The file must not change while it is sent. Given with
    /// --device/--sim, it replaces the data source of the device at the same position (the
    /// device itself is left untouched).
    #[arg(long = "source", value_name = "file:PATH", value_parser = parse_file_spec)]
    pub source: Vec<PathBuf>,
    /// Wire idstr per device (default like QEMU's `<guest PCI address>/vfio`:
    /// `0000:00:02.0/vfio` for the first device, `0000:00:03.0/vfio` for the second...).
    #[arg(long)]
    pub idstr: Vec<String>,
    /// Wire instance_id per device (default 0).
    #[arg(long)]
    pub instance: Vec<u32>,
    /// Device bytes per packet (4K..=64M; QEMU uses 1M).
    #[arg(long, default_value = "1M", value_parser = parse_chunk)]
    pub chunk: usize,
    /// Zero-copy sends.
    #[arg(long, value_enum, default_value_t)]
    pub zerocopy: ZeroCopyArg,
    /// Do not offer the return path (switchover-ack and the destination's verdicts): the wire
    /// is then byte-for-byte QEMU 10.x, and success means every byte was sent.
    #[arg(long)]
    pub no_return_path: bool,
    /// Send a --source whose PATH.config is missing, with an empty config blob.
    #[arg(long)]
    pub no_config: bool,
    /// Live migration.
    #[command(flatten)]
    pub live: LiveArgs,
    /// State to leave source devices in after a successful send (RUNNING keeps them usable;
    /// QEMU leaves them STOP).
    #[arg(long, default_value = "RUNNING", value_parser = parse_state)]
    pub final_state: MigState,
    /// How long to keep retrying the connection: seconds, or with a unit (10, 500ms, 2m).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout, allow_negative_numbers = true)]
    pub connect_timeout: Duration,
    /// Transfer options.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `recv` options; destination devices are matched to the sender's by position.
#[derive(Debug, Clone, Args)]
pub struct RecvArgs {
    /// Address to listen on (HOST:PORT).
    #[arg(long, short = 'l')]
    pub listen: String,
    /// A VFIO device to load (repeatable).
    #[arg(long = "device", value_name = "DEV")]
    pub device: Vec<String>,
    /// A simulated device expecting SIZE bytes with content SEED (default: position + 1).
    #[arg(long = "sim", value_name = "SIZE[,SEED]", value_parser = parse_sim)]
    pub sim: Vec<SimSpec>,
    /// Write the reassembled stream to file:PATH and its config blob to PATH.config. Given
    /// with a --device/--sim at the same position, the saved stream is then also loaded into
    /// that device.
    #[arg(long = "sink", value_name = "file:PATH", value_parser = parse_file_spec)]
    pub sink: Vec<PathBuf>,
    /// Check simulated destinations byte for byte and their config blob against the
    /// expectation, and report it.
    #[arg(long)]
    pub verify: bool,
    /// Wire idstr per device (same defaults as `send`).
    #[arg(long)]
    pub idstr: Vec<String>,
    /// Wire instance_id per device (default 0).
    #[arg(long)]
    pub instance: Vec<u32>,
    /// Largest device data per packet accepted (must be at least the sender's --chunk).
    #[arg(long, default_value = "1M", value_parser = parse_chunk)]
    pub max_packet: usize,
    /// Bytes of out-of-order packets held at most, charged in blocks of 1/16 of --max-packet
    /// (4K..64K); each device's next packet is held outside it (default: one max-size packet
    /// per channel, at least two). A packet that does not fit waits; a receive fails with
    /// "receive budget exhausted" when waiting cannot help. Raise it to absorb more reordering.
    #[arg(long, value_parser = parse_size_usize)]
    pub budget: Option<usize>,
    /// Do not accept the source's return-path offer (no switchover-ack, no verdicts sent
    /// back): serve it exactly as a QEMU-format destination would.
    #[arg(long)]
    pub no_return_path: bool,
    /// State to leave destination devices in once loaded.
    #[arg(long, default_value = "RUNNING", value_parser = parse_state)]
    pub final_state: MigState,
    /// How long to wait for all channels to connect: seconds, or with a unit (60, 500ms, 2m).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_timeout, allow_negative_numbers = true)]
    pub accept_timeout: Duration,
    /// Transfer options.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `probe` options.
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// JSON output.
    #[arg(short = 'J', long)]
    pub json: bool,
}

/// `dev` subcommands.
#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// What to do with the device.
    #[command(subcommand)]
    pub cmd: DevCmd,
}

/// One device operation. DEV is a sysfs path, PCI address, mdev UUID or group:N/name.
#[derive(Debug, Clone, Subcommand)]
pub enum DevCmd {
    /// Device info, migration flags, state, STOP_COPY size estimate and regions.
    Info {
        /// The device.
        dev: String,
    },
    /// Print the migration state, or walk the device to STATE (one legal arc at a time).
    State {
        /// The device.
        dev: String,
        /// RUNNING, STOP, STOP_COPY, RESUMING, PRE_COPY, RUNNING_P2P, PRE_COPY_P2P.
        #[arg(value_parser = parse_state)]
        state: Option<MigState>,
    },
    /// VFIO_DEVICE_RESET (back to RUNNING).
    Reset {
        /// The device.
        dev: String,
    },
    /// Read bytes of a region and print them in hex.
    RegionRead {
        /// The device.
        dev: String,
        /// Region index.
        #[arg(long)]
        region: u32,
        /// Offset in the region (decimal or 0x hex).
        #[arg(long, value_parser = parse_u64_auto)]
        offset: u64,
        /// Bytes to read (1..=1M).
        #[arg(long, default_value = "1", value_parser = parse_len)]
        len: usize,
    },
    /// Write hex bytes to a region.
    RegionWrite {
        /// The device.
        dev: String,
        /// Region index.
        #[arg(long)]
        region: u32,
        /// Offset in the region (decimal or 0x hex).
        #[arg(long, value_parser = parse_u64_auto)]
        offset: u64,
        /// The bytes, as hex (e.g. `07`, `0a0b`, `0x41 42`).
        #[arg(long, value_parser = parse_hex_arg)]
        hex: HexBytes,
    },
    /// Check that a reset ends a save session: STOP_COPY, reset, the old data fd reads
    /// ENODEV, the device is RUNNING.
    CheckReset {
        /// The device.
        dev: String,
    },
    /// Walk PRE_COPY: report precopy info, read to the temporary end, enter STOP_COPY, read
    /// to the end of stream, return to RUNNING.
    Precopy {
        /// The device.
        dev: String,
    },
}

/// Bytes given in hex on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HexBytes(pub Vec<u8>);

fn parse_hex_arg(s: &str) -> Result<HexBytes, String> {
    parse_hex_bytes(s).map(HexBytes)
}

/// `--sim SIZE[,SEED]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimSpec {
    /// Stream bytes.
    pub size: u64,
    /// Content seed (None: position + 1).
    pub seed: Option<u64>,
}

/// Parses `SIZE[,SEED]`.
pub fn parse_sim(s: &str) -> Result<SimSpec, String> {
    let (size, seed) = match s.split_once(',') {
        Some((a, b)) => {
            let seed = b
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("bad seed {b:?} in --sim {s:?}: expected SIZE[,SEED] with SEED a number"))?;
            (a, Some(seed))
        }
        None => (s, None),
    };
    let size = parse_size(size).map_err(|e| format!("--sim {s:?}: {e}"))?;
    if size == 0 {
        return Err(format!("--sim {s:?}: a device needs at least one byte of state"));
    }
    Ok(SimSpec { size, seed })
}

/// Parses `file:PATH`.
pub fn parse_file_spec(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("file:") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(format!("{s:?} is not file:PATH (only file: streams are supported, e.g. file:/tmp/dev0.bin)")),
    }
}

/// Parses a state name (case-insensitive, `-` or `_`) or its uAPI number.
pub fn parse_state(s: &str) -> Result<MigState, String> {
    let norm = s.trim().to_ascii_uppercase().replace('-', "_");
    if let Ok(n) = norm.parse::<u32>() {
        return MigState::from_raw(n).ok_or_else(|| format!("state number {n} is not a VFIO migration state (0..=7)"));
    }
    MigState::ALL.into_iter().find(|st| st.name() == norm).ok_or_else(|| {
        let names: Vec<&str> = MigState::ALL.iter().map(|s| s.name()).collect();
        format!("unknown state {s:?}; use one of {}", names.join(", "))
    })
}

fn parse_channels(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("channel count {s:?} is not a number"))?;
    if !(1..=vfio_multifd::wire::MAX_CHANNELS).contains(&n) {
        return Err(format!("{n} channels: the wire allows 1..=256"));
    }
    Ok(n)
}

/// A chunk or packet size within the engine's bounds.
pub fn parse_chunk(s: &str) -> Result<usize, String> {
    let v = parse_size_usize(s)?;
    if !(4096..=vfio_multifd::MAX_CHUNK_BYTES).contains(&v) {
        return Err(format!("{s} is outside 4K..=64M"));
    }
    Ok(v)
}

fn parse_len(s: &str) -> Result<usize, String> {
    let v = parse_size_usize(s)?;
    if !(1..=1 << 20).contains(&v) {
        return Err(format!("length {s} is outside 1..=1M"));
    }
    Ok(v)
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("interval {s:?} is not a number of seconds"))?;
    if !(0.1..=3600.0).contains(&v) {
        return Err(format!("interval {v} s is outside 0.1..=3600"));
    }
    Ok(v)
}

fn parse_uuid_arg(s: &str) -> Result<Uuid, String> {
    vfio_multifd::wire::parse_uuid(s).ok_or_else(|| {
        format!("{s:?} is not a UUID (8-4-4-4-12 hex digits, e.g. 00112233-4455-6677-8899-aabbccddeeff)")
    })
}

/// Decimal or `0x` hex.
pub fn parse_u64_auto(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("{s:?} is not a number (decimal or 0x hex)"))
}

/// Hex bytes: `07`, `0a0b`, `0x41 42`, `de:ad`.
pub fn parse_hex_bytes(s: &str) -> Result<Vec<u8>, String> {
    let mut digits = String::new();
    for tok in s.split(|c: char| c.is_whitespace() || c == ':' || c == ',') {
        let t = tok.strip_prefix("0x").or_else(|| tok.strip_prefix("0X")).unwrap_or(tok);
        if t.len() % 2 == 1 {
            digits.push('0');
        }
        digits.push_str(t);
    }
    if digits.is_empty() {
        return Err("no hex bytes given (e.g. --hex 07)".into());
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16).map_err(|_| format!("{s:?} is not hex bytes (e.g. 07 or 0a0b)"))
        })
        .collect()
}

/// The default wire idstr of device `i`: what QEMU would use for a device at guest slot
/// `2 + i` (`0000:00:02.0/vfio`...). Position-based, so both sides agree even though the
/// host devices differ.
pub fn default_idstr(i: usize) -> String {
    format!("0000:00:{:02x}.0/vfio", i + 2)
}

/// The wire identity of device `i` given the per-position `--idstr`/`--instance` lists.
pub fn device_id(i: usize, idstrs: &[String], instances: &[u32]) -> anyhow::Result<vfio_multifd::DeviceId> {
    let idstr = idstrs.get(i).cloned().unwrap_or_else(|| default_idstr(i));
    let inst = instances.get(i).copied().unwrap_or(0);
    vfio_multifd::DeviceId::new(&idstr, inst)
        .map_err(|e| anyhow::anyhow!("--idstr {idstr:?} for device {i}: {e} (QEMU idstrs look like 0000:00:02.0/vfio)"))
}

/// Checks the per-position lists against the device count.
pub fn check_positions(n: usize, idstrs: &[String], instances: &[u32]) -> anyhow::Result<()> {
    if n == 0 {
        anyhow::bail!("no devices: give at least one --device DEV, --sim SIZE[,SEED] or file: stream");
    }
    if idstrs.len() > n {
        anyhow::bail!(
            "{} --idstr for {n} device(s): give at most one --idstr per device, in device order",
            idstrs.len()
        );
    }
    if instances.len() > n {
        anyhow::bail!("{} --instance for {n} device(s): give at most one --instance per device", instances.len());
    }
    for i in 0..n {
        let a = device_id(i, idstrs, instances)?;
        for j in 0..i {
            if device_id(j, idstrs, instances)? == a {
                anyhow::bail!(
                    "devices {j} and {i} have the same wire identity {a}; give distinct --idstr or --instance"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sim_and_files() {
        assert_eq!(parse_sim("4M"), Ok(SimSpec { size: 4 << 20, seed: None }));
        assert_eq!(parse_sim("1GiB,7"), Ok(SimSpec { size: 1 << 30, seed: Some(7) }));
        assert!(parse_sim("0").is_err());
        assert!(parse_sim("4M,x").unwrap_err().contains("seed"));
        assert_eq!(parse_file_spec("file:/tmp/a"), Ok(PathBuf::from("/tmp/a")));
        assert!(parse_file_spec("/tmp/a").is_err());
        assert!(parse_file_spec("file:").is_err());
    }

    #[test]
    fn states_and_numbers() {
        assert_eq!(parse_state("stop_copy"), Ok(MigState::StopCopy));
        assert_eq!(parse_state("PRE-COPY"), Ok(MigState::PreCopy));
        assert_eq!(parse_state("2"), Ok(MigState::Running));
        assert!(parse_state("BOGUS_STATE").unwrap_err().contains("RUNNING"));
        assert!(parse_state("9").is_err());
        assert_eq!(parse_u64_auto("0x10"), Ok(16));
        assert_eq!(parse_u64_auto("7"), Ok(7));
        assert_eq!(parse_hex_bytes("07"), Ok(vec![7]));
        assert_eq!(parse_hex_bytes("0x41 42"), Ok(vec![0x41, 0x42]));
        assert_eq!(parse_hex_bytes("a"), Ok(vec![0x0a]));
        assert!(parse_hex_bytes("zz").is_err());
        assert!(parse_chunk("1K").is_err());
        assert!(parse_chunk("128M").is_err());
        assert_eq!(parse_chunk("64K"), Ok(64 << 10));
    }

    #[test]
    fn argument_validation() {
        let ok = |args: &[&str]| Cli::try_parse_from(args).map(|_| ()).map_err(|e| e.to_string());
        assert!(ok(&["vfio-multifd", "loopback", "--size", "4M", "-P", "2", "-J"]).is_ok());
        assert!(ok(&["vfio-multifd", "loopback", "-P", "0"]).is_err());
        assert!(ok(&["vfio-multifd", "loopback", "-P", "257"]).is_err());
        assert!(ok(&["vfio-multifd", "loopback", "--size", "4Q"]).unwrap_err().contains("unknown unit"));
        assert!(ok(&["vfio-multifd", "loopback", "--zerocopy", "maybe"]).is_err());
        assert!(ok(&["vfio-multifd", "send", "--connect", "h:1", "--sim", "4M", "--sim", "8M,3"]).is_ok());
        assert!(ok(&["vfio-multifd", "send", "--sim", "4M"]).is_err(), "--connect is required");
        assert!(ok(&["vfio-multifd", "recv", "--listen", ":1", "--sink", "/x"]).is_err());
        let live = ["vfio-multifd", "loopback", "--precopy", "--switchover", "manual", "--downtime-limit", "50ms"];
        assert!(ok(&live).is_ok());
        assert!(ok(&["vfio-multifd", "loopback", "--dirty-rate", "8MiB", "--peer-dma", "--precopy"]).is_ok());
        assert!(ok(&["vfio-multifd", "loopback", "--switchover", "manual"]).unwrap_err().contains("--precopy"));
        assert!(ok(&["vfio-multifd", "loopback", "--precopy", "--max-precopy", "60"]).unwrap_err().contains("60s"));
        assert!(ok(&["vfio-multifd", "send", "-c", "h:1", "--sim", "1M", "--no-return-path", "--precopy"]).is_ok());
        assert!(ok(&["vfio-multifd", "recv", "-l", ":1", "--sim", "1M", "--no-return-path"]).is_ok());
        let c = Cli::try_parse_from(["vfio-multifd", "send", "-c", "h:1", "--sim", "1M"]).unwrap();
        let Cmd::Send(s) = c.cmd else { panic!("not send") };
        assert!(!s.live.precopy && !s.no_return_path);
        assert_eq!(s.live.downtime_limit, Duration::from_millis(300));
        assert_eq!(s.live.max_precopy, Duration::from_secs(60));
        assert_eq!(s.live.switchover, SwitchoverArg::Auto);
        assert!(ok(&["vfio-multifd", "dev", "state", "x", "BOGUS_STATE"]).is_err());
        assert!(
            ok(&["vfio-multifd", "dev", "region-read", "x", "--region", "0", "--offset", "7", "--len", "1"]).is_ok()
        );
        assert!(
            ok(&["vfio-multifd", "dev", "region-write", "x", "--region", "0", "--offset", "2", "--hex", "07"]).is_ok()
        );
        assert!(check_positions(0, &[], &[]).is_err());
        assert!(check_positions(1, &["a".into(), "b".into()], &[]).is_err());
        assert!(check_positions(2, &["a/vfio".into(), "a/vfio".into()], &[]).is_err());
        assert!(check_positions(2, &["a/vfio".into(), "a/vfio".into()], &[0, 1]).is_ok());
        assert_eq!(device_id(1, &[], &[]).unwrap().idstr(), "0000:00:03.0/vfio");
    }
}
