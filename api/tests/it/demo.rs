//! `ledger demo` run as users run it: with nothing but PostgreSQL configured (its in-process Kafka), it reaches
//! positions with P&L over GraphQL and stops cleanly on Ctrl-C; without PostgreSQL it says so on one
//! line; and its dashboard works in headless Chromium (prices move, an order fills, its position appears).

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{admin_url, CONDITION_WAIT_MAX};

struct Demo {
    child: Child,
    database: String,
    base: String,
    dashboard: String,
    admin_token: String,
    started: Instant,
}

impl Demo {
    /// Starts `ledger demo` on a fresh database, with KAFKA_BROKERS unset, and reads its URLs and tokens.
    async fn start() -> Demo {
        Self::start_with(&[]).await
    }

    /// As [`Demo::start`], with more arguments.
    async fn start_with(extra: &[&str]) -> Demo {
        let admin = admin_url();
        let database = format!("ledger_test_{}", uuid::Uuid::new_v4().simple());
        let url = format!("{}/{database}", admin.rsplit_once('/').unwrap().0);
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(["demo", "--listen", "127.0.0.1:0", "--tick-ms", "200", "--bot-pace-secs", "1", "--seed", "7"])
            .args(extra)
            .env("DATABASE_URL", &url)
            .env_remove("KAFKA_BROKERS")
            .env_remove("LEDGER_JWT_SECRET")
            .env_remove("LEDGER_SYMBOLS")
            .env_remove("LEDGER_CONFIG")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("run ledger demo");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut dashboard, mut admin_token, mut in_process, mut expect_admin) = (None, None, false, false);
        let read = async {
            while let Ok(Some(line)) = lines.next_line().await {
                in_process |= line.contains("in-process Kafka-protocol broker");
                if let Some(url) = line.trim().strip_prefix("dashboard") {
                    dashboard = Some(url.trim().to_string());
                } else if line.trim() == "admin token:" {
                    expect_admin = true;
                } else if expect_admin {
                    admin_token = Some(line.trim().to_string());
                    break;
                }
            }
        };
        tokio::time::timeout(CONDITION_WAIT_MAX, read).await.expect("the demo never printed its URLs");
        assert!(in_process, "without KAFKA_BROKERS the demo says it uses its in-process broker");
        // Keep draining stdout so that the demo never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let dashboard = dashboard.expect("a dashboard URL");
        let base = dashboard.split("/#").next().unwrap().to_string();
        Demo { child, database, base, dashboard, admin_token: admin_token.expect("an admin token"), started }
    }

    async fn query(&self, query: &str) -> Value {
        let response = reqwest::Client::new()
            .post(format!("{}/graphql", self.base))
            .bearer_auth(&self.admin_token)
            .json(&json!({ "query": query }))
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }

    /// Ctrl-C, then the exit status.
    async fn interrupt(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running").to_string();
        let sent = std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(CONDITION_WAIT_MAX, self.child.wait())
            .await
            .expect("the demo never stopped after Ctrl-C")
            .unwrap();
        let mut conn = PgConnection::connect(&admin_url()).await.unwrap();
        sqlx::query(&format!("drop database if exists {} with (force)", self.database))
            .execute(&mut conn)
            .await
            .unwrap();
        status
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_configured_the_demo_serves_positions_with_pnl_and_stops_on_ctrl_c() {
    let demo = Demo::start().await;
    let query =
        "{ myPortfolios { owner positions { symbol quantity realizedPnl } valuation { unrealizedPnl totalEquity } } }";
    let mut last = Value::Null;
    let deadline = demo.started + CONDITION_WAIT_MAX;
    let mut ready = false;
    while Instant::now() < deadline {
        last = demo.query(query).await;
        ready = last["data"]["myPortfolios"].as_array().is_some_and(|portfolios| {
            portfolios.iter().any(|p| {
                p["positions"].as_array().is_some_and(|positions| positions.iter().any(|x| x["quantity"] != "0"))
                    && p["valuation"]["unrealizedPnl"].is_string()
                    && p["valuation"]["totalEquity"].is_string()
            })
        });
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ready, "the demo never showed a position with P&L: {last:#}");
    let owners: Vec<&str> =
        last["data"]["myPortfolios"].as_array().unwrap().iter().filter_map(|p| p["owner"].as_str()).collect();
    assert!(owners.contains(&"demo-trader") && owners.contains(&"bot-1"), "{owners:?}");
    let status = demo.interrupt().await;
    assert!(status.success(), "Ctrl-C should stop the demo cleanly: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_market_is_the_one_given_with_symbols() {
    let demo = Demo::start_with(&["--symbols", "AAPL:190,MSFT:420", "--bots", "1"]).await;
    let query = "{ prices { symbol price } myPortfolios { owner positions { symbol quantity } } }";
    let mut last = Value::Null;
    let deadline = demo.started + CONDITION_WAIT_MAX;
    let mut ready = false;
    while Instant::now() < deadline && !ready {
        last = demo.query(query).await;
        let priced = last["data"]["prices"].as_array().is_some_and(|prices| prices.len() >= 2);
        let holds_the_lead = last["data"]["myPortfolios"].as_array().is_some_and(|portfolios| {
            portfolios.iter().any(|p| {
                p["owner"] == "demo-trader"
                    && p["positions"].as_array().is_some_and(|positions| {
                        positions.iter().any(|x| x["symbol"] == "AAPL" && x["quantity"] != "0")
                    })
            })
        });
        ready = priced && holds_the_lead;
        if !ready {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    assert!(ready, "the demo trader never held the first given symbol: {last:#}");
    let mut symbols: Vec<&str> =
        last["data"]["prices"].as_array().unwrap().iter().filter_map(|p| p["symbol"].as_str()).collect();
    symbols.sort();
    assert_eq!(symbols, ["AAPL", "MSFT"], "only the given symbols are priced");
    for price in last["data"]["prices"].as_array().unwrap() {
        let value: f64 = price["price"].as_str().unwrap().parse().unwrap();
        let start = if price["symbol"] == "AAPL" { 190.0 } else { 420.0 };
        assert!((start / 2.0..start * 2.0).contains(&value), "{price} starts near {start}");
    }
    let held = last["data"]["myPortfolios"].as_array().unwrap().iter().flat_map(|p| p["positions"].as_array().unwrap());
    assert!(held.clone().all(|x| x["symbol"] == "AAPL" || x["symbol"] == "MSFT"), "{last:#}");
    assert!(demo.interrupt().await.success());
}

#[tokio::test]
async fn a_bad_symbol_list_is_refused_before_anything_starts() {
    for (args, says) in [
        (&["demo", "--symbols", "AAPL:abc"][..], "price"),
        (&["simulate", "--symbols", "AAPL:1,AAPL:2"][..], "listed twice"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(args)
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/never-reached")
            .env_remove("KAFKA_BROKERS")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}: a usage error");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--symbols") && stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn without_postgresql_the_demo_exits_1_with_one_line_saying_how_to_start_it() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
        .arg("demo")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/ledger")
        .env_remove("KAFKA_BROKERS")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot reach PostgreSQL at postgres://postgres@127.0.0.1:1/ledger"), "{stderr}");
    assert!(stderr.contains("start it"), "{stderr}");
}

/// The dashboard in headless Chromium (playwright-core): prices update, the equity chart has points from the
/// `performance` query on first load, a market order placed in the form fills, and its position appears. The screenshot is kept in `artifacts/dashboard.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_prices_and_a_placed_order_filling_in_chromium() {
    let modules = std::env::var("LEDGER_NODE_MODULES")
        .expect("set LEDGER_NODE_MODULES to a node_modules with playwright-core (./scripts/test does)");
    let demo = Demo::start().await;
    let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/dashboard.cjs");
    let output = Command::new("node")
        .args([script, &demo.dashboard, screenshot.to_str().unwrap()])
        .env("NODE_PATH", modules)
        .output()
        .await
        .expect("node");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let status = demo.interrupt().await;
    assert!(output.status.success(), "browser test failed: {stdout}\n{stderr}");
    assert!(screenshot.metadata().is_ok_and(|m| m.len() > 10_000), "a screenshot was saved");
    assert!(status.success());
}
