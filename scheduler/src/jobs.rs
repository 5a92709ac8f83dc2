//! Preheat jobs: which hosts were asked to fetch which blobs, and what they reported. Plain data.

use std::collections::HashMap;

use crate::hosts::HostId;

/// One preheat job.
#[derive(Clone, Debug, Default)]
pub struct Job {
    /// Blobs by digest, with their length.
    pub blobs: Vec<(String, u64)>,
    /// Hosts asked to fetch every blob.
    pub targets: Vec<HostId>,
    /// What each host reported for each blob: `Ok` or the error.
    pub results: HashMap<(String, HostId), Result<(), String>>,
}

/// Where a job stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    Running,
    Done,
    Failed(String),
}

impl Job {
    /// Hosts done with `digest`.
    pub fn hosts_done(&self, digest: &str) -> usize {
        self.targets.iter().filter(|h| matches!(self.results.get(&(digest.to_string(), (*h).clone())), Some(Ok(())))).count()
    }

    /// Done when every host reported every blob; failed once every report is in and one failed.
    pub fn state(&self) -> JobState {
        let expected = self.blobs.len() * self.targets.len();
        let reported = self.results.len();
        if let Some(Err(e)) = self.results.values().find(|r| r.is_err()) {
            if reported >= expected {
                return JobState::Failed(e.clone());
            }
        }
        if reported >= expected {
            JobState::Done
        } else {
            JobState::Running
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job { blobs: vec![("a".into(), 1), ("b".into(), 2)], targets: vec![HostId("h1".into()), HostId("h2".into())], ..Job::default() }
    }

    #[test]
    fn a_job_is_done_when_every_host_reported_every_blob() {
        let mut j = job();
        assert_eq!(j.state(), JobState::Running);
        for d in ["a", "b"] {
            for h in ["h1", "h2"] {
                j.results.insert((d.into(), HostId(h.into())), Ok(()));
            }
        }
        assert_eq!(j.state(), JobState::Done);
        assert_eq!(j.hosts_done("a"), 2);
    }

    #[test]
    fn a_failure_fails_the_job_once_all_reports_are_in() {
        let mut j = job();
        j.results.insert(("a".into(), HostId("h1".into())), Err("disk full".into()));
        assert_eq!(j.state(), JobState::Running);
        for (d, h) in [("a", "h2"), ("b", "h1"), ("b", "h2")] {
            j.results.insert((d.into(), HostId(h.into())), Ok(()));
        }
        assert_eq!(j.state(), JobState::Failed("disk full".into()));
        assert_eq!(j.hosts_done("a"), 1);
    }
}
