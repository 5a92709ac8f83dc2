//! Calls every lookup of a decoded bootstrap and checks they agree with one another, and lays
//! it out as EROFS, so a bootstrap that passes validation but breaks an accessor or the EROFS
//! view shows up as a crash.

use shoal_fuse::erofs::{ErofsImage, Piece, BLOCK_SIZE};
use shoal_fuse::format::{Bootstrap, FileKind};

/// Inodes walked per input at most, to keep executions fast on huge inputs.
const MAX_INODES: u64 = 100_000;

pub fn every_lookup(bootstrap: &Bootstrap) {
    let last = bootstrap.inode_count().min(MAX_INODES);
    for ino in 0..=last + 1 {
        let Some(attr) = bootstrap.getattr(ino) else {
            assert!(ino == 0 || ino > bootstrap.inode_count(), "inode {ino} has no attributes");
            continue;
        };
        assert_eq!(attr.ino, ino);
        assert_eq!(bootstrap.parent(ino).is_some(), attr.kind == FileKind::Directory);
        assert_eq!(bootstrap.readlink(ino).map(|target| target.len() as u64), (attr.kind == FileKind::Symlink).then_some(attr.size));
        for (name, value) in bootstrap.xattrs(ino).expect("every inode has an xattr list") {
            assert_eq!(bootstrap.xattr(ino, name), Some(value));
        }
        if let Some(entries) = bootstrap.readdir(ino) {
            for entry in entries {
                assert_eq!(bootstrap.lookup(ino, entry.name), Some(entry.ino));
                assert_eq!(bootstrap.getattr(entry.ino).map(|child| child.kind), Some(entry.kind));
            }
        }
        if let Some(chunks) = bootstrap.chunks_of(ino) {
            let mut end = 0u64;
            let mut count = 0usize;
            for placed in chunks {
                assert_eq!(placed.file_offset, end);
                end += u64::from(placed.chunk.uncompressed_len);
                count += 1;
            }
            assert_eq!(end, attr.size);
            let whole = bootstrap.chunks_in_range(ino, 0, attr.size).expect("a regular file").count();
            assert_eq!(whole, count);
            for placed in bootstrap.chunks_in_range(ino, attr.size / 2, 1).expect("a regular file") {
                assert!(placed.file_offset <= attr.size / 2);
            }
        }
    }
    for ino in bootstrap.prefetch() {
        assert_eq!(bootstrap.getattr(ino).map(|attr| attr.kind), Some(FileKind::Regular));
    }
    if bootstrap.inode_count() <= MAX_INODES {
        erofs_view(bootstrap);
    }
}

/// Lays the bootstrap out as EROFS (what `shoal mount` does as root): it may refuse, never
/// panic, and the image's pieces must cover it exactly, each file's extent holding the file.
fn erofs_view(bootstrap: &Bootstrap) {
    let Ok(image) = ErofsImage::build(bootstrap) else { return };
    assert_eq!(image.len() % BLOCK_SIZE, 0);
    let total: u64 = image.pieces(0, image.len()).iter().map(Piece::len).sum();
    assert_eq!(total, image.len());
    for extent in image.extents() {
        assert_eq!(extent.start % BLOCK_SIZE, 0);
        assert!(extent.start >= image.meta_len() && extent.start + extent.len <= image.len());
        assert_eq!(bootstrap.getattr(extent.ino).map(|attr| attr.size), Some(extent.len));
        let end = image.pieces(extent.start + extent.len - 1, 1);
        assert_eq!(end, vec![Piece::File { ino: extent.ino, offset: extent.len - 1, len: 1 }]);
    }
}
