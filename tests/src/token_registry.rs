//! A real `docker-registry` with token auth, and the token server it trusts: per-repository
//! access, as Docker Hub, Harbor or GitLab scope it.
//!
//! The token server runs inside the test process. It knows a table of users (name, password, the
//! repositories each may pull), the repositories anyone may pull without credentials, and one admin
//! who may push and pull everywhere (the fixture pushes as the admin). It answers the Docker token
//! protocol (`GET /token?service=..&scope=repository:<name>:pull` with Basic auth or none, and the
//! OAuth2 form `POST /token` containerd tries first) with an ES256 JWT whose `access` claim lists
//! only what that caller may do; the registry checks the JWT against the signing certificate,
//! which is its own root in the registry's `rootcertbundle`. A token for a repository the caller
//! may not read carries no access to it, and the registry answers 401 `insufficient_scope`.
//!
//! A private image pulled through a Shoal mirror:
//!
//! ```ignore
//! let reg = TokenRegistry::start(&[("alice", "alice-pw", &["private/a"])], &["public/x"]).await?;
//! reg.push_image("private/a", "v1", &[("/hello", b"hi".to_vec())]).await?;
//! let agent = Agent::start("").await?;
//! let url = agent.blob_url(reg.registry(), "private/a", &digest); // ...?ns=127.0.0.1%3A<port>
//! let resp = token_registry::fetch(Method::GET, &url, Some(("alice", "alice-pw"))).await?;
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use crate::digest_of;
use crate::registry::{Hit, Registry, TokenAuth};

/// The admin's name: may push and pull every repository.
pub const ADMIN_USER: &str = "shoal-admin";
/// The admin's password.
pub const ADMIN_PASSWORD: &str = "shoal-admin-secret";
/// The `service` the registry names in its challenges (the tokens' audience).
pub const SERVICE: &str = "shoal-test-registry";
/// The issuer the registry trusts.
pub const ISSUER: &str = "shoal-test-token-server";
/// How long a token lives, in seconds.
const TOKEN_LIFE: u64 = 300;

/// Media types asked for when fetching manifests (blobs ignore `Accept`).
const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Who may read what.
#[derive(Default, Debug)]
struct Policy {
    /// User name to (password, repositories the user may pull).
    users: BTreeMap<String, (String, BTreeSet<String>)>,
    /// Repositories anyone may pull, with or without credentials.
    public: BTreeSet<String>,
}

/// One request the token server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The authenticated user; `None` for anonymous requests.
    pub user: Option<String>,
    /// The scopes asked for, as sent (`repository:private/a:pull`).
    pub scopes: Vec<String>,
    /// The HTTP status answered (401 for a wrong password).
    pub status: u16,
    /// What the token granted: (repository, actions).
    pub granted: Vec<(String, Vec<String>)>,
}

/// The token server's state, shared with its connections.
struct Issuer {
    policy: Mutex<Policy>,
    key: EcdsaKeyPair,
    /// The signing certificate, DER, sent in every token's `x5c`.
    cert_der: Vec<u8>,
    rng: ring::rand::SystemRandom,
    log: Mutex<Vec<TokenRequest>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// A token server on a loopback port, serving until dropped.
///
/// It runs on a thread and runtime of its own, so it answers even while the test's runtime is
/// blocked (waiting for `skopeo`, which asks it for a push token).
pub struct TokenServer {
    addr: SocketAddr,
    issuer: Arc<Issuer>,
    /// The signing certificate, PEM: the registry's `rootcertbundle`.
    cert_pem: String,
    /// Dropping it stops the server.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TokenServer {
    /// Starts a token server with a fresh P-256 key and a self-signed certificate for it.
    pub fn start() -> anyhow::Result<TokenServer> {
        let key = rcgen::KeyPair::generate().context("generating the token signing key")?;
        let mut params = rcgen::CertificateParams::new(vec!["shoal-test-token-server".to_string()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "shoal-test-token-server");
        let cert = params.self_signed(&key)?;
        let rng = ring::rand::SystemRandom::new();
        let signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.serialize_der(), &rng)
            .map_err(|e| anyhow::anyhow!("loading the token signing key: {e}"))?;
        let issuer = Arc::new(Issuer {
            policy: Mutex::new(Policy::default()),
            key: signer,
            cert_der: cert.der().to_vec(),
            rng,
            log: Mutex::new(Vec::new()),
            next_id: 0.into(),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = issuer.clone();
        let thread = std::thread::Builder::new().name("token-server".into()).spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                tokio::select! {
                    _ = accept_loop(listener, serving) => {}
                    _ = stopped => {}
                }
            })
        })?;
        Ok(TokenServer { addr, issuer, cert_pem: cert.pem(), stop: Some(stop), thread: Some(thread) })
    }

    /// `http://127.0.0.1:<port>/token`, the realm of the registry's challenges.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Adds (or replaces) a user who may pull `repositories`.
    pub fn add_user(&self, user: &str, password: &str, repositories: &[&str]) {
        let repos = repositories.iter().map(|r| r.to_string()).collect();
        lock(&self.issuer.policy).users.insert(user.to_string(), (password.to_string(), repos));
    }

    /// Lets `user` pull `repository` (`allowed`) or takes that away; later tokens follow.
    pub fn set_access(&self, user: &str, repository: &str, allowed: bool) {
        let mut policy = lock(&self.issuer.policy);
        let Some((_, repos)) = policy.users.get_mut(user) else { return };
        if allowed {
            repos.insert(repository.to_string());
        } else {
            repos.remove(repository);
        }
    }

    /// Makes `repository` readable by anyone (`public`) or only by the users listed for it.
    pub fn set_public(&self, repository: &str, public: bool) {
        let mut policy = lock(&self.issuer.policy);
        if public {
            policy.public.insert(repository.to_string());
        } else {
            policy.public.remove(repository);
        }
    }

    /// Every token request answered so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        lock(&self.issuer.log).clone()
    }

    /// A token for `scopes` as `credentials` would get it (`None`: anonymous), straight from the
    /// issuer; `Err` when the credentials are wrong.
    pub fn token(&self, credentials: Option<(&str, &str)>, scopes: &[&str]) -> anyhow::Result<String> {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        match self.issuer.answer(credentials, &scopes, SERVICE) {
            Ok(token) => Ok(token),
            Err(status) => bail!("token server refused {:?}: {status}", credentials.map(|c| c.0)),
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A `docker-registry` with token auth and its token server.
pub struct TokenRegistry {
    /// The token server the registry sends clients to.
    pub tokens: TokenServer,
    registry: Registry,
}

impl TokenRegistry {
    /// Starts the token server with `users` (name, password, repositories they may pull) and the
    /// `public` repositories anyone may pull, then a registry that trusts it. The admin
    /// ([`ADMIN_USER`], [`ADMIN_PASSWORD`]) may push and pull everything.
    pub async fn start(users: &[(&str, &str, &[&str])], public: &[&str]) -> anyhow::Result<TokenRegistry> {
        let tokens = TokenServer::start()?;
        for (user, password, repos) in users {
            tokens.add_user(user, password, repos);
        }
        for repo in public {
            tokens.set_public(repo, true);
        }
        let auth = TokenAuth { realm: tokens.realm(), service: SERVICE.into(), issuer: ISSUER.into(), root_pem: tokens.cert_pem.clone() };
        let registry = Registry::start_token_auth(&auth).await?;
        Ok(TokenRegistry { tokens, registry })
    }

    /// The registry process: its host (the `?ns=` value), URL, access log; for [`crate::Agent::blob_url`].
    /// Its own `push_*` helpers speak Basic auth and do not work here: use this type's.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// `127.0.0.1:<port>`, the name containerd and the mirror use.
    pub fn host(&self) -> String {
        self.registry.host()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.registry.url()
    }

    /// Every request in the registry's access log (as [`Registry::hits`]).
    pub fn hits(&self) -> Vec<Hit> {
        self.registry.hits()
    }

    /// GETs of a blob that sent bytes (200 or 206).
    pub fn blob_fetches(&self, digest: &str) -> Vec<Hit> {
        self.registry.blob_fetches(digest)
    }

    /// Bytes the registry sent for a blob, over every request.
    pub fn blob_bytes(&self, digest: &str) -> u64 {
        self.registry.blob_bytes(digest)
    }

    /// Kills the registry (the token server keeps running).
    pub fn stop(&mut self) {
        self.registry.stop();
    }

    /// Starts the registry again on the same port with the same storage.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.registry.restart().await
    }

    /// An admin token with `pull,push` on `repo`.
    fn admin_token(&self, repo: &str) -> anyhow::Result<String> {
        self.tokens.token(Some((ADMIN_USER, ADMIN_PASSWORD)), &[&format!("repository:{repo}:pull,push")])
    }

    /// Uploads `bytes` as a blob of `repo` (monolithic upload, as the admin) and returns its digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> anyhow::Result<String> {
        let digest = digest_of(bytes);
        let token = self.admin_token(repo)?;
        let http = reqwest::Client::new();
        let resp = http.post(format!("{}/v2/{repo}/blobs/uploads/", self.url())).bearer_auth(&token).send().await?;
        if resp.status() != reqwest::StatusCode::ACCEPTED {
            bail!("starting upload to {repo}: {}", resp.status());
        }
        let location = resp.headers().get("location").and_then(|v| v.to_str().ok()).context("upload location")?;
        let mut url = if location.starts_with("http") { location.to_string() } else { format!("{}{location}", self.url()) };
        url.push_str(if url.contains('?') { "&" } else { "?" });
        url.push_str(&format!("digest={digest}"));
        let resp = http.put(url).bearer_auth(&token).body(bytes.to_vec()).send().await?;
        if resp.status() != reqwest::StatusCode::CREATED {
            bail!("finishing upload to {repo}: {}", resp.status());
        }
        Ok(digest)
    }

    /// Builds an image (busybox, then one layer per file) and pushes it as `repo:tag`, as the admin.
    pub async fn push_image(&self, repo: &str, tag: &str, files: &[(&str, Vec<u8>)]) -> anyhow::Result<()> {
        self.registry.push_image_as(repo, tag, files, &["/bin/busybox"], Some((ADMIN_USER, ADMIN_PASSWORD))).await
    }

    /// Digests and sizes of an image's config and layers (read as the admin).
    pub async fn image_blobs(&self, repo: &str, tag: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let url = format!("{}/v2/{repo}/manifests/{tag}", self.url());
        let resp = fetch(reqwest::Method::GET, &url, Some((ADMIN_USER, ADMIN_PASSWORD))).await?;
        if !resp.status().is_success() {
            bail!("manifest {repo}:{tag}: {}", resp.status());
        }
        let m: serde_json::Value = resp.json().await?;
        let mut out = vec![];
        for d in std::iter::once(&m["config"]).chain(m["layers"].as_array().into_iter().flatten()) {
            out.push((d["digest"].as_str().context("digest")?.to_string(), d["size"].as_u64().context("size")?));
        }
        Ok(out)
    }
}

/// Sends `method url` the way `curl` plus a registry client would: first without credentials;
/// on a 401 with a `Bearer` challenge, gets a token from the challenge's realm for its service and
/// scope (with `credentials` as Basic auth, or anonymously) and sends the request again with it.
/// Works against the registry itself and through a Shoal mirror, which relays the challenge.
/// Manifest media types are accepted (blobs ignore `Accept`). Any final answer is returned.
pub async fn fetch(method: reqwest::Method, url: &str, credentials: Option<(&str, &str)>) -> anyhow::Result<reqwest::Response> {
    let http = reqwest::Client::new();
    let first = http.request(method.clone(), url).header("Accept", MANIFEST_TYPES).send().await?;
    if first.status() != reqwest::StatusCode::UNAUTHORIZED {
        return Ok(first);
    }
    let Some(challenge) = first.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).map(str::to_string) else {
        return Ok(first);
    };
    let Some(shoal_core::registry::auth::Challenge::Bearer { realm, service, scope }) =
        shoal_core::registry::auth::parse_challenge(&challenge)
    else {
        return Ok(first);
    };
    let mut token_url = url::Url::parse(&realm).with_context(|| format!("realm {realm:?}"))?;
    {
        let mut q = token_url.query_pairs_mut();
        if let Some(s) = &service {
            q.append_pair("service", s);
        }
        if let Some(s) = &scope {
            q.append_pair("scope", s);
        }
    }
    let mut get = http.get(token_url.as_str());
    if let Some((u, p)) = credentials {
        get = get.basic_auth(u, Some(p));
    }
    let answer = get.send().await?;
    if !answer.status().is_success() {
        bail!("token endpoint {realm} answered {} for {:?}", answer.status(), credentials.map(|c| c.0));
    }
    let body: serde_json::Value = answer.json().await?;
    let token = body["token"].as_str().context("token endpoint sent no token")?;
    Ok(http.request(method, url).header("Accept", MANIFEST_TYPES).bearer_auth(token).send().await?)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn accept_loop(listener: tokio::net::TcpListener, issuer: Arc<Issuer>) {
    while let Ok((stream, _)) = listener.accept().await {
        let issuer = issuer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let issuer = issuer.clone();
                async move { Ok::<_, Infallible>(issuer.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

impl Issuer {
    /// `GET /token?service=..&scope=..` with Basic auth or none, or `POST /token` with an OAuth2
    /// password-grant form.
    async fn handle(&self, req: hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
        if req.uri().path() != "/token" {
            return respond(404, "not found\n".into());
        }
        let mut params: Vec<(String, String)> =
            url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
        let mut credentials = req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(parse_basic);
        if req.method() == hyper::Method::POST {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return respond(400, "unreadable body\n".into()),
            };
            params.extend(url::form_urlencoded::parse(&body).into_owned());
            let field = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            if let (Some(u), Some(p)) = (field("username"), field("password")) {
                credentials = Some((u, p));
            }
        }
        let service = params.iter().find(|(k, _)| k == "service").map_or(SERVICE.to_string(), |(_, v)| v.clone());
        // Scopes come one per `scope` parameter, or space-separated in one (OAuth2).
        let scopes: Vec<String> = params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_string))
            .filter(|s| !s.is_empty())
            .collect();
        let creds = credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        match self.answer(creds, &scopes, &service) {
            Ok(token) => {
                let now = unix_now();
                let body = serde_json::json!({
                    "token": token,
                    "access_token": token,
                    "expires_in": TOKEN_LIFE,
                    "issued_at": time_rfc3339(now),
                });
                respond(200, body.to_string())
            }
            Err(status) => respond(status, "{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"wrong user or password\"}]}".into()),
        }
    }

    /// A signed token for `scopes`, or the HTTP status refusing the credentials. Records the request.
    fn answer(&self, credentials: Option<(&str, &str)>, scopes: &[String], service: &str) -> Result<String, u16> {
        let policy = lock(&self.policy);
        let user = match credentials {
            None => None,
            Some((u, p)) if u == ADMIN_USER && p == ADMIN_PASSWORD => Some(u.to_string()),
            Some((u, p)) => match policy.users.get(u) {
                Some((password, _)) if password == p => Some(u.to_string()),
                _ => {
                    drop(policy);
                    self.record(TokenRequest { user: Some(u.to_string()), scopes: scopes.to_vec(), status: 401, granted: vec![] });
                    return Err(401);
                }
            },
        };
        let granted = grant(&policy, user.as_deref(), scopes);
        drop(policy);
        let token = self.sign(user.as_deref().unwrap_or(""), service, &granted);
        self.record(TokenRequest { user, scopes: scopes.to_vec(), status: 200, granted });
        Ok(token)
    }

    fn record(&self, r: TokenRequest) {
        lock(&self.log).push(r);
    }

    /// An ES256 JWT with the signing certificate in `x5c`.
    fn sign(&self, subject: &str, audience: &str, granted: &[(String, Vec<String>)]) -> String {
        let now = unix_now();
        let header = serde_json::json!({ "typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&self.cert_der)] });
        let access: Vec<serde_json::Value> =
            granted.iter().map(|(name, actions)| serde_json::json!({ "type": "repository", "name": name, "actions": actions })).collect();
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": audience,
            "exp": now + TOKEN_LIFE,
            "nbf": now.saturating_sub(10),
            "iat": now,
            "jti": format!("shoal-test-{id}"),
            "access": access,
        });
        let signed = format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        // Signing with a valid key and a working system RNG does not fail.
        let signature = self.key.sign(&self.rng, signed.as_bytes()).expect("ES256 signing");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

/// What `user` (`None`: anonymous) may do of what `scopes` ask: the admin anything on any
/// repository; others `pull` on public repositories and on those listed for them, nothing else.
/// Scopes granting nothing are left out of the token.
fn grant(policy: &Policy, user: Option<&str>, scopes: &[String]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for scope in scopes {
        let Some((name, asked)) = parse_scope(scope) else { continue };
        let readable =
            policy.public.contains(name) || user.and_then(|u| policy.users.get(u)).is_some_and(|(_, repos)| repos.contains(name));
        let allowed: Vec<String> = asked
            .iter()
            .filter(|a| match user {
                Some(ADMIN_USER) => true,
                _ => **a == "pull" && readable,
            })
            .map(|a| a.to_string())
            .collect();
        if allowed.is_empty() {
            continue;
        }
        match out.iter_mut().find(|(n, _)| n == name) {
            Some((_, actions)) => actions.extend(allowed.into_iter().filter(|a| !actions.contains(a)).collect::<Vec<_>>()),
            None => out.push((name.to_string(), allowed)),
        }
    }
    out
}

/// `repository:<name>:<action>,<action>` into the name and actions; other resource types are
/// not granted (`registry:catalog:*`).
fn parse_scope(scope: &str) -> Option<(&str, Vec<&str>)> {
    let rest = scope.strip_prefix("repository:")?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((name, actions.split(',').filter(|a| !a.is_empty()).collect()))
}

/// `Basic <base64 user:password>` into its parts.
fn parse_basic(header: &str) -> Option<(String, String)> {
    let encoded = header.strip_prefix("Basic ").or_else(|| header.strip_prefix("basic "))?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (u, p) = decoded.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn respond(status: u16, body: String) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new())))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Seconds since the epoch as RFC 3339 UTC (`2026-01-02T03:04:05Z`).
fn time_rfc3339(secs: u64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm), enough for a test token's `issued_at`.
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let mut p = Policy::default();
        p.users.insert("alice".into(), ("pw".into(), ["private/a".to_string()].into()));
        p.public.insert("public/x".into());
        p
    }

    fn scopes(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn users_get_pull_on_their_repositories_and_public_ones_only() {
        let p = policy();
        let asked = scopes(&["repository:private/a:pull", "repository:private/b:pull", "repository:public/x:pull,push"]);
        assert_eq!(
            grant(&p, Some("alice"), &asked),
            vec![("private/a".to_string(), vec!["pull".to_string()]), ("public/x".to_string(), vec!["pull".to_string()])]
        );
        assert_eq!(grant(&p, None, &asked), vec![("public/x".to_string(), vec!["pull".to_string()])]);
        assert_eq!(grant(&p, Some("mallory"), &asked), vec![("public/x".to_string(), vec!["pull".to_string()])]);
    }

    #[test]
    fn the_admin_gets_every_action_asked() {
        let g = grant(&policy(), Some(ADMIN_USER), &scopes(&["repository:private/b:pull,push", "registry:catalog:*"]));
        assert_eq!(g, vec![("private/b".to_string(), vec!["pull".to_string(), "push".to_string()])]);
    }

    #[test]
    fn scopes_and_basic_headers_parse() {
        assert_eq!(parse_scope("repository:a/b/c:pull,push"), Some(("a/b/c", vec!["pull", "push"])));
        assert_eq!(parse_scope("registry:catalog:*"), None);
        assert_eq!(parse_basic("Basic YWxpY2U6cHc="), Some(("alice".into(), "pw".into())));
        assert_eq!(parse_basic("Bearer x"), None);
        assert_eq!(time_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(time_rfc3339(1_772_000_000), "2026-02-25T06:13:20Z");
    }
}
