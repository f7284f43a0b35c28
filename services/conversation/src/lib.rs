//! The conversation service: owns conversations and membership.
//!
//! It answers `quickim.conv.*` requests (see `quickim_shared::protocol::service`) in the
//! `quickim-conversation` queue group, so any number of instances share the load. Every
//! membership change is stored with its system message and published to the gateways after
//! commit. Shape checks (ids, list sizes) happen here; state checks (membership, existence)
//! in the store, inside the transaction.

use std::sync::Arc;

use bytes::Bytes;
use quickim_shared::bus::{Bus, BusError, size};
use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::fanout::publish_entries;
use quickim_shared::ids::{check_conversation_id, check_platform, check_user_id};
use quickim_shared::protocol::api::{
    ArchiveAnswer, ConversationMeta, CreatedConversation, JoinedUsers, KickedUsers, LeftAnswer, MetaRole, MuteAnswer,
    ReadAnswer, RoleAnswer,
};
use quickim_shared::protocol::event::{LIVE_SUBJECT, Live};
use quickim_shared::protocol::service::{
    CONVERSATION_QUEUE, CONVERSATION_SUBJECTS, Call, CheckJoined, ConsumeTicket, CreateConversation, GetDetail,
    GetLastSeen, GetMemberships, GetReceipts, Join, Kick, Leave, ListJoined, ListMembers, ListRevocations, MarkRead,
    Memberships, PresenceConversations, RecordPresence, Reply, RevocationPage, RevokeTokens, SetArchived,
    SetMemberRole, SetMute, UpdateConversation,
};
use quickim_shared::protocol::system;
use quickim_shared::rpc::{self, Handler, answer};
use quickim_store::{NewConversation, Store};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Most users or conversations one request may name.
pub const MAX_LIST: usize = 1000;

/// Most receipts in one answer to a resuming gateway (and what fits in one bus message).
const RECEIPTS_PAGE: u32 = 1000;

/// Limits the conversation service applies.
#[derive(Debug, Clone, Copy)]
pub struct ConversationLimits {
    /// Most active members of one conversation.
    pub max_members: u64,
    /// Longest title, UTF-8 bytes.
    pub title_max_bytes: usize,
    /// Longest avatar, UTF-8 bytes.
    pub avatar_max_bytes: usize,
    /// Largest ext, bytes of JSON.
    pub ext_max_bytes: usize,
}

/// How often the service looks whether any conversation has presence on.
const PRESENCE_IN_USE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The service: a store and the bus to publish on.
pub struct ConversationService {
    store: Store,
    bus: Bus,
    limits: ConversationLimits,
    /// Whether any conversation has presence on (looked up every couple of seconds, and set
    /// at once when this service turns it on): while none has, a user's presence
    /// conversations are answered without a read — the common case costs nothing.
    presence_in_use: Arc<std::sync::atomic::AtomicBool>,
}

impl ConversationService {
    /// A service over `store`, publishing on `bus`.
    pub fn new(store: Store, bus: Bus, limits: ConversationLimits) -> ConversationService {
        ConversationService { store, bus, limits, presence_in_use: Arc::new(true.into()) }
    }

    /// Subscribes, then serves requests in a task until `shutdown` (finishing the ones in
    /// flight). Returns once requests can be sent.
    pub async fn start(self, shutdown: CancellationToken) -> Result<JoinHandle<()>, BusError> {
        let bus = self.bus.clone();
        let store = self.store.clone();
        let prune = shutdown.clone();
        let (in_use, store_for_presence, watch) = (self.presence_in_use.clone(), self.store.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRESENCE_IN_USE_EVERY);
            loop {
                tokio::select! {
                    _ = watch.cancelled() => return,
                    _ = tick.tick() => match store_for_presence.presence_in_use().await {
                        Ok(used) => in_use.store(used, std::sync::atomic::Ordering::Relaxed),
                        Err(e) => tracing::warn!(error = %e, "cannot look whether presence is in use"),
                    },
                }
            }
        });
        // Used /notify tickets are kept until they expire.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = prune.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = store.prune_tickets(quickim_shared::time::now_ms()).await {
                            tracing::warn!(error = %e, "cannot prune used tickets");
                        }
                    }
                }
            }
        });
        rpc::serve(&bus, CONVERSATION_SUBJECTS, CONVERSATION_QUEUE, 256, Arc::new(self), shutdown).await
    }

    async fn create(&self, r: CreateConversation) -> Reply<CreatedConversation> {
        if let Some(id) = &r.conversation_id {
            check_conversation_id(id)?;
        }
        check_users("members", &r.members)?;
        if let Some(owner) = &r.owner {
            check_user_id("owner", owner)?;
        }
        if r.members.is_empty() && r.owner.is_none() {
            return Err(ServiceError::invalid("a conversation needs at least one member"));
        }
        self.system_message_fits(&r.members)?;
        self.check_meta(r.title.as_deref(), r.avatar.as_deref(), r.ext.as_ref())?;
        let out = self
            .store
            .create_conversation(NewConversation {
                conversation_id: r.conversation_id,
                conversation_type: r.conversation_type,
                joinable: r.joinable,
                members: r.members,
                owner: r.owner,
                title: r.title,
                avatar: r.avatar,
                ext: r.ext,
                meta_role: r.meta_role.unwrap_or(MetaRole::None),
                receipts: r.receipts.unwrap_or(true),
                presence: {
                    let on = r.presence.unwrap_or(false);
                    if on {
                        self.presence_in_use.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    on
                },
            })
            .await?;
        publish_entries(&self.bus, &out.entries).await;
        Ok(CreatedConversation { conversation_id: out.conversation_id, created: out.created })
    }

    async fn join(&self, r: Join) -> Reply<JoinedUsers> {
        check_conversation_id(&r.conversation_id)?;
        check_users("user_ids", &r.user_ids)?;
        if r.user_ids.is_empty() {
            return Err(ServiceError::invalid("user_ids must not be empty"));
        }
        self.system_message_fits(&r.user_ids)?;
        let (joined, entries) =
            self.store.join(&r.conversation_id, &r.user_ids, r.self_join, self.limits.max_members).await?;
        publish_entries(&self.bus, &entries).await;
        Ok(JoinedUsers { joined })
    }

    async fn leave(&self, r: Leave) -> Reply<LeftAnswer> {
        check_conversation_id(&r.conversation_id)?;
        check_user_id("user_id", &r.user_id)?;
        let entries = self.store.leave(&r.conversation_id, &r.user_id).await?;
        publish_entries(&self.bus, &entries).await;
        Ok(LeftAnswer { left: true })
    }

    async fn kick(&self, r: Kick) -> Reply<KickedUsers> {
        check_conversation_id(&r.conversation_id)?;
        check_users("user_ids", &r.user_ids)?;
        if r.user_ids.is_empty() {
            return Err(ServiceError::invalid("user_ids must not be empty"));
        }
        self.system_message_fits(&r.user_ids)?;
        let (kicked, entries) = self.store.kick(&r.conversation_id, &r.user_ids).await?;
        publish_entries(&self.bus, &entries).await;
        Ok(KickedUsers { kicked })
    }

    async fn set_archived(&self, r: SetArchived) -> Reply<ArchiveAnswer> {
        if r.conversation_ids.is_empty() {
            return Err(ServiceError::invalid("conversation_ids must not be empty"));
        }
        if r.conversation_ids.len() > MAX_LIST {
            return Err(ServiceError::new(
                ErrorCode::TooManyItems,
                format!("conversation_ids may name at most {MAX_LIST} conversations"),
            ));
        }
        for id in &r.conversation_ids {
            check_conversation_id(id)?;
        }
        let (updated, entries) = self.store.set_archived(&r.conversation_ids, r.archived).await?;
        publish_entries(&self.bus, &entries).await;
        Ok(ArchiveAnswer { updated })
    }
}

impl ConversationService {
    /// Checks a conversation's metadata against the limits, each with its own code.
    fn check_meta(
        &self,
        title: Option<&str>,
        avatar: Option<&str>,
        ext: Option<&serde_json::Value>,
    ) -> Result<(), ServiceError> {
        let l = &self.limits;
        for (field, value, max, code) in [
            ("title", title, l.title_max_bytes, ErrorCode::TitleTooLarge),
            ("avatar", avatar, l.avatar_max_bytes, ErrorCode::AvatarTooLarge),
        ] {
            let Some(value) = value else { continue };
            if value.contains('\0') {
                return Err(ServiceError::new(
                    ErrorCode::InvalidText,
                    format!("{field} must not contain U+0000 (NUL)"),
                ));
            }
            if value.len() > max {
                return Err(ServiceError::new(code, format!("{field} is {} bytes; the limit is {max}", value.len())));
            }
        }
        if let Some(ext) = ext {
            if !ext.is_object() {
                return Err(ServiceError::invalid("ext must be a JSON object"));
            }
            let text = ext.to_string();
            // PostgreSQL's text (and jsonb) cannot hold U+0000, escaped or not.
            if text.contains("\\u0000") {
                return Err(ServiceError::new(ErrorCode::InvalidText, "ext must not contain U+0000 (NUL)"));
            }
            if text.len() > l.ext_max_bytes {
                return Err(ServiceError::new(
                    ErrorCode::ExtTooLarge,
                    format!("ext is {} bytes as JSON; the limit is {}", text.len(), l.ext_max_bytes),
                ));
            }
        }
        Ok(())
    }

    /// Moves a read position; a move in a conversation with receipts on is told to every
    /// gateway (a `read` event for the members connected there), after the commit.
    async fn mark_read(&self, r: MarkRead) -> Reply<ReadAnswer> {
        check_conversation_id(&r.conversation_id)?;
        let mark = self.store.mark_read(&r.conversation_id, &r.user_id, r.msg_id).await?;
        if mark.moved && mark.receipts {
            let read =
                Live::Read { conversation_id: r.conversation_id, user_id: r.user_id, read_msg_id: mark.read_msg_id };
            match serde_json::to_vec(&read) {
                Ok(body) => {
                    if let Err(e) = self.bus.publish(LIVE_SUBJECT, Vec::new(), body.into()).await {
                        // A receipt is a live signal: lost with the bus, found again by a
                        // resume (the position is stored).
                        tracing::warn!(error = %e, "cannot publish a read receipt");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot encode a read receipt"),
            }
        }
        Ok(ReadAnswer { read_msg_id: mark.read_msg_id, unread: mark.unread })
    }

    async fn update(&self, r: UpdateConversation) -> Reply<ConversationMeta> {
        let c = &r.changes;
        check_conversation_id(&c.conversation_id)?;
        if let Some(by) = &r.by {
            check_user_id("user_id", by)?;
            if c.meta_role.is_some() || c.receipts.is_some() || c.presence.is_some() {
                return Err(ServiceError::new(
                    ErrorCode::Forbidden,
                    "meta_role, receipts and presence are set by the business system",
                ));
            }
        }
        self.check_meta(c.title.as_deref(), c.avatar.as_deref(), c.ext.as_ref())?;
        if c.presence == Some(true) {
            self.presence_in_use.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let (meta, entries) = self.store.update_conversation(r.by.as_deref(), c).await?;
        publish_entries(&self.bus, &entries).await;
        Ok(meta)
    }

    async fn set_role(&self, r: SetMemberRole) -> Reply<RoleAnswer> {
        check_conversation_id(&r.conversation_id)?;
        check_user_id("user_id", &r.user_id)?;
        let (changed, entries) = self.store.set_member_role(&r.conversation_id, &r.user_id, r.role).await?;
        publish_entries(&self.bus, &entries).await;
        Ok(RoleAnswer { changed })
    }

    /// A membership change is stored with a system message naming the users; that message
    /// must cross the bus to the gateways (as a log entry, in gap fills, in replays), so a
    /// list too long for it is refused before anything is stored.
    fn system_message_fits(&self, users: &[String]) -> Result<(), ServiceError> {
        let content = system::content(&system::Users { user_ids: users.to_vec() });
        // The entry around the content: ids, numbers, trace context.
        let len = size::encoded_len(&content) + 1024;
        let budget = self.bus.payload_budget();
        if len > budget {
            return Err(ServiceError::new(
                ErrorCode::TooLargeForBus,
                format!(
                    "the system message naming these users would take {len} bytes, over the bus's {budget}: name fewer users per request"
                ),
            ));
        }
        Ok(())
    }

    /// One page of a user's memberships, as many as fit in one bus message.
    async fn memberships(&self, r: GetMemberships) -> Reply<Memberships> {
        check_user_id("user_id", &r.user_id)?;
        let mut page = self.store.memberships(&r.user_id, r.after.as_deref(), PAGE).await?;
        let budget = self.bus.payload_budget().saturating_sub(size::encoded_len(&page.heads));
        let fits = size::fitting(&page.conversations, budget, 0);
        if fits < page.conversations.len() {
            page.conversations.truncate(fits.max(1));
            page.more = true;
        }
        Ok(page)
    }

    /// One page of revocations, as many as fit in one bus message.
    async fn revocations(&self, r: ListRevocations) -> Reply<RevocationPage> {
        let limit = r.limit.clamp(1, PAGE);
        let mut page = self.store.revocations(r.since_ms, r.after.as_ref(), limit).await?;
        let fits = size::fitting(&page.revocations, self.bus.payload_budget(), 0);
        if fits < page.revocations.len() {
            page.revocations.truncate(fits.max(1));
            page.more = true;
        }
        Ok(page)
    }
}

/// Most rows of one page of memberships or revocations (each is also bounded by bytes).
const PAGE: u32 = 2000;

fn check_users(field: &str, users: &[String]) -> Result<(), ServiceError> {
    if users.len() > MAX_LIST {
        return Err(ServiceError::new(ErrorCode::TooManyItems, format!("{field} may name at most {MAX_LIST} users")));
    }
    users.iter().try_for_each(|u| check_user_id(field, u))
}

impl Handler for ConversationService {
    async fn handle(&self, subject: &str, payload: &[u8]) -> Bytes {
        match subject {
            CreateConversation::SUBJECT => answer(payload, |r| self.create(r)).await,
            Join::SUBJECT => answer(payload, |r| self.join(r)).await,
            Leave::SUBJECT => answer(payload, |r| self.leave(r)).await,
            Kick::SUBJECT => answer(payload, |r| self.kick(r)).await,
            SetArchived::SUBJECT => answer(payload, |r| self.set_archived(r)).await,
            CheckJoined::SUBJECT => {
                answer(payload, async |r: CheckJoined| {
                    check_conversation_id(&r.conversation_id)?;
                    Ok(self.store.is_member(&r.conversation_id, &r.user_id).await?)
                })
                .await
            }
            ListJoined::SUBJECT => {
                answer(payload, async |r: ListJoined| {
                    let limit = r.limit.clamp(1, 100);
                    let budget = self.bus.payload_budget();
                    Ok(self.store.list_joined(&r.user_id, r.archived, limit, r.cursor.as_deref(), budget).await?)
                })
                .await
            }
            GetDetail::SUBJECT => {
                answer(payload, async |r: GetDetail| {
                    check_conversation_id(&r.conversation_id)?;
                    let limit = r.members_limit.clamp(1, 1000);
                    let budget = self.bus.payload_budget();
                    Ok(self
                        .store
                        .detail(&r.conversation_id, &r.user_id, r.members_cursor.as_deref(), limit, budget)
                        .await?)
                })
                .await
            }
            MarkRead::SUBJECT => answer(payload, |r| self.mark_read(r)).await,
            PresenceConversations::SUBJECT => {
                answer(payload, async |r: PresenceConversations| {
                    check_user_id("user_id", &r.user_id)?;
                    if !self.presence_in_use.load(std::sync::atomic::Ordering::Relaxed) {
                        return Ok(Default::default());
                    }
                    let budget = self.bus.payload_budget();
                    let after = r.after.as_deref();
                    Ok(self.store.presence_conversations(&r.user_id, after, MAX_LIST as u32, budget).await?)
                })
                .await
            }
            RecordPresence::SUBJECT => {
                answer(payload, async |r: RecordPresence| {
                    if r.changes.len() > MAX_LIST {
                        return Err(ServiceError::new(ErrorCode::TooManyItems, format!("at most {MAX_LIST} changes")));
                    }
                    for c in &r.changes {
                        check_user_id("user_id", &c.user_id)?;
                    }
                    Ok(self.store.record_presence(&r.changes).await?)
                })
                .await
            }
            GetLastSeen::SUBJECT => {
                answer(payload, async |r: GetLastSeen| {
                    if r.user_ids.len() > MAX_LIST {
                        return Err(ServiceError::new(ErrorCode::TooManyItems, format!("at most {MAX_LIST} users")));
                    }
                    for u in &r.user_ids {
                        check_user_id("user_ids", u)?;
                    }
                    Ok(self.store.last_seen(&r.user_ids).await?)
                })
                .await
            }
            GetReceipts::SUBJECT => {
                answer(payload, async |r: GetReceipts| {
                    check_user_id("user_id", &r.user_id)?;
                    let after = r.after.as_ref().map(|(c, u)| (c.as_str(), u.as_str()));
                    let budget = self.bus.payload_budget();
                    Ok(self.store.receipts_since(&r.user_id, r.since_ms, after, RECEIPTS_PAGE, budget).await?)
                })
                .await
            }
            UpdateConversation::SUBJECT => answer(payload, |r| self.update(r)).await,
            SetMemberRole::SUBJECT => answer(payload, |r| self.set_role(r)).await,
            SetMute::SUBJECT => {
                answer(payload, async |r: SetMute| {
                    check_conversation_id(&r.conversation_id)?;
                    let muted = self.store.set_mute(&r.conversation_id, &r.user_id, r.muted).await?;
                    Ok(MuteAnswer { muted })
                })
                .await
            }
            ListMembers::SUBJECT => {
                answer(payload, async |r: ListMembers| {
                    check_conversation_id(&r.conversation_id)?;
                    let limit = r.limit.clamp(1, 1000);
                    let budget = self.bus.payload_budget();
                    Ok(self.store.members_page(&r.conversation_id, r.cursor.as_deref(), limit, budget).await?)
                })
                .await
            }
            GetMemberships::SUBJECT => answer(payload, |r| self.memberships(r)).await,
            RevokeTokens::SUBJECT => {
                answer(payload, async |r: RevokeTokens| {
                    check_user_id("user_id", &r.user_id)?;
                    if let Some(p) = &r.platform {
                        check_platform(p)?;
                    }
                    Ok(self.store.revoke(&r.user_id, r.platform.as_deref(), r.before_ms).await?)
                })
                .await
            }
            ListRevocations::SUBJECT => answer(payload, |r| self.revocations(r)).await,
            ConsumeTicket::SUBJECT => {
                answer(payload, async |r: ConsumeTicket| {
                    if r.ticket_id.is_empty() || r.ticket_id.len() > 64 {
                        return Err(ServiceError::invalid("ticket_id"));
                    }
                    Ok(self.store.consume_ticket(&r.ticket_id, r.expires_ms).await?)
                })
                .await
            }
            other => rpc::unknown_operation(other),
        }
    }
}
