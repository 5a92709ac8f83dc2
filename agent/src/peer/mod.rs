//! The peer protocol over QUIC: a host serves the verified pieces of its tasks to other hosts
//! (`GetPiece`) and tells them which pieces it has as they arrive (`SubscribePieces`).

mod client;
mod server;
pub mod tls;
mod traffic;
pub mod wire;

pub use client::{PeerClient, PeerError, Subscription};
pub use server::{PeerServer, PeerServerConfig};
pub use traffic::PeerTraffic;

/// Socket buffer size asked of the kernel for the peer sockets. A shaped link releases its
/// token-bucket burst at once, and one socket carries every connection of the host: with the
/// kernel's default (about 200 KiB, under a hundred datagrams) such a burst overflows it, and
/// the datagrams lost include handshakes, which then wait out QUIC's retransmission backoff.
const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `addr` with large send and receive buffers (as large as the kernel's
/// `net.core.rmem_max` and `net.core.wmem_max` allow; a smaller one is logged).
fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    // Linux reports twice the size it was asked for (it counts its own overhead).
    let (recv, send) = (socket.recv_buffer_size().unwrap_or(0) / 2, socket.send_buffer_size().unwrap_or(0) / 2);
    if recv.min(send) < SOCKET_BUFFER / 4 {
        tracing::info!(
            recv,
            send,
            wanted = SOCKET_BUFFER,
            "peer socket buffers are small; raise net.core.rmem_max and net.core.wmem_max for fewer lost datagrams on bursty links"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A QUIC endpoint on [`udp_socket`].
fn endpoint(addr: std::net::SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, udp_socket(addr)?, runtime)
}
