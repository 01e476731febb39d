//! Market data: latest prices, history (ticks or one-minute bars), indicators, daily movers. The rows the
//! library reads are the GraphQL types themselves (`Price`, `PricePoint`, `Indicator`, `Mover`, `Movers`; the
//! library's `graphql` feature derives them), so this module only checks arguments and limits.

use async_graphql::{Context, Enum, Object, Result};
use chrono::NaiveDate;

use ledger::queries::market::{
    self as queries, HistoryInterval, IndicatorRow as Indicator, MoversRows as Movers, PricePointRow as PricePoint,
    PriceRow as Price,
};

use super::errors::{database, invalid};
use super::{principal, state};

/// Symbols one `prices` query may ask for.
pub const SYMBOLS_PER_QUERY_MAX: usize = 100;
/// Points one `priceHistory` query may return.
pub const HISTORY_POINTS_MAX: usize = 1_000;

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum Interval {
    /// Every tick kept (the newest ones).
    Tick,
    /// One-minute OHLC bars.
    Minute,
}

impl From<Interval> for HistoryInterval {
    fn from(interval: Interval) -> Self {
        match interval {
            Interval::Tick => HistoryInterval::Tick,
            Interval::Minute => HistoryInterval::Minute,
        }
    }
}

#[derive(Default)]
pub struct MarketQuery;

#[Object]
impl MarketQuery {
    /// Latest prices of `symbols` (of every symbol when omitted).
    async fn prices(&self, ctx: &Context<'_>, symbols: Option<Vec<String>>) -> Result<Vec<Price>> {
        principal(ctx)?;
        if symbols.as_ref().is_some_and(|s| s.len() > SYMBOLS_PER_QUERY_MAX) {
            return Err(invalid(format!("at most {SYMBOLS_PER_QUERY_MAX} symbols per query")));
        }
        queries::latest_prices(&state(ctx).pool, symbols.as_deref()).await.map_err(database)
    }

    /// The newest `limit` points of a symbol's history, oldest first.
    async fn price_history(
        &self,
        ctx: &Context<'_>,
        symbol: String,
        interval: Interval,
        limit: Option<i32>,
    ) -> Result<Vec<PricePoint>> {
        principal(ctx)?;
        let limit = limit.unwrap_or(100).clamp(1, HISTORY_POINTS_MAX as i32) as i64;
        queries::price_history(&state(ctx).pool, &symbol, interval.into(), limit).await.map_err(database)
    }

    /// SMA and EMA values of a symbol, per window.
    async fn indicators(&self, ctx: &Context<'_>, symbol: String) -> Result<Vec<Indicator>> {
        principal(ctx)?;
        queries::indicators(&state(ctx).pool, &symbol).await.map_err(database)
    }

    /// Top gainers and losers since the open of `tradingDay` (UTC; default: the latest day with data).
    async fn movers(
        &self,
        ctx: &Context<'_>,
        trading_day: Option<NaiveDate>,
        limit: Option<i32>,
    ) -> Result<Option<Movers>> {
        principal(ctx)?;
        let limit = limit.unwrap_or(5).clamp(1, 50) as i64;
        queries::movers(&state(ctx).pool, trading_day, limit).await.map_err(database)
    }
}
