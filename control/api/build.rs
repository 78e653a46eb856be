//! Generates the discovery and identity APIs from `control/proto` with protox, a protobuf compiler in Rust, so
//! a fresh machine builds with cargo alone (no system `protoc`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files = [
        root.join("remora/discovery/v1/discovery.proto"),
        root.join("remora/identity/v1/identity.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_server(std::env::var_os("CARGO_FEATURE_SERVER").is_some())
        .build_client(std::env::var_os("CARGO_FEATURE_CLIENT").is_some())
        // No `connect(addr)` helper: each side builds its own channel (TLS, timeouts).
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
