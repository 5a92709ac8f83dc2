//! What the benchmark tests share: running `shoal-bench` at toy size, and checking that a run
//! left nothing behind.

// Each test file compiles its own copy and uses only part of it.
#![allow(dead_code)]

use std::process::{Command, Output, Stdio};

/// Runs `shoal-bench --out <temp dir> ARGS...`; returns the directory, the run's pid (which names
/// its namespaces) and its output.
pub fn run_bench(args: &[&str]) -> (tempfile::TempDir, u32, Output) {
    let out = tempfile::tempdir().unwrap();
    let bench = Command::new(env!("CARGO_BIN_EXE_shoal-bench"))
        .arg("--out")
        .arg(out.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = bench.id();
    let run = bench.wait_with_output().unwrap();
    (out, pid, run)
}

/// Nothing of run `pid` is left: no namespace, no mount under its nodes' directories `dirs`,
/// no process naming one of them.
pub fn assert_nothing_left(pid: u32, dirs: &[String]) {
    let prefix = format!("sh{}x", pid % 100_000);
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout).into_owned();
    assert!(!netns.lines().any(|l| l.starts_with(&prefix)), "namespaces left: {netns}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    for line in mounts.lines() {
        let point = line.split(' ').nth(1).unwrap_or("");
        assert!(!dirs.iter().any(|d| point.starts_with(d.as_str())), "left mounted: {line}");
    }
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = String::from_utf8_lossy(&std::fs::read(entry.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        assert!(!dirs.iter().any(|d| cmdline.contains(d.as_str())), "left running: {cmdline}");
    }
}
