//! What containerd mounts for a snapshot, and containerd's snapshot filters: pure functions of
//! the metadata.

use std::path::{Path, PathBuf};

use containerd_client::types::Mount;

use crate::meta::{Kind, Remote, Snapshot};

/// The directory of snapshot `id`: its files in `fs`, overlayfs's scratch space in `work`.
pub fn snapshot_dir(root: &Path, id: u64) -> PathBuf {
    root.join("snapshots").join(id.to_string())
}

/// The directories below a snapshot, top first, for its ancestors `parents` (nearest first).
/// A Shoal image's chunk layers add nothing: its bootstrap layer shows every file.
pub fn lower_dirs(root: &Path, parents: &[Snapshot]) -> Vec<PathBuf> {
    let mut lowers = Vec::new();
    for p in parents {
        match &p.remote {
            Some(Remote::Chunks) => {}
            Some(Remote::Image { lower_dirs, .. }) => lowers.extend(lower_dirs.iter().cloned()),
            None => lowers.push(snapshot_dir(root, p.id).join("fs")),
        }
    }
    lowers
}

/// The mounts of the active or view snapshot `s` over `parents` (nearest first), as containerd's
/// overlayfs snapshotter gives them: a bind mount of its own directory when it has no lower
/// layer, else an overlay whose upper is its own directory; a view is read-only.
pub fn mounts(root: &Path, s: &Snapshot, parents: &[Snapshot]) -> Vec<Mount> {
    let dir = snapshot_dir(root, s.id);
    let lowers = lower_dirs(root, parents);
    let path = |p: &Path| p.display().to_string();
    let bind = |source: &Path, mode: &str| Mount {
        r#type: "bind".into(),
        source: path(source),
        target: String::new(),
        options: vec![mode.into(), "rbind".into()],
    };
    let lowerdir = || format!("lowerdir={}", lowers.iter().map(|p| path(p)).collect::<Vec<_>>().join(":"));
    match (s.kind, lowers.len()) {
        (Kind::Active, 0) => vec![bind(&dir.join("fs"), "rw")],
        (Kind::Active, _) => vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                "index=off".into(),
                format!("workdir={}", path(&dir.join("work"))),
                format!("upperdir={}", path(&dir.join("fs"))),
                lowerdir(),
            ],
        }],
        (_, 0) => vec![bind(&dir.join("fs"), "ro")],
        (_, 1) => vec![bind(&lowers[0], "ro")],
        _ => vec![Mount { r#type: "overlay".into(), source: "overlay".into(), target: String::new(), options: vec![lowerdir()] }],
    }
}

/// One condition of a containerd filter: a field (`name`, `parent`, `kind`, `labels.<key>`,
/// the key optionally quoted), and the value it must equal, or `None` for "is present".
#[derive(Debug, PartialEq, Eq)]
pub struct Condition {
    field: Vec<String>,
    value: Option<String>,
}

/// Parses a containerd filter of `,`-joined conditions (all must hold) of the forms
/// `field==value` and `field`. Other operators (`!=`, `~=`) are refused.
pub fn parse_filter(filter: &str) -> Result<Vec<Condition>, String> {
    let mut out = Vec::new();
    for part in split_outside_quotes(filter, ',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (field, value) = match find_outside_quotes(part, "==") {
            Some(i) => (&part[..i], Some(unquote(part[i + 2..].trim()))),
            None if part.contains("!=") || part.contains("~=") => return Err(format!("filter {filter:?}: only == is supported")),
            None => (part, None),
        };
        let field: Vec<String> = split_outside_quotes(field.trim(), '.').into_iter().map(|f| unquote(f.trim())).collect();
        if field.iter().any(String::is_empty) {
            return Err(format!("filter {filter:?}: empty field name"));
        }
        out.push(Condition { field, value });
    }
    Ok(out)
}

/// Whether the snapshot `name` satisfies every condition.
pub fn matches(conditions: &[Condition], name: &str, s: &Snapshot) -> bool {
    conditions.iter().all(|c| {
        let kind = match s.kind {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        };
        let got = match c.field.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
            ["name"] => Some(name),
            ["parent"] => s.parent.as_deref(),
            ["kind"] => Some(kind),
            ["labels", key] => s.labels.get(*key).map(String::as_str),
            ["labels", rest @ ..] => s.labels.get(&rest.join(".")).map(String::as_str),
            _ => None,
        };
        match (&c.value, got) {
            (None, got) => got.is_some(),
            (Some(want), got) => got.unwrap_or("") == want,
        }
    })
}

fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn find_outside_quotes(s: &str, needle: &str) -> Option<usize> {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if !quoted && s[i..].starts_with(needle) {
            return Some(i);
        }
    }
    None
}

fn unquote(s: &str) -> String {
    match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn snap(id: u64, kind: Kind, remote: Option<Remote>) -> Snapshot {
        Snapshot { id, kind, parent: None, labels: BTreeMap::new(), created: 0, updated: 0, usage: None, remote }
    }

    #[test]
    fn mounts_are_those_of_containerds_overlayfs_snapshotter() {
        let root = Path::new("/r");
        let first = mounts(root, &snap(1, Kind::Active, None), &[]);
        assert_eq!((first[0].r#type.as_str(), first[0].source.as_str()), ("bind", "/r/snapshots/1/fs"));
        assert_eq!(first[0].options, ["rw", "rbind"]);
        let parents = [snap(3, Kind::Committed, None), snap(2, Kind::Committed, None)];
        let active = mounts(root, &snap(4, Kind::Active, None), &parents);
        assert_eq!(active[0].r#type, "overlay");
        assert_eq!(
            active[0].options,
            ["index=off", "workdir=/r/snapshots/4/work", "upperdir=/r/snapshots/4/fs", "lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"]
        );
        let view = mounts(root, &snap(5, Kind::View, None), &parents[1..]);
        assert_eq!((view[0].r#type.as_str(), view[0].source.as_str()), ("bind", "/r/snapshots/2/fs"));
        assert_eq!(view[0].options, ["ro", "rbind"]);
        assert_eq!(mounts(root, &snap(6, Kind::View, None), &parents)[0].options, ["lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"]);
    }

    #[test]
    fn a_shoal_image_is_seen_through_its_lazy_mount_and_its_chunk_layers_add_nothing() {
        let image =
            Remote::Image { image: "r/x@sha256:00".into(), lower_dirs: vec!["/m/small".into(), "/m/large".into()], unpacked: false };
        let parents = [
            snap(9, Kind::Committed, Some(image)),
            snap(8, Kind::Committed, Some(Remote::Chunks)),
            snap(7, Kind::Committed, Some(Remote::Chunks)),
        ];
        let m = mounts(Path::new("/r"), &snap(10, Kind::Active, None), &parents);
        assert_eq!(m[0].options.last().unwrap(), "lowerdir=/m/small:/m/large");
    }

    #[test]
    fn filters_select_by_label_parent_name_and_kind() {
        let mut s = snap(1, Kind::Committed, None);
        s.parent = Some("p/1".into());
        s.labels.insert("containerd.io/snapshot.ref".into(), "sha256:ab".into());
        let f = parse_filter(r#"labels."containerd.io/snapshot.ref"==sha256:ab,parent=="p/1""#).unwrap();
        assert!(matches(&f, "n", &s));
        let f = parse_filter(r#"labels."containerd.io/snapshot.ref"==sha256:ab,parent=="p/2""#).unwrap();
        assert!(!matches(&f, "n", &s));
        assert!(matches(&parse_filter("kind==committed,name==n").unwrap(), "n", &s));
        assert!(matches(&parse_filter(r#"labels."containerd.io/snapshot.ref""#).unwrap(), "n", &s));
        assert!(!matches(&parse_filter("labels.other").unwrap(), "n", &s));
        assert!(parse_filter("name!=n").is_err());
    }
}
