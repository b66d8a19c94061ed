//! The taskmesh control plane. Every dependency points down the list:
//!
//! - [`model`]: plain types shared by every layer; states are enums.
//! - [`wire`]: model → `taskmesh.v1` messages.
//! - [`store`]: [`store::Store`], the only owner of the database pool.
//! - [`domain`]: [`domain::Domain`], every rule: tenancy, tokens, the task
//!   state machine, dispatch, output, liveness.
//! - [`api`]: thin gRPC handlers, one per service; domain errors become a
//!   `tonic::Status` there, once.
//! - [`cluster`]: replicas on one PostgreSQL database (LISTEN/NOTIFY).
//! - [`server`]: one port for gRPC, gRPC-web, reflection, health and the page.
//! - [`conn`]: accepted connections: TCP_NODELAY, TLS handshakes off the
//!   accept loop, what a request knows of its connection, idle ones closed.
//! - [`tls`]: rustls for the one port, reloaded when the files change.
//! - [`cmd`]: `taskmesh serve` and `taskmesh token create`: flags and startup.
//!
//! ARCHITECTURE.md tells how a request and a daemon's stream flow through them.

pub mod api;
pub mod cluster;
pub mod cmd;
pub mod conn;
pub mod domain;
pub mod metrics;
pub mod model;
pub mod server;
pub mod store;
pub mod tls;
pub mod wire;

pub use taskmesh_proto::pb;
