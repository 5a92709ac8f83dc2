//! Registry authentication: parsing `WWW-Authenticate` challenges and caching bearer tokens per
//! scope until they expire. Plain data; the HTTP calls live in the client.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm="..."`: send user and password with every request.
    Basic,
    /// `Bearer realm="...",service="...",scope="..."`: fetch a token from `realm`.
    Bearer {
        /// Token endpoint URL.
        realm: String,
        /// `service` parameter to pass to the token endpoint.
        service: Option<String>,
        /// `scope` parameter (e.g. `repository:library/alpine:pull`).
        scope: Option<String>,
    },
}

/// Parses the first challenge of a `WWW-Authenticate` header value. Returns `None` for schemes we
/// do not speak or malformed input.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    let params = parse_params(params);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        }),
        _ => None,
    }
}

/// Parses `key="value", key2=value2` auth parameters; quoted values may contain commas and `\"`.
fn parse_params(input: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = input.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect::<String>().trim().to_ascii_lowercase();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect::<String>().trim().to_string();
        }
        out.insert(key, value);
    }
}

/// A token endpoint's answer (Docker token spec); either field name may carry the token.
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    /// The token (Docker's field name).
    #[serde(default)]
    pub token: Option<String>,
    /// The token (OAuth2's field name).
    #[serde(default)]
    pub access_token: Option<String>,
    /// Lifetime in seconds; the spec's default is 60.
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token and how long it may be used.
    pub fn into_token(self) -> Option<(String, Duration)> {
        let token = self.token.filter(|t| !t.is_empty()).or(self.access_token)?;
        // Renew a little early so a token never expires in flight; keep at least a few seconds.
        let life = self.expires_in.unwrap_or(60).max(10);
        Some((token, Duration::from_secs(life - life / 10)))
    }
}

/// Bearer tokens by (registry, scope, credential identity), dropped when they expire.
#[derive(Default)]
pub struct TokenCache {
    /// Token and expiry instant per key.
    tokens: HashMap<String, (String, Instant)>,
}

impl TokenCache {
    /// The key for a registry, a scope and whose credentials fetched the token.
    pub fn key(registry: &str, scope: &str, identity: &str) -> String {
        format!("{registry}\n{scope}\n{identity}")
    }

    /// A live token for `key`, if any.
    pub fn get(&mut self, key: &str, now: Instant) -> Option<String> {
        match self.tokens.get(key) {
            Some((t, until)) if *until > now => Some(t.clone()),
            Some(_) => {
                self.tokens.remove(key);
                None
            }
            None => None,
        }
    }

    /// Stores a token valid for `life` from `now`.
    pub fn put(&mut self, key: String, token: String, life: Duration, now: Instant) {
        // Bound memory: expired entries go whenever the cache grows.
        if self.tokens.len() > 4096 {
            self.tokens.retain(|_, (_, until)| *until > now);
        }
        self.tokens.insert(key, (token, now + life));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_bearer_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
    }

    #[test]
    fn parses_quoted_commas_and_unquoted_values() {
        let c = parse_challenge(r#"bearer realm=https://t.example/x, scope="repository:a:pull,push", service="s\"q""#);
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://t.example/x".into(),
                service: Some("s\"q".into()),
                scope: Some("repository:a:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
    }

    #[test]
    fn rejects_unknown_or_incomplete_challenges() {
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
        assert_eq!(parse_challenge(""), None);
        assert_eq!(
            parse_challenge("Bearer realm=\"unterminated"),
            Some(Challenge::Bearer { realm: "unterminated".into(), service: None, scope: None })
        );
    }

    #[test]
    fn tokens_expire() {
        let mut cache = TokenCache::default();
        let now = Instant::now();
        let (tok, life) = TokenResponse { token: None, access_token: Some("t".into()), expires_in: Some(300) }.into_token().unwrap();
        let key = TokenCache::key("r", "s", "anon");
        cache.put(key.clone(), tok, life, now);
        assert_eq!(cache.get(&key, now + Duration::from_secs(200)), Some("t".into()));
        assert_eq!(cache.get(&key, now + Duration::from_secs(290)), None);
        assert_eq!(cache.get(&key, now), None, "an expired token is dropped");
    }
}
