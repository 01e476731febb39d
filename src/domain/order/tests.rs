//! Given / when / then tests for every rule and every error of the Order aggregate.
//!
//! Histories are written as events and expectations as events or `OrderError` values, so each test reads as
//! the rule it pins down. The helpers at the top keep the fixed parts of an order (ids, symbol, times) out of
//! the way; only the numbers a rule is about appear in the tests.

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use cqrs_es::Aggregate;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use uuid::Uuid;

use super::{
    Order, OrderCommand, OrderError, OrderEvent, OrderRejectReason, OrderServices, OrderStatus, OrderType, PlaceOrder,
    RecordExecution, RejectCode, Side, TickRef, TimeInForce,
};
use crate::domain::values::{
    ClientOrderId, ExecId, FreeText, Money, OrderId, PortfolioId, Price, Quantity, Symbol, TickSize,
};

// ---------------------------------------------------------------------------------------------------------------
// Helpers

fn framework() -> TestFramework<Order> {
    TestFramework::with(OrderServices::default())
}

/// A fixed instant, `seconds` after an arbitrary origin: tests never read the clock.
fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + seconds, 0).unwrap()
}

fn order_id() -> OrderId {
    OrderId(Uuid::from_u128(0x0001))
}

fn portfolio_id() -> PortfolioId {
    PortfolioId(Uuid::from_u128(0x0002))
}

fn aapl() -> Symbol {
    Symbol::new("AAPL").unwrap()
}

fn quantity(value: Decimal) -> Quantity {
    Quantity::new(value).unwrap()
}

fn price(value: Decimal) -> Price {
    Price::new(value).unwrap()
}

fn limit(value: Decimal) -> OrderType {
    OrderType::Limit { limit_price: price(value) }
}

fn place(side: Side, order_type: OrderType, qty: Decimal, time_in_force: TimeInForce) -> PlaceOrder {
    PlaceOrder {
        order_id: order_id(),
        portfolio_id: portfolio_id(),
        client_order_id: ClientOrderId::new("client-1").unwrap(),
        symbol: aapl(),
        side,
        order_type,
        quantity: quantity(qty),
        time_in_force,
        placed_at: at(0),
    }
}

/// The event a successful `PlaceOrder` records: the command's terms, unchanged.
fn placed_from(cmd: PlaceOrder) -> OrderEvent {
    OrderEvent::OrderPlaced {
        order_id: cmd.order_id,
        portfolio_id: cmd.portfolio_id,
        client_order_id: cmd.client_order_id,
        symbol: cmd.symbol,
        side: cmd.side,
        order_type: cmd.order_type,
        quantity: cmd.quantity,
        time_in_force: cmd.time_in_force,
        placed_at: cmd.placed_at,
    }
}

fn placed(side: Side, order_type: OrderType, qty: Decimal, time_in_force: TimeInForce) -> OrderEvent {
    placed_from(place(side, order_type, qty, time_in_force))
}

fn placed_limit_buy(qty: Decimal, limit_price: Decimal) -> OrderEvent {
    placed(Side::Buy, limit(limit_price), qty, TimeInForce::Day)
}

fn placed_limit_sell(qty: Decimal, limit_price: Decimal) -> OrderEvent {
    placed(Side::Sell, limit(limit_price), qty, TimeInForce::Day)
}

fn placed_market_buy(qty: Decimal) -> OrderEvent {
    placed(Side::Buy, OrderType::Market, qty, TimeInForce::Day)
}

fn placed_market_sell(qty: Decimal) -> OrderEvent {
    placed(Side::Sell, OrderType::Market, qty, TimeInForce::Day)
}

fn accept(protection: Option<Decimal>) -> OrderCommand {
    OrderCommand::AcceptOrder { protection_price: protection.map(price), accepted_at: at(1) }
}

fn accepted(protection: Option<Decimal>) -> OrderEvent {
    OrderEvent::OrderAccepted { protection_price: protection.map(price), accepted_at: at(1) }
}

fn reject_reason() -> OrderRejectReason {
    OrderRejectReason { code: RejectCode::InsufficientFunds, detail: "buying power 10, needed 1000".into() }
}

fn reject() -> OrderCommand {
    OrderCommand::RejectOrder { reason: reject_reason(), rejected_at: at(1) }
}

fn rejected() -> OrderEvent {
    OrderEvent::OrderRejected { reason: reject_reason(), rejected_at: at(1) }
}

fn fill(exec_id: &str, qty: Decimal, fill_price: Decimal) -> RecordExecution {
    RecordExecution {
        exec_id: ExecId::new(exec_id).unwrap(),
        quantity: quantity(qty),
        price: price(fill_price),
        fee: Money::new(dec!(1.25)).unwrap(),
        executed_at: at(2),
    }
}

fn execute(fill: RecordExecution) -> OrderCommand {
    OrderCommand::RecordExecution(fill)
}

/// The event recording `fill` on the (AAPL, portfolio 2) order, with the derived facts a test expects.
fn recorded(
    side: Side,
    fill: RecordExecution,
    cum_quantity: Decimal,
    leaves_quantity: Decimal,
    average_price: Decimal,
    status: OrderStatus,
) -> OrderEvent {
    OrderEvent::ExecutionRecorded {
        portfolio_id: portfolio_id(),
        symbol: aapl(),
        side,
        exec_id: fill.exec_id,
        quantity: fill.quantity,
        price: fill.price,
        fee: fill.fee,
        executed_at: fill.executed_at,
        cum_quantity,
        leaves_quantity,
        average_price,
        status,
    }
}

fn cancel() -> OrderCommand {
    OrderCommand::CancelOrder { reason: FreeText::new("reason", "client request").unwrap(), canceled_at: at(3) }
}

fn canceled(canceled_quantity: Decimal) -> OrderEvent {
    OrderEvent::OrderCanceled {
        portfolio_id: portfolio_id(),
        canceled_quantity,
        reason: "client request".into(),
        canceled_at: at(3),
    }
}

fn expire() -> OrderCommand {
    OrderCommand::ExpireOrder { expired_at: at(4) }
}

fn expired(expired_quantity: Decimal) -> OrderEvent {
    OrderEvent::OrderExpired { portfolio_id: portfolio_id(), expired_quantity, expired_at: at(4) }
}

/// Every command that acts on an existing order (all but `PlaceOrder`).
fn commands_on_existing_order() -> Vec<OrderCommand> {
    vec![
        accept(None),
        reject(),
        trigger(dec!(100), None),
        execute(fill("late", dec!(1), dec!(100))),
        cancel(),
        expire(),
    ]
}

/// The state after `events`, to check what `apply` derives.
fn state_after(events: Vec<OrderEvent>) -> Order {
    let mut order = Order::default();
    for event in events {
        order.apply(event);
    }
    order
}

// ---------------------------------------------------------------------------------------------------------------
// PlaceOrder

#[test]
fn placing_a_market_order_records_its_terms() {
    let cmd = place(Side::Buy, OrderType::Market, dec!(10), TimeInForce::Day);
    framework()
        .given_no_previous_events()
        .when(OrderCommand::PlaceOrder(cmd.clone()))
        .then_expect_events(vec![placed_from(cmd)]);
}

#[test]
fn placing_a_limit_order_on_the_tick_records_its_terms() {
    let cmd = place(Side::Sell, limit(dec!(187.35)), dec!(2.5), TimeInForce::Gtc);
    framework()
        .given_no_previous_events()
        .when(OrderCommand::PlaceOrder(cmd.clone()))
        .then_expect_events(vec![placed_from(cmd)]);
}

#[test]
fn a_placed_order_is_pending_new_with_everything_open() {
    let order = state_after(vec![placed_limit_buy(dec!(10), dec!(100))]);
    assert_eq!(order.status, OrderStatus::PendingNew);
    assert_eq!((order.cum_quantity, order.leaves_quantity), (dec!(0), dec!(10)));
    assert_eq!(order.average_price(), None);
}

#[test]
fn a_limit_price_off_the_default_tick_is_refused() {
    framework()
        .given_no_previous_events()
        .when(OrderCommand::PlaceOrder(place(Side::Buy, limit(dec!(100.005)), dec!(1), TimeInForce::Day)))
        .then_expect_error(OrderError::PriceOffTick { price: dec!(100.005), tick: TickSize::CENT });
}

#[test]
fn a_limit_price_is_checked_against_the_symbols_own_tick() {
    let nickel = TickSize::new(dec!(0.05)).unwrap();
    let services = || OrderServices { ticks: [(aapl(), nickel)].into(), ..OrderServices::default() };

    TestFramework::<Order>::with(services())
        .given_no_previous_events()
        .when(OrderCommand::PlaceOrder(place(Side::Buy, limit(dec!(100.01)), dec!(1), TimeInForce::Day)))
        .then_expect_error(OrderError::PriceOffTick { price: dec!(100.01), tick: nickel });

    let on_tick = place(Side::Buy, limit(dec!(100.05)), dec!(1), TimeInForce::Day);
    TestFramework::<Order>::with(services())
        .given_no_previous_events()
        .when(OrderCommand::PlaceOrder(on_tick.clone()))
        .then_expect_events(vec![placed_from(on_tick)]);
}

#[test]
fn a_symbol_without_its_own_tick_uses_the_default_tick() {
    let nickel = TickSize::new(dec!(0.05)).unwrap();
    let services = OrderServices { ticks: [(Symbol::new("MSFT").unwrap(), nickel)].into(), ..OrderServices::default() };
    let cmd = place(Side::Buy, limit(dec!(100.01)), dec!(1), TimeInForce::Day);
    TestFramework::<Order>::with(services)
        .given_no_previous_events()
        .when(OrderCommand::PlaceOrder(cmd.clone()))
        .then_expect_events(vec![placed_from(cmd)]);
}

#[test]
fn placing_an_order_twice_is_refused() {
    framework()
        .given(vec![placed_market_buy(dec!(10))])
        .when(OrderCommand::PlaceOrder(place(Side::Buy, OrderType::Market, dec!(10), TimeInForce::Day)))
        .then_expect_error(OrderError::AlreadyExists);
}

#[test]
fn every_command_on_a_never_placed_order_is_not_found() {
    for command in commands_on_existing_order() {
        let name = command.name();
        let result = framework().given_no_previous_events().when(command).inspect_result();
        assert_eq!(result, Err(OrderError::NotFound), "{name}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// AcceptOrder / RejectOrder

#[test]
fn accepting_a_market_order_keeps_its_protection_price() {
    framework()
        .given(vec![placed_market_buy(dec!(10))])
        .when(accept(Some(dec!(105))))
        .then_expect_events(vec![accepted(Some(dec!(105)))]);
}

#[test]
fn accepting_a_limit_order_ignores_a_protection_price() {
    framework()
        .given(vec![placed_limit_buy(dec!(10), dec!(100))])
        .when(accept(Some(dec!(105))))
        .then_expect_events(vec![accepted(None)]);
}

#[test]
fn an_accepted_order_is_new() {
    let order = state_after(vec![placed_market_buy(dec!(10)), accepted(Some(dec!(105)))]);
    assert_eq!(order.status, OrderStatus::New);
    assert_eq!(order.protection_price, Some(price(dec!(105))));
}

#[test]
fn accepting_twice_is_refused() {
    framework()
        .given(vec![placed_market_buy(dec!(10)), accepted(Some(dec!(105)))])
        .when(accept(Some(dec!(105))))
        .then_expect_error(OrderError::AlreadyAccepted);
}

#[test]
fn accepting_a_partially_filled_order_is_refused() {
    let first = fill("e1", dec!(4), dec!(100));
    framework()
        .given(vec![
            placed_limit_buy(dec!(10), dec!(100)),
            accepted(None),
            recorded(Side::Buy, first, dec!(4), dec!(6), dec!(100), OrderStatus::PartiallyFilled),
        ])
        .when(accept(None))
        .then_expect_error(OrderError::AlreadyAccepted);
}

#[test]
fn rejecting_a_pending_order_records_the_reason() {
    framework().given(vec![placed_market_buy(dec!(10))]).when(reject()).then_expect_events(vec![rejected()]);
}

#[test]
fn a_rejected_order_has_nothing_open() {
    let order = state_after(vec![placed_market_buy(dec!(10)), rejected()]);
    assert_eq!(order.status, OrderStatus::Rejected);
    assert_eq!(order.leaves_quantity, dec!(0));
    assert_eq!(order.reject_reason, Some(reject_reason()));
    assert_eq!(order.check_invariants(), Ok(()));
}

#[test]
fn rejecting_after_acceptance_is_refused() {
    framework()
        .given(vec![placed_market_buy(dec!(10)), accepted(Some(dec!(105)))])
        .when(reject())
        .then_expect_error(OrderError::AlreadyAccepted);
}

// ---------------------------------------------------------------------------------------------------------------
// RecordExecution

#[test]
fn an_execution_before_acceptance_is_refused() {
    framework()
        .given(vec![placed_limit_buy(dec!(10), dec!(100))])
        .when(execute(fill("e1", dec!(4), dec!(99))))
        .then_expect_error(OrderError::NotAccepted);
}

#[test]
fn a_partial_fill_derives_cum_leaves_average_and_status() {
    let first = fill("e1", dec!(4), dec!(99.5));
    framework()
        .given(vec![placed_limit_buy(dec!(10), dec!(100)), accepted(None)])
        .when(execute(first.clone()))
        .then_expect_events(vec![recorded(
            Side::Buy,
            first,
            dec!(4),
            dec!(6),
            dec!(99.5),
            OrderStatus::PartiallyFilled,
        )]);
}

#[test]
fn the_fill_that_closes_the_order_makes_it_filled_at_the_volume_weighted_average() {
    let first = fill("e1", dec!(4), dec!(99.5));
    let last = fill("e2", dec!(6), dec!(100));
    // (4 × 99.5 + 6 × 100) / 10 = 998 / 10
    framework()
        .given(vec![
            placed_limit_buy(dec!(10), dec!(100)),
            accepted(None),
            recorded(Side::Buy, first, dec!(4), dec!(6), dec!(99.5), OrderStatus::PartiallyFilled),
        ])
        .when(execute(last.clone()))
        .then_expect_events(vec![recorded(Side::Buy, last, dec!(10), dec!(0), dec!(99.8), OrderStatus::Filled)]);
}

#[test]
fn the_average_price_is_rounded_to_eight_decimals() {
    let fills = [fill("e1", dec!(1), dec!(10.00)), fill("e2", dec!(1), dec!(10.01)), fill("e3", dec!(1), dec!(10.01))];
    // 30.02 / 3 = 10.006666…
    framework()
        .given(vec![
            placed_limit_buy(dec!(3), dec!(11)),
            accepted(None),
            recorded(Side::Buy, fills[0].clone(), dec!(1), dec!(2), dec!(10), OrderStatus::PartiallyFilled),
            recorded(Side::Buy, fills[1].clone(), dec!(2), dec!(1), dec!(10.005), OrderStatus::PartiallyFilled),
        ])
        .when(execute(fills[2].clone()))
        .then_expect_events(vec![recorded(
            Side::Buy,
            fills[2].clone(),
            dec!(3),
            dec!(0),
            dec!(10.00666667),
            OrderStatus::Filled,
        )]);
}

#[test]
fn a_filled_order_keeps_its_fills_and_fees() {
    let first = fill("e1", dec!(4), dec!(99.5));
    let last = fill("e2", dec!(6), dec!(100));
    let order = state_after(vec![
        placed_limit_buy(dec!(10), dec!(100)),
        accepted(None),
        recorded(Side::Buy, first, dec!(4), dec!(6), dec!(99.5), OrderStatus::PartiallyFilled),
        recorded(Side::Buy, last, dec!(10), dec!(0), dec!(99.8), OrderStatus::Filled),
    ]);
    assert_eq!(order.status, OrderStatus::Filled);
    assert_eq!((order.cum_quantity, order.leaves_quantity), (dec!(10), dec!(0)));
    assert_eq!(order.average_price(), Some(dec!(99.8)));
    assert_eq!(order.fees, dec!(2.5));
    assert_eq!(order.exec_ids.len(), 2);
    assert_eq!(order.check_invariants(), Ok(()));
}

#[test]
fn an_execution_id_is_recorded_once() {
    let first = fill("e1", dec!(4), dec!(99.5));
    framework()
        .given(vec![
            placed_limit_buy(dec!(10), dec!(100)),
            accepted(None),
            recorded(Side::Buy, first.clone(), dec!(4), dec!(6), dec!(99.5), OrderStatus::PartiallyFilled),
        ])
        .when(execute(fill("e1", dec!(1), dec!(99))))
        .then_expect_error(OrderError::DuplicateExecId(first.exec_id));
}

#[test]
fn a_fill_larger_than_the_order_is_an_overfill() {
    framework()
        .given(vec![placed_limit_buy(dec!(10), dec!(100)), accepted(None)])
        .when(execute(fill("e1", dec!(10.5), dec!(100))))
        .then_expect_error(OrderError::Overfill { quantity: dec!(10.5), leaves: dec!(10) });
}

#[test]
fn a_fill_larger_than_what_is_left_is_an_overfill() {
    let first = fill("e1", dec!(4), dec!(100));
    framework()
        .given(vec![
            placed_limit_buy(dec!(10), dec!(100)),
            accepted(None),
            recorded(Side::Buy, first, dec!(4), dec!(6), dec!(100), OrderStatus::PartiallyFilled),
        ])
        .when(execute(fill("e2", dec!(7), dec!(100))))
        .then_expect_error(OrderError::Overfill { quantity: dec!(7), leaves: dec!(6) });
}

#[test]
fn a_limit_buy_never_fills_above_its_limit() {
    framework()
        .given(vec![placed_limit_buy(dec!(10), dec!(100)), accepted(None)])
        .when(execute(fill("e1", dec!(1), dec!(100.01))))
        .then_expect_error(OrderError::LimitBreached { price: dec!(100.01), limit: dec!(100) });
}

#[test]
fn a_limit_buy_fills_at_or_below_its_limit() {
    for fill_price in [dec!(100), dec!(99.99)] {
        let at_price = fill("e1", dec!(1), fill_price);
        framework()
            .given(vec![placed_limit_buy(dec!(10), dec!(100)), accepted(None)])
            .when(execute(at_price.clone()))
            .then_expect_events(vec![recorded(
                Side::Buy,
                at_price,
                dec!(1),
                dec!(9),
                fill_price,
                OrderStatus::PartiallyFilled,
            )]);
    }
}

#[test]
fn a_limit_sell_never_fills_below_its_limit() {
    framework()
        .given(vec![placed_limit_sell(dec!(10), dec!(100)), accepted(None)])
        .when(execute(fill("e1", dec!(1), dec!(99.99))))
        .then_expect_error(OrderError::LimitBreached { price: dec!(99.99), limit: dec!(100) });
}

#[test]
fn a_limit_sell_fills_at_or_above_its_limit() {
    for fill_price in [dec!(100), dec!(100.01)] {
        let at_price = fill("e1", dec!(1), fill_price);
        framework()
            .given(vec![placed_limit_sell(dec!(10), dec!(100)), accepted(None)])
            .when(execute(at_price.clone()))
            .then_expect_events(vec![recorded(
                Side::Sell,
                at_price,
                dec!(1),
                dec!(9),
                fill_price,
                OrderStatus::PartiallyFilled,
            )]);
    }
}

#[test]
fn a_market_buy_never_fills_above_its_protection_price() {
    framework()
        .given(vec![placed_market_buy(dec!(10)), accepted(Some(dec!(105)))])
        .when(execute(fill("e1", dec!(1), dec!(105.01))))
        .then_expect_error(OrderError::ProtectionBreached { price: dec!(105.01), protection: dec!(105) });
}

#[test]
fn a_market_buy_fills_at_its_protection_price() {
    let at_protection = fill("e1", dec!(10), dec!(105));
    framework()
        .given(vec![placed_market_buy(dec!(10)), accepted(Some(dec!(105)))])
        .when(execute(at_protection.clone()))
        .then_expect_events(vec![recorded(
            Side::Buy,
            at_protection,
            dec!(10),
            dec!(0),
            dec!(105),
            OrderStatus::Filled,
        )]);
}

#[test]
fn a_market_sell_never_fills_below_its_protection_price() {
    framework()
        .given(vec![placed_market_sell(dec!(10)), accepted(Some(dec!(95)))])
        .when(execute(fill("e1", dec!(1), dec!(94.99))))
        .then_expect_error(OrderError::ProtectionBreached { price: dec!(94.99), protection: dec!(95) });
}

#[test]
fn a_market_sell_fills_at_its_protection_price() {
    let at_protection = fill("e1", dec!(10), dec!(95));
    framework()
        .given(vec![placed_market_sell(dec!(10)), accepted(Some(dec!(95)))])
        .when(execute(at_protection.clone()))
        .then_expect_events(vec![recorded(
            Side::Sell,
            at_protection,
            dec!(10),
            dec!(0),
            dec!(95),
            OrderStatus::Filled,
        )]);
}

#[test]
fn a_market_order_accepted_without_protection_fills_at_any_price() {
    let anywhere = fill("e1", dec!(10), dec!(1000000));
    framework()
        .given(vec![placed_market_buy(dec!(10)), accepted(None)])
        .when(execute(anywhere.clone()))
        .then_expect_events(vec![recorded(Side::Buy, anywhere, dec!(10), dec!(0), dec!(1000000), OrderStatus::Filled)]);
}

#[test]
fn a_fill_or_kill_order_refuses_a_partial_fill() {
    framework()
        .given(vec![placed(Side::Buy, limit(dec!(100)), dec!(10), TimeInForce::Fok), accepted(None)])
        .when(execute(fill("e1", dec!(4), dec!(100))))
        .then_expect_error(OrderError::FillOrKillPartial { quantity: dec!(4), order_quantity: dec!(10) });
}

#[test]
fn a_fill_or_kill_order_fills_all_at_once() {
    let all = fill("e1", dec!(10), dec!(99));
    framework()
        .given(vec![placed(Side::Buy, limit(dec!(100)), dec!(10), TimeInForce::Fok), accepted(None)])
        .when(execute(all.clone()))
        .then_expect_events(vec![recorded(Side::Buy, all, dec!(10), dec!(0), dec!(99), OrderStatus::Filled)]);
}

#[test]
fn an_immediate_or_cancel_order_may_fill_partially() {
    let part = fill("e1", dec!(4), dec!(99));
    framework()
        .given(vec![placed(Side::Buy, limit(dec!(100)), dec!(10), TimeInForce::Ioc), accepted(None)])
        .when(execute(part.clone()))
        .then_expect_events(vec![recorded(Side::Buy, part, dec!(4), dec!(6), dec!(99), OrderStatus::PartiallyFilled)]);
}

// ---------------------------------------------------------------------------------------------------------------
// CancelOrder / ExpireOrder

#[test]
fn canceling_an_accepted_order_cancels_all_of_it() {
    framework()
        .given(vec![placed_limit_buy(dec!(10), dec!(100)), accepted(None)])
        .when(cancel())
        .then_expect_events(vec![canceled(dec!(10))]);
}

#[test]
fn canceling_a_partially_filled_order_cancels_what_is_left() {
    let first = fill("e1", dec!(4), dec!(100));
    framework()
        .given(vec![
            placed_limit_buy(dec!(10), dec!(100)),
            accepted(None),
            recorded(Side::Buy, first, dec!(4), dec!(6), dec!(100), OrderStatus::PartiallyFilled),
        ])
        .when(cancel())
        .then_expect_events(vec![canceled(dec!(6))]);
}

#[test]
fn a_pending_order_can_be_canceled() {
    framework().given(vec![placed_market_sell(dec!(3))]).when(cancel()).then_expect_events(vec![canceled(dec!(3))]);
}

#[test]
fn a_canceled_order_keeps_its_fills_and_has_nothing_open() {
    let first = fill("e1", dec!(4), dec!(100));
    let order = state_after(vec![
        placed_limit_buy(dec!(10), dec!(100)),
        accepted(None),
        recorded(Side::Buy, first, dec!(4), dec!(6), dec!(100), OrderStatus::PartiallyFilled),
        canceled(dec!(6)),
    ]);
    assert_eq!(order.status, OrderStatus::Canceled);
    assert_eq!((order.cum_quantity, order.leaves_quantity), (dec!(4), dec!(0)));
    assert_eq!(order.check_invariants(), Ok(()));
}

#[test]
fn expiring_an_order_expires_what_is_left() {
    let first = fill("e1", dec!(4), dec!(100));
    framework()
        .given(vec![
            placed_limit_buy(dec!(10), dec!(100)),
            accepted(None),
            recorded(Side::Buy, first, dec!(4), dec!(6), dec!(100), OrderStatus::PartiallyFilled),
        ])
        .when(expire())
        .then_expect_events(vec![expired(dec!(6))]);
}

#[test]
fn a_pending_order_can_expire() {
    framework().given(vec![placed_market_buy(dec!(10))]).when(expire()).then_expect_events(vec![expired(dec!(10))]);
}

// ---------------------------------------------------------------------------------------------------------------
// Terminal states

/// One history per terminal state.
fn terminal_histories() -> Vec<(OrderStatus, Vec<OrderEvent>)> {
    let all = fill("e1", dec!(10), dec!(100));
    vec![
        (
            OrderStatus::Filled,
            vec![
                placed_limit_buy(dec!(10), dec!(100)),
                accepted(None),
                recorded(Side::Buy, all, dec!(10), dec!(0), dec!(100), OrderStatus::Filled),
            ],
        ),
        (OrderStatus::Canceled, vec![placed_limit_buy(dec!(10), dec!(100)), accepted(None), canceled(dec!(10))]),
        (OrderStatus::Rejected, vec![placed_limit_buy(dec!(10), dec!(100)), rejected()]),
        (OrderStatus::Expired, vec![placed_limit_buy(dec!(10), dec!(100)), accepted(None), expired(dec!(10))]),
    ]
}

#[test]
fn every_command_on_a_terminal_order_is_refused_with_its_status() {
    for (status, history) in terminal_histories() {
        assert_eq!(state_after(history.clone()).status, status);
        for command in commands_on_existing_order() {
            let name = command.name();
            let result = framework().given(history.clone()).when(command).inspect_result();
            assert_eq!(result, Err(OrderError::Terminal { status }), "{name} on {status}");
        }
    }
}

#[test]
fn placing_again_over_a_terminal_order_is_already_exists() {
    for (status, history) in terminal_histories() {
        let result = framework()
            .given(history)
            .when(OrderCommand::PlaceOrder(place(Side::Buy, limit(dec!(100)), dec!(10), TimeInForce::Day)))
            .inspect_result();
        assert_eq!(result, Err(OrderError::AlreadyExists), "{status}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Invariants

#[test]
fn an_event_that_would_break_an_invariant_is_not_written() {
    // A corrupt history (cum 4 + leaves 9 on a 10-lot order) lets a 9-lot fill through the leaves check; the
    // state it would lead to has filled 13 of 10, so `handle` refuses to write it.
    let corrupt = OrderEvent::ExecutionRecorded {
        portfolio_id: portfolio_id(),
        symbol: aapl(),
        side: Side::Buy,
        exec_id: ExecId::new("e1").unwrap(),
        quantity: quantity(dec!(4)),
        price: price(dec!(100)),
        fee: Money::ZERO,
        executed_at: at(2),
        cum_quantity: dec!(4),
        leaves_quantity: dec!(9),
        average_price: dec!(100),
        status: OrderStatus::PartiallyFilled,
    };
    framework()
        .given(vec![placed_limit_buy(dec!(10), dec!(100)), accepted(None), corrupt])
        .when(execute(fill("e2", dec!(9), dec!(100))))
        .then_expect_error(OrderError::InvariantViolated("filled more than the order quantity".into()));
}

#[test]
fn check_invariants_catches_inconsistent_states() {
    let placed = state_after(vec![placed_limit_buy(dec!(10), dec!(100)), accepted(None)]);
    assert_eq!(placed.check_invariants(), Ok(()));

    let lost_quantity = Order { leaves_quantity: dec!(9), ..placed.clone() };
    assert_eq!(
        lost_quantity.check_invariants(),
        Err(OrderError::InvariantViolated("cum + leaves != order quantity".into()))
    );

    let filled_but_open =
        Order { status: OrderStatus::Filled, cum_quantity: dec!(4), leaves_quantity: dec!(6), ..placed.clone() };
    assert_eq!(
        filled_but_open.check_invariants(),
        Err(OrderError::InvariantViolated("filled order with open quantity".into()))
    );

    assert_eq!(Order::default().check_invariants(), Ok(()));
}

#[test]
fn command_and_event_names_are_the_serialised_tags() {
    use cqrs_es::DomainEvent;
    let command = cancel();
    assert_eq!(serde_json::to_value(&command).unwrap()["type"], command.name());
    let event = canceled(dec!(1));
    let tagged = serde_json::to_value(&event).unwrap();
    assert!(tagged.get(event.event_type()).is_some(), "{tagged} is not tagged {}", event.event_type());
}

// ---------------------------------------------------------------------------------------------------------------
// Stop and stop-limit orders

fn stop(stop_price: Decimal) -> OrderType {
    OrderType::Stop { stop_price: price(stop_price) }
}

fn stop_limit(stop_price: Decimal, limit_price: Decimal) -> OrderType {
    OrderType::StopLimit { stop_price: price(stop_price), limit_price: price(limit_price) }
}

fn tick_ref() -> TickRef {
    TickRef { ts: at(2), seq: 42 }
}

fn trigger(at_price: Decimal, tick: Option<TickRef>) -> OrderCommand {
    OrderCommand::TriggerOrder { price: price(at_price), tick, triggered_at: at(2) }
}

fn triggered(at_price: Decimal, tick: Option<TickRef>, triggered_at: DateTime<Utc>) -> OrderEvent {
    OrderEvent::OrderTriggered { portfolio_id: portfolio_id(), trigger_price: price(at_price), tick, triggered_at }
}

#[test]
fn a_stop_is_triggered_by_a_price_at_or_beyond_it_and_records_the_tick() {
    let buy_stop = vec![placed(Side::Buy, stop(dec!(100)), dec!(10), TimeInForce::Gtc), accepted(Some(dec!(105)))];
    framework().given(buy_stop.clone()).when(trigger(dec!(100), Some(tick_ref()))).then_expect_events(vec![triggered(
        dec!(100),
        Some(tick_ref()),
        at(2),
    )]);
    framework()
        .given(buy_stop.clone())
        .when(trigger(dec!(99.99), Some(tick_ref())))
        .then_expect_error(OrderError::StopNotReached { price: dec!(99.99), stop: dec!(100) });
    let sell_stop = vec![placed(Side::Sell, stop(dec!(90)), dec!(10), TimeInForce::Gtc), accepted(Some(dec!(85.5)))];
    framework().given(sell_stop.clone()).when(trigger(dec!(89), None)).then_expect_events(vec![triggered(
        dec!(89),
        None,
        at(2),
    )]);
    framework()
        .given(sell_stop)
        .when(trigger(dec!(90.01), None))
        .then_expect_error(OrderError::StopNotReached { price: dec!(90.01), stop: dec!(90) });
    // Once, only for accepted stop orders.
    framework()
        .given(vec![buy_stop[0].clone(), buy_stop[1].clone(), triggered(dec!(100), None, at(2))])
        .when(trigger(dec!(101), None))
        .then_expect_error(OrderError::AlreadyTriggered);
    framework()
        .given(vec![buy_stop[0].clone()])
        .when(trigger(dec!(101), None))
        .then_expect_error(OrderError::NotAccepted);
    framework()
        .given(vec![placed_limit_buy(dec!(10), dec!(100)), accepted(None)])
        .when(trigger(dec!(101), None))
        .then_expect_error(OrderError::NotAStopOrder);
}

#[test]
fn a_triggered_stop_fills_like_a_market_order_within_its_protection() {
    let history = vec![
        placed(Side::Buy, stop(dec!(100)), dec!(10), TimeInForce::Gtc),
        accepted(Some(dec!(105))),
        triggered(dec!(100), Some(tick_ref()), at(2)),
    ];
    let within = fill("x1", dec!(10), dec!(104.5));
    framework().given(history.clone()).when(execute(within.clone())).then_expect_events(vec![recorded(
        Side::Buy,
        within,
        dec!(10),
        dec!(0),
        dec!(104.5),
        OrderStatus::Filled,
    )]);
    framework()
        .given(history)
        .when(execute(fill("x1", dec!(10), dec!(105.01))))
        .then_expect_error(OrderError::ProtectionBreached { price: dec!(105.01), protection: dec!(105) });
}

/// A broker that triggered the stop in its own book just reports the fill: the ledger records the trigger at
/// the fill's price, then the fill.
#[test]
fn an_execution_on_a_stop_not_triggered_yet_triggers_it_first() {
    let history = vec![placed(Side::Buy, stop(dec!(100)), dec!(10), TimeInForce::Gtc), accepted(Some(dec!(105)))];
    let report = fill("b1", dec!(4), dec!(101));
    framework().given(history.clone()).when(execute(report.clone())).then_expect_events(vec![
        triggered(dec!(101), None, at(2)),
        recorded(Side::Buy, report, dec!(4), dec!(6), dec!(101), OrderStatus::PartiallyFilled),
    ]);
    let state = state_after(vec![history[0].clone(), history[1].clone(), triggered(dec!(101), None, at(2))]);
    assert_eq!(state.triggered, Some((at(2), price(dec!(101)))));
}

#[test]
fn a_triggered_stop_limit_never_fills_beyond_its_limit() {
    // A sell stop-limit: triggered at 90 or below, then sells at 89 or better. An accepted stop-limit carries no
    // protection price: its limit protects it.
    let history = vec![
        placed(Side::Sell, stop_limit(dec!(90), dec!(89)), dec!(5), TimeInForce::Gtc),
        accepted(None),
        triggered(dec!(88), Some(tick_ref()), at(2)),
    ];
    framework().given(vec![history[0].clone()]).when(accept(Some(dec!(85)))).then_expect_events(vec![accepted(None)]);
    framework()
        .given(history.clone())
        .when(execute(fill("x1", dec!(5), dec!(88))))
        .then_expect_error(OrderError::LimitBreached { price: dec!(88), limit: dec!(89) });
    let at_limit = fill("x1", dec!(5), dec!(89));
    framework().given(history).when(execute(at_limit.clone())).then_expect_events(vec![recorded(
        Side::Sell,
        at_limit,
        dec!(5),
        dec!(0),
        dec!(89),
        OrderStatus::Filled,
    )]);
}

#[test]
fn a_stop_price_off_the_tick_size_is_refused() {
    framework()
        .given_no_previous_events()
        .when(OrderCommand::PlaceOrder(place(Side::Buy, stop(dec!(100.005)), dec!(1), TimeInForce::Gtc)))
        .then_expect_error(OrderError::PriceOffTick { price: dec!(100.005), tick: TickSize::CENT });
}

// ---------------------------------------------------------------------------------------------------------------
// Amendments (cancel/replace)

fn amend(qty: Option<Decimal>, limit_price: Option<Decimal>, stop_price: Option<Decimal>) -> OrderCommand {
    OrderCommand::AmendOrder {
        quantity: qty.map(quantity),
        limit_price: limit_price.map(price),
        stop_price: stop_price.map(price),
        requested_at: at(5),
    }
}

fn amend_requested(qty: Decimal, order_type: OrderType, previous_quantity: Decimal, previous: OrderType) -> OrderEvent {
    OrderEvent::OrderAmendRequested {
        portfolio_id: portfolio_id(),
        request: 1,
        symbol: aapl(),
        side: Side::Buy,
        quantity: quantity(qty),
        order_type,
        previous_quantity,
        previous_order_type: previous,
        previous_protection_price: None,
        requested_at: at(5),
    }
}

fn confirm_amend() -> OrderCommand {
    OrderCommand::ConfirmAmend { request: 1, protection_price: None, confirmed_at: at(6) }
}

/// A limit buy of 10 at 100, accepted, 4 filled at 99.
fn partly_filled_limit_buy() -> Vec<OrderEvent> {
    let first = fill("x1", dec!(4), dec!(99));
    vec![
        placed_limit_buy(dec!(10), dec!(100)),
        accepted(None),
        recorded(Side::Buy, first, dec!(4), dec!(6), dec!(99), OrderStatus::PartiallyFilled),
    ]
}

#[test]
fn an_amendment_is_requested_then_confirmed_as_a_new_version() {
    let request = amend_requested(dec!(15), limit(dec!(101)), dec!(10), limit(dec!(100)));
    framework()
        .given(partly_filled_limit_buy())
        .when(amend(Some(dec!(15)), Some(dec!(101)), None))
        .then_expect_events(vec![request.clone()]);
    let pending = [partly_filled_limit_buy(), vec![request.clone()]].concat();
    framework().given(pending.clone()).when(confirm_amend()).then_expect_events(vec![OrderEvent::OrderAmended {
        portfolio_id: portfolio_id(),
        request: 1,
        side: Side::Buy,
        quantity: quantity(dec!(15)),
        order_type: limit(dec!(101)),
        protection_price: None,
        leaves_quantity: dec!(11),
        previous_quantity: dec!(10),
        previous_order_type: limit(dec!(100)),
        previous_protection_price: None,
        version: 1,
        amended_at: at(6),
    }]);
    // A confirmation answers its own request only (a step run again after another request was made).
    framework()
        .given(pending.clone())
        .when(OrderCommand::ConfirmAmend { request: 2, protection_price: None, confirmed_at: at(6) })
        .then_expect_error(OrderError::NoAmendPending);
    // While pending: a second request is refused; fills follow the old terms (the limit is still 100).
    framework()
        .given(pending.clone())
        .when(amend(Some(dec!(20)), None, None))
        .then_expect_error(OrderError::AmendPending);
    framework()
        .given(pending)
        .when(execute(fill("x2", dec!(1), dec!(100.5))))
        .then_expect_error(OrderError::LimitBreached { price: dec!(100.5), limit: dec!(100) });
}

#[test]
fn an_amendment_at_or_below_the_filled_quantity_is_refused_also_when_fills_came_in_meanwhile() {
    framework()
        .given(partly_filled_limit_buy())
        .when(amend(Some(dec!(3)), None, None))
        .then_expect_error(OrderError::AmendBelowFilled { quantity: dec!(3), filled: dec!(4) });
    framework()
        .given(partly_filled_limit_buy())
        .when(amend(Some(dec!(4)), None, None))
        .then_expect_error(OrderError::AmendBelowFilled { quantity: dec!(4), filled: dec!(4) });
    // Requested at 5, then 2 more filled under the old terms: 6 filled, so 5 can no longer be the quantity.
    let second = fill("x2", dec!(2), dec!(99));
    let history = [
        partly_filled_limit_buy(),
        vec![
            amend_requested(dec!(5), limit(dec!(100)), dec!(10), limit(dec!(100))),
            recorded(Side::Buy, second, dec!(6), dec!(4), dec!(99), OrderStatus::PartiallyFilled),
        ],
    ]
    .concat();
    framework()
        .given(history.clone())
        .when(confirm_amend())
        .then_expect_error(OrderError::AmendBelowFilled { quantity: dec!(5), filled: dec!(6) });
    let reason = FreeText::new("reason", "filled meanwhile").unwrap();
    framework()
        .given(history)
        .when(OrderCommand::RejectAmend { request: 1, reason, rejected_at: at(6) })
        .then_expect_events(vec![OrderEvent::OrderAmendRejected {
            portfolio_id: portfolio_id(),
            request: 1,
            reason: "filled meanwhile".into(),
            rejected_at: at(6),
        }]);
}

#[test]
fn an_amendment_must_change_something_that_the_order_type_has() {
    let open = vec![placed_market_buy(dec!(10)), accepted(Some(dec!(105)))];
    framework()
        .given(open.clone())
        .when(amend(Some(dec!(10)), None, None))
        .then_expect_error(OrderError::AmendUnchanged);
    framework()
        .given(open.clone())
        .when(amend(None, Some(dec!(100)), None))
        .then_expect_error(OrderError::AmendNotApplicable { order_type: "Market", what: "limit price" });
    framework()
        .given(vec![placed_limit_buy(dec!(10), dec!(100)), accepted(None)])
        .when(amend(None, None, Some(dec!(100))))
        .then_expect_error(OrderError::AmendNotApplicable { order_type: "Limit", what: "stop price" });
    framework()
        .given(vec![placed_limit_buy(dec!(10), dec!(100))])
        .when(amend(Some(dec!(12)), None, None))
        .then_expect_error(OrderError::NotAccepted);
    framework()
        .given(vec![placed_limit_buy(dec!(10), dec!(100)), accepted(None), canceled(dec!(10))])
        .when(amend(Some(dec!(12)), None, None))
        .then_expect_error(OrderError::Terminal { status: OrderStatus::Canceled });
}

/// A stop change requested before the stop triggered does not take effect after it did.
#[test]
fn a_stop_change_is_not_confirmed_once_the_order_has_triggered() {
    let history = vec![
        placed(Side::Buy, stop(dec!(100)), dec!(10), TimeInForce::Gtc),
        accepted(Some(dec!(105))),
        OrderEvent::OrderAmendRequested {
            portfolio_id: portfolio_id(),
            request: 1,
            symbol: aapl(),
            side: Side::Buy,
            quantity: quantity(dec!(10)),
            order_type: stop(dec!(150)),
            previous_quantity: dec!(10),
            previous_order_type: stop(dec!(100)),
            previous_protection_price: Some(price(dec!(105))),
            requested_at: at(5),
        },
        triggered(dec!(100), None, at(5)),
    ];
    framework()
        .given(history)
        .when(confirm_amend())
        .then_expect_error(OrderError::AmendNotApplicable { order_type: "Stop", what: "stop price once triggered" });
}
