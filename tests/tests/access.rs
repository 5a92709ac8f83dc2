//! Private stays private, planted bytes never stick: what the mirror holds from one registry and
//! repository, tried as a hostile local client would (another repository, another registry, a
//! registry that says yes to everything, a planted range).

use shoal_tests::hostile::HostileRegistry;
use shoal_tests::{digest_of, random_bytes, Agent, Registry};

const KIB: usize = 1 << 10;

/// GET of `url`, with `alice`'s or no credentials and an optional range: status and body.
async fn get(url: &str, user: Option<(&str, &str)>, range: Option<&str>) -> (u16, Vec<u8>) {
    // Manifests are asked for as containerd does (the registry hides OCI manifests from `*/*`).
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let mut req = reqwest::Client::new().get(url).header("Accept", accept);
    if let Some((u, p)) = user {
        req = req.basic_auth(u, Some(p));
    }
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    // A body cut short (the stream aborted) counts as no body.
    (status, resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default())
}

fn url(agent: &Agent, registry_host: &str, repo: &str, what: &str) -> String {
    format!("{}/v2/{repo}/{what}?ns={}", agent.mirror(), registry_host.replace(':', "%3A"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_private_blob_goes_to_no_other_repository_registry_or_credential() {
    let private = Registry::start(Some(("alice", "s3cret"))).await.unwrap();
    let secret = random_bytes(300 * KIB, 71);
    let digest = private.push_blob("private/app", &secret).await.unwrap();
    let public = Registry::start(None).await.unwrap();
    let open = random_bytes(10 * KIB, 72);
    let open_digest = public.push_blob("pub/app", &open).await.unwrap();
    let hostile = HostileRegistry::start(secret.len() as u64, 0x5a).await.unwrap();
    let agent = Agent::start("").await.unwrap();
    let blob = |host: &str, repo: &str, d: &str| url(&agent, host, repo, &format!("blobs/{d}"));

    let (status, body) = get(&blob(&private.host(), "private/app", &digest), Some(("alice", "s3cret")), None).await;
    assert_eq!((status, digest_of(&body)), (200, digest.clone()), "alice reads her blob");
    agent.wait_stored(&digest).await.unwrap();
    // Anyone may read the public repository: the mirror knows that now.
    let (status, body) = get(&blob(&public.host(), "pub/app", &open_digest), None, None).await;
    assert_eq!((status, digest_of(&body)), (200, open_digest.clone()));

    // The private digest asked for under the public repository and registry, anonymously.
    let (status, body) = get(&blob(&public.host(), "pub/app", &digest), None, None).await;
    assert_ne!(body, secret, "the public registry never had the blob: status {status}");
    assert_eq!(status, 404, "the public registry's answer is passed back");
    // Under the private registry without credentials, or with credentials it does not accept.
    let (status, body) = get(&blob(&private.host(), "private/app", &digest), None, None).await;
    assert_eq!(status, 401);
    assert_ne!(body, secret);
    let (status, body) = get(&blob(&private.host(), "private/app", &digest), Some(("mallory", "guess")), None).await;
    assert_eq!(status, 401);
    assert_ne!(body, secret);
    // A registry that says yes to every digest gets its own fetch, never the cached bytes: whole
    // or in part, before or after a whole pull from it.
    for range in [None, Some("bytes=0-1023"), None, Some("bytes=1000-2000")] {
        let (status, body) = get(&blob(&hostile.host(), "any/repo", &digest), None, range).await;
        assert!(status == 200 || status == 206, "{status}");
        assert!(!body.is_empty() && body.iter().all(|&b| b == 0x5a), "only the lying registry's own bytes ({status}, {range:?})");
    }
    assert!(hostile.requests() >= 4, "every request went to the lying registry");
    let (status, body) = get(&blob(&private.host(), "private/app", &digest), Some(("alice", "s3cret")), None).await;
    assert_eq!((status, body == secret), (200, true), "alice still reads the true blob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_private_manifest_goes_to_no_other_repository_registry_or_credential() {
    let private = Registry::start(Some(("alice", "s3cret"))).await.unwrap();
    private.push_image("private/app", "v1", &[("/secret.txt", b"for alice only\n".to_vec())]).await.unwrap();
    let public = Registry::start(None).await.unwrap();
    public.push_image("pub/app", "v1", &[("/open.txt", b"for everyone\n".to_vec())]).await.unwrap();
    let hostile = HostileRegistry::start(4 * KIB as u64, b'{').await.unwrap();
    let agent = Agent::start("").await.unwrap();
    let manifest = |host: &str, repo: &str, r: &str| url(&agent, host, repo, &format!("manifests/{r}"));

    let (status, body) = get(&manifest(&private.host(), "private/app", "v1"), Some(("alice", "s3cret")), None).await;
    assert_eq!(status, 200);
    let digest = digest_of(&body);
    let (status, by_digest) = get(&manifest(&private.host(), "private/app", &digest), Some(("alice", "s3cret")), None).await;
    assert_eq!((status, &by_digest), (200, &body), "kept by digest for alice: {}", String::from_utf8_lossy(&by_digest));
    assert_eq!(get(&manifest(&public.host(), "pub/app", "v1"), None, None).await.0, 200);

    for (host, repo, user) in [
        (public.host(), "pub/app", None),
        (private.host(), "private/app", None),
        (private.host(), "private/app", Some(("mallory", "guess"))),
        (hostile.host(), "any/repo", None),
    ] {
        let (status, got) = get(&manifest(&host, repo, &digest), user, None).await;
        assert_ne!(got, body, "{host} {repo} {user:?}: the private manifest leaked ({status})");
        assert_ne!(status, 200, "{host} {repo} {user:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_planted_through_a_range_request_reach_no_other_reader() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(400 * KIB, 73);
    let digest = registry.push_blob("team/app", &blob).await.unwrap();
    let hostile = HostileRegistry::start(blob.len() as u64, 0xee).await.unwrap();
    let agent = Agent::start("").await.unwrap();
    let at = |host: &str| url(&agent, host, "team/app", &format!("blobs/{digest}"));

    // The attacker's registry answers a range first: its bytes go to its own client only.
    let (status, planted) = get(&at(&hostile.host()), None, Some("bytes=0-65535")).await;
    assert_eq!(status, 206);
    assert!(planted.iter().all(|&b| b == 0xee));
    // Readers through the real registry get the true bytes, in part and whole, first time.
    for range in ["bytes=0-65535", "bytes=100-200000", "bytes=-1000"] {
        let (status, got) = get(&at(&registry.host()), None, Some(range)).await;
        assert_eq!(status, 206, "{range}");
        let want = match range {
            "bytes=0-65535" => &blob[..65536],
            "bytes=100-200000" => &blob[100..200_001],
            _ => &blob[blob.len() - 1000..],
        };
        assert!(got == want, "{range}: planted bytes reached a reader of the real registry");
    }
    let (status, whole) = get(&at(&registry.host()), None, None).await;
    assert_eq!((status, digest_of(&whole)), (200, digest.clone()), "the first whole pull succeeds");
    agent.wait_stored(&digest).await.unwrap();
    let (status, got) = get(&at(&registry.host()), None, Some("bytes=0-65535")).await;
    assert_eq!((status, got == blob[..65536]), (206, true), "ranges of the stored, verified blob");
    let metrics = agent.metrics().await.unwrap();
    assert_eq!(shoal_tests::metric_value(&metrics, "shoal_tasks_failed_total"), Some(0.0), "no download failed a digest check:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_let_into_one_repository_reads_nothing_cached_from_another() {
    use reqwest::Method;
    use shoal_tests::token_registry::fetch;
    use shoal_tests::TokenRegistry;
    const ALICE: Option<(&str, &str)> = Some(("alice", "alice-pw"));
    const BOB: Option<(&str, &str)> = Some(("bob", "bob-pw"));
    let reg =
        TokenRegistry::start(&[("alice", "alice-pw", &["private/a"]), ("bob", "bob-pw", &["private/b"])], &["public/x"]).await.unwrap();
    let hers = random_bytes(50 * KIB, 74);
    let his = random_bytes(200 * KIB, 75);
    let her_digest = reg.push_blob("private/a", &hers).await.unwrap();
    let his_digest = reg.push_blob("private/b", &his).await.unwrap();
    reg.push_image("private/b", "v1", &[("/bob.txt", b"bob's\n".to_vec())]).await.unwrap();
    let agent = Agent::start("").await.unwrap();
    let at = |repo: &str, what: &str| url(&agent, &reg.host(), repo, what);

    // Bob pulls his blob and manifest through the mirror; alice reads her own repository.
    let resp = fetch(Method::GET, &at("private/b", &format!("blobs/{his_digest}")), BOB).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap() == his);
    agent.wait_stored(&his_digest).await.unwrap();
    let manifest = reqwest::Client::new()
        .get(format!("{}/v2/private/b/manifests/v1", reg.url()))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .bearer_auth(reg.tokens.token(BOB, &["repository:private/b:pull"]).unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let manifest_digest = digest_of(&manifest);
    let resp = fetch(Method::GET, &at("private/b", &format!("manifests/{manifest_digest}")), BOB).await.unwrap();
    assert!(resp.status() == 200 && resp.bytes().await.unwrap() == manifest, "bob reads his manifest through the mirror");
    let resp = fetch(Method::GET, &at("private/a", &format!("blobs/{her_digest}")), ALICE).await.unwrap();
    assert!(resp.status() == 200 && resp.bytes().await.unwrap() == hers);

    // Alice names bob's digests under her repository, his, and the public one: the registry
    // answers for her (404 or 401), never the cache.
    for repo in ["private/a", "private/b", "public/x"] {
        for (what, secret) in [(format!("blobs/{his_digest}"), &his[..]), (format!("manifests/{manifest_digest}"), &manifest[..])] {
            for user in [ALICE, None] {
                let resp = fetch(Method::GET, &at(repo, &what), user).await.unwrap();
                let status = resp.status().as_u16();
                let body = resp.bytes().await.unwrap_or_default();
                assert!(status != 200 && body != secret, "{user:?} read {what} under {repo}: {status}");
            }
        }
    }
    assert_eq!(reg.blob_fetches(&his_digest).len(), 1, "only bob's pull fetched his blob: {:?}", reg.blob_fetches(&his_digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_preheat_calling_a_private_image_public_unlocks_nothing_while_the_registry_is_down() {
    use shoal_proto::scheduler as pb;
    use shoal_tests::{p2p_config, Containerd, Scheduler};
    let mut registry = Registry::start(Some(("alice", "s3cret"))).await.unwrap();
    registry.push_image("private/app", "v1", &[("/secret.txt", b"for alice only\n".to_vec())]).await.unwrap();
    let image = format!("{}/private/app:v1", registry.host());
    // An open scheduler (as `shoal up`'s): anyone who reaches it may preheat.
    let scheduler = Scheduler::start().await.unwrap();
    let node = Agent::start(&p2p_config(&[&scheduler])).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let alice = Containerd::start(&registry.host(), &node.mirror()).await.unwrap();
    assert!(alice.pull(&image, Some("alice:s3cret")).unwrap().status.success(), "{}", node.log());

    // The attacker records alice's manifest in the cluster, marked public.
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let body = reqwest::Client::new()
        .get(format!("{}/v2/private/app/manifests/v1", registry.url()))
        .basic_auth("alice", Some("s3cret"))
        .header("Accept", accept)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let digest = digest_of(&body);
    let layers = registry.image_blobs("private/app", "v1").await.unwrap();
    let forged = pb::Manifest {
        registry: registry.host(),
        repository: "private/app".into(),
        reference: "v1".into(),
        digest: digest.clone(),
        media_type: accept.into(),
        body,
        public: true,
    };
    let blobs = layers
        .iter()
        .map(|(d, len)| pb::Origin { registry: registry.host(), repository: "private/app".into(), digest: d.clone(), length: *len })
        .collect();
    let mut client = pb::scheduler_client::SchedulerClient::connect(format!("http://{}", scheduler.addr())).await.unwrap();
    client.preheat(pb::PreheatRequest { blobs, scope: "all".into(), manifests: vec![forged] }).await.unwrap();

    registry.stop();
    let stranger = Containerd::start(&registry.host(), &node.mirror()).await.unwrap();
    let out = stranger.pull(&image, None).unwrap();
    assert!(!out.status.success(), "a client without credentials got the private image through a forged preheat");
    for what in [format!("manifests/{digest}"), format!("manifests/v1"), format!("blobs/{}", layers[1].0)] {
        let (status, _) = get(&url(&node, &registry.host(), "private/app", &what), None, None).await;
        assert_ne!(status, 200, "{what} without credentials");
    }
}
