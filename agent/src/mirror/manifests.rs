//! `GET|HEAD /v2/<name>/manifests/<ref>`: proxied to the origin with the client's `Accept` and
//! credentials. Answers are checked against their digest and kept by digest, never by tag.

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Response};
use shoal_core::registry::{Request, Target, MANIFEST_ACCEPT};
use shoal_core::Digest;

use super::access::Freshness;
use super::route::ManifestRef;
use super::{upstream_refusal, ApiError, CachedManifest, Call, Mirror};
use crate::serve::{empty, full, Body};
use tracing::warn;

/// Largest manifest accepted; registries cap them at 4 MiB too.
const MAX_MANIFEST: usize = 4 << 20;

impl Mirror {
    pub(super) async fn manifest(&self, call: &Call, repository: String, reference: ManifestRef) -> Result<Response<Body>, ApiError> {
        let auth = call.authorization.as_ref();
        if let ManifestRef::Digest(d) = &reference {
            if let Some(m) = self.cached_manifest(call, &repository, d, Freshness::Online) {
                return respond(d, m.media_type, m.body, call.head);
            }
        }
        let req = Request {
            method: if call.head { Method::HEAD } else { Method::GET },
            registry: call.registry.clone(),
            repository: repository.clone(),
            target: Target::Manifest(reference.to_string()),
            accept: Some(call.headers.get(ACCEPT).cloned().unwrap_or(http::HeaderValue::from_static(MANIFEST_ACCEPT))),
            range: None,
            authorization: call.authorization.clone(),
        };
        let resp = match self.engine.registry().send(&req).await {
            Ok(resp) if !resp.status().is_server_error() => resp,
            Ok(resp) => {
                let problem = format!("manifest {repository}:{reference} from {}: {}", call.registry, resp.status());
                return self.offline_manifest(call, &repository, &reference, problem).await;
            }
            Err(e) => return self.offline_manifest(call, &repository, &reference, e.to_string()).await,
        };
        if !resp.status().is_success() {
            if let ManifestRef::Digest(d) = &reference {
                self.access.revoke(&call.registry, &repository, d, auth);
            }
            return Ok(upstream_refusal(resp, call.head).await);
        }
        let media_type = resp.headers().get(CONTENT_TYPE).cloned();
        let header_digest =
            resp.headers().get("Docker-Content-Digest").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<Digest>().ok());
        if call.head {
            let mut out = Response::builder();
            for name in [CONTENT_TYPE, CONTENT_LENGTH] {
                if let Some(v) = resp.headers().get(&name) {
                    out = out.header(name, v);
                }
            }
            // Only a digest the client named is granted on a HEAD: the registry's header is
            // not checked against any bytes here.
            if let ManifestRef::Digest(d) = &reference {
                self.access.grant(&call.registry, &repository, d, auth);
            }
            if let Some(d) = header_digest.or(match &reference {
                ManifestRef::Digest(d) => Some(d.clone()),
                ManifestRef::Tag(_) => None,
            }) {
                out = out.header("Docker-Content-Digest", d.to_string());
            }
            return out.body(empty()).map_err(|e| ApiError::upstream(e.to_string()));
        }
        let body = read_limited(resp, MAX_MANIFEST).await.map_err(ApiError::manifest_invalid)?;
        let digest = Digest::of(&body);
        if let ManifestRef::Digest(want) = &reference {
            if *want != digest {
                return Err(ApiError::manifest_invalid(format!(
                    "manifest {repository}@{want} from {}: content has digest {digest}",
                    call.registry
                )));
            }
        }
        self.access.grant(&call.registry, &repository, &digest, auth);
        let cached = CachedManifest { media_type: media_type.clone(), body: body.clone() };
        self.manifests.lock().unwrap_or_else(|p| p.into_inner()).put((call.registry.clone(), digest.clone()), cached);
        respond(&digest, media_type, body, false)
    }

    /// The manifest `digest` of `call`'s registry, if kept here and this client may read it there.
    fn cached_manifest(&self, call: &Call, repository: &str, digest: &Digest, fresh: Freshness) -> Option<CachedManifest> {
        if !self.access.allowed(&call.registry, repository, digest, call.authorization.as_ref(), fresh) {
            return None;
        }
        self.manifests.lock().unwrap_or_else(|p| p.into_inner()).get(&(call.registry.clone(), digest.clone())).cloned()
    }

    /// The origin cannot be reached (`problem`): answer from what this host kept, or from the
    /// manifests a preheat recorded in the cluster, but only to a client the origin let read that
    /// manifest digest within the offline window. A recorded manifest tells which digest a tag
    /// named; it never grants access by itself.
    async fn offline_manifest(
        &self,
        call: &Call,
        repository: &str,
        reference: &ManifestRef,
        problem: String,
    ) -> Result<Response<Body>, ApiError> {
        if let ManifestRef::Digest(d) = reference {
            if let Some(m) = self.cached_manifest(call, repository, d, Freshness::Offline) {
                warn!(registry = %call.registry, %repository, %reference, error = %problem, "origin unreachable; serving the manifest kept here");
                return respond(d, m.media_type, m.body, call.head);
            }
        }
        self.recorded_manifest(call, repository, reference, problem).await
    }

    /// The origin cannot be reached (`problem`): answer from the manifests a preheat recorded in the
    /// cluster, to a client the origin let read that manifest digest within the offline window
    /// (whatever the preheat said of the image being public).
    async fn recorded_manifest(
        &self,
        call: &Call,
        repository: &str,
        reference: &ManifestRef,
        problem: String,
    ) -> Result<Response<Body>, ApiError> {
        let Some(p2p) = self.engine.p2p() else { return Err(ApiError::upstream(problem)) };
        let Some(m) = p2p.recorded_manifest(&call.registry, repository, &reference.to_string()).await else {
            return Err(ApiError::upstream(problem));
        };
        let digest = Digest::of(&m.body);
        let wanted = match reference {
            ManifestRef::Digest(d) => d.to_string(),
            ManifestRef::Tag(_) => m.digest.clone(),
        };
        if digest.to_string() != wanted {
            return Err(ApiError::manifest_invalid(format!(
                "manifest {repository}:{reference} recorded by the scheduler has digest {digest}, not {wanted}"
            )));
        }
        let auth = call.authorization.as_ref();
        if !self.access.allowed(&call.registry, repository, &digest, auth, Freshness::Offline) {
            if auth.is_none() {
                // Clients send credentials only when challenged; the registry cannot challenge now.
                let refusal = ApiError::unauthorized(format!(
                    "{repository}:{reference} cannot be checked while the registry is down; send the credentials the registry accepted before"
                ));
                let mut resp = super::error_response(&refusal, call.head);
                let challenge = format!("Basic realm=\"{}\"", call.registry);
                if let Ok(v) = http::HeaderValue::from_str(&challenge) {
                    resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
                }
                return Ok(resp);
            }
            return Err(ApiError::upstream(format!(
                "{problem}; the cluster holds {repository}:{reference}, but this client's access cannot be checked while the registry is down (the registry did not let it read this manifest within [mirror] offline_grant_seconds)"
            )));
        }
        warn!(registry = %call.registry, %repository, %reference, error = %problem, "origin unreachable; serving the manifest a preheat recorded");
        let media_type = http::HeaderValue::from_str(&m.media_type).ok().filter(|_| !m.media_type.is_empty());
        let body = Bytes::from(m.body);
        let cached = CachedManifest { media_type: media_type.clone(), body: body.clone() };
        self.manifests.lock().unwrap_or_else(|p| p.into_inner()).put((call.registry.clone(), digest.clone()), cached);
        respond(&digest, media_type, body, call.head)
    }
}

fn respond(digest: &Digest, media_type: Option<http::HeaderValue>, body: Bytes, head: bool) -> Result<Response<Body>, ApiError> {
    let mut out = Response::builder().header(CONTENT_LENGTH, body.len()).header("Docker-Content-Digest", digest.to_string());
    if let Some(t) = media_type {
        out = out.header(CONTENT_TYPE, t);
    }
    out.body(if head { empty() } else { full(body) }).map_err(|e| ApiError::upstream(e.to_string()))
}

async fn read_limited(resp: reqwest::Response, limit: usize) -> Result<Bytes, String> {
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("reading manifest: {e}"))?;
        if out.len() + chunk.len() > limit {
            return Err(format!("manifest larger than {limit} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.into())
}
