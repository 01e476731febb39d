//! Events of the Portfolio aggregate. `ExecutionApplied` carries the accounting it performed — the lot it
//! opened or the lots it consumed, the cost basis removed and the realized P&L — so that projections copy
//! numbers instead of re-deriving them (and cannot disagree with the aggregate).

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{AlertCondition, CostBasisMethod, Lot};
use crate::domain::order::Side;
use crate::domain::values::{
    AlertId, Amount, Currency, ExecId, Money, OrderId, Owner, PortfolioId, Price, Quantity, Symbol,
};

/// Version of every Portfolio event's payload schema.
pub const PORTFOLIO_EVENT_VERSION: &str = "2";

/// The part of one lot a sell consumed, at its FIFO cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LotConsumed {
    pub lot_id: String,
    pub quantity: Decimal,
    pub cost: Decimal,
}

/// Why a reservation was given back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReleaseReason {
    /// The order was canceled.
    Canceled,
    /// The order expired (end of day, IOC/FOK remainder).
    Expired,
    /// The order was canceled while the reservation was being made, before it was accepted.
    CanceledBeforeAcceptance,
    /// Any other reason (only in events upcast from version 1 with a text this version does not know).
    Other,
}

// `ExecutionApplied` is much larger than the other variants; events are serialised right after they are
// created and never held in bulk, so boxing it would only cost an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, strum::IntoStaticStr)]
pub enum PortfolioEvent {
    PortfolioOpened {
        portfolio_id: PortfolioId,
        owner: Owner,
        base_currency: Currency,
        cost_basis_method: CostBasisMethod,
        opened_at: DateTime<Utc>,
    },
    CashDeposited {
        amount: Amount,
        reference: Option<String>,
        cash_after: Decimal,
        at: DateTime<Utc>,
    },
    CashWithdrawn {
        amount: Amount,
        reference: Option<String>,
        cash_after: Decimal,
        at: DateTime<Utc>,
    },
    FundsReserved {
        order_id: OrderId,
        symbol: Symbol,
        quantity: Quantity,
        /// The price the reservation was computed at (a market buy may not fill above it).
        price: Price,
        amount: Money,
        reserved_cash_after: Decimal,
        at: DateTime<Utc>,
    },
    QuantityReserved {
        order_id: OrderId,
        symbol: Symbol,
        quantity: Quantity,
        reserved_quantity_after: Decimal,
        at: DateTime<Utc>,
    },
    ReservationReleased {
        order_id: OrderId,
        symbol: Symbol,
        cash_released: Decimal,
        quantity_released: Decimal,
        /// Why (version 2; version 1 stored the process manager's trigger, e.g. `OrderCanceled`, as text: see
        /// `crate::domain::upcast`).
        reason: ReleaseReason,
        at: DateTime<Utc>,
    },
    /// An open order's reservation resized for an amendment: `quantity_delta` more (or fewer) units open,
    /// `cash_delta` more (or less) cash set aside (buys), at the reservation price `price` from now on.
    ReservationAdjusted {
        order_id: OrderId,
        symbol: Symbol,
        quantity_delta: Decimal,
        cash_delta: Decimal,
        price: Option<Price>,
        open_quantity_after: Decimal,
        reserved_cash_after: Decimal,
        reserved_quantity_after: Decimal,
        at: DateTime<Utc>,
    },
    ExecutionApplied {
        order_id: OrderId,
        exec_id: ExecId,
        symbol: Symbol,
        side: Side,
        quantity: Quantity,
        price: Price,
        fee: Money,
        /// quantity × price, rounded to 8 decimals.
        gross: Decimal,
        /// Signed change of cash: −(gross + fee) for a buy, gross − fee for a sell.
        cash_delta: Decimal,
        /// May be below the cash still reserved, even negative: a fill is booked whatever it costs (see
        /// `DeficitIncurred`).
        cash_after: Decimal,
        reserved_cash_released: Decimal,
        reserved_quantity_released: Decimal,
        /// The lot a buy opened (its cost includes the fee).
        lot_opened: Option<Lot>,
        /// The lots a sell consumed, oldest first, at their FIFO cost.
        lots_consumed: Vec<LotConsumed>,
        /// Cost basis removed from the position under the portfolio's method.
        cost_basis_removed: Decimal,
        /// Realized P&L of this fill under the portfolio's method (zero for buys).
        realized_pnl: Decimal,
        position_quantity_after: Decimal,
        position_cost_basis_after: Decimal,
        executed_at: DateTime<Utc>,
    },
    /// A fill left the portfolio short of cash: buying power (cash − reserved) is negative by `deficit`. Fills
    /// are facts, so the fill was booked all the same (the `ExecutionApplied` just before this event); until the
    /// deficit is covered the portfolio refuses new buys and withdrawals.
    DeficitIncurred {
        order_id: OrderId,
        exec_id: ExecId,
        symbol: Symbol,
        /// How much this fill added to the deficit.
        increase: Decimal,
        /// The whole deficit now: reserved − cash.
        deficit: Decimal,
        at: DateTime<Utc>,
    },
    /// Buying power is back at zero or above (a deposit, a sell, a released reservation): the deficit of
    /// `covered` is made good.
    DeficitCovered {
        covered: Decimal,
        at: DateTime<Utc>,
    },
    AlertCreated {
        alert_id: AlertId,
        condition: AlertCondition,
        at: DateTime<Utc>,
    },
    AlertCanceled {
        alert_id: AlertId,
        at: DateTime<Utc>,
    },
    AlertRearmed {
        alert_id: AlertId,
        /// The new arming number.
        arming: u32,
        at: DateTime<Utc>,
    },
}

impl PortfolioEvent {
    /// The event's name (its variant's, as serde tags it), stored as its `event_type`.
    pub fn name(&self) -> &'static str {
        self.into()
    }
}

impl DomainEvent for PortfolioEvent {
    fn event_type(&self) -> String {
        self.name().to_string()
    }

    fn event_version(&self) -> String {
        PORTFOLIO_EVENT_VERSION.to_string()
    }
}
