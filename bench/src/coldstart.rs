//! The cold-start scenario: a container's first reads from an image the node does not have, over
//! a shaped link to the registry. A full pull (the image's layer fetched and unpacked, as
//! containerd does before it starts anything, then the reads) against `shoal mount` of the same
//! image converted by `shoal build` (the bootstrap, then only the chunks the reads need).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_tests::lazy::{drop_page_cache, is_mounted, stop_mount};
use shoal_tests::netns::Lab;
use shoal_tests::registry::run;
use shoal_tests::{require, shoal_bin, Registry};

use crate::report::{machine, median, write};

#[derive(clap::Args)]
pub struct Args {
    /// Link rate between the node and the registry, Mbit/s (the registry's uplink and the
    /// node's downlink).
    #[arg(long, default_value_t = 100)]
    rate_mbit: u32,
    /// MiB of data in the image that the container never reads at start (a model, assets).
    #[arg(long, default_value_t = 192)]
    unread_mib: usize,
    /// Timed runs per system (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// The image's files: what the container reads at start, and the rest.
struct Tree {
    root: PathBuf,
    /// Relative paths read at start, in order.
    start: Vec<String>,
    start_bytes: u64,
    total_bytes: u64,
}

/// File data with about 4 bits of entropy per byte (as the FUSE scenario's), so gzip and zstd
/// shrink it roughly as they do binaries.
fn data(len: usize, seed: u64) -> Vec<u8> {
    crate::fuse::file_data(len, seed, false)
}

/// An application image: a 24 MiB executable, 40 libraries of 512 KiB, 1,000 small config and
/// resource files, and `unread_mib` of data. At start the container reads the executable, 8 of
/// the libraries and 40 of the small files: about a tenth of the image, in line with studies of
/// container start-up reads.
fn write_tree(root: &Path, unread_mib: usize) -> anyhow::Result<Tree> {
    let mut start = Vec::new();
    let (mut start_bytes, mut total_bytes) = (0u64, 0u64);
    let mut put = |rel: String, bytes: Vec<u8>, read: bool| -> anyhow::Result<()> {
        let path = root.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap_or(root))?;
        std::fs::write(&path, &bytes)?;
        total_bytes += bytes.len() as u64;
        if read {
            start_bytes += bytes.len() as u64;
            start.push(rel);
        }
        Ok(())
    };
    put("app/bin/server".into(), data(24 << 20, 1), true)?;
    for i in 0..40u64 {
        put(format!("app/lib/lib{i:02}.so"), data(512 << 10, 100 + i), i % 5 == 0)?;
    }
    for i in 0..1000u64 {
        let len = 512 + (i as usize * 7919) % (8 << 10);
        put(format!("app/share/d{:02}/res{i:04}", i % 20), data(len, 1000 + i), i % 25 == 0)?;
    }
    {
        use std::io::Write;
        let path = root.join("app/data/model.bin");
        std::fs::create_dir_all(path.parent().unwrap_or(root))?;
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        for mib in 0..unread_mib {
            file.write_all(&data(1 << 20, 100_000 + mib as u64))?;
        }
        file.flush()?;
        total_bytes += (unread_mib as u64) << 20;
    }
    Ok(Tree { root: root.to_path_buf(), start, start_bytes, total_bytes })
}

/// Pushes the tree as `repo:v1`, one gzip layer (skopeo), then converts it with `shoal build`
/// into `repo:v1-shoal`.
fn push_images(tree: &Tree, registry: &Registry, repo: &str, work: &Path, config: &Path) -> anyhow::Result<()> {
    let layout = work.join("layout");
    let image = format!("{}:v1", layout.display());
    crate::fuse::write_layout(&tree.root, &layout, true)?;
    run(Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci:{image}"))
        .arg(format!("docker://{}/{repo}:v1", registry.host())))?;
    run(Command::new(shoal_bin()).arg("build").arg("-c").arg(config).arg(format!("{}/{repo}:v1", registry.host())))?;
    Ok(())
}

/// Reads the start files under `root`, whole, as the container would.
fn read_start(root: &Path, tree: &Tree) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for rel in &tree.start {
        bytes += std::fs::read(root.join(rel)).with_context(|| format!("reading {rel} under {}", root.display()))?.len() as u64;
    }
    if bytes != tree.start_bytes {
        bail!("read {bytes} bytes of the start files, expected {}", tree.start_bytes);
    }
    Ok(bytes)
}

/// Checks (untimed) that every start file under `root` holds the original's bytes.
fn check_start(root: &Path, tree: &Tree) -> anyhow::Result<()> {
    for rel in &tree.start {
        if std::fs::read(root.join(rel))? != std::fs::read(tree.root.join(rel))? {
            bail!("{rel} under {} differs from the image's file", root.display());
        }
    }
    Ok(())
}

/// One full pull in the node's namespace: the layer fetched and unpacked, then the start reads.
fn full_pull(lab: &Lab, registry: &Registry, layer: &str, repo: &str, tree: &Tree, dir: &Path) -> anyhow::Result<f64> {
    let url = format!("{}/v2/{repo}/blobs/{layer}", registry.url());
    let started = Instant::now();
    let script = format!("set -e -o pipefail; curl -sSf '{url}' | tar -xzf - -C '{}'", dir.display());
    let out = lab.command(1, "bash").args(["-c", &script]).stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("full pull failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    read_start(dir, tree)?;
    let seconds = started.elapsed().as_secs_f64();
    check_start(dir, tree)?;
    Ok(seconds)
}

/// A `shoal mount` in the node's namespace, stopped when dropped.
struct Mount {
    child: Child,
    mountpoint: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        stop_mount(Some(&mut self.child), &self.mountpoint, Duration::from_secs(10));
    }
}

/// One lazy start: mount (the bootstrap comes from the registry), then the start reads.
fn lazy_start(lab: &Lab, image: &str, config: &Path, tree: &Tree, dir: &Path) -> anyhow::Result<f64> {
    let mountpoint = dir.join("mnt");
    std::fs::create_dir_all(&mountpoint)?;
    let log = std::fs::File::create(dir.join("mount.log"))?;
    let started = Instant::now();
    // Only the network namespace: `ip netns exec` would also give the mount a mount namespace
    // of its own, out of the readers' sight.
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.ns(1)))
        .arg(shoal_bin())
        .arg("mount")
        .arg("-c")
        .arg(config)
        .args([image, "--direct", "--no-cluster-trace"])
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg(&mountpoint)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting shoal mount")?;
    let mut mount = Mount { child, mountpoint: mountpoint.clone() };
    while !is_mounted(&mountpoint) {
        if let Ok(Some(status)) = mount.child.try_wait() {
            bail!("shoal mount exited with {status}: {}", std::fs::read_to_string(dir.join("mount.log")).unwrap_or_default());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("shoal mount did not mount within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    read_start(&mountpoint, tree)?;
    let seconds = started.elapsed().as_secs_f64();
    check_start(&mountpoint, tree)?;
    drop(mount);
    Ok(seconds)
}

pub async fn run_scenario(args: Args, out: &Path) -> anyhow::Result<()> {
    for tool in ["skopeo", "curl", "tar", "gzip", "tc", "nsenter"] {
        require(tool);
    }
    let work = tempfile::Builder::new().prefix("shoal-bench-cold-").tempdir_in("/var/tmp")?;
    let tree = write_tree(&work.path().join("tree"), args.unread_mib)?;
    let lab = Lab::new(2)?;
    let registry = Registry::start_in(&lab, 0).await?;
    let config = work.path().join("shoal.toml");
    std::fs::write(&config, format!("[registry.\"{}\"]\nplain_http = true\n", registry.host()))?;
    let repo = "bench/cold";
    push_images(&tree, &registry, repo, work.path(), &config)?;
    let original = registry.image_blobs(repo, "v1").await?;
    let layer = original.iter().max_by_key(|(_, size)| *size).map(|(d, _)| d.clone()).context("the image has no layer")?;
    let converted = registry.image_blobs(repo, "v1-shoal").await?;
    lab.shape(0, args.rate_mbit, None)?;
    lab.shape(1, args.rate_mbit, Some(args.rate_mbit))?;
    eprintln!(
        "cold start: {:.1} MiB image, {:.1} MiB read at start, {} Mbit/s link",
        tree.total_bytes as f64 / 1048576.0,
        tree.start_bytes as f64 / 1048576.0,
        args.rate_mbit
    );
    let image = format!("{}/{repo}:v1-shoal", registry.host());
    let sent = |blobs: &[(String, u64)]| blobs.iter().map(|(d, _)| registry.blob_bytes(d)).sum::<u64>();
    let (mut full, mut lazy) = (Vec::new(), Vec::new());
    let (mut full_bytes, mut lazy_bytes) = (0u64, 0u64);
    for i in 0..args.runs {
        let dir = work.path().join(format!("run{i}"));
        std::fs::create_dir_all(dir.join("full"))?;
        drop_page_cache()?;
        let before = sent(&original);
        full.push(full_pull(&lab, &registry, &layer, repo, &tree, &dir.join("full"))?);
        full_bytes = sent(&original) - before;
        drop_page_cache()?;
        let before = sent(&converted);
        lazy.push(lazy_start(&lab, &image, &config, &tree, &dir.join("lazy"))?);
        lazy_bytes = sent(&converted) - before;
        eprintln!("  run {}: full pull {:.2} s, lazy {:.2} s", i + 1, full[i], lazy[i]);
        std::fs::remove_dir_all(&dir)?;
    }
    let (full_s, lazy_s) = (median(&full), median(&lazy));
    let image_bytes: u64 = original.iter().map(|(_, s)| s).sum();
    let mib = |b: u64| b as f64 / 1048576.0;
    let json = serde_json::json!({
        "scenario": "coldstart",
        "machine": machine(),
        "rate_mbit": args.rate_mbit,
        "image_bytes": image_bytes,
        "unpacked_bytes": tree.total_bytes,
        "start_read_bytes": tree.start_bytes,
        "full_pull": { "seconds": full, "median": full_s, "registry_bytes": full_bytes },
        "lazy": { "seconds": lazy, "median": lazy_s, "registry_bytes": lazy_bytes },
        "lazy_over_full": lazy_s / full_s,
    });
    let md = format!(
        "### Cold start: a container's first reads from an image not on the node ({} Mbit/s link to the registry, median of {} runs)\n\n\
         | how | time to the last start read | registry bytes | vs full pull |\n|---|---|---|---|\n\
         | full pull (fetch and unpack the gzip layer, then read) | {full_s:.2} s | {:.1} MiB | 1.00× |\n\
         | `shoal mount` of the converted image, then read | {lazy_s:.2} s | {:.1} MiB | {:.2}× |\n\n\
         The image: {:.1} MiB unpacked ({:.1} MiB as a gzip layer); the start reads {:.1} MiB (an executable, 8 of 40 libraries, 40 of 1,000 small files). \
         Every run starts with an empty chunk cache and a dropped page cache.\n",
        args.rate_mbit,
        args.runs,
        mib(full_bytes),
        mib(lazy_bytes),
        lazy_s / full_s,
        mib(tree.total_bytes),
        mib(image_bytes),
        mib(tree.start_bytes),
    );
    write(out, "coldstart", &json, &md)
}
