//! Shape checks of a message to send; state checks happen in the store's transaction.

use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::ids::{check_client_msg_id, check_conversation_id, check_user_id};
use quickim_shared::protocol::service::{Origin, SendMessage};
use quickim_store::SendItem;

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
    if r.content.contains('\0') {
        return Err(ServiceError::new(ErrorCode::InvalidText, "content must not contain U+0000 (NUL)"));
    }
    if r.content.len() > max_content_bytes {
        return Err(ServiceError::new(
            ErrorCode::PayloadTooLarge,
            format!("content is {} bytes; the limit is {max_content_bytes}", r.content.len()),
        ));
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
    }
}
