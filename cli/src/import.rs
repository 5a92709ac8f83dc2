//! Importing a resolved image into a node's containerd: its blobs into the content store, an image
//! record naming it, and its layers unpacked into snapshots, so that a later `ctr run` (or a pod
//! start) needs no pull at all. Blobs are read through the node's agent, so they come from peers.
//!
//! A Shoal image (`shoal build`'s, its layers annotated `containerd.io/snapshot/shoal.layer`) is
//! imported lazily: only manifests and config go into the content store, and each layer's
//! snapshot is prepared with the labels CRI would pass, which Shoal's snapshotter answers by
//! mounting the image lazily instead of asking for the layer's bytes.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest, DeleteRequest, Image, Info, InfoRequest, UpdateImageRequest, UpdateRequest,
    WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor;
use futures_util::{Stream, StreamExt};
use indicatif::ProgressBar;
use oci_spec::image::ImageManifest;
use sha2::{Digest as _, Sha256};
use shoal_core::Digest;
use tokio::sync::mpsc;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::Code;

/// Bytes per content write message.
const WRITE_CHUNK: usize = 1 << 20;

/// Where and how to import.
pub struct Target<'a> {
    /// containerd's socket.
    pub socket: &'a Path,
    /// containerd namespace (`k8s.io` is the kubelet's).
    pub namespace: &'a str,
    /// Snapshotter to unpack into.
    pub snapshotter: &'a str,
}

/// One manifest as the registry served it.
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

/// An image to import: the manifests from the one named by the tag down to the platform's.
pub struct ImportImage {
    /// The name containerd lists it by (`registry/repository:tag`).
    pub name: String,
    /// Top first; the last one is the platform's image manifest.
    pub manifests: Vec<Manifest>,
}

/// A connection to containerd in one namespace, under one lease while importing.
struct Containerd {
    channel: Channel,
    namespace: AsciiMetadataValue,
    lease: Option<AsciiMetadataValue>,
}

impl Containerd {
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.metadata_mut().insert("containerd-namespace", self.namespace.clone());
        if let Some(lease) = &self.lease {
            req.metadata_mut().insert("containerd-lease", lease.clone());
        }
        req
    }

    async fn has_content(&self, digest: &str) -> anyhow::Result<bool> {
        match ContentClient::new(self.channel.clone()).info(self.request(InfoRequest { digest: digest.into() })).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(anyhow!("containerd content {digest}: {}", s.message())),
        }
    }

    /// Sets labels on content already in the store.
    async fn label(&self, digest: &str, labels: HashMap<String, String>) -> anyhow::Result<()> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let info = Info { digest: digest.into(), labels, ..Default::default() };
        let req = UpdateRequest { info: Some(info), update_mask: Some(prost_types::FieldMask { paths }) };
        ContentClient::new(self.channel.clone())
            .update(self.request(req))
            .await
            .map_err(|s| anyhow!("labelling containerd content {digest}: {}", s.message()))?;
        Ok(())
    }

    /// Writes a blob into the content store (or labels it, when already there).
    async fn write(
        &self,
        digest: &Digest,
        size: u64,
        labels: HashMap<String, String>,
        mut body: impl Stream<Item = anyhow::Result<Bytes>> + Unpin,
        progress: &ProgressBar,
    ) -> anyhow::Result<()> {
        let expected = digest.to_string();
        if self.has_content(&expected).await? {
            progress.inc(size);
            return if labels.is_empty() { Ok(()) } else { self.label(&expected, labels).await };
        }
        let reference = format!("shoal-import-{}", digest.hex());
        let message = |action: WriteAction, offset: u64, data: Vec<u8>, labels: HashMap<String, String>| WriteContentRequest {
            action: action as i32,
            r#ref: reference.clone(),
            total: size as i64,
            expected: expected.clone(),
            offset: offset as i64,
            data,
            labels,
        };
        let (tx, rx) = mpsc::channel(4);
        // The stream opens with a status request, so containerd answers before any data is read.
        tx.send(message(WriteAction::Stat, 0, Vec::new(), HashMap::new())).await.ok();
        let mut responses = ContentClient::new(self.channel.clone())
            .write(self.request(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
            .map_err(|s| anyhow!("containerd content write {expected}: {}", s.message()))?
            .into_inner();
        let mut offset = match responses.message().await {
            // A write left half done by an earlier import resumes where it stopped.
            Ok(Some(status)) => status.offset.max(0) as u64,
            Ok(None) => bail!("containerd closed the content write for {expected}"),
            Err(s) => bail!("containerd content write {expected}: {}", s.message()),
        };
        let mut skip = offset;
        progress.inc(offset);
        let mut pending = Vec::with_capacity(WRITE_CHUNK);
        let mut sent = 0usize;
        loop {
            let chunk = body.next().await.transpose()?;
            let mut data = chunk.unwrap_or_default();
            if skip > 0 {
                let n = (skip as usize).min(data.len());
                data = data.slice(n..);
                skip -= n as u64;
            }
            pending.extend_from_slice(&data);
            let last = data.is_empty();
            if pending.len() >= WRITE_CHUNK || (last && !pending.is_empty()) {
                let len = pending.len() as u64;
                let out = std::mem::replace(&mut pending, Vec::with_capacity(WRITE_CHUNK));
                tx.send(message(WriteAction::Write, offset, out, HashMap::new()))
                    .await
                    .map_err(|_| anyhow!("containerd closed the content write for {expected}"))?;
                offset += len;
                sent += 1;
                progress.inc(len);
            }
            // Answers are read as they come, so neither side waits on a full window.
            while sent > 2 {
                responses.message().await.map_err(|s| anyhow!("containerd content write {expected}: {}", s.message()))?;
                sent -= 1;
            }
            if last {
                break;
            }
        }
        if offset != size {
            bail!("blob {expected}: got {offset} bytes, the manifest says {size}");
        }
        tx.send(message(WriteAction::Commit, offset, Vec::new(), labels)).await.ok();
        drop(tx);
        loop {
            match responses.message().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(s) if s.code() == Code::AlreadyExists => break,
                Err(s) => bail!("containerd content commit {expected}: {}", s.message()),
            }
        }
        Ok(())
    }

    /// Unpacks `layers` (in order) into snapshots; returns the top snapshot's name (chain id).
    /// With `lazy` (the image reference and manifest digest), the layers are a Shoal image's:
    /// each is prepared with the labels of a remote snapshot, and the snapshotter must answer
    /// that it has it.
    async fn unpack(
        &self,
        snapshotter: &str,
        layers: &[Descriptor],
        diff_ids: &[String],
        lazy: Option<(&str, &str)>,
    ) -> anyhow::Result<String> {
        if layers.len() != diff_ids.len() {
            bail!("image has {} layers but its config lists {} diff ids", layers.len(), diff_ids.len());
        }
        let mut snapshots = SnapshotsClient::new(self.channel.clone());
        let mut parent = String::new();
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            let chain = chain_id(&parent, diff_id);
            let stat = StatSnapshotRequest { snapshotter: snapshotter.into(), key: chain.clone() };
            if snapshots.stat(self.request(stat)).await.is_ok() {
                parent = chain;
                continue;
            }
            let key = format!("shoal-extract-{}-{chain}", std::process::id());
            let labels = match lazy {
                Some((image, manifest)) => remote_labels(layer, &chain, image, manifest),
                None => HashMap::new(),
            };
            let prepare = PrepareSnapshotRequest { snapshotter: snapshotter.into(), key: key.clone(), parent: parent.clone(), labels };
            let prepared = snapshots.prepare(self.request(prepare)).await;
            let mounts = match (prepared, lazy) {
                (Err(s), Some(_)) if s.code() == Code::AlreadyExists => {
                    parent = chain;
                    continue;
                }
                (Ok(_), Some(_)) => {
                    let _ = snapshots.remove(self.request(RemoveSnapshotRequest { snapshotter: snapshotter.into(), key })).await;
                    bail!("layer {} is a Shoal image's: it can only run on Shoal's snapshotter, and {snapshotter:?} is not", layer.digest);
                }
                (Ok(r), None) => r.into_inner().mounts,
                (Err(s), _) => bail!("preparing snapshot for layer {}: {}", layer.digest, s.message()),
            };
            let apply = ApplyRequest { diff: Some(layer.clone()), mounts, ..Default::default() };
            let applied = DiffClient::new(self.channel.clone()).apply(self.request(apply)).await;
            let applied = match applied {
                Ok(r) => r.into_inner().applied.map(|d| d.digest).unwrap_or_default(),
                Err(s) => {
                    let _ = snapshots.remove(self.request(RemoveSnapshotRequest { snapshotter: snapshotter.into(), key })).await;
                    bail!("unpacking layer {}: {}", layer.digest, s.message());
                }
            };
            if applied != *diff_id {
                let _ = snapshots.remove(self.request(RemoveSnapshotRequest { snapshotter: snapshotter.into(), key })).await;
                bail!("layer {} unpacks to {applied}, but the image config says {diff_id}", layer.digest);
            }
            let commit = CommitSnapshotRequest { snapshotter: snapshotter.into(), name: chain.clone(), key, labels: HashMap::new() };
            match snapshots.commit(self.request(commit)).await {
                Ok(_) => {}
                Err(s) if s.code() == Code::AlreadyExists => {}
                Err(s) => bail!("committing snapshot for layer {}: {}", layer.digest, s.message()),
            }
            parent = chain;
        }
        Ok(parent)
    }
}

/// The labels CRI gives a layer's snapshot at unpack (`disable_snapshot_annotations = false`):
/// the chain id it becomes, the layer's own `containerd.io/snapshot/` annotations, and which
/// image and layer it is.
fn remote_labels(layer: &Descriptor, chain: &str, image: &str, manifest: &str) -> HashMap<String, String> {
    use shoal_snapshotter::{IMAGE_REF_LABEL, INHERITED_LABEL_PREFIX, LAYER_DIGEST_LABEL, MANIFEST_DIGEST_LABEL, SNAPSHOT_REF_LABEL};
    let mut labels: HashMap<String, String> =
        layer.annotations.iter().filter(|(k, _)| k.starts_with(INHERITED_LABEL_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect();
    labels.insert(SNAPSHOT_REF_LABEL.into(), chain.into());
    labels.insert(IMAGE_REF_LABEL.into(), image.into());
    labels.insert(MANIFEST_DIGEST_LABEL.into(), manifest.into());
    labels.insert(LAYER_DIGEST_LABEL.into(), layer.digest.clone());
    labels
}

/// The chain id of a layer on top of `parent` (empty for the bottom layer), as the OCI spec defines it.
pub fn chain_id(parent: &str, diff_id: &str) -> String {
    if parent.is_empty() {
        return diff_id.to_string();
    }
    format!("sha256:{}", hex::encode(Sha256::digest(format!("{parent} {diff_id}").as_bytes())))
}

/// Fetches one blob's bytes, as a stream.
pub type Fetch<'a> =
    dyn Fn(&Digest) -> futures_util::future::BoxFuture<'a, anyhow::Result<futures_util::stream::BoxStream<'a, anyhow::Result<Bytes>>>> + 'a;

/// The progress bar of an import: `verb` (`importing`, `pulling`) and the image's name.
pub fn progress_bar(verb: &str, name: &str) -> ProgressBar {
    let template = format!("{verb} {{prefix}} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}}");
    ProgressBar::new(0)
        .with_style(indicatif::ProgressStyle::with_template(&template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()))
        .with_prefix(name.to_string())
}

/// Imports `image` into containerd at `target`, reading blobs with `fetch`.
pub async fn import(target: &Target<'_>, image: &ImportImage, fetch: &Fetch<'_>, progress: &ProgressBar) -> anyhow::Result<()> {
    let Some(platform) = image.manifests.last() else { bail!("{}: no manifest to import", image.name) };
    let manifest: ImageManifest = serde_json::from_slice(&platform.body).context("reading the image manifest")?;
    let channel = containerd_client::connect(target.socket)
        .await
        .with_context(|| format!("connecting to containerd at {}", target.socket.display()))?;
    let namespace =
        AsciiMetadataValue::try_from(target.namespace).map_err(|_| anyhow!("invalid containerd namespace {:?}", target.namespace))?;
    let mut ctd = Containerd { channel: channel.clone(), namespace, lease: None };

    // Everything written is held by a lease until the image record and labels reference it.
    let lease_labels = HashMap::from([("containerd.io/gc.expire".to_string(), expire_in_an_hour())]);
    let lease = LeasesClient::new(channel.clone())
        .create(ctd.request(CreateRequest { id: String::new(), labels: lease_labels }))
        .await
        .map_err(|s| anyhow!("containerd at {}: creating a lease: {}", target.socket.display(), s.message()))?
        .into_inner()
        .lease
        .map(|l| l.id)
        .ok_or_else(|| anyhow!("containerd created a lease without an id"))?;
    ctd.lease = Some(AsciiMetadataValue::try_from(lease.as_str()).map_err(|_| anyhow!("containerd lease id {lease:?}"))?);
    let result = import_leased(&ctd, target, image, &manifest, fetch, progress).await;
    ctd.lease = None;
    let _ = LeasesClient::new(channel).delete(ctd.request(DeleteRequest { id: lease, sync: false })).await;
    result
}

async fn import_leased(
    ctd: &Containerd,
    target: &Target<'_>,
    image: &ImportImage,
    manifest: &ImageManifest,
    fetch: &Fetch<'_>,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    let total: u64 = manifest.layers().iter().map(|l| l.size()).sum::<u64>() + manifest.config().size();
    progress.set_length(total);
    let descriptor = |d: &oci_spec::image::Descriptor| Descriptor {
        media_type: d.media_type().to_string(),
        digest: d.digest().to_string(),
        size: d.size() as i64,
        annotations: d.annotations().clone().unwrap_or_default().into_iter().collect(),
    };
    let config_desc = descriptor(manifest.config());
    let layers: Vec<Descriptor> = manifest.layers().iter().map(descriptor).collect();
    let lazy = layers.iter().any(|l| l.annotations.contains_key(shoal_fuse::SNAPSHOT_LAYER_ANNOTATION));
    if lazy {
        progress.set_length(manifest.config().size());
    }
    let config_digest: Digest = config_desc.digest.parse()?;
    let config_bytes = Bytes::from(read_all(fetch(&config_digest).await?).await?);
    let config_body = futures_util::stream::iter([Ok(config_bytes.clone())]).boxed();
    ctd.write(&config_digest, config_desc.size as u64, HashMap::new(), config_body, progress).await?;
    for layer in layers.iter().filter(|_| !lazy) {
        let digest: Digest = layer.digest.parse()?;
        let body = fetch(&digest).await?;
        ctd.write(&digest, layer.size as u64, HashMap::new(), body, progress).await?;
    }

    // Unpack, then have the config hold the snapshots and the manifest hold the blobs.
    // Only the layers' diff ids are read: the OCI spec makes the rest optional (a Shoal image's
    // config has no `history`), and containerd reads no more to unpack.
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    let config: Config = serde_json::from_slice(&config_bytes).context("reading the image config's rootfs.diff_ids")?;
    let diff_ids = config.rootfs.diff_ids;
    let platform_digest = image.manifests.last().map(|m| m.digest.to_string()).unwrap_or_default();
    let top = ctd.unpack(target.snapshotter, &layers, &diff_ids, lazy.then_some((image.name.as_str(), platform_digest.as_str()))).await?;
    ctd.label(&config_desc.digest, HashMap::from([(format!("containerd.io/gc.ref.snapshot.{}", target.snapshotter), top)])).await?;

    let mut children: Vec<String> = std::iter::once(config_desc.digest.clone()).chain(layers.iter().map(|l| l.digest.clone())).collect();
    for (i, m) in image.manifests.iter().enumerate().rev() {
        let labels: HashMap<String, String> = if i + 1 == image.manifests.len() {
            let mut l = HashMap::from([("containerd.io/gc.ref.content.config".to_string(), children[0].clone())]);
            for (n, layer) in children[1..].iter().enumerate() {
                l.insert(format!("containerd.io/gc.ref.content.l.{n}"), layer.clone());
            }
            l
        } else {
            children.iter().enumerate().map(|(n, d)| (format!("containerd.io/gc.ref.content.m.{n}"), d.clone())).collect()
        };
        let body = futures_util::stream::iter([Ok(m.body.clone())]).boxed();
        ctd.write(&m.digest, m.body.len() as u64, labels, body, &ProgressBar::hidden()).await?;
        children = vec![m.digest.to_string()];
    }

    let top_manifest = &image.manifests[0];
    let mut labels = HashMap::new();
    if target.namespace == "k8s.io" {
        // The kubelet's image service lists only images it recognises as its own.
        labels.insert("io.cri-containerd.image".to_string(), "managed".to_string());
    }
    let record = Image {
        name: image.name.clone(),
        labels,
        target: Some(Descriptor {
            media_type: top_manifest.media_type.clone(),
            digest: top_manifest.digest.to_string(),
            size: top_manifest.body.len() as i64,
            annotations: HashMap::new(),
        }),
        created_at: None,
        updated_at: None,
    };
    let mut images = ImagesClient::new(ctd.channel.clone());
    match images.create(ctd.request(CreateImageRequest { image: Some(record.clone()), source_date_epoch: None })).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => {
            images
                .update(ctd.request(UpdateImageRequest { image: Some(record), update_mask: None, source_date_epoch: None }))
                .await
                .map_err(|s| anyhow!("updating containerd image {}: {}", image.name, s.message()))?;
            Ok(())
        }
        Err(s) => Err(anyhow!("creating containerd image {}: {}", image.name, s.message())),
    }
}

async fn read_all(mut body: futures_util::stream::BoxStream<'_, anyhow::Result<Bytes>>) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// RFC 3339 time an hour from now, for the lease's expiry label.
fn expire_in_an_hour() -> String {
    let at = time::OffsetDateTime::now_utc() + time::Duration::HOUR;
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = "sha256:aaaa";
        assert_eq!(chain_id("", a), a);
        let expected = format!("sha256:{}", hex::encode(Sha256::digest(b"sha256:aaaa sha256:bbbb")));
        assert_eq!(chain_id(a, "sha256:bbbb"), expected);
    }
}
