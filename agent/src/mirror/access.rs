//! Access checks: before bytes from the store go to a client, the origin must have said (recently)
//! that this client's credentials may read the repository. Public repositories answer an anonymous
//! check, which then covers every client.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderValue;

/// Granted (registry, repository, credential) triples and when the grant expires.
pub struct AccessCache {
    ttl: Duration,
    grants: Mutex<HashMap<String, Instant>>,
}

impl AccessCache {
    /// Grants live for `ttl`.
    pub fn new(ttl: Duration) -> AccessCache {
        AccessCache { ttl, grants: Mutex::new(HashMap::new()) }
    }

    fn key(registry: &str, repository: &str, auth: Option<&HeaderValue>) -> String {
        // Credentials are kept only as a hash.
        let cred = auth.map(|a| blake3::hash(a.as_bytes()).to_hex().to_string()).unwrap_or_default();
        format!("{registry}/{repository}\n{cred}")
    }

    /// Whether a client with `auth` may read `repository`, without asking the origin.
    pub fn allowed(&self, registry: &str, repository: &str, auth: Option<&HeaderValue>) -> bool {
        let now = Instant::now();
        let grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let live = |k: &str| grants.get(k).is_some_and(|until| *until > now);
        live(&Self::key(registry, repository, None)) || (auth.is_some() && live(&Self::key(registry, repository, auth)))
    }

    /// Records that the origin let `auth` read `repository`.
    pub fn grant(&self, registry: &str, repository: &str, auth: Option<&HeaderValue>) {
        let now = Instant::now();
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        if grants.len() > 10_000 {
            grants.retain(|_, until| *until > now);
        }
        grants.insert(Self::key(registry, repository, auth), now + self.ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_per_credential_and_anonymous_grants_cover_everyone() {
        let c = AccessCache::new(Duration::from_secs(60));
        let alice = HeaderValue::from_static("Basic YWxpY2U6eA==");
        let mallory = HeaderValue::from_static("Basic bWFsbG9yeTp4");
        c.grant("r", "private", Some(&alice));
        assert!(c.allowed("r", "private", Some(&alice)));
        assert!(!c.allowed("r", "private", Some(&mallory)));
        assert!(!c.allowed("r", "private", None));
        assert!(!c.allowed("r", "other", Some(&alice)));
        c.grant("r", "public", None);
        assert!(c.allowed("r", "public", Some(&mallory)) && c.allowed("r", "public", None));
    }

    #[test]
    fn grants_expire() {
        let c = AccessCache::new(Duration::ZERO);
        c.grant("r", "x", None);
        assert!(!c.allowed("r", "x", None));
    }
}
