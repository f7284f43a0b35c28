//! What every quickim role shares.
//!
//! - [`protocol`]: the wire protocol (HTTP API types, service requests, log entries, events).
//! - [`error`]: the stable error codes and [`error::ServiceError`].
//! - [`ids`]: validation of user ids, platforms, conversation ids.
//! - [`bus`]: request/reply and publish/subscribe, over NATS or in-process.
//! - [`rpc`]: typed calls and service dispatch on top of the bus.
//! - [`fanout`]: publishing committed log entries to every gateway.
//! - [`position`]: a position in the log (one offset per partition).
//! - [`config`]: layered configuration (defaults → TOML → `QUICKIM_*` env → flags).
//! - [`telemetry`]: logging/tracing set-up and trace-context propagation.

pub mod bus;
pub mod config;
pub mod error;
pub mod fanout;
pub mod ids;
pub mod online;
pub mod position;
pub mod protocol;
pub mod rpc;
pub mod telemetry;
pub mod time;
