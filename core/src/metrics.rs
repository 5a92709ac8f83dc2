//! The process-wide Prometheus registry. Metric names follow `shoal_<noun>_<unit>`.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// A Prometheus registry that crates add their metrics to at start-up.
#[derive(Default)]
pub struct Metrics {
    registry: Mutex<Registry>,
}

impl Metrics {
    /// A registry with the `shoal` prefix.
    pub fn new() -> Metrics {
        Metrics { registry: Mutex::new(Registry::with_prefix("shoal")) }
    }

    /// Registers one metric.
    pub fn register(&self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        self.registry.lock().unwrap_or_else(|p| p.into_inner()).register(name, help, metric);
    }

    /// Registers a collector: metrics computed at each scrape.
    pub fn register_collector(&self, collector: Box<dyn prometheus_client::collector::Collector>) {
        self.registry.lock().unwrap_or_else(|p| p.into_inner()).register_collector(collector);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}
