//! The store's quota against an origin that lies about a blob: it answers `HEAD` with a length
//! close to the whole quota, then refuses, stalls or cuts short the `GET`. A failed download gives
//! its reservation back at once and across a restart, so later pulls are still stored; a claimed
//! length evicts no cached blob before its bytes arrive. And the store is readable by the agent's
//! user only.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use shoal_tests::{digest_of, metric_value, random_bytes, task_dir, wait_for, Agent, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A 64 MiB store, and an origin that goes silent fails quickly.
const CONFIG: &str = "[store]\nquota = \"64MiB\"\n[download]\nread_timeout_seconds = 2\nretries = 1\n";
/// What the lying origin claims: all but 2 MiB of the quota.
const CLAIMED: u64 = 62 << 20;
/// The size of the honest blobs: one fits beside the claim's reservation only if it is released.
const BLOB: usize = 24 << 20;
/// Longest any one pull may take before the test calls it hung.
const HANG: Duration = Duration::from_secs(120);

/// How the origin answers the `GET` of the blob whose length it claimed.
#[derive(Clone, Copy, Debug)]
enum Lie {
    /// 403, no bytes.
    Refuse,
    /// 200 with the claimed Content-Length, then silence.
    Stall,
    /// 200 with the claimed Content-Length, 3 MiB, then the connection closes.
    Short,
}

/// A registry that answers `HEAD /v2/<repo>/blobs/<digest>` with 200 and [`CLAIMED`] bytes for any
/// digest, and lies on `GET`.
struct LyingOrigin {
    port: u16,
    server: tokio::task::JoinHandle<()>,
}

impl LyingOrigin {
    async fn start(lie: Lie) -> LyingOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(answer(conn, lie));
            }
        });
        LyingOrigin { port, server }
    }

    /// The mirror URL of blob `digest` of this origin.
    fn blob_url(&self, agent: &Agent, digest: &str) -> String {
        format!("{}/v2/evil/app/blobs/{digest}?ns=127.0.0.1%3A{}", agent.mirror(), self.port)
    }
}

impl Drop for LyingOrigin {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Answers the requests of one connection.
async fn answer(mut conn: TcpStream, lie: Lie) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = read_head(&mut conn, &mut buf).await else { return };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut words = head.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let is_blob = path.starts_with("/v2/") && path.contains("/blobs/sha256:");
        let claim = format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {CLAIMED}\r\n\r\n");
        let reply = match (method, is_blob, lie) {
            ("HEAD", true, _) => claim,
            ("GET", true, Lie::Refuse) => "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".to_string(),
            ("GET", true, Lie::Stall) => {
                let _ = conn.write_all(claim.as_bytes()).await;
                // Silent until the agent gives up and closes the connection.
                let _ = conn.read_to_end(&mut Vec::new()).await;
                return;
            }
            ("GET", true, Lie::Short) => {
                let _ = conn.write_all(claim.as_bytes()).await;
                let _ = conn.write_all(&random_bytes(3 << 20, 99)).await;
                return;
            }
            _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
        };
        if conn.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads until `buf` holds a whole request head; returns its length. `None` at the end.
async fn read_head(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The blob the lying origin claims (its bytes are never sent).
fn claimed_digest() -> String {
    digest_of(b"a blob the origin never sends")
}

/// Pulls `url` whole; true when the body arrived complete.
async fn pull(url: &str) -> bool {
    let get = async {
        match reqwest::get(url).await {
            Ok(resp) if resp.status().is_success() => resp.bytes().await.is_ok(),
            _ => false,
        }
    };
    tokio::time::timeout(HANG, get).await.unwrap_or_else(|_| panic!("pulling {url} hung"))
}

/// Pulls a blob the lying origin claims, which must fail, and waits until the agent is done with
/// the download (the reader also tried the origin directly).
async fn pull_the_lie(agent: &Agent, origin: &LyingOrigin) {
    assert!(!pull(&origin.blob_url(agent, &claimed_digest())).await, "a blob whose bytes never came must not be served whole");
    let start = std::time::Instant::now();
    loop {
        let status = agent.status().await.unwrap();
        if status["active"].as_array().is_some_and(Vec::is_empty) {
            return;
        }
        assert!(start.elapsed() < HANG, "the failed download is still active: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn direct_reads(agent: &Agent) -> f64 {
    let text = agent.metrics().await.unwrap();
    metric_value(&text, "shoal_direct_reads_total").unwrap_or_else(|| panic!("no shoal_direct_reads_total in:\n{text}"))
}

/// Pulls `digest` from `registry` through the agent and checks it went through the store: stored
/// complete, and nothing read straight from the origin (a full store streams blobs uncached).
async fn pull_is_stored(agent: &Agent, registry: &Registry, digest: &str) {
    let before = direct_reads(agent).await;
    let body = tokio::time::timeout(HANG, async {
        reqwest::get(agent.blob_url(registry, "team/app", digest)).await.unwrap().bytes().await.unwrap()
    })
    .await
    .expect("the honest pull hung");
    assert_eq!(digest_of(&body), digest);
    assert_eq!(direct_reads(agent).await, before, "the blob was streamed past the store (is the store full?)");
    agent.wait_stored(digest).await.unwrap();
}

/// A registry holding `n` honest blobs of [`BLOB`] bytes in `team/app`.
async fn registry_with_blobs(n: u64) -> (Registry, Vec<String>) {
    let registry = Registry::start(None).await.unwrap();
    let mut digests = Vec::new();
    for i in 0..n {
        digests.push(registry.push_blob("team/app", &random_bytes(BLOB, 700 + i)).await.unwrap());
    }
    (registry, digests)
}

fn task_path(agent: &Agent, digest: &str) -> std::path::PathBuf {
    agent.data_dir().join("tasks").join(task_dir(digest))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_refusing_the_blob_it_claimed_leaves_the_quota_free_across_a_restart() {
    let (registry, digests) = registry_with_blobs(2).await;
    let origin = LyingOrigin::start(Lie::Refuse).await;
    let mut agent = Agent::start(CONFIG).await.unwrap();

    pull_the_lie(&agent, &origin).await;
    pull_is_stored(&agent, &registry, &digests[0]).await;
    let lie = task_path(&agent, &claimed_digest());
    wait_for("the download without a byte to be deleted", Duration::from_secs(10), || !lie.exists()).await.unwrap();

    agent.restart().await.unwrap();
    pull_the_lie(&agent, &origin).await;
    pull_is_stored(&agent, &registry, &digests[1]).await;
    let stored = agent.stored_tasks();
    assert!(stored.contains(&task_dir(&digests[0])), "the first blob must still be stored: {stored:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_short_bodies_give_back_their_reservation() {
    let (registry, digests) = registry_with_blobs(2).await;
    let agent = Agent::start(CONFIG).await.unwrap();
    for (lie, digest) in [Lie::Stall, Lie::Short].into_iter().zip(&digests) {
        let origin = LyingOrigin::start(lie).await;
        pull_the_lie(&agent, &origin).await;
        pull_is_stored(&agent, &registry, digest).await;
    }
    // What the short body wrote stays for a resume, counted for its bytes only.
    let used = agent.status().await.unwrap()["store"]["used_bytes"].as_u64().unwrap();
    assert!(used < 2 * BLOB as u64 + (4 << 20), "the store counts {used} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_killed_before_its_first_byte_holds_nothing_after_a_restart() {
    let (registry, digests) = registry_with_blobs(1).await;
    let origin = LyingOrigin::start(Lie::Stall).await;
    let mut agent = Agent::start(CONFIG).await.unwrap();
    let url = origin.blob_url(&agent, &claimed_digest());
    let stalled = tokio::spawn(async move { pull(&url).await });
    let lie = task_path(&agent, &claimed_digest());
    wait_for("the stalled download to start", Duration::from_secs(30), || lie.exists()).await.unwrap();

    agent.restart().await.unwrap();
    stalled.abort();
    pull_is_stored(&agent, &registry, &digests[0]).await;
    assert!(!lie.exists(), "a download that never got a piece must not survive a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_length_evicts_no_cached_blob_before_its_bytes_arrive() {
    let (registry, digests) = registry_with_blobs(2).await;
    let origin = LyingOrigin::start(Lie::Stall).await;
    let agent = Agent::start(CONFIG).await.unwrap();
    for d in &digests {
        pull_is_stored(&agent, &registry, d).await;
    }
    let cached: Vec<String> = digests.iter().map(|d| task_dir(d)).collect();

    let url = origin.blob_url(&agent, &claimed_digest());
    let stalled = tokio::spawn(async move { pull(&url).await });
    let lie = task_path(&agent, &claimed_digest());
    wait_for("the stalled download to start", Duration::from_secs(30), || lie.exists()).await.unwrap();
    let stored = agent.stored_tasks();
    assert!(cached.iter().all(|t| stored.contains(t)), "the claim alone evicted cached blobs: {stored:?}");

    assert!(!stalled.await.unwrap(), "the stalled blob must not be served whole");
    let stored = agent.stored_tasks();
    assert!(cached.iter().all(|t| stored.contains(t)), "cached blobs were evicted for bytes that never came: {stored:?}");
    assert_eq!(agent.status().await.unwrap()["store"]["evictions"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_readable_by_the_agents_user_only_under_umask_022() {
    let (registry, digests) = registry_with_blobs(1).await;
    // SAFETY: sets the file creation mask the agent inherits (the common default, made sure).
    unsafe { libc::umask(0o022) };
    let agent = Agent::start(CONFIG).await.unwrap();
    pull_is_stored(&agent, &registry, &digests[0]).await;

    let data = agent.data_dir();
    let mut wrong = Vec::new();
    check_mode(&data, 0o700, &mut wrong);
    check_mode(&data.join("lock"), 0o600, &mut wrong);
    let mut todo = vec![data.join("tasks")];
    while let Some(dir) = todo.pop() {
        check_mode(&dir, 0o700, &mut wrong);
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                check_mode(&e.path(), 0o600, &mut wrong);
            }
        }
    }
    assert!(task_path(&agent, &digests[0]).join("data").exists());
    assert!(wrong.is_empty(), "readable beyond the agent's user: {wrong:?}");
}

fn check_mode(path: &Path, want: u32, wrong: &mut Vec<String>) {
    let mode = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777;
    if mode != want {
        wrong.push(format!("{} is {mode:o}, want {want:o}", path.display()));
    }
}
