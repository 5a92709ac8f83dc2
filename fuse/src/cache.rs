//! The local chunk cache: verified, uncompressed chunks on disk, one file per chunk named by the
//! chunk's blake3 digest, plus whole files materialised from their chunks (under `files/`, named
//! by [`file key`](crate::materialise::file_key)), evicted least recently used first to stay
//! under one size limit.
//!
//! Only data whose digest was checked is ever inserted, and a file appears under its final name
//! only once completely written (write to a temporary name, then rename), so any file found
//! under a chunk's or a file key's name holds that data. Chunks and materialised files are
//! content-addressed, so several images (and later mounts of one image) share the cache.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use lru::LruCache;
use tracing::{debug, warn};

use crate::format::MAX_CHUNK_SIZE;

/// The smallest size limit accepted: a read may need a few chunks at once.
pub const MIN_CACHE_SIZE: u64 = 16 * MAX_CHUNK_SIZE as u64;

/// Prefix of files being written; they are removed when the cache is opened.
const TMP_PREFIX: &str = ".tmp-";

/// The subdirectory holding materialised files.
const FILES_DIR: &str = "files";

/// What the cache holds an entry of; both are named by a 32-byte digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Entry {
    /// A chunk, by the blake3 digest of its data.
    Chunk([u8; 32]),
    /// A materialised file, by its file key.
    File([u8; 32]),
}

/// What the cache holds.
struct CacheState {
    /// Entry sizes, least recently used first.
    lru: LruCache<Entry, u64>,
    /// Bytes held.
    used: u64,
}

/// A directory of chunks and materialised files with LRU eviction.
pub struct ChunkCache {
    /// Where the chunk files are; materialised files are in its `files/`.
    dir: PathBuf,
    /// The most bytes kept.
    limit: u64,
    /// Which entries are held, in use order.
    state: Mutex<CacheState>,
    /// Numbers temporary files uniquely within this process.
    next_tmp: AtomicU64,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache").field("dir", &self.dir).field("limit", &self.limit).field("used", &self.used()).finish()
    }
}

impl ChunkCache {
    /// Opens (creating it if needed) the cache in `dir`, keeping at most `limit` bytes (raised
    /// to [`MIN_CACHE_SIZE`]). Chunks and materialised files already there are kept, up to the limit.
    pub fn open(dir: &Path, limit: u64) -> io::Result<ChunkCache> {
        fs::create_dir_all(dir.join(FILES_DIR))?;
        let cache = ChunkCache {
            dir: dir.to_path_buf(),
            limit: limit.max(MIN_CACHE_SIZE),
            state: Mutex::new(CacheState { lru: LruCache::unbounded(), used: 0 }),
            next_tmp: AtomicU64::new(0),
        };
        cache.scan()?;
        Ok(cache)
    }

    /// Indexes the chunks and materialised files left by earlier runs, oldest first, and
    /// removes partial writes.
    fn scan(&self) -> io::Result<()> {
        let mut found = Vec::new();
        for (dir, entry_of, max_len) in [
            (self.dir.clone(), Entry::Chunk as fn([u8; 32]) -> Entry, u64::from(MAX_CHUNK_SIZE)),
            (self.dir.join(FILES_DIR), Entry::File as fn([u8; 32]) -> Entry, u64::MAX),
        ] {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(TMP_PREFIX) {
                    let _ = fs::remove_file(entry.path());
                    continue;
                }
                let (Some(digest), Ok(meta)) = (parse_digest(&name), entry.metadata()) else {
                    continue;
                };
                if !meta.is_file() || meta.len() == 0 || meta.len() > max_len {
                    continue;
                }
                found.push((meta.modified().ok(), entry_of(digest), meta.len()));
            }
        }
        found.sort();
        let mut state = self.lock();
        for (_, entry, len) in found {
            state.lru.put(entry, len);
            state.used += len;
        }
        drop(state);
        self.evict(None);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The file of chunk `digest`.
    pub fn path(&self, digest: &[u8; 32]) -> PathBuf {
        self.dir.join(hex::encode(digest))
    }

    /// The materialised file of file key `key`.
    pub fn file_path(&self, key: &[u8; 32]) -> PathBuf {
        self.dir.join(FILES_DIR).join(hex::encode(key))
    }

    fn entry_path(&self, entry: &Entry) -> PathBuf {
        match entry {
            Entry::Chunk(digest) => self.path(digest),
            Entry::File(key) => self.file_path(key),
        }
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

    /// Opens chunk `digest`, which must be `len` bytes, and marks it used. `None` when it is not
    /// held (or its file went missing or has the wrong length; it is then forgotten). The open
    /// file stays readable even if the chunk is evicted meanwhile.
    pub fn open_chunk(&self, digest: &[u8; 32], len: u32) -> Option<File> {
        self.open_entry(Entry::Chunk(*digest), u64::from(len))
    }

    /// Opens the materialised file `key`, which must be `len` bytes, and marks it used; like
    /// [`open_chunk`](Self::open_chunk).
    pub fn open_file(&self, key: &[u8; 32], len: u64) -> Option<File> {
        self.open_entry(Entry::File(*key), len)
    }

    fn open_entry(&self, entry: Entry, len: u64) -> Option<File> {
        let mut state = self.lock();
        state.lru.get(&entry)?;
        let path = self.entry_path(&entry);
        let file = File::open(&path).ok().filter(|file| file.metadata().is_ok_and(|meta| meta.len() == len));
        if file.is_none() {
            warn!(path = %path.display(), "cached file missing or of the wrong length; forgetting it");
            if let Some(size) = state.lru.pop(&entry) {
                state.used -= size;
            }
            let _ = fs::remove_file(&path);
        }
        file
    }

    /// Forgets chunk `digest` and removes its file: it was found not to hold the chunk.
    pub fn remove(&self, digest: &[u8; 32]) {
        let entry = Entry::Chunk(*digest);
        {
            let mut state = self.lock();
            if let Some(size) = state.lru.pop(&entry) {
                state.used -= size;
            }
        }
        let _ = fs::remove_file(self.entry_path(&entry));
    }

    /// A new temporary file name in `dir`.
    fn tmp_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{TMP_PREFIX}{}-{}", std::process::id(), self.next_tmp.fetch_add(1, Ordering::Relaxed)))
    }

    /// Stores chunk `digest` with its verified uncompressed `data`, then evicts least recently
    /// used entries until the cache is within its limit.
    pub fn insert(&self, digest: &[u8; 32], data: &[u8]) -> io::Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        let tmp = self.tmp_path(&self.dir);
        let written = File::create(&tmp).and_then(|mut file| file.write_all(data)).and_then(|()| fs::rename(&tmp, self.path(digest)));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.account(Entry::Chunk(*digest), data.len() as u64);
        Ok(())
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
        self.account(Entry::File(*key), len);
        Ok(())
    }

    /// Records a new entry of `len` bytes and evicts others until within the limit.
    fn account(&self, entry: Entry, len: u64) {
        {
            let mut state = self.lock();
            if state.lru.put(entry, len).is_none() {
                state.used += len;
            }
        }
        self.evict(Some(&entry));
    }

    /// Removes least recently used entries until within the limit, never `keep`.
    fn evict(&self, keep: Option<&Entry>) {
        let mut victims = Vec::new();
        {
            let mut state = self.lock();
            while state.used > self.limit {
                let Some((entry, size)) = state.lru.pop_lru() else { break };
                if Some(&entry) == keep {
                    state.lru.put(entry, size);
                    if state.lru.len() == 1 {
                        break;
                    }
                    continue;
                }
                state.used -= size;
                victims.push(entry);
            }
        }
        for entry in victims {
            // A materialised file still open by passthrough stays readable: the kernel holds it.
            let path = self.entry_path(&entry);
            debug!(path = %path.display(), "evicting from the cache");
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(path = %path.display(), error = %e, "cannot remove an evicted file");
                }
            }
        }
    }
}

/// Reads `buf.len()` bytes at `offset` of `file`.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

/// The digest a chunk file name stands for: 64 lower-case hex digits.
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
    use crate::chunk::chunk_digest;

    fn chunk(len: usize, seed: u8) -> (Vec<u8>, [u8; 32]) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed)).collect();
        let digest = chunk_digest(&data);
        (data, digest)
    }

    #[test]
    fn inserted_chunks_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        let (data, digest) = chunk(5000, 3);
        assert!(cache.open_chunk(&digest, 5000).is_none());
        cache.insert(&digest, &data).unwrap();
        let file = cache.open_chunk(&digest, 5000).unwrap();
        let mut back = vec![0; 100];
        read_exact_at(&file, &mut back, 4900).unwrap();
        assert_eq!(back, data[4900..]);
        assert_eq!(cache.used(), 5000);
    }

    #[test]
    fn least_recently_used_chunks_are_evicted_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        let big = MAX_CHUNK_SIZE as usize;
        let chunks: Vec<_> = (1..=17).map(|seed| chunk(big, seed)).collect();
        for (data, digest) in &chunks[..16] {
            cache.insert(digest, data).unwrap();
        }
        // Touch the first so the second is now the least recently used.
        assert!(cache.open_chunk(&chunks[0].1, big as u32).is_some());
        cache.insert(&chunks[16].1, &chunks[16].0).unwrap();
        assert!(cache.contains(&chunks[0].1));
        assert!(!cache.contains(&chunks[1].1));
        assert!(!cache.path(&chunks[1].1).exists(), "an evicted chunk's file is removed");
        assert!(cache.used() <= cache.limit());
    }

    #[test]
    fn chunks_survive_reopening_and_partial_writes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (data, digest) = chunk(1234, 9);
        {
            let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
            cache.insert(&digest, &data).unwrap();
        }
        std::fs::write(dir.path().join(format!("{TMP_PREFIX}1-1")), b"partial").unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        assert!(cache.contains(&digest));
        assert_eq!(cache.used(), 1234);
        assert!(!dir.path().join(format!("{TMP_PREFIX}1-1")).exists());
    }

    #[test]
    fn a_chunk_file_of_the_wrong_length_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        let (data, digest) = chunk(1000, 5);
        cache.insert(&digest, &data).unwrap();
        std::fs::write(cache.path(&digest), b"short").unwrap();
        assert!(cache.open_chunk(&digest, 1000).is_none());
        assert!(!cache.contains(&digest));
        assert_eq!(cache.used(), 0);
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
        std::fs::write(dir.path().join(FILES_DIR).join(format!("{TMP_PREFIX}1-1")), b"partial").unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        assert!(cache.contains_file(&key));
        assert_eq!(cache.used(), len);
        assert!(!dir.path().join(FILES_DIR).join(format!("{TMP_PREFIX}1-1")).exists());
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
    fn a_removed_chunk_is_forgotten_with_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap();
        let (data, digest) = chunk(1000, 5);
        cache.insert(&digest, &data).unwrap();
        cache.remove(&digest);
        assert!(!cache.contains(&digest));
        assert!(!cache.path(&digest).exists());
        assert_eq!(cache.used(), 0);
    }
}
