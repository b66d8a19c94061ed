//! taskmesh: a gRPC control plane for coding-agent daemons.
//!
//! - [`pb`]: the generated `taskmesh.v1` types, clients and servers.
//! - [`model`]: plain types shared by every layer; states are enums.
//! - [`store`]: [`store::Store`], the only owner of the database pool.
//! - [`domain`]: [`domain::Domain`], tenancy, tokens and the task state machine.
//! - [`api`]: thin gRPC handlers, one per service.
//! - [`server`]: one port for gRPC, gRPC-web, reflection, health and the page.
//! - [`cli`]: `taskmesh task …` and `taskmesh daemons`, clients for people.
//! - [`bench`]: `taskmesh bench`, the benchmark beside its floors.
//!
//! ARCHITECTURE.md tells how a request flows through them.

pub mod api;
pub mod bench;
pub mod cli;
pub mod cluster;
mod convert;
pub mod daemon;
pub mod domain;
pub mod model;
pub mod server;
pub mod store;

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("taskmesh.v1");

    /// The encoded descriptors of every taskmesh.v1 file, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/taskmesh_descriptor.bin"));
}
