//! The scheduler's gRPC service on loopback, driven by a real tonic client.

use std::time::Duration;

use shoal_core::{Digest, TaskId};
use shoal_proto::scheduler as pb;
use shoal_proto::scheduler::peer_command::Command;
use shoal_proto::scheduler::peer_event::Event;
use shoal_proto::scheduler::scheduler_client::SchedulerClient;
use shoal_scheduler::auth::{Access, Role};
use shoal_scheduler::parents::Limits;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

async fn start() -> (SchedulerClient<tonic::transport::Channel>, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(shoal_scheduler::service::serve(listener, Limits::default(), Access::open(), shutdown.clone()));
    let client = SchedulerClient::connect(format!("http://{addr}")).await.unwrap();
    (client, shutdown)
}

async fn announce(c: &mut SchedulerClient<tonic::transport::Channel>, id: &str, port: u16) {
    let host = pb::Host { id: id.into(), peer_addr: format!("127.0.0.1:{port}"), upload_slots: 4, ..Default::default() };
    c.announce_host(pb::AnnounceHostRequest { host: Some(host) }).await.unwrap();
}

struct PeerStream {
    tx: mpsc::Sender<pb::PeerEvent>,
    rx: tonic::Streaming<pb::PeerCommand>,
}

impl PeerStream {
    async fn open(c: &mut SchedulerClient<tonic::transport::Channel>, task: &TaskId, host: &str, len: u64) -> PeerStream {
        let (tx, rx) = mpsc::channel(16);
        let register = pb::Register { task_id: task.to_string(), host_id: host.into(), length: len, origin: None };
        tx.send(pb::PeerEvent { event: Some(Event::Register(register)) }).await.unwrap();
        let rx = c.announce_peer(ReceiverStream::new(rx)).await.unwrap().into_inner();
        PeerStream { tx, rx }
    }

    async fn next(&mut self) -> Command {
        let msg = tokio::time::timeout(Duration::from_secs(5), self.rx.message()).await.expect("a command").unwrap().unwrap();
        msg.command.unwrap()
    }

    async fn send(&self, e: Event) {
        self.tx.send(pb::PeerEvent { event: Some(e) }).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_get_decisions_and_the_digests_sources_report() {
    let (mut c, shutdown) = start().await;
    announce(&mut c, "a", 1001).await;
    announce(&mut c, "b", 1002).await;
    let task = TaskId::of_digest(&Digest::of(b"blob"));

    let mut a = PeerStream::open(&mut c, &task, "a", 1 << 20).await;
    // 1 MiB is 16 pieces: too few to fetch in stripes, so a fetches them all.
    assert!(matches!(a.next().await, Command::BackToSource(b) if (b.first_piece, b.end_piece) == (0, 16)));
    assert!(matches!(a.next().await, Command::Digests(d) if d.digests.is_empty()));

    let mut b = PeerStream::open(&mut c, &task, "b", 1 << 20).await;
    match b.next().await {
        Command::Parents(p) => {
            assert_eq!(p.parents.len(), 1);
            assert_eq!((p.parents[0].host_id.as_str(), p.parents[0].peer_addr.as_str()), ("a", "127.0.0.1:1001"));
        }
        other => panic!("{other:?}"),
    }
    let _known = b.next().await;

    // a fetched piece 1 from the origin: b hears its digest.
    a.send(Event::PieceFinished(pb::PieceFinished { number: 1, blake3: "d1".into() })).await;
    match b.next().await {
        Command::Digests(d) => assert_eq!((d.digests[0].number, d.digests[0].blake3.as_str()), (1, "d1")),
        other => panic!("{other:?}"),
    }

    // b reports a as failing: with nobody else, it must wait for the origin fetcher.
    b.send(Event::PieceFailed(pb::PieceFailed { number: 1, parent_host_id: "a".into(), reason: "reset".into(), unreachable: true })).await;
    assert!(matches!(b.next().await, Command::Wait(_)));

    a.send(Event::Done(pb::Done {})).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stat = c.stat_task(pb::StatTaskRequest { task_id: task.to_string() }).await.unwrap().into_inner();
    assert!(stat.known);
    assert_eq!((stat.length, stat.peers, stat.done, stat.known_pieces), (1 << 20, 2, 1, 1));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_whose_stripe_is_split_is_told_where_it_now_ends() {
    let (mut c, shutdown) = start().await;
    announce(&mut c, "a", 1001).await;
    announce(&mut c, "b", 1002).await;
    let task = TaskId::of_digest(&Digest::of(b"striped blob"));

    // 2 MiB is 32 pieces: two stripes, one per source.
    let mut a = PeerStream::open(&mut c, &task, "a", 2 << 20).await;
    assert!(matches!(a.next().await, Command::BackToSource(s) if (s.first_piece, s.end_piece) == (0, 16)));
    let mut b = PeerStream::open(&mut c, &task, "b", 2 << 20).await;
    assert!(matches!(b.next().await, Command::BackToSource(s) if (s.first_piece, s.end_piece) == (16, 32)));

    // b is done with its stripe before a reported anything, and asks again: it gets the second
    // half of a's, and a hears at once that its stripe now ends there.
    for n in 16..32 {
        b.send(Event::PieceFinished(pb::PieceFinished { number: n, blake3: format!("d{n}") })).await;
    }
    b.send(Event::Register(pb::Register { task_id: task.to_string(), host_id: "b".into(), length: 2 << 20, origin: None })).await;
    let given = loop {
        match b.next().await {
            Command::Digests(_) => continue,
            Command::BackToSource(s) => break s.first_piece..s.end_piece,
            other => panic!("{other:?}"),
        }
    };
    let end = loop {
        match a.next().await {
            Command::Digests(_) => continue,
            Command::StripeEnd(e) => break e.end_piece,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(given, 8..16);
    assert_eq!(end, 8);
    // Only the shortened source is told.
    loop {
        match tokio::time::timeout(Duration::from_millis(300), b.rx.message()).await {
            Err(_) => break,
            Ok(msg) => assert!(!matches!(msg.unwrap().unwrap().command, Some(Command::StripeEnd(_)))),
        }
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_announcements_are_refused_with_a_reason() {
    let (mut c, shutdown) = start().await;
    let err = c.announce_host(pb::AnnounceHostRequest { host: None }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let host = pb::Host { id: "x".into(), peer_addr: "not an address".into(), ..Default::default() };
    let err = c.announce_host(pb::AnnounceHostRequest { host: Some(host) }).await.unwrap_err();
    assert!(err.message().contains("peer_addr"), "{}", err.message());
    // A peer of an unknown host is refused.
    let (tx, rx) = mpsc::channel(1);
    let register =
        pb::Register { task_id: TaskId::of_digest(&Digest::of(b"x")).to_string(), host_id: "ghost".into(), length: 1, origin: None };
    tx.send(pb::PeerEvent { event: Some(Event::Register(register)) }).await.unwrap();
    let err = c.announce_peer(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let bad_task = c.stat_task(pb::StatTaskRequest { task_id: "../etc".into() }).await.unwrap_err();
    assert_eq!(bad_task.code(), tonic::Code::InvalidArgument);
    shutdown.cancel();
}

const AGENT_TOKEN: &str = "agent-token-in-process-0123";
const SEED_TOKEN: &str = "seed-token-in-process-0123";

type Authed = SchedulerClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
struct Bearer(&'static str);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", format!("Bearer {}", self.0).parse().unwrap());
        Ok(req)
    }
}

/// A scheduler with an agent and a seed token, and a client holding each.
async fn start_with_tokens() -> (Authed, Authed, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = |t| shoal_core::bearer::BearerToken::parse(t).unwrap();
    let access = Access::new([(Role::Agent, token(AGENT_TOKEN)), (Role::Seed, token(SEED_TOKEN))]).unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(shoal_scheduler::service::serve(listener, Limits::default(), access, shutdown.clone()));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    (
        SchedulerClient::with_interceptor(channel.clone(), Bearer(AGENT_TOKEN)),
        SchedulerClient::with_interceptor(channel, Bearer(SEED_TOKEN)),
        shutdown,
    )
}

fn denied<T>(r: Result<T, tonic::Status>) -> bool {
    matches!(r, Err(s) if s.code() == tonic::Code::PermissionDenied)
}

fn host(id: &str, seed: bool) -> pb::AnnounceHostRequest {
    pb::AnnounceHostRequest {
        host: Some(pb::Host { id: id.into(), peer_addr: "127.0.0.1:1001".into(), upload_slots: 2, seed, ..Default::default() }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_can_neither_announce_a_seed_nor_act_for_one_the_seed_token_announced() {
    let (mut agent, mut seed, shutdown) = start_with_tokens().await;
    agent.announce_host(host("node-1", false)).await.expect("an agent announces itself");
    let refused = agent.announce_host(host("fake-seed", true)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("seed_token_file"), "{}", refused.message());
    seed.announce_host(host("seed-1", true)).await.expect("a seed announces itself as one");

    // Re-announcing the seed's id would demote it or put another address in its place; leaving,
    // watching its preheat work or reporting for it would stand in for it.
    assert!(denied(agent.announce_host(host("seed-1", false)).await));
    assert!(denied(agent.leave_host(pb::LeaveHostRequest { host_id: "seed-1".into() }).await));
    assert!(denied(agent.watch_jobs(pb::WatchJobsRequest { host_id: "seed-1".into() }).await));
    let report = pb::ReportJobRequest { job_id: "j".into(), host_id: "seed-1".into(), digest: "d".into(), ok: true, error: String::new() };
    assert!(denied(agent.report_job(report).await));
    let task = TaskId::of_digest(&Digest::of(b"blob"));
    let (tx, rx) = mpsc::channel(1);
    let register = pb::Register { task_id: task.to_string(), host_id: "seed-1".into(), length: 1 << 20, origin: None };
    tx.send(pb::PeerEvent { event: Some(Event::Register(register)) }).await.unwrap();
    assert!(denied(agent.announce_peer(ReceiverStream::new(rx)).await));

    // The seed is still a seed: a peer of the task is sent to it as a parent marked seed.
    let (tx, rx) = mpsc::channel(1);
    let register = pb::Register { task_id: task.to_string(), host_id: "node-1".into(), length: 1 << 20, origin: None };
    tx.send(pb::PeerEvent { event: Some(Event::Register(register)) }).await.unwrap();
    let mut commands = agent.announce_peer(ReceiverStream::new(rx)).await.expect("an agent registers its own download").into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), commands.message()).await.unwrap().unwrap().unwrap();
    match first.command.unwrap() {
        Command::Parents(p) => assert!(p.parents.iter().any(|p| p.host_id == "seed-1" && p.seed), "{p:?}"),
        other => panic!("the seed should be the parent: {other:?}"),
    }
    // The seed itself may still do everything for its id.
    seed.announce_host(host("seed-1", true)).await.unwrap();
    seed.leave_host(pb::LeaveHostRequest { host_id: "seed-1".into() }).await.unwrap();
    shutdown.cancel();
}
