//! A `ledger serve` process killed (SIGKILL) while 32 clients send keyed deposits: group commits are in flight
//! when it dies. Afterwards every group is all or nothing (no event without its command record, no record
//! without its events), every acknowledged command is in the log once, and after a restart every request sent
//! again with its key is answered — an acknowledged one with its first answer — and applied once in all.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ledger_api::auth::{Role, TokenKeys};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

use crate::support::{admin_url, eventually, SECRET};

const CLIENTS: usize = 32;
const PORTFOLIOS: usize = 8;
/// Acknowledged deposits before the kill: enough for many groups to have committed and more to be in flight.
const ACKED_BEFORE_KILL: usize = 300;

const DEPOSIT: &str = "mutation($id: UUID!, $k: String!) {
    deposit(portfolioId: $id, amount: \"1\", idempotencyKey: $k) { lastPosition }
}";

struct Server {
    child: tokio::process::Child,
    base: String,
}

async fn serve(database_url: &str) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", database_url)
        .env_remove("KAFKA_BROKERS")
        .env("LEDGER_JWT_SECRET", SECRET)
        .env("LEDGER_RATE_LIMIT_PER_SECOND", "1000000")
        .env("LEDGER_RATE_LIMIT_BURST", "1000000")
        .env("LEDGER_RATE_LIMIT_PER_ADDRESS_PER_SECOND", "1000000")
        .env("LEDGER_RATE_LIMIT_PER_ADDRESS_BURST", "1000000")
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let ready =
        eventually(|| async { http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) })
            .await;
    assert!(ready, "ledger serve never became ready");
    Server { child, base }
}

async fn gql(http: &reqwest::Client, base: &str, token: &str, query: &str, variables: Value) -> reqwest::Result<Value> {
    http.post(format!("{base}/graphql"))
        .bearer_auth(token)
        .json(&json!({ "query": query, "variables": variables }))
        .send()
        .await?
        .json()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_killed_during_group_commits_leaves_every_group_whole_and_every_ack_once() {
    let admin = admin_url();
    let name = format!("ledger_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&admin).await.unwrap();
    sqlx::query(&format!("create database {name}")).execute(&mut conn).await.unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    let token =
        TokenKeys::new(SECRET).unwrap().issue("alice", Role::Trader, chrono::Duration::hours(1), chrono::Utc::now());
    let http = reqwest::Client::new();

    let mut server = serve(&url).await;
    let mut portfolios = Vec::new();
    for n in 0..PORTFOLIOS {
        let open = "mutation($k: String!) {
            openPortfolio(input: { baseCurrency: \"USD\", costBasisMethod: FIFO }, idempotencyKey: $k) { aggregateId }
        }";
        let response = gql(&http, &server.base, &token, open, json!({ "k": format!("open-{n}") })).await.unwrap();
        portfolios.push(response["data"]["openPortfolio"]["aggregateId"].as_str().expect("opened").to_string());
    }

    // 32 clients deposit with fresh keys until the server dies under them.
    let sent: Arc<Mutex<BTreeMap<String, String>>> = Arc::default(); // key → portfolio
    let acked: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default(); // key → first answer
    let acked_count = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (http, base, token) = (http.clone(), server.base.clone(), token.clone());
            let portfolio = portfolios[c % PORTFOLIOS].clone();
            let (sent, acked, acked_count) = (sent.clone(), acked.clone(), acked_count.clone());
            tokio::spawn(async move {
                for n in 0.. {
                    let key = format!("deposit-{c}-{n}");
                    sent.lock().unwrap().insert(key.clone(), portfolio.clone());
                    let variables = json!({ "id": portfolio, "k": key });
                    match gql(&http, &base, &token, DEPOSIT, variables).await {
                        Ok(response) => {
                            assert!(response.get("errors").is_none(), "a deposit was refused: {response}");
                            acked.lock().unwrap().insert(key, response["data"]["deposit"].clone());
                            acked_count.fetch_add(1, Ordering::SeqCst);
                        }
                        // The server is gone: this request's fate is unknown to the client.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    assert!(
        eventually(|| async { acked_count.load(Ordering::SeqCst) >= ACKED_BEFORE_KILL }).await,
        "the deposits never got going"
    );
    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    for client in clients {
        client.await.unwrap();
    }
    let sent = sent.lock().unwrap().clone();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= ACKED_BEFORE_KILL);

    // Every group is all or nothing: no deposit event without the command record that names it, no record
    // naming an event that is not there, and each deposit record names exactly one event.
    let pool = ledger::db::connect(&url, 4).await.unwrap();
    let orphan_events: i64 = sqlx::query_scalar(
        "select count(*) from events e
          where e.event_type = 'CashDeposited'
            and not exists (select 1 from command_log c, jsonb_array_elements(c.result->'events') x
                             where (x->>'event_id')::uuid = e.event_id)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(orphan_events, 0, "deposit events without their command record");
    let hollow_records: i64 = sqlx::query_scalar(
        "select count(*) from command_log c, jsonb_array_elements(c.result->'events') x
          where not exists (select 1 from events e where e.event_id = (x->>'event_id')::uuid)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(hollow_records, 0, "command records naming events that are not in the log");
    let records: Vec<(String, i32)> = sqlx::query_as(
        "select idempotency_key, jsonb_array_length(result->'events') from command_log
          where actor = 'alice' and command_type = 'DepositCash'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(records.iter().all(|(_, events)| *events == 1), "a deposit record with other than one event");
    let recorded: BTreeSet<String> = records.into_iter().map(|(key, _)| key).collect();
    for key in acked.keys() {
        assert!(recorded.contains(key), "acknowledged deposit {key} is not in the log");
    }
    assert!(recorded.iter().all(|key| sent.contains_key(key)), "a record of a deposit nobody sent");

    // A restart, and every request sent again with its key: each is answered, an acknowledged one with its
    // first answer, and each deposit is in the log once.
    let mut server = serve(&url).await;
    for (key, portfolio) in &sent {
        let response = gql(&http, &server.base, &token, DEPOSIT, json!({ "id": portfolio, "k": key })).await.unwrap();
        assert!(response.get("errors").is_none(), "{key} sent again was refused: {response}");
        if let Some(first) = acked.get(key) {
            assert_eq!(&response["data"]["deposit"], first, "{key} answered differently the second time");
        }
    }
    let deposits: Vec<(String, i64)> = sqlx::query_as(
        "select aggregate_id, count(*) from events where event_type = 'CashDeposited' group by aggregate_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let deposits: BTreeMap<String, i64> = deposits.into_iter().collect();
    for portfolio in &portfolios {
        let expected = sent.values().filter(|p| *p == portfolio).count() as i64;
        assert_eq!(deposits.get(portfolio).copied().unwrap_or(0), expected, "deposits into {portfolio}");
    }

    server.child.start_kill().unwrap();
    server.child.wait().await.unwrap();
    pool.close().await;
    sqlx::query(&format!("drop database if exists {name} with (force)")).execute(&mut conn).await.unwrap();
}
