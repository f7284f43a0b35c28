//! /notify clients for tests: WebSocket, SSE and long-poll, each keeping the last cursor it
//! received, as a real client would.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The three protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Ws,
    Sse,
    Poll,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Ws, Protocol::Sse, Protocol::Poll];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Ws => "ws",
            Protocol::Sse => "sse",
            Protocol::Poll => "poll",
        }
    }
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// WebSocket close frame with this code and reason.
    Ws(u16, String),
    /// The HTTP stream ended.
    Ended,
}

enum Inner {
    Ws(tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>),
    Sse { response: reqwest::Response, buffer: String, id: Option<String> },
    Poll { http: reqwest::Client, url: String, answer_cursor: Option<String> },
}

/// A /notify client of any protocol.
pub struct NotifyClient {
    pub protocol: Protocol,
    inner: Inner,
    /// The last cursor received (what a client would resume from).
    pub cursor: Option<String>,
    queue: std::collections::VecDeque<Value>,
    pub closed: Option<Closed>,
    base: String,
    token: String,
}

/// Error connecting: the HTTP status and body of the refusal.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: Value,
}

impl NotifyClient {
    /// Connects to `public` (host:port) as the token's user, resuming after `cursor`.
    pub async fn connect(
        public: &str,
        token: &str,
        protocol: Protocol,
        cursor: Option<&str>,
    ) -> Result<NotifyClient, Refused> {
        Self::connect_as(public, token, None, protocol, cursor).await
    }

    /// Connects over WebSocket or SSE with a /notify ticket in the URL instead of a token.
    pub async fn connect_with_ticket(
        public: &str,
        ticket: &str,
        protocol: Protocol,
        cursor: Option<&str>,
    ) -> Result<NotifyClient, Refused> {
        assert_ne!(protocol, Protocol::Poll, "long-polls send the token in a header");
        Self::connect_as(public, "", Some(ticket), protocol, cursor).await
    }

    async fn connect_as(
        public: &str,
        token: &str,
        ticket: Option<&str>,
        protocol: Protocol,
        cursor: Option<&str>,
    ) -> Result<NotifyClient, Refused> {
        let base = public.trim_start_matches("http://").to_string();
        let credential = match ticket {
            Some(t) => format!("ticket={t}"),
            None => format!("token={token}"),
        };
        let inner = match protocol {
            Protocol::Ws => {
                let mut url = format!("ws://{base}/notify?protoc=ws&{credential}");
                if let Some(c) = cursor {
                    url.push_str(&format!("&cursor={c}"));
                }
                let request = url.into_client_request().expect("request");
                match tokio_tungstenite::connect_async(request).await {
                    Ok((ws, _)) => Inner::Ws(ws),
                    Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                        let status = resp.status().as_u16();
                        let body =
                            resp.body().as_ref().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
                        return Err(Refused { status, body });
                    }
                    Err(e) => return Err(Refused { status: 0, body: Value::String(e.to_string()) }),
                }
            }
            Protocol::Sse => {
                let http = reqwest::Client::new();
                let mut req = match ticket {
                    Some(_) => http.get(format!("http://{base}/notify?protoc=sse&{credential}")),
                    None => http.get(format!("http://{base}/notify?protoc=sse")).bearer_auth(token),
                };
                if let Some(c) = cursor {
                    req = req.header("Last-Event-ID", c);
                }
                let response =
                    req.send().await.map_err(|e| Refused { status: 0, body: Value::String(e.to_string()) })?;
                if !response.status().is_success() {
                    let status = response.status().as_u16();
                    let body = response.json().await.unwrap_or(Value::Null);
                    return Err(Refused { status, body });
                }
                Inner::Sse { response, buffer: String::new(), id: cursor.map(str::to_string) }
            }
            Protocol::Poll => Inner::Poll {
                http: reqwest::Client::builder().timeout(Duration::from_secs(90)).build().expect("client"),
                url: format!("http://{base}/notify?protoc=poll"),
                answer_cursor: None,
            },
        };
        let mut client = NotifyClient {
            protocol,
            inner,
            cursor: cursor.map(str::to_string),
            queue: Default::default(),
            closed: None,
            base,
            token: token.to_string(),
        };
        if protocol == Protocol::Poll {
            // The first poll is the "connection": it must be accepted.
            client.poll_once(0).await?;
        }
        Ok(client)
    }

    /// One long-poll; its events go to the queue.
    pub async fn poll_once(&mut self, timeout_s: u64) -> Result<(), Refused> {
        let Inner::Poll { http, url, .. } = &self.inner else { return Ok(()) };
        let mut u = format!("{url}&timeout={timeout_s}");
        if let Some(c) = &self.cursor {
            u.push_str(&format!("&cursor={c}"));
        }
        let resp = http
            .get(u)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| Refused { status: 0, body: Value::String(e.to_string()) })?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status != 200 {
            return Err(Refused { status, body });
        }
        for e in body["data"]["events"].as_array().cloned().unwrap_or_default() {
            self.queue.push_back(e);
        }
        // The answer's cursor covers the whole batch: it is ours once the batch is consumed.
        let answer = body["data"]["cursor"].as_str().map(str::to_string);
        if self.queue.is_empty() {
            self.cursor = answer.clone();
        }
        if let Inner::Poll { answer_cursor, .. } = &mut self.inner {
            *answer_cursor = answer;
        }
        Ok(())
    }

    /// The next event within `wait`, or None (timeout or closed).
    pub async fn next(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(e) = self.queue.pop_front() {
                if let Some(c) = e["cursor"].as_str().filter(|c| !c.is_empty()) {
                    self.cursor = Some(c.to_string());
                }
                if let (true, Inner::Poll { answer_cursor: Some(a), .. }) = (self.queue.is_empty(), &self.inner) {
                    self.cursor = Some(a.clone());
                }
                return Some(e);
            }

            if self.closed.is_some() {
                return None;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            match &mut self.inner {
                Inner::Ws(ws) => match tokio::time::timeout(left, ws.next()).await {
                    Err(_) => return None,
                    Ok(None) => self.closed = Some(Closed::Ended),
                    Ok(Some(Err(_))) => self.closed = Some(Closed::Ended),
                    Ok(Some(Ok(WsMessage::Text(t)))) => {
                        if let Ok(v) = serde_json::from_str(t.as_str()) {
                            self.queue.push_back(v);
                        }
                    }
                    Ok(Some(Ok(WsMessage::Close(frame)))) => {
                        self.closed = Some(match frame {
                            Some(f) => Closed::Ws(u16::from(f.code), f.reason.to_string()),
                            None => Closed::Ended,
                        })
                    }
                    Ok(Some(Ok(_))) => {}
                },
                Inner::Sse { response, buffer, id } => {
                    match tokio::time::timeout(left, response.chunk()).await {
                        Err(_) => return None,
                        Ok(Ok(Some(chunk))) => buffer.push_str(&String::from_utf8_lossy(&chunk)),
                        Ok(_) => self.closed = Some(Closed::Ended),
                    }
                    while let Some(end) = buffer.find("\n\n") {
                        let block: String = buffer.drain(..end + 2).collect();
                        let mut data = String::new();
                        let mut block_id = None;
                        for line in block.lines() {
                            if let Some(v) = line.strip_prefix("id: ") {
                                block_id = Some(v.to_string());
                            } else if let Some(v) = line.strip_prefix("data: ") {
                                data.push_str(v);
                            }
                        }
                        if block_id.is_some() {
                            *id = block_id.clone();
                        }
                        if !data.is_empty() {
                            if let Ok(v) = serde_json::from_str::<Value>(&data) {
                                self.queue.push_back(v);
                            }
                        } else if let Some(i) = block_id.filter(|_| self.queue.is_empty()) {
                            // An id without data (heartbeat): the browser's Last-Event-ID moves.
                            self.cursor = Some(i);
                        }
                    }
                }
                Inner::Poll { .. } => {
                    let secs = left.as_secs().clamp(1, 60);
                    if self.poll_once(secs).await.is_err() {
                        self.closed = Some(Closed::Ended);
                    }
                }
            }
        }
    }

    /// The next `message` event (skipping others) within `wait`.
    pub async fn next_message(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let e = self.next(left).await?;
            if e["type"] == "message" {
                return Some(e["message"].clone());
            }
        }
    }

    /// Sends a WebSocket text frame.
    pub async fn send_frame(&mut self, frame: Value) {
        if let Inner::Ws(ws) = &mut self.inner {
            ws.send(WsMessage::Text(frame.to_string().into())).await.expect("send frame");
        }
    }

    /// Sends raw text (WebSocket).
    pub async fn send_text(&mut self, text: String) -> bool {
        match &mut self.inner {
            Inner::Ws(ws) => ws.send(WsMessage::Text(text.into())).await.is_ok(),
            _ => false,
        }
    }

    /// Waits until the server closes the stream (draining events); answers how.
    pub async fn wait_closed(&mut self, wait: Duration) -> Option<Closed> {
        let deadline = tokio::time::Instant::now() + wait;
        while self.closed.is_none() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = self.next(left).await;
        }
        self.closed.clone()
    }

    /// Drops the connection abruptly (no close handshake).
    pub fn drop_connection(self) -> Option<String> {
        self.cursor.clone()
    }

    /// Reconnects (to `public`, possibly another node) with the last cursor.
    pub async fn reconnect(self, public: &str) -> Result<NotifyClient, Refused> {
        let (protocol, token, cursor) = (self.protocol, self.token.clone(), self.cursor.clone());
        drop(self);
        NotifyClient::connect(public, &token, protocol, cursor.as_deref()).await
    }

    /// The client's token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The address this client talks to.
    pub fn base(&self) -> &str {
        &self.base
    }
}
