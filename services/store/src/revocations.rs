//! Token revocations written by /inner/kick_user and loaded by every gateway, and the
//! /notify tickets used so far.

use quickim_shared::protocol::service::{Revocation, RevocationPage};
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

    /// One page of the revocations at or after `since_ms` (older ones only concern expired
    /// tokens), in (before_ms, user_id, platform) order, after `after`, at most `limit`.
    pub async fn revocations(&self, since_ms: i64, after: Option<&Revocation>, limit: u32) -> Result<RevocationPage> {
        let (at, user, platform) = match after {
            Some(r) => (r.before_ms.max(since_ms), r.user_id.as_str(), r.platform.as_deref().unwrap_or("")),
            // Before every row at since_ms: no user id is empty, and "" < any platform.
            None => (since_ms, "", ""),
        };
        let rows = sqlx::query(
            "SELECT user_id, platform, before_ms FROM revocations \
             WHERE before_ms >= $1 AND (before_ms, user_id, platform) > ($2, $3, $4) \
             ORDER BY before_ms, user_id, platform LIMIT $5",
        )
        .bind(since_ms)
        .bind(at)
        .bind(user)
        .bind(platform)
        .bind(i64::from(limit.max(1)) + 1)
        .fetch_all(self.pool())
        .instrument(sql_span(self.system(), "SELECT", "revocations"))
        .await?;
        let mut revocations = rows
            .iter()
            .map(|r| {
                let platform: String = r.try_get("platform")?;
                Ok(Revocation {
                    user_id: r.try_get("user_id")?,
                    platform: (!platform.is_empty()).then_some(platform),
                    before_ms: r.try_get("before_ms")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let more = revocations.len() > limit.max(1) as usize;
        revocations.truncate(limit.max(1) as usize);
        Ok(RevocationPage { revocations, more })
    }
}

impl Store {
    /// Records a /notify ticket as used; answers whether this was its first use.
    pub async fn consume_ticket(&self, ticket_id: &str, expires_ms: i64) -> Result<bool> {
        let done =
            sqlx::query("INSERT INTO used_tickets (ticket_id, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(ticket_id)
                .bind(expires_ms)
                .execute(self.pool())
                .instrument(sql_span(self.system(), "INSERT", "used_tickets"))
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Forgets used tickets that expired before `now_ms` (they cannot be presented again).
    pub async fn prune_tickets(&self, now_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM used_tickets WHERE expires_at < $1")
            .bind(now_ms)
            .execute(self.pool())
            .instrument(sql_span(self.system(), "DELETE", "used_tickets"))
            .await?;
        Ok(done.rows_affected())
    }
}
