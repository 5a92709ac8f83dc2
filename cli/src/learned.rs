//! Cluster-learned prefetch for `shoal mount`: the mount reports the order in which its image's
//! files are first read to the scheduler, which merges the traces of every host per image; a
//! mount of an image without a prefetch list of its own prefetches by that merged trace. The
//! first start of an image anywhere thus teaches every later one what to fetch first.
//!
//! Best effort throughout: without a scheduler the mount works as before, only without learning.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_agent::schedulers::{Credential, Schedulers};
use shoal_fuse::loader::ChunkLoader;
use shoal_fuse::trace::Trace;
use shoal_fuse::{Bootstrap, FileKind};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often a grown trace is reported while mounted.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// How long the last report at unmount may take.
const LAST_REPORT_TIMEOUT: Duration = Duration::from_secs(3);
/// Most bytes of paths sent in one report (gRPC messages are capped at 4 MiB).
const MAX_REPORT_BYTES: usize = 2 << 20;

/// One mount's link to the cluster's traces of its image.
pub struct ClusterTrace {
    /// The scheduler's replicas.
    schedulers: Schedulers,
    /// The image: the digest of its bootstrap.
    image: String,
    /// This host's id.
    host: String,
    /// A failed report was logged as a warning already (later ones are debug lines).
    warned: AtomicBool,
}

impl ClusterTrace {
    /// Learning for `image` (its bootstrap's digest) on `host`, through `schedulers`, called
    /// with `credential`.
    pub fn new(schedulers: &[String], credential: Credential, image: String, host: String) -> Option<ClusterTrace> {
        (!schedulers.is_empty()).then(|| ClusterTrace {
            schedulers: Schedulers::new(schedulers, credential),
            image,
            host,
            warned: AtomicBool::new(false),
        })
    }

    /// Fetches the merged trace of the image and prefetches its files, in that order.
    pub async fn prefetch(self: Arc<Self>, loader: Arc<ChunkLoader>, concurrency: usize) {
        let (paths, traces) = match self.schedulers.merged_trace(&self.image).await {
            Ok(merged) => merged,
            Err(e) => {
                info!(image = %self.image, error = %e, "no cluster-learned prefetch: the scheduler cannot be asked");
                return;
            }
        };
        let inos = files_of(loader.bootstrap(), &paths);
        if inos.is_empty() {
            debug!(image = %self.image, traces, "no host has reported a trace of this image yet");
            return;
        }
        info!(image = %self.image, files = inos.len(), traces, "prefetching by the trace the cluster learned");
        loader.prefetch(inos, concurrency).await;
    }

    /// Reports `trace` whenever it grew, every few seconds, and once more when `shutdown` fires.
    pub async fn report_loop(self: Arc<Self>, trace: Arc<Trace>, shutdown: CancellationToken) {
        let mut reported = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(REPORT_EVERY) => {}
            }
            if trace.len() > reported {
                reported = self.report(&trace).await.unwrap_or(reported);
            }
        }
        if trace.len() > reported && tokio::time::timeout(LAST_REPORT_TIMEOUT, self.report(&trace)).await.is_err() {
            warn!(image = %self.image, "the scheduler did not take the access trace in time");
        }
    }

    /// Sends the trace so far; returns how many files it held.
    async fn report(&self, trace: &Trace) -> Option<usize> {
        let mut paths = trace.paths();
        let files = paths.len();
        let mut bytes = 0;
        paths.retain(|p| {
            bytes += p.len() + 8;
            bytes <= MAX_REPORT_BYTES
        });
        match self.schedulers.report_trace(&self.image, &self.host, paths).await {
            Ok(kept) => {
                debug!(image = %self.image, files, kept, "access trace reported");
                Some(files)
            }
            Err(e) => {
                if self.warned.swap(true, Ordering::Relaxed) {
                    debug!(image = %self.image, error = %e, "cannot report the access trace");
                } else {
                    warn!(image = %self.image, error = %e, "cannot report the access trace; other mounts will not learn from this one");
                }
                None
            }
        }
    }
}

/// The regular files of `bootstrap` that `paths` name, in order, each once; paths the image
/// does not have (a trace of another build, say) are skipped.
fn files_of(bootstrap: &Bootstrap, paths: &[Vec<u8>]) -> Vec<u64> {
    let mut seen = HashSet::new();
    paths
        .iter()
        .filter_map(|p| bootstrap.resolve(p))
        .filter(|&ino| bootstrap.getattr(ino).is_some_and(|a| a.kind == FileKind::Regular))
        .filter(|&ino| seen.insert(ino))
        .collect()
}
