//! Portfolio reads beyond the one-row lookups: portfolios in deficit (for operators) and open lots.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

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
