//! The `taskmesh` command. Each subcommand hands its parsed flags to one
//! crate: `serve` and `token` to taskmesh-server, `daemon` to
//! taskmesh-daemon, `task` and `daemons` to taskmesh-cli, `bench` to
//! taskmesh-bench.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use taskmesh_cli::TokenRoute;
use taskmesh_server::cmd::{LogFormat, ServeArgs};
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
    /// Create, list and revoke access tokens (through the server, or
    /// straight in the database for a first token).
    Token(taskmesh_cli::TokenArgs),
    /// Run the reference daemon: take tasks from a server and run each as a
    /// child process.
    Daemon(taskmesh_daemon::DaemonArgs),
    /// Create, list, start, stop and watch tasks on a running server.
    Task(taskmesh_cli::TaskArgs),
    /// List the daemons of a workspace on a running server.
    Daemons(taskmesh_cli::DaemonsArgs),
    /// Measure a real server with real clients, each figure beside its floor.
    Bench(taskmesh_bench::BenchArgs),
    /// Serve an agent's taskmesh tools over MCP on stdin/stdout (the
    /// daemon names it in Claude Code's and Codex's MCP configuration).
    Mcp(taskmesh_cli::mcp::McpArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if matches!(&cli.command, Command::Serve(a) if a.log_format == LogFormat::Json) {
        // One JSON object a line, for log shippers.
        log.json().init();
    } else {
        // Colour codes only for a person at a terminal, not for a log file
        // or a journal (and never with NO_COLOR set).
        log.with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("taskmesh: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => taskmesh_server::cmd::serve(args, shutdown_signal()).await,
            Command::Token(args) => match args.route() {
                TokenRoute::Database(create) => {
                    taskmesh_server::cmd::token_create(database_token(create)).await
                }
                TokenRoute::Server(args) => taskmesh_cli::token(args).await.map_err(Into::into),
            },
            Command::Daemon(args) => taskmesh_daemon::run(args, stop_requests())
                .await
                .map_err(Into::into),
            Command::Task(args) => taskmesh_cli::task(args).await.map_err(Into::into),
            Command::Daemons(args) => taskmesh_cli::daemons(args).await.map_err(Into::into),
            Command::Bench(args) => taskmesh_bench::run(args).await.map_err(|e| e as _),
            Command::Mcp(args) => taskmesh_cli::mcp::run(args).await.map_err(Into::into),
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

/// Every Ctrl-C or SIGTERM, as it comes: the daemon drains on the first
/// and interrupts its tasks on the next.
#[cfg(unix)]
fn stop_requests() -> impl futures_util::Stream<Item = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    // Listening from the start, so a signal between two requests is kept.
    let signals = signal(SignalKind::interrupt())
        .ok()
        .zip(signal(SignalKind::terminate()).ok());
    futures_util::stream::unfold(signals, |mut signals| async move {
        match &mut signals {
            Some((int, term)) => tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} },
            None => shutdown_signal().await,
        }
        Some(((), signals))
    })
}

#[cfg(not(unix))]
fn stop_requests() -> impl futures_util::Stream<Item = ()> + Send + 'static {
    futures_util::stream::unfold((), |()| async {
        let _ = tokio::signal::ctrl_c().await;
        Some(((), ()))
    })
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

/// `token create` in the database: its flags as the server's command takes
/// them.
fn database_token(c: taskmesh_cli::TokenCreateArgs) -> taskmesh_server::cmd::TokenCreateArgs {
    use taskmesh_cli::TokenKindArg as Kind;
    use taskmesh_server::cmd::KindArg;
    taskmesh_server::cmd::TokenCreateArgs {
        database: taskmesh_server::cmd::DatabaseArg {
            database_url: c
                .database_url
                .unwrap_or_else(|| "sqlite://taskmesh.db".to_owned()),
        },
        workspace: c.workspace.unwrap_or_else(|| "default".to_owned()),
        kind: match c.kind {
            Kind::User => KindArg::User,
            Kind::Daemon => KindArg::Daemon,
            Kind::Viewer => KindArg::Viewer,
        },
        name: c.name,
        user: c.user,
    }
}
