//! A cluster in network namespaces: each node is its own network host with its own address, the
//! registry and the scheduler sit at the bridge's gateway. Nodes pull through their own mirrors.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use shoal_tests::netns::Lab;
use shoal_tests::{digest_of, lab_p2p_config, random_bytes, Agent, Containerd, Registry, Scheduler};

const MIB: usize = 1 << 20;

async fn pull(agent: &Agent, registry: &Registry, repo: &str, digest: &str) -> reqwest::Result<Vec<u8>> {
    Ok(reqwest::get(agent.blob_url(registry, repo, digest)).await?.error_for_status()?.bytes().await?.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_nodes_pull_one_blob_at_once_and_the_registry_sends_it_about_once() {
    let lab = Lab::new(9).unwrap();
    let registry = Registry::start_on(lab.gateway()).await.unwrap();
    let size = 256 * MIB;
    let blob = random_bytes(size, 51);
    let digest = registry.push_blob("team/fleet", &blob).await.unwrap();
    drop(blob);
    let scheduler = Scheduler::start_on(lab.gateway()).await.unwrap();
    let config = lab_p2p_config(&[&scheduler], &registry);
    let _seed = Agent::start_in(&lab, 0, "seed", &config, &[]).await.unwrap();
    let mut agents = vec![];
    for i in 1..9 {
        agents.push(Agent::start_in(&lab, i, "agent", &config, &[]).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let start = Instant::now();
    let bodies = join_all(agents.iter().map(|a| pull(a, &registry, "team/fleet", &digest))).await;
    for (i, b) in bodies.into_iter().enumerate() {
        assert_eq!(digest_of(&b.unwrap_or_else(|e| panic!("node {i}: {e}"))), digest, "node {i}");
    }
    let sent = registry.blob_bytes(&digest) as f64 / size as f64;
    eprintln!("8 nodes × 256 MiB in {:?}; registry sent {sent:.3}× the blob", start.elapsed());
    assert!(sent <= 1.05, "the registry sent {sent:.2}× the blob: {:?}", registry.blob_fetches(&digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_killed_mid_transfer_leaves_its_children_to_finish_elsewhere() {
    let lab = Lab::new(3).unwrap();
    let registry = Registry::start_on(lab.gateway()).await.unwrap();
    let blob = random_bytes(64 * MIB, 52);
    let digest = registry.push_blob("team/kill", &blob).await.unwrap();
    let scheduler = Scheduler::start_on(lab.gateway()).await.unwrap();
    let config = lab_p2p_config(&[&scheduler], &registry);
    // The first node's origin link is slow, so the others follow it piece by piece.
    let mut parent = Agent::start_in(&lab, 0, "agent", &format!("{config}[download]\nrate_limit = \"32MiB\"\n"), &[]).await.unwrap();
    let children =
        [Agent::start_in(&lab, 1, "agent", &config, &[]).await.unwrap(), Agent::start_in(&lab, 2, "agent", &config, &[]).await.unwrap()];
    tokio::time::sleep(Duration::from_millis(800)).await;
    let first = tokio::spawn({
        let url = parent.blob_url(&registry, "team/kill", &digest);
        async move { reqwest::get(url).await?.bytes().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pulls = join_all(children.iter().map(|c| pull(c, &registry, "team/kill", &digest)));
    let killer = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        parent.kill();
    };
    let (bodies, ()) = tokio::join!(pulls, killer);
    for b in bodies {
        assert_eq!(digest_of(&b.expect("a child must finish without its parent")), digest);
    }
    assert!(first.await.unwrap().is_err(), "the killed node's own pull is cut");
    assert!(children.iter().any(|c| c.log().contains("fetching from parents")), "the children did start peer to peer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_nodes_containerd_gets_its_blobs_from_the_first_node() {
    let lab = Lab::new(2).unwrap();
    let registry = Registry::start_on(lab.gateway()).await.unwrap();
    registry
        .push_image("team/app", "v1", &[("/data.bin", random_bytes(8 * MIB, 53)), ("/hello.txt", b"hello from node\n".to_vec())])
        .await
        .unwrap();
    let scheduler = Scheduler::start_on(lab.gateway()).await.unwrap();
    let config = lab_p2p_config(&[&scheduler], &registry);
    let nodes =
        [Agent::start_in(&lab, 0, "agent", &config, &[]).await.unwrap(), Agent::start_in(&lab, 1, "agent", &config, &[]).await.unwrap()];
    tokio::time::sleep(Duration::from_millis(800)).await;
    let image = format!("{}/team/app:v1", registry.host());
    for node in &nodes {
        let ctd = Containerd::start(&registry.host(), &node.mirror()).await.unwrap();
        let out = ctd.pull(&image, None).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(ctd.run(&image, &["/bin/busybox", "cat", "/hello.txt"]).unwrap(), "hello from node\n");
    }
    for (digest, size) in registry.image_blobs("team/app", "v1").await.unwrap() {
        // The first node fetched each blob once (a larger one in stripes, one request each).
        let sent = registry.blob_bytes(&digest);
        assert_eq!(sent, size, "blob {digest} of {size} bytes cost the registry {sent}: {:?}", registry.blob_fetches(&digest));
    }
    assert!(nodes[1].log().contains("fetching from parents"), "{}", nodes[1].log());
}
