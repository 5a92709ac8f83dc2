//! The scheduler: which peers hold which pieces of which task, and, for a peer that wants a task,
//! which parents it should fetch from or whether it should go back to the origin.
//!
//! The core is sans-IO: [`Cluster`] is plain data driven by announcements and a caller-supplied
//! clock (milliseconds), so every scheduling decision is tested deterministically. The gRPC service
//! that feeds it lives beside it and stays thin; who may call what is decided by [`auth`], plain
//! functions of a call's token, method and named host.

pub mod auth;
pub mod cluster;
pub mod hosts;
pub mod jobs;
pub mod manifests;
pub mod parents;
pub mod service;
pub mod traces;

pub use cluster::{Cluster, Decision, Limits, PeerStatus};
pub use hosts::{HostId, HostInfo};
