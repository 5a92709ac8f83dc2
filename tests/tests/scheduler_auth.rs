//! The scheduler API with token files, against a real `shoal scheduler`, agents, a seed and a
//! registry: a caller without a token is refused, each token grants its role's calls and no
//! others (so nobody without the seed token poses as a seed, nor preheats without the preheat
//! token), hosts holding the right token download peer to peer, and a host the scheduler refuses
//! still gets its blob from the registry.

use std::time::Duration;

use shoal_proto::scheduler as pb;
use shoal_proto::scheduler::scheduler_client::SchedulerClient;
use shoal_tests::{digest_of, p2p_config, p2p_config_with_token, random_bytes, Agent, Registry, Scheduler};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

const MIB: usize = 1 << 20;

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("a token is visible ASCII"));
        }
        Ok(req)
    }
}

type Client = SchedulerClient<InterceptedService<Channel, Bearer>>;

/// A raw gRPC client of `scheduler` presenting `token` (or nothing).
async fn client(scheduler: &Scheduler, token: Option<String>) -> Client {
    let channel = Channel::from_shared(format!("http://{}", scheduler.addr())).unwrap().connect().await.unwrap();
    SchedulerClient::with_interceptor(channel, Bearer(token))
}

fn host(id: &str, peer_addr: &str, seed: bool) -> pb::AnnounceHostRequest {
    pb::AnnounceHostRequest {
        host: Some(pb::Host { id: id.into(), peer_addr: peer_addr.into(), upload_slots: 2, seed, ..Default::default() }),
    }
}

fn preheat(registry: &Registry, repo: &str, digest: &str, length: u64) -> pb::PreheatRequest {
    let blob = pb::Origin { registry: registry.host(), repository: repo.into(), digest: digest.into(), length };
    pb::PreheatRequest { blobs: vec![blob], scope: "seeds".into(), manifests: vec![] }
}

/// The status code of a call that must fail.
fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    let status = r.expect_err("the call must be refused");
    (status.code(), status.message().to_string())
}

async fn get(agent: &Agent, registry: &Registry, repo: &str, digest: &str) -> Vec<u8> {
    let resp = reqwest::get(agent.blob_url(registry, repo, digest)).await.unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert_eq!(resp.status(), 200, "{}", agent.log());
    resp.bytes().await.unwrap_or_else(|e| panic!("the body broke off: {e}\n{}", agent.log())).to_vec()
}

/// A counter from the agent's Prometheus metrics.
async fn metric(agent: &Agent, name: &str) -> u64 {
    let text = agent.metrics().await.unwrap();
    shoal_tests::metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}")) as u64
}

/// Hosts announce themselves within a second of starting.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(800)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_token_preheat_and_announce_host_are_unauthenticated() {
    let registry = Registry::start(None).await.unwrap();
    let digest = registry.push_blob("team/app", &random_bytes(MIB, 1)).await.unwrap();
    let scheduler = Scheduler::start_with_tokens().await.unwrap();
    for token in [None, Some(scheduler.token("wrong"))] {
        let mut c = client(&scheduler, token.clone()).await;
        let (status, message) = code(c.preheat(preheat(&registry, "team/app", &digest, MIB as u64)).await);
        assert_eq!(status, Code::Unauthenticated, "Preheat with {token:?}: {message}");
        let (status, message) = code(c.announce_host(host("fake-seed", "127.0.0.1:9", true)).await);
        assert_eq!(status, Code::Unauthenticated, "AnnounceHost with {token:?}: {message}");
        // The refusal says what to configure.
        assert!(message.contains("agent_token_file"), "{message}");
    }
    let (_, message) = code(client(&scheduler, None).await.announce_host(host("h", "127.0.0.1:9", false)).await);
    assert!(message.contains("[peer] scheduler_token_file") && message.contains("--token-file"), "{message}");
    assert!(scheduler.log().contains("scheduler call refused"), "{}", scheduler.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_token_may_neither_preheat_nor_announce_a_seed_and_the_preheat_token_may_not_announce() {
    let registry = Registry::start(None).await.unwrap();
    let digest = registry.push_blob("team/app", &random_bytes(MIB, 2)).await.unwrap();
    let scheduler = Scheduler::start_with_tokens().await.unwrap();
    let mut agent = client(&scheduler, Some(scheduler.token("agent"))).await;
    let (status, message) = code(agent.preheat(preheat(&registry, "team/app", &digest, MIB as u64)).await);
    assert_eq!(status, Code::PermissionDenied, "{message}");
    assert!(message.contains("needs the preheat token") && message.contains("preheat_token_file"), "{message}");
    let (status, message) = code(agent.announce_host(host("fake-seed", "127.0.0.1:9", true)).await);
    assert_eq!(status, Code::PermissionDenied, "{message}");
    assert!(message.contains("seed_token_file"), "{message}");
    agent.announce_host(host("node-1", "127.0.0.1:9", false)).await.expect("the agent token announces an ordinary host");

    let mut preheater = client(&scheduler, Some(scheduler.token("preheat"))).await;
    let (status, message) = code(preheater.announce_host(host("node-2", "127.0.0.1:9", false)).await);
    assert_eq!(status, Code::PermissionDenied, "{message}");
    let (status, _) = code(preheater.watch_jobs(pb::WatchJobsRequest { host_id: "node-2".into() }).await);
    assert_eq!(status, Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_seed_is_refused_and_a_private_pull_never_contacts_it() {
    let registry = Registry::start(Some(("alice", "s3cret"))).await.unwrap();
    let blob = random_bytes(4 * MIB, 3);
    let digest = registry.push_blob("private/app", &blob).await.unwrap();
    let scheduler = Scheduler::start_with_tokens().await.unwrap();
    // Whatever would be sent to the fake seed (pieces requests carrying the client's
    // credentials) arrives here.
    let fake = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let fake_addr = fake.local_addr().unwrap().to_string();
    for token in [None, Some(scheduler.token("agent")), Some(scheduler.token("preheat"))] {
        let result = client(&scheduler, token.clone()).await.announce_host(host("fake-seed", &fake_addr, true)).await;
        assert!(result.is_err(), "announcing a seed with {token:?} must be refused");
    }
    let node = Agent::start(&p2p_config_with_token(&[&scheduler], &scheduler.token_file("agent"))).await.unwrap();
    settle().await;
    let resp = reqwest::Client::new()
        .get(node.blob_url(&registry, "private/app", &digest))
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", node.log());
    assert_eq!(digest_of(&resp.bytes().await.unwrap()), digest);
    fake.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 2048];
    let got = fake.recv_from(&mut buf);
    assert!(
        got.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the fake seed was contacted: {got:?}\n{}",
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preheat_token_preheats_through_the_api_and_through_shoal_preheat() {
    let registry = Registry::start(None).await.unwrap();
    let loose = random_bytes(2 * MIB, 4);
    let loose_digest = registry.push_blob("team/loose", &loose).await.unwrap();
    registry.push_image("team/warm", "v1", &[("/data.bin", random_bytes(6 * MIB, 5))]).await.unwrap();
    let scheduler = Scheduler::start_with_tokens().await.unwrap();
    let seed = Agent::start_role("seed", &p2p_config_with_token(&[&scheduler], &scheduler.token_file("seed")), &[]).await.unwrap();
    let node = Agent::start(&p2p_config_with_token(&[&scheduler], &scheduler.token_file("agent"))).await.unwrap();
    settle().await;

    // The raw API: the seed (trusted as one, it holds the seed token) is sent the job.
    let mut preheater = client(&scheduler, Some(scheduler.token("preheat"))).await;
    let job =
        preheater.preheat(preheat(&registry, "team/loose", &loose_digest, loose.len() as u64)).await.expect("Preheat").into_inner().job_id;
    seed.wait_stored(&loose_digest).await.expect("the seed fetched the preheated blob");
    let mut state = String::new();
    for _ in 0..100 {
        state = preheater.job_status(pb::JobStatusRequest { job_id: job.clone() }).await.expect("JobStatus").into_inner().state;
        if state == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, "done");

    // The command line, with the token from a file.
    let image = format!("{}/team/warm:v1", registry.host());
    let shoal_preheat = |token_file: Option<std::path::PathBuf>| {
        let mut cmd = std::process::Command::new(shoal_tests::shoal_bin());
        cmd.args(["preheat", &image, "--scheduler", &scheduler.addr(), "--timeout", "60"]).env_remove("SHOAL_PREHEAT_TOKEN_FILE");
        if let Some(f) = token_file {
            cmd.arg("--token-file").arg(f);
        }
        cmd.output().unwrap()
    };
    let out = shoal_preheat(None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs a bearer token") && stderr.contains("--token-file"), "{stderr}");
    let out = shoal_preheat(Some(scheduler.token_file("agent")));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs the preheat token"), "{stderr}");
    let out = shoal_preheat(Some(scheduler.token_file("preheat")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("preheat done"));
    // The node's pull comes from the seed: the registry still sent each blob once.
    for (digest, _) in registry.image_blobs("team/warm", "v1").await.unwrap() {
        seed.wait_stored(&digest).await.expect("the seed must hold every blob");
        assert_eq!(digest_of(&get(&node, &registry, "team/warm", &digest).await), digest);
        assert_eq!(registry.blob_fetches(&digest).len(), 1, "{digest}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_holding_the_agent_token_pull_peer_to_peer() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(8 * MIB + 3, 6);
    let digest = registry.push_blob("team/p2p", &blob).await.unwrap();
    let scheduler = Scheduler::start_with_tokens().await.unwrap();
    let config = || p2p_config_with_token(&[&scheduler], &scheduler.token_file("agent"));
    let agents = [Agent::start(&config()).await.unwrap(), Agent::start(&config()).await.unwrap()];
    settle().await;
    assert_eq!(digest_of(&get(&agents[0], &registry, "team/p2p", &digest).await), digest);
    assert_eq!(digest_of(&get(&agents[1], &registry, "team/p2p", &digest).await), digest);
    // The registry sent the blob once; the second node got every byte from the first.
    assert_eq!(registry.blob_bytes(&digest), blob.len() as u64, "{:?}", registry.blob_fetches(&digest));
    assert_eq!(metric(&agents[1], "shoal_peer_bytes_received_total").await, blob.len() as u64);
    assert!(metric(&agents[0], "shoal_peer_bytes_sent_total").await > 0, "the first node served nothing");
    assert!(!scheduler.log().contains("scheduler call refused"), "{}", scheduler.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_the_scheduler_refuses_still_pull_from_the_registry() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(3 * MIB, 7);
    let digest = registry.push_blob("team/refused", &blob).await.unwrap();
    let scheduler = Scheduler::start_with_tokens().await.unwrap();
    let wrong = Agent::start(&p2p_config_with_token(&[&scheduler], &scheduler.token_file("wrong"))).await.unwrap();
    let without = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    settle().await;
    for agent in [&wrong, &without] {
        assert_eq!(digest_of(&get(agent, &registry, "team/refused", &digest).await), digest);
    }
    // Each went to the registry itself: nobody could have been its parent.
    assert_eq!(registry.blob_bytes(&digest), 2 * blob.len() as u64, "{:?}", registry.blob_fetches(&digest));
    assert!(scheduler.log().contains("scheduler call refused"), "{}", scheduler.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_without_token_files_warns_when_it_listens_beyond_loopback() {
    let open = Scheduler::start_on(std::net::Ipv4Addr::UNSPECIFIED).await.unwrap();
    let local = Scheduler::start().await.unwrap();
    shoal_tests::wait_for("the open scheduler's warning", Duration::from_secs(10), || open.log().contains("open to anyone who reaches it"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", open.log()));
    let log = local.log();
    assert!(log.contains("open to every local caller") && !log.contains("open to anyone"), "{log}");
}

#[test]
fn check_config_names_the_token_files_but_never_prints_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = "a-secret-token-nobody-may-print";
    std::fs::write(dir.path().join("preheat.token"), format!("{token}\n")).unwrap();
    let config = dir.path().join("shoal.toml");
    std::fs::write(&config, format!("[scheduler]\npreheat_token_file = \"{}\"\n", dir.path().join("preheat.token").display())).unwrap();
    let out = std::process::Command::new(shoal_tests::shoal_bin())
        .args(["scheduler", "--check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("preheat.token") && !printed.contains(token), "{printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_whose_token_file_is_a_placeholder_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.token"), "replace-me\n").unwrap();
    let config = dir.path().join("shoal.toml");
    std::fs::write(&config, format!("[scheduler]\nagent_token_file = \"{}\"\n", dir.path().join("agent.token").display())).unwrap();
    let port = shoal_tests::free_port();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(shoal_tests::shoal_bin())
            .args(["scheduler", "--listen", &format!("127.0.0.1:{port}"), "--config"])
            .arg(&config)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the scheduler must exit, not serve with a placeholder token")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("agent_token_file") && stderr.contains("fewer than the 16") && stderr.contains("/dev/urandom"), "{stderr}");
}
