//! Building an image's bootstrap from its OCI layers: merging trees, chunking files, dedup.
//!
//! Layers are applied in order, each read as a tar stream, following the OCI image spec's
//! changeset rules: a later entry replaces an earlier one at the same path, `.wh.<name>` hides
//! `<name>` from lower layers and `.wh..wh..opq` hides everything lower layers put in its
//! directory. Regular file data is cut into chunks of at most 1 MiB; a chunk already stored
//! (by an earlier layer, earlier in the same layer, or in a chunk dictionary from another
//! image) is referenced again, and a new one is compressed and streamed into the layer's chunk
//! blob. Only metadata stays in memory, never a layer's data (beyond the few chunks being
//! compressed: new chunks are compressed on one worker thread per core while the tar stream is
//! read, and appended to the blob in the order they were met).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::{mpsc, Arc, Mutex};

use thiserror::Error;

use crate::chunk::{chunk_digest, ChunkBlobWriter, ChunkCompressor, DEFAULT_COMPRESSION_LEVEL};
use crate::format::{
    Blob, Bootstrap, BootstrapParts, Chunk, FormatError, InodeContent, NewInode, Timestamp, MAX_CHUNK_SIZE, MAX_COMPRESSED_CHUNK_SIZE,
    MAX_NAME_LEN, MAX_SYMLINK_TARGET_LEN, MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_LEN,
};

/// A base name starting with this hides the rest of the name in lower layers.
const WHITEOUT_PREFIX: &[u8] = b".wh.";

/// Base names starting with this are whiteout metadata, never files.
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";

/// The base name marking its directory opaque: lower layers' entries in it are hidden.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// The PAX record prefix carrying an extended attribute.
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// Permission bits of a directory a layer implies without listing it.
const IMPLICIT_DIR_PERM: u32 = 0o755;

/// Settings of a build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The zstd level new chunks are compressed with.
    pub compression_level: i32,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions { compression_level: DEFAULT_COMPRESSION_LEVEL }
    }
}

/// Why a build failed. The builder is unusable after an error.
#[derive(Debug, Error)]
pub enum BuildError {
    /// The layer's tar stream could not be read.
    #[error("layer {layer}: reading the tar stream failed: {source}")]
    Read {
        /// The layer's position in the image, from 0.
        layer: usize,
        /// What the reader reported.
        #[source]
        source: io::Error,
    },
    /// The layer's chunk blob could not be written.
    #[error("layer {layer}: writing the chunk blob failed: {source}")]
    Write {
        /// The layer's position in the image, from 0.
        layer: usize,
        /// What the writer reported.
        #[source]
        source: io::Error,
    },
    /// A chunk could not be compressed.
    #[error("layer {layer}: compressing a chunk failed: {source}")]
    Compress {
        /// The layer's position in the image, from 0.
        layer: usize,
        /// What zstd reported.
        #[source]
        source: io::Error,
    },
    /// A tar entry cannot be represented in the image.
    #[error("layer {layer}: entry {path:?}: {reason}")]
    Entry {
        /// The layer's position in the image, from 0.
        layer: usize,
        /// The entry's path, as in the tar stream.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The image has more of something than the bootstrap format can number.
    #[error("the image has more {0} than a bootstrap can hold (2^32)")]
    TooLarge(&'static str),
    /// The assembled bootstrap broke a rule of the format.
    #[error("assembling the bootstrap failed: {0}")]
    Bootstrap(#[from] FormatError),
}

/// What adding one layer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerOutcome {
    /// The layer's chunk blob, or `None` when the layer added no new chunk (its sink received no
    /// bytes and the image needs no blob for it).
    pub blob: Option<Blob>,
    /// Chunks compressed into this layer's blob.
    pub new_chunks: u64,
    /// Chunks found already stored: in an earlier layer, earlier in this layer, or in the chunk
    /// dictionary.
    pub reused_chunks: u64,
    /// Entries skipped because the image cannot represent them.
    pub warnings: Vec<String>,
}

/// The result of a build.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The image's bootstrap. Its blob table lists exactly the chunk blobs the image needs:
    /// layer blobs still referenced, and chunk dictionary blobs it reuses.
    pub bootstrap: Bootstrap,
    /// Each added layer's chunk blob, in order (`None` for a layer that added no chunk).
    pub layers: Vec<Option<Blob>>,
    /// Prefetch paths that were skipped, and why.
    pub warnings: Vec<String>,
}

/// Where a known chunk lives in another image's chunk blob.
#[derive(Debug, Clone, Copy)]
struct DictChunk {
    /// The blob holding the chunk.
    blob: Blob,
    /// Where the chunk's zstd frame starts in the blob.
    compressed_offset: u64,
    /// The length of the chunk's zstd frame.
    compressed_len: u32,
    /// The length of the chunk's data.
    uncompressed_len: u32,
}

/// Chunks already stored in other images' blobs, by blake3 digest, so a build can reference
/// them instead of storing them again (`shoal build --chunk-dict`).
#[derive(Debug, Clone, Default)]
pub struct ChunkDict {
    /// Where each known chunk lives, by blake3 digest.
    chunks: HashMap<[u8; 32], DictChunk>,
}

impl ChunkDict {
    /// An empty dictionary.
    pub fn new() -> Self {
        ChunkDict::default()
    }

    /// A dictionary of every chunk of `bootstrap`.
    pub fn from_bootstrap(bootstrap: &Bootstrap) -> Self {
        let mut dict = ChunkDict::new();
        dict.add_bootstrap(bootstrap);
        dict
    }

    /// Adds every chunk of `bootstrap`; a chunk already in the dictionary keeps its location.
    pub fn add_bootstrap(&mut self, bootstrap: &Bootstrap) {
        for chunk in bootstrap.chunks() {
            let Some(blob) = bootstrap.blobs().get(chunk.blob as usize) else {
                continue;
            };
            self.chunks.entry(chunk.digest).or_insert(DictChunk {
                blob: *blob,
                compressed_offset: chunk.compressed_offset,
                compressed_len: chunk.compressed_len,
                uncompressed_len: chunk.uncompressed_len,
            });
        }
    }

    /// How many chunks the dictionary knows.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether the dictionary knows no chunk.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

type NodeId = usize;

/// The root directory's node.
const ROOT: NodeId = 0;

/// A node's attributes, from its tar entry.
#[derive(Debug, Clone, Default)]
struct Meta {
    /// Permission bits (`mode & 0o7777`).
    perm: u32,
    /// Owner user id.
    uid: u32,
    /// Owner group id.
    gid: u32,
    /// Modification time.
    mtime: Timestamp,
    /// Extended attributes by name.
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// What a node is and holds.
#[derive(Debug, Clone)]
enum Content {
    /// A directory and its entries by name.
    Directory(BTreeMap<Vec<u8>, Child>),
    /// A regular file and its chunk indices, in order.
    Regular(Vec<u32>),
    /// A symlink and its target.
    Symlink(Vec<u8>),
    /// A character device and its number.
    CharDevice(u64),
    /// A block device and its number.
    BlockDevice(u64),
    /// A named pipe.
    Fifo,
}

/// A file of the merged tree.
#[derive(Debug, Clone)]
struct Node {
    /// Its attributes.
    meta: Meta,
    /// What it is and holds.
    content: Content,
}

impl Node {
    fn implicit_dir() -> Self {
        Node { meta: Meta { perm: IMPLICIT_DIR_PERM, ..Meta::default() }, content: Content::Directory(BTreeMap::new()) }
    }
}

/// A directory entry of the merged tree.
#[derive(Debug, Clone, Copy)]
struct Child {
    /// The node it names; several entries name one node for hard links.
    node: NodeId,
    /// The last layer that had this path or anything beneath it. A whiteout or opaque marker in
    /// layer L hides only what lower layers put there: entries marked below L.
    layer: u32,
}

/// Per-layer state while a layer is applied.
struct LayerState<W> {
    /// The layer's position in the image, from 0.
    index: usize,
    /// The layer's chunk blob.
    writer: ChunkBlobWriter<W>,
    /// Compresses the layer's new chunks.
    compressing: Compressing,
    /// This layer's index in the blob table, once it has written a chunk.
    blob_index: Option<u32>,
    /// Chunks written to the blob so far.
    new_chunks: u64,
    /// Chunks found already stored so far.
    reused_chunks: u64,
    /// Entries skipped so far, and why.
    warnings: Vec<String>,
}

/// Threads compressing new chunks: one per core, at most 8.
fn compression_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8)
}

/// New chunks compressed at once, at most.
pub(crate) fn max_in_flight() -> usize {
    2 * compression_workers()
}

/// New chunks on their way through the compression workers.
struct Compressing {
    /// Where chunks to compress go, numbered in order; `None` once the layer is done.
    jobs: Option<mpsc::SyncSender<(u64, Vec<u8>)>>,
    /// Compressed chunks come back here, in any order.
    done: mpsc::Receiver<(u64, io::Result<Vec<u8>>)>,
    /// Chunks sent so far.
    sent: u64,
    /// Compressed chunks that came back before the ones ahead of them.
    early: BTreeMap<u64, io::Result<Vec<u8>>>,
    /// The chunk-table index of every chunk sent and not yet appended, in order.
    waiting: VecDeque<u32>,
    /// Most chunks in flight at once (bounds memory to that many chunks).
    max_in_flight: usize,
}

/// Builds a bootstrap from an image's layers, streaming each layer's new chunks to its blob.
#[derive(Debug)]
pub struct TreeBuilder {
    /// Build settings.
    options: BuildOptions,
    /// Chunks other images already store.
    dict: ChunkDict,
    /// The merged tree's nodes; [`ROOT`] is the root directory.
    nodes: Vec<Node>,
    /// Every chunk stored or referenced so far.
    chunks: Vec<Chunk>,
    /// The blobs those chunks live in.
    blobs: Vec<Blob>,
    /// Chunk index by blake3 digest, for dedup.
    known: HashMap<[u8; 32], u32>,
    /// Blob index of each dictionary blob referenced so far, by sha256.
    dict_blobs: HashMap<[u8; 32], u32>,
    /// Each added layer's chunk blob.
    layers: Vec<Option<Blob>>,
}

impl Default for TreeBuilder {
    fn default() -> Self {
        TreeBuilder::new(BuildOptions::default())
    }
}

impl TreeBuilder {
    /// A builder with an empty root directory.
    pub fn new(options: BuildOptions) -> Self {
        TreeBuilder {
            options,
            dict: ChunkDict::new(),
            nodes: vec![Node::implicit_dir()],
            chunks: Vec::new(),
            blobs: Vec::new(),
            known: HashMap::new(),
            dict_blobs: HashMap::new(),
            layers: Vec::new(),
        }
    }

    /// Reuses the chunks of `dict` instead of storing them again.
    pub fn with_chunk_dict(mut self, dict: ChunkDict) -> Self {
        self.dict = dict;
        self
    }

    /// Applies the next layer, read from `archive`, writing its new chunks to `blob_sink`.
    pub fn add_layer<R: Read, W: Write>(&mut self, archive: &mut tar::Archive<R>, blob_sink: W) -> Result<LayerOutcome, BuildError> {
        let index = self.layers.len();
        let workers = compression_workers();
        let compressors = (0..workers)
            .map(|_| ChunkCompressor::new(self.options.compression_level))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| BuildError::Compress { layer: index, source })?;
        std::thread::scope(|scope| {
            let (jobs, queue) = mpsc::sync_channel::<(u64, Vec<u8>)>(workers);
            let (finished, done) = mpsc::channel();
            let queue = Arc::new(Mutex::new(queue));
            for mut compressor in compressors {
                let (queue, finished) = (queue.clone(), finished.clone());
                scope.spawn(move || loop {
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((number, data)) = job else { return };
                    if finished.send((number, compressor.compress(&data))).is_err() {
                        return;
                    }
                });
            }
            let compressing = Compressing {
                jobs: Some(jobs),
                done,
                sent: 0,
                early: BTreeMap::new(),
                waiting: VecDeque::new(),
                max_in_flight: max_in_flight(),
            };
            let mut state = LayerState {
                index,
                writer: ChunkBlobWriter::new(blob_sink),
                compressing,
                blob_index: None,
                new_chunks: 0,
                reused_chunks: 0,
                warnings: Vec::new(),
            };
            let applied = self.apply_entries(archive, &mut state);
            // The workers stop once the queue closes; the scope waits for them.
            state.compressing.jobs = None;
            applied?;
            self.finish_layer(state)
        })
    }

    /// Applies every entry of `archive`, then waits for the last chunks to be appended.
    fn apply_entries<R: Read, W: Write>(&mut self, archive: &mut tar::Archive<R>, state: &mut LayerState<W>) -> Result<(), BuildError> {
        let read_error = |source| BuildError::Read { layer: state.index, source };
        let mut buffer = vec![0; MAX_CHUNK_SIZE as usize];
        for entry in archive.entries().map_err(read_error)? {
            let mut entry = entry.map_err(|source| BuildError::Read { layer: state.index, source })?;
            self.apply_entry(&mut entry, state, &mut buffer)?;
        }
        self.append_compressed(state, 0)
    }

    /// Completes the layer's blob and records the layer.
    fn finish_layer<W: Write>(&mut self, state: LayerState<W>) -> Result<LayerOutcome, BuildError> {
        let index = state.index;
        let blob = match state.blob_index {
            None => None,
            Some(blob_index) => {
                let (_, blob) = state.writer.finish().map_err(|source| BuildError::Write { layer: index, source })?;
                if let Some(slot) = self.blobs.get_mut(blob_index as usize) {
                    *slot = blob;
                }
                Some(blob)
            }
        };
        self.layers.push(blob);
        Ok(LayerOutcome { blob, new_chunks: state.new_chunks, reused_chunks: state.reused_chunks, warnings: state.warnings })
    }

    /// Appends compressed chunks to the blob, in order, until at most `in_flight` are left
    /// with the workers; records each one's place in the chunk table.
    fn append_compressed<W: Write>(&mut self, state: &mut LayerState<W>, in_flight: usize) -> Result<(), BuildError> {
        let layer = state.index;
        let c = &mut state.compressing;
        while c.waiting.len() > in_flight {
            let number = c.sent - c.waiting.len() as u64;
            let compressed = loop {
                if let Some(compressed) = c.early.remove(&number) {
                    break compressed;
                }
                match c.done.recv() {
                    Ok((n, compressed)) => {
                        c.early.insert(n, compressed);
                    }
                    Err(_) => {
                        return Err(BuildError::Compress { layer, source: io::Error::other("the compression workers stopped") });
                    }
                }
            };
            let compressed = compressed.map_err(|source| BuildError::Compress { layer, source })?;
            let Some(target) = c.waiting.pop_front() else { break };
            let chunk = &mut self.chunks[target as usize];
            let compressed_len = u32::try_from(compressed.len()).ok().filter(|&len| len <= MAX_COMPRESSED_CHUNK_SIZE).ok_or_else(|| {
                BuildError::Compress {
                    layer,
                    source: io::Error::other(format!("a {}-byte chunk compressed to {} bytes", chunk.uncompressed_len, compressed.len())),
                }
            })?;
            chunk.compressed_offset = state.writer.append(&compressed).map_err(|source| BuildError::Write { layer, source })?;
            chunk.compressed_len = compressed_len;
        }
        Ok(())
    }

    /// Finishes the build: numbers the inodes, drops chunks no file uses any more, resolves the
    /// prefetch paths (a directory stands for the regular files beneath it) and assembles the
    /// bootstrap.
    pub fn finish<P: AsRef<[u8]>>(self, prefetch: &[P]) -> Result<BuiltImage, BuildError> {
        let (order, ino_of) = self.number_inodes()?;
        let (chunks, blobs, chunk_map) = self.live_chunks(&order);
        let inodes = order.iter().map(|&id| self.new_inode(id, &ino_of, &chunk_map)).collect();
        let (prefetch, warnings) = self.resolve_prefetch(prefetch, &ino_of);
        let bootstrap = Bootstrap::from_parts(BootstrapParts { blobs, chunks, inodes, prefetch })?;
        Ok(BuiltImage { bootstrap, layers: self.layers, warnings })
    }

    fn apply_entry<R: Read, W: Write>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        state: &mut LayerState<W>,
        buffer: &mut [u8],
    ) -> Result<(), BuildError> {
        let layer = state.index;
        let raw_path = entry.path_bytes().into_owned();
        let fail = |reason: String| BuildError::Entry { layer, path: String::from_utf8_lossy(&raw_path).into_owned(), reason };
        let entry_type = entry.header().entry_type();
        if entry_type.is_pax_global_extensions() {
            return Ok(());
        }
        let path = split_path(&raw_path).map_err(fail)?;
        let layer_mark = u32::try_from(layer).map_err(|_| BuildError::TooLarge("layers"))?;

        if self.apply_whiteout(&path, layer_mark).map_err(fail)? {
            return Ok(());
        }

        let meta = read_meta(entry).map_err(fail)?;
        let content = match entry_type {
            tar::EntryType::Directory => {
                let dir = self.make_dirs(&path, layer_mark);
                self.nodes[dir].meta = meta;
                return Ok(());
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| fail("hard link without a target".into()))?;
                let target = split_path(&target).map_err(|reason| fail(format!("hard link target: {reason}")))?;
                return self.link(&path, &target, layer_mark).map_err(fail);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let declared = entry.size();
                let (chunks, stored) = self.store_file(entry, state, buffer)?;
                if entry_type != tar::EntryType::GNUSparse && stored != declared {
                    return Err(fail(format!("holds {stored} bytes, its header says {declared}")));
                }
                Content::Regular(chunks)
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| fail("symlink without a target".into()))?;
                check_symlink_target(&target).map_err(fail)?;
                Content::Symlink(target.into_owned())
            }
            tar::EntryType::Char => Content::CharDevice(device_number(entry.header()).map_err(fail)?),
            tar::EntryType::Block => Content::BlockDevice(device_number(entry.header()).map_err(fail)?),
            tar::EntryType::Fifo => Content::Fifo,
            other => {
                state.warnings.push(format!(
                    "layer {layer}: skipped {:?}: tar entry type {other:?} has no place in a filesystem",
                    String::from_utf8_lossy(&raw_path)
                ));
                return Ok(());
            }
        };
        if path.is_empty() {
            return Err(fail("the root can only be a directory".into()));
        }
        self.insert(&path, Node { meta, content }, layer_mark);
        Ok(())
    }

    /// Applies `path` if it is a whiteout or an opaque marker; returns whether it was one.
    fn apply_whiteout(&mut self, path: &[Vec<u8>], layer: u32) -> Result<bool, String> {
        let Some((name, parent)) = path.split_last() else {
            return Ok(false);
        };
        if name.as_slice() == OPAQUE_MARKER {
            self.make_opaque(parent, layer);
        } else if name.starts_with(WHITEOUT_META_PREFIX) {
            // Other whiteout metadata (aufs bookkeeping) names no file.
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            check_component(hidden).map_err(|reason| format!("whiteout of an invalid name: {reason}"))?;
            self.whiteout(parent, hidden, layer);
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn is_dir(&self, id: NodeId) -> bool {
        matches!(self.nodes[id].content, Content::Directory(_))
    }

    fn children(&self, dir: NodeId) -> Option<&BTreeMap<Vec<u8>, Child>> {
        match &self.nodes[dir].content {
            Content::Directory(children) => Some(children),
            _ => None,
        }
    }

    fn children_mut(&mut self, dir: NodeId) -> Option<&mut BTreeMap<Vec<u8>, Child>> {
        match &mut self.nodes[dir].content {
            Content::Directory(children) => Some(children),
            _ => None,
        }
    }

    fn child(&self, dir: NodeId, name: &[u8]) -> Option<Child> {
        self.children(dir)?.get(name).copied()
    }

    /// Walks `path` from the root, creating missing directories and replacing anything else in
    /// the way with one, and marks every step as present in `layer`.
    fn make_dirs(&mut self, path: &[Vec<u8>], layer: u32) -> NodeId {
        let mut dir = ROOT;
        for name in path {
            let node = match self.child(dir, name) {
                Some(child) if self.is_dir(child.node) => child.node,
                _ => self.push(Node::implicit_dir()),
            };
            if let Some(children) = self.children_mut(dir) {
                children.insert(name.clone(), Child { node, layer });
            }
            dir = node;
        }
        dir
    }

    /// Walks `path` through existing directories only, marking every step as present in `layer`.
    fn find_dir(&mut self, path: &[Vec<u8>], layer: u32) -> Option<NodeId> {
        let mut dir = ROOT;
        for name in path {
            let child = self.child(dir, name).filter(|child| self.is_dir(child.node))?;
            if let Some(children) = self.children_mut(dir) {
                children.insert(name.clone(), Child { layer, ..child });
            }
            dir = child.node;
        }
        Some(dir)
    }

    /// The node at `path`, if any, without changing anything.
    fn resolve(&self, path: &[Vec<u8>]) -> Option<NodeId> {
        path.iter().try_fold(ROOT, |dir, name| self.child(dir, name).map(|child| child.node))
    }

    fn insert(&mut self, path: &[Vec<u8>], node: Node, layer: u32) {
        let Some((name, parent)) = path.split_last() else {
            return;
        };
        let dir = self.make_dirs(parent, layer);
        let node = self.push(node);
        if let Some(children) = self.children_mut(dir) {
            children.insert(name.clone(), Child { node, layer });
        }
    }

    /// Names the node at `target` (earlier in this layer or in a lower one) also at `path`.
    fn link(&mut self, path: &[Vec<u8>], target: &[Vec<u8>], layer: u32) -> Result<(), String> {
        let node = self.resolve(target).ok_or_else(|| format!("hard link target {:?} does not exist", join_path(target)))?;
        if self.is_dir(node) {
            return Err(format!("hard link target {:?} is a directory", join_path(target)));
        }
        let (name, parent) = path.split_last().ok_or("a hard link cannot be the root")?;
        let dir = self.make_dirs(parent, layer);
        if let Some(children) = self.children_mut(dir) {
            children.insert(name.clone(), Child { node, layer });
        }
        Ok(())
    }

    /// Applies `.wh.<name>` in directory `parent`: hides what lower layers put at `name`.
    fn whiteout(&mut self, parent: &[Vec<u8>], name: &[u8], layer: u32) {
        let Some(dir) = self.find_dir(parent, layer) else {
            return;
        };
        let Some(child) = self.child(dir, name) else {
            return;
        };
        if child.layer < layer {
            if let Some(children) = self.children_mut(dir) {
                children.remove(name);
            }
        } else if self.is_dir(child.node) {
            // The same layer also has this path: it stays, but nothing lower shows through it.
            self.hide_lower(child.node, layer);
        }
    }

    /// Applies `.wh..wh..opq` in directory `path`.
    fn make_opaque(&mut self, path: &[Vec<u8>], layer: u32) {
        if let Some(dir) = self.find_dir(path, layer) {
            self.hide_lower(dir, layer);
        }
    }

    /// Removes, beneath `dir`, every entry lower layers put there and `layer` did not touch.
    fn hide_lower(&mut self, dir: NodeId, layer: u32) {
        let mut pending = vec![dir];
        while let Some(dir) = pending.pop() {
            let Some(children) = self.children_mut(dir) else {
                continue;
            };
            children.retain(|_, child| child.layer >= layer);
            let kept: Vec<NodeId> = children.values().map(|child| child.node).collect();
            pending.extend(kept.into_iter().filter(|&node| self.is_dir(node)));
        }
    }

    /// Cuts a regular file's data into chunks, storing the new ones; returns the chunk indices
    /// and the number of bytes read.
    fn store_file<R: Read, W: Write>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        state: &mut LayerState<W>,
        buffer: &mut [u8],
    ) -> Result<(Vec<u32>, u64), BuildError> {
        let mut chunks = Vec::new();
        let mut stored = 0u64;
        loop {
            let filled = read_up_to(entry, buffer).map_err(|source| BuildError::Read { layer: state.index, source })?;
            if filled == 0 {
                break;
            }
            stored += filled as u64;
            chunks.push(self.store_chunk(&buffer[..filled], state)?);
            if filled < buffer.len() {
                break;
            }
        }
        Ok((chunks, stored))
    }

    /// Stores one chunk unless it is already known; returns its chunk index.
    fn store_chunk<W: Write>(&mut self, data: &[u8], state: &mut LayerState<W>) -> Result<u32, BuildError> {
        let digest = chunk_digest(data);
        if let Some(&index) = self.known.get(&digest) {
            state.reused_chunks += 1;
            return Ok(index);
        }
        let index = u32::try_from(self.chunks.len()).map_err(|_| BuildError::TooLarge("chunks"))?;
        let uncompressed_len = data.len() as u32;
        let known_elsewhere = self.dict.chunks.get(&digest).copied().filter(|found| found.uncompressed_len == uncompressed_len);
        let chunk = match known_elsewhere {
            Some(found) => {
                state.reused_chunks += 1;
                Chunk {
                    digest,
                    blob: self.dict_blob_index(found.blob)?,
                    compressed_offset: found.compressed_offset,
                    compressed_len: found.compressed_len,
                    uncompressed_len,
                }
            }
            None => {
                // Placed in the blob once compressed (append_compressed).
                let blob = self.layer_blob_index(state)?;
                state.new_chunks += 1;
                let c = &mut state.compressing;
                let jobs = c.jobs.as_ref().ok_or_else(|| BuildError::Compress {
                    layer: state.index,
                    source: io::Error::other("the layer is already finished"),
                })?;
                if jobs.send((c.sent, data.to_vec())).is_err() {
                    return Err(BuildError::Compress { layer: state.index, source: io::Error::other("the compression workers stopped") });
                }
                c.sent += 1;
                c.waiting.push_back(index);
                self.chunks.push(Chunk { digest, blob, compressed_offset: 0, compressed_len: 0, uncompressed_len });
                self.known.insert(digest, index);
                let max_in_flight = state.compressing.max_in_flight;
                self.append_compressed(state, max_in_flight)?;
                return Ok(index);
            }
        };
        self.chunks.push(chunk);
        self.known.insert(digest, index);
        Ok(index)
    }

    /// The blob index of the layer being applied, giving it one on its first new chunk. Its
    /// digest and size are filled in when the layer ends.
    fn layer_blob_index<W>(&mut self, state: &mut LayerState<W>) -> Result<u32, BuildError> {
        if let Some(index) = state.blob_index {
            return Ok(index);
        }
        let index = u32::try_from(self.blobs.len()).map_err(|_| BuildError::TooLarge("blobs"))?;
        self.blobs.push(Blob { sha256: [0; 32], size: 0 });
        state.blob_index = Some(index);
        Ok(index)
    }

    fn dict_blob_index(&mut self, blob: Blob) -> Result<u32, BuildError> {
        if let Some(&index) = self.dict_blobs.get(&blob.sha256) {
            return Ok(index);
        }
        let index = u32::try_from(self.blobs.len()).map_err(|_| BuildError::TooLarge("blobs"))?;
        self.blobs.push(blob);
        self.dict_blobs.insert(blob.sha256, index);
        Ok(index)
    }

    /// Numbers the nodes reachable from the root breadth-first (root = 1, a directory's
    /// children by name); returns the nodes in inode order and each node's inode number (0 for
    /// unreachable nodes).
    fn number_inodes(&self) -> Result<(Vec<NodeId>, Vec<u64>), BuildError> {
        let mut ino_of = vec![0u64; self.nodes.len()];
        let mut order = vec![ROOT];
        ino_of[ROOT] = 1;
        let mut next = 0;
        while let Some(&id) = order.get(next) {
            next += 1;
            let Some(children) = self.children(id) else {
                continue;
            };
            for child in children.values() {
                if ino_of[child.node] == 0 {
                    order.push(child.node);
                    ino_of[child.node] = order.len() as u64;
                }
            }
        }
        if u32::try_from(order.len()).is_err() {
            return Err(BuildError::TooLarge("inodes"));
        }
        Ok((order, ino_of))
    }

    /// The chunks reachable files use, and the blobs holding them, in their original order;
    /// plus each old chunk index's new index.
    fn live_chunks(&self, order: &[NodeId]) -> (Vec<Chunk>, Vec<Blob>, Vec<u32>) {
        let mut chunk_used = vec![false; self.chunks.len()];
        for &id in order {
            if let Content::Regular(indices) = &self.nodes[id].content {
                for &index in indices {
                    chunk_used[index as usize] = true;
                }
            }
        }
        let mut blob_map = vec![None; self.blobs.len()];
        let mut blobs = Vec::new();
        for (chunk, _) in self.chunks.iter().zip(&chunk_used).filter(|(_, used)| **used) {
            let slot = &mut blob_map[chunk.blob as usize];
            if slot.is_none() {
                *slot = Some(0);
            }
        }
        for (slot, blob) in blob_map.iter_mut().zip(&self.blobs) {
            if slot.is_some() {
                *slot = Some(blobs.len() as u32);
                blobs.push(*blob);
            }
        }
        let mut chunk_map = vec![u32::MAX; self.chunks.len()];
        let mut chunks = Vec::new();
        for ((chunk, used), new_index) in self.chunks.iter().zip(&chunk_used).zip(&mut chunk_map) {
            if let (true, Some(blob)) = (*used, blob_map[chunk.blob as usize]) {
                *new_index = chunks.len() as u32;
                chunks.push(Chunk { blob, ..*chunk });
            }
        }
        (chunks, blobs, chunk_map)
    }

    fn new_inode(&self, id: NodeId, ino_of: &[u64], chunk_map: &[u32]) -> NewInode {
        let node = &self.nodes[id];
        let content = match &node.content {
            Content::Directory(children) => {
                InodeContent::Directory { entries: children.iter().map(|(name, child)| (name.clone(), ino_of[child.node])).collect() }
            }
            Content::Regular(indices) => InodeContent::Regular { chunks: indices.iter().map(|&index| chunk_map[index as usize]).collect() },
            Content::Symlink(target) => InodeContent::Symlink { target: target.clone() },
            Content::CharDevice(rdev) => InodeContent::CharDevice { rdev: *rdev },
            Content::BlockDevice(rdev) => InodeContent::BlockDevice { rdev: *rdev },
            Content::Fifo => InodeContent::Fifo,
        };
        NewInode {
            perm: node.meta.perm,
            uid: node.meta.uid,
            gid: node.meta.gid,
            mtime: node.meta.mtime,
            xattrs: node.meta.xattrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            content,
        }
    }

    /// Maps prefetch paths to regular files' inode numbers, first mention first; a directory
    /// stands for every regular file beneath it, depth first by name.
    fn resolve_prefetch<P: AsRef<[u8]>>(&self, paths: &[P], ino_of: &[u64]) -> (Vec<u64>, Vec<String>) {
        let mut inos = Vec::new();
        let mut listed = vec![false; self.nodes.len()];
        let mut warnings = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let shown = String::from_utf8_lossy(path);
            let Some(node) = split_path(path).ok().and_then(|components| self.resolve(&components)) else {
                warnings.push(format!("prefetch path {shown:?} is not in the image; skipped"));
                continue;
            };
            let mut pending = vec![node];
            let mut found_file = false;
            while let Some(id) = pending.pop() {
                match &self.nodes[id].content {
                    Content::Regular(_) => {
                        found_file = true;
                        if !std::mem::replace(&mut listed[id], true) {
                            inos.push(ino_of[id]);
                        }
                    }
                    Content::Directory(children) => pending.extend(children.values().rev().map(|child| child.node)),
                    _ => {}
                }
            }
            if !found_file {
                warnings.push(format!("prefetch path {shown:?} holds no regular file; skipped"));
            }
        }
        (inos, warnings)
    }
}

/// Fills `buffer` from `reader` as far as it can; returns how much it filled (less than the
/// buffer only at the end of the data).
fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Splits a tar path into components relative to the image root. Empty and `.` components
/// are dropped (so `./`, `/` and `` are the root); `..` is refused.
fn split_path(path: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut components = Vec::new();
    for component in path.split(|&byte| byte == b'/') {
        if component.is_empty() || component == b"." {
            continue;
        }
        check_component(component)?;
        components.push(component.to_vec());
    }
    Ok(components)
}

fn check_component(name: &[u8]) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name == b".." || name == b"." {
        return Err("path climbs out of the image with \"..\"".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("name of {} bytes exceeds the {MAX_NAME_LEN}-byte limit", name.len()));
    }
    if name.contains(&0) {
        return Err("name contains NUL".into());
    }
    Ok(())
}

fn join_path(path: &[Vec<u8>]) -> String {
    String::from_utf8_lossy(&path.join(&b'/')).into_owned()
}

fn check_symlink_target(target: &[u8]) -> Result<(), String> {
    if target.is_empty() || target.len() > MAX_SYMLINK_TARGET_LEN {
        return Err(format!("symlink target of {} bytes is outside 1..={MAX_SYMLINK_TARGET_LEN}", target.len()));
    }
    if target.contains(&0) {
        return Err("symlink target contains NUL".into());
    }
    Ok(())
}

/// Reads an entry's mode, owner, mtime and extended attributes (header, then PAX records).
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
    let mut xattrs = BTreeMap::new();
    let mut pax_mtime = None;
    if let Some(extensions) = entry.pax_extensions().map_err(|e| format!("unreadable PAX records: {e}"))? {
        for extension in extensions {
            let extension = extension.map_err(|e| format!("unreadable PAX record: {e}"))?;
            let key = extension.key_bytes();
            if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                let value = extension.value_bytes();
                check_xattr(name, value)?;
                xattrs.insert(name.to_vec(), value.to_vec());
            } else if key == b"mtime" {
                pax_mtime = parse_pax_time(extension.value_bytes());
            }
        }
    }
    let header = entry.header();
    let mode = header.mode().map_err(|e| format!("unreadable mode: {e}"))?;
    let uid = header.uid().map_err(|e| format!("unreadable uid: {e}"))?;
    let gid = header.gid().map_err(|e| format!("unreadable gid: {e}"))?;
    let mtime = match pax_mtime {
        Some(mtime) => mtime,
        None => {
            Timestamp { sec: i64::try_from(header.mtime().map_err(|e| format!("unreadable mtime: {e}"))?).unwrap_or(i64::MAX), nsec: 0 }
        }
    };
    Ok(Meta {
        perm: mode & 0o7777,
        uid: u32::try_from(uid).map_err(|_| format!("uid {uid} does not fit in 32 bits"))?,
        gid: u32::try_from(gid).map_err(|_| format!("gid {gid} does not fit in 32 bits"))?,
        mtime,
        xattrs,
    })
}

fn check_xattr(name: &[u8], value: &[u8]) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_XATTR_NAME_LEN || name.contains(&0) {
        return Err(format!(
            "extended attribute name {:?} is empty, longer than {MAX_XATTR_NAME_LEN} bytes or contains NUL",
            String::from_utf8_lossy(name)
        ));
    }
    if value.len() > MAX_XATTR_VALUE_LEN {
        return Err(format!(
            "extended attribute {:?} has a {}-byte value, over the {MAX_XATTR_VALUE_LEN}-byte limit",
            String::from_utf8_lossy(name),
            value.len()
        ));
    }
    Ok(())
}

/// Parses a PAX time, `[-]seconds[.fraction]`, keeping nanoseconds. `None` if malformed.
fn parse_pax_time(value: &[u8]) -> Option<Timestamp> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let all_digits = |s: &str| s.bytes().all(|byte| byte.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let sec: i64 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let digits = fraction.bytes().take(9);
    let used = digits.len() as u32;
    let nsec = digits.fold(0u32, |acc, digit| acc * 10 + u32::from(digit - b'0')) * 10u32.pow(9 - used);
    Some(match (negative, nsec) {
        (false, _) => Timestamp { sec, nsec },
        (true, 0) => Timestamp { sec: -sec, nsec: 0 },
        (true, _) => Timestamp { sec: -sec - 1, nsec: 1_000_000_000 - nsec },
    })
}

/// A device entry's number in Linux `dev_t` encoding.
fn device_number(header: &tar::Header) -> Result<u64, String> {
    let major = header.device_major().map_err(|e| format!("unreadable device major: {e}"))?;
    let minor = header.device_minor().map_err(|e| format!("unreadable device minor: {e}"))?;
    Ok(make_dev(major.unwrap_or(0), minor.unwrap_or(0)))
}

/// Encodes a device number the way Linux's `makedev` does.
pub fn make_dev(major: u32, minor: u32) -> u64 {
    let (major, minor) = (u64::from(major), u64::from(minor));
    ((major & 0xffff_f000) << 32) | ((major & 0x0000_0fff) << 8) | ((minor & 0xffff_ff00) << 12) | (minor & 0x0000_00ff)
}

#[cfg(test)]
mod tests;
