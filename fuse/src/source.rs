//! Where chunk bytes come from: a byte range of a chunk blob, read from a local directory or
//! fetched with an HTTP `Range` request from the local agent's registry mirror (so peers serve
//! it) or from the registry itself.
//!
//! A source only moves bytes; the caller checks every chunk's blake3 digest before using it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{CACHE_CONTROL, RANGE};
use http::StatusCode;
use shoal_core::config::CHECKED_RANGES_HEADER;
use shoal_core::registry::{backoff, error_chain, RegistryClient, Request};
use shoal_core::Digest;
use thiserror::Error;
use tracing::debug;

use crate::format::Blob;

/// How many times a failed HTTP range request is tried in all.
const HTTP_ATTEMPTS: u32 = 3;

/// Why a range of a chunk blob could not be had.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The blob could not be read from the local directory.
    #[error("blob {digest} in {dir}: {reason} (is --blobs the directory holding the image's chunk blobs, named by digest hex?)")]
    Local {
        /// The blob's digest.
        digest: String,
        /// The directory searched.
        dir: String,
        /// What went wrong.
        reason: String,
    },
    /// The HTTP request failed or was answered with an error.
    #[error("blob {digest} bytes {start}-{end} from {from}: {reason}")]
    Http {
        /// The blob's digest.
        digest: String,
        /// First byte asked for.
        start: u64,
        /// Last byte asked for (inclusive).
        end: u64,
        /// Where it was asked.
        from: String,
        /// What went wrong.
        reason: String,
    },
}

/// Gives byte ranges of chunk blobs.
pub trait ChunkSource: Send + Sync + 'static {
    /// Fetches `len` bytes at `offset` of chunk blob `blob`.
    fn fetch(&self, blob: Blob, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, SourceError>>;

    /// Fetches like [`fetch`](Self::fetch), bypassing whatever cache the source keeps: for a
    /// range whose bytes did not match their digest. The default fetches again.
    fn fetch_fresh(&self, blob: Blob, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        self.fetch(blob, offset, len)
    }

    /// Where the bytes come from, for logs.
    fn describe(&self) -> String;

    /// Whether bytes come without waiting on a network, so [`fetch_now`](Self::fetch_now)
    /// may be called on any thread.
    fn is_local(&self) -> bool {
        false
    }

    /// Fetches like [`fetch`](Self::fetch), blocking the calling thread; `None` when this
    /// source cannot (it is not local).
    fn fetch_now(&self, _blob: Blob, _offset: u64, _len: u32) -> Option<Result<Bytes, SourceError>> {
        None
    }
}

/// Chunk blobs in a local directory, each in a file named by its digest's hex
/// (`shoal mount --blobs DIR`, or an OCI layout's `blobs/sha256`). Each blob file is opened
/// once and kept open, so the kernel's readahead follows reads through it.
#[derive(Debug, Clone)]
pub struct BlobDir {
    /// The directory.
    dir: PathBuf,
    /// Blob files opened so far, by sha256.
    open: Arc<Mutex<HashMap<[u8; 32], Arc<std::fs::File>>>>,
}

impl BlobDir {
    /// Blobs in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        BlobDir { dir, open: Arc::default() }
    }

    fn read(&self, blob: Blob, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        use std::os::unix::fs::FileExt;
        let fail = |reason: String| SourceError::Local { digest: blob.digest(), dir: self.dir.display().to_string(), reason };
        let file = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            match open.get(&blob.sha256) {
                Some(file) => file.clone(),
                None => {
                    let file = Arc::new(std::fs::File::open(self.dir.join(hex::encode(blob.sha256))).map_err(|e| fail(e.to_string()))?);
                    open.insert(blob.sha256, file.clone());
                    file
                }
            }
        };
        let mut data = vec![0; len as usize];
        file.read_exact_at(&mut data, offset).map_err(|e| fail(format!("reading {len} bytes at {offset}: {e}")))?;
        Ok(Bytes::from(data))
    }
}

impl ChunkSource for BlobDir {
    fn fetch(&self, blob: Blob, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        let this = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || this.read(blob, offset, len)).await.unwrap_or_else(|e| {
                Err(SourceError::Local { digest: blob.digest(), dir: String::new(), reason: format!("reader task failed: {e}") })
            })
        })
    }

    fn describe(&self) -> String {
        format!("blobs in {}", self.dir.display())
    }

    fn is_local(&self) -> bool {
        true
    }

    fn fetch_now(&self, blob: Blob, offset: u64, len: u32) -> Option<Result<Bytes, SourceError>> {
        Some(self.read(blob, offset, len))
    }
}

/// Chunk blobs fetched by `Range` through a Shoal agent's registry mirror
/// (`<mirror>/v2/<repo>/blobs/<digest>?ns=<registry>`), so the bytes come from peers.
#[derive(Debug, Clone)]
pub struct MirrorBlobs {
    /// The HTTP client.
    http: reqwest::Client,
    /// `http://host:port` of the mirror.
    base: String,
    /// The registry the image is in, as containerd names it.
    registry: String,
    /// The image's repository.
    repository: String,
}

impl MirrorBlobs {
    /// Blobs of `registry/repository` through the mirror at `base` (`http://127.0.0.1:65001`).
    pub fn new(base: &str, registry: &str, repository: &str) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).read_timeout(Duration::from_secs(60)).build()?;
        Ok(MirrorBlobs { http, base: base.trim_end_matches('/').to_string(), registry: registry.into(), repository: repository.into() })
    }

    /// One range request, saying that this reader checks what it reads (so the agent may serve
    /// and keep pieces of a blob it has not checked whole); with `fresh`, `Cache-Control:
    /// no-cache` tells the agent to forget the pieces it holds for the range and read it from the
    /// origin.
    async fn fetch_once(&self, blob: Blob, offset: u64, len: u32, fresh: bool) -> Result<Bytes, (bool, String)> {
        let end = offset + u64::from(len) - 1;
        let url = format!("{}/v2/{}/blobs/{}", self.base, self.repository, blob.digest());
        let mut req = self
            .http
            .get(url)
            .query(&[("ns", &self.registry)])
            .header(RANGE, format!("bytes={offset}-{end}"))
            .header(CHECKED_RANGES_HEADER, "blake3");
        if fresh {
            req = req.header(CACHE_CONTROL, "no-cache");
        }
        let resp = req.send().await.map_err(|e| (true, error_chain(&e)))?;
        let status = resp.status();
        if status != StatusCode::PARTIAL_CONTENT {
            return Err((status.is_server_error(), format!("answered {status} to a range request")));
        }
        let body = resp.bytes().await.map_err(|e| (true, error_chain(&e)))?;
        check_len(body, len).map_err(|reason| (false, reason))
    }

    /// A range, tried up to [`HTTP_ATTEMPTS`] times while the failure may pass.
    async fn fetch_range(&self, blob: Blob, offset: u64, len: u32, fresh: bool) -> Result<Bytes, SourceError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.fetch_once(blob, offset, len, fresh).await {
                Ok(bytes) => return Ok(bytes),
                Err((true, reason)) if attempt < HTTP_ATTEMPTS => {
                    debug!(blob = %blob.digest(), offset, len, attempt, %reason, "retrying a chunk range from the mirror");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err((_, reason)) => {
                    return Err(SourceError::Http {
                        digest: blob.digest(),
                        start: offset,
                        end: offset + u64::from(len) - 1,
                        from: format!("the mirror at {}", self.base),
                        reason,
                    })
                }
            }
        }
    }
}

impl ChunkSource for MirrorBlobs {
    fn fetch(&self, blob: Blob, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(self.fetch_range(blob, offset, len, false))
    }

    fn fetch_fresh(&self, blob: Blob, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(self.fetch_range(blob, offset, len, true))
    }

    fn describe(&self) -> String {
        format!("{}/{} through the mirror at {}", self.registry, self.repository, self.base)
    }
}

/// Chunk blobs fetched by `Range` from the registry itself, with the registry client's
/// credentials, TLS settings and retries.
#[derive(Clone)]
pub struct RegistryBlobs {
    /// The registry client.
    client: Arc<RegistryClient>,
    /// The registry host.
    registry: String,
    /// The image's repository.
    repository: String,
}

impl std::fmt::Debug for RegistryBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryBlobs").field("registry", &self.registry).field("repository", &self.repository).finish_non_exhaustive()
    }
}

impl RegistryBlobs {
    /// Blobs of `registry/repository`.
    pub fn new(client: Arc<RegistryClient>, registry: &str, repository: &str) -> Self {
        RegistryBlobs { client, registry: registry.into(), repository: repository.into() }
    }
}

impl ChunkSource for RegistryBlobs {
    fn fetch(&self, blob: Blob, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            let end = offset + u64::from(len);
            let fail = |reason: String| SourceError::Http {
                digest: blob.digest(),
                start: offset,
                end: end - 1,
                from: format!("{}/{}", self.registry, self.repository),
                reason,
            };
            let digest: Digest = blob.digest().parse().map_err(|e: shoal_core::digest::DigestError| fail(e.to_string()))?;
            let mut req = Request::blob(&self.registry, &self.repository, &digest);
            req.range = Some((offset, end));
            let resp = self.client.send(&req).await.map_err(|e| fail(e.to_string()))?;
            let status = resp.status();
            if status != StatusCode::PARTIAL_CONTENT {
                return Err(fail(format!("answered {status} to a range request")));
            }
            let body = resp.bytes().await.map_err(|e| fail(error_chain(&e)))?;
            check_len(body, len).map_err(fail)
        })
    }

    fn describe(&self) -> String {
        format!("{}/{} from the registry", self.registry, self.repository)
    }
}

fn check_len(body: Bytes, len: u32) -> Result<Bytes, String> {
    if body.len() != len as usize {
        return Err(format!("sent {} bytes for a {len}-byte range", body.len()));
    }
    Ok(body)
}
