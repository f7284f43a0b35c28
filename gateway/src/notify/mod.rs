//! /notify: realtime delivery over WebSocket, SSE and long-poll.
//!
//! - `registry.rs`: the open connections of this node, by user.

pub mod registry;
