//! The scheduler's view of the cluster: hosts, and for each task the peers downloading or holding
//! it with their piece bitmaps. Everything is rebuilt from announcements, so a restarted scheduler
//! needs no database. Time is passed in (milliseconds) so decisions are deterministic in tests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use shoal_core::piece::{stripe_request_pieces, Bitmap, PieceLayout};
use shoal_core::TaskId;

use crate::hosts::{HostId, HostInfo, Hosts, FAILURE_LIMIT};
pub use crate::parents::Limits;
use crate::parents::{choose, Candidate};

/// Largest task the scheduler tracks (1 TiB): a bound on what one announcement may make it allocate.
pub const MAX_TASK_LEN: u64 = 1 << 40;

/// Where a peer stands in its download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerStatus {
    Running,
    Done,
    Failed,
}

/// What a peer should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Fetch pieces from these hosts, best first.
    Parents(Vec<HostId>),
    /// Fetch these pieces from the origin, and report each one's digest. A stripe of a cold task
    /// (see [`Task::stripes`]), or every piece.
    BackToSource(Range<u32>),
    /// Nobody can serve now and the origin is busy with others; ask again shortly.
    Wait,
}

/// Why an announcement was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("host {0} has not announced itself")]
    UnknownHost(HostId),
    #[error("task {0} is not registered by this peer")]
    UnknownPeer(TaskId),
    #[error("task {task}: length {got} does not match the {known} bytes other peers reported")]
    LengthMismatch { task: TaskId, known: u64, got: u64 },
    #[error("task {task}: length {len} is larger than the {MAX_TASK_LEN}-byte limit")]
    TooLarge { task: TaskId, len: u64 },
    #[error("task {task}: piece {piece} is out of range")]
    PieceOutOfRange { task: TaskId, piece: u32 },
    #[error("task {task}: piece {piece} digest {got} differs from the {known} its first source reported")]
    DigestMismatch { task: TaskId, piece: u32, known: String, got: String },
}

/// One peer of one task.
#[derive(Clone, Debug)]
struct Peer {
    bitmap: Bitmap,
    status: PeerStatus,
    parents: Vec<HostId>,
    depth: u32,
    back_to_source: bool,
    /// The stripe of the task this peer fetches from the origin, while it does.
    stripe: Option<usize>,
    /// Parents this peer reported as failing, and until when (ms) they are not offered to it:
    /// for ever after a wrong answer, for [`UNREACHABLE_FOR_MS`] when it could not reach them.
    bad_parents: HashMap<HostId, u64>,
}

impl Peer {
    fn avoids(&self, parent: &HostId, now: u64) -> bool {
        self.bad_parents.get(parent).is_some_and(|&until| now < until)
    }
}

/// How long a parent a child could not reach is not offered to that child again. Unreachable
/// mostly means congested (a full uplink drops the handshake), which passes; a host that died
/// leaves through its own streams and announcements.
pub const UNREACHABLE_FOR_MS: u64 = 10_000;

/// One task as the cluster knows it.
#[derive(Clone, Debug)]
struct Task {
    layout: PieceLayout,
    /// blake3 (hex) of each piece, as the peer that fetched it from the origin reported it.
    digests: Vec<Option<String>>,
    peers: BTreeMap<HostId, Peer>,
    /// With no seed, a cold task comes from the origin in stripes, each fetched by a different
    /// peer: every source's uplink then carries only its share of first copies, so none is the
    /// bottleneck, and the registry still sends each byte once.
    stripes: Vec<Stripe>,
    /// Owners whose stripe a split shortened, and where it now ends, until the service tells
    /// them (see [`Cluster::take_stripe_ends`]).
    stripe_ends: Vec<(HostId, u32)>,
}

/// Consecutive pieces one peer fetches from the origin.
#[derive(Clone, Debug)]
struct Stripe {
    pieces: Range<u32>,
    owner: Option<HostId>,
    /// Pieces per origin request of its owner (see [`stripe_request_pieces`]), from the range
    /// it was given.
    request: u32,
}

/// A stripe holds at least this many pieces: below that, splitting buys less than the extra
/// requests cost.
pub const MIN_STRIPE_PIECES: u32 = 16;

/// Stripes per source: a source that finishes its stripe early takes another, so a source with a
/// slower path to the origin fetches less, and every source finishes at about the same time.
pub const STRIPES_PER_SOURCE: u32 = 2;

/// `count` pieces cut into at most `STRIPES_PER_SOURCE × max` stripes of nearly equal length.
fn stripes_for(count: u32, max: usize) -> Vec<Stripe> {
    let n = (count / MIN_STRIPE_PIECES).clamp(1, STRIPES_PER_SOURCE * max.max(1) as u32);
    (0..n).map(|i| Stripe { pieces: count * i / n..count * (i + 1) / n, owner: None, request: 0 }).collect()
}

impl Task {
    /// Whether every piece of stripe `i` has a recorded digest.
    fn stripe_done(&self, i: usize) -> bool {
        self.stripes[i].pieces.clone().all(|n| self.digests[n as usize].is_some())
    }

    /// A stripe nobody fetches and whose pieces are not all known yet.
    fn free_stripe(&self) -> Option<usize> {
        (0..self.stripes.len()).find(|&i| self.stripes[i].owner.is_none() && !self.stripe_done(i))
    }

    /// When no stripe is free: splits the stripe with the most pieces still to come from the
    /// origin (fetched by another source, which has a slower path or a busier downlink) and
    /// returns the second half as a new stripe, so a source done early works on what would
    /// otherwise come last. The split leaves the owner at least two of its requests
    /// ([`Stripe::request`]) after its first unreported piece; the owner stops where
    /// the new stripe's first digest appears. `None` when no stripe has enough left to share.
    fn split_stripe(&mut self, host: &HostId) -> Option<usize> {
        // A task too small to stripe is not split either: one source is enough.
        if self.layout.count() < 2 * MIN_STRIPE_PIECES {
            return None;
        }
        let (i, first) = (0..self.stripes.len())
            .filter(|&i| self.stripes[i].owner.as_ref().is_some_and(|o| o != host))
            .filter_map(|i| {
                let pieces = self.stripes[i].pieces.clone();
                pieces.clone().find(|&n| self.digests[n as usize].is_none()).map(|first| (i, first))
            })
            .max_by_key(|&(i, first)| self.stripes[i].pieces.end - first)?;
        let (end, request) = (self.stripes[i].pieces.end, self.stripes[i].request);
        let left = end - first;
        if left < 3 * request {
            return None;
        }
        // Two requests' worth ahead of the owner: the one it is likely fetching, and the next,
        // which it may start before the new stripe's first digest reaches it.
        let mid = first + (left / 2).max(2 * request);
        self.stripes[i].pieces.end = mid;
        if let Some(owner) = self.stripes[i].owner.clone() {
            self.stripe_ends.push((owner, mid));
        }
        self.stripes.push(Stripe { pieces: mid..end, owner: None, request: 0 });
        Some(self.stripes.len() - 1)
    }

    /// Peers fetching from the origin now.
    fn sources(&self) -> usize {
        self.peers.values().filter(|p| p.back_to_source && p.status == PeerStatus::Running).count()
    }

    /// Gives up `host`'s stripe, if it has one, so another peer can take what is left of it.
    fn release_stripe(&mut self, host: &HostId) {
        if let Some(i) = self.peers.get_mut(host).and_then(|p| p.stripe.take()) {
            self.stripes[i].owner = None;
        }
    }
}

/// A summary of one task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskStat {
    pub layout: PieceLayout,
    pub peers: usize,
    pub done: usize,
    /// Pieces whose digest is known.
    pub known_pieces: u32,
}

/// Whether peer `id` of task `t` has a path to the origin: it fetches from the origin, is done,
/// is a seed that has not started (it will fetch when asked), or has a parent that does. Peers
/// waiting on each other in a cycle have none.
fn sourced(t: &Task, hosts: &Hosts, id: &HostId, seen: &mut HashSet<HostId>) -> bool {
    if !seen.insert(id.clone()) {
        return false;
    }
    match t.peers.get(id) {
        None => hosts.get(id).is_some_and(|h| h.info.seed),
        Some(p) => match p.status {
            PeerStatus::Done => true,
            PeerStatus::Failed => false,
            PeerStatus::Running => p.back_to_source || p.parents.iter().any(|parent| sourced(t, hosts, parent, seen)),
        },
    }
}

/// Hosts and tasks.
#[derive(Debug, Default)]
pub struct Cluster {
    hosts: Hosts,
    tasks: HashMap<TaskId, Task>,
    limits: Limits,
}

impl Cluster {
    /// An empty cluster with these limits.
    pub fn new(limits: Limits) -> Cluster {
        Cluster { hosts: Hosts::default(), tasks: HashMap::new(), limits }
    }

    /// The hosts.
    pub fn hosts(&self) -> &Hosts {
        &self.hosts
    }

    /// Adds or refreshes a host. True when it restarted (a new incarnation): it is then no
    /// longer a peer or a parent in any task, as after [`Cluster::leave_host`], since its store
    /// may be gone.
    pub fn announce_host(&mut self, info: HostInfo, now: u64) -> bool {
        let id = info.id.clone();
        let restarted = self.hosts.announce(info, now);
        if restarted {
            let ids: Vec<TaskId> = self.tasks.keys().cloned().collect();
            for t in &ids {
                self.remove_peer(t, &id);
            }
            // Nor is it anyone's parent: its children reschedule when it refuses them.
            for t in self.tasks.values_mut() {
                for peer in t.peers.values_mut() {
                    if peer.parents.contains(&id) {
                        peer.parents.retain(|p| p != &id);
                        self.hosts.release_uploads([&id]);
                    }
                }
            }
        }
        restarted
    }

    /// A host left (or stopped announcing): its peers are gone and its children must reschedule.
    pub fn leave_host(&mut self, id: &HostId) {
        self.hosts.remove(id);
        let ids: Vec<TaskId> = self.tasks.keys().cloned().collect();
        for t in ids {
            self.remove_peer(&t, id);
        }
    }

    /// A host starts downloading `task` (of `len` bytes). Returns what it should do.
    pub fn register(&mut self, task: &TaskId, len: u64, host: &HostId, now: u64) -> Result<Decision, ClusterError> {
        if self.hosts.get(host).is_none() {
            return Err(ClusterError::UnknownHost(host.clone()));
        }
        if len > MAX_TASK_LEN {
            return Err(ClusterError::TooLarge { task: task.clone(), len });
        }
        let max_sources = self.limits.max_back_to_source;
        let t = self.tasks.entry(task.clone()).or_insert_with(|| {
            let layout = PieceLayout::for_len(len);
            let stripes = stripes_for(layout.count(), max_sources);
            Task { layout, digests: vec![None; layout.count() as usize], peers: BTreeMap::new(), stripes, stripe_ends: Vec::new() }
        });
        if t.layout.len != len {
            return Err(ClusterError::LengthMismatch { task: task.clone(), known: t.layout.len, got: len });
        }
        let count = t.layout.count();
        t.peers.entry(host.clone()).or_insert_with(|| Peer {
            bitmap: Bitmap::new(count),
            status: PeerStatus::Running,
            parents: Vec::new(),
            depth: 0,
            back_to_source: false,
            stripe: None,
            bad_parents: HashMap::new(),
        });
        self.schedule(task, host, now)
    }

    /// The sources of `task` whose stripe was shortened since the last call, and where each now
    /// ends. A source learns only from digests that another took the rest of its stripe, and a
    /// slow new source reports its first piece late: told at once, the old one stops in time and
    /// the origin sends no piece twice.
    pub fn take_stripe_ends(&mut self, task: &TaskId) -> Vec<(HostId, u32)> {
        self.tasks.get_mut(task).map(|t| std::mem::take(&mut t.stripe_ends)).unwrap_or_default()
    }

    /// Chooses parents for `host`'s download of `task` (again, after a parent failed), or sends
    /// it to the origin.
    pub fn schedule(&mut self, task: &TaskId, host: &HostId, now: u64) -> Result<Decision, ClusterError> {
        let child_host = self.hosts.get(host).ok_or_else(|| ClusterError::UnknownHost(host.clone()))?;
        let (zone, idc) = (child_host.info.zone.clone(), child_host.info.idc.clone());
        let t = self.tasks.get(task).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        let child = t.peers.get(host).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        if (child.back_to_source && child.stripe.is_none()) || child_host.info.seed {
            // Seeds always fetch from the origin themselves: that is what they are for, and it
            // keeps a seed from ever waiting on the children waiting on it.
            return self.send_to_source(task, host);
        }
        // A seed out of upload slots still fetches the task: its children feed the rest.
        let seeded = self.hosts.healthy_seeds(now).any(|s| &s.info.id != host && !child.avoids(&s.info.id, now));
        if let Some(d) = self.take_stripe(task, host, seeded) {
            return Ok(d);
        }
        let t = self.tasks.get(task).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        let child = t.peers.get(host).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        let striping = child.stripe.is_some();
        let candidates: Vec<Candidate> = t
            .peers
            .iter()
            // Two peers may feed each other different pieces (as in a swarm); `sourced` keeps a
            // group that only waits on itself from being chosen.
            .filter(|(id, p)| *id != host && p.status != PeerStatus::Failed)
            .filter_map(|(id, p)| {
                let h = self.hosts.get(id)?;
                let useful = (0..t.layout.count()).filter(|&n| p.bitmap.has(n) && !child.bitmap.has(n)).count() as u32;
                let done = p.status == PeerStatus::Done;
                Some(Candidate {
                    host: id.clone(),
                    seed: h.info.seed,
                    useful,
                    feeding: !done && sourced(t, &self.hosts, id, &mut HashSet::new()),
                    depth: if done { 0 } else { p.depth },
                    same_zone: !zone.is_empty() && h.info.zone == zone,
                    same_idc: !idc.is_empty() && h.info.idc == idc,
                    failures: h.recent_failures(now),
                    free_slots: h.info.upload_slots.saturating_sub(h.uploads),
                    failed_this_child: child.avoids(id, now),
                })
            })
            .collect();
        let mut parents = choose(&candidates, &self.limits);
        let mut back_to_source = striping;
        if parents.is_empty() && !striping {
            // No peer can help: a seed fetches the task for everyone, else one peer goes to the origin.
            let seed =
                self.hosts.seeds(now).into_iter().find(|s| &s.info.id != host && !child.avoids(&s.info.id, now)).map(|s| s.info.id.clone());
            match seed {
                Some(s) => parents.push(s),
                // A seed is only out of upload slots: one frees up soon.
                None if seeded => return Ok(Decision::Wait),
                None => {
                    // Every stripe is taken or fetched: while a source still fetches, the
                    // pieces are coming; fetching the whole task once more would not be faster.
                    if t.sources() > 0 && t.peers.len() > 1 {
                        return Ok(Decision::Wait);
                    }
                    // Peers that have (or are getting) the data and are only out of upload slots,
                    // or too deep for now: a slot frees up soon, so wait for it rather than fetch
                    // the blob from the origin once more.
                    if candidates.iter().any(|c| (c.useful > 0 || c.feeding) && !c.failed_this_child && c.failures < FAILURE_LIMIT) {
                        return Ok(Decision::Wait);
                    }
                    back_to_source = true;
                }
            }
        }
        let depth = parents
            .iter()
            .filter_map(|p| t.peers.get(p).map(|pp| if pp.status == PeerStatus::Done { 0 } else { pp.depth }))
            .min()
            .map_or(1, |d| d + 1);
        let old_parents = t.peers.get(host).map(|p| p.parents.clone()).unwrap_or_default();
        self.hosts.release_uploads(&old_parents);
        for p in &parents {
            if let Some(h) = self.hosts.get_mut(p) {
                h.uploads += 1;
            }
        }
        let t = self.tasks.get_mut(task).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        let peer = t.peers.get_mut(host).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        peer.back_to_source = back_to_source;
        peer.depth = if back_to_source { 0 } else { depth };
        peer.parents = parents.clone();
        // A stripe's source fetches the rest of the task from parents like any peer.
        Ok(if back_to_source && !striping { Decision::BackToSource(0..t.layout.count()) } else { Decision::Parents(parents) })
    }

    /// With no seed to fetch for everyone: a peer whose stripe is fetched gives it up, and a peer
    /// without one takes a free stripe while fewer than `max_back_to_source` peers fetch from the
    /// origin. A taken stripe that its last owner left half done starts at its first piece
    /// nobody reported.
    fn take_stripe(&mut self, task: &TaskId, host: &HostId, seeded: bool) -> Option<Decision> {
        let max = self.limits.max_back_to_source;
        let t = self.tasks.get_mut(task)?;
        if let Some(i) = t.peers.get(host)?.stripe {
            if !t.stripe_done(i) {
                return None;
            }
            t.release_stripe(host);
            t.peers.get_mut(host)?.back_to_source = false;
        }
        if seeded || t.sources() >= max {
            return None;
        }
        let i = t.free_stripe().or_else(|| t.split_stripe(host))?;
        let pieces = t.stripes[i].pieces.clone();
        let first = pieces.clone().find(|&n| t.digests[n as usize].is_none()).unwrap_or(pieces.start);
        t.stripes[i].owner = Some(host.clone());
        t.stripes[i].request = stripe_request_pieces(pieces.end - first);
        let old = {
            let peer = t.peers.get_mut(host)?;
            peer.stripe = Some(i);
            peer.back_to_source = true;
            peer.depth = 0;
            std::mem::take(&mut peer.parents)
        };
        self.hosts.release_uploads(&old);
        Some(Decision::BackToSource(first..pieces.end))
    }

    fn send_to_source(&mut self, task: &TaskId, host: &HostId) -> Result<Decision, ClusterError> {
        let t = self.tasks.get_mut(task).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        let count = t.layout.count();
        let peer = t.peers.get_mut(host).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        let old = std::mem::take(&mut peer.parents);
        peer.back_to_source = true;
        peer.depth = 0;
        self.hosts.release_uploads(&old);
        Ok(Decision::BackToSource(0..count))
    }

    /// `host` finished piece `n` of `task`. The digest is recorded when the host fetched from the
    /// origin (or is a seed); from anyone else it must match what is recorded.
    pub fn piece_finished(&mut self, task: &TaskId, host: &HostId, n: u32, blake3: &str) -> Result<(), ClusterError> {
        let is_seed = self.hosts.get(host).is_some_and(|h| h.info.seed);
        let t = self.tasks.get_mut(task).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        if n >= t.layout.count() {
            return Err(ClusterError::PieceOutOfRange { task: task.clone(), piece: n });
        }
        let peer = t.peers.get_mut(host).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        let slot = &mut t.digests[n as usize];
        match slot {
            Some(known) if known != blake3 => {
                return Err(ClusterError::DigestMismatch { task: task.clone(), piece: n, known: known.clone(), got: blake3.to_string() })
            }
            Some(_) => {}
            None if peer.back_to_source || is_seed => *slot = Some(blake3.to_string()),
            // A peer fed by parents verified the piece against a recorded digest; nothing to add.
            None => {}
        }
        peer.bitmap.set(n);
        Ok(())
    }

    /// The recorded blake3 of piece `n`, for a child to check what a parent sends.
    pub fn piece_digest(&self, task: &TaskId, n: u32) -> Option<&str> {
        self.tasks.get(task)?.digests.get(n as usize)?.as_deref()
    }

    /// `child` could not get a piece from `parent` (or got a bad one): the parent is not offered to
    /// this child again (for a while when it was unreachable), a bad answer also marks its host
    /// failing; the child is rescheduled.
    pub fn parent_failed(
        &mut self,
        task: &TaskId,
        child: &HostId,
        parent: &HostId,
        unreachable: bool,
        now: u64,
    ) -> Result<Decision, ClusterError> {
        // A parent this child could not reach (a congested link, a host going away) is avoided by
        // this child only; wrong answers count against the host for everyone. A host that died
        // is dropped through its own streams and announcements.
        if !unreachable {
            self.hosts.record_failure(parent, now);
        }
        let t = self.tasks.get_mut(task).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        let peer = t.peers.get_mut(child).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        let until = if unreachable { now + UNREACHABLE_FOR_MS } else { u64::MAX };
        peer.bad_parents.insert(parent.clone(), until);
        self.schedule(task, child, now)
    }

    /// `host` has the whole task (verified). It becomes a parent of depth 0 and frees its parents.
    pub fn peer_done(&mut self, task: &TaskId, host: &HostId) -> Result<(), ClusterError> {
        self.finish(task, host, PeerStatus::Done)
    }

    /// `host` gave up on the task.
    pub fn peer_failed(&mut self, task: &TaskId, host: &HostId) -> Result<(), ClusterError> {
        self.finish(task, host, PeerStatus::Failed)
    }

    fn finish(&mut self, task: &TaskId, host: &HostId, status: PeerStatus) -> Result<(), ClusterError> {
        let t = self.tasks.get_mut(task).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        t.release_stripe(host);
        let peer = t.peers.get_mut(host).ok_or_else(|| ClusterError::UnknownPeer(task.clone()))?;
        peer.status = status;
        peer.back_to_source = false;
        if status == PeerStatus::Done {
            let all = peer.bitmap.len();
            for n in 0..all {
                peer.bitmap.set(n);
            }
        }
        let parents = std::mem::take(&mut peer.parents);
        self.hosts.release_uploads(&parents);
        Ok(())
    }

    fn remove_peer(&mut self, task: &TaskId, host: &HostId) {
        let Some(t) = self.tasks.get_mut(task) else { return };
        t.release_stripe(host);
        if let Some(peer) = t.peers.remove(host) {
            self.hosts.release_uploads(&peer.parents);
        }
        if t.peers.is_empty() {
            self.tasks.remove(task);
        }
    }

    /// A summary of `task`, if any peer has it.
    pub fn stat_task(&self, task: &TaskId) -> Option<TaskStat> {
        let t = self.tasks.get(task)?;
        Some(TaskStat {
            layout: t.layout,
            peers: t.peers.len(),
            done: t.peers.values().filter(|p| p.status == PeerStatus::Done).count(),
            known_pieces: t.digests.iter().filter(|d| d.is_some()).count() as u32,
        })
    }

    /// The parents currently assigned to `host` for `task`.
    pub fn parents_of(&self, task: &TaskId, host: &HostId) -> Vec<HostId> {
        self.tasks.get(task).and_then(|t| t.peers.get(host)).map(|p| p.parents.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::Digest;

    const MIB: u64 = 1 << 20;

    fn host(name: &str, seed: bool) -> HostInfo {
        HostInfo {
            id: HostId(name.into()),
            addr: "127.0.0.1:1".parse().unwrap(),
            upload_slots: 4,
            sending_slots: 1,
            incarnation: 0,
            zone: String::new(),
            idc: String::new(),
            seed,
        }
    }

    fn id(name: &str) -> HostId {
        HostId(name.into())
    }

    fn task() -> TaskId {
        TaskId::of_digest(&Digest::of(b"blob"))
    }

    fn cluster(names: &[&str]) -> Cluster {
        cluster_with_slots(&names.iter().map(|n| (*n, 4)).collect::<Vec<_>>())
    }

    /// Hosts named `seed…` are seeds; each uploads to as many children at once as it is given.
    fn cluster_with_slots(hosts: &[(&str, u32)]) -> Cluster {
        let mut c = Cluster::new(Limits::default());
        for (n, slots) in hosts {
            let mut h = host(n, n.starts_with("seed"));
            h.upload_slots = *slots;
            c.announce_host(h, 0);
        }
        c
    }

    #[test]
    fn the_first_peer_of_a_cold_task_goes_to_the_origin_and_the_rest_form_a_pipeline() {
        let mut c = cluster(&["a", "b", "c"]);
        let t = task();
        // One stripe: too few pieces to split.
        assert_eq!(c.register(&t, MIB, &id("a"), 0).unwrap(), Decision::BackToSource(0..16));
        // b attaches to a before a has any piece: a is feeding from the origin.
        assert_eq!(c.register(&t, MIB, &id("b"), 0).unwrap(), Decision::Parents(vec![id("a")]));
        c.piece_finished(&t, &id("a"), 0, "d0").unwrap();
        c.piece_finished(&t, &id("b"), 0, "d0").unwrap();
        // c takes both: a and b hold a piece it lacks (the less loaded one first).
        assert_eq!(c.register(&t, MIB, &id("c"), 0).unwrap(), Decision::Parents(vec![id("b"), id("a")]));
        assert_eq!(c.piece_digest(&t, 0), Some("d0"));
    }

    #[test]
    fn a_cold_task_is_fetched_in_stripes_by_the_first_peers() {
        let mut c = cluster(&["a", "b", "c", "d", "e"]);
        let t = task();
        // 8 MiB is 128 pieces: eight stripes of 16, one per source at a time.
        for (h, stripe) in [("a", 0..16), ("b", 16..32), ("c", 32..48), ("d", 48..64)] {
            assert_eq!(c.register(&t, 8 * MIB, &id(h), 0).unwrap(), Decision::BackToSource(stripe));
        }
        // Four sources is the limit: e fetches from them.
        let Decision::Parents(p) = c.register(&t, 8 * MIB, &id("e"), 0).unwrap() else { panic!() };
        assert_eq!(p.len(), 4, "{p:?}");
        // A source gets the rest from the others.
        let Decision::Parents(p) = c.schedule(&t, &id("a"), 0).unwrap() else { panic!() };
        assert!(!p.contains(&id("a")) && p.contains(&id("b")), "{p:?}");
        // Each source's digests are recorded for its own stripe only.
        c.piece_finished(&t, &id("a"), 0, "a0").unwrap();
        c.piece_finished(&t, &id("b"), 16, "b16").unwrap();
        assert_eq!(c.piece_digest(&t, 0), Some("a0"));
        assert_eq!(c.piece_digest(&t, 16), Some("b16"));
        // The first source done takes the next free stripe, not one another source fetches.
        for n in 17..32 {
            c.piece_finished(&t, &id("b"), n, "d").unwrap();
        }
        assert_eq!(c.schedule(&t, &id("b"), 0).unwrap(), Decision::BackToSource(64..80));
    }

    #[test]
    fn a_source_done_early_takes_the_second_half_of_the_slowest_stripe_once_none_is_free() {
        let mut c = cluster(&["a", "b", "c", "d"]);
        let t = task();
        for h in ["a", "b", "c", "d"] {
            c.register(&t, 8 * MIB, &id(h), 0).unwrap();
        }
        // a, b and c get their stripes and the four free ones; d has fetched 2 of 48..64.
        for (h, pieces) in [("a", 0..16), ("b", 16..32), ("c", 32..48)] {
            for n in pieces {
                c.piece_finished(&t, &id(h), n, "d").unwrap();
            }
        }
        c.piece_finished(&t, &id("d"), 48, "d").unwrap();
        c.piece_finished(&t, &id("d"), 49, "d").unwrap();
        for (h, pieces) in [("a", 64..80), ("b", 80..96), ("c", 96..112)] {
            assert_eq!(c.schedule(&t, &id(h), 0).unwrap(), Decision::BackToSource(pieces.clone()));
            for n in pieces {
                c.piece_finished(&t, &id(h), n, "d").unwrap();
            }
        }
        assert_eq!(c.schedule(&t, &id("a"), 0).unwrap(), Decision::BackToSource(112..128));
        for n in 112..116 {
            c.piece_finished(&t, &id("a"), n, "d").unwrap();
        }
        // Nothing free: b takes the second half of the most left to fetch (d's 50..64), then c
        // what a's 116..128 has past two requests.
        assert_eq!(c.take_stripe_ends(&t), vec![]);
        assert_eq!(c.schedule(&t, &id("b"), 0).unwrap(), Decision::BackToSource(58..64));
        assert_eq!(c.schedule(&t, &id("c"), 0).unwrap(), Decision::BackToSource(124..128));
        // Each shortened source is to be told where its stripe now ends, once.
        assert_eq!(c.take_stripe_ends(&t), vec![(id("d"), 58), (id("a"), 124)]);
        assert_eq!(c.take_stripe_ends(&t), vec![]);
        // d's stripe now ends at the split: once 50..58 are in it is done, and as no stripe
        // has 12 pieces left to share, d fetches the rest from parents.
        for n in 50..58 {
            c.piece_finished(&t, &id("d"), n, "d").unwrap();
        }
        assert!(matches!(c.schedule(&t, &id("d"), 0).unwrap(), Decision::Parents(_)));
        // The origin still sends every piece once: the stripes cover the task without overlap.
        let mut covered: Vec<u32> = c.tasks[&t].stripes.iter().flat_map(|s| s.pieces.clone()).collect();
        covered.sort_unstable();
        assert_eq!(covered, (0..128).collect::<Vec<_>>());
    }

    #[test]
    fn a_lone_peer_fetches_every_stripe_in_turn() {
        let mut c = cluster(&["a"]);
        let t = task();
        assert_eq!(c.register(&t, 8 * MIB, &id("a"), 0).unwrap(), Decision::BackToSource(0..16));
        // Half done: asking again changes nothing.
        for n in 0..8 {
            c.piece_finished(&t, &id("a"), n, "d").unwrap();
        }
        assert_eq!(c.schedule(&t, &id("a"), 0).unwrap(), Decision::Parents(vec![]));
        for n in 8..16 {
            c.piece_finished(&t, &id("a"), n, "d").unwrap();
        }
        assert_eq!(c.schedule(&t, &id("a"), 0).unwrap(), Decision::BackToSource(16..32));
    }

    #[test]
    fn a_stripe_its_source_left_half_done_goes_to_another_peer_from_where_it_stopped() {
        let mut c = cluster(&["a", "b", "c", "d", "e"]);
        let t = task();
        for h in ["a", "b", "c", "d", "e"] {
            c.register(&t, 8 * MIB, &id(h), 0).unwrap();
        }
        for n in 0..10 {
            c.piece_finished(&t, &id("a"), n, "d").unwrap();
        }
        c.leave_host(&id("a"));
        assert_eq!(c.schedule(&t, &id("e"), 0).unwrap(), Decision::BackToSource(10..16));
        // A source that gives up frees its stripe too.
        c.peer_failed(&t, &id("b")).unwrap();
        c.announce_host(host("f", false), 0);
        assert_eq!(c.register(&t, 8 * MIB, &id("f"), 0).unwrap(), Decision::BackToSource(16..32));
    }

    #[test]
    fn with_a_seed_nobody_goes_to_the_origin_but_the_seed() {
        let mut c = cluster(&["seed1", "a", "b"]);
        let t = task();
        assert_eq!(c.register(&t, 4 * MIB, &id("a"), 0).unwrap(), Decision::Parents(vec![id("seed1")]));
        assert_eq!(c.register(&t, 4 * MIB, &id("seed1"), 0).unwrap(), Decision::BackToSource(0..64));
        c.piece_finished(&t, &id("seed1"), 0, "s0").unwrap();
        let d = c.register(&t, 4 * MIB, &id("b"), 0).unwrap();
        assert_eq!(d, Decision::Parents(vec![id("seed1"), id("a")]));
    }

    #[test]
    fn a_seed_out_of_upload_slots_still_keeps_peers_from_the_origin() {
        let mut c = cluster_with_slots(&[("seed1", 1), ("a", 4), ("b", 4), ("c", 4)]);
        let t = task();
        assert_eq!(c.register(&t, 4 * MIB, &id("a"), 0).unwrap(), Decision::Parents(vec![id("seed1")]));
        assert_eq!(c.register(&t, 4 * MIB, &id("seed1"), 0).unwrap(), Decision::BackToSource(0..64));
        // The seed's one slot is a's: b and c get the blob through a, or wait, but never fetch
        // a stripe of it from the origin while the seed fetches all of it.
        for n in ["b", "c"] {
            let d = c.register(&t, 4 * MIB, &id(n), 0).unwrap();
            assert!(!matches!(d, Decision::BackToSource(_)), "{n}: {d:?}");
        }
        // Nor while the busy seed has not even registered the task yet.
        let t2 = TaskId::of_digest(&Digest::of(b"other"));
        for n in ["b", "c"] {
            let d = c.register(&t2, 4 * MIB, &id(n), 0).unwrap();
            assert_eq!(d, Decision::Wait, "{n}");
        }
    }

    #[test]
    fn a_seed_asked_for_a_task_fetches_it_from_the_origin_and_no_cycle_forms() {
        let mut c = cluster(&["seed1", "a", "b"]);
        let t = task();
        // a is pointed at the seed, which has not registered yet; b follows a.
        assert_eq!(c.register(&t, 4 * MIB, &id("a"), 0).unwrap(), Decision::Parents(vec![id("seed1")]));
        let Decision::Parents(p) = c.register(&t, 4 * MIB, &id("b"), 0).unwrap() else { panic!() };
        assert!(p.contains(&id("a")) || p.contains(&id("seed1")));
        // The seed registers when a asks it for pieces: it goes to the origin, never to b.
        assert_eq!(c.register(&t, 4 * MIB, &id("seed1"), 0).unwrap(), Decision::BackToSource(0..64));
    }

    #[test]
    fn peers_without_a_path_to_the_origin_are_not_parents() {
        let mut c = cluster(&["a", "b", "c"]);
        let t = task();
        c.register(&t, MIB, &id("a"), 0).unwrap();
        assert_eq!(c.register(&t, MIB, &id("b"), 0).unwrap(), Decision::Parents(vec![id("a")]));
        // a gives up: b, fed only by a, is no longer a useful parent for c.
        c.peer_failed(&t, &id("a")).unwrap();
        assert_eq!(c.register(&t, MIB, &id("c"), 0).unwrap(), Decision::BackToSource(0..16));
    }

    #[test]
    fn only_sources_record_digests_and_a_conflicting_digest_is_refused() {
        let mut c = cluster(&["a", "b"]);
        let t = task();
        c.register(&t, MIB, &id("a"), 0).unwrap();
        c.register(&t, MIB, &id("b"), 0).unwrap();
        // b is not a source: its report adds no digest.
        c.piece_finished(&t, &id("b"), 1, "x").unwrap();
        assert_eq!(c.piece_digest(&t, 1), None);
        c.piece_finished(&t, &id("a"), 1, "good").unwrap();
        assert_eq!(c.piece_digest(&t, 1), Some("good"));
        let err = c.piece_finished(&t, &id("b"), 1, "evil").unwrap_err();
        assert!(matches!(err, ClusterError::DigestMismatch { .. }));
        let pieces = shoal_core::piece::PieceLayout::for_len(MIB).count();
        assert!(c.piece_finished(&t, &id("a"), pieces - 1, "x").is_ok());
        assert!(matches!(c.piece_finished(&t, &id("a"), pieces, "x"), Err(ClusterError::PieceOutOfRange { .. })));
        assert!(matches!(c.register(&t, 3 * MIB, &id("b"), 0), Err(ClusterError::LengthMismatch { .. })));
        let other = TaskId::of_digest(&Digest::of(b"huge"));
        assert!(matches!(c.register(&other, u64::MAX, &id("b"), 0), Err(ClusterError::TooLarge { .. })));
    }

    #[test]
    fn a_failing_parent_is_replaced_and_then_avoided_by_everyone() {
        let mut c = cluster(&["src", "liar", "good", "x", "y", "z"]);
        let t = task();
        c.register(&t, MIB, &id("src"), 0).unwrap();
        for h in ["liar", "good"] {
            c.register(&t, MIB, &id(h), 0).unwrap();
            c.piece_finished(&t, &id("src"), 0, "d").unwrap();
            c.piece_finished(&t, &id(h), 0, "d").unwrap();
        }
        c.register(&t, MIB, &id("x"), 0).unwrap();
        assert!(c.parents_of(&t, &id("x")).contains(&id("liar")));
        let d = c.parent_failed(&t, &id("x"), &id("liar"), false, 1000).unwrap();
        let Decision::Parents(p) = d else { panic!("{d:?}") };
        assert!(!p.contains(&id("liar")) && !p.is_empty());
        // Two more children see it fail: the host is now failing for everyone.
        for h in ["y", "z"] {
            c.register(&t, MIB, &id(h), 1000).unwrap();
            c.parent_failed(&t, &id(h), &id("liar"), false, 2000).unwrap();
        }
        c.announce_host(host("w", false), 2000);
        let Decision::Parents(p) = c.register(&t, MIB, &id("w"), 3000).unwrap() else { panic!() };
        assert!(!p.contains(&id("liar")), "{p:?}");
        // After the failure window, it may be chosen again.
        c.announce_host(host("v", false), 70_000);
        let Decision::Parents(p) = c.register(&t, MIB, &id("v"), 70_000).unwrap() else { panic!() };
        assert!(p.contains(&id("liar")), "{p:?}");
    }

    #[test]
    fn an_unreachable_parent_is_avoided_by_that_child_only() {
        let mut c = cluster(&["src", "far", "x", "y", "z", "w"]);
        let t = task();
        c.register(&t, MIB, &id("src"), 0).unwrap();
        c.register(&t, MIB, &id("far"), 0).unwrap();
        c.piece_finished(&t, &id("src"), 0, "d").unwrap();
        c.piece_finished(&t, &id("far"), 0, "d").unwrap();
        for h in ["x", "y", "z"] {
            c.register(&t, MIB, &id(h), 1000).unwrap();
            let Decision::Parents(p) = c.parent_failed(&t, &id(h), &id("far"), true, 1000).unwrap() else { panic!() };
            assert!(!p.contains(&id("far")), "{p:?}");
        }
        // Three children could not reach it: a congested link, not a liar. Others still get it.
        assert_eq!(c.hosts().get(&id("far")).unwrap().recent_failures(2000), 0);
        let Decision::Parents(p) = c.register(&t, MIB, &id("w"), 2000).unwrap() else { panic!() };
        assert!(p.contains(&id("far")), "{p:?}");
        // Congestion passes: once the window is over, the children that could not reach it are
        // offered it again.
        let Decision::Parents(p) = c.schedule(&t, &id("x"), 1000 + UNREACHABLE_FOR_MS - 1).unwrap() else { panic!() };
        assert!(!p.contains(&id("far")), "{p:?}");
        let Decision::Parents(p) = c.schedule(&t, &id("x"), 1000 + UNREACHABLE_FOR_MS).unwrap() else { panic!() };
        assert!(p.contains(&id("far")), "{p:?}");
    }

    #[test]
    fn a_child_waits_for_a_free_slot_rather_than_fetch_from_the_origin_again() {
        // src uploads to one child at a time, a to none.
        let mut c = cluster_with_slots(&[("src", 1), ("a", 0), ("b", 1)]);
        let t = task();
        assert_eq!(c.register(&t, MIB, &id("src"), 0).unwrap(), Decision::BackToSource(0..16));
        for n in 0..16 {
            c.piece_finished(&t, &id("src"), n, "d").unwrap();
        }
        c.peer_done(&t, &id("src")).unwrap();
        assert_eq!(c.register(&t, MIB, &id("a"), 0).unwrap(), Decision::Parents(vec![id("src")]));
        // Nobody fetches from the origin any more and every holder is full: b waits for a slot.
        assert_eq!(c.register(&t, MIB, &id("b"), 0).unwrap(), Decision::Wait);
        // Once a finishes, src's slot is free again and b gets it.
        c.peer_done(&t, &id("a")).unwrap();
        let Decision::Parents(p) = c.schedule(&t, &id("b"), 0).unwrap() else { panic!() };
        assert!(p.contains(&id("src")), "{p:?}");
    }

    #[test]
    fn upload_slots_bound_children_per_parent() {
        let mut c = cluster_with_slots(&[("src", 2), ("a", 4), ("b", 4), ("c", 4), ("d", 4)]);
        let t = task();
        c.register(&t, MIB, &id("src"), 0).unwrap();
        c.piece_finished(&t, &id("src"), 0, "d").unwrap();
        assert_eq!(c.register(&t, MIB, &id("a"), 0).unwrap(), Decision::Parents(vec![id("src")]));
        let Decision::Parents(p) = c.register(&t, MIB, &id("b"), 0).unwrap() else { panic!() };
        assert_eq!(p[0], id("src"));
        // src is full; a is feeding from src, so c attaches to a (or b).
        let Decision::Parents(p) = c.register(&t, MIB, &id("c"), 0).unwrap() else { panic!() };
        assert!(!p.contains(&id("src")), "{p:?}");
        // When a finishes, src gets its slot back.
        c.peer_done(&t, &id("a")).unwrap();
        assert_eq!(c.hosts().get(&id("src")).unwrap().uploads, 1);
    }

    #[test]
    fn depth_is_bounded_so_a_chain_does_not_grow_forever() {
        let mut c = Cluster::new(Limits { max_parents: 1, max_depth: 2, max_back_to_source: 1, enough_peers: 2 });
        let t = task();
        for (i, n) in ["h0", "h1", "h2", "h3"].iter().enumerate() {
            let mut h = host(n, false);
            h.upload_slots = 1;
            c.announce_host(h, 0);
            let d = c.register(&t, MIB, &id(n), 0).unwrap();
            match i {
                0 => assert_eq!(d, Decision::BackToSource(0..16)),
                1 => assert_eq!(d, Decision::Parents(vec![id("h0")])),
                2 => assert_eq!(d, Decision::Parents(vec![id("h1")])),
                // h2 is at depth 2 = max_depth and h0, h1 are full: wait rather than chain deeper.
                _ => assert_eq!(d, Decision::Wait),
            }
        }
    }

    #[test]
    fn a_host_that_leaves_takes_its_peers_and_frees_its_parents() {
        let mut c = cluster(&["a", "b"]);
        let t = task();
        c.register(&t, MIB, &id("a"), 0).unwrap();
        c.register(&t, MIB, &id("b"), 0).unwrap();
        assert_eq!(c.hosts().get(&id("a")).unwrap().uploads, 1);
        c.leave_host(&id("b"));
        assert_eq!(c.hosts().get(&id("a")).unwrap().uploads, 0);
        assert_eq!(c.stat_task(&t).unwrap().peers, 1);
        c.leave_host(&id("a"));
        assert!(c.stat_task(&t).is_none());
        assert!(matches!(c.register(&t, MIB, &id("a"), 0), Err(ClusterError::UnknownHost(_))));
    }

    #[test]
    fn a_host_announcing_a_new_incarnation_is_no_longer_a_peer_of_what_it_held() {
        let mut c = Cluster::new(Limits::default());
        let announce = |c: &mut Cluster, name: &str, incarnation: u64| c.announce_host(HostInfo { incarnation, ..host(name, false) }, 0);
        assert!(!announce(&mut c, "a", 7));
        assert!(!announce(&mut c, "b", 9));
        let t = task();
        c.register(&t, MIB, &id("a"), 0).unwrap();
        c.register(&t, MIB, &id("b"), 0).unwrap();
        assert_eq!(c.stat_task(&t).unwrap().peers, 2);
        // The same incarnation again, or an agent that does not say: nothing changes.
        assert!(!announce(&mut c, "a", 7));
        assert!(!announce(&mut c, "a", 0));
        assert_eq!(c.stat_task(&t).unwrap().peers, 2);
        // a's agent restarted (its store may be empty): it is no longer b's parent or a peer.
        assert!(announce(&mut c, "a", 8));
        assert_eq!(c.stat_task(&t).unwrap().peers, 1);
        assert_eq!(c.hosts().get(&id("a")).unwrap().uploads, 0);
        assert!(c.hosts().get(&id("a")).is_some(), "it stays a known host");
    }

    #[test]
    fn a_restarted_scheduler_rebuilds_from_announcements() {
        // Nothing is persisted: the same announcements give the same view.
        let build = || {
            let mut c = cluster(&["a", "b"]);
            let t = task();
            c.register(&t, 2 * MIB, &id("a"), 0).unwrap();
            c.piece_finished(&t, &id("a"), 0, "d").unwrap();
            c.register(&t, 2 * MIB, &id("b"), 0).unwrap();
            c.stat_task(&t).unwrap()
        };
        assert_eq!(build(), build());
    }
}
