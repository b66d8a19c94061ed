//! The `taskmesh` command: the server, token administration, and (as they
//! land) the daemon and the task verbs.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use taskmesh::domain::{Domain, Liveness};
use taskmesh::model::TokenKind;
use taskmesh::server::{self, ServerConfig};
use taskmesh::store::Store;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// taskmesh: a control plane for coding-agent daemons.
///
/// Run `taskmesh serve`, take the token it prints on first start, and talk to
/// it with buf curl, grpcurl, a browser or a daemon on the same port.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: gRPC, gRPC-web, reflection, health and the
    /// dashboard on one port.
    Serve(ServeArgs),
    /// Manage access tokens directly in the database.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run the reference daemon: take tasks from a server and run each as a
    /// child process.
    Daemon(taskmesh::daemon::DaemonArgs),
    /// Create, list, start, stop and watch tasks on a running server.
    Task(taskmesh::cli::TaskArgs),
    /// List the daemons of a workspace on a running server.
    Daemons(taskmesh::cli::DaemonsArgs),
    /// Measure a real server with real clients, each figure beside its floor.
    Bench(taskmesh::bench::BenchArgs),
}

#[derive(clap::Args)]
struct DatabaseArg {
    /// Database URL: a SQLite file (`sqlite://taskmesh.db`, or a bare path)
    /// or `postgres://user@host/db` to share one database between replicas.
    #[arg(
        long,
        env = "TASKMESH_DATABASE_URL",
        default_value = "sqlite://taskmesh.db"
    )]
    database_url: String,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TASKMESH_LISTEN", default_value = "127.0.0.1:7070")]
    listen: String,
    #[command(flatten)]
    database: DatabaseArg,
    /// Origins browsers may call from, comma-separated; any origin when unset.
    #[arg(
        long = "cors-origin",
        env = "TASKMESH_CORS_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// Seconds between HTTP/2 keepalive pings (and to wait for their answer).
    #[arg(long, env = "TASKMESH_KEEPALIVE_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    keepalive_secs: u64,
    /// Seconds to let open streams finish after SIGINT/SIGTERM.
    #[arg(long, env = "TASKMESH_DRAIN_SECS", default_value_t = 10)]
    drain_secs: u64,
    /// How often daemons send heartbeats (told to them when they register).
    /// A daemon silent for 3 intervals is offline. Units: ms, s, m, h.
    #[arg(long, env = "TASKMESH_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// How long after a daemon's last sign of life its running tasks become
    /// interrupted and its dispatched ones are queued again, unless it comes
    /// back and reports them running.
    #[arg(long, env = "TASKMESH_OFFLINE_GRACE", default_value = "2m", value_parser = parse_duration)]
    offline_grace: Duration,
    /// How long a dispatched task waits for its daemon to take the SpawnTask
    /// before it is queued again.
    #[arg(long, env = "TASKMESH_DISPATCH_TIMEOUT", default_value = "1m", value_parser = parse_duration)]
    dispatch_timeout: Duration,
}

/// `500ms`, `15s`, `2m`, `1h`; a bare number is seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 15s, 2m or 1h"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => return Err(format!("unknown unit {other:?}; use ms, s, m or h")),
    };
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print its secret alone on stdout (shown once).
    ///
    /// Example: export TASKMESH_TOKEN=$(taskmesh token create --kind daemon)
    Create(TokenCreateArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    /// For people and scripts: TaskService and WorkspaceService.
    User,
    /// For `taskmesh daemon`: DaemonService in one workspace.
    Daemon,
}

#[derive(clap::Args)]
struct TokenCreateArgs {
    #[command(flatten)]
    database: DatabaseArg,
    /// Workspace the token is for (created if missing).
    #[arg(long, default_value = "default")]
    workspace: String,
    /// What the token may do.
    #[arg(long, value_enum, default_value = "user")]
    kind: KindArg,
    /// A label to tell tokens apart in ListTokens.
    #[arg(long, default_value = "cli")]
    name: String,
    /// For user tokens: the user it acts as (created and added to the
    /// workspace if missing).
    #[arg(long, default_value = "admin")]
    user: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("taskmesh: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Token(TokenCommand::Create(args)) => token_create(args).await,
            Command::Daemon(args) => taskmesh::daemon::run(args, shutdown_signal())
                .await
                .map_err(Into::into),
            Command::Task(args) => taskmesh::cli::task(args).await.map_err(Into::into),
            Command::Daemons(args) => taskmesh::cli::daemons(args).await.map_err(Into::into),
            Command::Bench(args) => taskmesh::bench::run(args).await.map_err(|e| e as _),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taskmesh: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

async fn connect(url: &str) -> Result<Store, String> {
    Store::connect(url)
        .await
        .map_err(|e| format!("cannot open the database {url}: {e}"))
}

async fn serve(args: ServeArgs) -> CliResult {
    let store = connect(&args.database.database_url).await?;
    let liveness = Liveness {
        heartbeat: args.heartbeat,
        grace: args.offline_grace,
        dispatch_timeout: args.dispatch_timeout,
    };
    let domain = Domain::with_liveness(store.clone(), liveness);
    if let Some(secret) = domain.bootstrap().await? {
        println!(
            "\nFirst start: created a user token for workspace \"default\". It is shown once:\n\n    {secret}\n\n\
             Use it as:  export TASKMESH_TOKEN={secret}\n\
             and send it as `authorization: Bearer $TASKMESH_TOKEN`. More tokens: `taskmesh token create`.\n"
        );
    }
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(backend = ?store.backend(), "database ready");
    println!("taskmesh listening on http://{addr}  (gRPC, gRPC-web and the dashboard)");

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new connections; draining open ones");
        let _ = stop_tx.send(true);
    });
    let mut stopped = stop_rx.clone();
    let config = ServerConfig {
        cors_origins: args.cors_origins,
        keepalive: Duration::from_secs(args.keepalive_secs),
    };
    let server = server::run(listener, domain, config, async move {
        let _ = stopped.wait_for(|s| *s).await;
    });
    let drain = Duration::from_secs(args.drain_secs);
    tokio::select! {
        r = server => r?,
        _ = async { let _ = stop_rx.wait_for(|s| *s).await; tokio::time::sleep(drain).await } => {
            tracing::warn!("drain deadline passed; closing the remaining streams");
        }
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} },
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn token_create(args: TokenCreateArgs) -> CliResult {
    let store = connect(&args.database.database_url).await?;
    let domain = Domain::new(store.clone());
    let kind = match args.kind {
        KindArg::User => TokenKind::User,
        KindArg::Daemon => TokenKind::Daemon,
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

#[cfg(test)]
mod tests {
    use super::*;

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
