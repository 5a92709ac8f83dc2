//! Snapshot metadata, kept in one redb database (`<root>/metadata.redb`): every change is one
//! write transaction, synced before it returns, so a crash leaves the state before or after it.
//!
//! Keys are containerd's: an active or view snapshot under the key it was prepared with, a
//! committed one under its name. Each snapshot has a numeric id naming its directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// key → JSON of [`Snapshot`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// "next_id" → the next snapshot id.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// What went wrong, in the terms containerd's API answers with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("snapshot metadata: {0}")]
    Db(#[from] redb::Error),
    #[error("{0}")]
    Io(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
        Error::Io(format!("{what} {}: {e}", path.display()))
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::Db(e.into())
            }
        }
    )*};
}
from_redb!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// containerd's snapshot kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only, prepared on a committed parent.
    View,
    /// Writable, prepared on a committed parent; committing turns it into a parent.
    Active,
    /// Immutable, a parent of others.
    Committed,
}

/// A layer Shoal provides itself instead of containerd unpacking it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Remote {
    /// A chunk blob of a Shoal image: it has no files of its own, the image's bootstrap layer
    /// shows them all.
    Chunks,
    /// The bootstrap layer of a Shoal image: the whole image's filesystem.
    Image {
        /// The image, as `registry/repository@digest`.
        image: String,
        /// What a container's overlayfs takes as lower layers for it, top first: the lazy
        /// mount's, or the snapshot's own `fs` when the image was unpacked instead.
        lower_dirs: Vec<PathBuf>,
        /// Whether it was unpacked (no lazy mount to keep up).
        unpacked: bool,
    },
}

/// Bytes and inodes a snapshot's own directory uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: u64,
    pub inodes: u64,
}

/// One snapshot's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Names its directory: `<root>/snapshots/<id>`.
    pub id: u64,
    pub kind: Kind,
    /// The committed snapshot below this one, by name.
    pub parent: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created: u128,
    pub updated: u128,
    /// Counted at commit; `None` while active.
    pub usage: Option<Usage>,
    pub remote: Option<Remote>,
}

/// Nanoseconds since the epoch, now.
pub fn now() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default()
}

/// The metadata database.
pub struct Meta {
    db: redb::Database,
}

impl Meta {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Meta, Error> {
        let db = redb::Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(SNAPSHOTS)?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(Meta { db })
    }

    /// The snapshot under `key`.
    pub fn get(&self, key: &str) -> Result<Snapshot, Error> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let value = table.get(key)?.ok_or_else(|| Error::NotFound(key.to_string()))?;
        decode(key, value.value())
    }

    /// Every snapshot, by key.
    pub fn list(&self) -> Result<Vec<(String, Snapshot)>, Error> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// `key`'s snapshot followed by its ancestors, nearest first.
    pub fn chain(&self, key: &str) -> Result<Vec<(String, Snapshot)>, Error> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(SNAPSHOTS)?;
        let mut out: Vec<(String, Snapshot)> = Vec::new();
        let mut next = Some(key.to_string());
        while let Some(k) = next {
            let value = table.get(k.as_str())?.ok_or_else(|| Error::NotFound(k.clone()))?;
            let snapshot = decode(&k, value.value())?;
            next = snapshot.parent.clone();
            out.push((k, snapshot));
            if out.len() > 4096 {
                return Err(Error::FailedPrecondition(format!("snapshot {key} has a parent chain of more than 4096")));
            }
        }
        Ok(out)
    }

    /// Creates snapshot `key` of `kind` on the committed `parent`, with a new id.
    pub fn create(
        &self,
        key: &str,
        kind: Kind,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        remote: Option<Remote>,
    ) -> Result<Snapshot, Error> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("a snapshot needs a key".into()));
        }
        let tx = self.db.begin_write()?;
        let snapshot = {
            let mut table = tx.open_table(SNAPSHOTS)?;
            if table.get(key)?.is_some() {
                return Err(Error::AlreadyExists(key.to_string()));
            }
            if let Some(p) = parent {
                let value = table.get(p)?.ok_or_else(|| Error::NotFound(format!("{p} (the parent of {key})")))?;
                if decode(p, value.value())?.kind != Kind::Committed {
                    return Err(Error::InvalidArgument(format!("parent {p} of {key} is not committed")));
                }
            }
            let mut counters = tx.open_table(COUNTERS)?;
            let id = counters.get("next_id")?.map(|v| v.value()).unwrap_or(1);
            counters.insert("next_id", id + 1)?;
            let t = now();
            let snapshot = Snapshot {
                id,
                kind,
                parent: parent.map(String::from),
                labels,
                created: t,
                updated: t,
                usage: (kind == Kind::Committed).then(Usage::default),
                remote,
            };
            table.insert(key, encode(&snapshot).as_slice())?;
            snapshot
        };
        tx.commit()?;
        Ok(snapshot)
    }

    /// Commits the active snapshot `key` as `name`, merging `labels` into its own.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>, usage: Usage) -> Result<Snapshot, Error> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("a committed snapshot needs a name".into()));
        }
        let tx = self.db.begin_write()?;
        let snapshot = {
            let mut table = tx.open_table(SNAPSHOTS)?;
            if table.get(name)?.is_some() {
                return Err(Error::AlreadyExists(name.to_string()));
            }
            let mut snapshot = match table.get(key)? {
                Some(v) => decode(key, v.value())?,
                None => return Err(Error::NotFound(key.to_string())),
            };
            if snapshot.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!("snapshot {key} is not active")));
            }
            snapshot.kind = Kind::Committed;
            snapshot.labels.extend(labels);
            snapshot.usage = Some(usage);
            snapshot.updated = now();
            table.remove(key)?;
            table.insert(name, encode(&snapshot).as_slice())?;
            snapshot
        };
        tx.commit()?;
        Ok(snapshot)
    }

    /// Removes snapshot `key`, which nothing may have as parent.
    pub fn remove(&self, key: &str) -> Result<Snapshot, Error> {
        let tx = self.db.begin_write()?;
        let snapshot = {
            let mut table = tx.open_table(SNAPSHOTS)?;
            let snapshot = match table.get(key)? {
                Some(v) => decode(key, v.value())?,
                None => return Err(Error::NotFound(key.to_string())),
            };
            for entry in table.iter()? {
                let (k, v) = entry?;
                if decode(k.value(), v.value())?.parent.as_deref() == Some(key) {
                    return Err(Error::FailedPrecondition(format!("cannot remove snapshot {key}: {} is its child", k.value())));
                }
            }
            table.remove(key)?;
            snapshot
        };
        tx.commit()?;
        Ok(snapshot)
    }

    /// Changes snapshot `key` with `change` and records it.
    pub fn update(&self, key: &str, change: impl FnOnce(&mut Snapshot)) -> Result<Snapshot, Error> {
        let tx = self.db.begin_write()?;
        let snapshot = {
            let mut table = tx.open_table(SNAPSHOTS)?;
            let mut snapshot = match table.get(key)? {
                Some(v) => decode(key, v.value())?,
                None => return Err(Error::NotFound(key.to_string())),
            };
            change(&mut snapshot);
            snapshot.updated = now();
            table.insert(key, encode(&snapshot).as_slice())?;
            snapshot
        };
        tx.commit()?;
        Ok(snapshot)
    }
}

fn encode(snapshot: &Snapshot) -> Vec<u8> {
    serde_json::to_vec(snapshot).expect("a snapshot record serialises")
}

fn decode(key: &str, bytes: &[u8]) -> Result<Snapshot, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Io(format!("snapshot {key}: unreadable record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> (tempfile::TempDir, Meta) {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(&dir.path().join("metadata.redb")).unwrap();
        (dir, meta)
    }

    #[test]
    fn prepare_commit_and_remove_follow_containerds_rules() {
        let (_dir, m) = meta();
        let a = m.create("a", Kind::Active, None, BTreeMap::new(), None).unwrap();
        assert!(matches!(m.create("a", Kind::Active, None, BTreeMap::new(), None), Err(Error::AlreadyExists(_))));
        assert!(
            matches!(m.create("b", Kind::Active, Some("a"), BTreeMap::new(), None), Err(Error::InvalidArgument(_))),
            "an active parent is refused"
        );
        assert!(matches!(m.create("b", Kind::Active, Some("nope"), BTreeMap::new(), None), Err(Error::NotFound(_))));
        let labels = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let c = m.commit("layer1", "a", labels, Usage { size: 3, inodes: 1 }).unwrap();
        assert_eq!((c.id, c.kind, c.labels.get("k").map(String::as_str)), (a.id, Kind::Committed, Some("v")));
        assert!(matches!(m.get("a"), Err(Error::NotFound(_))));
        let b = m.create("b", Kind::View, Some("layer1"), BTreeMap::new(), None).unwrap();
        assert_ne!(b.id, a.id);
        assert!(
            matches!(m.commit("x", "b", BTreeMap::new(), Usage::default()), Err(Error::FailedPrecondition(_))),
            "a view cannot be committed"
        );
        assert!(matches!(m.remove("layer1"), Err(Error::FailedPrecondition(_))), "a parent cannot go first");
        let chain: Vec<String> = m.chain("b").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(chain, ["b", "layer1"]);
        m.remove("b").unwrap();
        m.remove("layer1").unwrap();
        assert!(m.list().unwrap().is_empty());
    }

    #[test]
    fn records_and_ids_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        let first = {
            let m = Meta::open(&path).unwrap();
            let s = m.create("a", Kind::Active, None, BTreeMap::new(), None).unwrap();
            m.commit("n", "a", BTreeMap::new(), Usage::default()).unwrap();
            m.update("n", |s| {
                s.labels.insert("x".into(), "y".into());
            })
            .unwrap();
            s.id
        };
        let m = Meta::open(&path).unwrap();
        let n = m.get("n").unwrap();
        assert_eq!((n.id, n.kind, n.labels.get("x").map(String::as_str)), (first, Kind::Committed, Some("y")));
        assert!(m.create("b", Kind::Active, None, BTreeMap::new(), None).unwrap().id > first, "ids are never reused");
    }
}
