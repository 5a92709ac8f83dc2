//! The peer protocol over QUIC: a host serves the verified pieces of its tasks to other hosts
//! (`GetPiece`) and tells them which pieces it has as they arrive (`SubscribePieces`).

mod client;
mod server;
pub mod tls;
pub mod wire;

pub use client::{PeerClient, PeerError, Subscription};
pub use server::{PeerServer, PeerServerConfig};
