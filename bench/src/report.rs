//! Writing results: one JSON file and one Markdown table per scenario.

use std::path::Path;

use anyhow::Context;

/// Median of a non-empty sample.
pub fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// What machine produced the figures.
pub fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    serde_json::json!({ "cpus": cpus, "kernel": kernel, "cpu": model })
}

/// Writes `<name>.json` and `<name>.md` under `out`.
pub fn write(out: &Path, name: &str, json: &serde_json::Value, markdown: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join(format!("{name}.json")), serde_json::to_vec_pretty(json)?)?;
    std::fs::write(out.join(format!("{name}.md")), markdown)?;
    println!("{markdown}");
    println!("results written to {}/{name}.{{json,md}}", out.display());
    Ok(())
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces), from the
/// state on: field `k` here is field `k + 3` of proc(5). Empty when the process is gone.
fn stat_fields(pid: u32) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    // The state is a letter: 0 keeps the positions of the numbers after it.
    rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect()
}

/// CPU seconds a process has used (user + system, every thread).
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let f = stat_fields(pid);
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

/// [`process_cpu_seconds`] of a process and its children (nginx's master and workers).
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    let children: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| stat_fields(p).get(1) == Some(&u64::from(pid)))
        .collect();
    process_cpu_seconds(pid) + children.into_iter().map(process_cpu_seconds).sum::<f64>()
}

/// CPU seconds (user + system) of the children this process has waited for, so far.
pub fn waited_children_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Peak resident memory of a process, in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
