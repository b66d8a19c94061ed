//! Output: ingest rate, and fan-out latency to WatchTask watchers.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;

use super::daemon::{self, BenchDaemon, Event, Policy};
use super::dispatch::wait_for;
use super::floor::{FloorClient, pb as floor_pb};
use super::harness::{Sut, Workspace};
use super::stats::{Percentiles, Row, Target, Value};
use super::{BenchResult, Ctx, progress, wait_until};
use crate::pb;
use crate::pb::task_service_client::TaskServiceClient;
use crate::pb::watch_task_response::Event as Watched;

/// A daemon (named `name`) in session with one task running on it.
async fn running_task(
    sut: &Sut,
    ws: &Workspace,
    name: &str,
) -> BenchResult<(BenchDaemon, mpsc::UnboundedReceiver<Event>, String)> {
    let mut admin = sut.daemons(ws).await?;
    let id = daemon::register(&mut admin, name, 1).await?;
    let (tx, mut events) = mpsc::unbounded_channel();
    let d = BenchDaemon::open(
        super::harness::channel(sut.server.addr).await?,
        &ws.daemon,
        id,
        Policy::Run,
        tx,
    )
    .await?;
    let task = sut.create_task(ws, &ws.name).await?;
    sut.start_task(&task).await?;
    wait_for(&mut events, |e| match e {
        Event::Spawn { task_id, .. } if *task_id == task => Some(()),
        _ => None,
    })
    .await?;
    sut.wait_running(&task).await?;
    Ok((d, events, task))
}

/// Batches in flight at once: a daemon does not wait for each ack before
/// sending the next batch.
const INGEST_WINDOW: usize = 16;

/// `total` messages of ~100 bytes in batches of `batch` on the session, until
/// the last is acknowledged: messages stored and acknowledged per second.
pub async fn ingest(ctx: &mut Ctx, batch: usize, total: usize) -> BenchResult<Row> {
    progress(format!(
        "output ingest, batches of {batch}, {total} messages"
    ));
    let ws = ctx.sut.workspace(&format!("ingest-{batch}")).await?;
    let (d, mut events, task) = running_task(&ctx.sut, &ws, &format!("{}-probe", ws.name)).await?;
    let t0 = Instant::now();
    let (mut sent, mut acked) = (0usize, 0usize);
    while acked < total {
        while sent < total && sent - acked < INGEST_WINDOW * batch {
            let n = batch.min(total - sent);
            d.output(&task, daemon::messages(sent as i64 + 1, n))
                .await?;
            sent += n;
        }
        let seq = wait_for(&mut events, |e| match e {
            Event::Ack {
                task_id, acked_seq, ..
            } if *task_id == task => Some(*acked_seq),
            _ => None,
        })
        .await?;
        acked = acked.max(seq as usize);
    }
    let rate = total as f64 / t0.elapsed().as_secs_f64();
    d.close();
    let content = daemon::messages(1, 1).remove(0).content;
    let floor = ctx.floor_db.insert_rate(total, batch, &content).await?;
    Ok(Row {
        figure: format!("output ingest, batches of {batch}"),
        value: Value::Rate(rate, "msg/s"),
        floor: Value::Rate(floor, "rows/s"),
        target: Some(Target::FloorShareAtLeast(0.5)),
        note: format!(
            "{total} messages of {} bytes; floor: raw INSERT of {batch} rows per commit",
            content.len()
        ),
    })
}

/// Batches each daemon keeps unacknowledged in [`ingest_many`].
const MANY_WINDOW: usize = 4;

/// `daemons` daemons at once, each with a task printing line by line: every
/// message its own batch, up to [`MANY_WINDOW`] unacknowledged per daemon,
/// `total` messages in all. Two rows: messages stored and acknowledged per
/// second across them all (floor: raw INSERTs of `daemons` rows per commit,
/// what perfect grouping would cost), and each batch's time from sent to
/// acknowledged (floor: a bare round trip plus one durable commit).
pub async fn ingest_many(ctx: &mut Ctx, daemons: usize, total: usize) -> BenchResult<Vec<Row>> {
    progress(format!(
        "output ingest, {daemons} daemons, batches of 1, {total} messages"
    ));
    let ws = ctx
        .sut
        .workspace(&format!("ingest-{daemons}-daemons"))
        .await?;
    let mut running = Vec::with_capacity(daemons);
    for i in 0..daemons {
        running.push(running_task(&ctx.sut, &ws, &format!("{}-{i}", ws.name)).await?);
    }
    let per = total / daemons;
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for (d, mut events, task) in running {
        set.spawn(async move {
            let mut waiting: VecDeque<(i64, Instant)> = VecDeque::with_capacity(MANY_WINDOW);
            let mut latencies = Vec::with_capacity(per);
            let (mut sent, mut acked) = (0usize, 0usize);
            while acked < per {
                while sent < per && sent - acked < MANY_WINDOW {
                    sent += 1;
                    waiting.push_back((sent as i64, Instant::now()));
                    d.output(&task, daemon::messages(sent as i64, 1)).await?;
                }
                let (seq, at) = wait_for(&mut events, |e| match e {
                    Event::Ack {
                        task_id,
                        acked_seq,
                        at,
                        ..
                    } if *task_id == task => Some((*acked_seq, *at)),
                    _ => None,
                })
                .await?;
                while let Some((_, sent_at)) = waiting.front().filter(|(s, _)| *s <= seq) {
                    latencies.push(at.saturating_duration_since(*sent_at));
                    waiting.pop_front();
                }
                acked = acked.max(seq as usize);
            }
            d.close();
            BenchResult::Ok(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(per * daemons);
    while let Some(done) = set.join_next().await {
        latencies.extend(done??);
    }
    let rate = latencies.len() as f64 / t0.elapsed().as_secs_f64();
    let content = daemon::messages(1, 1).remove(0).content;
    let floor_rate = ctx
        .floor_db
        .insert_rate(latencies.len(), daemons, &content)
        .await?;
    let mut floor = super::dispatch::CommandFloor::open(ctx).await?;
    let mut floor_samples = Vec::with_capacity(ctx.params.latency_samples);
    for _ in 0..ctx.params.latency_samples {
        floor_samples.push(floor.sample(ctx).await?);
    }
    let n = latencies.len();
    Ok(vec![
        Row {
            figure: format!("output ingest, {daemons} daemons, batches of 1"),
            value: Value::Rate(rate, "msg/s"),
            floor: Value::Rate(floor_rate, "rows/s"),
            target: Some(Target::RateAtLeast(50_000.0)),
            note: format!(
                "{n} messages, up to {MANY_WINDOW} unacknowledged per daemon; \
                 floor: raw INSERT of {daemons} rows per commit"
            ),
        },
        Row {
            figure: format!("output ack, {daemons} daemons, batches of 1"),
            value: Value::Latency(Percentiles::new(latencies)),
            floor: Value::Latency(Percentiles::new(floor_samples)),
            target: Some(Target::P99AtMost(Duration::from_millis(5))),
            note: format!(
                "{n} batches, sent → OutputAck; floor: bare round trip + one durable commit"
            ),
        },
    ])
}

/// A task with `n` messages stored (sent in batches of 1,000), then one
/// WatchTask from the start until its last message arrives: messages
/// caught up per second.
pub async fn catch_up(ctx: &mut Ctx, n: usize) -> BenchResult<(String, Value)> {
    progress(format!("WatchTask catch-up of {n} messages"));
    let ws = ctx.sut.workspace("catch-up").await?;
    let (d, mut events, task) = running_task(&ctx.sut, &ws, &format!("{}-probe", ws.name)).await?;
    let mut sent = 0;
    while sent < n {
        let k = 1000.min(n - sent);
        d.output(&task, daemon::messages(sent as i64 + 1, k))
            .await?;
        sent += k;
        wait_for(&mut events, |e| match e {
            Event::Ack {
                task_id, acked_seq, ..
            } if *task_id == task && *acked_seq as usize >= sent => Some(()),
            _ => None,
        })
        .await?;
    }
    let mut client = TaskServiceClient::with_interceptor(
        super::harness::channel(ctx.sut.server.addr).await?,
        ctx.sut.user.clone(),
    );
    let t0 = Instant::now();
    let mut stream = client
        .watch_task(pb::WatchTaskRequest {
            task_id: task.clone(),
            since_seq: 0,
            follow: false,
        })
        .await?
        .into_inner();
    let mut last = 0;
    while (last as usize) < n {
        match stream.next().await {
            Some(update) => {
                if let Some(Watched::Message(m)) = update?.event {
                    last = m.seq;
                }
            }
            None => return Err(format!("the watch ended at seq {last} of {n}").into()),
        }
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    d.close();
    Ok((
        format!("WatchTask catch-up of {n} messages"),
        Value::Rate(rate, "msg/s"),
    ))
}

/// Watchers share an HTTP/2 connection in groups of this many.
const WATCHERS_PER_CONNECTION: usize = 10;

fn spacing(watchers: usize) -> Duration {
    // Room for one message to reach every watcher before the next.
    Duration::from_millis(if watchers > 100 { 50 } else { 10 })
}

/// Latency from the daemon sending a message to each of `watchers`
/// WatchTask streams receiving it.
pub async fn fanout(ctx: &mut Ctx, watchers: usize) -> BenchResult<Row> {
    let k = ctx.params.fanout_messages;
    progress(format!("fan-out to {watchers} watchers, {k} messages"));
    let ws = ctx.sut.workspace(&format!("fanout-{watchers}")).await?;
    let (d, _events, task) = running_task(&ctx.sut, &ws, &format!("{}-probe", ws.name)).await?;
    let ready = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    let mut channel = None;
    for i in 0..watchers {
        if i % WATCHERS_PER_CONNECTION == 0 {
            channel = Some(super::harness::channel(ctx.sut.server.addr).await?);
        }
        let mut client = TaskServiceClient::with_interceptor(
            channel.clone().ok_or("no channel")?,
            ctx.sut.user.clone(),
        );
        let (task, ready) = (task.clone(), ready.clone());
        set.spawn(async move {
            let mut stream = client
                .watch_task(pb::WatchTaskRequest {
                    task_id: task,
                    since_seq: 0,
                    follow: false,
                })
                .await?
                .into_inner();
            let (mut got, mut counted) = (Vec::with_capacity(k), false);
            while let Some(update) = stream.next().await {
                match update?.event {
                    Some(Watched::Task(_)) if !counted => {
                        counted = true;
                        ready.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Watched::Message(m)) => {
                        got.push((m.seq, Instant::now()));
                        if m.seq as usize >= k {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            Ok::<_, super::BenchError>(got)
        });
    }
    if !wait_until(Duration::from_secs(60), || {
        ready.load(Ordering::Relaxed) >= watchers
    })
    .await
    {
        return Err("watchers did not all start within 60 s".into());
    }
    // Indexed by seq; seq 0 is never sent.
    let mut sent_at = vec![Instant::now()];
    for seq in 1..=k {
        sent_at.push(Instant::now());
        d.output(&task, daemon::messages(seq as i64, 1)).await?;
        tokio::time::sleep(spacing(watchers)).await;
    }
    let mut samples = Vec::with_capacity(watchers * k);
    let received = collect(&mut set, &sent_at, &mut samples).await?;
    d.close();
    let floor = fanout_floor(ctx, watchers, k).await?;
    let target = match watchers {
        100 => Some(Target::P99AtMost(Duration::from_millis(5))),
        1000 => Some(Target::P99AtMost(Duration::from_millis(50))),
        _ => None,
    };
    Ok(Row {
        figure: format!("fan-out latency, {watchers} watchers"),
        value: Value::Latency(Percentiles::new(samples)),
        floor: Value::Latency(floor),
        target,
        note: format!(
            "{k} messages, {} ms apart; {received} of {} deliveries{}",
            spacing(watchers).as_millis(),
            watchers * k,
            if received == watchers * k {
                ""
            } else {
                " (MISSED SOME)"
            }
        ),
    })
}

/// Latencies of every delivery the watchers saw; answers how many.
async fn collect(
    set: &mut JoinSet<BenchResult<Vec<(i64, Instant)>>>,
    sent_at: &[Instant],
    samples: &mut Vec<Duration>,
) -> BenchResult<usize> {
    let mut received = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(done)) = tokio::time::timeout_at(deadline, set.join_next()).await {
        for (seq, at) in done?? {
            if let Some(sent) = sent_at.get(seq as usize) {
                samples.push(at.saturating_duration_since(*sent));
                received += 1;
            }
        }
    }
    set.abort_all();
    Ok(received)
}

/// The same fan-out through a bare tokio broadcast behind a tonic server
/// stream, with the same connections and spacing.
async fn fanout_floor(ctx: &Ctx, watchers: usize, k: usize) -> BenchResult<Percentiles> {
    let mut set = JoinSet::new();
    let mut channel = None;
    for i in 0..watchers {
        if i % WATCHERS_PER_CONNECTION == 0 {
            channel = Some(super::harness::channel(ctx.floor.addr).await?);
        }
        let mut client = FloorClient::new(channel.clone().ok_or("no channel")?);
        let mut stream = client
            .subscribe(floor_pb::SubscribeRequest {})
            .await?
            .into_inner();
        set.spawn(async move {
            let mut got = Vec::with_capacity(k);
            while let Some(m) = stream.next().await {
                let m = m?;
                got.push((m.seq, Instant::now()));
                if m.seq as usize >= k {
                    break;
                }
            }
            Ok::<_, super::BenchError>(got)
        });
    }
    let mut publisher = FloorClient::new(super::harness::channel(ctx.floor.addr).await?);
    let payload = daemon::messages(1, 1).remove(0).content.into_bytes();
    // Indexed by seq; seq 0 is never sent.
    let mut sent_at = vec![Instant::now()];
    for seq in 1..=k {
        sent_at.push(Instant::now());
        publisher
            .publish(floor_pb::PublishRequest {
                seq: seq as i64,
                payload: payload.clone(),
            })
            .await?;
        tokio::time::sleep(spacing(watchers)).await;
    }
    let mut samples = Vec::new();
    collect(&mut set, &sent_at, &mut samples).await?;
    Ok(Percentiles::new(samples))
}
