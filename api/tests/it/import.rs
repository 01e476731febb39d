//! Statement import: `ledger import` run as users run it (a 10,000-row statement, the same file again, a file
//! with bad lines) and the `importStatement` mutation with the read models behind it, against the real
//! PostgreSQL and the test broker.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::{Command, Output};

use ledger::commands::{CommandConfig, CommandContext, CommandService};
use ledger::domain::values::{Currency, Owner, PortfolioId};
use ledger::domain::{CostBasisMethod, Portfolio, PortfolioCommand};
use ledger_api::auth::Role;
use rust_decimal::Decimal;
use serde_json::json;

use crate::graphql::{dec, OPEN};
use crate::support::{error_code, text, Stack, TestDb};

fn ledger_import(database_url: &str, portfolio: PortfolioId, file: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(["import", "--portfolio", &portfolio.to_string(), "--csv", &file.display().to_string()])
        .env("DATABASE_URL", database_url)
        .env_remove("KAFKA_BROKERS")
        .env("RUST_LOG", "error")
        .output()
        .expect("run the ledger binary")
}

/// What a statement should leave on a portfolio, computed from its rows as they are written.
#[derive(Default)]
struct Expected {
    cash: Decimal,
    quantities: BTreeMap<String, Decimal>,
    rows: usize,
}

impl Expected {
    fn deposit(&mut self, csv: &mut String, minute: usize, amount: Decimal) {
        writeln!(csv, "{},deposit,{amount}", time(minute)).unwrap();
        self.cash += amount;
        self.rows += 1;
    }

    fn trade(&mut self, csv: &mut String, minute: usize, symbol: &str, sell: bool, quantity: i64, price: Decimal) {
        let fee = Decimal::new(25, 2);
        let side = if sell { "SELL" } else { "buy" }; // any case
        writeln!(csv, "{},{symbol},{side},{quantity},{price},{fee}", time(minute)).unwrap();
        let (quantity, gross) = (Decimal::from(quantity), Decimal::from(quantity) * price);
        let held = self.quantities.entry(symbol.to_string()).or_default();
        if sell {
            self.cash += gross - fee;
            *held -= quantity;
        } else {
            self.cash -= gross + fee;
            *held += quantity;
        }
        self.rows += 1;
    }
}

fn time(minute: usize) -> String {
    (chrono::DateTime::from_timestamp(1_577_836_800, 0).unwrap() + chrono::Duration::minutes(minute as i64))
        .to_rfc3339()
}

/// A statement of `rows` rows from `first_minute` on: a deposit, two buys, then a sell of both, over five
/// symbols (positions go back to zero, so lots stay few).
fn statement(expected: &mut Expected, csv: &mut String, first_minute: usize, rows: usize) {
    for i in 0..rows {
        let minute = first_minute + i;
        let symbol = format!("SYM{}", (minute / 4) % 5);
        let price = Decimal::new(1_000 + (minute % 7) as i64 * 25, 2);
        match minute % 4 {
            0 => expected.deposit(csv, minute, Decimal::from(100)),
            1 => expected.trade(csv, minute, &symbol, false, 2, price),
            2 => expected.trade(csv, minute, &symbol, false, 1, price),
            _ => expected.trade(csv, minute, &symbol, true, 3, price),
        }
    }
}

/// A directory removed when the test ends.
struct Files(std::path::PathBuf);

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn open(commands: &CommandService) -> PortfolioId {
    let id = PortfolioId::generate();
    let ctx = CommandContext::new("import-test");
    let open = PortfolioCommand::OpenPortfolio {
        portfolio_id: id,
        owner: Owner::new("importer").unwrap(),
        base_currency: Currency::new("USD").unwrap(),
        cost_basis_method: CostBasisMethod::Fifo,
        opened_at: chrono::DateTime::from_timestamp(1_500_000_000, 0).unwrap(),
    };
    commands.execute_portfolio(&ctx, id, open).await.unwrap();
    id
}

async fn event_count(pool: &sqlx::PgPool, portfolio: PortfolioId) -> i64 {
    sqlx::query_scalar("select count(*) from events where aggregate_id = $1")
        .bind(portfolio.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn assert_state(commands: &CommandService, portfolio: PortfolioId, expected: &Expected) {
    let (state, _) = commands.load::<Portfolio>(&portfolio.to_string()).await.unwrap();
    assert_eq!(state.cash, expected.cash);
    for (symbol, quantity) in &expected.quantities {
        let held = state.positions.iter().find(|(s, _)| s.as_str() == symbol).map(|(_, p)| p.quantity);
        assert_eq!(held.unwrap_or_default(), *quantity, "{symbol}");
    }
}

#[tokio::test]
async fn a_statement_imported_twice_books_once_and_bad_lines_are_reported_while_the_rest_apply() {
    let db = TestDb::new().await;
    let pool = ledger::db::connect(&db.url, 4).await.unwrap();
    ledger::db::migrate(&pool).await.unwrap();
    let commands = CommandService::new(pool.clone(), CommandConfig::default());
    let portfolio = open(&commands).await;
    let dir = Files(std::env::temp_dir().join(format!("ledger-import-{}", uuid::Uuid::new_v4().simple())));
    std::fs::create_dir_all(&dir.0).unwrap();

    // 10,000 rows behind a header.
    let (mut expected, mut csv) = (Expected::default(), String::from("date,symbol,side,quantity,price,fee\n"));
    statement(&mut expected, &mut csv, 0, 10_000);
    let first = dir.0.join("statement.csv");
    std::fs::write(&first, &csv).unwrap();
    let imported = ledger_import(&db.url, portfolio, &first);
    assert!(imported.status.success(), "{}\n{}", text(&imported.stdout), text(&imported.stderr));
    assert!(
        text(&imported.stdout).contains("10000 rows: 10000 booked, 0 already imported, 0 lines not applied"),
        "{}",
        text(&imported.stdout)
    );
    assert_state(&commands, portfolio, &expected).await;
    let events = event_count(&pool, portfolio).await;
    assert_eq!(events, 1 + 10_000);

    // The same file again: nothing new.
    let again = ledger_import(&db.url, portfolio, &first);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stdout).contains("10000 rows: 0 booked, 10000 already imported"), "{}", text(&again.stdout));
    assert_eq!(event_count(&pool, portfolio).await, events);
    assert_state(&commands, portfolio, &expected).await;

    // A later export: the same rows, 20 new ones, and three bad lines (lines 10003, 10012 and 10024 with the
    // header on line 1): a date that is no date, a side that is no side, a sell of more than is held.
    let mut later = csv.clone();
    let mut lines: Vec<String> = Vec::new();
    let mut tail = String::new();
    statement(&mut expected, &mut tail, 10_000, 20);
    lines.extend(tail.lines().map(str::to_string));
    lines.insert(1, "2020-13-45,SYM1,buy,1,10,0".into());
    lines.insert(10, format!("{},SYM1,hold,1,10,0", time(10_030)));
    lines.push(format!("{},SYM2,sell,1000,10,0", time(10_040)));
    for line in &lines {
        writeln!(later, "{line}").unwrap();
    }
    let third = dir.0.join("later.csv");
    std::fs::write(&third, &later).unwrap();
    let partly = ledger_import(&db.url, portfolio, &third);
    assert_eq!(partly.status.code(), Some(1), "{}", text(&partly.stderr));
    let out = text(&partly.stdout);
    let reported: Vec<&str> = out.lines().filter(|l| l.starts_with("line ")).collect();
    assert_eq!(reported.len(), 3, "{out}");
    assert!(reported[0].starts_with("line 10003: date \"2020-13-45\""), "{out}");
    assert!(reported[1].starts_with("line 10012: side \"hold\""), "{out}");
    assert!(reported[2].starts_with("line 10024: ") && reported[2].contains("INSUFFICIENT_QUANTITY"), "{out}");
    assert!(out.contains("10023 rows: 20 booked, 10000 already imported, 3 lines not applied"), "{out}");
    assert_eq!(event_count(&pool, portfolio).await, events + 20);
    assert_state(&commands, portfolio, &expected).await;
    db.drop().await;
}

const IMPORT: &str = "mutation($id: UUID!, $csv: String!) {
    importStatement(portfolioId: $id, csv: $csv) { rows applied alreadyImported errors { line code reason } lastPosition }
}";
const POSITIONS: &str = "query($id: UUID!, $w: LogPosition) {
    portfolio(id: $id, waitFor: $w) { cash positions { symbol quantity costBasis realizedPnl } }
}";

/// Newest first, as many brokers export: booked in date order (the sell after the buys it sells).
const NEWEST_FIRST: &str = "\
# exported 2025-02-01
date,symbol,side,quantity,price,fee
2025-01-20,ACME,sell,4,12.50,1
2025-01-10,ACME,buy,10,10.00,1.5
2025-01-10,ACME,buy,10,10.00,1.5
date,type,amount
2025-01-05,deposit,1000
2025-01-25,withdrawal,5000
2025-01-26,deposit,abc
";

#[tokio::test]
async fn import_statement_books_through_the_api_into_the_read_models_once_whoever_imports() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let opened = stack.ok(&alice, OPEN, json!({ "key": "open-for-import" })).await;
    let id = opened["openPortfolio"]["aggregateId"].as_str().unwrap().to_string();

    let data = stack.ok(&alice, IMPORT, json!({ "id": id, "csv": NEWEST_FIRST })).await["importStatement"].clone();
    assert_eq!((data["rows"].as_i64(), data["applied"].as_i64()), (Some(6), Some(4)), "{data}");
    let errors: Vec<(i64, &str)> = data["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["line"].as_i64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    // Line 8: 5,000 is more than the cash; line 9 is no amount.
    assert_eq!(errors, vec![(8, "INSUFFICIENT_FUNDS"), (9, "INVALID_LINE")], "{data}");

    // Two equal buys on one day are two trades: 20 bought at 10 + 3 fees = 203, 4 sold at 12.5 − 1 = 49;
    // cash 1000 − 203 + 49 = 846; 16 held at 16 × 10.15 = 162.4, realized 49 − 40.6 = 8.4.
    let portfolio =
        stack.ok_visible(&alice, POSITIONS, json!({ "id": id, "w": data["lastPosition"] })).await["portfolio"].clone();
    assert_eq!(dec(&portfolio["cash"]), "846".parse().unwrap(), "{portfolio}");
    assert_eq!(portfolio["positions"][0]["quantity"], "16", "{portfolio}");
    assert_eq!(dec(&portfolio["positions"][0]["costBasis"]), "162.4".parse().unwrap(), "{portfolio}");
    assert_eq!(dec(&portfolio["positions"][0]["realizedPnl"]), "8.4".parse().unwrap(), "{portfolio}");

    // Again, through the API and from the command line's library call: nothing new.
    let again = stack.ok(&alice, IMPORT, json!({ "id": id, "csv": NEWEST_FIRST })).await["importStatement"].clone();
    assert_eq!((again["applied"].as_i64(), again["alreadyImported"].as_i64()), (Some(0), Some(4)), "{again}");
    let commands = CommandService::new(stack.pool.clone(), CommandConfig::default());
    let portfolio_id = PortfolioId(id.parse().unwrap());
    let statement = ledger::import::Statement::parse(NEWEST_FIRST, chrono::Utc::now()).unwrap();
    let operator = CommandContext::new("operator");
    let report =
        ledger::import::import(&commands, &operator, portfolio_id, statement, |_| Ok(()), |_, _| {}).await.unwrap();
    assert_eq!((report.applied, report.already_imported), (0, 4));

    // Someone else's portfolio answers like an unknown one, and books nothing.
    let bob = stack.token("bob", Role::Trader);
    let refused = stack.gql(&bob, IMPORT, json!({ "id": id, "csv": NEWEST_FIRST })).await;
    assert_eq!(error_code(&refused).as_deref(), Some("PORTFOLIO_NOT_FOUND"), "{refused}");
    let (state, _) = commands.load::<Portfolio>(&id).await.unwrap();
    assert_eq!(state.cash, "846".parse::<Decimal>().unwrap());
    stack.stop().await;
}
