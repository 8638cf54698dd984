//! The blocking device loop of the source: the same packets and channel leasing as the
//! io_uring loop, with plain `read(2)` and `send(2)`. Used where io_uring is unavailable
//! (seccomp, `kernel.io_uring_disabled`) or when forced.
//!
//! One slot per device: read a chunk into the payload, write the header in front of it, lease
//! a channel, send header + payload with one `send(MSG_WAITALL)` loop, release the channel.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::event::EventFd;
use crate::pool::BufferPool;
use crate::source::{DeviceCtx, PrecopyStep, SourceShared, TICK};
use crate::stats::{Latency, SourceDeviceReport};
use crate::wire::{encode_packet_header, VfioPacketHeader, PACKET_OVERHEAD, VFIO_FLAG_CONFIG_STATE};

/// Waits until `fd` is readable or `timeout` passes.
pub(crate) fn poll_in(fds: &[RawFd], timeout: Duration) -> io::Result<bool> {
    let mut p: [libc::pollfd; 2] = [libc::pollfd { fd: -1, events: libc::POLLIN, revents: 0 }; 2];
    for (i, fd) in fds.iter().take(2).enumerate() {
        p[i].fd = *fd;
    }
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `p` is a live array of `fds.len().min(2)` pollfds.
    let r = unsafe { libc::poll(p.as_mut_ptr(), fds.len().min(2) as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}

/// Sends all of `buf` on `fd`, waking every tick to honour abort and the stall timeout.
pub(crate) fn send_all(sh_abort: &crate::AbortHandle, fd: RawFd, mut buf: &[u8], stall: Duration) -> io::Result<()> {
    let mut last = Instant::now();
    while !buf.is_empty() {
        if sh_abort.is_aborted() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "aborted"));
        }
        // SAFETY: `buf` is a live slice; MSG_DONTWAIT keeps the call from blocking past the tick.
        let r = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if r > 0 {
            buf = &buf[r as usize..];
            last = Instant::now();
            continue;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => {
                if last.elapsed() > stall {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "peer stopped reading"));
                }
                let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
                // SAFETY: one live pollfd.
                unsafe { libc::poll(&mut p, 1, TICK.as_millis() as i32) };
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

pub(crate) fn run(
    sh: &SourceShared<'_>,
    ctx: &mut DeviceCtx<'_, '_>,
) -> Result<(SourceDeviceReport, Latency, u64, u64)> {
    let chunk = sh.cfg.chunk_bytes;
    let pool = BufferPool::new(1, PACKET_OVERHEAD, chunk).map_err(|e| Error::sys("mmap buffer pool", e))?;
    let mut report = SourceDeviceReport::empty(ctx.id.clone());
    let mut latency = Latency::new();
    let mut copied = 0u64;
    let mut idx: u32 = 0;
    let waker = sh.leases.waker(ctx.dev_no);
    let abort_fd = sh.abort.as_fd().as_raw_fd();
    loop {
        if sh.abort.is_aborted() {
            return Err(Error::Aborted);
        }
        let t0 = Instant::now();
        // SAFETY: the single slot is only used by this thread, synchronously.
        let buf = unsafe { pool.slot_bytes_mut(0, PACKET_OVERHEAD, chunk) };
        let (hdr, payload) = buf.split_at_mut(PACKET_OVERHEAD);
        let n = if ctx.in_precopy {
            match ctx.precopy_read(payload, sh.cfg.precopy_max_bytes)? {
                PrecopyStep::Data(n) => n,
                PrecopyStep::Switched => continue,
            }
        } else {
            read_some(ctx.data_fd(), payload).map_err(|e| Error::DeviceRead {
                device: ctx.name(),
                offset: report.data_bytes,
                source: e,
            })?
        };
        let (len, flags) = if n == 0 {
            let blob = ctx.config()?;
            if blob.len() > chunk {
                return Err(Error::Config(format!(
                    "config blob of {} bytes exceeds the chunk size {chunk}",
                    blob.len()
                )));
            }
            payload[..blob.len()].copy_from_slice(&blob);
            report.config_bytes = blob.len() as u64;
            (blob.len(), VFIO_FLAG_CONFIG_STATE)
        } else {
            report.data_bytes += n as u64;
            report.packets += 1;
            if n < chunk {
                report.short_reads += 1;
            }
            if report.data_bytes > sh.cfg.max_stream_bytes {
                return Err(Error::DeviceRead {
                    device: ctx.name(),
                    offset: report.data_bytes,
                    source: io::Error::other("stream exceeds the configured maximum"),
                });
            }
            (n, 0)
        };
        encode_packet_header(ctx.id, VfioPacketHeader { idx, flags }, len, hdr)
            .map_err(|e| Error::Config(e.to_string()))?;
        let ch = lease(sh, ctx.dev_no, waker, abort_fd)?;
        let total = PACKET_OVERHEAD + len;
        let res = send_all(&sh.abort, sh.channels[ch], &buf[..total], sh.cfg.stall_timeout);
        match res {
            Ok(()) => sh.leases.release(ch),
            Err(e) => {
                // The channel's framing may be broken mid-packet: never hand it to anyone else.
                if sh.abort.is_aborted() {
                    return Err(Error::Aborted);
                }
                return Err(Error::Channel {
                    channel: ch,
                    op: format!("send packet {idx} of device {}", ctx.name()),
                    source: e,
                });
            }
        }
        sh.counters[ch].add(total as u64);
        sh.progress.add(len as u64);
        copied += total as u64;
        latency.record(t0.elapsed());
        if flags == VFIO_FLAG_CONFIG_STATE {
            report.stop_copy_time = ctx.stop_copy_start.elapsed();
            return Ok((report, latency, 0, copied));
        }
        idx = idx.checked_add(1).ok_or_else(|| Error::Config("more than 2^32-1 packets for one device".into()))?;
    }
}

fn read_some(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    for _ in 0..1000 {
        // SAFETY: `buf` is a live, exclusively borrowed slice of `buf.len()` bytes.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    Err(io::Error::new(io::ErrorKind::Interrupted, "read interrupted 1000 times in a row"))
}

fn lease(sh: &SourceShared<'_>, dev: usize, waker: &EventFd, abort_fd: RawFd) -> Result<usize> {
    let start = Instant::now();
    loop {
        if let Some(ch) = sh.leases.try_lease(dev, true) {
            return Ok(ch);
        }
        if sh.abort.is_aborted() {
            return Err(Error::Aborted);
        }
        if start.elapsed() > sh.cfg.stall_timeout {
            return Err(Error::Timeout { what: "waiting for an idle channel".into(), after: sh.cfg.stall_timeout });
        }
        poll_in(&[waker.as_fd().as_raw_fd(), abort_fd], TICK).map_err(|e| Error::sys("poll", e))?;
        waker.drain();
    }
}
