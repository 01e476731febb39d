//! Given / when / then tests for every rule and every error of the Portfolio aggregate.
//!
//! Fills are described once as a [`TestFill`], which gives both the `ApplyExecution` command and, through
//! [`bought`] / [`sold`], the `ExecutionApplied` event a test expects or starts from. The accounting numbers
//! (released cash, lots consumed, cost basis removed, realized P&L) are always written out in the test, worked
//! by hand from the rule in `accounting.rs`: 8 decimals, banker's rounding, a whole remainder taken exactly.

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use cqrs_es::Aggregate;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use uuid::Uuid;

use super::{
    external_order_id, CostBasisMethod, Lot, LotConsumed, Portfolio, PortfolioCommand, PortfolioError, PortfolioEvent,
    ReleaseReason,
};
use crate::domain::order::Side;
use crate::domain::values::{
    AlertId, Amount, Currency, ExecId, FreeText, Money, OrderId, Owner, PortfolioId, Price, Quantity, Symbol,
};

// ---------------------------------------------------------------------------------------------------------------
// Helpers

fn framework() -> TestFramework<Portfolio> {
    TestFramework::with(())
}

/// The one instant every command and event of these tests carries: no rule depends on time.
fn now() -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000, 0).unwrap()
}

fn portfolio_id() -> PortfolioId {
    PortfolioId(Uuid::from_u128(0xF0))
}

fn order(n: u128) -> OrderId {
    OrderId(Uuid::from_u128(n))
}

fn aapl() -> Symbol {
    Symbol::new("AAPL").unwrap()
}

fn msft() -> Symbol {
    Symbol::new("MSFT").unwrap()
}

fn quantity(value: Decimal) -> Quantity {
    Quantity::new(value).unwrap()
}

fn price(value: Decimal) -> Price {
    Price::new(value).unwrap()
}

fn money(value: Decimal) -> Money {
    Money::new(value).unwrap()
}

fn amount(value: Decimal) -> Amount {
    Amount::new(value).unwrap()
}

fn open(method: CostBasisMethod) -> PortfolioCommand {
    PortfolioCommand::OpenPortfolio {
        portfolio_id: portfolio_id(),
        owner: Owner::new("alice").unwrap(),
        base_currency: Currency::new("USD").unwrap(),
        cost_basis_method: method,
        opened_at: now(),
    }
}

fn opened(method: CostBasisMethod) -> PortfolioEvent {
    PortfolioEvent::PortfolioOpened {
        portfolio_id: portfolio_id(),
        owner: Owner::new("alice").unwrap(),
        base_currency: Currency::new("USD").unwrap(),
        cost_basis_method: method,
        opened_at: now(),
    }
}

fn deposit(value: Decimal) -> PortfolioCommand {
    let reference = Some(FreeText::new("reference", "wire").unwrap());
    PortfolioCommand::DepositCash { amount: amount(value), reference, at: now() }
}

fn deposited(value: Decimal, cash_after: Decimal) -> PortfolioEvent {
    PortfolioEvent::CashDeposited { amount: amount(value), reference: Some("wire".into()), cash_after, at: now() }
}

fn withdraw(value: Decimal) -> PortfolioCommand {
    PortfolioCommand::WithdrawCash { amount: amount(value), reference: None, at: now() }
}

fn withdrawn(value: Decimal, cash_after: Decimal) -> PortfolioEvent {
    PortfolioEvent::CashWithdrawn { amount: amount(value), reference: None, cash_after, at: now() }
}

/// Reserve `cash` for a buy of `qty` AAPL at `at_price`.
fn reserve_funds(order_id: OrderId, qty: Decimal, at_price: Decimal, cash: Decimal) -> PortfolioCommand {
    PortfolioCommand::ReserveFunds {
        order_id,
        symbol: aapl(),
        quantity: quantity(qty),
        price: price(at_price),
        amount: money(cash),
        at: now(),
    }
}

fn funds_reserved(
    order_id: OrderId,
    qty: Decimal,
    at_price: Decimal,
    cash: Decimal,
    reserved_cash_after: Decimal,
) -> PortfolioEvent {
    PortfolioEvent::FundsReserved {
        order_id,
        symbol: aapl(),
        quantity: quantity(qty),
        price: price(at_price),
        amount: money(cash),
        reserved_cash_after,
        at: now(),
    }
}

/// Reserve `qty` AAPL for a sell.
fn reserve_quantity(order_id: OrderId, qty: Decimal) -> PortfolioCommand {
    PortfolioCommand::ReserveQuantity { order_id, symbol: aapl(), quantity: quantity(qty), at: now() }
}

fn quantity_reserved(order_id: OrderId, qty: Decimal, reserved_quantity_after: Decimal) -> PortfolioEvent {
    PortfolioEvent::QuantityReserved {
        order_id,
        symbol: aapl(),
        quantity: quantity(qty),
        reserved_quantity_after,
        at: now(),
    }
}

fn release(order_id: OrderId) -> PortfolioCommand {
    PortfolioCommand::ReleaseReservation { order_id, reason: ReleaseReason::Canceled, at: now() }
}

fn released(order_id: OrderId, cash_released: Decimal, quantity_released: Decimal) -> PortfolioEvent {
    PortfolioEvent::ReservationReleased {
        order_id,
        symbol: aapl(),
        cash_released,
        quantity_released,
        reason: ReleaseReason::Canceled,
        at: now(),
    }
}

/// One fill of an order, as the process manager reports it.
#[derive(Debug, Clone)]
struct TestFill {
    order_id: OrderId,
    exec_id: &'static str,
    symbol: Symbol,
    side: Side,
    quantity: Decimal,
    price: Decimal,
    fee: Decimal,
}

/// A fill of `qty` AAPL at `fill_price` with `fee` on buy order `order_id`.
fn buy(order_id: OrderId, exec_id: &'static str, qty: Decimal, fill_price: Decimal, fee: Decimal) -> TestFill {
    TestFill { order_id, exec_id, symbol: aapl(), side: Side::Buy, quantity: qty, price: fill_price, fee }
}

/// A fill of `qty` AAPL at `fill_price` with `fee` on sell order `order_id`.
fn sell(order_id: OrderId, exec_id: &'static str, qty: Decimal, fill_price: Decimal, fee: Decimal) -> TestFill {
    TestFill { side: Side::Sell, ..buy(order_id, exec_id, qty, fill_price, fee) }
}

impl TestFill {
    fn command(&self) -> PortfolioCommand {
        PortfolioCommand::ApplyExecution {
            order_id: self.order_id,
            exec_id: ExecId::new(self.exec_id).unwrap(),
            symbol: self.symbol.clone(),
            side: self.side,
            quantity: quantity(self.quantity),
            price: price(self.price),
            fee: money(self.fee),
            executed_at: now(),
        }
    }

    /// The id of the lot a buy fill opens: order and execution.
    fn lot_id(&self) -> String {
        format!("{}/{}", self.order_id, self.exec_id)
    }

    /// quantity × price; the tests pick numbers for which it is exact to 8 decimals.
    fn gross(&self) -> Decimal {
        self.quantity * self.price
    }

    /// The part of the lot this (buy) fill opened that a later sell consumes.
    fn consumed(&self, qty: Decimal, cost: Decimal) -> LotConsumed {
        LotConsumed { lot_id: self.lot_id(), quantity: qty, cost }
    }
}

/// The `ExecutionApplied` of a buy fill: it costs gross + fee, opens one lot at that cost and takes
/// `reserved_cash_released` off the order's reservation.
fn bought(
    fill: &TestFill,
    reserved_cash_released: Decimal,
    cash_after: Decimal,
    (position_quantity_after, position_cost_basis_after): (Decimal, Decimal),
) -> PortfolioEvent {
    let cost = fill.gross() + fill.fee;
    PortfolioEvent::ExecutionApplied {
        order_id: fill.order_id,
        exec_id: ExecId::new(fill.exec_id).unwrap(),
        symbol: fill.symbol.clone(),
        side: fill.side,
        quantity: quantity(fill.quantity),
        price: price(fill.price),
        fee: money(fill.fee),
        gross: fill.gross(),
        cash_delta: -cost,
        cash_after,
        reserved_cash_released,
        reserved_quantity_released: Decimal::ZERO,
        lot_opened: Some(Lot { lot_id: fill.lot_id(), quantity: fill.quantity, cost, acquired_at: now() }),
        lots_consumed: Vec::new(),
        cost_basis_removed: Decimal::ZERO,
        realized_pnl: Decimal::ZERO,
        position_quantity_after,
        position_cost_basis_after,
        executed_at: now(),
    }
}

/// The `ExecutionApplied` of a sell fill: it brings in gross − fee and releases the units it sold.
fn sold(
    fill: &TestFill,
    lots_consumed: Vec<LotConsumed>,
    cost_basis_removed: Decimal,
    realized_pnl: Decimal,
    cash_after: Decimal,
    (position_quantity_after, position_cost_basis_after): (Decimal, Decimal),
) -> PortfolioEvent {
    PortfolioEvent::ExecutionApplied {
        order_id: fill.order_id,
        exec_id: ExecId::new(fill.exec_id).unwrap(),
        symbol: fill.symbol.clone(),
        side: fill.side,
        quantity: quantity(fill.quantity),
        price: price(fill.price),
        fee: money(fill.fee),
        gross: fill.gross(),
        cash_delta: fill.gross() - fill.fee,
        cash_after,
        reserved_cash_released: Decimal::ZERO,
        reserved_quantity_released: fill.quantity,
        lot_opened: None,
        lots_consumed,
        cost_basis_removed,
        realized_pnl,
        position_quantity_after,
        position_cost_basis_after,
        executed_at: now(),
    }
}

/// The state after `events`, to check what `apply` derives.
fn state_after(events: &[PortfolioEvent]) -> Portfolio {
    let mut portfolio = Portfolio::default();
    for event in events {
        portfolio.apply(event.clone());
    }
    assert_eq!(portfolio.check_invariants(), Ok(()));
    portfolio
}

/// An opened FIFO portfolio holding 1000 in cash.
fn funded() -> Vec<PortfolioEvent> {
    vec![opened(CostBasisMethod::Fifo), deposited(dec!(1000), dec!(1000))]
}

/// Buy order 0xB1 (10 AAPL at 50) fills at once for 501 (fee 1).
fn b1_fill() -> TestFill {
    buy(order(0xB1), "e1", dec!(10), dec!(50), dec!(1))
}

/// [`funded`], then 10 AAPL bought for 501 in cash: cash 499, nothing reserved.
fn holding_ten(method: CostBasisMethod) -> Vec<PortfolioEvent> {
    vec![
        opened(method),
        deposited(dec!(1000), dec!(1000)),
        funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505)),
        bought(&b1_fill(), dec!(505), dec!(499), (dec!(10), dec!(501))),
    ]
}

fn with(mut history: Vec<PortfolioEvent>, more: impl IntoIterator<Item = PortfolioEvent>) -> Vec<PortfolioEvent> {
    history.extend(more);
    history
}

// ---------------------------------------------------------------------------------------------------------------
// OpenPortfolio, and commands on a portfolio that was never opened

#[test]
fn opening_a_portfolio_records_its_terms() {
    for method in [CostBasisMethod::Fifo, CostBasisMethod::AverageCost] {
        framework().given_no_previous_events().when(open(method)).then_expect_events(vec![opened(method)]);
    }
}

#[test]
fn opening_a_portfolio_twice_is_refused() {
    framework()
        .given(vec![opened(CostBasisMethod::Fifo)])
        .when(open(CostBasisMethod::AverageCost))
        .then_expect_error(PortfolioError::AlreadyExists);
}

#[test]
fn every_command_on_an_unopened_portfolio_is_not_found() {
    let commands = vec![
        deposit(dec!(100)),
        withdraw(dec!(100)),
        reserve_funds(order(0xB1), dec!(1), dec!(10), dec!(10)),
        reserve_quantity(order(0x51), dec!(1)),
        release(order(0xB1)),
        b1_fill().command(),
        external(&buy(order(0), "import:1", dec!(1), dec!(10), dec!(0))),
    ];
    for command in commands {
        let name = command.name();
        let result = framework().given_no_previous_events().when(command).inspect_result();
        assert_eq!(result, Err(PortfolioError::NotFound), "{name}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// DepositCash / WithdrawCash

#[test]
fn a_deposit_adds_to_cash() {
    framework()
        .given(funded())
        .when(deposit(dec!(250.5)))
        .then_expect_events(vec![deposited(dec!(250.5), dec!(1250.5))]);
}

#[test]
fn a_withdrawal_within_buying_power_takes_cash_out() {
    // Cash 1000, 505 reserved: buying power 495, all of which may leave.
    framework()
        .given(with(funded(), [funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505))]))
        .when(withdraw(dec!(495)))
        .then_expect_events(vec![withdrawn(dec!(495), dec!(505))]);
}

#[test]
fn a_withdrawal_beyond_buying_power_is_refused() {
    framework()
        .given(with(funded(), [funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505))]))
        .when(withdraw(dec!(495.01)))
        .then_expect_error(PortfolioError::InsufficientFunds { requested: dec!(495.01), available: dec!(495) });
}

// ---------------------------------------------------------------------------------------------------------------
// ReserveFunds

#[test]
fn reserving_funds_within_buying_power_sets_them_aside() {
    framework()
        .given(funded())
        .when(reserve_funds(order(0xB1), dec!(10), dec!(50), dec!(505)))
        .then_expect_events(vec![funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505))]);
}

#[test]
fn reservations_of_different_orders_add_up() {
    framework()
        .given(with(funded(), [funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505))]))
        .when(reserve_funds(order(0xB2), dec!(4), dec!(100), dec!(404)))
        .then_expect_events(vec![funds_reserved(order(0xB2), dec!(4), dec!(100), dec!(404), dec!(909))]);
}

#[test]
fn reserved_funds_reduce_buying_power() {
    let portfolio =
        state_after(&with(funded(), [funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505))]));
    assert_eq!((portfolio.cash, portfolio.reserved_cash, portfolio.buying_power()), (dec!(1000), dec!(505), dec!(495)));
}

#[test]
fn reserving_funds_beyond_buying_power_is_refused() {
    framework()
        .given(with(funded(), [funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505))]))
        .when(reserve_funds(order(0xB2), dec!(5), dec!(99), dec!(495.01)))
        .then_expect_error(PortfolioError::InsufficientFunds { requested: dec!(495.01), available: dec!(495) });
}

#[test]
fn reserving_the_same_funds_twice_changes_nothing() {
    framework()
        .given(with(funded(), [funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505))]))
        .when(reserve_funds(order(0xB1), dec!(10), dec!(50), dec!(505)))
        .then_expect_events(vec![]);
}

#[test]
fn a_different_reservation_for_the_same_order_is_refused() {
    let different = [
        reserve_funds(order(0xB1), dec!(10), dec!(50), dec!(600)),
        reserve_funds(order(0xB1), dec!(11), dec!(50), dec!(505)),
        PortfolioCommand::ReserveFunds {
            order_id: order(0xB1),
            symbol: msft(),
            quantity: quantity(dec!(10)),
            price: price(dec!(50)),
            amount: money(dec!(505)),
            at: now(),
        },
    ];
    for command in different {
        let result = framework()
            .given(with(funded(), [funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505))]))
            .when(command.clone())
            .inspect_result();
        assert_eq!(result, Err(PortfolioError::ReservationExists(order(0xB1))), "{command:?}");
    }
}

#[test]
fn reserving_funds_for_an_order_holding_a_sell_reservation_is_refused() {
    framework()
        .given(with(holding_ten(CostBasisMethod::Fifo), [quantity_reserved(order(0x51), dec!(4), dec!(4))]))
        .when(reserve_funds(order(0x51), dec!(4), dec!(50), dec!(0)))
        .then_expect_error(PortfolioError::ReservationExists(order(0x51)));
}

// ---------------------------------------------------------------------------------------------------------------
// ReserveQuantity

#[test]
fn reserving_held_units_sets_them_aside() {
    framework()
        .given(holding_ten(CostBasisMethod::Fifo))
        .when(reserve_quantity(order(0x51), dec!(4)))
        .then_expect_events(vec![quantity_reserved(order(0x51), dec!(4), dec!(4))]);
}

#[test]
fn reserving_all_free_units_is_allowed() {
    framework()
        .given(with(holding_ten(CostBasisMethod::Fifo), [quantity_reserved(order(0x51), dec!(4), dec!(4))]))
        .when(reserve_quantity(order(0x52), dec!(6)))
        .then_expect_events(vec![quantity_reserved(order(0x52), dec!(6), dec!(10))]);
}

#[test]
fn reserving_more_than_the_free_units_is_refused() {
    // 10 held, 4 promised to 0x51: 6 free.
    framework()
        .given(with(holding_ten(CostBasisMethod::Fifo), [quantity_reserved(order(0x51), dec!(4), dec!(4))]))
        .when(reserve_quantity(order(0x52), dec!(6.5)))
        .then_expect_error(PortfolioError::InsufficientQuantity {
            symbol: aapl(),
            requested: dec!(6.5),
            available: dec!(6),
        });
}

#[test]
fn reserving_units_of_a_symbol_not_held_is_refused() {
    framework()
        .given(funded())
        .when(PortfolioCommand::ReserveQuantity {
            order_id: order(0x51),
            symbol: msft(),
            quantity: quantity(dec!(1)),
            at: now(),
        })
        .then_expect_error(PortfolioError::InsufficientQuantity {
            symbol: msft(),
            requested: dec!(1),
            available: dec!(0),
        });
}

#[test]
fn reserving_the_same_units_twice_changes_nothing() {
    framework()
        .given(with(holding_ten(CostBasisMethod::Fifo), [quantity_reserved(order(0x51), dec!(4), dec!(4))]))
        .when(reserve_quantity(order(0x51), dec!(4)))
        .then_expect_events(vec![]);
}

#[test]
fn a_different_unit_reservation_for_the_same_order_is_refused() {
    framework()
        .given(with(holding_ten(CostBasisMethod::Fifo), [quantity_reserved(order(0x51), dec!(4), dec!(4))]))
        .when(reserve_quantity(order(0x51), dec!(5)))
        .then_expect_error(PortfolioError::ReservationExists(order(0x51)));
}

#[test]
fn reserving_units_for_an_order_holding_funds_is_refused() {
    framework()
        .given(with(
            holding_ten(CostBasisMethod::Fifo),
            [funds_reserved(order(0xB2), dec!(4), dec!(50), dec!(202), dec!(202))],
        ))
        .when(reserve_quantity(order(0xB2), dec!(4)))
        .then_expect_error(PortfolioError::ReservationExists(order(0xB2)));
}

// ---------------------------------------------------------------------------------------------------------------
// ReleaseReservation

#[test]
fn releasing_a_buy_reservation_gives_back_its_cash() {
    framework()
        .given(with(funded(), [funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505))]))
        .when(release(order(0xB1)))
        .then_expect_events(vec![released(order(0xB1), dec!(505), dec!(0))]);
}

#[test]
fn releasing_a_partly_filled_buy_gives_back_the_cash_still_reserved() {
    let first = buy(order(0xB1), "e1", dec!(4), dec!(49.5), dec!(1));
    let history = with(
        funded(),
        [
            funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505)),
            bought(&first, dec!(202), dec!(801), (dec!(4), dec!(199))),
        ],
    );
    framework().given(history.clone()).when(release(order(0xB1))).then_expect_events(vec![released(
        order(0xB1),
        dec!(303),
        dec!(0),
    )]);

    let after = state_after(&with(history, [released(order(0xB1), dec!(303), dec!(0))]));
    assert_eq!((after.cash, after.reserved_cash), (dec!(801), dec!(0)));
    assert!(after.reservations.is_empty());
}

#[test]
fn releasing_a_sell_reservation_frees_its_units() {
    let history = with(holding_ten(CostBasisMethod::Fifo), [quantity_reserved(order(0x51), dec!(4), dec!(4))]);
    framework().given(history.clone()).when(release(order(0x51))).then_expect_events(vec![released(
        order(0x51),
        dec!(0),
        dec!(4),
    )]);

    let after = state_after(&with(history, [released(order(0x51), dec!(0), dec!(4))]));
    assert_eq!(after.positions[&aapl()].reserved_quantity, dec!(0));
    assert_eq!(after.positions[&aapl()].free_quantity(), dec!(10));
}

#[test]
fn releasing_an_order_with_nothing_reserved_changes_nothing() {
    framework().given(funded()).when(release(order(0xB1))).then_expect_events(vec![]);
}

// ---------------------------------------------------------------------------------------------------------------
// ApplyExecution: buys

#[test]
fn a_partial_buy_fill_pays_gross_plus_fee_releases_its_share_and_opens_a_lot() {
    // 4 of 10 at 49.5 with fee 1: gross 198, cost 199; 4/10 of the 505 reserved (202) is released.
    let first = buy(order(0xB1), "e1", dec!(4), dec!(49.5), dec!(1));
    framework()
        .given(with(funded(), [funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505))]))
        .when(first.command())
        .then_expect_events(vec![PortfolioEvent::ExecutionApplied {
            order_id: order(0xB1),
            exec_id: ExecId::new("e1").unwrap(),
            symbol: aapl(),
            side: Side::Buy,
            quantity: quantity(dec!(4)),
            price: price(dec!(49.5)),
            fee: money(dec!(1)),
            gross: dec!(198),
            cash_delta: dec!(-199),
            cash_after: dec!(801),
            reserved_cash_released: dec!(202),
            reserved_quantity_released: dec!(0),
            lot_opened: Some(Lot { lot_id: first.lot_id(), quantity: dec!(4), cost: dec!(199), acquired_at: now() }),
            lots_consumed: vec![],
            cost_basis_removed: dec!(0),
            realized_pnl: dec!(0),
            position_quantity_after: dec!(4),
            position_cost_basis_after: dec!(199),
            executed_at: now(),
        }]);
}

#[test]
fn after_a_partial_buy_fill_the_rest_stays_reserved() {
    let first = buy(order(0xB1), "e1", dec!(4), dec!(49.5), dec!(1));
    let portfolio = state_after(&with(
        funded(),
        [
            funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505)),
            bought(&first, dec!(202), dec!(801), (dec!(4), dec!(199))),
        ],
    ));
    assert_eq!((portfolio.cash, portfolio.reserved_cash), (dec!(801), dec!(303)));
    let reservation = &portfolio.reservations[&order(0xB1)];
    assert_eq!((reservation.open_quantity, reservation.cash), (dec!(6), dec!(303)));
    let position = &portfolio.positions[&aapl()];
    assert_eq!((position.quantity, position.cost_basis, position.lots.len()), (dec!(4), dec!(199), 1));
}

#[test]
fn the_final_buy_fill_releases_the_whole_remainder() {
    // 6 at 50 with fee 1.5 costs 301.5; the 303 still reserved is released whole, not as a share.
    let first = buy(order(0xB1), "e1", dec!(4), dec!(49.5), dec!(1));
    let last = buy(order(0xB1), "e2", dec!(6), dec!(50), dec!(1.5));
    let history = with(
        funded(),
        [
            funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505)),
            bought(&first, dec!(202), dec!(801), (dec!(4), dec!(199))),
        ],
    );
    let expected = bought(&last, dec!(303), dec!(499.5), (dec!(10), dec!(500.5)));
    framework().given(history.clone()).when(last.command()).then_expect_events(vec![expected.clone()]);

    let portfolio = state_after(&with(history, [expected]));
    assert_eq!((portfolio.cash, portfolio.reserved_cash), (dec!(499.5), dec!(0)));
    assert!(portfolio.reservations.is_empty());
    assert_eq!(portfolio.positions[&aapl()].lots.len(), 2);
}

#[test]
fn released_shares_round_to_eight_decimals_and_the_last_takes_the_exact_rest() {
    // 99.99999998 reserved for 3 units. First third: 33.333333326… → 33.33333333. Second: 66.66666665 / 2 =
    // 33.333333325, a tie that banker's rounding sends to the even 33.33333332 (half away from zero would give
    // …33). The last fill releases exactly the 33.33333333 left, so nothing stays reserved.
    let fills = [
        buy(order(0xB1), "e1", dec!(1), dec!(33), dec!(0)),
        buy(order(0xB1), "e2", dec!(1), dec!(33), dec!(0)),
        buy(order(0xB1), "e3", dec!(1), dec!(33), dec!(0)),
    ];
    let reserved =
        with(funded(), [funds_reserved(order(0xB1), dec!(3), dec!(33), dec!(99.99999998), dec!(99.99999998))]);
    let first = bought(&fills[0], dec!(33.33333333), dec!(967), (dec!(1), dec!(33)));
    let second = bought(&fills[1], dec!(33.33333332), dec!(934), (dec!(2), dec!(66)));
    let third = bought(&fills[2], dec!(33.33333333), dec!(901), (dec!(3), dec!(99)));

    framework().given(reserved.clone()).when(fills[0].command()).then_expect_events(vec![first.clone()]);
    let after_first = with(reserved, [first]);
    framework().given(after_first.clone()).when(fills[1].command()).then_expect_events(vec![second.clone()]);
    let after_second = with(after_first, [second]);
    framework().given(after_second.clone()).when(fills[2].command()).then_expect_events(vec![third.clone()]);

    let portfolio = state_after(&with(after_second, [third]));
    assert_eq!(portfolio.reserved_cash, dec!(0));
    assert!(portfolio.reservations.is_empty());
}

#[test]
fn a_buy_costing_more_than_its_share_draws_on_buying_power() {
    // 4 at 60 with fee 1 costs 241, more than the 202 released; the other 39 comes out of buying power.
    let pricey = buy(order(0xB1), "e1", dec!(4), dec!(60), dec!(1));
    framework()
        .given(with(funded(), [funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505))]))
        .when(pricey.command())
        .then_expect_events(vec![bought(&pricey, dec!(202), dec!(759), (dec!(4), dec!(241)))]);
}

/// 1000 in cash, all of it reserved: 505 for buy order 0xB1 (10 at 50), 495 for 0xB2 (5 at 99).
fn fully_reserved() -> Vec<PortfolioEvent> {
    with(
        funded(),
        [
            funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505)),
            funds_reserved(order(0xB2), dec!(5), dec!(99), dec!(495), dec!(1000)),
        ],
    )
}

fn deficit_incurred(fill: &TestFill, increase: Decimal, deficit: Decimal) -> PortfolioEvent {
    PortfolioEvent::DeficitIncurred {
        order_id: fill.order_id,
        exec_id: ExecId::new(fill.exec_id).unwrap(),
        symbol: fill.symbol.clone(),
        increase,
        deficit,
        at: now(),
    }
}

#[test]
fn a_buy_costing_more_than_buying_power_plus_its_release_is_booked_into_deficit() {
    // Only the 202 this fill releases is available for its 241: the fill is a fact, so it is booked, and buying
    // power goes to 1000 − 241 − (1000 − 202) = −39.
    let pricey = buy(order(0xB1), "e1", dec!(4), dec!(60), dec!(1));
    framework().given(fully_reserved()).when(pricey.command()).then_expect_events(vec![
        bought(&pricey, dec!(202), dec!(759), (dec!(4), dec!(241))),
        deficit_incurred(&pricey, dec!(39), dec!(39)),
    ]);
    let portfolio = state_after(&with(
        fully_reserved(),
        [bought(&pricey, dec!(202), dec!(759), (dec!(4), dec!(241))), deficit_incurred(&pricey, dec!(39), dec!(39))],
    ));
    assert_eq!((portfolio.cash, portfolio.reserved_cash, portfolio.deficit()), (dec!(759), dec!(798), dec!(39)));
    assert_eq!(portfolio.deficit_since, Some(now()));
}

/// The case found by the outside accounting check: a buy of 1 at 122.64 reserved 123.8664 (1 % fee allowance),
/// a withdrawal left 0.5 of buying power, and the fill came with a fee of 4.4733 (a minimum fee). It is booked,
/// the whole reservation is released with it, and the portfolio owes 2.7469.
#[test]
fn a_fee_beyond_the_allowance_with_the_cash_committed_ends_booked_in_deficit() {
    let history = vec![
        opened(CostBasisMethod::Fifo),
        deposited(dec!(200), dec!(200)),
        funds_reserved(order(0xB1), dec!(1), dec!(122.64), dec!(123.8664), dec!(123.8664)),
        withdrawn(dec!(75.6336), dec!(124.3664)),
    ];
    let fill = buy(order(0xB1), "n1", dec!(1), dec!(122.64), dec!(4.4733));
    let booked = bought(&fill, dec!(123.8664), dec!(-2.7469), (dec!(1), dec!(127.1133)));
    framework()
        .given(history.clone())
        .when(fill.command())
        .then_expect_events(vec![booked.clone(), deficit_incurred(&fill, dec!(2.7469), dec!(2.7469))]);
    let portfolio = state_after(&with(history, [booked, deficit_incurred(&fill, dec!(2.7469), dec!(2.7469))]));
    assert!(portfolio.reservations.is_empty(), "the done order holds nothing");
    assert_eq!((portfolio.cash, portfolio.reserved_cash, portfolio.deficit()), (dec!(-2.7469), dec!(0), dec!(2.7469)));
    assert_eq!(portfolio.positions[&aapl()].quantity, dec!(1));
}

/// [`fully_reserved`] after 0xB1 filled 4 for 241: 39 in deficit.
fn in_deficit() -> Vec<PortfolioEvent> {
    let pricey = buy(order(0xB1), "e1", dec!(4), dec!(60), dec!(1));
    with(
        fully_reserved(),
        [bought(&pricey, dec!(202), dec!(759), (dec!(4), dec!(241))), deficit_incurred(&pricey, dec!(39), dec!(39))],
    )
}

#[test]
fn in_deficit_withdrawals_and_new_buys_are_refused_but_sells_are_not() {
    framework()
        .given(in_deficit())
        .when(withdraw(dec!(1)))
        .then_expect_error(PortfolioError::InDeficit { deficit: dec!(39) });
    framework()
        .given(in_deficit())
        .when(reserve_funds(order(0xB3), dec!(1), dec!(1), dec!(1)))
        .then_expect_error(PortfolioError::InDeficit { deficit: dec!(39) });
    framework()
        .given(in_deficit())
        .when(reserve_quantity(order(0x51), dec!(4)))
        .then_expect_events(vec![quantity_reserved(order(0x51), dec!(4), dec!(4))]);
}

#[test]
fn a_deposit_short_of_the_deficit_leaves_it_and_one_that_covers_it_says_so() {
    framework().given(in_deficit()).when(deposit(dec!(20))).then_expect_events(vec![deposited(dec!(20), dec!(779))]);
    let partly = with(in_deficit(), [deposited(dec!(20), dec!(779))]);
    assert_eq!(state_after(&partly).deficit(), dec!(19));
    framework().given(partly).when(deposit(dec!(19))).then_expect_events(vec![
        deposited(dec!(19), dec!(798)),
        PortfolioEvent::DeficitCovered { covered: dec!(19), at: now() },
    ]);
}

#[test]
fn releasing_another_reservation_can_cover_the_deficit() {
    framework().given(in_deficit()).when(release(order(0xB2))).then_expect_events(vec![
        released(order(0xB2), dec!(495), dec!(0)),
        PortfolioEvent::DeficitCovered { covered: dec!(39), at: now() },
    ]);
}

// ---------------------------------------------------------------------------------------------------------------
// ApplyExecution: sells

/// Three AAPL lots under `method`: 10 for 101, 5 for 55.5 and 3 for 37 (position 18 for 193.5, cash 806.5).
fn three_lots(method: CostBasisMethod) -> (Vec<PortfolioEvent>, [TestFill; 3]) {
    let lots = [
        buy(order(0xB1), "e1", dec!(10), dec!(10), dec!(1)),
        buy(order(0xB2), "e1", dec!(5), dec!(11), dec!(0.5)),
        buy(order(0xB3), "e1", dec!(3), dec!(12), dec!(1)),
    ];
    let history = vec![
        opened(method),
        deposited(dec!(1000), dec!(1000)),
        funds_reserved(order(0xB1), dec!(10), dec!(10), dec!(101), dec!(101)),
        bought(&lots[0], dec!(101), dec!(899), (dec!(10), dec!(101))),
        funds_reserved(order(0xB2), dec!(5), dec!(11), dec!(55.5), dec!(55.5)),
        bought(&lots[1], dec!(55.5), dec!(843.5), (dec!(15), dec!(156.5))),
        funds_reserved(order(0xB3), dec!(3), dec!(12), dec!(37), dec!(37)),
        bought(&lots[2], dec!(37), dec!(806.5), (dec!(18), dec!(193.5))),
    ];
    (history, lots)
}

#[test]
fn a_fifo_sell_consumes_the_oldest_lots_and_splits_the_last() {
    // 16 at 13 with fee 2: proceeds 206. Lots 10 (101) and 5 (55.5) go whole; 1 of the 3 units costing 37
    // costs 12.33333333. Removed 168.83333333, realized 206 − 168.83333333.
    let (history, lots) = three_lots(CostBasisMethod::Fifo);
    let fill = sell(order(0x51), "x1", dec!(16), dec!(13), dec!(2));
    let expected = sold(
        &fill,
        vec![
            lots[0].consumed(dec!(10), dec!(101)),
            lots[1].consumed(dec!(5), dec!(55.5)),
            lots[2].consumed(dec!(1), dec!(12.33333333)),
        ],
        dec!(168.83333333),
        dec!(37.16666667),
        dec!(1012.5),
        (dec!(2), dec!(24.66666667)),
    );
    let history = with(history, [quantity_reserved(order(0x51), dec!(16), dec!(16))]);
    framework().given(history.clone()).when(fill.command()).then_expect_events(vec![expected.clone()]);

    let portfolio = state_after(&with(history, [expected]));
    let position = &portfolio.positions[&aapl()];
    assert_eq!(position.lots.len(), 1);
    assert_eq!((position.lots[0].lot_id.clone(), position.lots[0].quantity), (lots[2].lot_id(), dec!(2)));
    assert_eq!(position.lots[0].cost, dec!(24.66666667));
    assert_eq!((position.quantity, position.reserved_quantity), (dec!(2), dec!(0)));
    assert_eq!((position.realized_pnl, portfolio.realized_pnl), (dec!(37.16666667), dec!(37.16666667)));
    assert!(portfolio.reservations.is_empty());
}

#[test]
fn a_fifo_sell_of_the_whole_position_leaves_no_cost_basis() {
    // The last 2 units take the 24.66666667 left in their lot, whole: the basis ends at exactly zero and the
    // realized P&L adds up to the cash gained, 40.5.
    let (history, lots) = three_lots(CostBasisMethod::Fifo);
    let first = sell(order(0x51), "x1", dec!(16), dec!(13), dec!(2));
    let rest = sell(order(0x52), "x1", dec!(2), dec!(14), dec!(0));
    let history = with(
        history,
        [
            quantity_reserved(order(0x51), dec!(16), dec!(16)),
            sold(
                &first,
                vec![
                    lots[0].consumed(dec!(10), dec!(101)),
                    lots[1].consumed(dec!(5), dec!(55.5)),
                    lots[2].consumed(dec!(1), dec!(12.33333333)),
                ],
                dec!(168.83333333),
                dec!(37.16666667),
                dec!(1012.5),
                (dec!(2), dec!(24.66666667)),
            ),
            quantity_reserved(order(0x52), dec!(2), dec!(2)),
        ],
    );
    let expected = sold(
        &rest,
        vec![lots[2].consumed(dec!(2), dec!(24.66666667))],
        dec!(24.66666667),
        dec!(3.33333333),
        dec!(1040.5),
        (dec!(0), dec!(0)),
    );
    framework().given(history.clone()).when(rest.command()).then_expect_events(vec![expected.clone()]);

    let portfolio = state_after(&with(history, [expected]));
    let position = &portfolio.positions[&aapl()];
    assert_eq!((position.quantity, position.cost_basis), (dec!(0), dec!(0)));
    assert!(position.lots.is_empty());
    assert_eq!(portfolio.realized_pnl, dec!(40.5));
    assert_eq!(portfolio.cash, dec!(1040.5));
}

#[test]
fn an_average_cost_sell_removes_its_share_of_the_running_cost() {
    // Position 15 for 156.5. Selling 4 removes 156.5 × 4 / 15 = 41.7333… → 41.73333333 (not the FIFO 40.4,
    // which the consumed lots still report). Proceeds 4 × 12 − 1 = 47.
    let (history, lots) = three_lots(CostBasisMethod::AverageCost);
    let history = with(history[..6].to_vec(), [quantity_reserved(order(0x51), dec!(4), dec!(4))]);
    let fill = sell(order(0x51), "x1", dec!(4), dec!(12), dec!(1));
    let expected = sold(
        &fill,
        vec![lots[0].consumed(dec!(4), dec!(40.4))],
        dec!(41.73333333),
        dec!(5.26666667),
        dec!(890.5),
        (dec!(11), dec!(114.76666667)),
    );
    framework().given(history.clone()).when(fill.command()).then_expect_events(vec![expected.clone()]);

    let portfolio = state_after(&with(history, [expected]));
    let position = &portfolio.positions[&aapl()];
    assert_eq!(position.cost_basis, dec!(114.76666667));
    assert_eq!(position.fifo_cost_basis(), dec!(116.1));
    assert_eq!(position.realized_pnl, dec!(5.26666667));
}

#[test]
fn an_average_cost_sell_of_the_whole_position_leaves_no_cost_basis() {
    // 3 units for 30.99999998, sold one at a time at 11. Shares of the basis: 30.99999998 / 3 = 10.333333326…
    // → 10.33333333; 20.66666665 / 2 = 10.333333325 → 10.33333332 (a tie, to even); the last unit takes the
    // 10.33333333 left, whole. The basis ends at exactly zero and the P&L totals 33 − 30.99999998.
    let lot = buy(order(0xB1), "e1", dec!(3), dec!(10), dec!(0.99999998));
    let fills = [
        sell(order(0x51), "x1", dec!(1), dec!(11), dec!(0)),
        sell(order(0x51), "x2", dec!(1), dec!(11), dec!(0)),
        sell(order(0x51), "x3", dec!(1), dec!(11), dec!(0)),
    ];
    let history = vec![
        opened(CostBasisMethod::AverageCost),
        deposited(dec!(1000), dec!(1000)),
        funds_reserved(order(0xB1), dec!(3), dec!(10), dec!(30.99999998), dec!(30.99999998)),
        bought(&lot, dec!(30.99999998), dec!(969.00000002), (dec!(3), dec!(30.99999998))),
        quantity_reserved(order(0x51), dec!(3), dec!(3)),
        sold(
            &fills[0],
            vec![lot.consumed(dec!(1), dec!(10.33333333))],
            dec!(10.33333333),
            dec!(0.66666667),
            dec!(980.00000002),
            (dec!(2), dec!(20.66666665)),
        ),
    ];
    let second = sold(
        &fills[1],
        vec![lot.consumed(dec!(1), dec!(10.33333332))],
        dec!(10.33333332),
        dec!(0.66666668),
        dec!(991.00000002),
        (dec!(1), dec!(10.33333333)),
    );
    framework().given(history.clone()).when(fills[1].command()).then_expect_events(vec![second.clone()]);

    let history = with(history, [second]);
    let last = sold(
        &fills[2],
        vec![lot.consumed(dec!(1), dec!(10.33333333))],
        dec!(10.33333333),
        dec!(0.66666667),
        dec!(1002.00000002),
        (dec!(0), dec!(0)),
    );
    framework().given(history.clone()).when(fills[2].command()).then_expect_events(vec![last.clone()]);

    let portfolio = state_after(&with(history, [last]));
    let position = &portfolio.positions[&aapl()];
    assert_eq!((position.quantity, position.cost_basis), (dec!(0), dec!(0)));
    assert_eq!(position.realized_pnl, dec!(2.00000002));
    assert!(position.lots.is_empty());
    assert!(portfolio.reservations.is_empty());
}

#[test]
fn a_sell_whose_fee_exceeds_its_proceeds_with_the_cash_committed_is_booked_into_deficit() {
    // Cash 499, all of it reserved for 0xB2. Selling 1 at 0.01 with fee 5 takes 4.99 out of cash: booked all
    // the same (the venue charged it), leaving 4.99 of deficit.
    let history = with(
        holding_ten(CostBasisMethod::Fifo),
        [
            funds_reserved(order(0xB2), dec!(4), dec!(124.75), dec!(499), dec!(499)),
            quantity_reserved(order(0x51), dec!(1), dec!(1)),
        ],
    );
    let fill = sell(order(0x51), "x1", dec!(1), dec!(0.01), dec!(5));
    let lot = b1_fill().consumed(dec!(1), dec!(50.1));
    let booked = sold(&fill, vec![lot], dec!(50.1), dec!(-55.09), dec!(494.01), (dec!(9), dec!(450.9)));
    framework()
        .given(history)
        .when(fill.command())
        .then_expect_events(vec![booked, deficit_incurred(&fill, dec!(4.99), dec!(4.99))]);
}

// ---------------------------------------------------------------------------------------------------------------
// ApplyExecution: refusals and redelivery

/// [`funded`] with 505 reserved for buy order 0xB1 (10 at 50), 4 of which filled as "e1".
fn partly_bought() -> Vec<PortfolioEvent> {
    let first = buy(order(0xB1), "e1", dec!(4), dec!(49.5), dec!(1));
    with(
        funded(),
        [
            funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505)),
            bought(&first, dec!(202), dec!(801), (dec!(4), dec!(199))),
        ],
    )
}

#[test]
fn a_redelivered_execution_changes_nothing() {
    framework()
        .given(partly_bought())
        .when(buy(order(0xB1), "e1", dec!(4), dec!(49.5), dec!(1)).command())
        .then_expect_events(vec![]);
}

#[test]
fn an_execution_without_a_reservation_is_refused() {
    framework().given(funded()).when(b1_fill().command()).then_expect_error(PortfolioError::NoReservation(order(0xB1)));
}

#[test]
fn an_execution_on_the_wrong_side_is_refused() {
    framework()
        .given(partly_bought())
        .when(sell(order(0xB1), "e2", dec!(1), dec!(50), dec!(0)).command())
        .then_expect_error(PortfolioError::ReservationMismatch(order(0xB1)));
}

#[test]
fn an_execution_of_another_symbol_is_refused() {
    let other_symbol = TestFill { symbol: msft(), ..buy(order(0xB1), "e2", dec!(1), dec!(50), dec!(0)) };
    framework()
        .given(partly_bought())
        .when(other_symbol.command())
        .then_expect_error(PortfolioError::ReservationMismatch(order(0xB1)));
}

#[test]
fn an_execution_beyond_the_reserved_quantity_is_refused() {
    framework()
        .given(with(funded(), [funds_reserved(order(0xB1), dec!(10), dec!(50), dec!(505), dec!(505))]))
        .when(buy(order(0xB1), "e1", dec!(11), dec!(40), dec!(0)).command())
        .then_expect_error(PortfolioError::ExceedsReservation { quantity: dec!(11), open: dec!(10) });
}

#[test]
fn an_execution_beyond_what_is_still_open_is_refused() {
    framework()
        .given(partly_bought())
        .when(buy(order(0xB1), "e2", dec!(6.5), dec!(40), dec!(0)).command())
        .then_expect_error(PortfolioError::ExceedsReservation { quantity: dec!(6.5), open: dec!(6) });
}

#[test]
fn a_sell_beyond_its_reserved_units_is_refused() {
    framework()
        .given(with(holding_ten(CostBasisMethod::Fifo), [quantity_reserved(order(0x51), dec!(4), dec!(4))]))
        .when(sell(order(0x51), "x1", dec!(5), dec!(60), dec!(0)).command())
        .then_expect_error(PortfolioError::ExceedsReservation { quantity: dec!(5), open: dec!(4) });
}

// ---------------------------------------------------------------------------------------------------------------
// Invariants

#[test]
fn an_event_that_would_break_an_invariant_is_not_written() {
    // A corrupt history leaves cash at −5 without a deficit marker (only a fill can cause a deficit, and it
    // says so); a deposit of 1 would record −4, so `handle` refuses to write it.
    framework()
        .given(vec![opened(CostBasisMethod::Fifo), deposited(dec!(10), dec!(-5))])
        .when(deposit(dec!(1)))
        .then_expect_error(PortfolioError::InvariantViolated("deficit 4 but deficit marker None".into()));
}

#[test]
fn check_invariants_catches_inconsistent_states() {
    let sound = state_after(&with(
        holding_ten(CostBasisMethod::Fifo),
        [
            funds_reserved(order(0xB2), dec!(4), dec!(50), dec!(202), dec!(202)),
            quantity_reserved(order(0x51), dec!(4), dec!(4)),
        ],
    ));
    let violation = |portfolio: Portfolio, what: &str| {
        assert_eq!(portfolio.check_invariants(), Err(PortfolioError::InvariantViolated(what.into())));
    };

    let negative_cash =
        Portfolio { cash: dec!(-1), reserved_cash: dec!(0), reservations: Default::default(), ..sound.clone() };
    violation(negative_cash, "deficit 1 but deficit marker None");
    violation(
        Portfolio { deficit_since: Some(now()), ..sound.clone() },
        "deficit 0 but deficit marker Some(2023-11-14T22:13:20Z)",
    );
    violation(
        Portfolio { reserved_cash: dec!(-1), reservations: Default::default(), ..sound.clone() },
        "reserved cash -1 is negative",
    );
    violation(Portfolio { reserved_cash: dec!(201), ..sound.clone() }, "reservations hold 202, reserved cash is 201");

    let mut lots_off = sound.clone();
    lots_off.positions.get_mut(&aapl()).unwrap().quantity = dec!(11);
    violation(lots_off, "AAPL: lots hold 10, position is 11");

    let mut over_reserved = sound.clone();
    over_reserved.positions.get_mut(&aapl()).unwrap().reserved_quantity = dec!(5);
    violation(over_reserved, "AAPL: sell reservations hold 4");

    let mut flat_with_basis = sound.clone();
    flat_with_basis.reservations.remove(&order(0x51));
    let position = flat_with_basis.positions.get_mut(&aapl()).unwrap();
    (position.quantity, position.reserved_quantity, position.lots) = (dec!(0), dec!(0), Default::default());
    violation(flat_with_basis, "AAPL: flat position with cost basis 501");
}

#[test]
fn command_and_event_names_are_the_serialised_tags() {
    let command = open(CostBasisMethod::Fifo);
    assert_eq!(serde_json::to_value(&command).unwrap()["type"], command.name());
    let event = PortfolioEvent::AlertCanceled { alert_id: AlertId::generate(), at: now() };
    let tagged = serde_json::to_value(&event).unwrap();
    assert!(tagged.get(event.name()).is_some(), "{tagged} is not tagged {}", event.name());
}

// ---------------------------------------------------------------------------------------------------------------
// BookExternalTrade

/// The `BookExternalTrade` of `fill` (its exec id is the trade id; its order id is not used).
fn external(fill: &TestFill) -> PortfolioCommand {
    PortfolioCommand::BookExternalTrade {
        trade_id: ExecId::new(fill.exec_id).unwrap(),
        symbol: fill.symbol.clone(),
        side: fill.side,
        quantity: quantity(fill.quantity),
        price: price(fill.price),
        fee: money(fill.fee),
        executed_at: now(),
    }
}

/// The fill an external trade is booked as: under the order id derived from the portfolio and the trade id.
fn external_fill(side: Side, trade: &'static str, qty: Decimal, fill_price: Decimal, fee: Decimal) -> TestFill {
    let order_id = external_order_id(portfolio_id(), &ExecId::new(trade).unwrap());
    TestFill { side, ..buy(order_id, trade, qty, fill_price, fee) }
}

#[test]
fn an_external_buy_is_booked_like_a_fill_without_a_reservation() {
    let fill = external_fill(Side::Buy, "import:t1", dec!(4), dec!(25), dec!(1));
    framework().given(funded()).when(external(&fill)).then_expect_events(vec![bought(
        &fill,
        dec!(0),
        dec!(899),
        (dec!(4), dec!(101)),
    )]);
    // The derived order id is stable and differs between trades.
    assert_eq!(fill.order_id, external_fill(Side::Buy, "import:t1", dec!(1), dec!(1), dec!(0)).order_id);
    assert_ne!(fill.order_id, external_fill(Side::Buy, "import:t2", dec!(1), dec!(1), dec!(0)).order_id);
}

#[test]
fn an_external_sell_takes_only_units_no_open_order_reserved() {
    // 10 held, 4 promised to sell order 0x51: 6 are free.
    let history = with(holding_ten(CostBasisMethod::Fifo), [quantity_reserved(order(0x51), dec!(4), dec!(4))]);
    let too_many = external_fill(Side::Sell, "import:s1", dec!(7), dec!(60), dec!(0));
    let result = framework().given(history.clone()).when(external(&too_many)).inspect_result();
    assert_eq!(
        result,
        Err(PortfolioError::InsufficientQuantity { symbol: aapl(), requested: dec!(7), available: dec!(6) })
    );
    // Six at 60 (fee 2): proceeds 358 against 6/10 of the 501 lot (300.6); the sell reservation is untouched.
    let six = external_fill(Side::Sell, "import:s2", dec!(6), dec!(60), dec!(2));
    let mut expected = sold(
        &six,
        vec![b1_fill().consumed(dec!(6), dec!(300.6))],
        dec!(300.6),
        dec!(57.4),
        dec!(857),
        (dec!(4), dec!(200.4)),
    );
    if let PortfolioEvent::ExecutionApplied { reserved_quantity_released, .. } = &mut expected {
        *reserved_quantity_released = Decimal::ZERO;
    }
    framework().given(history.clone()).when(external(&six)).then_expect_events(vec![expected.clone()]);
    let after = state_after(&with(history, [expected]));
    assert_eq!(after.positions[&aapl()].reserved_quantity, dec!(4));
}

// ---------------------------------------------------------------------------------------------------------------
// AdjustReservation (order amendments)

fn adjust(order_id: OrderId, quantity_delta: Decimal, at_price: Option<Decimal>) -> PortfolioCommand {
    PortfolioCommand::AdjustReservation { order_id, quantity_delta, price: at_price.map(price), at: now() }
}

#[allow(clippy::too_many_arguments)]
fn adjusted(
    order_id: OrderId,
    quantity_delta: Decimal,
    cash_delta: Decimal,
    at_price: Option<Decimal>,
    open_quantity_after: Decimal,
    reserved_cash_after: Decimal,
    reserved_quantity_after: Decimal,
) -> PortfolioEvent {
    PortfolioEvent::ReservationAdjusted {
        order_id,
        symbol: aapl(),
        quantity_delta,
        cash_delta,
        price: at_price.map(price),
        open_quantity_after,
        reserved_cash_after,
        reserved_quantity_after,
        at: now(),
    }
}

/// Funded with 1000; buy order 0xB2 for 10 AAPL at 50 reserved 505 (1 % fee allowance).
fn reserved_buy() -> Vec<PortfolioEvent> {
    with(funded(), [funds_reserved(order(0xB2), dec!(10), dec!(50), dec!(505), dec!(505))])
}

#[test]
fn a_buy_reservation_grows_and_shrinks_in_proportion_to_quantity_and_price() {
    // 15 at 50: 505 × 15/10 = 757.5.
    framework().given(reserved_buy()).when(adjust(order(0xB2), dec!(5), None)).then_expect_events(vec![adjusted(
        order(0xB2),
        dec!(5),
        dec!(252.5),
        Some(dec!(50)),
        dec!(15),
        dec!(757.5),
        dec!(0),
    )]);
    // 10 at 40: 505 × 40/50 = 404, 101 back.
    framework().given(reserved_buy()).when(adjust(order(0xB2), dec!(0), Some(dec!(40)))).then_expect_events(vec![
        adjusted(order(0xB2), dec!(0), dec!(-101), Some(dec!(40)), dec!(10), dec!(404), dec!(0)),
    ]);
    let grown = adjusted(order(0xB2), dec!(5), dec!(252.5), Some(dec!(50)), dec!(15), dec!(757.5), dec!(0));
    let state = state_after(&with(reserved_buy(), [grown]));
    assert_eq!((state.reserved_cash, state.reservations[&order(0xB2)].open_quantity), (dec!(757.5), dec!(15)));
}

#[test]
fn a_reservation_grows_only_within_buying_power_or_free_units_and_never_to_nothing() {
    // 495 free: 10 more at 50 (505) is refused.
    framework()
        .given(reserved_buy())
        .when(adjust(order(0xB2), dec!(10), None))
        .then_expect_error(PortfolioError::InsufficientFunds { requested: dec!(505), available: dec!(495) });
    framework()
        .given(reserved_buy())
        .when(adjust(order(0xB2), dec!(-10), None))
        .then_expect_error(PortfolioError::ExceedsReservation { quantity: dec!(10), open: dec!(10) });
    // 10 held, 4 promised to sell order 0x51: 6 more may be promised, not 7.
    let selling = with(holding_ten(CostBasisMethod::Fifo), [quantity_reserved(order(0x51), dec!(4), dec!(4))]);
    framework().given(selling.clone()).when(adjust(order(0x51), dec!(7), None)).then_expect_error(
        PortfolioError::InsufficientQuantity { symbol: aapl(), requested: dec!(7), available: dec!(6) },
    );
    framework().given(selling).when(adjust(order(0x51), dec!(6), None)).then_expect_events(vec![adjusted(
        order(0x51),
        dec!(6),
        dec!(0),
        None,
        dec!(10),
        dec!(0),
        dec!(10),
    )]);
}

/// FIFO consumes lots in the order they were acquired: an external trade older than the newest open lot of its
/// symbol would be booked out of order.
#[test]
fn an_external_trade_older_than_the_newest_lot_is_refused() {
    let mut command = external(&external_fill(Side::Buy, "import:old", dec!(1), dec!(10), dec!(0)));
    if let PortfolioCommand::BookExternalTrade { executed_at, .. } = &mut command {
        *executed_at = now() - chrono::Duration::days(1);
    }
    framework().given(holding_ten(CostBasisMethod::Fifo)).when(command).then_expect_error(
        PortfolioError::BeforeNewestLot { symbol: aapl(), at: now() - chrono::Duration::days(1), newest: now() },
    );
}
