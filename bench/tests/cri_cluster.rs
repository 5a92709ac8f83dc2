//! The CRI cluster benchmark end to end at toy size: three nodes start a busybox image with a
//! few MiB of generated files at once, lazily and through the mirror. Checks behaviour (every
//! node's container prints its line, the report has every row and its targets, nothing is left
//! behind), not speed.

use std::process::{Command, Stdio};

#[test]
fn three_nodes_start_the_pod_at_once_lazily_and_through_the_mirror() {
    let out = tempfile::tempdir().unwrap();
    let bench = Command::new(env!("CARGO_BIN_EXE_shoal-bench"))
        .arg("--out")
        .arg(out.path())
        .args(["cri-cluster", "--nodes", "3", "--base", "busybox", "--unread-mib", "16", "--rate-mbit", "200"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = bench.id();
    let run = bench.wait_with_output().unwrap();
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
    let prefix = format!("sh{}x", pid % 100_000);
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout).into_owned();
    assert!(!netns.lines().any(|l| l.starts_with(&prefix)), "namespaces left: {netns}");
    let mut dirs: Vec<String> =
        json["single_lazy_start"]["node_dirs"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().into()).collect();
    for mode in ["lazy", "mirror"] {
        dirs.extend(sizes[0]["modes"][mode]["node_dirs"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()));
    }
    assert!(dirs.len() >= 3 + 2 * 3 * 3, "every node names its directories: {dirs:?}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    for line in mounts.lines() {
        let point = line.split(' ').nth(1).unwrap_or("");
        assert!(!dirs.iter().any(|d| point.starts_with(d.as_str())), "left mounted: {line}");
    }
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = String::from_utf8_lossy(&std::fs::read(entry.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        assert!(!dirs.iter().any(|d| cmdline.contains(d.as_str())), "left running: {cmdline}");
    }
}
