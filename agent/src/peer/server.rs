//! The peer server: answers `GetPiece` and `SubscribePieces` from the local store, bounded by a
//! number of upload slots and, when configured, an upload rate cap.

use std::net::SocketAddr;
use std::sync::Arc;

use shoal_core::TaskId;
use shoal_proto::peer::{peer_request::Request, PeerRequest, PieceHeader, PieceUpdate, Refusal};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::tls::{self, ClusterTls, TlsError};
use super::wire;
use super::{PeerClient, PeerTraffic};
use crate::engine::{Engine, Shared};
use crate::ratelimit::RateLimiter;

/// How long a source holds a new piece back from all but the one subscriber it was handed to.
/// The others get it from that child; this is only the fallback for children that do not have
/// it as a parent (or when it fails to fetch the piece).
const HOLD: std::time::Duration = std::time::Duration::from_secs(8);

/// Subscriptions per task, so a source can hand each new piece to one child first.
#[derive(Default)]
struct Subscribers {
    tasks: std::sync::Mutex<std::collections::HashMap<TaskId, (u64, usize)>>,
}

impl Subscribers {
    /// A new subscription: its turn number.
    fn join(&self, task: &TaskId) -> u64 {
        let mut t = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let e = t.entry(task.clone()).or_insert((0, 0));
        e.0 += 1;
        e.1 += 1;
        e.0 - 1
    }

    fn leave(&self, task: &TaskId) {
        let mut t = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = t.get_mut(task) {
            e.1 = e.1.saturating_sub(1);
            if e.1 == 0 {
                t.remove(task);
            }
        }
    }

    /// Subscriptions open now.
    fn count(&self, task: &TaskId) -> usize {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).get(task).map_or(0, |e| e.1)
    }
}

/// Longest a piece's upload slot stays taken waiting for the child to acknowledge the bytes.
const DELIVERY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Bytes read from the store and written to the stream at a time.
const SEND_CHUNK: usize = 256 << 10;
/// Bytes read and written at a time under an upload rate cap.
const PACED_WRITE: usize = 16 << 10;

/// How the peer server runs.
#[derive(Clone, Debug)]
pub struct PeerServerConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Pieces sent at once; further requests are answered "busy" and go elsewhere.
    pub upload_slots: usize,
    /// Cap on piece bytes sent per second, over all children; 0 = none.
    pub upload_rate: u64,
    /// Mutual TLS with a cluster CA; self-signed when absent.
    pub cluster_tls: Option<ClusterTls>,
    /// Testing only: flip a byte in every piece sent, to exercise other peers' checks.
    pub corrupt_pieces: bool,
    /// A seed: asked for a task it lacks, it fetches it from the origin.
    pub seed: bool,
}

/// A running peer server.
pub struct PeerServer {
    endpoint: quinn::Endpoint,
    client: PeerClient,
    /// Connections this host's client opened, served like accepted ones.
    opened: tokio::sync::mpsc::UnboundedReceiver<quinn::Connection>,
    traffic: PeerTraffic,
}

impl PeerServer {
    /// Binds the server, whose connections' traffic joins `metrics`; [`PeerServer::run`] serves it.
    pub fn bind(config: &PeerServerConfig, metrics: &shoal_core::metrics::Metrics) -> Result<PeerServer, TlsError> {
        let server = tls::server_config(config.cluster_tls.as_ref())?;
        let endpoint = super::endpoint(config.listen, Some(server))
            .map_err(|e| TlsError::Quic(format!("cannot listen on udp {}: {e}", config.listen)))?;
        let (serve, opened) = tokio::sync::mpsc::unbounded_channel();
        let client = PeerClient::sharing(endpoint.clone(), config.cluster_tls.as_ref(), serve)?;
        let traffic = PeerTraffic::default();
        metrics.register_collector(Box::new(traffic.clone()));
        Ok(PeerServer { endpoint, client, opened, traffic })
    }

    /// The client for this host's own fetches, sharing the server's endpoint and connections.
    pub fn client(&self) -> PeerClient {
        self.client.clone()
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves until `shutdown`.
    pub async fn run(mut self, engine: Arc<Engine>, config: PeerServerConfig, shutdown: CancellationToken) {
        if config.corrupt_pieces {
            warn!("FAULT INJECTION: this host corrupts every piece it serves (testing only)");
        }
        let uploads = Arc::new(Uploads {
            slots: Arc::new(Semaphore::new(config.upload_slots.max(1))),
            rate: (config.upload_rate > 0).then(|| RateLimiter::new(config.upload_rate)),
            started: Default::default(),
        });
        let subscribers = Arc::new(Subscribers::default());
        let serving = Serving {
            engine,
            uploads,
            subscribers,
            traffic: self.traffic.clone(),
            corrupt: config.corrupt_pieces,
            seed: config.seed,
            authenticated: config.cluster_tls.is_some(),
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                i = self.endpoint.accept() => match i {
                    Some(incoming) => {
                        let (serving, client) = (serving.clone(), self.client.clone());
                        tokio::spawn(async move {
                            match incoming.await {
                                Ok(conn) => {
                                    client.adopt(&conn);
                                    serving.connection(conn).await;
                                }
                                Err(e) => info!(error = %e, "peer connection refused"),
                            }
                        });
                    }
                    None => break,
                },
                Some(conn) = self.opened.recv() => {
                    tokio::spawn(serving.clone().connection(conn));
                }
            }
        }
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

/// What serving a connection needs.
#[derive(Clone)]
struct Serving {
    engine: Arc<Engine>,
    uploads: Arc<Uploads>,
    subscribers: Arc<Subscribers>,
    traffic: PeerTraffic,
    corrupt: bool,
    seed: bool,
    /// Every requester was authenticated by the cluster CA (mutual TLS).
    authenticated: bool,
}

impl Serving {
    /// Answers the requests arriving on `conn` until it closes.
    async fn connection(self, conn: quinn::Connection) {
        let remote = conn.remote_address();
        self.traffic.opened(&conn);
        let queue = QueueSlot::default();
        while let Ok((send, recv)) = conn.accept_bi().await {
            let (s, queue) = (self.clone(), queue.clone());
            tokio::spawn(async move {
                match serve_stream(&s, &queue, send, recv).await {
                    // The child stopped reading: it ended a subscription to a parent it dropped,
                    // or gave up on a piece. Routine, not an error.
                    Ok(()) | Err(wire::WireError::Write(quinn::WriteError::Stopped(_))) => {}
                    Err(e) => debug!(%remote, error = %e, "peer request ended with an error"),
                }
            });
        }
        self.traffic.closed(&conn);
    }
}

/// The upload slot the queued requests of one connection share (`GetPiece.queued`): taken by
/// the first, freed when the last of those in flight at once ends.
#[derive(Clone, Default)]
struct QueueSlot(Arc<std::sync::Mutex<std::sync::Weak<tokio::sync::OwnedSemaphorePermit>>>);

impl QueueSlot {
    /// The shared slot, taken now if no queued request holds it; `None` when every slot is taken.
    fn join(&self, slots: &Arc<Semaphore>) -> Option<Arc<tokio::sync::OwnedSemaphorePermit>> {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(permit) = held.upgrade() {
            return Some(permit);
        }
        let permit = Arc::new(slots.clone().try_acquire_owned().ok()?);
        *held = Arc::downgrade(&permit);
        Some(permit)
    }
}

/// What the uploads of this host share: its slots and its rate cap.
struct Uploads {
    slots: Arc<Semaphore>,
    rate: Option<RateLimiter>,
    /// When a seed last started sending each piece of a task several children fetch (see
    /// [`RESEND_AFTER`]).
    started: std::sync::Mutex<std::collections::HashMap<(TaskId, u32), std::time::Instant>>,
}

/// A seed holding a whole task sends a piece again only this long after it last started sending
/// it; until then a request for it is "busy", and the child asks for another piece or gets this
/// one from the child that has it. (A subscription to a complete seed ends with its first update,
/// so the hold of subscriptions does not apply.) Children asking for the same rarest piece at once
/// otherwise all get it: a fifth of the seed's uplink went on pieces it had just sent, and 16
/// nodes took 1.27–1.33× the bound from a preheated seed; 1.13× this way.
const RESEND_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

impl Uploads {
    /// Whether piece `n` of `task` may go out now; if so, it is noted as sent now.
    fn may_resend(&self, task: &TaskId, n: u32) -> bool {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let key = (task.clone(), n);
        if started.get(&key).is_some_and(|&at| now.duration_since(at) < RESEND_AFTER) {
            return false;
        }
        if started.len() >= 4096 {
            started.retain(|_, at| now.duration_since(*at) < RESEND_AFTER);
        }
        started.insert(key, now);
        true
    }
}

/// The task a request names, if this host may serve it to the requester: held here, fetched
/// from the registry the request names, and public unless the requester is an authenticated
/// cluster member. Otherwise the refusal.
async fn servable(serving: &Serving, task_id: &str, registry: &str) -> Result<Shared, (Refusal, String)> {
    let refused = refusal(serving, task_id, registry).await;
    if refused.is_err() {
        serving.engine.peer_refusal();
    }
    refused
}

async fn refusal(serving: &Serving, task_id: &str, registry: &str) -> Result<Shared, (Refusal, String)> {
    let Some(shared) = TaskId::parse(task_id).and_then(|id| serving.engine.shared(&id)) else {
        return Err((Refusal::NotFound, "task not found".into()));
    };
    if shared.registry().as_deref() != Some(registry) {
        return Err((Refusal::NotFound, format!("task not found from registry {registry:?}")));
    }
    if !serving.authenticated && !serving.engine.shareable(&shared).await {
        return Err((Refusal::Forbidden, "private blob: shared only over mutual TLS with the cluster CA".into()));
    }
    Ok(shared)
}

async fn serve_stream(
    serving: &Serving,
    queue: &QueueSlot,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), wire::WireError> {
    let (engine, uploads, subscribers, corrupt, seed) =
        (&serving.engine, &serving.uploads, &serving.subscribers, serving.corrupt, serving.seed);
    let req: PeerRequest = wire::read(&mut recv).await?;
    // A request is the whole of its stream (the client finishes it at once).
    wire::read_end(&mut recv).await;
    match req.request {
        Some(Request::GetPiece(g)) => {
            let refuse = |refusal: Refusal, error: &str| PieceHeader {
                number: g.number,
                error: error.into(),
                refusal: refusal as i32,
                ..Default::default()
            };
            let shared = match servable(serving, &g.task_id, &g.registry).await {
                Ok(shared) => shared,
                Err((refusal, reason)) => {
                    wire::write(&mut send, &refuse(refusal, &reason)).await?;
                    finish(send);
                    return Ok(());
                }
            };
            let file = shared.file();
            let (Some(blake3), true) = (file.piece_blake3(g.number), file.has_piece(g.number)) else {
                wire::write(&mut send, &refuse(Refusal::NotPresent, "piece not present")).await?;
                finish(send);
                return Ok(());
            };
            // A request that finds every slot taken is turned away at once, so the child asks
            // another holder now instead of queueing here. (Waiting up to 300 ms for a slot made
            // a 32-node fan-out finish about 3 % later, and waiting 1.5 s about 8 %.)
            // A seed holding the whole task also turns away a piece it has just sent (only once
            // it has a slot, so a piece is noted as sent only when it goes out).
            // Queued requests (a range read's pieces) share one slot per connection.
            let permit = if g.queued { queue.join(&uploads.slots) } else { uploads.slots.clone().try_acquire_owned().ok().map(Arc::new) };
            let Some(_permit) = permit.filter(|_| !(seed && shared.is_complete()) || uploads.may_resend(file.id(), g.number)) else {
                engine.peer_busy_refusal();
                wire::write(&mut send, &refuse(Refusal::Busy, "busy")).await?;
                finish(send);
                return Ok(());
            };
            let range = file.layout().range(g.number);
            let header = PieceHeader {
                number: g.number,
                offset: range.start,
                length: range.end - range.start,
                blake3,
                error: String::new(),
                refusal: Refusal::None as i32,
            };
            wire::write(&mut send, &header).await?;
            // Under a rate cap, pieces go out paced in small writes, so the bytes leave at the
            // cap instead of queueing in the link's buffer.
            let step = if uploads.rate.is_some() { PACED_WRITE } else { SEND_CHUNK };
            let mut pos = range.start;
            while pos < range.end {
                let len = ((range.end - pos) as usize).min(step);
                let f = file.clone();
                let chunk = tokio::task::spawn_blocking(move || f.read_vec(pos, len)).await;
                let mut chunk = match chunk {
                    Ok(Ok(c)) if c.len() == len => c,
                    _ => {
                        let _ = send.reset(1u32.into());
                        return Ok(());
                    }
                };
                if corrupt && pos == range.start {
                    chunk[0] ^= 0xff;
                }
                if let Some(rate) = &uploads.rate {
                    rate.acquire(len as u64).await;
                }
                send.write_all(&chunk).await?;
                pos += len as u64;
            }
            // The slot is held until the child has the bytes, not just until they are queued:
            // otherwise every request gets a slot at once, they all share the uplink, and each
            // piece takes as long as all of them together.
            let _ = send.finish();
            let _ = tokio::time::timeout(DELIVERY_WAIT, send.stopped()).await;
            engine.peer_sent(range.end - range.start);
            Ok(())
        }
        Some(Request::Subscribe(s)) => {
            if seed {
                start_for_child(serving, &s).await;
            }
            let shared = match servable(serving, &s.task_id, &s.registry).await {
                Ok(shared) => shared,
                Err((refusal, reason)) => {
                    let refused = PieceUpdate { error: reason, refusal: refusal as i32, ..Default::default() };
                    wire::write(&mut send, &refused).await?;
                    finish(send);
                    return Ok(());
                }
            };
            let file = shared.file();
            let len = file.layout().len;
            let mut changes = shared.changes();
            let mut sent = shoal_core::piece::Bitmap::new(file.layout().count());
            let task = file.id().clone();
            let me = subscribers.join(&task);
            let mut first_seen: std::collections::HashMap<u32, std::time::Instant> = std::collections::HashMap::new();
            // Whether this host fetched the task from the origin while the child watched, or is a
            // seed that holds the whole task while several children fetch it: then pieces are
            // held back from the child (below), even after the download here completes.
            let mut holding = false;
            let result = async {
                loop {
                    if let Some(rx) = changes.as_mut() {
                        rx.borrow_and_update();
                    }
                    let have = file.bitmap();
                    let (complete, failed) = (shared.is_complete(), shared.failure());
                    // While this host fetches from the origin, its upload is the cluster's
                    // scarcest resource: each piece it fetched from there goes to one subscriber
                    // only (in turn), so it leaves here about once and the children trade it
                    // among themselves; after HOLD, to everyone. Pieces it got from peers (the
                    // other stripes) go to everyone at once. A seed holding a preheated task is
                    // the same scarce source (16 nodes: 1.24× the bound this way, 1.32× when it
                    // offered every piece to every child).
                    let others = subscribers.count(&task);
                    let sourced = shared.sourced();
                    holding |= (sourced.is_some() && !complete || seed && complete) && others > 1;
                    let now = std::time::Instant::now();
                    let numbers: Vec<u32> = (0..have.len())
                        .filter(|&n| have.has(n) && !sent.has(n))
                        .filter(|&n| {
                            !holding
                                || sourced.as_ref().is_some_and(|s| !s.has(n))
                                || (n as u64 + me).is_multiple_of(others.max(1) as u64)
                                || now.duration_since(*first_seen.entry(n).or_insert(now)) >= HOLD
                        })
                        .collect();
                    for &n in &numbers {
                        sent.set(n);
                    }
                    // "Done" tells the child every piece is here: not before the held ones are out.
                    let done = complete && sent.is_full();
                    let update =
                        PieceUpdate { numbers, done, task_length: len, error: failed.unwrap_or_default(), refusal: Refusal::None as i32 };
                    let last = update.done || !update.error.is_empty();
                    if !update.numbers.is_empty() || last || sent.count() == 0 {
                        wire::write(&mut send, &update).await?;
                        engine.peer_update_sent();
                    }
                    if last {
                        return Ok(true);
                    }
                    match changes.as_mut() {
                        Some(rx) => match tokio::time::timeout(HOLD / 8, rx.changed()).await {
                            Ok(Ok(())) | Err(_) => {}
                            // The task ended between two looks; one more round reports how.
                            Ok(Err(_)) => changes = None,
                        },
                        // Complete here, with pieces still held back from this child.
                        None if complete => tokio::time::sleep(HOLD / 8).await,
                        None => return Ok(false),
                    }
                }
            }
            .await;
            subscribers.leave(&task);
            match result {
                Ok(true) => {
                    finish(send);
                    Ok(())
                }
                Ok(false) => {
                    let _ = send.reset(2u32.into());
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        None => {
            finish(send);
            Ok(())
        }
    }
}

/// A seed asked for a task it lacks starts fetching it, so the child can follow. A client's
/// credentials are used only from an authenticated cluster member; otherwise the seed fetches
/// with its own (configured) ones, or none.
async fn start_for_child(serving: &Serving, s: &shoal_proto::peer::SubscribePieces) {
    let engine = &serving.engine;
    let Some(id) = TaskId::parse(&s.task_id) else { return };
    if engine.shared(&id).is_some() {
        return;
    }
    let Ok(digest) = s.digest.parse::<shoal_core::Digest>() else { return };
    let valid = TaskId::of_digest(&digest) == id
        && shoal_core::reference::is_registry_host(&s.registry)
        && shoal_core::reference::is_repository(&s.repository);
    if !valid {
        return;
    }
    let origin = crate::engine::Origin {
        registry: s.registry.clone(),
        repository: s.repository.clone(),
        digest,
        authorization: http::HeaderValue::from_str(&s.authorization).ok().filter(|_| serving.authenticated && !s.authorization.is_empty()),
    };
    info!(task = %id, registry = %origin.registry, "seed fetching a task for a child");
    if let Err(e) = engine.fetch_ahead(&origin, s.length).await {
        warn!(task = %id, error = %e, "seed cannot fetch the task");
    }
}

fn finish(mut send: quinn::SendStream) {
    let _ = send.finish();
}
