//! Exit codes and messages of the operations commands.

use std::process::{Command, Output};

use ledger::commands::{CommandConfig, CommandContext, CommandService};
use ledger::domain::values::{Amount, Currency, Owner, PortfolioId};
use ledger::domain::{CostBasisMethod, PortfolioCommand};
use sqlx::{Connection, PgConnection};

fn admin_url() -> String {
    std::env::var("LEDGER_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    async fn new() -> TestDb {
        let admin = admin_url();
        let name = format!("ledger_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin).await.unwrap();
        sqlx::query(&format!("create database {name}")).execute(&mut conn).await.unwrap();
        let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
        TestDb { name, url }
    }

    async fn drop(self) {
        let mut conn = PgConnection::connect(&admin_url()).await.unwrap();
        sqlx::query(&format!("drop database if exists {} with (force)", self.name)).execute(&mut conn).await.unwrap();
    }
}

fn ledger(database_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("KAFKA_BROKERS")
        .env("RUST_LOG", "error")
        .output()
        .expect("run the ledger binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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
        commands.execute_portfolio(&ctx, &id.to_string(), open).await.unwrap();
        let deposit = PortfolioCommand::DepositCash {
            amount: Amount::new(100.into()).unwrap(),
            reference: None,
            at: chrono::Utc::now(),
        };
        commands.execute_portfolio(&ctx, &id.to_string(), deposit).await.unwrap();
    }

    // Build the read models by replay, then verify them.
    let built = ledger(&db.url, &["replay", "--all"]);
    assert!(built.status.success(), "{}", text(&built.stderr));
    assert!(text(&built.stdout).contains("positions  rebuilt from"), "{}", text(&built.stdout));
    let verified = ledger(&db.url, &["replay", "--all", "--verify"]);
    assert_eq!(verified.status.code(), Some(0), "{}{}", text(&verified.stdout), text(&verified.stderr));
    assert_eq!(text(&verified.stdout).matches("verified: identical").count(), 5);

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
        commands.execute_portfolio(&ctx, &id.to_string(), open).await.unwrap();
        let deposit = PortfolioCommand::DepositCash {
            amount: Amount::new(250.into()).unwrap(),
            reference: None,
            at: chrono::Utc::now(),
        };
        commands.execute_portfolio(&ctx, &id.to_string(), deposit).await.unwrap();
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
