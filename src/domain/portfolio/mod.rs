//! The Portfolio aggregate: cash, reservations for open orders, positions with their lots, realized P&L.
//!
//! Invariants, checked after every event in `handle` (before it is written) and testable on any state:
//! reserved cash ≥ 0 and it equals the sum of the open buy reservations; per position, 0 ≤ reserved quantity ≤
//! quantity, the reserved quantity equals the open sell reservations on the symbol, Σ lot quantities =
//! quantity, and a flat position has no cost basis.
//!
//! # Fills are facts
//! An execution the order accepted has happened at the venue: `ApplyExecution` books it whatever it costs.
//! Every other use of cash (a withdrawal, a buy reservation) must fit in the buying power (cash − reserved), so
//! only a fill can take buying power — and cash — below zero: a fee above the reservation's allowance while the
//! rest of the cash is committed, or a sell whose fee exceeds its proceeds. The portfolio is then *in deficit*
//! (`DeficitIncurred` follows the fill's `ExecutionApplied`), refuses withdrawals and new buys
//! (`PORTFOLIO_IN_DEFICIT`) and accepts deposits, sells and cancels until buying power is back at zero or
//! above (`DeficitCovered`). A sell can never fill beyond the position: its units were reserved from the free
//! quantity when it was accepted and only its own fills consume that reservation.
//!
//! Orders do not touch portfolios directly: the process manager turns order events into the reservation and
//! execution commands below, each under an idempotency key, so a replay after a crash changes nothing twice.

mod accounting;
mod aggregate;
pub mod alerts;
mod commands;
mod events;

pub use aggregate::{external_order_id, Portfolio};
pub use alerts::{AlertCondition, AlertRule, ALERTS_PER_PORTFOLIO_MAX};
pub use commands::PortfolioCommand;
pub use events::{LotConsumed, PortfolioEvent, ReleaseReason, PORTFOLIO_EVENT_VERSION};

use std::collections::{BTreeSet, VecDeque};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::domain::order::Side;
use crate::domain::values::{AlertId, ExecId, OrderId, Symbol};

/// How the cost of units sold is measured: first-in-first-out lots, or the running average cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum CostBasisMethod {
    #[default]
    Fifo,
    AverageCost,
}

impl CostBasisMethod {
    /// The name read models store (stable: a rename here would need a migration of their rows).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fifo => "Fifo",
            Self::AverageCost => "AverageCost",
        }
    }
}

/// Units bought by one fill, at their full cost (price × quantity + fee).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lot {
    pub lot_id: String,
    pub quantity: Decimal,
    pub cost: Decimal,
    pub acquired_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Position {
    pub quantity: Decimal,
    /// Units promised to open sell orders.
    pub reserved_quantity: Decimal,
    /// Cost of the units held under the portfolio's method (equals Σ lot cost under FIFO).
    pub cost_basis: Decimal,
    /// Open lots, oldest first.
    pub lots: VecDeque<Lot>,
    pub realized_pnl: Decimal,
}

impl Position {
    /// Σ lot costs: the FIFO cost basis, whatever the portfolio's method.
    pub fn fifo_cost_basis(&self) -> Decimal {
        self.lots.iter().map(|l| l.cost).sum()
    }

    pub fn free_quantity(&self) -> Decimal {
        self.quantity - self.reserved_quantity
    }
}

/// What is set aside for one open order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    pub symbol: Symbol,
    pub side: Side,
    /// Order quantity not yet filled.
    pub open_quantity: Decimal,
    /// Cash still reserved (buys); zero for sells.
    pub cash: Decimal,
    /// The price a buy's reservation was computed at (its limit, or the last price plus the collar); `None` for
    /// sells and for reservations recorded before the price was kept.
    #[serde(default)]
    pub price: Option<crate::domain::values::Price>,
    /// Executions already applied for this order: a repeated one is ignored while the reservation is open.
    /// (Once it closes, a replayed fill is refused with `NoReservation`; replays of process-manager steps are
    /// answered by their idempotency keys before they reach the aggregate.)
    pub applied_exec_ids: BTreeSet<ExecId>,
}

/// Every way a command on a portfolio can be refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortfolioError {
    #[error("the portfolio already exists")]
    AlreadyExists,
    #[error("no such portfolio")]
    NotFound,
    #[error("insufficient funds: {requested} requested, {available} available")]
    InsufficientFunds { requested: Decimal, available: Decimal },
    #[error("the portfolio is in deficit by {deficit}: deposit (or sell) to cover it first")]
    InDeficit { deficit: Decimal },
    #[error("insufficient quantity of {symbol}: {requested} requested, {available} available")]
    InsufficientQuantity { symbol: Symbol, requested: Decimal, available: Decimal },
    #[error("order {0} already has a different reservation")]
    ReservationExists(OrderId),
    #[error("order {0} has nothing reserved on this portfolio")]
    NoReservation(OrderId),
    #[error("the execution does not match order {0}'s reservation (symbol or side differ)")]
    ReservationMismatch(OrderId),
    #[error("a fill of {quantity} exceeds the order's open quantity {open}")]
    ExceedsReservation { quantity: Decimal, open: Decimal },
    #[error("a trade of {symbol} dated {at} is older than the newest open lot ({newest}): lots are booked in order")]
    BeforeNewestLot { symbol: Symbol, at: DateTime<Utc>, newest: DateTime<Utc> },
    #[error("alert {0} already exists")]
    AlertExists(AlertId),
    #[error("no alert {0} on this portfolio")]
    AlertNotFound(AlertId),
    #[error("alert {0} was cancelled")]
    AlertCanceled(AlertId),
    #[error("a portfolio holds at most {ALERTS_PER_PORTFOLIO_MAX} live alerts")]
    TooManyAlerts,
    #[error("invalid alert: {0}")]
    InvalidAlert(String),
    #[error("internal invariant violated: {0}")]
    InvariantViolated(String),
}

impl PortfolioError {
    /// Stable machine-readable code (GraphQL `extensions.code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::AlreadyExists => "PORTFOLIO_EXISTS",
            Self::NotFound => "PORTFOLIO_NOT_FOUND",
            Self::InsufficientFunds { .. } => "INSUFFICIENT_FUNDS",
            Self::InDeficit { .. } => "PORTFOLIO_IN_DEFICIT",
            Self::InsufficientQuantity { .. } => "INSUFFICIENT_QUANTITY",
            Self::ReservationExists(_) => "RESERVATION_EXISTS",
            Self::NoReservation(_) => "NO_RESERVATION",
            Self::ReservationMismatch(_) => "RESERVATION_MISMATCH",
            Self::ExceedsReservation { .. } => "EXCEEDS_RESERVATION",
            Self::BeforeNewestLot { .. } => "TRADE_BEFORE_NEWEST_LOT",
            Self::AlertExists(_) => "ALERT_EXISTS",
            Self::AlertNotFound(_) => "ALERT_NOT_FOUND",
            Self::AlertCanceled(_) => "ALERT_CANCELED",
            Self::TooManyAlerts => "TOO_MANY_ALERTS",
            Self::InvalidAlert(_) => "INVALID_ALERT",
            Self::InvariantViolated(_) => "INVARIANT_VIOLATED",
        }
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
