//! The separate processes of the benchmark's process scenarios (`vfio-multifd bench-peer ROLE`,
//! hidden from `--help`): the QEMU-style and the minimum-copy designs as a sender and a receiver
//! process each, and the producer and consumer processes that feed a pipe source and drain a
//! pipe or pty sink. Every role prints one JSON object on stdout when it succeeds.
//!
//! The engine's own processes are the ordinary `send` and `recv` commands.

use std::fs::File;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use vfio_multifd::wire::{InitPacket, INIT_PACKET_LEN};
use vfio_multifd::{DeviceId, Latency};

use super::qemu::{channel_thread, load_stream, recv_channel, save_stream, DevLoad, SendState};
use super::{io, Abort};
use crate::util::lat_json;

/// `bench-peer` options.
#[derive(Debug, Clone, Args)]
pub struct PeerArgs {
    /// The process's role.
    #[command(subcommand)]
    pub role: Role,
}

/// What a benchmark process does.
#[derive(Debug, Clone, Subcommand)]
pub enum Role {
    /// QEMU-style source: per device read, copy, queue; per channel writev.
    QemuSend(SendPeer),
    /// QEMU-style destination: per channel recv, copy; per device ordered write.
    QemuRecv(RecvPeer),
    /// Minimum-copy source: per channel pread (or read) and send, no protocol.
    MinCopySend(SendPeer),
    /// Minimum-copy destination: per channel recv and pwrite (or write).
    MinCopyRecv(RecvPeer),
    /// Writes the benchmark pattern into a pipe (or stdout).
    Produce(StreamPeer),
    /// Reads a pipe (or stdin) to the end or to --bytes, checksumming what it read.
    Consume(StreamPeer),
}

/// A sender process.
#[derive(Debug, Clone, Args)]
pub struct SendPeer {
    /// Receiver address.
    #[arg(long)]
    pub connect: String,
    /// Channels.
    #[arg(short = 'P', long)]
    pub channels: usize,
    /// Bytes per read (packet payload).
    #[arg(long)]
    pub chunk: usize,
    /// Device streams (files, FIFOs, character devices), one per device.
    #[arg(long = "source")]
    pub source: Vec<PathBuf>,
    /// Minimum-copy: read even regular files as streams, one device per channel (for a sink
    /// that cannot be written at offsets).
    #[arg(long)]
    pub stream: bool,
}

/// A receiver process.
#[derive(Debug, Clone, Args)]
pub struct RecvPeer {
    /// Address to listen on.
    #[arg(long)]
    pub listen: String,
    /// Channels.
    #[arg(short = 'P', long)]
    pub channels: usize,
    /// Bytes per receive.
    #[arg(long)]
    pub chunk: usize,
    /// Device sinks (created fresh if regular), one per device.
    #[arg(long = "sink")]
    pub sink: Vec<PathBuf>,
}

/// A producer or consumer process.
#[derive(Debug, Clone, Args)]
pub struct StreamPeer {
    /// The FIFO (default: stdout for a producer, stdin for a consumer).
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// Bytes to produce, or to consume before exiting.
    #[arg(long)]
    pub bytes: u64,
    /// Pattern seed (producer).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Runs one role and prints its JSON result.
pub fn run(a: &PeerArgs) -> Result<()> {
    let v = match &a.role {
        Role::QemuSend(p) => qemu_send(p),
        Role::QemuRecv(p) => qemu_recv(p),
        Role::MinCopySend(p) => min_copy_send(p),
        Role::MinCopyRecv(p) => min_copy_recv(p),
        Role::Produce(p) => produce(p),
        Role::Consume(p) => consume(p),
    }?;
    println!("{v}");
    Ok(())
}

// ---- the benchmark pattern and its checksum

/// Bytes per pattern block.
pub const BLOCK: usize = 1 << 20;

/// Pattern block `i` of seed `seed`: a xorshift fill, the first word of every 4 KiB page
/// stamped with the block and page numbers (so no two blocks are equal).
pub fn fill_block(seed: u64, i: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
    for w in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    for (p, page) in buf.chunks_exact_mut(4096).enumerate() {
        page[..8].copy_from_slice(&((i << 20) | p as u64).to_le_bytes());
    }
}

/// A position-dependent checksum of a byte stream, fed in pieces whose lengths are multiples
/// of 8 (except the last).
#[derive(Debug, Clone, Copy)]
pub struct Checksum(u64);

impl Default for Checksum {
    fn default() -> Self {
        // FNV-1a's offset basis, fed 8-byte words.
        Checksum(0xcbf2_9ce4_8422_2325)
    }
}

impl Checksum {
    /// Adds `b`.
    pub fn add(&mut self, b: &[u8]) {
        let mut h = self.0;
        let mut it = b.chunks_exact(8);
        for w in &mut it {
            let v = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
            h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3);
        }
        for &x in it.remainder() {
            h = (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }

    /// The value.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Writes `bytes` bytes of the pattern to `w`, returning the checksum.
pub fn write_pattern(
    fd: RawFd,
    seed: u64,
    bytes: u64,
    mut at: impl FnMut(RawFd, &[u8], u64) -> Result<()>,
) -> Result<u64> {
    let mut buf = vec![0u8; BLOCK];
    let mut sum = Checksum::default();
    let mut off = 0u64;
    let mut i = 0u64;
    while off < bytes {
        let n = (bytes - off).min(BLOCK as u64) as usize;
        fill_block(seed, i, &mut buf);
        sum.add(&buf[..n]);
        at(fd, &buf[..n], off)?;
        off += n as u64;
        i += 1;
    }
    Ok(sum.get())
}

fn produce(a: &StreamPeer) -> Result<Value> {
    let f = match &a.path {
        Some(p) => Some(File::options().write(true).open(p).with_context(|| format!("opening {}", p.display()))?),
        None => None,
    };
    let fd = f.as_ref().map_or(libc::STDOUT_FILENO, AsRawFd::as_raw_fd);
    let sum = write_pattern(fd, a.seed, a.bytes, |fd, b, _| Ok(io::write_all(fd, b)?))?;
    Ok(json!({"bytes": a.bytes, "checksum": sum}))
}

fn consume(a: &StreamPeer) -> Result<Value> {
    let f = match &a.path {
        Some(p) => Some(File::open(p).with_context(|| format!("opening {}", p.display()))?),
        None => None,
    };
    let fd = f.as_ref().map_or(libc::STDIN_FILENO, AsRawFd::as_raw_fd);
    let mut buf = vec![0u8; BLOCK];
    let mut sum = Checksum::default();
    let mut got = 0u64;
    while got < a.bytes {
        let want = (a.bytes - got).min(BLOCK as u64) as usize;
        // Whole blocks, as the producer's: the checksum sees the same pieces.
        let mut n = 0;
        while n < want {
            let r = io::read(fd, &mut buf[n..want]).context("reading the sink")?;
            if r == 0 {
                break;
            }
            n += r;
        }
        sum.add(&buf[..n]);
        got += n as u64;
        if n < want {
            break;
        }
    }
    Ok(json!({"bytes": got, "checksum": sum.get()}))
}

// ---- connections

fn connect(addr: &str, n: usize) -> Result<Vec<OwnedFd>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match TcpStream::connect(addr) {
            Ok(s) => {
                s.set_nodelay(true)?;
                out.push(OwnedFd::from(s));
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
        }
    }
    Ok(out)
}

fn accept(listen: &str, n: usize) -> Result<Vec<OwnedFd>> {
    let l = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (s, _) = l.accept()?;
        s.set_nodelay(true)?;
        out.push(OwnedFd::from(s));
    }
    Ok(out)
}

fn open_sources(paths: &[PathBuf]) -> Result<Vec<File>> {
    paths.iter().map(|p| File::open(p).with_context(|| format!("opening source {}", p.display()))).collect()
}

/// A sink: a regular file is created fresh (truncated); a FIFO or character device is opened
/// for writing.
fn open_sink(p: &Path) -> Result<File> {
    File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .with_context(|| format!("opening sink {}", p.display()))
}

fn config_of(p: &Path) -> Result<Vec<u8>> {
    let mut c = p.as_os_str().to_owned();
    c.push(".config");
    match std::fs::read(&c) {
        Ok(v) => Ok(v),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", Path::new(&c).display())),
    }
}

/// Joins `hs`, returning the first error that is not an echo of another thread's failure.
fn join_all<T>(hs: Vec<std::thread::ScopedJoinHandle<'_, Result<T>>>) -> Result<Vec<T>> {
    let mut ok = Vec::new();
    let mut errs = Vec::new();
    for h in hs {
        match h.join().unwrap_or_else(|_| Err(anyhow!("thread panicked"))) {
            Ok(v) => ok.push(v),
            Err(e) => errs.push(e),
        }
    }
    let root = errs.iter().position(|e| !e.to_string().starts_with("aborted")).unwrap_or(0);
    if errs.is_empty() {
        Ok(ok)
    } else {
        Err(errs.swap_remove(root))
    }
}

// ---- QEMU-style

fn qemu_send(a: &SendPeer) -> Result<Value> {
    let files = open_sources(&a.source)?;
    let configs: Vec<Vec<u8>> = a.source.iter().map(|p| config_of(p)).collect::<Result<_>>()?;
    let ids: Vec<DeviceId> = (0..files.len()).map(|i| crate::cli::device_id(i, &[], &[])).collect::<Result<_>>()?;
    let tx = connect(&a.connect, a.channels)?;
    for (c, s) in tx.iter().enumerate() {
        let mut init = [0u8; INIT_PACKET_LEN];
        InitPacket { uuid: [0; 16], id: c as u8, offer: 0, devices: 0 }.encode(&mut init)?;
        io::write_all(s.as_raw_fd(), &init)?;
    }
    let abort = Abort::default();
    abort.set_sockets(tx.iter().map(AsRawFd::as_raw_fd).collect());
    let send = SendState::new(a.channels);
    let hists = std::thread::scope(|s| -> Result<Vec<Latency>> {
        let (send, abort) = (&send, &abort);
        let chans: Vec<_> = tx
            .iter()
            .map(|f| f.as_raw_fd())
            .enumerate()
            .map(|(c, fd)| {
                s.spawn(move || {
                    let r = channel_thread(c, fd, send, abort);
                    if r.is_err() {
                        abort.trip();
                    }
                    // SAFETY: shutdown on a socket fd that stays open until the scope ends.
                    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
                    r
                })
            })
            .collect();
        let devs: Vec<_> = files
            .iter()
            .zip(&ids)
            .zip(configs)
            .map(|((f, id), cfg)| {
                let fd = f.as_raw_fd();
                s.spawn(move || {
                    let r = save_stream(fd, id, a.chunk, || Ok(cfg), send, abort);
                    if r.is_err() {
                        abort.trip();
                    }
                    r
                })
            })
            .collect();
        let d = join_all(devs);
        send.quit();
        let c = join_all(chans);
        d?;
        c
    })?;
    let mut h = Latency::new();
    for x in &hists {
        h.merge(x);
    }
    Ok(json!({"latency": lat_json(&h.summary())}))
}

fn qemu_recv(a: &RecvPeer) -> Result<Value> {
    let sinks: Vec<File> = a.sink.iter().map(|p| open_sink(p)).collect::<Result<_>>()?;
    let ids: Vec<DeviceId> = (0..sinks.len()).map(|i| crate::cli::device_id(i, &[], &[])).collect::<Result<_>>()?;
    let rx = accept(&a.listen, a.channels)?;
    for r in &rx {
        let mut init = [0u8; INIT_PACKET_LEN];
        io::read_exact(r.as_raw_fd(), &mut init)?.then_some(()).ok_or_else(|| anyhow!("EOF in init packet"))?;
        InitPacket::decode(&init, a.channels, &[0; 16])?;
    }
    let abort = Abort::default();
    abort.set_sockets(rx.iter().map(AsRawFd::as_raw_fd).collect());
    let loads: Vec<DevLoad> = sinks.iter().map(|_| DevLoad::new()).collect();
    let blobs = std::thread::scope(|s| -> Result<Vec<Vec<u8>>> {
        let (ids, loads, abort) = (&ids, &loads, &abort);
        let recvs: Vec<_> = rx
            .iter()
            .map(|f| {
                let fd = f.as_raw_fd();
                s.spawn(move || {
                    let r = recv_channel(fd, ids, loads);
                    if r.is_err() {
                        abort.trip();
                    }
                    r
                })
            })
            .collect();
        let writers: Vec<_> = sinks
            .iter()
            .zip(loads)
            .map(|(f, l)| {
                let fd = f.as_raw_fd();
                s.spawn(move || {
                    let r = load_stream(fd, l, abort);
                    if r.is_err() {
                        abort.trip();
                    }
                    r
                })
            })
            .collect();
        let w = join_all(writers);
        let r = join_all(recvs);
        r?;
        w
    })?;
    for (p, b) in a.sink.iter().zip(blobs) {
        let mut c = p.as_os_str().to_owned();
        c.push(".config");
        std::fs::write(&c, b).with_context(|| format!("writing {}", Path::new(&c).display()))?;
    }
    Ok(json!({}))
}

// ---- minimum copy

/// A segment header on a minimum-copy channel: device, offset, length (`u64::MAX`: up to the
/// end of the channel).
const SEG: usize = 20;

/// Which channel carries what: for regular files, every device split into one contiguous range
/// per channel; for streams, device `d` whole on channel `d` (a stream cannot be split without
/// framing).
fn plan(files: &[File], channels: usize, stream: bool) -> Result<Vec<Vec<(u32, u64, u64)>>> {
    let mut plan: Vec<Vec<(u32, u64, u64)>> = vec![Vec::new(); channels];
    for (d, f) in files.iter().enumerate() {
        let m = f.metadata()?;
        if m.file_type().is_file() && !stream {
            let len = m.len();
            let per = (len / channels as u64).div_ceil(4096) * 4096;
            for (c, p) in plan.iter_mut().enumerate() {
                let off = (per * c as u64).min(len);
                let end = (off + per).min(len);
                if end > off {
                    p.push((d as u32, off, end - off));
                }
            }
        } else {
            if d >= channels {
                bail!(
                    "min-copy carries one stream device per channel: {} devices need {} channels",
                    files.len(),
                    d + 1
                );
            }
            plan[d].push((d as u32, 0, u64::MAX));
        }
    }
    Ok(plan)
}

fn min_copy_send(a: &SendPeer) -> Result<Value> {
    let files = open_sources(&a.source)?;
    let plan = plan(&files, a.channels, a.stream)?;
    let tx = connect(&a.connect, a.channels)?;
    let hists = std::thread::scope(|s| -> Result<Vec<Latency>> {
        let hs: Vec<_> = plan
            .iter()
            .zip(&tx)
            .map(|(segs, sock)| {
                let (files, sock) = (&files, sock.as_raw_fd());
                s.spawn(move || -> Result<Latency> {
                    let r = send_segments(files, segs, sock, a.chunk);
                    // SAFETY: shutdown on a socket fd that stays open until the scope ends.
                    unsafe { libc::shutdown(sock, libc::SHUT_WR) };
                    r
                })
            })
            .collect();
        join_all(hs)
    })?;
    let mut h = Latency::new();
    for x in &hists {
        h.merge(x);
    }
    Ok(json!({"latency": lat_json(&h.summary())}))
}

fn send_segments(files: &[File], segs: &[(u32, u64, u64)], sock: RawFd, chunk: usize) -> Result<Latency> {
    let mut h = Latency::new();
    let mut buf = vec![0u8; chunk];
    for &(d, off, len) in segs {
        let mut hdr = [0u8; SEG];
        hdr[..4].copy_from_slice(&d.to_le_bytes());
        hdr[4..12].copy_from_slice(&off.to_le_bytes());
        hdr[12..].copy_from_slice(&len.to_le_bytes());
        io::write_all(sock, &hdr)?;
        let f = &files[d as usize];
        let mut done = 0u64;
        while done < len {
            let t = Instant::now();
            let want = (len - done).min(chunk as u64) as usize;
            let n = if len == u64::MAX {
                io::read(f.as_raw_fd(), &mut buf[..want])?
            } else {
                f.read_at(&mut buf[..want], off + done)?
            };
            if n == 0 {
                if len == u64::MAX {
                    break;
                }
                bail!("device {d}: end of file at {} of {len} bytes", off + done);
            }
            io::write_all(sock, &buf[..n])?;
            h.record(t.elapsed());
            done += n as u64;
        }
    }
    Ok(h)
}

fn min_copy_recv(a: &RecvPeer) -> Result<Value> {
    let sinks: Vec<File> = a.sink.iter().map(|p| open_sink(p)).collect::<Result<_>>()?;
    let rx = accept(&a.listen, a.channels)?;
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = rx
            .iter()
            .map(|sock| {
                let (sinks, sock) = (&sinks, sock.as_raw_fd());
                s.spawn(move || recv_segments(sinks, sock, a.chunk))
            })
            .collect();
        join_all(hs).map(drop)
    })?;
    Ok(json!({}))
}

fn recv_segments(sinks: &[File], sock: RawFd, chunk: usize) -> Result<()> {
    let mut buf = vec![0u8; chunk];
    loop {
        let mut hdr = [0u8; SEG];
        if !io::read_exact(sock, &mut hdr)? {
            return Ok(());
        }
        let d = u32::from_le_bytes(hdr[..4].try_into()?) as usize;
        let off = u64::from_le_bytes(hdr[4..12].try_into()?);
        let len = u64::from_le_bytes(hdr[12..].try_into()?);
        let f = sinks.get(d).ok_or_else(|| anyhow!("segment for device {d}, which has no sink"))?;
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(chunk as u64) as usize;
            let n = io::read(sock, &mut buf[..want])?;
            if n == 0 {
                if len == u64::MAX {
                    return Ok(());
                }
                bail!("channel closed {} bytes into a {len}-byte segment", done);
            }
            if len == u64::MAX {
                io::write_all(f.as_raw_fd(), &buf[..n])?;
            } else {
                f.write_all_at(&buf[..n], off + done)?;
            }
            done += n as u64;
        }
    }
}

/// Reads `p` to the end, checksumming it in pattern blocks.
pub fn checksum_file(p: &Path) -> Result<(u64, u64)> {
    let mut f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut buf = vec![0u8; BLOCK];
    let mut sum = Checksum::default();
    let mut total = 0u64;
    loop {
        let mut n = 0;
        while n < BLOCK {
            let r = f.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        sum.add(&buf[..n]);
        total += n as u64;
        if n < BLOCK {
            return Ok((total, sum.get()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(len: u64) -> File {
        let f = tempfile_in_shm();
        f.set_len(len).unwrap();
        f
    }

    fn tempfile_in_shm() -> File {
        let dir = std::env::temp_dir();
        let p = dir.join(format!("vfmfd-peers-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }

    #[test]
    fn plan_covers_each_file_once_in_channel_ranges() {
        let files = [file_of(10 << 20), file_of(4096 * 3 + 100)];
        let plan = plan(&files, 4, false).unwrap();
        for (d, f) in files.iter().enumerate() {
            let mut segs: Vec<(u64, u64)> =
                plan.iter().flatten().filter(|s| s.0 == d as u32).map(|s| (s.1, s.2)).collect();
            segs.sort_unstable();
            let mut at = 0;
            for (off, len) in segs {
                assert_eq!(off, at, "device {d}: ranges must be contiguous");
                assert!(len > 0);
                at += len;
            }
            assert_eq!(at, f.metadata().unwrap().len(), "device {d}: ranges must cover the file");
        }
    }

    #[test]
    fn plan_streams_one_device_per_channel() {
        let files = [file_of(4096), file_of(4096)];
        let plan = plan(&files, 4, true).unwrap();
        assert_eq!(plan[0], vec![(0, 0, u64::MAX)]);
        assert_eq!(plan[1], vec![(1, 0, u64::MAX)]);
        assert!(plan[2].is_empty() && plan[3].is_empty());
        let err = super::plan(&files, 1, true).unwrap_err().to_string();
        assert!(err.contains("one stream device per channel"), "{err}");
    }

    #[test]
    fn checksum_sees_order_and_blocks_differ() {
        let (mut a, mut b) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
        fill_block(1, 0, &mut a);
        fill_block(1, 1, &mut b);
        assert_ne!(a, b);
        let (mut x, mut y) = (Checksum::default(), Checksum::default());
        x.add(&a);
        x.add(&b);
        y.add(&b);
        y.add(&a);
        assert_ne!(x.get(), y.get(), "swapped blocks must change the checksum");
        // The same bytes fed in other 8-byte-multiple pieces give the same checksum.
        let mut z = Checksum::default();
        z.add(&a[..4096]);
        z.add(&a[4096..]);
        z.add(&b);
        assert_eq!(x.get(), z.get());
    }
}
