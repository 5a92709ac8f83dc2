//! The CRI cluster benchmark end to end at toy size: three nodes start a busybox image with a
//! few MiB of generated files at once, lazily and through the mirror. Checks behaviour (every
//! node's container prints its line, the report has every row and its targets, nothing is left
//! behind), not speed.

mod common;

#[test]
fn three_nodes_start_the_pod_at_once_lazily_and_through_the_mirror() {
    let (out, pid, run) =
        common::run_bench(&["cri-cluster", "--nodes", "3", "--base", "busybox", "--unread-mib", "16", "--rate-mbit", "200"]);
    // The harness fails the run when any container prints anything but the image's line first,
    // or exits with an error.
    assert!(run.status.success(), "the benchmark failed: {}", String::from_utf8_lossy(&run.stderr));

    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("cri-cluster.json")).unwrap()).unwrap();
    assert_eq!(json["scenario"], "cri-cluster");
    assert_eq!(json["image"]["first_line"], "ready busybox");
    let single = json["single_lazy_start"]["registry_bytes"].as_u64().unwrap();
    assert!(single > 0, "the single-node lazy start read from the registry: {json}");
    let sizes = json["sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 1);
    assert_eq!(sizes[0]["nodes"], 3);
    for mode in ["lazy", "mirror"] {
        let row = &sizes[0]["modes"][mode];
        let seconds = row["seconds"].as_array().unwrap_or_else(|| panic!("{mode}: {json}"));
        assert_eq!(seconds.len(), 3, "{mode}: one first line per node: {row}");
        for t in seconds {
            let t = t.as_f64().unwrap();
            assert!(t.is_finite() && t > 0.0, "{mode}: {t} s to a first line");
        }
        assert!(row["registry_bytes"].as_u64().unwrap() > 0, "{mode}: the registry sent nothing: {row}");
    }

    let md = std::fs::read_to_string(out.path().join("cri-cluster.md")).unwrap();
    for text in ["Shoal snapshotter, lazy", "through the Shoal mirror", "within 20%", "1.1×"] {
        assert!(md.contains(text), "the table lacks {text:?}:\n{md}");
    }
    let png = std::fs::read(out.path().join("cri-cluster.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "the plot is not a PNG");

    // Nothing of the run is left: no namespace, no mount of its agents or containerds, no
    // process of its nodes.
    let mut dirs: Vec<String> =
        json["single_lazy_start"]["node_dirs"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().into()).collect();
    for mode in ["lazy", "mirror"] {
        dirs.extend(sizes[0]["modes"][mode]["node_dirs"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()));
    }
    assert!(dirs.len() >= 3 + 2 * 3 * 3, "every node names its directories: {dirs:?}");
    common::assert_nothing_left(pid, &dirs);
}
