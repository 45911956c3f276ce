//! Observe → plan → act against Fly for one `MCPDeployment`.
//!
//! - [`naming`] and [`desired`]: what Fly should look like (pure).
//! - [`policy`]: the controller's allowlists, before any Fly call (pure).
//! - [`ownership`]: whether the app may be changed at all (pure).
//! - [`plan`]: the ordered actions that get it there from what was observed (pure, unit-tested).
//! - [`observe`] and [`act`]: the calls to Fly, through fly-adapter.
//! - [`timing`]: when to look again while converging.

pub mod act;
pub mod desired;
pub mod naming;
pub mod observe;
pub mod ownership;
pub mod plan;
pub mod policy;
pub mod timing;
