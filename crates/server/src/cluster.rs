//! Several `taskmesh serve` replicas on one PostgreSQL database.
//!
//! The database is the truth; what replicas tell each other is only *where
//! to look*. Each replica publishes small events with `pg_notify` on one
//! channel and LISTENs to it:
//! - `task`: a task changed. A replica with watchers of the task (or its
//!   workspace) reloads it and publishes it locally; a queued task is
//!   offered to the daemons connected here.
//! - `output`: a task's output grew to a seq. A replica whose watchers
//!   follow the task reads the new messages from the database.
//! - `command`: a daemon has new commands. The replica holding its session
//!   wakes its pump, which reads the outbox.
//!
//! Events are batched into one NOTIFY (under PostgreSQL's 8000-byte payload
//! limit) and a replica ignores its own. A lost listener connection may
//! miss events; after reconnecting, the replica wakes every local session,
//! offers its workspaces' queues again and refreshes every watched task.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;

use crate::domain::{Domain, PeerEvent};
use crate::model::{StoredEnum, TaskStatus};

const CHANNEL: &str = "taskmesh";
/// Stay well under PostgreSQL's 8000-byte NOTIFY payload limit.
const MAX_PAYLOAD: usize = 7000;
/// Events waiting to be published; beyond this they are dropped (and
/// logged): peers then catch up at their next event or resync.
const QUEUE: usize = 16_384;

/// One event as JSON, status by its stored name.
struct Wire;

impl Wire {
    fn to_json(event: &PeerEvent) -> Value {
        match event {
            PeerEvent::Task {
                id,
                workspace_id,
                status,
                deleted,
            } => {
                json!({"k": "task", "id": id, "ws": workspace_id, "s": status.as_str(), "d": deleted})
            }
            PeerEvent::Output {
                task_id,
                workspace_id,
                from,
                to,
            } => json!({"k": "output", "id": task_id, "ws": workspace_id, "from": from, "to": to}),
            PeerEvent::Command { daemon_id } => json!({"k": "command", "id": daemon_id}),
        }
    }

    fn from_json(v: &Value) -> Option<PeerEvent> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(String::from);
        let b = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let n = |k: &str| v.get(k).and_then(Value::as_i64);
        Some(match v.get("k")?.as_str()? {
            "task" => PeerEvent::Task {
                id: s("id")?,
                workspace_id: s("ws")?,
                status: TaskStatus::parse(&s("s")?)?,
                deleted: b("d"),
            },
            "output" => PeerEvent::Output {
                task_id: s("id")?,
                workspace_id: s("ws")?,
                from: n("from")?,
                to: n("to")?,
            },
            "command" => PeerEvent::Command {
                daemon_id: s("id")?,
            },
            _ => return None,
        })
    }
}

/// Packs events into payloads under the size limit, each tagged with the
/// sending replica.
fn payloads(replica: &str, events: &[PeerEvent]) -> Vec<String> {
    let mut out = Vec::new();
    let mut batch: Vec<Value> = Vec::new();
    let mut size = 0;
    for e in events {
        let v = Wire::to_json(e);
        let len = v.to_string().len() + 1;
        if !batch.is_empty() && size + len > MAX_PAYLOAD {
            out.push(json!({"r": replica, "e": std::mem::take(&mut batch)}).to_string());
            size = 0;
        }
        size += len;
        batch.push(v);
    }
    if !batch.is_empty() {
        out.push(json!({"r": replica, "e": batch}).to_string());
    }
    out
}

/// Decodes a payload; `None` when it is this replica's own or malformed.
fn decode(replica: &str, payload: &str) -> Option<Vec<PeerEvent>> {
    let v: Value = serde_json::from_str(payload).ok()?;
    if v.get("r")?.as_str()? == replica {
        return None;
    }
    Some(
        v.get("e")?
            .as_array()?
            .iter()
            .filter_map(Wire::from_json)
            .collect(),
    )
}

/// Starts the bridge for `domain` on the PostgreSQL database at `url`: the
/// listener connects first, so no event published after this returns is
/// missed. Answers the task to abort on shutdown.
pub async fn start(
    domain: Arc<Domain>,
    url: &str,
) -> Result<tokio::task::JoinHandle<()>, sqlx::Error> {
    let mut listener = PgListener::connect(url).await?;
    listener.listen(CHANNEL).await?;
    let replica = uuid::Uuid::new_v4().to_string();
    let (tx, rx) = mpsc::channel(QUEUE);
    domain.join_cluster(tx);
    tracing::info!(replica = %replica, "cluster: listening for peers on PostgreSQL");
    let publisher = tokio::spawn(publish(domain.clone(), replica.clone(), rx));
    Ok(tokio::spawn(async move {
        listen(domain, replica, listener).await;
        publisher.abort();
    }))
}

async fn publish(domain: Arc<Domain>, replica: String, mut rx: mpsc::Receiver<PeerEvent>) {
    let mut events = Vec::new();
    loop {
        if rx.recv_many(&mut events, 256).await == 0 {
            return;
        }
        for payload in payloads(&replica, &events) {
            if let Err(e) = domain.notify_peers(CHANNEL, &payload).await {
                tracing::warn!(error = %e, "cluster: could not notify peers");
            }
        }
        events.clear();
    }
}

async fn listen(domain: Arc<Domain>, replica: String, mut listener: PgListener) {
    let closed = domain.closed();
    tokio::pin!(closed);
    loop {
        let received = tokio::select! {
            _ = &mut closed => return,
            r = listener.recv() => r,
        };
        match received {
            Ok(n) => {
                for event in decode(&replica, n.payload()).unwrap_or_default() {
                    if let Err(e) = domain.apply_peer_event(event).await {
                        tracing::warn!(error = %e, "cluster: could not apply a peer's event");
                    }
                }
            }
            Err(e) => {
                // PgListener reconnects on the next recv; what peers said
                // meanwhile is lost, so look at everything again.
                tracing::warn!(error = %e, "cluster: listener connection lost; resyncing");
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Err(e) = domain.resync().await {
                    tracing::warn!(error = %e, "cluster: resync failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(i: usize) -> PeerEvent {
        PeerEvent::Task {
            id: format!("{i:036}"),
            workspace_id: "w".repeat(36),
            status: TaskStatus::Queued,
            deleted: i.is_multiple_of(2),
        }
    }

    #[test]
    fn events_round_trip_and_own_payloads_are_ignored() {
        let events = vec![
            task(1),
            PeerEvent::Output {
                task_id: "t".into(),
                workspace_id: "w".into(),
                from: 3,
                to: 9,
            },
            PeerEvent::Command {
                daemon_id: "d".into(),
            },
        ];
        let p = payloads("a", &events);
        assert_eq!(p.len(), 1);
        assert_eq!(decode("b", &p[0]).unwrap(), events);
        assert_eq!(decode("a", &p[0]), None);
        assert_eq!(decode("b", "not json"), None);
    }

    #[test]
    fn payloads_stay_under_the_limit() {
        let events: Vec<PeerEvent> = (0..500).map(task).collect();
        let p = payloads("a", &events);
        assert!(p.len() > 1);
        assert!(p.iter().all(|p| p.len() < 8000));
        let back: Vec<PeerEvent> = p.iter().flat_map(|p| decode("b", p).unwrap()).collect();
        assert_eq!(back, events);
    }
}
