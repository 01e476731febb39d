//! Commands accepted by the Portfolio aggregate.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{AlertCondition, CostBasisMethod};
use crate::domain::order::Side;
use crate::domain::values::{
    AlertId, Amount, Currency, ExecId, FreeText, Money, OrderId, Owner, PortfolioId, Price, Quantity, Symbol,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(tag = "type")]
pub enum PortfolioCommand {
    OpenPortfolio {
        portfolio_id: PortfolioId,
        owner: Owner,
        base_currency: Currency,
        cost_basis_method: CostBasisMethod,
        opened_at: DateTime<Utc>,
    },
    DepositCash {
        amount: Amount,
        reference: Option<FreeText>,
        at: DateTime<Utc>,
    },
    WithdrawCash {
        amount: Amount,
        reference: Option<FreeText>,
        at: DateTime<Utc>,
    },
    /// Set cash aside for a buy order: `amount` covers the order quantity at `price` (the limit, or the
    /// last price plus the collar for a market order) plus the fee allowance.
    ReserveFunds {
        order_id: OrderId,
        symbol: Symbol,
        quantity: Quantity,
        price: Price,
        amount: Money,
        at: DateTime<Utc>,
    },
    /// Set units aside for a sell order so that no other order can sell them too.
    ReserveQuantity {
        order_id: OrderId,
        symbol: Symbol,
        quantity: Quantity,
        at: DateTime<Utc>,
    },
    /// Give back whatever is still reserved for an order (it was cancelled, expired or rejected).
    /// Releasing an order with nothing reserved is a no-op, so the step can be retried safely.
    ReleaseReservation {
        order_id: OrderId,
        reason: super::ReleaseReason,
        at: DateTime<Utc>,
    },
    /// Resize an open order's reservation for an amendment: its open quantity by `quantity_delta` and, for a
    /// buy, its cash in proportion to open quantity × price, at `price` when given (else the reservation's
    /// price). Growing takes from buying power (a buy) or free units (a sell) and is refused beyond them.
    AdjustReservation {
        order_id: OrderId,
        quantity_delta: Decimal,
        price: Option<Price>,
        at: DateTime<Utc>,
    },
    /// Book one fill of an order against the portfolio: cash, position, lots and realized P&L.
    ApplyExecution {
        order_id: OrderId,
        exec_id: ExecId,
        symbol: Symbol,
        side: Side,
        quantity: Quantity,
        price: Price,
        fee: Money,
        executed_at: DateTime<Utc>,
    },
    /// Book a trade made outside the ledger (a row of a broker's statement): cash, position, lots and realized
    /// P&L as for a fill, but with no order and no reservation. It is recorded as an `ExecutionApplied` whose
    /// `exec_id` is `trade_id` and whose `order_id` is [`super::external_order_id`] (naming no Order). A
    /// buy is booked whatever it costs (into deficit if need be); a sell only of units no open order reserved.
    BookExternalTrade {
        trade_id: ExecId,
        symbol: Symbol,
        side: Side,
        quantity: Quantity,
        price: Price,
        fee: Money,
        executed_at: DateTime<Utc>,
    },
    CreateAlert {
        alert_id: AlertId,
        condition: AlertCondition,
        at: DateTime<Utc>,
    },
    CancelAlert {
        alert_id: AlertId,
        at: DateTime<Utc>,
    },
    /// Arm a rule again after it fired, so that it can fire once more.
    RearmAlert {
        alert_id: AlertId,
        at: DateTime<Utc>,
    },
}

impl PortfolioCommand {
    /// The command's name (its variant's), as recorded in event metadata and metrics.
    pub fn name(&self) -> &'static str {
        self.into()
    }
}
