//! Registries over HTTPS: the system roots, an extra CA, and `insecure_skip_verify`.

use std::time::Duration;

use shoal_tests::{digest_of, random_bytes, wait_for, Agent, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_registries_need_a_trusted_certificate() {
    let registry = Registry::start_tls().await.unwrap();
    let blob = random_bytes(2 << 20, 8);
    let digest = registry.push_blob("team/tls", &blob).await.unwrap();
    let host = registry.host();

    // Loopback registries default to plain HTTP; this one speaks HTTPS with an unknown CA.
    let untrusted = Agent::start(&format!("[registry.\"{host}\"]\nplain_http = false\n")).await.unwrap();
    let resp = reqwest::get(untrusted.blob_url(&registry, "team/tls", &digest)).await.unwrap();
    assert_eq!(resp.status(), 502);
    let body = resp.text().await.unwrap();
    assert!(body.contains("certificate") || body.contains("UnknownIssuer"), "the error must name the certificate problem: {body}");

    let with_ca = Agent::start(&format!("[registry.\"{host}\"]\nplain_http = false\nca_file = \"{}\"\n", registry.ca_file().display()))
        .await
        .unwrap();
    let body = reqwest::get(with_ca.blob_url(&registry, "team/tls", &digest)).await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);

    let insecure = Agent::start(&format!("[registry.\"{host}\"]\nplain_http = false\ninsecure_skip_verify = true\n")).await.unwrap();
    let body = reqwest::get(insecure.blob_url(&registry, "team/tls", &digest)).await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_restarted_mid_download_is_resumed_where_it_broke() {
    let mut registry = Registry::start(None).await.unwrap();
    let size = 96usize << 20;
    let blob = random_bytes(size, 12);
    let digest = registry.push_blob("team/flaky", &blob).await.unwrap();
    let agent = Agent::start("[download]\nrate_limit = \"48MiB\"\nretries = 5\n").await.unwrap();
    let url = agent.blob_url(&registry, "team/flaky", &digest);
    let download = tokio::spawn(async move { reqwest::get(&url).await?.bytes().await });
    let meta = agent.data_dir().join("tasks").join(shoal_tests::task_dir(&digest)).join("meta.json");
    wait_for("some pieces", Duration::from_secs(20), || std::fs::read_to_string(&meta).is_ok_and(|m| m.contains("\"bits\":\"ff")))
        .await
        .unwrap();
    registry.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    registry.restart().await.unwrap();
    let body = download.await.unwrap().expect("the client's download must survive the origin restart");
    assert_eq!(body.len(), size);
    assert_eq!(digest_of(&body), digest);
    // The killed registry logged nothing; the restarted one sent only the rest, as a range.
    let fetches = registry.blob_fetches(&digest);
    let last = fetches.last().expect("a fetch after the restart");
    assert!(last.status == 206 && last.bytes < size as u64, "resumed, not restarted: {fetches:?}");
}
