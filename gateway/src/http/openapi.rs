//! The OpenAPI document of the whole API, built from the protocol types (so it cannot drift
//! from them) and a table of routes. `quickim openapi` prints it; docs/openapi.json is that
//! output, checked by a test.

use utoipa::ToSchema;
use utoipa::openapi::path::{OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ComponentsBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HttpMethod, InfoBuilder, OpenApi, OpenApiBuilder, PathItem, PathsBuilder, Ref, RefOr,
    ResponseBuilder, ServerBuilder,
};

use quickim_shared::error::ErrorCode;
use quickim_shared::protocol::api as a;

/// Who may call a route.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Client,
    Inner,
    Open,
}

struct Route {
    path: &'static str,
    summary: &'static str,
    request: Option<&'static str>,
    data: Option<&'static str>,
    access: Access,
}

const fn route(
    path: &'static str,
    summary: &'static str,
    request: &'static str,
    data: &'static str,
    access: Access,
) -> Route {
    Route { path, summary, request: Some(request), data: Some(data), access }
}

/// Every POST route of the API, public and inner.
const ROUTES: &[Route] = &[
    route("/send_msg", "Send a message (answers once it is stored)", "SendMsgRequest", "Message", Access::Client),
    route(
        "/notify_ticket",
        "A single-use ticket for the next /notify connection (keeps the token out of URLs)",
        "NotifyTicketRequest",
        "NotifyTicketAnswer",
        Access::Client,
    ),
    route(
        "/check_joined_conversation",
        "Whether the caller is a member",
        "ConversationRequest",
        "JoinedAnswer",
        Access::Client,
    ),
    route(
        "/get_joined_conversation",
        "The caller's conversations, newest activity first",
        "GetJoinedRequest",
        "JoinedConversations",
        Access::Client,
    ),
    route(
        "/get_conversation_detail",
        "A conversation with a page of its members",
        "DetailRequest",
        "ConversationDetail",
        Access::Client,
    ),
    route(
        "/create_conversation",
        "Create a conversation owned by the caller",
        "CreateConversationRequest",
        "CreatedConversation",
        Access::Client,
    ),
    route("/join_conversation", "Join a joinable conversation", "ConversationRequest", "JoinedAnswer", Access::Client),
    route("/leave_conversation", "Leave a conversation", "ConversationRequest", "LeftAnswer", Access::Client),
    route(
        "/get_lastone_msgid",
        "Newest msg_id of a conversation",
        "ConversationRequest",
        "MsgIdAnswer",
        Access::Client,
    ),
    route("/mark_read", "Move the caller's read position forward", "MarkReadRequest", "ReadAnswer", Access::Client),
    route(
        "/signal",
        "Send an ephemeral signal (typing, ...) to the conversation's other members",
        "SignalRequest",
        "SignalAnswer",
        Access::Client,
    ),
    route(
        "/get_conversation_msg_by_range",
        "Messages start..=end (at most range_max)",
        "RangeRequest",
        "MsgsAnswer",
        Access::Client,
    ),
    route(
        "/get_conversation_30msg_before_the_id",
        "Up to 30 messages before msg_id",
        "AroundRequest",
        "MsgsAnswer",
        Access::Client,
    ),
    route(
        "/get_conversation_30msg_after_the_id",
        "Up to 30 messages after msg_id",
        "AroundRequest",
        "MsgsAnswer",
        Access::Client,
    ),
    route("/get_conversation_last_30_msg", "The newest 30 messages", "LastMsgsRequest", "MsgsAnswer", Access::Client),
    route(
        "/get_conversation_lastone_msg",
        "The newest message, or null",
        "ConversationRequest",
        "LastOneAnswer",
        Access::Client,
    ),
    route("/edit_msg", "Edit one's own message (within edit_window_s)", "EditMsgRequest", "Message", Access::Client),
    route("/recall_msg", "Recall one's own message (within recall_window_s)", "MsgRequest", "Message", Access::Client),
    route("/delete_msg", "Delete one's own message", "MsgRequest", "Message", Access::Client),
    route(
        "/open_stream",
        "Open a streaming message (stored empty now)",
        "OpenStreamRequest",
        "Message",
        Access::Client,
    ),
    route(
        "/stream_delta",
        "Append to one's open stream (live only)",
        "StreamDeltaRequest",
        "StreamDeltaAnswer",
        Access::Client,
    ),
    route("/finish_stream", "Store one's stream's final content", "FinishStreamRequest", "Message", Access::Client),
    route("/cancel_stream", "Abandon one's stream (deleted)", "MsgRequest", "Message", Access::Client),
    route(
        "/get_msg_versions",
        "The versions of an edited message",
        "VersionsRequest",
        "VersionsAnswer",
        Access::Client,
    ),
    route(
        "/update_conversation",
        "Change title, avatar or ext (roles the conversation's meta_role allows)",
        "UpdateConversationRequest",
        "ConversationMeta",
        Access::Client,
    ),
    route(
        "/set_conversation_mute",
        "Mute or unmute a conversation for the caller",
        "MuteRequest",
        "MuteAnswer",
        Access::Client,
    ),
    route("/inner/get_token", "Issue a client token", "GetTokenRequest", "TokenAnswer", Access::Inner),
    route(
        "/inner/create_conversation",
        "Create a conversation (idempotent for a named id)",
        "InnerCreateConversationRequest",
        "CreatedConversation",
        Access::Inner,
    ),
    route("/inner/join_conversation", "Add members", "InnerMembersRequest", "JoinedUsers", Access::Inner),
    route(
        "/inner/kickout_conversation",
        "Remove members (their streams stop getting the conversation)",
        "InnerMembersRequest",
        "KickedUsers",
        Access::Inner,
    ),
    route(
        "/inner/set_archive_conversations",
        "Archive or unarchive conversations",
        "SetArchiveRequest",
        "ArchiveAnswer",
        Access::Inner,
    ),
    route(
        "/inner/send_msg",
        "Send a message as a member or as the system (from \"\")",
        "InnerSendMsgRequest",
        "Message",
        Access::Inner,
    ),
    route(
        "/inner/send_msg_batch",
        "Send several messages, one result each, in order",
        "InnerSendBatchRequest",
        "BatchAnswer",
        Access::Inner,
    ),
    route(
        "/inner/get_users_online",
        "Presence across every gateway node",
        "UsersOnlineRequest",
        "UsersOnlineAnswer",
        Access::Inner,
    ),
    route(
        "/inner/kick_user",
        "Close a user's connections everywhere and revoke older tokens",
        "KickUserRequest",
        "KickUserAnswer",
        Access::Inner,
    ),
    route("/inner/edit_msg", "Edit any message", "EditMsgRequest", "Message", Access::Inner),
    route("/inner/recall_msg", "Recall any message", "MsgRequest", "Message", Access::Inner),
    route("/inner/delete_msg", "Delete any message", "MsgRequest", "Message", Access::Inner),
    route(
        "/inner/open_stream",
        "Open a streaming message (a bot's reply)",
        "InnerOpenStreamRequest",
        "Message",
        Access::Inner,
    ),
    route(
        "/inner/stream_delta",
        "Append to any open stream (live only)",
        "StreamDeltaRequest",
        "StreamDeltaAnswer",
        Access::Inner,
    ),
    route("/inner/finish_stream", "Store a stream's final content", "FinishStreamRequest", "Message", Access::Inner),
    route("/inner/cancel_stream", "Abandon a stream (deleted)", "MsgRequest", "Message", Access::Inner),
    route(
        "/inner/get_msg_versions",
        "The versions of an edited message",
        "VersionsRequest",
        "VersionsAnswer",
        Access::Inner,
    ),
    route(
        "/inner/update_conversation",
        "Change title, avatar, ext, meta_role and receipts",
        "UpdateConversationRequest",
        "ConversationMeta",
        Access::Inner,
    ),
    route(
        "/inner/set_member_role",
        "Set a member's role (a new owner makes the former one an admin)",
        "SetMemberRoleRequest",
        "RoleAnswer",
        Access::Inner,
    ),
    route(
        "/inner/get_user_conversations",
        "A user's conversation list, as the user sees it",
        "UserConversationsRequest",
        "JoinedConversations",
        Access::Inner,
    ),
    route(
        "/inner/get_conversation_members",
        "A page of a conversation's members",
        "ConversationMembersRequest",
        "MembersPage",
        Access::Inner,
    ),
];

/// The POST routes the document lists (for tests that check the router serves them all).
pub fn documented_routes() -> impl Iterator<Item = (&'static str, bool)> {
    ROUTES.iter().map(|r| (r.path, r.access == Access::Inner))
}

fn schema_ref(name: &str) -> RefOr<utoipa::openapi::schema::Schema> {
    RefOr::Ref(Ref::from_schema_name(name))
}

fn envelope(data: Option<&str>) -> ObjectBuilder {
    let mut o = ObjectBuilder::new()
        .property("code", ObjectBuilder::new().schema_type(Type::Integer).description(Some("0 on success")))
        .required("code");
    if let Some(d) = data {
        o = o.property("data", schema_ref(d)).required("data");
    }
    o
}

fn error_responses(op: OperationBuilder, access: Access) -> OperationBuilder {
    let codes: Vec<String> =
        ErrorCode::ALL.iter().map(|c| format!("{} {} ({})", c.number(), c.name(), c.http_status())).collect();
    let mut op = op;
    let mut statuses: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.http_status()).collect();
    statuses.sort_unstable();
    statuses.dedup();
    for status in statuses {
        if access == Access::Open && status != 503 {
            continue;
        }
        let here: Vec<&str> = codes.iter().filter(|c| c.contains(&format!("({status})"))).map(String::as_str).collect();
        op = op.response(
            status.to_string(),
            ResponseBuilder::new()
                .description(format!("Failure: {}", here.join(", ")))
                .content("application/json", ContentBuilder::new().schema(Some(schema_ref("ErrorBody"))).build()),
        );
    }
    op
}

fn post(r: &Route) -> PathItem {
    let mut op = OperationBuilder::new()
        .summary(Some(r.summary))
        .operation_id(Some(r.path.trim_start_matches('/').replace('/', "_")))
        .tag(if r.access == Access::Inner { "inner" } else { "client" })
        .response(
            "200",
            ResponseBuilder::new()
                .description("Success")
                .content("application/json", ContentBuilder::new().schema(Some(envelope(r.data))).build()),
        );
    if let Some(req) = r.request {
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(utoipa::openapi::Required::True))
                .content("application/json", ContentBuilder::new().schema(Some(schema_ref(req))).build())
                .build(),
        ));
    }
    op = op.security(SecurityRequirement::new(
        if r.access == Access::Inner { "inner_key" } else { "client_token" },
        Vec::<String>::new(),
    ));
    PathItem::new(HttpMethod::Post, error_responses(op, r.access))
}

fn get(summary: &str, description: &str, params: &[(&str, &str)], access: Access) -> PathItem {
    let mut op = OperationBuilder::new()
        .summary(Some(summary))
        .description(Some(description))
        .response("200", ResponseBuilder::new().description("Success"));
    for (name, desc) in params {
        op = op.parameter(
            ParameterBuilder::new()
                .name(*name)
                .parameter_in(ParameterIn::Query)
                .required(utoipa::openapi::Required::False)
                .description(Some(*desc))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
        );
    }
    if access == Access::Client {
        op = op.security(SecurityRequirement::new("client_token", Vec::<String>::new()));
    }
    PathItem::new(HttpMethod::Get, error_responses(op, access))
}

/// Builds the document.
pub fn document() -> OpenApi {
    let mut paths = PathsBuilder::new();
    for r in ROUTES {
        paths = paths.path(r.path, post(r));
    }
    paths = paths
        .path(
            "/notify",
            get(
                "Realtime events over WebSocket, SSE or long-poll",
                "See docs/protocol.md: events `ready`, `message`, `kicked`, `resync` (and on WS `ack`/`error`), each with an opaque cursor.",
                &[
                    ("protoc", "ws | sse | poll"),
                    ("token", "client token (when the Authorization header cannot be set; prefer a ticket)"),
                    ("ticket", "a single-use ticket from POST /notify_ticket, instead of the token"),
                    ("cursor", "resume after this cursor"),
                    ("last_event_id", "SSE: same as the Last-Event-ID header"),
                    ("timeout", "poll: seconds to wait for the first event (default 30, max 60)"),
                ],
                Access::Client,
            ),
        )
        .path("/healthz", get("Liveness", "200 while the process runs.", &[], Access::Open))
        .path("/readyz", get("Readiness", "200 when the bus, the services and the database answer; 503 otherwise.", &[], Access::Open))
        .path("/metrics", get("Prometheus metrics", "Text exposition format (inner listener).", &[], Access::Open))
        .path("/openapi.json", get("This document", "OpenAPI 3.1.", &[], Access::Open));

    let mut components = ComponentsBuilder::new()
        .security_scheme(
            "client_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        )
        .security_scheme("inner_key", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    macro_rules! schemas {
        ($($t:ty),* $(,)?) => { $( components = components.schema(<$t as ToSchema>::name(), <$t as utoipa::PartialSchema>::schema()); )* };
    }
    schemas!(
        a::Message,
        a::SendMsgRequest,
        a::ConversationRequest,
        a::DetailRequest,
        a::NotifyTicketRequest,
        a::NotifyTicketAnswer,
        a::LastMsgsRequest,
        a::GetJoinedRequest,
        a::CreateConversationRequest,
        a::MarkReadRequest,
        a::RangeRequest,
        a::AroundRequest,
        a::JoinedAnswer,
        a::LeftAnswer,
        a::ConversationSummary,
        a::JoinedConversations,
        a::MemberInfo,
        a::Role,
        a::ConversationDetail,
        a::CreatedConversation,
        a::MsgIdAnswer,
        a::ReadAnswer,
        a::MsgsAnswer,
        a::LastOneAnswer,
        a::GetTokenRequest,
        a::TokenAnswer,
        a::InnerCreateConversationRequest,
        a::InnerMembersRequest,
        a::JoinedUsers,
        a::KickedUsers,
        a::SetArchiveRequest,
        a::ArchiveAnswer,
        a::InnerSendMsgRequest,
        a::InnerSendBatchRequest,
        a::BatchItemResult,
        a::BatchAnswer,
        a::UsersOnlineRequest,
        a::UserOnline,
        a::UsersOnlineAnswer,
        a::KickUserRequest,
        a::KickUserAnswer,
        a::EditMsgRequest,
        a::MsgRequest,
        a::VersionsRequest,
        a::MsgVersion,
        a::VersionsAnswer,
        a::UpdateConversationRequest,
        a::ConversationMeta,
        a::MetaRole,
        a::MuteRequest,
        a::MuteAnswer,
        a::SetMemberRoleRequest,
        a::RoleAnswer,
        a::MemberRole,
        a::UserConversationsRequest,
        a::ConversationMembersRequest,
        a::MembersPage,
        a::SignalRequest,
        a::SignalAnswer,
        a::OpenStreamRequest,
        a::InnerOpenStreamRequest,
        a::StreamDeltaRequest,
        a::StreamDeltaAnswer,
        a::FinishStreamRequest,
        quickim_shared::protocol::event::SignalKind,
        a::ErrorBody,
    );
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("quickim")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Realtime message gateway. Client routes on the public listener (JWT); /inner routes on the inner listener (inner key). Every answer is an envelope: {\"code\":0,\"data\":...} or {\"code\":N,\"error\":\"...\"}.",
                )),
        )
        .servers(Some(vec![
            ServerBuilder::new().url("http://127.0.0.1:8080").description(Some("public listener")).build(),
            ServerBuilder::new().url("http://127.0.0.1:8081").description(Some("inner listener")).build(),
        ]))
        .paths(paths.build())
        .components(Some(components.build()))
        .build()
}

/// The document as pretty JSON.
pub fn document_json() -> String {
    document().to_pretty_json().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_referenced_schema_exists() {
        let json: serde_json::Value = serde_json::from_str(&document_json()).unwrap();
        let schemas = json["components"]["schemas"].as_object().unwrap();
        let text = document_json();
        for part in text.split("\"#/components/schemas/").skip(1) {
            let name = part.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "missing schema {name}");
        }
        assert_eq!(json["paths"].as_object().unwrap().len(), ROUTES.len() + 5);
    }

    #[test]
    fn the_checked_in_document_is_current() {
        let checked_in = include_str!("../../../docs/openapi.json");
        assert_eq!(
            checked_in.trim(),
            document_json().trim(),
            "docs/openapi.json is stale: run `cargo run -- openapi > docs/openapi.json`"
        );
    }
}
