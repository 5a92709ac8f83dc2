//! TLS for the peer protocol. By default every host makes itself a self-signed certificate and
//! peers accept any certificate (the pieces are checked against their digests anyway). With a
//! cluster CA configured, both sides must present a certificate it signed (mutual TLS), so a host
//! outside the cluster can neither fetch nor serve pieces.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The ALPN id of the peer protocol. Version 3: requests name the blob's registry and refusals
/// are typed; a host of version 2 would serve any registry's task (their handshake fails and each
/// fetches elsewhere).
pub const ALPN: &[u8] = b"shoal-peer/3";
/// The organisational unit (`OU`) in the subject of a cluster certificate that makes its host a
/// seed, trusted with clients' registry credentials (`openssl req -subj "/CN=node-1/OU=seed"`).
pub const SEED_UNIT: &str = "seed";
/// The name peers present and expect in certificates.
pub const SERVER_NAME: &str = "shoal-peer";

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("QUIC TLS setup: {0}")]
    Quic(String),
}

/// Whether the host at the other end of `conn` presented a certificate naming it a seed (see
/// [`SEED_UNIT`]). Only meaningful under mutual TLS, where the cluster CA verified that certificate.
pub fn is_seed(conn: &quinn::Connection) -> bool {
    let Some(identity) = conn.peer_identity() else { return false };
    let Ok(certs) = identity.downcast::<Vec<CertificateDer<'static>>>() else { return false };
    certs.first().is_some_and(|c| certificate_units(c).iter().any(|u| u == SEED_UNIT))
}

/// The organisational units in a certificate's subject.
fn certificate_units(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return Vec::new() };
    parsed.subject().iter_organizational_unit().filter_map(|u| u.as_str().ok().map(String::from)).collect()
}

/// Where a cluster's mutual-TLS material lives.
#[derive(Clone, Debug)]
pub struct ClusterTls {
    /// PEM of the cluster CA.
    pub ca_file: std::path::PathBuf,
    /// PEM certificate of this host, signed by the CA.
    pub cert_file: std::path::PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: std::path::PathBuf,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let err = |reason: String| TlsError::File { path: path.display().to_string(), reason };
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))?.collect();
    let certs = certs.map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

fn read_pem_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File { path: path.display().to_string(), reason: e.to_string() })
}

fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_pem_certs(ca)? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

/// This host's certificate and key: the cluster's, or a fresh self-signed one.
fn identity(cluster: Option<&ClusterTls>) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    match cluster {
        Some(c) => Ok((read_pem_certs(&c.cert_file)?, read_pem_key(&c.key_file)?)),
        None => {
            let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])?;
            let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(|e| TlsError::Quic(e.to_string()))?;
            Ok((vec![ck.cert.der().clone()], key))
        }
    }
}

/// The QUIC server configuration of the peer server.
pub fn server_config(cluster: Option<&ClusterTls>) -> Result<quinn::ServerConfig, TlsError> {
    let (certs, key) = identity(cluster)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match cluster {
        Some(c) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&c.ca_file)?, provider())
                .build()
                .map_err(|e| TlsError::Quic(e.to_string()))?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(false));
    Ok(config)
}

/// The QUIC client configuration for fetching from peers.
pub fn client_config(cluster: Option<&ClusterTls>) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider()).with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match cluster {
        Some(c) => {
            let (certs, key) = identity(Some(c))?;
            builder.with_root_certificates(roots(&c.ca_file)?).with_client_auth_cert(certs, key)?
        }
        None => builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyCertificate(provider()))).with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(true));
    Ok(config)
}

/// Windows large enough for a piece to stream at line rate on a LAN.
fn transport(client: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    t.max_concurrent_bidi_streams(256u32.into());
    // Cubic: a peer connection carries short bursts (a piece, then nothing until the next
    // request), and BBR's bandwidth estimate from such app-limited bursts stays low, so parents
    // left their uplinks idle; with Cubic the 16-node benchmark fan-out finishes 15 % sooner.
    t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
    // Full-size packets from the first one, as TCP starts from the interface MTU: probing up to
    // it from QUIC's 1200 bytes cost four padded probes per connection and direction, and with a
    // connection to most other hosts that was 3 % of what crossed a node's downlink in a 32-node
    // fan-out of 8 MiB. A path that cannot carry them (an overlay with a smaller MTU) loses a few,
    // and QUIC's black hole detection then falls back to 1200 bytes.
    t.initial_mtu(1452);
    // Acknowledge every eighth packet (or after 40 ms) instead of every second: acknowledgements
    // cross the shaped links like pieces do, and each costs a packet of its own. 32 nodes
    // finished at 1.23–1.24× the bound with this, 1.27–1.29× without.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(7u32.into()).max_ack_delay(Some(std::time::Duration::from_millis(40)));
    t.ack_frequency_config(Some(ack));
    // A dead host (no close, just silence) is noticed within seconds, so its children move on.
    // Only the side that opened the connection sends keep-alives: the other's answers are enough
    // for both to notice.
    if client {
        t.keep_alive_interval(Some(std::time::Duration::from_secs(1)));
    }
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(4_000))));
    Arc::new(t)
}

/// Accepts any server certificate but still checks the handshake signature: without a cluster CA,
/// peers are anonymous and the pieces' digests are what is trusted.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used by the peer protocol".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
