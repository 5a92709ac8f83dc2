//! The fan-out benchmark end to end at toy size: 3 shaped nodes, 16 MiB, every system. Checks
//! behaviour (a complete report, every copy correct), not speed.

mod common;

use std::process::Command;

#[test]
fn a_tiny_fanout_reports_every_system_and_every_node() {
    let (out, pid, run) =
        common::run_bench(&["fanout", "--nodes", "3", "--size-mib", "16", "--rate-mbit", "40", "--name", "tiny", "--timeout", "120"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    // The harness checks every copy's sha256 and fails the run on a wrong byte.
    assert!(run.status.success(), "the benchmark failed: {stderr}");

    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("tiny.json")).unwrap()).unwrap();
    assert_eq!(json["scenario"], "fanout");
    assert_eq!(json["nodes"], 3);
    assert_eq!(json["blob_bytes"], 16 << 20);
    let bound = json["bound_seconds"].as_f64().unwrap();
    // 16 MiB over 40 Mbit/s links: S/d_min = 3.36 s dominates.
    assert!((bound - 16.0 * 8.0 * 1048576.0 / 40e6).abs() < 1e-6, "bound {bound}");
    for system in ["shoal", "direct", "proxy", "bittorrent"] {
        let s = &json["systems"][system];
        let seconds: Vec<f64> =
            s["seconds"].as_array().unwrap_or_else(|| panic!("{system} has no seconds")).iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(seconds.len(), 3, "{system}: {seconds:?}");
        // Nobody beats the lower bound (allow shaping's burst).
        assert!(seconds.iter().all(|&t| t.is_finite() && t > 0.8 * bound), "{system}: {seconds:?} vs bound {bound}");
        assert!(seconds.windows(2).all(|w| w[0] <= w[1]), "{system}: not sorted");
        assert_eq!(s["p100"].as_f64().unwrap(), seconds[2]);
        assert!((s["p100_over_bound"].as_f64().unwrap() - seconds[2] / bound).abs() < 1e-9);
        let egress = s["origin_egress_per_blob"].as_f64().unwrap();
        assert!(egress >= 0.99, "{system}: the origin sent only {egress} of the blob");
        // Each node's link carried the blob in at least once.
        let bytes_in = s["node_bytes_in_per_blob"].as_f64().unwrap_or_else(|| panic!("{system} has no node_bytes_in_per_blob"));
        assert!((0.99..10.0).contains(&bytes_in), "{system}: a node's link carried {bytes_in} of the blob in");
        let busy = s["machine_busy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&busy), "{system}: busy {busy}");
    }
    // Every node pulling from the registry costs the registry the blob once per node.
    assert!((json["systems"]["direct"]["origin_egress_per_blob"].as_f64().unwrap() - 3.0).abs() < 0.01);
    assert!(json["systems"]["shoal"]["agent_peak_rss_bytes"].as_u64().unwrap() > 0);

    let md = std::fs::read_to_string(out.path().join("tiny.md")).unwrap();
    for label in ["Shoal (P2P)", "every node from the registry", "registry pull-through cache", "BitTorrent"] {
        assert!(md.contains(label), "the table lacks {label}:\n{md}");
    }
    let png = std::fs::read(out.path().join("tiny.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "the plot is not a PNG");
    for log in ["scheduler.log", "node-1.log", "node-2.log", "node-3.log"] {
        assert!(out.path().join("tiny-logs").join(log).exists(), "{log} missing");
    }
    // The lab is gone: no namespace or interface of the run is left (the kernel deletes a
    // namespace's interfaces in the background once its last process exits).
    let prefix = format!("sh{}x", pid % 100_000);
    let leftovers = || {
        let links = Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
        let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let all = String::from_utf8_lossy(&links.stdout).to_string() + &String::from_utf8_lossy(&netns.stdout);
        all.lines()
            .filter(|l| l.split_whitespace().any(|w| w.trim_end_matches(':').starts_with(&prefix)))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !leftovers().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(leftovers().is_empty(), "left behind: {:?}", leftovers());
}
