//! Starting and stopping the agent: open the store, bind the mirror and admin listeners, serve
//! until told to stop, then drain.

use std::sync::Arc;

use shoal_core::config::Config;
use shoal_core::metrics::Metrics;
use shoal_core::registry::RegistryClient;
use shoal_core::store::{Store, StoreError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admin::Admin;
use crate::engine::Engine;
use crate::mirror::Mirror;
use crate::peer::tls::ClusterTls;
use crate::peer::{PeerServer, PeerServerConfig};
use crate::serve::{serve, ConnectionLimits};

/// The admin endpoint answers a metrics scraper, probes and `shoal status`: a few short requests.
const ADMIN_LIMITS: ConnectionLimits = ConnectionLimits {
    header_read_timeout: std::time::Duration::from_secs(10),
    max_header_size: 16 << 10,
    max_connections: 64,
    max_connections_per_client: 64,
};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the content store: {0}")]
    Store(#[from] StoreError),
    #[error("peer server: {0}")]
    Peer(#[from] crate::peer::tls::TlsError),
    #[error("cannot tell which address other hosts reach this one at (scheduler {scheduler}: {reason}); set [peer] advertise_ip")]
    Advertise { scheduler: String, reason: String },
    #[error("cannot listen on {addr} for the {what}: {source} (is another agent running? change [{section}] listen)")]
    Bind { what: &'static str, section: &'static str, addr: std::net::SocketAddr, source: std::io::Error },
    #[error("[peer] scheduler_token_file: {0}")]
    SchedulerToken(shoal_core::bearer::TokenError),
}

/// The local IP that routes to `scheduler` (`host:port`): what other hosts will reach us at.
async fn route_ip(scheduler: &str) -> Result<std::net::IpAddr, StartError> {
    let err = |reason: String| StartError::Advertise { scheduler: scheduler.to_string(), reason };
    let addr = tokio::net::lookup_host(scheduler).await.map_err(|e| err(e.to_string()))?.next().ok_or_else(|| err("no address".into()))?;
    let bind: std::net::SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = tokio::net::UdpSocket::bind(bind).await.map_err(|e| err(e.to_string()))?;
    // Connecting a UDP socket sends nothing; it only picks the route and so the source address.
    socket.connect(addr).await.map_err(|e| err(e.to_string()))?;
    Ok(socket.local_addr().map_err(|e| err(e.to_string()))?.ip())
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let store = {
        let c = config.clone();
        tokio::task::spawn_blocking(move || Store::open(&c.data_dir, c.store.quota.0, c.store.high_watermark, c.store.low_watermark))
            .await
            .map_err(|e| StoreError::Io { path: config.data_dir.clone(), source: std::io::Error::other(e) })??
    };
    let registry = Arc::new(RegistryClient::new(config.clone()));
    let engine = Arc::new(Engine::new(store, registry, config.download.rate_limit.0, &metrics));
    let mirror = Arc::new(Mirror::new(engine.clone(), config.clone(), &metrics));

    let listen = config.mirror.listen;
    let listener = TcpListener::bind(listen).await.map_err(|source| StartError::Bind {
        what: "registry mirror",
        section: "mirror",
        addr: listen,
        source,
    })?;
    info!(addr = %listen, data_dir = %config.data_dir.display(), "registry mirror listening");
    let mut servers = tokio::task::JoinSet::new();
    {
        let mirror = mirror.clone();
        let handler = Arc::new(move |req| mirror.clone().handle(req));
        let limits = ConnectionLimits {
            header_read_timeout: config.mirror.header_read_timeout(),
            max_header_size: usize::try_from(config.mirror.max_header_size.0).unwrap_or(usize::MAX),
            max_connections: config.mirror.max_connections,
            max_connections_per_client: config.mirror.max_connections_per_client,
        };
        servers.spawn(serve(listener, "mirror", handler, limits, metrics.clone(), shutdown.clone()));
    }
    if config.admin.enabled {
        let addr = config.admin.listen;
        let listener =
            TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what: "admin endpoint", section: "admin", addr, source })?;
        info!(%addr, "admin endpoint listening (/metrics, /healthz, /status)");
        let admin = Arc::new(Admin { engine: engine.clone(), metrics: metrics.clone(), mirror: listen.to_string() });
        let handler = Arc::new(move |req| admin.clone().handle(req));
        servers.spawn(serve(listener, "admin", handler, ADMIN_LIMITS, metrics.clone(), shutdown.clone()));
    }
    if config.peer.enabled {
        let p = &config.peer;
        let cluster_tls = match (&p.ca_file, &p.cert_file, &p.key_file) {
            (Some(ca), Some(cert), Some(key)) => Some(ClusterTls { ca_file: ca.clone(), cert_file: cert.clone(), key_file: key.clone() }),
            _ => None,
        };
        let peer_config = PeerServerConfig {
            listen: p.listen,
            upload_slots: p.upload_slots,
            upload_rate: p.upload_rate_limit.0,
            cluster_tls,
            corrupt_pieces: std::env::var_os("SHOAL_FAULT_CORRUPT_PIECES").is_some(),
            seed: p.seed,
        };
        let server = PeerServer::bind(&peer_config, &metrics)?;
        let bound = server.local_addr().map_err(|e| crate::peer::tls::TlsError::Quic(e.to_string()))?;
        info!(addr = %bound, mutual_tls = peer_config.cluster_tls.is_some(), upload_slots = p.upload_slots, upload_rate_limit = %p.upload_rate_limit, "peer server listening (QUIC)");
        if !p.schedulers.is_empty() {
            let ip = match p.advertise_ip {
                Some(ip) => ip,
                None => route_ip(&p.schedulers[0]).await?,
            };
            let advertise = std::net::SocketAddr::new(ip, bound.port());
            let token =
                shoal_core::bearer::BearerToken::read_optional(p.scheduler_token_file.as_deref()).map_err(StartError::SchedulerToken)?;
            let p2p_config = crate::p2p::P2pConfig {
                host_id: p.host_id.clone().unwrap_or_else(|| advertise.to_string()),
                advertise,
                schedulers: p.schedulers.clone(),
                max_children: (p.upload_slots * crate::p2p::CHILDREN_PER_UPLOAD_SLOT) as u32,
                sending_slots: p.upload_slots as u32,
                zone: p.zone.clone(),
                idc: p.idc.clone(),
                seed: p.seed,
                credential: crate::schedulers::Credential::new(token.as_ref()),
            };
            info!(host = %p2p_config.host_id, %advertise, schedulers = ?p.schedulers, "peer-to-peer downloads on");
            let p2p = crate::p2p::P2p::new(p2p_config, server.client());
            engine.enable_p2p(p2p.clone());
            servers.spawn(p2p.clone().announce_loop(shutdown.clone()));
            servers.spawn(p2p.job_loop(engine.clone(), shutdown.clone()));
        }
        servers.spawn(server.run(engine.clone(), peer_config, shutdown.clone()));
    }
    while servers.join_next().await.is_some() {}
    engine.flush_all().await;
    info!("agent stopped");
    Ok(())
}
