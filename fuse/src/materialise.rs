//! Whole files made local: once every chunk of a regular file is in the chunk cache, the file is
//! written out uncompressed in the cache (`files/<file key>`), checked chunk by chunk against the
//! bootstrap's digests, so the filesystem can hand it to the kernel (FUSE passthrough) and later
//! reads never enter this process.
//!
//! A materialised file is named by its [`file_key`], a digest of its size and chunk list, so it
//! is shared by every image and mount holding the same file, like chunks are. It is a cache
//! entry like a chunk: counted against the cache's limit and evicted least recently used first.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use thiserror::Error;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::cache::ChunkCache;
use crate::chunk::chunk_digest;
use crate::format::{Bootstrap, FileKind, MAX_CHUNK_SIZE};

/// Files materialised at once in the background: each is disk-bound.
const CONCURRENT_FILES: usize = 2;

/// Domain separation of file keys from chunk digests.
const FILE_KEY_CONTEXT: &[u8] = b"shoal materialised file v1";

/// Why a file could not be materialised.
#[derive(Debug, Error)]
pub enum MaterialiseError {
    /// The inode is not a regular file with data.
    #[error("inode {0} is not a regular file with data")]
    NotAFile(u64),
    /// The file is larger than the cache may hold as one file.
    #[error("inode {ino}: {size} bytes is over half the chunk cache's limit (raise --cache-size)")]
    TooLarge {
        /// The inode.
        ino: u64,
        /// Its size.
        size: u64,
    },
    /// A chunk of the file is not in the cache (any more).
    #[error("inode {ino}: chunk {digest} is not in the cache")]
    Missing {
        /// The inode.
        ino: u64,
        /// The chunk's blake3 digest, hex.
        digest: String,
    },
    /// A cached chunk does not match its digest: it was damaged on disk. It is removed from the cache.
    #[error("inode {ino}: cached chunk {digest} does not match its digest (damaged on disk); removed from the cache")]
    Corrupt {
        /// The inode.
        ino: u64,
        /// The chunk's blake3 digest, hex.
        digest: String,
    },
    /// Reading chunks or writing the file failed.
    #[error("writing the materialised file: {0} (check --cache-dir's free space and permissions)")]
    Io(#[from] io::Error),
}

/// Counters of materialised files, for logs and the stats file.
#[derive(Debug, Default)]
pub struct MaterialiseStats {
    /// Files materialised by this process.
    pub files: AtomicU64,
    /// Bytes of those files.
    pub bytes: AtomicU64,
    /// Attempts that failed.
    pub failed: AtomicU64,
}

/// The key a regular file is materialised under: blake3 of its size and its chunks' digests
/// and lengths, in order. `None` for anything but a regular file.
pub fn file_key(bootstrap: &Bootstrap, ino: u64) -> Option<[u8; 32]> {
    let attr = bootstrap.getattr(ino)?;
    let chunks = bootstrap.chunks_of(ino)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update(FILE_KEY_CONTEXT);
    hasher.update(&attr.size.to_le_bytes());
    for c in chunks {
        hasher.update(&c.chunk.digest);
        hasher.update(&c.chunk.uncompressed_len.to_le_bytes());
    }
    Some(*hasher.finalize().as_bytes())
}

/// Whether inode `ino` is a large file: a regular file of more than one chunk, the kind that
/// is materialised and read by passthrough once local.
pub fn is_large_file(bootstrap: &Bootstrap, ino: u64) -> bool {
    bootstrap.getattr(ino).is_some_and(|attr| attr.kind == FileKind::Regular)
        && bootstrap.chunks_of(ino).is_some_and(|mut chunks| chunks.nth(1).is_some())
}

/// Materialises an image's files into its chunk cache.
pub struct Materialiser {
    /// The image's metadata.
    bootstrap: Arc<Bootstrap>,
    /// Where the chunks are and the files go.
    cache: Arc<ChunkCache>,
    /// Runs background materialisation.
    runtime: Handle,
    /// Inodes being materialised or waiting to be.
    pending: Mutex<HashSet<u64>>,
    /// Bounds background materialisation.
    permits: Arc<Semaphore>,
    /// What was materialised.
    stats: MaterialiseStats,
}

impl std::fmt::Debug for Materialiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Materialiser").field("cache", &self.cache).field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Materialiser {
    /// Materialises `bootstrap`'s files from and into `cache`, in the background on `runtime`.
    pub fn new(bootstrap: Arc<Bootstrap>, cache: Arc<ChunkCache>, runtime: Handle) -> Self {
        Materialiser {
            bootstrap,
            cache,
            runtime,
            pending: Mutex::new(HashSet::new()),
            permits: Arc::new(Semaphore::new(CONCURRENT_FILES)),
            stats: MaterialiseStats::default(),
        }
    }

    /// What was materialised so far.
    pub fn stats(&self) -> &MaterialiseStats {
        &self.stats
    }

    /// Regular file `ino`'s size and key, when it has data.
    fn sized_key(&self, ino: u64) -> Option<(u64, [u8; 32])> {
        let attr = self.bootstrap.getattr(ino)?;
        if attr.kind != FileKind::Regular || attr.size == 0 {
            return None;
        }
        Some((attr.size, file_key(&self.bootstrap, ino)?))
    }

    /// Whether file `ino` is ever materialised: a regular file of more than one chunk that fits
    /// the cache. Files of one chunk are not: they are small, so their opens, not their reads,
    /// cost most, and the plain path keeps them in the page cache; a copy of each would cost a
    /// file creation and a sync.
    pub fn may_materialise(&self, ino: u64) -> bool {
        is_large_file(&self.bootstrap, ino) && self.bootstrap.getattr(ino).is_some_and(|attr| self.cache.fits_file(attr.size))
    }

    /// Opens the materialised copy of file `ino` (marking it used), if there is one.
    pub fn open(&self, ino: u64) -> Option<File> {
        let (size, key) = self.sized_key(ino)?;
        self.cache.open_file(&key, size)
    }

    /// Whether file `ino` is materialised.
    pub fn is_materialised(&self, ino: u64) -> bool {
        self.sized_key(ino).is_some_and(|(_, key)| self.cache.contains_file(&key))
    }

    /// Whether every chunk of file `ino` is in the cache.
    pub fn all_local(&self, ino: u64) -> bool {
        self.bootstrap.chunks_of(ino).is_some_and(|mut chunks| chunks.all(|c| self.cache.contains(&c.chunk.digest)))
    }

    /// Starts materialising file `ino` in the background when it has data, is not materialised
    /// yet, fits the cache, and every one of its chunks is local. Cheap when there is nothing to
    /// do; files of one chunk are never materialised.
    pub fn offer(self: &Arc<Self>, ino: u64) {
        if !self.may_materialise(ino) {
            return;
        }
        let Some((_, key)) = self.sized_key(ino) else { return };
        if self.cache.contains_file(&key) || !self.all_local(ino) {
            return;
        }
        if !self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(ino) {
            return;
        }
        let this = self.clone();
        self.runtime.spawn(async move {
            let permit = this.permits.clone().acquire_owned().await;
            let worker = this.clone();
            let outcome = tokio::task::spawn_blocking(move || worker.materialise(ino))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(format!("the materialising task failed: {e}")).into()));
            drop(permit);
            this.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&ino);
            match outcome {
                Ok(()) => {}
                Err(MaterialiseError::Missing { .. }) => debug!(ino, "a chunk was evicted before the file was materialised"),
                Err(e) => warn!(ino, error = %e, "cannot materialise a file; its reads stay on the chunk path"),
            }
        });
    }

    /// Writes file `ino` from its cached chunks into the cache, each chunk checked against its
    /// digest first; blocks on disk I/O.
    pub fn materialise(&self, ino: u64) -> Result<(), MaterialiseError> {
        let (size, key) = self.sized_key(ino).ok_or(MaterialiseError::NotAFile(ino))?;
        if self.cache.contains_file(&key) {
            return Ok(());
        }
        if !self.cache.fits_file(size) {
            return Err(MaterialiseError::TooLarge { ino, size });
        }
        let chunks = self.bootstrap.chunks_of(ino).ok_or(MaterialiseError::NotAFile(ino))?;
        let started = Instant::now();
        let mut buf = vec![0u8; MAX_CHUNK_SIZE as usize];
        let written = self.cache.insert_file(&key, size, |file| {
            for c in chunks {
                let digest = &c.chunk.digest;
                let len = c.chunk.uncompressed_len;
                let hex_digest = || hex::encode(digest);
                let data = &mut buf[..len as usize];
                self.cache.read_chunk(digest, len, 0, data).ok_or_else(|| MaterialiseError::Missing { ino, digest: hex_digest() })??;
                if chunk_digest(data) != *digest {
                    self.cache.remove(digest);
                    return Err(MaterialiseError::Corrupt { ino, digest: hex_digest() });
                }
                file.write_all(data)?;
            }
            Ok(())
        });
        match &written {
            Ok(()) => {
                self.stats.files.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes.fetch_add(size, Ordering::Relaxed);
                debug!(ino, size, key = %hex::encode(key), elapsed = ?started.elapsed(), "file materialised");
            }
            Err(_) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::cache::MIN_CACHE_SIZE;
    use crate::chunk::decompress_chunk;
    use crate::test_data::{pattern, tar_of};
    use crate::tree::TreeBuilder;

    const MIB: usize = MAX_CHUNK_SIZE as usize;

    struct Fixture {
        bootstrap: Arc<Bootstrap>,
        cache: Arc<ChunkCache>,
        blob: Vec<u8>,
        files: Vec<(&'static str, Vec<u8>)>,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new(limit: u64) -> Fixture {
            let files = vec![("big", pattern(MIB * 5 / 2, 3)), ("small", b"small file".to_vec()), ("empty", Vec::new())];
            let entries: Vec<(&str, &[u8])> = files.iter().map(|(path, data)| (*path, data.as_slice())).collect();
            let tar = tar_of(&entries);
            let mut builder = TreeBuilder::default();
            let mut blob = Vec::new();
            builder.add_layer(&mut tar::Archive::new(tar.as_slice()), &mut blob).unwrap();
            let bootstrap = Arc::new(builder.finish::<&str>(&[]).unwrap().bootstrap);
            let dir = tempfile::tempdir().unwrap();
            let cache = Arc::new(ChunkCache::open(dir.path(), limit).unwrap());
            Fixture { bootstrap, cache, blob, files, _dir: dir }
        }

        fn ino(&self, path: &str) -> u64 {
            self.bootstrap.resolve(path.as_bytes()).unwrap()
        }

        /// Puts the chunks of `path` into the cache.
        fn make_local(&self, path: &str) {
            for c in self.bootstrap.chunks_of(self.ino(path)).unwrap() {
                let start = c.chunk.compressed_offset as usize;
                let compressed = &self.blob[start..start + c.chunk.compressed_len as usize];
                let data = decompress_chunk(compressed, c.chunk.uncompressed_len, &c.chunk.digest).unwrap();
                self.cache.insert(&c.chunk.digest, &data).unwrap();
            }
        }

        fn materialiser(&self) -> Materialiser {
            Materialiser::new(self.bootstrap.clone(), self.cache.clone(), Handle::current())
        }
    }

    #[tokio::test]
    async fn a_file_whose_chunks_are_local_materialises_to_its_exact_bytes() {
        let f = Fixture::new(MIN_CACHE_SIZE);
        let m = f.materialiser();
        let big = f.ino("big");
        assert!(!m.all_local(big));
        assert!(matches!(m.materialise(big), Err(MaterialiseError::Missing { .. })));
        f.make_local("big");
        assert!(m.all_local(big));
        m.materialise(big).unwrap();
        assert!(m.is_materialised(big));
        let mut back = Vec::new();
        m.open(big).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, f.files[0].1);
        assert_eq!(m.stats().files.load(Ordering::Relaxed), 1);
        assert!(matches!(m.materialise(f.ino("empty")), Err(MaterialiseError::NotAFile(_))), "an empty file has nothing to hand over");
    }

    #[tokio::test]
    async fn a_chunk_damaged_in_the_cache_is_never_materialised_and_is_dropped() {
        let f = Fixture::new(MIN_CACHE_SIZE);
        let m = f.materialiser();
        f.make_local("big");
        let second = *f.bootstrap.chunks_of(f.ino("big")).unwrap().nth(1).unwrap().chunk;
        let (slab, offset) = f.cache.chunk_location(&second.digest).unwrap();
        let slab = std::fs::OpenOptions::new().read(true).write(true).open(slab).unwrap();
        let mut byte = [0u8];
        slab.read_exact_at(&mut byte, offset + 100).unwrap();
        slab.write_all_at(&[byte[0] ^ 0xff], offset + 100).unwrap();
        assert!(matches!(m.materialise(f.ino("big")), Err(MaterialiseError::Corrupt { .. })));
        assert!(!m.is_materialised(f.ino("big")));
        assert!(!f.cache.contains(&second.digest), "the damaged chunk is forgotten, to be fetched again");
        let key = file_key(&f.bootstrap, f.ino("big")).unwrap();
        assert!(!f.cache.file_path(&key).exists());
        assert_eq!(std::fs::read_dir(f.cache.file_path(&key).parent().unwrap()).unwrap().count(), 0, "no temporary file is left");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn offering_a_local_file_materialises_it_in_the_background_once() {
        let f = Fixture::new(MIN_CACHE_SIZE);
        let m = Arc::new(f.materialiser());
        let big = f.ino("big");
        m.offer(big);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!m.is_materialised(big), "not every chunk is local");
        f.make_local("big");
        for _ in 0..4 {
            m.offer(big);
        }
        let start = Instant::now();
        while !m.is_materialised(big) {
            assert!(start.elapsed().as_secs() < 10, "not materialised");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(m.stats().files.load(Ordering::Relaxed), 1);
    }
}
