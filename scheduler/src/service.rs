//! The scheduler's gRPC service: a thin shell feeding announcements into [`Cluster`] and sending
//! its decisions back, plus the piece digests sources report, to every peer of the task; and
//! feeding sparse reads' wants and reports into [`SparseBook`], holding a want until some piece
//! is decided. Every call passes [`Guarded`] first, which lets it through only as [`Access`] allows.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::Stream;
use shoal_core::TaskId;
use shoal_proto::scheduler as pb;
use shoal_proto::scheduler::scheduler_server::{Scheduler, SchedulerServer};
use tokio::sync::{broadcast, mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::{Access, Caller, Refusal, Role};
use crate::cluster::{Cluster, ClusterError, Decision};
use crate::hosts::{HostId, HostInfo};
use crate::jobs::{Job, JobState};
use crate::manifests::{Manifest, ManifestBook};
use crate::parents::Limits;
use crate::sparse::{PieceSource, Report, SparseBook, SparseError};
use crate::traces::TraceBook;

/// Hosts silent for this long are dropped (they announce every few seconds).
pub const HOST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of preheated manifests kept in memory.
const MANIFEST_BUDGET: usize = 64 << 20;
/// Bytes of access traces kept in memory.
const TRACE_BUDGET: usize = 64 << 20;
/// How long a peer told to wait should wait before registering again.
const WAIT_MS: u32 = 200;
/// How long a want waits for some piece to be decided before every piece is decided at once
/// (busy holders handed out anyway, claimed pieces fetched from the origin too). Below the
/// agents' call timeout, and long enough for a claimant to fetch a piece from a near registry.
const WANT_WAIT: Duration = Duration::from_secs(3);
/// A waiting want looks again at least this often, so that leases ending by time are noticed.
const WANT_RECHECK: Duration = Duration::from_millis(100);
/// Refused calls are logged as a warning at most this often (a misconfigured host retries
/// every few seconds); the others are debug lines, counted in the next warning.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(60);

/// What the peer streams of a task are told besides their own decisions.
#[derive(Clone, Debug)]
enum TaskNote {
    /// A digest newly recorded, for every peer.
    Digest { number: u32, blake3: String },
    /// Where `owner`'s stripe now ends, for that peer only.
    StripeEnd { owner: HostId, end: u32 },
}

/// State shared by every RPC.
pub struct Service {
    cluster: Mutex<Cluster>,
    /// Hosts waiting for preheat work, and where to send it.
    watchers: Mutex<HashMap<HostId, mpsc::Sender<Result<pb::HostJob, Status>>>>,
    /// Preheat jobs by id.
    jobs: Mutex<HashMap<String, Job>>,
    /// Per task, where new digests and shortened stripes are announced to its peers' streams.
    notes: Mutex<HashMap<TaskId, broadcast::Sender<TaskNote>>>,
    /// Manifests of preheated images, for agents whose registry is down.
    manifests: Mutex<ManifestBook>,
    /// Access traces of mounted images, merged per image for cluster-learned prefetch.
    traces: Mutex<TraceBook>,
    /// Sparse reads: who holds and who fetches single pieces. Locked after `cluster` when both are.
    sparse: Mutex<SparseBook>,
    /// Woken on every sparse report and host removal, for the wants waiting on them.
    sparse_changed: Notify,
    started: Instant,
}

impl Service {
    /// A service with these limits.
    pub fn new(limits: Limits) -> Arc<Service> {
        Arc::new(Service {
            cluster: Mutex::new(Cluster::new(limits)),
            watchers: Mutex::new(HashMap::new()),
            jobs: Mutex::new(HashMap::new()),
            notes: Mutex::new(HashMap::new()),
            manifests: Mutex::new(ManifestBook::new(MANIFEST_BUDGET)),
            traces: Mutex::new(TraceBook::new(TRACE_BUDGET)),
            sparse: Mutex::new(SparseBook::new()),
            sparse_changed: Notify::new(),
            started: Instant::now(),
        })
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn traces(&self) -> MutexGuard<'_, TraceBook> {
        self.traces.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cluster(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sparse(&self) -> MutexGuard<'_, SparseBook> {
        self.sparse.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops host `id` from whole downloads and sparse reads, and wakes the wants waiting on it.
    fn remove_host(&self, c: &mut Cluster, id: &HostId) {
        c.leave_host(id);
        self.sparse().forget_host(id);
        self.sparse_changed.notify_waiters();
    }

    /// Listens for digests newly recorded for `task`, and for stripes shortened. Subscribing
    /// happens under the lock: a channel nobody listens to is dropped by the next subscriber of
    /// any task, so a sender handed out before its receiver existed could vanish and end a
    /// peer's stream at once.
    fn task_notes(&self, task: &TaskId) -> broadcast::Receiver<TaskNote> {
        let mut d = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        d.retain(|_, tx| tx.receiver_count() > 0);
        d.entry(task.clone()).or_insert_with(|| broadcast::channel(4096).0).subscribe()
    }

    /// Tells every peer stream of `task` about a newly recorded digest or a shortened stripe.
    fn publish(&self, task: &TaskId, note: TaskNote) {
        if let Some(tx) = self.notes.lock().unwrap_or_else(|p| p.into_inner()).get(task) {
            let _ = tx.send(note);
        }
    }

    /// Runs `decide` on the cluster, then tells the sources of `task` whose stripe it shortened
    /// (by splitting it for another source) where their stripe now ends.
    fn deciding<T>(&self, task: &TaskId, decide: impl FnOnce(&mut Cluster) -> T) -> T {
        let (out, ends) = {
            let mut c = self.cluster();
            let out = decide(&mut c);
            (out, c.take_stripe_ends(task))
        };
        for (owner, end) in ends {
            self.publish(task, TaskNote::StripeEnd { owner, end });
        }
        out
    }

    /// Drops hosts that stopped announcing.
    pub fn expire_hosts(&self) {
        let now = self.now();
        let mut c = self.cluster();
        for id in c.hosts().silent_since(now.saturating_sub(HOST_TIMEOUT.as_millis() as u64)) {
            info!(host = %id, "host stopped announcing; dropping it");
            self.remove_host(&mut c, &id);
        }
    }

    /// The command for a decision, with parents' addresses.
    fn command(&self, decision: Decision) -> pb::PeerCommand {
        use pb::peer_command::Command;
        let command = match decision {
            Decision::BackToSource(pieces) => Command::BackToSource(pb::BackToSource { first_piece: pieces.start, end_piece: pieces.end }),
            Decision::Wait => Command::Wait(pb::Wait { retry_after_ms: WAIT_MS }),
            Decision::Parents(ids) => {
                let c = self.cluster();
                Command::Parents(pb::Parents {
                    parents: ids
                        .into_iter()
                        .filter_map(|id| {
                            let h = c.hosts().get(&id)?;
                            Some(pb::Parent { host_id: id.0.clone(), peer_addr: h.info.addr.to_string(), seed: h.info.seed })
                        })
                        .collect(),
                })
            }
        };
        pb::PeerCommand { command: Some(command) }
    }

    /// Whether host `id` is known as a seed.
    fn is_seed(&self, id: &str) -> bool {
        self.cluster().hosts().get(&HostId(id.to_string())).is_some_and(|h| h.info.seed)
    }

    /// Refuses a call acting for host `id` when that host is a seed and the caller may not act
    /// for seeds.
    fn act_for<T>(&self, req: &Request<T>, id: &str) -> Result<(), Status> {
        caller(req)?.may_act_for(id, self.is_seed(id)).map_err(refused)
    }

    /// Every digest known for `task`.
    fn known_digests(&self, task: &TaskId) -> pb::PeerCommand {
        let c = self.cluster();
        let count = c.stat_task(task).map_or(0, |s| s.layout.count());
        let digests =
            (0..count).filter_map(|n| c.piece_digest(task, n).map(|d| pb::PieceDigest { number: n, blake3: d.to_string() })).collect();
        pb::PeerCommand { command: Some(pb::peer_command::Command::Digests(pb::PieceDigests { digests })) }
    }
}

/// Who made `req`, as [`Guarded`] found. A request that did not pass it is refused.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions().get::<Caller>().copied().ok_or_else(|| Status::internal("the call did not pass the scheduler's access check"))
}

/// The gRPC status of a refusal: `Unauthenticated` when no valid token came, else `PermissionDenied`.
fn refused(r: Refusal) -> Status {
    if r.unauthenticated() {
        Status::unauthenticated(r.to_string())
    } else {
        Status::permission_denied(r.to_string())
    }
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

fn task_id(s: &str) -> Result<TaskId, Status> {
    TaskId::parse(s).ok_or_else(|| bad(format!("invalid task id {s:?}")))
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<pb::PeerCommand, Status>> + Send>>;

/// The gRPC face of a [`Service`].
#[derive(Clone)]
pub struct Api(pub Arc<Service>);

impl std::ops::Deref for Api {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.0
    }
}

#[tonic::async_trait]
impl Scheduler for Api {
    async fn announce_host(&self, req: Request<pb::AnnounceHostRequest>) -> Result<Response<pb::AnnounceHostResponse>, Status> {
        let caller = caller(&req)?;
        let h = req.into_inner().host.ok_or_else(|| bad("host is required"))?;
        if h.id.is_empty() {
            return Err(bad("host id is empty"));
        }
        caller.may_announce(&h.id, h.seed, self.is_seed(&h.id)).map_err(refused)?;
        let addr: SocketAddr = h.peer_addr.parse().map_err(|_| bad(format!("peer_addr {:?} is not ip:port", h.peer_addr)))?;
        // An agent that does not say how many pieces it sends at once announced four children per
        // sending slot.
        let sending_slots = if h.sending_slots > 0 { h.sending_slots } else { h.upload_slots / 4 }.max(1);
        let info = HostInfo {
            id: HostId(h.id),
            addr,
            upload_slots: h.upload_slots.max(1),
            sending_slots,
            incarnation: h.incarnation,
            zone: h.zone,
            idc: h.idc,
            seed: h.seed,
        };
        debug!(host = %info.id, seed = info.seed, "host announced");
        let now = self.now();
        let id = info.id.clone();
        if self.cluster().announce_host(info, now) {
            self.sparse().forget_host(&id);
            info!(host = %id, "host restarted; what it held before is forgotten");
        }
        Ok(Response::new(pb::AnnounceHostResponse {}))
    }

    async fn leave_host(&self, req: Request<pb::LeaveHostRequest>) -> Result<Response<pb::LeaveHostResponse>, Status> {
        self.act_for(&req, &req.get_ref().host_id)?;
        let id = HostId(req.into_inner().host_id);
        info!(host = %id, "host left");
        self.remove_host(&mut self.cluster(), &id);
        Ok(Response::new(pb::LeaveHostResponse {}))
    }

    type AnnouncePeerStream = CommandStream;

    async fn announce_peer(&self, req: Request<Streaming<pb::PeerEvent>>) -> Result<Response<CommandStream>, Status> {
        let caller = caller(&req)?;
        let mut events = req.into_inner();
        let first = events.message().await?.ok_or_else(|| bad("empty stream"))?;
        let Some(pb::peer_event::Event::Register(reg)) = first.event else {
            return Err(bad("the first event of a peer stream must be Register"));
        };
        caller.may_act_for(&reg.host_id, self.is_seed(&reg.host_id)).map_err(refused)?;
        let task = task_id(&reg.task_id)?;
        let host = HostId(reg.host_id.clone());
        let decision = {
            let now = self.now();
            self.deciding(&task, |c| c.register(&task, reg.length, &host, now)).map_err(|e| match e {
                ClusterError::UnknownHost(_) => Status::failed_precondition(e.to_string()),
                e => bad(e),
            })?
        };
        debug!(task = %task, host = %host, ?decision, "peer registered");
        let (tx, rx) = mpsc::channel::<Result<pb::PeerCommand, Status>>(64);
        // Listen before reading what is known, so a digest recorded in between is not missed.
        let mut notes = self.task_notes(&task);
        let _ = tx.send(Ok(self.command(decision))).await;
        let _ = tx.send(Ok(self.known_digests(&task))).await;
        let svc = self.0.clone();
        tokio::spawn(async move {
            let mut finished = false;
            loop {
                tokio::select! {
                    note = notes.recv() => match note {
                        Ok(TaskNote::Digest { number, blake3 }) => {
                            let digests = vec![pb::PieceDigest { number, blake3 }];
                            let cmd = pb::PeerCommand { command: Some(pb::peer_command::Command::Digests(pb::PieceDigests { digests })) };
                            if tx.send(Ok(cmd)).await.is_err() { break; }
                        }
                        Ok(TaskNote::StripeEnd { owner, end }) if owner == host => {
                            let cmd = pb::PeerCommand { command: Some(pb::peer_command::Command::StripeEnd(pb::StripeEnd { end_piece: end })) };
                            if tx.send(Ok(cmd)).await.is_err() { break; }
                        }
                        Ok(TaskNote::StripeEnd { .. }) => {}
                        // Fell behind: resend everything known.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            if tx.send(Ok(svc.known_digests(&task))).await.is_err() { break; }
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    event = events.message() => {
                        let event = match event {
                            Ok(Some(e)) => e,
                            Ok(None) | Err(_) => break,
                        };
                        match svc.on_event(&task, &host, event) {
                            Ok(Some(reply)) => { if tx.send(Ok(reply)).await.is_err() { break; } }
                            Ok(None) => {}
                            Err(Ended) => { finished = true; break; }
                        }
                    }
                }
            }
            if !finished {
                // The stream broke without Done: the peer is gone for this task.
                let _ = svc.cluster().peer_failed(&task, &host);
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn stat_task(&self, req: Request<pb::StatTaskRequest>) -> Result<Response<pb::StatTaskResponse>, Status> {
        let task = task_id(&req.into_inner().task_id)?;
        let resp = match self.cluster().stat_task(&task) {
            Some(s) => pb::StatTaskResponse {
                known: true,
                length: s.layout.len,
                peers: s.peers as u32,
                done: s.done as u32,
                known_pieces: s.known_pieces,
            },
            None => pb::StatTaskResponse::default(),
        };
        Ok(Response::new(resp))
    }

    async fn preheat(&self, req: Request<pb::PreheatRequest>) -> Result<Response<pb::PreheatResponse>, Status> {
        let req = req.into_inner();
        for b in &req.blobs {
            b.digest.parse::<shoal_core::Digest>().map_err(bad)?;
            if !shoal_core::reference::is_registry_host(&b.registry) || !shoal_core::reference::is_repository(&b.repository) {
                return Err(bad(format!("invalid blob origin {}/{}", b.registry, b.repository)));
            }
            if b.length > crate::cluster::MAX_TASK_LEN {
                return Err(bad(format!("blob {} is too large", b.digest)));
            }
        }
        let all = match req.scope.as_str() {
            "" | "seeds" => false,
            "all" => true,
            other => return Err(bad(format!("scope {other:?} must be \"seeds\" or \"all\""))),
        };
        let targets: Vec<(HostId, mpsc::Sender<Result<pb::HostJob, Status>>)> = {
            let c = self.cluster();
            let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
            w.retain(|_, tx| !tx.is_closed());
            w.iter()
                .filter(|(id, _)| all || c.hosts().get(id).is_some_and(|h| h.info.seed))
                .map(|(id, tx)| (id.clone(), tx.clone()))
                .collect()
        };
        if targets.is_empty() {
            return Err(Status::failed_precondition(if all {
                "no host is connected to this scheduler"
            } else {
                "no seed is connected to this scheduler (run `shoal seed`, or preheat with scope \"all\")"
            }));
        }
        {
            let mut book = self.manifests.lock().unwrap_or_else(|p| p.into_inner());
            for m in req.manifests {
                let digest = m.digest.parse().map_err(bad)?;
                let manifest = Manifest { digest, media_type: m.media_type, body: m.body, public: m.public };
                book.record(&m.registry, &m.repository, &m.reference, manifest).map_err(bad)?;
            }
        }
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let job_id = format!("preheat-{}-{}", self.now(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let job = Job {
            blobs: req.blobs.iter().map(|b| (b.digest.clone(), b.length)).collect(),
            targets: targets.iter().map(|(id, _)| id.clone()).collect(),
            results: HashMap::new(),
        };
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).insert(job_id.clone(), job);
        info!(job = %job_id, blobs = req.blobs.len(), hosts = targets.len(), "preheat job started");
        for (_, tx) in &targets {
            for b in &req.blobs {
                let _ = tx.send(Ok(pb::HostJob { job_id: job_id.clone(), blob: Some(b.clone()) })).await;
            }
        }
        Ok(Response::new(pb::PreheatResponse { job_id }))
    }

    async fn job_status(&self, req: Request<pb::JobStatusRequest>) -> Result<Response<pb::JobStatusResponse>, Status> {
        let id = req.into_inner().job_id;
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let job = jobs.get(&id).ok_or_else(|| Status::not_found(format!("no preheat job {id:?} on this scheduler")))?;
        let (state, error) = match job.state() {
            JobState::Running => ("running", String::new()),
            JobState::Done => ("done", String::new()),
            JobState::Failed(e) => ("failed", e),
        };
        let blobs = job
            .blobs
            .iter()
            .map(|(digest, length)| pb::BlobProgress {
                digest: digest.clone(),
                length: *length,
                hosts_done: job.hosts_done(digest) as u32,
                hosts_total: job.targets.len() as u32,
            })
            .collect();
        Ok(Response::new(pb::JobStatusResponse { state: state.into(), blobs, error }))
    }

    type WatchJobsStream = Pin<Box<dyn Stream<Item = Result<pb::HostJob, Status>> + Send>>;

    async fn watch_jobs(&self, req: Request<pb::WatchJobsRequest>) -> Result<Response<Self::WatchJobsStream>, Status> {
        self.act_for(&req, &req.get_ref().host_id)?;
        let host = HostId(req.into_inner().host_id);
        if host.0.is_empty() {
            return Err(bad("host id is empty"));
        }
        let (tx, rx) = mpsc::channel(1024);
        self.watchers.lock().unwrap_or_else(|p| p.into_inner()).insert(host, tx);
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn report_job(&self, req: Request<pb::ReportJobRequest>) -> Result<Response<pb::ReportJobResponse>, Status> {
        self.act_for(&req, &req.get_ref().host_id)?;
        let r = req.into_inner();
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let job = jobs.get_mut(&r.job_id).ok_or_else(|| Status::not_found(format!("no preheat job {:?}", r.job_id)))?;
        let outcome = if r.ok { Ok(()) } else { Err(format!("{}: {}", r.host_id, r.error)) };
        job.results.insert((r.digest, HostId(r.host_id)), outcome);
        Ok(Response::new(pb::ReportJobResponse {}))
    }

    async fn get_manifest(&self, req: Request<pb::GetManifestRequest>) -> Result<Response<pb::GetManifestResponse>, Status> {
        let r = req.into_inner();
        let book = self.manifests.lock().unwrap_or_else(|p| p.into_inner());
        let manifest = book.get(&r.registry, &r.repository, &r.reference).map(|m| pb::Manifest {
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            reference: r.reference.clone(),
            digest: m.digest.to_string(),
            media_type: m.media_type.clone(),
            body: m.body.clone(),
            public: m.public,
        });
        Ok(Response::new(pb::GetManifestResponse { manifest }))
    }

    async fn report_trace(&self, req: Request<pb::ReportTraceRequest>) -> Result<Response<pb::ReportTraceResponse>, Status> {
        let r = req.into_inner();
        let paths = r.paths.len();
        let kept = self.traces().record(&r.image, &r.host_id, r.paths).map_err(|e| Status::invalid_argument(e.to_string()))?;
        debug!(image = %r.image, host = %r.host_id, paths, kept, "trace recorded");
        Ok(Response::new(pb::ReportTraceResponse { kept: kept as u32 }))
    }

    async fn get_trace(&self, req: Request<pb::GetTraceRequest>) -> Result<Response<pb::GetTraceResponse>, Status> {
        let (paths, traces) = self.traces().merged(&req.into_inner().image);
        Ok(Response::new(pb::GetTraceResponse { paths, traces: traces as u32 }))
    }

    async fn want_pieces(&self, req: Request<pb::WantPiecesRequest>) -> Result<Response<pb::WantPiecesResponse>, Status> {
        self.act_for(&req, &req.get_ref().host_id)?;
        let r = req.into_inner();
        let (task, host) = sparse_caller(&r.task_id, &r.host_id)?;
        let started = Instant::now();
        loop {
            // Listen before deciding, so a report landing in between still wakes this want.
            let changed = self.sparse_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let last_chance = started.elapsed() >= WANT_WAIT;
            let answer = self.want(&task, &host, r.length, &r.pieces, last_chance)?;
            if !answer.decided.is_empty() || answer.pending.is_empty() || last_chance {
                return Ok(Response::new(answer));
            }
            let _ = tokio::time::timeout(WANT_RECHECK, changed).await;
        }
    }

    async fn report_pieces(&self, req: Request<pb::ReportPiecesRequest>) -> Result<Response<pb::ReportPiecesResponse>, Status> {
        self.act_for(&req, &req.get_ref().host_id)?;
        let r = req.into_inner();
        let (task, host) = sparse_caller(&r.task_id, &r.host_id)?;
        let report = Report {
            finished: r.finished.into_iter().map(|p| (p.number, p.blake3)).collect(),
            invalid: r.invalid,
            failed: r.failed.into_iter().map(|f| (f.number, HostId(f.holder_host_id))).collect(),
        };
        let now = self.now();
        let reported = self.sparse().report(&task, &host, r.length, &report, now).map_err(sparse_status)?;
        self.sparse_changed.notify_waiters();
        debug!(
            task = %task,
            host = %host,
            finished = report.finished.len(),
            recorded = reported.recorded,
            invalid = report.invalid.len(),
            failed = report.failed.len(),
            "pieces reported"
        );
        if !report.invalid.is_empty() {
            info!(task = %task, host = %host, pieces = ?report.invalid, "pieces reported invalid; they come from the origin again");
        }
        if !reported.conflicting.is_empty() {
            warn!(task = %task, host = %host, pieces = ?reported.conflicting, "piece digests differ from the recorded ones; report ignored");
        }
        Ok(Response::new(pb::ReportPiecesResponse {}))
    }
}

/// The peer said Done or Failed: its stream is over.
struct Ended;

/// The task and host a sparse want or report names.
fn sparse_caller(task: &str, host: &str) -> Result<(TaskId, HostId), Status> {
    if host.is_empty() {
        return Err(bad("host id is empty"));
    }
    Ok((task_id(task)?, HostId(host.to_string())))
}

/// The gRPC status of a refused want or report.
fn sparse_status(e: SparseError) -> Status {
    match e {
        SparseError::UnknownHost(_) => Status::failed_precondition(e.to_string()),
        e => bad(e),
    }
}

impl Service {
    /// Decides what it can of `host`'s want, with the holders' addresses.
    fn want(&self, task: &TaskId, host: &HostId, length: u64, pieces: &[u32], last_chance: bool) -> Result<pb::WantPiecesResponse, Status> {
        let now = self.now();
        let c = self.cluster();
        let wanted = self.sparse().want(task, host, length, pieces, now, c.hosts(), last_chance).map_err(sparse_status)?;
        let origin = wanted.decided.iter().filter(|d| matches!(d, PieceSource::Origin { .. })).count();
        if !wanted.decided.is_empty() || last_chance {
            debug!(
                task = %task,
                host = %host,
                from_holders = wanted.decided.len() - origin,
                from_origin = origin,
                pending = wanted.pending.len(),
                last_chance,
                "pieces decided"
            );
        }
        let decided = wanted
            .decided
            .into_iter()
            .map(|d| match d {
                PieceSource::Origin { number } => pb::PieceSource { number, origin: true, ..Default::default() },
                PieceSource::Holders { number, blake3, holders } => pb::PieceSource {
                    number,
                    blake3,
                    holders: holders
                        .into_iter()
                        .filter_map(|id| {
                            let h = c.hosts().get(&id)?;
                            Some(pb::Parent { host_id: id.0, peer_addr: h.info.addr.to_string(), seed: h.info.seed })
                        })
                        .collect(),
                    origin: false,
                },
            })
            .collect();
        Ok(pb::WantPiecesResponse { decided, pending: wanted.pending })
    }

    fn on_event(&self, task: &TaskId, host: &HostId, event: pb::PeerEvent) -> Result<Option<pb::PeerCommand>, Ended> {
        use pb::peer_event::Event;
        let now = self.now();
        match event.event {
            Some(Event::Register(_)) => {
                // Registering again (after Wait) asks for a new decision.
                let decision = self.deciding(task, |c| c.schedule(task, host, now));
                Ok(decision.ok().map(|d| self.command(d)))
            }
            Some(Event::PieceFinished(p)) => {
                let recorded = {
                    let mut c = self.cluster();
                    let before = c.piece_digest(task, p.number).is_some();
                    c.piece_finished(task, host, p.number, &p.blake3).map(|()| !before && c.piece_digest(task, p.number).is_some())
                };
                match recorded {
                    Ok(true) => {
                        self.publish(task, TaskNote::Digest { number: p.number, blake3: p.blake3 });
                    }
                    Ok(false) => {}
                    Err(e) => warn!(task = %task, host = %host, error = %e, "piece report refused"),
                }
                Ok(None)
            }
            Some(Event::PieceFailed(f)) => {
                let parent = HostId(f.parent_host_id);
                info!(task = %task, child = %host, parent = %parent, piece = f.number, reason = %f.reason, unreachable = f.unreachable, "parent failed");
                let decision = self.deciding(task, |c| c.parent_failed(task, host, &parent, f.unreachable, now));
                Ok(decision.ok().map(|d| self.command(d)))
            }
            Some(Event::Done(_)) => {
                let _ = self.cluster().peer_done(task, host);
                Err(Ended)
            }
            Some(Event::Failed(f)) => {
                info!(task = %task, host = %host, reason = %f.reason, "peer failed");
                let _ = self.cluster().peer_failed(task, host);
                Err(Ended)
            }
            None => Ok(None),
        }
    }
}

/// The scheduler API behind its access check: each call goes on, with its [`Caller`] in the
/// request's extensions for the handlers' host checks, or is answered with the refusal before
/// any handler (or any of its request body) is touched.
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    access: Arc<Access>,
    refusals: Arc<RefusalLog>,
}

impl<S> Guarded<S> {
    /// `inner`, let through as `access` allows.
    pub fn new(inner: S, access: Access) -> Guarded<S> {
        Guarded { inner, access: Arc::new(access), refusals: Arc::new(RefusalLog::default()) }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

type HttpRequest = tonic::codegen::http::Request<tonic::body::Body>;
type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;

impl<S> tonic::codegen::Service<HttpRequest> for Guarded<S>
where
    S: tonic::codegen::Service<HttpRequest, Response = HttpResponse, Error = std::convert::Infallible>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<HttpResponse, std::convert::Infallible>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: HttpRequest) -> Self::Future {
        let authorization = req.headers().get(tonic::codegen::http::header::AUTHORIZATION).map(|v| v.as_bytes());
        match self.access.admit(req.uri().path(), authorization) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Err(refusal) => {
                let from = req.extensions().get::<tonic::transport::server::TcpConnectInfo>().and_then(|c| c.remote_addr());
                self.refusals.note(req.uri().path(), from, &refusal);
                let status = refused(refusal);
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// Refused calls, logged without flooding: a warning at most every [`REFUSAL_WARN_EVERY`],
/// debug lines in between.
#[derive(Default)]
struct RefusalLog {
    /// When the last warning went out, and calls refused since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl RefusalLog {
    fn note(&self, path: &str, from: Option<SocketAddr>, refusal: &Refusal) {
        let from = from.map_or_else(|| "an unknown address".to_string(), |a| a.to_string());
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if state.0.is_none_or(|last| now.duration_since(last) >= REFUSAL_WARN_EVERY) {
            let since = std::mem::take(&mut state.1);
            *state = (Some(now), 0);
            warn!(%from, call = path, refused_since_last_warning = since, "scheduler call refused: {refusal}");
        } else {
            state.1 += 1;
            debug!(%from, call = path, "scheduler call refused: {refusal}");
        }
    }
}

/// Why the scheduler could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} for the scheduler: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("scheduler server: {0}")]
    Server(#[from] tonic::transport::Error),
    #[error("[scheduler] {field}: {source}")]
    Token { field: &'static str, source: shoal_core::bearer::TokenError },
    #[error(transparent)]
    SharedToken(#[from] crate::auth::SharedToken),
}

/// The access the scheduler config asks for: a token per role whose file is set, or an open API
/// when none is.
pub fn access(config: &shoal_core::config::SchedulerConfig) -> Result<Access, ServeError> {
    let files =
        [(Role::Agent, &config.agent_token_file), (Role::Seed, &config.seed_token_file), (Role::Preheat, &config.preheat_token_file)];
    let mut tokens = Vec::new();
    for (role, file) in files {
        let Some(path) = file else { continue };
        let token =
            shoal_core::bearer::BearerToken::read(path).map_err(|source| ServeError::Token { field: role.token_field(), source })?;
        tokens.push((role, token));
    }
    Ok(Access::new(tokens)?)
}

/// Serves the scheduler API on `listener` until `shutdown`, to callers as `access` allows.
pub async fn serve(
    listener: tokio::net::TcpListener,
    limits: Limits,
    access: Access,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().ok();
    if access.is_open() {
        match addr {
            Some(a) if a.ip().is_loopback() => info!(addr = %a, "scheduler API open to every local caller (no [scheduler] token files)"),
            _ => warn!(
                addr = ?addr,
                "scheduler API open to anyone who reaches it: any caller can announce a fake seed (which is then sent \
                 clients' registry credentials) or preheat forged manifests; set [scheduler] agent_token_file, \
                 seed_token_file and preheat_token_file, or listen on loopback only"
            ),
        }
    } else {
        let roles: Vec<&str> = access.roles().iter().map(|r| r.name()).collect();
        info!(addr = ?addr, roles = ?roles, "scheduler API needs a bearer token");
    }
    let service = Service::new(limits);
    let expiry = service.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => expiry.expire_hosts(),
            }
        }
    });
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(Guarded::new(SchedulerServer::new(Api(service)), access))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Binds `addr` and serves until `shutdown`, to callers as `access` allows.
pub async fn run(addr: SocketAddr, limits: Limits, access: Access, shutdown: CancellationToken) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
    info!(%addr, "scheduler listening");
    serve(listener, limits, access, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(s: &str) -> TaskId {
        TaskId::of_url(&format!("http://origin/{s}").parse().unwrap())
    }

    #[test]
    fn a_peer_listening_for_digests_keeps_listening_while_other_tasks_come_and_go() {
        let svc = Service::new(Limits::default());
        let (a, b) = (task("a"), task("b"));
        let mut notes_a = svc.task_notes(&a);
        // Another task's peer arrives and leaves: that prunes idle channels, never a listened one.
        drop(svc.task_notes(&b));
        let _ = svc.task_notes(&task("c"));
        svc.publish(&a, TaskNote::Digest { number: 3, blake3: "x".into() });
        let note = notes_a.try_recv().expect("the listener of task a still gets its digests");
        assert!(matches!(note, TaskNote::Digest { number: 3, blake3 } if blake3 == "x"));
        // Publishing for a task nobody listens to is a no-op.
        svc.publish(&b, TaskNote::Digest { number: 0, blake3: "y".into() });
    }
}
