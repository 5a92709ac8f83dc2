//! A real `docker-registry` (distribution 2.8) on loopback, its access log parsed to count what the
//! origin sent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{digest_of, free_port, require};

/// One line of the registry's access log.
#[derive(Debug, Clone)]
pub struct Hit {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
}

/// The `auth.token` section of a registry that trusts a token server.
pub(crate) struct TokenAuth {
    /// The token endpoint clients are sent to (`http://127.0.0.1:<port>/token`).
    pub realm: String,
    /// The `service` (the tokens' audience) the registry names in its challenges.
    pub service: String,
    /// The issuer the tokens must name.
    pub issuer: String,
    /// PEM certificate(s) the tokens' `x5c` chains must lead to.
    pub root_pem: String,
}

/// A registry process with its own storage.
pub struct Registry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// `user:password` when htpasswd auth is on.
    pub credentials: Option<(String, String)>,
    /// Whether it speaks HTTPS (with a certificate from [`Registry::ca_file`]).
    pub tls: bool,
    /// The address it listens on.
    pub ip: std::net::Ipv4Addr,
    /// The network namespace it runs in, if not the root one.
    netns: Option<String>,
    child: Option<Child>,
}

impl Registry {
    /// Starts a registry; with `credentials`, every request needs them (htpasswd, Basic).
    pub async fn start(credentials: Option<(&str, &str)>) -> anyhow::Result<Registry> {
        Registry::start_with(credentials, false, std::net::Ipv4Addr::LOCALHOST).await
    }

    /// Starts a registry listening on `ip` (a lab's gateway), without auth.
    pub async fn start_on(ip: std::net::Ipv4Addr) -> anyhow::Result<Registry> {
        Registry::start_with(None, false, ip).await
    }

    /// Starts a registry as host `i` of `lab` (so its uplink can be shaped like any host's).
    pub async fn start_in(lab: &crate::netns::Lab, i: usize) -> anyhow::Result<Registry> {
        Registry::start_placed(None, false, lab.ip(i), Some(lab.ns(i).to_string())).await
    }

    /// Starts a pull-through cache of `upstream` as host `i` of `lab` (the central-cache baseline).
    pub async fn start_proxy_in(lab: &crate::netns::Lab, i: usize, upstream: &Registry) -> anyhow::Result<Registry> {
        Registry::start_placed_proxy(None, false, lab.ip(i), Some(lab.ns(i).to_string()), Some(upstream.url())).await
    }

    /// Starts a registry serving HTTPS with a certificate for 127.0.0.1 signed by a fresh CA.
    pub async fn start_tls() -> anyhow::Result<Registry> {
        Registry::start_with(None, true, std::net::Ipv4Addr::LOCALHOST).await
    }

    /// The PEM file of the CA that signed a TLS registry's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    async fn start_with(credentials: Option<(&str, &str)>, tls: bool, ip: std::net::Ipv4Addr) -> anyhow::Result<Registry> {
        Registry::start_placed(credentials, tls, ip, None).await
    }

    async fn start_placed(
        credentials: Option<(&str, &str)>,
        tls: bool,
        ip: std::net::Ipv4Addr,
        netns: Option<String>,
    ) -> anyhow::Result<Registry> {
        Registry::start_placed_proxy(credentials, tls, ip, netns, None).await
    }

    async fn start_placed_proxy(
        credentials: Option<(&str, &str)>,
        tls: bool,
        ip: std::net::Ipv4Addr,
        netns: Option<String>,
        proxy_of: Option<String>,
    ) -> anyhow::Result<Registry> {
        Registry::start_configured(credentials, None, tls, ip, netns, proxy_of).await
    }

    /// Starts a registry on loopback that accepts only bearer tokens from the token server
    /// described by `token` (see [`crate::token_registry`]).
    pub(crate) async fn start_token_auth(token: &TokenAuth) -> anyhow::Result<Registry> {
        Registry::start_configured(None, Some(token), false, std::net::Ipv4Addr::LOCALHOST, None, None).await
    }

    async fn start_configured(
        credentials: Option<(&str, &str)>,
        token_auth: Option<&TokenAuth>,
        tls: bool,
        ip: std::net::Ipv4Addr,
        netns: Option<String>,
        proxy_of: Option<String>,
    ) -> anyhow::Result<Registry> {
        require("docker-registry");
        let dir = tempfile::Builder::new().prefix("shoal-registry-").tempdir()?;
        let port = free_port();
        let mut tls_config = String::new();
        if tls {
            require("openssl");
            make_certificates(dir.path())?;
            tls_config = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.path().join("registry.pem").display(),
                dir.path().join("registry.key").display()
            );
        }
        let mut auth = String::new();
        if let Some((user, pass)) = credentials {
            require("htpasswd");
            let out = Command::new("htpasswd").args(["-Bbn", user, pass]).output()?;
            std::fs::write(dir.path().join("htpasswd"), out.stdout)?;
            auth = format!("auth:\n  htpasswd:\n    realm: shoal-test\n    path: {}\n", dir.path().join("htpasswd").display());
        }
        if let Some(token) = token_auth {
            let bundle = dir.path().join("token-signer.pem");
            std::fs::write(&bundle, &token.root_pem)?;
            auth = format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                token.realm,
                token.service,
                token.issuer,
                bundle.display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {ip}:{port}\n{tls_config}{auth}{proxy}",
            dir.path().join("data").display(),
            proxy = proxy_of.map(|u| format!("proxy:\n  remoteurl: {u}\n")).unwrap_or_default(),
        );
        std::fs::write(dir.path().join("config.yml"), config)?;
        let mut reg =
            Registry { dir, port, credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())), tls, ip, netns, child: None };
        reg.spawn().await?;
        Ok(reg)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("access.log"))?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "docker-registry"]);
                c
            }
            None => Command::new("docker-registry"),
        };
        let child = cmd
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry")?;
        self.child = Some(child);
        let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build()?;
        let start = Instant::now();
        while http.get(format!("{}/v2/", self.url())).send().await.is_err() {
            if start.elapsed() > Duration::from_secs(15) {
                bail!("docker-registry did not start:\n{}", self.raw_log());
            }
            if let Some(s) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("docker-registry exited with {s}:\n{}", self.raw_log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Kills the registry (as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same storage.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().await
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `<ip>:<port>`, the name containerd and the mirror use.
    pub fn host(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// `http://127.0.0.1:<port>` (or `https://`).
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.host())
    }

    fn http(&self) -> reqwest::Client {
        reqwest::Client::builder().danger_accept_invalid_certs(true).build().expect("http client")
    }

    fn client(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.credentials {
            Some((u, p)) => req.basic_auth(u, Some(p)),
            None => req,
        }
    }

    /// Uploads `bytes` as a blob of `repo` (monolithic upload) and returns its digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> anyhow::Result<String> {
        let digest = digest_of(bytes);
        let http = self.http();
        let resp = self.client(http.post(format!("{}/v2/{repo}/blobs/uploads/", self.url()))).send().await?;
        if resp.status() != reqwest::StatusCode::ACCEPTED {
            bail!("starting upload: {}", resp.status());
        }
        let location = resp.headers().get("location").and_then(|v| v.to_str().ok()).context("upload location")?;
        let mut url = if location.starts_with("http") { location.to_string() } else { format!("{}{location}", self.url()) };
        url.push_str(if url.contains('?') { "&" } else { "?" });
        url.push_str(&format!("digest={digest}"));
        let resp = self.client(http.put(url)).body(bytes.to_vec()).send().await?;
        if resp.status() != reqwest::StatusCode::CREATED {
            bail!("finishing upload: {}", resp.status());
        }
        Ok(digest)
    }

    /// Builds an image with umoci (busybox in the first layer, then one layer per file) and pushes
    /// it as `repo:tag` with skopeo.
    pub async fn push_image(&self, repo: &str, tag: &str, files: &[(&str, Vec<u8>)]) -> anyhow::Result<()> {
        self.push_image_running(repo, tag, files, &["/bin/busybox"]).await
    }

    /// [`Registry::push_image`] with `cmd` as the image's command.
    pub async fn push_image_running(&self, repo: &str, tag: &str, files: &[(&str, Vec<u8>)], cmd: &[&str]) -> anyhow::Result<()> {
        let credentials = self.credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        self.push_image_as(repo, tag, files, cmd, credentials).await
    }

    /// [`Registry::push_image_running`] with `credentials` given to skopeo (it follows Basic and
    /// Bearer challenges alike).
    pub(crate) async fn push_image_as(
        &self,
        repo: &str,
        tag: &str,
        files: &[(&str, Vec<u8>)],
        cmd: &[&str],
        credentials: Option<(&str, &str)>,
    ) -> anyhow::Result<()> {
        for tool in ["umoci", "skopeo", "busybox"] {
            require(tool);
        }
        let work = tempfile::Builder::new().prefix("shoal-image-").tempdir()?;
        let layout = work.path().join("layout");
        let image = format!("{}:{tag}", layout.display());
        run(Command::new("umoci").args(["init", "--layout"]).arg(&layout))?;
        run(Command::new("umoci").args(["new", "--image", &image]))?;
        let busybox = which("busybox")?;
        run(Command::new("umoci").args(["insert", "--image", &image]).arg(&busybox).arg("/bin/busybox"))?;
        for (path, content) in files {
            let src = work.path().join(path.trim_start_matches('/').replace('/', "_"));
            std::fs::write(&src, content)?;
            run(Command::new("umoci").args(["insert", "--image", &image]).arg(&src).arg(path))?;
        }
        let mut config = Command::new("umoci");
        config.args(["config", "--image", &image]);
        for arg in cmd {
            config.arg("--config.cmd").arg(arg);
        }
        run(&mut config)?;
        let mut copy = Command::new("skopeo");
        copy.args(["copy", "-q", "--dest-tls-verify=false"]);
        if let Some((u, p)) = credentials {
            copy.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        copy.arg(format!("oci:{image}")).arg(format!("docker://{}/{repo}:{tag}", self.host()));
        run(&mut copy)
    }

    /// Digests and sizes of an image's config and layers.
    pub async fn image_blobs(&self, repo: &str, tag: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let http = self.http();
        let m: serde_json::Value = self
            .client(http.get(format!("{}/v2/{repo}/manifests/{tag}", self.url())))
            .header("Accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await?
            .json()
            .await?;
        let mut out = vec![];
        for d in std::iter::once(&m["config"]).chain(m["layers"].as_array().into_iter().flatten()) {
            out.push((d["digest"].as_str().context("digest")?.to_string(), d["size"].as_u64().context("size")?));
        }
        Ok(out)
    }

    fn raw_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Every request in the access log.
    pub fn hits(&self) -> Vec<Hit> {
        self.raw_log().lines().filter_map(parse_access_line).collect()
    }

    /// GETs of a blob that sent bytes (200 or 206).
    pub fn blob_fetches(&self, digest: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.method == "GET" && h.path.contains(&format!("/blobs/{digest}")) && matches!(h.status, 200 | 206))
            .collect()
    }

    /// Bytes the registry sent for a blob, over every request.
    pub fn blob_bytes(&self, digest: &str) -> u64 {
        self.blob_fetches(digest).iter().map(|h| h.bytes).sum()
    }

    /// The file holding a blob's bytes in the registry's storage.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A CA (`ca.pem`) and a certificate for 127.0.0.1 it signed (`registry.pem`, `registry.key`).
fn make_certificates(dir: &Path) -> anyhow::Result<()> {
    crate::certs::make_ca(dir, "ca")?;
    crate::certs::issue(dir, "ca", "registry", "IP:127.0.0.1", "serverAuth")
}

/// Parses `ip - - [date] "GET /path HTTP/1.1" 200 1234 "ref" "ua"`.
fn parse_access_line(line: &str) -> Option<Hit> {
    let start = line.find("] \"")? + 3;
    let rest = &line[start..];
    let end = rest.find('"')?;
    let mut req = rest[..end].split(' ');
    let (method, path) = (req.next()?.to_string(), req.next()?.to_string());
    let mut tail = rest[end + 1..].split_whitespace();
    let status = tail.next()?.parse().ok()?;
    let bytes = tail.next()?.parse().ok()?;
    Some(Hit { method, path, status, bytes })
}

fn which(tool: &str) -> anyhow::Result<PathBuf> {
    let out = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output()?;
    Ok(Path::new(String::from_utf8(out.stdout)?.trim()).to_path_buf())
}

/// Runs a command, failing with its output when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_combined_log_lines() {
        let h = super::parse_access_line(
            r#"127.0.0.1 - - [23/Nov/2026:17:21:46 +0000] "GET /v2/test/app/blobs/sha256:c0 HTTP/1.1" 206 20002827 "" "shoal/0.1.0""#,
        )
        .unwrap();
        assert_eq!((h.method.as_str(), h.path.as_str(), h.status, h.bytes), ("GET", "/v2/test/app/blobs/sha256:c0", 206, 20002827));
        assert!(super::parse_access_line("time=... level=info msg=x").is_none());
    }
}
