//! containerd pulls through the Shoal mirror from a real registry.

use shoal_tests::{random_bytes, Agent, Containerd, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_containerd_instances_pull_and_run_through_one_agent_and_the_registry_sends_each_blob_once() {
    let registry = Registry::start(None).await.unwrap();
    registry
        .push_image("team/app", "v1", &[("/data.bin", random_bytes(6 << 20, 1)), ("/hello.txt", b"hello from the top layer\n".to_vec())])
        .await
        .unwrap();
    let agent = Agent::start("").await.unwrap();
    let image = format!("{}/team/app:v1", registry.host());

    for round in 0..2 {
        let ctd = Containerd::start(&registry.host(), &agent.mirror()).await.unwrap();
        let out = ctd.pull(&image, None).unwrap();
        assert!(out.status.success(), "pull {round} failed: {}", String::from_utf8_lossy(&out.stderr));
        let printed = ctd.run(&image, &["/bin/busybox", "cat", "/hello.txt"]).unwrap();
        assert_eq!(printed, "hello from the top layer\n");
    }

    for (digest, size) in registry.image_blobs("team/app", "v1").await.unwrap() {
        let fetches = registry.blob_fetches(&digest);
        assert_eq!(fetches.len(), 1, "blob {digest} fetched {} times from the origin: {fetches:?}", fetches.len());
        assert_eq!(fetches[0].bytes, size, "blob {digest}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_registry_pull_works_with_credentials_and_fails_without_even_when_cached() {
    let registry = Registry::start(Some(("alice", "s3cret"))).await.unwrap();
    registry.push_image("private/app", "v1", &[("/secret.txt", b"top secret\n".to_vec())]).await.unwrap();
    let agent = Agent::start("").await.unwrap();
    let image = format!("{}/private/app:v1", registry.host());

    // A direct pull without credentials fails with 401; through Shoal it must fail the same way.
    let direct = Containerd::start(&registry.host(), &registry.url()).await.unwrap();
    let direct_out = direct.pull(&image, None).unwrap();
    assert!(!direct_out.status.success());
    let anon = Containerd::start(&registry.host(), &agent.mirror()).await.unwrap();
    let out = anon.pull(&image, None).unwrap();
    assert!(!out.status.success(), "an anonymous pull of a private image must fail");
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("401") || err.contains("unauthorized"), "unexpected error: {err}");

    let authed = Containerd::start(&registry.host(), &agent.mirror()).await.unwrap();
    let out = authed.pull(&image, Some("alice:s3cret")).unwrap();
    assert!(out.status.success(), "pull with credentials failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(authed.run(&image, &["/bin/busybox", "cat", "/secret.txt"]).unwrap(), "top secret\n");

    // Now every blob is in the agent's store: a client without credentials still gets nothing,
    // and neither does one with wrong credentials.
    let blobs = registry.image_blobs("private/app", "v1").await.unwrap();
    let http = reqwest::Client::new();
    for (digest, _) in &blobs {
        let url = agent.blob_url(&registry, "private/app", digest);
        let anon = http.get(&url).send().await.unwrap();
        assert_eq!(anon.status(), 401, "cached private blob {digest} served without credentials");
        assert!(anon.headers().contains_key("www-authenticate"), "the challenge must be passed back");
        let wrong = http.get(&url).basic_auth("alice", Some("wrong")).send().await.unwrap();
        assert_eq!(wrong.status(), 401, "cached private blob {digest} served with wrong credentials");
        let right = http.get(&url).basic_auth("alice", Some("s3cret")).send().await.unwrap();
        assert_eq!(right.status(), 200);
    }
    let again = Containerd::start(&registry.host(), &agent.mirror()).await.unwrap();
    assert!(!again.pull(&image, None).unwrap().status.success(), "anonymous pull of a cached private image must fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_still_pulls_from_the_registry_when_the_agent_is_down() {
    let registry = Registry::start(None).await.unwrap();
    registry.push_image("team/app", "v3", &[("/hello.txt", b"direct\n".to_vec())]).await.unwrap();
    let mut agent = Agent::start("").await.unwrap();
    let mirror = agent.mirror();
    agent.kill();
    let ctd = Containerd::start(&registry.host(), &mirror).await.unwrap();
    let image = format!("{}/team/app:v3", registry.host());
    let out = ctd.pull(&image, None).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ctd.run(&image, &["/bin/busybox", "cat", "/hello.txt"]).unwrap(), "direct\n");
}
