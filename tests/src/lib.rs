//! Fixtures for end-to-end tests: a real `docker-registry` (optionally with htpasswd auth, or token
//! auth scoped per repository with a token server in the test) whose access log tells what the
//! origin sent, Shoal agents as real processes, and real containerd instances pulling through them
//! (with `ctr`, or through CRI as the kubelet does).
//! Every fixture cleans up after itself when dropped, even when the test fails.

pub mod certs;
pub mod containerd;
pub mod cri;
pub mod hostile;
pub mod lazy;
pub mod netns;
pub mod registry;
pub mod token_registry;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sha2::Digest as _;

pub use containerd::{Containerd, CriConfig};
pub use cri::Cri;
pub use registry::Registry;
pub use token_registry::TokenRegistry;

/// The value of the sample `name` (a counter's or gauge's, no labels) in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.split(' ').next() == Some(name)).and_then(|l| l.split(' ').nth(1)?.parse().ok())
}

/// A port nobody listens on right now.
///
/// Ports come from below the kernel's ephemeral range (so an outgoing connection cannot take one
/// between here and the server binding it), free for both TCP and UDP (peer servers are QUIC),
/// and never twice from one process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let seed =
        std::process::id() as u64 ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut x = seed | 1;
    for _ in 0..10_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20_000 + (x % 12_000) as u16;
        if given.contains(&port) {
            continue;
        }
        let free = TcpListener::bind(("0.0.0.0", port)).is_ok() && std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok();
        if free {
            given.push(port);
            return port;
        }
    }
    panic!("no free port between 20000 and 32000")
}

/// The `shoal` binary built alongside the tests (`cargo build --release` puts it next to them).
pub fn shoal_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Tests live in target/<profile>/deps/, the benchmark in target/<profile>/.
    let dir = exe.parent().expect("exe dir");
    let bin = [dir.join("shoal"), dir.join("../shoal")].into_iter().find(|p| p.exists());
    bin.unwrap_or_else(|| panic!("no shoal binary next to {}: build it first with `cargo build --release -p shoal`", exe.display()))
}

/// Fails the test with the reason when a tool it needs is missing (the test command installs them).
pub fn require(tool: &str) {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).stdout(Stdio::null()).status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "{tool} is not installed: run the README's test command (sudo bash tests/run.sh), which installs it"
    );
}

/// `sha256:<hex>` of bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Deterministic incompressible bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A Shoal agent process with its own data dir and ports.
pub struct Agent {
    /// Holds config, data and log.
    pub dir: tempfile::TempDir,
    /// The registry mirror's port.
    pub port: u16,
    /// The admin endpoint's port.
    pub admin_port: u16,
    /// Extra TOML appended to the generated config.
    extra: String,
    /// Extra environment variables.
    env: Vec<(String, String)>,
    /// The subcommand run.
    role: String,
    /// The namespace and address it runs at, when not on this host's loopback.
    place: Option<(String, std::net::Ipv4Addr)>,
    /// In `place`, whether it keeps the machine's mount namespace (see [`Agent::start_in_net`]).
    net_only: bool,
    child: Option<Child>,
}

impl Agent {
    /// Starts an agent with `extra` TOML added to its config, and waits until it answers.
    pub async fn start(extra: &str) -> anyhow::Result<Agent> {
        Agent::start_with_env(extra, &[]).await
    }

    /// Starts an agent with extra TOML and environment variables.
    pub async fn start_with_env(extra: &str, env: &[(&str, &str)]) -> anyhow::Result<Agent> {
        Agent::start_role("agent", extra, env).await
    }

    /// Starts `shoal <role>` (`agent`, `seed`, `up`) with extra TOML and environment variables.
    pub async fn start_role(role: &str, extra: &str, env: &[(&str, &str)]) -> anyhow::Result<Agent> {
        let dir = tempfile::Builder::new().prefix("shoal-agent-").tempdir()?;
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut agent = Agent {
            dir,
            port: free_port(),
            admin_port: free_port(),
            extra: extra.into(),
            env,
            role: role.into(),
            place: None,
            net_only: false,
            child: None,
        };
        agent.spawn().await?;
        Ok(agent)
    }

    /// Starts `shoal <role>` inside host `i` of `lab`, listening on that host's address.
    pub async fn start_in(lab: &netns::Lab, i: usize, role: &str, extra: &str, env: &[(&str, &str)]) -> anyhow::Result<Agent> {
        Agent::start_placed(lab, i, role, extra, env, false).await
    }

    /// [`Agent::start_in`] in host `i`'s network namespace only, keeping the machine's mount
    /// namespace: the lazy mounts its snapshotter makes are then seen by a containerd started
    /// with [`Containerd::start_cri_in`], as on a real node.
    pub async fn start_in_net(lab: &netns::Lab, i: usize, role: &str, extra: &str, env: &[(&str, &str)]) -> anyhow::Result<Agent> {
        Agent::start_placed(lab, i, role, extra, env, true).await
    }

    async fn start_placed(
        lab: &netns::Lab,
        i: usize,
        role: &str,
        extra: &str,
        env: &[(&str, &str)],
        net_only: bool,
    ) -> anyhow::Result<Agent> {
        let dir = tempfile::Builder::new().prefix("shoal-agent-").tempdir()?;
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut agent = Agent {
            dir,
            port: 65001,
            admin_port: 65002,
            extra: extra.into(),
            env,
            role: role.into(),
            place: Some((lab.ns(i).to_string(), lab.ip(i))),
            net_only,
            child: None,
        };
        agent.spawn().await?;
        Ok(agent)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The address its listeners are on.
    fn ip(&self) -> String {
        self.place.as_ref().map_or("127.0.0.1".into(), |(_, ip)| ip.to_string())
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `http://<ip>:<port>` of the registry mirror.
    pub fn mirror(&self) -> String {
        format!("http://{}:{}", self.ip(), self.port)
    }

    /// The mirror URL of a blob of `registry`.
    pub fn blob_url(&self, registry: &Registry, repo: &str, digest: &str) -> String {
        format!("{}/v2/{repo}/blobs/{digest}?ns={}", self.mirror(), registry.host().replace(':', "%3A"))
    }

    /// Starts the process; on loopback, with fresh ports if one it was given was taken in the
    /// meantime (a port is free when picked, not necessarily when the agent binds it).
    async fn spawn(&mut self) -> anyhow::Result<()> {
        for _ in 0..2 {
            match self.spawn_once().await {
                Err(e) if self.place.is_none() && e.to_string().contains("Address already in use") => {
                    eprintln!("agent could not bind its ports ({}, {}); trying others", self.port, self.admin_port);
                    (self.port, self.admin_port) = (free_port(), free_port());
                }
                result => return result,
            }
        }
        self.spawn_once().await
    }

    async fn spawn_once(&mut self) -> anyhow::Result<()> {
        let config = self.dir.path().join("shoal.toml");
        // Ports come from the environment so `extra` may have its own [mirror] or [admin] section.
        let text = format!("data_dir = \"{}\"\n{}\n", self.data_dir().display(), self.extra);
        std::fs::write(&config, text)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("agent.log"))?;
        // `TEST_AGENT_LOG` replaces the agents' log filter (e.g. to add `quinn_proto=debug`).
        let filter = std::env::var("TEST_AGENT_LOG").unwrap_or_else(|_| "info,shoal_agent=debug".into());
        let mut cmd = match &self.place {
            Some((ns, _)) if self.net_only => netns::net_only_command(ns, shoal_bin()),
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(shoal_bin());
                c
            }
            None => Command::new(shoal_bin()),
        };
        let ip = self.ip();
        let child = cmd
            .args([self.role.as_str(), "--config"])
            .arg(&config)
            .env("RUST_LOG", filter)
            .env("SHOAL_MIRROR__LISTEN", format!("{ip}:{}", self.port))
            .env("SHOAL_ADMIN__LISTEN", format!("{ip}:{}", self.admin_port))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting shoal agent")?;
        self.child = Some(child);
        let url = format!("http://{ip}:{}/healthz", self.admin_port);
        let start = Instant::now();
        loop {
            if reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("agent exited with {status}:\n{}", self.log());
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("agent did not answer within 20 s:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Kills the agent with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the agent with SIGTERM and waits for it to exit; returns its exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ok()
    }

    /// Starts the agent again with the same config, data and ports.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn_once().await
    }

    /// `/metrics`, Prometheus text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("http://{}:{}/metrics", self.ip(), self.admin_port)).await?.text().await?)
    }

    /// `/status` as JSON.
    pub async fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(reqwest::get(format!("http://{}:{}/status", self.ip(), self.admin_port)).await?.json().await?)
    }

    /// Waits until the blob `digest` is recorded complete in the store (that is written just
    /// after readers get the last bytes).
    pub async fn wait_stored(&self, digest: &str) -> anyhow::Result<()> {
        let task = task_dir(digest);
        wait_for(&format!("{digest} in the store"), Duration::from_secs(10), || self.stored_tasks().contains(&task)).await
    }

    /// Task ids in the store directory with a complete `meta.json`.
    pub fn stored_tasks(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.data_dir().join("tasks")).into_iter().flatten().flatten() {
            let meta = std::fs::read_to_string(e.path().join("meta.json")).unwrap_or_default();
            if meta.contains("\"complete\":true") {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
    }
}

/// The roles a scheduler started with [`Scheduler::start_with_tokens`] has tokens for.
pub const TOKEN_ROLES: [&str; 3] = ["agent", "seed", "preheat"];

/// A `shoal scheduler` process.
pub struct Scheduler {
    pub port: u16,
    ip: std::net::Ipv4Addr,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Scheduler {
    /// Starts a scheduler on a free loopback port and waits until it accepts connections.
    pub async fn start() -> anyhow::Result<Scheduler> {
        Scheduler::start_on("127.0.0.1".parse()?).await
    }

    /// Starts a scheduler on a free loopback port whose API needs a bearer token: one per role
    /// of [`TOKEN_ROLES`], in files [`Scheduler::token_file`] names. It also writes a `wrong`
    /// token file, holding a well-formed token that is none of them.
    pub async fn start_with_tokens() -> anyhow::Result<Scheduler> {
        let dir = tempfile::Builder::new().prefix("shoal-scheduler-").tempdir()?;
        let mut config = String::from("[scheduler]\n");
        let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        for (i, role) in TOKEN_ROLES.into_iter().chain(["wrong"]).enumerate() {
            let path = dir.path().join(format!("{role}.token"));
            // Distinct per role and per run, as `head -c 32 /dev/urandom | base64` would be.
            let secret = hex::encode(random_bytes(16, run ^ std::process::id() as u64 ^ i as u64));
            std::fs::write(&path, format!("{role}-{secret}\n"))?;
            if role != "wrong" {
                config.push_str(&format!("{role}_token_file = \"{}\"\n", path.display()));
            }
        }
        std::fs::write(dir.path().join("shoal.toml"), config)?;
        Scheduler::spawn("127.0.0.1".parse()?, dir).await
    }

    /// Starts a scheduler listening on `ip` (a lab's gateway).
    pub async fn start_on(ip: std::net::Ipv4Addr) -> anyhow::Result<Scheduler> {
        Scheduler::spawn(ip, tempfile::Builder::new().prefix("shoal-scheduler-").tempdir()?).await
    }

    /// Starts `shoal scheduler` on `ip`, with `dir/shoal.toml` as its config if there is one.
    async fn spawn(ip: std::net::Ipv4Addr, dir: tempfile::TempDir) -> anyhow::Result<Scheduler> {
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("scheduler.log"))?;
        let mut cmd = Command::new(shoal_bin());
        cmd.args(["scheduler", "--listen", &format!("{ip}:{port}")]);
        let config = dir.path().join("shoal.toml");
        if config.exists() {
            cmd.arg("--config").arg(config);
        }
        let child = cmd
            .env("RUST_LOG", "info,shoal_scheduler=debug")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting shoal scheduler")?;
        let mut s = Scheduler { port, ip, dir, child: Some(child) };
        let start = Instant::now();
        while std::net::TcpStream::connect((ip, port)).is_err() {
            if let Some(status) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("scheduler exited with {status}:\n{}", s.log());
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("scheduler did not start:\n{}", s.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(s)
    }

    /// The file holding this scheduler's token of `role` (`agent`, `seed`, `preheat`), or
    /// (`wrong`) a token it does not accept. Only for [`Scheduler::start_with_tokens`].
    pub fn token_file(&self, role: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{role}.token"));
        assert!(path.exists(), "no {role} token: start the scheduler with Scheduler::start_with_tokens");
        path
    }

    /// The token of `role`, as [`Scheduler::token_file`] holds it.
    pub fn token(&self, role: &str) -> String {
        std::fs::read_to_string(self.token_file(role)).unwrap_or_default().trim().to_string()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `<ip>:<port>`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// The scheduler's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("scheduler.log")).unwrap_or_default()
    }

    /// Kills it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- scheduler log ---\n{}", self.log());
        }
    }
}

/// TOML turning on the peer server of an agent in a lab (port 65003 on its own address), with
/// these scheduler replicas and the lab's registry reached over plain HTTP.
pub fn lab_p2p_config(schedulers: &[&Scheduler], registry: &Registry) -> String {
    let list: Vec<String> = schedulers.iter().map(|s| format!("\"{}\"", s.addr())).collect();
    format!(
        "[peer]\nenabled = true\nlisten = \"0.0.0.0:65003\"\nschedulers = [{}]\n[registry.\"{}\"]\nplain_http = true\n",
        list.join(", "),
        registry.host()
    )
}

/// TOML turning on an agent's peer server on a free loopback port, with these scheduler replicas.
pub fn p2p_config(schedulers: &[&Scheduler]) -> String {
    let list: Vec<String> = schedulers.iter().map(|s| format!("\"{}\"", s.addr())).collect();
    format!("[peer]\nenabled = true\nlisten = \"127.0.0.1:{}\"\nschedulers = [{}]\n", free_port(), list.join(", "))
}

/// [`p2p_config`] presenting the token in `token_file` to the schedulers.
pub fn p2p_config_with_token(schedulers: &[&Scheduler], token_file: &std::path::Path) -> String {
    format!("{}scheduler_token_file = \"{}\"\n", p2p_config(schedulers), token_file.display())
}

/// The task id (store directory name) of a digest.
pub fn task_dir(digest: &str) -> String {
    digest.replace(':', "-")
}
