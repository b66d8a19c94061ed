//! PostgreSQL specifics: one pool serves reads and writes.

use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

pub async fn connect(url: &str, max_connections: u32) -> Result<AnyPool, sqlx::Error> {
    AnyPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
}
