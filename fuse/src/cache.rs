//! The local chunk cache: verified, uncompressed chunks on disk, one file per chunk named by the
//! chunk's blake3 digest, evicted least recently used first to stay under a size limit.
//!
//! Only data whose digest was checked is ever inserted, and a file appears under its final name
//! only once completely written (write to a temporary name, then rename), so any file found
//! under a chunk's name holds that chunk. Chunks are content-addressed, so several images (and
//! later mounts of one image) share the cache.

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

/// What the cache holds.
struct CacheState {
    /// Chunk sizes by digest, least recently used first.
    lru: LruCache<[u8; 32], u64>,
    /// Bytes held.
    used: u64,
}

/// A directory of chunks with LRU eviction.
pub struct ChunkCache {
    /// Where the chunk files are.
    dir: PathBuf,
    /// The most bytes kept.
    limit: u64,
    /// Which chunks are held, in use order.
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
    /// to [`MIN_CACHE_SIZE`]). Chunks already there are kept, up to the limit.
    pub fn open(dir: &Path, limit: u64) -> io::Result<ChunkCache> {
        fs::create_dir_all(dir)?;
        let cache = ChunkCache {
            dir: dir.to_path_buf(),
            limit: limit.max(MIN_CACHE_SIZE),
            state: Mutex::new(CacheState { lru: LruCache::unbounded(), used: 0 }),
            next_tmp: AtomicU64::new(0),
        };
        cache.scan()?;
        Ok(cache)
    }

    /// Indexes the chunk files left by earlier runs, oldest first, and removes partial writes.
    fn scan(&self) -> io::Result<()> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
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
            if !meta.is_file() || meta.len() == 0 || meta.len() > u64::from(MAX_CHUNK_SIZE) {
                continue;
            }
            found.push((meta.modified().ok(), digest, meta.len()));
        }
        found.sort();
        let mut state = self.lock();
        for (_, digest, len) in found {
            state.lru.put(digest, len);
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
        self.lock().lru.contains(digest)
    }

    /// Opens chunk `digest`, which must be `len` bytes, and marks it used. `None` when it is not
    /// held (or its file went missing or has the wrong length; it is then forgotten). The open
    /// file stays readable even if the chunk is evicted meanwhile.
    pub fn open_chunk(&self, digest: &[u8; 32], len: u32) -> Option<File> {
        let mut state = self.lock();
        state.lru.get(digest)?;
        let path = self.path(digest);
        let file = File::open(&path).ok().filter(|file| file.metadata().is_ok_and(|meta| meta.len() == u64::from(len)));
        if file.is_none() {
            warn!(chunk = %hex::encode(digest), "chunk file missing or of the wrong length in the cache; fetching it again");
            if let Some(size) = state.lru.pop(digest) {
                state.used -= size;
            }
            let _ = fs::remove_file(&path);
        }
        file
    }

    /// Stores chunk `digest` with its verified uncompressed `data`, then evicts least recently
    /// used chunks until the cache is within its limit.
    pub fn insert(&self, digest: &[u8; 32], data: &[u8]) -> io::Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        let tmp = self.dir.join(format!("{TMP_PREFIX}{}-{}", std::process::id(), self.next_tmp.fetch_add(1, Ordering::Relaxed)));
        let written = File::create(&tmp).and_then(|mut file| file.write_all(data)).and_then(|()| fs::rename(&tmp, self.path(digest)));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        {
            let mut state = self.lock();
            if state.lru.put(*digest, data.len() as u64).is_none() {
                state.used += data.len() as u64;
            }
        }
        self.evict(Some(digest));
        Ok(())
    }

    /// Removes least recently used chunks until within the limit, never `keep`.
    fn evict(&self, keep: Option<&[u8; 32]>) {
        let mut victims = Vec::new();
        {
            let mut state = self.lock();
            while state.used > self.limit {
                let Some((digest, size)) = state.lru.pop_lru() else { break };
                if Some(&digest) == keep {
                    state.lru.put(digest, size);
                    if state.lru.len() == 1 {
                        break;
                    }
                    continue;
                }
                state.used -= size;
                victims.push(digest);
            }
        }
        for digest in victims {
            debug!(chunk = %hex::encode(digest), "evicting chunk from the cache");
            if let Err(e) = fs::remove_file(self.path(&digest)) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(chunk = %hex::encode(digest), error = %e, "cannot remove an evicted chunk file");
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
}
