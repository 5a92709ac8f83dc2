//! `shoal`: one binary, roles as subcommands. Parses arguments, loads the config, calls the library
//! crates.

mod build;
mod get;
mod import;
mod learned;
mod logging;
mod mount;
mod preheat;
mod pull;
mod status;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use shoal_core::config::{Config, DEFAULT_CONFIG_TOML};
use tokio_util::sync::CancellationToken;

/// Shoal gets container images onto every node of a cluster fast. Run it on each node as
/// containerd's registry mirror.
#[derive(Parser)]
#[command(version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything one machine needs in one process, with no config file: the agent (registry
    /// mirror on 127.0.0.1:65001, admin on 127.0.0.1:65002), an embedded scheduler on
    /// 127.0.0.1:8002 and this host as the seed (peer server on 127.0.0.1:65003).
    Up(DaemonArgs),
    /// Run the node agent: the registry mirror containerd pulls through, and the admin endpoint.
    Agent(DaemonArgs),
    /// Run a seed: an agent that fetches tasks from origins for the children that ask, keeps
    /// them, and is chosen as a parent last once peers have the data. Needs [peer] schedulers.
    Seed(DaemonArgs),
    /// Run the scheduler: the gRPC service agents ask for parents (no database; state is rebuilt
    /// from announcements).
    Scheduler(DaemonArgs),
    /// Have seeds (or every host) fetch images before a rollout, with progress until done.
    Preheat(preheat::PreheatArgs),
    /// Show what the local agent is doing: store usage and downloads in progress.
    Status(status::StatusArgs),
    /// Download an image (as an OCI layout directory) or one blob (to a file) through Shoal.
    Get(get::GetArgs),
    /// Convert an image (in a registry, or a local OCI layout) for lazy loading: a bootstrap of
    /// its merged file tree plus chunk blobs, pushed as an ordinary OCI image (`<tag>-shoal`).
    #[command(after_help = build::EXAMPLES)]
    Build(build::BuildArgs),
    /// Mount an image converted by `shoal build` read-only (as root with the kernel's EROFS over
    /// a FUSE-served image file, else with FUSE); files are fetched chunk by chunk as they are
    /// read, through the local agent's mirror. Runs until SIGTERM or SIGINT.
    #[command(after_help = mount::EXAMPLES)]
    Mount(mount::MountArgs),
    /// Run the containerd snapshotter alone ([snapshotter] socket, default
    /// /run/shoal/snapshotter.sock; `[snapshotter] enabled` runs it inside the agent instead).
    /// Every image gets overlayfs snapshots; an image converted by `shoal build` is mounted
    /// lazily instead of downloaded and unpacked. containerd needs `[proxy_plugins.shoal]
    /// type = "snapshot" address = "<socket>"`, and CRI `snapshotter = "shoal"` with
    /// `disable_snapshot_annotations = false`.
    Snapshotter(DaemonArgs),
    /// Pull an image into this node's containerd as CRI does, for `ctr run` without a kubelet:
    /// an image converted by `shoal build` lazily (manifest and config only; its layers are
    /// prepared on Shoal's snapshotter, which mounts it), any other image downloaded through the
    /// local agent and unpacked.
    #[command(after_help = pull::EXAMPLES)]
    Pull(pull::PullArgs),
}

/// Options shared by the long-running roles.
#[derive(Args)]
struct DaemonArgs {
    /// Config file (TOML). Default: /etc/shoal/shoal.toml when it exists; every field is optional.
    #[arg(long, short, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    /// Print the default config, documented field by field, and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Load and check the config (file, environment, flags), print it in full, and exit.
    #[arg(long)]
    check_config: bool,
    /// Address to listen on: the registry mirror (overrides [mirror] listen), or for
    /// `shoal scheduler` its gRPC API (overrides [scheduler] listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address for /metrics, /healthz and /status (overrides [admin] listen).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// State directory (overrides data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log lines as JSON (overrides [log] format).
    #[arg(long)]
    json_logs: bool,
}

impl DaemonArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(l) = self.listen {
            config.mirror.listen = l;
        }
        if let Some(l) = self.admin_listen {
            config.admin.listen = l;
        }
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
        if self.json_logs {
            config.log.format = shoal_core::config::LogFormat::Json;
        }
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up(args).await,
            Command::Agent(args) => daemon(args, |_| {}).await,
            Command::Seed(args) => {
                daemon(args, |c| {
                    c.peer.enabled = true;
                    c.peer.seed = true;
                })
                .await
            }
            Command::Scheduler(args) => scheduler(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Get(args) => get::run(args).await,
            Command::Preheat(args) => preheat::run(args).await,
            Command::Build(args) => build::run(args).await,
            Command::Mount(args) => mount::run(args).await,
            Command::Snapshotter(args) => snapshotter(args).await,
            Command::Pull(args) => pull::run(args).await,
        }
    })
}

/// What every long-running role does first: print the default or the effective config when asked
/// (then `None`), else load the config, adjust it for the role, start logging and signal handling.
fn prepare(args: &DaemonArgs, role: impl FnOnce(&mut Config)) -> anyhow::Result<Option<(Config, CancellationToken)>> {
    if args.print_default_config {
        print!("{DEFAULT_CONFIG_TOML}");
        return Ok(None);
    }
    let mut config = args.load()?;
    role(&mut config);
    if args.check_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(None);
    }
    logging::init(&config.log);
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    Ok(Some((config, shutdown)))
}

async fn daemon(args: DaemonArgs, role: impl FnOnce(&mut Config)) -> anyhow::Result<()> {
    let Some((config, shutdown)) = prepare(&args, role)? else { return Ok(()) };
    run_agent(&args, config, shutdown).await
}

/// The agent, with the snapshotter beside it when `[snapshotter] enabled`; either ending
/// stops the other.
async fn run_agent(args: &DaemonArgs, config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let snapshotter = match config.snapshotter.enabled {
        true => Some(tokio::spawn(shoal_snapshotter::run(snapshotter_settings(args, &config)?, shutdown.clone()))),
        false => None,
    };
    let agent = shoal_agent::run(config, shutdown.clone()).await;
    shutdown.cancel();
    if let Some(s) = snapshotter {
        s.await.context("the snapshotter task")?.context("snapshotter")?;
    }
    agent?;
    Ok(())
}

/// The snapshotter's settings: its lazy mounts run this binary with this process's config.
fn snapshotter_settings(args: &DaemonArgs, config: &Config) -> anyhow::Result<shoal_snapshotter::Settings> {
    Ok(shoal_snapshotter::Settings {
        root: config.snapshotter.root(&config.data_dir),
        socket: config.snapshotter.socket.clone(),
        shoal: std::env::current_exe().context("finding the shoal binary for lazy mounts")?,
        config: args.config.clone(),
        env: vec![
            ("SHOAL_DATA_DIR".into(), config.data_dir.display().to_string()),
            ("SHOAL_MIRROR__LISTEN".into(), config.mirror.listen.to_string()),
        ],
        mount_timeout: std::time::Duration::from_secs(config.snapshotter.mount_timeout_seconds),
        mirror: config.mirror.listen.to_string(),
    })
}

async fn snapshotter(args: DaemonArgs) -> anyhow::Result<()> {
    let Some((config, shutdown)) = prepare(&args, |_| {})? else { return Ok(()) };
    shoal_snapshotter::run(snapshotter_settings(&args, &config)?, shutdown).await
}

/// `addr` with 127.0.0.1 for an unspecified IP: where the all-in-one node listens.
fn on_loopback(mut addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip([127, 0, 0, 1].into());
    }
    addr
}

/// The all-in-one node: scheduler, seed and agent in one process, all on loopback.
async fn up(args: DaemonArgs) -> anyhow::Result<()> {
    let Some((config, shutdown)) = prepare(&args, |config| {
        config.peer.enabled = true;
        config.peer.seed = true;
        config.peer.listen = on_loopback(config.peer.listen);
        config.scheduler.listen = on_loopback(config.scheduler.listen);
        if config.peer.schedulers.is_empty() {
            config.peer.schedulers = vec![config.scheduler.listen.to_string()];
        }
    })?
    else {
        return Ok(());
    };
    let scheduler_addr = config.scheduler.listen;
    let listener = tokio::net::TcpListener::bind(scheduler_addr)
        .await
        .with_context(|| format!("cannot listen on {scheduler_addr} for the embedded scheduler (change [scheduler] listen)"))?;
    tracing::info!(addr = %scheduler_addr, "embedded scheduler listening");
    let access = shoal_scheduler::service::access(&config.scheduler)?;
    let scheduler = tokio::spawn(shoal_scheduler::service::serve(listener, limits(&config), access, shutdown.clone()));
    let agent = run_agent(&args, config, shutdown.clone()).await;
    shutdown.cancel();
    let _ = scheduler.await;
    agent
}

fn limits(config: &Config) -> shoal_scheduler::parents::Limits {
    let s = &config.scheduler;
    shoal_scheduler::parents::Limits {
        max_parents: s.max_parents,
        max_depth: s.max_depth,
        max_back_to_source: s.max_back_to_source,
        enough_peers: s.enough_peers,
    }
}

async fn scheduler(args: DaemonArgs) -> anyhow::Result<()> {
    let listen = args.listen;
    let Some((config, shutdown)) = prepare(&args, |config| {
        if let Some(l) = listen {
            config.scheduler.listen = l;
        }
    })?
    else {
        return Ok(());
    };
    let access = shoal_scheduler::service::access(&config.scheduler)?;
    shoal_scheduler::service::run(config.scheduler.listen, limits(&config), access, shutdown).await?;
    Ok(())
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::warn!("cannot install signal handlers; stop the agent with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
