//! Outbound webhooks' state: each endpoint's position in the log, stored after every batch
//! its receiver took (so delivery resumes there after any restart), and a lease naming the
//! one message service that delivers to it — others take over once the lease runs out. The
//! position is written only by the lease holder (fenced by the lease in the same statement).

use tracing::Instrument;

use quickim_shared::position::Position;
use quickim_shared::time::now_ms;
use sqlx::Row;

use crate::log::read_heads;
use crate::{Result, Store, StoreError, sql_span};

impl Store {
    /// Takes or renews the lease of `endpoint` for `holder` until `lease_ms` from now, if it is
    /// free, expired or already `holder`'s; answers the endpoint's position then (a new
    /// endpoint starts at the log's heads — it gets what comes from now on — or, with
    /// `from_start`, at its beginning). None: another holder has it.
    pub async fn lease_webhook(
        &self,
        endpoint: &str,
        holder: &str,
        lease_ms: i64,
        from_start: bool,
    ) -> Result<Option<Position>> {
        let now = now_ms();
        let mut conn = self.pool().acquire().await?;
        let heads = read_heads(self.system(), &mut conn).await?;
        let first = if from_start { Position::from(vec![0; heads.len()]) } else { heads.clone() };
        let start = serde_json::to_string(&first).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO webhook_endpoints (endpoint_id, position, leased_by, lease_until) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (endpoint_id) DO NOTHING",
        )
        .bind(endpoint)
        .bind(start.as_str())
        .bind("")
        .bind(0i64)
        .execute(&mut *conn)
        .instrument(sql_span(self.system(), "INSERT", "webhook_endpoints"))
        .await?;
        let taken = sqlx::query(
            "UPDATE webhook_endpoints SET leased_by = $1, lease_until = $2 \
             WHERE endpoint_id = $3 AND (leased_by = $4 OR lease_until < $5)",
        )
        .bind(holder)
        .bind(now + lease_ms)
        .bind(endpoint)
        .bind(holder)
        .bind(now)
        .execute(&mut *conn)
        .instrument(sql_span(self.system(), "UPDATE", "webhook_endpoints"))
        .await?
        .rows_affected();
        if taken == 0 {
            return Ok(None);
        }
        let row = sqlx::query("SELECT position FROM webhook_endpoints WHERE endpoint_id = $1")
            .bind(endpoint)
            .fetch_one(&mut *conn)
            .instrument(sql_span(self.system(), "SELECT", "webhook_endpoints"))
            .await?;
        let text: String = row.try_get("position")?;
        let mut position: Position =
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("webhook position: {e}")))?;
        // Partitions the database gained since (never fewer): from their start.
        if position.len() < heads.len() {
            let mut v = position.to_vec();
            v.resize(heads.len(), 0);
            position = Position::from(v);
        }
        Ok(Some(position))
    }

    /// `endpoint`'s watermarks for read positions and presence changes (ms).
    pub async fn webhook_watermarks(&self, endpoint: &str) -> Result<(i64, i64)> {
        let row = sqlx::query("SELECT reads_at, presence_at FROM webhook_endpoints WHERE endpoint_id = $1")
            .bind(endpoint)
            .fetch_one(self.pool())
            .instrument(sql_span(self.system(), "SELECT", "webhook_endpoints"))
            .await?;
        Ok((row.try_get("reads_at")?, row.try_get("presence_at")?))
    }

    /// Stores `endpoint`'s watermarks, if `holder` still holds its lease.
    pub async fn advance_webhook_watermarks(
        &self,
        endpoint: &str,
        holder: &str,
        (reads_at, presence_at): (i64, i64),
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE webhook_endpoints SET reads_at = $1, presence_at = $2 \
             WHERE endpoint_id = $3 AND leased_by = $4 AND lease_until >= $5",
        )
        .bind(reads_at)
        .bind(presence_at)
        .bind(endpoint)
        .bind(holder)
        .bind(now_ms())
        .execute(self.pool())
        .instrument(sql_span(self.system(), "UPDATE", "webhook_endpoints"))
        .await?
        .rows_affected();
        Ok(done == 1)
    }

    /// Stores `endpoint`'s new position, if `holder` still holds its lease (false: it lost it,
    /// and must stop delivering).
    pub async fn advance_webhook(&self, endpoint: &str, holder: &str, position: &Position) -> Result<bool> {
        let text = serde_json::to_string(position).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let done = sqlx::query(
            "UPDATE webhook_endpoints SET position = $1 WHERE endpoint_id = $2 AND leased_by = $3 AND lease_until >= $4",
        )
        .bind(text.as_str())
        .bind(endpoint)
        .bind(holder)
        .bind(now_ms())
        .execute(self.pool())
        .instrument(sql_span(self.system(), "UPDATE", "webhook_endpoints"))
        .await?
        .rows_affected();
        Ok(done == 1)
    }
}
