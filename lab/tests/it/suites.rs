//! `ledger-lab bench`: the suites run with one command each and write their JSON.

use std::process::Command;

use sqlx::{Connection, PgConnection};

use crate::support::{admin_url, text, TestDb};

/// The batched-intake and end-to-end suites run with one command each against the real PostgreSQL and broker
/// and write their JSON: events committed through `cashBatch`, and every event of the e2e run delivered to the
/// read model and to the `logEvents` subscriber.
#[tokio::test]
async fn the_intake_and_e2e_suites_run_and_report() {
    let db = TestDb::new().await;
    let dir = std::env::temp_dir().join(format!("ledger-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ledger-lab"))
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("KAFKA_BROKERS", std::env::var("KAFKA_BROKERS").expect("the test broker (scripts/test)"))
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    };
    let intake_json = dir.join("intake.json");
    let intake = run(&[
        "bench",
        "intake",
        "--clients",
        "1",
        "--batch-size",
        "20",
        "--seconds",
        "1",
        "--runs",
        "1",
        "--json",
        intake_json.to_str().unwrap(),
    ]);
    assert!(intake.status.success(), "{}", text(&intake.stderr));
    let intake: serde_json::Value = serde_json::from_slice(&std::fs::read(&intake_json).unwrap()).unwrap();
    assert!(intake[0]["events"].as_u64().unwrap() >= 20, "{intake}");
    assert_eq!(intake[0]["events"].as_u64().unwrap() % 20, 0, "whole batches: {intake}");
    let deposits: i64 = sqlx::query_scalar("select count(*) from events where event_type = 'CashDeposited'")
        .fetch_one(&mut PgConnection::connect(&db.url).await.unwrap())
        .await
        .unwrap();
    assert_eq!(deposits as u64, intake[0]["events"].as_u64().unwrap(), "every reported event is in the log");

    let e2e_json = dir.join("e2e.json");
    let e2e = run(&["bench", "e2e", "--rate", "50", "--seconds", "2", "--json", e2e_json.to_str().unwrap()]);
    assert!(e2e.status.success(), "{}", text(&e2e.stderr));
    let e2e: serde_json::Value = serde_json::from_slice(&std::fs::read(&e2e_json).unwrap()).unwrap();
    assert_eq!(e2e["commands"], 100, "{e2e}");
    assert_eq!(e2e["subscriber_events"], 100, "{e2e}");
    assert!(e2e["subscriber_p99_ms"].as_f64().unwrap() > 0.0, "{e2e}");
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!("drop database if exists {}_bench with (force)", db.name)).execute(&mut admin).await.unwrap();
    std::fs::remove_dir_all(dir).ok();
    db.drop().await;
}
