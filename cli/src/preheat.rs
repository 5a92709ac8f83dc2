//! `shoal preheat`: has seeds (or every host) fetch an image's blobs before a rollout, with a
//! progress bar per blob and one overall, until every host reports them stored.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use shoal_agent::schedulers::{Client, Credential};
use shoal_core::bearer::BearerToken;
use shoal_core::config::Config;
use shoal_core::reference::Reference;
use shoal_core::registry::{RegistryClient, Request};
use shoal_proto::scheduler as pb;

use futures_util::{FutureExt, StreamExt};

use crate::import;
use shoal_core::image;

#[derive(Args)]
pub struct PreheatArgs {
    /// Images to preheat (`registry/repo:tag`).
    #[arg(required = true)]
    images: Vec<String>,
    /// Platform to pick from multi-platform images, as `os/arch[/variant]`.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// `seeds` fetch the blobs (default), or `all` hosts do.
    #[arg(long, default_value = "seeds", value_parser = ["seeds", "all"])]
    scope: String,
    /// Scheduler replicas to ask (the first that answers runs the job). Default: [peer] schedulers.
    #[arg(long)]
    scheduler: Vec<String>,
    /// A file holding the scheduler's preheat token (the token of its [scheduler]
    /// preheat_token_file). Needed when the scheduler has token files.
    #[arg(long, env = "SHOAL_PREHEAT_TOKEN_FILE", value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Config file, for registry credentials and TLS settings used to read the manifests.
    #[arg(long, short, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Then also import the images into this node's containerd at SOCKET (blobs, image record and
    /// unpacked layers), so that a later `ctr run` or pod start needs no pull. The blobs are read
    /// through the local agent, so they come from the seeds and peers.
    #[arg(long, value_name = "SOCKET")]
    containerd_socket: Option<PathBuf>,
    /// containerd namespace to import into: `k8s.io` is the kubelet's, `ctr` uses `default`.
    #[arg(long, default_value = "k8s.io", requires = "containerd_socket")]
    containerd_namespace: String,
    /// containerd snapshotter to unpack the layers into.
    #[arg(long, default_value = "overlayfs", requires = "containerd_socket")]
    snapshotter: String,
    /// The local agent's registry mirror (`host:port` or a URL), for the blobs to import. Default: [mirror] listen.
    #[arg(long, requires = "containerd_socket")]
    mirror: Option<String>,
}

pub async fn run(args: PreheatArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let schedulers = if args.scheduler.is_empty() { config.peer.schedulers.clone() } else { args.scheduler.clone() };
    if schedulers.is_empty() {
        bail!("no scheduler to ask: pass --scheduler host:port or set [peer] schedulers");
    }
    let token = BearerToken::read_optional(args.token_file.as_deref()).context("--token-file")?;
    let credential = Credential::new(token.as_ref());
    let registry = Arc::new(RegistryClient::new(Arc::new(config.clone())));
    let mut blobs: Vec<pb::Origin> = Vec::new();
    let mut manifests = Vec::<pb::Manifest>::new();
    let mut imports = Vec::new();
    for name in &args.images {
        let r = Reference::parse(name)?;
        let fetched = Arc::new(std::sync::Mutex::new(Vec::<pb::Manifest>::new()));
        // Read without configured credentials, the image is public: agents may then serve it to
        // anyone while the registry is down. With credentials, only to clients already checked.
        let public = config.registry.get(&r.registry).is_none_or(|c| c.username.is_none());
        let resolved = image::resolve(&r, &args.platform, |reference| {
            let (registry, r, fetched) = (registry.clone(), r.clone(), fetched.clone());
            async move {
                let req = Request::manifest(&r.registry, &r.repository, &reference);
                let resp = registry.send(&req).await?;
                if !resp.status().is_success() {
                    bail!("manifest {r}: {}", resp.status());
                }
                let media_type = resp.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(String::from);
                let body = resp.bytes().await?;
                fetched.lock().unwrap_or_else(|p| p.into_inner()).push(pb::Manifest {
                    registry: r.registry.clone(),
                    repository: r.repository.clone(),
                    reference,
                    digest: shoal_core::Digest::of(&body).to_string(),
                    media_type: media_type.clone().unwrap_or_default(),
                    body: body.to_vec(),
                    public,
                });
                Ok((body, media_type))
            }
        })
        .await?;
        for (digest, length) in resolved.blobs {
            if !blobs.iter().any(|b| b.digest == digest.to_string()) {
                blobs.push(pb::Origin {
                    registry: r.registry.clone(),
                    repository: r.repository.clone(),
                    digest: digest.to_string(),
                    length,
                });
            }
        }
        let fetched = std::mem::take(&mut *fetched.lock().unwrap_or_else(|p| p.into_inner()));
        let to_import = fetched
            .iter()
            .map(|m| Ok(import::Manifest { digest: m.digest.parse()?, media_type: m.media_type.clone(), body: m.body.clone().into() }))
            .collect::<anyhow::Result<Vec<_>>>()?;
        imports.push((r.clone(), import::ImportImage { name: r.to_string(), manifests: to_import }));
        manifests.extend(fetched);
    }
    let (mut client, addr) = connect(&schedulers, &credential).await?;
    let job = client
        .preheat(pb::PreheatRequest { blobs: blobs.clone(), scope: args.scope.clone(), manifests })
        .await
        .map_err(|e| anyhow!("scheduler {addr}: {}", e.message()))?
        .into_inner()
        .job_id;
    eprintln!("preheat job {job} on {addr}: {} blobs on {}", blobs.len(), args.scope);
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>19} [{bar:30}] {pos}/{len} hosts {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let overall = bars.add(ProgressBar::new(0).with_style(style.clone()).with_prefix("overall"));
    let per_blob: Vec<ProgressBar> = blobs
        .iter()
        .map(|b| {
            let short = b.digest.trim_start_matches("sha256:").chars().take(12).collect::<String>();
            bars.add(ProgressBar::new(0).with_style(style.clone()).with_prefix(short).with_message(crate::status::human(b.length)))
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    loop {
        let status = client
            .job_status(pb::JobStatusRequest { job_id: job.clone() })
            .await
            .map_err(|e| anyhow!("scheduler {addr}: {}", e.message()))?
            .into_inner();
        let (mut done, mut total) = (0, 0);
        for (bar, p) in per_blob.iter().zip(&status.blobs) {
            bar.set_length(p.hosts_total as u64);
            bar.set_position(p.hosts_done as u64);
            done += p.hosts_done as u64;
            total += p.hosts_total as u64;
        }
        overall.set_length(total);
        overall.set_position(done);
        match status.state.as_str() {
            "done" => {
                bars.clear().ok();
                eprintln!("preheat done: {} blobs on {} hosts", blobs.len(), total / blobs.len().max(1) as u64);
                break;
            }
            "failed" => bail!("preheat failed: {}", status.error),
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            bail!("preheat did not finish within {} s ({done}/{total} done)", args.timeout);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let Some(socket) = &args.containerd_socket else { return Ok(()) };
    let mirror = args.mirror.clone().unwrap_or_else(|| config.mirror.listen.to_string());
    let mirror = shoal_core::config::mirror_url(&mirror);
    let target = import::Target { socket, namespace: &args.containerd_namespace, snapshotter: &args.snapshotter };
    let http = reqwest::Client::new();
    for (r, image) in &imports {
        let fetch = |digest: &shoal_core::Digest| {
            let url = format!("{mirror}/v2/{}/blobs/{digest}?ns={}", r.repository, r.registry);
            let (http, mirror) = (http.clone(), mirror.clone());
            async move {
                let resp = http.get(&url).send().await.with_context(|| format!("agent mirror at {mirror}"))?;
                if !resp.status().is_success() {
                    bail!("blob {url}: the agent answered {}", resp.status());
                }
                Ok(resp.bytes_stream().map(|c| c.map_err(anyhow::Error::from)).boxed())
            }
            .boxed()
        };
        let bar = import::progress_bar("importing", &image.name);
        import::import(&target, image, &fetch, &bar).await.with_context(|| format!("importing {} into containerd", image.name))?;
        bar.finish_and_clear();
        eprintln!("imported {} into containerd ({} namespace)", image.name, args.containerd_namespace);
    }
    Ok(())
}

async fn connect(schedulers: &[String], credential: &Credential) -> anyhow::Result<(Client, String)> {
    let mut last = None;
    for addr in schedulers {
        let endpoint = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .context("scheduler address")?
            .connect_timeout(Duration::from_secs(3));
        match endpoint.connect().await {
            Ok(ch) => return Ok((credential.client(ch), addr.clone())),
            Err(e) => last = Some(format!("{addr}: {e}")),
        }
    }
    bail!("no scheduler answers ({})", last.unwrap_or_default())
}
