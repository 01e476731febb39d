//! Portfolios: the live view from the read models, or — with `asOf` / `atPosition` — the state as it was then,
//! replayed from the aggregate's own events (time travel).

use std::collections::BTreeMap;

use async_graphql::connection::{Connection, Edge};
use async_graphql::dataloader::DataLoader;
use async_graphql::{Context, Object, Result};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use ledger::domain::{Portfolio as PortfolioAggregate, PortfolioEvent};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use ledger::projections::visibility::ReadModel;

use super::errors::{database, forbidden, invalid, not_found};
use super::orders::{Order, OrderRecord};
use super::scalars::LogPosition;
use super::types::{
    AlertFiring, AlertRule, CostBasisMethodGql, Event, Execution, Loaders, Position, PositionsOf, Valuation,
};
use super::{page_size, principal, state};

/// Longest a query waits for a read model to reach `waitFor`.
pub const READ_WAIT_MS_MAX: u64 = 5_000;

/// The point of a time-travel query.
#[derive(Debug, Clone)]
pub struct AsOf {
    pub time: DateTime<Utc>,
    pub position: Option<ledger::log::LogPosition>,
}

pub struct Portfolio {
    pub id: Uuid,
    pub owner: String,
    pub base_currency: String,
    pub cost_basis_method: CostBasisMethodGql,
    pub cash: Decimal,
    pub reserved_cash: Decimal,
    pub realized_pnl: Decimal,
    pub opened_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_position: i64,
    /// Time travel: the point asked for, and the positions as they were.
    pub as_of: Option<(AsOf, Vec<Position>)>,
}

#[derive(sqlx::FromRow)]
struct PortfolioRow {
    portfolio_id: Uuid,
    owner: String,
    base_currency: String,
    cost_basis_method: String,
    cash: Decimal,
    reserved_cash: Decimal,
    realized_pnl: Decimal,
    opened_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    last_position: i64,
}

impl From<PortfolioRow> for Portfolio {
    fn from(row: PortfolioRow) -> Self {
        Portfolio {
            id: row.portfolio_id,
            owner: row.owner,
            base_currency: row.base_currency,
            cost_basis_method: CostBasisMethodGql::parse(&row.cost_basis_method),
            cash: row.cash,
            reserved_cash: row.reserved_cash,
            realized_pnl: row.realized_pnl,
            opened_at: row.opened_at,
            updated_at: row.updated_at,
            last_position: row.last_position,
            as_of: None,
        }
    }
}

const PORTFOLIO_COLUMNS: &str =
    "portfolio_id, owner, base_currency, cost_basis_method, cash, reserved_cash, realized_pnl,
    opened_at, updated_at, last_position";

/// The live read-model row. With `wait_for`, first waits (at most [`READ_WAIT_MS_MAX`]) until the read model
/// shows that position and the process manager's reactions to it (`ledger::projections::visibility`), and
/// answers `NOT_YET_VISIBLE` if it does not in time. A portfolio the read model has not seen yet (opened a
/// moment ago) is answered from its events, as of now.
pub async fn load_live(
    state: &super::AppState,
    id: Uuid,
    wait_for: Option<ledger::log::LogPosition>,
) -> Result<Option<Portfolio>> {
    if let Some(position) = wait_for {
        super::wait_visible(state, ReadModel::Portfolio, &id.to_string(), position).await?;
    }
    let (pool, now) = (&state.pool, state.clock.now());
    let row: Option<PortfolioRow> =
        sqlx::query_as(&format!("select {PORTFOLIO_COLUMNS} from rm_portfolios where portfolio_id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(database)?;
    match row {
        Some(row) => Ok(Some(Portfolio::from(row))),
        None => load_as_of(pool, id, AsOf { time: now, position: None }).await,
    }
}

/// Replays the portfolio's events up to `as_of`; `None` if it did not exist yet.
pub async fn load_as_of(pool: &PgPool, id: Uuid, as_of: AsOf) -> Result<Option<Portfolio>> {
    let rows: Vec<(serde_json::Value, i64)> = sqlx::query_as(
        "select payload, global_position from events
          where aggregate_type = 'Portfolio' and aggregate_id = $1
            and ($2::text is null or (transaction_id, global_position) <= ($2::text::xid8, $3))
            and ($4::timestamptz is null or recorded_at <= $4)
          order by sequence",
    )
    .bind(id.to_string())
    .bind(as_of.position.map(|p| p.transaction_id.to_string()))
    .bind(as_of.position.map_or(0, |p| p.global_position))
    .bind(as_of.position.is_none().then_some(as_of.time))
    .fetch_all(pool)
    .await
    .map_err(database)?;
    let mut aggregate = PortfolioAggregate::default();
    let mut last_position = 0;
    for (payload, position) in rows {
        let event: PortfolioEvent = serde_json::from_value(payload).map_err(super::errors::internal)?;
        aggregate.apply(event);
        last_position = position;
    }
    let Some(terms) = aggregate.terms.clone() else { return Ok(None) };
    let positions = aggregate.positions.iter().map(|(symbol, p)| Position::of(symbol, p)).collect();
    Ok(Some(Portfolio {
        id,
        owner: terms.owner.to_string(),
        base_currency: terms.base_currency.to_string(),
        cost_basis_method: match terms.cost_basis_method {
            ledger::domain::CostBasisMethod::Fifo => CostBasisMethodGql::Fifo,
            ledger::domain::CostBasisMethod::AverageCost => CostBasisMethodGql::AverageCost,
        },
        cash: aggregate.cash,
        reserved_cash: aggregate.reserved_cash,
        realized_pnl: aggregate.realized_pnl,
        opened_at: terms.opened_at,
        updated_at: as_of.time,
        last_position,
        as_of: Some((as_of, positions)),
    }))
}

/// Resolves `asOf` / `atPosition` to a point in time (the time of the event at that position).
pub async fn resolve_as_of(
    pool: &PgPool,
    as_of: Option<DateTime<Utc>>,
    at_position: Option<LogPosition>,
) -> Result<Option<AsOf>> {
    match (as_of, at_position) {
        (Some(_), Some(_)) => Err(invalid("give asOf or atPosition, not both")),
        (Some(time), None) => Ok(Some(AsOf { time, position: None })),
        (None, Some(LogPosition(position))) => {
            let time: Option<DateTime<Utc>> = sqlx::query_scalar(
                "select recorded_at from events where transaction_id = $1::text::xid8 and global_position = $2",
            )
            .bind(position.transaction_id.to_string())
            .bind(position.global_position)
            .fetch_optional(pool)
            .await
            .map_err(database)?;
            let time = time.ok_or_else(|| not_found("log position"))?;
            Ok(Some(AsOf { time, position: Some(position) }))
        }
        (None, None) => Ok(None),
    }
}

/// Prices as of `time`, from the tick archive (the last tick at or before it, per symbol).
async fn prices_as_of(
    pool: &PgPool,
    symbols: &[String],
    time: DateTime<Utc>,
) -> Result<BTreeMap<String, (Decimal, DateTime<Utc>)>> {
    let rows: Vec<(String, Decimal, DateTime<Utc>)> = sqlx::query_as(
        "select distinct on (symbol) symbol, price, ts from market_ticks
          where symbol = any($1) and ts <= $2 order by symbol, ts desc, seq desc",
    )
    .bind(symbols)
    .bind(time)
    .fetch_all(pool)
    .await
    .map_err(database)?;
    Ok(rows.into_iter().map(|(symbol, price, ts)| (symbol, (price, ts))).collect())
}

#[Object]
impl Portfolio {
    async fn id(&self) -> Uuid {
        self.id
    }

    async fn owner(&self) -> &str {
        &self.owner
    }

    async fn base_currency(&self) -> &str {
        &self.base_currency
    }

    async fn cost_basis_method(&self) -> CostBasisMethodGql {
        self.cost_basis_method
    }

    async fn cash(&self) -> Decimal {
        self.cash
    }

    /// Cash promised to open buy orders.
    async fn reserved(&self) -> Decimal {
        self.reserved_cash
    }

    /// cash − reserved: what withdrawals and new buys may use. Negative while the portfolio is in deficit.
    async fn buying_power(&self) -> Decimal {
        self.cash - self.reserved_cash
    }

    /// How much cash is missing (reserved − cash), zero when none. A fill is booked whatever it costs (fills
    /// are facts), so a fee beyond the order's reservation with the rest of the cash committed can leave the
    /// portfolio short; until a deposit, a sell or a cancel covers it, withdrawals and new buys are refused
    /// (`PORTFOLIO_IN_DEFICIT`). See docs/accounting.md.
    async fn deficit(&self) -> Decimal {
        (self.reserved_cash - self.cash).max(Decimal::ZERO)
    }

    async fn realized_pnl(&self) -> Decimal {
        self.realized_pnl
    }

    async fn opened_at(&self) -> DateTime<Utc> {
        self.opened_at
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.updated_at
    }

    /// Global position of the last event reflected here.
    async fn last_position(&self) -> i64 {
        self.last_position
    }

    /// For a time-travel query: the point in time the state is as of.
    async fn as_of(&self) -> Option<DateTime<Utc>> {
        self.as_of.as_ref().map(|(as_of, _)| as_of.time)
    }

    #[graphql(complexity = "super::POSITIONS_WEIGHT * child_complexity")]
    async fn positions(&self, ctx: &Context<'_>) -> Result<Vec<Position>> {
        if let Some((_, positions)) = &self.as_of {
            return Ok(positions.clone());
        }
        let loader = ctx.data_unchecked::<DataLoader<Loaders>>();
        Ok(loader
            .load_one(PositionsOf(self.id))
            .await
            .map_err(|e| database(sqlx::Error::Protocol(e.to_string())))?
            .unwrap_or_default())
    }

    /// Market value, unrealized P&L and total equity at the latest prices (or, in time travel, at the prices
    /// of the time asked for). A position without any price is reported with a reason, never valued at 0.
    async fn valuation(&self, ctx: &Context<'_>) -> Result<Valuation> {
        let state = state(ctx);
        if let Some((as_of, positions)) = &self.as_of {
            let symbols: Vec<String> =
                positions.iter().filter(|p| !p.quantity.is_zero()).map(|p| p.symbol.clone()).collect();
            let prices = prices_as_of(&state.pool, &symbols, as_of.time).await?;
            let valuation = ledger::projections::valuation::PortfolioValuation::compose(
                self.id,
                self.cash,
                positions
                    .iter()
                    .filter(|p| !p.quantity.is_zero())
                    .map(|p| {
                        let price = prices.get(&p.symbol).copied();
                        ledger::projections::valuation::PositionValuation::at_price(
                            &p.symbol,
                            p.quantity,
                            p.cost_basis,
                            p.realized_pnl,
                            price,
                            state.valuation_stale_after,
                            as_of.time,
                        )
                    })
                    .collect(),
            );
            return Ok(valuation.into());
        }
        let now = state.clock.now();
        let valuation =
            ledger::projections::valuation::portfolio_valuation(&state.pool, self.id, state.valuation_stale_after, now)
                .await
                .map_err(database)?
                .ok_or_else(|| not_found("portfolio"))?;
        Ok(valuation.into())
    }

    /// The portfolio's orders, newest first (in time travel: those placed by then, in their state then).
    #[graphql(complexity = "super::page_size(first) * child_complexity")]
    async fn orders(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
        status: Option<Vec<super::types::OrderStatusGql>>,
    ) -> Result<Connection<String, Order>> {
        let state = state(ctx);
        let limit = page_size(first);
        let cursor = after.as_deref().map(decode_order_cursor).transpose()?;
        let statuses: Option<Vec<&str>> = status.as_ref().map(|s| s.iter().map(|s| s.as_str()).collect());
        let rows: Vec<OrderRecord> = sqlx::query_as(&format!(
            "select {} from rm_orders
              where portfolio_id = $1
                and ($2::timestamptz is null or (placed_at, order_id) < ($2, $3))
                and ($4::text[] is null or status = any($4))
                and ($5::timestamptz is null or placed_at <= $5)
              order by placed_at desc, order_id desc limit $6",
            OrderRecord::COLUMNS
        ))
        .bind(self.id)
        .bind(cursor.map(|c| c.0))
        .bind(cursor.map(|c| c.1))
        .bind(statuses)
        .bind(self.as_of.as_ref().map(|(a, _)| a.time))
        .bind(limit as i64 + 1)
        .fetch_all(&state.pool)
        .await
        .map_err(database)?;
        let mut connection = Connection::new(after.is_some(), rows.len() > limit);
        for row in rows.into_iter().take(limit) {
            let cursor = encode_order_cursor(row.placed_at, row.order_id);
            let order = match &self.as_of {
                Some((as_of, _)) => super::orders::load_as_of(&state.pool, row.order_id, as_of.clone()).await?,
                None => Some(Order::from(row)),
            };
            if let Some(order) = order {
                connection.edges.push(Edge::new(cursor, order));
            }
        }
        Ok(connection)
    }

    /// The portfolio's fills, newest first.
    #[graphql(complexity = "super::page_size(first) * child_complexity")]
    async fn executions(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, Execution>> {
        let state = state(ctx);
        let limit = page_size(first);
        let before: Option<i64> =
            after.as_deref().map(|a| a.parse::<i64>().map_err(|_| invalid("bad cursor"))).transpose()?;
        let rows: Vec<Execution> = sqlx::query_as(
            "select order_id, exec_id, portfolio_id, symbol, side, quantity, price, fee, executed_at, global_position
               from rm_executions
              where portfolio_id = $1 and ($2::bigint is null or global_position < $2)
                and ($3::timestamptz is null or executed_at <= $3)
              order by global_position desc limit $4",
        )
        .bind(self.id)
        .bind(before)
        .bind(self.as_of.as_ref().map(|(a, _)| a.time))
        .bind(limit as i64 + 1)
        .fetch_all(&state.pool)
        .await
        .map_err(database)?;
        let mut connection = Connection::new(after.is_some(), rows.len() > limit);
        connection
            .edges
            .extend(rows.into_iter().take(limit).map(|row| Edge::new(row.global_position.to_string(), row)));
        Ok(connection)
    }

    /// The portfolio's alert rules (at most 100 live ones).
    #[graphql(complexity = "ledger::domain::portfolio::ALERTS_PER_PORTFOLIO_MAX * child_complexity")]
    async fn alert_rules(&self, ctx: &Context<'_>) -> Result<Vec<AlertRule>> {
        let rows: Vec<super::types::AlertRuleRow> = sqlx::query_as(
            "select alert_id, portfolio_id, kind, symbol, condition, arming, status from rm_alert_rules
              where portfolio_id = $1 order by created_at, alert_id",
        )
        .bind(self.id)
        .fetch_all(&state(ctx).pool)
        .await
        .map_err(database)?;
        Ok(rows.into_iter().map(AlertRule::from).collect())
    }

    /// Firings, newest first (at most one per arming of each rule).
    #[graphql(complexity = "super::page_size(first) * child_complexity")]
    async fn alert_firings(&self, ctx: &Context<'_>, first: Option<i32>) -> Result<Vec<AlertFiring>> {
        sqlx::query_as(
            "select firing_id, alert_id, portfolio_id, arming, kind, symbol, price, observed_value, fired_at
               from alert_firings where portfolio_id = $1 order by fired_at desc limit $2",
        )
        .bind(self.id)
        .bind(page_size(first) as i64)
        .fetch_all(&state(ctx).pool)
        .await
        .map_err(database)
    }

    /// The portfolio's own events, oldest first; the cursor is the sequence number. In time travel, only the
    /// events up to the point asked for.
    #[graphql(complexity = "super::page_size(first) * child_complexity")]
    async fn history(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, Event>> {
        let until = self.as_of.as_ref().map(|(as_of, _)| as_of);
        aggregate_history(&state(ctx).pool, "Portfolio", &self.id.to_string(), until, first, after).await
    }
}

/// An aggregate's events by sequence (shared by portfolios and orders), up to `until` when given (the same
/// bound as the time-travel replay: a log position, or a time).
pub async fn aggregate_history(
    pool: &PgPool,
    aggregate_type: &str,
    id: &str,
    until: Option<&AsOf>,
    first: Option<i32>,
    after: Option<String>,
) -> Result<Connection<String, Event>> {
    let limit = page_size(first);
    let after_sequence: i64 =
        after.as_deref().map(|a| a.parse().map_err(|_| invalid("bad cursor"))).transpose()?.unwrap_or(0);
    let position = until.and_then(|u| u.position);
    let rows = sqlx::query(
        "select transaction_id::text as transaction_id_text, global_position, event_id, aggregate_type, aggregate_id,
                sequence, event_type, event_version, payload, metadata, recorded_at
           from events
          where aggregate_type = $1 and aggregate_id = $2 and sequence > $3
            and ($5::text is null or (transaction_id, global_position) <= ($5::text::xid8, $6))
            and ($7::timestamptz is null or recorded_at <= $7)
          order by sequence limit $4",
    )
    .bind(aggregate_type)
    .bind(id)
    .bind(after_sequence)
    .bind(limit as i64 + 1)
    .bind(position.map(|p| p.transaction_id.to_string()))
    .bind(position.map_or(0, |p| p.global_position))
    .bind(until.filter(|u| u.position.is_none()).map(|u| u.time))
    .fetch_all(pool)
    .await
    .map_err(database)?;
    let mut connection = Connection::new(after.is_some(), rows.len() > limit);
    for row in rows.iter().take(limit) {
        let event = ledger::log::decode_event(row).map_err(database)?;
        connection.edges.push(Edge::new(event.sequence.to_string(), Event::from(&event)));
    }
    Ok(connection)
}

fn encode_order_cursor(placed_at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}_{}", placed_at.timestamp_micros(), id.simple())
}

fn decode_order_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid)> {
    let (micros, id) = cursor.split_once('_').ok_or_else(|| invalid("bad cursor"))?;
    let micros: i64 = micros.parse().map_err(|_| invalid("bad cursor"))?;
    let time = DateTime::from_timestamp_micros(micros).ok_or_else(|| invalid("bad cursor"))?;
    Ok((time, Uuid::parse_str(id).map_err(|_| invalid("bad cursor"))?))
}

#[derive(Default)]
pub struct PortfolioQuery;

#[Object]
impl PortfolioQuery {
    /// The portfolios the token may see — a trader's own, every portfolio for auditors and admins — oldest first:
    /// the first 100, or `first` (at most 1,000).
    #[graphql(complexity = "super::my_portfolios_limit(first) * child_complexity")]
    async fn my_portfolios(&self, ctx: &Context<'_>, first: Option<i32>) -> Result<Vec<Portfolio>> {
        let limit = super::my_portfolios_limit(first) as i64;
        let principal = principal(ctx)?;
        let state = state(ctx);
        let rows: Vec<PortfolioRow> = match principal.role {
            crate::auth::Role::Trader => {
                sqlx::query_as(&format!(
                    "select {PORTFOLIO_COLUMNS} from rm_portfolios where owner = $1 order by opened_at, portfolio_id limit $2"
                ))
                .bind(&principal.subject)
                .bind(limit)
                .fetch_all(&state.pool)
                .await
            }
            crate::auth::Role::Auditor | crate::auth::Role::Admin => {
                sqlx::query_as(&format!(
                    "select {PORTFOLIO_COLUMNS} from rm_portfolios order by opened_at, portfolio_id limit $1"
                ))
                .bind(limit)
                .fetch_all(&state.pool)
                .await
            }
            crate::auth::Role::Broker => Ok(Vec::new()),
        }
        .map_err(database)?;
        Ok(rows.into_iter().map(Portfolio::from).collect())
    }

    /// One portfolio: live, or as it was at `asOf` / `atPosition` (replayed from its events). `waitFor` (a
    /// `lastPosition` returned by a mutation) makes the live view wait, at most 5 s, until it shows that
    /// position and what the process manager did in reaction (a fill booked, a reservation released); it
    /// answers `NOT_YET_VISIBLE` if that takes longer (the write is committed: ask again). An unknown portfolio
    /// and one the token may not read both answer null.
    async fn portfolio(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        as_of: Option<DateTime<Utc>>,
        at_position: Option<LogPosition>,
        wait_for: Option<LogPosition>,
    ) -> Result<Option<Portfolio>> {
        let principal = principal(ctx)?;
        if !principal.can_read_portfolios() {
            return Err(forbidden());
        }
        let state = state(ctx);
        let portfolio = match resolve_as_of(&state.pool, as_of, at_position).await? {
            Some(point) => load_as_of(&state.pool, id, point).await?,
            None => load_live(state, id, wait_for.map(|w| w.0)).await?,
        };
        Ok(portfolio.filter(|p| principal.can_read_portfolio(&p.owner)))
    }
}
