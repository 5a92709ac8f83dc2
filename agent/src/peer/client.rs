//! The peer client: one QUIC connection per remote host, one stream per request. On a host that
//! also serves, client and server share one endpoint and one connection per pair of hosts, in
//! whichever direction it was opened: each host both fetches and serves over it, so the pair pays
//! for one handshake, one keep-alive and one set of acknowledgements (which ride on the other
//! direction's pieces), not two.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_core::TaskId;
use shoal_proto::peer::{peer_request::Request, GetPiece, PeerRequest, PieceHeader, PieceUpdate, Refusal, SubscribePieces};

use super::tls::{self, ClusterTls, TlsError};
use super::wire::{self, WireError};

/// Why a peer request failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {addr}: cannot connect: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("peer {addr}: {reason}")]
    Refused { addr: SocketAddr, refusal: Refusal, reason: String },
    #[error("peer {addr}: {source}")]
    Wire { addr: SocketAddr, source: WireError },
    #[error("peer {addr}: sent {got} bytes for piece {piece}, expected {expected}")]
    Length { addr: SocketAddr, piece: u32, got: u64, expected: u64 },
}

/// How long a handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed handshake, requests to that host fail at once for this long instead of each
/// waiting for a handshake of its own.
const CONNECT_BACKOFF: Duration = Duration::from_secs(2);

/// The connection to one host: at most one handshake at a time.
#[derive(Default)]
enum Link {
    #[default]
    None,
    Up(quinn::Connection),
    Failed {
        at: Instant,
        reason: String,
    },
}

/// Connections to other hosts' peer servers.
#[derive(Clone)]
pub struct PeerClient {
    endpoint: quinn::Endpoint,
    links: Arc<Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Link>>>>>,
    /// Where connections this client opens go to be served too (the host's peer server).
    serve: Option<tokio::sync::mpsc::UnboundedSender<quinn::Connection>>,
    /// Whether every host at the other end is authenticated by the cluster CA (mutual TLS).
    authenticated: bool,
}

impl PeerClient {
    /// A client presenting the cluster certificate when there is one.
    pub fn new(cluster: Option<&ClusterTls>) -> Result<PeerClient, TlsError> {
        let mut endpoint = super::endpoint(SocketAddr::from(([0, 0, 0, 0], 0)), None)
            .map_err(|e| TlsError::Quic(format!("cannot open a UDP socket for the peer client: {e}")))?;
        endpoint.set_default_client_config(tls::client_config(cluster)?);
        Ok(PeerClient { endpoint, links: Arc::default(), serve: None, authenticated: cluster.is_some() })
    }

    /// A client on the peer server's own endpoint: the connections it opens are handed to `serve`
    /// (so the other host can fetch over them too), and those the server accepts are used for
    /// requests to their host (see [`PeerClient::adopt`]).
    pub(super) fn sharing(
        mut endpoint: quinn::Endpoint,
        cluster: Option<&ClusterTls>,
        serve: tokio::sync::mpsc::UnboundedSender<quinn::Connection>,
    ) -> Result<PeerClient, TlsError> {
        endpoint.set_default_client_config(tls::client_config(cluster)?);
        Ok(PeerClient { endpoint, links: Arc::default(), serve: Some(serve), authenticated: cluster.is_some() })
    }

    /// A connection another host opened to this one: requests to that host use it, unless one is
    /// open or being opened already. Hosts send from their listening port, so the connection's
    /// remote address is the one their peers know them by.
    pub(super) fn adopt(&self, conn: &quinn::Connection) {
        let link = self.links.lock().unwrap_or_else(|p| p.into_inner()).entry(conn.remote_address()).or_default().clone();
        let Ok(mut link) = link.try_lock() else { return };
        if !matches!(&*link, Link::Up(c) if c.close_reason().is_none()) {
            *link = Link::Up(conn.clone());
        }
    }

    /// The connection to `addr`: the open one, or a new one. Requests arriving while a handshake
    /// runs wait for it rather than start their own (on a congested link, each extra handshake
    /// makes all of them slower).
    async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection, PeerError> {
        let link = self.links.lock().unwrap_or_else(|p| p.into_inner()).entry(addr).or_default().clone();
        let mut link = link.lock().await;
        match &*link {
            Link::Up(c) if c.close_reason().is_none() => return Ok(c.clone()),
            Link::Failed { at, reason } if at.elapsed() < CONNECT_BACKOFF => {
                return Err(PeerError::Connect { addr, reason: reason.clone() });
            }
            _ => {}
        }
        let result = match self.endpoint.connect(addr, tls::SERVER_NAME) {
            Ok(connecting) => match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => Err(format!("handshake failed: {e}")),
                Err(_) => Err(format!("no handshake within {} s", CONNECT_TIMEOUT.as_secs())),
            },
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(c) => {
                *link = Link::Up(c.clone());
                if let Some(serve) = &self.serve {
                    let _ = serve.send(c.clone());
                }
                Ok(c)
            }
            Err(reason) => {
                *link = Link::Failed { at: Instant::now(), reason: reason.clone() };
                Err(PeerError::Connect { addr, reason })
            }
        }
    }

    async fn open(&self, addr: SocketAddr, req: Request) -> Result<(quinn::SendStream, quinn::RecvStream), PeerError> {
        let conn = self.connection(addr).await?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| PeerError::Connect { addr, reason: format!("connection lost: {e}") })?;
        wire::write(&mut send, &PeerRequest { request: Some(req) }).await.map_err(|source| PeerError::Wire { addr, source })?;
        let _ = send.finish();
        Ok((send, recv))
    }

    /// Whether hosts at the other end are authenticated cluster members (mutual TLS is on).
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// Whether the host at `addr` holds a certificate from the cluster CA naming it a seed
    /// (see [`tls::is_seed`]); never without mutual TLS.
    pub async fn certified_seed(&self, addr: SocketAddr) -> bool {
        if !self.authenticated {
            return false;
        }
        match self.connection(addr).await {
            Ok(conn) => tls::is_seed(&conn),
            Err(_) => false,
        }
    }

    /// Fetches piece `n` of `task`: the sender's header and the bytes (not yet checked). With
    /// `queued`, the request is one of several to this host at once that share one upload slot
    /// there (a range read's pieces).
    ///
    /// Once the bytes are here the stream is dropped without reading its end: the STOP_SENDING
    /// that QUIC then sends is what tells the parent at once that its upload slot is free (an
    /// acknowledgement of the last bytes may wait for more packets).
    pub async fn get_piece(
        &self,
        addr: SocketAddr,
        task: &TaskId,
        registry: &str,
        n: u32,
        expected_len: u64,
        queued: bool,
    ) -> Result<(PieceHeader, Bytes), PeerError> {
        let get = GetPiece { task_id: task.to_string(), number: n, registry: registry.into(), queued };
        let (_send, mut recv) = self.open(addr, Request::GetPiece(get)).await?;
        let header: PieceHeader = wire::read(&mut recv).await.map_err(|source| PeerError::Wire { addr, source })?;
        if header.refusal() != Refusal::None || !header.error.is_empty() {
            // A refusal is the whole answer; reading its end saves the parent a STOP_SENDING.
            wire::read_end(&mut recv).await;
            return Err(PeerError::Refused { addr, refusal: header.refusal(), reason: header.error });
        }
        if header.length != expected_len || header.number != n {
            return Err(PeerError::Length { addr, piece: n, got: header.length, expected: expected_len });
        }
        let mut buf = vec![0u8; expected_len as usize];
        recv.read_exact(&mut buf).await.map_err(|e| PeerError::Wire { addr, source: WireError::Read(e) })?;
        Ok((header, Bytes::from(buf)))
    }

    /// Subscribes to the pieces `task` has and gets; `request` names the blob's registry (and,
    /// for a seed, where to fetch a task it lacks).
    pub async fn subscribe(&self, addr: SocketAddr, task: &TaskId, request: SubscribePieces) -> Result<Subscription, PeerError> {
        let req = SubscribePieces { task_id: task.to_string(), ..request };
        let (_send, recv) = self.open(addr, Request::Subscribe(req)).await?;
        Ok(Subscription { addr, recv })
    }
}

/// Updates from one parent about one task.
pub struct Subscription {
    addr: SocketAddr,
    recv: quinn::RecvStream,
}

impl Subscription {
    /// The next update; `None` once the stream ended.
    pub async fn next(&mut self) -> Option<Result<PieceUpdate, PeerError>> {
        match wire::read::<PieceUpdate>(&mut self.recv).await {
            Ok(u) => Some(Ok(u)),
            Err(WireError::Read(quinn::ReadExactError::FinishedEarly(0))) => None,
            Err(source) => Some(Err(PeerError::Wire { addr: self.addr, source })),
        }
    }
}
