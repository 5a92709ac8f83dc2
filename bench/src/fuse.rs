//! The FUSE scenario: a tree of one big file and many small files, converted by `shoal build`
//! and by `nydus-image create`, and read through `shoal mount` as deployed (the kernel's EROFS
//! over an image file one FUSE mount serves), through `shoal mount --mode merged` (small files
//! and large files from two FUSE mounts merged by overlayfs, large files by kernel passthrough),
//! through `--mode fuse` (one FUSE mount, passthrough), through `--mode fuse --no-passthrough`,
//! through `nydusd` (Nydus, RAFS v6 with its uncompressed local blob cache)
//! and straight from the native directory, in the same run on the same disk.
//! Nydus must be installed first (`cargo install --locked nydus-rs`, which needs cmake).
//!
//! Each way of serving the tree is a [`System`]; each is measured in three states:
//! - **cold**: nothing local — a fresh mount with an empty chunk cache, page cache dropped;
//! - **local**: what the cold read fetched is on local disk — a fresh mount over that cache,
//!   page cache dropped (for Shoal, but `shoal-plain`, large files are materialised by then);
//! - **warm**: the same files read again, page cache warm.
//!
//! The native directory's cold and local states are the same: the files on disk, page cache dropped.
//!
//! A container never reads a lazy-loading mount directly: its runtime stacks an overlayfs with
//! a writable layer on the image's tree. Each system's warm reads are also measured that way
//! ([`ContainerRoot`]), a merged Shoal mount giving its two FUSE mounts as the lower layers.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use shoal_tests::lazy::{drop_page_cache, is_mounted, Mount};
use shoal_tests::{random_bytes, shoal_bin};

use crate::plot;
use crate::report::{machine, median, write};

#[derive(clap::Args)]
pub struct Args {
    /// Size of the big file, in MiB.
    #[arg(long, default_value_t = 512)]
    big_mib: usize,
    /// How many small files.
    #[arg(long, default_value_t = 2000)]
    small_files: usize,
    /// Mean size of a small file, in KiB (sizes spread from a few bytes to twice this).
    #[arg(long, default_value_t = 16)]
    small_kib: usize,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Scratch directory for the tree, the image and the caches (on the disk being measured).
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// Fill files with random bytes that no compressor shrinks. By default file data has about
    /// 4 bits of entropy per byte, so zstd halves it, as it roughly does executables and libraries.
    #[arg(long)]
    incompressible: bool,
    /// Leave Nydus out (when `nydus-image` and `nydusd` are not installed).
    #[arg(long)]
    no_nydus: bool,
    /// Keep the scratch directory (tree, built images, caches) for a look afterwards; its path
    /// is printed.
    #[arg(long)]
    keep: bool,
}

/// Seconds per run of the three states of one read.
#[derive(Debug, Default, Clone)]
struct Timings {
    /// Nothing local.
    cold: Vec<f64>,
    /// Everything local on disk, page cache dropped.
    local: Vec<f64>,
    /// Page cache warm.
    warm: Vec<f64>,
}

impl Timings {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "cold": self.cold, "local": self.local, "warm": self.warm })
    }
}

/// What a system measured.
#[derive(Debug, Default)]
struct Measured {
    /// Sequential read of the big file.
    big: Timings,
    /// Reading every small file, walking the tree.
    small: Timings,
    /// Reading every small file by its path, without listing a directory.
    by_path: Timings,
    /// Warm reads through a container's overlayfs.
    container: ContainerTimings,
    /// The system's own counters after the last read, if it keeps any.
    stats: serde_json::Value,
}

/// A way of serving the tree. Another one (another lazy-loading filesystem, say) is measured
/// by implementing this and adding it to [`run`].
trait System {
    /// How the results name it.
    fn name(&self) -> &str;

    /// Its chunk cache, if it keeps one.
    fn cache(&self) -> Option<&Path> {
        None
    }

    /// Serves the tree afresh, keeping whatever is local; returns its root.
    async fn remount(&mut self) -> anyhow::Result<PathBuf>;

    /// Serves the tree with nothing local; returns its root.
    async fn cold(&mut self) -> anyhow::Result<PathBuf> {
        self.stop().await?;
        if let Some(cache) = self.cache() {
            remove_cache(cache)?;
        }
        self.remount().await
    }

    /// Serves the tree afresh with what earlier reads made local kept; returns its root.
    async fn local(&mut self) -> anyhow::Result<PathBuf> {
        self.remount().await
    }

    /// Waits until what the reads so far set in motion is done (`files` files of several chunks
    /// made whole in the cache).
    async fn settle(&mut self, files: usize) -> anyhow::Result<()>;

    /// Stops serving; returns its counters, if it keeps any.
    async fn stop(&mut self) -> anyhow::Result<serde_json::Value>;

    /// The lower layers a container's overlayfs takes for the tree served at `root`, top first.
    fn lowers(&self, root: &Path) -> Vec<PathBuf> {
        vec![root.to_path_buf()]
    }
}

/// Seconds per run of warm reads through a container's overlayfs.
#[derive(Debug, Default, Clone)]
struct ContainerTimings {
    /// The big file.
    big: Vec<f64>,
    /// Every small file, found by listing.
    small: Vec<f64>,
    /// Every small file, by path.
    by_path: Vec<f64>,
}

/// A container's root: a read-only tree's lower layers under an overlayfs with an empty
/// writable layer, as containerd's overlayfs snapshotter mounts one; unmounted when dropped.
struct ContainerRoot {
    /// Holds the writable layer, overlayfs's work directory and the mount point.
    dir: tempfile::TempDir,
}

impl ContainerRoot {
    fn mount(lowers: &[PathBuf], work: &Path) -> anyhow::Result<ContainerRoot> {
        let dir = tempfile::Builder::new().prefix("container-").tempdir_in(work)?;
        for sub in ["upper", "work", "root"] {
            std::fs::create_dir(dir.path().join(sub))?;
        }
        let lowerdir = lowers.iter().map(|l| l.display().to_string()).collect::<Vec<_>>().join(":");
        let options =
            format!("lowerdir={lowerdir},upperdir={},workdir={}", dir.path().join("upper").display(), dir.path().join("work").display());
        let status = Command::new("mount").args(["-t", "overlay", "container", "-o", &options]).arg(dir.path().join("root")).status()?;
        if !status.success() {
            bail!("mounting a container's overlayfs over {lowerdir}: {status}");
        }
        Ok(ContainerRoot { dir })
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

impl Drop for ContainerRoot {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.root()).status();
    }
}

/// The native directory.
struct Native {
    /// The tree.
    root: PathBuf,
}

impl System for Native {
    fn name(&self) -> &str {
        "native"
    }

    async fn remount(&mut self) -> anyhow::Result<PathBuf> {
        Ok(self.root.clone())
    }

    async fn settle(&mut self, _files: usize) -> anyhow::Result<()> {
        Ok(())
    }

    async fn stop(&mut self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::Value::Null)
    }
}

/// How `shoal mount` serves the image.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ShoalMode {
    /// The default as root: the kernel's EROFS over an image file one FUSE mount serves.
    Erofs,
    /// `--mode merged`: small files and large files from two FUSE mounts merged by overlayfs,
    /// large files by passthrough once local.
    Merged,
    /// `--mode fuse`: one FUSE mount, every open asks shoal, passthrough once local.
    OneMount,
    /// `--mode fuse --no-passthrough`: one FUSE mount that the kernel opens files of without
    /// asking, every read served by shoal or the page cache.
    Plain,
}

/// `shoal mount --bootstrap --blobs` of the built image.
struct Shoal {
    /// How it mounts.
    mode: ShoalMode,
    /// The built image: `bootstrap` and `blobs/`.
    image: PathBuf,
    /// The chunk cache of the current round.
    cache: PathBuf,
    /// The mount, while mounted.
    mount: Option<Mount>,
}

impl Shoal {
    fn new(image: &Path, work: &Path, mode: ShoalMode) -> Shoal {
        let mut shoal = Shoal { mode, image: image.to_path_buf(), cache: PathBuf::new(), mount: None };
        shoal.cache = work.join(format!("cache-{}", shoal.name()));
        shoal
    }

    async fn start(&mut self) -> anyhow::Result<PathBuf> {
        self.stop().await?;
        let mut args: Vec<String> = vec![
            "--bootstrap".into(),
            self.image.join("bootstrap").display().to_string(),
            "--blobs".into(),
            self.image.join("blobs").display().to_string(),
            "--cache-dir".into(),
            self.cache.display().to_string(),
        ];
        match self.mode {
            ShoalMode::Erofs => args.extend(["--mode".into(), "erofs".into()]),
            ShoalMode::Merged => args.extend(["--mode".into(), "merged".into()]),
            ShoalMode::OneMount => args.extend(["--mode".into(), "fuse".into()]),
            ShoalMode::Plain => args.extend(["--mode".into(), "fuse".into(), "--no-passthrough".into()]),
        }
        let mount = Mount::start(&args).await?;
        let root = mount.mountpoint.clone();
        self.mount = Some(mount);
        Ok(root)
    }
}

impl System for Shoal {
    fn name(&self) -> &str {
        match self.mode {
            ShoalMode::Erofs => "shoal",
            ShoalMode::Merged => "shoal-merged",
            ShoalMode::OneMount => "shoal-one-mount",
            ShoalMode::Plain => "shoal-plain",
        }
    }

    fn cache(&self) -> Option<&Path> {
        Some(&self.cache)
    }

    async fn remount(&mut self) -> anyhow::Result<PathBuf> {
        self.start().await
    }

    async fn settle(&mut self, files: usize) -> anyhow::Result<()> {
        let Some(mount) = &self.mount else { bail!("{} is not mounted", self.name()) };
        // Without passthrough, files are not materialised.
        if self.mode == ShoalMode::Plain {
            return Ok(());
        }
        let started = Instant::now();
        mount.wait_stats(&format!("{files} files materialised"), |s| s["materialised_files"].as_u64() >= Some(files as u64)).await?;
        eprintln!("  {files} files materialised in {:.1} s after the reads", started.elapsed().as_secs_f64());
        Ok(())
    }

    async fn stop(&mut self) -> anyhow::Result<serde_json::Value> {
        let Some(mut mount) = self.mount.take() else { return Ok(serde_json::Value::Null) };
        let stats = mount.stats();
        let status = mount.stop().await?;
        if !status.success() {
            bail!("shoal mount exited with {status}:\n{}", mount.log());
        }
        Ok(stats)
    }

    /// A merged mount's own FUSE mounts (an overlayfs cannot stack on it), as its stats name them.
    fn lowers(&self, root: &Path) -> Vec<PathBuf> {
        let stats = self.mount.as_ref().map(Mount::stats).unwrap_or_default();
        match stats["lower_dirs"].as_array() {
            Some(dirs) => dirs.iter().filter_map(|d| d.as_str()).map(PathBuf::from).collect(),
            None => vec![root.to_path_buf()],
        }
    }
}

/// `nydusd` serving the image `nydus-image create` built, RAFS v6 over a localfs backend with
/// the blob cache that keeps chunks uncompressed on disk (`compressed: false`), the closest
/// match of Shoal's chunk cache. Nydus's defaults otherwise (4 FUSE threads, no digest
/// validation on cache reads, no prefetch).
struct Nydus {
    /// The RAFS bootstrap.
    bootstrap: PathBuf,
    /// The blob cache directory of the current round.
    cache: PathBuf,
    /// nydusd's configuration file.
    config: PathBuf,
    /// Where it mounts.
    mountpoint: PathBuf,
    /// Its API socket.
    apisock: PathBuf,
    /// Its log.
    log: PathBuf,
    /// The daemon, while mounted.
    child: Option<std::process::Child>,
}

impl Nydus {
    fn new(built: &NydusBuilt, work: &Path) -> anyhow::Result<Nydus> {
        let dir = work.join("nydus-run");
        std::fs::create_dir_all(dir.join("mnt"))?;
        let cache = dir.join("cache");
        let config = dir.join("config.json");
        let json = serde_json::json!({
            "device": {
                "backend": { "type": "localfs", "config": { "dir": built.blobs.display().to_string() } },
                "cache": { "type": "blobcache", "compressed": false, "config": { "work_dir": cache.display().to_string() } },
            },
            "mode": "direct",
            "digest_validate": false,
            "iostats_files": false,
            "enable_xattr": true,
            "fs_prefetch": { "enable": false },
        });
        std::fs::write(&config, serde_json::to_vec_pretty(&json)?)?;
        Ok(Nydus {
            bootstrap: built.bootstrap.clone(),
            cache,
            config,
            mountpoint: dir.join("mnt"),
            apisock: dir.join("api.sock"),
            log: dir.join("nydusd.log"),
            child: None,
        })
    }

    async fn start(&mut self) -> anyhow::Result<PathBuf> {
        self.stop().await?;
        std::fs::create_dir_all(&self.cache)?;
        let _ = std::fs::remove_file(&self.apisock);
        let log = std::fs::File::create(&self.log)?;
        let mut child = Command::new("nydusd")
            .args(["fuse", "--rlimit-nofile", "0", "--log-level", "warn"])
            .arg("--bootstrap")
            .arg(&self.bootstrap)
            .arg("--config")
            .arg(&self.config)
            .arg("--mountpoint")
            .arg(&self.mountpoint)
            .arg("--apisock")
            .arg(&self.apisock)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting nydusd (install it with `cargo install --locked nydus-rs`)")?;
        let started = Instant::now();
        while !is_mounted(&self.mountpoint) {
            if let Some(status) = child.try_wait()? {
                bail!("nydusd exited with {status}:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            if started.elapsed().as_secs() > 30 {
                let _ = child.kill();
                bail!("nydusd did not mount within 30 s:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.child = Some(child);
        Ok(self.mountpoint.clone())
    }
}

impl System for Nydus {
    fn name(&self) -> &str {
        "nydusd"
    }

    fn cache(&self) -> Option<&Path> {
        Some(&self.cache)
    }

    async fn remount(&mut self) -> anyhow::Result<PathBuf> {
        self.start().await
    }

    async fn settle(&mut self, _files: usize) -> anyhow::Result<()> {
        Ok(())
    }

    /// SIGTERM, which unmounts; `umount` if the mount outlives the daemon.
    async fn stop(&mut self) -> anyhow::Result<serde_json::Value> {
        let Some(mut child) = self.child.take() else { return Ok(serde_json::Value::Null) };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let started = Instant::now();
        while child.try_wait()?.is_none() {
            if started.elapsed().as_secs() > 15 {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if is_mounted(&self.mountpoint) {
            let status = Command::new("umount").arg(&self.mountpoint).status()?;
            if !status.success() {
                bail!("cannot unmount nydusd's {}", self.mountpoint.display());
            }
        }
        Ok(serde_json::Value::Null)
    }
}

impl Drop for Nydus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
    }
}

/// Removes a chunk cache, so the next mount starts with nothing local.
fn remove_cache(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    Ok(())
}

/// The tree: one big file and `small` files spread over 20 directories.
struct Tree {
    /// Its root.
    root: PathBuf,
    /// The big file, relative to the root.
    big: &'static str,
    /// The small files, relative to the root, in reading order.
    small: Vec<PathBuf>,
    /// Bytes of the big file.
    big_bytes: u64,
    /// Bytes of all small files.
    small_bytes: u64,
}

/// `len` bytes of file data: random, or (unless `incompressible`) random over 16 byte values.
pub fn file_data(len: usize, seed: u64, incompressible: bool) -> Vec<u8> {
    let mut data = random_bytes(len, seed);
    if !incompressible {
        const ALPHABET: &[u8; 16] = b"\0\x01\x48\x89etaoinsrhd \xff";
        for byte in &mut data {
            *byte = ALPHABET[usize::from(*byte & 15)];
        }
    }
    data
}

fn write_tree(root: &Path, args: &Args) -> anyhow::Result<Tree> {
    let big = "big.bin";
    let big_bytes = args.big_mib << 20;
    std::fs::create_dir_all(root)?;
    // Written in pieces to bound memory.
    {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(root.join(big))?);
        for mib in 0..args.big_mib {
            file.write_all(&file_data(1 << 20, 1000 + mib as u64, args.incompressible))?;
        }
        file.flush()?;
    }
    let mut small = Vec::new();
    let mut small_bytes = 0u64;
    let spread = (2 * args.small_kib * 1024).max(2);
    for i in 0..args.small_files {
        let rel = PathBuf::from(format!("small/d{:02}/f{i:05}", i % 20));
        std::fs::create_dir_all(root.join(rel.parent().unwrap_or(Path::new("small"))))?;
        let len = 1 + (i * 7919) % spread;
        std::fs::write(root.join(&rel), file_data(len, 10_000 + i as u64, args.incompressible))?;
        small_bytes += len as u64;
        small.push(rel);
    }
    small.sort();
    Ok(Tree { root: root.to_path_buf(), big, small, big_bytes: big_bytes as u64, small_bytes })
}

/// sha256 of a file, streamed.
fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Writes an OCI image layout at `layout` holding the tree as one layer (uncompressed, or with
/// `gzip` compressed as registries usually hold layers), tagged `v1`.
pub fn write_layout(tree: &Path, layout: &Path, gzip: bool) -> anyhow::Result<()> {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let tar = layout.join("layer.tar");
    let status = Command::new("tar")
        .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@1700000000", "-C"])
        .arg(tree)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar of {} failed: {status}", tree.display());
    }
    let diff_hex = sha256_file(&tar)?;
    let (tar, media_type) = if gzip {
        let status = Command::new("gzip").arg("-f").arg(&tar).status().context("running gzip")?;
        if !status.success() {
            bail!("gzip of {} failed: {status}", tar.display());
        }
        (tar.with_extension("tar.gz"), "application/vnd.oci.image.layer.v1.tar+gzip")
    } else {
        (tar, "application/vnd.oci.image.layer.v1.tar")
    };
    let layer_hex = sha256_file(&tar)?;
    let layer_size = std::fs::metadata(&tar)?.len();
    std::fs::rename(&tar, blobs.join(&layer_hex))?;
    let put = |bytes: Vec<u8>| -> anyhow::Result<(String, usize)> {
        let hex = hex::encode(Sha256::digest(&bytes));
        std::fs::write(blobs.join(&hex), &bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len()))
    };
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_hex}")] },
    });
    let (config_digest, config_size) = put(serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": [{ "mediaType": media_type, "digest": format!("sha256:{layer_hex}"), "size": layer_size }],
    });
    let (manifest_digest, manifest_size) = put(serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": { "org.opencontainers.image.ref.name": "v1" },
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
}

/// The layer tar of the layout [`write_layout`] wrote: its largest blob.
fn layer_tar(layout: &Path) -> anyhow::Result<PathBuf> {
    let mut blobs: Vec<(u64, PathBuf)> =
        std::fs::read_dir(layout.join("blobs/sha256"))?.flatten().filter_map(|e| Some((e.metadata().ok()?.len(), e.path()))).collect();
    blobs.sort();
    blobs.pop().map(|(_, path)| path).context("the layout has no blobs")
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Reads `path` to the end in 1 MiB reads; returns the bytes read.
fn read_file(path: &Path, buf: &mut [u8]) -> anyhow::Result<u64> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut total = 0u64;
    loop {
        let n = file.read(buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Seconds to read the big file under `root`, checking its length.
fn time_big(root: &Path, tree: &Tree) -> anyhow::Result<f64> {
    let mut buf = vec![0u8; 1 << 20];
    let started = Instant::now();
    let read = read_file(&root.join(tree.big), &mut buf)?;
    let secs = started.elapsed().as_secs_f64();
    if read != tree.big_bytes {
        bail!("read {read} bytes of {} under {}, expected {}", tree.big, root.display(), tree.big_bytes);
    }
    Ok(secs)
}

/// Paths of the regular files under `dir`, walked in name order.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let kind = e.file_type()?;
        if kind.is_dir() {
            walk(&e.path(), out)?;
        } else if kind.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}

/// How the small files are found.
#[derive(Clone, Copy)]
enum Find {
    /// Listing their directories, as `find` or `tar` would: a walker takes a file's type from
    /// the listing, or from `lstat` when the listing does not say.
    Walk,
    /// By their known paths, as a program loading its own files does.
    Path,
}

/// Seconds to find and read every small file under `root`, checking the total.
fn time_small(root: &Path, tree: &Tree, find: Find) -> anyhow::Result<f64> {
    let mut buf = vec![0u8; 1 << 20];
    let started = Instant::now();
    let mut files = Vec::new();
    match find {
        Find::Walk => walk(&root.join("small"), &mut files)?,
        Find::Path => files.extend(tree.small.iter().map(|rel| root.join(rel))),
    }
    let mut read = 0;
    for path in &files {
        read += read_file(path, &mut buf)?;
    }
    let secs = started.elapsed().as_secs_f64();
    if files.len() != tree.small.len() || read != tree.small_bytes {
        bail!(
            "read {} small files ({read} bytes) under {}, expected {} ({} bytes)",
            files.len(),
            root.display(),
            tree.small.len(),
            tree.small_bytes
        );
    }
    Ok(secs)
}

/// Passes of a warm read timed in one run: warm reads take milliseconds, so one pass is at the
/// mercy of a timer tick or another process; the run reports their median.
const WARM_PASSES: usize = 5;

/// The median of [`WARM_PASSES`] timings of `read`.
fn warm(mut read: impl FnMut() -> anyhow::Result<f64>) -> anyhow::Result<f64> {
    let passes = (0..WARM_PASSES).map(|_| read()).collect::<anyhow::Result<Vec<f64>>>()?;
    Ok(median(&passes))
}

/// sha256 of the tree's content under `root` (the big file, then every small file in order).
fn tree_digest(root: &Path, tree: &Tree) -> anyhow::Result<String> {
    let mut all = Sha256::new();
    all.update(sha256_file(&root.join(tree.big))?);
    for rel in &tree.small {
        all.update(std::fs::read(root.join(rel)).with_context(|| format!("reading {}", rel.display()))?);
    }
    Ok(hex::encode(all.finalize()))
}

/// Measures one system: `runs` rounds of cold, warm and local reads of the big file, then of
/// the small files (found by listing, then by path); checks once that it serves the tree's exact
/// content; then warm reads of both through a container's overlayfs (scratch under `work`).
async fn measure(system: &mut impl System, tree: &Tree, runs: usize, expected: &str, work: &Path) -> anyhow::Result<Measured> {
    let mut m = Measured::default();
    // Files of one chunk need no copy: their cached chunk is handed to the kernel.
    let multi_chunk = tree.small.iter().filter(|rel| std::fs::metadata(tree.root.join(rel)).is_ok_and(|m| m.len() > 1 << 20)).count();
    for run in 0..runs {
        eprintln!("{} run {}/{runs}", system.name(), run + 1);
        // The big file.
        let root = system.cold().await?;
        drop_page_cache()?;
        m.big.cold.push(time_big(&root, tree)?);
        system.settle(1).await?;
        time_big(&root, tree)?;
        m.big.warm.push(warm(|| time_big(&root, tree))?);
        let mut root = system.local().await?;
        drop_page_cache()?;
        m.big.local.push(time_big(&root, tree)?);
        // The small files, on fresh mounts of their own, found by listing and by path.
        for (find, timings) in [(Find::Walk, &mut m.small), (Find::Path, &mut m.by_path)] {
            root = system.cold().await?;
            drop_page_cache()?;
            timings.cold.push(time_small(&root, tree, find)?);
            system.settle(multi_chunk).await?;
            time_small(&root, tree, find)?;
            timings.warm.push(warm(|| time_small(&root, tree, find))?);
            root = system.local().await?;
            drop_page_cache()?;
            timings.local.push(time_small(&root, tree, find)?);
        }
        if run + 1 == runs {
            let got = tree_digest(&root, tree)?;
            if got != expected {
                bail!("{} served other content than the native tree (sha256 {got}, expected {expected})", system.name());
            }
        }
    }
    // A node where the whole image is local (for Shoal with passthrough, the big file
    // materialised) starts a container.
    let root = system.cold().await?;
    time_big(&root, tree)?;
    time_small(&root, tree, Find::Path)?;
    system.settle(1 + multi_chunk).await?;
    let root = system.local().await?;
    let container = ContainerRoot::mount(&system.lowers(&root), work)?;
    let root = container.root();
    time_big(&root, tree)?;
    time_small(&root, tree, Find::Walk)?;
    for _ in 0..runs {
        m.container.big.push(warm(|| time_big(&root, tree))?);
        m.container.small.push(warm(|| time_small(&root, tree, Find::Walk))?);
        m.container.by_path.push(warm(|| time_small(&root, tree, Find::Path))?);
    }
    drop(container);
    m.stats = system.stop().await?;
    Ok(m)
}

/// What `shoal build` took and made.
struct Built {
    /// Wall-clock seconds of the build.
    seconds: f64,
    /// Bytes of the source layer (the tar).
    input_bytes: u64,
    /// Bytes of the bootstrap.
    bootstrap_bytes: u64,
    /// Bytes of the chunk blobs.
    blob_bytes: u64,
}

fn build(layout: &Path, image: &Path, tmp: &Path) -> anyhow::Result<Built> {
    let input_bytes = dir_bytes(&layout.join("blobs"));
    drop_page_cache()?;
    let started = Instant::now();
    let out = Command::new(shoal_bin())
        .arg("build")
        .arg(format!("oci:{}:v1", layout.display()))
        .arg("--output-dir")
        .arg(image)
        .arg("--tmp-dir")
        .arg(tmp)
        .stdin(Stdio::null())
        .output()
        .context("running shoal build")?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("shoal build failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    let bootstrap_bytes = std::fs::metadata(image.join("bootstrap"))?.len();
    Ok(Built { seconds, input_bytes, bootstrap_bytes, blob_bytes: dir_bytes(&image.join("blobs")) })
}

/// What `nydus-image create` took and made.
struct NydusBuilt {
    /// Wall-clock seconds of the build.
    seconds: f64,
    /// The RAFS bootstrap.
    bootstrap: PathBuf,
    /// The directory holding the data blob.
    blobs: PathBuf,
    /// Bytes of the bootstrap.
    bootstrap_bytes: u64,
    /// Bytes of the data blobs.
    blob_bytes: u64,
}

/// Converts the layer tar `layer` as Shoal does: RAFS v6, 1 MiB chunks, zstd.
fn nydus_build(layer: &Path, work: &Path) -> anyhow::Result<NydusBuilt> {
    let dir = work.join("nydus-image");
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs)?;
    let bootstrap = dir.join("bootstrap");
    drop_page_cache()?;
    let started = Instant::now();
    let out = Command::new("nydus-image")
        .args(["create", "--type", "tar-rafs", "--fs-version", "6", "--chunk-size", "0x100000", "--compressor", "zstd"])
        .args(["--log-level", "warn", "--blob-dir"])
        .arg(&blobs)
        .arg("--bootstrap")
        .arg(&bootstrap)
        .arg(layer)
        .stdin(Stdio::null())
        .output()
        .context("running nydus-image (install it with `cargo install --locked nydus-rs`)")?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("nydus-image create failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    let bootstrap_bytes = std::fs::metadata(&bootstrap)?.len();
    Ok(NydusBuilt { seconds, bootstrap, blob_bytes: dir_bytes(&blobs), blobs, bootstrap_bytes })
}

pub async fn run(args: Args, out: &Path) -> anyhow::Result<()> {
    shoal_tests::require("fusermount3");
    shoal_tests::require("tar");
    if !args.no_nydus {
        for tool in ["nydus-image", "nydusd"] {
            if Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
                bail!("{tool} is not installed: `cargo install --locked nydus-rs` (needs cmake), or pass --no-nydus");
            }
        }
    }
    let work = tempfile::Builder::new().prefix("shoal-bench-fuse-").tempdir_in(&args.work_dir)?;
    eprintln!("writing the tree ({} MiB file, {} small files) under {}", args.big_mib, args.small_files, work.path().display());
    let tree = write_tree(&work.path().join("tree"), &args)?;
    let layout = work.path().join("layout");
    write_layout(&tree.root, &layout, false)?;
    let image = work.path().join("image");
    let tmp = work.path().join("tmp");
    std::fs::create_dir_all(&tmp)?;
    eprintln!("shoal build");
    let built = build(&layout, &image, &tmp)?;
    let nydus_built = if args.no_nydus {
        None
    } else {
        eprintln!("nydus-image create");
        Some(nydus_build(&layer_tar(&layout)?, work.path())?)
    };
    std::fs::remove_dir_all(&layout)?;
    let expected = tree_digest(&tree.root, &tree)?;

    let mut results: Vec<(String, Measured)> = Vec::new();
    let mut native = Native { root: tree.root.clone() };
    results.push((native.name().into(), measure(&mut native, &tree, args.runs, &expected, work.path()).await?));
    // Shoal as deployed (io_uring on: see the README), in each of its ways of mounting.
    let _io_uring =
        shoal_tests::lazy::IoUringOn::new().map_err(|e| eprintln!("warning: {e}: Shoal's rows take requests through /dev/fuse")).ok();
    for mode in [ShoalMode::Erofs, ShoalMode::Merged, ShoalMode::OneMount, ShoalMode::Plain] {
        let mut shoal = Shoal::new(&image, work.path(), mode);
        let measured = measure(&mut shoal, &tree, args.runs, &expected, work.path()).await;
        let _ = shoal.stop().await;
        results.push((shoal.name().into(), measured?));
    }
    if let Some(nydus_built) = &nydus_built {
        let mut nydus = Nydus::new(nydus_built, work.path())?;
        let measured = measure(&mut nydus, &tree, args.runs, &expected, work.path()).await;
        let _ = nydus.stop().await;
        results.push((nydus.name().into(), measured?));
    }
    report(&args, &tree, &built, nydus_built.as_ref(), &results, out)?;
    if args.keep {
        eprintln!("scratch directory kept: {}", work.keep().display());
    }
    Ok(())
}

fn report(
    args: &Args,
    tree: &Tree,
    built: &Built,
    nydus: Option<&NydusBuilt>,
    results: &[(String, Measured)],
    out: &Path,
) -> anyhow::Result<()> {
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let native = &results[0].1;
    let mut systems = serde_json::Map::new();
    let mut rows = String::new();
    let mut by_path_rows = String::new();
    let mut container_rows = String::new();
    for (name, m) in results {
        let medians = |t: &Timings| serde_json::json!({ "cold": median(&t.cold), "local": median(&t.local), "warm": median(&t.warm) });
        let vs = |t: &Timings, n: &Timings| {
            serde_json::json!({
                "cold": median(&n.cold) / median(&t.cold),
                "local": median(&n.local) / median(&t.local),
                "warm": median(&n.warm) / median(&t.warm),
            })
        };
        systems.insert(
            name.clone(),
            serde_json::json!({
                "big_seconds": m.big.json(),
                "small_seconds": m.small.json(),
                "small_by_path_seconds": m.by_path.json(),
                "big_median_seconds": medians(&m.big),
                "small_median_seconds": medians(&m.small),
                "small_by_path_median_seconds": medians(&m.by_path),
                "big_speed_vs_native": vs(&m.big, &native.big),
                "small_speed_vs_native": vs(&m.small, &native.small),
                "small_by_path_speed_vs_native": vs(&m.by_path, &native.by_path),
                "container_warm_seconds": { "big": m.container.big, "small": m.container.small, "small_by_path": m.container.by_path },
                "container_warm_speed_vs_native": {
                    "big": median(&native.container.big) / median(&m.container.big),
                    "small": median(&native.container.small) / median(&m.container.small),
                    "small_by_path": median(&native.container.by_path) / median(&m.container.by_path),
                },
                "last_mount_stats": m.stats,
            }),
        );
        let cell = |samples: &[f64], native: &[f64], bytes: u64| {
            let secs = median(samples);
            format!("{secs:.3} s, {:.0} MiB/s, {:.2}×", mib(bytes) / secs, median(native) / secs)
        };
        // Cold, local and warm, each against native's.
        let cells = |t: &Timings, n: &Timings, bytes: u64| {
            format!("{} | {} | {}", cell(&t.cold, &n.cold, bytes), cell(&t.local, &n.local, bytes), cell(&t.warm, &n.warm, bytes))
        };
        let big = cells(&m.big, &native.big, tree.big_bytes);
        let small = cells(&m.small, &native.small, tree.small_bytes);
        rows.push_str(&format!("| {name} | {big} | {small} |\n"));
        by_path_rows.push_str(&format!("| {name} | {} |\n", cells(&m.by_path, &native.by_path, tree.small_bytes)));
        let (c, nc) = (&m.container, &native.container);
        container_rows.push_str(&format!(
            "| {name} | {} | {} | {} |\n",
            cell(&c.big, &nc.big, tree.big_bytes),
            cell(&c.small, &nc.small, tree.small_bytes),
            cell(&c.by_path, &nc.by_path, tree.small_bytes)
        ));
    }
    let json = serde_json::json!({
        "scenario": "fuse",
        "machine": machine(),
        "runs": args.runs,
        "big_file_bytes": tree.big_bytes,
        "small_files": tree.small.len(),
        "small_files_bytes": tree.small_bytes,
        "compressible": !args.incompressible,
        "builder": {
            "seconds": built.seconds,
            "input_layer_bytes": built.input_bytes,
            "bootstrap_bytes": built.bootstrap_bytes,
            "chunk_blob_bytes": built.blob_bytes,
            "output_bytes": built.bootstrap_bytes + built.blob_bytes,
        },
        "nydus_builder": nydus.map(|n| serde_json::json!({
            "seconds": n.seconds,
            "bootstrap_bytes": n.bootstrap_bytes,
            "blob_bytes": n.blob_bytes,
            "output_bytes": n.bootstrap_bytes + n.blob_bytes,
        })),
        "systems": systems,
    });
    let data = if args.incompressible { "random, incompressible" } else { "about 4 bits of entropy per byte, so zstd halves it" };
    let mut builders = format!(
        "| `shoal build` | {:.2} s | {:.1} MiB | {:.1} KiB |\n",
        built.seconds,
        mib(built.bootstrap_bytes + built.blob_bytes),
        built.bootstrap_bytes as f64 / 1024.0
    );
    if let Some(n) = nydus {
        builders.push_str(&format!(
            "| `nydus-image create` (RAFS v6, 1 MiB chunks, zstd) | {:.2} s | {:.1} MiB | {:.1} KiB |\n",
            n.seconds,
            mib(n.bootstrap_bytes + n.blob_bytes),
            n.bootstrap_bytes as f64 / 1024.0
        ));
    }
    let md = format!(
        "### FUSE: one {big:.0} MiB file and {n} small files ({small:.1} MiB) read through lazy-loading filesystems and natively \
         (median of {runs} runs; each cell: time, throughput, speed relative to native)\n\n\
         | system | big file cold | big file local | big file warm | small files cold | small files local | small files warm |\n\
         |---|---|---|---|---|---|---|\n{rows}\n\
         cold: nothing local (fresh mount, empty chunk cache, page cache dropped); local: the chunks a cold read fetched on \
         disk (fresh mount over the same cache, page cache dropped; for Shoal with passthrough the files are materialised by \
         then); warm: read again, page cache warm (each run the median of 5 passes). Reads are 1 MiB `read` calls; the small files are listed and read in \
         name order, one at a time. Chunks come from local blob files (`shoal mount --bootstrap --blobs`, nydusd's \
         localfs backend), so cold reads measure decompression and the filesystem, not a network. File data: {data}. \
         Shoal's rows take requests over FUSE over io_uring (the bench turns `enable_uring` on for them). \
         `shoal` is the default mount as root: the kernel's EROFS over an image file that one FUSE mount serves, read on \
         demand (opens, listings and warm reads never reach shoal); `shoal-merged` (`--mode merged`): small files and \
         directories from one FUSE mount (the kernel opens its files without asking), large files from another \
         (passthrough once local), merged by overlayfs; `shoal-one-mount` (`--mode fuse`) serves everything from one \
         FUSE mount with passthrough, so every open asks shoal; `shoal-plain` is one mount without passthrough \
         (`--mode fuse --no-passthrough`).\n\n\
         The same {n} small files opened by their paths in name order, without listing a directory (as a program \
         loading its own files does); a listing walker instead takes each file's type from the listing, or from `lstat` \
         where the listing leaves it out:\n\n\
         | system | by path cold | by path local | by path warm |\n|---|---|---|---|\n{by_path_rows}\n\
         Warm reads as a container sees the tree: through an overlayfs with an empty writable layer over the system's \
         tree, as containerd's overlayfs snapshotter mounts a container's root (`shoal-merged` gives its two FUSE \
         mounts as the lower layers; the others their mount point; native its directory). Median of {runs} runs; \
         speed relative to native under the same overlayfs:\n\n\
         | system | big file warm | small files listed warm | small files by path warm |\n|---|---|---|---|\n{container_rows}\n\
         | builder, from the same {input:.0} MiB layer tar | time | output | of which bootstrap |\n|---|---|---|---|\n{builders}\n\
         Machine: {cpus} × {cpu}, kernel {kernel}.\n",
        big = mib(tree.big_bytes),
        n = tree.small.len(),
        small = mib(tree.small_bytes),
        runs = args.runs,
        input = mib(built.input_bytes),
        cpus = json["machine"]["cpus"],
        cpu = json["machine"]["cpu"].as_str().unwrap_or("?"),
        kernel = json["machine"]["kernel"].as_str().unwrap_or("?"),
    );
    write(out, "fuse", &json, &md)?;
    let speed = |native: &[f64], system: &[f64]| median(native) / median(system);
    let series: Vec<(String, Vec<f64>)> = results[1..]
        .iter()
        .map(|(name, m)| {
            let n = native;
            let mut values = Vec::new();
            for (t, nt) in [(&m.big, &n.big), (&m.small, &n.small), (&m.by_path, &n.by_path)] {
                values.extend([speed(&nt.cold, &t.cold), speed(&nt.local, &t.local), speed(&nt.warm, &t.warm)]);
            }
            values.push(speed(&n.container.by_path, &m.container.by_path));
            (name.clone(), values)
        })
        .collect();
    let groups = [
        "big cold",
        "big local",
        "big warm",
        "listed cold",
        "listed local",
        "listed warm",
        "by path cold",
        "by path local",
        "by path warm",
        "in a container",
    ];
    let title = format!("{:.0} MiB file and {} small files: speed relative to native", mib(tree.big_bytes), tree.small.len());
    plot::speed_bars(&out.join("fuse.png"), &title, &groups, &series)
}
