use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::cache::{ChunkCache, MIN_CACHE_SIZE};
use crate::format::{Blob, MAX_CHUNK_SIZE};
use crate::test_data::{pattern, tar_of};
use crate::tree::TreeBuilder;

const MIB: usize = MAX_CHUNK_SIZE as usize;

/// Chunk blobs in memory; counts fetches per range and can delay them so requests overlap.
struct MemorySource {
    blobs: HashMap<[u8; 32], Vec<u8>>,
    fetches: Mutex<HashMap<(u64, u32), usize>>,
    delay: Duration,
}

impl ChunkSource for MemorySource {
    fn fetch(&self, blob: Blob, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, SourceError>> {
        Box::pin(async move {
            *self.fetches.lock().unwrap().entry((offset, len)).or_default() += 1;
            tokio::time::sleep(self.delay).await;
            let bytes = &self.blobs[&blob.sha256];
            Ok(Bytes::copy_from_slice(&bytes[offset as usize..offset as usize + len as usize]))
        })
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

struct Fixture {
    loader: Arc<ChunkLoader>,
    source: Arc<MemorySource>,
    big: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn ino(&self, path: &str) -> u64 {
        self.loader.bootstrap().resolve(path.as_bytes()).unwrap()
    }

    fn chunk(&self, path: &str, n: usize) -> Chunk {
        *self.loader.bootstrap().chunks_of(self.ino(path)).unwrap().nth(n).unwrap().chunk
    }

    fn fetches(&self, chunk: &Chunk) -> usize {
        self.source.fetches.lock().unwrap().get(&(chunk.compressed_offset, chunk.compressed_len)).copied().unwrap_or(0)
    }
}

/// A loader of the image of `files` (one layer, `prefetch` listed), its blob in memory
/// answering after `delay`, the chunks `damaged(bootstrap)` names flipped in the blob.
fn loaded(
    files: &[(&str, &[u8])],
    prefetch: &[&str],
    readahead: usize,
    delay: Duration,
    damaged: impl Fn(&Bootstrap) -> Vec<Chunk>,
) -> (Arc<ChunkLoader>, Arc<MemorySource>, tempfile::TempDir) {
    let tar = tar_of(files);
    let mut builder = TreeBuilder::default();
    let mut blob = Vec::new();
    builder.add_layer(&mut tar::Archive::new(tar.as_slice()), &mut blob).unwrap();
    let bootstrap = Arc::new(builder.finish(prefetch).unwrap().bootstrap);
    for chunk in damaged(&bootstrap) {
        blob[(chunk.compressed_offset + u64::from(chunk.compressed_len) / 2) as usize] ^= 0x55;
    }
    let source =
        Arc::new(MemorySource { blobs: HashMap::from([(bootstrap.blobs()[0].sha256, blob)]), fetches: Mutex::new(HashMap::new()), delay });
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ChunkCache::open(dir.path(), MIN_CACHE_SIZE).unwrap());
    let loader = Arc::new(ChunkLoader::new(bootstrap, cache, source.clone(), Handle::current(), readahead));
    (loader, source, dir)
}

/// An image with `big` (2.5 chunks) and `small`, its blob in memory, `corrupt` chunks of `big`
/// damaged in the blob.
fn fixture(readahead: usize, corrupt: &[usize]) -> Fixture {
    let big = pattern(MIB * 5 / 2, 7);
    let files = [("big", big.as_slice()), ("small", b"small file".as_slice())];
    let damaged = |b: &Bootstrap| {
        let ino = b.resolve(b"big").unwrap();
        corrupt.iter().map(|&n| *b.chunks_of(ino).unwrap().nth(n).unwrap().chunk).collect()
    };
    let (loader, source, dir) = loaded(&files, &["small"], readahead, Duration::from_millis(50), damaged);
    Fixture { loader, source, big, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_of_a_missing_chunk_fetch_it_once() {
    let f = fixture(0, &[]);
    let ino = f.ino("big");
    let reads = (0..16).map(|i| {
        let loader = f.loader.clone();
        tokio::spawn(async move { loader.read(ino, i * 4096, 4096).await })
    });
    for (i, read) in futures_util::future::join_all(reads).await.into_iter().enumerate() {
        assert_eq!(read.unwrap().unwrap(), f.big[i * 4096..(i + 1) * 4096]);
    }
    assert_eq!(f.fetches(&f.chunk("big", 0)), 1);
    assert_eq!(f.fetches(&f.chunk("big", 1)), 0, "no other chunk is fetched without readahead");
    assert_eq!(f.loader.stats().fetched_chunks.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_spanning_chunks_and_the_end_of_file_return_the_file_bytes() {
    let f = fixture(0, &[]);
    let ino = f.ino("big");
    assert!(f.loader.read_cached(ino, 0, 10).is_none(), "nothing is local before a read");
    let across = f.loader.read(ino, MIB as u64 - 10, 20).await.unwrap();
    assert_eq!(across, f.big[MIB - 10..MIB + 10]);
    let tail = f.loader.read(ino, f.big.len() as u64 - 5, 4096).await.unwrap();
    assert_eq!(tail, f.big[f.big.len() - 5..], "a read past the end is cut at the end");
    assert!(f.loader.read(ino, f.big.len() as u64 + 1, 10).await.unwrap().is_empty());
    // Now local: answered without the network.
    assert_eq!(f.loader.read_cached(ino, MIB as u64 - 10, 20).unwrap().unwrap(), across);
    let small = f.ino("small");
    assert_eq!(f.loader.read(small, 0, 4096).await.unwrap(), b"small file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_is_an_error_never_data_and_is_not_cached() {
    let f = fixture(0, &[1]);
    let ino = f.ino("big");
    let err = f.loader.read(ino, MIB as u64 + 100, 100).await.unwrap_err();
    assert!(matches!(err, LoadError::Verify(_)), "{err}");
    assert!(!f.loader.cache().contains(&f.chunk("big", 1).digest));
    assert!(f.loader.read(ino, 0, MIB as u32 * 2).await.is_err(), "a read needing the bad chunk fails whole");
    assert_eq!(f.loader.read(ino, 0, 4096).await.unwrap(), f.big[..4096], "other chunks read fine");
    assert_eq!(f.loader.read(ino, 2 * MIB as u64, 4096).await.unwrap(), f.big[2 * MIB..2 * MIB + 4096]);
    assert!(f.loader.stats().failed_chunks.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_fetch_the_following_chunks_ahead() {
    let f = fixture(2, &[]);
    let ino = f.ino("big");
    f.loader.note_read(ino, 0, 131072);
    f.loader.read(ino, 0, 131072).await.unwrap();
    assert!(!f.loader.cache().contains(&f.chunk("big", 1).digest), "one read is not a sequence yet");
    f.loader.note_read(ino, 131072, 131072);
    f.loader.read(ino, 131072, 131072).await.unwrap();
    for n in [1, 2] {
        let digest = f.chunk("big", n).digest;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f.loader.cache().contains(&digest) {
            assert!(Instant::now() < deadline, "chunk {n} was not read ahead");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_loads_the_listed_files_only() {
    let f = fixture(0, &[]);
    let prefetch: Vec<u64> = f.loader.bootstrap().prefetch().collect();
    assert_eq!(prefetch, vec![f.ino("small")]);
    f.loader.clone().prefetch(prefetch, 4).await;
    let small = f.ino("small");
    assert_eq!(f.loader.read_cached(small, 0, 100).unwrap().unwrap(), b"small file");
    assert!(!f.loader.cache().contains(&f.chunk("big", 0).digest));
}

/// An image of `count` small files `f000`, `f001`, ... stored back to back in one blob, the
/// file numbered `corrupt` damaged in it.
fn small_files(count: usize, corrupt: Option<usize>) -> Fixture {
    let files: Vec<(String, Vec<u8>)> = (0..count).map(|i| (format!("f{i:03}"), pattern(3000 + i * 100, i as u64))).collect();
    let entries: Vec<(&str, &[u8])> = files.iter().map(|(name, data)| (name.as_str(), data.as_slice())).collect();
    let damaged = |b: &Bootstrap| {
        corrupt
            .map(|n| *b.chunks_of(b.resolve(format!("f{n:03}").as_bytes()).unwrap()).unwrap().next().unwrap().chunk)
            .into_iter()
            .collect()
    };
    let (loader, source, dir) = loaded(&entries, &[], 0, Duration::from_millis(20), damaged);
    Fixture { loader, source, big: Vec::new(), _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_file_comes_with_the_small_files_after_it_in_one_request() {
    let f = small_files(40, None);
    let third = f.ino("f002");
    assert_eq!(f.loader.read(third, 0, 4096).await.unwrap(), pattern(3200, 2)[..3200]);
    let requests: usize = f.source.fetches.lock().unwrap().values().sum();
    assert_eq!(requests, 1, "one request for the file and its neighbours");
    // The read returns once its own chunk is stored; the others follow in the same task.
    for i in 2..40 {
        let ino = f.ino(&format!("f{i:03}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        let data = loop {
            if let Some(data) = f.loader.read_cached(ino, 0, 8192) {
                break data.unwrap();
            }
            assert!(Instant::now() < deadline, "f{i:03} did not become local");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(data, pattern(3000 + i * 100, i as u64));
    }
    for i in 0..2 {
        assert!(f.loader.read_cached(f.ino(&format!("f{i:03}")), 0, 10).is_none(), "files before the one read are not fetched");
    }
    assert_eq!(f.loader.stats().fetched_chunks.load(Ordering::Relaxed), 38);
    // A later read of an earlier file makes a batch of its own that stops at what is local.
    f.loader.read(f.ino("f000"), 0, 4096).await.unwrap();
    assert!(f.source.fetches.lock().unwrap().keys().any(|&(offset, len)| offset == f.chunk("f000", 0).compressed_offset
        && u64::from(len) == f.chunk("f001", 0).compressed_offset + u64::from(f.chunk("f001", 0).compressed_len) - offset));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_in_a_batch_fails_only_the_reads_needing_it() {
    let f = small_files(10, Some(4));
    assert_eq!(f.loader.read(f.ino("f000"), 0, 4096).await.unwrap(), pattern(3000, 0));
    let err = f.loader.read(f.ino("f004"), 0, 4096).await.unwrap_err();
    assert!(matches!(err, LoadError::Verify(_)), "{err}");
    for i in [1, 2, 3, 5, 9] {
        let ino = f.ino(&format!("f{i:03}"));
        assert_eq!(f.loader.read(ino, 0, 8192).await.unwrap(), pattern(3000 + i * 100, i as u64));
    }
    assert!(!f.loader.cache().contains(&f.chunk("f004", 0).digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_of_neighbouring_small_files_share_one_request() {
    let f = small_files(20, None);
    let reads = (0..20).map(|i| {
        let (loader, ino) = (f.loader.clone(), f.ino(&format!("f{i:03}")));
        tokio::spawn(async move { loader.read(ino, 0, 8192).await })
    });
    for (i, read) in futures_util::future::join_all(reads).await.into_iter().enumerate() {
        assert_eq!(read.unwrap().unwrap(), pattern(3000 + i * 100, i as u64));
    }
    let fetched: u64 = f.source.fetches.lock().unwrap().keys().map(|&(_, len)| u64::from(len)).sum();
    let blob_len =
        f.chunk("f019", 0).compressed_offset + u64::from(f.chunk("f019", 0).compressed_len) - f.chunk("f000", 0).compressed_offset;
    assert_eq!(fetched, blob_len, "every byte fetched once");
}
