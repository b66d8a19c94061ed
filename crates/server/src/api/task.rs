//! TaskService: people and scripts steering tasks.

use super::parse;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::access::principal;
use crate::domain::{
    self, Domain, ListTasks, NewTask, TaskPatch, invalid, page_size, parse_id, parse_optional_id,
};
use crate::domain::{Decision, TaskUpdate};
use crate::model::Usage;
use crate::pb::{self, task_service_server::TaskService, watch_task_response::Event};
use crate::wire;

pub struct TaskApi {
    domain: Arc<Domain>,
}

impl TaskApi {
    pub fn new(domain: Arc<Domain>) -> Self {
        TaskApi { domain }
    }
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Splits an UpdateTask request into the fields its mask names.
fn patch(task: pb::Task, mask: Option<prost_types::FieldMask>) -> domain::Result<TaskPatch> {
    let paths = mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(invalid("update_mask", "name at least one field to update"));
    }
    let mut patch = TaskPatch::default();
    for path in paths {
        match path.as_str() {
            "name" => patch.name = Some(task.name.clone()),
            "plan" => patch.plan = Some(task.plan.clone()),
            "runtime" => patch.runtime = Some(task.runtime.clone()),
            "repository" => patch.repository = Some(task.repository.clone()),
            "branch" => patch.branch = Some(task.branch.clone()),
            "model" => patch.model = Some(task.model.clone()),
            "permission_mode" => patch.permission_mode = Some(task.permission_mode.clone()),
            "completion_action" => {
                patch.completion_action = Some(parse::completion_action(
                    "task.completion_action",
                    task.completion_action,
                )?)
            }
            "target_branch" => patch.target_branch = Some(task.target_branch.clone()),
            other => {
                return Err(invalid(
                    "update_mask",
                    format!(
                        "{} cannot be updated (name, plan, runtime, repository, branch, \
                         model, permission_mode, completion_action, target_branch)",
                        domain::quote(other)
                    ),
                ));
            }
        }
    }
    Ok(patch)
}

#[tonic::async_trait]
impl TaskService for TaskApi {
    async fn create_task(
        &self,
        req: Request<pb::CreateTaskRequest>,
    ) -> Result<Response<pb::CreateTaskResponse>, Status> {
        let p = principal(&req)?;
        let r = req.into_inner();
        let new = NewTask {
            parent_id: parse_optional_id("parent_task_id", &r.parent_task_id)?,
            workspace: r.workspace,
            name: r.name,
            plan: r.plan,
            runtime: r.runtime,
            repository: r.repository,
            branch: r.branch,
            model: r.model,
            permission_mode: r.permission_mode,
            completion_action: parse::completion_action("completion_action", r.completion_action)?,
            target_branch: r.target_branch,
        };
        let task = self.domain.create_task(&p, new).await?;
        Ok(Response::new(pb::CreateTaskResponse {
            task: Some(wire::task(task)),
        }))
    }

    async fn get_task(
        &self,
        req: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let p = principal(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        let (task, subtasks, count) = self.domain.get_task(&p, &id).await?;
        let changes = self.domain.latest_changes(&task).await?;
        let mut task = wire::task_with_subtasks(task, subtasks, count);
        task.changes = changes.map(wire::changes);
        Ok(Response::new(pb::GetTaskResponse { task: Some(task) }))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let p = principal(&req)?;
        let r = req.into_inner();
        let query = ListTasks {
            statuses: r
                .statuses
                .iter()
                .map(|&s| parse::task_status("statuses", s))
                .collect::<domain::Result<_>>()?,
            parent_id: parse_optional_id("parent_task_id", &r.parent_task_id)?,
            daemon_id: parse_optional_id("daemon_id", &r.daemon_id)?,
            page_size: page_size("page_size", r.page_size, 50, 1000)?,
            page_token: parse_optional_id("page_token", &r.page_token)?,
            workspace: r.workspace,
        };
        let (tasks, next) = self.domain.list_tasks(&p, query).await?;
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks.into_iter().map(wire::task).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn update_task(
        &self,
        req: Request<pb::UpdateTaskRequest>,
    ) -> Result<Response<pb::UpdateTaskResponse>, Status> {
        let p = principal(&req)?;
        let r = req.into_inner();
        let task = r.task.ok_or_else(|| invalid("task", "is required"))?;
        let id = parse_id("task.id", &task.id)?;
        let patch = patch(task, r.update_mask)?;
        let task = self
            .domain
            .update_task(&p, &id, patch, r.expected_version)
            .await?;
        Ok(Response::new(pb::UpdateTaskResponse {
            task: Some(wire::task(task)),
        }))
    }

    async fn delete_task(
        &self,
        req: Request<pb::DeleteTaskRequest>,
    ) -> Result<Response<pb::DeleteTaskResponse>, Status> {
        let p = principal(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        self.domain.delete_task(&p, &id).await?;
        Ok(Response::new(pb::DeleteTaskResponse {}))
    }

    async fn start_task(
        &self,
        req: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::StartTaskResponse>, Status> {
        let p = principal(&req)?;
        let r = req.get_ref();
        let id = parse_id("id", &r.id)?;
        let pin = parse_optional_id("daemon_id", &r.daemon_id)?;
        let task = self.domain.start_task(&p, &id, pin).await?;
        let warning = self.domain.runtime_warning(&task).await?;
        Ok(Response::new(pb::StartTaskResponse {
            task: Some(wire::task(task)),
            warning: warning.unwrap_or_default(),
        }))
    }

    async fn stop_task(
        &self,
        req: Request<pb::StopTaskRequest>,
    ) -> Result<Response<pb::StopTaskResponse>, Status> {
        let p = principal(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        let (task, outcome) = self.domain.stop_task(&p, &id).await?;
        Ok(Response::new(pb::StopTaskResponse {
            task: Some(wire::task(task)),
            outcome: wire::stop_outcome(outcome) as i32,
        }))
    }

    async fn send_message(
        &self,
        req: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let p = principal(&req)?;
        let r = req.into_inner();
        let id = parse_id("task_id", &r.task_id)?;
        let command_id = self.domain.send_message(&p, &id, r.text).await?;
        Ok(Response::new(pb::SendMessageResponse { command_id }))
    }

    async fn list_task_messages(
        &self,
        req: Request<pb::ListTaskMessagesRequest>,
    ) -> Result<Response<pb::ListTaskMessagesResponse>, Status> {
        let p = principal(&req)?;
        let r = req.get_ref();
        let id = parse_id("task_id", &r.task_id)?;
        let limit = page_size("limit", r.limit, 1000, 10_000)?;
        let page = self
            .domain
            .list_task_messages(&p, &id, r.since_seq, limit)
            .await?;
        Ok(Response::new(pb::ListTaskMessagesResponse {
            messages: page.messages.into_iter().map(wire::task_message).collect(),
            last_seq: page.last_seq,
            pruned_through_seq: page.pruned_through_seq,
        }))
    }

    type WatchTaskStream = Stream_<pb::WatchTaskResponse>;

    async fn watch_task(
        &self,
        req: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let p = principal(&req)?;
        let r = req.get_ref();
        let id = parse_id("task_id", &r.task_id)?;
        let rx = self
            .domain
            .watch_task(&p, &id, r.since_seq, r.follow)
            .await?;
        // Markers for output to read from the store never leave the server.
        let stream = ReceiverStream::new(rx).filter_map(|u| {
            let event = match u {
                Err(e) => return Some(Err(e.into())),
                Ok(d) => match d.update {
                    TaskUpdate::Message(m) => Event::Message(wire::task_message(m)),
                    TaskUpdate::Task(t) => Event::Task(wire::task(*t)),
                    TaskUpdate::Stored { .. } => return None,
                },
            };
            Some(Ok(pb::WatchTaskResponse { event: Some(event) }))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchTasksStream = Stream_<pb::WatchTasksResponse>;

    async fn watch_tasks(
        &self,
        req: Request<pb::WatchTasksRequest>,
    ) -> Result<Response<Self::WatchTasksStream>, Status> {
        let p = principal(&req)?;
        let rx = self.domain.watch_tasks(&p, &req.get_ref().workspace)?;
        let stream = ReceiverStream::new(rx).map(|u| {
            let u = u?.update;
            Ok(pb::WatchTasksResponse {
                task: Some(wire::task(u.task)),
                deleted: u.deleted,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_task_events(
        &self,
        req: Request<pb::ListTaskEventsRequest>,
    ) -> Result<Response<pb::ListTaskEventsResponse>, Status> {
        let p = principal(&req)?;
        let r = req.get_ref();
        let id = parse_id("task_id", &r.task_id)?;
        let size = page_size("page_size", r.page_size, 100, 1000)?;
        let (events, next) = self
            .domain
            .list_task_events(&p, &id, size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListTaskEventsResponse {
            events: events.into_iter().map(wire::task_event).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn reassign_task(
        &self,
        req: Request<pb::ReassignTaskRequest>,
    ) -> Result<Response<pb::ReassignTaskResponse>, Status> {
        let p = principal(&req)?;
        let r = req.get_ref();
        let id = parse_id("id", &r.id)?;
        let pin = parse_optional_id("daemon_id", &r.daemon_id)?;
        let task = self.domain.reassign_task(&p, &id, pin).await?;
        Ok(Response::new(pb::ReassignTaskResponse {
            task: Some(wire::task(task)),
        }))
    }

    async fn continue_task(
        &self,
        req: Request<pb::ContinueTaskRequest>,
    ) -> Result<Response<pb::ContinueTaskResponse>, Status> {
        let p = principal(&req)?;
        let r = req.into_inner();
        let id = parse_id("id", &r.id)?;
        let pin = parse_optional_id("daemon_id", &r.daemon_id)?;
        let task = self.domain.continue_task(&p, &id, r.prompt, pin).await?;
        Ok(Response::new(pb::ContinueTaskResponse {
            task: Some(wire::task(task)),
        }))
    }

    async fn get_task_diff(
        &self,
        req: Request<pb::GetTaskDiffRequest>,
    ) -> Result<Response<pb::GetTaskDiffResponse>, Status> {
        let p = principal(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        let (changes, patch) = self.domain.task_diff(&p, &id).await?;
        Ok(Response::new(pb::GetTaskDiffResponse {
            changes: Some(wire::changes(changes)),
            patch,
        }))
    }

    async fn clone_worktree(
        &self,
        req: Request<pb::CloneWorktreeRequest>,
    ) -> Result<Response<pb::CloneWorktreeResponse>, Status> {
        let p = principal(&req)?;
        let r = req.into_inner();
        let id = parse_id("id", &r.id)?;
        let detail = self.domain.clone_worktree(&p, &id, &r.path).await?;
        Ok(Response::new(pb::CloneWorktreeResponse {
            path: r.path.trim().to_owned(),
            detail,
        }))
    }

    async fn retry_completion(
        &self,
        req: Request<pb::RetryCompletionRequest>,
    ) -> Result<Response<pb::RetryCompletionResponse>, Status> {
        let p = principal(&req)?;
        let id = parse_id("id", &req.get_ref().id)?;
        let (task, command_id) = self.domain.retry_completion(&p, &id).await?;
        Ok(Response::new(pb::RetryCompletionResponse {
            task: Some(wire::task(task)),
            command_id,
        }))
    }

    async fn get_task_usage(
        &self,
        req: Request<pb::GetTaskUsageRequest>,
    ) -> Result<Response<pb::GetTaskUsageResponse>, Status> {
        let p = principal(&req)?;
        let id = parse_id("task_id", &req.get_ref().task_id)?;
        let usage = self.domain.task_usage(&p, &id).await?;
        let mut total = Usage::default();
        for u in &usage.models {
            total.add(u);
        }
        Ok(Response::new(pb::GetTaskUsageResponse {
            usage: usage.models.into_iter().map(wire::usage).collect(),
            total: Some(wire::usage(total)),
            cost_usd: usage.cost_usd,
            turns: i32::try_from(usage.turns).unwrap_or(i32::MAX),
        }))
    }

    async fn decide_approval(
        &self,
        req: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::DecideApprovalResponse>, Status> {
        let p = principal(&req)?;
        let r = req.into_inner();
        let id = parse_id("task_id", &r.task_id)?;
        let allow = match pb::Decision::try_from(r.decision) {
            Ok(pb::Decision::Allow) => true,
            Ok(pb::Decision::Deny) => false,
            _ => return Err(invalid("decision", "must be ALLOW or DENY").into()),
        };
        let approval_id = (!r.approval_id.is_empty()).then_some(r.approval_id.as_str());
        let decision = Decision {
            allow,
            updated_input_json: r.updated_input_json,
            message: r.message,
        };
        let approval = self
            .domain
            .decide_approval(&p, &id, approval_id, decision)
            .await?;
        Ok(Response::new(pb::DecideApprovalResponse {
            approval: Some(wire::approval(approval)),
        }))
    }

    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        let p = principal(&req)?;
        let id = parse_id("task_id", &req.get_ref().task_id)?;
        let approvals = self.domain.list_approvals(&p, &id).await?;
        Ok(Response::new(pb::ListApprovalsResponse {
            approvals: approvals.into_iter().map(wire::approval).collect(),
        }))
    }
}
