//! `shoal get`: downloads an image (written as an OCI image layout) or one registry blob (to a
//! file) through the same engine the mirror uses: via the local agent when it runs, else in-process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::Digest as _;
use shoal_agent::engine::{Engine, Opened, Origin};
use shoal_core::config::{Config, RegistryConfig};
use shoal_core::metrics::Metrics;
use shoal_core::reference::{is_loopback_host, is_repository, Reference};

use shoal_core::image;
use shoal_core::registry::{RegistryClient, Request, MANIFEST_ACCEPT};
use shoal_core::store::Store;
use shoal_core::Digest;
use tokio::io::AsyncWriteExt;

#[derive(Args)]
pub struct GetArgs {
    /// An image reference (`registry/repo:tag`, `repo@sha256:...`) or a registry blob URL
    /// (`https://registry/v2/<repo>/blobs/sha256:...`).
    target: String,
    /// Where to write: a directory for an image (OCI image layout), a file for a blob.
    #[arg(short, long)]
    output: PathBuf,
    /// Platform to pick from a multi-platform image, as `os/arch[/variant]`.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Config file, for registry credentials and TLS settings when downloading in-process.
    #[arg(long, short, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    /// The agent's mirror to go through. Default: the local agent's, when it answers.
    #[arg(long)]
    mirror: Option<String>,
    /// Download in-process even when an agent runs (uses data_dir, which must not be in use).
    #[arg(long)]
    no_agent: bool,
}

/// Where bytes come from.
pub(crate) enum Fetcher {
    /// Through a running agent's registry mirror.
    Mirror { http: reqwest::Client, base: String },
    /// An engine in this process, with its own store.
    Local { engine: Arc<Engine> },
}

pub async fn run(args: GetArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    let blob_url = parse_blob_url(&args.target)?;
    if let Some((scheme, registry, _, _)) = &blob_url {
        if scheme == "http" && !is_loopback_host(registry) {
            let rc = config.registry.entry(registry.clone()).or_insert_with(RegistryConfig::default);
            rc.plain_http = Some(true);
        }
    }
    let fetcher = fetcher(&args, config).await?;
    match blob_url {
        Some((_, registry, repository, digest)) => {
            let pb = bar(None);
            fetcher.blob(&registry, &repository, &digest, None, &args.output, &pb).await?;
            pb.finish_and_clear();
            eprintln!("{digest} -> {}", args.output.display());
        }
        None => {
            let reference = Reference::parse(&args.target)?;
            get_image(&fetcher, &reference, &args.platform, &args.output).await?;
        }
    }
    Ok(())
}

async fn fetcher(args: &GetArgs, config: Config) -> anyhow::Result<Fetcher> {
    Fetcher::new(args.mirror.as_deref(), args.no_agent, config).await
}

impl Fetcher {
    /// Through the agent's mirror at `mirror` (default: [mirror] listen) when it answers, unless
    /// `no_agent`; else an engine in this process, using data_dir.
    pub(crate) async fn new(mirror: Option<&str>, no_agent: bool, config: Config) -> anyhow::Result<Fetcher> {
        if !no_agent {
            let addr = mirror.map(String::from).unwrap_or_else(|| config.mirror.listen.to_string());
            let base = shoal_core::config::mirror_url(&addr);
            let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build()?;
            let probe = http.get(format!("{base}/v2/")).timeout(Duration::from_secs(2)).send().await;
            match probe {
                Ok(r) if r.status().is_success() => return Ok(Fetcher::Mirror { http, base }),
                _ if mirror.is_some() => bail!("the mirror at {base} does not answer"),
                _ => {}
            }
        }
        let store = Store::open(&config.data_dir, config.store.quota.0, config.store.high_watermark, config.store.low_watermark)?;
        let rate = config.download.rate_limit.0;
        let registry = Arc::new(RegistryClient::new(Arc::new(config)));
        Ok(Fetcher::Local { engine: Arc::new(Engine::new(store, registry, rate, &Metrics::new())) })
    }
}

/// `scheme://registry/v2/<repo>/blobs/<digest>` → (scheme, registry, repo, digest); `None` when the
/// target is not a URL.
fn parse_blob_url(target: &str) -> anyhow::Result<Option<(String, String, String, Digest)>> {
    if !target.starts_with("http://") && !target.starts_with("https://") {
        return Ok(None);
    }
    let url = url::Url::parse(target).with_context(|| format!("{target:?} is not a URL"))?;
    let host = url.host_str().ok_or_else(|| anyhow!("{target}: no host"))?;
    let registry = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    };
    let (repository, digest) = url
        .path()
        .strip_prefix("/v2/")
        .and_then(|p| p.rsplit_once("/blobs/"))
        .ok_or_else(|| anyhow!("{target}: only registry blob URLs (.../v2/<repo>/blobs/sha256:...) can be fetched"))?;
    if !is_repository(repository) {
        bail!("{target}: invalid repository name {repository:?}");
    }
    Ok(Some((url.scheme().into(), registry, repository.into(), digest.parse()?)))
}

pub fn bar(len: Option<u64>) -> ProgressBar {
    let pb = ProgressBar::new(len.unwrap_or(0));
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

async fn get_image(fetcher: &Fetcher, r: &Reference, platform: &str, out: &Path) -> anyhow::Result<()> {
    let image =
        image::resolve(r, platform, |reference| async move { fetcher.manifest(&r.registry, &r.repository, &reference).await }).await?;
    let (body, media_type) = (image.manifest, image.media_type);
    let blobs_dir = out.join("blobs/sha256");
    tokio::fs::create_dir_all(&blobs_dir).await.with_context(|| format!("creating {}", blobs_dir.display()))?;
    let total: u64 = image.blobs.iter().map(|(_, s)| *s).sum();
    let pb = bar(Some(total));
    pb.set_message(r.to_string());
    for (digest, size) in image.blobs {
        let path = blobs_dir.join(digest.hex());
        fetcher.blob(&r.registry, &r.repository, &digest, Some(size), &path, &pb).await?;
    }
    pb.finish_and_clear();
    let manifest_digest = Digest::of(&body);
    tokio::fs::write(blobs_dir.join(manifest_digest.hex()), &body).await?;
    let mut descriptor = serde_json::json!({
        "mediaType": media_type.unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into()),
        "digest": manifest_digest.to_string(),
        "size": body.len(),
    });
    if let Some(tag) = &r.tag {
        descriptor["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": tag });
    }
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [descriptor] });
    tokio::fs::write(out.join("index.json"), serde_json::to_vec_pretty(&index)?).await?;
    tokio::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).await?;
    eprintln!("{r} ({} bytes) -> {} (OCI layout)", total, out.display());
    Ok(())
}

impl Fetcher {
    pub(crate) async fn manifest(&self, registry: &str, repository: &str, reference: &str) -> anyhow::Result<(Bytes, Option<String>)> {
        let resp = match self {
            Fetcher::Mirror { http, base } => http
                .get(format!("{base}/v2/{repository}/manifests/{reference}"))
                .query(&[("ns", registry)])
                .header(http::header::ACCEPT, MANIFEST_ACCEPT)
                .send()
                .await
                .with_context(|| format!("manifest {registry}/{repository}:{reference} via {base}"))?,
            Fetcher::Local { engine } => engine.registry().send(&Request::manifest(registry, repository, reference)).await?,
        };
        if !resp.status().is_success() {
            bail!("manifest {registry}/{repository}:{reference}: {}", resp.status());
        }
        let media_type = resp.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(String::from);
        Ok((resp.bytes().await?, media_type))
    }

    /// One blob's bytes as a stream (unchecked), and its length when the source tells it.
    pub(crate) async fn stream(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        size: Option<u64>,
    ) -> anyhow::Result<(BoxStream<'static, anyhow::Result<Bytes>>, Option<u64>)> {
        let what = format!("blob {digest} from {registry}/{repository}");
        match self {
            Fetcher::Mirror { http, base } => {
                let resp = http
                    .get(format!("{base}/v2/{repository}/blobs/{digest}"))
                    .query(&[("ns", registry)])
                    .send()
                    .await
                    .with_context(|| what.clone())?;
                if !resp.status().is_success() {
                    bail!("{what}: {}", resp.status());
                }
                let len = size.or(resp.content_length());
                Ok((resp.bytes_stream().map(move |c| c.with_context(|| what.clone())).boxed(), len))
            }
            Fetcher::Local { engine } => {
                let origin =
                    Origin { registry: registry.into(), repository: repository.into(), digest: digest.clone(), authorization: None };
                let len = match size {
                    Some(s) => s,
                    None => {
                        let mut head = Request::blob(registry, repository, digest);
                        head.method = http::Method::HEAD;
                        let resp = engine.registry().send(&head).await?;
                        if !resp.status().is_success() {
                            bail!("{what}: {}", resp.status());
                        }
                        shoal_core::registry::header_len(&resp).ok_or_else(|| anyhow!("{what}: the registry gave no length"))?
                    }
                };
                let reader = match engine.open(&origin, len).await {
                    Opened::Task(t) => engine.reader(t, 0..len, true),
                    Opened::Direct(e) => {
                        tracing::warn!(error = %e, "not storing {digest}");
                        engine.direct_reader(origin, 0..len)
                    }
                };
                let chunks = futures_util::stream::unfold(reader, |mut reader| async move {
                    reader.next_chunk().await.map(|chunk| (chunk.map_err(anyhow::Error::from), reader))
                });
                Ok((chunks.map(move |c| c.with_context(|| what.clone())).boxed(), Some(len)))
            }
        }
    }

    /// Downloads one blob to `path`, checking its digest.
    async fn blob(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        size: Option<u64>,
        path: &Path,
        pb: &ProgressBar,
    ) -> anyhow::Result<()> {
        let tmp = path.with_extension("partial");
        let mut file = tokio::fs::File::create(&tmp).await.with_context(|| format!("creating {}", tmp.display()))?;
        let mut hasher = sha2::Sha256::new();
        let (mut body, len) = self.stream(registry, repository, digest, size).await?;
        if size.is_none() {
            pb.set_length(len.unwrap_or(0));
        }
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
            pb.inc(chunk.len() as u64);
        }
        file.flush().await?;
        let actual = Digest::from_hasher(hasher);
        if &actual != digest {
            let _ = tokio::fs::remove_file(&tmp).await;
            bail!("blob {digest} from {registry}/{repository}: content has digest {actual}");
        }
        tokio::fs::rename(&tmp, path).await?;
        Ok(())
    }
}
