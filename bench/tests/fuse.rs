//! The lazy-loading benchmark end to end at toy size, without Nydus: every way of mounting with
//! `shoal mount`, natively, and under a container's overlayfs. Checks behaviour (a complete
//! report, the same bytes as the native tree, the plot written), not speed.

mod common;

#[test]
fn a_tiny_fuse_run_reports_every_mode_and_the_container_view() {
    let (out, _, run) = common::run_bench(&["fuse", "--big-mib", "8", "--small-files", "50", "--runs", "1", "--no-nydus"]);
    // The harness compares every system's tree with the native one and fails the run on a difference.
    assert!(run.status.success(), "the benchmark failed: {}", String::from_utf8_lossy(&run.stderr));

    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("fuse.json")).unwrap()).unwrap();
    assert_eq!(json["scenario"], "fuse");
    for system in ["native", "shoal", "shoal-merged", "shoal-one-mount", "shoal-plain"] {
        let s = &json["systems"][system];
        for measure in ["big_median_seconds", "small_median_seconds", "small_by_path_median_seconds"] {
            for state in ["cold", "local", "warm"] {
                let t = s[measure][state].as_f64().unwrap_or(f64::NAN);
                assert!(t.is_finite() && t > 0.0, "{system} {measure} {state}: {t}");
            }
        }
        let container = s["container_warm_seconds"]["small_by_path"].as_array().map(Vec::len);
        assert_eq!(container, Some(1), "{system}: {s}");
    }
    // The default mount was EROFS; the merged one merged two FUSE mounts, and its large file
    // was read by passthrough.
    assert_eq!(json["systems"]["shoal"]["last_mount_stats"]["mode"], "erofs");
    let stats = &json["systems"]["shoal-merged"]["last_mount_stats"];
    assert_eq!((&stats["mode"], &stats["mounts"]), (&serde_json::json!("merged"), &serde_json::json!(2)), "{stats}");
    assert_eq!(stats["passthrough"], "on", "{stats}");
    assert_eq!(json["systems"]["shoal-plain"]["last_mount_stats"]["mounts"], 1);
    let md = std::fs::read_to_string(out.path().join("fuse.md")).unwrap();
    assert!(md.contains("| shoal |") && md.contains("container"), "{md}");
    assert!(std::fs::metadata(out.path().join("fuse.png")).unwrap().len() > 0);
}
