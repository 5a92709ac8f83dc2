//! Parent selection: from the peers of a task, the ones a child should fetch pieces from. A pure
//! function over [`Candidate`]s so the rules are tested case by case.
//!
//! Rules, in order:
//! 1. A parent must have a free upload slot, few recent failures, not have failed this child,
//!    and sit less than `max_depth` hops from the origin (so a cold fan-out is a pipeline).
//! 2. It must be useful: hold pieces the child lacks, or be downloading with a source of its own.
//! 3. Seeds are dropped once enough ordinary peers hold useful pieces: they are the last resort.
//! 4. Rank by useful pieces, then zone and data-centre affinity, then fewer failures, then load.

use crate::hosts::{HostId, FAILURE_LIMIT};

/// Scheduling limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most parents handed to a child at once.
    pub max_parents: usize,
    /// Most hops from the origin; a parent at this depth is not given children.
    pub max_depth: u32,
    /// Peers that may fetch a task from the origin at once when no seed is available, each a
    /// different stripe of it.
    pub max_back_to_source: usize,
    /// When this many ordinary peers hold useful pieces, seeds are not chosen.
    pub enough_peers: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_parents: 8, max_depth: 6, max_back_to_source: 4, enough_peers: 2 }
    }
}

/// One possible parent as the child sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub host: HostId,
    /// A seed host.
    pub seed: bool,
    /// Pieces it has that the child lacks.
    pub useful: u32,
    /// Still downloading, with a source (parents, the origin, or being a seed): more pieces coming.
    pub feeding: bool,
    /// Hops from the origin (0 for a peer fetching from the origin, a seed, or a finished peer).
    pub depth: u32,
    pub same_zone: bool,
    pub same_idc: bool,
    /// Failures reported against its host recently.
    pub failures: usize,
    /// Upload slots still free on its host.
    pub free_slots: u32,
    /// This child already saw it fail.
    pub failed_this_child: bool,
}

/// Chooses up to `limits.max_parents` parents, best first.
pub fn choose(candidates: &[Candidate], limits: &Limits) -> Vec<HostId> {
    let eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| {
            c.free_slots > 0
                && c.failures < FAILURE_LIMIT
                && !c.failed_this_child
                && c.depth < limits.max_depth
                && (c.useful > 0 || c.feeding)
        })
        .collect();
    let peers_with_data = eligible.iter().filter(|c| !c.seed && c.useful > 0).count();
    let drop_seeds = peers_with_data >= limits.enough_peers;
    let mut ranked: Vec<&Candidate> = eligible.into_iter().filter(|c| !(drop_seeds && c.seed)).collect();
    ranked.sort_by(|a, b| {
        b.useful
            .cmp(&a.useful)
            .then(a.seed.cmp(&b.seed))
            .then(b.same_zone.cmp(&a.same_zone))
            .then(b.same_idc.cmp(&a.same_idc))
            .then(a.failures.cmp(&b.failures))
            .then(b.free_slots.cmp(&a.free_slots))
            .then(a.depth.cmp(&b.depth))
            .then(a.host.cmp(&b.host))
    });
    ranked.into_iter().take(limits.max_parents).map(|c| c.host.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(name: &str, useful: u32) -> Candidate {
        Candidate {
            host: HostId(name.into()),
            seed: false,
            useful,
            feeding: false,
            depth: 1,
            same_zone: false,
            same_idc: false,
            failures: 0,
            free_slots: 4,
            failed_this_child: false,
        }
    }

    fn names(v: Vec<HostId>) -> Vec<String> {
        v.into_iter().map(|h| h.0).collect()
    }

    #[test]
    fn parents_with_more_missing_pieces_come_first() {
        let c = [cand("a", 3), cand("b", 10), cand("c", 7)];
        assert_eq!(names(choose(&c, &Limits::default())), ["b", "c", "a"]);
    }

    #[test]
    fn useless_full_failing_or_too_deep_parents_are_skipped() {
        let mut full = cand("full", 9);
        full.free_slots = 0;
        let mut failing = cand("failing", 9);
        failing.failures = FAILURE_LIMIT;
        let mut bad_for_me = cand("bad", 9);
        bad_for_me.failed_this_child = true;
        let mut deep = cand("deep", 9);
        deep.depth = Limits::default().max_depth;
        let empty = cand("empty", 0);
        let c = [full, failing, bad_for_me, deep, empty, cand("ok", 1)];
        assert_eq!(names(choose(&c, &Limits::default())), ["ok"]);
    }

    #[test]
    fn a_downloading_peer_with_a_source_is_a_parent_before_it_has_pieces() {
        let mut feeding = cand("feeding", 0);
        feeding.feeding = true;
        assert_eq!(names(choose(&[feeding, cand("idle", 0)], &Limits::default())), ["feeding"]);
    }

    #[test]
    fn seeds_are_the_last_resort_once_peers_have_the_data() {
        let mut seed = cand("seed", 20);
        seed.seed = true;
        seed.depth = 0;
        // One peer with data: the seed still helps, but ranks by what it has.
        assert_eq!(names(choose(&[seed.clone(), cand("p1", 5)], &Limits::default())), ["seed", "p1"]);
        // Enough peers have data: the seed is left alone.
        assert_eq!(names(choose(&[seed.clone(), cand("p1", 5), cand("p2", 4)], &Limits::default())), ["p1", "p2"]);
        // Equal data: the ordinary peer first.
        let limits = Limits { enough_peers: 5, ..Limits::default() };
        assert_eq!(names(choose(&[seed, cand("p1", 20)], &limits)), ["p1", "seed"]);
    }

    #[test]
    fn same_zone_then_same_idc_then_fewer_failures_break_ties() {
        let mut zone = cand("zone", 5);
        zone.same_zone = true;
        let mut idc = cand("idc", 5);
        idc.same_idc = true;
        let mut flaky = cand("flaky", 5);
        flaky.failures = 1;
        let plain = cand("plain", 5);
        assert_eq!(names(choose(&[flaky, plain, idc, zone], &Limits::default())), ["zone", "idc", "plain", "flaky"]);
    }

    #[test]
    fn at_most_max_parents_are_returned_and_ties_are_deterministic() {
        let c: Vec<Candidate> = (0..10).map(|i| cand(&format!("h{i}"), 1)).collect();
        let limits = Limits { max_parents: 4, ..Limits::default() };
        assert_eq!(names(choose(&c, &limits)), ["h0", "h1", "h2", "h3"]);
    }
}
