//! The Order aggregate: one client order and its life cycle, aligned with FIX.
//!
//! States follow FIX OrdStatus. An order starts `PendingNew` when placed; the process manager reserves what it
//! needs on the portfolio and then accepts it (`New`) or rejects it. A stop or stop-limit order then waits for
//! its trigger (`OrderTriggered`, with the tick that caused it) before it can fill. An open order may be amended
//! (quantity, limit or stop price: `OrderAmendRequested`, then `OrderAmended` once the process manager has
//! adjusted the reservation, or `OrderAmendRejected`); each amendment is a new version of its terms. Fills move it through `PartiallyFilled` to
//! `Filled`; `Canceled`, `Rejected`, `Expired` and `Filled` are terminal and accept no command.
//!
//! Invariants, checked before every event is written and again after it is applied:
//! `cum + leaves = quantity`; a fill never exceeds leaves; an exec id is recorded once per order; a limit buy
//! never fills above its limit (a sell never below); a market order never fills beyond its protection price.

mod aggregate;
mod commands;
mod events;

pub use aggregate::{Order, OrderServices, PendingAmend};
pub use commands::{OrderCommand, PlaceOrder, RecordExecution, TickRef};
pub use events::{OrderEvent, ORDER_EVENT_VERSION};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::domain::values::{ExecId, Price, TickSize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    Buy,
    Sell,
}

impl Side {
    /// The name read models store (stable: a rename here would need a migration of their rows).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Buy => "Buy",
            Self::Sell => "Sell",
        }
    }
}

/// FIX OrdType 1 (market), 2 (limit), 3 (stop) and 4 (stop limit). A stop order works only once triggered: by
/// a price at or beyond its stop (a buy's at or above, a sell's at or below); then a stop order is a market order
/// and a stop-limit order a limit order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum OrderType {
    Market,
    Limit { limit_price: Price },
    Stop { stop_price: Price },
    StopLimit { stop_price: Price, limit_price: Price },
}

impl OrderType {
    pub fn limit_price(&self) -> Option<Price> {
        match self {
            Self::Market | Self::Stop { .. } => None,
            Self::Limit { limit_price } | Self::StopLimit { limit_price, .. } => Some(*limit_price),
        }
    }

    pub fn stop_price(&self) -> Option<Price> {
        match self {
            Self::Market | Self::Limit { .. } => None,
            Self::Stop { stop_price } | Self::StopLimit { stop_price, .. } => Some(*stop_price),
        }
    }

    /// Whether fills are bounded by a protection price (no limit of its own): market and stop orders.
    pub fn is_protected(&self) -> bool {
        self.limit_price().is_none()
    }

    /// The name read models store (stable: a rename here would need a migration of their rows).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Market => "Market",
            Self::Limit { .. } => "Limit",
            Self::Stop { .. } => "Stop",
            Self::StopLimit { .. } => "StopLimit",
        }
    }

    /// Whether a price triggers a stop order on `side` with this type (false for other types).
    pub fn triggered_by(&self, side: Side, price: Price) -> bool {
        match (self.stop_price(), side) {
            (Some(stop), Side::Buy) => price >= stop,
            (Some(stop), Side::Sell) => price <= stop,
            (None, _) => false,
        }
    }
}

/// FIX TimeInForce: Day (expires at the session's end), GTC, IOC (fill what you can now, cancel the rest),
/// FOK (fill everything at once or nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TimeInForce {
    Day,
    Gtc,
    Ioc,
    Fok,
}

impl TimeInForce {
    /// The name read models store (stable: a rename here would need a migration of their rows).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "Day",
            Self::Gtc => "Gtc",
            Self::Ioc => "Ioc",
            Self::Fok => "Fok",
        }
    }
}

/// FIX OrdStatus, with PendingNew for the interval between placement and the portfolio's reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum OrderStatus {
    #[default]
    PendingNew,
    New,
    PartiallyFilled,
    Filled,
    Canceled,
    Rejected,
    Expired,
}

impl OrderStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Filled | Self::Canceled | Self::Rejected | Self::Expired)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PendingNew => "PendingNew",
            Self::New => "New",
            Self::PartiallyFilled => "PartiallyFilled",
            Self::Filled => "Filled",
            Self::Canceled => "Canceled",
            Self::Rejected => "Rejected",
            Self::Expired => "Expired",
        }
    }
}

impl std::fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an order was rejected: a stable code for programs and a sentence for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectCode {
    InsufficientFunds,
    InsufficientQuantity,
    NoMarketPrice,
    UnknownPortfolio,
    PortfolioRejected,
    /// The portfolio was in deficit: no new buys until it is covered.
    PortfolioInDeficit,
}

impl RejectCode {
    /// The stable name clients see, spelled like the API's error codes (`INSUFFICIENT_FUNDS` whether a
    /// withdrawal was refused or an order rejected).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InsufficientFunds => "INSUFFICIENT_FUNDS",
            Self::InsufficientQuantity => "INSUFFICIENT_QUANTITY",
            Self::NoMarketPrice => "NO_MARKET_PRICE",
            Self::UnknownPortfolio => "PORTFOLIO_NOT_FOUND",
            Self::PortfolioRejected => "PORTFOLIO_REJECTED",
            Self::PortfolioInDeficit => "PORTFOLIO_IN_DEFICIT",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRejectReason {
    pub code: RejectCode,
    pub detail: String,
}

/// Every way a command on an order can be refused. Compared as values in tests, never as strings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("the order already exists")]
    AlreadyExists,
    #[error("no such order")]
    NotFound,
    #[error("the order is {status} and accepts no further commands")]
    Terminal { status: OrderStatus },
    #[error("the order is not accepted yet")]
    NotAccepted,
    #[error("the order was already accepted")]
    AlreadyAccepted,
    #[error("execution {0} was already recorded for this order")]
    DuplicateExecId(ExecId),
    #[error("a fill of {quantity} exceeds the open quantity {leaves}")]
    Overfill { quantity: Decimal, leaves: Decimal },
    #[error("fill price {price} is beyond the limit price {limit}")]
    LimitBreached { price: Decimal, limit: Decimal },
    #[error("fill price {price} is beyond the protection price {protection} the reservation was made at")]
    ProtectionBreached { price: Decimal, protection: Decimal },
    #[error("limit price {price} is not a multiple of the tick size {tick}")]
    PriceOffTick { price: Decimal, tick: TickSize },
    #[error("the order is not a stop order")]
    NotAStopOrder,
    #[error("the stop order was already triggered")]
    AlreadyTriggered,
    #[error("price {price} does not reach the stop price {stop}")]
    StopNotReached { price: Decimal, stop: Decimal },
    #[error("an amendment of this order is still pending")]
    AmendPending,
    #[error("no amendment of this order is pending")]
    NoAmendPending,
    #[error("the amendment changes nothing")]
    AmendUnchanged,
    #[error("a {order_type} order has no {what} to amend")]
    AmendNotApplicable { order_type: &'static str, what: &'static str },
    #[error("quantity {quantity} is not above the {filled} already filled: cancel the order instead")]
    AmendBelowFilled { quantity: Decimal, filled: Decimal },
    #[error("a fill-or-kill order must fill {order_quantity} at once, not {quantity}")]
    FillOrKillPartial { quantity: Decimal, order_quantity: Decimal },
    #[error("internal invariant violated: {0}")]
    InvariantViolated(String),
}

impl OrderError {
    /// Stable machine-readable code (GraphQL `extensions.code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::AlreadyExists => "ORDER_EXISTS",
            Self::NotFound => "ORDER_NOT_FOUND",
            Self::Terminal { .. } => "ORDER_TERMINAL",
            Self::NotAccepted => "ORDER_NOT_ACCEPTED",
            Self::AlreadyAccepted => "ORDER_ALREADY_ACCEPTED",
            Self::DuplicateExecId(_) => "DUPLICATE_EXEC_ID",
            Self::Overfill { .. } => "OVERFILL",
            Self::LimitBreached { .. } => "LIMIT_PRICE_BREACHED",
            Self::ProtectionBreached { .. } => "PROTECTION_PRICE_BREACHED",
            Self::PriceOffTick { .. } => "PRICE_OFF_TICK",
            Self::NotAStopOrder => "ORDER_NOT_STOP",
            Self::AlreadyTriggered => "ORDER_ALREADY_TRIGGERED",
            Self::StopNotReached { .. } => "STOP_NOT_REACHED",
            Self::AmendPending => "AMEND_PENDING",
            Self::NoAmendPending => "NO_AMEND_PENDING",
            Self::AmendUnchanged => "AMEND_UNCHANGED",
            Self::AmendNotApplicable { .. } => "AMEND_NOT_APPLICABLE",
            Self::AmendBelowFilled { .. } => "AMEND_BELOW_FILLED",
            Self::FillOrKillPartial { .. } => "FOK_PARTIAL_FILL",
            Self::InvariantViolated(_) => "INVARIANT_VIOLATED",
        }
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
