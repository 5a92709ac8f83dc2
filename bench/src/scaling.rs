//! The scaling scenario: the fan-out scenario for several cluster sizes in one run, and how each
//! system's completion / bound grows with N (Shoal's target: flat within 10 % from 4 to 64).

use std::path::Path;

use crate::fanout::{self, percentile, FanoutResult, Outcome, System};
use crate::plot;
use crate::report::{machine, write};

#[derive(clap::Args)]
pub struct Args {
    /// Cluster sizes to run.
    #[arg(long = "sizes", value_delimiter = ',', default_values_t = [4usize, 8, 16, 32, 64])]
    sizes: Vec<usize>,
    /// Finish an interrupted run: a size whose `scaling-<N>.json` is already in the output
    /// directory, measured with the same blob size, rates and systems, is read back instead of
    /// measured again.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    fanout: fanout::Args,
}

/// The result of a size measured before with the same settings, from its JSON.
fn measured(out: &Path, a: &fanout::Args) -> anyhow::Result<Option<FanoutResult>> {
    let path = out.join(format!("{}.json", a.name.as_deref().unwrap_or_default()));
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let same = json["nodes"] == a.nodes
        && json["blob_bytes"] == (a.size_mib << 20) as u64
        && json["rate_mbit"] == a.rate_mbit
        && json["origin_mbit"] == a.origin_mbit.unwrap_or(a.rate_mbit);
    if !same {
        return Ok(None);
    }
    let mut outcomes = Vec::new();
    for &system in &a.systems {
        let Some(seconds) = json["systems"][system.key()]["seconds"].as_array() else { return Ok(None) };
        let mut seconds: Vec<f64> = seconds.iter().filter_map(|v| v.as_f64()).collect();
        seconds.sort_by(f64::total_cmp);
        outcomes.push(Outcome::read_back(system, seconds));
    }
    let bound = json["bound_seconds"].as_f64().unwrap_or(f64::NAN);
    Ok(Some(FanoutResult { nodes: a.nodes, bound, outcomes }))
}

pub async fn run(args: Args, out: &Path) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for &n in &args.sizes {
        let mut a = args.fanout.clone();
        a.nodes = n;
        // Its own names, so a scaling run leaves the single fan-out results alone.
        a.name = Some(format!("scaling-{n}"));
        if args.resume {
            if let Some(r) = measured(out, &a)? {
                eprintln!("N={n}: read back from scaling-{n}.json");
                results.push(r);
                continue;
            }
        }
        results.push(fanout::run(a, out).await?);
    }
    let systems: Vec<System> = args.fanout.systems.clone();
    let mut md = format!(
        "### Scaling: one {} MiB blob to N nodes ({} Mbit/s links)\n\np100 / Kumar–Ross bound (p50 / bound in brackets) per cluster size:\n\n| system |",
        args.fanout.size_mib, args.fanout.rate_mbit
    );
    for r in &results {
        md.push_str(&format!(" N={} |", r.nodes));
    }
    md.push_str(" spread |\n|---|");
    md.push_str(&"---|".repeat(results.len() + 1));
    md.push('\n');
    let mut series = Vec::new();
    let mut json_systems = serde_json::Map::new();
    for s in &systems {
        let mut points = Vec::new();
        let mut line = format!("| {} |", s.label());
        for r in &results {
            if let Some(o) = r.outcomes.iter().find(|o| o.system == *s) {
                let p100 = percentile(&o.seconds, 100.0) / r.bound;
                let p50 = percentile(&o.seconds, 50.0) / r.bound;
                line.push_str(&format!(" {p100:.2}× ({p50:.2}×) |"));
                points.push((r.nodes, p100));
            } else {
                line.push_str(" – |");
            }
        }
        let (lo, hi) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
        line.push_str(&format!(" {:.0}% |\n", (hi / lo - 1.0) * 100.0));
        md.push_str(&line);
        json_systems.insert(
            s.key().to_string(),
            serde_json::json!(points.iter().map(|(n, r)| serde_json::json!({"nodes": n, "p100_over_bound": r})).collect::<Vec<_>>()),
        );
        series.push((s.label().to_string(), points));
    }
    md.push_str("\nSpread: how much the worst ratio exceeds the best across sizes.\n\n![scaling](scaling.png)\n");
    let json = serde_json::json!({
        "scenario": "scaling",
        "machine": machine(),
        "blob_bytes": args.fanout.size_mib << 20,
        "rate_mbit": args.fanout.rate_mbit,
        "sizes": args.sizes,
        "bounds": results.iter().map(|r| r.bound).collect::<Vec<_>>(),
        "systems": json_systems,
    });
    write(out, "scaling", &json, &md)?;
    plot::ratio_by_nodes(&out.join("scaling.png"), "p100 / lower bound against cluster size", &series)
}
