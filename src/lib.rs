//! mcpfly: a Kubernetes controller that reconciles `MCPDeployment` resources into Fly.io apps and machines.
//!
//! The binary's subcommands live in `main.rs`; everything they call is a module here so that integration tests
//! exercise the same code.

pub mod api;
pub mod bridge;
pub mod controller;
/// The local harness (the demo, the local control plane): only with the `demo` feature, never in the images.
#[cfg(feature = "demo")]
pub mod demo;
/// The runtime image's default server (`mcpfly example-server`), so it is outside the `demo` feature.
#[path = "demo/example_server.rs"]
pub mod example_server;
#[cfg(feature = "demo")]
pub mod local_cluster;
pub mod packages;
pub mod reconcile;
pub mod sealing;
pub mod telemetry;
