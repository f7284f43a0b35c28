//! SQLite set-up: WAL journal (readers never block the writer), full fsync at commit (a
//! message is on disk before it is acknowledged), foreign keys on; WAL checkpoints mostly
//! off the writer's path, and rare enough that a page rewritten by many commits is copied
//! into the database file once.

use std::path::Path;
use std::str::FromStr;

use sqlx::AnyPool;
use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};

use crate::{Result, StoreError, any_pool_options};

/// Settings of every connection.
const CONNECTION_PRAGMAS: [&str; 7] = [
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 10000",
    "PRAGMA foreign_keys = ON",
    // Statement journals (multi-row statements) in memory, not in temp files.
    "PRAGMA temp_store = MEMORY",
    // 64 MiB of page cache per connection (negative = KiB).
    "PRAGMA cache_size = -65536",
    // The writer checkpoints itself only past 10,000 WAL pages (40 MiB), not SQLite's 1,000:
    // under load a commit adds dozens of pages, and at 1,000 the writer ran a checkpoint
    // several times a second on the send path.
    "PRAGMA wal_autocheckpoint = 10000",
    // A recalled or deleted message's content is overwritten in the file, not left in free
    // space.
    "PRAGMA secure_delete = ON",
];

/// The connection that stores send batches, called directly on the thread that runs the
/// batch (the message writer's own thread): a pooled connection hands every statement to a
/// worker thread of its own and back, two thread wake-ups each, on the send path's critical
/// section. Opened after [`open`], which made the file and set its journal mode.
pub(crate) fn open_direct(path: &Path) -> Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    for pragma in CONNECTION_PRAGMAS {
        conn.execute_batch(pragma)?;
    }
    // Statements a batch runs, with their texts kept prepared.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

pub(crate) async fn open(path: &Path, max_connections: u32) -> Result<AnyPool> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Corrupt(format!("cannot create {}: {e}", dir.display())))?;
    }
    let url = format!("sqlite://{}?mode=rwc", path.display());
    // The journal mode is a property of the file: set it once, on a connection of its own.
    let first = SqliteConnectOptions::from_str(&url)?.journal_mode(SqliteJournalMode::Wal);
    let conn = first.connect().await?;
    drop(conn);
    let pool = any_pool_options(max_connections, std::time::Duration::from_secs(10))
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                for pragma in CONNECTION_PRAGMAS {
                    sqlx::query(pragma).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect(&url)
        .await?;
    Ok(pool)
}

/// How often the WAL is copied into the database file in the background. Hot pages (the
/// partitions' heads, the newest leaves of the message indexes) are rewritten by every
/// commit; copying once a second writes each of them to the database file once a second,
/// where every 100 ms wrote them ten times (docs/benchmarks.md has the disk writes saved).
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Copies the WAL into the database file every [`CHECKPOINT_EVERY`] on a connection of
/// `pool`: a passive checkpoint, which never waits for (nor blocks) the writer or readers.
/// The writer still checkpoints itself when the WAL reaches 10,000 pages (the automatic
/// checkpoint; under sustained writes the WAL is never fully copied at the moment a new
/// transaction could start it over), but then finds most pages copied already: the page
/// copying and the database file's fsync are off the send path. Stops once `alive` says so.
pub(crate) fn checkpoints(pool: AnyPool, alive: impl Fn() -> bool + Send + 'static) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !alive() || pool.is_closed() {
                return;
            }
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
                tracing::debug!(error = %e, "background WAL checkpoint failed; the writer checkpoints");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rusqlite::StatementStatus;
    use rusqlite::config::DbConfig;

    /// The bundled SQLite is built with the options of `.cargo/config.toml`: a read with a
    /// `LIMIT ?` runs again with new values without being parsed and planned again.
    #[test]
    fn a_bound_limit_does_not_prepare_the_statement_again() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT); INSERT INTO t (b) VALUES ('x'), ('y'), ('z');",
        )
        .unwrap();
        let used: i64 = conn.query_row("SELECT sqlite_compileoption_used('ENABLE_QPSG')", [], |r| r.get(0)).unwrap();
        assert_eq!(used, 1, "SQLITE_ENABLE_QPSG missing from LIBSQLITE3_FLAGS");
        assert_eq!(reprepared(&conn), 0);
        // What the option prevents (its runtime switch, off): every bind prepares it again.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, false).unwrap();
        assert_eq!(reprepared(&conn), 4);
    }

    /// Runs one statement with a bound LIMIT four times: how often SQLite prepared it again.
    fn reprepared(conn: &rusqlite::Connection) -> i32 {
        let mut stmt = conn.prepare("SELECT b FROM t WHERE a > ?1 ORDER BY a LIMIT ?2").unwrap();
        for (after, limit) in [(0, 1), (1, 2), (0, 3), (2, 1)] {
            let rows: Vec<String> =
                stmt.query_map((after, limit), |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap();
            assert_eq!(rows.len(), usize::try_from(limit.min(3 - after)).unwrap());
        }
        stmt.get_status(StatementStatus::RePrepare)
    }
}
