//! Sparse reads: for a host that wants only some pieces of a task (a lazy mount serving byte
//! ranges of a blob), where each piece comes from — holders that reported it, or the origin, with
//! the asker then the piece's source. Plain data, time passed in (milliseconds) like
//! [`Cluster`](crate::Cluster).
//!
//! Each piece has at most one claim on the origin at a time: the first asker fetches it and
//! reports its digest, and others wait for that report rather than fetching it again. Each
//! hand-out of a holder to an asker for one piece is a lease. A child fetches the pieces one
//! holder gave it as queued requests sharing one of that holder's upload slots, so a holder
//! serves at most as many children at once, across every task, as it has upload slots (`[peer]
//! upload_slots`, announced with the host as `sending_slots`; its peer server turns away requests
//! beyond them), and a child's further pieces go to a holder already serving it where they can.
//! A piece's first source serves a few children, each of those a few more, and so on: a fan-out
//! tree grows as children report.
//!
//! This book is separate from the whole downloads of [`Cluster`](crate::Cluster): a whole
//! download's peers are not yet offered as holders of sparse reads, nor are sparse holders
//! offered as parents of whole downloads.

use std::collections::HashMap;

use shoal_core::piece::PieceLayout;
use shoal_core::TaskId;

use crate::cluster::MAX_TASK_LEN;
use crate::hosts::{HostId, Hosts};

/// Tasks remembered at once; beyond this the least recently used one is forgotten (its pieces
/// then come from the origin again).
pub const MAX_TASKS: usize = 4096;
/// Pieces one want or one report may name (in each of its lists).
pub const MAX_PIECES_PER_CALL: usize = 4096;
/// Holders remembered per piece, newest kept: enough to spread children, few enough to stay
/// small.
pub const MAX_HOLDERS: usize = 32;
/// How long a hand-out counts against a holder when the child never reports: long enough for a
/// 16 MiB piece over a busy gigabit link, short enough that a child gone quiet frees the slot.
/// A child's k-th piece from the same holder waits for the ones before it, so its lease lasts k
/// times this, up to [`MAX_LEASE_MS`].
pub const LEASE_TTL_MS: u64 = 2_000;
/// The longest any lease lasts.
pub const MAX_LEASE_MS: u64 = 30_000;
/// How long a claim on the origin keeps other askers waiting for its digest. After that another
/// asker claims the piece too: the first source may be gone or stuck.
pub const CLAIM_TTL_MS: u64 = 5_000;
/// Holders handed out besides the chosen one, for the asker to try in order if it fails.
pub const ALTERNATIVES: usize = 2;

/// Why a want or a report was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SparseError {
    #[error("host {0} has not announced itself (announce the host before asking for pieces)")]
    UnknownHost(HostId),
    #[error("task {task}: length {got} does not match the {known} bytes hosts gave before (the blob's length is wrong on one side)")]
    LengthMismatch { task: TaskId, known: u64, got: u64 },
    #[error("task {task}: length {len} is larger than the {MAX_TASK_LEN}-byte limit")]
    TooLarge { task: TaskId, len: u64 },
    #[error("task {task}: piece {piece} is out of range (the task has {count} pieces)")]
    PieceOutOfRange { task: TaskId, piece: u32, count: u32 },
    #[error("task {task}: {got} pieces in one call, more than {MAX_PIECES_PER_CALL} (ask in smaller batches)")]
    TooManyPieces { task: TaskId, got: usize },
    #[error("task {task}: piece {piece} digest {digest:?} is not a blake3 hash in hex")]
    BadDigest { task: TaskId, piece: u32, digest: String },
}

/// Where one wanted piece comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PieceSource {
    /// Fetch it from one of `holders`, in order; every copy must match `blake3`.
    Holders { number: u32, blake3: String, holders: Vec<HostId> },
    /// The asker is the piece's source: it fetches it from the origin and reports its digest.
    Origin { number: u32 },
}

impl PieceSource {
    /// The piece this is about.
    pub fn number(&self) -> u32 {
        match self {
            PieceSource::Holders { number, .. } | PieceSource::Origin { number } => *number,
        }
    }
}

/// The answer to a want.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// Pieces whose source is decided.
    pub decided: Vec<PieceSource>,
    /// Pieces not decided yet (claimed by another host, or every holder busy): ask again.
    pub pending: Vec<u32>,
}

/// What a host reports about the pieces of one task.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Pieces it now holds, with their blake3 (hex).
    pub finished: Vec<(u32, String)>,
    /// Pieces it dropped because they did not verify downstream.
    pub invalid: Vec<u32>,
    /// Pieces it could not get from a holder it was given, and that holder.
    pub failed: Vec<(u32, HostId)>,
}

/// What a report changed, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reported {
    /// Digests recorded for the first time.
    pub recorded: usize,
    /// Pieces reported with a digest other than the recorded one (the report was ignored).
    pub conflicting: Vec<u32>,
}

/// A host fetching a piece from the origin for everyone else.
#[derive(Clone, Debug)]
struct Claim {
    /// The claimant.
    host: HostId,
    /// When it claimed (ms).
    since: u64,
}

/// What is known of one piece.
#[derive(Clone, Debug, Default)]
struct Piece {
    /// blake3 (hex), as its first source reported it.
    digest: Option<String>,
    /// Hosts that reported holding it with that digest, oldest first.
    holders: Vec<HostId>,
    /// Who fetches it from the origin now, while no digest is known.
    claim: Option<Claim>,
}

/// A holder handed to a child for one piece.
#[derive(Clone, Debug)]
struct Lease {
    task: TaskId,
    piece: u32,
    holder: HostId,
    child: HostId,
    /// When it ends if the child never reports (ms).
    until: u64,
}

/// Live hand-outs of every task; at most one per child and piece.
#[derive(Clone, Debug, Default)]
struct Leases(Vec<Lease>);

impl Leases {
    /// The loads as `child` asking now sees them, counted once per want.
    fn loads_for(&self, child: &HostId) -> Loads {
        let pairs: std::collections::HashSet<(&HostId, &HostId)> = self.0.iter().map(|l| (&l.holder, &l.child)).collect();
        let mut loads = Loads::default();
        for (holder, _) in pairs {
            *loads.children.entry(holder.clone()).or_default() += 1;
        }
        for l in self.0.iter().filter(|l| &l.child == child) {
            *loads.queued.entry(l.holder.clone()).or_default() += 1;
        }
        loads
    }

    /// Ends the leases that `keep` says no to.
    fn retain(&mut self, keep: impl FnMut(&Lease) -> bool) {
        self.0.retain(keep);
    }

    /// Ends the leases `child` has on piece `n` of `task`.
    fn end(&mut self, task: &TaskId, n: u32, child: &HostId) {
        self.0.retain(|l| !(&l.task == task && l.piece == n && &l.child == child));
    }
}

/// What the leases put on holders, for one asker's want.
#[derive(Debug, Default)]
struct Loads {
    /// Per holder, the children it is serving (those with a live lease on it): each takes one
    /// upload slot, however many pieces it fetches there.
    children: HashMap<HostId, usize>,
    /// Per holder, the asker's live leases on it (every task): its queue there.
    queued: HashMap<HostId, usize>,
}

impl Loads {
    fn children(&self, holder: &HostId) -> usize {
        self.children.get(holder).copied().unwrap_or(0)
    }

    fn queued(&self, holder: &HostId) -> usize {
        self.queued.get(holder).copied().unwrap_or(0)
    }

    /// The asker takes a lease on `holder`: a child more for it if its queue there was empty.
    fn add(&mut self, holder: &HostId) {
        let queued = self.queued.entry(holder.clone()).or_default();
        if *queued == 0 {
            *self.children.entry(holder.clone()).or_default() += 1;
        }
        *queued += 1;
    }

    /// The asker's lease on `holder` ends: a child fewer for it if its queue there is now empty.
    fn remove(&mut self, holder: &HostId) {
        let Some(queued) = self.queued.get_mut(holder) else { return };
        *queued = queued.saturating_sub(1);
        if *queued == 0 {
            if let Some(c) = self.children.get_mut(holder) {
                *c = c.saturating_sub(1);
            }
        }
    }
}

/// One task as sparse reads know it.
#[derive(Clone, Debug)]
struct Task {
    layout: PieceLayout,
    /// Only the pieces some host asked for or reported.
    pieces: HashMap<u32, Piece>,
    /// Last want or report (ms), for forgetting the least recently used task.
    last_used: u64,
    /// Turns of hand-outs, so that holders equally loaded take turns.
    turn: usize,
}

impl Task {
    fn new(layout: PieceLayout) -> Task {
        Task { layout, pieces: HashMap::new(), last_used: 0, turn: 0 }
    }

    /// Decides piece `n` of this task (`id`) for `asker`.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        id: &TaskId,
        leases: &mut Leases,
        n: u32,
        asker: &HostId,
        now: u64,
        hosts: &Hosts,
        loads: &mut Loads,
        last_chance: bool,
    ) -> Option<PieceSource> {
        let piece = self.pieces.entry(n).or_default();
        if let Some(digest) = &piece.digest {
            let alive: Vec<&HostId> =
                piece.holders.iter().filter(|h| *h != asker && hosts.get(h).is_some_and(|host| host.healthy(now))).collect();
            if !alive.is_empty() {
                let turn = self.turn % alive.len();
                // A holder already serving the asker first (the piece joins what the asker fetches
                // there, at no further slot), then holders with a free upload slot, the least
                // loaded first among them, then by turn.
                let slots = |h: &HostId| hosts.get(h).map_or(1, |host| host.info.sending_slots.max(1) as usize);
                let mut ranked: Vec<(bool, bool, usize, usize, &HostId)> = alive
                    .iter()
                    .enumerate()
                    .map(|(i, h)| {
                        let load = loads.children(h);
                        let serves = loads.queued(h) > 0;
                        (!serves && load >= slots(h), !serves, load, (i + alive.len() - turn) % alive.len(), *h)
                    })
                    .collect();
                ranked.sort();
                let (full, _, _, _, first) = ranked[0];
                if full && !last_chance {
                    return None;
                }
                let holders: Vec<HostId> = ranked.iter().take(1 + ALTERNATIVES).map(|r| r.4.clone()).collect();
                let decided = PieceSource::Holders { number: n, blake3: digest.clone(), holders };
                let first = first.clone();
                self.turn = self.turn.wrapping_add(1);
                // One lease per child and piece: asking again replaces the earlier hand-out.
                if let Some(old) = leases.0.iter().position(|l| &l.task == id && l.piece == n && &l.child == asker) {
                    let old = leases.0.swap_remove(old);
                    loads.remove(&old.holder);
                }
                let queued = loads.queued(&first);
                loads.add(&first);
                let until = now + (LEASE_TTL_MS * (queued as u64 + 1)).min(MAX_LEASE_MS);
                leases.0.push(Lease { task: id.clone(), piece: n, holder: first, child: asker.clone(), until });
                return Some(decided);
            }
        }
        let claimed_by_other = piece.claim.as_ref().is_some_and(|c| &c.host != asker && now < c.since + CLAIM_TTL_MS);
        if claimed_by_other {
            // At last chance the asker goes to the origin too, leaving the claim to its owner.
            return last_chance.then_some(PieceSource::Origin { number: n });
        }
        if piece.claim.as_ref().is_none_or(|c| &c.host != asker) {
            piece.claim = Some(Claim { host: asker.clone(), since: now });
        }
        Some(PieceSource::Origin { number: n })
    }

    /// Applies `host`'s report that it holds piece `n` with digest `blake3`.
    fn finished(&mut self, n: u32, host: &HostId, blake3: &str, now: u64, out: &mut Reported) {
        let piece = self.pieces.entry(n).or_default();
        let claimant = piece.claim.as_ref().is_some_and(|c| &c.host == host);
        let holds = match &piece.digest {
            Some(d) if d == blake3 => true,
            Some(_) => {
                out.conflicting.push(n);
                false
            }
            None => {
                // Only the claimant, or anyone while no live claim exists (a host sent to the
                // origin at last chance after the claim lapsed), sets the digest.
                let live = piece.claim.as_ref().is_some_and(|c| now < c.since + CLAIM_TTL_MS);
                if claimant || !live {
                    piece.digest = Some(blake3.to_string());
                    out.recorded += 1;
                    true
                } else {
                    false
                }
            }
        };
        if claimant {
            piece.claim = None;
        }
        if holds {
            piece.holders.retain(|h| h != host);
            piece.holders.push(host.clone());
            if piece.holders.len() > MAX_HOLDERS {
                piece.holders.remove(0);
            }
        }
    }
}

/// Whether `s` is a blake3 hash as the agents send it: 64 lowercase hex digits.
fn is_blake3_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Every task of sparse reads, at most [`MAX_TASKS`].
#[derive(Debug, Default)]
pub struct SparseBook {
    tasks: HashMap<TaskId, Task>,
    leases: Leases,
}

impl SparseBook {
    /// An empty book.
    pub fn new() -> SparseBook {
        SparseBook::default()
    }

    /// Tasks remembered.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True when no task is remembered.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The task, created with `length` if new, after checking `length` and `pieces` against it.
    fn task<'a>(
        tasks: &'a mut HashMap<TaskId, Task>,
        task: &TaskId,
        length: u64,
        pieces: impl Iterator<Item = u32>,
        now: u64,
    ) -> Result<&'a mut Task, SparseError> {
        if length > MAX_TASK_LEN {
            return Err(SparseError::TooLarge { task: task.clone(), len: length });
        }
        let layout = match tasks.get(task) {
            Some(t) if t.layout.len != length => {
                return Err(SparseError::LengthMismatch { task: task.clone(), known: t.layout.len, got: length });
            }
            Some(t) => t.layout,
            None => PieceLayout::for_len(length),
        };
        let count = layout.count();
        for piece in pieces {
            if piece >= count {
                return Err(SparseError::PieceOutOfRange { task: task.clone(), piece, count });
            }
        }
        if !tasks.contains_key(task) && tasks.len() >= MAX_TASKS {
            if let Some(oldest) = tasks.iter().min_by_key(|(_, t)| t.last_used).map(|(id, _)| id.clone()) {
                tasks.remove(&oldest);
            }
        }
        let t = tasks.entry(task.clone()).or_insert_with(|| Task::new(layout));
        t.last_used = now;
        Ok(t)
    }

    /// `asker` wants `pieces` of `task` (`length` bytes): where each comes from, or that it must
    /// ask again. With `last_chance` (the asker waited long enough) every piece is decided: a
    /// busy holder is handed out anyway, and a piece another host is fetching from the origin is
    /// fetched from the origin by the asker too.
    #[allow(clippy::too_many_arguments)]
    pub fn want(
        &mut self,
        task: &TaskId,
        asker: &HostId,
        length: u64,
        pieces: &[u32],
        now: u64,
        hosts: &Hosts,
        last_chance: bool,
    ) -> Result<Wanted, SparseError> {
        if hosts.get(asker).is_none() {
            return Err(SparseError::UnknownHost(asker.clone()));
        }
        if pieces.len() > MAX_PIECES_PER_CALL {
            return Err(SparseError::TooManyPieces { task: task.clone(), got: pieces.len() });
        }
        self.leases.retain(|l| now < l.until);
        let t = SparseBook::task(&mut self.tasks, task, length, pieces.iter().copied(), now)?;
        let mut loads = self.leases.loads_for(asker);
        let mut out = Wanted::default();
        let mut seen = std::collections::HashSet::new();
        for &n in pieces {
            if !seen.insert(n) {
                continue;
            }
            match t.decide(task, &mut self.leases, n, asker, now, hosts, &mut loads, last_chance) {
                Some(d) => out.decided.push(d),
                None => out.pending.push(n),
            }
        }
        Ok(out)
    }

    /// `host` reports on pieces of `task` (`length` bytes): see [`Report`]. A digest is recorded
    /// only from the piece's claimant, or from anyone while no live claim exists, and never
    /// replaced; a holder joins a piece only with the recorded digest. Anyone may report a piece
    /// invalid: that costs only a refetch from the origin.
    pub fn report(&mut self, task: &TaskId, host: &HostId, length: u64, report: &Report, now: u64) -> Result<Reported, SparseError> {
        for len in [report.finished.len(), report.invalid.len(), report.failed.len()] {
            if len > MAX_PIECES_PER_CALL {
                return Err(SparseError::TooManyPieces { task: task.clone(), got: len });
            }
        }
        if let Some((piece, digest)) = report.finished.iter().find(|(_, d)| !is_blake3_hex(d)) {
            return Err(SparseError::BadDigest { task: task.clone(), piece: *piece, digest: digest.clone() });
        }
        let numbers =
            report.finished.iter().map(|(n, _)| *n).chain(report.invalid.iter().copied()).chain(report.failed.iter().map(|(n, _)| *n));
        if report.finished.is_empty() && !self.tasks.contains_key(task) {
            // Nothing to record, and nothing known to forget: do not make room for it.
            if length > MAX_TASK_LEN {
                return Err(SparseError::TooLarge { task: task.clone(), len: length });
            }
            let count = PieceLayout::for_len(length).count();
            return match numbers.into_iter().find(|&n| n >= count) {
                Some(piece) => Err(SparseError::PieceOutOfRange { task: task.clone(), piece, count }),
                None => Ok(Reported::default()),
            };
        }
        self.leases.retain(|l| now < l.until);
        let t = SparseBook::task(&mut self.tasks, task, length, numbers, now)?;
        let mut out = Reported::default();
        for (n, blake3) in &report.finished {
            self.leases.end(task, *n, host);
            t.finished(*n, host, blake3, now, &mut out);
        }
        for &n in &report.invalid {
            t.pieces.remove(&n);
            self.leases.retain(|l| !(&l.task == task && l.piece == n));
        }
        for (n, holder) in &report.failed {
            self.leases.retain(|l| !(&l.task == task && l.piece == *n && &l.child == host && &l.holder == holder));
            if let Some(p) = t.pieces.get_mut(n) {
                // It joins again if it reports the piece again.
                p.holders.retain(|h| h != holder);
            }
        }
        Ok(out)
    }

    /// The digest recorded for piece `n` of `task`, if any.
    pub fn digest(&self, task: &TaskId, n: u32) -> Option<&str> {
        self.tasks.get(task)?.pieces.get(&n)?.digest.as_deref()
    }

    /// Host `id` left: it holds nothing any more, its claims lapse and its leases end.
    pub fn forget_host(&mut self, id: &HostId) {
        for t in self.tasks.values_mut() {
            for p in t.pieces.values_mut() {
                p.holders.retain(|h| h != id);
                if p.claim.as_ref().is_some_and(|c| &c.host == id) {
                    p.claim = None;
                }
            }
        }
        self.leases.retain(|l| &l.holder != id && &l.child != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::HostInfo;
    use shoal_core::Digest;

    const MIB: u64 = 1 << 20;
    /// 512 pieces of 128 KiB.
    const LEN: u64 = 64 * MIB;

    fn id(name: &str) -> HostId {
        HostId(name.into())
    }

    fn task() -> TaskId {
        TaskId::of_digest(&Digest::of(b"blob"))
    }

    /// A blake3 hex digest named by `s`.
    fn digest(s: &str) -> String {
        blake3::hash(s.as_bytes()).to_hex().to_string()
    }

    /// Upload slots of every test host.
    const SLOTS: usize = 4;

    fn hosts(names: &[&str]) -> Hosts {
        let mut hosts = Hosts::default();
        for n in names {
            let info = HostInfo {
                id: id(n),
                addr: "127.0.0.1:1".parse().unwrap(),
                upload_slots: 4 * SLOTS as u32,
                sending_slots: SLOTS as u32,
                incarnation: 0,
                zone: String::new(),
                idc: String::new(),
                seed: false,
            };
            hosts.announce(info, 0);
        }
        hosts
    }

    fn finished(n: u32, d: &str) -> Report {
        Report { finished: vec![(n, digest(d))], ..Report::default() }
    }

    fn holders(w: &Wanted) -> Vec<Vec<HostId>> {
        w.decided
            .iter()
            .map(|d| match d {
                PieceSource::Holders { holders, .. } => holders.clone(),
                PieceSource::Origin { number } => panic!("piece {number} sent to the origin"),
            })
            .collect()
    }

    #[test]
    fn the_first_asker_goes_to_the_origin_and_the_next_waits_for_its_digest() {
        let hosts = hosts(&["a", "b"]);
        let mut s = SparseBook::new();
        let t = task();
        let w = s.want(&t, &id("a"), LEN, &[3], 0, &hosts, false).unwrap();
        assert_eq!(w, Wanted { decided: vec![PieceSource::Origin { number: 3 }], pending: vec![] });
        let w = s.want(&t, &id("b"), LEN, &[3], 10, &hosts, false).unwrap();
        assert_eq!(w, Wanted { decided: vec![], pending: vec![3] });
        let r = s.report(&t, &id("a"), LEN, &finished(3, "p3"), 500).unwrap();
        assert_eq!(r.recorded, 1);
        let w = s.want(&t, &id("b"), LEN, &[3], 600, &hosts, false).unwrap();
        assert_eq!(w.decided, vec![PieceSource::Holders { number: 3, blake3: digest("p3"), holders: vec![id("a")] }]);
    }

    #[test]
    fn the_claimant_asking_again_goes_to_the_origin_again() {
        let hosts = hosts(&["a"]);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("a"), LEN, &[0], 0, &hosts, false).unwrap();
        let w = s.want(&t, &id("a"), LEN, &[0], 100, &hosts, false).unwrap();
        assert_eq!(w.decided, vec![PieceSource::Origin { number: 0 }]);
    }

    #[test]
    fn a_holder_serves_as_many_children_as_its_upload_slots_and_new_holders_take_the_rest() {
        let names = ["src", "c1", "c2", "c3", "c4", "c5", "c6"];
        let hosts = hosts(&names);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("src"), LEN, &[0], 0, &hosts, false).unwrap();
        s.report(&t, &id("src"), LEN, &finished(0, "p0"), 0).unwrap();
        for c in &names[1..5] {
            let w = s.want(&t, &id(c), LEN, &[0], 10, &hosts, false).unwrap();
            assert_eq!(holders(&w), vec![vec![id("src")]], "{c}");
        }
        // The source is saturated: the fifth child waits.
        let w = s.want(&t, &id("c5"), LEN, &[0], 10, &hosts, false).unwrap();
        assert_eq!(w.pending, vec![0]);
        // c1 got it: its lease ends, and it is a holder now with no lease, chosen first.
        s.report(&t, &id("c1"), LEN, &finished(0, "p0"), 20).unwrap();
        let w = s.want(&t, &id("c5"), LEN, &[0], 30, &hosts, false).unwrap();
        assert_eq!(holders(&w), vec![vec![id("c1"), id("src")]]);
        // c1 has one lease, src three: the next goes to c1 again.
        let w = s.want(&t, &id("c6"), LEN, &[0], 30, &hosts, false).unwrap();
        assert_eq!(holders(&w)[0][0], id("c1"));
    }

    #[test]
    fn a_child_fetches_every_piece_one_holder_has_over_one_upload_slot() {
        let hosts = hosts(&["src", "c1", "c2", "c3", "c4", "c5"]);
        let mut s = SparseBook::new();
        let t = task();
        let pieces: Vec<u32> = (0..6).collect();
        s.want(&t, &id("src"), LEN, &pieces, 0, &hosts, false).unwrap();
        let report = Report { finished: pieces.iter().map(|&n| (n, digest(&n.to_string()))).collect(), ..Report::default() };
        s.report(&t, &id("src"), LEN, &report, 0).unwrap();
        // Every piece goes to one child, one slot: src still serves three more children.
        for c in ["c1", "c2", "c3", "c4"] {
            let w = s.want(&t, &id(c), LEN, &pieces, 10, &hosts, false).unwrap();
            assert_eq!(w.decided.iter().map(PieceSource::number).collect::<Vec<_>>(), pieces, "{c}");
            assert!(holders(&w).iter().all(|h| h[0] == id("src")), "{c}");
        }
        assert_eq!(s.want(&t, &id("c5"), LEN, &pieces, 10, &hosts, false).unwrap().pending, pieces);
        // A child queues its pieces one after another: the sixth piece's lease lasts six TTLs.
        assert_eq!(s.want(&t, &id("c5"), LEN, &pieces, 10 + 6 * LEASE_TTL_MS - 1, &hosts, false).unwrap().pending, pieces);
        assert!(s.want(&t, &id("c5"), LEN, &pieces, 10 + 6 * LEASE_TTL_MS, &hosts, false).unwrap().pending.is_empty());
    }

    #[test]
    fn a_child_is_sent_where_it_is_already_served_before_a_less_loaded_holder() {
        let hosts = hosts(&["src", "h", "c"]);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("src"), LEN, &[0, 1], 0, &hosts, false).unwrap();
        let report = Report { finished: vec![(0, digest("0")), (1, digest("1"))], ..Report::default() };
        s.report(&t, &id("src"), LEN, &report, 0).unwrap();
        s.report(&t, &id("h"), LEN, &finished(1, &digest("1")), 0).unwrap();
        let w = s.want(&t, &id("c"), LEN, &[0], 10, &hosts, false).unwrap();
        assert_eq!(holders(&w), vec![vec![id("src")]]);
        // h serves nobody, src serves c already: piece 1 joins c's queue at src.
        let w = s.want(&t, &id("c"), LEN, &[1], 10, &hosts, false).unwrap();
        assert_eq!(holders(&w)[0][0], id("src"));
    }

    #[test]
    fn a_holder_with_one_upload_slot_serves_one_child_at_a_time() {
        let mut hosts = hosts(&["c1", "c2"]);
        let info = HostInfo {
            id: id("src"),
            addr: "127.0.0.1:1".parse().unwrap(),
            upload_slots: 4,
            sending_slots: 1,
            incarnation: 0,
            zone: String::new(),
            idc: String::new(),
            seed: false,
        };
        hosts.announce(info, 0);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("src"), LEN, &[0], 0, &hosts, false).unwrap();
        s.report(&t, &id("src"), LEN, &finished(0, "p0"), 0).unwrap();
        assert!(s.want(&t, &id("c1"), LEN, &[0], 10, &hosts, false).unwrap().pending.is_empty());
        assert_eq!(s.want(&t, &id("c2"), LEN, &[0], 10, &hosts, false).unwrap().pending, vec![0]);
    }

    #[test]
    fn a_holders_children_span_every_task() {
        let hosts = hosts(&["src", "c1", "c2", "c3", "c4", "c5"]);
        let mut s = SparseBook::new();
        let (a, b) = (task(), TaskId::of_digest(&Digest::of(b"another blob")));
        for t in [&a, &b] {
            s.want(t, &id("src"), LEN, &[0, 1, 2], 0, &hosts, false).unwrap();
            let report = Report { finished: (0..3).map(|n| (n, digest(&format!("{t}{n}")))).collect(), ..Report::default() };
            s.report(t, &id("src"), LEN, &report, 0).unwrap();
        }
        for (c, t) in [("c1", &a), ("c2", &a), ("c3", &b), ("c4", &b)] {
            assert!(s.want(t, &id(c), LEN, &[0, 1, 2], 10, &hosts, false).unwrap().pending.is_empty(), "{c}");
        }
        let w = s.want(&b, &id("c5"), LEN, &[0, 1, 2], 10, &hosts, false).unwrap();
        assert_eq!(w.pending, vec![0, 1, 2], "src serves its four slots' worth of children in all, not per task");
        // A child src serves for one task is served for the other too.
        assert!(s.want(&b, &id("c1"), LEN, &[0, 1, 2], 10, &hosts, false).unwrap().pending.is_empty());
    }

    #[test]
    fn leases_of_children_that_never_report_end_after_the_lease_ttl() {
        let hosts = hosts(&["src", "c1", "c2", "c3", "c4", "c5"]);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("src"), LEN, &[0], 0, &hosts, false).unwrap();
        s.report(&t, &id("src"), LEN, &finished(0, "p0"), 0).unwrap();
        for c in ["c1", "c2", "c3", "c4"] {
            s.want(&t, &id(c), LEN, &[0], 100, &hosts, false).unwrap();
        }
        assert_eq!(s.want(&t, &id("c5"), LEN, &[0], 100 + LEASE_TTL_MS - 1, &hosts, false).unwrap().pending, vec![0]);
        let w = s.want(&t, &id("c5"), LEN, &[0], 100 + LEASE_TTL_MS, &hosts, false).unwrap();
        assert_eq!(holders(&w), vec![vec![id("src")]]);
    }

    #[test]
    fn a_child_asking_again_does_not_take_a_second_lease() {
        let hosts = hosts(&["src", "c1", "c2"]);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("src"), LEN, &[0], 0, &hosts, false).unwrap();
        s.report(&t, &id("src"), LEN, &finished(0, "p0"), 0).unwrap();
        for _ in 0..SLOTS {
            assert!(s.want(&t, &id("c1"), LEN, &[0], 10, &hosts, false).unwrap().pending.is_empty());
        }
        assert!(s.want(&t, &id("c2"), LEN, &[0], 10, &hosts, false).unwrap().pending.is_empty());
    }

    #[test]
    fn equally_loaded_holders_take_turns_and_alternatives_follow_the_chosen_one() {
        let hosts = hosts(&["h1", "h2", "h3", "h4", "c1", "c2"]);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("h1"), LEN, &[0], 0, &hosts, false).unwrap();
        for h in ["h1", "h2", "h3", "h4"] {
            s.report(&t, &id(h), LEN, &finished(0, "p0"), 0).unwrap();
        }
        let first = holders(&s.want(&t, &id("c1"), LEN, &[0], 10, &hosts, false).unwrap()).remove(0);
        assert_eq!(first.len(), 1 + ALTERNATIVES);
        // c1 ended its lease by reporting: the loads are equal again, and c2 is sent elsewhere.
        s.report(&t, &id("c1"), LEN, &finished(0, "p0"), 20).unwrap();
        let second = holders(&s.want(&t, &id("c2"), LEN, &[0], 30, &hosts, false).unwrap()).remove(0);
        assert_ne!(first[0], second[0]);
    }

    #[test]
    fn at_last_chance_a_busy_holder_is_handed_out_and_a_claimed_piece_comes_from_the_origin() {
        let hosts = hosts(&["src", "c1", "c2", "c3", "c4", "c5", "other"]);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("src"), LEN, &[0], 0, &hosts, false).unwrap();
        s.report(&t, &id("src"), LEN, &finished(0, "p0"), 0).unwrap();
        for c in ["c1", "c2", "c3", "c4"] {
            s.want(&t, &id(c), LEN, &[0], 10, &hosts, false).unwrap();
        }
        let w = s.want(&t, &id("c5"), LEN, &[0], 10, &hosts, true).unwrap();
        assert_eq!(holders(&w), vec![vec![id("src")]]);
        // Piece 1 is claimed by src: at last chance, c5 fetches it from the origin too, and src
        // keeps the claim (a third asker still waits for src).
        s.want(&t, &id("src"), LEN, &[1], 20, &hosts, false).unwrap();
        let w = s.want(&t, &id("c5"), LEN, &[1], 30, &hosts, true).unwrap();
        assert_eq!(w.decided, vec![PieceSource::Origin { number: 1 }]);
        assert_eq!(s.want(&t, &id("other"), LEN, &[1], 40, &hosts, false).unwrap().pending, vec![1]);
        // c5's report does not set the digest while src's claim is live; src's does.
        s.report(&t, &id("c5"), LEN, &finished(1, "p1"), 50).unwrap();
        assert_eq!(s.digest(&t, 1), None);
        s.report(&t, &id("src"), LEN, &finished(1, "p1"), 60).unwrap();
        assert_eq!(s.digest(&t, 1), Some(digest("p1").as_str()));
    }

    #[test]
    fn a_conflicting_digest_never_replaces_the_first() {
        let hosts = hosts(&["src", "liar", "c"]);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("src"), LEN, &[0], 0, &hosts, false).unwrap();
        s.report(&t, &id("src"), LEN, &finished(0, "good"), 10).unwrap();
        let r = s.report(&t, &id("liar"), LEN, &finished(0, "evil"), 20).unwrap();
        assert_eq!(r, Reported { recorded: 0, conflicting: vec![0] });
        assert_eq!(s.digest(&t, 0), Some(digest("good").as_str()));
        // The liar is not a holder.
        let w = s.want(&t, &id("c"), LEN, &[0], 30, &hosts, false).unwrap();
        assert_eq!(holders(&w), vec![vec![id("src")]]);
    }

    #[test]
    fn an_invalid_piece_is_fetched_from_the_origin_again() {
        let hosts = hosts(&["src", "c"]);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("src"), LEN, &[0], 0, &hosts, false).unwrap();
        s.report(&t, &id("src"), LEN, &finished(0, "bad"), 10).unwrap();
        s.report(&t, &id("c"), LEN, &Report { invalid: vec![0], ..Report::default() }, 20).unwrap();
        assert_eq!(s.digest(&t, 0), None);
        let w = s.want(&t, &id("c"), LEN, &[0], 30, &hosts, false).unwrap();
        assert_eq!(w.decided, vec![PieceSource::Origin { number: 0 }]);
        // c's new digest is the one recorded.
        s.report(&t, &id("c"), LEN, &finished(0, "good"), 40).unwrap();
        assert_eq!(s.digest(&t, 0), Some(digest("good").as_str()));
    }

    #[test]
    fn a_claim_older_than_the_claim_ttl_passes_to_the_next_asker() {
        let hosts = hosts(&["a", "b", "c"]);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("a"), LEN, &[0], 0, &hosts, false).unwrap();
        assert_eq!(s.want(&t, &id("b"), LEN, &[0], CLAIM_TTL_MS - 1, &hosts, false).unwrap().pending, vec![0]);
        let w = s.want(&t, &id("b"), LEN, &[0], CLAIM_TTL_MS, &hosts, false).unwrap();
        assert_eq!(w.decided, vec![PieceSource::Origin { number: 0 }]);
        // b holds the claim now: c waits for b, and a's late report no longer sets the digest.
        assert_eq!(s.want(&t, &id("c"), LEN, &[0], CLAIM_TTL_MS + 1, &hosts, false).unwrap().pending, vec![0]);
        s.report(&t, &id("a"), LEN, &finished(0, "p0"), CLAIM_TTL_MS + 2).unwrap();
        assert_eq!(s.digest(&t, 0), None);
    }

    #[test]
    fn a_host_that_leaves_is_no_longer_a_holder_and_its_claims_lapse() {
        let mut hosts = hosts(&["a", "b", "c"]);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("a"), LEN, &[0, 1], 0, &hosts, false).unwrap();
        s.report(&t, &id("a"), LEN, &finished(0, "p0"), 10).unwrap();
        s.report(&t, &id("b"), LEN, &finished(0, "p0"), 10).unwrap();
        hosts.remove(&id("a"));
        s.forget_host(&id("a"));
        let w = s.want(&t, &id("c"), LEN, &[0, 1], 20, &hosts, false).unwrap();
        assert_eq!(
            w.decided,
            vec![PieceSource::Holders { number: 0, blake3: digest("p0"), holders: vec![id("b")] }, PieceSource::Origin { number: 1 },]
        );
    }

    #[test]
    fn holders_that_are_not_announced_or_are_the_asker_are_not_handed_out() {
        let hosts = hosts(&["a", "c"]);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("a"), LEN, &[0], 0, &hosts, false).unwrap();
        s.report(&t, &id("a"), LEN, &finished(0, "p0"), 10).unwrap();
        s.report(&t, &id("ghost"), LEN, &finished(0, "p0"), 10).unwrap();
        // a asks for its own piece again (it dropped it): nobody else holds it, so the origin.
        let w = s.want(&t, &id("a"), LEN, &[0], 20, &hosts, false).unwrap();
        assert_eq!(w.decided, vec![PieceSource::Origin { number: 0 }]);
        let w = s.want(&t, &id("c"), LEN, &[0], 20, &hosts, false).unwrap();
        assert_eq!(holders(&w), vec![vec![id("a")]]);
    }

    #[test]
    fn a_failed_holder_is_dropped_from_the_piece_until_it_reports_again() {
        let hosts = hosts(&["a", "b", "c"]);
        let mut s = SparseBook::new();
        let t = task();
        s.want(&t, &id("a"), LEN, &[0], 0, &hosts, false).unwrap();
        s.report(&t, &id("a"), LEN, &finished(0, "p0"), 10).unwrap();
        s.report(&t, &id("b"), LEN, &finished(0, "p0"), 10).unwrap();
        let failed = Report { failed: vec![(0, id("a"))], ..Report::default() };
        s.report(&t, &id("c"), LEN, &failed, 20).unwrap();
        let w = s.want(&t, &id("c"), LEN, &[0], 30, &hosts, false).unwrap();
        assert_eq!(holders(&w), vec![vec![id("b")]]);
        s.report(&t, &id("a"), LEN, &finished(0, "p0"), 40).unwrap();
        let w = s.want(&t, &id("c"), LEN, &[0], 50, &hosts, false).unwrap();
        assert_eq!(holders(&w)[0].len(), 2);
    }

    #[test]
    fn a_piece_keeps_its_newest_holders() {
        let names: Vec<String> = (0..MAX_HOLDERS + 2).map(|i| format!("h{i}")).collect();
        let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
        all.push("c");
        let hosts = hosts(&all);
        let mut s = SparseBook::new();
        let t = task();
        for n in &names {
            s.report(&t, &id(n), LEN, &finished(0, "p0"), 0).unwrap();
        }
        // The two oldest are gone: with equal loads, the ones handed out are all among the newest.
        for i in 0..MAX_HOLDERS {
            let w = s.want(&t, &id("c"), LEN, &[0], 10 + i as u64, &hosts, false).unwrap();
            let h = holders(&w).remove(0);
            assert!(!h.contains(&id("h0")) && !h.contains(&id("h1")), "{h:?}");
        }
    }

    #[test]
    fn wants_and_reports_out_of_bounds_are_refused() {
        let hosts = hosts(&["a"]);
        let mut s = SparseBook::new();
        let t = task();
        let count = PieceLayout::for_len(LEN).count();
        let too_many: Vec<u32> = (0..MAX_PIECES_PER_CALL as u32 + 1).map(|n| n % count).collect();
        assert!(matches!(s.want(&t, &id("a"), LEN, &too_many, 0, &hosts, false), Err(SparseError::TooManyPieces { .. })));
        assert!(matches!(s.want(&t, &id("a"), LEN, &[count], 0, &hosts, false), Err(SparseError::PieceOutOfRange { .. })));
        assert!(matches!(s.want(&t, &id("nobody"), LEN, &[0], 0, &hosts, false), Err(SparseError::UnknownHost(_))));
        assert!(matches!(s.want(&t, &id("a"), u64::MAX, &[0], 0, &hosts, false), Err(SparseError::TooLarge { .. })));
        s.want(&t, &id("a"), LEN, &[0], 0, &hosts, false).unwrap();
        assert!(matches!(s.want(&t, &id("a"), LEN + 1, &[0], 0, &hosts, false), Err(SparseError::LengthMismatch { .. })));
        assert!(matches!(s.report(&t, &id("a"), LEN + 1, &finished(0, "p0"), 0), Err(SparseError::LengthMismatch { .. })));
        let bad = Report { finished: vec![(0, "not hex".into())], ..Report::default() };
        assert!(matches!(s.report(&t, &id("a"), LEN, &bad, 0), Err(SparseError::BadDigest { .. })));
        let other = TaskId::of_digest(&Digest::of(b"other"));
        let out_of_range = Report { invalid: vec![count], ..Report::default() };
        assert!(matches!(s.report(&other, &id("a"), LEN, &out_of_range, 0), Err(SparseError::PieceOutOfRange { .. })));
        // A report with nothing to record does not create a task.
        s.report(&other, &id("a"), LEN, &Report { invalid: vec![0], ..Report::default() }, 0).unwrap();
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn the_least_recently_used_task_is_forgotten_beyond_the_limit() {
        let hosts = hosts(&["a"]);
        let mut s = SparseBook::new();
        let tasks: Vec<TaskId> = (0..=MAX_TASKS).map(|i| TaskId::of_digest(&Digest::of(&i.to_le_bytes()))).collect();
        for (i, t) in tasks.iter().enumerate().take(MAX_TASKS) {
            s.want(t, &id("a"), MIB, &[0], i as u64, &hosts, false).unwrap();
            s.report(t, &id("a"), MIB, &finished(0, "p0"), i as u64).unwrap();
        }
        // Task 0 is used again: task 1 is now the oldest.
        s.want(&tasks[0], &id("a"), MIB, &[0], MAX_TASKS as u64, &hosts, false).unwrap();
        s.want(&tasks[MAX_TASKS], &id("a"), MIB, &[0], MAX_TASKS as u64 + 1, &hosts, false).unwrap();
        assert_eq!(s.len(), MAX_TASKS);
        assert!(s.digest(&tasks[0], 0).is_some());
        assert!(s.digest(&tasks[1], 0).is_none());
        assert!(s.digest(&tasks[2], 0).is_some());
    }
}
