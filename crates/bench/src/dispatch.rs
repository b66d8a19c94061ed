//! Dispatch and cancel latency, and dispatch throughput.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::daemon::{self, BenchDaemon, Event, Policy};
use super::floor::{FloorClient, PingPong};
use super::harness::{Sut, Workspace};
use super::stats::{Percentiles, Row, Target, Value};
use super::{BenchResult, Ctx, progress};
use crate::pb;
use taskmesh_testkit::DbKind;

type Events = mpsc::UnboundedReceiver<Event>;

/// Reads events until `pick` accepts one; other events are skipped and
/// session errors reported.
pub async fn wait_for<T>(
    events: &mut Events,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> BenchResult<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let e = tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| "no answer from the server within 30 s")?
            .ok_or("the daemon's session ended")?;
        if let Some(v) = pick(&e) {
            return Ok(v);
        }
        if let Event::Error(m) = e {
            progress(format!("session error: {m}"));
        }
    }
}

fn spawned(task: &str) -> impl FnMut(&Event) -> Option<Instant> + '_ {
    move |e| match e {
        Event::Spawn { task_id, at } if task_id == task => Some(*at),
        _ => None,
    }
}

fn ended(task: &str) -> impl FnMut(&Event) -> Option<()> + '_ {
    move |e| match e {
        Event::Ack {
            task_id,
            ended: true,
            ..
        } if task_id == task => Some(()),
        _ => None,
    }
}

/// The floor of a pushed command: a bare bidi round trip plus one durable
/// commit, timed together.
pub struct CommandFloor {
    ping: PingPong,
}

impl CommandFloor {
    pub async fn open(ctx: &Ctx) -> BenchResult<CommandFloor> {
        let mut client = FloorClient::new(super::harness::channel(ctx.floor.addr).await?);
        Ok(CommandFloor {
            ping: PingPong::open(&mut client).await?,
        })
    }

    pub async fn sample(&mut self, ctx: &Ctx) -> BenchResult<Duration> {
        let t0 = Instant::now();
        self.ping.round_trip().await?;
        ctx.floor_db.commit().await?;
        Ok(t0.elapsed())
    }
}

/// One daemon with one slot, registered and in session.
async fn probe(
    sut: &Sut,
    ws: &Workspace,
    name: &str,
    policy: Policy,
) -> BenchResult<(BenchDaemon, Events)> {
    let mut admin = sut.daemons(ws).await?;
    let id = daemon::register(&mut admin, name, 1).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let d = BenchDaemon::open(
        super::harness::channel(sut.server.addr).await?,
        &ws.daemon,
        id,
        policy,
        tx,
    )
    .await?;
    Ok((d, rx))
}

/// StartTask → SpawnTask at the daemon, with `busy` other daemons each
/// running a task and reporting output meanwhile.
pub async fn dispatch_latency(ctx: &mut Ctx, busy: usize) -> BenchResult<Row> {
    let label = if busy == 0 { "idle" } else { "busy" };
    progress(format!("dispatch latency ({label})"));
    let ws = ctx.sut.workspace(&format!("dispatch-{label}")).await?;
    let background = if busy > 0 {
        Some(Busy::start(&ctx.sut, &ws, busy).await?)
    } else {
        None
    };
    let (d, mut events) = probe(&ctx.sut, &ws, "dispatch-probe", Policy::Complete).await?;
    let mut floor = CommandFloor::open(ctx).await?;
    let (mut value, mut floor_samples) = (Vec::new(), Vec::new());
    for _ in 0..ctx.params.latency_samples {
        let task = ctx.sut.create_task(&ws, "dispatch").await?;
        let t0 = Instant::now();
        ctx.sut.start_task(&task).await?;
        let at = wait_for(&mut events, spawned(&task)).await?;
        value.push(at - t0);
        wait_for(&mut events, ended(&task)).await?;
        floor_samples.push(floor.sample(ctx).await?);
    }
    d.close();
    let note = match background {
        Some(b) => {
            let sent = b.stop().await;
            format!(
                "{} samples; {busy} busy daemons reported {sent} output messages meanwhile",
                value.len()
            )
        }
        None => format!("{} samples", value.len()),
    };
    let target = match ctx.db {
        DbKind::Sqlite { .. } => Duration::from_millis(5),
        DbKind::Postgres { .. } => Duration::from_millis(10),
    };
    Ok(Row {
        figure: if busy == 0 {
            "dispatch latency, idle".into()
        } else {
            format!("dispatch latency, {busy} daemons busy")
        },
        value: Value::Latency(Percentiles::new(value)),
        floor: Value::Latency(Percentiles::new(floor_samples)),
        target: Some(Target::P99AtMost(target)),
        note,
    })
}

/// StopTask → InterruptTask at the daemon running the task.
pub async fn cancel_latency(ctx: &mut Ctx) -> BenchResult<Row> {
    progress("cancel latency");
    let ws = ctx.sut.workspace("cancel").await?;
    let (d, mut events) = probe(&ctx.sut, &ws, "cancel-probe", Policy::Run).await?;
    let mut floor = CommandFloor::open(ctx).await?;
    let (mut value, mut floor_samples) = (Vec::new(), Vec::new());
    for _ in 0..ctx.params.latency_samples {
        let task = ctx.sut.create_task(&ws, "cancel").await?;
        ctx.sut.start_task(&task).await?;
        wait_for(&mut events, spawned(&task)).await?;
        ctx.sut.wait_running(&task).await?;
        let t0 = Instant::now();
        ctx.sut
            .tasks
            .clone()
            .stop_task(pb::StopTaskRequest { id: task.clone() })
            .await?;
        let at = wait_for(&mut events, |e| match e {
            Event::Interrupt { task_id, at } if *task_id == task => Some(*at),
            _ => None,
        })
        .await?;
        value.push(at - t0);
        wait_for(&mut events, ended(&task)).await?;
        floor_samples.push(floor.sample(ctx).await?);
    }
    d.close();
    let target = match ctx.db {
        DbKind::Sqlite { .. } => Duration::from_millis(5),
        DbKind::Postgres { .. } => Duration::from_millis(10),
    };
    Ok(Row {
        figure: "cancel latency".into(),
        note: format!("{} samples", value.len()),
        value: Value::Latency(Percentiles::new(value)),
        floor: Value::Latency(Percentiles::new(floor_samples)),
        target: Some(Target::P99AtMost(target)),
    })
}

/// Daemons each running one task and reporting a little output, as agents
/// do, while another figure is measured.
struct Busy {
    stop: watch::Sender<bool>,
    loops: Vec<JoinHandle<usize>>,
}

/// Every busy daemon reports this many messages every BUSY_PERIOD.
const BUSY_BATCH: usize = 5;
const BUSY_PERIOD: Duration = Duration::from_millis(100);

impl Busy {
    async fn start(sut: &Sut, ws: &Workspace, n: usize) -> BenchResult<Busy> {
        let mut admin = sut.daemons(ws).await?;
        let mut daemons = Vec::new();
        for i in 0..n {
            let id = daemon::register(&mut admin, &format!("busy-{i}"), 1).await?;
            let (tx, rx) = mpsc::unbounded_channel();
            let d = BenchDaemon::open(
                super::harness::channel(sut.server.addr).await?,
                &ws.daemon,
                id,
                Policy::Run,
                tx,
            )
            .await?;
            daemons.push((d, rx));
        }
        for _ in 0..n {
            let task = sut.create_task(ws, "busy").await?;
            sut.start_task(&task).await?;
        }
        let (stop, stopped) = watch::channel(false);
        let mut loops = Vec::new();
        for (d, mut events) in daemons {
            let task = wait_for(&mut events, |e| match e {
                Event::Spawn { task_id, .. } => Some(task_id.clone()),
                _ => None,
            })
            .await?;
            let mut stopped = stopped.clone();
            loops.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(BUSY_PERIOD);
                let mut seq = 1;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if d.output(&task, daemon::messages(seq, BUSY_BATCH)).await.is_err() {
                                break;
                            }
                            seq += BUSY_BATCH as i64;
                        }
                        _ = events.recv() => {}
                        _ = stopped.changed() => break,
                    }
                }
                d.close();
                (seq - 1) as usize
            }));
        }
        Ok(Busy { stop, loops })
    }

    /// Stops the daemons; answers how many messages they reported.
    async fn stop(self) -> usize {
        let _ = self.stop.send(true);
        let mut sent = 0;
        for l in self.loops {
            sent += l.await.unwrap_or(0);
        }
        sent
    }
}

/// Tasks queued before any daemon connects, then `daemons` daemons (8 slots
/// each, completing every task at once) connect and drain the queue:
/// tasks delivered per second. Every SpawnTask is counted per task id.
/// Slots of each daemon in the throughput figure.
const SLOTS: usize = 8;

pub async fn throughput(ctx: &mut Ctx, daemons: usize) -> BenchResult<Row> {
    let n = ctx.params.throughput_tasks;
    progress(format!("dispatch throughput, {daemons} daemons, {n} tasks"));
    let ws = Arc::new(ctx.sut.workspace(&format!("throughput-{daemons}")).await?);
    let mut admin = ctx.sut.daemons(&ws).await?;
    let mut ids = Vec::new();
    for i in 0..daemons {
        ids.push(daemon::register(&mut admin, &format!("throughput-{i}"), SLOTS as i32).await?);
    }
    let sut = &ctx.sut;
    let queued: Vec<BenchResult<String>> = futures_util::stream::iter(0..n)
        .map(|_| {
            let ws = ws.clone();
            async move {
                let id = sut.create_task(&ws, "throughput").await?;
                sut.start_task(&id).await?;
                Ok(id)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for q in queued {
        q?;
    }
    let mut channels = Vec::new();
    for _ in 0..daemons {
        channels.push(super::harness::channel(ctx.sut.server.addr).await?);
    }
    let (tx, mut events) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    let opened = futures_util::future::join_all(
        channels
            .into_iter()
            .zip(ids)
            .map(|(ch, id)| BenchDaemon::open(ch, &ws.daemon, id, Policy::Complete, tx.clone())),
    )
    .await;
    let opened = opened.into_iter().collect::<BenchResult<Vec<_>>>()?;
    let mut spawns: HashMap<String, usize> = HashMap::new();
    while spawns.len() < n {
        let task = wait_for(&mut events, |e| match e {
            Event::Spawn { task_id, .. } => Some(task_id.clone()),
            _ => None,
        })
        .await?;
        *spawns.entry(task).or_default() += 1;
    }
    let elapsed = t0.elapsed();
    // A late duplicate would arrive within moments.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(e) = events.try_recv() {
        if let Event::Spawn { task_id, .. } = e {
            *spawns.entry(task_id).or_default() += 1;
        }
    }
    for d in opened {
        d.close();
    }
    let doubles: usize = spawns.values().map(|c| c - 1).sum();
    let (floor_rate, floor_doubles) = ctx.floor_db.claim_rate(n, daemons, SLOTS).await?;
    let check = |d: usize| {
        if d == 0 {
            "no double delivery".to_string()
        } else {
            format!("{d} DOUBLE DELIVERIES")
        }
    };
    Ok(Row {
        figure: format!("dispatch throughput, {daemons} daemons"),
        value: Value::Rate(n as f64 / elapsed.as_secs_f64(), "tasks/s"),
        floor: Value::Rate(floor_rate, "tasks/s"),
        target: Some(Target::RateAtLeast(25_000.0)),
        note: format!(
            "{n} tasks: {} (floor: raw claims of {SLOTS} a statement, {})",
            check(doubles),
            check(floor_doubles)
        ),
    })
}
