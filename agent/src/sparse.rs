//! Sparse reads: the pieces a `Range` read needs (a lazy mount's chunks), fetched without the
//! whole blob. With a scheduler, each wanted piece comes from a host that holds it, or this host
//! becomes the piece's source and fetches it from the origin, while the other hosts that want it
//! wait for it (`WantPieces`): a cluster reading the same chunks costs the registry about one copy
//! of them. Every piece from a peer is checked against the digest its source reported; since a
//! sparse task is never checked against the blob's sha256 unless it is read whole one day, the
//! reader checks what it gets (a lazy mount checks each chunk's blake3) and asks again with
//! `Cache-Control: no-cache` when it does not match ([`Engine::open_for_range`]).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    let mut fetches: JoinSet<Option<u32>> = JoinSet::new();
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
        for decided in answer.decided.into_iter().filter(|d| asked.remove(&d.number)) {
            if decided.origin {
                sourced.push(decided.number);
            } else {
                let (p2p, engine, task, notes) = (p2p.clone(), engine.clone(), task.clone(), notes.clone());
                fetches.spawn(async move { from_holders(&p2p, &engine, &task, decided, &notes).await });
            }
        }
        if !sourced.is_empty() {
            let (engine, task, notes) = (engine.clone(), task.clone(), notes.clone());
            fetches.spawn(async move {
                for n in from_origin(&engine, &task, sourced).await {
                    if let Some(blake3) = task.file.piece_blake3(n) {
                        let _ = notes.send(pb::PieceDigest { number: n, blake3 });
                    }
                }
                None
            });
        }
        // Pieces the answer left out are asked for again, like the pending ones: a piece nobody
        // fetches would keep its readers waiting.
        pending = asked.into_iter().collect();
        pending.sort_unstable();
        if pending.is_empty() {
            // Everything was decided: pieces whose holders all failed or were busy go round again.
            while let Some(done) = fetches.join_next().await {
                pending.extend(done.ok().flatten());
            }
        }
    }
    while let Some(done) = fetches.join_next().await {
        pending.extend(done.ok().flatten());
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

/// Fetches the piece `decided` names from its holders in turn, each copy checked against the
/// digest. Returns the piece when no holder gave it (after [`BUSY_PAUSE`] if only because they
/// were busy). Holders that failed are noted for the scheduler; busy ones are not at fault.
async fn from_holders(
    p2p: &Arc<P2p>,
    engine: &Arc<Engine>,
    task: &Arc<Task>,
    decided: pb::PieceSource,
    notes: &mpsc::UnboundedSender<pb::PieceDigest>,
) -> Option<u32> {
    let n = decided.number;
    let mut failed = Vec::new();
    for holder in &decided.holders {
        let Ok(addr) = holder.peer_addr.parse() else { continue };
        match fetch_piece(p2p.peers(), addr, engine, task, n, &decided.blake3).await {
            Ok(_) => {
                let _ = notes.send(pb::PieceDigest { number: n, blake3: decided.blake3.clone() });
                return None;
            }
            Err(FetchError::Busy) => debug!(task = %task.id, piece = n, holder = %holder.host_id, "a holder was busy"),
            Err(e) => {
                debug!(task = %task.id, piece = n, holder = %holder.host_id, error = ?e, "a holder did not give a piece");
                failed.push(pb::HolderFailed { number: n, holder_host_id: holder.host_id.clone() });
            }
        }
    }
    if failed.is_empty() {
        tokio::time::sleep(BUSY_PAUSE).await;
    } else {
        // At once, not batched: the scheduler must know before this piece is wanted again.
        report(p2p, task, Vec::new(), Vec::new(), failed).await;
    }
    Some(n)
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
