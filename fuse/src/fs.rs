//! The read-only FUSE filesystem serving a chunked image: metadata from the bootstrap in
//! memory, file data from the chunk loader, or from the kernel itself once a file is local.
//!
//! The image never changes while mounted, so the kernel may cache everything for long: entries
//! and attributes get long TTLs and open files keep their page cache. Reads whose chunks are
//! all local are answered on the FUSE thread; the others wait for their chunks on the runtime
//! without blocking other requests.
//!
//! A small file (up to 128 KiB) whose data is local when it is opened gets that data pushed
//! into the kernel's page cache before the open is answered (FUSE_NOTIFY_STORE), once per
//! mount: reading it then needs no request, so with passthrough on, where every open reaches
//! this process, a small file costs one round trip (its open) instead of two.
//!
//! Once every chunk of a file of several chunks is local, the file is materialised uncompressed
//! in the cache, and later opens hand that file to the kernel (FUSE passthrough): reads then go
//! straight to it and never reach this process. Without passthrough, the first open is answered
//! with ENOSYS, so the kernel opens (and closes) files without asking from then on; directories
//! are opened that way in every mode.
//!
//! The kernel makes that choice for a whole mount, so one mount cannot both hand large files
//! to passthrough and open small ones without asking. A [`View`] shows part of the image: an
//! image is then served as two mounts, one of everything but large files (opened without
//! asking) and one of large files (passthrough), that overlayfs merges ([`crate::overlay`]).
//!
//! The kernel refuses to mix passthrough and cached opens of one inode (the second open fails
//! with ETXTBSY), so an inode stays in the mode of the handles open on it, and all its
//! passthrough handles share one backing id, kept until the last is released.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner,
    MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request, SessionACL,
};
use tokio::runtime::Handle;

/// A mounted filesystem served by background threads; unmounted when dropped.
pub use fuser::BackgroundSession as MountSession;
use tracing::{debug, info, warn};

use crate::format::{Attr, Bootstrap, FileKind, Timestamp};
use crate::loader::{ChunkLoader, LoadError};
use crate::materialise::{is_large_file, Materialiser};
use crate::trace::Trace;

/// How long the kernel may cache entries and attributes: the image is immutable.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Files up to this size have their data put in the kernel's page cache at open when it is
/// local ([`ShoalFs::store_small`]).
const STORE_MAX: u64 = 128 << 10;

/// Block size reported by `stat` and `statfs`.
const BLOCK_SIZE: u32 = 4096;

/// The largest readahead asked of the kernel (it caps it at what it supports).
const MAX_READAHEAD: u32 = 1 << 20;

/// Requests the kernel may have outstanding in the background (readahead).
const MAX_BACKGROUND: u16 = 64;

/// The file handle of opens served by this process.
const PLAIN_FH: FileHandle = FileHandle(0);

/// The file handle of opens served by the kernel from a materialised file.
const PASSTHROUGH_FH: FileHandle = FileHandle(1);

/// Whether opens may use FUSE passthrough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passthrough {
    /// Turned off by configuration.
    Off = 0,
    /// Used for files whose chunks are all local.
    On = 1,
    /// Wanted, but the kernel does not offer it or refused it (it needs CAP_SYS_ADMIN and
    /// Linux 6.9+); every read is served by this process.
    Refused = 2,
}

impl Passthrough {
    /// The state as a word, for logs and stats.
    pub fn as_str(self) -> &'static str {
        match self {
            Passthrough::Off => "off",
            Passthrough::On => "on",
            Passthrough::Refused => "refused",
        }
    }

    fn from_u8(value: u8) -> Passthrough {
        match value {
            1 => Passthrough::On,
            2 => Passthrough::Refused,
            _ => Passthrough::Off,
        }
    }
}

/// Counters of what the filesystem did, shared with whoever reports them.
#[derive(Debug)]
pub struct FsStats {
    /// Opens of regular files served by passthrough: their reads never reach this process.
    pub passthrough_opens: AtomicU64,
    /// Opens of regular files served by this process.
    pub plain_opens: AtomicU64,
    /// Opens answered with ENOSYS, after which the kernel opens this mount's files without
    /// asking (so at most one per mount, more only when several race).
    pub opens_left_to_kernel: AtomicU64,
    /// Releases of regular files (last close of an open).
    pub releases: AtomicU64,
    /// Read requests this process answered.
    pub reads: AtomicU64,
    /// Read requests for EROFS metadata (the image file's first blocks), not file data.
    pub metadata_reads: AtomicU64,
    /// Bytes those reads returned.
    pub read_bytes: AtomicU64,
    /// Opens of small local files whose data was handed to the kernel's page cache at once.
    pub stored_files: AtomicU64,
    /// The passthrough state, a [`Passthrough`].
    passthrough: AtomicU8,
}

impl FsStats {
    pub(crate) fn new(passthrough: Passthrough) -> FsStats {
        FsStats {
            passthrough_opens: AtomicU64::new(0),
            plain_opens: AtomicU64::new(0),
            opens_left_to_kernel: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            metadata_reads: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            stored_files: AtomicU64::new(0),
            passthrough: AtomicU8::new(passthrough as u8),
        }
    }

    /// Whether opens may use passthrough now.
    pub fn passthrough(&self) -> Passthrough {
        Passthrough::from_u8(self.passthrough.load(Ordering::Relaxed))
    }

    /// Marks passthrough refused; true the first time (so it is logged once).
    fn refuse_passthrough(&self) -> bool {
        self.passthrough.compare_exchange(Passthrough::On as u8, Passthrough::Refused as u8, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

/// How an inode is open right now.
#[derive(Default)]
struct OpenInode {
    /// Handles served by this process.
    plain: u32,
    /// Handles served by passthrough.
    passthrough: u32,
    /// The backing id every passthrough handle of the inode uses, while any is open.
    backing: Option<Arc<BackingId>>,
}

/// The filesystem of one mounted image.
pub struct ShoalFs {
    /// The image's metadata.
    bootstrap: Arc<Bootstrap>,
    /// Reads file data.
    loader: Arc<ChunkLoader>,
    /// Runs reads that wait for chunks.
    runtime: Handle,
    /// Records first reads, when tracing.
    trace: Option<Arc<Trace>>,
    /// Entry and attribute TTL.
    ttl: Duration,
    /// Makes local files whole for passthrough.
    local: Arc<Materialiser>,
    /// Open regular files by inode, while passthrough is wanted.
    opens: Mutex<HashMap<u64, OpenInode>>,
    /// What was done.
    stats: Arc<FsStats>,
    /// The kernel opens files without asking (no passthrough wanted, and the kernel supports it).
    zero_message_opens: bool,
    /// The kernel opens directories without asking (it supports it).
    zero_message_opendirs: bool,
    /// Ask for FUSE over io_uring ([`MountConfig::io_uring`]).
    io_uring: bool,
    /// Sends notifications to the kernel, once mounted.
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// Small files whose data is in the kernel's page cache (as far as this mount knows).
    in_page_cache: InodeSet,
    /// The part of the image this mount shows.
    view: View,
    /// With [`View::LargeFiles`]: the directories it shows.
    large_file_dirs: Option<InodeSet>,
}

impl std::fmt::Debug for ShoalFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShoalFs").field("inodes", &self.bootstrap.inode_count()).field("loader", &self.loader).finish_non_exhaustive()
    }
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// The source name shown in the mount table.
    pub fs_name: String,
    /// Threads reading requests from the kernel.
    pub threads: usize,
    /// Let every user (not only the mounting one) use the filesystem; needed for containers.
    pub allow_other: bool,
    /// Have `fusermount3` watch the process and unmount when it dies. Unmounting is then
    /// asynchronous, so a clean shutdown should rather unmount itself (the default).
    pub auto_unmount: bool,
    /// Materialise files whose chunks are all local and serve their later opens by FUSE
    /// passthrough. Falls back to serving reads itself when the kernel refuses.
    pub passthrough: bool,
    /// Take requests over FUSE-over-io_uring when the kernel offers it (Linux 6.14+ with the
    /// fuse module's `enable_uring` on), served on the CPU that issued them; otherwise, and when
    /// off, through /dev/fuse by `threads` threads.
    pub io_uring: bool,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig { fs_name: "shoal".into(), threads: 2, allow_other: true, auto_unmount: false, passthrough: true, io_uring: true }
    }
}

/// Requests this process's mounts took over FUSE-over-io_uring (0 when none uses it).
pub fn io_uring_requests() -> u64 {
    fuser::uring_requests_served()
}

impl ShoalFs {
    /// A filesystem serving `loader`'s image, running waiting reads on `runtime`.
    pub fn new(loader: Arc<ChunkLoader>, runtime: Handle, trace: Option<Arc<Trace>>) -> Self {
        let local = Arc::new(Materialiser::new(loader.bootstrap().clone(), loader.cache().clone(), runtime.clone()));
        let in_page_cache = InodeSet::new(loader.bootstrap().inode_count());
        ShoalFs {
            bootstrap: loader.bootstrap().clone(),
            loader,
            runtime,
            trace,
            ttl: DEFAULT_TTL,
            local,
            opens: Mutex::new(HashMap::new()),
            stats: Arc::new(FsStats::new(Passthrough::On)),
            zero_message_opens: false,
            zero_message_opendirs: false,
            io_uring: false,
            notifier: Arc::new(OnceLock::new()),
            in_page_cache,
            view: View::All,
            large_file_dirs: None,
        }
    }

    /// Shows only part of the image. [`View::SmallFiles`] never uses passthrough.
    pub fn with_view(mut self, view: View) -> Self {
        self.view = view;
        self.large_file_dirs = (view == View::LargeFiles).then(|| dirs_with_large_files(&self.bootstrap));
        self
    }

    /// Whether this mount hides xattr `name`: a mount that overlayfs merges hides overlayfs's
    /// own, which an image may carry from the machine it was built on and which would make
    /// overlayfs hide the other mount's files (`trusted.overlay.opaque`). Overlayfs never
    /// shows them anyway.
    fn hides_xattr(&self, name: &[u8]) -> bool {
        self.view != View::All && name.starts_with(b"trusted.overlay.")
    }

    /// Whether this mount shows inode `ino` of kind `kind`.
    fn shows(&self, ino: u64, kind: FileKind) -> bool {
        match (self.view, kind) {
            (View::All, _) | (View::SmallFiles, FileKind::Directory) => true,
            (View::SmallFiles, _) => !is_large_file(&self.bootstrap, ino),
            (View::LargeFiles, FileKind::Directory) => self.large_file_dirs.as_ref().is_some_and(|dirs| dirs.contains(ino)),
            (View::LargeFiles, _) => is_large_file(&self.bootstrap, ino),
        }
    }

    /// What the filesystem did; live counters.
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    /// What the filesystem materialised.
    pub fn materialiser(&self) -> Arc<Materialiser> {
        self.local.clone()
    }

    /// Mounts the filesystem at `mountpoint`, serving it from background threads until the
    /// returned session is unmounted or dropped.
    pub fn mount(mut self, mountpoint: &Path, config: &MountConfig) -> io::Result<MountSession> {
        self.io_uring = config.io_uring;
        if !config.passthrough || self.view == View::SmallFiles {
            self.stats.passthrough.store(Passthrough::Off as u8, Ordering::Relaxed);
        }
        let fuse_config = fuse_config(config);
        let notifier = self.notifier.clone();
        let session = fuser::spawn_mount(self, mountpoint, &fuse_config)?;
        let _ = notifier.set(session.notifier());
        Ok(session)
    }

    /// Puts small file `ino`'s data in the kernel's page cache when it is local and not there
    /// yet, so that reading it needs no request: an open then costs one round trip, as it
    /// would without passthrough, instead of two.
    fn store_small(&self, ino: u64, size: u64) {
        if size == 0 || size > STORE_MAX || self.in_page_cache.contains(ino) {
            return;
        }
        let Some(notifier) = self.notifier.get() else { return };
        // Only what is local: a missing chunk is fetched by the read, as usual.
        let Some(Ok(data)) = self.loader.read_cached(ino, 0, size as u32) else { return };
        match notifier.store(INodeNo(ino), 0, &data) {
            Ok(()) => {
                self.in_page_cache.insert(ino);
                self.stats.stored_files.fetch_add(1, Ordering::Relaxed);
                if let Some(trace) = &self.trace {
                    // Its reads will not be seen: the open stands for the first read.
                    trace.record(ino);
                }
            }
            Err(e) => debug!(ino, error = %e, "the kernel did not take a small file's data at open; its reads come here"),
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        self.bootstrap.getattr(ino).map(|attr| file_attr(&attr))
    }

    /// The entries of directory `ino` from position `offset` on, each with the position of the
    /// next (0 is ".", 1 is "..", 2 + i is entry i), its inode, kind and name.
    fn dir_entries(&self, ino: u64, offset: u64) -> Option<impl Iterator<Item = (u64, u64, FileKind, &[u8])> + '_> {
        let entries = self.bootstrap.readdir(ino)?;
        let parent = self.bootstrap.parent(ino).unwrap_or(ino);
        let dots = [(ino, b".".as_slice()), (parent, b"..".as_slice())];
        Some(
            dots.into_iter()
                .map(|(child, name)| (child, FileKind::Directory, name))
                .chain(entries.map(|entry| (entry.ino, entry.kind, entry.name)))
                .enumerate()
                .skip(usize::try_from(offset).unwrap_or(usize::MAX))
                .filter(|(_, (child, kind, _))| self.shows(*child, *kind))
                .map(|(position, (child, kind, name))| (position as u64 + 1, child, kind, name)),
        )
    }

    fn opens(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OpenInode>> {
        self.opens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new backing id for file `ino`'s materialised copy; `None` when it has none, or when the
    /// kernel refuses (passthrough is then off for good, said once in the log).
    fn open_backing(&self, ino: u64, reply: &ReplyOpen) -> Option<Arc<BackingId>> {
        let file = self.local.open(ino)?;
        match reply.open_backing(&file) {
            Ok(id) => Some(Arc::new(id)),
            Err(e) => {
                if self.stats.refuse_passthrough() {
                    warn!(error = %e, "the kernel refused a FUSE passthrough file (it needs CAP_SYS_ADMIN and Linux 6.9+); serving every read from shoal");
                }
                None
            }
        }
    }

    /// Opens regular file `ino` by passthrough when it is materialised and no handle served by
    /// this process is open on it; else counts a plain open. Returns the reply when the caller
    /// is to answer it as a plain open.
    fn open_file(&self, ino: u64, reply: ReplyOpen) -> Option<ReplyOpen> {
        // A file that is never materialised is always served here: nothing to track.
        if self.stats.passthrough() == Passthrough::Off || !self.local.may_materialise(ino) {
            return Some(reply);
        }
        let mut opens = self.opens();
        let open = opens.entry(ino).or_default();
        // A backing id is held exactly while passthrough handles are open: they share it.
        let backing = match &open.backing {
            Some(backing) => Some(backing.clone()),
            None if open.plain == 0 && self.stats.passthrough() == Passthrough::On => self.open_backing(ino, &reply),
            None => None,
        };
        if let Some(backing) = backing {
            open.passthrough += 1;
            open.backing = Some(backing.clone());
            // No other flag: the kernel fails a passthrough open carrying FOPEN_KEEP_CACHE (EIO).
            reply.opened_passthrough(PASSTHROUGH_FH, FopenFlags::empty(), &backing);
            self.stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            if let Some(trace) = &self.trace {
                // Its reads will not be seen: the open stands for the first read.
                trace.record(ino);
            }
            return None;
        }
        open.plain += 1;
        Some(reply)
    }
}

/// How fuser mounts an image's filesystem by `config`: read-only, and (as root) with device
/// nodes and set-uid programs working.
pub(crate) fn fuse_config(config: &MountConfig) -> fuser::Config {
    let mut options = vec![
        MountOption::RO,
        MountOption::FSName(config.fs_name.clone()),
        MountOption::Subtype("shoal".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    // An image's device nodes and set-uid programs must work in a container's root.
    if crate::overlay::is_root() {
        options.extend([MountOption::Dev, MountOption::Suid]);
    }
    if config.auto_unmount {
        options.push(MountOption::AutoUnmount);
    }
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = options;
    fuse_config.acl = if config.allow_other || config.auto_unmount { SessionACL::All } else { SessionACL::Owner };
    fuse_config.n_threads = Some(config.threads.max(1));
    fuse_config.clone_fd = config.threads > 1;
    fuse_config
}

/// What every Shoal FUSE mount asks of the kernel at init: 1 MiB reads and readahead, 64
/// requests in the background, and FUSE over io_uring when `io_uring`.
pub(crate) fn init_transfer(config: &mut KernelConfig, io_uring: bool) {
    if let Err(max) = config.set_max_readahead(MAX_READAHEAD) {
        let _ = config.set_max_readahead(max);
    }
    let _ = config.set_max_background(MAX_BACKGROUND);
    // Nothing is ever written; a small max_write also keeps io_uring entries at 1 MiB.
    let _ = config.set_max_write(MAX_READAHEAD);
    // FUSE over io_uring (Linux 6.14+, when the fuse module's enable_uring is on): each
    // request is served by a thread on the CPU that made it, instead of being handed
    // across CPUs, which is most of what an open costs.
    if io_uring && config.add_capabilities(InitFlags::FUSE_OVER_IO_URING).is_ok() {
        info!("FUSE over io_uring on: requests are served on the CPU that issued them");
    }
}

/// Which of the image's files a mount shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The whole image.
    All,
    /// Every directory and everything but large files ([`is_large_file`]): the kernel opens
    /// these files without asking, so a warm small file costs no request at all.
    SmallFiles,
    /// Large files and the directories leading to them, opened by passthrough once local.
    LargeFiles,
}

/// The directories with a large file somewhere beneath them, and the root: the only ones
/// [`View::LargeFiles`] shows, so that overlayfs merges (and looks up twice) no directory it
/// need not.
fn dirs_with_large_files(bootstrap: &Bootstrap) -> InodeSet {
    let dirs = InodeSet::new(bootstrap.inode_count());
    dirs.insert(bootstrap.root());
    for ino in 1..=bootstrap.inode_count() {
        let Some(mut entries) = bootstrap.readdir(ino) else { continue };
        if !entries.any(|entry| is_large_file(bootstrap, entry.ino)) {
            continue;
        }
        // Up to the root, or to a directory marked before (whose ancestors are marked too).
        let mut dir = Some(ino);
        while let Some(d) = dir.filter(|d| !dirs.contains(*d)) {
            dirs.insert(d);
            dir = bootstrap.parent(d).filter(|parent| *parent != d);
        }
    }
    dirs
}

/// Whether the image has a large file ([`is_large_file`]).
pub fn has_large_files(bootstrap: &Bootstrap) -> bool {
    (1..=bootstrap.inode_count()).any(|ino| is_large_file(bootstrap, ino))
}

/// A set of inode numbers `1..=count`, one bit each, shared by the FUSE threads.
struct InodeSet(Vec<AtomicU64>);

impl InodeSet {
    fn new(count: u64) -> InodeSet {
        InodeSet((0..count.div_ceil(64) + 1).map(|_| AtomicU64::new(0)).collect())
    }

    fn slot(&self, ino: u64) -> Option<(&AtomicU64, u64)> {
        Some((self.0.get(usize::try_from(ino / 64).ok()?)?, 1 << (ino % 64)))
    }

    fn contains(&self, ino: u64) -> bool {
        self.slot(ino).is_some_and(|(word, bit)| word.load(Ordering::Relaxed) & bit != 0)
    }

    fn insert(&self, ino: u64) {
        if let Some((word, bit)) = self.slot(ino) {
            word.fetch_or(bit, Ordering::Relaxed);
        }
    }
}

impl fuser::Filesystem for ShoalFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        init_transfer(config, self.io_uring);
        // No FUSE_WRITEBACK_CACHE: the kernel turns passthrough off with it.
        if self.stats.passthrough() == Passthrough::On {
            let offered = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok();
            // A depth of 0 disables passthrough; 1 lets overlayfs stack on this mount.
            if offered && config.set_max_stack_depth(1).is_ok() {
                info!("FUSE passthrough on: files whose chunks are all local are read by the kernel directly");
            } else if self.stats.refuse_passthrough() {
                warn!("the kernel does not offer FUSE passthrough (Linux 6.9+); serving every read from shoal");
            }
        }
        // Without passthrough an open only says "keep the page cache": answering the first
        // with ENOSYS has the kernel open files (and close them) without asking from then on,
        // two round trips fewer per file.
        if self.stats.passthrough() == Passthrough::Off && config.add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT).is_ok() {
            self.zero_message_opens = true;
        }
        // Directories need no handle of ours either: answering the first opendir with ENOSYS
        // has the kernel open and close them without asking, keeping their listing cached.
        if config.add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT).is_ok() {
            self.zero_message_opendirs = true;
        }
        // Optional speedups: fine if the kernel lacks them.
        for flag in [InitFlags::FUSE_CACHE_SYMLINKS, InitFlags::FUSE_PARALLEL_DIROPS, InitFlags::FUSE_DO_READDIRPLUS] {
            let _ = config.add_capabilities(flag);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes();
        let found = match name {
            b"." => Some(parent.0),
            b".." => self.bootstrap.parent(parent.0),
            _ => self.bootstrap.lookup(parent.0, name),
        };
        match found.and_then(|ino| self.bootstrap.getattr(ino)) {
            Some(attr) if self.shows(attr.ino, attr.kind) => reply.entry(&self.ttl, &file_attr(&attr), Generation(0)),
            // Another view's: a negative entry (inode 0), which the kernel keeps for the TTL.
            Some(attr) => reply.entry(&self.ttl, &FileAttr { ino: INodeNo(0), ..file_attr(&attr) }, Generation(0)),
            None if self.bootstrap.getattr(parent.0).is_some_and(|a| a.kind != FileKind::Directory) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&self.ttl, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.bootstrap.readlink(ino.0) {
            Some(target) => reply.data(target),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(attr) = self.bootstrap.getattr(ino.0) else { return reply.error(Errno::ENOENT) };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if attr.kind == FileKind::Directory {
            return reply.error(Errno::EISDIR);
        }
        if attr.kind != FileKind::Regular {
            return reply.opened(PLAIN_FH, FopenFlags::FOPEN_KEEP_CACHE);
        }
        if self.zero_message_opens {
            self.stats.opens_left_to_kernel.fetch_add(1, Ordering::Relaxed);
            return reply.error(Errno::ENOSYS);
        }
        let Some(reply) = self.open_file(ino.0, reply) else { return };
        self.store_small(ino.0, attr.size);
        reply.opened(PLAIN_FH, FopenFlags::FOPEN_KEEP_CACHE);
        self.stats.plain_opens.fetch_add(1, Ordering::Relaxed);
        if self.stats.passthrough() == Passthrough::On {
            // Its chunks may be local already (prefetch, another file with the same data).
            self.local.offer(ino.0);
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if !matches!(self.bootstrap.getattr(ino.0), Some(attr) if attr.kind == FileKind::Regular) {
            return reply.ok();
        }
        self.stats.releases.fetch_add(1, Ordering::Relaxed);
        let plain = fh != PASSTHROUGH_FH;
        let mut opens = self.opens();
        if let Some(open) = opens.get_mut(&ino.0) {
            if plain {
                open.plain = open.plain.saturating_sub(1);
            } else {
                open.passthrough = open.passthrough.saturating_sub(1);
                if open.passthrough == 0 {
                    // The kernel holds its own reference for files still open; this only
                    // frees the id.
                    open.backing = None;
                }
            }
            if open.plain == 0 && open.passthrough == 0 {
                opens.remove(&ino.0);
            }
        }
        drop(opens);
        reply.ok();
        // A file read through once has all its chunks local now: make it whole for the next open.
        if plain && self.stats.passthrough() == Passthrough::On {
            self.local.offer(ino.0);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let ino = ino.0;
        if let Some(trace) = &self.trace {
            trace.record(ino);
        }
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        let cached = self.loader.read_cached(ino, offset, size).or_else(|| self.loader.read_now(ino, offset, size));
        self.loader.note_read(ino, offset, size);
        match cached {
            Some(Ok(data)) => {
                self.stats.read_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                if offset == 0 && self.bootstrap.getattr(ino).is_some_and(|a| a.size <= STORE_MAX && a.size <= data.len() as u64) {
                    // The kernel keeps what it reads whole (FOPEN_KEEP_CACHE).
                    self.in_page_cache.insert(ino);
                }
                reply.data(&data)
            }
            Some(Err(e)) => reply.error(read_errno(ino, offset, &e)),
            None => {
                let (loader, stats) = (self.loader.clone(), self.stats.clone());
                self.runtime.spawn(async move {
                    match loader.read(ino, offset, size).await {
                        Ok(data) => {
                            stats.read_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                            reply.data(&data)
                        }
                        Err(e) => reply.error(read_errno(ino, offset, &e)),
                    }
                });
            }
        }
    }

    /// Nothing to flush on a read-only filesystem: ENOSYS tells the kernel never to ask again,
    /// which spares every close a round trip.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    /// No ioctl applies to an image's files: ENOTTY, what `isatty` and friends expect of a
    /// regular file (the default answer logs a warning for every one).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.bootstrap.getattr(ino.0) {
            // The kernel then keeps the listing cached, as it does with these flags.
            Some(attr) if attr.kind == FileKind::Directory && self.zero_message_opendirs => reply.error(Errno::ENOSYS),
            Some(attr) if attr.kind == FileKind::Directory => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR)
            }
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(entries) = self.dir_entries(ino.0, offset) else { return reply.error(Errno::ENOTDIR) };
        for (next, child, kind, name) in entries {
            if reply.add(INodeNo(child), next, file_type(kind), OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    /// Listing with every entry's attributes, so walking a tree needs no lookup per entry.
    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let Some(entries) = self.dir_entries(ino.0, offset) else { return reply.error(Errno::ENOTDIR) };
        for (next, child, _, name) in entries {
            let Some(attr) = self.attr(child) else { continue };
            if reply.add(INodeNo(child), next, OsStr::from_bytes(name), &self.ttl, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks =
            self.bootstrap.chunks().iter().map(|chunk| u64::from(chunk.uncompressed_len)).sum::<u64>().div_ceil(u64::from(BLOCK_SIZE));
        reply.statfs(blocks, 0, 0, self.bootstrap.inode_count(), 0, BLOCK_SIZE, 255, BLOCK_SIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if self.bootstrap.getattr(ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        match self.bootstrap.xattr(ino.0, name.as_bytes()) {
            Some(_) if self.hides_xattr(name.as_bytes()) => reply.error(Errno::ENODATA),
            None => reply.error(Errno::ENODATA),
            Some(value) => reply_sized(reply, size, value),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(xattrs) = self.bootstrap.xattrs(ino.0) else { return reply.error(Errno::ENOENT) };
        let mut names = Vec::new();
        for (name, _) in xattrs.filter(|(name, _)| !self.hides_xattr(name)) {
            names.extend_from_slice(name);
            names.push(0);
        }
        reply_sized(reply, size, &names);
    }
}

/// Answers an xattr request: the length when `size` is 0, the bytes when they fit, else ERANGE.
fn reply_sized(reply: ReplyXattr, size: u32, bytes: &[u8]) {
    match u32::try_from(bytes.len()) {
        Ok(len) if size == 0 => reply.size(len),
        Ok(len) if len <= size => reply.data(bytes),
        _ => reply.error(Errno::ERANGE),
    }
}

/// The errno a failed read returns: EIO, never partial or wrong data.
pub(crate) fn read_errno(ino: u64, offset: u64, e: &LoadError) -> Errno {
    match e {
        LoadError::NotFound(reason) => {
            debug!(ino, %reason, "read of a non-file");
            Errno::EINVAL
        }
        _ => {
            warn!(ino, offset, error = %e, "read failed: EIO");
            Errno::EIO
        }
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

/// The attributes `stat` shows for an inode.
pub fn file_attr(attr: &Attr) -> FileAttr {
    let mtime = system_time(attr.mtime);
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: file_type(attr.kind),
        perm: (attr.perm & 0o7777) as u16,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: fuse_rdev(attr.rdev),
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

/// A bootstrap timestamp as a `SystemTime` (the epoch if it cannot be represented).
fn system_time(t: Timestamp) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nsec));
    let time = if t.sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(t.sec.unsigned_abs())).and_then(|time| time.checked_add(nanos))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(t.sec.unsigned_abs())).and_then(|time| time.checked_add(nanos))
    };
    time.unwrap_or(UNIX_EPOCH)
}

/// Converts a device number from glibc's 64-bit `makedev` encoding (the bootstrap's) to the
/// 32-bit encoding the FUSE protocol carries and EROFS stores (the kernel's `new_encode_dev`).
pub fn fuse_rdev(rdev: u64) -> u32 {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & 0xffff_f000);
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xffff_ff00);
    ((minor & 0xff) | ((major & 0xfff) << 8) | ((minor & 0xfff00) << 12)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::make_dev;

    #[test]
    fn device_numbers_convert_to_the_kernel_encoding() {
        // The kernel's new_encode_dev: minor low byte, 12 bits of major, then the minor's rest.
        assert_eq!(fuse_rdev(make_dev(1, 3)), (1 << 8) | 3);
        assert_eq!(fuse_rdev(make_dev(136, 300)), (300 & 0xff) | (136 << 8) | ((300 & !0xff) << 12));
        assert_eq!(fuse_rdev(make_dev(4095, 0xfffff)), 0xff | (4095 << 8) | (0xfff00 << 12));
    }

    #[test]
    fn timestamps_before_the_epoch_are_kept() {
        let t = system_time(Timestamp { sec: -2, nsec: 500_000_000 });
        assert_eq!(UNIX_EPOCH.duration_since(t).unwrap(), Duration::from_millis(1500));
        let t = system_time(Timestamp { sec: 1_700_000_000, nsec: 123 });
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap(), Duration::new(1_700_000_000, 123));
    }
}
