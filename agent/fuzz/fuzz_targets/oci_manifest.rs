//! Reads arbitrary bytes as a registry's answer for an image, as `shoal get`, `mount`, `build`
//! and `preheat` do (`core/src/image.rs`): an image index to pick a platform's manifest from, or a
//! manifest to list the blobs of. Nothing may panic; what is picked or listed is what the JSON
//! says.
//!
//! The first byte chooses the media type the registry sent; the rest is the body.

#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use shoal_core::reference::Reference;

// `cli` is a binary crate: its image module is compiled in here as it is.
#[allow(dead_code)]
#[path = "../../../core/src/image.rs"]
mod image;

const MEDIA_TYPES: [Option<&str>; 6] = [
    None,
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
    Some("application/json"),
];

const PLATFORMS: [&str; 4] = ["linux/amd64", "linux/arm64/v8", "linux/arm/v7", "windows/amd64"];

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    let media_type = MEDIA_TYPES[kind as usize % MEDIA_TYPES.len()];

    let index = image::is_index(body, media_type);
    // What the answers are checked against. serde skips the fields a manifest does not have
    // without checking their strings are UTF-8, where `Value` refuses the whole document: such a
    // body is only checked not to panic.
    let json = serde_json::from_slice::<serde_json::Value>(body).ok();
    for platform in PLATFORMS {
        if let (Ok(Some(digest)), Some(json)) = (image::platform_manifest(body, platform), &json) {
            let listed = json["manifests"].as_array().expect("an index lists manifests");
            assert!(listed.iter().any(|m| m["digest"] == digest.to_string().as_str()), "{digest} is not listed");
        }
    }
    if let Ok(blobs) = image::manifest_blobs(body) {
        if let Some(json) = &json {
            let layers = json["layers"].as_array().map_or(0, Vec::len);
            assert_eq!(blobs.len(), 1 + layers, "the config and every layer");
            assert_eq!(json["config"]["digest"], blobs[0].0.to_string().as_str());
            assert_eq!(json["config"]["size"].as_u64(), Some(blobs[0].1));
        }
        // `shoal get`, `import` and `build` add the sizes up and hand them to containerd as int64.
        let total = blobs.iter().try_fold(0u64, |total, (_, size)| total.checked_add(*size));
        assert!(total.is_some_and(|t| t <= i64::MAX as u64), "blob sizes overflow");
    }

    // The whole resolution, with a registry that answers every request with this body.
    let r = Reference::parse("registry.example/team/app:v1").expect("a valid reference");
    let fetch = |_reference: String| std::future::ready(Ok((Bytes::copy_from_slice(body), media_type.map(String::from))));
    let resolved = ready(image::resolve(&r, "linux/amd64", fetch));
    if let Ok(resolved) = resolved {
        // Only a manifest resolves at once: an index's manifest would have to have the index's digest.
        assert!(!index, "an index resolved to itself");
        assert_eq!(resolved.manifest, body);
        assert_eq!(resolved.blobs, image::manifest_blobs(body).expect("a resolved manifest lists its blobs"));
    }
});

/// The output of a future that never waits (every fetch above is ready at once).
fn ready<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("resolve waited on a ready fetch"),
    }
}
