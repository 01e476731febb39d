//! Events of the Order aggregate (past tense). They carry derived facts — cumulative quantity, leaves,
//! average price, the status after the event — so read models never re-derive order arithmetic.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{OrderRejectReason, OrderStatus, OrderType, Side, TickRef, TimeInForce};
use crate::domain::values::{ClientOrderId, ExecId, Money, OrderId, PortfolioId, Price, Quantity, Symbol};

/// Version of every Order event's payload schema; bump with an upcaster when a payload changes shape.
pub const ORDER_EVENT_VERSION: &str = "1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, strum::IntoStaticStr)]
pub enum OrderEvent {
    OrderPlaced {
        order_id: OrderId,
        portfolio_id: PortfolioId,
        client_order_id: ClientOrderId,
        symbol: Symbol,
        side: Side,
        order_type: OrderType,
        quantity: Quantity,
        time_in_force: TimeInForce,
        placed_at: DateTime<Utc>,
    },
    OrderAccepted {
        protection_price: Option<Price>,
        accepted_at: DateTime<Utc>,
    },
    OrderRejected {
        reason: OrderRejectReason,
        rejected_at: DateTime<Utc>,
    },
    /// A stop order's stop was reached: by `tick` (the price stream) at `trigger_price`, or by a broker's
    /// execution at its price (`tick` absent).
    OrderTriggered {
        portfolio_id: PortfolioId,
        trigger_price: Price,
        tick: Option<TickRef>,
        triggered_at: DateTime<Utc>,
    },
    ExecutionRecorded {
        /// The order's portfolio, symbol and side, repeated so that consumers need no lookup.
        portfolio_id: PortfolioId,
        symbol: Symbol,
        side: Side,
        exec_id: ExecId,
        quantity: Quantity,
        price: Price,
        fee: Money,
        executed_at: DateTime<Utc>,
        /// Quantity filled so far, including this execution.
        cum_quantity: Decimal,
        /// Quantity still open after this execution.
        leaves_quantity: Decimal,
        /// Volume-weighted average fill price so far (exact to 8 decimals).
        average_price: Decimal,
        /// `PartiallyFilled` or `Filled`.
        status: OrderStatus,
    },
    /// An amendment was requested: the terms it asks for and the current ones. Nothing changes until
    /// `OrderAmended` (or `OrderAmendRejected`).
    OrderAmendRequested {
        portfolio_id: PortfolioId,
        /// The order's request number (1, 2, …): what `ConfirmAmend` and `RejectAmend` answer.
        request: u32,
        symbol: Symbol,
        side: Side,
        quantity: Quantity,
        order_type: OrderType,
        previous_quantity: Decimal,
        previous_order_type: OrderType,
        /// The protection price of a market or stop order now (its reservation's price for a buy).
        previous_protection_price: Option<Price>,
        requested_at: DateTime<Utc>,
    },
    /// The amendment took effect: the order's terms are now these (a new version of the order), and were the
    /// `previous_…` ones until now.
    OrderAmended {
        portfolio_id: PortfolioId,
        request: u32,
        side: Side,
        quantity: Quantity,
        order_type: OrderType,
        protection_price: Option<Price>,
        leaves_quantity: Decimal,
        previous_quantity: Decimal,
        previous_order_type: OrderType,
        previous_protection_price: Option<Price>,
        /// 1 for the first amendment, then 2, …
        version: u32,
        amended_at: DateTime<Utc>,
    },
    OrderAmendRejected {
        portfolio_id: PortfolioId,
        request: u32,
        reason: String,
        rejected_at: DateTime<Utc>,
    },
    OrderCanceled {
        portfolio_id: PortfolioId,
        /// The open quantity the cancel removed.
        canceled_quantity: Decimal,
        reason: String,
        canceled_at: DateTime<Utc>,
    },
    OrderExpired {
        portfolio_id: PortfolioId,
        expired_quantity: Decimal,
        expired_at: DateTime<Utc>,
    },
}

impl OrderEvent {
    /// The order's portfolio, when the event names it (acceptances and rejections of the placement do not).
    pub fn portfolio_id(&self) -> Option<PortfolioId> {
        match self {
            Self::OrderPlaced { portfolio_id, .. }
            | Self::OrderTriggered { portfolio_id, .. }
            | Self::ExecutionRecorded { portfolio_id, .. }
            | Self::OrderAmendRequested { portfolio_id, .. }
            | Self::OrderAmended { portfolio_id, .. }
            | Self::OrderAmendRejected { portfolio_id, .. }
            | Self::OrderCanceled { portfolio_id, .. }
            | Self::OrderExpired { portfolio_id, .. } => Some(*portfolio_id),
            Self::OrderAccepted { .. } | Self::OrderRejected { .. } => None,
        }
    }
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> String {
        <&str>::from(self).to_string()
    }

    fn event_version(&self) -> String {
        ORDER_EVENT_VERSION.to_string()
    }
}
