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

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use taskmesh_proto::Bearer;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior, sleep, sleep_until, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::Config;
use super::output::{BATCH_MAX_BYTES, BATCH_MAX_MESSAGES, OutputBuffer};
use super::runner::{self, Control, Outcome, RunnerEvent, TaskEnd, TaskSpec};
use crate::pb::daemon_service_client::DaemonServiceClient;
use crate::pb::session_request::Message as Up;
use crate::pb::session_response::Message as Down;
use crate::pb::{
    Command, CommandResult, CommandResultStatus, CompleteTaskRequest, DeregisterRequest,
    FailTaskRequest, HeartbeatRequest, OutputAck, RegisterRequest, ReportTaskMessagesRequest,
    ReportTaskStartedRequest, Runtime, SessionError, SessionOpen, SessionRequest, SessionResponse,
    SpawnTask, command,
};

pub(crate) type Client = DaemonServiceClient<InterceptedService<Channel, Bearer>>;

/// Output is held this long so lines arriving together share a write.
const FLUSH_DELAY: Duration = Duration::from_millis(20);
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(5);
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, how long end reports may take to be acknowledged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// On shutdown, how long the server may take to close the stream after us.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// Command ids remembered for redelivery.
const SEEN_COMMANDS: usize = 10_000;
/// Requests queued for the stream; small, so "queued" is close to "sent".
const OUTBOUND_CAPACITY: usize = 16;
pub(crate) const EVENTS_CAPACITY: usize = 256;
const CONTROL_CAPACITY: usize = 16;
const MAX_INTERRUPT_GRACE: Duration = Duration::from_secs(3600);

const CODE_NOT_FOUND: i32 = 5;
const CODE_FAILED_PRECONDITION: i32 = 9;

/// Jittered exponential backoff ("full jitter": uniform in 0..=current).
pub(crate) struct Backoff {
    current: Duration,
    start: Duration,
    cap: Duration,
}

impl Backoff {
    pub(crate) fn new(start: Duration, cap: Duration) -> Self {
        Self {
            current: start,
            start,
            cap,
        }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let max_ms = u64::try_from(self.current.as_millis()).unwrap_or(u64::MAX);
        let delay = Duration::from_millis(rand::thread_rng().gen_range(0..=max_ms));
        self.current = (self.current * 2).min(self.cap);
        delay
    }

    pub(crate) fn reset(&mut self) {
        self.current = self.start;
    }
}

/// Results of recent commands by id, so a redelivered command is answered
/// again without running twice. `None` while the result is not known yet.
struct SeenCommands {
    results: HashMap<String, Option<CommandResult>>,
    order: VecDeque<String>,
    cap: usize,
}

impl SeenCommands {
    fn new(cap: usize) -> Self {
        Self {
            results: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn get(&self, id: &str) -> Option<&Option<CommandResult>> {
        self.results.get(id)
    }

    fn insert(&mut self, id: &str) {
        if self.results.insert(id.to_owned(), None).is_none() {
            self.order.push_back(id.to_owned());
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.results.remove(&old);
                }
            }
        }
    }

    fn record(&mut self, result: &CommandResult) {
        if let Some(slot) = self.results.get_mut(&result.command_id) {
            *slot = Some(result.clone());
        }
    }
}

/// What the daemon knows of one task attempt until the server acknowledges
/// its end.
struct TaskRecord {
    run_id: u64,
    spawn_command_id: String,
    attempt: i32,
    /// `None` once the runner has ended: the agent is gone.
    control: Option<mpsc::Sender<Control>>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Shutdown began: no new tasks; running ones may finish until
    /// `interrupt_at`, then they are interrupted.
    Draining {
        interrupt_at: Instant,
        interrupted: bool,
    },
    /// No agent runs any more; end reports may be acknowledged until `until`.
    Flushing {
        until: Instant,
    },
    Done,
}

/// What to send next on the stream.
enum Source {
    Control,
    Output(String),
    End(String),
}

/// An open session before `SessionReady`.
struct Conn {
    daemon_id: String,
    heartbeat: Option<Duration>,
    tx: mpsc::Sender<SessionRequest>,
    inbound: Streaming<SessionResponse>,
}

/// How an answer to a command comes.
enum Reply {
    Now(CommandResultStatus, String),
    /// A runner answers later (spawn, input).
    Later,
}

pub(crate) struct Session {
    cfg: Arc<Config>,
    client: Client,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
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

fn to_duration(d: Option<prost_types::Duration>) -> Option<Duration> {
    let d = d?;
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    let d = Duration::new(secs, nanos.min(999_999_999));
    (!d.is_zero()).then_some(d)
}

/// A task id names a directory: keep it to one plain path component.
fn valid_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn end_request(task_id: &str, end: TaskEnd) -> Up {
    match end.outcome {
        Outcome::Completed { summary } => Up::Completed(CompleteTaskRequest {
            task_id: task_id.to_owned(),
            summary,
            resume: end.resume,
            ..Default::default()
        }),
        Outcome::Failed { reason, exit_code } => Up::Failed(FailTaskRequest {
            task_id: task_id.to_owned(),
            reason,
            exit_code,
            resume: end.resume,
            ..Default::default()
        }),
    }
}

/// Registers and opens the stream with `open` as its first message.
async fn open_session(
    mut client: Client,
    register: RegisterRequest,
    running_task_ids: Vec<String>,
) -> Result<Conn, String> {
    let resp = timeout(RPC_TIMEOUT, client.register(register))
        .await
        .map_err(|_| "Register timed out".to_owned())?
        .map_err(|s| format!("Register failed: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let daemon_id = resp
        .daemon
        .map(|d| d.id)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| "Register answered without a daemon id".to_owned())?;
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let open = up(Up::Open(SessionOpen {
        daemon_id: daemon_id.clone(),
        running_task_ids,
    }));
    tx.try_send(open)
        .map_err(|_| "queueing SessionOpen failed".to_owned())?;
    let inbound = timeout(RPC_TIMEOUT, client.session(ReceiverStream::new(rx)))
        .await
        .map_err(|_| "opening the session timed out".to_owned())?
        .map_err(|s| {
            format!(
                "opening the session failed: {:?}: {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    Ok(Conn {
        daemon_id,
        heartbeat: to_duration(resp.heartbeat_interval),
        tx,
        inbound,
    })
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
    pub(crate) fn new(
        cfg: Arc<Config>,
        client: Client,
        shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::channel(EVENTS_CAPACITY);
        Self {
            cfg,
            client,
            shutdown,
            shutdown_seen: false,
            phase: Phase::Running,
            daemon_id: None,
            tasks: HashMap::new(),
            seen: SeenCommands::new(SEEN_COMMANDS),
            control_out: VecDeque::new(),
            flush_at: None,
            events_tx,
            events_rx,
            next_run_id: 1,
        }
    }

    /// Connects, serves sessions and reconnects until shutdown is done,
    /// then deregisters.
    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_CAP);
        let mut attempt: u32 = 0;
        let why = loop {
            let register = self.register_request();
            let running = self.running_task_ids();
            let opening = open_session(self.client.clone(), register, running);
            let reason = match self.drive(opening).await {
                None => break "shutdown finished while connecting",
                Some(Err(reason)) => reason,
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
            let delay = backoff.next_delay();
            attempt += 1;
            warn!(%reason, ?delay, attempt, "no session; reconnecting");
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
                _ = &mut self.shutdown, if !self.shutdown_seen => self.begin_shutdown(),
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.on_phase_deadline();
                }
            }
        }
    }

    /// Serves one session until it breaks or shutdown is done; returns why.
    async fn serve(&mut self, conn: Conn) -> String {
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
        loop {
            self.update_phase();
            if self.phase == Phase::Done {
                self.close(tx, inbound).await;
                return "shutdown finished".into();
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
                            info!(%daemon_id, heartbeat = ?every, tasks = self.tasks.len(), "session ready");
                        }
                        other => self.on_response(other),
                    },
                    Ok(None) => return "the server closed the session".into(),
                    Err(s) => return format!("session stream failed: {:?}: {}", s.code(), s.message()),
                },
                Some(ev) = self.events_rx.recv() => self.on_runner_event(ev),
                permit = tx.reserve(), if can_send => match permit {
                    Ok(permit) => {
                        if let Some(req) = self.next_outgoing(Instant::now()) {
                            permit.send(req);
                        }
                    }
                    Err(_) => return "the request stream closed".into(),
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
                    return "no SessionReady from the server in time".into();
                }
                _ = &mut self.shutdown, if !self.shutdown_seen => self.begin_shutdown(),
                _ = sleep_until(deadline.unwrap_or(now)), if deadline.is_some() => {
                    self.on_phase_deadline();
                }
            }
        }
    }

    /// Ends the request stream and lets the server finish its side, so what
    /// was queued last is not cut off.
    async fn close(
        &mut self,
        tx: mpsc::Sender<SessionRequest>,
        mut inbound: Streaming<SessionResponse>,
    ) {
        drop(tx);
        let drain = async {
            while let Ok(Some(resp)) = inbound.message().await {
                if let Some(Down::Command(cmd)) = resp.message {
                    debug!(command_id = %cmd.id, "command after shutdown left for redelivery");
                }
            }
        };
        let _ = timeout(CLOSE_TIMEOUT, drain).await;
    }

    async fn deregister(&mut self) {
        let Some(daemon_id) = self.daemon_id.clone() else {
            return;
        };
        let call = self.client.deregister(DeregisterRequest {
            daemon_id: daemon_id.clone(),
        });
        match timeout(DEREGISTER_TIMEOUT, call).await {
            Ok(Ok(_)) => info!(%daemon_id, "deregistered"),
            Ok(Err(s)) => {
                warn!(%daemon_id, code = ?s.code(), message = s.message(), "Deregister failed")
            }
            Err(_) => warn!(%daemon_id, "Deregister timed out"),
        }
    }

    // --- shutdown phases ---

    fn begin_shutdown(&mut self) {
        self.shutdown_seen = true;
        if self.phase == Phase::Running {
            let live = self.running_task_ids().len();
            info!(
                running_tasks = live,
                wait = ?self.cfg.shutdown_grace,
                "shutting down: no new tasks; running ones may finish"
            );
            self.phase = Phase::Draining {
                interrupt_at: Instant::now() + self.cfg.shutdown_grace,
                interrupted: false,
            };
        }
    }

    fn phase_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Draining {
                interrupt_at,
                interrupted: false,
            } => Some(interrupt_at),
            Phase::Flushing { until } => Some(until),
            _ => None,
        }
    }

    fn on_phase_deadline(&mut self) {
        match self.phase {
            Phase::Draining {
                interrupt_at,
                interrupted: false,
            } => {
                info!("shutdown wait is over; interrupting running tasks");
                for (id, rec) in &self.tasks {
                    if let Some(control) = &rec.control {
                        debug!(task_id = %id, "interrupting");
                        send_control(
                            control,
                            Control::Interrupt {
                                grace: Duration::ZERO,
                            },
                        );
                    }
                }
                self.phase = Phase::Draining {
                    interrupt_at,
                    interrupted: true,
                };
            }
            Phase::Flushing { .. } => {
                warn!("end reports not all acknowledged in time; stopping anyway");
                self.phase = Phase::Done;
            }
            _ => {}
        }
    }

    fn update_phase(&mut self) {
        if matches!(self.phase, Phase::Draining { .. })
            && !self.tasks.values().any(TaskRecord::is_live)
        {
            debug!("no agent runs any more; flushing end reports");
            self.phase = Phase::Flushing {
                until: Instant::now() + FLUSH_TIMEOUT,
            };
        }
        if matches!(self.phase, Phase::Flushing { .. })
            && self.tasks.is_empty()
            && self.control_out.is_empty()
        {
            self.phase = Phase::Done;
        }
    }

    // --- upstream ---

    /// What goes out next: control messages first (a started report must
    /// precede the task's output), then output in seq order, then a task's
    /// end once all its output is out.
    fn next_source(&self, now: Instant) -> Option<Source> {
        if !self.control_out.is_empty() {
            return Some(Source::Control);
        }
        let due = self.flush_at.is_some_and(|t| t <= now) || self.phase != Phase::Running;
        let mut output: Option<(&String, Instant)> = None;
        let mut end = None;
        for (id, rec) in &self.tasks {
            if rec.buffer.has_unsent() {
                let ready = due || rec.end.is_some() || rec.buffer.batch_full();
                if ready && output.is_none_or(|(_, t)| rec.last_sent < t) {
                    output = Some((id, rec.last_sent));
                }
            } else if rec.end.is_some() && !rec.end_sent && end.is_none() {
                end = Some(id);
            }
        }
        match (output, end) {
            (Some((id, _)), _) => Some(Source::Output(id.clone())),
            (None, Some(id)) => Some(Source::End(id.clone())),
            (None, None) => None,
        }
    }

    fn next_outgoing(&mut self, now: Instant) -> Option<SessionRequest> {
        let req = match self.next_source(now)? {
            Source::Control => self.control_out.pop_front(),
            Source::Output(id) => {
                let rec = self.tasks.get_mut(&id)?;
                rec.last_sent = now;
                let messages = rec.buffer.next_batch(BATCH_MAX_MESSAGES, BATCH_MAX_BYTES);
                Some(up(Up::Messages(ReportTaskMessagesRequest {
                    task_id: id,
                    messages,
                    ..Default::default()
                })))
            }
            Source::End(id) => {
                let rec = self.tasks.get_mut(&id)?;
                rec.end_sent = true;
                rec.end.clone().map(up)
            }
        };
        if !self.tasks.values().any(|r| r.buffer.has_unsent()) {
            self.flush_at = None;
        }
        req
    }

    fn finish_command(&mut self, command_id: &str, status: CommandResultStatus, message: String) {
        if status != CommandResultStatus::Ok {
            info!(%command_id, ?status, %message, "command not done");
        }
        let result = CommandResult {
            command_id: command_id.to_owned(),
            status: status as i32,
            message,
            result_json: String::new(),
        };
        self.seen.record(&result);
        self.control_out.push_back(up(Up::CommandResult(result)));
    }

    // --- downstream ---

    fn on_response(&mut self, message: Option<Down>) {
        match message {
            Some(Down::Command(cmd)) => self.on_command(cmd),
            Some(Down::OutputAck(ack)) => self.on_ack(ack),
            Some(Down::Error(err)) => self.on_session_error(err),
            Some(Down::Ready(_)) => debug!("repeated SessionReady ignored"),
            Some(Down::StartedAck(ack)) => debug!(task_id = %ack.task_id, "started acknowledged"),
            None => debug!("empty SessionResponse ignored"),
        }
    }

    fn on_command(&mut self, cmd: Command) {
        if cmd.id.is_empty() {
            warn!(task_id = %cmd.task_id, "command without an id ignored: it cannot be acknowledged");
            return;
        }
        if let Some(seen) = self.seen.get(&cmd.id) {
            debug!(command_id = %cmd.id, "command delivered again; replaying its result");
            let Some(result) = seen.clone() else {
                return; // still running; its result follows
            };
            // A lost CommandResult means the started report before it may
            // be lost too.
            if let Some(command::Kind::SpawnTask(_)) = &cmd.kind
                && let Some(rec) = self
                    .tasks
                    .values()
                    .find(|r| r.spawn_command_id == cmd.id && r.is_live())
                && let Some(started) = &rec.started
            {
                self.control_out.push_back(up(Up::Started(started.clone())));
            }
            self.control_out.push_back(up(Up::CommandResult(result)));
            return;
        }
        self.seen.insert(&cmd.id);
        let reply = match cmd.kind {
            Some(command::Kind::SpawnTask(spawn)) => self.spawn(&cmd.id, &cmd.task_id, spawn),
            Some(command::Kind::InterruptTask(i)) => {
                let grace = Duration::from_secs(u64::try_from(i.grace_seconds).unwrap_or(0))
                    .min(MAX_INTERRUPT_GRACE);
                match self
                    .tasks
                    .get(&cmd.task_id)
                    .and_then(|r| r.control.as_ref())
                {
                    Some(control) if send_control(control, Control::Interrupt { grace }) => {
                        Reply::Now(CommandResultStatus::Ok, "interrupting".into())
                    }
                    _ => Reply::Now(
                        CommandResultStatus::Failed,
                        format!("task {} is not running", cmd.task_id),
                    ),
                }
            }
            Some(command::Kind::SendInput(input)) => {
                match self
                    .tasks
                    .get(&cmd.task_id)
                    .and_then(|r| r.control.as_ref())
                {
                    Some(control) => {
                        let ctrl = Control::Input {
                            command_id: cmd.id.clone(),
                            text: input.text,
                        };
                        match control.try_send(ctrl) {
                            Ok(()) => Reply::Later,
                            Err(mpsc::error::TrySendError::Full(_)) => Reply::Now(
                                CommandResultStatus::Failed,
                                "the task is busy; try again".into(),
                            ),
                            Err(mpsc::error::TrySendError::Closed(_)) => Reply::Now(
                                CommandResultStatus::Failed,
                                format!("task {} is not running", cmd.task_id),
                            ),
                        }
                    }
                    None => Reply::Now(
                        CommandResultStatus::Failed,
                        format!("task {} is not running", cmd.task_id),
                    ),
                }
            }
            Some(
                command::Kind::CloneWorktree(_)
                | command::Kind::CheckTargetExists(_)
                | command::Kind::RetryCompletionAction(_)
                | command::Kind::ApprovalDecision(_),
            ) => Reply::Now(
                CommandResultStatus::Unsupported,
                "the reference daemon does not implement this command".into(),
            ),
            None => Reply::Now(
                CommandResultStatus::Unsupported,
                "unknown command kind (newer server?)".into(),
            ),
        };
        if let Reply::Now(status, message) = reply {
            self.finish_command(&cmd.id, status, message);
        }
    }

    fn spawn(&mut self, command_id: &str, cmd_task_id: &str, spawn: SpawnTask) -> Reply {
        let failed = |m: String| Reply::Now(CommandResultStatus::Failed, m);
        let Some(task) = spawn.task else {
            return failed("spawn_task carries no task".into());
        };
        let task_id = if task.id.is_empty() {
            cmd_task_id.to_owned()
        } else {
            task.id.clone()
        };
        // Rejected, not failed: the task is fine, it just has to run elsewhere.
        let rejected = |m: String| Reply::Now(CommandResultStatus::Rejected, m);
        if self.phase != Phase::Running {
            return rejected("daemon is shutting down".into());
        }
        if !valid_task_id(&task_id) {
            return failed(format!("invalid task id {task_id:?}"));
        }
        if self.tasks.get(&task_id).is_some_and(TaskRecord::is_live) {
            return failed(format!("task {task_id} is already running on this daemon"));
        }
        let live = self.tasks.values().filter(|r| r.is_live()).count();
        if live >= self.cfg.max_tasks {
            return rejected(format!(
                "daemon is at its limit of {} concurrent tasks",
                self.cfg.max_tasks
            ));
        }
        let runtime_name = if task.runtime.is_empty() {
            "shell"
        } else {
            task.runtime.as_str()
        };
        let Some(runtime) = self.cfg.runtimes.iter().find(|r| r.name == runtime_name) else {
            let known: Vec<&str> = self.cfg.runtimes.iter().map(|r| r.name.as_str()).collect();
            return failed(format!(
                "unknown runtime {runtime_name:?}; this daemon runs: {}",
                known.join(", ")
            ));
        };
        // The server numbers messages from 1.
        let first_seq = spawn.first_seq.max(1);
        let run_id = self.next_run_id;
        self.next_run_id += 1;
        let spec = TaskSpec {
            run_id,
            task_id: task_id.clone(),
            // A continued attempt runs its follow-up prompt.
            plan: if spawn.prompt.is_empty() {
                task.plan
            } else {
                spawn.prompt
            },
            command_template: runtime.template.clone(),
            repository: task.repository,
            branch: task.branch,
            dir: self.cfg.work_dir.join(&task_id),
            first_seq,
            default_grace: self.cfg.interrupt_grace,
            attempt: task.attempt,
            resume_session_id: spawn
                .resume
                .map(|r| r.agent_session_id)
                .filter(|s| !s.is_empty()),
            context: spawn.context,
        };
        let (control_tx, control_rx) = mpsc::channel(CONTROL_CAPACITY);
        let (pressure_tx, pressure_rx) = watch::channel(false);
        info!(task_id = %task_id, runtime = runtime_name, attempt = task.attempt, first_seq, "spawning task");
        tokio::spawn(runner::run_task(
            spec,
            self.events_tx.clone(),
            control_rx,
            pressure_rx,
        ));
        let record = TaskRecord {
            run_id,
            spawn_command_id: command_id.to_owned(),
            control: Some(control_tx),
            attempt: task.attempt,
            started: None,
            buffer: OutputBuffer::new(first_seq),
            pressure: pressure_tx,
            end: None,
            end_sent: false,
            last_sent: Instant::now(),
        };
        if let Some(old) = self.tasks.insert(task_id.clone(), record) {
            // The server started a new attempt, so it is done with the old.
            debug!(task_id = %task_id, unacked = old.buffer.len(), "replacing an ended attempt");
        }
        Reply::Later
    }

    fn on_ack(&mut self, ack: OutputAck) {
        let Some(rec) = self.tasks.get_mut(&ack.task_id) else {
            debug!(task_id = %ack.task_id, "ack for an unknown task ignored");
            return;
        };
        rec.buffer.ack(ack.acked_seq);
        rec.update_pressure();
        if ack.task_ended {
            if rec.is_live() {
                warn!(task_id = %ack.task_id, "server says the task ended but its agent still runs; keeping it");
            } else {
                debug!(task_id = %ack.task_id, acked_seq = rec.buffer.acked_seq(), "end acknowledged; forgetting the task");
                self.tasks.remove(&ack.task_id);
            }
        }
    }

    fn on_session_error(&mut self, err: SessionError) {
        warn!(task_id = %err.task_id, code = err.code, message = %err.message, "server rejected a message");
        if err.task_id.is_empty() || !matches!(err.code, CODE_NOT_FOUND | CODE_FAILED_PRECONDITION)
        {
            return;
        }
        if let Some(rec) = self.tasks.remove(&err.task_id) {
            info!(task_id = %err.task_id, unacked = rec.buffer.len(), unacked_bytes = rec.buffer.bytes(), "server no longer accepts the task; forgetting it");
            if let Some(control) = &rec.control {
                send_control(control, Control::Kill);
            }
        }
    }

    // --- runners ---

    fn on_runner_event(&mut self, ev: RunnerEvent) {
        match ev {
            RunnerEvent::Started {
                run_id,
                task_id,
                pid,
            } => {
                let Some(rec) = self.record(&task_id, run_id) else {
                    return;
                };
                let started = ReportTaskStartedRequest {
                    task_id,
                    attempt: rec.attempt,
                    pid: i64::from(pid),
                    ..Default::default()
                };
                rec.started = Some(started.clone());
                let command_id = rec.spawn_command_id.clone();
                self.control_out.push_back(up(Up::Started(started)));
                self.finish_command(
                    &command_id,
                    CommandResultStatus::Ok,
                    format!("started, pid {pid}"),
                );
            }
            RunnerEvent::Output {
                run_id,
                task_id,
                messages,
            } => {
                let Some(rec) = self.record(&task_id, run_id) else {
                    return;
                };
                for m in messages {
                    rec.buffer.push(m);
                }
                rec.update_pressure();
                if self.flush_at.is_none() {
                    self.flush_at = Some(Instant::now() + FLUSH_DELAY);
                }
            }
            RunnerEvent::CommandDone { command_id, result } => match result {
                Ok(()) => self.finish_command(&command_id, CommandResultStatus::Ok, String::new()),
                Err(e) => self.finish_command(&command_id, CommandResultStatus::Failed, e),
            },
            RunnerEvent::Ended {
                run_id,
                task_id,
                end,
                before_start,
            } => {
                let Some(rec) = self.record(&task_id, run_id) else {
                    return;
                };
                rec.control = None;
                let reason = match &end.outcome {
                    Outcome::Failed { reason, .. } => reason.clone(),
                    Outcome::Completed { .. } => String::new(),
                };
                rec.end = Some(end_request(&task_id, end));
                if before_start {
                    let command_id = rec.spawn_command_id.clone();
                    self.finish_command(&command_id, CommandResultStatus::Failed, reason);
                }
            }
        }
    }

    /// The record of this run of a task; events of forgotten or replaced
    /// runs are dropped.
    fn record(&mut self, task_id: &str, run_id: u64) -> Option<&mut TaskRecord> {
        let rec = self.tasks.get_mut(task_id).filter(|r| r.run_id == run_id);
        if rec.is_none() {
            debug!(%task_id, run_id, "event of a forgotten task dropped");
        }
        rec
    }
}

/// Hands `ctrl` to a runner; false when the runner is gone.
fn send_control(control: &mpsc::Sender<Control>, ctrl: Control) -> bool {
    match control.try_send(ctrl) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(ctrl)) => {
            // Interrupts must not be lost to a momentarily full queue.
            let control = control.clone();
            tokio::spawn(async move {
                let _ = control.send(ctrl).await;
            });
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use futures_util::StreamExt;
    use tokio::sync::oneshot;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::{Endpoint, Server};
    use tonic::{Request, Status};

    use super::*;
    use crate::RuntimeDef;
    use crate::pb::daemon_service_server::{DaemonService, DaemonServiceServer};
    use crate::pb::{self, InterruptTask, SendInput, Task};

    fn test_config(max_tasks: usize) -> (Arc<Config>, PathBuf) {
        let dir = std::env::temp_dir().join(format!("taskmesh-session-{}", uuid::Uuid::new_v4()));
        let cfg = Config {
            machine_id: uuid::Uuid::new_v4().to_string(),
            hostname: "test-host".into(),
            work_dir: dir.clone(),
            runtimes: vec![RuntimeDef {
                name: "shell".into(),
                template: None,
                version: "builtin".into(),
            }],
            max_tasks,
            interrupt_grace: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(5),
        };
        (Arc::new(cfg), dir)
    }

    fn client_for(addr: SocketAddr) -> Client {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_lazy();
        DaemonServiceClient::with_interceptor(channel, Bearer::new("tmd_test").expect("token"))
    }

    fn offline_session(max_tasks: usize) -> (Session, PathBuf) {
        let (cfg, dir) = test_config(max_tasks);
        let client = client_for(SocketAddr::from(([127, 0, 0, 1], 9)));
        (
            Session::new(cfg, client, Box::pin(std::future::pending())),
            dir,
        )
    }

    fn spawn_cmd(id: &str, task_id: &str, plan: &str, first_seq: i64) -> Command {
        Command {
            id: id.into(),
            task_id: task_id.into(),
            kind: Some(command::Kind::SpawnTask(SpawnTask {
                task: Some(Task {
                    id: task_id.into(),
                    plan: plan.into(),
                    runtime: "shell".into(),
                    attempt: 1,
                    ..Default::default()
                }),
                first_seq,
                ..Default::default()
            })),
        }
    }

    fn results(s: &mut Session) -> Vec<(String, CommandResultStatus, String)> {
        s.control_out
            .drain(..)
            .filter_map(|r| match r.message {
                Some(Up::CommandResult(c)) => Some((
                    c.command_id,
                    CommandResultStatus::try_from(c.status).unwrap_or_default(),
                    c.message,
                )),
                _ => None,
            })
            .collect()
    }

    async fn pump_until(s: &mut Session, stop: impl Fn(&RunnerEvent) -> bool) {
        loop {
            let ev = timeout(Duration::from_secs(30), s.events_rx.recv())
                .await
                .expect("runner event in time")
                .expect("channel open");
            let done = stop(&ev);
            s.on_runner_event(ev);
            if done {
                return;
            }
        }
    }

    #[tokio::test]
    async fn unsupported_commands_and_redelivery() {
        let (mut s, _dir) = offline_session(4);
        let cmd = Command {
            id: "c1".into(),
            task_id: "t".into(),
            kind: Some(command::Kind::CloneWorktree(pb::CloneWorktree::default())),
        };
        s.on_command(cmd.clone());
        s.on_command(cmd);
        let r = results(&mut s);
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|(id, st, msg)| id == "c1"
            && *st == CommandResultStatus::Unsupported
            && msg.contains("reference daemon")));

        s.on_command(Command {
            id: "c2".into(),
            task_id: "nope".into(),
            kind: Some(command::Kind::InterruptTask(InterruptTask {
                grace_seconds: 1,
            })),
        });
        s.on_command(Command {
            id: "c3".into(),
            task_id: "nope".into(),
            kind: Some(command::Kind::SendInput(SendInput { text: "x".into() })),
        });
        s.on_command(Command {
            id: String::new(),
            task_id: "nope".into(),
            kind: None,
        });
        let r = results(&mut s);
        assert_eq!(r.len(), 2, "a command without id is not answered");
        assert!(
            r.iter()
                .all(|(_, st, msg)| *st == CommandResultStatus::Failed
                    && msg.contains("not running"))
        );
    }

    #[tokio::test]
    async fn spawn_is_refused_at_capacity_when_running_and_on_shutdown() {
        let (mut s, dir) = offline_session(1);
        s.on_command(spawn_cmd("c1", "t1", "read x", 1));
        pump_until(&mut s, |e| matches!(e, RunnerEvent::Started { .. })).await;
        let r = results(&mut s);
        assert_eq!(r[0].1, CommandResultStatus::Ok);

        s.on_command(spawn_cmd("c2", "t1", "true", 1));
        s.on_command(spawn_cmd("c3", "t2", "true", 1));
        s.on_command(spawn_cmd("c4", "../evil", "true", 1));
        let r = results(&mut s);
        assert!(r[0].2.contains("already running"), "{r:?}");
        assert!(r[1].2.contains("limit of 1"), "{r:?}");
        assert_eq!(
            r[1].1,
            CommandResultStatus::Rejected,
            "full: run it elsewhere"
        );
        assert!(r[2].2.contains("invalid task id"), "{r:?}");
        assert_eq!(r[2].1, CommandResultStatus::Failed);

        s.begin_shutdown();
        s.on_command(spawn_cmd("c5", "t3", "true", 1));
        let r = results(&mut s);
        assert_eq!(r[0].2, "daemon is shutting down");
        assert_eq!(r[0].1, CommandResultStatus::Rejected);

        // The server no longer knows t1: it is forgotten and its agent killed.
        s.on_session_error(SessionError {
            task_id: "t1".into(),
            code: CODE_NOT_FOUND,
            message: "gone".into(),
        });
        assert!(s.tasks.is_empty());
        pump_until(&mut s, |e| matches!(e, RunnerEvent::Ended { .. })).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    // --- an in-process server speaking the session protocol ---

    #[derive(Debug)]
    enum MockEvent {
        Registered(RegisterRequest, String),
        Connected(
            usize,
            mpsc::UnboundedSender<Result<SessionResponse, Status>>,
        ),
        Up(usize, SessionRequest),
        Deregistered(String),
    }

    struct Mock {
        events: mpsc::UnboundedSender<MockEvent>,
        conns: std::sync::atomic::AtomicUsize,
    }

    #[tonic::async_trait]
    impl DaemonService for Mock {
        async fn register(
            &self,
            req: Request<RegisterRequest>,
        ) -> Result<tonic::Response<pb::RegisterResponse>, Status> {
            let auth = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let _ = self
                .events
                .send(MockEvent::Registered(req.into_inner(), auth));
            Ok(tonic::Response::new(pb::RegisterResponse {
                daemon: Some(pb::Daemon {
                    id: "d1".into(),
                    ..Default::default()
                }),
                heartbeat_interval: None,
            }))
        }

        async fn deregister(
            &self,
            req: Request<DeregisterRequest>,
        ) -> Result<tonic::Response<pb::DeregisterResponse>, Status> {
            let _ = self
                .events
                .send(MockEvent::Deregistered(req.into_inner().daemon_id));
            Ok(tonic::Response::new(pb::DeregisterResponse {}))
        }

        async fn heartbeat(
            &self,
            _: Request<HeartbeatRequest>,
        ) -> Result<tonic::Response<pb::HeartbeatResponse>, Status> {
            Err(Status::unimplemented("mock"))
        }

        async fn claim_task(
            &self,
            _: Request<pb::ClaimTaskRequest>,
        ) -> Result<tonic::Response<pb::ClaimTaskResponse>, Status> {
            Err(Status::unimplemented("mock"))
        }

        async fn report_task_started(
            &self,
            _: Request<ReportTaskStartedRequest>,
        ) -> Result<tonic::Response<pb::ReportTaskStartedResponse>, Status> {
            Err(Status::unimplemented("mock"))
        }

        async fn report_task_progress(
            &self,
            _: Request<pb::ReportTaskProgressRequest>,
        ) -> Result<tonic::Response<pb::ReportTaskProgressResponse>, Status> {
            Err(Status::unimplemented("mock"))
        }

        async fn report_task_messages(
            &self,
            _: Request<ReportTaskMessagesRequest>,
        ) -> Result<tonic::Response<pb::ReportTaskMessagesResponse>, Status> {
            Err(Status::unimplemented("mock"))
        }

        async fn report_task_usage(
            &self,
            _: Request<pb::ReportTaskUsageRequest>,
        ) -> Result<tonic::Response<pb::ReportTaskUsageResponse>, Status> {
            Err(Status::unimplemented("mock"))
        }

        async fn complete_task(
            &self,
            _: Request<CompleteTaskRequest>,
        ) -> Result<tonic::Response<pb::CompleteTaskResponse>, Status> {
            Err(Status::unimplemented("mock"))
        }

        async fn fail_task(
            &self,
            _: Request<FailTaskRequest>,
        ) -> Result<tonic::Response<pb::FailTaskResponse>, Status> {
            Err(Status::unimplemented("mock"))
        }

        async fn get_task_status(
            &self,
            _: Request<pb::GetTaskStatusRequest>,
        ) -> Result<tonic::Response<pb::GetTaskStatusResponse>, Status> {
            Err(Status::unimplemented("mock"))
        }

        type SessionStream =
            futures_util::stream::BoxStream<'static, Result<SessionResponse, Status>>;

        async fn session(
            &self,
            req: Request<Streaming<SessionRequest>>,
        ) -> Result<tonic::Response<Self::SessionStream>, Status> {
            let conn = self.conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let mut inbound = req.into_inner();
            let (down_tx, down_rx) = mpsc::unbounded_channel();
            let _ = self.events.send(MockEvent::Connected(conn, down_tx));
            let events = self.events.clone();
            let (closed_tx, closed_rx) = oneshot::channel::<()>();
            tokio::spawn(async move {
                while let Ok(Some(req)) = inbound.message().await {
                    let _ = events.send(MockEvent::Up(conn, req));
                }
                let _ = closed_tx.send(());
            });
            // The response stream ends when the daemon ends its side.
            let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(down_rx)
                .take_until(closed_rx)
                .boxed();
            Ok(tonic::Response::new(stream))
        }
    }

    async fn start_mock() -> (SocketAddr, mpsc::UnboundedReceiver<MockEvent>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = mpsc::unbounded_channel();
        let mock = Mock {
            events: tx,
            conns: Default::default(),
        };
        tokio::spawn(
            Server::builder()
                .add_service(DaemonServiceServer::new(mock))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (addr, rx)
    }

    async fn next_event(rx: &mut mpsc::UnboundedReceiver<MockEvent>) -> MockEvent {
        timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("mock event in time")
            .expect("mock alive")
    }

    /// The next upstream message of a session (skipping heartbeats).
    async fn next_up(rx: &mut mpsc::UnboundedReceiver<MockEvent>, conn: usize) -> Up {
        loop {
            match next_event(rx).await {
                MockEvent::Up(c, SessionRequest { message: Some(m) }) if c == conn => {
                    if !matches!(m, Up::Heartbeat(_)) {
                        return m;
                    }
                }
                other => panic!("expected a message on session {conn}, got {other:?}"),
            }
        }
    }

    async fn connect(
        rx: &mut mpsc::UnboundedReceiver<MockEvent>,
    ) -> (
        usize,
        mpsc::UnboundedSender<Result<SessionResponse, Status>>,
        SessionOpen,
    ) {
        match next_event(rx).await {
            MockEvent::Registered(reg, auth) => {
                assert_eq!(auth, "Bearer tmd_test");
                assert_eq!(reg.runtimes[0].name, "shell");
                assert_eq!(reg.runtimes[0].version, "builtin");
            }
            other => panic!("expected Register, got {other:?}"),
        }
        let (conn, down) = match next_event(rx).await {
            MockEvent::Connected(conn, down) => (conn, down),
            other => panic!("expected a session, got {other:?}"),
        };
        let open = match next_up(rx, conn).await {
            Up::Open(open) => open,
            other => panic!("expected SessionOpen first, got {other:?}"),
        };
        assert_eq!(open.daemon_id, "d1");
        let ready = SessionResponse {
            message: Some(Down::Ready(pb::SessionReady {
                daemon_id: "d1".into(),
                heartbeat_interval: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            })),
        };
        down.send(Ok(ready)).expect("send ready");
        (conn, down, open)
    }

    fn down(message: Down) -> Result<SessionResponse, Status> {
        Ok(SessionResponse {
            message: Some(message),
        })
    }

    #[tokio::test]
    async fn session_runs_a_task_and_resends_after_a_reconnect() {
        let (addr, mut mock) = start_mock().await;
        let (cfg, dir) = test_config(4);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let session = Session::new(
            cfg,
            client_for(addr),
            Box::pin(async move {
                let _ = stop_rx.await;
            }),
        );
        let daemon = tokio::spawn(session.run());

        // First session: spawn a task; acknowledge nothing.
        let (c1, down1, open) = connect(&mut mock).await;
        assert!(open.running_task_ids.is_empty());
        let plan = "echo one; echo two >&2; echo three";
        down1
            .send(down(Down::Command(spawn_cmd("cmd-1", "t1", plan, 5))))
            .expect("send");
        match next_up(&mut mock, c1).await {
            Up::Started(s) => {
                assert_eq!((s.task_id.as_str(), s.attempt), ("t1", 1));
                assert!(s.pid > 0);
            }
            other => panic!("expected started, got {other:?}"),
        }
        match next_up(&mut mock, c1).await {
            Up::CommandResult(r) => {
                assert_eq!(r.command_id, "cmd-1");
                assert_eq!(r.status, CommandResultStatus::Ok as i32);
            }
            other => panic!("expected the command result, got {other:?}"),
        }
        let mut seqs = Vec::new();
        loop {
            match next_up(&mut mock, c1).await {
                Up::Messages(m) => seqs.extend(m.messages.iter().map(|m| m.seq)),
                Up::Completed(c) => {
                    assert_eq!(c.task_id, "t1");
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seqs, [5, 6, 7], "all output before the end report");

        // Acknowledge part of it, then break the stream.
        down1
            .send(down(Down::OutputAck(OutputAck {
                task_id: "t1".into(),
                acked_seq: 5,
                task_ended: false,
            })))
            .expect("send");
        down1
            .send(Err(Status::unavailable("test: connection lost")))
            .expect("send");

        // Second session: unacknowledged output, then the end, come again.
        let (c2, down2, open) = connect(&mut mock).await;
        assert!(open.running_task_ids.is_empty(), "the task has ended");
        // The spawn command is redelivered: answered, not run again.
        down2
            .send(down(Down::Command(spawn_cmd("cmd-1", "t1", plan, 5))))
            .expect("send");
        let mut seqs = Vec::new();
        let mut completed = false;
        let mut answered = false;
        while !(completed && answered) {
            match next_up(&mut mock, c2).await {
                Up::Messages(m) => {
                    assert!(!completed, "output after the end report");
                    seqs.extend(m.messages.iter().map(|m| m.seq));
                }
                Up::Completed(_) => completed = true,
                Up::CommandResult(r) => {
                    assert_eq!(r.command_id, "cmd-1");
                    assert_eq!(r.status, CommandResultStatus::Ok as i32);
                    answered = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seqs, [6, 7]);
        down2
            .send(down(Down::OutputAck(OutputAck {
                task_id: "t1".into(),
                acked_seq: 7,
                task_ended: true,
            })))
            .expect("send");

        // Graceful stop: nothing runs, so the daemon deregisters and returns.
        stop_tx.send(()).expect("stop");
        loop {
            match next_event(&mut mock).await {
                MockEvent::Deregistered(id) => {
                    assert_eq!(id, "d1");
                    break;
                }
                MockEvent::Up(_, _) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        timeout(Duration::from_secs(30), daemon)
            .await
            .expect("daemon returns")
            .expect("no panic");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn shutdown_interrupts_running_tasks_and_reports_them() {
        let (addr, mut mock) = start_mock().await;
        let (cfg, dir) = test_config(4);
        let cfg = Arc::new(Config {
            shutdown_grace: Duration::from_millis(50),
            interrupt_grace: Duration::from_millis(200),
            machine_id: cfg.machine_id.clone(),
            hostname: cfg.hostname.clone(),
            work_dir: cfg.work_dir.clone(),
            runtimes: cfg.runtimes.clone(),
            max_tasks: cfg.max_tasks,
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let session = Session::new(
            cfg,
            client_for(addr),
            Box::pin(async move {
                let _ = stop_rx.await;
            }),
        );
        let daemon = tokio::spawn(session.run());
        let (c1, down1, _) = connect(&mut mock).await;
        down1
            .send(down(Down::Command(spawn_cmd(
                "cmd-1",
                "t1",
                "echo started; sleep 1000",
                1,
            ))))
            .expect("send");
        // Wait for the agent's first line, so it surely runs.
        loop {
            if let Up::Messages(m) = next_up(&mut mock, c1).await {
                down1
                    .send(down(Down::OutputAck(OutputAck {
                        task_id: "t1".into(),
                        acked_seq: m.messages.last().map_or(0, |m| m.seq),
                        task_ended: false,
                    })))
                    .expect("send");
                break;
            }
        }
        stop_tx.send(()).expect("stop");
        down1
            .send(down(Down::Command(spawn_cmd("cmd-2", "t2", "true", 1))))
            .expect("send");
        let mut refused = false;
        loop {
            match next_up(&mut mock, c1).await {
                Up::CommandResult(r) if r.command_id == "cmd-2" => {
                    assert_eq!(r.status, CommandResultStatus::Rejected as i32);
                    assert_eq!(r.message, "daemon is shutting down");
                    refused = true;
                }
                Up::Failed(f) => {
                    assert_eq!(f.task_id, "t1");
                    assert_eq!(f.reason, "interrupted");
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(refused, "spawn refused before the end report");
        down1
            .send(down(Down::OutputAck(OutputAck {
                task_id: "t1".into(),
                acked_seq: 1,
                task_ended: true,
            })))
            .expect("send");
        loop {
            match next_event(&mut mock).await {
                MockEvent::Deregistered(_) => break,
                MockEvent::Up(_, _) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        timeout(Duration::from_secs(30), daemon)
            .await
            .expect("daemon returns")
            .expect("no panic");
        let _ = std::fs::remove_dir_all(dir);
    }
}
