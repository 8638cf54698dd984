//! io_uring zero-copy transfer of VFIO device migration state over parallel multifd channels,
//! byte-compatible with QEMU 10.x multifd device-state packets.
//!
//! * [`Source`]: walks each device to STOP_COPY (optionally through PRE_COPY), reads its data
//!   fd into registered buffers with `READ_FIXED` linked to `SEND`/`SEND_ZC` on one of N
//!   channels, and sends its config packet last. One thread and one ring per device.
//! * [`Receiver`]: validates every byte received, reassembles each device's stream by packet
//!   index within a bounded memory budget (it cannot deadlock; see `DESIGN.md`), writes it in
//!   order to the RESUMING data fd, applies the config and moves the device on.
//! * [`wire`]: the QEMU wire format.
//!
//! Without io_uring (seccomp, `kernel.io_uring_disabled`) both sides fall back to a blocking
//! backend with the same semantics, and say why ([`SourceReport::fallback_reason`]).
//!
//! The API is blocking and runtime-free: no global state, no async runtime, and no foreign
//! crate types in signatures. Abort from any thread with an [`AbortHandle`], which is also a
//! pollable fd.
#![deny(missing_docs)]

mod abort;
mod backend;
mod blocking;
mod config;
mod device_io;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod ids;
mod pool;
mod receiver;
mod rp;
mod source;
mod stats;
mod sys;
mod uring;
pub mod wire;

pub use abort::AbortHandle;
pub use config::{
    Backend, ReceiverConfig, SourceConfig, ZeroCopy, MAX_BUFFERS_PER_DEVICE, MAX_CHUNK_BYTES, MAX_DEVICES,
};
pub use error::{BudgetStall, Error, Missing, ProtocolViolation, Result, Stage, StreamLimit};
pub use ids::{ChannelId, DeviceIndex, PacketIndex};
pub use receiver::Receiver;
pub use rp::Verdict;
pub use source::control::{DeviceStatus, SessionEvent, SourcePhase};
pub use source::{DeviceOptions, SessionControl, SessionStatus, Source, SourceSession};
pub use stats::{
    BackendKind, ChannelReport, Latency, LatencySummary, Progress, ReceiverDeviceReport, ReceiverReport,
    SourceDeviceReport, SourceReport,
};
pub use uring::{uring_capabilities, UringCapabilities};
pub use wire::{DeviceId, Uuid};

/// Re-export of the migration uAPI layer the engine talks to.
pub use vfio_migration;

/// The README's Rust examples, compiled as doctests so that they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
