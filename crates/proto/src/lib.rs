//! The `taskmesh.v1` protocol, shared by every program: the generated
//! messages, clients and servers ([`pb`]), the encoded descriptor set that
//! server reflection serves, [`Bearer`], the one interceptor every client
//! uses to send its token, and [`endpoint`], how every client reaches a
//! server (TLS for `https://`, never a fallback to cleartext).

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("taskmesh.v1");

    /// The encoded descriptors of every taskmesh.v1 file, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/taskmesh_descriptor.bin"));
}

/// Adds `authorization: Bearer <token>` to every call; [`Bearer::none`]
/// adds nothing (for calls that must be refused as unauthenticated).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

/// A token that cannot travel in a header.
#[derive(Debug, thiserror::Error)]
#[error("the token must be printable ASCII without spaces")]
pub struct InvalidToken;

impl Bearer {
    pub fn new(token: &str) -> Result<Bearer, InvalidToken> {
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidToken);
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| InvalidToken)?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }

    pub fn none() -> Bearer {
        Bearer(None)
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(..)")
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// How a client proves who the server is, and optionally who it is.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Trust this CA (PEM) instead of the system's roots.
    pub ca_cert: Option<std::path::PathBuf>,
    /// Present this certificate and key (PEM) for mTLS.
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Why a server URL cannot be reached as given.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("invalid server URL {url:?}: use http://host:port or https://host:port")]
    InvalidUrl { url: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} only goes with an https:// server URL")]
    TlsOnPlain { what: &'static str },
    #[error("TLS setup for {url}: {source}")]
    Tls {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// An endpoint for `url`: TLS for `https://` (the system's roots, or
/// `tls.ca_cert`; a client certificate when `tls.identity` is given),
/// cleartext for `http://`. The second value is a warning for the user
/// when the token would travel in cleartext to another machine.
pub fn endpoint(
    url: &str,
    tls: &ClientTls,
) -> Result<(tonic::transport::Endpoint, Option<String>), EndpointError> {
    endpoint_via(url, None, tls)
}

/// Like [`endpoint`], connecting to `addr` (one of the addresses `url`'s
/// host name resolves to) while still naming `url`'s host to the server
/// (`:authority`, and the name its TLS certificate must carry).
pub fn endpoint_via(
    url: &str,
    addr: Option<std::net::SocketAddr>,
    tls: &ClientTls,
) -> Result<(tonic::transport::Endpoint, Option<String>), EndpointError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let invalid = || EndpointError::InvalidUrl {
        url: url.to_string(),
    };
    let uri: http::Uri = url.parse().map_err(|_| invalid())?;
    let host = uri.host().ok_or_else(invalid)?.to_string();
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| EndpointError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let endpoint = match addr {
        None => Endpoint::from_shared(url.to_string()).map_err(|_| invalid())?,
        Some(addr) => {
            let scheme = uri.scheme_str().unwrap_or("http");
            Endpoint::from_shared(format!("{scheme}://{addr}"))
                .map_err(|_| invalid())?
                .origin(uri.clone())
        }
    };
    match uri.scheme_str() {
        Some("https") => {
            let mut config = ClientTlsConfig::new().domain_name(host.trim_matches(['[', ']']));
            config = match &tls.ca_cert {
                Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
                None => config.with_native_roots(),
            };
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            let endpoint = endpoint
                .tls_config(config)
                .map_err(|source| EndpointError::Tls {
                    url: url.to_string(),
                    source,
                })?;
            Ok((endpoint, None))
        }
        Some("http") => {
            if tls.ca_cert.is_some() {
                return Err(EndpointError::TlsOnPlain { what: "--ca-cert" });
            }
            if tls.identity.is_some() {
                return Err(EndpointError::TlsOnPlain {
                    what: "a client certificate",
                });
            }
            let warning = (!is_loopback(&host)).then(|| {
                format!(
                    "{url} is plain http to another machine: the token travels in cleartext; \
                     serve with --tls-cert/--tls-key and use https://"
                )
            });
            Ok((endpoint, warning))
        }
        _ => Err(invalid()),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_matches(['[', ']']);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_must_fit_a_header() {
        assert!(Bearer::new("tmu_abc").is_ok());
        assert!(
            Bearer::new(" tmu_abc\n").is_ok(),
            "surrounding space is trimmed"
        );
        assert!(Bearer::new("").is_err());
        assert!(Bearer::new("a b").is_err());
        assert!(Bearer::new("tök").is_err());
        let mut req = Request::new(());
        req = Bearer::new("t").unwrap().call(req).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer t");
        let req = Bearer::none().call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }

    #[test]
    fn plain_http_elsewhere_is_warned_about_and_https_never_falls_back() {
        let none = ClientTls::default();
        assert!(
            endpoint("http://127.0.0.1:7070", &none)
                .unwrap()
                .1
                .is_none()
        );
        assert!(
            endpoint("http://localhost:7070", &none)
                .unwrap()
                .1
                .is_none()
        );
        assert!(endpoint("http://[::1]:7070", &none).unwrap().1.is_none());
        let warned = endpoint("http://10.0.0.5:7070", &none).unwrap().1.unwrap();
        assert!(warned.contains("cleartext"), "{warned}");
        assert!(
            endpoint("https://example.com:7070", &none)
                .unwrap()
                .1
                .is_none()
        );
        let ca = ClientTls {
            ca_cert: Some("ca.pem".into()),
            identity: None,
        };
        assert!(matches!(
            endpoint("http://10.0.0.5:7070", &ca),
            Err(EndpointError::TlsOnPlain { .. })
        ));
        assert!(matches!(
            endpoint("ftp://x", &none),
            Err(EndpointError::InvalidUrl { .. })
        ));
    }
}
