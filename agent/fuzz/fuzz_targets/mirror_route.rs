//! Reads arbitrary mirror requests (`agent/src/mirror/route.rs`): the path and method, the `?ns=`
//! query and the `Range` header. Nothing may panic; a routed repository is a valid repository
//! name and every valid one is routed, a namespace is a valid registry host, and a partial range
//! a non-empty part of the blob.
//!
//! The input is text, one field per line: method, path, query, `Range` header, blob length.

#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use shoal_agent::mirror::route::{byte_range, namespace, route, ByteRange, ManifestRef, Route};
use shoal_core::reference::{is_registry_host, is_repository, is_tag};
use shoal_core::Digest;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.split('\n');
    let mut next = || fields.next();
    let method = Method::from_bytes(next().unwrap_or("GET").as_bytes()).unwrap_or(Method::GET);
    let path = next().unwrap_or("");
    let query = next();
    let range = next();
    let len = next().and_then(|l| l.trim().parse::<u64>().ok()).unwrap_or(1 << 20);

    match route(&method, path) {
        Ok(Route::Root) => assert!(path == "/v2/" || path == "/v2"),
        Ok(Route::Blob { repository, digest }) => {
            assert!(is_repository(&repository), "routed repository {repository:?}");
            assert!(path.ends_with(&format!("/blobs/{digest}")));
        }
        Ok(Route::Manifest { repository, reference }) => {
            assert!(is_repository(&repository), "routed repository {repository:?}");
            if let ManifestRef::Tag(tag) = &reference {
                assert!(is_tag(tag), "routed tag {tag:?}");
            }
            assert!(path.ends_with(&format!("/manifests/{reference}")));
        }
        Err(e) => assert!(e.status.is_client_error()),
    }
    // Every valid repository name and tag route back to themselves (the path field taken as a
    // repository, the query field as a tag).
    if is_repository(path) {
        let digest = Digest::of(path.as_bytes());
        let blob = route(&Method::GET, &format!("/v2/{path}/blobs/{digest}"));
        assert_eq!(blob.ok(), Some(Route::Blob { repository: path.into(), digest: digest.clone() }), "blob of {path:?}");
        let manifest = route(&Method::HEAD, &format!("/v2/{path}/manifests/{digest}"));
        assert_eq!(manifest.ok(), Some(Route::Manifest { repository: path.into(), reference: ManifestRef::Digest(digest) }));
        let tag = query.filter(|t| is_tag(t)).unwrap_or("latest");
        let manifest = route(&Method::GET, &format!("/v2/{path}/manifests/{tag}"));
        assert_eq!(
            manifest.ok(),
            Some(Route::Manifest { repository: path.into(), reference: ManifestRef::Tag(tag.into()) }),
            "{path:?}:{tag}"
        );
    }
    if method != Method::GET && method != Method::HEAD {
        assert!(route(&method, "/v2/").is_err(), "{method} must be refused");
    }

    match namespace(query) {
        Ok(Some(ns)) => assert!(is_registry_host(&ns), "namespace {ns:?}"),
        Ok(None) => {}
        Err(e) => assert!(e.status.is_client_error()),
    }

    for len in [len, 0, 1, u64::MAX] {
        match byte_range(range, len) {
            ByteRange::Part(r) => {
                assert!(r.start < r.end && r.end <= len, "range {r:?} of a {len}-byte blob");
            }
            ByteRange::Whole | ByteRange::Unsatisfiable => {}
        }
    }
});
