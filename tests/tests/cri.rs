//! containerd's CRI, driven as the kubelet drives it, pulls through the Shoal mirror from a real
//! registry and runs a container of the image.

use std::time::Duration;

use shoal_tests::cri::push_sandbox_image;
use shoal_tests::{random_bytes, Agent, Containerd, CriConfig, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pulls_through_the_agent_runs_a_pod_and_leaves_nothing_mounted() {
    let registry = Registry::start(None).await.unwrap();
    registry
        .push_image("team/app", "v1", &[("/data.bin", random_bytes(4 << 20, 7)), ("/hello.txt", b"hello from the top layer\n".to_vec())])
        .await
        .unwrap();
    let sandbox_image = push_sandbox_image(&registry).await.unwrap();
    let agent = Agent::start("").await.unwrap();
    let ctd = Containerd::start_cri(&registry.host(), &agent.mirror(), &CriConfig::new(&sandbox_image)).await.unwrap();
    let cri = ctd.cri().await.unwrap();
    let image = format!("{}/team/app:v1", registry.host());

    let image_id = cri.pull_image(&image).await.unwrap();
    assert!(image_id.starts_with("sha256:"), "PullImage returned {image_id:?}, not an image id");
    let pod = cri.run_pod("app").await.unwrap();
    let container = cri.run_container(&pod, "cat", &image_id, &["/bin/busybox", "cat", "/hello.txt"]).await.unwrap();
    let code = cri.wait_exit(&container, Duration::from_secs(30)).await.unwrap();
    assert_eq!(code, 0, "the container exited with {code}: {}", cri.output(&container).unwrap_or_default());
    assert_eq!(cri.output(&container).unwrap(), "hello from the top layer\n");

    // The sandbox image came through the mirror too; each blob left the registry once.
    for (repo, tag) in [("team/app", "v1"), ("shoal-test/pause", "1")] {
        for (digest, size) in registry.image_blobs(repo, tag).await.unwrap() {
            let fetches = registry.blob_fetches(&digest);
            assert_eq!(fetches.len(), 1, "blob {digest} of {repo} fetched {} times from the origin: {fetches:?}", fetches.len());
            assert_eq!(fetches[0].bytes, size, "blob {digest} of {repo}");
        }
    }

    assert!(!ctd.mounts().is_empty(), "a running pod has its sandbox mounted under containerd's root");
    cri.remove_container(&container).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    cri.remove_image(&image_id).await.unwrap();
    assert_eq!(cri.pods().await.unwrap(), Vec::<String>::new());
    assert_eq!(ctd.mounts(), Vec::<String>::new(), "mounts left under containerd's root after removing the container, pod and image");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_is_timed_from_pull_image_to_the_containers_first_line() {
    let registry = Registry::start(None).await.unwrap();
    registry.push_image("team/app", "v2", &[("/hello.txt", b"first line\nsecond line\n".to_vec())]).await.unwrap();
    let sandbox_image = push_sandbox_image(&registry).await.unwrap();
    let agent = Agent::start("").await.unwrap();
    let ctd = Containerd::start_cri(&registry.host(), &agent.mirror(), &CriConfig::new(&sandbox_image)).await.unwrap();
    let cri = ctd.cri().await.unwrap();
    let pod = cri.run_pod("app").await.unwrap();

    let clock = std::time::Instant::now();
    let image = format!("{}/team/app:v2", registry.host());
    let start = cri.cold_start(&pod, "cat", &image, &["/bin/busybox", "cat", "/hello.txt"], Duration::from_secs(60)).await.unwrap();
    let elapsed = clock.elapsed();

    assert_eq!(start.first_line.text, "first line");
    assert_eq!(start.first_line.stream, "stdout");
    // The container cannot print before its image is pulled, nor after the call returned: the
    // log's timestamps and this clock agree.
    assert!(
        start.pull <= start.first_output,
        "first line {:?} after the start, before the pull ended ({:?})",
        start.first_output,
        start.pull
    );
    assert!(start.first_output <= elapsed, "first line {:?} after the start, but the call took {elapsed:?}", start.first_output);
    assert_eq!(cri.wait_exit(&start.container, Duration::from_secs(30)).await.unwrap(), 0);
    assert_eq!(cri.output(&start.container).unwrap(), "first line\nsecond line\n");
}
