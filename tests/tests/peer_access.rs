//! What peers may get, tried as an attacker would: private pieces without mutual TLS, a client's
//! registry credentials sent to a host that only claims to be a seed, and a peer refusing a task
//! again and again.

use std::time::Duration;

use shoal_tests::{certs, digest_of, p2p_config, random_bytes, Agent, Registry, Scheduler};

const MIB: usize = 1 << 20;

async fn get(agent: &Agent, registry: &Registry, repo: &str, digest: &str, user: Option<(&str, &str)>) -> Vec<u8> {
    let mut req = reqwest::Client::new().get(agent.blob_url(registry, repo, digest));
    if let Some((u, p)) = user {
        req = req.basic_auth(u, Some(p));
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert_eq!(resp.status(), 200, "{}", agent.log());
    resp.bytes().await.unwrap_or_else(|e| panic!("the body broke off: {e}\n{}", agent.log())).to_vec()
}

fn metric(text: &str, name: &str) -> f64 {
    shoal_tests::metric_value(text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// Agents register with the scheduler within a second of starting.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(800)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_mutual_tls_a_private_blob_comes_from_the_origin_and_a_public_one_from_peers() {
    let private = Registry::start(Some(("alice", "s3cret"))).await.unwrap();
    let secret = random_bytes(2 * MIB, 81);
    let digest = private.push_blob("private/app", &secret).await.unwrap();
    let public = Registry::start(None).await.unwrap();
    let open = random_bytes(2 * MIB, 82);
    let open_digest = public.push_blob("team/open", &open).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let first = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    let second = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    settle().await;

    let alice = Some(("alice", "s3cret"));
    assert_eq!(digest_of(&get(&first, &private, "private/app", &digest, alice).await), digest);
    first.wait_stored(&digest).await.unwrap();
    assert_eq!(digest_of(&get(&second, &private, "private/app", &digest, alice).await), digest);
    assert_eq!(private.blob_bytes(&digest), 2 * secret.len() as u64, "each node fetched the private blob from its registry");
    let metrics = second.metrics().await.unwrap();
    assert_eq!(metric(&metrics, "shoal_peer_bytes_received_total"), 0.0, "no private piece crossed between peers:\n{metrics}");
    assert!(second.log().contains("private blob and no cluster CA"), "{}", second.log());

    assert_eq!(digest_of(&get(&first, &public, "team/open", &open_digest, None).await), open_digest);
    first.wait_stored(&open_digest).await.unwrap();
    assert_eq!(digest_of(&get(&second, &public, "team/open", &open_digest, None).await), open_digest);
    assert_eq!(public.blob_bytes(&open_digest), open.len() as u64, "the public blob came from the registry once");
    let metrics = second.metrics().await.unwrap();
    assert_eq!(metric(&metrics, "shoal_peer_bytes_received_total"), open.len() as f64, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_refusing_a_task_is_left_alone_and_the_pull_goes_on() {
    // The same bytes in two registries: a host holding them from one does not serve them to a
    // download from the other, which the scheduler (keyed by digest) may still send to it.
    let blob = random_bytes(MIB, 83);
    let one = Registry::start(None).await.unwrap();
    let other = Registry::start(None).await.unwrap();
    let digest = one.push_blob("team/app", &blob).await.unwrap();
    assert_eq!(other.push_blob("team/app", &blob).await.unwrap(), digest);
    let scheduler = Scheduler::start().await.unwrap();
    let holder = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    let asker = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    settle().await;
    assert_eq!(digest_of(&get(&holder, &one, "team/app", &digest, None).await), digest);
    holder.wait_stored(&digest).await.unwrap();

    assert_eq!(digest_of(&get(&asker, &other, "team/app", &digest, None).await), digest, "the pull from the other registry succeeds");
    assert_eq!(other.blob_bytes(&digest), blob.len() as u64, "from its own registry");
    // Time for a storm of subscriptions, had the refusal not been heard.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let refusals = metric(&holder.metrics().await.unwrap(), "shoal_peer_refusals_total");
    assert!((1.0..=5.0).contains(&refusals), "the holder refused {refusals} requests");
    let noted = asker.log().matches("parent refused the task").count();
    assert!(noted <= 1, "the refusal is logged once, not {noted} times:\n{}", asker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_credentials_go_only_to_a_seed_whose_certificate_says_so() {
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    certs::make_ca(d, "cluster").unwrap();
    certs::issue(d, "cluster", "node", "DNS:shoal-peer", "serverAuth,clientAuth").unwrap();
    certs::issue(d, "cluster", "impostor", "DNS:shoal-peer", "serverAuth,clientAuth").unwrap();
    certs::issue_as(d, "cluster", "seed", "/CN=seed-1/OU=seed", "DNS:shoal-peer", "serverAuth,clientAuth").unwrap();
    let tls = |name: &str| {
        let f = |ext: &str| d.join(format!("{name}.{ext}")).display().to_string();
        format!("ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n", d.join("cluster.pem").display(), f("pem"), f("key"))
    };
    let private = Registry::start(Some(("alice", "s3cret"))).await.unwrap();
    let alice = Some(("alice", "s3cret"));

    // A cluster member that announces itself as a seed, without a seed certificate (and no
    // credentials of its own): it never learns alice's password, so it cannot fetch her blob.
    let secret = random_bytes(MIB, 84);
    let digest = private.push_blob("private/app", &secret).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let impostor = Agent::start_role("seed", &format!("{}{}", p2p_config(&[&scheduler]), tls("impostor")), &[]).await.unwrap();
    let node = Agent::start(&format!("{}{}", p2p_config(&[&scheduler]), tls("node"))).await.unwrap();
    settle().await;
    assert_eq!(digest_of(&get(&node, &private, "private/app", &digest, alice).await), digest);
    assert!(impostor.log().contains("seed fetching a task for a child"), "the impostor was asked as a seed:\n{}", impostor.log());
    assert!(!impostor.stored_tasks().contains(&shoal_tests::task_dir(&digest)), "the impostor fetched alice's blob");
    assert!(!impostor.log().contains("blob complete and verified"), "{}", impostor.log());

    // A seed with a seed certificate is trusted with the credentials, and fetches for the node.
    let secret = random_bytes(MIB, 85);
    let digest = private.push_blob("private/other", &secret).await.unwrap();
    let scheduler = Scheduler::start().await.unwrap();
    let seed = Agent::start_role("seed", &format!("{}{}", p2p_config(&[&scheduler]), tls("seed")), &[]).await.unwrap();
    let node = Agent::start(&format!("{}{}", p2p_config(&[&scheduler]), tls("node"))).await.unwrap();
    settle().await;
    assert_eq!(digest_of(&get(&node, &private, "private/other", &digest, alice).await), digest);
    seed.wait_stored(&digest).await.unwrap();
}
