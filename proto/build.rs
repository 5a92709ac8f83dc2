//! Generates Rust from the `.proto` files with the vendored `protoc`, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/scheduler.proto", "proto/peer.proto"], &["proto"])?;
    // containerd's snapshots API, vendored from containerd 1.6: only the server is generated here
    // (containerd calls it); `Mount` is containerd-client's own type.
    tonic_prost_build::configure()
        .build_client(false)
        .extern_path(".containerd.types", "::containerd_client::types")
        .compile_protos(&["proto/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto"], &["proto"])?;
    Ok(())
}
