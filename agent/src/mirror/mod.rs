//! The registry mirror containerd pulls through (`hosts.toml` → `http://127.0.0.1:65001`).
//! Manifests are proxied to the origin (cached only by digest); blobs go through the engine, so N
//! requests for one blob make one origin download, and bytes stream while they arrive.

mod access;
mod blobs;
mod error;
mod manifests;
pub mod route;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Response, StatusCode};
use hyper::body::Incoming;
use lru::LruCache;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use shoal_core::config::Config;
use shoal_core::metrics::Metrics;
use shoal_core::Digest;
use tracing::{debug, warn, Instrument};

use crate::engine::Engine;
use crate::serve::{empty, full, Body};
use access::AccessCache;
pub use error::ApiError;
use route::Route;

/// A manifest kept because it was asked for (or resolved to) a digest.
#[derive(Clone)]
struct CachedManifest {
    media_type: Option<HeaderValue>,
    body: Bytes,
}

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: &'static str,
    status: u16,
}

/// The mirror's shared state.
pub struct Mirror {
    engine: Arc<Engine>,
    config: Arc<Config>,
    access: AccessCache,
    /// Manifests by (registry, digest): one registry's answer never serves another's clients.
    manifests: Mutex<LruCache<(String, Digest), CachedManifest>>,
    requests: Family<RequestLabels, Counter>,
}

/// Everything a handler needs to know about one request.
pub(crate) struct Call {
    /// Upstream registry host.
    registry: String,
    /// The request's method is HEAD.
    head: bool,
    /// The client's Authorization header, forwarded upstream.
    authorization: Option<HeaderValue>,
    /// The request headers.
    headers: http::HeaderMap,
}

impl Mirror {
    /// A mirror serving through `engine`.
    pub fn new(engine: Arc<Engine>, config: Arc<Config>, metrics: &Metrics) -> Mirror {
        let requests = Family::<RequestLabels, Counter>::default();
        metrics.register("mirror_requests", "Mirror requests by kind and status", requests.clone());
        let entries = std::num::NonZeroUsize::new(config.mirror.manifest_cache_entries.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        Mirror {
            engine,
            access: AccessCache::new(
                Duration::from_secs(config.mirror.auth_cache_seconds),
                Duration::from_secs(config.mirror.offline_grant_seconds),
            ),
            config,
            manifests: Mutex::new(LruCache::new(entries)),
            requests,
        }
    }

    /// Answers one request; never panics on bad input, always answers.
    pub async fn handle(self: Arc<Self>, req: http::Request<Incoming>) -> Response<Body> {
        let span = tracing::info_span!("mirror", method = %req.method(), path = %req.uri().path());
        async move {
            let (kind, resp) = match self.dispatch(&req).await {
                Ok(r) => r,
                Err(e) => {
                    // Server-side failures are the operator's to see; client mistakes stay at debug.
                    if e.status.is_server_error() {
                        warn!(status = e.status.as_u16(), error = %e.message, "request failed");
                    } else {
                        debug!(status = e.status.as_u16(), error = %e.message, "request refused");
                    }
                    ("error", error_response(&e, req.method() == http::Method::HEAD))
                }
            };
            debug!(status = resp.status().as_u16(), "answered");
            self.requests.get_or_create(&RequestLabels { kind, status: resp.status().as_u16() }).inc();
            resp
        }
        .instrument(span)
        .await
    }

    async fn dispatch(&self, req: &http::Request<Incoming>) -> Result<(&'static str, Response<Body>), ApiError> {
        let route = route::route(req.method(), req.uri().path())?;
        if route == Route::Root {
            let resp = Response::builder()
                .header("Docker-Distribution-API-Version", "registry/2.0")
                .header(CONTENT_TYPE, "application/json")
                .body(full("{}"))
                .unwrap_or_else(|_| Response::new(empty()));
            return Ok(("root", resp));
        }
        let call = Call {
            registry: self.upstream(req.uri().query())?,
            head: req.method() == http::Method::HEAD,
            authorization: req.headers().get(AUTHORIZATION).cloned(),
            headers: req.headers().clone(),
        };
        match route {
            Route::Blob { repository, digest } => Ok(("blob", self.blob(&call, repository, digest).await?)),
            Route::Manifest { repository, reference } => Ok(("manifest", self.manifest(&call, repository, reference).await?)),
            Route::Root => unreachable!("answered above"),
        }
    }

    /// The upstream a request is for: `?ns=`, else the configured default.
    fn upstream(&self, query: Option<&str>) -> Result<String, ApiError> {
        let registry = match route::namespace(query)? {
            Some(ns) => ns,
            None => self.config.mirror.default_registry.clone().ok_or_else(|| {
                ApiError::unknown_registry("no ?ns=<registry> in the request and no [mirror] default_registry configured".into())
            })?,
        };
        if self.config.mirror.only_configured_registries && !self.config.registry.contains_key(&registry) {
            return Err(ApiError::unknown_registry(format!(
                "registry {registry} is not configured (add [registry.\"{registry}\"] to shoal.toml or set only_configured_registries = false)"
            )));
        }
        Ok(registry)
    }
}

/// A registry-style JSON error answer.
pub(crate) fn error_response(e: &ApiError, head: bool) -> Response<Body> {
    let body = e.body();
    let len = body.len();
    Response::builder()
        .status(e.status)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, len)
        .body(if head { empty() } else { full(body) })
        .unwrap_or_else(|_| Response::new(empty()))
}

/// Passes an upstream refusal (401 with its challenge, 403, 404, ...) back to the client as is.
pub(crate) async fn upstream_refusal(resp: reqwest::Response, head: bool) -> Response<Body> {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut out = Response::builder().status(status);
    for name in [http::header::WWW_AUTHENTICATE, CONTENT_TYPE, http::header::RETRY_AFTER] {
        for v in resp.headers().get_all(&name) {
            out = out.header(&name, v);
        }
    }
    let body = if head {
        empty()
    } else {
        // Error bodies are small; cap what we relay.
        let bytes = resp.bytes().await.unwrap_or_default();
        full(bytes.slice(..bytes.len().min(64 << 10)))
    };
    out.body(body).unwrap_or_else(|_| Response::new(empty()))
}
