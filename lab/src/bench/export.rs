//! `ledger-lab bench export`: audit-trail throughput and the memory an export needs.
//!
//! A scratch database (`<name>_bench`) is filled with a synthetic but valid history (`fill_domain_log`),
//! sealed in-process, then each export — and its verification — runs as a child process of the `ledger` binary
//! (`ledger export`, `ledger verify`), exactly as users run them. Peak resident memory is the child's
//! `VmHWM` (the kernel's high-water mark of its resident set) read from `/proc/<pid>/status` every
//! [`RSS_POLL_MS`] ms while it runs: the kernel keeps the maximum, so only growth in the last poll interval
//! before exit could be missed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ledger::audit::ExportFormat;
use serde::Serialize;

use crate::support::high_water_mark_kb;

/// How often a child's memory high-water mark is read.
pub const RSS_POLL_MS: u64 = 10;
/// The memory an export must stay under (issue 7).
pub const EXPORT_RSS_MB_MAX: f64 = 200.0;

#[derive(Debug, Serialize)]
pub struct AuditBenchResult {
    pub suite: &'static str,
    /// `seal`, `export jsonl`, `verify jsonl`, `verify --db`…
    pub operation: String,
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    /// Peak resident memory of the child process (MB); none for in-process steps.
    pub peak_rss_mb: Option<f64>,
    /// Size of the data file (bytes) for exports.
    pub file_bytes: Option<u64>,
}

fn print(result: &AuditBenchResult) {
    let rss = result.peak_rss_mb.map(|mb| format!("  peak RSS {mb:>6.1} MB")).unwrap_or_default();
    let size = result.file_bytes.map(|b| format!("  file {:>7.1} MB", b as f64 / 1e6)).unwrap_or_default();
    println!(
        "{:<16} {:>8} events in {:>6.2} s  {:>9.0} events/s{rss}{size}",
        result.operation, result.events, result.seconds, result.events_per_second
    );
}

/// Runs the suite over a log of `events` events for each of `formats`.
pub async fn run(database_url: &str, events: usize, formats: &[ExportFormat]) -> anyhow::Result<Vec<AuditBenchResult>> {
    let (scratch_url, pool) = crate::support::scratch_database(database_url).await?;
    println!("writing {events} events to the scratch database…");
    crate::support::fill_domain_log(&pool, 10_000, events).await?;
    sqlx::query("vacuum analyze events").execute(&pool).await?;
    let mut results = Vec::new();

    let started = Instant::now();
    let head = ledger::audit::seal_until_head(&pool).await?;
    let seconds = started.elapsed().as_secs_f64();
    results.push(AuditBenchResult {
        suite: "audit",
        operation: "seal".into(),
        events: head.event_count as u64,
        seconds,
        events_per_second: head.event_count as f64 / seconds,
        peak_rss_mb: None,
        file_bytes: None,
    });
    print(&results[results.len() - 1]);
    sqlx::query("vacuum analyze audit_chain").execute(&pool).await?;
    pool.close().await;

    let base = std::env::temp_dir().join(format!("ledger-bench-export-{}", uuid::Uuid::new_v4().simple()));
    let outcome = export_and_verify(&scratch_url, &base, head.event_count as u64, formats, &mut results).await;
    let _ = std::fs::remove_dir_all(&base);
    outcome?;

    let (seconds, peak) = run_child(&scratch_url, &["verify", "--db"]).await?;
    results.push(AuditBenchResult {
        suite: "audit",
        operation: "verify --db".into(),
        events: head.event_count as u64,
        seconds,
        events_per_second: head.event_count as f64 / seconds,
        peak_rss_mb: Some(peak),
        file_bytes: None,
    });
    print(&results[results.len() - 1]);
    for result in results.iter().filter(|r| r.operation.starts_with("export")) {
        if result.peak_rss_mb.is_some_and(|mb| mb >= EXPORT_RSS_MB_MAX) {
            println!("OVER THE LIMIT: {} peaked above {EXPORT_RSS_MB_MAX} MB", result.operation);
        }
    }
    Ok(results)
}

async fn export_and_verify(
    scratch_url: &str,
    base: &Path,
    events: u64,
    formats: &[ExportFormat],
    results: &mut Vec<AuditBenchResult>,
) -> anyhow::Result<()> {
    for format in formats {
        let dir = base.join(format.to_string());
        let dir_text = dir.to_string_lossy().into_owned();
        let format_text = format.to_string();
        let (seconds, peak) =
            run_child(scratch_url, &["export", "--no-seal", "--format", &format_text, "--out", &dir_text]).await?;
        let bytes = std::fs::metadata(dir.join(format.file_name())).map(|m| m.len()).ok();
        results.push(AuditBenchResult {
            suite: "audit",
            operation: format!("export {format}"),
            events,
            seconds,
            events_per_second: events as f64 / seconds,
            peak_rss_mb: Some(peak),
            file_bytes: bytes,
        });
        print(&results[results.len() - 1]);
        let (seconds, peak) = run_child(scratch_url, &["verify", &dir_text]).await?;
        results.push(AuditBenchResult {
            suite: "audit",
            operation: format!("verify {format}"),
            events,
            seconds,
            events_per_second: events as f64 / seconds,
            peak_rss_mb: Some(peak),
            file_bytes: None,
        });
        print(&results[results.len() - 1]);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Runs the `ledger` binary with `args` against `database_url`; returns `(seconds, peak RSS in MB)`.
async fn run_child(database_url: &str, args: &[&str]) -> anyhow::Result<(f64, f64)> {
    let exe: PathBuf = crate::support::ledger_binary()?;
    let started = Instant::now();
    let mut child = Command::new(&exe)
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    let status = loop {
        // Read before reaping: once reaped, the child's /proc entry is gone.
        if let Some(kb) = high_water_mark_kb(Path::new(&status_path)) {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(RSS_POLL_MS)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("`ledger {}` failed ({status})", args.join(" "));
    }
    Ok((seconds, peak_kb as f64 / 1024.0))
}

#[cfg(test)]
mod tests {
    use super::high_water_mark_kb;

    #[test]
    fn reads_our_own_high_water_mark() {
        let kb = high_water_mark_kb(std::path::Path::new("/proc/self/status")).expect("VmHWM on Linux");
        assert!(kb > 0);
    }
}
