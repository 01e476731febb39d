//! The paper executor against a real PostgreSQL and the test broker: ticks published to Kafka fill accepted
//! orders through `RecordExecution`, the process manager books them on the portfolio, IOC remainders are
//! cancelled, stop orders are triggered by the tick that reaches them, and a restarted executor neither refills
//! nor reuses an execution id.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ledger::commands::CommandService;
use ledger::domain::values::{OrderId, PortfolioId, Price};
use ledger::domain::{CostBasisMethod, Order, OrderCommand, OrderStatus, OrderType, Portfolio, Side, TimeInForce};
use ledger::execution::{spawn_tick_consumer, PaperConfig, PaperExecutor, PaperStatus};
use ledger::log::{replay_as_of, AsOf, LogPosition};
use ledger::market::{Tick, TickPublisher, TICK_VERSION};
use tokio::sync::mpsc;

use crate::support::kafka::{brokers, fresh_config};
use crate::support::system::{start_process_manager, Running};
use crate::support::*;

fn start_executor(commands: Arc<CommandService>, kafka: &ledger::kafka::KafkaConfig) -> (Running, Arc<PaperStatus>) {
    let executor = PaperExecutor::new(commands, PaperConfig::default()).unwrap();
    let status = executor.status();
    let kafka = kafka.clone();
    let running = Running::spawn(|cancel| async move {
        let (sender, ticks) = mpsc::channel(1024);
        let consumer = spawn_tick_consumer(&kafka, sender, cancel.clone()).unwrap();
        let _ = executor.run(ticks, cancel).await;
        let _ = consumer.await;
    });
    (running, status)
}

/// A database with the process manager running, a fresh prices topic and a portfolio holding 100,000.
struct PaperMarket {
    db: TestDb,
    commands: Arc<CommandService>,
    kafka: ledger::kafka::KafkaConfig,
    publisher: TickPublisher,
    pm: Running,
    portfolio: PortfolioId,
}

async fn paper_market() -> PaperMarket {
    let db = TestDb::new().await;
    let commands = db.commands();
    let kafka = fresh_config(&brokers());
    kafka.ensure_topics().await.unwrap();
    let publisher = TickPublisher::new(&kafka).unwrap();
    let pm = start_process_manager(commands.clone());
    let portfolio = open_portfolio(&commands, "100000", CostBasisMethod::Fifo).await;
    PaperMarket { db, commands, kafka, publisher, pm, portfolio }
}

fn tick(symbol: &str, price: &str, seq: i64, volume: Option<&str>) -> Tick {
    Tick {
        version: TICK_VERSION,
        symbol: sym(symbol),
        price: ledger::domain::values::Price::new(dec(price)).unwrap(),
        ts: chrono::Utc::now(),
        seq,
        volume: volume.map(dec),
        source: "test".into(),
    }
}

async fn place_order(
    commands: &CommandService,
    portfolio: PortfolioId,
    side: Side,
    quantity: &str,
    limit: &str,
    tif: TimeInForce,
) -> OrderId {
    let (id, mut command) = place(portfolio, "ACME", side, quantity, Some(limit));
    if let OrderCommand::PlaceOrder(order) = &mut command {
        order.time_in_force = tif;
    }
    commands.execute_order(&ctx(), id, command).await.unwrap();
    id
}

async fn status_of(commands: &CommandService, id: OrderId) -> OrderStatus {
    commands.load::<Order>(&id.to_string()).await.unwrap().0.status
}

/// Publishes `tick` until `done` holds: the executor's consumer starts from the latest offset, so a tick sent
/// before its assignment completes would be missed.
async fn publish_until<F, Fut>(publisher: &TickPublisher, mut tick: Tick, done: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + CONDITION_WAIT_MAX;
    while tokio::time::Instant::now() < deadline {
        publisher.publish(&tick).await.unwrap();
        if eventually_within(Duration::from_millis(500), &done).await {
            return true;
        }
        tick.seq += 1;
        tick.ts = chrono::Utc::now();
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ticks_from_kafka_fill_limit_orders_and_ioc_remainders_are_cancelled() {
    let PaperMarket { db, commands, kafka, publisher, pm, portfolio } = paper_market().await;
    let (executor, status) = start_executor(commands.clone(), &kafka);

    // A limit buy below the market waits; a tick at its limit fills it in full at the limit.
    let patient = place_order(&commands, portfolio, Side::Buy, "10", "99", TimeInForce::Gtc).await;
    assert!(eventually(|| async { status_of(&commands, patient).await == OrderStatus::New }).await);
    // The executor has handled a tick above the limit (republished until its consumer, which starts at the
    // latest offset, sees one) and filled nothing.
    let seen = status.ticks.load(Ordering::Relaxed);
    let above = publish_until(&publisher, tick("ACME", "100", 1, None), || async {
        status.ticks.load(Ordering::Relaxed) > seen
    })
    .await;
    assert!(above, "the executor should see the tick above the limit");
    assert_eq!(status_of(&commands, patient).await, OrderStatus::New, "100 is above the limit: no fill");
    let filled = publish_until(&publisher, tick("ACME", "98.5", 10, None), || async {
        status_of(&commands, patient).await == OrderStatus::Filled
    })
    .await;
    assert!(filled, "the crossing tick should fill the order");
    let (order, _) = commands.load::<Order>(&patient.to_string()).await.unwrap();
    // 98.5 × 1.0005 = 98.55 (≤ the limit 99), fee 10 × 98.55 × 0.0005 = 0.49.
    assert_eq!(order.average_price(), Some(dec("98.55")));

    // IOC against a last price offering 4 units for 10: 4 fill at acceptance, 6 are cancelled.
    let seen = status.ticks.load(Ordering::Relaxed);
    let thin = publish_until(&publisher, tick("ACME", "99", 100, Some("4")), || async {
        status.ticks.load(Ordering::Relaxed) > seen
    })
    .await;
    assert!(thin, "the executor should see the thin tick");
    let ioc = place_order(&commands, portfolio, Side::Buy, "10", "100", TimeInForce::Ioc).await;
    let done = eventually(|| async { status_of(&commands, ioc).await == OrderStatus::Canceled }).await;
    assert!(done, "the IOC order should end cancelled");
    let (order, _) = commands.load::<Order>(&ioc.to_string()).await.unwrap();
    assert_eq!(order.cum_quantity, dec("4"));

    // The process manager booked both fills on the portfolio: 14 units, nothing left reserved.
    let booked = eventually(|| async {
        let (state, _) = commands.load::<Portfolio>(&portfolio.to_string()).await.unwrap();
        state.positions.get(&sym("ACME")).is_some_and(|p| p.quantity == dec("14")) && state.reserved_cash.is_zero()
    })
    .await;
    assert!(booked, "the portfolio should hold 14 ACME with nothing reserved");
    assert_eq!(status.fills.load(Ordering::Relaxed), 2);

    // A restarted executor rebuilds its book from the log: a new crossing tick fills nothing twice.
    executor.stop().await;
    let (executor, status) = start_executor(commands.clone(), &kafka);
    assert!(eventually(|| async { status.caught_up.load(Ordering::Relaxed) }).await);
    let sell = place_order(&commands, portfolio, Side::Sell, "3", "90", TimeInForce::Gtc).await;
    let sold = publish_until(&publisher, tick("ACME", "95", 1000, None), || async {
        status_of(&commands, sell).await == OrderStatus::Filled
    })
    .await;
    assert!(sold, "the restarted executor should fill a new order");
    assert_eq!(status.fills.load(Ordering::Relaxed), 1, "only the new order was filled");
    let executions: i64 = sqlx::query_scalar("select count(*) from events where event_type = 'ExecutionRecorded'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(executions, 3);
    executor.stop().await;
    pm.stop().await;
    db.drop().await;
}

/// Places a `Gtc` order of `order_type` for ACME.
async fn place_typed(
    commands: &CommandService,
    portfolio: PortfolioId,
    side: Side,
    quantity: &str,
    order_type: OrderType,
) -> OrderId {
    let (id, mut command) = place(portfolio, "ACME", side, quantity, None);
    if let OrderCommand::PlaceOrder(order) = &mut command {
        order.order_type = order_type;
    }
    commands.execute_order(&ctx(), id, command).await.unwrap();
    id
}

/// The `OrderTriggered` event of an order: its sequence and payload.
async fn trigger_event(pool: &sqlx::PgPool, id: OrderId) -> Option<(i64, serde_json::Value)> {
    sqlx::query_as(
        "select sequence, payload -> 'OrderTriggered' from events
          where aggregate_id = $1 and event_type = 'OrderTriggered'",
    )
    .bind(id.to_string())
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// The order's state as of its event `sequence` (time travel by log position).
async fn order_at(pool: &sqlx::PgPool, id: OrderId, sequence: i64) -> Order {
    let (transaction, global_position): (String, i64) = sqlx::query_as(
        "select transaction_id::text, global_position from events where aggregate_id = $1 and sequence = $2",
    )
    .bind(id.to_string())
    .bind(sequence)
    .fetch_one(pool)
    .await
    .unwrap();
    let position = LogPosition { transaction_id: transaction.parse().unwrap(), global_position };
    let as_of = AsOf::position(pool, position).await.unwrap().expect("an event there");
    replay_as_of::<Order>(pool, &id.to_string(), &as_of).await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_is_triggered_by_a_tick_and_filled_and_a_stop_limit_never_fills_beyond_its_limit() {
    let PaperMarket { db, commands, kafka, publisher, pm, portfolio } = paper_market().await;
    let (executor, status) = start_executor(commands.clone(), &kafka);
    let price_of = |p: &str| Price::new(dec(p)).unwrap();

    // A buy stop at 101 with the market at 100: accepted (reserved at the stop + 5 %), it waits.
    let stop =
        place_typed(&commands, portfolio, Side::Buy, "10", OrderType::Stop { stop_price: price_of("101") }).await;
    assert!(eventually(|| async { status_of(&commands, stop).await == OrderStatus::New }).await);
    let seen = status.ticks.load(Ordering::Relaxed);
    let below = publish_until(&publisher, tick("ACME", "100", 1, None), || async {
        status.ticks.load(Ordering::Relaxed) > seen
    })
    .await;
    assert!(below, "the executor should see the tick below the stop");
    assert_eq!(status_of(&commands, stop).await, OrderStatus::New);
    assert!(trigger_event(&db.pool, stop).await.is_none(), "100 is below the stop: not triggered");

    // 101.2 reaches the stop: the trigger records that tick, then the order fills as a market order from it
    // (101.2 × 1.0005 = 101.2506 → 101.26, within the protection 101 × 1.05 = 106.05).
    let filled = publish_until(&publisher, tick("ACME", "101.2", 10, None), || async {
        status_of(&commands, stop).await == OrderStatus::Filled
    })
    .await;
    assert!(filled, "the tick at the stop should trigger and fill the order");
    let (sequence, triggered) = trigger_event(&db.pool, stop).await.expect("an OrderTriggered event");
    assert_eq!(triggered["trigger_price"], "101.2");
    assert!(triggered["tick"]["seq"].as_i64().is_some_and(|seq| seq >= 10), "{triggered}");
    let (order, _) = commands.load::<Order>(&stop.to_string()).await.unwrap();
    assert_eq!((order.average_price(), order.protection_price), (Some(dec("101.26")), Some(price_of("106.05"))));
    // Time travel: just before its trigger the order was accepted and not triggered; at it, triggered.
    let then = order_at(&db.pool, stop, sequence - 1).await;
    assert_eq!((then.status, then.triggered), (OrderStatus::New, None));
    let then = order_at(&db.pool, stop, sequence).await;
    assert_eq!((then.status, then.triggered.map(|(_, p)| p)), (OrderStatus::New, Some(price_of("101.2"))));

    // A buy stop-limit (stop 105, limit 106): 107 triggers it but is beyond the limit, so nothing fills; 105.5
    // then fills it at 105.56 (≤ 106).
    let stop_limit = OrderType::StopLimit { stop_price: price_of("105"), limit_price: price_of("106") };
    let capped = place_typed(&commands, portfolio, Side::Buy, "5", stop_limit).await;
    assert!(eventually(|| async { status_of(&commands, capped).await == OrderStatus::New }).await);
    let triggered = publish_until(&publisher, tick("ACME", "107", 100, None), || async {
        trigger_event(&db.pool, capped).await.is_some()
    })
    .await;
    assert!(triggered, "107 should trigger the stop-limit");
    let seen = status.ticks.load(Ordering::Relaxed);
    let again = publish_until(&publisher, tick("ACME", "107.5", 200, None), || async {
        status.ticks.load(Ordering::Relaxed) > seen
    })
    .await;
    assert!(again, "the executor should see another tick beyond the limit");
    let (order, _) = commands.load::<Order>(&capped.to_string()).await.unwrap();
    assert_eq!((order.status, order.cum_quantity), (OrderStatus::New, dec("0")), "never filled beyond 106");
    let filled = publish_until(&publisher, tick("ACME", "105.5", 300, None), || async {
        status_of(&commands, capped).await == OrderStatus::Filled
    })
    .await;
    assert!(filled, "a price within the limit should fill the triggered stop-limit");
    let (order, _) = commands.load::<Order>(&capped.to_string()).await.unwrap();
    assert_eq!(order.average_price(), Some(dec("105.56")));
    assert_eq!(status.triggers.load(Ordering::Relaxed), 2);

    // Both fills are booked on the portfolio, and nothing stays reserved.
    let booked = eventually(|| async {
        let (state, _) = commands.load::<Portfolio>(&portfolio.to_string()).await.unwrap();
        state.positions.get(&sym("ACME")).is_some_and(|p| p.quantity == dec("15")) && state.reserved_cash.is_zero()
    })
    .await;
    assert!(booked, "the portfolio should hold 15 ACME with nothing reserved");
    executor.stop().await;
    pm.stop().await;
    db.drop().await;
}
