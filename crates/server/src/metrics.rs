//! Prometheus metrics of this replica (one registry per process), in the
//! Prometheus naming conventions: counters end in `_total`, durations are
//! `_seconds` histograms, labels stay few (no task or daemon ids). Events
//! are counted where they happen; what the database knows (tasks by state,
//! the outbox, approvals) is read when `/metrics` is scraped.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::{Micros, now_micros};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub status: String,
    pub runtime: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// Buckets from 0.5 ms to about 16 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Buckets from 10 ms to about 45 h.
fn waiting() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 4.0, 12))
}

pub struct Metrics {
    registry: Registry,
    pub rpcs: Family<RpcLabels, Counter>,
    pub rpc_seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
    pub dispatch_seconds: Histogram,
    pub queue_wait_seconds: Histogram,
    pub output_messages: Counter,
    pub output_bytes: Counter,
    pub sweeps: Counter,
    pub swept_daemons_offline: Counter,
    pub swept_tasks_interrupted: Counter,
    pub swept_tasks_requeued: Counter,
    pub retention_messages_deleted: Counter,
    pub retention_tasks_deleted: Counter,
    pub sessions: Gauge,
    pub watchers: Gauge,
    pub tasks: Family<TaskLabels, Gauge>,
    pub daemons: Family<StateLabels, Gauge>,
    pub outbox_pending: Gauge,
    pub outbox_oldest_seconds: Gauge<f64, AtomicU64>,
    pub approvals_pending: Gauge,
    /// Tasks claimed here whose SpawnTask is not acknowledged yet: when
    /// they were queued.
    dispatching: Mutex<HashMap<String, Micros>>,
}

/// Claims remembered at most while waiting for their acknowledgement.
const MAX_DISPATCHING: usize = 100_000;

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("taskmesh");
        let m = Metrics {
            rpcs: Family::default(),
            rpc_seconds: Family::new_with_constructor(latency),
            dispatch_seconds: latency(),
            queue_wait_seconds: waiting(),
            output_messages: Counter::default(),
            output_bytes: Counter::default(),
            sweeps: Counter::default(),
            swept_daemons_offline: Counter::default(),
            swept_tasks_interrupted: Counter::default(),
            swept_tasks_requeued: Counter::default(),
            retention_messages_deleted: Counter::default(),
            retention_tasks_deleted: Counter::default(),
            sessions: Gauge::default(),
            watchers: Gauge::default(),
            tasks: Family::default(),
            daemons: Family::default(),
            outbox_pending: Gauge::default(),
            outbox_oldest_seconds: Gauge::default(),
            approvals_pending: Gauge::default(),
            dispatching: Mutex::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "rpcs",
            "RPCs answered, by method and gRPC code",
            m.rpcs.clone(),
        );
        r.register(
            "rpc_duration_seconds",
            "Time to an RPC's response headers, by method",
            m.rpc_seconds.clone(),
        );
        r.register(
            "dispatch_duration_seconds",
            "From a task queued to its SpawnTask acknowledged by a daemon",
            m.dispatch_seconds.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "From a task queued to its claim by a daemon",
            m.queue_wait_seconds.clone(),
        );
        r.register(
            "output_messages",
            "Output messages stored",
            m.output_messages.clone(),
        );
        r.register(
            "output_bytes",
            "Bytes of output stored",
            m.output_bytes.clone(),
        );
        r.register("liveness_sweeps", "Liveness sweeps run", m.sweeps.clone());
        r.register(
            "liveness_daemons_offline",
            "Daemons the liveness sweep marked offline",
            m.swept_daemons_offline.clone(),
        );
        r.register(
            "liveness_tasks_interrupted",
            "Tasks interrupted because their daemon was lost",
            m.swept_tasks_interrupted.clone(),
        );
        r.register(
            "liveness_tasks_requeued",
            "Tasks queued again because their daemon was lost or did not take them",
            m.swept_tasks_requeued.clone(),
        );
        r.register(
            "retention_messages_deleted",
            "Output messages removed by retention (--retain-output, --retain-tasks)",
            m.retention_messages_deleted.clone(),
        );
        r.register(
            "retention_tasks_deleted",
            "Tasks removed by retention (--retain-tasks)",
            m.retention_tasks_deleted.clone(),
        );
        r.register(
            "sessions",
            "Daemon sessions open on this replica",
            m.sessions.clone(),
        );
        r.register(
            "watchers",
            "WatchTask and WatchTasks streams open on this replica",
            m.watchers.clone(),
        );
        r.register("tasks", "Tasks by state and runtime", m.tasks.clone());
        r.register("daemons", "Daemons by state", m.daemons.clone());
        r.register(
            "outbox_pending_commands",
            "Commands waiting for their daemon's acknowledgement",
            m.outbox_pending.clone(),
        );
        r.register(
            "outbox_oldest_command_age_seconds",
            "Age of the oldest unacknowledged command",
            m.outbox_oldest_seconds.clone(),
        );
        r.register(
            "approvals_pending",
            "Permission requests waiting for a person",
            m.approvals_pending.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A claim here: the queue wait now, the dispatch latency at the ack.
    pub fn claimed(&self, task_id: &str, queued_at: Option<Micros>) {
        let Some(queued_at) = queued_at else {
            return;
        };
        self.queue_wait_seconds.observe(seconds_since(queued_at));
        let mut waiting = self.dispatching.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.len() >= MAX_DISPATCHING {
            waiting.clear();
        }
        waiting.insert(task_id.to_owned(), queued_at);
    }

    /// A SpawnTask's acknowledgement (or refusal).
    pub fn spawn_answered(&self, task_id: &str, taken: bool) {
        let queued_at = self
            .dispatching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(task_id);
        if let (true, Some(queued_at)) = (taken, queued_at) {
            self.dispatch_seconds.observe(seconds_since(queued_at));
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn seconds_since(at: Micros) -> f64 {
    (now_micros() - at).max(0) as f64 / 1e6
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
