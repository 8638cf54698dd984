//! The blocking device loop of the source: the same packets, rules (`core`) and channel
//! leasing as the io_uring loop, with plain `read(2)` and `send(2)` through
//! [`crate::blocking`]. Used where io_uring is unavailable (seccomp, `kernel.io_uring_disabled`)
//! or when forced.
//!
//! One buffer per device: read a chunk into the payload, patch the header in front of it, lease
//! a channel, send header + payload, release the channel.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use crate::backend::TICK;
use crate::blocking::{read_once, send_all, Bounds, Fail};
use crate::error::{Error, Result};
use crate::ids::{ChannelId, PacketIndex};
use crate::pool::BufferPool;
use crate::source::control::Command;
use crate::source::core::{check_config_len, Stream, Tallies};
use crate::source::device::{DeviceCtx, PrecopyStep, ReadMode};
use crate::source::{SourceShared, PRECOPY_POLL};
use crate::sys::{self, Kernel};
use crate::wire::{
    encode_packet_header, patch_packet_header, VfioPacketHeader, PACKET_OVERHEAD, VFIO_FLAG_CONFIG_STATE,
    VFIO_FLAG_INIT_DATA_SENT,
};

/// What the next packet carries.
enum Next {
    /// Nothing now: wait for a command or the next pre-copy poll.
    Wait(std::time::Duration),
    Data(usize),
    Config(usize),
    /// The initial-data marker (return path only).
    Marker,
}

pub(crate) fn run(run: &SourceShared<'_>, ctx: &mut DeviceCtx<'_, '_>) -> Result<Tallies> {
    let chunk = run.cfg.chunk_bytes;
    // One packet: the header, then the payload right behind it, so that one send covers both.
    // The pool gives page-aligned (huge) pages, as the io_uring backend reads into.
    let mut pool = BufferPool::new(1, PACKET_OVERHEAD, chunk).map_err(|e| Error::sys("mmap buffer pool", e))?;
    let skip = pool.header_space() - PACKET_OVERHEAD;
    let Some(slot) = pool.slots_mut().next() else { return Err(Error::internal("a one-slot pool has no slot")) };
    let buf = &mut slot[skip..skip + PACKET_OVERHEAD + chunk];
    let mut tallies = Tallies::new(ctx.id.clone());
    let mut stream = Stream::new(run.cfg.max_stream_bytes);
    encode_packet_header(ctx.id, VfioPacketHeader { idx: 0, flags: 0 }, 0, &mut buf[..PACKET_OVERHEAD])
        .map_err(|e| Error::Config(e.to_string()))?;
    ctx.control.ack(Command::Prepare);
    loop {
        if run.abort.is_aborted() {
            return Err(Error::Aborted);
        }
        ctx.apply_commands()?;
        let t0 = Instant::now();
        let (hdr, payload) = buf.split_at_mut(PACKET_OVERHEAD);
        let idx = stream.reserve().map_err(|limit| Error::StreamLimit { device: ctx.id.clone(), limit })?;
        let next = next_packet(run, ctx, &mut stream, payload, &mut tallies)?;
        let (idx, len, flags) = match next {
            Next::Wait(d) => {
                stream.give_back(idx);
                wait_command(run, ctx, d)?;
                continue;
            }
            Next::Data(n) => {
                stream.account(n).map_err(|limit| Error::StreamLimit { device: ctx.id.clone(), limit })?;
                tallies.read(n, chunk);
                (idx, n, 0)
            }
            Next::Marker => (idx, 0, VFIO_FLAG_INIT_DATA_SENT),
            Next::Config(n) => {
                stream.give_back(idx);
                stream.end();
                let Some(cidx) = stream.config_due(false) else {
                    return Err(Error::internal("config packet not due after the end of stream"));
                };
                (cidx, n, VFIO_FLAG_CONFIG_STATE)
            }
        };
        patch_packet_header(hdr, VfioPacketHeader { idx: idx.get(), flags }, len)
            .map_err(|e| Error::Config(e.to_string()))?;
        let ch = lease(run, ctx)?;
        let bounds = Bounds::new(&run.abort, run.cfg.stall_timeout);
        send_packet(run, ctx, ch, idx, &buf[..PACKET_OVERHEAD + len], bounds)?;
        tallies.sent(run, ch, len, t0, true);
        if flags == VFIO_FLAG_CONFIG_STATE {
            tallies.report.stop_copy_time = ctx.stop_copy_start.elapsed();
            ctx.done();
            return Ok(tallies);
        }
    }
}

/// Reads what the device's phase allows into `payload`: pre-copy data, stream data, or (at
/// the end of the stream) the config blob.
fn next_packet(
    run: &SourceShared<'_>,
    ctx: &mut DeviceCtx<'_, '_>,
    stream: &mut Stream,
    payload: &mut [u8],
    tallies: &mut Tallies,
) -> Result<Next> {
    if ctx.marker_due(run.rp.enabled()) {
        return Ok(Next::Marker);
    }
    match ctx.read_mode() {
        ReadMode::Nothing => Ok(Next::Wait(TICK)),
        ReadMode::PreCopy => match ctx.precopy_read(payload)? {
            PrecopyStep::Data(n) => Ok(Next::Data(n)),
            PrecopyStep::Idle => Ok(Next::Wait(PRECOPY_POLL)),
        },
        ReadMode::Stream => {
            let fd = ctx.data_fd().ok_or_else(|| Error::internal("STOP_COPY without a data fd"))?;
            let bounds = Bounds::new(&run.abort, run.cfg.stall_timeout);
            match read_once(&Kernel, fd, payload, bounds) {
                Ok(0) => {
                    let blob = ctx.config(stream.bytes())?;
                    check_config_len(ctx.id, blob.len(), run.cfg.chunk_bytes).map_err(Error::Config)?;
                    payload[..blob.len()].copy_from_slice(&blob);
                    tallies.report.config_bytes = blob.len() as u64;
                    Ok(Next::Config(blob.len()))
                }
                Ok(n) => {
                    ctx.stop_copy_read(n);
                    Ok(Next::Data(n))
                }
                Err(f) => Err(read_error(ctx, stream, f, run)),
            }
        }
    }
}

/// Waits up to `d` for a command (or abort); an idle device never counts as stalled.
fn wait_command(run: &SourceShared<'_>, ctx: &DeviceCtx<'_, '_>, d: std::time::Duration) -> Result<()> {
    let fds: [BorrowedFd<'_>; 2] = [ctx.control.waker.as_fd(), run.abort.as_fd()];
    sys::wait_readable(&fds, d).map_err(|e| Error::sys("poll", e))?;
    ctx.control.waker.drain();
    Ok(())
}

fn read_error(ctx: &DeviceCtx<'_, '_>, stream: &Stream, f: Fail, run: &SourceShared<'_>) -> Error {
    let source = match f {
        Fail::Aborted => return Error::Aborted,
        Fail::Stalled => {
            return Error::Timeout {
                what: format!("device {}: its data fd gave nothing to read", ctx.id),
                after: run.cfg.stall_timeout,
            }
        }
        Fail::Os(e) => e,
        Fail::Eof { .. } => return Error::internal("a read reported a partial end"),
    };
    Error::DeviceRead { device: ctx.id.clone(), offset: stream.bytes(), source }
}

/// Sends one packet on `ch` and releases the channel, or fails without releasing it: a channel
/// whose framing may be broken mid-packet is never handed to anyone else.
fn send_packet(
    run: &SourceShared<'_>,
    ctx: &DeviceCtx<'_, '_>,
    ch: ChannelId,
    idx: PacketIndex,
    bytes: &[u8],
    bounds: Bounds<'_>,
) -> Result<()> {
    match send_all(&Kernel, run.channels[ch.index()], bytes, bounds) {
        Ok(()) => {
            run.leases.release(ch);
            Ok(())
        }
        Err(Fail::Aborted) => Err(Error::Aborted),
        Err(Fail::Stalled) => Err(Error::Timeout {
            what: format!("channel {ch}: the peer stopped reading during packet {idx} of device {}", ctx.id),
            after: run.cfg.stall_timeout,
        }),
        Err(Fail::Os(e)) => {
            Err(Error::Channel { channel: ch, op: format!("send packet {idx} of device {}", ctx.id), source: e })
        }
        Err(Fail::Eof { .. }) => Err(Error::internal("a send reported an end of stream")),
    }
}

/// Leases a channel, waiting (bounded) for a grant.
fn lease(run: &SourceShared<'_>, ctx: &DeviceCtx<'_, '_>) -> Result<ChannelId> {
    let start = Instant::now();
    let waker = run.leases.waker(ctx.dev_no);
    loop {
        if let Some(ch) = run.leases.try_lease(ctx.dev_no, true) {
            return Ok(ch);
        }
        if run.abort.is_aborted() {
            return Err(Error::Aborted);
        }
        if start.elapsed() > run.cfg.stall_timeout {
            return Err(Error::Timeout {
                what: format!("device {}: waiting for an idle channel", ctx.id),
                after: run.cfg.stall_timeout,
            });
        }
        let fds: [BorrowedFd<'_>; 2] = [waker.as_fd(), run.abort.as_fd()];
        sys::wait_readable(&fds, TICK).map_err(|e| Error::sys("poll", e))?;
        waker.drain();
    }
}
