//! Writing results: one JSON file and one Markdown table per scenario.

use std::path::Path;

use anyhow::Context;

/// Median of a non-empty sample.
pub fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// What machine produced the figures.
pub fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    serde_json::json!({ "cpus": cpus, "kernel": kernel, "cpu": model })
}

/// Writes `<name>.json` and `<name>.md` under `out`.
pub fn write(out: &Path, name: &str, json: &serde_json::Value, markdown: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join(format!("{name}.json")), serde_json::to_vec_pretty(json)?)?;
    std::fs::write(out.join(format!("{name}.md")), markdown)?;
    println!("{markdown}");
    println!("results written to {}/{name}.{{json,md}}", out.display());
    Ok(())
}
