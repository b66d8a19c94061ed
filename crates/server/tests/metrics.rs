//! `/metrics`, scraped over HTTP and read by a Prometheus text parser, on
//! SQLite and PostgreSQL: every family is there, and the values move as a
//! task is dispatched, prints and completes. `serve_metrics` serves them
//! on a port of their own (`serve --metrics-listen`).

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use common::daemon::*;
use common::{Backend, start_server};
use taskmesh_server::pb;
use taskmesh_server::pb::session_request::Message as Up;
use tonic::Code;

/// The samples of a scrape: metric name and its labels → value.
struct Scraped(Vec<prometheus_parse::Sample>);

impl Scraped {
    async fn from(addr: std::net::SocketAddr) -> Scraped {
        let (headers, body) = common::http::get(addr, "/metrics").await;
        assert!(headers.starts_with("http/1.1 200"), "{headers}");
        assert!(
            headers.contains("application/openmetrics-text"),
            "{headers}"
        );
        let text = String::from_utf8(body).expect("UTF-8");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        Scraped(
            prometheus_parse::Scrape::parse(lines)
                .expect("parses")
                .samples,
        )
    }

    /// The value of `metric` with (at least) these labels; 0 when absent.
    fn value(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|s| s.metric == metric)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.last().map_or(0.0, |b| b.count)
                }
                prometheus_parse::Value::Summary(_) => 0.0,
            })
            .sum()
    }

    fn has(&self, metric: &str) -> bool {
        self.0.iter().any(|s| s.metric == metric)
    }
}

async fn the_families_are_there_and_move(backend: Backend) {
    let s = start_server(backend).await;
    let (mut d, id) = connect_daemon(&s, "metered", 1).await;
    let mut session = Session::open(&mut d, &id, vec![]).await;
    let before = Scraped::from(s.addr).await;

    let task = new_task(&s, "metered").await;
    let mut tasks = s.tasks().await;
    tasks
        .start_task(pb::StartTaskRequest {
            id: task.id.clone(),
            daemon_id: String::new(),
        })
        .await
        .unwrap();
    let cmd = session.command().await;
    session.ack(&cmd.id).await;
    session.started(&task.id, 1).await;
    session
        .output(&task.id, 1..=3, |n| format!("line {n}"))
        .await;
    session
        .send(Up::Completed(pb::CompleteTaskRequest {
            task_id: task.id.clone(),
            ..Default::default()
        }))
        .await;
    session.next().await;
    let missing = tasks
        .get_task(pb::GetTaskRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let after = Scraped::from(s.addr).await;

    for family in [
        "taskmesh_rpcs_total",
        "taskmesh_rpc_duration_seconds",
        "taskmesh_dispatch_duration_seconds",
        "taskmesh_queue_wait_seconds",
        "taskmesh_output_messages_total",
        "taskmesh_output_bytes_total",
        "taskmesh_liveness_sweeps_total",
        "taskmesh_retention_messages_deleted_total",
        "taskmesh_retention_tasks_deleted_total",
        "taskmesh_sessions",
        "taskmesh_watchers",
        "taskmesh_tasks",
        "taskmesh_daemons",
        "taskmesh_outbox_pending_commands",
        "taskmesh_outbox_oldest_command_age_seconds",
        "taskmesh_approvals_pending",
    ] {
        assert!(after.has(family), "no {family}");
    }
    // The Grafana dashboard in the repository asks only for these.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../deploy/grafana-dashboard.json"))
            .expect("the dashboard is JSON");
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("an expression");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("taskmesh_") {
                    let family = format!("taskmesh_{}", name.trim_end_matches("_bucket"));
                    assert!(
                        after.has(&family),
                        "the dashboard asks for {family}: {expr}"
                    );
                    asked += 1;
                }
            }
        }
    }
    assert!(asked >= 15, "{asked}");
    let grew = |metric: &str, labels: &[(&str, &str)]| {
        after.value(metric, labels) - before.value(metric, labels)
    };
    // Counters are the process's; other tests in it may add to them.
    assert!(grew("taskmesh_output_messages_total", &[]) >= 3.0);
    assert!(grew("taskmesh_output_bytes_total", &[]) >= 18.0);
    assert!(grew("taskmesh_dispatch_duration_seconds", &[]) >= 1.0);
    assert!(grew("taskmesh_queue_wait_seconds", &[]) >= 1.0);
    let not_found = [
        ("method", "taskmesh.v1.TaskService/GetTask"),
        ("code", "NotFound"),
    ];
    assert!(grew("taskmesh_rpcs_total", &not_found) >= 1.0);
    // What the database says is this test's own (a fresh database).
    let completed = [("status", "completed"), ("runtime", "shell")];
    assert_eq!(after.value("taskmesh_tasks", &completed), 1.0);
    assert_eq!(after.value("taskmesh_daemons", &[("state", "online")]), 1.0);
    assert!(after.value("taskmesh_sessions", &[]) >= 1.0);
    s.stop().await;
}

/// With `--metrics-listen`, the metrics have a port of their own.
async fn metrics_on_their_own_port(backend: Backend) {
    let s = start_server(backend).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(taskmesh_server::server::serve_metrics(
        listener,
        s.domain.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let scraped = Scraped::from(addr).await;
    assert!(scraped.has("taskmesh_tasks") || scraped.has("taskmesh_sessions"));
    let (headers, _) = common::http::get(addr, "/").await;
    assert!(
        headers.starts_with("http/1.1 404"),
        "only /metrics there: {headers}"
    );
    let _ = stop.send(());
    served.await.unwrap().unwrap();
    s.stop().await;
}

both_backends!(the_families_are_there_and_move, metrics_on_their_own_port);
