//! `bench process`: how fast the process manager works through a backlog — the steps behind every order
//! (reserve, then accept) and every fill (book it on the portfolio), which bound what the deployed system
//! sustains: past that rate, orders wait in `PENDING_NEW` and fills go unbooked for longer and longer.
//!
//! A scratch database (`<name>_bench`) gets `portfolios` funded portfolios and `orders` limit buys spread over
//! them, placed while no process manager runs; then one is started from the log's start and timed until its
//! cursor passes the last placement. With it stopped again, every order is filled in `fills` executions, and a
//! new process manager is timed until it has booked them all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use futures::StreamExt;
use ledger::commands::{CommandConfig, CommandContext, CommandService};
use ledger::domain::order::{PlaceOrder, RecordExecution};
use ledger::domain::values::{Amount, ClientOrderId, ExecId, Money, OrderId, Price, Quantity, Symbol};
use ledger::domain::{OrderCommand, OrderType, PortfolioCommand, Side, TimeInForce};
use ledger::log::{load_cursor, newest_position, LogPosition, Newest};
use ledger::process::{ProcessConfig, ProcessManager, PROCESS_MANAGER};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::support::{open_portfolios, scratch_database};

/// Commands the set-up sends at once (placements, fills): enough for the group commit to fill its groups.
const SETUP_CONCURRENCY: usize = 32;
/// How often the timer looks at the process manager's cursor.
const CURSOR_POLL: Duration = Duration::from_millis(5);
/// Connections of the process manager's pool (as `ledger roles` gives a role by default).
const POOL_CONNECTIONS: u32 = 16;

#[derive(Debug, Serialize)]
pub struct ProcessResult {
    pub portfolios: usize,
    pub orders: usize,
    pub fills: usize,
    /// Orders reserved and accepted per second.
    pub placements_per_second: f64,
    /// Fills booked per second.
    pub fills_per_second: f64,
}

pub fn print(result: &ProcessResult) {
    println!(
        "process  {} orders on {} portfolios: {:>7.0} orders reserved and accepted/s, {} fills {:>7.0} fills booked/s",
        result.orders, result.portfolios, result.placements_per_second, result.fills, result.fills_per_second
    );
}

pub async fn run(
    database_url: &str,
    portfolios: usize,
    orders: usize,
    fills_per_order: usize,
) -> anyhow::Result<ProcessResult> {
    anyhow::ensure!(portfolios > 0 && orders > 0 && fills_per_order > 0, "portfolios, orders and fills must be > 0");
    let (scratch, setup_pool) = scratch_database(database_url).await?;
    setup_pool.close().await;
    let pool = ledger::db::connect(&scratch, POOL_CONNECTIONS).await?;
    let commands = Arc::new(CommandService::new(pool.clone(), CommandConfig::default()));
    let holders = open_portfolios(&commands, portfolios).await?;
    // Each portfolio can pay for all its orders: 1 unit at 10 (plus the fee allowance) each.
    let per_portfolio = orders.div_ceil(portfolios);
    let funds = Amount::new(Decimal::from(per_portfolio as u64 * 20 + 100))?;
    for &holder in &holders {
        let deposit = PortfolioCommand::DepositCash { amount: funds, reference: None, at: Utc::now() };
        commands.execute_portfolio(&CommandContext::new("bench"), holder, deposit).await?;
    }

    let placed: Vec<OrderId> = concurrently((0..orders).map(|n| {
        let commands = commands.clone();
        let portfolio_id = holders[n % portfolios];
        async move {
            let order_id = OrderId::generate();
            let place = OrderCommand::PlaceOrder(PlaceOrder {
                order_id,
                portfolio_id,
                client_order_id: ClientOrderId::new(format!("bench-{n}"))?,
                symbol: Symbol::new("BENCH")?,
                side: Side::Buy,
                order_type: OrderType::Limit { limit_price: Price::new(Decimal::TEN)? },
                quantity: Quantity::new(Decimal::ONE)?,
                time_in_force: TimeInForce::Gtc,
                placed_at: Utc::now(),
            });
            commands.execute_order(&CommandContext::new("bench"), order_id, place).await?;
            Ok(order_id)
        }
    }))
    .await?;
    let placements = time_process_manager(&commands).await?;
    expect_events(commands.pool(), "OrderAccepted", orders).await?;

    let step = Decimal::ONE / Decimal::from(fills_per_order as u64);
    concurrently(
        placed.iter().flat_map(|&order_id| (0..fills_per_order).map(move |f| (order_id, f)).collect::<Vec<_>>()).map(
            |(order_id, f)| {
                let commands = commands.clone();
                async move {
                    // The last fill takes what the others left, so the order ends filled whatever the split.
                    let quantity = if f + 1 == fills_per_order {
                        Decimal::ONE - step.round_dp(6) * Decimal::from(f as u64)
                    } else {
                        step.round_dp(6)
                    };
                    let fill = OrderCommand::RecordExecution(RecordExecution {
                        exec_id: ExecId::new(format!("{order_id}-{f}"))?,
                        quantity: Quantity::new(quantity)?,
                        price: Price::new(Decimal::TEN)?,
                        fee: Money::new(Decimal::ZERO)?,
                        executed_at: Utc::now(),
                    });
                    commands.execute_order(&CommandContext::new("bench"), order_id, fill).await?;
                    Ok(())
                }
            },
        ),
    )
    .await?;
    let booking = time_process_manager(&commands).await?;
    expect_events(commands.pool(), "ExecutionApplied", orders * fills_per_order).await?;

    commands.pool().close().await;
    Ok(ProcessResult {
        portfolios,
        orders,
        fills: orders * fills_per_order,
        placements_per_second: orders as f64 / placements.as_secs_f64(),
        fills_per_second: (orders * fills_per_order) as f64 / booking.as_secs_f64(),
    })
}

/// Runs `SETUP_CONCURRENCY` of `jobs` at a time; their results in any order, or the first error.
async fn concurrently<T, F>(jobs: impl Iterator<Item = F>) -> anyhow::Result<Vec<T>>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    futures::stream::iter(jobs).buffer_unordered(SETUP_CONCURRENCY).collect::<Vec<_>>().await.into_iter().collect()
}

/// Starts a process manager (default configuration) at its stored cursor and times it until its cursor passes
/// the newest event committed before it started; then stops it.
async fn time_process_manager(commands: &Arc<CommandService>) -> anyhow::Result<Duration> {
    let pool: &PgPool = commands.pool();
    let target = newest_position(pool, Newest::Committed).await?;
    let manager = ProcessManager::new(commands.clone(), ProcessConfig::default());
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { manager.run(cancel).await }
    });
    loop {
        let cursor: LogPosition = load_cursor(pool, PROCESS_MANAGER).await?;
        if cursor >= target {
            break;
        }
        anyhow::ensure!(!task.is_finished(), "the process manager stopped before reaching {target}");
        tokio::time::sleep(CURSOR_POLL).await;
    }
    let elapsed = started.elapsed();
    cancel.cancel();
    task.await.context("process manager task")??;
    Ok(elapsed)
}

/// Fails unless the log holds exactly `count` events of `event_type`: the process manager did every step.
async fn expect_events(pool: &PgPool, event_type: &str, count: usize) -> anyhow::Result<()> {
    let found: i64 = sqlx::query_scalar("select count(*) from events where event_type = $1")
        .bind(event_type)
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(found == count as i64, "{found} {event_type} events where {count} were expected");
    Ok(())
}
