//! Drives containerd's CRI over its socket as the kubelet does (PullImage, RunPodSandbox,
//! CreateContainer, StartContainer, then stop and remove), reads what containers printed from
//! their CRI log files, and times a cold start from PullImage to a container's first line.
//!
//! Pods share the host's network (no CNI here). Start containerd with
//! [`crate::Containerd::start_cri`] and get a client with [`crate::Containerd::cri`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::Registry;

/// The Kubernetes namespace the pods are given.
const POD_NAMESPACE: &str = "shoal-test";

/// A CRI client of one containerd: its runtime and image services.
#[derive(Clone)]
pub struct Cri {
    /// RunPodSandbox, CreateContainer, ContainerStatus, ...
    runtime: RuntimeServiceClient<Channel>,
    /// PullImage, RemoveImage.
    images: ImageServiceClient<Channel>,
    /// Where pods' log directories are made.
    logs: PathBuf,
}

/// A pod sandbox that was started.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The sandbox id CRI gave it.
    pub id: String,
    /// The config it was started with (CreateContainer takes it again, as from the kubelet).
    pub config: api::PodSandboxConfig,
}

/// A container created in a pod.
#[derive(Debug, Clone)]
pub struct Container {
    /// The container id CRI gave it.
    pub id: String,
    /// The CRI log file containerd writes its output to.
    pub log_path: PathBuf,
}

/// One line a container printed, from its CRI log file.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    /// When containerd read the line (its first part) from the container.
    pub time: SystemTime,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The text, without its newline.
    pub text: String,
}

/// A cold start timed as the kubelet sees it, by [`Cri::cold_start`].
#[derive(Debug, Clone)]
pub struct ColdStart {
    /// The image id PullImage returned.
    pub image_id: String,
    /// The container that was started (still in its pod).
    pub container: Container,
    /// How long PullImage took.
    pub pull: Duration,
    /// From the start of PullImage to the time containerd logged the container's first line.
    pub first_output: Duration,
    /// That first line.
    pub first_line: LogLine,
}

impl Cri {
    /// Connects to the CRI services on containerd's `socket`; pods' log directories go in `logs`.
    pub async fn connect(socket: &Path, logs: PathBuf) -> anyhow::Result<Cri> {
        // The URI is a placeholder: every connection goes to the socket.
        let channel = Endpoint::try_from("http://[::]:0")?
            .connect_with_connector(UnixSocket(Arc::new(socket.to_path_buf())))
            .await
            .with_context(|| format!("connecting to CRI at {}", socket.display()))?;
        let cri = Cri { runtime: RuntimeServiceClient::new(channel.clone()), images: ImageServiceClient::new(channel), logs };
        // The kubelet's first call: it fails when containerd runs without its CRI plugin.
        let version = cri.runtime.clone().version(api::VersionRequest { version: "v1".into() }).await;
        version.with_context(|| format!("CRI Version on {} (is the CRI plugin on?)", socket.display()))?;
        Ok(cri)
    }

    /// PullImage of `image` (`host/repo:tag`), through containerd's hosts dir; returns the image id.
    pub async fn pull_image(&self, image: &str) -> anyhow::Result<String> {
        let request = api::PullImageRequest { image: Some(image_spec(image)), auth: None, sandbox_config: None };
        let response = self.images.clone().pull_image(request).await.with_context(|| format!("CRI PullImage {image}"))?;
        Ok(response.into_inner().image_ref)
    }

    /// RemoveImage of `image` (a name or an id).
    pub async fn remove_image(&self, image: &str) -> anyhow::Result<()> {
        let request = api::RemoveImageRequest { image: Some(image_spec(image)) };
        self.images.clone().remove_image(request).await.with_context(|| format!("CRI RemoveImage {image}"))?;
        Ok(())
    }

    /// RunPodSandbox of a pod named `name` on the host's network, with its log directory in
    /// this client's log root. CRI pulls the sandbox image first if it does not have it.
    pub async fn run_pod(&self, name: &str) -> anyhow::Result<Pod> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let uid = format!("{name}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        // As the kubelet lays it out: <root>/<namespace>_<name>_<uid>.
        let log_dir = self.logs.join(format!("{POD_NAMESPACE}_{name}_{uid}"));
        std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let config = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata { name: name.into(), uid, namespace: POD_NAMESPACE.into(), attempt: 0 }),
            log_directory: log_dir.to_string_lossy().into_owned(),
            linux: Some(api::LinuxPodSandboxConfig {
                security_context: Some(api::LinuxSandboxSecurityContext { namespace_options: Some(host_network()), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = api::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: String::new() };
        let response = self.runtime.clone().run_pod_sandbox(request).await.with_context(|| format!("CRI RunPodSandbox {name}"))?;
        Ok(Pod { id: response.into_inner().pod_sandbox_id, config })
    }

    /// StopPodSandbox then RemovePodSandbox, as the kubelet deletes a pod.
    pub async fn remove_pod(&self, pod: &Pod) -> anyhow::Result<()> {
        remove_pod_by_id(&mut self.runtime.clone(), &pod.id).await
    }

    /// CreateContainer named `name` of `image` (a name or an id) running `command` in `pod`.
    pub async fn create_container(&self, pod: &Pod, name: &str, image: &str, command: &[&str]) -> anyhow::Result<Container> {
        // As the kubelet names it: <container name>/<restart count>.log under the pod's log dir.
        let log_path = format!("{name}/0.log");
        let config = api::ContainerConfig {
            metadata: Some(api::ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(image_spec(image)),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: log_path.clone(),
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: Some(host_network()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request =
            api::CreateContainerRequest { pod_sandbox_id: pod.id.clone(), config: Some(config), sandbox_config: Some(pod.config.clone()) };
        let response =
            self.runtime.clone().create_container(request).await.with_context(|| format!("CRI CreateContainer {name} of {image}"))?;
        let log_path = Path::new(&pod.config.log_directory).join(log_path);
        Ok(Container { id: response.into_inner().container_id, log_path })
    }

    /// StartContainer.
    pub async fn start_container(&self, container: &Container) -> anyhow::Result<()> {
        let request = api::StartContainerRequest { container_id: container.id.clone() };
        self.runtime.clone().start_container(request).await.with_context(|| format!("CRI StartContainer {}", container.id))?;
        Ok(())
    }

    /// CreateContainer then StartContainer.
    pub async fn run_container(&self, pod: &Pod, name: &str, image: &str, command: &[&str]) -> anyhow::Result<Container> {
        let container = self.create_container(pod, name, image, command).await?;
        self.start_container(&container).await?;
        Ok(container)
    }

    /// ContainerStatus.
    pub async fn container_status(&self, container: &Container) -> anyhow::Result<api::ContainerStatus> {
        let request = api::ContainerStatusRequest { container_id: container.id.clone(), verbose: false };
        let response =
            self.runtime.clone().container_status(request).await.with_context(|| format!("CRI ContainerStatus {}", container.id))?;
        response.into_inner().status.with_context(|| format!("CRI ContainerStatus {}: no status", container.id))
    }

    /// Polls ContainerStatus until the container has exited; returns its exit code.
    pub async fn wait_exit(&self, container: &Container, timeout: Duration) -> anyhow::Result<i32> {
        let start = Instant::now();
        loop {
            let status = self.container_status(container).await?;
            if status.state == api::ContainerState::ContainerExited as i32 {
                return Ok(status.exit_code);
            }
            if start.elapsed() > timeout {
                let state = api::ContainerState::try_from(status.state).map_or_else(|_| status.state.to_string(), |s| format!("{s:?}"));
                bail!(
                    "container {} did not exit within {timeout:?}: state {state}, reason {:?}, message {:?}; its log so far:\n{}",
                    container.id,
                    status.reason,
                    status.message,
                    std::fs::read_to_string(&container.log_path).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The lines the container has printed so far, both streams in the order containerd read them.
    pub fn log_lines(&self, container: &Container) -> anyhow::Result<Vec<LogLine>> {
        let text = match std::fs::read_to_string(&container.log_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            read => read.with_context(|| format!("reading {}", container.log_path.display()))?,
        };
        parse_log(&text).with_context(|| format!("CRI log {}", container.log_path.display()))
    }

    /// What the container has printed so far, each line ended by a newline.
    pub fn output(&self, container: &Container) -> anyhow::Result<String> {
        Ok(self.log_lines(container)?.iter().map(|l| format!("{}\n", l.text)).collect())
    }

    /// Waits until the container has printed a whole line and returns it.
    pub async fn wait_first_line(&self, container: &Container, timeout: Duration) -> anyhow::Result<LogLine> {
        let start = Instant::now();
        loop {
            if let Some(line) = self.log_lines(container)?.into_iter().next() {
                return Ok(line);
            }
            if start.elapsed() > timeout {
                let status = self.container_status(container).await?;
                bail!(
                    "container {} printed no line within {timeout:?}: state {}, exit code {}, reason {:?}, message {:?}",
                    container.id,
                    status.state,
                    status.exit_code,
                    status.reason,
                    status.message
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// PullImage of `image`, then a container of it running `command` in `pod`, timed until its
    /// first line (which `command` should print at once).
    pub async fn cold_start(&self, pod: &Pod, name: &str, image: &str, command: &[&str], timeout: Duration) -> anyhow::Result<ColdStart> {
        let started = SystemTime::now();
        let clock = Instant::now();
        let image_id = self.pull_image(image).await?;
        let pull = clock.elapsed();
        let container = self.run_container(pod, name, &image_id, command).await?;
        let first_line = self.wait_first_line(&container, timeout.saturating_sub(clock.elapsed())).await?;
        // Both times come from this host's clock: the log's from containerd, `started` from here.
        let first_output = first_line.time.duration_since(started).unwrap_or_default();
        Ok(ColdStart { image_id, container, pull, first_output, first_line })
    }

    /// StopContainer (no grace period) then RemoveContainer.
    pub async fn remove_container(&self, container: &Container) -> anyhow::Result<()> {
        let mut runtime = self.runtime.clone();
        let id = container.id.clone();
        runtime.stop_container(api::StopContainerRequest { container_id: id.clone(), timeout: 0 }).await.context("CRI StopContainer")?;
        runtime.remove_container(api::RemoveContainerRequest { container_id: id }).await.context("CRI RemoveContainer")?;
        Ok(())
    }

    /// Ids of every pod sandbox containerd has.
    pub async fn pods(&self) -> anyhow::Result<Vec<String>> {
        pod_ids(&mut self.runtime.clone()).await
    }
}

/// Builds and pushes a sandbox ("pause") image to `registry`: static busybox whose `sleep`
/// keeps the pod's first process alive until CRI kills it. Returns its reference.
pub async fn push_sandbox_image(registry: &Registry) -> anyhow::Result<String> {
    registry.push_image_running("shoal-test/pause", "1", &[], &["/bin/busybox", "sleep", "2147483647"]).await?;
    Ok(format!("{}/shoal-test/pause:1", registry.host()))
}

/// Stops and removes every pod of the containerd on `socket`, from any thread (a fixture's
/// `Drop` runs inside the test's runtime, so this uses a runtime of its own on a new thread).
pub(crate) fn remove_every_pod(socket: &Path) -> anyhow::Result<()> {
    let socket = socket.to_path_buf();
    let work = std::thread::spawn(move || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let remove = async {
                let cri = Cri::connect(&socket, PathBuf::new()).await?;
                let mut client = cri.runtime.clone();
                for id in pod_ids(&mut client).await? {
                    remove_pod_by_id(&mut client, &id).await?;
                }
                anyhow::Ok(())
            };
            tokio::time::timeout(Duration::from_secs(60), remove).await.context("timed out after 60 s")?
        })
    });
    work.join().map_err(|_| anyhow::anyhow!("the thread removing pods panicked"))?
}

async fn pod_ids(runtime: &mut RuntimeServiceClient<Channel>) -> anyhow::Result<Vec<String>> {
    let response = runtime.list_pod_sandbox(api::ListPodSandboxRequest { filter: None }).await.context("CRI ListPodSandbox")?;
    Ok(response.into_inner().items.into_iter().map(|p| p.id).collect())
}

async fn remove_pod_by_id(runtime: &mut RuntimeServiceClient<Channel>, id: &str) -> anyhow::Result<()> {
    let stop = api::StopPodSandboxRequest { pod_sandbox_id: id.into() };
    runtime.stop_pod_sandbox(stop).await.with_context(|| format!("CRI StopPodSandbox {id}"))?;
    let remove = api::RemovePodSandboxRequest { pod_sandbox_id: id.into() };
    runtime.remove_pod_sandbox(remove).await.with_context(|| format!("CRI RemovePodSandbox {id}"))?;
    Ok(())
}

fn image_spec(image: &str) -> api::ImageSpec {
    api::ImageSpec { image: image.into(), ..Default::default() }
}

/// The namespaces of a pod on the host's network (so no CNI), as the kubelet sets them for
/// `hostNetwork: true`: its own PID namespace per container, IPC shared in the pod.
fn host_network() -> api::NamespaceOption {
    api::NamespaceOption {
        network: api::NamespaceMode::Node as i32,
        pid: api::NamespaceMode::Container as i32,
        ipc: api::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// Connects gRPC channels to one unix socket.
#[derive(Clone)]
struct UnixSocket(Arc<PathBuf>);

impl tonic::codegen::Service<Uri> for UnixSocket {
    type Response = TokioIo<UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(&*path).await?)) })
    }
}

/// Parses a CRI log file: lines `<RFC 3339 time> <stream> <P|F> <text>`, where `P` marks a part
/// of a line longer than containerd's buffer and `F` the last part. A last line still being
/// written (no newline yet) is left out, and so is a line whose last part has not come yet.
pub fn parse_log(text: &str) -> anyhow::Result<Vec<LogLine>> {
    let mut lines = Vec::new();
    // A line being assembled from parts, per stream.
    let mut partial: Vec<LogLine> = Vec::new();
    for raw in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let raw = raw.trim_end_matches('\n');
        let mut fields = raw.splitn(4, ' ');
        let (Some(time), Some(stream), Some(tag)) = (fields.next(), fields.next(), fields.next()) else {
            bail!("not a CRI log line: {raw:?}");
        };
        let part = fields.next().unwrap_or("");
        let time = parse_time(time).with_context(|| format!("bad time in CRI log line {raw:?}"))?;
        let mut line = match partial.iter().position(|l| l.stream == stream) {
            Some(i) => partial.remove(i),
            None => LogLine { time, stream: stream.into(), text: String::new() },
        };
        line.text.push_str(part);
        match tag {
            "F" => lines.push(line),
            "P" => partial.push(line),
            _ => bail!("CRI log line tagged {tag:?}, neither P nor F: {raw:?}"),
        }
    }
    Ok(lines)
}

/// Parses an RFC 3339 time as containerd writes it in CRI logs (Go's `RFC3339Nano`:
/// `2026-12-07T04:11:41.361997878Z`, or with an offset such as `+02:00`).
fn parse_time(s: &str) -> Option<SystemTime> {
    let (date, rest) = s.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|f| f.parse::<i64>().ok());
    let (year, month, day) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (clock, offset) = match rest.strip_suffix('Z') {
        Some(clock) => (clock, 0),
        None => {
            let at = rest.rfind(['+', '-'])?;
            let (clock, offset) = rest.split_at(at);
            let (hours, minutes) = offset[1..].split_once(':')?;
            let seconds = hours.parse::<i64>().ok()? * 3600 + minutes.parse::<i64>().ok()? * 60;
            (clock, if offset.starts_with('-') { -seconds } else { seconds })
        }
    };
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let mut hms = hms.splitn(3, ':').map(|f| f.parse::<i64>().ok());
    let (hour, minute, second) = (hms.next()??, hms.next()??, hms.next()??);
    if fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos = format!("{fraction:0<9}").parse::<u32>().ok()?;
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(UNIX_EPOCH + Duration::new(u64::try_from(seconds).ok()?, nanos))
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(seconds, nanos)
    }

    #[test]
    fn times_in_utc_and_with_offsets_parse_to_the_same_instant() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(at(0, 0)));
        assert_eq!(parse_time("2000-03-01T00:00:00Z"), Some(at(951_868_800, 0)));
        assert_eq!(parse_time("1999-12-31T23:59:59Z"), Some(at(946_684_799, 0)));
        assert_eq!(parse_time("2026-12-07T04:11:41.361997878Z"), Some(at(1_796_616_701, 361_997_878)));
        assert_eq!(parse_time("2026-12-07T04:11:41.5Z"), Some(at(1_796_616_701, 500_000_000)));
        assert_eq!(parse_time("2026-12-07T06:11:41.5+02:00"), Some(at(1_796_616_701, 500_000_000)));
        assert_eq!(parse_time("2026-12-06T23:41:41.5-04:30"), Some(at(1_796_616_701, 500_000_000)));
    }

    #[test]
    fn malformed_times_are_refused() {
        for bad in ["", "2026-12-07", "2026-12-07T04:11Z", "2026-12-07T04:11:41", "2026-12-07T04:11:41.1234567890Z", "x-12-07T04:11:41Z"] {
            assert_eq!(parse_time(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn log_lines_keep_streams_and_join_partial_lines() {
        let log = "2026-12-07T04:11:41.1Z stdout F hello from the top layer\n\
                   2026-12-07T04:11:41.2Z stderr P a long \n\
                   2026-12-07T04:11:41.3Z stdout F \n\
                   2026-12-07T04:11:41.4Z stderr F warning\n\
                   2026-12-07T04:11:41.5Z stdout P not ended\n\
                   2026-12-07T04:11:41.6Z stdout F still being wri";
        let lines = parse_log(log).unwrap();
        let got: Vec<(&str, &str)> = lines.iter().map(|l| (l.stream.as_str(), l.text.as_str())).collect();
        assert_eq!(got, [("stdout", "hello from the top layer"), ("stdout", ""), ("stderr", "a long warning")]);
        assert_eq!(lines[0].time, at(1_796_616_701, 100_000_000));
        assert_eq!(lines[2].time, at(1_796_616_701, 200_000_000), "a joined line has its first part's time");
    }

    #[test]
    fn lines_that_are_not_cri_log_lines_are_errors() {
        assert!(parse_log("hello\n").is_err());
        assert!(parse_log("2026-12-07T04:11:41Z stdout X text\n").is_err());
        assert!(parse_log("yesterday stdout F text\n").is_err());
    }
}
