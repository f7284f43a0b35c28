//! PostgreSQL set-up. Transactions run at READ COMMITTED; ordering comes from row locks.

use sqlx::AnyPool;

use crate::{Result, any_pool_options};

/// Opens the pool. Every statement of the store reaches its rows by key, and each connection
/// says so to the planner (`enable_seqscan` off): a connection plans a statement for good
/// once it has run it a few times (a generic plan), with the table sizes of that moment, and
/// planned while the tables were nearly empty, a send batch's lookups and a replay's reads
/// became scans of whole tables for the connection's whole life. Only an `ANALYZE` has them
/// planned again, which autovacuum may run late or never (docs/benchmarks.md, "Sends
/// (distributed)"). A statement with no index to use still scans.
pub(crate) async fn open(url: &str, max_connections: u32, acquire_timeout: std::time::Duration) -> Result<AnyPool> {
    Ok(any_pool_options(max_connections, acquire_timeout)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::raw_sql("SET enable_seqscan = off").execute(conn).await?;
                Ok(())
            })
        })
        .connect(url)
        .await?)
}

/// The send batch's statements find their rows by key, whatever the batch's size against the
/// tables' sizes. Plans that scanned a whole table per batch were the distributed send path's
/// largest cost once the tables held a few thousand rows (see docs/benchmarks.md).
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use quickim_testkit::PgDatabase;
    use sqlx::Row;

    use crate::Store;
    use crate::log::{APPEND_POSTGRES, LOCK_CONVERSATIONS_POSTGRES};
    use crate::messages::{ACTIVE_PAIRS_POSTGRES, EXISTING_KEYS_POSTGRES};

    async fn explain(store: &Store, sql: &str, params: &[&str]) -> String {
        let explain = format!("EXPLAIN {sql}");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(explain));
        for p in params {
            q = q.bind(*p);
        }
        let lines: Vec<String> =
            q.fetch_all(store.pool()).await.unwrap().iter().map(|r| r.try_get::<String, _>(0).unwrap()).collect();
        lines.join("\n")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn send_batch_statements_look_rows_up_by_key() {
        let pg = PgDatabase::create().await;
        let store = Store::open_postgres(&pg.url, 2, 4, std::time::Duration::from_secs(10)).await.unwrap();
        for sql in [
            "INSERT INTO conversations (conversation_id, conversation_type, joinable, archived, created_at, \
             last_msg_id, last_send_time, part, last_offset) \
             SELECT 'c' || g, 1, 0, 0, 0, 1, 0, g % 4, g FROM generate_series(1, 5000) g",
            "INSERT INTO members (conversation_id, user_id, role, active, joined_msg_id, read_msg_id) \
             SELECT 'c' || g, 'u' || g, 0, 1, 0, 0 FROM generate_series(1, 5000) g",
            "INSERT INTO messages (conversation_id, msg_id, part, log_offset, sender, msg_type, content, \
             client_msg_id, send_time) SELECT 'c' || g, 1, g % 4, g, 'u' || g, 1, 'x', 'k' || g, 0 \
             FROM generate_series(1, 5000) g",
            "INSERT INTO idempotency (sender, client_msg_id, conversation_id, msg_id, created_at) \
             SELECT 'u' || g, 'k' || g, 'c' || g, 1, 0 FROM generate_series(1, 5000) g",
            "ANALYZE",
        ] {
            sqlx::query(sql).execute(store.pool()).await.unwrap();
        }
        // A batch of 100: the size at which lists of parameters were planned as scans.
        let ids: Vec<String> = (1..=100).map(|i| format!("c{}", i * 37)).collect();
        let pairs: Vec<[String; 2]> = (1..=100).map(|i| [format!("c{}", i * 37), format!("u{}", i * 37)]).collect();
        let keys: Vec<[String; 2]> = (1..=100).map(|i| [format!("u{}", i * 37), format!("k{}", i * 37)]).collect();
        let ids = serde_json::to_string(&ids).unwrap();
        let pairs = serde_json::to_string(&pairs).unwrap();
        let keys = serde_json::to_string(&keys).unwrap();

        let plan = explain(&store, LOCK_CONVERSATIONS_POSTGRES, &[&ids]).await;
        assert!(plan.contains("conversations_pkey") && !plan.contains("Seq Scan"), "{plan}");
        let plan = explain(&store, ACTIVE_PAIRS_POSTGRES, &[&pairs]).await;
        assert!(plan.contains("on members") && !plan.contains("Seq Scan"), "{plan}");
        let plan = explain(&store, &EXISTING_KEYS_POSTGRES, &[&keys]).await;
        assert!(plan.contains("idempotency_pkey") && plan.contains("messages_pkey"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
        let messages =
            r#"[["c37", 2, 1, 9001, "u37", 1, "x", null, 1, 1], ["c74", 2, 2, 9001, "u74", 1, "y", null, 1, 1]]"#;
        let plan = explain(
            &store,
            APPEND_POSTGRES,
            &[
                r#"[[1, 9001], [2, 9001]]"#,
                messages,
                r#"[["c37", 2, 9001, 1, 1, 2], ["c74", 2, 9001, 1, 1, 2]]"#,
                r#"[["c37", "u37", 2, 1], ["c74", "u74", 2, 1]]"#,
            ],
        )
        .await;
        assert!(plan.contains("Update on conversations") && plan.contains("conversations_pkey"), "{plan}");
        assert!(!plan.contains("Seq Scan on conversations"), "{plan}");
        assert!(plan.contains("Update on members") && plan.contains("members_pkey"), "{plan}");
        assert!(!plan.contains("Seq Scan on members"), "{plan}");

        store.close().await;
        pg.drop_db().await;
    }

    /// `EXPLAIN` of the generic plan of `sql` (the plan a connection keeps for good from a
    /// statement's sixth run on), made in `tx` with the settings in force there; `params` are
    /// the parameters' values as text, of `types` (none: the ones `sql` implies).
    async fn explain_generic(tx: &mut sqlx::AnyConnection, sql: &str, types: &str, params: &[&str]) -> String {
        let args: Vec<String> = params.iter().map(|p| format!("'{}'", p.replace('\'', "''"))).collect();
        for setup in
            ["SET LOCAL plan_cache_mode = force_generic_plan".to_string(), format!("PREPARE probe{types} AS {sql}")]
        {
            sqlx::raw_sql(sqlx::AssertSqlSafe(setup)).execute(&mut *tx).await.unwrap();
        }
        let explain = format!("EXPLAIN EXECUTE probe({})", args.join(", "));
        let lines: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(explain))
            .fetch_all(&mut *tx)
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get::<String, _>(0).unwrap())
            .collect();
        sqlx::raw_sql("DEALLOCATE probe").execute(&mut *tx).await.unwrap();
        lines.join("\n")
    }

    /// A connection plans a statement for good once it has run it a few times, with the
    /// table sizes of that moment. Planned while the tables were nearly empty, PostgreSQL's
    /// defaults scan whole tables; the store's connections still look their rows up by key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn statements_look_rows_up_by_key_even_when_planned_on_empty_tables() {
        let pg = PgDatabase::create().await;
        let store = Store::open_postgres(&pg.url, 2, 4, std::time::Duration::from_secs(10)).await.unwrap();
        sqlx::query("ANALYZE").execute(store.pool()).await.unwrap();
        let read_log: &str = &crate::log::READ_LOG;
        let replay = crate::log::replay_chunk_sql("postgresql", 2);
        let statements: [(&str, &str, Vec<&str>); 6] = [
            (LOCK_CONVERSATIONS_POSTGRES, "", vec![r#"["c1", "c2"]"#]),
            (ACTIVE_PAIRS_POSTGRES, "", vec![r#"[["c1", "u1"]]"#]),
            (&EXISTING_KEYS_POSTGRES, "", vec![r#"[["u1", "k1"]]"#]),
            (
                APPEND_POSTGRES,
                "",
                vec![
                    r#"[[1, 9001]]"#,
                    r#"[["c1", 2, 1, 9001, "u1", 1, "x", null, 1, 1]]"#,
                    r#"[["c1", 2, 9001, 1, 1, 2]]"#,
                    r#"[["c1", "u1", 2, 1]]"#,
                ],
            ),
            (read_log, "", vec!["0", "0", "100", "64"]),
            (
                &replay,
                "(integer, bigint, bigint, integer, bigint, bigint, text, bigint)",
                vec!["0", "0", "10", "1", "0", "10", "u1", "500"],
            ),
        ];
        let scans = ["conversations", "members", "messages", "idempotency"].map(|t| format!("Seq Scan on {t}"));

        // The control: with PostgreSQL's default, these plans scan.
        let mut default = store.pool().begin().await.unwrap();
        sqlx::raw_sql("SET LOCAL enable_seqscan = on").execute(&mut *default).await.unwrap();
        for (sql, types, params) in [&statements[0], &statements[4], &statements[5]] {
            let plan = explain_generic(&mut default, sql, types, params).await;
            assert!(plan.contains("Seq Scan on"), "{plan}");
        }
        default.rollback().await.unwrap();

        // Any connection of the store's (reads and writes share the pool on PostgreSQL).
        for (sql, types, params) in &statements {
            let mut tx = store.pool().begin().await.unwrap();
            let plan = explain_generic(&mut tx, sql, types, params).await;
            assert!(scans.iter().all(|s| !plan.contains(s.as_str())), "{plan}");
            tx.rollback().await.unwrap();
        }

        store.close().await;
        pg.drop_db().await;
    }
}
