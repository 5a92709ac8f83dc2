//! The scheduler: which peers hold which pieces of which task, and, for a peer that wants a task,
//! which parents it should fetch from or whether it should go back to the origin.
//!
//! The core is sans-IO: [`Cluster`] (whole downloads) and [`SparseBook`] (sparse reads: single
//! pieces a lazy mount wants) are plain data driven by announcements and a caller-supplied
//! clock (milliseconds), so every scheduling decision is tested deterministically. The gRPC service
//! that feeds them lives beside them and stays thin; who may call what is decided by [`auth`], plain
//! functions of a call's token, method and named host.

pub mod auth;
pub mod cluster;
pub mod hosts;
pub mod jobs;
pub mod manifests;
pub mod parents;
pub mod service;
pub mod sparse;
pub mod traces;

pub use cluster::{Cluster, Decision, Limits, PeerStatus};
pub use hosts::{HostId, HostInfo};
pub use sparse::{PieceSource, SparseBook};
