//! `shoal mount`: mounts a Shoal image (built by `shoal build`) read-only with FUSE and serves
//! it on demand: metadata from the bootstrap in memory, file data chunk by chunk through the
//! local agent's mirror (so peers serve it), the registry, or a local blob directory. Files
//! whose chunks are all local are materialised in the cache and read by the kernel directly
//! (FUSE passthrough). As root, the kernel's EROFS serves the image instead, from one file that
//! a FUSE mount serves on demand ([`shoal_fuse::image_file`]): opens, listings and warm reads then
//! never reach this process. Where the kernel cannot, an image with large files is served as two
//! FUSE mounts merged by overlayfs, so small files are opened without asking this process
//! ([`shoal_fuse::overlay`]). Runs in the foreground until SIGTERM or SIGINT, then unmounts.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;
use oci_spec::image::ImageManifest;
use shoal_core::config::{ByteSize, Config};
use shoal_core::reference::Reference;
use shoal_core::registry::{RegistryClient, Request, MANIFEST_ACCEPT};
use shoal_core::Digest;
use shoal_fuse::cache::ChunkCache;
use shoal_fuse::erofs::ErofsImage;
use shoal_fuse::fs::{FsStats, MountConfig, MountSession, Passthrough, ShoalFs, View};
use shoal_fuse::image_file::{self, ImageFileFs, IMAGE_FILE};
use shoal_fuse::loader::ChunkLoader;
use shoal_fuse::materialise::Materialiser;
use shoal_fuse::source::{BlobDir, ChunkSource, MirrorBlobs, RegistryBlobs};
use shoal_fuse::trace::Trace;
use shoal_fuse::{overlay, Bootstrap, BOOTSTRAP_ANNOTATION, BOOTSTRAP_ANNOTATION_VALUE, FORMAT_ANNOTATION, FORMAT_ANNOTATION_VALUE};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::learned::ClusterTrace;
use shoal_core::image;

/// Examples shown by `shoal mount --help`.
pub const EXAMPLES: &str = "Examples:
  shoal mount registry.example/team/app:v1-shoal /run/app
      mounts the image; chunks come through the local agent (127.0.0.1:65001) when it runs
  shoal mount registry.example/team/app:v1-shoal /run/app --trace trace.txt
      also records the order files are first read, for `shoal build --prefetch trace.txt`
  shoal mount --bootstrap ./app/bootstrap --blobs ./app/blobs /run/app
      mounts a local copy written by `shoal build --output-dir ./app`
  shoal mount --mode fuse --stats /run/app.stats IMAGE /run/app
      one FUSE mount (passthrough once local), with counters of what it served in /run/app.stats
Stop with SIGTERM or Ctrl-C: the filesystem is unmounted before the process exits.";

/// Readahead the kernel is asked to use on a FUSE mount, in KiB: 1 MiB requests, one chunk each.
const READ_AHEAD_KB: u32 = 1024;

/// Readahead of an EROFS mount, in KiB. Its reads of the image file come one readahead window
/// at a time; 1 MiB windows made sequential cold reads half as fast here, 512 KiB ones did not.
const EROFS_READ_AHEAD_KB: u32 = 512;

/// How long unmounting may take before the process exits anyway.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(10);

/// Chunk caches under the data directory that mounts at the same time may take.
const MAX_DEFAULT_CACHES: usize = 64;

/// The file in a merged mount's directory that its process holds locked while it runs.
const LOCK_FILE: &str = "lock";

/// The FUSE mount points in a merged mount's directory: small files on top, large files below.
const MERGED_PARTS: [&str; 2] = ["small", "large"];

/// The FUSE mount point holding an EROFS mount's image file.
const IMAGE_PART: &str = "image";

/// Every FUSE mount point a mount's directory may hold.
const PARTS: [&str; 3] = [MERGED_PARTS[0], MERGED_PARTS[1], IMAGE_PART];

/// How often the stats file is refreshed (when something changed).
const STATS_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Args)]
pub struct MountArgs {
    /// `IMAGE DIR`: the Shoal image (`registry/repo:tag-shoal`, as `shoal build` pushed it) and
    /// the directory to mount it on; with --bootstrap, only `DIR`.
    #[arg(value_name = "[IMAGE] DIR", num_args = 1..=2, required = true)]
    args: Vec<String>,
    /// Mount this local bootstrap file (e.g. from `shoal build --output-dir`) instead of an image
    /// in a registry.
    #[arg(long, value_name = "FILE", requires = "blobs")]
    bootstrap: Option<PathBuf>,
    /// With --bootstrap: the directory holding the image's chunk blobs, each named by the hex of
    /// its sha256 digest.
    #[arg(long, value_name = "DIR", requires = "bootstrap")]
    blobs: Option<PathBuf>,
    /// The local agent's registry mirror to fetch chunks through (`host:port` or a URL), so
    /// peers serve them. Default: [mirror] listen when an agent answers there, else the
    /// registry directly.
    #[arg(long, value_name = "URL", conflicts_with = "direct")]
    mirror: Option<String>,
    /// Fetch chunks from the registry directly, never through a mirror.
    #[arg(long)]
    direct: bool,
    /// The chunk cache directory, shared by every image mounted with it, one mount at a time.
    /// Default: <data_dir>/chunks, or chunks-1, chunks-2, ... while other mounts use it.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// The most the chunk cache keeps; least recently used chunks are evicted beyond it.
    #[arg(long, value_name = "SIZE", default_value = "10GiB")]
    cache_size: ByteSize,
    /// Record the order in which files are first read to FILE, one path per line; give it to
    /// `shoal build --prefetch` so the next build's mounts fetch those files first.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Chunks fetched ahead of a sequential read.
    #[arg(long, default_value_t = 4)]
    readahead: usize,
    /// Chunks of the image's prefetch list fetched at once in the background after mounting.
    #[arg(long, default_value_t = 4)]
    prefetch_concurrency: usize,
    /// Do not prefetch in the background: neither the image's prefetch list nor the trace the
    /// cluster learned.
    #[arg(long)]
    no_prefetch: bool,
    /// Scheduler replicas (`host:port`, repeat or separate with commas) that learn the image's
    /// access trace: this mount reports the order its files are first read, and when the image
    /// has no prefetch list of its own it prefetches by the trace merged from every host's mounts.
    /// Default: [peer] schedulers, else the all-in-one node's embedded scheduler ([scheduler] listen).
    #[arg(long = "scheduler", value_name = "ADDR", value_delimiter = ',')]
    schedulers: Vec<String>,
    /// Neither report this mount's access trace to the scheduler nor prefetch by the cluster's.
    #[arg(long)]
    no_cluster_trace: bool,
    /// Threads answering the kernel's requests.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// With --mode merged or fuse: serve every read from this process. By default a file of
    /// more than one chunk whose chunks are all local is written whole into the cache (counted
    /// against --cache-size) and its later opens are handed to the kernel (FUSE passthrough), so
    /// reads run at local-disk speed without entering this process. Passthrough needs root
    /// (CAP_SYS_ADMIN) and Linux 6.9+; without them shoal falls back to serving reads itself,
    /// and says so once in the log. Without passthrough the kernel opens every file without
    /// asking shoal.
    #[arg(long, env = "SHOAL_NO_PASSTHROUGH")]
    no_passthrough: bool,
    /// How the kernel sees the image. `erofs`: the kernel's EROFS mounts an image file that one
    /// FUSE mount serves on demand; opens, listings and warm reads never reach shoal, and warm
    /// reads run at page-cache speed (needs root and Linux 6.12+). `merged`: two FUSE mounts
    /// merged by overlayfs at DIR, one of the directories and small files (which the kernel
    /// opens without asking shoal) and one of the large files (passthrough once local); DIR
    /// cannot be a lower layer of another overlayfs (take `lower_dirs` from --stats or the
    /// log). `fuse`: one FUSE mount, asked at every open (passthrough needs that); with
    /// --no-passthrough or for an image without large files, the kernel opens its files
    /// without asking. `auto`: erofs as root, else merged as root, else fuse, falling back
    /// with a warning when one cannot be mounted.
    #[arg(long, value_enum, default_value_t = Mode::Auto, env = "SHOAL_MOUNT_MODE")]
    mode: Mode,
    /// Take the kernel's requests through /dev/fuse only. By default, when the kernel offers
    /// FUSE over io_uring (Linux 6.14+ with `echo Y > /sys/module/fuse/parameters/enable_uring`),
    /// requests come over io_uring and each is served by a thread on the CPU that made it: opens
    /// and small reads then cost about half as much.
    #[arg(long, env = "SHOAL_NO_IO_URING")]
    no_io_uring: bool,
    /// Keep counters of what the filesystem served in FILE, as JSON, refreshed while mounted:
    /// the mode, opens served by passthrough and by this process, read requests of file data
    /// and bytes this process answered (and, with EROFS, requests of its metadata), small
    /// files whose data went to the page cache with their open, files materialised, chunks
    /// fetched, requests taken over io_uring; and the directories a container's overlayfs takes
    /// as lower layers (`lower_dirs`).
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// Config file: data_dir, logging, registry credentials and TLS settings.
    #[arg(long, short, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
}

/// How `shoal mount` has the kernel see an image (`--mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// erofs as root, else merged as root, else fuse.
    Auto,
    /// The kernel's EROFS, over an image file one FUSE mount serves.
    Erofs,
    /// Two FUSE mounts (small files, large files) merged by overlayfs.
    Merged,
    /// One FUSE mount.
    Fuse,
}

pub async fn run(args: MountArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    crate::logging::init(&config.log);
    let (image, mountpoint) = match (args.args.as_slice(), &args.bootstrap) {
        ([dir], Some(_)) => (None, PathBuf::from(dir)),
        ([image, dir], None) => (Some(Reference::parse(image)?), PathBuf::from(dir)),
        ([_, _], Some(_)) => bail!("with --bootstrap, give only the mount directory"),
        _ => bail!("give the image and the mount directory: shoal mount IMAGE DIR (or --bootstrap FILE --blobs DIR DIR)"),
    };
    let mountpoint = mountpoint.canonicalize().with_context(|| format!("mount point {}", mountpoint.display()))?;
    if !mountpoint.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    let (bootstrap, bootstrap_digest, source, name) = match (&image, &args.bootstrap, &args.blobs) {
        (None, Some(file), Some(blobs)) => {
            let bytes = std::fs::read(file).with_context(|| format!("reading the bootstrap {}", file.display()))?;
            let bootstrap = Bootstrap::decode(&bytes).with_context(|| format!("reading the bootstrap {}", file.display()))?;
            let source: Arc<dyn ChunkSource> = Arc::new(BlobDir::new(blobs.clone()));
            (bootstrap, Digest::of(&bytes), source, file.display().to_string())
        }
        (Some(r), _, _) => {
            let remote = Remote::connect(&args, &config, r).await?;
            let (bootstrap, digest) = remote.bootstrap(r).await?;
            (bootstrap, digest, remote.source(r)?, r.to_string())
        }
        _ => bail!("--bootstrap needs --blobs"),
    };
    let bootstrap = Arc::new(bootstrap);
    let (cache, cache_dir) = open_cache(&args, &config)?;
    info!(image = %name, source = %source.describe(), cache = %cache_dir.display(), files = bootstrap.inode_count(), "mounting");
    let runtime = tokio::runtime::Handle::current();
    let loader = Arc::new(ChunkLoader::new(bootstrap.clone(), cache, source, runtime.clone(), args.readahead));
    let cluster = if args.no_cluster_trace {
        None
    } else {
        let token = shoal_core::bearer::BearerToken::read_optional(config.peer.scheduler_token_file.as_deref())
            .context("[peer] scheduler_token_file (the token this host presents to the scheduler; or pass --no-cluster-trace)")?;
        let credential = shoal_agent::schedulers::Credential::new(token.as_ref());
        ClusterTrace::new(&schedulers(&args, &config), credential, bootstrap_digest.to_string(), host_id(&config)).map(Arc::new)
    };
    let trace = match &args.trace {
        Some(path) => Some(Trace::create(path, &bootstrap).with_context(|| format!("creating the trace file {}", path.display()))?),
        None if cluster.is_some() => Some(Trace::new(&bootstrap)),
        None => None,
    };
    let trace = trace.map(Arc::new);
    // Only files of several chunks are ever read by passthrough: without any, the kernel may as
    // well open every file without asking.
    let passthrough = !args.no_passthrough && shoal_fuse::fs::has_large_files(&bootstrap);
    if !args.no_passthrough && !passthrough {
        info!("the image has no file of several chunks: passthrough would serve none, so files are opened without asking shoal");
    }
    let mount_config = MountConfig {
        fs_name: format!("shoal:{name}"),
        threads: usize::from(args.threads),
        passthrough,
        io_uring: !args.no_io_uring,
        ..MountConfig::default()
    };
    let fs = || ShoalFs::new(loader.clone(), runtime.clone(), trace.clone());
    let root = shoal_fuse::overlay::is_root();
    let mut mounted = None;
    if args.mode == Mode::Erofs || (args.mode == Mode::Auto && root) {
        let erofs = ErofsImage::build(&bootstrap).context("laying the image out for EROFS").and_then(|image| {
            Mounted::erofs(
                ImageFileFs::new(Arc::new(image), loader.clone(), runtime.clone(), trace.clone()),
                &mountpoint,
                &mount_config,
                &config.data_dir,
            )
        });
        match erofs {
            Ok(m) => mounted = Some(m),
            Err(e) if args.mode == Mode::Erofs => return Err(e),
            Err(e) => warn!(error = %format!("{e:#}"), "cannot have the kernel's EROFS serve the image; serving it with FUSE"),
        }
    }
    let merged = args.mode == Mode::Merged || (args.mode == Mode::Auto && overlay::available());
    if mounted.is_none() && passthrough && merged {
        match Mounted::split(fs, &mountpoint, &mount_config, &config.data_dir) {
            Ok(m) => mounted = Some(m),
            Err(e) if args.mode == Mode::Merged => return Err(e),
            Err(e) => warn!(error = %format!("{e:#}"), "cannot serve the image as two merged mounts; serving it from one"),
        }
    }
    let mounted = match mounted {
        Some(mounted) => mounted,
        None => Mounted::one(fs(), &mountpoint, &mount_config)?,
    };
    let lowers = mounted.lower_dirs();
    let counters = Counters {
        mode: mounted.mode,
        fs: mounted.stats.clone(),
        local: mounted.local.clone(),
        loader: loader.clone(),
        lowers: lowers.clone(),
    };
    match mounted.mode {
        Mode::Erofs => info!(
            mountpoint = %mountpoint.display(),
            "mounted: the kernel's EROFS serves the image from {}, read on demand",
            mounted.sessions.first().map(|(_, dir)| dir.join(IMAGE_FILE).display().to_string()).unwrap_or_default()
        ),
        Mode::Merged => info!(
            mountpoint = %mountpoint.display(),
            "mounted: small files and large files from two FUSE mounts merged by overlayfs; a container's overlayfs takes lowerdir={}",
            lowers.iter().map(|dir| dir.display().to_string()).collect::<Vec<_>>().join(":")
        ),
        Mode::Fuse | Mode::Auto => info!(mountpoint = %mountpoint.display(), "mounted"),
    }
    let prefetch: Vec<u64> = bootstrap.prefetch().collect();
    if !args.no_prefetch && !prefetch.is_empty() {
        info!(files = prefetch.len(), "prefetching the image's prefetch list in the background");
        tokio::spawn(loader.clone().prefetch(prefetch, args.prefetch_concurrency));
    } else if let (false, Some(cluster)) = (args.no_prefetch, &cluster) {
        tokio::spawn(cluster.clone().prefetch(loader.clone(), args.prefetch_concurrency));
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(crate::stop_on_signal(shutdown.clone()));
    let reporter = match (&cluster, &trace) {
        (Some(cluster), Some(trace)) => Some(tokio::spawn(cluster.clone().report_loop(trace.clone(), shutdown.clone()))),
        _ => None,
    };
    let mut written = None;
    while !shutdown.is_cancelled() && mounted.is_mounted() {
        if let Some(path) = &args.stats {
            write_stats(path, &counters, &mut written);
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(STATS_INTERVAL) => {}
        }
    }
    if !shutdown.is_cancelled() {
        info!("the filesystem was unmounted from outside");
    }
    mounted.unmount().await;
    // The reporter sends the whole trace once more on shutdown.
    shutdown.cancel();
    if let Some(reporter) = reporter {
        let _ = reporter.await;
    }
    if let Some(path) = &args.stats {
        write_stats(path, &counters, &mut written);
    }
    let stats = counters.json();
    info!(
        fetched_chunks = %stats["fetched_chunks"],
        fetched_bytes = %stats["fetched_bytes"],
        failed_chunks = %stats["failed_chunks"],
        passthrough = %stats["passthrough"],
        passthrough_opens = %stats["passthrough_opens"],
        plain_opens = %stats["plain_opens"],
        reads = %stats["reads"],
        materialised_files = %stats["materialised_files"],
        "unmounted {}",
        mountpoint.display()
    );
    Ok(())
}

/// The mounts serving one image at its mount point.
struct Mounted {
    /// How: [`Mode::Erofs`], [`Mode::Merged`] or [`Mode::Fuse`].
    mode: Mode,
    /// Where the image is mounted.
    mountpoint: PathBuf,
    /// Each FUSE mount with its mount point.
    sessions: Vec<(MountSession, PathBuf)>,
    /// What each FUSE mount served.
    stats: Vec<Arc<FsStats>>,
    /// What was materialised for passthrough (nothing, for EROFS).
    local: Option<Arc<Materialiser>>,
    /// For EROFS and merged mounts: the directory holding the FUSE mounts, and the device of
    /// the filesystem on top (EROFS or overlayfs).
    parts: Option<(PathBuf, u64)>,
    /// For EROFS and merged mounts: their directory's lock file, locked while this process runs.
    _lock: Option<std::fs::File>,
}

impl Mounted {
    /// `fs` mounted at `mountpoint`.
    fn one(fs: ShoalFs, mountpoint: &Path, config: &MountConfig) -> anyhow::Result<Mounted> {
        let (stats, local) = (fs.stats(), fs.materialiser());
        let session = fs
            .mount(mountpoint, config)
            .with_context(|| format!("mounting on {} (is fuse3 installed and /dev/fuse usable?)", mountpoint.display()))?;
        set_read_ahead(mountpoint, READ_AHEAD_KB);
        Ok(Mounted {
            mode: Mode::Fuse,
            mountpoint: mountpoint.to_path_buf(),
            sessions: vec![(session, mountpoint.to_path_buf())],
            stats: vec![stats],
            local: Some(local),
            parts: None,
            _lock: None,
        })
    }

    /// `fs` mounted in a new directory under `<data_dir>/mounts`, and its image file mounted
    /// with the kernel's EROFS at `mountpoint`.
    fn erofs(fs: ImageFileFs, mountpoint: &Path, config: &MountConfig, data_dir: &Path) -> anyhow::Result<Mounted> {
        if !shoal_fuse::overlay::is_root() {
            bail!("mounting EROFS needs root");
        }
        let (parts, lock) = new_parts_dir(data_dir)?;
        let stats = vec![fs.stats()];
        let mut mounted = Mounted {
            mode: Mode::Erofs,
            mountpoint: mountpoint.to_path_buf(),
            sessions: Vec::new(),
            stats,
            local: Some(fs.materialiser()),
            parts: None,
            _lock: Some(lock),
        };
        let result = (|| {
            let dir = parts.join(IMAGE_PART);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let session = fs
                .mount(&dir, config)
                .with_context(|| format!("mounting on {} (is fuse3 installed and /dev/fuse usable?)", dir.display()))?;
            mounted.sessions.push((session, dir.clone()));
            image_file::mount_erofs(&dir.join(IMAGE_FILE), mountpoint)
                .with_context(|| format!("mounting EROFS on {} (it needs Linux 6.12+ with EROFS)", mountpoint.display()))?;
            set_read_ahead(mountpoint, EROFS_READ_AHEAD_KB);
            anyhow::Ok(std::fs::metadata(mountpoint)?.dev())
        })();
        mounted.finish(parts, result)
    }

    /// Two mounts of `fs` in a new directory under `<data_dir>/mounts`, one of small files and
    /// one of large files, merged by overlayfs at `mountpoint`.
    fn split(fs: impl Fn() -> ShoalFs, mountpoint: &Path, config: &MountConfig, data_dir: &Path) -> anyhow::Result<Mounted> {
        let (parts, lock) = new_parts_dir(data_dir)?;
        let (small, large) = (fs().with_view(View::SmallFiles), fs().with_view(View::LargeFiles));
        let (stats, local) = (vec![small.stats(), large.stats()], large.materialiser());
        let mut mounted = Mounted {
            mode: Mode::Merged,
            mountpoint: mountpoint.to_path_buf(),
            sessions: Vec::new(),
            stats,
            local: Some(local),
            parts: None,
            _lock: Some(lock),
        };
        let result = (|| {
            for (fs, dir) in [small, large].into_iter().zip(MERGED_PARTS) {
                let dir = parts.join(dir);
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                let session = fs
                    .mount(&dir, config)
                    .with_context(|| format!("mounting on {} (is fuse3 installed and /dev/fuse usable?)", dir.display()))?;
                set_read_ahead(&dir, READ_AHEAD_KB);
                mounted.sessions.push((session, dir));
            }
            let lowers: Vec<&Path> = mounted.sessions.iter().map(|(_, dir)| dir.as_path()).collect();
            overlay::mount(&config.fs_name, &lowers, mountpoint)
                .with_context(|| format!("mounting overlayfs on {}", mountpoint.display()))?;
            let dev = std::fs::metadata(mountpoint)?.dev();
            anyhow::Ok(dev)
        })();
        mounted.finish(parts, result)
    }

    /// Completes a mount in `parts` whose top filesystem has device `result`; on failure,
    /// unmounts what was mounted and removes the directory.
    fn finish(mut self, parts: PathBuf, result: anyhow::Result<u64>) -> anyhow::Result<Mounted> {
        match result {
            Ok(dev) => {
                self.parts = Some((parts, dev));
                Ok(self)
            }
            Err(e) => {
                for (session, dir) in self.sessions.drain(..) {
                    let _ = session.umount_and_join();
                    let _ = std::fs::remove_dir(dir);
                }
                remove_parts_dir(&parts);
                Err(e)
            }
        }
    }

    /// The directories a container's overlayfs takes as its lower layers, top first: the
    /// FUSE mounts themselves when merged (an overlayfs cannot stack on this one), else the
    /// mount point.
    fn lower_dirs(&self) -> Vec<PathBuf> {
        match self.mode {
            Mode::Merged => self.sessions.iter().map(|(_, dir)| dir.clone()).collect(),
            _ => vec![self.mountpoint.clone()],
        }
    }

    /// Whether the image is still mounted (it can be unmounted from outside).
    fn is_mounted(&self) -> bool {
        let fuse_up = self.sessions.iter().all(|(session, _)| !session.guard.is_finished());
        match &self.parts {
            Some((_, dev)) => fuse_up && std::fs::metadata(&self.mountpoint).is_ok_and(|m| m.dev() == *dev),
            None => fuse_up,
        }
    }

    /// Unmounts the EROFS or overlayfs, then each FUSE mount, and removes their directories.
    async fn unmount(self) {
        if let Some((_, dev)) = &self.parts {
            if std::fs::metadata(&self.mountpoint).is_ok_and(|m| m.dev() == *dev) {
                match overlay::unmount(&self.mountpoint) {
                    Ok(false) => {}
                    Ok(true) => {
                        warn!(mountpoint = %self.mountpoint.display(), "the mount is busy; detached it, it goes once no longer used")
                    }
                    Err(e) => {
                        warn!(mountpoint = %self.mountpoint.display(), error = %e, "cannot unmount the image; unmount it with `umount -l`")
                    }
                }
            }
        }
        for (session, dir) in self.sessions {
            unmount(session, &dir).await;
        }
        if let Some((parts, _)) = &self.parts {
            remove_parts_dir(parts);
        }
    }
}

/// A new directory under `<data_dir>/mounts` for a mount's FUSE mounts, with its lock file
/// locked; clears the directories of mounts that are gone first.
fn new_parts_dir(data_dir: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let all = data_dir.join("mounts");
    std::fs::create_dir_all(&all).with_context(|| format!("creating {}", all.display()))?;
    // Held while clearing and while creating a directory and locking it, so that no mount
    // takes another's new directory, not yet locked, for a gone mount's.
    let all_lock = all.join(LOCK_FILE);
    let guard = std::fs::File::create(&all_lock).and_then(|file| file.lock().map(|()| file));
    let _guard = guard.with_context(|| format!("locking {}", all_lock.display()))?;
    remove_stale_parts(&all);
    let parts = tempfile::Builder::new()
        .prefix("mount-")
        .tempdir_in(&all)
        .with_context(|| format!("creating a directory in {}", all.display()))?
        .keep();
    let lock = std::fs::File::create(parts.join(LOCK_FILE)).and_then(|file| file.try_lock().map(|()| file).map_err(std::io::Error::other));
    let lock = lock.with_context(|| format!("locking {}", parts.join(LOCK_FILE).display()))?;
    Ok((parts, lock))
}

/// Removes a mount's directory once its FUSE mounts are gone (never recursively: a
/// directory still mounted on stays).
fn remove_parts_dir(parts: &Path) {
    for dir in PARTS {
        let _ = std::fs::remove_dir(parts.join(dir));
    }
    let _ = std::fs::remove_file(parts.join(LOCK_FILE));
    let _ = std::fs::remove_dir(parts);
}

/// Detaches and removes the mount directories under `all` that no `shoal mount` holds any more
/// (killed before it could unmount): each holds a lock on its `lock` file for as long as it
/// runs, which the kernel drops when the process dies, whatever PID namespace it ran in. The
/// caller holds `all`'s own lock.
fn remove_stale_parts(all: &Path) {
    let Ok(entries) = std::fs::read_dir(all) else { return };
    for entry in entries.flatten() {
        let parts = entry.path();
        // No lock file: being created right now, or not ours; left alone.
        let Ok(lock) = std::fs::File::open(parts.join(LOCK_FILE)) else { continue };
        if lock.try_lock().is_err() {
            continue;
        }
        for dir in PARTS {
            detach(&parts.join(dir));
        }
        remove_parts_dir(&parts);
        if !parts.exists() {
            info!(dir = %parts.display(), "removed the mount directories of a shoal mount that is gone");
        }
    }
}

/// The live counters of one mount.
struct Counters {
    /// How the image is mounted.
    mode: Mode,
    /// What each FUSE mount served.
    fs: Vec<Arc<FsStats>>,
    /// The lower layers a container's overlayfs takes ([`Mounted::lower_dirs`]).
    lowers: Vec<PathBuf>,
    /// What it materialised, if it may.
    local: Option<Arc<Materialiser>>,
    /// What was fetched.
    loader: Arc<ChunkLoader>,
}

impl Counters {
    fn json(&self) -> serde_json::Value {
        let n = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        let sum = |counter: fn(&FsStats) -> &std::sync::atomic::AtomicU64| self.fs.iter().map(|fs| n(counter(fs))).sum::<u64>();
        let loader = self.loader.stats();
        let local = |counter: fn(&shoal_fuse::materialise::MaterialiseStats) -> &std::sync::atomic::AtomicU64| {
            self.local.as_ref().map_or(0, |local| n(counter(local.stats())))
        };
        // A merged mount's small files never use passthrough; its state is the large files'.
        let passthrough = self.fs.iter().map(|fs| fs.passthrough()).max_by_key(|p| *p as u8).unwrap_or(Passthrough::Off);
        serde_json::json!({
            "mode": format!("{:?}", self.mode).to_lowercase(),
            "passthrough": passthrough.as_str(),
            "mounts": self.fs.len(),
            "lower_dirs": self.lowers.iter().map(|dir| dir.display().to_string()).collect::<Vec<_>>(),
            "io_uring_requests": shoal_fuse::fs::io_uring_requests(),
            "passthrough_opens": sum(|fs| &fs.passthrough_opens),
            "plain_opens": sum(|fs| &fs.plain_opens),
            "opens_left_to_kernel": sum(|fs| &fs.opens_left_to_kernel),
            "releases": sum(|fs| &fs.releases),
            "reads": sum(|fs| &fs.reads),
            "metadata_reads": sum(|fs| &fs.metadata_reads),
            "read_bytes": sum(|fs| &fs.read_bytes),
            "stored_files": sum(|fs| &fs.stored_files),
            "materialised_files": local(|l| &l.files),
            "materialised_bytes": local(|l| &l.bytes),
            "materialise_failures": local(|l| &l.failed),
            "fetched_chunks": n(&loader.fetched_chunks),
            "fetched_bytes": n(&loader.fetched_bytes),
            "failed_chunks": n(&loader.failed_chunks),
            "cache_used_bytes": self.loader.cache().used(),
        })
    }
}

/// Writes the counters to `path` when they changed since `written` (atomically: a reader never
/// sees a partial file). Best effort.
fn write_stats(path: &Path, counters: &Counters, written: &mut Option<serde_json::Value>) {
    let now = counters.json();
    if written.as_ref() == Some(&now) {
        return;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = std::fs::write(&tmp, format!("{now}\n")).and_then(|()| std::fs::rename(&tmp, path));
    match result {
        Ok(()) => *written = Some(now),
        Err(e) => {
            if written.is_none() {
                warn!(path = %path.display(), error = %e, "cannot write the stats file");
            }
            *written = Some(now);
        }
    }
}

/// Unmounts and waits for the session to end, at most [`UNMOUNT_TIMEOUT`]; when the kernel
/// refuses (the mount is busy) detaches it lazily so it goes away once no longer used.
async fn unmount(session: MountSession, mountpoint: &Path) {
    // A plain thread, not the runtime's blocking pool: a runtime waits for its blocking tasks
    // when it shuts down, and a stuck session must not keep the process alive.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(session.umount_and_join());
    });
    let failed = match tokio::time::timeout(UNMOUNT_TIMEOUT, done_rx).await {
        Ok(Ok(Ok(()))) => false,
        Ok(Ok(Err(e))) => {
            warn!(error = %e, "unmounting failed; detaching the mount lazily");
            true
        }
        Ok(Err(_)) => true,
        Err(_) => {
            warn!("unmounting took over {UNMOUNT_TIMEOUT:?}; detaching the mount lazily");
            true
        }
    };
    if failed && !detach(mountpoint) {
        warn!(mountpoint = %mountpoint.display(), "cannot detach the mount; unmount it with `fusermount3 -u -z`");
    }
}

/// Detaches the FUSE mount at `dir` lazily (it goes once no longer used); whether that worked.
fn detach(dir: &Path) -> bool {
    let status = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(dir).stderr(std::process::Stdio::null()).status();
    status.is_ok_and(|s| s.success())
}

/// Where a remote image's manifest, bootstrap and chunks come from.
enum Remote {
    /// A Shoal agent's registry mirror at this base URL.
    Mirror { http: reqwest::Client, base: String },
    /// The registry itself.
    Direct { client: Arc<RegistryClient> },
}

impl Remote {
    async fn connect(args: &MountArgs, config: &Config, r: &Reference) -> anyhow::Result<Remote> {
        let direct = Remote::Direct { client: Arc::new(RegistryClient::new(Arc::new(config.clone()))) };
        if args.direct {
            return Ok(direct);
        }
        let given = args.mirror.clone();
        let base = given.clone().unwrap_or_else(|| config.mirror.listen.to_string());
        let base = shoal_core::config::mirror_url(&base);
        let base = base.trim_end_matches('/').to_string();
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build()?;
        match http.get(format!("{base}/v2/")).timeout(Duration::from_secs(2)).send().await {
            Ok(resp) if resp.status().is_success() => Ok(Remote::Mirror { http, base }),
            _ if given.is_some() => bail!("the mirror at {base} does not answer (start the agent, or use --direct)"),
            _ => {
                info!(mirror = %base, registry = %r.registry, "no agent answers; fetching from the registry directly");
                Ok(direct)
            }
        }
    }

    async fn manifest(&self, r: &Reference, reference: String) -> anyhow::Result<(Bytes, Option<String>)> {
        let resp = match self {
            Remote::Mirror { http, base } => http
                .get(format!("{base}/v2/{}/manifests/{reference}", r.repository))
                .query(&[("ns", &r.registry)])
                .header(http::header::ACCEPT, MANIFEST_ACCEPT)
                .send()
                .await
                .with_context(|| format!("manifest {r} via {base}"))?,
            Remote::Direct { client } => client.send(&Request::manifest(&r.registry, &r.repository, &reference)).await?,
        };
        if !resp.status().is_success() {
            bail!("manifest {}/{}:{reference}: {}", r.registry, r.repository, resp.status());
        }
        let media_type = resp.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(String::from);
        Ok((resp.bytes().await?, media_type))
    }

    async fn blob(&self, r: &Reference, digest: &Digest) -> anyhow::Result<Bytes> {
        let resp = match self {
            Remote::Mirror { http, base } => http
                .get(format!("{base}/v2/{}/blobs/{digest}", r.repository))
                .query(&[("ns", &r.registry)])
                .send()
                .await
                .with_context(|| format!("blob {digest} via {base}"))?,
            Remote::Direct { client } => client.send(&Request::blob(&r.registry, &r.repository, digest)).await?,
        };
        if !resp.status().is_success() {
            bail!("blob {digest} of {r}: {}", resp.status());
        }
        let bytes = resp.bytes().await?;
        if &Digest::of(&bytes) != digest {
            bail!("blob {digest} of {r}: content does not match its digest");
        }
        Ok(bytes)
    }

    /// Finds the image's bootstrap layer by its annotation, fetches and decodes it; returns it
    /// with its digest.
    async fn bootstrap(&self, r: &Reference) -> anyhow::Result<(Bootstrap, Digest)> {
        let resolved = image::resolve(r, "linux/amd64", |reference| self.manifest(r, reference)).await?;
        let manifest: ImageManifest = serde_json::from_slice(&resolved.manifest).context("reading the image manifest")?;
        let layer = manifest
            .layers()
            .iter()
            .find(|l| {
                l.annotations().as_ref().and_then(|a| a.get(BOOTSTRAP_ANNOTATION)).map(String::as_str) == Some(BOOTSTRAP_ANNOTATION_VALUE)
            })
            .ok_or_else(|| {
                anyhow!("{r} is not a Shoal image (no layer annotated {BOOTSTRAP_ANNOTATION}); convert it with `shoal build {r}`")
            })?;
        let format = layer.annotations().as_ref().and_then(|a| a.get(FORMAT_ANNOTATION)).cloned().unwrap_or_default();
        if format != FORMAT_ANNOTATION_VALUE {
            bail!("{r}: Shoal format {format:?}; this Shoal reads format {FORMAT_ANNOTATION_VALUE} (upgrade Shoal or rebuild the image)");
        }
        let digest: Digest = layer.digest().to_string().parse()?;
        let bytes = self.blob(r, &digest).await?;
        debug!(%digest, len = bytes.len(), "bootstrap fetched");
        let bootstrap = Bootstrap::decode(&bytes).with_context(|| format!("{r}: reading its bootstrap {digest}"))?;
        Ok((bootstrap, digest))
    }

    fn source(&self, r: &Reference) -> anyhow::Result<Arc<dyn ChunkSource>> {
        Ok(match self {
            Remote::Mirror { base, .. } => Arc::new(MirrorBlobs::new(base, &r.registry, &r.repository)?),
            Remote::Direct { client } => Arc::new(RegistryBlobs::new(client.clone(), &r.registry, &r.repository)),
        })
    }
}

/// The chunk cache: `--cache-dir`, else the first of `<data_dir>/chunks`, `chunks-1`, ... that no
/// other mount is using (mounts one after another share one; mounts at the same time each take
/// their own).
fn open_cache(args: &MountArgs, config: &Config) -> anyhow::Result<(Arc<ChunkCache>, PathBuf)> {
    let open = |dir: &Path| ChunkCache::open(dir, args.cache_size.0).map(Arc::new);
    if let Some(dir) = &args.cache_dir {
        let cache = open(dir).with_context(|| format!("opening the chunk cache {}", dir.display()))?;
        return Ok((cache, dir.clone()));
    }
    for n in 0..MAX_DEFAULT_CACHES {
        let dir = match n {
            0 => config.data_dir.join("chunks"),
            n => config.data_dir.join(format!("chunks-{n}")),
        };
        match open(&dir) {
            Ok(cache) => return Ok((cache, dir)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e).with_context(|| format!("opening the chunk cache {}", dir.display())),
        }
    }
    bail!("{MAX_DEFAULT_CACHES} shoal mounts use every chunk cache under {}; give this one --cache-dir", config.data_dir.display())
}

/// The scheduler replicas that learn access traces: `--scheduler`, else `[peer] schedulers`,
/// else the embedded scheduler of an all-in-one node on this host.
fn schedulers(args: &MountArgs, config: &Config) -> Vec<String> {
    if !args.schedulers.is_empty() {
        return args.schedulers.clone();
    }
    if !config.peer.schedulers.is_empty() {
        return config.peer.schedulers.clone();
    }
    vec![crate::on_loopback(config.scheduler.listen).to_string()]
}

/// This host's id for its traces: `[peer] host_id`, else the host name.
fn host_id(config: &Config) -> String {
    if let Some(id) = &config.peer.host_id {
        return id.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|name| name.trim().to_string()).unwrap_or_default()
}

/// The sysfs directory of the filesystem mounted at `mountpoint`'s backing device info, where
/// its readahead is set: named by the filesystem (`erofs-27`) when the kernel says so
/// (FS_IOC_GETFSSYSFSPATH, Linux 6.10+), else by its device number (`0:41`).
fn bdi_dir(mountpoint: &Path) -> Option<PathBuf> {
    let dir = std::fs::File::open(mountpoint).ok()?;
    if let Some(name) = overlay::sysfs_name(&dir) {
        // "erofs/erofs-27": the part after the filesystem type names the bdi.
        let name = name.rsplit(|&b| b == b'/').next().unwrap_or(&name);
        let named = Path::new("/sys/class/bdi").join(std::ffi::OsStr::from_bytes(name));
        if named.is_dir() {
            return Some(named);
        }
    }
    let dev = dir.metadata().ok()?.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    Some(PathBuf::from(format!("/sys/class/bdi/{major}:{minor}")))
}

/// Sets the mount's readahead to `kb` KiB (the kernel's default is 128), so sequential reads
/// arrive in larger requests, unless it is that already. Best effort: it needs root.
fn set_read_ahead(mountpoint: &Path, kb: u32) {
    let Some(path) = bdi_dir(mountpoint).map(|dir| dir.join("read_ahead_kb")) else { return };
    let path = path.display().to_string();
    let current = std::fs::read_to_string(&path).ok().and_then(|kb| kb.trim().parse::<u32>().ok());
    if current == Some(kb) {
        return;
    }
    match std::fs::write(&path, kb.to_string()) {
        Ok(()) => debug!(%path, from_kb = ?current, to_kb = kb, "set the mount's readahead"),
        Err(e) => info!(%path, error = %e, "cannot set the mount's readahead; sequential reads arrive in requests of its default size"),
    }
}
