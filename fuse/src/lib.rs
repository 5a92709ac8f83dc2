//! Shoal's chunk-indexed lazy-loading image format.
//!
//! An image converts to one **bootstrap** (every layer's file metadata merged into one tree,
//! with per-file chunk lists) plus one **chunk blob** per source layer (independent zstd
//! frames, each at most 1 MiB of file data, named by the blake3 digest of that data). It is
//! pushed as an ordinary OCI image whose layers are the chunk blobs followed by the bootstrap,
//! marked with the media types and annotations below, so any registry stores it and the
//! mirror distributes it like any other image.
//!
//! - [`format`](mod@format): the bootstrap, its byte layout (`fuse/FORMAT.md`) and the lookups the
//!   filesystem answers from it.
//! - [`chunk`]: compressing, appending and verifying chunks.
//! - [`tree`]: building the bootstrap and chunk blobs from an image's tar layers.
//!
//! Those three are sans-IO: they read from `impl Read` and write to `impl Write` and never
//! touch the network, files or a clock themselves. The filesystem is the I/O shell around them:
//!
//! - [`source`]: where chunk bytes come from (a local directory, the agent's mirror, a registry).
//! - [`cache`]: verified chunks and materialised files on local disk, evicted least recently
//!   used first.
//! - [`loader`]: fetching each missing chunk once, verifying it, readahead and prefetch.
//! - [`materialise`]: whole files written out of their cached chunks, for kernel passthrough.
//! - [`trace`]: recording the order files are first read, for the next build's prefetch list.
//! - [`fs`]: the read-only FUSE filesystem answering the kernel.
//! - [`overlay`]: merging an image's mount of small files and its mount of large files into
//!   one tree.

#![deny(unsafe_code)]

pub mod cache;
pub mod chunk;
pub mod erofs;
pub mod format;
pub mod fs;
pub mod image_file;
pub mod layer;
pub mod loader;
pub mod materialise;
pub mod overlay;
pub mod source;
#[cfg(test)]
mod test_data;
pub mod trace;
pub mod tree;

pub use chunk::{chunk_digest, compress_chunk, decompress_chunk, ChunkBlobWriter, ChunkCompressor, ChunkError};
pub use format::{Attr, Blob, Bootstrap, Chunk, DirEntry, FileChunk, FileKind, FormatError, Timestamp};
pub use tree::{BuildError, BuildOptions, BuiltImage, ChunkDict, LayerOutcome, TreeBuilder};

/// Media type of a chunk blob layer. containerd takes media types under
/// `application/vnd.oci.image.layer.` for layers, and leaves fetching a layer to its snapshotter's
/// answer: so a Shoal image's blobs are not downloaded by a pull that the snapshotter serves.
pub const CHUNK_BLOB_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.shoal.chunks.v1";

/// Media type of the bootstrap layer (zstd-compressed).
pub const BOOTSTRAP_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.shoal.bootstrap.v1+zstd";

/// Layer annotation that containerd passes to its snapshotter as a snapshot label (it passes
/// every annotation under `containerd.io/snapshot/`): [`SNAPSHOT_LAYER_CHUNKS`] on chunk blobs,
/// [`SNAPSHOT_LAYER_BOOTSTRAP`] on the bootstrap.
pub const SNAPSHOT_LAYER_ANNOTATION: &str = "containerd.io/snapshot/shoal.layer";

/// [`SNAPSHOT_LAYER_ANNOTATION`] on a chunk blob.
pub const SNAPSHOT_LAYER_CHUNKS: &str = "chunks";

/// [`SNAPSHOT_LAYER_ANNOTATION`] on the bootstrap.
pub const SNAPSHOT_LAYER_BOOTSTRAP: &str = "bootstrap";

/// Annotation key marking the bootstrap layer, with value [`BOOTSTRAP_ANNOTATION_VALUE`].
pub const BOOTSTRAP_ANNOTATION: &str = "dev.shoal.bootstrap";

/// Value of [`BOOTSTRAP_ANNOTATION`] on the bootstrap layer.
pub const BOOTSTRAP_ANNOTATION_VALUE: &str = "true";

/// Annotation key giving the bootstrap format version, on the bootstrap layer and the manifest.
pub const FORMAT_ANNOTATION: &str = "dev.shoal.format";

/// Value of [`FORMAT_ANNOTATION`] for images in this format ([`format::VERSION`]).
pub const FORMAT_ANNOTATION_VALUE: &str = "1";

#[cfg(test)]
mod tests {
    #[test]
    fn format_annotation_matches_the_format_version() {
        assert_eq!(super::FORMAT_ANNOTATION_VALUE, super::format::VERSION.to_string());
    }
}
