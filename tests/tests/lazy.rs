//! Lazy loading end to end with real parts: `shoal build` converts a multi-layer OCI image into
//! a real registry, `shoal mount` serves it (by default the kernel's EROFS over a FUSE-served
//! image file; with `--mode merged` or `fuse`, FUSE itself) through a real agent's mirror, from
//! the registry directly, or from local files, and the tests check what a reader sees, what the
//! registry sent, what the chunk cache holds, and (through the mount's counters) whether reads
//! were served by shoal or by the kernel alone (EROFS's page cache, or passthrough).

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_fuse::materialise::file_key;
use shoal_fuse::Bootstrap;
use shoal_tests::lazy::{
    cached_chunks, compare_tree, dir, drop_page_cache, file, keep_page_cache, merged_tree, shoal_build, write_layout, Compression, Entry,
    IoUringOn, LayerSpec, Meta, Mount,
};
use shoal_tests::registry::run;
use shoal_tests::{random_bytes, require, task_dir, Agent, Registry, Scheduler};

const MIB: usize = 1 << 20;

/// A fixed time for entries that do not care.
const T: i64 = 1_700_000_000;

/// Three layers (gzip, zstd, plain) exercising every rule of the merge: whiteouts of a file and
/// of a directory, an opaque directory, hard links within and across layers, a symlink, device
/// nodes, a fifo, set-uid, owners, nanosecond mtimes, xattrs, a file over three chunks and one
/// identical file in two layers.
fn layers() -> Vec<LayerSpec> {
    let base = vec![
        dir("etc", Meta::new(0o755)),
        file("etc/hostname", Meta::new(0o644).xattr("user.origin", b"layer0"), b"base\n".to_vec()),
        file("etc/passwd", Meta::new(0o644), b"root:x:0:0:root:/root:/bin/sh\n".to_vec()),
        dir("bin", Meta::new(0o755)),
        file("bin/tool", Meta::new(0o755), random_bytes(300 << 10, 1)),
        Entry::Hardlink("bin/tool-link".into(), "bin/tool".into()),
        Entry::Symlink("bin/sh".into(), Meta::new(0o777), "tool".into()),
        file("bin/su", Meta::new(0o4755), random_bytes(2000, 5)),
        dir("data", Meta::new(0o750).owner(1000, 1000).time(T + 5, 250_000_000)),
        file(
            "data/big.bin",
            Meta::new(0o640).owner(1000, 1000).time(T + 10, 123_456_789).xattr("user.kind", b"big").xattr("user.empty", b""),
            random_bytes(7 * MIB / 2, 2),
        ),
        file("data/dup-a", Meta::new(0o644), random_bytes(2 * MIB, 3)),
        dir("usr", Meta::new(0o755)),
        dir("usr/lib", Meta::new(0o755)),
        file("usr/lib/old.so", Meta::new(0o644), random_bytes(200 << 10, 4)),
        dir("opq", Meta::new(0o755)),
        file("opq/lower", Meta::new(0o644), random_bytes(10 << 10, 6)),
        dir("opq/sub", Meta::new(0o755)),
        file("opq/sub/deep", Meta::new(0o644), random_bytes(5 << 10, 7)),
        dir("dev", Meta::new(0o755)),
        Entry::CharDevice("dev/null".into(), Meta::new(0o666), 1, 3),
        Entry::CharDevice("dev/tty9".into(), Meta::new(0o620).owner(0, 5), 4, 9),
        Entry::Fifo("dev/initctl".into(), Meta::new(0o600)),
        dir("small", Meta::new(0o755)),
        file("small/one.txt", Meta::new(0o644), random_bytes(4096, 10)),
        file("small/two.txt", Meta::new(0o644), random_bytes(4096, 11)),
        dir("small/gone", Meta::new(0o755)),
        file("small/gone/file", Meta::new(0o644), b"bye\n".to_vec()),
    ];
    let update = vec![
        Entry::Whiteout("usr/lib/old.so".into()),
        dir("opq", Meta::new(0o700).time(T + 20, 0)),
        Entry::Opaque("opq".into()),
        file("opq/upper", Meta::new(0o644), b"upper\n".to_vec()),
        file("data/dup-b", Meta::new(0o600).owner(1000, 1000), random_bytes(2 * MIB, 3)),
        file("etc/hostname", Meta::new(0o644).xattr("user.origin", b"layer1").xattr("user.z", b"last"), b"shoal-lazy\n".to_vec()),
        dir("etc", Meta::new(0o755).time(T + 30, 0)),
        Entry::Hardlink("bin/tool-link2".into(), "bin/tool".into()),
    ];
    let top = vec![
        Entry::Whiteout("small/gone".into()),
        file("data/notes.txt", Meta::new(0o644), b"notes\n".to_vec()),
        file("small/three.txt", Meta::new(0o644), random_bytes(4096, 12)),
        Entry::Symlink("etc/localtime".into(), Meta::new(0o777), "/usr/share/zoneinfo/UTC".into()),
    ];
    vec![
        LayerSpec { entries: base, compression: Compression::Gzip },
        LayerSpec { entries: update, compression: Compression::Zstd },
        LayerSpec { entries: top, compression: Compression::None },
    ]
}

/// The content of `path` in the merged image.
fn content(path: &str) -> Vec<u8> {
    match &merged_tree(&layers())[path].kind {
        shoal_tests::lazy::Kind::File(data) => data.clone(),
        other => panic!("{path} is {other:?}, not a file"),
    }
}

/// A registry, the source image as an OCI layout (`oci:<dir>:v1`), and a scratch directory.
struct Setup {
    registry: Registry,
    layout: PathBuf,
    work: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        require("docker-registry");
        require("fusermount3");
        let registry = Registry::start(None).await.unwrap();
        let work = tempfile::Builder::new().prefix("shoal-lazy-").tempdir().unwrap();
        let layout = work.path().join("layout");
        write_layout(&layout, "v1", &layers()).unwrap();
        Setup { registry, layout, work }
    }

    fn source(&self) -> String {
        format!("oci:{}:v1", self.layout.display())
    }

    fn image(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.registry.host())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// Builds the source image into local files (`out/`: bootstrap and blobs) and returns their directory.
    fn build_local(&self) -> PathBuf {
        let out = self.path("out");
        shoal_build(&[self.source(), s("--output-dir"), path_arg(&out)]).unwrap();
        out
    }

    /// Copies the source image into the registry as `repo_tag`.
    fn push_source(&self, repo_tag: &str) {
        require("skopeo");
        let mut copy = Command::new("skopeo");
        copy.args(["copy", "-q", "--dest-tls-verify=false"]).arg(self.source()).arg(format!("docker://{}", self.image(repo_tag)));
        run(&mut copy).unwrap();
    }

    /// `shoal mount` of `repo_tag` from the registry, through `agent`'s mirror.
    async fn mount_through(&self, agent: &Agent, repo_tag: &str, cache: &Path) -> Mount {
        Mount::start(&[self.image(repo_tag), s("--mirror"), agent.mirror(), s("--cache-dir"), path_arg(cache)]).await.unwrap()
    }

    /// Chunk blobs of a pushed Shoal image: every layer but the last (the bootstrap).
    async fn chunk_blobs(&self, repo: &str, tag: &str) -> Vec<(String, u64)> {
        let blobs = self.registry.image_blobs(repo, tag).await.unwrap();
        let layers = &blobs[1..];
        layers[..layers.len() - 1].to_vec()
    }
}

/// Fails unless the tree mounted at `root` is exactly the merged `layers`.
fn assert_mounted_as(root: &Path, layers: &[LayerSpec]) {
    let diffs = compare_tree(root, &merged_tree(layers));
    assert!(diffs.is_empty(), "the mounted image differs from its layers:\n{}", diffs.join("\n"));
}

fn s(text: impl AsRef<str>) -> String {
    text.as_ref().to_string()
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_from_a_registry_mounts_through_the_mirror_exactly_as_its_merged_layers() {
    let setup = Setup::new().await;
    setup.push_source("lazy/app:v1");

    // No target: it goes to the source repository as <tag>-shoal.
    let pushed = shoal_build(&[setup.image("lazy/app:v1")]).unwrap();
    assert!(pushed.starts_with(&format!("{}@sha256:", setup.image("lazy/app:v1-shoal"))), "{pushed}");
    // The same image from the local layout converts to the same chunk blobs and bootstrap.
    shoal_build(&[setup.source(), setup.image("lazy/app:from-layout")]).unwrap();
    let from_registry = setup.registry.image_blobs("lazy/app", "v1-shoal").await.unwrap();
    let from_layout = setup.registry.image_blobs("lazy/app", "from-layout").await.unwrap();
    assert_eq!(from_registry[1..], from_layout[1..], "conversion is deterministic");

    let agent = Agent::start("").await.unwrap();
    let cache = setup.path("cache");
    let mut mount = setup.mount_through(&agent, "lazy/app:v1-shoal", &cache).await;
    assert!(mount.log().contains("through the mirror"), "{}", mount.log());
    assert_mounted_as(&mount.mountpoint, &layers());
    // The chunks came from the registry through the agent as ranges, and the agent kept the
    // pieces they covered (each chunk is checked against its blake3 by the mount).
    let chunk_blobs = setup.chunk_blobs("lazy/app", "v1-shoal").await;
    let fetched: Vec<u64> = chunk_blobs.iter().map(|(digest, _)| setup.registry.blob_bytes(digest)).collect();
    for (digest, _) in &chunk_blobs {
        assert!(setup.registry.blob_bytes(digest) > 0, "chunk blob {digest} was never fetched");
        let task = agent.data_dir().join("tasks").join(task_dir(digest));
        assert!(task.exists(), "the pieces read of chunk blob {digest} were not kept ({})", task.display());
    }
    let metrics = agent.metrics().await.unwrap();
    let ranges = metrics.lines().find(|l| l.starts_with("shoal_mirror_requests_total{kind=\"blob\",status=\"206\"}"));
    let ranges: f64 = ranges.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0);
    assert!(ranges >= chunk_blobs.len() as f64, "{ranges} range requests through the agent:\n{metrics}");
    let status = mount.stop().await.unwrap();
    assert!(status.success(), "shoal mount exited with {status}:\n{}", mount.log());

    // A second mount with an empty chunk cache reads the whole image again: from the agent's
    // store, not the registry.
    let mut again = setup.mount_through(&agent, "lazy/app:v1-shoal", &setup.path("cache-2")).await;
    assert_mounted_as(&again.mountpoint, &layers());
    let refetched: Vec<u64> = chunk_blobs.iter().map(|(digest, _)| setup.registry.blob_bytes(digest)).collect();
    assert_eq!(refetched, fetched, "the second mount's chunks came from the registry again");
    let status = again.stop().await.unwrap();
    assert!(status.success(), "shoal mount exited with {status}:\n{}", again.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_bootstrap_and_blobs_mount_as_the_merged_layers_with_identical_files_stored_once() {
    let setup = Setup::new().await;
    let out = setup.path("out");
    shoal_build(&[setup.source(), setup.image("lazy/local:v1"), s("--output-dir"), path_arg(&out)]).unwrap();

    // dup-a (layer 0) and dup-b (layer 1) are the same 2 MiB: one set of chunks, stored once.
    let bootstrap = Bootstrap::decode(&std::fs::read(out.join("bootstrap")).unwrap()).unwrap();
    let chunks = |path: &str| -> Vec<[u8; 32]> {
        let ino = bootstrap.resolve(path.as_bytes()).unwrap();
        bootstrap.chunks_of(ino).unwrap().map(|c| c.chunk.digest).collect()
    };
    assert_eq!(chunks("data/dup-a").len(), 2);
    assert_eq!(chunks("data/dup-a"), chunks("data/dup-b"));
    let mut seen = HashSet::new();
    let (mut unique, mut all) = (0u64, 0u64);
    for layer in layers() {
        for entry in layer.entries {
            if let Entry::File(_, _, data) = entry {
                all += data.len() as u64;
                if seen.insert(blake3::hash(&data)) {
                    unique += data.len() as u64;
                }
            }
        }
    }
    let pushed: u64 = setup.chunk_blobs("lazy/local", "v1").await.iter().map(|(_, size)| size).sum();
    assert!(pushed <= unique + (64 << 10), "chunk blobs hold {pushed} bytes for {unique} bytes of distinct file data");
    assert!(pushed + MIB as u64 <= all, "chunk blobs hold {pushed} bytes: the duplicate was stored again ({all} with it)");

    let mut mount = Mount::start(&[
        s("--bootstrap"),
        path_arg(&out.join("bootstrap")),
        s("--blobs"),
        path_arg(&out.join("blobs")),
        s("--cache-dir"),
        path_arg(&setup.path("cache")),
    ])
    .await
    .unwrap();
    assert_mounted_as(&mount.mountpoint, &layers());
    let status = mount.stop().await.unwrap();
    assert!(status.success(), "shoal mount exited with {status}:\n{}", mount.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_one_small_file_of_a_fresh_mount_fetches_a_few_chunks_not_the_image() {
    let setup = Setup::new().await;
    shoal_build(&[setup.source(), setup.image("lazy/app:v1-shoal")]).unwrap();
    let chunk_blobs = setup.chunk_blobs("lazy/app", "v1-shoal").await;
    let total: u64 = chunk_blobs.iter().map(|(_, size)| size).sum();
    assert!(total > 6 * MIB as u64, "the image's chunk blobs hold only {total} bytes");
    let fetched = || chunk_blobs.iter().map(|(digest, _)| setup.registry.blob_bytes(digest)).sum::<u64>();

    let agent = Agent::start("").await.unwrap();
    let mut mount = setup.mount_through(&agent, "lazy/app:v1-shoal", &setup.path("cache")).await;
    assert_eq!(fetched(), 0, "mounting fetches the bootstrap, no chunk");
    // Metadata is served from the bootstrap: listing and stat fetch nothing either.
    assert_eq!(std::fs::read_dir(mount.path("data")).unwrap().count(), 4);
    assert_eq!(std::fs::metadata(mount.path("data/big.bin")).unwrap().len(), 7 * MIB as u64 / 2);
    assert_eq!(fetched(), 0);

    assert_eq!(std::fs::read(mount.path("small/one.txt")).unwrap(), content("small/one.txt"));
    let sent = fetched();
    // Its chunk, and the small chunks after it in the blob (at most 256 KiB in one request).
    assert!(sent > 0, "the file's chunk came from the registry");
    assert!(sent <= MIB as u64 && sent * 8 < total, "reading one 4 KiB file made the registry send {sent} of {total} bytes");
    let status = mount.stop().await.unwrap();
    assert!(status.success(), "shoal mount exited with {status}:\n{}", mount.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_in_the_registry_is_eio_for_reads_needing_it_and_the_rest_reads_correctly() {
    let setup = Setup::new().await;
    let out = setup.path("out");
    shoal_build(&[setup.source(), setup.image("lazy/bad:v1"), s("--output-dir"), path_arg(&out)]).unwrap();
    // Damage the second chunk of data/big.bin where the registry keeps it.
    let bootstrap = Bootstrap::decode(&std::fs::read(out.join("bootstrap")).unwrap()).unwrap();
    let ino = bootstrap.resolve(b"data/big.bin").unwrap();
    let bad = *bootstrap.chunks_of(ino).unwrap().nth(1).unwrap().chunk;
    let blob = bootstrap.blobs()[bad.blob as usize].digest();
    let stored = setup.registry.blob_data_path(&blob);
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[(bad.compressed_offset + u64::from(bad.compressed_len) / 2) as usize] ^= 0xff;
    std::fs::write(&stored, bytes).unwrap();

    // As the kernel's EROFS serves it (the default as root), and as one FUSE mount, which also
    // materialises files.
    for mode in ["erofs", "fuse"] {
        let cache = setup.path(&format!("cache-{mode}"));
        let args = [setup.image("lazy/bad:v1"), s("--direct"), s("--cache-dir"), path_arg(&cache), s("--mode"), s(mode)];
        let mut mount = Mount::start(&args).await.unwrap();
        let big = content("data/big.bin");
        let file = std::fs::File::open(mount.path("data/big.bin")).unwrap();
        let read_at = |offset: usize, len: usize| {
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, offset as u64).map(|()| buf)
        };
        assert_eq!(read_at(0, 4096).unwrap(), big[..4096], "{mode}: the first chunk is intact");
        assert_eq!(read_at(2 * MIB + 100, 4096).unwrap(), big[2 * MIB + 100..2 * MIB + 4196], "{mode}: the third chunk is intact");
        let err = read_at(MIB + 100, 100).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{mode}: {err}");
        let err = std::fs::read(mount.path("data/big.bin")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{mode}: {err}");
        assert_eq!(std::fs::read(mount.path("small/one.txt")).unwrap(), content("small/one.txt"));
        assert_eq!(std::fs::read(mount.path("data/dup-a")).unwrap(), content("data/dup-a"));
        assert!(!cached_chunks(&cache).contains(&hex::encode(bad.digest)), "{mode}: the corrupt chunk must never be cached");
        assert!(mount.log().contains("failed verification"), "{}", mount.log());
        drop(file);
        if mode == "fuse" {
            check_materialised_around_a_corrupt_chunk(&mut mount, &bootstrap, &cache).await;
        }
        let err = std::fs::read(mount.path("data/big.bin")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{mode}, read again: {err}");
        let status = mount.stop().await.unwrap();
        assert!(status.success(), "shoal mount exited with {status}:\n{}", mount.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_read_through_the_agent_heals_once_the_registry_is_repaired() {
    let setup = Setup::new().await;
    let out = setup.path("out");
    shoal_build(&[setup.source(), setup.image("lazy/heal:v1"), s("--output-dir"), path_arg(&out)]).unwrap();
    let bootstrap = Bootstrap::decode(&std::fs::read(out.join("bootstrap")).unwrap()).unwrap();
    let ino = bootstrap.resolve(b"data/big.bin").unwrap();
    let bad = *bootstrap.chunks_of(ino).unwrap().nth(1).unwrap().chunk;
    let blob = bootstrap.blobs()[bad.blob as usize].digest();
    let stored = setup.registry.blob_data_path(&blob);
    let good = std::fs::read(&stored).unwrap();
    let mut damaged = good.clone();
    damaged[(bad.compressed_offset + u64::from(bad.compressed_len) / 2) as usize] ^= 0xff;
    std::fs::write(&stored, &damaged).unwrap();

    let agent = Agent::start("").await.unwrap();
    let mut mount = setup.mount_through(&agent, "lazy/heal:v1", &setup.path("cache")).await;
    let big = content("data/big.bin");
    let err = std::fs::read(mount.path("data/big.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    // The registry is repaired: the same mount, through the same agent, reads the true bytes.
    std::fs::write(&stored, &good).unwrap();
    let healed = std::fs::read(mount.path("data/big.bin"));
    assert!(healed.as_ref().is_ok_and(|b| *b == big), "still {:?} after the registry was repaired:\n{}", healed.err(), agent.log());
    // The agent kept the pieces the mount read; the corrupt chunk's were forgotten when the mount
    // asked for them again with no-cache, else the repair could not have reached the mount.
    let forgotten = shoal_tests::metric_value(&agent.metrics().await.unwrap(), "shoal_pieces_forgotten_total").unwrap_or(0.0);
    assert!(forgotten >= 1.0, "no stored piece was forgotten:\n{}", agent.log());
    let status = mount.stop().await.unwrap();
    assert!(status.success(), "shoal mount exited with {status}:\n{}", mount.log());
}

/// A file of several chunks read whole is materialised; a file of one chunk is served from
/// that chunk, never copied; the file with a bad chunk never is, and stays EIO.
async fn check_materialised_around_a_corrupt_chunk(mount: &mut Mount, bootstrap: &Bootstrap, cache: &Path) {
    mount.wait_stats("a file materialised", |s| s["materialised_files"].as_u64() >= Some(1)).await.unwrap();
    let materialised = |path: &str| {
        let ino = bootstrap.resolve(path.as_bytes()).unwrap();
        cache.join("files").join(hex::encode(file_key(bootstrap, ino).unwrap()))
    };
    assert!(materialised("data/dup-a").exists());
    assert!(!materialised("small/one.txt").exists(), "a file of one chunk is not copied");
    assert!(!materialised("data/big.bin").exists(), "a file with a corrupt chunk must never be materialised");
    let err = std::fs::read(mount.path("data/big.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(std::fs::read(mount.path("small/one.txt")).unwrap(), content("small/one.txt"));
    assert_eq!(std::fs::read(mount.path("data/dup-a")).unwrap(), content("data/dup-a"));
    let stats =
        mount.wait_stats("every open released", |s| s["releases"].as_u64() >= s["plain_opens"].as_u64().map(|p| p + 1)).await.unwrap();
    assert_eq!(stats["passthrough_opens"], 1, "only the second read of data/dup-a is passthrough: {stats}");
    assert!(!materialised("data/big.bin").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_trace_as_the_prefetch_list_makes_those_chunks_local_without_reads() {
    let setup = Setup::new().await;
    shoal_build(&[setup.source(), setup.image("lazy/app:v1-shoal")]).unwrap();
    let trace = setup.path("trace.txt");
    let mut first = Mount::start(&[
        setup.image("lazy/app:v1-shoal"),
        s("--direct"),
        s("--trace"),
        path_arg(&trace),
        s("--cache-dir"),
        path_arg(&setup.path("c1")),
    ])
    .await
    .unwrap();
    assert_eq!(std::fs::read(first.path("etc/hostname")).unwrap(), b"shoal-lazy\n");
    assert_eq!(std::fs::read(first.path("data/big.bin")).unwrap(), content("data/big.bin"));
    assert_eq!(std::fs::read(first.path("etc/hostname")).unwrap(), b"shoal-lazy\n");
    assert!(first.stop().await.unwrap().success());
    assert_eq!(std::fs::read_to_string(&trace).unwrap(), "/etc/hostname\n/data/big.bin\n");

    shoal_build(&[setup.source(), setup.image("lazy/app:v1-prefetch"), s("--prefetch"), path_arg(&trace)]).unwrap();
    let cache = setup.path("c2");
    let mut second = Mount::start(&[setup.image("lazy/app:v1-prefetch"), s("--direct"), s("--cache-dir"), path_arg(&cache)]).await.unwrap();
    // Nothing reads the mount: the listed files' chunks arrive by themselves.
    let chunk_names = |path: &str| -> Vec<String> { content(path).chunks(MIB).map(|c| blake3::hash(c).to_hex().to_string()).collect() };
    let wanted: Vec<String> = chunk_names("etc/hostname").into_iter().chain(chunk_names("data/big.bin")).collect();
    assert_eq!(wanted.len(), 5);
    let start = Instant::now();
    while !wanted.iter().all(|name| cached_chunks(&cache).contains(name)) {
        assert!(start.elapsed() < Duration::from_secs(30), "prefetch did not fetch {wanted:?}:\n{}", second.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for unlisted in ["data/dup-a", "bin/tool", "small/one.txt"] {
        for name in chunk_names(unlisted) {
            assert!(!cached_chunks(&cache).contains(&name), "{unlisted} is not in the prefetch list but its chunk {name} was fetched");
        }
    }
    let status = second.stop().await.unwrap();
    assert!(status.success(), "shoal mount exited with {status}:\n{}", second.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_learned_on_one_host_makes_another_hosts_mount_prefetch_those_files_without_reads() {
    let setup = Setup::new().await;
    let scheduler = Scheduler::start().await.unwrap();
    let image = setup.image("lazy/app:v1-shoal");
    shoal_build(&[setup.source(), image.clone()]).unwrap();
    let addr = scheduler.addr();
    let mount_args =
        |cache: &str| vec![image.clone(), s("--direct"), s("--scheduler"), addr.clone(), s("--cache-dir"), path_arg(&setup.path(cache))];

    // Node A runs the image: two files read, then unmounted (its trace goes to the scheduler).
    let mut first = Mount::start_with_env(&mount_args("a"), &[("SHOAL_PEER__HOST_ID", "node-a")]).await.unwrap();
    // The mount asks the scheduler in the background, once mounted.
    let start = Instant::now();
    while !first.log().contains("no host has reported a trace") {
        assert!(start.elapsed() < Duration::from_secs(10), "the mount did not ask the scheduler:\n{}", first.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read(first.path("etc/hostname")).unwrap(), b"shoal-lazy\n");
    assert_eq!(std::fs::read(first.path("data/big.bin")).unwrap(), content("data/big.bin"));
    assert!(first.stop().await.unwrap().success(), "{}", first.log());
    assert!(scheduler.log().contains("trace recorded"), "{}", scheduler.log());

    // Node B mounts the same image, which has no prefetch list, and reads nothing: the files
    // node A read arrive by themselves, and nothing else.
    let cache = setup.path("b");
    let mut second = Mount::start_with_env(&mount_args("b"), &[("SHOAL_PEER__HOST_ID", "node-b")]).await.unwrap();
    let chunk_names = |path: &str| -> Vec<String> { content(path).chunks(MIB).map(|c| blake3::hash(c).to_hex().to_string()).collect() };
    let wanted: Vec<String> = chunk_names("etc/hostname").into_iter().chain(chunk_names("data/big.bin")).collect();
    let start = Instant::now();
    while !wanted.iter().all(|name| cached_chunks(&cache).contains(name)) {
        assert!(start.elapsed() < Duration::from_secs(30), "the learned trace did not prefetch {wanted:?}:\n{}", second.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(second.log().contains("prefetching by the trace the cluster learned"), "{}", second.log());
    for unread in ["data/dup-a", "bin/tool", "small/one.txt"] {
        for name in chunk_names(unread) {
            assert!(!cached_chunks(&cache).contains(&name), "{unread} was never read on node A but its chunk {name} was fetched");
        }
    }
    assert_eq!(second.counter("reads"), 0, "nothing read the mount: {}", second.stats());
    assert!(second.stop().await.unwrap().success(), "{}", second.log());

    // With the scheduler gone a mount still works; it only learns nothing.
    drop(scheduler);
    let mut third = Mount::start_with_env(&mount_args("c"), &[("SHOAL_PEER__HOST_ID", "node-c")]).await.unwrap();
    assert_eq!(std::fs::read(third.path("small/one.txt")).unwrap(), content("small/one.txt"));
    let start = Instant::now();
    while !third.log().contains("no cluster-learned prefetch") {
        assert!(start.elapsed() < Duration::from_secs(10), "no word of the missing scheduler:\n{}", third.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = third.stop().await.unwrap();
    assert!(status.success(), "shoal mount exited with {status}:\n{}", third.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_dictionary_image_lends_its_chunks_to_a_new_build_in_another_repository() {
    let setup = Setup::new().await;
    shoal_build(&[setup.source(), setup.image("lazy/app:v1-shoal")]).unwrap();
    let v1_blobs = setup.chunk_blobs("lazy/app", "v1-shoal").await;

    // Version 2: the same base layer and one new file.
    let mut v2 = vec![layers().remove(0)];
    v2.push(LayerSpec { entries: vec![file("data/new.bin", Meta::new(0o644), random_bytes(MIB, 50))], compression: Compression::Gzip });
    let layout = setup.path("layout-v2");
    write_layout(&layout, "v2", &v2).unwrap();
    let source = format!("oci:{}:v2", layout.display());
    shoal_build(&[source, setup.image("lazy/other:v2"), s("--chunk-dict"), setup.image("lazy/app:v1-shoal")]).unwrap();

    let v2_blobs = setup.chunk_blobs("lazy/other", "v2").await;
    let reused: Vec<_> = v2_blobs.iter().filter(|blob| v1_blobs.contains(blob)).collect();
    assert!(!reused.is_empty(), "v2 ({v2_blobs:?}) reuses none of v1's chunk blobs ({v1_blobs:?})");
    // New blobs hold the new file and the base layer's files v1 deleted (their chunks are not in
    // v1's bootstrap), not the base layer again.
    let new: u64 = v2_blobs.iter().filter(|blob| !v1_blobs.contains(blob)).map(|(_, size)| size).sum();
    assert!(new < 3 * MIB as u64 / 2, "v2 stored {new} bytes of new chunk blobs");

    let mut mount =
        Mount::start(&[setup.image("lazy/other:v2"), s("--direct"), s("--cache-dir"), path_arg(&setup.path("cache"))]).await.unwrap();
    assert_mounted_as(&mount.mountpoint, &v2);
    assert!(mount.stop().await.unwrap().success());
}

/// `shoal mount --bootstrap --blobs` arguments for the image built into `out`, with `cache`.
fn local_mount_args(out: &Path, cache: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        s("--bootstrap"),
        path_arg(&out.join("bootstrap")),
        s("--blobs"),
        path_arg(&out.join("blobs")),
        s("--cache-dir"),
        path_arg(cache),
    ];
    args.extend(extra.iter().map(s));
    args
}

/// Counter `name` of `stats`.
fn n(stats: &serde_json::Value, name: &str) -> u64 {
    stats[name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {stats}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_read_once_is_materialised_and_later_opens_are_read_by_the_kernel_without_shoal() {
    let setup = Setup::new().await;
    let out = setup.build_local();
    let bootstrap = Bootstrap::decode(&std::fs::read(out.join("bootstrap")).unwrap()).unwrap();
    let key = file_key(&bootstrap, bootstrap.resolve(b"data/big.bin").unwrap()).unwrap();
    let cache = setup.path("cache");
    let materialised = cache.join("files").join(hex::encode(key));
    let big = content("data/big.bin");

    let mut mount = Mount::start(&local_mount_args(&out, &cache, &["--mode", "fuse"])).await.unwrap();
    assert_eq!(std::fs::read(mount.path("data/big.bin")).unwrap(), big);
    let first = mount
        .wait_stats("the file materialised after its first read", |s| {
            s["materialised_files"].as_u64() >= Some(1) && s["releases"].as_u64() >= Some(1)
        })
        .await
        .unwrap();
    assert_eq!(first["passthrough"], "on", "{first}");
    assert_eq!(n(&first, "passthrough_opens"), 0, "the first open has no local copy yet: {first}");
    assert!(n(&first, "reads") > 0 && n(&first, "read_bytes") >= big.len() as u64, "the first read went through shoal: {first}");
    assert_eq!(std::fs::read(&materialised).unwrap(), big, "the materialised file is the file");

    // Nothing of the file left in the page cache: without passthrough these reads would reach shoal.
    drop_page_cache().unwrap();
    assert_eq!(std::fs::read(mount.path("data/big.bin")).unwrap(), big);
    let file = std::fs::File::open(mount.path("data/big.bin")).unwrap();
    for (offset, len) in [(0, 10), (MIB - 5, 10), (3 * MIB + 7, 4096), (big.len() - 3, 3)] {
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset as u64).unwrap();
        assert_eq!(buf, big[offset..offset + len], "{len} bytes at {offset}");
    }
    drop(file);
    let later = mount.wait_stats("both opens released", |s| s["releases"].as_u64() >= Some(n(&first, "releases") + 2)).await.unwrap();
    assert_eq!(n(&later, "passthrough_opens"), 2, "both later opens are passthrough: {later}");
    assert_eq!(n(&later, "reads"), n(&first, "reads"), "passthrough reads never reach shoal: {later}");
    assert_eq!(n(&later, "read_bytes"), n(&first, "read_bytes"));
    // The counter is live: a file without a local copy is still read through shoal.
    assert_eq!(std::fs::read(mount.path("small/one.txt")).unwrap(), content("small/one.txt"));
    mount.wait_stats("a plain read counted", |s| s["reads"].as_u64() > Some(n(&first, "reads"))).await.unwrap();
    assert!(mount.stop().await.unwrap().success(), "{}", mount.log());

    // A fresh mount over the same cache opens the materialised file from the start.
    let mut again = Mount::start(&local_mount_args(&out, &cache, &["--mode", "fuse"])).await.unwrap();
    assert_eq!(std::fs::read(again.path("data/big.bin")).unwrap(), big);
    let stats = again.wait_stats("the open released", |s| s["releases"].as_u64() >= Some(1)).await.unwrap();
    assert_eq!((n(&stats, "passthrough_opens"), n(&stats, "reads"), n(&stats, "fetched_chunks")), (1, 0, 0), "{stats}");
    assert!(again.stop().await.unwrap().success(), "{}", again.log());
}

/// The lines of /proc/self/mounts whose mount point is `path`: (source, type, options).
fn mount_entries(path: &Path) -> Vec<(String, String, String)> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let want = path.to_string_lossy();
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(1) == Some(&want.as_ref())).then(|| (fields[0].to_string(), fields[2].to_string(), fields[3].to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_kernels_erofs_serves_the_image_and_warm_reads_never_reach_shoal() {
    let setup = Setup::new().await;
    let out = setup.build_local();
    let mut mount = Mount::start(&local_mount_args(&out, &setup.path("cache"), &[])).await.unwrap();
    // EROFS at the mount point, over an image file that a FUSE mount serves.
    let entries = mount_entries(&mount.mountpoint);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].1, "erofs", "{entries:?}");
    let image_file = PathBuf::from(&entries[0].0);
    let fuse_dir = image_file.parent().unwrap().to_path_buf();
    assert_eq!(mount_entries(&fuse_dir).first().map(|e| e.1.clone()), Some("fuse".into()), "{image_file:?} is on a FUSE mount");
    let stats = mount.wait_stats("the first counters", |s| s["mode"].is_string()).await.unwrap();
    assert_eq!((stats["mode"].as_str(), n(&stats, "mounts")), (Some("erofs"), 1), "{stats}");
    assert_eq!(stats["lower_dirs"], serde_json::json!([mount.mountpoint.display().to_string()]), "{stats}");

    // The whole tree, cold: file data came through shoal. Other tests must not empty the page
    // cache until the warm pass is counted.
    let kept = keep_page_cache();
    assert_mounted_as(&mount.mountpoint, &layers());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let cold = mount.stats();
    assert!(n(&cold, "reads") > 0 && n(&cold, "metadata_reads") > 0 && n(&cold, "fetched_chunks") > 0, "{cold}");
    // Again, warm: every lookup, listing, open, xattr and read is the kernel's alone.
    assert_mounted_as(&mount.mountpoint, &layers());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let warm = mount.stats();
    for counter in ["reads", "metadata_reads", "read_bytes", "plain_opens", "opens_left_to_kernel", "fetched_chunks"] {
        assert_eq!(n(&warm, counter), n(&cold, counter), "{counter}: {warm}");
    }
    drop(kept);
    // Large files read whole were made whole in the cache; out of the page cache, such a file
    // is read through shoal again, from that copy, and nothing is fetched.
    let materialised = mount.wait_stats("large files materialised", |s| n(s, "materialised_files") >= 2).await.unwrap();
    drop_page_cache().unwrap();
    assert_eq!(std::fs::read(mount.path("data/big.bin")).unwrap(), content("data/big.bin"));
    let later = mount.wait_stats("the file read again", |s| n(s, "reads") > n(&cold, "reads")).await.unwrap();
    assert_eq!(n(&later, "fetched_chunks"), n(&cold, "fetched_chunks"), "{later}");
    assert_eq!(n(&later, "materialised_files"), n(&materialised, "materialised_files"), "{later}");

    assert!(mount.stop().await.unwrap().success(), "{}", mount.log());
    assert!(mount_entries(&mount.mountpoint).is_empty(), "EROFS unmounted");
    assert!(mount_entries(&fuse_dir).is_empty() && !fuse_dir.exists(), "{fuse_dir:?} unmounted and removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_small_files_open_without_asking_shoal_and_large_files_by_passthrough_in_one_tree() {
    let setup = Setup::new().await;
    let out = setup.build_local();
    let mut mount = Mount::start(&local_mount_args(&out, &setup.path("cache"), &["--mode", "merged"])).await.unwrap();
    // An overlayfs over two FUSE mounts: small files and directories on top, large files below.
    let entries = mount_entries(&mount.mountpoint);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].1, "overlay", "{entries:?}");
    let stats = mount.wait_stats("the first counters", |s| s["mounts"].as_u64().is_some()).await.unwrap();
    assert_eq!(n(&stats, "mounts"), 2, "{stats}");
    let lowers: Vec<PathBuf> = stats["lower_dirs"].as_array().unwrap().iter().map(|d| PathBuf::from(d.as_str().unwrap())).collect();
    assert_eq!(lowers.len(), 2, "{stats}");
    for lower in &lowers {
        assert_eq!(mount_entries(lower).first().map(|e| e.1.as_str()), Some("fuse"), "{lower:?} is a FUSE mount");
        assert!(entries[0].2.contains(&lower.display().to_string()), "the overlayfs stacks on {lower:?}: {entries:?}");
    }
    assert!(lowers[0].join("small/one.txt").exists() && !lowers[0].join("data/big.bin").exists(), "small files on top");
    assert!(lowers[1].join("data/big.bin").exists() && !lowers[1].join("small/one.txt").exists(), "large files below");
    assert!(lowers[0].join("data").is_dir() && lowers[1].join("data").is_dir(), "directories leading to large files in both");
    assert!(!lowers[1].join("small").exists(), "no other directory below: overlayfs need not merge it");
    assert_mounted_as(&mount.mountpoint, &layers());

    // Every small file was opened above; only the first open reached shoal (ENOSYS), the rest
    // the kernel opened alone. Every large file open reached shoal, and was released.
    let stats = mount
        .wait_stats("every large file released", |s| {
            n(s, "releases") == n(s, "plain_opens") + n(s, "passthrough_opens") && n(s, "releases") >= 3
        })
        .await
        .unwrap();
    assert_eq!(n(&stats, "opens_left_to_kernel"), 1, "{stats}");
    // A large file read whole is materialised, and its next open is passthrough.
    let big = content("data/dup-a");
    mount.wait_stats("a file materialised", |s| s["materialised_files"].as_u64() >= Some(1)).await.unwrap();
    assert_eq!(std::fs::read(mount.path("data/dup-a")).unwrap(), big);
    let later = mount.wait_stats("a passthrough open", |s| s["passthrough_opens"].as_u64() >= Some(1)).await.unwrap();
    assert_eq!(later["passthrough"], "on", "{later}");
    for name in ["small/one.txt", "small/two.txt", "etc/hostname"] {
        assert_eq!(std::fs::read(mount.path(name)).unwrap(), content(name));
    }
    let last = mount.stats();
    assert_eq!(n(&last, "opens_left_to_kernel"), 1, "small files never reach shoal again: {last}");

    assert!(mount.stop().await.unwrap().success(), "{}", mount.log());
    for lower in &lowers {
        assert!(mount_entries(lower).is_empty(), "{lower:?} unmounted");
        assert!(!lower.exists(), "{lower:?} removed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_an_image_without_large_files_is_one_mount_whose_files_the_kernel_opens_without_asking() {
    let setup = Setup::new().await;
    let small = vec![LayerSpec {
        entries: vec![
            dir("etc", Meta::new(0o755)),
            file("etc/a", Meta::new(0o644), random_bytes(5000, 20)),
            file("etc/b", Meta::new(0o600).owner(7, 7), random_bytes(900 << 10, 21)),
            Entry::Symlink("etc/c".into(), Meta::new(0o777), "a".into()),
        ],
        compression: Compression::Gzip,
    }];
    let layout = setup.path("small-layout");
    write_layout(&layout, "v1", &small).unwrap();
    let out = setup.path("small-out");
    shoal_build(&[format!("oci:{}:v1", layout.display()), s("--output-dir"), path_arg(&out)]).unwrap();
    let mut mount = Mount::start(&local_mount_args(&out, &setup.path("cache"), &["--mode", "merged"])).await.unwrap();
    assert_eq!(mount_entries(&mount.mountpoint).first().map(|e| e.1.clone()), Some("fuse".into()), "one FUSE mount, no overlayfs");
    assert_mounted_as(&mount.mountpoint, &small);
    // Read twice over: only the very first open reached shoal.
    assert_mounted_as(&mount.mountpoint, &small);
    let stats = mount.wait_stats("the files read", |s| n(s, "read_bytes") >= 5000 + (900 << 10)).await.unwrap();
    assert_eq!((n(&stats, "mounts"), n(&stats, "opens_left_to_kernel"), n(&stats, "plain_opens")), (1, 1, 0), "{stats}");
    assert_eq!(stats["passthrough"], "off", "{stats}");
    assert!(mount.stop().await.unwrap().success(), "{}", mount.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlayfs_xattr_carried_by_the_image_hides_nothing_in_the_merged_tree() {
    let setup = Setup::new().await;
    // Built on an overlayfs machine, say: the directory says "opaque" to overlayfs.
    let image = vec![LayerSpec {
        entries: vec![
            dir("d", Meta::new(0o755).xattr("trusted.overlay.opaque", b"y").xattr("user.kept", b"1")),
            file("d/large", Meta::new(0o644), random_bytes(3 * MIB, 30)),
            file("d/small", Meta::new(0o644), random_bytes(100, 31)),
        ],
        compression: Compression::None,
    }];
    let layout = setup.path("opaque-layout");
    write_layout(&layout, "v1", &image).unwrap();
    let out = setup.path("opaque-out");
    shoal_build(&[format!("oci:{}:v1", layout.display()), s("--output-dir"), path_arg(&out)]).unwrap();
    let bootstrap = Bootstrap::decode(&std::fs::read(out.join("bootstrap")).unwrap()).unwrap();
    let d = bootstrap.resolve(b"d").unwrap();
    assert_eq!(bootstrap.xattr(d, b"trusted.overlay.opaque"), Some(b"y".as_slice()), "the image carries it");
    let mut mount = Mount::start(&local_mount_args(&out, &setup.path("cache"), &["--mode", "merged"])).await.unwrap();
    assert_eq!(n(&mount.wait_stats("the first counters", |s| s["mounts"].is_u64()).await.unwrap(), "mounts"), 2);
    assert_eq!(std::fs::read(mount.path("d/large")).unwrap(), random_bytes(3 * MIB, 30), "the large file is not hidden");
    assert_eq!(std::fs::read(mount.path("d/small")).unwrap(), random_bytes(100, 31));
    let names = shoal_tests::lazy::xattrs(&mount.path("d")).unwrap();
    assert_eq!(names.keys().map(String::as_str).collect::<Vec<_>>(), ["user.kept"], "{names:?}");
    assert!(mount.stop().await.unwrap().success(), "{}", mount.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_erofs_mount_leaves_nothing_the_next_mount_does_not_clear() {
    killed_mount_is_cleared_by_the_next("erofs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_merged_mount_leaves_nothing_the_next_mount_does_not_clear() {
    killed_mount_is_cleared_by_the_next("merged").await;
}

/// A mount in `mode` (erofs or merged: FUSE mounts in a directory of their own) is killed; the
/// next mount clears what it left.
async fn killed_mount_is_cleared_by_the_next(mode: &str) {
    let setup = Setup::new().await;
    let out = setup.build_local();
    let mut mount = Mount::start(&local_mount_args(&out, &setup.path("cache"), &["--mode", mode])).await.unwrap();
    let stats = mount.wait_stats("the first counters", |s| s["lower_dirs"].is_array()).await.unwrap();
    assert_eq!(stats["mode"], mode, "{stats}");
    let fuse_mounts: Vec<PathBuf> = match mode {
        "merged" => stats["lower_dirs"].as_array().unwrap().iter().map(|d| PathBuf::from(d.as_str().unwrap())).collect(),
        _ => vec![PathBuf::from(&mount_entries(&mount.mountpoint)[0].0).parent().unwrap().to_path_buf()],
    };
    let parts = fuse_mounts[0].parent().unwrap().to_path_buf();
    mount.kill();
    // The image fails cleanly (its FUSE mounts have no server: which error depends on where the
    // kernel was with the connection, ECANCELED over io_uring; EROFS says EIO), and is unmounted
    // by hand.
    let err = std::fs::read(mount.path("small/one.txt")).unwrap_err();
    assert!(matches!(err.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::EIO)), "{err}");
    assert!(Command::new("umount").arg("-l").arg(&mount.mountpoint).status().unwrap().success());
    assert!(parts.exists(), "the killed mount's FUSE mounts are left behind");
    // The next mount detaches and removes them, and serves the image.
    let mut next = Mount::start(&local_mount_args(&out, &setup.path("cache-2"), &["--mode", mode])).await.unwrap();
    assert!(!parts.exists(), "{}", next.log());
    for dir in &fuse_mounts {
        assert!(mount_entries(dir).is_empty(), "{dir:?} detached");
    }
    assert_mounted_as(&next.mountpoint, &layers());
    assert!(next.stop().await.unwrap().success(), "{}", next.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_one_mount_a_small_local_file_is_handed_to_the_page_cache_at_open_and_read_without_a_request() {
    let setup = Setup::new().await;
    let out = setup.build_local();
    let cache = setup.path("cache");
    // A first mount reads everything: every chunk is local afterwards.
    let mut first = Mount::start(&local_mount_args(&out, &cache, &[])).await.unwrap();
    assert_mounted_as(&first.mountpoint, &layers());
    assert!(first.stop().await.unwrap().success(), "{}", first.log());

    // One mount, where every open reaches shoal (a merged mount's small files never do).
    let mut mount = Mount::start(&local_mount_args(&out, &cache, &["--mode", "fuse"])).await.unwrap();
    let kept = keep_page_cache();
    assert_eq!(std::fs::read(mount.path("small/one.txt")).unwrap(), content("small/one.txt"));
    let stats = mount.wait_stats("the open released", |s| s["releases"].as_u64() >= Some(1)).await.unwrap();
    assert_eq!((n(&stats, "stored_files"), n(&stats, "reads")), (1, 0), "its data came with the open: {stats}");
    drop(kept);
    // Opened again, it is not handed over twice; once the page cache lost it, reads fetch it
    // from shoal as usual.
    assert_eq!(std::fs::read(mount.path("small/one.txt")).unwrap(), content("small/one.txt"));
    drop_page_cache().unwrap();
    let file = std::fs::File::open(mount.path("small/one.txt")).unwrap();
    let mut buf = vec![0; 100];
    file.read_exact_at(&mut buf, 1000).unwrap();
    assert_eq!(buf, content("small/one.txt")[1000..1100]);
    drop(file);
    // A file above the size handed over at open (bin/tool, 300 KiB) is read through shoal.
    assert_eq!(std::fs::read(mount.path("bin/tool")).unwrap(), content("bin/tool"));
    let stats = mount.wait_stats("every open released", |s| s["releases"].as_u64() >= Some(4)).await.unwrap();
    assert_eq!(n(&stats, "stored_files"), 1, "{stats}");
    assert!(n(&stats, "reads") >= 2, "the dropped file and bin/tool were read through shoal: {stats}");
    assert_eq!(n(&stats, "fetched_chunks"), 0, "{stats}");
    assert!(mount.stop().await.unwrap().success(), "{}", mount.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_file_is_open_through_shoal_new_opens_stay_there_until_it_is_closed() {
    let setup = Setup::new().await;
    let out = setup.build_local();
    let big = content("data/big.bin");
    let mut mount = Mount::start(&local_mount_args(&out, &setup.path("cache"), &["--mode", "fuse"])).await.unwrap();
    let mut held = std::fs::File::open(mount.path("data/big.bin")).unwrap();
    let mut data = Vec::new();
    held.read_to_end(&mut data).unwrap();
    assert_eq!(data, big);
    // Every chunk is local: this open and close get the file materialised.
    assert_eq!(std::fs::read(mount.path("data/big.bin")).unwrap(), big);
    mount.wait_stats("the file materialised", |s| s["materialised_files"].as_u64() >= Some(1)).await.unwrap();
    // The kernel refuses a passthrough open next to a cached one (ETXTBSY): this one stays plain.
    let third = std::fs::read(mount.path("data/big.bin")).expect("opening a file held open through shoal");
    assert_eq!(third, big);
    assert_eq!(mount.counter("passthrough_opens"), 0);
    drop(held);
    mount.wait_stats("every open released", |s| s["releases"].as_u64() >= Some(3)).await.unwrap();
    assert_eq!(std::fs::read(mount.path("data/big.bin")).unwrap(), big);
    let stats = mount.wait_stats("the fourth open released", |s| s["releases"].as_u64() >= Some(4)).await.unwrap();
    assert_eq!(n(&stats, "passthrough_opens"), 1, "{stats}");
    assert!(mount.stop().await.unwrap().success(), "{}", mount.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_passthrough_every_read_is_served_by_shoal_correctly_and_nothing_is_materialised() {
    let setup = Setup::new().await;
    let out = setup.build_local();
    let cache = setup.path("cache");
    let big = content("data/big.bin");
    // Set as the environment variable (shoal's configuration must not take it for one of its own).
    let mut mount =
        Mount::start_with_env(&local_mount_args(&out, &cache, &[]), &[("SHOAL_NO_PASSTHROUGH", "true"), ("SHOAL_MOUNT_MODE", "fuse")])
            .await
            .unwrap();
    assert_eq!(std::fs::read(mount.path("data/big.bin")).unwrap(), big);
    let first = mount.wait_stats("the first read served", |s| s["read_bytes"].as_u64() >= Some(big.len() as u64)).await.unwrap();
    assert_eq!(first["passthrough"], "off", "{first}");
    drop_page_cache().unwrap();
    assert_eq!(std::fs::read(mount.path("data/big.bin")).unwrap(), big);
    let file = std::fs::File::open(mount.path("data/big.bin")).unwrap();
    let mut buf = vec![0; 4096];
    file.read_exact_at(&mut buf, 3 * MIB as u64 + 7).unwrap();
    assert_eq!(buf, big[3 * MIB + 7..3 * MIB + 7 + 4096]);
    drop(file);
    mount
        .wait_stats("the second read served", |s| s["read_bytes"].as_u64() >= Some(n(&first, "read_bytes") + big.len() as u64))
        .await
        .unwrap();
    assert_mounted_as(&mount.mountpoint, &layers());
    assert!(mount.stop().await.unwrap().success(), "{}", mount.log());
    // Written at exit: the final counters. Only the first open reached shoal: its ENOSYS has
    // the kernel open every later file without asking (and never send a release).
    let stats = mount.stats();
    assert_eq!((n(&stats, "opens_left_to_kernel"), n(&stats, "plain_opens"), n(&stats, "releases")), (1, 0, 0), "{stats}");
    assert_eq!(n(&stats, "mounts"), 1, "{stats}");
    assert!(n(&stats, "reads") > n(&first, "reads"), "{stats}");
    assert_eq!((n(&stats, "passthrough_opens"), n(&stats, "materialised_files")), (0, 0), "{stats}");
    assert_eq!(std::fs::read_dir(cache.join("files")).unwrap().count(), 0, "nothing is materialised without passthrough");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_cache_serves_one_mount_at_a_time_and_the_default_ones_stay_apart() {
    let setup = Setup::new().await;
    let out = setup.build_local();
    let cache = setup.path("cache");
    let mut first = Mount::start(&local_mount_args(&out, &cache, &[])).await.unwrap();
    let err = Mount::start(&local_mount_args(&out, &cache, &[])).await.err().expect("a second mount on a cache in use must fail");
    assert!(err.to_string().contains("is in use by another process"), "{err:#}");
    assert_eq!(std::fs::read(first.path("small/one.txt")).unwrap(), content("small/one.txt"));

    // Without --cache-dir, mounts at the same time each take a default cache of their own.
    let data_dir = setup.path("data").display().to_string();
    let env = [("SHOAL_DATA_DIR", data_dir.as_str())];
    let local = [s("--bootstrap"), path_arg(&out.join("bootstrap")), s("--blobs"), path_arg(&out.join("blobs"))];
    let mut a = Mount::start_with_env(&local, &env).await.unwrap();
    let mut b = Mount::start_with_env(&local, &env).await.unwrap();
    assert_eq!(std::fs::read(a.path("bin/tool")).unwrap(), content("bin/tool"));
    assert_eq!(std::fs::read(b.path("bin/tool")).unwrap(), content("bin/tool"));
    let tool = hex::encode(blake3::hash(&content("bin/tool")).as_bytes());
    let holders: Vec<PathBuf> = ["chunks", "chunks-1"].iter().map(|d| setup.path("data").join(d)).collect();
    assert!(holders.iter().all(|dir| cached_chunks(dir).contains(&tool)), "each mount has its cache: {holders:?}");
    for mount in [&mut a, &mut b, &mut first] {
        assert!(mount.stop().await.unwrap().success(), "{}", mount.log());
    }
    // Once free, the first default cache is used again, with what it holds.
    let mut again = Mount::start_with_env(&local, &env).await.unwrap();
    assert_eq!(std::fs::read(again.path("bin/tool")).unwrap(), content("bin/tool"));
    let stats = again.wait_stats("the read served", |s| s["reads"].as_u64() >= Some(1)).await.unwrap();
    assert_eq!(n(&stats, "fetched_chunks"), 0, "the chunk was in the reused cache: {stats}");
    assert!(again.stop().await.unwrap().success(), "{}", again.log());
}

/// Sanity check of the model the other tests compare with, so a broken model cannot pass them.
#[test]
fn the_merged_tree_model_applies_whiteouts_opaque_dirs_and_links() {
    let tree = merged_tree(&layers());
    let paths: BTreeMap<&str, ()> = tree.keys().map(|p| (p.as_str(), ())).collect();
    for gone in ["usr/lib/old.so", "opq/lower", "opq/sub", "opq/sub/deep", "small/gone", "small/gone/file"] {
        assert!(!paths.contains_key(gone), "{gone} should be hidden");
    }
    for kept in ["opq/upper", "data/dup-b", "bin/tool-link2", "small/three.txt", "dev/null"] {
        assert!(paths.contains_key(kept), "{kept} should be there");
    }
    assert_eq!(tree["bin/tool-link2"].link_group.as_deref(), Some("bin/tool"));
    assert_eq!(tree["etc"].meta.mtime, (T + 30, 0));
    assert_eq!(content("etc/hostname"), b"shoal-lazy\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_io_uring_a_mount_serves_the_image_exactly_fetched_waited_for_and_by_passthrough() {
    let _on = IoUringOn::new().unwrap_or_else(|e| panic!("{e}"));
    let setup = Setup::new().await;
    setup.push_source("ring/app:v1");
    shoal_build(&[setup.image("ring/app:v1")]).unwrap();

    // From the registry: every first read waits for its chunks, and its reply comes from
    // another thread than the one serving the ring.
    let agent = Agent::start("").await.unwrap();
    let cache = setup.path("cache");
    let args =
        [setup.image("ring/app:v1-shoal"), s("--mirror"), agent.mirror(), s("--cache-dir"), path_arg(&cache), s("--mode"), s("fuse")];
    let mut mount = Mount::start(&args).await.unwrap();
    assert!(mount.log().contains("FUSE over io_uring on"), "{}", mount.log());
    assert_mounted_as(&mount.mountpoint, &layers());
    let big = content("data/big.bin");
    let first = mount.wait_stats("the file materialised", |s| s["materialised_files"].as_u64() >= Some(1)).await.unwrap();
    assert!(n(&first, "fetched_chunks") > 0, "{first}");
    // Once local, an open over the ring hands the file to the kernel.
    drop_page_cache().unwrap();
    assert_eq!(std::fs::read(mount.path("data/big.bin")).unwrap(), big);
    let later = mount.wait_stats("a passthrough open", |s| s["passthrough_opens"].as_u64() >= Some(1)).await.unwrap();
    assert!(n(&later, "io_uring_requests") > 100, "the requests came over io_uring: {later}");
    assert!(mount.stop().await.unwrap().success(), "{}", mount.log());

    // --no-io-uring keeps to /dev/fuse even where the kernel offers io_uring.
    let out = setup.build_local();
    let mut plain = Mount::start(&local_mount_args(&out, &setup.path("cache-2"), &["--no-io-uring"])).await.unwrap();
    assert_mounted_as(&plain.mountpoint, &layers());
    assert!(plain.stop().await.unwrap().success(), "{}", plain.log());
    let stats = plain.stats();
    assert!(n(&stats, "reads") > 0 && n(&stats, "io_uring_requests") == 0, "{stats}");
}
