//! TLS for the one port: rustls with the certificate and key `serve` was
//! given, reloaded on SIGHUP and whenever the files change (a bad new pair
//! keeps the old one, and says why), and optionally client certificates
//! checked against `--client-ca` (asked for, never required at the TLS
//! level: browsers have none; DaemonService refuses connections without
//! one, see `api::access`). `conn` performs the handshakes, each on a task
//! of its own.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// How often the certificate files are checked for changes.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// What `serve` was given for TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients may present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// What is wrong with a TLS file, naming the flag and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {}: cannot read it: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{flag} {}: {reason}", path.display())]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "--tls-key {} is not the key of --tls-cert {}: {reason}",
        key.display(),
        cert.display()
    )]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS setup: {0}")]
    Setup(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(flag: &'static str, path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        flag,
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The PEM certificates in `path`; at least one.
fn certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(flag, path, format!("unreadable PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            flag,
            path,
            "holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)",
        ));
    }
    Ok(certs)
}

/// The certificate chain and key as one, checked to belong together.
fn certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = certificates("--tls-cert", &files.cert)?;
    let pem = read("--tls-key", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        invalid(
            "--tls-key",
            &files.key,
            format!("holds no PEM private key (`BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY`): {e}"),
        )
    })?;
    let key = provider().key_provider.load_private_key(key).map_err(|e| {
        invalid(
            "--tls-key",
            &files.key,
            format!("unusable private key: {e}"),
        )
    })?;
    let pair = CertifiedKey::new(certs, key);
    match pair.keys_match() {
        // A key that cannot tell its public half is taken, as rustls does.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(pair))
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: "the certificate was issued for another key".into(),
        }),
        Err(e) => Err(invalid(
            "--tls-cert",
            &files.cert,
            format!("the first certificate is unusable: {e}"),
        )),
    }
}

/// Answers every handshake with the current certificate; swapped when the
/// files change.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The server's TLS: the acceptor and the certificate it serves.
#[derive(Clone)]
pub struct ServerTls {
    files: TlsFiles,
    /// The files' modification times when they were last read.
    loaded: Arc<Mutex<Stamp>>,
    current: Arc<Current>,
    acceptor: TlsAcceptor,
}

impl ServerTls {
    /// Loads the certificate, key and client CA; a problem is reported with
    /// the file it is in.
    pub fn load(files: TlsFiles) -> Result<ServerTls, TlsError> {
        let loaded = Arc::new(Mutex::new(stamp(&files)));
        let current = Arc::new(Current(RwLock::new(certified_key(&files)?)));
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates("--client-ca", ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| invalid("--client-ca", ca, e.to_string()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| invalid("--client-ca", ca, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(current.clone());
        // gRPC needs HTTP/2; browsers' gRPC-web and the page may use 1.1.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls {
            files,
            loaded,
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Whether clients may present certificates (`--client-ca`).
    pub fn verifies_clients(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Loads the files again; on failure the current certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        // Taken before reading: a write during the read shows as a change.
        *self.lock_loaded() = stamp(&self.files);
        let key = certified_key(&self.files)?;
        *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }

    /// Reloads on SIGHUP and when the files' modification times change,
    /// until the task is aborted.
    pub fn spawn_reloader(&self) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        // Installed before this returns: a SIGHUP from then on reloads,
        // and never takes the default action (ending the process).
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(WATCH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let why = tokio::select! {
                    _ = tick.tick() => {
                        if stamp(&tls.files) == *tls.lock_loaded() {
                            continue;
                        }
                        "the certificate files changed"
                    }
                    Some(()) = async { hup.as_mut()?.recv().await } => "SIGHUP",
                };
                match tls.reload() {
                    Ok(()) => {
                        tracing::info!(why, cert = %tls.files.cert.display(), "TLS certificate reloaded")
                    }
                    Err(e) => {
                        tracing::error!(why, error = %e, "TLS certificate not reloaded; keeping the current one")
                    }
                }
            }
        })
    }

    fn lock_loaded(&self) -> std::sync::MutexGuard<'_, Stamp> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What performs each connection's handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }
}

/// The modification times of the certificate and the key.
type Stamp = (Option<SystemTime>, Option<SystemTime>);

fn stamp(files: &TlsFiles) -> Stamp {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    (modified(&files.cert), modified(&files.key))
}
