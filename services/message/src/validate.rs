//! Shape checks of a message to send; state checks happen in the store's transaction.

use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::ids::{check_client_msg_id, check_conversation_id, check_user_id};
use quickim_shared::protocol::service::{Origin, ReviseMessage, SendMessage};
use quickim_shared::protocol::system::Action;
use quickim_store::{Revision, SendItem};

/// Checks ids, type and content size; answers what the store takes.
pub(crate) fn send_item(r: SendMessage, max_content_bytes: usize) -> Result<SendItem, ServiceError> {
    check_conversation_id(&r.conversation_id)?;
    if r.from.is_empty() {
        if r.origin == Origin::Client {
            return Err(ServiceError::invalid("from must be a user"));
        }
    } else {
        check_user_id("from", &r.from)?;
    }
    if r.msg_type < 0 {
        return Err(ServiceError::invalid("type must be ≥ 0; negative types are reserved for system messages"));
    }
    content(&r.content, max_content_bytes)?;
    if r.origin == Origin::Client && !r.count_unread {
        return Err(ServiceError::invalid("count_unread is for the business system"));
    }
    if let Some(k) = &r.client_msg_id {
        check_client_msg_id(k)?;
    }
    Ok(SendItem {
        origin: r.origin,
        conversation_id: r.conversation_id,
        from: r.from,
        msg_type: r.msg_type,
        content: r.content,
        client_msg_id: r.client_msg_id,
        count_unread: r.count_unread,
    })
}

/// Checks a message's content: no NUL, at most `max_content_bytes` of UTF-8.
pub(crate) fn content(content: &str, max_content_bytes: usize) -> Result<(), ServiceError> {
    if content.contains('\0') {
        return Err(ServiceError::new(ErrorCode::InvalidText, "content must not contain U+0000 (NUL)"));
    }
    if content.len() > max_content_bytes {
        return Err(ServiceError::new(
            ErrorCode::PayloadTooLarge,
            format!("content is {} bytes; the limit is {max_content_bytes}", content.len()),
        ));
    }
    Ok(())
}

/// Checks a revision's shape; answers what the store takes (`window_ms` still 0).
pub(crate) fn revision(r: ReviseMessage, max_content_bytes: usize) -> Result<Revision, ServiceError> {
    check_conversation_id(&r.conversation_id)?;
    if r.origin == Origin::Client {
        check_user_id("by", &r.by)?;
    }
    if r.msg_id == 0 {
        return Err(ServiceError::invalid("msg_id starts at 1"));
    }
    match (r.action, &r.content) {
        (Action::Edit | Action::Finish, Some(c)) => content(c, max_content_bytes)?,
        (Action::Edit, None) => return Err(ServiceError::invalid("an edit needs content")),
        (Action::Finish, None) => return Err(ServiceError::invalid("a finish needs the final content")),
        (_, Some(_)) => return Err(ServiceError::invalid("only an edit or a finish takes content")),
        (_, None) => {}
    }
    Ok(Revision {
        origin: r.origin,
        by: r.by,
        conversation_id: r.conversation_id,
        msg_id: r.msg_id,
        action: r.action,
        content: r.content,
        window_ms: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(from: &str, msg_type: i32, content: &str, origin: Origin) -> SendMessage {
        SendMessage {
            origin,
            conversation_id: "c".into(),
            from: from.into(),
            msg_type,
            content: content.into(),
            client_msg_id: None,
            count_unread: true,
        }
    }

    #[test]
    fn checks_each_field() {
        assert!(send_item(req("a", 0, "x", Origin::Client), 10).is_ok());
        assert!(send_item(req("", 0, "x", Origin::Inner), 10).is_ok());
        assert_eq!(send_item(req("", 0, "x", Origin::Client), 10).unwrap_err().code, ErrorCode::InvalidParam);
        assert_eq!(send_item(req("a", -1, "x", Origin::Inner), 10).unwrap_err().code, ErrorCode::InvalidParam);
        assert_eq!(send_item(req("a b", 0, "x", Origin::Client), 10).unwrap_err().code, ErrorCode::InvalidParam);
        // The limit counts UTF-8 bytes: 4 × "é" is 8 bytes.
        assert!(send_item(req("a", 0, "éééé", Origin::Client), 8).is_ok());
        assert_eq!(send_item(req("a", 0, "ééééé", Origin::Client), 8).unwrap_err().code, ErrorCode::PayloadTooLarge);
        assert_eq!(send_item(req("a", 0, "bad\u{0}nul", Origin::Client), 10).unwrap_err().code, ErrorCode::InvalidText);
        let mut r = req("a", 0, "x", Origin::Client);
        r.client_msg_id = Some("has space".into());
        assert_eq!(send_item(r, 10).unwrap_err().code, ErrorCode::InvalidParam);
        let mut r = req("a", 0, "x", Origin::Client);
        r.count_unread = false;
        assert_eq!(send_item(r, 10).unwrap_err().code, ErrorCode::InvalidParam, "count_unread is /inner's");
        let mut r = req("", 0, "x", Origin::Inner);
        r.count_unread = false;
        assert!(!send_item(r, 10).unwrap().count_unread);
    }

    #[test]
    fn revisions_take_content_only_when_editing() {
        let rev = |action, content: Option<&str>| ReviseMessage {
            origin: Origin::Client,
            by: "a".into(),
            conversation_id: "c".into(),
            msg_id: 1,
            action,
            content: content.map(String::from),
        };
        assert!(revision(rev(Action::Edit, Some("new")), 10).is_ok());
        assert!(revision(rev(Action::Recall, None), 10).is_ok());
        assert_eq!(revision(rev(Action::Edit, None), 10).unwrap_err().code, ErrorCode::InvalidParam);
        assert_eq!(revision(rev(Action::Delete, Some("x")), 10).unwrap_err().code, ErrorCode::InvalidParam);
        assert_eq!(revision(rev(Action::Edit, Some("far too long")), 10).unwrap_err().code, ErrorCode::PayloadTooLarge);
        assert_eq!(revision(rev(Action::Edit, Some("n\u{0}l")), 10).unwrap_err().code, ErrorCode::InvalidText);
        let mut zero = rev(Action::Recall, None);
        zero.msg_id = 0;
        assert_eq!(revision(zero, 10).unwrap_err().code, ErrorCode::InvalidParam);
    }
}
