//! The admin endpoint: `/metrics` (Prometheus text), `/healthz`, `/status` (JSON for `shoal status`).

use std::sync::Arc;

use http::header::CONTENT_TYPE;
use http::{Response, StatusCode};
use serde::Serialize;
use shoal_core::metrics::Metrics;
use shoal_core::store::Usage;

use crate::engine::Engine;
use crate::serve::{full, Body};

/// What `/status` reports.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct Status {
    /// Shoal version.
    pub version: String,
    /// Address of the registry mirror.
    pub mirror: String,
    /// Content store usage.
    pub store: StoreStatus,
    /// Downloads in progress.
    pub active: Vec<ActiveTask>,
}

/// Store figures in `/status`.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct StoreStatus {
    pub used_bytes: u64,
    pub quota_bytes: u64,
    pub tasks: usize,
    pub complete_tasks: usize,
    pub evictions: u64,
}

/// One download in `/status`.
#[derive(Serialize, serde::Deserialize, Debug)]
pub struct ActiveTask {
    pub task: String,
    pub pieces_done: u32,
    pub pieces: u32,
}

/// The admin handler's state.
pub struct Admin {
    pub engine: Arc<Engine>,
    pub metrics: Arc<Metrics>,
    pub mirror: String,
}

impl Admin {
    /// Answers one admin request.
    pub async fn handle(self: Arc<Self>, req: http::Request<hyper::body::Incoming>) -> Response<Body> {
        let (status, kind, body) = match req.uri().path() {
            "/metrics" => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", self.metrics.encode()),
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            "/status" => (StatusCode::OK, "application/json", serde_json::to_string_pretty(&self.status()).unwrap_or_default()),
            _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /healthz or /status\n".to_string()),
        };
        Response::builder().status(status).header(CONTENT_TYPE, kind).body(full(body)).unwrap_or_else(|_| Response::new(full("")))
    }

    fn status(&self) -> Status {
        let Usage { used_bytes, quota_bytes, tasks, complete_tasks, evictions } = self.engine.store().usage();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            mirror: self.mirror.clone(),
            store: StoreStatus { used_bytes, quota_bytes, tasks, complete_tasks, evictions },
            active: self
                .engine
                .active()
                .into_iter()
                .map(|(id, done, all)| ActiveTask { task: id.to_string(), pieces_done: done, pieces: all })
                .collect(),
        }
    }
}
