//! The cross-record rules of the format: what makes a well-formed set of tables a safe
//! bootstrap (indices in range, ranges tiling their tables, a tree rooted at inode 1).

use super::codec::Section;
use super::{
    heap_bytes, inode_error, record_error, Derived, FileKind, FormatError, HeapRef, InodeRecord, Tables, MAX_CHUNK_SIZE,
    MAX_COMPRESSED_CHUNK_SIZE, MAX_NAME_LEN, MAX_SYMLINK_TARGET_LEN, MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_LEN, ROOT_INO,
};

/// Checks every cross-record rule of the format and derives link counts, parents and chunk
/// offsets.
pub(super) fn validate(t: &Tables) -> Result<Derived, FormatError> {
    validate_blobs(t)?;
    validate_chunks(t)?;
    let ref_offsets = validate_inodes(t)?;
    let (nlink, parent) = validate_tree(t)?;
    validate_xattrs(t)?;
    validate_prefetch(t)?;
    Ok(Derived { nlink, parent, ref_offsets })
}

fn validate_blobs(t: &Tables) -> Result<(), FormatError> {
    u32::try_from(t.blobs.len()).map_err(|_| FormatError::SectionTable("more than 2^32 blobs".into()))?;
    let mut order: Vec<usize> = (0..t.blobs.len()).collect();
    order.sort_unstable_by_key(|&i| t.blobs.get(i).map(|b| b.sha256));
    for pair in order.windows(2) {
        if let [a, b] = *pair {
            if t.blobs.get(a).map(|x| x.sha256) == t.blobs.get(b).map(|x| x.sha256) {
                return Err(record_error(Section::Blobs, a.max(b), format!("repeats blob {}", a.min(b))));
            }
        }
    }
    Ok(())
}

fn validate_chunks(t: &Tables) -> Result<(), FormatError> {
    u32::try_from(t.chunks.len()).map_err(|_| FormatError::SectionTable("more than 2^32 chunks".into()))?;
    for (index, chunk) in t.chunks.iter().enumerate() {
        let fail = |reason: String| Err(record_error(Section::Chunks, index, reason));
        let Some(blob) = t.blobs.get(chunk.blob as usize) else {
            return fail(format!("blob index {} is out of range ({} blobs)", chunk.blob, t.blobs.len()));
        };
        if !(1..=MAX_CHUNK_SIZE).contains(&chunk.uncompressed_len) {
            return fail(format!("uncompressed length {} is outside 1..={MAX_CHUNK_SIZE}", chunk.uncompressed_len));
        }
        if !(1..=MAX_COMPRESSED_CHUNK_SIZE).contains(&chunk.compressed_len) {
            return fail(format!("compressed length {} is outside 1..={MAX_COMPRESSED_CHUNK_SIZE}", chunk.compressed_len));
        }
        let end = chunk.compressed_offset.checked_add(u64::from(chunk.compressed_len));
        let fits = matches!(end, Some(end) if end <= blob.size);
        if !fits {
            return fail(format!(
                "compressed range {}+{} lies outside blob {} ({} bytes)",
                chunk.compressed_offset, chunk.compressed_len, chunk.blob, blob.size
            ));
        }
    }
    let mut order: Vec<usize> = (0..t.chunks.len()).collect();
    order.sort_unstable_by_key(|&i| t.chunks.get(i).map(|c| c.digest));
    for pair in order.windows(2) {
        if let [a, b] = *pair {
            if t.chunks.get(a).map(|c| c.digest) == t.chunks.get(b).map(|c| c.digest) {
                return Err(record_error(Section::Chunks, a.max(b), format!("repeats the digest of chunk {}", a.min(b))));
            }
        }
    }
    Ok(())
}

/// Running positions in the range-holding tables: each inode's range must start where the
/// previous inode's range of the same table ended.
#[derive(Default)]
struct Cursors {
    /// Next expected index in the chunk reference table.
    chunk_refs: u64,
    /// Next expected index in the directory entry table.
    dirents: u64,
    /// Next expected index in the xattr table.
    xattrs: u64,
}

/// Checks each inode alone and that the ranges tile their tables; returns each chunk
/// reference's file offset.
fn validate_inodes(t: &Tables) -> Result<Vec<u64>, FormatError> {
    if t.inodes.is_empty() {
        return Err(FormatError::Tree("no root inode".into()));
    }
    if u32::try_from(t.inodes.len()).is_err() {
        return Err(FormatError::SectionTable("more than 2^32 - 1 inodes".into()));
    }
    if t.inodes.first().map(|root| root.kind) != Some(FileKind::Directory) {
        return Err(inode_error(0, "the root is not a directory"));
    }
    let mut ref_offsets = vec![0u64; t.chunk_refs.len()];
    let mut cursors = Cursors::default();
    for (index, inode) in t.inodes.iter().enumerate() {
        validate_inode_fields(index, inode)?;
        take_range(&mut cursors.xattrs, u64::from(inode.xattr_start), inode.xattr_count, t.xattrs.len())
            .map_err(|reason| inode_error(index, format!("extended attributes: {reason}")))?;
        match inode.kind {
            FileKind::Regular => validate_regular(t, index, inode, &mut cursors, &mut ref_offsets)?,
            FileKind::Directory => {
                take_range(&mut cursors.dirents, inode.data_start, inode.data_len, t.dirents.len())
                    .map_err(|reason| inode_error(index, format!("directory entries: {reason}")))?;
            }
            FileKind::Symlink => validate_symlink(t, index, inode)?,
            _ => {}
        }
    }
    let unused = [
        (cursors.chunk_refs, t.chunk_refs.len(), Section::ChunkRefs),
        (cursors.dirents, t.dirents.len(), Section::Dirents),
        (cursors.xattrs, t.xattrs.len(), Section::Xattrs),
    ];
    for (used, len, section) in unused {
        if used != len as u64 {
            return Err(record_error(section, used as usize, "belongs to no inode"));
        }
    }
    Ok(ref_offsets)
}

/// Checks the fields whose meaning does not depend on other tables.
fn validate_inode_fields(index: usize, inode: &InodeRecord) -> Result<(), FormatError> {
    if inode.perm & !0o7777 != 0 {
        return Err(inode_error(index, format!("mode {:o} has bits outside 0o7777", inode.perm)));
    }
    if inode.mtime.nsec >= 1_000_000_000 {
        return Err(inode_error(index, format!("mtime nanoseconds {} is not below 10^9", inode.mtime.nsec)));
    }
    let is_device = matches!(inode.kind, FileKind::CharDevice | FileKind::BlockDevice);
    if !is_device && inode.rdev != 0 {
        return Err(inode_error(index, "only devices have a device number"));
    }
    let has_data = matches!(inode.kind, FileKind::Regular | FileKind::Directory | FileKind::Symlink);
    if !has_data && (inode.data_start != 0 || inode.data_len != 0) {
        return Err(inode_error(index, "only regular files, directories and symlinks have data"));
    }
    let has_size = matches!(inode.kind, FileKind::Regular | FileKind::Symlink);
    if !has_size && inode.size != 0 {
        return Err(inode_error(index, format!("size {} must be 0 for a {:?}", inode.size, inode.kind)));
    }
    Ok(())
}

/// Claims `[start, start + len)` of a table of `table_len` records, which must begin at
/// `cursor`; returns the end.
fn take_range(cursor: &mut u64, start: u64, len: u32, table_len: usize) -> Result<usize, String> {
    if start != *cursor {
        return Err(format!("range starts at {start}, expected {cursor} (ranges follow inode order)"));
    }
    let end = start
        .checked_add(u64::from(len))
        .filter(|&end| end <= table_len as u64)
        .ok_or_else(|| format!("range {start}+{len} runs past the table's {table_len} records"))?;
    *cursor = end;
    Ok(end as usize)
}

fn validate_regular(
    t: &Tables,
    index: usize,
    inode: &InodeRecord,
    cursors: &mut Cursors,
    ref_offsets: &mut [u64],
) -> Result<(), FormatError> {
    let start = cursors.chunk_refs as usize;
    let end = take_range(&mut cursors.chunk_refs, inode.data_start, inode.data_len, t.chunk_refs.len())
        .map_err(|reason| inode_error(index, format!("chunks: {reason}")))?;
    let refs = t.chunk_refs.get(start..end).unwrap_or_default();
    let offsets = ref_offsets.get_mut(start..end).unwrap_or_default();
    let mut file_offset = 0u64;
    for (&chunk_index, slot) in refs.iter().zip(offsets) {
        let chunk = t
            .chunks
            .get(chunk_index as usize)
            .ok_or_else(|| inode_error(index, format!("chunk index {chunk_index} is out of range ({} chunks)", t.chunks.len())))?;
        *slot = file_offset;
        file_offset =
            file_offset.checked_add(u64::from(chunk.uncompressed_len)).ok_or_else(|| inode_error(index, "chunk lengths overflow"))?;
    }
    if file_offset != inode.size {
        return Err(inode_error(index, format!("size {} differs from the {file_offset} bytes its chunks hold", inode.size)));
    }
    Ok(())
}

fn validate_symlink(t: &Tables, index: usize, inode: &InodeRecord) -> Result<(), FormatError> {
    let at = HeapRef { offset: inode.data_start, len: inode.data_len };
    let target = heap_bytes(&t.heap, at).ok_or_else(|| inode_error(index, "symlink target lies outside the heap"))?;
    if target.is_empty() || target.len() > MAX_SYMLINK_TARGET_LEN {
        return Err(inode_error(index, format!("symlink target length {} is outside 1..={MAX_SYMLINK_TARGET_LEN}", target.len())));
    }
    if target.contains(&0) {
        return Err(inode_error(index, "symlink target contains NUL"));
    }
    if inode.size != target.len() as u64 {
        return Err(inode_error(index, format!("size {} differs from the target length {}", inode.size, target.len())));
    }
    Ok(())
}

/// Checks a file name: 1..=255 bytes, no `/` or NUL, not `.` or `..`.
fn check_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("name longer than 255 bytes");
    }
    if name == b"." || name == b".." {
        return Err("name is \".\" or \"..\"");
    }
    if name.iter().any(|&byte| byte == b'/' || byte == 0) {
        return Err("name contains '/' or NUL");
    }
    Ok(())
}

/// Checks directory entries and that directories form a tree rooted at inode 1 naming every
/// inode; returns link counts and directory parents.
fn validate_tree(t: &Tables) -> Result<(Vec<u32>, Vec<u32>), FormatError> {
    let count = t.inodes.len();
    let mut references = vec![0u32; count];
    let mut subdirs = vec![0u32; count];
    let mut parent = vec![0u32; count];
    if let Some(root) = parent.first_mut() {
        *root = ROOT_INO as u32;
    }
    let mut dir_count = 0usize;
    for (index, inode) in t.inodes.iter().enumerate() {
        if inode.kind != FileKind::Directory {
            continue;
        }
        dir_count += 1;
        let entries = range_of(&t.dirents, inode.data_start, inode.data_len);
        let mut previous: Option<&[u8]> = None;
        for (position, entry) in entries.iter().enumerate() {
            let fail = |reason: String| inode_error(index, format!("entry {position}: {reason}"));
            let name = heap_bytes(&t.heap, entry.name).ok_or_else(|| fail("name lies outside the heap".into()))?;
            check_name(name).map_err(|reason| fail(reason.into()))?;
            if previous.is_some_and(|previous| previous >= name) {
                return Err(fail("names are not sorted and unique".into()));
            }
            previous = Some(name);
            let child = entry.ino as usize;
            if child <= 1 || child > count {
                return Err(fail(format!("names inode {}, outside 2..={count}", entry.ino)));
            }
            let child = child - 1;
            let slot = references.get_mut(child).ok_or_else(|| fail("inode out of range".into()))?;
            *slot = slot.checked_add(1).ok_or_else(|| fail("too many links".into()))?;
            if t.inodes.get(child).map(|c| c.kind) == Some(FileKind::Directory) {
                if *slot > 1 {
                    return Err(fail(format!("directory {} has more than one entry naming it", entry.ino)));
                }
                if let Some(p) = parent.get_mut(child) {
                    *p = index as u32 + 1;
                }
                if let Some(s) = subdirs.get_mut(index) {
                    *s = s.checked_add(1).ok_or_else(|| fail("too many subdirectories".into()))?;
                }
            }
        }
    }
    check_reachable(t, dir_count)?;

    let mut nlink = Vec::with_capacity(count);
    for (index, inode) in t.inodes.iter().enumerate() {
        let links = if inode.kind == FileKind::Directory {
            subdirs.get(index).and_then(|s| s.checked_add(2)).ok_or_else(|| inode_error(index, "too many subdirectories"))?
        } else {
            references.get(index).copied().unwrap_or(0)
        };
        if index > 0 && references.get(index) == Some(&0) {
            return Err(inode_error(index, "no directory entry names it"));
        }
        nlink.push(links);
    }
    Ok((nlink, parent))
}

fn range_of<T>(table: &[T], start: u64, len: u32) -> &[T] {
    let Ok(start) = usize::try_from(start) else {
        return &[];
    };
    start.checked_add(len as usize).and_then(|end| table.get(start..end)).unwrap_or_default()
}

/// Every directory has at most one entry naming it and the root has none, so walking down from
/// the root meets each reachable directory once; any directory not met hangs in a cycle.
fn check_reachable(t: &Tables, dir_count: usize) -> Result<(), FormatError> {
    let mut pending = vec![0usize];
    let mut reached = 0usize;
    while let Some(index) = pending.pop() {
        reached += 1;
        if reached > dir_count {
            return Err(FormatError::Tree("a directory is reached twice".into()));
        }
        let Some(inode) = t.inodes.get(index) else { continue };
        for entry in range_of(&t.dirents, inode.data_start, inode.data_len) {
            let child = (entry.ino as usize).wrapping_sub(1);
            if t.inodes.get(child).map(|c| c.kind) == Some(FileKind::Directory) {
                pending.push(child);
            }
        }
    }
    if reached != dir_count {
        return Err(FormatError::Tree(format!(
            "{} of {dir_count} directories are not reachable from the root (a directory cycle)",
            dir_count - reached
        )));
    }
    Ok(())
}

fn validate_xattrs(t: &Tables) -> Result<(), FormatError> {
    for (index, inode) in t.inodes.iter().enumerate() {
        let mut previous: Option<&[u8]> = None;
        for record in range_of(&t.xattrs, u64::from(inode.xattr_start), inode.xattr_count) {
            let fail = |reason: &str| inode_error(index, format!("extended attribute: {reason}"));
            let name = heap_bytes(&t.heap, record.name).ok_or_else(|| fail("name lies outside the heap"))?;
            let value = heap_bytes(&t.heap, record.value).ok_or_else(|| fail("value lies outside the heap"))?;
            if name.is_empty() || name.len() > MAX_XATTR_NAME_LEN || name.contains(&0) {
                return Err(fail("name is empty, longer than 255 bytes or contains NUL"));
            }
            if value.len() > MAX_XATTR_VALUE_LEN {
                return Err(fail("value is longer than 65536 bytes"));
            }
            if previous.is_some_and(|previous| previous >= name) {
                return Err(fail("names are not sorted and unique"));
            }
            previous = Some(name);
        }
    }
    Ok(())
}

fn validate_prefetch(t: &Tables) -> Result<(), FormatError> {
    let mut seen = vec![false; t.inodes.len()];
    for (index, &ino) in t.prefetch.iter().enumerate() {
        let fail = |reason: String| Err(record_error(Section::Prefetch, index, reason));
        let Some(inode_index) = (ino as usize).checked_sub(1) else {
            return fail(format!("inode {ino} does not exist"));
        };
        let (Some(slot), Some(inode)) = (seen.get_mut(inode_index), t.inodes.get(inode_index)) else {
            return fail(format!("inode {ino} does not exist"));
        };
        if *slot {
            return fail(format!("inode {ino} is listed twice"));
        }
        *slot = true;
        if inode.kind != FileKind::Regular {
            return fail(format!("inode {ino} is not a regular file"));
        }
    }
    Ok(())
}
