//! TLS end to end against a real `taskmesh serve --tls-cert --tls-key`,
//! with a CA and certificates made in the test: gRPC and gRPC-web (HTTP/1.1)
//! over TLS, the CLI and the daemon with --ca-cert, a client with another
//! CA refused, a cleartext client refused, the certificate reloaded on
//! SIGHUP, and mTLS for daemons with --client-ca.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use taskmesh_server::pb;
use taskmesh_server::pb::daemon_service_client::DaemonServiceClient;
use taskmesh_server::pb::task_service_client::TaskServiceClient;
use taskmesh_testkit::process::{DaemonProcess, ServeProcess, TempDir};
use taskmesh_testkit::{Backend, Bearer, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const BIN: &str = env!("CARGO_BIN_EXE_taskmesh");
const PATIENCE: Duration = Duration::from_secs(30);

/// A CA that signs certificates for 127.0.0.1 and localhost.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate and key (PEM) for the server's names.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

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
}

/// `taskmesh serve` with the server certificate of `ca` (and `extra`).
async fn serve(db: &TestDb, ca: &Ca, files: &Files, extra: &[&str]) -> ServeProcess {
    let (cert, key) = ca.issue(&["127.0.0.1", "localhost"]);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    files.write("ca.pem", &ca.pem);
    let mut args = vec![
        "--tls-cert".to_string(),
        files.path("server.pem"),
        "--tls-key".to_string(),
        files.path("server.key"),
    ];
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

/// A rustls client that trusts `ca_pem`, offering `alpn`.
fn rustls_client(ca_pem: &str, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
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
    assert_eq!(list_tasks(ch, &token).await.unwrap(), 0);

    // gRPC-web over HTTP/1.1 through TLS, as a browser sends it.
    let tls = rustls_client(&ca.pem, b"http/1.1");
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut conn = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    let request = format!(
        "POST /taskmesh.v1.TaskService/ListTasks HTTP/1.1\r\nhost: localhost\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
         authorization: Bearer {token}\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    conn.write_all(&[0, 0, 0, 0, 0]).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, conn.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("application/grpc-web"), "{answer}");
    assert!(answer.contains("grpc-status:0"), "{answer}");

    // The page, over HTTPS.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut conn = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut page = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, conn.read_to_end(&mut page)).await;
    assert!(String::from_utf8_lossy(&page).starts_with("HTTP/1.1 200"));

    // Another CA's client is refused at the handshake.
    assert!(
        channel(&server, tls_config(&other.pem)).await.is_err(),
        "a client that does not trust the server's CA must not connect"
    );
    // A cleartext client gets nothing.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap();
    match plain.connect().await {
        Err(_) => {}
        Ok(ch) => assert!(
            list_tasks(ch, &token).await.is_err(),
            "cleartext was served"
        ),
    }

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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(None).await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the server"), "{stderr}");

    // The daemon with --ca-cert registers over TLS.
    let mut ws =
        taskmesh_server::pb::workspace_service_client::WorkspaceServiceClient::with_interceptor(
            channel(&server, tls_config(&ca.pem)).await.unwrap(),
            Bearer::new(&token).unwrap(),
        );
    let daemon_token = ws
        .create_token(pb::CreateTokenRequest {
            kind: pb::TokenKind::Daemon as i32,
            name: "tls".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let ca_path = files.path("ca.pem");
    let daemon = DaemonProcess::start(&server.url(), &daemon_token, &["--ca-cert", &ca_path]);
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

/// `buf curl` with reflection over TLS, when buf is installed (CI puts it
/// in web/node_modules/.bin).
async fn buf_curl_lists_services(server: &ServeProcess, ca: &str) {
    let buf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web/node_modules/.bin/buf");
    if !buf.exists() {
        eprintln!("buf is not installed under web/node_modules: skipping the buf curl check");
        return;
    }
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
}

/// The DER of the certificate a fresh TLS connection gets.
async fn served_certificate(server: &ServeProcess, ca_pem: &str) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let conn = rustls_client(ca_pem, b"h2")
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    conn.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

async fn the_certificate_is_reloaded_on_sighup(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ca = Ca::new("taskmesh test CA");
    let files = Files::new();
    let server = serve(&db, &ca, &files, &[]).await;
    let first = std::fs::read_to_string(files.path("server.pem")).unwrap();
    assert_eq!(served_certificate(&server, &ca.pem).await, der(&first));

    // A broken file is not taken: the old certificate stays.
    files.write("server.pem", "not a certificate");
    let pid = server.pid();
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    assert_eq!(served_certificate(&server, &ca.pem).await, der(&first));

    let (cert, key) = ca.issue(&["127.0.0.1", "localhost"]);
    files.write("server.key", &key);
    files.write("server.pem", &cert);
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if served_certificate(&server, &ca.pem).await == der(&cert) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

    // A browser-like client without a certificate still uses TaskService.
    let ch = channel(&server, tls_config(&ca.pem)).await.unwrap();
    assert_eq!(list_tasks(ch.clone(), &token).await.unwrap(), 0);
    let mut ws =
        taskmesh_server::pb::workspace_service_client::WorkspaceServiceClient::with_interceptor(
            ch.clone(),
            Bearer::new(&token).unwrap(),
        );
    let daemon_token = ws
        .create_token(pb::CreateTokenRequest {
            kind: pb::TokenKind::Daemon as i32,
            name: "mtls".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let register = pb::RegisterRequest {
        machine_id: "mtls".into(),
        hostname: "h".into(),
        max_concurrent_tasks: 1,
        ..Default::default()
    };

    // A daemon token alone is not enough.
    let mut bare = DaemonServiceClient::with_interceptor(ch, Bearer::new(&daemon_token).unwrap());
    let e = bare.register(register.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("client certificate"), "{e:?}");

    // With a certificate from the client CA it is.
    let (cert, key) = clients.issue(&["daemon-1"]);
    let config = tls_config(&ca.pem).identity(Identity::from_pem(cert, key));
    let ch = channel(&server, config).await.unwrap();
    let mut certified =
        DaemonServiceClient::with_interceptor(ch, Bearer::new(&daemon_token).unwrap());
    certified
        .register(register.clone())
        .await
        .expect("registered with a client certificate");

    // A certificate from another CA is refused at the handshake.
    let (cert, key) = ca.issue(&["daemon-2"]);
    let config = tls_config(&ca.pem).identity(Identity::from_pem(cert, key));
    let refused = match channel(&server, config).await {
        Err(_) => true,
        Ok(ch) => DaemonServiceClient::with_interceptor(ch, Bearer::new(&daemon_token).unwrap())
            .register(register)
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from another CA was accepted");
}

taskmesh_testkit::both_backends!(
    tls_over_every_client,
    the_certificate_is_reloaded_on_sighup,
    daemons_need_a_client_certificate_with_client_ca
);
