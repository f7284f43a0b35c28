//! The three transports: thin adapters from a [`Session`](super::session::Session) to a wire.

pub mod coalesce;
pub mod poll;
pub mod sse;
pub mod ws;
