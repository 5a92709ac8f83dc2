//! Manifests recorded by preheat jobs, so that agents can still resolve a preheated image (tag to
//! manifest to blobs) while its registry cannot be reached. Plain data, bounded in bytes; a
//! restarted scheduler has none until the next preheat.

use std::collections::{HashMap, VecDeque};

use shoal_core::Digest;

/// Largest manifest kept; registries cap manifests at 4 MiB too.
pub const MAX_MANIFEST: usize = 4 << 20;

/// One manifest, as a registry served it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// sha256 of `body`.
    pub digest: Digest,
    /// The registry's `Content-Type` for it.
    pub media_type: String,
    /// The exact bytes.
    pub body: Vec<u8>,
    /// The registry served it without credentials, so any client may read its repository.
    pub public: bool,
}

/// Why a manifest was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest {reference} of {repository}: content has digest {actual}, not {claimed}")]
    DigestMismatch { repository: String, reference: String, claimed: String, actual: Digest },
    #[error("manifest {reference} of {repository} is {len} bytes, more than the {MAX_MANIFEST} allowed")]
    TooLarge { repository: String, reference: String, len: usize },
}

/// Manifests by (registry, repository, tag or digest), oldest dropped first past a byte budget.
pub struct ManifestBook {
    budget: usize,
    used: usize,
    entries: HashMap<(String, String, String), Manifest>,
    order: VecDeque<(String, String, String)>,
}

impl ManifestBook {
    /// A book holding at most `budget` bytes of manifest bodies.
    pub fn new(budget: usize) -> ManifestBook {
        ManifestBook { budget, used: 0, entries: HashMap::new(), order: VecDeque::new() }
    }

    /// Records `manifest` as what `registry/repository:reference` names, replacing an older record.
    pub fn record(&mut self, registry: &str, repository: &str, reference: &str, manifest: Manifest) -> Result<(), ManifestError> {
        if manifest.body.len() > MAX_MANIFEST {
            return Err(ManifestError::TooLarge { repository: repository.into(), reference: reference.into(), len: manifest.body.len() });
        }
        let actual = Digest::of(&manifest.body);
        let digest_ref = reference.parse::<Digest>().ok();
        if actual != manifest.digest || digest_ref.is_some_and(|d| d != actual) {
            return Err(ManifestError::DigestMismatch {
                repository: repository.into(),
                reference: reference.into(),
                claimed: manifest.digest.to_string(),
                actual,
            });
        }
        let key = (registry.to_string(), repository.to_string(), reference.to_string());
        if let Some(old) = self.entries.remove(&key) {
            self.used -= old.body.len();
            self.order.retain(|k| *k != key);
        }
        self.used += manifest.body.len();
        self.entries.insert(key.clone(), manifest);
        self.order.push_back(key);
        while self.used > self.budget {
            let Some(oldest) = self.order.pop_front() else { break };
            if let Some(m) = self.entries.remove(&oldest) {
                self.used -= m.body.len();
            }
        }
        Ok(())
    }

    /// What `registry/repository:reference` names, if a preheat recorded it.
    /// A manifest recorded by tag is found by its digest too.
    pub fn get(&self, registry: &str, repository: &str, reference: &str) -> Option<&Manifest> {
        let key = (registry.to_string(), repository.to_string(), reference.to_string());
        if let Some(m) = self.entries.get(&key) {
            return Some(m);
        }
        let digest = reference.parse::<Digest>().ok()?;
        self.entries.iter().find(|((r, repo, _), m)| r == registry && repo == repository && m.digest == digest).map(|(_, m)| m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(body: &[u8]) -> Manifest {
        Manifest {
            digest: Digest::of(body),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            body: body.to_vec(),
            public: true,
        }
    }

    #[test]
    fn manifests_are_found_by_tag_and_by_digest() {
        let mut book = ManifestBook::new(1 << 20);
        let m = manifest(b"{\"a\":1}");
        book.record("r", "team/app", "v1", m.clone()).unwrap();
        assert_eq!(book.get("r", "team/app", "v1"), Some(&m));
        assert_eq!(book.get("r", "team/app", &m.digest.to_string()), Some(&m));
        assert_eq!(book.get("r", "team/other", "v1"), None);
        assert_eq!(book.get("other", "team/app", "v1"), None);
        assert_eq!(book.get("r", "team/other", &m.digest.to_string()), None);
    }

    #[test]
    fn a_body_that_does_not_match_its_digest_is_refused() {
        let mut book = ManifestBook::new(1 << 20);
        let mut m = manifest(b"{}");
        m.body = b"{\"x\":2}".to_vec();
        assert!(matches!(book.record("r", "a", "v1", m), Err(ManifestError::DigestMismatch { .. })));
        // Asked for by a digest, the body must have that digest.
        let m = manifest(b"{}");
        let other = Digest::of(b"other").to_string();
        assert!(matches!(book.record("r", "a", &other, m), Err(ManifestError::DigestMismatch { .. })));
        assert!(book.get("r", "a", "v1").is_none());
    }

    #[test]
    fn oversized_manifests_are_refused_and_old_ones_leave_past_the_budget() {
        let mut book = ManifestBook::new(10);
        assert!(matches!(book.record("r", "a", "big", manifest(&vec![b' '; MAX_MANIFEST + 1])), Err(ManifestError::TooLarge { .. })));
        book.record("r", "a", "one", manifest(b"123456")).unwrap();
        book.record("r", "a", "two", manifest(b"abcdef")).unwrap();
        assert!(book.get("r", "a", "one").is_none(), "the oldest goes first");
        assert!(book.get("r", "a", "two").is_some());
        // Re-recording a tag replaces it without counting it twice.
        book.record("r", "a", "two", manifest(b"ghijkl")).unwrap();
        assert_eq!(book.get("r", "a", "two").unwrap().body, b"ghijkl");
    }
}
