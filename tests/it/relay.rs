//! The relay against a real PostgreSQL and a real Kafka-protocol broker (nisshi): every committed event reaches
//! `ledger.events`, in per-aggregate order, through kills, broker outages and fail-over.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ledger::kafka::KafkaConfig;
use ledger::relay::{cursor_name, relay_lag, Relay, RelayConfig, RelayStatus};
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::support::kafka::{brokers, check_mirror, consume_until, fresh_config, OwnedBroker};
use crate::support::workload::Workload;
use crate::support::{eventually, TestDb};

const CONSUME_TIMEOUT: Duration = crate::support::CONDITION_WAIT_MAX;

struct RunningRelay {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    status: Arc<RelayStatus>,
}

fn start_relay(db: &TestDb, kafka: &KafkaConfig) -> RunningRelay {
    let relay = Relay::new(db.pool.clone(), kafka.clone(), RelayConfig::default());
    let status = relay.status();
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let task = tokio::spawn(async move {
        relay.run(token).await.expect("relay");
    });
    RunningRelay { cancel, task, status }
}

impl RunningRelay {
    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
}

/// 10,000 events over 100 aggregates, ten concurrent writers, one transaction in eight held open.
fn ten_thousand(seed: u64) -> Workload {
    Workload {
        writers: 10,
        aggregates_per_writer: 10,
        transactions_per_writer: 500,
        events_per_transaction_min: 2,
        events_per_transaction_max: 2,
        hold_one_in: 8,
        rollback_one_in: 0,
        seed,
    }
}

fn as_set(committed: &[(String, i64)]) -> HashSet<(String, i64)> {
    committed.iter().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_reaches_the_topic_in_per_key_order_under_concurrent_writers() {
    let db = TestDb::new_with(16).await;
    let kafka = fresh_config(&brokers());
    let relay = start_relay(&db, &kafka);
    let committed = ten_thousand(11).run(db.pool.clone()).await;
    assert_eq!(committed.len(), 10_000);
    let consumed = consume_until(&kafka.brokers, &kafka.events_topic, &as_set(&committed), CONSUME_TIMEOUT).await;
    let duplicates = check_mirror(&committed, &consumed).unwrap();
    eprintln!("{} events mirrored, {duplicates} duplicates", committed.len());
    let name = cursor_name(&kafka).await.unwrap();
    let caught_up = eventually(|| async { relay_lag(&db.pool, &name).await.unwrap().events == 0 }).await;
    assert!(caught_up, "the relay's cursor never reached the head of the log");
    assert!(relay.status.produced.load(Ordering::Relaxed) >= committed.len() as u64);
    relay.stop().await;
    db.drop().await;
}

/// The relay task is aborted again and again while writers run — often between producing a batch and storing
/// its cursor — and started afresh each time. Nothing is missing; the re-produced batches show as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_mid_stream_and_restarted_loses_nothing() {
    let db = TestDb::new_with(16).await;
    let kafka = fresh_config(&brokers());
    let stop = CancellationToken::new();
    let killer = {
        let (db_pool, kafka, stop) = (db.pool.clone(), kafka.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            let mut kills = 0;
            while !stop.is_cancelled() {
                let relay = Relay::new(db_pool.clone(), kafka.clone(), RelayConfig::default());
                let status = relay.status();
                let task = tokio::spawn(async move {
                    let _ = relay.run(CancellationToken::new()).await;
                });
                if kills % 2 == 0 {
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
                } else {
                    // Right after the first acknowledged batch: the next ones are usually in flight.
                    let deadline = Instant::now() + Duration::from_millis(1_500);
                    while status.batches.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                task.abort();
                let _ = task.await;
                kills += 1;
            }
            kills
        })
    };
    let committed = ten_thousand(12).run(db.pool.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let kills = killer.await.unwrap();
    let relay = start_relay(&db, &kafka);
    let consumed = consume_until(&kafka.brokers, &kafka.events_topic, &as_set(&committed), CONSUME_TIMEOUT).await;
    let duplicates = check_mirror(&committed, &consumed).unwrap();
    eprintln!("relay killed {kills} times; {} events, {duplicates} duplicates", committed.len());
    assert!(kills >= 4, "only {kills} kills");
    assert!(duplicates > 0, "no kill landed between produce and cursor store");
    relay.stop().await;
    db.drop().await;
}

/// The broker is killed for ten seconds while events keep being committed; the relay reports it, waits, and
/// resumes by itself when the broker is back. Nothing is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_rides_out_a_ten_second_broker_outage() {
    let db = TestDb::new_with(16).await;
    let mut broker = OwnedBroker::start().await;
    let mut kafka = fresh_config(&broker.address());
    kafka.partitions = 2;
    let relay = start_relay(&db, &kafka);
    let before = Workload { transactions_per_writer: 50, ..ten_thousand(13) }.run(db.pool.clone()).await;
    let first = consume_until(&kafka.brokers, &kafka.events_topic, &as_set(&before), CONSUME_TIMEOUT).await;
    check_mirror(&before, &first).unwrap();

    broker.kill().await;
    let outage = Instant::now();
    let during = Workload { transactions_per_writer: 50, ..ten_thousand(14) }.run(db.pool.clone()).await;
    let noticed = eventually(|| async { relay.status.broker_unreachable.load(Ordering::SeqCst) }).await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed())).await;
    broker.resume().await;
    let after = Workload { transactions_per_writer: 50, ..ten_thousand(15) }.run(db.pool.clone()).await;

    let committed: Vec<_> = before.into_iter().chain(during).chain(after).collect();
    let consumed = consume_until(&kafka.brokers, &kafka.events_topic, &as_set(&committed), CONSUME_TIMEOUT).await;
    check_mirror(&committed, &consumed).unwrap();
    assert!(noticed, "the relay never reported the broker as unreachable");
    let recovered = eventually(|| async { !relay.status.broker_unreachable.load(Ordering::SeqCst) }).await;
    assert!(recovered, "the relay never reported the broker's recovery");
    relay.stop().await;
    broker.stop().await;
    db.drop().await;
}

/// Two relays at once: one produces, the other stands by; when the active one dies the standby takes over and
/// nothing is missing. (How fast it takes over is a measurement, printed here, not an assertion.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_relays_one_produces_and_the_other_takes_over() {
    let db = TestDb::new_with(16).await;
    let kafka = fresh_config(&brokers());
    let a = start_relay(&db, &kafka);
    let b = start_relay(&db, &kafka);
    let one_active =
        eventually(|| async { a.status.active.load(Ordering::SeqCst) ^ b.status.active.load(Ordering::SeqCst) }).await;
    assert!(one_active, "expected exactly one active relay");
    let first = Workload { transactions_per_writer: 100, ..ten_thousand(16) }.run(db.pool.clone()).await;
    let consumed = consume_until(&kafka.brokers, &kafka.events_topic, &as_set(&first), CONSUME_TIMEOUT).await;
    check_mirror(&first, &consumed).unwrap();
    let (active, standby) = if a.status.active.load(Ordering::SeqCst) { (a, b) } else { (b, a) };
    assert!(active.status.produced.load(Ordering::Relaxed) > 0);
    assert_eq!(standby.status.produced.load(Ordering::Relaxed), 0, "the standby produced");
    assert!(!standby.status.active.load(Ordering::SeqCst));

    // Kill the active one (its lock session goes with it).
    active.task.abort();
    let _ = active.task.await;
    let killed_at = Instant::now();
    let took_over = eventually(|| async { standby.status.active.load(Ordering::SeqCst) }).await;
    let takeover = killed_at.elapsed();
    assert!(took_over, "the standby never took over");
    let second = Workload { transactions_per_writer: 100, ..ten_thousand(17) }.run(db.pool.clone()).await;
    let committed: Vec<_> = first.into_iter().chain(second).collect();
    let consumed = consume_until(&kafka.brokers, &kafka.events_topic, &as_set(&committed), CONSUME_TIMEOUT).await;
    check_mirror(&committed, &consumed).unwrap();
    eprintln!("standby took over in {takeover:?}");
    standby.stop().await;
    db.drop().await;
}

/// The README's shell recipe (a few lines of Python with confluent-kafka) reads what the relay wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_python_recipe_reads_the_events() {
    let python = std::env::var("LEDGER_PYTHON").unwrap_or_else(|_| {
        panic!("set LEDGER_PYTHON to a Python with confluent-kafka installed (./scripts/test does)")
    });
    let db = TestDb::new().await;
    let kafka = fresh_config(&brokers());
    let relay = start_relay(&db, &kafka);
    let committed = Workload { writers: 2, transactions_per_writer: 20, ..ten_thousand(18) }.run(db.pool.clone()).await;
    let consumed = consume_until(&kafka.brokers, &kafka.events_topic, &as_set(&committed), CONSUME_TIMEOUT).await;
    check_mirror(&committed, &consumed).unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/read-events.py");
    let output = tokio::process::Command::new(python)
        .args([script, "--brokers", &kafka.brokers, "--topic", &kafka.events_topic])
        .args(["--limit", &consumed.len().to_string(), "--idle", "20"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let read: HashSet<(String, i64)> = lines
        .iter()
        .map(|l| (l["event"]["aggregate_id"].as_str().unwrap().to_string(), l["event"]["sequence"].as_i64().unwrap()))
        .collect();
    assert_eq!(read, as_set(&committed));
    assert!(lines.iter().all(|l| l["key"] == l["event"]["aggregate_id"]
        && l["headers"]["sequence"].as_str().and_then(|s| s.parse::<i64>().ok()) == l["event"]["sequence"].as_i64()
        && l["headers"]["correlation_id"] == "workload"));
    relay.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_counts_what_is_not_yet_relayed() {
    let db = TestDb::new().await;
    let kafka = fresh_config(&brokers());
    let committed = Workload { writers: 2, transactions_per_writer: 25, ..ten_thousand(19) }.run(db.pool.clone()).await;
    let name = cursor_name(&kafka).await.unwrap();
    let lag = relay_lag(&db.pool, &name).await.unwrap();
    assert_eq!(lag.events, committed.len() as i64);
    assert!(lag.seconds >= 0.0);
    let relay = start_relay(&db, &kafka);
    let caught_up = eventually(|| async { relay_lag(&db.pool, &name).await.unwrap().events == 0 }).await;
    assert!(caught_up);
    assert_eq!(relay_lag(&db.pool, &name).await.unwrap().seconds, 0.0);
    relay.stop().await;
    db.drop().await;
}
