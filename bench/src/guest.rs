//! `loopback --peer-dma`: the VM around the simulated source devices. A guest thread writes
//! (MMIO) into random pages of random devices and a DMA thread makes random devices write into
//! random peers, at a bounded rate, until the vCPUs are stopped for the switchover.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vfio_migration::sim::SimHandle;

/// Pause between two guest writes (about 1000 a second).
const GUEST_PERIOD: Duration = Duration::from_millis(1);
/// Pause between two P2P DMA writes (about 500 a second).
const DMA_PERIOD: Duration = Duration::from_millis(2);

/// The running guest and DMA threads (none when the run has no fabric).
#[derive(Debug, Default)]
pub struct Vcpus {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// xorshift64*: reproducible page and device choices without a dependency.
fn next(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

impl Vcpus {
    /// No threads: [`Vcpus::stop`] does nothing.
    pub fn none() -> Vcpus {
        Vcpus::default()
    }

    /// Starts the guest thread and (with two devices or more) the DMA thread over `devs`.
    ///
    /// # Errors
    /// Thread creation failures (the threads already started are stopped).
    pub fn start(devs: &[SimHandle]) -> anyhow::Result<Vcpus> {
        let mut v = Vcpus::default();
        if devs.is_empty() {
            return Ok(v);
        }
        let guest = devs.to_vec();
        let stop = Arc::clone(&v.stop);
        let r = std::thread::Builder::new().name("guest-vcpu".into()).spawn(move || {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64;
            while !stop.load(Ordering::Acquire) {
                let d = &guest[(next(&mut rng) % guest.len() as u64) as usize];
                d.guest_write(next(&mut rng));
                std::thread::sleep(GUEST_PERIOD);
            }
        });
        v.push(r)?;
        if devs.len() >= 2 {
            let dma = devs.to_vec();
            let stop = Arc::clone(&v.stop);
            let r = std::thread::Builder::new().name("guest-dma".into()).spawn(move || {
                let mut rng = 0xD1B5_4A32_D192_ED03u64;
                let n = dma.len() as u64;
                while !stop.load(Ordering::Acquire) {
                    let from = (next(&mut rng) % n) as usize;
                    // A peer other than the initiator.
                    let to = (from + 1 + (next(&mut rng) % (n - 1)) as usize) % dma.len();
                    dma[from].dma_write_to(&dma[to], next(&mut rng));
                    std::thread::sleep(DMA_PERIOD);
                }
            });
            v.push(r)?;
        }
        Ok(v)
    }

    fn push(&mut self, r: std::io::Result<JoinHandle<()>>) -> anyhow::Result<()> {
        match r {
            Ok(h) => {
                self.threads.push(h);
                Ok(())
            }
            Err(e) => {
                self.stop();
                Err(anyhow::anyhow!("starting a guest thread: {e}"))
            }
        }
    }

    /// Stops the threads and waits for them: no guest or DMA write happens after this returns.
    /// Idempotent.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}
