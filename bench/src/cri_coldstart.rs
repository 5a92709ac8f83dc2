//! The cold-start scenario through containerd's CRI, timed as the kubelet starts a pod: from
//! PullImage to the container's first line of output (containerd's log timestamp), with what the
//! registry sent meanwhile. One node (containerd with CRI, and a Shoal agent for the Shoal rows)
//! in a network namespace behind a shaped link to the registry starts one realistic image four
//! ways: containerd's own pull straight from the registry; the same through the Shoal mirror;
//! Shoal's snapshotter starting the image converted by `shoal build` lazily; and lazily with the
//! prefetch the cluster learned from an earlier start on another node.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_tests::cri::{ColdStart, Cri};
use shoal_tests::lazy::drop_page_cache;
use shoal_tests::netns::Lab;
use shoal_tests::registry::run;
use shoal_tests::{require, shoal_bin, Agent, Containerd, CriConfig, Registry, Scheduler};

use crate::plot;
use crate::report::{machine, median, write};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    image: ImageArgs,
    /// Link rate between the node and the registry, Mbit/s (the registry's uplink and the
    /// node's link both ways).
    #[arg(long, default_value_t = 100, display_order = 2)]
    rate_mbit: u32,
    /// Timed starts per row (the median is reported).
    #[arg(long, default_value_t = 1, display_order = 5)]
    runs: usize,
}

/// What the image the pod starts holds (shared with the cluster scenario).
#[derive(clap::Args)]
pub struct ImageArgs {
    /// MiB of data files in the image that the entrypoint never reads (a model, assets).
    #[arg(long, default_value_t = 512, display_order = 1)]
    pub unread_mib: usize,
    /// What the image holds besides the data: `debian` is bookworm with python3 and numpy
    /// (debootstrap) and an entrypoint importing numpy; `busybox` is static busybox and a few MiB
    /// of generated files its entrypoint reads, for a quick check.
    #[arg(long, value_enum, default_value_t = Base::Debian, display_order = 3)]
    pub base: Base,
    /// Where the debootstrapped root filesystem is kept between runs (debootstrap takes a
    /// minute or more).
    #[arg(long, value_name = "DIR", default_value = "/var/tmp/shoal-bench-rootfs", display_order = 4)]
    pub rootfs_cache: PathBuf,
}

/// The image's base: see [`Args::base`].
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Base {
    Debian,
    Busybox,
}

/// The ways a node starts the pod: the table's rows, in order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Row {
    /// containerd pulls the image from the registry and unpacks it (overlayfs).
    Registry,
    /// The same, with the hosts dir pointing at the node's Shoal agent.
    Mirror,
    /// CRI on Shoal's snapshotter, starting the converted image lazily.
    Lazy,
    /// As `Lazy`, the mount prefetching by the trace an earlier start on another node reported.
    Learned,
}

const ROWS: [Row; 4] = [Row::Registry, Row::Mirror, Row::Lazy, Row::Learned];

impl Row {
    fn key(self) -> &'static str {
        match self {
            Row::Registry => "registry",
            Row::Mirror => "mirror",
            Row::Lazy => "lazy",
            Row::Learned => "lazy_learned",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Row::Registry => "(1) containerd pulls from the registry, overlayfs",
            Row::Mirror => "(2) containerd pulls through the Shoal mirror, overlayfs",
            Row::Lazy => "(3) Shoal snapshotter, lazy",
            Row::Learned => "(4) Shoal snapshotter, lazy, prefetch learned from an earlier start",
        }
    }

    /// Short name for the plot's legend.
    fn short(self) -> &'static str {
        match self {
            Row::Registry => "(1) containerd, from the registry",
            Row::Mirror => "(2) containerd, through the Shoal mirror",
            Row::Lazy => "(3) Shoal lazy",
            Row::Learned => "(4) Shoal lazy, learned prefetch",
        }
    }

    fn agent(self) -> bool {
        self != Row::Registry
    }

    fn lazy(self) -> bool {
        matches!(self, Row::Lazy | Row::Learned)
    }
}

/// The lab's hosts: the registry, the node timed, and the node whose earlier start teaches (4).
const REGISTRY_HOST: usize = 0;
const NODE: usize = 1;
const TEACHER: usize = 2;

/// The repository the image is pushed to; the converted one is tagged `v1-shoal`.
pub const REPO: &str = "bench/app";

/// How long one start may take, PullImage to first line.
pub const START_TIMEOUT: Duration = Duration::from_secs(900);

/// The registry counts as done sending once its access log has not grown for this long (a lazy
/// mount's background prefetch may still run when the container has exited).
const REGISTRY_QUIET: Duration = Duration::from_secs(2);

/// PATH in the image's config (umoci sets none; containerd adds none of its own to CRI containers).
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The image the pod starts, as pushed.
pub struct AppImage {
    /// What the entrypoint prints first.
    pub first_line: String,
    /// The entrypoint.
    pub entrypoint: Vec<String>,
    /// Bytes of the image's files, unpacked.
    pub unpacked_bytes: u64,
    /// Of those, the data files the entrypoint never reads.
    pub unread_bytes: u64,
    /// What the base holds, for the report.
    pub description: String,
}

/// `du -sb` of a directory.
fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let out = Command::new("du").arg("-sb").arg(dir).output().context("running du")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().and_then(|n| n.parse().ok()).with_context(|| format!("du -sb {}: {text}", dir.display()))
}

/// Unmounts whatever is mounted under `dir` (deepest first), as a failed debootstrap leaves
/// its target's /proc and /sys.
fn unmount_under(dir: &Path) {
    let prefix = format!("{}/", dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<&str> = mounts.lines().filter_map(|l| l.split(' ').nth(1)).filter(|m| m.starts_with(&prefix)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
}

/// bookworm (minbase) with python3 and numpy, made by debootstrap once and kept in `cache`.
fn debian_rootfs(cache: &Path) -> anyhow::Result<PathBuf> {
    let rootfs = cache.join("bookworm-minbase-python3-numpy");
    let done = cache.join("bookworm-minbase-python3-numpy.done");
    if done.exists() && rootfs.join("usr/bin/python3").exists() {
        eprintln!("root filesystem: {} (cached)", rootfs.display());
        return Ok(rootfs);
    }
    require("debootstrap");
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let partial = cache.join("bookworm-minbase-python3-numpy.partial");
    for dir in [&partial, &rootfs] {
        if dir.exists() {
            unmount_under(dir);
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    eprintln!("root filesystem: debootstrap of bookworm with python3 and numpy into {} (once; a minute or more)", partial.display());
    let started = Instant::now();
    let result = run(Command::new("debootstrap").args(["--variant=minbase", "--include=python3,python3-numpy", "bookworm"]).arg(&partial));
    unmount_under(&partial);
    result.context("debootstrap (it needs Debian's package archive)")?;
    std::fs::rename(&partial, &rootfs)?;
    std::fs::write(&done, "")?;
    eprintln!("root filesystem: made in {:.0} s", started.elapsed().as_secs_f64());
    Ok(rootfs)
}

/// Writes `mib` MiB of data files under `dir` (files of at most 32 MiB), with about 4 bits of
/// entropy per byte as the other scenarios' data.
fn write_data(dir: &Path, mib: usize) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut left = mib;
    let mut k = 0;
    while left > 0 {
        let n = left.min(32);
        let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join(format!("part-{k:02}.bin")))?);
        for m in 0..n {
            file.write_all(&crate::fuse::file_data(1 << 20, 500_000 + (k * 32 + m) as u64, false))?;
        }
        file.flush()?;
        left -= n;
        k += 1;
    }
    Ok(())
}

/// Builds the image with umoci (the base as one layer, the data as another, the entrypoint),
/// pushes it to `registry` as `REPO:v1` and converts it with `shoal build` into `REPO:v1-shoal`.
fn build_image(args: &ImageArgs, work: &Path, registry: &Registry, shoal_config: &Path) -> anyhow::Result<AppImage> {
    for tool in ["umoci", "skopeo", "busybox", "du"] {
        require(tool);
    }
    let started = Instant::now();
    let (base, entrypoint, first_line, description) = match args.base {
        Base::Debian => {
            let rootfs = debian_rootfs(&args.rootfs_cache)?;
            let entrypoint = vec!["/usr/bin/python3".to_string(), "-c".into(), "import numpy; print('ready', numpy.__version__)".into()];
            // The line to expect, from the same root filesystem (-B: write no bytecode into the cache).
            let out = Command::new("chroot")
                .arg(&rootfs)
                .args(["/usr/bin/python3", "-B", "-c", "import numpy; print('ready', numpy.__version__)"])
                .output()
                .context("running chroot")?;
            if !out.status.success() {
                bail!("python3 in {} cannot import numpy: {}", rootfs.display(), String::from_utf8_lossy(&out.stderr));
            }
            let line = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string();
            (rootfs, entrypoint, line, "Debian bookworm (debootstrap minbase) with python3 and python3-numpy; the entrypoint imports numpy")
        }
        Base::Busybox => {
            let base = work.join("busybox-root");
            std::fs::create_dir_all(base.join("bin"))?;
            let busybox = Command::new("sh").args(["-c", "command -v busybox"]).output()?;
            std::fs::copy(String::from_utf8_lossy(&busybox.stdout).trim(), base.join("bin/busybox"))?;
            std::fs::create_dir_all(base.join("app/lib"))?;
            for i in 0..8u64 {
                std::fs::write(base.join(format!("app/lib/lib{i}.so")), crate::fuse::file_data(512 << 10, 100 + i, false))?;
            }
            let script = "/bin/busybox cat /app/lib/* > /dev/null && /bin/busybox echo ready busybox";
            let entrypoint = vec!["/bin/busybox".to_string(), "sh".into(), "-c".into(), script.into()];
            (base, entrypoint, "ready busybox".to_string(), "static busybox and 4 MiB of libraries; the entrypoint reads the libraries")
        }
    };
    let data = work.join("data");
    write_data(&data, args.unread_mib)?;
    let layout = work.join("layout");
    let image = format!("{}:v1", layout.display());
    run(Command::new("umoci").args(["init", "--layout"]).arg(&layout))?;
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    // The base through unpack and repack: a layer of plain relative paths, as image builders make.
    let bundle = work.join("bundle");
    run(Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle))?;
    run(Command::new("cp").arg("-a").arg(format!("{}/.", base.display())).arg(bundle.join("rootfs")))?;
    run(Command::new("umoci").args(["repack", "--image", &image]).arg(&bundle))?;
    std::fs::remove_dir_all(&bundle)?;
    run(Command::new("umoci").args(["insert", "--image", &image]).arg(&data).arg("/data"))?;
    let mut config = Command::new("umoci");
    config.args(["config", "--image", &image, "--config.env", PATH_ENV]);
    for arg in &entrypoint {
        config.arg("--config.entrypoint").arg(arg);
    }
    run(&mut config)?;
    run(Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci:{image}"))
        .arg(format!("docker://{}/{REPO}:v1", registry.host())))?;
    let source = format!("{}/{REPO}:v1", registry.host());
    run(Command::new(shoal_bin()).arg("build").arg("-c").arg(shoal_config).arg(&source).arg(format!("{source}-shoal")))?;
    let unread_bytes = (args.unread_mib as u64) << 20;
    let unpacked_bytes = dir_bytes(&base)? + unread_bytes;
    std::fs::remove_dir_all(&data)?;
    std::fs::remove_dir_all(&layout)?;
    eprintln!("image: built, pushed and converted in {:.0} s", started.elapsed().as_secs_f64());
    Ok(AppImage { first_line, entrypoint, unpacked_bytes, unread_bytes, description: description.into() })
}

/// Stops the `shoal mount` processes a snapshotter started for the agent whose data directory
/// is `data_dir` (they outlive the agent by design), with SIGTERM so they unmount and send
/// their last access trace, and detaches whatever is still mounted under `data_dir`.
struct LazyMounts {
    data_dir: PathBuf,
}

impl LazyMounts {
    fn pids(&self) -> Vec<i32> {
        let needle = format!("{}/snapshotter/remote/", self.data_dir.display());
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let zombie = state.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            if !zombie && String::from_utf8_lossy(&cmdline).contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for LazyMounts {
    fn drop(&mut self) {
        for pid in self.pids() {
            // SAFETY: signalling a mount process this node's snapshotter started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in self.pids() {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        unmount_under(&self.data_dir);
    }
}

/// The directories of the nodes running now (containerd's, the agent's), for
/// [`stop_nodes_after_signal`].
static LIVE_NODES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Stops what the live nodes left that outlives its parent, for a signal handler (drops will not
/// run): containerd's shims and their containers, and the lazy mounts, then unmounts whatever
/// is mounted under the nodes' directories. The run's own children are the handler's to kill.
pub fn stop_nodes_after_signal() {
    let dirs = LIVE_NODES.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if dirs.is_empty() {
        return;
    }
    let mut processes = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = String::from_utf8_lossy(&std::fs::read(entry.path().join("cmdline")).unwrap_or_default()).into_owned();
        // /proc/<pid>/stat: "pid (comm) state ppid ...".
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok()).unwrap_or(0);
        processes.push((pid, ppid, cmdline));
    }
    let named: Vec<i32> =
        processes.iter().filter(|(_, _, cmd)| dirs.iter().any(|d| cmd.contains(&*d.to_string_lossy()))).map(|p| p.0).collect();
    // A shim's children are its containers' first processes.
    let children = processes.iter().filter(|(_, ppid, _)| named.contains(ppid)).map(|p| p.0);
    for pid in named.iter().copied().chain(children) {
        // SAFETY: signalling a process of this run's nodes, by its id.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(300));
    for dir in &dirs {
        unmount_under(dir);
    }
}

/// What runs on a node besides containerd with CRI.
pub struct NodeSetup {
    /// A Shoal agent, containerd's registry mirror.
    pub agent: bool,
    /// The agent's snapshotter, which CRI then unpacks into (lazily) instead of overlayfs.
    pub lazy: bool,
    /// The agent's `[peer]` table, if any.
    pub peer: Option<String>,
}

/// One fresh node for one start, in a lab host's network namespace: containerd with CRI, and
/// for the Shoal rows an agent (with its snapshotter for the lazy rows). Dropping it removes
/// the pods, stops containerd, the lazy mounts and the agent, and unmounts what they mounted.
pub struct Node {
    /// Dropped first: removing its pods unmounts the containers' rootfs.
    pub containerd: Containerd,
    /// Then the lazy mounts, while the agent's data directory is still there.
    mounts: Option<LazyMounts>,
    agent: Option<Agent>,
    /// Holds the snapshotter's socket.
    socket_dir: tempfile::TempDir,
}

impl Node {
    /// Starts a node for `row` on `host`; with `scheduler`, its lazy mounts report their
    /// access traces there (and prefetch by what it learned), as host `host_id`.
    async fn start(
        lab: &Lab,
        host: usize,
        row: Row,
        registry: &Registry,
        sandbox: &str,
        scheduler: Option<&Scheduler>,
        host_id: &str,
    ) -> anyhow::Result<Node> {
        // The agent's peer server stays off: the scheduler only learns the mounts' traces.
        let peer = scheduler.map(|s| format!("[peer]\nschedulers = [\"{}\"]\nhost_id = \"{host_id}\"\n", s.addr()));
        let setup = NodeSetup { agent: row.agent(), lazy: row.lazy(), peer };
        Node::start_with(lab, host, &setup, registry, sandbox).await
    }

    /// Starts a node as `setup` says on `host`, pulling from `registry`, its pods' sandbox
    /// image `sandbox`.
    pub async fn start_with(lab: &Lab, host: usize, setup: &NodeSetup, registry: &Registry, sandbox: &str) -> anyhow::Result<Node> {
        let socket_dir = tempfile::Builder::new().prefix("shoal-bench-snap-").tempdir()?;
        let socket = socket_dir.path().join("snapshotter.sock");
        let mut agent = None;
        if setup.agent {
            let mut extra = format!("[registry.\"{}\"]\nplain_http = true\n", registry.host());
            if setup.lazy {
                extra.push_str(&format!("[snapshotter]\nenabled = true\nsocket = \"{}\"\n", socket.display()));
            }
            extra.push_str(setup.peer.as_deref().unwrap_or_default());
            agent = Some(Agent::start_in_net(lab, host, "agent", &extra, &[]).await?);
        }
        let mounts = agent.as_ref().filter(|_| setup.lazy).map(|a| LazyMounts { data_dir: a.data_dir() });
        let mut cri = CriConfig::new(sandbox);
        if setup.lazy {
            let start = Instant::now();
            while !socket.exists() {
                if start.elapsed() > Duration::from_secs(20) {
                    bail!("the agent's snapshotter did not bind {} within 20 s", socket.display());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            cri = cri.proxy_snapshotter("shoal", &socket);
        }
        let mirror = agent.as_ref().map_or_else(|| registry.url(), |a| a.mirror());
        let containerd = Containerd::start_cri_in(lab, host, &registry.host(), &mirror, &cri).await?;
        let node = Node { containerd, mounts, agent, socket_dir };
        LIVE_NODES.lock().unwrap_or_else(|p| p.into_inner()).extend(node.dirs());
        Ok(node)
    }

    /// The directories the node runs in.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.containerd.dir.path().to_path_buf(), self.socket_dir.path().to_path_buf()];
        dirs.extend(self.agent.as_ref().map(|a| a.dir.path().to_path_buf()));
        dirs
    }

    /// The lazy mounts' `--stats` files, as JSON.
    pub fn mount_stats(&self) -> Vec<serde_json::Value> {
        let Some(agent) = &self.agent else { return Vec::new() };
        let remote = agent.data_dir().join("snapshotter/remote");
        let mut stats = Vec::new();
        for entry in std::fs::read_dir(remote).into_iter().flatten().flatten() {
            if let Ok(Ok(v)) = std::fs::read(entry.path().join("stats.json")).map(|b| serde_json::from_slice(&b)) {
                stats.push(v);
            }
        }
        stats
    }

    /// The lazy mounts' logs, one after the other.
    pub fn mount_logs(&self) -> String {
        let Some(agent) = &self.agent else { return String::new() };
        let remote = agent.data_dir().join("snapshotter/remote");
        let mut text = String::new();
        for entry in std::fs::read_dir(remote).into_iter().flatten().flatten() {
            text.push_str(&std::fs::read_to_string(entry.path().join("mount.log")).unwrap_or_default());
        }
        text
    }

    /// Writes the node's logs to `dir` as `<name>-{containerd,agent,mount}.log`.
    pub fn save_logs(&self, dir: &Path, name: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("{name}-containerd.log")), self.containerd.log())?;
        if let Some(agent) = &self.agent {
            std::fs::write(dir.join(format!("{name}-agent.log")), agent.log())?;
        }
        if self.mounts.is_some() {
            std::fs::write(dir.join(format!("{name}-mount.log")), self.mount_logs())?;
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let dirs = self.dirs();
        LIVE_NODES.lock().unwrap_or_else(|p| p.into_inner()).retain(|d| !dirs.contains(d));
    }
}

/// What one start measured.
#[derive(Debug, Clone)]
pub struct Start {
    /// PullImage start to the container's first line.
    pub seconds: f64,
    /// How long PullImage took.
    pub pull_seconds: f64,
    /// What the registry sent (GETs answered 200 or 206), from PullImage to when it went quiet
    /// after the container exited.
    pub registry_bytes: u64,
    /// Registry requests in that time.
    pub registry_requests: usize,
    /// The lazy mount's counters after the start.
    pub mount_stats: Vec<serde_json::Value>,
    /// Whether the lazy mount prefetched by a trace the cluster learned.
    pub learned_prefetch: bool,
    /// The node's directories (containerd's, the agent's, the snapshotter socket's), all
    /// removed with the node.
    pub node_dirs: Vec<PathBuf>,
}

impl Start {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "seconds": self.seconds,
            "pull_seconds": self.pull_seconds,
            "registry_bytes": self.registry_bytes,
            "registry_requests": self.registry_requests,
            "mount_stats": self.mount_stats,
            "learned_prefetch": self.learned_prefetch,
            "node_dirs": self.node_dirs,
        })
    }
}

/// Starts the pod on `node` and times it: the sandbox first (untimed, as the kubelet runs it
/// before pulling the container's image), then a dropped page cache, then PullImage of `image`
/// and a container running the image's own entrypoint, until its first line. Fails unless that
/// line is `image.first_line` and the container exits with 0.
pub async fn start(node: &Node, registry: &Registry, image: &str, app: &AppImage, run_id: &str) -> anyhow::Result<Start> {
    let cri = node.containerd.cri().await?;
    let pod = cri.run_pod(&format!("bench-{run_id}")).await?;
    drop_page_cache()?;
    let before = registry.hits().len();
    let cold = cri.cold_start(&pod, "app", image, &[], START_TIMEOUT).await?;
    check_run(&cri, &cold, app).await?;
    wait_registry_quiet(registry).await;
    let (registry_bytes, registry_requests) = registry_sent(registry, before);
    let learned_prefetch = node.mount_logs().contains("prefetching by the trace the cluster learned");
    let result = Start {
        seconds: cold.first_output.as_secs_f64(),
        pull_seconds: cold.pull.as_secs_f64(),
        registry_bytes,
        registry_requests,
        mount_stats: node.mount_stats(),
        learned_prefetch,
        node_dirs: node.dirs(),
    };
    cri.remove_container(&cold.container).await?;
    cri.remove_pod(&pod).await?;
    Ok(result)
}

/// Fails unless the container of `cold` printed `app.first_line` first and exited with 0.
pub async fn check_run(cri: &Cri, cold: &ColdStart, app: &AppImage) -> anyhow::Result<()> {
    if cold.first_line.text != app.first_line {
        bail!("the container printed {:?} first, expected {:?}", cold.first_line.text, app.first_line);
    }
    let code = cri.wait_exit(&cold.container, Duration::from_secs(120)).await?;
    if code != 0 {
        bail!("the container exited with {code}: {}", cri.output(&cold.container).unwrap_or_default());
    }
    Ok(())
}

/// Waits until the registry has been quiet for a while: a lazy mount may still be prefetching.
pub async fn wait_registry_quiet(registry: &Registry) {
    let (mut seen, mut since) = (registry.hits().len(), Instant::now());
    let waiting = Instant::now();
    while since.elapsed() < REGISTRY_QUIET && waiting.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = registry.hits().len();
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
    }
}

/// What the registry sent (bytes and requests: GETs answered 200 or 206) since its access log
/// held `before` entries.
pub fn registry_sent(registry: &Registry, before: usize) -> (u64, usize) {
    let hits = registry.hits();
    let sent: Vec<_> =
        hits.get(before..).unwrap_or_default().iter().filter(|h| h.method == "GET" && matches!(h.status, 200 | 206)).collect();
    (sent.iter().map(|h| h.bytes).sum(), sent.len())
}

/// Waits until `scheduler` has recorded an access trace from `host_id`.
async fn wait_trace(scheduler: &Scheduler, host_id: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    // The log's fields are coloured: match the host's id alone.
    while !scheduler.log().lines().any(|l| l.contains("trace recorded") && l.contains(host_id)) {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the scheduler recorded no access trace from {host_id} within 30 s:\n{}", scheduler.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The images in the registry, and their sizes.
pub struct Images {
    /// The pod's image.
    pub app: AppImage,
    /// The pods' sandbox image.
    pub sandbox: String,
    /// Bytes of the image as pushed.
    pub image_bytes: u64,
    /// Bytes of the image as converted by `shoal build`.
    pub converted_bytes: u64,
    /// Bytes of the converted image's bootstrap.
    pub bootstrap_bytes: u64,
}

/// Builds the pod's image in `work`, pushes it and the sandbox image to `registry` and converts
/// the former with `shoal build`.
pub async fn push_images(args: &ImageArgs, work: &Path, registry: &Registry) -> anyhow::Result<Images> {
    let shoal_config = work.join("shoal.toml");
    std::fs::write(&shoal_config, format!("[registry.\"{}\"]\nplain_http = true\n", registry.host()))?;
    let app = build_image(args, work, registry, &shoal_config)?;
    let sandbox = shoal_tests::cri::push_sandbox_image(registry).await?;
    let original = registry.image_blobs(REPO, "v1").await?;
    let converted = registry.image_blobs(REPO, "v1-shoal").await?;
    Ok(Images {
        app,
        sandbox,
        image_bytes: original.iter().map(|(_, s)| s).sum(),
        converted_bytes: converted.iter().map(|(_, s)| s).sum(),
        bootstrap_bytes: converted.last().map_or(0, |(_, size)| *size),
    })
}

pub async fn run_scenario(args: Args, out: &Path) -> anyhow::Result<()> {
    for tool in ["containerd", "runc", "docker-registry", "tc", "nsenter", "chroot"] {
        require(tool);
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let work = tempfile::Builder::new().prefix("shoal-bench-cri-").tempdir_in("/var/tmp")?;
    let lab = Lab::new(3)?;
    let registry = Registry::start_in(&lab, REGISTRY_HOST).await?;
    let Images { app, sandbox, image_bytes, converted_bytes, bootstrap_bytes } = push_images(&args.image, work.path(), &registry).await?;
    lab.shape(REGISTRY_HOST, args.rate_mbit, None)?;
    for host in [NODE, TEACHER] {
        lab.shape(host, args.rate_mbit, Some(args.rate_mbit))?;
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "CRI cold start: {:.1} MiB image ({:.1} MiB as Shoal's), {:.1} MiB unpacked, {} Mbit/s link, {} run(s)",
        mib(image_bytes),
        mib(converted_bytes),
        mib(app.unpacked_bytes),
        args.rate_mbit,
        args.runs
    );
    let logs = out.join("cri-coldstart-logs");
    let mut starts: Vec<(Row, Vec<Start>)> = ROWS.iter().map(|r| (*r, Vec::new())).collect();
    let mut teachers = Vec::new();
    for i in 0..args.runs {
        for (row, results) in starts.iter_mut() {
            let row = *row;
            let image = match row.lazy() {
                true => format!("{}/{REPO}:v1-shoal", registry.host()),
                false => format!("{}/{REPO}:v1", registry.host()),
            };
            // (4) learns from a start on another fresh node, reported to a scheduler of its own.
            let scheduler = match row {
                Row::Learned => Some(Scheduler::start_on(lab.gateway()).await?),
                _ => None,
            };
            if let Some(s) = &scheduler {
                let teacher = Node::start(&lab, TEACHER, row, &registry, &sandbox, Some(s), "bench-teacher").await?;
                let taught = start(&teacher, &registry, &image, &app, &format!("teacher-{i}")).await;
                teacher.save_logs(&logs, &format!("run{}-teacher", i + 1))?;
                let taught = taught.with_context(|| format!("the teaching start (logs in {})", logs.display()))?;
                // Stopping the node unmounts the image, and the mount reports its whole trace.
                drop(teacher);
                wait_trace(s, "bench-teacher").await?;
                eprintln!("  run {}: teaching start {:.2} s, {:.1} MiB", i + 1, taught.seconds, mib(taught.registry_bytes));
                teachers.push(taught);
            }
            let node = Node::start(&lab, NODE, row, &registry, &sandbox, scheduler.as_ref(), "bench-node").await?;
            let result = start(&node, &registry, &image, &app, &format!("{}-{i}", row.key())).await;
            node.save_logs(&logs, &format!("run{}-{}", i + 1, row.key()))?;
            let result = result.with_context(|| format!("{} (logs in {})", row.label(), logs.display()))?;
            drop(node);
            if let Some(s) = &scheduler {
                std::fs::write(logs.join(format!("run{}-scheduler.log", i + 1)), s.log())?;
            }
            eprintln!(
                "  run {}: {}: {:.2} s to the first line (PullImage {:.2} s), {:.1} MiB from the registry",
                i + 1,
                row.label(),
                result.seconds,
                result.pull_seconds,
                mib(result.registry_bytes)
            );
            results.push(result);
        }
    }
    report(&args, out, &app, (image_bytes, converted_bytes, bootstrap_bytes), &starts, &teachers)
}

/// Writes `cri-coldstart.{json,md,png}` under `out`. The image's sizes: as pushed, as
/// converted, and of the converted image's bootstrap.
fn report(
    args: &Args,
    out: &Path,
    app: &AppImage,
    (image_bytes, converted_bytes, bootstrap_bytes): (u64, u64, u64),
    starts: &[(Row, Vec<Start>)],
    teachers: &[Start],
) -> anyhow::Result<()> {
    let mib = |b: f64| b / 1048576.0;
    let medians: Vec<(Row, f64, f64, f64)> = starts
        .iter()
        .map(|(row, s)| {
            let seconds: Vec<f64> = s.iter().map(|x| x.seconds).collect();
            let pulls: Vec<f64> = s.iter().map(|x| x.pull_seconds).collect();
            let bytes: Vec<f64> = s.iter().map(|x| x.registry_bytes as f64).collect();
            (*row, median(&seconds), median(&pulls), median(&bytes))
        })
        .collect();
    let (base_s, base_b) = (medians[0].1, medians[0].3);
    let mut rows = serde_json::Map::new();
    for ((row, s), (_, seconds, pull, bytes)) in starts.iter().zip(&medians) {
        rows.insert(
            row.key().into(),
            serde_json::json!({
                "label": row.label(),
                "starts": s.iter().map(Start::json).collect::<Vec<_>>(),
                "median_seconds": seconds,
                "median_pull_seconds": pull,
                "median_registry_bytes": bytes,
                "seconds_over_registry_pull": seconds / base_s,
                "bytes_over_registry_pull": bytes / base_b,
            }),
        );
    }
    let json = serde_json::json!({
        "scenario": "cri-coldstart",
        "machine": machine(),
        "rate_mbit": args.rate_mbit,
        "runs": args.runs,
        "image": {
            "base": app.description,
            "entrypoint": app.entrypoint,
            "first_line": app.first_line,
            "bytes": image_bytes,
            "shoal_bytes": converted_bytes,
            "bootstrap_bytes": bootstrap_bytes,
            "unpacked_bytes": app.unpacked_bytes,
            "unread_bytes": app.unread_bytes,
        },
        "targets": { "lazy_seconds_over_registry_pull": 0.2, "lazy_bytes_over_registry_pull": 0.2 },
        "rows": rows,
        "teaching_starts": teachers.iter().map(Start::json).collect::<Vec<_>>(),
    });
    let mut md = format!(
        "### Cold start through containerd's CRI: PullImage to the container's first line ({} Mbit/s link to the registry, median of {} run{})\n\n\
         Targets: Shoal lazy ≤ 0.2× the plain pull (1) in time and in registry bytes.\n\n\
         | how the node starts the pod | time to first line | vs (1) | registry bytes | vs (1) |\n|---|---|---|---|---|\n",
        args.rate_mbit,
        args.runs,
        if args.runs == 1 { "" } else { "s" },
    );
    for (row, seconds, _, bytes) in &medians {
        md.push_str(&format!(
            "| {} | {seconds:.2} s | {:.2}× | {:.1} MiB | {:.3}× |\n",
            row.label(),
            seconds / base_s,
            mib(*bytes),
            bytes / base_b
        ));
    }
    let pulls: Vec<String> = medians.iter().map(|(row, _, pull, _)| format!("{} {pull:.2} s", &row.label()[..3])).collect();
    md.push_str(&format!(
        "\nThe image: {}, plus {:.0} MiB of data files it never reads; {:.1} MiB unpacked, {:.1} MiB as pushed (gzip layers), {:.1} MiB as converted by `shoal build` (its bootstrap {:.2} MiB). \
         The container runs the image's own entrypoint and prints `{}`. \
         Every start is on a fresh node (containerd root, agent data directory) after the page cache was dropped; the pod's sandbox runs first, untimed. \
         Registry bytes: what docker-registry's access log says it sent from PullImage until it went quiet after the container exited. \
         (4) prefetches by the access trace a start on another fresh node reported to the scheduler. \
         Of the time, PullImage took: {}.\n",
        app.description,
        mib(app.unread_bytes as f64),
        mib(app.unpacked_bytes as f64),
        mib(image_bytes as f64),
        mib(converted_bytes as f64),
        mib(bootstrap_bytes as f64),
        app.first_line,
        pulls.join(", "),
    ));
    let series: Vec<(String, Vec<f64>)> =
        medians.iter().map(|(row, seconds, _, bytes)| (row.short().to_string(), vec![seconds / base_s, bytes / base_b])).collect();
    let title = format!("Cold start through CRI, {} Mbit/s: relative to containerd's own pull", args.rate_mbit);
    plot::ratio_bars(
        &out.join("cri-coldstart.png"),
        &title,
        "relative to (1)",
        &["time to first line", "registry bytes"],
        &series,
        Some(0.2),
        true,
    )?;
    write(out, "cri-coldstart", &json, &md)
}
