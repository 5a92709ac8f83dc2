//! Access checks: before bytes from the store (or from peers) go to a client, the registry the blob
//! is fetched from must have said, recently, that this client's credentials may read *that digest*
//! in the repository the client names. A grant is kept per (registry, repository, digest,
//! credential); an anonymous grant (the registry answered without credentials) covers every
//! client of that repository and digest, and nothing else.
//!
//! A grant answers without asking the registry for `ttl`. While the registry cannot be reached, a
//! grant stays good for `offline` (longer), so a node keeps serving what its clients were allowed
//! to read through a registry outage, and nothing they were not.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderValue;
use shoal_core::Digest;

/// Most grants kept; expired ones are dropped first, then the oldest.
const MAX_GRANTS: usize = 50_000;

/// How fresh a grant must be for an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// The registry answers: only grants younger than the TTL count.
    Online,
    /// The registry cannot be reached: grants younger than the offline window count.
    Offline,
}

/// Granted (registry, repository, digest, credential) and when each grant was given.
pub struct AccessCache {
    ttl: Duration,
    offline: Duration,
    grants: Mutex<HashMap<Key, Instant>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    registry: String,
    repository: String,
    digest: Digest,
    /// blake3 of the Authorization header; empty for anonymous. Credentials are never kept.
    credential: String,
}

impl AccessCache {
    /// Grants answer for `ttl`, and for `offline` while the registry cannot be reached.
    pub fn new(ttl: Duration, offline: Duration) -> AccessCache {
        AccessCache { ttl, offline: offline.max(ttl), grants: Mutex::new(HashMap::new()) }
    }

    fn key(registry: &str, repository: &str, digest: &Digest, auth: Option<&HeaderValue>) -> Key {
        Key {
            registry: registry.into(),
            repository: repository.into(),
            digest: digest.clone(),
            credential: auth.map(|a| blake3::hash(a.as_bytes()).to_hex().to_string()).unwrap_or_default(),
        }
    }

    /// Whether a client with `auth` may read `digest` in `repository` of `registry`, without
    /// asking the registry.
    pub fn allowed(&self, registry: &str, repository: &str, digest: &Digest, auth: Option<&HeaderValue>, fresh: Freshness) -> bool {
        let now = Instant::now();
        let window = match fresh {
            Freshness::Online => self.ttl,
            Freshness::Offline => self.offline,
        };
        let grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let live = |k: &Key| grants.get(k).is_some_and(|at| now.duration_since(*at) < window);
        live(&Self::key(registry, repository, digest, None)) || (auth.is_some() && live(&Self::key(registry, repository, digest, auth)))
    }

    /// Records that `registry` let `auth` (anonymous when `None`) read `digest` in `repository`.
    pub fn grant(&self, registry: &str, repository: &str, digest: &Digest, auth: Option<&HeaderValue>) {
        let now = Instant::now();
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        if grants.len() >= MAX_GRANTS {
            grants.retain(|_, at| now.duration_since(*at) < self.offline);
            if grants.len() >= MAX_GRANTS {
                let mut ages: Vec<Instant> = grants.values().copied().collect();
                ages.sort();
                let cut = ages[ages.len() / 2];
                grants.retain(|_, at| *at > cut);
            }
        }
        grants.insert(Self::key(registry, repository, digest, auth), now);
    }

    /// Forgets what `auth` was granted for `digest` in `repository`: the registry now refuses it.
    pub fn revoke(&self, registry: &str, repository: &str, digest: &Digest, auth: Option<&HeaderValue>) {
        self.grants.lock().unwrap_or_else(|p| p.into_inner()).remove(&Self::key(registry, repository, digest, auth));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    const ONLINE: Freshness = Freshness::Online;

    #[test]
    fn a_grant_covers_one_credential_one_repository_one_digest_on_one_registry() {
        let c = AccessCache::new(Duration::from_secs(60), Duration::from_secs(600));
        let alice = HeaderValue::from_static("Basic YWxpY2U6eA==");
        let mallory = HeaderValue::from_static("Basic bWFsbG9yeTp4");
        c.grant("r", "private", &d("layer"), Some(&alice));
        assert!(c.allowed("r", "private", &d("layer"), Some(&alice), ONLINE));
        assert!(!c.allowed("r", "private", &d("layer"), Some(&mallory), ONLINE));
        assert!(!c.allowed("r", "private", &d("layer"), None, ONLINE));
        assert!(!c.allowed("r", "other", &d("layer"), Some(&alice), ONLINE));
        assert!(!c.allowed("r", "private", &d("other layer"), Some(&alice), ONLINE));
        assert!(!c.allowed("evil.example", "private", &d("layer"), Some(&alice), ONLINE));
    }

    #[test]
    fn an_anonymous_grant_covers_every_client_of_that_repository_and_digest_only() {
        let c = AccessCache::new(Duration::from_secs(60), Duration::from_secs(600));
        let mallory = HeaderValue::from_static("Basic bWFsbG9yeTp4");
        c.grant("r", "public", &d("layer"), None);
        assert!(c.allowed("r", "public", &d("layer"), Some(&mallory), ONLINE));
        assert!(c.allowed("r", "public", &d("layer"), None, ONLINE));
        assert!(!c.allowed("r", "public", &d("private layer"), None, ONLINE));
        assert!(!c.allowed("r", "private", &d("layer"), None, ONLINE));
    }

    #[test]
    fn grants_expire_online_sooner_than_offline() {
        let c = AccessCache::new(Duration::ZERO, Duration::from_secs(600));
        c.grant("r", "x", &d("l"), None);
        assert!(!c.allowed("r", "x", &d("l"), None, ONLINE));
        assert!(c.allowed("r", "x", &d("l"), None, Freshness::Offline));
        let gone = AccessCache::new(Duration::ZERO, Duration::ZERO);
        gone.grant("r", "x", &d("l"), None);
        assert!(!gone.allowed("r", "x", &d("l"), None, Freshness::Offline));
    }

    #[test]
    fn a_refusal_revokes_the_grant() {
        let c = AccessCache::new(Duration::from_secs(60), Duration::from_secs(600));
        let alice = HeaderValue::from_static("Basic YWxpY2U6eA==");
        c.grant("r", "x", &d("l"), Some(&alice));
        c.grant("r", "x", &d("l"), None);
        c.revoke("r", "x", &d("l"), None);
        assert!(!c.allowed("r", "x", &d("l"), None, ONLINE));
        assert!(c.allowed("r", "x", &d("l"), Some(&alice), ONLINE));
        c.revoke("r", "x", &d("l"), Some(&alice));
        assert!(!c.allowed("r", "x", &d("l"), Some(&alice), ONLINE));
    }
}
