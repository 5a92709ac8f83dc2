//! The scheduler replicas a host talks to: one lazily connected gRPC client per replica, and the
//! rendezvous order in which a key (a task, an image) maps onto them, so that every host picks
//! the same replica for a key, and the same next one when that replica fails.

use std::time::Duration;

use shoal_proto::scheduler as pb;
use shoal_proto::scheduler::scheduler_client::SchedulerClient;
use tonic::transport::Channel;
use tracing::debug;

/// One scheduler replica.
pub struct Replica {
    /// Its `host:port`.
    pub addr: String,
    /// The connected client, once connected; dropped after a failure.
    client: tokio::sync::Mutex<Option<SchedulerClient<Channel>>>,
}

/// Every replica of the cluster's scheduler.
pub struct Schedulers {
    /// In configured order.
    replicas: Vec<Replica>,
}

impl Schedulers {
    /// The replicas at `addrs` (`host:port`); none is contacted until used.
    pub fn new(addrs: &[String]) -> Schedulers {
        Schedulers { replicas: addrs.iter().map(|a| Replica { addr: a.clone(), client: tokio::sync::Mutex::new(None) }).collect() }
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
    pub async fn client(&self, r: &Replica) -> Result<SchedulerClient<Channel>, String> {
        let mut slot = r.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let endpoint = Channel::from_shared(format!("http://{}", r.addr))
            .map_err(|e| format!("scheduler {}: {e}", r.addr))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10));
        let channel = endpoint.connect().await.map_err(|e| format!("scheduler {}: {e}", r.addr))?;
        let c = SchedulerClient::new(channel);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Drops replica `r`'s client after a failure: the next use reconnects.
    pub async fn forget(&self, r: &Replica) {
        *r.client.lock().await = None;
    }

    /// Calls `rpc` on `key`'s replica, or on the next ones in order when one fails; `what`
    /// names the call in logs and errors.
    async fn call<T, F>(&self, key: &str, what: &str, rpc: impl Fn(SchedulerClient<Channel>) -> F) -> Result<T, String>
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
        let a = Schedulers::new(&addrs);
        let mut reversed = addrs.clone();
        reversed.reverse();
        let b = Schedulers::new(&reversed);
        let order = |s: &Schedulers, key: &str| s.for_key(key).iter().map(|r| r.addr.clone()).collect::<Vec<_>>();
        let mut firsts = std::collections::HashSet::new();
        for key in (0..50).map(|i| format!("sha256:{i}")) {
            assert_eq!(order(&a, &key), order(&b, &key), "configured order must not matter");
            assert_eq!(order(&a, &key).len(), 3);
            firsts.insert(order(&a, &key)[0].clone());
        }
        assert_eq!(firsts.len(), 3, "keys spread over every replica");
    }
}
