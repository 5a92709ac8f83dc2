//! The data path: one blob over unshaped links between network namespaces (a veth each, joined by
//! the lab's bridge), each path timed and costed in CPU-seconds per GiB for every process it
//! involves (user + system, from /proc and the waited children's rusage), median of the runs.
//!
//! Hosts: the registry (0); node A (1): an agent and nginx; node B (2): an agent and the clients.
//! Paths: registry → agent A → curl on A (a cold miss, against curl straight from the registry);
//! agent A → curl on A (a cache hit, against nginx on A to curl on A); agent A → agent B over the
//! peer protocol → curl on B (every piece verified and stored; against nginx on A to curl on B over
//! TCP, and over TLS). The blob and nginx's copy are in the page cache except for the cold miss.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use shoal_tests::lazy::drop_page_cache;
use shoal_tests::netns::Lab;
use shoal_tests::{lab_p2p_config, random_bytes, require, Agent, Registry, Scheduler};

use crate::nginx::Nginx;
use crate::report::{machine, median, tree_cpu_seconds, waited_children_cpu_seconds, write};

#[derive(clap::Args)]
pub struct Args {
    /// Blob size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: usize,
    /// Timed runs of each path (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

const REGISTRY: usize = 0;
const NODE_A: usize = 1;
const NODE_B: usize = 2;
const REPO: &str = "bench/datapath";
const GIB: f64 = (1u64 << 30) as f64;

/// One timed transfer: seconds, and CPU-seconds of the receiving and sending sides.
#[derive(Clone, Copy, Default)]
struct Sample {
    seconds: f64,
    receiver_cpu: f64,
    sender_cpu: f64,
}

/// The samples of one path.
#[derive(Default)]
struct Samples(Vec<Sample>);

impl Samples {
    fn median(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        median(&self.0.iter().map(f).collect::<Vec<_>>())
    }
}

/// What to time: the paths in the order of the table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Way {
    ColdMiss,
    Direct,
    CacheHit,
    NginxLocal,
    PeerToPeer,
    NginxTcp,
    NginxTcpStored,
    NginxTls,
}

const WAYS: [Way; 8] =
    [Way::ColdMiss, Way::Direct, Way::CacheHit, Way::NginxLocal, Way::PeerToPeer, Way::NginxTcp, Way::NginxTcpStored, Way::NginxTls];

impl Way {
    fn key(self) -> &'static str {
        match self {
            Way::ColdMiss => "cold_miss",
            Way::Direct => "registry_direct",
            Way::CacheHit => "cache_hit",
            Way::NginxLocal => "nginx_local",
            Way::PeerToPeer => "peer_to_peer",
            Way::NginxTcp => "nginx_tcp",
            Way::NginxTcpStored => "nginx_tcp_stored",
            Way::NginxTls => "nginx_tls",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Way::ColdMiss => "cold miss: registry → agent A → curl on A",
            Way::Direct => "baseline: registry → curl on A",
            Way::CacheHit => "cache hit: agent A → curl on A",
            Way::NginxLocal => "baseline: nginx on A (`sendfile`) → curl on A",
            Way::PeerToPeer => "peer → peer: agent A → agent B (QUIC, verified, stored) → curl on B",
            Way::NginxTcp => "baseline: nginx on A (`sendfile`) → curl on B, TCP",
            Way::NginxTcpStored => "baseline: the same, curl writing a file on B (stored, as agent B does)",
            Way::NginxTls => "baseline: nginx on A → curl on B, TLS 1.3",
        }
    }

    /// Who the receiving and sending sides are, for the table's headers.
    fn sides(self) -> (&'static str, &'static str) {
        match self {
            Way::ColdMiss => ("agent A + curl", "registry"),
            Way::Direct => ("curl", "registry"),
            Way::CacheHit => ("curl", "agent A"),
            Way::NginxLocal => ("curl", "nginx"),
            Way::PeerToPeer => ("agent B + curl", "agent A"),
            Way::NginxTcp | Way::NginxTcpStored | Way::NginxTls => ("curl", "nginx"),
        }
    }
}

/// Downloads `url` with curl in host `i` to /dev/null, checking the size; returns the seconds
/// and curl's CPU-seconds.
fn curl(lab: &Lab, i: usize, url: &str, expect: usize) -> anyhow::Result<(f64, f64)> {
    curl_to(lab, i, url, Path::new("/dev/null"), expect)
}

/// [`curl`] writing the body to `file`.
fn curl_to(lab: &Lab, i: usize, url: &str, file: &Path, expect: usize) -> anyhow::Result<(f64, f64)> {
    let cpu = waited_children_cpu_seconds();
    let started = Instant::now();
    let out = lab
        .command(i, "curl")
        .args(["-sS", "-k", "-w", "%{size_download} %{http_code}", url, "-o"])
        .arg(file)
        .output()
        .context("running curl")?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = waited_children_cpu_seconds() - cpu;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let size: usize = parts.next().unwrap_or("").parse().context("curl size")?;
    let code = parts.next().unwrap_or("");
    if size != expect || code != "200" {
        bail!("{url}: got {size} bytes with status {code}, expected {expect} bytes: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((seconds, cpu))
}

/// CPU-seconds of `pids` (each with its children) so far.
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| tree_cpu_seconds(p)).sum()
}

/// Times one download by curl on host `i`, charging the CPU of `receivers` (and curl) to the
/// receiving side and of `senders` to the sending one.
fn timed(lab: &Lab, i: usize, url: &str, size: usize, receivers: &[u32], senders: &[u32]) -> anyhow::Result<Sample> {
    timed_to(lab, i, url, Path::new("/dev/null"), size, receivers, senders)
}

/// [`timed`] with curl writing the body to `file`.
fn timed_to(lab: &Lab, i: usize, url: &str, file: &Path, size: usize, receivers: &[u32], senders: &[u32]) -> anyhow::Result<Sample> {
    let (r0, s0) = (cpu_of(receivers), cpu_of(senders));
    let (seconds, curl_cpu) = curl_to(lab, i, url, file, size)?;
    Ok(Sample { seconds, receiver_cpu: cpu_of(receivers) - r0 + curl_cpu, sender_cpu: cpu_of(senders) - s0 })
}

pub async fn run(args: Args, out: &Path) -> anyhow::Result<()> {
    for tool in ["curl", "nginx", "openssl", "docker-registry", "ip"] {
        require(tool);
    }
    if args.size_mib == 0 || args.runs == 0 {
        bail!("--size-mib and --runs must be at least 1");
    }
    let size = args.size_mib << 20;
    let lab = Lab::new(3)?;
    let registry = Registry::start_in(&lab, REGISTRY).await?;
    let scheduler = Scheduler::start_on(lab.gateway()).await?;
    let blob = random_bytes(size, 29);
    let digest = registry.push_blob(REPO, &blob).await?;
    let nginx = Nginx::start_at("blob", &blob, Some((&lab, NODE_A)), false)?;
    let nginx_tls = Nginx::start_at("blob", &blob, Some((&lab, NODE_A)), true)?;
    drop(blob);
    let registry_pid = registry.pid().context("the registry is not running")?;
    let nginx_pids = [nginx.pid().context("nginx is not running")?];
    let nginx_tls_pids = [nginx_tls.pid().context("nginx (TLS) is not running")?];
    let direct_url = format!("{}/v2/{REPO}/blobs/{digest}", registry.url());
    let config = lab_p2p_config(&[&scheduler], &registry);
    eprintln!("data path: one {} MiB blob, {} runs of each path", args.size_mib, args.runs);

    let mut paths: Vec<(Way, Samples)> = WAYS.iter().map(|&w| (w, Samples::default())).collect();
    let mut push = |way: Way, s: Sample| {
        if let Some((_, p)) = paths.iter_mut().find(|(w, _)| *w == way) {
            p.0.push(s);
        }
    };
    for run in 0..args.runs {
        eprintln!("run {}/{}", run + 1, args.runs);
        // Fresh agents with empty stores; the page cache dropped before the cold miss.
        let a = Agent::start_in(&lab, NODE_A, "agent", &config, &[]).await?;
        let b = Agent::start_in(&lab, NODE_B, "agent", &config, &[]).await?;
        let (a_pid, b_pid) = (a.pid().context("agent A exited")?, b.pid().context("agent B exited")?);
        let a_url = a.blob_url(&registry, REPO, &digest);
        drop_page_cache()?;
        push(Way::Direct, timed(&lab, NODE_A, &direct_url, size, &[], &[registry_pid])?);
        drop_page_cache()?;
        let before = registry.blob_bytes(&digest);
        push(Way::ColdMiss, timed(&lab, NODE_A, &a_url, size, &[a_pid], &[registry_pid])?);
        a.wait_stored(&digest).await?;
        let cold_bytes = registry.blob_bytes(&digest) - before;
        if cold_bytes != size as u64 {
            bail!("the cold miss cost the registry {cold_bytes} bytes for a {size}-byte blob");
        }
        // Warm: everything below reads from the page cache.
        for url in [&a_url, &nginx.url, &nginx_tls.url] {
            curl(&lab, NODE_A, url, size)?;
        }
        push(Way::CacheHit, timed(&lab, NODE_A, &a_url, size, &[], &[a_pid])?);
        push(Way::NginxLocal, timed(&lab, NODE_A, &nginx.url, size, &[], &nginx_pids)?);
        let before = registry.blob_bytes(&digest);
        push(Way::PeerToPeer, timed(&lab, NODE_B, &b.blob_url(&registry, REPO, &digest), size, &[b_pid], &[a_pid])?);
        b.wait_stored(&digest).await?;
        let p2p_bytes = registry.blob_bytes(&digest) - before;
        if p2p_bytes != 0 {
            bail!("agent B got {p2p_bytes} bytes from the registry, not all from agent A:\n{}", b.log());
        }
        push(Way::NginxTcp, timed(&lab, NODE_B, &nginx.url, size, &[], &nginx_pids)?);
        let stored = tempfile::Builder::new().prefix("shoal-bench-datapath-").tempdir_in("/var/tmp")?;
        let file = stored.path().join("blob");
        push(Way::NginxTcpStored, timed_to(&lab, NODE_B, &nginx.url, &file, size, &[], &nginx_pids)?);
        drop(stored);
        push(Way::NginxTls, timed(&lab, NODE_B, &nginx_tls.url, size, &[], &nginx_tls_pids)?);
    }
    report(&args, out, &paths)
}

/// Writes `datapath.{json,md,png}` under `out`.
fn report(args: &Args, out: &Path, paths: &[(Way, Samples)]) -> anyhow::Result<()> {
    let gib = (args.size_mib << 20) as f64 / GIB;
    let of = |way: Way| paths.iter().find(|(w, _)| *w == way).map(|(_, s)| s).expect("every way is measured");
    let speed = |way: Way| gib / of(way).median(|s| s.seconds);
    let recv = |way: Way| of(way).median(|s| s.receiver_cpu) / gib;
    let send = |way: Way| of(way).median(|s| s.sender_cpu) / gib;
    let json_paths: serde_json::Map<String, serde_json::Value> = paths
        .iter()
        .map(|(way, s)| {
            (
                way.key().to_string(),
                serde_json::json!({
                    "label": way.label(),
                    "seconds": s.0.iter().map(|x| x.seconds).collect::<Vec<_>>(),
                    "receiver_cpu_seconds": s.0.iter().map(|x| x.receiver_cpu).collect::<Vec<_>>(),
                    "sender_cpu_seconds": s.0.iter().map(|x| x.sender_cpu).collect::<Vec<_>>(),
                    "gib_per_s": speed(*way),
                    "receiver_cpu_seconds_per_gib": recv(*way),
                    "sender_cpu_seconds_per_gib": send(*way),
                }),
            )
        })
        .collect();
    let targets = serde_json::json!({
        "peer_to_peer_gib_per_s": TARGET_P2P_GIB_S,
        "peer_to_peer_receiver_cpu_seconds_per_gib": TARGET_RECEIVER_CPU,
        "peer_to_peer_sender_cpu_seconds_per_gib": TARGET_SENDER_CPU,
        "cold_miss_over_direct": TARGET_COLD,
        "cache_hit_over_nginx": TARGET_HIT,
    });
    let json = serde_json::json!({
        "scenario": "datapath",
        "machine": machine(),
        "blob_bytes": args.size_mib << 20,
        "runs": args.runs,
        "targets": targets,
        "paths": json_paths,
        "peer_to_peer_over_tcp": speed(Way::PeerToPeer) / speed(Way::NginxTcp),
        "peer_to_peer_over_tcp_stored": speed(Way::PeerToPeer) / speed(Way::NginxTcpStored),
        "peer_to_peer_over_tls": speed(Way::PeerToPeer) / speed(Way::NginxTls),
        "cold_miss_over_direct": speed(Way::ColdMiss) / speed(Way::Direct),
        "cache_hit_over_nginx": speed(Way::CacheHit) / speed(Way::NginxLocal),
    });
    let mut md = format!(
        "### Data path: one {} MiB blob between network namespaces, unshaped (median of {} runs)\n\n\
         | path | GiB/s | receiving side | CPU-s/GiB | sending side | CPU-s/GiB |\n|---|---|---|---|---|---|\n",
        args.size_mib, args.runs
    );
    for &way in &WAYS {
        let (r, s) = way.sides();
        md.push_str(&format!("| {} | {:.2} | {r} | {:.2} | {s} | {:.2} |\n", way.label(), speed(way), recv(way), send(way)));
    }
    md.push_str(&format!(
        "\nTargets: peer → peer ≥ {TARGET_P2P_GIB_S} GiB/s (measured {:.2}; {:.2}× nginx over TCP, {:.2}× over TCP into a file, {:.2}× over TLS) with the receiver ≤ {TARGET_RECEIVER_CPU} \
         (measured {:.2}, curl included) and the sender ≤ {TARGET_SENDER_CPU} CPU-seconds per GiB (measured {:.2}); \
         a cold miss ≥ {TARGET_COLD}× a direct download (measured {:.2}×); a cache hit ≥ {TARGET_HIT}× nginx (measured {:.2}×).\n\n\
         Hosts are network namespaces, each with a veth into one bridge: the registry, node A (agent A, nginx), node B (agent B, the clients). \
         Agents are fresh for every run (P2P on, one scheduler); the page cache is dropped before the cold miss and the direct download, \
         and is warm for the rest. CPU is user + system time from /proc for the daemons (nginx's master and worker) and the rusage of curl. \
         Agent B's figure includes serving curl on its own node, as containerd pulls through it. Machine: {} × {}, kernel {}.\n",
        speed(Way::PeerToPeer),
        speed(Way::PeerToPeer) / speed(Way::NginxTcp),
        speed(Way::PeerToPeer) / speed(Way::NginxTcpStored),
        speed(Way::PeerToPeer) / speed(Way::NginxTls),
        recv(Way::PeerToPeer),
        send(Way::PeerToPeer),
        speed(Way::ColdMiss) / speed(Way::Direct),
        speed(Way::CacheHit) / speed(Way::NginxLocal),
        json["machine"]["cpus"],
        json["machine"]["cpu"].as_str().unwrap_or("?"),
        json["machine"]["kernel"].as_str().unwrap_or("?"),
    ));
    let pairs = [
        ("cold miss / direct", Way::ColdMiss, Way::Direct),
        ("cache hit / nginx", Way::CacheHit, Way::NginxLocal),
        ("peer→peer / nginx TCP", Way::PeerToPeer, Way::NginxTcp),
        ("peer→peer / TCP, stored", Way::PeerToPeer, Way::NginxTcpStored),
        ("peer→peer / nginx TLS", Way::PeerToPeer, Way::NginxTls),
    ];
    let groups: Vec<&str> = pairs.iter().map(|p| p.0).collect();
    let ratio = |f: &dyn Fn(Way) -> f64| pairs.iter().map(|&(_, shoal, base)| f(shoal) / f(base)).collect::<Vec<f64>>();
    let series = vec![
        ("throughput".to_string(), ratio(&speed)),
        ("CPU per GiB, receiving side".to_string(), ratio(&recv)),
        ("CPU per GiB, sending side".to_string(), ratio(&send)),
    ];
    std::fs::create_dir_all(out)?;
    crate::plot::ratio_bars(
        &out.join("datapath.png"),
        "Data path: Shoal relative to the baseline of each path",
        "Shoal / baseline",
        &groups,
        &series,
        None,
        true,
    )?;
    write(out, "datapath", &json, &md)
}

/// Peer → peer throughput, GiB/s.
const TARGET_P2P_GIB_S: f64 = 1.0;
/// CPU-seconds per GiB of the receiving agent.
const TARGET_RECEIVER_CPU: f64 = 1.0;
/// CPU-seconds per GiB of the sending agent.
const TARGET_SENDER_CPU: f64 = 0.5;
/// A cold miss's speed over a direct download's.
const TARGET_COLD: f64 = 0.9;
/// A cache hit's speed over nginx's.
const TARGET_HIT: f64 = 0.9;
