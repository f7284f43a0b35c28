//! The /notify event format, in one place: one constructor per event kind, each producing
//! the JSON every transport writes (encoded once, shared by every connection that gets it),
//! the WebSocket answers to client frames, and the framing of SSE and long-poll. The golden
//! tests below pin the bytes clients parse (docs/protocol.md).

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use quickim_shared::error::ErrorCode;
use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::SignalKind;
use quickim_shared::telemetry::TraceContext;
use serde::Serialize;

/// The kinds of events a /notify stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// First event of every connection: where it starts.
    Ready,
    /// A message of one of the client's conversations.
    Message,
    /// The position moved without a message for this client.
    Cursor,
    /// The client's tokens were revoked; the stream ends.
    Kicked,
    /// The client cannot be resumed exactly: reload, then continue from the cursor.
    Resync,
    /// A member's read position moved (a read receipt; live, and the latest on resume).
    Read,
    /// A member's ephemeral signal (typing, ...): live only.
    Signal,
    /// A co-member came online or went offline (conversations with presence on): live only.
    Presence,
    /// A streaming message's next piece of text, or its text so far: live only.
    Stream,
}

impl EventKind {
    /// The `type` field (and the SSE `event:` line).
    pub const fn name(self) -> &'static str {
        match self {
            EventKind::Ready => "ready",
            EventKind::Message => "message",
            EventKind::Cursor => "cursor",
            EventKind::Kicked => "kicked",
            EventKind::Resync => "resync",
            EventKind::Read => "read",
            EventKind::Signal => "signal",
            EventKind::Presence => "presence",
            EventKind::Stream => "stream",
        }
    }
}

/// The transports of /notify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// WebSocket text frames.
    Ws,
    /// Server-Sent Events.
    Sse,
    /// Long-poll.
    Poll,
}

impl Transport {
    /// Every transport.
    pub const ALL: [Transport; 3] = [Transport::Ws, Transport::Sse, Transport::Poll];

    /// The `protoc` value, metric label and span attribute.
    pub const fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::Poll => "poll",
        }
    }

    /// The transport a `protoc` value names.
    pub fn parse(protoc: &str) -> Option<Transport> {
        Transport::ALL.into_iter().find(|t| t.name() == protoc)
    }
}

/// Why a stream is told to resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// The cursor is older than the replay window.
    CursorExpired,
    /// The cursor comes from another database (it was replaced).
    CursorFromAnotherDatabase,
}

impl ResyncReason {
    /// The `reason` field.
    pub const fn name(self) -> &'static str {
        match self {
            ResyncReason::CursorExpired => "cursor_expired",
            ResyncReason::CursorFromAnotherDatabase => "cursor_from_another_database",
        }
    }
}

/// An event encoded once, ready for any transport.
#[derive(Debug)]
pub struct Encoded {
    /// Its kind.
    pub kind: EventKind,
    /// The position after this event ("" for events without one).
    pub cursor: Arc<str>,
    /// The whole event as JSON.
    pub json: Bytes,
    /// For message events: what the socket write records.
    pub meta: Option<Meta>,
}

/// What a transport needs to trace and measure the write of a message event.
#[derive(Debug, Clone)]
pub struct Meta {
    /// The message's conversation.
    pub conversation_id: Arc<str>,
    /// The message's msg_id.
    pub msg_id: u64,
    /// When it was committed (ms), for the delivery-lag histogram.
    pub send_time: i64,
    /// The delivery's trace context, when the trace is recorded.
    pub trace: Option<TraceContext>,
}

#[derive(Serialize)]
struct WithCursor<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    cursor: &'a str,
}

#[derive(Serialize)]
struct MessageWire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    cursor: &'a str,
    message: &'a Message,
}

#[derive(Serialize)]
struct ResyncWire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    cursor: &'a str,
    reason: &'static str,
}

#[derive(Serialize)]
struct ReadWire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    conversation_id: &'a str,
    user_id: &'a str,
    read_msg_id: u64,
}

#[derive(Serialize)]
struct SignalWire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    conversation_id: &'a str,
    from: &'a str,
    #[serde(rename = "kind")]
    signal: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in_ms: Option<u64>,
}

#[derive(Serialize)]
struct PresenceWire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    user_id: &'a str,
    online: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seen: Option<i64>,
}

#[derive(Serialize)]
struct StreamWire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    conversation_id: &'a str,
    msg_id: u64,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

fn json<T: Serialize>(value: &T) -> Bytes {
    // These types cannot fail to serialize.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

impl Encoded {
    /// `{"type":"ready","cursor":…}`
    pub fn ready(cursor: Arc<str>) -> Arc<Encoded> {
        let json = json(&WithCursor { kind: EventKind::Ready.name(), cursor: &cursor });
        Arc::new(Encoded { kind: EventKind::Ready, cursor, json, meta: None })
    }

    /// `{"type":"message","cursor":…,"message":{…}}`; its write belongs to `trace`.
    pub fn message(cursor: Arc<str>, message: &Message, trace: Option<TraceContext>) -> Arc<Encoded> {
        let json = json(&MessageWire { kind: EventKind::Message.name(), cursor: &cursor, message });
        let meta = Meta {
            conversation_id: Arc::from(message.conversation_id.as_str()),
            msg_id: message.msg_id,
            send_time: message.send_time,
            trace,
        };
        Arc::new(Encoded { kind: EventKind::Message, cursor, json, meta: Some(meta) })
    }

    /// `{"type":"cursor","cursor":…}`
    pub fn cursor(cursor: Arc<str>) -> Arc<Encoded> {
        let json = json(&WithCursor { kind: EventKind::Cursor.name(), cursor: &cursor });
        Arc::new(Encoded { kind: EventKind::Cursor, cursor, json, meta: None })
    }

    /// `{"type":"resync","cursor":…,"reason":…}`
    pub fn resync(cursor: Arc<str>, reason: ResyncReason) -> Arc<Encoded> {
        let json = json(&ResyncWire { kind: EventKind::Resync.name(), cursor: &cursor, reason: reason.name() });
        Arc::new(Encoded { kind: EventKind::Resync, cursor, json, meta: None })
    }

    /// `{"type":"read","conversation_id":…,"user_id":…,"read_msg_id":N}` (no cursor: not
    /// a place in the log).
    pub fn read(conversation_id: &str, user_id: &str, read_msg_id: u64) -> Arc<Encoded> {
        let json = json(&ReadWire { kind: EventKind::Read.name(), conversation_id, user_id, read_msg_id });
        Arc::new(Encoded { kind: EventKind::Read, cursor: Arc::from(""), json, meta: None })
    }

    /// `{"type":"signal","conversation_id":…,"from":…,"kind":…,"content"?:…,"expires_in_ms"?:N}`
    /// (no cursor); `expires_in_ms` for `typing`.
    pub fn signal(
        conversation_id: &str,
        from: &str,
        kind: SignalKind,
        content: Option<&str>,
        typing_ttl_ms: u64,
    ) -> Arc<Encoded> {
        let wire = SignalWire {
            kind: EventKind::Signal.name(),
            conversation_id,
            from,
            signal: kind.name(),
            content,
            expires_in_ms: (kind == SignalKind::Typing).then_some(typing_ttl_ms),
        };
        Arc::new(Encoded { kind: EventKind::Signal, cursor: Arc::from(""), json: json(&wire), meta: None })
    }

    /// `{"type":"presence","user_id":…,"online":bool,"last_seen"?:ms}` (no cursor).
    pub fn presence(user_id: &str, online: bool, last_seen: Option<i64>) -> Arc<Encoded> {
        let json = json(&PresenceWire { kind: EventKind::Presence.name(), user_id, online, last_seen });
        Arc::new(Encoded { kind: EventKind::Presence, cursor: Arc::from(""), json, meta: None })
    }

    /// `{"type":"stream","conversation_id":…,"msg_id":N,"seq":N,"delta":…}`: the next piece
    /// of a streaming message (no cursor).
    pub fn stream_delta(conversation_id: &str, msg_id: u64, seq: u64, delta: &str) -> Arc<Encoded> {
        let wire = StreamWire {
            kind: EventKind::Stream.name(),
            conversation_id,
            msg_id,
            seq,
            delta: Some(delta),
            content: None,
        };
        Arc::new(Encoded { kind: EventKind::Stream, cursor: Arc::from(""), json: json(&wire), meta: None })
    }

    /// `{"type":"stream","conversation_id":…,"msg_id":N,"seq":N,"content":…}`: a streaming
    /// message's text up to delta `seq` (for a connection that arrives mid-stream).
    pub fn stream_snapshot(conversation_id: &str, msg_id: u64, seq: u64, content: &str) -> Arc<Encoded> {
        let wire = StreamWire {
            kind: EventKind::Stream.name(),
            conversation_id,
            msg_id,
            seq,
            delta: None,
            content: Some(content),
        };
        Arc::new(Encoded { kind: EventKind::Stream, cursor: Arc::from(""), json: json(&wire), meta: None })
    }

    /// `{"type":"kicked","reason":"kick_user"}` (no cursor: the stream ends).
    pub fn kicked() -> Arc<Encoded> {
        Arc::new(Encoded {
            kind: EventKind::Kicked,
            cursor: Arc::from(""),
            json: Bytes::from_static(br#"{"type":"kicked","reason":"kick_user"}"#),
            meta: None,
        })
    }
}

// ---------------------------------------------------------------- WebSocket answers

#[derive(Serialize)]
struct Ack<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    req_id: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_msg_id: Option<u64>,
}

#[derive(Serialize)]
struct ErrorWire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    req_id: Option<&'a serde_json::Value>,
    code: u32,
    error: &'a str,
}

/// `{"type":"ack","req_id":…,"message":{…}}`: a `send` frame's message is stored.
pub fn ack_send(req_id: &serde_json::Value, message: &Message) -> String {
    serde_json::to_string(&Ack { kind: "ack", req_id, message: Some(message), read_msg_id: None }).unwrap_or_default()
}

/// `{"type":"ack","req_id":…}`: a frame without an answer of its own (`signal`) was taken.
pub fn ack(req_id: &serde_json::Value) -> String {
    serde_json::to_string(&Ack { kind: "ack", req_id, message: None, read_msg_id: None }).unwrap_or_default()
}

/// `{"type":"ack","req_id":…,"read_msg_id":N}`: a `mark_read` frame's answer.
pub fn ack_read(req_id: &serde_json::Value, read_msg_id: u64) -> String {
    serde_json::to_string(&Ack { kind: "ack", req_id, message: None, read_msg_id: Some(read_msg_id) })
        .unwrap_or_default()
}

/// `{"type":"error","req_id":…,"code":N,"error":"…"}`: a client frame failed.
pub fn error(req_id: Option<&serde_json::Value>, code: ErrorCode, text: &str) -> String {
    serde_json::to_string(&ErrorWire { kind: "error", req_id, code: code.number(), error: text }).unwrap_or_default()
}

// ---------------------------------------------------------------- framing

/// Appends `e` as one SSE event: `id:` (when it has a cursor), `event:`, `data:`.
pub fn sse_frame(out: &mut BytesMut, e: &Encoded) {
    if !e.cursor.is_empty() {
        out.put_slice(b"id: ");
        out.put_slice(e.cursor.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: ");
    out.put_slice(e.kind.name().as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(&e.json);
    out.put_slice(b"\n\n");
}

/// The first bytes of an SSE stream: the browser retries a second after a drop.
pub const SSE_PREAMBLE: &[u8] = b"retry: 1000\n\n";

/// An SSE heartbeat comment, with an `id:` line when the position moved (the browser's
/// `lastEventId` follows it without an event).
pub fn sse_heartbeat(moved_to: Option<&str>) -> Bytes {
    match moved_to {
        Some(cursor) => Bytes::from(format!("id: {cursor}\n: heartbeat\n\n")),
        None => Bytes::from_static(b": heartbeat\n\n"),
    }
}

/// A long-poll answer: `{"code":0,"data":{"events":[…],"cursor":"…"}}`.
pub fn poll_body(events: &[Arc<Encoded>], cursor: &str) -> Bytes {
    let mut body = BytesMut::with_capacity(64 + events.iter().map(|e| e.json.len() + 1).sum::<usize>());
    body.put_slice(br#"{"code":0,"data":{"events":["#);
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        body.put_slice(&e.json);
    }
    body.put_slice(br#"],"cursor":"#);
    body.put_slice(serde_json::to_string(cursor).unwrap_or_default().as_bytes());
    body.put_slice(b"}}");
    body.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Message {
        Message {
            conversation_id: "c1".into(),
            msg_id: 3,
            from: "alice".into(),
            msg_type: 1,
            content: "hi \"there\"\n".into(),
            client_msg_id: Some("k1".into()),
            send_time: 1_700_000_000_000,
            ..Default::default()
        }
    }

    fn text(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    /// The wire format is a contract: these bytes are what clients parse.
    #[test]
    fn golden_events() {
        let cases = [
            (Encoded::ready(Arc::from("AQ")), EventKind::Ready, r#"{"type":"ready","cursor":"AQ"}"#),
            (
                Encoded::message(Arc::from("AQ"), &message(), None),
                EventKind::Message,
                r#"{"type":"message","cursor":"AQ","message":{"conversation_id":"c1","msg_id":3,"from":"alice","type":1,"content":"hi \"there\"\n","client_msg_id":"k1","send_time":1700000000000}}"#,
            ),
            (Encoded::cursor(Arc::from("AQ")), EventKind::Cursor, r#"{"type":"cursor","cursor":"AQ"}"#),
            (Encoded::kicked(), EventKind::Kicked, r#"{"type":"kicked","reason":"kick_user"}"#),
            (
                Encoded::resync(Arc::from("AQ"), ResyncReason::CursorExpired),
                EventKind::Resync,
                r#"{"type":"resync","cursor":"AQ","reason":"cursor_expired"}"#,
            ),
            (
                Encoded::resync(Arc::from("AQ"), ResyncReason::CursorFromAnotherDatabase),
                EventKind::Resync,
                r#"{"type":"resync","cursor":"AQ","reason":"cursor_from_another_database"}"#,
            ),
            (
                Encoded::presence("bob", true, None),
                EventKind::Presence,
                r#"{"type":"presence","user_id":"bob","online":true}"#,
            ),
            (
                Encoded::presence("bob", false, Some(1_795_000_000_000)),
                EventKind::Presence,
                r#"{"type":"presence","user_id":"bob","online":false,"last_seen":1795000000000}"#,
            ),
            (
                Encoded::stream_delta("c1", 7, 3, "lo"),
                EventKind::Stream,
                r#"{"type":"stream","conversation_id":"c1","msg_id":7,"seq":3,"delta":"lo"}"#,
            ),
            (
                Encoded::stream_snapshot("c1", 7, 3, "hello"),
                EventKind::Stream,
                r#"{"type":"stream","conversation_id":"c1","msg_id":7,"seq":3,"content":"hello"}"#,
            ),
            (
                Encoded::read("c1", "bob", 12),
                EventKind::Read,
                r#"{"type":"read","conversation_id":"c1","user_id":"bob","read_msg_id":12}"#,
            ),
            (
                Encoded::signal("c1", "bob", SignalKind::Typing, None, 6000),
                EventKind::Signal,
                r#"{"type":"signal","conversation_id":"c1","from":"bob","kind":"typing","expires_in_ms":6000}"#,
            ),
            (
                Encoded::signal("c1", "bob", SignalKind::TypingStopped, None, 6000),
                EventKind::Signal,
                r#"{"type":"signal","conversation_id":"c1","from":"bob","kind":"typing_stopped"}"#,
            ),
            (
                Encoded::signal("c1", "bob", SignalKind::Custom, Some("recording \"audio\""), 6000),
                EventKind::Signal,
                r#"{"type":"signal","conversation_id":"c1","from":"bob","kind":"custom","content":"recording \"audio\""}"#,
            ),
        ];
        for (event, kind, json) in cases {
            assert_eq!(text(&event.json), json);
            assert_eq!(event.kind, kind);
            assert_eq!(event.kind.name(), serde_json::from_str::<serde_json::Value>(json).unwrap()["type"]);
        }
        let m = Encoded::message(Arc::from("AQ"), &message(), None);
        let meta = m.meta.as_ref().unwrap();
        assert_eq!((&*meta.conversation_id, meta.msg_id, meta.send_time), ("c1", 3, 1_700_000_000_000));
    }

    #[test]
    fn golden_websocket_answers() {
        let req = serde_json::json!(7);
        assert_eq!(
            ack_send(&req, &message()),
            r#"{"type":"ack","req_id":7,"message":{"conversation_id":"c1","msg_id":3,"from":"alice","type":1,"content":"hi \"there\"\n","client_msg_id":"k1","send_time":1700000000000}}"#
        );
        assert_eq!(ack_read(&serde_json::json!("r"), 9), r#"{"type":"ack","req_id":"r","read_msg_id":9}"#);
        assert_eq!(ack(&serde_json::json!("s")), r#"{"type":"ack","req_id":"s"}"#);
        assert_eq!(
            error(Some(&serde_json::json!("a")), ErrorCode::NotMember, "not a member"),
            r#"{"type":"error","req_id":"a","code":40301,"error":"not a member"}"#
        );
        assert_eq!(
            error(None, ErrorCode::InvalidParam, "bad frame"),
            r#"{"type":"error","code":40000,"error":"bad frame"}"#
        );
    }

    #[test]
    fn golden_sse_framing() {
        let mut out = BytesMut::new();
        out.put_slice(SSE_PREAMBLE);
        sse_frame(&mut out, &Encoded::ready(Arc::from("AQ")));
        sse_frame(&mut out, &Encoded::kicked());
        out.put_slice(&sse_heartbeat(None));
        out.put_slice(&sse_heartbeat(Some("AR")));
        assert_eq!(
            text(&out),
            "retry: 1000\n\nid: AQ\nevent: ready\ndata: {\"type\":\"ready\",\"cursor\":\"AQ\"}\n\n\
             event: kicked\ndata: {\"type\":\"kicked\",\"reason\":\"kick_user\"}\n\n\
             : heartbeat\n\nid: AR\n: heartbeat\n\n"
        );
    }

    #[test]
    fn golden_poll_framing() {
        let events = [Encoded::cursor(Arc::from("AQ")), Encoded::ready(Arc::from("AR"))];
        let body = poll_body(&events, "AR");
        assert_eq!(
            text(&body),
            r#"{"code":0,"data":{"events":[{"type":"cursor","cursor":"AQ"},{"type":"ready","cursor":"AR"}],"cursor":"AR"}}"#
        );
        assert_eq!(text(&poll_body(&[], "AS")), r#"{"code":0,"data":{"events":[],"cursor":"AS"}}"#);
    }

    #[test]
    fn transports_by_name() {
        for t in Transport::ALL {
            assert_eq!(Transport::parse(t.name()), Some(t));
        }
        assert_eq!(Transport::parse("wss"), None);
    }
}
