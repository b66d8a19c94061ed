//! A WatchTask stream that keeps what it delivered, with waits bounded by
//! a timeout: for tests that follow a task as a person would.

use std::time::Duration;

use taskmesh_server::pb::{self, TaskStatus, watch_task_response::Event};
use tokio_stream::StreamExt;

use crate::Tasks;

/// Bounds every wait; far above what any step needs.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A WatchTask stream and every message it delivered so far.
pub struct Watch {
    pub stream: tonic::Streaming<pb::WatchTaskResponse>,
    pub messages: Vec<pb::TaskMessage>,
}

impl Watch {
    pub async fn open(tasks: &mut Tasks, task_id: &str, since_seq: i64) -> Watch {
        let stream = tasks
            .watch_task(pb::WatchTaskRequest {
                task_id: task_id.into(),
                since_seq,
                follow: false,
            })
            .await
            .unwrap()
            .into_inner();
        Watch {
            stream,
            messages: Vec::new(),
        }
    }

    /// Reads until a task event satisfies `done`; answers that task.
    pub async fn until(
        &mut self,
        what: &str,
        done: impl Fn(&pb::Task, &[pb::TaskMessage]) -> bool,
    ) -> pb::Task {
        let read = async {
            while let Some(ev) = self.stream.next().await {
                match ev.expect("watch event").event {
                    Some(Event::Message(m)) => self.messages.push(m),
                    Some(Event::Task(t)) if done(&t, &self.messages) => return t,
                    _ => {}
                }
            }
            panic!("the watch ended before {what}");
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    pub async fn until_status(&mut self, status: TaskStatus) -> pb::Task {
        self.until(&format!("{status:?}"), |t, _| t.status == status as i32)
            .await
    }

    /// Reads until a message with this exact content arrived.
    pub async fn until_line(&mut self, line: &str) {
        self.until_message(line, |m| m.content == line).await;
    }

    /// Reads until a message satisfying `found` arrived (or had arrived).
    pub async fn until_message(&mut self, what: &str, found: impl Fn(&pb::TaskMessage) -> bool) {
        let read = async {
            if self.messages.iter().any(&found) {
                return;
            }
            while let Some(ev) = self.stream.next().await {
                if let Some(Event::Message(m)) = ev.expect("watch event").event {
                    let done = found(&m);
                    self.messages.push(m);
                    if done {
                        return;
                    }
                }
            }
            panic!("the watch ended before {what}");
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }
}
