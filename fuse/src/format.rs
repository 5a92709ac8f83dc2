//! The bootstrap, format version 1: an image's merged file tree with every regular file's chunk list.
//!
//! A bootstrap is the metadata half of a chunked image: every inode of the merged layers, the
//! directory entries naming them, and for regular files the chunks (in the chunk blobs) holding
//! their data. The filesystem answers `lookup`, `getattr`, `readdir`, `readlink` and `getxattr`
//! from it without touching the network, and maps a read to the chunks covering it.
//!
//! This module is sans-IO: it turns bytes into a [`Bootstrap`] and back. The byte layout is
//! specified in `fuse/FORMAT.md`; [`Bootstrap::decode`] checks every rule listed there, so a
//! bootstrap that decodes is safe to serve (no dangling index, no cycle, no overflowing offset).

use std::fmt;
use std::io;

use thiserror::Error;

use codec::Section;

mod codec;
mod validate;

/// The eight bytes every decompressed bootstrap starts with.
pub const MAGIC: [u8; 8] = *b"SHOALBS\0";

/// The bootstrap format version this module reads and writes.
pub const VERSION: u32 = 1;

/// The inode number of the root directory.
pub const ROOT_INO: u64 = 1;

/// The largest uncompressed chunk, in bytes (1 MiB).
pub const MAX_CHUNK_SIZE: u32 = 1 << 20;

/// The largest compressed chunk, in bytes: a chunk that does not compress may grow a little.
pub const MAX_COMPRESSED_CHUNK_SIZE: u32 = MAX_CHUNK_SIZE + MAX_CHUNK_SIZE / 8;

/// The decompressed size [`Bootstrap::decode`] accepts (512 MiB).
pub const DEFAULT_MAX_DECOMPRESSED_SIZE: usize = 512 << 20;

/// The longest file name, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// The longest symlink target, in bytes (Linux `PATH_MAX` less the terminating NUL).
pub const MAX_SYMLINK_TARGET_LEN: usize = 4095;

/// The longest extended attribute name, in bytes (Linux `XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME_LEN: usize = 255;

/// The largest extended attribute value, in bytes (Linux `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE_LEN: usize = 65536;

/// The zstd level the bootstrap is compressed with.
const COMPRESSION_LEVEL: i32 = 9;

/// Why a bootstrap could not be decoded or assembled.
#[derive(Debug, Error)]
pub enum FormatError {
    /// The compressed bytes are not a zstd stream.
    #[error("bootstrap is not a valid zstd stream ({0}); the blob is corrupt or not a bootstrap")]
    Decompress(#[source] io::Error),
    /// The bootstrap decompresses to more bytes than the caller allows.
    #[error("bootstrap decompresses to more than {limit} bytes; refused as a possible decompression bomb (raise the limit only for an image you trust)")]
    TooLarge {
        /// The limit that was exceeded, in bytes.
        limit: usize,
    },
    /// The data ends before a structure it declares.
    #[error("bootstrap is truncated: the {what} needs {need} bytes, {have} are present")]
    Truncated {
        /// The structure that does not fit.
        what: &'static str,
        /// Bytes the structure needs.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// The data does not start with [`MAGIC`].
    #[error("not a Shoal bootstrap: magic is {found:02x?}, expected \"SHOALBS\\0\"")]
    BadMagic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// The data is a bootstrap of another format version.
    #[error("bootstrap format version {found} is not supported (this Shoal reads version {VERSION}; rebuild the image or upgrade Shoal)")]
    UnsupportedVersion {
        /// The version found in the header.
        found: u32,
    },
    /// The section table is malformed.
    #[error("bootstrap section table: {0}")]
    SectionTable(String),
    /// A record of a table breaks a rule of the format.
    #[error("bootstrap {table} record {index}: {reason}")]
    Record {
        /// The table holding the record.
        table: &'static str,
        /// The record's position in its table.
        index: u64,
        /// The rule it breaks.
        reason: String,
    },
    /// An inode breaks a rule of the format.
    #[error("bootstrap inode {ino}: {reason}")]
    Inode {
        /// The inode number.
        ino: u64,
        /// The rule it breaks.
        reason: String,
    },
    /// The directory structure is not a tree rooted at inode 1.
    #[error("bootstrap tree: {0}")]
    Tree(String),
}

fn record_error(section: Section, index: usize, reason: impl Into<String>) -> FormatError {
    FormatError::Record { table: section.name(), index: index as u64, reason: reason.into() }
}

fn inode_error(index: usize, reason: impl Into<String>) -> FormatError {
    FormatError::Inode { ino: index as u64 + 1, reason: reason.into() }
}

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A regular file, whose data lives in chunks.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix domain socket.
    Socket,
}

impl FileKind {
    fn code(self) -> u8 {
        match self {
            FileKind::Regular => 1,
            FileKind::Directory => 2,
            FileKind::Symlink => 3,
            FileKind::CharDevice => 4,
            FileKind::BlockDevice => 5,
            FileKind::Fifo => 6,
            FileKind::Socket => 7,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => FileKind::Regular,
            2 => FileKind::Directory,
            3 => FileKind::Symlink,
            4 => FileKind::CharDevice,
            5 => FileKind::BlockDevice,
            6 => FileKind::Fifo,
            7 => FileKind::Socket,
            _ => return None,
        })
    }

    /// The `S_IFMT` bits of `st_mode` for this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            FileKind::Regular => 0o100000,
            FileKind::Directory => 0o040000,
            FileKind::Symlink => 0o120000,
            FileKind::CharDevice => 0o020000,
            FileKind::BlockDevice => 0o060000,
            FileKind::Fifo => 0o010000,
            FileKind::Socket => 0o140000,
        }
    }
}

/// A modification time: seconds since the Unix epoch and nanoseconds within the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    /// Whole seconds since 1970-01-01T00:00:00Z (negative before it).
    pub sec: i64,
    /// Nanoseconds, below 1,000,000,000.
    pub nsec: u32,
}

/// A chunk blob: one image layer holding compressed chunks.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Blob {
    /// The sha256 of the blob's bytes; the blob's OCI digest is `sha256:<hex of this>`.
    pub sha256: [u8; 32],
    /// The blob's size in bytes.
    pub size: u64,
}

impl Blob {
    /// The blob's OCI digest, `sha256:<64 hex digits>`.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.sha256))
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blob").field("digest", &self.digest()).field("size", &self.size).finish()
    }
}

/// A chunk: up to [`MAX_CHUNK_SIZE`] bytes of file data, stored compressed in a chunk blob.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    /// The blake3 digest of the uncompressed data.
    pub digest: [u8; 32],
    /// The index, in the blob table, of the chunk blob holding the chunk.
    pub blob: u32,
    /// Where the chunk's zstd frame starts in the blob.
    pub compressed_offset: u64,
    /// The length of the chunk's zstd frame.
    pub compressed_len: u32,
    /// The length of the uncompressed data.
    pub uncompressed_len: u32,
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunk")
            .field("digest", &hex::encode(self.digest))
            .field("blob", &self.blob)
            .field("compressed_offset", &self.compressed_offset)
            .field("compressed_len", &self.compressed_len)
            .field("uncompressed_len", &self.uncompressed_len)
            .finish()
    }
}

/// An inode's attributes, as `getattr` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// The inode number.
    pub ino: u64,
    /// What the inode is.
    pub kind: FileKind,
    /// Permission bits, including set-uid, set-gid and sticky (`mode & 0o7777`).
    pub perm: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time.
    pub mtime: Timestamp,
    /// Size in bytes: the data length of a regular file, the target length of a symlink, else 0.
    pub size: u64,
    /// Link count: directory entries naming the inode, or for a directory 2 plus its subdirectories.
    pub nlink: u32,
    /// Device number (Linux `dev_t` encoding) of a character or block device, else 0.
    pub rdev: u64,
}

impl Attr {
    /// The full `st_mode`: file type bits and permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.type_bits() | self.perm
    }
}

/// An entry of a directory, as `readdir` yields it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    /// The entry's name.
    pub name: &'a [u8],
    /// The inode it names.
    pub ino: u64,
    /// What that inode is.
    pub kind: FileKind,
}

/// One chunk of a regular file, placed in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileChunk<'a> {
    /// Where the chunk's data starts in the file.
    pub file_offset: u64,
    /// The chunk's index in the chunk table.
    pub index: u32,
    /// The chunk.
    pub chunk: &'a Chunk,
}

/// What an inode holds, by kind, when assembling a bootstrap with [`Bootstrap::from_parts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InodeContent {
    /// A regular file made of these chunks (indices into the chunk table), in order.
    Regular {
        /// Chunk table indices, in file order.
        chunks: Vec<u32>,
    },
    /// A directory with these entries (name, inode number), in any order.
    Directory {
        /// The entries; they are sorted by name when the bootstrap is assembled.
        entries: Vec<(Vec<u8>, u64)>,
    },
    /// A symbolic link.
    Symlink {
        /// Where the link points.
        target: Vec<u8>,
    },
    /// A character device.
    CharDevice {
        /// The device number (Linux `dev_t` encoding).
        rdev: u64,
    },
    /// A block device.
    BlockDevice {
        /// The device number (Linux `dev_t` encoding).
        rdev: u64,
    },
    /// A named pipe.
    Fifo,
    /// A Unix domain socket.
    Socket,
}

/// An inode to assemble into a bootstrap with [`Bootstrap::from_parts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInode {
    /// Permission bits (`mode & 0o7777`).
    pub perm: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time.
    pub mtime: Timestamp,
    /// Extended attributes (name, value), in any order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// What the inode is and holds.
    pub content: InodeContent,
}

/// Everything a bootstrap is made of, for [`Bootstrap::from_parts`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootstrapParts {
    /// The chunk blobs.
    pub blobs: Vec<Blob>,
    /// The chunk table.
    pub chunks: Vec<Chunk>,
    /// The inodes; the first is the root directory (inode 1), the n-th is inode n.
    pub inodes: Vec<NewInode>,
    /// Regular files to fetch first, as inode numbers, in order.
    pub prefetch: Vec<u64>,
}

/// A run of bytes in the heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct HeapRef {
    /// Where the bytes start, from the start of the heap.
    offset: u64,
    /// How many bytes.
    len: u32,
}

/// An inode record as stored (`FORMAT.md` section 4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
struct InodeRecord {
    /// What the inode is.
    kind: FileKind,
    /// Permission bits (`mode & 0o7777`).
    perm: u32,
    /// Owner user id.
    uid: u32,
    /// Owner group id.
    gid: u32,
    /// Modification time.
    mtime: Timestamp,
    /// Regular: first chunk reference; directory: first entry; symlink: heap offset of the target.
    data_start: u64,
    /// Regular: chunk reference count; directory: entry count; symlink: target length.
    data_len: u32,
    /// Regular: data length; symlink: target length; others: 0.
    size: u64,
    /// Device number of a device, else 0.
    rdev: u64,
    /// First record of the inode's extended attributes in the xattr table.
    xattr_start: u32,
    /// How many extended attribute records the inode has.
    xattr_count: u32,
}

/// A directory entry record as stored (`FORMAT.md` section 4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirentRecord {
    /// The entry's name, in the heap.
    name: HeapRef,
    /// The inode it names.
    ino: u32,
}

/// An extended attribute record as stored (`FORMAT.md` section 4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct XattrRecord {
    /// The attribute's name, in the heap.
    name: HeapRef,
    /// The attribute's value, in the heap.
    value: HeapRef,
}

/// The tables exactly as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Tables {
    /// The blob table.
    blobs: Vec<Blob>,
    /// The chunk table.
    chunks: Vec<Chunk>,
    /// The inode table; inode n is at index n - 1.
    inodes: Vec<InodeRecord>,
    /// The directory entry table.
    dirents: Vec<DirentRecord>,
    /// The xattr table.
    xattrs: Vec<XattrRecord>,
    /// The chunk reference table: chunk indices of regular files, in inode order.
    chunk_refs: Vec<u32>,
    /// The prefetch table: inode numbers.
    prefetch: Vec<u32>,
    /// Names, symlink targets and xattr names and values.
    heap: Vec<u8>,
}

/// What validation learns about the tables and the filesystem needs at hand.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Derived {
    /// Link count per inode (index = ino - 1).
    nlink: Vec<u32>,
    /// Parent directory per directory inode (the root is its own parent); 0 for other kinds.
    parent: Vec<u32>,
    /// File offset at which each chunk reference's data starts.
    ref_offsets: Vec<u64>,
}

/// A decoded, validated bootstrap: the merged file tree of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    /// The tables as stored.
    tables: Tables,
    /// What the filesystem needs that the tables imply.
    derived: Derived,
}

impl Bootstrap {
    /// Decodes a compressed bootstrap, refusing one that decompresses to more than
    /// [`DEFAULT_MAX_DECOMPRESSED_SIZE`] bytes.
    pub fn decode(compressed: &[u8]) -> Result<Self, FormatError> {
        Self::decode_with_limit(compressed, DEFAULT_MAX_DECOMPRESSED_SIZE)
    }

    /// Decodes a compressed bootstrap, refusing one that decompresses to more than
    /// `max_decompressed` bytes.
    pub fn decode_with_limit(compressed: &[u8], max_decompressed: usize) -> Result<Self, FormatError> {
        let raw = codec::decompress(compressed, max_decompressed)?;
        Self::decode_raw(&raw)
    }

    /// Decodes an uncompressed bootstrap and checks every rule of the format.
    pub fn decode_raw(raw: &[u8]) -> Result<Self, FormatError> {
        let tables = codec::parse(raw)?;
        let derived = validate::validate(&tables)?;
        Ok(Bootstrap { tables, derived })
    }

    /// Encodes the bootstrap and compresses it with zstd, ready to store as the bootstrap layer.
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        zstd::bulk::compress(&self.encode_raw(), COMPRESSION_LEVEL)
    }

    /// Encodes the bootstrap without compressing it.
    pub fn encode_raw(&self) -> Vec<u8> {
        codec::serialize(&self.tables)
    }

    /// Assembles a bootstrap from its parts, checking it exactly as [`Bootstrap::decode`] does.
    pub fn from_parts(parts: BootstrapParts) -> Result<Self, FormatError> {
        let tables = codec::lay_out(parts)?;
        let derived = validate::validate(&tables)?;
        Ok(Bootstrap { tables, derived })
    }

    /// The root directory's inode number.
    pub fn root(&self) -> u64 {
        ROOT_INO
    }

    /// How many inodes the tree has; inode numbers run from 1 to this.
    pub fn inode_count(&self) -> u64 {
        self.tables.inodes.len() as u64
    }

    /// The chunk blobs, in blob table order.
    pub fn blobs(&self) -> &[Blob] {
        &self.tables.blobs
    }

    /// The chunk table.
    pub fn chunks(&self) -> &[Chunk] {
        &self.tables.chunks
    }

    /// The regular files to fetch first, as inode numbers, in order.
    pub fn prefetch(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        self.tables.prefetch.iter().map(|&ino| u64::from(ino))
    }

    fn index_of(&self, ino: u64) -> Option<usize> {
        let index = usize::try_from(ino.checked_sub(1)?).ok()?;
        (index < self.tables.inodes.len()).then_some(index)
    }

    fn record(&self, ino: u64) -> Option<&InodeRecord> {
        self.tables.inodes.get(self.index_of(ino)?)
    }

    /// The attributes of inode `ino`, or `None` if there is no such inode.
    pub fn getattr(&self, ino: u64) -> Option<Attr> {
        let index = self.index_of(ino)?;
        let record = self.tables.inodes.get(index)?;
        Some(Attr {
            ino,
            kind: record.kind,
            perm: record.perm,
            uid: record.uid,
            gid: record.gid,
            mtime: record.mtime,
            size: record.size,
            nlink: self.derived.nlink.get(index).copied().unwrap_or(1),
            rdev: record.rdev,
        })
    }

    /// The parent directory of directory `ino` (the root is its own parent), or `None` if `ino`
    /// is not a directory.
    pub fn parent(&self, ino: u64) -> Option<u64> {
        let parent = *self.derived.parent.get(self.index_of(ino)?)?;
        (parent != 0).then_some(u64::from(parent))
    }

    fn dirents_of(&self, ino: u64) -> Option<&[DirentRecord]> {
        let record = self.record(ino)?;
        if record.kind != FileKind::Directory {
            return None;
        }
        let start = usize::try_from(record.data_start).ok()?;
        let end = start.checked_add(record.data_len as usize)?;
        self.tables.dirents.get(start..end)
    }

    /// The inode named `name` in directory `parent`, or `None` if `parent` is not a directory or
    /// has no such entry. `"."` and `".."` are not entries; see [`Bootstrap::parent`].
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let entries = self.dirents_of(parent)?;
        let heap = &self.tables.heap;
        let found = entries.binary_search_by(|entry| heap_bytes(heap, entry.name).unwrap_or_default().cmp(name)).ok()?;
        entries.get(found).map(|entry| u64::from(entry.ino))
    }

    /// The entries of directory `ino` sorted by name (without `"."` and `".."`), or `None` if it
    /// is not a directory.
    pub fn readdir(&self, ino: u64) -> Option<ReadDir<'_>> {
        Some(ReadDir { entries: self.dirents_of(ino)?.iter(), bootstrap: self })
    }

    /// The target of symlink `ino`, or `None` if it is not a symlink.
    pub fn readlink(&self, ino: u64) -> Option<&[u8]> {
        let record = self.record(ino)?;
        if record.kind != FileKind::Symlink {
            return None;
        }
        heap_bytes(&self.tables.heap, HeapRef { offset: record.data_start, len: record.data_len })
    }

    fn xattr_records(&self, ino: u64) -> Option<&[XattrRecord]> {
        let record = self.record(ino)?;
        let start = record.xattr_start as usize;
        let end = start.checked_add(record.xattr_count as usize)?;
        self.tables.xattrs.get(start..end)
    }

    /// The extended attributes of inode `ino` sorted by name, or `None` if there is no such inode.
    pub fn xattrs(&self, ino: u64) -> Option<Xattrs<'_>> {
        Some(Xattrs { records: self.xattr_records(ino)?.iter(), heap: &self.tables.heap })
    }

    /// The value of extended attribute `name` of inode `ino`, if it has it.
    pub fn xattr(&self, ino: u64, name: &[u8]) -> Option<&[u8]> {
        let records = self.xattr_records(ino)?;
        let heap = &self.tables.heap;
        let found = records.binary_search_by(|record| heap_bytes(heap, record.name).unwrap_or_default().cmp(name)).ok()?;
        heap_bytes(heap, records.get(found)?.value)
    }

    fn chunk_refs_of(&self, ino: u64) -> Option<(&[u32], &[u64], u64)> {
        let record = self.record(ino)?;
        if record.kind != FileKind::Regular {
            return None;
        }
        let start = usize::try_from(record.data_start).ok()?;
        let end = start.checked_add(record.data_len as usize)?;
        Some((self.tables.chunk_refs.get(start..end)?, self.derived.ref_offsets.get(start..end)?, record.size))
    }

    /// All chunks of regular file `ino` in file order, or `None` if it is not a regular file.
    pub fn chunks_of(&self, ino: u64) -> Option<FileChunks<'_>> {
        let (refs, offsets, _) = self.chunk_refs_of(ino)?;
        Some(FileChunks { refs: refs.iter(), offsets: offsets.iter(), chunks: &self.tables.chunks })
    }

    /// The chunks of regular file `ino` holding the bytes `[offset, offset + len)` (clipped to
    /// the file's size), in file order; empty for a range past the end. `None` if `ino` is not a
    /// regular file.
    pub fn chunks_in_range(&self, ino: u64, offset: u64, len: u64) -> Option<FileChunks<'_>> {
        let (refs, offsets, size) = self.chunk_refs_of(ino)?;
        let end = offset.saturating_add(len).min(size);
        let (first, last) = if offset >= end {
            (0, 0)
        } else {
            // Chunk offsets strictly increase from 0, so the chunk holding `offset` is the last
            // one starting at or before it, and the range ends with the last one starting
            // before `end`.
            let first = offsets.partition_point(|&start| start <= offset).saturating_sub(1);
            let last = offsets.partition_point(|&start| start < end);
            (first, last)
        };
        Some(FileChunks { refs: refs.get(first..last)?.iter(), offsets: offsets.get(first..last)?.iter(), chunks: &self.tables.chunks })
    }

    /// The inode at `path` (components separated by `/`, relative to the root; empty, `.` and
    /// `..` components are not allowed), without following symlinks.
    pub fn resolve(&self, path: &[u8]) -> Option<u64> {
        path.split(|&byte| byte == b'/').filter(|component| !component.is_empty()).try_fold(ROOT_INO, |dir, name| self.lookup(dir, name))
    }
}

/// The entries of a directory, from [`Bootstrap::readdir`].
#[derive(Debug, Clone)]
pub struct ReadDir<'a> {
    entries: std::slice::Iter<'a, DirentRecord>,
    bootstrap: &'a Bootstrap,
}

impl<'a> Iterator for ReadDir<'a> {
    type Item = DirEntry<'a>;

    fn next(&mut self) -> Option<DirEntry<'a>> {
        let entry = self.entries.next()?;
        let ino = u64::from(entry.ino);
        Some(DirEntry { name: heap_bytes(&self.bootstrap.tables.heap, entry.name)?, ino, kind: self.bootstrap.record(ino)?.kind })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.entries.size_hint()
    }

    fn nth(&mut self, n: usize) -> Option<DirEntry<'a>> {
        // Lets `readdir` at an offset skip entries without decoding them.
        if n > 0 {
            self.entries.nth(n - 1)?;
        }
        self.next()
    }
}

/// The extended attributes of an inode as (name, value), from [`Bootstrap::xattrs`].
#[derive(Debug, Clone)]
pub struct Xattrs<'a> {
    records: std::slice::Iter<'a, XattrRecord>,
    heap: &'a [u8],
}

impl<'a> Iterator for Xattrs<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let record = self.records.next()?;
        Some((heap_bytes(self.heap, record.name)?, heap_bytes(self.heap, record.value)?))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.records.size_hint()
    }
}

/// Chunks of a regular file in file order, from [`Bootstrap::chunks_of`] and
/// [`Bootstrap::chunks_in_range`].
#[derive(Debug, Clone)]
pub struct FileChunks<'a> {
    refs: std::slice::Iter<'a, u32>,
    offsets: std::slice::Iter<'a, u64>,
    chunks: &'a [Chunk],
}

impl<'a> Iterator for FileChunks<'a> {
    type Item = FileChunk<'a>;

    fn next(&mut self) -> Option<FileChunk<'a>> {
        let index = *self.refs.next()?;
        let file_offset = *self.offsets.next()?;
        Some(FileChunk { file_offset, index, chunk: self.chunks.get(index as usize)? })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.refs.size_hint()
    }
}

fn heap_bytes(heap: &[u8], at: HeapRef) -> Option<&[u8]> {
    let start = usize::try_from(at.offset).ok()?;
    heap.get(start..start.checked_add(at.len as usize)?)
}

#[cfg(test)]
mod tests;
