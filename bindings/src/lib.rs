//! VFIO device migration uAPI v2 in safe Rust.
//!
//! * [`state`]: the states, capability flags and the kernel's next-step table.
//! * [`MigrationDevice`]: the one trait the transfer engine talks to, with [`transition`]
//!   (walk one legal arc per `SET`, report where a failure left the device) and [`recover`].
//! * [`vfio`]: a real VFIO device, opened through group + container or handed over as a fd.
//! * [`sim`]: a simulated device that follows the kernel's semantics, for tests and benchmarks.
//!
//! All ioctls live in one private module (`sys`) with a test twin, and their numbers are pinned
//! by tests.
#![deny(missing_docs)]

pub mod device;
pub mod error;
pub mod sim;
pub mod state;
mod sys;
pub mod vfio;

pub use device::{
    bounded_data_size, recover, transition, MigrationDevice, PrecopyInfo, ReadOutcome, Recovery, Transition,
};
pub use error::{Error, Result};
pub use state::{next_step, MigFlags, MigState};
