//! An event stored in an older version (the fixture `tests/fixtures/portfolio-v1-reservation-released.json`, as
//! version 1 of the ledger wrote it) loads, takes commands, time-travels and projects like the current shape:
//! see `ledger::domain::upcast` and docs/events.md ("Changing an event").

use ledger::commands::{CommandContext, Idempotency};
use ledger::domain::portfolio::ReleaseReason;
use ledger::domain::values::{Amount, Currency, Money, OrderId, Owner, PortfolioId, Price, Quantity, Symbol};
use ledger::domain::{CostBasisMethod, Portfolio, PortfolioCommand, PortfolioEvent};
use ledger::log::{replay_as_of, AsOf, LogPosition, LogReader};
use ledger::projections::applier::apply_events;
use ledger::projections::rebuild::{rebuild, RebuildMode};
use rust_decimal_macros::dec;

use crate::support::system::projection;
use crate::support::TestDb;

const RELEASED_V1: &str = include_str!("../fixtures/portfolio-v1-reservation-released.json");

fn keyed(key: &str) -> CommandContext {
    CommandContext::new("trader-7").with_idempotency(Idempotency::new(key, &key).unwrap())
}

#[tokio::test]
async fn an_event_stored_in_version_1_loads_and_projects_like_version_2() {
    let db = TestDb::new().await;
    let commands = db.commands();
    let portfolio = PortfolioId::generate();
    let now = chrono::Utc::now();
    let setup = [
        PortfolioCommand::OpenPortfolio {
            portfolio_id: portfolio,
            owner: Owner::new("trader-7").unwrap(),
            base_currency: Currency::new("USD").unwrap(),
            cost_basis_method: CostBasisMethod::Fifo,
            opened_at: now,
        },
        PortfolioCommand::DepositCash { amount: Amount::new(dec!(5000)).unwrap(), reference: None, at: now },
        // The reservation the fixture's release gives back (its order id, symbol and amount).
        PortfolioCommand::ReserveFunds {
            order_id: "0190f3a2-7c1e-7b5a-9d3e-2f6a1c0b9e41".parse::<OrderId>().unwrap(),
            symbol: Symbol::new("AAPL").unwrap(),
            quantity: Quantity::new(dec!(10)).unwrap(),
            price: Price::new(dec!(100.15)).unwrap(),
            amount: Money::new(dec!(1001.5)).unwrap(),
            at: now,
        },
    ];
    for (n, command) in setup.into_iter().enumerate() {
        commands.execute_portfolio(&keyed(&format!("setup-{n}")), portfolio, command).await.unwrap();
    }
    // What an older ledger wrote: version 1, the reason as the trigger's event type.
    sqlx::query(
        "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         values ('Portfolio', $1, 4, 'ReservationReleased', '1', $2::jsonb, '{}'::jsonb)",
    )
    .bind(portfolio.to_string())
    .bind(RELEASED_V1)
    .execute(&db.pool)
    .await
    .unwrap();

    // Loads (cqrs-es's store, through the upcaster) with the reservation given back.
    let fresh = db.commands();
    let (loaded, sequence) = fresh.load::<Portfolio>(&portfolio.to_string()).await.unwrap();
    assert_eq!((sequence, loaded.reserved_cash, loaded.reservations.len()), (4, dec!(0), 0));
    // Takes commands (the command writer's own loader): all the cash can be withdrawn again.
    let withdraw =
        PortfolioCommand::WithdrawCash { amount: Amount::new(dec!(5000)).unwrap(), reference: None, at: now };
    fresh.execute_portfolio(&keyed("withdraw"), portfolio, withdraw).await.unwrap();
    // The stale in-memory state of the first service is noticed and reloaded, through the upcaster too.
    let again = PortfolioCommand::DepositCash { amount: Amount::new(dec!(1)).unwrap(), reference: None, at: now };
    commands.execute_portfolio(&keyed("deposit-after"), portfolio, again).await.unwrap();

    // Decodes from the log as the current shape; the log itself keeps what was stored. The reader returns only
    // what lies below every running transaction (other tests' included): read until all six events are there.
    let mut reader = LogReader::new(db.pool.clone(), LogPosition::START);
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + crate::support::CONDITION_WAIT_MAX;
    while events.len() < 6 {
        let batch = reader.read_batch().await.unwrap();
        if batch.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "only {} events became readable", events.len());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        events.extend(batch);
    }
    let stored = events.iter().find(|e| e.event_type == "ReservationReleased").unwrap();
    assert_eq!(
        (stored.event_version.as_str(), &stored.payload["ReservationReleased"]["reason"]),
        ("1", &"OrderCanceled".into())
    );
    let decoded: PortfolioEvent = stored.decode().unwrap();
    assert!(
        matches!(decoded, PortfolioEvent::ReservationReleased { reason: ReleaseReason::Canceled, .. }),
        "{decoded:?}"
    );

    // Time-travels: as of the old event, the reservation is gone.
    let as_of = AsOf::position(&db.pool, stored.position).await.unwrap().unwrap();
    let (then, _) = replay_as_of::<Portfolio>(&db.pool, &portfolio.to_string(), &as_of).await.unwrap();
    assert_eq!((then.cash, then.reserved_cash), (dec!(5000), dec!(0)));

    // Projects: applied event by event (as the workers do) and folded (as a rebuild does), the same rows.
    let positions = projection("positions");
    let mut tx = db.pool.begin().await.unwrap();
    let applied = apply_events(&mut tx, positions.as_ref(), &events, false).await.unwrap();
    tx.commit().await.unwrap();
    assert!(applied.poisoned.is_empty(), "{:?}", applied.poisoned);
    let (cash, reserved): (rust_decimal::Decimal, rust_decimal::Decimal) =
        sqlx::query_as("select cash, reserved_cash from rm_portfolios where portfolio_id = $1")
            .bind(portfolio.0)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((cash, reserved), (dec!(1), dec!(0)));
    let report = rebuild(&db.pool, &positions, RebuildMode::Verify, &mut |_, _| {}).await.unwrap();
    assert!(report.differences.is_empty(), "the rebuild differs: {:?}", report.differences);
    db.drop().await;
}
