use std::io::{Read as _, Write as _};

use super::codec::{serialize, Section, BLOB_RECORD_LEN, CHUNK_RECORD_LEN, HEADER_LEN, SECTION_ENTRY_LEN};
use super::*;

/// Measures the largest single allocation a piece of code makes on the current thread, so the
/// tests can show that a forged count never turns into a huge allocation.
#[allow(unsafe_code)]
mod alloc_probe {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    struct Probe;

    fn note(size: usize) {
        let _ = LARGEST.try_with(|largest| {
            if size > largest.get() {
                largest.set(size);
            }
        });
    }

    // SAFETY: every call is forwarded unchanged to the system allocator.
    unsafe impl GlobalAlloc for Probe {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            unsafe { System.realloc(ptr, layout, new_size) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static PROBE: Probe = Probe;

    /// Runs `f` and returns the largest allocation it made, in bytes.
    pub fn largest_allocation_during(f: impl FnOnce()) -> usize {
        LARGEST.with(|largest| largest.set(0));
        f();
        LARGEST.with(|largest| largest.get())
    }
}

use alloc_probe::largest_allocation_during;

fn digest(seed: u8) -> [u8; 32] {
    [seed; 32]
}

fn meta(perm: u32, content: InodeContent) -> NewInode {
    NewInode { perm, uid: 1000, gid: 100, mtime: Timestamp { sec: 1_700_000_000, nsec: 123_456_789 }, xattrs: Vec::new(), content }
}

fn entries(list: &[(&str, u64)]) -> Vec<(Vec<u8>, u64)> {
    list.iter().map(|(name, ino)| (name.as_bytes().to_vec(), *ino)).collect()
}

/// A tree with every inode kind, extended attributes and a file with three names.
///
/// ```text
/// 1  /            dir   (xattr)
/// 2  /bin         dir
/// 3  /file        file  2 chunks, also /hard and /bin/again, xattrs
/// 4  /link        symlink -> bin/tool
/// 5  /null        char 1:3
/// 6  /sda         block 8:0
/// 7  /pipe        fifo
/// 8  /sock        socket
/// 9  /empty       file, no chunk
/// 10 /bin/tool    file  1 chunk
/// ```
fn sample_parts() -> BootstrapParts {
    let mut root = meta(
        0o755,
        InodeContent::Directory {
            entries: entries(&[
                ("sock", 8),
                ("bin", 2),
                ("file", 3),
                ("hard", 3),
                ("link", 4),
                ("null", 5),
                ("sda", 6),
                ("pipe", 7),
                ("empty", 9),
            ]),
        },
    );
    root.xattrs = vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())];
    let mut file = meta(0o4755, InodeContent::Regular { chunks: vec![0, 1] });
    file.xattrs =
        vec![(b"user.b".to_vec(), vec![0, 1, 2]), (b"security.capability".to_vec(), vec![1; 20]), (b"user.a".to_vec(), Vec::new())];
    BootstrapParts {
        blobs: vec![Blob { sha256: digest(0xb1), size: 3000 }, Blob { sha256: digest(0xb2), size: 500 }],
        chunks: vec![
            Chunk { digest: digest(1), blob: 0, compressed_offset: 0, compressed_len: 1000, uncompressed_len: MAX_CHUNK_SIZE },
            Chunk { digest: digest(2), blob: 0, compressed_offset: 1000, compressed_len: 2000, uncompressed_len: 4000 },
            Chunk { digest: digest(3), blob: 1, compressed_offset: 0, compressed_len: 500, uncompressed_len: 700 },
        ],
        inodes: vec![
            root,
            meta(0o755, InodeContent::Directory { entries: entries(&[("tool", 10), ("again", 3)]) }),
            file,
            meta(0o777, InodeContent::Symlink { target: b"bin/tool".to_vec() }),
            meta(0o666, InodeContent::CharDevice { rdev: (1 << 8) | 3 }),
            meta(0o660, InodeContent::BlockDevice { rdev: 8 << 8 }),
            meta(0o644, InodeContent::Fifo),
            meta(0o755, InodeContent::Socket),
            meta(0o644, InodeContent::Regular { chunks: Vec::new() }),
            meta(0o755, InodeContent::Regular { chunks: vec![2] }),
        ],
        prefetch: vec![10, 3],
    }
}

fn sample() -> Bootstrap {
    Bootstrap::from_parts(sample_parts()).expect("the sample is valid")
}

fn sample_tables() -> Tables {
    sample().tables
}

fn decode_tables(tables: &Tables) -> Result<Bootstrap, FormatError> {
    Bootstrap::decode_raw(&serialize(tables))
}

/// Overwrites a little-endian u64 at `at` in `raw`.
fn put_u64(raw: &mut [u8], at: usize, value: u64) {
    raw[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// The byte offset of section table entry `kind`'s length field.
fn section_length_field(kind: Section) -> usize {
    HEADER_LEN + SECTION_ENTRY_LEN * (kind as usize - 1) + 16
}

#[test]
fn every_inode_kind_round_trips() {
    let bootstrap = sample();
    let compressed = bootstrap.encode().unwrap();
    let decoded = Bootstrap::decode(&compressed).unwrap();
    assert_eq!(decoded, bootstrap);
    assert_eq!(decoded.encode_raw(), bootstrap.encode_raw());

    let kinds: Vec<(String, FileKind)> =
        decoded.readdir(ROOT_INO).unwrap().map(|entry| (String::from_utf8(entry.name.to_vec()).unwrap(), entry.kind)).collect();
    assert_eq!(
        kinds,
        [
            ("bin", FileKind::Directory),
            ("empty", FileKind::Regular),
            ("file", FileKind::Regular),
            ("hard", FileKind::Regular),
            ("link", FileKind::Symlink),
            ("null", FileKind::CharDevice),
            ("pipe", FileKind::Fifo),
            ("sda", FileKind::BlockDevice),
            ("sock", FileKind::Socket),
        ]
        .map(|(name, kind)| (name.to_string(), kind))
    );
}

#[test]
fn getattr_reports_every_field() {
    let bootstrap = sample();
    let file = bootstrap.getattr(3).unwrap();
    assert_eq!(file.kind, FileKind::Regular);
    assert_eq!(file.perm, 0o4755);
    assert_eq!(file.mode(), 0o104755);
    assert_eq!((file.uid, file.gid), (1000, 100));
    assert_eq!(file.mtime, Timestamp { sec: 1_700_000_000, nsec: 123_456_789 });
    assert_eq!(file.size, u64::from(MAX_CHUNK_SIZE) + 4000);
    assert_eq!(file.nlink, 3, "named /file, /hard and /bin/again");

    let root = bootstrap.getattr(ROOT_INO).unwrap();
    assert_eq!(root.nlink, 3, "2 plus the one subdirectory");
    assert_eq!(root.mode(), 0o040755);
    assert_eq!(bootstrap.getattr(4).unwrap().size, b"bin/tool".len() as u64);
    assert_eq!(bootstrap.getattr(5).unwrap().rdev, (1 << 8) | 3);
    assert_eq!(bootstrap.getattr(6).unwrap().kind, FileKind::BlockDevice);
    assert_eq!(bootstrap.getattr(9).unwrap().size, 0);
    assert_eq!(bootstrap.getattr(0), None);
    assert_eq!(bootstrap.getattr(11), None);
    assert_eq!(bootstrap.getattr(u64::MAX), None);
}

#[test]
fn lookup_finds_entries_and_hard_links_share_an_inode() {
    let bootstrap = sample();
    assert_eq!(bootstrap.lookup(ROOT_INO, b"file"), Some(3));
    assert_eq!(bootstrap.lookup(ROOT_INO, b"hard"), Some(3));
    assert_eq!(bootstrap.lookup(2, b"again"), Some(3));
    assert_eq!(bootstrap.lookup(ROOT_INO, b"nope"), None);
    assert_eq!(bootstrap.lookup(ROOT_INO, b""), None);
    assert_eq!(bootstrap.lookup(3, b"file"), None, "a file has no entries");
    assert_eq!(bootstrap.resolve(b"/bin/tool"), Some(10));
    assert_eq!(bootstrap.resolve(b""), Some(ROOT_INO));
    assert_eq!(bootstrap.resolve(b"link/tool"), None, "symlinks are not followed");
    assert_eq!(bootstrap.parent(2), Some(ROOT_INO));
    assert_eq!(bootstrap.parent(ROOT_INO), Some(ROOT_INO));
    assert_eq!(bootstrap.parent(3), None);
}

#[test]
fn readdir_can_resume_at_an_offset() {
    let bootstrap = sample();
    let mut entries = bootstrap.readdir(ROOT_INO).unwrap();
    assert_eq!(entries.size_hint(), (9, Some(9)));
    assert_eq!(entries.nth(4).unwrap().name, b"link");
    assert_eq!(entries.next().unwrap().name, b"null");
    assert!(bootstrap.readdir(3).is_none());
}

#[test]
fn readlink_and_xattrs() {
    let bootstrap = sample();
    assert_eq!(bootstrap.readlink(4), Some(&b"bin/tool"[..]));
    assert_eq!(bootstrap.readlink(3), None);
    let names: Vec<&[u8]> = bootstrap.xattrs(3).unwrap().map(|(name, _)| name).collect();
    assert_eq!(names, [&b"security.capability"[..], b"user.a", b"user.b"]);
    assert_eq!(bootstrap.xattr(3, b"user.b"), Some(&[0u8, 1, 2][..]));
    assert_eq!(bootstrap.xattr(3, b"user.a"), Some(&[][..]));
    assert_eq!(bootstrap.xattr(3, b"user.c"), None);
    assert_eq!(bootstrap.xattr(ROOT_INO, b"trusted.overlay.opaque"), Some(&b"y"[..]));
    assert_eq!(bootstrap.xattrs(5).unwrap().count(), 0);
}

#[test]
fn chunks_cover_files_and_ranges() {
    let bootstrap = sample();
    let all: Vec<(u64, u32)> = bootstrap.chunks_of(3).unwrap().map(|c| (c.file_offset, c.index)).collect();
    let mib = u64::from(MAX_CHUNK_SIZE);
    assert_eq!(all, [(0, 0), (mib, 1)]);
    let range = |offset, len| -> Vec<u32> { bootstrap.chunks_in_range(3, offset, len).unwrap().map(|c| c.index).collect() };
    assert_eq!(range(0, 1), [0]);
    assert_eq!(range(mib - 1, 1), [0]);
    assert_eq!(range(mib - 1, 2), [0, 1]);
    assert_eq!(range(mib, 10), [1]);
    assert_eq!(range(0, u64::MAX), [0, 1]);
    assert_eq!(range(mib + 4000, 1), Vec::<u32>::new(), "past the end");
    assert_eq!(range(5, 0), Vec::<u32>::new(), "empty range");
    assert_eq!(range(u64::MAX, u64::MAX), Vec::<u32>::new());
    assert_eq!(bootstrap.chunks_of(9).unwrap().count(), 0);
    assert!(bootstrap.chunks_of(2).is_none());
    assert_eq!(bootstrap.prefetch().collect::<Vec<_>>(), [10, 3]);
    assert_eq!(bootstrap.blobs()[1].digest(), format!("sha256:{}", "b2".repeat(32)));
}

#[test]
fn every_truncation_is_rejected() {
    let raw = sample().encode_raw();
    for len in 0..raw.len() {
        assert!(Bootstrap::decode_raw(&raw[..len]).is_err(), "a {len}-byte prefix decoded");
    }
    let mut longer = raw.clone();
    longer.push(0);
    assert!(matches!(Bootstrap::decode_raw(&longer), Err(FormatError::SectionTable(_))));
}

#[test]
fn wrong_magic_is_rejected() {
    let mut raw = sample().encode_raw();
    raw[0] = b'X';
    assert!(matches!(Bootstrap::decode_raw(&raw), Err(FormatError::BadMagic { .. })));
}

#[test]
fn other_versions_are_rejected() {
    for version in [0u32, 2, u32::MAX] {
        let mut raw = sample().encode_raw();
        raw[8..12].copy_from_slice(&version.to_le_bytes());
        let err = Bootstrap::decode_raw(&raw).unwrap_err();
        assert!(matches!(err, FormatError::UnsupportedVersion { found } if found == version), "{err}");
    }
}

#[test]
fn malformed_section_tables_are_rejected() {
    let base = sample().encode_raw();
    let mut wrong_count = base.clone();
    wrong_count[12..16].copy_from_slice(&9u32.to_le_bytes());
    let mut wrong_kind = base.clone();
    wrong_kind[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&2u32.to_le_bytes());
    let mut reserved = base.clone();
    reserved[HEADER_LEN + 4] = 1;
    let mut gap = base.clone();
    let heap_offset = HEADER_LEN + SECTION_ENTRY_LEN * 7 + 8;
    let offset = u64::from_le_bytes(gap[heap_offset..heap_offset + 8].try_into().unwrap());
    put_u64(&mut gap, heap_offset, offset + 1);
    let mut partial_record = base.clone();
    let field = section_length_field(Section::Inodes);
    let len = u64::from_le_bytes(partial_record[field..field + 8].try_into().unwrap());
    put_u64(&mut partial_record, field, len - 1);
    for (what, raw) in
        [("count", wrong_count), ("kind", wrong_kind), ("reserved", reserved), ("gap", gap), ("partial record", partial_record)]
    {
        assert!(Bootstrap::decode_raw(&raw).is_err(), "{what} accepted");
    }
}

#[test]
fn oversize_counts_fail_without_a_huge_allocation() {
    let base = sample().encode_raw();
    let mut huge_section = base.clone();
    put_u64(&mut huge_section, section_length_field(Section::Inodes), 64 << 40);
    let mut overflowing_section = base.clone();
    put_u64(&mut overflowing_section, section_length_field(Section::Chunks), u64::MAX / 56 * 56);
    let largest = largest_allocation_during(|| {
        for raw in [&huge_section, &overflowing_section] {
            assert!(matches!(Bootstrap::decode_raw(raw), Err(FormatError::Truncated { .. })));
        }
    });
    assert!(largest < 64 << 10, "largest allocation {largest} bytes");

    let mut t = sample_tables();
    t.inodes[1].data_len = u32::MAX;
    let raw = serialize(&t);
    let largest = largest_allocation_during(|| {
        let err = Bootstrap::decode_raw(&raw).unwrap_err();
        assert!(matches!(err, FormatError::Inode { ino: 2, .. }), "{err}");
    });
    assert!(largest < 64 << 10, "largest allocation {largest} bytes");

    let mut t = sample_tables();
    t.inodes[0].xattr_count = u32::MAX;
    assert!(decode_tables(&t).is_err());
}

/// A change that breaks one rule of the format.
type Mutation = Box<dyn Fn(&mut Tables)>;

#[test]
fn out_of_range_indices_are_rejected() {
    let cases: Vec<(&str, Mutation)> = vec![
        ("chunk blob", Box::new(|t| t.chunks[0].blob = 2)),
        ("chunk reference", Box::new(|t| t.chunk_refs[0] = 3)),
        ("dirent inode past the end", Box::new(|t| t.dirents[0].ino = 11)),
        ("dirent inode 0", Box::new(|t| t.dirents[0].ino = 0)),
        ("dirent naming the root", Box::new(|t| t.dirents[0].ino = 1)),
        ("dirent name outside heap", Box::new(|t| t.dirents[0].name.offset = u64::MAX - 1)),
        ("xattr value outside heap", Box::new(|t| t.xattrs[0].value.len = u32::MAX)),
        ("symlink target outside heap", Box::new(|t| t.inodes[3].data_start = 1 << 40)),
        ("prefetch inode", Box::new(|t| t.prefetch[0] = 11)),
        ("prefetch inode 0", Box::new(|t| t.prefetch[0] = 0)),
        ("chunk past its blob", Box::new(|t| t.chunks[1].compressed_offset = 1001)),
        ("chunk offset overflow", Box::new(|t| t.chunks[1].compressed_offset = u64::MAX)),
        ("range not in inode order", Box::new(|t| t.inodes[1].data_start += 1)),
    ];
    for (what, mutate) in cases {
        let mut t = sample_tables();
        mutate(&mut t);
        assert!(decode_tables(&t).is_err(), "{what} accepted");
    }
}

#[test]
fn broken_inode_fields_are_rejected() {
    let cases: Vec<(&str, Mutation)> = vec![
        ("file type bits in mode", Box::new(|t| t.inodes[2].perm |= 0o100000)),
        ("nanoseconds", Box::new(|t| t.inodes[2].mtime.nsec = 1_000_000_000)),
        ("size differs from chunks", Box::new(|t| t.inodes[2].size += 1)),
        ("directory with a size", Box::new(|t| t.inodes[1].size = 4096)),
        ("rdev on a file", Box::new(|t| t.inodes[2].rdev = 1)),
        ("fifo with data", Box::new(|t| t.inodes[6].data_len = 1)),
        ("root not a directory", Box::new(|t| t.inodes[0].kind = FileKind::Fifo)),
        ("chunk of zero bytes", Box::new(|t| t.chunks[2].uncompressed_len = 0)),
        ("chunk over 1 MiB", Box::new(|t| t.chunks[0].uncompressed_len = MAX_CHUNK_SIZE + 1)),
        ("compressed chunk too long", Box::new(|t| t.chunks[0].compressed_len = MAX_COMPRESSED_CHUNK_SIZE + 1)),
        ("repeated chunk digest", Box::new(|t| t.chunks[2].digest = t.chunks[0].digest)),
        ("repeated blob", Box::new(|t| t.blobs[1].sha256 = t.blobs[0].sha256)),
        ("prefetch of a directory", Box::new(|t| t.prefetch[0] = 2)),
        ("prefetch twice", Box::new(|t| t.prefetch[1] = t.prefetch[0])),
        ("empty symlink target", Box::new(|t| t.inodes[3].data_len = 0)),
        ("orphan inode", Box::new(|t| t.dirents[1].ino = 10)),
    ];
    for (what, mutate) in cases {
        let mut t = sample_tables();
        mutate(&mut t);
        assert!(decode_tables(&t).is_err(), "{what} accepted");
    }
}

#[test]
fn unknown_file_kind_and_reserved_bytes_are_rejected() {
    let raw = sample().encode_raw();
    let inodes_at = HEADER_LEN + SECTION_ENTRY_LEN * 8 + BLOB_RECORD_LEN * 2 + CHUNK_RECORD_LEN * 3;
    let mut kind = raw.clone();
    kind[inodes_at] = 8;
    let mut reserved = raw.clone();
    reserved[inodes_at + 1] = 1;
    let mut chunk_reserved = raw.clone();
    chunk_reserved[inodes_at - 1] = 1;
    for raw in [kind, reserved, chunk_reserved] {
        assert!(Bootstrap::decode_raw(&raw).is_err());
    }
}

/// Puts `name` in the heap and points the first root entry at it.
fn rename_first_entry(t: &mut Tables, name: &[u8]) {
    let at = HeapRef { offset: t.heap.len() as u64, len: name.len() as u32 };
    t.heap.extend_from_slice(name);
    t.dirents[0].name = at;
}

#[test]
fn invalid_names_are_rejected() {
    for name in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[b'x'; 256]] {
        let mut t = sample_tables();
        rename_first_entry(&mut t, name);
        let err = decode_tables(&t).unwrap_err();
        assert!(matches!(err, FormatError::Inode { ino: 1, .. }), "{name:?}: {err}");
    }
    let mut t = sample_tables();
    rename_first_entry(&mut t, &[b'a'; 255]);
    assert!(decode_tables(&t).is_ok(), "a 255-byte name is valid");
}

#[test]
fn unsorted_or_repeated_dirents_are_rejected() {
    let mut t = sample_tables();
    t.dirents.swap(0, 1);
    assert!(decode_tables(&t).is_err());
    let mut t = sample_tables();
    t.dirents[1].name = t.dirents[0].name;
    assert!(decode_tables(&t).is_err());
    let mut t = sample_tables();
    let start = t.xattrs.len() - 1;
    t.xattrs.swap(start, start - 1);
    assert!(decode_tables(&t).is_err(), "unsorted xattrs");
}

/// Appends directory inodes whose entries (one each, named "d") point at `targets`.
fn add_dirs(t: &mut Tables, targets: &[u32]) {
    let name = HeapRef { offset: t.heap.len() as u64, len: 1 };
    t.heap.push(b'd');
    for &target in targets {
        let dir = InodeRecord {
            kind: FileKind::Directory,
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            data_start: t.dirents.len() as u64,
            data_len: 1,
            size: 0,
            rdev: 0,
            xattr_start: t.xattrs.len() as u32,
            xattr_count: 0,
        };
        t.inodes.push(dir);
        t.dirents.push(DirentRecord { name, ino: target });
    }
}

#[test]
fn directory_cycles_are_rejected() {
    let mut two = sample_tables();
    add_dirs(&mut two, &[12, 11]);
    assert!(matches!(decode_tables(&two), Err(FormatError::Tree(_))));

    let mut itself = sample_tables();
    add_dirs(&mut itself, &[11]);
    assert!(matches!(decode_tables(&itself), Err(FormatError::Tree(_))));

    let mut through_root_child = sample_tables();
    add_dirs(&mut through_root_child, &[2]);
    let err = decode_tables(&through_root_child).unwrap_err();
    assert!(matches!(err, FormatError::Inode { .. }), "a second entry naming /bin: {err}");
}

#[test]
fn decompression_bombs_are_refused() {
    let limit = 1 << 20;
    let zeros = vec![0u8; 64 << 20];

    let declared = zstd::bulk::compress(&zeros, 1).unwrap();
    assert!(matches!(Bootstrap::decode_with_limit(&declared, limit), Err(FormatError::TooLarge { .. })));

    let mut undeclared = Vec::new();
    let mut encoder = zstd::stream::write::Encoder::new(&mut undeclared, 1).unwrap();
    encoder.include_contentsize(false).unwrap();
    encoder.write_all(&zeros).unwrap();
    encoder.finish().unwrap();
    drop(zeros);
    let largest = largest_allocation_during(|| {
        assert!(matches!(Bootstrap::decode_with_limit(&undeclared, limit), Err(FormatError::TooLarge { .. })));
    });
    assert!(largest <= 4 * limit, "largest allocation {largest} bytes");
}

#[test]
fn default_limit_refuses_a_declared_giant_without_decompressing() {
    let mut compressed = Vec::new();
    let mut encoder = zstd::stream::write::Encoder::new(&mut compressed, 1).unwrap();
    let size = DEFAULT_MAX_DECOMPRESSED_SIZE as u64 + 1;
    encoder.set_pledged_src_size(Some(size)).unwrap();
    std::io::copy(&mut std::io::repeat(0).take(size), &mut encoder).unwrap();
    encoder.finish().unwrap();
    let largest = largest_allocation_during(|| {
        assert!(matches!(Bootstrap::decode(&compressed), Err(FormatError::TooLarge { .. })));
    });
    assert!(largest < 1 << 20, "largest allocation {largest} bytes");
}

#[test]
fn garbage_and_trailing_bytes_are_not_a_bootstrap() {
    assert!(matches!(Bootstrap::decode(b"not zstd at all"), Err(FormatError::Decompress(_))));
    let mut compressed = sample().encode().unwrap();
    compressed.extend_from_slice(b"trailing");
    assert!(Bootstrap::decode(&compressed).is_err());
    assert!(Bootstrap::decode(&[]).is_err());
}

#[test]
fn from_parts_checks_like_decode() {
    let mut parts = sample_parts();
    parts.inodes[1].content = InodeContent::Directory { entries: entries(&[("same", 10), ("same", 3)]) };
    assert!(Bootstrap::from_parts(parts).is_err());

    let mut parts = sample_parts();
    parts.prefetch.push(1 << 40);
    assert!(Bootstrap::from_parts(parts).is_err());

    let mut parts = sample_parts();
    parts.inodes[2].xattrs.push((b"user.a".to_vec(), b"again".to_vec()));
    assert!(Bootstrap::from_parts(parts).is_err(), "repeated xattr name");
}

#[test]
fn minimal_bootstrap_is_an_empty_root() {
    let bootstrap = Bootstrap::from_parts(BootstrapParts {
        inodes: vec![meta(0o755, InodeContent::Directory { entries: Vec::new() })],
        ..BootstrapParts::default()
    })
    .unwrap();
    let decoded = Bootstrap::decode(&bootstrap.encode().unwrap()).unwrap();
    assert_eq!(decoded.inode_count(), 1);
    assert_eq!(decoded.readdir(ROOT_INO).unwrap().count(), 0);
    assert_eq!(decoded.getattr(ROOT_INO).unwrap().nlink, 2);
    assert!(Bootstrap::from_parts(BootstrapParts::default()).is_err(), "no root");
}

/// The fuzz targets' seed corpus: the sample tree and an empty root, raw and compressed.
fn fuzz_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let empty = Bootstrap::from_parts(BootstrapParts {
        inodes: vec![meta(0o755, InodeContent::Directory { entries: Vec::new() })],
        ..BootstrapParts::default()
    })
    .unwrap();
    let mut seeds = Vec::new();
    for (name, bootstrap) in [("sample", sample()), ("empty-root", empty)] {
        seeds.push(("bootstrap_decode_raw", name, bootstrap.encode_raw()));
        seeds.push(("bootstrap_decode", name, bootstrap.encode().unwrap()));
    }
    seeds
}

fn fuzz_seed_path(target: &str, name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target).join(name)
}

#[test]
#[ignore = "rewrites fuse/fuzz/seeds; run by hand after changing the format"]
fn write_fuzz_seeds() {
    for (target, name, bytes) in fuzz_seeds() {
        let path = fuzz_seed_path(target, name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

#[test]
fn fuzz_seeds_are_current_bootstraps() {
    for (target, name, bytes) in fuzz_seeds() {
        let path = fuzz_seed_path(target, name);
        let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run the write_fuzz_seeds test)", path.display()));
        if target == "bootstrap_decode_raw" {
            assert_eq!(stored, bytes, "{} is stale (run the write_fuzz_seeds test)", path.display());
        } else {
            assert!(Bootstrap::decode(&stored).is_ok(), "{} does not decode", path.display());
        }
    }
}
