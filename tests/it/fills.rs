//! Fills are facts, against a real PostgreSQL with the real process manager: every execution an order accepted
//! is booked on its portfolio — into deficit when it costs more than is available — reservations never outlive
//! their orders, and cash adds up. Also: one active process manager, market sells protected by a floor, and
//! steps the process manager could not apply, retried once their cause is fixed.

use std::sync::Arc;

use ledger::commands::{CommandError, CommandService};
use ledger::domain::order::{RecordExecution, RejectCode};
use ledger::domain::values::{ExecId, Money, OrderId, PortfolioId};
use ledger::domain::{CostBasisMethod, Order, OrderCommand, OrderStatus, Portfolio, PortfolioCommand, Side};
use ledger::process::failures::{self, RetryOutcome};
use ledger::process::{ProcessConfig, ProcessManager};
use proptest::prelude::*;
use rust_decimal::{Decimal, RoundingStrategy};

use crate::support::system::{start_process_manager, Running};
use crate::support::*;

async fn order_state(commands: &CommandService, order_id: OrderId) -> Order {
    commands.load::<Order>(&order_id.to_string()).await.unwrap().0
}

async fn portfolio_state(commands: &CommandService, portfolio: PortfolioId) -> Portfolio {
    commands.load::<Portfolio>(&portfolio.to_string()).await.unwrap().0
}

/// Places an order and waits for the process manager's decision.
async fn place_decided(
    commands: &CommandService,
    portfolio: PortfolioId,
    side: Side,
    quantity: &str,
    limit: Option<&str>,
) -> (OrderId, Order) {
    let (order_id, command) = place(portfolio, "ACME", side, quantity, limit);
    commands.execute_order(&ctx(), order_id, command).await.unwrap();
    let decided =
        eventually(|| async { order_state(commands, order_id).await.status != OrderStatus::PendingNew }).await;
    assert!(decided, "order {order_id} never decided");
    (order_id, order_state(commands, order_id).await)
}

fn execution(exec: &str, quantity: Decimal, at_price: Decimal, fee: Decimal) -> OrderCommand {
    OrderCommand::RecordExecution(RecordExecution {
        exec_id: ExecId::new(exec).unwrap(),
        quantity: ledger::domain::values::Quantity::new(quantity).unwrap(),
        price: ledger::domain::values::Price::new(at_price).unwrap(),
        fee: Money::new(fee).unwrap(),
        executed_at: chrono::Utc::now(),
    })
}

async fn assert_agreement(commands: &CommandService) {
    let disagreements = ledger::process::agreement::check(commands).await.unwrap();
    assert!(disagreements.is_empty(), "orders and portfolios disagree: {disagreements:?}");
}

/// The case of the outside accounting check, end to end: buy 1 at limit 122.64 (123.8664 reserved), a
/// withdrawal leaves 0.5 of buying power, the fill comes with a fee of 4.4733. The order is filled and the
/// fill booked; the portfolio owes 2.7469, refuses withdrawals and buys, and nothing stays reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_beyond_the_reservation_is_booked_into_deficit_and_the_reservation_released() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let portfolio = open_portfolio(&commands, "200", CostBasisMethod::Fifo).await;
    let (order_id, order) = place_decided(&commands, portfolio, Side::Buy, "1", Some("122.64")).await;
    assert_eq!(order.status, OrderStatus::New);
    assert_eq!(portfolio_state(&commands, portfolio).await.reserved_cash, dec("123.8664"));
    let withdraw =
        PortfolioCommand::WithdrawCash { amount: amount("75.6336"), reference: None, at: chrono::Utc::now() };
    commands.execute_portfolio(&ctx(), portfolio, withdraw).await.unwrap();
    commands.execute_order(&ctx(), order_id, execution("n1", dec("1"), dec("122.64"), dec("4.4733"))).await.unwrap();
    wait_process_manager_idle(&db.pool).await;

    assert_eq!(order_state(&commands, order_id).await.status, OrderStatus::Filled);
    let state = portfolio_state(&commands, portfolio).await;
    assert_eq!((state.cash, state.reserved_cash, state.deficit()), (dec("-2.7469"), dec("0"), dec("2.7469")));
    assert_eq!(state.positions[&sym("ACME")].quantity, dec("1"));
    assert!(state.reservations.is_empty());
    let markers: Vec<String> = sqlx::query_scalar(
        "select event_type from events where aggregate_id = $1 and event_type like 'Deficit%' order by sequence",
    )
    .bind(portfolio.to_string())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(markers, ["DeficitIncurred"]);
    let failures: i64 = sqlx::query_scalar("select count(*) from process_failures").fetch_one(&db.pool).await.unwrap();
    assert_eq!(failures, 0, "nothing was left to an operator");

    // In deficit: a withdrawal is refused, a new buy is rejected with the reason; a deposit covers it.
    let withdraw = PortfolioCommand::WithdrawCash { amount: amount("1"), reference: None, at: chrono::Utc::now() };
    let refused = commands.execute_portfolio(&ctx(), portfolio, withdraw).await.unwrap_err();
    assert_eq!(refused.code(), "PORTFOLIO_IN_DEFICIT");
    let (_, rejected) = place_decided(&commands, portfolio, Side::Buy, "1", Some("1")).await;
    assert_eq!(rejected.reject_reason.map(|r| r.code), Some(RejectCode::PortfolioInDeficit));
    let deposit = PortfolioCommand::DepositCash { amount: amount("10"), reference: None, at: chrono::Utc::now() };
    let covered = commands.execute_portfolio(&ctx(), portfolio, deposit).await.unwrap();
    let types: Vec<&str> = covered.events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["CashDeposited", "DeficitCovered"]);
    assert_eq!(portfolio_state(&commands, portfolio).await.buying_power(), dec("7.2531"));
    wait_process_manager_idle(&db.pool).await;
    assert_agreement(&commands).await;
    pm.stop().await;
    db.drop().await;
}

/// Two process managers on one database: one works, the other stands by and does nothing; when the active one
/// dies, the standby takes over and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_two_process_managers_one_works_and_the_other_takes_over() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let spawn = || {
        let manager = ProcessManager::new(commands.clone(), ProcessConfig::default());
        let status = manager.status();
        (Running::spawn(|cancel| async move { manager.run(cancel).await.unwrap() }), status)
    };
    let (first, first_status) = spawn();
    let (second, second_status) = spawn();
    let active = |s: &ledger::process::ProcessStatus| s.active.load(std::sync::atomic::Ordering::SeqCst);
    assert!(eventually(|| async { active(&first_status) ^ active(&second_status) }).await, "one active");
    let portfolio = open_portfolio(&commands, "1000", CostBasisMethod::Fifo).await;
    let (_, order) = place_decided(&commands, portfolio, Side::Buy, "1", Some("10")).await;
    assert_eq!(order.status, OrderStatus::New);
    let (working, standby, standby_status) =
        if active(&first_status) { (first, second, second_status) } else { (second, first, first_status) };
    assert_eq!(standby_status.handled.load(std::sync::atomic::Ordering::Relaxed), 0, "the standby worked");

    working.kill().await;
    assert!(eventually(|| async { active(&standby_status) }).await, "the standby never took over");
    let (_, order) = place_decided(&commands, portfolio, Side::Buy, "1", Some("10")).await;
    assert_eq!(order.status, OrderStatus::New);
    wait_process_manager_idle(&db.pool).await;
    assert_agreement(&commands).await;
    standby.stop().await;
    db.drop().await;
}

async fn set_price(db: &TestDb, symbol: &str, value: &str) {
    sqlx::query(
        "insert into latest_prices (symbol, price, as_of) values ($1, $2, now())
         on conflict (symbol) do update set price = excluded.price, as_of = excluded.as_of",
    )
    .bind(symbol)
    .bind(dec(value))
    .execute(&db.pool)
    .await
    .unwrap();
}

/// A market sell is protected like a market buy, the other way: it may not fill below the last price lowered
/// by the collar (5 %, rounded down to the cent). Without any price it is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn market_sells_carry_a_protection_floor() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let portfolio = open_portfolio(&commands, "1000", CostBasisMethod::Fifo).await;
    let (buy, _) = place_decided(&commands, portfolio, Side::Buy, "10", Some("20")).await;
    commands.execute_order(&ctx(), buy, execution("x1", dec("10"), dec("20"), dec("0"))).await.unwrap();
    wait_process_manager_idle(&db.pool).await;

    let (_, unpriced) = place_decided(&commands, portfolio, Side::Sell, "1", None).await;
    assert_eq!(unpriced.reject_reason.map(|r| r.code), Some(RejectCode::NoMarketPrice));

    set_price(&db, "ACME", "20.01").await;
    let (sell, order) = place_decided(&commands, portfolio, Side::Sell, "4", None).await;
    assert_eq!(order.status, OrderStatus::New);
    // 20.01 × 0.95 = 19.0095, rounded down: 19.00.
    assert_eq!(order.protection_price, Some(price("19")));
    let below = execution("s1", dec("4"), dec("18.99"), dec("0"));
    let refused = commands.execute_order(&ctx(), sell, below).await.unwrap_err();
    assert_eq!(refused.code(), "PROTECTION_PRICE_BREACHED");
    commands.execute_order(&ctx(), sell, execution("s1", dec("4"), dec("19"), dec("0"))).await.unwrap();
    wait_process_manager_idle(&db.pool).await;
    assert_eq!(portfolio_state(&commands, portfolio).await.positions[&sym("ACME")].quantity, dec("6"));
    assert_agreement(&commands).await;
    pm.stop().await;
    db.drop().await;
}

/// A step the process manager cannot apply is recorded, not lost: here an execution written for an order whose
/// portfolio holds no reservation for it (as a faulty import could). It is listed, a retry while the cause
/// stands is refused again, and once an operator restores the reservation the retry books it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_that_cannot_be_applied_is_listed_and_retried_once_its_cause_is_fixed() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let pm = start_process_manager(commands.clone());
    let portfolio = open_portfolio(&commands, "1000", CostBasisMethod::Fifo).await;
    let order_id = OrderId::generate();
    let recorded = ledger::domain::OrderEvent::ExecutionRecorded {
        portfolio_id: portfolio,
        symbol: sym("ACME"),
        side: Side::Buy,
        exec_id: ExecId::new("imported-1").unwrap(),
        quantity: qty("2"),
        price: price("10"),
        fee: Money::new(dec("0.5")).unwrap(),
        executed_at: chrono::Utc::now(),
        cum_quantity: dec("2"),
        leaves_quantity: dec("0"),
        average_price: dec("10"),
        status: OrderStatus::Filled,
    };
    sqlx::query(
        "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         values ('Order', $1, 1, 'ExecutionRecorded', '1', $2, '{}')",
    )
    .bind(order_id.to_string())
    .bind(serde_json::to_value(&recorded).unwrap())
    .execute(&db.pool)
    .await
    .unwrap();
    wait_process_manager_idle(&db.pool).await;
    let open = failures::list(&db.pool, true, None, 10).await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].error_code, "NO_RESERVATION");
    assert_eq!(failures::open_count(&db.pool).await.unwrap(), 1);

    let manager = ProcessManager::new(commands.clone(), ProcessConfig::default());
    let again = manager.retry_failure(open[0].event_id, "operator").await.unwrap();
    assert!(matches!(again, RetryOutcome::StillFailing { ref code, .. } if code == "NO_RESERVATION"), "{again:?}");

    // The fix: the reservation the order should have had.
    let reserve = PortfolioCommand::ReserveFunds {
        order_id,
        symbol: sym("ACME"),
        quantity: qty("2"),
        price: price("10"),
        amount: Money::new(dec("20.2")).unwrap(),
        at: chrono::Utc::now(),
    };
    commands.execute_portfolio(&ctx(), portfolio, reserve).await.unwrap();
    assert_eq!(manager.retry_failure(open[0].event_id, "operator").await.unwrap(), RetryOutcome::Applied);
    assert_eq!(manager.retry_failure(open[0].event_id, "operator").await.unwrap(), RetryOutcome::NotOpen);
    let state = portfolio_state(&commands, portfolio).await;
    assert_eq!((state.cash, state.reserved_cash), (dec("979.5"), dec("0")));
    let resolved = failures::list(&db.pool, false, None, 10).await.unwrap();
    assert_eq!(
        (resolved[0].resolution.as_deref(), resolved[0].resolved_by.as_deref()),
        (Some("retried"), Some("operator"))
    );
    assert_eq!(failures::open_count(&db.pool).await.unwrap(), 0);
    pm.stop().await;
    db.drop().await;
}

// -------------------------------------------------------------------------------------------------------------
// The property: random orders, fills (fees beyond the allowance included), cancels and cash movements

#[derive(Debug, Clone)]
enum Step {
    Deposit(u32),
    Withdraw(u32),
    /// A limit buy of `quantity` at `limit`.
    Buy {
        quantity: u32,
        limit: u32,
    },
    /// A limit sell of `quarters`/4 of the free position (at least 1) at `limit`.
    Sell {
        quarters: u32,
        limit: u32,
    },
    /// A fill of `quarters`/4 (at least 1) of an open order's leaves, `improve_bps` better than its limit, with a
    /// fee of `fee_bps` of its value (the reservation allows 100).
    Fill {
        order: prop::sample::Index,
        quarters: u32,
        improve_bps: u32,
        fee_bps: u32,
    },
    Cancel {
        order: prop::sample::Index,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (100u32..5_000).prop_map(Step::Deposit),
        1 => (1u32..3_000).prop_map(Step::Withdraw),
        3 => ((1u32..20), (5u32..200)).prop_map(|(quantity, limit)| Step::Buy { quantity, limit }),
        2 => ((1u32..=4), (5u32..200)).prop_map(|(quarters, limit)| Step::Sell { quarters, limit }),
        5 => (any::<prop::sample::Index>(), 1u32..=4, 0u32..300, prop_oneof![0u32..=100, 100u32..=800])
            .prop_map(|(order, quarters, improve_bps, fee_bps)| Step::Fill { order, quarters, improve_bps, fee_bps }),
        1 => any::<prop::sample::Index>().prop_map(|order| Step::Cancel { order }),
    ]
}

/// What the test itself booked, from the commands the ledger accepted.
#[derive(Default)]
struct Expected {
    cash: Decimal,
}

fn bps(value: Decimal, bps: u32) -> Decimal {
    value * Decimal::from(bps) / Decimal::from(10_000)
}

async fn run_step(
    commands: &CommandService,
    pool: &sqlx::PgPool,
    portfolio: PortfolioId,
    orders: &mut Vec<OrderId>,
    expected: &mut Expected,
    step: &Step,
) {
    let id = portfolio;
    let now = chrono::Utc::now();
    match step {
        Step::Deposit(value) => {
            let deposit =
                PortfolioCommand::DepositCash { amount: amount(&value.to_string()), reference: None, at: now };
            commands.execute_portfolio(&ctx(), id, deposit).await.unwrap();
            expected.cash += Decimal::from(*value);
        }
        Step::Withdraw(value) => {
            let withdraw =
                PortfolioCommand::WithdrawCash { amount: amount(&value.to_string()), reference: None, at: now };
            match commands.execute_portfolio(&ctx(), id, withdraw).await {
                Ok(_) => expected.cash -= Decimal::from(*value),
                Err(CommandError::Portfolio(_)) => {}
                Err(error) => panic!("{error}"),
            }
        }
        Step::Buy { quantity, limit } => {
            let (order_id, order) =
                place_decided(commands, portfolio, Side::Buy, &quantity.to_string(), Some(&limit.to_string())).await;
            if order.status == OrderStatus::New {
                orders.push(order_id);
            }
        }
        Step::Sell { quarters, limit } => {
            let free = portfolio_state(commands, portfolio)
                .await
                .positions
                .get(&sym("ACME"))
                .map_or(Decimal::ZERO, |p| p.free_quantity());
            let quantity = (free * Decimal::from(*quarters) / Decimal::from(4)).floor().max(Decimal::ONE);
            let (order_id, order) =
                place_decided(commands, portfolio, Side::Sell, &quantity.to_string(), Some(&limit.to_string())).await;
            if order.status == OrderStatus::New {
                orders.push(order_id);
            }
        }
        Step::Fill { order, quarters, improve_bps, fee_bps } => {
            let open: Vec<OrderId> = {
                let mut open = Vec::new();
                for order_id in orders.iter() {
                    if !order_state(commands, *order_id).await.status.is_terminal() {
                        open.push(*order_id);
                    }
                }
                open
            };
            if open.is_empty() {
                return;
            }
            let order_id = open[order.index(open.len())];
            let state = order_state(commands, order_id).await;
            let terms = state.terms.clone().unwrap();
            let limit = terms.order_type.limit_price().unwrap().value();
            let quantity =
                (state.leaves_quantity * Decimal::from(*quarters) / Decimal::from(4)).floor().max(Decimal::ONE);
            let fill_price = match terms.side {
                Side::Buy => limit - bps(limit, *improve_bps),
                Side::Sell => limit + bps(limit, *improve_bps),
            }
            .round_dp_with_strategy(2, RoundingStrategy::ToZero)
            .max(dec("0.01"));
            let gross = (quantity * fill_price).round_dp_with_strategy(8, RoundingStrategy::MidpointNearestEven);
            let fee = bps(gross, *fee_bps).round_dp(8);
            let exec = format!("x{}", state.exec_ids.len() + 1);
            commands.execute_order(&ctx(), order_id, execution(&exec, quantity, fill_price, fee)).await.unwrap();
            expected.cash += match terms.side {
                Side::Buy => -(gross + fee),
                Side::Sell => gross - fee,
            };
        }
        Step::Cancel { order } => {
            if orders.is_empty() {
                return;
            }
            let order_id = orders[order.index(orders.len())];
            let cancel = OrderCommand::CancelOrder { reason: text("test"), canceled_at: now };
            match commands.execute_order(&ctx(), order_id, cancel).await {
                Ok(_) | Err(CommandError::Order(_)) => {}
                Err(error) => panic!("{error}"),
            }
        }
    }
    // The next step sees what the process manager made of this one.
    wait_process_manager_idle(pool).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// After the process manager settles, for every order the fills booked on the portfolio equal the order's
    /// cumulative quantity and fees, no reservation outlives its order, and cash = deposits − withdrawals − buys
    /// + sells − fees (to the last digit, from the test's own booking), deficits included.
    #[test]
    fn every_fill_is_booked_once_and_cash_adds_up(steps in prop::collection::vec(step(), 10..40)) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let db = TestDb::new_with(8).await;
            let commands: Arc<CommandService> = db.commands();
            let pm = start_process_manager(commands.clone());
            let portfolio = open_portfolio(&commands, "0", CostBasisMethod::Fifo).await;
            let (mut orders, mut expected) = (Vec::new(), Expected::default());
            for step in &steps {
                run_step(&commands, &db.pool, portfolio, &mut orders, &mut expected, step).await;
            }
            assert_agreement(&commands).await;
            let state = portfolio_state(&commands, portfolio).await;
            assert_eq!(state.cash, expected.cash);
            assert_eq!(state.check_invariants(), Ok(()));
            pm.stop().await;
            db.drop().await;
        });
    }
}
