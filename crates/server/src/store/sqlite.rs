//! SQLite specifics: file creation, pragmas, and the single-writer pool.

use std::time::Duration;

use sqlx::AnyPool;
use sqlx::Executor;
use sqlx::any::AnyPoolOptions;

/// Accepts `sqlite://path`, `sqlite:path` or a bare file path; the file is
/// created if missing.
pub fn normalize_url(url: &str) -> String {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    if rest.contains('?') {
        format!("sqlite://{rest}")
    } else {
        format!("sqlite://{rest}?mode=rwc")
    }
}

/// How often the WAL is copied back into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

async fn pool(url: &str, max: u32, extra: &'static str) -> Result<AnyPool, sqlx::Error> {
    AnyPoolOptions::new()
        .max_connections(max)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                )
                .await?;
                if !extra.is_empty() {
                    conn.execute(extra).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await
}

/// SQLite has a single writer: all writes share one connection, so they
/// queue in-process instead of failing with `database is locked`; reads
/// run in parallel on the others (WAL).
///
/// The writer never checkpoints: left to SQLite, the commit that fills the
/// WAL past 1,000 pages copies it back and fsyncs both files (several ms)
/// while every write behind it waits. A passive checkpoint on a reader
/// connection every CHECKPOINT_EVERY does that work off the write path.
pub async fn connect(url: &str) -> Result<(AnyPool, AnyPool), sqlx::Error> {
    let url = normalize_url(url);
    let writer = pool(&url, 1, "PRAGMA wal_autocheckpoint = 0;").await?;
    let reader = pool(&url, 4, "").await?;
    tokio::spawn(checkpoints(reader.clone()));
    Ok((writer, reader))
}

/// Runs until the pool is closed.
async fn checkpoints(reader: AnyPool) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if reader.is_closed() {
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&reader)
            .await
        {
            if reader.is_closed() {
                return;
            }
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_url;

    #[test]
    fn urls() {
        assert_eq!(
            normalize_url("taskmesh.db"),
            "sqlite://taskmesh.db?mode=rwc"
        );
        assert_eq!(normalize_url("sqlite://a/b.db"), "sqlite://a/b.db?mode=rwc");
        assert_eq!(normalize_url("sqlite:x.db"), "sqlite://x.db?mode=rwc");
        assert_eq!(
            normalize_url("sqlite://x.db?mode=ro"),
            "sqlite://x.db?mode=ro"
        );
    }
}
