//! Any bytes as the request of any RPC, with any kind of token: the first
//! byte picks the method, the second the token, the rest is the body. The
//! server answers every one with a status that names the caller's mistake
//! (or OK), never INTERNAL or UNKNOWN, and never panics.
#![no_main]

mod world;

use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;
use taskmesh_testkit::raw::{Shape, call, every_rpc};

/// Unary and server-streaming methods; the Session has its own target.
static METHODS: LazyLock<Vec<(String, Shape)>> = LazyLock::new(|| {
    every_rpc()
        .into_iter()
        .filter(|(_, shape)| *shape != Shape::Bidi)
        .collect()
});

fuzz_target!(|data: &[u8]| {
    let [method, token, body @ ..] = data else {
        return;
    };
    let w = &*world::WORLD;
    let (path, shape) = &METHODS[usize::from(*method) % METHODS.len()];
    let token = match token % 4 {
        0 => Some(w.user.as_str()),
        1 => Some(w.viewer.as_str()),
        2 => Some(w.daemon.as_str()),
        _ => None,
    };
    let status =
        w.rt.block_on(call(&w.server, path, *shape, token, body.to_vec()));
    assert!(
        !world::is_servers_fault(status.code()),
        "{path} answered {status:?}"
    );
});
