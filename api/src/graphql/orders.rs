//! Orders: the blotter row (live) or the Order aggregate replayed up to a point (time travel); both are
//! `ledger::queries::orders::OrderRow`s, which this module maps to GraphQL.

use async_graphql::connection::Connection;
use async_graphql::dataloader::DataLoader;
use async_graphql::{Context, Object, Result};
use chrono::{DateTime, Utc};
use ledger::domain::Order as OrderAggregate;
use ledger::log::AsOf;
use ledger::queries::orders::OrderRow;
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use super::as_of::{aggregate_history, resolve_as_of};
use super::errors::{database, forbidden, internal};
use super::scalars::LogPosition;
use super::types::{Event, Execution, ExecutionsOf, Loaders, OrderStatusGql, OrderTypeGql, SideGql};
use super::{principal, state};

pub struct Order {
    pub record: OrderRow,
    /// Time travel: the point the state is as of.
    pub as_of: Option<AsOf>,
}

impl From<OrderRow> for Order {
    fn from(record: OrderRow) -> Self {
        Order { record, as_of: None }
    }
}

/// The order as the blotter shows it now — or, when the blotter has not caught up with it yet, as its
/// aggregate says. With `wait_for`, first waits (bounded) until the blotter shows that position and the process
/// manager's reactions to it; `NOT_YET_VISIBLE` if it does not in time.
pub async fn load_live(
    state: &super::AppState,
    id: Uuid,
    wait_for: Option<ledger::log::LogPosition>,
) -> Result<Option<Order>> {
    if let Some(position) = wait_for {
        let order = ledger::projections::visibility::ReadModel::Order;
        super::wait_visible(state, order, &id.to_string(), position).await?;
    }
    let record = ledger::queries::orders::order(&state.pool, id).await.map_err(database)?;
    if let Some(record) = record {
        return Ok(Some(Order::from(record)));
    }
    let (order, _) = state.commands.load::<OrderAggregate>(&id.to_string()).await.map_err(super::errors::command)?;
    Ok(OrderRow::of_aggregate(id, &order, 0).map(Order::from))
}

/// The order replayed from its events up to `as_of` (`None` if not placed yet).
pub async fn load_as_of(pool: &PgPool, id: Uuid, as_of: AsOf) -> Result<Option<Order>> {
    let (aggregate, last_position) =
        ledger::log::replay_as_of::<OrderAggregate>(pool, &id.to_string(), &as_of).await.map_err(database)?;
    Ok(OrderRow::of_aggregate(id, &aggregate, last_position).map(|record| Order { record, as_of: Some(as_of) }))
}

/// The owner of a portfolio, from its aggregate (authoritative, unlike a read model that may lag). An owner
/// never changes once the portfolio is opened, so the command service's cached state serves (no read when warm).
pub async fn portfolio_owner(state: &super::AppState, portfolio_id: Uuid) -> Result<Option<String>> {
    let portfolio = state
        .commands
        .load_cached::<ledger::domain::Portfolio>(&portfolio_id.to_string())
        .await
        .map_err(super::errors::command)?;
    Ok(portfolio.terms.map(|t| t.owner.to_string()))
}

#[Object]
impl Order {
    async fn id(&self) -> Uuid {
        self.record.order_id
    }

    async fn portfolio_id(&self) -> Uuid {
        self.record.portfolio_id
    }

    async fn client_order_id(&self) -> &str {
        &self.record.client_order_id
    }

    async fn symbol(&self) -> &str {
        &self.record.symbol
    }

    async fn side(&self) -> Result<SideGql> {
        SideGql::parse(&self.record.side).map_err(internal)
    }

    #[graphql(name = "type")]
    async fn order_type(&self) -> Result<OrderTypeGql> {
        OrderTypeGql::parse(&self.record.order_type).map_err(internal)
    }

    async fn limit_price(&self) -> Option<Decimal> {
        self.record.limit_price
    }

    /// For a stop or stop-limit order: the price that triggers it (a buy's at or above, a sell's at or below).
    async fn stop_price(&self) -> Option<Decimal> {
        self.record.stop_price
    }

    /// When a stop or stop-limit order was triggered (null until then, and for other types).
    async fn triggered_at(&self) -> Option<DateTime<Utc>> {
        self.record.triggered_at
    }

    /// The price that triggered a stop order: the tick's, or a broker's fill's when the broker triggered it.
    async fn trigger_price(&self) -> Option<Decimal> {
        self.record.trigger_price
    }

    /// For an accepted market or stop order: a buy's ceiling (the last price + 5 %, rounded up to the cent, also what it
    /// reserved at) or a sell's floor (the last price − 5 %, rounded down); a fill beyond it is refused.
    async fn protection_price(&self) -> Option<Decimal> {
        self.record.protection_price
    }

    async fn quantity(&self) -> Decimal {
        self.record.quantity
    }

    async fn time_in_force(&self) -> &str {
        &self.record.time_in_force
    }

    async fn status(&self) -> Result<OrderStatusGql> {
        OrderStatusGql::parse(&self.record.status).map_err(internal)
    }

    async fn cum_quantity(&self) -> Decimal {
        self.record.cum_quantity
    }

    async fn leaves_quantity(&self) -> Decimal {
        self.record.leaves_quantity
    }

    /// Volume-weighted average fill price, to 8 decimals (see docs/accounting.md).
    async fn average_price(&self) -> Option<Decimal> {
        self.record.average_price
    }

    async fn fees(&self) -> Decimal {
        self.record.fees
    }

    /// Why the order was rejected: `INSUFFICIENT_FUNDS`, `INSUFFICIENT_QUANTITY`, `NO_MARKET_PRICE`,
    /// `PORTFOLIO_NOT_FOUND`, `PORTFOLIO_IN_DEFICIT` or `PORTFOLIO_REJECTED`.
    async fn reject_code(&self) -> Option<&str> {
        self.record.reject_code.as_deref()
    }

    async fn reject_reason(&self) -> Option<&str> {
        self.record.reject_reason.as_deref()
    }

    async fn placed_at(&self) -> DateTime<Utc> {
        self.record.placed_at
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.record.updated_at
    }

    async fn last_position(&self) -> i64 {
        self.record.last_position
    }

    async fn as_of(&self) -> Option<DateTime<Utc>> {
        self.as_of.as_ref().map(|a| a.time)
    }

    #[graphql(complexity = "super::EXECUTIONS_WEIGHT * child_complexity")]
    async fn executions(&self, ctx: &Context<'_>) -> Result<Vec<Execution>> {
        let loader = ctx.data_unchecked::<DataLoader<Loaders>>();
        let all = loader
            .load_one(ExecutionsOf(self.record.order_id))
            .await
            .map_err(|e| database(sqlx::Error::Protocol(e.to_string())))?
            .unwrap_or_default();
        Ok(match &self.as_of {
            Some(as_of) => all.into_iter().filter(|e| e.executed_at <= as_of.time).collect(),
            None => all,
        })
    }

    /// The order's own events, oldest first; the cursor is the sequence number. In time travel, only the
    /// events up to the point asked for.
    #[graphql(complexity = "super::page_size(first) * child_complexity")]
    async fn history(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, Event>> {
        let id = self.record.order_id.to_string();
        aggregate_history(&state(ctx).pool, "Order", &id, self.as_of.as_ref(), first, after).await
    }
}

#[derive(Default)]
pub struct OrderQuery;

#[Object]
impl OrderQuery {
    /// One order: live from the blotter, or as it was at `asOf` / `atPosition`. `waitFor` works as on
    /// `portfolio`. An unknown order and one the token may not read both answer null.
    async fn order(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        as_of: Option<DateTime<Utc>>,
        at_position: Option<LogPosition>,
        wait_for: Option<LogPosition>,
    ) -> Result<Option<Order>> {
        let principal = principal(ctx)?;
        if !principal.can_read_any_order() && !principal.can_read_portfolios() {
            return Err(forbidden());
        }
        let state = state(ctx);
        let order = match resolve_as_of(&state.pool, as_of, at_position).await? {
            Some(point) => load_as_of(&state.pool, id, point).await?,
            None => load_live(state, id, wait_for.map(|w| w.0)).await?,
        };
        let Some(order) = order else { return Ok(None) };
        if !principal.can_read_any_order() {
            let owner = portfolio_owner(state, order.record.portfolio_id).await?;
            if !owner.is_some_and(|owner| principal.can_read_portfolio(&owner)) {
                return Ok(None);
            }
        }
        Ok(Some(order))
    }
}
