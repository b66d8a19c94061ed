//! The floor service (taskmesh.bench.v1) is compiled here, apart from the
//! product's protocol, so reflection never lists it.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/taskmesh/bench/v1/bench.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
