//! `task watch`: a task's output, followed live, across dropped connections.
//!
//! The server numbers a task's output 1, 2, 3… without gaps, and WatchTask
//! replays everything after a given seq before following live. So resuming
//! is asking again from the last seq printed, and a seq at or below it is a
//! line already printed. The stream also carries the task, first and after
//! every change; its `last_seq` says how much output exists, so a finished
//! task is done once that much is printed.

use std::time::Duration;

use rand::Rng;
use tonic::{Code, Status};

use super::format::{self, Output};
use super::{CliError, Connection, Result, ServerArgs, WatchArgs, note, say};
use crate::pb::{self, TaskStatus, watch_task_response::Event};

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// What a shell reports for a process ended by Ctrl-C (128 + SIGINT).
const INTERRUPTED_EXIT: i32 = 130;

pub async fn run(server: &ServerArgs, args: WatchArgs) -> Result<()> {
    let watcher = Watcher {
        task_id: args.id,
        printed: args.since_seq,
        status: None,
    };
    tokio::select! {
        r = watcher.follow(server) => r,
        _ = tokio::signal::ctrl_c() => {
            let _ = std::io::Write::flush(&mut std::io::stdout());
            std::process::exit(INTERRUPTED_EXIT);
        }
    }
}

struct Watcher {
    task_id: String,
    /// The seq of the last message printed.
    printed: i64,
    /// The status last reported on stderr.
    status: Option<TaskStatus>,
}

/// How one WatchTask call ended, when it did not fail for good.
enum Outcome {
    /// The task ended and all of its output is printed.
    Finished { status: TaskStatus, reason: String },
    /// The stream broke; ask again from the last seq printed.
    Broken { reason: String },
}

impl Watcher {
    async fn follow(mut self, args: &ServerArgs) -> Result<()> {
        // A first connection that fails is most likely a wrong URL: say so
        // rather than retrying. After that, the server is known to exist.
        let mut conn = args.connect().await?;
        let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_CAP);
        loop {
            let printed_before = self.printed;
            let mut reason = match self.watch(&conn).await? {
                Outcome::Finished { status, reason } => {
                    self.show_usage(&conn).await;
                    return self.finish(status, reason);
                }
                Outcome::Broken { reason } => reason,
            };
            if self.printed > printed_before {
                backoff.reset();
            }
            conn = loop {
                let delay = backoff.next_delay();
                note(&format!(
                    "taskmesh: {reason}; reconnecting in {:.1}s (from seq {})",
                    delay.as_secs_f32(),
                    self.printed
                ));
                tokio::time::sleep(delay).await;
                match args.connect().await {
                    Ok(c) => break c,
                    Err(e) => reason = e.to_string(),
                }
            };
        }
    }

    /// One WatchTask call, until the task is done or the stream breaks.
    async fn watch(&mut self, conn: &Connection) -> Result<Outcome> {
        let request = pb::WatchTaskRequest {
            task_id: self.task_id.clone(),
            since_seq: self.printed,
            follow: false,
        };
        let mut stream = match conn.tasks().watch_task(request).await {
            Ok(r) => r.into_inner(),
            Err(s) => return broken(s),
        };
        let mut task: Option<pb::Task> = None;
        loop {
            match stream.message().await {
                Ok(Some(pb::WatchTaskResponse { event: Some(e) })) => match e {
                    Event::Message(m) if m.seq <= self.printed => {}
                    Event::Message(m) if m.seq > self.printed + 1 => {
                        return Ok(Outcome::Broken {
                            reason: format!(
                                "output seq {} arrived while {} was expected",
                                m.seq,
                                self.printed + 1
                            ),
                        });
                    }
                    Event::Message(m) => {
                        match format::message(&m) {
                            Output::Stdout(text) => say(&format!("{text}\n"))?,
                            Output::Stderr(text) => note(&text),
                        }
                        self.printed = m.seq;
                    }
                    Event::Task(t) => {
                        if t.output_pruned_seq > self.printed {
                            note(&format!(
                                "taskmesh: output up to seq {} was removed by the server's retention (serve --retain-output)",
                                t.output_pruned_seq
                            ));
                            self.printed = t.output_pruned_seq;
                        }
                        if self.status != Some(t.status()) {
                            self.status = Some(t.status());
                            note(&format::status_change(&t));
                        }
                        task = Some(t);
                    }
                },
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Ok(Outcome::Broken {
                        reason: "the server closed the stream".into(),
                    });
                }
                Err(s) => return broken(s),
            }
            if let Some(t) =
                task.take_if(|t| format::is_finished(t.status()) && self.printed >= t.last_seq)
            {
                return Ok(Outcome::Finished {
                    status: t.status(),
                    reason: t.status_reason,
                });
            }
        }
    }

    /// An agent task's usage and cost, on stderr, once it is done (best
    /// effort: the output is what matters).
    async fn show_usage(&self, conn: &Connection) {
        let request = pb::GetTaskUsageRequest {
            task_id: self.task_id.clone(),
        };
        if let Ok(usage) = conn.tasks().get_task_usage(request).await
            && let Some(line) = format::usage_summary(&usage.into_inner())
        {
            note(&line);
        }
    }

    fn finish(self, status: TaskStatus, reason: String) -> Result<()> {
        match status {
            TaskStatus::Completed => Ok(()),
            status => Err(CliError::TaskEnded {
                id: self.task_id,
                status,
                reason,
            }),
        }
    }
}

/// A refusal ends the watch; anything else (the server went away, the
/// connection broke mid-stream) is worth another try.
fn broken(status: Status) -> Result<Outcome> {
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Unauthenticated => Err(status.into()),
        _ => Ok(Outcome::Broken {
            reason: format::status(&status),
        }),
    }
}

/// Exponential backoff with jitter: uniform in [current/2, current], so
/// watchers dropped together do not return together, and never at once.
struct Backoff {
    current: Duration,
    start: Duration,
    cap: Duration,
}

impl Backoff {
    fn new(start: Duration, cap: Duration) -> Self {
        Backoff {
            current: start,
            start,
            cap,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let max = u64::try_from(self.current.as_millis()).unwrap_or(u64::MAX);
        let delay = Duration::from_millis(rand::thread_rng().gen_range(max / 2..=max));
        self.current = (self.current * 2).min(self.cap);
        delay
    }

    fn reset(&mut self) {
        self.current = self.start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        for max in [100, 200, 400, 400, 400] {
            let d = b.next_delay().as_millis();
            assert!(
                (max / 2..=max).contains(&d),
                "{d} not in {}..={max}",
                max / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn refusals_end_the_watch_and_breakage_retries() {
        for code in [Code::NotFound, Code::Unauthenticated, Code::InvalidArgument] {
            assert!(broken(Status::new(code, "no")).is_err(), "{code:?}");
        }
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
        ] {
            assert!(
                matches!(broken(Status::new(code, "x")), Ok(Outcome::Broken { .. })),
                "{code:?}"
            );
        }
    }
}
