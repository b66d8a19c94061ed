//! One in-process server on a throwaway SQLite database, shared by every
//! run of a target, with a user token and a daemon token of workspace
//! `default`.

use std::sync::LazyLock;

use taskmesh_server::model::TokenKind;
use taskmesh_testkit::{Backend, TestDb, TestServer, start_server_on};
use tokio::runtime::Runtime;

/// Each target uses part of it.
#[allow(dead_code)]
pub struct World {
    pub rt: Runtime,
    pub server: TestServer,
    pub user: String,
    pub viewer: String,
    pub daemon: String,
}

pub static WORLD: LazyLock<World> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let (server, viewer, daemon) = rt.block_on(async {
        let server = start_server_on(TestDb::new(Backend::Sqlite).await).await;
        let viewer = server.token_in("default", TokenKind::Viewer).await;
        let daemon = server.token_in("default", TokenKind::Daemon).await;
        (server, viewer, daemon)
    });
    World {
        rt,
        user: server.token.clone(),
        server,
        viewer,
        daemon,
    }
});

/// Codes that mean the server, not the caller, went wrong.
pub fn is_servers_fault(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::DataLoss
    )
}
