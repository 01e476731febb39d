//! The order blotter (`rm_orders`) and fills (`rm_executions`), and the blotter row of an Order aggregate's
//! state (what time travel shows, and what a query shows before the blotter has caught up).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::Order;

/// One row of the order blotter.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct OrderRow {
    pub order_id: Uuid,
    pub portfolio_id: Uuid,
    pub client_order_id: String,
    pub symbol: String,
    pub side: String,
    pub order_type: String,
    pub limit_price: Option<Decimal>,
    pub stop_price: Option<Decimal>,
    pub protection_price: Option<Decimal>,
    pub quantity: Decimal,
    pub time_in_force: String,
    pub status: String,
    pub cum_quantity: Decimal,
    pub leaves_quantity: Decimal,
    pub average_price: Option<Decimal>,
    pub fees: Decimal,
    pub reject_code: Option<String>,
    pub reject_reason: Option<String>,
    /// When a stop order was triggered, and at which price.
    pub triggered_at: Option<DateTime<Utc>>,
    pub trigger_price: Option<Decimal>,
    pub placed_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_position: i64,
}

const ORDER_COLUMNS: &str = "order_id, portfolio_id, client_order_id, symbol, side, order_type, limit_price,
    stop_price, protection_price, quantity, time_in_force, status, cum_quantity, leaves_quantity, average_price,
    fees, reject_code, reject_reason, triggered_at, trigger_price, placed_at, updated_at, last_position";

impl OrderRow {
    /// The row of an aggregate's state (`None` before the order was placed); `last_position` is the global
    /// position of the last event it reflects.
    pub fn of_aggregate(id: Uuid, order: &Order, last_position: i64) -> Option<OrderRow> {
        let terms = order.terms.as_ref()?;
        Some(OrderRow {
            order_id: id,
            portfolio_id: terms.portfolio_id.0,
            client_order_id: terms.client_order_id.to_string(),
            symbol: terms.symbol.to_string(),
            side: terms.side.as_str().into(),
            order_type: terms.order_type.as_str().into(),
            limit_price: terms.order_type.limit_price().map(|p| p.value()),
            stop_price: terms.order_type.stop_price().map(|p| p.value()),
            protection_price: order.protection_price.map(|p| p.value()),
            quantity: terms.quantity,
            time_in_force: terms.time_in_force.as_str().into(),
            status: order.status.as_str().into(),
            cum_quantity: order.cum_quantity,
            leaves_quantity: order.leaves_quantity,
            average_price: order.average_price(),
            fees: order.fees,
            reject_code: order.reject_reason.as_ref().map(|r| r.code.as_str().to_string()),
            reject_reason: order.reject_reason.as_ref().map(|r| r.detail.clone()),
            triggered_at: order.triggered.map(|(at, _)| at),
            trigger_price: order.triggered.map(|(_, price)| price.value()),
            placed_at: terms.placed_at,
            updated_at: order.updated_at.unwrap_or(terms.placed_at),
            last_position,
        })
    }
}

/// The blotter row of one order.
pub async fn order(pool: &PgPool, order_id: Uuid) -> Result<Option<OrderRow>, sqlx::Error> {
    sqlx::query_as(&format!("select {ORDER_COLUMNS} from rm_orders where order_id = $1"))
        .bind(order_id)
        .fetch_optional(pool)
        .await
}

/// Which of a portfolio's orders to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct OrderFilter {
    /// Only orders before this `(placed_at, order_id)` (a page's cursor).
    pub before: Option<(DateTime<Utc>, Uuid)>,
    /// Only orders in these statuses.
    pub statuses: Option<Vec<String>>,
    /// Only orders placed by then (time travel).
    pub placed_by: Option<DateTime<Utc>>,
}

/// Up to `limit` of a portfolio's orders, newest first.
pub async fn portfolio_orders(
    pool: &PgPool,
    portfolio_id: Uuid,
    filter: &OrderFilter,
    limit: i64,
) -> Result<Vec<OrderRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "select {ORDER_COLUMNS} from rm_orders
          where portfolio_id = $1
            and ($2::timestamptz is null or (placed_at, order_id) < ($2, $3))
            and ($4::text[] is null or status = any($4))
            and ($5::timestamptz is null or placed_at <= $5)
          order by placed_at desc, order_id desc limit $6"
    ))
    .bind(portfolio_id)
    .bind(filter.before.map(|c| c.0))
    .bind(filter.before.map(|c| c.1))
    .bind(filter.statuses.as_deref())
    .bind(filter.placed_by)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// One fill of an order.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ExecutionRow {
    pub order_id: Uuid,
    pub exec_id: String,
    pub portfolio_id: Uuid,
    pub symbol: String,
    pub side: String,
    pub quantity: Decimal,
    pub price: Decimal,
    pub fee: Decimal,
    pub executed_at: DateTime<Utc>,
    /// Global position of the event that recorded it.
    pub global_position: i64,
}

const EXECUTION_COLUMNS: &str =
    "order_id, exec_id, portfolio_id, symbol, side, quantity, price, fee, executed_at, global_position";

/// The fills of these orders, in log order.
pub async fn order_executions(pool: &PgPool, order_ids: &[Uuid]) -> Result<Vec<ExecutionRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "select {EXECUTION_COLUMNS} from rm_executions where order_id = any($1) order by global_position"
    ))
    .bind(order_ids)
    .fetch_all(pool)
    .await
}

/// Up to `limit` fills of a portfolio, newest first: before the global position `before` and executed by
/// `executed_by` when given.
pub async fn portfolio_executions(
    pool: &PgPool,
    portfolio_id: Uuid,
    before: Option<i64>,
    executed_by: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<ExecutionRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "select {EXECUTION_COLUMNS} from rm_executions
          where portfolio_id = $1 and ($2::bigint is null or global_position < $2)
            and ($3::timestamptz is null or executed_at <= $3)
          order by global_position desc limit $4"
    ))
    .bind(portfolio_id)
    .bind(before)
    .bind(executed_by)
    .bind(limit)
    .fetch_all(pool)
    .await
}
