//! A registry an attacker runs: it answers every blob and manifest `HEAD` with 200 (whatever the
//! digest), and every blob `GET` with bytes of its choosing, honouring `Range`. Tests point a
//! mirror request's `?ns=` at it to try to unlock or poison what the agent holds from real
//! registries.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A lying registry on loopback; stops when dropped.
pub struct HostileRegistry {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Requests it answered.
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HostileRegistry {
    /// Starts it: every blob is `len` bytes long, each byte `fill`.
    pub async fn start(len: u64, fill: u8) -> anyhow::Result<HostileRegistry> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_string();
                            buf.drain(..end + 4);
                            count.fetch_add(1, Ordering::Relaxed);
                            let answer = answer(&head, len, fill);
                            if stream.write_all(&answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Ok(HostileRegistry { port, requests, task })
    }

    /// `127.0.0.1:<port>`, as `?ns=` names it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// How many requests it answered.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for HostileRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer to one request head: 200 with `len` bytes of `fill` (or the asked range as 206).
fn answer(head: &str, len: u64, fill: u8) -> Vec<u8> {
    let mut lines = head.lines();
    let request = lines.next().unwrap_or_default();
    let head_only = request.starts_with("HEAD ");
    let range = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
        .and_then(|(_, v)| v.trim().strip_prefix("bytes=").map(String::from))
        .and_then(|r| {
            let (a, b) = r.split_once('-')?;
            let a: u64 = a.parse().ok()?;
            let b: u64 = if b.is_empty() { len - 1 } else { b.parse().ok()? };
            Some((a, b.min(len - 1)))
        });
    let (status, body_len, extra) = match range {
        Some((a, b)) if a <= b => ("206 Partial Content", b - a + 1, format!("Content-Range: bytes {a}-{b}/{len}\r\n")),
        _ => ("200 OK", len, String::new()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {body_len}\r\nContent-Type: application/octet-stream\r\nDocker-Distribution-API-Version: registry/2.0\r\n{extra}\r\n"
    )
    .into_bytes();
    if !head_only {
        out.extend(std::iter::repeat_n(fill, body_len as usize));
    }
    out
}
