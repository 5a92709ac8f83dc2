//! The local chunk cache: verified, uncompressed chunks on disk, plus whole files materialised
//! from their chunks (under `files/`, named by [`file key`](crate::materialise::file_key)),
//! evicted least recently used first to stay under one size limit.
//!
//! Chunks are appended to a few large slab files (`slabs/<n>`), not kept one file each: a cold
//! read of many small files costs one `pwrite` per chunk instead of a file creation, and reading
//! them again in the same order is sequential on disk, so the kernel's readahead brings in many
//! at once. An append-only index (`index`) says where each chunk lies; it is replayed and
//! compacted when the cache is opened. Evicting a chunk punches a hole in its slab; a slab
//! without chunks is deleted.
//!
//! Only data whose digest was checked is ever inserted. Neither slabs nor index are synced, so
//! after a crash an index record may point at data that never reached the disk: every chunk
//! found when the cache is opened is checked against its digest the first time it is read, and
//! forgotten (to be fetched again) if it does not match. A materialised file appears under its
//! name only once completely written and synced. Chunks and materialised files are
//! content-addressed, so several images (and later mounts of one image) share the cache.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use lru::LruCache;
use tracing::{debug, warn};

use crate::chunk::chunk_digest;
use crate::format::MAX_CHUNK_SIZE;

/// The smallest size limit accepted: a read may need a few chunks at once.
pub const MIN_CACHE_SIZE: u64 = 16 * MAX_CHUNK_SIZE as u64;

/// Bytes of chunks appended to one slab before the next is started.
const SLAB_SIZE: u64 = 64 << 20;

/// Prefix of files being written; they are removed when the cache is opened.
const TMP_PREFIX: &str = ".tmp-";

/// The subdirectory holding materialised files.
const FILES_DIR: &str = "files";

/// The subdirectory holding slabs.
const SLABS_DIR: &str = "slabs";

/// The index file.
const INDEX: &str = "index";

/// The lock file: one process uses a cache at a time (it holds an exclusive `flock` on it).
const LOCK: &str = "lock";

/// Bytes of one index record: tag, digest, slab, offset, length, check.
const RECORD_LEN: usize = 1 + 32 + 4 + 8 + 4 + 4;

/// Index record tags.
const ADDED: u8 = 1;
const REMOVED: u8 = 2;

/// What the cache holds an entry of; both are named by a 32-byte digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Entry {
    /// A chunk, by the blake3 digest of its data.
    Chunk([u8; 32]),
    /// A materialised file, by its file key.
    File([u8; 32]),
}

/// Where a chunk's bytes lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placement {
    /// The slab's number.
    slab: u32,
    /// Where in the slab.
    offset: u64,
    /// The chunk's length.
    len: u32,
    /// Checked against its digest since the cache was opened (always, for chunks inserted since).
    verified: bool,
}

/// What an entry holds.
#[derive(Debug, Clone, Copy)]
enum Held {
    /// A chunk, there.
    Chunk(Placement),
    /// A materialised file of this many bytes.
    File(u64),
}

impl Held {
    fn len(&self) -> u64 {
        match self {
            Held::Chunk(place) => u64::from(place.len),
            Held::File(len) => *len,
        }
    }
}

/// One slab file.
struct Slab {
    /// Its path.
    path: PathBuf,
    /// Open for reading, appending and punching holes.
    file: File,
    /// Reads hold it shared; punching a hole takes it exclusively, so a read that found its
    /// chunk never sees the hole.
    holes: RwLock<()>,
}

/// A slab and how many bytes of its chunks are still held.
struct SlabState {
    slab: Arc<Slab>,
    live: u64,
}

/// What the cache holds.
struct CacheState {
    /// Entry sizes and places, least recently used first.
    lru: LruCache<Entry, Held>,
    /// Bytes held.
    used: u64,
    /// Slabs by number.
    slabs: HashMap<u32, SlabState>,
    /// The slab chunks are appended to, and where the next goes.
    current: Option<(u32, u64)>,
    /// The number the next new slab gets.
    next_slab: u32,
    /// The index, appended to.
    index: File,
    /// Records in the index.
    records: usize,
    /// Where the cache is (to rewrite the index).
    dir: PathBuf,
}

/// A directory of chunks and materialised files with LRU eviction.
pub struct ChunkCache {
    /// Where the cache is.
    dir: PathBuf,
    /// The most bytes kept.
    limit: u64,
    /// Bytes appended to one slab.
    slab_size: u64,
    /// Which entries are held, in use order.
    state: Mutex<CacheState>,
    /// Numbers temporary files uniquely within this process.
    next_tmp: AtomicU64,
    /// Holds the directory's lock while the cache is open.
    _lock: File,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache").field("dir", &self.dir).field("limit", &self.limit).finish_non_exhaustive()
    }
}

impl ChunkCache {
    /// Opens (creating it if needed) the cache in `dir`, keeping at most `limit` bytes (raised
    /// to [`MIN_CACHE_SIZE`]). Chunks and materialised files already there are kept, up to the
    /// limit. Fails with [`io::ErrorKind::WouldBlock`] while another process (or another open
    /// cache of this one) uses `dir`.
    pub fn open(dir: &Path, limit: u64) -> io::Result<ChunkCache> {
        ChunkCache::open_with_slab_size(dir, limit, SLAB_SIZE)
    }

    fn open_with_slab_size(dir: &Path, limit: u64, slab_size: u64) -> io::Result<ChunkCache> {
        fs::create_dir_all(dir.join(FILES_DIR))?;
        let lock = lock(dir)?;
        fs::create_dir_all(dir.join(SLABS_DIR))?;
        remove_leftovers(dir)?;
        let (chunks, slabs, next_slab) = replay(dir)?;
        let index = write_index(dir, chunks.iter().map(|(digest, place)| (ADDED, digest, place)))?;
        let chunk_count = chunks.len();
        let files = materialised_files(&dir.join(FILES_DIR))?;

        let mut lru = LruCache::unbounded();
        let mut used = 0;
        let mut slab_states: HashMap<u32, SlabState> = slabs.into_iter().map(|(n, slab)| (n, SlabState { slab, live: 0 })).collect();
        for (key, len) in files {
            lru.put(Entry::File(key), Held::File(len));
            used += len;
        }
        for (digest, place) in chunks {
            if let Some(slab) = slab_states.get_mut(&place.slab) {
                slab.live += u64::from(place.len);
            }
            lru.put(Entry::Chunk(digest), Held::Chunk(place));
            used += u64::from(place.len);
        }
        // Slabs left without chunks hold nothing.
        slab_states.retain(|_, s| {
            if s.live == 0 {
                let _ = fs::remove_file(&s.slab.path);
            }
            s.live > 0
        });
        let cache = ChunkCache {
            dir: dir.to_path_buf(),
            limit: limit.max(MIN_CACHE_SIZE),
            slab_size,
            state: Mutex::new(CacheState {
                lru,
                used,
                slabs: slab_states,
                current: None,
                next_slab,
                index,
                records: chunk_count,
                dir: dir.to_path_buf(),
            }),
            next_tmp: AtomicU64::new(0),
            _lock: lock,
        };
        cache.evict(None);
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The materialised file of file key `key`.
    pub fn file_path(&self, key: &[u8; 32]) -> PathBuf {
        self.dir.join(FILES_DIR).join(hex::encode(key))
    }

    /// Where chunk `digest`'s bytes lie on disk (slab file, offset), if it is held: for tests
    /// and diagnostics.
    pub fn chunk_location(&self, digest: &[u8; 32]) -> Option<(PathBuf, u64)> {
        let state = self.lock();
        let Some(Held::Chunk(place)) = state.lru.peek(&Entry::Chunk(*digest)) else { return None };
        Some((state.slabs.get(&place.slab)?.slab.path.clone(), place.offset))
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// The most bytes kept.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether chunk `digest` is held (without marking it used).
    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.lock().lru.contains(&Entry::Chunk(*digest))
    }

    /// Whether the materialised file `key` is held (without marking it used).
    pub fn contains_file(&self, key: &[u8; 32]) -> bool {
        self.lock().lru.contains(&Entry::File(*key))
    }

    /// Reads `buf.len()` bytes at `offset` of chunk `digest`, which must be `len` bytes long,
    /// and marks it used. `None` when the chunk is not held, or when it failed the check of its
    /// first read since the cache was opened (it is then forgotten, to be fetched again).
    pub fn read_chunk(&self, digest: &[u8; 32], len: u32, offset: u32, buf: &mut [u8]) -> Option<io::Result<()>> {
        let end = u64::from(offset) + buf.len() as u64;
        let mut state = self.lock();
        let Some(&Held::Chunk(place)) = state.lru.get(&Entry::Chunk(*digest)) else { return None };
        if place.len != len || end > u64::from(len) {
            drop(state);
            warn!(chunk = %hex::encode(digest), held = place.len, wanted = len, "cached chunk of another length; forgetting it");
            self.remove(digest);
            return None;
        }
        let slab = state.slabs.get(&place.slab)?.slab.clone();
        // Taken before the state lock is released: an eviction of this chunk after that point
        // waits for this read before punching its hole.
        let reading = slab.holes.read().unwrap_or_else(|p| p.into_inner());
        drop(state);
        if place.verified {
            return Some(slab.file.read_exact_at(buf, place.offset + u64::from(offset)));
        }
        let mut whole = vec![0u8; len as usize];
        if let Err(e) = slab.file.read_exact_at(&mut whole, place.offset) {
            return Some(Err(e));
        }
        drop(reading);
        if chunk_digest(&whole) != *digest {
            warn!(chunk = %hex::encode(digest), slab = %slab.path.display(), "cached chunk does not match its digest (lost or damaged on disk); fetching it again");
            self.remove(digest);
            return None;
        }
        if let Some(Held::Chunk(held)) = self.lock().lru.peek_mut(&Entry::Chunk(*digest)) {
            held.verified = true;
        }
        buf.copy_from_slice(&whole[offset as usize..end as usize]);
        Some(Ok(()))
    }

    /// Opens the materialised file `key`, which must be `len` bytes, and marks it used. `None`
    /// when it is not held (or its file went missing or has the wrong length; it is then
    /// forgotten). The open file stays readable even if it is evicted meanwhile.
    pub fn open_file(&self, key: &[u8; 32], len: u64) -> Option<File> {
        let entry = Entry::File(*key);
        let mut state = self.lock();
        state.lru.get(&entry)?;
        let path = self.file_path(key);
        let file = File::open(&path).ok().filter(|file| file.metadata().is_ok_and(|meta| meta.len() == len));
        if file.is_none() {
            warn!(path = %path.display(), "materialised file missing or of the wrong length; forgetting it");
            if let Some(held) = state.lru.pop(&entry) {
                state.used -= held.len();
            }
            let _ = fs::remove_file(&path);
        }
        file
    }

    /// Forgets chunk `digest`: it was found not to hold the chunk.
    pub fn remove(&self, digest: &[u8; 32]) {
        let victim = {
            let mut state = self.lock();
            let Some(held) = state.lru.pop(&Entry::Chunk(*digest)) else { return };
            state.release(Entry::Chunk(*digest), held)
        };
        self.bury(victim);
    }

    /// A new temporary file name in `dir`.
    fn tmp_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{TMP_PREFIX}{}-{}", std::process::id(), self.next_tmp.fetch_add(1, Ordering::Relaxed)))
    }

    /// Stores chunk `digest` with its verified uncompressed `data`, then evicts least recently
    /// used entries until the cache is within its limit.
    pub fn insert(&self, digest: &[u8; 32], data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).ok().filter(|&len| len > 0 && len <= MAX_CHUNK_SIZE);
        let Some(len) = len else {
            return Err(io::Error::other(format!("a chunk of {} bytes cannot be cached", data.len())));
        };
        if self.contains(digest) {
            return Ok(());
        }
        let (number, slab, offset) = self.reserve(len)?;
        slab.file.write_all_at(data, offset)?;
        let place = Placement { slab: number, offset, len, verified: true };
        {
            let mut state = self.lock();
            // Another insert of the same chunk may have won; this copy's space is then unused.
            if state.lru.contains(&Entry::Chunk(*digest)) {
                return Ok(());
            }
            if let Some(s) = state.slabs.get_mut(&number) {
                s.live += u64::from(len);
            }
            state.lru.put(Entry::Chunk(*digest), Held::Chunk(place));
            state.used += u64::from(len);
            state.log(ADDED, digest, &place);
        }
        self.evict(Some(&Entry::Chunk(*digest)));
        Ok(())
    }

    /// Space for `len` more bytes at the end of the current slab (a new one when it is full).
    fn reserve(&self, len: u32) -> io::Result<(u32, Arc<Slab>, u64)> {
        let mut state = self.lock();
        let fits = state.current.filter(|&(_, next)| next + u64::from(len) <= self.slab_size);
        let (number, offset) = match fits {
            Some(current) => current,
            None => {
                let number = state.next_slab;
                state.next_slab += 1;
                let path = self.dir.join(SLABS_DIR).join(number.to_string());
                let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
                state.slabs.insert(number, SlabState { slab: Arc::new(Slab { path, file, holes: RwLock::new(()) }), live: 0 });
                (number, 0)
            }
        };
        state.current = Some((number, offset + u64::from(len)));
        let slab = state.slabs.get(&number).map(|s| s.slab.clone()).ok_or_else(|| io::Error::other("a slab vanished"))?;
        Ok((number, slab, offset))
    }

    /// Whether a materialised file of `len` bytes may be stored: at most half the limit, so one
    /// file cannot push everything else out.
    pub fn fits_file(&self, len: u64) -> bool {
        len <= self.limit / 2
    }

    /// Stores the materialised file `key` of `len` bytes, written by `fill` into a temporary
    /// file that is synced to disk and checked to be `len` bytes before it gets its name (so a
    /// crash never leaves a short file under a key); then evicts least recently used entries
    /// until the cache is within its limit. `fill` verifies what it writes. Nothing is stored
    /// when `fill` fails.
    pub fn insert_file<E: From<io::Error>>(
        &self,
        key: &[u8; 32],
        len: u64,
        fill: impl FnOnce(&mut File) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.contains_file(key) {
            return Ok(());
        }
        if !self.fits_file(len) {
            return Err(io::Error::other(format!("a {len}-byte file does not fit a cache of {} bytes", self.limit)).into());
        }
        let tmp = self.tmp_path(&self.dir.join(FILES_DIR));
        let written = (|| {
            let mut file = File::create(&tmp)?;
            fill(&mut file)?;
            let written = file.metadata()?.len();
            if written != len {
                return Err(io::Error::other(format!("wrote {written} bytes of a {len}-byte file")).into());
            }
            file.sync_all()?;
            fs::rename(&tmp, self.file_path(key))?;
            Ok(())
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        {
            let mut state = self.lock();
            if state.lru.put(Entry::File(*key), Held::File(len)).is_none() {
                state.used += len;
            }
        }
        self.evict(Some(&Entry::File(*key)));
        Ok(())
    }

    /// Removes least recently used entries until within the limit, never `keep`.
    fn evict(&self, keep: Option<&Entry>) {
        let mut victims = Vec::new();
        {
            let mut state = self.lock();
            while state.used > self.limit {
                let Some((entry, held)) = state.lru.pop_lru() else { break };
                if Some(&entry) == keep {
                    state.lru.put(entry, held);
                    if state.lru.len() == 1 {
                        break;
                    }
                    continue;
                }
                victims.push(state.release(entry, held));
            }
        }
        for victim in victims {
            self.bury(victim);
        }
    }

    /// Frees what an evicted or removed entry took on disk.
    fn bury(&self, victim: Victim) {
        match victim {
            Victim::Chunk { slab, offset, len, delete } => {
                let _punching = slab.holes.write().unwrap_or_else(|p| p.into_inner());
                if delete {
                    debug!(slab = %slab.path.display(), "removing an emptied slab");
                    if let Err(e) = fs::remove_file(&slab.path) {
                        warn!(slab = %slab.path.display(), error = %e, "cannot remove an emptied slab");
                    }
                } else if let Err(e) = punch_hole(&slab.file, offset, u64::from(len)) {
                    debug!(slab = %slab.path.display(), error = %e, "cannot punch a hole for an evicted chunk");
                }
            }
            Victim::Nothing => {}
            Victim::File(key) => {
                let path = self.file_path(&key);
                // A materialised file still open by passthrough stays readable: the kernel holds it.
                debug!(path = %path.display(), "evicting a materialised file");
                if let Err(e) = fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        warn!(path = %path.display(), error = %e, "cannot remove an evicted file");
                    }
                }
            }
        }
    }
}

/// What an entry leaving the cache leaves to clean up on disk.
enum Victim {
    /// A chunk's bytes in a slab, or the whole slab when nothing else is left in it.
    Chunk { slab: Arc<Slab>, offset: u64, len: u32, delete: bool },
    /// A materialised file, by its key.
    File([u8; 32]),
    /// Nothing on disk.
    Nothing,
}

impl CacheState {
    /// Accounts for `entry` (already out of the LRU) leaving; returns what is left to clean up.
    fn release(&mut self, entry: Entry, held: Held) -> Victim {
        self.used -= held.len();
        match (entry, held) {
            (Entry::Chunk(digest), Held::Chunk(place)) => {
                self.log(REMOVED, &digest, &place);
                let current = self.current.map(|(n, _)| n);
                let Some(s) = self.slabs.get_mut(&place.slab) else { return Victim::Nothing };
                s.live = s.live.saturating_sub(u64::from(place.len));
                let (slab, delete) = (s.slab.clone(), s.live == 0 && current != Some(place.slab));
                if delete {
                    self.slabs.remove(&place.slab);
                }
                Victim::Chunk { slab, offset: place.offset, len: place.len, delete }
            }
            (Entry::File(key), _) => Victim::File(key),
            (Entry::Chunk(_), Held::File(_)) => Victim::Nothing,
        }
    }

    /// Appends a record to the index. Best effort: a lost record costs a chunk that is checked
    /// (and dropped) or found missing at the next opening, never wrong data.
    fn log(&mut self, tag: u8, digest: &[u8; 32], place: &Placement) {
        if let Err(e) = self.index.write_all(&encode_record(tag, digest, place)) {
            debug!(error = %e, "cannot append to the chunk cache index");
        }
        self.records += 1;
        // Records of chunks long evicted pile up in a long-lived cache: past four per chunk
        // held, the index is written afresh with the chunks held now.
        if self.records > 4 * self.lru.len() + 4096 {
            self.compact();
        }
    }

    /// Rewrites the index with the chunks held now. Best effort: on failure appending goes on.
    fn compact(&mut self) {
        let held: Vec<([u8; 32], Placement)> = self
            .lru
            .iter()
            .rev()
            .filter_map(|(entry, held)| match (entry, held) {
                (Entry::Chunk(digest), Held::Chunk(place)) => Some((*digest, *place)),
                _ => None,
            })
            .collect();
        match write_index(&self.dir, held.iter().map(|(digest, place)| (ADDED, digest, place))) {
            Ok(index) => {
                debug!(chunks = held.len(), dropped = self.records - held.len(), "chunk cache index compacted");
                self.index = index;
                self.records = held.len();
            }
            Err(e) => debug!(error = %e, "cannot compact the chunk cache index"),
        }
    }
}

/// Takes `dir`'s lock: the slabs and the index are one process's to write.
#[allow(unsafe_code)]
fn lock(dir: &Path) -> io::Result<File> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK))?;
    // SAFETY: flock on a descriptor we own; no memory is shared with the kernel.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("the chunk cache {} is in use by another process (each shoal mount needs a cache of its own)", dir.display()),
        ));
    }
    Ok(file)
}

/// Frees `len` bytes at `offset` of `file` without changing its length.
#[allow(unsafe_code)]
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (i64::try_from(offset).map_err(io::Error::other)?, i64::try_from(len).map_err(io::Error::other)?);
    // SAFETY: fallocate reads only its integer arguments; the descriptor is open for the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn encode_record(tag: u8, digest: &[u8; 32], place: &Placement) -> [u8; RECORD_LEN] {
    let mut record = [0u8; RECORD_LEN];
    record[0] = tag;
    record[1..33].copy_from_slice(digest);
    record[33..37].copy_from_slice(&place.slab.to_le_bytes());
    record[37..45].copy_from_slice(&place.offset.to_le_bytes());
    record[45..49].copy_from_slice(&place.len.to_le_bytes());
    let check = blake3::hash(&record[..49]);
    record[49..].copy_from_slice(&check.as_bytes()[..4]);
    record
}

/// A record's tag, digest and placement; `None` for a torn or damaged record.
fn decode_record(record: &[u8]) -> Option<(u8, [u8; 32], Placement)> {
    if record.len() != RECORD_LEN || blake3::hash(&record[..49]).as_bytes()[..4] != record[49..] {
        return None;
    }
    let digest: [u8; 32] = record[1..33].try_into().ok()?;
    let slab = u32::from_le_bytes(record[33..37].try_into().ok()?);
    let offset = u64::from_le_bytes(record[37..45].try_into().ok()?);
    let len = u32::from_le_bytes(record[45..49].try_into().ok()?);
    Some((record[0], digest, Placement { slab, offset, len, verified: false }))
}

/// The chunks an index in `dir` records, oldest first (a torn tail, records of missing slabs
/// and records pointing past a slab's end are dropped), the slabs, and the next slab number.
#[allow(clippy::type_complexity)]
fn replay(dir: &Path) -> io::Result<(Vec<([u8; 32], Placement)>, HashMap<u32, Arc<Slab>>, u32)> {
    let mut slabs = HashMap::new();
    let mut lens = HashMap::new();
    let mut next_slab = 0;
    for entry in fs::read_dir(dir.join(SLABS_DIR))? {
        let entry = entry?;
        let Some(number) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let path = entry.path();
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        lens.insert(number, file.metadata()?.len());
        slabs.insert(number, Arc::new(Slab { path, file, holes: RwLock::new(()) }));
        next_slab = next_slab.max(number + 1);
    }
    let bytes = match fs::read(dir.join(INDEX)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut order: Vec<[u8; 32]> = Vec::new();
    let mut places: HashMap<[u8; 32], Placement> = HashMap::new();
    for record in bytes.chunks(RECORD_LEN) {
        let Some((tag, digest, place)) = decode_record(record) else { break };
        match tag {
            ADDED => {
                let fits = lens.get(&place.slab).is_some_and(|&slab_len| place.offset + u64::from(place.len) <= slab_len);
                if fits && place.len > 0 && place.len <= MAX_CHUNK_SIZE && places.insert(digest, place).is_none() {
                    order.push(digest);
                }
            }
            REMOVED => {
                if places.get(&digest) == Some(&place) {
                    places.remove(&digest);
                }
            }
            _ => break,
        }
    }
    let chunks = order.into_iter().filter_map(|d| places.remove(&d).map(|p| (d, p))).collect();
    Ok((chunks, slabs, next_slab))
}

/// Writes a fresh index holding `records` and opens it for appending.
fn write_index<'a>(dir: &Path, records: impl Iterator<Item = (u8, &'a [u8; 32], &'a Placement)>) -> io::Result<File> {
    let tmp = dir.join(format!("{TMP_PREFIX}{INDEX}"));
    {
        let mut out = io::BufWriter::new(File::create(&tmp)?);
        for (tag, digest, place) in records {
            out.write_all(&encode_record(tag, digest, place))?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    fs::rename(&tmp, dir.join(INDEX))?;
    OpenOptions::new().append(true).open(dir.join(INDEX))
}

/// Removes partial writes. Chunk files of the cache's earlier layout (one file per chunk, named
/// by its digest) are left alone, since `dir` may be a directory the user chose, and said once.
fn remove_leftovers(dir: &Path) -> io::Result<()> {
    let mut old_chunks = 0;
    for folder in [dir.to_path_buf(), dir.join(FILES_DIR)] {
        for entry in fs::read_dir(&folder)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
            } else if folder == dir && parse_digest(&name).is_some() {
                old_chunks += 1;
            }
        }
    }
    if old_chunks > 0 {
        warn!(
            dir = %dir.display(),
            files = old_chunks,
            "the chunk cache holds files of an earlier layout that are no longer used; remove the 64-hex-digit files at its top to free their space"
        );
    }
    Ok(())
}

/// The materialised files in `dir` and their lengths, oldest first.
fn materialised_files(dir: &Path) -> io::Result<Vec<([u8; 32], u64)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let (Some(key), Ok(meta)) = (parse_digest(&name.to_string_lossy()), entry.metadata()) else { continue };
        if meta.is_file() && meta.len() > 0 {
            found.push((meta.modified().ok(), key, meta.len()));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, key, len)| (key, len)).collect())
}

/// The chunks the cache in `dir` holds, read from its index without opening (or changing) the
/// cache, so while a mount is using it: for tests and diagnostics.
pub fn cached_chunks(dir: &Path) -> io::Result<HashSet<[u8; 32]>> {
    let bytes = match fs::read(dir.join(INDEX)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => return Err(e),
    };
    let mut held = HashSet::new();
    for record in bytes.chunks(RECORD_LEN) {
        match decode_record(record) {
            Some((ADDED, digest, _)) => held.insert(digest),
            Some((REMOVED, digest, _)) => held.remove(&digest),
            _ => break,
        };
    }
    Ok(held)
}

/// The digest a file name stands for: 64 lower-case hex digits.
fn parse_digest(name: &str) -> Option<[u8; 32]> {
    if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(name, &mut digest).ok()?;
    Some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(len: usize, seed: u8) -> (Vec<u8>, [u8; 32]) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed)).collect();
        let digest = chunk_digest(&data);
        (data, digest)
    }

    fn read(cache: &ChunkCache, digest: &[u8; 32], len: u32, offset: u32, n: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0; n];
        cache.read_chunk(digest, len, offset, &mut buf).map(|r| r.map(|()| buf).unwrap())
    }

    #[test]
    fn inserted_chunks_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        let (data, digest) = chunk(5000, 3);
        assert!(read(&cache, &digest, 5000, 0, 10).is_none());
        cache.insert(&digest, &data).unwrap();
        assert_eq!(read(&cache, &digest, 5000, 4900, 100).unwrap(), data[4900..]);
        assert_eq!(cache.used(), 5000);
        assert_eq!(cached_chunks(dir.path()).unwrap(), HashSet::from([digest]));
        assert!(cache.insert(&[0; 32], &[]).is_err(), "an empty chunk is refused");
    }

    #[test]
    fn least_recently_used_chunks_are_evicted_and_emptied_slabs_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let big = MAX_CHUNK_SIZE as usize;
        // Four chunks to a slab.
        let cache = ChunkCache::open_with_slab_size(dir.path(), MIN_CACHE_SIZE, 4 * big as u64).unwrap();
        let chunks: Vec<_> = (1..=21).map(|seed| chunk(big, seed)).collect();
        for (data, digest) in &chunks[..16] {
            cache.insert(digest, data).unwrap();
        }
        assert_eq!(fs::read_dir(dir.path().join(SLABS_DIR)).unwrap().count(), 4);
        // Touch the first so the second is now the least recently used.
        assert!(read(&cache, &chunks[0].1, big as u32, 0, 1).is_some());
        cache.insert(&chunks[16].1, &chunks[16].0).unwrap();
        assert!(cache.contains(&chunks[0].1));
        assert!(!cache.contains(&chunks[1].1));
        assert!(cache.used() <= cache.limit());
        // Four more evict chunks 2..=5: the second slab (chunks 4..=7) keeps three, the first
        // (0..=3) keeps chunk 0; a slab is deleted only once all its chunks are gone.
        for (data, digest) in &chunks[17..21] {
            cache.insert(digest, data).unwrap();
        }
        for (i, (_, digest)) in chunks.iter().enumerate().take(6).skip(1) {
            assert!(!cache.contains(digest), "chunk {i}");
        }
        assert!(dir.path().join(SLABS_DIR).join("0").exists(), "chunk 0 still lives in the first slab");
        let held = cached_chunks(dir.path()).unwrap();
        assert_eq!(held.len(), 16);
        assert!(held.contains(&chunks[0].1) && !held.contains(&chunks[1].1));
        for (data, digest) in &chunks[6..] {
            assert_eq!(read(&cache, digest, big as u32, 0, big).as_deref(), Some(data.as_slice()));
        }
    }

    #[test]
    fn chunks_survive_reopening_and_partial_writes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (data, digest) = chunk(1234, 9);
        let (other, other_digest) = chunk(777, 4);
        {
            let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
            cache.insert(&digest, &data).unwrap();
            cache.insert(&other_digest, &other).unwrap();
            cache.remove(&other_digest);
        }
        std::fs::write(dir.path().join(FILES_DIR).join(format!("{TMP_PREFIX}1-1")), b"partial").unwrap();
        // A torn record at the end of the index is ignored.
        let mut index = OpenOptions::new().append(true).open(dir.path().join(INDEX)).unwrap();
        index.write_all(&[ADDED, 1, 2, 3]).unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        assert!(cache.contains(&digest) && !cache.contains(&other_digest));
        assert_eq!(cache.used(), 1234);
        assert_eq!(read(&cache, &digest, 1234, 0, 1234).unwrap(), data);
        assert!(!dir.path().join(FILES_DIR).join(format!("{TMP_PREFIX}1-1")).exists());
        assert_eq!(fs::metadata(dir.path().join(INDEX)).unwrap().len(), RECORD_LEN as u64, "the index is compacted");
    }

    #[test]
    fn a_chunk_lost_on_disk_is_caught_on_its_first_read_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (data, digest) = chunk(4096, 7);
        let (slab, offset) = {
            let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
            cache.insert(&digest, &data).unwrap();
            cache.chunk_location(&digest).unwrap()
        };
        // As after a crash before the data reached the disk: the index says it is there.
        let file = OpenOptions::new().write(true).open(&slab).unwrap();
        file.write_all_at(&[0; 100], offset + 50).unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        assert!(cache.contains(&digest));
        assert!(read(&cache, &digest, 4096, 0, 10).is_none(), "a damaged chunk is never read");
        assert!(!cache.contains(&digest), "it is forgotten, to be fetched again");
        assert_eq!(cache.used(), 0);
        cache.insert(&digest, &data).unwrap();
        assert_eq!(read(&cache, &digest, 4096, 0, 4096).unwrap(), data);
    }

    #[test]
    fn a_read_of_the_wrong_length_forgets_the_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        let (data, digest) = chunk(1000, 5);
        cache.insert(&digest, &data).unwrap();
        assert!(read(&cache, &digest, 999, 0, 10).is_none());
        assert!(!cache.contains(&digest));
        assert_eq!(cache.used(), 0);
    }

    #[test]
    fn a_cache_in_use_cannot_be_opened_again_until_it_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        let err = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(err.to_string().contains("in use"), "{err}");
        drop(cache);
        ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
    }

    #[test]
    fn files_of_the_earlier_one_file_per_chunk_layout_are_neither_used_nor_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (_, digest) = chunk(10, 1);
        std::fs::write(dir.path().join(hex::encode(digest)), b"old").unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        assert!(!cache.contains(&digest));
        assert_eq!(cache.used(), 0);
        assert!(dir.path().join(hex::encode(digest)).exists(), "a file the cache did not write is not deleted");
    }

    #[test]
    fn materialised_files_share_the_limit_with_chunks_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let key = [7u8; 32];
        let len = 3 * u64::from(MAX_CHUNK_SIZE);
        {
            let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
            assert!(!cache.fits_file(MIN_CACHE_SIZE / 2 + 1), "a file over half the cache is not stored");
            let failed: io::Result<()> = cache.insert_file(&key, len, |file| file.write_all(b"short"));
            assert!(failed.is_err(), "a file of the wrong length is refused");
            assert!(!cache.contains_file(&key));
            cache.insert_file(&key, len, |file: &mut File| file.write_all(&vec![1u8; len as usize])).unwrap();
            assert_eq!(cache.used(), len);
            assert!(cache.open_file(&key, len).is_some());
            assert_eq!(std::fs::read_dir(dir.path().join(FILES_DIR)).unwrap().count(), 1, "no temporary file is left");
        }
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        assert!(cache.contains_file(&key));
        assert_eq!(cache.used(), len);
        // Chunks inserted later push the (least recently used) file out.
        let big = MAX_CHUNK_SIZE as usize;
        for seed in 1..=14 {
            let (data, digest) = chunk(big, seed);
            cache.insert(&digest, &data).unwrap();
        }
        assert!(!cache.contains_file(&key));
        assert!(!cache.file_path(&key).exists(), "an evicted file is removed");
        assert!(cache.used() <= cache.limit());
    }

    #[test]
    fn the_index_of_a_long_lived_cache_is_compacted_as_chunks_come_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        let (kept, kept_digest) = chunk(100, 1);
        cache.insert(&kept_digest, &kept).unwrap();
        for i in 0..3000u32 {
            let data = i.to_le_bytes().repeat(8);
            let digest = chunk_digest(&data);
            cache.insert(&digest, &data).unwrap();
            cache.remove(&digest);
        }
        let index_len = fs::metadata(dir.path().join(INDEX)).unwrap().len();
        assert!(index_len < (6000 * RECORD_LEN) as u64, "6,001 records written, {index_len} bytes left");
        assert_eq!(cached_chunks(dir.path()).unwrap(), HashSet::from([kept_digest]));
        drop(cache);
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        assert_eq!(read(&cache, &kept_digest, 100, 0, 100).unwrap(), kept);
    }

    #[test]
    fn a_removed_chunk_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        let (data, digest) = chunk(1000, 5);
        cache.insert(&digest, &data).unwrap();
        cache.remove(&digest);
        assert!(!cache.contains(&digest));
        assert!(cache.chunk_location(&digest).is_none());
        assert_eq!(cache.used(), 0);
        assert!(cached_chunks(dir.path()).unwrap().is_empty());
    }
}
