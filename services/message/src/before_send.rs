//! The `before_send` hook: before a member's message is stored, the business system is
//! asked (a POST with a timeout) whether to accept it as it is, reject it (the sender gets
//! 403 `rejected_by_hook` with the given reason) or rewrite its content — moderation,
//! sensitive-word filters. A hook that fails (no answer in time, an error status, an answer
//! that is not one of the three) accepts the message or refuses it (503 `hook_unavailable`),
//! as configured. The call is a span of the send's trace and a histogram
//! (`quickim_before_send_seconds`). Signed like the webhooks (Standard Webhooks headers)
//! when `hook_secret` is set; http:// or https:// (`poster.rs`). Messages from the business
//! system (/inner) are not asked about.

use std::time::{Duration, Instant};

use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_store::SendItem;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::poster::Poster;
use crate::signature;

/// How the hook is called.
#[derive(Debug, Clone)]
pub struct BeforeSendConfig {
    /// Where (http:// or https://).
    pub url: String,
    /// Longest wait for its answer.
    pub timeout: Duration,
    /// When it fails: accept the message (true) or refuse it (false).
    pub fail_open: bool,
    /// Signing secret (`whsec_…`), if any.
    pub secret: Option<Vec<u8>>,
    /// More root certificates (PEM) to trust for https://.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The hook's client.
pub struct BeforeSend {
    config: BeforeSendConfig,
    poster: Poster,
}

#[derive(Serialize)]
struct Ask<'a> {
    conversation_id: &'a str,
    from: &'a str,
    #[serde(rename = "type")]
    msg_type: i32,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_msg_id: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum Verdict {
    Accept,
    Reject {
        #[serde(default)]
        reason: Option<String>,
    },
    Rewrite {
        content: String,
    },
}

impl BeforeSend {
    /// A client for `config`.
    pub fn new(config: BeforeSendConfig) -> Result<BeforeSend, String> {
        let poster = Poster::new(config.timeout, config.ca_file.as_deref())?;
        Ok(BeforeSend { config, poster })
    }

    /// Asks about `send`: `Ok(None)` to store it as it is, `Ok(Some(content))` to store it
    /// with that content (to be checked again), `Err` to refuse it.
    pub async fn ask(&self, send: &SendItem) -> Result<Option<String>, ServiceError> {
        let span = tracing::info_span!("before_send", otel.kind = "client", url.full = %self.config.url, outcome = tracing::field::Empty);
        let started = Instant::now();
        let result = self.call(send).instrument(span.clone()).await;
        let outcome = match &result {
            Ok(Verdict::Accept) => "accept",
            Ok(Verdict::Reject { .. }) => "reject",
            Ok(Verdict::Rewrite { .. }) => "rewrite",
            Err(_) => "failed",
        };
        span.record("outcome", outcome);
        metrics::histogram!("quickim_before_send_seconds", "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(Verdict::Accept) => Ok(None),
            Ok(Verdict::Rewrite { content }) => Ok(Some(content)),
            Ok(Verdict::Reject { reason }) => Err(ServiceError::new(
                ErrorCode::RejectedByHook,
                reason.filter(|r| !r.is_empty()).unwrap_or_else(|| "rejected".to_string()),
            )),
            Err(e) if self.config.fail_open => {
                tracing::warn!(error = %e, "before_send hook failed; accepting the message");
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(error = %e, "before_send hook failed; refusing the message");
                Err(ServiceError::new(ErrorCode::HookUnavailable, "the message could not be checked; try again"))
            }
        }
    }

    async fn call(&self, send: &SendItem) -> Result<Verdict, String> {
        let body = serde_json::to_vec(&Ask {
            conversation_id: &send.conversation_id,
            from: &send.from,
            msg_type: send.msg_type,
            content: &send.content,
            client_msg_id: send.client_msg_id.as_deref(),
        })
        .map_err(|e| e.to_string())?;
        let mut headers = Vec::new();
        if let Some(secret) = &self.config.secret {
            let id = format!("bs_{}", uuid_like());
            let timestamp = quickim_shared::time::now_ms() / 1000;
            let signature = signature::sign(secret, &id, timestamp, &body);
            headers = vec![
                ("webhook-id", id),
                ("webhook-timestamp", timestamp.to_string()),
                ("webhook-signature", signature),
            ];
        }
        let (status, bytes) = self.poster.post(&self.config.url, &headers, body).await?;
        if !(200..300).contains(&status) {
            return Err(format!("answered {status}"));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("an answer that is not a verdict: {e}"))
    }
}

/// A unique enough id for one call (time and a counter).
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{:x}{:x}", quickim_shared::time::now_ms(), NEXT.fetch_add(1, Ordering::Relaxed))
}
