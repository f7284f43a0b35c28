//! The bus: request/reply and publish/subscribe between quickim roles.
//!
//! One handle, [`Bus`], two backends:
//! - [`local`]: in-process, for `quickim standalone` (bounded channels, no network);
//! - [`nats`]: NATS core, for the distributed roles.
//!
//! Both carry headers (the W3C trace context travels in them) and follow NATS semantics:
//! subjects are dot-separated tokens, `*` matches one token, `>` the rest; a queue group
//! delivers each message to one member; publish is at-most-once (a full subscriber drops),
//! so every consumer of published data must detect and repair gaps (the /notify hub does).

pub mod local;
pub mod nats;
pub mod size;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::oneshot;

/// Message headers, in order (small: trace context and a few flags).
pub type Headers = Vec<(String, String)>;

/// Why a bus operation failed, by kind (the gateway maps these to HTTP: 503 / 504).
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// Nobody listens on the subject (service not running).
    #[error("no responders on {0}")]
    NoResponders(String),
    /// The responder did not answer in time.
    #[error("request on {0} timed out")]
    TimedOut(String),
    /// The bus is closed or disconnected.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The message is larger than the bus carries (NATS: the server's `max_payload`).
    #[error("a message of {size} bytes on {subject} is over the bus's limit of {max}")]
    TooLarge {
        /// Where it was going.
        subject: String,
        /// Its size (payload and headers).
        size: usize,
        /// The limit.
        max: usize,
    },
}

/// The answer to a request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Headers of the answer.
    pub headers: Headers,
    /// Body of the answer.
    pub payload: Bytes,
}

/// A message received on a subscription.
pub struct Incoming {
    /// The concrete subject it was sent to.
    pub subject: String,
    /// Its headers.
    pub headers: Headers,
    /// Its body.
    pub payload: Bytes,
    reply: Option<ReplyTo>,
}

enum ReplyTo {
    /// The requester's channel, and the bus's largest message.
    Local(oneshot::Sender<Reply>, usize),
    Nats {
        client: async_nats::Client,
        subject: async_nats::Subject,
    },
}

impl Incoming {
    /// Whether the sender waits for an answer.
    pub fn expects_reply(&self) -> bool {
        self.reply.is_some()
    }

    /// The largest answer the bus carries back (payload and headers).
    pub fn max_payload(&self) -> usize {
        match &self.reply {
            Some(ReplyTo::Local(_, max)) => *max,
            Some(ReplyTo::Nats { client, .. }) => client.max_payload(),
            None => usize::MAX,
        }
    }

    /// Answers a request (a no-op for a plain publish).
    pub async fn respond(self, headers: Headers, payload: Bytes) -> Result<(), BusError> {
        match self.reply {
            None => Ok(()),
            Some(ReplyTo::Local(tx, max)) => {
                let size = nats::wire_len(&headers, payload.len());
                if size > max {
                    return Err(BusError::TooLarge { subject: "(reply)".into(), size, max });
                }
                // The requester may have timed out and gone: that is not our failure.
                let _ = tx.send(Reply { headers, payload });
                Ok(())
            }
            Some(ReplyTo::Nats { client, subject }) => nats::publish(&client, subject, &headers, payload).await,
        }
    }
}

/// A stream of incoming messages; dropping it unsubscribes.
pub type Subscription = BoxStream<'static, Incoming>;

/// Cheap `Clone` handle to a bus backend.
#[derive(Clone)]
pub struct Bus {
    backend: Arc<Backend>,
    /// Put before every subject (`prod.` for `prod.quickim.msg.send`), so that several
    /// deployments share one NATS; empty for none.
    prefix: Arc<str>,
}

enum Backend {
    Local(local::LocalBus),
    Nats(nats::NatsBus),
}

impl Bus {
    /// An in-process bus; each subscription buffers at most `capacity` messages, and a
    /// message holds at most [`local::MAX_PAYLOAD`] bytes.
    pub fn local(capacity: usize) -> Bus {
        Self::local_with_max_payload(capacity, local::MAX_PAYLOAD)
    }

    /// An in-process bus whose messages hold at most `max_payload` bytes (as a NATS server's
    /// `max_payload`; for tests of paging).
    pub fn local_with_max_payload(capacity: usize, max_payload: usize) -> Bus {
        Bus { backend: Arc::new(Backend::Local(local::LocalBus::new(capacity, max_payload))), prefix: Arc::from("") }
    }

    /// The largest message the bus carries now, payload and headers (NATS: the `max_payload`
    /// of the server connected to, from its INFO).
    pub fn max_payload(&self) -> usize {
        match &*self.backend {
            Backend::Local(b) => b.max_payload(),
            Backend::Nats(b) => b.max_payload(),
        }
    }

    /// The bytes of JSON a page may hold: [`Bus::max_payload`] less [`size::HEADROOM`] for
    /// headers and the envelope around the page.
    pub fn payload_budget(&self) -> usize {
        self.max_payload().saturating_sub(size::HEADROOM).max(1024)
    }

    /// Connects to NATS at `url` (retries in the background after the first connection).
    pub async fn connect_nats(url: &str, name: &str) -> Result<Bus, BusError> {
        Self::connect_nats_with(
            &nats::NatsOptions { url: url.to_string(), name: name.to_string(), ..Default::default() },
            "",
        )
        .await
    }

    /// Connects to NATS with `options` (credentials, TLS); every subject is put behind
    /// `subject_prefix` (empty: none).
    pub async fn connect_nats_with(options: &nats::NatsOptions, subject_prefix: &str) -> Result<Bus, BusError> {
        let mut options = options.clone();
        if !subject_prefix.is_empty() && options.inbox_prefix.is_none() {
            options.inbox_prefix = Some(format!("{subject_prefix}._INBOX"));
        }
        let bus = nats::NatsBus::connect(&options).await?;
        let prefix = if subject_prefix.is_empty() { String::new() } else { format!("{subject_prefix}.") };
        Ok(Bus { backend: Arc::new(Backend::Nats(bus)), prefix: Arc::from(prefix) })
    }

    /// `subject` behind the prefix.
    fn outgoing<'a>(&self, subject: &'a str) -> std::borrow::Cow<'a, str> {
        if self.prefix.is_empty() {
            std::borrow::Cow::Borrowed(subject)
        } else {
            std::borrow::Cow::Owned(format!("{}{subject}", self.prefix))
        }
    }

    /// Sends a request and waits up to `timeout` for the answer.
    pub async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Reply, BusError> {
        let subject = self.outgoing(subject);
        match &*self.backend {
            Backend::Local(b) => b.request(&subject, headers, payload, timeout).await,
            Backend::Nats(b) => b.request(&subject, headers, payload, timeout).await,
        }
    }

    /// Publishes to every subscriber (one per queue group); at-most-once.
    pub async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<(), BusError> {
        let subject = self.outgoing(subject);
        match &*self.backend {
            Backend::Local(b) => b.publish(&subject, headers, payload),
            Backend::Nats(b) => b.publish(&subject, headers, payload).await,
        }
    }

    /// Subscribes to `subject` (wildcards allowed), optionally in a queue group.
    pub async fn subscribe(&self, subject: &str, queue: Option<&str>) -> Result<Subscription, BusError> {
        let sub = match &*self.backend {
            Backend::Local(b) => b.subscribe(&self.outgoing(subject), queue),
            Backend::Nats(b) => b.subscribe(&self.outgoing(subject), queue).await?,
        };
        if self.prefix.is_empty() {
            return Ok(sub);
        }
        // Handlers see the subjects without the prefix.
        let prefix = self.prefix.clone();
        Ok(sub
            .map(move |mut m| {
                if let Some(rest) = m.subject.strip_prefix(&*prefix) {
                    m.subject = rest.to_string();
                }
                m
            })
            .boxed())
    }

    /// Sends a request to every subscriber (no queue groups) and gathers the answers that
    /// arrive within `timeout`, stopping early once `expect` answers are in.
    pub async fn gather(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
        expect: usize,
    ) -> Result<Vec<Reply>, BusError> {
        let subject = self.outgoing(subject);
        match &*self.backend {
            Backend::Local(b) => b.gather(&subject, headers, payload, timeout, expect).await,
            Backend::Nats(b) => b.gather(&subject, headers, payload, timeout, expect).await,
        }
    }

    /// Waits until everything published so far has left this process.
    pub async fn flush(&self) -> Result<(), BusError> {
        match &*self.backend {
            Backend::Local(_) => Ok(()),
            Backend::Nats(b) => b.flush().await,
        }
    }

    /// Whether this is the in-process bus (standalone), where a request costs no more than a
    /// few channel hand-overs.
    pub fn is_local(&self) -> bool {
        matches!(&*self.backend, Backend::Local(_))
    }

    /// Whether the bus can carry messages right now (for /readyz).
    pub fn is_connected(&self) -> bool {
        match &*self.backend {
            Backend::Local(_) => true,
            Backend::Nats(b) => b.is_connected(),
        }
    }

    /// Stops every subscription after delivering what is in flight (graceful shutdown).
    pub async fn drain(&self) {
        match &*self.backend {
            Backend::Local(b) => b.close(),
            Backend::Nats(b) => b.drain().await,
        }
    }

    /// Messages dropped because a subscriber was full (in-process bus only; NATS counts its own).
    pub fn dropped(&self) -> u64 {
        match &*self.backend {
            Backend::Local(b) => b.dropped(),
            Backend::Nats(_) => 0,
        }
    }
}

/// Whether a NATS-style `pattern` matches a concrete `subject`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_matching_follows_nats() {
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.c"));
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(!subject_matches("a.b.c", "a.b"));
    }
}
