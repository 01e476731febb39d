//! The order blotter: every order with its status, filled and open quantity, average price, fees and
//! executions. Copies the facts the Order events carry.
//!
//! Set-based like the positions projection: a batch loads the orders it touches, folds its events in memory
//! and writes back one upsert of orders and one insert of executions. A rebuild keeps the orders in memory
//! across all its batches ([`OrdersFold`]) and writes the net rows with the same statements.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{FromRow, PgConnection, Row};
use uuid::Uuid;

use super::{aggregate_uuid, decode_batch, ApplyError, Projection, ReplayFold};
use crate::domain::OrderEvent;
use crate::log::{RawEvent, RecordedEvent};

pub struct OrdersProjection;

#[derive(Debug, Clone, sqlx::FromRow)]
struct OrderRow {
    portfolio_id: Uuid,
    client_order_id: String,
    symbol: String,
    side: String,
    order_type: String,
    limit_price: Option<Decimal>,
    stop_price: Option<Decimal>,
    protection_price: Option<Decimal>,
    quantity: Decimal,
    time_in_force: String,
    status: String,
    cum_quantity: Decimal,
    leaves_quantity: Decimal,
    average_price: Option<Decimal>,
    fees: Decimal,
    reject_code: Option<String>,
    reject_reason: Option<String>,
    triggered_at: Option<DateTime<Utc>>,
    trigger_price: Option<Decimal>,
    placed_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    last_position: i64,
}

struct ExecutionRow {
    order_id: Uuid,
    exec_id: String,
    portfolio_id: Uuid,
    symbol: String,
    side: String,
    quantity: Decimal,
    price: Decimal,
    fee: Decimal,
    executed_at: DateTime<Utc>,
    global_position: i64,
}

fn apply(
    orders: &mut BTreeMap<Uuid, OrderRow>,
    executions: &mut Vec<ExecutionRow>,
    id: Uuid,
    position: i64,
    order_event: OrderEvent,
) {
    let terminal = |orders: &mut BTreeMap<Uuid, OrderRow>, status: &str, at: DateTime<Utc>| {
        if let Some(row) = orders.get_mut(&id) {
            row.status = status.to_string();
            row.leaves_quantity = Decimal::ZERO;
            row.updated_at = at;
            row.last_position = position;
        }
    };
    match order_event {
        OrderEvent::OrderPlaced {
            portfolio_id,
            client_order_id,
            symbol,
            side,
            order_type,
            quantity,
            time_in_force,
            placed_at,
            ..
        } => {
            orders.entry(id).or_insert_with(|| OrderRow {
                portfolio_id: portfolio_id.0,
                client_order_id: client_order_id.to_string(),
                symbol: symbol.to_string(),
                side: side.as_str().into(),
                order_type: order_type.as_str().to_string(),
                limit_price: order_type.limit_price().map(|p| p.value()),
                stop_price: order_type.stop_price().map(|p| p.value()),
                protection_price: None,
                quantity: quantity.value(),
                time_in_force: time_in_force.as_str().into(),
                status: "PendingNew".to_string(),
                cum_quantity: Decimal::ZERO,
                leaves_quantity: quantity.value(),
                average_price: None,
                fees: Decimal::ZERO,
                reject_code: None,
                reject_reason: None,
                triggered_at: None,
                trigger_price: None,
                placed_at,
                updated_at: placed_at,
                last_position: position,
            });
        }
        OrderEvent::OrderAccepted { protection_price, accepted_at } => {
            if let Some(row) = orders.get_mut(&id) {
                row.status = "New".to_string();
                row.protection_price = protection_price.map(|p| p.value());
                row.updated_at = accepted_at;
                row.last_position = position;
            }
        }
        OrderEvent::OrderRejected { reason, rejected_at } => {
            if let Some(row) = orders.get_mut(&id) {
                row.status = "Rejected".to_string();
                row.leaves_quantity = Decimal::ZERO;
                row.reject_code = Some(reason.code.as_str().to_string());
                row.reject_reason = Some(reason.detail);
                row.updated_at = rejected_at;
                row.last_position = position;
            }
        }
        OrderEvent::OrderAmended { quantity, order_type, protection_price, leaves_quantity, amended_at, .. } => {
            if let Some(row) = orders.get_mut(&id) {
                row.quantity = quantity.value();
                row.order_type = order_type.as_str().to_string();
                row.limit_price = order_type.limit_price().map(|p| p.value());
                row.stop_price = order_type.stop_price().map(|p| p.value());
                row.protection_price = protection_price.map(|p| p.value());
                row.leaves_quantity = leaves_quantity;
                row.updated_at = amended_at;
                row.last_position = position;
            }
        }
        OrderEvent::OrderAmendRequested { requested_at: at, .. }
        | OrderEvent::OrderAmendRejected { rejected_at: at, .. } => {
            if let Some(row) = orders.get_mut(&id) {
                row.updated_at = at;
                row.last_position = position;
            }
        }
        OrderEvent::OrderTriggered { trigger_price, triggered_at, .. } => {
            if let Some(row) = orders.get_mut(&id) {
                row.triggered_at = Some(triggered_at);
                row.trigger_price = Some(trigger_price.value());
                row.updated_at = triggered_at;
                row.last_position = position;
            }
        }
        OrderEvent::ExecutionRecorded {
            portfolio_id,
            symbol,
            side,
            exec_id,
            quantity,
            price,
            fee,
            executed_at,
            cum_quantity,
            leaves_quantity,
            average_price,
            status,
        } => {
            if let Some(row) = orders.get_mut(&id) {
                row.status = status.as_str().to_string();
                row.cum_quantity = cum_quantity;
                row.leaves_quantity = leaves_quantity;
                row.average_price = Some(average_price);
                row.fees += fee.value();
                row.updated_at = executed_at;
                row.last_position = position;
            }
            executions.push(ExecutionRow {
                order_id: id,
                exec_id: exec_id.to_string(),
                portfolio_id: portfolio_id.0,
                symbol: symbol.to_string(),
                side: side.as_str().into(),
                quantity: quantity.value(),
                price: price.value(),
                fee: fee.value(),
                executed_at,
                global_position: position,
            });
        }
        OrderEvent::OrderCanceled { canceled_at, .. } => terminal(orders, "Canceled", canceled_at),
        OrderEvent::OrderExpired { expired_at, .. } => terminal(orders, "Expired", expired_at),
    }
}

/// The order and its event, decoded from the log's record.
fn decode(event: &RecordedEvent) -> Result<(Uuid, OrderEvent), ApplyError> {
    Ok((aggregate_uuid(&event.aggregate_id)?, event.decode::<OrderEvent>()?))
}

async fn load(conn: &mut PgConnection, ids: &[Uuid]) -> Result<BTreeMap<Uuid, OrderRow>, sqlx::Error> {
    let rows = sqlx::query(
        "select order_id, portfolio_id, client_order_id, symbol, side, order_type, limit_price, stop_price,
                protection_price, quantity, time_in_force, status, cum_quantity, leaves_quantity, average_price, fees,
                reject_code, reject_reason, triggered_at, trigger_price, placed_at, updated_at, last_position
           from rm_orders where order_id = any($1)",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?;
    rows.iter().map(|row| Ok((row.try_get("order_id")?, OrderRow::from_row(row)?))).collect()
}

async fn write(
    conn: &mut PgConnection,
    orders: BTreeMap<Uuid, OrderRow>,
    executions: Vec<ExecutionRow>,
) -> Result<(), sqlx::Error> {
    if !orders.is_empty() {
        let rows: Vec<(&Uuid, &OrderRow)> = orders.iter().collect();
        let column = |f: &dyn Fn(&OrderRow) -> Option<Decimal>| rows.iter().map(|(_, r)| f(r)).collect::<Vec<_>>();
        sqlx::query(
            "insert into rm_orders (order_id, portfolio_id, client_order_id, symbol, side, order_type, limit_price,
                    protection_price, quantity, time_in_force, status, cum_quantity, leaves_quantity, average_price,
                    fees, reject_code, reject_reason, placed_at, updated_at, last_position, stop_price,
                    triggered_at, trigger_price)
             select * from unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                                  $7::numeric[], $8::numeric[], $9::numeric[], $10::text[], $11::text[], $12::numeric[],
                                  $13::numeric[], $14::numeric[], $15::numeric[], $16::text[], $17::text[],
                                  $18::timestamptz[], $19::timestamptz[], $20::bigint[], $21::numeric[],
                                  $22::timestamptz[], $23::numeric[])
             on conflict (order_id) do update
                set order_type = excluded.order_type, limit_price = excluded.limit_price,
                    stop_price = excluded.stop_price, quantity = excluded.quantity,
                    protection_price = excluded.protection_price, status = excluded.status,
                    cum_quantity = excluded.cum_quantity, leaves_quantity = excluded.leaves_quantity,
                    average_price = excluded.average_price, fees = excluded.fees, reject_code = excluded.reject_code,
                    reject_reason = excluded.reject_reason, triggered_at = excluded.triggered_at,
                    trigger_price = excluded.trigger_price, updated_at = excluded.updated_at,
                    last_position = excluded.last_position",
        )
        .bind(rows.iter().map(|(id, _)| **id).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.portfolio_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.client_order_id.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.symbol.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.side.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.order_type.clone()).collect::<Vec<_>>())
        .bind(column(&|r| r.limit_price))
        .bind(column(&|r| r.protection_price))
        .bind(rows.iter().map(|(_, r)| r.quantity).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.time_in_force.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.status.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.cum_quantity).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.leaves_quantity).collect::<Vec<_>>())
        .bind(column(&|r| r.average_price))
        .bind(rows.iter().map(|(_, r)| r.fees).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.reject_code.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.reject_reason.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.placed_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.updated_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, r)| r.last_position).collect::<Vec<_>>())
        .bind(column(&|r| r.stop_price))
        .bind(rows.iter().map(|(_, r)| r.triggered_at).collect::<Vec<_>>())
        .bind(column(&|r| r.trigger_price))
        .execute(&mut *conn)
        .await?;
    }
    if !executions.is_empty() {
        sqlx::query(
            "insert into rm_executions (order_id, exec_id, portfolio_id, symbol, side, quantity, price, fee,
                    executed_at, global_position)
             select * from unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::numeric[],
                                  $7::numeric[], $8::numeric[], $9::timestamptz[], $10::bigint[])
             on conflict (order_id, exec_id) do nothing",
        )
        .bind(executions.iter().map(|e| e.order_id).collect::<Vec<_>>())
        .bind(executions.iter().map(|e| e.exec_id.clone()).collect::<Vec<_>>())
        .bind(executions.iter().map(|e| e.portfolio_id).collect::<Vec<_>>())
        .bind(executions.iter().map(|e| e.symbol.clone()).collect::<Vec<_>>())
        .bind(executions.iter().map(|e| e.side.clone()).collect::<Vec<_>>())
        .bind(executions.iter().map(|e| e.quantity).collect::<Vec<_>>())
        .bind(executions.iter().map(|e| e.price).collect::<Vec<_>>())
        .bind(executions.iter().map(|e| e.fee).collect::<Vec<_>>())
        .bind(executions.iter().map(|e| e.executed_at).collect::<Vec<_>>())
        .bind(executions.iter().map(|e| e.global_position).collect::<Vec<_>>())
        .execute(conn)
        .await?;
    }
    Ok(())
}

#[async_trait]
impl Projection for OrdersProjection {
    fn name(&self) -> &'static str {
        "orders"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["rm_orders", "rm_executions"]
    }

    fn aggregate_type(&self) -> Option<&'static str> {
        Some("Order")
    }

    async fn apply_event(&self, conn: &mut PgConnection, event: &RecordedEvent) -> Result<(), ApplyError> {
        self.apply_events(conn, &[event]).await
    }

    async fn apply_events(&self, conn: &mut PgConnection, events: &[&RecordedEvent]) -> Result<(), ApplyError> {
        let mut decoded = Vec::with_capacity(events.len());
        let mut ids = BTreeSet::new();
        for event in events {
            let (id, order_event) = decode(event)?;
            ids.insert(id);
            decoded.push((id, *event, order_event));
        }
        let ids: Vec<Uuid> = ids.into_iter().collect();
        let mut orders = load(conn, &ids).await?;
        let mut executions = Vec::new();
        for (id, event, order_event) in decoded {
            apply(&mut orders, &mut executions, id, event.position.global_position, order_event);
        }
        write(conn, orders, executions).await?;
        Ok(())
    }

    fn replay_fold(&self) -> Option<Box<dyn ReplayFold>> {
        Some(Box::<OrdersFold>::default())
    }
}

/// Rough bytes of one row held in memory (key, values, strings, map overhead), for the fold's memory bound.
const ORDER_ROW_BYTES: usize = 448;
const EXECUTION_ROW_BYTES: usize = 256;

/// The order blotter held in memory during a rebuild (see [`ReplayFold`]): the same rows and the same fold as
/// a live batch, kept across batches; a flush writes them with the live statements.
#[derive(Default)]
pub struct OrdersFold {
    orders: BTreeMap<Uuid, OrderRow>,
    executions: Vec<ExecutionRow>,
    /// Orders with a row written by a flush: read back before their next event is folded.
    flushed: HashSet<Uuid>,
}

#[async_trait]
impl ReplayFold for OrdersFold {
    async fn fold(
        &mut self,
        conn: &mut PgConnection,
        events: &[&RawEvent],
    ) -> Result<Vec<(usize, String)>, ApplyError> {
        let (decoded, skipped) = decode_batch::<OrderEvent>(events);
        // Orders flushed earlier and not held since: read back before their events are folded.
        let reload: BTreeSet<Uuid> = decoded
            .iter()
            .map(|(id, ..)| *id)
            .filter(|id| !self.orders.contains_key(id) && self.flushed.contains(id))
            .collect();
        if !reload.is_empty() {
            let ids: Vec<Uuid> = reload.into_iter().collect();
            for (id, row) in load(conn, &ids).await? {
                self.orders.entry(id).or_insert(row);
            }
        }
        for (id, event, order_event) in decoded {
            apply(&mut self.orders, &mut self.executions, id, event.position.global_position, order_event);
        }
        Ok(skipped)
    }

    fn held_bytes(&self) -> usize {
        self.orders.len() * ORDER_ROW_BYTES
            + self.executions.len() * EXECUTION_ROW_BYTES
            + self.flushed.len() * std::mem::size_of::<Uuid>() * 2
    }

    async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        let orders = std::mem::take(&mut self.orders);
        let executions = std::mem::take(&mut self.executions);
        self.flushed.extend(orders.keys().copied());
        write(conn, orders, executions).await?;
        Ok(())
    }
}
