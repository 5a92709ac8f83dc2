//! The QUIC peer protocol between a real agent process and a peer client: pieces with their
//! digests, subscriptions, refusals, a lying peer, and mutual TLS with a cluster CA.

use shoal_agent::peer::tls::ClusterTls;
use shoal_agent::peer::{PeerClient, PeerError};
use shoal_core::{Digest, TaskId};
use shoal_proto::peer::{Refusal, SubscribePieces};
use shoal_tests::{certs, digest_of, free_port, random_bytes, Agent, Registry};

/// Blobs this small are cut into pieces of the smallest size.
const PIECE: usize = shoal_core::piece::MIN_PIECE_SIZE as usize;

fn task_of(digest: &str) -> TaskId {
    TaskId::of_digest(&digest.parse::<Digest>().unwrap())
}

/// An agent with its peer server on, holding `blob` (pulled through its mirror).
async fn agent_with_blob(
    registry: &Registry,
    repo: &str,
    digest: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> (Agent, std::net::SocketAddr) {
    let port = free_port();
    let agent = Agent::start_with_env(&format!("[peer]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n{extra}"), env).await.unwrap();
    let body = reqwest::get(agent.blob_url(registry, repo, digest)).await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);
    agent.wait_stored(digest).await.unwrap();
    (agent, format!("127.0.0.1:{port}").parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_serves_verified_pieces_and_tells_which_it_has() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(5 * PIECE + 123, 31);
    let digest = registry.push_blob("team/p2p", &blob).await.unwrap();
    let (agent, addr) = agent_with_blob(&registry, "team/p2p", &digest, "", &[]).await;
    let task = task_of(&digest);
    let client = PeerClient::new(None).unwrap();

    let mut sub = client.subscribe(addr, &task, SubscribePieces { registry: registry.host(), ..Default::default() }).await.unwrap();
    let first = sub.next().await.unwrap().unwrap();
    assert_eq!(first.numbers, (0..6).collect::<Vec<u32>>());
    assert!(first.done);
    assert_eq!(first.task_length, blob.len() as u64);
    assert!(sub.next().await.is_none(), "the stream ends after done");

    for n in [0u32, 2, 5] {
        let start = n as usize * PIECE;
        let end = (start + PIECE).min(blob.len());
        let (header, bytes) = client.get_piece(addr, &task, &registry.host(), n, (end - start) as u64, false).await.unwrap();
        assert_eq!(&bytes[..], &blob[start..end], "piece {n}");
        assert_eq!(header.blake3, blake3::hash(&bytes).to_hex().as_str(), "piece {n}");
        assert_eq!(header.offset, start as u64);
    }
    let unknown = TaskId::of_digest(&Digest::of(b"unknown"));
    let err = client.get_piece(addr, &unknown, &registry.host(), 0, 1, false).await.unwrap_err();
    assert!(matches!(&err, PeerError::Refused { refusal: Refusal::NotFound, .. }), "{err}");
    let err = client.get_piece(addr, &task, &registry.host(), 99, 1, false).await.unwrap_err();
    assert!(matches!(&err, PeerError::Refused { refusal: Refusal::NotPresent, .. }), "{err}");
    let err = client.get_piece(addr, &task, &registry.host(), 1, 10, false).await.unwrap_err();
    assert!(matches!(err, PeerError::Length { .. }), "a wrong length is caught before reading");

    // The agent counts the piece bytes it sent and the one connection (the slot of a piece is
    // freed, and its bytes counted, once the client has them all: poll briefly). Pieces 0, 2 and
    // 5; and piece 1 when its bytes were all out before the client, seeing the wrong length,
    // stopped the stream (a race: the server may still be writing them).
    let taken = (2 * PIECE + 123) as u64;
    let counted = |m: &str| [taken, taken + PIECE as u64].iter().any(|sent| m.contains(&format!("shoal_peer_bytes_sent_total {sent}\n")));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let metrics = loop {
        let m = agent.metrics().await.unwrap();
        if counted(&m) || std::time::Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(counted(&metrics), "{metrics}");
    assert!(metrics.contains("shoal_peer_connections 1\n"), "{metrics}");
    // Its QUIC counters: the three pieces the client took and more crossed the connection (of
    // piece 1 perhaps not all: the client stopped it), and the client read the end
    // of the subscription and of both refusals, so at most the four fetches whose bytes it took
    // (or stopped reading, for the wrong length) sent a STOP_SENDING each.
    let counter =
        |name: &str| -> u64 { shoal_tests::metric_value(&metrics, name).unwrap_or_else(|| panic!("no {name} in:\n{metrics}")) as u64 };
    assert!(counter("shoal_peer_udp_bytes_sent_total") > taken, "{metrics}");
    assert!(counter("shoal_peer_udp_datagrams_received_total") > 0, "{metrics}");
    let aborts = counter("shoal_peer_abort_frames_received_total");
    assert!(aborts <= 4, "{aborts} RESET_STREAM/STOP_SENDING frames from the client:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_sends_bytes_that_do_not_match_the_digest() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(2 * PIECE, 32);
    let digest = registry.push_blob("team/liar", &blob).await.unwrap();
    let (_agent, addr) = agent_with_blob(&registry, "team/liar", &digest, "", &[("SHOAL_FAULT_CORRUPT_PIECES", "1")]).await;
    let client = PeerClient::new(None).unwrap();
    let (header, bytes) = client.get_piece(addr, &task_of(&digest), &registry.host(), 1, PIECE as u64, false).await.unwrap();
    assert_ne!(&bytes[..], &blob[PIECE..], "the fault switch must corrupt the bytes");
    assert_eq!(header.blake3, blake3::hash(&blob[PIECE..]).to_hex().as_str(), "the header still names the true digest");
    assert_ne!(header.blake3, blake3::hash(&bytes).to_hex().as_str(), "so a receiver's check fails");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_ca_only_hosts_it_signed_may_fetch() {
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    certs::make_ca(d, "cluster").unwrap();
    certs::make_ca(d, "other").unwrap();
    for (ca, name) in [("cluster", "server"), ("cluster", "member"), ("other", "stranger")] {
        certs::issue(d, ca, name, "DNS:shoal-peer", "serverAuth,clientAuth").unwrap();
    }
    let tls = |ca: &str, name: &str| ClusterTls {
        ca_file: d.join(format!("{ca}.pem")),
        cert_file: d.join(format!("{name}.pem")),
        key_file: d.join(format!("{name}.key")),
    };
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(PIECE, 33);
    let digest = registry.push_blob("team/mtls", &blob).await.unwrap();
    let server = tls("cluster", "server");
    let extra = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        server.ca_file.display(),
        server.cert_file.display(),
        server.key_file.display()
    );
    let (_agent, addr) = agent_with_blob(&registry, "team/mtls", &digest, &extra, &[]).await;
    let task = task_of(&digest);

    let member = PeerClient::new(Some(&tls("cluster", "member"))).unwrap();
    let (_, bytes) = member.get_piece(addr, &task, &registry.host(), 0, PIECE as u64, false).await.unwrap();
    assert_eq!(&bytes[..], &blob[..]);

    let stranger = PeerClient::new(Some(&tls("other", "stranger"))).unwrap();
    assert!(
        stranger.get_piece(addr, &task, &registry.host(), 0, PIECE as u64, false).await.is_err(),
        "a certificate from another CA must be refused"
    );
    let anonymous = PeerClient::new(None).unwrap();
    assert!(
        anonymous.get_piece(addr, &task, &registry.host(), 0, PIECE as u64, false).await.is_err(),
        "a host without a certificate must be refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_holding_a_whole_task_sends_a_piece_again_only_after_a_while() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(4 * PIECE, 33);
    let digest = registry.push_blob("team/seeded", &blob).await.unwrap();
    let (seed, addr) = agent_with_blob(&registry, "team/seeded", &digest, "seed = true\n", &[]).await;
    let task = task_of(&digest);
    let client = PeerClient::new(None).unwrap();

    let (_, bytes) = client.get_piece(addr, &task, &registry.host(), 2, PIECE as u64, false).await.unwrap();
    assert_eq!(&bytes[..], &blob[2 * PIECE..3 * PIECE]);
    // Another child asking for the piece just sent is turned away (it gets it from the first),
    // while the seed's other pieces still go out.
    let err = client.get_piece(addr, &task, &registry.host(), 2, PIECE as u64, false).await.unwrap_err();
    assert!(matches!(&err, PeerError::Refused { refusal: Refusal::Busy, .. }), "{err}");
    let (_, bytes) = client.get_piece(addr, &task, &registry.host(), 3, PIECE as u64, false).await.unwrap();
    assert_eq!(&bytes[..], &blob[3 * PIECE..]);
    // Later it is sent again, for a child that cannot get it elsewhere.
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let (_, bytes) = client.get_piece(addr, &task, &registry.host(), 2, PIECE as u64, false).await.unwrap();
    assert_eq!(&bytes[..], &blob[2 * PIECE..3 * PIECE]);
    let metrics = seed.metrics().await.unwrap();
    assert!(metrics.contains("shoal_peer_busy_refusals_total 1\n"), "the one refusal is counted:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_childs_queued_requests_share_one_upload_slot_and_other_children_find_it_taken() {
    let registry = Registry::start(None).await.unwrap();
    let blob = random_bytes(4 * PIECE, 35);
    let digest = registry.push_blob("team/queued", &blob).await.unwrap();
    // One slot, and pieces paced at 64 KiB/s: each piece holds the slot for about a second.
    let env = [("SHOAL_PEER__UPLOAD_SLOTS", "1"), ("SHOAL_PEER__UPLOAD_RATE_LIMIT", "64KiB")];
    let (agent, addr) = agent_with_blob(&registry, "team/queued", &digest, "", &env).await;
    let task = task_of(&digest);
    let (child, other) = (PeerClient::new(None).unwrap(), PeerClient::new(None).unwrap());

    // Three pieces at once from one child, queued: they share the one slot, none is turned away.
    let queued = futures_util::future::join_all((0..3u32).map(|n| {
        let (child, task, host) = (&child, &task, registry.host());
        async move { child.get_piece(addr, task, &host, n, PIECE as u64, true).await }
    }));
    let others = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        // Meanwhile the slot is taken: another child, and the same child's unqueued request,
        // are turned away.
        let err = other.get_piece(addr, &task, &registry.host(), 3, PIECE as u64, true).await.unwrap_err();
        assert!(matches!(&err, PeerError::Refused { refusal: Refusal::Busy, .. }), "{err}");
        let err = child.get_piece(addr, &task, &registry.host(), 3, PIECE as u64, false).await.unwrap_err();
        assert!(matches!(&err, PeerError::Refused { refusal: Refusal::Busy, .. }), "{err}");
    };
    let (pieces, ()) = tokio::join!(queued, others);
    for (n, piece) in pieces.into_iter().enumerate() {
        let (_, bytes) = piece.unwrap_or_else(|e| panic!("queued piece {n}: {e}"));
        assert_eq!(&bytes[..], &blob[n * PIECE..(n + 1) * PIECE], "piece {n}");
    }
    // Once the queue is done the slot is free again.
    let (_, bytes) = other.get_piece(addr, &task, &registry.host(), 3, PIECE as u64, false).await.unwrap();
    assert_eq!(&bytes[..], &blob[3 * PIECE..]);
    let metrics = agent.metrics().await.unwrap();
    assert!(metrics.contains("shoal_peer_busy_refusals_total 2\n"), "the two refusals are counted:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_mutual_tls_a_private_blob_is_never_served_to_peers() {
    let private = Registry::start(Some(("alice", "s3cret"))).await.unwrap();
    let secret = random_bytes(2 * PIECE, 34);
    let digest = private.push_blob("private/app", &secret).await.unwrap();
    let public = Registry::start(None).await.unwrap();
    let open = random_bytes(2 * PIECE, 35);
    let open_digest = public.push_blob("team/open", &open).await.unwrap();
    let port = free_port();
    let agent = Agent::start(&format!("[peer]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n")).await.unwrap();
    let body = reqwest::Client::new()
        .get(agent.blob_url(&private, "private/app", &digest))
        .basic_auth("alice", Some("s3cret"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(digest_of(&body), digest, "alice reads her blob through the mirror");
    agent.wait_stored(&digest).await.unwrap();
    let body = reqwest::get(agent.blob_url(&public, "team/open", &open_digest)).await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&body), open_digest);
    agent.wait_stored(&open_digest).await.unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let client = PeerClient::new(None).unwrap();

    // Anyone who reaches the peer port asks for the private pieces: refused, no byte sent.
    let err = client.get_piece(addr, &task_of(&digest), &private.host(), 0, PIECE as u64, false).await.unwrap_err();
    assert!(matches!(&err, PeerError::Refused { refusal: Refusal::Forbidden, .. }), "{err}");
    let mut sub =
        client.subscribe(addr, &task_of(&digest), SubscribePieces { registry: private.host(), ..Default::default() }).await.unwrap();
    let first = sub.next().await.unwrap().unwrap();
    assert_eq!(first.refusal(), Refusal::Forbidden, "{first:?}");
    assert!(first.numbers.is_empty() && !first.done, "a refused subscription names no piece: {first:?}");

    // A public blob is served, but only to a request naming the registry it came from.
    let (_, bytes) = client.get_piece(addr, &task_of(&open_digest), &public.host(), 1, PIECE as u64, false).await.unwrap();
    assert_eq!(&bytes[..], &open[PIECE..]);
    let err = client.get_piece(addr, &task_of(&open_digest), "registry.attacker.example", 1, PIECE as u64, false).await.unwrap_err();
    assert!(matches!(&err, PeerError::Refused { refusal: Refusal::NotFound, .. }), "{err}");

    let metrics = agent.metrics().await.unwrap();
    assert_eq!(shoal_tests::metric_value(&metrics, "shoal_peer_refusals_total"), Some(3.0), "{metrics}");
    assert_eq!(shoal_tests::metric_value(&metrics, "shoal_peer_bytes_sent_total"), Some(PIECE as f64), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_private_pieces_go_to_members_and_only_a_seed_certificate_proves_a_seed() {
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    certs::make_ca(d, "cluster").unwrap();
    certs::issue(d, "cluster", "server", "DNS:shoal-peer", "serverAuth,clientAuth").unwrap();
    certs::issue(d, "cluster", "member", "DNS:shoal-peer", "serverAuth,clientAuth").unwrap();
    certs::issue_as(d, "cluster", "seed", "/CN=seed-1/OU=seed", "DNS:shoal-peer", "serverAuth,clientAuth").unwrap();
    let tls = |name: &str| ClusterTls {
        ca_file: d.join("cluster.pem"),
        cert_file: d.join(format!("{name}.pem")),
        key_file: d.join(format!("{name}.key")),
    };
    let peer_tls = |name: &str| {
        let t = tls(name);
        format!(
            "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            t.ca_file.display(),
            t.cert_file.display(),
            t.key_file.display()
        )
    };
    let private = Registry::start(Some(("alice", "s3cret"))).await.unwrap();
    let secret = random_bytes(PIECE, 36);
    let digest = private.push_blob("private/app", &secret).await.unwrap();
    let credentials = format!("[registry.\"{}\"]\nusername = \"alice\"\npassword = \"s3cret\"\n", private.host());
    let (_agent, addr) = agent_with_blob(&private, "private/app", &digest, &format!("{}{credentials}", peer_tls("server")), &[]).await;
    let (_seed, seed_addr) =
        agent_with_blob(&private, "private/app", &digest, &format!("seed = true\n{}{credentials}", peer_tls("seed")), &[]).await;

    let member = PeerClient::new(Some(&tls("member"))).unwrap();
    let (_, bytes) = member.get_piece(addr, &task_of(&digest), &private.host(), 0, PIECE as u64, false).await.unwrap();
    assert_eq!(&bytes[..], &secret[..], "a cluster member gets the private piece");
    assert!(!member.certified_seed(addr).await, "a host whose certificate does not name it a seed is not trusted as one");
    assert!(member.certified_seed(seed_addr).await, "a certificate with OU=seed proves a seed");
    let anonymous = PeerClient::new(None).unwrap();
    assert!(!anonymous.certified_seed(seed_addr).await, "without mutual TLS no host is a certified seed");
}
