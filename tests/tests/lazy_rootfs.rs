//! Lazy loading of a real root filesystem: a debootstrap minbase rootfs as the base layer, and
//! two layers on it adding a 200 MiB file, xattrs, hard links (one to a file of the base), a
//! symlink, a device, a fifo, whiteouts of a file and of a directory, an opaque directory and a
//! replaced file. `shoal build` converts the image into a real registry, `shoal mount` serves it,
//! and every path is compared with what the same layers unpack to with GNU tar.

use std::path::{Path, PathBuf};
use std::process::Command;

use shoal_tests::lazy::{compare_dirs, dir, file, layer_tar, shoal_build, write_layout_of_tars, Compression, Entry, Meta, Mount};
use shoal_tests::{random_bytes, require, Registry};

const MIB: usize = 1 << 20;
const T: i64 = 1_700_000_000;

/// Runs a command, failing with its output.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A debootstrap minbase rootfs: `TEST_ROOTFS` when set (one made earlier; not `SHOAL_*`, which
/// shoal reads as configuration), else made
/// under `work` from `TEST_DEBIAN_MIRROR` (default deb.debian.org), about 200 MB.
fn rootfs(work: &Path) -> PathBuf {
    if let Ok(dir) = std::env::var("TEST_ROOTFS") {
        return PathBuf::from(dir);
    }
    require("debootstrap");
    let rootfs = work.join("rootfs");
    let mirror = std::env::var("TEST_DEBIAN_MIRROR").unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    run("debootstrap", &["--variant=minbase", "bookworm", &rootfs.display().to_string(), &mirror]);
    rootfs
}

/// Unpacks `tar` into `into` with GNU tar, keeping owners, modes, times, xattrs and devices,
/// and skipping whiteout markers (their effect is applied by the caller).
fn unpack(tar: &Path, into: &Path) {
    let (tar, into) = (tar.display().to_string(), into.display().to_string());
    run("tar", &["--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "--exclude=.wh.*", "-xf", &tar, "-C", &into]);
}

/// Removes what the whiteouts and opaque markers among `entries` hide, as a runtime would.
fn apply_whiteouts(root: &Path, entries: &[Entry]) {
    for entry in entries {
        match entry {
            Entry::Whiteout(path) => {
                let target = root.join(path);
                match std::fs::symlink_metadata(&target) {
                    Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&target).unwrap(),
                    Ok(_) => std::fs::remove_file(&target).unwrap(),
                    Err(e) => panic!("whiteout of {path}, which the lower layers do not have: {e}"),
                }
            }
            Entry::Opaque(path) => {
                for child in std::fs::read_dir(root.join(path)).unwrap() {
                    let child = child.unwrap().path();
                    if std::fs::symlink_metadata(&child).unwrap().is_dir() {
                        std::fs::remove_dir_all(&child).unwrap();
                    } else {
                        std::fs::remove_file(&child).unwrap();
                    }
                }
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debootstrap_rootfs_in_three_layers_mounts_exactly_as_its_layers_unpack() {
    require("docker-registry");
    require("fusermount3");
    require("tar");
    let work = tempfile::Builder::new().prefix("shoal-rootfs-").tempdir_in("/var/tmp").unwrap();
    let rootfs = rootfs(work.path());
    assert!(rootfs.join("usr/bin/perl").exists() && rootfs.join("dev/null").exists(), "{} is not a debootstrap rootfs", rootfs.display());

    let base = work.path().join("layer0.tar");
    let rootfs_arg = rootfs.display().to_string();
    let base_arg = base.display().to_string();
    run(
        "tar",
        &["--format=posix", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--sort=name", "-C", &rootfs_arg, "-cf", &base_arg, "."],
    );
    let update = vec![
        dir("data", Meta::new(0o755).time(T, 5)),
        file(
            "data/big.bin",
            Meta::new(0o640).owner(1000, 1000).time(T + 1, 123_456_789).xattr("user.kind", b"big").xattr("user.empty", b""),
            random_bytes(200 * MIB, 1),
        ),
        file("data/a", Meta::new(0o600).owner(7, 8).time(T + 2, 0), b"two names\n".to_vec()),
        Entry::Hardlink("data/b".into(), "data/a".into()),
        Entry::Hardlink("data/perl-too".into(), "usr/bin/perl".into()),
        Entry::Symlink("data/sh".into(), Meta::new(0o777).time(T + 3, 0), "/bin/sh".into()),
        Entry::CharDevice("data/tty9".into(), Meta::new(0o620).owner(0, 5).time(T + 4, 0), 4, 9),
        Entry::Fifo("data/pipe".into(), Meta::new(0o600).time(T + 5, 0)),
        dir("etc", Meta::new(0o755).time(T + 6, 0)),
        Entry::Whiteout("etc/debian_version".into()),
        dir("etc/apt", Meta::new(0o750).time(T + 7, 0)),
        Entry::Opaque("etc/apt".into()),
        file("etc/apt/sources.list", Meta::new(0o644).time(T + 8, 0), b"deb http://mirror.example/debian bookworm main\n".to_vec()),
    ];
    let top = vec![
        dir("data", Meta::new(0o700).time(T + 10, 0)),
        Entry::Whiteout("data/b".into()),
        dir("usr/share", Meta::new(0o755).time(T + 11, 0)),
        Entry::Whiteout("usr/share/doc".into()),
        dir("etc", Meta::new(0o755).time(T + 12, 0)),
        file("etc/hostname", Meta::new(0o644).time(T + 13, 0).xattr("user.layer", b"top"), b"shoal-rootfs\n".to_vec()),
    ];
    let (update_tar, top_tar) = (layer_tar(&update).unwrap(), layer_tar(&top).unwrap());

    // What a runtime unpacking the layers in order makes.
    let expected = work.path().join("expected");
    std::fs::create_dir(&expected).unwrap();
    unpack(&base, &expected);
    for (entries, tar, name) in [(&update, &update_tar, "layer1.tar"), (&top, &top_tar, "layer2.tar")] {
        let path = work.path().join(name);
        std::fs::write(&path, tar).unwrap();
        apply_whiteouts(&expected, entries);
        unpack(&path, &expected);
    }
    assert!(!expected.join("usr/share/doc").exists() && expected.join("data/big.bin").exists());

    let registry = Registry::start(None).await.unwrap();
    let layout = work.path().join("layout");
    let layers = [(std::fs::read(&base).unwrap(), Compression::Gzip), (update_tar, Compression::Zstd), (top_tar, Compression::None)];
    write_layout_of_tars(&layout, "v1", &layers).unwrap();
    drop(layers);
    let image = format!("{}/debian/rootfs:v1-shoal", registry.host());
    shoal_build(&[format!("oci:{}:v1", layout.display()), image.clone()]).unwrap();

    let cache = work.path().join("cache").display().to_string();
    let mut mount = Mount::start(&[image, "--direct".into(), "--cache-dir".into(), cache]).await.unwrap();
    let diffs = compare_dirs(&mount.mountpoint, &expected);
    assert!(diffs.is_empty(), "{} differences between the mounted image and its unpacked layers:\n{}", diffs.len(), diffs.join("\n"));
    let status = mount.stop().await.unwrap();
    assert!(status.success(), "shoal mount exited with {status}:\n{}", mount.log());
}
