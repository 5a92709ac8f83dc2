//! nginx serving one file: the baseline of the mirror and data-path scenarios.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_tests::netns::Lab;
use shoal_tests::{free_port, require};

/// nginx (one worker) serving one file.
pub struct Nginx {
    dir: tempfile::TempDir,
    /// The file's URL.
    pub url: String,
    child: Child,
}

impl Nginx {
    /// Serves `bytes` as `/<name>` on 127.0.0.1 over plain HTTP, with `sendfile`.
    pub fn start(name: &str, bytes: &[u8]) -> anyhow::Result<Nginx> {
        Nginx::start_at(name, bytes, None, false)
    }

    /// Serves `bytes` as `/<name>` on host `i` of a lab (its address, in its namespace) or on
    /// 127.0.0.1; with `tls`, over HTTPS (TLS 1.3, a self-signed P-256 certificate from openssl,
    /// so encryption in user space: no kTLS, no `sendfile`).
    pub fn start_at(name: &str, bytes: &[u8], place: Option<(&Lab, usize)>, tls: bool) -> anyhow::Result<Nginx> {
        require("nginx");
        let dir = tempfile::Builder::new().prefix("shoal-bench-nginx-").tempdir_in("/var/tmp")?;
        let www = dir.path().join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::write(www.join(name), bytes)?;
        let ip = place.map_or("127.0.0.1".to_string(), |(lab, i)| lab.ip(i).to_string());
        let port = free_port();
        let d = dir.path().display();
        let listen = if tls {
            self_signed(dir.path())?;
            format!("listen {ip}:{port} ssl; ssl_protocols TLSv1.3; ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;")
        } else {
            format!("listen {ip}:{port};")
        };
        let conf = format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; sendfile on; tcp_nopush on; keepalive_timeout 30;\n\
             server {{ {listen} root {d}/www; }} }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf)?;
        let mut cmd = match place {
            Some((lab, i)) => lab.command(i, "nginx"),
            None => Command::new("nginx"),
        };
        let child = cmd
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let scheme = if tls { "https" } else { "http" };
        let n = Nginx { url: format!("{scheme}://{ip}:{port}/{name}"), dir, child };
        let start = Instant::now();
        while std::net::TcpStream::connect((ip.as_str(), port)).is_err() || n.pid().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("nginx did not start: {}", std::fs::read_to_string(n.dir.path().join("error.log")).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(n)
    }

    /// The master process (its one worker is its child), from its pid file.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("nginx.pid")).ok()?.trim().parse().ok()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A self-signed P-256 certificate and key in `dir` (`cert.pem`, `key.pem`).
fn self_signed(dir: &Path) -> anyhow::Result<()> {
    require("openssl");
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=shoal-bench"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!("openssl could not make a certificate: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
