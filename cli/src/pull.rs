//! `shoal pull`: pulls an image into a node's containerd the way CRI does, for nodes without a
//! kubelet (`ctr images pull` passes no layer labels to a snapshotter). A Shoal image is pulled
//! lazily: manifests and config only, its layers prepared on Shoal's snapshotter, which mounts
//! the image instead of downloading it. Any other image is downloaded (through the local agent)
//! and unpacked.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Args;
use futures_util::FutureExt;
use shoal_core::config::Config;
use shoal_core::reference::Reference;
use shoal_core::Digest;

use crate::get::Fetcher;
use crate::import;
use shoal_core::image;

pub const EXAMPLES: &str = "Examples:
  shoal pull registry.example/team/app:v1-shoal
  ctr run --rm --snapshotter shoal registry.example/team/app:v1-shoal demo

  shoal pull --namespace k8s.io registry.example/team/app:v1-shoal   # for the kubelet's containerd";

#[derive(Args)]
pub struct PullArgs {
    /// The image (`registry/repo:tag`, `registry/repo@sha256:...`).
    image: String,
    /// containerd's socket.
    #[arg(long, value_name = "SOCKET", default_value = "/run/containerd/containerd.sock")]
    containerd_socket: PathBuf,
    /// containerd namespace: `default` is ctr's, `k8s.io` the kubelet's.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The snapshotter to prepare the layers on: Shoal's proxy plugin, as containerd's config
    /// names it. A Shoal image can only run on it.
    #[arg(long, default_value = "shoal")]
    snapshotter: String,
    /// Platform to pick from a multi-platform image, as `os/arch[/variant]`.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// The agent's mirror to fetch through. Default: the local agent's ([mirror] listen), when
    /// it answers; else the registry directly.
    #[arg(long)]
    mirror: Option<String>,
    /// Config file, for registry credentials and TLS settings when no agent answers.
    #[arg(long, short, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
}

pub async fn run(args: PullArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let r = Reference::parse(&args.image)?;
    let fetcher = Arc::new(Fetcher::new(args.mirror.as_deref(), false, config).await?);
    let manifests = Arc::new(Mutex::new(Vec::new()));
    image::resolve(&r, &args.platform, |reference| {
        let (fetcher, r, manifests) = (fetcher.clone(), r.clone(), manifests.clone());
        async move {
            let (body, media_type) = fetcher.manifest(&r.registry, &r.repository, &reference).await?;
            manifests.lock().unwrap_or_else(|p| p.into_inner()).push(import::Manifest {
                digest: Digest::of(&body),
                media_type: media_type.clone().unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into()),
                body: body.clone(),
            });
            Ok((body, media_type))
        }
    })
    .await?;
    let manifests = std::mem::take(&mut *manifests.lock().unwrap_or_else(|p| p.into_inner()));
    let image = import::ImportImage { name: r.to_string(), manifests };
    let target = import::Target { socket: &args.containerd_socket, namespace: &args.namespace, snapshotter: &args.snapshotter };
    let fetch = |digest: &Digest| {
        let (fetcher, r, digest) = (fetcher.clone(), r.clone(), digest.clone());
        async move { Ok(fetcher.stream(&r.registry, &r.repository, &digest, None).await?.0) }.boxed()
    };
    let bar = import::progress_bar("pulling", &image.name);
    import::import(&target, &image, &fetch, &bar).await.with_context(|| format!("pulling {} into containerd", image.name))?;
    bar.finish_and_clear();
    eprintln!("pulled {} into containerd ({} namespace, snapshotter {})", image.name, args.namespace, args.snapshotter);
    Ok(())
}
