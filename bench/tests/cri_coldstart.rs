//! The CRI cold-start benchmark end to end at toy size: a busybox image with a few MiB of
//! generated files started through containerd's CRI every way. Checks behaviour (every row's
//! container prints its line, the lazy starts fetch less than the full pulls, the learned
//! prefetch happens, nothing is left behind), not speed.

mod common;

#[test]
fn a_tiny_cri_cold_start_runs_every_row_and_the_lazy_ones_fetch_less() {
    let (out, pid, run) = common::run_bench(&["cri-coldstart", "--base", "busybox", "--unread-mib", "16", "--rate-mbit", "200"]);
    // The harness fails the run when a container prints anything but the image's line first,
    // or exits with an error.
    assert!(run.status.success(), "the benchmark failed: {}", String::from_utf8_lossy(&run.stderr));

    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("cri-coldstart.json")).unwrap()).unwrap();
    assert_eq!(json["scenario"], "cri-coldstart");
    assert_eq!(json["image"]["first_line"], "ready busybox");
    let image = json["image"]["bytes"].as_u64().unwrap();
    let bytes = |row: &str| json["rows"][row]["starts"][0]["registry_bytes"].as_u64().unwrap_or_else(|| panic!("{row}: {json}"));
    for row in ["registry", "mirror", "lazy", "lazy_learned"] {
        let start = &json["rows"][row]["starts"][0];
        let (t, pull) = (start["seconds"].as_f64().unwrap(), start["pull_seconds"].as_f64().unwrap());
        assert!(t.is_finite() && t > 0.0 && pull <= t, "{row}: {t} s to the first line, PullImage {pull} s");
    }
    // A full pull fetches every layer; through the mirror too, once.
    for row in ["registry", "mirror"] {
        assert!(bytes(row) >= image && bytes(row) < image * 2, "{row} fetched {} bytes of a {image}-byte image", bytes(row));
    }
    for row in ["lazy", "lazy_learned"] {
        assert!(
            bytes(row) > 0 && bytes(row) < bytes("registry"),
            "{row} fetched {} bytes, the full pull {}",
            bytes(row),
            bytes("registry")
        );
        let stats = &json["rows"][row]["starts"][0]["mount_stats"];
        assert_eq!(stats.as_array().map(Vec::len), Some(1), "{row}: one lazy mount: {stats}");
    }
    assert_eq!(json["rows"]["lazy"]["starts"][0]["learned_prefetch"], false);
    assert_eq!(json["rows"]["lazy_learned"]["starts"][0]["learned_prefetch"], true, "(4) prefetched by the learned trace");
    assert_eq!(json["teaching_starts"].as_array().map(Vec::len), Some(1));

    let md = std::fs::read_to_string(out.path().join("cri-coldstart.md")).unwrap();
    for label in
        ["(1) containerd pulls from the registry", "(2) containerd pulls through the Shoal mirror", "(3) Shoal snapshotter, lazy", "(4)"]
    {
        assert!(md.contains(label), "the table lacks {label}:\n{md}");
    }
    assert!(md.contains("0.2×"), "the table states the target:\n{md}");
    let png = std::fs::read(out.path().join("cri-coldstart.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "the plot is not a PNG");

    // Nothing of the run is left: no namespace, no mount of its agents or containerds, no
    // process of its nodes.
    let rows = json["rows"].as_object().unwrap().values().flat_map(|r| r["starts"].as_array().unwrap().clone());
    let starts: Vec<serde_json::Value> = rows.chain(json["teaching_starts"].as_array().unwrap().clone()).collect();
    let dirs: Vec<String> =
        starts.iter().flat_map(|s| s["node_dirs"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string())).collect();
    assert!(dirs.len() >= 9, "every start names its node's directories: {dirs:?}");
    common::assert_nothing_left(pid, &dirs);
}
