//! The reference every suite reports against: `pgbench` running a one-row insert per transaction on the same
//! PostgreSQL in the same run, so that a figure compares across machines as a ratio; and the helpers that put
//! a suite's figure beside it.

use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

/// `pgbench` with a one-row insert into a scratch table, `clients` connections, for `duration`; its tps.
pub async fn pgbench_insert(database_url: &str, clients: usize, duration: Duration) -> anyhow::Result<f64> {
    Ok(pgbench(database_url, clients, duration, None).await?.tps)
}

/// What `pgbench` measured: the reference every suite divides by, so that figures compare across machines.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Pgbench {
    pub clients: usize,
    /// Transactions (single-row inserts) per second.
    pub tps: f64,
    /// Average latency of one insert, in milliseconds.
    pub latency_ms: f64,
    /// The rate pgbench was held to (`-R`), if any.
    pub rate: Option<u64>,
}

/// `pgbench` with a one-row insert into a scratch table, `clients` connections, for `duration`, at most
/// `rate` transactions per second when given.
pub async fn pgbench(
    database_url: &str,
    clients: usize,
    duration: Duration,
    rate: Option<u64>,
) -> anyhow::Result<Pgbench> {
    let pool = crate::support::connect_and_migrate(database_url).await?;
    sqlx::query(
        "create table if not exists bench_pgbench (id bigint generated always as identity primary key, payload jsonb)",
    )
    .execute(&pool)
    .await?;
    pool.close().await;
    let dir = std::env::temp_dir().join(format!("ledger-pgbench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("insert.sql");
    std::fs::write(&script, "insert into bench_pgbench (payload) values ('{\"a\": 1}');\n")?;
    let mut command = tokio::process::Command::new("pgbench");
    command.args(["-n", "-c", &clients.to_string(), "-j", "2", "-T", &duration.as_secs().max(1).to_string()]);
    if let Some(rate) = rate {
        command.args(["-R", &rate.to_string()]);
    }
    let output = command
        .arg("-f")
        .arg(&script)
        .arg(database_url)
        .output()
        .await
        .context("running pgbench (Debian package postgresql-contrib or postgresql-client)")?;
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let number = |prefix: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(prefix).and_then(|rest| rest.split_whitespace().next()?.parse().ok()))
    };
    Ok(Pgbench {
        clients,
        tps: number("tps = ").with_context(|| format!("no tps in pgbench's output: {text}"))?,
        latency_ms: number("latency average = ").with_context(|| format!("no latency in pgbench's output: {text}"))?,
        rate,
    })
}

/// The reference for a suite, or `None` (with the reason on stderr) where pgbench cannot run.
pub async fn reference(database_url: &str, clients: usize, seconds: u64, rate: Option<u64>) -> Option<Pgbench> {
    match pgbench(database_url, clients, Duration::from_secs(seconds.max(1)), rate).await {
        Ok(result) => {
            println!(
                "pgbench single-row insert, {} client(s){}: {:.0} tps, latency {:.2} ms",
                result.clients,
                rate.map(|r| format!(" at {r}/s")).unwrap_or_default(),
                result.tps,
                result.latency_ms
            );
            Some(result)
        }
        Err(error) => {
            eprintln!("pgbench reference skipped: {error:#}");
            None
        }
    }
}

/// `  ours/pgbench 0.42` for a throughput (higher is better), or nothing without a reference.
pub fn throughput_ratio(pgbench: Option<Pgbench>, ours: f64) -> String {
    pgbench.map(|p| format!("  ours/pgbench {:.2} (throughput)", ours / p.tps)).unwrap_or_default()
}

/// `  ours/pgbench 12.3` for a latency against pgbench's average insert latency (lower is better).
pub fn latency_ratio(pgbench: Option<Pgbench>, ours_ms: f64) -> String {
    pgbench.map(|p| format!("  ours/pgbench {:.1} (latency)", ours_ms / p.latency_ms)).unwrap_or_default()
}

/// A suite's JSON with the pgbench reference and the ratio added (both null without pgbench).
pub fn with_reference(
    mut value: serde_json::Value,
    pgbench: Option<Pgbench>,
    ratio: impl Fn(&Pgbench) -> f64,
) -> serde_json::Value {
    if let Some(object) = value.as_object_mut() {
        object.insert("pgbench".into(), serde_json::to_value(pgbench).unwrap_or_default());
        object.insert("ratio".into(), pgbench.as_ref().map(ratio).into());
    }
    value
}

/// Runs one measurement `runs` times (at least once), printing each result as it comes.
pub async fn repeat<T, Fut>(runs: usize, mut run: impl FnMut() -> Fut, print: impl Fn(&T)) -> anyhow::Result<Vec<T>>
where
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut results = Vec::new();
    for _ in 0..runs.max(1) {
        let result = run().await?;
        print(&result);
        results.push(result);
    }
    Ok(results)
}

/// The median run by `key` (of a non-empty list of runs).
pub fn median_by<T>(mut results: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    results.sort_by(|a, b| key(a).total_cmp(&key(b)));
    results.swap_remove(results.len() / 2)
}

/// Writes `value` as pretty JSON to `path`, when one is given.
pub fn write_json(path: Option<std::path::PathBuf>, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(&path, serde_json::to_vec_pretty(value)?)?;
    }
    Ok(())
}
