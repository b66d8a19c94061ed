//! TaskService calls the tests make over and over: create and start, get,
//! read the events.

use std::time::Duration;

use taskmesh_server::pb;

use crate::Tasks;
use crate::watch::PATIENCE;

/// Creates the task and queues it.
pub async fn create_and_start(tasks: &mut Tasks, request: pb::CreateTaskRequest) -> pb::Task {
    let task = tasks
        .create_task(request)
        .await
        .expect("CreateTask")
        .into_inner()
        .task
        .expect("a task");
    tasks
        .start_task(pb::StartTaskRequest {
            id: task.id.clone(),
            daemon_id: String::new(),
        })
        .await
        .expect("StartTask");
    task
}

/// GetTask.
pub async fn get(tasks: &mut Tasks, id: &str) -> pb::Task {
    tasks
        .get_task(pb::GetTaskRequest { id: id.into() })
        .await
        .expect("GetTask")
        .into_inner()
        .task
        .expect("a task")
}

/// The reasons of the task's events, oldest first.
pub async fn event_reasons(tasks: &mut Tasks, id: &str) -> Vec<String> {
    tasks
        .list_task_events(pb::ListTaskEventsRequest {
            task_id: id.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("ListTaskEvents")
        .into_inner()
        .events
        .into_iter()
        .map(|e| e.reason)
        .collect()
}

/// The event reasons once one of them starts with `prefix` (what a daemon
/// answers later arrives as an event); panics after [`PATIENCE`].
pub async fn until_event(tasks: &mut Tasks, id: &str, prefix: &str) -> Vec<String> {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let reasons = event_reasons(tasks, id).await;
            if reasons.iter().any(|r| r.starts_with(prefix)) {
                return reasons;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no event of task {id} starts with {prefix:?}"))
}
