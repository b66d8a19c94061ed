//! What goes up: started reports, output batches in seq order (the task
//! that waited longest first), and end reports once a task's output is
//! out; and what the server's acknowledgements and refusals release.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::shutdown::Phase;
use super::{Session, TaskRecord, up};
use crate::output::{BATCH_MAX_BYTES, BATCH_MAX_MESSAGES};
use crate::pb::session_request::Message as Up;
use crate::pb::{
    CommandResultStatus, CompleteTaskRequest, FailTaskRequest, OutputAck, ReportTaskChanges,
    ReportTaskMessagesRequest, ReportTaskStartedRequest, ReportTaskUsageRequest, SessionError,
    SessionRequest,
};
use crate::runner::{Control, Outcome, RunnerEvent, TaskEnd, send_control};

/// What to send next on the stream.
pub(super) enum Source {
    Control,
    Output(String),
    End(String),
}

/// The end report of one attempt; the server refuses it for any other.
fn end_request(task_id: &str, attempt: i32, end: TaskEnd, requeue: bool) -> Up {
    match end.outcome {
        Outcome::Completed { summary } => Up::Completed(CompleteTaskRequest {
            task_id: task_id.to_owned(),
            summary,
            resume: end.resume,
            attempt,
            ..Default::default()
        }),
        Outcome::Failed { reason, exit_code } => Up::Failed(FailTaskRequest {
            task_id: task_id.to_owned(),
            reason,
            exit_code,
            resume: end.resume,
            attempt,
            requeue,
            ..Default::default()
        }),
    }
}

pub(super) const CODE_NOT_FOUND: i32 = 5;

pub(super) const CODE_FAILED_PRECONDITION: i32 = 9;

/// Output is held this long so lines arriving together share a write.
const FLUSH_DELAY: Duration = Duration::from_millis(20);

impl Session {
    /// What goes out next: control messages first (a started report must
    /// precede the task's output), then output in seq order, then a task's
    /// end once all its output is out.
    pub(super) fn next_source(&self, now: Instant) -> Option<Source> {
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

    pub(super) fn next_outgoing(&mut self, now: Instant) -> Option<SessionRequest> {
        let req = match self.next_source(now)? {
            Source::Control => self.control_out.pop_front(),
            Source::Output(id) => {
                let rec = self.tasks.get_mut(&id)?;
                rec.last_sent = now;
                let messages = rec.buffer.next_batch(BATCH_MAX_MESSAGES, BATCH_MAX_BYTES);
                Some(up(Up::Messages(ReportTaskMessagesRequest {
                    task_id: id,
                    messages,
                    attempt: rec.attempt,
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

    pub(super) fn on_ack(&mut self, ack: OutputAck) {
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

    pub(super) fn on_session_error(&mut self, err: SessionError) {
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

    pub(super) fn on_runner_event(&mut self, ev: RunnerEvent) {
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
            RunnerEvent::Usage {
                run_id,
                task_id,
                report,
            } => {
                let Some(rec) = self.record(&task_id, run_id) else {
                    return;
                };
                let usage = ReportTaskUsageRequest {
                    task_id,
                    usage: report.usage,
                    attempt: rec.attempt,
                    cost_usd: report.cost_usd,
                    turns: report.turns,
                    ..Default::default()
                };
                self.control_out.push_back(up(Up::Usage(usage)));
            }
            RunnerEvent::CommandDone { command_id, result } => match result {
                Ok(()) => self.finish_command(&command_id, CommandResultStatus::Ok, String::new()),
                Err(e) => self.finish_command(&command_id, CommandResultStatus::Failed, e),
            },
            RunnerEvent::CommandAnswered { command_id, result } => match result {
                Ok(done) => self.finish_command(&command_id, CommandResultStatus::Ok, done),
                Err(why) => self.finish_command(&command_id, CommandResultStatus::Failed, why),
            },
            RunnerEvent::Changes {
                run_id,
                task_id,
                changes,
                patch,
            } => {
                let Some(rec) = self.record(&task_id, run_id) else {
                    return;
                };
                let report = ReportTaskChanges {
                    task_id,
                    attempt: rec.attempt,
                    changes: Some(changes),
                    patch,
                };
                self.control_out.push_back(up(Up::Changes(report)));
            }
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
                rec.end = Some(end_request(&task_id, rec.attempt, end, rec.cut_by_shutdown));
                if before_start {
                    let command_id = rec.spawn_command_id.clone();
                    self.finish_command(&command_id, CommandResultStatus::Failed, reason);
                }
            }
        }
    }

    /// The record of this run of a task; events of forgotten or replaced
    /// runs are dropped.
    pub(super) fn record(&mut self, task_id: &str, run_id: u64) -> Option<&mut TaskRecord> {
        let rec = self.tasks.get_mut(task_id).filter(|r| r.run_id == run_id);
        if rec.is_none() {
            debug!(%task_id, run_id, "event of a forgotten task dropped");
        }
        rec
    }
}
