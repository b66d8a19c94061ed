//! The `DaemonService.Session` stream, server side: [`SessionLoop`] reads
//! a daemon's reports and pumps its outbox down until the session ends, for
//! a reason a [`SessionEnd`] names. The report helpers here serve the unary
//! RPCs too, so both paths make the same domain calls.

use std::fmt;
use std::sync::Arc;

use futures_util::FutureExt;
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use tracing::Instrument;

use super::parse;
use crate::domain::{
    self, Domain, MAX_BATCH, SHUTTING_DOWN, StreamEnd, StreamGuard, TaskEnd, parse_id,
};
use crate::model::Principal;
use crate::pb::session_response::Message as Down;
use crate::pb::{self, session_request::Message as Up};

/// What goes down a session: boxed, see [`SessionLoop::tx`].
pub(super) type Outbound = mpsc::Receiver<Result<Box<pb::SessionResponse>, Status>>;

/// What the daemon's stream gives: a message, an error, or its end.
type Inbound = Option<Result<pb::SessionRequest, Status>>;

/// Most messages and bytes taken from a daemon's stream at once (see
/// [`SessionLoop::arrived`]; the first message always): what one session
/// holds decoded at once, and so the largest merged output batch.
const MAX_ARRIVED: usize = 256;
const MERGE_BYTES: usize = 4 << 20;

/// Messages that arrived together, in lanes ([`SessionLoop::arrived`]).
#[derive(Default)]
struct Arrived {
    lanes: Vec<(Lane, Vec<pb::SessionRequest>)>,
    /// How the stream stopped right after them, if it did.
    end: Option<Stop>,
}

/// Reports that must be handled in the order they came: those of one
/// task, the command results, and the rest.
#[derive(Debug, PartialEq, Eq)]
enum Lane {
    Task(String),
    Commands,
    Other,
}

/// How the daemon's stream stopped giving messages.
enum Stop {
    Error(Status),
    Closed,
}

impl Arrived {
    /// Adds `m` to its lane; output that continues the lane's last output
    /// batch (same attempt, at most [`MAX_BATCH`] messages) joins it.
    fn push(&mut self, m: pb::SessionRequest) {
        let lane = match &m.message {
            Some(Up::Started(r)) => Lane::Task(r.task_id.clone()),
            Some(Up::Progress(r)) => Lane::Task(r.task_id.clone()),
            Some(Up::Messages(r)) => Lane::Task(r.task_id.clone()),
            Some(Up::Usage(r)) => Lane::Task(r.task_id.clone()),
            Some(Up::Changes(r)) => Lane::Task(r.task_id.clone()),
            Some(Up::Completed(r)) => Lane::Task(r.task_id.clone()),
            Some(Up::Failed(r)) => Lane::Task(r.task_id.clone()),
            Some(Up::CommandResult(_)) => Lane::Commands,
            Some(Up::Heartbeat(_) | Up::Open(_)) | None => Lane::Other,
        };
        let at = match self.lanes.iter().position(|(l, _)| *l == lane) {
            Some(at) => at,
            None => {
                self.lanes.push((lane, Vec::new()));
                self.lanes.len() - 1
            }
        };
        let queue = &mut self.lanes[at].1;
        let m = match (queue.last_mut(), m) {
            (
                Some(pb::SessionRequest {
                    message: Some(Up::Messages(batch)),
                }),
                pb::SessionRequest {
                    message: Some(Up::Messages(more)),
                },
            ) if more.attempt == batch.attempt
                && batch.messages.len() + more.messages.len() <= MAX_BATCH =>
            {
                batch.messages.extend(more.messages);
                return;
            }
            (_, m) => m,
        };
        queue.push(m);
    }
}

/// Why a daemon's session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The server is shutting down; the daemon should reconnect.
    ShuttingDown,
    /// A newer session of the same daemon replaced this one, the daemon
    /// deregistered, or it was silent for 3 heartbeat intervals.
    Superseded,
    /// The daemon closed its side of the stream.
    ClosedByDaemon,
    /// The daemon stopped reading (its connection is gone).
    DaemonGone,
    /// The stream broke (a transport error or an undecodable frame).
    StreamFailed(Status),
    /// The outbox could not be read.
    Outbox(domain::Error),
    /// The daemon's access is gone: its token was revoked, or an admin
    /// disconnected it.
    AccessEnded(StreamEnd),
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::ShuttingDown => f.write_str(SHUTTING_DOWN),
            SessionEnd::Superseded => f.write_str(
                "session ended: replaced by a newer one, deregistered, \
                 or silent for 3 heartbeat intervals",
            ),
            SessionEnd::ClosedByDaemon => f.write_str("the daemon closed the stream"),
            SessionEnd::DaemonGone => f.write_str("the daemon went away"),
            SessionEnd::StreamFailed(e) => write!(f, "stream error: {e}"),
            SessionEnd::Outbox(e) => write!(f, "reading the outbox: {e}"),
            SessionEnd::AccessEnded(why) => write!(f, "access ended: {why}"),
        }
    }
}

pub(super) fn completed(r: pb::CompleteTaskRequest) -> TaskEnd {
    end(true, r.summary, r.resume, r.attempt, false)
}

pub(super) fn failed(r: pb::FailTaskRequest) -> TaskEnd {
    let reason = fail_reason(&r);
    end(false, reason, r.resume, r.attempt, r.requeue)
}

fn end(
    success: bool,
    reason: String,
    resume: Option<pb::AgentResume>,
    attempt: i32,
    requeue: bool,
) -> TaskEnd {
    let resume = resume.unwrap_or_default();
    TaskEnd {
        success,
        reason,
        agent_session_id: resume.agent_session_id,
        working_directory: resume.working_directory,
        attempt: i64::from(attempt),
        requeue,
    }
}

fn fail_reason(r: &pb::FailTaskRequest) -> String {
    match (r.reason.is_empty(), r.exit_code) {
        (true, 0) => "failed".into(),
        (true, code) => format!("exit status {code}"),
        (false, _) => r.reason.clone(),
    }
}

pub(super) fn duration(d: std::time::Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

pub(super) async fn started(
    domain: &Domain,
    p: &Principal,
    r: &pb::ReportTaskStartedRequest,
) -> Result<crate::model::Task, Status> {
    let id = parse_id("task_id", &r.task_id)?;
    Ok(domain.report_started(p, &id, i64::from(r.attempt)).await?)
}

pub(super) async fn progress(
    domain: &Domain,
    p: &Principal,
    r: &pb::ReportTaskProgressRequest,
) -> Result<(), Status> {
    let id = parse_id("task_id", &r.task_id)?;
    domain
        .report_progress(p, &id, &r.summary, r.percent, i64::from(r.attempt))
        .await?;
    Ok(())
}

pub(super) async fn messages(
    domain: &Domain,
    p: &Principal,
    r: pb::ReportTaskMessagesRequest,
) -> Result<i64, Status> {
    let id = parse_id("task_id", &r.task_id)?;
    Ok(domain
        .ingest(p, &id, i64::from(r.attempt), r.messages)
        .await?)
}

fn down(m: Down) -> pb::SessionResponse {
    pb::SessionResponse { message: Some(m) }
}

/// One daemon's session: reads lifecycle reports from the daemon and pumps
/// its outbox down. Commands are read from the store (not from memory) each
/// time the pump is woken, so a slow daemon's backlog waits in the
/// database; each is resent on every new session until acknowledged.
pub(super) struct SessionLoop<S> {
    domain: Arc<Domain>,
    principal: Principal,
    daemon_id: String,
    conn: u64,
    wake: Arc<Notify>,
    inbound: S,
    /// Boxed: the channel allocates its slots 32 at a time up front, and a
    /// SessionResponse is ~600 bytes inline; every idle session paid ~20 KB.
    tx: mpsc::Sender<Result<Box<pb::SessionResponse>, Status>>,
    /// Ends the session when the daemon's access goes.
    access: StreamGuard,
}

impl<S> SessionLoop<S>
where
    S: Stream<Item = Result<pb::SessionRequest, Status>> + Unpin + Send + Sync + 'static,
{
    /// Opens the session `open` asks for and spawns its loop; answers the
    /// stream of what goes down to the daemon, `ready` first.
    pub(super) async fn start(
        domain: Arc<Domain>,
        principal: Principal,
        open: pb::SessionOpen,
        inbound: S,
    ) -> Result<Outbound, Status> {
        let (session, rx) = Self::open(domain, principal, open, inbound).await?;
        let span = tracing::info_span!("session", daemon_id = %session.daemon_id);
        tokio::spawn(
            async move {
                tracing::info!("session opened");
                let why = session.run().await;
                tracing::info!(reason = %why, "session closed");
            }
            .instrument(span),
        );
        Ok(rx)
    }

    async fn open(
        domain: Arc<Domain>,
        mut principal: Principal,
        open: pb::SessionOpen,
        inbound: S,
    ) -> Result<(Self, Outbound), Status> {
        let daemon_id = parse_id("open.daemon_id", &open.daemon_id)?;
        let (daemon, conn, wake) = domain
            .open_session(&principal, &daemon_id, &open.running_task_ids)
            .await?;
        let access = domain.open_stream(&principal, &daemon.workspace_id, Some(&daemon.id))?;
        let (tx, rx) = mpsc::channel(256);
        let ready = pb::SessionReady {
            daemon_id: daemon.id.clone(),
            heartbeat_interval: duration(domain.liveness.heartbeat),
        };
        let _ = tx.send(Ok(Box::new(down(Down::Ready(ready))))).await;
        principal.daemon_id = Some(daemon.id.clone());
        let session = SessionLoop {
            domain,
            principal,
            daemon_id: daemon.id.clone(),
            conn,
            wake,
            inbound,
            tx,
            access,
        };
        Ok((session, rx))
    }

    /// Serves the session until it ends; answers why.
    async fn run(mut self) -> SessionEnd {
        let mut cursor = 0i64;
        let closed = self.domain.closed();
        tokio::pin!(closed);
        let drained = self.domain.drained();
        tokio::pin!(drained);
        let mut drain_sent = false;
        // handle() and pump() are boxed while they run: inline, their
        // database futures would size every idle session's task for the
        // busiest moment of any session.
        let why = loop {
            tokio::select! {
                _ = &mut closed => {
                    let _ = self.tx.send(Err(Status::unavailable(SHUTTING_DOWN))).await;
                    break SessionEnd::ShuttingDown;
                }
                _ = &mut drained, if !drain_sent => {
                    drain_sent = true;
                    let drain = pb::Drain {
                        reason: "this replica is shutting down; move to another".into(),
                    };
                    if let Err(why) = self.send(Down::Drain(drain)).await {
                        break why;
                    }
                }
                why = self.access.ended() => {
                    let status = Status::from(domain::Error::from(why.clone()));
                    let _ = self.tx.send(Err(status)).await;
                    break SessionEnd::AccessEnded(why);
                }
                up = self.inbound.next() => {
                    let arrived = self.arrived(up);
                    if let Err(why) = Box::pin(self.on_arrived(arrived)).await {
                        break why;
                    }
                }
                _ = self.wake.notified() => {
                    if !self.domain.session_current(&self.daemon_id, self.conn) {
                        let why = SessionEnd::Superseded;
                        let _ = self.tx.send(Err(Status::unavailable(why.to_string()))).await;
                        break why;
                    }
                    match Box::pin(self.pump(&mut cursor)).await {
                        Ok(()) => {}
                        Err(why) => break why,
                    }
                }
                _ = self.tx.closed() => break SessionEnd::DaemonGone,
            }
        };
        if let Err(e) = self.domain.close_session(&self.daemon_id, self.conn).await {
            tracing::warn!(error = %e, "could not mark the daemon offline");
        }
        why
    }

    /// Takes `first` and whatever else has already arrived (it never
    /// waits), up to [`MAX_ARRIVED`] messages and [`MERGE_BYTES`], sorted
    /// into lanes: each task's reports in the order they came, and the
    /// command results in theirs. Back-to-back output batches of one task
    /// and attempt become one batch (one append, one ack), up to
    /// [`MAX_BATCH`] messages; a merged batch is checked whole, as any
    /// batch is. Stops at the stream's end or error, kept for last.
    fn arrived(&mut self, first: Inbound) -> Arrived {
        let mut arrived = Arrived::default();
        let (mut n, mut bytes) = (0, 0);
        let mut next = Some(first);
        while let Some(up) = next.take() {
            let m = match up {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    arrived.end = Some(Stop::Error(e));
                    break;
                }
                None => {
                    arrived.end = Some(Stop::Closed);
                    break;
                }
            };
            n += 1;
            bytes += m.encoded_len();
            arrived.push(m);
            if n < MAX_ARRIVED && bytes < MERGE_BYTES {
                next = self.inbound.next().now_or_never();
            }
        }
        arrived
    }

    /// Handles what arrived: its lanes at once (each in order), then the
    /// stream's end if it came. `Err` ends the session.
    async fn on_arrived(&self, arrived: Arrived) -> Result<(), SessionEnd> {
        if !arrived.lanes.is_empty() {
            self.domain.session_alive(&self.principal, &self.daemon_id);
            let lanes = arrived.lanes.into_iter().map(|(_, lane)| async move {
                for m in lane {
                    self.handle(m).await?;
                }
                Ok(())
            });
            futures_util::future::try_join_all(lanes).await?;
        }
        match arrived.end {
            None => Ok(()),
            Some(end) => Err(self.stream_ended(end).await),
        }
    }

    /// Why the daemon's stream gave no message: an error or its end.
    async fn stream_ended(&self, end: Stop) -> SessionEnd {
        match end {
            Stop::Error(e) => {
                if e.code() == tonic::Code::Internal && e.message().contains("decode") {
                    // A frame that does not decode is the daemon's
                    // mistake, not the server's: say so.
                    let status = Status::invalid_argument(format!(
                        "undecodable session message: {}",
                        e.message()
                    ));
                    let _ = self.tx.send(Err(status)).await;
                }
                SessionEnd::StreamFailed(e)
            }
            Stop::Closed => SessionEnd::ClosedByDaemon,
        }
    }

    /// Sends every pending command after `cursor`.
    async fn pump(&self, cursor: &mut i64) -> Result<(), SessionEnd> {
        loop {
            let pending = self
                .domain
                .pending_commands(&self.daemon_id, *cursor, 100)
                .await
                .map_err(SessionEnd::Outbox)?;
            let n = pending.len();
            for c in pending {
                *cursor = c.seq;
                let Ok(command) = pb::Command::decode(c.payload.as_slice()) else {
                    tracing::error!(seq = c.seq, "undecodable command in the outbox");
                    continue;
                };
                self.send(Down::Command(command)).await?;
            }
            if n < 100 {
                return Ok(());
            }
        }
    }

    async fn send(&self, m: Down) -> Result<(), SessionEnd> {
        self.tx
            .send(Ok(Box::new(down(m))))
            .await
            .map_err(|_| SessionEnd::DaemonGone)
    }

    /// Handles one upstream message. A rejected report is answered with a
    /// SessionError and the session goes on; only a broken stream ends it.
    async fn handle(&self, m: pb::SessionRequest) -> Result<(), SessionEnd> {
        let p = &self.principal;
        let d = &self.domain;
        let (task_id, result): (String, Result<Option<Down>, Status>) = match m.message {
            None | Some(Up::Open(_)) => (
                String::new(),
                Err(Status::invalid_argument("unexpected message")),
            ),
            Some(Up::Heartbeat(_)) => {
                d.heartbeat(p, &self.daemon_id).await.ok();
                return Ok(());
            }
            Some(Up::Started(r)) => (
                r.task_id.clone(),
                started(d, p, &r).await.map(|t| {
                    Some(Down::StartedAck(pb::StartedAck {
                        task_id: t.id,
                        attempt: t.attempt as i32,
                    }))
                }),
            ),
            Some(Up::Progress(r)) => (r.task_id.clone(), progress(d, p, &r).await.map(|_| None)),
            Some(Up::Messages(r)) => {
                let id = r.task_id.clone();
                let acked = messages(d, p, r).await;
                (
                    id.clone(),
                    acked.map(|acked_seq| {
                        Some(Down::OutputAck(pb::OutputAck {
                            task_id: id,
                            acked_seq,
                            task_ended: false,
                        }))
                    }),
                )
            }
            Some(Up::Usage(r)) => {
                let id = r.task_id.clone();
                let res = match parse_id("task_id", &r.task_id) {
                    Ok(tid) => d
                        .report_usage(
                            p,
                            &tid,
                            r.usage.into_iter().map(parse::usage).collect(),
                            i64::from(r.attempt),
                            parse::cost(r.cost_usd, r.turns),
                        )
                        .await
                        .map_err(Status::from),
                    Err(e) => Err(e.into()),
                };
                (id, res.map(|_| None))
            }
            Some(Up::Changes(r)) => {
                let id = r.task_id.clone();
                let res = match parse_id("task_id", &r.task_id) {
                    Ok(tid) => d
                        .report_changes(
                            p,
                            &tid,
                            i64::from(r.attempt),
                            parse::changes(r.changes.unwrap_or_default()),
                            &r.patch,
                        )
                        .await
                        .map_err(Status::from),
                    Err(e) => Err(e.into()),
                };
                (id, res.map(|_| None))
            }
            Some(Up::Completed(r)) => {
                let id = r.task_id.clone();
                (id.clone(), self.ended(&id, completed(r)).await)
            }
            Some(Up::Failed(r)) => {
                let id = r.task_id.clone();
                (id.clone(), self.ended(&id, failed(r)).await)
            }
            Some(Up::CommandResult(r)) => (
                String::new(),
                d.command_result(&self.daemon_id, &r)
                    .await
                    .map(|_| None)
                    .map_err(Status::from),
            ),
        };
        match result {
            Ok(Some(reply)) => self.send(reply).await,
            Ok(None) => Ok(()),
            Err(status) => {
                tracing::warn!(task_id = %task_id, code = ?status.code(), message = status.message(), "report rejected");
                // What the daemon sent is echoed only when it is an id.
                let task_id = if task_id.len() <= 64 {
                    task_id
                } else {
                    String::new()
                };
                self.send(Down::Error(pb::SessionError {
                    task_id,
                    code: status.code() as i32,
                    message: status.message().to_string(),
                }))
                .await
            }
        }
    }

    async fn ended(&self, task_id: &str, end: TaskEnd) -> Result<Option<Down>, Status> {
        let id = parse_id("task_id", task_id)?;
        let task = self.domain.end_task(&self.principal, &id, end).await?;
        Ok(Some(Down::OutputAck(pb::OutputAck {
            task_id: task.id,
            acked_seq: task.last_seq,
            task_ended: true,
        })))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tokio_stream::wrappers::ReceiverStream;

    use super::*;
    use crate::model::TokenKind;
    use crate::store::{DaemonInfo, Store};

    type Inbound = ReceiverStream<Result<pb::SessionRequest, Status>>;
    type Up = mpsc::Sender<Result<pb::SessionRequest, Status>>;

    /// A domain on a fresh SQLite file with one registered daemon, and the
    /// daemon's principal.
    struct Fixture {
        domain: Arc<Domain>,
        principal: Principal,
        /// A user of the same workspace.
        admin: Principal,
        daemon_id: String,
        path: PathBuf,
    }

    impl Fixture {
        async fn new() -> Fixture {
            let path = std::env::temp_dir().join(format!(
                "taskmesh-session-end-{}.db",
                uuid::Uuid::new_v4().simple()
            ));
            let store = Store::connect(&format!("sqlite://{}", path.display()))
                .await
                .unwrap();
            let domain = Domain::new(store);
            let (_, secret, _) = domain
                .create_token_unchecked("default", TokenKind::Daemon, "test", "admin")
                .await
                .unwrap();
            let principal = domain.authenticate(&secret).await.unwrap();
            let (_, secret, _) = domain
                .create_token_unchecked("default", TokenKind::User, "test", "admin")
                .await
                .unwrap();
            let admin = domain.authenticate(&secret).await.unwrap();
            let info = DaemonInfo {
                workspace_id: String::new(),
                machine_id: "m".into(),
                hostname: "h".into(),
                version: "1".into(),
                runtimes: vec![],
                max_concurrent_tasks: 1,
                token_id: String::new(),
                work_dir: String::new(),
                suggested_targets: vec![],
            };
            let daemon = domain.register_daemon(&principal, info, &[]).await.unwrap();
            Fixture {
                domain,
                principal,
                admin,
                daemon_id: daemon.id,
                path,
            }
        }

        async fn open(&self) -> (SessionLoop<Inbound>, Outbound, Up) {
            let (up, rx) = mpsc::channel(8);
            let open = pb::SessionOpen {
                daemon_id: self.daemon_id.clone(),
                running_task_ids: vec![],
            };
            let (session, down) = SessionLoop::open(
                self.domain.clone(),
                self.principal.clone(),
                open,
                ReceiverStream::new(rx),
            )
            .await
            .unwrap();
            (session, down, up)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
            }
        }
    }

    fn output(task: &str, attempt: i32, seqs: std::ops::RangeInclusive<i64>) -> super::Inbound {
        let messages = seqs
            .map(|seq| pb::TaskMessageInput {
                seq,
                kind: pb::MessageKind::Stdout as i32,
                content: format!("line {seq}"),
                ..Default::default()
            })
            .collect();
        Some(Ok(pb::SessionRequest {
            message: Some(pb::session_request::Message::Messages(
                pb::ReportTaskMessagesRequest {
                    task_id: task.into(),
                    attempt,
                    messages,
                    ..Default::default()
                },
            )),
        }))
    }

    /// (task, attempt, seqs) of an output message; panics on anything else.
    fn seqs(m: &pb::SessionRequest) -> (String, i32, Vec<i64>) {
        match &m.message {
            Some(pb::session_request::Message::Messages(r)) => (
                r.task_id.clone(),
                r.attempt,
                r.messages.iter().map(|m| m.seq).collect(),
            ),
            other => panic!("expected output, got {other:?}"),
        }
    }

    fn lane_keys(a: &Arrived) -> Vec<&Lane> {
        a.lanes.iter().map(|(lane, _)| lane).collect()
    }

    /// What already arrived is taken at once, nothing waited for, in
    /// lanes: each task's reports in the order they came, back-to-back
    /// output of one task and attempt as one batch within its bounds.
    #[tokio::test]
    async fn what_arrived_is_taken_in_lanes_and_output_merged() {
        let f = Fixture::new().await;
        let (mut session, _down, up) = f.open().await;
        let beat = pb::SessionRequest {
            message: Some(pb::session_request::Message::Heartbeat(Default::default())),
        };
        for next in [
            output("a", 1, 2..=3),
            output("b", 1, 1..=1),
            output("a", 1, 4..=4),
            Some(Ok(beat)),
            output("a", 2, 1..=1),
        ] {
            up.send(next.unwrap()).await.unwrap();
        }
        let arrived = session.arrived(output("a", 1, 1..=1));
        let (a, b) = (Lane::Task("a".into()), Lane::Task("b".into()));
        assert_eq!(lane_keys(&arrived), [&a, &b, &Lane::Other]);
        let a_lane: Vec<_> = arrived.lanes[0].1.iter().map(seqs).collect();
        assert_eq!(
            a_lane,
            [("a".into(), 1, vec![1, 2, 3, 4]), ("a".into(), 2, vec![1])]
        );
        assert_eq!(seqs(&arrived.lanes[1].1[0]), ("b".into(), 1, vec![1]));
        assert!(arrived.end.is_none());

        let alone = session.arrived(output("c", 1, 1..=1));
        assert_eq!(
            alone.lanes.len(),
            1,
            "nothing more arrived: nothing waited for"
        );

        up.send(output("a", 1, 5001..=5001).unwrap()).await.unwrap();
        let full = session.arrived(output("a", 1, 1..=MAX_BATCH as i64));
        let lens: Vec<usize> = full.lanes[0].1.iter().map(|m| seqs(m).2.len()).collect();
        assert_eq!(lens, [MAX_BATCH, 1]);

        up.send(output("a", 1, 7..=7).unwrap()).await.unwrap();
        drop(up);
        let last = session.arrived(output("a", 1, 6..=6));
        assert_eq!(seqs(&last.lanes[0].1[0]).2, [6, 7]);
        assert!(matches!(last.end, Some(Stop::Closed)));
    }

    #[tokio::test]
    async fn each_way_a_session_ends_is_named() {
        let f = Fixture::new().await;

        let (session, _down, up) = f.open().await;
        drop(up);
        assert!(matches!(session.run().await, SessionEnd::ClosedByDaemon));

        let (session, down, _up) = f.open().await;
        drop(down);
        assert!(matches!(session.run().await, SessionEnd::DaemonGone));

        let (session, _down, up) = f.open().await;
        up.send(Err(Status::invalid_argument("undecodable frame")))
            .await
            .unwrap();
        match session.run().await {
            SessionEnd::StreamFailed(s) => assert_eq!(s.code(), tonic::Code::InvalidArgument),
            other => panic!("expected StreamFailed, got {other}"),
        }

        let (older, mut older_down, _older_up) = f.open().await;
        let (_newer, _newer_down, _newer_up) = f.open().await;
        assert!(matches!(older.run().await, SessionEnd::Superseded));
        let mut last = None;
        while let Some(m) = older_down.recv().await {
            last = Some(m);
        }
        let status = last.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), SessionEnd::Superseded.to_string());

        let (session, mut down, _up) = f.open().await;
        f.domain
            .revoke_token(&f.admin, &f.principal.token_id)
            .await
            .unwrap();
        assert!(matches!(
            session.run().await,
            SessionEnd::AccessEnded(StreamEnd::Revoked)
        ));
        let mut last = None;
        while let Some(m) = down.recv().await {
            last = Some(m);
        }
        assert_eq!(
            last.unwrap().unwrap_err().code(),
            tonic::Code::Unauthenticated
        );

        let f = Fixture::new().await;
        let (session, _down, _up) = f.open().await;
        f.domain.close_streams();
        assert!(matches!(session.run().await, SessionEnd::ShuttingDown));
    }
}
