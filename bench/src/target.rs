//! A server under test, described by URL templates and headers, so any server can be
//! driven. Three presets fill them in: `quickim`, `nchan` and `pushpin`.
//!
//! Placeholders: `{host}` (one of the server's public nodes), `{channel}` (the channel name),
//! `{token}` (quickim: the subscriber's JWT), `{payload}` (the message), `{from}` (a publisher
//! that is a member of the channel).

use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Which protocol rules a target follows beyond its templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Kind {
    /// quickim: conversations, members and tokens are set up; long-poll uses cursors.
    Quickim,
    /// nchan: channels need no set-up; long-poll uses Last-Modified / ETag.
    Nchan,
    /// Pushpin (a GRIP proxy) in front of bench/pushpin/origin.py: channels need no set-up,
    /// messages go to Pushpin's HTTP publish endpoint; no message history, so no resume.
    Pushpin,
}

/// Everything the tool needs to drive one server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// Label in results.
    pub name: String,
    pub kind: Kind,
    /// Public nodes (host:port); subscribers are spread over them.
    pub hosts: Vec<String>,
    pub ws_url: String,
    pub sse_url: String,
    pub poll_url: String,
    pub pub_url: String,
    pub pub_body: String,
    pub pub_headers: Vec<String>,
    /// quickim: the /inner base URL, its key and the JWT secret (tokens are signed locally,
    /// as a business system would).
    pub inner: Option<String>,
    pub inner_key: Option<String>,
    pub jwt_secret: Option<String>,
    /// Server processes whose memory is measured.
    pub pids: Vec<u32>,
}

impl Target {
    /// The quickim preset.
    pub fn quickim(name: &str, hosts: Vec<String>, inner: String, inner_key: String, jwt_secret: String) -> Target {
        Target {
            name: name.into(),
            kind: Kind::Quickim,
            hosts,
            ws_url: "ws://{host}/notify?protoc=ws&token={token}".into(),
            sse_url: "http://{host}/notify?protoc=sse&token={token}".into(),
            poll_url: "http://{host}/notify?protoc=poll&token={token}".into(),
            pub_url: format!("{inner}/inner/send_msg"),
            pub_body: r#"{"conversation_id":"{channel}","from":"","type":1,"content":"{payload}"}"#.into(),
            pub_headers: vec![format!("Authorization: Bearer {inner_key}"), "Content-Type: application/json".into()],
            inner: Some(inner),
            inner_key: Some(inner_key),
            jwt_secret: Some(jwt_secret),
            pids: Vec::new(),
        }
    }

    /// The nchan preset (see bench/nchan/nginx.conf).
    pub fn nchan(name: &str, hosts: Vec<String>) -> Target {
        let pub_host = hosts.first().cloned().unwrap_or_default();
        Target {
            name: name.into(),
            kind: Kind::Nchan,
            hosts,
            ws_url: "ws://{host}/sub/{channel}".into(),
            sse_url: "http://{host}/sub/{channel}".into(),
            poll_url: "http://{host}/sub/{channel}".into(),
            pub_url: format!("http://{pub_host}/pub/{{channel}}"),
            pub_body: "{payload}".into(),
            pub_headers: vec!["Content-Type: text/plain".into()],
            inner: None,
            inner_key: None,
            jwt_secret: None,
            pids: Vec::new(),
        }
    }

    /// The Pushpin preset: subscribers on Pushpin's port (`hosts`), publishing to its publish
    /// endpoint `publish` (host:port; see bench/pushpin/). One message carries every
    /// transport's format: a WebSocket message, an EventSource event, a long-poll answer.
    pub fn pushpin(name: &str, hosts: Vec<String>, publish: &str) -> Target {
        Target {
            name: name.into(),
            kind: Kind::Pushpin,
            hosts,
            ws_url: "ws://{host}/sub/{channel}".into(),
            sse_url: "http://{host}/sub/{channel}".into(),
            poll_url: "http://{host}/poll/{channel}".into(),
            pub_url: format!("http://{publish}/publish/"),
            pub_body: r#"{"items":[{"channel":"{channel}","formats":{"ws-message":{"content":"{payload}"},"http-stream":{"content":"data: {payload}\n\n"},"http-response":{"body":"{payload}\n"}}}]}"#
                .into(),
            pub_headers: vec!["Content-Type: application/json".into()],
            inner: None,
            inner_key: None,
            jwt_secret: None,
            pids: Vec::new(),
        }
    }

    /// The subscriber URL of `protocol` for `channel`, on node `host`.
    pub fn sub_url(&self, protocol: &str, host: &str, channel: &str, token: &str) -> String {
        let t = match protocol {
            "ws" => &self.ws_url,
            "sse" => &self.sse_url,
            _ => &self.poll_url,
        };
        t.replace("{host}", host).replace("{channel}", channel).replace("{token}", token)
    }

    /// A token for `user` (quickim), or "" (servers without authentication).
    pub fn token(&self, user: &str) -> String {
        let Some(secret) = &self.jwt_secret else { return String::new() };
        #[derive(Serialize)]
        struct Claims<'a> {
            sub: &'a str,
            plt: &'a str,
            iat: u64,
            exp: u64,
        }
        let now = crate::marker::now_ns() / 1_000_000_000;
        let claims = Claims { sub: user, plt: "bench", iat: now.saturating_sub(5), exp: now + 6 * 3600 };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap_or_default()
    }
}

/// Names used by one run (a random run id keeps runs apart on a long-lived server).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Names {
    pub run: String,
}

impl Names {
    pub fn channel(&self, i: u32) -> String {
        format!("b{}c{i}", self.run)
    }
    pub fn user(&self, j: u32) -> String {
        format!("b{}u{j}", self.run)
    }
    pub fn publisher(&self, i: u32) -> String {
        format!("b{}p{i}", self.run)
    }
}

/// quickim set-up: one conversation per channel, with its subscribers (and a publisher user
/// per channel) as members.
pub async fn setup_quickim(target: &Target, names: &Names, members: &[Vec<u32>]) -> anyhow::Result<()> {
    let (Some(inner), Some(key)) = (&target.inner, &target.inner_key) else { return Ok(()) };
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let mut pending = futures::stream::FuturesUnordered::new();
    use futures::StreamExt;
    for (i, users) in members.iter().enumerate() {
        let i = i as u32;
        let mut all: Vec<String> = users.iter().map(|j| names.user(*j)).collect();
        all.push(names.publisher(i));
        let chunks: Vec<Vec<String>> = all.chunks(1000).map(|c| c.to_vec()).collect();
        let (http, inner, key, channel) = (http.clone(), inner.clone(), key.clone(), names.channel(i));
        pending.push(async move {
            for (n, chunk) in chunks.into_iter().enumerate() {
                let (path, body) = if n == 0 {
                    (
                        "create_conversation",
                        serde_json::json!({"conversation_id":channel,"conversation_type":1,"members":chunk}),
                    )
                } else {
                    ("join_conversation", serde_json::json!({"conversation_id":channel,"user_ids":chunk}))
                };
                let r = http.post(format!("{inner}/inner/{path}")).bearer_auth(&key).json(&body).send().await?;
                anyhow::ensure!(
                    r.status().is_success(),
                    "set-up {path} {channel}: {}",
                    r.text().await.unwrap_or_default()
                );
            }
            Ok::<_, anyhow::Error>(())
        });
        if pending.len() >= 64 {
            pending.next().await.context("set-up")??;
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(())
}
