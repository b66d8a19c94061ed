//! TLS end to end against a real `taskmesh serve --tls-cert --tls-key`,
//! with CAs and certificates made in the test: gRPC, and gRPC-web over
//! HTTP/1.1 and HTTP/2, through TLS; the page over HTTPS; the CLI and the
//! daemon with --ca-cert; a client with another CA and a cleartext client
//! refused; the certificate reloaded on SIGHUP and when the files change,
//! without dropping connections; mTLS for daemons with --client-ca; clear
//! errors for bad files; and serve's limits (message size, streams per
//! connection and per token, idle connections closed).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use taskmesh_server::pb;
use taskmesh_server::pb::daemon_service_client::DaemonServiceClient;
use taskmesh_server::pb::task_service_client::TaskServiceClient;
use taskmesh_server::pb::workspace_service_client::WorkspaceServiceClient;
use taskmesh_testkit::certs::Ca;
use taskmesh_testkit::process::{DaemonProcess, ServeProcess, TempDir};
use taskmesh_testkit::{Backend, Bearer, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const BIN: &str = env!("CARGO_BIN_EXE_taskmesh");
const PATIENCE: Duration = Duration::from_secs(30);

struct Files {
    dir: TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: TempDir::new("tls"),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn path(&self, name: &str) -> String {
        self.dir.0.join(name).display().to_string()
    }

    /// The server's certificate and key as serve reads them, and the CA.
    fn server(&self, ca: &Ca, serial: u64) -> Vec<String> {
        let (cert, key) = ca.server(serial);
        self.write("server.pem", &cert);
        self.write("server.key", &key);
        self.write("ca.pem", &ca.pem);
        vec![
            "--tls-cert".into(),
            self.path("server.pem"),
            "--tls-key".into(),
            self.path("server.key"),
        ]
    }
}

/// `taskmesh serve` with a certificate of `ca` (and `extra`).
async fn serve(db: &TestDb, ca: &Ca, files: &Files, extra: &[&str]) -> ServeProcess {
    let mut args = files.server(ca, 1);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = ServeProcess::start(&db.url, "127.0.0.1:0", &args).await;
    assert!(server.url().starts_with("https://"), "{}", server.url());
    server
}

fn tls_config(ca_pem: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost")
}

async fn channel(
    server: &ServeProcess,
    config: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(server.url())
        .unwrap()
        .tls_config(config)
        .unwrap()
        .connect()
        .await
}

async fn list_tasks(channel: Channel, token: &str) -> Result<usize, tonic::Status> {
    let mut c = TaskServiceClient::with_interceptor(channel, Bearer::new(token).unwrap());
    Ok(c.list_tasks(pb::ListTasksRequest::default())
        .await?
        .into_inner()
        .tasks
        .len())
}

/// A TLS connection to the server (as `localhost`) from a client that
/// trusts `ca_pem` and offers `alpn`, with a client certificate if given.
async fn tls_connect(
    server: &ServeProcess,
    ca_pem: &str,
    alpn: &[u8],
    identity: Option<(&str, &str)>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => config.with_no_client_auth(),
        Some((cert, key)) => config
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(server.addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// An empty protobuf message in a gRPC(-web) frame.
const EMPTY: [u8; 5] = [0, 0, 0, 0, 0];

/// One gRPC-web request over HTTP/1.1 through TLS, as a browser sends it:
/// the whole answer (status line, headers, body) as text.
async fn grpc_web_http1(server: &ServeProcess, ca_pem: &str, path: &str, token: &str) -> String {
    let mut conn = tls_connect(server, ca_pem, b"http/1.1", None)
        .await
        .expect("handshake");
    assert_eq!(conn.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\norigin: https://ops.example.com\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
         authorization: Bearer {token}\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    conn.write_all(&EMPTY).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, conn.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .expect("read the answer");
    String::from_utf8_lossy(&answer).into_owned()
}

/// An HTTP/2 connection through TLS; `closed` ends when the server closes it.
struct H2 {
    send: h2::client::SendRequest<Bytes>,
    closed: JoinHandle<()>,
}

async fn h2_connect(server: &ServeProcess, ca_pem: &str) -> H2 {
    let tls = tls_connect(server, ca_pem, b"h2", None)
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    let closed = tokio::spawn(async move {
        let _ = conn.await;
    });
    H2 { send, closed }
}

/// What a gRPC-web answer said.
#[derive(Debug)]
struct WebAnswer {
    http: u16,
    content_type: String,
    /// From the headers (trailers-only) or the body's trailer frame.
    grpc_status: Option<String>,
    grpc_message: String,
}

/// Starts a gRPC-web call over HTTP/2 and returns its response (headers
/// received, body unread).
async fn grpc_web_h2_start(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    token: &str,
) -> http::Response<h2::RecvStream> {
    let request = http::Request::post(format!("https://localhost{path}"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let mut ready = send.clone().ready().await.expect("the connection is open");
    let (response, mut body) = ready.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(&EMPTY), true).unwrap();
    tokio::time::timeout(PATIENCE, response)
        .await
        .expect("response headers")
        .expect("a response")
}

/// A whole gRPC-web call over HTTP/2.
async fn grpc_web_h2(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    token: &str,
) -> WebAnswer {
    let response = grpc_web_h2_start(send, path, token).await;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let mut answer = WebAnswer {
        http: response.status().as_u16(),
        content_type: header("content-type").unwrap_or_default(),
        grpc_status: header("grpc-status"),
        grpc_message: header("grpc-message").unwrap_or_default(),
    };
    let mut stream = response.into_body();
    let mut body = Vec::new();
    while let Some(chunk) = tokio::time::timeout(PATIENCE, stream.data())
        .await
        .expect("the body")
    {
        let chunk = chunk.unwrap();
        let _ = stream.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    // Frames: a flag byte, a 4-byte length, the payload; 0x80 is trailers.
    let mut rest = &body[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let (flag, payload) = (rest[0], &rest[5..5 + len]);
        if flag & 0x80 != 0 {
            for line in String::from_utf8_lossy(payload).split("\r\n") {
                if let Some((k, v)) = line.split_once(':') {
                    match k.trim().to_ascii_lowercase().as_str() {
                        "grpc-status" => answer.grpc_status = Some(v.trim().to_string()),
                        "grpc-message" => answer.grpc_message = v.trim().to_string(),
                        _ => {}
                    }
                }
            }
        }
        rest = &rest[5 + len..];
    }
    answer
}

async fn daemon_token(channel: Channel, token: &str) -> String {
    WorkspaceServiceClient::with_interceptor(channel, Bearer::new(token).unwrap())
        .create_token(pb::CreateTokenRequest {
            kind: pb::TokenKind::Daemon as i32,
            name: "tls".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret
}

async fn tls_over_every_client(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (ca, other) = (Ca::new("taskmesh test CA"), Ca::new("some other CA"));
    let files = Files::new();
    let server = serve(&db, &ca, &files, &[]).await;
    let token = server.token.clone().unwrap();

    // gRPC (HTTP/2) over TLS.
    let ch = channel(&server, tls_config(&ca.pem))
        .await
        .expect("TLS connects");
    assert_eq!(list_tasks(ch.clone(), &token).await.unwrap(), 0);

    // gRPC-web over HTTP/1.1 through TLS, as a browser sends it.
    let answer = grpc_web_http1(
        &server,
        &ca.pem,
        "/taskmesh.v1.TaskService/ListTasks",
        &token,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("application/grpc-web"), "{answer}");
    assert!(answer.contains("grpc-status:0"), "{answer}");
    assert!(
        answer.contains("access-control-allow-origin"),
        "CORS answers over TLS too: {answer}"
    );

    // gRPC-web over HTTP/2 through TLS.
    let mut h2 = h2_connect(&server, &ca.pem).await;
    let answer = grpc_web_h2(&mut h2.send, "/taskmesh.v1.TaskService/ListTasks", &token).await;
    assert_eq!(answer.http, 200, "{answer:?}");
    assert!(
        answer.content_type.starts_with("application/grpc-web"),
        "{answer:?}"
    );
    assert_eq!(answer.grpc_status.as_deref(), Some("0"), "{answer:?}");

    // The page, over HTTPS.
    let mut conn = tls_connect(&server, &ca.pem, b"http/1.1", None)
        .await
        .unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut page = Vec::new();
    tokio::time::timeout(PATIENCE, conn.read_to_end(&mut page))
        .await
        .unwrap()
        .unwrap();
    let page = String::from_utf8_lossy(&page);
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("text/html"), "{page}");

    // A client of another CA fails its handshake and gets no answer.
    let refused = tls_connect(&server, &other.pem, b"h2", None).await;
    let e = refused.expect_err("a client that does not trust the CA");
    assert!(e.to_string().contains("certificate"), "{e}");
    assert!(
        channel(&server, tls_config(&other.pem)).await.is_err(),
        "tonic with another CA must not connect"
    );
    // A cleartext client gets no answer.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(PATIENCE)
        .timeout(PATIENCE);
    match plain.connect().await {
        Err(_) => {}
        Ok(ch) => assert!(
            list_tasks(ch, &token).await.is_err(),
            "cleartext was served"
        ),
    }
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes a cleartext connection");
    assert!(
        !answer.starts_with(b"HTTP"),
        "cleartext HTTP was answered: {}",
        String::from_utf8_lossy(&answer)
    );

    // The CLI with --ca-cert; without it the system roots do not know the
    // test CA, and it says it cannot connect instead of falling back.
    let cli = |ca: Option<String>| {
        let mut cmd = Command::new(BIN);
        cmd.args(["task", "list", "--server", &server.url()])
            .env("TASKMESH_TOKEN", &token)
            .env_remove("TASKMESH_CA_CERT");
        if let Some(ca) = ca {
            cmd.args(["--ca-cert", &ca]);
        }
        cmd.output()
    };
    let out = cli(Some(files.path("ca.pem"))).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("cleartext"), "{stderr}");
    let out = cli(None).await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the server"), "{stderr}");

    // The daemon with --ca-cert registers over TLS.
    let daemon_token = daemon_token(ch.clone(), &token).await;
    let ca_path = files.path("ca.pem");
    let daemon = DaemonProcess::start(&server.url(), &daemon_token, &["--ca-cert", &ca_path]);
    let mut ws = WorkspaceServiceClient::with_interceptor(ch, Bearer::new(&token).unwrap());
    let online = async {
        loop {
            let daemons = ws
                .list_daemons(pb::ListDaemonsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .daemons;
            if daemons
                .iter()
                .any(|d| d.state == pb::DaemonState::Online as i32)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, online)
        .await
        .expect("the daemon registers over TLS");
    daemon.stop().await;

    buf_curl_lists_services(&server, &files.path("ca.pem")).await;
}

/// `buf` from the PATH (CI puts web/node_modules/.bin there), else from
/// web/node_modules.
fn find_buf() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("buf"))
            .find(|p| p.is_file())
    });
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web/node_modules/.bin/buf");
    on_path.or_else(|| local.is_file().then_some(local))
}

/// `buf curl` lists the services by reflection over TLS, trusting the CA.
async fn buf_curl_lists_services(server: &ServeProcess, ca: &str) {
    let Some(buf) = find_buf() else {
        eprintln!(
            "note: buf is not on the PATH nor in web/node_modules: skipping the buf curl check"
        );
        return;
    };
    let out = Command::new(buf)
        .args([
            "curl",
            "--protocol",
            "grpc",
            "--cacert",
            ca,
            "--list-services",
        ])
        .arg(server.url())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("taskmesh.v1.TaskService"), "{stdout}");
    assert!(stdout.contains("grpc.health.v1.Health"), "{stdout}");
}

/// The certificate a new TLS connection is served, in DER.
async fn served_certificate(server: &ServeProcess, ca_pem: &str) -> Vec<u8> {
    let conn = tls_connect(server, ca_pem, b"h2", None)
        .await
        .expect("handshake");
    conn.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn sighup(server: &ServeProcess) {
    // SAFETY: signalling our own child by pid.
    let sent = unsafe { libc::kill(server.pid() as i32, libc::SIGHUP) };
    assert_eq!(sent, 0, "SIGHUP");
}

async fn the_certificate_is_reloaded_without_dropping_connections(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ca = Ca::new("taskmesh test CA");
    let files = Files::new();
    let args = files.server(&ca, 1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (server, mut log) = ServeProcess::start_logged(&db.url, "127.0.0.1:0", &args, "info").await;
    let token = server.token.clone().unwrap();
    let first = std::fs::read_to_string(files.path("server.pem")).unwrap();
    assert_eq!(served_certificate(&server, &ca.pem).await, der(&first));
    // A connection made before the reloads, used after them.
    let mut kept = h2_connect(&server, &ca.pem).await;

    // A broken file is not taken: the old certificate stays, and the log
    // says which file is wrong.
    files.write("server.pem", "not a certificate");
    sighup(&server);
    let line = log
        .wait_for(
            &["TLS certificate not reloaded", "why=\"SIGHUP\""],
            PATIENCE,
        )
        .await;
    assert!(
        line.contains("--tls-cert") && line.contains("server.pem"),
        "{line}"
    );
    assert_eq!(served_certificate(&server, &ca.pem).await, der(&first));

    // A new pair for the same names, and SIGHUP: new connections get it.
    let (second, key) = ca.server(2);
    files.write("server.key", &key);
    files.write("server.pem", &second);
    sighup(&server);
    log.wait_for(&["TLS certificate reloaded", "why=\"SIGHUP\""], PATIENCE)
        .await;
    assert_eq!(served_certificate(&server, &ca.pem).await, der(&second));

    // Another, without a signal: taken when the files change.
    let (third, key) = ca.server(3);
    files.write("server.key", &key);
    files.write("server.pem", &third);
    log.wait_for(&["TLS certificate reloaded", "files changed"], PATIENCE)
        .await;
    assert_eq!(served_certificate(&server, &ca.pem).await, der(&third));

    // The first connection was never dropped.
    assert!(!kept.closed.is_finished(), "a reload closed a connection");
    let answer = grpc_web_h2(&mut kept.send, "/taskmesh.v1.TaskService/ListTasks", &token).await;
    assert_eq!(answer.grpc_status.as_deref(), Some("0"), "{answer:?}");
}

async fn daemons_need_a_client_certificate_with_client_ca(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (ca, clients) = (Ca::new("taskmesh test CA"), Ca::new("taskmesh client CA"));
    let files = Files::new();
    let client_ca = files.write("clients.pem", &clients.pem);
    let server = serve(
        &db,
        &ca,
        &files,
        &["--client-ca", &client_ca.display().to_string()],
    )
    .await;
    let token = server.token.clone().unwrap();

    // Clients without a certificate still use TaskService: tonic, and a
    // browser's gRPC-web over HTTP/1.1.
    let ch = channel(&server, tls_config(&ca.pem)).await.unwrap();
    assert_eq!(list_tasks(ch.clone(), &token).await.unwrap(), 0);
    let answer = grpc_web_http1(
        &server,
        &ca.pem,
        "/taskmesh.v1.TaskService/ListTasks",
        &token,
    )
    .await;
    assert!(answer.contains("grpc-status:0"), "{answer}");
    let daemon_token = daemon_token(ch.clone(), &token).await;
    let register = pb::RegisterRequest {
        machine_id: "mtls".into(),
        hostname: "h".into(),
        max_concurrent_tasks: 1,
        ..Default::default()
    };

    // A daemon token alone is not enough, over gRPC or gRPC-web.
    let mut bare = DaemonServiceClient::with_interceptor(ch, Bearer::new(&daemon_token).unwrap());
    let e = bare.register(register.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert_eq!(
        e.message(),
        "DaemonService needs a client certificate signed by --client-ca"
    );
    let mut h2 = h2_connect(&server, &ca.pem).await;
    let answer = grpc_web_h2(
        &mut h2.send,
        "/taskmesh.v1.DaemonService/Heartbeat",
        &daemon_token,
    )
    .await;
    assert_eq!(answer.grpc_status.as_deref(), Some("16"), "{answer:?}");

    // With a certificate from the client CA it is.
    let (cert, key) = clients.issue(&["daemon-1"], 10);
    let config = tls_config(&ca.pem).identity(Identity::from_pem(&cert, &key));
    let ch = channel(&server, config).await.unwrap();
    let mut certified =
        DaemonServiceClient::with_interceptor(ch, Bearer::new(&daemon_token).unwrap());
    certified
        .register(register.clone())
        .await
        .expect("registered with a client certificate");
    // The certificate stands beside the token, not for it.
    let mut tokenless =
        DaemonServiceClient::new(certified_channel(&server, &ca, &cert, &key).await);
    let e = tokenless.register(register.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // A certificate from another CA fails the handshake.
    let (cert, key) = ca.issue(&["daemon-2"], 11);
    let refused = tls_connect(&server, &ca.pem, b"h2", Some((&cert, &key))).await;
    let refused = match refused {
        Err(_) => true,
        // TLS 1.3: the client learns of the refusal on its first read.
        Ok(mut conn) => {
            let _ = conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut byte = [0u8; 1];
            matches!(
                tokio::time::timeout(PATIENCE, conn.read(&mut byte)).await,
                Ok(Err(_) | Ok(0))
            )
        }
    };
    assert!(refused, "a certificate from another CA was accepted");
}

async fn certified_channel(server: &ServeProcess, ca: &Ca, cert: &str, key: &str) -> Channel {
    let config = tls_config(&ca.pem).identity(Identity::from_pem(cert, key));
    channel(server, config).await.unwrap()
}

taskmesh_testkit::both_backends!(
    tls_over_every_client,
    the_certificate_is_reloaded_without_dropping_connections,
    daemons_need_a_client_certificate_with_client_ca
);

/// `serve` with bad TLS files exits non-zero at once, naming the flag, the
/// file and what is wrong with it.
#[tokio::test]
async fn bad_tls_files_are_named() {
    let (ca, files) = (Ca::new("taskmesh test CA"), Files::new());
    let (cert, key) = ca.server(1);
    let (_, other_key) = ca.server(2);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    files.write("other.key", &other_key);
    let db = format!("sqlite://{}", files.path("t.db"));
    let serve = |args: Vec<String>| {
        let db = db.clone();
        async move {
            let out = Command::new(BIN)
                .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &db])
                .args(&args)
                .env_remove("TASKMESH_TLS_CERT")
                .env_remove("TASKMESH_TLS_KEY")
                .env_remove("TASKMESH_CLIENT_CA")
                .stdin(std::process::Stdio::null())
                .output();
            let out = tokio::time::timeout(PATIENCE, out)
                .await
                .expect("serve exits")
                .unwrap();
            assert!(!out.status.success(), "serve {args:?} started");
            String::from_utf8_lossy(&out.stderr).into_owned()
        }
    };
    let tls = |cert: &str, key: &str| {
        vec![
            "--tls-cert".to_string(),
            files.path(cert),
            "--tls-key".to_string(),
            files.path(key),
        ]
    };

    let e = serve(tls("missing.pem", "server.key")).await;
    assert!(e.contains("--tls-cert") && e.contains("missing.pem"), "{e}");
    assert!(e.contains("cannot read"), "{e}");

    let e = serve(tls("server.pem", "missing.key")).await;
    assert!(e.contains("--tls-key") && e.contains("missing.key"), "{e}");

    let e = serve(tls("server.pem", "other.key")).await;
    assert!(e.contains("other.key") && e.contains("server.pem"), "{e}");
    assert!(e.contains("not the key of"), "{e}");

    // The two swapped.
    let e = serve(tls("server.key", "server.pem")).await;
    assert!(
        e.contains("--tls-cert") && e.contains("no certificate"),
        "{e}"
    );

    let e = serve(tls("server.pem", "server.pem")).await;
    assert!(
        e.contains("--tls-key") && e.contains("no PEM private key"),
        "{e}"
    );

    let mut args = tls("server.pem", "server.key");
    args.extend(["--client-ca".to_string(), files.path("missing-ca.pem")]);
    let e = serve(args).await;
    assert!(
        e.contains("--client-ca") && e.contains("missing-ca.pem"),
        "{e}"
    );

    let e = serve(vec!["--tls-cert".into(), files.path("server.pem")]).await;
    assert!(e.contains("--tls-key"), "{e}");
    assert!(
        !Path::new(&files.path("t.db")).exists(),
        "a refused start touched the database"
    );
}

/// serve's limits, over TLS: the largest message on every service, HTTP/2
/// streams per connection, streams per token, and idle connections closed
/// while busy ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold() {
    let db = TestDb::new(Backend::Sqlite).await;
    let (ca, files) = (Ca::new("taskmesh test CA"), Files::new());
    let limits = [
        "--max-message-bytes",
        "1KiB",
        "--max-streams-per-connection",
        "7",
        "--max-streams-per-token",
        "1",
        "--idle-timeout",
        "300ms",
    ];
    let server = serve(&db, &ca, &files, &limits).await;
    let token = server.token.clone().unwrap();
    let ch = channel(&server, tls_config(&ca.pem)).await.unwrap();

    // The largest request, on TaskService and on DaemonService.
    let mut tasks = TaskServiceClient::with_interceptor(ch.clone(), Bearer::new(&token).unwrap());
    let create = |plan: String| pb::CreateTaskRequest {
        name: "big".into(),
        plan,
        runtime: "shell".into(),
        ..Default::default()
    };
    let e = tasks
        .create_task(create("x".repeat(2000)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    tasks
        .create_task(create("echo small".into()))
        .await
        .expect("a request under the limit");
    let daemon_token = daemon_token(ch.clone(), &token).await;
    let mut daemons =
        DaemonServiceClient::with_interceptor(ch, Bearer::new(&daemon_token).unwrap());
    let e = daemons
        .register(pb::RegisterRequest {
            machine_id: "m".into(),
            hostname: "h".repeat(2000),
            max_concurrent_tasks: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");

    // Two HTTP/2 connections: `busy` holds a stream open, `idle` carries
    // nothing after its first call.
    let mut busy = h2_connect(&server, &ca.pem).await;
    let watch = grpc_web_h2_start(
        &mut busy.send,
        "/taskmesh.v1.TaskService/WatchTasks",
        &token,
    )
    .await;
    assert_eq!(watch.status(), 200);
    assert_eq!(
        busy.send.current_max_send_streams(),
        7,
        "the server's SETTINGS_MAX_CONCURRENT_STREAMS"
    );
    // One stream per token: a second watch is refused.
    let mut idle = h2_connect(&server, &ca.pem).await;
    let answer = grpc_web_h2(
        &mut idle.send,
        "/taskmesh.v1.TaskService/WatchTasks",
        &token,
    )
    .await;
    assert_eq!(answer.grpc_status.as_deref(), Some("8"), "{answer:?}");

    // The idle one is closed; the busy one, idle no longer than it, is not.
    tokio::time::timeout(PATIENCE, &mut idle.closed)
        .await
        .expect("the server closes an idle connection")
        .unwrap();
    assert!(
        !busy.closed.is_finished(),
        "a connection with a stream was closed"
    );
    let answer = grpc_web_h2(&mut busy.send, "/taskmesh.v1.TaskService/ListTasks", &token).await;
    assert_eq!(answer.grpc_status.as_deref(), Some("0"), "{answer:?}");
    // Once its stream ends, it is idle too.
    drop(watch);
    tokio::time::timeout(PATIENCE, &mut busy.closed)
        .await
        .expect("the server closes a connection whose streams ended")
        .unwrap();
}

/// A plain `http://` URL to another machine works, with one warning that
/// the token travels in cleartext; loopback gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_elsewhere_is_warned_about_once() {
    // This machine's address on its default route, if it has one; no
    // packet is sent.
    let Some(ip) = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|()| s))
        .and_then(|s| s.local_addr())
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
    else {
        eprintln!("note: no non-loopback address here: skipping the cleartext warning check");
        return;
    };
    let db = TestDb::new(Backend::Sqlite).await;
    let server = ServeProcess::start(&db.url, &format!("{ip}:0"), &[]).await;
    let token = server.token.clone().unwrap();
    let list = |url: String| {
        Command::new(BIN)
            .args(["task", "list", "--server", &url])
            .env("TASKMESH_TOKEN", &token)
            .env_remove("TASKMESH_CA_CERT")
            .output()
    };
    let out = list(server.url()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("cleartext").count(), 1, "{stderr}");
    assert!(stderr.starts_with("warning: "), "{stderr}");

    // The same server through loopback: no warning.
    let loopback = ServeProcess::start(&db.url, "127.0.0.1:0", &[]).await;
    let out = list(loopback.url()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("cleartext"), "{stderr}");
}
