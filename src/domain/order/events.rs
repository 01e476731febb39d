//! Events of the Order aggregate (past tense). They carry derived facts — cumulative quantity, leaves,
//! average price, the status after the event — so read models never re-derive order arithmetic.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{OrderRejectReason, OrderStatus, OrderType, Side, TimeInForce};
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

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> String {
        <&str>::from(self).to_string()
    }

    fn event_version(&self) -> String {
        ORDER_EVENT_VERSION.to_string()
    }
}
