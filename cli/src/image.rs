//! Resolving an image reference to the manifest for one platform and the blobs it names.

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
        let index: ImageIndex = serde_json::from_slice(&body).context("reading the image index")?;
        let chosen = index
            .manifests()
            .iter()
            .find(|m| m.platform().as_ref().is_some_and(|p| platform_matches(p, platform)))
            .ok_or_else(|| anyhow!("{r}: no manifest for platform {platform}"))?;
        let digest: Digest = chosen.digest().to_string().parse()?;
        (body, media_type) = fetch(digest.to_string()).await?;
        if Digest::of(&body) != digest {
            bail!("{r}: manifest content does not match {digest}");
        }
    }
    let manifest: ImageManifest = serde_json::from_slice(&body).context("reading the image manifest")?;
    let mut blobs = vec![(manifest.config().digest().to_string().parse()?, manifest.config().size())];
    for l in manifest.layers() {
        blobs.push((l.digest().to_string().parse()?, l.size()));
    }
    Ok(Resolved { manifest: body, media_type, blobs })
}

fn is_index(body: &[u8], media_type: Option<&str>) -> bool {
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
