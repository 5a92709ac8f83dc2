//! The content store: each task's bytes in one preallocated file, its piece bitmap and piece digests
//! in a JSON file next to it, written atomically so a killed agent resumes where it stopped. A disk
//! quota with high/low watermarks evicts least recently used completed tasks nobody is reading.
//!
//! Durability without fsync on the hot path: the bitmap is rewritten (atomically, not synced) every
//! few pieces, which survives a killed process. After a power loss a piece marked present may hold
//! garbage, so a resumed task re-checks its pieces against their blake3 ([`TaskFile::verify_pieces`]);
//! only completion is synced (data, then metadata), so a task marked complete on disk is complete.
//!
//! Layout: `<data_dir>/tasks/<task id>/data` and `<data_dir>/tasks/<task id>/meta.json`.
//! All methods do blocking file I/O: async callers run them on the blocking pool.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
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
}

/// Usage figures for status pages and metrics.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Usage {
    /// Bytes reserved by tasks (complete or not).
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

struct State {
    /// Length of every task on disk and whether it is complete.
    entries: HashMap<TaskId, Entry>,
    /// Completed tasks, least recently used first out.
    lru: LruCache<TaskId, ()>,
    /// Open handles; a task with a live handle is never evicted.
    open: HashMap<TaskId, Weak<TaskFile>>,
    used: u64,
    evictions: u64,
}

#[derive(Clone, Copy)]
struct Entry {
    len: u64,
    complete: bool,
}

impl Store {
    /// Opens (creating) the store under `data_dir`, loading every task found there. Tasks whose
    /// metadata is unreadable or inconsistent are deleted.
    pub fn open(data_dir: &Path, quota: u64, high_watermark: f64, low_watermark: f64) -> Result<Store, StoreError> {
        let dir = data_dir.join("tasks");
        fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        let lock_path = data_dir.join("lock");
        let lock = File::create(&lock_path).map_err(|e| StoreError::io(&lock_path, e))?;
        // SAFETY: flock on a descriptor we own; no memory is shared with the kernel.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Locked { path: data_dir.into() });
        }
        let mut found: Vec<(std::time::SystemTime, TaskId, Entry)> = Vec::new();
        for dirent in fs::read_dir(&dir).map_err(|e| StoreError::io(&dir, e))? {
            let dirent = dirent.map_err(|e| StoreError::io(&dir, e))?;
            let path = dirent.path();
            let name = dirent.file_name();
            let loaded = TaskId::parse(&name.to_string_lossy()).and_then(|id| {
                let meta = read_meta(&path).ok()?;
                let data = fs::metadata(path.join("data")).ok()?;
                (meta.is_consistent(&id) && data.len() == meta.layout.len)
                    .then(|| (data.modified().unwrap_or(std::time::UNIX_EPOCH), id, meta))
            });
            match loaded {
                Some((mtime, id, meta)) => found.push((mtime, id, Entry { len: meta.layout.len, complete: meta.complete })),
                None => {
                    warn!(path = %path.display(), "removing unreadable task from the store");
                    let _ = fs::remove_dir_all(&path);
                }
            }
        }
        found.sort_by_key(|(mtime, _, _)| *mtime);
        let mut state = State { entries: HashMap::new(), lru: LruCache::unbounded(), open: HashMap::new(), used: 0, evictions: 0 };
        for (_, id, entry) in found {
            state.used += entry.len;
            if entry.complete {
                state.lru.put(id.clone(), ());
            }
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
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
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

    /// A handle on the task, opening what is on disk (to resume) or creating it, evicting old tasks
    /// to make room. Fails with [`StoreError::TooLarge`] or [`StoreError::QuotaFull`] when the task
    /// cannot fit, and [`StoreError::DiskFull`] when the filesystem cannot hold it.
    pub fn open_task(&self, id: &TaskId, layout: PieceLayout) -> Result<Arc<TaskFile>, StoreError> {
        let _opening = self.inner.opening.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = self.state().open.get(id).and_then(Weak::upgrade) {
            return Ok(h);
        }
        if let Some(h) = self.open_existing(id)? {
            if h.layout() == layout {
                return Ok(h);
            }
            if h.is_complete() && h.layout().len == layout.len {
                // Stored under another piece size (an earlier version's rule): same bytes, new cut.
                h.relayout(layout)?;
                return Ok(h);
            }
            warn!(task = %id, "stored task has a different length than the origin reports; starting over");
            drop(h);
            self.remove(id);
        }
        self.reserve(id, layout.len)?;
        match self.create(id, layout) {
            Ok(h) => Ok(h),
            Err(e) => {
                self.remove(id);
                Err(e)
            }
        }
    }

    fn open_existing(&self, id: &TaskId) -> Result<Option<Arc<TaskFile>>, StoreError> {
        if !self.state().entries.contains_key(id) {
            return Ok(None);
        }
        let path = self.inner.dir.join(id.as_str());
        let meta = read_meta(&path).map_err(|e| StoreError::io(&path, e))?;
        let data_path = path.join("data");
        let data = OpenOptions::new().read(true).write(true).open(&data_path).map_err(|e| StoreError::io(&data_path, e))?;
        Ok(Some(self.register(id, path, data, meta)))
    }

    fn register(&self, id: &TaskId, path: PathBuf, data: File, meta: TaskMeta) -> Arc<TaskFile> {
        let mut s = self.state();
        if let Some(h) = s.open.get(id).and_then(Weak::upgrade) {
            return h;
        }
        let handle = Arc::new(TaskFile {
            id: id.clone(),
            dir: path,
            data,
            meta: Mutex::new(MetaState { meta, dirty: 0, last_flush: Instant::now() }),
            store: Arc::downgrade(&self.inner),
        });
        s.open.insert(id.clone(), Arc::downgrade(&handle));
        handle
    }

    /// Makes room for `len` more bytes and records the task as present.
    fn reserve(&self, id: &TaskId, len: u64) -> Result<(), StoreError> {
        let inner = &self.inner;
        if len > inner.quota {
            return Err(StoreError::TooLarge { task: id.clone(), needed: len, quota: inner.quota });
        }
        let mut victims = Vec::new();
        {
            let mut s = self.state();
            if s.used + len > inner.high {
                let target = inner.low.saturating_sub(len);
                let candidates: Vec<TaskId> = s.lru.iter().rev().map(|(k, _)| k.clone()).collect();
                for victim in candidates {
                    if s.used <= target {
                        break;
                    }
                    if s.open.get(&victim).is_some_and(|w| w.strong_count() > 0) {
                        continue;
                    }
                    if let Some(e) = s.entries.remove(&victim) {
                        s.used -= e.len;
                        s.lru.pop(&victim);
                        s.evictions += 1;
                        victims.push(victim);
                    }
                }
            }
            if s.used + len > inner.quota {
                return Err(StoreError::QuotaFull { task: id.clone(), needed: len, used: s.used, quota: inner.quota });
            }
            s.used += len;
            s.entries.insert(id.clone(), Entry { len, complete: false });
        }
        for victim in victims {
            info!(task = %victim, "evicting least recently used task");
            let _ = fs::remove_dir_all(inner.dir.join(victim.as_str()));
        }
        Ok(())
    }

    fn create(&self, id: &TaskId, layout: PieceLayout) -> Result<Arc<TaskFile>, StoreError> {
        let path = self.inner.dir.join(id.as_str());
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(|e| StoreError::io(&path, e))?;
        let data_path = path.join("data");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .map_err(|e| StoreError::io(&data_path, e))?;
        preallocate(&data, layout.len).map_err(|e| StoreError::io(&data_path, e))?;
        let meta = TaskMeta::new(id.clone(), layout);
        write_meta(&path, &meta, false).map_err(|e| StoreError::io(&path, e))?;
        Ok(self.register(id, path, data, meta))
    }

    /// Deletes a task and its bytes. Handles still open keep reading the unlinked file.
    pub fn remove(&self, id: &TaskId) {
        {
            let mut s = self.state();
            if let Some(e) = s.entries.remove(id) {
                s.used -= e.len;
            }
            s.lru.pop(id);
            s.open.remove(id);
        }
        let _ = fs::remove_dir_all(self.inner.dir.join(id.as_str()));
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
        self.flush_locked(&mut m)
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
        if !bad.is_empty() {
            let mut m = self.meta();
            for &n in &bad {
                m.meta.bitmap.unset(n);
                m.meta.piece_blake3[n as usize].clear();
            }
            self.flush_locked(&mut m)?;
        }
        Ok(bad.len() as u32)
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
    /// loses at most those.
    pub fn piece_written(&self, n: u32, blake3_hex: String) -> Result<bool, StoreError> {
        let mut m = self.meta();
        if m.meta.bitmap.has(n) {
            return Ok(false);
        }
        m.meta.bitmap.set(n);
        if let Some(slot) = m.meta.piece_blake3.get_mut(n as usize) {
            *slot = blake3_hex;
        }
        m.dirty += 1;
        if m.dirty >= FLUSH_PIECES || m.last_flush.elapsed() >= FLUSH_INTERVAL {
            self.flush_locked(&mut m)?;
        }
        Ok(true)
    }

    fn flush_locked(&self, m: &mut MetaState) -> Result<(), StoreError> {
        write_meta(&self.dir, &m.meta, false).map_err(|e| StoreError::io(&self.dir, e))?;
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
            write_meta(&self.dir, &m.meta, true).map_err(|e| StoreError::io(&self.dir, e))?;
            m.dirty = 0;
        }
        if let Some(inner) = self.store.upgrade() {
            let mut s = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = s.entries.get_mut(&self.id) {
                e.complete = true;
                s.lru.put(self.id.clone(), ());
            }
        }
        Ok(())
    }
}

impl Drop for TaskFile {
    fn drop(&mut self) {
        let m = self.meta.get_mut().unwrap_or_else(|p| p.into_inner());
        if m.dirty > 0 && self.dir.exists() {
            let _ = write_meta(&self.dir, &m.meta, false);
        }
        if let Some(inner) = self.store.upgrade() {
            let mut s = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.open.get(&self.id).is_some_and(|w| w.strong_count() == 0) {
                s.open.remove(&self.id);
            }
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
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(meta).map_err(io::Error::other)?)?;
    if durable {
        f.sync_data()?;
    }
    fs::rename(&tmp, dir.join("meta.json"))
}

/// Reserves the file's blocks now, so a full disk shows up before a download starts rather than
/// half way through it. Filesystems without `fallocate` get a sparse file.
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    if len > 0 {
        // SAFETY: a valid open descriptor and in-range arguments; fallocate only touches that file.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(err);
            }
        }
    }
    file.set_len(len)
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
        assert_eq!(s.usage().used_bytes, 20);
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
            s.open_task(&task(1), PieceLayout { len: 10, piece_size: 1 << 20 }).unwrap();
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
}
