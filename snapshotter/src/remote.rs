//! Lazy mounts of Shoal images: each image is served by its own `shoal mount` process, started
//! in a session of its own so that it outlives a restart of the snapshotter (running containers
//! keep reading), and found again by its directory `<root>/remote/<id>`:
//!
//! ```text
//! mnt          the mount point (`shoal mount IMAGE mnt`)
//! stats.json   the process's counters; `lower_dirs` is what a container's overlayfs stacks on
//! pid          the process id
//! mount.log    its output
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// Starts and stops the `shoal mount` processes.
#[derive(Clone, Debug)]
pub struct Mounter {
    /// `<root>/remote`.
    dir: PathBuf,
    /// The `shoal` binary.
    shoal: PathBuf,
    /// The config file `shoal mount` reads (`--config`), if any.
    config: Option<PathBuf>,
    /// Environment variables for the process.
    env: Vec<(String, String)>,
    /// How long a mount may take to come up.
    timeout: Duration,
}

impl Mounter {
    pub fn new(root: &Path, shoal: PathBuf, config: Option<PathBuf>, env: Vec<(String, String)>, timeout: Duration) -> Mounter {
        Mounter { dir: root.join("remote"), shoal, config, env, timeout }
    }

    fn dir_of(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// Mounts `image` (`registry/repository@digest`) for snapshot `id` and returns the
    /// directories a container's overlayfs takes as lower layers. Gives up after the timeout,
    /// stopping the process.
    pub async fn mount(&self, id: u64, image: &str) -> Result<Vec<PathBuf>, String> {
        let dir = self.dir_of(id);
        let mnt = dir.join("mnt");
        // What a killed process left mounted there would lie under the new mount.
        detach(&mnt);
        std::fs::create_dir_all(&mnt).map_err(|e| format!("creating {}: {e}", mnt.display()))?;
        let stats = dir.join("stats.json");
        let _ = std::fs::remove_file(&stats);
        let log_path = dir.join("mount.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let err_log = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = tokio::process::Command::new(&self.shoal);
        cmd.arg("mount").arg(image).arg(&mnt).arg("--stats").arg(&stats);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        // Its log ends with the error chain, which is what a failure reports, not a backtrace.
        cmd.env("RUST_BACKTRACE", "0");
        cmd.stdin(Stdio::null()).stdout(log).stderr(err_log).kill_on_drop(false);
        // SAFETY: setsid is async-signal-safe and touches nothing of this process's memory.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("starting {} mount: {e}", self.shoal.display()))?;
        let pid = child.id().unwrap_or_default();
        let _ = std::fs::write(dir.join("pid"), pid.to_string());
        let start = Instant::now();
        loop {
            if let Some(lowers) = read_lower_dirs(&stats) {
                // Reap the process whenever it ends, so it does not linger as a zombie.
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                info!(image, pid, mount = %mnt.display(), "lazy mount up");
                return Ok(lowers);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("shoal mount exited ({status}): {}", tail(&log_path)));
            }
            if start.elapsed() > self.timeout {
                stop(pid).await;
                let _ = child.wait().await;
                return Err(format!("shoal mount not up after {:?}: {}", self.timeout, tail(&log_path)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether snapshot `id`'s mount is still served: its process runs and its lower
    /// directories are mount points.
    pub fn is_up(&self, id: u64, lower_dirs: &[PathBuf]) -> bool {
        let alive = self.pid(id).is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        alive && !lower_dirs.is_empty() && lower_dirs.iter().all(|d| times_mounted(&mounts, d) > 0)
    }

    fn pid(&self, id: u64) -> Option<i32> {
        std::fs::read_to_string(self.dir_of(id).join("pid")).ok()?.trim().parse().ok().filter(|p| *p > 0)
    }

    /// Stops snapshot `id`'s mount process (it unmounts on SIGTERM) and removes its directory.
    pub async fn unmount(&self, id: u64) {
        let dir = self.dir_of(id);
        if let Some(pid) = self.pid(id) {
            stop(pid as u32).await;
        }
        detach(&dir.join("mnt"));
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %dir.display(), error = %e, "cannot remove a lazy mount's directory");
            }
        }
    }

    /// Ids of the mount directories present, for cleanup.
    pub fn ids(&self) -> Vec<u64> {
        std::fs::read_dir(&self.dir).map(|rd| rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()).unwrap_or_default()
    }
}

/// Unmounts whatever is mounted at `mnt` (a process killed without unmounting leaves its mount
/// behind), detaching it when busy: it goes once nothing uses it.
fn detach(mnt: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for _ in 0..times_mounted(&mounts, mnt) {
        let _ = shoal_fuse::overlay::unmount(mnt);
    }
}

/// Sends SIGTERM to `pid` and waits up to 15 s for it to end, then SIGKILL.
async fn stop(pid: u32) {
    let pid = pid as i32;
    if pid <= 0 {
        return;
    }
    // SAFETY: signalling a process id we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
        if start.elapsed() > Duration::from_secs(15) {
            warn!(pid, "shoal mount did not stop on SIGTERM; killing it");
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z")))
        .unwrap_or(true)
}

/// `lower_dirs` of a `--stats` file, once the mount is up.
fn read_lower_dirs(stats: &Path) -> Option<Vec<PathBuf>> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(stats).ok()?).ok()?;
    let dirs: Vec<PathBuf> = v.get("lower_dirs")?.as_array()?.iter().filter_map(|d| d.as_str().map(PathBuf::from)).collect();
    (!dirs.is_empty()).then_some(dirs)
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// How many mounts the table `mounts` (/proc/self/mounts) has at `path`.
fn times_mounted(mounts: &str, path: &Path) -> usize {
    let want = path.display().to_string();
    mounts.lines().filter(|l| l.split(' ').nth(1).map(unescape).as_deref() == Some(want.as_str())).count()
}

/// /proc/mounts escapes spaces and the like as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}
