//! Helpers shared by the queries: numbered placeholders, row decoding, integer conversions.

use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::LogEntry;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Result, StoreError};

/// Hands out placeholders in binding order: `$1`, `$2`, ... for PostgreSQL, `?` for SQLite
/// (sqlx looks every named SQLite parameter up by name, a linear scan per parameter, which
/// makes statements with hundreds of parameters quadratic).
pub(crate) struct Params {
    n: usize,
    positional: bool,
}

impl Params {
    /// Placeholders for the database `system` (`sqlite` or `postgresql`).
    pub fn new(system: &str) -> Params {
        Params { n: 0, positional: system == "sqlite" }
    }

    /// The next placeholder.
    pub fn next(&mut self) -> String {
        self.n += 1;
        if self.positional { "?".to_string() } else { format!("${}", self.n) }
    }

    /// `count` placeholders separated by commas.
    pub fn list(&mut self, count: usize) -> String {
        (0..count).map(|_| self.next()).collect::<Vec<_>>().join(", ")
    }

    /// A parenthesized row of `width` placeholders.
    pub fn row(&mut self, width: usize) -> String {
        format!("({})", self.list(width))
    }
}

/// A value bound to a statement of a [`Script`].
pub(crate) enum Arg<'a> {
    I64(i64),
    I32(i32),
    Text(&'a str),
    OptText(Option<&'a str>),
}

/// SQLite write statements that need no answer, run in order as one multi-statement query
/// (one round trip to its worker thread). PostgreSQL, which does not take several statements
/// in one prepared query, writes a batch with one statement of its own (`log.rs`).
pub(crate) struct Script<'a> {
    statements: Vec<(String, Vec<Arg<'a>>, &'static str, &'static str)>,
}

impl<'a> Script<'a> {
    pub fn new() -> Script<'a> {
        Script { statements: Vec::new() }
    }

    /// Placeholders for the next statement.
    pub fn params(&self) -> Params {
        Params::new("sqlite")
    }

    /// Adds a statement (`operation` and `collection` name its span).
    pub fn push(&mut self, sql: String, args: Vec<Arg<'a>>, operation: &'static str, collection: &'static str) {
        self.statements.push((sql, args, operation, collection));
    }

    fn bind(
        mut q: sqlx::query::Query<'a, sqlx::Any, sqlx::any::AnyArguments>,
        args: Vec<Arg<'a>>,
    ) -> sqlx::query::Query<'a, sqlx::Any, sqlx::any::AnyArguments> {
        for a in args {
            q = match a {
                Arg::I64(v) => q.bind(v),
                Arg::I32(v) => q.bind(v),
                Arg::Text(v) => q.bind(v),
                Arg::OptText(v) => q.bind(v),
            };
        }
        q
    }

    /// Runs the statements in `tx`.
    pub async fn run(self, tx: &mut sqlx::AnyConnection) -> crate::Result<()> {
        use tracing::Instrument;
        if self.statements.is_empty() {
            return Ok(());
        }
        // One span for the one round trip, named after every statement it ran.
        let mut names: Vec<String> = Vec::new();
        for (_, _, op, table) in &self.statements {
            let name = format!("{op} {table}");
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let span = tracing::info_span!(
            "db.query",
            otel.name = %names.join("; "),
            otel.kind = "client",
            db.system.name = "sqlite",
            db.operation.name = "BATCH",
            db.operation.batch.size = self.statements.len(),
        );
        let mut sql = String::new();
        let mut all = Vec::new();
        for (s, args, _, _) in self.statements {
            sql.push_str(&s);
            sql.push_str(";\n");
            all.extend(args);
        }
        Self::bind(sqlx::query(sqlx::AssertSqlSafe(sql)), all).execute(&mut *tx).instrument(span).await?;
        Ok(())
    }
}

/// Chunks of `items` whose sizes are powers of two (at most `max`, a power of two): the SQL
/// texts built from them repeat, so their prepared statements are reused.
pub(crate) fn pow2_chunks<T>(items: &[T], max: usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let mut size = max;
        while size > rest.len() {
            size /= 2;
        }
        let (chunk, tail) = rest.split_at(size.max(1));
        out.push(chunk);
        rest = tail;
    }
    out
}

/// `items` padded to the next power of two by repeating the last one — for IN lists and CASE
/// arms, where a repeat changes nothing — so that statement texts repeat.
pub(crate) fn padded<T: Clone>(items: &[T]) -> Vec<T> {
    let mut out = items.to_vec();
    if let Some(last) = items.last().cloned() {
        out.resize(items.len().next_power_of_two(), last);
    }
    out
}

/// A client-supplied u64 as a database BIGINT (values beyond i64 saturate: no row has them).
pub(crate) fn db_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored BIGINT as u64 (every stored id and offset is ≥ 0).
pub(crate) fn api_int(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Reads a flag (stored as INTEGER 0/1: SQLite's BOOLEAN does not pass through `Any`).
pub(crate) fn get_bool(row: &AnyRow, col: &str) -> Result<bool> {
    Ok(row.try_get::<i64, _>(col)? != 0)
}

/// The columns [`message`] reads, for a table aliased `m`.
pub(crate) const MESSAGE_COLUMNS: &str =
    "m.conversation_id, m.msg_id, m.sender, m.msg_type, m.content, m.client_msg_id, m.send_time, m.part, m.log_offset";

pub(crate) fn message(row: &AnyRow) -> Result<Message> {
    Ok(Message {
        conversation_id: row.try_get("conversation_id")?,
        msg_id: api_int(row.try_get("msg_id")?),
        from: row.try_get("sender")?,
        msg_type: i32::try_from(row.try_get::<i64, _>("msg_type")?)
            .map_err(|_| StoreError::Corrupt("msg_type out of range".into()))?,
        content: row.try_get("content")?,
        client_msg_id: row.try_get("client_msg_id")?,
        send_time: row.try_get("send_time")?,
    })
}

pub(crate) fn log_entry(row: &AnyRow) -> Result<LogEntry> {
    Ok(LogEntry {
        part: u16::try_from(row.try_get::<i64, _>("part")?)
            .map_err(|_| StoreError::Corrupt("partition out of range".into()))?,
        offset: api_int(row.try_get("log_offset")?),
        message: message(row)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_padding_keep_statement_shapes_few() {
        let items: Vec<u32> = (0..13).collect();
        let sizes: Vec<usize> = pow2_chunks(&items, 8).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![8, 4, 1]);
        assert_eq!(pow2_chunks(&items, 8).concat(), items);
        assert_eq!(padded(&[1, 2, 3]), vec![1, 2, 3, 3]);
        assert!(padded::<u8>(&[]).is_empty());
        assert_eq!(Params::new("sqlite").list(2), "?, ?");
        assert_eq!(Params::new("postgresql").list(2), "$1, $2");
    }
}
