//! Commands accepted by the Order aggregate (imperative; each carries the time it was issued).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{OrderRejectReason, OrderType, Side, TimeInForce};
use crate::domain::values::{ClientOrderId, ExecId, FreeText, Money, OrderId, PortfolioId, Price, Quantity, Symbol};

/// Everything a client states when it places an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaceOrder {
    pub order_id: OrderId,
    pub portfolio_id: PortfolioId,
    pub client_order_id: ClientOrderId,
    pub symbol: Symbol,
    pub side: Side,
    pub order_type: OrderType,
    pub quantity: Quantity,
    pub time_in_force: TimeInForce,
    pub placed_at: DateTime<Utc>,
}

/// One execution report (FIX ExecutionReport with ExecType=Trade), from the paper executor or a real broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordExecution {
    pub exec_id: ExecId,
    pub quantity: Quantity,
    pub price: Price,
    pub fee: Money,
    pub executed_at: DateTime<Utc>,
}

/// The tick a trigger was decided on: its time and sequence number on the prices topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickRef {
    pub ts: DateTime<Utc>,
    pub seq: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(tag = "type")]
pub enum OrderCommand {
    PlaceOrder(PlaceOrder),
    /// The portfolio has reserved what the order needs. `protection_price` caps market buys (and floors
    /// market sells) at the price the reservation was computed from, so a fill can never cost more than
    /// was set aside.
    AcceptOrder {
        protection_price: Option<Price>,
        accepted_at: DateTime<Utc>,
    },
    RejectOrder {
        reason: OrderRejectReason,
        rejected_at: DateTime<Utc>,
    },
    /// A price reached an accepted stop order's stop: from now on it works as a market (stop) or limit (stop
    /// limit) order. Refused unless `price` is at or beyond the stop. (An execution recorded on a stop order
    /// not triggered yet — a broker that triggered it in its own book — triggers it at the fill's price.)
    TriggerOrder {
        price: Price,
        tick: Option<TickRef>,
        triggered_at: DateTime<Utc>,
    },
    RecordExecution(RecordExecution),
    /// FIX OrderCancelReplaceRequest: a new total quantity and/or limit or stop price for an open order. It is
    /// requested here and takes effect once the process manager has adjusted the reservation
    /// (`ConfirmAmend`), or is turned down (`RejectAmend`); fills meanwhile follow the current terms.
    AmendOrder {
        quantity: Option<Quantity>,
        limit_price: Option<Price>,
        stop_price: Option<Price>,
        requested_at: DateTime<Utc>,
    },
    /// The reservation covers the requested amendment: apply it. `protection_price` is the new bound of a
    /// market or stop order (ignored for the others).
    ConfirmAmend {
        /// The request answered (`OrderAmendRequested.request`): refused if another one is pending.
        request: u32,
        protection_price: Option<Price>,
        confirmed_at: DateTime<Utc>,
    },
    /// The requested amendment does not take effect (e.g. the portfolio cannot cover it).
    RejectAmend {
        request: u32,
        reason: FreeText,
        rejected_at: DateTime<Utc>,
    },
    CancelOrder {
        reason: FreeText,
        canceled_at: DateTime<Utc>,
    },
    ExpireOrder {
        expired_at: DateTime<Utc>,
    },
}

impl OrderCommand {
    /// The command's name, as recorded in event metadata and metrics.
    pub fn name(&self) -> &'static str {
        self.into()
    }
}
