//! Test helpers: every test owns its world — a fresh database named by a UUID, migrated, dropped at the end.

use std::sync::Arc;
use std::time::Duration;

use ledger::commands::{CommandConfig, CommandContext, CommandService, Idempotency};
use ledger::domain::values::{Amount, ClientOrderId, Currency, OrderId, Owner, PortfolioId, Price, Quantity, Symbol};
use ledger::domain::{CostBasisMethod, OrderCommand, OrderType, PortfolioCommand, Side, TimeInForce};
use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection, PgPool};

/// The server tests create their databases on (`LEDGER_TEST_DATABASE_URL`, default: local trust auth).
pub fn admin_url() -> String {
    std::env::var("LEDGER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

pub struct TestDb {
    pub name: String,
    #[allow(dead_code)] // for tests that start the binary as a separate process
    pub url: String,
    pub pool: PgPool,
}

/// Routes `tracing` output into the test's captured output (shown when a test fails). `RUST_LOG` overrides.
pub fn init_tracing() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ledger=info"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

impl TestDb {
    /// A new migrated database with a pool of `connections` connections.
    pub async fn new_with(connections: u32) -> TestDb {
        init_tracing();
        let admin = admin_url();
        let name = format!("ledger_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin).await.expect("connect to the test PostgreSQL server");
        sqlx::query(&format!("create database {name}")).execute(&mut conn).await.expect("create database");
        conn.close().await.ok();
        let url = match admin.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("LEDGER_TEST_DATABASE_URL must name a database"),
        };
        let pool = ledger::db::connect(&url, connections).await.expect("connect to the test database");
        ledger::db::migrate(&pool).await.expect("migrate");
        TestDb { name, url, pool }
    }

    pub async fn new() -> TestDb {
        Self::new_with(16).await
    }

    pub fn commands(&self) -> Arc<CommandService> {
        Arc::new(CommandService::new(self.pool.clone(), CommandConfig::default()))
    }

    /// Closes the pool and drops the database (leftovers of failed tests are dropped by `scripts/test`).
    pub async fn drop(self) {
        self.pool.close().await;
        if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
            let _ =
                sqlx::query(&format!("drop database if exists {} with (force)", self.name)).execute(&mut conn).await;
        }
    }

    pub async fn count_events(&self) -> i64 {
        sqlx::query_scalar("select count(*) from events").fetch_one(&self.pool).await.unwrap()
    }
}

pub fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

pub fn qty(s: &str) -> Quantity {
    Quantity::new(dec(s)).unwrap()
}

pub fn price(s: &str) -> Price {
    Price::new(dec(s)).unwrap()
}

pub fn amount(s: &str) -> Amount {
    Amount::new(dec(s)).unwrap()
}

/// Free text (a reason, a reference) that is valid by construction.
pub fn text(s: &str) -> ledger::domain::values::FreeText {
    ledger::domain::values::FreeText::new("text", s).unwrap()
}

pub fn sym(s: &str) -> Symbol {
    Symbol::new(s).unwrap()
}

pub fn ctx() -> CommandContext {
    CommandContext::new("test")
}

pub fn keyed(key: &str, request: &impl serde::Serialize) -> CommandContext {
    CommandContext::new("test").with_idempotency(Idempotency::new(key, request).unwrap())
}

/// Opens a portfolio with `cash` deposited; returns its id.
pub async fn open_portfolio(commands: &CommandService, cash: &str, method: CostBasisMethod) -> PortfolioId {
    let id = PortfolioId::generate();
    let now = chrono::Utc::now();
    commands
        .execute_portfolio(
            &ctx(),
            id,
            PortfolioCommand::OpenPortfolio {
                portfolio_id: id,
                owner: Owner::new("alice").unwrap(),
                base_currency: Currency::new("USD").unwrap(),
                cost_basis_method: method,
                opened_at: now,
            },
        )
        .await
        .unwrap();
    if dec(cash) > Decimal::ZERO {
        commands
            .execute_portfolio(
                &ctx(),
                id,
                PortfolioCommand::DepositCash { amount: amount(cash), reference: None, at: now },
            )
            .await
            .unwrap();
    }
    id
}

/// Writes a `CashDeposited` of `amount` (leaving `cash_after`) as event `sequence` of `portfolio` straight into
/// the log on `conn`, as another process's writer would; left uncommitted, the transaction holds that row.
pub async fn insert_foreign_deposit(
    conn: &mut sqlx::PgConnection,
    portfolio: PortfolioId,
    sequence: i64,
    deposited: &str,
    cash_after: &str,
    at: chrono::DateTime<chrono::Utc>,
) {
    let event = ledger::domain::PortfolioEvent::CashDeposited {
        amount: amount(deposited),
        reference: None,
        cash_after: dec(cash_after),
        at,
    };
    sqlx::query(
        "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         values ('Portfolio', $1, $2, 'CashDeposited', $3, $4, '{}')",
    )
    .bind(portfolio.to_string())
    .bind(sequence)
    .bind(ledger::domain::portfolio::PORTFOLIO_EVENT_VERSION)
    .bind(serde_json::to_value(&event).unwrap())
    .execute(conn)
    .await
    .unwrap();
}

pub fn place(
    portfolio: PortfolioId,
    symbol: &str,
    side: Side,
    quantity: &str,
    limit: Option<&str>,
) -> (OrderId, OrderCommand) {
    let order_id = OrderId::generate();
    let order_type = match limit {
        Some(l) => OrderType::Limit { limit_price: price(l) },
        None => OrderType::Market,
    };
    let command = OrderCommand::PlaceOrder(ledger::domain::order::PlaceOrder {
        order_id,
        portfolio_id: portfolio,
        client_order_id: ClientOrderId::new(format!("c-{order_id}")).unwrap(),
        symbol: sym(symbol),
        side,
        order_type,
        quantity: qty(quantity),
        time_in_force: TimeInForce::Gtc,
        placed_at: chrono::Utc::now(),
    });
    (order_id, command)
}

/// How long a test waits for a condition before it declares the system stuck. A condition normally holds
/// within milliseconds; this bound only turns a hang into a failure, so it is generous enough for a slow machine
/// that is busy with other work (tests assert what happens, never how fast: speed is for `ledger-lab bench`).
pub const CONDITION_WAIT_MAX: Duration = Duration::from_secs(180);

/// Polls `check` every 20 ms until it returns true (→ true) or [`CONDITION_WAIT_MAX`] passes (→ false).
pub async fn eventually<F, Fut>(check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(CONDITION_WAIT_MAX, check).await
}

/// Like [`eventually`] with a shorter bound: for a step that is retried when it did not take (e.g. a tick
/// republished until a consumer that may have joined after it sees one), never for a final assertion.
pub async fn eventually_within<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the process manager has passed every committed event (call it with one running). It reacts to
/// order events after they are written (reserving, applying fills, releasing), so anything compared with the
/// aggregates or read models waits for it first; with its cursor at the head, everything it will write is
/// already in the log.
pub async fn wait_process_manager_idle(pool: &PgPool) {
    let idle = eventually(|| async {
        sqlx::query_scalar::<_, bool>(
            "with c as (select coalesce((select transaction_id from log_cursors where name = $1), '0') as tx,
                               coalesce((select global_position from log_cursors where name = $1), 0) as pos)
             select not exists (select 1 from events e, c where (e.transaction_id, e.global_position) > (c.tx, c.pos))",
        )
        .bind(ledger::process::PROCESS_MANAGER)
        .fetch_one(pool)
        .await
        .unwrap()
    })
    .await;
    assert!(idle, "the process manager never caught up with the log");
}

pub mod kafka;
pub mod system;
pub mod workload;
