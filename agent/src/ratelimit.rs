//! A token bucket capping bytes per second: what this node takes from origins, and what it
//! uploads to peers.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shared by every download of a process.
pub struct RateLimiter {
    /// Bytes per second.
    rate: f64,
    /// Tokens available and when they were last topped up. Tokens may go negative: a caller takes
    /// what it needs and the next callers wait the debt off.
    bucket: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A limiter allowing `bytes_per_second`, with a burst of a tenth of a second.
    pub fn new(bytes_per_second: u64) -> RateLimiter {
        RateLimiter { rate: bytes_per_second as f64, bucket: Mutex::new((bytes_per_second as f64 / 10.0, Instant::now())) }
    }

    /// Waits until `bytes` may be taken.
    pub async fn acquire(&self, bytes: u64) {
        let wait = {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let burst = self.rate / 10.0;
            b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * self.rate).min(burst);
            b.1 = now;
            b.0 -= bytes as f64;
            if b.0 < 0.0 {
                Duration::from_secs_f64(-b.0 / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}
