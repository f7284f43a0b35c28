//! The NATS backend of the bus (NATS core: request/reply with headers, pub/sub, queue groups).

use std::time::Duration;

use async_nats::{HeaderMap, connection::State};
use bytes::Bytes;
use futures::StreamExt;

use super::{BusError, Headers, Incoming, Reply, ReplyTo, Subscription};

/// How to reach a NATS server and prove who we are.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// `nats://host:port` (or `tls://…`), several comma-separated.
    pub url: String,
    /// This connection's name (the node id), as the server shows it.
    pub name: String,
    /// User and password.
    pub user: Option<(String, String)>,
    /// Token.
    pub token: Option<String>,
    /// NKey seed (`SU…`).
    pub nkey_seed: Option<String>,
    /// A `.creds` file (JWT and NKey seed, as `nsc` writes them).
    pub creds_file: Option<std::path::PathBuf>,
    /// CA certificate (PEM) to verify the server with; also turns TLS on.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients.
    pub tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Refuse a server that does not offer TLS.
    pub require_tls: bool,
    /// Inbox prefix for replies (`{subject_prefix}._INBOX` when subjects are prefixed).
    pub inbox_prefix: Option<String>,
}

/// See the module docs.
pub struct NatsBus {
    client: async_nats::Client,
}

impl NatsBus {
    pub(super) async fn connect(o: &NatsOptions) -> Result<NatsBus, BusError> {
        let url = o.url.as_str();
        let fail = |e: String| BusError::Unavailable(format!("cannot connect to NATS at {url}: {e}"));
        let mut options = async_nats::ConnectOptions::new()
            .name(&o.name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            // Each subscription buffers at most this many messages; beyond, NATS drops
            // (and the /notify hub repairs the gap from the store).
            .subscription_capacity(65_536);
        if let Some(path) = &o.creds_file {
            options = options.credentials_file(path).await.map_err(|e| fail(format!("{}: {e}", path.display())))?;
        }
        if let Some((user, password)) = &o.user {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &o.token {
            options = options.token(token.clone());
        }
        if let Some(seed) = &o.nkey_seed {
            options = options.nkey(seed.clone());
        }
        if let Some(ca) = &o.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &o.tls_client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if o.require_tls {
            options = options.require_tls(true);
        }
        if let Some(prefix) = &o.inbox_prefix {
            options = options.custom_inbox_prefix(prefix.clone());
        }
        let client = options.connect(url).await.map_err(|e| fail(e.to_string()))?;
        let bus = NatsBus { client };
        // retry_on_initial_connect returns at once: wait (bounded) for the first connection so
        // that start-up fails clearly when NATS is not there (or refuses our credentials).
        for _ in 0..100 {
            if bus.is_connected() {
                return Ok(bus);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(BusError::Unavailable(format!(
            "NATS at {url} did not accept a connection within 5 s (is it running? are the credentials and TLS \
             settings right?)"
        )))
    }

    pub(super) async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Reply, BusError> {
        let size = wire_len(&headers, payload.len());
        let request =
            async_nats::Request::new().payload(payload).headers(to_header_map(&headers)).timeout(Some(timeout));
        let msg = self.client.send_request(subject.to_string(), request).await.map_err(|e| {
            use async_nats::client::RequestErrorKind as K;
            match e.kind() {
                K::TimedOut => BusError::TimedOut(subject.to_string()),
                K::NoResponders => BusError::NoResponders(subject.to_string()),
                K::MaxPayloadExceeded => {
                    BusError::TooLarge { subject: subject.to_string(), size, max: self.client.max_payload() }
                }
                _ => BusError::Unavailable(e.to_string()),
            }
        })?;
        Ok(Reply { headers: from_header_map(msg.headers.as_ref()), payload: msg.payload })
    }

    pub(super) async fn publish(&self, subject: &str, headers: Headers, payload: Bytes) -> Result<(), BusError> {
        publish(&self.client, subject.to_string().into(), &headers, payload).await
    }

    pub(super) async fn subscribe(&self, subject: &str, queue: Option<&str>) -> Result<Subscription, BusError> {
        let sub = match queue {
            Some(q) => self.client.queue_subscribe(subject.to_string(), q.to_string()).await,
            None => self.client.subscribe(subject.to_string()).await,
        }
        .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let client = self.client.clone();
        Ok(sub
            .map(move |m| Incoming {
                subject: m.subject.to_string(),
                headers: from_header_map(m.headers.as_ref()),
                payload: m.payload,
                reply: m.reply.map(|subject| ReplyTo::Nats { client: client.clone(), subject }),
            })
            .boxed())
    }

    pub(super) async fn gather(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
        expect: usize,
    ) -> Result<Vec<Reply>, BusError> {
        let inbox = self.client.new_inbox();
        let mut sub = self.client.subscribe(inbox.clone()).await.map_err(|e| BusError::Unavailable(e.to_string()))?;
        let size = wire_len(&headers, payload.len());
        self.client
            .publish_with_reply_and_headers(subject.to_string(), inbox, to_header_map(&headers), payload)
            .await
            .map_err(|e| match e.kind() {
                async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                    BusError::TooLarge { subject: subject.to_string(), size, max: self.client.max_payload() }
                }
                _ => BusError::Unavailable(e.to_string()),
            })?;
        let mut replies = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while replies.len() < expect {
            match tokio::time::timeout_at(deadline, sub.next()).await {
                Ok(Some(m)) => replies.push(Reply { headers: from_header_map(m.headers.as_ref()), payload: m.payload }),
                _ => break,
            }
        }
        Ok(replies)
    }

    pub(super) async fn flush(&self) -> Result<(), BusError> {
        self.client.flush().await.map_err(|e| BusError::Unavailable(e.to_string()))
    }

    pub(super) fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    pub(super) fn is_connected(&self) -> bool {
        matches!(self.client.connection_state(), State::Connected)
    }

    pub(super) async fn drain(&self) {
        if let Err(e) = self.client.drain().await {
            tracing::warn!(error = %e, "NATS drain failed");
        }
    }
}

pub(super) async fn publish(
    client: &async_nats::Client,
    subject: async_nats::Subject,
    headers: &Headers,
    payload: Bytes,
) -> Result<(), BusError> {
    let size = wire_len(headers, payload.len());
    let name = subject.to_string();
    let result = if headers.is_empty() {
        client.publish(subject, payload).await
    } else {
        client.publish_with_headers(subject, to_header_map(headers), payload).await
    };
    result.map_err(|e| match e.kind() {
        async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
            BusError::TooLarge { subject: name, size, max: client.max_payload() }
        }
        _ => BusError::Unavailable(e.to_string()),
    })
}

/// A message's size as NATS counts it: the payload and, when there are headers, their
/// `NATS/1.0` block.
pub(super) fn wire_len(headers: &Headers, payload: usize) -> usize {
    if headers.is_empty() {
        return payload;
    }
    // "NATS/1.0\r\n" + "name: value\r\n"... + "\r\n"
    10 + headers.iter().map(|(k, v)| k.len() + v.len() + 4).sum::<usize>() + 2 + payload
}

fn to_header_map(headers: &Headers) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.insert(k.as_str(), v.as_str());
    }
    map
}

fn from_header_map(map: Option<&HeaderMap>) -> Headers {
    let Some(map) = map else { return Vec::new() };
    map.iter().filter_map(|(k, vs)| vs.first().map(|v| (k.to_string(), v.to_string()))).collect()
}
