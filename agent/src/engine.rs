//! The download engine: one task per blob no matter how many requests want it (singleflight),
//! pieces fetched from the origin into the content store, readers streaming verified-in-order bytes
//! from the store while the download goes on, and the whole blob checked against its digest before
//! the task is complete.
//!
//! A reader never depends on the store alone: if the task fails for any reason other than bad
//! content (disk full, origin hiccup the retries did not cover), the reader goes on from its offset
//! straight from the origin, so the agent never fails a pull a direct pull would have survived.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::header::HeaderValue;
use http::StatusCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sha2::Digest as _;
use shoal_core::metrics::Metrics;
use shoal_core::piece::{Bitmap, PieceLayout};
use shoal_core::registry::{RegistryClient, RegistryError, Request};
use shoal_core::store::{Store, StoreError, TaskFile};
use shoal_core::{Digest, TaskId};
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use crate::ratelimit::RateLimiter;

/// Bytes handed to a reader at a time. Small enough that 64 concurrent pulls stay well under
/// 100 MiB of buffers, large enough that the per-read overhead is small.
const READ_CHUNK: usize = 256 << 10;
/// Bytes gathered from the origin before one write to the store.
const WRITE_CHUNK: usize = 512 << 10;
/// A private blob's registry is asked again whether it is public no more often than this, however
/// many peers ask for it.
const PUBLIC_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// A sparse task (pieces fetched for range reads only) that no read has wanted for this long
/// leaves the active set: its pieces stay in the store, but peers are no longer served them.
const SPARSE_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// Where a blob comes from and with whose credentials.
#[derive(Clone, Debug)]
pub struct Origin {
    /// Registry host as containerd names it.
    pub registry: String,
    /// Repository within it.
    pub repository: String,
    /// The blob's digest.
    pub digest: Digest,
    /// The requesting client's `Authorization` header, forwarded to the registry.
    pub authorization: Option<HeaderValue>,
}

impl Origin {
    fn request(&self) -> Request {
        let mut r = Request::blob(&self.registry, &self.repository, &self.digest);
        r.authorization = self.authorization.clone();
        r
    }
}

/// Why a download or read failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum EngineError {
    #[error("blob {digest}: content from the origin does not match its digest (got {actual}); nothing was stored")]
    DigestMismatch { digest: Digest, actual: Digest },
    #[error("{0}")]
    Origin(Arc<str>),
    #[error("{0}")]
    Store(Arc<str>),
}

impl EngineError {
    pub(crate) fn origin(e: impl std::fmt::Display) -> EngineError {
        EngineError::Origin(e.to_string().into())
    }

    /// Bad content: the one failure a reader must not paper over by going to the origin itself.
    fn is_integrity(&self) -> bool {
        matches!(self, EngineError::DigestMismatch { .. })
    }
}

/// Engine metrics.
#[derive(Clone, Default)]
struct EngineMetrics {
    origin_bytes: Counter,
    served_bytes: Counter,
    tasks_started: Counter,
    tasks_completed: Counter,
    tasks_failed: Counter,
    direct_reads: Counter,
    pieces_forgotten: Counter,
    active_tasks: Gauge,
    peer_bytes_received: Counter,
    peer_bytes_sent: Counter,
    peer_bytes_duplicate: Counter,
    peer_busy_refusals: Counter,
    peer_refusals: Counter,
    peer_fetches_abandoned: Counter,
    peer_updates_sent: Counter,
    peer_updates_unneeded: Counter,
}

/// The engine; one per process, shared.
pub struct Engine {
    store: Store,
    registry: Arc<RegistryClient>,
    limiter: Option<Arc<RateLimiter>>,
    tasks: Mutex<HashMap<TaskId, Arc<Task>>>,
    /// Peer-to-peer downloads, when a scheduler is configured.
    p2p: std::sync::OnceLock<Arc<crate::p2p::P2p>>,
    /// Serialises the creation of tasks, so concurrent first requests for a blob share one task.
    opening: tokio::sync::Mutex<()>,
    metrics: EngineMetrics,
}

/// State of a task's download.
#[derive(Clone, Debug)]
enum Status {
    Running,
    Complete,
    Failed(EngineError),
}

struct TaskState {
    /// Pieces some fetch has claimed and not yet finished.
    inflight: Bitmap,
    status: Status,
    /// Whether a fetch of every missing piece was started. A running task that is not driving is
    /// **sparse**: it fetches only the pieces range reads want ([`Engine::want`]).
    driving: bool,
    /// When a range read last wanted pieces of this task.
    last_want: std::time::Instant,
    /// Whether a watch for this sparse task going idle runs ([`Engine::retire_when_idle`]).
    idle_watched: bool,
    /// The most recent requester's origin (credentials are used to fetch).
    origin: Origin,
}

/// One blob being downloaded or read.
pub struct Task {
    pub(crate) id: TaskId,
    pub(crate) digest: Digest,
    /// The registry every byte of this task comes from; requests naming another never share it.
    pub(crate) registry: String,
    pub(crate) layout: PieceLayout,
    pub(crate) file: Arc<TaskFile>,
    state: Mutex<TaskState>,
    pub(crate) changed: watch::Sender<()>,
    /// The pieces this host fetched from the origin.
    sourced: Mutex<Bitmap>,
    /// Where finished piece numbers are reported (to the scheduler) while a P2P download runs.
    pub(crate) reporter: Mutex<Option<tokio::sync::mpsc::UnboundedSender<u32>>>,
    /// sha256 of the blob's first `.0` bytes, fed while bytes arrive in order, so the final check
    /// of a sequential download need not read the blob back.
    sha: Mutex<(u64, sha2::Sha256)>,
    /// When a peer's request last made this host ask the registry whether the blob is public
    /// (see [`Engine::shareable`]); held while asking, so concurrent requests wait for one answer.
    public_probe: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl Task {
    fn state(&self) -> MutexGuard<'_, TaskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_replace(());
    }

    /// A fetch will send bytes from `offset` again: if the running hash already saw some of them,
    /// it cannot tell whether they will be the same, so it starts over (the check reads the blob back).
    fn rewind_hash(&self, offset: u64) {
        let mut sha = self.sha.lock().unwrap_or_else(|p| p.into_inner());
        if sha.0 > offset {
            *sha = (0, sha2::Sha256::new());
        }
    }

    /// Feeds bytes at `offset` to the running sha256 if they are the next ones it needs.
    pub(crate) fn hash_in_order(&self, offset: u64, bytes: &[u8]) {
        let mut sha = self.sha.lock().unwrap_or_else(|p| p.into_inner());
        if sha.0 == offset {
            sha.1.update(bytes);
            sha.0 += bytes.len() as u64;
        }
    }

    /// Length of the blob.
    pub fn len(&self) -> u64 {
        self.layout.len
    }

    /// True for an empty blob.
    pub fn is_empty(&self) -> bool {
        self.layout.len == 0
    }

    /// Pieces present and total, for progress reports.
    pub fn progress(&self) -> (u32, u32) {
        (self.file.bitmap().count(), self.layout.count())
    }

    /// The task id.
    pub fn id(&self) -> &TaskId {
        &self.id
    }

    /// `None` while downloading; `Some(Ok)` once complete; `Some(Err)` once failed.
    pub(crate) fn outcome(&self) -> Option<Result<(), EngineError>> {
        match &self.state().status {
            Status::Running => None,
            Status::Complete => Some(Ok(())),
            Status::Failed(e) => Some(Err(e.clone())),
        }
    }

    /// The origin (and credentials) of the most recent request.
    pub(crate) fn origin(&self) -> Origin {
        self.state().origin.clone()
    }

    /// Whether the registry answered this blob's digest without credentials (so it may be shared
    /// with hosts that are not authenticated cluster members).
    pub(crate) fn is_public(&self) -> bool {
        self.file.is_public()
    }
}

/// A task this host can serve pieces of to other hosts: downloading or complete.
pub struct Shared {
    file: Arc<TaskFile>,
    task: Option<Arc<Task>>,
}

impl Shared {
    /// The task's store file.
    pub fn file(&self) -> Arc<TaskFile> {
        self.file.clone()
    }

    /// Wakes on every new piece (and on the end), while the task is downloading.
    pub fn changes(&self) -> Option<watch::Receiver<()>> {
        self.task.as_ref().map(|t| t.changed.subscribe())
    }

    /// Whether the whole task is here and verified.
    pub fn is_complete(&self) -> bool {
        match &self.task {
            Some(t) => matches!(t.state().status, Status::Complete),
            None => self.file.is_complete(),
        }
    }

    /// The pieces this host fetched from the origin while the task downloads (none once it is
    /// stored, or when it was fetched from peers).
    pub fn sourced(&self) -> Option<Bitmap> {
        let t = self.task.as_ref()?;
        let sourced = t.sourced.lock().unwrap_or_else(|p| p.into_inner());
        (sourced.count() > 0).then(|| sourced.clone())
    }

    /// The registry the task's bytes come from.
    pub fn registry(&self) -> Option<String> {
        self.file.registry()
    }

    /// Whether anyone may read the blob at its registry.
    pub fn is_public(&self) -> bool {
        self.file.is_public()
    }

    /// Why the download failed, if it did.
    pub fn failure(&self) -> Option<String> {
        match &self.task.as_ref()?.state().status {
            Status::Failed(e) => Some(e.to_string()),
            _ => None,
        }
    }
}

/// What [`Engine::open`] found.
pub enum Opened {
    /// A task (complete or downloading) to read from.
    Task(Arc<Task>),
    /// Read this blob straight from the origin, without storing it.
    Direct(DirectReason),
}

/// Why a blob is read straight from the origin instead of through the store.
#[derive(Debug, thiserror::Error)]
pub enum DirectReason {
    /// The store cannot hold it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store holds (or is downloading) the same digest from another registry: those bytes
    /// are never served for this one, which gets its own fetch.
    #[error("the store holds blob {digest} from registry {held}, not from {asked}; reading it from {asked} without storing it")]
    OtherRegistry { digest: Digest, held: String, asked: String },
}

impl Engine {
    /// An engine storing into `store`, fetching through `registry`, registering its metrics.
    pub fn new(store: Store, registry: Arc<RegistryClient>, rate_limit: u64, metrics: &Metrics) -> Engine {
        let m = EngineMetrics::default();
        metrics.register("origin_bytes", "Bytes downloaded from origin registries", m.origin_bytes.clone());
        metrics.register("served_bytes", "Blob bytes handed to readers", m.served_bytes.clone());
        metrics.register("tasks_started", "Blob downloads started", m.tasks_started.clone());
        metrics.register("tasks_completed", "Blob downloads completed and verified", m.tasks_completed.clone());
        metrics.register("tasks_failed", "Blob downloads that failed", m.tasks_failed.clone());
        metrics.register("direct_reads", "Reads served straight from the origin, bypassing the store", m.direct_reads.clone());
        metrics.register("active_tasks", "Blob downloads in progress", m.active_tasks.clone());
        metrics.register("peer_bytes_received", "Piece bytes fetched from other hosts and verified", m.peer_bytes_received.clone());
        metrics.register("peer_bytes_sent", "Piece bytes sent to other hosts", m.peer_bytes_sent.clone());
        metrics.register(
            "peer_bytes_duplicate",
            "Piece bytes fetched from a peer after another copy of the piece was stored (the endgame)",
            m.peer_bytes_duplicate.clone(),
        );
        metrics.register(
            "peer_busy_refusals",
            "Piece requests answered busy (no free upload slot, or a piece a seed has just sent)",
            m.peer_busy_refusals.clone(),
        );
        metrics.register(
            "peer_refusals",
            "Piece requests and subscriptions refused: a task not held here from the registry named, or a private blob asked for without mutual TLS",
            m.peer_refusals.clone(),
        );
        metrics.register(
            "peer_fetches_abandoned",
            "Piece fetches from a peer cancelled because another parent's copy arrived first",
            m.peer_fetches_abandoned.clone(),
        );
        metrics.register("peer_updates_sent", "Piece updates sent to subscribed hosts", m.peer_updates_sent.clone());
        metrics.register(
            "pieces_forgotten",
            "Stored pieces of range-read blobs dropped because a reader asked for them again with Cache-Control: no-cache (they did not verify downstream)",
            m.pieces_forgotten.clone(),
        );
        metrics.register(
            "peer_updates_unneeded",
            "Piece updates received that named only pieces this host already had",
            m.peer_updates_unneeded.clone(),
        );
        Engine {
            store,
            registry,
            limiter: (rate_limit > 0).then(|| Arc::new(RateLimiter::new(rate_limit))),
            tasks: Mutex::new(HashMap::new()),
            p2p: std::sync::OnceLock::new(),
            opening: tokio::sync::Mutex::new(()),
            metrics: m,
        }
    }

    /// Turns on peer-to-peer downloads: whole-blob downloads ask the scheduler for parents.
    /// The cluster this engine downloads through, when P2P is on.
    pub fn p2p(&self) -> Option<&Arc<crate::p2p::P2p>> {
        self.p2p.get()
    }

    pub fn enable_p2p(&self, p2p: Arc<crate::p2p::P2p>) {
        let _ = self.p2p.set(p2p);
    }

    /// The content store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The registry client.
    pub fn registry(&self) -> &Arc<RegistryClient> {
        &self.registry
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<TaskId, Arc<Task>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tasks currently downloading: id, pieces present, pieces in all.
    pub fn active(&self) -> Vec<(TaskId, u32, u32)> {
        self.tasks().values().map(|t| (t.id.clone(), t.progress().0, t.progress().1)).collect()
    }

    /// Syncs every downloading task's pieces and bitmap to disk (at shutdown), so a restart resumes.
    pub async fn flush_all(&self) {
        let files: Vec<Arc<TaskFile>> = self.tasks().values().map(|t| t.file.clone()).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for f in files {
                if let Err(e) = f.flush() {
                    warn!(task = %f.id(), error = %e, "cannot save download progress");
                }
            }
        })
        .await;
    }

    /// The task `id` if this host is downloading it or has it.
    pub fn shared(&self, id: &TaskId) -> Option<Shared> {
        if let Some(t) = self.tasks().get(id).cloned() {
            return Some(Shared { file: t.file.clone(), task: Some(t) });
        }
        self.store.complete(id).map(|file| Shared { file, task: None })
    }

    /// The length of a blob already known locally (stored or downloading) from `registry`, if any.
    pub fn known_len(&self, registry: &str, digest: &Digest) -> Option<u64> {
        let id = TaskId::of_digest(digest);
        if let Some(t) = self.tasks().get(&id) {
            return (t.registry == registry).then(|| t.len());
        }
        self.store.complete_len_from(&id, registry)
    }

    /// The task holding `origin`'s blob, complete or downloading the whole blob, if this host has
    /// one from the same registry; never creates one. (A `Range` read of anything else by a reader
    /// that does not check what it reads goes to the origin: a sparse task's pieces are not
    /// checked against the blob's digest.)
    pub fn existing(&self, origin: &Origin) -> Option<Arc<Task>> {
        let id = TaskId::of_digest(&origin.digest);
        let running = self.tasks().get(&id).cloned();
        if let Some(t) = running {
            let usable = t.registry == origin.registry && t.state().driving;
            return usable.then_some(t);
        }
        let file = self.store.complete(&id).filter(|f| f.registry().as_deref() == Some(origin.registry.as_str()))?;
        let layout = file.layout();
        Some(Arc::new(self.new_task(id, origin, layout, file, true)))
    }

    /// The task for a checked `Range` read of `origin`'s blob of `len` bytes, with the pieces covering
    /// `bytes` wanted: a complete or whole download as is; otherwise a **sparse** task that fetches
    /// just those pieces (from peers the scheduler names, else the origin) and keeps them. `None`
    /// when the range must come straight from the origin: the store cannot hold the blob, or holds
    /// it from another registry.
    ///
    /// With `fresh` (the client sent `Cache-Control: no-cache`: a lazy mount whose chunk did not
    /// match its digest), the pieces covering `bytes` of an incomplete task are forgotten here and
    /// at the scheduler, and the range comes from the origin.
    pub async fn open_for_range(
        self: &Arc<Self>,
        origin: &Origin,
        len: u64,
        bytes: Range<u64>,
        public: bool,
        fresh: bool,
    ) -> Option<Arc<Task>> {
        if fresh {
            self.forget_range(origin, bytes).await;
            return None;
        }
        match self.open_task(origin, len, false).await {
            Opened::Task(task) => {
                if public {
                    self.mark_public(&task);
                }
                self.want(&task, bytes);
                Some(task)
            }
            Opened::Direct(e) => {
                debug!(digest = %origin.digest, error = %e, "range read straight from the origin");
                None
            }
        }
    }

    /// Forgets the pieces covering `bytes` of `origin`'s blob if this host holds them in an
    /// incomplete task (a complete one was checked against the blob's digest), and tells the
    /// scheduler that they are bad.
    async fn forget_range(self: &Arc<Self>, origin: &Origin, bytes: Range<u64>) {
        let id = TaskId::of_digest(&origin.digest);
        let Some(task) = self.tasks().get(&id).cloned() else { return };
        if task.registry != origin.registry || bytes.is_empty() {
            return;
        }
        let forgotten: Vec<u32> = {
            let st = task.state();
            if !matches!(st.status, Status::Running) {
                return;
            }
            task.layout.covering(bytes).filter(|&n| task.file.has_piece(n) && !st.inflight.has(n)).collect()
        };
        if forgotten.is_empty() {
            return;
        }
        // The running sha256 may have seen the forgotten bytes: it starts again before them.
        task.rewind_hash(task.layout.range(forgotten[0]).start);
        let file = task.file.clone();
        let dropped = forgotten.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || file.forget_pieces(&dropped)).await {
            warn!(task = %task.id, error = %e, "cannot forget pieces a reader found bad");
        }
        warn!(task = %task.id, pieces = ?forgotten, "a reader found these pieces bad; forgotten, and read from the origin");
        self.metrics.pieces_forgotten.inc_by(forgotten.len() as u64);
        if let Some(p2p) = self.p2p.get() {
            crate::sparse::report(p2p, &task, Vec::new(), forgotten, Vec::new()).await;
        }
    }

    /// Wants the pieces covering `bytes` of a sparse task: those neither here nor being fetched
    /// are claimed and fetched in the background (see [`crate::sparse`]). A complete task or a
    /// whole download needs nothing.
    pub(crate) fn want(self: &Arc<Self>, task: &Arc<Task>, bytes: Range<u64>) {
        let wanted: Vec<u32> = {
            let mut st = task.state();
            if !matches!(st.status, Status::Running) || st.driving {
                return;
            }
            st.last_want = std::time::Instant::now();
            if !std::mem::replace(&mut st.idle_watched, true) {
                self.retire_when_idle(task.clone());
            }
            let have = task.file.bitmap();
            let wanted: Vec<u32> = task.layout.covering(bytes).filter(|&n| !have.has(n) && !st.inflight.has(n)).collect();
            for &n in &wanted {
                st.inflight.set(n);
            }
            wanted
        };
        if wanted.is_empty() {
            return;
        }
        let (engine, task2) = (self.clone(), task.clone());
        let span = tracing::info_span!("sparse", task = %task.id);
        tokio::spawn(async move { crate::sparse::fetch(&engine, &task2, wanted).await }.instrument(span));
    }

    /// Retires a sparse task once no read has wanted it for [`SPARSE_IDLE`] and nothing fetches
    /// it: its store handle closes, so its pieces count as evictable again. One watch per task,
    /// started by its first want; it ends when the task completes, fails or is read whole.
    fn retire_when_idle(self: &Arc<Self>, task: Arc<Task>) {
        let engine = self.clone();
        tokio::spawn(async move {
            loop {
                let wait = {
                    let st = task.state();
                    if !matches!(st.status, Status::Running) || st.driving {
                        return;
                    }
                    match SPARSE_IDLE.checked_sub(st.last_want.elapsed()) {
                        Some(wait) if !wait.is_zero() => wait,
                        // Idle, but a fetch still runs: look again shortly.
                        _ if st.inflight.count() > 0 => std::time::Duration::from_secs(1),
                        _ => break,
                    }
                };
                tokio::time::sleep(wait).await;
            }
            let _ = task.file.flush();
            debug!(task = %task.id, pieces = task.file.bitmap().count(), "sparse task idle; retired");
            engine.retire(&task);
        });
    }

    /// Records that `task`'s registry answered its digest without credentials.
    pub(crate) fn mark_public(&self, task: &Task) {
        if let Err(e) = task.file.set_origin(&task.registry, true) {
            warn!(task = %task.id, error = %e, "cannot record that the blob is public");
        }
    }

    /// Asks `task`'s registry, without credentials, whether anyone may read the blob; records a yes.
    pub(crate) async fn probe_public(&self, task: &Task) -> bool {
        if task.is_public() {
            return true;
        }
        let o = task.origin();
        let mut head = Request::blob(&o.registry, &o.repository, &o.digest);
        head.method = http::Method::HEAD;
        let public = self.registry.send_anonymous(&head).await.is_ok_and(|r| r.status().is_success());
        if public {
            self.mark_public(task);
        }
        public
    }

    fn new_task(&self, id: TaskId, origin: &Origin, layout: PieceLayout, file: Arc<TaskFile>, complete: bool) -> Task {
        Task {
            id,
            digest: origin.digest.clone(),
            registry: origin.registry.clone(),
            layout,
            state: Mutex::new(TaskState {
                inflight: Bitmap::new(layout.count()),
                status: if complete { Status::Complete } else { Status::Running },
                driving: complete,
                last_want: std::time::Instant::now(),
                idle_watched: false,
                origin: origin.clone(),
            }),
            file,
            changed: watch::channel(()).0,
            reporter: Mutex::new(None),
            sourced: Mutex::new(Bitmap::new(layout.count())),
            sha: Mutex::new((0, sha2::Sha256::new())),
            public_probe: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether `shared` may go to hosts that are not authenticated cluster members: its registry
    /// answered the digest without credentials. A downloading task not yet known to be public is
    /// asked about (at most every [`PUBLIC_PROBE_EVERY`]): a seed that has just started a task for
    /// a child does not know yet.
    pub async fn shareable(&self, shared: &Shared) -> bool {
        if shared.is_public() {
            return true;
        }
        let Some(task) = shared.task.as_ref() else { return false };
        let mut last = task.public_probe.lock().await;
        if last.is_some_and(|at| at.elapsed() < PUBLIC_PROBE_EVERY) {
            return task.is_public();
        }
        *last = Some(std::time::Instant::now());
        self.probe_public(task).await
    }

    /// Opens the task for `origin`'s blob of `len` bytes, to be read or fetched whole: a completed
    /// one from the store, the one already downloading (singleflight), or a new one resuming
    /// whatever pieces are on disk. A sparse task of the same digest from another registry gives
    /// way: its pieces were never checked against the digest, and this download's will be.
    pub async fn open(self: &Arc<Self>, origin: &Origin, len: u64) -> Opened {
        self.open_task(origin, len, true).await
    }

    /// [`Engine::open`]; with `displace`, a sparse task from another registry is dropped for a new one.
    async fn open_task(self: &Arc<Self>, origin: &Origin, len: u64, displace: bool) -> Opened {
        let id = TaskId::of_digest(&origin.digest);
        if displace {
            self.displace_sparse(&id, &origin.registry);
        }
        let other_registry = |held: &str| {
            Opened::Direct(DirectReason::OtherRegistry { digest: origin.digest.clone(), held: held.into(), asked: origin.registry.clone() })
        };
        if let Some(t) = self.tasks().get(&id).cloned() {
            if t.registry != origin.registry {
                return other_registry(&t.registry);
            }
            t.state().origin = origin.clone();
            return Opened::Task(t);
        }
        let _opening = self.opening.lock().await;
        if let Some(t) = self.tasks().get(&id).cloned() {
            if t.registry != origin.registry {
                return other_registry(&t.registry);
            }
            return Opened::Task(t);
        }
        let layout = PieceLayout::for_len(len);
        let store = self.store.clone();
        let open_id = id.clone();
        let registry = origin.registry.clone();
        let file = tokio::task::spawn_blocking(move || open_file(&store, &open_id, layout, &registry, displace)).await;
        let file = match file {
            Ok(Ok(Ok(f))) => f,
            Ok(Ok(Err(held))) => return other_registry(&held),
            Ok(Err(e)) => {
                warn!(task = %id, error = %e, "cannot store blob; serving it straight from the origin");
                return Opened::Direct(e.into());
            }
            Err(e) => return Opened::Direct(StoreError::Io { path: "store".into(), source: std::io::Error::other(e) }.into()),
        };
        let complete = file.is_complete();
        let mut tasks = self.tasks();
        if let Some(t) = tasks.get(&id).cloned() {
            return Opened::Task(t);
        }
        let task = Arc::new(self.new_task(id.clone(), origin, layout, file, complete));
        if !complete {
            tasks.insert(id.clone(), task.clone());
            self.metrics.active_tasks.inc();
            self.metrics.tasks_started.inc();
            if task.file.bitmap().is_full() {
                // Every piece survived a restart but the check did not run yet.
                drop(tasks);
                task.state().driving = true;
                self.spawn_verify(task.clone());
            }
        }
        Opened::Task(task)
    }

    /// Drops the running sparse task `id` if it is from a registry other than `registry`.
    fn displace_sparse(&self, id: &TaskId, registry: &str) {
        let Some(t) = self.tasks().get(id).cloned() else { return };
        let sparse = {
            let st = t.state();
            matches!(st.status, Status::Running) && !st.driving
        };
        if sparse && t.registry != registry {
            info!(task = %id, held = %t.registry, asked = registry, "a whole download from another registry replaces a sparse task");
            self.stop(&t, EngineError::origin(format!("replaced by a whole download of the blob from {registry}")), true);
        }
    }

    /// A reader of `range` of the task's blob. With `whole`, fetches the whole blob and holds back
    /// the last piece until the digest is checked, so a client never receives a complete body with
    /// wrong content. Without, the reader waits for the pieces the range needs (wanted with
    /// [`Engine::want`] on a sparse task); one that nothing fetches any more sends it to the origin.
    pub fn reader(self: &Arc<Self>, task: Arc<Task>, range: Range<u64>, whole: bool) -> BlobReader {
        if whole {
            self.start(&task);
        }
        let rx = task.changed.subscribe();
        let origin = task.state().origin.clone();
        BlobReader { engine: self.clone(), source: Source::Task { task, rx }, origin, pos: range.start, end: range.end, whole }
    }

    /// A reader straight from the origin, for blobs the store cannot hold or must not keep.
    pub fn direct_reader(self: &Arc<Self>, origin: Origin, range: Range<u64>) -> BlobReader {
        BlobReader { engine: self.clone(), source: Source::Idle, origin, pos: range.start, end: range.end, whole: false }
    }

    /// Starts downloading the whole task (once): from peers when P2P is on, else from the origin.
    pub fn start(self: &Arc<Self>, task: &Arc<Task>) {
        let runs = {
            let mut st = task.state();
            if !matches!(st.status, Status::Running) || st.driving {
                return;
            }
            st.driving = true;
            let mut busy = task.file.bitmap();
            for n in 0..task.layout.count() {
                if st.inflight.has(n) {
                    busy.set(n);
                }
            }
            let runs = busy.missing_runs(0..task.layout.count());
            for run in &runs {
                for n in run.clone() {
                    st.inflight.set(n);
                }
            }
            runs
        };
        if let Some(p2p) = self.p2p.get() {
            let (engine, task, p2p) = (self.clone(), task.clone(), p2p.clone());
            let span = tracing::info_span!("p2p", task = %task.id);
            tokio::spawn(async move { p2p.drive(engine, task).await }.instrument(span));
            return;
        }
        for run in runs {
            self.spawn_fetch_run(task, run);
        }
    }

    /// Opens the task for `origin`'s blob of `len` bytes and starts fetching all of it, for a
    /// child or a preheat job rather than a reader.
    pub async fn fetch_ahead(self: &Arc<Self>, origin: &Origin, len: u64) -> Result<Arc<Task>, DirectReason> {
        match self.open(origin, len).await {
            Opened::Task(task) => {
                self.start(&task);
                Ok(task)
            }
            Opened::Direct(e) => Err(e),
        }
    }

    /// Fetches `run` (claimed by the caller) from the origin in the background.
    pub(crate) fn spawn_fetch_run(self: &Arc<Self>, task: &Arc<Task>, run: Range<u32>) -> tokio::task::JoinHandle<()> {
        let engine = self.clone();
        let task = task.clone();
        let span = tracing::info_span!("fetch", task = %task.id, pieces = ?run);
        tokio::spawn(async move { engine.fetch_run(task, run).await }.instrument(span))
    }

    /// Fetches a run of consecutive pieces from the origin (see [`Engine::fetch_from_origin`]);
    /// failing fails the task.
    pub(crate) async fn fetch_run(self: Arc<Self>, task: Arc<Task>, run: Range<u32>) {
        if let Err((_, err)) = self.fetch_from_origin(&task, run).await {
            let store_failed = matches!(err, OriginError::Store(_));
            self.fail(&task, err.to_engine(), store_failed);
        }
    }

    /// Fetches a run of consecutive pieces (claimed by the caller) from the origin with one ranged
    /// request, resuming after the last finished piece when the connection breaks, up to the
    /// configured retries. On failure, returns the first piece not fetched and why.
    pub(crate) async fn fetch_from_origin(self: &Arc<Self>, task: &Arc<Task>, run: Range<u32>) -> Result<(), (u32, OriginError)> {
        let mut next = run.start;
        let mut failures = 0u32;
        let retries = self.registry.retries();
        while next < run.end {
            match self.fetch_pieces(task, next..run.end).await {
                Ok(()) => return Ok(()),
                Err((done_up_to, err)) => {
                    task.rewind_hash(task.layout.range(done_up_to).start);
                    if done_up_to > next {
                        failures = 0;
                    }
                    next = done_up_to;
                    failures += 1;
                    let give_up = match &err {
                        OriginError::Retry(_) => failures > retries,
                        OriginError::Fatal(_) | OriginError::Store(_) => true,
                    };
                    if give_up {
                        return Err((next, err));
                    }
                    let delay = shoal_core::registry::backoff(failures);
                    debug!(task = %task.id, error = %err.to_engine(), ?delay, "origin stream broke; resuming");
                    tokio::time::sleep(delay).await;
                }
            }
        }
        Ok(())
    }

    /// Gives up the claims on `pieces` of a sparse task that could not be fetched: the readers
    /// waiting for them go to the origin themselves. If a whole read has started the task since,
    /// it counts on every claimed piece arriving: they stay claimed and are fetched from the
    /// origin for it.
    pub(crate) fn release(self: &Arc<Self>, task: &Arc<Task>, pieces: impl IntoIterator<Item = u32>) {
        let mut released: Vec<u32> = pieces.into_iter().filter(|&n| !task.file.has_piece(n)).collect();
        released.sort_unstable();
        let driving = {
            let mut st = task.state();
            let driving = st.driving && matches!(st.status, Status::Running);
            if !driving {
                for &n in &released {
                    st.inflight.unset(n);
                }
            }
            driving
        };
        if driving {
            for run in crate::sparse::runs(&released) {
                self.spawn_fetch_run(task, run);
            }
        }
        task.notify();
    }

    /// One ranged GET for `pieces`. On error, returns the first piece not finished.
    async fn fetch_pieces(self: &Arc<Self>, task: &Arc<Task>, pieces: Range<u32>) -> Result<(), (u32, OriginError)> {
        let layout = task.layout;
        let start = layout.range(pieces.start).start;
        let end = layout.range(pieces.end - 1).end;
        let mut req = task.state().origin.request();
        req.range = Some((start, end));
        let resp = self.registry.send(&req).await.map_err(|e| (pieces.start, OriginError::Retry(e.to_string())))?;
        let status = resp.status();
        // A registry that ignores Range answers 200 with the whole blob: skip to where we are.
        let mut skip = match status {
            StatusCode::PARTIAL_CONTENT => 0,
            StatusCode::OK => start,
            s if s.is_client_error() => return Err((pieces.start, OriginError::Fatal(RegistryError::from_status(&req, s).to_string()))),
            s => return Err((pieces.start, OriginError::Retry(RegistryError::from_status(&req, s).to_string()))),
        };
        let mut body = resp.bytes_stream();
        // Two stages: this loop receives while the blocking pool writes and hashes the previous
        // chunk (one write in flight, so chunks land in order).
        let mut n = pieces.start;
        let mut confirmed = pieces.start;
        let mut offset = start;
        let piece_hasher = Arc::new(Mutex::new(blake3::Hasher::new()));
        let mut buf: Vec<u8> = Vec::with_capacity(WRITE_CHUNK);
        let mut buf_offset = start;
        let mut in_flight: Option<tokio::task::JoinHandle<Result<Option<u32>, StoreError>>> = None;
        while n < pieces.end {
            let chunk = match body.next().await {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    let err = OriginError::Retry(format!("origin stream for {}: {}", task.digest, shoal_core::registry::error_chain(&e)));
                    return Err(self.settle(task, in_flight, &mut confirmed).await.map_or_else(|e| e, |()| (confirmed, err)));
                }
                None => {
                    let err = OriginError::Retry(format!("origin closed the stream for {} early", task.digest));
                    return Err(self.settle(task, in_flight, &mut confirmed).await.map_or_else(|e| e, |()| (confirmed, err)));
                }
            };
            let mut chunk = &chunk[..];
            if skip > 0 {
                let s = skip.min(chunk.len() as u64) as usize;
                skip -= s as u64;
                chunk = &chunk[s..];
            }
            if let Some(l) = &self.limiter {
                l.acquire(chunk.len() as u64).await;
            }
            self.metrics.origin_bytes.inc_by(chunk.len() as u64);
            while !chunk.is_empty() && n < pieces.end {
                let piece_end = layout.range(n).end;
                let take = ((piece_end - offset) as usize).min(chunk.len());
                buf.extend_from_slice(&chunk[..take]);
                offset += take as u64;
                chunk = &chunk[take..];
                let piece_done = offset == piece_end;
                if piece_done || buf.len() >= WRITE_CHUNK {
                    self.settle(task, in_flight.take(), &mut confirmed).await?;
                    let data = std::mem::replace(&mut buf, Vec::with_capacity(WRITE_CHUNK));
                    let at = std::mem::replace(&mut buf_offset, offset);
                    let (t, hasher, piece) = (task.clone(), piece_hasher.clone(), n);
                    in_flight = Some(tokio::task::spawn_blocking(move || {
                        t.hash_in_order(at, &data);
                        let mut h = hasher.lock().unwrap_or_else(|p| p.into_inner());
                        h.update(&data);
                        t.file.write_at(at, &data)?;
                        if !piece_done {
                            return Ok(None);
                        }
                        let digest = std::mem::take(&mut *h).finalize().to_hex().to_string();
                        t.file.piece_written(piece, digest)?;
                        Ok(Some(piece))
                    }));
                    if piece_done {
                        n += 1;
                    }
                }
            }
        }
        self.settle(task, in_flight, &mut confirmed).await
    }

    /// Waits for a write job; records its finished piece, or says which piece failed.
    async fn settle(
        self: &Arc<Self>,
        task: &Arc<Task>,
        job: Option<tokio::task::JoinHandle<Result<Option<u32>, StoreError>>>,
        confirmed: &mut u32,
    ) -> Result<(), (u32, OriginError)> {
        let Some(job) = job else { return Ok(()) };
        match job.await {
            Ok(Ok(Some(piece))) => {
                task.sourced.lock().unwrap_or_else(|p| p.into_inner()).set(piece);
                self.piece_finished(task, piece);
                *confirmed = piece + 1;
                Ok(())
            }
            Ok(Ok(None)) => Ok(()),
            Ok(Err(e)) => Err((*confirmed, OriginError::Store(e.to_string()))),
            Err(e) => Err((*confirmed, OriginError::Store(e.to_string()))),
        }
    }

    /// Records that piece `n` is in the store: wakes readers, reports it, and checks the whole
    /// blob once it is the last.
    pub(crate) fn piece_finished(self: &Arc<Self>, task: &Arc<Task>, n: u32) {
        task.state().inflight.unset(n);
        if let Some(tx) = task.reporter.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(n);
        }
        task.notify();
        if task.file.bitmap().is_full() {
            self.spawn_verify(task.clone());
        }
    }

    /// Checks the whole blob against its digest (reading back only what the running hash did not
    /// see), then marks the task complete or deletes it.
    fn spawn_verify(self: &Arc<Self>, task: Arc<Task>) {
        let engine = self.clone();
        tokio::spawn(async move {
            let t = task.clone();
            let checked = tokio::task::spawn_blocking(move || {
                let (pos, sha) = std::mem::take(&mut *t.sha.lock().unwrap_or_else(|p| p.into_inner()));
                finish_hash(&t.file, pos, sha)
            })
            .await
            .unwrap_or_else(|e| Err(StoreError::Io { path: task.id.as_str().into(), source: std::io::Error::other(e) }));
            let actual = match checked {
                Ok(actual) => actual,
                Err(e) => return engine.fail(&task, EngineError::Store(e.to_string().into()), true),
            };
            if actual != task.digest {
                return engine.fail(&task, EngineError::DigestMismatch { digest: task.digest.clone(), actual }, true);
            }
            // Readers may go on at once: the bytes are right and in the page cache. Syncing them to
            // disk before the store records the task complete happens behind their back.
            task.state().status = Status::Complete;
            task.notify();
            let file = task.file.clone();
            match tokio::task::spawn_blocking(move || file.mark_complete()).await {
                Ok(Ok(())) => {
                    info!(task = %task.id, bytes = task.layout.len, "blob complete and verified");
                    engine.metrics.tasks_completed.inc();
                }
                Ok(Err(e)) => {
                    warn!(task = %task.id, error = %e, "cannot record the completed blob; dropping it from the store");
                    engine.store.remove(&task.id);
                }
                Err(e) => warn!(task = %task.id, error = %e, "cannot record the completed blob"),
            }
            engine.retire(&task);
        });
    }

    /// Removes a finished task from the active set.
    fn retire(&self, task: &Arc<Task>) {
        let mut tasks = self.tasks();
        if tasks.get(&task.id).is_some_and(|t| Arc::ptr_eq(t, task)) {
            tasks.remove(&task.id);
            self.metrics.active_tasks.dec();
        }
    }

    /// Counts `bytes` of verified piece data fetched from a peer.
    pub fn peer_received(&self, bytes: u64) {
        self.metrics.peer_bytes_received.inc_by(bytes);
    }

    /// Counts `bytes` of piece data sent to a peer.
    pub fn peer_sent(&self, bytes: u64) {
        self.metrics.peer_bytes_sent.inc_by(bytes);
    }

    /// Counts `bytes` of a piece that arrived from a peer after another copy was stored.
    pub fn peer_duplicate(&self, bytes: u64) {
        self.metrics.peer_bytes_duplicate.inc_by(bytes);
    }

    /// Counts a piece request answered busy.
    pub fn peer_busy_refusal(&self) {
        self.metrics.peer_busy_refusals.inc();
    }

    /// Counts a request refused because the task is not served to the requester.
    pub fn peer_refusal(&self) {
        self.metrics.peer_refusals.inc();
    }

    /// Counts piece fetches cancelled because another copy arrived first.
    pub fn peer_fetches_abandoned(&self, fetches: u64) {
        self.metrics.peer_fetches_abandoned.inc_by(fetches);
    }

    /// Counts a piece update received that named only pieces already here.
    pub fn peer_update_unneeded(&self) {
        self.metrics.peer_updates_unneeded.inc();
    }

    /// Counts a piece update sent to a subscriber.
    pub fn peer_update_sent(&self) {
        self.metrics.peer_updates_sent.inc();
    }

    /// Marks the task failed, wakes its readers (who fall back to the origin unless the content
    /// was bad), and deletes its bytes when they cannot be trusted or kept.
    pub(crate) fn fail(&self, task: &Arc<Task>, err: EngineError, delete: bool) {
        warn!(task = %task.id, error = %err, "task failed");
        if self.stop(task, err, delete) {
            self.metrics.tasks_failed.inc();
        }
    }

    /// Ends a running task with `err` (see [`Engine::fail`]); false if it was not running.
    fn stop(&self, task: &Arc<Task>, err: EngineError, delete: bool) -> bool {
        {
            let mut st = task.state();
            if !matches!(st.status, Status::Running) {
                return false;
            }
            st.status = Status::Failed(err);
        }
        self.retire(task);
        if delete {
            self.store.remove(&task.id);
        } else {
            // Keep what arrived so the next request resumes from it.
            let _ = task.file.flush();
        }
        task.notify();
        true
    }
}

/// Opens (or creates) the store file of task `id` cut by `layout`, for `registry`'s blob: a
/// complete one as is, an incomplete one re-checked piece by piece (pieces written before a crash
/// may be torn). A stored task whose registry is unknown was kept by an older version: it starts
/// over. `Ok(Err(held))` when the store holds the blob from registry `held`, not `registry`.
///
/// With `displace`, an incomplete task from another registry (sparse reads: pieces never checked
/// against the digest) is dropped and this one starts over.
fn open_file(
    store: &Store,
    id: &TaskId,
    layout: PieceLayout,
    registry: &str,
    displace: bool,
) -> Result<Result<Arc<TaskFile>, String>, StoreError> {
    if let Some(f) = store.complete(id).filter(|f| f.layout() == layout) {
        match f.registry() {
            Some(held) if held == registry => return Ok(Ok(f)),
            Some(held) => return Ok(Err(held)),
            None => {
                drop(f);
                store.remove(id);
            }
        }
    }
    // Stored under another piece size: cut anew (open_task does), not fetched again.
    let mut f = store.open_task(id, layout)?;
    match f.registry() {
        Some(held) if held != registry && displace && !f.is_complete() => {
            info!(task = %id, %held, asked = registry, "a whole download from another registry replaces stored sparse pieces");
            drop(f);
            store.remove(id);
            f = store.open_task(id, layout)?;
        }
        Some(held) if held != registry => return Ok(Err(held)),
        Some(_) => {}
        None if f.bitmap().count() > 0 => {
            drop(f);
            store.remove(id);
            f = store.open_task(id, layout)?;
        }
        None => {}
    }
    if f.bitmap().count() > 0 && !f.is_complete() {
        let dropped = f.verify_pieces()?;
        info!(task = %id, pieces = f.bitmap().count(), dropped, "resuming download from the store");
    }
    if f.registry().is_none() {
        f.set_origin(registry, false)?;
    }
    Ok(Ok(f))
}

/// Finishes the sha256 of a stored task whose first `off` bytes `hasher` has seen.
fn finish_hash(file: &TaskFile, mut off: u64, mut hasher: sha2::Sha256) -> Result<Digest, StoreError> {
    let len = file.layout().len;
    let mut buf = vec![0u8; (4 << 20).min((len - off.min(len)) as usize).max(1)];
    while off < len {
        let want = ((len - off) as usize).min(buf.len());
        let n = file.read_at(off, &mut buf[..want])?;
        if n == 0 {
            return Err(StoreError::Io { path: file.id().as_str().into(), source: std::io::ErrorKind::UnexpectedEof.into() });
        }
        hasher.update(&buf[..n]);
        off += n as u64;
    }
    Ok(Digest::from_hasher(hasher))
}

/// How one ranged fetch from the origin failed.
pub(crate) enum OriginError {
    /// Worth another try from where it stopped.
    Retry(String),
    /// The origin refused (4xx): retrying will not help.
    Fatal(String),
    /// The store could not take the bytes (disk full, I/O error).
    Store(String),
}

impl OriginError {
    pub(crate) fn to_engine(&self) -> EngineError {
        match self {
            OriginError::Retry(m) | OriginError::Fatal(m) => EngineError::Origin(m.as_str().into()),
            OriginError::Store(m) => EngineError::Store(m.as_str().into()),
        }
    }
}

/// Where a reader's bytes come from right now.
enum Source {
    /// The task's pieces in the store.
    Task { task: Arc<Task>, rx: watch::Receiver<()> },
    /// Straight from the origin (store unusable, or the task failed for a non-content reason).
    Direct(ByteStream),
    /// Not started yet; becomes `Direct` on first read.
    Idle,
}

/// Streams a byte range of one blob to one client.
pub struct BlobReader {
    engine: Arc<Engine>,
    source: Source,
    origin: Origin,
    pos: u64,
    end: u64,
    whole: bool,
}

impl BlobReader {
    /// The next chunk of bytes; `None` at the end of the range.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, EngineError>> {
        if self.pos >= self.end {
            return None;
        }
        let result = loop {
            match &mut self.source {
                Source::Task { task, rx } => {
                    rx.borrow_and_update();
                    match ready_bytes(task, self.pos, self.end, self.whole) {
                        Ready::Read(len) => break read_task(task, self.pos, len).await,
                        Ready::Failed(e) if e.is_integrity() => break Err(e),
                        Ready::Failed(e) => {
                            info!(task = %task.id, error = %e, offset = self.pos, "continuing straight from the origin");
                            self.source = Source::Idle;
                        }
                        Ready::Wait => {
                            if rx.changed().await.is_err() {
                                self.source = Source::Idle;
                            }
                        }
                    }
                }
                Source::Idle => match open_direct(self.engine.clone(), self.origin.clone(), self.pos..self.end).await {
                    Ok(stream) => self.source = Source::Direct(stream),
                    Err(e) => break Err(e),
                },
                Source::Direct(stream) => {
                    break match stream.next().await {
                        Some(Ok(b)) => {
                            let keep = (self.end - self.pos).min(b.len() as u64) as usize;
                            Ok(b.slice(..keep))
                        }
                        Some(Err(e)) => {
                            Err(EngineError::origin(format!("blob {}: {}", self.origin.digest, shoal_core::registry::error_chain(&e))))
                        }
                        None => Err(EngineError::origin(format!("origin closed the stream for {} early", self.origin.digest))),
                    }
                }
            }
        };
        if let Ok(b) = &result {
            self.pos += b.len() as u64;
            self.engine.metrics.served_bytes.inc_by(b.len() as u64);
        }
        Some(result)
    }
}

type ByteStream = std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Opens a ranged GET of `range` straight from the origin.
async fn open_direct(engine: Arc<Engine>, origin: Origin, range: Range<u64>) -> Result<ByteStream, EngineError> {
    engine.metrics.direct_reads.inc();
    let mut req = origin.request();
    req.range = Some((range.start, range.end));
    let resp = engine.registry.send(&req).await.map_err(EngineError::origin)?;
    let skip = match resp.status() {
        StatusCode::PARTIAL_CONTENT => 0,
        StatusCode::OK => range.start,
        s => return Err(EngineError::origin(RegistryError::from_status(&req, s))),
    };
    let stream = resp.bytes_stream();
    if skip == 0 {
        return Ok(Box::pin(stream));
    }
    let mut left = skip;
    Ok(Box::pin(stream.filter_map(move |r| {
        let out = match r {
            Ok(b) if left >= b.len() as u64 => {
                left -= b.len() as u64;
                None
            }
            Ok(b) => {
                let s = left as usize;
                left = 0;
                Some(Ok(b.slice(s..)))
            }
            Err(e) => Some(Err(e)),
        };
        std::future::ready(out)
    })))
}

enum Ready {
    /// This many bytes at the position can be read now.
    Read(usize),
    Wait,
    Failed(EngineError),
}

/// What a reader at `pos` may read now.
fn ready_bytes(task: &Task, pos: u64, end: u64, whole: bool) -> Ready {
    let st = task.state();
    let n = (pos / task.layout.piece_size) as u32;
    let last = n + 1 == task.layout.count();
    let present = task.file.has_piece(n);
    match &st.status {
        Status::Complete => {}
        Status::Failed(e) if !present || (whole && last) => return Ready::Failed(e.clone()),
        // A sparse fetch of this piece gave up (it went to the origin for its own reader).
        Status::Running if !present && !st.driving && !st.inflight.has(n) => {
            return Ready::Failed(EngineError::origin(format!("task {}: piece {n} is not being fetched", task.id)))
        }
        // The last piece of a whole-blob read waits for the digest check.
        _ if !present || (whole && last) => return Ready::Wait,
        _ => {}
    }
    let piece_end = task.layout.range(n).end.min(end);
    Ready::Read(((piece_end - pos) as usize).min(READ_CHUNK))
}

async fn read_task(task: &Arc<Task>, pos: u64, len: usize) -> Result<Bytes, EngineError> {
    let file = task.file.clone();
    let read = tokio::task::spawn_blocking(move || file.read_vec(pos, len).map(Bytes::from)).await;
    match read {
        Ok(Ok(b)) if !b.is_empty() => Ok(b),
        Ok(Ok(_)) => Err(EngineError::Store(format!("task {}: store file shorter than expected", task.id).into())),
        Ok(Err(e)) => Err(EngineError::Store(e.to_string().into())),
        Err(e) => Err(EngineError::Store(e.to_string().into())),
    }
}
