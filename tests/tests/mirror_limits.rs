//! The mirror bounds what clients can make it hold: a request head must arrive within the header
//! timeout and fit the header cap, and connections are capped overall and per client address,
//! while the connections a busy node really makes still get through. Real agent processes, raw
//! TCP clients.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_tests::{metric_value, random_bytes, Agent, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connections in each flood (issue 32, finding 6, measured with these numbers).
const FLOOD: usize = 300;

/// The agent's resident memory, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

fn mirror_addr(agent: &Agent) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], agent.port))
}

/// Opens a connection from `source` (any 127.0.0.0/8 address is this host's loopback).
async fn connect_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(to).await
}

/// Sends a request head that never ends (`fill` bytes of headers, no blank line), then waits
/// for the agent to close the connection. Returns how long after connecting it was closed, or
/// `None` if it was still open after `wait`.
async fn unfinished_head(to: SocketAddr, fill: usize, wait: Duration) -> Option<Duration> {
    let mut s = TcpStream::connect(to).await.expect("connecting to the mirror");
    let start = Instant::now();
    let line = format!("X-Fill: {}\r\n", "a".repeat(1000));
    let mut head = String::from("GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    while head.len() < fill {
        head.push_str(&line);
    }
    // A write error means the agent has closed the connection already.
    if s.write_all(head.as_bytes()).await.is_err() {
        return Some(start.elapsed());
    }
    let mut sink = vec![0u8; 4096];
    let closed = tokio::time::timeout(wait, async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 431 answer, then the close
            }
        }
    })
    .await;
    closed.ok().map(|_| start.elapsed())
}

/// Sends one byte of a request head every `every` until the agent closes the connection; how
/// long that took.
async fn dribbled_head(to: SocketAddr, every: Duration, wait: Duration) -> Option<Duration> {
    let mut s = TcpStream::connect(to).await.expect("connecting to the mirror");
    let start = Instant::now();
    let head = b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a'));
    for byte in head {
        if start.elapsed() > wait || s.write_all(&[*byte]).await.is_err() {
            break;
        }
        let mut probe = [0u8; 1];
        match tokio::time::timeout(every, s.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            _ => {}
        }
    }
    None
}

/// GETs `url` on a fresh connection; the status and the body.
async fn get(url: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let resp = http.get(url).send().await?;
    Ok((resp.status().as_u16(), resp.bytes().await?.to_vec()))
}

/// Samples the agent's RSS every 20 ms until told to stop; the highest value seen.
fn sample_peak_rss(pid: u32) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<u64>) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut peak = rss_kib(pid);
        while stopped.try_recv().is_err() {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak.max(rss_kib(pid))
    });
    (stop, task)
}

/// What `FLOOD` connections may add to the agent's RSS while they each hold a request head of up
/// to `cap` bytes: hyper grows a connection's read buffer by doubling, so one holds at most twice
/// the cap, plus 16 MiB for everything else (tasks, hyper's state, tokio's registrations, and
/// allocator slack). Before the caps, 300 connections of 400 KiB added about 100 MiB.
fn rss_bound_kib(cap: u64) -> u64 {
    FLOOD as u64 * 2 * cap / 1024 + 16 * 1024
}

/// Normal pulls while something else happens: a blob through the mirror and the mirror's root,
/// every 100 ms until stopped. Returns the failures.
fn keep_pulling(
    blob_url: String,
    blob: Vec<u8>,
    root: String,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<(usize, Vec<String>)>) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (mut done, mut failures) = (0, Vec::new());
        while stopped.try_recv().is_err() {
            match (get(&blob_url).await, get(&root).await) {
                (Ok((200, body)), Ok((200, _))) if body == blob => done += 1,
                (b, r) => failures.push(format!("blob: {:?}, root: {:?}", b.map(|(s, b)| (s, b.len())), r.map(|(s, _)| s))),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (done, failures)
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_unfinished_headers_are_cut_off_and_memory_stays_bounded() -> anyhow::Result<()> {
    // The shipped defaults: 32 KiB header cap, 10 s header timeout.
    let registry = Registry::start(None).await?;
    let blob = random_bytes(1 << 20, 61);
    let digest = registry.push_blob("test/limits", &blob).await?;
    let agent = Agent::start("").await?;
    let pid = agent.pid().expect("agent runs");
    let blob_url = agent.blob_url(&registry, "test/limits", &digest);
    let root = format!("{}/v2/", agent.mirror());
    assert_eq!(get(&blob_url).await?, (200, blob.clone()), "warm-up pull");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rss_kib(pid);

    let (stop_sampling, peak) = sample_peak_rss(pid);
    let (stop_pulling, pulls) = keep_pulling(blob_url.clone(), blob.clone(), root.clone());
    // One half-sent request alongside: the default header timeout closes it.
    let half_sent = tokio::spawn(unfinished_head(mirror_addr(&agent), 0, Duration::from_secs(20)));
    let flood: Vec<_> =
        (0..FLOOD).map(|_| tokio::spawn(unfinished_head(mirror_addr(&agent), 400 << 10, Duration::from_secs(15)))).collect();
    let mut closed = Vec::new();
    for c in flood {
        closed.push(c.await?);
    }
    let half_sent = half_sent.await?;
    let _ = stop_pulling.send(());
    let (pulled, failures) = pulls.await?;
    let _ = stop_sampling.send(());
    let peak = peak.await?;

    let open: Vec<_> = closed.iter().filter(|c| c.is_none()).collect();
    assert!(open.is_empty(), "{} of {FLOOD} connections still open after 15 s", open.len());
    let slowest = closed.iter().flatten().max().copied().unwrap_or_default();
    assert!(slowest < Duration::from_secs(10), "a 400 KiB head is cut off at the 32 KiB cap, not at the timeout: {slowest:?}");
    let half_sent = half_sent.expect("the half-sent request was closed");
    assert!(half_sent >= Duration::from_secs(9) && half_sent < Duration::from_secs(13), "half-sent request closed after {half_sent:?}");
    assert!(failures.is_empty() && pulled > 0, "pulls during the flood: {pulled} ok, failures {failures:?}");
    let grew = peak.saturating_sub(baseline);
    eprintln!(
        "RSS baseline {baseline} KiB, peak {peak} KiB (+{grew} KiB, bound {} KiB); slowest close {slowest:?}; half-sent closed after {half_sent:?}; {pulled} pulls during",
        rss_bound_kib(32 << 10)
    );
    assert!(grew < rss_bound_kib(32 << 10), "RSS grew {grew} KiB");
    assert_eq!(get(&blob_url).await?, (200, blob), "a pull after the flood");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_headers_under_the_cap_are_closed_at_the_header_timeout() -> anyhow::Result<()> {
    let registry = Registry::start(None).await?;
    let blob = random_bytes(1 << 20, 62);
    let digest = registry.push_blob("test/limits", &blob).await?;
    let agent = Agent::start("[mirror]\nheader_read_timeout_seconds = 3\n").await?;
    let pid = agent.pid().expect("agent runs");
    let blob_url = agent.blob_url(&registry, "test/limits", &digest);
    assert_eq!(get(&blob_url).await?, (200, blob.clone()), "warm-up pull");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rss_kib(pid);

    let (stop_sampling, peak) = sample_peak_rss(pid);
    let (stop_pulling, pulls) = keep_pulling(blob_url.clone(), blob.clone(), format!("{}/v2/", agent.mirror()));
    let wait = Duration::from_secs(10);
    let dribbled = tokio::spawn(dribbled_head(mirror_addr(&agent), Duration::from_millis(100), wait));
    let half_sent = tokio::spawn(unfinished_head(mirror_addr(&agent), 0, wait));
    // 24 KiB each: under the 32 KiB cap, so only the timeout ends them.
    let flood: Vec<_> = (0..FLOOD).map(|_| tokio::spawn(unfinished_head(mirror_addr(&agent), 24 << 10, wait))).collect();
    let mut closed = Vec::new();
    for c in flood {
        closed.push(c.await?);
    }
    let (dribbled, half_sent) = (dribbled.await?, half_sent.await?);
    let _ = stop_pulling.send(());
    let (pulled, failures) = pulls.await?;
    let _ = stop_sampling.send(());
    let peak = peak.await?;

    // Times are taken when the client sees its connect complete, which on a busy runtime can be
    // a little after the agent accepted and started the clock: hence 2.5 s, not 3.
    let times: Vec<Duration> = closed.iter().flatten().copied().collect();
    assert_eq!(times.len(), FLOOD, "every connection closed within {wait:?}");
    let (first, last) = (times.iter().min().copied().unwrap_or_default(), times.iter().max().copied().unwrap_or_default());
    assert!(first >= Duration::from_millis(2500) && last < Duration::from_secs(6), "closed between {first:?} and {last:?}, timeout 3 s");
    let half_sent = half_sent.expect("half-sent request closed");
    assert!(half_sent >= Duration::from_millis(2500) && half_sent < Duration::from_secs(6), "half-sent request closed after {half_sent:?}");
    // Bytes trickling in do not extend the deadline.
    let dribbled = dribbled.expect("dribbled request closed");
    assert!(dribbled >= Duration::from_millis(2500) && dribbled < Duration::from_secs(6), "dribbled request closed after {dribbled:?}");
    assert!(failures.is_empty() && pulled > 0, "pulls while 300 connections were held: {pulled} ok, failures {failures:?}");
    let grew = peak.saturating_sub(baseline);
    eprintln!(
        "RSS baseline {baseline} KiB, peak {peak} KiB (+{grew} KiB, bound {} KiB); closed between {first:?} and {last:?}; {pulled} pulls during",
        rss_bound_kib(32 << 10)
    );
    assert!(grew < rss_bound_kib(32 << 10), "RSS grew {grew} KiB");
    Ok(())
}

/// Polls the agent's metrics until `name` has `value`.
async fn wait_metric(agent: &Agent, name: &str, value: f64) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let text = agent.metrics().await?;
        let got = text.lines().find(|l| l.split(' ').next() == Some(name)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        if got == Some(value) {
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(5), "{name} is {got:?}, not {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the agent answers a new connection that sends nothing: `Some(text)` if it answers and
/// closes at once (a refusal), `None` if it keeps the connection open.
async fn answer_to_silence(s: &mut TcpStream) -> Option<String> {
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_millis(500), s.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn connections_over_the_total_or_per_client_cap_are_refused_and_counted() -> anyhow::Result<()> {
    let agent = Agent::start("[mirror]\nmax_connections = 40\nmax_connections_per_client = 30\nheader_read_timeout_seconds = 60\n").await?;
    let to = mirror_addr(&agent);
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(connect_from([127, 0, 0, 2], to).await?);
    }
    wait_metric(&agent, "shoal_mirror_connections_open", 30.0).await?;
    let mut over = connect_from([127, 0, 0, 2], to).await?;
    let refused = answer_to_silence(&mut over).await.expect("the 31st connection from one client is closed");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused:?}");

    let mut others = Vec::new();
    for _ in 0..10 {
        others.push(connect_from([127, 0, 0, 3], to).await?);
    }
    wait_metric(&agent, "shoal_mirror_connections_open", 40.0).await?;
    let mut over = connect_from([127, 0, 0, 4], to).await?;
    let refused = answer_to_silence(&mut over).await.expect("the 41st connection is closed");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused:?}");
    // Admitted connections stay open.
    assert_eq!(answer_to_silence(&mut others[0]).await, None);

    let text = agent.metrics().await?;
    assert!(text.contains("shoal_mirror_connections_refused_total{reason=\"per_client\"} 1"), "{text}");
    assert!(text.contains("shoal_mirror_connections_refused_total{reason=\"total\"} 1"), "{text}");

    // Closed connections give their places back.
    drop(held);
    wait_metric(&agent, "shoal_mirror_connections_open", 10.0).await?;
    let mut s = connect_from([127, 0, 0, 4], to).await?;
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(metric_value(&agent.metrics().await?, "shoal_mirror_connections_open"), Some(10.0));
    Ok(())
}

/// 64 image pulls at once, each with containerd's 3 concurrent layer downloads and a manifest
/// request, hold 256 connections from 127.0.0.1: the defaults must admit them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_defaults_admit_64_concurrent_pulls_from_loopback() -> anyhow::Result<()> {
    const CONNECTIONS: usize = 64 * 4;
    let registry = Registry::start(None).await?;
    let blob = random_bytes(256 << 10, 63);
    let digest = registry.push_blob("test/limits", &blob).await?;
    let agent = Agent::start("").await?;
    let to = mirror_addr(&agent);
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(TcpStream::connect(to).await?);
    }
    wait_metric(&agent, "shoal_mirror_connections_open", CONNECTIONS as f64).await?;
    let path = agent.blob_url(&registry, "test/limits", &digest).trim_start_matches(&agent.mirror()).to_string();
    let pulls: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
            tokio::spawn(async move {
                s.write_all(request.as_bytes()).await?;
                let mut answer = Vec::new();
                s.read_to_end(&mut answer).await?;
                anyhow::Ok(answer)
            })
        })
        .collect();
    for p in pulls {
        let answer = p.await??;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&answer[..answer.len().min(200)]));
        assert!(answer.ends_with(&blob), "the whole blob");
    }
    let text = agent.metrics().await?;
    assert!(text.contains("shoal_mirror_connections_refused_total{reason=\"per_client\"} 0"), "{text}");
    assert!(text.contains("shoal_mirror_connections_refused_total{reason=\"total\"} 0"), "{text}");
    Ok(())
}
