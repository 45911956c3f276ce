//! Operating the controller (DESIGN §6): Prometheus metrics, liveness and readiness, and the HTTP server that
//! serves them together with the seal endpoint.
//!
//! - [`metrics`]: the registry and every series; the Fly client reports through [`Metrics`] as its
//!   [`fly_adapter::client::FlyObserver`], reconciles through [`Metrics::reconcile_started`].
//! - [`health`]: what `/readyz` checks (CRD installed, Fly token and org valid, key ring loaded).
//! - [`server`]: `/metrics`, `/healthz`, `/readyz` and `POST /seal` on one listener.

pub mod health;
pub mod metrics;
pub mod server;

pub use health::{Check, Health, KeyringSlot};
pub use metrics::{Metrics, ReconcileTimer};
pub use server::{ServerHandle, serve};
