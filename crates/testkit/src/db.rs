//! Throwaway databases: a SQLite file in a temporary directory, or a new
//! database on a PostgreSQL server, removed when the [`TestDb`] is dropped
//! (even when a test panics). Tests and the benchmark both use it.

use std::path::PathBuf;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where throwaway databases are made: SQLite files in `dir`, or fresh
/// databases on the PostgreSQL server `admin_url` points at.
#[derive(Debug, Clone)]
pub enum DbKind {
    Sqlite { dir: PathBuf },
    Postgres { admin_url: String },
}

impl DbKind {
    /// What tests use: the system temporary directory, or
    /// `TASKMESH_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).
    pub fn for_tests(backend: Backend) -> DbKind {
        match backend {
            Backend::Sqlite => DbKind::Sqlite {
                dir: std::env::temp_dir(),
            },
            Backend::Postgres => DbKind::Postgres {
                admin_url: std::env::var("TASKMESH_TEST_DATABASE_URL")
                    .unwrap_or_else(|_| DEFAULT_PG.to_string()),
            },
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            DbKind::Sqlite { .. } => "SQLite",
            DbKind::Postgres { .. } => "PostgreSQL",
        }
    }
}

/// A database that exists for one test (or one benchmark figure) and is
/// removed when dropped.
pub struct TestDb {
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    Files(PathBuf),
    Postgres {
        admin_url: String,
        name: String,
    },
    /// Another owner's database: that owner removes it.
    None,
}

impl TestDb {
    /// A fresh database for a test; panics with what to do when PostgreSQL
    /// is not reachable.
    pub async fn new(backend: Backend) -> TestDb {
        TestDb::create(&DbKind::for_tests(backend), "test")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A fresh database of `kind`; `label` goes into its name.
    pub async fn create(kind: &DbKind, label: &str) -> Result<TestDb, Error> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        match kind {
            DbKind::Sqlite { dir } => {
                let path = dir.join(format!("taskmesh-{label}-{id}.db"));
                Ok(TestDb {
                    url: format!("sqlite://{}", path.display()),
                    cleanup: Cleanup::Files(path),
                })
            }
            DbKind::Postgres { admin_url } => {
                let name = format!("taskmesh_{label}_{id}");
                let mut conn = admin(admin_url).await?;
                sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
                    .await
                    .map_err(|e| format!("cannot create database {name}: {e}"))?;
                Ok(TestDb {
                    url: with_database(admin_url, &name),
                    cleanup: Cleanup::Postgres {
                        admin_url: admin_url.clone(),
                        name,
                    },
                })
            }
        }
    }

    /// The same database under a second owner that leaves it in place (a
    /// replica's view of its primary's database).
    pub fn borrowed(url: &str) -> TestDb {
        TestDb {
            url: url.to_string(),
            cleanup: Cleanup::None,
        }
    }
}

async fn admin(url: &str) -> Result<sqlx::PgConnection, Error> {
    use sqlx::Connection;
    Ok(sqlx::PgConnection::connect(url).await.map_err(|e| {
        format!(
            "PostgreSQL is not reachable at {url} ({e}). Start it, point \
             TASKMESH_TEST_DATABASE_URL at one, or set it to `skip` to run SQLite only."
        )
    })?)
}

/// The same server URL with another database name.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    format!("{host_part}/{name}{query}")
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Files(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Cleanup::None => {}
            Cleanup::Postgres { admin_url, name } => {
                let (admin_url, name) = (admin_url.clone(), name.clone());
                // Drop may run inside a runtime, which cannot block on
                // itself: a private one on its own thread drops the database.
                let _ = std::thread::spawn(move || {
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        return;
                    };
                    rt.block_on(async {
                        if let Ok(mut conn) = admin(&admin_url).await {
                            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                            let _ = sqlx::Executor::execute(&mut conn, sql.as_str()).await;
                        }
                    });
                })
                .join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_urls() {
        assert_eq!(
            super::with_database("postgres://u@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            super::with_database("postgres://u@h", "x"),
            "postgres://u@h/x"
        );
    }
}
