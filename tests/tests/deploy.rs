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

/// The text of the ConfigMap entry `key` (`shoal.toml: |` and the lines indented under it).
fn config_map_entry(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim_start() != format!("{key}: |")).skip(1);
    let mut toml = String::new();
    for l in lines.by_ref().take_while(|l| l.starts_with("    ")) {
        toml.push_str(&l[4..]);
        toml.push('\n');
    }
    toml
}

/// What `shoal <role> --check-config` makes of `toml`.
fn checked_config(role: &str, toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shoal.toml"), toml).unwrap();
    let out = Command::new(shoal_bin()).args([role, "--check-config", "--config"]).arg(dir.path().join("shoal.toml")).output().unwrap();
    assert!(out.status.success(), "{role}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_config_map_holds_a_config_the_agent_accepts() {
    let yaml = std::fs::read_to_string(repo().join("deploy/kubernetes/shoal-agent.yaml")).unwrap();
    let toml = config_map_entry(&yaml, "shoal.toml");
    assert!(toml.contains("[mirror]"), "no shoal.toml found in the ConfigMap");
    let checked = checked_config("agent", &toml);
    assert!(checked.contains("quota = \"50GiB\""));
    assert!(checked.contains("scheduler_token_file = \"/etc/shoal-tokens/agent\""), "{checked}");
    // Pods on a node cannot send the agent to registries of their choosing, and every registry the
    // init container points containerd at is one the agent accepts.
    assert!(checked.contains("only_configured_registries = true"), "{checked}");
    let hosts = yaml.lines().find_map(|l| l.trim().strip_prefix("value: \"").filter(|v| v.contains("docker.io="))).unwrap();
    for entry in hosts.trim_end_matches('"').split_whitespace() {
        let host = entry.split('=').next().unwrap();
        assert!(checked.contains(&format!("[registry.\"{host}\"]")), "{host} is written to hosts.toml but not configured:\n{checked}");
    }
}

#[test]
fn the_scheduler_needs_the_tokens_the_secret_mounts() {
    let yaml = std::fs::read_to_string(repo().join("deploy/kubernetes/shoal-agent.yaml")).unwrap();
    let checked = checked_config("scheduler", &config_map_entry(&yaml, "scheduler.toml"));
    for role in ["agent", "seed", "preheat"] {
        assert!(checked.contains(&format!("{role}_token_file = \"/etc/shoal-tokens/{role}\"")), "{checked}");
        assert!(yaml.contains(&format!("\n  {role}: ")), "the Secret has no {role} token");
    }
    assert!(yaml.contains("mountPath: /etc/shoal-tokens") && yaml.contains("secretName: shoal-scheduler-tokens"));
    // The shipped tokens are placeholders the scheduler refuses, never a token anyone could copy.
    for line in yaml.lines().skip_while(|l| !l.starts_with("stringData:")).skip(1).take(3) {
        let token = line.split_once(':').map(|(_, v)| v.trim()).unwrap_or_default();
        assert!(token.len() < shoal_core::bearer::MIN_TOKEN_LEN, "{line:?} is long enough to be accepted");
    }
}

#[test]
fn the_containerd_hosts_example_points_at_the_mirror() {
    let text = std::fs::read_to_string(repo().join("deploy/containerd/hosts.toml")).unwrap();
    assert!(text.contains("[host.\"http://127.0.0.1:65001\"]"));
    assert!(text.contains("capabilities = [\"pull\", \"resolve\"]"));
}

#[test]
fn the_containerd_snapshotter_example_names_the_agents_default_socket() {
    let text = std::fs::read_to_string(repo().join("deploy/containerd/config-snapshotter.toml")).unwrap();
    let socket = shoal_core::config::Config::default().snapshotter.socket;
    assert!(text.contains(&format!("address = \"{}\"", socket.display())), "{text}");
    assert!(text.contains("snapshotter = \"shoal\"") && text.contains("disable_snapshot_annotations = false"), "{text}");
    // The unit must leave lazy mount processes alone when the agent restarts.
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/shoal-agent.service")).unwrap();
    assert!(unit.contains("KillMode=process"), "{unit}");
}
