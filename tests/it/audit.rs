//! The audit trail against a real PostgreSQL: sealing while the log is written, exports in every format read
//! back and compared with the log event by event (also by pyarrow and by the documented Python check),
//! filters, tampering of files and of the database caught at the right position, the append-only log.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use arrow_array::{
    Array, Decimal128Array, FixedSizeBinaryArray, Int64Array, StringArray, TimestampMicrosecondArray, UInt64Array,
};
use futures::TryStreamExt;
use ledger::audit::canonical::format_recorded_at;
use ledger::audit::{
    seal_until_head, AuditError, ChainHash, ExportFilter, ExportFormat, ExportOptions, Failure, Sealer, SealerConfig,
};
use ledger::log::{LogPosition, LogReader, RecordedEvent};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{json, Value};

use crate::support::system::{start_process_manager, trade, Running};
use crate::support::workload::Workload;
use crate::support::*;

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!("ledger-audit-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The whole log, in commit order.
async fn read_log(db: &TestDb) -> Vec<RecordedEvent> {
    let mut reader = LogReader::new(db.pool.clone(), LogPosition::START);
    let mut events = Vec::new();
    loop {
        let batch = reader.read_batch().await.unwrap();
        if batch.is_empty() {
            return events;
        }
        events.extend(batch);
    }
}

/// `(global_position, previous hash, chain hash)` of every sealed event, in chain order.
async fn sealed_rows(db: &TestDb) -> Vec<(i64, ChainHash, ChainHash)> {
    let rows: Vec<(i64, Vec<u8>, Vec<u8>)> =
        sqlx::query_as("select global_position, previous_hash, chain_hash from audit_chain order by chain_index")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(p, prev, hash)| (p, ChainHash::from_slice(&prev).unwrap(), ChainHash::from_slice(&hash).unwrap()))
        .collect()
}

/// The event's fields as an export must show them.
fn expected_fields(event: &RecordedEvent) -> Value {
    json!({
        "global_position": event.position.global_position,
        "transaction_id": event.position.transaction_id,
        "event_id": event.event_id.to_string(),
        "aggregate_type": event.aggregate_type,
        "aggregate_id": event.aggregate_id,
        "sequence": event.sequence,
        "event_type": event.event_type,
        "event_version": event.event_version,
        "recorded_at": format_recorded_at(&event.recorded_at),
        "payload": event.payload,
        "metadata": event.metadata,
    })
}

/// One exported record read back: its fields (as in [`expected_fields`]) and its two hashes.
#[derive(Debug)]
struct ReadBack {
    fields: Value,
    previous_hash: ChainHash,
    chain_hash: ChainHash,
}

fn read_jsonl(path: &Path) -> Vec<ReadBack> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let mut object: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
            let previous_hash = object.remove("previous_hash").unwrap().as_str().unwrap().parse().unwrap();
            let chain_hash = object.remove("chain_hash").unwrap().as_str().unwrap().parse().unwrap();
            ReadBack { fields: Value::Object(object), previous_hash, chain_hash }
        })
        .collect()
}

fn read_csv(path: &Path) -> Vec<ReadBack> {
    let mut reader = csv::Reader::from_path(path).unwrap();
    assert_eq!(reader.headers().unwrap().iter().collect::<Vec<_>>(), ledger::audit::export::CSV_COLUMNS);
    reader
        .records()
        .map(|record| {
            let r = record.unwrap();
            ReadBack {
                fields: json!({
                    "global_position": r[0].parse::<i64>().unwrap(),
                    "transaction_id": r[1].parse::<u64>().unwrap(),
                    "event_id": &r[2],
                    "aggregate_type": &r[3],
                    "aggregate_id": &r[4],
                    "sequence": r[5].parse::<i64>().unwrap(),
                    "event_type": &r[6],
                    "event_version": &r[7],
                    "recorded_at": &r[8],
                    "payload": serde_json::from_str::<Value>(&r[9]).unwrap(),
                    "metadata": serde_json::from_str::<Value>(&r[10]).unwrap(),
                }),
                previous_hash: r[11].parse().unwrap(),
                chain_hash: r[12].parse().unwrap(),
            }
        })
        .collect()
}

/// Reads a Parquet export with the parquet crate's Arrow reader; also checks the typed decimal columns.
fn read_parquet(path: &Path) -> Vec<ReadBack> {
    let file = std::fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let mut records = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let col = |name: &str| batch.column_by_name(name).unwrap().clone();
        let int = |name: &str| col(name).as_any().downcast_ref::<Int64Array>().unwrap().clone();
        let text = |name: &str| col(name).as_any().downcast_ref::<StringArray>().unwrap().clone();
        let hash = |name: &str| col(name).as_any().downcast_ref::<FixedSizeBinaryArray>().unwrap().clone();
        let (positions, sequences) = (int("global_position"), int("sequence"));
        let transactions = col("transaction_id").as_any().downcast_ref::<UInt64Array>().unwrap().clone();
        let times = col("recorded_at").as_any().downcast_ref::<TimestampMicrosecondArray>().unwrap().clone();
        assert_eq!(times.timezone(), Some("UTC"));
        let quantities = col("quantity").as_any().downcast_ref::<Decimal128Array>().unwrap().clone();
        assert_eq!((quantities.precision(), quantities.scale()), (38, 18));
        let (event_ids, types, ids, event_types, versions, payloads, metadata, symbols) = (
            text("event_id"),
            text("aggregate_type"),
            text("aggregate_id"),
            text("event_type"),
            text("event_version"),
            text("payload"),
            text("metadata"),
            text("symbol"),
        );
        let (previous, chain) = (hash("previous_hash"), hash("chain_hash"));
        for i in 0..batch.num_rows() {
            let payload: Value = serde_json::from_str(payloads.value(i)).unwrap();
            // The typed columns repeat the payload's amounts exactly.
            let body = payload.as_object().and_then(|o| o.values().next()).cloned().unwrap_or_default();
            match body.get("quantity").and_then(Value::as_str) {
                Some(q) => {
                    let expected: rust_decimal::Decimal = q.parse().unwrap();
                    let stored = rust_decimal::Decimal::from_i128_with_scale(quantities.value(i), 18);
                    assert!(quantities.is_valid(i) && stored == expected, "quantity {q} stored as {stored}");
                }
                None => assert!(quantities.is_null(i)),
            }
            assert_eq!(body.get("symbol").and_then(Value::as_str), symbols.is_valid(i).then(|| symbols.value(i)));
            let at = chrono::DateTime::from_timestamp_micros(times.value(i)).unwrap();
            records.push(ReadBack {
                fields: json!({
                    "global_position": positions.value(i),
                    "transaction_id": transactions.value(i),
                    "event_id": event_ids.value(i),
                    "aggregate_type": types.value(i),
                    "aggregate_id": ids.value(i),
                    "sequence": sequences.value(i),
                    "event_type": event_types.value(i),
                    "event_version": versions.value(i),
                    "recorded_at": format_recorded_at(&at),
                    "payload": payload,
                    "metadata": serde_json::from_str::<Value>(metadata.value(i)).unwrap(),
                }),
                previous_hash: ChainHash::from_slice(previous.value(i)).unwrap(),
                chain_hash: ChainHash::from_slice(chain.value(i)).unwrap(),
            });
        }
    }
    records
}

fn read_back(format: ExportFormat, dir: &Path) -> Vec<ReadBack> {
    let path = dir.join(format.file_name());
    match format {
        ExportFormat::Jsonl => read_jsonl(&path),
        ExportFormat::Csv => read_csv(&path),
        ExportFormat::Parquet => read_parquet(&path),
    }
}

async fn export_to(db: &TestDb, format: ExportFormat, dir: PathBuf, filter: ExportFilter) -> ledger::audit::Manifest {
    let options = ExportOptions { format, out_dir: dir, filter };
    ledger::audit::export(&db.pool, &options, &mut |_, _| {}).await.unwrap()
}

fn verify(dir: &Path) -> Result<ledger::audit::DirReport, AuditError> {
    ledger::audit::verify_dir(dir, &mut |_, _| {})
}

fn failure(dir: &Path) -> Failure {
    match verify(dir) {
        Err(AuditError::Tampered(failure)) => failure,
        other => panic!("expected verification to fail, got {other:?}"),
    }
}

/// Compares what an export holds with the log, event by event, and with the sealed hashes.
fn assert_matches_log(records: &[ReadBack], log: &[&RecordedEvent], sealed: &[(i64, ChainHash, ChainHash)]) {
    assert_eq!(records.len(), log.len(), "record count");
    let by_position: std::collections::HashMap<i64, (ChainHash, ChainHash)> =
        sealed.iter().map(|(p, prev, hash)| (*p, (*prev, *hash))).collect();
    for (record, event) in records.iter().zip(log) {
        assert_eq!(record.fields, expected_fields(event), "event at position {}", event.position.global_position);
        let (previous, hash) = by_position[&event.position.global_position];
        assert_eq!((record.previous_hash, record.chain_hash), (previous, hash));
    }
}

/// Real trading through the command service and the process manager, raw concurrent writers whose
/// transactions commit out of order or roll back, and a sealer following it all live.
async fn random_workload(db: &TestDb, seed: u64) -> crate::support::system::TradingSummary {
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let sealer = {
        let pool = db.pool.clone();
        let config = SealerConfig { checkpoint_every_events: 40, ..SealerConfig::default() };
        Running::spawn(|cancel| async move { Sealer::new(pool, config).run(cancel).await.unwrap() })
    };
    let raw = Workload {
        writers: 3,
        aggregates_per_writer: 3,
        transactions_per_writer: 15,
        events_per_transaction_min: 1,
        events_per_transaction_max: 4,
        hold_one_in: 4,
        rollback_one_in: 6,
        seed,
    };
    let (summary, _) = tokio::join!(trade(&commands, &["ACME", "BOLT"], 3, 10, seed), raw.run(db.pool.clone()));
    // The fills are booked on the portfolios by the process manager after `trade` returns.
    wait_process_manager_idle(&db.pool).await;
    pm.stop().await;
    sealer.stop().await;
    seal_until_head(&db.pool).await.unwrap();
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_workload_round_trips_through_every_format() {
    let db = TestDb::new().await;
    random_workload(&db, 7).await;
    let log = read_log(&db).await;
    assert!(log.len() > 100, "workload too small: {}", log.len());
    assert!(log.iter().any(|e| e.event_type == "ExecutionApplied"), "the workload filled orders");
    let sealed = sealed_rows(&db).await;
    assert_eq!(sealed.len(), log.len(), "every committed event is sealed");
    let checkpoints: i64 =
        sqlx::query_scalar("select count(*) from audit_checkpoints").fetch_one(&db.pool).await.unwrap();
    assert!(checkpoints >= (log.len() / 40) as i64, "{checkpoints} checkpoints for {} events", log.len());

    let all: Vec<&RecordedEvent> = log.iter().collect();
    let tmp = TempDir::new();
    for format in ExportFormat::ALL {
        let dir = tmp.join(&format.to_string());
        let manifest = export_to(&db, format, dir.clone(), ExportFilter::default()).await;
        assert_eq!(manifest.count as usize, log.len());
        assert_eq!(manifest.first_position, Some(log[0].position.global_position));
        assert_eq!(manifest.last_chain_hash, Some(sealed.last().unwrap().2));
        assert!(manifest.contiguous);
        assert_matches_log(&read_back(format, &dir), &all, &sealed);
        let report = verify(&dir).unwrap_or_else(|e| panic!("{format}: {e}"));
        assert_eq!(report.records as usize, log.len());
    }
    let report = ledger::audit::verify_db(&db.pool, &mut |_, _| {}).await.unwrap();
    assert_eq!(report.events as usize, log.len());
    assert_eq!(report.unsealed, 0);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_select_positions_times_an_aggregate_or_a_portfolio_with_its_orders() {
    let db = TestDb::new().await;
    let summary = random_workload(&db, 11).await;
    let log = read_log(&db).await;
    let sealed = sealed_rows(&db).await;
    let tmp = TempDir::new();

    let mut by_position: Vec<&RecordedEvent> = log.iter().collect();
    by_position.sort_by_key(|e| e.position.global_position);
    let (low, high) =
        (by_position[log.len() / 4].position.global_position, by_position[log.len() / 2].position.global_position);
    let mut by_time: Vec<&RecordedEvent> = log.iter().collect();
    by_time.sort_by_key(|e| e.recorded_at);
    let (from, to) = (by_time[log.len() / 3].recorded_at, by_time[2 * log.len() / 3].recorded_at);
    let portfolio = summary.portfolios[0];
    let orders: HashSet<String> = log
        .iter()
        .filter(|e| e.event_type == "OrderPlaced" && e.payload["OrderPlaced"]["portfolio_id"] == portfolio.to_string())
        .map(|e| e.aggregate_id.clone())
        .collect();
    assert!(!orders.is_empty(), "the portfolio placed orders");
    let aggregate = log.iter().find(|e| e.aggregate_type == "Test").unwrap().aggregate_id.clone();

    type Selector<'a> = Box<dyn Fn(&RecordedEvent) -> bool + 'a>;
    let cases: Vec<(&str, ExportFilter, Selector)> = vec![
        (
            "positions",
            ExportFilter { from_position: Some(low), to_position: Some(high), ..Default::default() },
            Box::new(move |e| (low..=high).contains(&e.position.global_position)),
        ),
        (
            "times",
            ExportFilter { from_time: Some(from), to_time: Some(to), ..Default::default() },
            Box::new(move |e| e.recorded_at >= from && e.recorded_at < to),
        ),
        (
            "aggregate",
            ExportFilter { aggregate_id: Some(aggregate.clone()), ..Default::default() },
            Box::new(|e| e.aggregate_id == aggregate),
        ),
        (
            "portfolio",
            ExportFilter { portfolio_id: Some(portfolio.0), ..Default::default() },
            Box::new(|e| e.aggregate_id == portfolio.to_string() || orders.contains(&e.aggregate_id)),
        ),
    ];
    for (name, filter, selected) in cases {
        let expected: Vec<&RecordedEvent> = log.iter().filter(|e| selected(e)).collect();
        assert!(!expected.is_empty(), "{name}: the filter selects something");
        for format in [ExportFormat::Jsonl, ExportFormat::Parquet] {
            let dir = tmp.join(&format!("{name}-{format}"));
            let manifest = export_to(&db, format, dir.clone(), filter.clone()).await;
            assert_eq!(manifest.filters, filter);
            assert_eq!(manifest.count as usize, expected.len(), "{name}");
            assert_matches_log(&read_back(format, &dir), &expected, &sealed);
            verify(&dir).unwrap_or_else(|e| panic!("{name} {format}: {e}"));
        }
    }
    db.drop().await;
}

/// Writes the JSON Lines export the documented Python check reads, then runs the snippet from docs/audit.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_python_check_verifies_an_export_and_catches_a_change() {
    let python = std::env::var("LEDGER_PYTHON").unwrap_or_else(|_| "python3".into());
    if Command::new(&python).arg("--version").output().is_err() {
        eprintln!("SKIPPED: no Python interpreter ({python}); set LEDGER_PYTHON or install python3");
        return;
    }
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/audit.md")).unwrap();
    let snippet = docs
        .split("<!-- check-jsonl.py -->")
        .nth(1)
        .and_then(|s| s.split("```python").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("docs/audit.md holds the check-jsonl.py snippet");
    let db = TestDb::new().await;
    random_workload(&db, 3).await;
    let tmp = TempDir::new();
    let dir = tmp.join("jsonl");
    let manifest = export_to(&db, ExportFormat::Jsonl, dir.clone(), ExportFilter::default()).await;
    let script = tmp.join("check-jsonl.py");
    std::fs::write(&script, snippet).unwrap();
    let data = dir.join("events.jsonl");
    let run = |path: &Path| Command::new(&python).arg(&script).arg(path).output().unwrap();
    let intact = run(&data);
    let stdout = String::from_utf8_lossy(&intact.stdout);
    assert!(intact.status.success(), "{stdout}{}", String::from_utf8_lossy(&intact.stderr));
    assert!(stdout.contains(&format!("{} records verified", manifest.count)), "{stdout}");
    assert!(stdout.contains(&manifest.last_chain_hash.unwrap().to_hex()), "{stdout}");

    let text = std::fs::read_to_string(&data).unwrap();
    let line = text.lines().position(|l| l.contains("\"ExecutionApplied\"")).unwrap();
    let position = read_jsonl(&data)[line].fields["global_position"].as_i64().unwrap();
    let tampered: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| if i == line { l.replacen("\"fee\":\"0.25\"", "\"fee\":\"0.24\"", 1) } else { l.to_string() })
        .collect();
    assert_ne!(tampered[line], text.lines().nth(line).unwrap(), "the fee was changed");
    let copy = tmp.join("tampered.jsonl");
    std::fs::write(&copy, tampered.join("\n") + "\n").unwrap();
    let caught = run(&copy);
    assert!(!caught.status.success());
    let stderr = String::from_utf8_lossy(&caught.stderr);
    assert!(stderr.contains(&format!("position {position}:")), "{stderr}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyarrow_reads_the_parquet_export_with_typed_columns_and_the_same_chain() {
    let Ok(python) = std::env::var("LEDGER_PYTHON") else {
        eprintln!("SKIPPED: LEDGER_PYTHON is not set (./scripts/test sets it to a venv with pyarrow)");
        return;
    };
    let db = TestDb::new().await;
    random_workload(&db, 5).await;
    let log = read_log(&db).await;
    let tmp = TempDir::new();
    let dir = tmp.join("parquet");
    export_to(&db, ExportFormat::Parquet, dir.clone(), ExportFilter::default()).await;
    let positions: Vec<i64> = log.iter().map(|e| e.position.global_position).collect();
    let expected = tmp.join("positions.json");
    std::fs::write(&expected, serde_json::to_vec(&positions).unwrap()).unwrap();
    // An independent reader: pyarrow's types, and the chain recomputed from the columns in Python.
    let script = r#"
import hashlib, json, sys
import pyarrow.parquet as pq
table = pq.read_table(sys.argv[1])
positions = json.load(open(sys.argv[2]))
assert table.num_rows == len(positions), (table.num_rows, len(positions))
assert table.column("global_position").to_pylist() == positions
types = {field.name: str(field.type) for field in table.schema}
assert types["recorded_at"] == "timestamp[us, tz=UTC]", types
assert types["transaction_id"] == "uint64", types
assert types["quantity"] == "decimal128(38, 18)", types
assert types["chain_hash"] == "fixed_size_binary[32]", types
previous = bytes(32)
for row in table.to_pylist():
    record = {k: row[k] for k in ("aggregate_id", "aggregate_type", "event_id", "event_type", "event_version",
                                  "global_position", "sequence", "transaction_id")}
    record["payload"] = json.loads(row["payload"])
    record["metadata"] = json.loads(row["metadata"])
    record["recorded_at"] = row["recorded_at"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert row["previous_hash"] == previous, row["global_position"]
    assert hashlib.sha256(previous + canonical).digest() == row["chain_hash"], row["global_position"]
    previous = row["chain_hash"]
print("pyarrow ok", table.num_rows)
"#;
    let output = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(dir.join("events.parquet"))
        .arg(&expected)
        .output()
        .expect("run LEDGER_PYTHON");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("pyarrow ok {}", log.len())), "{stdout}");
    db.drop().await;
}

/// Events with payloads that have digits to change, written in a few transactions, sealed and exported.
struct Exported {
    db: TestDb,
    tmp: TempDir,
    dir: PathBuf,
    /// Global positions in file order.
    positions: Vec<i64>,
}

async fn exported(format: ExportFormat) -> Exported {
    let db = TestDb::new().await;
    for chunk in 0..4i64 {
        sqlx::query(
            "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             select 'Test', 'agg-' || (g % 5), g / 5 + 1, 'Tested', '1',
                    jsonb_build_object('Tested', jsonb_build_object('amount', '12.50', 'n', g)),
                    '{\"actor\": \"tamper-test\"}'
               from generate_series($1::bigint, $2::bigint) g",
        )
        .bind(chunk * 15)
        .bind(chunk * 15 + 14)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    seal_until_head(&db.pool).await.unwrap();
    let tmp = TempDir::new();
    let dir = tmp.join("export");
    let manifest = export_to(&db, format, dir.clone(), ExportFilter::default()).await;
    assert_eq!(manifest.count, 60);
    let positions = read_log(&db).await.iter().map(|e| e.position.global_position).collect();
    Exported { db, tmp, dir, positions }
}

impl Exported {
    /// A copy of the export to tamper with.
    fn copy(&self, name: &str) -> PathBuf {
        let copy = self.tmp.join(name);
        std::fs::create_dir_all(&copy).unwrap();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        copy
    }

    /// Rewrites the lines of the data file in a copy.
    fn with_lines(&self, name: &str, file: &str, change: impl FnOnce(&mut Vec<String>)) -> PathBuf {
        let copy = self.copy(name);
        let path = copy.join(file);
        let mut lines: Vec<String> = std::fs::read_to_string(&path).unwrap().lines().map(String::from).collect();
        change(&mut lines);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        copy
    }

    fn with_manifest(&self, name: &str, change: impl FnOnce(&mut Value)) -> PathBuf {
        let copy = self.copy(name);
        let path = copy.join("manifest.json");
        let mut manifest: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        change(&mut manifest);
        std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
        copy
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_to_a_jsonl_export_fails_verification_at_its_position() {
    let e = exported(ExportFormat::Jsonl).await;
    let p = |line: usize| e.positions[line - 1]; // the position on a (1-based) line of the original file
    verify(&e.dir).unwrap();

    // One byte of a payload (line 7): that record fails.
    let dir = e.with_lines("byte", "events.jsonl", |lines| {
        assert!(lines[6].contains("\"amount\":\"12.50\""));
        lines[6] = lines[6].replacen("\"amount\":\"12.50\"", "\"amount\":\"12.51\"", 1);
    });
    let f = failure(&dir);
    assert_eq!((f.position, f.after_position), (Some(p(7)), Some(p(6))), "{f}");
    assert!(f.location.ends_with("line 7") && f.reason.contains("does not match its chain hash"), "{f}");

    // A deleted line (10): the record after the gap does not follow the one before it.
    let dir = e.with_lines("deleted", "events.jsonl", |lines| {
        lines.remove(9);
    });
    let f = failure(&dir);
    assert_eq!((f.position, f.after_position), (Some(p(11)), Some(p(9))), "{f}");
    assert!(f.reason.contains("does not follow"), "{f}");

    // Two lines swapped (20 and 21): the first record out of place fails.
    let dir = e.with_lines("swapped", "events.jsonl", |lines| lines.swap(19, 20));
    let f = failure(&dir);
    assert_eq!((f.position, f.after_position), (Some(p(21)), Some(p(19))), "{f}");
    assert!(f.location.ends_with("line 20"), "{f}");

    // Truncated inside line 30: the failure is just after the last whole record.
    let dir = e.copy("truncated");
    let path = dir.join("events.jsonl");
    let text = std::fs::read(&path).unwrap();
    let line_starts: Vec<usize> =
        std::iter::once(0).chain(text.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1)).collect();
    std::fs::write(&path, &text[..line_starts[29] + 40]).unwrap();
    let f = failure(&dir);
    assert_eq!((f.position, f.after_position), (None, Some(p(29))), "{f}");
    assert!(f.location.ends_with("line 30") && f.reason.contains("truncated"), "{f}");

    // Truncated at a line end (the last five records gone): the manifest's count gives it away.
    let dir = e.with_lines("short", "events.jsonl", |lines| lines.truncate(55));
    let f = failure(&dir);
    assert_eq!((f.position, f.after_position), (None, Some(p(55))), "{f}");
    assert!(f.location == "manifest.json" && f.reason.contains("lists 60 records"), "{f}");

    // Manifest edits: count, last hash, file digest; and a manifest that is gone or garbled.
    let f = failure(&e.with_manifest("count", |m| m["count"] = json!(61)));
    assert!(f.location == "manifest.json" && f.reason.contains("lists 61 records"), "{f}");
    let other = ChainHash([7; 32]).to_hex();
    let f = failure(&e.with_manifest("last-hash", |m| m["last_chain_hash"] = json!(other)));
    assert_eq!(f.position, Some(p(60)), "{f}");
    assert!(f.reason.contains("last_chain_hash"), "{f}");
    let f = failure(&e.with_manifest("digest", |m| m["files"][0]["sha256"] = json!("ab".repeat(32))));
    assert!(f.location == "events.jsonl" && f.reason.contains("is not the one the manifest describes"), "{f}");
    let f = failure(&e.with_manifest("format", |m| m["format"] = json!("csv")));
    assert!(f.location == "manifest.json", "{f}");
    let dir = e.copy("garbled");
    std::fs::write(dir.join("manifest.json"), "{\"count\": ").unwrap();
    assert!(failure(&dir).reason.contains("not a valid manifest"));
    let dir = e.copy("no-manifest");
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    match verify(&dir) {
        Err(AuditError::Invalid(message)) => assert!(message.contains("has no manifest.json"), "{message}"),
        other => panic!("expected a missing-manifest error, got {other:?}"),
    }
    e.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_to_csv_and_parquet_exports_fail_verification() {
    let e = exported(ExportFormat::Csv).await;
    let p = |record: usize| e.positions[record - 1];
    verify(&e.dir).unwrap();
    // CSV line n + 1 holds record n (line 1 is the header).
    let dir = e.with_lines("byte", "events.csv", |lines| {
        lines[7] = lines[7].replacen("12.50", "12.51", 1);
    });
    let f = failure(&dir);
    assert_eq!(f.position, Some(p(7)), "{f}");
    assert!(f.location.ends_with("line 8"), "{f}");
    let dir = e.with_lines("deleted", "events.csv", |lines| {
        lines.remove(10);
    });
    assert_eq!(failure(&dir).position, Some(p(11)));
    let dir = e.with_lines("swapped", "events.csv", |lines| lines.swap(30, 31));
    assert_eq!(failure(&dir).position, Some(p(31)));
    let dir = e.copy("truncated");
    let path = dir.join("events.csv");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 30]).unwrap();
    let f = failure(&dir);
    assert_eq!(f.after_position, Some(p(59)), "{f}");
    e.db.drop().await;

    let e = exported(ExportFormat::Parquet).await;
    verify(&e.dir).unwrap();
    let dir = e.copy("byte");
    let path = dir.join("events.parquet");
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    failure(&dir);
    let dir = e.copy("truncated");
    let path = dir.join("events.parquet");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    assert!(failure(&dir).reason.contains("not a readable Parquet file"));
    e.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_db_names_the_position_of_a_row_changed_by_a_superuser() {
    let e = exported(ExportFormat::Jsonl).await;
    let db = &e.db;
    let report = ledger::audit::verify_db(&db.pool, &mut |_, _| {}).await.unwrap();
    assert_eq!(report.events, 60);
    let victim = e.positions[23];

    // A superuser bypasses the append-only trigger (replica mode) and edits one payload.
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("set session_replication_role = replica").execute(&mut *conn).await.unwrap();
    sqlx::query(
        "update events set payload = jsonb_set(payload, '{Tested,amount}', '\"12.49\"') where global_position = $1",
    )
    .bind(victim)
    .execute(&mut *conn)
    .await
    .unwrap();
    let failure = match ledger::audit::verify_db(&db.pool, &mut |_, _| {}).await {
        Err(AuditError::Tampered(failure)) => failure,
        other => panic!("expected a failure, got {other:?}"),
    };
    assert_eq!(failure.position, Some(victim), "{failure}");
    assert!(failure.reason.contains("does not hash to its sealed chain hash"), "{failure}");
    // An export taken now carries the changed event with its sealed hash: the file fails at that position too.
    let dir = e.tmp.join("after-change");
    export_to(db, ExportFormat::Jsonl, dir.clone(), ExportFilter::default()).await;
    assert_eq!(self::failure(&dir).position, Some(victim));

    // Put it back, then delete an earlier event: verify names the deleted position.
    sqlx::query(
        "update events set payload = jsonb_set(payload, '{Tested,amount}', '\"12.50\"') where global_position = $1",
    )
    .bind(victim)
    .execute(&mut *conn)
    .await
    .unwrap();
    ledger::audit::verify_db(&db.pool, &mut |_, _| {}).await.unwrap();
    let deleted = e.positions[10];
    sqlx::query("delete from events where global_position = $1").bind(deleted).execute(&mut *conn).await.unwrap();
    let failure = match ledger::audit::verify_db(&db.pool, &mut |_, _| {}).await {
        Err(AuditError::Tampered(failure)) => failure,
        other => panic!("expected a failure, got {other:?}"),
    };
    assert_eq!(failure.position, Some(deleted), "{failure}");
    assert!(failure.reason.contains("missing from the log"), "{failure}");
    sqlx::query("set session_replication_role = origin").execute(&mut *conn).await.unwrap();
    drop(conn);
    e.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_log_and_the_chain_refuse_update_delete_and_truncate() {
    let e = exported(ExportFormat::Jsonl).await;
    for statement in [
        "update events set payload = '{}' where global_position = (select min(global_position) from events)",
        "delete from events where global_position = (select min(global_position) from events)",
        "delete from events where false",
        "truncate events",
        "update audit_chain set chain_hash = previous_hash where chain_index = 1",
        "delete from audit_chain",
        "delete from audit_checkpoints",
    ] {
        let error = sqlx::query(statement).execute(&e.db.pool).await.expect_err(statement);
        let db_error = error.as_database_error().expect("a database error");
        assert_eq!(db_error.code().as_deref(), Some("42501"), "{statement}: {db_error}");
        assert!(db_error.message().contains("append-only"), "{statement}: {db_error}");
    }
    assert_eq!(e.db.count_events().await, 60);
    // Inserting stays possible (the command service and postgres-es only insert).
    crate::support::workload::insert_event(&mut e.db.pool.acquire().await.unwrap(), "agg-new", 1).await;
    assert_eq!(e.db.count_events().await, 61);
    e.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sealer_is_active_a_standby_takes_over_and_a_killed_sealer_leaves_a_sound_chain() {
    let db = TestDb::new().await;
    let config =
        SealerConfig { checkpoint_every_events: 25, poll_interval_ms: 20, standby_poll_ms: 100, ..Default::default() };
    let start = |config: SealerConfig| {
        let sealer = Sealer::new(db.pool.clone(), config);
        let status = sealer.status();
        (Running::spawn(|cancel| async move { sealer.run(cancel).await.unwrap() }), status)
    };
    let (first, first_status) = start(config.clone());
    let (second, second_status) = start(config.clone());
    let workload = |seed| Workload {
        writers: 3,
        aggregates_per_writer: 2,
        transactions_per_writer: 15,
        events_per_transaction_min: 1,
        events_per_transaction_max: 5,
        hold_one_in: 5,
        rollback_one_in: 8,
        seed,
    };
    workload(1).run(db.pool.clone()).await;
    let chain_length = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from audit_chain").fetch_one(&db.pool).await.unwrap()
    };
    let total = db.count_events().await;
    assert!(eventually(|| async { chain_length().await == total }).await);
    let active = |s: &ledger::audit::SealerStatus| s.active.load(std::sync::atomic::Ordering::SeqCst);
    assert!(active(&first_status) ^ active(&second_status), "exactly one sealer is active");
    let (active_one, standby, standby_status) =
        if active(&first_status) { (first, second, second_status) } else { (second, first, first_status) };

    // Kill the active sealer hard (its task aborted wherever it is) while the log grows; the standby takes over.
    let writing = tokio::spawn(workload(2).run(db.pool.clone()));
    tokio::time::sleep(Duration::from_millis(30)).await;
    active_one.kill().await;
    writing.await.unwrap();
    let total = db.count_events().await;
    assert!(eventually(|| async { chain_length().await == total }).await);
    assert!(active(&standby_status), "the standby took over");
    standby.stop().await;

    let report = ledger::audit::verify_db(&db.pool, &mut |_, _| {}).await.unwrap();
    assert_eq!(report.events, total);
    assert!(report.checkpoints as i64 >= total / 25, "{} checkpoints for {total} events", report.checkpoints);
    let gaps: Vec<i64> = sqlx::query_scalar(
        "select event_count - lag(event_count, 1, 0::bigint) over (order by event_count) from audit_checkpoints",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(gaps.iter().all(|gap| *gap <= 25), "a checkpoint at least every 25 events: {gaps:?}");
    let log = read_log(&db).await;
    let sealed = sealed_rows(&db).await;
    let chain_order: Vec<i64> = sealed.iter().map(|r| r.0).collect();
    let commit_order: Vec<i64> = log.iter().map(|e| e.position.global_position).collect();
    assert_eq!(chain_order, commit_order, "the chain follows the commit order");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jsonl_stream_yields_the_bytes_of_the_export_file() {
    let e = exported(ExportFormat::Jsonl).await;
    let stream = ledger::audit::jsonl_stream(e.db.pool.clone(), ExportFilter::default()).await.unwrap();
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let streamed: Vec<u8> = chunks.concat();
    assert_eq!(streamed, std::fs::read(e.dir.join("events.jsonl")).unwrap());
    let bad = ExportFilter { from_position: Some(9), to_position: Some(3), ..Default::default() };
    match ledger::audit::jsonl_stream(e.db.pool.clone(), bad).await {
        Err(error) => {
            assert!(error.is_user_error() && error.to_string().contains("--from-position 9 is after"), "{error}")
        }
        Ok(_) => panic!("a bad filter is refused before streaming"),
    }
    e.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_export_requests_are_refused_with_clear_errors() {
    let e = exported(ExportFormat::Jsonl).await;
    let refuse = |dir: PathBuf, filter: ExportFilter| {
        let pool = e.db.pool.clone();
        async move {
            let options = ExportOptions { format: ExportFormat::Csv, out_dir: dir, filter };
            ledger::audit::export(&pool, &options, &mut |_, _| {}).await.unwrap_err().to_string()
        }
    };
    let message = refuse(e.dir.clone(), ExportFilter::default()).await;
    assert!(message.contains("already holds an export"), "{message}");
    let file = e.tmp.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let message = refuse(file, ExportFilter::default()).await;
    assert!(message.contains("exists and is not a directory"), "{message}");
    let message = refuse(PathBuf::from("/proc/ledger-audit-cannot-create"), ExportFilter::default()).await;
    assert!(message.contains("cannot create the export directory /proc/ledger-audit-cannot-create"), "{message}");
    let bad = ExportFilter { from_position: Some(0), ..Default::default() };
    let message = refuse(e.tmp.join("bad-filter"), bad).await;
    assert!(message.contains("--from-position must be a log position"), "{message}");
    assert!(!e.tmp.join("bad-filter").exists(), "nothing is written for a bad filter");
    // An export that matches nothing is still a valid export.
    let empty = ExportFilter { aggregate_id: Some("no-such-aggregate".into()), ..Default::default() };
    let manifest = export_to(&e.db, ExportFormat::Parquet, e.tmp.join("empty"), empty).await;
    assert_eq!((manifest.count, manifest.first_position, manifest.contiguous), (0, None, false));
    assert_eq!(verify(&e.tmp.join("empty")).unwrap().records, 0);
    e.db.drop().await;
}
