//! The deployment files stay valid: Kubernetes manifests against the API schema, and every Shoal
//! config they carry against the agent's own config loader.

use std::path::Path;
use std::process::Command;

use shoal_tests::{require, shoal_bin};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository root")
}

#[test]
fn kubernetes_manifests_pass_the_api_schema() {
    require("kubernetes-validate");
    let manifest = repo().join("deploy/kubernetes/shoal-agent.yaml");
    let out = Command::new("kubernetes-validate").args(["-k", "1.30.0", "--strict"]).arg(&manifest).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_config_map_holds_a_config_the_agent_accepts() {
    let yaml = std::fs::read_to_string(repo().join("deploy/kubernetes/shoal-agent.yaml")).unwrap();
    let mut lines = yaml.lines().skip_while(|l| !l.trim_start().starts_with("shoal.toml: |")).skip(1);
    let mut toml = String::new();
    for l in lines.by_ref().take_while(|l| l.starts_with("    ")) {
        toml.push_str(&l[4..]);
        toml.push('\n');
    }
    assert!(toml.contains("[mirror]"), "no shoal.toml found in the ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shoal.toml"), &toml).unwrap();
    let out = Command::new(shoal_bin()).args(["agent", "--check-config", "--config"]).arg(dir.path().join("shoal.toml")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("quota = \"50GiB\""));
}

#[test]
fn the_containerd_hosts_example_points_at_the_mirror() {
    let text = std::fs::read_to_string(repo().join("deploy/containerd/hosts.toml")).unwrap();
    assert!(text.contains("[host.\"http://127.0.0.1:65001\"]"));
    assert!(text.contains("capabilities = [\"pull\", \"resolve\"]"));
}
