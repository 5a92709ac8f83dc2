//! The fallback when a Shoal image cannot be mounted lazily (no FUSE, a bad bootstrap, a mount
//! that does not come up in time): the image it was converted from (the manifest annotation
//! `dev.shoal.source`) is downloaded through the local agent and unpacked, layer by layer with
//! OCI whiteouts, into the bootstrap layer's own directory. The pull still succeeds; it is only
//! no longer lazy.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use futures_util::StreamExt;
use shoal_core::image;
use shoal_core::reference::Reference;
use tokio::io::AsyncWriteExt;
use tracing::info;

/// The manifest annotation naming the image a Shoal image was converted from.
const SOURCE_ANNOTATION: &str = "dev.shoal.source";

/// Fetches manifests and blobs through the local agent's mirror.
pub struct Unpacker {
    http: reqwest::Client,
    /// `http://host:port` of the mirror.
    mirror: String,
    /// Where layers are downloaded before unpacking.
    tmp: PathBuf,
}

impl Unpacker {
    pub fn new(mirror: &str, tmp: PathBuf) -> Unpacker {
        let mirror = shoal_core::config::mirror_url(mirror);
        // A stalled transfer fails instead of hanging the pull (the agent retries the origin).
        let http = reqwest::Client::builder().read_timeout(std::time::Duration::from_secs(60)).build().unwrap_or_default();
        Unpacker { http, mirror, tmp }
    }

    async fn manifest(&self, r: &Reference, reference: String) -> anyhow::Result<(bytes::Bytes, Option<String>)> {
        let resp = self
            .http
            .get(format!("{}/v2/{}/manifests/{reference}", self.mirror, r.repository))
            .query(&[("ns", &r.registry)])
            .header(reqwest::header::ACCEPT, shoal_core::registry::MANIFEST_ACCEPT)
            .send()
            .await?;
        if !resp.status().is_success() {
            anyhow::bail!("manifest {}/{}:{reference}: {}", r.registry, r.repository, resp.status());
        }
        let media_type = resp.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(String::from);
        Ok((resp.bytes().await?, media_type))
    }

    /// Unpacks the image the Shoal image `image` (`registry/repository@digest`) was converted
    /// from into `dir`.
    pub async fn unpack_source(&self, image: &str, dir: &Path) -> anyhow::Result<String> {
        let shoal = Reference::parse(image)?;
        let (body, _) = self.manifest(&shoal, shoal.manifest_ref()).await?;
        let manifest: serde_json::Value = serde_json::from_slice(&body)?;
        let source = manifest["annotations"][SOURCE_ANNOTATION]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("{image} names no source image ({SOURCE_ANNOTATION})"))?;
        let source = Reference::parse(source)
            .map_err(|e| anyhow::anyhow!("{image} was converted from {source:?}, which is not in a registry: {e}"))?;
        same_repository(&shoal, &source)?;
        let resolved = image::resolve(&source, "linux/amd64", |reference| self.manifest(&source, reference)).await?;
        let layers: Vec<(shoal_core::Digest, String)> = {
            let m: serde_json::Value = serde_json::from_slice(&resolved.manifest)?;
            m["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| Ok((l["digest"].as_str().unwrap_or_default().parse()?, l["mediaType"].as_str().unwrap_or_default().to_string())))
                .collect::<anyhow::Result<_>>()?
        };
        std::fs::create_dir_all(&self.tmp)?;
        for (digest, media_type) in layers {
            let file = self.tmp.join(digest.hex());
            self.download(&source, &digest, &file).await?;
            let (file2, dir2, mt) = (file.clone(), dir.to_path_buf(), media_type.clone());
            let applied = tokio::task::spawn_blocking(move || apply_layer(&file2, &mt, &dir2)).await?;
            let _ = std::fs::remove_file(&file);
            applied.map_err(|e| anyhow::anyhow!("unpacking layer {digest} ({media_type}): {e}"))?;
        }
        info!(image, source = %source, "unpacked the source image instead of mounting lazily");
        Ok(source.to_string())
    }

    /// Downloads a whole blob to `file`; the agent checks its digest before the last bytes.
    async fn download(&self, r: &Reference, digest: &shoal_core::Digest, file: &Path) -> anyhow::Result<()> {
        let resp =
            self.http.get(format!("{}/v2/{}/blobs/{digest}", self.mirror, r.repository)).query(&[("ns", &r.registry)]).send().await?;
        if !resp.status().is_success() {
            anyhow::bail!("blob {digest}: {}", resp.status());
        }
        let mut out = tokio::fs::File::create(file).await?;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            out.write_all(&chunk?).await?;
        }
        out.flush().await?;
        Ok(())
    }
}

/// The source annotation is the image's own word: it may only name an image of the same
/// repository, which whoever may run this image may read anyway. Otherwise an image could have
/// the node unpack another repository's (private) image into its rootfs.
fn same_repository(shoal: &Reference, source: &Reference) -> anyhow::Result<()> {
    if source.registry != shoal.registry || source.repository != shoal.repository {
        anyhow::bail!("{shoal} names {source} as its source, outside its own repository: no fallback");
    }
    Ok(())
}

/// Unpacks one layer tar (gzip, zstd or plain, by media type) onto `dir`, applying whiteouts:
/// `.wh.NAME` removes NAME from the layers below, `.wh..wh..opq` empties its directory of them.
pub fn apply_layer(file: &Path, media_type: &str, dir: &Path) -> std::io::Result<()> {
    let raw = std::io::BufReader::new(std::fs::File::open(file)?);
    let reader: Box<dyn Read> = if media_type.ends_with("gzip") {
        Box::new(flate2::read::MultiGzDecoder::new(raw))
    } else if media_type.ends_with("zstd") {
        Box::new(zstd::stream::read::Decoder::new(raw)?)
    } else {
        Box::new(raw)
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    // Paths this layer wrote: an opaque directory keeps those and drops what lower layers had.
    let mut written: HashSet<PathBuf> = HashSet::new();
    let mut opaque: Vec<PathBuf> = Vec::new();
    for entry in archive.entries()? {
        let mut entry = match entry {
            Ok(e) => e,
            // Some writers (umoci among them) end the archive right after the last file's data,
            // without the padding and end blocks; Go's reader, containerd's, takes that as the
            // end. The tar crate fails skipping the padding: the same end.
            Err(e) if e.to_string() == "unexpected EOF during skip" => break,
            Err(e) => return Err(e),
        };
        let path = clean(&entry.path()?).ok_or_else(|| std::io::Error::other("a layer entry escapes the root"))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        // Every removal below goes through `parent` inside `dir`: an earlier layer's symlink
        // there would send it outside the image.
        let parent_inside = real_dirs(dir, &parent);
        if name == ".wh..wh..opq" {
            if parent_inside {
                opaque.push(parent);
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            if parent_inside && !matches!(hidden, "" | "." | "..") {
                remove(&dir.join(&parent).join(hidden))?;
            }
            continue;
        }
        if !parent_inside {
            return Err(std::io::Error::other(format!("layer entry {} lies under a symbolic link", path.display())));
        }
        let target = dir.join(&path);
        let is_dir = entry.header().entry_type().is_dir();
        if let Ok(m) = std::fs::symlink_metadata(&target) {
            if !(is_dir && m.is_dir()) {
                remove(&target)?;
            }
        }
        entry.unpack_in(dir)?;
        written.insert(path);
    }
    for d in opaque {
        for e in std::fs::read_dir(dir.join(&d)).into_iter().flatten().flatten() {
            let rel = d.join(e.file_name());
            if !written.contains(&rel) {
                remove(&e.path())?;
            }
        }
    }
    Ok(())
}

/// Whether each directory of `rel` under `dir` that exists is a real directory, not a symbolic
/// link (which the kernel would follow out of `dir`).
fn real_dirs(dir: &Path, rel: &Path) -> bool {
    let mut at = dir.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return false,
            Err(_) => return true,
        }
    }
    true
}

/// `path` relative to the root, without `.` components; `None` if it climbs out.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, path, *d).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn layers_unpack_in_order_with_whiteouts_and_opaque_directories() {
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let apply = |n: usize, entries: &[(&str, Option<&[u8]>)]| {
            let f = work.path().join(format!("l{n}.tar"));
            std::fs::write(&f, layer(entries)).unwrap();
            apply_layer(&f, "application/vnd.oci.image.layer.v1.tar", &root).unwrap();
        };
        apply(0, &[("etc", None), ("etc/a", Some(b"a")), ("etc/b", Some(b"b")), ("opt", None), ("opt/x", Some(b"x")), ("f", Some(b"0"))]);
        apply(1, &[("etc/.wh.a", Some(b"")), ("opt/.wh..wh..opq", Some(b"")), ("opt/y", Some(b"y")), ("f", Some(b"1"))]);
        assert!(!root.join("etc/a").exists() && root.join("etc/b").exists());
        assert!(!root.join("opt/x").exists(), "an opaque directory hides what lower layers had");
        assert_eq!(std::fs::read(root.join("opt/y")).unwrap(), b"y", "and keeps what its own layer wrote");
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"1");
        assert!(!root.join("etc/.wh.a").exists() && !root.join("opt/.wh..wh..opq").exists());
    }

    #[test]
    fn whiteouts_and_files_never_reach_through_a_symbolic_link_out_of_the_root() {
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("root");
        let outside = work.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(outside.join("d")).unwrap();
        for name in ["victim", "d/kept"] {
            std::fs::write(outside.join(name), b"keep").unwrap();
        }
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let apply = |n: usize, entries: &[(&str, Option<&[u8]>)]| {
            let f = work.path().join(format!("l{n}.tar"));
            std::fs::write(&f, layer(entries)).unwrap();
            apply_layer(&f, "application/vnd.oci.image.layer.v1.tar", &root)
        };
        apply(0, &[("link/.wh.victim", Some(b""))]).unwrap();
        apply(1, &[("link/d/.wh..wh..opq", Some(b""))]).unwrap();
        assert!(apply(2, &[("link/victim", Some(b"planted"))]).is_err(), "a file under a symlink is refused");
        apply(3, &[(".wh...", Some(b""))]).unwrap();
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
        assert_eq!(std::fs::read(outside.join("d/kept")).unwrap(), b"keep");
        assert!(root.exists());
    }

    #[test]
    fn a_shoal_image_may_only_fall_back_to_an_image_of_its_own_repository() {
        let shoal = Reference::parse("r.example/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000").unwrap();
        assert!(same_repository(&shoal, &Reference::parse("r.example/team/app:v1").unwrap()).is_ok());
        assert!(same_repository(&shoal, &Reference::parse("r.example/team/secret:v1").unwrap()).is_err());
        assert!(same_repository(&shoal, &Reference::parse("other.example/team/app:v1").unwrap()).is_err());
    }

    #[test]
    fn an_entry_climbing_out_of_the_root_is_refused() {
        assert_eq!(clean(Path::new("./a/b")), Some(PathBuf::from("a/b")));
        assert_eq!(clean(Path::new("/a")), Some(PathBuf::from("a")));
        assert_eq!(clean(Path::new("a/../../b")), None);
    }
}
