use std::collections::HashMap;

use tar::{EntryType, Header};

use super::*;
use crate::chunk::decompress_chunk;
use crate::format::{FileKind, ROOT_INO};

/// Writes one layer's tar stream in memory.
struct Layer {
    tar: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Self {
        Layer { tar: tar::Builder::new(Vec::new()) }
    }

    fn header(entry_type: EntryType, mode: u32, size: u64) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(entry_type);
        header.set_mode(mode);
        header.set_uid(1000);
        header.set_gid(1000);
        header.set_mtime(1_600_000_000);
        header.set_size(size);
        header
    }

    fn entry(mut self, mut header: Header, path: &str, data: &[u8]) -> Self {
        self.tar.append_data(&mut header, path, data).unwrap();
        self
    }

    fn dir(self, path: &str) -> Self {
        self.dir_mode(path, 0o755)
    }

    fn dir_mode(self, path: &str, mode: u32) -> Self {
        self.entry(Self::header(EntryType::Directory, mode, 0), path, &[])
    }

    fn file(self, path: &str, data: &[u8]) -> Self {
        self.entry(Self::header(EntryType::Regular, 0o644, data.len() as u64), path, data)
    }

    fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut header = Self::header(EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut header, path, target).unwrap();
        self
    }

    fn hard_link(mut self, path: &str, target: &str) -> Self {
        let mut header = Self::header(EntryType::Link, 0o644, 0);
        self.tar.append_link(&mut header, path, target).unwrap();
        self
    }

    fn device(self, path: &str, entry_type: EntryType, major: u32, minor: u32) -> Self {
        let mut header = Self::header(entry_type, 0o600, 0);
        header.set_device_major(major).unwrap();
        header.set_device_minor(minor).unwrap();
        self.entry(header, path, &[])
    }

    fn whiteout(self, dir: &str, name: &str) -> Self {
        self.file(&format!("{dir}.wh.{name}"), &[])
    }

    fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}.wh..wh..opq"), &[])
    }

    fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.tar.append_pax_extensions(records.iter().copied()).unwrap();
        self
    }

    fn finish(self) -> Vec<u8> {
        self.tar.into_inner().unwrap()
    }
}

/// Deterministic bytes that do not compress.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    crate::test_data::pattern(len, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A built image with every chunk blob's bytes, by sha256.
struct Built {
    image: BuiltImage,
    outcomes: Vec<LayerOutcome>,
    blob_bytes: HashMap<[u8; 32], Vec<u8>>,
}

impl Built {
    fn bootstrap(&self) -> &Bootstrap {
        &self.image.bootstrap
    }

    fn ino(&self, path: &str) -> Option<u64> {
        self.bootstrap().resolve(path.as_bytes())
    }

    fn attr(&self, path: &str) -> crate::format::Attr {
        let ino = self.ino(path).unwrap_or_else(|| panic!("{path} is missing"));
        self.bootstrap().getattr(ino).unwrap()
    }

    fn names(&self, path: &str) -> Vec<String> {
        let ino = self.ino(path).unwrap();
        self.bootstrap().readdir(ino).unwrap().map(|entry| String::from_utf8(entry.name.to_vec()).unwrap()).collect()
    }

    /// Reads a file back through its chunks, verifying each.
    fn read(&self, path: &str) -> Vec<u8> {
        let bootstrap = self.bootstrap();
        let ino = self.ino(path).unwrap();
        let mut data = Vec::new();
        for placed in bootstrap.chunks_of(ino).unwrap() {
            assert_eq!(placed.file_offset, data.len() as u64);
            let chunk = placed.chunk;
            let blob = bootstrap.blobs()[chunk.blob as usize];
            let bytes = &self.blob_bytes[&blob.sha256];
            let start = chunk.compressed_offset as usize;
            let compressed = &bytes[start..start + chunk.compressed_len as usize];
            data.extend(decompress_chunk(compressed, chunk.uncompressed_len, &chunk.digest).unwrap());
        }
        assert_eq!(data.len() as u64, bootstrap.getattr(ino).unwrap().size);
        data
    }
}

fn build_with(builder: TreeBuilder, layers: Vec<Vec<u8>>, prefetch: &[&str], known: &[&Built]) -> Built {
    let mut builder = builder;
    let mut outcomes = Vec::new();
    let mut blob_bytes: HashMap<[u8; 32], Vec<u8>> = known.iter().flat_map(|built| built.blob_bytes.clone()).collect();
    for layer in layers {
        let mut sink = Vec::new();
        let outcome = builder.add_layer(&mut tar::Archive::new(layer.as_slice()), &mut sink).unwrap();
        match outcome.blob {
            Some(blob) => {
                assert_eq!(blob.size, sink.len() as u64);
                blob_bytes.insert(blob.sha256, sink);
            }
            None => assert!(sink.is_empty(), "a layer without new chunks wrote a blob"),
        }
        outcomes.push(outcome);
    }
    let image = builder.finish(prefetch).unwrap();
    let reencoded = Bootstrap::decode(&image.bootstrap.encode().unwrap()).unwrap();
    assert_eq!(reencoded, image.bootstrap);
    Built { image, outcomes, blob_bytes }
}

fn build(layers: Vec<Vec<u8>>) -> Built {
    build_with(TreeBuilder::default(), layers, &[], &[])
}

fn try_build(layers: Vec<Vec<u8>>) -> Result<BuiltImage, BuildError> {
    let mut builder = TreeBuilder::default();
    for layer in layers {
        builder.add_layer(&mut tar::Archive::new(layer.as_slice()), io::sink())?;
    }
    builder.finish::<&str>(&[])
}

#[test]
fn whiteout_hides_lower_files_and_directories() {
    let built = build(vec![
        Layer::new().dir("a/").file("a/x", b"x").file("a/y", b"y").dir("d/").dir("d/sub/").file("d/sub/z", b"z").finish(),
        Layer::new().whiteout("a/", "x").whiteout("", "d").whiteout("", "never-existed").finish(),
    ]);
    assert_eq!(built.names(""), ["a"]);
    assert_eq!(built.names("a"), ["y"]);
    assert_eq!(built.read("a/y"), b"y");
}

#[test]
fn whiteout_spares_the_same_layer_entry() {
    let built = build(vec![
        Layer::new().file("a", b"old").file("b", b"old").finish(),
        Layer::new().file("a", b"new a").whiteout("", "a").whiteout("", "b").file("b", b"new b").finish(),
    ]);
    assert_eq!(built.read("a"), b"new a");
    assert_eq!(built.read("b"), b"new b");
}

#[test]
fn opaque_directory_hides_only_lower_layers() {
    let built = build(vec![
        Layer::new().dir("o/").file("o/old", b"old").dir("o/sub/").file("o/sub/deep", b"deep").file("kept", b"kept").finish(),
        Layer::new().file("o/sub/new", b"new").opaque("o/").file("o/fresh", b"fresh").finish(),
    ]);
    assert_eq!(built.names(""), ["kept", "o"]);
    assert_eq!(built.names("o"), ["fresh", "sub"]);
    assert_eq!(built.names("o/sub"), ["new"]);
    assert_eq!(built.read("o/sub/new"), b"new");
}

#[test]
fn hard_links_share_one_inode_within_and_across_layers() {
    let built =
        build(vec![Layer::new().file("f", b"shared").hard_link("g", "f").finish(), Layer::new().hard_link("dir/h", "./f").finish()]);
    let ino = built.ino("f").unwrap();
    assert_eq!(built.ino("g"), Some(ino));
    assert_eq!(built.ino("dir/h"), Some(ino));
    assert_eq!(built.attr("f").nlink, 3);
    assert_eq!(built.read("dir/h"), b"shared");
}

#[test]
fn replacing_a_hard_linked_name_keeps_the_other() {
    let built = build(vec![Layer::new().file("f", b"one").hard_link("g", "f").finish(), Layer::new().file("g", b"two").finish()]);
    assert_ne!(built.ino("f"), built.ino("g"));
    assert_eq!(built.attr("f").nlink, 1);
    assert_eq!(built.read("f"), b"one");
    assert_eq!(built.read("g"), b"two");
}

#[test]
fn hard_link_to_a_missing_file_or_a_directory_fails() {
    let missing = try_build(vec![Layer::new().hard_link("g", "nowhere").finish()]).unwrap_err();
    assert!(matches!(missing, BuildError::Entry { layer: 0, .. }), "{missing}");
    let dir = try_build(vec![Layer::new().dir("d/").hard_link("g", "d").finish()]).unwrap_err();
    assert!(dir.to_string().contains("directory"), "{dir}");
}

#[test]
fn symlinks_devices_and_fifos_keep_their_identity() {
    let built = build(vec![Layer::new()
        .symlink("bin/sh", "/usr/bin/dash")
        .device("dev/null", EntryType::Char, 1, 3)
        .device("dev/sda", EntryType::Block, 8, 0)
        .device("dev/big", EntryType::Char, 0x1234, 0x56789)
        .entry(Layer::header(EntryType::Fifo, 0o600, 0), "run/pipe", &[])
        .finish()]);
    let bootstrap = built.bootstrap();
    let sh = built.attr("bin/sh");
    assert_eq!(sh.kind, FileKind::Symlink);
    assert_eq!(bootstrap.readlink(sh.ino), Some(&b"/usr/bin/dash"[..]));
    let null = built.attr("dev/null");
    assert_eq!((null.kind, null.rdev, null.perm), (FileKind::CharDevice, 0x103, 0o600));
    let sda = built.attr("dev/sda");
    assert_eq!((sda.kind, sda.rdev), (FileKind::BlockDevice, 0x800));
    assert_eq!(built.attr("dev/big").rdev, make_dev(0x1234, 0x56789));
    assert_eq!(make_dev(0x1234, 0x56789), 0x0000_1000_5672_3489);
    assert_eq!(built.attr("run/pipe").kind, FileKind::Fifo);
    let implicit = built.attr("dev");
    assert_eq!((implicit.kind, implicit.perm, implicit.uid), (FileKind::Directory, 0o755, 0));
}

#[test]
fn pax_records_give_xattrs_and_precise_mtimes() {
    let built = build(vec![Layer::new()
        .pax(&[
            ("SCHILY.xattr.user.comment", b"hello"),
            ("SCHILY.xattr.security.capability", &[1, 0, 0, 2, 0, 0x20]),
            ("mtime", b"1700000000.5"),
        ])
        .file("bin/ping", b"ping")
        .file("plain", b"plain")
        .finish()]);
    let bootstrap = built.bootstrap();
    let ping = built.attr("bin/ping");
    assert_eq!(bootstrap.xattr(ping.ino, b"user.comment"), Some(&b"hello"[..]));
    assert_eq!(bootstrap.xattr(ping.ino, b"security.capability"), Some(&[1u8, 0, 0, 2, 0, 0x20][..]));
    assert_eq!(ping.mtime, Timestamp { sec: 1_700_000_000, nsec: 500_000_000 });
    let plain = built.attr("plain");
    assert_eq!(bootstrap.xattrs(plain.ino).unwrap().count(), 0);
    assert_eq!(plain.mtime, Timestamp { sec: 1_600_000_000, nsec: 0 });
    assert_eq!((plain.uid, plain.gid, plain.perm), (1000, 1000, 0o644));
}

#[test]
fn pax_times_parse_like_tar_writes_them() {
    let parse = |text: &str| parse_pax_time(text.as_bytes());
    assert_eq!(parse("12"), Some(Timestamp { sec: 12, nsec: 0 }));
    assert_eq!(parse("12.000000001"), Some(Timestamp { sec: 12, nsec: 1 }));
    assert_eq!(parse("12.1234567891"), Some(Timestamp { sec: 12, nsec: 123_456_789 }));
    assert_eq!(parse("-1.25"), Some(Timestamp { sec: -2, nsec: 750_000_000 }));
    assert_eq!(parse("-3"), Some(Timestamp { sec: -3, nsec: 0 }));
    assert_eq!(parse(".5"), Some(Timestamp { sec: 0, nsec: 500_000_000 }));
    for bad in ["", ".", "-", "1e3", "12.x", "99999999999999999999"] {
        assert_eq!(parse(bad), None, "{bad:?}");
    }
}

#[test]
fn later_layers_replace_and_update_entries() {
    let built = build(vec![
        Layer::new()
            .file("r", b"old")
            .dir_mode("d/", 0o700)
            .file("d/child", b"child")
            .dir("gone/")
            .file("gone/inside", b"inside")
            .file("became-dir", b"file")
            .finish(),
        Layer::new().file("r", b"new").dir_mode("d/", 0o711).file("gone", b"now a file").file("became-dir/inner", b"inner").finish(),
    ]);
    assert_eq!(built.read("r"), b"new");
    assert_eq!(built.attr("d").perm, 0o711);
    assert_eq!(built.names("d"), ["child"]);
    assert_eq!(built.attr("gone").kind, FileKind::Regular);
    assert_eq!(built.read("gone"), b"now a file");
    assert_eq!(built.names("became-dir"), ["inner"]);
}

#[test]
fn root_entry_sets_root_metadata() {
    let built = build(vec![Layer::new().dir_mode("./", 0o750).file("f", b"f").finish()]);
    let root = built.bootstrap().getattr(ROOT_INO).unwrap();
    assert_eq!((root.perm, root.uid), (0o750, 1000));
}

#[test]
fn identical_files_across_layers_are_stored_once() {
    let shared = noise(300_000, 1);
    let other = noise(200_000, 2);
    let built = build(vec![
        Layer::new().file("a", &shared).finish(),
        Layer::new().file("b", &shared).file("c", &other).finish(),
        Layer::new().file("copy-of-a", &shared).file("copy-of-c", &other).finish(),
    ]);
    let [first, second, third] = &built.outcomes[..] else {
        panic!("three layers");
    };
    assert_eq!((first.new_chunks, first.reused_chunks), (1, 0));
    assert_eq!((second.new_chunks, second.reused_chunks), (1, 1));
    assert_eq!((third.new_chunks, third.reused_chunks), (0, 2));
    assert_eq!(third.blob, None);
    let second_blob = second.blob.unwrap();
    assert!(second_blob.size < 210_000, "the second blob holds only c: {second_blob:?}");
    assert_eq!(built.image.layers, [first.blob, second.blob, None]);
    assert_eq!(built.bootstrap().blobs().len(), 2);
    assert_eq!(built.bootstrap().chunks().len(), 2);
    assert_eq!(built.read("b"), shared);
    assert_eq!(built.read("copy-of-c"), other);
    assert_eq!(
        built.bootstrap().chunks_of(built.ino("a").unwrap()).unwrap().next().unwrap().index,
        built.bootstrap().chunks_of(built.ino("b").unwrap()).unwrap().next().unwrap().index
    );
}

#[test]
fn large_files_split_into_chunks_that_reassemble() {
    let data = noise(2 * MAX_CHUNK_SIZE as usize + 12_345, 3);
    let built = build(vec![Layer::new().file("big", &data).file("empty", b"").finish()]);
    let bootstrap = built.bootstrap();
    let ino = built.ino("big").unwrap();
    let lens: Vec<u32> = bootstrap.chunks_of(ino).unwrap().map(|c| c.chunk.uncompressed_len).collect();
    assert_eq!(lens, [MAX_CHUNK_SIZE, MAX_CHUNK_SIZE, 12_345]);
    assert_eq!(built.read("big"), data);
    assert_eq!(built.read("empty"), b"");
    let middle: Vec<u64> = bootstrap.chunks_in_range(ino, u64::from(MAX_CHUNK_SIZE) - 1, 2).unwrap().map(|c| c.file_offset).collect();
    assert_eq!(middle, [0, u64::from(MAX_CHUNK_SIZE)]);
}

#[test]
fn chunk_dict_reuses_another_images_chunks() {
    let data = noise(1_500_000, 4);
    let base = build(vec![Layer::new().file("lib/libbig.so", &data).finish()]);
    let base_blob = base.bootstrap().blobs()[0];
    let dict = ChunkDict::from_bootstrap(base.bootstrap());
    assert_eq!(dict.len(), 2);

    let derived = build_with(
        TreeBuilder::default().with_chunk_dict(dict),
        vec![Layer::new().file("opt/copy.so", &data).file("new", b"new data").finish()],
        &[],
        &[&base],
    );
    let outcome = &derived.outcomes[0];
    assert_eq!((outcome.new_chunks, outcome.reused_chunks), (1, 2));
    let blobs = derived.bootstrap().blobs();
    assert_eq!(blobs.len(), 2);
    assert_eq!(blobs[0], base_blob, "the dictionary's blob comes first, as first referenced");
    assert_eq!(derived.read("opt/copy.so"), data);
    assert_eq!(derived.read("new"), b"new data");
}

#[test]
fn chunks_of_deleted_files_leave_the_bootstrap() {
    let built = build(vec![
        Layer::new().file("tmp/huge", &noise(10_000, 5)).finish(),
        Layer::new().whiteout("tmp/", "huge").file("kept", b"kept").finish(),
    ]);
    let bootstrap = built.bootstrap();
    assert_eq!(bootstrap.chunks().len(), 1);
    assert_eq!(bootstrap.blobs(), [built.outcomes[1].blob.unwrap()]);
    assert!(built.image.layers[0].is_some(), "the first layer did write a blob");
    assert_eq!(built.read("kept"), b"kept");
}

#[test]
fn prefetch_paths_become_inodes_and_unknown_ones_warnings() {
    let built = build_with(
        TreeBuilder::default(),
        vec![Layer::new()
            .file("bin/app", b"app")
            .file("etc/b.conf", b"b")
            .file("etc/a.conf", b"a")
            .symlink("etc/link", "a.conf")
            .file("z", b"z")
            .finish()],
        &["/bin/app", "missing/file", "etc", "bin/app", "etc/link", "../z"],
        &[],
    );
    let expected: Vec<u64> = ["bin/app", "etc/a.conf", "etc/b.conf"].iter().map(|path| built.ino(path).unwrap()).collect();
    assert_eq!(built.bootstrap().prefetch().collect::<Vec<_>>(), expected);
    assert_eq!(built.image.warnings.len(), 3, "{:?}", built.image.warnings);
    assert!(built.image.warnings[0].contains("missing/file"));
}

#[test]
fn paths_climbing_out_are_refused() {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = Layer::header(EntryType::Regular, 0o644, 1);
    // The tar crate will not write such a path, so it goes into the header by hand.
    let path = b"a/../../etc/passwd";
    header.as_old_mut().name[..path.len()].copy_from_slice(path);
    header.set_cksum();
    tar.append(&header, &b"x"[..]).unwrap();
    let err = try_build(vec![tar.into_inner().unwrap()]).unwrap_err();
    assert!(matches!(err, BuildError::Entry { layer: 0, .. }), "{err}");
    assert_eq!(split_path(b"./a//b/./").unwrap(), [b"a".to_vec(), b"b".to_vec()]);
    assert!(split_path(b"/").unwrap().is_empty());
}

#[test]
fn truncated_layer_is_a_read_error() {
    let mut layer = Layer::new().file("f", &noise(100_000, 6)).finish();
    layer.truncate(50_000);
    let err = try_build(vec![layer]).unwrap_err();
    assert!(matches!(err, BuildError::Read { layer: 0, .. } | BuildError::Entry { .. }), "{err}");
}

/// Counts the bytes read from the layer so far.
struct CountingReader<'a> {
    inner: &'a [u8],
    consumed: std::rc::Rc<std::cell::Cell<usize>>,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.consumed.set(self.consumed.get() + n);
        Ok(n)
    }
}

/// Records how much of the layer had been read when each blob write happened.
struct RecordingSink {
    consumed: std::rc::Rc<std::cell::Cell<usize>>,
    writes_at: Vec<usize>,
}

impl Write for RecordingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writes_at.push(self.consumed.get());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn chunks_stream_to_the_blob_while_the_layer_is_read() {
    // Chunks are compressed a few at a time on worker threads; more than that many in all.
    let in_flight = super::max_in_flight();
    let chunks = in_flight + 4;
    let data = noise(chunks * MAX_CHUNK_SIZE as usize, 7);
    let layer = Layer::new().file("f", &data).finish();
    let consumed = std::rc::Rc::new(std::cell::Cell::new(0));
    let reader = CountingReader { inner: &layer, consumed: consumed.clone() };
    let mut sink = RecordingSink { consumed: consumed.clone(), writes_at: Vec::new() };
    let mut builder = TreeBuilder::default();
    let outcome = builder.add_layer(&mut tar::Archive::new(reader), &mut sink).unwrap();
    assert_eq!(outcome.new_chunks, chunks as u64);
    assert_eq!(sink.writes_at.len(), chunks);
    assert!(
        sink.writes_at[0] <= (in_flight + 2) * MAX_CHUNK_SIZE as usize,
        "the first chunk was written after {} of {} bytes were read",
        sink.writes_at[0],
        layer.len()
    );
}
