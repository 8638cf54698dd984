//! Fair leasing of multifd channels to device threads.
//!
//! A stream socket must carry one send at a time: two concurrent sends on one socket can
//! interleave partial writes and corrupt the framing. So a device thread leases an idle
//! channel for exactly one packet and gives it back when the send completes. Waiters are
//! served first-come first-served: a released channel goes straight to the longest-waiting
//! device (through its mailbox, with an eventfd wake-up its ring is already reading), so no
//! device can starve another.

use std::collections::VecDeque;
use std::io;
use std::sync::Mutex;

use crate::ids::{ChannelId, DeviceIndex};
use crate::sys::EventFd;

#[derive(Debug)]
struct Inner {
    idle: VecDeque<ChannelId>,
    waiters: VecDeque<DeviceIndex>,
    waiting: Vec<bool>,
    granted: Vec<VecDeque<ChannelId>>,
}

/// The lease table shared by all device threads of one source.
#[derive(Debug)]
pub(crate) struct ChannelLeases {
    inner: Mutex<Inner>,
    wakers: Vec<EventFd>,
}

impl ChannelLeases {
    /// All `channels` idle, `devices` mailboxes and wakers. Every queue is allocated here at
    /// its final capacity, so leasing never allocates.
    pub(crate) fn new(channels: usize, devices: usize) -> io::Result<ChannelLeases> {
        let wakers = (0..devices).map(|_| EventFd::new()).collect::<io::Result<Vec<_>>>()?;
        let mut idle = VecDeque::with_capacity(channels);
        idle.extend(ChannelId::all(channels));
        Ok(ChannelLeases {
            inner: Mutex::new(Inner {
                idle,
                waiters: VecDeque::with_capacity(devices),
                waiting: vec![false; devices],
                granted: (0..devices).map(|_| VecDeque::with_capacity(channels)).collect(),
            }),
            wakers,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queues inconsistent (every
        // critical section is a few pushes and pops), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes an idle channel if no other device is waiting. With `enqueue`, a device that gets
    /// nothing joins the waiter queue (once) and is woken through its waker when a channel is
    /// granted to it.
    pub(crate) fn try_lease(&self, dev: DeviceIndex, enqueue: bool) -> Option<ChannelId> {
        let mut g = self.lock();
        if let Some(ch) = g.granted[dev.index()].pop_front() {
            return Some(ch);
        }
        if g.waiters.is_empty() {
            if let Some(ch) = g.idle.pop_front() {
                return Some(ch);
            }
        }
        if enqueue && !g.waiting[dev.index()] {
            g.waiting[dev.index()] = true;
            g.waiters.push_back(dev);
        }
        None
    }

    /// Takes a channel granted to `dev` by a release, if any (never an idle one).
    pub(crate) fn take_granted(&self, dev: DeviceIndex) -> Option<ChannelId> {
        self.lock().granted[dev.index()].pop_front()
    }

    /// Returns a channel: to the longest waiter if there is one, else to the idle set.
    pub(crate) fn release(&self, ch: ChannelId) {
        let mut g = self.lock();
        if let Some(dev) = g.waiters.pop_front() {
            g.waiting[dev.index()] = false;
            g.granted[dev.index()].push_back(ch);
            drop(g);
            self.wakers[dev.index()].signal();
        } else {
            g.idle.push_back(ch);
        }
    }

    /// Leaves the waiter queue and returns every channel granted but not taken. Called when a
    /// device thread ends, successfully or not.
    pub(crate) fn withdraw(&self, dev: DeviceIndex) {
        let mut give_back = Vec::new();
        {
            let mut g = self.lock();
            if g.waiting[dev.index()] {
                g.waiting[dev.index()] = false;
                g.waiters.retain(|&d| d != dev);
            }
            give_back.extend(g.granted[dev.index()].drain(..));
        }
        for ch in give_back {
            self.release(ch);
        }
    }

    /// The eventfd that becomes readable when a channel is granted to `dev`.
    pub(crate) fn waker(&self, dev: DeviceIndex) -> &EventFd {
        &self.wakers[dev.index()]
    }

    /// Number of idle channels (for tests and reports).
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.lock().idle.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: usize) -> DeviceIndex {
        DeviceIndex::new(i)
    }

    #[test]
    fn fifo_grants_and_no_queue_jumping() {
        let l = ChannelLeases::new(2, 3).unwrap();
        let a = l.try_lease(d(0), true).unwrap();
        let b = l.try_lease(d(1), true).unwrap();
        assert_eq!(l.try_lease(d(2), true), None);
        assert_eq!(l.try_lease(d(0), true), None);
        // Device 2 waits first, then device 0: releases go in that order.
        l.release(a);
        assert_eq!(l.try_lease(d(1), true), None, "device 1 must not jump the queue");
        assert_eq!(l.try_lease(d(2), false), Some(a));
        l.release(b);
        assert_eq!(l.try_lease(d(0), false), Some(b));
        l.release(a);
        l.release(b);
        // Device 1 was enqueued by its failed attempt above, so it receives the first release.
        assert_eq!(l.try_lease(d(1), false), Some(a));
        assert_eq!(l.idle(), 1);
    }

    #[test]
    fn withdraw_returns_grants() {
        let l = ChannelLeases::new(1, 2).unwrap();
        let ch = l.try_lease(d(0), true).unwrap();
        assert_eq!(l.try_lease(d(1), true), None);
        l.release(ch);
        l.withdraw(d(1));
        assert_eq!(l.idle(), 1);
        assert_eq!(l.try_lease(d(0), false), Some(ch));
    }
}
