//! `vfio-multifd tee`: a TCP relay that records every connection, for capturing a migration
//! between two QEMUs (or any two peers) byte for byte. `vfio-multifd dump` decodes what it
//! records.
//!
//! Each accepted connection is relayed to `--connect` and recorded as `conn-<n>.bin` (the bytes
//! the client sent, in accept order from 0) and `conn-<n>.rev.bin` (the bytes the server sent
//! back). A file is written under a `.part` name and renamed when its direction ended with a
//! clean EOF, so a file without `.part` is a complete direction.

use std::fs::File;
use std::io::{BufWriter, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::util::{fmt_bytes, parse_size};

/// Relay buffer per direction.
const BUF: usize = 64 * 1024;
/// How often the accept loop and the wait look at the deadline.
const POLL: Duration = Duration::from_millis(20);

/// `tee` options.
#[derive(Debug, Clone, Args)]
pub struct TeeArgs {
    /// Address to listen on (HOST:PORT), where the client (e.g. the source QEMU) connects.
    #[arg(long, short = 'l')]
    pub listen: String,
    /// Address to relay each connection to (HOST:PORT), e.g. the destination QEMU.
    #[arg(long, short = 'c')]
    pub connect: String,
    /// Directory for the recordings (created if missing).
    #[arg(long, value_name = "DIR")]
    pub record: PathBuf,
    /// Connections to accept; the command ends once all of them closed (1..=64). A QEMU
    /// migration with N multifd channels makes N + 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub connections: u32,
    /// Seconds the whole relay may take, from start until the last connection closed.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Most bytes recorded per direction of one connection; more fails that connection.
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    pub max_bytes: u64,
}

/// How one direction of a relayed connection ended.
#[derive(Debug)]
struct DirEnd {
    bytes: u64,
    /// `None`: clean EOF from the sender, forwarded as a write shutdown.
    error: Option<String>,
}

struct Conn {
    n: u32,
    sockets: [TcpStream; 2],
    threads: Vec<JoinHandle<DirEnd>>,
}

/// `vfio-multifd tee`.
pub fn run(a: &TeeArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    std::fs::create_dir_all(&a.record).with_context(|| format!("creating {}", a.record.display()))?;
    let target = a
        .connect
        .to_socket_addrs()
        .with_context(|| format!("resolving --connect {}", a.connect))?
        .next()
        .with_context(|| format!("--connect {} resolves to no address", a.connect))?;
    let l = TcpListener::bind(&a.listen).with_context(|| format!("listening on {}", a.listen))?;
    l.set_nonblocking(true).context("making the listener non-blocking")?;
    eprintln!(
        "tee: {} -> {}, recording {} connection(s) in {}",
        a.listen,
        a.connect,
        a.connections,
        a.record.display()
    );
    let done = Arc::new(AtomicUsize::new(0));
    let mut conns: Vec<Conn> = Vec::new();
    let r = accept_all(a, &l, target, deadline, &done, &mut conns);
    let waited = r.and_then(|()| wait_all(&done, conns.len() * 2, deadline));
    if waited.is_err() {
        // Unblock every relay thread: their reads and writes fail at once.
        for c in &conns {
            for s in &c.sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
    let mut failed = Vec::new();
    for c in conns {
        let ends: Vec<DirEnd> = c
            .threads
            .into_iter()
            .map(|t| t.join().unwrap_or(DirEnd { bytes: 0, error: Some("relay thread panicked".into()) }))
            .collect();
        for (end, dir) in ends.iter().zip(["client->server", "server->client"]) {
            let state = end.error.as_deref().unwrap_or("EOF");
            eprintln!("tee: conn {} {dir}: {} ({} B), {state}", c.n, fmt_bytes(end.bytes), end.bytes);
        }
        // The client's bytes are the capture; the server's answer may end in a reset once
        // the client is gone.
        if let Some(e) = &ends[0].error {
            failed.push(format!("connection {}: {e}", c.n));
        }
    }
    waited?;
    if !failed.is_empty() {
        bail!(
            "incomplete capture ({}); the .part files in {} hold what arrived",
            failed.join("; "),
            a.record.display()
        );
    }
    Ok(())
}

fn accept_all(
    a: &TeeArgs,
    l: &TcpListener,
    target: std::net::SocketAddr,
    deadline: Instant,
    done: &Arc<AtomicUsize>,
    conns: &mut Vec<Conn>,
) -> Result<()> {
    for n in 0..a.connections {
        let client = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        bail!(
                            "timed out after {} s waiting for connection {n} of {} on {}",
                            a.timeout,
                            a.connections,
                            a.listen
                        );
                    }
                    std::thread::sleep(POLL);
                }
                Err(e) => return Err(e).with_context(|| format!("accepting connection {n} on {}", a.listen)),
            }
        };
        client.set_nonblocking(false).context("making an accepted socket blocking")?;
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let server = TcpStream::connect_timeout(&target, left.min(Duration::from_secs(10)))
            .with_context(|| format!("connecting to {} for connection {n}", a.connect))?;
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let mut threads = Vec::with_capacity(2);
        for (dir, from, to) in [("bin", &client, &server), ("rev.bin", &server, &client)] {
            let path = a.record.join(format!("conn-{n}.{dir}"));
            let (from, to) = (from.try_clone()?, to.try_clone()?);
            let (done, max) = (Arc::clone(done), a.max_bytes);
            let t = std::thread::Builder::new()
                .name(format!("tee-{n}-{dir}"))
                .spawn(move || {
                    let end = relay(from, to, &path, max);
                    done.fetch_add(1, Ordering::AcqRel);
                    end
                })
                .context("starting a relay thread")?;
            threads.push(t);
        }
        eprintln!("tee: connection {n} accepted");
        conns.push(Conn { n, sockets: [client, server], threads });
    }
    Ok(())
}

fn wait_all(done: &AtomicUsize, want: usize, deadline: Instant) -> Result<()> {
    while done.load(Ordering::Acquire) < want {
        if Instant::now() >= deadline {
            bail!("timed out: {} of {want} relay directions still open", want - done.load(Ordering::Acquire));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// Copies `from` to `to` and into `path` until EOF, an error or `max` bytes.
fn relay(mut from: TcpStream, to: TcpStream, path: &Path, max: u64) -> DirEnd {
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let mut bytes = 0u64;
    let r = (|| -> Result<()> {
        let mut rec = BufWriter::new(File::create(&part).with_context(|| format!("creating {}", part.display()))?);
        let mut to_w = &to;
        let mut buf = vec![0u8; BUF];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading"),
            };
            bytes += n as u64;
            if bytes > max {
                bail!("more than --max-bytes {max} bytes");
            }
            rec.write_all(&buf[..n]).with_context(|| format!("writing {}", part.display()))?;
            to_w.write_all(&buf[..n]).context("forwarding")?;
        }
        rec.flush().with_context(|| format!("writing {}", part.display()))?;
        // The recording is complete before the peer sees the EOF.
        std::fs::rename(&part, path).with_context(|| format!("renaming {} to {}", part.display(), path.display()))?;
        let _ = to.shutdown(Shutdown::Write);
        Ok(())
    })();
    match r {
        Ok(()) => DirEnd { bytes, error: None },
        Err(e) => {
            let _ = to.shutdown(Shutdown::Write);
            DirEnd { bytes, error: Some(format!("{e:#}")) }
        }
    }
}
