//! Shoal's wire protocols, generated from `proto/*.proto`: the scheduler's gRPC API, the
//! messages of the QUIC peer protocol, and the server side of containerd's snapshots API.

/// The scheduler API (`shoal.scheduler.v1`).
pub mod scheduler {
    tonic::include_proto!("shoal.scheduler.v1");
}

/// The peer protocol (`shoal.peer.v1`): length-delimited messages on QUIC streams.
pub mod peer {
    tonic::include_proto!("shoal.peer.v1");
}

/// containerd's snapshots API (`containerd.services.snapshots.v1`, vendored from containerd 1.6):
/// the server a proxy snapshotter plugin answers. Mounts are `containerd_client::types::Mount`.
pub mod snapshots {
    tonic::include_proto!("containerd.services.snapshots.v1");
}
