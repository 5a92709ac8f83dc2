//! Sparse reads: the pieces a `Range` read needs (a lazy mount's chunks), fetched without the
//! whole blob. With a scheduler, each wanted piece comes from a host that holds it, or this host
//! becomes the piece's source and fetches it from the origin, while the other hosts that want it
//! wait for it (`WantPieces`): a cluster reading the same chunks costs the registry about one copy
//! of them. Every piece from a peer is checked against the digest its source reported; since a
//! sparse task is never checked against the blob's sha256 unless it is read whole one day, the
//! reader checks what it gets (a lazy mount checks each chunk's blake3) and asks again with
//! `Cache-Control: no-cache` when it does not match ([`Engine::open_for_range`]).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use shoal_proto::scheduler as pb;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::engine::{Engine, Task};
use crate::p2p::{fetch_piece, FetchError, P2p};

/// How long one batch of pieces keeps going round `WantPieces` before the rest comes from the
/// origin without asking. The scheduler holds an undecided piece for a few seconds at most, and a
/// piece comes back for another round only when every holder it was given failed or was busy.
const CLUSTER_PATIENCE: Duration = Duration::from_secs(10);
/// Pieces of one holder's queue in flight at once: enough to hide the round trip of each
/// request, few enough that the first arrive while the rest are still asked for.
const QUEUE_DEPTH: usize = 4;
/// A piece whose holders were all busy (their upload slots also serve whole downloads, which the
/// scheduler's leases do not count) is asked for again after this pause.
const BUSY_PAUSE: Duration = Duration::from_millis(30);

/// Fetches `pieces` of sparse `task` (claimed by the caller): from peers when a scheduler is
/// configured and the blob may be shared, else (or for whatever peers did not give) from the
/// origin. A piece that cannot be had is released, so its readers go to the origin themselves.
pub(crate) async fn fetch(engine: &Arc<Engine>, task: &Arc<Task>, pieces: Vec<u32>) {
    let left = match engine.p2p() {
        Some(p2p) if p2p.may_share(engine, task).await => from_cluster(p2p, engine, task, pieces).await,
        _ => pieces,
    };
    from_origin(engine, task, left).await;
}

/// Fetches `pieces` from the origin, one ranged request per run of consecutive pieces, all at
/// once. Returns the pieces now here.
async fn from_origin(engine: &Arc<Engine>, task: &Arc<Task>, mut pieces: Vec<u32>) -> Vec<u32> {
    pieces.sort_unstable();
    let mut fetches = JoinSet::new();
    for run in runs(&pieces) {
        let (engine, task) = (engine.clone(), task.clone());
        fetches.spawn(async move {
            if let Err((next, e)) = engine.fetch_from_origin(&task, run.clone()).await {
                warn!(task = %task.id, pieces = ?(next..run.end), error = %e.to_engine(), "cannot fetch pieces for a range read; its readers go to the origin");
                engine.release(&task, next..run.end);
            }
        });
    }
    while fetches.join_next().await.is_some() {}
    pieces.retain(|&n| task.file.has_piece(n));
    pieces
}

/// Runs of consecutive numbers in sorted `pieces`.
pub(crate) fn runs(pieces: &[u32]) -> Vec<Range<u32>> {
    let mut runs: Vec<Range<u32>> = Vec::new();
    for &n in pieces {
        match runs.last_mut() {
            Some(r) if r.end == n => r.end += 1,
            _ => runs.push(n..n + 1),
        }
    }
    runs
}

/// Fetches `pieces` as the scheduler decides: from the holders it names, or from the origin for
/// the pieces this host is the source of (their digests then reported for the others). Returns
/// the pieces left for the caller to fetch from the origin unannounced: the scheduler could not be
/// asked, or no holder gave them within [`CLUSTER_PATIENCE`].
async fn from_cluster(p2p: &Arc<P2p>, engine: &Arc<Engine>, task: &Arc<Task>, pieces: Vec<u32>) -> Vec<u32> {
    let key = task.id.to_string();
    let mut pending = pieces;
    let mut fetches: JoinSet<Vec<u32>> = JoinSet::new();
    let (notes, unsent) = mpsc::unbounded_channel();
    let reporter = tokio::spawn(report_batches(p2p.clone(), task.clone(), unsent));
    let started = Instant::now();
    while !pending.is_empty() && started.elapsed() < CLUSTER_PATIENCE {
        let want = pb::WantPiecesRequest {
            task_id: key.clone(),
            host_id: p2p.host_id().to_string(),
            length: task.layout.len,
            pieces: pending.clone(),
        };
        let answer = p2p
            .schedulers()
            .call(&key, "asking where pieces are", |mut c| {
                let want = want.clone();
                async move { c.want_pieces(want).await }
            })
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                debug!(task = %task.id, error = %e, "no scheduler decides sparse reads; fetching from the origin");
                break;
            }
        };
        let mut asked: HashSet<u32> = pending.drain(..).collect();
        let mut sourced = Vec::new();
        // The pieces each holder was chosen for, fetched there as one queue sharing one upload
        // slot: the scheduler counts a slot of the holder per child, not per piece.
        let mut queues: HashMap<String, Vec<pb::PieceSource>> = HashMap::new();
        for decided in answer.decided.into_iter().filter(|d| asked.remove(&d.number)) {
            if decided.origin {
                sourced.push(decided.number);
            } else if let Some(first) = decided.holders.first() {
                queues.entry(first.host_id.clone()).or_default().push(decided);
            }
        }
        for queue in queues.into_values() {
            let (p2p, engine, task, notes) = (p2p.clone(), engine.clone(), task.clone(), notes.clone());
            fetches.spawn(async move { from_holder_queue(&p2p, &engine, &task, queue, &notes).await });
        }
        if !sourced.is_empty() {
            let (engine, task, notes) = (engine.clone(), task.clone(), notes.clone());
            fetches.spawn(async move {
                for n in from_origin(&engine, &task, sourced).await {
                    if let Some(blake3) = task.file.piece_blake3(n) {
                        let _ = notes.send(pb::PieceDigest { number: n, blake3 });
                    }
                }
                Vec::new()
            });
        }
        // Pieces the answer left out are asked for again, like the pending ones: a piece nobody
        // fetches would keep its readers waiting.
        pending = asked.into_iter().collect();
        pending.sort_unstable();
        if pending.is_empty() {
            // Everything was decided: pieces whose holders all failed or were busy go round again.
            while let Some(done) = fetches.join_next().await {
                pending.extend(done.unwrap_or_default());
            }
        }
    }
    while let Some(done) = fetches.join_next().await {
        pending.extend(done.unwrap_or_default());
    }
    drop(notes);
    let _ = reporter.await;
    pending
}

/// Tells the scheduler of the pieces this host now holds (`notes`, with their digests) as they
/// come: whatever arrived while a report was on its way goes in the next one, so a busy fetch
/// makes few calls and an idle one reports at once (a piece helps others only once the scheduler
/// knows it is here).
async fn report_batches(p2p: Arc<P2p>, task: Arc<Task>, mut notes: mpsc::UnboundedReceiver<pb::PieceDigest>) {
    while let Some(first) = notes.recv().await {
        let mut finished = vec![first];
        while let Ok(note) = notes.try_recv() {
            finished.push(note);
        }
        report(&p2p, &task, finished, Vec::new(), Vec::new()).await;
    }
}

/// Fetches the pieces the scheduler chose one holder for (`queue`), in order, [`QUEUE_DEPTH`]
/// at a time, as [`from_holders`] does each; they share one upload slot of the holder. Once
/// every holder of a piece was busy, the pieces not started yet are not tried now. Returns the
/// pieces not fetched, to ask for again.
async fn from_holder_queue(
    p2p: &Arc<P2p>,
    engine: &Arc<Engine>,
    task: &Arc<Task>,
    queue: Vec<pb::PieceSource>,
    notes: &mpsc::UnboundedSender<pb::PieceDigest>,
) -> Vec<u32> {
    let busy = std::sync::atomic::AtomicBool::new(false);
    let busy = &busy;
    let outcomes: Vec<(u32, Got)> = futures_util::stream::iter(queue)
        .map(|decided| async move {
            if busy.load(std::sync::atomic::Ordering::Relaxed) {
                return (decided.number, Got::Busy);
            }
            let got = from_holders(p2p, engine, task, &decided, notes).await;
            if matches!(got, Got::Busy) {
                busy.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            (decided.number, got)
        })
        .buffered(QUEUE_DEPTH)
        .collect()
        .await;
    if busy.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(BUSY_PAUSE).await;
    }
    outcomes.into_iter().filter(|(_, got)| !matches!(got, Got::Yes)).map(|(n, _)| n).collect()
}

/// What came of asking a piece's holders.
enum Got {
    Yes,
    /// Some holder failed (reported to the scheduler).
    Failed,
    /// Every holder was busy.
    Busy,
}

/// Fetches the piece `decided` names from its holders in turn, each copy checked against the
/// digest. Holders that failed are reported to the scheduler at once; busy ones are not at
/// fault.
async fn from_holders(
    p2p: &Arc<P2p>,
    engine: &Arc<Engine>,
    task: &Arc<Task>,
    decided: &pb::PieceSource,
    notes: &mpsc::UnboundedSender<pb::PieceDigest>,
) -> Got {
    let n = decided.number;
    let mut failed = Vec::new();
    for holder in &decided.holders {
        let Ok(addr) = holder.peer_addr.parse() else { continue };
        match fetch_piece(p2p.peers(), addr, engine, task, n, &decided.blake3, true).await {
            Ok(_) => {
                let _ = notes.send(pb::PieceDigest { number: n, blake3: decided.blake3.clone() });
                return Got::Yes;
            }
            Err(FetchError::Busy) => debug!(task = %task.id, piece = n, holder = %holder.host_id, "a holder was busy"),
            Err(e) => {
                debug!(task = %task.id, piece = n, holder = %holder.host_id, error = ?e, "a holder did not give a piece");
                failed.push(pb::HolderFailed { number: n, holder_host_id: holder.host_id.clone() });
            }
        }
    }
    if failed.is_empty() {
        return Got::Busy;
    }
    // At once, not batched: the scheduler must know before this piece is wanted again.
    report(p2p, task, Vec::new(), Vec::new(), failed).await;
    Got::Failed
}

/// Tells `task`'s scheduler replica which pieces this host now holds, which it found bad, and
/// which holders failed it.
pub(crate) async fn report(p2p: &P2p, task: &Task, finished: Vec<pb::PieceDigest>, invalid: Vec<u32>, failed: Vec<pb::HolderFailed>) {
    if finished.is_empty() && invalid.is_empty() && failed.is_empty() {
        return;
    }
    let key = task.id.to_string();
    let req = pb::ReportPiecesRequest {
        task_id: key.clone(),
        host_id: p2p.host_id().to_string(),
        length: task.layout.len,
        finished,
        invalid,
        failed,
    };
    let sent = p2p
        .schedulers()
        .call(&key, "reporting pieces", |mut c| {
            let req = req.clone();
            async move { c.report_pieces(req).await }
        })
        .await;
    if let Err(e) = sent {
        debug!(task = %task.id, error = %e, "cannot report sparse pieces");
    }
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn consecutive_pieces_make_one_run() {
        assert_eq!(runs(&[]), Vec::<std::ops::Range<u32>>::new());
        assert_eq!(runs(&[3]), vec![3..4]);
        assert_eq!(runs(&[1, 2, 3, 7, 8, 10]), vec![1..4, 7..9, 10..11]);
    }
}
