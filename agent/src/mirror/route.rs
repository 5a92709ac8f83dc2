//! Turns a mirror request's method, path and query into what it asks for. Plain functions, no I/O.

use std::ops::Range;

use http::Method;
use shoal_core::reference::{is_registry_host, is_repository, is_tag};
use shoal_core::Digest;

use super::error::ApiError;

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`: API version check.
    Root,
    /// A manifest by tag or digest.
    Manifest { repository: String, reference: ManifestRef },
    /// A blob by digest.
    Blob { repository: String, digest: Digest },
}

/// A manifest reference: a tag, or a digest (which makes the answer cacheable).
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum ManifestRef {
    Tag(String),
    Digest(Digest),
}

impl std::fmt::Display for ManifestRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestRef::Tag(t) => f.write_str(t),
            ManifestRef::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// Parses the path of a read request. Only `GET` and `HEAD` are served: the mirror is read-only.
pub fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(ApiError::unsupported(format!("{method} is not supported: the mirror is read-only")));
    }
    if path == "/v2/" || path == "/v2" {
        return Ok(Route::Root);
    }
    let rest = path.strip_prefix("/v2/").ok_or_else(|| ApiError::not_found(path))?;
    // The reference is the last segment and the kind the one before it: a repository may have a
    // component named `blobs` or `manifests` itself (`team/blobs`).
    let (name_and_kind, reference) = rest.rsplit_once('/').ok_or_else(|| ApiError::not_found(path))?;
    if let Some(repository) = name_and_kind.strip_suffix("/blobs") {
        check_repository(repository)?;
        let digest = reference.parse::<Digest>().map_err(|e| ApiError::digest_invalid(e.to_string()))?;
        return Ok(Route::Blob { repository: repository.into(), digest });
    }
    if let Some(repository) = name_and_kind.strip_suffix("/manifests") {
        check_repository(repository)?;
        let reference = if reference.contains(':') {
            ManifestRef::Digest(reference.parse::<Digest>().map_err(|e| ApiError::digest_invalid(e.to_string()))?)
        } else if is_tag(reference) {
            ManifestRef::Tag(reference.into())
        } else {
            return Err(ApiError::tag_invalid(reference));
        };
        return Ok(Route::Manifest { repository: repository.into(), reference });
    }
    Err(ApiError::not_found(path))
}

fn check_repository(name: &str) -> Result<(), ApiError> {
    if is_repository(name) {
        Ok(())
    } else {
        Err(ApiError::name_invalid(name))
    }
}

/// The upstream registry a request names with `?ns=` (URL-decoded), if any.
pub fn namespace(query: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(q) = query else { return Ok(None) };
    for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
        if k == "ns" {
            if !is_registry_host(&v) {
                return Err(ApiError::unknown_registry(format!("ns={v:?} is not a registry host")));
            }
            return Ok(Some(v.into_owned()));
        }
    }
    Ok(None)
}

/// Outcome of reading a `Range` header against a blob of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// No usable range: send the whole blob (absent, multi-range, or not in bytes).
    Whole,
    /// A satisfiable single range.
    Part(Range<u64>),
    /// Syntactically fine but outside the blob: 416.
    Unsatisfiable,
}

/// Reads `bytes=a-b`, `bytes=a-` and `bytes=-n`. Anything else is ignored, as RFC 9110 allows.
pub fn byte_range(header: Option<&str>, len: u64) -> ByteRange {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return ByteRange::Whole };
    if spec.contains(',') {
        return ByteRange::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else { return ByteRange::Whole };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        match b.parse::<u64>() {
            Ok(0) => return ByteRange::Unsatisfiable,
            Ok(n) => len.saturating_sub(n)..len,
            Err(_) => return ByteRange::Whole,
        }
    } else {
        let Ok(start) = a.parse::<u64>() else { return ByteRange::Whole };
        let end = if b.is_empty() {
            len
        } else {
            match b.parse::<u64>() {
                Ok(last) if last >= start => last.saturating_add(1).min(len),
                _ => return ByteRange::Whole,
            }
        };
        start..end
    };
    if range.start >= len {
        return ByteRange::Unsatisfiable;
    }
    ByteRange::Part(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Digest {
        Digest::of(b"x")
    }

    #[test]
    fn routes_registry_paths() {
        assert_eq!(route(&Method::GET, "/v2/").unwrap(), Route::Root);
        assert_eq!(
            route(&Method::HEAD, &format!("/v2/library/alpine/blobs/{}", d())).unwrap(),
            Route::Blob { repository: "library/alpine".into(), digest: d() }
        );
        assert_eq!(
            route(&Method::GET, "/v2/a/b/c/manifests/v1.0").unwrap(),
            Route::Manifest { repository: "a/b/c".into(), reference: ManifestRef::Tag("v1.0".into()) }
        );
        assert_eq!(
            route(&Method::GET, &format!("/v2/a/manifests/{}", d())).unwrap(),
            Route::Manifest { repository: "a".into(), reference: ManifestRef::Digest(d()) }
        );
    }

    #[test]
    fn repositories_with_a_blobs_or_manifests_component_are_routed() {
        // Found by fuzzing (agent/fuzz, mirror_route): the manifests of `te-app/blobs/s` were
        // taken for a blob of `te-app` with digest `s/manifests/..`.
        assert_eq!(
            route(&Method::GET, "/v2/te-app/blobs/s/manifests/v1").unwrap(),
            Route::Manifest { repository: "te-app/blobs/s".into(), reference: ManifestRef::Tag("v1".into()) }
        );
        assert_eq!(
            route(&Method::GET, &format!("/v2/team/manifests/blobs/{}", d())).unwrap(),
            Route::Blob { repository: "team/manifests".into(), digest: d() }
        );
        assert_eq!(
            route(&Method::GET, &format!("/v2/blobs/manifests/{}", d())).unwrap(),
            Route::Manifest { repository: "blobs".into(), reference: ManifestRef::Digest(d()) }
        );
    }

    #[test]
    fn rejects_bad_requests_with_registry_codes() {
        let code = |m: Method, p: &str| route(&m, p).unwrap_err().code;
        assert_eq!(code(Method::GET, "/v2/a/blobs/sha256:1234"), "DIGEST_INVALID");
        assert_eq!(code(Method::GET, "/v2/a/blobs/md5:abc"), "DIGEST_INVALID");
        assert_eq!(code(Method::GET, &format!("/v2/../../etc/blobs/{}", d())), "NAME_INVALID");
        assert_eq!(code(Method::GET, &format!("/v2/a/%2e%2e/blobs/{}", d())), "NAME_INVALID");
        assert_eq!(code(Method::GET, "/v2/a/manifests/bad tag!"), "TAG_INVALID");
        assert_eq!(code(Method::PUT, "/v2/a/manifests/t"), "UNSUPPORTED");
        assert_eq!(code(Method::GET, "/etc/passwd"), "NOT_FOUND");
        assert_eq!(code(Method::GET, "/v2/a/tags/list"), "NOT_FOUND");
        assert_eq!(code(Method::GET, &format!("/v2/a/blobs/{}/x", d())), "NOT_FOUND");
        assert_eq!(code(Method::GET, "/v2/blobs"), "NOT_FOUND");
    }

    #[test]
    fn namespace_is_decoded_and_checked() {
        assert_eq!(namespace(Some("ns=127.0.0.1%3A5000")).unwrap(), Some("127.0.0.1:5000".into()));
        assert_eq!(namespace(Some("x=1&ns=docker.io")).unwrap(), Some("docker.io".into()));
        assert_eq!(namespace(None).unwrap(), None);
        assert_eq!(namespace(Some("other=1")).unwrap(), None);
        assert!(namespace(Some("ns=evil.com%2Fpath")).is_err());
        assert!(namespace(Some("ns=user%40evil.com")).is_err());
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(byte_range(None, 100), ByteRange::Whole);
        assert_eq!(byte_range(Some("bytes=0-9"), 100), ByteRange::Part(0..10));
        assert_eq!(byte_range(Some("bytes=90-"), 100), ByteRange::Part(90..100));
        assert_eq!(byte_range(Some("bytes=90-1000"), 100), ByteRange::Part(90..100));
        assert_eq!(byte_range(Some("bytes=-10"), 100), ByteRange::Part(90..100));
        assert_eq!(byte_range(Some("bytes=-1000"), 100), ByteRange::Part(0..100));
        assert_eq!(byte_range(Some("bytes=100-"), 100), ByteRange::Unsatisfiable);
        assert_eq!(byte_range(Some("bytes=-0"), 100), ByteRange::Unsatisfiable);
        assert_eq!(byte_range(Some("bytes=5-1"), 100), ByteRange::Whole);
        assert_eq!(byte_range(Some("bytes=0-1,5-6"), 100), ByteRange::Whole);
        assert_eq!(byte_range(Some("items=0-1"), 100), ByteRange::Whole);
        assert_eq!(byte_range(Some("bytes=x-y"), 100), ByteRange::Whole);
    }
}
