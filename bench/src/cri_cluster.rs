//! The cold start through containerd's CRI on a cluster: N nodes, each in its own network
//! namespace behind a shaped link with containerd (CRI) and a Shoal agent (P2P on, one
//! scheduler), start the same pod at once. Timed until every container printed its first line,
//! with what the registry sent meanwhile, for Shoal's snapshotter starting the converted image
//! lazily against containerd's own pull (overlayfs) through the Shoal mirror and its P2P. The
//! bytes one start reads come from a single-node lazy start measured first, as
//! `cri-coldstart`'s row (3).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context};
use futures_util::{StreamExt, TryStreamExt};
use shoal_tests::lazy::drop_page_cache;
use shoal_tests::netns::Lab;
use shoal_tests::{require, Registry, Scheduler};

use crate::cri_coldstart::{self, ImageArgs, Images, Node, NodeSetup, Start, REPO, START_TIMEOUT};
use crate::plot;
use crate::report::{machine, median, write};

#[derive(clap::Args)]
pub struct Args {
    /// Cluster sizes, run in this order.
    #[arg(long, value_delimiter = ',', default_values_t = [8, 16, 32], display_order = 0)]
    nodes: Vec<usize>,
    /// Link rate of every node (both ways) and of the registry's uplink, Mbit/s.
    #[arg(long, default_value_t = 100, display_order = 2)]
    rate_mbit: u32,
    /// Which ways of starting the pod to measure, in this order (all three by default).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = MODES, display_order = 3)]
    modes: Vec<Mode>,
    #[command(flatten)]
    image: ImageArgs,
}

/// How the nodes start the pod.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Mode {
    /// CRI on Shoal's snapshotter, starting the converted image lazily.
    Lazy,
    /// containerd pulls the image through the Shoal mirror (and so its P2P) and unpacks it
    /// (overlayfs).
    Mirror,
    /// The floor: the image already pulled and unpacked on every node (untimed), so the timed
    /// start is containerd and runc starting N containers at once on this machine, and nothing
    /// crosses the network.
    Local,
}

const MODES: [Mode; 3] = [Mode::Lazy, Mode::Mirror, Mode::Local];

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Lazy => "lazy",
            Mode::Mirror => "mirror",
            Mode::Local => "local",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Lazy => "Shoal snapshotter, lazy",
            Mode::Mirror => "containerd pulls through the Shoal mirror (P2P), overlayfs",
            Mode::Local => "image already on every node (the machine's floor)",
        }
    }
}

/// The lab's hosts: the registry, then the nodes from 1 on.
const REGISTRY_HOST: usize = 0;

/// Nodes started (or pods run) at a time: 32 containerds and agents starting at once on a
/// small machine would miss their start timeouts.
const STARTING_AT_ONCE: usize = 4;

/// What the starts of one cluster measured.
struct ClusterStart {
    /// Per node: from when the starts began to the container's first line.
    seconds: Vec<f64>,
    /// Per node: how long PullImage took.
    pull_seconds: Vec<f64>,
    /// What the registry sent (GETs answered 200 or 206), from the starts until it went quiet
    /// after the containers exited.
    registry_bytes: u64,
    /// Registry requests in that time.
    registry_requests: usize,
    /// The nodes' directories, all removed with the nodes.
    node_dirs: Vec<PathBuf>,
}

impl ClusterStart {
    fn max_seconds(&self) -> f64 {
        self.seconds.iter().copied().fold(0.0, f64::max)
    }

    fn median_seconds(&self) -> f64 {
        median(&self.seconds)
    }
}

/// Starts N nodes for `mode` on hosts 1..=n with one scheduler, runs a pod on each (untimed),
/// then starts the image on all of them at once and waits until every container printed the
/// image's line and exited with 0. The nodes' logs go to `logs` whatever happens.
async fn cluster_start(lab: &Lab, n: usize, mode: Mode, registry: &Registry, images: &Images, logs: &Path) -> anyhow::Result<ClusterStart> {
    let scheduler = Scheduler::start_on(lab.gateway()).await?;
    let run_id = format!("n{n}-{}", mode.key());
    let nodes: Vec<Node> = futures_util::stream::iter(1..=n)
        .map(|host| {
            let peer = format!(
                "[peer]\nenabled = true\nlisten = \"0.0.0.0:65003\"\nschedulers = [\"{}\"]\nhost_id = \"{run_id}-node{host}\"\n",
                scheduler.addr()
            );
            let setup = NodeSetup { agent: true, lazy: mode == Mode::Lazy, peer: Some(peer) };
            async move { Node::start_with(lab, host, &setup, registry, &images.sandbox).await }
        })
        .buffered(STARTING_AT_ONCE)
        .try_collect()
        .await?;
    let result = run_pods(&nodes, mode, registry, images, &run_id).await;
    for (k, node) in nodes.iter().enumerate() {
        node.save_logs(logs, &format!("{run_id}-node{}", k + 1))?;
    }
    std::fs::write(logs.join(format!("{run_id}-scheduler.log")), scheduler.log())?;
    let result = result.with_context(|| format!("{n} nodes, {} (logs in {})", mode.label(), logs.display()))?;
    drop(nodes);
    Ok(result)
}

/// The pods' part of [`cluster_start`], on nodes already running.
async fn run_pods(nodes: &[Node], mode: Mode, registry: &Registry, images: &Images, run_id: &str) -> anyhow::Result<ClusterStart> {
    let image = match mode {
        Mode::Lazy => format!("{}/{REPO}:v1-shoal", registry.host()),
        Mode::Mirror | Mode::Local => format!("{}/{REPO}:v1", registry.host()),
    };
    let mut cris = Vec::new();
    for node in nodes {
        cris.push(node.containerd.cri().await?);
    }
    // The sandboxes first, untimed, as the kubelet runs them before pulling the image.
    let pods: Vec<_> = futures_util::stream::iter(cris.iter().enumerate())
        .map(|(k, cri)| async move { cri.run_pod(&format!("cluster-{run_id}-{}", k + 1)).await })
        .buffered(STARTING_AT_ONCE)
        .try_collect()
        .await?;
    if mode == Mode::Local {
        futures_util::stream::iter(&cris).map(|cri| cri.pull_image(&image)).buffered(STARTING_AT_ONCE).try_collect::<Vec<_>>().await?;
        cri_coldstart::wait_registry_quiet(registry).await;
    }
    drop_page_cache()?;
    let before = registry.hits().len();
    eprintln!("  {} nodes, {}: starting the pods at once", nodes.len(), mode.label());
    let started = SystemTime::now();
    let starts = cris.iter().zip(&pods).map(|(cri, pod)| cri.cold_start(pod, "app", &image, &[], START_TIMEOUT));
    let colds = futures_util::future::try_join_all(starts).await?;
    for ((cri, cold), k) in cris.iter().zip(&colds).zip(1..) {
        cri_coldstart::check_run(cri, cold, &images.app).await.with_context(|| format!("node {k}"))?;
    }
    cri_coldstart::wait_registry_quiet(registry).await;
    let (registry_bytes, registry_requests) = cri_coldstart::registry_sent(registry, before);
    let result = ClusterStart {
        seconds: colds.iter().map(|c| c.first_line.time.duration_since(started).unwrap_or_default().as_secs_f64()).collect(),
        pull_seconds: colds.iter().map(|c| c.pull.as_secs_f64()).collect(),
        registry_bytes,
        registry_requests,
        node_dirs: nodes.iter().flat_map(Node::dirs).collect(),
    };
    for ((cri, cold), pod) in cris.iter().zip(&colds).zip(&pods) {
        cri.remove_container(&cold.container).await?;
        cri.remove_pod(pod).await?;
    }
    Ok(result)
}

pub async fn run_scenario(args: Args, out: &Path) -> anyhow::Result<()> {
    for tool in ["containerd", "runc", "docker-registry", "tc", "nsenter", "chroot"] {
        require(tool);
    }
    let largest = args.nodes.iter().copied().max().unwrap_or(0);
    if args.nodes.is_empty() || args.nodes.contains(&0) || largest > 150 {
        bail!("--nodes takes cluster sizes from 1 to 150, e.g. 8,16,32");
    }
    let work = tempfile::Builder::new().prefix("shoal-bench-cri-cluster-").tempdir_in("/var/tmp")?;
    let lab = Lab::new(largest + 1)?;
    let registry = Registry::start_in(&lab, REGISTRY_HOST).await?;
    let images = cri_coldstart::push_images(&args.image, work.path(), &registry).await?;
    lab.shape(REGISTRY_HOST, args.rate_mbit, None)?;
    for host in 1..=largest {
        lab.shape(host, args.rate_mbit, Some(args.rate_mbit))?;
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    eprintln!(
        "CRI cold start on a cluster: {:.1} MiB image ({:.1} MiB as Shoal's), {} Mbit/s links, {:?} nodes",
        mib(images.image_bytes),
        mib(images.converted_bytes),
        args.rate_mbit,
        args.nodes
    );
    let logs = out.join("cri-cluster-logs");
    // What one start reads: a single node starting the image lazily, as cri-coldstart's (3).
    let image = format!("{}/{REPO}:v1-shoal", registry.host());
    let setup = NodeSetup { agent: true, lazy: true, peer: None };
    let node = Node::start_with(&lab, 1, &setup, &registry, &images.sandbox).await?;
    let single = cri_coldstart::start(&node, &registry, &image, &images.app, "cluster-single").await;
    node.save_logs(&logs, "single")?;
    let single = single.with_context(|| format!("the single-node lazy start (logs in {})", logs.display()))?;
    drop(node);
    eprintln!("  one node, lazy: {:.2} s to the first line, {:.1} MiB from the registry", single.seconds, mib(single.registry_bytes));
    let mut sizes = Vec::new();
    for &n in &args.nodes {
        let mut modes = Vec::new();
        for &mode in &args.modes {
            let result = cluster_start(&lab, n, mode, &registry, &images, &logs).await?;
            eprintln!(
                "  {n} nodes, {}: every first line in {:.2} s (median {:.2} s), {:.1} MiB from the registry",
                mode.label(),
                result.max_seconds(),
                result.median_seconds(),
                mib(result.registry_bytes)
            );
            modes.push((mode, result));
        }
        sizes.push((n, modes));
    }
    report(&args, out, &images, &single, &sizes)
}

/// The lazy start's time may grow by at most this fraction from the smallest cluster to the
/// largest.
const TARGET_TIME_SPREAD: f64 = 0.2;
/// The registry may send at most this many times the bytes one start reads, however many
/// nodes start.
const TARGET_EGRESS: f64 = 1.1;

/// Writes `cri-cluster.{json,md,png}` under `out`.
fn report(args: &Args, out: &Path, images: &Images, single: &Start, sizes: &[(usize, Vec<(Mode, ClusterStart)>)]) -> anyhow::Result<()> {
    let mib = |b: f64| b / 1048576.0;
    let one = single.registry_bytes.max(1) as f64;
    let lazy_max = |modes: &[(Mode, ClusterStart)]| modes.iter().find(|(m, _)| *m == Mode::Lazy).map(|(_, r)| r.max_seconds());
    let spread = match (sizes.first().and_then(|(_, m)| lazy_max(m)), sizes.last().and_then(|(_, m)| lazy_max(m))) {
        (Some(first), Some(last)) if sizes.len() > 1 => last / first - 1.0,
        _ => f64::NAN,
    };
    let json_sizes: Vec<serde_json::Value> = sizes
        .iter()
        .map(|(n, modes)| {
            let mut by_mode = serde_json::Map::new();
            for (mode, r) in modes {
                by_mode.insert(
                    mode.key().into(),
                    serde_json::json!({
                        "label": mode.label(),
                        "seconds": r.seconds,
                        "pull_seconds": r.pull_seconds,
                        "max_seconds": r.max_seconds(),
                        "median_seconds": r.median_seconds(),
                        "registry_bytes": r.registry_bytes,
                        "registry_requests": r.registry_requests,
                        "registry_bytes_over_one_start": r.registry_bytes as f64 / one,
                        "node_dirs": r.node_dirs,
                    }),
                );
            }
            serde_json::json!({ "nodes": n, "modes": by_mode })
        })
        .collect();
    let app = &images.app;
    let json = serde_json::json!({
        "scenario": "cri-cluster",
        "machine": machine(),
        "rate_mbit": args.rate_mbit,
        "image": {
            "base": app.description,
            "entrypoint": app.entrypoint,
            "first_line": app.first_line,
            "bytes": images.image_bytes,
            "shoal_bytes": images.converted_bytes,
            "bootstrap_bytes": images.bootstrap_bytes,
            "unpacked_bytes": app.unpacked_bytes,
            "unread_bytes": app.unread_bytes,
        },
        "single_lazy_start": single.json(),
        "targets": { "lazy_max_seconds_spread": TARGET_TIME_SPREAD, "lazy_registry_bytes_over_one_start": TARGET_EGRESS },
        "lazy_max_seconds_spread": spread,
        "sizes": json_sizes,
    });
    let (first_n, last_n) = (sizes.first().map_or(0, |s| s.0), sizes.last().map_or(0, |s| s.0));
    let mut md = format!(
        "### Cold start through containerd's CRI on a cluster: every node starts the same pod at once ({} Mbit/s links)\n\n\
         Targets: Shoal lazy's time until every container printed its first line flat within {:.0}% from 8 to 32 nodes \
         (measured here from {first_n} to {last_n}: {:+.0}%); registry egress ≤ {TARGET_EGRESS}× the bytes one start reads \
         ({:.1} MiB, a single-node lazy start in the same run, {:.2} s to its first line).\n\n\
         | nodes | how the nodes start the pod | every first line (max) | median | registry bytes | × one start's |\n|---|---|---|---|---|---|\n",
        args.rate_mbit,
        TARGET_TIME_SPREAD * 100.0,
        spread * 100.0,
        mib(one),
        single.seconds,
    );
    let over_floor: Vec<String> = sizes
        .iter()
        .filter_map(|(n, modes)| {
            let of = |mode: Mode| modes.iter().find(|(m, _)| *m == mode).map(|(_, r)| r.max_seconds());
            Some(format!("{:+.2} s at {n} nodes", of(Mode::Lazy)? - of(Mode::Local)?))
        })
        .collect();
    for (n, modes) in sizes {
        for (mode, r) in modes {
            md.push_str(&format!(
                "| {n} | {} | {:.2} s | {:.2} s | {:.1} MiB | {:.2}× |\n",
                mode.label(),
                r.max_seconds(),
                r.median_seconds(),
                mib(r.registry_bytes as f64),
                r.registry_bytes as f64 / one
            ));
        }
    }
    if !over_floor.is_empty() {
        md.push_str(&format!(
            "\nShoal lazy's every-first-line time over the floor's (what getting the image lazily adds to starting the containers): {}.\n",
            over_floor.join(", ")
        ));
    }
    md.push_str(&format!(
        "\nThe image: {}, plus {:.0} MiB of data files it never reads; {:.1} MiB unpacked, {:.1} MiB as pushed (gzip layers), {:.1} MiB as converted by `shoal build`. \
         Each node runs containerd with CRI and a Shoal agent (P2P on, one scheduler for the cluster; for the lazy rows its snapshotter), fresh for every row; \
         the registry's uplink and every node's link are shaped. The pods' sandboxes run first, untimed, then the page cache is dropped and every node starts the image at once; \
         times run from then to each container's first line (containerd's log timestamp). \
         Registry bytes: what docker-registry's access log says it sent from then until it went quiet after the containers exited. \
         A lazy mount reads its chunks through its agent, which gets each piece from a node holding it, or, for the one node the scheduler sends there, from the registry; the bootstrap comes whole, peer to peer like any blob. \
         The floor rows pull the ordinary image on every node first (untimed), so their time is containerd and runc starting that many containers at once on this machine ({} CPUs), which no way of getting the image can beat.\n",
        app.description,
        mib(app.unread_bytes as f64),
        mib(app.unpacked_bytes as f64),
        mib(images.image_bytes as f64),
        mib(images.converted_bytes as f64),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    ));
    let groups: Vec<String> = sizes.iter().map(|(n, _)| format!("{n} nodes")).collect();
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    let mut series = Vec::new();
    for &mode in &args.modes {
        let pick = |f: &dyn Fn(&ClusterStart) -> f64| -> Vec<f64> {
            sizes.iter().map(|(_, modes)| modes.iter().find(|(m, _)| *m == mode).map_or(f64::NAN, |(_, r)| f(r))).collect()
        };
        series.push((format!("{}: every first line", mode.key()), pick(&|r| r.max_seconds() / single.seconds)));
        series.push((format!("{}: registry bytes", mode.key()), pick(&|r| r.registry_bytes as f64 / one)));
    }
    let title = format!("Cold start through CRI on N nodes at once, {} Mbit/s: relative to one node's lazy start", args.rate_mbit);
    plot::ratio_bars(&out.join("cri-cluster.png"), &title, "relative to one lazy start", &groups, &series, Some(TARGET_EGRESS), true)?;
    write(out, "cri-cluster", &json, &md)
}
