//! The scheduler replicas a host talks to: one lazily connected gRPC client per replica, each
//! presenting the host's bearer token, and the rendezvous order in which a key (a task, an
//! image) maps onto them, so that every host picks the same replica for a key, and the same
//! next one when that replica fails.

use std::time::Duration;

use shoal_core::bearer::BearerToken;
use shoal_proto::scheduler as pb;
use shoal_proto::scheduler::scheduler_client::SchedulerClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::debug;

/// A client of one scheduler replica, presenting a [`Credential`] with every call.
pub type Client = SchedulerClient<InterceptedService<Channel, Credential>>;

/// What a caller presents to the scheduler: `authorization: Bearer <token>` on every request,
/// or nothing (for a scheduler without token files, such as `shoal up`'s).
#[derive(Clone, Default)]
pub struct Credential(Option<MetadataValue<Ascii>>);

impl Credential {
    /// Presents `token`, or nothing.
    pub fn new(token: Option<&BearerToken>) -> Credential {
        // A BearerToken is visible ASCII, always a valid header value.
        let value = token.and_then(|t| MetadataValue::try_from(format!("Bearer {}", t.secret())).ok()).map(|mut v| {
            v.set_sensitive(true);
            v
        });
        Credential(value)
    }

    /// A client of `channel` presenting this credential.
    pub fn client(&self, channel: Channel) -> Client {
        SchedulerClient::with_interceptor(channel, self.clone())
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Credential(bearer token)" } else { "Credential(none)" })
    }
}

impl tonic::service::Interceptor for Credential {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// One scheduler replica.
pub struct Replica {
    /// Its `host:port`.
    pub addr: String,
    /// The connected client, once connected; dropped after a failure.
    client: tokio::sync::Mutex<Option<Client>>,
}

/// Every replica of the cluster's scheduler.
pub struct Schedulers {
    /// In configured order.
    replicas: Vec<Replica>,
    /// What every call presents.
    credential: Credential,
}

impl Schedulers {
    /// The replicas at `addrs` (`host:port`), called with `credential`; none is contacted until used.
    pub fn new(addrs: &[String], credential: Credential) -> Schedulers {
        let replicas = addrs.iter().map(|a| Replica { addr: a.clone(), client: tokio::sync::Mutex::new(None) }).collect();
        Schedulers { replicas, credential }
    }

    /// Every replica, in configured order.
    pub fn all(&self) -> &[Replica] {
        &self.replicas
    }

    /// Whether there is no replica at all.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// Replicas for `key`, best first (rendezvous hashing).
    pub fn for_key(&self, key: &str) -> Vec<&Replica> {
        let mut r: Vec<(blake3::Hash, &Replica)> =
            self.replicas.iter().map(|r| (blake3::hash(format!("{key}\n{}", r.addr).as_bytes()), r)).collect();
        r.sort_by(|a, b| b.0.as_bytes().cmp(a.0.as_bytes()));
        r.into_iter().map(|(_, r)| r).collect()
    }

    /// A client of replica `r`, connecting first if needed.
    pub async fn client(&self, r: &Replica) -> Result<Client, String> {
        let mut slot = r.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let endpoint = Channel::from_shared(format!("http://{}", r.addr))
            .map_err(|e| format!("scheduler {}: {e}", r.addr))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10));
        let channel = endpoint.connect().await.map_err(|e| format!("scheduler {}: {e}", r.addr))?;
        let c = self.credential.client(channel);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Drops replica `r`'s client after a failure: the next use reconnects.
    pub async fn forget(&self, r: &Replica) {
        *r.client.lock().await = None;
    }

    /// Calls `rpc` on `key`'s replica, or on the next ones in order when one fails; `what`
    /// names the call in logs and errors.
    pub(crate) async fn call<T, F>(&self, key: &str, what: &str, rpc: impl Fn(Client) -> F) -> Result<T, String>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = format!("{what}: no scheduler configured");
        for r in self.for_key(key) {
            let result = match self.client(r).await {
                Ok(c) => rpc(c).await.map(tonic::Response::into_inner).map_err(|e| e.message().to_string()),
                Err(e) => Err(e),
            };
            match result {
                Ok(answer) => return Ok(answer),
                Err(e) => {
                    debug!(scheduler = %r.addr, error = %e, "{what} failed; trying the next replica");
                    self.forget(r).await;
                    last = format!("{what}: scheduler {}: {e}", r.addr);
                }
            }
        }
        Err(last)
    }

    /// Reports `host`'s access trace of `image` (the digest of its bootstrap) to the image's
    /// replica, or the next one that answers. Returns how many paths it kept.
    pub async fn report_trace(&self, image: &str, host: &str, paths: Vec<Vec<u8>>) -> Result<u32, String> {
        let req = pb::ReportTraceRequest { image: image.into(), host_id: host.into(), paths };
        let answer = self
            .call(image, "reporting a trace", |mut c| {
                let req = req.clone();
                async move { c.report_trace(req).await }
            })
            .await?;
        Ok(answer.kept)
    }

    /// The merged access trace of `image` from its replica (or the next that answers): paths,
    /// most needed first, and how many hosts' traces it merges.
    pub async fn merged_trace(&self, image: &str) -> Result<(Vec<Vec<u8>>, u32), String> {
        let req = pb::GetTraceRequest { image: image.into() };
        let trace = self
            .call(image, "asking for a merged trace", |mut c| {
                let req = req.clone();
                async move { c.get_trace(req).await }
            })
            .await?;
        Ok((trace.paths, trace.traces))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_orders_the_replicas_of_a_key_alike_and_keys_spread() {
        let addrs: Vec<String> = (1..=3).map(|i| format!("10.0.0.{i}:8002")).collect();
        let a = Schedulers::new(&addrs, Credential::default());
        let mut reversed = addrs.clone();
        reversed.reverse();
        let b = Schedulers::new(&reversed, Credential::default());
        let order = |s: &Schedulers, key: &str| s.for_key(key).iter().map(|r| r.addr.clone()).collect::<Vec<_>>();
        let mut firsts = std::collections::HashSet::new();
        for key in (0..50).map(|i| format!("sha256:{i}")) {
            assert_eq!(order(&a, &key), order(&b, &key), "configured order must not matter");
            assert_eq!(order(&a, &key).len(), 3);
            firsts.insert(order(&a, &key)[0].clone());
        }
        assert_eq!(firsts.len(), 3, "keys spread over every replica");
    }

    #[test]
    fn a_credential_adds_the_bearer_header_and_hides_it() {
        use tonic::service::Interceptor;
        let token = BearerToken::parse("host-token-0123456789").unwrap();
        let mut with = Credential::new(Some(&token));
        let req = with.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer host-token-0123456789");
        assert!(!format!("{with:?} {:?}", req.metadata()).contains("host-token"), "the token must not show in debug output");
        let req = Credential::new(None).call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }
}
