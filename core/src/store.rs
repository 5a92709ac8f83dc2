//! The content store: each task's bytes in one file the length of its blob (sparse until pieces
//! arrive), its piece bitmap and piece digests in a JSON file next to it, written atomically so a
//! killed agent resumes where it stopped.
//!
//! Quota: the store counts the bytes it holds (a complete task whole, an incomplete one the pieces
//! written), so a length an origin claims costs nothing until its bytes arrive. A task in use (any
//! handle open) holds its whole length: a new task is admitted only if it fits beside the tasks in
//! use, and a task in use is never evicted. When the last handle of an incomplete task goes (a
//! failed or abandoned download) its reservation goes with it; it keeps the pieces it wrote for a
//! later request to resume, or is deleted if it has none. Room is made as bytes arrive: past the
//! high watermark, unused tasks are evicted down to the low one, incomplete ones first, then
//! complete ones least recently used first.
//!
//! Durability without fsync on the hot path: the bitmap is rewritten (atomically, not synced) every
//! few pieces, which survives a killed process. After a power loss a piece marked present may hold
//! garbage, so a resumed task re-checks its pieces against their blake3 ([`TaskFile::verify_pieces`]);
//! only completion is synced (data, then metadata), so a task marked complete on disk is complete.
//!
//! Layout: `<data_dir>/tasks/<task id>/data` and `<data_dir>/tasks/<task id>/meta.json`. Blobs of
//! private images live here, so every directory is 0700 and every file 0600 whatever the umask
//! (an older store's modes are put right at open).
//! All methods do blocking file I/O: async callers run them on the blocking pool.

use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use lru::LruCache;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::digest::TaskId;
use crate::piece::{Bitmap, PieceLayout};

/// Persist the bitmap after this many new pieces...
const FLUSH_PIECES: u32 = 16;
/// ...or when this long has passed since the last flush, whichever comes first.
const FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// Mode of every store directory: the owner's only.
const DIR_MODE: u32 = 0o700;
/// Mode of every store file: the owner's only.
const FILE_MODE: u32 = 0o600;
/// Marks the directory of a task being removed (renamed first, so a new task of the same id never
/// meets it); not a task id, so a store opened after a crash removes it.
const REMOVED: &str = ".removed-";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("task {task} needs {needed} bytes but the store quota is {quota} bytes (raise [store] quota in shoal.toml)")]
    TooLarge { task: TaskId, needed: u64, quota: u64 },
    #[error(
        "store is full: task {task} needs {needed} bytes, {used} of {quota} are used by tasks in use (raise [store] quota or free disk)"
    )]
    QuotaFull { task: TaskId, needed: u64, used: u64, quota: u64 },
    #[error("disk full writing {path}: free space under the data_dir or lower [store] quota")]
    DiskFull { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("data_dir {path} is in use by another shoal process (stop it, or give this one another data_dir)")]
    Locked { path: PathBuf },
}

impl StoreError {
    fn io(path: &Path, source: io::Error) -> StoreError {
        if source.kind() == io::ErrorKind::StorageFull || source.raw_os_error() == Some(libc::ENOSPC) {
            StoreError::DiskFull { path: path.into() }
        } else {
            StoreError::Io { path: path.into(), source }
        }
    }
}

/// What `meta.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskMeta {
    /// The task these bytes belong to.
    pub task: TaskId,
    /// How the task is cut into pieces.
    pub layout: PieceLayout,
    /// Which pieces are written and synced.
    pub bitmap: Bitmap,
    /// blake3 (hex) of each piece present; empty for missing pieces.
    pub piece_blake3: Vec<String>,
    /// True once the whole task was checked against its digest.
    pub complete: bool,
    /// The registry the task's bytes were fetched from (blob tasks). A request naming another
    /// registry never gets them; a task without one (stored by an older version) is fetched anew.
    #[serde(default)]
    pub registry: Option<String>,
    /// Whether that registry answered the blob's digest without credentials: only such tasks are
    /// shared with peers that are not authenticated cluster members.
    #[serde(default)]
    pub public: bool,
}

impl TaskMeta {
    fn new(task: TaskId, layout: PieceLayout) -> TaskMeta {
        let n = layout.count();
        TaskMeta {
            task,
            layout,
            bitmap: Bitmap::new(n),
            piece_blake3: vec![String::new(); n as usize],
            complete: false,
            registry: None,
            public: false,
        }
    }

    fn is_consistent(&self, id: &TaskId) -> bool {
        &self.task == id
            && self.layout.piece_size > 0
            && self.bitmap.len() == self.layout.count()
            && self.bitmap.is_valid()
            && self.piece_blake3.len() == self.bitmap.len() as usize
            && (!self.complete || self.bitmap.is_full())
    }

    /// Bytes the store counts for this task: all of it once complete, else the pieces present.
    fn stored(&self) -> u64 {
        if self.complete {
            return self.layout.len;
        }
        (0..self.layout.count()).filter(|&n| self.bitmap.has(n)).map(|n| piece_len(self.layout, n)).sum()
    }
}

/// Usage figures for status pages and metrics.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Usage {
    /// Bytes stored: complete tasks whole, incomplete tasks the pieces written.
    pub used_bytes: u64,
    /// The configured quota.
    pub quota_bytes: u64,
    /// Number of tasks on disk.
    pub tasks: usize,
    /// Number of completed tasks on disk.
    pub complete_tasks: usize,
    /// Tasks evicted since start.
    pub evictions: u64,
}

/// The content store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Held (with an exclusive `flock`) for as long as the store is open.
    _lock: File,
    dir: PathBuf,
    quota: u64,
    high: u64,
    low: u64,
    state: Mutex<State>,
    /// Held while a task is opened or created, so two callers never create the same task at once.
    opening: Mutex<()>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct State {
    /// Every task on disk.
    entries: HashMap<TaskId, Entry>,
    /// Every task on disk, least recently used first out.
    lru: LruCache<TaskId, ()>,
    /// Open handles; a task with a live handle is in use: it holds its whole length and is never
    /// evicted.
    open: HashMap<TaskId, Weak<TaskFile>>,
    /// Bytes stored, the sum of every entry's `stored`.
    used: u64,
    evictions: u64,
    /// Tasks removed since start, numbering their directories while they are deleted.
    removals: u64,
}

#[derive(Clone)]
struct Entry {
    len: u64,
    /// Bytes of the pieces written; the whole length once complete.
    stored: u64,
    complete: bool,
    /// The registry the bytes come from (`meta.json`'s), kept here so a request can be matched
    /// against it without opening the task.
    registry: Option<String>,
}

impl State {
    fn in_use(&self, id: &TaskId) -> bool {
        self.open.get(id).is_some_and(|w| w.strong_count() > 0)
    }

    /// Whether `file` is the handle the store has registered for its task (a handle of a task
    /// removed meanwhile is not, and must not change the accounting of a new task of that id).
    fn is_registered(&self, file: &TaskFile) -> bool {
        self.open.get(&file.id).is_some_and(|w| std::ptr::eq(w.as_ptr(), file))
    }

    /// Forgets a task and renames its directory out of the way; the caller deletes what this
    /// returns once the lock is released.
    fn discard(&mut self, dir: &Path, id: &TaskId) -> Option<PathBuf> {
        if let Some(e) = self.entries.remove(id) {
            self.used -= e.stored;
        }
        self.lru.pop(id);
        self.open.remove(id);
        self.removals += 1;
        let gone = dir.join(format!("{}{REMOVED}{}", id.as_str(), self.removals));
        match fs::rename(dir.join(id.as_str()), &gone) {
            Ok(()) => Some(gone),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            // Cannot move it aside: delete it where it is.
            Err(_) => Some(dir.join(id.as_str())),
        }
    }

    /// Evicts unused tasks until at most `target` bytes are stored: incomplete ones first (nobody
    /// is downloading them), then complete ones, least recently used first in each kind.
    fn evict(&mut self, dir: &Path, target: u64) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        if self.used <= target {
            return removed;
        }
        let order: Vec<TaskId> = self.lru.iter().rev().map(|(id, _)| id.clone()).collect();
        for complete in [false, true] {
            for id in &order {
                if self.used <= target {
                    return removed;
                }
                let Some(e) = self.entries.get(id) else { continue };
                // A task without bytes frees nothing; one being created has no handle yet.
                if e.complete != complete || e.stored == 0 || self.in_use(id) {
                    continue;
                }
                info!(task = %id, complete, bytes = e.stored, "evicting least recently used task");
                self.evictions += 1;
                removed.extend(self.discard(dir, id));
            }
        }
        removed
    }
}

impl Store {
    /// Opens (creating) the store under `data_dir`, loading every task found there. Tasks whose
    /// metadata is unreadable or inconsistent are deleted, and so are downloads that never got a
    /// piece.
    pub fn open(data_dir: &Path, quota: u64, high_watermark: f64, low_watermark: f64) -> Result<Store, StoreError> {
        if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| StoreError::io(parent, e))?;
        }
        private_dir(data_dir).map_err(|e| StoreError::io(data_dir, e))?;
        let dir = data_dir.join("tasks");
        private_dir(&dir).map_err(|e| StoreError::io(&dir, e))?;
        let lock_path = data_dir.join("lock");
        let lock = private_file(OpenOptions::new().write(true).create(true).truncate(true), &lock_path)
            .map_err(|e| StoreError::io(&lock_path, e))?;
        // SAFETY: flock on a descriptor we own; no memory is shared with the kernel.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Locked { path: data_dir.into() });
        }
        let mut found: Vec<(std::time::SystemTime, TaskId, Entry)> = Vec::new();
        for dirent in fs::read_dir(&dir).map_err(|e| StoreError::io(&dir, e))? {
            let dirent = dirent.map_err(|e| StoreError::io(&dir, e))?;
            let path = dirent.path();
            let name = dirent.file_name().to_string_lossy().into_owned();
            if name.contains(REMOVED) {
                let _ = fs::remove_dir_all(&path);
                continue;
            }
            let loaded = TaskId::parse(&name).and_then(|id| {
                let meta = read_meta(&path).ok()?;
                let data = fs::metadata(path.join("data")).ok()?;
                (meta.is_consistent(&id) && data.len() == meta.layout.len && make_private(&path).is_ok())
                    .then(|| (data.modified().unwrap_or(std::time::UNIX_EPOCH), id, meta))
            });
            match loaded {
                Some((_, id, meta)) if !meta.complete && meta.stored() == 0 => {
                    info!(task = %id, "removing a download that never got a piece");
                    let _ = fs::remove_dir_all(&path);
                }
                Some((mtime, id, meta)) => found.push((
                    mtime,
                    id,
                    Entry { len: meta.layout.len, stored: meta.stored(), complete: meta.complete, registry: meta.registry.clone() },
                )),
                None => {
                    warn!(path = %path.display(), "removing unreadable task from the store");
                    let _ = fs::remove_dir_all(&path);
                }
            }
        }
        found.sort_by_key(|(mtime, _, _)| *mtime);
        let mut state =
            State { entries: HashMap::new(), lru: LruCache::unbounded(), open: HashMap::new(), used: 0, evictions: 0, removals: 0 };
        for (_, id, entry) in found {
            state.used += entry.stored;
            state.lru.put(id.clone(), ());
            state.entries.insert(id, entry);
        }
        info!(dir = %dir.display(), tasks = state.entries.len(), used = state.used, quota, "content store opened");
        Ok(Store {
            inner: Arc::new(Inner {
                _lock: lock,
                dir,
                quota,
                high: (quota as f64 * high_watermark) as u64,
                low: (quota as f64 * low_watermark) as u64,
                state: Mutex::new(state),
                opening: Mutex::new(()),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state()
    }

    /// Usage figures.
    pub fn usage(&self) -> Usage {
        let s = self.state();
        Usage {
            used_bytes: s.used,
            quota_bytes: self.inner.quota,
            tasks: s.entries.len(),
            complete_tasks: s.entries.values().filter(|e| e.complete).count(),
            evictions: s.evictions,
        }
    }

    /// The length of a completed task, from memory (no file is touched).
    pub fn complete_len(&self, id: &TaskId) -> Option<u64> {
        self.state().entries.get(id).filter(|e| e.complete).map(|e| e.len)
    }

    /// The length of a completed task whose bytes came from `registry`, from memory.
    pub fn complete_len_from(&self, id: &TaskId, registry: &str) -> Option<u64> {
        self.state().entries.get(id).filter(|e| e.complete && e.registry.as_deref() == Some(registry)).map(|e| e.len)
    }

    /// A handle on a completed task, marking it recently used; `None` if absent or incomplete.
    pub fn complete(&self, id: &TaskId) -> Option<Arc<TaskFile>> {
        let handle = {
            let mut s = self.state();
            if !s.entries.get(id)?.complete {
                return None;
            }
            s.lru.promote(id);
            s.open.get(id).and_then(Weak::upgrade)
        };
        handle.or_else(|| self.open_existing(id).ok().flatten())
    }

    /// A handle on the task, opening what is on disk (to resume) or creating it. Fails with
    /// [`StoreError::TooLarge`] or [`StoreError::QuotaFull`] when the task cannot fit beside the
    /// tasks in use, and [`StoreError::DiskFull`] when the filesystem cannot hold it. Nothing is
    /// evicted here: room is made as the task's bytes arrive ([`TaskFile::piece_written`]).
    pub fn open_task(&self, id: &TaskId, layout: PieceLayout) -> Result<Arc<TaskFile>, StoreError> {
        let _opening = self.inner.opening.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = self.state().open.get(id).and_then(Weak::upgrade) {
            return Ok(h);
        }
        if let Some(h) = self.open_existing(id)? {
            if h.layout() == layout {
                if !h.is_complete() {
                    // Resuming: the rest must fit like a new task's would. On error the handle
                    // goes and the task keeps its pieces, as before.
                    self.admit(id, layout.len)?;
                }
                self.state().lru.promote(id);
                return Ok(h);
            }
            if h.is_complete() && h.layout().len == layout.len {
                // Stored under another piece size (an earlier version's rule): same bytes, new cut.
                h.relayout(layout)?;
                self.state().lru.promote(id);
                return Ok(h);
            }
            warn!(task = %id, "stored task has a different length than the origin reports; starting over");
            drop(h);
            self.remove(id);
        }
        self.admit(id, layout.len)?;
        {
            let mut s = self.state();
            s.entries.insert(id.clone(), Entry { len: layout.len, stored: 0, complete: false, registry: None });
            s.lru.put(id.clone(), ());
        }
        match self.create(id, layout) {
            Ok(h) => Ok(h),
            Err(e) => {
                self.remove(id);
                Err(e)
            }
        }
    }

    /// Checks that task `id` of `len` bytes fits beside the other tasks in use, within the quota
    /// and on the disk (counting what evicting unused tasks would free).
    fn admit(&self, id: &TaskId, len: u64) -> Result<(), StoreError> {
        let inner = &self.inner;
        if len > inner.quota {
            return Err(StoreError::TooLarge { task: id.clone(), needed: len, quota: inner.quota });
        }
        let free = disk_free(&inner.dir).map_err(|e| StoreError::io(&inner.dir, e))?;
        let s = self.state();
        let (mut held, mut promised, mut evictable, mut stored) = (0, 0, 0, 0);
        for (other, e) in &s.entries {
            if other == id {
                stored = e.stored;
            } else if s.in_use(other) {
                held += e.len;
                promised += e.len - e.stored;
            } else {
                evictable += e.stored;
            }
        }
        if held + len > inner.quota {
            return Err(StoreError::QuotaFull { task: id.clone(), needed: len, used: held, quota: inner.quota });
        }
        if free + evictable < promised + (len - stored.min(len)) {
            return Err(StoreError::DiskFull { path: inner.dir.join(id.as_str()) });
        }
        Ok(())
    }

    fn open_existing(&self, id: &TaskId) -> Result<Option<Arc<TaskFile>>, StoreError> {
        if !self.state().entries.contains_key(id) {
            return Ok(None);
        }
        let path = self.inner.dir.join(id.as_str());
        let meta = match read_meta(&path) {
            Ok(meta) => meta,
            // Removed since the check above.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        let data_path = path.join("data");
        let data = OpenOptions::new().read(true).write(true).open(&data_path).map_err(|e| StoreError::io(&data_path, e))?;
        Ok(self.register(id, path, data, meta))
    }

    /// The handle of task `id`: the live one, or a new one on `data`. `None` when the task was
    /// removed meanwhile.
    fn register(&self, id: &TaskId, path: PathBuf, data: File, meta: TaskMeta) -> Option<Arc<TaskFile>> {
        let mut s = self.state();
        if let Some(h) = s.open.get(id).and_then(Weak::upgrade) {
            return Some(h);
        }
        if !s.entries.contains_key(id) {
            return None;
        }
        let handle = Arc::new(TaskFile {
            id: id.clone(),
            dir: path,
            data,
            meta: Mutex::new(MetaState { meta, dirty: 0, last_flush: Instant::now() }),
            store: Arc::downgrade(&self.inner),
        });
        s.open.insert(id.clone(), Arc::downgrade(&handle));
        Some(handle)
    }

    fn create(&self, id: &TaskId, layout: PieceLayout) -> Result<Arc<TaskFile>, StoreError> {
        let path = self.inner.dir.join(id.as_str());
        let _ = fs::remove_dir_all(&path);
        private_dir(&path).map_err(|e| StoreError::io(&path, e))?;
        let data_path = path.join("data");
        let data = private_file(OpenOptions::new().read(true).write(true).create(true).truncate(true), &data_path)
            .map_err(|e| StoreError::io(&data_path, e))?;
        // Sparse: the blocks come with the bytes, so a claimed length takes no disk.
        data.set_len(layout.len).map_err(|e| StoreError::io(&data_path, e))?;
        let meta = TaskMeta::new(id.clone(), layout);
        write_meta(&path, &meta, false).map_err(|e| StoreError::io(&path, e))?;
        self.register(id, path, data, meta)
            .ok_or_else(|| StoreError::io(&self.inner.dir.join(id.as_str()), io::Error::other("task removed while it was created")))
    }

    /// Deletes a task and its bytes. Handles still open keep reading the unlinked file.
    pub fn remove(&self, id: &TaskId) {
        let gone = self.state().discard(&self.inner.dir, id);
        if let Some(path) = gone {
            let _ = fs::remove_dir_all(path);
        }
    }

    /// Ids of every task on disk, for status pages.
    pub fn task_ids(&self) -> Vec<TaskId> {
        self.state().entries.keys().cloned().collect()
    }
}

struct MetaState {
    meta: TaskMeta,
    /// Pieces recorded since the last flush.
    dirty: u32,
    last_flush: Instant,
}

/// An open task: its data file and metadata. While any handle is alive, the task is not evicted.
pub struct TaskFile {
    id: TaskId,
    dir: PathBuf,
    data: File,
    meta: Mutex<MetaState>,
    store: Weak<Inner>,
}

impl TaskFile {
    fn meta(&self) -> MutexGuard<'_, MetaState> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The task's id.
    pub fn id(&self) -> &TaskId {
        &self.id
    }

    /// How the task is cut into pieces.
    pub fn layout(&self) -> PieceLayout {
        self.meta().meta.layout
    }

    /// A copy of the piece bitmap.
    pub fn bitmap(&self) -> Bitmap {
        self.meta().meta.bitmap.clone()
    }

    /// Whether piece `n` is present.
    pub fn has_piece(&self, n: u32) -> bool {
        self.meta().meta.bitmap.has(n)
    }

    /// Whether the task was verified complete.
    pub fn is_complete(&self) -> bool {
        self.meta().meta.complete
    }

    /// The registry the task's bytes come from, once recorded.
    pub fn registry(&self) -> Option<String> {
        self.meta().meta.registry.clone()
    }

    /// Whether the registry answered the blob's digest without credentials.
    pub fn is_public(&self) -> bool {
        self.meta().meta.public
    }

    /// Records where the task's bytes come from, and whether anyone may read them there, on disk
    /// at once (a task's origin must never be lost while its bytes are kept).
    pub fn set_origin(&self, registry: &str, public: bool) -> Result<(), StoreError> {
        let mut m = self.meta();
        if m.meta.registry.as_deref() == Some(registry) && m.meta.public == public {
            return Ok(());
        }
        m.meta.registry = Some(registry.to_string());
        m.meta.public = public;
        self.flush_locked(&mut m)?;
        if let Some(inner) = self.store.upgrade() {
            let mut s = inner.state();
            if s.is_registered(self) {
                if let Some(e) = s.entries.get_mut(&self.id) {
                    e.registry = Some(registry.to_string());
                }
            }
        }
        Ok(())
    }

    /// blake3 of piece `n`, if present.
    pub fn piece_blake3(&self, n: u32) -> Option<String> {
        self.meta().meta.piece_blake3.get(n as usize).filter(|s| !s.is_empty()).cloned()
    }

    /// Writes bytes at `offset`.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.data.write_all_at(bytes, offset).map_err(|e| StoreError::io(&self.dir.join("data"), e))
    }

    /// Reads up to `buf.len()` bytes at `offset`, returning how many were read.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, StoreError> {
        let mut done = 0;
        while done < buf.len() {
            match self.data.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StoreError::io(&self.dir.join("data"), e)),
            }
        }
        Ok(done)
    }

    /// Checks every piece the bitmap says is present against its recorded blake3, and forgets the
    /// ones that do not match (torn by a power loss). Returns how many were dropped.
    pub fn verify_pieces(&self) -> Result<u32, StoreError> {
        let (layout, present) = {
            let m = self.meta();
            let present: Vec<(u32, String)> =
                (0..m.meta.bitmap.len()).filter(|&n| m.meta.bitmap.has(n)).map(|n| (n, m.meta.piece_blake3[n as usize].clone())).collect();
            (m.meta.layout, present)
        };
        let mut bad = Vec::new();
        let mut buf = vec![0u8; layout.piece_size as usize];
        for (n, expected) in present {
            if self.hash_piece(layout, n, &mut buf)?.as_deref() != Some(expected.as_str()) {
                bad.push(n);
            }
        }
        self.forget_pieces(&bad)?;
        Ok(bad.len() as u32)
    }

    /// Forgets pieces `pieces` of an incomplete task (their bytes turned out not to be wanted:
    /// torn, or found bad by a reader that checks them), so they are fetched again.
    pub fn forget_pieces(&self, pieces: &[u32]) -> Result<(), StoreError> {
        let mut m = self.meta();
        if m.meta.complete {
            return Ok(());
        }
        let mut freed = 0;
        for &n in pieces {
            if !m.meta.bitmap.has(n) {
                continue;
            }
            freed += piece_len(m.meta.layout, n);
            m.meta.bitmap.unset(n);
            m.meta.piece_blake3[n as usize].clear();
        }
        if freed == 0 {
            return Ok(());
        }
        self.uncharge(freed);
        self.flush_locked(&mut m)
    }

    /// Cuts a complete task into pieces of another size: each new piece's blake3 is computed from
    /// the stored bytes (read once), so the task can be served to peers that use `layout`.
    pub fn relayout(&self, layout: PieceLayout) -> Result<(), StoreError> {
        let (current, complete) = {
            let m = self.meta();
            (m.meta.layout, m.meta.complete)
        };
        if current == layout {
            return Ok(());
        }
        if !complete || current.len != layout.len {
            return Err(StoreError::io(&self.dir, io::Error::other("only a complete task of the same length can be cut anew")));
        }
        // A complete task's bytes no longer change: they are hashed without holding the metadata
        // lock, so readers of this handle are not held up by a whole-blob read.
        let mut buf = vec![0u8; layout.piece_size as usize];
        let mut bitmap = Bitmap::new(layout.count());
        let mut digests = Vec::with_capacity(layout.count() as usize);
        for n in 0..layout.count() {
            let digest = self.hash_piece(layout, n, &mut buf)?;
            digests.push(digest.ok_or_else(|| StoreError::io(&self.dir.join("data"), io::ErrorKind::UnexpectedEof.into()))?);
            bitmap.set(n);
        }
        let mut m = self.meta();
        m.meta.layout = layout;
        m.meta.bitmap = bitmap;
        m.meta.piece_blake3 = digests;
        write_meta(&self.dir, &m.meta, true).map_err(|e| StoreError::io(&self.dir, e))?;
        m.dirty = 0;
        Ok(())
    }

    /// blake3 (hex) of piece `n` under `layout` as stored; `None` when the file is shorter.
    fn hash_piece(&self, layout: PieceLayout, n: u32, buf: &mut [u8]) -> Result<Option<String>, StoreError> {
        let r = layout.range(n);
        let len = (r.end - r.start) as usize;
        if self.read_at(r.start, &mut buf[..len])? != len {
            return Ok(None);
        }
        Ok(Some(blake3::hash(&buf[..len]).to_hex().to_string()))
    }

    /// Reads up to `len` bytes at `offset` into a new buffer, without zeroing it first (the hot
    /// path of every cache hit). Shorter only at the end of the file.
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        while buf.len() < len {
            let spare = buf.spare_capacity_mut();
            // SAFETY: pread writes at most `spare.len()` bytes into memory we own; we only extend
            // the vector by what it reports as written.
            let n = unsafe {
                libc::pread(self.data.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), (offset + buf.len() as u64) as libc::off_t)
            };
            match n {
                0 => break,
                n if n > 0 => unsafe { buf.set_len(buf.len() + n as usize) },
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(StoreError::io(&self.dir.join("data"), e));
                    }
                }
            }
        }
        Ok(buf)
    }

    /// Records that piece `n` was written, with its blake3; false when it already was (two
    /// fetches of one piece raced). The bitmap reaches disk every few pieces, so a killed process
    /// loses at most those. The piece's bytes count against the quota from now on: past the high
    /// watermark, unused tasks are evicted first, and [`StoreError::QuotaFull`] says that the
    /// tasks in use leave no room for them.
    pub fn piece_written(&self, n: u32, blake3_hex: String) -> Result<bool, StoreError> {
        let mut m = self.meta();
        if m.meta.bitmap.has(n) {
            return Ok(false);
        }
        let removed = self.charge(piece_len(m.meta.layout, n))?;
        m.meta.bitmap.set(n);
        if let Some(slot) = m.meta.piece_blake3.get_mut(n as usize) {
            *slot = blake3_hex;
        }
        m.dirty += 1;
        let flushed = if m.dirty >= FLUSH_PIECES || m.last_flush.elapsed() >= FLUSH_INTERVAL { self.flush_locked(&mut m) } else { Ok(()) };
        drop(m);
        for path in removed {
            let _ = fs::remove_dir_all(path);
        }
        flushed.map(|()| true)
    }

    /// Counts `bytes` more of this task as stored, evicting unused tasks first when that would
    /// take the store past its high watermark. Returns the evicted tasks' directories, to delete
    /// once no lock is held.
    fn charge(&self, bytes: u64) -> Result<Vec<PathBuf>, StoreError> {
        let Some(inner) = self.store.upgrade() else { return Ok(Vec::new()) };
        let mut s = inner.state();
        if !s.is_registered(self) || !s.entries.contains_key(&self.id) {
            return Ok(Vec::new());
        }
        let removed = if s.used + bytes > inner.high { s.evict(&inner.dir, inner.low.saturating_sub(bytes)) } else { Vec::new() };
        if s.used + bytes > inner.quota {
            // Only tasks in use are left (some were opened since this one was admitted).
            let used = s.used;
            drop(s);
            for path in removed {
                let _ = fs::remove_dir_all(path);
            }
            return Err(StoreError::QuotaFull { task: self.id.clone(), needed: bytes, used, quota: inner.quota });
        }
        s.used += bytes;
        if let Some(e) = s.entries.get_mut(&self.id) {
            e.stored += bytes;
        }
        Ok(removed)
    }

    /// Whether the store removed this task since this handle was opened: its directory may now
    /// hold a new task of the same id, whose metadata this handle must not overwrite.
    fn is_removed(&self) -> bool {
        self.store.upgrade().is_some_and(|inner| !inner.state().is_registered(self))
    }

    /// Stops counting `bytes` of this task as stored (pieces forgotten).
    fn uncharge(&self, bytes: u64) {
        let Some(inner) = self.store.upgrade() else { return };
        let mut s = inner.state();
        if !s.is_registered(self) {
            return;
        }
        if let Some(e) = s.entries.get_mut(&self.id) {
            let bytes = bytes.min(e.stored);
            e.stored -= bytes;
            s.used -= bytes;
        }
    }

    fn flush_locked(&self, m: &mut MetaState) -> Result<(), StoreError> {
        if !self.is_removed() {
            write_meta(&self.dir, &m.meta, false).map_err(|e| StoreError::io(&self.dir, e))?;
        }
        m.dirty = 0;
        m.last_flush = Instant::now();
        Ok(())
    }

    /// Writes the bitmap to disk now.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut m = self.meta();
        if m.dirty == 0 {
            return Ok(());
        }
        self.flush_locked(&mut m)
    }

    /// Marks the task complete (after its digest was checked) and makes it evictable when unused.
    /// Syncs the data before the metadata says so.
    pub fn mark_complete(&self) -> Result<(), StoreError> {
        self.data.sync_data().map_err(|e| StoreError::io(&self.dir.join("data"), e))?;
        {
            let mut m = self.meta();
            m.meta.complete = true;
            if !self.is_removed() {
                write_meta(&self.dir, &m.meta, true).map_err(|e| StoreError::io(&self.dir, e))?;
            }
            m.dirty = 0;
        }
        if let Some(inner) = self.store.upgrade() {
            let mut s = inner.state();
            if s.is_registered(self) {
                if let Some(e) = s.entries.get_mut(&self.id) {
                    let grown = e.len - e.stored.min(e.len);
                    e.complete = true;
                    e.stored = e.len;
                    s.used += grown;
                    s.lru.promote(&self.id);
                }
            }
        }
        Ok(())
    }
}

impl Drop for TaskFile {
    /// The last handle of a task going ends its use: an incomplete task's reservation is released
    /// (it stays counted for the pieces it wrote, and is evicted first), and one that wrote no
    /// piece is deleted.
    fn drop(&mut self) {
        let this: *const TaskFile = self;
        let m = self.meta.get_mut().unwrap_or_else(|p| p.into_inner());
        let save = m.dirty > 0 && (m.meta.complete || m.meta.stored() > 0);
        let Some(inner) = self.store.upgrade() else {
            if save {
                let _ = write_meta(&self.dir, &m.meta, false);
            }
            return;
        };
        let gone = {
            let mut s = inner.state();
            // A handle of a task removed meanwhile must not touch a new task of the same id.
            if !s.open.get(&self.id).is_some_and(|w| std::ptr::eq(w.as_ptr(), this)) {
                return;
            }
            // Saved before the task can be opened again, so the next handle reads every piece.
            if save {
                let _ = write_meta(&self.dir, &m.meta, false);
            }
            s.open.remove(&self.id);
            let unwritten = s.entries.get(&self.id).is_some_and(|e| !e.complete && e.stored == 0);
            if unwritten {
                s.discard(&inner.dir, &self.id)
            } else {
                None
            }
        };
        if let Some(path) = gone {
            let _ = fs::remove_dir_all(path);
        }
    }
}

fn read_meta(dir: &Path) -> io::Result<TaskMeta> {
    let text = fs::read(dir.join("meta.json"))?;
    serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes `meta.json` atomically: a temporary file (synced when `durable`) renamed over the old one.
fn write_meta(dir: &Path, meta: &TaskMeta, durable: bool) -> io::Result<()> {
    let tmp = dir.join("meta.json.tmp");
    let mut f = private_file(OpenOptions::new().write(true).create(true).truncate(true), &tmp)?;
    f.write_all(&serde_json::to_vec(meta).map_err(io::Error::other)?)?;
    if durable {
        f.sync_data()?;
    }
    fs::rename(&tmp, dir.join("meta.json"))
}

/// Length of piece `n` under `layout`.
fn piece_len(layout: PieceLayout, n: u32) -> u64 {
    let r = layout.range(n);
    r.end - r.start
}

/// Creates directory `path` (its parent must exist) or takes the existing one, readable by this
/// user only whatever the umask.
fn private_dir(path: &Path) -> io::Result<()> {
    match DirBuilder::new().mode(DIR_MODE).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    fs::set_permissions(path, Permissions::from_mode(DIR_MODE))
}

/// Opens file `path` with `options`, readable by this user only whatever the umask (a file that
/// existed keeps its mode through `open`, so it is set on the descriptor too).
fn private_file(options: &mut OpenOptions, path: &Path) -> io::Result<File> {
    let file = options.mode(FILE_MODE).open(path)?;
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Puts a stored task's directory and files to the store's modes (a store written by an older
/// version, under a umask of 022, left them readable by every user).
fn make_private(task_dir: &Path) -> io::Result<()> {
    fs::set_permissions(task_dir, Permissions::from_mode(DIR_MODE))?;
    for name in ["data", "meta.json"] {
        fs::set_permissions(task_dir.join(name), Permissions::from_mode(FILE_MODE))?;
    }
    match fs::remove_file(task_dir.join("meta.json.tmp")) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Bytes this user may still write on the filesystem holding `dir`.
fn disk_free(dir: &Path) -> io::Result<u64> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated path and a zeroed struct the kernel fills in.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    fn task(n: u8) -> TaskId {
        TaskId::of_digest(&Digest::of(&[n]))
    }

    fn store(dir: &Path, quota: u64) -> Store {
        Store::open(dir, quota, 0.9, 0.5).unwrap()
    }

    #[test]
    fn pieces_and_bitmap_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let layout = PieceLayout { len: 3 << 20, piece_size: 1 << 20 };
        {
            let s = store(dir.path(), 100 << 20);
            let t = s.open_task(&task(1), layout).unwrap();
            t.write_at(1 << 20, &[7u8; 1 << 20]).unwrap();
            t.piece_written(1, "ab".into()).unwrap();
            t.flush().unwrap();
        }
        let s = store(dir.path(), 100 << 20);
        assert_eq!(s.usage().tasks, 1);
        let t = s.open_task(&task(1), layout).unwrap();
        assert!(t.has_piece(1) && !t.has_piece(0));
        assert_eq!(t.piece_blake3(1).as_deref(), Some("ab"));
        let mut buf = [0u8; 4];
        t.read_at(1 << 20, &mut buf).unwrap();
        assert_eq!(buf, [7; 4]);
        assert_eq!(t.read_vec((2 << 20) - 2, 4).unwrap(), vec![7, 7, 0, 0]);
        assert_eq!(t.read_vec(3 << 20, 10).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn a_complete_task_answers_its_length_only_for_its_registry_also_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let layout = PieceLayout { len: 10, piece_size: 1 << 20 };
        {
            let s = store(dir.path(), 100 << 20);
            let t = s.open_task(&task(1), layout).unwrap();
            t.write_at(0, &[1; 10]).unwrap();
            t.piece_written(0, "x".into()).unwrap();
            t.set_origin("a.example", false).unwrap();
            assert_eq!(s.complete_len_from(&task(1), "a.example"), None, "not complete yet");
            t.mark_complete().unwrap();
            assert_eq!(s.complete_len_from(&task(1), "a.example"), Some(10));
            assert_eq!(s.complete_len_from(&task(1), "b.example"), None);
        }
        let s = store(dir.path(), 100 << 20);
        assert_eq!(s.complete_len_from(&task(1), "a.example"), Some(10));
        assert_eq!(s.complete_len_from(&task(1), "b.example"), None);
    }

    #[test]
    fn torn_pieces_are_found_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 100 << 20);
        let layout = PieceLayout { len: 2 << 20, piece_size: 1 << 20 };
        let t = s.open_task(&task(1), layout).unwrap();
        let good = vec![1u8; 1 << 20];
        for n in 0..2 {
            t.write_at(n as u64 * (1 << 20), &good).unwrap();
            t.piece_written(n, blake3::hash(&good).to_hex().to_string()).unwrap();
        }
        t.write_at((1 << 20) + 5, &[9]).unwrap();
        assert_eq!(t.verify_pieces().unwrap(), 1);
        assert!(t.has_piece(0) && !t.has_piece(1));
    }

    #[test]
    fn a_changed_length_starts_the_task_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 100 << 20);
        let t = s.open_task(&task(1), PieceLayout { len: 10, piece_size: 1 << 20 }).unwrap();
        t.piece_written(0, "x".into()).unwrap();
        drop(t);
        let t = s.open_task(&task(1), PieceLayout { len: 20, piece_size: 1 << 20 }).unwrap();
        assert!(!t.has_piece(0));
        assert_eq!(s.usage().used_bytes, 0, "the old piece no longer counts, and the new length costs nothing until bytes arrive");
    }

    #[test]
    fn a_complete_task_stored_under_another_piece_size_is_cut_anew_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..(3u32 << 18)).map(|i| (i % 251) as u8).collect();
        let old = PieceLayout { len: bytes.len() as u64, piece_size: 1 << 19 };
        {
            let s = store(dir.path(), 100 << 20);
            let t = s.open_task(&task(1), old).unwrap();
            t.write_at(0, &bytes).unwrap();
            for n in 0..old.count() {
                t.piece_written(n, "old".into()).unwrap();
            }
            t.mark_complete().unwrap();
        }
        let new = PieceLayout { len: old.len, piece_size: 1 << 16 };
        let s = store(dir.path(), 100 << 20);
        let t = s.open_task(&task(1), new).unwrap();
        assert_eq!(t.layout(), new);
        assert!(t.is_complete() && t.bitmap().is_full());
        let r = new.range(5);
        let want = blake3::hash(&bytes[r.start as usize..r.end as usize]).to_hex().to_string();
        assert_eq!(t.piece_blake3(5), Some(want));
        drop((t, s));
        // The new cut is what a restart finds.
        let s = store(dir.path(), 100 << 20);
        assert_eq!(s.complete(&task(1)).unwrap().layout(), new);
    }

    #[test]
    fn corrupt_metadata_is_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = store(dir.path(), 100 << 20);
            s.open_task(&task(1), PieceLayout { len: 10, piece_size: 1 << 20 }).unwrap().piece_written(0, "x".into()).unwrap();
        }
        let tdir = dir.path().join("tasks").join(task(1).as_str());
        fs::write(tdir.join("meta.json"), b"{not json").unwrap();
        fs::create_dir_all(dir.path().join("tasks/not-a-task")).unwrap();
        let s = store(dir.path(), 100 << 20);
        assert_eq!(s.usage().tasks, 0);
        assert!(!tdir.exists() && !dir.path().join("tasks/not-a-task").exists());
    }

    #[test]
    fn least_recently_used_unused_complete_tasks_are_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 100, 0.9, 0.8).unwrap();
        let layout = PieceLayout { len: 40, piece_size: 1 << 20 };
        for n in 1..=2 {
            let t = s.open_task(&task(n), layout).unwrap();
            t.mark_complete().unwrap();
        }
        // Touch task 1 so task 2 is the least recently used.
        assert!(s.complete(&task(1)).is_some());
        let t3 = s.open_task(&task(3), layout).unwrap();
        // Room is made as the bytes arrive.
        assert!(s.complete_len(&task(2)).is_some());
        t3.piece_written(0, "x".into()).unwrap();
        assert!(s.complete(&task(2)).is_none(), "task 2 must be evicted");
        assert!(s.complete(&task(1)).is_some());
        assert_eq!(s.usage().evictions, 1);
        // Tasks in use are never evicted: with 1 and 3 open, a fourth does not fit.
        let _t1 = s.complete(&task(1)).unwrap();
        let err = s.open_task(&task(4), layout).err().unwrap();
        assert!(matches!(err, StoreError::QuotaFull { .. }), "{err}");
        drop(t3);
        assert!(matches!(s.open_task(&task(5), PieceLayout { len: 101, piece_size: 1 << 20 }), Err(StoreError::TooLarge { .. })));
    }

    #[test]
    fn a_data_dir_is_used_by_one_store_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = store(dir.path(), 100);
        assert!(matches!(Store::open(dir.path(), 100, 0.9, 0.5), Err(StoreError::Locked { .. })));
        drop(first);
        assert!(Store::open(dir.path(), 100, 0.9, 0.5).is_ok());
    }

    #[test]
    fn removed_tasks_free_their_space() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 100);
        s.open_task(&task(1), PieceLayout { len: 60, piece_size: 1 << 20 }).unwrap();
        s.remove(&task(1));
        assert_eq!(s.usage().used_bytes, 0);
        assert!(s.open_task(&task(2), PieceLayout { len: 60, piece_size: 1 << 20 }).is_ok());
    }

    fn piece(t: &TaskFile, n: u32) {
        t.piece_written(n, format!("piece {n}")).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Every directory and file under `dir` with a mode other than the store's.
    fn not_private(dir: &Path) -> Vec<String> {
        let mut wrong = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            if mode(&d) != DIR_MODE {
                wrong.push(format!("{} {:o}", d.display(), mode(&d)));
            }
            for e in fs::read_dir(&d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    todo.push(e.path());
                } else if mode(&e.path()) != FILE_MODE {
                    wrong.push(format!("{} {:o}", e.path().display(), mode(&e.path())));
                }
            }
        }
        wrong
    }

    #[test]
    fn a_failed_task_gives_back_its_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 100);
        let t = s.open_task(&task(1), PieceLayout { len: 90, piece_size: 10 }).unwrap();
        piece(&t, 0);
        assert!(matches!(s.open_task(&task(2), PieceLayout { len: 90, piece_size: 10 }), Err(StoreError::QuotaFull { .. })));
        // The download fails and its last handle goes: only the piece it wrote still counts.
        drop(t);
        assert_eq!(s.usage().used_bytes, 10);
        assert!(s.open_task(&task(2), PieceLayout { len: 90, piece_size: 10 }).is_ok());
    }

    #[test]
    fn a_download_that_wrote_nothing_is_deleted_with_its_last_handle() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 64 << 20);
        let t = s.open_task(&task(1), PieceLayout::for_len(62 << 20)).unwrap();
        let tdir = dir.path().join("tasks").join(task(1).as_str());
        assert!(tdir.exists());
        let shared = t.clone();
        drop(t);
        assert!(tdir.exists(), "a task with a handle left is in use");
        drop(shared);
        assert!(!tdir.exists());
        let u = s.usage();
        assert_eq!((u.tasks, u.used_bytes), (0, 0));
    }

    #[test]
    fn an_abandoned_task_counts_only_the_pieces_it_wrote_and_resumes_from_them() {
        let dir = tempfile::tempdir().unwrap();
        let layout = PieceLayout { len: 80, piece_size: 10 };
        {
            let s = store(dir.path(), 100);
            let t = s.open_task(&task(1), layout).unwrap();
            piece(&t, 0);
            piece(&t, 3);
            drop(t);
            assert_eq!(s.usage().used_bytes, 20);
        }
        let s = store(dir.path(), 100);
        assert_eq!(s.usage().used_bytes, 20, "a restart counts the same");
        let t = s.open_task(&task(1), layout).unwrap();
        assert!(t.has_piece(0) && t.has_piece(3) && !t.has_piece(1));
    }

    #[test]
    fn a_claimed_length_does_not_evict_complete_tasks_before_bytes_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 100, 0.9, 0.6).unwrap();
        for n in 1..=2 {
            s.open_task(&task(n), PieceLayout { len: 40, piece_size: 10 }).unwrap().mark_complete().unwrap();
        }
        let claimed = s.open_task(&task(3), PieceLayout { len: 90, piece_size: 10 }).unwrap();
        assert!(s.complete_len(&task(1)).is_some() && s.complete_len(&task(2)).is_some());
        assert_eq!(s.usage().evictions, 0);
        drop(claimed);
        assert!(s.complete_len(&task(1)).is_some() && s.complete_len(&task(2)).is_some());
        assert_eq!(s.usage().used_bytes, 80);
        // Bytes that do arrive make room, least recently used first.
        let real = s.open_task(&task(4), PieceLayout { len: 30, piece_size: 10 }).unwrap();
        piece(&real, 0);
        piece(&real, 1);
        assert!(s.complete_len(&task(1)).is_none() && s.complete_len(&task(2)).is_some());
        assert_eq!(s.usage().used_bytes, 60);
    }

    #[test]
    fn unused_incomplete_tasks_are_evicted_before_complete_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 100, 0.9, 0.8).unwrap();
        s.open_task(&task(1), PieceLayout { len: 40, piece_size: 10 }).unwrap().mark_complete().unwrap();
        let abandoned = s.open_task(&task(2), PieceLayout { len: 50, piece_size: 10 }).unwrap();
        for n in 0..3 {
            piece(&abandoned, n);
        }
        drop(abandoned);
        let t = s.open_task(&task(3), PieceLayout { len: 50, piece_size: 10 }).unwrap();
        for n in 0..3 {
            piece(&t, n);
        }
        assert!(!dir.path().join("tasks").join(task(2).as_str()).exists(), "the abandoned download goes first");
        assert!(s.complete_len(&task(1)).is_some(), "the complete task stays, though used less recently");
        assert_eq!(s.usage().used_bytes, 70);
    }

    #[test]
    fn a_running_download_is_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 100, 0.5, 0.1).unwrap();
        let running = s.open_task(&task(1), PieceLayout { len: 50, piece_size: 10 }).unwrap();
        for n in 0..4 {
            piece(&running, n);
        }
        let other = s.open_task(&task(2), PieceLayout { len: 50, piece_size: 10 }).unwrap();
        for n in 0..5 {
            piece(&other, n);
        }
        assert!((0..4).all(|n| running.has_piece(n)));
        assert!(dir.path().join("tasks").join(task(1).as_str()).exists());
        assert_eq!((s.usage().used_bytes, s.usage().evictions), (90, 0));
    }

    #[test]
    fn bytes_past_the_quota_are_refused_when_only_tasks_in_use_are_left() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 100, 0.9, 0.5).unwrap();
        s.open_task(&task(1), PieceLayout { len: 50, piece_size: 10 }).unwrap().mark_complete().unwrap();
        let t = s.open_task(&task(2), PieceLayout { len: 60, piece_size: 10 }).unwrap();
        // Admitted while task 1 could be evicted; then a reader opens it.
        let reader = s.complete(&task(1)).unwrap();
        for n in 0..5 {
            piece(&t, n);
        }
        let err = t.piece_written(5, "x".into()).unwrap_err();
        assert!(matches!(err, StoreError::QuotaFull { needed: 10, used: 100, .. }), "{err}");
        assert!(!t.has_piece(5));
        drop(reader);
        assert!(t.piece_written(5, "x".into()).unwrap(), "room is made once the reader is gone");
    }

    #[test]
    fn a_resumed_download_must_fit_beside_the_tasks_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 100);
        let layout = PieceLayout { len: 60, piece_size: 10 };
        let t = s.open_task(&task(1), layout).unwrap();
        piece(&t, 0);
        drop(t);
        let _busy = s.open_task(&task(2), layout).unwrap();
        assert!(matches!(s.open_task(&task(1), layout), Err(StoreError::QuotaFull { .. })));
        assert_eq!(s.usage().used_bytes, 10, "the refused task keeps its piece");
    }

    #[test]
    fn downloads_a_killed_process_left_without_pieces_are_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = store(dir.path(), 64 << 20);
            let empty = s.open_task(&task(1), PieceLayout::for_len(62 << 20)).unwrap();
            let started = s.open_task(&task(2), PieceLayout { len: 20, piece_size: 10 }).unwrap();
            piece(&started, 0);
            started.flush().unwrap();
            // A killed process runs no destructor.
            std::mem::forget((empty, started));
        }
        let s = store(dir.path(), 64 << 20);
        assert!(!dir.path().join("tasks").join(task(1).as_str()).exists());
        assert_eq!(s.task_ids(), vec![task(2)]);
        assert_eq!(s.usage().used_bytes, 10);
    }

    #[test]
    fn torn_pieces_stop_counting() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 100);
        let t = s.open_task(&task(1), PieceLayout { len: 20, piece_size: 10 }).unwrap();
        t.write_at(0, &[1; 20]).unwrap();
        t.piece_written(0, blake3::hash(&[1; 10]).to_hex().to_string()).unwrap();
        t.piece_written(1, "torn".into()).unwrap();
        assert_eq!(s.usage().used_bytes, 20);
        assert_eq!(t.verify_pieces().unwrap(), 1);
        assert_eq!(s.usage().used_bytes, 10);
    }

    #[test]
    fn a_handle_of_a_removed_task_does_not_touch_a_new_task_of_that_id() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 100);
        let layout = PieceLayout { len: 20, piece_size: 10 };
        let old = s.open_task(&task(1), layout).unwrap();
        s.remove(&task(1));
        let new = s.open_task(&task(1), layout).unwrap();
        assert!(!Arc::ptr_eq(&old, &new));
        piece(&old, 0);
        old.flush().unwrap();
        drop(old);
        assert_eq!(s.usage().used_bytes, 0);
        assert!(!read_meta(&dir.path().join("tasks").join(task(1).as_str())).unwrap().bitmap.has(0));
        assert!(dir.path().join("tasks").join(task(1).as_str()).join("data").exists());
        piece(&new, 1);
        new.mark_complete().unwrap();
        assert_eq!(s.usage().used_bytes, 20);
    }

    #[test]
    fn store_directories_and_files_are_private_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        // SAFETY: umask only changes the process's file creation mask; restored below.
        let old = unsafe { libc::umask(0) };
        let wrong = {
            let s = store(&data_dir, 100);
            let t = s.open_task(&task(1), PieceLayout { len: 20, piece_size: 10 }).unwrap();
            piece(&t, 0);
            t.flush().unwrap();
            s.open_task(&task(2), PieceLayout { len: 10, piece_size: 10 }).unwrap().mark_complete().unwrap();
            not_private(&data_dir)
        };
        unsafe { libc::umask(old) };
        assert!(wrong.is_empty(), "under umask 0: {wrong:?}");
        assert_eq!(fs::read_dir(data_dir.join("tasks")).unwrap().count(), 2);
    }

    #[test]
    fn an_older_store_readable_by_everyone_is_made_private_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        {
            let s = store(&data_dir, 100);
            let t = s.open_task(&task(1), PieceLayout { len: 10, piece_size: 10 }).unwrap();
            piece(&t, 0);
            t.mark_complete().unwrap();
        }
        let tdir = data_dir.join("tasks").join(task(1).as_str());
        fs::write(tdir.join("meta.json.tmp"), b"{").unwrap();
        for (path, m) in [
            (data_dir.clone(), 0o755),
            (data_dir.join("tasks"), 0o755),
            (tdir.clone(), 0o755),
            (tdir.join("data"), 0o644),
            (tdir.join("meta.json"), 0o644),
            (tdir.join("meta.json.tmp"), 0o644),
            (data_dir.join("lock"), 0o644),
        ] {
            fs::set_permissions(path, Permissions::from_mode(m)).unwrap();
        }
        let s = store(&data_dir, 100);
        assert!(s.complete(&task(1)).is_some());
        assert_eq!(not_private(&data_dir), Vec::<String>::new());
    }
}
