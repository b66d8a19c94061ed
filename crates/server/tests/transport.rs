//! One port for every client: reflection (as grpcurl uses it), health,
//! gRPC-web over HTTP/1.1 (as a browser sends it), CORS and the page at /.

use taskmesh_testkit as common;

use common::http::http1;
use common::{Backend, start_server};
use prost::Message;
use taskmesh_server::pb;
use tokio_stream::StreamExt;

const SERVICES: [&str; 6] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "taskmesh.v1.DaemonService",
    "taskmesh.v1.TaskService",
    "taskmesh.v1.WorkspaceService",
];

#[tokio::test]
async fn reflection_lists_services_as_grpcurl_does() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let s = start_server(Backend::Sqlite).await;
    let mut client = ServerReflectionClient::new(s.channel().await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("taskmesh.v1.TaskService".into()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    let mut expected: Vec<_> = SERVICES
        .iter()
        .filter(|n| !n.contains("v1alpha"))
        .map(|n| n.to_string())
        .collect();
    expected.sort();
    assert_eq!(names, expected);

    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected file descriptors");
    };
    let names: Vec<_> = files
        .file_descriptor_proto
        .iter()
        .map(|b| {
            prost_types::FileDescriptorProto::decode(b.as_slice())
                .unwrap()
                .name()
                .to_string()
        })
        .collect();
    assert!(
        names.contains(&"taskmesh/v1/task.proto".to_string()),
        "{names:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn reflection_v1alpha_for_older_clients() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let s = start_server(Backend::Sqlite).await;
    let mut client = ServerReflectionClient::new(s.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "taskmesh.v1.TaskService")
    );
    s.stop().await;
}

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

    let s = start_server(Backend::Sqlite).await;
    let mut h = HealthClient::new(s.channel().await);
    for service in ["", "taskmesh.v1.TaskService", "taskmesh.v1.DaemonService"] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    s.stop().await;
}

/// gRPC-web frames: a flag byte (0x80 marks trailers), a 4-byte length, bytes.
fn frames(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        out.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    out
}

#[tokio::test]
async fn grpc_web_over_http1_as_a_browser_sends_it() {
    let s = start_server(Backend::Sqlite).await;
    let msg = pb::CreateTaskRequest {
        name: "from a browser".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(&msg);
    let head = format!(
        "POST /taskmesh.v1.TaskService/CreateTask HTTP/1.1\r\nhost: {}\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\naccept: application/grpc-web+proto\r\n\
         origin: http://dashboard.example\r\nauthorization: Bearer {}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        s.addr,
        s.token,
        body.len()
    );
    let (headers, body) = http1(s.addr, &head, &body).await;
    assert!(headers.starts_with("http/1.1 200"), "{headers}");
    assert!(
        headers.contains("content-type: application/grpc-web+proto"),
        "{headers}"
    );
    assert!(
        headers.contains("access-control-allow-origin: *"),
        "{headers}"
    );
    assert!(
        headers.contains("access-control-expose-headers:"),
        "{headers}"
    );

    let frames = frames(&body);
    assert_eq!(frames.len(), 2, "a message and trailers");
    let task = pb::CreateTaskResponse::decode(frames[0].1.as_slice())
        .unwrap()
        .task
        .unwrap();
    assert_eq!(task.name, "from a browser");
    assert_eq!(frames[1].0, 0x80);
    let trailers = String::from_utf8_lossy(&frames[1].1).to_lowercase();
    assert!(trailers.contains("grpc-status:0"), "{trailers}");

    // The browser sees the task over plain gRPC too.
    let mut c = s.tasks().await;
    let got = c
        .get_task(pb::GetTaskRequest { id: task.id })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(got.name, "from a browser");

    // Errors reach the browser as grpc-status with a readable message.
    let head = format!(
        "POST /taskmesh.v1.TaskService/GetTask HTTP/1.1\r\nhost: {}\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
         content-length: 5\r\nconnection: close\r\n\r\n",
        s.addr
    );
    let (headers, _) = http1(s.addr, &head, &[0, 0, 0, 0, 0]).await;
    assert!(
        headers.contains("grpc-status: 16"),
        "unauthenticated: {headers}"
    );
    s.stop().await;
}

#[tokio::test]
async fn cors_preflight_allows_authorization() {
    let s = start_server(Backend::Sqlite).await;
    let head = format!(
        "OPTIONS /taskmesh.v1.TaskService/ListTasks HTTP/1.1\r\nhost: {}\r\n\
         origin: http://dashboard.example\r\naccess-control-request-method: POST\r\n\
         access-control-request-headers: authorization, content-type, x-grpc-web\r\n\
         connection: close\r\n\r\n",
        s.addr
    );
    let (headers, _) = http1(s.addr, &head, b"").await;
    assert!(headers.starts_with("http/1.1 200"), "{headers}");
    assert!(
        headers.contains("access-control-allow-headers: authorization, content-type, x-grpc-web"),
        "{headers}"
    );
    assert!(
        headers.contains("access-control-allow-methods:"),
        "{headers}"
    );
    s.stop().await;
}

/// The dashboard: its views, deep links included, are index.html and never
/// cached; its assets are the ones index.html names and are cached for good.
#[tokio::test]
async fn the_dashboard_is_served() {
    let s = start_server(Backend::Sqlite).await;
    let get = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            s.addr
        )
    };
    let mut index = String::new();
    for path in [
        "/",
        "/tasks/0190a7e0-0000-7000-8000-000000000000",
        "/new",
        "/daemons",
    ] {
        let (headers, body) = http1(s.addr, &get(path), b"").await;
        assert!(headers.starts_with("http/1.1 200"), "{path}: {headers}");
        assert!(headers.contains("text/html"), "{path}: {headers}");
        assert!(
            headers.contains("cache-control: no-cache"),
            "{path}: {headers}"
        );
        index = String::from_utf8_lossy(&body).into_owned();
        assert!(index.contains(r#"<div id="app">"#), "{index}");
    }
    for (asset, kind) in [("app.js", "text/javascript"), ("app.css", "text/css")] {
        let named = index
            .split('"')
            .find(|p| p.starts_with(&format!("/assets/{asset}?v=")))
            .unwrap_or_else(|| panic!("index.html names no {asset}: {index}"));
        let (headers, body) = http1(s.addr, &get(named), b"").await;
        assert!(headers.starts_with("http/1.1 200"), "{named}: {headers}");
        assert!(headers.contains(kind), "{named}: {headers}");
        assert!(headers.contains("immutable"), "{named}: {headers}");
        assert!(body.len() > 1000, "{named}: {} bytes", body.len());
    }
    let (headers, _) = http1(s.addr, &get("/nope"), b"").await;
    assert!(headers.starts_with("http/1.1 404"), "{headers}");
    s.stop().await;
}
