//! The cold-start benchmark end to end at toy size: a full pull and a lazy mount of one small
//! image over a shaped link. Checks behaviour (a complete report, the start files' bytes correct,
//! the lazy start fetching less than the image), not speed.

mod common;

#[test]
fn a_tiny_cold_start_reports_both_ways_and_the_lazy_one_fetches_less() {
    let (out, _, run) = common::run_bench(&["coldstart", "--unread-mib", "16", "--runs", "1", "--rate-mbit", "200"]);
    // The harness compares every start file with the image's and fails the run on a difference.
    assert!(run.status.success(), "the benchmark failed: {}", String::from_utf8_lossy(&run.stderr));

    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("coldstart.json")).unwrap()).unwrap();
    assert_eq!(json["scenario"], "coldstart");
    let image = json["image_bytes"].as_u64().unwrap();
    let start = json["start_read_bytes"].as_u64().unwrap();
    assert!(start > 0 && start < json["unpacked_bytes"].as_u64().unwrap());
    let full = json["full_pull"]["registry_bytes"].as_u64().unwrap();
    let lazy = json["lazy"]["registry_bytes"].as_u64().unwrap();
    assert!(full * 100 >= image * 99, "a full pull fetched {full} bytes of a {image}-byte image");
    assert!(lazy > 0 && lazy < full, "the lazy start fetched {lazy} bytes, the full pull {full}");
    for how in ["full_pull", "lazy"] {
        let t = json[how]["median"].as_f64().unwrap();
        assert!(t.is_finite() && t > 0.0, "{how}: {t}");
    }
    let md = std::fs::read_to_string(out.path().join("coldstart.md")).unwrap();
    assert!(md.contains("full pull") && md.contains("`shoal mount`"), "{md}");
}
