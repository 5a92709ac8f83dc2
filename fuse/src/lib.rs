//! The chunk-indexed image format, its builder and the FUSE filesystem. They arrive with the lazy-loading work.
