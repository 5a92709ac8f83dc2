//! The byte layout of a version 1 bootstrap: decompressing, parsing, serializing, and laying
//! assembled parts out as tables. Cross-record rules are checked in `validate`.

use std::io::Read;

use super::{
    inode_error, record_error, Blob, BootstrapParts, Chunk, DirentRecord, FileKind, FormatError, HeapRef, InodeContent, InodeRecord,
    NewInode, Tables, Timestamp, XattrRecord, MAGIC, VERSION,
};

pub(super) const HEADER_LEN: usize = 16;
pub(super) const SECTION_ENTRY_LEN: usize = 24;
pub(super) const BLOB_RECORD_LEN: usize = 40;
pub(super) const CHUNK_RECORD_LEN: usize = 56;
pub(super) const INODE_RECORD_LEN: usize = 64;
pub(super) const DIRENT_RECORD_LEN: usize = 16;
pub(super) const XATTR_RECORD_LEN: usize = 24;
pub(super) const INDEX_RECORD_LEN: usize = 4;

/// The sections of a version 1 bootstrap, in the order they appear in the section table and in
/// the file; the discriminant is the section's kind number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Section {
    Blobs = 1,
    Chunks = 2,
    Inodes = 3,
    Dirents = 4,
    Xattrs = 5,
    ChunkRefs = 6,
    Prefetch = 7,
    Heap = 8,
}

impl Section {
    pub(super) const ALL: [Section; 8] = [
        Section::Blobs,
        Section::Chunks,
        Section::Inodes,
        Section::Dirents,
        Section::Xattrs,
        Section::ChunkRefs,
        Section::Prefetch,
        Section::Heap,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Section::Blobs => "blob table",
            Section::Chunks => "chunk table",
            Section::Inodes => "inode table",
            Section::Dirents => "directory entry table",
            Section::Xattrs => "xattr table",
            Section::ChunkRefs => "chunk reference table",
            Section::Prefetch => "prefetch table",
            Section::Heap => "heap",
        }
    }

    pub(super) fn record_len(self) -> usize {
        match self {
            Section::Blobs => BLOB_RECORD_LEN,
            Section::Chunks => CHUNK_RECORD_LEN,
            Section::Inodes => INODE_RECORD_LEN,
            Section::Dirents => DIRENT_RECORD_LEN,
            Section::Xattrs => XATTR_RECORD_LEN,
            Section::ChunkRefs | Section::Prefetch => INDEX_RECORD_LEN,
            Section::Heap => 1,
        }
    }
}

/// Decompresses a bootstrap, stopping as soon as it exceeds `limit` bytes.
pub(super) fn decompress(compressed: &[u8], limit: usize) -> Result<Vec<u8>, FormatError> {
    // A frame that declares its size lets a bomb be refused before any work.
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(compressed) {
        if declared > limit as u64 {
            return Err(FormatError::TooLarge { limit });
        }
    }
    let decoder = zstd::stream::read::Decoder::with_buffer(compressed).map_err(FormatError::Decompress)?;
    let mut raw = Vec::new();
    decoder.take((limit as u64).saturating_add(1)).read_to_end(&mut raw).map_err(FormatError::Decompress)?;
    if raw.len() > limit {
        return Err(FormatError::TooLarge { limit });
    }
    Ok(raw)
}

/// Reads little-endian fields from one record. Records are cut to their exact length before
/// being read, so running short cannot happen; it would yield zeros rather than panic.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        match self.0.split_first_chunk::<N>() {
            Some((head, rest)) => {
                self.0 = rest;
                *head
            }
            None => {
                debug_assert!(false, "record shorter than its fields");
                self.0 = &[];
                [0; N]
            }
        }
    }

    fn u8(&mut self) -> u8 {
        u8::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.array())
    }
}

/// Splits the raw bootstrap into its sections and decodes every record, checking only what
/// each record can check alone.
pub(super) fn parse(raw: &[u8]) -> Result<Tables, FormatError> {
    let sections = section_slices(raw)?;
    let [blobs, chunks, inodes, dirents, xattrs, chunk_refs, prefetch, heap] = sections;
    Ok(Tables {
        blobs: records(blobs, BLOB_RECORD_LEN, |_, mut f| Ok(Blob { sha256: f.array(), size: f.u64() }))?,
        chunks: records(chunks, CHUNK_RECORD_LEN, parse_chunk)?,
        inodes: records(inodes, INODE_RECORD_LEN, parse_inode)?,
        dirents: records(dirents, DIRENT_RECORD_LEN, |_, mut f| {
            let offset = f.u64();
            let len = f.u32();
            Ok(DirentRecord { name: HeapRef { offset, len }, ino: f.u32() })
        })?,
        xattrs: records(xattrs, XATTR_RECORD_LEN, |_, mut f| {
            let name_offset = f.u64();
            let value_offset = f.u64();
            Ok(XattrRecord { name: HeapRef { offset: name_offset, len: f.u32() }, value: HeapRef { offset: value_offset, len: f.u32() } })
        })?,
        chunk_refs: records(chunk_refs, INDEX_RECORD_LEN, |_, mut f| Ok(f.u32()))?,
        prefetch: records(prefetch, INDEX_RECORD_LEN, |_, mut f| Ok(f.u32()))?,
        heap: heap.to_vec(),
    })
}

/// Checks the header and section table and returns each section's bytes, in [`Section::ALL`]
/// order. Sections must follow the table back to back, in kind order, and end the data.
fn section_slices(raw: &[u8]) -> Result<[&[u8]; 8], FormatError> {
    let header = raw.get(..HEADER_LEN).ok_or(FormatError::Truncated { what: "header", need: HEADER_LEN as u64, have: raw.len() as u64 })?;
    let mut fields = Fields(header);
    let magic: [u8; 8] = fields.array();
    if magic != MAGIC {
        return Err(FormatError::BadMagic { found: magic });
    }
    let version = fields.u32();
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion { found: version });
    }
    let count = fields.u32();
    if count as usize != Section::ALL.len() {
        return Err(FormatError::SectionTable(format!("{count} sections listed, version {VERSION} has exactly {}", Section::ALL.len())));
    }
    let table_end = HEADER_LEN + SECTION_ENTRY_LEN * Section::ALL.len();
    let table = raw.get(HEADER_LEN..table_end).ok_or(FormatError::Truncated {
        what: "section table",
        need: table_end as u64,
        have: raw.len() as u64,
    })?;

    let mut slices: [&[u8]; 8] = [&[]; 8];
    let mut cursor = table_end as u64;
    for ((section, entry), slot) in Section::ALL.iter().zip(table.chunks_exact(SECTION_ENTRY_LEN)).zip(slices.iter_mut()) {
        let mut fields = Fields(entry);
        let kind = fields.u32();
        let reserved = fields.u32();
        let offset = fields.u64();
        let length = fields.u64();
        let name = section.name();
        if kind != *section as u32 {
            return Err(FormatError::SectionTable(format!("entry for the {name} has kind {kind}, expected {}", *section as u32)));
        }
        if reserved != 0 {
            return Err(FormatError::SectionTable(format!("reserved field of the {name} entry is {reserved}, must be 0")));
        }
        if offset != cursor {
            return Err(FormatError::SectionTable(format!(
                "the {name} starts at byte {offset}, expected {cursor} (sections are contiguous)"
            )));
        }
        if length % section.record_len() as u64 != 0 {
            return Err(FormatError::SectionTable(format!(
                "the {name} is {length} bytes, not a multiple of its {}-byte records",
                section.record_len()
            )));
        }
        let end = offset.checked_add(length).filter(|&end| end <= raw.len() as u64).ok_or(FormatError::Truncated {
            what: name,
            need: offset.saturating_add(length),
            have: raw.len() as u64,
        })?;
        // Both bounds are at most raw.len(), so they fit in usize.
        *slot = raw.get(offset as usize..end as usize).ok_or(FormatError::Truncated { what: name, need: end, have: raw.len() as u64 })?;
        cursor = end;
    }
    if cursor != raw.len() as u64 {
        return Err(FormatError::SectionTable(format!("{} bytes follow the last section", raw.len() as u64 - cursor)));
    }
    Ok(slices)
}

/// Decodes a section of fixed-size records. The record count comes from the section's actual
/// length, so the allocation is bounded by the input.
fn records<'a, T>(
    bytes: &'a [u8],
    record_len: usize,
    decode: impl Fn(usize, Fields<'a>) -> Result<T, FormatError>,
) -> Result<Vec<T>, FormatError> {
    bytes.chunks_exact(record_len).enumerate().map(|(index, record)| decode(index, Fields(record))).collect()
}

fn parse_chunk(index: usize, mut f: Fields<'_>) -> Result<Chunk, FormatError> {
    let digest = f.array();
    let blob = f.u32();
    let uncompressed_len = f.u32();
    let compressed_offset = f.u64();
    let compressed_len = f.u32();
    if f.u32() != 0 {
        return Err(record_error(Section::Chunks, index, "reserved field is not 0"));
    }
    Ok(Chunk { digest, blob, compressed_offset, compressed_len, uncompressed_len })
}

fn parse_inode(index: usize, mut f: Fields<'_>) -> Result<InodeRecord, FormatError> {
    let code = f.u8();
    let kind = FileKind::from_code(code).ok_or_else(|| inode_error(index, format!("unknown file kind {code}")))?;
    if f.array::<3>() != [0; 3] {
        return Err(inode_error(index, "reserved bytes are not 0"));
    }
    let perm = f.u32();
    let uid = f.u32();
    let gid = f.u32();
    let sec = f.i64();
    let nsec = f.u32();
    let data_len = f.u32();
    let data_start = f.u64();
    let size = f.u64();
    let rdev = f.u64();
    let xattr_start = f.u32();
    let xattr_count = f.u32();
    Ok(InodeRecord { kind, perm, uid, gid, mtime: Timestamp { sec, nsec }, data_start, data_len, size, rdev, xattr_start, xattr_count })
}

/// Writes the tables in the layout `section_slices` and `parse` read.
pub(super) fn serialize(t: &Tables) -> Vec<u8> {
    let mut sections: [Vec<u8>; 8] = Default::default();
    let [blobs, chunks, inodes, dirents, xattrs, chunk_refs, prefetch, heap] = &mut sections;
    for blob in &t.blobs {
        blobs.extend_from_slice(&blob.sha256);
        blobs.extend_from_slice(&blob.size.to_le_bytes());
    }
    for chunk in &t.chunks {
        chunks.extend_from_slice(&chunk.digest);
        chunks.extend_from_slice(&chunk.blob.to_le_bytes());
        chunks.extend_from_slice(&chunk.uncompressed_len.to_le_bytes());
        chunks.extend_from_slice(&chunk.compressed_offset.to_le_bytes());
        chunks.extend_from_slice(&chunk.compressed_len.to_le_bytes());
        chunks.extend_from_slice(&0u32.to_le_bytes());
    }
    for inode in &t.inodes {
        inodes.push(inode.kind.code());
        inodes.extend_from_slice(&[0; 3]);
        inodes.extend_from_slice(&inode.perm.to_le_bytes());
        inodes.extend_from_slice(&inode.uid.to_le_bytes());
        inodes.extend_from_slice(&inode.gid.to_le_bytes());
        inodes.extend_from_slice(&inode.mtime.sec.to_le_bytes());
        inodes.extend_from_slice(&inode.mtime.nsec.to_le_bytes());
        inodes.extend_from_slice(&inode.data_len.to_le_bytes());
        inodes.extend_from_slice(&inode.data_start.to_le_bytes());
        inodes.extend_from_slice(&inode.size.to_le_bytes());
        inodes.extend_from_slice(&inode.rdev.to_le_bytes());
        inodes.extend_from_slice(&inode.xattr_start.to_le_bytes());
        inodes.extend_from_slice(&inode.xattr_count.to_le_bytes());
    }
    for dirent in &t.dirents {
        dirents.extend_from_slice(&dirent.name.offset.to_le_bytes());
        dirents.extend_from_slice(&dirent.name.len.to_le_bytes());
        dirents.extend_from_slice(&dirent.ino.to_le_bytes());
    }
    for xattr in &t.xattrs {
        xattrs.extend_from_slice(&xattr.name.offset.to_le_bytes());
        xattrs.extend_from_slice(&xattr.value.offset.to_le_bytes());
        xattrs.extend_from_slice(&xattr.name.len.to_le_bytes());
        xattrs.extend_from_slice(&xattr.value.len.to_le_bytes());
    }
    for index in &t.chunk_refs {
        chunk_refs.extend_from_slice(&index.to_le_bytes());
    }
    for ino in &t.prefetch {
        prefetch.extend_from_slice(&ino.to_le_bytes());
    }
    heap.extend_from_slice(&t.heap);

    let table_end = HEADER_LEN + SECTION_ENTRY_LEN * Section::ALL.len();
    let total = table_end + sections.iter().map(Vec::len).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(Section::ALL.len() as u32).to_le_bytes());
    let mut offset = table_end as u64;
    for (section, bytes) in Section::ALL.iter().zip(&sections) {
        out.extend_from_slice(&(*section as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        offset += bytes.len() as u64;
    }
    for bytes in &sections {
        out.extend_from_slice(bytes);
    }
    out
}

/// Lays assembled parts out as tables: ranges in inode order, names and values in the heap.
pub(super) fn lay_out(parts: BootstrapParts) -> Result<Tables, FormatError> {
    let mut t = Tables { blobs: parts.blobs, chunks: parts.chunks, ..Tables::default() };
    for (index, inode) in parts.inodes.into_iter().enumerate() {
        let record = lay_out_inode(&mut t, index, inode)?;
        t.inodes.push(record);
    }
    t.prefetch = parts
        .prefetch
        .into_iter()
        .enumerate()
        .map(|(index, ino)| u32::try_from(ino).map_err(|_| record_error(Section::Prefetch, index, format!("inode {ino} does not exist"))))
        .collect::<Result<_, _>>()?;
    Ok(t)
}

fn lay_out_inode(t: &mut Tables, index: usize, inode: NewInode) -> Result<InodeRecord, FormatError> {
    let too_many = |what: &str| inode_error(index, format!("too many {what} for the format"));
    let xattr_start = u32::try_from(t.xattrs.len()).map_err(|_| too_many("extended attributes"))?;
    let mut xattrs = inode.xattrs;
    xattrs.sort();
    for (name, value) in &xattrs {
        let record = XattrRecord {
            name: push_heap(&mut t.heap, name).ok_or_else(|| too_many("heap bytes"))?,
            value: push_heap(&mut t.heap, value).ok_or_else(|| too_many("heap bytes"))?,
        };
        t.xattrs.push(record);
    }
    let xattr_count = u32::try_from(xattrs.len()).map_err(|_| too_many("extended attributes"))?;

    let mut record = InodeRecord {
        kind: FileKind::Regular,
        perm: inode.perm,
        uid: inode.uid,
        gid: inode.gid,
        mtime: inode.mtime,
        data_start: 0,
        data_len: 0,
        size: 0,
        rdev: 0,
        xattr_start,
        xattr_count,
    };
    match inode.content {
        InodeContent::Regular { chunks } => {
            record.data_start = t.chunk_refs.len() as u64;
            record.data_len = u32::try_from(chunks.len()).map_err(|_| too_many("chunks"))?;
            record.size = chunks
                .iter()
                .map(|&c| t.chunks.get(c as usize).map_or(0, |chunk| u64::from(chunk.uncompressed_len)))
                .fold(0u64, u64::saturating_add);
            t.chunk_refs.extend(chunks);
        }
        InodeContent::Directory { mut entries } => {
            record.kind = FileKind::Directory;
            record.data_start = t.dirents.len() as u64;
            record.data_len = u32::try_from(entries.len()).map_err(|_| too_many("directory entries"))?;
            entries.sort();
            for (name, ino) in entries {
                let name = push_heap(&mut t.heap, &name).ok_or_else(|| too_many("heap bytes"))?;
                let ino = u32::try_from(ino).map_err(|_| inode_error(index, format!("entry names inode {ino}, which does not exist")))?;
                t.dirents.push(DirentRecord { name, ino });
            }
        }
        InodeContent::Symlink { target } => {
            record.kind = FileKind::Symlink;
            let at = push_heap(&mut t.heap, &target).ok_or_else(|| too_many("heap bytes"))?;
            record.data_start = at.offset;
            record.data_len = at.len;
            record.size = u64::from(at.len);
        }
        InodeContent::CharDevice { rdev } => {
            record.kind = FileKind::CharDevice;
            record.rdev = rdev;
        }
        InodeContent::BlockDevice { rdev } => {
            record.kind = FileKind::BlockDevice;
            record.rdev = rdev;
        }
        InodeContent::Fifo => record.kind = FileKind::Fifo,
        InodeContent::Socket => record.kind = FileKind::Socket,
    }
    Ok(record)
}

fn push_heap(heap: &mut Vec<u8>, bytes: &[u8]) -> Option<HeapRef> {
    let at = HeapRef { offset: heap.len() as u64, len: u32::try_from(bytes.len()).ok()? };
    heap.extend_from_slice(bytes);
    Some(at)
}
