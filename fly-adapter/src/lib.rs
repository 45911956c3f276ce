//! Fly.io Machines API for mcpfly: a typed client ([`client`]) with rate limiting, retries and leases,
//! and an emulator ([`emulator`]) faithful to the facts in `reference/fly-machines-api.md` §10, so
//! the controller's tests and benchmarks run against something that behaves like Fly.

pub mod client;
pub mod emulator;
pub mod token_bucket;

pub use client::{FlyClient, FlyClientConfig, FlyError};
pub use emulator::{Emulator, EmulatorConfig, EmulatorHandle};
