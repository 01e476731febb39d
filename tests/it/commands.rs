//! The command service against a real PostgreSQL: conflicts and retries, idempotency, typed refusals that
//! write nothing, snapshots and metadata.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ledger::commands::{CommandConfig, CommandContext, CommandError, CommandService, Idempotency};
use ledger::domain::order::RecordExecution;
use ledger::domain::values::{ExecId, Money, OrderId, PortfolioId};
use ledger::domain::{CostBasisMethod, OrderCommand, OrderError, Portfolio, PortfolioCommand, Side};
use proptest::prelude::*;
use rust_decimal::Decimal;

use crate::support::*;

fn deposit(s: &str) -> PortfolioCommand {
    PortfolioCommand::DepositCash { amount: amount(s), reference: None, at: chrono::Utc::now() }
}

async fn run_hot_aggregate(services: Vec<Arc<CommandService>>, tasks: usize, per_task: usize) -> Decimal {
    let db_pool = services[0].pool().clone();
    let commands = services[0].clone();
    let portfolio = open_portfolio(&commands, "0", CostBasisMethod::Fifo).await;
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let service = services[t % services.len()].clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    // Distinct amounts so a lost or doubled deposit shows in the total.
                    let amount = format!("{}.{:02}", t + 1, i % 100);
                    service.execute_portfolio(&ctx(), portfolio, deposit(&amount)).await.unwrap();
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    let expected: Decimal =
        (0..tasks).flat_map(|t| (0..per_task).map(move |i| dec(&format!("{}.{:02}", t + 1, i % 100)))).sum();
    let (state, sequence) = commands.load::<Portfolio>(&portfolio.to_string()).await.unwrap();
    assert_eq!(state.cash, expected);
    assert_eq!(sequence, 1 + tasks * per_task);
    let stored: i64 = sqlx::query_scalar("select count(*) from events where aggregate_id = $1")
        .bind(portfolio.to_string())
        .fetch_one(&db_pool)
        .await
        .unwrap();
    assert_eq!(stored as usize, 1 + tasks * per_task);
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_aggregate_32_tasks_in_one_process() {
    let db = TestDb::new().await;
    run_hot_aggregate(vec![db.commands()], 32, 50).await;
    db.drop().await;
}

/// Four service instances (as four processes would) without in-process queuing: the optimistic lock
/// conflicts, the retries resolve every conflict, and the balance is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_aggregate_32_tasks_across_instances_succeed_through_retries() {
    let db = TestDb::new().await;
    let config = CommandConfig { serialize_in_process: false, ..CommandConfig::default() };
    let services: Vec<_> = (0..4).map(|_| Arc::new(CommandService::new(db.pool.clone(), config.clone()))).collect();
    run_hot_aggregate(services.clone(), 32, 50).await;
    let conflicts: u64 = services.iter().map(|s| s.metrics().conflicts.load(Ordering::Relaxed)).sum();
    assert!(conflicts > 0, "the workload should have produced optimistic-lock conflicts");
    db.drop().await;
}

#[tokio::test]
async fn same_key_same_request_has_one_effect_and_the_same_result() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let portfolio = open_portfolio(&commands, "100", CostBasisMethod::Fifo).await;
    let request = ("deposit", "25.50");
    let first = commands.execute_portfolio(&keyed("dep-1", &request), portfolio, deposit("25.50")).await.unwrap();
    let events_after_first = db.count_events().await;
    let second = commands.execute_portfolio(&keyed("dep-1", &request), portfolio, deposit("25.50")).await.unwrap();
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(first.events, second.events);
    assert_eq!(db.count_events().await, events_after_first);
    let (state, _) = commands.load::<Portfolio>(&portfolio.to_string()).await.unwrap();
    assert_eq!(state.cash, dec("125.50"));

    let other = commands.execute_portfolio(&keyed("dep-1", &("deposit", "99")), portfolio, deposit("99")).await;
    assert!(matches!(other, Err(CommandError::IdempotencyKeyReused { key }) if key == "dep-1"));
    assert_eq!(db.count_events().await, events_after_first);
    db.drop().await;
}

/// Sixteen identical requests racing, across two instances: exactly one effect, sixteen equal answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_one_key_have_one_effect() {
    let db = TestDb::new().await;
    let services = [db.commands(), db.commands()];
    let portfolio = open_portfolio(&services[0], "0", CostBasisMethod::Fifo).await;
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let service = services[i % 2].clone();
            tokio::spawn(async move {
                service.execute_portfolio(&keyed("race", &"10"), portfolio, deposit("10")).await.unwrap()
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for handle in handles {
        outcomes.push(handle.await.unwrap());
    }
    assert_eq!(outcomes.iter().filter(|o| !o.duplicate).count(), 1);
    assert!(outcomes.windows(2).all(|w| w[0].events == w[1].events));
    let (state, _) = services[0].load::<Portfolio>(&portfolio.to_string()).await.unwrap();
    assert_eq!(state.cash, dec("10"));
    db.drop().await;
}

#[tokio::test]
async fn idempotency_keys_are_validated() {
    assert!(matches!(Idempotency::new("", &1), Err(CommandError::Invalid(_))));
    assert!(matches!(Idempotency::new("k".repeat(201), &1), Err(CommandError::Invalid(_))));
    assert!(Idempotency::new("k".repeat(200), &1).is_ok());
}

/// Every kind of bad input: a typed error, and not a single event written.
#[tokio::test]
async fn bad_input_is_refused_with_a_typed_error_and_writes_nothing() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let portfolio = open_portfolio(&commands, "1000", CostBasisMethod::Fifo).await;
    let (order_id, place_command) = place(portfolio, "ACME", Side::Buy, "5", Some("10"));
    commands.execute_order(&ctx(), order_id, place_command).await.unwrap();
    let now = chrono::Utc::now();
    let accept = OrderCommand::AcceptOrder { protection_price: None, accepted_at: now };
    commands.execute_order(&ctx(), order_id, accept).await.unwrap();
    let fill = |exec: &str, q: &str, p: &str| {
        OrderCommand::RecordExecution(RecordExecution {
            exec_id: ExecId::new(exec).unwrap(),
            quantity: qty(q),
            price: price(p),
            fee: Money::ZERO,
            executed_at: now,
        })
    };
    commands.execute_order(&ctx(), order_id, fill("e1", "2", "10")).await.unwrap();
    let before = db.count_events().await;

    // Values that cannot even be constructed.
    assert!(ledger::domain::values::Quantity::new(dec("0")).is_err());
    assert!(ledger::domain::values::Quantity::new(dec("-5")).is_err());
    assert!(ledger::domain::values::Amount::new(dec("-1")).is_err());

    let cases: Vec<(Result<_, CommandError>, &str)> = vec![
        (commands.execute_order(&ctx(), OrderId::generate(), fill("x", "1", "10")).await, "ORDER_NOT_FOUND"),
        (commands.execute_portfolio(&ctx(), PortfolioId::generate(), deposit("5")).await, "PORTFOLIO_NOT_FOUND"),
        (commands.execute_order(&ctx(), order_id, fill("e1", "1", "10")).await, "DUPLICATE_EXEC_ID"),
        (commands.execute_order(&ctx(), order_id, fill("e2", "4", "10")).await, "OVERFILL"),
        (commands.execute_order(&ctx(), order_id, fill("e3", "1", "10.01")).await, "LIMIT_PRICE_BREACHED"),
        (
            commands
                .execute_portfolio(
                    &ctx(),
                    portfolio,
                    PortfolioCommand::WithdrawCash { amount: amount("1000.01"), reference: None, at: now },
                )
                .await,
            "INSUFFICIENT_FUNDS",
        ),
    ];
    for (result, code) in cases {
        let error = result.expect_err(code);
        assert_eq!(error.code(), code, "{error}");
    }
    // A price off the tick grid.
    let (off_tick_id, off_tick) = place(portfolio, "ACME", Side::Buy, "1", Some("10.015"));
    let error = commands.execute_order(&ctx(), off_tick_id, off_tick).await.unwrap_err();
    assert!(matches!(error, CommandError::Order(OrderError::PriceOffTick { .. })));

    // A fill on a terminal order.
    let cancel = OrderCommand::CancelOrder { reason: text("user"), canceled_at: now };
    commands.execute_order(&ctx(), order_id, cancel).await.unwrap();
    let before_terminal = db.count_events().await;
    let error = commands.execute_order(&ctx(), order_id, fill("e9", "1", "10")).await.unwrap_err();
    assert!(matches!(error, CommandError::Order(OrderError::Terminal { .. })));
    assert_eq!(db.count_events().await, before_terminal);
    assert_eq!(before_terminal, before + 1, "only the cancel was written");

    let rejected: i64 = sqlx::query_scalar("select count(*) from command_log").fetch_one(&db.pool).await.unwrap();
    assert_eq!(rejected, 0, "refused commands leave no idempotency record");
    db.drop().await;
}

#[tokio::test]
async fn portfolios_are_snapshotted_and_load_the_same_with_or_without_the_snapshot() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let portfolio = open_portfolio(&commands, "1", CostBasisMethod::AverageCost).await;
    for i in 0..118 {
        commands.execute_portfolio(&ctx(), portfolio, deposit(&format!("1.{i:02}"))).await.unwrap();
    }
    let (last_sequence, snapshot_number): (i64, i64) = sqlx::query_as(
        "select last_sequence, current_snapshot from snapshots where aggregate_type = 'Portfolio' and aggregate_id = $1",
    )
    .bind(portfolio.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((last_sequence, snapshot_number), (100, 2));
    let (with_snapshot, sequence) = commands.load::<Portfolio>(&portfolio.to_string()).await.unwrap();
    assert_eq!(sequence, 120);
    sqlx::query("delete from snapshots").execute(&db.pool).await.unwrap();
    let (from_events, _) = commands.load::<Portfolio>(&portfolio.to_string()).await.unwrap();
    assert_eq!(with_snapshot, from_events);
    db.drop().await;
}

#[tokio::test]
async fn every_event_carries_command_correlation_actor_and_time_metadata() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let portfolio = PortfolioId::generate();
    let context = CommandContext::new("trader-7").with_idempotency(Idempotency::new("open-1", &"x").unwrap());
    let open = PortfolioCommand::OpenPortfolio {
        portfolio_id: portfolio,
        owner: ledger::domain::values::Owner::new("trader-7").unwrap(),
        base_currency: ledger::domain::values::Currency::new("EUR").unwrap(),
        cost_basis_method: CostBasisMethod::Fifo,
        opened_at: chrono::Utc::now(),
    };
    let outcome = commands.execute_portfolio(&context, portfolio, open).await.unwrap();
    let metadata: serde_json::Value = sqlx::query_scalar("select metadata from events where event_id = $1")
        .bind(outcome.events[0].event_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(metadata["actor"], "trader-7");
    assert_eq!(metadata["correlation_id"], context.correlation_id.to_string());
    assert_eq!(metadata["idempotency_key"], "open-1");
    assert_eq!(metadata["command_type"], "OpenPortfolio");
    assert!(metadata["command_id"].as_str().is_some_and(|s| uuid::Uuid::parse_str(s).is_ok()));
    assert!(metadata["issued_at"].as_str().is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()));
    db.drop().await;
}

#[derive(Debug, Clone)]
enum Step {
    Deposit(u32),
    Withdraw(u32),
    /// Buy `qty` at `price` through reserve + fill (both keyed).
    Buy(u32, u32),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u32..500).prop_map(Step::Deposit),
        (1u32..300).prop_map(Step::Withdraw),
        ((1u32..5), (1u32..50)).prop_map(|(q, p)| Step::Buy(q, p)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random command sequences where every command may be sent twice under its key: the state equals that of
    /// sending each once, and the log holds each effect once.
    #[test]
    fn repeating_keyed_commands_has_one_effect(steps in proptest::collection::vec((step(), any::<bool>()), 1..25)) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let db = TestDb::new_with(4).await;
            let once = db.commands();
            let twice = db.commands();
            let p_once = open_portfolio(&once, "0", CostBasisMethod::Fifo).await;
            let p_twice = open_portfolio(&twice, "0", CostBasisMethod::Fifo).await;
            for (i, (step, repeat)) in steps.iter().enumerate() {
                for (service, portfolio, sends) in [(&once, p_once, 1), (&twice, p_twice, if *repeat { 2 } else { 1 })] {
                    for _ in 0..sends {
                        let results = run_step(service, portfolio, i, step).await;
                        for result in results {
                            if let Err(e) = result { assert!(e.is_business(), "{e}"); }
                        }
                    }
                }
            }
            let (a, _) = once.load::<Portfolio>(&p_once.to_string()).await.unwrap();
            let (b, _) = twice.load::<Portfolio>(&p_twice.to_string()).await.unwrap();
            assert_eq!((a.cash, a.reserved_cash, &a.positions.values().map(|p| p.quantity).collect::<Vec<_>>()),
                       (b.cash, b.reserved_cash, &b.positions.values().map(|p| p.quantity).collect::<Vec<_>>()));
            let count = |id: PortfolioId| {
                let pool = db.pool.clone();
                async move {
                    sqlx::query_scalar::<_, i64>("select count(*) from events where aggregate_id = $1")
                        .bind(id.to_string()).fetch_one(&pool).await.unwrap()
                }
            };
            assert_eq!(count(p_once).await, count(p_twice).await);
            db.drop().await;
        });
    }
}

async fn run_step(
    service: &CommandService,
    portfolio: PortfolioId,
    index: usize,
    step: &Step,
) -> Vec<Result<ledger::commands::CommandOutcome, CommandError>> {
    let id = portfolio;
    let now = chrono::Utc::now();
    let key = |suffix: &str| keyed(&format!("{portfolio}-{index}-{suffix}"), &format!("{step:?}"));
    match step {
        Step::Deposit(a) => vec![service.execute_portfolio(&key("d"), id, deposit(&a.to_string())).await],
        Step::Withdraw(a) => vec![
            service
                .execute_portfolio(
                    &key("w"),
                    id,
                    PortfolioCommand::WithdrawCash { amount: amount(&a.to_string()), reference: None, at: now },
                )
                .await,
        ],
        Step::Buy(q, p) => {
            // The order id is derived from the step so that a repeat targets the same reservation.
            let order_id = OrderId(uuid::Uuid::from_u128(index as u128 + 1));
            let reserve = PortfolioCommand::ReserveFunds {
                order_id,
                symbol: sym("XYZ"),
                quantity: qty(&q.to_string()),
                price: price(&p.to_string()),
                amount: Money::new(Decimal::from(q * p)).unwrap(),
                at: now,
            };
            let reserved = service.execute_portfolio(&key("r"), id, reserve).await;
            if reserved.is_err() {
                return vec![reserved];
            }
            let apply = PortfolioCommand::ApplyExecution {
                order_id,
                exec_id: ExecId::new("1").unwrap(),
                symbol: sym("XYZ"),
                side: Side::Buy,
                quantity: qty(&q.to_string()),
                price: price(&p.to_string()),
                fee: Money::ZERO,
                executed_at: now,
            };
            vec![reserved, service.execute_portfolio(&key("a"), id, apply).await]
        }
    }
}
