//! The gRPC shell: containerd's `Snapshots` service over a unix socket, translating to
//! [`Snapshotter`] calls and its errors to the status codes containerd maps back to its own.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use futures_util::Stream;
use shoal_proto::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use shoal_proto::snapshots::{self as api};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::meta::{Error, Kind, Snapshot};
use crate::mounts::{matches, parse_filter};
use crate::Snapshotter;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::NotFound(_) => Status::not_found(e.to_string()),
            Error::AlreadyExists(_) => Status::already_exists(e.to_string()),
            Error::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            Error::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
            Error::Db(_) | Error::Io(_) => Status::internal(e.to_string()),
        }
    }
}

struct Service(Arc<Snapshotter>);

fn parent(p: &str) -> Option<&str> {
    (!p.is_empty()).then_some(p)
}

fn labels(l: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

fn timestamp(nanos: u128) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (nanos / 1_000_000_000) as i64, nanos: (nanos % 1_000_000_000) as i32 }
}

fn info(name: &str, s: &Snapshot) -> api::Info {
    api::Info {
        name: name.to_string(),
        parent: s.parent.clone().unwrap_or_default(),
        kind: match s.kind {
            Kind::View => api::Kind::View,
            Kind::Active => api::Kind::Active,
            Kind::Committed => api::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(s.created)),
        updated_at: Some(timestamp(s.updated)),
        labels: s.labels.clone().into_iter().collect(),
    }
}

type InfoStream = Pin<Box<dyn Stream<Item = Result<api::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(&self, r: Request<api::PrepareSnapshotRequest>) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        debug!(key = r.key, parent = r.parent, labels = ?r.labels, "prepare");
        let mounts = self.0.prepare(&r.key, parent(&r.parent), labels(r.labels), Kind::Active).await?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts }))
    }

    async fn view(&self, r: Request<api::ViewSnapshotRequest>) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        debug!(key = r.key, parent = r.parent, "view");
        let mounts = self.0.prepare(&r.key, parent(&r.parent), labels(r.labels), Kind::View).await?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(&self, r: Request<api::MountsRequest>) -> Result<Response<api::MountsResponse>, Status> {
        Ok(Response::new(api::MountsResponse { mounts: self.0.mounts_of(&r.into_inner().key).await? }))
    }

    async fn commit(&self, r: Request<api::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        debug!(key = r.key, name = r.name, "commit");
        self.0.commit(&r.name, &r.key, labels(r.labels)).await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<api::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let key = r.into_inner().key;
        debug!(key, "remove");
        self.0.remove(&key).await?;
        Ok(Response::new(()))
    }

    async fn stat(&self, r: Request<api::StatSnapshotRequest>) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let key = r.into_inner().key;
        let s = self.0.stat(&key)?;
        Ok(Response::new(api::StatSnapshotResponse { info: Some(info(&key, &s)) }))
    }

    async fn update(&self, r: Request<api::UpdateSnapshotRequest>) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let want = r.info.ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let s = self.0.update_labels(&want.name, labels(want.labels), &paths)?;
        Ok(Response::new(api::UpdateSnapshotResponse { info: Some(info(&want.name, &s)) }))
    }

    type ListStream = InfoStream;

    async fn list(&self, r: Request<api::ListSnapshotsRequest>) -> Result<Response<InfoStream>, Status> {
        let filters = r.into_inner().filters;
        let parsed = filters.iter().map(|f| parse_filter(f)).collect::<Result<Vec<_>, _>>().map_err(Status::invalid_argument)?;
        let infos: Vec<api::Info> = self
            .0
            .list()?
            .into_iter()
            .filter(|(name, s)| parsed.is_empty() || parsed.iter().any(|c| matches(c, name, s)))
            .map(|(name, s)| info(&name, &s))
            .collect();
        let chunks: Vec<Result<api::ListSnapshotsResponse, Status>> =
            infos.chunks(100).map(|c| Ok(api::ListSnapshotsResponse { info: c.to_vec() })).collect();
        Ok(Response::new(Box::pin(futures_util::stream::iter(chunks))))
    }

    async fn usage(&self, r: Request<api::UsageRequest>) -> Result<Response<api::UsageResponse>, Status> {
        let u = self.0.usage(&r.into_inner().key).await?;
        Ok(Response::new(api::UsageResponse { size: u.size as i64, inodes: u.inodes as i64 }))
    }

    async fn cleanup(&self, _: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        self.0.cleanup().await?;
        Ok(Response::new(()))
    }
}

/// Binds the unix socket `socket`, replacing a stale one, readable by root only.
pub fn bind(socket: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => info!(socket = %socket.display(), "replacing the socket of an earlier run"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the old socket {}", socket.display())),
    }
    let listener = tokio::net::UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660)).with_context(|| format!("securing {}", socket.display()))?;
    Ok(listener)
}

/// Serves `snapshotter` on `listener` (bound to `socket`) until `shutdown`, then removes the socket.
pub async fn serve(
    snapshotter: Arc<Snapshotter>,
    listener: tokio::net::UnixListener,
    socket: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    info!(socket = %socket.display(), "snapshotter serving containerd");
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service(snapshotter)))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown.cancelled_owned())
        .await
        .context("serving the snapshots API")?;
    let _ = std::fs::remove_file(socket);
    Ok(())
}
