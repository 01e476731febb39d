//! Projection workers against a real PostgreSQL and a real Kafka-protocol broker: exactly-once effect through
//! kills and rebalances, dead letters, catch-up from PostgreSQL, and the values of every read model.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use ledger::commands::CommandService;
use ledger::domain::order::RecordExecution;
use ledger::domain::portfolio::AlertCondition;
use ledger::domain::values::{AlertId, ExecId, Money, PortfolioId};
use ledger::domain::{CostBasisMethod, Order, OrderCommand, OrderStatus, PortfolioCommand, Side};
use ledger::kafka::KafkaConfig;
use ledger::market::{Tick, TickPublisher, TICK_VERSION};
use ledger::projections::analytics::AnalyticsProjection;
use ledger::projections::rebuild::{rebuild, rebuild_together, rebuild_with, RebuildMode, ReplayLimits};
use ledger::projections::valuation::portfolio_valuation;
use ledger::projections::worker::{ProjectionWorker, WorkerConfig, WorkerStatus};
use ledger::projections::{Projection, NAMES};
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;

use crate::support::kafka::{brokers, fresh_config, group_lag, IdleMember};
use crate::support::system::{projection, start_process_manager, start_relay, start_worker, trade, Running};
use crate::support::*;

fn group() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

/// Waits until the process manager is idle and every event of the projection's aggregate type in the log has
/// been applied.
async fn wait_events_applied(pool: &sqlx::PgPool, projection: &dyn Projection) {
    wait_process_manager_idle(pool).await;
    let Some(aggregate_type) = projection.aggregate_type() else { return };
    let query = format!(
        "select count(*) from events e left join {}_progress p on p.aggregate_id = e.aggregate_id
          where e.aggregate_type = $1 and e.sequence > coalesce(p.last_sequence, 0)",
        projection.name()
    );
    let done = eventually(|| async {
        sqlx::query_scalar::<_, i64>(&query).bind(aggregate_type).fetch_one(pool).await.unwrap() == 0
    })
    .await;
    assert!(done, "projection {} never caught up with the log", projection.name());
}

/// Waits until the projection has applied `ticks` (the last tick of each symbol is enough).
async fn wait_ticks_applied(pool: &sqlx::PgPool, name: &str, ticks: &[Tick]) {
    let query =
        format!("select count(*) from {name}_tick_progress where symbol = $1 and (last_ts, last_seq) >= ($2, $3)");
    for tick in ticks {
        let done = eventually(|| async {
            sqlx::query_scalar::<_, i64>(&query)
                .bind(tick.symbol.as_str())
                .bind(tick.ts)
                .bind(tick.seq)
                .fetch_one(pool)
                .await
                .unwrap()
                == 1
        })
        .await;
        assert!(done, "projection {name} never applied tick {tick:?}");
    }
}

/// Every named read model equals a fresh rebuild; those of events also equal a rebuild that reads the log in
/// small chunks and flushes its state after every one (so that rows written by a flush are read back and folded
/// on); and several of them equal a rebuild of them together, from one read of the log.
async fn assert_equals_rebuild(pool: &sqlx::PgPool, names: &[&str]) {
    for name in names {
        let projection = projection(name);
        let report = rebuild(pool, &projection, RebuildMode::Verify, &mut |_, _| {}).await.unwrap();
        assert!(report.differences.is_empty(), "{name} differs from a fresh rebuild: {:?}", report.differences);
        if projection.aggregate_type().is_some() {
            let tight = ReplayLimits { read_batch: 7, held_bytes_max: 0 };
            let report = rebuild_with(pool, &projection, RebuildMode::Verify, tight, &mut |_, _| {}).await.unwrap();
            assert!(report.differences.is_empty(), "{name} differs from a flushing rebuild: {:?}", report.differences);
        }
    }
    if names.len() > 1 {
        let projections: Vec<Arc<dyn Projection>> = names.iter().map(|name| projection(name)).collect();
        for limits in [ReplayLimits::default(), ReplayLimits { read_batch: 11, held_bytes_max: 0 }] {
            let reports =
                rebuild_together(pool, &projections, RebuildMode::Verify, limits, &mut |_, _| {}).await.unwrap();
            assert_eq!(reports.len(), names.len());
            for report in reports {
                assert!(
                    report.differences.is_empty(),
                    "{} differs from a rebuild together with {names:?} ({limits:?}): {:?}",
                    report.projection,
                    report.differences
                );
            }
        }
    }
}

fn tick(symbol: &str, price: &str, seconds: i64, seq: i64) -> Tick {
    Tick {
        version: TICK_VERSION,
        symbol: sym(symbol),
        price: crate::support::price(price),
        ts: Utc.timestamp_opt(1_767_000_000 + seconds, 0).unwrap(),
        seq,
        volume: Some(dec("100")),
        source: "test".into(),
    }
}

/// A steady stream of ticks for `symbols` until cancelled; returns the last tick of each symbol.
fn tick_stream(kafka: &KafkaConfig, symbols: &'static [&'static str]) -> (Running, Arc<std::sync::Mutex<Vec<Tick>>>) {
    let publisher = TickPublisher::new(kafka).unwrap();
    let last = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = last.clone();
    let running = Running::spawn(|cancel| async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut n = 0i64;
        while !cancel.is_cancelled() {
            n += 1;
            let ticks: Vec<Tick> = symbols
                .iter()
                .map(|s| tick(s, &format!("{}.{:02}", rng.gen_range(95..105), rng.gen_range(0..100)), n, n))
                .collect();
            publisher.publish_all(&ticks).await.unwrap();
            *seen.lock().unwrap() = ticks;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (running, last)
}

/// Creates a few alerts of each portfolio (so that the alerts projection has rules to fire).
async fn create_alerts(commands: &CommandService, portfolios: &[PortfolioId]) {
    for (i, portfolio) in portfolios.iter().enumerate() {
        let condition = match i % 3 {
            0 => AlertCondition::PriceAbove { symbol: sym("ACME"), level: price("103") },
            1 => AlertCondition::CrossingDown { symbol: sym("GLOBEX"), level: price("97") },
            _ => AlertCondition::PositionPnlAbove { symbol: sym("ACME"), threshold: dec("10") },
        };
        let command = PortfolioCommand::CreateAlert { alert_id: AlertId::generate(), condition, at: Utc::now() };
        commands.execute_portfolio(&ctx(), *portfolio, command).await.unwrap();
    }
}

/// Workers are killed (aborted mid-batch) again and again under a steady stream of commands and ticks, and
/// restarted; in the end every read model equals a fresh rebuild from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_killed_mid_batch_end_equal_to_a_rebuild() {
    let db = TestDb::new_with(40).await;
    let kafka = fresh_config(&brokers());
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let relay = start_relay(db.pool.clone(), kafka.clone());
    let prefix = group();
    let mut workers: Vec<(String, Running)> = NAMES
        .iter()
        .map(|name| (name.to_string(), start_worker(db.pool.clone(), kafka.clone(), name, &prefix).0))
        .collect();
    let (ticks, last_ticks) = tick_stream(&kafka, &["ACME", "GLOBEX"]);

    let trading = {
        let commands = commands.clone();
        tokio::spawn(async move {
            let summary = trade(&commands, &["ACME", "GLOBEX"], 6, 120, 21).await;
            create_alerts(&commands, &summary.portfolios).await;
            summary
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut kills = 0;
    while !trading.is_finished() || kills < 8 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..400))).await;
        let index = rng.gen_range(0..workers.len());
        let (name, worker) = workers.swap_remove(index);
        worker.kill().await;
        kills += 1;
        workers.push((name.clone(), start_worker(db.pool.clone(), kafka.clone(), &name, &prefix).0));
    }
    let summary = trading.await.unwrap();
    assert!(kills >= 8, "only {kills} kills");
    ticks.stop().await;
    let last = last_ticks.lock().unwrap().clone();
    for name in NAMES {
        wait_events_applied(&db.pool, projection(name).as_ref()).await;
    }
    for name in ["prices", "analytics", "alerts"] {
        wait_ticks_applied(&db.pool, name, &last).await;
    }
    eprintln!("{kills} worker kills; {} orders, {} fills", summary.orders.len(), summary.fills);
    assert_equals_rebuild(&db.pool, &NAMES).await;

    // And the orders read model agrees with the aggregates themselves.
    for order_id in &summary.orders {
        let (order, _) = commands.load::<Order>(&order_id.to_string()).await.unwrap();
        let (status, cum): (String, Decimal) =
            sqlx::query_as("select status, cum_quantity from rm_orders where order_id = $1")
                .bind(order_id.0)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!((status.as_str(), cum), (order.status.as_str(), order.cum_quantity));
    }
    for (_, worker) in workers {
        worker.stop().await;
    }
    relay.stop().await;
    pm.stop().await;
    db.drop().await;
}

/// Two workers of one projection share a group (they split the partitions); one is killed midway. The tables
/// end the same as a single worker's: equal to a rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_in_one_group_one_killed_give_the_same_tables() {
    let db = TestDb::new_with(30).await;
    let kafka = fresh_config(&brokers());
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let relay = start_relay(db.pool.clone(), kafka.clone());
    let prefix = group();
    let (a, a_status) = start_worker(db.pool.clone(), kafka.clone(), "positions", &prefix);
    let (b, b_status) = start_worker(db.pool.clone(), kafka.clone(), "positions", &prefix);
    let (orders_worker, _) = start_worker(db.pool.clone(), kafka.clone(), "orders", &prefix);
    // Trade only once both follow Kafka (a start-up catch-up from PostgreSQL would take the work otherwise).
    let split = eventually(|| async {
        a_status.assigned_partitions.load(Ordering::Relaxed) > 0
            && b_status.assigned_partitions.load(Ordering::Relaxed) > 0
    })
    .await;
    assert!(split, "the group never gave both workers partitions");
    let first = trade(&commands, &["ACME"], 8, 60, 31).await;
    // Both members consume: each was assigned partitions and received messages from them. (Which of them
    // applies portfolio events depends on where the eight portfolio ids hash; order events, which the
    // positions projection skips, land on every partition.)
    let both_received = eventually(|| async {
        a_status.messages.load(Ordering::Relaxed) > 0 && b_status.messages.load(Ordering::Relaxed) > 0
    })
    .await;
    let counts = |status: &WorkerStatus| {
        (
            status.assigned_partitions.load(Ordering::Relaxed),
            status.messages.load(Ordering::Relaxed),
            status.applied.load(Ordering::Relaxed),
        )
    };
    assert!(
        both_received,
        "the two workers did not split the work: (partitions, messages, applied) a {:?}, b {:?}",
        counts(&a_status),
        counts(&b_status)
    );
    a.kill().await;
    let second = trade(&commands, &["ACME"], 8, 60, 32).await;
    wait_events_applied(&db.pool, projection("positions").as_ref()).await;
    wait_events_applied(&db.pool, projection("orders").as_ref()).await;
    let took_over = eventually(|| async { b_status.rebalances.load(Ordering::Relaxed) >= 2 }).await;
    assert!(took_over, "the survivor never took the other's partitions");
    assert_equals_rebuild(&db.pool, &["positions", "orders"]).await;
    eprintln!("{} + {} orders", first.orders.len(), second.orders.len());
    b.stop().await;
    orders_worker.stop().await;
    relay.stop().await;
    pm.stop().await;
    db.drop().await;
}

/// A message that is not an envelope, and an envelope whose payload is not an Order event, land in the
/// dead-letter table and topic with the error and their source offset; the worker keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_messages_go_to_the_dead_letter_topic_and_the_worker_goes_on() {
    let db = TestDb::new_with(20).await;
    let kafka = fresh_config(&brokers());
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let relay = start_relay(db.pool.clone(), kafka.clone());
    let (worker, status) = start_worker(db.pool.clone(), kafka.clone(), "orders", &group());
    let before = trade(&commands, &["ACME"], 2, 10, 41).await;
    wait_events_applied(&db.pool, projection("orders").as_ref()).await;

    let producer: FutureProducer = kafka.client_config().create().unwrap();
    let garbage = FutureRecord::to(&kafka.events_topic).key("junk").payload("this is not JSON");
    producer.send(garbage, Duration::from_secs(10)).await.unwrap();
    let envelope = serde_json::json!({
        "envelope_version": 1, "event_id": uuid::Uuid::now_v7(), "aggregate_type": "Order",
        "aggregate_id": uuid::Uuid::now_v7().to_string(), "sequence": 1, "event_type": "OrderPlaced",
        "event_version": "1", "global_position": 1, "transaction_id": 1, "recorded_at": Utc::now(),
        "payload": {"NoSuchEvent": {}}, "metadata": {}
    });
    let unappliable = envelope.to_string();
    let poison = FutureRecord::to(&kafka.events_topic).key("poison").payload(&unappliable);
    producer.send(poison, Duration::from_secs(10)).await.unwrap();

    let after = trade(&commands, &["ACME"], 2, 10, 42).await;
    wait_events_applied(&db.pool, projection("orders").as_ref()).await;
    let dead: Vec<(String, String, i64, String)> = sqlx::query_as(
        "select source_topic, coalesce(message_key, ''), source_offset, error from dead_letters
          where projection = 'orders' order by id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].1, "junk");
    assert!(dead[0].3.contains("not an event envelope"), "{}", dead[0].3);
    assert_eq!(dead[1].1, "poison");
    assert!(dead[1].3.contains("undecodable payload"), "{}", dead[1].3);
    assert!(dead.iter().all(|d| d.0 == kafka.events_topic && d.2 >= 0));
    assert_eq!(status.dead_letters.load(Ordering::Relaxed), 2);

    // The dead-letter topic holds both, with the error and the source offset in headers.
    let topic_copy = read_dead_letter_topic(&kafka, 2).await;
    assert_eq!(topic_copy.len(), 2);
    for (index, headers) in topic_copy.iter().enumerate() {
        assert_eq!(headers["source_offset"], dead[index].2.to_string());
        assert_eq!(headers["projection"], "orders");
        assert!(!headers["error"].is_empty());
    }
    assert_equals_rebuild(&db.pool, &["orders"]).await;
    assert!(before.orders.len() + after.orders.len() == 20);

    // Neither can be replayed: the first is no message the ledger wrote, the second names an event the log
    // does not hold (a replay takes the event from the log). Both stay open.
    use ledger::projections::dead_letters::{replay, ReplayOutcome};
    let ids: Vec<i64> = sqlx::query_scalar("select id from dead_letters where projection = 'orders' order by id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let projections = [projection("orders")];
    let junk = replay(&db.pool, &projections, ids[0], "test").await.unwrap();
    assert!(
        matches!(&junk, ReplayOutcome::Refused(r) if r.contains("neither an event envelope nor a tick")),
        "{junk:?}"
    );
    let unknown = replay(&db.pool, &projections, ids[1], "test").await.unwrap();
    assert_eq!(unknown, ReplayOutcome::Refused("the event is not in the log".into()));
    let open: i64 = sqlx::query_scalar("select count(*) from dead_letters where resolved_at is null")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(open, 2);
    worker.stop().await;
    relay.stop().await;
    pm.stop().await;
    db.drop().await;
}

async fn read_dead_letter_topic(kafka: &KafkaConfig, count: usize) -> Vec<std::collections::HashMap<String, String>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", group())
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&kafka.dead_letter_topic]).unwrap();
    let mut out = Vec::new();
    while out.len() < count {
        let message = tokio::time::timeout(CONDITION_WAIT_MAX, consumer.recv()).await.unwrap().unwrap();
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        out.push(headers);
    }
    out.sort_by_key(|h: &std::collections::HashMap<String, String>| h["source_offset"].parse::<i64>().unwrap());
    out
}

/// The topic is deleted after the history was mirrored: workers starting later find Kafka without that
/// history, catch up from PostgreSQL, then follow Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_catch_up_from_postgres_when_the_topic_lost_the_history() {
    let db = TestDb::new_with(20).await;
    let kafka = fresh_config(&brokers());
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let relay = start_relay(db.pool.clone(), kafka.clone());
    let history = trade(&commands, &["ACME"], 3, 30, 51).await;
    let relayed = eventually(|| async {
        let name = ledger::relay::cursor_name(&kafka).await.unwrap();
        ledger::relay::relay_lag(&db.pool, &name).await.unwrap().events == 0
    })
    .await;
    assert!(relayed);
    relay.stop().await;

    // Delete and recreate the topic: the history is gone from Kafka, the relay's cursor says it was sent.
    {
        use rdkafka::admin::{AdminClient, AdminOptions};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = kafka.client_config().create().unwrap();
        admin.delete_topics(&[&kafka.events_topic], &AdminOptions::new()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        kafka.ensure_topics().await.unwrap();
    }
    let relay = start_relay(db.pool.clone(), kafka.clone());
    let prefix = group();
    let (orders, orders_status) = start_worker(db.pool.clone(), kafka.clone(), "orders", &prefix);
    let (positions, positions_status) = start_worker(db.pool.clone(), kafka.clone(), "positions", &prefix);
    wait_events_applied(&db.pool, projection("orders").as_ref()).await;
    wait_events_applied(&db.pool, projection("positions").as_ref()).await;
    assert_eq!(orders_status.catch_ups.load(Ordering::Relaxed), 1);
    assert_eq!(positions_status.catch_ups.load(Ordering::Relaxed), 1);
    assert_equals_rebuild(&db.pool, &["orders", "positions"]).await;

    // New events arrive through Kafka again.
    let followed = eventually(|| async { orders_status.following.load(Ordering::SeqCst) }).await;
    assert!(followed);
    let applied_before = orders_status.applied.load(Ordering::Relaxed);
    let more = trade(&commands, &["ACME"], 2, 10, 52).await;
    wait_events_applied(&db.pool, projection("orders").as_ref()).await;
    wait_events_applied(&db.pool, projection("positions").as_ref()).await;
    assert!(orders_status.applied.load(Ordering::Relaxed) > applied_before, "no event came through Kafka");
    assert_equals_rebuild(&db.pool, &["orders", "positions"]).await;
    eprintln!("history {} orders, then {}", history.orders.len(), more.orders.len());
    orders.stop().await;
    positions.stop().await;
    relay.stop().await;
    pm.stop().await;
    db.drop().await;
}

async fn fill_order(
    commands: &CommandService,
    order_id: ledger::domain::values::OrderId,
    quantity: &str,
    at_price: &str,
    fee: &str,
) {
    let (order, _) = commands.load::<Order>(&order_id.to_string()).await.unwrap();
    let exec = format!("x{}", order.exec_ids.len() + 1);
    let command = OrderCommand::RecordExecution(RecordExecution {
        exec_id: ExecId::new(exec).unwrap(),
        quantity: qty(quantity),
        price: price(at_price),
        fee: Money::new(dec(fee)).unwrap(),
        executed_at: Utc::now(),
    });
    commands.execute_order(&ctx(), order_id, command).await.unwrap();
}

async fn trade_and_fill(
    commands: &CommandService,
    portfolio: PortfolioId,
    symbol: &str,
    side: Side,
    quantity: &str,
    at: &str,
    fee: &str,
) {
    let (order_id, command) = place(portfolio, symbol, side, quantity, Some(at));
    commands.execute_order(&ctx(), order_id, command).await.unwrap();
    let decided = eventually(|| async {
        commands.load::<Order>(&order_id.to_string()).await.unwrap().0.status != OrderStatus::PendingNew
    })
    .await;
    let (order, _) = commands.load::<Order>(&order_id.to_string()).await.unwrap();
    assert!(decided && order.status == OrderStatus::New, "order not accepted: {order:?}");
    fill_order(commands, order_id, quantity, at, fee).await;
}

/// Hand-computed: buy 10 @ 100 (fee 1), buy 10 @ 110 (fee 1), sell 15 @ 120 (fee 2), then a tick at 125.
/// FIFO: sold lots cost 1001 + 550.5, realized 246.5, 5 left at 550.5. Average cost: 2102 / 20 = 105.1,
/// 15 sold remove 1576.5, realized 221.5, 5 left at 525.5 (FIFO basis still 550.5). Cash 9696 (the FIFO
/// portfolio also bought 3 ZED at 10: 9666).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn valuations_and_pnl_for_a_hand_computed_scenario() {
    let db = TestDb::new_with(20).await;
    let kafka = fresh_config(&brokers());
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let relay = start_relay(db.pool.clone(), kafka.clone());
    let prefix = group();
    let (positions, _) = start_worker(db.pool.clone(), kafka.clone(), "positions", &prefix);
    let (prices, _) = start_worker(db.pool.clone(), kafka.clone(), "prices", &prefix);
    let fifo = open_portfolio(&commands, "10000", CostBasisMethod::Fifo).await;
    let average = open_portfolio(&commands, "10000", CostBasisMethod::AverageCost).await;
    for portfolio in [fifo, average] {
        trade_and_fill(&commands, portfolio, "ACME", Side::Buy, "10", "100", "1").await;
        trade_and_fill(&commands, portfolio, "ACME", Side::Buy, "10", "110", "1").await;
        trade_and_fill(&commands, portfolio, "ACME", Side::Sell, "15", "120", "2").await;
    }
    trade_and_fill(&commands, fifo, "ZED", Side::Buy, "3", "10", "0").await;
    let acme = tick("ACME", "125", 0, 1);
    TickPublisher::new(&kafka).unwrap().publish(&acme).await.unwrap();
    wait_events_applied(&db.pool, projection("positions").as_ref()).await;
    wait_ticks_applied(&db.pool, "prices", std::slice::from_ref(&acme)).await;

    let row = |portfolio: PortfolioId| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (Decimal, Decimal, Decimal, Decimal, Decimal)>(
                "select p.quantity, p.cost_basis, p.fifo_cost_basis, p.realized_pnl, f.cash
                   from rm_positions p join rm_portfolios f using (portfolio_id)
                  where portfolio_id = $1 and symbol = 'ACME'",
            )
            .bind(portfolio.0)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(row(fifo).await, (dec("5"), dec("550.5"), dec("550.5"), dec("246.5"), dec("9666")));
    assert_eq!(row(average).await, (dec("5"), dec("525.5"), dec("550.5"), dec("221.5"), dec("9696")));

    // Valued at the tick's price, fresh.
    let now = acme.ts + chrono::Duration::seconds(1);
    let minute = chrono::Duration::minutes(1);
    let valuation = portfolio_valuation(&db.pool, average.0, minute, now).await.unwrap().unwrap();
    assert_eq!(valuation.market_value, Some(dec("625")));
    assert_eq!(valuation.unrealized_pnl, Some(dec("99.5")));
    assert_eq!(valuation.total_equity, Some(dec("10321")));
    assert!(!valuation.stale);
    assert_eq!(valuation.positions[0].unrealized_pnl, Some(dec("99.5")));

    // FIFO portfolio also holds ZED, which has never had a price: no value, a reason, never 0.
    let valuation = portfolio_valuation(&db.pool, fifo.0, minute, now).await.unwrap().unwrap();
    let acme_position = valuation.positions.iter().find(|p| p.symbol == "ACME").unwrap();
    assert_eq!(acme_position.unrealized_pnl, Some(dec("74.5")));
    let zed = valuation.positions.iter().find(|p| p.symbol == "ZED").unwrap();
    assert_eq!((zed.market_value, zed.missing_reason.as_deref()), (None, Some("NO_PRICE")));
    assert_eq!(valuation.total_equity, None);
    assert_eq!(valuation.missing_reason.as_deref(), Some("NO_PRICE: ZED"));

    // Two minutes later the price is stale.
    let later = acme.ts + chrono::Duration::minutes(2);
    let valuation = portfolio_valuation(&db.pool, average.0, minute, later).await.unwrap().unwrap();
    assert!(valuation.stale && valuation.positions[0].stale);
    assert_eq!(valuation.market_value, Some(dec("625")));
    positions.stop().await;
    prices.stop().await;
    relay.stop().await;
    pm.stop().await;
    db.drop().await;
}

/// Every alert type fires exactly once per arming when its condition becomes true, also when the same ticks
/// are delivered twice; a re-armed alert fires once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_alert_type_fires_once_per_arming_even_with_duplicate_ticks() {
    let db = TestDb::new_with(20).await;
    let kafka = fresh_config(&brokers());
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let relay = start_relay(db.pool.clone(), kafka.clone());
    let prefix = group();
    let (positions, _) = start_worker(db.pool.clone(), kafka.clone(), "positions", &prefix);
    let (alerts, _) = start_worker(db.pool.clone(), kafka.clone(), "alerts", &prefix);
    let portfolio = open_portfolio(&commands, "10000", CostBasisMethod::Fifo).await;
    trade_and_fill(&commands, portfolio, "ACME", Side::Buy, "10", "100", "0").await;

    let s = || sym("ACME");
    let conditions = [
        ("above", AlertCondition::PriceAbove { symbol: s(), level: price("105") }),
        ("below", AlertCondition::PriceBelow { symbol: s(), level: price("95") }),
        ("cross-up", AlertCondition::CrossingUp { symbol: s(), level: price("105") }),
        ("cross-down", AlertCondition::CrossingDown { symbol: s(), level: price("95") }),
        ("rise-5%", AlertCondition::PercentChange { symbol: s(), reference: price("100"), percent: dec("5") }),
        ("fall-5%", AlertCondition::PercentChange { symbol: s(), reference: price("100"), percent: dec("-5") }),
        ("pnl-above", AlertCondition::PositionPnlAbove { symbol: s(), threshold: dec("50") }),
        ("pnl-below", AlertCondition::PositionPnlBelow { symbol: s(), threshold: dec("-50") }),
    ];
    let mut ids = std::collections::HashMap::new();
    for (name, condition) in conditions {
        let alert_id = AlertId::generate();
        let command = PortfolioCommand::CreateAlert { alert_id, condition, at: Utc::now() };
        commands.execute_portfolio(&ctx(), portfolio, command).await.unwrap();
        ids.insert(name, alert_id);
    }
    wait_events_applied(&db.pool, projection("positions").as_ref()).await;
    wait_events_applied(&db.pool, projection("alerts").as_ref()).await;

    // 100 → 106 (up-cross, above, +6 %, P&L +60) → 94 (down-cross, below, −6 %, P&L −60) → 104 → 106 → 94.
    let publisher = TickPublisher::new(&kafka).unwrap();
    let ticks: Vec<Tick> = ["100", "106", "94", "104", "106", "94"]
        .iter()
        .enumerate()
        .map(|(i, p)| tick("ACME", p, i as i64, i as i64 + 1))
        .collect();
    publisher.publish_all(&ticks).await.unwrap();
    publisher.publish_all(&ticks).await.unwrap(); // delivered twice
    wait_ticks_applied(&db.pool, "alerts", &ticks[ticks.len() - 1..]).await;
    let firings = |alert: AlertId| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (i32, Decimal)>(
                "select arming, price from alert_firings where alert_id = $1 order by arming",
            )
            .bind(alert.0)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    for name in ["above", "cross-up", "rise-5%", "pnl-above"] {
        assert_eq!(firings(ids[name]).await, vec![(1, dec("106"))], "{name}");
    }
    for name in ["below", "cross-down", "fall-5%", "pnl-below"] {
        assert_eq!(firings(ids[name]).await, vec![(1, dec("94"))], "{name}");
    }

    // Re-arm two; only a new crossing / a new time above fires them again.
    for name in ["above", "cross-up"] {
        let command = PortfolioCommand::RearmAlert { alert_id: ids[name], at: Utc::now() };
        commands.execute_portfolio(&ctx(), portfolio, command).await.unwrap();
    }
    wait_events_applied(&db.pool, projection("alerts").as_ref()).await;
    let more = vec![tick("ACME", "96", 10, 11), tick("ACME", "107", 11, 12), tick("ACME", "108", 12, 13)];
    publisher.publish_all(&more).await.unwrap();
    wait_ticks_applied(&db.pool, "alerts", &more[2..]).await;
    assert_eq!(firings(ids["above"]).await, vec![(1, dec("106")), (2, dec("107"))]);
    assert_eq!(firings(ids["cross-up"]).await, vec![(1, dec("106")), (2, dec("107"))]);
    assert_eq!(firings(ids["below"]).await.len(), 1, "not re-armed: no second firing");
    let statuses: Vec<(String, i32)> = sqlx::query_as("select status, arming from rm_alert_rules where alert_id = $1")
        .bind(ids["above"].0)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(statuses, vec![("fired".to_string(), 2)]);

    // A rebuild of the rules reproduces their state from the firings and fires nothing.
    let fired_before: i64 = sqlx::query_scalar("select count(*) from alert_firings").fetch_one(&db.pool).await.unwrap();
    let report = rebuild(&db.pool, &projection("alerts"), RebuildMode::Swap, &mut |_, _| {}).await.unwrap();
    assert!(report.events > 0);
    let fired_after: i64 = sqlx::query_scalar("select count(*) from alert_firings").fetch_one(&db.pool).await.unwrap();
    assert_eq!(fired_before, fired_after);
    assert_equals_rebuild(&db.pool, &["alerts"]).await;
    positions.stop().await;
    alerts.stop().await;
    relay.stop().await;
    pm.stop().await;
    db.drop().await;
}

/// SMA, EMA and daily movers for a fixed tick sequence, through Kafka, with windows of 3 and 5 ticks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn indicators_and_movers_for_a_fixed_tick_sequence() {
    let db = TestDb::new_with(10).await;
    let kafka = fresh_config(&brokers());
    let analytics: Arc<dyn Projection> = Arc::new(AnalyticsProjection { windows: vec![3, 5] });
    let worker = ProjectionWorker::new(
        db.pool.clone(),
        kafka.clone(),
        analytics,
        WorkerConfig { group_prefix: group(), ..WorkerConfig::default() },
    );
    let running = Running::spawn(|cancel| async move {
        worker.run(cancel).await.unwrap();
    });
    let mut ticks = Vec::new();
    for (i, p) in ["10", "11", "12", "13", "14", "15"].iter().enumerate() {
        ticks.push(tick("AAA", p, i as i64, i as i64 + 1));
    }
    for (i, p) in ["20", "21", "19.50", "19"].iter().enumerate() {
        ticks.push(tick("BBB", p, i as i64, i as i64 + 1));
    }
    TickPublisher::new(&kafka).unwrap().publish_all(&ticks).await.unwrap();
    wait_ticks_applied(&db.pool, "analytics", &[ticks[5].clone(), ticks[9].clone()]).await;

    let indicator = |symbol: &'static str, kind: &'static str, window: i32| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (Decimal, i32)>(
                "select value, samples from rm_indicators where symbol = $1 and indicator = $2 and window_size = $3",
            )
            .bind(symbol)
            .bind(kind)
            .bind(window)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(indicator("AAA", "SMA", 3).await, (dec("14"), 3));
    assert_eq!(indicator("AAA", "SMA", 5).await, (dec("13"), 5));
    // α = 2 / (3 + 1) = 0.5: 10, 10.5, 11.25, 12.125, 13.0625, 14.03125.
    assert_eq!(indicator("AAA", "EMA", 3).await, (dec("14.03125"), 6));
    // α = 1/3, rounded to 8 decimals at each step, computed here independently.
    let alpha = Decimal::TWO / Decimal::from(6);
    let mut ema = dec("10");
    for p in ["11", "12", "13", "14", "15"] {
        ema = (alpha * dec(p) + (Decimal::ONE - alpha) * ema)
            .round_dp_with_strategy(8, rust_decimal::RoundingStrategy::MidpointNearestEven)
            .normalize();
    }
    assert_eq!(indicator("AAA", "EMA", 5).await.0, ema);
    assert_eq!(indicator("BBB", "SMA", 5).await, (dec("19.875"), 4), "fewer ticks than the window");

    let movers: Vec<(String, Decimal, Decimal, Decimal, Decimal)> = sqlx::query_as(
        "select symbol, open_price, last_price, change_pct, high from rm_daily_stats order by change_pct desc",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(movers[0], ("AAA".into(), dec("10"), dec("15"), dec("50"), dec("15")));
    assert_eq!(movers[1], ("BBB".into(), dec("20"), dec("19"), dec("-5"), dec("21")));
    running.stop().await;
    db.drop().await;
}

/// Running the fill scenario twice on a fresh portfolio keeps the process manager's view and the read model
/// in step (a smoke test of the positions projection against the aggregate).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn positions_read_model_matches_the_aggregate() {
    let db = TestDb::new_with(20).await;
    let kafka = fresh_config(&brokers());
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let relay = start_relay(db.pool.clone(), kafka.clone());
    let (positions, _) = start_worker(db.pool.clone(), kafka.clone(), "positions", &group());
    let summary = trade(&commands, &["ACME", "GLOBEX"], 3, 30, 61).await;
    wait_events_applied(&db.pool, projection("positions").as_ref()).await;
    for portfolio in &summary.portfolios {
        let (state, _) = commands.load::<ledger::domain::Portfolio>(&portfolio.to_string()).await.unwrap();
        let (cash, reserved, realized): (Decimal, Decimal, Decimal) =
            sqlx::query_as("select cash, reserved_cash, realized_pnl from rm_portfolios where portfolio_id = $1")
                .bind(portfolio.0)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!((cash, reserved, realized), (state.cash, state.reserved_cash, state.realized_pnl));
        for (symbol, position) in &state.positions {
            let (quantity, cost, fifo): (Decimal, Decimal, Decimal) = sqlx::query_as(
                "select quantity, cost_basis, fifo_cost_basis from rm_positions where portfolio_id = $1 and symbol = $2",
            )
            .bind(portfolio.0)
            .bind(symbol.as_str())
            .fetch_one(&db.pool)
            .await
            .unwrap();
            assert_eq!((quantity, cost, fifo), (position.quantity, position.cost_basis, position.fifo_cost_basis()));
        }
    }
    positions.stop().await;
    relay.stop().await;
    pm.stop().await;
    db.drop().await;
}

/// A worker whose group is far behind on the events topic (a long stop, a crash loop) reads the backlog from
/// PostgreSQL instead of re-reading the topic, then follows Kafka from the high watermark — and ends equal to a
/// rebuild. (In the chaos test, re-reading thousands of messages after every kill left the workers minutes
/// behind.) The group still has a member while the worker restarts — as after a SIGKILL, until the session
/// times out — so the start offsets cannot be committed before joining; they must be applied on assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_far_behind_catches_up_from_postgres_then_follows_kafka() {
    let db = TestDb::new_with(20).await;
    let kafka = fresh_config(&brokers());
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let relay = start_relay(db.pool.clone(), kafka.clone());
    let prefix = group();
    let (orders, status) = start_worker(db.pool.clone(), kafka.clone(), "orders", &prefix);
    trade(&commands, &["ACME"], 2, 5, 61).await;
    wait_events_applied(&db.pool, projection("orders").as_ref()).await;
    let followed = eventually(|| async { status.following.load(Ordering::SeqCst) }).await;
    assert!(followed);
    orders.stop().await;
    let catch_ups_before = status.catch_ups.load(Ordering::Relaxed);

    let group_id = format!("{prefix}.orders");
    let idle = IdleMember::join(&brokers(), &group_id, &kafka.events_topic);

    // While the worker is down: orders, and 6,000 other events (over 1,000 per partition) relayed to the topic.
    trade(&commands, &["ACME"], 2, 10, 62).await;
    {
        let mut conn = db.pool.acquire().await.unwrap();
        for n in 0..6_000i64 {
            crate::support::workload::insert_event(&mut conn, &format!("filler-{}", n % 600), n / 600 + 1).await;
        }
    }
    let relayed = eventually(|| async {
        let name = ledger::relay::cursor_name(&kafka).await.unwrap();
        ledger::relay::relay_lag(&db.pool, &name).await.unwrap().events == 0
    })
    .await;
    assert!(relayed);

    let (orders, status) = start_worker(db.pool.clone(), kafka.clone(), "orders", &prefix);
    wait_events_applied(&db.pool, projection("orders").as_ref()).await;
    assert_eq!(status.catch_ups.load(Ordering::Relaxed), 1, "the restarted worker caught up from PostgreSQL");
    assert_eq!(catch_ups_before, 1, "the first start caught up from an empty group once");
    let shared = eventually(|| async { status.assigned_partitions.load(Ordering::SeqCst) > 0 }).await;
    assert!(shared, "the restarted worker was assigned partitions next to the idle member");
    drop(idle); // its partitions move to the worker
    let drained = eventually(|| async {
        group_lag(&brokers(), &group_id, &kafka.events_topic) == 0
            && status.assigned_partitions.load(Ordering::SeqCst) == kafka.partitions as i64
    })
    .await;
    assert!(drained, "the group's offsets reach the end of the topic");
    let read = status.messages.load(Ordering::Relaxed);
    assert!(read < 1_000, "the worker started after the catch-up instead of re-reading the topic ({read} messages)");
    assert_equals_rebuild(&db.pool, &["orders"]).await;
    let followed = eventually(|| async { status.following.load(Ordering::SeqCst) }).await;
    assert!(followed);
    trade(&commands, &["ACME"], 1, 3, 63).await;
    wait_events_applied(&db.pool, projection("orders").as_ref()).await;
    assert_equals_rebuild(&db.pool, &["orders"]).await;
    orders.stop().await;
    relay.stop().await;
    pm.stop().await;
    db.drop().await;
}

/// A rebuild meets an event in the log that its projections cannot apply (an `AlertCreated` whose payload is
/// no alert): the projection without a fold of its own (alerts, each read of the log applied through its live
/// statements) and those with one (performance, positions) skip that event and apply the rest of the same read,
/// and the projections rebuilt together from one read give the same tables as rebuilt one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_skips_an_event_it_cannot_apply_and_applies_the_rest_of_the_read() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let first = open_portfolio(&commands, "1000", CostBasisMethod::Fifo).await;
    let second = open_portfolio(&commands, "500", CostBasisMethod::Fifo).await;
    let alert = |level: &str| PortfolioCommand::CreateAlert {
        alert_id: AlertId::generate(),
        condition: AlertCondition::PriceAbove { symbol: sym("ACME"), level: price(level) },
        at: Utc::now(),
    };
    commands.execute_portfolio(&ctx(), first, alert("101")).await.unwrap();
    // What no ledger writes: the second portfolio's third event, an alert without a condition.
    sqlx::query(
        "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         values ('Portfolio', $1, 3, 'AlertCreated', $2, '{\"AlertCreated\": {\"alert_id\": 7}}'::jsonb, '{}'::jsonb)",
    )
    .bind(second.to_string())
    .bind(ledger::domain::portfolio::PORTFOLIO_EVENT_VERSION)
    .execute(&db.pool)
    .await
    .unwrap();
    commands.execute_portfolio(&ctx(), first, alert("102")).await.unwrap();

    let names = ["alerts", "performance", "positions"];
    let projections: Vec<Arc<dyn Projection>> = names.iter().map(|name| projection(name)).collect();
    let reports = rebuild_together(&db.pool, &projections, RebuildMode::Swap, ReplayLimits::default(), &mut |_, _| {})
        .await
        .unwrap();
    assert!(reports.iter().all(|r| r.events >= 7), "{reports:?}");
    let rules: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("select portfolio_id, status from rm_alert_rules order by created_at")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(rules, vec![(first.0, "armed".to_string()); 2], "the alerts before and after the bad one");
    let flows: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("select portfolio_id, sequence from rm_portfolio_flows order by portfolio_id, sequence")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let mut expected = vec![(first.0, 1), (first.0, 2), (second.0, 1), (second.0, 2)];
    expected.sort();
    assert_eq!(flows, expected, "the openings and deposits, nothing of the bad event");
    for name in names {
        let progress: i64 =
            sqlx::query_scalar(&format!("select last_sequence from {name}_progress where aggregate_id = $1"))
                .bind(second.to_string())
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(progress, 3, "{name} is past the bad event");
    }
    let cash: Decimal = sqlx::query_scalar("select cash from rm_portfolios where portfolio_id = $1")
        .bind(second.0)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(cash, dec("500"));
    // The rebuilt tables are now the live ones: rebuilt again, one by one and in small reads, they are equal.
    assert_equals_rebuild(&db.pool, &names).await;
    db.drop().await;
}

/// The performance projection applies an event alone as it does in a batch: what the live worker does with a
/// batch that held a poison event (each event again under a savepoint), and what a rebuild does with what
/// arrived during it. (It wrote nothing that way: only its batch path wrote flows.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_performance_projection_applies_events_one_by_one_as_in_a_batch() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let portfolio = open_portfolio(&commands, "1000", CostBasisMethod::Fifo).await;
    // The two events of the portfolio (the reader returns only what lies below every running transaction).
    let reader = || ledger::log::LogReader::new(db.pool.clone(), ledger::log::LogPosition::START);
    let readable = eventually(|| async { reader().read_batch().await.unwrap().len() == 2 }).await;
    assert!(readable, "the portfolio's events never became readable");
    let events = reader().read_batch().await.unwrap();
    let performance = projection("performance");
    let mut tx = db.pool.begin().await.unwrap();
    let applied =
        ledger::projections::applier::apply_events(&mut tx, performance.as_ref(), &events, true).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(applied.applied, 2);
    let flows: Vec<(uuid::Uuid, i64, Decimal)> =
        sqlx::query_as("select portfolio_id, sequence, cash_delta from rm_portfolio_flows order by sequence")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(flows, vec![(portfolio.0, 1, Decimal::ZERO), (portfolio.0, 2, dec("1000"))]);
    db.drop().await;
}

/// A worker that falls far behind on the events topic while following (here: its projection's lock held while
/// 1,200 other events and deposits are relayed, so that its batch waits) stops reading the topic, catches up from
/// PostgreSQL and follows again from the high watermarks — each deposit applied once, the tables equal to a
/// rebuild — and, following, keeps its log cursor moving (so that a catch-up reads only what came after). (In a
/// 10-minute chaos run the workers, re-reading a backlog from a broker that keeps its log in PostgreSQL, were still
/// minutes behind after ten minutes; restarted, they caught up from the log in seconds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_following_worker_that_falls_far_behind_catches_up_from_postgres() {
    let db = TestDb::new_with(20).await;
    let kafka = fresh_config(&brokers());
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let relay = start_relay(db.pool.clone(), kafka.clone());
    let prefix = group();
    let config = WorkerConfig {
        group_prefix: prefix.clone(),
        lag_check_interval_ms: 0,
        far_behind_messages: 100,
        // Small batches: the one held by the lock leaves most of the backlog behind it.
        batch_size_max: 50,
        ..WorkerConfig::default()
    };
    let positions = projection("positions");
    let worker = ProjectionWorker::new(db.pool.clone(), kafka.clone(), positions.clone(), config);
    let status = worker.status();
    let running = Running::spawn(|cancel| async move {
        let _ = worker.run(cancel).await;
    });
    let portfolio = open_portfolio(&commands, "1000", CostBasisMethod::Fifo).await;
    wait_events_applied(&db.pool, positions.as_ref()).await;
    let followed = eventually(|| async { status.following.load(Ordering::SeqCst) }).await;
    assert!(followed);
    let catch_ups = status.catch_ups.load(Ordering::Relaxed);
    let read_before = status.messages.load(Ordering::Relaxed);

    let mut lock = db.pool.begin().await.unwrap();
    // Idle while the backlog is written and relayed, which may take a while on a busy machine.
    sqlx::query("set local idle_in_transaction_session_timeout = 0").execute(&mut *lock).await.unwrap();
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(ledger::projections::catch_up::projection_lock(positions.as_ref()))
        .execute(&mut *lock)
        .await
        .unwrap();
    {
        let mut conn = db.pool.acquire().await.unwrap();
        for n in 0..1_200i64 {
            crate::support::workload::insert_event(&mut conn, &format!("filler-{}", n % 120), n / 120 + 1).await;
        }
    }
    for _ in 0..20 {
        let deposit = PortfolioCommand::DepositCash { amount: amount("10"), reference: None, at: Utc::now() };
        commands.execute_portfolio(&ctx(), portfolio, deposit).await.unwrap();
    }
    let relayed = eventually(|| async {
        let name = ledger::relay::cursor_name(&kafka).await.unwrap();
        ledger::relay::relay_lag(&db.pool, &name).await.unwrap().events == 0
    })
    .await;
    assert!(relayed);
    lock.commit().await.unwrap();

    let caught_up = eventually(|| async { status.catch_ups.load(Ordering::Relaxed) > catch_ups }).await;
    assert!(caught_up, "the worker caught up from PostgreSQL while following");
    let group_id = format!("{prefix}.positions");
    let drained = eventually(|| async {
        status.following.load(Ordering::SeqCst) && group_lag(&brokers(), &group_id, &kafka.events_topic) == 0
    })
    .await;
    assert!(drained, "following again, the group's offsets reach the end of the topic");
    let read = status.messages.load(Ordering::Relaxed) - read_before;
    assert!(read < 1_000, "the worker caught up from PostgreSQL instead of re-reading the topic ({read} messages)");
    let second = open_portfolio(&commands, "250", CostBasisMethod::Fifo).await;
    wait_events_applied(&db.pool, positions.as_ref()).await;
    let cash: Decimal = sqlx::query_scalar("select cash from rm_portfolios where portfolio_id = $1")
        .bind(portfolio.0)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(cash, dec("1200"), "each deposit applied once");
    assert_equals_rebuild(&db.pool, &["positions"]).await;

    // Following (each batch a lag check here), the log cursor passes the second portfolio's events, which came
    // through Kafka: it moves once a later check sees them applied and relayed.
    let cursor_passed = eventually(|| async {
        open_portfolio(&commands, "1", CostBasisMethod::Fifo).await;
        sqlx::query_scalar::<_, bool>(
            "select coalesce((select (c.transaction_id, c.global_position) >= (e.transaction_id, e.global_position)
                                from log_cursors c,
                                     (select transaction_id, global_position from events where aggregate_id = $1
                                       order by transaction_id desc, global_position desc limit 1) e
                               where c.name = 'projection:positions'), false)",
        )
        .bind(second.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap()
    })
    .await;
    assert!(cursor_passed, "the log cursor moves while the worker follows Kafka");
    // And every Portfolio event up to it is applied: a catch-up starting there misses nothing.
    let missed: i64 = sqlx::query_scalar(
        "select count(*) from events e join log_cursors c on c.name = 'projection:positions'
           left join positions_progress p on p.aggregate_id = e.aggregate_id
          where e.aggregate_type = 'Portfolio' and (e.transaction_id, e.global_position) <= (c.transaction_id, c.global_position)
            and e.sequence > coalesce(p.last_sequence, 0)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(missed, 0, "events up to the cursor not applied");
    running.stop().await;
    relay.stop().await;
    pm.stop().await;
    db.drop().await;
}

/// A log a fold must not guess about (an aggregate's event after a gap in its sequence) fails the whole rebuild of
/// every projection together — also when the gap spans the fold's flushes: the error comes back (the folds on
/// their tasks stop) and nothing is swapped in.
#[tokio::test]
async fn a_rebuild_whose_fold_fails_returns_the_error_and_swaps_nothing() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let id = open_portfolio(&commands, "10", CostBasisMethod::Fifo).await;
    let next: i64 = sqlx::query_scalar("select max(sequence) + 1 from events where aggregate_id = $1")
        .bind(id.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    insert_foreign_deposit(&mut conn, id, next + 1, "1", "11", Utc::now()).await;
    drop(conn);

    let projections = ledger::projections::all(&Default::default());
    // Also when each event is read, folded and flushed on its own: the gap spans flushes.
    for limits in [ReplayLimits::default(), ReplayLimits { read_batch: 1, held_bytes_max: 0 }] {
        let error =
            rebuild_together(&db.pool, &projections, RebuildMode::Swap, limits, &mut |_, _| {}).await.unwrap_err();
        assert!(error.to_string().contains("follows event"), "{limits:?}: {error}");
        let live: i64 = sqlx::query_scalar("select count(*) from rm_portfolios").fetch_one(&db.pool).await.unwrap();
        assert_eq!(live, 0, "a failed rebuild swapped its tables in");
    }
    db.drop().await;
}
