//! The paper executor's order book: which accepted orders are working, and what to do with them when a price
//! arrives. Pure logic (no I/O), driven by order events from the log, ticks and the clock; the runner turns its
//! [`Action`]s into commands.
//!
//! Fill rules, per tick of the order's symbol:
//! - the **execution price** is the tick's price moved against the order by the slippage (buys pay more,
//!   sells get less), rounded to the cent against the order, then bounded by the order's limit or, for market
//!   and stop orders, by their protection price (a buy's ceiling, a sell's floor);
//! - a **limit** order fills only when the tick's price reaches its limit (buy: at or below, sell: at or above);
//! - the **quantity** is the order's leaves, or less when the tick carries a volume: at most
//!   `volume × participation` per tick (partial fills);
//! - a **stop** (stop-limit) order works only once a tick reaches its stop (buy: at or above, sell: at or below):
//!   the book asks for the trigger with that tick, then fills it from the same tick as a market (limit) order;
//! - **IOC** orders take what the first price after acceptance offers and cancel the rest; **FOK** orders fill
//!   completely from that price or are cancelled; **Day** orders still working at the day's end (a configured
//!   UTC time) expire; **GTC** orders work until filled or cancelled.
//!
//! The book applies its own fills at once (so one tick cannot fill the same quantity twice) and takes the
//! log's word when the events arrive: `ExecutionRecorded` sets the leaves, terminal events remove the order.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Days, NaiveTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};

use crate::domain::order::TickRef;
use crate::domain::values::{ExecId, Money, OrderId, Price, Quantity, Symbol};
use crate::domain::{OrderEvent, OrderStatus, OrderType, Side, TimeInForce};
use crate::market::Tick;

/// Prefix of the execution ids the paper executor assigns (`P1`, `P2`, … per order).
pub const EXEC_ID_PREFIX: &str = "P";
/// Largest slippage or fee rate accepted, in basis points (10 %).
pub const RATE_BPS_MAX: u32 = 1_000;

/// How paper fills are priced and charged.
#[derive(Debug, Clone, PartialEq)]
pub struct PaperConfig {
    /// Price moved against the order, in basis points of the tick's price.
    pub slippage_bps: u32,
    /// Fee in basis points of the fill's value …
    pub fee_bps: u32,
    /// … but at least this much per fill.
    pub fee_min: Decimal,
    /// Share of a tick's volume one order may take (0 < p ≤ 1); ticks without a volume are unlimited.
    pub participation: Decimal,
    /// Day orders expire at this time (UTC) of the day they were placed (or the next day, when placed after it).
    pub day_end_utc: NaiveTime,
}

impl Default for PaperConfig {
    fn default() -> Self {
        Self {
            slippage_bps: 5,
            fee_bps: 5,
            fee_min: Decimal::ZERO,
            participation: Decimal::ONE,
            day_end_utc: NaiveTime::from_hms_opt(21, 0, 0).unwrap_or(NaiveTime::MIN),
        }
    }
}

impl PaperConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.slippage_bps > RATE_BPS_MAX || self.fee_bps > RATE_BPS_MAX {
            return Err(format!("slippage and fee must be at most {RATE_BPS_MAX} basis points"));
        }
        if self.fee_min.is_sign_negative() || self.fee_min > Decimal::from(1_000) {
            return Err("the minimum fee must be 0 to 1000".into());
        }
        if self.participation <= Decimal::ZERO || self.participation > Decimal::ONE {
            return Err("participation must be above 0 and at most 1".into());
        }
        Ok(())
    }
}

/// What the book wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A tick reached a stop order's stop.
    Trigger {
        order_id: OrderId,
        price: Price,
        tick: TickRef,
    },
    Fill {
        order_id: OrderId,
        exec_id: ExecId,
        quantity: Quantity,
        price: Price,
        fee: Money,
    },
    Cancel {
        order_id: OrderId,
        reason: &'static str,
    },
    Expire {
        order_id: OrderId,
    },
}

impl Action {
    pub fn order_id(&self) -> OrderId {
        match self {
            Action::Trigger { order_id, .. }
            | Action::Fill { order_id, .. }
            | Action::Cancel { order_id, .. }
            | Action::Expire { order_id } => *order_id,
        }
    }
}

#[derive(Debug, Clone)]
struct Working {
    symbol: Symbol,
    side: Side,
    order_type: OrderType,
    time_in_force: TimeInForce,
    leaves: Decimal,
    placed_at: DateTime<Utc>,
    accepted: bool,
    /// False for a stop order until its stop is reached (true for the other types).
    triggered: bool,
    protection: Option<Price>,
    /// Number of the next paper execution id.
    next_exec: u64,
    /// A cancel or expiry is on its way: nothing more to do.
    closing: bool,
}

/// The working orders and the last price per symbol.
#[derive(Debug)]
pub struct PaperBook {
    config: PaperConfig,
    orders: BTreeMap<OrderId, Working>,
    last: HashMap<Symbol, Tick>,
}

impl PaperBook {
    pub fn new(config: PaperConfig) -> Self {
        Self { config, orders: BTreeMap::new(), last: HashMap::new() }
    }

    /// Orders placed and not yet finished.
    pub fn working(&self) -> usize {
        self.orders.len()
    }

    /// Applies one event of order `order_id` from the log; returns what its acceptance makes possible.
    pub fn apply_event(&mut self, order_id: OrderId, event: &OrderEvent) -> Vec<Action> {
        match event {
            OrderEvent::OrderPlaced { symbol, side, order_type, quantity, time_in_force, placed_at, .. } => {
                self.orders.entry(order_id).or_insert_with(|| Working {
                    symbol: symbol.clone(),
                    side: *side,
                    order_type: *order_type,
                    time_in_force: *time_in_force,
                    leaves: quantity.value(),
                    placed_at: *placed_at,
                    accepted: false,
                    triggered: order_type.stop_price().is_none(),
                    protection: None,
                    next_exec: 1,
                    closing: false,
                });
                Vec::new()
            }
            OrderEvent::OrderAccepted { protection_price, .. } => {
                let Some(order) = self.orders.get_mut(&order_id) else { return Vec::new() };
                order.accepted = true;
                order.protection = *protection_price;
                match self.last.get(&order.symbol).cloned() {
                    Some(tick) => self.evaluate(order_id, &tick),
                    None => Vec::new(),
                }
            }
            OrderEvent::OrderAmended { order_type, protection_price, leaves_quantity, .. } => {
                if let Some(order) = self.orders.get_mut(&order_id) {
                    order.order_type = *order_type;
                    order.protection = *protection_price;
                    order.leaves = *leaves_quantity;
                }
                Vec::new()
            }
            OrderEvent::OrderAmendRequested { .. } | OrderEvent::OrderAmendRejected { .. } => Vec::new(),
            OrderEvent::OrderTriggered { .. } => {
                if let Some(order) = self.orders.get_mut(&order_id) {
                    order.triggered = true;
                }
                Vec::new()
            }
            OrderEvent::ExecutionRecorded { exec_id, leaves_quantity, status, .. } => {
                if let Some(order) = self.orders.get_mut(&order_id) {
                    order.leaves = *leaves_quantity;
                    if let Some(n) = paper_exec_number(exec_id) {
                        order.next_exec = order.next_exec.max(n + 1);
                    }
                    if matches!(status, OrderStatus::Filled) || order.leaves <= Decimal::ZERO {
                        self.orders.remove(&order_id);
                    }
                }
                Vec::new()
            }
            OrderEvent::OrderRejected { .. } | OrderEvent::OrderCanceled { .. } | OrderEvent::OrderExpired { .. } => {
                self.orders.remove(&order_id);
                Vec::new()
            }
        }
    }

    /// A new price: fills what it crosses.
    pub fn on_tick(&mut self, tick: &Tick) -> Vec<Action> {
        if let Some(last) = self.last.get(&tick.symbol) {
            if last.order_key() >= tick.order_key() {
                return Vec::new(); // a redelivered or older tick
            }
        }
        self.last.insert(tick.symbol.clone(), tick.clone());
        let ids: Vec<OrderId> = self
            .orders
            .iter()
            .filter(|(_, o)| o.accepted && !o.closing && o.symbol == tick.symbol)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter().flat_map(|id| self.evaluate(id, tick)).collect()
    }

    /// Day orders whose trading day has ended by `now`.
    pub fn expire_due(&mut self, now: DateTime<Utc>) -> Vec<Action> {
        let day_end = self.config.day_end_utc;
        let mut actions = Vec::new();
        for (id, order) in self.orders.iter_mut() {
            if order.time_in_force == TimeInForce::Day
                && !order.closing
                && now >= day_end_after(order.placed_at, day_end)
            {
                order.closing = true;
                actions.push(Action::Expire { order_id: *id });
            }
        }
        actions
    }

    /// An action could not be carried out: forget what the book assumed (the log has the last word).
    pub fn action_failed(&mut self, action: &Action) {
        let Some(order) = self.orders.get_mut(&action.order_id()) else { return };
        match action {
            Action::Trigger { .. } => order.triggered = false,
            Action::Fill { quantity, .. } => order.leaves += quantity.value(),
            Action::Cancel { .. } | Action::Expire { .. } => order.closing = false,
        }
    }

    fn evaluate(&mut self, order_id: OrderId, tick: &Tick) -> Vec<Action> {
        let config = self.config.clone();
        let Some(order) = self.orders.get_mut(&order_id) else { return Vec::new() };
        if !order.accepted || order.closing || order.leaves <= Decimal::ZERO {
            return Vec::new();
        }
        let mut actions = Vec::new();
        if !order.triggered {
            if !order.order_type.triggered_by(order.side, tick.price) {
                return actions;
            }
            order.triggered = true;
            actions.push(Action::Trigger { order_id, price: tick.price, tick: TickRef { ts: tick.ts, seq: tick.seq } });
        }
        let price = execution_price(&config, order, tick.price.value());
        let available = tick
            .volume
            .map(|volume| (volume * config.participation).round_dp_with_strategy(8, RoundingStrategy::ToZero))
            .unwrap_or(order.leaves);
        let quantity = order.leaves.min(available);
        let fill = |order: &mut Working, quantity: Decimal, price: Decimal| -> Option<Action> {
            let exec_id = ExecId::new(format!("{EXEC_ID_PREFIX}{}", order.next_exec)).ok()?;
            let quantity_value = Quantity::new(quantity).ok()?;
            let price_value = Price::new(price).ok()?;
            let fee = (quantity * price * Decimal::new(config.fee_bps.into(), 4))
                .max(config.fee_min)
                .round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
            let fee = Money::new(fee).ok()?;
            order.next_exec += 1;
            order.leaves -= quantity;
            Some(Action::Fill { order_id, exec_id, quantity: quantity_value, price: price_value, fee })
        };
        match order.time_in_force {
            TimeInForce::Fok => match price {
                Some(price) if quantity >= order.leaves => actions.extend(fill(order, order.leaves, price)),
                _ => {
                    order.closing = true;
                    actions.push(Action::Cancel {
                        order_id,
                        reason: "FOK: the price or volume did not allow a complete fill",
                    });
                }
            },
            TimeInForce::Ioc => {
                if let Some(price) = price.filter(|_| quantity > Decimal::ZERO) {
                    actions.extend(fill(order, quantity, price));
                }
                if order.leaves > Decimal::ZERO {
                    order.closing = true;
                    actions.push(Action::Cancel { order_id, reason: "IOC: remainder cancelled" });
                }
            }
            TimeInForce::Day | TimeInForce::Gtc => {
                if let Some(price) = price.filter(|_| quantity > Decimal::ZERO) {
                    actions.extend(fill(order, quantity, price));
                }
            }
        }
        actions
    }
}

/// The price a fill gets at market price `market`, or `None` when the order's limit (or protection) is not
/// reached.
fn execution_price(config: &PaperConfig, order: &Working, market: Decimal) -> Option<Decimal> {
    let slip = Decimal::new(config.slippage_bps.into(), 4);
    match order.side {
        Side::Buy => {
            let mut price = (market * (Decimal::ONE + slip)).round_dp_with_strategy(2, RoundingStrategy::AwayFromZero);
            let cap = order.order_type.limit_price().or(order.protection).map(|p| p.value());
            if let Some(cap) = cap {
                if market > cap {
                    return None;
                }
                price = price.min(cap);
            }
            Some(price)
        }
        Side::Sell => {
            let mut price = (market * (Decimal::ONE - slip)).round_dp_with_strategy(2, RoundingStrategy::ToZero);
            let floor = order.order_type.limit_price().or(order.protection).map(|p| p.value());
            if let Some(floor) = floor {
                if market < floor {
                    return None;
                }
                price = price.max(floor);
            }
            (price > Decimal::ZERO).then_some(price)
        }
    }
}

/// The first day end after `placed_at`.
pub fn day_end_after(placed_at: DateTime<Utc>, day_end: NaiveTime) -> DateTime<Utc> {
    let same_day = placed_at.date_naive().and_time(day_end).and_utc();
    if placed_at < same_day {
        same_day
    } else {
        same_day.checked_add_days(Days::new(1)).unwrap_or(same_day)
    }
}

fn paper_exec_number(exec_id: &ExecId) -> Option<u64> {
    exec_id.as_str().strip_prefix(EXEC_ID_PREFIX)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::values::{ClientOrderId, PortfolioId};

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    fn tick(price: &str, seq: i64, volume: Option<&str>) -> Tick {
        Tick {
            version: crate::market::TICK_VERSION,
            symbol: Symbol::new("ACME").unwrap(),
            price: Price::new(d(price)).unwrap(),
            ts: at("2026-12-01T15:00:00Z") + chrono::Duration::seconds(seq),
            seq,
            volume: volume.map(d),
            source: "test".into(),
        }
    }

    /// A book holding one accepted order; returns the book, the order id and what acceptance did.
    fn accepted(
        config: PaperConfig,
        side: Side,
        order_type: OrderType,
        quantity: &str,
        time_in_force: TimeInForce,
        last: Option<Tick>,
        protection: Option<&str>,
    ) -> (PaperBook, OrderId, Vec<Action>) {
        let mut book = PaperBook::new(config);
        if let Some(tick) = last {
            book.on_tick(&tick);
        }
        let id = OrderId::generate();
        let placed = OrderEvent::OrderPlaced {
            order_id: id,
            portfolio_id: PortfolioId::generate(),
            client_order_id: ClientOrderId::new("c1").unwrap(),
            symbol: Symbol::new("ACME").unwrap(),
            side,
            order_type,
            quantity: Quantity::new(d(quantity)).unwrap(),
            time_in_force,
            placed_at: at("2026-12-01T14:00:00Z"),
        };
        assert!(book.apply_event(id, &placed).is_empty());
        let accept = OrderEvent::OrderAccepted {
            protection_price: protection.map(|p| Price::new(d(p)).unwrap()),
            accepted_at: at("2026-12-01T14:00:01Z"),
        };
        let actions = book.apply_event(id, &accept);
        (book, id, actions)
    }

    fn limit(price: &str) -> OrderType {
        OrderType::Limit { limit_price: Price::new(d(price)).unwrap() }
    }

    fn fills(actions: &[Action]) -> Vec<(String, Decimal, Decimal, Decimal)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Fill { exec_id, quantity, price, fee, .. } => {
                    Some((exec_id.to_string(), quantity.value(), price.value(), fee.value()))
                }
                _ => None,
            })
            .collect()
    }

    fn cancels(actions: &[Action]) -> usize {
        actions.iter().filter(|a| matches!(a, Action::Cancel { .. })).count()
    }

    #[test]
    fn a_market_buy_fills_at_the_last_price_plus_slippage_with_the_fee() {
        // 100 × 1.0005 = 100.05; fee 10 × 100.05 × 0.0005 = 0.50025 → 0.50.
        let (_, _, actions) = accepted(
            PaperConfig::default(),
            Side::Buy,
            OrderType::Market,
            "10",
            TimeInForce::Day,
            Some(tick("100", 1, None)),
            Some("105"),
        );
        assert_eq!(fills(&actions), vec![("P1".into(), d("10"), d("100.05"), d("0.50"))]);
    }

    #[test]
    fn a_market_sell_fills_below_the_last_price_and_the_minimum_fee_applies() {
        let config = PaperConfig { fee_min: d("1"), ..PaperConfig::default() };
        let (_, _, actions) =
            accepted(config, Side::Sell, OrderType::Market, "2", TimeInForce::Day, Some(tick("100", 1, None)), None);
        assert_eq!(fills(&actions), vec![("P1".into(), d("2"), d("99.95"), d("1"))]);
    }

    #[test]
    fn a_market_order_without_a_price_waits_for_the_first_tick() {
        let (mut book, _, actions) =
            accepted(PaperConfig::default(), Side::Buy, OrderType::Market, "1", TimeInForce::Gtc, None, Some("50"));
        assert!(actions.is_empty());
        assert_eq!(fills(&book.on_tick(&tick("40", 1, None))), vec![("P1".into(), d("1"), d("40.02"), d("0.02"))]);
    }

    #[test]
    fn a_market_buy_never_pays_more_than_its_protection_price() {
        let (mut book, _, actions) =
            accepted(PaperConfig::default(), Side::Buy, OrderType::Market, "1", TimeInForce::Gtc, None, Some("100.02"));
        assert!(actions.is_empty());
        assert_eq!(fills(&book.on_tick(&tick("100", 1, None)))[0].2, d("100.02"), "capped, not 100.05");
        let (mut book, _, _) =
            accepted(PaperConfig::default(), Side::Buy, OrderType::Market, "1", TimeInForce::Gtc, None, Some("100"));
        assert!(book.on_tick(&tick("101", 1, None)).is_empty(), "above the protection: no fill");
    }

    #[test]
    fn a_limit_buy_fills_only_once_the_price_reaches_its_limit_and_never_above_it() {
        let (mut book, _, actions) = accepted(
            PaperConfig::default(),
            Side::Buy,
            limit("99"),
            "5",
            TimeInForce::Gtc,
            Some(tick("100", 1, None)),
            None,
        );
        assert!(actions.is_empty(), "100 is above the limit");
        assert!(book.on_tick(&tick("99.5", 2, None)).is_empty());
        // 99 × 1.0005 = 99.0495 → 99.05, capped at the limit 99.
        assert_eq!(fills(&book.on_tick(&tick("99", 3, None))), vec![("P1".into(), d("5"), d("99"), d("0.25"))]);
        assert!(book.on_tick(&tick("98", 4, None)).is_empty(), "filled: nothing left");
    }

    #[test]
    fn a_limit_sell_fills_only_at_or_above_its_limit() {
        let (mut book, _, _) = accepted(
            PaperConfig::default(),
            Side::Sell,
            limit("110"),
            "3",
            TimeInForce::Gtc,
            Some(tick("100", 1, None)),
            None,
        );
        assert!(book.on_tick(&tick("109.99", 2, None)).is_empty());
        assert_eq!(fills(&book.on_tick(&tick("111", 3, None)))[0].2, d("110.94"));
    }

    #[test]
    fn volume_limits_each_fill_and_the_rest_fills_on_later_ticks() {
        let config = PaperConfig { participation: d("0.5"), ..PaperConfig::default() };
        let (mut book, _, actions) =
            accepted(config, Side::Buy, limit("100"), "10", TimeInForce::Gtc, Some(tick("100", 1, Some("8"))), None);
        assert_eq!(fills(&actions).iter().map(|f| (f.0.clone(), f.1)).collect::<Vec<_>>(), vec![("P1".into(), d("4"))]);
        let second = book.on_tick(&tick("100", 2, Some("8")));
        let third = book.on_tick(&tick("100", 3, Some("20")));
        assert_eq!(fills(&second)[0].0, "P2");
        assert_eq!((fills(&second)[0].1, fills(&third)[0].1), (d("4"), d("2")), "never more than the leaves");
        assert!(book.on_tick(&tick("100", 4, Some("20"))).is_empty());
    }

    #[test]
    fn an_ioc_order_takes_what_the_first_price_offers_and_cancels_the_rest() {
        let (mut book, _, actions) = accepted(
            PaperConfig::default(),
            Side::Buy,
            limit("100"),
            "10",
            TimeInForce::Ioc,
            Some(tick("100", 1, Some("6"))),
            None,
        );
        assert_eq!(fills(&actions)[0].1, d("6"));
        assert_eq!(cancels(&actions), 1);
        assert!(book.on_tick(&tick("99", 2, None)).is_empty(), "closing: no later fill");
        let (_, _, actions) = accepted(
            PaperConfig::default(),
            Side::Buy,
            limit("90"),
            "10",
            TimeInForce::Ioc,
            Some(tick("100", 1, None)),
            None,
        );
        assert!(fills(&actions).is_empty());
        assert_eq!(cancels(&actions), 1, "not marketable: cancelled at once");
    }

    #[test]
    fn a_fok_order_fills_completely_or_not_at_all() {
        let (_, _, actions) = accepted(
            PaperConfig::default(),
            Side::Buy,
            limit("100"),
            "10",
            TimeInForce::Fok,
            Some(tick("100", 1, Some("9"))),
            None,
        );
        assert!(fills(&actions).is_empty());
        assert_eq!(cancels(&actions), 1);
        let (_, _, actions) = accepted(
            PaperConfig::default(),
            Side::Buy,
            limit("100"),
            "10",
            TimeInForce::Fok,
            Some(tick("100", 1, Some("10"))),
            None,
        );
        assert_eq!(fills(&actions)[0].1, d("10"));
        assert_eq!(cancels(&actions), 0);
    }

    #[test]
    fn day_orders_expire_at_the_day_end_and_gtc_orders_do_not() {
        let (mut book, day, _) =
            accepted(PaperConfig::default(), Side::Buy, limit("1"), "1", TimeInForce::Day, None, None);
        assert!(book.expire_due(at("2026-12-01T20:59:59Z")).is_empty());
        assert_eq!(book.expire_due(at("2026-12-01T21:00:00Z")), vec![Action::Expire { order_id: day }]);
        assert!(book.expire_due(at("2026-12-01T21:00:01Z")).is_empty(), "asked once");
        let (mut book, _, _) =
            accepted(PaperConfig::default(), Side::Buy, limit("1"), "1", TimeInForce::Gtc, None, None);
        assert!(book.expire_due(at("2026-12-09T00:00:00Z")).is_empty());
        assert_eq!(
            day_end_after(at("2026-12-01T22:00:00Z"), PaperConfig::default().day_end_utc),
            at("2026-12-02T21:00:00Z")
        );
    }

    #[test]
    fn the_log_has_the_last_word_on_leaves_ids_and_terminal_orders() {
        let (mut book, id, _) =
            accepted(PaperConfig::default(), Side::Buy, limit("100"), "10", TimeInForce::Gtc, None, None);
        let fill = book.on_tick(&tick("100", 1, Some("3")));
        book.action_failed(&fill[0]);
        // The failed fill's quantity is working again; its id is not reused.
        assert_eq!(fills(&book.on_tick(&tick("100", 2, Some("3"))))[0].0, "P2");
        let recorded = OrderEvent::ExecutionRecorded {
            portfolio_id: PortfolioId::generate(),
            symbol: Symbol::new("ACME").unwrap(),
            side: Side::Buy,
            exec_id: ExecId::new("P7").unwrap(),
            quantity: Quantity::new(d("10")).unwrap(),
            price: Price::new(d("100")).unwrap(),
            fee: Money::ZERO,
            executed_at: at("2026-12-01T15:00:00Z"),
            cum_quantity: d("10"),
            leaves_quantity: d("0"),
            average_price: d("100"),
            status: OrderStatus::Filled,
        };
        book.apply_event(id, &recorded);
        assert_eq!(book.working(), 0);
        assert!(book.on_tick(&tick("100", 3, None)).is_empty());
        assert!(book.on_tick(&tick("1", 2, None)).is_empty(), "an older tick is ignored");
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert!(PaperConfig::default().validate().is_ok());
        assert!(PaperConfig { participation: d("0"), ..PaperConfig::default() }.validate().is_err());
        assert!(PaperConfig { slippage_bps: 5_000, ..PaperConfig::default() }.validate().is_err());
        assert!(PaperConfig { fee_min: d("-1"), ..PaperConfig::default() }.validate().is_err());
    }

    fn triggers(actions: &[Action]) -> Vec<Decimal> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Trigger { price, .. } => Some(price.value()),
                _ => None,
            })
            .collect()
    }

    /// A buy stop waits below its stop; the first tick at or above it triggers it and fills it at once, capped
    /// by the protection price, and it is not triggered twice.
    #[test]
    fn a_buy_stop_is_triggered_by_the_first_tick_at_its_stop_and_fills_from_it() {
        let config = PaperConfig { slippage_bps: 0, fee_bps: 0, ..PaperConfig::default() };
        let stop = OrderType::Stop { stop_price: Price::new(d("100")).unwrap() };
        let (mut book, id, actions) =
            accepted(config, Side::Buy, stop, "3", TimeInForce::Gtc, Some(tick("99", 1, None)), Some("105"));
        assert!(actions.is_empty(), "below the stop: nothing");
        assert!(book.on_tick(&tick("99.99", 2, None)).is_empty());
        let actions = book.on_tick(&tick("100.5", 3, None));
        assert_eq!(triggers(&actions), vec![d("100.5")]);
        assert!(matches!(&actions[0], Action::Trigger { order_id, tick, .. } if *order_id == id && tick.seq == 3));
        assert_eq!(fills(&actions), vec![("P1".to_string(), d("3"), d("100.5"), d("0"))]);
        // A trigger the ledger refused is asked for again on the next tick.
        book.action_failed(&actions[0]);
        book.action_failed(&actions[1]);
        assert_eq!(triggers(&book.on_tick(&tick("101", 4, None))), vec![d("101")]);
    }

    /// A sell stop-limit triggered by a fall through its stop sells only at its limit or better.
    #[test]
    fn a_triggered_sell_stop_limit_waits_for_its_limit() {
        let config = PaperConfig { slippage_bps: 0, fee_bps: 0, ..PaperConfig::default() };
        let stop_limit = OrderType::StopLimit {
            stop_price: Price::new(d("90")).unwrap(),
            limit_price: Price::new(d("89")).unwrap(),
        };
        let (mut book, _, _) = accepted(config, Side::Sell, stop_limit, "2", TimeInForce::Gtc, None, None);
        let actions = book.on_tick(&tick("88", 1, None));
        assert_eq!((triggers(&actions), fills(&actions).len()), (vec![d("88")], 0), "triggered, not filled below 89");
        assert!(book.on_tick(&tick("88.5", 2, None)).is_empty());
        assert_eq!(fills(&book.on_tick(&tick("89.2", 3, None))), vec![("P1".to_string(), d("2"), d("89.2"), d("0"))]);
    }

    /// A market or stop sell never fills below its protection floor (the order would refuse it).
    #[test]
    fn a_protected_sell_does_not_fill_below_its_floor() {
        let config = PaperConfig { slippage_bps: 0, fee_bps: 0, ..PaperConfig::default() };
        let (mut book, _, actions) =
            accepted(config, Side::Sell, OrderType::Market, "1", TimeInForce::Gtc, None, Some("95"));
        assert!(actions.is_empty());
        assert!(fills(&book.on_tick(&tick("94.99", 1, None))).is_empty());
        assert_eq!(fills(&book.on_tick(&tick("95", 2, None))), vec![("P1".to_string(), d("1"), d("95"), d("0"))]);
    }
}
