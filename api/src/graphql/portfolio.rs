//! Portfolios: the live view from the read models, or — with `asOf` / `atPosition` — the state as it was then,
//! replayed from the aggregate's own events (time travel).

use async_graphql::connection::{Connection, Edge};
use async_graphql::dataloader::DataLoader;
use async_graphql::{Context, Object, Result};
use chrono::{DateTime, Utc};
use ledger::domain::Portfolio as PortfolioAggregate;
use ledger::log::AsOf;
use ledger::queries::market::prices_as_of;
use ledger::queries::orders::{portfolio_executions, portfolio_orders, OrderFilter};
use ledger::queries::performance::{performance, Interval, Performance, PerformanceError};
use ledger::queries::portfolios::{alert_firings, alert_rules, portfolios, PortfolioRow};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use ledger::projections::visibility::ReadModel;

use super::as_of::{aggregate_history, resolve_as_of};
use super::errors::{database, forbidden, internal, invalid, not_found};
use super::orders::Order;
use super::scalars::LogPosition;
use super::types::{
    AlertFiring, AlertRule, CostBasisMethodGql, Event, Execution, Loaders, Position, PositionsOf, Valuation,
};
use super::{page_size, principal, state};

/// Longest a query waits for a read model to reach `waitFor`.
pub const READ_WAIT_MS_MAX: u64 = 5_000;

pub struct Portfolio {
    /// The read model's row (live), or the one the aggregate's state makes (time travel, or not projected yet).
    pub row: PortfolioRow,
    pub cost_basis_method: CostBasisMethodGql,
    /// Time travel: the point asked for, and the positions as they were.
    pub as_of: Option<(AsOf, Vec<Position>)>,
}

impl Portfolio {
    fn new(row: PortfolioRow, as_of: Option<(AsOf, Vec<Position>)>) -> Result<Self> {
        let cost_basis_method = CostBasisMethodGql::parse(&row.cost_basis_method).map_err(internal)?;
        Ok(Portfolio { row, cost_basis_method, as_of })
    }
}

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
    let row = ledger::queries::portfolios::portfolio(pool, id).await.map_err(database)?;
    match row {
        Some(row) => Ok(Some(Portfolio::new(row, None)?)),
        None => load_as_of(pool, id, AsOf::time(now)).await,
    }
}

/// Replays the portfolio's events up to `as_of`; `None` if it did not exist yet.
pub async fn load_as_of(pool: &PgPool, id: Uuid, as_of: AsOf) -> Result<Option<Portfolio>> {
    let (aggregate, last_position) =
        ledger::log::replay_as_of::<PortfolioAggregate>(pool, &id.to_string(), &as_of).await.map_err(database)?;
    let Some(row) = PortfolioRow::of_aggregate(id, &aggregate, last_position, as_of.time) else { return Ok(None) };
    let positions = aggregate.positions.iter().map(|(symbol, p)| Position::of(symbol, p)).collect();
    Ok(Some(Portfolio::new(row, Some((as_of, positions)))?))
}

#[Object]
impl Portfolio {
    async fn id(&self) -> Uuid {
        self.row.portfolio_id
    }

    async fn owner(&self) -> &str {
        &self.row.owner
    }

    async fn base_currency(&self) -> &str {
        &self.row.base_currency
    }

    async fn cost_basis_method(&self) -> CostBasisMethodGql {
        self.cost_basis_method
    }

    async fn cash(&self) -> Decimal {
        self.row.cash
    }

    /// Cash promised to open buy orders.
    async fn reserved(&self) -> Decimal {
        self.row.reserved_cash
    }

    /// cash − reserved: what withdrawals and new buys may use. Negative while the portfolio is in deficit.
    async fn buying_power(&self) -> Decimal {
        self.row.cash - self.row.reserved_cash
    }

    /// How much cash is missing (reserved − cash), zero when none. A fill is booked whatever it costs (fills
    /// are facts), so a fee beyond the order's reservation with the rest of the cash committed can leave the
    /// portfolio short; until a deposit, a sell or a cancel covers it, withdrawals and new buys are refused
    /// (`PORTFOLIO_IN_DEFICIT`). See docs/accounting.md.
    async fn deficit(&self) -> Decimal {
        (self.row.reserved_cash - self.row.cash).max(Decimal::ZERO)
    }

    async fn realized_pnl(&self) -> Decimal {
        self.row.realized_pnl
    }

    async fn opened_at(&self) -> DateTime<Utc> {
        self.row.opened_at
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.row.updated_at
    }

    /// Global position of the last event reflected here.
    async fn last_position(&self) -> i64 {
        self.row.last_position
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
            .load_one(PositionsOf(self.row.portfolio_id))
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
            let prices = prices_as_of(&state.pool, &symbols, as_of.time).await.map_err(database)?;
            let valuation = ledger::projections::valuation::PortfolioValuation::compose(
                self.row.portfolio_id,
                self.row.cash,
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
        let valuation = ledger::projections::valuation::portfolio_valuation(
            &state.pool,
            self.row.portfolio_id,
            state.valuation_stale_after,
            now,
        )
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
        let filter = OrderFilter {
            before: cursor,
            statuses: status.map(|s| s.iter().map(|s| s.as_str().to_string()).collect()),
            placed_by: self.as_of.as_ref().map(|(a, _)| a.time),
        };
        let rows =
            portfolio_orders(&state.pool, self.row.portfolio_id, &filter, limit as i64 + 1).await.map_err(database)?;
        let mut connection = Connection::new(after.is_some(), rows.len() > limit);
        for row in rows.into_iter().take(limit) {
            let cursor = encode_order_cursor(row.placed_at, row.order_id);
            let order = match &self.as_of {
                Some((as_of, _)) => super::orders::load_as_of(&state.pool, row.order_id, *as_of).await?,
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
        let executed_by = self.as_of.as_ref().map(|(a, _)| a.time);
        let rows = portfolio_executions(&state.pool, self.row.portfolio_id, before, executed_by, limit as i64 + 1)
            .await
            .map_err(database)?;
        let mut connection = Connection::new(after.is_some(), rows.len() > limit);
        connection
            .edges
            .extend(rows.into_iter().take(limit).map(|row| Edge::new(row.global_position.to_string(), row.into())));
        Ok(connection)
    }

    /// The portfolio's alert rules (at most 100 live ones).
    #[graphql(complexity = "ledger::domain::portfolio::ALERTS_PER_PORTFOLIO_MAX * child_complexity")]
    async fn alert_rules(&self, ctx: &Context<'_>) -> Result<Vec<AlertRule>> {
        let rows = alert_rules(&state(ctx).pool, self.row.portfolio_id).await.map_err(database)?;
        Ok(rows.into_iter().map(AlertRule::from).collect())
    }

    /// Firings, newest first (at most one per arming of each rule).
    #[graphql(complexity = "super::page_size(first) * child_complexity")]
    async fn alert_firings(&self, ctx: &Context<'_>, first: Option<i32>) -> Result<Vec<AlertFiring>> {
        let rows =
            alert_firings(&state(ctx).pool, self.row.portfolio_id, page_size(first) as i64).await.map_err(database)?;
        Ok(rows.into_iter().map(AlertFiring::from).collect())
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
        aggregate_history(&state(ctx).pool, "Portfolio", &self.row.portfolio_id.to_string(), until, first, after).await
    }
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
        let owner = match principal.role {
            crate::auth::Role::Trader => Some(principal.subject.as_str()),
            crate::auth::Role::Auditor | crate::auth::Role::Admin => None,
            crate::auth::Role::Broker => return Ok(Vec::new()),
        };
        let rows = portfolios(&state.pool, owner, limit).await.map_err(database)?;
        rows.into_iter().map(|row| Portfolio::new(row, None)).collect()
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
        Ok(portfolio.filter(|p| principal.can_read_portfolio(&p.row.owner)))
    }

    /// A portfolio's performance from `from` to `to` (default: now), a point every `interval` (default `DAY`)
    /// and one at `to`: equity, cash, market value, net deposits and the time-weighted return so far at each
    /// point; for the period the time-weighted return (deposits and withdrawals taken out), the money-weighted
    /// return (XIRR) and the maximum drawdown, defined with a worked example in docs/performance.md. `from`
    /// defaults to 500 intervals before `to`, not before the portfolio opened; at most 2,000 points
    /// (`INVALID_INPUT` beyond). Prices at a time are the last one-minute bar closed by then (or the portfolio's
    /// own later fill). `waitFor` as for `portfolio`. Null for an unknown portfolio, one the token may not
    /// read, or one the read model has not seen yet.
    async fn performance(
        &self,
        ctx: &Context<'_>,
        portfolio_id: Uuid,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        #[graphql(default_with = "Interval::Day")] interval: Interval,
        wait_for: Option<LogPosition>,
    ) -> Result<Option<Performance>> {
        let principal = principal(ctx)?;
        if !principal.can_read_portfolios() {
            return Err(forbidden());
        }
        let state = state(ctx);
        match super::orders::portfolio_owner(state, portfolio_id).await? {
            Some(owner) if principal.can_read_portfolio(&owner) => {}
            _ => return Ok(None),
        }
        if let Some(position) = wait_for {
            super::wait_visible(state, ReadModel::Performance, &portfolio_id.to_string(), position.0).await?;
        }
        let now = state.clock.now();
        match performance(&state.pool, portfolio_id, from, to, interval, now).await {
            Ok(answer) => Ok(answer),
            Err(PerformanceError::Invalid(reason)) => Err(invalid(reason)),
            Err(PerformanceError::Database(error)) => Err(database(error)),
        }
    }
}
