//! A real containerd with its own root, state and socket, whose registry hosts point at a mirror.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::require;

/// A containerd process.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd; images of `registry` are pulled through `mirror` (`http://127.0.0.1:port`).
    pub async fn start(registry: &str, mirror: &str) -> anyhow::Result<Containerd> {
        require("containerd");
        require("ctr");
        require("runc");
        let dir = tempfile::Builder::new().prefix("shoal-containerd-").tempdir()?;
        let d = dir.path().to_path_buf();
        let config = format!(
            "version = 2\nroot = \"{}/root\"\nstate = \"{}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}/containerd.sock\"\n",
            d.display(),
            d.display(),
            d.display()
        );
        std::fs::write(d.join("config.toml"), config)?;
        let hosts = d.join("hosts").join(registry);
        std::fs::create_dir_all(&hosts)?;
        std::fs::write(
            hosts.join("hosts.toml"),
            format!("server = \"http://{registry}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
        )?;
        let log = std::fs::File::create(d.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("-c")
            .arg(d.join("config.toml"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let c = Containerd { dir, child: Some(child) };
        let start = Instant::now();
        let d = c.dir.path();
        while !c.ctr(&["version"])?.status.success() {
            if start.elapsed() > Duration::from_secs(20) {
                bail!("containerd did not start: {}", std::fs::read_to_string(d.join("containerd.log")).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(c)
    }

    /// containerd's API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Unmount anything containerd left under its root (snapshots of a failed run).
        let root = self.dir.path().to_string_lossy().into_owned();
        if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
            let mut points: Vec<&str> = mounts.lines().filter_map(|l| l.split(' ').nth(1)).filter(|m| m.starts_with(&root)).collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = Command::new("umount").arg("-l").arg(p).status();
            }
        }
    }
}
