//! The HTTP API through the real binary: standalone (SQLite) and distributed (NATS +
//! PostgreSQL), every route, every class of bad input, start-up checks.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod abuse;
mod bad_input;
mod chat_state;
mod distributed;
mod docs;
mod fuzz_corpus;
mod hooks;
mod nats_security;
mod outage;
mod receiver;
mod routes;
mod schema;
mod sends;
mod startup;
mod webhooks;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_quickim");
