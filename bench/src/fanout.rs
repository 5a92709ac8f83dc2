//! The fan-out scenario: N nodes, each a network namespace with shaped links, pull one blob.
//! Shoal (scheduler + agents, P2P) against every node pulling straight from the registry, the
//! registry as a pull-through central cache, and BitTorrent (aria2 + opentracker), in the same
//! run on the same network; completion times against the Kumar–Ross lower bound
//! `T_min = max(S/u_s, S/d_min, N·S/(u_s + Σu_i))`, and the bytes the origin sent.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use shoal_tests::netns::Lab;
use shoal_tests::{lab_p2p_config, random_bytes, require, Agent, Registry, Scheduler};

use crate::report::{machine, peak_rss, process_cpu_seconds, write};
use crate::{bittorrent, plot};

/// A system the scenario measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    /// Shoal agents with a scheduler (P2P).
    Shoal,
    /// Every node pulls from the registry itself.
    Direct,
    /// The registry in pull-through proxy mode on its own host: one central cache.
    Proxy,
    /// aria2c peers with opentracker; the origin host seeds.
    Bittorrent,
}

impl System {
    /// How tables and plots name it.
    pub fn label(self) -> &'static str {
        match self {
            System::Shoal => "Shoal (P2P)",
            System::Direct => "every node from the registry",
            System::Proxy => "registry pull-through cache",
            System::Bittorrent => "BitTorrent (aria2 + opentracker)",
        }
    }

    /// How the JSON names it.
    pub fn key(self) -> &'static str {
        match self {
            System::Shoal => "shoal",
            System::Direct => "direct",
            System::Proxy => "proxy",
            System::Bittorrent => "bittorrent",
        }
    }
}

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Nodes pulling the blob.
    #[arg(long, default_value_t = 8)]
    pub nodes: usize,
    /// Blob size in MiB.
    #[arg(long, default_value_t = 64)]
    pub size_mib: usize,
    /// Every node's upload and download rate, Mbit/s.
    #[arg(long, default_value_t = 100)]
    pub rate_mbit: u32,
    /// The registry's upload rate, Mbit/s (default: the node rate).
    #[arg(long)]
    pub origin_mbit: Option<u32>,
    /// Systems to measure, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [System::Shoal, System::Direct, System::Proxy, System::Bittorrent])]
    pub systems: Vec<System>,
    /// Staggered arrivals: node k starts this many milliseconds after node k-1 (0: all at once).
    #[arg(long, default_value_t = 0)]
    pub stagger_ms: u64,
    /// Shoal only: a seed host (shaped like a node) joins the cluster.
    #[arg(long)]
    pub seed: bool,
    /// Shoal only: the seed holds the blob before the nodes start (implies --seed).
    #[arg(long)]
    pub preheat: bool,
    /// Give up on a system after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Result file name (default: `fanout-<nodes>`, with `-staggered`/`-preheated` when so).
    #[arg(long)]
    pub name: Option<String>,
}

/// Percentile of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// `/proc/stat` totals: (all jiffies, idle jiffies).
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (v.iter().sum(), idle)
}

/// Bytes host `i`'s shaped downlink has let through so far, as its `tc` qdisc counts them (the
/// `ifb0` device its ingress is shaped on): every packet at its full size on the wire, which the
/// interface counters understate for coalesced (GRO) packets.
fn downlink_bytes(lab: &Lab, i: usize) -> anyhow::Result<u64> {
    let out = lab.command(i, "tc").args(["-s", "qdisc", "show", "dev", "ifb0"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "Sent")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no byte count in host {i}'s ifb0 qdisc statistics: {text}"))
}

/// Bytes the nodes' downlinks let through so far, in all.
fn nodes_rx(lab: &Lab, nodes: &[usize]) -> anyhow::Result<u64> {
    nodes.iter().map(|&i| downlink_bytes(lab, i)).sum()
}

/// Runs `curl` in each node's namespace (node k after `k * stagger`); returns each node's seconds.
fn pull_all(lab: &Lab, urls: &[(usize, String)], size: usize, digest: &str, stagger: Duration) -> anyhow::Result<Vec<f64>> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(urls.len()));
    let want = digest.strip_prefix("sha256:").unwrap_or(digest).to_string();
    let handles: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(k, (i, url))| {
            // The bytes go through sha256sum as they arrive (no copy on disk); curl's figures go to stderr.
            let mut cmd = lab.command(*i, "sh");
            cmd.args(["-c", r#"curl -sS -w '%{stderr}%{time_total} %{size_download} %{http_code}\n' "$1" | sha256sum"#, "pull", url]);
            let barrier = barrier.clone();
            let want = want.clone();
            let url = url.clone();
            std::thread::spawn(move || -> anyhow::Result<f64> {
                barrier.wait();
                std::thread::sleep(stagger * k as u32);
                let out = cmd.output().context("running curl")?;
                let stderr = String::from_utf8_lossy(&out.stderr).to_string();
                let figures = stderr.lines().last().unwrap_or("");
                let mut p = figures.split_whitespace();
                let secs: f64 = p.next().unwrap_or("").parse().with_context(|| format!("curl {url}: {stderr}"))?;
                let got: usize = p.next().unwrap_or("").parse().with_context(|| format!("curl {url}: {stderr}"))?;
                if got != size || p.next() != Some("200") {
                    bail!("curl {url} got {got} bytes: {stderr}");
                }
                let sum = String::from_utf8_lossy(&out.stdout);
                if sum.split_whitespace().next() != Some(want.as_str()) {
                    bail!("{url} delivered bytes whose sha256 is {sum}, not {want}");
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

/// One system's outcome.
pub struct Outcome {
    pub system: System,
    /// Per node, sorted.
    pub seconds: Vec<f64>,
    /// Bytes the origin sent, per blob size.
    pub origin_egress: f64,
    /// Whole-machine CPU busy fraction during the run.
    pub machine_busy: f64,
    /// Bytes a node's shaped downlink carried per blob byte, on average (the blob, duplicates
    /// and every protocol's overhead, as `tc` counts them).
    pub node_bytes_in: f64,
    /// Shoal only: CPU seconds of all agents (and the scheduler), and the largest agent peak RSS.
    pub agent_cpu_seconds: Option<f64>,
    pub agent_peak_rss: Option<u64>,
    /// Shoal only: the nodes' peer counters, averaged per node.
    pub peer_counters: Option<PeerCounters>,
}

/// What a node's peer protocol did besides moving piece bytes, averaged over the nodes (from the
/// agents' Prometheus counters): where downlink bytes other than the blob's go.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PeerCounters {
    /// Piece updates sent to subscribers.
    pub updates_sent: f64,
    /// Piece updates received that named only pieces the node already had.
    pub updates_unneeded: f64,
    /// Piece requests answered "busy".
    pub busy_refusals: f64,
    /// Piece bytes that arrived after another copy was stored.
    pub duplicate_bytes: f64,
    /// Fetches cancelled because another copy arrived first.
    pub fetches_abandoned: f64,
    /// Verified piece bytes from peers.
    pub piece_bytes_received: f64,
    /// Bytes from the registry.
    pub origin_bytes: f64,
    /// What the peer connections received: UDP datagrams and their payload bytes (QUIC packets
    /// with pieces, control messages and acknowledgements), acknowledgement frames among them.
    pub udp_datagrams_received: f64,
    pub udp_bytes_received: f64,
    pub ack_frames_received: f64,
    pub ping_frames_received: f64,
    pub stream_frames_received: f64,
    pub credit_frames_received: f64,
    pub abort_frames_received: f64,
    /// QUIC packets this node sent that were lost.
    pub packets_lost: f64,
}

impl PeerCounters {
    /// The counters of the agents whose `/metrics` texts are given, averaged.
    fn average(texts: &[String]) -> PeerCounters {
        let sum = |name: &str| -> f64 {
            texts.iter().filter_map(|t| shoal_tests::metric_value(t, name)).sum::<f64>() / texts.len().max(1) as f64
        };
        PeerCounters {
            updates_sent: sum("shoal_peer_updates_sent_total"),
            updates_unneeded: sum("shoal_peer_updates_unneeded_total"),
            busy_refusals: sum("shoal_peer_busy_refusals_total"),
            duplicate_bytes: sum("shoal_peer_bytes_duplicate_total"),
            fetches_abandoned: sum("shoal_peer_fetches_abandoned_total"),
            piece_bytes_received: sum("shoal_peer_bytes_received_total"),
            origin_bytes: sum("shoal_origin_bytes_total"),
            udp_datagrams_received: sum("shoal_peer_udp_datagrams_received_total"),
            udp_bytes_received: sum("shoal_peer_udp_bytes_received_total"),
            ack_frames_received: sum("shoal_peer_ack_frames_received_total"),
            ping_frames_received: sum("shoal_peer_ping_frames_received_total"),
            stream_frames_received: sum("shoal_peer_stream_frames_received_total"),
            credit_frames_received: sum("shoal_peer_credit_frames_received_total"),
            abort_frames_received: sum("shoal_peer_abort_frames_received_total"),
            packets_lost: sum("shoal_peer_packets_lost_total"),
        }
    }
}

impl Outcome {
    /// An outcome read back from an earlier run's JSON: what the scaling report needs.
    pub fn read_back(system: System, seconds: Vec<f64>) -> Outcome {
        Outcome::baseline(system, seconds, f64::NAN)
    }

    /// A baseline's outcome (no Shoal processes to account for); machine use is filled in after.
    fn baseline(system: System, seconds: Vec<f64>, origin_egress: f64) -> Outcome {
        Outcome {
            system,
            seconds,
            origin_egress,
            machine_busy: 0.0,
            node_bytes_in: f64::NAN,
            agent_cpu_seconds: None,
            agent_peak_rss: None,
            peer_counters: None,
        }
    }
}

/// The figures of one fan-out run, for the scaling scenario.
pub struct FanoutResult {
    pub nodes: usize,
    pub bound: f64,
    pub outcomes: Vec<Outcome>,
}

/// Runs the scenario and writes `fanout-<N>[...].{json,md,png}`.
pub async fn run(args: Args, out: &Path) -> anyhow::Result<FanoutResult> {
    require("curl");
    require("tc");
    let n = args.nodes;
    if n == 0 {
        bail!("--nodes must be at least 1");
    }
    let size = args.size_mib << 20;
    let origin_mbit = args.origin_mbit.unwrap_or(args.rate_mbit);
    let stagger = Duration::from_millis(args.stagger_ms);
    let seed = args.seed || args.preheat;
    // Host 0 is the registry; hosts 1..=n the nodes; then the central cache and the seed.
    let proxy_host = n + 1;
    let seed_host = n + 2;
    let lab = Lab::new(n + 3)?;
    let registry = Registry::start_in(&lab, 0).await?;
    let blob = random_bytes(size, 61);
    let digest = registry.push_blob("bench/fanout", &blob).await?;
    let work = tempfile::Builder::new().prefix("shoal-bench-").tempdir()?;
    let blob_file = work.path().join("blob.bin");
    std::fs::write(&blob_file, &blob)?;
    drop(blob);
    lab.shape(0, origin_mbit, None)?;
    for i in 1..=n {
        lab.shape(i, args.rate_mbit, Some(args.rate_mbit))?;
    }
    lab.shape(proxy_host, args.rate_mbit, Some(args.rate_mbit))?;
    lab.shape(seed_host, args.rate_mbit, Some(args.rate_mbit))?;
    let bits = size as f64 * 8.0;
    let (us, u, d) = (origin_mbit as f64 * 1e6, args.rate_mbit as f64 * 1e6, args.rate_mbit as f64 * 1e6);
    let bound = (bits / us).max(bits / d).max(n as f64 * bits / (us + n as f64 * u));
    let shape = if args.stagger_ms > 0 { format!(", node k starts {} ms after node k-1", args.stagger_ms) } else { String::new() };
    eprintln!(
        "fan-out: {n} nodes, {} MiB, {} Mbit/s links, origin {origin_mbit} Mbit/s{shape}; Kumar–Ross bound {bound:.2} s",
        args.size_mib, args.rate_mbit
    );
    let name = args.name.clone().unwrap_or_else(|| {
        let mut s = format!("fanout-{n}");
        if args.stagger_ms > 0 {
            s.push_str("-staggered");
        }
        if args.preheat {
            s.push_str("-preheated");
        }
        s
    });
    let url_of = |base: String| format!("{base}/v2/bench/fanout/blobs/{digest}");
    let nodes: Vec<usize> = (1..=n).collect();
    let mut outcomes = Vec::new();
    for system in &args.systems {
        eprintln!("  {}...", system.label());
        let (cpu0, idle0) = cpu_times();
        let rx0 = nodes_rx(&lab, &nodes)?;
        let mut outcome = match system {
            System::Direct => {
                let before = registry.blob_bytes(&digest);
                let urls: Vec<(usize, String)> = nodes.iter().map(|&i| (i, url_of(registry.url()))).collect();
                let seconds = pull_all(&lab, &urls, size, &digest, stagger)?;
                let egress = (registry.blob_bytes(&digest) - before) as f64 / size as f64;
                Outcome::baseline(*system, seconds, egress)
            }
            System::Proxy => {
                let proxy = Registry::start_proxy_in(&lab, proxy_host, &registry).await?;
                let before = registry.blob_bytes(&digest);
                let urls: Vec<(usize, String)> = nodes.iter().map(|&i| (i, url_of(proxy.url()))).collect();
                let seconds = pull_all(&lab, &urls, size, &digest, stagger)?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let egress = (registry.blob_bytes(&digest) - before) as f64 / size as f64;
                Outcome::baseline(*system, seconds, egress)
            }
            System::Bittorrent => {
                let swarm = bittorrent::run(&lab, 0, &nodes, &blob_file, stagger, Duration::from_secs(args.timeout))?;
                let egress = swarm.origin_bytes as f64 / size as f64;
                Outcome::baseline(*system, swarm.seconds, egress)
            }
            System::Shoal => shoal(&args, &lab, &registry, &digest, size, seed, out, &name).await?,
        };
        let (cpu1, idle1) = cpu_times();
        outcome.machine_busy = 1.0 - (idle1 - idle0) as f64 / (cpu1 - cpu0).max(1) as f64;
        outcome.node_bytes_in = nodes_rx(&lab, &nodes)?.saturating_sub(rx0) as f64 / (n * size) as f64;
        outcome.seconds.sort_by(|a, b| a.total_cmp(b));
        if outcome.machine_busy > 0.9 {
            eprintln!(
                "WARNING: the machine was {:.0}% busy during {}: the CPUs, not the links, may have set the pace; lower --rate-mbit",
                outcome.machine_busy * 100.0,
                system.label()
            );
        }
        outcomes.push(outcome);
    }

    let row = |o: &Outcome| {
        let v = &o.seconds;
        format!(
            "| {} | {:.2} s | {:.2} s | {:.2} s | {:.2}× | {:.2}× | {:.3}× | {:.3}× | {:.0}% |\n",
            o.system.label(),
            percentile(v, 50.0),
            percentile(v, 90.0),
            percentile(v, 100.0),
            percentile(v, 50.0) / bound,
            percentile(v, 100.0) / bound,
            o.origin_egress,
            o.node_bytes_in,
            o.machine_busy * 100.0
        )
    };
    let mut notes = String::new();
    if let Some(o) = outcomes.iter().find(|o| o.system == System::Shoal) {
        if let (Some(cpu), Some(rss)) = (o.agent_cpu_seconds, o.agent_peak_rss) {
            notes.push_str(&format!(
                "Shoal agents and scheduler used {cpu:.1} CPU-seconds in all; largest agent peak RSS {:.0} MiB.\n",
                rss as f64 / (1 << 20) as f64
            ));
        }
        if let Some(c) = o.peer_counters {
            notes.push_str(&format!(
                "Per Shoal node: {:.0} piece updates sent ({:.0} of those received named only pieces the node already had), {:.0} piece requests answered busy, {:.0} fetches abandoned for another copy, {:.3}× the blob in duplicate piece bytes.\n",
                c.updates_sent,
                c.updates_unneeded,
                c.busy_refusals,
                c.fetches_abandoned,
                c.duplicate_bytes / size as f64
            ));
            notes.push_str(&downlink_account(o, &c, size, args.rate_mbit, bound));
        }
    }
    if outcomes.iter().any(|o| o.system == System::Bittorrent) {
        notes.push_str("BitTorrent's origin egress is the origin host's interface counter (payload plus protocol overhead); the others count blob bytes in the registry's access log.\n");
    }
    notes.push_str("Node bytes in: what each node's shaped downlink carried (as its `tc` qdisc counts it: the blob, duplicates, headers, acknowledgements and control messages), per blob byte, averaged over the nodes.\n");
    let staggered = if args.stagger_ms > 0 {
        format!(" Arrivals staggered by {} ms; times are from each node's own start.", args.stagger_ms)
    } else {
        String::new()
    };
    let seeded = if args.preheat {
        " Shoal has one seed host that held the blob before the nodes started."
    } else if seed {
        " Shoal has one seed host."
    } else {
        ""
    };
    let md = format!(
        "### Fan-out: {n} nodes pull one {} MiB blob ({} Mbit/s links, origin {origin_mbit} Mbit/s, tc tbf in network namespaces)\n\n\
         Kumar–Ross lower bound: {bound:.2} s.{staggered}{seeded}\n\n\
         | system | p50 | p90 | p100 | p50 / bound | p100 / bound | origin egress / blob | node bytes in / blob | machine busy |\n|---|---|---|---|---|---|---|---|---|\n{}\n{notes}\n![completion CDF]({name}.png)\n",
        args.size_mib,
        args.rate_mbit,
        outcomes.iter().map(row).collect::<String>(),
    );
    let systems_json: serde_json::Map<String, serde_json::Value> = outcomes
        .iter()
        .map(|o| {
            (
                o.system.key().to_string(),
                serde_json::json!({
                    "seconds": o.seconds,
                    "p50": percentile(&o.seconds, 50.0),
                    "p90": percentile(&o.seconds, 90.0),
                    "p100": percentile(&o.seconds, 100.0),
                    "p100_over_bound": percentile(&o.seconds, 100.0) / bound,
                    "p50_over_bound": percentile(&o.seconds, 50.0) / bound,
                    "origin_egress_per_blob": o.origin_egress,
                    "machine_busy": o.machine_busy,
                    "node_bytes_in_per_blob": o.node_bytes_in,
                    "agent_cpu_seconds": o.agent_cpu_seconds,
                    "agent_peak_rss_bytes": o.agent_peak_rss,
                    "peer_counters_per_node": o.peer_counters,
                }),
            )
        })
        .collect();
    let json = serde_json::json!({
        "scenario": "fanout",
        "machine": machine(),
        "nodes": n,
        "blob_bytes": size,
        "rate_mbit": args.rate_mbit,
        "origin_mbit": origin_mbit,
        "stagger_ms": args.stagger_ms,
        "seed": seed,
        "preheated": args.preheat,
        "bound_seconds": bound,
        "systems": systems_json,
    });
    write(out, &name, &json, &md)?;
    let cdf: Vec<(String, Vec<f64>)> = outcomes.iter().map(|o| (o.system.label().to_string(), o.seconds.clone())).collect();
    plot::completion_cdf(
        &out.join(format!("{name}.png")),
        &format!("{n} nodes, {} MiB, {} Mbit/s links", args.size_mib, args.rate_mbit),
        &cdf,
        bound,
    )?;
    Ok(FanoutResult { nodes: n, bound, outcomes })
}

/// Bytes a shaped link counts per datagram beyond its UDP payload: Ethernet, IP and UDP headers
/// (`tc` counts the Ethernet header too: 100 datagrams of 1,000 bytes count 104,200).
const DATAGRAM_HEADERS: f64 = 42.0;

/// Where a Shoal node's downlink bytes went, and how close the median node came to the time its
/// downlink needs to carry them: a Markdown paragraph.
fn downlink_account(o: &Outcome, c: &PeerCounters, size: usize, rate_mbit: u32, bound: f64) -> String {
    let blob = size as f64;
    let total = o.node_bytes_in * blob;
    let content = c.piece_bytes_received + c.duplicate_bytes + c.origin_bytes;
    let headers = c.udp_datagrams_received * DATAGRAM_HEADERS;
    let quic = c.udp_bytes_received - c.piece_bytes_received - c.duplicate_bytes;
    let rest = total - content - headers - quic;
    let floor = total * 8.0 / (rate_mbit as f64 * 1e6);
    let p50 = percentile(&o.seconds, 50.0);
    format!(
        "\nWhat crossed a Shoal node's downlink, per blob byte (averaged over the nodes, from its `tc` counter and its agent's QUIC counters):\n\n\
         | blob bytes (pieces from peers, stripes from the registry) | Ethernet, IP and UDP headers of {:.0} peer datagrams | QUIC beyond piece bytes (packet headers, acknowledgements, piece updates, requests, handshakes) | the rest (the registry's and the scheduler's TCP) | in all |\n\
         |---|---|---|---|---|\n\
         | {:.3}× | {:.3}× | {:.3}× | {:.3}× | {:.3}× |\n\n\
         Carrying that at {rate_mbit} Mbit/s takes a node {floor:.2} s ({:.2}× the bound); the median node took {p50:.2} s, {:.2}× that.\n",
        c.udp_datagrams_received,
        content / blob,
        headers / blob,
        quic / blob,
        rest / blob,
        o.node_bytes_in,
        floor / bound,
        p50 / floor,
    )
}

/// Shoal's run: a scheduler in the root namespace, an agent per node (and a seed when asked).
#[allow(clippy::too_many_arguments)]
async fn shoal(
    args: &Args,
    lab: &Lab,
    registry: &Registry,
    digest: &str,
    size: usize,
    seed: bool,
    out: &Path,
    name: &str,
) -> anyhow::Result<Outcome> {
    let n = args.nodes;
    let scheduler = Scheduler::start_on(lab.gateway()).await?;
    let config = lab_p2p_config(&[&scheduler], registry);
    let seed_agent = if seed { Some(Agent::start_in(lab, n + 2, "seed", &config, &[]).await?) } else { None };
    let mut agents = vec![];
    for i in 1..=n {
        agents.push(Agent::start_in(lab, i, "agent", &config, &[]).await?);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if let (true, Some(s)) = (args.preheat, &seed_agent) {
        pull_all(lab, &[(n + 2, s.blob_url(registry, "bench/fanout", digest))], size, digest, Duration::ZERO)?;
        s.wait_stored(digest).await?;
    }
    let pids: Vec<u32> = agents.iter().chain(seed_agent.iter()).filter_map(Agent::pid).chain(scheduler.pid()).collect();
    let cpu_before: f64 = pids.iter().map(|p| process_cpu_seconds(*p)).sum();
    let urls: Vec<(usize, String)> =
        agents.iter().enumerate().map(|(k, a)| (k + 1, a.blob_url(registry, "bench/fanout", digest))).collect();
    let before = registry.blob_bytes(digest);
    let pulled = pull_all(lab, &urls, size, digest, Duration::from_millis(args.stagger_ms));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Keep every node's log next to the results, also when a pull failed: where the time went.
    let logs = out.join(format!("{name}-logs"));
    std::fs::create_dir_all(&logs)?;
    std::fs::write(logs.join("scheduler.log"), scheduler.log())?;
    if let Some(s) = &seed_agent {
        std::fs::write(logs.join("seed.log"), s.log())?;
    }
    for (k, a) in agents.iter().enumerate() {
        std::fs::write(logs.join(format!("node-{}.log", k + 1)), a.log())?;
    }
    let seconds = pulled.map_err(|e| e.context(format!("node logs in {}", logs.display())))?;
    let egress = (registry.blob_bytes(digest) - before) as f64 / size as f64;
    let cpu: f64 = pids.iter().map(|p| process_cpu_seconds(*p)).sum::<f64>() - cpu_before;
    let rss = agents.iter().filter_map(Agent::pid).map(peak_rss).max().unwrap_or(0);
    let mut texts = Vec::new();
    for a in &agents {
        texts.push(a.metrics().await?);
    }
    for (k, a) in agents.iter().enumerate() {
        if !a.stored_tasks().contains(&shoal_tests::task_dir(digest)) {
            bail!("node {} did not store a verified copy", k + 1);
        }
    }
    Ok(Outcome {
        system: System::Shoal,
        seconds,
        origin_egress: egress,
        machine_busy: 0.0,
        node_bytes_in: f64::NAN,
        agent_cpu_seconds: Some(cpu),
        agent_peak_rss: Some(rss),
        peer_counters: Some(PeerCounters::average(&texts)),
    })
}
