//! A small network of hosts on one machine: one network namespace per host, each with a veth into
//! a bridge in the root namespace (which holds the registry and the scheduler at the gateway
//! address). Everything is removed on drop, even when a test fails.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};

use crate::require;

/// A bridge and some hosts.
pub struct Lab {
    /// Prefix of every name this lab made.
    tag: String,
    /// Third octet of the lab's 10.201.x.0/24 subnet.
    subnet: u8,
    /// Namespace names, one per host.
    hosts: Vec<String>,
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The kernel's ARP table is one table for every network namespace, and by default it holds at
/// most 1,024 entries (`gc_thresh3`). Hosts that all talk to each other need about `(n + 1)²` of
/// them: past 30 or so hosts, new entries fail and so does every packet to a host not yet in the
/// table (`ENOBUFS`, "neighbor table overflow" in the kernel log): UDP sends fail outright and
/// TCP connects time out. The limits are raised (never lowered) so that a lab's hosts can reach
/// each other as machines on one LAN would.
fn make_room_for_neighbours(n: usize) -> anyhow::Result<()> {
    let needed = 2 * (n as u64 + 1).pow(2) + 1024;
    for (name, want) in [("gc_thresh2", needed), ("gc_thresh3", 2 * needed)] {
        let path = format!("/proc/sys/net/ipv4/neigh/default/{name}");
        let now: u64 = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?.trim().parse().unwrap_or(0);
        if now < want {
            std::fs::write(&path, want.to_string()).with_context(|| format!("raising {path} to {want}"))?;
        }
    }
    Ok(())
}

impl Lab {
    /// A lab of `n` hosts (at most 200).
    pub fn new(n: usize) -> anyhow::Result<Lab> {
        require("ip");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id() % 100_000;
        let tag = format!("sh{pid}x{k}");
        let subnet = ((pid * 7 + k * 13) % 200 + 20) as u8;
        let mut lab = Lab { tag, subnet, hosts: Vec::new() };
        lab.cleanup();
        make_room_for_neighbours(n)?;
        let bridge = lab.bridge();
        sh(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        sh(&["ip", "addr", "add", &format!("{}/24", lab.gateway()), "dev", &bridge])?;
        sh(&["ip", "link", "set", &bridge, "up"])?;
        for i in 0..n {
            let ns = format!("{}-{i}", lab.tag);
            let veth = format!("{}v{i}", lab.tag);
            sh(&["ip", "netns", "add", &ns])?;
            lab.hosts.push(ns.clone());
            sh(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            sh(&["ip", "link", "set", &veth, "master", &bridge])?;
            sh(&["ip", "link", "set", &veth, "up"])?;
            let ip = lab.ip(i).to_string();
            sh(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }

    /// The root namespace's address on the bridge: where the registry and scheduler listen.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.subnet, 1)
    }

    /// Host `i`'s address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.subnet, i as u8 + 2)
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// True with no hosts.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Shapes host `i`'s link: egress with `tc tbf`, and ingress too (through an ifb device)
    /// when `down_mbit` is given.
    pub fn shape(&self, i: usize, up_mbit: u32, down_mbit: Option<u32>) -> anyhow::Result<()> {
        require("tc");
        let ns = self.ns(i);
        let tbf = |dev: &str, mbit: u32| -> anyhow::Result<()> {
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "tc",
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                "256kb",
                "latency",
                "50ms",
            ])
        };
        tbf("eth0", up_mbit)?;
        if let Some(down) = down_mbit {
            sh(&["ip", "-n", ns, "link", "add", "ifb0", "type", "ifb"])?;
            sh(&["ip", "-n", ns, "link", "set", "ifb0", "up"])?;
            sh(&["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "handle", "ffff:", "ingress"])?;
            sh(&[
                "ip", "netns", "exec", ns, "tc", "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "all", "u32", "match",
                "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "ifb0",
            ])?;
            tbf("ifb0", down)?;
        }
        Ok(())
    }

    /// A command run inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(i), program]);
        c
    }

    /// Deletes every lab this process made (for a signal handler: drops will not run).
    pub fn cleanup_all_of_this_process() {
        let prefix = format!("sh{}x", std::process::id() % 100_000);
        let out = Command::new("ip").args(["netns", "list"]).output();
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if name.starts_with(&prefix) {
                    let _ = Command::new("ip").args(["netns", "del", name]).output();
                }
            }
        }
        let out = Command::new("ip").args(["-o", "link", "show", "type", "bridge"]).output();
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split(':').nth(1).unwrap_or("").trim();
                if name.starts_with(&prefix) && name.ends_with("br") {
                    let _ = Command::new("ip").args(["link", "del", name]).output();
                }
            }
        }
    }

    fn cleanup(&self) {
        let out = Command::new("ip").args(["netns", "list"]).output();
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if name.starts_with(&format!("{}-", self.tag)) {
                    let _ = Command::new("ip").args(["netns", "del", name]).output();
                }
            }
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge()]).output();
    }
}

/// A command run in the network namespace `ns` (a name under /run/netns) and nothing else.
/// `ip netns exec` also gives the process a mount namespace of its own, whose mounts the rest of
/// the machine never sees: a node's daemons that mount for each other (a snapshotter's lazy
/// mounts, containerd's rootfs on top of them) must share the machine's mounts instead, as they
/// do on a real node.
pub fn net_only_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    require("nsenter");
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg(program);
    c
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and so the pair.
        self.cleanup();
    }
}
