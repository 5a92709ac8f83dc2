//! Shoal's wire protocols, generated from `proto/*.proto`: the scheduler's gRPC API and the
//! messages of the QUIC peer protocol.

/// The scheduler API (`shoal.scheduler.v1`).
pub mod scheduler {
    tonic::include_proto!("shoal.scheduler.v1");
}

/// The peer protocol (`shoal.peer.v1`): length-delimited messages on QUIC streams.
pub mod peer {
    tonic::include_proto!("shoal.peer.v1");
}
