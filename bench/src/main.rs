//! Shoal's benchmark harness. Every figure comes from a run of this binary, measured side by side
//! with its baselines on the same machine in the same run, and is written to `bench/results/` as
//! JSON and a Markdown table.
//!
//! `cargo run --release -p shoal-bench -- mirror` or `-- fanout --nodes 8` (build the agent first:
//! `cargo build --release -p shoal`). Run as root: scenarios make network namespaces.

mod fanout;
mod mirror;
mod report;

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
    /// Fan-out: N nodes in network namespaces with shaped links pull one blob at once, Shoal
    /// against every node pulling from the registry, with the Kumar–Ross lower bound.
    Fanout(fanout::Args),
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Mirror(args) => mirror::run(args, &cli.out).await,
        Scenario::Fanout(args) => fanout::run(args, &cli.out).await,
    }
}
