//! Valuations read from the `rm_position_valuations` view: per position and per portfolio, with the price's
//! time, a `stale` flag when it is older than the configured age, and no value at all (with a reason) when no
//! price was ever seen — never a valuation at 0.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// Default age after which a price is stale.
pub const VALUATION_STALE_AFTER_MS_DEFAULT: u64 = 60_000;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionValuation {
    pub symbol: String,
    pub quantity: Decimal,
    pub cost_basis: Decimal,
    pub realized_pnl: Decimal,
    pub last_price: Option<Decimal>,
    pub price_as_of: Option<DateTime<Utc>>,
    pub market_value: Option<Decimal>,
    pub unrealized_pnl: Option<Decimal>,
    pub stale: bool,
    /// Why there is no value (`NO_PRICE`).
    pub missing_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortfolioValuation {
    pub portfolio_id: Uuid,
    pub cash: Decimal,
    pub positions: Vec<PositionValuation>,
    /// Σ market values; `None` when any position has no price.
    pub market_value: Option<Decimal>,
    pub unrealized_pnl: Option<Decimal>,
    /// cash + market value; `None` when any position has no price.
    pub total_equity: Option<Decimal>,
    /// True when any position's price is stale.
    pub stale: bool,
    pub missing_reason: Option<String>,
}

impl PositionValuation {
    /// A position valued at `price` (price and its time), or reported as missing a price.
    pub fn at_price(
        symbol: &str,
        quantity: Decimal,
        cost_basis: Decimal,
        realized_pnl: Decimal,
        price: Option<(Decimal, DateTime<Utc>)>,
        stale_after: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Self {
        let market_value = price.map(|(p, _)| quantity * p);
        PositionValuation {
            symbol: symbol.to_string(),
            quantity,
            cost_basis,
            realized_pnl,
            last_price: price.map(|(p, _)| p),
            price_as_of: price.map(|(_, at)| at),
            market_value,
            unrealized_pnl: market_value.map(|v| v - cost_basis),
            stale: price.is_some_and(|(_, at)| now - at > stale_after),
            missing_reason: price.is_none().then(|| "NO_PRICE".to_string()),
        }
    }
}

impl PortfolioValuation {
    /// Totals over valued positions: null (with a reason) as soon as one position has no price.
    pub fn compose(portfolio_id: Uuid, cash: Decimal, positions: Vec<PositionValuation>) -> Self {
        let missing: Vec<&str> =
            positions.iter().filter(|p| p.market_value.is_none()).map(|p| p.symbol.as_str()).collect();
        let (market_value, unrealized_pnl, missing_reason) = if missing.is_empty() {
            (
                Some(positions.iter().filter_map(|p| p.market_value).sum()),
                Some(positions.iter().filter_map(|p| p.unrealized_pnl).sum()),
                None,
            )
        } else {
            (None, None, Some(format!("NO_PRICE: {}", missing.join(", "))))
        };
        PortfolioValuation {
            portfolio_id,
            cash,
            stale: positions.iter().any(|p| p.stale),
            total_equity: market_value.map(|v| v + cash),
            market_value,
            unrealized_pnl,
            missing_reason,
            positions,
        }
    }
}

/// The valuation of a portfolio at `now`, or `None` if the portfolio is unknown to the read model.
pub async fn portfolio_valuation(
    pool: &PgPool,
    portfolio_id: Uuid,
    stale_after: chrono::Duration,
    now: DateTime<Utc>,
) -> Result<Option<PortfolioValuation>, sqlx::Error> {
    let Some(cash) = sqlx::query_scalar::<_, Decimal>("select cash from rm_portfolios where portfolio_id = $1")
        .bind(portfolio_id)
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };
    type Row = (
        String,
        Decimal,
        Decimal,
        Decimal,
        Option<Decimal>,
        Option<DateTime<Utc>>,
        Option<Decimal>,
        Option<Decimal>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "select symbol, quantity, cost_basis, realized_pnl, last_price, price_as_of, market_value, unrealized_pnl,
                missing_reason
           from rm_position_valuations where portfolio_id = $1 order by symbol",
    )
    .bind(portfolio_id)
    .fetch_all(pool)
    .await?;
    let positions: Vec<PositionValuation> = rows
        .into_iter()
        .map(|(symbol, quantity, cost_basis, realized_pnl, last_price, price_as_of, _, _, _)| {
            let price = last_price.zip(price_as_of);
            PositionValuation::at_price(&symbol, quantity, cost_basis, realized_pnl, price, stale_after, now)
        })
        .collect();
    Ok(Some(PortfolioValuation::compose(portfolio_id, cash, positions)))
}
