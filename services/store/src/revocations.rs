//! Token revocations written by /inner/kick_user and loaded by every gateway.

use quickim_shared::protocol::service::Revocation;
use sqlx::Row;
use tracing::Instrument;

use crate::{Result, Store, sql_span};

impl Store {
    /// Rejects the user's tokens (of `platform`, or all) issued before `before_ms`.
    pub async fn revoke(&self, user_id: &str, platform: Option<&str>, before_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO revocations (user_id, platform, before_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id, platform) DO UPDATE SET before_ms = excluded.before_ms \
             WHERE revocations.before_ms < excluded.before_ms",
        )
        .bind(user_id)
        .bind(platform.unwrap_or(""))
        .bind(before_ms)
        .execute(self.pool())
        .instrument(sql_span(self.system(), "INSERT", "revocations"))
        .await?;
        Ok(())
    }

    /// Revocations at or after `since_ms` (older ones only concern expired tokens).
    pub async fn revocations(&self, since_ms: i64) -> Result<Vec<Revocation>> {
        let rows = sqlx::query("SELECT user_id, platform, before_ms FROM revocations WHERE before_ms >= $1")
            .bind(since_ms)
            .fetch_all(self.pool())
            .instrument(sql_span(self.system(), "SELECT", "revocations"))
            .await?;
        rows.iter()
            .map(|r| {
                let platform: String = r.try_get("platform")?;
                Ok(Revocation {
                    user_id: r.try_get("user_id")?,
                    platform: (!platform.is_empty()).then_some(platform),
                    before_ms: r.try_get("before_ms")?,
                })
            })
            .collect()
    }
}
