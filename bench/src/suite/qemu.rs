//! A QEMU-10-style multifd device-state transfer, written from
//! `qemu-multifd-device-state.md` §2.4-2.5 and §4-5, on the real QEMU wire format.
//!
//! Source: one thread per device `read()`s the data fd into its packet buffer, copies the packet
//! into a freshly allocated buffer (`g_memdup2` in `multifd_queue_device_state()`), and hands
//! it to `multifd_send()`: under one global mutex, wait on the `channels_ready` semaphore, pick
//! the next channel without a pending job (round robin), give it the packet and post its
//! semaphore. Channel threads `writev()` the 276-byte header and the payload, free the payload
//! and post `channels_ready` again (at most one job per channel).
//!
//! Destination: one thread per channel reads the header, `g_malloc()`s the payload and reads
//! it, then copies it into the device's reassembly array (`g_memdup2` in
//! `vfio_load_state_buffer_insert()`), frees its buffer and signals the device's load thread.
//! One load thread per device writes the buffers in index order (`write()`, partial writes
//! continued), then applies the config packet.

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vfio_migration::sim::{SimConfig, SimDevice};
use vfio_migration::{transition, MigState, MigrationDevice};
use vfio_multifd::wire::{
    DeviceStateHeader, InitPacket, VfioPacketHeader, DEVICE_STATE_HEADER_LEN, INIT_PACKET_LEN, VFIO_FLAG_CONFIG_STATE,
    VFIO_HEADER_LEN,
};
use vfio_multifd::DeviceId;
use vfio_multifd::Latency;

use super::{io, Abort, Outcome};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A counting semaphore (`QemuSemaphore`).
struct Sem {
    n: Mutex<usize>,
    cv: Condvar,
}

impl Sem {
    fn new(n: usize) -> Sem {
        Sem { n: Mutex::new(n), cv: Condvar::new() }
    }
    fn post(&self) {
        *lock(&self.n) += 1;
        self.cv.notify_one();
    }
    fn wait(&self, abort: &Abort) -> Result<()> {
        let mut g = lock(&self.n);
        while *g == 0 {
            abort.check()?;
            g = self.cv.wait_timeout(g, Duration::from_millis(50)).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
        }
        *g -= 1;
        Ok(())
    }
}

/// `MultiFDSendData` for a device-state payload: idstr, instance and the duplicated packet.
struct SendData {
    id: DeviceId,
    buf: Vec<u8>,
    t_read: Instant,
}

/// One channel's job slot (`p->pending_job`, `p->data`, `p->sem`).
struct ChanSlot {
    data: Option<SendData>,
    pending_job: bool,
    quit: bool,
}

pub(super) struct SendState {
    /// `multifd_send_mutex` (also holds `next_channel`).
    send_mutex: Mutex<usize>,
    /// `queue_job_mutex` of `multifd_queue_device_state()`.
    queue_job_mutex: Mutex<()>,
    channels_ready: Sem,
    slots: Vec<(Mutex<ChanSlot>, Condvar)>,
}

impl SendState {
    pub(super) fn new(channels: usize) -> SendState {
        SendState {
            send_mutex: Mutex::new(0),
            queue_job_mutex: Mutex::new(()),
            channels_ready: Sem::new(0),
            slots: (0..channels)
                .map(|_| (Mutex::new(ChanSlot { data: None, pending_job: false, quit: false }), Condvar::new()))
                .collect(),
        }
    }

    /// Every device thread is done: channel threads finish their job and return.
    pub(super) fn quit(&self) {
        for (m, cv) in &self.slots {
            lock(m).quit = true;
            cv.notify_all();
        }
    }

    /// `multifd_queue_device_state()` + `multifd_send()`.
    fn queue(&self, id: &DeviceId, packet: &[u8], t_read: Instant, abort: &Abort) -> Result<()> {
        let _q = lock(&self.queue_job_mutex);
        // g_strdup(idstr) + g_memdup2(data, len): the copy every packet pays.
        let data = SendData { id: id.clone(), buf: packet.to_vec(), t_read };
        let mut next = lock(&self.send_mutex);
        self.channels_ready.wait(abort)?;
        let n = self.slots.len();
        let mut i = *next % n;
        loop {
            let (m, cv) = &self.slots[i];
            let mut s = lock(m);
            if !s.pending_job {
                s.data = Some(data);
                s.pending_job = true;
                cv.notify_one();
                break;
            }
            drop(s);
            i = (i + 1) % n;
        }
        *next = (i + 1) % n;
        Ok(())
    }
}

/// `VFIOStateBuffers` + the load-thread bookkeeping of `VFIOMultifd`, under `load_bufs_mutex`.
struct LoadBufs {
    /// `(is_present, data)` per index.
    array: Vec<(bool, Option<Vec<u8>>)>,
    load_buf_idx: u32,
    load_buf_idx_last: u32,
}

pub(super) struct DevLoad {
    m: Mutex<LoadBufs>,
    ready: Condvar,
}

impl DevLoad {
    pub(super) fn new() -> DevLoad {
        DevLoad {
            m: Mutex::new(LoadBufs { array: Vec::new(), load_buf_idx: 0, load_buf_idx_last: u32::MAX }),
            ready: Condvar::new(),
        }
    }
}

/// `writev()` of header + payload, continued after partial writes.
fn writev_all(fd: RawFd, hdr: &[u8], payload: &[u8]) -> std::io::Result<()> {
    let total = hdr.len() + payload.len();
    let mut done = 0usize;
    while done < total {
        let n = if done < hdr.len() {
            io::writev2(fd, &hdr[done..], payload)?
        } else {
            io::write(fd, &payload[done - hdr.len()..])?
        };
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "writev returned 0"));
        }
        done += n;
    }
    Ok(())
}

/// Runs one transfer of `cfgs` over `channels` loopback channels with `chunk`-byte packets.
pub fn run(cfgs: &[SimConfig], channels: usize, chunk: usize, abort: &Abort) -> Result<Outcome> {
    let mut srcs: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
    let mut dsts: Vec<SimDevice> = cfgs.iter().cloned().map(SimDevice::new).collect();
    let ids: Vec<DeviceId> = (0..cfgs.len()).map(|i| crate::cli::device_id(i, &[], &[])).collect::<Result<_>>()?;
    let t0 = Instant::now();
    // Channels: connect, and the init packet (MultiFDInit_t) first on each.
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let mut tx: Vec<OwnedFd> = Vec::new();
    let mut rx_unordered: Vec<TcpStream> = Vec::new();
    for c in 0..channels {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let mut init = [0u8; INIT_PACKET_LEN];
        InitPacket { uuid: [0; 16], id: c as u8, offer: 0, devices: 0 }.encode(&mut init)?;
        io::write_all(s.as_raw_fd(), &init)?;
        tx.push(s.into());
        let (r, _) = l.accept()?;
        r.set_nodelay(true)?;
        rx_unordered.push(r);
    }
    let mut rx: Vec<Option<OwnedFd>> = (0..channels).map(|_| None).collect();
    for r in rx_unordered {
        let mut init = [0u8; INIT_PACKET_LEN];
        io::read_exact(r.as_raw_fd(), &mut init)?.then_some(()).ok_or_else(|| anyhow!("EOF in init packet"))?;
        let p = InitPacket::decode(&init, channels, &[0; 16])?;
        rx[usize::from(p.id)] = Some(r.into());
    }
    let rx: Vec<OwnedFd> =
        rx.into_iter().map(|r| r.ok_or_else(|| anyhow!("missing channel"))).collect::<Result<_>>()?;
    abort.set_sockets(tx.iter().chain(rx.iter()).map(|f| f.as_raw_fd()).collect());

    // Destination: vfio_load_setup() puts every device into RESUMING.
    let mut dst_fds = Vec::new();
    for d in dsts.iter_mut() {
        let t = transition(d, MigState::Resuming).context("destination to RESUMING")?;
        dst_fds.push(t.data_fd.ok_or_else(|| anyhow!("no resume fd"))?);
    }
    let loads: Vec<DevLoad> = (0..cfgs.len()).map(|_| DevLoad::new()).collect();
    let send = SendState::new(channels);
    let devices_done = AtomicBool::new(false);

    let result: Result<Vec<Latency>> = std::thread::scope(|s| {
        // ---- destination: recv threads (one per channel)
        let mut recv_h = Vec::new();
        for fd in rx.iter().map(|f| f.as_raw_fd()) {
            let (ids, loads) = (&ids, &loads);
            recv_h.push(s.spawn(move || -> Result<()> {
                let r = recv_channel(fd, ids, loads);
                if r.is_err() {
                    abort.trip();
                }
                r
            }));
        }
        // ---- destination: load threads (one per device)
        let mut load_h = Vec::new();
        for ((d, fd), l) in dsts.iter_mut().zip(dst_fds.drain(..)).zip(loads.iter()) {
            load_h.push(s.spawn(move || -> Result<()> {
                let r = load_thread(d, fd, l, abort);
                if r.is_err() {
                    abort.trip();
                }
                r
            }));
        }
        // ---- source: channel threads
        let mut chan_h = Vec::new();
        for (c, fd) in tx.iter().map(|f| f.as_raw_fd()).enumerate() {
            let send = &send;
            chan_h.push(s.spawn(move || -> Result<Latency> {
                let r = channel_thread(c, fd, send, abort);
                if r.is_err() {
                    abort.trip();
                }
                // SAFETY: shutdown on a socket fd that stays open until the scope ends.
                unsafe { libc::shutdown(fd, libc::SHUT_WR) };
                r
            }));
        }
        // ---- source: device save threads
        let mut dev_h = Vec::new();
        for (d, id) in srcs.iter_mut().zip(ids.iter()) {
            let send = &send;
            dev_h.push(s.spawn(move || -> Result<()> {
                let r = save_thread(d, id, chunk, send, abort);
                if r.is_err() {
                    abort.trip();
                }
                r
            }));
        }
        let mut errs: Vec<anyhow::Error> = Vec::new();
        let keep = |errs: &mut Vec<anyhow::Error>, r: std::thread::Result<Result<()>>| {
            if let Err(e) = r.unwrap_or_else(|_| Err(anyhow!("thread panicked"))) {
                errs.push(e);
            }
        };
        for h in dev_h {
            keep(&mut errs, h.join());
        }
        devices_done.store(true, Ordering::Release);
        send.quit();
        let mut hists = Vec::new();
        for h in chan_h {
            match h.join().unwrap_or_else(|_| Err(anyhow!("channel thread panicked"))) {
                Ok(hh) => hists.push(hh),
                Err(e) => errs.push(e),
            }
        }
        for h in recv_h {
            keep(&mut errs, h.join());
        }
        for h in load_h {
            keep(&mut errs, h.join());
        }
        // The root cause, not the "aborted" echoes it caused in other threads.
        let root = errs.iter().position(|e| !e.to_string().starts_with("aborted")).unwrap_or(0);
        if errs.is_empty() {
            Ok(hists)
        } else {
            Err(errs.swap_remove(root))
        }
    });
    let hists = result?;
    let wall = t0.elapsed();
    drop(tx);
    drop(rx);
    let mut h = Latency::new();
    for x in &hists {
        h.merge(x);
    }
    super::verify_streams(cfgs, &dsts, true)?;
    Ok(Outcome { wall, latency: Some(h.summary()) })
}

/// `vfio_multifd_save_complete_precopy_thread()`.
fn save_thread(d: &mut SimDevice, id: &DeviceId, chunk: usize, send: &SendState, abort: &Abort) -> Result<()> {
    let t = transition(d, MigState::StopCopy).context("source to STOP_COPY")?;
    let fd = t.data_fd.ok_or_else(|| anyhow!("no save fd"))?;
    save_stream(fd.as_raw_fd(), id, chunk, || Ok(d.save_config()?), send, abort)?;
    drop(fd);
    // STOP_COPY -> STOP (vfio_save_cleanup()).
    transition(d, MigState::Stop)?;
    Ok(())
}

/// The loop of `vfio_multifd_save_complete_precopy_thread()`: reads `fd` until EOF into one
/// reused packet buffer, queues every packet (copied), then the config packet from `config`.
pub(super) fn save_stream(
    fd: RawFd,
    id: &DeviceId,
    chunk: usize,
    config: impl FnOnce() -> Result<Vec<u8>>,
    send: &SendState,
    abort: &Abort,
) -> Result<()> {
    // packet = g_malloc0(12 + data_buffer_size), reused for every read.
    let mut packet = vec![0u8; VFIO_HEADER_LEN + chunk];
    let mut idx = 0u32;
    loop {
        abort.check()?;
        let t_read = Instant::now();
        let n = io::read(fd, &mut packet[VFIO_HEADER_LEN..]).context("reading state buffer")?;
        if n == 0 {
            break;
        }
        VfioPacketHeader { idx, flags: 0 }.encode(&mut packet[..VFIO_HEADER_LEN])?;
        send.queue(id, &packet[..VFIO_HEADER_LEN + n], t_read, abort)?;
        idx += 1;
    }
    // The config packet: idx = number of data packets, CONFIG_STATE.
    let blob = config()?;
    let mut cp = vec![0u8; VFIO_HEADER_LEN + blob.len()];
    VfioPacketHeader { idx, flags: VFIO_FLAG_CONFIG_STATE }.encode(&mut cp[..VFIO_HEADER_LEN])?;
    cp[VFIO_HEADER_LEN..].copy_from_slice(&blob);
    send.queue(id, &cp, Instant::now(), abort)
}

/// `multifd_send_thread()` for device-state jobs.
pub(super) fn channel_thread(_c: usize, fd: RawFd, send: &SendState, abort: &Abort) -> Result<Latency> {
    let mut hist = Latency::new();
    let mut hdr = [0u8; DEVICE_STATE_HEADER_LEN];
    let (m, cv) = &send.slots[_c];
    send.channels_ready.post();
    loop {
        let data = {
            let mut s = lock(m);
            loop {
                if let Some(d) = s.data.take() {
                    break Some(d);
                }
                if s.quit {
                    break None;
                }
                abort.check()?;
                s = cv.wait_timeout(s, Duration::from_millis(50)).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
            }
        };
        let Some(data) = data else { return Ok(hist) };
        DeviceStateHeader::encode(&data.id, data.buf.len() as u32, &mut hdr)?;
        writev_all(fd, &hdr, &data.buf).context("writev to the channel")?;
        hist.record(data.t_read.elapsed());
        drop(data); // multifd_send_data_clear(): the payload is freed at once.
        lock(m).pending_job = false;
        send.channels_ready.post();
    }
}

/// `multifd_recv_thread()` + `multifd_device_state_recv()` + `vfio_multifd_load_state_buffer()`.
pub(super) fn recv_channel(fd: RawFd, ids: &[DeviceId], loads: &[DevLoad]) -> Result<()> {
    let mut hdr = [0u8; DEVICE_STATE_HEADER_LEN];
    loop {
        if !io::read_exact(fd, &mut hdr)? {
            return Ok(()); // the peer closed at a packet boundary
        }
        let h = DeviceStateHeader::decode(&hdr, u32::MAX)?;
        let len = h.next_packet_size as usize;
        // g_malloc(next_packet_size) + qio_channel_read_all().
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        // SAFETY: the read target is the vector's spare capacity of `len` bytes; `read_exact_raw`
        // writes at most `len` bytes there and reports whether all of them were filled.
        let full = unsafe { io::read_exact_raw(fd, buf.as_mut_ptr(), len)? };
        if !full {
            bail!("peer closed in the middle of a packet");
        }
        // SAFETY: all `len` bytes were initialised by the read above.
        unsafe { buf.set_len(len) };
        let dev =
            ids.iter().position(|id| id.matches(&h)).ok_or_else(|| anyhow!("unknown device {}", h.idstr_lossy()))?;
        let v = VfioPacketHeader::decode(&buf)?;
        let l = &loads[dev];
        let mut g = lock(&l.m);
        if v.flags & VFIO_FLAG_CONFIG_STATE != 0 {
            g.load_buf_idx_last = v.idx;
        }
        let i = v.idx as usize;
        if g.array.len() <= i {
            g.array.resize_with(i + 1, || (false, None));
        }
        if g.array[i].0 {
            bail!("state buffer {i} already filled");
        }
        // g_memdup2(packet->data, data_size - 12): the second copy on this side.
        g.array[i] = (true, Some(buf[VFIO_HEADER_LEN..].to_vec()));
        drop(g);
        l.ready.notify_all();
        drop(buf);
    }
}

/// `vfio_load_bufs_thread()`.
fn load_thread(d: &mut SimDevice, fd: OwnedFd, l: &DevLoad, abort: &Abort) -> Result<()> {
    let blob = load_stream(fd.as_raw_fd(), l, abort)?;
    d.load_config(&blob)?;
    drop(fd);
    transition(d, MigState::Running).context("destination RESUMING -> RUNNING (stream verification)")?;
    Ok(())
}

/// The loop of `vfio_load_bufs_thread()`: writes the buffers to `fd` in index order as they
/// arrive; returns the config packet's blob.
pub(super) fn load_stream(fd: RawFd, l: &DevLoad, abort: &Abort) -> Result<Vec<u8>> {
    let mut g = lock(&l.m);
    loop {
        abort.check()?;
        let idx = g.load_buf_idx as usize;
        let present = g.array.get(idx).is_some_and(|b| b.0);
        if !present {
            g = l.ready.wait_timeout(g, Duration::from_millis(50)).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
            continue;
        }
        if g.load_buf_idx == g.load_buf_idx_last {
            break;
        }
        let buf = g.array[idx].1.take().unwrap_or_default();
        drop(g);
        io::write_all(fd, &buf).with_context(|| format!("writing state buffer {idx}"))?;
        drop(buf);
        g = lock(&l.m);
        g.load_buf_idx += 1;
    }
    let idx = g.load_buf_idx as usize;
    Ok(g.array[idx].1.take().unwrap_or_default())
}
