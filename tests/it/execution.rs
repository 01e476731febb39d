//! The paper executor against a real PostgreSQL and the test broker: ticks published to Kafka fill accepted
//! orders through `RecordExecution`, the process manager books them on the portfolio, IOC remainders are
//! cancelled, and a restarted executor neither refills nor reuses an execution id.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ledger::commands::CommandService;
use ledger::domain::values::{OrderId, PortfolioId};
use ledger::domain::{CostBasisMethod, Order, OrderCommand, OrderStatus, Portfolio, Side, TimeInForce};
use ledger::execution::{spawn_tick_consumer, PaperConfig, PaperExecutor, PaperStatus};
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
    let db = TestDb::new().await;
    let commands = db.commands();
    let kafka = fresh_config(&brokers());
    kafka.ensure_topics().await.unwrap();
    let publisher = TickPublisher::new(&kafka).unwrap();
    let pm = start_process_manager(commands.clone());
    let (executor, status) = start_executor(commands.clone(), &kafka);
    let portfolio = open_portfolio(&commands, "100000", CostBasisMethod::Fifo).await;

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
