//! Fixtures for the lazy-loading tests: OCI image layouts written entry by entry with the `tar`
//! crate (whiteouts, opaque directories, hard links, devices, xattrs), the merged tree those
//! layers should produce, a comparison of a mounted tree with it, and `shoal mount` as a real
//! process that is always unmounted afterwards, with its live counters (`--stats`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{digest_of, shoal_bin};

/// How a layer is compressed in the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    fn compress(self, tar: &[u8]) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Compression::None => tar.to_vec(),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(tar)?;
                e.finish()?
            }
            Compression::Zstd => zstd::bulk::compress(tar, 3)?,
        })
    }
}

/// Owner, permissions, time and extended attributes of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits, including set-uid, set-gid and sticky.
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time: seconds and nanoseconds.
    pub mtime: (i64, u32),
    /// Extended attributes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Meta {
    /// `perm`, owned by root, at a fixed time, without xattrs.
    pub fn new(perm: u32) -> Meta {
        Meta { perm, uid: 0, gid: 0, mtime: (1_700_000_000, 0), xattrs: BTreeMap::new() }
    }

    /// With this owner.
    pub fn owner(mut self, uid: u32, gid: u32) -> Meta {
        (self.uid, self.gid) = (uid, gid);
        self
    }

    /// With this modification time.
    pub fn time(mut self, sec: i64, nsec: u32) -> Meta {
        self.mtime = (sec, nsec);
        self
    }

    /// With this extended attribute.
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Meta {
        self.xattrs.insert(name.into(), value.to_vec());
        self
    }
}

/// A regular file entry.
pub fn file(path: &str, meta: Meta, data: Vec<u8>) -> Entry {
    Entry::File(path.into(), meta, data)
}

/// A directory entry.
pub fn dir(path: &str, meta: Meta) -> Entry {
    Entry::Dir(path.into(), meta)
}

/// One entry of a layer.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A directory.
    Dir(String, Meta),
    /// A regular file and its content.
    File(String, Meta, Vec<u8>),
    /// A symlink and its target.
    Symlink(String, Meta, String),
    /// A hard link to an earlier path.
    Hardlink(String, String),
    /// A character device (major, minor).
    CharDevice(String, Meta, u32, u32),
    /// A named pipe.
    Fifo(String, Meta),
    /// Removes a path of lower layers (`.wh.<name>`).
    Whiteout(String),
    /// Hides what lower layers put in a directory (`.wh..wh..opq`).
    Opaque(String),
}

/// A layer: its entries and how it is compressed.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// Entries in tar order.
    pub entries: Vec<Entry>,
    /// Compression in the layout.
    pub compression: Compression,
}

fn header(kind: tar::EntryType, meta: &Meta, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.perm);
    h.set_uid(u64::from(meta.uid));
    h.set_gid(u64::from(meta.gid));
    h.set_mtime(meta.mtime.0.max(0) as u64);
    h.set_size(size);
    h
}

fn pax(builder: &mut tar::Builder<Vec<u8>>, meta: &Meta) -> anyhow::Result<()> {
    let mut records: Vec<(String, Vec<u8>)> = meta.xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.clone())).collect();
    if meta.mtime.1 != 0 {
        records.push(("mtime".into(), format!("{}.{:09}", meta.mtime.0, meta.mtime.1).into_bytes()));
    }
    if !records.is_empty() {
        builder.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    Ok(())
}

/// The tar stream of a layer.
pub fn layer_tar(entries: &[Entry]) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let empty = Meta::new(0o644);
    for entry in entries {
        match entry {
            Entry::Dir(path, meta) => {
                pax(&mut b, meta)?;
                b.append_data(&mut header(tar::EntryType::Directory, meta, 0), format!("{path}/"), &[][..])?;
            }
            Entry::File(path, meta, data) => {
                pax(&mut b, meta)?;
                b.append_data(&mut header(tar::EntryType::Regular, meta, data.len() as u64), path, data.as_slice())?;
            }
            Entry::Symlink(path, meta, target) => {
                pax(&mut b, meta)?;
                b.append_link(&mut header(tar::EntryType::Symlink, meta, 0), path, target)?;
            }
            Entry::Hardlink(path, target) => {
                b.append_link(&mut header(tar::EntryType::Link, &empty, 0), path, target)?;
            }
            Entry::CharDevice(path, meta, major, minor) => {
                pax(&mut b, meta)?;
                let mut h = header(tar::EntryType::Char, meta, 0);
                h.set_device_major(*major)?;
                h.set_device_minor(*minor)?;
                b.append_data(&mut h, path, &[][..])?;
            }
            Entry::Fifo(path, meta) => {
                pax(&mut b, meta)?;
                b.append_data(&mut header(tar::EntryType::Fifo, meta, 0), path, &[][..])?;
            }
            Entry::Whiteout(path) => {
                let (dir, name) = path.rsplit_once('/').map_or(("", path.as_str()), |(d, n)| (d, n));
                let wh = if dir.is_empty() { format!(".wh.{name}") } else { format!("{dir}/.wh.{name}") };
                b.append_data(&mut header(tar::EntryType::Regular, &empty, 0), wh, &[][..])?;
            }
            Entry::Opaque(dir) => {
                b.append_data(&mut header(tar::EntryType::Regular, &empty, 0), format!("{dir}/.wh..wh..opq"), &[][..])?;
            }
        }
    }
    Ok(b.into_inner()?)
}

fn write_blob(dir: &Path, bytes: &[u8]) -> anyhow::Result<(String, u64)> {
    let digest = digest_of(bytes);
    std::fs::write(dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:")), bytes)?;
    Ok((digest, bytes.len() as u64))
}

/// Writes an OCI image layout at `dir` holding one image tagged `tag` with these layers.
pub fn write_layout(dir: &Path, tag: &str, layers: &[LayerSpec]) -> anyhow::Result<()> {
    let tars = layers.iter().map(|layer| Ok((layer_tar(&layer.entries)?, layer.compression))).collect::<anyhow::Result<Vec<_>>>()?;
    write_layout_of_tars(dir, tag, &tars)
}

/// Writes an OCI image layout at `dir` holding one image tagged `tag` whose layers are these
/// tar streams, each stored with its compression.
pub fn write_layout_of_tars(dir: &Path, tag: &str, layers: &[(Vec<u8>, Compression)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, compression) in layers {
        diff_ids.push(digest_of(tar));
        let (digest, size) = write_blob(dir, &compression.compress(tar)?)?;
        descriptors.push(serde_json::json!({ "mediaType": compression.media_type(), "digest": digest, "size": size }));
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": ["/bin/tool"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": diff_ids.iter().map(|_| serde_json::json!({ "created_by": "lazy test" })).collect::<Vec<_>>(),
    });
    let (config_digest, config_size) = write_blob(dir, &serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": descriptors,
    });
    let (manifest_digest, manifest_size) = write_blob(dir, &serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

/// What a path of the merged tree should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with this content.
    File(Vec<u8>),
    /// A symlink to this target.
    Symlink(String),
    /// A character device (major, minor).
    CharDevice(u32, u32),
    /// A named pipe.
    Fifo,
}

/// A path of the merged tree as it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// What it is.
    pub kind: Kind,
    /// Its metadata.
    pub meta: Meta,
    /// The first path of its hard-link group, if it is hard-linked.
    pub link_group: Option<String>,
}

/// The tree the layers merge into, as the OCI image spec's changeset rules say: whiteouts and
/// opaque markers hide what lower layers put there, later entries replace earlier ones, a
/// directory entry over a directory updates its metadata, a hard link is its target's inode.
pub fn merged_tree(layers: &[LayerSpec]) -> BTreeMap<String, Expected> {
    let mut tree: BTreeMap<String, Expected> = BTreeMap::new();
    let under = |dir: &str, path: &str| path.starts_with(&format!("{dir}/"));
    for layer in layers {
        for entry in &layer.entries {
            match entry {
                Entry::Whiteout(path) => tree.retain(|p, _| p != path && !under(path, p)),
                Entry::Opaque(dir) => tree.retain(|p, _| !under(dir, p)),
                _ => {}
            }
        }
        for entry in &layer.entries {
            let (path, kind, meta) = match entry {
                Entry::Dir(p, m) => (p, Kind::Dir, m),
                Entry::File(p, m, data) => (p, Kind::File(data.clone()), m),
                Entry::Symlink(p, m, target) => (p, Kind::Symlink(target.clone()), m),
                Entry::CharDevice(p, m, major, minor) => (p, Kind::CharDevice(*major, *minor), m),
                Entry::Fifo(p, m) => (p, Kind::Fifo, m),
                Entry::Hardlink(path, target) => {
                    let mut linked = tree[target].clone();
                    let group = linked.link_group.clone().unwrap_or_else(|| target.clone());
                    linked.link_group = Some(group.clone());
                    if let Some(t) = tree.get_mut(target) {
                        t.link_group = Some(group);
                    }
                    tree.insert(path.clone(), linked);
                    continue;
                }
                Entry::Whiteout(_) | Entry::Opaque(_) => continue,
            };
            tree.insert(path.clone(), Expected { kind, meta: meta.clone(), link_group: None });
        }
    }
    tree
}

/// Every difference between the tree mounted at `root` and `expected` (empty when they agree):
/// missing and extra paths, type, content, permissions, owner, size, mtime, link target, device
/// number, extended attributes and hard-link groups.
pub fn compare_tree(root: &Path, expected: &BTreeMap<String, Expected>) -> Vec<String> {
    let mut found = BTreeMap::new();
    walk(root, root, &mut found);
    let mut diffs = Vec::new();
    for path in expected.keys().filter(|p| !found.contains_key(*p)) {
        diffs.push(format!("{path}: missing"));
    }
    for path in found.keys().filter(|p| !expected.contains_key(*p)) {
        diffs.push(format!("{path}: not expected"));
    }
    // A file is its device and inode number: a merged mount's parts number theirs apart.
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    for (path, want) in expected {
        let Some(meta) = found.get(path) else { continue };
        inodes.entry((meta.dev(), meta.ino())).or_default().push(path.clone());
        diffs.extend(compare_entry(&root.join(path), path, want, meta));
    }
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    for (path, want) in expected {
        groups.entry(want.link_group.clone().unwrap_or_else(|| path.clone())).or_default().push(path.clone());
    }
    for members in groups.values() {
        let Some(meta) = found.get(&members[0]) else { continue };
        let same_inode = inodes.get(&(meta.dev(), meta.ino())).cloned().unwrap_or_default();
        if same_inode != *members {
            diffs.push(format!("{members:?}: hard links share an inode with {same_inode:?}"));
        }
        if !meta.is_dir() && meta.nlink() != members.len() as u64 {
            diffs.push(format!("{}: nlink {} for {} names", members[0], meta.nlink(), members.len()));
        }
    }
    diffs
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, std::fs::Metadata>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
        if meta.is_dir() {
            walk(root, &path, out);
        }
        out.insert(rel, meta);
    }
}

fn compare_entry(full: &Path, path: &str, want: &Expected, meta: &std::fs::Metadata) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut check = |what: &str, got: String, expected: String| {
        if got != expected {
            diffs.push(format!("{path}: {what} is {got}, expected {expected}"));
        }
    };
    let ft = meta.file_type();
    let kind = match &want.kind {
        Kind::Dir => ft.is_dir(),
        Kind::File(_) => ft.is_file(),
        Kind::Symlink(_) => ft.is_symlink(),
        Kind::CharDevice(..) => ft.is_char_device(),
        Kind::Fifo => ft.is_fifo(),
    };
    if !kind {
        return vec![format!("{path}: type is {ft:?}, expected {:?}", want.kind)];
    }
    check("permissions", format!("{:o}", meta.mode() & 0o7777), format!("{:o}", want.meta.perm));
    check("owner", format!("{}:{}", meta.uid(), meta.gid()), format!("{}:{}", want.meta.uid, want.meta.gid));
    check("mtime", format!("{}.{:09}", meta.mtime(), meta.mtime_nsec()), format!("{}.{:09}", want.meta.mtime.0, want.meta.mtime.1));
    match &want.kind {
        Kind::File(data) => {
            check("size", meta.len().to_string(), data.len().to_string());
            match std::fs::read(full) {
                Ok(content) if content == *data => {}
                Ok(content) => check("content", format!("{} other bytes", content.len()), format!("{} bytes", data.len())),
                Err(e) => check("content", format!("unreadable ({e})"), format!("{} bytes", data.len())),
            }
        }
        Kind::Symlink(target) => {
            check("size", meta.len().to_string(), target.len().to_string());
            let got = std::fs::read_link(full).map(|t| t.to_string_lossy().into_owned()).unwrap_or_else(|e| e.to_string());
            check("link target", got, target.clone());
        }
        Kind::CharDevice(major, minor) => {
            let rdev = meta.rdev();
            check("device", format!("{}:{}", libc::major(rdev), libc::minor(rdev)), format!("{major}:{minor}"));
        }
        Kind::Dir | Kind::Fifo => {}
    }
    let got = xattrs(full).unwrap_or_default();
    check("xattrs", format!("{got:?}"), format!("{:?}", want.meta.xattrs));
    diffs
}

/// Compares the tree under `got` with the one under `want` path by path: type, permissions,
/// owner, mtime (to the nanosecond), size and content of files, symlink targets, device
/// numbers, xattrs, and which names are hard links of one file. Directory sizes and link
/// counts are not compared (they are the filesystem's own). Returns every difference.
pub fn compare_dirs(got: &Path, want: &Path) -> Vec<String> {
    let (mut found, mut expected) = (BTreeMap::new(), BTreeMap::new());
    walk(got, got, &mut found);
    walk(want, want, &mut expected);
    let mut diffs = Vec::new();
    for path in expected.keys().filter(|p| !found.contains_key(*p)) {
        diffs.push(format!("{path}: missing"));
    }
    for path in found.keys().filter(|p| !expected.contains_key(*p)) {
        diffs.push(format!("{path}: not expected"));
    }
    let mut want_links: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut got_links: HashMap<String, (u64, u64)> = HashMap::new();
    for (path, want_meta) in &expected {
        let Some(got_meta) = found.get(path) else { continue };
        let mut check = |what: &str, got: String, want: String| {
            if got != want {
                diffs.push(format!("{path}: {what} is {got}, expected {want}"));
            }
        };
        let (gt, wt) = (got_meta.file_type(), want_meta.file_type());
        let kind = |t: std::fs::FileType| {
            [
                (t.is_dir(), "dir"),
                (t.is_file(), "file"),
                (t.is_symlink(), "symlink"),
                (t.is_char_device(), "char device"),
                (t.is_block_device(), "block device"),
                (t.is_fifo(), "fifo"),
                (t.is_socket(), "socket"),
            ]
            .into_iter()
            .find(|(is, _)| *is)
            .map_or("unknown", |(_, name)| name)
        };
        if kind(gt) != kind(wt) {
            check("type", kind(gt).into(), kind(wt).into());
            continue;
        }
        check("permissions", format!("{:o}", got_meta.mode() & 0o7777), format!("{:o}", want_meta.mode() & 0o7777));
        check("owner", format!("{}:{}", got_meta.uid(), got_meta.gid()), format!("{}:{}", want_meta.uid(), want_meta.gid()));
        check(
            "mtime",
            format!("{}.{:09}", got_meta.mtime(), got_meta.mtime_nsec()),
            format!("{}.{:09}", want_meta.mtime(), want_meta.mtime_nsec()),
        );
        let (got_path, want_path) = (got.join(path), want.join(path));
        if wt.is_file() {
            check("size", got_meta.len().to_string(), want_meta.len().to_string());
            if !same_content(&got_path, &want_path) {
                check("content", "different".into(), "the same".into());
            }
            want_links.entry(want_meta.ino()).or_default().push(path.clone());
            got_links.insert(path.clone(), (got_meta.dev(), got_meta.ino()));
        }
        if wt.is_symlink() {
            let target = |p: &Path| std::fs::read_link(p).map(|t| t.to_string_lossy().into_owned()).unwrap_or_else(|e| e.to_string());
            check("link target", target(&got_path), target(&want_path));
        }
        if wt.is_char_device() || wt.is_block_device() {
            check("device", got_meta.rdev().to_string(), want_meta.rdev().to_string());
        }
        check("xattrs", format!("{:?}", xattrs(&got_path).ok()), format!("{:?}", xattrs(&want_path).ok()));
    }
    // Names of one file must be names of one file, and only of it.
    let mut file_of: HashMap<(u64, u64), u64> = HashMap::new();
    for (want_ino, names) in &want_links {
        let inodes: HashSet<Option<&(u64, u64)>> = names.iter().map(|n| got_links.get(n)).collect();
        if inodes.len() != 1 {
            diffs.push(format!("{names:?} are one file, but not in the mounted tree"));
        }
        for got_ino in inodes.into_iter().flatten() {
            if file_of.insert(*got_ino, *want_ino).is_some_and(|other| other != *want_ino) {
                diffs.push(format!("{names:?} share their inode with other files in the mounted tree"));
            }
        }
        if let Some(meta) = found.get(&names[0]) {
            if meta.nlink() != names.len() as u64 {
                diffs.push(format!("{}: nlink {} for {} names", names[0], meta.nlink(), names.len()));
            }
        }
    }
    diffs
}

/// Whether two files hold the same bytes, read in 1 MiB pieces.
fn same_content(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (Ok(mut a), Ok(mut b)) = (std::fs::File::open(a), std::fs::File::open(b)) else { return false };
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = match read_full(&mut a, &mut x) {
            Ok(n) => n,
            Err(_) => return false,
        };
        match read_full(&mut b, &mut y) {
            Ok(m) if m == n => {}
            _ => return false,
        }
        if x[..n] != y[..n] {
            return false;
        }
        if n < x.len() {
            return true;
        }
    }

    fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(filled)
    }
}

/// The extended attributes of `path` (not following symlinks).
pub fn xattrs(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path, and a null buffer of size 0 to ask for the length.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        bail!("llistxattr {}: {}", path.display(), std::io::Error::last_os_error());
    }
    let mut names = vec![0u8; len as usize];
    // SAFETY: the buffer is `names.len()` bytes long.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        bail!("llistxattr {}: {}", path.display(), std::io::Error::last_os_error());
    }
    names.truncate(len as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let c_name = CString::new(name)?;
        let mut value = vec![0u8; 65536];
        // SAFETY: NUL-terminated strings and a buffer of `value.len()` bytes.
        let n = unsafe { libc::lgetxattr(c_path.as_ptr(), c_name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if n < 0 {
            bail!("lgetxattr {} {}: {}", path.display(), String::from_utf8_lossy(name), std::io::Error::last_os_error());
        }
        value.truncate(n as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    Ok(out)
}

/// Whether `path` is a mount point right now.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let want = path.to_string_lossy();
    mounts.lines().any(|line| line.split(' ').nth(1) == Some(want.as_ref()))
}

/// Hex digests of the chunks the chunk cache in `dir` holds, from its index (safe while a
/// mount is using the cache).
pub fn cached_chunks(dir: &Path) -> HashSet<String> {
    shoal_fuse::cache::cached_chunks(dir).unwrap_or_default().iter().map(hex::encode).collect()
}

/// Taken shared by a test that counts on the page cache keeping what it read
/// ([`keep_page_cache`]), and exclusively by [`drop_page_cache`].
static PAGE_CACHE: RwLock<()> = RwLock::new(());

/// Keeps the tests of this process from dropping the page cache until the guard goes: for a
/// test that checks warm reads never reach its filesystem. Never call [`drop_page_cache`]
/// while holding it.
pub fn keep_page_cache() -> RwLockReadGuard<'static, ()> {
    PAGE_CACHE.read().unwrap_or_else(|p| p.into_inner())
}

/// Writes dirty pages and drops the kernel's clean page cache (all of it: root only), so the
/// next read of a file goes to its filesystem.
pub fn drop_page_cache() -> anyhow::Result<()> {
    // Waits for the tests of this process that count on the page cache keeping what they read.
    let _alone = PAGE_CACHE.write().unwrap_or_else(|p| p.into_inner());
    Command::new("sync").status().context("running sync")?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches (needs root)")?;
    Ok(())
}

/// A `shoal mount` process and its mount point; unmounted and stopped when dropped, even when
/// the test fails. It keeps its counters in a stats file ([`Mount::stats`]).
pub struct Mount {
    /// Holds the mount point and the log.
    dir: tempfile::TempDir,
    /// Where the image is mounted.
    pub mountpoint: PathBuf,
    /// The process.
    child: Option<Child>,
}

impl Mount {
    /// Runs `shoal mount ARGS... --stats <file> <mountpoint>` and waits until the filesystem
    /// is mounted. Unless ARGS name a `--scheduler`, the mount neither reports nor uses access
    /// traces (`--no-cluster-trace`), so tests never learn from each other.
    pub async fn start(args: &[String]) -> anyhow::Result<Mount> {
        Mount::start_with_env(args, &[]).await
    }

    /// [`Mount::start`] with extra environment variables (`SHOAL_PEER__HOST_ID`, say).
    pub async fn start_with_env(args: &[String], env: &[(&str, &str)]) -> anyhow::Result<Mount> {
        let dir = tempfile::Builder::new().prefix("shoal-mount-").tempdir()?;
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint)?;
        let log = std::fs::File::create(dir.path().join("mount.log"))?;
        let child = Command::new(shoal_bin())
            .arg("mount")
            .args(args)
            .arg("--stats")
            .arg(dir.path().join("stats.json"))
            .args(args.iter().all(|a| a != "--scheduler").then_some("--no-cluster-trace"))
            .arg(&mountpoint)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,shoal_fuse=debug,shoal=debug,shoal_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting shoal mount")?;
        let mut mount = Mount { dir, mountpoint, child: Some(child) };
        let start = Instant::now();
        while !is_mounted(&mount.mountpoint) {
            if let Some(status) = mount.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                mount.child = None;
                bail!("shoal mount exited with {status}:\n{}", mount.log());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("shoal mount did not mount within 30 s:\n{}", mount.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(mount)
    }

    /// A path inside the mounted image.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel.trim_start_matches('/'))
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mount.log")).unwrap_or_default()
    }

    /// The mount's counters as last written (every 200 ms when they change): `passthrough`
    /// ("on", "off", "refused"), `passthrough_opens`, `plain_opens`, `releases`, `reads` and
    /// `read_bytes` (read requests shoal answered), `materialised_files`, `fetched_chunks`, ...
    pub fn stats(&self) -> serde_json::Value {
        std::fs::read(self.dir.path().join("stats.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Counter `name` of the mount's last stats (0 before the first).
    pub fn counter(&self, name: &str) -> u64 {
        self.stats()[name].as_u64().unwrap_or(0)
    }

    /// Waits up to 30 s for stats that satisfy `check`, and returns them.
    pub async fn wait_stats(&self, what: &str, mut check: impl FnMut(&serde_json::Value) -> bool) -> anyhow::Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            let stats = self.stats();
            if !stats.is_null() && check(&stats) {
                return Ok(stats);
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("waited 30 s for {what}; stats: {stats}\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process (SIGKILL): it cannot unmount.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process with SIGTERM and waits for it; fails unless it exits cleanly within
    /// 15 s and the filesystem is unmounted.
    pub async fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else { bail!("shoal mount is not running") };
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("shoal mount did not exit within 15 s of SIGTERM:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if is_mounted(&self.mountpoint) {
            bail!("{} is still mounted after shoal mount exited:\n{}", self.mountpoint.display(), self.log());
        }
        Ok(status)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        stop_mount(self.child.take().as_mut(), &self.mountpoint, Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!("--- shoal mount log ---\n{}", self.log());
        }
    }
}

/// Stops a `shoal mount` process, if still running: SIGTERM (it unmounts), a kill after
/// `grace`; then a lazy unmount of `mountpoint` if the mount outlived it.
pub fn stop_mount(child: Option<&mut Child>, mountpoint: &Path, grace: Duration) {
    if let Some(child) = child {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while child.try_wait().ok().flatten().is_none() && start.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    // A FUSE mount, or the overlayfs merging two.
    if is_mounted(mountpoint) {
        let _ = Command::new("umount").arg("-l").arg(mountpoint).status();
    }
}

/// Runs `shoal build ARGS...`; returns its stdout (the pushed `reference@digest`), failing with
/// its output when it fails.
pub fn shoal_build(args: &[String]) -> anyhow::Result<String> {
    let out = Command::new(shoal_bin()).arg("build").args(args).stdin(Stdio::null()).output().context("running shoal build")?;
    if !out.status.success() {
        bail!("shoal build {args:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Turns the fuse module's FUSE-over-io_uring switch on while alive, then back to what it was.
pub struct IoUringOn(String);

impl IoUringOn {
    const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

    /// Fails with the reason when the kernel has no such switch (before Linux 6.14, or built
    /// without CONFIG_FUSE_IO_URING) or it cannot be set (not root).
    pub fn new() -> std::io::Result<IoUringOn> {
        let context = |what: &str, e: std::io::Error| std::io::Error::new(e.kind(), format!("{what} {}: {e}", Self::PARAM));
        let before = std::fs::read_to_string(Self::PARAM).map_err(|e| context("no FUSE over io_uring in this kernel:", e))?;
        std::fs::write(Self::PARAM, "Y").map_err(|e| context("turning on", e))?;
        Ok(IoUringOn(before.trim().to_string()))
    }
}

impl Drop for IoUringOn {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PARAM, &self.0);
    }
}
