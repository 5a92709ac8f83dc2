//! The mirror's manifest path against a real registry: tags always go upstream, digests are cached,
//! `Accept` is passed through so image indexes work, and `default_registry` serves requests
//! without `?ns=`.

use shoal_tests::{digest_of, Agent, Registry};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Pushes a manifest (or index) document under `reference` and returns its digest.
async fn put_manifest(registry: &Registry, repo: &str, reference: &str, media_type: &str, body: &str) -> String {
    let resp = reqwest::Client::new()
        .put(format!("{}/v2/{repo}/manifests/{reference}", registry.url()))
        .header("Content-Type", media_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    digest_of(body.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_go_upstream_digests_are_cached_and_indexes_pass_through() {
    let registry = Registry::start(None).await.unwrap();
    let config = registry.push_blob("team/m", b"{}").await.unwrap();
    let layer = registry.push_blob("team/m", b"layer").await.unwrap();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":5}}]}}"#
    );
    let manifest_digest = put_manifest(&registry, "team/m", "v1", OCI_MANIFEST, &manifest).await;
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{manifest_digest}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        manifest.len()
    );
    let index_digest = put_manifest(&registry, "team/m", "multi", OCI_INDEX, &index).await;

    let agent = Agent::start("").await.unwrap();
    let http = reqwest::Client::new();
    let url = |r: &str| format!("{}/v2/team/m/manifests/{r}?ns={}", agent.mirror(), registry.host());
    let upstream_gets =
        |r: &str| registry.hits().iter().filter(|h| h.method == "GET" && h.path == format!("/v2/team/m/manifests/{r}")).count();

    for _ in 0..2 {
        let resp = http.get(url("multi")).header("Accept", OCI_INDEX).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], OCI_INDEX);
        assert_eq!(resp.headers()["docker-content-digest"], index_digest.as_str());
        assert_eq!(resp.text().await.unwrap(), index);
    }
    assert_eq!(upstream_gets("multi"), 2, "a tag may move: it is never answered from cache");

    for _ in 0..3 {
        let resp = http.get(url(&manifest_digest)).header("Accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], OCI_MANIFEST);
        assert_eq!(resp.text().await.unwrap(), manifest);
    }
    assert!(upstream_gets(&manifest_digest) <= 1, "a manifest by digest is fetched once at most");

    let head = http.head(url("v1")).header("Accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["docker-content-digest"], manifest_digest.as_str());
    let missing = http.get(url("nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN", "the registry's own error is passed back");

    // With a default registry, requests without ?ns= go there.
    let defaulted = Agent::start(&format!("[mirror]\ndefault_registry = \"{}\"\n", registry.host())).await.unwrap();
    let resp = http.get(format!("{}/v2/team/m/blobs/{layer}", defaulted.mirror())).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"layer");
}
