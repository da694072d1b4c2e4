//! Statements that run on SQLite (one process) or PostgreSQL (replicas) alike: written once
//! with SQLite's `?N` placeholders (turned into `$N` for PostgreSQL), with parameters and
//! columns of the few types both share. Blocking: call from threads or the blocking pool.

use crate::pg::PgConnection;
use postgres::types::{IsNull, ToSql, Type};
use rusqlite::types::ToSqlOutput;
use rusqlite::Connection;

/// A failed statement (either database's error, as text).
#[derive(Debug)]
pub struct StoreError(String);

impl StoreError {
    pub fn new(why: String) -> StoreError {
        StoreError(why)
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        // The server's own words ("column ... does not exist"), not just "db error".
        StoreError(match e.as_db_error() {
            Some(db) => format!("{e}: {}", db.message()),
            None => e.to_string(),
        })
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A statement's parameter, for either database.
#[derive(Debug, Clone)]
pub enum Val {
    Int(i64),
    Text(String),
    Null,
}

impl From<i64> for Val {
    fn from(n: i64) -> Val {
        Val::Int(n)
    }
}

impl From<u64> for Val {
    fn from(n: u64) -> Val {
        Val::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

impl From<&str> for Val {
    fn from(s: &str) -> Val {
        Val::Text(s.to_string())
    }
}

impl From<&String> for Val {
    fn from(s: &String) -> Val {
        Val::Text(s.clone())
    }
}

impl From<String> for Val {
    fn from(s: String) -> Val {
        Val::Text(s)
    }
}

impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Val {
        v.map_or(Val::Null, Into::into)
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Val::Int(n) => ToSqlOutput::from(*n),
            Val::Text(s) => ToSqlOutput::from(s.as_str()),
            Val::Null => ToSqlOutput::from(rusqlite::types::Null),
        })
    }
}

impl ToSql for Val {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Int(n) if *ty == Type::INT4 => i32::try_from(*n)?.to_sql(ty, out),
            Val::Int(n) => n.to_sql(ty, out),
            Val::Text(s) => s.to_sql(ty, out),
            Val::Null => Ok(IsNull::Yes),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as ToSql>::accepts(ty) || <i32 as ToSql>::accepts(ty) || <String as ToSql>::accepts(ty)
    }

    postgres::types::to_sql_checked!();
}

/// A row's columns, from either database.
pub trait Cols {
    fn text(&self, i: usize) -> Result<String>;
    fn opt_text(&self, i: usize) -> Result<Option<String>>;
    fn int(&self, i: usize) -> Result<i64>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>>;
}

impl Cols for rusqlite::Row<'_> {
    fn text(&self, i: usize) -> Result<String> {
        Ok(self.get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64> {
        Ok(self.get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        Ok(self.get(i)?)
    }
}

impl Cols for postgres::Row {
    fn text(&self, i: usize) -> Result<String> {
        Ok(self.try_get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.try_get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64> {
        Ok(self.try_get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        Ok(self.try_get(i)?)
    }
}

/// One process's SQLite, or the PostgreSQL replicas share (batch state, usage reports).
pub enum Db {
    Sqlite(Connection),
    Postgres(Box<PgConnection>),
}

impl Db {
    /// Runs a statement; the rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        match self {
            Db::Sqlite(c) => Ok(c.execute(sql, rusqlite::params_from_iter(params))? as u64),
            Db::Postgres(pg) => Ok(pg.with(|c| c.execute(&dollars(sql), &pg_params(params)))?),
        }
    }

    /// Runs a query, reading each row with `read`.
    pub fn query<T>(
        &mut self,
        sql: &str,
        params: &[Val],
        read: fn(&dyn Cols) -> Result<T>,
    ) -> Result<Vec<T>> {
        match self {
            Db::Sqlite(c) => sqlite_query(c, sql, params, read),
            Db::Postgres(pg) => {
                let rows = pg.with(|c| c.query(&dollars(sql), &pg_params(params)))?;
                rows.iter().map(|r| read(r)).collect()
            }
        }
    }

    /// The first row of a query, if any.
    pub fn query_opt<T>(
        &mut self,
        sql: &str,
        params: &[Val],
        read: fn(&dyn Cols) -> Result<T>,
    ) -> Result<Option<T>> {
        Ok(self.query(sql, params, read)?.into_iter().next())
    }

    /// Whether several processes share this database (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }
}

/// Parameters as the `postgres` crate takes them.
fn pg_params(params: &[Val]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

/// SQLite's `?N` placeholders as PostgreSQL's `$N`.
fn dollars(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// A transaction on either database: what runs in it commits together, or not at all.
pub enum Tx<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres(postgres::Transaction<'a>),
}

impl Tx<'_> {
    /// Runs a statement; the rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        match self {
            Tx::Sqlite(t) => {
                let mut stmt = t.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(params))? as u64)
            }
            Tx::Postgres(t) => Ok(t.execute(&dollars(sql), &pg_params(params))?),
        }
    }

    /// Runs a query (or a statement with `RETURNING`), reading each row with `read`.
    pub fn query<T>(
        &mut self,
        sql: &str,
        params: &[Val],
        read: fn(&dyn Cols) -> Result<T>,
    ) -> Result<Vec<T>> {
        match self {
            Tx::Sqlite(t) => sqlite_query(t, sql, params, read),
            Tx::Postgres(t) => {
                let rows = t.query(&dollars(sql), &pg_params(params))?;
                rows.iter().map(|r| read(r)).collect()
            }
        }
    }

    fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(t) => Ok(t.commit()?),
            Tx::Postgres(t) => Ok(t.commit()?),
        }
    }
}

impl Db {
    /// Runs `f` in a transaction, committed when it returns `Ok` (rolled back otherwise).
    pub fn transaction<T>(&mut self, f: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        match self {
            Db::Sqlite(c) => {
                let mut tx = Tx::Sqlite(c.transaction()?);
                let value = f(&mut tx)?;
                tx.commit()?;
                Ok(value)
            }
            Db::Postgres(pg) => {
                // `with` wants the driver's error; ours waits outside until it returns.
                let mut failed = None;
                let value = pg.with(|c| {
                    let mut tx = Tx::Postgres(c.transaction()?);
                    match f(&mut tx) {
                        Ok(v) => {
                            let Tx::Postgres(t) = tx else { unreachable!() };
                            t.commit()?;
                            Ok(Some(v))
                        }
                        Err(e) => {
                            failed = Some(e);
                            Ok(None)
                        }
                    }
                })?;
                match (value, failed) {
                    (Some(v), _) => Ok(v),
                    (None, Some(e)) => Err(e),
                    (None, None) => Err(StoreError::new("transaction not run".into())),
                }
            }
        }
    }

    /// Runs `f`'s reads on one snapshot of the database: what other connections commit
    /// meanwhile (the writer's retention deleting raw records it has rolled up, say) is not
    /// seen halfway, so the several queries of a report agree with each other.
    pub fn snapshot<T>(&mut self, f: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
        match self {
            Db::Sqlite(c) => c.execute_batch("BEGIN")?,
            Db::Postgres(pg) => {
                pg.with(|c| c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"))?
            }
        }
        let out = f(self);
        let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = match self {
            Db::Sqlite(c) => c.execute_batch(end).map_err(StoreError::from),
            Db::Postgres(pg) => pg.end_transaction(end).map_err(StoreError::from),
        };
        let value = out?;
        ended?;
        Ok(value)
    }

    /// Connects now (PostgreSQL, bringing its schema up to date) rather than on first use.
    pub fn connect(&mut self) -> Result<()> {
        match self {
            Db::Sqlite(_) => Ok(()),
            Db::Postgres(pg) => Ok(pg.with(|_| Ok(()))?),
        }
    }
}

/// A query on SQLite (a connection or a transaction), each row read with `read`.
fn sqlite_query<T>(
    c: &Connection,
    sql: &str,
    params: &[Val],
    read: fn(&dyn Cols) -> Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = c.prepare_cached(sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(read(row)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_does_not_see_what_another_connection_commits_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; CREATE TABLE t (n INTEGER); \
                 INSERT INTO t VALUES (1), (2), (3);",
            )
            .unwrap();
        let reader =
            Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let mut db = Db::Sqlite(reader);
        let count = |db: &mut Db| -> Result<i64> {
            Ok(db.query("SELECT count(*) FROM t", &[], |r| r.int(0))?[0])
        };
        let (before, during) = db
            .snapshot(|db| {
                let before = count(db)?;
                writer.execute("DELETE FROM t WHERE n < 3", []).unwrap();
                Ok((before, count(db)?))
            })
            .unwrap();
        assert_eq!((before, during), (3, 3));
        // Once it ends, the next read sees the deletion; and a failed snapshot ends too.
        assert_eq!(count(&mut db).unwrap(), 1);
        let failed = db.snapshot(|db| {
            count(db)?;
            Err::<(), _>(StoreError::new("the report failed".into()))
        });
        assert!(failed.is_err());
        assert_eq!(db.snapshot(count).unwrap(), 1);
    }
}
