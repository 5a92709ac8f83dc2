//! The data-path benchmark end to end at toy size: every path and baseline once. Checks
//! behaviour (a complete report, agent B's copy from agent A and not the registry, the plot
//! written), not speed.

mod common;

#[test]
fn a_tiny_datapath_run_times_and_costs_every_path() {
    let (out, pid, run) = common::run_bench(&["datapath", "--size-mib", "16", "--runs", "1"]);
    // The harness checks every download's size and status, that the cold miss cost the registry
    // the blob once, and that agent B got nothing from the registry; it fails the run otherwise.
    assert!(run.status.success(), "the benchmark failed: {}", String::from_utf8_lossy(&run.stderr));

    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("datapath.json")).unwrap()).unwrap();
    assert_eq!(json["scenario"], "datapath");
    assert_eq!(json["blob_bytes"], 16 << 20);
    for path in ["cold_miss", "registry_direct", "cache_hit", "nginx_local", "peer_to_peer", "nginx_tcp", "nginx_tcp_stored", "nginx_tls"] {
        let p = &json["paths"][path];
        let speed = p["gib_per_s"].as_f64().unwrap_or(f64::NAN);
        assert!(speed.is_finite() && speed > 0.0, "{path}: {p}");
        let seconds = p["seconds"].as_array().map(Vec::len);
        assert_eq!(seconds, Some(1), "{path}: {p}");
        // Something received the bytes, so some CPU went on it.
        let receiving = p["receiver_cpu_seconds"][0].as_f64().unwrap();
        let sending = p["sender_cpu_seconds"][0].as_f64().unwrap();
        assert!(receiving >= 0.0 && sending >= 0.0 && receiving + sending > 0.0, "{path}: {p}");
    }
    // The agents' CPU is counted: agent B receives and serves curl, agent A sends.
    assert!(json["paths"]["peer_to_peer"]["receiver_cpu_seconds"][0].as_f64().unwrap() > 0.0);
    assert!(json["paths"]["peer_to_peer"]["sender_cpu_seconds"][0].as_f64().unwrap() > 0.0);

    let md = std::fs::read_to_string(out.path().join("datapath.md")).unwrap();
    for text in ["peer → peer", "nginx on A", "TLS 1.3", "≥ 1 GiB/s", "cold miss"] {
        assert!(md.contains(text), "the table lacks {text:?}:\n{md}");
    }
    let png = std::fs::read(out.path().join("datapath.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "the plot is not a PNG");
    common::assert_nothing_left(pid, &[]);
}
