//! The OCI registry client: manifests and blobs by GET/HEAD, `Range`, anonymous/basic/bearer auth
//! with a token cache, per-registry TLS, timeouts and bounded retries.

pub mod auth;
mod client;

pub use client::{backoff, error_chain, header_len, Registry, RegistryClient, RegistryError, Request, Target};

/// Media types asked for when a client does not say what it accepts: every manifest and index kind
/// containerd understands, so multi-platform images resolve.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";
