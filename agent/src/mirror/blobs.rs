//! `GET|HEAD /v2/<name>/blobs/<digest>`: access check with the origin, then bytes from the engine.

use futures_util::stream;
use http::header::{ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, RANGE};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use shoal_core::config::CHECKED_RANGES_HEADER;
use shoal_core::registry::{header_len, Request};
use shoal_core::{Digest, TaskId};
use tracing::warn;

use super::access::Freshness;
use super::route::{byte_range, ByteRange};
use super::{upstream_refusal, ApiError, Call, Mirror};
use crate::engine::{BlobReader, Opened, Origin};
use crate::serve::{empty, Body};

/// What the origin said of a client's access to a blob.
enum Checked {
    /// It may read it; the blob is this long, and anyone may read it (`public`) or not.
    Allowed { len: u64, public: bool },
    /// The origin's refusal, passed back as is.
    Refused(Response<Body>),
}

impl Mirror {
    pub(super) async fn blob(&self, call: &Call, repository: String, digest: Digest) -> Result<Response<Body>, ApiError> {
        let origin = Origin {
            registry: call.registry.clone(),
            repository: repository.clone(),
            digest: digest.clone(),
            authorization: call.authorization.clone(),
        };
        let auth = call.authorization.as_ref();
        let allowed = self.access.allowed(&call.registry, &repository, &digest, auth, Freshness::Online);
        let known = if allowed { self.engine.known_len(&call.registry, &digest) } else { None };
        let (len, public) = match known {
            Some(len) => (len, false),
            None => match self.check(call, &repository, &digest).await? {
                Checked::Allowed { len, public } => (len, public),
                Checked::Refused(resp) => return Ok(resp),
            },
        };
        self.serve_blob(call, origin, len, public).await
    }

    /// Asks the origin (a `HEAD` of the digest in the named repository, with the client's
    /// credentials) whether this client may read the blob, and how long it is. While the origin
    /// cannot be reached, a grant it gave this client for this digest recently still counts.
    async fn check(&self, call: &Call, repository: &str, digest: &Digest) -> Result<Checked, ApiError> {
        let auth = call.authorization.as_ref();
        let mut head = Request::blob(&call.registry, repository, digest);
        head.method = Method::HEAD;
        head.authorization = call.authorization.clone();
        let problem = match self.engine.registry().send(&head).await {
            Ok(resp) if resp.status().is_success() => {
                self.access.grant(&call.registry, repository, digest, auth);
                // Without any credentials (the client's or the configured ones) the answer says
                // anyone may read the blob.
                let public = auth.is_none() && !self.config.registry(&call.registry).has_credentials();
                return match header_len(&resp).filter(|_| resp.status() == reqwest::StatusCode::OK) {
                    Some(len) => Ok(Checked::Allowed { len, public }),
                    None => Err(ApiError::upstream(format!("origin gave no length for blob {digest}"))),
                };
            }
            Ok(resp) if !resp.status().is_server_error() => {
                self.access.revoke(&call.registry, repository, digest, auth);
                return Ok(Checked::Refused(upstream_refusal(resp, call.head).await));
            }
            Ok(resp) => format!("blob {digest} from {}: {}", call.registry, resp.status()),
            Err(e) => e.to_string(),
        };
        if !self.access.allowed(&call.registry, repository, digest, auth, Freshness::Offline) {
            return Err(ApiError::upstream(format!(
                "{problem} (this client's access to {repository}@{digest} cannot be checked while the registry is down)"
            )));
        }
        // The origin let this client read this digest recently: what this host or the cluster
        // holds may go to it.
        let mut len = self.engine.known_len(&call.registry, digest);
        if let (None, Some(p2p)) = (len, self.engine.p2p()) {
            len = p2p.task_len(&TaskId::of_digest(digest)).await;
        }
        match len {
            Some(len) => {
                warn!(%digest, error = %problem, "origin unreachable; serving the blob from this host or the cluster");
                Ok(Checked::Allowed { len, public: false })
            }
            None => Err(ApiError::upstream(problem)),
        }
    }

    /// Answers with `len` bytes of `origin`'s blob (or the requested range). A whole blob goes
    /// through the engine's task (stored, shared, checked against its digest before its last byte
    /// is sent). A range comes from the task if one is complete or downloading whole here. Else,
    /// for a reader that checks what it reads ([`CHECKED_RANGES_HEADER`]: a lazy mount checks
    /// each chunk's blake3), the pieces it covers are fetched sparsely (from peers, else the
    /// origin) and kept, unchecked against the digest until the whole blob is read one day; such a
    /// reader asks again with `Cache-Control: no-cache`, which forgets them, when they do not
    /// match. Any other range comes straight from the origin and is not kept.
    async fn serve_blob(&self, call: &Call, origin: Origin, len: u64, public: bool) -> Result<Response<Body>, ApiError> {
        let digest = origin.digest.clone();
        let range = byte_range(call.headers.get(RANGE).and_then(|v| v.to_str().ok()), len);
        let (status, bytes) = match range {
            ByteRange::Whole => (StatusCode::OK, 0..len),
            ByteRange::Part(r) => (StatusCode::PARTIAL_CONTENT, r),
            ByteRange::Unsatisfiable => return Err(ApiError::range_not_satisfiable(len)),
        };
        let mut resp = Response::builder()
            .status(status)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, bytes.end - bytes.start)
            .header(ACCEPT_RANGES, "bytes")
            .header("Docker-Content-Digest", digest.to_string())
            .header(ETAG, format!("\"{digest}\""));
        if status == StatusCode::PARTIAL_CONTENT {
            resp = resp.header(CONTENT_RANGE, format!("bytes {}-{}/{len}", bytes.start, bytes.end - 1));
        }
        if call.head || bytes.is_empty() {
            return resp.body(empty()).map_err(|e| ApiError::upstream(e.to_string()));
        }
        let reader = if status == StatusCode::OK {
            match self.engine.open(&origin, len).await {
                Opened::Task(task) => {
                    if public {
                        self.engine.mark_public(&task);
                    }
                    self.engine.reader(task, bytes, true)
                }
                Opened::Direct(e) => {
                    warn!(%digest, error = %e, "streaming blob from the origin without storing it");
                    self.engine.direct_reader(origin, bytes)
                }
            }
        } else {
            let task = if call.headers.contains_key(CHECKED_RANGES_HEADER) {
                let fresh = call.headers.get(CACHE_CONTROL).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("no-cache"));
                self.engine.open_for_range(&origin, len, bytes.clone(), public, fresh).await
            } else {
                self.engine.existing(&origin)
            };
            match task {
                Some(task) => self.engine.reader(task, bytes, false),
                None => self.engine.direct_reader(origin, bytes),
            }
        };
        resp.body(reader_body(reader)).map_err(|e| ApiError::upstream(e.to_string()))
    }
}

/// A body streaming from a reader; an error aborts the response.
pub(crate) fn reader_body(reader: BlobReader) -> Body {
    let chunks = stream::unfold(reader, |mut r| async move {
        let next = r.next_chunk().await?;
        let item = next.map(Frame::data).map_err(|e| {
            warn!(error = %e, "blob stream aborted");
            std::io::Error::other(e.to_string())
        });
        Some((item, r))
    });
    BodyExt::boxed_unsync(StreamBody::new(chunks))
}
