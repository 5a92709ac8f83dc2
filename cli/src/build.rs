//! `shoal build`: converts an OCI image (from a registry or a local OCI image layout) into
//! Shoal's chunked format — one bootstrap plus one chunk blob per layer, see `fuse/FORMAT.md` —
//! and pushes it as an ordinary OCI image, so `shoal mount` can start it after fetching only
//! the chunks it reads.
//!
//! Layers stream through the builder one at a time (a registry layer is downloaded to a
//! temporary file while the previous one is converted); chunk blobs are written to temporary
//! files, never held in memory.

use std::collections::HashMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use shoal_core::config::Config;
use shoal_core::reference::Reference;
use shoal_core::registry::{RegistryClient, Request};
use shoal_core::Digest;
use shoal_fuse::layer::apply_layer;
use shoal_fuse::tree::{BuildOptions, ChunkDict, TreeBuilder};
use shoal_fuse::{
    Bootstrap, BOOTSTRAP_ANNOTATION, BOOTSTRAP_ANNOTATION_VALUE, BOOTSTRAP_MEDIA_TYPE, CHUNK_BLOB_MEDIA_TYPE, FORMAT_ANNOTATION,
    FORMAT_ANNOTATION_VALUE, SNAPSHOT_LAYER_ANNOTATION, SNAPSHOT_LAYER_BOOTSTRAP, SNAPSHOT_LAYER_CHUNKS,
};
use tokio::io::AsyncWriteExt;

use shoal_core::image;

/// Examples shown by `shoal build --help`.
pub const EXAMPLES: &str = "Examples:
  shoal build registry.example/team/app:v1
      converts and pushes registry.example/team/app:v1-shoal
  shoal build oci:./layout:v1 registry.example/team/app:v1-shoal --output-dir ./app
      converts a local OCI layout, pushes it, and keeps a copy for `shoal mount --bootstrap`
  shoal build registry.example/team/app:v2 --chunk-dict registry.example/team/app:v1-shoal --prefetch trace.txt
      stores only the chunks v1 lacks; mounts fetch the files listed in trace.txt first";

/// Media type of the pushed manifest.
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// Media type of the pushed image config.
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// The OCI layout annotation naming a manifest's tag.
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Manifest annotation recording which image was converted.
const SOURCE_ANNOTATION: &str = "dev.shoal.source";

#[derive(Args)]
pub struct BuildArgs {
    /// The image to convert: a reference in a registry (`registry/repo:tag`) or a local OCI
    /// image layout (`oci:DIR[:TAG]`; the tag may be left out when the layout holds one image).
    source: String,
    /// Where to push the converted image (`registry/repo:tag`). Default: the source's
    /// repository with the tag `<tag>-shoal`. Required for an `oci:` source, unless only
    /// --output-dir is wanted.
    target: Option<String>,
    /// Reuse the chunks already stored by this Shoal image (another version of the same
    /// software, say) instead of storing them again; may be given several times. Its chunk blobs
    /// are mounted into the target repository (same registry) or copied there.
    #[arg(long = "chunk-dict", value_name = "IMAGE")]
    chunk_dict: Vec<String>,
    /// Paths to fetch first after mounting, one per line, in order (a `shoal mount --trace`
    /// file works as is); a directory stands for every file beneath it.
    #[arg(long, value_name = "FILE")]
    prefetch: Option<PathBuf>,
    /// Platform to pick from a multi-platform image, as `os/arch[/variant]`.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// zstd level new chunks are compressed with (1 fastest .. 19 smallest).
    #[arg(long, default_value_t = shoal_fuse::chunk::DEFAULT_COMPRESSION_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    compression_level: i32,
    /// Also write the result here: `DIR/bootstrap` and the chunk blobs as `DIR/blobs/<hex>`,
    /// ready for `shoal mount --bootstrap DIR/bootstrap --blobs DIR/blobs`.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Directory for temporary files (chunk blobs being written, downloaded layers). Default: $TMPDIR.
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Config file, for registry credentials and TLS settings.
    #[arg(long, short, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
}

/// Where the source image is.
enum Source {
    /// A local OCI image layout directory and the tag to pick in it.
    Layout { dir: PathBuf, tag: Option<String> },
    /// An image in a registry.
    Registry(Reference),
}

impl Source {
    fn parse(text: &str) -> anyhow::Result<Source> {
        let Some(rest) = text.strip_prefix("oci:") else { return Ok(Source::Registry(Reference::parse(text)?)) };
        // `oci:DIR:TAG`: the tag is what follows the last colon, unless that looks like a path.
        let (dir, tag) = match rest.rsplit_once(':') {
            Some((dir, tag)) if !tag.is_empty() && !tag.contains('/') && !dir.is_empty() => (dir, Some(tag.to_string())),
            _ => (rest, None),
        };
        Ok(Source::Layout { dir: PathBuf::from(dir), tag })
    }
}

/// A layer of the source image.
#[derive(Clone)]
struct Layer {
    /// Its digest.
    digest: Digest,
    /// Its size in bytes.
    size: u64,
    /// Its media type (says how it is compressed).
    media_type: String,
}

/// The source image, resolved to one platform.
struct SourceImage {
    /// The image config's bytes.
    config: Bytes,
    /// The layers, bottom first.
    layers: Vec<Layer>,
}

/// What the build made.
struct Built {
    /// The bootstrap.
    bootstrap: Bootstrap,
    /// The compressed bootstrap.
    bootstrap_bytes: Bytes,
    /// Chunk blob files written by this build, by digest.
    blob_files: HashMap<Digest, PathBuf>,
    /// Chunks compressed into this build's blobs.
    new_chunks: u64,
    /// Chunks found already stored (earlier layers, the chunk dictionary).
    reused_chunks: u64,
}

pub async fn run(args: BuildArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    crate::logging::init(&config.log);
    let started = Instant::now();
    let client = Arc::new(RegistryClient::new(Arc::new(config)));
    let source = Source::parse(&args.source)?;
    let target = target_reference(&source, args.target.as_deref())?;
    if target.is_none() && args.output_dir.is_none() {
        bail!("nowhere to put the result: give a TARGET (registry/repo:tag) or --output-dir");
    }
    let tmp = match &args.tmp_dir {
        Some(dir) => tempfile::Builder::new().prefix("shoal-build-").tempdir_in(dir),
        None => tempfile::Builder::new().prefix("shoal-build-").tempdir(),
    }
    .context("creating a temporary directory (set --tmp-dir)")?;

    let image = match &source {
        Source::Layout { dir, tag } => read_layout(dir, tag.as_deref(), &args.platform).await?,
        Source::Registry(r) => read_registry(&client, r, &args.platform).await?,
    };
    let mut dict = ChunkDict::new();
    let mut dict_repos = HashMap::new();
    for name in &args.chunk_dict {
        load_chunk_dict(&client, name, &mut dict, &mut dict_repos).await?;
    }
    let prefetch = match &args.prefetch {
        Some(path) => read_prefetch(path)?,
        None => Vec::new(),
    };
    let options = BuildOptions { compression_level: args.compression_level };
    let builder = TreeBuilder::new(options).with_chunk_dict(dict);
    let built = convert(&client, &source, &image, builder, &prefetch, tmp.path()).await?;
    let blobs = built.bootstrap.blobs().len();
    let chunk_bytes: u64 = built.bootstrap.blobs().iter().map(|b| b.size).sum();
    eprintln!(
        "converted {} layers: {} files, {} chunks new, {} reused; {blobs} chunk blobs of {chunk_bytes} bytes, bootstrap {} bytes, in {:.1?}",
        image.layers.len(),
        built.bootstrap.inode_count(),
        built.new_chunks,
        built.reused_chunks,
        built.bootstrap_bytes.len(),
        started.elapsed()
    );
    if let Some(target) = &target {
        let digest = push(&client, &source, target, &image, &built, &dict_repos, tmp.path()).await?;
        println!("{target}@{digest}");
    }
    if let Some(dir) = &args.output_dir {
        write_output(dir, &built)?;
        eprintln!("wrote {} and {}", dir.join("bootstrap").display(), dir.join("blobs").display());
    }
    Ok(())
}

/// The reference to push to: as given, or the source's repository tagged `<tag>-shoal`.
fn target_reference(source: &Source, given: Option<&str>) -> anyhow::Result<Option<Reference>> {
    if let Some(text) = given {
        let r = Reference::parse(text)?;
        if r.digest.is_some() {
            bail!("target {text}: push to a tag, not a digest");
        }
        return Ok(Some(r));
    }
    Ok(match source {
        Source::Layout { .. } => None,
        Source::Registry(r) => {
            let tag = format!("{}-shoal", r.tag.as_deref().unwrap_or("latest"));
            Some(Reference { tag: Some(tag), digest: None, ..r.clone() })
        }
    })
}

/// Reads the prefetch list: one path per line; blank lines and `#` comments are skipped.
fn read_prefetch(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let text = std::fs::read(path).with_context(|| format!("reading the prefetch list {}", path.display()))?;
    Ok(text
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty() && !line.starts_with(b"#"))
        .map(<[u8]>::to_vec)
        .collect())
}

/// The layers and config of an image in an OCI image layout.
async fn read_layout(dir: &Path, tag: Option<&str>, platform: &str) -> anyhow::Result<SourceImage> {
    let index_path = dir.join("index.json");
    let index: ImageIndex =
        serde_json::from_slice(&std::fs::read(&index_path).with_context(|| format!("reading {}", index_path.display()))?)
            .with_context(|| format!("{} is not an OCI image index", index_path.display()))?;
    let named = |d: &&Descriptor| d.annotations().as_ref().and_then(|a| a.get(REF_NAME_ANNOTATION)).map(String::as_str) == tag;
    let chosen = match tag {
        Some(tag) => index.manifests().iter().find(named).ok_or_else(|| anyhow!("{}: no image tagged {tag:?}", dir.display()))?,
        None if index.manifests().len() == 1 => &index.manifests()[0],
        None => bail!("{} holds {} images: say which with oci:DIR:TAG", dir.display(), index.manifests().len()),
    };
    let first: Digest = chosen.digest().to_string().parse()?;
    // `image::resolve` follows an index to the platform's manifest; here "fetching" reads blobs.
    let r = Reference { registry: "oci".into(), repository: dir.display().to_string(), tag: None, digest: Some(first.clone()) };
    let resolved = image::resolve(&r, platform, |reference| {
        let dir = dir.to_path_buf();
        async move {
            let digest: Digest = reference.parse()?;
            Ok((Bytes::from(read_layout_blob(&dir, &digest)?), None))
        }
    })
    .await?;
    let manifest = parse_manifest(&resolved.manifest)?;
    let config_digest: Digest = manifest.config().digest().to_string().parse()?;
    let config = Bytes::from(read_layout_blob(dir, &config_digest)?);
    Ok(SourceImage { config, layers: layers_of(&manifest)? })
}

/// A blob of an OCI layout, checked against its digest.
fn read_layout_blob(dir: &Path, digest: &Digest) -> anyhow::Result<Vec<u8>> {
    let path = dir.join("blobs/sha256").join(digest.hex());
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if &Digest::of(&bytes) != digest {
        bail!("{}: content does not match {digest}", path.display());
    }
    Ok(bytes)
}

/// The layers and config of an image in a registry.
async fn read_registry(client: &Arc<RegistryClient>, r: &Reference, platform: &str) -> anyhow::Result<SourceImage> {
    let resolved = image::resolve(r, platform, |reference| fetch_manifest(client.clone(), r.clone(), reference)).await?;
    let manifest = parse_manifest(&resolved.manifest)?;
    let config_digest: Digest = manifest.config().digest().to_string().parse()?;
    let config = fetch_blob(client, &r.registry, &r.repository, &config_digest).await?;
    Ok(SourceImage { config, layers: layers_of(&manifest)? })
}

async fn fetch_manifest(client: Arc<RegistryClient>, r: Reference, reference: String) -> anyhow::Result<(Bytes, Option<String>)> {
    let resp = client.send(&Request::manifest(&r.registry, &r.repository, &reference)).await?;
    if !resp.status().is_success() {
        bail!("manifest {}/{}:{reference}: {}", r.registry, r.repository, resp.status());
    }
    let media_type = resp.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(String::from);
    Ok((resp.bytes().await?, media_type))
}

/// A small blob (a config, a bootstrap) in memory, checked against its digest.
async fn fetch_blob(client: &RegistryClient, registry: &str, repository: &str, digest: &Digest) -> anyhow::Result<Bytes> {
    let resp = client.send(&Request::blob(registry, repository, digest)).await?;
    if !resp.status().is_success() {
        bail!("blob {digest} from {registry}/{repository}: {}", resp.status());
    }
    let bytes = resp.bytes().await.with_context(|| format!("blob {digest} from {registry}/{repository}"))?;
    if &Digest::of(&bytes) != digest {
        bail!("blob {digest} from {registry}/{repository}: content does not match its digest");
    }
    Ok(bytes)
}

/// Streams a blob to `path` (its digest is checked by whoever reads it).
async fn download_blob(
    client: Arc<RegistryClient>,
    registry: String,
    repository: String,
    digest: Digest,
    path: PathBuf,
) -> anyhow::Result<PathBuf> {
    let what = format!("blob {digest} from {registry}/{repository}");
    let resp = client.send(&Request::blob(&registry, &repository, &digest)).await?;
    if !resp.status().is_success() {
        bail!("{what}: {}", resp.status());
    }
    let mut file = tokio::fs::File::create(&path).await.with_context(|| format!("creating {}", path.display()))?;
    let mut body = resp.bytes_stream();
    while let Some(piece) = body.next().await {
        file.write_all(&piece.with_context(|| what.clone())?).await.with_context(|| format!("writing {}", path.display()))?;
    }
    file.flush().await?;
    Ok(path)
}

fn parse_manifest(bytes: &[u8]) -> anyhow::Result<ImageManifest> {
    serde_json::from_slice(bytes).context("reading the image manifest")
}

fn layers_of(manifest: &ImageManifest) -> anyhow::Result<Vec<Layer>> {
    manifest
        .layers()
        .iter()
        .map(|l| Ok(Layer { digest: l.digest().to_string().parse()?, size: l.size(), media_type: l.media_type().to_string() }))
        .collect()
}

/// Adds the chunks of Shoal image `name` to `dict`, noting which repository holds its blobs.
async fn load_chunk_dict(
    client: &Arc<RegistryClient>,
    name: &str,
    dict: &mut ChunkDict,
    repos: &mut HashMap<Digest, Reference>,
) -> anyhow::Result<()> {
    let r = Reference::parse(name)?;
    let resolved = image::resolve(&r, "linux/amd64", |reference| fetch_manifest(client.clone(), r.clone(), reference)).await?;
    let manifest = parse_manifest(&resolved.manifest)?;
    let bootstrap_layer = manifest
        .layers()
        .iter()
        .find(|l| {
            l.annotations().as_ref().and_then(|a| a.get(BOOTSTRAP_ANNOTATION)).map(String::as_str) == Some(BOOTSTRAP_ANNOTATION_VALUE)
        })
        .ok_or_else(|| anyhow!("--chunk-dict {name}: not a Shoal image (no layer annotated {BOOTSTRAP_ANNOTATION})"))?;
    let format = bootstrap_layer.annotations().as_ref().and_then(|a| a.get(FORMAT_ANNOTATION)).cloned().unwrap_or_default();
    if format != FORMAT_ANNOTATION_VALUE {
        bail!("--chunk-dict {name}: format version {format:?}, this Shoal reads {FORMAT_ANNOTATION_VALUE}");
    }
    let digest: Digest = bootstrap_layer.digest().to_string().parse()?;
    let bytes = fetch_blob(client, &r.registry, &r.repository, &digest).await?;
    let bootstrap = Bootstrap::decode(&bytes).with_context(|| format!("--chunk-dict {name}: reading its bootstrap"))?;
    for blob in bootstrap.blobs() {
        repos.entry(blob.digest().parse()?).or_insert_with(|| r.clone());
    }
    dict.add_bootstrap(&bootstrap);
    eprintln!("chunk dictionary {name}: {} chunks in {} blobs", bootstrap.chunks().len(), bootstrap.blobs().len());
    Ok(())
}

fn progress_bar(total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg:20} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

/// Applies every layer in order, then assembles the bootstrap.
async fn convert(
    client: &Arc<RegistryClient>,
    source: &Source,
    image: &SourceImage,
    mut builder: TreeBuilder,
    prefetch: &[Vec<u8>],
    tmp: &Path,
) -> anyhow::Result<Built> {
    let pb = progress_bar(image.layers.iter().map(|l| l.size).sum());
    let fetch_layer = |layer: &Layer| -> tokio::task::JoinHandle<anyhow::Result<PathBuf>> {
        match source {
            Source::Layout { dir, .. } => {
                let path = dir.join("blobs/sha256").join(layer.digest.hex());
                tokio::spawn(async move { Ok(path) })
            }
            Source::Registry(r) => tokio::spawn(download_blob(
                client.clone(),
                r.registry.clone(),
                r.repository.clone(),
                layer.digest.clone(),
                tmp.join(format!("layer-{}", layer.digest.hex())),
            )),
        }
    };
    let mut blob_files = HashMap::new();
    let (mut new_chunks, mut reused_chunks) = (0, 0);
    let mut next = image.layers.first().map(fetch_layer);
    for (i, layer) in image.layers.iter().enumerate() {
        pb.set_message(format!("layer {}/{}", i + 1, image.layers.len()));
        let path = match next.take() {
            Some(fetch) => fetch.await.map_err(|e| anyhow!("layer download task: {e}"))??,
            None => bail!("layer {} was not fetched", layer.digest),
        };
        // The next layer downloads while this one converts.
        next = image.layers.get(i + 1).map(fetch_layer);
        let sink_path = tmp.join(format!("chunks-{i}"));
        let (returned, outcome) = {
            let (layer, path, sink_path, pb) = (layer.clone(), path.clone(), sink_path.clone(), pb.clone());
            tokio::task::spawn_blocking(move || {
                let outcome = (|| -> anyhow::Result<_> {
                    let blob = std::fs::File::open(&path).with_context(|| format!("opening layer {}", path.display()))?;
                    let sink = BufWriter::with_capacity(1 << 20, std::fs::File::create(&sink_path)?);
                    let reader = std::io::BufReader::with_capacity(1 << 20, blob);
                    Ok(apply_layer(&mut builder, reader, &layer.media_type, &layer.digest.to_string(), sink, |n| pb.inc(n))?)
                })();
                (builder, outcome)
            })
            .await?
        };
        builder = returned;
        let outcome = outcome?;
        if matches!(source, Source::Registry(_)) {
            let _ = std::fs::remove_file(&path);
        }
        for warning in &outcome.warnings {
            pb.suspend(|| eprintln!("warning: {warning}"));
        }
        new_chunks += outcome.new_chunks;
        reused_chunks += outcome.reused_chunks;
        match outcome.blob {
            Some(blob) => {
                let digest: Digest = blob.digest().parse()?;
                let path = tmp.join(digest.hex());
                std::fs::rename(&sink_path, &path)?;
                blob_files.insert(digest, path);
            }
            None => {
                let _ = std::fs::remove_file(&sink_path);
            }
        }
    }
    pb.finish_and_clear();
    let prefetch = prefetch.to_vec();
    let built = tokio::task::spawn_blocking(move || builder.finish(&prefetch)).await??;
    for warning in &built.warnings {
        eprintln!("warning: {warning}");
    }
    let bootstrap_bytes = Bytes::from(built.bootstrap.encode().context("compressing the bootstrap")?);
    Ok(Built { bootstrap: built.bootstrap, bootstrap_bytes, blob_files, new_chunks, reused_chunks })
}

/// Pushes the chunk blobs, the bootstrap, a config and the manifest; returns the manifest digest.
async fn push(
    client: &Arc<RegistryClient>,
    source: &Source,
    target: &Reference,
    image: &SourceImage,
    built: &Built,
    dict_repos: &HashMap<Digest, Reference>,
    tmp: &Path,
) -> anyhow::Result<Digest> {
    let (registry, repository) = (target.registry.as_str(), target.repository.as_str());
    let blobs: Vec<(Digest, u64)> =
        built.bootstrap.blobs().iter().map(|b| Ok((b.digest().parse()?, b.size))).collect::<anyhow::Result<_>>()?;
    let pb = progress_bar(blobs.iter().map(|(_, size)| size).sum::<u64>() + built.bootstrap_bytes.len() as u64);
    pb.set_message(format!("pushing to {target}"));
    for (digest, size) in &blobs {
        if client.blob_exists(registry, repository, digest).await? {
            pb.inc(*size);
            continue;
        }
        match built.blob_files.get(digest) {
            Some(path) => client.push_blob_file(registry, repository, digest, path, *size).await?,
            None => copy_dict_blob(client, dict_repos.get(digest), target, digest, *size, tmp).await?,
        }
        pb.inc(*size);
    }
    let bootstrap_digest = Digest::of(&built.bootstrap_bytes);
    if !client.blob_exists(registry, repository, &bootstrap_digest).await? {
        client.push_blob_bytes(registry, repository, &bootstrap_digest, &built.bootstrap_bytes).await?;
    }
    pb.inc(built.bootstrap_bytes.len() as u64);

    let mut layer_descriptors: Vec<serde_json::Value> = blobs
        .iter()
        .map(|(digest, size)| {
            serde_json::json!({
                "mediaType": CHUNK_BLOB_MEDIA_TYPE,
                "digest": digest.to_string(),
                "size": size,
                "annotations": { SNAPSHOT_LAYER_ANNOTATION: SNAPSHOT_LAYER_CHUNKS },
            })
        })
        .collect();
    layer_descriptors.push(serde_json::json!({
        "mediaType": BOOTSTRAP_MEDIA_TYPE,
        "digest": bootstrap_digest.to_string(),
        "size": built.bootstrap_bytes.len(),
        "annotations": {
            BOOTSTRAP_ANNOTATION: BOOTSTRAP_ANNOTATION_VALUE,
            FORMAT_ANNOTATION: FORMAT_ANNOTATION_VALUE,
            SNAPSHOT_LAYER_ANNOTATION: SNAPSHOT_LAYER_BOOTSTRAP,
        },
    }));
    let diff_ids: Vec<String> = blobs.iter().map(|(d, _)| d.to_string()).chain([bootstrap_digest.to_string()]).collect();
    let config = Bytes::from(converted_config(&image.config, &diff_ids)?);
    let config_digest = Digest::of(&config);
    if !client.blob_exists(registry, repository, &config_digest).await? {
        client.push_blob_bytes(registry, repository, &config_digest, &config).await?;
    }
    let source_name = match source {
        Source::Layout { dir, tag } => format!("oci:{}{}", dir.display(), tag.as_ref().map(|t| format!(":{t}")).unwrap_or_default()),
        Source::Registry(r) => r.to_string(),
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest.to_string(), "size": config.len() },
        "layers": layer_descriptors,
        "annotations": { FORMAT_ANNOTATION: FORMAT_ANNOTATION_VALUE, SOURCE_ANNOTATION: source_name },
    });
    let manifest = Bytes::from(serde_json::to_vec(&manifest)?);
    let tag = target.tag.as_deref().unwrap_or("latest");
    let digest = client.push_manifest(registry, repository, tag, MANIFEST_MEDIA_TYPE, &manifest).await?;
    pb.finish_and_clear();
    eprintln!("pushed {target} ({} chunk blobs, bootstrap {bootstrap_digest})", blobs.len());
    Ok(digest)
}

/// Makes a chunk-dictionary blob available in the target repository: mounted from the
/// dictionary image's repository when the registry allows, else downloaded and uploaded.
async fn copy_dict_blob(
    client: &Arc<RegistryClient>,
    from: Option<&Reference>,
    target: &Reference,
    digest: &Digest,
    size: u64,
    tmp: &Path,
) -> anyhow::Result<()> {
    let from = from.ok_or_else(|| anyhow!("blob {digest} is in the bootstrap but neither built here nor in a chunk dictionary"))?;
    if from.registry == target.registry && client.mount_blob(&target.registry, &target.repository, digest, &from.repository).await? {
        return Ok(());
    }
    let path = tmp.join(format!("dict-{}", digest.hex()));
    download_blob(client.clone(), from.registry.clone(), from.repository.clone(), digest.clone(), path.clone()).await?;
    let actual = tokio::task::spawn_blocking({
        let path = path.clone();
        move || -> std::io::Result<Digest> {
            use sha2::Digest as _;
            let mut hasher = sha2::Sha256::new();
            std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
            Ok(Digest::from_hasher(hasher))
        }
    })
    .await??;
    if &actual != digest {
        bail!("blob {digest} from {from}: content does not match its digest");
    }
    client.push_blob_file(&target.registry, &target.repository, digest, &path, size).await?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// The source config with its `rootfs.diff_ids` naming the new layers; the history, which
/// describes the old layers, is dropped.
fn converted_config(config: &[u8], diff_ids: &[String]) -> anyhow::Result<Vec<u8>> {
    let mut config: serde_json::Value = serde_json::from_slice(config).context("reading the source image config")?;
    let object = config.as_object_mut().ok_or_else(|| anyhow!("the source image config is not a JSON object"))?;
    object.insert("rootfs".into(), serde_json::json!({ "type": "layers", "diff_ids": diff_ids }));
    object.remove("history");
    Ok(serde_json::to_vec(&config)?)
}

/// Writes `DIR/bootstrap` and `DIR/blobs/<hex>` for a local mount.
fn write_output(dir: &Path, built: &Built) -> anyhow::Result<()> {
    let blobs_dir = dir.join("blobs");
    std::fs::create_dir_all(&blobs_dir).with_context(|| format!("creating {}", blobs_dir.display()))?;
    std::fs::write(dir.join("bootstrap"), &built.bootstrap_bytes)?;
    for blob in built.bootstrap.blobs() {
        let digest: Digest = blob.digest().parse()?;
        let dest = blobs_dir.join(digest.hex());
        match built.blob_files.get(&digest) {
            Some(path) => {
                std::fs::copy(path, &dest).with_context(|| format!("writing {}", dest.display()))?;
            }
            None => eprintln!("warning: chunk blob {digest} comes from a chunk dictionary; it is not written to {}", blobs_dir.display()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_sources_split_the_tag_from_the_directory() {
        let Source::Layout { dir, tag } = Source::parse("oci:/tmp/x:v1").unwrap() else { panic!("not a layout") };
        assert_eq!((dir, tag), (PathBuf::from("/tmp/x"), Some("v1".into())));
        let Source::Layout { dir, tag } = Source::parse("oci:/tmp/x").unwrap() else { panic!("not a layout") };
        assert_eq!((dir, tag), (PathBuf::from("/tmp/x"), None));
        assert!(matches!(Source::parse("127.0.0.1:5000/team/app:v1").unwrap(), Source::Registry(_)));
    }

    #[test]
    fn the_default_target_is_the_source_tag_with_a_suffix() {
        let source = Source::parse("127.0.0.1:5000/team/app:v1").unwrap();
        let target = target_reference(&source, None).unwrap().unwrap();
        assert_eq!(target.to_string(), "127.0.0.1:5000/team/app:v1-shoal");
        assert!(target_reference(&Source::parse("oci:/x").unwrap(), None).unwrap().is_none());
    }

    #[test]
    fn the_config_names_the_new_layers() {
        let config = br#"{"architecture":"amd64","rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"history":[{}]}"#;
        let out: serde_json::Value = serde_json::from_slice(&converted_config(config, &["sha256:bb".into()]).unwrap()).unwrap();
        assert_eq!(out["rootfs"]["diff_ids"], serde_json::json!(["sha256:bb"]));
        assert_eq!(out["architecture"], "amd64");
        assert!(out.get("history").is_none());
    }
}
