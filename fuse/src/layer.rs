//! Reading an OCI image layer into the builder: undoing its compression (gzip, zstd or none,
//! by media type) as a stream while checking the layer's sha256 digest, so a layer is never
//! held in memory and a corrupt one never becomes part of an image.

use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::tree::{BuildError, LayerOutcome, TreeBuilder};

/// How a layer's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

impl Compression {
    /// The compression a layer media type names, or `None` if it is not a tar layer.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        let media_type = media_type.trim();
        if media_type.ends_with("tar+gzip") || media_type.ends_with("tar.gzip") {
            Some(Compression::Gzip)
        } else if media_type.ends_with("tar+zstd") {
            Some(Compression::Zstd)
        } else if media_type.ends_with(".tar") || media_type.ends_with(".diff.tar") {
            Some(Compression::None)
        } else {
            None
        }
    }
}

/// Why a layer could not be applied.
#[derive(Debug, Error)]
pub enum LayerError {
    /// The media type is not a tar layer this builder reads.
    #[error("layer {digest}: media type {media_type:?} is not a tar layer (plain, gzip or zstd); is the image already converted?")]
    MediaType {
        /// The layer's digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// The layer's bytes could not be read or decompressed.
    #[error("layer {digest}: {source}")]
    Read {
        /// The layer's digest.
        digest: String,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The layer's content does not match its digest.
    #[error("layer {expected}: content hashes to {actual} ({size} bytes); the layer is corrupt, refusing to convert it")]
    Digest {
        /// The digest the manifest gives.
        expected: String,
        /// The digest of the bytes read.
        actual: String,
        /// How many bytes were read.
        size: u64,
    },
    /// The builder refused the layer's content.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Passes bytes through while hashing and counting them, and reporting progress.
pub struct DigestingReader<R, P> {
    /// Where the bytes come from.
    inner: R,
    /// sha256 of the bytes read.
    hasher: Sha256,
    /// How many bytes were read.
    read: u64,
    /// Told how many bytes each read returned.
    progress: P,
}

impl<R: Read, P: FnMut(u64)> DigestingReader<R, P> {
    /// Wraps `inner`, calling `progress` with the byte count of every read.
    pub fn new(inner: R, progress: P) -> Self {
        DigestingReader { inner, hasher: Sha256::new(), read: 0, progress }
    }

    /// The `sha256:<hex>` digest and length of everything read.
    pub fn finish(self) -> (String, u64) {
        (format!("sha256:{}", hex::encode(self.hasher.finalize())), self.read)
    }
}

impl<R: Read, P: FnMut(u64)> Read for DigestingReader<R, P> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// Completes a tar stream that ends right after its last entry's data, without the padding to
/// a 512-byte block and the two zero blocks that should follow (some tools, umoci among them,
/// write such layers): at the end of the data it supplies those zeros, so the last entry reads
/// in full. A complete stream is unaffected: its reader stops at the end-of-archive blocks.
struct TarEndPadding<R> {
    /// The tar stream.
    inner: R,
    /// Bytes read from it.
    read: u64,
    /// Zeros still to supply once it has ended; `None` until then.
    padding: Option<u64>,
}

impl<R: Read> TarEndPadding<R> {
    fn new(inner: R) -> Self {
        TarEndPadding { inner, read: 0, padding: None }
    }
}

impl<R: Read> Read for TarEndPadding<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.padding.is_none() {
            let n = self.inner.read(buf)?;
            if n > 0 || buf.is_empty() {
                self.read += n as u64;
                return Ok(n);
            }
            self.padding = Some((512 - self.read % 512) % 512 + 1024);
        }
        let left = self.padding.unwrap_or(0);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        buf[..n].fill(0);
        self.padding = Some(left - n as u64);
        Ok(n)
    }
}

/// Applies the layer read from `blob` (its compressed bytes, of media type `media_type` and
/// digest `digest`) to `builder`, writing the layer's new chunks to `chunk_sink`. The whole blob
/// is read and its digest checked; on a mismatch the builder must be discarded.
pub fn apply_layer<R: Read, W: Write>(
    builder: &mut TreeBuilder,
    blob: R,
    media_type: &str,
    digest: &str,
    chunk_sink: W,
    progress: impl FnMut(u64),
) -> Result<LayerOutcome, LayerError> {
    let compression = Compression::from_media_type(media_type)
        .ok_or_else(|| LayerError::MediaType { digest: digest.to_string(), media_type: media_type.to_string() })?;
    let read_error = |source| LayerError::Read { digest: digest.to_string(), source };
    let mut counted = DigestingReader::new(blob, progress);
    let outcome = {
        let decoder: Box<dyn Read + '_> = match compression {
            Compression::None => Box::new(&mut counted),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut counted)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(&mut counted).map_err(read_error)?),
        };
        let mut archive = tar::Archive::new(TarEndPadding::new(decoder));
        let outcome = builder.add_layer(&mut archive, chunk_sink)?;
        // Whatever follows the tar end marker still belongs to the blob and its digest.
        io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(read_error)?;
        outcome
    };
    io::copy(&mut counted, &mut io::sink()).map_err(read_error)?;
    let (actual, size) = counted.finish();
    if actual != digest {
        return Err(LayerError::Digest { expected: digest.to_string(), actual, size });
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Bootstrap;

    fn tar_with(path: &str, data: &[u8]) -> Vec<u8> {
        crate::test_data::tar_of(&[(path, data)])
    }

    fn sha(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    fn read_back(bootstrap: &Bootstrap, blob: &[u8], path: &str) -> Vec<u8> {
        let ino = bootstrap.resolve(path.as_bytes()).unwrap();
        let mut out = Vec::new();
        for c in bootstrap.chunks_of(ino).unwrap() {
            let start = c.chunk.compressed_offset as usize;
            let frame = &blob[start..start + c.chunk.compressed_len as usize];
            out.extend(crate::chunk::decompress_chunk(frame, c.chunk.uncompressed_len, &c.chunk.digest).unwrap());
        }
        out
    }

    #[test]
    fn media_types_name_their_compression() {
        assert_eq!(Compression::from_media_type("application/vnd.oci.image.layer.v1.tar"), Some(Compression::None));
        assert_eq!(Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip"), Some(Compression::Gzip));
        assert_eq!(Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"), Some(Compression::Gzip));
        assert_eq!(Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"), Some(Compression::Zstd));
        assert_eq!(Compression::from_media_type("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"), Some(Compression::Gzip));
        assert_eq!(Compression::from_media_type(crate::CHUNK_BLOB_MEDIA_TYPE), None);
    }

    #[test]
    fn every_compression_is_read_and_its_digest_checked() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let tar = tar_with("a/file", &data);
        let gzip = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        };
        let zstd = zstd::bulk::compress(&tar, 3).unwrap();
        for (bytes, media_type) in [
            (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
            (gzip, "application/vnd.oci.image.layer.v1.tar+gzip"),
            (zstd, "application/vnd.oci.image.layer.v1.tar+zstd"),
        ] {
            let mut builder = TreeBuilder::default();
            let mut blob = Vec::new();
            let mut progress = 0;
            apply_layer(&mut builder, bytes.as_slice(), media_type, &sha(&bytes), &mut blob, |n| progress += n).unwrap();
            assert_eq!(progress, bytes.len() as u64, "{media_type}: every byte is read");
            let built = builder.finish::<&str>(&[]).unwrap();
            assert_eq!(read_back(&built.bootstrap, &blob, "a/file"), data, "{media_type}");

            let mut builder = TreeBuilder::default();
            let err = apply_layer(&mut builder, bytes.as_slice(), media_type, &sha(b"other"), Vec::new(), |_| {}).unwrap_err();
            assert!(matches!(err, LayerError::Digest { .. }), "{media_type}: {err}");
        }
    }

    #[test]
    fn a_tar_stream_cut_after_its_last_entry_is_read_whole() {
        let data = b"last file, no padding after it".to_vec();
        let tar = tar_with("f", &data);
        // Header and data only: no padding, no end-of-archive blocks.
        let cut = &tar[..512 + data.len()];
        let mut builder = TreeBuilder::default();
        let mut blob = Vec::new();
        apply_layer(&mut builder, cut, "application/vnd.oci.image.layer.v1.tar", &sha(cut), &mut blob, |_| {}).unwrap();
        let built = builder.finish::<&str>(&[]).unwrap();
        assert_eq!(read_back(&built.bootstrap, &blob, "f"), data);
    }

    #[test]
    fn a_converted_image_is_not_a_layer() {
        let err =
            apply_layer(&mut TreeBuilder::default(), &b""[..], crate::CHUNK_BLOB_MEDIA_TYPE, "sha256:00", Vec::new(), |_| {}).unwrap_err();
        assert!(matches!(err, LayerError::MediaType { .. }), "{err}");
    }
}
