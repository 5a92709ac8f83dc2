//! Resolving an image reference to the manifest for one platform and the blobs it names (used by
//! the CLI and by the snapshotter; the fuzz target `oci_manifest` compiles this file by path).

use std::future::Future;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use oci_spec::image::{ImageIndex, ImageManifest};
use shoal_core::reference::Reference;
use shoal_core::Digest;

/// An image's manifest for one platform and the blobs to fetch for it.
pub struct Resolved {
    /// The manifest's bytes.
    pub manifest: Bytes,
    /// Its media type, as the registry said.
    pub media_type: Option<String>,
    /// The config and layers, with their sizes.
    pub blobs: Vec<(Digest, u64)>,
}

/// Fetches `r`'s manifest with `fetch` (given a tag or digest), following an index to the
/// manifest for `platform` (`os/arch[/variant]`).
pub async fn resolve<F, Fut>(r: &Reference, platform: &str, fetch: F) -> anyhow::Result<Resolved>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = anyhow::Result<(Bytes, Option<String>)>>,
{
    let (mut body, mut media_type) = fetch(r.manifest_ref()).await?;
    if is_index(&body, media_type.as_deref()) {
        let digest = platform_manifest(&body, platform)?.ok_or_else(|| anyhow!("{r}: no manifest for platform {platform}"))?;
        (body, media_type) = fetch(digest.to_string()).await?;
        if Digest::of(&body) != digest {
            bail!("{r}: manifest content does not match {digest}");
        }
    }
    let blobs = manifest_blobs(&body)?;
    Ok(Resolved { manifest: body, media_type, blobs })
}

/// The digest of the manifest for `platform` (`os/arch[/variant]`) that image index `body`
/// lists, if any.
pub fn platform_manifest(body: &[u8], platform: &str) -> anyhow::Result<Option<Digest>> {
    let index: ImageIndex = serde_json::from_slice(body).context("reading the image index")?;
    let Some(chosen) = index.manifests().iter().find(|m| m.platform().as_ref().is_some_and(|p| platform_matches(p, platform))) else {
        return Ok(None);
    };
    Ok(Some(chosen.digest().to_string().parse()?))
}

/// The config and layers that image manifest `body` names, with their sizes.
pub fn manifest_blobs(body: &[u8]) -> anyhow::Result<Vec<(Digest, u64)>> {
    let manifest: ImageManifest = serde_json::from_slice(body).context("reading the image manifest")?;
    let mut blobs = vec![(manifest.config().digest().to_string().parse()?, manifest.config().size())];
    for l in manifest.layers() {
        blobs.push((l.digest().to_string().parse()?, l.size()));
    }
    // Callers add the sizes up and hand them on as OCI sizes, which are int64: past that, a
    // registry's sizes would wrap (or panic, with overflow checks).
    if blobs.iter().try_fold(0u64, |total, (_, size)| total.checked_add(*size)).is_none_or(|total| total > i64::MAX as u64) {
        bail!("reading the image manifest: its blobs add up to more than {} bytes, the most an OCI size (int64) can say", i64::MAX);
    }
    Ok(blobs)
}

/// Whether `body` is an image index (or Docker manifest list): by the registry's media type, or
/// by its content when the registry gave none.
pub fn is_index(body: &[u8], media_type: Option<&str>) -> bool {
    match media_type {
        Some(t) if t.contains("index") || t.contains("manifest.list") => true,
        Some(_) => false,
        None => serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.get("manifests").is_some()),
    }
}

fn platform_matches(p: &oci_spec::image::Platform, want: &str) -> bool {
    let mut parts = want.split('/');
    let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
    os == Some(p.os().to_string().as_str())
        && arch == Some(p.architecture().to_string().as_str())
        && variant.is_none_or(|v| p.variant().as_deref() == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "sha256:2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f2f";
    const LAYER: &str = "sha256:4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a4a";
    const ARM: &str = "sha256:a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0";

    fn index() -> String {
        format!(
            r#"{{"schemaVersion":2,"manifests":[
                {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{LAYER}","size":1,"platform":{{"architecture":"unknown","os":"unknown"}}}},
                {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{ARM}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}}]}}"#
        )
    }

    #[test]
    fn an_index_names_the_manifest_of_a_platform() {
        assert_eq!(platform_manifest(index().as_bytes(), "linux/arm64").unwrap(), Some(ARM.parse().unwrap()));
        assert_eq!(platform_manifest(index().as_bytes(), "linux/arm64/v8").unwrap(), Some(ARM.parse().unwrap()));
        assert_eq!(platform_manifest(index().as_bytes(), "linux/arm64/v7").unwrap(), None);
        assert_eq!(platform_manifest(index().as_bytes(), "linux/amd64").unwrap(), None);
        assert!(platform_manifest(b"{\"manifests\":", "linux/amd64").is_err());
        assert!(is_index(index().as_bytes(), None));
        assert!(is_index(b"", Some("application/vnd.docker.distribution.manifest.list.v2+json")));
        assert!(!is_index(index().as_bytes(), Some("application/vnd.oci.image.manifest.v1+json")));
    }

    #[test]
    fn a_manifest_lists_its_config_then_its_layers() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{CONFIG}","size":581}},
                "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{LAYER}","size":3642247}}]}}"#
        );
        assert_eq!(manifest_blobs(manifest.as_bytes()).unwrap(), vec![(CONFIG.parse().unwrap(), 581), (LAYER.parse().unwrap(), 3642247)]);
        assert!(!is_index(manifest.as_bytes(), None));
        // A digest Shoal cannot verify is an error, not a blob to fetch.
        let md5 = manifest.replace(LAYER, "md5:0123456789abcdef0123456789abcdef");
        assert!(manifest_blobs(md5.as_bytes()).is_err());
        assert!(manifest_blobs(index().as_bytes()).is_err());
    }

    #[test]
    fn a_manifest_whose_sizes_overflow_is_refused() {
        let manifest = |config: u64, layer: u64| {
            format!(
                r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{CONFIG}","size":{config}}},
                    "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{LAYER}","size":{layer}}}]}}"#
            )
        };
        let half = 1u64 << 62;
        assert!(manifest_blobs(manifest(half - 1, half).as_bytes()).is_ok());
        assert!(manifest_blobs(manifest(half, half).as_bytes()).is_err(), "past i64::MAX");
        assert!(manifest_blobs(manifest(581, u64::MAX).as_bytes()).is_err(), "past u64::MAX");
    }
}
