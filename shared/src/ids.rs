//! Validation of the identifiers the API accepts.
//!
//! user ids, platforms, conversation ids and client message ids share one alphabet
//! (`[A-Za-z0-9_.:@-]`) so that they are safe in logs, URLs and NATS subjects alike.

use crate::error::ServiceError;

/// Longest user id, conversation id and client_msg_id.
pub const MAX_ID_LEN: usize = 128;
/// Longest platform name.
pub const MAX_PLATFORM_LEN: usize = 32;

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '@' | '-')
}

/// Checks one identifier: `field` names it in the error message.
pub fn check_id(field: &str, value: &str, max_len: usize) -> Result<(), ServiceError> {
    if value.is_empty() {
        return Err(ServiceError::invalid(format!("{field} must not be empty")));
    }
    if value.len() > max_len {
        return Err(ServiceError::invalid(format!("{field} is longer than {max_len} characters")));
    }
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(ServiceError::invalid(format!(
            "{field} contains {bad:?}; allowed are letters, digits and _ . : @ -"
        )));
    }
    Ok(())
}

/// A user id: 1–128 characters of `[A-Za-z0-9_.:@-]`.
pub fn check_user_id(field: &str, value: &str) -> Result<(), ServiceError> {
    check_id(field, value, MAX_ID_LEN)
}

/// A platform: 1–32 characters of `[A-Za-z0-9_.:@-]`.
pub fn check_platform(value: &str) -> Result<(), ServiceError> {
    check_id("platform", value, MAX_PLATFORM_LEN)
}

/// A conversation id: 1–128 characters of `[A-Za-z0-9_.:@-]`.
pub fn check_conversation_id(value: &str) -> Result<(), ServiceError> {
    check_id("conversation_id", value, MAX_ID_LEN)
}

/// A client message id (idempotency key): 1–128 characters of `[A-Za-z0-9_.:@-]`.
pub fn check_client_msg_id(value: &str) -> Result<(), ServiceError> {
    check_id("client_msg_id", value, MAX_ID_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_alphabet() {
        assert!(check_user_id("user_id", "alice").is_ok());
        assert!(check_user_id("user_id", "a.b:c@d-e_f9").is_ok());
        assert!(check_user_id("user_id", &"x".repeat(128)).is_ok());
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        assert!(check_user_id("user_id", "").is_err());
        assert!(check_user_id("user_id", &"x".repeat(129)).is_err());
        assert!(check_user_id("user_id", "a b").is_err());
        assert!(check_user_id("user_id", "a/b").is_err());
        assert!(check_user_id("user_id", "é").is_err());
        assert!(check_platform(&"p".repeat(33)).is_err());
        let err = check_conversation_id("a*b").unwrap_err();
        assert!(err.message.contains("conversation_id"));
    }
}
