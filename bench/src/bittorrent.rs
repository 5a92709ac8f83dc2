//! The BitTorrent baseline: a mature P2P system on the same shaped network. opentracker tracks,
//! `aria2c` on the origin host seeds the blob and `aria2c` on every node downloads it (and keeps
//! seeding for the others) — the registry's role is played by the origin host's seeder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use shoal_tests::netns::Lab;
use shoal_tests::{free_port, require};

/// Kills and reaps a child on drop, so nothing outlives an interrupted run.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one swarm run measured.
pub struct SwarmRun {
    /// Per node, seconds from its start until it held the whole file.
    pub seconds: Vec<f64>,
    /// Bytes the origin host sent (its interface counter: payload plus TCP/IP and BitTorrent overhead).
    pub origin_bytes: u64,
}

fn tx_bytes(lab: &Lab, i: usize) -> anyhow::Result<u64> {
    let out = lab.command(i, "cat").arg("/sys/class/net/eth0/statistics/tx_bytes").output()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().context("reading the origin host's tx_bytes")
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn aria2(lab: &Lab, host: usize, dir: &Path, torrent: &Path, extra: &[String]) -> anyhow::Result<Reaped> {
    let mut cmd = lab.command(host, "aria2c");
    cmd.args([
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=true",
        "--bt-tracker-interval=2",
        "--bt-max-peers=0",
        "--seed-ratio=0.0",
        "--seed-time=100000",
        "--file-allocation=none",
        "--check-certificate=false",
        "--summary-interval=0",
        "--console-log-level=warn",
        "--max-overall-upload-limit=0",
        &format!("--listen-port={}", 6881),
        &format!("--dir={}", dir.display()),
        &format!("--log={}", dir.join("aria2.log").display()),
        "--log-level=notice",
    ]);
    cmd.args(extra).arg(torrent);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(dir.join("aria2.err"))?);
    Ok(Reaped(cmd.spawn().context("starting aria2c")?))
}

/// How many seeders the tracker lists for the torrent (from its public scrape page).
fn seeders(tracker: std::net::Ipv4Addr, port: u16, hash: &str) -> anyhow::Result<u64> {
    use std::io::{Read, Write};
    let escaped: String = hash.as_bytes().chunks(2).map(|pair| format!("%{}", String::from_utf8_lossy(pair))).collect();
    let mut conn = std::net::TcpStream::connect((tracker, port))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(conn, "GET /scrape?info_hash={escaped} HTTP/1.0\r\n\r\n")?;
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply)?;
    let reply = String::from_utf8_lossy(&reply);
    let count = reply.split_once("8:completei").and_then(|(_, rest)| rest.split_once('e')).and_then(|(n, _)| n.parse().ok()).unwrap_or(0);
    Ok(count)
}

/// Runs the swarm: `file` seeded on host `origin`, downloaded by `nodes` (node `k` starting
/// `k * stagger` after the first).
pub fn run(lab: &Lab, origin: usize, nodes: &[usize], file: &Path, stagger: Duration, timeout: Duration) -> anyhow::Result<SwarmRun> {
    for tool in ["aria2c", "opentracker", "transmission-create", "transmission-show", "setpriv"] {
        require(tool);
    }
    let work = tempfile::Builder::new().prefix("shoal-bench-bt-").tempdir()?;
    let port = free_port();
    let announce = format!("http://{}:{port}/announce", lab.gateway());
    let torrent = work.path().join("blob.torrent");
    let out = Command::new("transmission-create")
        .args(["-o"])
        .arg(&torrent)
        .args(["-t", &announce, "-s", "1024"])
        .arg(file)
        .output()
        .context("running transmission-create")?;
    if !out.status.success() {
        bail!("transmission-create failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let shown = Command::new("transmission-show").arg(&torrent).output()?;
    let shown = String::from_utf8_lossy(&shown.stdout);
    let hash = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix("Hash:"))
        .map(|h| h.trim().to_string())
        .context("no info hash in transmission-show's output")?;
    // opentracker refuses to run as root and, given a whitelist, tracks only what it lists.
    let whitelist = work.path().join("whitelist");
    std::fs::write(&whitelist, format!("{hash}\n"))?;
    std::fs::set_permissions(work.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::set_permissions(&whitelist, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    std::fs::set_permissions(&torrent, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let tracker_log = std::fs::File::create(work.path().join("tracker.log"))?;
    let tracker = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "opentracker"])
        .args(["-i", &lab.gateway().to_string(), "-p", &port.to_string(), "-P", &port.to_string(), "-w"])
        .arg(&whitelist)
        .current_dir(work.path())
        .stdout(Stdio::null())
        .stderr(tracker_log)
        .spawn()
        .context("starting opentracker")?;
    let _tracker = Reaped(tracker);
    let started = Instant::now();
    while std::net::TcpStream::connect((lab.gateway(), port)).is_err() {
        if started.elapsed() > Duration::from_secs(5) {
            bail!("opentracker did not start: {}", std::fs::read_to_string(work.path().join("tracker.log")).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // The origin seeds from the file's own directory.
    let seed_dir = work.path().join("origin");
    std::fs::create_dir_all(&seed_dir)?;
    let name = file.file_name().context("blob file name")?;
    std::fs::hard_link(file, seed_dir.join(name)).or_else(|_| std::fs::copy(file, seed_dir.join(name)).map(|_| ()))?;
    // aria2 seeds a complete file only after checking it (`-V`); the swarm starts once the tracker
    // lists the seeder.
    let _seeder = aria2(lab, origin, &seed_dir, &torrent, &["--check-integrity=true".into()])?;
    let started = Instant::now();
    while seeders(lab.gateway(), port, &hash)? == 0 {
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the origin's aria2c never announced itself as a seeder: {}",
                std::fs::read_to_string(seed_dir.join("aria2.log")).unwrap_or_default()
                    + &std::fs::read_to_string(seed_dir.join("aria2.err")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = tx_bytes(lab, origin)?;

    let mut leechers = Vec::new();
    let mut done_files: Vec<(PathBuf, PathBuf, f64)> = Vec::new();
    let t0 = now_unix();
    for (k, &host) in nodes.iter().enumerate() {
        let start_at = t0 + stagger.as_secs_f64() * k as f64;
        let wait = start_at - now_unix();
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
        let dir = work.path().join(format!("node-{host}"));
        std::fs::create_dir_all(&dir)?;
        let done = dir.join("done");
        let hook = dir.join("on-complete.sh");
        std::fs::write(&hook, format!("#!/bin/sh\ndate +%s.%N > {}\n", done.display()))?;
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let started = now_unix();
        leechers.push(aria2(lab, host, &dir, &torrent, &[format!("--on-bt-download-complete={}", hook.display())])?);
        done_files.push((done, dir.join(name), started));
    }
    let deadline = Instant::now() + timeout;
    let mut seconds = vec![None; done_files.len()];
    while seconds.iter().any(Option::is_none) {
        if Instant::now() > deadline {
            bail!("the BitTorrent swarm did not finish within {timeout:?}");
        }
        for (k, (done, _, started)) in done_files.iter().enumerate() {
            if seconds[k].is_none() {
                if let Ok(t) = std::fs::read_to_string(done) {
                    if let Ok(t) = t.trim().parse::<f64>() {
                        seconds[k] = Some(t - started);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let origin_bytes = tx_bytes(lab, origin)?.saturating_sub(before);
    drop(leechers);
    let want = std::fs::read(file)?;
    for (_, copy, _) in &done_files {
        if std::fs::read(copy).ok().as_deref() != Some(want.as_slice()) {
            bail!("BitTorrent copy {} differs from the original", copy.display());
        }
    }
    Ok(SwarmRun { seconds: seconds.into_iter().flatten().collect(), origin_bytes })
}
