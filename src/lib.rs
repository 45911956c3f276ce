//! mcpfly: a Kubernetes controller that reconciles `MCPDeployment` resources into Fly.io apps and machines.
//!
//! The binary's subcommands live in `main.rs`; everything they call is a module here so that integration tests
//! exercise the same code.

pub mod api;
pub mod bridge;
pub mod controller;
pub mod demo;
pub mod local_cluster;
pub mod packages;
pub mod reconcile;
pub mod sealing;
pub mod telemetry;
