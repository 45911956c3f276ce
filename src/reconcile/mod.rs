//! Observe → plan → act against Fly for one `MCPDeployment`.
//!
//! - [`naming`] and [`desired`]: what Fly should look like (pure).
//! - [`plan`]: the ordered actions that get it there from what was observed (pure, unit-tested).

pub mod desired;
pub mod naming;
pub mod plan;
