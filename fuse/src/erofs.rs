//! An EROFS image of a bootstrap, so that the kernel serves an image's metadata and page cache
//! itself and a warm read never reaches Shoal.
//!
//! The image is never written to disk. [`ErofsImage::build`] lays it out in memory from the
//! bootstrap: the superblock, one extended inode per file (with its xattrs inline), directory
//! blocks and symlink targets. That part, the *metadata*, is a few bytes per file. Every regular
//! file's data then follows as one contiguous, block-aligned *extent*, which is not stored:
//! [`ErofsImage::pieces`] says which file (and where in it) a range of the image is, and the
//! file that backs the mount ([`crate::image_file`]) reads those bytes through the chunk loader
//! when the kernel asks for them, i.e. the first time each page is read.
//!
//! Only the uncompressed layouts of EROFS are used (`FLAT_PLAIN` and `FLAT_INLINE`), with 4 KiB
//! blocks and no optional feature, so any Linux with EROFS (5.4+) reads the layout; mounting it
//! from a file (rather than a block device) needs Linux 6.12+. The on-disk format is the
//! kernel's `fs/erofs/erofs_fs.h`; see also `fuse/FORMAT.md`, "EROFS view".

use std::collections::HashMap;

use thiserror::Error;

use crate::format::{Attr, Bootstrap, FileKind, ROOT_INO};

/// The block size: 4 KiB, the page size EROFS needs for uncompressed files.
pub const BLOCK_SIZE: u64 = 4096;

/// Where the superblock starts in the image.
const SUPERBLOCK_OFFSET: usize = 1024;

/// The superblock's size.
const SUPERBLOCK_SIZE: usize = 128;

/// `EROFS_SUPER_MAGIC_V1`.
const MAGIC: u32 = 0xE0F5_E1E2;

/// Inodes are addressed in 32-byte slots ("nid"s) from the start of the metadata.
const SLOT: u64 = 32;

/// The size of an extended inode, the only form written (it carries a 64-bit size, 32-bit ids
/// and its own mtime).
const INODE_SIZE: usize = 64;

/// `i_format` bit 0: an extended inode.
const EXTENDED: u16 = 1;

/// Data layouts (`i_format` bits 1..3): data in blocks from `i_u`...
const FLAT_PLAIN: u16 = 0;
/// ... or right after the inode and its xattrs.
const FLAT_INLINE: u16 = 2;

/// The size of a directory entry record.
const DIRENT_SIZE: usize = 12;

/// The longest name EROFS stores.
const NAME_MAX: usize = 255;

/// The xattr body's header size (before the entries).
const XATTR_HEADER_SIZE: usize = 12;

/// Why a bootstrap cannot be shown as an EROFS image.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ErofsError {
    /// EROFS stores xattr names only under known prefixes (without its optional long-prefix table).
    #[error("inode {ino}: EROFS cannot store the xattr {name:?} (only user., trusted., security. and POSIX ACLs)")]
    XattrName {
        /// The inode.
        ino: u64,
        /// The xattr's name.
        name: String,
    },
    /// An xattr value of 64 KiB (the Linux limit is 64 KiB exactly; EROFS stores up to one byte less).
    #[error("inode {ino}: the xattr {name:?} is {len} bytes; EROFS stores at most 65,535")]
    XattrValue {
        /// The inode.
        ino: u64,
        /// The xattr's name.
        name: String,
        /// The value's length.
        len: usize,
    },
    /// A name longer than 255 bytes.
    #[error("directory {ino}: an entry name of {len} bytes; EROFS stores at most 255")]
    Name {
        /// The directory.
        ino: u64,
        /// The name's length.
        len: usize,
    },
    /// More than 16 TiB of files, or a metadata area beyond EROFS's 32-bit block and 16-bit
    /// root addresses.
    #[error("the image does not fit EROFS's 32-bit block addresses: {0}")]
    TooLarge(&'static str),
    /// The bootstrap's tree is not what a decoded bootstrap guarantees.
    #[error("inode {0} is missing from the bootstrap")]
    Missing(u64),
}

/// A regular file's data in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Where it starts in the image (a multiple of [`BLOCK_SIZE`]).
    pub start: u64,
    /// The file's size.
    pub len: u64,
    /// The file's inode in the bootstrap.
    pub ino: u64,
}

/// Where the bytes of a range of the image come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Metadata, held in memory.
    Bytes(&'a [u8]),
    /// `len` bytes of file `ino` from `offset`.
    File {
        /// The file's inode in the bootstrap.
        ino: u64,
        /// Where in the file.
        offset: u64,
        /// How many bytes (all within the file).
        len: u64,
    },
    /// Padding after a file's last byte, up to the next block.
    Zeros(u64),
}

impl Piece<'_> {
    /// How many bytes of the image the piece stands for.
    pub fn len(&self) -> u64 {
        match self {
            Piece::Bytes(bytes) => bytes.len() as u64,
            Piece::File { len, .. } | Piece::Zeros(len) => *len,
        }
    }

    /// Whether the piece stands for no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A bootstrap laid out as an EROFS image: its metadata in memory, its files' data as extents.
#[derive(Debug)]
pub struct ErofsImage {
    /// The image's first blocks: superblock, inodes, directory and symlink blocks.
    meta: Vec<u8>,
    /// Every non-empty regular file's data, by start.
    extents: Vec<Extent>,
    /// The image's size: metadata and extents, a whole number of blocks.
    len: u64,
}

/// Where an inode's variable part goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Data {
    /// No data (devices, pipes, sockets, empty files).
    None,
    /// Right after the inode and its xattrs.
    Inline,
    /// In whole blocks of the metadata area, from this block.
    MetaBlocks(u32),
    /// In the file's extent, from this block.
    Extent(u32),
}

/// One inode's place in the image.
struct Placed<'a> {
    /// The bootstrap inode.
    ino: u64,
    /// A directory's entries, sorted ([`dir_entries`]); empty for other kinds.
    entries: Vec<Entry<'a>>,
    /// Its attributes.
    attr: Attr,
    /// Its xattr body (header and entries), empty when it has none.
    xattrs: Vec<u8>,
    /// Its directory blocks or symlink target, when it has either.
    data_len: u64,
    /// Where that data, or a regular file's, is.
    data: Data,
    /// Its byte offset in the image.
    offset: u64,
}

impl ErofsImage {
    /// Lays out `bootstrap` as an EROFS image.
    pub fn build(bootstrap: &Bootstrap) -> Result<ErofsImage, ErofsError> {
        let count = bootstrap.inode_count();
        // The root first: the superblock holds its nid in 16 bits.
        let order = std::iter::once(ROOT_INO).chain((1..=count).filter(|&ino| ino != ROOT_INO));
        let mut placed = Vec::with_capacity(count as usize);
        let mut nids = HashMap::with_capacity(count as usize);
        let mut pos = (SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE) as u64;
        for ino in order {
            let attr = bootstrap.getattr(ino).ok_or(ErofsError::Missing(ino))?;
            let xattrs = xattr_body(bootstrap, ino)?;
            let entries = match attr.kind {
                FileKind::Directory => dir_entries(bootstrap, ino)?,
                _ => Vec::new(),
            };
            let data_len = match attr.kind {
                FileKind::Directory => dir_len(&name_lens(&entries)),
                FileKind::Symlink => bootstrap.readlink(ino).map_or(0, |target| target.len() as u64),
                _ => 0,
            };
            let fixed = (INODE_SIZE + xattrs.len()) as u64;
            // Inline data must end in the block its inode is in.
            let inline = data_len > 0 && data_len < BLOCK_SIZE && fixed + data_len <= BLOCK_SIZE;
            let record = fixed + if inline { data_len } else { 0 };
            if record <= BLOCK_SIZE && pos % BLOCK_SIZE + record > BLOCK_SIZE {
                pos = pos.next_multiple_of(BLOCK_SIZE);
            }
            nids.insert(ino, pos / SLOT);
            let data = if inline { Data::Inline } else { Data::None };
            placed.push(Placed { ino, entries, attr, xattrs, data_len, data, offset: pos });
            pos = (pos + record).next_multiple_of(SLOT);
        }
        if nids[&ROOT_INO] > u64::from(u16::MAX) {
            return Err(ErofsError::TooLarge("the root inode's address"));
        }
        // Directory blocks and symlinks too large to be inline, then every file's extent.
        let mut next_block = pos.div_ceil(BLOCK_SIZE);
        for p in placed.iter_mut().filter(|p| p.data_len > 0 && p.data == Data::None) {
            p.data = Data::MetaBlocks(take_blocks(&mut next_block, p.data_len)?);
        }
        let meta_blocks = next_block;
        let mut extents = Vec::new();
        for p in placed.iter_mut().filter(|p| p.attr.kind == FileKind::Regular && p.attr.size > 0) {
            let block = take_blocks(&mut next_block, p.attr.size)?;
            p.data = Data::Extent(block);
            extents.push(Extent { start: u64::from(block) * BLOCK_SIZE, len: p.attr.size, ino: p.ino });
        }
        let blocks = u32::try_from(next_block).map_err(|_| ErofsError::TooLarge("more than 16 TiB of data"))?;

        let mut meta = vec![0u8; (meta_blocks * BLOCK_SIZE) as usize];
        write_superblock(&mut meta, nids[&ROOT_INO] as u16, count, blocks);
        for p in &placed {
            let data = match p.attr.kind {
                FileKind::Directory => dir_blocks(&p.entries, &nids)?,
                FileKind::Symlink => bootstrap.readlink(p.ino).unwrap_or_default().to_vec(),
                _ => Vec::new(),
            };
            let at = p.offset as usize;
            meta[at..at + INODE_SIZE].copy_from_slice(&inode(p));
            let xattrs_at = at + INODE_SIZE;
            meta[xattrs_at..xattrs_at + p.xattrs.len()].copy_from_slice(&p.xattrs);
            let data_at = match p.data {
                Data::Inline => xattrs_at + p.xattrs.len(),
                Data::MetaBlocks(block) => block as usize * BLOCK_SIZE as usize,
                Data::None | Data::Extent(_) => continue,
            };
            meta[data_at..data_at + data.len()].copy_from_slice(&data);
        }
        Ok(ErofsImage { meta, extents, len: u64::from(blocks) * BLOCK_SIZE })
    }

    /// The image's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the image is empty (never: it has at least a superblock and a root).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The metadata's size: the image's first bytes, held in memory.
    pub fn meta_len(&self) -> u64 {
        self.meta.len() as u64
    }

    /// Every regular file's extent, by start.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Where the bytes `[offset, offset + len)` of the image (clipped to its size) come from,
    /// in order.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<Piece<'_>> {
        let end = offset.saturating_add(len).min(self.len);
        let mut pieces = Vec::new();
        let mut at = offset;
        if at < end && at < self.meta_len() {
            let to = end.min(self.meta_len());
            pieces.push(Piece::Bytes(&self.meta[at as usize..to as usize]));
            at = to;
        }
        // The first extent ending after `at`.
        let mut i = self.extents.partition_point(|e| e.start + e.len.next_multiple_of(BLOCK_SIZE) <= at);
        while at < end {
            let Some(extent) = self.extents.get(i) else {
                pieces.push(Piece::Zeros(end - at));
                break;
            };
            if at < extent.start {
                let to = end.min(extent.start);
                pieces.push(Piece::Zeros(to - at));
                at = to;
                continue;
            }
            let file_end = extent.start + extent.len;
            if at < file_end {
                let to = end.min(file_end);
                pieces.push(Piece::File { ino: extent.ino, offset: at - extent.start, len: to - at });
                at = to;
            }
            let padded_end = extent.start + extent.len.next_multiple_of(BLOCK_SIZE);
            if at < end && at < padded_end {
                let to = end.min(padded_end);
                pieces.push(Piece::Zeros(to - at));
                at = to;
            }
            i += 1;
        }
        pieces
    }
}

/// The block at `next` for `len` bytes; moves `next` past them.
fn take_blocks(next: &mut u64, len: u64) -> Result<u32, ErofsError> {
    let block = u32::try_from(*next).map_err(|_| ErofsError::TooLarge("more than 16 TiB of data"))?;
    *next += len.div_ceil(BLOCK_SIZE);
    Ok(block)
}

/// Writes the superblock into the image's first block.
fn write_superblock(meta: &mut [u8], root_nid: u16, inodes: u64, blocks: u32) {
    let sb = &mut meta[SUPERBLOCK_OFFSET..SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE];
    sb[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    // checksum (4..8) and feature_compat (8..12): none.
    sb[12] = BLOCK_SIZE.trailing_zeros() as u8; // blkszbits
    sb[14..16].copy_from_slice(&root_nid.to_le_bytes());
    sb[16..24].copy_from_slice(&inodes.to_le_bytes());
    // build_time (24..32) and its nanoseconds (32..36): every inode carries its own mtime.
    sb[36..40].copy_from_slice(&blocks.to_le_bytes());
    // meta_blkaddr (40..44) and xattr_blkaddr (44..48): 0; inodes are addressed from byte 0.
    sb[64..69].copy_from_slice(b"shoal"); // volume_name
                                          // feature_incompat (80..84) and the rest: none.
}

/// The 64-byte extended inode of `p`.
fn inode(p: &Placed<'_>) -> [u8; INODE_SIZE] {
    let attr = &p.attr;
    let layout = if p.data == Data::Inline { FLAT_INLINE } else { FLAT_PLAIN };
    let size = match attr.kind {
        FileKind::Regular => attr.size,
        _ => p.data_len,
    };
    let i_u = match (attr.kind, p.data) {
        (FileKind::CharDevice | FileKind::BlockDevice, _) => crate::fs::fuse_rdev(attr.rdev),
        (_, Data::MetaBlocks(block) | Data::Extent(block)) => block,
        _ => 0,
    };
    let xattr_icount = if p.xattrs.is_empty() { 0 } else { ((p.xattrs.len() - XATTR_HEADER_SIZE) / 4 + 1) as u16 };
    let mut out = [0u8; INODE_SIZE];
    out[0..2].copy_from_slice(&(EXTENDED | (layout << 1)).to_le_bytes());
    out[2..4].copy_from_slice(&xattr_icount.to_le_bytes());
    out[4..6].copy_from_slice(&(attr.mode() as u16).to_le_bytes());
    out[8..16].copy_from_slice(&size.to_le_bytes());
    out[16..20].copy_from_slice(&i_u.to_le_bytes());
    out[20..24].copy_from_slice(&(p.ino as u32).to_le_bytes());
    out[24..28].copy_from_slice(&attr.uid.to_le_bytes());
    out[28..32].copy_from_slice(&attr.gid.to_le_bytes());
    out[32..40].copy_from_slice(&attr.mtime.sec.to_le_bytes());
    out[40..44].copy_from_slice(&attr.mtime.nsec.to_le_bytes());
    out[44..48].copy_from_slice(&attr.nlink.to_le_bytes());
    out
}

/// The xattr body of inode `ino`: the 12-byte header and each entry (prefix index, name
/// without the prefix, value), 4-byte aligned; empty when it has no xattrs.
fn xattr_body(bootstrap: &Bootstrap, ino: u64) -> Result<Vec<u8>, ErofsError> {
    let Some(xattrs) = bootstrap.xattrs(ino) else { return Ok(Vec::new()) };
    let mut body = Vec::new();
    for (name, value) in xattrs {
        let shown = || String::from_utf8_lossy(name).into_owned();
        let (index, suffix) = xattr_prefix(name).ok_or_else(|| ErofsError::XattrName { ino, name: shown() })?;
        let name_len = u8::try_from(suffix.len()).map_err(|_| ErofsError::XattrName { ino, name: shown() })?;
        let value_len = u16::try_from(value.len()).map_err(|_| ErofsError::XattrValue { ino, name: shown(), len: value.len() })?;
        if body.is_empty() {
            body.resize(XATTR_HEADER_SIZE, 0);
        }
        body.push(name_len);
        body.push(index);
        body.extend_from_slice(&value_len.to_le_bytes());
        body.extend_from_slice(suffix);
        body.extend_from_slice(value);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    Ok(body)
}

/// EROFS's index for an xattr name's prefix, and the rest of the name.
fn xattr_prefix(name: &[u8]) -> Option<(u8, &[u8])> {
    match name {
        b"system.posix_acl_access" => return Some((2, b"")),
        b"system.posix_acl_default" => return Some((3, b"")),
        _ => {}
    }
    let prefixes: [(&[u8], u8); 3] = [(b"user.", 1), (b"trusted.", 4), (b"security.", 6)];
    prefixes.iter().find_map(|(prefix, index)| name.strip_prefix(*prefix).filter(|rest| !rest.is_empty()).map(|rest| (*index, rest)))
}

/// A directory entry: name, inode, kind.
type Entry<'a> = (&'a [u8], u64, FileKind);

/// Directory `ino`'s entries, `.` and `..` included, sorted by name as EROFS needs them.
fn dir_entries(bootstrap: &Bootstrap, ino: u64) -> Result<Vec<Entry<'_>>, ErofsError> {
    let parent = bootstrap.parent(ino).unwrap_or(ino);
    let mut entries = vec![(b".".as_slice(), ino, FileKind::Directory), (b"..".as_slice(), parent, FileKind::Directory)];
    for entry in bootstrap.readdir(ino).ok_or(ErofsError::Missing(ino))? {
        if entry.name.len() > NAME_MAX {
            return Err(ErofsError::Name { ino, len: entry.name.len() });
        }
        entries.push((entry.name, entry.ino, entry.kind));
    }
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    Ok(entries)
}

/// The lengths of `entries`' names, in order.
fn name_lens(entries: &[Entry<'_>]) -> Vec<usize> {
    entries.iter().map(|(name, _, _)| name.len()).collect()
}

/// How entries with names of these lengths fill directory blocks: each block holds the
/// entries `[start, end)`, their 12-byte records first, then their names.
fn dir_packing(name_lens: &[usize]) -> Vec<(usize, usize)> {
    let mut blocks = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, len) in name_lens.iter().enumerate() {
        if used + DIRENT_SIZE + len > BLOCK_SIZE as usize {
            blocks.push((start, i));
            (start, used) = (i, 0);
        }
        used += DIRENT_SIZE + len;
    }
    blocks.push((start, name_lens.len()));
    blocks
}

/// The size of a directory whose entries have names of these lengths: whole blocks, and the
/// last one as far as it is used.
fn dir_len(name_lens: &[usize]) -> u64 {
    let blocks = dir_packing(name_lens);
    let last = blocks.last().map_or(0, |&(start, end)| name_lens[start..end].iter().map(|len| DIRENT_SIZE + len).sum::<usize>());
    (blocks.len() as u64 - 1) * BLOCK_SIZE + last as u64
}

/// The blocks of a directory with `entries` (sorted), the last one cut where its names end.
fn dir_blocks(entries: &[Entry<'_>], nids: &HashMap<u64, u64>) -> Result<Vec<u8>, ErofsError> {
    let mut out = Vec::new();
    for (start, end) in dir_packing(&name_lens(entries)) {
        let base = out.len();
        let in_block = &entries[start..end];
        let mut name_at = DIRENT_SIZE * in_block.len();
        for (name, child, kind) in in_block {
            let nid = *nids.get(child).ok_or(ErofsError::Missing(*child))?;
            out.extend_from_slice(&nid.to_le_bytes());
            out.extend_from_slice(&(name_at as u16).to_le_bytes());
            out.push(file_type(*kind));
            out.push(0);
            name_at += name.len();
        }
        for (name, _, _) in in_block {
            out.extend_from_slice(name);
        }
        if end < entries.len() {
            out.resize(base + BLOCK_SIZE as usize, 0);
        }
    }
    Ok(out)
}

/// EROFS's file type code in a directory entry.
fn file_type(kind: FileKind) -> u8 {
    match kind {
        FileKind::Regular => 1,
        FileKind::Directory => 2,
        FileKind::CharDevice => 3,
        FileKind::BlockDevice => 4,
        FileKind::Fifo => 5,
        FileKind::Socket => 6,
        FileKind::Symlink => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{BootstrapParts, Chunk, InodeContent, NewInode, Timestamp};

    fn inode(content: InodeContent) -> NewInode {
        NewInode { perm: 0o755, uid: 1000, gid: 100, mtime: Timestamp { sec: 1_700_000_000, nsec: 5 }, xattrs: Vec::new(), content }
    }

    /// A root with `dir/a` (1 chunk of 5,000 bytes), `dir/b` (empty), `link` and `many/`
    /// holding `entries` files named `file-N` sharing chunk 0.
    fn sample(entries: usize) -> Bootstrap {
        let chunk = Chunk { digest: [7; 32], blob: 0, compressed_offset: 0, compressed_len: 10, uncompressed_len: 5000 };
        let mut inodes = vec![
            inode(InodeContent::Directory { entries: vec![(b"dir".to_vec(), 2), (b"link".to_vec(), 5), (b"many".to_vec(), 6)] }),
            inode(InodeContent::Directory { entries: vec![(b"a".to_vec(), 3), (b"b".to_vec(), 4)] }),
            NewInode { xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())], ..inode(InodeContent::Regular { chunks: vec![0] }) },
            inode(InodeContent::Regular { chunks: vec![] }),
            inode(InodeContent::Symlink { target: b"dir/a".to_vec() }),
        ];
        let files: Vec<(Vec<u8>, u64)> = (0..entries).map(|i| (format!("file-{i}").into_bytes(), 7 + i as u64)).collect();
        inodes.push(inode(InodeContent::Directory { entries: files }));
        inodes.extend((0..entries).map(|_| inode(InodeContent::Regular { chunks: vec![0] })));
        let blobs = vec![crate::format::Blob { sha256: [1; 32], size: 10 }];
        Bootstrap::from_parts(BootstrapParts { blobs, chunks: vec![chunk], inodes, prefetch: Vec::new() }).unwrap()
    }

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn the_superblock_points_at_a_root_directory() {
        let image = ErofsImage::build(&sample(3)).unwrap();
        let meta = &image.meta;
        assert_eq!(u32_at(meta, 1024), MAGIC);
        assert_eq!(meta[1024 + 12], 12);
        let root = u16_at(meta, 1024 + 14) as usize * SLOT as usize;
        assert_eq!(u16_at(meta, root + 4) as u32 & 0o170000, 0o040000, "root is a directory");
        assert_eq!(u32_at(meta, 1024 + 36) as u64 * BLOCK_SIZE, image.len());
        assert_eq!(image.len() % BLOCK_SIZE, 0);
    }

    #[test]
    fn every_file_has_its_own_block_aligned_extent() {
        let image = ErofsImage::build(&sample(3)).unwrap();
        // dir/a and the three files of many/; the empty file has none.
        assert_eq!(image.extents().len(), 4);
        let mut end = image.meta_len();
        for extent in image.extents() {
            assert_eq!(extent.start % BLOCK_SIZE, 0);
            assert!(extent.start >= end, "extents do not overlap the metadata or each other");
            assert_eq!(extent.len, 5000);
            end = extent.start + extent.len;
        }
        assert_eq!(image.len(), end.next_multiple_of(BLOCK_SIZE));
    }

    #[test]
    fn ranges_map_to_metadata_files_and_padding() {
        let image = ErofsImage::build(&sample(2)).unwrap();
        let (first, second) = (image.extents()[0], image.extents()[1]);
        let pieces = image.pieces(second.start - 10, 10 + 5000 + 100);
        assert_eq!(pieces.len(), 3, "{pieces:?}");
        assert_eq!(pieces[0], Piece::Zeros(10));
        assert_eq!(pieces[1], Piece::File { ino: second.ino, offset: 0, len: 5000 });
        assert_eq!(pieces[2], Piece::Zeros(100));
        let meta = image.pieces(0, 4096);
        assert!(matches!(meta.as_slice(), [Piece::Bytes(bytes)] if bytes.len() == 4096));
        // A range past the end is clipped; one across two files splits at the padding.
        assert!(image.pieces(image.len(), 4096).is_empty());
        let across = image.pieces(first.start + 4096, second.start + 10 - (first.start + 4096));
        assert_eq!(
            across,
            vec![
                Piece::File { ino: first.ino, offset: 4096, len: 904 },
                Piece::Zeros(4096 - 904),
                Piece::File { ino: second.ino, offset: 0, len: 10 }
            ]
        );
        let total: u64 = image.pieces(0, image.len()).iter().map(Piece::len).sum();
        assert_eq!(total, image.len());
    }

    #[test]
    fn large_directories_span_blocks_sorted_by_name() {
        let bootstrap = sample(1000);
        let image = ErofsImage::build(&bootstrap).unwrap();
        let entries = dir_entries(&bootstrap, 6).unwrap();
        let lens = name_lens(&entries);
        let blocks = dir_packing(&lens);
        assert!(blocks.len() > 1);
        assert!(entries.windows(2).all(|w| w[0].0 < w[1].0));
        // Every block but the last is full up to at most one entry's worth.
        for &(start, end) in &blocks[..blocks.len() - 1] {
            let used: usize = lens[start..end].iter().map(|len| DIRENT_SIZE + len).sum();
            assert!(used <= 4096 && used + DIRENT_SIZE + lens[end] > 4096);
        }
        assert!(image.meta_len() > 3 * BLOCK_SIZE);
    }

    #[test]
    fn xattr_names_need_a_known_prefix() {
        assert_eq!(xattr_prefix(b"user.mime"), Some((1, b"mime".as_slice())));
        assert_eq!(xattr_prefix(b"security.capability"), Some((6, b"capability".as_slice())));
        assert_eq!(xattr_prefix(b"system.posix_acl_access"), Some((2, b"".as_slice())));
        assert_eq!(xattr_prefix(b"system.other"), None);
        assert_eq!(xattr_prefix(b"user."), None);
        let body = xattr_body(&sample(0), 3).unwrap();
        // Header, then name length 1, index 1, value size 1, "k", "v", padded to 4.
        assert_eq!(body.len(), XATTR_HEADER_SIZE + 8);
        assert_eq!(&body[12..18], &[1, 1, 1, 0, b'k', b'v']);
    }

    #[test]
    fn inline_data_never_crosses_a_block() {
        let image = ErofsImage::build(&sample(40)).unwrap();
        let bootstrap = sample(40);
        // Walk the inode area: every inline inode ends in its block.
        let root = u16_at(&image.meta, 1024 + 14) as u64 * SLOT;
        assert_eq!(root, 1152);
        let mut at = root as usize;
        for _ in 0..bootstrap.inode_count() {
            while u16_at(&image.meta, at) == 0 && at < image.meta.len() {
                at += SLOT as usize;
            }
            let format = u16_at(&image.meta, at);
            let icount = u16_at(&image.meta, at + 2) as usize;
            let xattrs = if icount == 0 { 0 } else { XATTR_HEADER_SIZE + 4 * (icount - 1) };
            let size = u64::from_le_bytes(image.meta[at + 8..at + 16].try_into().unwrap()) as usize;
            let inline = if (format >> 1) & 7 == FLAT_INLINE { size } else { 0 };
            let end = at + INODE_SIZE + xattrs + inline;
            assert!(inline == 0 || at / 4096 == (end - 1) / 4096, "inode at {at} crosses a block");
            at = end.next_multiple_of(SLOT as usize);
        }
    }
}
