//! Generates the gRPC code from proto/ with the pure-Rust protox compiler, so
//! building needs no system protoc. The encoded descriptor set is written to
//! OUT_DIR for server reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/taskmesh/v1/task.proto",
        "proto/taskmesh/v1/daemon.proto",
        "proto/taskmesh/v1/workspace.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("taskmesh_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
