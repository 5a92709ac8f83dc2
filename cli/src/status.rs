//! `shoal status`: asks the local agent's admin endpoint what it is doing.

use clap::Args;
use shoal_agent::admin::Status;

#[derive(Args)]
pub struct StatusArgs {
    /// The agent's admin address.
    #[arg(long, default_value = "127.0.0.1:65002")]
    admin: String,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let url = format!("http://{}/status", args.admin);
    let resp = reqwest::get(&url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the agent at {url}: {e} (is `shoal agent` running? pass --admin)"))?;
    let text = resp.error_for_status()?.text().await?;
    if args.json {
        println!("{text}");
        return Ok(());
    }
    let s: Status = serde_json::from_str(&text)?;
    println!("shoal {}  mirror {}", s.version, s.mirror);
    println!(
        "store: {} of {} used, {} tasks ({} complete), {} evicted",
        human(s.store.used_bytes),
        human(s.store.quota_bytes),
        s.store.tasks,
        s.store.complete_tasks,
        s.store.evictions
    );
    if s.active.is_empty() {
        println!("no downloads in progress");
    }
    for t in s.active {
        println!("  {}  {}/{} pieces", t.task, t.pieces_done, t.pieces);
    }
    Ok(())
}

/// Bytes with a binary unit.
pub fn human(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
        if v < 1024.0 || unit == "TiB" {
            return if unit == "B" { format!("{bytes} B") } else { format!("{v:.1} {unit}") };
        }
        v /= 1024.0;
    }
    unreachable!()
}
