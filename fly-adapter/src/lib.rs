//! Fly.io Machines API for mcpfly: a typed client ([`client`]) with rate limiting, retries and leases. Its
//! tests run against the emulator in the `fly-emulator` crate, which this crate never depends on.

pub mod client;
pub mod token_bucket;

pub use client::{FlyClient, FlyClientConfig, FlyError};
