//! Market-data reads: latest prices, a symbol's history (ticks or one-minute bars), indicators, daily movers.
//! The tables are the `prices` and `analytics` projections'.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::PgPool;

/// Latest prices one read returns at most.
pub const LATEST_PRICES_MAX: i64 = 1_000;

/// A symbol's latest price.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject), graphql(name = "Price"))]
pub struct PriceRow {
    pub symbol: String,
    pub price: Decimal,
    /// Time of the tick.
    pub as_of: DateTime<Utc>,
    pub seq: i64,
}

/// The latest prices of `symbols` (of every symbol when `None`, at most [`LATEST_PRICES_MAX`]), by symbol.
pub async fn latest_prices(pool: &PgPool, symbols: Option<&[String]>) -> Result<Vec<PriceRow>, sqlx::Error> {
    sqlx::query_as(
        "select symbol, price, as_of, seq from latest_prices
          where $1::text[] is null or symbol = any($1) order by symbol
          limit case when $1::text[] is null then $2 end",
    )
    .bind(symbols)
    .bind(LATEST_PRICES_MAX)
    .fetch_all(pool)
    .await
}

/// The grain of a price history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryInterval {
    /// Every tick kept.
    Tick,
    /// One-minute OHLC bars.
    Minute,
}

/// One point of a price history: a tick (open = high = low = close) or a bar.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject), graphql(name = "PricePoint"))]
pub struct PricePointRow {
    pub time: DateTime<Utc>,
    pub open: Decimal,
    pub high: Decimal,
    pub low: Decimal,
    pub close: Decimal,
    pub volume: Decimal,
    pub ticks: i32,
}

/// The newest `limit` points of `symbol`'s history, oldest first.
pub async fn price_history(
    pool: &PgPool,
    symbol: &str,
    interval: HistoryInterval,
    limit: i64,
) -> Result<Vec<PricePointRow>, sqlx::Error> {
    let query = match interval {
        HistoryInterval::Tick => {
            "select * from (select ts as time, price as open, price as high, price as low, price as close,
                                   coalesce(volume, 0) as volume, 1 as ticks
                              from price_ticks where symbol = $1 order by ts desc, seq desc limit $2) newest
              order by time"
        }
        HistoryInterval::Minute => {
            "select * from (select minute as time, open, high, low, close, volume, ticks
                              from price_bars_1m where symbol = $1 order by minute desc limit $2) newest
              order by time"
        }
    };
    sqlx::query_as(query).bind(symbol).bind(limit).fetch_all(pool).await
}

/// An indicator's value for one symbol and window.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject), graphql(name = "Indicator"))]
pub struct IndicatorRow {
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

/// The indicators of `symbol`, by indicator and window.
pub async fn indicators(pool: &PgPool, symbol: &str) -> Result<Vec<IndicatorRow>, sqlx::Error> {
    sqlx::query_as(
        "select symbol, indicator, window_size, value, samples, as_of from rm_indicators
          where symbol = $1 order by indicator, window_size",
    )
    .bind(symbol)
    .fetch_all(pool)
    .await
}

/// A symbol's move over one trading day.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject), graphql(name = "Mover"))]
pub struct MoverRow {
    pub symbol: String,
    pub open_price: Decimal,
    pub last_price: Decimal,
    pub high: Decimal,
    pub low: Decimal,
    /// Change since the trading day's open, in percent.
    pub change_pct: Decimal,
}

/// The top gainers and losers of a trading day.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject), graphql(name = "Movers"))]
pub struct MoversRows {
    pub trading_day: NaiveDate,
    pub gainers: Vec<MoverRow>,
    pub losers: Vec<MoverRow>,
}

/// The `limit` biggest gainers and losers of `trading_day` (the latest day with data when `None`); `None` when
/// there is no data.
pub async fn movers(
    pool: &PgPool,
    trading_day: Option<NaiveDate>,
    limit: i64,
) -> Result<Option<MoversRows>, sqlx::Error> {
    let day: Option<NaiveDate> = match trading_day {
        Some(day) => Some(day),
        None => sqlx::query_scalar("select max(trading_day) from rm_daily_stats").fetch_one(pool).await?,
    };
    let Some(day) = day else { return Ok(None) };
    let select = |order: &'static str| {
        format!(
            "select symbol, open_price, last_price, high, low, change_pct from rm_daily_stats
              where trading_day = $1 order by change_pct {order}, symbol limit $2"
        )
    };
    let gainers = sqlx::query_as(&select("desc")).bind(day).bind(limit).fetch_all(pool).await?;
    let losers = sqlx::query_as(&select("asc")).bind(day).bind(limit).fetch_all(pool).await?;
    Ok(Some(MoversRows { trading_day: day, gainers, losers }))
}

/// The price of each of `symbols` as of `time`, from the tick archive (the last tick at or before it, with its
/// time), for time travel; a symbol without a tick by then is missing.
pub async fn prices_as_of(
    pool: &PgPool,
    symbols: &[String],
    time: DateTime<Utc>,
) -> Result<BTreeMap<String, (Decimal, DateTime<Utc>)>, sqlx::Error> {
    let rows: Vec<(String, Decimal, DateTime<Utc>)> = sqlx::query_as(
        "select distinct on (symbol) symbol, price, ts from market_ticks
          where symbol = any($1) and ts <= $2 order by symbol, ts desc, seq desc",
    )
    .bind(symbols)
    .bind(time)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(symbol, price, ts)| (symbol, (price, ts))).collect())
}
