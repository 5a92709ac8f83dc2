//! Content digests (`sha256:<hex>`) and the task ids derived from them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// An OCI content digest. Only `sha256` is accepted: it is what every registry and containerd use,
/// and accepting unknown algorithms would let a request name content we cannot verify.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest {
    /// Lower-case hex of the 32-byte sha256.
    hex: String,
}

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest {0:?} does not start with \"sha256:\" (only sha256 digests are supported)")]
    Algorithm(String),
    #[error("digest {0:?} must have 64 lower-case hex characters after \"sha256:\"")]
    Hex(String),
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest { hex: hex::encode(sha2::Sha256::digest(bytes)) }
    }

    /// Builds a digest from a finished sha256 hasher.
    pub fn from_hasher(hasher: sha2::Sha256) -> Digest {
        Digest { hex: hex::encode(hasher.finalize()) }
    }

    /// The hex part, safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Digest, DigestError> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| DigestError::Algorithm(s.to_string()))?;
        let valid = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(DigestError::Hex(s.to_string()));
        }
        Ok(Digest { hex: hex.to_string() })
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Digest, DigestError> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", &self.hex[..12])
    }
}

/// The id of a task: the blob's digest when it has one, else `blake3` of its URL without volatile
/// query parameters. Used as the store's directory name and, later, as the scheduler's key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(String);

/// Query parameters that change between requests for the same content (signed URLs) and so must not
/// change the task id.
const VOLATILE_QUERY_PARAMS: &[&str] =
    &["X-Amz-Date", "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Expires", "Expires", "Signature", "token"];

impl TaskId {
    /// The task of an OCI blob.
    pub fn of_digest(digest: &Digest) -> TaskId {
        TaskId(format!("sha256-{}", digest.hex()))
    }

    /// The task of a generic URL without a digest.
    pub fn of_url(url: &url::Url) -> TaskId {
        let mut stable = url.clone();
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| !VOLATILE_QUERY_PARAMS.iter().any(|v| v.eq_ignore_ascii_case(k)))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        stable.set_query(None);
        if !kept.is_empty() {
            stable.query_pairs_mut().extend_pairs(kept);
        }
        stable.set_fragment(None);
        TaskId(format!("blake3-{}", blake3::hash(stable.as_str().as_bytes()).to_hex()))
    }

    /// Parses a task id as stored on disk (`sha256-<hex>` or `blake3-<hex>`).
    pub fn parse(s: &str) -> Option<TaskId> {
        let (alg, hex) = s.split_once('-')?;
        let ok =
            matches!(alg, "sha256" | "blake3") && hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then(|| TaskId(s.to_string()))
    }

    /// The blob digest this task must match, when it has one.
    pub fn digest(&self) -> Option<Digest> {
        self.0.strip_prefix("sha256-").and_then(|hex| format!("sha256:{hex}").parse().ok())
    }

    /// The id as a string; also a safe file name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0[..self.0.len().min(19)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_parses_and_prints_round_trip() {
        let d: Digest = format!("sha256:{HEX}").parse().unwrap();
        assert_eq!(d.to_string(), format!("sha256:{HEX}"));
        assert_eq!(d, Digest::of(b""));
    }

    #[test]
    fn digest_rejects_bad_input() {
        for bad in [
            "",
            "sha256:",
            "sha512:abc",
            &format!("sha256:{}", HEX.to_uppercase()),
            &format!("sha256:{HEX}0"),
            "sha256:../../../../etc/passwd",
            &format!("sha256:{}g", &HEX[1..]),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn task_id_of_digest_round_trips() {
        let d = Digest::of(b"x");
        let t = TaskId::of_digest(&d);
        assert_eq!(t.digest(), Some(d));
        assert_eq!(TaskId::parse(t.as_str()), Some(t));
        assert_eq!(TaskId::parse("sha256-../x"), None);
    }

    #[test]
    fn task_id_of_url_ignores_volatile_params() {
        let a = url::Url::parse("https://cdn.example/blob?X-Amz-Signature=1&part=2").unwrap();
        let b = url::Url::parse("https://cdn.example/blob?part=2&X-Amz-Signature=9").unwrap();
        let c = url::Url::parse("https://cdn.example/blob?part=3").unwrap();
        assert_eq!(TaskId::of_url(&a), TaskId::of_url(&b));
        assert_ne!(TaskId::of_url(&a), TaskId::of_url(&c));
        assert_eq!(TaskId::of_url(&a).digest(), None);
    }
}
