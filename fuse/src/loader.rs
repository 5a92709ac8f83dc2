//! Getting chunks into the local cache: each missing chunk is fetched once however many reads
//! wait for it, verified against its blake3 digest, and stored; file reads are answered from
//! the cached chunks, with readahead of the following chunks on sequential reads and a
//! background prefetch of the image's prefetch list.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use thiserror::Error;
use tokio::runtime::Handle;
use tracing::{debug, info, warn};

use crate::cache::ChunkCache;
use crate::chunk::{decompress_chunk, ChunkError};
use crate::format::{Bootstrap, Chunk};
use crate::source::{ChunkSource, SourceError};

/// How many recently read files readahead remembers the read position of.
const TRACKED_FILES: usize = 4096;

/// How many times a read retries a chunk that was evicted between loading and reading it.
const READ_ATTEMPTS: usize = 3;

/// Chunks of at most this many uncompressed bytes (small files, and the tails of larger ones)
/// are fetched together with the small chunks that follow them in their blob.
const SMALL_CHUNK: u32 = 128 << 10;

/// Compressed bytes one fetch of small chunks covers at most. The builder writes a layer's
/// files in tar order, so the chunks after a small file's are mostly its neighbours in the
/// directory, which a starting program tends to read next: one request (one `Range`, one
/// `pread`) brings in dozens of them instead of a round trip each.
const BATCH_BYTES: u64 = 256 << 10;

/// Why a chunk or a read could not be served. Cloned to every read waiting for one fetch.
#[derive(Debug, Clone, Error)]
pub enum LoadError {
    /// The chunk's bytes could not be fetched.
    #[error("{0}")]
    Source(Arc<SourceError>),
    /// The fetched bytes are not the chunk: corrupt, misplaced or tampered with.
    #[error("{0}")]
    Verify(Arc<ChunkError>),
    /// The verified chunk could not be stored in the cache, or read back from it.
    #[error("chunk {digest}: chunk cache: {reason} (check --cache-dir's free space and permissions)")]
    Cache {
        /// The chunk's blake3 digest, hex.
        digest: String,
        /// What went wrong.
        reason: String,
    },
    /// The bootstrap has no such chunk or file.
    #[error("{0}")]
    NotFound(String),
}

/// Counters of what the loader did, for logs.
#[derive(Debug, Default)]
pub struct LoadStats {
    /// Chunks fetched from the source and stored.
    pub fetched_chunks: AtomicU64,
    /// Compressed bytes fetched.
    pub fetched_bytes: AtomicU64,
    /// Fetches that failed (source errors and digest mismatches).
    pub failed_chunks: AtomicU64,
}

/// A fetch in progress that several reads may wait for.
type InFlight = Shared<BoxFuture<'static, Result<(), LoadError>>>;

/// Tells the reads waiting for one chunk of a batch how its fetch ended.
type Done = tokio::sync::oneshot::Sender<Result<(), LoadError>>;

/// One chunk of a file, owned so it can cross tasks.
#[derive(Debug, Clone, Copy)]
struct Placed {
    /// Where the chunk's data starts in the file.
    file_offset: u64,
    /// The chunk's index in the chunk table.
    index: u32,
    /// The chunk.
    chunk: Chunk,
}

/// Decompresses and verifies `chunk`'s `compressed` bytes and stores the data in `cache`;
/// returns the data.
fn store(cache: &ChunkCache, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>, LoadError> {
    let data = decompress_chunk(compressed, chunk.uncompressed_len, &chunk.digest).map_err(|e| LoadError::Verify(Arc::new(e)))?;
    cache.insert(&chunk.digest, &data).map_err(|e| LoadError::Cache { digest: hex::encode(chunk.digest), reason: e.to_string() })?;
    Ok(data)
}

/// Loads an image's chunks into a cache and reads files from them.
pub struct ChunkLoader {
    /// The image's metadata.
    bootstrap: Arc<Bootstrap>,
    /// Where verified chunks are kept.
    cache: Arc<ChunkCache>,
    /// Where chunk bytes come from.
    source: Arc<dyn ChunkSource>,
    /// Runs fetches, readahead and prefetch.
    runtime: Handle,
    /// Fetches in progress by chunk index.
    inflight: Mutex<HashMap<u32, InFlight>>,
    /// Where the last read of each recently read file ended, to spot sequential reads.
    read_ends: Mutex<lru::LruCache<u64, u64>>,
    /// How many chunks past a sequential read to fetch ahead.
    readahead: usize,
    /// For each chunk (by index), the chunk that follows it in its blob, if it starts right
    /// where this one ends.
    next_in_blob: Vec<Option<u32>>,
    /// What was fetched.
    stats: LoadStats,
}

impl std::fmt::Debug for ChunkLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkLoader").field("source", &self.source.describe()).field("cache", &self.cache).finish_non_exhaustive()
    }
}

impl ChunkLoader {
    /// A loader of `bootstrap`'s chunks from `source` into `cache`, fetching `readahead` chunks
    /// ahead of sequential reads, running its tasks on `runtime`.
    pub fn new(bootstrap: Arc<Bootstrap>, cache: Arc<ChunkCache>, source: Arc<dyn ChunkSource>, runtime: Handle, readahead: usize) -> Self {
        let next_in_blob = next_in_blob(bootstrap.chunks());
        ChunkLoader {
            next_in_blob,
            bootstrap,
            cache,
            source,
            runtime,
            inflight: Mutex::new(HashMap::new()),
            read_ends: Mutex::new(lru::LruCache::new(NonZeroUsize::new(TRACKED_FILES).unwrap_or(NonZeroUsize::MIN))),
            readahead,
            stats: LoadStats::default(),
        }
    }

    /// The image's metadata.
    pub fn bootstrap(&self) -> &Arc<Bootstrap> {
        &self.bootstrap
    }

    /// The chunk cache.
    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// What was fetched so far.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// Makes chunk `index` local: returns once its verified data is in the cache. Concurrent
    /// callers for one chunk share one fetch (and its outcome).
    pub async fn load(self: &Arc<Self>, index: u32) -> Result<(), LoadError> {
        let chunk = *self
            .bootstrap
            .chunks()
            .get(index as usize)
            .ok_or_else(|| LoadError::NotFound(format!("chunk {index} is not in the bootstrap")))?;
        if self.cache.contains(&chunk.digest) {
            return Ok(());
        }
        // A small chunk brings the small chunks after it along; a larger one comes alone.
        let mut batch = vec![index];
        if chunk.uncompressed_len <= SMALL_CHUNK {
            batch.extend(self.small_chunks_after(index));
        }
        match self.start_batch(&batch) {
            Some(fetch) => fetch.await,
            None => Err(LoadError::NotFound(format!("chunk {index} is not in the bootstrap"))),
        }
    }

    /// The small chunks following chunk `index` in its blob, back to back, that are neither
    /// local nor being fetched, as many as fit in [`BATCH_BYTES`] with it.
    fn small_chunks_after(&self, index: u32) -> Vec<u32> {
        let chunks = self.bootstrap.chunks();
        let Some(first) = chunks.get(index as usize) else { return Vec::new() };
        let mut bytes = u64::from(first.compressed_len);
        let mut after = Vec::new();
        let mut at = index;
        while let Some(next) = self.next_in_blob.get(at as usize).copied().flatten() {
            let chunk = &chunks[next as usize];
            bytes += u64::from(chunk.compressed_len);
            if chunk.uncompressed_len > SMALL_CHUNK || bytes > BATCH_BYTES || self.cache.contains(&chunk.digest) || self.is_inflight(next) {
                break;
            }
            after.push(next);
            at = next;
        }
        after
    }

    /// Starts fetching `batch`, chunks back to back in one blob, with one request, and storing
    /// each as soon as its bytes are in. The batch stops before the first chunk already in
    /// flight, so one request never covers another's chunk. Returns what to wait on for the
    /// batch's first chunk: its new fetch, or the one already in flight (`None` if it is not
    /// in the bootstrap).
    fn start_batch(self: &Arc<Self>, batch: &[u32]) -> Option<InFlight> {
        let chunks = self.bootstrap.chunks();
        let mut first = None;
        let mut pending = Batch { loader: self.clone(), chunks: Vec::new() };
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            for &index in batch {
                let Some(&chunk) = chunks.get(index as usize) else { break };
                if let Some(fetch) = inflight.get(&index) {
                    if pending.chunks.is_empty() {
                        first = Some(fetch.clone());
                    }
                    break;
                }
                let (tx, rx) = tokio::sync::oneshot::channel::<Result<(), LoadError>>();
                let fetch = rx
                    .map(|outcome| {
                        outcome.unwrap_or_else(|_| {
                            Err(LoadError::Cache { digest: String::new(), reason: "the fetching task ended early".into() })
                        })
                    })
                    .boxed()
                    .shared();
                inflight.insert(index, fetch.clone());
                first.get_or_insert(fetch);
                pending.chunks.push((chunk, index, tx));
            }
        }
        if !pending.chunks.is_empty() {
            self.runtime.spawn(pending.fetch_and_store());
        }
        first
    }

    /// The blob chunk `chunk` is in.
    fn blob_of(&self, chunk: &Chunk) -> Result<crate::format::Blob, LoadError> {
        self.bootstrap
            .blobs()
            .get(chunk.blob as usize)
            .copied()
            .ok_or_else(|| LoadError::NotFound(format!("chunk {}: blob {} is not in the bootstrap", hex::encode(chunk.digest), chunk.blob)))
    }

    /// Accounts for a fetch of `chunk`'s bytes.
    fn fetched(&self, chunk: &Chunk, fetched: Result<bytes::Bytes, SourceError>) -> Result<bytes::Bytes, LoadError> {
        match fetched {
            Ok(bytes) => {
                self.stats.fetched_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(bytes)
            }
            Err(e) => {
                self.stats.failed_chunks.fetch_add(1, Ordering::Relaxed);
                warn!(chunk = %hex::encode(chunk.digest), error = %e, "cannot fetch a chunk");
                Err(LoadError::Source(Arc::new(e)))
            }
        }
    }

    /// Accounts for storing `chunk`.
    fn stored<T>(&self, chunk: &Chunk, started: Instant, stored: Result<T, LoadError>) -> Result<T, LoadError> {
        let digest = hex::encode(chunk.digest);
        match &stored {
            Ok(_) => {
                self.stats.fetched_chunks.fetch_add(1, Ordering::Relaxed);
                debug!(chunk = %digest, blob = chunk.blob, len = chunk.compressed_len, elapsed = ?started.elapsed(), "chunk fetched");
            }
            Err(LoadError::Verify(e)) => {
                self.stats.failed_chunks.fetch_add(1, Ordering::Relaxed);
                warn!(chunk = %digest, blob = chunk.blob, offset = chunk.compressed_offset, error = %e, "chunk failed verification; reads that need it get EIO");
            }
            Err(e) => warn!(chunk = %digest, error = %e, "cannot store a chunk"),
        }
        stored
    }

    /// Reads `[offset, offset + size)` of regular file `ino` right away, on the calling thread,
    /// when its missing chunks can be had without waiting on a network (a local blob
    /// directory): a cold read of a local image then costs no hand-over between threads.
    /// `None` when the read has to wait (remote chunks, or a fetch already in flight).
    pub fn read_now(self: &Arc<Self>, ino: u64, offset: u64, size: u32) -> Option<Result<Vec<u8>, LoadError>> {
        if !self.source.is_local() {
            return None;
        }
        let placed = match self.placed(ino, offset, u64::from(size)) {
            Ok(placed) => placed,
            Err(e) => return Some(Err(e)),
        };
        let mut fresh = HashMap::new();
        for p in placed.iter().filter(|p| !self.cache.contains(&p.chunk.digest)) {
            if self.is_inflight(p.index) {
                return None;
            }
            let blob = match self.blob_of(&p.chunk) {
                Ok(blob) => blob,
                Err(e) => return Some(Err(e)),
            };
            let started = Instant::now();
            let fetched = self.source.fetch_now(blob, p.chunk.compressed_offset, p.chunk.compressed_len)?;
            let stored = self.fetched(&p.chunk, fetched).and_then(|compressed| store(&self.cache, &p.chunk, &compressed));
            match self.stored(&p.chunk, started, stored) {
                Ok(data) => fresh.insert(p.index, data),
                Err(e) => return Some(Err(e)),
            };
            // The small chunks after it come in the background, likely read next.
            if p.chunk.uncompressed_len <= SMALL_CHUNK {
                self.start_batch(&self.small_chunks_after(p.index));
            }
        }
        self.assemble(ino, offset, size, &placed, &fresh)
    }

    /// The chunks of regular file `ino` covering `[offset, offset + size)`.
    fn placed(&self, ino: u64, offset: u64, size: u64) -> Result<Vec<Placed>, LoadError> {
        let chunks = self
            .bootstrap
            .chunks_in_range(ino, offset, size)
            .ok_or_else(|| LoadError::NotFound(format!("inode {ino} is not a regular file")))?;
        Ok(chunks.map(|c| Placed { file_offset: c.file_offset, index: c.index, chunk: *c.chunk }).collect())
    }

    /// Reads `[offset, offset + size)` of regular file `ino` if every chunk it needs is in the
    /// cache; `None` when one is missing. Does no network I/O, so it may run on the FUSE thread.
    pub fn read_cached(&self, ino: u64, offset: u64, size: u32) -> Option<Result<Vec<u8>, LoadError>> {
        let placed = match self.placed(ino, offset, u64::from(size)) {
            Ok(placed) => placed,
            Err(e) => return Some(Err(e)),
        };
        self.assemble(ino, offset, size, &placed, &HashMap::new())
    }

    /// The bytes `[offset, offset + size)` of file `ino`, made of `placed`: from `fresh` (data
    /// of chunks just fetched, by chunk index) or the cache; `None` when a chunk is in neither.
    fn assemble(
        &self,
        ino: u64,
        offset: u64,
        size: u32,
        placed: &[Placed],
        fresh: &HashMap<u32, Vec<u8>>,
    ) -> Option<Result<Vec<u8>, LoadError>> {
        let file_size = self.bootstrap.getattr(ino).map_or(0, |attr| attr.size);
        let end = offset.saturating_add(u64::from(size)).min(file_size);
        let mut out = vec![0u8; end.saturating_sub(offset) as usize];
        for p in placed {
            let chunk_end = p.file_offset + u64::from(p.chunk.uncompressed_len);
            let from = offset.max(p.file_offset);
            let to = end.min(chunk_end);
            if from >= to {
                continue;
            }
            let dest = &mut out[(from - offset) as usize..(to - offset) as usize];
            // Within the chunk, so below its length (a u32).
            let within = (from - p.file_offset) as usize;
            if let Some(data) = fresh.get(&p.index) {
                dest.copy_from_slice(&data[within..within + dest.len()]);
                continue;
            }
            if let Err(e) = self.cache.read_chunk(&p.chunk.digest, p.chunk.uncompressed_len, within as u32, dest)? {
                return Some(Err(LoadError::Cache {
                    digest: hex::encode(p.chunk.digest),
                    reason: format!("reading the cached chunk: {e}"),
                }));
            }
        }
        Some(Ok(out))
    }

    /// Reads `[offset, offset + size)` of regular file `ino`, fetching the chunks it needs.
    pub async fn read(self: &Arc<Self>, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, LoadError> {
        let placed = self.placed(ino, offset, u64::from(size))?;
        for _ in 0..READ_ATTEMPTS {
            let missing = placed.iter().filter(|p| !self.cache.contains(&p.chunk.digest)).map(|p| self.load(p.index));
            futures_util::future::try_join_all(missing).await?;
            if let Some(read) = self.read_cached(ino, offset, size) {
                return read;
            }
        }
        Err(LoadError::Cache {
            digest: String::new(),
            reason: format!("chunks of inode {ino} were evicted before they could be read {READ_ATTEMPTS} times; raise --cache-size"),
        })
    }

    /// Notes a read of `[offset, offset + size)` of file `ino`; when it continues the previous
    /// read, starts fetching the next chunks of the file in the background.
    pub fn note_read(self: &Arc<Self>, ino: u64, offset: u64, size: u32) {
        if self.readahead == 0 {
            return;
        }
        let end = offset.saturating_add(u64::from(size));
        let previous = self.read_ends.lock().unwrap_or_else(|p| p.into_inner()).put(ino, end);
        if previous != Some(offset) {
            return;
        }
        // The chunk the read ends in (usually local by now), then `readahead` more.
        let Some(ahead) = self.bootstrap.chunks_in_range(ino, end, u64::MAX) else { return };
        for c in ahead.take(self.readahead + 1) {
            if self.cache.contains(&c.chunk.digest) || self.is_inflight(c.index) {
                continue;
            }
            let (this, index) = (self.clone(), c.index);
            self.runtime.spawn(async move {
                let _ = this.load(index).await;
            });
        }
    }

    /// Chunk `index` is no longer in flight; tells its waiters `outcome`.
    fn finish(&self, index: u32, tx: Done, outcome: Result<(), LoadError>) {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&index);
        let _ = tx.send(outcome);
    }

    fn is_inflight(&self, index: u32) -> bool {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&index)
    }

    /// Fetches every chunk of the regular files `inos`, in order, `concurrency` at a time;
    /// failures are logged, not fatal (a later read retries the chunk).
    pub async fn prefetch(self: Arc<Self>, inos: Vec<u64>, concurrency: usize) {
        let started = Instant::now();
        let mut seen = HashSet::new();
        let indices: Vec<u32> = inos
            .iter()
            .filter_map(|&ino| self.bootstrap.chunks_of(ino))
            .flatten()
            .map(|c| c.index)
            .filter(|&index| seen.insert(index))
            .collect();
        if indices.is_empty() {
            return;
        }
        let failed = AtomicU64::new(0);
        futures_util::stream::iter(indices.iter().copied())
            .for_each_concurrent(concurrency.max(1), |index| {
                let (this, failed) = (&self, &failed);
                async move {
                    if this.load(index).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .await;
        info!(
            files = inos.len(),
            chunks = indices.len(),
            failed = failed.load(Ordering::Relaxed),
            elapsed = ?started.elapsed(),
            "prefetch done"
        );
    }
}

/// Chunks back to back in one blob, fetched with one request; each is registered as in
/// flight, and is no longer once its outcome is sent (or the batch is dropped unfinished).
struct Batch {
    /// The loader fetching them.
    loader: Arc<ChunkLoader>,
    /// The chunks not finished yet, in blob order, with their index and whom to tell.
    chunks: Vec<(Chunk, u32, Done)>,
}

impl Batch {
    /// Fetches the batch's compressed bytes in one request, then verifies and stores each
    /// chunk, telling its waiters as soon as it is stored.
    async fn fetch_and_store(mut self) {
        let (first, last) = match (self.chunks.first(), self.chunks.last()) {
            (Some(first), Some(last)) => (first.0, last.0),
            _ => return,
        };
        let loader = self.loader.clone();
        let started = Instant::now();
        let span = last.compressed_offset + u64::from(last.compressed_len) - first.compressed_offset;
        let fetched = match (loader.blob_of(&first), u32::try_from(span)) {
            (Ok(blob), Ok(len)) => {
                let fetched = loader.source.fetch(blob, first.compressed_offset, len).await;
                loader.fetched(&first, fetched)
            }
            (Err(e), _) => Err(e),
            (_, Err(_)) => Err(LoadError::NotFound(format!("a batch of chunks of {span} bytes is too long to fetch at once"))),
        };
        let compressed = match fetched {
            Ok(bytes) => bytes,
            Err(e) => {
                for (_, index, tx) in self.chunks.drain(..) {
                    loader.finish(index, tx, Err(e.clone()));
                }
                return;
            }
        };
        let stored = tokio::task::spawn_blocking(move || {
            // Chunks that did not verify are fetched once more, bypassing the source's cache.
            let mut again = Vec::new();
            for (chunk, index, tx) in self.chunks.drain(..) {
                let from = (chunk.compressed_offset - first.compressed_offset) as usize;
                let outcome = match compressed.get(from..from + chunk.compressed_len as usize) {
                    Some(bytes) => store(&self.loader.cache, &chunk, bytes).map(drop),
                    None => Err(LoadError::Cache {
                        digest: hex::encode(chunk.digest),
                        reason: format!("the source sent {} bytes for a range of {span}", compressed.len()),
                    }),
                };
                match outcome {
                    Err(LoadError::Verify(e)) => {
                        debug!(chunk = %hex::encode(chunk.digest), error = %e, "chunk failed verification; fetching it again, fresh");
                        again.push((chunk, index, tx));
                    }
                    outcome => {
                        let outcome = self.loader.stored(&chunk, started, outcome);
                        self.loader.finish(index, tx, outcome);
                    }
                }
            }
            self.chunks = again;
            self
        })
        .await;
        match stored {
            Ok(batch) => batch.fetch_fresh(started).await,
            Err(e) => warn!(error = %e, "the task storing a batch of chunks failed; later reads fetch them again"),
        }
    }

    /// Fetches each chunk left in the batch (they failed verification) on its own, bypassing the
    /// source's cache, then verifies and stores it; a second failure is final for this read.
    async fn fetch_fresh(mut self, started: Instant) {
        let loader = self.loader.clone();
        while !self.chunks.is_empty() {
            // Taken one at a time: if this task ends early, the rest are released on drop.
            let (chunk, index, tx) = self.chunks.remove(0);
            let fetched = match loader.blob_of(&chunk) {
                Ok(blob) => {
                    let fetched = loader.source.fetch_fresh(blob, chunk.compressed_offset, chunk.compressed_len).await;
                    loader.fetched(&chunk, fetched)
                }
                Err(e) => Err(e),
            };
            let outcome = match fetched {
                Ok(bytes) => {
                    let cache = loader.cache.clone();
                    tokio::task::spawn_blocking(move || store(&cache, &chunk, &bytes).map(drop))
                        .await
                        .unwrap_or_else(|e| Err(LoadError::Cache { digest: hex::encode(chunk.digest), reason: e.to_string() }))
                }
                Err(e) => Err(e),
            };
            let outcome = loader.stored(&chunk, started, outcome);
            loader.finish(index, tx, outcome);
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Unfinished chunks (the task failed): their waiters see the channel close; later
        // reads fetch them anew.
        let mut inflight = self.loader.inflight.lock().unwrap_or_else(|p| p.into_inner());
        for (_, index, _) in &self.chunks {
            inflight.remove(index);
        }
    }
}

/// For each chunk of `chunks` (by index), the chunk starting in the same blob right where it
/// ends.
fn next_in_blob(chunks: &[Chunk]) -> Vec<Option<u32>> {
    let mut order: Vec<u32> = (0..chunks.len() as u32).collect();
    order.sort_unstable_by_key(|&i| (chunks[i as usize].blob, chunks[i as usize].compressed_offset));
    let mut next = vec![None; chunks.len()];
    for pair in order.windows(2) {
        let (a, b) = (&chunks[pair[0] as usize], &chunks[pair[1] as usize]);
        if a.blob == b.blob && a.compressed_offset + u64::from(a.compressed_len) == b.compressed_offset {
            next[pair[0] as usize] = Some(pair[1]);
        }
    }
    next
}

#[cfg(test)]
mod tests;
