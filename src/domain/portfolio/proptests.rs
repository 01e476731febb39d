//! Property tests: random sequences of portfolio commands, for both cost-basis methods.
//!
//! Each case opens a portfolio and drives deposits, withdrawals, buy orders (reserve funds, then fills at random
//! prices with fees), sell orders (reserve units, then fills), releases and redelivered fills straight through
//! `Aggregate::handle`. Many commands are refused on purpose (withdrawing too much, filling beyond the
//! reservation); a refusal must leave no trace. A fill within its reservation is never refused, whatever it
//! costs (fills are facts): prices move up to 15 % against the reservation and fees run up to 2, so portfolios
//! go into deficit and out of it, and the deficit markers must say so exactly. After every step the state is checked against the aggregate's
//! own invariants, against a rebuild from its events and a JSON snapshot, and against [`ReferenceBook`], a plain
//! re-implementation of the bookkeeping written from the rule documented in `accounting.rs`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use futures::executor::block_on;
use proptest::prelude::*;
use proptest::sample::Index;
use rust_decimal::{Decimal, RoundingStrategy};
use uuid::Uuid;

use super::{CostBasisMethod, Portfolio, PortfolioCommand, PortfolioError, PortfolioEvent, ReleaseReason};
use crate::domain::order::Side;
use crate::domain::values::{Amount, Currency, ExecId, Money, OrderId, Owner, PortfolioId, Price, Quantity, Symbol};

/// Random cases per property: enough to hit splits, ties and refusals, few enough for a quick debug run.
const CASES: u32 = 128;
/// Longest command sequence of one case.
const STEPS_MAX: usize = 100;
const SYMBOLS: [&str; 2] = ["AAA", "BBB"];
/// Decimal places of generated quantities; with 6-decimal prices the gross has 9 and must be rounded.
const QUANTITY_SCALE: u32 = 3;
const PRICE_SCALE: u32 = 6;

/// Runs one command through `handle` as the command service would, and returns the events it wrote.
fn handle(portfolio: &mut Portfolio, command: PortfolioCommand) -> Result<Vec<PortfolioEvent>, PortfolioError> {
    let sink = EventSink::default();
    let mut next = portfolio.clone();
    block_on(next.handle(command, &(), &sink))?;
    *portfolio = next;
    Ok(block_on(sink.collect()))
}

fn now() -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000, 0).unwrap()
}

// ---------------------------------------------------------------------------------------------------------------
// The reference bookkeeping

/// The money rule of `accounting.rs`, restated: 8 decimals, ties to even.
fn round_money(value: Decimal) -> Decimal {
    value.round_dp_with_strategy(8, RoundingStrategy::MidpointNearestEven)
}

/// `part / whole` of `total`; all of it, unrounded, when `part` is the whole.
fn share(total: Decimal, part: Decimal, whole: Decimal) -> Decimal {
    if part == whole {
        total
    } else {
        round_money(total * part / whole)
    }
}

/// One symbol, booked both ways at once, whichever method the portfolio uses.
#[derive(Debug, Default)]
struct ReferencePosition {
    /// Oldest first: (units left, cost left). Kept as a total rather than a unit cost, because a partial
    /// consumption takes its share of the lot's remaining cost, rounded, and the last units take what is left.
    fifo_lots: VecDeque<(Decimal, Decimal)>,
    fifo_realized: Decimal,
    average_quantity: Decimal,
    average_cost: Decimal,
    average_realized: Decimal,
}

#[derive(Debug, Default)]
struct ReferenceBook {
    cash: Decimal,
    positions: BTreeMap<Symbol, ReferencePosition>,
}

impl ReferenceBook {
    fn buy(&mut self, symbol: &Symbol, quantity: Decimal, price: Decimal, fee: Decimal) {
        let cost = round_money(quantity * price) + fee;
        self.cash -= cost;
        let position = self.positions.entry(symbol.clone()).or_default();
        position.fifo_lots.push_back((quantity, cost));
        position.average_quantity += quantity;
        position.average_cost += cost;
    }

    /// Books a sell and returns its realized P&L under (FIFO, average cost).
    fn sell(&mut self, symbol: &Symbol, quantity: Decimal, price: Decimal, fee: Decimal) -> (Decimal, Decimal) {
        let proceeds = round_money(quantity * price) - fee;
        self.cash += proceeds;
        let position = self.positions.get_mut(symbol).expect("a sell of a symbol never bought");

        let mut fifo_removed = Decimal::ZERO;
        let mut left = quantity;
        while !left.is_zero() {
            let (lot_quantity, lot_cost) = position.fifo_lots.front_mut().expect("sold more than the lots hold");
            let take = left.min(*lot_quantity);
            let cost = share(*lot_cost, take, *lot_quantity);
            fifo_removed += cost;
            *lot_quantity -= take;
            *lot_cost -= cost;
            left -= take;
            if lot_quantity.is_zero() {
                position.fifo_lots.pop_front();
            }
        }

        let average_removed = share(position.average_cost, quantity, position.average_quantity);
        position.average_quantity -= quantity;
        position.average_cost -= average_removed;

        let realized = (proceeds - fifo_removed, proceeds - average_removed);
        position.fifo_realized += realized.0;
        position.average_realized += realized.1;
        realized
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Random steps

#[derive(Debug, Clone)]
enum Step {
    Deposit(Decimal),
    Withdraw(Decimal),
    /// Reserve funds for a new buy order at `price`, plus a fee allowance in basis points.
    PlaceBuy {
        symbol: usize,
        quantity: Decimal,
        price: Decimal,
        allowance_bps: u32,
    },
    /// Reserve `quarters`/4 of the free units of a symbol for a new sell order (5 quarters: more than free).
    PlaceSell {
        symbol: usize,
        quarters: u32,
    },
    /// Fill `quarters`/4 of an open order (5: more than is open) at its reference price moved by `move_bps`.
    Fill {
        order: Index,
        quarters: u32,
        move_bps: i64,
        fee: Decimal,
    },
    /// A trade made elsewhere (a statement import's): a buy of `quantity`, or a sell of `quarters`/4 of the
    /// symbol's free units (5: more than is free, refused).
    External {
        symbol: usize,
        sell: bool,
        quantity: Decimal,
        quarters: u32,
        price: Decimal,
        fee: Decimal,
    },
    /// Resize an open order's reservation by `quarters`/4 of its open quantity, more or fewer (fewer by 4 or 5
    /// quarters: refused), a buy's at its price moved by `move_bps`.
    Adjust {
        order: Index,
        quarters: u32,
        grow: bool,
        move_bps: i64,
    },
    /// Release any order ever placed, open or not.
    Release {
        order: Index,
    },
    /// Send an execution that was already applied once more.
    Redeliver {
        fill: Index,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (1i64..=10_000_000).prop_map(|cents| Step::Deposit(Decimal::new(cents, 2))),
        1 => (1i64..=5_000_000).prop_map(|cents| Step::Withdraw(Decimal::new(cents, 2))),
        3 => (0..SYMBOLS.len(), 1i64..=100_000, 1_000_000i64..=200_000_000, 0u32..=300).prop_map(
            |(symbol, quantity, price, allowance_bps)| Step::PlaceBuy {
                symbol,
                quantity: Decimal::new(quantity, QUANTITY_SCALE),
                price: Decimal::new(price, PRICE_SCALE),
                allowance_bps,
            }
        ),
        3 => (0..SYMBOLS.len(), quarters()).prop_map(|(symbol, quarters)| Step::PlaceSell { symbol, quarters }),
        8 => (any::<Index>(), quarters(), -1_500i64..=1_500, 0i64..=200_000_000).prop_map(
            |(order, quarters, move_bps, fee)| Step::Fill { order, quarters, move_bps, fee: Decimal::new(fee, 8) }
        ),
        2 => (0..SYMBOLS.len(), any::<bool>(), 1i64..=100_000, quarters(), 1_000_000i64..=200_000_000, 0i64..=200_000_000)
            .prop_map(|(symbol, sell, quantity, quarters, price, fee)| Step::External {
                symbol,
                sell,
                quantity: Decimal::new(quantity, QUANTITY_SCALE),
                quarters,
                price: Decimal::new(price, PRICE_SCALE),
                fee: Decimal::new(fee, 8),
            }),
        2 => (any::<Index>(), quarters(), any::<bool>(), -1_500i64..=1_500)
            .prop_map(|(order, quarters, grow, move_bps)| Step::Adjust { order, quarters, grow, move_bps }),
        1 => any::<Index>().prop_map(|order| Step::Release { order }),
        1 => any::<Index>().prop_map(|fill| Step::Redeliver { fill }),
    ]
}

/// How much of what is available a step asks for, in quarters: often all of it (closing a reservation or a
/// position), sometimes one step more than all (refused).
fn quarters() -> impl Strategy<Value = u32> {
    prop_oneof![3 => 1u32..=3, 3 => Just(4), 1 => Just(5)]
}

fn cost_basis_method() -> impl Strategy<Value = CostBasisMethod> {
    prop_oneof![Just(CostBasisMethod::Fifo), Just(CostBasisMethod::AverageCost)]
}

// ---------------------------------------------------------------------------------------------------------------
// The harness

/// An order the harness placed and the portfolio accepted a reservation for.
#[derive(Debug, Clone)]
struct PlacedOrder {
    order_id: OrderId,
    symbol: Symbol,
    side: Side,
    /// The price fills are drawn around.
    price: Decimal,
}

struct Harness {
    method: CostBasisMethod,
    portfolio: Portfolio,
    events: Vec<PortfolioEvent>,
    reference: ReferenceBook,
    orders: Vec<PlacedOrder>,
    /// Every `ApplyExecution` that booked something, for redelivery.
    applied: Vec<PortfolioCommand>,
    /// The last buy price per symbol, around which sells fill.
    last_price: BTreeMap<Symbol, Decimal>,
    next_id: u128,
}

impl Harness {
    fn open(method: CostBasisMethod) -> Self {
        let mut harness = Self {
            method,
            portfolio: Portfolio::default(),
            events: Vec::new(),
            reference: ReferenceBook::default(),
            orders: Vec::new(),
            applied: Vec::new(),
            last_price: BTreeMap::new(),
            next_id: 1,
        };
        let open = PortfolioCommand::OpenPortfolio {
            portfolio_id: PortfolioId(Uuid::from_u128(u128::MAX)),
            owner: Owner::new("proptest").unwrap(),
            base_currency: Currency::new("USD").unwrap(),
            cost_basis_method: method,
            opened_at: now(),
        };
        let events = handle(&mut harness.portfolio, open).expect("opening a new portfolio");
        harness.events.extend(events);
        harness
    }

    fn fresh_id(&mut self) -> u128 {
        self.next_id += 1;
        self.next_id
    }

    /// Turns a random step into a command against the current state; `None` when the step has nothing to act
    /// on (no open order to fill, nothing applied to redeliver).
    fn command_for(&mut self, step: &Step) -> Option<PortfolioCommand> {
        let command = match step {
            Step::Deposit(amount) => {
                PortfolioCommand::DepositCash { amount: Amount::new(*amount).unwrap(), reference: None, at: now() }
            }
            Step::Withdraw(amount) => {
                PortfolioCommand::WithdrawCash { amount: Amount::new(*amount).unwrap(), reference: None, at: now() }
            }
            Step::PlaceBuy { symbol, quantity, price, allowance_bps } => {
                let symbol = Symbol::new(SYMBOLS[*symbol]).unwrap();
                self.last_price.insert(symbol.clone(), *price);
                let amount =
                    round_money(*quantity * *price * Decimal::from(10_000 + allowance_bps) / Decimal::from(10_000));
                PortfolioCommand::ReserveFunds {
                    order_id: OrderId(Uuid::from_u128(self.fresh_id())),
                    symbol,
                    quantity: Quantity::new(*quantity).unwrap(),
                    price: Price::new(*price).unwrap(),
                    amount: Money::new(amount).unwrap(),
                    at: now(),
                }
            }
            Step::PlaceSell { symbol, quarters } => {
                // Prefer the drawn symbol, but sell another one when only that one has free units: selling what
                // is not held is refused, which a few steps show well enough.
                let free =
                    |symbol: &Symbol| self.portfolio.positions.get(symbol).map_or(Decimal::ZERO, |p| p.free_quantity());
                let drawn = Symbol::new(SYMBOLS[*symbol]).unwrap();
                let symbol = SYMBOLS
                    .iter()
                    .map(|s| Symbol::new(*s).unwrap())
                    .find(|s| free(s) > Decimal::ZERO && free(&drawn).is_zero())
                    .unwrap_or(drawn);
                let free = free(&symbol);
                PortfolioCommand::ReserveQuantity {
                    order_id: OrderId(Uuid::from_u128(self.fresh_id())),
                    symbol,
                    quantity: quarters_of(free, *quarters),
                    at: now(),
                }
            }
            Step::Fill { order, quarters, move_bps, fee } => {
                let open: Vec<_> =
                    self.orders.iter().filter(|o| self.portfolio.reservations.contains_key(&o.order_id)).collect();
                if open.is_empty() {
                    return None;
                }
                let order = open[order.index(open.len())].clone();
                let open_quantity = self.portfolio.reservations[&order.order_id].open_quantity;
                let price = (order.price * Decimal::from(10_000 + move_bps) / Decimal::from(10_000))
                    .round_dp_with_strategy(PRICE_SCALE, RoundingStrategy::MidpointNearestEven)
                    .max(Decimal::new(1, PRICE_SCALE));
                PortfolioCommand::ApplyExecution {
                    order_id: order.order_id,
                    exec_id: ExecId::new(format!("x{}", self.fresh_id())).unwrap(),
                    symbol: order.symbol,
                    side: order.side,
                    quantity: quarters_of(open_quantity, *quarters),
                    price: Price::new(price).unwrap(),
                    fee: Money::new(*fee).unwrap(),
                    executed_at: now(),
                }
            }
            Step::External { symbol, sell, quantity, quarters, price, fee } => {
                let symbol = Symbol::new(SYMBOLS[*symbol]).unwrap();
                let quantity = if *sell {
                    let free = self.portfolio.positions.get(&symbol).map_or(Decimal::ZERO, |p| p.free_quantity());
                    quarters_of(free, *quarters)
                } else {
                    self.last_price.insert(symbol.clone(), *price);
                    Quantity::new(*quantity).unwrap()
                };
                PortfolioCommand::BookExternalTrade {
                    trade_id: ExecId::new(format!("import:{}", self.fresh_id())).unwrap(),
                    symbol,
                    side: if *sell { Side::Sell } else { Side::Buy },
                    quantity,
                    price: Price::new(*price).unwrap(),
                    fee: Money::new(*fee).unwrap(),
                    executed_at: now(),
                }
            }
            Step::Adjust { order, quarters, grow, move_bps } => {
                let open: Vec<_> =
                    self.orders.iter().filter(|o| self.portfolio.reservations.contains_key(&o.order_id)).collect();
                if open.is_empty() {
                    return None;
                }
                let order = open[order.index(open.len())].clone();
                let by = quarters_of(self.portfolio.reservations[&order.order_id].open_quantity, *quarters).value();
                let price = (order.side == Side::Buy).then(|| {
                    let moved = (order.price * Decimal::from(10_000 + move_bps) / Decimal::from(10_000))
                        .round_dp_with_strategy(PRICE_SCALE, RoundingStrategy::MidpointNearestEven)
                        .max(Decimal::new(1, PRICE_SCALE));
                    Price::new(moved).unwrap()
                });
                PortfolioCommand::AdjustReservation {
                    order_id: order.order_id,
                    quantity_delta: if *grow { by } else { -by },
                    price,
                    at: now(),
                }
            }
            Step::Release { order } => {
                if self.orders.is_empty() {
                    return None;
                }
                let order_id = self.orders[order.index(self.orders.len())].order_id;
                PortfolioCommand::ReleaseReservation { order_id, reason: ReleaseReason::Canceled, at: now() }
            }
            Step::Redeliver { fill } => {
                if self.applied.is_empty() {
                    return None;
                }
                self.applied[fill.index(self.applied.len())].clone()
            }
        };
        Some(command)
    }

    /// Runs one step and checks every property; a failed check is a test failure with its reason.
    fn run(&mut self, step: &Step) -> Result<(), TestCaseError> {
        let Some(command) = self.command_for(step) else { return Ok(()) };
        let before = self.portfolio.clone();
        let result = handle(&mut self.portfolio, command.clone());
        if before.deficit() > Decimal::ZERO {
            if let PortfolioCommand::WithdrawCash { .. } | PortfolioCommand::ReserveFunds { .. } = &command {
                let refused = matches!(result, Err(PortfolioError::InDeficit { .. }));
                prop_assert!(refused, "in deficit, {:?} gave {:?}", command, result);
            }
        }
        match result {
            Err(error) => {
                prop_assert!(!matches!(error, PortfolioError::InvariantViolated(_)), "{error} on {command:?}");
                prop_assert_eq!(&self.portfolio, &before, "a refused command changed the state");
                // Fills are facts: one within its order's open reservation is booked, whatever it costs.
                if let PortfolioCommand::ApplyExecution { order_id, symbol, side, quantity, .. } = &command {
                    let within = before
                        .reservations
                        .get(order_id)
                        .is_some_and(|r| &r.symbol == symbol && r.side == *side && quantity.value() <= r.open_quantity);
                    prop_assert!(!within, "a fill within its reservation was refused: {error} on {command:?}");
                }
            }
            Ok(events) if events.is_empty() => {
                prop_assert_eq!(&self.portfolio, &before, "a command without events changed the state");
            }
            Ok(events) => {
                self.record(&command, &events[0])?;
                let deficit = self.portfolio.deficit();
                match &events[1..] {
                    [] => prop_assert!(
                        deficit <= before.deficit() && (deficit.is_zero() || !before.deficit().is_zero()),
                        "the deficit went from {} to {} without a marker",
                        before.deficit(),
                        deficit
                    ),
                    [PortfolioEvent::DeficitIncurred { increase, deficit: after, .. }] => {
                        let by_a_fill = matches!(
                            command,
                            PortfolioCommand::ApplyExecution { .. } | PortfolioCommand::BookExternalTrade { .. }
                        );
                        prop_assert!(by_a_fill, "a deficit incurred by {:?}", command);
                        prop_assert_eq!(*after, deficit);
                        prop_assert_eq!(*increase, deficit - before.deficit());
                    }
                    [PortfolioEvent::DeficitCovered { covered, .. }] => {
                        prop_assert!(deficit.is_zero());
                        prop_assert_eq!(*covered, before.deficit());
                    }
                    more => prop_assert!(false, "unexpected events after {:?}: {:?}", events[0], more),
                }
                self.events.extend(events);
            }
        }
        self.check_state()
    }

    /// Books an accepted command in the reference and the harness's own lists.
    fn record(&mut self, command: &PortfolioCommand, event: &PortfolioEvent) -> Result<(), TestCaseError> {
        match command {
            PortfolioCommand::DepositCash { amount, .. } => self.reference.cash += amount.value(),
            PortfolioCommand::WithdrawCash { amount, .. } => self.reference.cash -= amount.value(),
            PortfolioCommand::ReserveFunds { order_id, symbol, price, .. } => self.orders.push(PlacedOrder {
                order_id: *order_id,
                symbol: symbol.clone(),
                side: Side::Buy,
                price: price.value(),
            }),
            PortfolioCommand::ReserveQuantity { order_id, symbol, .. } => {
                let price = self.last_price.get(symbol).copied().unwrap_or(Decimal::ONE_HUNDRED);
                self.orders.push(PlacedOrder { order_id: *order_id, symbol: symbol.clone(), side: Side::Sell, price });
            }
            PortfolioCommand::ApplyExecution { symbol, side, quantity, price, fee, .. }
            | PortfolioCommand::BookExternalTrade { symbol, side, quantity, price, fee, .. } => {
                if matches!(command, PortfolioCommand::ApplyExecution { .. }) {
                    self.applied.push(command.clone());
                }
                let (quantity, price, fee) = (quantity.value(), price.value(), fee.value());
                let PortfolioEvent::ExecutionApplied { realized_pnl, .. } = event else {
                    return Err(TestCaseError::fail(format!("{event:?} for an execution")));
                };
                match side {
                    Side::Buy => {
                        self.reference.buy(symbol, quantity, price, fee);
                        prop_assert_eq!(*realized_pnl, Decimal::ZERO);
                    }
                    Side::Sell => {
                        let (fifo, average) = self.reference.sell(symbol, quantity, price, fee);
                        let expected = match self.method {
                            CostBasisMethod::Fifo => fifo,
                            CostBasisMethod::AverageCost => average,
                        };
                        prop_assert_eq!(*realized_pnl, expected, "realized P&L of {:?}", command);
                    }
                }
            }
            PortfolioCommand::OpenPortfolio { .. }
            | PortfolioCommand::AdjustReservation { .. }
            | PortfolioCommand::ReleaseReservation { .. }
            | PortfolioCommand::CreateAlert { .. }
            | PortfolioCommand::CancelAlert { .. }
            | PortfolioCommand::RearmAlert { .. } => {}
        }
        Ok(())
    }

    fn check_state(&self) -> Result<(), TestCaseError> {
        let portfolio = &self.portfolio;
        prop_assert_eq!(portfolio.check_invariants(), Ok(()));

        let mut rebuilt = Portfolio::default();
        for event in &self.events {
            rebuilt.apply(event.clone());
        }
        prop_assert_eq!(&rebuilt, portfolio, "a rebuild from the events differs");

        let snapshot: Portfolio = serde_json::from_str(&serde_json::to_string(portfolio).unwrap()).unwrap();
        prop_assert_eq!(&snapshot, portfolio, "a JSON snapshot round trip differs");

        prop_assert_eq!(portfolio.cash, self.reference.cash);
        let symbols: BTreeSet<&Symbol> = portfolio.positions.keys().chain(self.reference.positions.keys()).collect();
        let mut realized_total = Decimal::ZERO;
        for symbol in symbols {
            let position = portfolio.positions.get(symbol).cloned().unwrap_or_default();
            let reference = self.reference.positions.get(symbol);
            let reference_lots: Vec<(Decimal, Decimal)> =
                reference.map(|r| r.fifo_lots.iter().copied().collect()).unwrap_or_default();
            let lots: Vec<(Decimal, Decimal)> = position.lots.iter().map(|l| (l.quantity, l.cost)).collect();
            prop_assert_eq!(&lots, &reference_lots, "{} lots", symbol);
            let quantity: Decimal = reference_lots.iter().map(|(q, _)| q).sum();
            prop_assert_eq!(position.quantity, quantity, "{} quantity", symbol);

            let (cost_basis, realized) = match (self.method, reference) {
                (_, None) => (Decimal::ZERO, Decimal::ZERO),
                (CostBasisMethod::Fifo, Some(r)) => (r.fifo_lots.iter().map(|(_, c)| c).sum(), r.fifo_realized),
                (CostBasisMethod::AverageCost, Some(r)) => {
                    prop_assert_eq!(r.average_quantity, quantity);
                    (r.average_cost, r.average_realized)
                }
            };
            prop_assert_eq!(position.cost_basis, cost_basis, "{} cost basis", symbol);
            prop_assert_eq!(position.realized_pnl, realized, "{} realized P&L", symbol);
            realized_total += realized;
        }
        prop_assert_eq!(portfolio.realized_pnl, realized_total);
        Ok(())
    }
}

/// `quarters`/4 of `open`, truncated to the generated scale and at least one step; 5 quarters asks for one
/// step more than `open`.
fn quarters_of(open: Decimal, quarters: u32) -> Quantity {
    let step = Decimal::new(1, QUANTITY_SCALE);
    let quantity = if quarters > 4 {
        open + step
    } else {
        (open * Decimal::from(quarters) / Decimal::from(4))
            .round_dp_with_strategy(QUANTITY_SCALE, RoundingStrategy::ToZero)
            .max(step)
    };
    Quantity::new(quantity).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn random_command_sequences_keep_the_books_straight(
        method in cost_basis_method(),
        steps in prop::collection::vec(step(), 1..=STEPS_MAX),
    ) {
        let mut harness = Harness::open(method);
        for step in &steps {
            harness.run(step)?;
        }
    }
}
