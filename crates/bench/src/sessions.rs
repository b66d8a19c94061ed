//! Daemon sessions at rest: heartbeat latency, and server memory per idle
//! session.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use super::daemon::{self, BenchDaemon, Policy};
use super::floor::{FloorClient, pb as floor_pb};
use super::harness::Sut;
use super::stats::{Percentiles, Row, Target, Value};
use super::{BenchResult, Ctx, progress};
use crate::pb;
use crate::pb::daemon_service_client::DaemonServiceClient;
use taskmesh_testkit::process::ServeProcess;

/// Heartbeats come from this many daemons, each on its own connection.
const HEARTBEAT_DAEMONS: usize = 10;

/// Unary Heartbeat calls from daemons in session, at a fixed rate whatever
/// the answers take (an open loop: a slow answer does not slow the beats).
pub async fn heartbeat(ctx: &mut Ctx) -> BenchResult<Row> {
    let (rate, secs) = (ctx.params.heartbeat_rate, ctx.params.heartbeat_secs);
    progress(format!("heartbeat latency at {rate}/s for {secs} s"));
    let ws = ctx.sut.workspace("heartbeat").await?;
    let mut admin = ctx.sut.daemons(&ws).await?;
    let (tx, _events) = mpsc::unbounded_channel();
    let mut beaters = Vec::new();
    let mut sessions = Vec::new();
    for i in 0..HEARTBEAT_DAEMONS {
        let id = daemon::register(&mut admin, &format!("heartbeat-{i}"), 1).await?;
        let channel = super::harness::channel(ctx.sut.server.addr).await?;
        let client = DaemonServiceClient::with_interceptor(channel.clone(), ws.daemon.clone());
        beaters.push((client, id.clone()));
        sessions.push(BenchDaemon::open(channel, &ws.daemon, id, Policy::Run, tx.clone()).await?);
    }
    let value = open_loop(rate, secs, |i| {
        let (mut client, id) = beaters[i % beaters.len()].clone();
        async move {
            client
                .heartbeat(pb::HeartbeatRequest {
                    daemon_id: id,
                    running_task_ids: Vec::new(),
                })
                .await
                .map(|_| ())
        }
    })
    .await?;
    for s in sessions {
        s.close();
    }
    let mut floor_clients = Vec::new();
    for _ in 0..HEARTBEAT_DAEMONS {
        floor_clients.push(FloorClient::new(
            super::harness::channel(ctx.floor.addr).await?,
        ));
    }
    let floor = open_loop(rate, secs, |i| {
        let mut client = floor_clients[i % floor_clients.len()].clone();
        async move {
            client
                .ping(floor_pb::PingRequest {
                    payload: vec![0; 40],
                })
                .await
                .map(|_| ())
        }
    })
    .await?;
    Ok(Row {
        figure: format!("heartbeat latency at {rate}/s"),
        note: format!(
            "{} beats from {HEARTBEAT_DAEMONS} daemons in session; floor: bare unary",
            value.len()
        ),
        value: Value::Latency(value),
        floor: Value::Latency(floor),
        target: Some(Target::P99AtMost(Duration::from_millis(2))),
    })
}

/// Starts `call(i)` `rate` times a second for `secs` seconds and times each.
async fn open_loop<F, Fut>(rate: usize, secs: u64, mut call: F) -> BenchResult<Percentiles>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    let total = rate * secs as usize;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate as u32);
    let mut set = JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let fut = call(i);
        set.spawn(async move {
            let t0 = Instant::now();
            fut.await.map(|_| t0.elapsed())
        });
    }
    let mut samples = Vec::with_capacity(total);
    while let Some(r) = set.join_next().await {
        samples.push(r??);
    }
    Ok(Percentiles::new(samples))
}

/// Sessions opened at once, each on its own connection.
const OPENING: usize = 64;

/// Server memory per idle daemon session: a fresh server's resident memory
/// before and after `n` daemons each open a session on their own
/// connection. The floor holds as many bare tonic streams, one per
/// connection, in a fresh floor server.
pub async fn idle_sessions(ctx: &mut Ctx, n: usize) -> BenchResult<Row> {
    progress(format!("idle sessions: {n}"));
    let sut = Sut::start(&ctx.db, ctx.server_log.as_ref()).await?;
    let ws = sut.workspace("idle").await?;
    let admin = sut.daemons(&ws).await?;
    let ids: Vec<BenchResult<String>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let mut admin = admin.clone();
            async move { daemon::register(&mut admin, &format!("idle-{i}"), 1).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let ids = ids.into_iter().collect::<BenchResult<Vec<_>>>()?;
    let before = settled_rss(&sut.server).await?;
    let (tx, _events) = mpsc::unbounded_channel();
    let (server, token) = (&sut.server, &ws.daemon);
    let opened: Vec<BenchResult<BenchDaemon>> = futures_util::stream::iter(ids)
        .map(|id| {
            let tx = tx.clone();
            async move {
                let channel = super::harness::channel(server.addr).await?;
                BenchDaemon::open(channel, token, id, Policy::Run, tx).await
            }
        })
        .buffer_unordered(OPENING)
        .collect()
        .await;
    let opened = opened.into_iter().collect::<BenchResult<Vec<_>>>()?;
    let after = settled_rss(&sut.server).await?;
    let per_session = after.saturating_sub(before) as f64 / n as f64;
    for d in opened {
        d.close();
    }
    drop(sut);

    let floor = super::harness::floor_server().await?;
    // Warm the floor up as the registrations warmed the server.
    FloorClient::new(super::harness::channel(floor.addr).await?)
        .ping(floor_pb::PingRequest::default())
        .await?;
    let floor_before = settled_rss(&floor).await?;
    let addr = floor.addr;
    let held: Vec<BenchResult<_>> = futures_util::stream::iter(0..n)
        .map(|_| async move {
            let mut client = FloorClient::new(super::harness::channel(addr).await?);
            let (up, rx) = mpsc::channel::<floor_pb::HoldRequest>(1);
            up.send(floor_pb::HoldRequest {}).await?;
            let mut down = client.hold(ReceiverStream::new(rx)).await?.into_inner();
            down.next().await.ok_or("the hold stream ended")??;
            Ok((up, down))
        })
        .buffer_unordered(OPENING)
        .collect()
        .await;
    let held = held.into_iter().collect::<BenchResult<Vec<_>>>()?;
    let floor_after = settled_rss(&floor).await?;
    drop(held);
    let per_stream = floor_after.saturating_sub(floor_before) as f64 / n as f64;
    Ok(Row {
        figure: format!("idle daemon sessions, {n}"),
        value: Value::Bytes(per_session, "per session"),
        floor: Value::Bytes(per_stream, "per stream"),
        target: Some(Target::BytesAtMost(40.0 * 1024.0)),
        note: format!(
            "server RSS {} → {} MB; floor {} → {} MB",
            before >> 20,
            after >> 20,
            floor_before >> 20,
            floor_after >> 20
        ),
    })
}

/// Resident memory once the process has been left alone for a moment.
async fn settled_rss(server: &ServeProcess) -> BenchResult<u64> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.rss_bytes()
}
