//! The wire protocol: serde types only, no behaviour.
//!
//! - [`api`]: the public and /inner HTTP API (requests, answers, the envelope).
//! - [`service`]: requests between the gateway and the services over the bus.
//! - [`event`]: log entries fanned out to gateways, and /notify events sent to clients.
//! - [`system`]: the content of system messages (negative `type`).

pub mod api;
pub mod event;
pub mod service;
pub mod system;
