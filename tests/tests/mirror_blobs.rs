//! The mirror's blob path against a real registry: singleflight, ranges, bad requests.

use futures_util::future::join_all;
use shoal_tests::{digest_of, random_bytes, Agent, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_a_cold_blob_make_one_origin_fetch() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(48 << 20, 7);
    let digest = registry.push_blob("team/big", &blob).await.unwrap();
    let agent = Agent::start("").await.unwrap();
    let url = agent.blob_url(&registry, "team/big", &digest);
    let http = reqwest::Client::new();
    let bodies = join_all((0..32).map(|_| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let resp = http.get(&url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.bytes().await.unwrap()
        }
    }))
    .await;
    for body in &bodies {
        assert_eq!(body.len(), blob.len());
        assert_eq!(digest_of(body), digest);
    }
    let fetches = registry.blob_fetches(&digest);
    assert_eq!(fetches.len(), 1, "32 requests made {} origin fetches: {fetches:?}", fetches.len());
    assert_eq!(registry.blob_bytes(&digest), blob.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_and_head_answer_from_the_blob() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(5 << 20, 3);
    let digest = registry.push_blob("team/r", &blob).await.unwrap();
    let agent = Agent::start("").await.unwrap();
    let url = agent.blob_url(&registry, "team/r", &digest);
    let http = reqwest::Client::new();

    let head = http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], blob.len().to_string().as_str());
    assert_eq!(head.headers()["docker-content-digest"], digest.as_str());

    // A range of a cold blob: only the pieces covering it come from the origin.
    let part = http.get(&url).header("Range", "bytes=3000000-3000099").send().await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], format!("bytes 3000000-3000099/{}", blob.len()).as_str());
    assert_eq!(&part.bytes().await.unwrap()[..], &blob[3_000_000..3_000_100]);
    assert!(registry.blob_bytes(&digest) < blob.len() as u64, "a small range must not fetch the whole blob");

    let whole = http.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&whole), digest);
    let tail = http.get(&url).header("Range", "bytes=-10").send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&tail[..], &blob[blob.len() - 10..]);
    let bad = http.get(&url).header("Range", format!("bytes={}-", blob.len())).send().await.unwrap();
    assert_eq!(bad.status(), 416);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_registry_style_errors_and_the_agent_keeps_serving() {
    let registry = Registry::start(None).await.unwrap();
    let digest = registry.push_blob("team/ok", b"fine").await.unwrap();
    let agent = Agent::start("").await.unwrap();
    let http = reqwest::Client::new();
    let ns = format!("?ns={}", registry.host());
    let m = agent.mirror();
    let cases = [
        (format!("{m}/v2/team/ok/blobs/sha256:1234{ns}"), 400, "DIGEST_INVALID"),
        (format!("{m}/v2/team/ok/blobs/md5:abcd{ns}"), 400, "DIGEST_INVALID"),
        (format!("{m}/v2/team/a..b/blobs/{digest}{ns}"), 400, "NAME_INVALID"),
        (format!("{m}/v2/Team/blobs/{digest}{ns}"), 400, "NAME_INVALID"),
        (format!("{m}/v2/team/ok/manifests/bad%20tag{ns}"), 400, "TAG_INVALID"),
        (format!("{m}/v2/team/ok/blobs/{digest}"), 400, "UNKNOWN_REGISTRY"),
        (format!("{m}/v2/team/ok/blobs/{digest}?ns=evil.example%2Fx"), 400, "UNKNOWN_REGISTRY"),
        (format!("{m}/v2/team/ok/tags/list{ns}"), 404, "NOT_FOUND"),
        (format!("{m}/../../etc/passwd"), 404, "NOT_FOUND"),
    ];
    for (url, status, code) in cases {
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{url}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], code, "{url}: {body}");
    }
    // Encoded dot segments reach the agent as they are (a URL library would resolve them away).
    for path in [format!("/v2/team/%2e%2e/%2e%2e/blobs/{digest}{ns}"), format!("/v2/team/..%2f..%2fetc/blobs/{digest}{ns}")] {
        let (status, body) = raw_get(agent.port, &path).await;
        assert_eq!(status, 400, "{path}");
        assert!(body.contains("NAME_INVALID"), "{path}: {body}");
    }
    let put = http.put(format!("{m}/v2/team/ok/manifests/v1{ns}")).body("{}").send().await.unwrap();
    assert_eq!(put.status(), 405);
    let missing = http.get(agent.blob_url(&registry, "team/ok", &digest_of(b"absent"))).send().await.unwrap();
    assert_eq!(missing.status(), 404, "an unknown blob is the origin's 404");
    let ok = http.get(agent.blob_url(&registry, "team/ok", &digest)).send().await.unwrap();
    assert_eq!(ok.bytes().await.unwrap().as_ref(), b"fine");
}

/// A GET sent byte for byte, so the path reaches the agent unnormalised.
async fn raw_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checked_range_found_bad_is_forgotten_and_the_whole_blob_then_verifies() {
    use shoal_core::config::CHECKED_RANGES_HEADER;
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(1 << 20, 11);
    let digest = registry.push_blob("team/bad", &blob).await.unwrap();
    // The registry's copy has a wrong byte in the first piece.
    let stored = registry.blob_data_path(&digest);
    let mut damaged = blob.clone();
    damaged[100] ^= 0xff;
    std::fs::write(&stored, &damaged).unwrap();
    let agent = Agent::start("").await.unwrap();
    let url = agent.blob_url(&registry, "team/bad", &digest);
    let http = reqwest::Client::new();
    let range = |fresh: bool| {
        let mut req = http.get(&url).header("Range", "bytes=0-999").header(CHECKED_RANGES_HEADER, "blake3");
        if fresh {
            req = req.header("Cache-Control", "no-cache");
        }
        req.send()
    };

    // A lazy mount reads the range, kept by the agent, and finds it bad.
    let got = range(false).await.unwrap().bytes().await.unwrap();
    assert!(got == damaged[..1000], "the agent serves what the registry sent");
    // It asks again with no-cache once the registry is repaired: the agent forgets the bad piece.
    std::fs::write(&stored, &blob).unwrap();
    let got = range(true).await.unwrap().bytes().await.unwrap();
    assert!(got == blob[..1000], "a no-cache range comes from the registry");
    let got = range(false).await.unwrap().bytes().await.unwrap();
    assert!(got == blob[..1000], "the forgotten piece was fetched again");
    // A whole pull of the blob verifies: nothing of the forgotten bytes stayed in its digest check.
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let whole = resp.bytes().await.unwrap_or_else(|e| panic!("the whole pull broke off: {e}\n{}", agent.log()));
    assert_eq!(digest_of(&whole), digest, "{}", agent.log());
    agent.wait_stored(&digest).await.unwrap();
    let metrics = agent.metrics().await.unwrap();
    assert_eq!(shoal_tests::metric_value(&metrics, "shoal_pieces_forgotten_total"), Some(1.0), "{metrics}");
    assert_eq!(shoal_tests::metric_value(&metrics, "shoal_tasks_failed_total"), Some(0.0), "{metrics}");
}
