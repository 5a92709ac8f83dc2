//! Shoal's configuration: one TOML file, every field documented and defaulted, overridable by
//! `SHOAL_*` environment variables (`SHOAL_MIRROR__LISTEN=127.0.0.1:7000`, `__` between sections).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Where the config file is looked for when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/shoal/shoal.toml";

/// The whole configuration of a Shoal process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding the content store and other state.
    pub data_dir: PathBuf,
    /// Logging.
    pub log: LogConfig,
    /// The registry mirror containerd talks to.
    pub mirror: MirrorConfig,
    /// The admin endpoint: `/metrics`, `/healthz`, `/status`.
    pub admin: AdminConfig,
    /// The local content store.
    pub store: StoreConfig,
    /// How blobs are downloaded from the origin.
    pub download: DownloadConfig,
    /// The peer server other hosts fetch pieces from.
    pub peer: PeerConfig,
    /// The scheduler role (`shoal scheduler`).
    pub scheduler: SchedulerConfig,
    /// The containerd snapshotter (`shoal snapshotter`, or inside the agent).
    pub snapshotter: SnapshotterConfig,
    /// Per-registry settings, keyed by registry host as containerd names it (`docker.io`, `127.0.0.1:5000`).
    pub registry: BTreeMap<String, RegistryConfig>,
}

/// Logging settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `shoal_agent=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Registry mirror settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorConfig {
    /// Address the mirror listens on. containerd's `hosts.toml` points here.
    pub listen: SocketAddr,
    /// Registry used when a request carries no `?ns=` parameter (containerd always sends one).
    pub default_registry: Option<String>,
    /// When true, only registries listed under `[registry."<host>"]` may be reached through the mirror.
    pub only_configured_registries: bool,
    /// How long a successful access check (these client credentials may read this digest in this
    /// repository) is reused before the registry is asked again, in seconds.
    pub auth_cache_seconds: u64,
    /// While a registry cannot be reached, how long (seconds) an access check it answered stays
    /// good: clients keep getting what the registry let them read within this window, nothing else.
    pub offline_grant_seconds: u64,
    /// How many manifests fetched by digest are kept in memory.
    pub manifest_cache_entries: usize,
    /// Seconds a client has to send a whole request head (request line and headers), counted
    /// from when the mirror starts waiting for it. Slow or stalled clients are disconnected, and
    /// so are keep-alive connections idle this long (clients reconnect as they need).
    pub header_read_timeout_seconds: u64,
    /// Largest request head (request line and headers) accepted, at least 8KiB; a larger one is
    /// answered 431 and the connection closed. Registry requests need a few KiB (a bearer token
    /// is the largest part). Bounds what one connection can make the agent hold.
    pub max_header_size: ByteSize,
    /// Most connections open at once; further connections are closed at once (503).
    pub max_connections: usize,
    /// Most connections open at once from one client IP address. Everything on the node
    /// (containerd, kubelet, lazy mounts) connects from 127.0.0.1 and shares this cap: 64
    /// concurrent image pulls take about 256 (containerd's 3 layer downloads and a manifest each).
    pub max_connections_per_client: usize,
}

/// Admin endpoint settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin endpoint at all.
    pub enabled: bool,
    /// Address serving `/metrics` (Prometheus), `/healthz` and `/status` (JSON).
    pub listen: SocketAddr,
}

/// Content store settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Most bytes the store may hold, as a number of bytes or with a unit (`20GiB`, `512MiB`).
    /// A download counts its whole length while it runs, and only the bytes it wrote once it stops.
    pub quota: ByteSize,
    /// When arriving bytes would take usage above this fraction of the quota, eviction starts.
    pub high_watermark: f64,
    /// Eviction removes unused tasks, unfinished downloads first, then least recently used
    /// completed tasks, until usage is below this fraction.
    pub low_watermark: f64,
}

/// Origin download settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadConfig {
    /// Seconds allowed to open a connection to a registry.
    pub connect_timeout_seconds: u64,
    /// Seconds a registry may stay silent mid-response before the request is retried.
    pub read_timeout_seconds: u64,
    /// How many times a failed request to a registry is retried (with exponential backoff).
    pub retries: u32,
    /// Cap on the bytes per second this node downloads from origins, summed over all tasks; 0 = no cap.
    pub rate_limit: ByteSize,
}

/// Peer server settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerConfig {
    /// Serve pieces to other hosts over QUIC.
    pub enabled: bool,
    /// UDP address of the peer server.
    pub listen: SocketAddr,
    /// Pieces uploaded at once; more requests are turned away to other parents. Few slots send
    /// each piece sooner (it shares the uplink with fewer others), so it can be passed on sooner.
    pub upload_slots: usize,
    /// Cap on the bytes per second this node uploads to peers, over all children; 0 = no cap.
    pub upload_rate_limit: ByteSize,
    /// PEM file of the cluster CA. With `cert_file` and `key_file`, peers use mutual TLS and
    /// refuse hosts without a certificate from this CA; without them, self-signed certificates.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate of this host, signed by `ca_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Scheduler replicas (`host:port`). Empty: no peer-to-peer downloads, blobs come from origins.
    pub schedulers: Vec<String>,
    /// A file holding the bearer token this host presents to the scheduler: the token of the
    /// scheduler's `agent_token_file`, or of its `seed_token_file` on a seed. Needed when the
    /// scheduler has token files; without it the scheduler must be open (as `shoal up`'s is).
    pub scheduler_token_file: Option<PathBuf>,
    /// This host's id in the cluster. Default: the advertised `ip:port` of the peer server.
    pub host_id: Option<String>,
    /// The IP other hosts reach this one at. Default: the local address that routes to the first scheduler.
    pub advertise_ip: Option<std::net::IpAddr>,
    /// Availability zone, preferred when choosing parents (e.g. from `topology.kubernetes.io/zone`).
    pub zone: String,
    /// Data centre, preferred next.
    pub idc: String,
    /// This host is a seed: it fetches tasks from origins for children that ask, and is chosen
    /// as a parent last once peers have the data. `shoal seed` sets it.
    pub seed: bool,
}

impl Default for PeerConfig {
    fn default() -> PeerConfig {
        PeerConfig {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 65003)),
            upload_slots: 2,
            upload_rate_limit: ByteSize(0),
            ca_file: None,
            cert_file: None,
            key_file: None,
            schedulers: Vec::new(),
            scheduler_token_file: None,
            host_id: None,
            advertise_ip: None,
            zone: String::new(),
            idc: String::new(),
            seed: false,
        }
    }
}

/// Scheduler role settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Address the scheduler's gRPC API listens on.
    pub listen: SocketAddr,
    /// Most parents handed to a peer at once.
    pub max_parents: usize,
    /// Most hops between the origin and a peer, so a cold fan-out is a pipeline, not a chain.
    pub max_depth: u32,
    /// Peers fetching one task from the origin at once when no seed is available. A cold task is
    /// cut into twice this many stripes (of at least 16 pieces each); each source fetches one
    /// stripe at a time and takes another when it is done, while the other peers get the pieces
    /// from the sources: the registry still sends each byte once.
    pub max_back_to_source: usize,
    /// Once this many ordinary peers hold useful pieces, seeds are not chosen as parents.
    pub enough_peers: usize,
    /// A file holding the bearer token of agents: it lets a host announce itself (not as a seed),
    /// download peer to peer, take preheat work and share access traces. When any of the three
    /// token files is set, every call needs a token, and the role of a missing file is refused.
    /// When none is set, anyone who reaches `listen` may do anything, including announce a fake
    /// seed that is then sent clients' registry credentials: keep such a scheduler on loopback.
    pub agent_token_file: Option<PathBuf>,
    /// A file holding the bearer token of seeds: everything an agent may, and announcing a host
    /// as a seed. Only hosts holding it are ever chosen as seeds.
    pub seed_token_file: Option<PathBuf>,
    /// A file holding the bearer token of preheat callers (`shoal preheat --token-file`): start
    /// preheat jobs (with the manifests agents then serve while a registry is down), follow
    /// them, and read what the cluster knows of a task. Nothing else.
    pub preheat_token_file: Option<PathBuf>,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8002)),
            max_parents: 8,
            max_depth: 6,
            max_back_to_source: 4,
            enough_peers: 2,
            agent_token_file: None,
            seed_token_file: None,
            preheat_token_file: None,
        }
    }
}

/// The containerd snapshotter: containerd's `[proxy_plugins.shoal]` (`type = "snapshot"`)
/// names `socket`, and CRI's `snapshotter = "shoal"` makes every image's snapshots come from it,
/// Shoal images' lazily.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotterConfig {
    /// Run the snapshotter inside `shoal agent`, `shoal seed` and `shoal up` (`shoal snapshotter`
    /// runs it alone either way).
    pub enabled: bool,
    /// The unix socket containerd's proxy plugin `address` names.
    pub socket: PathBuf,
    /// Where snapshots and their metadata live. Default: `<data_dir>/snapshotter`. Keep it on
    /// a filesystem overlayfs accepts as upper (ext4, xfs), not on tmpfs for large images.
    pub root: Option<PathBuf>,
    /// Seconds a Shoal image's lazy mount may take to come up before its pull fails.
    pub mount_timeout_seconds: u64,
}

impl Default for SnapshotterConfig {
    fn default() -> SnapshotterConfig {
        SnapshotterConfig { enabled: false, socket: PathBuf::from("/run/shoal/snapshotter.sock"), root: None, mount_timeout_seconds: 60 }
    }
}

impl SnapshotterConfig {
    /// The snapshot root for a store in `data_dir`.
    pub fn root(&self, data_dir: &Path) -> PathBuf {
        self.root.clone().unwrap_or_else(|| data_dir.join("snapshotter"))
    }
}

/// Settings for one registry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Where the registry really is, when not at `https://<host>` (e.g. `https://registry-1.docker.io`).
    pub endpoint: Option<String>,
    /// Speak plain HTTP. Defaults to true for loopback hosts (as Docker treats localhost), false otherwise.
    pub plain_http: Option<bool>,
    /// Accept any TLS certificate. Only for testing.
    pub insecure_skip_verify: bool,
    /// A PEM file with extra CA certificates to trust, on top of the system roots.
    pub ca_file: Option<PathBuf>,
    /// User name used when a client sends no credentials of its own.
    pub username: Option<String>,
    /// Password (or token) for `username`.
    pub password: Option<String>,
}

impl RegistryConfig {
    /// Whether requests without the client's own credentials carry configured ones.
    pub fn has_credentials(&self) -> bool {
        self.username.is_some()
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: default_data_dir(),
            log: LogConfig::default(),
            mirror: MirrorConfig::default(),
            admin: AdminConfig::default(),
            store: StoreConfig::default(),
            download: DownloadConfig::default(),
            peer: PeerConfig::default(),
            scheduler: SchedulerConfig::default(),
            snapshotter: SnapshotterConfig::default(),
            registry: BTreeMap::new(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}

impl Default for MirrorConfig {
    fn default() -> MirrorConfig {
        MirrorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 65001)),
            default_registry: None,
            only_configured_registries: false,
            auth_cache_seconds: 60,
            offline_grant_seconds: 86_400,
            manifest_cache_entries: 1024,
            header_read_timeout_seconds: 10,
            max_header_size: ByteSize(32 << 10),
            max_connections: 1024,
            max_connections_per_client: 512,
        }
    }
}

/// Request header by which a client of the mirror says it checks every byte of a `Range` it reads
/// against digests of its own (a lazy mount checks each chunk's blake3): the agent may then serve
/// it pieces not yet checked against the blob's digest (fetched for earlier ranges, or from
/// peers), and keep the pieces it fetches for it. Other range readers get only bytes of a blob
/// checked whole, or the origin's.
pub const CHECKED_RANGES_HEADER: &str = "x-shoal-checked-ranges";

/// The base URL of a mirror given as `host:port` or as a URL (`http://host:port`).
pub fn mirror_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

impl MirrorConfig {
    /// The header read timeout as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_seconds)
    }
}

impl Default for AdminConfig {
    fn default() -> AdminConfig {
        AdminConfig { enabled: true, listen: SocketAddr::from(([127, 0, 0, 1], 65002)) }
    }
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig { quota: ByteSize(20 << 30), high_watermark: 0.9, low_watermark: 0.7 }
    }
}

impl Default for DownloadConfig {
    fn default() -> DownloadConfig {
        DownloadConfig { connect_timeout_seconds: 10, read_timeout_seconds: 60, retries: 3, rate_limit: ByteSize(0) }
    }
}

impl DownloadConfig {
    /// The connect timeout as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_seconds)
    }

    /// The read timeout as a duration.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_secs(self.read_timeout_seconds)
    }
}

/// `/var/lib/shoal` for root (a node agent); `$HOME/.local/share/shoal` otherwise, so `shoal up`
/// works for a developer without any setup.
fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    match std::env::var_os("HOME") {
        Some(home) if !root => Path::new(&home).join(".local/share/shoal"),
        _ => PathBuf::from("/var/lib/shoal"),
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration: {0}")]
    Invalid(Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Check(String),
}

impl Config {
    /// Loads defaults, then the TOML file (if `path` is given it must exist; otherwise
    /// [`DEFAULT_CONFIG_PATH`] is read when present), then `SHOAL_*` environment variables.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.into(), source })?;
                figment = figment.merge(Toml::string(&text));
            }
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => figment = figment.merge(Toml::file(DEFAULT_CONFIG_PATH)),
            None => {}
        }
        let config: Config = figment
            .merge(
                Env::prefixed("SHOAL_")
                    .ignore(&["config", "fault_corrupt_pieces", "no_passthrough", "mount_mode", "no_io_uring"])
                    .split("__"),
            )
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
        config.check()?;
        Ok(config)
    }

    /// Rejects values that parse but make no sense.
    pub fn check(&self) -> Result<(), ConfigError> {
        let s = &self.store;
        let p = &self.peer;
        let m = &self.mirror;
        if m.header_read_timeout_seconds == 0 || m.max_connections == 0 || m.max_connections_per_client == 0 {
            return Err(ConfigError::Check(
                "[mirror] header_read_timeout_seconds, max_connections and max_connections_per_client must be at least 1".into(),
            ));
        }
        if m.max_header_size.0 < 8 << 10 {
            return Err(ConfigError::Check(format!("[mirror] max_header_size ({}) must be at least 8KiB", m.max_header_size)));
        }
        if [&p.ca_file, &p.cert_file, &p.key_file].iter().filter(|f| f.is_some()).count() % 3 != 0 {
            return Err(ConfigError::Check("[peer] mutual TLS needs all of ca_file, cert_file and key_file (or none of them)".into()));
        }
        if !(0.0 < s.low_watermark && s.low_watermark <= s.high_watermark && s.high_watermark <= 1.0) {
            return Err(ConfigError::Check(format!(
                "store watermarks must satisfy 0 < low_watermark ({}) <= high_watermark ({}) <= 1",
                s.low_watermark, s.high_watermark
            )));
        }
        Ok(())
    }

    /// The settings for registry `host`, or the defaults.
    pub fn registry(&self, host: &str) -> RegistryConfig {
        self.registry.get(host).cloned().unwrap_or_default()
    }
}

/// A byte count that reads and writes as `20GiB`, `512MiB`, `64KiB`, `1000` (bytes) or a bare integer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if self.0 != 0 && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<ByteSize, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (try 512MiB or 20GiB)"))?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "KiB" | "K" | "KB" => 10,
            "MiB" | "M" | "MB" => 20,
            "GiB" | "G" | "GB" => 30,
            "TiB" | "T" | "TB" => 40,
            other => return Err(format!("unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB or TiB)")),
        };
        n.checked_mul(1 << shift).map(ByteSize).ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// The default configuration as a commented TOML file (`shoal agent --print-default-config`).
pub const DEFAULT_CONFIG_TOML: &str = r#"# Shoal configuration. Every field is optional; these are the defaults.
# Any field can be overridden by an environment variable: SHOAL_<SECTION>__<FIELD>, e.g.
# SHOAL_MIRROR__LISTEN=127.0.0.1:7000 or SHOAL_STORE__QUOTA=50GiB.

# Directory holding the content store and other state.
# Default: /var/lib/shoal for root, $HOME/.local/share/shoal for other users.
# data_dir = "/var/lib/shoal"

[log]
# "text" for people, "json" for log pipelines.
format = "text"
# A tracing filter such as "info" or "shoal_agent=debug,info"; RUST_LOG overrides it.
level = "info"

[mirror]
# Address the registry mirror listens on; containerd's hosts.toml points here.
listen = "127.0.0.1:65001"
# Registry used when a request has no ?ns= parameter (containerd always sends one).
# default_registry = "docker.io"
# When true, only registries listed under [registry."<host>"] may be reached through the mirror.
only_configured_registries = false
# Seconds a successful access check (these credentials may read this digest in this repository)
# is reused before the registry is asked again.
auth_cache_seconds = 60
# While a registry is unreachable, seconds an access check it answered stays good: clients keep
# getting what it let them read within this window, and nothing else.
offline_grant_seconds = 86400
# Manifests fetched by digest kept in memory.
manifest_cache_entries = 1024
# Seconds a client has to send a whole request head (request line and headers); slow or stalled
# clients, and keep-alive connections idle this long, are disconnected.
header_read_timeout_seconds = 10
# Largest request head accepted (at least 8KiB); larger ones get 431 and the connection closes.
max_header_size = "32KiB"
# Most connections open at once; further ones are closed at once with a 503.
max_connections = 1024
# Most connections open at once from one client address. Everything on the node (containerd,
# kubelet, lazy mounts) connects from 127.0.0.1 and shares this: 64 concurrent image pulls take
# about 256 (containerd's 3 layer downloads and a manifest each).
max_connections_per_client = 512

[admin]
# Serve the admin endpoint at all.
enabled = true
# Address serving /metrics (Prometheus), /healthz and /status (JSON).
listen = "127.0.0.1:65002"

[store]
# Most bytes the content store may hold (B, KiB, MiB, GiB, TiB). A download counts its whole
# length while it runs, and only the bytes it wrote once it stops.
quota = "20GiB"
# Eviction starts when arriving bytes would take usage above this fraction of the quota...
high_watermark = 0.9
# ...and removes unused tasks, unfinished downloads first, then least recently used completed
# ones, until usage is below this fraction.
low_watermark = 0.7

[download]
# Seconds allowed to open a connection to a registry.
connect_timeout_seconds = 10
# Seconds a registry may stay silent mid-response before the request is retried.
read_timeout_seconds = 60
# Retries of a failed registry request, with exponential backoff.
retries = 3
# Cap on bytes per second downloaded from origins by this node, over all tasks; 0 = no cap.
rate_limit = 0

[peer]
# Serve pieces to other hosts over QUIC.
enabled = false
# UDP address of the peer server.
listen = "0.0.0.0:65003"
# Pieces uploaded at once; more requests are turned away to other parents. Few slots send each
# piece sooner (it shares the uplink with fewer others), so it can be passed on sooner.
upload_slots = 2
# Cap on bytes per second uploaded to peers, over all children ("50MiB"); 0 = no cap. Leaves
# the rest of the node's uplink to its workloads. Pieces are sent paced, in 16 KiB writes.
upload_rate_limit = 0
# Mutual TLS: the cluster CA, and this host's certificate and key signed by it (PEM). Peers then
# refuse hosts without a certificate from this CA. Without them, certificates are self-signed.
# ca_file = "/etc/shoal/peer-ca.pem"
# cert_file = "/etc/shoal/peer.pem"
# key_file = "/etc/shoal/peer-key.pem"
# Scheduler replicas; empty means no peer-to-peer downloads (blobs come from the origins).
schedulers = []
# A file holding the bearer token this host presents to the scheduler: the scheduler's agent
# token, or its seed token on a seed. Needed when the scheduler has token files.
# scheduler_token_file = "/etc/shoal/tokens/agent"
# This host's id in the cluster. Default: the advertised ip:port of the peer server.
# host_id = "node-1"
# The IP other hosts reach this one at. Default: the local address that routes to the first scheduler.
# advertise_ip = "10.0.0.5"
# Availability zone and data centre, preferred when choosing parents.
zone = ""
idc = ""
# A seed fetches tasks from origins for children that ask (shoal seed sets this).
seed = false

[scheduler]
# Address the scheduler's gRPC API listens on (shoal scheduler).
listen = "0.0.0.0:8002"
# Most parents handed to a peer at once.
max_parents = 8
# Most hops between the origin and a peer, so a cold fan-out is a pipeline, not a chain.
max_depth = 6
# Peers fetching one task from the origin at once when no seed is available. A cold task is
# cut into twice this many stripes (of at least 16 pieces each); each source fetches one at a
# time and takes another when it is done.
max_back_to_source = 4
# Once this many ordinary peers hold useful pieces, seeds are not chosen as parents.
enough_peers = 2
# Files each holding one bearer token (make one with `head -c 32 /dev/urandom | base64`). Agents
# may announce themselves, download peer to peer and take preheat work; seeds may also announce
# as seeds; preheat callers may only start and follow preheat jobs. When any file is set, every
# call needs a token. When none is, anyone who reaches `listen` may do anything, including pose
# as a seed and be sent clients' registry credentials: keep such a scheduler on loopback.
# agent_token_file = "/etc/shoal/tokens/agent"
# seed_token_file = "/etc/shoal/tokens/seed"
# preheat_token_file = "/etc/shoal/tokens/preheat"

[snapshotter]
# Run the containerd snapshotter inside `shoal agent`, `seed` and `up` (`shoal snapshotter` runs
# it alone). containerd's config then has [proxy_plugins.shoal] type = "snapshot",
# address = <socket>, and CRI's snapshotter = "shoal" with disable_snapshot_annotations = false.
enabled = false
# The unix socket containerd's proxy plugin address names.
socket = "/run/shoal/snapshotter.sock"
# Where snapshots and their metadata live. Default: <data_dir>/snapshotter.
# root = "/var/lib/shoal/snapshotter"
# Seconds a Shoal image's lazy mount may take to come up before its pull fails.
mount_timeout_seconds = 60

# Per-registry settings, keyed by the host containerd uses for the image.
# [registry."docker.io"]
# endpoint = "https://registry-1.docker.io"   # where the registry really is
# plain_http = false                           # default: true for loopback hosts, false otherwise
# insecure_skip_verify = false                 # accept any TLS certificate (testing only)
# ca_file = "/etc/shoal/registry-ca.pem"       # extra CA certificates, PEM
# username = "robot"                           # used when a client sends no credentials of its own
# password = "secret"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_text_matches_defaults() {
        let parsed: Config = toml::from_str(DEFAULT_CONFIG_TOML).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn a_mirror_address_becomes_a_url() {
        assert_eq!(mirror_url("127.0.0.1:65001"), "http://127.0.0.1:65001");
        assert_eq!(mirror_url("https://m.example"), "https://m.example");
    }

    #[test]
    fn byte_sizes_parse_and_print() {
        assert_eq!("20GiB".parse::<ByteSize>().unwrap(), ByteSize(20 << 30));
        assert_eq!("512 MiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 20));
        assert_eq!("17".parse::<ByteSize>().unwrap(), ByteSize(17));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("99999999999TiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(3 << 20).to_string(), "3MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's test jail returns its own error type
    fn file_and_environment_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.toml");
        std::fs::write(&path, "[store]\nquota = \"1GiB\"\n[registry.\"127.0.0.1:5000\"]\nusername = \"u\"\n").unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("SHOAL_MIRROR__LISTEN", "127.0.0.1:7000");
            let c = Config::load(Some(&path)).map_err(|e| e.to_string())?;
            assert_eq!(c.store.quota, ByteSize(1 << 30));
            assert_eq!(c.mirror.listen.port(), 7000);
            assert_eq!(c.registry("127.0.0.1:5000").username.as_deref(), Some("u"));
            Ok(())
        });
    }

    #[test]
    fn mirror_limits_that_would_refuse_every_request_are_rejected() {
        let mut c = Config::default();
        c.mirror.max_header_size = ByteSize(4 << 10);
        assert!(c.check().unwrap_err().to_string().contains("max_header_size"));
        let mut c = Config::default();
        c.mirror.max_connections_per_client = 0;
        assert!(c.check().is_err());
        assert!(Config::default().check().is_ok());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(toml::from_str::<Config>("[mirror]\nlisten_port = 1\n").is_err());
    }
}
