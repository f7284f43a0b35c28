//! The database of the conversation and message services.
//!
//! Both services share one database (SQLite in standalone, PostgreSQL when distributed) and
//! this crate is its only door. Where each piece lives:
//! - [`Store`] (here): opening, migrations, transactions, the SQLite/PostgreSQL differences;
//! - `sqlite.rs`, `postgres.rs`: connection set-up of each database;
//! - `log.rs`: the log: allocation of msg_ids and partition offsets (the one place that
//!   writes messages), heads, gap-fill reads, resume replays, retention checkpoints;
//! - `conversations.rs`: conversations and membership (each change writes its system
//!   message through the log, in the same transaction);
//! - `messages.rs`: sending (membership, archive and idempotency checks) and history;
//! - `messages_sqlite.rs`: a send batch's statements on SQLite, run by the calling thread on
//!   a connection of their own (no hand-over to a pooled connection's worker thread);
//! - `revisions.rs`: edits, recalls and deletions of messages, and their versions;
//! - `revocations.rs`: token revocations;
//! - `sql.rs`: placeholder building and row decoding shared by the above.
//!
//! Ordering guarantees come from row locks held until commit: a conversation's row while
//! its msg_ids are allocated, a partition's row while its offsets are allocated. Locks are
//! always taken in the same order (conversations by id, then idempotency keys, then
//! partitions by number), so concurrent writers never deadlock.

/// Runs `$body` (which sees `$tx: &mut Tx`) in a write transaction and commits; retries a
/// few times when PostgreSQL reports a deadlock or a serialization failure. `return` in the
/// body leaves the attempt (rolling back on `Err`).
macro_rules! write_tx {
    ($store:expr, |$tx:ident| $body:block) => {{
        let mut attempt: u64 = 0;
        loop {
            attempt += 1;
            let (guard, mut owned_tx) = $store.begin_write().await?;
            let result: $crate::Result<_> = async {
                let $tx = &mut owned_tx;
                $body
            }
            .await;
            let result = match result {
                Ok(v) => tracing::Instrument::instrument(owned_tx.commit(), $crate::sql_span($store.system(), "COMMIT", ""))
                    .await
                    .map(|_| v)
                    .map_err($crate::StoreError::from),
                Err(e) => {
                    let _ = owned_tx.rollback().await;
                    Err(e)
                }
            };
            drop(guard);
            match result {
                Err($crate::StoreError::Database(e)) if attempt < 5 && $crate::is_retryable(&e) => {
                    tracing::debug!(error = %e, attempt, "retrying transaction");
                    tokio::time::sleep(std::time::Duration::from_millis(2 * attempt)).await;
                }
                other => break other,
            }
        }
    }};
}

mod conversations;
mod log;
mod messages;
mod messages_sqlite;
mod postgres;
mod revisions;
mod revocations;
mod sql;
mod sqlite;
mod streams;
mod webhooks;

use std::path::Path;
use std::sync::Arc;

use quickim_shared::error::ServiceError;
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::{Any, Transaction};

pub use conversations::{CreateOutcome, NewConversation, ReadMark};
pub use log::UnreadRule;
pub use messages::SendItem;
pub use revisions::Revision;

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite (standalone): one writer at a time, serialized in-process.
    Sqlite,
    /// PostgreSQL (distributed): row locks.
    Postgres,
}

/// A store failure: either an outcome for the client (not a member, conflict, ...) or a
/// database failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request is refused; the error says why, for the client.
    #[error(transparent)]
    Rejected(#[from] ServiceError),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// SQLite failed, on the connection that stores send batches.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Idempotency keys another transaction claimed first (the attempt that found them is
    /// rolled back and the batch runs again without them; never answered to a client).
    #[error("idempotency keys claimed concurrently: {0:?}")]
    KeysTaken(Vec<(String, String)>),
    /// The database holds something this version cannot read.
    #[error("database content: {0}")]
    Corrupt(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> ServiceError {
        match e {
            StoreError::Rejected(e) => e,
            StoreError::Database(ref db) if is_unavailable(db) => {
                tracing::error!(error = %e, "database unavailable");
                ServiceError::unavailable("database unavailable, try again")
            }
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error {
                    code: rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked,
                    ..
                },
                _,
            )) => {
                tracing::error!(error = %e, "database busy");
                ServiceError::unavailable("database busy, try again")
            }
            other => ServiceError::internal(other),
        }
    }
}

pub(crate) type Result<T, E = StoreError> = std::result::Result<T, E>;
pub(crate) type Tx = Transaction<'static, Any>;

/// Cheap `Clone` handle to the database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    pool: AnyPool,
    /// Where write transactions run: for SQLite one dedicated connection (one warm worker
    /// thread and statement cache for the single writer), for PostgreSQL the pool.
    writer: AnyPool,
    dialect: Dialect,
    partitions: u16,
    epoch: u32,
    /// SQLite takes one writer at a time: writers queue here instead of spinning in
    /// SQLite's busy handler.
    write_lock: Option<tokio::sync::Mutex<()>>,
    /// SQLite: the connection that stores send batches (see `sqlite::open_direct`).
    direct: Option<std::sync::Mutex<rusqlite::Connection>>,
    /// Which messages count as unread (set once at start; the default until then).
    unread: std::sync::OnceLock<UnreadRule>,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Store {
    /// Opens (creating if needed) the SQLite database file at `path`.
    pub async fn open_sqlite(path: &Path, max_connections: u32, partitions_if_new: u16) -> Result<Store> {
        let pool = sqlite::open(path, max_connections).await?;
        let writer = sqlite::open(path, 1).await?;
        let direct = sqlite::open_direct(path)?;
        let store = Self::init(pool, writer, Some(direct), Dialect::Sqlite, partitions_if_new).await?;
        let inner = Arc::downgrade(&store.inner);
        sqlite::checkpoints(store.inner.pool.clone(), move || inner.strong_count() > 0);
        Ok(store)
    }

    /// Connects to PostgreSQL at `url`; a request waits at most `acquire_timeout` for a
    /// connection (keep it below the gateway's request timeout, so that an unreachable
    /// database is answered `unavailable` rather than a timeout).
    pub async fn open_postgres(
        url: &str,
        max_connections: u32,
        partitions_if_new: u16,
        acquire_timeout: std::time::Duration,
    ) -> Result<Store> {
        let pool = postgres::open(url, max_connections, acquire_timeout).await?;
        Self::init(pool.clone(), pool, None, Dialect::Postgres, partitions_if_new).await
    }

    async fn init(
        pool: AnyPool,
        writer: AnyPool,
        direct: Option<rusqlite::Connection>,
        dialect: Dialect,
        partitions_if_new: u16,
    ) -> Result<Store> {
        MIGRATOR.run(&pool).await.map_err(|e| StoreError::Database(e.into()))?;
        let system = match dialect {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgresql",
        };
        let (partitions, epoch) = log::init_meta(system, &pool, partitions_if_new).await?;
        if partitions != partitions_if_new {
            tracing::info!(
                partitions,
                configured = partitions_if_new,
                "the database keeps the log partitions it was created with"
            );
        }
        let write_lock = (dialect == Dialect::Sqlite).then(|| tokio::sync::Mutex::new(()));
        let direct = direct.map(std::sync::Mutex::new);
        let unread = std::sync::OnceLock::new();
        Ok(Store { inner: Arc::new(Inner { pool, writer, dialect, partitions, epoch, write_lock, direct, unread }) })
    }

    /// Sets which system types count as unread (`unread_system_types`); once, at start.
    pub fn set_unread_rule(&self, rule: UnreadRule) {
        if self.inner.unread.set(rule).is_err() {
            tracing::warn!("the unread rule was set already; keeping the first");
        }
    }

    /// Which messages count as unread.
    pub(crate) fn unread_rule(&self) -> &UnreadRule {
        static DEFAULT: std::sync::LazyLock<UnreadRule> = std::sync::LazyLock::new(UnreadRule::default);
        self.inner.unread.get().unwrap_or(&DEFAULT)
    }

    /// Log partitions of this database.
    pub fn partitions(&self) -> u16 {
        self.inner.partitions
    }

    /// This database's epoch: a random number fixed at creation, carried in cursors.
    pub fn epoch(&self) -> u32 {
        self.inner.epoch
    }

    /// SQLite or PostgreSQL.
    pub fn dialect(&self) -> Dialect {
        self.inner.dialect
    }

    /// Whether the database answers (for /readyz).
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.inner.pool).await.is_ok()
    }

    /// Connections in use and idle (for metrics).
    pub fn pool_usage(&self) -> (u32, usize) {
        (self.inner.pool.size(), self.inner.pool.num_idle())
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.inner.writer.close().await;
        self.inner.pool.close().await;
    }

    /// SQLite: waits for the other writers of this process (none on PostgreSQL).
    async fn queue_writers(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.inner.write_lock {
            Some(lock) => Some(lock.lock().await),
            None => None,
        }
    }

    /// Queues behind other writers (SQLite only) and opens a write transaction.
    pub(crate) async fn begin_write(&self) -> Result<(Option<tokio::sync::MutexGuard<'_, ()>>, Tx)> {
        let guard = self.queue_writers().await;
        let tx = match self.inner.dialect {
            Dialect::Sqlite => self.inner.writer.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.inner.writer.begin().await?,
        };
        Ok((guard, tx))
    }

    /// SQLite: queues behind other writers, then runs `f` on the calling thread with the
    /// connection that stores send batches. Meant for a thread of its own (the message
    /// writer's, or a test's); on a multi-threaded runtime's worker the runtime is told the
    /// worker blocks.
    pub(crate) async fn with_direct<T>(&self, f: impl FnOnce(&rusqlite::Connection) -> Result<T>) -> Result<T> {
        let _guard = self.queue_writers().await;
        let direct = self.inner.direct.as_ref().ok_or_else(|| StoreError::Corrupt("no SQLite connection".into()))?;
        let run = || {
            let conn = direct.lock().map_err(|_| StoreError::Corrupt("SQLite connection poisoned".into()))?;
            f(&conn)
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(run),
            _ => run(),
        }
    }

    /// A read-only transaction that sees one consistent snapshot.
    pub(crate) async fn snapshot(&self) -> Result<Tx> {
        Ok(match self.inner.dialect {
            // A deferred SQLite transaction reads one WAL snapshot from its first read.
            Dialect::Sqlite => self.inner.pool.begin_with("BEGIN").await?,
            Dialect::Postgres => self.inner.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?,
        })
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.inner.pool
    }

    /// The OpenTelemetry `db.system.name` of this database.
    pub(crate) fn system(&self) -> &'static str {
        match self.inner.dialect {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgresql",
        }
    }
}

/// The span of one SQL statement (OpenTelemetry database conventions). The statement text is
/// never recorded with values: only the operation and the table.
pub(crate) fn sql_span(system: &'static str, operation: &'static str, collection: &'static str) -> tracing::Span {
    tracing::info_span!(
        "db.query",
        otel.name = %format_args!("{operation} {collection}"),
        otel.kind = "client",
        db.system.name = system,
        db.operation.name = operation,
        db.collection.name = collection,
    )
}

pub(crate) fn is_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("40P01" | "40001")),
        _ => false,
    }
}

pub(crate) fn any_pool_options(max_connections: u32, acquire_timeout: std::time::Duration) -> AnyPoolOptions {
    sqlx::any::install_default_drivers();
    AnyPoolOptions::new().max_connections(max_connections.max(1)).acquire_timeout(acquire_timeout)
}

/// Whether `e` says the database could not be reached or dropped the connection (restart,
/// terminated backend, network): the request may be retried, so it is answered
/// `unavailable`, never `internal`.
pub(crate) fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // 08: connection exception; 57P01–57P03: shutdown, crash, not accepting yet;
            // 53300: too many connections; 40001/40P01: conflicts still failing after retries.
            c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01")
        }),
        _ => false,
    }
}

/// Log partition of a conversation: FNV-1a of its id, modulo the partition count. Stored with
/// the conversation at creation, so the function could change without moving anything.
pub fn partition_of(conversation_id: &str, partitions: u16) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in conversation_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(partitions.max(1))) as u16
}
