//! Shoal's containerd snapshotter, driven by a real containerd: ordinary images get overlayfs
//! snapshots, Shoal images lazy ones.

use std::path::{Path, PathBuf};

use shoal_tests::{random_bytes, Agent, Containerd, Registry};

/// An agent running the snapshotter on a socket in its own temporary directory.
async fn agent_with_snapshotter() -> (tempfile::TempDir, Agent) {
    let dir = tempfile::Builder::new().prefix("shoal-snap-").tempdir().unwrap();
    let socket = dir.path().join("snapshotter.sock");
    let agent = Agent::start(&format!("[snapshotter]\nenabled = true\nsocket = \"{}\"\n", socket.display())).await.unwrap();
    (dir, agent)
}

/// A containerd whose `shoal` snapshotter is the agent's.
async fn containerd(registry: &Registry, agent: &Agent, sock_dir: &Path) -> Containerd {
    let extra = format!("[proxy_plugins.shoal]\n  type = \"snapshot\"\n  address = \"{}\"\n", sock_dir.join("snapshotter.sock").display());
    Containerd::start_with(&registry.host(), &agent.mirror(), &extra).await.unwrap()
}

fn ctr_ok(ctd: &Containerd, args: &[&str]) -> String {
    let out = ctd.ctr(args).unwrap();
    assert!(out.status.success(), "ctr {args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Mount points under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| m.starts_with(&dir))
        .map(String::from)
        .collect()
}

fn files_named(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if e.file_name() == name {
                found.push(e.path());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_image_pulls_and_runs_on_overlayfs_snapshots_and_a_containers_writes_stay_in_its_upper_layer() {
    let registry = Registry::start(None).await.unwrap();
    registry
        .push_image("team/app", "v1", &[("/data.bin", random_bytes(1 << 20, 7)), ("/hello.txt", b"hello from the top layer\n".to_vec())])
        .await
        .unwrap();
    let (sock_dir, agent) = agent_with_snapshotter().await;
    let ctd = containerd(&registry, &agent, sock_dir.path()).await;
    let image = format!("{}/team/app:v1", registry.host());
    let hosts = ctd.dir.path().join("hosts").display().to_string();
    ctr_ok(&ctd, &["images", "pull", "--hosts-dir", &hosts, "--snapshotter", "shoal", &image]);
    let listed = ctr_ok(&ctd, &["snapshots", "--snapshotter", "shoal", "ls"]);
    assert_eq!(listed.lines().filter(|l| l.contains("Committed")).count(), 3, "one committed snapshot per layer:\n{listed}");

    let printed = ctr_ok(&ctd, &["run", "--rm", "--snapshotter", "shoal", &image, "reader", "/bin/busybox", "cat", "/hello.txt"]);
    assert_eq!(printed, "hello from the top layer\n");

    // A container's writes land in its own snapshot's directory, not in the image's layers.
    ctr_ok(&ctd, &["run", "--snapshotter", "shoal", &image, "writer", "/bin/busybox", "sh", "-c", "echo written > /new.txt"]);
    let root = agent.data_dir().join("snapshotter");
    let written = files_named(&root.join("snapshots"), "new.txt");
    assert_eq!(written.len(), 1, "the written file is in one snapshot: {written:?}");
    assert_eq!(std::fs::read_to_string(&written[0]).unwrap(), "written\n");
    let again = ctr_ok(&ctd, &["run", "--rm", "--snapshotter", "shoal", &image, "fresh", "/bin/busybox", "ls", "/"]);
    assert!(!again.contains("new.txt"), "another container does not see it: {again}");

    ctr_ok(&ctd, &["containers", "rm", "writer"]);
    // containerd removes the backend's snapshot in its next garbage collection.
    let start = std::time::Instant::now();
    while written[0].exists() && start.elapsed() < std::time::Duration::from_secs(20) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!written[0].exists(), "removing the container removes its snapshot");
    ctr_ok(&ctd, &["images", "rm", "--sync", &image]);
    let left = ctr_ok(&ctd, &["snapshots", "--snapshotter", "shoal", "ls"]);
    assert_eq!(left.lines().count(), 1, "every snapshot goes with the image (header only):\n{left}");
    assert!(mounts_under(&root).is_empty() && mounts_under(ctd.dir.path()).is_empty(), "nothing stays mounted");
    let dirs: Vec<_> = std::fs::read_dir(root.join("snapshots")).unwrap().collect();
    assert!(dirs.is_empty(), "no snapshot directory is left: {dirs:?}");
}

/// Runs `shoal ARGS...`, failing with its output.
fn shoal(args: &[&str]) -> String {
    let out = std::process::Command::new(shoal_tests::shoal_bin()).args(args).stdin(std::process::Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "shoal {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shoal_image_pulled_with_shoal_pull_runs_lazily_and_reads_only_what_it_needs() {
    let registry = Registry::start(None).await.unwrap();
    registry
        .push_image("team/app", "v1", &[("/big.bin", random_bytes(8 << 20, 3)), ("/hello.txt", b"hello from a lazy image\n".to_vec())])
        .await
        .unwrap();
    let source = format!("{}/team/app:v1", registry.host());
    let image = format!("{}/team/app:v1-shoal", registry.host());
    shoal(&["build", &source, &image]);
    let (sock_dir, agent) = agent_with_snapshotter().await;
    let ctd = containerd(&registry, &agent, sock_dir.path()).await;
    let before = registry.hits().len();

    let socket = ctd.socket().display().to_string();
    shoal(&["pull", "--containerd-socket", &socket, "--mirror", &agent.mirror(), &image]);
    let printed = ctr_ok(&ctd, &["run", "--rm", "--snapshotter", "shoal", &image, "lazy", "/bin/busybox", "cat", "/hello.txt"]);
    assert_eq!(printed, "hello from a lazy image\n");

    // The registry sent the manifest, config, bootstrap and the chunks read: not the 8 MiB file.
    let sent: u64 = registry.hits()[before..].iter().filter(|h| h.method == "GET").map(|h| h.bytes).sum();
    let total: u64 = registry.image_blobs("team/app", "v1-shoal").await.unwrap().iter().map(|(_, s)| s).sum();
    assert!(sent < total / 4, "a lazy start fetched {sent} of the image's {total} bytes");

    // The container's rootfs stands on the lazy mount; removing the image stops it.
    let root = agent.data_dir().join("snapshotter");
    assert!(!mounts_under(&root.join("remote")).is_empty(), "the image is mounted lazily");
    ctr_ok(&ctd, &["images", "rm", "--sync", &image]);
    let start = std::time::Instant::now();
    while !mounts_under(&root).is_empty() && start.elapsed() < std::time::Duration::from_secs(20) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(mounts_under(&root).is_empty(), "the lazy mount goes with the image: {:?}", mounts_under(&root));
    assert!(mounts_under(ctd.dir.path()).is_empty());
}
