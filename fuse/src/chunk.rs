//! Chunks and chunk blobs: compressing, appending and verifying the units of file data.
//!
//! A chunk blob is the concatenation of independent zstd frames, one per chunk, with nothing
//! between them. Any chunk can be fetched by its byte range alone and decompressed on its own.
//! A chunk's data is only ever handed out after its blake3 digest matched the bootstrap's.

use std::fmt;
use std::io::{self, Write};

use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::format::{Blob, MAX_CHUNK_SIZE};

/// The zstd level chunks are compressed with unless the builder is told otherwise.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;

/// Why a chunk's data could not be recovered.
#[derive(Debug, Error)]
pub enum ChunkError {
    /// The bootstrap claims a chunk larger than any chunk may be.
    #[error("chunk {digest}: expected length {len} exceeds the {MAX_CHUNK_SIZE}-byte chunk limit; the bootstrap is corrupt")]
    TooLong {
        /// The chunk's blake3 digest, hex.
        digest: String,
        /// The claimed uncompressed length.
        len: u32,
    },
    /// The bytes are not a zstd frame, or decompress to more than expected.
    #[error("chunk {digest}: not a valid zstd frame of at most {expected} bytes ({source}); the fetched range is corrupt or misplaced")]
    Decompress {
        /// The chunk's blake3 digest, hex.
        digest: String,
        /// The expected uncompressed length.
        expected: u32,
        /// What zstd reported.
        #[source]
        source: io::Error,
    },
    /// The data decompressed to a length other than expected.
    #[error("chunk {digest}: decompressed to {actual} bytes, the bootstrap says {expected}; the fetched range is corrupt or misplaced")]
    LengthMismatch {
        /// The chunk's blake3 digest, hex.
        digest: String,
        /// The expected uncompressed length.
        expected: u32,
        /// The length it decompressed to.
        actual: usize,
    },
    /// The data does not hash to the chunk's digest.
    #[error("chunk {expected}: data hashes to blake3 {actual}; the fetched range is corrupt or misplaced, fetch it again")]
    DigestMismatch {
        /// The digest the bootstrap gives, hex.
        expected: String,
        /// The digest of the data, hex.
        actual: String,
    },
}

/// The blake3 digest of a chunk's uncompressed data: the chunk's name.
pub fn chunk_digest(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// Compresses one chunk into a standalone zstd frame.
pub fn compress_chunk(data: &[u8], level: i32) -> io::Result<Vec<u8>> {
    ChunkCompressor::new(level)?.compress(data)
}

/// Decompresses one chunk and checks it is exactly `expected_len` bytes hashing to
/// `expected_digest`. Never allocates more than `expected_len` bytes, and never returns data
/// that failed the check.
pub fn decompress_chunk(compressed: &[u8], expected_len: u32, expected_digest: &[u8; 32]) -> Result<Vec<u8>, ChunkError> {
    let digest = || hex::encode(expected_digest);
    if expected_len > MAX_CHUNK_SIZE {
        return Err(ChunkError::TooLong { digest: digest(), len: expected_len });
    }
    thread_local! {
        /// One zstd context per thread, reused: making one costs more than decompressing a small chunk.
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
    }
    let decompressed = DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let decompressor = match slot.as_mut() {
            Some(decompressor) => decompressor,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        decompressor.decompress(compressed, expected_len as usize)
    });
    let data = decompressed.map_err(|source| ChunkError::Decompress { digest: digest(), expected: expected_len, source })?;
    if data.len() != expected_len as usize {
        return Err(ChunkError::LengthMismatch { digest: digest(), expected: expected_len, actual: data.len() });
    }
    let actual = chunk_digest(&data);
    if &actual != expected_digest {
        return Err(ChunkError::DigestMismatch { expected: digest(), actual: hex::encode(actual) });
    }
    Ok(data)
}

/// Compresses chunks one after another, reusing one zstd context.
pub struct ChunkCompressor {
    /// The reused zstd compression context.
    inner: zstd::bulk::Compressor<'static>,
}

impl ChunkCompressor {
    /// A compressor at zstd `level`.
    pub fn new(level: i32) -> io::Result<Self> {
        Ok(ChunkCompressor { inner: zstd::bulk::Compressor::new(level)? })
    }

    /// Compresses one chunk of at most [`MAX_CHUNK_SIZE`] bytes into a standalone zstd frame
    /// recording its uncompressed size.
    pub fn compress(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        if data.len() > MAX_CHUNK_SIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("chunk of {} bytes exceeds the {MAX_CHUNK_SIZE}-byte chunk limit", data.len()),
            ));
        }
        self.inner.compress(data)
    }
}

impl fmt::Debug for ChunkCompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkCompressor").finish_non_exhaustive()
    }
}

/// Streams compressed chunks into a chunk blob, computing the blob's sha256 and size as it goes.
pub struct ChunkBlobWriter<W> {
    /// Where the blob's bytes go.
    sink: W,
    /// The sha256 of everything written so far.
    sha256: Sha256,
    /// Bytes written so far: the offset of the next chunk.
    len: u64,
}

impl<W: Write> ChunkBlobWriter<W> {
    /// A writer starting an empty blob in `sink`.
    pub fn new(sink: W) -> Self {
        ChunkBlobWriter { sink, sha256: Sha256::new(), len: 0 }
    }

    /// Appends one compressed chunk and returns the offset it starts at.
    pub fn append(&mut self, compressed: &[u8]) -> io::Result<u64> {
        let offset = self.len;
        self.sink.write_all(compressed)?;
        self.sha256.update(compressed);
        self.len += compressed.len() as u64;
        Ok(offset)
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Flushes the sink and returns it with the finished blob's digest and size.
    pub fn finish(mut self) -> io::Result<(W, Blob)> {
        self.sink.flush()?;
        let blob = Blob { sha256: self.sha256.finalize().into(), size: self.len };
        Ok((self.sink, blob))
    }
}

impl<W> fmt::Debug for ChunkBlobWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkBlobWriter").field("len", &self.len).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn chunk_round_trips() {
        let data = sample(100_000);
        let compressed = compress_chunk(&data, DEFAULT_COMPRESSION_LEVEL).unwrap();
        let back = decompress_chunk(&compressed, data.len() as u32, &chunk_digest(&data)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn blake3_mismatch_is_an_error_not_data() {
        let data = sample(4096);
        let compressed = compress_chunk(&data, DEFAULT_COMPRESSION_LEVEL).unwrap();
        let mut wrong = chunk_digest(&data);
        wrong[0] ^= 1;
        let err = decompress_chunk(&compressed, data.len() as u32, &wrong).unwrap_err();
        assert!(matches!(err, ChunkError::DigestMismatch { .. }), "{err}");
    }

    #[test]
    fn output_longer_than_expected_is_refused() {
        let data = sample(8192);
        let compressed = compress_chunk(&data, DEFAULT_COMPRESSION_LEVEL).unwrap();
        let err = decompress_chunk(&compressed, 4096, &chunk_digest(&data)).unwrap_err();
        assert!(matches!(err, ChunkError::Decompress { .. }), "{err}");
    }

    #[test]
    fn output_shorter_than_expected_is_refused() {
        // A frame without a recorded size is only found short after decompressing.
        let data = sample(1000);
        let mut compressed = Vec::new();
        let mut encoder = zstd::stream::write::Encoder::new(&mut compressed, 3).unwrap();
        encoder.include_contentsize(false).unwrap();
        encoder.write_all(&data).unwrap();
        encoder.finish().unwrap();
        let err = decompress_chunk(&compressed, 2000, &chunk_digest(&data)).unwrap_err();
        assert!(matches!(err, ChunkError::LengthMismatch { actual: 1000, .. }), "{err}");
    }

    #[test]
    fn garbage_is_not_a_chunk() {
        let err = decompress_chunk(b"definitely not zstd", 19, &chunk_digest(b"x")).unwrap_err();
        assert!(matches!(err, ChunkError::Decompress { .. }), "{err}");
    }

    #[test]
    fn claimed_length_over_the_limit_is_refused_before_decompressing() {
        let err = decompress_chunk(&[], MAX_CHUNK_SIZE + 1, &[0; 32]).unwrap_err();
        assert!(matches!(err, ChunkError::TooLong { .. }), "{err}");
    }

    #[test]
    fn oversize_chunk_is_not_compressed() {
        let data = vec![0u8; MAX_CHUNK_SIZE as usize + 1];
        assert!(compress_chunk(&data, DEFAULT_COMPRESSION_LEVEL).is_err());
    }

    #[test]
    fn blob_writer_reports_offsets_digest_and_size() {
        let first = compress_chunk(&sample(5000), 3).unwrap();
        let second = compress_chunk(&sample(7000), 3).unwrap();
        let mut writer = ChunkBlobWriter::new(Vec::new());
        assert!(writer.is_empty());
        assert_eq!(writer.append(&first).unwrap(), 0);
        assert_eq!(writer.append(&second).unwrap(), first.len() as u64);
        let (bytes, blob) = writer.finish().unwrap();
        assert_eq!(bytes, [first.as_slice(), second.as_slice()].concat());
        assert_eq!(blob.size, bytes.len() as u64);
        assert_eq!(blob.sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
        let second_back = &bytes[first.len()..];
        assert_eq!(decompress_chunk(second_back, 7000, &chunk_digest(&sample(7000))).unwrap(), sample(7000));
    }
}
