//! Image references (`registry/repo:tag@digest`) and registry host rules, as Docker and containerd read them.

use std::fmt;

use crate::digest::Digest;

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Registry host as containerd names it (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository name (`library/alpine`).
    pub repository: String,
    /// Tag, when given (`latest` when neither tag nor digest is).
    pub tag: Option<String>,
    /// Digest, when given; it wins over the tag.
    pub digest: Option<Digest>,
}

/// Why a string is not an image reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("image reference {input:?}: {reason}")]
pub struct ReferenceError {
    input: String,
    reason: String,
}

impl Reference {
    /// Parses `[registry/]repo[:tag][@digest]` with Docker's defaults (`docker.io`, `library/`, `latest`).
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        let err = |reason: &str| ReferenceError { input: input.into(), reason: reason.into() };
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>().map_err(|e| err(&e.to_string()))?)),
            None => (input, None),
        };
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(rest[i + 1..].to_string())),
            _ => (rest, None),
        };
        if let Some(t) = &tag {
            if !is_tag(t) {
                return Err(err("invalid tag"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let repository = if registry == "docker.io" && !repository.contains('/') { format!("library/{repository}") } else { repository };
        if !is_repository(&repository) {
            return Err(err("invalid repository name"));
        }
        if !is_registry_host(&registry) {
            return Err(err("invalid registry host"));
        }
        let tag = if tag.is_none() && digest.is_none() { Some("latest".into()) } else { tag };
        Ok(Reference { registry, repository, tag, digest })
    }

    /// What to ask the registry's manifest endpoint for: the digest if known, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Repository names as the distribution spec allows them: lower-case components separated by `/`,
/// each `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`. Rejects `..`, empty components and
/// anything that could escape a path.
pub fn is_repository(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.split('/').all(is_path_component)
}

fn is_path_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let sep_start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[sep_start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Tags: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn is_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A registry host: a DNS name or IPv4 address, optionally with `:port`, or a bracketed IPv6 address.
pub fn is_registry_host(host: &str) -> bool {
    if host.is_empty() || host.len() > 255 {
        return false;
    }
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, tail)) => {
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                return tail.is_empty() || tail.strip_prefix(':').is_some_and(|p| p.parse::<u16>().is_ok());
            }
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        },
    };
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return false;
    }
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether the host part of `host[:port]` is a loopback address or `localhost`; such registries are
/// reached over plain HTTP by default, as Docker does.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map(|(n, _)| n).unwrap_or(host),
    };
    name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_get_docker_defaults() {
        let r = Reference::parse("alpine").unwrap();
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()), ("docker.io", "library/alpine", Some("latest")));
        let r = Reference::parse("127.0.0.1:5000/team/app:v1.2").unwrap();
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()), ("127.0.0.1:5000", "team/app", Some("v1.2")));
        let d = crate::Digest::of(b"m");
        let r = Reference::parse(&format!("localhost/app@{d}")).unwrap();
        assert_eq!((r.registry.as_str(), r.tag.clone(), r.digest.clone()), ("localhost", None, Some(d.clone())));
        assert_eq!(r.manifest_ref(), d.to_string());
        assert_eq!(Reference::parse("ghcr.io/o/r:t").unwrap().to_string(), "ghcr.io/o/r:t");
    }

    #[test]
    fn bad_references_are_rejected() {
        for bad in ["", "UPPER/case", "a/../b", "reg.io/a//b", "app:bad tag", "app@sha256:zz", "reg.io:99999/a"] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repository_names_follow_the_spec() {
        for ok in ["a", "library/alpine", "a.b_c__d---e/f0", "x/y/z"] {
            assert!(is_repository(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a..b", "a___b", "..", "a/./b", "a/", "/a", "a%2f..", "A"] {
            assert!(!is_repository(bad), "{bad}");
        }
    }

    #[test]
    fn registry_hosts_and_loopback() {
        for ok in ["docker.io", "127.0.0.1:5000", "[::1]:5000", "localhost", "my-reg.example.com:443"] {
            assert!(is_registry_host(ok), "{ok}");
        }
        for bad in ["", "a/b", "host:port", "-x.com", "[::1", "a..b", "evil.com@x", "h:1:2"] {
            assert!(!is_registry_host(bad), "{bad}");
        }
        assert!(is_loopback_host("127.0.0.1:5000") && is_loopback_host("localhost") && is_loopback_host("[::1]:1"));
        assert!(!is_loopback_host("10.0.0.1:5000") && !is_loopback_host("docker.io"));
    }
}
