//! Market data: latest prices, history (ticks or one-minute bars), indicators, daily movers.

use async_graphql::{Context, Enum, Object, Result, SimpleObject};
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;

use super::errors::{database, invalid};
use super::{principal, state};

/// Symbols one `prices` query may ask for.
pub const SYMBOLS_PER_QUERY_MAX: usize = 100;
/// Points one `priceHistory` query may return.
pub const HISTORY_POINTS_MAX: usize = 1_000;

#[derive(SimpleObject, Clone, Debug, sqlx::FromRow)]
pub struct Price {
    pub symbol: String,
    pub price: Decimal,
    /// Time of the tick.
    pub as_of: DateTime<Utc>,
    pub seq: i64,
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum Interval {
    /// Every tick kept (the newest ones).
    Tick,
    /// One-minute OHLC bars.
    Minute,
}

/// One point of a price history: a tick (open = high = low = close) or a bar.
#[derive(SimpleObject, Clone, Debug, sqlx::FromRow)]
pub struct PricePoint {
    pub time: DateTime<Utc>,
    pub open: Decimal,
    pub high: Decimal,
    pub low: Decimal,
    pub close: Decimal,
    pub volume: Decimal,
    pub ticks: i32,
}

#[derive(SimpleObject, Clone, Debug, sqlx::FromRow)]
pub struct Indicator {
    pub symbol: String,
    /// `SMA` or `EMA`.
    pub indicator: String,
    /// In ticks.
    pub window_size: i32,
    pub value: Decimal,
    /// Ticks the value is based on (fewer than the window while it fills).
    pub samples: i32,
    pub as_of: DateTime<Utc>,
}

#[derive(SimpleObject, Clone, Debug, sqlx::FromRow)]
pub struct Mover {
    pub symbol: String,
    pub open_price: Decimal,
    pub last_price: Decimal,
    pub high: Decimal,
    pub low: Decimal,
    /// Change since the trading day's open, in percent.
    pub change_pct: Decimal,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Movers {
    pub trading_day: NaiveDate,
    pub gainers: Vec<Mover>,
    pub losers: Vec<Mover>,
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
        sqlx::query_as(
            "select symbol, price, as_of, seq from latest_prices
              where $1::text[] is null or symbol = any($1) order by symbol limit 1000",
        )
        .bind(symbols)
        .fetch_all(&state(ctx).pool)
        .await
        .map_err(database)
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
        let query = match interval {
            Interval::Tick => {
                "select * from (select ts as time, price as open, price as high, price as low, price as close,
                                       coalesce(volume, 0) as volume, 1 as ticks
                                  from price_ticks where symbol = $1 order by ts desc, seq desc limit $2) newest
                  order by time"
            }
            Interval::Minute => {
                "select * from (select minute as time, open, high, low, close, volume, ticks
                                  from price_bars_1m where symbol = $1 order by minute desc limit $2) newest
                  order by time"
            }
        };
        sqlx::query_as(query).bind(symbol).bind(limit).fetch_all(&state(ctx).pool).await.map_err(database)
    }

    /// SMA and EMA values of a symbol, per window.
    async fn indicators(&self, ctx: &Context<'_>, symbol: String) -> Result<Vec<Indicator>> {
        principal(ctx)?;
        sqlx::query_as(
            "select symbol, indicator, window_size, value, samples, as_of from rm_indicators
              where symbol = $1 order by indicator, window_size",
        )
        .bind(symbol)
        .fetch_all(&state(ctx).pool)
        .await
        .map_err(database)
    }

    /// Top gainers and losers since the open of `tradingDay` (UTC; default: the latest day with data).
    async fn movers(
        &self,
        ctx: &Context<'_>,
        trading_day: Option<NaiveDate>,
        limit: Option<i32>,
    ) -> Result<Option<Movers>> {
        principal(ctx)?;
        let pool = &state(ctx).pool;
        let limit = limit.unwrap_or(5).clamp(1, 50) as i64;
        let day: Option<NaiveDate> = match trading_day {
            Some(day) => Some(day),
            None => sqlx::query_scalar("select max(trading_day) from rm_daily_stats")
                .fetch_one(pool)
                .await
                .map_err(database)?,
        };
        let Some(day) = day else { return Ok(None) };
        let select = |order: &'static str| {
            format!(
                "select symbol, open_price, last_price, high, low, change_pct from rm_daily_stats
                  where trading_day = $1 order by change_pct {order}, symbol limit $2"
            )
        };
        let gainers = sqlx::query_as(&select("desc")).bind(day).bind(limit).fetch_all(pool).await.map_err(database)?;
        let losers = sqlx::query_as(&select("asc")).bind(day).bind(limit).fetch_all(pool).await.map_err(database)?;
        Ok(Some(Movers { trading_day: day, gainers, losers }))
    }
}
