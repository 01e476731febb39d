//! The log reader never skips a committed event, even when transactions commit out of position order — and a
//! reader that follows `global_position` alone does skip under the same conditions.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ledger::log::{newest_position, LogPosition, LogReader, Newest, ReadOrder, RecordedEvent};
use sqlx::Acquire;
use tokio_util::sync::CancellationToken;

use crate::support::workload::{insert_event, Workload};
use crate::support::{TestDb, CONDITION_WAIT_MAX};

const WRITERS: usize = 8;
const AGGREGATES_PER_WRITER: usize = 12;
const TRANSACTIONS_PER_WRITER: usize = 120;

/// The last committed event in `order`'s sense (the reader's cursor reaches it once it delivered everything).
async fn log_head(pool: &sqlx::PgPool, order: ReadOrder) -> LogPosition {
    match order {
        ReadOrder::CommitSafe => newest_position(pool, Newest::Committed).await.unwrap(),
        ReadOrder::GlobalPositionOnly => {
            let (transaction_id, global_position): (String, i64) = sqlx::query_as(
                "select transaction_id::text, global_position from events order by global_position desc limit 1",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            LogPosition::from_columns(&transaction_id, global_position).unwrap()
        }
    }
}

fn reached(position: LogPosition, head: LogPosition, order: ReadOrder) -> bool {
    match order {
        ReadOrder::CommitSafe => position >= head,
        ReadOrder::GlobalPositionOnly => position.global_position >= head.global_position,
    }
}

/// Reads with `order` while the workload runs; returns what the workload committed and what was delivered.
async fn run_reader_during_workload(
    db: &TestDb,
    order: ReadOrder,
    seed: u64,
) -> (Vec<(String, i64)>, Vec<RecordedEvent>) {
    let cancel = CancellationToken::new();
    let reader_task = {
        let pool = db.pool.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut reader = LogReader::new(pool.clone(), LogPosition::START)
                .with_batch_size(100)
                .with_poll_interval(Duration::from_millis(10))
                .with_read_order(order);
            let mut delivered = Vec::new();
            while let Some(batch) = reader.next_batch(&cancel).await.unwrap() {
                delivered.extend(batch);
            }
            // The writers are done: drain until the reader has passed the last committed event (in its own
            // order). The commit-safe reader may have to wait for the horizon, which transactions of tests
            // running in parallel on the same server hold back for a moment.
            let head = log_head(&pool, order).await;
            let deadline = tokio::time::Instant::now() + CONDITION_WAIT_MAX;
            while !reached(reader.position(), head, order) {
                let batch = reader.read_batch().await.unwrap();
                if batch.is_empty() {
                    assert!(tokio::time::Instant::now() < deadline, "the reader never reached the head {head:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                delivered.extend(batch);
            }
            delivered
        })
    };
    let workload = Workload {
        writers: WRITERS,
        aggregates_per_writer: AGGREGATES_PER_WRITER,
        transactions_per_writer: TRANSACTIONS_PER_WRITER,
        events_per_transaction_min: 1,
        events_per_transaction_max: 3,
        hold_one_in: 8,
        rollback_one_in: 20,
        seed,
    };
    let committed = workload.run(db.pool.clone()).await;
    cancel.cancel();
    (committed, reader_task.await.unwrap())
}

/// Every committed event delivered exactly once, nothing else, and each aggregate's events in sequence order.
fn verify_delivery(committed: &[(String, i64)], delivered: &[RecordedEvent]) -> Result<(), String> {
    let mut seen = HashSet::new();
    let mut last_sequence: HashMap<&str, i64> = HashMap::new();
    for event in delivered {
        if !seen.insert((event.aggregate_id.clone(), event.sequence)) {
            return Err(format!("delivered twice: {} #{}", event.aggregate_id, event.sequence));
        }
        let last = last_sequence.entry(&event.aggregate_id).or_insert(0);
        if event.sequence <= *last {
            return Err(format!("{} #{} delivered after #{}", event.aggregate_id, event.sequence, last));
        }
        *last = event.sequence;
    }
    let expected: HashSet<(String, i64)> = committed.iter().cloned().collect();
    let missing = expected.difference(&seen).count();
    let extra = seen.difference(&expected).count();
    if missing > 0 || extra > 0 {
        return Err(format!("{missing} committed events missing, {extra} unexpected events delivered"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_safe_reader_delivers_every_event_once_in_order() {
    let db = TestDb::new_with(WRITERS as u32 + 4).await;
    let (committed, delivered) = run_reader_during_workload(&db, ReadOrder::CommitSafe, 7).await;
    assert!(committed.len() > 1_000, "workload too small: {}", committed.len());
    verify_delivery(&committed, &delivered).unwrap();
    db.drop().await;
}

/// The same check fails for a reader that trusts global_position: it skips late committers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn global_position_reader_skips_events_under_the_same_workload() {
    let db = TestDb::new_with(WRITERS as u32 + 4).await;
    let (committed, delivered) = run_reader_during_workload(&db, ReadOrder::GlobalPositionOnly, 7).await;
    let outcome = verify_delivery(&committed, &delivered);
    assert!(outcome.is_err(), "expected the global_position reader to miss late commits");
    assert!(outcome.unwrap_err().contains("missing"));
    db.drop().await;
}

/// The mechanism, step by step: A takes a position and stays open, B takes a later one and commits.
#[tokio::test]
async fn a_late_commit_is_skipped_by_position_but_not_by_commit_order() {
    let db = TestDb::new().await;
    let mut a = db.pool.acquire().await.unwrap();
    let mut b = db.pool.acquire().await.unwrap();
    let mut naive = LogReader::new(db.pool.clone(), LogPosition::START).with_read_order(ReadOrder::GlobalPositionOnly);
    let mut safe = LogReader::new(db.pool.clone(), LogPosition::START);

    let mut tx_a = a.begin().await.unwrap();
    insert_event(&mut tx_a, "A", 1).await;
    insert_event(&mut b, "B", 1).await; // autocommit, later position

    let naive_first: Vec<_> = naive.read_batch().await.unwrap().into_iter().map(|e| e.aggregate_id).collect();
    let safe_first: Vec<_> = safe.read_batch().await.unwrap().into_iter().map(|e| e.aggregate_id).collect();
    assert_eq!(naive_first, ["B"]);
    assert!(safe_first.is_empty(), "B is above the open transaction's horizon");

    tx_a.commit().await.unwrap();
    let naive_second: Vec<_> = naive.read_batch().await.unwrap().into_iter().map(|e| e.aggregate_id).collect();
    assert!(naive_second.is_empty(), "the naive reader has moved past A's position for good");
    // The horizon is cluster-wide: transactions of tests running in parallel may hold it a little longer.
    let mut safe_second = Vec::new();
    let deadline = tokio::time::Instant::now() + CONDITION_WAIT_MAX;
    while safe_second.len() < 2 && tokio::time::Instant::now() < deadline {
        safe_second.extend(safe.read_batch().await.unwrap().into_iter().map(|e| e.aggregate_id));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(safe_second, ["A", "B"]);
    drop((a, b));
    db.drop().await;
}

/// Commit order is numeric in the transaction id: 9 before 10 before 100 (a text sort would put "10" first and
/// "9" last), for the reader and for the newest event. The ids are made up and small, so that they are below the
/// horizon even on a brand-new cluster.
#[tokio::test]
async fn batches_follow_numeric_transaction_order_across_digit_boundaries() {
    let db = TestDb::new().await;
    for (aggregate, transaction, position) in [("late", 10i64, 1i64), ("early", 9, 2), ("later", 100, 3)] {
        sqlx::query(
            "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
                                 metadata, transaction_id, global_position)
             overriding system value
             values ('Test', $1, 1, 'Tested', '1', '{}', '{}', $2::text::xid8, $3)",
        )
        .bind(aggregate)
        .bind(transaction.to_string())
        .bind(position)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let mut reader = LogReader::new(db.pool.clone(), LogPosition::START);
    let order: Vec<_> = reader.read_batch().await.unwrap().into_iter().map(|e| e.position.transaction_id).collect();
    assert_eq!(order, [9, 10, 100]);
    let last = LogPosition { transaction_id: 100, global_position: 3 };
    assert_eq!(reader.position(), last);
    assert!(reader.read_batch().await.unwrap().is_empty(), "nothing is read twice");
    // The newest event is found in the same order (a sort of the rendered id would find 9).
    for newest in [Newest::Committed, Newest::BelowHorizon, Newest::Before(101)] {
        assert_eq!(newest_position(&db.pool, newest).await.unwrap(), last, "{newest:?}");
    }
    let before_the_last = LogPosition { transaction_id: 10, global_position: 1 };
    assert_eq!(newest_position(&db.pool, Newest::Before(100)).await.unwrap(), before_the_last);
    assert_eq!(newest_position(&db.pool, Newest::Before(9)).await.unwrap(), LogPosition::START);
    db.drop().await;
}

/// `head` tells where the log ends in the reader's order and bounds without reading it or moving the
/// cursor: a follower with nobody to deliver to can skip to it.
#[tokio::test]
async fn the_head_is_known_without_reading_the_log() {
    let db = TestDb::new().await;
    let mut reader = LogReader::new(db.pool.clone(), LogPosition::START).with_batch_size(2);
    assert_eq!(reader.head().await.unwrap(), None, "an empty log has no head");
    for (aggregate, transaction, position) in [("late", 10i64, 1i64), ("early", 9, 2), ("later", 100, 3)] {
        sqlx::query(
            "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
                                 metadata, transaction_id, global_position)
             overriding system value
             values ('Test', $1, 1, 'Tested', '1', '{}', '{}', $2::text::xid8, $3)",
        )
        .bind(aggregate)
        .bind(transaction.to_string())
        .bind(position)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let head = LogPosition { transaction_id: 100, global_position: 3 };
    assert_eq!(reader.head().await.unwrap(), Some(head), "past any one batch");
    assert_eq!(reader.position(), LogPosition::START, "the cursor did not move");
    let first: Vec<_> = reader.read_batch().await.unwrap().into_iter().map(|e| e.position.transaction_id).collect();
    assert_eq!(first, [9, 10], "reading still starts where the cursor was");
    assert_eq!(reader.head().await.unwrap(), Some(head));
    reader.seek(head);
    assert_eq!(reader.head().await.unwrap(), None, "nothing after the head");
    assert!(reader.read_batch().await.unwrap().is_empty(), "skipped for good");

    // An open transaction holds the head back, as it holds back reading.
    // (The identity sequence has not moved past the positions given above: these take theirs explicitly.)
    let insert = "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
                                      metadata, global_position)
                  overriding system value values ('Test', $1, 1, 'Tested', '1', '{}', '{}', $2)";
    let mut open = db.pool.begin().await.unwrap();
    sqlx::query(insert).bind("open").bind(4i64).execute(&mut *open).await.unwrap();
    sqlx::query(insert).bind("after").bind(5i64).execute(&db.pool).await.unwrap();
    assert_eq!(reader.head().await.unwrap(), None, "above the open transaction's horizon");
    open.rollback().await.unwrap();
    db.drop().await;
}
