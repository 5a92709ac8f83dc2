//! Peer-to-peer downloads. A whole-blob download registers with the task's scheduler replica and
//! follows its decisions: fetch pieces from the parents it names (each piece checked against the
//! blake3 the scheduler relays from the host that fetched it from the origin), and fetch the
//! stripes of a cold task it is given from the origin, reporting every piece's digest for the
//! others. When the scheduler cannot be reached, or the parents stall, the rest comes from the
//! origin: P2P only ever makes a pull faster.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_core::piece::{stripe_request_pieces, Bitmap};
use shoal_core::TaskId;
use shoal_proto::scheduler as pb;
use shoal_proto::scheduler::peer_command::Command;
use shoal_proto::scheduler::peer_event::Event;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::engine::{Engine, Task};
use crate::peer::PeerClient;
use crate::schedulers::{Replica, Schedulers};

/// Pieces fetched from parents at once, per download. The pieces in flight share the node's
/// downlink (and their parents' uplinks, see the peer server's upload slots), so each takes about
/// as many times longer as there are of them, and a piece is passed on only once it is whole:
/// the fewer in flight, the sooner a new piece reaches the last node. 32 nodes on 2 Mbit/s links
/// finished at 1.14–1.18× the bound with 8 and 2 (and two upload slots per host), against
/// 1.23–1.24× with 16 and 4 (and four slots).
const MAX_FETCHES: usize = 8;
/// Pieces fetched from one parent at once, per download.
const MAX_PER_PARENT: usize = 2;
/// With parents, when for this long no piece arrived here, no parent got a new one and no new
/// piece left the origin (its digest reached us), the rest comes from the origin. Any of those
/// means the swarm is moving and this download's turn comes: in a large cluster on slow links a
/// node can wait longer than this for its first piece, and sending every such node to the origin
/// at once would swamp the registry.
const STALL: Duration = Duration::from_secs(15);
/// While fetching from parents, a download asks for a fresh set this often, so peers that joined
/// later (and have pieces to trade) become parents too.
const RESCHEDULE_EVERY: Duration = Duration::from_secs(2);
/// A piece in flight this long, and [`ENDGAME_SLOWER`] times as long as pieces usually take
/// here, may also be asked of a second parent once nothing else is left to start (the endgame).
const ENDGAME_AFTER: Duration = Duration::from_millis(700);
/// How many times the usual fetch time a piece must have taken before the endgame asks a second
/// parent for it. Both copies cross the child's downlink until the first is whole, so a second
/// request for a piece that is merely on time slows every other piece. On 2 Mbit/s links, where
/// a piece usually takes about 1 s, asking after a fixed 700 ms duplicated most of a node's last
/// pieces (about 5 % of the bytes crossing its downlink): 32 nodes finished at 1.37–1.43× the
/// bound in five runs, against 1.32–1.37× in four with this threshold.
const ENDGAME_SLOWER: f64 = 2.5;
/// Why a piece fetch from a parent did not store the piece.
#[derive(Debug)]
pub(crate) enum FetchError {
    /// The parent has no free upload slot: not a failure, try later.
    Busy,
    /// The parent does not serve this task to this host (see [`REFUSED_BACKOFF`]).
    Refused(String),
    /// The parent could not be reached, or the connection broke (a congested link, a dead host):
    /// this child moves on, but the parent is not blamed cluster-wide.
    Unreachable(String),
    /// The parent answered wrongly (bytes that do not match the digest, a wrong length, a refusal).
    Bad(String),
}

impl FetchError {
    fn of_peer(e: crate::peer::PeerError) -> FetchError {
        use crate::peer::{wire::WireError, PeerError};
        use shoal_proto::peer::Refusal;
        match e {
            PeerError::Refused { refusal: Refusal::Busy, .. } => FetchError::Busy,
            PeerError::Refused { refusal: Refusal::NotFound | Refusal::Forbidden, reason, .. } => FetchError::Refused(reason),
            e @ (PeerError::Connect { .. } | PeerError::Wire { source: WireError::Read(_) | WireError::Write(_), .. }) => {
                FetchError::Unreachable(e.to_string())
            }
            e => FetchError::Bad(e.to_string()),
        }
    }
}
/// How long a busy parent is left alone.
const BUSY_BACKOFF: Duration = Duration::from_millis(100);
/// A parent that refused this download's task (it does not hold it from the same registry, or
/// will not share a private blob without mutual TLS) is not asked again for this long, doubling
/// with each refusal up to [`REFUSED_MAX`]: the scheduler may keep naming it, and asking again at
/// once made tens of thousands of subscriptions a minute.
const REFUSED_BACKOFF: Duration = Duration::from_secs(1);
const REFUSED_MAX: Duration = Duration::from_secs(30);
/// Children a host takes per upload slot. Each child spreads its fetches over several parents and
/// a parent turns requests beyond its slots away ("busy"), so a parent can feed more children
/// than it has slots without slowing any piece down.
pub const CHILDREN_PER_UPLOAD_SLOT: usize = 4;
/// Most parents a download keeps: the scheduler's picks accumulate (a piece source is worth
/// keeping even when the scheduler now ranks others higher) up to this many. Each parent tells
/// the child of every piece it gets (a small packet and its acknowledgement per piece and
/// parent), so more parents than the choice needs cost downlink: with 16, such updates were
/// about 4 % of what crossed a node's downlink in a 32-node fan-out.
const MAX_PARENTS: usize = 10;
/// Where a download's events go to its scheduler replica.
type Events = mpsc::UnboundedSender<pb::PeerEvent>;
/// Hosts announce themselves this often.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);

/// Who this host is to the scheduler.
#[derive(Clone, Debug)]
pub struct P2pConfig {
    /// Host id (unique in the cluster).
    pub host_id: String,
    /// The peer server's address as other hosts reach it.
    pub advertise: SocketAddr,
    /// Scheduler replicas (`host:port`).
    pub schedulers: Vec<String>,
    /// Children the scheduler may give this host at once (they share its upload slots).
    pub max_children: u32,
    /// Pieces the peer server sends at once (`[peer] upload_slots`).
    pub sending_slots: u32,
    pub zone: String,
    pub idc: String,
    pub seed: bool,
    /// What this host presents to the scheduler (`[peer] scheduler_token_file`).
    pub credential: crate::schedulers::Credential,
}

/// Peer-to-peer state shared by every download of this host.
pub struct P2p {
    config: P2pConfig,
    /// Random for this start of the agent (`Host.incarnation`).
    incarnation: u64,
    /// The scheduler's replicas.
    schedulers: Schedulers,
    peers: PeerClient,
}

impl P2p {
    /// P2P for this host.
    pub fn new(config: P2pConfig, peers: PeerClient) -> Arc<P2p> {
        let schedulers = Schedulers::new(&config.schedulers, config.credential.clone());
        // A randomly keyed hash of the clock: random for each start, no other source needed.
        let incarnation = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
            h.finish().max(1)
        };
        Arc::new(P2p { config, incarnation, schedulers, peers })
    }

    /// The scheduler's replicas.
    pub(crate) fn schedulers(&self) -> &Schedulers {
        &self.schedulers
    }

    /// The client this host fetches pieces from peers with.
    pub(crate) fn peers(&self) -> &PeerClient {
        &self.peers
    }

    /// This host's id in the cluster.
    pub(crate) fn host_id(&self) -> &str {
        &self.config.host_id
    }

    /// Whether `task`'s pieces may go between this host and others: always under mutual TLS,
    /// otherwise only when its registry answers its digest without credentials.
    pub(crate) async fn may_share(&self, engine: &Engine, task: &Task) -> bool {
        self.peers.authenticated() || engine.probe_public(task).await
    }

    /// Replicas for `task`, best first.
    fn replicas_for(&self, task: &TaskId) -> Vec<&Replica> {
        self.schedulers.for_key(&task.to_string())
    }

    fn host(&self) -> pb::Host {
        pb::Host {
            id: self.config.host_id.clone(),
            peer_addr: self.config.advertise.to_string(),
            upload_slots: self.config.max_children,
            sending_slots: self.config.sending_slots,
            incarnation: self.incarnation,
            zone: self.config.zone.clone(),
            idc: self.config.idc.clone(),
            seed: self.config.seed,
        }
    }

    /// Announces this host to every replica now and every few seconds until `shutdown`, then
    /// says goodbye.
    pub async fn announce_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            for r in self.schedulers.all() {
                let result = match self.schedulers.client(r).await {
                    Ok(mut c) => c.announce_host(pb::AnnounceHostRequest { host: Some(self.host()) }).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    debug!(scheduler = %r.addr, error = %e, "announce failed");
                    self.schedulers.forget(r).await;
                }
            }
        }
        for r in self.schedulers.all() {
            if let Ok(mut c) = self.schedulers.client(r).await {
                let _ = c.leave_host(pb::LeaveHostRequest { host_id: self.config.host_id.clone() }).await;
            }
        }
    }

    fn register(&self, task: &Task) -> pb::Register {
        let origin = task.origin();
        pb::Register {
            task_id: task.id.to_string(),
            host_id: self.config.host_id.clone(),
            length: task.layout.len,
            origin: Some(pb::Origin {
                registry: origin.registry,
                repository: origin.repository,
                digest: origin.digest.to_string(),
                length: task.layout.len,
            }),
        }
    }

    /// Waits on every replica for preheat work and does it, until `shutdown`.
    pub async fn job_loop(self: Arc<Self>, engine: Arc<Engine>, shutdown: CancellationToken) {
        let mut watchers = JoinSet::new();
        for i in 0..self.schedulers.all().len() {
            let (p2p, engine, shutdown) = (self.clone(), engine.clone(), shutdown.clone());
            watchers.spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        () = p2p.watch(i, &engine) => {}
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
            });
        }
        while watchers.join_next().await.is_some() {}
    }

    /// One WatchJobs stream on replica `i`, until it breaks.
    async fn watch(self: &Arc<Self>, i: usize, engine: &Arc<Engine>) {
        let r = &self.schedulers.all()[i];
        let mut client = match self.schedulers.client(r).await {
            Ok(c) => c,
            Err(_) => return,
        };
        let mut jobs = match client.watch_jobs(pb::WatchJobsRequest { host_id: self.config.host_id.clone() }).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                debug!(scheduler = %r.addr, error = %e, "cannot watch for preheat jobs");
                return;
            }
        };
        while let Ok(Some(job)) = jobs.message().await {
            let (engine, mut client) = (engine.clone(), client.clone());
            let host_id = self.config.host_id.clone();
            tokio::spawn(async move {
                let Some(blob) = job.blob else { return };
                let result = preheat_blob(&engine, &blob).await;
                if let Err(e) = &result {
                    warn!(job = %job.job_id, digest = %blob.digest, error = %e, "preheat failed");
                }
                let report = pb::ReportJobRequest {
                    job_id: job.job_id,
                    host_id,
                    digest: blob.digest,
                    ok: result.is_ok(),
                    error: result.err().unwrap_or_default(),
                };
                let _ = client.report_job(report).await;
            });
        }
    }

    /// The manifest a preheat recorded for `registry/repository:reference` on any replica: what
    /// lets a node resolve a preheated image while its registry cannot be reached.
    pub async fn recorded_manifest(&self, registry: &str, repository: &str, reference: &str) -> Option<pb::Manifest> {
        let req = pb::GetManifestRequest { registry: registry.into(), repository: repository.into(), reference: reference.into() };
        for r in self.schedulers.all() {
            match self.schedulers.client(r).await {
                Ok(mut c) => match c.get_manifest(req.clone()).await {
                    Ok(resp) => {
                        if let Some(m) = resp.into_inner().manifest {
                            return Some(m);
                        }
                    }
                    Err(e) => warn!(scheduler = %r.addr, error = %e.message(), "asking for a recorded manifest"),
                },
                Err(e) => warn!(scheduler = %r.addr, error = %e, "asking for a recorded manifest"),
            }
        }
        None
    }

    /// The length of `task` if the cluster holds it: whoever fetched it from the origin knew.
    pub async fn task_len(&self, task: &TaskId) -> Option<u64> {
        for r in self.replicas_for(task) {
            let Ok(mut c) = self.schedulers.client(r).await else { continue };
            if let Ok(resp) = c.stat_task(pb::StatTaskRequest { task_id: task.to_string() }).await {
                let stat = resp.into_inner();
                return (stat.known && stat.length > 0).then_some(stat.length);
            }
        }
        None
    }

    /// Opens a peer stream for `task` on the first replica that answers.
    ///
    /// Events to the scheduler queue without bound: the download's loop must never wait to send
    /// one, because the scheduler may be waiting for that loop to take its commands, and the two
    /// would wait on each other for ever.
    async fn open(&self, task: &Task) -> Option<(Events, tonic::Streaming<pb::PeerCommand>)> {
        let register = self.register(task);
        for r in self.replicas_for(&task.id) {
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(pb::PeerEvent { event: Some(Event::Register(register.clone())) });
            let opened = match self.schedulers.client(r).await {
                Ok(mut c) => c.announce_peer(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match opened {
                Ok(resp) => return Some((tx, resp.into_inner())),
                Err(e) => {
                    warn!(scheduler = %r.addr, error = %e, "scheduler refused or unreachable; trying the next");
                    self.schedulers.forget(r).await;
                }
            }
        }
        None
    }

    /// Downloads the rest of `task` (whose missing pieces the caller claimed) as the scheduler says.
    pub async fn drive(self: Arc<Self>, engine: Arc<Engine>, task: Arc<Task>) {
        // Without mutual TLS no host can tell a cluster member from anyone else on the network:
        // a private blob is then neither fetched from nor offered to peers.
        if !self.peers.authenticated() && !engine.probe_public(&task).await {
            info!(task = %task.id, "private blob and no cluster CA ([peer] ca_file): fetching it from the origin, not from peers");
            return from_origin(&engine, &task, &HashSet::new()).await;
        }
        let Some((events, mut commands)) = self.open(&task).await else {
            warn!(task = %task.id, "no scheduler answers; fetching from the origin");
            return from_origin(&engine, &task, &HashSet::new()).await;
        };
        let (report_tx, mut reports) = mpsc::unbounded_channel();
        *task.reporter.lock().unwrap_or_else(|p| p.into_inner()) = Some(report_tx);
        let mut d = Download::new(self.clone(), engine.clone(), task.clone());
        let mut changes = task.changed.subscribe();
        let mut scheduler_alive = true;
        let mut stall = tokio::time::interval(Duration::from_secs(1));
        // Peers asking at the same moment only see those registered before them: a first refresh
        // soon after the start gives everyone the whole set, later ones follow joiners.
        let mut reschedule = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_millis(300), RESCHEDULE_EVERY);
        loop {
            if let Some(outcome) = task.outcome() {
                // Pieces finished just before the end are still queued: the scheduler needs their
                // digests to let anyone fetch them from here.
                while let Ok(n) = reports.try_recv() {
                    report_piece(&task, n, &events);
                }
                let event = match outcome {
                    Ok(()) => Event::Done(pb::Done {}),
                    Err(e) => Event::Failed(pb::Failed { reason: e.to_string() }),
                };
                let _ = events.send(pb::PeerEvent { event: Some(event) });
                // Let the scheduler read the end before the call goes: dropping the call at once
                // can reset it before the last message is delivered.
                drop(events);
                let drain = async { while let Ok(Some(_)) = commands.message().await {} };
                let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
                break;
            }
            if d.mode == Mode::Parents {
                d.start_fetches();
            }
            tokio::select! {
                cmd = commands.message(), if scheduler_alive => match cmd {
                    Ok(Some(pb::PeerCommand { command: Some(c) })) => d.on_command(c, &events).await,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        warn!(task = %task.id, "scheduler stream ended; fetching the rest from the origin");
                        scheduler_alive = false;
                        d.go_to_origin().await;
                    }
                },
                Some(n) = reports.recv() => {
                    report_piece(&task, n, &events);
                    d.last_progress = Instant::now();
                }
                Some(_) = d.stripe_fetch.join_next(), if !d.stripe_fetch.is_empty() => {
                    // The stripe is here: its digests go out first, then the scheduler is asked
                    // for another stripe or parents for the rest.
                    if let Some(pieces) = d.stripe.take() {
                        info!(task = %task.id, ?pieces, "stripe fetched from the origin");
                    }
                    while let Ok(n) = reports.try_recv() {
                        report_piece(&task, n, &events);
                    }
                    if let Some(next) = d.next_stripe.take() {
                        d.fetch_stripe(next);
                    } else if scheduler_alive && !task.file.bitmap().is_full() {
                        d.ask_again(&events);
                    }
                }
                Some((parent, news)) = d.updates.recv() => {
                    let ended = !matches!(news, ParentNews::Update(_)) && d.parents.contains_key(&parent);
                    let complete = d.have.get(&parent).is_some_and(|b| b.is_full());
                    let had_pieces = d.have.get(&parent).is_some_and(|b| b.count() > 0);
                    if let ParentNews::Unreachable(reason) = news {
                        // Not reachable from here (now): the scheduler offers others instead of
                        // this one again.
                        if d.parents.contains_key(&parent) {
                            d.on_failure(d.first_missing(), &parent, reason, true, &events);
                        }
                    } else if let ParentNews::Refused(reason) = news {
                        d.refused(&parent, &reason, &events);
                    } else if let ParentNews::Update(update) = news {
                        d.on_update(&parent, update);
                    } else if ended && !complete && had_pieces {
                        // The parent went away mid-download: say so, get others.
                        d.on_failure(d.first_missing(), &parent, "its piece subscription ended".into(), true, &events);
                    } else if ended && !complete {
                        // It never had the task (it registered but had not started): not its
                        // fault, so nothing is reported; ask for others.
                        d.drop_parent(&parent);
                        d.ask_again(&events);
                    }
                },
                Some(done) = d.fetches.join_next(), if !d.fetches.is_empty() => match done {
                    Ok((n, parent, took, Ok(true))) => d.on_fetched(n, &parent, took),
                    // Another parent's copy (endgame) was stored first.
                    Ok((n, parent, _, Ok(false))) => d.forget_fetch(n, &parent),
                    Ok((n, parent, _, Err(FetchError::Busy))) => {
                        d.forget_fetch(n, &parent);
                        d.busy_until.insert(parent, Instant::now() + BUSY_BACKOFF);
                    }
                    Ok((n, parent, _, Err(FetchError::Refused(reason)))) => {
                        d.forget_fetch(n, &parent);
                        d.refused(&parent, &reason, &events);
                    }
                    Ok((n, parent, _, Err(FetchError::Unreachable(reason)))) => d.on_failure(n, &parent, reason, true, &events),
                    Ok((n, parent, _, Err(FetchError::Bad(reason)))) => d.on_failure(n, &parent, reason, false, &events),
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => warn!(task = %task.id, error = %e, "piece fetch panicked"),
                },
                _ = changes.changed() => {}
                _ = reschedule.tick(), if scheduler_alive && d.mode == Mode::Parents => {
                    d.ask_again(&events);
                }
                _ = stall.tick() => {
                    if d.mode == Mode::Parents {
                        let local = task.file.bitmap();
                        let count = task.layout.count();
                        let missing: Vec<u32> = (0..count).filter(|&n| !local.has(n)).collect();
                        let held = missing.iter().filter(|&&n| d.have.values().any(|b| b.has(n))).count();
                        let digests = missing.iter().filter(|&&n| d.digests.contains_key(&n)).count();
                        // Pieces that could be fetched now: a parent has them and their digest is known.
                        let startable = missing.iter().filter(|&&n| d.digests.contains_key(&n) && d.have.values().any(|b| b.has(n))).count();
                        debug!(missing = missing.len(), held_by_parents = held, with_digest = digests, startable, in_flight = d.in_flight(), parents = d.parents.len(), busy = d.busy_until.len(), usual_fetch_ms = d.usual_fetch.map_or(0, |u| u.as_millis() as u64), "download progress");
                    }
                    // Told to wait (or to fetch from parents) for too long without a piece.
                    if d.mode != Mode::Origin && d.last_progress.elapsed() > STALL {
                        warn!(task = %task.id, "parents stalled; fetching the rest from the origin");
                        d.go_to_origin().await;
                    }
                }
            }
        }
        *task.reporter.lock().unwrap_or_else(|p| p.into_inner()) = None;
        d.subscriptions.abort_all();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Waiting for the first decision.
    Starting,
    /// Fetching from parents.
    Parents,
    /// Fetching from the origin (told to, or falling back).
    Origin,
}

/// What a parent's subscription brought.
enum ParentNews {
    /// Pieces it has now.
    Update(shoal_proto::peer::PieceUpdate),
    /// It will not serve this task, or its own download of it failed (see [`REFUSED_BACKOFF`]).
    Refused(String),
    /// The subscription ended.
    Ended,
    /// It could not be reached.
    Unreachable(String),
}

/// A piece being fetched: since when, and from which parents (two in the endgame).
struct InFlight {
    started: Instant,
    from: Vec<(String, tokio::task::AbortHandle)>,
}

/// One P2P download in progress.
struct Download {
    p2p: Arc<P2p>,
    engine: Arc<Engine>,
    task: Arc<Task>,
    mode: Mode,
    /// Parents by host id: address, and whether it is a seed.
    parents: HashMap<String, (SocketAddr, bool)>,
    /// Which pieces each parent has.
    have: HashMap<String, Bitmap>,
    /// Digests the scheduler relayed.
    digests: HashMap<u32, String>,
    /// The pieces those digests are of, shared with the stripe fetch: it stops before a piece
    /// another source fetched (the scheduler gave it the end of this host's stripe).
    relayed: Arc<std::sync::Mutex<HashSet<u32>>>,
    /// Pieces being fetched, and from whom.
    fetching: HashMap<u32, InFlight>,
    /// Per parent, the rate (bytes/s) its recent pieces arrived at: pieces go to whichever holder
    /// should deliver them soonest, so a parent serving many children gets fewer requests.
    rates: HashMap<String, f64>,
    /// How long a piece fetch from a parent usually takes here (a moving average).
    usual_fetch: Option<Duration>,
    /// Parents that answered "busy", left alone until then.
    busy_until: HashMap<String, Instant>,
    /// Parents that refused the task: until when they are left alone, and the next backoff.
    refused_until: HashMap<String, (Instant, Duration)>,
    /// The stripe of the task this host is fetching from the origin for the cluster, if any.
    stripe: Option<Range<u32>>,
    /// A stripe given while the last was finishing (its last digests reached the scheduler
    /// first): fetched next.
    next_stripe: Option<Range<u32>>,
    /// Where the stripe being fetched ends now, shared with its fetch: the scheduler moves it
    /// back when it gives the rest to another source.
    stripe_end: Arc<AtomicU32>,
    stripe_fetch: JoinSet<()>,
    fetches: JoinSet<(u32, String, Duration, Result<bool, FetchError>)>,
    subscriptions: JoinSet<()>,
    /// Each parent's subscription, ended when the parent is dropped: a parent no longer asked for
    /// pieces would otherwise go on telling this host of every piece it gets.
    subscribed: HashMap<String, tokio::task::AbortHandle>,
    updates_tx: mpsc::Sender<(String, ParentNews)>,
    updates: mpsc::Receiver<(String, ParentNews)>,
    /// When a piece last arrived here, a parent last got a new one, or a new digest came (see
    /// [`STALL`]).
    last_progress: Instant,
}

impl Download {
    fn new(p2p: Arc<P2p>, engine: Arc<Engine>, task: Arc<Task>) -> Download {
        let (updates_tx, updates) = mpsc::channel(256);
        Download {
            p2p,
            engine,
            task,
            mode: Mode::Starting,
            parents: HashMap::new(),
            have: HashMap::new(),
            digests: HashMap::new(),
            relayed: Arc::default(),
            fetching: HashMap::new(),
            rates: HashMap::new(),
            usual_fetch: None,
            busy_until: HashMap::new(),
            refused_until: HashMap::new(),
            stripe: None,
            next_stripe: None,
            stripe_end: Arc::new(AtomicU32::new(0)),
            stripe_fetch: JoinSet::new(),
            fetches: JoinSet::new(),
            subscriptions: JoinSet::new(),
            subscribed: HashMap::new(),
            updates_tx,
            updates,
            last_progress: Instant::now(),
        }
    }

    async fn on_command(&mut self, c: Command, events: &Events) {
        match c {
            Command::StripeEnd(e) => self.end_stripe(e.end_piece),
            Command::Digests(d) => {
                // A new digest is a piece that just left the origin: the swarm is moving, and this
                // download's turn comes even if none of its parents holds anything yet.
                let mut relayed = self.relayed.lock().unwrap_or_else(|p| p.into_inner());
                for p in d.digests {
                    relayed.insert(p.number);
                    if self.digests.insert(p.number, p.blake3).is_none() {
                        self.last_progress = Instant::now();
                    }
                }
            }
            Command::Parents(p) => {
                if self.mode == Mode::Origin {
                    return;
                }
                if self.parents.is_empty() && !p.parents.is_empty() {
                    info!(task = %self.task.id, parents = ?p.parents.iter().map(|p| &p.host_id).collect::<Vec<_>>(), "fetching from parents");
                } else {
                    debug!(task = %self.task.id, parents = ?p.parents.iter().map(|p| &p.host_id).collect::<Vec<_>>(), "parents refreshed");
                }
                if self.mode != Mode::Parents {
                    // The stall clock starts with the first parents; a refresh is not progress.
                    self.last_progress = Instant::now();
                }
                self.mode = Mode::Parents;
                // Keep the parents already subscribed to (their pieces are still worth having);
                // make room for the scheduler's new picks by dropping those that hold the fewest
                // pieces we lack.
                let wanted: HashSet<String> = p.parents.iter().map(|p| p.host_id.clone()).collect();
                let new = wanted.iter().filter(|id| !self.parents.contains_key(*id)).count();
                let excess = (self.parents.len() + new).saturating_sub(MAX_PARENTS);
                if excess > 0 {
                    let local = self.task.file.bitmap();
                    let mut ranked: Vec<(usize, String)> = self
                        .parents
                        .keys()
                        .filter(|id| !wanted.contains(*id))
                        .map(|id| {
                            let useful = self.have.get(id).map_or(0, |b| (0..b.len()).filter(|&n| b.has(n) && !local.has(n)).count());
                            (useful, id.clone())
                        })
                        .collect();
                    ranked.sort();
                    for (_, id) in ranked.into_iter().take(excess) {
                        self.drop_parent(&id);
                    }
                }
                let now = Instant::now();
                for parent in p.parents {
                    let Ok(addr) = parent.peer_addr.parse::<SocketAddr>() else { continue };
                    if self.refused_until.get(&parent.host_id).is_some_and(|(until, _)| *until > now) {
                        continue;
                    }
                    if self.parents.insert(parent.host_id.clone(), (addr, parent.seed)).is_none() {
                        self.subscribe(parent.host_id, addr, parent.seed);
                    }
                }
            }
            Command::BackToSource(b) => {
                let count = self.task.layout.count();
                let end = if b.end_piece == 0 { count } else { b.end_piece.min(count) };
                if b.first_piece == 0 && end == count {
                    info!(task = %self.task.id, "fetching from the origin for the cluster");
                    self.go_to_origin().await;
                } else {
                    self.fetch_stripe(b.first_piece..end);
                }
            }
            Command::Wait(w) => {
                tokio::time::sleep(Duration::from_millis(w.retry_after_ms.max(50) as u64)).await;
                self.ask_again(events);
            }
        }
    }

    /// Forgets `parent` and what it has.
    fn drop_parent(&mut self, parent: &str) {
        self.parents.remove(parent);
        self.have.remove(parent);
        if let Some(s) = self.subscribed.remove(parent) {
            s.abort();
        }
    }

    /// `parent` refused the task: dropped, left alone for a while (longer each time), and the
    /// scheduler told so (as for a parent this host cannot reach: it is not blamed cluster-wide).
    fn refused(&mut self, parent: &str, reason: &str, events: &Events) {
        let now = Instant::now();
        let backoff = self.refused_until.get(parent).map_or(REFUSED_BACKOFF, |(_, next)| *next);
        self.refused_until.insert(parent.to_string(), (now + backoff, (backoff * 2).min(REFUSED_MAX)));
        if backoff == REFUSED_BACKOFF {
            info!(task = %self.task.id, %parent, %reason, "parent refused the task; leaving it alone");
        } else {
            debug!(task = %self.task.id, %parent, %reason, ?backoff, "parent refused the task again");
        }
        self.drop_parent(parent);
        report_parent_failed(self.first_missing(), parent, format!("refused: {reason}"), true, events);
    }

    /// The first piece not here yet (0 when all are), which a parent failure is reported against.
    fn first_missing(&self) -> u32 {
        self.task.file.bitmap().missing_runs(0..self.task.layout.count()).first().map_or(0, |r| r.start)
    }

    /// Registers again: the scheduler answers with a new decision.
    fn ask_again(&self, events: &Events) {
        let _ = events.send(pb::PeerEvent { event: Some(Event::Register(self.p2p.register(&self.task))) });
    }

    fn subscribe(&mut self, id: String, addr: SocketAddr, seed: bool) {
        let (p2p, task, tx) = (self.p2p.clone(), self.task.id.clone(), self.updates_tx.clone());
        // Every parent learns which registry the blob comes from (it serves only a task fetched
        // from the same one). A seed may not have the task yet: it learns where the blob is, and
        // (checked below) the client's credentials.
        let o = self.task.origin();
        let mut request = shoal_proto::peer::SubscribePieces {
            task_id: String::new(),
            registry: o.registry,
            repository: String::new(),
            digest: String::new(),
            length: 0,
            authorization: String::new(),
        };
        if seed {
            request.repository = o.repository;
            request.digest = o.digest.to_string();
            request.length = self.task.layout.len;
        }
        let authorization = seed.then(|| o.authorization.and_then(|a| a.to_str().ok().map(String::from))).flatten();
        let key = id.clone();
        let handle = self.subscriptions.spawn(async move {
            // The client's credentials go only to a host that proved, with a certificate from the
            // cluster CA, that it is a seed; any other gets none (it fetches with its own).
            if let Some(a) = authorization {
                if p2p.peers.certified_seed(addr).await {
                    request.authorization = a;
                } else {
                    debug!(parent = %id, "not a certified seed: the client's credentials are not sent");
                }
            }
            match p2p.peers.subscribe(addr, &task, request).await {
                Ok(mut sub) => {
                    while let Some(Ok(update)) = sub.next().await {
                        // A refusal, or the parent's own download of the task failed (a seed
                        // that could not fetch it): either way it has nothing for this host.
                        let news = match (update.refusal(), update.error.is_empty()) {
                            (shoal_proto::peer::Refusal::None, true) => ParentNews::Update(update),
                            _ => ParentNews::Refused(update.error),
                        };
                        if tx.send((id.clone(), news)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    debug!(parent = %id, error = %e, "cannot subscribe");
                    let _ = tx.send((id, ParentNews::Unreachable(e.to_string()))).await;
                    return;
                }
            }
            let _ = tx.send((id, ParentNews::Ended)).await;
        });
        if let Some(old) = self.subscribed.insert(key, handle) {
            old.abort();
        }
    }

    fn on_update(&mut self, parent: &str, u: shoal_proto::peer::PieceUpdate) {
        let count = self.task.layout.count();
        if !u.error.is_empty() || !self.parents.contains_key(parent) {
            return;
        }
        let local = self.task.file.bitmap();
        if !u.numbers.is_empty() && u.numbers.iter().all(|&n| local.has(n)) {
            self.engine.peer_update_unneeded();
        }
        let have = self.have.entry(parent.to_string()).or_insert_with(|| Bitmap::new(count));
        let before = have.count();
        for n in u.numbers {
            have.set(n);
        }
        if u.done {
            for n in 0..count {
                have.set(n);
            }
        }
        if have.count() > before {
            self.last_progress = Instant::now();
        }
    }

    /// Fetches in flight (an endgame piece counts once per parent).
    fn in_flight(&self) -> usize {
        self.fetching.values().map(|f| f.from.len()).sum()
    }

    /// Starts fetches of missing pieces whose digest is known, rarest among the parents first,
    /// each from the holder that should deliver it soonest. Ties go round from a point that differs
    /// per host, so children of one parent fetch different pieces and can trade them with each
    /// other. When every piece a parent holds is already on its way (the endgame), a piece that is
    /// taking long is also asked of a second holder; the first copy wins.
    fn start_fetches(&mut self) {
        let local = self.task.file.bitmap();
        let count = self.task.layout.count();
        if count == 0 {
            return;
        }
        let mut load: HashMap<String, usize> = HashMap::new();
        for f in self.fetching.values() {
            for (p, _) in &f.from {
                *load.entry(p.clone()).or_default() += 1;
            }
        }
        let now = Instant::now();
        self.busy_until.retain(|_, until| *until > now);
        for p in self.busy_until.keys() {
            load.insert(p.clone(), MAX_PER_PARENT);
        }
        let start =
            u32::from_le_bytes(blake3::hash(self.p2p.config.host_id.as_bytes()).as_bytes()[..4].try_into().unwrap_or_default()) % count;
        let mut wanted: Vec<(usize, u32, u32)> = (0..count)
            .filter(|&n| !local.has(n) && !self.fetching.contains_key(&n) && self.digests.contains_key(&n))
            .filter(|n| !self.stripe.as_ref().is_some_and(|s| s.contains(n)))
            .filter_map(|n| {
                let holders = self.have.values().filter(|bits| bits.has(n)).count();
                (holders > 0).then_some((holders, (n + count - start) % count, n))
            })
            .collect();
        wanted.sort_unstable();
        let mut in_flight = self.in_flight();
        let mut starts = Vec::new();
        let mut unstarted = false;
        for (_, _, n) in wanted {
            if in_flight >= MAX_FETCHES {
                unstarted = true;
                break;
            }
            match self.best_holder(n, &[], &load) {
                Some(parent) => {
                    *load.entry(parent.clone()).or_default() += 1;
                    in_flight += 1;
                    starts.push((n, parent));
                }
                None => unstarted = true,
            }
        }
        // The endgame: the whole blob is in the cluster and what is left is already on its way.
        let endgame = !unstarted && self.digests.len() as u32 == count && count - local.count() <= MAX_FETCHES as u32;
        if endgame {
            let slow_after = self.usual_fetch.map_or(ENDGAME_AFTER, |usual| usual.mul_f64(ENDGAME_SLOWER).max(ENDGAME_AFTER));
            let mut slow: Vec<(Instant, u32)> = self
                .fetching
                .iter()
                .filter(|(_, f)| f.from.len() == 1 && f.started.elapsed() > slow_after)
                .map(|(&n, f)| (f.started, n))
                .collect();
            slow.sort_unstable();
            for (_, n) in slow {
                if in_flight >= MAX_FETCHES {
                    break;
                }
                let busy: Vec<String> = self.fetching[&n].from.iter().map(|(p, _)| p.clone()).collect();
                if let Some(parent) = self.best_holder(n, &busy, &load) {
                    *load.entry(parent.clone()).or_default() += 1;
                    in_flight += 1;
                    starts.push((n, parent));
                }
            }
        }
        for (n, parent) in starts {
            let Some(&(addr, _)) = self.parents.get(&parent) else { continue };
            let Some(digest) = self.digests.get(&n).cloned() else { continue };
            let (p2p, engine, task) = (self.p2p.clone(), self.engine.clone(), self.task.clone());
            let from = parent.clone();
            let handle = self.fetches.spawn(async move {
                let started = Instant::now();
                let result = fetch_piece(&p2p.peers, addr, &engine, &task, n, &digest, false).await;
                let took = started.elapsed();
                debug!(piece = n, %parent, ms = took.as_millis() as u64, ok = result.is_ok(), "piece fetch ended");
                (n, parent, took, result)
            });
            self.fetching.entry(n).or_insert_with(|| InFlight { started: Instant::now(), from: Vec::new() }).from.push((from, handle));
        }
    }

    /// The holder of piece `n` (other than `except`) with a free fetch slot that should deliver it
    /// soonest: fewest fetches queued on it per byte/s it has shown. Parents not measured yet come
    /// first (so each gets measured); ties differ per child and piece, so children do not all
    /// queue on the same parent.
    fn best_holder(&self, n: u32, except: &[String], load: &HashMap<String, usize>) -> Option<String> {
        let busy = |id: &String| load.get(id).copied().unwrap_or(0);
        let spread = |id: &String| blake3::hash(format!("{}/{id}/{n}", self.p2p.config.host_id).as_bytes()).as_bytes()[0];
        let wait = |id: &String| (busy(id) + 1) as f64 / self.rates.get(id).copied().unwrap_or(f64::MAX);
        self.have
            .iter()
            .filter(|(id, bits)| bits.has(n) && busy(id) < MAX_PER_PARENT && !except.contains(id))
            .min_by(|(a, _), (b, _)| wait(a).total_cmp(&wait(b)).then(busy(a).cmp(&busy(b))).then(spread(a).cmp(&spread(b))))
            .map(|(id, _)| id.clone())
    }

    /// Piece `n` arrived from `parent`: any other fetch of it is cancelled, and the parent's rate
    /// is updated.
    fn on_fetched(&mut self, n: u32, parent: &str, took: Duration) {
        if let Some(f) = self.fetching.remove(&n) {
            for (p, handle) in f.from {
                if p != parent {
                    handle.abort();
                    self.engine.peer_fetches_abandoned(1);
                }
            }
        }
        let len = self.task.layout.range(n).end - self.task.layout.range(n).start;
        let sample = len as f64 / took.as_secs_f64().max(1e-3);
        let rate = self.rates.entry(parent.to_string()).or_insert(sample);
        *rate = 0.6 * *rate + 0.4 * sample;
        self.usual_fetch = Some(self.usual_fetch.map_or(took, |usual| usual.mul_f64(0.8) + took.mul_f64(0.2)));
        self.last_progress = Instant::now();
    }

    /// The fetch of piece `n` from `parent` ended without the piece.
    fn forget_fetch(&mut self, n: u32, parent: &str) {
        if let Some(f) = self.fetching.get_mut(&n) {
            f.from.retain(|(p, _)| p != parent);
            if f.from.is_empty() {
                self.fetching.remove(&n);
            }
        }
    }

    /// Drops `parent` and tells the scheduler, which picks others; `unreachable` says the parent
    /// could not be reached rather than answered wrongly.
    fn on_failure(&mut self, n: u32, parent: &str, reason: String, unreachable: bool, events: &Events) {
        self.forget_fetch(n, parent);
        warn!(task = %self.task.id, piece = n, %parent, %reason, unreachable, "piece from parent failed; reporting it");
        self.drop_parent(parent);
        report_parent_failed(n, parent, reason, unreachable, events);
    }

    /// Fetches `pieces` from the origin for the cluster, while the rest comes from parents.
    fn fetch_stripe(&mut self, pieces: Range<u32>) {
        if self.mode == Mode::Origin || pieces.is_empty() {
            return;
        }
        if self.stripe.is_some() {
            self.next_stripe = Some(pieces);
            return;
        }
        info!(task = %self.task.id, ?pieces, "fetching a stripe from the origin for the cluster");
        if self.mode == Mode::Starting {
            self.last_progress = Instant::now();
        }
        self.mode = Mode::Parents;
        // A stripe taken over from a source that left: what is on its way from parents comes
        // from the origin instead, so no piece is left to nobody.
        for n in pieces.clone() {
            if let Some(f) = self.fetching.remove(&n) {
                for (_, handle) in f.from {
                    handle.abort();
                }
            }
        }
        self.stripe = Some(pieces.clone());
        self.stripe_end = Arc::new(AtomicU32::new(pieces.end));
        let (engine, task, relayed, stripe_end) = (self.engine.clone(), self.task.clone(), self.relayed.clone(), self.stripe_end.clone());
        self.stripe_fetch.spawn(async move {
            // A few pieces per request, each request up to the stripe's end as the scheduler
            // last set it, and up to the next piece this host has or another source reported
            // (from a scheduler that does not move stripe ends): past such a piece, the rest of
            // the stripe is another's.
            let per_request = stripe_request_pieces(pieces.len() as u32);
            let mut next = pieces.start;
            loop {
                let stop = stripe_end.load(Ordering::Relaxed);
                let Some(start) = (next..stop).find(|&n| !task.file.has_piece(n)) else { break };
                let taken = |n: u32| relayed.lock().unwrap_or_else(|p| p.into_inner()).contains(&n);
                if taken(start) {
                    debug!(task = %task.id, piece = start, "the rest of the stripe is fetched by another source");
                    break;
                }
                let limit = stop.min(start + per_request);
                let end = (start + 1..limit).find(|&n| task.file.has_piece(n) || taken(n)).unwrap_or(limit);
                let _ = engine.spawn_fetch_run(&task, start..end).await;
                next = end;
            }
        });
    }

    /// The scheduler gave the pieces from `end` of this host's stripe to another source: no new
    /// origin request goes past it, and those pieces come from parents like any other.
    fn end_stripe(&mut self, end: u32) {
        if let Some(next) = self.next_stripe.as_mut().filter(|s| s.start < end && end < s.end) {
            // The stripe given while the last was finishing: its fetch has not started.
            next.end = end;
            return;
        }
        if let Some(stripe) = self.stripe.as_mut().filter(|s| s.start < end && end < s.end) {
            info!(task = %self.task.id, from = end, "the rest of the stripe goes to another source");
            stripe.end = end;
            self.stripe_end.store(end, Ordering::Relaxed);
        }
    }

    /// Fetches every missing piece from the origin (after the fetches in flight end); a stripe
    /// being fetched goes on as it is.
    async fn go_to_origin(&mut self) {
        if self.mode == Mode::Origin {
            // Already fetching from the origin: a second run would fetch every piece twice.
            return;
        }
        self.mode = Mode::Origin;
        while self.fetches.join_next().await.is_some() {}
        self.fetching.clear();
        let engine = self.engine.clone();
        let task = self.task.clone();
        self.next_stripe = None;
        let skip: HashSet<u32> = self.stripe.clone().into_iter().flatten().collect();
        tokio::spawn(async move { from_origin(&engine, &task, &skip).await });
    }
}

/// Fetches one blob a preheat job names (from peers or the origin, as for any pull) and waits
/// until it is stored and verified.
async fn preheat_blob(engine: &Arc<Engine>, blob: &pb::Origin) -> Result<(), String> {
    let digest: shoal_core::Digest = blob.digest.parse().map_err(|e: shoal_core::digest::DigestError| e.to_string())?;
    let origin =
        crate::engine::Origin { registry: blob.registry.clone(), repository: blob.repository.clone(), digest, authorization: None };
    info!(digest = %blob.digest, registry = %blob.registry, "preheating");
    let task = engine.fetch_ahead(&origin, blob.length).await.map_err(|e| format!("the store cannot hold it: {e}"))?;
    let mut changes = task.changed.subscribe();
    loop {
        match task.outcome() {
            Some(r) => return r.map_err(|e| e.to_string()),
            None => {
                if changes.changed().await.is_err() {
                    return task.outcome().unwrap_or(Ok(())).map_err(|e| e.to_string());
                }
            }
        }
    }
}

/// Tells the scheduler that `parent` failed this host at piece `n`; when it was `unreachable` (or
/// refused the task) the scheduler avoids it for this child only.
fn report_parent_failed(n: u32, parent: &str, reason: String, unreachable: bool, events: &Events) {
    let failed = pb::PieceFailed { number: n, parent_host_id: parent.to_string(), reason, unreachable };
    let _ = events.send(pb::PeerEvent { event: Some(Event::PieceFailed(failed)) });
}

/// Tells the scheduler that piece `n` of `task` is here, with its digest.
fn report_piece(task: &Task, n: u32, events: &Events) {
    if let Some(blake3) = task.file.piece_blake3(n) {
        let _ = events.send(pb::PeerEvent { event: Some(Event::PieceFinished(pb::PieceFinished { number: n, blake3 })) });
    }
}

/// Fetches every missing piece of `task` from the origin and waits for the fetches.
async fn from_origin(engine: &Arc<Engine>, task: &Arc<Task>, skip: &HashSet<u32>) {
    let mut missing = task.file.bitmap();
    for &n in skip {
        missing.set(n);
    }
    let runs = missing.missing_runs(0..task.layout.count());
    let handles: Vec<_> = runs.into_iter().map(|run| engine.spawn_fetch_run(task, run)).collect();
    for h in handles {
        let _ = h.await;
    }
}

/// Fetches piece `n` from a parent, checks it against the relayed digest, and stores it. False
/// when another fetch of the piece stored it first.
pub(crate) async fn fetch_piece(
    peers: &PeerClient,
    addr: SocketAddr,
    engine: &Arc<Engine>,
    task: &Arc<Task>,
    n: u32,
    digest: &str,
    queued: bool,
) -> Result<bool, FetchError> {
    let range = task.layout.range(n);
    let (_header, bytes) =
        peers.get_piece(addr, &task.id, &task.registry, n, range.end - range.start, queued).await.map_err(FetchError::of_peer)?;
    let got = blake3::hash(&bytes).to_hex().to_string();
    if got != digest {
        return Err(FetchError::Bad(format!("piece {n} does not match its digest (got {got}, want {digest})")));
    }
    let t = task.clone();
    let first = tokio::task::spawn_blocking(move || {
        if t.file.has_piece(n) {
            // Another parent's copy (endgame) got here first.
            return Ok(false);
        }
        t.hash_in_order(range.start, &bytes);
        t.file.write_at(range.start, &bytes)?;
        t.file.piece_written(n, got)
    })
    .await
    .map_err(|e| FetchError::Unreachable(e.to_string()))?
    .map_err(|e| {
        // The local store failed: the task fails here, the parent did nothing wrong.
        engine.fail(task, crate::engine::EngineError::Store(e.to_string().into()), true);
        FetchError::Unreachable(e.to_string())
    })?;
    if first {
        engine.peer_received(range.end - range.start);
        engine.piece_finished(task, n);
    } else {
        engine.peer_duplicate(range.end - range.start);
    }
    Ok(first)
}
