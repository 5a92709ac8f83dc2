//! The HTTP/1 accept loop shared by the mirror and the admin endpoint: bounded connections, and
//! graceful shutdown (on cancellation it stops accepting and lets in-flight requests finish for a
//! grace period).
//!
//! Every connection is bounded: its request head must arrive within a deadline and fit a size cap
//! (hyper's timer, `header_read_timeout`, `max_header_size`), and the number of connections open
//! at once is capped overall and per client address. Without these, 300 connections holding
//! 400 KiB of unfinished headers each took an agent from 50 to 152 MiB, and a half-sent request
//! stayed open indefinitely (issue 32, finding 6; `tests/tests/mirror_limits.rs`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use shoal_core::metrics::Metrics;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Response bodies: whole buffers or streams that may fail mid-way (which aborts the connection,
/// so a client never takes a truncated body for a complete one).
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// How long in-flight requests may run after shutdown starts.
const GRACE: Duration = Duration::from_secs(10);

/// The smallest header cap hyper accepts (its minimum read buffer).
pub const MIN_HEADER_SIZE: usize = 8 << 10;

/// How often refused connections are logged at `warn` (each one is logged at `debug`).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What one server allows its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// A request head (request line and headers) must arrive whole within this time, counted from
    /// when the server starts waiting for it; that includes keep-alive connections waiting for
    /// their next request, so an idle connection is closed after this long too.
    pub header_read_timeout: Duration,
    /// Largest request head in bytes (at least [`MIN_HEADER_SIZE`]); a larger one is answered
    /// 431 and the connection closed.
    pub max_header_size: usize,
    /// Most connections open at once; more are closed at once with a 503.
    pub max_connections: usize,
    /// Most connections open at once from one client IP address.
    pub max_connections_per_client: usize,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The server holds `max_connections` already.
    Total,
    /// This client holds `max_connections_per_client` already.
    PerClient,
}

impl Refusal {
    /// The `reason` label of the refused-connections counter.
    fn label(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::PerClient => "per_client",
        }
    }
}

/// Open connections, overall and per client address, and whether one more may open. Plain data:
/// the accept loop asks it for each new connection and tells it when one closes.
#[derive(Debug)]
pub struct Admission {
    /// Caps.
    limits: ConnectionLimits,
    /// Connections open now.
    open: usize,
    /// Connections open now per client address (no entry for clients with none).
    per_client: HashMap<IpAddr, usize>,
}

impl Admission {
    /// No connections yet.
    pub fn new(limits: ConnectionLimits) -> Admission {
        Admission { limits, open: 0, per_client: HashMap::new() }
    }

    /// Counts a new connection from `client`, or says why it may not open.
    pub fn admit(&mut self, client: IpAddr) -> Result<(), Refusal> {
        let client = client.to_canonical();
        let mine = self.per_client.get(&client).copied().unwrap_or(0);
        if mine >= self.limits.max_connections_per_client {
            return Err(Refusal::PerClient);
        }
        if self.open >= self.limits.max_connections {
            return Err(Refusal::Total);
        }
        self.open += 1;
        self.per_client.insert(client, mine + 1);
        Ok(())
    }

    /// Forgets a connection from `client` that [`Admission::admit`] counted.
    pub fn release(&mut self, client: IpAddr) {
        let client = client.to_canonical();
        if let Some(n) = self.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&client);
            }
            self.open -= 1;
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open
    }
}

/// Labels of the refused-connections counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
}

/// A server's connection metrics: `shoal_<server>_connections_open` and
/// `shoal_<server>_connections_refused_total{reason="total"|"per_client"}`.
#[derive(Clone)]
struct ConnectionMetrics {
    open: Gauge,
    refused: Family<RefusedLabels, Counter>,
}

impl ConnectionMetrics {
    fn register(metrics: &Metrics, server: &str) -> ConnectionMetrics {
        let m = ConnectionMetrics { open: Gauge::default(), refused: Family::default() };
        metrics.register(&format!("{server}_connections_open"), &format!("Connections open on the {server}"), m.open.clone());
        metrics.register(
            &format!("{server}_connections_refused"),
            &format!("Connections the {server} closed at once, over its total or per-client cap"),
            m.refused.clone(),
        );
        // Both series exist from the start, so a scrape shows 0 rather than nothing.
        for reason in [Refusal::Total, Refusal::PerClient] {
            let _ = m.refused.get_or_create(&RefusedLabels { reason: reason.label() });
        }
        m
    }
}

/// A connection's place in the [`Admission`] count, given back when dropped.
struct Slot {
    admission: Arc<Mutex<Admission>>,
    client: IpAddr,
    open: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut a = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        a.release(self.client);
        self.open.set(a.open() as i64);
    }
}

/// What a refused client reads before the connection closes.
const REFUSED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n\
Content-Type: text/plain\r\nContent-Length: 21\r\n\r\ntoo many connections\n";

/// Serves `handler` on `listener` within `limits` until `shutdown` is cancelled. `name` names the
/// server in logs and metrics (`mirror`, `admin`).
pub async fn serve<H, F>(
    listener: TcpListener,
    name: &'static str,
    handler: Arc<H>,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) where
    H: Fn(http::Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = http::Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    let max_header_size = limits.max_header_size.max(MIN_HEADER_SIZE);
    // The header cap also caps the read buffer: requests to these servers have no bodies worth
    // buffering, so nothing a client sends can make a connection hold more than this.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(max_header_size)
        .max_buf_size(max_header_size);
    let admission = Arc::new(Mutex::new(Admission::new(limits)));
    let conn_metrics = ConnectionMetrics::register(&metrics, name);
    let mut refusals = RefusalLog::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    warn!(server = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admitted = {
            let mut a = admission.lock().unwrap_or_else(|p| p.into_inner());
            let admitted = a.admit(peer.ip());
            conn_metrics.open.set(a.open() as i64);
            admitted
        };
        if let Err(reason) = admitted {
            conn_metrics.refused.get_or_create(&RefusedLabels { reason: reason.label() }).inc();
            refusals.record(name, peer.ip(), reason, &limits);
            refuse(stream);
            continue;
        }
        let slot = Slot { admission: admission.clone(), client: peer.ip(), open: conn_metrics.open.clone() };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let fut = handler(req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                debug!(server = name, %peer, error = %e, "connection ended with an error");
            }
        });
    }
    info!(server = name, "shutting down; waiting for in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(GRACE) => warn!(server = name, "in-flight requests still running after {GRACE:?}; closing"),
    }
}

/// Tells a refused client why, if its socket takes the bytes right away, and closes it. Never
/// waits: a flood of refused connections must not slow the accept loop.
fn refuse(stream: TcpStream) {
    let _ = stream.try_write(REFUSED_RESPONSE);
}

/// Refusals since the last `warn`, so a flood logs one line per interval, not one per connection.
#[derive(Default)]
struct RefusalLog {
    since_warn: u64,
    last_warn: Option<Instant>,
}

impl RefusalLog {
    fn record(&mut self, server: &'static str, client: IpAddr, reason: Refusal, limits: &ConnectionLimits) {
        debug!(server, %client, reason = reason.label(), "connection refused");
        self.since_warn += 1;
        if self.last_warn.is_some_and(|t| t.elapsed() < REFUSAL_LOG_INTERVAL) {
            return;
        }
        warn!(
            server,
            %client,
            reason = reason.label(),
            refused = self.since_warn,
            max_connections = limits.max_connections,
            max_connections_per_client = limits.max_connections_per_client,
            "refusing connections over the cap ([mirror] max_connections and max_connections_per_client set the mirror's)"
        );
        self.since_warn = 0;
        self.last_warn = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(total: usize, per_client: usize) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_millis(400),
            max_header_size: 16 << 10,
            max_connections: total,
            max_connections_per_client: per_client,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_over_its_cap_is_refused_while_others_still_get_in() {
        let mut a = Admission::new(limits(10, 2));
        assert_eq!(a.admit(ip("10.0.0.1")), Ok(()));
        assert_eq!(a.admit(ip("10.0.0.1")), Ok(()));
        assert_eq!(a.admit(ip("10.0.0.1")), Err(Refusal::PerClient));
        assert_eq!(a.admit(ip("10.0.0.2")), Ok(()));
        assert_eq!(a.open(), 3);
        a.release(ip("10.0.0.1"));
        assert_eq!(a.admit(ip("10.0.0.1")), Ok(()), "a closed connection frees its client's place");
    }

    #[test]
    fn the_total_cap_holds_across_clients_and_frees_on_release() {
        let mut a = Admission::new(limits(3, 2));
        for client in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            assert_eq!(a.admit(ip(client)), Ok(()));
        }
        assert_eq!(a.admit(ip("10.0.0.4")), Err(Refusal::Total));
        a.release(ip("10.0.0.2"));
        assert_eq!(a.admit(ip("10.0.0.4")), Ok(()));
        assert_eq!(a.open(), 3);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_the_same_client() {
        let mut a = Admission::new(limits(10, 1));
        assert_eq!(a.admit(ip("127.0.0.1")), Ok(()));
        assert_eq!(a.admit(ip("::ffff:127.0.0.1")), Err(Refusal::PerClient));
        a.release(ip("::ffff:127.0.0.1"));
        assert_eq!(a.open(), 0);
        a.release(ip("127.0.0.1"));
        assert_eq!(a.open(), 0, "releasing an unknown client changes nothing");
    }

    /// A server answering 200 "ok" within `limits` on a loopback port.
    async fn server(limits: ConnectionLimits) -> (std::net::SocketAddr, Arc<Metrics>, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let handler = Arc::new(|_req| async { http::Response::new(full("ok")) });
        tokio::spawn(serve(listener, "test", handler, limits, metrics.clone(), shutdown.clone()));
        (addr, metrics, shutdown)
    }

    /// Reads until the server closes the connection; what it sent.
    async fn read_to_close(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn a_half_sent_request_is_closed_at_the_header_deadline() {
        let (addr, _, shutdown) = server(limits(10, 10)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let start = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_to_close(&mut s)).await.expect("closed");
        let waited = start.elapsed();
        assert!(answer.is_empty(), "no answer to half a request: {answer:?}");
        assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(2), "closed after {waited:?}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn an_oversized_request_head_gets_431() {
        let (addr, _, shutdown) = server(limits(10, 10)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Fill: {}\r\n\r\n", "a".repeat(20 << 10));
        let _ = s.write_all(head.as_bytes()).await;
        let answer = read_to_close(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn connections_over_the_cap_get_503_and_are_counted() {
        let (addr, metrics, shutdown) = server(limits(2, 2)).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            held.push(s);
        }
        let mut third = TcpStream::connect(addr).await.unwrap();
        let answer = read_to_close(&mut third).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
        let text = metrics.encode();
        assert!(text.contains("shoal_test_connections_refused_total{reason=\"per_client\"} 1"), "{text}");
        assert!(text.contains("shoal_test_connections_open 2"), "{text}");
        drop(held);
        // Closed connections give their places back.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        assert!(read_to_close(&mut s).await.starts_with("HTTP/1.1 200"));
        shutdown.cancel();
    }
}
