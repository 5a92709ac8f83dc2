//! The Shoal node agent: the registry mirror containerd pulls through, the download engine behind
//! it, and the admin endpoint.

pub mod admin;
pub mod daemon;
pub mod engine;
pub mod mirror;
pub mod p2p;
pub mod peer;
mod ratelimit;
pub mod schedulers;
pub mod serve;
mod sparse;

pub use daemon::{run, StartError};
