//! Portfolio state (`apply`) and rules (`handle`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::accounting::{apply_consumption, consume_fifo, cost_basis_removed, proportional_share, round_money};
use super::{
    AlertRule, CostBasisMethod, Lot, PortfolioCommand, PortfolioError, PortfolioEvent, Position, Reservation,
    ALERTS_PER_PORTFOLIO_MAX,
};
use crate::domain::order::Side;
use crate::domain::values::{AlertId, Currency, ExecId, Money, OrderId, Owner, PortfolioId, Price, Quantity, Symbol};

/// The order id an external trade's `ExecutionApplied` carries: a UUID (version 5) derived from the portfolio and
/// the trade id, so the same trade always books under the same id. It names no Order aggregate.
pub fn external_order_id(portfolio_id: PortfolioId, trade_id: &ExecId) -> OrderId {
    OrderId(uuid::Uuid::new_v5(&portfolio_id.0, trade_id.as_str().as_bytes()))
}

/// The facts fixed when the portfolio was opened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortfolioTerms {
    pub portfolio_id: PortfolioId,
    pub owner: Owner,
    pub base_currency: Currency,
    pub cost_basis_method: CostBasisMethod,
    pub opened_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Portfolio {
    pub terms: Option<PortfolioTerms>,
    pub cash: Decimal,
    pub reserved_cash: Decimal,
    pub positions: BTreeMap<Symbol, Position>,
    pub reservations: BTreeMap<OrderId, Reservation>,
    pub realized_pnl: Decimal,
    #[serde(default)]
    pub alerts: BTreeMap<AlertId, AlertRule>,
    /// Since when buying power has been negative (a fill cost more than was available), if it is.
    #[serde(default)]
    pub deficit_since: Option<DateTime<Utc>>,
}

/// One fill, as `ApplyExecution` states it.
struct Fill {
    order_id: OrderId,
    exec_id: ExecId,
    symbol: Symbol,
    side: Side,
    quantity: Quantity,
    price: Price,
    fee: Money,
    executed_at: DateTime<Utc>,
}

impl Portfolio {
    /// Cash not promised to open orders. Negative while the portfolio is in deficit.
    pub fn buying_power(&self) -> Decimal {
        self.cash - self.reserved_cash
    }

    /// How much cash is missing: reserved − cash when that is positive, else zero.
    pub fn deficit(&self) -> Decimal {
        (-self.buying_power()).max(Decimal::ZERO)
    }

    /// Refuses taking `amount` out of buying power (a withdrawal, a buy reservation): never while in deficit,
    /// never beyond what is available.
    fn check_available(&self, amount: Decimal) -> Result<(), PortfolioError> {
        if self.deficit() > Decimal::ZERO {
            return Err(PortfolioError::InDeficit { deficit: self.deficit() });
        }
        if amount > self.buying_power() {
            return Err(PortfolioError::InsufficientFunds { requested: amount, available: self.buying_power() });
        }
        Ok(())
    }

    fn terms(&self) -> Result<&PortfolioTerms, PortfolioError> {
        self.terms.as_ref().ok_or(PortfolioError::NotFound)
    }

    /// The invariants every state must satisfy (see the module docs).
    pub fn check_invariants(&self) -> Result<(), PortfolioError> {
        let violated = |what: String| Err(PortfolioError::InvariantViolated(what));
        if self.reserved_cash < Decimal::ZERO {
            return violated(format!("reserved cash {} is negative", self.reserved_cash));
        }
        // Buying power (and cash) may be negative only as a deficit that fills caused; the marker says so.
        if self.deficit_since.is_some() != (self.deficit() > Decimal::ZERO) {
            return violated(format!("deficit {} but deficit marker {:?}", self.deficit(), self.deficit_since));
        }
        let reserved_by_orders: Decimal = self.reservations.values().map(|r| r.cash).sum();
        if reserved_by_orders != self.reserved_cash {
            return violated(format!(
                "reservations hold {reserved_by_orders}, reserved cash is {}",
                self.reserved_cash
            ));
        }
        for (symbol, position) in &self.positions {
            let lots: Decimal = position.lots.iter().map(|l| l.quantity).sum();
            if lots != position.quantity {
                return violated(format!("{symbol}: lots hold {lots}, position is {}", position.quantity));
            }
            if position.quantity.is_sign_negative() && !position.quantity.is_zero() {
                return violated(format!("{symbol}: negative position"));
            }
            if position.reserved_quantity > position.quantity || position.reserved_quantity.is_sign_negative() {
                return violated(format!("{symbol}: reserved quantity outside 0..=quantity"));
            }
            let reserved_by_orders: Decimal = self
                .reservations
                .values()
                .filter(|r| r.side == Side::Sell && &r.symbol == symbol)
                .map(|r| r.open_quantity)
                .sum();
            if reserved_by_orders != position.reserved_quantity {
                return violated(format!("{symbol}: sell reservations hold {reserved_by_orders}"));
            }
            if position.quantity.is_zero() && !position.cost_basis.is_zero() {
                return violated(format!("{symbol}: flat position with cost basis {}", position.cost_basis));
            }
        }
        Ok(())
    }

    fn reserve_funds(
        &self,
        order_id: OrderId,
        symbol: Symbol,
        quantity: Quantity,
        price: Price,
        amount: Money,
        at: DateTime<Utc>,
    ) -> Result<Option<PortfolioEvent>, PortfolioError> {
        self.terms()?;
        if let Some(existing) = self.reservations.get(&order_id) {
            let same = existing.side == Side::Buy
                && existing.symbol == symbol
                && existing.open_quantity == quantity.value()
                && existing.cash == amount.value()
                && existing.price.is_none_or(|reserved_at| reserved_at == price)
                && existing.applied_exec_ids.is_empty();
            return if same { Ok(None) } else { Err(PortfolioError::ReservationExists(order_id)) };
        }
        self.check_available(amount.value())?;
        Ok(Some(PortfolioEvent::FundsReserved {
            order_id,
            symbol,
            quantity,
            price,
            amount,
            reserved_cash_after: self.reserved_cash + amount.value(),
            at,
        }))
    }

    fn reserve_quantity(
        &self,
        order_id: OrderId,
        symbol: Symbol,
        quantity: Quantity,
        at: DateTime<Utc>,
    ) -> Result<Option<PortfolioEvent>, PortfolioError> {
        self.terms()?;
        if let Some(existing) = self.reservations.get(&order_id) {
            let same = existing.side == Side::Sell
                && existing.symbol == symbol
                && existing.open_quantity == quantity.value()
                && existing.applied_exec_ids.is_empty();
            return if same { Ok(None) } else { Err(PortfolioError::ReservationExists(order_id)) };
        }
        let position = self.positions.get(&symbol);
        let available = position.map_or(Decimal::ZERO, Position::free_quantity);
        if quantity.value() > available {
            return Err(PortfolioError::InsufficientQuantity { symbol, requested: quantity.value(), available });
        }
        let reserved_quantity_after = position.map_or(Decimal::ZERO, |p| p.reserved_quantity) + quantity.value();
        Ok(Some(PortfolioEvent::QuantityReserved { order_id, symbol, quantity, reserved_quantity_after, at }))
    }

    fn release(
        &self,
        order_id: OrderId,
        reason: super::ReleaseReason,
        at: DateTime<Utc>,
    ) -> Result<Option<PortfolioEvent>, PortfolioError> {
        self.terms()?;
        let Some(reservation) = self.reservations.get(&order_id) else { return Ok(None) };
        let quantity_released = match reservation.side {
            Side::Buy => Decimal::ZERO,
            Side::Sell => reservation.open_quantity,
        };
        Ok(Some(PortfolioEvent::ReservationReleased {
            order_id,
            symbol: reservation.symbol.clone(),
            cash_released: reservation.cash,
            quantity_released,
            reason,
            at,
        }))
    }

    fn adjust(
        &self,
        order_id: OrderId,
        quantity_delta: Decimal,
        price: Option<Price>,
        at: DateTime<Utc>,
    ) -> Result<Option<PortfolioEvent>, PortfolioError> {
        self.terms()?;
        let reservation = self.reservations.get(&order_id).ok_or(PortfolioError::NoReservation(order_id))?;
        let open_after = reservation.open_quantity + quantity_delta;
        if open_after <= Decimal::ZERO {
            return Err(PortfolioError::ExceedsReservation {
                quantity: -quantity_delta,
                open: reservation.open_quantity,
            });
        }
        let position = self.positions.get(&reservation.symbol).cloned().unwrap_or_default();
        let (cash_delta, price) = match reservation.side {
            Side::Sell => {
                if quantity_delta > position.free_quantity() {
                    return Err(PortfolioError::InsufficientQuantity {
                        symbol: reservation.symbol.clone(),
                        requested: quantity_delta,
                        available: position.free_quantity(),
                    });
                }
                (Decimal::ZERO, reservation.price)
            }
            Side::Buy => {
                let price = price.or(reservation.price);
                // The cash per unit and price stays what it was (the fee allowance included), rounded up;
                // multiplied out before dividing, so that exact proportions stay exact.
                let (after_factor, before_factor) = match (reservation.price, price) {
                    (Some(before), Some(after)) => {
                        (open_after.checked_mul(after.value()), reservation.open_quantity.checked_mul(before.value()))
                    }
                    _ => (Some(open_after), Some(reservation.open_quantity)),
                };
                let cash_after = after_factor
                    .zip(before_factor)
                    .and_then(|(after, before)| reservation.cash.checked_mul(after)?.checked_div(before))
                    .map(round_up)
                    .filter(|cash| *cash <= crate::domain::values::MONEY_MAX)
                    .ok_or(PortfolioError::InsufficientFunds {
                        requested: crate::domain::values::MONEY_MAX,
                        available: self.buying_power(),
                    })?;
                let delta = cash_after - reservation.cash;
                if delta > Decimal::ZERO {
                    self.check_available(delta)?;
                }
                (delta, price)
            }
        };
        if quantity_delta.is_zero() && cash_delta.is_zero() && price == reservation.price {
            return Ok(None);
        }
        let reserved_quantity_after = match reservation.side {
            Side::Sell => position.reserved_quantity + quantity_delta,
            Side::Buy => position.reserved_quantity,
        };
        Ok(Some(PortfolioEvent::ReservationAdjusted {
            order_id,
            symbol: reservation.symbol.clone(),
            quantity_delta,
            cash_delta,
            price,
            open_quantity_after: open_after,
            reserved_cash_after: self.reserved_cash + cash_delta,
            reserved_quantity_after,
            at,
        }))
    }

    /// Books a fill of one of this portfolio's orders against the order's reservation.
    fn apply_fill(&self, fill: Fill) -> Result<Option<PortfolioEvent>, PortfolioError> {
        self.terms()?;
        let reservation = self.reservations.get(&fill.order_id).ok_or(PortfolioError::NoReservation(fill.order_id))?;
        if reservation.applied_exec_ids.contains(&fill.exec_id) {
            return Ok(None); // a redelivered execution: already booked
        }
        if reservation.symbol != fill.symbol || reservation.side != fill.side {
            return Err(PortfolioError::ReservationMismatch(fill.order_id));
        }
        let quantity = fill.quantity.value();
        if quantity > reservation.open_quantity {
            return Err(PortfolioError::ExceedsReservation { quantity, open: reservation.open_quantity });
        }
        self.book(fill, Some(reservation)).map(Some)
    }

    /// Books a trade made outside the ledger: no order, no reservation; a sell may only take units no open
    /// order has reserved.
    fn book_external(&self, fill: Fill) -> Result<Option<PortfolioEvent>, PortfolioError> {
        self.terms()?;
        // Lots are kept in the order they were acquired (FIFO consumes the oldest first): a trade dated before
        // the newest open lot of its symbol would be booked out of order.
        let newest = self.positions.get(&fill.symbol).and_then(|p| p.lots.back()).map(|lot| lot.acquired_at);
        if let Some(newest) = newest.filter(|newest| fill.executed_at < *newest) {
            return Err(PortfolioError::BeforeNewestLot { symbol: fill.symbol, at: fill.executed_at, newest });
        }
        if fill.side == Side::Sell {
            let available = self.positions.get(&fill.symbol).map(Position::free_quantity).unwrap_or_default();
            if fill.quantity.value() > available {
                return Err(PortfolioError::InsufficientQuantity {
                    symbol: fill.symbol,
                    requested: fill.quantity.value(),
                    available,
                });
            }
        }
        self.book(fill, None).map(Some)
    }

    /// The `ExecutionApplied` of a fill: cash, lots, cost basis and realized P&L, releasing what `reservation`
    /// (if the fill has one) set aside for it.
    fn book(&self, fill: Fill, reservation: Option<&Reservation>) -> Result<PortfolioEvent, PortfolioError> {
        let method = self.terms()?.cost_basis_method;
        let quantity = fill.quantity.value();
        let gross = round_money(quantity * fill.price.value());
        let fee = fill.fee.value();
        let position = self.positions.get(&fill.symbol).cloned().unwrap_or_default();
        let lot_id = format!("{}/{}", fill.order_id, fill.exec_id);

        let event = match fill.side {
            Side::Buy => {
                // Booked whatever it costs: the fill has happened. If it costs more than its reservation and the
                // free cash, the portfolio goes into deficit (see `deficit_transition`).
                let cost = gross + fee;
                let release =
                    reservation.map(|r| proportional_share(r.cash, quantity, r.open_quantity)).unwrap_or_default();
                PortfolioEvent::ExecutionApplied {
                    order_id: fill.order_id,
                    exec_id: fill.exec_id,
                    symbol: fill.symbol,
                    side: fill.side,
                    quantity: fill.quantity,
                    price: fill.price,
                    fee: fill.fee,
                    gross,
                    cash_delta: -cost,
                    cash_after: self.cash - cost,
                    reserved_cash_released: release,
                    reserved_quantity_released: Decimal::ZERO,
                    lot_opened: Some(Lot { lot_id, quantity, cost, acquired_at: fill.executed_at }),
                    lots_consumed: Vec::new(),
                    cost_basis_removed: Decimal::ZERO,
                    realized_pnl: Decimal::ZERO,
                    position_quantity_after: position.quantity + quantity,
                    position_cost_basis_after: position.cost_basis + cost,
                    executed_at: fill.executed_at,
                }
            }
            Side::Sell => {
                if quantity > position.quantity {
                    return Err(PortfolioError::InsufficientQuantity {
                        symbol: fill.symbol,
                        requested: quantity,
                        available: position.quantity,
                    });
                }
                // A fee above the proceeds makes them negative: booked all the same, possibly into deficit.
                let proceeds = gross - fee;
                let lots_consumed = consume_fifo(&position.lots, quantity);
                let removed = cost_basis_removed(method, &position, quantity, &lots_consumed);
                PortfolioEvent::ExecutionApplied {
                    order_id: fill.order_id,
                    exec_id: fill.exec_id,
                    symbol: fill.symbol,
                    side: fill.side,
                    quantity: fill.quantity,
                    price: fill.price,
                    fee: fill.fee,
                    gross,
                    cash_delta: proceeds,
                    cash_after: self.cash + proceeds,
                    reserved_cash_released: Decimal::ZERO,
                    reserved_quantity_released: if reservation.is_some() { quantity } else { Decimal::ZERO },
                    lot_opened: None,
                    lots_consumed,
                    cost_basis_removed: removed,
                    realized_pnl: proceeds - removed,
                    position_quantity_after: position.quantity - quantity,
                    position_cost_basis_after: position.cost_basis - removed,
                    executed_at: fill.executed_at,
                }
            }
        };
        Ok(event)
    }

    fn decide(&self, command: PortfolioCommand) -> Result<Option<PortfolioEvent>, PortfolioError> {
        match command {
            PortfolioCommand::OpenPortfolio { portfolio_id, owner, base_currency, cost_basis_method, opened_at } => {
                if self.terms.is_some() {
                    return Err(PortfolioError::AlreadyExists);
                }
                Ok(Some(PortfolioEvent::PortfolioOpened {
                    portfolio_id,
                    owner,
                    base_currency,
                    cost_basis_method,
                    opened_at,
                }))
            }
            PortfolioCommand::DepositCash { amount, reference, at } => {
                self.terms()?;
                let cash_after = self.cash + amount.value();
                let reference = reference.map(String::from);
                Ok(Some(PortfolioEvent::CashDeposited { amount, reference, cash_after, at }))
            }
            PortfolioCommand::WithdrawCash { amount, reference, at } => {
                self.terms()?;
                self.check_available(amount.value())?;
                let cash_after = self.cash - amount.value();
                Ok(Some(PortfolioEvent::CashWithdrawn {
                    amount,
                    reference: reference.map(String::from),
                    cash_after,
                    at,
                }))
            }
            PortfolioCommand::ReserveFunds { order_id, symbol, quantity, price, amount, at } => {
                self.reserve_funds(order_id, symbol, quantity, price, amount, at)
            }
            PortfolioCommand::ReserveQuantity { order_id, symbol, quantity, at } => {
                self.reserve_quantity(order_id, symbol, quantity, at)
            }
            PortfolioCommand::ReleaseReservation { order_id, reason, at } => self.release(order_id, reason, at),
            PortfolioCommand::ApplyExecution { order_id, exec_id, symbol, side, quantity, price, fee, executed_at } => {
                self.apply_fill(Fill { order_id, exec_id, symbol, side, quantity, price, fee, executed_at })
            }
            PortfolioCommand::AdjustReservation { order_id, quantity_delta, price, at } => {
                self.adjust(order_id, quantity_delta, price, at)
            }
            PortfolioCommand::BookExternalTrade { trade_id, symbol, side, quantity, price, fee, executed_at } => {
                let order_id = external_order_id(self.terms()?.portfolio_id, &trade_id);
                self.book_external(Fill {
                    order_id,
                    exec_id: trade_id,
                    symbol,
                    side,
                    quantity,
                    price,
                    fee,
                    executed_at,
                })
            }
            PortfolioCommand::CreateAlert { alert_id, condition, at } => {
                self.terms()?;
                if self.alerts.contains_key(&alert_id) {
                    return Err(PortfolioError::AlertExists(alert_id));
                }
                if let Some(reason) = condition.invalid_reason() {
                    return Err(PortfolioError::InvalidAlert(reason));
                }
                if self.alerts.values().filter(|a| !a.canceled).count() >= ALERTS_PER_PORTFOLIO_MAX {
                    return Err(PortfolioError::TooManyAlerts);
                }
                Ok(Some(PortfolioEvent::AlertCreated { alert_id, condition, at }))
            }
            PortfolioCommand::CancelAlert { alert_id, at } => {
                self.terms()?;
                let alert = self.alerts.get(&alert_id).ok_or(PortfolioError::AlertNotFound(alert_id))?;
                if alert.canceled {
                    return Err(PortfolioError::AlertCanceled(alert_id));
                }
                Ok(Some(PortfolioEvent::AlertCanceled { alert_id, at }))
            }
            PortfolioCommand::RearmAlert { alert_id, at } => {
                self.terms()?;
                let alert = self.alerts.get(&alert_id).ok_or(PortfolioError::AlertNotFound(alert_id))?;
                if alert.canceled {
                    return Err(PortfolioError::AlertCanceled(alert_id));
                }
                Ok(Some(PortfolioEvent::AlertRearmed { alert_id, arming: alert.arming + 1, at }))
            }
        }
    }
}

impl Aggregate for Portfolio {
    const TYPE: &'static str = "Portfolio";
    type Command = PortfolioCommand;
    type Event = PortfolioEvent;
    type Error = PortfolioError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let Some(event) = self.decide(command)? else { return Ok(()) };
        // Applied in place (no copy of what may be thousands of lots): a refusal by the invariants leaves `self`
        // and the sink holding the refused decision, which the caller drops (the command service decides on a
        // copy of its cached state and keeps it only on success).
        let (deficit_before, in_deficit_before) = (self.deficit(), self.deficit_since.is_some());
        sink.write(event.clone(), self).await;
        if let Some(marker) = deficit_transition(deficit_before, in_deficit_before, self.deficit(), &event) {
            sink.write(marker, self).await;
        }
        self.check_invariants()
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            PortfolioEvent::PortfolioOpened { portfolio_id, owner, base_currency, cost_basis_method, opened_at } => {
                self.terms = Some(PortfolioTerms { portfolio_id, owner, base_currency, cost_basis_method, opened_at });
            }
            PortfolioEvent::CashDeposited { cash_after, .. } | PortfolioEvent::CashWithdrawn { cash_after, .. } => {
                self.cash = cash_after;
            }
            PortfolioEvent::FundsReserved {
                order_id, symbol, quantity, price, amount, reserved_cash_after, ..
            } => {
                self.reserved_cash = reserved_cash_after;
                self.reservations.insert(
                    order_id,
                    Reservation {
                        symbol,
                        side: Side::Buy,
                        open_quantity: quantity.value(),
                        cash: amount.value(),
                        price: Some(price),
                        applied_exec_ids: Default::default(),
                    },
                );
            }
            PortfolioEvent::QuantityReserved { order_id, symbol, quantity, reserved_quantity_after, .. } => {
                self.positions.entry(symbol.clone()).or_default().reserved_quantity = reserved_quantity_after;
                self.reservations.insert(
                    order_id,
                    Reservation {
                        symbol,
                        side: Side::Sell,
                        open_quantity: quantity.value(),
                        cash: Decimal::ZERO,
                        price: None,
                        applied_exec_ids: Default::default(),
                    },
                );
            }
            PortfolioEvent::ReservationReleased { order_id, symbol, cash_released, quantity_released, .. } => {
                self.reservations.remove(&order_id);
                self.reserved_cash -= cash_released;
                if let Some(position) = self.positions.get_mut(&symbol) {
                    position.reserved_quantity -= quantity_released;
                }
            }
            PortfolioEvent::ExecutionApplied {
                order_id,
                exec_id,
                symbol,
                quantity,
                cash_after,
                reserved_cash_released,
                reserved_quantity_released,
                lot_opened,
                lots_consumed,
                realized_pnl,
                position_quantity_after,
                position_cost_basis_after,
                ..
            } => {
                self.cash = cash_after;
                self.reserved_cash -= reserved_cash_released;
                self.realized_pnl += realized_pnl;
                let position = self.positions.entry(symbol).or_default();
                position.quantity = position_quantity_after;
                position.cost_basis = position_cost_basis_after;
                position.reserved_quantity -= reserved_quantity_released;
                position.realized_pnl += realized_pnl;
                if let Some(lot) = lot_opened {
                    position.lots.push_back(lot);
                }
                apply_consumption(&mut position.lots, &lots_consumed);
                if let Some(reservation) = self.reservations.get_mut(&order_id) {
                    reservation.open_quantity -= quantity.value();
                    reservation.cash -= reserved_cash_released;
                    reservation.applied_exec_ids.insert(exec_id);
                    if reservation.open_quantity.is_zero() {
                        // Fully filled: whatever was reserved beyond the actual cost went back with this fill.
                        self.reservations.remove(&order_id);
                    }
                }
            }
            PortfolioEvent::ReservationAdjusted {
                order_id,
                symbol,
                quantity_delta,
                cash_delta,
                price,
                reserved_quantity_after,
                ..
            } => {
                self.reserved_cash += cash_delta;
                if let Some(reservation) = self.reservations.get_mut(&order_id) {
                    reservation.open_quantity += quantity_delta;
                    reservation.cash += cash_delta;
                    reservation.price = price;
                    if reservation.side == Side::Sell {
                        self.positions.entry(symbol).or_default().reserved_quantity = reserved_quantity_after;
                    }
                }
            }
            PortfolioEvent::DeficitIncurred { at, .. } => {
                self.deficit_since.get_or_insert(at);
            }
            PortfolioEvent::DeficitCovered { .. } => {
                self.deficit_since = None;
            }
            PortfolioEvent::AlertCreated { alert_id, condition, .. } => {
                self.alerts.insert(alert_id, AlertRule { condition, arming: 1, canceled: false });
            }
            PortfolioEvent::AlertCanceled { alert_id, .. } => {
                if let Some(alert) = self.alerts.get_mut(&alert_id) {
                    alert.canceled = true;
                }
            }
            PortfolioEvent::AlertRearmed { alert_id, arming, .. } => {
                if let Some(alert) = self.alerts.get_mut(&alert_id) {
                    alert.arming = arming;
                }
            }
        }
    }
}

/// Up to 8 decimals, rounding up (what a reservation sets aside is never short by a rounding).
fn round_up(value: Decimal) -> Decimal {
    value.round_dp_with_strategy(8, rust_decimal::RoundingStrategy::AwayFromZero)
}

/// The deficit marker an event calls for, from the states before and after it: `DeficitIncurred` when a fill
/// leaves buying power negative (or more negative), `DeficitCovered` when buying power is back at zero or above.
fn deficit_transition(
    deficit_before: Decimal,
    in_deficit_before: bool,
    deficit_after: Decimal,
    event: &PortfolioEvent,
) -> Option<PortfolioEvent> {
    match event {
        PortfolioEvent::ExecutionApplied { order_id, exec_id, symbol, executed_at, .. }
            if deficit_after > deficit_before =>
        {
            Some(PortfolioEvent::DeficitIncurred {
                order_id: *order_id,
                exec_id: exec_id.clone(),
                symbol: symbol.clone(),
                increase: deficit_after - deficit_before,
                deficit: deficit_after,
                at: *executed_at,
            })
        }
        _ if in_deficit_before && deficit_after.is_zero() => {
            Some(PortfolioEvent::DeficitCovered { covered: deficit_before, at: event_time(event) })
        }
        _ => None,
    }
}

/// When an event happened, as it records it.
fn event_time(event: &PortfolioEvent) -> DateTime<Utc> {
    match event {
        PortfolioEvent::PortfolioOpened { opened_at: at, .. }
        | PortfolioEvent::ExecutionApplied { executed_at: at, .. }
        | PortfolioEvent::CashDeposited { at, .. }
        | PortfolioEvent::CashWithdrawn { at, .. }
        | PortfolioEvent::FundsReserved { at, .. }
        | PortfolioEvent::QuantityReserved { at, .. }
        | PortfolioEvent::ReservationAdjusted { at, .. }
        | PortfolioEvent::ReservationReleased { at, .. }
        | PortfolioEvent::DeficitIncurred { at, .. }
        | PortfolioEvent::DeficitCovered { at, .. }
        | PortfolioEvent::AlertCreated { at, .. }
        | PortfolioEvent::AlertCanceled { at, .. }
        | PortfolioEvent::AlertRearmed { at, .. } => *at,
    }
}
