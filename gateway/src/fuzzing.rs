//! What the fuzz targets (`fuzz/`) exercise, here so that the kept corpus also runs as a
//! plain test (`tests/api/fuzz_corpus.rs`): each function takes arbitrary bytes and must
//! never panic; the checks in them are properties that must hold for every input.

use quickim_shared::error::ErrorCode;
use quickim_shared::protocol::api as a;
use quickim_shared::protocol::event::ClientFrame;

use crate::listener::{Triage, triage};
use crate::notify::cursor::Cursor;

/// The public listener's own request-head path: what it serves itself is a bodiless
/// `GET /notify` whose head fits in what was read, and its query reads or is refused as
/// 400.
pub fn request_head(data: &[u8]) {
    if let Triage::Lean(request, _keep_alive, len) = triage(data) {
        assert!(len <= data.len());
        assert_eq!(request.method(), axum::http::Method::GET);
        assert_eq!(request.uri().path(), "/notify");
        if let Err(e) = crate::notify::query_of(request.uri()) {
            assert_eq!(e.code, ErrorCode::InvalidParam);
        }
    }
}

/// Cursor decoding: anything that decodes encodes back to the same cursor.
pub fn cursor(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = Cursor::decode(text) {
        let again = Cursor::decode(&c.encode());
        assert!(again.is_ok_and(|a| a == c), "a cursor we encode decodes back");
    }
}

/// WebSocket client frames: read as the server reads them (a frame it cannot read is
/// answered with an error frame, never a panic).
pub fn ws_frame(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = serde_json::from_str::<ClientFrame>(text);
    let _ = serde_json::from_str::<serde_json::Value>(text).ok().and_then(|v| v.get("req_id").cloned());
}

/// JSON request bodies: the first byte picks the route's body type, the rest is the body.
pub fn json_body(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else { return };
    macro_rules! read {
        ($($t:ty),* $(,)?) => {{
            let readers: &[fn(&[u8])] = &[$(|b| { let _ = serde_json::from_slice::<$t>(b); }),*];
            readers[usize::from(which) % readers.len()](body)
        }};
    }
    read!(
        a::SendMsgRequest,
        a::ConversationRequest,
        a::DetailRequest,
        a::LastMsgsRequest,
        a::GetJoinedRequest,
        a::CreateConversationRequest,
        a::MarkReadRequest,
        a::RangeRequest,
        a::AroundRequest,
        a::GetTokenRequest,
        a::NotifyTicketRequest,
        a::InnerCreateConversationRequest,
        a::InnerMembersRequest,
        a::SetArchiveRequest,
        a::InnerSendMsgRequest,
        a::InnerSendBatchRequest,
        a::UsersOnlineRequest,
        a::KickUserRequest,
    );
}
