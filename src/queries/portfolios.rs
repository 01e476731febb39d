//! Portfolio reads: the `positions` read model (portfolios, positions, open lots), portfolios in deficit (for
//! operators), and the `alerts` read model (rules and firings).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{FromRow, PgPool, Row};
use uuid::Uuid;

use crate::domain::Portfolio;
use crate::log::LogPosition;

/// Portfolios listed per page at most.
pub const DEFICIT_PAGE_MAX: i64 = 1_000;

/// A portfolio whose buying power is below zero (see `domain::portfolio`, "Fills are facts").
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DeficitRow {
    pub portfolio_id: Uuid,
    pub owner: String,
    pub cash: Decimal,
    pub reserved_cash: Decimal,
    /// reserved − cash.
    pub deficit: Decimal,
    pub updated_at: DateTime<Utc>,
}

/// Portfolios in deficit, by id, after `after`.
pub async fn in_deficit(pool: &PgPool, after: Option<Uuid>, limit: i64) -> Result<Vec<DeficitRow>, sqlx::Error> {
    sqlx::query_as(
        "select portfolio_id, owner, cash, reserved_cash, reserved_cash - cash as deficit, updated_at
           from rm_portfolios
          where reserved_cash > cash and ($1::uuid is null or portfolio_id > $1)
          order by portfolio_id limit $2",
    )
    .bind(after)
    .bind(limit.clamp(1, DEFICIT_PAGE_MAX))
    .fetch_all(pool)
    .await
}

/// How many portfolios are in deficit, and by how much in all.
pub async fn deficit_totals(pool: &PgPool) -> Result<(i64, Decimal), sqlx::Error> {
    sqlx::query_as(
        "select count(*), coalesce(sum(reserved_cash - cash), 0) from rm_portfolios where reserved_cash > cash",
    )
    .fetch_one(pool)
    .await
}

/// One open lot of a position (FIFO order: oldest first).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LotRow {
    pub portfolio_id: Uuid,
    pub symbol: String,
    pub lot_id: String,
    pub quantity: Decimal,
    pub cost: Decimal,
    pub acquired_at: DateTime<Utc>,
}

/// The open lots of these portfolios, per portfolio and symbol oldest first.
pub async fn open_lots(pool: &PgPool, portfolio_ids: &[Uuid]) -> Result<Vec<LotRow>, sqlx::Error> {
    sqlx::query_as(
        "select portfolio_id, symbol, lot_id, quantity, cost, acquired_at from rm_lots
          where portfolio_id = any($1) and quantity > 0
          order by portfolio_id, symbol, acquired_at, lot_id",
    )
    .bind(portfolio_ids)
    .fetch_all(pool)
    .await
}

/// One row of `rm_portfolios`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PortfolioRow {
    pub portfolio_id: Uuid,
    pub owner: String,
    pub base_currency: String,
    pub cost_basis_method: String,
    pub cash: Decimal,
    pub reserved_cash: Decimal,
    pub realized_pnl: Decimal,
    pub opened_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_position: i64,
}

const PORTFOLIO_COLUMNS: &str = "portfolio_id, owner, base_currency, cost_basis_method, cash, reserved_cash,
    realized_pnl, opened_at, updated_at, last_position";

impl PortfolioRow {
    /// The row of an aggregate's state (`None` before the portfolio was opened); `last_position` is the global
    /// position of the last event it reflects, `updated_at` the time it is as of.
    pub fn of_aggregate(
        id: Uuid,
        portfolio: &Portfolio,
        last_position: i64,
        updated_at: DateTime<Utc>,
    ) -> Option<PortfolioRow> {
        let terms = portfolio.terms.as_ref()?;
        Some(PortfolioRow {
            portfolio_id: id,
            owner: terms.owner.to_string(),
            base_currency: terms.base_currency.to_string(),
            cost_basis_method: terms.cost_basis_method.as_str().into(),
            cash: portfolio.cash,
            reserved_cash: portfolio.reserved_cash,
            realized_pnl: portfolio.realized_pnl,
            opened_at: terms.opened_at,
            updated_at,
            last_position,
        })
    }
}

/// One portfolio's row.
pub async fn portfolio(pool: &PgPool, portfolio_id: Uuid) -> Result<Option<PortfolioRow>, sqlx::Error> {
    sqlx::query_as(&format!("select {PORTFOLIO_COLUMNS} from rm_portfolios where portfolio_id = $1"))
        .bind(portfolio_id)
        .fetch_optional(pool)
        .await
}

/// Up to `limit` portfolios, oldest first: those of `owner`, or every one when `None`.
pub async fn portfolios(pool: &PgPool, owner: Option<&str>, limit: i64) -> Result<Vec<PortfolioRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "select {PORTFOLIO_COLUMNS} from rm_portfolios
          where $1::text is null or owner = $1 order by opened_at, portfolio_id limit $2"
    ))
    .bind(owner)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// One position of a portfolio.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PositionRow {
    pub portfolio_id: Uuid,
    pub symbol: String,
    pub quantity: Decimal,
    pub reserved_quantity: Decimal,
    pub cost_basis: Decimal,
    pub fifo_cost_basis: Decimal,
    pub realized_pnl: Decimal,
}

/// The positions of these portfolios, per portfolio by symbol.
pub async fn positions(pool: &PgPool, portfolio_ids: &[Uuid]) -> Result<Vec<PositionRow>, sqlx::Error> {
    sqlx::query_as(
        "select portfolio_id, symbol, quantity, reserved_quantity, cost_basis, fifo_cost_basis, realized_pnl
           from rm_positions where portfolio_id = any($1) order by portfolio_id, symbol",
    )
    .bind(portfolio_ids)
    .fetch_all(pool)
    .await
}

/// One alert rule of a portfolio.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AlertRuleRow {
    pub alert_id: Uuid,
    pub portfolio_id: Uuid,
    pub kind: String,
    pub symbol: String,
    pub condition: serde_json::Value,
    pub arming: i32,
    pub status: String,
}

/// A portfolio's alert rules, oldest first.
pub async fn alert_rules(pool: &PgPool, portfolio_id: Uuid) -> Result<Vec<AlertRuleRow>, sqlx::Error> {
    sqlx::query_as(
        "select alert_id, portfolio_id, kind, symbol, condition, arming, status from rm_alert_rules
          where portfolio_id = $1 order by created_at, alert_id",
    )
    .bind(portfolio_id)
    .fetch_all(pool)
    .await
}

/// One firing of an alert rule.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AlertFiringRow {
    pub firing_id: Uuid,
    pub alert_id: Uuid,
    pub portfolio_id: Uuid,
    pub arming: i32,
    pub kind: String,
    pub symbol: String,
    pub price: Decimal,
    /// The price, % change or P&L that met the condition.
    pub observed_value: Decimal,
    pub fired_at: DateTime<Utc>,
}

/// Up to `limit` firings after `after` in commit-safe order (see `migrations/0010_alert_firing_order.sql`): only
/// firings of transactions older than every running one, so none can commit behind the last one returned. All
/// portfolios' firings, or one portfolio's. Each with its position in that order (`transaction_id:position`).
pub async fn firings_after(
    pool: &PgPool,
    portfolio_id: Option<Uuid>,
    after: LogPosition,
    limit: i64,
) -> Result<Vec<(LogPosition, AlertFiringRow)>, sqlx::Error> {
    let rows = sqlx::query(
        "select transaction_id::text as transaction_id_text, position, firing_id, alert_id, portfolio_id, arming,
                kind, symbol, price, observed_value, fired_at
           from alert_firings
          where ($1::uuid is null or portfolio_id = $1)
            and (transaction_id, position) > ($2::text::xid8, $3)
            and transaction_id < pg_snapshot_xmin(pg_current_snapshot())
          order by transaction_id, position limit $4",
    )
    .bind(portfolio_id)
    .bind(after.transaction_id.to_string())
    .bind(after.global_position)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            let position = LogPosition::from_columns(row.try_get("transaction_id_text")?, row.try_get("position")?)?;
            Ok((position, AlertFiringRow::from_row(row)?))
        })
        .collect()
}

/// The position of the newest firing below the horizon (where a follower that delivers only new firings starts).
pub async fn firings_head(pool: &PgPool) -> Result<LogPosition, sqlx::Error> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "select transaction_id::text, position from alert_firings
          where transaction_id < pg_snapshot_xmin(pg_current_snapshot())
          order by transaction_id desc, position desc limit 1",
    )
    .fetch_optional(pool)
    .await?;
    row.map_or(Ok(LogPosition::START), |(transaction_id, position)| {
        LogPosition::from_columns(&transaction_id, position)
    })
}

/// Up to `limit` firings of a portfolio's alerts, newest first.
pub async fn alert_firings(pool: &PgPool, portfolio_id: Uuid, limit: i64) -> Result<Vec<AlertFiringRow>, sqlx::Error> {
    sqlx::query_as(
        "select firing_id, alert_id, portfolio_id, arming, kind, symbol, price, observed_value, fired_at
           from alert_firings where portfolio_id = $1 order by fired_at desc limit $2",
    )
    .bind(portfolio_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}
