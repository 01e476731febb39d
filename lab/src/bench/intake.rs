//! `ledger-lab bench intake`: the batched path. C clients send `cashBatch` mutations of B deposits each over HTTP to
//! an API server started in this process (each client on its own set of portfolios, as partitioned intake
//! would be); every batch commits in one transaction. Reports events/s committed and the latency of a batch,
//! with pgbench's single-row insert at the same concurrency for reference.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use ledger::domain::values::PortfolioId;
use ledger_api::app::{start, AppConfig};
use ledger_api::auth::{Role, TokenKeys};
use serde::Serialize;
use serde_json::json;

use crate::pgbench::Pgbench;
use crate::support::percentile;

#[derive(Debug, Serialize)]
pub struct IntakeResult {
    pub suite: &'static str,
    pub clients: usize,
    pub batch_size: usize,
    pub seconds: f64,
    pub batches: usize,
    pub events: usize,
    pub events_per_second: f64,
    /// Latency of one batch (request to answer).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub pgbench: Option<Pgbench>,
    /// events/s ÷ pgbench's single-row inserts/s at the same concurrency.
    pub ratio: Option<f64>,
}

pub fn print(result: &IntakeResult) {
    let reference = match (result.pgbench, result.ratio) {
        (Some(p), Some(ratio)) => format!("  pgbench {:>7.0} tps  ours/pgbench {ratio:.2}", p.tps),
        _ => "  pgbench n/a".into(),
    };
    println!(
        "intake  clients {:>2}  batch {:>5}  {:>8} events in {:>5.1} s  {:>8.0} events/s  batch p50 {:>7.1} ms  p99 {:>7.1} ms{reference}",
        result.clients, result.batch_size, result.events, result.seconds, result.events_per_second, result.p50_ms,
        result.p99_ms
    );
}

/// Portfolios per client: each batch spreads its deposits over them.
const PORTFOLIOS_PER_CLIENT: usize = 200;

/// One run: `clients` clients, each sending batches of `batch_size` deposits for `duration`.
pub async fn intake(
    database_url: &str,
    clients: usize,
    batch_size: usize,
    duration: Duration,
    pgbench: Option<Pgbench>,
) -> anyhow::Result<IntakeResult> {
    anyhow::ensure!((1..=64).contains(&clients), "clients must be 1 to 64");
    anyhow::ensure!(
        (1..=ledger::commands::BATCH_COMMANDS_MAX).contains(&batch_size),
        "batch size must be 1 to {}",
        ledger::commands::BATCH_COMMANDS_MAX
    );
    let pool = crate::support::connect_and_migrate(database_url).await?;
    pool.close().await;
    let pool = ledger::db::connect(database_url, (clients as u32 + 8).min(64)).await?;
    let keys = TokenKeys::new("bench-secret-of-at-least-thirty-two-bytes").map_err(|e| anyhow::anyhow!(e))?;
    let mut config = AppConfig::new(keys.clone(), None);
    config.rate_limit_per_second = 1_000_000;
    config.rate_limit_burst = 1_000_000;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = start(pool.clone(), config, listener).await?;
    let url = format!("http://{}/graphql", running.address);
    let token = keys.issue("bench", Role::Trader, chrono::Duration::hours(1), Utc::now());
    let mut owned: Vec<Vec<PortfolioId>> = Vec::with_capacity(clients);
    for _ in 0..clients {
        owned.push(crate::support::open_portfolios(&running.commands, PORTFOLIOS_PER_CLIENT).await?);
    }
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).build()?;
    let started = Instant::now();
    let deadline = started + duration;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let query = "mutation($m: [CashMovementInput!]!) { cashBatch(movements: $m) { error { code message } } }";
    let handles: Vec<_> = owned
        .into_iter()
        .enumerate()
        .map(|(c, portfolios)| {
            let (http, url, token, run) = (http.clone(), url.clone(), token.clone(), run.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0usize;
                while Instant::now() < deadline {
                    let movements: Vec<_> = (0..batch_size)
                        .map(|i| {
                            json!({
                                "portfolioId": portfolios[(n + i) % portfolios.len()].to_string(),
                                "kind": "DEPOSIT",
                                "amount": "1",
                                "idempotencyKey": format!("{run}-{c}-{}", n + i),
                            })
                        })
                        .collect();
                    let body = json!({ "query": query, "variables": { "m": movements } });
                    let begin = Instant::now();
                    let response: serde_json::Value =
                        http.post(&url).bearer_auth(&token).json(&body).send().await?.json().await?;
                    if response.get("errors").is_some() {
                        bail!("the API refused a batch: {response}");
                    }
                    let answers = response["data"]["cashBatch"].as_array().context("no cashBatch answer")?;
                    if answers.len() != batch_size {
                        bail!("{} answers for {batch_size} movements", answers.len());
                    }
                    if let Some(refused) = answers.iter().find(|a| !a["error"].is_null()) {
                        bail!("a deposit was refused: {refused}");
                    }
                    latencies.push(begin.elapsed());
                    n += batch_size;
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let latencies = crate::support::gather_latencies(handles).await?;
    let elapsed = started.elapsed().as_secs_f64();
    running.stop().await?;
    pool.close().await;
    let events = latencies.len() * batch_size;
    let events_per_second = events as f64 / elapsed;
    Ok(IntakeResult {
        suite: "intake",
        clients,
        batch_size,
        seconds: elapsed,
        batches: latencies.len(),
        events,
        events_per_second,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        pgbench,
        ratio: pgbench.map(|p| events_per_second / p.tps),
    })
}
