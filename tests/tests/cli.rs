//! The `shoal` command line: `get`, the default config, graceful shutdown.

use std::process::Command;

use shoal_tests::{digest_of, random_bytes, shoal_bin, Agent, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_writes_an_image_as_an_oci_layout_and_a_blob_to_a_file() {
    let registry = Registry::start(None).await.unwrap();
    registry.push_image("team/app", "v2", &[("/a.bin", random_bytes(3 << 20, 4))]).await.unwrap();
    let blobs = registry.image_blobs("team/app", "v2").await.unwrap();
    let out = tempfile::tempdir().unwrap();

    // In-process engine (no agent running at the default address is required: --no-agent).
    let layout = out.path().join("layout");
    let data = out.path().join("data");
    let status = Command::new(shoal_bin())
        .args(["get", "--no-agent", &format!("{}/team/app:v2", registry.host()), "-o"])
        .arg(&layout)
        .env("SHOAL_DATA_DIR", &data)
        .status()
        .unwrap();
    assert!(status.success());
    for (digest, size) in &blobs {
        let bytes = std::fs::read(layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))).unwrap();
        assert_eq!((bytes.len() as u64, digest_of(&bytes)), (*size, digest.clone()));
    }
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "v2");
    // skopeo reads what we wrote: it is a valid OCI layout.
    let inspect = Command::new("skopeo").arg("inspect").arg(format!("oci:{}:v2", layout.display())).output().unwrap();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));

    // Through a running agent's mirror.
    let agent = Agent::start("").await.unwrap();
    let (layer, _) = blobs.last().unwrap();
    let file = out.path().join("layer.tar.gz");
    let url = format!("{}/v2/team/app/blobs/{layer}", registry.url());
    let status =
        Command::new(shoal_bin()).args(["get", "--mirror", &format!("127.0.0.1:{}", agent.port), &url, "-o"]).arg(&file).status().unwrap();
    assert!(status.success());
    assert_eq!(&digest_of(&std::fs::read(&file).unwrap()), layer);
    agent.wait_stored(layer).await.expect("the blob must have gone through the agent");

    // A blob that does not exist is a clear failure, not a file.
    let missing = format!("{}/v2/team/app/blobs/{}", registry.url(), digest_of(b"nope"));
    let out_file = out.path().join("missing");
    let o =
        Command::new(shoal_bin()).args(["get", "--no-agent", &missing, "-o"]).arg(&out_file).env("SHOAL_DATA_DIR", &data).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("404"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out_file.exists());
}

#[test]
fn printed_default_config_is_what_the_agent_loads() {
    let out = Command::new(shoal_bin()).args(["agent", "--print-default-config"]).output().unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shoal.toml");
    std::fs::write(&path, &out.stdout).unwrap();
    // The printed file starts an agent as is; environment variables override it.
    let port = shoal_tests::free_port();
    let log = dir.path().join("agent.log");
    let mut child = Command::new(shoal_bin())
        .args(["agent", "--config"])
        .arg(&path)
        .env("SHOAL_MIRROR__LISTEN", format!("127.0.0.1:{port}"))
        .env("SHOAL_ADMIN__ENABLED", "false")
        .env("SHOAL_DATA_DIR", dir.path().join("data"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed().as_secs() < 20, "agent did not listen: {}", std::fs::read_to_string(&log).unwrap_or_default());
        assert!(child.try_wait().unwrap().is_none(), "agent exited: {}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(!std::fs::read_to_string(&log).unwrap().contains("admin endpoint listening"));
    // A config that parses is accepted by a start; a broken one is refused with the reason.
    std::fs::write(dir.path().join("bad.toml"), "[mirror]\nlisten_on = 1\n").unwrap();
    let bad = Command::new(shoal_bin()).args(["agent", "--config"]).arg(dir.path().join("bad.toml")).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("listen_on"), "{}", String::from_utf8_lossy(&bad.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:65001\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_agent_cleanly() {
    let registry = Registry::start(None).await.unwrap();
    let digest = registry.push_blob("team/t", &random_bytes(1 << 20, 2)).await.unwrap();
    let mut agent = Agent::start("").await.unwrap();
    let body = reqwest::get(agent.blob_url(&registry, "team/t", &digest)).await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);
    let metrics = agent.metrics().await.unwrap();
    assert!(metrics.contains("shoal_origin_bytes_total"), "{metrics}");
    let status = agent.terminate().unwrap();
    assert!(status.success(), "agent exited with {status}");
    assert!(agent.log().contains("agent stopped"));
}
