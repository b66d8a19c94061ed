//! Properties through real gRPC on SQLite and PostgreSQL, over generated
//! histories (proptest shrinks a failure to its shortest history):
//!
//! - output: any interleaving of batches in any order, resends, unary and
//!   Session reports and reconnects stores each seq exactly once (the first
//!   copy wins) and acknowledges exactly the gapless prefix;
//! - the task state machine: any sequence of user, daemon and liveness
//!   actions writes only transitions of the table, in a chain, never runs
//!   an attempt twice, refuses every report naming a stale attempt, and
//!   never answers INTERNAL.

use taskmesh_testkit as common;
use taskmesh_testkit::both_backends;

use std::collections::BTreeMap;

use common::daemon::*;
use common::{Backend, start_server};
use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use taskmesh_server::domain::transition::TRANSITIONS;
use taskmesh_server::model::TaskStatus as Status;
use taskmesh_server::pb::session_response::Message as Down;
use taskmesh_server::pb::{self, TaskStatus};
use tonic::Code;

/// Runs `check` over generated cases on the test's runtime.
fn check_all<S: Strategy>(
    cases: u32,
    strategy: S,
    check: impl AsyncFn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        runner
            .run(&strategy, |value| handle.block_on(check(value)))
            .unwrap()
    });
}

#[derive(Debug, Clone)]
enum Report {
    Session(Vec<i64>),
    Unary(Vec<i64>),
    Reconnect,
}

fn histories() -> impl Strategy<Value = (i64, Vec<Report>)> {
    (1i64..=24).prop_flat_map(|n| {
        let batch = || {
            btree_set(1..=n, 1..=6)
                .prop_map(|s| s.into_iter().collect::<Vec<_>>())
                .prop_shuffle()
        };
        let report = prop_oneof![
            3 => batch().prop_map(Report::Session),
            2 => batch().prop_map(Report::Unary),
            1 => Just(Report::Reconnect),
        ];
        (Just(n), vec(report, 0..16))
    })
}

/// Sends a batch on the Session and answers its ack, answering what else
/// arrives first (a redelivered SpawnTask, the StartedAck).
async fn session_ack(
    session: &mut Session,
    task_id: &str,
    batch: Vec<pb::TaskMessageInput>,
) -> Result<i64, TestCaseError> {
    let mut down = session.report(task_id, batch).await;
    loop {
        match down {
            Down::OutputAck(a) if a.task_id == task_id => return Ok(a.acked_seq),
            Down::Command(c) => session.ack(&c.id).await,
            Down::StartedAck(_) => {}
            other => return Err(TestCaseError::fail(format!("answered {other:?}"))),
        }
        down = session.next().await;
    }
}

async fn output_is_stored_exactly_once(backend: Backend) {
    let s = start_server(backend).await;
    check_all(48, histories(), async |(n, history)| {
        let (mut dc, daemon_id) = connect_daemon(&s, &uuid::Uuid::new_v4().to_string(), 1).await;
        let mut session = Session::open(&mut dc, &daemon_id, vec![]).await;
        let task = session.run_task(&s, "marks").await;

        // The model: which report first carried each seq.
        let mut first: BTreeMap<i64, usize> = BTreeMap::new();
        let mut acked = 0;
        let final_batch = Report::Session((1..=n).collect());
        for (i, report) in history.into_iter().chain([final_batch]).enumerate() {
            let batch = |seqs: &[i64]| {
                seqs.iter()
                    .map(|&seq| stdout(seq, &format!("{seq} from report {i}")))
                    .collect::<Vec<_>>()
            };
            let got = match report {
                Report::Reconnect => {
                    drop(session);
                    session = Session::open(&mut dc, &daemon_id, vec![task.id.clone()]).await;
                    continue;
                }
                Report::Session(seqs) => {
                    let got = session_ack(&mut session, &task.id, batch(&seqs)).await?;
                    (seqs, got)
                }
                Report::Unary(seqs) => {
                    let got = dc
                        .report_task_messages(pb::ReportTaskMessagesRequest {
                            task_id: task.id.clone(),
                            messages: batch(&seqs),
                            daemon_id: daemon_id.clone(),
                            attempt: 1,
                        })
                        .await
                        .map_err(|e| TestCaseError::fail(format!("{e:?}")))?
                        .into_inner()
                        .acked_seq;
                    (seqs, got)
                }
            };
            let (seqs, got) = got;
            for seq in seqs {
                first.entry(seq).or_insert(i);
            }
            let prefix = (1..=n).take_while(|s| first.contains_key(s)).last();
            prop_assert_eq!(got, prefix.unwrap_or(0), "report {}", i);
            prop_assert!(got >= acked, "the ack went back from {} to {}", acked, got);
            acked = got;
        }
        let stored = stored_messages(&s, &task.id).await;
        let want: Vec<_> = first
            .iter()
            .map(|(seq, i)| (*seq, format!("{seq} from report {i}")))
            .collect();
        let got: Vec<_> = stored.into_iter().map(|m| (m.seq, m.content)).collect();
        prop_assert_eq!(got, want);
        Ok(())
    });
    s.stop().await;
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Start,
    Stop,
    Continue,
    Claim,
    Started { stale: bool },
    Output { stale: bool },
    Complete { stale: bool },
    Fail { stale: bool },
    Sweep,
}

fn actions() -> impl Strategy<Value = Vec<Action>> {
    let stale = || prop::bool::weighted(0.2);
    vec(
        prop_oneof![
            3 => Just(Action::Start),
            1 => Just(Action::Stop),
            1 => Just(Action::Continue),
            3 => Just(Action::Claim),
            2 => stale().prop_map(|stale| Action::Started { stale }),
            2 => stale().prop_map(|stale| Action::Output { stale }),
            2 => stale().prop_map(|stale| Action::Complete { stale }),
            1 => stale().prop_map(|stale| Action::Fail { stale }),
            1 => Just(Action::Sweep),
        ],
        1..24,
    )
}

fn pb_status(s: Status) -> TaskStatus {
    TaskStatus::from_str_name(&format!("TASK_STATUS_{}", s.to_string().to_uppercase()))
        .unwrap_or_else(|| panic!("{s} has a wire name"))
}

async fn transitions_follow_the_table(backend: Backend) {
    let s = start_server(backend).await;
    let table: Vec<(TaskStatus, TaskStatus)> = TRANSITIONS
        .iter()
        .map(|(from, to)| (pb_status(*from), pb_status(*to)))
        .collect();
    check_all(48, actions(), async |actions| {
        let (mut dc, daemon_id) = connect_daemon(&s, &uuid::Uuid::new_v4().to_string(), 4).await;
        let task = new_task(&s, "states").await;
        let mut tasks = s.tasks().await;
        let mut next_seq = BTreeMap::<i32, i64>::new();
        for (i, action) in actions.iter().enumerate() {
            let current = get(&s, &task.id).await;
            let attempt = |stale: bool| current.attempt + if stale { 1 } else { 0 };
            let result: Result<(), tonic::Status> = match *action {
                Action::Start => tasks
                    .start_task(pb::StartTaskRequest {
                        id: task.id.clone(),
                        daemon_id: String::new(),
                    })
                    .await
                    .map(drop),
                Action::Stop => tasks
                    .stop_task(pb::StopTaskRequest {
                        id: task.id.clone(),
                    })
                    .await
                    .map(drop),
                Action::Continue => tasks
                    .continue_task(pb::ContinueTaskRequest {
                        id: task.id.clone(),
                        prompt: "go on".into(),
                        daemon_id: String::new(),
                    })
                    .await
                    .map(drop),
                Action::Claim => dc
                    .claim_task(pb::ClaimTaskRequest {
                        daemon_id: daemon_id.clone(),
                    })
                    .await
                    .map(drop),
                Action::Started { stale } => dc
                    .report_task_started(pb::ReportTaskStartedRequest {
                        task_id: task.id.clone(),
                        attempt: attempt(stale),
                        pid: 1,
                        daemon_id: daemon_id.clone(),
                    })
                    .await
                    .map(drop),
                Action::Output { stale } => {
                    let a = attempt(stale);
                    let seq = next_seq.get(&a).copied().unwrap_or(current.last_seq + 1);
                    let r = dc
                        .report_task_messages(pb::ReportTaskMessagesRequest {
                            task_id: task.id.clone(),
                            messages: vec![stdout(seq, "out")],
                            daemon_id: daemon_id.clone(),
                            attempt: a,
                        })
                        .await;
                    if r.is_ok() {
                        next_seq.insert(a, seq + 1);
                    }
                    r.map(drop)
                }
                Action::Complete { stale } => dc
                    .complete_task(pb::CompleteTaskRequest {
                        task_id: task.id.clone(),
                        daemon_id: daemon_id.clone(),
                        attempt: attempt(stale),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                Action::Fail { stale } => dc
                    .fail_task(pb::FailTaskRequest {
                        task_id: task.id.clone(),
                        reason: "exit 1".into(),
                        exit_code: 1,
                        daemon_id: daemon_id.clone(),
                        attempt: attempt(stale),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                Action::Sweep => {
                    s.domain.sweep().await.unwrap();
                    Ok(())
                }
            };
            if let Err(e) = &result {
                prop_assert!(
                    matches!(
                        e.code(),
                        Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument
                    ),
                    "action {} {:?}: {:?}",
                    i,
                    action,
                    e
                );
            }
            let stale = matches!(
                action,
                Action::Started { stale: true }
                    | Action::Output { stale: true }
                    | Action::Complete { stale: true }
                    | Action::Fail { stale: true }
            );
            prop_assert!(
                !(stale && result.is_ok()),
                "action {} {:?} names attempt {} of a task at attempt {}, and was accepted",
                i,
                action,
                current.attempt + 1,
                current.attempt
            );
        }

        let events = events(&s, &task.id).await;
        let mut status = TaskStatus::Unspecified;
        let mut attempt = 0;
        let mut runs = BTreeMap::<i32, usize>::new();
        for e in &events {
            let step = (e.from_status(), e.to_status());
            prop_assert_eq!(step.0, status, "events chain: {:?}", events);
            prop_assert!(
                status == TaskStatus::Unspecified || table.contains(&step),
                "{:?} is not in the table",
                step
            );
            prop_assert!(e.attempt >= attempt, "attempts go back: {:?}", events);
            if step == (TaskStatus::Dispatched, TaskStatus::Running) {
                *runs.entry(e.attempt).or_default() += 1;
            }
            status = step.1;
            attempt = e.attempt;
        }
        prop_assert!(
            runs.values().all(|n| *n <= 1),
            "an attempt started twice: {:?}",
            events
        );
        prop_assert_eq!(get(&s, &task.id).await.status(), status);
        // Leave nothing queued for the next case's daemon to claim.
        tasks
            .delete_task(pb::DeleteTaskRequest {
                id: task.id.clone(),
            })
            .await
            .unwrap();
        Ok(())
    });
    s.stop().await;
}

both_backends!(output_is_stored_exactly_once, transitions_follow_the_table);
