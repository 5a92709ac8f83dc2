//! Hosts: the machines running an agent or a seed, their upload capacity and their recent failures.

use std::collections::HashMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A host's id, chosen by the host (its node name by default).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HostId(pub String);

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a host announces about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The host's id.
    pub id: HostId,
    /// Where its peer server (QUIC) listens.
    pub addr: SocketAddr,
    /// How many children it is willing to upload to at once (whole downloads).
    pub upload_slots: u32,
    /// Pieces its peer server sends at once: the children sparse reads may send to it at once.
    pub sending_slots: u32,
    /// Random for each start of its agent (0: not said).
    pub incarnation: u64,
    /// Availability zone (`topology.kubernetes.io/zone`); empty when unknown.
    pub zone: String,
    /// Data centre; empty when unknown.
    pub idc: String,
    /// A seed: always able to go back to source, chosen last when peers have the data.
    pub seed: bool,
}

/// What the scheduler keeps per host.
#[derive(Clone, Debug)]
pub struct Host {
    /// As announced.
    pub info: HostInfo,
    /// Children currently assigned to it.
    pub uploads: u32,
    /// When (ms) a child last reported a piece from it as bad or failed, most recent last.
    pub failures: Vec<u64>,
    /// Last announcement (ms).
    pub last_seen: u64,
}

/// A host whose failures within this window reach [`FAILURE_LIMIT`] is not chosen as a parent.
pub const FAILURE_WINDOW_MS: u64 = 60_000;
/// See [`FAILURE_WINDOW_MS`].
pub const FAILURE_LIMIT: usize = 3;

impl Host {
    /// Failures within the window before `now`.
    pub fn recent_failures(&self, now: u64) -> usize {
        self.failures.iter().filter(|&&t| now.saturating_sub(t) < FAILURE_WINDOW_MS).count()
    }

    /// Whether it is not failing: busy or not, it serves and fetches.
    pub fn healthy(&self, now: u64) -> bool {
        self.recent_failures(now) < FAILURE_LIMIT
    }

    /// Whether it may be chosen as a parent now: not failing, and a free upload slot.
    pub fn available(&self, now: u64) -> bool {
        self.healthy(now) && self.uploads < self.info.upload_slots
    }
}

/// Every known host.
#[derive(Default, Debug)]
pub struct Hosts {
    hosts: HashMap<HostId, Host>,
}

impl Hosts {
    /// Adds or refreshes a host.
    /// Records a host's announcement. True when it is known and now names another incarnation:
    /// its agent restarted, and what it held before may be gone.
    pub fn announce(&mut self, info: HostInfo, now: u64) -> bool {
        match self.hosts.get_mut(&info.id) {
            Some(h) => {
                let mut info = info;
                if info.incarnation == 0 {
                    // An announcement that does not say keeps the incarnation known.
                    info.incarnation = h.info.incarnation;
                }
                let restarted = h.info.incarnation != 0 && info.incarnation != h.info.incarnation;
                h.info = info;
                h.last_seen = now;
                restarted
            }
            None => {
                self.hosts.insert(info.id.clone(), Host { info, uploads: 0, failures: Vec::new(), last_seen: now });
                false
            }
        }
    }

    /// Forgets a host.
    pub fn remove(&mut self, id: &HostId) -> Option<Host> {
        self.hosts.remove(id)
    }

    /// A host by id.
    pub fn get(&self, id: &HostId) -> Option<&Host> {
        self.hosts.get(id)
    }

    /// A host by id, mutable.
    pub fn get_mut(&mut self, id: &HostId) -> Option<&mut Host> {
        self.hosts.get_mut(id)
    }

    /// A child stopped fetching from `parents`: each gets an upload slot back.
    pub fn release_uploads<'a>(&mut self, parents: impl IntoIterator<Item = &'a HostId>) {
        for p in parents {
            if let Some(h) = self.get_mut(p) {
                h.uploads = h.uploads.saturating_sub(1);
            }
        }
    }

    /// Records a failure of `id` at `now`, keeping only what the window needs.
    pub fn record_failure(&mut self, id: &HostId, now: u64) {
        if let Some(h) = self.hosts.get_mut(id) {
            h.failures.retain(|&t| now.saturating_sub(t) < FAILURE_WINDOW_MS);
            h.failures.push(now);
        }
    }

    /// Every healthy seed, busy or not: while one is, it fetches each task from the origin for
    /// the cluster.
    pub fn healthy_seeds(&self, now: u64) -> impl Iterator<Item = &Host> {
        self.hosts.values().filter(move |h| h.info.seed && h.healthy(now))
    }

    /// Every seed that may be a parent now (see [`Host::available`]), least loaded first.
    pub fn seeds(&self, now: u64) -> Vec<&Host> {
        let mut seeds: Vec<&Host> = self.hosts.values().filter(|h| h.info.seed && h.available(now)).collect();
        seeds.sort_by_key(|h| (h.uploads, h.info.id.clone()));
        seeds
    }

    /// Hosts not heard from since `before` (ms).
    pub fn silent_since(&self, before: u64) -> Vec<HostId> {
        self.hosts.values().filter(|h| h.last_seen < before).map(|h| h.info.id.clone()).collect()
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// True when no host is known.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}
