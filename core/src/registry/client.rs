//! HTTP side of the registry client.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, RANGE, WWW_AUTHENTICATE};
use http::{Method, StatusCode};
use tracing::{debug, warn};

use super::auth::{parse_challenge, Challenge, TokenCache, TokenResponse};
use crate::config::{Config, RegistryConfig};
use crate::digest::Digest;
use crate::reference::is_loopback_host;

/// What a request is for.
#[derive(Clone, Debug)]
pub enum Target {
    /// `/v2/`: the API root, used to check reachability.
    Root,
    /// A manifest by tag or digest.
    Manifest(String),
    /// A blob by digest.
    Blob(Digest),
}

/// One request to a registry.
#[derive(Clone, Debug)]
pub struct Request {
    /// `GET` or `HEAD`.
    pub method: Method,
    /// Registry host as containerd names it (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository (`library/alpine`); empty for [`Target::Root`].
    pub repository: String,
    /// What is asked for.
    pub target: Target,
    /// `Accept` header to send (manifests).
    pub accept: Option<HeaderValue>,
    /// Byte range `[start, end)` to ask for; `None` for the whole thing.
    pub range: Option<(u64, u64)>,
    /// The client's own `Authorization` header. When set it is forwarded as is and a 401 goes back
    /// to the client; when absent, the configured credentials (or anonymous tokens) are used.
    pub authorization: Option<HeaderValue>,
}

impl Request {
    /// A GET of a blob.
    pub fn blob(registry: &str, repository: &str, digest: &Digest) -> Request {
        Request {
            method: Method::GET,
            registry: registry.into(),
            repository: repository.into(),
            target: Target::Blob(digest.clone()),
            accept: None,
            range: None,
            authorization: None,
        }
    }

    /// A GET of a manifest by tag or digest, accepting every manifest and index type.
    pub fn manifest(registry: &str, repository: &str, reference: &str) -> Request {
        Request {
            method: Method::GET,
            registry: registry.into(),
            repository: repository.into(),
            target: Target::Manifest(reference.into()),
            accept: Some(HeaderValue::from_static(super::MANIFEST_ACCEPT)),
            range: None,
            authorization: None,
        }
    }

    fn path(&self) -> String {
        match &self.target {
            Target::Root => "/v2/".into(),
            Target::Manifest(r) => format!("/v2/{}/manifests/{r}", self.repository),
            Target::Blob(d) => format!("/v2/{}/blobs/{d}", self.repository),
        }
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::Root => format!("{} /v2/", self.registry),
            Target::Manifest(r) => format!("manifest {}/{}:{r}", self.registry, self.repository),
            Target::Blob(d) => format!("blob {d} from {}/{}", self.registry, self.repository),
        }
    }
}

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{what}: cannot reach the registry: {reason} (check the network, or [registry.\"{registry}\"] endpoint, plain_http, ca_file in shoal.toml)")]
    Unreachable { what: String, registry: String, reason: String },
    #[error("registry {registry}: {reason}")]
    Config { registry: String, reason: String },
    #[error("{what}: {status}{hint}")]
    Status { what: String, status: StatusCode, hint: &'static str },
    #[error("{what}: {reason}")]
    Protocol { what: String, reason: String },
}

impl RegistryError {
    /// Turns a non-success answer into an error that says what to do.
    pub fn from_status(req: &Request, status: StatusCode) -> RegistryError {
        let hint = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                " (pass credentials, or set username/password under [registry.\"<host>\"] in shoal.toml)"
            }
            StatusCode::NOT_FOUND => " (check the repository name and digest or tag)",
            StatusCode::TOO_MANY_REQUESTS => " (the registry is rate-limiting this node)",
            _ => "",
        };
        RegistryError::Status { what: req.describe(), status, hint }
    }
}

/// Where and how to reach one registry.
#[derive(Clone, Debug)]
pub struct Registry {
    /// `scheme://host[:port]` of the real endpoint.
    pub base: String,
    /// Configured credentials, used when the client sends none.
    pub credentials: Option<(String, String)>,
}

/// A registry client shared by every task of a process.
pub struct RegistryClient {
    config: Arc<Config>,
    /// One HTTP client per registry host, each with that registry's TLS settings.
    clients: Mutex<HashMap<String, reqwest::Client>>,
    tokens: Mutex<TokenCache>,
    /// Registries that answered with a Basic challenge: send configured credentials up front.
    basic: Mutex<HashSet<String>>,
}

impl RegistryClient {
    /// A client using `config`'s per-registry and download settings.
    pub fn new(config: Arc<Config>) -> RegistryClient {
        RegistryClient {
            config,
            clients: Mutex::new(HashMap::new()),
            tokens: Mutex::new(TokenCache::default()),
            basic: Mutex::new(HashSet::new()),
        }
    }

    /// How many times a failed request is retried.
    pub fn retries(&self) -> u32 {
        self.config.download.retries
    }

    /// Endpoint and credentials for `registry`.
    pub fn registry(&self, registry: &str) -> Registry {
        let rc = self.config.registry(registry);
        let base = match &rc.endpoint {
            Some(e) => e.trim_end_matches('/').to_string(),
            None if registry == "docker.io" => "https://registry-1.docker.io".into(),
            None => {
                let plain = rc.plain_http.unwrap_or_else(|| is_loopback_host(registry));
                format!("{}://{registry}", if plain { "http" } else { "https" })
            }
        };
        let credentials = rc.username.clone().map(|u| (u, rc.password.clone().unwrap_or_default()));
        Registry { base, credentials }
    }

    fn http(&self, registry: &str) -> Result<reqwest::Client, RegistryError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(registry) {
            return Ok(c.clone());
        }
        let client = build_http(&self.config.registry(registry), &self.config.download)
            .map_err(|reason| RegistryError::Config { registry: registry.into(), reason })?;
        clients.insert(registry.into(), client.clone());
        Ok(client)
    }

    /// Sends `req`, authenticating as described on [`Request::authorization`], retrying connection
    /// failures and 5xx/429 answers with exponential backoff. Any HTTP answer is returned, including
    /// 401 (with its challenge) and 404: the caller decides what they mean.
    pub async fn send(&self, req: &Request) -> Result<reqwest::Response, RegistryError> {
        let reg = self.registry(&req.registry);
        self.send_as(req, reg).await
    }

    /// Sends `req` with no credentials at all: neither the client's nor the configured ones
    /// (an anonymous token where the registry hands those out). A success means anyone may read it.
    pub async fn send_anonymous(&self, req: &Request) -> Result<reqwest::Response, RegistryError> {
        let reg = Registry { credentials: None, ..self.registry(&req.registry) };
        let req = Request { authorization: None, ..req.clone() };
        self.send_as(&req, reg).await
    }

    async fn send_as(&self, req: &Request, reg: Registry) -> Result<reqwest::Response, RegistryError> {
        let http = self.http(&req.registry)?;
        let url = format!("{}{}", reg.base, req.path());
        if let Some(client_auth) = &req.authorization {
            return self.send_retrying(&http, req, &url, Some(client_auth.clone())).await;
        }
        let scope = format!("repository:{}:pull", req.repository);
        let identity = reg.credentials.as_ref().map(|(u, _)| u.as_str()).unwrap_or("");
        let key = TokenCache::key(&req.registry, &scope, identity);
        let mut auth = self.cached_auth(&req.registry, &key, &reg);
        let mut resp = self.send_retrying(&http, req, &url, auth.clone()).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).and_then(parse_challenge);
        auth = match challenge {
            Some(Challenge::Basic) => match &reg.credentials {
                Some((u, p)) => {
                    self.basic.lock().unwrap_or_else(|p| p.into_inner()).insert(req.registry.clone());
                    Some(basic_header(u, p))
                }
                None => return Ok(resp),
            },
            Some(Challenge::Bearer { realm, service, scope: challenge_scope }) => {
                let scope = challenge_scope.unwrap_or(scope);
                match self.fetch_token(&http, req, &reg, &realm, service.as_deref(), &scope).await? {
                    Some((token, life)) => {
                        let header = bearer_header(&token)?;
                        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).put(key, token, life, Instant::now());
                        Some(header)
                    }
                    None => return Ok(resp),
                }
            }
            None => return Ok(resp),
        };
        resp = self.send_retrying(&http, req, &url, auth).await?;
        Ok(resp)
    }

    fn cached_auth(&self, registry: &str, key: &str, reg: &Registry) -> Option<HeaderValue> {
        if let Some(token) = self.tokens.lock().unwrap_or_else(|p| p.into_inner()).get(key, Instant::now()) {
            return bearer_header(&token).ok();
        }
        let basic = self.basic.lock().unwrap_or_else(|p| p.into_inner()).contains(registry);
        match (&reg.credentials, basic) {
            (Some((u, p)), true) => Some(basic_header(u, p)),
            _ => None,
        }
    }

    async fn fetch_token(
        &self,
        http: &reqwest::Client,
        req: &Request,
        reg: &Registry,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Option<(String, Duration)>, RegistryError> {
        let mut url = url::Url::parse(realm)
            .map_err(|e| RegistryError::Protocol { what: req.describe(), reason: format!("token realm {realm:?} is not a URL: {e}") })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut get = http.get(url.as_str());
        if let Some((u, p)) = &reg.credentials {
            get = get.basic_auth(u, Some(p));
        }
        let resp = get.send().await.map_err(|e| RegistryError::Unreachable {
            what: format!("token for {}", req.describe()),
            registry: req.registry.clone(),
            reason: error_chain(&e),
        })?;
        if !resp.status().is_success() {
            warn!(registry = %req.registry, status = %resp.status(), "token endpoint refused");
            return Ok(None);
        }
        let body: TokenResponse = resp.json().await.map_err(|e| RegistryError::Protocol {
            what: req.describe(),
            reason: format!("token endpoint {realm} sent an unreadable answer: {e}"),
        })?;
        Ok(body.into_token())
    }

    async fn send_retrying(
        &self,
        http: &reqwest::Client,
        req: &Request,
        url: &str,
        auth: Option<HeaderValue>,
    ) -> Result<reqwest::Response, RegistryError> {
        send_with_retries(self.config.download.retries + 1, &req.describe(), &req.registry, || {
            let mut r = http.request(req.method.clone(), url);
            if let Some(a) = &auth {
                r = r.header(AUTHORIZATION, a.clone());
            }
            if let Some(a) = &req.accept {
                r = r.header(ACCEPT, a.clone());
            }
            if let Some((start, end)) = req.range {
                r = r.header(RANGE, format!("bytes={start}-{}", end.saturating_sub(1)));
            }
            Ok(r)
        })
        .await
    }
}

/// Sends the request `build` makes, up to `attempts` times: connection failures and 5xx/429
/// answers are retried with exponential backoff. Any other answer, and the last one, is returned.
async fn send_with_retries(
    attempts: u32,
    what: &str,
    registry: &str,
    mut build: impl FnMut() -> Result<reqwest::RequestBuilder, RegistryError>,
) -> Result<reqwest::Response, RegistryError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let retry_reason = match build()?.send().await {
            Ok(resp) if resp.status().is_server_error() || resp.status() == StatusCode::TOO_MANY_REQUESTS => {
                if attempt >= attempts {
                    return Ok(resp);
                }
                resp.status().to_string()
            }
            Ok(resp) => return Ok(resp),
            Err(source) => {
                if attempt >= attempts {
                    return Err(RegistryError::Unreachable {
                        what: what.to_string(),
                        registry: registry.to_string(),
                        reason: error_chain(&source),
                    });
                }
                source.to_string()
            }
        };
        let delay = backoff(attempt);
        debug!(what, attempt, ?delay, reason = %retry_reason, "retrying registry request");
        tokio::time::sleep(delay).await;
    }
}

/// An error and its causes, innermost last: reqwest's own message alone ("error sending request")
/// does not say that the connection was refused or the certificate unknown.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// The `Content-Length` header of an answer. (reqwest's `content_length()` reports the body it
/// received, which is 0 for every HEAD.)
pub fn header_len(resp: &reqwest::Response) -> Option<u64> {
    resp.headers().get(http::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Delay before retry number `attempt` (1-based): 250 ms doubling, at most 4 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64 << attempt.saturating_sub(1).min(4))
}

fn basic_header(user: &str, pass: &str) -> HeaderValue {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let mut v = HeaderValue::from_str(&format!("Basic {encoded}")).unwrap_or_else(|_| HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

fn bearer_header(token: &str) -> Result<HeaderValue, RegistryError> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| RegistryError::Protocol {
        what: "token".into(),
        reason: "token endpoint returned a token with characters not allowed in a header".into(),
    })?;
    v.set_sensitive(true);
    Ok(v)
}

fn build_http(rc: &RegistryConfig, dl: &crate::config::DownloadConfig) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(dl.connect_timeout())
        .read_timeout(dl.read_timeout())
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")))
        // Redirects to blob storage are followed; reqwest drops Authorization when the host changes.
        .redirect(reqwest::redirect::Policy::limited(5));
    if rc.insecure_skip_verify {
        b = b.danger_accept_invalid_certs(true);
    }
    if let Some(path) = &rc.ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("ca_file {}: not PEM certificates: {e}", path.display()))?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build().map_err(|e| format!("cannot build HTTP client: {e}"))
}

mod push;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_follow_host_rules() {
        let mut cfg = Config::default();
        cfg.registry.insert("reg.example:8443".into(), RegistryConfig { plain_http: Some(true), ..Default::default() });
        cfg.registry.insert(
            "mirror.example".into(),
            RegistryConfig { endpoint: Some("https://real.example/".into()), username: Some("u".into()), ..Default::default() },
        );
        let c = RegistryClient::new(Arc::new(cfg));
        assert_eq!(c.registry("docker.io").base, "https://registry-1.docker.io");
        assert_eq!(c.registry("127.0.0.1:5000").base, "http://127.0.0.1:5000");
        assert_eq!(c.registry("localhost:5000").base, "http://localhost:5000");
        assert_eq!(c.registry("ghcr.io").base, "https://ghcr.io");
        assert_eq!(c.registry("reg.example:8443").base, "http://reg.example:8443");
        let m = c.registry("mirror.example");
        assert_eq!(m.base, "https://real.example");
        assert_eq!(m.credentials, Some(("u".into(), String::new())));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(9), Duration::from_secs(4));
    }
}
