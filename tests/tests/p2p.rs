//! Peer-to-peer downloads with a real scheduler and agent processes on loopback: the registry
//! sends a blob once, a lying peer is caught, and a dead scheduler only means going to the origin.

use std::time::Duration;

use futures_util::future::join_all;
use shoal_tests::{digest_of, p2p_config, random_bytes, Agent, Containerd, Registry, Scheduler};

const MIB: usize = 1 << 20;

async fn get(agent: &Agent, registry: &Registry, repo: &str, digest: &str) -> Vec<u8> {
    let resp = reqwest::get(agent.blob_url(registry, repo, digest)).await.unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert_eq!(resp.status(), 200, "{}", agent.log());
    resp.bytes().await.unwrap_or_else(|e| panic!("the body broke off: {e}\n{}", agent.log())).to_vec()
}

/// Agents register with the scheduler within a second of starting.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(800)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_pulls_come_from_the_first_node_not_the_registry() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(24 * MIB + 7, 41);
    let digest = registry.push_blob("team/p2p", &blob).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let mut agents = vec![];
    for _ in 0..3 {
        agents.push(Agent::start(&p2p_config(&[&scheduler])).await.unwrap());
    }
    settle().await;
    assert_eq!(digest_of(&get(&agents[0], &registry, "team/p2p", &digest).await), digest);
    let bodies = join_all(agents[1..].iter().map(|a| get(a, &registry, "team/p2p", &digest))).await;
    for b in bodies {
        assert_eq!(digest_of(&b), digest);
    }
    // The first node fetched the blob once (in stripes, a request each); the others got it from it.
    assert_eq!(registry.blob_bytes(&digest), blob.len() as u64, "{:?}", registry.blob_fetches(&digest));
    for a in &agents[1..] {
        assert!(a.log().contains("fetching from parents"), "{}", a.log());
        // Its metrics say so too: every byte came from peers, checked, and duplicate copies (the
        // endgame's) are counted apart.
        let received = metric(a, "shoal_peer_bytes_received_total").await;
        assert_eq!(received, blob.len() as u64, "piece bytes from peers for a {}-byte blob", blob.len());
    }
    assert!(metric(&agents[0], "shoal_peer_bytes_sent_total").await > 0, "the first node served nothing");
}

/// A counter or gauge from the agent's Prometheus metrics.
async fn metric(agent: &Agent, name: &str) -> u64 {
    let text = agent.metrics().await.unwrap();
    shoal_tests::metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}")) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_with_an_upload_rate_limit_serves_its_pieces_no_faster() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(6 * MIB, 43);
    let digest = registry.push_blob("team/paced", &blob).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let parent = Agent::start_with_env(&p2p_config(&[&scheduler]), &[("SHOAL_PEER__UPLOAD_RATE_LIMIT", "1MiB")]).await.unwrap();
    let child = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    settle().await;
    assert_eq!(digest_of(&get(&parent, &registry, "team/paced", &digest).await), digest);
    let started = std::time::Instant::now();
    assert_eq!(digest_of(&get(&child, &registry, "team/paced", &digest).await), digest);
    let took = started.elapsed();
    // Every byte came from the parent, at 1 MiB/s: at least 5 s for 6 MiB (the cap allows a
    // tenth of a second's burst). On loopback, uncapped, it takes a fraction of a second.
    assert_eq!(registry.blob_bytes(&digest), blob.len() as u64, "{:?}", registry.blob_fetches(&digest));
    assert!(child.log().contains("fetching from parents"), "{}", child.log());
    assert!(took >= Duration::from_secs(5), "6 MiB through a 1 MiB/s cap took {took:?}\n{}", parent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_pulls_form_a_pipeline_and_the_registry_sends_the_blob_about_once() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(48 * MIB, 42);
    let digest = registry.push_blob("team/fan", &blob).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let mut agents = vec![];
    for _ in 0..4 {
        // The origin link is slow, so the others join while the first is still downloading.
        agents.push(Agent::start(&format!("{}[download]\nrate_limit = \"64MiB\"\n", p2p_config(&[&scheduler]))).await.unwrap());
    }
    settle().await;
    let bodies = join_all(agents.iter().map(|a| get(a, &registry, "team/fan", &digest))).await;
    for b in bodies {
        assert_eq!(digest_of(&b), digest);
    }
    let sent = registry.blob_bytes(&digest) as f64 / blob.len() as f64;
    let splits: usize = agents.iter().map(|a| a.log().matches("the rest of the stripe goes to another source").count()).sum();
    eprintln!("the registry sent {sent:.3}× the blob; {splits} stripes were split");
    let origin_lines = || {
        agents
            .iter()
            .enumerate()
            .flat_map(|(i, a)| a.log().lines().filter(|l| l.contains("origin")).map(|l| format!("agent {i}: {l}")).collect::<Vec<_>>())
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Each piece leaves the registry once, also where a source done early took the end of a
    // slower source's stripe: the scheduler tells the slower one where its stripe now ends, so it
    // does not fetch into the part it lost (before it did, by up to a request, 3 % of the blob,
    // per split). The slack is for HTTP overhead counted in the registry's log, not pieces.
    assert!(sent <= 1.05, "the registry sent {sent:.2}× the blob: {:?}\n{}", registry.blob_fetches(&digest), origin_lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_is_reported_and_the_child_still_gets_correct_bytes() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(6 * MIB, 43);
    let digest = registry.push_blob("team/liar", &blob).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let liar = Agent::start_with_env(&p2p_config(&[&scheduler]), &[("SHOAL_FAULT_CORRUPT_PIECES", "1")]).await.unwrap();
    let honest = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    settle().await;
    assert_eq!(digest_of(&get(&liar, &registry, "team/liar", &digest).await), digest);
    assert_eq!(digest_of(&get(&honest, &registry, "team/liar", &digest).await), digest, "the child must end with correct bytes");
    assert!(honest.log().contains("does not match its digest"), "the bad piece must be noticed");
    assert!(scheduler.log().contains("parent failed"), "and reported to the scheduler");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_scheduler_dead_pulls_still_complete_from_the_origin() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(4 * MIB, 44);
    let digest = registry.push_blob("team/alone", &blob).await.unwrap();
    let mut scheduler = Scheduler::start().await.unwrap();
    let agent = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    scheduler.kill();
    assert_eq!(digest_of(&get(&agent, &registry, "team/alone", &digest).await), digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_of_two_scheduler_replicas_dead_pulls_still_go_peer_to_peer() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(8 * MIB, 45);
    let digest = registry.push_blob("team/ha", &blob).await.unwrap();
    let mut first = Scheduler::start().await.unwrap();
    let second = Scheduler::start().await.unwrap();
    let a = Agent::start(&p2p_config(&[&first, &second])).await.unwrap();
    let b = Agent::start(&p2p_config(&[&first, &second])).await.unwrap();
    settle().await;
    first.kill();
    assert_eq!(digest_of(&get(&a, &registry, "team/ha", &digest).await), digest);
    assert_eq!(digest_of(&get(&b, &registry, "team/ha", &digest).await), digest);
    assert_eq!(registry.blob_bytes(&digest), blob.len() as u64, "the second pull must come from the first node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_fetches_for_the_cluster_and_nobody_else_touches_the_registry() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(12 * MIB, 46);
    let digest = registry.push_blob("team/seeded", &blob).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let seed = Agent::start_role("seed", &p2p_config(&[&scheduler]), &[]).await.unwrap();
    let agents = [Agent::start(&p2p_config(&[&scheduler])).await.unwrap(), Agent::start(&p2p_config(&[&scheduler])).await.unwrap()];
    settle().await;
    for a in &agents {
        assert_eq!(digest_of(&get(a, &registry, "team/seeded", &digest).await), digest);
        assert!(a.log().contains("fetching from parents"), "{}", a.log());
    }
    assert!(seed.log().contains("seed fetching a task for a child"), "{}", seed.log());
    assert_eq!(registry.blob_fetches(&digest).len(), 1, "only the seed may fetch from the registry");
    seed.wait_stored(&digest).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_killed_mid_fan_out_leaves_every_agent_with_correct_bytes() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(48 * MIB, 47);
    let digest = registry.push_blob("team/seedkill", &blob).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let mut seed =
        Agent::start_role("seed", &format!("{}[download]\nrate_limit = \"32MiB\"\n", p2p_config(&[&scheduler])), &[]).await.unwrap();
    let agents = [Agent::start(&p2p_config(&[&scheduler])).await.unwrap(), Agent::start(&p2p_config(&[&scheduler])).await.unwrap()];
    settle().await;
    let pulls = tokio::spawn({
        let urls: Vec<String> = agents.iter().map(|a| a.blob_url(&registry, "team/seedkill", &digest)).collect();
        async move { join_all(urls.into_iter().map(|u| async move { reqwest::get(u).await?.bytes().await })).await }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    seed.kill();
    for body in pulls.await.unwrap() {
        assert_eq!(digest_of(&body.expect("a pull must survive the seed dying")), digest);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_up_runs_mirror_scheduler_and_seed_in_one_process() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(3 * MIB, 48);
    let digest = registry.push_blob("team/up", &blob).await.unwrap();
    let scheduler_port = shoal_tests::free_port();
    let peer_port = shoal_tests::free_port();
    let up = Agent::start_role(
        "up",
        "",
        &[("SHOAL_SCHEDULER__LISTEN", &format!("0.0.0.0:{scheduler_port}")), ("SHOAL_PEER__LISTEN", &format!("0.0.0.0:{peer_port}"))],
    )
    .await
    .unwrap();
    assert_eq!(digest_of(&get(&up, &registry, "team/up", &digest).await), digest);
    let log = up.log();
    assert!(log.contains("embedded scheduler listening") && log.contains("peer-to-peer downloads on"), "{log}");
    assert!(log.contains("fetching from the origin for the cluster"), "the seed goes to the origin itself: {log}");
    assert!(log.contains(&format!("127.0.0.1:{peer_port}")), "the peer server stays on loopback: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preheat_has_seeds_fetch_an_image_and_nodes_then_pull_it_from_them() {
    let registry = Registry::start(None).await.unwrap();
    registry.push_image("team/warm", "v1", &[("/data.bin", random_bytes(6 * MIB, 49))]).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let seed = Agent::start_role("seed", &p2p_config(&[&scheduler]), &[]).await.unwrap();
    let node = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    settle().await;
    let image = format!("{}/team/warm:v1", registry.host());
    let out =
        std::process::Command::new(shoal_tests::shoal_bin()).args(["preheat", &image, "--scheduler", &scheduler.addr()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("preheat done"));
    let blobs = registry.image_blobs("team/warm", "v1").await.unwrap();
    for (digest, _) in &blobs {
        seed.wait_stored(digest).await.expect("the seed must hold every blob");
        assert!(!node.stored_tasks().contains(&shoal_tests::task_dir(digest)), "scope seeds leaves the nodes alone");
    }
    // The node's pull comes from the seed: the registry still sent each blob once.
    for (digest, _) in &blobs {
        assert_eq!(digest_of(&get(&node, &registry, "team/warm", digest).await), *digest);
        assert_eq!(registry.blob_fetches(digest).len(), 1, "{digest}");
    }

    // Nothing to preheat on: a clear refusal.
    let empty = Scheduler::start().await.unwrap();
    let out =
        std::process::Command::new(shoal_tests::shoal_bin()).args(["preheat", &image, "--scheduler", &empty.addr()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no seed is connected"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preheated_image_still_pulls_and_runs_while_its_registry_is_down_for_clients_it_let_in() {
    let mut registry = Registry::start(None).await.unwrap();
    registry
        .push_image("team/offline", "v1", &[("/data.bin", random_bytes(5 * MIB, 53)), ("/hello.txt", b"served by the cluster\n".to_vec())])
        .await
        .unwrap();
    registry.push_image("team/cold", "v1", &[("/x.txt", b"never preheated\n".to_vec())]).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let _seed = Agent::start_role("seed", &p2p_config(&[&scheduler]), &[]).await.unwrap();
    let node = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    settle().await;
    let image = format!("{}/team/offline:v1", registry.host());
    let out =
        std::process::Command::new(shoal_tests::shoal_bin()).args(["preheat", &image, "--scheduler", &scheduler.addr()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A client pulls once while the registry is up: the node has asked the registry that anyone
    // may read this image. (A recorded manifest never grants access by itself.)
    let earlier = Containerd::start(&registry.host(), &node.mirror()).await.unwrap();
    assert!(earlier.pull(&image, None).unwrap().status.success());

    registry.stop();
    let ctd = Containerd::start(&registry.host(), &node.mirror()).await.unwrap();
    let pulled = ctd.pull(&image, None).unwrap();
    assert!(pulled.status.success(), "pull with the registry down failed: {}\n{}", String::from_utf8_lossy(&pulled.stderr), node.log());
    assert_eq!(ctd.run(&image, &["/bin/busybox", "cat", "/hello.txt"]).unwrap(), "served by the cluster\n");
    assert!(node.log().contains("serving the manifest a preheat recorded"), "{}", node.log());

    // An image nobody preheated cannot be resolved: the pull fails as a direct one would.
    let cold = ctd.pull(&format!("{}/team/cold:v1", registry.host()), None).unwrap();
    assert!(!cold.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preheated_private_image_is_served_offline_only_to_clients_the_registry_already_let_in() {
    let mut registry = Registry::start(Some(("alice", "s3cret"))).await.unwrap();
    registry.push_image("private/offline", "v1", &[("/secret.txt", b"for alice only\n".to_vec())]).await.unwrap();
    let credentials = format!("[registry.\"{}\"]\nusername = \"alice\"\npassword = \"s3cret\"\n", registry.host());
    let scheduler = Scheduler::start().await.unwrap();
    let _seed = Agent::start_role("seed", &format!("{}{credentials}", p2p_config(&[&scheduler])), &[]).await.unwrap();
    let node = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    settle().await;
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), &credentials).unwrap();
    let image = format!("{}/private/offline:v1", registry.host());
    let out = std::process::Command::new(shoal_tests::shoal_bin())
        .args(["preheat", &image, "--scheduler", &scheduler.addr(), "--config"])
        .arg(config.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Alice pulls once while the registry is up, so the node has checked her access.
    let alice = Containerd::start(&registry.host(), &node.mirror()).await.unwrap();
    assert!(alice.pull(&image, Some("alice:s3cret")).unwrap().status.success());

    registry.stop();
    let stranger = Containerd::start(&registry.host(), &node.mirror()).await.unwrap();
    let out = stranger.pull(&image, None).unwrap();
    assert!(!out.status.success(), "a client without credentials must not get a private image");
    let mallory = Containerd::start(&registry.host(), &node.mirror()).await.unwrap();
    let out = mallory.pull(&image, Some("mallory:guess")).unwrap();
    assert!(!out.status.success(), "credentials the registry never accepted must not get a private image");
    assert!(node.log().contains("cannot be checked while the registry is down"), "{}", node.log());
    let again = Containerd::start(&registry.host(), &node.mirror()).await.unwrap();
    let out = again.pull(&image, Some("alice:s3cret")).unwrap();
    assert!(out.status.success(), "alice was let in minutes ago: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preheat_imports_into_containerd_so_a_run_needs_no_pull() {
    let mut registry = Registry::start(None).await.unwrap();
    registry
        .push_image(
            "team/imported",
            "v1",
            &[("/data.bin", random_bytes(3 * MIB, 57)), ("/hello.txt", b"imported ahead of time\n".to_vec())],
        )
        .await
        .unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let _seed = Agent::start_role("seed", &p2p_config(&[&scheduler]), &[]).await.unwrap();
    let mut node = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    settle().await;
    let ctd = Containerd::start(&registry.host(), &node.mirror()).await.unwrap();
    let image = format!("{}/team/imported:v1", registry.host());
    let out = std::process::Command::new(shoal_tests::shoal_bin())
        .args(["preheat", &image, "--scheduler", &scheduler.addr(), "--containerd-namespace", "default", "--mirror", &node.mirror()])
        .arg("--containerd-socket")
        .arg(ctd.socket())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), node.log());
    assert!(String::from_utf8_lossy(&out.stderr).contains("imported"), "{}", String::from_utf8_lossy(&out.stderr));
    // The node's copies came from the seed: the registry sent each blob once.
    for (digest, _) in registry.image_blobs("team/imported", "v1").await.unwrap() {
        assert_eq!(registry.blob_fetches(&digest).len(), 1, "{digest}");
    }

    // Nothing left to pull from: the image must already be in containerd, unpacked.
    registry.stop();
    node.kill();
    let listed = ctd.ctr(&["images", "ls", "-q"]).unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).lines().any(|l| l == image), "{}", String::from_utf8_lossy(&listed.stdout));
    let check = ctd.ctr(&["images", "check"]).unwrap();
    assert!(String::from_utf8_lossy(&check.stdout).contains("complete"), "{}", String::from_utf8_lossy(&check.stdout));
    let snapshots = ctd.ctr(&["snapshots", "ls"]).unwrap();
    assert!(String::from_utf8_lossy(&snapshots.stdout).lines().count() > 1, "the layers must be unpacked already");
    assert_eq!(ctd.run(&image, &["/bin/busybox", "cat", "/hello.txt"]).unwrap(), "imported ahead of time\n");
}

/// `range` of `digest` through `agent`, as a reader that checks what it reads (a lazy mount).
async fn checked_range(agent: &Agent, registry: &Registry, digest: &str, range: std::ops::Range<usize>) -> Vec<u8> {
    let resp = reqwest::Client::new()
        .get(agent.blob_url(registry, "team/sparse", digest))
        .header("Range", format!("bytes={}-{}", range.start, range.end - 1))
        .header(shoal_core::config::CHECKED_RANGES_HEADER, "blake3")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert_eq!(resp.status(), 206, "{}", agent.log());
    resp.bytes().await.unwrap_or_else(|e| panic!("the body broke off: {e}\n{}", agent.log())).to_vec()
}

/// Bytes of the pieces of a `len`-byte blob that cover `ranges`, each piece counted once.
fn piece_bytes(len: usize, ranges: &[std::ops::Range<usize>]) -> u64 {
    let layout = shoal_core::piece::PieceLayout::for_len(len as u64);
    let pieces: std::collections::BTreeSet<u32> = ranges.iter().flat_map(|r| layout.covering(r.start as u64..r.end as u64)).collect();
    pieces.iter().map(|&n| layout.range(n).end - layout.range(n).start).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_range_reads_come_from_nodes_that_read_them_before_and_each_piece_leaves_the_registry_once() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(16 * MIB + 5, 45);
    let digest = registry.push_blob("team/sparse", &blob).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let mut agents = vec![];
    for _ in 0..3 {
        agents.push(Agent::start(&p2p_config(&[&scheduler])).await.unwrap());
    }
    settle().await;
    let first = [100..70_000, 5 * MIB..5 * MIB + 300_000];
    for r in &first {
        assert!(checked_range(&agents[0], &registry, &digest, r.clone()).await == blob[r.clone()], "{r:?} on the first node");
    }
    assert_eq!(registry.blob_bytes(&digest), piece_bytes(blob.len(), &first), "{:?}", registry.blob_fetches(&digest));

    // Two more nodes read the same ranges and, at the same time, one nobody read yet: the first
    // node's pieces come from it, and the new range leaves the registry once for both.
    let later = [first[0].clone(), first[1].clone(), 12 * MIB..12 * MIB + 1000];
    let reads = join_all(agents[1..].iter().map(|a| async {
        let mut got = Vec::new();
        for r in &later {
            got.push(checked_range(a, &registry, &digest, r.clone()).await);
        }
        got
    }))
    .await;
    for got in reads {
        for (r, bytes) in later.iter().zip(got) {
            assert!(bytes == blob[r.clone()], "{r:?} read wrong on a later node");
        }
    }
    let sent = registry.blob_bytes(&digest);
    assert_eq!(sent, piece_bytes(blob.len(), &later), "each piece leaves the registry once: {:?}", registry.blob_fetches(&digest));
    for a in &agents[1..] {
        assert!(metric(a, "shoal_peer_bytes_received_total").await > 0, "a later node got nothing from peers:\n{}", a.log());
    }
    // A reader that does not check what it reads gets the origin's bytes: unchecked pieces are
    // not for it.
    let resp = reqwest::Client::new()
        .get(agents[1].blob_url(&registry, "team/sparse", &digest))
        .header("Range", "bytes=100-69999")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert!(resp.bytes().await.unwrap() == blob[100..70_000]);
    assert_eq!(registry.blob_bytes(&digest), sent + 69_900, "an unchecked range reader is served by the origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_holder_of_range_pieces_is_caught_and_the_reader_gets_correct_bytes() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(6 * MIB, 46);
    let digest = registry.push_blob("team/sparse", &blob).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let liar = Agent::start_with_env(&p2p_config(&[&scheduler]), &[("SHOAL_FAULT_CORRUPT_PIECES", "1")]).await.unwrap();
    let honest = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    settle().await;
    let range = MIB..2 * MIB;
    assert!(checked_range(&liar, &registry, &digest, range.clone()).await == blob[range.clone()]);
    assert!(checked_range(&honest, &registry, &digest, range.clone()).await == blob[range.clone()], "the reader must get correct bytes");
    assert!(honest.log().contains("does not match its digest"), "the bad piece must be noticed:\n{}", honest.log());
    // The liar's pieces were refused, so the honest node fetched them from the registry itself.
    assert_eq!(registry.blob_bytes(&digest), 2 * piece_bytes(blob.len(), &[range]), "{:?}", registry.blob_fetches(&digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_and_restarted_with_an_empty_store_is_not_offered_for_what_it_lost() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(16 * MIB + 3, 47);
    let digest = registry.push_blob("team/restart", &blob).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let mut first = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    let second = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    settle().await;
    assert_eq!(digest_of(&get(&first, &registry, "team/restart", &digest).await), digest);
    // The first node crashes and comes back with the same host id and nothing in its store (a
    // replaced pod with an empty volume). It pulls the blob again, from the registry.
    first.kill();
    std::fs::remove_dir_all(first.data_dir()).unwrap();
    first.restart().await.unwrap();
    settle().await;
    assert_eq!(digest_of(&get(&first, &registry, "team/restart", &digest).await), digest);
    assert_eq!(registry.blob_bytes(&digest), 2 * blob.len() as u64, "{:?}", registry.blob_fetches(&digest));
    // The scheduler forgot what the first node held before its restart, so it does not count it
    // as a peer that had the blob: the second node gets every byte from it, none from the registry.
    assert_eq!(digest_of(&get(&second, &registry, "team/restart", &digest).await), digest);
    assert_eq!(registry.blob_bytes(&digest), 2 * blob.len() as u64, "{:?}\n{}", registry.blob_fetches(&digest), second.log());
    assert_eq!(metric(&second, "shoal_peer_bytes_received_total").await, blob.len() as u64);
    assert!(scheduler.log().contains("host restarted"), "{}", scheduler.log());
}
