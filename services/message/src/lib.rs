//! The message service: owns messages.
//!
//! - `lib.rs` (here): the `quickim.msg.*` handlers, in the `quickim-message` queue group;
//! - `batcher.rs`: group commit: concurrent sends share one transaction, then their log
//!   entries are published to the gateways;
//! - `validate.rs`: shape checks of a message (ids, type, content size);
//! - `housekeeping.rs`: periodic log-heads announcements (so gateways notice a lost tail),
//!   retention checkpoints, expiry of idempotency keys and (optionally) of old messages.

mod batcher;
mod before_send;
mod housekeeping;
mod poster;
mod signature;
mod validate;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quickim_shared::bus::{Bus, BusError, size};
use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::fanout::publish_entries;
use quickim_shared::ids::{check_conversation_id, check_user_id};
use quickim_shared::protocol::api::{Message, VersionsAnswer};
use quickim_shared::protocol::event::LogEntry;
use quickim_shared::protocol::service::{
    Call, GetHeads, GetStream, GetVersions, History, LastMsgId, MESSAGE_QUEUE, MESSAGE_SUBJECTS, OpenStream, Origin,
    ReadLog, Replay, ReplayPage, Reply, ReviseMessage, SEND_EACH_MAX, SendBatch, SendEach, SendMessage,
};
use quickim_shared::protocol::system::{self, Action};
use quickim_shared::rpc::{self, Handler, answer};
use quickim_shared::telemetry;
use quickim_store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use batcher::Batcher;
pub use before_send::{BeforeSend, BeforeSendConfig};
pub use poster::Poster;
pub use signature::key_of as signing_key;

/// Limits the message service applies.
#[derive(Debug, Clone)]
pub struct MessageLimits {
    /// Largest content, UTF-8 bytes.
    pub max_content_bytes: usize,
    /// Most messages per history answer.
    pub range_max: u32,
    /// Most entries per replay page.
    pub replay_page: u32,
    /// Replay window, ms.
    pub retention_ms: i64,
    /// Idempotency keys are kept this long, ms.
    pub key_ttl_ms: i64,
    /// Messages are kept this long, ms (0: forever).
    pub message_retention_ms: i64,
    /// Most items in one batch request.
    pub send_batch_max: usize,
    /// A member may edit its message this long after sending, ms (0: always).
    pub edit_window_ms: i64,
    /// A member may recall its message this long after sending, ms (0: always).
    pub recall_window_ms: i64,
    /// A stream not finished this long after it was opened is cancelled, ms.
    pub stream_timeout_ms: i64,
}

/// The service.
pub struct MessageService {
    store: Store,
    bus: Bus,
    limits: MessageLimits,
    batcher: Batcher,
    before_send: Option<BeforeSend>,
}

impl MessageService {
    /// A service over `store`, publishing on `bus`.
    pub fn new(store: Store, bus: Bus, limits: MessageLimits) -> MessageService {
        let batcher = Batcher::start(store.clone(), bus.clone(), 1024);
        MessageService { store, bus, limits, batcher, before_send: None }
    }

    /// Asks the `before_send` hook about every member's message before storing it.
    pub fn with_before_send(mut self, hook: BeforeSend) -> MessageService {
        self.before_send = Some(hook);
        self
    }

    /// Subscribes, then serves requests and runs housekeeping in tasks until `shutdown`.
    /// Returns once requests can be sent.
    pub async fn start(self, shutdown: CancellationToken) -> Result<JoinHandle<()>, BusError> {
        let bus = self.bus.clone();
        let periods = housekeeping::Periods {
            replay_retention_ms: self.limits.retention_ms,
            key_ttl_ms: self.limits.key_ttl_ms,
            message_retention_ms: self.limits.message_retention_ms,
            heads_every: Duration::from_secs(1),
            // Often enough that the horizon is never more than a quarter window late.
            checkpoint_every: Duration::from_millis((self.limits.retention_ms / 4).clamp(1_000, 60_000) as u64),
            prune_every: Duration::from_secs(600),
            stream_timeout_ms: self.limits.stream_timeout_ms,
            streams_every: Duration::from_millis((self.limits.stream_timeout_ms / 4).clamp(200, 5_000) as u64),
        };
        let housekeeping = tokio::spawn(housekeeping::run(self.store.clone(), bus.clone(), periods, shutdown.clone()));
        let serving = rpc::serve(&bus, MESSAGE_SUBJECTS, MESSAGE_QUEUE, 4096, Arc::new(self), shutdown).await?;
        Ok(tokio::spawn(async move {
            let _ = serving.await;
            let _ = housekeeping.await;
        }))
    }

    async fn send(&self, r: SendMessage) -> Reply<Message> {
        let mut item = validate::send_item(r, self.limits.max_content_bytes)?;
        if let (Some(hook), Origin::Client) = (&self.before_send, item.origin)
            && let Some(content) = hook.ask(&item).await?
        {
            validate::content(&content, self.limits.max_content_bytes)?;
            item.content = content;
        }
        self.batcher.submit(item).await
    }

    /// Sends coalesced by a gateway: each goes to the group commit on its own, in its own
    /// trace (a server span per send, child of the gateway's bus request span for it).
    async fn send_each(&self, r: SendEach) -> Reply<Vec<Reply<Message>>> {
        if r.items.is_empty() || r.items.len() > SEND_EACH_MAX {
            return Err(ServiceError::invalid(format!("send_each carries 1–{SEND_EACH_MAX} sends")));
        }
        let sends = r.items.into_iter().map(|item| {
            let span = telemetry::server_span(SendMessage::SUBJECT, &item.trace);
            self.send(item.send).instrument(span)
        });
        Ok(futures::future::join_all(sends).await)
    }

    async fn send_batch(&self, r: SendBatch) -> Reply<Vec<Reply<Message>>> {
        if r.items.is_empty() {
            return Err(ServiceError::invalid("a batch holds at least one message"));
        }
        if r.items.len() > self.limits.send_batch_max {
            return Err(ServiceError::new(
                ErrorCode::TooManyItems,
                format!("a batch holds at most {} messages", self.limits.send_batch_max),
            ));
        }
        // Invalid items get their error; the valid ones are stored together, in order.
        let checked: Vec<Reply<quickim_store::SendItem>> =
            r.items.into_iter().map(|i| validate::send_item(i, self.limits.max_content_bytes)).collect();
        let valid: Vec<quickim_store::SendItem> = checked.iter().filter_map(|c| c.as_ref().ok().cloned()).collect();
        let (stored, entries) =
            if valid.is_empty() { (Vec::new(), Vec::new()) } else { self.store.send_batch(&valid).await? };
        publish_entries(&self.bus, &entries).await;
        let mut stored = stored.into_iter();
        Ok(checked
            .into_iter()
            .map(|c| match c {
                Ok(_) => stored.next().unwrap_or_else(|| Err(ServiceError::internal("batch result missing"))),
                Err(e) => Err(e),
            })
            .collect())
    }

    /// Edit, recall or delete: stored with its revision entry, which is then published.
    async fn revise(&self, r: ReviseMessage) -> Reply<Message> {
        let mut revision = validate::revision(r, self.limits.max_content_bytes)?;
        revision.window_ms = match revision.action {
            Action::Edit => self.limits.edit_window_ms,
            Action::Recall => self.limits.recall_window_ms,
            Action::Delete | Action::Finish | Action::Cancel => 0,
        };
        // The revision entry carries the new content: it must cross the bus like a send.
        let entry = Message {
            conversation_id: revision.conversation_id.clone(),
            from: String::new(),
            msg_type: system::REVISED,
            content: system::content(&system::Revised {
                msg_id: revision.msg_id,
                action: revision.action,
                content: revision.content.clone(),
                by: revision.by.clone(),
            }),
            ..Message::default()
        };
        let budget = self.bus.payload_budget();
        if size::encoded_len(&entry) + REVISION_OVERHEAD > budget {
            return Err(ServiceError::new(
                ErrorCode::TooLargeForBus,
                format!("this edit is over the bus's {budget} bytes; shorten it"),
            ));
        }
        let (msg, entries) = self.store.revise(revision).await?;
        publish_entries(&self.bus, &entries).await;
        Ok(msg)
    }

    /// Opens a streaming message: stored empty now (its msg_id taken), published like a send.
    async fn open_stream(&self, r: OpenStream) -> Reply<Message> {
        check_conversation_id(&r.conversation_id)?;
        if !r.from.is_empty() || r.origin == Origin::Client {
            check_user_id("from", &r.from)?;
        }
        if r.msg_type < 0 {
            return Err(ServiceError::invalid("a stream's type is ≥ 0"));
        }
        let (msg, entries) = self.store.open_stream(r.origin, &r.conversation_id, &r.from, r.msg_type).await?;
        publish_entries(&self.bus, &entries).await;
        Ok(msg)
    }

    async fn versions(&self, r: GetVersions) -> Reply<VersionsAnswer> {
        check_conversation_id(&r.conversation_id)?;
        let budget = self.bus.payload_budget();
        Ok(self.store.versions(&r.conversation_id, r.user_id.as_deref(), r.msg_id, r.after_version, budget).await?)
    }

    async fn history(&self, r: History) -> Reply<Vec<Message>> {
        check_conversation_id(&r.conversation_id)?;
        let budget = self.bus.payload_budget();
        Ok(self.store.history(&r.conversation_id, &r.user_id, r.query, r.desc, self.limits.range_max, budget).await?)
    }

    async fn replay(&self, r: Replay) -> Reply<ReplayPage> {
        let limit = r.limit.clamp(1, self.limits.replay_page);
        // The store stops once the contents fill the bus's budget; the page is then cut to
        // what fits once encoded.
        let budget = self.bus.payload_budget();
        let mut page =
            self.store.replay(&r.user_id, &r.after, &r.upto, limit, budget, self.limits.retention_ms).await?;
        let fits = fit_page(&page.entries, budget)?;
        if fits < page.entries.len() {
            page.entries.truncate(fits);
            page.more = true;
        }
        Ok(page)
    }

    /// Gap fill: one page of a partition, as many entries as fit in one bus message.
    async fn read_log(&self, r: ReadLog) -> Reply<Vec<LogEntry>> {
        let budget = self.bus.payload_budget();
        let mut entries = self.store.read_log(r.part, r.after, r.upto, r.limit.clamp(1, 10_000), budget).await?;
        let fits = fit_page(&entries, budget)?;
        entries.truncate(fits);
        Ok(entries)
    }
}

/// Bytes a revision entry takes on the bus beyond its message (log entry fields, trace
/// context, the revised message in the answer).
const REVISION_OVERHEAD: usize = 1024;

/// How many of `entries` fit in one bus message of `budget` bytes; an error when not even
/// the first does (a message stored while the bus allowed more).
fn fit_page(entries: &[LogEntry], budget: usize) -> Result<usize, ServiceError> {
    let fits = size::fitting(entries, budget, 0);
    if fits == 0 && !entries.is_empty() {
        return Err(ServiceError::new(
            ErrorCode::TooLargeForBus,
            format!("a stored message is over the bus's limit of {budget} bytes"),
        ));
    }
    Ok(fits)
}

impl Handler for MessageService {
    async fn handle(&self, subject: &str, payload: &[u8]) -> Bytes {
        match subject {
            SendMessage::SUBJECT => answer(payload, |r| self.send(r)).await,
            SendBatch::SUBJECT => answer(payload, |r| self.send_batch(r)).await,
            SendEach::SUBJECT => answer(payload, |r| self.send_each(r)).await,
            History::SUBJECT => answer(payload, |r| self.history(r)).await,
            Replay::SUBJECT => answer(payload, |r| self.replay(r)).await,
            LastMsgId::SUBJECT => {
                answer(payload, async |r: LastMsgId| {
                    check_conversation_id(&r.conversation_id)?;
                    Ok(self.store.last_msg_id(&r.conversation_id, &r.user_id).await?)
                })
                .await
            }
            GetHeads::SUBJECT => answer(payload, async |_: GetHeads| Ok(self.store.heads().await?)).await,
            ReadLog::SUBJECT => answer(payload, |r| self.read_log(r)).await,
            ReviseMessage::SUBJECT => answer(payload, |r| self.revise(r)).await,
            GetVersions::SUBJECT => answer(payload, |r| self.versions(r)).await,
            OpenStream::SUBJECT => answer(payload, |r| self.open_stream(r)).await,
            GetStream::SUBJECT => {
                answer(payload, async |r: GetStream| {
                    check_conversation_id(&r.conversation_id)?;
                    Ok(self.store.stream_info(&r.conversation_id, r.msg_id).await?)
                })
                .await
            }
            other => rpc::unknown_operation(other),
        }
    }
}
