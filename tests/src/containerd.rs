//! A real containerd with its own root, state and socket, whose registry hosts point at a mirror;
//! optionally with its CRI plugin on (what the kubelet talks to, see [`crate::cri`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cri::Cri;
use crate::netns::{net_only_command, Lab};
use crate::require;

/// How containerd's CRI plugin is configured by [`Containerd::start_cri`].
#[derive(Debug, Clone)]
pub struct CriConfig {
    /// The image of every pod's sandbox ("pause") container. CRI pulls it itself, through the
    /// same hosts dir, so it must live in the registry the fixture mirrors.
    pub sandbox_image: String,
    /// The snapshotter CRI unpacks images into and runs containers from.
    pub snapshotter: String,
    /// Remote snapshotters containerd reaches over gRPC: name and socket.
    pub proxy_snapshotters: Vec<(String, PathBuf)>,
}

impl CriConfig {
    /// CRI on containerd's own overlayfs snapshotter.
    pub fn new(sandbox_image: &str) -> CriConfig {
        CriConfig { sandbox_image: sandbox_image.into(), snapshotter: "overlayfs".into(), proxy_snapshotters: Vec::new() }
    }

    /// Makes the remote snapshotter `name`, served at `socket`, the one CRI uses.
    pub fn proxy_snapshotter(mut self, name: &str, socket: &Path) -> CriConfig {
        self.snapshotter = name.into();
        self.proxy_snapshotters.push((name.into(), socket.into()));
        self
    }

    /// The config sections of CRI and the proxy snapshotters, for a containerd living in `dir`.
    fn toml(&self, dir: &Path) -> String {
        let d = dir.display();
        // The tests run as root but without CAP_SYS_RESOURCE, so runc may not lower a process's
        // oom_score_adj below containerd's own. CRI asks -998 for sandboxes unless restricted,
        // and RunPodSandbox fails with "runc create failed: unable to start container process:
        // can't get final child's PID from pipe: EOF".
        // CNI is never used (pods share the host's network), but its directories are kept
        // inside the fixture rather than in /etc/cni and /opt/cni.
        let mut text = format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{sandbox}\"\n  restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"{snapshotter}\"\n  disable_snapshot_annotations = false\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{d}/hosts\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{d}/cni/bin\"\n  conf_dir = \"{d}/cni/net.d\"\n",
            sandbox = self.sandbox_image,
            snapshotter = self.snapshotter,
        );
        for (name, socket) in &self.proxy_snapshotters {
            text.push_str(&proxy_snapshotter(name, socket));
        }
        text
    }
}

/// The config table making the snapshotter `name` served at `socket` known to containerd.
fn proxy_snapshotter(name: &str, socket: &Path) -> String {
    format!("[proxy_plugins.\"{name}\"]\n  type = \"snapshot\"\n  address = \"{}\"\n", socket.display())
}

/// A containerd process.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    /// Whether the CRI plugin is on.
    cri: bool,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd without CRI; images of `registry` are pulled through `mirror`
    /// (`http://127.0.0.1:port`).
    pub async fn start(registry: &str, mirror: &str) -> anyhow::Result<Containerd> {
        Containerd::start_with(registry, mirror, None, "", None).await
    }

    /// [`Containerd::start`] with the remote snapshotter `name` served at `socket`, for
    /// `ctr --snapshotter <name>`.
    pub async fn start_with_proxy_snapshotter(registry: &str, mirror: &str, name: &str, socket: &Path) -> anyhow::Result<Containerd> {
        Containerd::start_with(registry, mirror, None, &proxy_snapshotter(name, socket), None).await
    }

    /// Starts containerd with its CRI plugin configured by `cri`; images of `registry`, the
    /// sandbox image too, are pulled through `mirror`. Talk to it with [`Containerd::cri`].
    pub async fn start_cri(registry: &str, mirror: &str, cri: &CriConfig) -> anyhow::Result<Containerd> {
        Containerd::start_with(registry, mirror, Some(cri), "", None).await
    }

    /// [`Containerd::start_cri`] with containerd in host `i`'s network namespace of `lab`, so
    /// its pulls (and its host-network pods) use that host's link. It keeps the machine's mount
    /// namespace, so it sees the mounts of a snapshotter started the same way (an agent from
    /// [`crate::Agent::start_in_net`]) and the fixture unmounts what it leaves.
    pub async fn start_cri_in(lab: &Lab, i: usize, registry: &str, mirror: &str, cri: &CriConfig) -> anyhow::Result<Containerd> {
        Containerd::start_with(registry, mirror, Some(cri), "", Some(lab.ns(i))).await
    }

    async fn start_with(
        registry: &str,
        mirror: &str,
        cri: Option<&CriConfig>,
        extra: &str,
        netns: Option<&str>,
    ) -> anyhow::Result<Containerd> {
        require("containerd");
        require("ctr");
        require("runc");
        let dir = tempfile::Builder::new().prefix("shoal-containerd-").tempdir()?;
        let d = dir.path().to_path_buf();
        let disabled = if cri.is_some() { "" } else { "\"io.containerd.grpc.v1.cri\"" };
        let mut config = format!(
            "version = 2\nroot = \"{}/root\"\nstate = \"{}/state\"\ndisabled_plugins = [{disabled}]\n[grpc]\n  address = \"{}/containerd.sock\"\n",
            d.display(),
            d.display(),
            d.display()
        );
        config.push_str(&cri.map(|c| c.toml(&d)).unwrap_or_default());
        config.push_str(extra);
        std::fs::write(d.join("config.toml"), config)?;
        let hosts = d.join("hosts").join(registry);
        std::fs::create_dir_all(&hosts)?;
        std::fs::write(
            hosts.join("hosts.toml"),
            format!("server = \"http://{registry}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
        )?;
        let log = std::fs::File::create(d.join("containerd.log"))?;
        let mut command = match netns {
            Some(ns) => net_only_command(ns, "containerd"),
            None => Command::new("containerd"),
        };
        let child =
            command.arg("-c").arg(d.join("config.toml")).stdout(log.try_clone()?).stderr(log).spawn().context("starting containerd")?;
        let c = Containerd { dir, cri: cri.is_some(), child: Some(child) };
        let start = Instant::now();
        while !c.ctr(&["version"])?.status.success() {
            if start.elapsed() > Duration::from_secs(20) {
                bail!("containerd did not start:\n{}", c.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(c)
    }

    /// containerd's API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// A CRI client of this containerd, with pods' log directories inside its temp dir.
    pub async fn cri(&self) -> anyhow::Result<Cri> {
        if !self.cri {
            bail!("containerd was started without CRI: start it with Containerd::start_cri");
        }
        Cri::connect(&self.socket(), self.dir.path().join("pods")).await
    }

    /// Mount points under this containerd's temp dir, deepest first.
    pub fn mounts(&self) -> Vec<String> {
        let root = self.dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut points: Vec<String> =
            mounts.lines().filter_map(|l| l.split(' ').nth(1)).filter(|m| m.starts_with(&root)).map(String::from).collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        points
    }

    /// Runs `ctr` against this containerd.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("ctr").arg("-a").arg(self.socket()).args(args).stdin(Stdio::null()).output().context("running ctr")
    }

    /// `ctr images pull` through the hosts dir (and so the mirror), optionally with credentials.
    pub fn pull(&self, image: &str, user: Option<&str>) -> anyhow::Result<Output> {
        let hosts = self.dir.path().join("hosts");
        let hosts = hosts.to_string_lossy();
        let mut args = vec!["images", "pull", "--hosts-dir", &hosts];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        args.push(image);
        self.ctr(&args)
    }

    /// `ctr run --rm IMAGE id CMD...`, returning stdout.
    pub fn run(&self, image: &str, cmd: &[&str]) -> anyhow::Result<String> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = format!("t{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let mut args = vec!["run", "--rm", image, &id];
        args.extend(cmd);
        let out = self.ctr(&args)?;
        if !out.status.success() {
            bail!("ctr run failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Pods left by a failed test: stopping them through CRI, while containerd still runs,
        // ends their processes and unmounts their rootfs and shm.
        if self.cri {
            if let Err(e) = crate::cri::remove_every_pod(&self.socket()) {
                eprintln!("removing CRI pods of {}: {e:#}", self.socket().display());
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_shims(&self.socket());
        if std::thread::panicking() {
            eprintln!("--- containerd log ---\n{}", self.log());
        }
        // Unmount anything containerd left under its root (snapshots of a failed run).
        for p in self.mounts() {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

/// Kills the shims that outlived the containerd listening on `socket`, and their containers' first
/// processes (the shims' children): a container whose task was not deleted keeps both running.
fn kill_shims(socket: &Path) {
    let address = socket.to_string_lossy().into_owned();
    let mut shims = Vec::new();
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
        if args.next().is_some_and(|a| a.contains("containerd-shim")) && args.any(|a| a == address) {
            shims.push(pid);
        }
        // /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if let Some(ppid) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok()) {
            parents.push((pid, ppid));
        }
    }
    let children = parents.iter().filter(|(_, ppid)| shims.contains(ppid)).map(|(pid, _)| *pid);
    for pid in children.chain(shims.iter().copied()) {
        // SAFETY: signalling a process this fixture's containerd started, by its id.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}
