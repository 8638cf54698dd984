//! The minimum-copy ceiling and raw loopback TCP.

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{transition, MigState};

use super::{io, Abort, Outcome};

fn pairs(n: usize) -> Result<(Vec<OwnedFd>, Vec<OwnedFd>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let a = TcpStream::connect(addr)?;
        a.set_nodelay(true)?;
        let (b, _) = l.accept()?;
        b.set_nodelay(true)?;
        c.push(a.into());
        s.push(b.into());
    }
    Ok((c, s))
}

/// Per channel one blocking thread pair: `read(device) -> send` and `recv -> write(device)`,
/// no protocol. Channel `c` carries devices `c, c + C, ...` one after another (a stream cannot
/// be split over channels without framing), so at most `min(C, D)` pairs carry data.
pub fn min_copy(cfgs: &[SimConfig], channels: usize, chunk: usize, abort: &Abort) -> Result<Outcome> {
    let mut srcs: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
    let mut dsts: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
    let t0 = Instant::now();
    let (tx, rx) = pairs(channels)?;
    abort.set_sockets(tx.iter().chain(rx.iter()).map(|f| f.as_raw_fd()).collect());
    let mut dst_fds = Vec::new();
    for d in dsts.iter_mut() {
        let t = transition(d, MigState::Resuming)?;
        dst_fds.push(Some(t.data_fd.ok_or_else(|| anyhow!("no resume fd"))?));
    }
    let mut src_groups: Vec<Vec<&mut SimDevice>> = (0..channels).map(|_| Vec::new()).collect();
    for (i, d) in srcs.iter_mut().enumerate() {
        src_groups[i % channels].push(d);
    }
    let mut dst_groups: Vec<Vec<(u64, OwnedFd, &mut SimDevice)>> = (0..channels).map(|_| Vec::new()).collect();
    for (i, d) in dsts.iter_mut().enumerate() {
        let fd = dst_fds[i].take().ok_or_else(|| anyhow!("fd"))?;
        dst_groups[i % channels].push((cfgs[i].size, fd, d));
    }
    let res: Result<()> = std::thread::scope(|s| {
        let mut hs = Vec::new();
        for (group, sock) in src_groups.into_iter().zip(tx.iter().map(|f| f.as_raw_fd())) {
            hs.push(s.spawn(move || -> Result<()> {
                let r = (|| -> Result<()> {
                    let mut buf = vec![0u8; chunk];
                    for d in group {
                        let fd = transition(d, MigState::StopCopy)?.data_fd.ok_or_else(|| anyhow!("no save fd"))?;
                        loop {
                            let n = io::read(fd.as_raw_fd(), &mut buf)?;
                            if n == 0 {
                                break;
                            }
                            io::write_all(sock, &buf[..n])?;
                        }
                        drop(fd);
                        transition(d, MigState::Stop)?;
                    }
                    Ok(())
                })();
                // SAFETY: shutdown on a socket that stays open until the scope ends.
                unsafe { libc::shutdown(sock, libc::SHUT_WR) };
                if r.is_err() {
                    abort.trip();
                }
                r
            }));
        }
        for (group, sock) in dst_groups.into_iter().zip(rx.iter().map(|f| f.as_raw_fd())) {
            hs.push(s.spawn(move || -> Result<()> {
                let r = (|| -> Result<()> {
                    let mut buf = vec![0u8; chunk];
                    for (size, fd, d) in group {
                        let mut left = size;
                        while left > 0 {
                            let want = (left as usize).min(chunk);
                            let n = io::read(sock, &mut buf[..want])?;
                            if n == 0 {
                                bail!("peer closed with {left} bytes missing");
                            }
                            io::write_all(fd.as_raw_fd(), &buf[..n])?;
                            left -= n as u64;
                        }
                        drop(fd);
                        transition(d, MigState::Running).context("RESUMING -> RUNNING (stream verification)")?;
                    }
                    Ok(())
                })();
                if r.is_err() {
                    abort.trip();
                }
                r
            }));
        }
        let mut first = None;
        for h in hs {
            if let Err(e) = h.join().unwrap_or_else(|_| Err(anyhow!("thread panicked"))) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    });
    res?;
    let wall = t0.elapsed();
    super::verify_streams(cfgs, &dsts, false)?;
    Ok(Outcome { wall, latency: None })
}

/// Raw loopback TCP, memory to memory: per channel a thread sending `total / C` bytes from one
/// buffer and a thread receiving them into another.
pub fn raw_tcp(total: u64, channels: usize, chunk: usize, abort: &Abort) -> Result<Outcome> {
    let t0 = Instant::now();
    let (tx, rx) = pairs(channels)?;
    abort.set_sockets(tx.iter().chain(rx.iter()).map(|f| f.as_raw_fd()).collect());
    let per = total / channels as u64;
    let res: Result<()> = std::thread::scope(|s| {
        let mut hs = Vec::new();
        for sock in tx.iter().map(|f| f.as_raw_fd()) {
            hs.push(s.spawn(move || -> Result<()> {
                let buf = vec![0x5au8; chunk];
                let mut left = per;
                while left > 0 {
                    let n = (left as usize).min(chunk);
                    io::write_all(sock, &buf[..n])?;
                    left -= n as u64;
                }
                // SAFETY: shutdown on a socket that stays open until the scope ends.
                unsafe { libc::shutdown(sock, libc::SHUT_WR) };
                Ok(())
            }));
        }
        for sock in rx.iter().map(|f| f.as_raw_fd()) {
            hs.push(s.spawn(move || -> Result<()> {
                let mut buf = vec![0u8; chunk];
                let mut got = 0u64;
                loop {
                    let n = io::read(sock, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    got += n as u64;
                }
                if got != per {
                    bail!("received {got} of {per} bytes");
                }
                Ok(())
            }));
        }
        let mut first = None;
        for h in hs {
            if let Err(e) = h.join().unwrap_or_else(|_| Err(anyhow!("thread panicked"))) {
                abort.trip();
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    });
    res?;
    Ok(Outcome { wall: t0.elapsed(), latency: None })
}
