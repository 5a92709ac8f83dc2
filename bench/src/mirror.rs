//! The mirror scenario: one blob served by (a) nginx from a file, (b) the Shoal mirror from its
//! store (cache hit), (c) the registry directly, (d) the Shoal mirror with an empty store (cold
//! miss, through to the same registry); then 64 concurrent cache-hit pulls, sampling the agent's RSS.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use shoal_tests::lazy::drop_page_cache;
use shoal_tests::{random_bytes, require, Agent, Registry};

use crate::nginx::Nginx;
use crate::report::{machine, median, peak_rss, write};

#[derive(clap::Args)]
pub struct Args {
    /// Blob size in MiB.
    #[arg(long, default_value_t = 512)]
    size_mib: usize,
    /// Timed runs per system (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Concurrent pulls in the concurrency run.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Blob size for the concurrency run, in MiB.
    #[arg(long, default_value_t = 64)]
    concurrent_size_mib: usize,
}

/// Seconds curl took to download `url` to /dev/null, checking the size.
fn curl(url: &str, expect: usize) -> anyhow::Result<f64> {
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{time_total} %{size_download} %{http_code}", url])
        .output()
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let secs: f64 = parts.next().unwrap_or("").parse().context("curl time")?;
    let size: usize = parts.next().unwrap_or("").parse().context("curl size")?;
    let code = parts.next().unwrap_or("");
    if size != expect || code != "200" {
        bail!("{url}: got {size} bytes with status {code}, expected {expect} bytes: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(secs)
}

fn agent_pid(agent: &Agent) -> Option<u32> {
    // The agent's process is the one whose command line names its config.
    let config = agent.dir.path().join("shoal.toml");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(config.to_string_lossy().as_ref()) {
            return e.file_name().to_string_lossy().parse().ok();
        }
    }
    None
}

pub async fn run(args: Args, out: &Path) -> anyhow::Result<()> {
    require("curl");
    let size = args.size_mib << 20;
    let blob = random_bytes(size, 42);
    let registry = Registry::start(None).await?;
    let digest = registry.push_blob("bench/blob", &blob).await?;
    let nginx = Nginx::start("blob", &blob)?;
    drop(blob);
    let nginx_url = nginx.url.clone();
    let direct_url = format!("{}/v2/bench/blob/blobs/{digest}", registry.url());

    let mut nginx_s = vec![];
    let mut hit_s = vec![];
    let mut direct_s = vec![];
    let mut cold_s = vec![];
    let mut cold_egress = vec![];
    for run in 0..args.runs {
        eprintln!("run {}/{}", run + 1, args.runs);
        // Cold: a fresh agent with an empty store; page cache dropped, as on a node that never saw the image.
        let agent = Agent::start("").await?;
        let mirror_url = agent.blob_url(&registry, "bench/blob", &digest);
        drop_page_cache()?;
        let before = registry.blob_bytes(&digest);
        cold_s.push(curl(&mirror_url, size)?);
        cold_egress.push((registry.blob_bytes(&digest) - before) as f64 / size as f64);
        drop_page_cache()?;
        direct_s.push(curl(&direct_url, size)?);
        // Warm: both read from the page cache.
        curl(&nginx_url, size)?;
        curl(&mirror_url, size)?;
        nginx_s.push(curl(&nginx_url, size)?);
        hit_s.push(curl(&mirror_url, size)?);
    }
    drop(nginx);

    // Concurrency: N simultaneous cache-hit pulls of one blob; agent peak RSS.
    let csize = args.concurrent_size_mib << 20;
    let cblob = random_bytes(csize, 43);
    let cdigest = registry.push_blob("bench/conc", &cblob).await?;
    drop(cblob);
    let agent = Agent::start("").await?;
    let curl_url = agent.blob_url(&registry, "bench/conc", &cdigest);
    curl(&curl_url, csize)?;
    let start = Instant::now();
    let handles: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let url = curl_url.clone();
            std::thread::spawn(move || curl(&url, csize))
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("curl thread panicked"))??;
    }
    let conc_secs = start.elapsed().as_secs_f64();
    let rss_kib = agent_pid(&agent).map_or(0, peak_rss) / 1024;

    let mib = size as f64 / (1 << 20) as f64;
    let (n, h, d, c) = (median(&nginx_s), median(&hit_s), median(&direct_s), median(&cold_s));
    let egress = cold_egress.iter().cloned().fold(0.0, f64::max);
    let conc_mibps = (args.concurrency * csize) as f64 / (1 << 20) as f64 / conc_secs;
    let json = serde_json::json!({
        "scenario": "mirror",
        "machine": machine(),
        "blob_bytes": size,
        "runs": args.runs,
        "seconds": { "nginx": nginx_s, "shoal_hit": hit_s, "registry_direct": direct_s, "shoal_cold": cold_s },
        "median_mib_per_s": { "nginx": mib / n, "shoal_hit": mib / h, "registry_direct": mib / d, "shoal_cold": mib / c },
        "cache_hit_vs_nginx": n / h,
        "cold_miss_vs_direct": d / c,
        "cold_registry_egress_per_blob_max": egress,
        "concurrent": { "pulls": args.concurrency, "blob_bytes": csize, "seconds": conc_secs,
                        "aggregate_mib_per_s": conc_mibps, "agent_peak_rss_kib": rss_kib },
    });
    let md = format!(
        "### Mirror: one {mib:.0} MiB blob over loopback (median of {runs} runs, curl to /dev/null)\n\n\
         | what | Shoal | baseline | Shoal / baseline | target |\n|---|---|---|---|---|\n\
         | cache hit vs nginx (`sendfile`) from page cache | {:.0} MiB/s | {:.0} MiB/s | {:.2}× | ≥ 0.9× |\n\
         | cold miss vs straight from the registry | {:.0} MiB/s | {:.0} MiB/s | {:.2}× | — |\n\
         | registry bytes sent per cold pull | {egress:.3}× the blob | 1× (direct) | | ≤ 1.0× |\n\
         | {conc} concurrent cache-hit pulls of {cmib} MiB | {conc_mibps:.0} MiB/s total, agent peak RSS {rss:.0} MiB | | | RSS < 100 MiB |\n",
        mib / h, mib / n, n / h, mib / c, mib / d, d / c,
        runs = args.runs,
        conc = args.concurrency,
        cmib = args.concurrent_size_mib,
        rss = rss_kib as f64 / 1024.0,
    );
    let range = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        format!("{lo:.3}–{hi:.3} s")
    };
    let md = format!(
        "{md}\nEvery run (seconds, min–max): nginx {}, Shoal hit {}, registry direct {}, Shoal cold {}. \
         Machine: {} × {}, kernel {}.\n",
        range(&nginx_s),
        range(&hit_s),
        range(&direct_s),
        range(&cold_s),
        json["machine"]["cpus"],
        json["machine"]["cpu"].as_str().unwrap_or("?"),
        json["machine"]["kernel"].as_str().unwrap_or("?"),
    );
    write(out, "mirror", &json, &md)
}
