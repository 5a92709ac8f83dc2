//! Shoal's benchmark harness. Every figure comes from a run of this binary, measured side by side
//! with its baselines on the same machine in the same run, and is written to `bench/results/` as
//! JSON and a Markdown table.
//!
//! `cargo run --release -p shoal-bench -- mirror`, `-- fanout --nodes 8`, `-- scaling`, `-- fuse`,
//! `-- coldstart`, `-- cri-coldstart`, `-- cri-cluster` or `-- datapath` (build the agent first: `cargo build --release -p shoal`).
//! Run as root: scenarios make network namespaces, mount filesystems and drop the page cache.
//! Ctrl-C tears everything down (namespaces, processes) before exiting.

mod bittorrent;
mod coldstart;
mod cri_cluster;
mod cri_coldstart;
mod datapath;
mod fanout;
mod fuse;
mod mirror;
mod nginx;
mod plot;
mod report;
mod scaling;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Benchmark Shoal against baselines on this machine")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Where results go.
    #[arg(long, global = true, default_value = "bench/results")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum Scenario {
    /// Mirror throughput: cache hits vs nginx serving the same file, cold misses vs pulling straight
    /// from the registry, and 64 concurrent pulls (throughput and agent memory).
    Mirror(mirror::Args),
    /// Fan-out: N nodes in network namespaces with shaped links pull one blob, Shoal against
    /// every node pulling from the registry, a central pull-through cache and BitTorrent, with the
    /// Kumar–Ross lower bound. `--stagger-ms` for rolling arrivals, `--preheat` for a warmed seed.
    Fanout(fanout::Args),
    /// Scaling: the fan-out scenario for N = 4, 8, 16, 32, 64 (`--sizes`), and completion / bound against N.
    Scaling(scaling::Args),
    /// Lazy-loading filesystem: one 512 MiB file and 2,000 small files read cold, local and warm
    /// through `shoal mount` with passthrough, without it, and from the native directory; plus
    /// `shoal build` time and output size.
    Fuse(fuse::Args),
    /// Cold start: a container's first reads from an image not on the node, over a shaped link:
    /// a full pull (fetch and unpack, then read) against `shoal mount` of the converted image.
    Coldstart(coldstart::Args),
    /// Cold start through containerd's CRI, as the kubelet starts a pod: PullImage to the
    /// container's first line and the registry's bytes, for containerd's own pull (from the
    /// registry, through the Shoal mirror) against Shoal's snapshotter starting the converted
    /// image lazily (and with prefetch learned from an earlier start on another node).
    CriColdstart(cri_coldstart::Args),
    /// The CRI cold start on N nodes at once (P2P on, one scheduler): time until every
    /// container printed its first line and the registry's bytes against one start's, for
    /// Shoal's snapshotter starting the converted image lazily and for containerd's pull
    /// through the Shoal mirror.
    CriCluster(cri_cluster::Args),
    /// The data path: one blob over unshaped links between network namespaces, as GiB/s and
    /// CPU-seconds per GiB of every process, for a cold miss, a cache hit and peer to peer,
    /// against curl from the registry, nginx (`sendfile`) and nginx over TLS.
    Datapath(datapath::Args),
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let out = cli.out.clone();
    let scenario = async move {
        match cli.scenario {
            Scenario::Mirror(args) => mirror::run(args, &out).await,
            Scenario::Fanout(args) => fanout::run(args, &out).await.map(|_| ()),
            Scenario::Scaling(args) => scaling::run(args, &out).await,
            Scenario::Fuse(args) => fuse::run(args, &out).await,
            Scenario::Coldstart(args) => coldstart::run_scenario(args, &out).await,
            Scenario::CriColdstart(args) => cri_coldstart::run_scenario(args, &out).await,
            Scenario::CriCluster(args) => cri_cluster::run_scenario(args, &out).await,
            Scenario::Datapath(args) => datapath::run(args, &out).await,
        }
    };
    // Scenarios block in places, so teardown on a signal does not wait for them: kill every
    // process the run started, delete its namespaces, and exit.
    tokio::spawn(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(t) => t.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminated => {}
        }
        eprintln!("interrupted: stopping everything the run started");
        let _ = std::process::Command::new("pkill").args(["-KILL", "-P", &std::process::id().to_string()]).status();
        cri_coldstart::stop_nodes_after_signal();
        shoal_tests::netns::Lab::cleanup_all_of_this_process();
        std::process::exit(130);
    });
    scenario.await
}
