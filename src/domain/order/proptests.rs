//! Property tests: one random order driven through random acceptances, fills, cancels and expiries.
//!
//! Fills are drawn around the order's limit (or a market reference price) so that some breach the limit or
//! the protection price, and around its open quantity so that some overfill; exec ids are sometimes reused.
//! After every step: the aggregate's invariants hold, `cum + leaves = quantity` while the order is live, the
//! order never overfills, a terminal order refuses everything and stays as it was, a refusal leaves no trace,
//! and the state equals a rebuild from its events and a JSON snapshot.

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use futures::executor::block_on;
use proptest::prelude::*;
use rust_decimal::{Decimal, RoundingStrategy};
use uuid::Uuid;

use super::{
    Order, OrderCommand, OrderError, OrderEvent, OrderRejectReason, OrderServices, OrderStatus, OrderType, PlaceOrder,
    RecordExecution, RejectCode, Side, TimeInForce,
};
use crate::domain::values::{ClientOrderId, ExecId, FreeText, Money, OrderId, PortfolioId, Price, Quantity, Symbol};

/// Random cases per property.
const CASES: u32 = 128;
/// Longest sequence of commands after the placement.
const STEPS_MAX: usize = 30;
const QUANTITY_SCALE: u32 = 3;
/// Cents: the default tick.
const PRICE_SCALE: u32 = 2;
/// What market orders' fills and protection prices are drawn around.
const MARKET_REFERENCE_PRICE: Decimal = Decimal::ONE_HUNDRED;

/// Runs one command through `handle` and returns the events it wrote.
fn handle(order: &mut Order, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
    let sink = EventSink::default();
    block_on(order.handle(command, &OrderServices::default(), &sink))?;
    Ok(block_on(sink.collect()))
}

fn now() -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000, 0).unwrap()
}

/// `reference` moved by `bps` basis points, on the cent grid, at least one cent.
fn moved(reference: Decimal, bps: i64) -> Price {
    let value = (reference * Decimal::from(10_000 + bps) / Decimal::from(10_000))
        .round_dp_with_strategy(PRICE_SCALE, RoundingStrategy::MidpointNearestEven)
        .max(Decimal::new(1, PRICE_SCALE));
    Price::new(value).unwrap()
}

#[derive(Debug, Clone)]
enum Step {
    /// Accept, with a protection price `bps` from the reference (ignored for limit orders) or none.
    Accept {
        protection_bps: Option<i64>,
    },
    Reject,
    /// Fill `quarters`/4 of what is open (5: one step more), `move_bps` from the reference price, reusing the
    /// previous exec id when `reuse_exec_id`.
    Fill {
        quarters: u32,
        move_bps: i64,
        reuse_exec_id: bool,
    },
    Cancel,
    Expire,
}

fn accept() -> impl Strategy<Value = Step> {
    prop::option::of(-500i64..=500).prop_map(|protection_bps| Step::Accept { protection_bps })
}

/// Mostly fills, so that an order lives through several before a cancel, expiry or full fill ends it.
fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => accept(),
        1 => Just(Step::Reject),
        24 => (prop_oneof![6 => 1u32..=3, 2 => Just(4), 1 => Just(5)], -300i64..=300, prop::bool::weighted(0.1))
            .prop_map(|(quarters, move_bps, reuse_exec_id)| Step::Fill { quarters, move_bps, reuse_exec_id }),
        1 => Just(Step::Cancel),
        1 => Just(Step::Expire),
    ]
}

/// Usually accepted first (the usual life of an order); otherwise the steps start on a pending order.
fn steps() -> impl Strategy<Value = Vec<Step>> {
    (prop::option::weighted(0.85, accept()), prop::collection::vec(step(), 1..=STEPS_MAX))
        .prop_map(|(first, rest)| first.into_iter().chain(rest).collect())
}

fn place_order() -> impl Strategy<Value = PlaceOrder> {
    let side = prop_oneof![Just(Side::Buy), Just(Side::Sell)];
    let order_type = prop_oneof![
        Just(OrderType::Market),
        (1i64..=50_000)
            .prop_map(|cents| OrderType::Limit { limit_price: Price::new(Decimal::new(cents, PRICE_SCALE)).unwrap() }),
    ];
    let time_in_force =
        prop_oneof![Just(TimeInForce::Day), Just(TimeInForce::Gtc), Just(TimeInForce::Ioc), Just(TimeInForce::Fok)];
    (side, order_type, 1i64..=100_000, time_in_force).prop_map(|(side, order_type, quantity, time_in_force)| {
        PlaceOrder {
            order_id: OrderId(Uuid::from_u128(1)),
            portfolio_id: PortfolioId(Uuid::from_u128(2)),
            client_order_id: ClientOrderId::new("proptest").unwrap(),
            symbol: Symbol::new("AAA").unwrap(),
            side,
            order_type,
            quantity: Quantity::new(Decimal::new(quantity, QUANTITY_SCALE)).unwrap(),
            time_in_force,
            placed_at: now(),
        }
    })
}

/// `quarters`/4 of `open`, truncated to the generated scale and at least one step; 5 quarters is one step more.
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

struct Harness {
    terms: PlaceOrder,
    order: Order,
    events: Vec<OrderEvent>,
    /// Σ accepted fill quantities and Σ quantity × price, kept by the test.
    filled: Decimal,
    filled_notional: Decimal,
    next_exec: u32,
}

impl Harness {
    fn place(terms: PlaceOrder) -> Self {
        let mut order = Order::default();
        let events = handle(&mut order, OrderCommand::PlaceOrder(terms.clone())).expect("placing a new order");
        Self { terms, order, events, filled: Decimal::ZERO, filled_notional: Decimal::ZERO, next_exec: 0 }
    }

    fn reference_price(&self) -> Decimal {
        self.terms.order_type.limit_price().map_or(MARKET_REFERENCE_PRICE, Price::value)
    }

    fn command_for(&mut self, step: &Step) -> OrderCommand {
        match step {
            Step::Accept { protection_bps } => OrderCommand::AcceptOrder {
                protection_price: protection_bps.map(|bps| moved(self.reference_price(), bps)),
                accepted_at: now(),
            },
            Step::Reject => OrderCommand::RejectOrder {
                reason: OrderRejectReason { code: RejectCode::InsufficientFunds, detail: "proptest".into() },
                rejected_at: now(),
            },
            Step::Fill { quarters, move_bps, reuse_exec_id } => {
                if !reuse_exec_id || self.next_exec == 0 {
                    self.next_exec += 1;
                }
                OrderCommand::RecordExecution(RecordExecution {
                    exec_id: ExecId::new(format!("x{}", self.next_exec)).unwrap(),
                    quantity: quarters_of(self.order.leaves_quantity, *quarters),
                    price: moved(self.reference_price(), *move_bps),
                    fee: Money::new(Decimal::new(125, 2)).unwrap(),
                    executed_at: now(),
                })
            }
            Step::Cancel => {
                OrderCommand::CancelOrder { reason: FreeText::new("reason", "proptest").unwrap(), canceled_at: now() }
            }
            Step::Expire => OrderCommand::ExpireOrder { expired_at: now() },
        }
    }

    fn run(&mut self, step: &Step) -> Result<(), TestCaseError> {
        let command = self.command_for(step);
        let before = self.order.clone();
        let result = handle(&mut self.order, command.clone());
        if before.status.is_terminal() {
            prop_assert_eq!(result, Err(OrderError::Terminal { status: before.status }), "{:?}", command);
            prop_assert_eq!(&self.order, &before, "a terminal order changed");
            return self.check_state();
        }
        match result {
            Err(error) => {
                prop_assert!(!matches!(error, OrderError::InvariantViolated(_)), "{error} on {command:?}");
                prop_assert_eq!(&self.order, &before, "a refused command changed the order");
            }
            Ok(events) => {
                prop_assert_eq!(events.len(), 1);
                if let OrderEvent::ExecutionRecorded { exec_id, quantity, price, .. } = &events[0] {
                    self.check_fill(&before, exec_id, quantity.value(), price.value())?;
                    self.filled += quantity.value();
                    self.filled_notional += quantity.value() * price.value();
                }
                self.events.extend(events);
            }
        }
        self.check_state()
    }

    /// What an accepted fill must respect, stated from the order's terms.
    fn check_fill(
        &self,
        before: &Order,
        exec_id: &ExecId,
        quantity: Decimal,
        price: Decimal,
    ) -> Result<(), TestCaseError> {
        prop_assert!(!before.exec_ids.contains(exec_id), "exec id {} booked twice", exec_id);
        prop_assert!(quantity <= before.leaves_quantity, "overfill: {} of {}", quantity, before.leaves_quantity);
        prop_assert!(before.status != OrderStatus::PendingNew, "filled before acceptance");
        if self.terms.time_in_force == TimeInForce::Fok {
            prop_assert_eq!(quantity, self.terms.quantity.value(), "a partial fill-or-kill fill");
        }
        let bounds = [self.terms.order_type.limit_price(), before.protection_price];
        for bound in bounds.into_iter().flatten().map(Price::value) {
            match self.terms.side {
                Side::Buy => prop_assert!(price <= bound, "bought at {} above {}", price, bound),
                Side::Sell => prop_assert!(price >= bound, "sold at {} below {}", price, bound),
            }
        }
        Ok(())
    }

    fn check_state(&self) -> Result<(), TestCaseError> {
        let order = &self.order;
        let quantity = self.terms.quantity.value();
        prop_assert_eq!(order.check_invariants(), Ok(()));
        prop_assert_eq!(order.cum_quantity, self.filled);
        prop_assert!(order.cum_quantity <= quantity, "filled {} of {}", order.cum_quantity, quantity);
        prop_assert!(!order.leaves_quantity.is_sign_negative() || order.leaves_quantity.is_zero());
        match order.status {
            OrderStatus::Canceled | OrderStatus::Expired | OrderStatus::Rejected => {
                prop_assert_eq!(order.leaves_quantity, Decimal::ZERO);
            }
            status => {
                prop_assert_eq!(order.cum_quantity + order.leaves_quantity, quantity);
                prop_assert_eq!(status == OrderStatus::Filled, order.leaves_quantity.is_zero());
            }
        }
        let average = (!self.filled.is_zero()).then(|| {
            (self.filled_notional / self.filled).round_dp_with_strategy(8, RoundingStrategy::MidpointNearestEven)
        });
        prop_assert_eq!(order.average_price(), average);

        let mut rebuilt = Order::default();
        for event in &self.events {
            rebuilt.apply(event.clone());
        }
        prop_assert_eq!(&rebuilt, order, "a rebuild from the events differs");
        let snapshot: Order = serde_json::from_str(&serde_json::to_string(order).unwrap()).unwrap();
        prop_assert_eq!(&snapshot, order, "a JSON snapshot round trip differs");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn random_order_lifecycles_never_overfill_and_terminal_states_stay_terminal(
        terms in place_order(),
        steps in steps(),
    ) {
        let mut harness = Harness::place(terms);
        for step in &steps {
            harness.run(step)?;
        }
    }
}
