//! What the suites and the chaos test share: scratch databases and synthetic logs, portfolios to work on,
//! latency percentiles, waiting for the system to catch up with the log, and finding the `ledger` binary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use ledger::commands::{CommandContext, CommandService};
use ledger::domain::values::{Currency, Owner, PortfolioId};
use ledger::domain::{CostBasisMethod, PortfolioCommand};
use ledger::kafka::KafkaConfig;
use rust_decimal::Decimal;
use sqlx::PgPool;

/// The `ledger` binary the lab runs as child processes (servers, roles, exports): `LEDGER_BIN` when set, else
/// the `ledger` beside this binary (cargo builds both into the same directory: build them together, so that
/// the lab never runs an older `ledger`).
pub fn ledger_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("LEDGER_BIN").filter(|path| !path.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let lab = std::env::current_exe().context("locating ledger-lab")?;
    let beside = lab.with_file_name(format!("ledger{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        beside.exists(),
        "no ledger binary at {} — build it with the same profile as ledger-lab (`cargo build [--release] -p ledger-api -p ledger-lab`) or set LEDGER_BIN",
        beside.display()
    );
    Ok(beside)
}

/// How long a `ledger serve` the lab started may take to answer `/readyz` (and a subscription its
/// acknowledgement), and how often it is asked.
pub const READY_SECS: u64 = 60;
const READY_POLL_MS: u64 = 200;

/// Waits until every API at `bases` (`http://host:port`) answers `/readyz` with success.
pub async fn wait_ready(bases: &[String]) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(READY_SECS);
    for base in bases {
        while !client.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            if Instant::now() > deadline {
                bail!("{base} was not ready within {READY_SECS} s");
            }
            tokio::time::sleep(Duration::from_millis(READY_POLL_MS)).await;
        }
    }
    Ok(())
}

/// Connects to `url` (creating and migrating the database) with the default pool size.
pub async fn connect_and_migrate(url: &str) -> anyhow::Result<PgPool> {
    ledger::db::connect_and_migrate(url, ledger::db::POOL_CONNECTIONS_MAX).await
}

/// Opens `count` portfolios owned by `bench` (FIFO, USD) through `commands`; their ids.
pub async fn open_portfolios(commands: &CommandService, count: usize) -> anyhow::Result<Vec<PortfolioId>> {
    let mut portfolios = Vec::with_capacity(count);
    for _ in 0..count {
        let id = PortfolioId::generate();
        let open = PortfolioCommand::OpenPortfolio {
            portfolio_id: id,
            owner: Owner::new("bench")?,
            base_currency: Currency::new("USD")?,
            cost_basis_method: CostBasisMethod::Fifo,
            opened_at: Utc::now(),
        };
        commands.execute_portfolio(&CommandContext::new("bench"), id, open).await?;
        portfolios.push(id);
    }
    Ok(portfolios)
}

/// Waits for every client task; their latencies, sorted.
pub async fn gather_latencies(
    handles: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<Duration>>>>,
) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.await??);
    }
    latencies.sort();
    Ok(latencies)
}

pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1_000.0
}

/// A scratch database next to the configured one (`<name>_bench`), dropped and created afresh.
pub async fn scratch_database(database_url: &str) -> anyhow::Result<(String, sqlx::PgPool)> {
    let (server, name) = database_url.rsplit_once('/').context("DATABASE_URL has no database name")?;
    let name = name.split('?').next().unwrap_or(name);
    let scratch = format!("{server}/{name}_bench");
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&format!("{server}/postgres")).await?;
    sqlx::query(&format!("drop database if exists \"{name}_bench\" with (force)")).execute(&mut admin).await?;
    sqlx::query(&format!("create database \"{name}_bench\"")).execute(&mut admin).await?;
    let pool = ledger::db::connect(&scratch, 8).await?;
    ledger::db::migrate(&pool).await?;
    Ok((scratch, pool))
}

/// Writes a synthetic but valid history straight into the log: `portfolios` portfolios, each opened, funded,
/// then buying in turns (FundsReserved, ExecutionApplied) until `events` events exist. Inserted with multi-row
/// statements, so a million events take seconds.
pub async fn fill_domain_log(pool: &sqlx::PgPool, portfolios: usize, events: usize) -> anyhow::Result<()> {
    use ledger::domain::portfolio::Lot;
    use ledger::domain::values::{
        Amount, Currency, ExecId, Money, OrderId, Owner, PortfolioId, Price, Quantity, Symbol,
    };
    use ledger::domain::{CostBasisMethod, PortfolioEvent, Side};

    const CHUNK: usize = 10_000;
    let now = chrono::Utc::now();
    let ids: Vec<PortfolioId> = (0..portfolios).map(|_| PortfolioId::generate()).collect();
    let mut sequence = vec![0i64; portfolios];
    let mut cash = vec![Decimal::ZERO; portfolios];
    let mut held = vec![Decimal::ZERO; portfolios];
    let mut cost = vec![Decimal::ZERO; portfolios];
    let symbol = Symbol::new("ACME")?;
    let mut rows: Vec<(String, i64, String, serde_json::Value)> = Vec::with_capacity(CHUNK);
    let mut written = 0;
    let mut n = 0usize;
    while written + rows.len() < events {
        let p = n % portfolios;
        let id = ids[p];
        let event = match sequence[p] {
            0 => PortfolioEvent::PortfolioOpened {
                portfolio_id: id,
                owner: Owner::new(format!("bench-{p}"))?,
                base_currency: Currency::new("USD")?,
                cost_basis_method: CostBasisMethod::Fifo,
                opened_at: now,
            },
            1 => {
                cash[p] = Decimal::from(1_000_000_000);
                PortfolioEvent::CashDeposited {
                    amount: Amount::new(cash[p])?,
                    reference: None,
                    cash_after: cash[p],
                    at: now,
                }
            }
            s if s % 2 == 0 => {
                let order_id = OrderId(uuid::Uuid::from_u128(((p as u128) << 64) | s as u128));
                PortfolioEvent::FundsReserved {
                    order_id,
                    symbol: symbol.clone(),
                    quantity: Quantity::new(Decimal::ONE)?,
                    price: Price::new(Decimal::from(100))?,
                    amount: Money::new(Decimal::from(101))?,
                    reserved_cash_after: Decimal::from(101),
                    at: now,
                }
            }
            s => {
                let order_id = OrderId(uuid::Uuid::from_u128(((p as u128) << 64) | (s - 1) as u128));
                let lot_cost = Decimal::from(100);
                cash[p] -= lot_cost;
                held[p] += Decimal::ONE;
                cost[p] += lot_cost;
                PortfolioEvent::ExecutionApplied {
                    order_id,
                    exec_id: ExecId::new("1")?,
                    symbol: symbol.clone(),
                    side: Side::Buy,
                    quantity: Quantity::new(Decimal::ONE)?,
                    price: Price::new(Decimal::from(100))?,
                    fee: Money::ZERO,
                    gross: lot_cost,
                    cash_delta: -lot_cost,
                    cash_after: cash[p],
                    reserved_cash_released: Decimal::from(101),
                    reserved_quantity_released: Decimal::ZERO,
                    lot_opened: Some(Lot {
                        lot_id: format!("{order_id}/1"),
                        quantity: Decimal::ONE,
                        cost: lot_cost,
                        acquired_at: now,
                    }),
                    lots_consumed: Vec::new(),
                    cost_basis_removed: Decimal::ZERO,
                    realized_pnl: Decimal::ZERO,
                    position_quantity_after: held[p],
                    position_cost_basis_after: cost[p],
                    executed_at: now,
                }
            }
        };
        sequence[p] += 1;
        rows.push((id.to_string(), sequence[p], event.name().to_string(), serde_json::to_value(&event)?));
        n += 1;
        if rows.len() == CHUNK {
            written += insert_rows(pool, &mut rows).await?;
        }
    }
    insert_rows(pool, &mut rows).await?;
    Ok(())
}

async fn insert_rows(
    pool: &sqlx::PgPool,
    rows: &mut Vec<(String, i64, String, serde_json::Value)>,
) -> anyhow::Result<usize> {
    let count = rows.len();
    let (ids, sequences, types, payloads): (Vec<_>, Vec<_>, Vec<_>, Vec<_>) =
        rows.drain(..).fold((vec![], vec![], vec![], vec![]), |mut acc, (a, b, c, d)| {
            acc.0.push(a);
            acc.1.push(b);
            acc.2.push(c);
            acc.3.push(d);
            acc
        });
    sqlx::query(
        "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         select 'Portfolio', u.id, u.seq, u.kind, $5, u.payload, '{\"actor\": \"bench\"}'
           from unnest($1::text[], $2::bigint[], $3::text[], $4::jsonb[]) as u(id, seq, kind, payload)",
    )
    .bind(&ids)
    .bind(&sequences)
    .bind(&types)
    .bind(&payloads)
    .bind(ledger::domain::portfolio::PORTFOLIO_EVENT_VERSION)
    .execute(pool)
    .await?;
    Ok(count)
}

/// `VmHWM` of a process (KiB), from its `/proc/<pid>/status`.
pub fn high_water_mark_kb(status: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(status).ok()?;
    let line = text.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Waits until the relay, the process manager and the event-driven projections have reached the log's head.
pub async fn settle(pool: &PgPool, kafka: &KafkaConfig, timeout: Duration) -> anyhow::Result<()> {
    let cursor = ledger::relay::cursor_name(kafka).await?;
    let deadline = Instant::now() + timeout;
    loop {
        match settled(pool, &cursor).await {
            Ok((0, 0, 0)) => return Ok(()),
            Ok((relay, process, behind)) if Instant::now() > deadline => bail!(
                "after {} s: relay {relay} events behind, process manager {process}, projections {behind} aggregates",
                timeout.as_secs()
            ),
            Err(error) if Instant::now() > deadline => return Err(error),
            // Behind, or the database busy: look again.
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Events the relay and the process manager have yet to pass, and aggregates the projections have yet to apply.
async fn settled(pool: &PgPool, cursor: &str) -> anyhow::Result<(i64, i64, i64)> {
    let relay = ledger::relay::relay_lag(pool, cursor).await?.events;
    let process: i64 = sqlx::query_scalar(
        "select count(*) from events e where (e.transaction_id, e.global_position) >
           coalesce((select (transaction_id, global_position) from log_cursors where name = 'process-manager'),
                    ('0'::xid8, 0::bigint))",
    )
    .fetch_one(pool)
    .await?;
    let mut behind = 0i64;
    for (table, types) in
        [("orders_progress", "{Order}"), ("positions_progress", "{Portfolio}"), ("alerts_progress", "{Portfolio}")]
    {
        behind += sqlx::query_scalar::<_, i64>(&format!(
            "select count(*) from (select aggregate_id, max(sequence) s from events
               where aggregate_type = any($1::text[]) group by aggregate_id) e
             left join {table} p using (aggregate_id) where p.last_sequence is distinct from e.s"
        ))
        .bind(types)
        .fetch_one(pool)
        .await?;
    }
    Ok((relay, process, behind))
}

#[cfg(test)]
mod tests {
    use super::percentile;
    use std::time::Duration;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let values: Vec<_> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 0.5), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
