//! The fan-out scenario: N nodes, each a network namespace with shaped links, pull one blob at
//! once. Shoal (scheduler + agents, P2P) against every node pulling straight from the registry,
//! in the same run; completion times against the Kumar–Ross lower bound
//! `T_min = max(S/u_s, S/d_min, N·S/(u_s + Σu_i))`, and the bytes the registry sent.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_tests::netns::Lab;
use shoal_tests::{lab_p2p_config, random_bytes, require, Agent, Registry, Scheduler};

use crate::report::{machine, write};

#[derive(clap::Args)]
pub struct Args {
    /// Nodes pulling the blob.
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// Blob size in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: usize,
    /// Every node's upload and download rate, Mbit/s.
    #[arg(long, default_value_t = 100)]
    rate_mbit: u32,
    /// The registry's upload rate, Mbit/s (default: the node rate).
    #[arg(long)]
    origin_mbit: Option<u32>,
}

/// Percentile of sorted samples (nearest rank).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Whole-machine CPU busy fraction between two `/proc/stat` readings.
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (v.iter().sum(), idle)
}

/// Runs `curl` in each node's namespace at once; returns each node's seconds.
fn pull_all(lab: &Lab, urls: &[(usize, String)], size: usize) -> anyhow::Result<Vec<f64>> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(urls.len()));
    let handles: Vec<_> = urls
        .iter()
        .map(|(i, url)| {
            let mut cmd = lab.command(*i, "curl");
            cmd.args(["-sS", "-o", "/dev/null", "-w", "%{time_total} %{size_download} %{http_code}", url]);
            let barrier = barrier.clone();
            std::thread::spawn(move || -> anyhow::Result<f64> {
                barrier.wait();
                let out = cmd.output().context("running curl")?;
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                let mut p = text.split_whitespace();
                let secs: f64 = p.next().unwrap_or("").parse().context("curl time")?;
                let got: usize = p.next().unwrap_or("").parse().context("curl size")?;
                if got != size || p.next() != Some("200") {
                    bail!("curl got {got} bytes ({text}): {}", String::from_utf8_lossy(&out.stderr));
                }
                Ok(secs)
            })
        })
        .collect();
    let mut out = vec![];
    for h in handles {
        out.push(h.join().map_err(|_| anyhow::anyhow!("curl thread panicked"))??);
    }
    Ok(out)
}

pub async fn run(args: Args, out: &Path) -> anyhow::Result<()> {
    require("curl");
    require("tc");
    let n = args.nodes;
    let size = args.size_mib << 20;
    let origin_mbit = args.origin_mbit.unwrap_or(args.rate_mbit);
    // Host 0 is the registry; hosts 1..=n are the nodes.
    let lab = Lab::new(n + 1)?;
    let registry = Registry::start_in(&lab, 0).await?;
    let blob = random_bytes(size, 61);
    let digest = registry.push_blob("bench/fanout", &blob).await?;
    drop(blob);
    lab.shape(0, origin_mbit, None)?;
    for i in 1..=n {
        lab.shape(i, args.rate_mbit, Some(args.rate_mbit))?;
    }
    let bits = size as f64 * 8.0;
    let (us, u, d) = (origin_mbit as f64 * 1e6, args.rate_mbit as f64 * 1e6, args.rate_mbit as f64 * 1e6);
    let bound = (bits / us).max(bits / d).max(n as f64 * bits / (us + n as f64 * u));
    eprintln!("fan-out: {n} nodes, {} MiB, {} Mbit/s links, origin {origin_mbit} Mbit/s; Kumar–Ross bound {bound:.2} s", args.size_mib, args.rate_mbit);

    // Baseline: every node straight from the registry.
    let direct_urls: Vec<(usize, String)> = (1..=n).map(|i| (i, format!("{}/v2/bench/fanout/blobs/{digest}", registry.url()))).collect();
    let before = registry.blob_bytes(&digest);
    let mut direct = pull_all(&lab, &direct_urls, size)?;
    let direct_egress = (registry.blob_bytes(&digest) - before) as f64 / size as f64;

    // Shoal: scheduler in the root namespace, one agent per node.
    let scheduler = Scheduler::start_on(lab.gateway()).await?;
    let config = lab_p2p_config(&[&scheduler], &registry);
    let mut agents = vec![];
    for i in 1..=n {
        agents.push(Agent::start_in(&lab, i, "agent", &config, &[]).await?);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let urls: Vec<(usize, String)> = agents.iter().enumerate().map(|(k, a)| (k + 1, a.blob_url(&registry, "bench/fanout", &digest))).collect();
    let before = registry.blob_bytes(&digest);
    let (cpu0, idle0) = cpu_times();
    let started = Instant::now();
    let mut shoal = pull_all(&lab, &urls, size)?;
    let wall = started.elapsed().as_secs_f64();
    let (cpu1, idle1) = cpu_times();
    let busy = 1.0 - (idle1 - idle0) as f64 / (cpu1 - cpu0).max(1) as f64;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shoal_egress = (registry.blob_bytes(&digest) - before) as f64 / size as f64;
    // Keep every node's log next to the results: where the time went.
    let logs = out.join(format!("fanout-{n}-logs"));
    std::fs::create_dir_all(&logs)?;
    std::fs::write(logs.join("scheduler.log"), scheduler.log())?;
    for (k, a) in agents.iter().enumerate() {
        std::fs::write(logs.join(format!("node-{}.log", k + 1)), a.log())?;
        if !a.stored_tasks().contains(&shoal_tests::task_dir(&digest)) {
            bail!("node {} did not store a verified copy", k + 1);
        }
    }
    shoal.sort_by(|a, b| a.total_cmp(b));
    direct.sort_by(|a, b| a.total_cmp(b));
    if busy > 0.9 {
        eprintln!("WARNING: the machine was {:.0}% busy: the CPUs, not the links, may have set the pace; lower --rate-mbit", busy * 100.0);
    }
    let row = |name: &str, v: &[f64], egress: f64| {
        format!(
            "| {name} | {:.2} s | {:.2} s | {:.2} s | {:.2}× | {:.2}× | {egress:.3}× |\n",
            percentile(v, 50.0),
            percentile(v, 90.0),
            percentile(v, 100.0),
            percentile(v, 50.0) / bound,
            percentile(v, 100.0) / bound
        )
    };
    let md = format!(
        "### Fan-out: {n} nodes pull one {} MiB blob at once ({} Mbit/s links, origin {origin_mbit} Mbit/s, tc tbf in network namespaces)\n\n\
         Kumar–Ross lower bound: {bound:.2} s. Machine busy {:.0}% during the Shoal run.\n\n\
         | system | p50 | p90 | p100 | p50 / bound | p100 / bound | registry egress / blob |\n|---|---|---|---|---|---|---|\n{}{}",
        args.size_mib,
        args.rate_mbit,
        busy * 100.0,
        row("Shoal (P2P)", &shoal, shoal_egress),
        row("every node from the registry", &direct, direct_egress),
    );
    let json = serde_json::json!({
        "scenario": "fanout",
        "machine": machine(),
        "nodes": n,
        "blob_bytes": size,
        "rate_mbit": args.rate_mbit,
        "origin_mbit": origin_mbit,
        "bound_seconds": bound,
        "machine_busy": busy,
        "shoal": { "seconds": shoal, "registry_egress_per_blob": shoal_egress, "wall_seconds": wall },
        "direct": { "seconds": direct, "registry_egress_per_blob": direct_egress },
    });
    write(out, &format!("fanout-{n}"), &json, &md)
}
