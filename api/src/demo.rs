//! `ledger demo`: a scripted trading scenario run end to end against PostgreSQL.
//!
//! It opens a portfolio, deposits cash, publishes prices, places limit and market orders, plays the broker's
//! executions and a sell, lets the process manager reserve, accept and book everything, then prints the
//! portfolio. Each run uses new ids, so it can be repeated against the same database.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::Utc;
use ledger::commands::{CommandConfig, CommandContext, CommandService};
use ledger::domain::order::{PlaceOrder, RecordExecution};
use ledger::domain::values::{
    Amount, ClientOrderId, Currency, ExecId, Money, OrderId, Owner, PortfolioId, Price, Quantity, Symbol,
};
use ledger::domain::{
    CostBasisMethod, Order, OrderCommand, OrderStatus, OrderType, Portfolio, PortfolioCommand, Side, TimeInForce,
};
use ledger::market::{Tick, TickPublisher};
use ledger::process::{ProcessConfig, ProcessManager};
use ledger::relay::{relay_lag, Relay, RelayConfig, RelayStatus};
use rdkafka::mocking::MockCluster;
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;

/// How long the demo waits for the process manager, the relay or the read models at each step (the first run
/// against a database with a long history replays it into the read models).
const STEP_TIMEOUT_MS: u64 = 120_000;

fn d(value: &str) -> Decimal {
    value.parse().expect("literal decimal")
}

pub async fn run(
    database_url: &str,
    kafka_args: &crate::cli::KafkaArgs,
    projection_args: &crate::cli::ProjectionArgs,
) -> anyhow::Result<()> {
    let settings = projection_args.settings()?;
    let pool = crate::cli::connect_and_migrate(database_url).await?;
    println!("ledger demo — PostgreSQL at {}", crate::cli::redact(database_url));
    // An in-process Kafka (librdkafka's mock cluster) unless KAFKA_BROKERS names a real one.
    let (embedded, brokers) = match &kafka_args.brokers {
        Some(brokers) => {
            println!("Kafka: brokers {brokers} (KAFKA_BROKERS)");
            (None, brokers.clone())
        }
        None => {
            let cluster = MockCluster::new(1).context("starting the in-process Kafka mock cluster")?;
            // The mock cluster has no admin API: create the topics through it directly.
            for topic in [&kafka_args.events_topic, &kafka_args.prices_topic, &kafka_args.dead_letter_topic] {
                cluster.create_topic(topic, kafka_args.kafka_partitions, 1).context("creating a mock topic")?;
            }
            let brokers = cluster.bootstrap_servers();
            println!("Kafka: KAFKA_BROKERS not set — using an in-process mock cluster at {brokers}");
            (Some(cluster), brokers)
        }
    };
    let kafka = kafka_args.config(&brokers);
    let commands = Arc::new(CommandService::new(pool.clone(), CommandConfig::default()));
    let cancel = CancellationToken::new();
    let process = {
        let manager = ProcessManager::new(commands.clone(), ProcessConfig::default());
        let cancel = cancel.clone();
        tokio::spawn(async move { manager.run(cancel).await })
    };
    let relay_config = RelayConfig { create_topics: embedded.is_none(), ..RelayConfig::default() };
    let relay = Relay::new(pool.clone(), kafka.clone(), relay_config);
    let relay_status = relay.status();
    let relay_task = {
        let cancel = cancel.clone();
        tokio::spawn(async move { relay.run(cancel).await })
    };
    let workers = tokio::spawn(crate::run::workers(
        pool.clone(),
        kafka.clone(),
        ledger::projections::all(&settings),
        ledger::projections::worker::WorkerConfig { create_topics: embedded.is_none(), ..Default::default() },
        cancel.clone(),
    ));

    let ctx = CommandContext::new("demo");
    let now = Utc::now();
    let portfolio_id = PortfolioId::generate();
    let portfolio = portfolio_id.to_string();
    commands
        .execute_portfolio(
            &ctx,
            &portfolio,
            PortfolioCommand::OpenPortfolio {
                portfolio_id,
                owner: Owner::new("demo-trader")?,
                base_currency: Currency::new("USD")?,
                cost_basis_method: CostBasisMethod::Fifo,
                opened_at: now,
            },
        )
        .await?;
    let deposit = PortfolioCommand::DepositCash { amount: Amount::new(d("100000"))?, reference: None, at: now };
    commands.execute_portfolio(&ctx, &portfolio, deposit).await?;
    // Prices travel like any market data: published to the prices topic, projected into latest_prices.
    let publisher = TickPublisher::new(&kafka)?;
    let opening = |symbol: &str, price: &str| -> anyhow::Result<Tick> {
        Ok(Tick {
            version: ledger::market::TICK_VERSION,
            symbol: Symbol::new(symbol)?,
            price: Price::new(d(price))?,
            ts: Utc::now(),
            seq: 1,
            volume: None,
            source: "demo".into(),
        })
    };
    publisher.publish_all(&[opening("ACME", "101.25")?, opening("ZED", "48.10")?]).await?;
    wait_for_price(&pool, "ZED").await?;

    let acme_buy = place(&commands, &ctx, portfolio_id, "ACME", Side::Buy, "100", Some("101.50")).await?;
    let zed_buy = place(&commands, &ctx, portfolio_id, "ZED", Side::Buy, "200", None).await?;
    wait_for(&commands, acme_buy, OrderStatus::New).await?;
    wait_for(&commands, zed_buy, OrderStatus::New).await?;
    fill(&commands, &ctx, acme_buy, "a1", "60", "101.20", "1.00").await?;
    fill(&commands, &ctx, acme_buy, "a2", "40", "101.40", "1.00").await?;
    fill(&commands, &ctx, zed_buy, "z1", "200", "48.15", "2.00").await?;
    wait_for_position(&commands, &portfolio, "ACME", d("100")).await?;
    wait_for_position(&commands, &portfolio, "ZED", d("200")).await?;

    let acme_sell = place(&commands, &ctx, portfolio_id, "ACME", Side::Sell, "50", Some("103.00")).await?;
    wait_for(&commands, acme_sell, OrderStatus::New).await?;
    fill(&commands, &ctx, acme_sell, "s1", "50", "103.10", "1.00").await?;
    wait_for_position(&commands, &portfolio, "ACME", d("50")).await?;

    let closing = Tick { ts: Utc::now(), seq: 2, ..opening("ACME", "104.00")? };
    publisher.publish(&closing).await?;
    wait_for_relay(&pool, &relay_status).await?;
    wait_for_read_model(&pool, portfolio_id, d("50")).await?;
    cancel.cancel();
    process.await.context("process manager task")??;
    relay_task.await.context("relay task")??;
    workers.await.context("workers")??;
    print_portfolio(&commands, &portfolio, &[acme_buy, zed_buy, acme_sell]).await?;
    let stale_after = chrono::Duration::milliseconds(projection_args.valuation_stale_after_ms as i64);
    print_valuation(&pool, portfolio_id, stale_after).await?;
    println!();
    println!(
        "relay: {} events mirrored to {} this run (cursor {}:{})",
        relay_status.produced.load(std::sync::atomic::Ordering::Relaxed),
        kafka.events_topic,
        relay_status.cursor_transaction_id.load(std::sync::atomic::Ordering::Relaxed),
        relay_status.cursor_global_position.load(std::sync::atomic::Ordering::Relaxed),
    );
    Ok(())
}

/// Waits until the prices projection has seen `symbol`.
async fn wait_for_price(pool: &sqlx::PgPool, symbol: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(STEP_TIMEOUT_MS);
    while sqlx::query_scalar::<_, i64>("select count(*) from latest_prices where symbol = $1")
        .bind(symbol)
        .fetch_one(pool)
        .await?
        == 0
    {
        if tokio::time::Instant::now() > deadline {
            bail!("no price for {symbol} reached the read model within {STEP_TIMEOUT_MS} ms");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits until the positions read model shows the final ACME position and the closing price.
async fn wait_for_read_model(pool: &sqlx::PgPool, portfolio: PortfolioId, acme: Decimal) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(STEP_TIMEOUT_MS);
    loop {
        let ready: bool = sqlx::query_scalar(
            "select exists (select 1 from rm_positions where portfolio_id = $1 and symbol = 'ACME' and quantity = $2)
                and exists (select 1 from latest_prices where symbol = 'ACME' and price = 104)",
        )
        .bind(portfolio.0)
        .bind(acme)
        .fetch_one(pool)
        .await?;
        if ready {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the read models did not catch up within {STEP_TIMEOUT_MS} ms");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn print_valuation(
    pool: &sqlx::PgPool,
    portfolio: PortfolioId,
    stale_after: chrono::Duration,
) -> anyhow::Result<()> {
    let valuation = ledger::projections::valuation::portfolio_valuation(pool, portfolio.0, stale_after, Utc::now())
        .await?
        .context("portfolio missing from the read model")?;
    println!();
    println!("valuation (read models: positions × latest prices)");
    for position in &valuation.positions {
        let value = |v: Option<Decimal>| v.map(money).unwrap_or_else(|| "n/a".into());
        println!(
            "  {:<6} {:>6} @ {:>10}  market value {:>12}  unrealized P&L {:>10}{}",
            position.symbol,
            position.quantity,
            value(position.last_price),
            value(position.market_value),
            value(position.unrealized_pnl),
            position.missing_reason.as_deref().map(|r| format!("  ({r})")).unwrap_or_default()
        );
    }
    let total = valuation
        .total_equity
        .map(money)
        .unwrap_or_else(|| format!("n/a ({})", valuation.missing_reason.unwrap_or_default()));
    println!("  total equity {total}");
    Ok(())
}

/// Waits until the relay has mirrored the whole log.
async fn wait_for_relay(pool: &sqlx::PgPool, status: &RelayStatus) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(STEP_TIMEOUT_MS);
    loop {
        let lag = match status.cursor_name.get() {
            Some(cursor) => relay_lag(pool, cursor).await?,
            None => ledger::relay::RelayLag { events: i64::MAX, seconds: 0.0 },
        };
        if lag.events == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the relay is still {} events behind after {STEP_TIMEOUT_MS} ms", lag.events);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn place(
    commands: &CommandService,
    ctx: &CommandContext,
    portfolio_id: PortfolioId,
    symbol: &str,
    side: Side,
    quantity: &str,
    limit: Option<&str>,
) -> anyhow::Result<OrderId> {
    let order_id = OrderId::generate();
    let order_type = match limit {
        Some(limit) => OrderType::Limit { limit_price: Price::new(d(limit))? },
        None => OrderType::Market,
    };
    let command = OrderCommand::PlaceOrder(PlaceOrder {
        order_id,
        portfolio_id,
        client_order_id: ClientOrderId::new(format!("demo-{}", &order_id.to_string()[..8]))?,
        symbol: Symbol::new(symbol)?,
        side,
        order_type,
        quantity: Quantity::new(d(quantity))?,
        time_in_force: TimeInForce::Day,
        placed_at: Utc::now(),
    });
    commands.execute_order(ctx, &order_id.to_string(), command).await?;
    Ok(order_id)
}

async fn fill(
    commands: &CommandService,
    ctx: &CommandContext,
    order_id: OrderId,
    exec_id: &str,
    quantity: &str,
    price: &str,
    fee: &str,
) -> anyhow::Result<()> {
    let command = OrderCommand::RecordExecution(RecordExecution {
        exec_id: ExecId::new(exec_id)?,
        quantity: Quantity::new(d(quantity))?,
        price: Price::new(d(price))?,
        fee: Money::new(d(fee))?,
        executed_at: Utc::now(),
    });
    commands.execute_order(ctx, &order_id.to_string(), command).await?;
    Ok(())
}

async fn wait_for(commands: &CommandService, order_id: OrderId, status: OrderStatus) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(STEP_TIMEOUT_MS);
    loop {
        let (order, _) = commands.load::<Order>(&order_id.to_string()).await?;
        if order.status == status {
            return Ok(());
        }
        if order.status == OrderStatus::Rejected {
            bail!("order {order_id} was rejected: {:?}", order.reject_reason);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("order {order_id} is still {} after {STEP_TIMEOUT_MS} ms", order.status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_position(
    commands: &CommandService,
    portfolio: &str,
    symbol: &str,
    quantity: Decimal,
) -> anyhow::Result<()> {
    let symbol = Symbol::new(symbol)?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(STEP_TIMEOUT_MS);
    loop {
        let (state, _) = commands.load::<Portfolio>(portfolio).await?;
        if state.positions.get(&symbol).is_some_and(|p| p.quantity == quantity) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("position {symbol} did not reach {quantity} within {STEP_TIMEOUT_MS} ms");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two decimals, rounded half away from zero (Decimal's `{:.2}` alone truncates).
fn money(value: Decimal) -> String {
    format!("{:.2}", value.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero))
}

async fn print_portfolio(commands: &CommandService, portfolio: &str, orders: &[OrderId]) -> anyhow::Result<()> {
    let (state, sequence) = commands.load::<Portfolio>(portfolio).await?;
    println!();
    println!("portfolio {portfolio} (after {sequence} events)");
    println!("  cash          {:>14}", money(state.cash));
    println!("  reserved      {:>14}", money(state.reserved_cash));
    println!("  buying power  {:>14}", money(state.buying_power()));
    println!("  realized P&L  {:>14}", money(state.realized_pnl));
    println!();
    println!("  {:<6} {:>10} {:>14} {:>12} {:>14}", "symbol", "quantity", "cost basis", "avg cost", "realized P&L");
    for (symbol, position) in &state.positions {
        let average = if position.quantity.is_zero() { Decimal::ZERO } else { position.cost_basis / position.quantity };
        println!(
            "  {:<6} {:>10} {:>14} {:>12} {:>14}",
            symbol.as_str(),
            position.quantity,
            money(position.cost_basis),
            format!("{:.4}", average.round_dp(4)),
            money(position.realized_pnl)
        );
    }
    println!();
    for order_id in orders {
        let (order, _) = commands.load::<Order>(&order_id.to_string()).await?;
        let terms = order.terms.as_ref().context("order without terms")?;
        println!(
            "  order {order_id} {:?} {} {} {:<15} filled {} avg {}",
            terms.side,
            terms.quantity,
            terms.symbol,
            order.status.as_str(),
            order.cum_quantity,
            order.average_price().unwrap_or_default()
        );
    }
    Ok(())
}
