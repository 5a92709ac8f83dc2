//! Faults around the content store: a killed agent, a lying origin, a full quota, a full disk.

use std::time::Duration;

use shoal_tests::{digest_of, random_bytes, task_dir, wait_for, Agent, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_download_resumes_fetching_only_missing_pieces() {
    let registry = Registry::start(None).await.unwrap();
    let size = 256usize << 20;
    let blob = random_bytes(size, 11);
    let digest = registry.push_blob("team/huge", &blob).await.unwrap();
    drop(blob);
    // Slow the origin download so the kill lands mid-way.
    let mut agent = Agent::start("[download]\nrate_limit = \"64MiB\"\n").await.unwrap();
    let url = agent.blob_url(&registry, "team/huge", &digest);
    let first = tokio::spawn({
        let url = url.clone();
        async move {
            let Ok(resp) = reqwest::get(&url).await else {
                return;
            };
            let _ = resp.bytes().await;
        }
    });
    let task = task_dir(&digest);
    let meta = agent.data_dir().join("tasks").join(&task).join("meta.json");
    // Wait until some pieces are persisted, then kill -9.
    wait_for("pieces on disk", Duration::from_secs(30), || {
        std::fs::read_to_string(&meta).is_ok_and(|m| {
            let v: serde_json::Value = serde_json::from_str(&m).unwrap_or_default();
            v["bitmap"]["bits"].as_str().is_some_and(|b| b.len() > 8 && b.starts_with("ffff"))
        })
    })
    .await
    .unwrap();
    agent.kill();
    first.abort();
    // The registry logs a request when its connection ends.
    wait_for("the cut request in the registry log", Duration::from_secs(10), || !registry.blob_fetches(&digest).is_empty()).await.unwrap();
    let before = registry.blob_bytes(&digest);
    assert!(before < size as u64, "the first download must have been cut short ({before} bytes)");

    agent.restart().await.unwrap();
    let body = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(body.len(), size);
    assert_eq!(digest_of(&body), digest);
    let after = registry.blob_bytes(&digest) - before;
    let fetches = registry.blob_fetches(&digest);
    assert!(fetches.last().is_some_and(|h| h.status == 206), "the resumed fetch must be a range request: {fetches:?}");
    // Only what was missing came again (plus at most a few unsynced pieces).
    assert!(after <= size as u64 - before + (20 << 20), "resumed fetch took {after} bytes, {before} were already sent");
    assert!(after < size as u64, "the whole blob was fetched again");
    agent.wait_stored(&digest).await.unwrap();
    assert!(agent.stored_tasks().contains(&task));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_serving_wrong_bytes_gives_an_error_and_stores_nothing() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(3 << 20, 5);
    let digest = registry.push_blob("team/liar", &blob).await.unwrap();
    let data = registry.blob_data_path(&digest);
    let mut bad = blob.clone();
    bad[1 << 20] ^= 0xff;
    std::fs::write(&data, &bad).unwrap();

    let agent = Agent::start("").await.unwrap();
    let url = agent.blob_url(&registry, "team/liar", &digest);
    let result = match reqwest::get(&url).await {
        Ok(resp) => resp.bytes().await.map(|b| b.to_vec()),
        Err(e) => Err(e),
    };
    assert!(result.is_err(), "a blob that does not match its digest must not reach the client whole");
    let task = agent.data_dir().join("tasks").join(task_dir(&digest));
    wait_for("the bad task to be deleted", Duration::from_secs(5), || !task.exists()).await.unwrap();
    assert!(agent.log().contains("does not match its digest"), "the log must say why");

    std::fs::write(&data, &blob).unwrap();
    let body = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_quota_evicts_the_least_recently_used_blob() {
    let registry = Registry::start(None).await.unwrap();
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(15 << 20, 100 + i)).collect();
    let mut digests = vec![];
    for b in &blobs {
        digests.push(registry.push_blob("team/q", b).await.unwrap());
    }
    let agent = Agent::start("[store]\nquota = \"40MiB\"\nhigh_watermark = 0.9\nlow_watermark = 0.8\n").await.unwrap();
    for d in &digests {
        let body = reqwest::get(agent.blob_url(&registry, "team/q", d)).await.unwrap().bytes().await.unwrap();
        assert_eq!(&digest_of(&body), d);
        agent.wait_stored(d).await.unwrap();
    }
    let stored = agent.stored_tasks();
    assert!(!stored.contains(&task_dir(&digests[0])), "the oldest blob must be evicted: {stored:?}");
    assert!(stored.contains(&task_dir(&digests[1])) && stored.contains(&task_dir(&digests[2])), "{stored:?}");
    assert_eq!(agent.status().await.unwrap()["store"]["evictions"], 1);
    // The evicted blob is fetched again when asked for.
    let body = reqwest::get(agent.blob_url(&registry, "team/q", &digests[0])).await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&body), digests[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_larger_than_the_quota_streams_from_the_origin_with_a_clear_error() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(16 << 20, 9);
    let digest = registry.push_blob("team/big", &blob).await.unwrap();
    let agent = Agent::start("[store]\nquota = \"8MiB\"\n").await.unwrap();
    let body = reqwest::get(agent.blob_url(&registry, "team/big", &digest)).await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);
    assert!(agent.log().contains("store quota is 8388608 bytes"), "the log must say the quota is too small");
    assert!(agent.stored_tasks().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_streams_from_the_origin_and_leaves_the_store_consistent() {
    let registry = Registry::start(None).await.unwrap();
    let small = random_bytes(4 << 20, 21);
    let large = random_bytes(32 << 20, 22);
    let small_digest = registry.push_blob("team/disk", &small).await.unwrap();
    let large_digest = registry.push_blob("team/disk", &large).await.unwrap();
    let mut agent = Agent::start("").await.unwrap();
    // Put the data dir on a 16 MiB tmpfs: room for the small blob, not the large one.
    agent.kill();
    let data = agent.data_dir();
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let mount = Mount::tmpfs(&data, "16m");
    agent.restart().await.unwrap();

    let body = reqwest::get(agent.blob_url(&registry, "team/disk", &large_digest)).await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&body), large_digest, "a full disk must not break the pull");
    assert!(agent.log().contains("disk full"), "the log must say the disk is full");
    let body = reqwest::get(agent.blob_url(&registry, "team/disk", &small_digest)).await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&body), small_digest);
    agent.wait_stored(&small_digest).await.unwrap();
    assert!(!agent.stored_tasks().contains(&task_dir(&large_digest)));
    agent.kill();
    drop(mount);
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(at: &std::path::Path, size: &str) -> Mount {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot mount a tmpfs at {} (the tests run as root)", at.display());
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
