//! Pushing to a registry: blob uploads (monolithic, streamed from a file or from memory),
//! cross-repository blob mounts and manifest PUTs, authenticated with push-scoped tokens.
//!
//! `shoal build` uses these to store a converted image in any OCI registry.

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use http::{Method, StatusCode};
use tracing::debug;

use super::{backoff, basic_header, bearer_header, send_with_retries, RegistryClient, RegistryError, Request, Target};
use crate::digest::Digest;
use crate::registry::auth::{parse_challenge, Challenge, TokenCache};

/// Hint attached to a refused push.
const PUSH_AUTH_HINT: &str =
    " (the registry refused the push: set username/password with push rights under [registry.\"<host>\"] in shoal.toml)";

/// What a push sends as its body, rebuilt for every attempt.
enum Body<'a> {
    /// No body.
    Empty,
    /// Bytes held in memory.
    Bytes(&'a Bytes),
    /// A file's whole content, of this length.
    File(&'a Path, u64),
}

impl Body<'_> {
    fn build(&self) -> std::io::Result<(reqwest::Body, u64)> {
        Ok(match self {
            Body::Empty => (reqwest::Body::from(Vec::new()), 0),
            Body::Bytes(bytes) => (reqwest::Body::from((*bytes).clone()), bytes.len() as u64),
            Body::File(path, len) => {
                let file = std::fs::File::open(path)?;
                (reqwest::Body::from(tokio::fs::File::from_std(file)), *len)
            }
        })
    }
}

/// One push request: where it goes and what it carries.
struct PushRequest<'a> {
    /// `POST` or `PUT` (or `HEAD`).
    method: Method,
    /// The registry host.
    registry: &'a str,
    /// The repository pushed to (the token scope).
    repository: &'a str,
    /// What the request is about, for error messages.
    what: String,
    /// A path under the registry's base, or an absolute URL (an upload location).
    url: String,
    /// `Content-Type`, when there is a body.
    content_type: Option<&'a str>,
    /// The body.
    body: Body<'a>,
}

impl RegistryClient {
    /// Whether `repository` of `registry` already holds blob `digest`.
    pub async fn blob_exists(&self, registry: &str, repository: &str, digest: &Digest) -> Result<bool, RegistryError> {
        let mut head = Request::blob(registry, repository, digest);
        head.method = Method::HEAD;
        let resp = self.send(&head).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(RegistryError::from_status(&head, s)),
        }
    }

    /// Makes blob `digest` of repository `from` available in `repository` of the same registry
    /// without sending its bytes. Returns false when the registry did not mount it (it then has
    /// to be uploaded).
    pub async fn mount_blob(&self, registry: &str, repository: &str, digest: &Digest, from: &str) -> Result<bool, RegistryError> {
        let req = PushRequest {
            method: Method::POST,
            registry,
            repository,
            what: format!("mounting blob {digest} from {registry}/{from} into {repository}"),
            url: format!("/v2/{repository}/blobs/uploads/?mount={digest}&from={from}"),
            content_type: None,
            body: Body::Empty,
        };
        let resp = self.send_push(&req).await?;
        Ok(resp.status() == StatusCode::CREATED)
    }

    /// Uploads the file at `path` (`len` bytes) as blob `digest` of `repository`, streaming it.
    pub async fn push_blob_file(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        path: &Path,
        len: u64,
    ) -> Result<(), RegistryError> {
        self.push_blob_body(registry, repository, digest, Body::File(path, len)).await
    }

    /// Uploads `bytes` as blob `digest` of `repository`.
    pub async fn push_blob_bytes(&self, registry: &str, repository: &str, digest: &Digest, bytes: &Bytes) -> Result<(), RegistryError> {
        self.push_blob_body(registry, repository, digest, Body::Bytes(bytes)).await
    }

    /// Stores `body` as the manifest `reference` (tag or digest) of `repository`; returns the
    /// manifest's digest.
    pub async fn push_manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
        media_type: &str,
        body: &Bytes,
    ) -> Result<Digest, RegistryError> {
        let what = format!("manifest {registry}/{repository}:{reference}");
        let req = PushRequest {
            method: Method::PUT,
            registry,
            repository,
            what: what.clone(),
            url: format!("/v2/{repository}/manifests/{reference}"),
            content_type: Some(media_type),
            body: Body::Bytes(body),
        };
        let resp = self.send_push(&req).await?;
        if resp.status() != StatusCode::CREATED && !resp.status().is_success() {
            return Err(push_status(&what, resp).await);
        }
        Ok(Digest::of(body))
    }

    /// A monolithic upload: `POST` opens an upload session, one `PUT` with the digest sends the
    /// whole blob. A failed attempt starts a new session.
    async fn push_blob_body(&self, registry: &str, repository: &str, digest: &Digest, body: Body<'_>) -> Result<(), RegistryError> {
        let what = format!("uploading blob {digest} to {registry}/{repository}");
        let attempts = self.retries() + 1;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.upload_once(registry, repository, digest, &body, &what).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < attempts && is_transient(&e) => {
                    debug!(%what, attempt, error = %e, "retrying upload");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn upload_once(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        body: &Body<'_>,
        what: &str,
    ) -> Result<(), RegistryError> {
        let start = PushRequest {
            method: Method::POST,
            registry,
            repository,
            what: what.to_string(),
            url: format!("/v2/{repository}/blobs/uploads/"),
            content_type: None,
            body: Body::Empty,
        };
        let resp = self.send_push(&start).await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(push_status(what, resp).await);
        }
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Protocol {
                what: what.to_string(),
                reason: "the registry opened an upload without a Location".into(),
            })?
            .to_string();
        let separator = if location.contains('?') { '&' } else { '?' };
        let finish = PushRequest {
            method: Method::PUT,
            registry,
            repository,
            what: what.to_string(),
            url: format!("{location}{separator}digest={digest}"),
            content_type: Some("application/octet-stream"),
            body: match body {
                Body::Empty => Body::Empty,
                Body::Bytes(b) => Body::Bytes(b),
                Body::File(p, l) => Body::File(p, *l),
            },
        };
        let resp = self.send_push(&finish).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(push_status(what, resp).await);
        }
        Ok(())
    }

    /// Sends one push request, authenticating with a `pull,push` token (or configured Basic
    /// credentials) when the registry asks; connection failures and 5xx answers are retried.
    async fn send_push(&self, req: &PushRequest<'_>) -> Result<reqwest::Response, RegistryError> {
        let http = self.http(req.registry)?;
        let reg = self.registry(req.registry);
        let url = if req.url.starts_with("http://") || req.url.starts_with("https://") {
            req.url.clone()
        } else {
            format!("{}{}", reg.base, req.url)
        };
        let scope = format!("repository:{}:pull,push", req.repository);
        let identity = reg.credentials.as_ref().map(|(u, _)| u.as_str()).unwrap_or("");
        let key = TokenCache::key(req.registry, &scope, identity);
        let auth = self.cached_auth(req.registry, &key, &reg);
        let resp = self.send_push_retrying(&http, req, &url, auth).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).and_then(parse_challenge);
        let auth = match challenge {
            Some(Challenge::Basic) => match &reg.credentials {
                Some((u, p)) => {
                    self.basic.lock().unwrap_or_else(|p| p.into_inner()).insert(req.registry.to_string());
                    basic_header(u, p)
                }
                None => return Ok(resp),
            },
            Some(Challenge::Bearer { realm, service, scope: challenge_scope }) => {
                let scope = challenge_scope.unwrap_or(scope);
                let describe = Request {
                    method: req.method.clone(),
                    registry: req.registry.to_string(),
                    repository: req.repository.to_string(),
                    target: Target::Root,
                    accept: None,
                    range: None,
                    authorization: None,
                };
                match self.fetch_token(&http, &describe, &reg, &realm, service.as_deref(), &scope).await? {
                    Some((token, life)) => {
                        let header = bearer_header(&token)?;
                        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).put(key, token, life, Instant::now());
                        header
                    }
                    None => return Ok(resp),
                }
            }
            None => return Ok(resp),
        };
        self.send_push_retrying(&http, req, &url, Some(auth)).await
    }

    async fn send_push_retrying(
        &self,
        http: &reqwest::Client,
        req: &PushRequest<'_>,
        url: &str,
        auth: Option<HeaderValue>,
    ) -> Result<reqwest::Response, RegistryError> {
        send_with_retries(self.retries() + 1, &req.what, req.registry, || {
            let (body, len) = req
                .body
                .build()
                .map_err(|e| RegistryError::Protocol { what: req.what.clone(), reason: format!("reading the body: {e}") })?;
            let mut r = http.request(req.method.clone(), url).header(CONTENT_LENGTH, len).body(body);
            if let Some(a) = &auth {
                r = r.header(AUTHORIZATION, a.clone());
            }
            if let Some(t) = req.content_type {
                r = r.header(CONTENT_TYPE, t);
            }
            Ok(r)
        })
        .await
    }
}

/// Turns an unexpected push answer into an error carrying the registry's own message.
async fn push_status(what: &str, resp: reqwest::Response) -> RegistryError {
    let status = resp.status();
    let hint = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => PUSH_AUTH_HINT,
        _ => "",
    };
    let body = resp.text().await.unwrap_or_default();
    let body = body.trim();
    if body.is_empty() {
        return RegistryError::Status { what: what.to_string(), status, hint };
    }
    let shown: String = body.chars().take(500).collect();
    RegistryError::Protocol { what: what.to_string(), reason: format!("{status}{hint}: {shown}") }
}

/// Whether retrying an upload from the start may succeed.
fn is_transient(e: &RegistryError) -> bool {
    match e {
        RegistryError::Unreachable { .. } => true,
        RegistryError::Status { status, .. } => status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS,
        _ => false,
    }
}
