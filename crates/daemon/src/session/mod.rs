//! The session loop: register, hold one `Session` stream, run commands,
//! send output and end reports, and reconnect when the stream breaks.
//!
//! Delivery rests on two idempotent exchanges:
//! - Down, each `Command` stays in the server's outbox until its
//!   `CommandResult` arrives; a command may come again after a reconnect, so
//!   results are remembered by command id and replayed, never re-executed.
//! - Up, output is numbered per task; the server stores it by (task, seq) and
//!   answers `OutputAck{acked_seq}`. Everything above `acked_seq` stays in
//!   the task's [`OutputBuffer`] and is resent on every new session, followed
//!   by the end report, until an ack says `task_ended`.

//!
//! - [`commands`]: what the server asks (spawn, interrupt, input), each
//!   answered once per command id.
//! - [`uplink`]: what goes up (started, output batches, end reports) and
//!   what the server's acknowledgements release.
//! - [`shutdown`]: the phases of a graceful stop.

mod commands;
mod shutdown;
mod uplink;

#[cfg(test)]
mod mock;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior, sleep, sleep_until};
use tonic::Status;
use tracing::{info, warn};

use super::Config;
use super::client::{
    BACKOFF_CAP, BACKOFF_START, Backoff, Client, Conn, OpenError, Servers, Target, open_session,
    targets, to_duration,
};
use super::output::OutputBuffer;
use super::runner::{Control, RunnerEvent};
use crate::pb::session_request::Message as Up;
use crate::pb::session_response::Message as Down;
use crate::pb::{
    HeartbeatRequest, RegisterRequest, ReportTaskStartedRequest, Runtime, SessionRequest,
};
/// Stop requests, as they come; the stream ending means none will.
pub(crate) type Stops = Pin<Box<dyn Stream<Item = ()> + Send>>;

use commands::SeenCommands;
use shutdown::Phase;

/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// How long the server may take to answer `open` with `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const EVENTS_CAPACITY: usize = 256;

/// Why a session (or the attempt to open one) ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// The graceful stop is done.
    ShutdownFinished,
    /// The server ended the stream.
    ServerClosed,
    /// The stream broke, or the server ended it with an error.
    StreamFailed(Status),
    /// The request stream closed under the session.
    RequestStreamClosed,
    /// The server did not answer `open` with `ready` in time.
    NotReady,
    /// Register or opening the stream failed.
    OpenFailed(OpenError),
    /// The server is shutting down and asked the daemon to move; a session
    /// on another server is open (in `Session::moved`).
    Moved,
    /// The server is shutting down and asked the daemon to move, and no
    /// other server took it yet.
    Drained,
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::ShutdownFinished => f.write_str("shutdown finished"),
            SessionEnd::ServerClosed => f.write_str("the server closed the session"),
            SessionEnd::StreamFailed(s) => {
                write!(f, "session stream failed: {:?}: {}", s.code(), s.message())
            }
            SessionEnd::RequestStreamClosed => f.write_str("the request stream closed"),
            SessionEnd::NotReady => f.write_str("no SessionReady from the server in time"),
            SessionEnd::OpenFailed(e) => e.fmt(f),
            SessionEnd::Moved => f.write_str("moved to another server (this one is shutting down)"),
            SessionEnd::Drained => {
                f.write_str("the server is shutting down and no other server took the session yet")
            }
        }
    }
}

/// What the daemon knows of one task attempt until the server acknowledges
/// its end.
pub(crate) struct TaskRecord {
    run_id: u64,
    spawn_command_id: String,
    attempt: i32,
    /// `None` once the runner has ended: the agent is gone.
    control: Option<mpsc::Sender<Control>>,
    /// Interrupted because the daemon is shutting down: its end asks the
    /// server to queue it again.
    cut_by_shutdown: bool,
    /// Sent after spawning; resent if the spawn command comes again.
    started: Option<ReportTaskStartedRequest>,
    buffer: OutputBuffer,
    /// Tells the runner to stop reading while the buffer is over its limit.
    pressure: watch::Sender<bool>,
    end: Option<Up>,
    end_sent: bool,
    /// When a batch of this task last went out; the longest-waiting task
    /// goes next, so one chatty agent cannot starve the others.
    last_sent: Instant,
}

impl TaskRecord {
    fn is_live(&self) -> bool {
        self.control.is_some()
    }

    fn update_pressure(&self) {
        let over = self.buffer.over_limit();
        self.pressure
            .send_if_modified(|p| std::mem::replace(p, over) != over);
    }
}

pub(crate) struct Session {
    cfg: Arc<Config>,
    servers: Servers,
    /// The server of the current (or last) session, and its client.
    server: Option<(Target, Client)>,
    /// A session opened on another server while the last one drained.
    moved: Option<(Target, Client, Conn)>,
    /// Stop requests (SIGTERM, Ctrl-C): the first drains, the next
    /// interrupts running tasks at once.
    stops: Stops,
    stops_open: bool,
    shutdown_seen: bool,
    phase: Phase,
    daemon_id: Option<String>,
    tasks: HashMap<String, TaskRecord>,
    seen: SeenCommands,
    /// Command results, started reports and heartbeats, sent before output.
    control_out: VecDeque<SessionRequest>,
    /// When buffered output is due; `None` when nothing is waiting.
    flush_at: Option<Instant>,
    events_tx: mpsc::Sender<RunnerEvent>,
    events_rx: mpsc::Receiver<RunnerEvent>,
    next_run_id: u64,
}

fn up(message: Up) -> SessionRequest {
    SessionRequest {
        message: Some(message),
    }
}

type Opening = Pin<Box<dyn Future<Output = Result<Conn, OpenError>> + Send>>;

/// Waits for the session opening in `moving`; never ready without one.
async fn opening(moving: &mut Option<(Target, Client, Opening)>) -> Result<Conn, OpenError> {
    match moving {
        Some((_, _, opening)) => opening.await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

impl Session {
    pub(crate) fn new(cfg: Arc<Config>, servers: Servers, stops: Stops) -> Self {
        let (events_tx, events_rx) = mpsc::channel(EVENTS_CAPACITY);
        Self {
            cfg,
            servers,
            server: None,
            moved: None,
            stops,
            stops_open: true,
            shutdown_seen: false,
            phase: Phase::Running,
            daemon_id: None,
            tasks: HashMap::new(),
            seen: SeenCommands::default(),
            control_out: VecDeque::new(),
            flush_at: None,
            events_tx,
            events_rx,
            next_run_id: 1,
        }
    }

    /// Connects, serves sessions and reconnects until shutdown is done,
    /// then deregisters. Ends early, with the server's refusal, when the
    /// server will not take this daemon with its token (UNAUTHENTICATED or
    /// PERMISSION_DENIED at Register): retrying could not help.
    pub(crate) async fn run(mut self) -> Result<(), OpenError> {
        let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_CAP);
        let mut attempt: u32 = 0;
        let why = loop {
            let opened = match self.moved.take() {
                Some((target, client, conn)) => {
                    self.server = Some((target, client));
                    Some(Ok(conn))
                }
                None => match self.choose_server().await {
                    None => break "shutdown finished while connecting",
                    Some(None) => Some(Err(OpenError::NoServer)),
                    Some(Some(client)) => {
                        let register = self.register_request();
                        let running = self.running_task_ids();
                        self.drive(open_session(client, register, running)).await
                    }
                },
            };
            let reason = match opened {
                None => break "shutdown finished while connecting",
                Some(Err(e)) if e.is_final() => {
                    self.abandon();
                    return Err(e);
                }
                Some(Err(e)) => SessionEnd::OpenFailed(e),
                Some(Ok(conn)) => {
                    let since = Instant::now();
                    let reason = self.serve(conn).await;
                    if since.elapsed() >= STABLE_SESSION {
                        backoff.reset();
                        attempt = 0;
                    }
                    reason
                }
            };
            if self.phase == Phase::Done {
                break "shutdown finished";
            }
            if matches!(reason, SessionEnd::Moved) {
                continue;
            }
            let delay = backoff.next_delay();
            attempt += 1;
            let server = self.server_name();
            warn!(%reason, %server, ?delay, attempt, "no session; reconnecting");
            if self.drive(sleep(delay)).await.is_none() {
                break "shutdown finished while disconnected";
            }
        };
        info!(reason = why, "session loop ended");
        for (id, rec) in &self.tasks {
            if rec.end.is_some() {
                warn!(task_id = %id, "end report not acknowledged before exit");
            }
        }
        self.deregister().await;
        Ok(())
    }

    /// Picks the server to try next: after the last one, which failed or
    /// drained (the same again only when it is the only one). `None` when
    /// shutdown finished meanwhile; `Some(None)` when no server's client
    /// could be made.
    pub(super) async fn choose_server(&mut self) -> Option<Option<Client>> {
        let targets = self.drive(targets(self.servers.urls())).await?;
        let last = self.server.as_ref().map(|(t, _)| t.clone());
        let picked = self.servers.pick(&targets, last.as_ref());
        let client = picked.as_ref().map(|(_, c)| c.clone());
        if picked.is_some() {
            self.server = picked;
        }
        Some(client)
    }

    fn server_name(&self) -> String {
        self.server
            .as_ref()
            .map_or_else(String::new, |(t, _)| t.to_string())
    }

    /// The server asked the daemon to move: opens a session on another
    /// server while this one still serves. `None` when there is no other.
    async fn move_away(&mut self) -> Option<(Target, Client)> {
        let targets = targets(self.servers.urls()).await;
        let here = self.server.as_ref().map(|(t, _)| t.clone());
        let picked = self.servers.pick(&targets, here.as_ref())?;
        (Some(&picked.0) != here.as_ref()).then_some(picked)
    }

    fn register_request(&self) -> RegisterRequest {
        RegisterRequest {
            machine_id: self.cfg.machine_id.clone(),
            hostname: self.cfg.hostname.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            runtimes: self
                .cfg
                .runtimes
                .iter()
                .map(|r| Runtime {
                    name: r.name.clone(),
                    version: r.version.clone(),
                })
                .collect(),
            max_concurrent_tasks: i32::try_from(self.cfg.max_tasks).unwrap_or(i32::MAX),
            legacy_ids: Vec::new(),
            work_dir: self.cfg.work_dir.display().to_string(),
            suggested_targets: self.cfg.clone_targets.clone(),
        }
    }

    fn running_task_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, r)| r.is_live())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Runs `fut` while still serving runners, shutdown and phase deadlines
    /// (used while disconnected). `None` when shutdown finished first.
    async fn drive<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            self.update_phase();
            if self.phase == Phase::Done {
                return None;
            }
            let deadline = self.phase_deadline();
            tokio::select! {
                out = &mut fut => return Some(out),
                Some(ev) = self.events_rx.recv() => self.on_runner_event(ev),
                stop = self.stops.next(), if self.stops_open => self.on_stop(stop.is_some()),
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.on_phase_deadline();
                }
            }
        }
    }

    /// Serves one session until it breaks or shutdown is done; answers why.
    async fn serve(&mut self, conn: Conn) -> SessionEnd {
        let Conn {
            daemon_id,
            heartbeat: register_heartbeat,
            tx,
            mut inbound,
        } = conn;
        self.daemon_id = Some(daemon_id.clone());
        // Whatever the last stream carried may be lost: resend all output
        // above each task's acked seq, then its end report.
        for rec in self.tasks.values_mut() {
            rec.buffer.rewind();
            rec.end_sent = false;
        }
        self.control_out
            .retain(|r| !matches!(r.message, Some(Up::Heartbeat(_))));
        self.flush_at = self
            .tasks
            .values()
            .any(|r| r.buffer.has_unsent())
            .then(Instant::now);

        let ready_deadline = Instant::now() + READY_TIMEOUT;
        let mut ready = false;
        let mut heartbeat: Option<Interval> = None;
        // A session opening on another server while this one drains.
        let mut moving: Option<(Target, Client, Opening)> = None;
        loop {
            self.update_phase();
            if self.phase == Phase::Done {
                self.close(tx, inbound).await;
                return SessionEnd::ShutdownFinished;
            }
            let now = Instant::now();
            let can_send = ready && self.next_source(now).is_some();
            let flush_wait = self.flush_at.filter(|t| *t > now);
            let deadline = self.phase_deadline();
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(resp)) => match resp.message {
                        Some(Down::Ready(r)) if !ready => {
                            ready = true;
                            let every = to_duration(r.heartbeat_interval)
                                .or(register_heartbeat)
                                .unwrap_or(DEFAULT_HEARTBEAT)
                                .clamp(Duration::from_secs(1), Duration::from_secs(300));
                            let mut i = tokio::time::interval_at(Instant::now() + every, every);
                            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
                            heartbeat = Some(i);
                            let server = self.server_name();
                            info!(%daemon_id, %server, heartbeat = ?every, tasks = self.tasks.len(), "session ready");
                        }
                        Some(Down::Drain(d)) => {
                            if moving.is_some() {
                                continue;
                            }
                            let server = self.server_name();
                            info!(%server, reason = %d.reason, "the server is shutting down; moving to another");
                            let Some((target, client)) = self.move_away().await else {
                                return SessionEnd::Drained;
                            };
                            let register = self.register_request();
                            let running = self.running_task_ids();
                            let opening = Box::pin(open_session(client.clone(), register, running));
                            moving = Some((target, client, opening));
                        }
                        other => self.on_response(other),
                    },
                    Ok(None) => return SessionEnd::ServerClosed,
                    Err(s) => return SessionEnd::StreamFailed(s),
                },
                opened = opening(&mut moving), if moving.is_some() => {
                    let Some((target, client, _)) = moving.take() else { continue };
                    match opened {
                        Ok(conn) => {
                            info!(server = %target, "moved: a session is open on another server");
                            self.moved = Some((target, client, conn));
                            return SessionEnd::Moved;
                        }
                        Err(e) => {
                            warn!(server = %target, error = %e, "could not move to this server");
                            return SessionEnd::Drained;
                        }
                    }
                }
                Some(ev) = self.events_rx.recv() => self.on_runner_event(ev),
                permit = tx.reserve(), if can_send => match permit {
                    Ok(permit) => {
                        if let Some(req) = self.next_outgoing(Instant::now()) {
                            permit.send(req);
                        }
                    }
                    Err(_) => return SessionEnd::RequestStreamClosed,
                },
                _ = tick(&mut heartbeat) => {
                    let hb = HeartbeatRequest {
                        daemon_id: daemon_id.clone(),
                        running_task_ids: self.running_task_ids(),
                    };
                    self.control_out.push_back(up(Up::Heartbeat(hb)));
                }
                _ = sleep_until(flush_wait.unwrap_or(now)), if flush_wait.is_some() => {}
                _ = sleep_until(ready_deadline), if !ready => {
                    return SessionEnd::NotReady;
                }
                stop = self.stops.next(), if self.stops_open => self.on_stop(stop.is_some()),
                _ = sleep_until(deadline.unwrap_or(now)), if deadline.is_some() => {
                    self.on_phase_deadline();
                }
            }
        }
    }
}
