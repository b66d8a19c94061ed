//! `Store` owns the database pools; every query in taskmesh is here.
//!
//! The SQL is written once for both backends through sqlx's `Any` driver
//! (`$n` placeholders work on SQLite and PostgreSQL alike). What differs,
//! connecting, pragmas, migrations and locking, is in `sqlite.rs` and
//! `postgres.rs`, selected by [`Backend`].

mod appends;
mod approvals;
mod attempts;
mod changes;
mod daemons;
mod group;
mod messages;
mod metrics;
mod outbox;
mod postgres;
mod retention;
mod sqlite;
mod tasks;
mod tokens;
mod usage;
mod workspaces;

pub use appends::Append;
pub use daemons::DaemonInfo;
pub use messages::NewMessage;
pub use metrics::Census;
pub use outbox::{AckedCommand, NewCommand, PendingCommand};
pub use tasks::{CLAIM, NewEvent, SpawnMaker, TaskFilter};

use std::sync::LazyLock;

use sqlx::Any;
use sqlx::AnyPool;
use sqlx::any::AnyArguments;
use sqlx::query::Query;

use crate::model::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("the database writer stopped (the server is closing)")]
    WriterStopped,
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `postgres://` and `postgresql://` select PostgreSQL; `sqlite:` or a
    /// plain file path select SQLite; any other scheme is refused.
    pub fn from_url(url: &str) -> Result<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") || !url.contains("://") {
            Ok(Backend::Sqlite)
        } else {
            Err(Error::UnsupportedUrl(url.to_string()))
        }
    }
}

#[derive(Clone)]
pub struct Store {
    writer: AnyPool,
    reader: AnyPool,
    backend: Backend,
    url: String,
    /// The group committer of output appends; `None` in the committer's
    /// own copy, which commits directly.
    appends: Option<appends::Appends>,
    /// The group committer of task writes (transitions, claims, commands);
    /// `None` in the committers' own copy.
    group: Option<group::Group>,
}

/// A bound value for queries whose shape is built at run time.
enum Arg {
    Text(String),
    Int(i64),
}

impl Store {
    /// Connects and applies the migrations of the URL's backend.
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        // One plain connection first: a wrong URL fails now with the
        // driver's reason, instead of after the pool's retries time out.
        let probe_url = match backend {
            Backend::Sqlite => sqlite::normalize_url(url),
            Backend::Postgres => url.to_string(),
        };
        sqlx::Connection::close(
            <sqlx::AnyConnection as sqlx::Connection>::connect(&probe_url).await?,
        )
        .await?;
        // SQLite has one writer connection, so one committer of each
        // kind; PostgreSQL commits several groups at once, each waiting on
        // its WAL flush (and a task write group runs more statements, one
        // round trip each, than an append group).
        let (append_committers, write_committers) = match backend {
            Backend::Sqlite => (1, 1),
            Backend::Postgres => (2, 4),
        };
        let (writer, reader) = match backend {
            Backend::Sqlite => sqlite::connect(url).await?,
            Backend::Postgres => {
                let pool = postgres::connect(url, 16).await?;
                (pool.clone(), pool)
            }
        };
        let mut store = Store {
            writer,
            reader,
            backend,
            url: url.to_string(),
            appends: None,
            group: None,
        };
        store.migrate().await?;
        store.appends = Some(appends::Appends::start(store.clone(), append_committers));
        store.group = Some(group::Group::start(store.clone(), write_committers));
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let migrator = match self.backend {
            Backend::Sqlite => sqlx::migrate!("migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("migrations/postgres"),
        };
        migrator.run(&self.writer).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL it was opened with (the cluster listener opens its own
    /// connection to it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// PostgreSQL NOTIFY on `channel`.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}

type AnyQuery<'q> = Query<'q, Any, AnyArguments<'q>>;

fn bind_args(mut q: AnyQuery<'_>, args: Vec<Arg>) -> AnyQuery<'_> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(s),
            Arg::Int(i) => q.bind(i),
        };
    }
    q
}

fn parse_enum<E: StoredEnum>(s: &str) -> Result<E> {
    E::parse(s).ok_or_else(|| Error::Corrupt(format!("unknown value {s:?}")))
}

/// Ids per `IN (…)` list, well below every backend's parameter limit.
const ID_CHUNK: usize = 500;

/// `$2, $3, …` for `n` ids after `first - 1` other parameters.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Store {
    /// The `n`th parameter of a statement whose parameters are bound in
    /// order. SQLite resolves a named parameter (`$n`) with a linear scan of
    /// the statement's names, which makes binding quadratic in the number of
    /// parameters: a 100-row batch spent most of its time there. Anonymous
    /// `?` are bound in order without a lookup.
    fn placeholder(&self, n: usize) -> String {
        match self.backend {
            Backend::Sqlite => "?".to_string(),
            Backend::Postgres => format!("${n}"),
        }
    }

    /// `n` rows of `width` parameters for a multi-row VALUES list, numbered
    /// from 1: `($1, $2), ($3, $4)` (`?` on SQLite).
    fn rows_of(&self, width: usize, n: usize) -> String {
        let rows: Vec<String> = (0..n)
            .map(|r| {
                let row: Vec<String> = (1..=width)
                    .map(|c| self.placeholder(r * width + c))
                    .collect();
                format!("({})", row.join(", "))
            })
            .collect();
        rows.join(", ")
    }
}

/// The statuses of tasks a daemon holds ([`TaskStatus::is_active`]) as an
/// SQL list, `('dispatched', 'running')`: every query that asks "is it on a
/// daemon?" uses this one list.
static ACTIVE: LazyLock<String> = LazyLock::new(|| status_list(TaskStatus::is_active));

/// The statuses of finished tasks ([`TaskStatus::is_finished`]) as an SQL
/// list: what retention may remove.
static FINISHED: LazyLock<String> = LazyLock::new(|| status_list(TaskStatus::is_finished));

/// The statuses `pick` holds for, as an SQL list: `('a', 'b')`.
fn status_list(pick: fn(TaskStatus) -> bool) -> String {
    let names: Vec<String> = TaskStatus::ALL
        .iter()
        .filter(|s| pick(**s))
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    format!("({})", names.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_from_url() {
        assert_eq!(
            Backend::from_url("postgres://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            Backend::from_url("postgresql://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(Backend::from_url("sqlite://x.db").unwrap(), Backend::Sqlite);
        assert_eq!(Backend::from_url("data/x.db").unwrap(), Backend::Sqlite);
        assert!(Backend::from_url("mysql://h/db").is_err());
    }

    #[test]
    fn placeholders_number_after_the_leading_parameters() {
        assert_eq!(placeholders(2, 3), "$2, $3, $4");
        assert_eq!(placeholders(1, 1), "$1");
    }

    /// The SQL list and `is_active` name the same statuses, each once.
    #[test]
    fn the_active_list_agrees_with_is_active() {
        assert_eq!(*ACTIVE, "('dispatched', 'running')");
        for &s in TaskStatus::ALL {
            let quoted = format!("'{}'", s.as_str());
            assert_eq!(
                ACTIVE.matches(&quoted).count(),
                usize::from(s.is_active()),
                "{s}"
            );
        }
    }
}
