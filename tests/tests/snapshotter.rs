//! Shoal's containerd snapshotter, driven by a real containerd: ordinary images get overlayfs
//! snapshots, Shoal images lazy ones.

use std::path::{Path, PathBuf};

use shoal_tests::{random_bytes, Agent, Containerd, Registry};

/// A temporary directory holding the snapshotter's socket; dropping it also stops the lazy
/// mount processes the snapshotter started for the agent whose data directory is `root` (they
/// outlive the agent by design) and detaches what they left mounted there, so a failed test
/// leaves nothing behind.
struct SnapshotterDir {
    dir: tempfile::TempDir,
    root: PathBuf,
}

impl Drop for SnapshotterDir {
    fn drop(&mut self) {
        let root = self.root.display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&root) {
                // SAFETY: signalling a process this test's snapshotter started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let mut points = mounts_under(&self.root);
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = std::process::Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

/// An agent running the snapshotter on a socket in its own temporary directory.
async fn agent_with_snapshotter() -> (SnapshotterDir, Agent) {
    let dir = tempfile::Builder::new().prefix("shoal-snap-").tempdir().unwrap();
    let socket = dir.path().join("snapshotter.sock");
    let agent = Agent::start(&format!("[snapshotter]\nenabled = true\nsocket = \"{}\"\n", socket.display())).await.unwrap();
    let root = agent.data_dir();
    (SnapshotterDir { dir, root }, agent)
}

/// A containerd whose `shoal` snapshotter is the agent's.
async fn containerd(registry: &Registry, agent: &Agent, sock_dir: &SnapshotterDir) -> Containerd {
    let socket = sock_dir.dir.path().join("snapshotter.sock");
    Containerd::start_with_proxy_snapshotter(&registry.host(), &agent.mirror(), "shoal", &socket).await.unwrap()
}

fn ctr_ok(ctd: &Containerd, args: &[&str]) -> String {
    let out = ctd.ctr(args).unwrap();
    assert!(
        out.status.success(),
        "ctr {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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

/// Waits (up to 20 s: containerd removes snapshots in its next garbage collection) until nothing
/// under `dir` is mounted.
async fn wait_unmounted(dir: &Path) {
    let start = std::time::Instant::now();
    while !mounts_under(dir).is_empty() && start.elapsed() < std::time::Duration::from_secs(20) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
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
    let ctd = containerd(&registry, &agent, &sock_dir).await;
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
    eprintln!("AGENTLOG {}", agent.log());
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

/// `shoal pull IMAGE` into `ctd` through `agent`'s mirror.
fn shoal_pull(ctd: &Containerd, agent: &Agent, image: &str) {
    let socket = ctd.socket().display().to_string();
    shoal(&["pull", "--containerd-socket", &socket, "--mirror", &agent.mirror(), image]);
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
    let ctd = containerd(&registry, &agent, &sock_dir).await;
    let before = registry.hits().len();

    shoal_pull(&ctd, &agent, &image);
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
    wait_unmounted(&root).await;
    assert!(mounts_under(&root).is_empty(), "the lazy mount goes with the image: {:?}", mounts_under(&root));
    assert!(mounts_under(ctd.dir.path()).is_empty());
}

/// Pushes a busybox image with `/hello.txt` and an 8 MiB file, converts it, and returns the
/// Shoal image's reference.
async fn shoal_image(registry: &Registry, hello: &str) -> String {
    registry
        .push_image("team/app", "v1", &[("/big.bin", random_bytes(8 << 20, 3)), ("/hello.txt", hello.as_bytes().to_vec())])
        .await
        .unwrap();
    let image = format!("{}/team/app:v1-shoal", registry.host());
    // The registry speaks plain HTTP, also when it is not on loopback.
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), format!("[registry.\"{}\"]\nplain_http = true\n", registry.host())).unwrap();
    shoal(&["build", "-c", &config.path().display().to_string(), &format!("{}/team/app:v1", registry.host()), &image]);
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_lazy_container_keeps_reading_while_the_agent_and_its_snapshotter_are_killed_and_restarted() {
    let registry = Registry::start(None).await.unwrap();
    let image = shoal_image(&registry, "still here\n").await;
    let (sock_dir, mut agent) = agent_with_snapshotter().await;
    let ctd = containerd(&registry, &agent, &sock_dir).await;
    shoal_pull(&ctd, &agent, &image);
    // runc keeps container state in one place for the whole machine: the id must be unique.
    let long = format!("long-{}", std::process::id());
    let long = long.as_str();
    ctr_ok(&ctd, &["run", "-d", "--snapshotter", "shoal", &image, long, "/bin/busybox", "sleep", "600"]);

    let read = ctr_ok(&ctd, &["tasks", "exec", "--exec-id", "r0", long, "/bin/busybox", "cat", "/hello.txt"]);
    assert_eq!(read, "still here\n");
    agent.kill();
    // While the agent is down, the running container's files are still served.
    let read = ctr_ok(&ctd, &["tasks", "exec", "--exec-id", "r1", long, "/bin/busybox", "cat", "/hello.txt"]);
    assert_eq!(read, "still here\n");
    agent.restart().await.unwrap();
    let start = std::time::Instant::now();
    while !agent.log().contains("lazy mount still up") && start.elapsed() < std::time::Duration::from_secs(10) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(agent.log().contains("lazy mount still up"), "the restarted snapshotter finds the running mount:\n{}", agent.log());
    // Reading the big file needs chunks never fetched yet: they come through the restarted agent.
    let sum = ctr_ok(&ctd, &["tasks", "exec", "--exec-id", "r2", long, "/bin/busybox", "sha256sum", "/big.bin"]);
    let want = shoal_tests::digest_of(&random_bytes(8 << 20, 3)).trim_start_matches("sha256:").to_string();
    assert!(sum.starts_with(&want), "the big file reads whole after the restart: {sum}");
    // containerd redials a proxy plugin with backoff (about a second after a refusal): calls fail
    // fast as "unavailable" until then, and a kubelet retries them.
    let new = ["run", "--rm", "--snapshotter", "shoal", &image, "new", "/bin/busybox", "cat", "/hello.txt"];
    let start = std::time::Instant::now();
    let again = loop {
        let out = ctd.ctr(&new).unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(err.to_lowercase().contains("unavailable") && start.elapsed().as_secs() < 15, "ctr {new:?} failed: {err}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(again, "still here\n", "new containers start after the restart");

    ctr_ok(&ctd, &["tasks", "kill", "-s", "KILL", long]);
    let start = std::time::Instant::now();
    while ctd.ctr(&["tasks", "rm", long]).unwrap().status.code() != Some(0) && start.elapsed() < std::time::Duration::from_secs(10) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    ctr_ok(&ctd, &["containers", "rm", long]);
    ctr_ok(&ctd, &["images", "rm", "--sync", &image]);
    let root = agent.data_dir().join("snapshotter");
    wait_unmounted(&root).await;
    assert!(mounts_under(&root).is_empty() && mounts_under(ctd.dir.path()).is_empty(), "nothing stays mounted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_starts_a_shoal_image_lazily_and_runs_ordinary_images_on_the_same_snapshotter() {
    let registry = Registry::start(None).await.unwrap();
    let image = shoal_image(&registry, "hello through CRI\n").await;
    let sandbox_image = shoal_tests::cri::push_sandbox_image(&registry).await.unwrap();
    let (sock_dir, agent) = agent_with_snapshotter().await;
    let socket = sock_dir.dir.path().join("snapshotter.sock");
    let config = shoal_tests::CriConfig::new(&sandbox_image).proxy_snapshotter("shoal", &socket);
    let ctd = Containerd::start_cri(&registry.host(), &agent.mirror(), &config).await.unwrap();
    let cri = ctd.cri().await.unwrap();
    let shoal_blobs = registry.image_blobs("team/app", "v1-shoal").await.unwrap();
    let total: u64 = shoal_blobs.iter().map(|(_, s)| s).sum();

    // The sandbox is an ordinary image: unpacked by containerd into the snapshotter's directories.
    let pod = cri.run_pod("lazy").await.unwrap();
    let image_id = cri.pull_image(&image).await.unwrap();
    let pulled: u64 = shoal_blobs.iter().map(|(d, _)| registry.blob_bytes(d)).sum();
    let config_and_bootstrap: u64 = shoal_blobs[0].1 + shoal_blobs.last().unwrap().1;
    assert!(
        pulled <= config_and_bootstrap,
        "PullImage of a Shoal image fetched {pulled} bytes of its blobs: more than config and bootstrap"
    );

    let c = cri.run_container(&pod, "cat", &image_id, &["/bin/busybox", "cat", "/hello.txt"]).await.unwrap();
    assert_eq!(cri.wait_exit(&c, std::time::Duration::from_secs(30)).await.unwrap(), 0, "{}", cri.output(&c).unwrap_or_default());
    assert_eq!(cri.output(&c).unwrap(), "hello through CRI\n");
    let started: u64 = shoal_blobs.iter().map(|(d, _)| registry.blob_bytes(d)).sum();
    assert!(started < total / 4, "starting the container fetched {started} of the image's {total} bytes");
    let root = agent.data_dir().join("snapshotter");
    assert!(!mounts_under(&root.join("remote")).is_empty(), "the image is mounted lazily");

    cri.remove_container(&c).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    cri.remove_image(&image_id).await.unwrap();
    wait_unmounted(&root).await;
    assert!(mounts_under(&root).is_empty(), "the lazy mount goes with the image: {:?}", mounts_under(&root));
    assert_eq!(ctd.mounts(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shoal_image_that_cannot_be_mounted_is_downloaded_and_unpacked_instead_and_still_runs() {
    let registry = Registry::start(None).await.unwrap();
    let image = shoal_image(&registry, "unpacked, not lazy\n").await;
    // A planted bootstrap: the mount refuses it (its digest does not match).
    let blobs = registry.image_blobs("team/app", "v1-shoal").await.unwrap();
    let bootstrap = &blobs.last().unwrap().0;
    let path = registry.blob_data_path(bootstrap);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let (sock_dir, agent) = agent_with_snapshotter().await;
    let ctd = containerd(&registry, &agent, &sock_dir).await;
    let source_layers: Vec<(String, u64)> = registry.image_blobs("team/app", "v1").await.unwrap().into_iter().skip(1).collect();
    let before: Vec<u64> = source_layers.iter().map(|(d, _)| registry.blob_bytes(d)).collect();
    shoal_pull(&ctd, &agent, &image);
    let printed = ctr_ok(&ctd, &["run", "--rm", "--snapshotter", "shoal", &image, "unpacked", "/bin/busybox", "cat", "/hello.txt"]);
    assert_eq!(printed, "unpacked, not lazy\n");
    let log = agent.log();
    assert!(log.contains("cannot mount the Shoal image lazily"), "the log says why the pull was not lazy:\n{log}");
    let root = agent.data_dir().join("snapshotter");
    assert!(mounts_under(&root.join("remote")).is_empty(), "nothing is mounted lazily");
    // The layers of the image it was converted from were downloaded whole, once.
    for ((digest, size), before) in source_layers.iter().zip(before) {
        assert_eq!(registry.blob_bytes(digest) - before, *size, "layer {digest} of the source image");
    }
    ctr_ok(&ctd, &["images", "rm", "--sync", &image]);
    let dirs: Vec<_> = std::fs::read_dir(root.join("snapshots")).unwrap().collect();
    assert!(dirs.is_empty(), "the unpacked image goes with it: {dirs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_learned_from_one_nodes_container_makes_the_next_nodes_lazy_image_prefetch_it() {
    let registry = Registry::start(None).await.unwrap();
    let image = shoal_image(&registry, "learned\n").await;
    let scheduler = shoal_tests::Scheduler::start().await.unwrap();
    let node = |name: &str| {
        let dir = tempfile::Builder::new().prefix("shoal-snap-").tempdir().unwrap();
        let config = format!(
            "[peer]\nschedulers = [\"{}\"]\nhost_id = \"{name}\"\n[snapshotter]\nenabled = true\nsocket = \"{}\"\n",
            scheduler.addr(),
            dir.path().join("snapshotter.sock").display()
        );
        (dir, config)
    };

    // Node A's container reads the big file; removing the image stops its mount, which reports
    // the order its files were first read.
    let (dir_a, config_a) = node("node-a");
    let agent_a = Agent::start(&config_a).await.unwrap();
    let guard_a = SnapshotterDir { dir: dir_a, root: agent_a.data_dir() };
    let ctd_a = containerd(&registry, &agent_a, &guard_a).await;
    shoal_pull(&ctd_a, &agent_a, &image);
    ctr_ok(&ctd_a, &["run", "--rm", "--snapshotter", "shoal", &image, "reader-a", "/bin/busybox", "sha256sum", "/big.bin"]);
    ctr_ok(&ctd_a, &["images", "rm", "--sync", &image]);
    let start = std::time::Instant::now();
    while !scheduler.log().contains("trace recorded") {
        assert!(start.elapsed().as_secs() < 20, "node A's mount reported no trace:\n{}", scheduler.log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Node B starts a container that reads nothing: its mount fetches the big file by itself.
    let (dir_b, config_b) = node("node-b");
    let agent_b = Agent::start(&config_b).await.unwrap();
    let guard_b = SnapshotterDir { dir: dir_b, root: agent_b.data_dir() };
    let ctd_b = containerd(&registry, &agent_b, &guard_b).await;
    shoal_pull(&ctd_b, &agent_b, &image);
    ctr_ok(&ctd_b, &["run", "--rm", "--snapshotter", "shoal", &image, "idle-b", "/bin/busybox", "true"]);
    let remote = agent_b.data_dir().join("snapshotter/remote");
    let mount_dir = std::fs::read_dir(&remote).unwrap().next().expect("node B's image is mounted").unwrap().path();
    let start = std::time::Instant::now();
    loop {
        let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(mount_dir.join("stats.json")).unwrap()).unwrap();
        if stats["fetched_bytes"].as_u64().unwrap_or(0) >= 8 << 20 {
            break;
        }
        let log = std::fs::read_to_string(mount_dir.join("mount.log")).unwrap_or_default();
        assert!(start.elapsed().as_secs() < 30, "node B did not prefetch the big file: {stats}\n{log}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(mount_dir.join("mount.log")).unwrap();
    assert!(log.contains("prefetching by the trace the cluster learned"), "{log}");
    ctr_ok(&ctd_b, &["images", "rm", "--sync", &image]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_mount_whose_process_died_is_mounted_again_for_the_next_container() {
    let registry = Registry::start(None).await.unwrap();
    let image = shoal_image(&registry, "back again\n").await;
    let (sock_dir, agent) = agent_with_snapshotter().await;
    let ctd = containerd(&registry, &agent, &sock_dir).await;
    shoal_pull(&ctd, &agent, &image);
    let remote = agent.data_dir().join("snapshotter/remote");
    let mount_dir = std::fs::read_dir(&remote).unwrap().next().expect("the image is mounted").unwrap().path();
    let pid: i32 = std::fs::read_to_string(mount_dir.join("pid")).unwrap().trim().parse().unwrap();
    // SAFETY: killing the mount process this test's snapshotter started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    while std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z")
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let printed = ctr_ok(&ctd, &["run", "--rm", "--snapshotter", "shoal", &image, "again", "/bin/busybox", "cat", "/hello.txt"]);
    assert_eq!(printed, "back again\n");
    assert!(agent.log().contains("went away; mounting it again"), "{}", agent.log());
    ctr_ok(&ctd, &["images", "rm", "--sync", &image]);
    wait_unmounted(&agent.data_dir()).await;
    assert!(mounts_under(&agent.data_dir()).is_empty(), "{:?}", mounts_under(&agent.data_dir()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_nodes_lazy_container_reads_its_chunks_from_the_first_node_not_the_registry() {
    use shoal_tests::netns::Lab;
    use shoal_tests::{lab_p2p_config, metric_value, CriConfig, Scheduler};
    // Two nodes, each its own network namespace with containerd (CRI), agent and snapshotter;
    // the registry and the scheduler at the gateway.
    let lab = Lab::new(2).unwrap();
    let registry = Registry::start_on(lab.gateway()).await.unwrap();
    let image = shoal_image(&registry, "from a peer\n").await;
    let sandbox = shoal_tests::cri::push_sandbox_image(&registry).await.unwrap();
    let scheduler = Scheduler::start_on(lab.gateway()).await.unwrap();
    let chunk_blobs: Vec<String> = {
        let blobs = registry.image_blobs("team/app", "v1-shoal").await.unwrap();
        blobs[1..blobs.len() - 1].iter().map(|(d, _)| d.clone()).collect()
    };
    let chunk_bytes = || -> u64 { chunk_blobs.iter().map(|d| registry.blob_bytes(d)).sum() };
    let want = shoal_tests::digest_of(&random_bytes(8 << 20, 3)).trim_start_matches("sha256:").to_string();

    let mut nodes = Vec::new();
    let mut fetched = Vec::new();
    for i in 0..2 {
        let dir = tempfile::Builder::new().prefix("shoal-snap-").tempdir().unwrap();
        let socket = dir.path().join("snapshotter.sock");
        let config =
            format!("{}[snapshotter]\nenabled = true\nsocket = \"{}\"\n", lab_p2p_config(&[&scheduler], &registry), socket.display());
        let agent = Agent::start_in_net(&lab, i, "agent", &config, &[]).await.unwrap();
        let guard = SnapshotterDir { dir, root: agent.data_dir() };
        let start = std::time::Instant::now();
        while !socket.exists() {
            assert!(start.elapsed().as_secs() < 20, "the snapshotter did not bind its socket:\n{}", agent.log());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let cri_config = CriConfig::new(&sandbox).proxy_snapshotter("shoal", &socket);
        let ctd = Containerd::start_cri_in(&lab, i, &registry.host(), &agent.mirror(), &cri_config).await.unwrap();
        let cri = ctd.cri().await.unwrap();
        let pod = cri.run_pod(&format!("node-{i}")).await.unwrap();
        let image_id = cri.pull_image(&image).await.unwrap();
        let c = cri.run_container(&pod, "sum", &image_id, &["/bin/busybox", "sha256sum", "/big.bin"]).await.unwrap();
        let code = cri.wait_exit(&c, std::time::Duration::from_secs(60)).await.unwrap();
        let out = cri.output(&c).unwrap_or_default();
        assert_eq!(code, 0, "node {i}: {out}\n{}", agent.log());
        assert!(out.starts_with(&want), "node {i} read the big file wrong: {out}");
        fetched.push(chunk_bytes());
        nodes.push((guard, agent, ctd, cri, pod, c, image_id));
    }

    // The first start read the big file's chunks from the registry (ranges through its agent);
    // the second read the same chunks from the first node: the registry sent them about once.
    assert!(fetched[0] >= 8 << 20, "the first node's start fetched only {} bytes of chunks", fetched[0]);
    let again = fetched[1] - fetched[0];
    assert!(again * 20 <= fetched[0], "the second node's start cost the registry {again} more chunk bytes (the first: {})", fetched[0]);
    let received = metric_value(&nodes[1].1.metrics().await.unwrap(), "shoal_peer_bytes_received_total").unwrap_or(0.0) as u64;
    assert!(received >= 8 << 20, "the second node received {received} bytes from peers:\n{}", nodes[1].1.log());
    let sent = metric_value(&nodes[0].1.metrics().await.unwrap(), "shoal_peer_bytes_sent_total").unwrap_or(0.0) as u64;
    assert!(sent >= 8 << 20, "the first node sent {sent} bytes to peers:\n{}", nodes[0].1.log());

    for (_guard, agent, ctd, cri, pod, c, image_id) in &nodes {
        cri.remove_container(c).await.unwrap();
        cri.remove_pod(pod).await.unwrap();
        cri.remove_image(image_id).await.unwrap();
        let root = agent.data_dir().join("snapshotter");
        wait_unmounted(&root).await;
        assert!(mounts_under(&root).is_empty(), "the lazy mount goes with the image: {:?}", mounts_under(&root));
        assert_eq!(ctd.mounts(), Vec::<String>::new());
    }
}
