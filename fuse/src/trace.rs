//! The access trace: the order in which a mounted image's files are first read. Kept in
//! memory (what a mount reports to the scheduler, which merges the traces of every host for
//! cluster-learned prefetch) and, when asked, written to a file one absolute path per line — the
//! format `shoal build --prefetch` reads, so a recorded run becomes the next build's prefetch list.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

use tracing::warn;

use crate::format::{Bootstrap, FileKind, ROOT_INO};

/// What has been recorded so far.
struct TraceState {
    /// Files already recorded.
    seen: HashSet<u64>,
    /// Recorded files in first-read order.
    order: Vec<u64>,
    /// The trace file, appended to line by line, if any.
    out: Option<File>,
}

/// Records first reads of files.
pub struct Trace {
    /// The path of every regular file (its first name, breadth first), by inode.
    paths: HashMap<u64, Vec<u8>>,
    /// Recorded files and the output.
    state: Mutex<TraceState>,
}

impl std::fmt::Debug for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trace").field("files", &self.paths.len()).finish_non_exhaustive()
    }
}

impl Trace {
    /// A trace of `bootstrap`'s files, kept in memory.
    pub fn new(bootstrap: &Bootstrap) -> Trace {
        Trace::with_output(bootstrap, None)
    }

    /// A trace of `bootstrap`'s files, also written to `path` (truncated first).
    pub fn create(path: &Path, bootstrap: &Bootstrap) -> io::Result<Trace> {
        Ok(Trace::with_output(bootstrap, Some(File::create(path)?)))
    }

    fn with_output(bootstrap: &Bootstrap, out: Option<File>) -> Trace {
        Trace { paths: file_paths(bootstrap), state: Mutex::new(TraceState { seen: HashSet::new(), order: Vec::new(), out }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TraceState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that file `ino` is being read, if it was not read before. Each line is written
    /// at once, so the trace file is complete however the mount ends.
    pub fn record(&self, ino: u64) {
        let mut state = self.state();
        if !self.paths.contains_key(&ino) || !state.seen.insert(ino) {
            return;
        }
        state.order.push(ino);
        let Some(out) = state.out.as_mut() else { return };
        let path = &self.paths[&ino];
        if path.contains(&b'\n') {
            warn!(ino, "a file name contains a newline; it cannot be written to the trace file");
            return;
        }
        let mut line = Vec::with_capacity(path.len() + 1);
        line.extend_from_slice(path);
        line.push(b'\n');
        if let Err(e) = out.write_all(&line) {
            warn!(error = %e, "cannot write to the trace file");
        }
    }

    /// Files recorded so far.
    pub fn len(&self) -> usize {
        self.state().order.len()
    }

    /// Whether no file was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The absolute paths of the files recorded so far, in first-read order.
    pub fn paths(&self) -> Vec<Vec<u8>> {
        self.state().order.iter().map(|ino| self.paths[ino].clone()).collect()
    }
}

/// The absolute path of every regular file of `bootstrap`, by inode; a hard-linked file gets
/// the first of its names met breadth first.
pub fn file_paths(bootstrap: &Bootstrap) -> HashMap<u64, Vec<u8>> {
    let mut paths = HashMap::new();
    let mut dirs = VecDeque::from([(ROOT_INO, Vec::new())]);
    while let Some((dir, dir_path)) = dirs.pop_front() {
        let Some(entries) = bootstrap.readdir(dir) else { continue };
        for entry in entries {
            let mut path = dir_path.clone();
            path.push(b'/');
            path.extend_from_slice(entry.name);
            match entry.kind {
                FileKind::Directory => dirs.push_back((entry.ino, path)),
                FileKind::Regular => {
                    paths.entry(entry.ino).or_insert(path);
                }
                _ => {}
            }
        }
    }
    paths
}
