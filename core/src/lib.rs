//! What every Shoal process shares: digests and task ids, piece math, the OCI registry client,
//! the content store, configuration and the metrics registry.

// `image.rs` names this crate `shoal_core`, as the fuzz project that includes it by path does.
extern crate self as shoal_core;

pub mod bearer;
pub mod config;
pub mod digest;
pub mod image;
pub mod metrics;
pub mod piece;
pub mod reference;
pub mod registry;
pub mod store;

pub use digest::{Digest, TaskId};
