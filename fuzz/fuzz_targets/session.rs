//! Any sequence of frames on a daemon's Session, after it opened and got
//! its SpawnTask. The input is frames of [u16 length][protobuf]; a frame
//! that decodes as a SessionRequest is sent, with a task id or command id
//! of one byte or less standing for the task it was given (so the fuzzer
//! reaches past NOT_FOUND). Every SessionError and the stream's end name
//! the daemon's mistake, never the server's; nothing panics.
#![no_main]

mod world;

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use taskmesh_server::pb::session_request::Message as Up;
use taskmesh_server::pb::session_response::Message as Down;
use taskmesh_server::pb::{self, TaskMessageInput};
use taskmesh_testkit::daemon::{Session, daemon_client, new_task, start, try_register};
use tokio_stream::StreamExt;

/// The frames of `data` that decode.
fn frames(mut data: &[u8]) -> Vec<pb::SessionRequest> {
    let mut out = Vec::new();
    while let [a, b, rest @ ..] = data {
        let len = usize::from(u16::from_le_bytes([*a, *b])).min(rest.len());
        let (frame, tail) = rest.split_at(len);
        if let Ok(m) = pb::SessionRequest::decode(frame) {
            out.push(m);
        }
        data = tail;
    }
    out
}

/// Points short ids at the run's task, command and daemon.
fn aim(m: &mut pb::SessionRequest, task: &str, command: &str, daemon: &str) {
    let fix = |id: &mut String, to: &str| {
        if id.len() <= 1 {
            *id = to.to_string();
        }
    };
    match &mut m.message {
        Some(Up::Open(o)) => fix(&mut o.daemon_id, daemon),
        Some(Up::Heartbeat(h)) => fix(&mut h.daemon_id, daemon),
        Some(Up::Started(r)) => fix(&mut r.task_id, task),
        Some(Up::Progress(r)) => fix(&mut r.task_id, task),
        Some(Up::Messages(r)) => fix(&mut r.task_id, task),
        Some(Up::Usage(r)) => fix(&mut r.task_id, task),
        Some(Up::Completed(r)) => fix(&mut r.task_id, task),
        Some(Up::Failed(r)) => fix(&mut r.task_id, task),
        Some(Up::CommandResult(r)) => fix(&mut r.command_id, command),
        Some(Up::Changes(r)) => fix(&mut r.task_id, task),
        None => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut frames = frames(data);
    if frames.is_empty() {
        return;
    }
    let w = &*world::WORLD;
    w.rt.block_on(async {
        let s = &w.server;
        let mut dc = daemon_client(s, &w.daemon).await;
        let machine = format!("fuzz-{}", uuid_like(data));
        let daemon_id = try_register(&mut dc, &machine, 4).await.expect("register");
        let mut session = Session::try_open(&mut dc, &daemon_id, vec![], 1024)
            .await
            .expect("open");
        let task = new_task(s, "fuzzed").await;
        start(s, &task.id).await;
        let spawn = session.command().await;
        for m in &mut frames {
            aim(m, &task.id, &spawn.id, &daemon_id);
            if let Some(Up::Messages(r)) = &mut m.message {
                r.messages.truncate(64);
                r.messages.iter_mut().for_each(|m: &mut TaskMessageInput| {
                    m.content.truncate(4096);
                });
            }
        }
        let Session { up, mut down, .. } = session;
        for m in frames {
            if up.send(m).await.is_err() {
                break;
            }
        }
        drop(up);
        while let Some(item) = down.next().await {
            match item {
                Ok(pb::SessionResponse {
                    message: Some(Down::Error(e)),
                }) => {
                    let code = tonic::Code::from_i32(e.code);
                    assert!(!world::is_servers_fault(code), "SessionError {e:?}");
                }
                Ok(_) => {}
                Err(status) => {
                    assert!(
                        !world::is_servers_fault(status.code()),
                        "the session ended {status:?}"
                    );
                    break;
                }
            }
        }
    });
});

/// A machine id per input, so each run is a daemon of its own.
fn uuid_like(data: &[u8]) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    data.hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    format!("{:016x}", h.finish())
}
