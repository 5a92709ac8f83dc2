//! An image served by the kernel's EROFS: a FUSE mount holding one file, the image's EROFS
//! form ([`crate::erofs`]), which the kernel then mounts at the image's mount point.
//!
//! The kernel reads the file's metadata part once and keeps it; it reads a file's data the
//! first time a page of it is read, and keeps that in the EROFS file's own page cache. So
//! opening, listing and reading anything warm never reaches this process, and a file's page
//! cache is an ordinary one (large folios included), unlike a FUSE file's. A read of the image
//! file that falls in a file's extent is a read of that file through the chunk loader: fetched,
//! verified and cached as in [`crate::fs`]. A large file read to its end is materialised
//! ([`crate::materialise`]), and later reads of it that miss the page cache come from that copy.
//!
//! The image file is opened with direct I/O, so the FUSE side keeps no second copy of file data
//! and reads nothing ahead across files; EROFS's own readahead asks for what a sequential read
//! needs.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, Request,
};
use tokio::runtime::Handle;

use crate::erofs::{ErofsImage, Piece};
use crate::fs::{fuse_config, init_transfer, read_errno, FsStats, MountConfig, MountSession, Passthrough, DEFAULT_TTL};
use crate::loader::{ChunkLoader, LoadError};
use crate::materialise::Materialiser;
use crate::trace::Trace;

/// The image file's name in its FUSE mount.
pub const IMAGE_FILE: &str = "image.erofs";

/// The FUSE mount's root directory.
const ROOT: INodeNo = INodeNo(1);

/// The image file.
const FILE: INodeNo = INodeNo(2);

/// A read that failed: the file, where in it, and why.
type Failed = (u64, u64, LoadError);

/// A FUSE filesystem of one file: an image's EROFS form, read on demand.
pub struct ImageFileFs {
    /// The image's layout.
    image: Arc<ErofsImage>,
    /// Reads file data.
    loader: Arc<ChunkLoader>,
    /// Makes large files whole once local, for reads that skip the chunk cache.
    local: Arc<Materialiser>,
    /// Runs reads that wait for chunks.
    runtime: Handle,
    /// Records first reads, when tracing.
    trace: Option<Arc<Trace>>,
    /// What was served.
    stats: Arc<FsStats>,
    /// Ask for FUSE over io_uring ([`MountConfig::io_uring`]).
    io_uring: bool,
}

impl ImageFileFs {
    /// A filesystem serving `image`, whose files' data `loader` reads.
    pub fn new(image: Arc<ErofsImage>, loader: Arc<ChunkLoader>, runtime: Handle, trace: Option<Arc<Trace>>) -> Self {
        let local = Arc::new(Materialiser::new(loader.bootstrap().clone(), loader.cache().clone(), runtime.clone()));
        ImageFileFs { image, loader, local, runtime, trace, stats: Arc::new(FsStats::new(Passthrough::Off)), io_uring: false }
    }

    /// What the filesystem materialised.
    pub fn materialiser(&self) -> Arc<Materialiser> {
        self.local.clone()
    }

    /// What the filesystem served; live counters.
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    /// Mounts the filesystem at `dir`; the image file is then `dir/image.erofs`.
    pub fn mount(mut self, dir: &Path, config: &MountConfig) -> io::Result<MountSession> {
        self.io_uring = config.io_uring;
        fuser::spawn_mount(self, dir, &fuse_config(config))
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT => (FileType::Directory, 0o555, 0, 2),
            FILE => (FileType::RegularFile, 0o444, self.image.len(), 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: crate::erofs::BLOCK_SIZE as u32,
            flags: 0,
        })
    }
}

/// The bytes of `pieces` when every chunk they need is local (or, for a local image, can be read
/// right away); `None` when they have to be waited for.
fn read_now(pieces: &[Piece<'_>], loader: &Arc<ChunkLoader>, local: &Materialiser, size: u32) -> Option<Result<Vec<u8>, Failed>> {
    let mut out = Vec::with_capacity(size as usize);
    for piece in pieces.iter().cloned() {
        match piece {
            Piece::Bytes(bytes) => out.extend_from_slice(bytes),
            Piece::Zeros(len) => out.resize(out.len() + len as usize, 0),
            // A materialised copy was checked chunk by chunk as it was written.
            Piece::File { ino, offset, len } if local.may_materialise(ino) && read_materialised(local, ino, offset, len, &mut out) => {}
            Piece::File { ino, offset, len } => {
                match loader.read_cached(ino, offset, len as u32).or_else(|| loader.read_now(ino, offset, len as u32))? {
                    Ok(data) => out.extend_from_slice(&data),
                    Err(e) => return Some(Err((ino, offset, e))),
                }
            }
        }
    }
    Some(Ok(out))
}

/// Appends `len` bytes at `offset` of large file `ino` from its materialised copy; whether it
/// has one that held them.
fn read_materialised(local: &Materialiser, ino: u64, offset: u64, len: u64, out: &mut Vec<u8>) -> bool {
    let Some(file) = local.open(ino) else { return false };
    let start = out.len();
    out.resize(start + len as usize, 0);
    match std::os::unix::fs::FileExt::read_exact_at(&file, &mut out[start..], offset) {
        Ok(()) => true,
        Err(_) => {
            out.truncate(start);
            false
        }
    }
}

/// The bytes `[offset, offset + size)` of `image`, waiting for the chunks they need.
async fn read_waiting(image: &ErofsImage, loader: &Arc<ChunkLoader>, offset: u64, size: u32) -> Result<Vec<u8>, Failed> {
    let mut out = Vec::with_capacity(size as usize);
    for piece in image.pieces(offset, u64::from(size)) {
        match piece {
            Piece::Bytes(bytes) => out.extend_from_slice(bytes),
            Piece::Zeros(len) => out.resize(out.len() + len as usize, 0),
            Piece::File { ino, offset, len } => {
                out.extend_from_slice(&loader.read(ino, offset, len as u32).await.map_err(|e| (ino, offset, e))?)
            }
        }
    }
    Ok(out)
}

impl fuser::Filesystem for ImageFileFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        init_transfer(config, self.io_uring);
        // EROFS reads data with asynchronous direct I/O: let several be in flight.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, name.as_bytes()) {
            (ROOT, name) if name == IMAGE_FILE.as_bytes() => match self.attr(FILE) {
                Some(attr) => reply.entry(&DEFAULT_TTL, &attr, Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            (ROOT, _) => reply.error(Errno::ENOENT),
            _ => reply.error(Errno::ENOTDIR),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&DEFAULT_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match ino {
            // Metadata pages stay cached (KEEP_CACHE); data reads come here as asked (DIRECT_IO).
            FILE => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_DIRECT_IO),
            ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut file_data = false;
        // A large file read to its end has all its chunks local once this read is answered.
        let mut read_to_end = None;
        let pieces = self.image.pieces(offset, u64::from(size));
        for piece in &pieces {
            if let Piece::File { ino, offset, len } = *piece {
                file_data = true;
                if let Some(trace) = &self.trace {
                    trace.record(ino);
                }
                self.loader.note_read(ino, offset, len as u32);
                if offset + len == self.loader.bootstrap().getattr(ino).map_or(0, |a| a.size) {
                    read_to_end = Some(ino);
                }
            }
        }
        let counter = if file_data { &self.stats.reads } else { &self.stats.metadata_reads };
        counter.fetch_add(1, Ordering::Relaxed);
        let answer = move |reply: ReplyData, stats: &FsStats, local: &Arc<Materialiser>, result: Result<Vec<u8>, Failed>| match result {
            Ok(data) => {
                stats.read_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                reply.data(&data);
                if let Some(ino) = read_to_end {
                    local.offer(ino);
                }
            }
            Err((ino, offset, e)) => reply.error(read_errno(ino, offset, &e)),
        };
        match read_now(&pieces, &self.loader, &self.local, size) {
            Some(result) => answer(reply, &self.stats, &self.local, result),
            None => {
                let (image, loader, stats, local) = (self.image.clone(), self.loader.clone(), self.stats.clone(), self.local.clone());
                self.runtime.spawn(async move { answer(reply, &stats, &local, read_waiting(&image, &loader, offset, size).await) });
            }
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            ROOT => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR),
            _ => reply.error(Errno::ENOTDIR),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [(ROOT, FileType::Directory, "."), (ROOT, FileType::Directory, ".."), (FILE, FileType::RegularFile, IMAGE_FILE)];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Mounts `image_file` (an EROFS image) read-only with the kernel's EROFS at `target`. Needs
/// root and Linux 6.12+ (EROFS mounts from a file).
pub fn mount_erofs(image_file: &Path, target: &Path) -> io::Result<()> {
    crate::overlay::mount_fs(image_file.as_os_str().as_bytes(), target, b"erofs", libc::MS_RDONLY | libc::MS_NOATIME, b"")
}
