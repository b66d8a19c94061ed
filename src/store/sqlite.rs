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

async fn pool(url: &str, max: u32) -> Result<AnyPool, sqlx::Error> {
    AnyPoolOptions::new()
        .max_connections(max)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                )
                .await?;
                Ok(())
            })
        })
        .connect(url)
        .await
}

/// SQLite has a single writer: all writes share one connection, so they
/// queue in-process instead of failing with `database is locked`; reads
/// run in parallel on the others (WAL).
pub async fn connect(url: &str) -> Result<(AnyPool, AnyPool), sqlx::Error> {
    let url = normalize_url(url);
    let writer = pool(&url, 1).await?;
    let reader = pool(&url, 4).await?;
    Ok((writer, reader))
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
