//! Why a /notify connection closes: one table of reasons, WebSocket close codes and the
//! reconnect policy each implies (docs/protocol.md repeats it for client authors).

use std::sync::Arc;

use super::event::Encoded;

/// What a client should do after a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Reconnect now (to any node) with the last cursor.
    Now,
    /// Reconnect with the last cursor after a backoff (1 s, doubling, up to 30 s).
    Backoff,
    /// Get a new token from your backend first.
    NewToken,
    /// Do not reconnect with this token.
    Never,
}

/// Why the server closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The node is shutting down.
    Shutdown,
    /// /inner/kick_user: the user's tokens issued so far are revoked.
    Kicked,
    /// The token expired.
    TokenExpired,
    /// The client did not read fast enough; its queue was full.
    SlowConsumer,
    /// The client stopped answering pings.
    PingTimeout,
    /// The client sent a frame over `ws_max_frame_bytes`.
    FrameTooLarge,
    /// The client sent frames faster than allowed for too long.
    RateLimited,
    /// The server could not serve the connection (a dependency failed).
    Unavailable,
    /// This node fell too far behind the log to deliver in time; another node serves.
    NodeBehind,
}

impl Disconnect {
    /// Every reason, for documentation tests.
    pub const ALL: [Disconnect; 9] = [
        Disconnect::Shutdown,
        Disconnect::Kicked,
        Disconnect::TokenExpired,
        Disconnect::SlowConsumer,
        Disconnect::PingTimeout,
        Disconnect::FrameTooLarge,
        Disconnect::RateLimited,
        Disconnect::Unavailable,
        Disconnect::NodeBehind,
    ];

    /// WebSocket close code.
    pub const fn ws_code(self) -> u16 {
        match self {
            Disconnect::Shutdown => 1001,
            Disconnect::FrameTooLarge => 1009,
            Disconnect::Unavailable => 1013,
            Disconnect::Kicked => 4000,
            Disconnect::TokenExpired => 4001,
            Disconnect::PingTimeout => 4002,
            Disconnect::SlowConsumer => 4008,
            Disconnect::NodeBehind => 4009,
            Disconnect::RateLimited => 4029,
        }
    }

    /// Stable reason text (WebSocket close reason, logs, metrics).
    pub const fn reason(self) -> &'static str {
        match self {
            Disconnect::Shutdown => "shutdown",
            Disconnect::Kicked => "kicked",
            Disconnect::TokenExpired => "token_expired",
            Disconnect::SlowConsumer => "slow_consumer",
            Disconnect::PingTimeout => "ping_timeout",
            Disconnect::FrameTooLarge => "frame_too_large",
            Disconnect::RateLimited => "rate_limited",
            Disconnect::Unavailable => "unavailable",
            Disconnect::NodeBehind => "node_behind",
        }
    }

    /// What the client should do.
    pub const fn reconnect(self) -> Reconnect {
        match self {
            Disconnect::Shutdown | Disconnect::SlowConsumer | Disconnect::PingTimeout | Disconnect::NodeBehind => {
                Reconnect::Now
            }
            Disconnect::FrameTooLarge | Disconnect::RateLimited | Disconnect::Unavailable => Reconnect::Backoff,
            Disconnect::TokenExpired => Reconnect::NewToken,
            Disconnect::Kicked => Reconnect::Never,
        }
    }

    /// The event sent before closing, on every protocol, if any.
    pub fn final_event(self) -> Option<Arc<Encoded>> {
        (self == Disconnect::Kicked).then(Encoded::kicked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_md_documents_every_close() {
        let doc = include_str!("../../../docs/protocol.md");
        for d in Disconnect::ALL {
            assert!(doc.contains(&format!("`{}`", d.reason())), "docs/protocol.md lacks {}", d.reason());
            assert!(doc.contains(&format!("| {} ", d.ws_code())), "docs/protocol.md lacks code {}", d.ws_code());
        }
    }

    #[test]
    fn codes_are_distinct_and_in_the_allowed_ranges() {
        let mut seen = std::collections::HashSet::new();
        for d in Disconnect::ALL {
            assert!(seen.insert(d.ws_code()));
            let c = d.ws_code();
            assert!((1000..=1014).contains(&c) || (4000..=4999).contains(&c));
        }
    }
}
