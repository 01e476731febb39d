//! Exit codes and messages of the operations commands.

use std::process::{Command, Output};

use ledger::commands::{CommandConfig, CommandContext, CommandService};
use ledger::domain::values::{Amount, Currency, Owner, PortfolioId};
use ledger::domain::{CostBasisMethod, PortfolioCommand};

use crate::support::{text, TestDb};

fn ledger(database_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("KAFKA_BROKERS")
        .env("RUST_LOG", "error")
        .output()
        .expect("run the ledger binary")
}

#[tokio::test]
async fn replay_verify_exits_0_when_identical_and_1_when_a_row_was_changed() {
    let db = TestDb::new().await;
    let migrated = ledger(&db.url, &["migrate"]);
    assert!(migrated.status.success(), "{}", text(&migrated.stderr));
    let pool = ledger::db::connect(&db.url, 4).await.unwrap();
    let commands = CommandService::new(pool.clone(), CommandConfig::default());
    for _ in 0..3 {
        let id = PortfolioId::generate();
        let open = PortfolioCommand::OpenPortfolio {
            portfolio_id: id,
            owner: Owner::new("cli").unwrap(),
            base_currency: Currency::new("USD").unwrap(),
            cost_basis_method: CostBasisMethod::Fifo,
            opened_at: chrono::Utc::now(),
        };
        let ctx = CommandContext::new("cli-test");
        commands.execute_portfolio(&ctx, id, open).await.unwrap();
        let deposit = PortfolioCommand::DepositCash {
            amount: Amount::new(100.into()).unwrap(),
            reference: None,
            at: chrono::Utc::now(),
        };
        commands.execute_portfolio(&ctx, id, deposit).await.unwrap();
    }

    // Build the read models by replay, then verify them.
    let built = ledger(&db.url, &["replay", "--all"]);
    assert!(built.status.success(), "{}", text(&built.stderr));
    let out = text(&built.stdout);
    assert!(out.lines().any(|l| l.starts_with("positions ") && l.contains(" rebuilt from 6 events")), "{out}");
    assert!(out.contains("6 projections from one read of the log (6 events)"), "{out}");
    let verified = ledger(&db.url, &["replay", "--all", "--verify"]);
    assert_eq!(verified.status.code(), Some(0), "{}{}", text(&verified.stdout), text(&verified.stderr));
    assert_eq!(text(&verified.stdout).matches("verified: identical").count(), ledger::projections::NAMES.len());

    let changed = sqlx::query(
        "update rm_portfolios set cash = cash + 0.01 where ctid = (select ctid from rm_portfolios limit 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(changed.rows_affected(), 1);
    let tampered = ledger(&db.url, &["replay", "positions", "--verify"]);
    assert_eq!(tampered.status.code(), Some(1), "{}{}", text(&tampered.stdout), text(&tampered.stderr));
    assert!(text(&tampered.stdout).contains("DIFFERS: rm_portfolios"), "{}", text(&tampered.stdout));
    assert!(text(&tampered.stderr).contains("differ from a rebuild: positions"), "{}", text(&tampered.stderr));
    pool.close().await;
    db.drop().await;
}

#[tokio::test]
async fn bad_arguments_and_an_unreachable_database_give_one_line_errors() {
    let unknown = ledger("postgres://postgres@127.0.0.1:5432/postgres", &["replay", "nosuch"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(text(&unknown.stderr).contains("unknown projection \"nosuch\""), "{}", text(&unknown.stderr));

    let neither = ledger("postgres://postgres@127.0.0.1:5432/postgres", &["replay"]);
    assert_eq!(neither.status.code(), Some(2), "clap usage error");

    let unreachable = ledger("postgres://postgres@127.0.0.1:1/ledger", &["migrate"]);
    assert_eq!(unreachable.status.code(), Some(1));
    let stderr = text(&unreachable.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot reach PostgreSQL at postgres://postgres@127.0.0.1:1/ledger"), "{stderr}");
}

#[tokio::test]
async fn export_and_verify_exit_0_when_intact_and_1_naming_the_position_when_tampered() {
    let db = TestDb::new().await;
    let migrated = ledger(&db.url, &["migrate"]);
    assert!(migrated.status.success(), "{}", text(&migrated.stderr));
    let pool = ledger::db::connect(&db.url, 4).await.unwrap();
    let commands = CommandService::new(pool.clone(), CommandConfig::default());
    for _ in 0..4 {
        let id = PortfolioId::generate();
        let open = PortfolioCommand::OpenPortfolio {
            portfolio_id: id,
            owner: Owner::new("cli").unwrap(),
            base_currency: Currency::new("USD").unwrap(),
            cost_basis_method: CostBasisMethod::Fifo,
            opened_at: chrono::Utc::now(),
        };
        let ctx = CommandContext::new("cli-test");
        commands.execute_portfolio(&ctx, id, open).await.unwrap();
        let deposit = PortfolioCommand::DepositCash {
            amount: Amount::new(250.into()).unwrap(),
            reference: None,
            at: chrono::Utc::now(),
        };
        commands.execute_portfolio(&ctx, id, deposit).await.unwrap();
    }
    let tmp = std::env::temp_dir().join(format!("ledger-cli-audit-{}", uuid::Uuid::new_v4().simple()));
    let dir = tmp.join("export");
    let dir_text = dir.to_str().unwrap();

    let exported = ledger(&db.url, &["export", "--format", "jsonl", "--out", dir_text]);
    assert_eq!(exported.status.code(), Some(0), "{}", text(&exported.stderr));
    assert!(text(&exported.stdout).contains("exported 8 events"), "{}", text(&exported.stdout));
    let verified = ledger(&db.url, &["verify", dir_text]);
    assert_eq!(verified.status.code(), Some(0), "{}", text(&verified.stderr));
    let summary = text(&verified.stdout);
    assert_eq!(summary.trim().lines().count(), 1, "{summary}");
    assert!(summary.starts_with("intact: 8 records in events.jsonl"), "{summary}");
    let verified_db = ledger(&db.url, &["verify", "--db"]);
    assert_eq!(verified_db.status.code(), Some(0), "{}", text(&verified_db.stderr));
    assert!(text(&verified_db.stdout).starts_with("intact: 8 sealed events"), "{}", text(&verified_db.stdout));

    // Change the deposit on line 4 (250 → 251): exit 1, naming that record's position.
    let path = dir.join("events.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&path).unwrap().lines().map(String::from).collect();
    let record: serde_json::Value = serde_json::from_str(&lines[3]).unwrap();
    let position = record["global_position"].as_i64().unwrap();
    assert!(lines[3].contains("\"amount\":\"250\""), "{}", lines[3]);
    lines[3] = lines[3].replacen("\"amount\":\"250\"", "\"amount\":\"251\"", 1);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let tampered = ledger(&db.url, &["verify", dir_text]);
    assert_eq!(tampered.status.code(), Some(1), "{}", text(&tampered.stdout));
    let stderr = text(&tampered.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("verification failed at position {position} (events.jsonl line 4)")), "{stderr}");

    // Bad input: one-line errors, exit code 1 (clap usage errors: 2).
    let missing = ledger(&db.url, &["verify", tmp.to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("has no manifest.json"), "{}", text(&missing.stderr));
    let again = ledger(&db.url, &["export", "--format", "csv", "--out", dir_text]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains("already holds an export"), "{}", text(&again.stderr));
    let backwards = ledger(
        &db.url,
        &["export", "--format", "csv", "--out", "/tmp/x", "--from-position", "5", "--to-position", "2"],
    );
    assert_eq!(backwards.status.code(), Some(1));
    assert!(
        text(&backwards.stderr).contains("--from-position 5 is after --to-position 2"),
        "{}",
        text(&backwards.stderr)
    );
    let unknown = ledger(&db.url, &["export", "--format", "xml", "--out", dir_text]);
    assert_eq!(unknown.status.code(), Some(2), "clap usage error");
    assert!(text(&unknown.stderr).contains("not an export format"), "{}", text(&unknown.stderr));
    let _ = std::fs::remove_dir_all(&tmp);
    pool.close().await;
    db.drop().await;
}

/// A configuration file sits between the defaults and the environment: its DATABASE_URL is used when the
/// environment has none, the environment's wins otherwise, and an unknown name is refused with its line.
#[tokio::test]
async fn a_configuration_file_applies_under_the_environment() {
    let dir = std::env::temp_dir().join(format!("ledger-config-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ledger.env");
    std::fs::write(&file, "# test\nDATABASE_URL=postgres://postgres@127.0.0.1:2/from_file\n").unwrap();
    let run = |env_url: Option<&str>, file: &std::path::Path| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ledger"));
        command
            .args(["--config", file.to_str().unwrap(), "migrate"])
            .env("RUST_LOG", "error")
            .env_remove("LEDGER_CONFIG");
        match env_url {
            Some(url) => command.env("DATABASE_URL", url),
            None => command.env_remove("DATABASE_URL"),
        };
        command.output().unwrap()
    };
    let from_file = run(None, &file);
    assert_eq!(from_file.status.code(), Some(1));
    assert!(text(&from_file.stderr).contains("127.0.0.1:2/from_file"), "{}", text(&from_file.stderr));
    let from_env = run(Some("postgres://postgres@127.0.0.1:3/from_env"), &file);
    assert!(text(&from_env.stderr).contains("127.0.0.1:3/from_env"), "{}", text(&from_env.stderr));
    std::fs::write(&file, "DATABASE_URL=x\nLEDGER_LISTN=0.0.0.0:1\n").unwrap();
    let typo = run(None, &file);
    assert_eq!(typo.status.code(), Some(1));
    assert!(text(&typo.stderr).contains("line 2: unknown setting \"LEDGER_LISTN\""), "{}", text(&typo.stderr));
    std::fs::remove_dir_all(dir).ok();
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set, `ledger serve` exports its spans as OTLP/HTTP JSON: a GraphQL request
/// sent with a `traceparent` becomes a `request` span in the caller's trace (a child of the caller's span), with
/// the command it ran as a child span; the trace goes on through the event log and Kafka: the projection
/// worker that applies the request's event opens a `projection` span in the same trace, a child of the
/// request's. With `LEDGER_LOG_FORMAT=json`, its log lines carry the trace and correlation ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exports_spans_in_the_callers_trace_and_logs_json_with_ids() {
    use std::sync::{Arc, Mutex};
    let db = TestDb::new().await;
    // A stand-in collector: stores every OTLP request body.
    let received: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let collector = {
        let received = received.clone();
        axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::Json<serde_json::Value>| async move {
                received.lock().unwrap().push(body.0);
                "{}"
            }),
        )
    };
    let collector_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_address = collector_listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(collector_listener, collector).await });

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let secret = "test-secret-of-at-least-thirty-two-bytes";
    // Relay and workers in the process, on topics and consumer groups of this test's own.
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--with-relay", "--with-workers"])
        .env("DATABASE_URL", &db.url)
        .env("KAFKA_BROKERS", std::env::var("KAFKA_BROKERS").expect("the test broker (scripts/test)"))
        .env("LEDGER_EVENTS_TOPIC", format!("test.events.{suffix}"))
        .env("LEDGER_PRICES_TOPIC", format!("test.prices.{suffix}"))
        .env("LEDGER_DEAD_LETTER_TOPIC", format!("test.dlq.{suffix}"))
        .env("LEDGER_KAFKA_PARTITIONS", "2")
        .env("LEDGER_GROUP_PREFIX", format!("test-{suffix}"))
        .env("LEDGER_JWT_SECRET", secret)
        .env("LEDGER_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn,ledger=info,ledger_api=info,ledger_api::http::server=debug")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector_address}"))
        .env("OTEL_SERVICE_NAME", "ledger-test")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let ready = crate::support::eventually(|| async {
        http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(ready, "ledger serve never became ready");
    let token = ledger_api::auth::TokenKeys::new(secret).unwrap().issue(
        "alice",
        ledger_api::auth::Role::Trader,
        chrono::Duration::hours(1),
        chrono::Utc::now(),
    );
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let correlation = uuid::Uuid::now_v7().to_string();
    let post = |query: &'static str| {
        http.post(format!("{base}/graphql"))
            .bearer_auth(&token)
            .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
            .header("x-correlation-id", &correlation)
            .json(&serde_json::json!({ "query": query }))
            .send()
    };
    let opened =
        post("mutation { openPortfolio(input: {}, idempotencyKey: \"otel-1\") { aggregateId } }").await.unwrap();
    assert!(opened.headers()["traceparent"].to_str().unwrap().contains(trace));
    let refused = post("mutation { withdraw(portfolioId: \"00000000-0000-0000-0000-000000000000\", amount: \"1\", idempotencyKey: \"otel-2\") { lastPosition } }");
    let refused: serde_json::Value = refused.await.unwrap().json().await.unwrap();
    assert!(refused["errors"].is_array(), "{refused}");

    // The exporter posts every second.
    let deadline = std::time::Instant::now() + crate::support::CONDITION_WAIT_MAX;
    let mut spans = Vec::new();
    while std::time::Instant::now() < deadline {
        spans = received
            .lock()
            .unwrap()
            .iter()
            .flat_map(|body| body["resourceSpans"].as_array().cloned().unwrap_or_default())
            .inspect(|resource| {
                assert_eq!(resource["resource"]["attributes"][0]["value"]["stringValue"], "ledger-test")
            })
            .flat_map(|resource| resource["scopeSpans"][0]["spans"].as_array().cloned().unwrap_or_default())
            .filter(|span| span["traceId"] == trace)
            .collect();
        let named = |name: &str| spans.iter().any(|s| s["name"] == name);
        if spans.iter().filter(|s| s["name"] == "request").count() == 2 && named("execute") && named("projection") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let requests: Vec<&serde_json::Value> = spans.iter().filter(|s| s["name"] == "request").collect();
    assert_eq!(requests.len(), 2, "spans in the trace: {spans:#?}; received: {:?}", received.lock().unwrap());
    let execute =
        spans.iter().find(|s| s["name"] == "execute").unwrap_or_else(|| panic!("no command span: {spans:#?}"));
    assert!(
        requests.iter().any(|r| r["spanId"] == execute["parentSpanId"]),
        "the command span is a child of a request"
    );
    let attribute = |span: &serde_json::Value, key: &str| {
        span["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["key"] == key)
            .map(|a| a["value"]["stringValue"].clone())
    };
    assert_eq!(attribute(requests[0], "correlation_id"), Some(serde_json::json!(correlation)));
    assert_eq!(attribute(execute, "command"), Some(serde_json::json!("OpenPortfolio")));
    assert!(requests.iter().all(|r| r["parentSpanId"] == "00f067aa0ba902b7"), "the caller's span is the parent");
    // The portfolio's event went through the log, the relay and Kafka to the positions worker.
    let projection = spans
        .iter()
        .find(|s| s["name"] == "projection" && attribute(s, "projection") == Some(serde_json::json!("positions")))
        .unwrap_or_else(|| panic!("no positions worker span in the trace: {spans:#?}"));
    assert_eq!(projection["parentSpanId"], execute["parentSpanId"], "the worker's span is a child of the request");

    serve.start_kill().unwrap();
    let output = serve.wait_with_output().await.unwrap();
    let logs = text(&output.stderr);
    let line = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "request answered with errors")
        .unwrap_or_else(|| panic!("no JSON log line of the refused request in:\n{logs}"));
    assert_eq!(line["span"]["trace_id"], trace, "{line}");
    assert_eq!(line["span"]["correlation_id"], correlation.as_str(), "{line}");
    db.drop().await;
}
