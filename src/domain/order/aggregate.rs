//! Order state (`apply`) and rules (`handle`).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use super::{
    OrderCommand, OrderError, OrderEvent, OrderStatus, OrderType, PlaceOrder, RecordExecution, Side, TimeInForce,
};
use crate::domain::values::{ClientOrderId, ExecId, OrderId, PortfolioId, Price, Quantity, Symbol, TickSize};

/// Decimal places kept for the average fill price.
pub const AVERAGE_PRICE_SCALE: u32 = 8;

/// What the Order aggregate needs to know about instruments: their tick sizes. A plain value, no I/O.
#[derive(Debug, Clone)]
pub struct OrderServices {
    pub default_tick: TickSize,
    pub ticks: BTreeMap<Symbol, TickSize>,
}

impl Default for OrderServices {
    fn default() -> Self {
        Self { default_tick: TickSize::CENT, ticks: BTreeMap::new() }
    }
}

impl OrderServices {
    pub fn tick_size(&self, symbol: &Symbol) -> TickSize {
        self.ticks.get(symbol).copied().unwrap_or(self.default_tick)
    }
}

/// The facts fixed when the order was placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderTerms {
    pub order_id: OrderId,
    pub portfolio_id: PortfolioId,
    pub client_order_id: ClientOrderId,
    pub symbol: Symbol,
    pub side: Side,
    pub order_type: OrderType,
    pub quantity: Decimal,
    pub time_in_force: TimeInForce,
    pub placed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub terms: Option<OrderTerms>,
    pub status: OrderStatus,
    pub cum_quantity: Decimal,
    pub leaves_quantity: Decimal,
    /// Σ fill quantity × fill price, for the average price.
    pub filled_notional: Decimal,
    pub fees: Decimal,
    pub protection_price: Option<Price>,
    pub exec_ids: BTreeSet<ExecId>,
    pub reject_reason: Option<super::OrderRejectReason>,
    pub updated_at: Option<DateTime<Utc>>,
    /// When a stop order was triggered, and at which price.
    #[serde(default)]
    pub triggered: Option<(DateTime<Utc>, Price)>,
    /// The amendment pending, if one is.
    #[serde(default)]
    pub pending_amend: Option<PendingAmend>,
    /// Amendments requested so far (the last request's number).
    #[serde(default)]
    pub amend_requests: u32,
    /// Amendments that took effect (the terms' version).
    #[serde(default)]
    pub amendments: u32,
}

/// An amendment requested and not decided yet: its number and the terms it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PendingAmend {
    pub request: u32,
    pub quantity: Decimal,
    pub order_type: OrderType,
}

impl Order {
    pub fn average_price(&self) -> Option<Decimal> {
        (!self.cum_quantity.is_zero()).then(|| {
            (self.filled_notional / self.cum_quantity)
                .round_dp_with_strategy(AVERAGE_PRICE_SCALE, RoundingStrategy::MidpointNearestEven)
                .normalize()
        })
    }

    fn live_terms(&self) -> Result<&OrderTerms, OrderError> {
        let terms = self.terms.as_ref().ok_or(OrderError::NotFound)?;
        if self.status.is_terminal() {
            return Err(OrderError::Terminal { status: self.status });
        }
        Ok(terms)
    }

    /// The invariants every state must satisfy. Cheap; runs after every event in `handle`, also in release.
    pub fn check_invariants(&self) -> Result<(), OrderError> {
        let Some(terms) = &self.terms else { return Ok(()) };
        let violated = |what: &str| Err(OrderError::InvariantViolated(what.to_string()));
        if self.cum_quantity + self.leaves_quantity != terms.quantity
            && !matches!(self.status, OrderStatus::Canceled | OrderStatus::Expired | OrderStatus::Rejected)
        {
            return violated("cum + leaves != order quantity");
        }
        if self.cum_quantity > terms.quantity || self.leaves_quantity.is_sign_negative() {
            return violated("filled more than the order quantity");
        }
        if self.status == OrderStatus::Filled && !self.leaves_quantity.is_zero() {
            return violated("filled order with open quantity");
        }
        Ok(())
    }

    fn check_fill_price(&self, terms: &OrderTerms, price: Price) -> Result<(), OrderError> {
        let beyond = |bound: Price| match terms.side {
            Side::Buy => price > bound,
            Side::Sell => price < bound,
        };
        if let Some(limit) = terms.order_type.limit_price() {
            if beyond(limit) {
                return Err(OrderError::LimitBreached { price: price.value(), limit: limit.value() });
            }
        }
        if let Some(protection) = self.protection_price {
            if beyond(protection) {
                return Err(OrderError::ProtectionBreached { price: price.value(), protection: protection.value() });
            }
        }
        Ok(())
    }

    fn place(&self, cmd: PlaceOrder, services: &OrderServices) -> Result<OrderEvent, OrderError> {
        if self.terms.is_some() {
            return Err(OrderError::AlreadyExists);
        }
        let tick = services.tick_size(&cmd.symbol);
        for price in [cmd.order_type.limit_price(), cmd.order_type.stop_price()].into_iter().flatten() {
            if !price.is_on_tick(tick) {
                return Err(OrderError::PriceOffTick { price: price.value(), tick });
            }
        }
        Ok(OrderEvent::OrderPlaced {
            order_id: cmd.order_id,
            portfolio_id: cmd.portfolio_id,
            client_order_id: cmd.client_order_id,
            symbol: cmd.symbol,
            side: cmd.side,
            order_type: cmd.order_type,
            quantity: cmd.quantity,
            time_in_force: cmd.time_in_force,
            placed_at: cmd.placed_at,
        })
    }

    fn execute(&self, cmd: RecordExecution) -> Result<OrderEvent, OrderError> {
        let terms = self.live_terms()?;
        if self.status == OrderStatus::PendingNew {
            return Err(OrderError::NotAccepted);
        }
        if self.exec_ids.contains(&cmd.exec_id) {
            return Err(OrderError::DuplicateExecId(cmd.exec_id));
        }
        let quantity = cmd.quantity.value();
        if quantity > self.leaves_quantity {
            return Err(OrderError::Overfill { quantity, leaves: self.leaves_quantity });
        }
        if terms.time_in_force == TimeInForce::Fok && quantity != terms.quantity {
            return Err(OrderError::FillOrKillPartial { quantity, order_quantity: terms.quantity });
        }
        self.check_fill_price(terms, cmd.price)?;
        let cum_quantity = self.cum_quantity + quantity;
        let leaves_quantity = terms.quantity - cum_quantity;
        let average_price = ((self.filled_notional + quantity * cmd.price.value()) / cum_quantity)
            .round_dp_with_strategy(AVERAGE_PRICE_SCALE, RoundingStrategy::MidpointNearestEven)
            .normalize();
        let status = if leaves_quantity.is_zero() { OrderStatus::Filled } else { OrderStatus::PartiallyFilled };
        Ok(OrderEvent::ExecutionRecorded {
            portfolio_id: terms.portfolio_id,
            symbol: terms.symbol.clone(),
            side: terms.side,
            exec_id: cmd.exec_id,
            quantity: cmd.quantity,
            price: cmd.price,
            fee: cmd.fee,
            executed_at: cmd.executed_at,
            cum_quantity,
            leaves_quantity,
            average_price,
            status,
        })
    }

    /// A stop order accepted and not triggered yet.
    fn awaits_trigger(&self, terms: &OrderTerms) -> bool {
        terms.order_type.stop_price().is_some() && self.triggered.is_none() && self.status != OrderStatus::PendingNew
    }

    fn trigger(
        &self,
        price: Price,
        tick: Option<super::TickRef>,
        triggered_at: DateTime<Utc>,
    ) -> Result<OrderEvent, OrderError> {
        let terms = self.live_terms()?;
        let Some(stop) = terms.order_type.stop_price() else { return Err(OrderError::NotAStopOrder) };
        if self.status == OrderStatus::PendingNew {
            return Err(OrderError::NotAccepted);
        }
        if self.triggered.is_some() {
            return Err(OrderError::AlreadyTriggered);
        }
        if !terms.order_type.triggered_by(terms.side, price) {
            return Err(OrderError::StopNotReached { price: price.value(), stop: stop.value() });
        }
        Ok(OrderEvent::OrderTriggered { portfolio_id: terms.portfolio_id, trigger_price: price, tick, triggered_at })
    }

    fn amend(
        &self,
        quantity: Option<Quantity>,
        limit_price: Option<Price>,
        stop_price: Option<Price>,
        requested_at: DateTime<Utc>,
        services: &OrderServices,
    ) -> Result<OrderEvent, OrderError> {
        let terms = self.live_terms()?;
        if self.status == OrderStatus::PendingNew {
            return Err(OrderError::NotAccepted);
        }
        if self.pending_amend.is_some() {
            return Err(OrderError::AmendPending);
        }
        let not_applicable = |what| OrderError::AmendNotApplicable { order_type: terms.order_type.as_str(), what };
        if limit_price.is_some() && terms.order_type.limit_price().is_none() {
            return Err(not_applicable("limit price"));
        }
        if stop_price.is_some() && terms.order_type.stop_price().is_none() {
            return Err(not_applicable("stop price"));
        }
        if stop_price.is_some() && self.triggered.is_some() {
            return Err(not_applicable("stop price once triggered"));
        }
        let order_type = match terms.order_type {
            OrderType::Market => OrderType::Market,
            OrderType::Limit { limit_price: current } => {
                OrderType::Limit { limit_price: limit_price.unwrap_or(current) }
            }
            OrderType::Stop { stop_price: current } => OrderType::Stop { stop_price: stop_price.unwrap_or(current) },
            OrderType::StopLimit { stop_price: stop, limit_price: limit } => OrderType::StopLimit {
                stop_price: stop_price.unwrap_or(stop),
                limit_price: limit_price.unwrap_or(limit),
            },
        };
        let tick = services.tick_size(&terms.symbol);
        for price in [limit_price, stop_price].into_iter().flatten() {
            if !price.is_on_tick(tick) {
                return Err(OrderError::PriceOffTick { price: price.value(), tick });
            }
        }
        let new_quantity = quantity.map_or(terms.quantity, |q| q.value());
        if new_quantity == terms.quantity && order_type == terms.order_type {
            return Err(OrderError::AmendUnchanged);
        }
        if new_quantity <= self.cum_quantity {
            return Err(OrderError::AmendBelowFilled { quantity: new_quantity, filled: self.cum_quantity });
        }
        Ok(OrderEvent::OrderAmendRequested {
            portfolio_id: terms.portfolio_id,
            request: self.amend_requests + 1,
            symbol: terms.symbol.clone(),
            side: terms.side,
            quantity: Quantity::new(new_quantity).map_err(|e| OrderError::InvariantViolated(e.to_string()))?,
            order_type,
            previous_quantity: terms.quantity,
            previous_order_type: terms.order_type,
            previous_protection_price: self.protection_price,
            requested_at,
        })
    }

    /// The pending amendment numbered `request` (refused if another one, or none, is pending).
    fn pending(&self, request: u32) -> Result<PendingAmend, OrderError> {
        self.pending_amend.filter(|pending| pending.request == request).ok_or(OrderError::NoAmendPending)
    }

    fn confirm_amend(
        &self,
        request: u32,
        protection_price: Option<Price>,
        confirmed_at: DateTime<Utc>,
    ) -> Result<OrderEvent, OrderError> {
        let terms = self.live_terms()?;
        let PendingAmend { quantity, order_type, .. } = self.pending(request)?;
        // Fills under the old terms may have come in since the request, and a trigger may have too.
        if quantity <= self.cum_quantity {
            return Err(OrderError::AmendBelowFilled { quantity, filled: self.cum_quantity });
        }
        if self.triggered.is_some() && order_type.stop_price() != terms.order_type.stop_price() {
            let what = "stop price once triggered";
            return Err(OrderError::AmendNotApplicable { order_type: terms.order_type.as_str(), what });
        }
        Ok(OrderEvent::OrderAmended {
            portfolio_id: terms.portfolio_id,
            request,
            side: terms.side,
            quantity: Quantity::new(quantity).map_err(|e| OrderError::InvariantViolated(e.to_string()))?,
            order_type,
            protection_price: if order_type.is_protected() { protection_price.or(self.protection_price) } else { None },
            leaves_quantity: quantity - self.cum_quantity,
            previous_quantity: terms.quantity,
            previous_order_type: terms.order_type,
            previous_protection_price: self.protection_price,
            version: self.amendments + 1,
            amended_at: confirmed_at,
        })
    }

    /// The events a command makes: one, or for an execution on a stop order not triggered yet (a broker
    /// triggered it in its own book) the trigger at the fill's price and then the execution.
    fn decide(&self, command: OrderCommand, services: &OrderServices) -> Result<Vec<OrderEvent>, OrderError> {
        if let OrderCommand::RecordExecution(cmd) = &command {
            if self.terms.as_ref().is_some_and(|terms| self.awaits_trigger(terms)) && !self.status.is_terminal() {
                let triggered = OrderEvent::OrderTriggered {
                    portfolio_id: self.live_terms()?.portfolio_id,
                    trigger_price: cmd.price,
                    tick: None,
                    triggered_at: cmd.executed_at,
                };
                let mut after = self.clone();
                after.apply(triggered.clone());
                return Ok(vec![triggered, after.decide_one(command, services)?]);
            }
        }
        Ok(vec![self.decide_one(command, services)?])
    }

    fn decide_one(&self, command: OrderCommand, services: &OrderServices) -> Result<OrderEvent, OrderError> {
        match command {
            OrderCommand::PlaceOrder(cmd) => self.place(cmd, services),
            OrderCommand::AcceptOrder { protection_price, accepted_at } => {
                let terms = self.live_terms()?;
                if self.status != OrderStatus::PendingNew {
                    return Err(OrderError::AlreadyAccepted);
                }
                // A limit (or stop-limit) order is protected by its limit; only market and stop orders carry a
                // protection price.
                let protection_price = protection_price.filter(|_| terms.order_type.is_protected());
                Ok(OrderEvent::OrderAccepted { protection_price, accepted_at })
            }
            OrderCommand::RejectOrder { reason, rejected_at } => {
                self.live_terms()?;
                if self.status != OrderStatus::PendingNew {
                    return Err(OrderError::AlreadyAccepted);
                }
                Ok(OrderEvent::OrderRejected { reason, rejected_at })
            }
            OrderCommand::TriggerOrder { price, tick, triggered_at } => self.trigger(price, tick, triggered_at),
            OrderCommand::AmendOrder { quantity, limit_price, stop_price, requested_at } => {
                self.amend(quantity, limit_price, stop_price, requested_at, services)
            }
            OrderCommand::ConfirmAmend { request, protection_price, confirmed_at } => {
                self.confirm_amend(request, protection_price, confirmed_at)
            }
            OrderCommand::RejectAmend { request, reason, rejected_at } => {
                // Also once the order is done: a pending request is closed either way.
                let terms = self.terms.as_ref().ok_or(OrderError::NotFound)?;
                self.pending(request)?;
                let portfolio_id = terms.portfolio_id;
                Ok(OrderEvent::OrderAmendRejected { portfolio_id, request, reason: reason.into(), rejected_at })
            }
            OrderCommand::RecordExecution(cmd) => self.execute(cmd),
            OrderCommand::CancelOrder { reason, canceled_at } => {
                let portfolio_id = self.live_terms()?.portfolio_id;
                Ok(OrderEvent::OrderCanceled {
                    portfolio_id,
                    canceled_quantity: self.leaves_quantity,
                    reason: reason.into(),
                    canceled_at,
                })
            }
            OrderCommand::ExpireOrder { expired_at } => {
                let portfolio_id = self.live_terms()?.portfolio_id;
                Ok(OrderEvent::OrderExpired { portfolio_id, expired_quantity: self.leaves_quantity, expired_at })
            }
        }
    }
}

impl Aggregate for Order {
    const TYPE: &'static str = "Order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;
    type Services = OrderServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let events = self.decide(command, services)?;
        let mut next = self.clone();
        for event in &events {
            next.apply(event.clone());
            next.check_invariants()?;
        }
        for event in events {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            OrderEvent::OrderPlaced {
                order_id,
                portfolio_id,
                client_order_id,
                symbol,
                side,
                order_type,
                quantity,
                time_in_force,
                placed_at,
            } => {
                self.terms = Some(OrderTerms {
                    order_id,
                    portfolio_id,
                    client_order_id,
                    symbol,
                    side,
                    order_type,
                    quantity: quantity.value(),
                    time_in_force,
                    placed_at,
                });
                self.status = OrderStatus::PendingNew;
                self.leaves_quantity = quantity.value();
                self.updated_at = Some(placed_at);
            }
            OrderEvent::OrderAccepted { protection_price, accepted_at } => {
                self.status = OrderStatus::New;
                self.protection_price = protection_price;
                self.updated_at = Some(accepted_at);
            }
            OrderEvent::OrderRejected { reason, rejected_at } => {
                self.status = OrderStatus::Rejected;
                self.reject_reason = Some(reason);
                self.leaves_quantity = Decimal::ZERO;
                self.updated_at = Some(rejected_at);
            }
            OrderEvent::OrderAmendRequested { request, quantity, order_type, requested_at, .. } => {
                self.pending_amend = Some(PendingAmend { request, quantity: quantity.value(), order_type });
                self.amend_requests = request;
                self.updated_at = Some(requested_at);
            }
            OrderEvent::OrderAmended {
                quantity,
                order_type,
                protection_price,
                leaves_quantity,
                version,
                amended_at,
                ..
            } => {
                if let Some(terms) = self.terms.as_mut() {
                    terms.quantity = quantity.value();
                    terms.order_type = order_type;
                }
                self.protection_price = protection_price;
                self.leaves_quantity = leaves_quantity;
                self.pending_amend = None;
                self.amendments = version;
                self.updated_at = Some(amended_at);
            }
            OrderEvent::OrderAmendRejected { rejected_at, .. } => {
                self.pending_amend = None;
                self.updated_at = Some(rejected_at);
            }
            OrderEvent::OrderTriggered { trigger_price, triggered_at, .. } => {
                self.triggered = Some((triggered_at, trigger_price));
                self.updated_at = Some(triggered_at);
            }
            OrderEvent::ExecutionRecorded {
                exec_id,
                quantity,
                price,
                fee,
                executed_at,
                cum_quantity,
                leaves_quantity,
                status,
                ..
            } => {
                self.exec_ids.insert(exec_id);
                self.filled_notional += quantity.value() * price.value();
                self.fees += fee.value();
                self.cum_quantity = cum_quantity;
                self.leaves_quantity = leaves_quantity;
                self.status = status;
                self.updated_at = Some(executed_at);
            }
            OrderEvent::OrderCanceled { canceled_at, .. } => {
                self.status = OrderStatus::Canceled;
                self.leaves_quantity = Decimal::ZERO;
                self.updated_at = Some(canceled_at);
            }
            OrderEvent::OrderExpired { expired_at, .. } => {
                self.status = OrderStatus::Expired;
                self.leaves_quantity = Decimal::ZERO;
                self.updated_at = Some(expired_at);
            }
        }
    }
}
