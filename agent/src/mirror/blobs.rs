//! `GET|HEAD /v2/<name>/blobs/<digest>`: access check with the origin, then bytes from the engine.

use futures_util::stream;
use http::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, RANGE};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use shoal_core::registry::{header_len, Request};
use shoal_core::{Digest, TaskId};
use tracing::warn;

use super::route::{byte_range, ByteRange};
use super::{upstream_refusal, ApiError, Call, Mirror};
use crate::engine::{BlobReader, Opened, Origin};
use crate::serve::{empty, Body};

impl Mirror {
    pub(super) async fn blob(&self, call: &Call, repository: String, digest: Digest) -> Result<Response<Body>, ApiError> {
        let origin = Origin {
            registry: call.registry.clone(),
            repository: repository.clone(),
            digest: digest.clone(),
            authorization: call.authorization.clone(),
        };
        let auth = call.authorization.as_ref();
        let allowed = self.access.allowed(&call.registry, &repository, auth);
        let known = if allowed { self.engine.known_len(&digest) } else { None };
        let len = match known {
            Some(len) => len,
            None => {
                // Ask the origin whether this client may read the blob, and how long it is.
                let mut head = Request::blob(&call.registry, &repository, &digest);
                head.method = Method::HEAD;
                head.authorization = call.authorization.clone();
                let problem = match self.engine.registry().send(&head).await {
                    Ok(resp) if resp.status().is_success() => {
                        self.access.grant(&call.registry, &repository, auth);
                        match header_len(&resp).filter(|_| resp.status() == reqwest::StatusCode::OK) {
                            Some(len) => return self.serve_blob(call, origin, len).await,
                            None => return Err(ApiError::upstream(format!("origin gave no length for blob {digest}"))),
                        }
                    }
                    Ok(resp) if !resp.status().is_server_error() => return Ok(upstream_refusal(resp, call.head).await),
                    Ok(resp) => format!("blob {digest} from {}: {}", call.registry, resp.status()),
                    Err(e) => e.to_string(),
                };
                // The origin cannot be reached. A client already allowed to read the repository
                // (or a public one, see the recorded manifests) may still get what the cluster holds.
                let cluster_len = match (allowed, self.engine.p2p()) {
                    (true, Some(p2p)) => p2p.task_len(&TaskId::of_digest(&digest)).await,
                    _ => None,
                };
                match cluster_len {
                    Some(len) => {
                        warn!(%digest, error = %problem, "origin unreachable; fetching the blob from the cluster");
                        len
                    }
                    None => return Err(ApiError::upstream(problem)),
                }
            }
        };
        self.serve_blob(call, origin, len).await
    }

    /// Answers with `len` bytes of `origin`'s blob (or the requested range) from the engine.
    async fn serve_blob(&self, call: &Call, origin: Origin, len: u64) -> Result<Response<Body>, ApiError> {
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
        let whole = status == StatusCode::OK;
        let reader = match self.engine.open(&origin, len).await {
            Opened::Task(task) => self.engine.reader(task, bytes, whole),
            Opened::Direct(e) => {
                warn!(%digest, error = %e, "streaming blob from the origin without storing it");
                self.engine.direct_reader(origin, bytes)
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
