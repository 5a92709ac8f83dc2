//! Access traces of lazily loaded images, merged per image, so that the first start of an image
//! on one node teaches every later mount in the cluster what to prefetch.
//!
//! A node's `shoal mount` records the order in which files of an image are first read and
//! reports it here, keyed by the digest of the image's bootstrap (one key per built image,
//! whatever tag it is mounted by). Each host's latest trace of an image replaces its earlier
//! one; the merged trace orders every path by where the traces put it, on average, relative to
//! their length, a trace without the path counting it as read last. Files that most runs read
//! early come first; files one run happened to touch go to the end.
//!
//! Plain data, bounded: paths per trace, bytes per path, traces per image and bytes overall,
//! the least recently reported image dropped first.

use std::collections::{HashMap, HashSet, VecDeque};

use thiserror::Error;

/// Most paths one trace may hold; a longer report is cut to its first this many.
pub const MAX_TRACE_PATHS: usize = 16_384;
/// Longest path accepted (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;
/// Traces kept per image: the most recently reported hosts'.
pub const MAX_TRACES_PER_IMAGE: usize = 32;
/// Longest image key accepted (`sha256:` and 64 hex digits fit easily).
const MAX_IMAGE_KEY: usize = 128;

/// Why a trace was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TraceError {
    /// The image key is empty or too long.
    #[error("trace: image key of {0} bytes (give the bootstrap's digest, sha256:<hex>)")]
    BadImage(usize),
    /// The host id is empty.
    #[error("trace of {0}: no host id")]
    NoHost(String),
    /// A path is empty, relative, or too long.
    #[error("trace of {image}: path {index} is not an absolute path of at most {MAX_PATH_LEN} bytes")]
    BadPath {
        /// The image key.
        image: String,
        /// Where in the trace.
        index: usize,
    },
}

/// One host's trace of one image.
struct HostTrace {
    /// The reporting host.
    host: String,
    /// Paths in first-read order, each once.
    paths: Vec<Vec<u8>>,
    /// Bytes held.
    bytes: usize,
}

/// The traces of one image.
#[derive(Default)]
struct ImageTraces {
    /// Most recently reported last.
    traces: VecDeque<HostTrace>,
    /// The merge of `traces`, until a new report.
    merged: Option<Vec<Vec<u8>>>,
}

impl ImageTraces {
    fn bytes(&self) -> usize {
        self.traces.iter().map(|t| t.bytes).sum()
    }
}

/// Traces by image, within a byte budget.
pub struct TraceBook {
    /// The most bytes of paths kept.
    budget: usize,
    /// Bytes of paths held.
    used: usize,
    /// Traces by image key.
    images: HashMap<String, ImageTraces>,
    /// Image keys, least recently reported first.
    order: VecDeque<String>,
}

impl TraceBook {
    /// A book holding at most `budget` bytes of paths.
    pub fn new(budget: usize) -> TraceBook {
        TraceBook { budget, used: 0, images: HashMap::new(), order: VecDeque::new() }
    }

    /// Bytes of paths held.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Records `host`'s trace of `image` (first-read order), replacing its earlier one. Paths
    /// after the first mention of each are dropped, and the trace is cut to [`MAX_TRACE_PATHS`].
    /// Returns how many paths were kept.
    pub fn record(&mut self, image: &str, host: &str, paths: Vec<Vec<u8>>) -> Result<usize, TraceError> {
        if image.is_empty() || image.len() > MAX_IMAGE_KEY {
            return Err(TraceError::BadImage(image.len()));
        }
        if host.is_empty() {
            return Err(TraceError::NoHost(image.into()));
        }
        if let Some(index) = paths.iter().position(|p| p.first() != Some(&b'/') || p.len() > MAX_PATH_LEN) {
            return Err(TraceError::BadPath { image: image.into(), index });
        }
        let mut seen = HashSet::new();
        let paths: Vec<Vec<u8>> = paths.into_iter().filter(|p| seen.insert(p.clone())).take(MAX_TRACE_PATHS).collect();
        let bytes = paths.iter().map(Vec::len).sum::<usize>() + host.len();
        let kept = paths.len();

        let entry = self.images.entry(image.to_string()).or_default();
        let before = entry.bytes();
        entry.traces.retain(|t| t.host != host);
        entry.traces.push_back(HostTrace { host: host.into(), paths, bytes });
        while entry.traces.len() > MAX_TRACES_PER_IMAGE {
            entry.traces.pop_front();
        }
        entry.merged = None;
        self.used = self.used + entry.bytes() - before;
        self.order.retain(|key| key != image);
        self.order.push_back(image.to_string());
        self.shrink(image);
        Ok(kept)
    }

    /// Drops the least recently reported images, then the oldest traces of `keep`, until
    /// within the budget.
    fn shrink(&mut self, keep: &str) {
        while self.used > self.budget {
            let Some(oldest) = self.order.front().cloned() else { break };
            if oldest == keep {
                // Only the image just reported is left: drop its oldest traces, but never the newest.
                let Some(entry) = self.images.get_mut(keep) else { break };
                if entry.traces.len() <= 1 {
                    break;
                }
                if let Some(dropped) = entry.traces.pop_front() {
                    self.used -= dropped.bytes;
                    entry.merged = None;
                }
                continue;
            }
            self.order.pop_front();
            if let Some(dropped) = self.images.remove(&oldest) {
                self.used -= dropped.bytes();
            }
        }
    }

    /// The merged trace of `image` and how many host traces it merges; empty when none.
    pub fn merged(&mut self, image: &str) -> (Vec<Vec<u8>>, usize) {
        let Some(entry) = self.images.get_mut(image) else { return (Vec::new(), 0) };
        let traces = entry.traces.len();
        let merged = entry.merged.get_or_insert_with(|| {
            let all: Vec<&[Vec<u8>]> = entry.traces.iter().map(|t| t.paths.as_slice()).collect();
            merge(&all)
        });
        (merged.clone(), traces)
    }
}

/// Merges traces into one order: each path by the mean of its relative position in every
/// trace (index / length; 1 where a trace lacks it), ties by first appearance. Cut to
/// [`MAX_TRACE_PATHS`].
pub fn merge(traces: &[&[Vec<u8>]]) -> Vec<Vec<u8>> {
    struct Score<'a> {
        path: &'a [u8],
        /// Sum over the traces holding the path of its relative position.
        sum: f64,
        /// Traces holding it.
        count: usize,
        /// Order of first appearance, for ties.
        first: usize,
    }
    let mut scores: HashMap<&[u8], Score> = HashMap::new();
    let mut next = 0;
    for trace in traces.iter().filter(|t| !t.is_empty()) {
        let len = trace.len() as f64;
        for (index, path) in trace.iter().enumerate() {
            let score = scores.entry(path.as_slice()).or_insert_with(|| {
                next += 1;
                Score { path, sum: 0.0, count: 0, first: next }
            });
            // Each trace lists a path once (record dedups); guard anyway.
            if score.count < traces.len() {
                score.sum += index as f64 / len;
                score.count += 1;
            }
        }
    }
    let k = traces.iter().filter(|t| !t.is_empty()).count() as f64;
    let mut ranked: Vec<(f64, usize, &[u8])> =
        scores.into_values().map(|s| (((s.sum + (k - s.count as f64)) / k), s.first, s.path)).collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    ranked.into_iter().take(MAX_TRACE_PATHS).map(|(_, _, path)| path.to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(list: &[&str]) -> Vec<Vec<u8>> {
        list.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    fn strings(list: Vec<Vec<u8>>) -> Vec<String> {
        list.into_iter().map(|p| String::from_utf8(p).unwrap()).collect()
    }

    #[test]
    fn one_trace_is_its_own_merge() {
        let mut book = TraceBook::new(1 << 20);
        assert_eq!(book.record("sha256:a", "n1", paths(&["/bin/sh", "/etc/passwd", "/bin/sh", "/app"])), Ok(3));
        let (merged, traces) = book.merged("sha256:a");
        assert_eq!(traces, 1);
        assert_eq!(strings(merged), ["/bin/sh", "/etc/passwd", "/app"], "later mentions are dropped");
        assert_eq!(book.merged("sha256:other"), (Vec::new(), 0));
    }

    #[test]
    fn files_most_runs_read_early_come_first_and_a_one_off_goes_last() {
        let a = paths(&["/bin/sh", "/lib/libc.so", "/app/main", "/tmp/debug-once"]);
        let b = paths(&["/lib/libc.so", "/bin/sh", "/app/main"]);
        let c = paths(&["/bin/sh", "/lib/libc.so", "/app/config", "/app/main"]);
        let merged = strings(merge(&[&a, &b, &c]));
        assert_eq!(merged[..2], ["/bin/sh", "/lib/libc.so"]);
        assert_eq!(merged[2], "/app/main");
        let last_two: HashSet<&str> = merged[3..].iter().map(String::as_str).collect();
        assert_eq!(last_two, HashSet::from(["/app/config", "/tmp/debug-once"]));
        assert_eq!(merged.len(), 5, "every path any run read is kept");
    }

    #[test]
    fn a_host_reporting_again_replaces_its_trace() {
        let mut book = TraceBook::new(1 << 20);
        book.record("img", "n1", paths(&["/a", "/b"])).unwrap();
        book.record("img", "n1", paths(&["/c"])).unwrap();
        let (merged, traces) = book.merged("img");
        assert_eq!((strings(merged), traces), (vec!["/c".to_string()], 1));
        book.record("img", "n2", paths(&["/d", "/c"])).unwrap();
        assert_eq!(book.merged("img").1, 2);
    }

    #[test]
    fn malformed_reports_are_refused_and_long_ones_cut() {
        let mut book = TraceBook::new(64 << 20);
        assert_eq!(book.record("", "n1", paths(&["/a"])), Err(TraceError::BadImage(0)));
        assert_eq!(book.record(&"x".repeat(500), "n1", paths(&["/a"])), Err(TraceError::BadImage(500)));
        assert!(matches!(book.record("img", "", paths(&["/a"])), Err(TraceError::NoHost(_))));
        assert!(matches!(book.record("img", "n1", paths(&["/a", "relative"])), Err(TraceError::BadPath { index: 1, .. })));
        assert!(matches!(book.record("img", "n1", vec![b"/a".to_vec(), Vec::new()]), Err(TraceError::BadPath { index: 1, .. })));
        let long = vec![[b"/".as_slice(), &[b'x'; MAX_PATH_LEN]].concat()];
        assert!(matches!(book.record("img", "n1", long), Err(TraceError::BadPath { index: 0, .. })));
        assert_eq!(book.used(), 0, "nothing refused is kept");
        let many: Vec<Vec<u8>> = (0..MAX_TRACE_PATHS + 10).map(|i| format!("/f{i}").into_bytes()).collect();
        assert_eq!(book.record("img", "n1", many), Ok(MAX_TRACE_PATHS));
    }

    #[test]
    fn the_budget_drops_the_least_recently_reported_image_then_old_traces() {
        let trace = |n: usize| -> Vec<Vec<u8>> { (0..n).map(|i| format!("/{i:09}").into_bytes()).collect() };
        // Each trace of 10 paths is 100 bytes plus the host id (2 bytes).
        let mut book = TraceBook::new(350);
        book.record("old", "n1", trace(10)).unwrap();
        book.record("new", "n1", trace(10)).unwrap();
        book.record("new", "n2", trace(10)).unwrap();
        assert_eq!(book.used(), 306);
        book.record("old", "n3", trace(10)).unwrap();
        assert_eq!(book.merged("new").1, 0, "the least recently reported image went first");
        assert_eq!(book.merged("old").1, 2);
        book.record("old", "n4", trace(10)).unwrap();
        book.record("old", "n5", trace(10)).unwrap();
        assert!(book.used() <= 350);
        assert_eq!(book.merged("old").1, 3, "the oldest traces of the reported image are dropped");
        for host in 0..MAX_TRACES_PER_IMAGE + 5 {
            book.record("tiny", &format!("h{host}"), paths(&["/a"])).unwrap();
        }
        assert_eq!(book.merged("tiny").1, MAX_TRACES_PER_IMAGE);
    }
}
