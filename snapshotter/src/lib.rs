//! Shoal's containerd snapshotter, a `proxy_plugins` snapshotter serving containerd's
//! `containerd.services.snapshots.v1.Snapshots` API on a unix socket.
//!
//! - Every image gets the snapshots of containerd's overlayfs snapshotter: a layer is a
//!   directory that containerd unpacks into, a container's rootfs an overlay of its layers.
//! - A **Shoal image** (`shoal build`'s) is recognised by the labels its layers carry at Prepare
//!   (`containerd.io/snapshot/shoal.layer`, from the manifest's layer annotations, plus the
//!   image reference and manifest digest CRI or `shoal pull` add). Its layers are committed at
//!   once as *remote* snapshots, answering Prepare with "already exists", so containerd neither
//!   downloads nor unpacks them: the chunk layers are empty, and the bootstrap layer is the
//!   whole image, lazily mounted by a `shoal mount` process (chunks read through the local
//!   agent, so from peers).
//!
//! Layout under the root (`[snapshotter] root`, default `<data_dir>/snapshotter`):
//! ```text
//! metadata.redb          every snapshot's record (meta.rs)
//! snapshots/<id>/fs      a snapshot's files (an overlay's upper directory)
//! snapshots/<id>/work    overlayfs's work directory, for active snapshots
//! remote/<id>/           a lazy mount (remote.rs)
//! ```

pub mod meta;
pub mod mounts;
pub mod remote;
mod service;
pub mod unpack;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use shoal_core::reference::Reference;
use shoal_fuse::{
    SNAPSHOT_LAYER_ANNOTATION as LAYER_LABEL, SNAPSHOT_LAYER_BOOTSTRAP as BOOTSTRAP_LAYER, SNAPSHOT_LAYER_CHUNKS as CHUNKS_LAYER,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use meta::{Error, Kind, Meta, Remote, Snapshot, Usage};
use remote::Mounter;

pub use service::{bind, serve};

/// The label containerd sets on an unpack's Prepare: the chain id the layer will be committed as.
pub const SNAPSHOT_REF_LABEL: &str = "containerd.io/snapshot.ref";
/// The image reference CRI (and `shoal pull`) passes with each layer.
pub const IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// The manifest digest CRI (and `shoal pull`) passes with each layer.
pub const MANIFEST_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The layer's own digest, as CRI (and `shoal pull`) passes it.
pub const LAYER_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.layer-digest";
/// containerd passes a layer's annotations under this prefix to the snapshotter as labels.
pub const INHERITED_LABEL_PREFIX: &str = "containerd.io/snapshot/";

/// How the snapshotter is set up.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where snapshots and their metadata live.
    pub root: PathBuf,
    /// The unix socket to serve on.
    pub socket: PathBuf,
    /// The `shoal` binary that serves lazy mounts (`shoal mount`).
    pub shoal: PathBuf,
    /// The config file those mounts read.
    pub config: Option<PathBuf>,
    /// Environment variables those mounts get, so they see the config this process runs with
    /// (`SHOAL_DATA_DIR`, `SHOAL_MIRROR__LISTEN`).
    pub env: Vec<(String, String)>,
    /// How long a lazy mount may take to come up.
    pub mount_timeout: Duration,
    /// The local agent's registry mirror (`host:port`), which the fallback downloads through.
    pub mirror: String,
}

/// The snapshotter's state: the metadata and the lazy mounts.
pub struct Snapshotter {
    root: PathBuf,
    meta: Meta,
    mounter: Mounter,
    unpacker: unpack::Unpacker,
    /// One lock per Shoal image snapshot (by id) being brought back, so that containers starting
    /// at once on a dead mount wait for one remount instead of each starting their own.
    revivals: std::sync::Mutex<std::collections::HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
}

impl Snapshotter {
    /// Opens the root, and brings back the lazy mounts of Shoal images whose process is gone
    /// (a node restart); mounts still served (the snapshotter alone restarted) are kept.
    pub async fn open(settings: &Settings) -> Result<Arc<Snapshotter>, Error> {
        let root = settings.root.clone();
        for dir in [root.clone(), root.join("snapshots"), root.join("remote")] {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| Error::io("securing", &dir, e))?;
        }
        // Layers a fallback was downloading when the process ended are of no use now.
        let _ = std::fs::remove_dir_all(root.join("tmp"));
        let meta = Meta::open(&root.join("metadata.redb"))?;
        let mounter = Mounter::new(&root, settings.shoal.clone(), settings.config.clone(), settings.env.clone(), settings.mount_timeout);
        let unpacker = unpack::Unpacker::new(&settings.mirror, root.join("tmp"));
        let s = Arc::new(Snapshotter { root, meta, mounter, unpacker, revivals: Default::default() });
        for (key, snapshot) in s.meta.list()? {
            if let Some(Remote::Image { image, lower_dirs, unpacked: false }) = &snapshot.remote {
                if s.mounter.is_up(snapshot.id, lower_dirs) {
                    info!(key, image, "lazy mount still up");
                } else if let Err(e) = s.bring_up(&key, snapshot.id, image).await {
                    warn!(key, image, error = %e, "cannot bring a Shoal image back; containers of it fail to start until it is pulled again");
                }
            }
        }
        Ok(s)
    }

    fn dir(&self, id: u64) -> PathBuf {
        mounts::snapshot_dir(&self.root, id)
    }

    /// Prepare (`kind` Active) or View: a new snapshot on `parent`, and its mounts. A Shoal
    /// image's layer is instead committed as a remote snapshot, answered with
    /// [`Error::AlreadyExists`] naming the target, as containerd expects of a remote snapshotter.
    pub async fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<containerd_client::types::Mount>, Error> {
        if let (Some(layer), Some(target)) = (labels.get(LAYER_LABEL), labels.get(SNAPSHOT_REF_LABEL)) {
            let (layer, target) = (layer.clone(), target.clone());
            self.prepare_remote(key, parent, labels, &layer).await?;
            return Err(Error::AlreadyExists(format!("target snapshot {target}")));
        }
        let s = self.meta.create(key, kind, parent, labels, None)?;
        if let Err(e) = self.make_dirs(&s) {
            let _ = self.meta.remove(key);
            return Err(e);
        }
        self.mounts_of(key).await
    }

    fn make_dirs(&self, s: &Snapshot) -> Result<(), Error> {
        let dir = self.dir(s.id);
        let mut parts = vec!["fs"];
        if s.kind == Kind::Active {
            parts.push("work");
        }
        for part in parts {
            let d = dir.join(part);
            std::fs::create_dir_all(&d).map_err(|e| Error::io("creating", &d, e))?;
        }
        // A container's root directory is world-readable, as with containerd's own snapshotter.
        std::fs::set_permissions(dir.join("fs"), std::fs::Permissions::from_mode(0o755)).map_err(|e| Error::io("setting modes on", &dir, e))
    }

    /// Commits a Shoal image's layer under `key` as a remote snapshot.
    async fn prepare_remote(&self, key: &str, parent: Option<&str>, labels: BTreeMap<String, String>, layer: &str) -> Result<(), Error> {
        match layer {
            CHUNKS_LAYER => {
                let s = self.meta.create(key, Kind::Committed, parent, labels, Some(Remote::Chunks))?;
                self.make_dirs(&s)
            }
            BOOTSTRAP_LAYER => {
                let image = image_of(&labels)?;
                let placeholder = Remote::Image { image: image.clone(), lower_dirs: Vec::new(), unpacked: false };
                let s = self.meta.create(key, Kind::Committed, parent, labels, Some(placeholder))?;
                if let Err(e) = self.make_dirs(&s) {
                    let _ = self.meta.remove(key);
                    return Err(e);
                }
                if let Err(e) = self.bring_up(key, s.id, &image).await {
                    let _ = self.meta.remove(key);
                    self.remove_dir(s.id).await;
                    return Err(e);
                }
                Ok(())
            }
            other => Err(Error::InvalidArgument(format!(
                "{LAYER_LABEL}={other:?}: not a Shoal layer kind ({CHUNKS_LAYER} or {BOOTSTRAP_LAYER})"
            ))),
        }
    }

    /// Serves the Shoal image `image` as snapshot `key` (directory `id`): mounts it lazily, or
    /// when that fails, unpacks the image it was converted from into the snapshot's `fs`, and
    /// records which. Fails only if both fail.
    async fn bring_up(&self, key: &str, id: u64, image: &str) -> Result<(), Error> {
        let remote = match self.mounter.mount(id, image).await {
            Ok(lowers) => {
                info!(key, image, "Shoal image mounted lazily");
                Remote::Image { image: image.to_string(), lower_dirs: lowers, unpacked: false }
            }
            Err(e) => {
                warn!(key, image, error = %e, "cannot mount the Shoal image lazily; downloading and unpacking the image it was converted from instead");
                self.mounter.unmount(id).await;
                let fs = self.dir(id).join("fs");
                if let Err(unpack) = self.unpacker.unpack_source(image, &fs).await {
                    return Err(Error::FailedPrecondition(format!(
                        "{image}: lazy mount failed ({e}), and so did unpacking the image it was converted from ({unpack:#})"
                    )));
                }
                Remote::Image { image: image.to_string(), lower_dirs: vec![fs], unpacked: true }
            }
        };
        self.meta.update(key, |r| r.remote = Some(remote))?;
        Ok(())
    }

    /// The mounts of an active or view snapshot. A Shoal image below it whose mount process
    /// died is brought back first, so the container gets a live lower layer.
    pub async fn mounts_of(&self, key: &str) -> Result<Vec<containerd_client::types::Mount>, Error> {
        let mut chain = self.meta.chain(key)?;
        let mut revived = false;
        for (name, p) in chain.iter().skip(1) {
            if let Some(Remote::Image { image, lower_dirs, unpacked: false }) = &p.remote {
                if !self.mounter.is_up(p.id, lower_dirs) {
                    let lock = self.revivals.lock().unwrap_or_else(|p| p.into_inner()).entry(p.id).or_default().clone();
                    let _revival = lock.lock().await;
                    // Another call may have brought it back while this one waited.
                    let current = self.meta.get(name)?;
                    if let Some(Remote::Image { lower_dirs, unpacked: false, .. }) = &current.remote {
                        if !self.mounter.is_up(p.id, lower_dirs) {
                            warn!(key = name, image, "the lazy mount of a Shoal image went away; mounting it again");
                            self.bring_up(name, p.id, image).await?;
                        }
                    }
                    revived = true;
                }
            }
        }
        if revived {
            // The records below now name the live lower directories.
            chain = self.meta.chain(key)?;
        }
        let (s, parents) = chain
            .split_first()
            .map(|(s, p)| (s.1.clone(), p.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>()))
            .expect("a chain starts with its snapshot");
        if s.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!("snapshot {key} is committed: it has no mounts of its own")));
        }
        Ok(mounts::mounts(&self.root, &s, &parents))
    }

    /// Commits the active snapshot `key` as `name`.
    pub async fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<(), Error> {
        let s = self.meta.get(key)?;
        let fs = self.dir(s.id).join("fs");
        let usage = tokio::task::spawn_blocking(move || disk_usage(&fs)).await.unwrap_or_default();
        self.meta.commit(name, key, labels, usage)?;
        Ok(())
    }

    /// Removes snapshot `key` and what it holds: its directory, and its lazy mount.
    pub async fn remove(&self, key: &str) -> Result<(), Error> {
        let s = self.meta.remove(key)?;
        if let Some(Remote::Image { unpacked: false, .. }) = s.remote {
            self.mounter.unmount(s.id).await;
            self.revivals.lock().unwrap_or_else(|p| p.into_inner()).remove(&s.id);
        }
        self.remove_dir(s.id).await;
        Ok(())
    }

    async fn remove_dir(&self, id: u64) {
        let dir = self.dir(id);
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(dir = %dir.display(), error = %e, "cannot remove a snapshot's directory; Cleanup tries again");
                }
            }
        })
        .await;
    }

    /// The record of snapshot `key`.
    pub fn stat(&self, key: &str) -> Result<Snapshot, Error> {
        self.meta.get(key)
    }

    /// Changes the labels of snapshot `key`: with no `paths`, they become `labels`; else each
    /// path `labels.<k>` sets (or, absent from `labels`, removes) that one label.
    pub fn update_labels(&self, key: &str, labels: BTreeMap<String, String>, paths: &[String]) -> Result<Snapshot, Error> {
        let mut fields: Vec<String> = Vec::new();
        let mut all = paths.is_empty();
        for p in paths {
            match p.as_str() {
                "labels" => all = true,
                p => match p.strip_prefix("labels.") {
                    Some(k) => fields.push(k.to_string()),
                    None => return Err(Error::InvalidArgument(format!("cannot update field {p:?} of a snapshot (only labels)"))),
                },
            }
        }
        self.meta.update(key, |s| {
            if all {
                s.labels = labels.clone();
            }
            for k in &fields {
                match labels.get(k) {
                    Some(v) => s.labels.insert(k.clone(), v.clone()),
                    None => s.labels.remove(k),
                };
            }
        })
    }

    /// Every snapshot.
    pub fn list(&self) -> Result<Vec<(String, Snapshot)>, Error> {
        self.meta.list()
    }

    /// Bytes and inodes snapshot `key` uses of its own (a remote one: none).
    pub async fn usage(&self, key: &str) -> Result<Usage, Error> {
        let s = self.meta.get(key)?;
        if let Some(u) = s.usage {
            return Ok(u);
        }
        let fs = self.dir(s.id).join("fs");
        Ok(tokio::task::spawn_blocking(move || disk_usage(&fs)).await.unwrap_or_default())
    }

    /// Removes directories and lazy mounts that no snapshot owns any more.
    pub async fn cleanup(&self) -> Result<(), Error> {
        let owned: std::collections::HashSet<u64> = self.meta.list()?.into_iter().map(|(_, s)| s.id).collect();
        for id in self.mounter.ids() {
            if !owned.contains(&id) {
                info!(id, "cleanup: stopping a lazy mount no snapshot uses");
                self.mounter.unmount(id).await;
            }
        }
        let dirs: Vec<u64> = std::fs::read_dir(self.root.join("snapshots"))
            .map(|rd| rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
            .unwrap_or_default();
        for id in dirs.into_iter().filter(|id| !owned.contains(id)) {
            info!(id, "cleanup: removing a snapshot directory no snapshot owns");
            self.remove_dir(id).await;
        }
        Ok(())
    }
}

/// `registry/repository@digest` of the Shoal image a layer belongs to, from the labels.
fn image_of(labels: &BTreeMap<String, String>) -> Result<String, Error> {
    let missing = |l: &str| {
        Error::FailedPrecondition(format!(
            "a Shoal image's bootstrap layer came without the {l} label: pull it through CRI (with disable_snapshot_annotations = false) or with `shoal pull`"
        ))
    };
    let reference = labels.get(IMAGE_REF_LABEL).ok_or_else(|| missing(IMAGE_REF_LABEL))?;
    let digest = labels.get(MANIFEST_DIGEST_LABEL).ok_or_else(|| missing(MANIFEST_DIGEST_LABEL))?;
    let mut r = Reference::parse(reference).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    r.tag = None;
    r.digest = Some(digest.parse().map_err(|e| Error::InvalidArgument(format!("{MANIFEST_DIGEST_LABEL}: {e}")))?);
    Ok(r.to_string())
}

/// Bytes allocated and inodes under `dir`, not crossing into other filesystems.
fn disk_usage(dir: &Path) -> Usage {
    let mut usage = Usage::default();
    let Ok(top) = std::fs::symlink_metadata(dir) else { return usage };
    let dev = top.dev();
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = std::collections::HashSet::new();
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev || !seen.insert(m.ino()) {
                continue;
            }
            usage.inodes += 1;
            usage.size += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    usage
}

/// Runs the snapshotter until `shutdown`. The socket is bound first, so containerd's calls
/// wait (instead of being refused) while the lazy mounts are brought back.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = bind(&settings.socket)?;
    let snapshotter = Snapshotter::open(&settings).await?;
    serve(snapshotter, listener, &settings.socket, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shoal_layer_names_its_image_by_manifest_digest() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let labels = BTreeMap::from([
            (IMAGE_REF_LABEL.to_string(), "127.0.0.1:5000/team/app:v1-shoal".to_string()),
            (MANIFEST_DIGEST_LABEL.to_string(), digest.clone()),
        ]);
        assert_eq!(image_of(&labels).unwrap(), format!("127.0.0.1:5000/team/app@{digest}"));
        assert!(matches!(image_of(&BTreeMap::new()), Err(Error::FailedPrecondition(_))));
    }
}
