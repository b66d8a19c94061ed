//! The server's commands: `taskmesh serve` and `taskmesh token create`,
//! their flags (with env fallbacks) and their startup checklist.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use tokio::net::TcpListener;

use crate::domain::{self, Domain, Liveness};
use crate::model::TokenKind;
use crate::server::{self, ServerConfig};
use crate::store::Store;
use crate::tls::{ServerTls, TlsFiles};

#[derive(clap::Args)]
pub struct DatabaseArg {
    /// Database URL: a SQLite file (`sqlite://taskmesh.db`, or a bare path)
    /// or `postgres://user@host/db` to share one database between replicas.
    #[arg(
        long,
        env = "TASKMESH_DATABASE_URL",
        default_value = "sqlite://taskmesh.db"
    )]
    pub database_url: String,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TASKMESH_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: String,
    #[command(flatten)]
    pub database: DatabaseArg,
    /// Origins browsers may call from, comma-separated; any origin when unset.
    #[arg(
        long = "cors-origin",
        env = "TASKMESH_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// Seconds between HTTP/2 keepalive pings (and to wait for their answer).
    #[arg(long, env = "TASKMESH_KEEPALIVE_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keepalive_secs: u64,
    /// Seconds, after SIGINT/SIGTERM, for daemons to move to another
    /// replica, and then again for open calls to finish.
    #[arg(long, env = "TASKMESH_DRAIN_SECS", default_value_t = 10)]
    pub drain_secs: u64,
    /// How often daemons send heartbeats (told to them when they register).
    /// A daemon silent for 3 intervals is offline. Units: ms, s, m, h.
    #[arg(long, env = "TASKMESH_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// How long after a daemon's last sign of life its running tasks become
    /// interrupted and its dispatched ones are queued again, unless it comes
    /// back and reports them running.
    #[arg(long, env = "TASKMESH_OFFLINE_GRACE", default_value = "2m", value_parser = parse_duration)]
    pub offline_grace: Duration,
    /// How long a dispatched task waits for its daemon to take the SpawnTask
    /// before it is queued again.
    #[arg(long, env = "TASKMESH_DISPATCH_TIMEOUT", default_value = "1m", value_parser = parse_duration)]
    pub dispatch_timeout: Duration,
    /// How long an agent's permission request waits for a person
    /// (DecideApproval, `taskmesh task approve`) before it is denied.
    #[arg(long, env = "TASKMESH_APPROVAL_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub approval_timeout: Duration,
    /// Serve HTTPS: gRPC, gRPC-web, reflection, health and the page over
    /// TLS on the same port, with this certificate chain (PEM, the server's
    /// certificate first). Needs --tls-key. Reloaded on SIGHUP and when the
    /// file changes; a bad new one keeps the old and logs why.
    #[arg(
        long,
        env = "TASKMESH_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, RSA or EC).
    #[arg(
        long,
        env = "TASKMESH_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// With TLS: clients may present a certificate signed by this CA (PEM),
    /// and DaemonService calls need one (mTLS for daemons). Never required
    /// at the handshake, so browsers and the CLI connect without one.
    #[arg(
        long,
        env = "TASKMESH_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub client_ca: Option<PathBuf>,
    /// Largest request message a client may send, on every service; larger
    /// ones answer OUT_OF_RANGE. Units: B, KiB, MiB, GiB.
    #[arg(long, env = "TASKMESH_MAX_MESSAGE_BYTES", default_value = "4MiB", value_parser = parse_bytes)]
    pub max_message_bytes: usize,
    /// HTTP/2 streams (calls) one connection may have open at once; a
    /// client past it waits for one to finish.
    #[arg(long, env = "TASKMESH_MAX_STREAMS_PER_CONNECTION", default_value_t = server::DEFAULT_MAX_STREAMS_PER_CONNECTION,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,
    /// Close a connection that has carried no call for this long (open
    /// streams count as calls, keepalive pings do not); clients reconnect
    /// by themselves. Units: ms, s, m, h.
    #[arg(long, env = "TASKMESH_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Sessions and watches one token may hold open on this server; past
    /// it, new ones answer RESOURCE_EXHAUSTED.
    #[arg(long, env = "TASKMESH_MAX_STREAMS_PER_TOKEN", default_value_t = domain::Limits::default().max_streams_per_token,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_streams_per_token: usize,
    /// Output one watcher may hold undelivered before it falls back to
    /// catching up from the database, so a slow watcher costs this much
    /// memory at most. Units: B, KiB, MiB, GiB.
    #[arg(long, env = "TASKMESH_WATCHER_BUDGET", default_value = "8MiB", value_parser = parse_bytes)]
    pub watcher_budget: usize,
    /// Remove the output of tasks that ended longer ago than this (e.g.
    /// 30d); the task, its events and its usage stay, and reading the
    /// output says it was pruned. Checked every minute; off by default.
    #[arg(long, env = "TASKMESH_RETAIN_OUTPUT", value_parser = parse_duration)]
    pub retain_output: Option<Duration>,
    /// Remove whole tasks (with output, events and usage) that ended
    /// longer ago than this (e.g. 90d); a parent goes after its subtasks.
    /// Off by default.
    #[arg(long, env = "TASKMESH_RETAIN_TASKS", value_parser = parse_duration)]
    pub retain_tasks: Option<Duration>,
    /// Serve the Prometheus metrics on this address (plain HTTP, path
    /// /metrics) instead of at /metrics on --listen.
    #[arg(long, env = "TASKMESH_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// The log's format on stderr: `text` for people, `json` (one object a
    /// line) for log shippers. RUST_LOG sets what is logged.
    #[arg(long, env = "TASKMESH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `4MiB`, `512KiB`, `1048576`: a size in bytes.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: usize = n
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4MiB, 512KiB or 1048576"))?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?}; use B, KiB, MiB or GiB")),
    };
    n.checked_mul(scale)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{s:?} must be more than zero and fit in memory"))
}

/// `500ms`, `15s`, `2m`, `1h`, `30d`; a bare number is seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 15s, 2m, 1h or 30d"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        other => return Err(format!("unknown unit {other:?}; use ms, s, m, h or d")),
    };
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KindArg {
    /// For people and scripts: TaskService and WorkspaceService.
    User,
    /// For `taskmesh daemon`: DaemonService in one workspace.
    Daemon,
    /// Read-only, in one workspace: list, get and watch; change nothing.
    Viewer,
}

#[derive(clap::Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub database: DatabaseArg,
    /// Workspace the token is for (created if missing).
    #[arg(long, default_value = "default")]
    pub workspace: String,
    /// What the token may do.
    #[arg(long, value_enum, default_value = "user")]
    pub kind: KindArg,
    /// A label to tell tokens apart in ListTokens.
    #[arg(long, default_value = "cli")]
    pub name: String,
    /// For user tokens: the user it acts as (created and added to the
    /// workspace if missing).
    #[arg(long, default_value = "admin")]
    pub user: String,
}

pub type CliResult = Result<(), Box<dyn std::error::Error>>;

async fn connect(url: &str) -> Result<Store, String> {
    Store::connect(url)
        .await
        .map_err(|e| format!("cannot open the database {url}: {e}"))
}

/// `taskmesh serve`: opens the database, prints the first-start token and
/// the URL, serves until `shutdown`, then drains for `--drain-secs`.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> CliResult {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls::load(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.client_ca.clone(),
        })?),
        _ => None,
    };
    let store = connect(&args.database.database_url).await?;
    // The address first: a second server on a busy port fails here, before
    // it mints a first-start token nobody could use.
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let liveness = Liveness {
        heartbeat: args.heartbeat,
        grace: args.offline_grace,
        dispatch_timeout: args.dispatch_timeout,
        approval_timeout: args.approval_timeout,
    };
    let limits = domain::Limits {
        max_streams_per_token: args.max_streams_per_token,
        watcher_budget_bytes: args.watcher_budget,
        retain_output: args.retain_output,
        retain_tasks: args.retain_tasks,
    };
    let domain = Domain::with_limits(store.clone(), liveness, limits);
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Some(secret) = domain.bootstrap().await? {
        println!(
            "\nFirst start: created a user token for workspace \"default\". It is shown once:\n\n    {secret}\n\n\
             Sign in to the dashboard at {scheme}://{addr}/ with it, or use it as:\n\
             \x20   export TASKMESH_TOKEN={secret}\n\
             and send it as `authorization: Bearer $TASKMESH_TOKEN`. More tokens: `taskmesh token create`.\n"
        );
    }
    tracing::info!(backend = ?store.backend(), "database ready");
    // Before the line that says it is up: from then on a SIGHUP reloads
    // the certificate and never ends the process.
    let reloader = tls.as_ref().map(ServerTls::spawn_reloader);
    println!("taskmesh listening on {scheme}://{addr}  (gRPC, gRPC-web and the dashboard)");

    let drain = Duration::from_secs(args.drain_secs);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let draining = domain.clone();
    tokio::spawn(async move {
        shutdown.await;
        move_daemons(&draining, drain).await;
        tracing::info!("shutting down: no new connections; draining open ones");
        let _ = stop_tx.send(true);
    });
    let metrics = match &args.metrics_listen {
        Some(listen) => {
            let listener = TcpListener::bind(listen)
                .await
                .map_err(|e| format!("cannot listen on --metrics-listen {listen}: {e}"))?;
            println!("metrics on http://{}/metrics", listener.local_addr()?);
            let mut stopped = stop_rx.clone();
            Some(tokio::spawn(server::serve_metrics(
                listener,
                domain.clone(),
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            )))
        }
        None => {
            println!("metrics at {scheme}://{addr}/metrics");
            None
        }
    };
    let mut stopped = stop_rx.clone();
    let config = ServerConfig {
        cors_origins: args.cors_origins,
        keepalive: Duration::from_secs(args.keepalive_secs),
        tls,
        max_message_bytes: args.max_message_bytes,
        max_streams_per_connection: args.max_streams_per_connection,
        idle_timeout: Some(args.idle_timeout),
        metrics_here: args.metrics_listen.is_none(),
    };
    let server = server::run(listener, domain, config, async move {
        let _ = stopped.wait_for(|s| *s).await;
    });
    tokio::select! {
        r = server => r?,
        _ = async { let _ = stop_rx.wait_for(|s| *s).await; tokio::time::sleep(drain).await } => {
            tracing::warn!("drain deadline passed; closing the remaining streams");
        }
    }
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// The first step of a graceful stop: tells every daemon with a session
/// here to move to another replica, refuses new sessions, and waits (up to
/// `patience`) until they have left. Their tasks run on; a daemon that
/// knows no other replica comes back when this one restarts.
async fn move_daemons(domain: &Domain, patience: Duration) {
    let sessions = domain.session_count();
    domain.drain_sessions();
    if sessions == 0 {
        return;
    }
    tracing::info!(
        sessions,
        "shutting down: asking daemons to move to another replica"
    );
    let left = async {
        // A handful of reads of a counter, only while shutting down.
        let mut every = tokio::time::interval(Duration::from_millis(20));
        while domain.session_count() > 0 {
            every.tick().await;
        }
    };
    match tokio::time::timeout(patience, left).await {
        Ok(()) => tracing::info!("every daemon has left"),
        Err(_) => tracing::warn!(
            remaining = domain.session_count(),
            "drain deadline passed with daemons still here; closing their sessions"
        ),
    }
}

/// `taskmesh token create`: a token minted straight in the database.
pub async fn token_create(args: TokenCreateArgs) -> CliResult {
    let url = &args.database.database_url;
    let fresh = is_new_sqlite_file(url);
    let store = connect(url).await?;
    if fresh {
        // The usual mistake: run where the server's database is not.
        eprintln!(
            "note: {url} did not exist and was created; the token works only for a server on this \
             database (export TASKMESH_TOKEN to create it through the server, pass --database-url, \
             or run this where `taskmesh serve` runs)"
        );
    }
    let domain = Domain::new(store.clone());
    let kind = match args.kind {
        KindArg::User => TokenKind::User,
        KindArg::Daemon => TokenKind::Daemon,
        KindArg::Viewer => TokenKind::Viewer,
    };
    let (_, secret, ws) = domain
        .create_token_unchecked(&args.workspace, kind, &args.name, &args.user)
        .await?;
    store.close().await;
    eprintln!(
        "created a {kind} token for workspace {} (shown once)",
        ws.name
    );
    println!("{secret}");
    Ok(())
}

/// Whether `url` names a SQLite file that does not exist yet.
fn is_new_sqlite_file(url: &str) -> bool {
    if url.starts_with("postgres") {
        return false;
    }
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:")
        .split('?')
        .next()
        .unwrap_or_default();
    !path.is_empty() && path != ":memory:" && !std::path::Path::new(path).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_sqlite_file_is_noticed() {
        assert!(is_new_sqlite_file("sqlite:///nonexistent/taskmesh.db"));
        assert!(is_new_sqlite_file("nowhere-taskmesh.db"));
        assert!(!is_new_sqlite_file("postgres://postgres@127.0.0.1/test"));
        assert!(!is_new_sqlite_file("sqlite::memory:"));
        assert!(!is_new_sqlite_file("/"));
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(parse_bytes("4MiB"), Ok(4 << 20));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("4 parsecs").is_err());
        assert!(parse_bytes("99999999999999999999GiB").is_err());
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
