//! Market data: latest prices, history (ticks or one-minute bars), indicators, daily movers.

use async_graphql::{Context, Enum, Object, Result, SimpleObject};
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;

use ledger::queries::market::{self as queries, HistoryInterval, IndicatorRow, MoverRow, PricePointRow, PriceRow};

use super::errors::{database, invalid};
use super::{principal, state};

/// Symbols one `prices` query may ask for.
pub const SYMBOLS_PER_QUERY_MAX: usize = 100;
/// Points one `priceHistory` query may return.
pub const HISTORY_POINTS_MAX: usize = 1_000;

#[derive(SimpleObject, Clone, Debug)]
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
#[derive(SimpleObject, Clone, Debug)]
pub struct PricePoint {
    pub time: DateTime<Utc>,
    pub open: Decimal,
    pub high: Decimal,
    pub low: Decimal,
    pub close: Decimal,
    pub volume: Decimal,
    pub ticks: i32,
}

#[derive(SimpleObject, Clone, Debug)]
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

#[derive(SimpleObject, Clone, Debug)]
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

impl From<PriceRow> for Price {
    fn from(row: PriceRow) -> Self {
        Price { symbol: row.symbol, price: row.price, as_of: row.as_of, seq: row.seq }
    }
}

impl From<Interval> for HistoryInterval {
    fn from(interval: Interval) -> Self {
        match interval {
            Interval::Tick => HistoryInterval::Tick,
            Interval::Minute => HistoryInterval::Minute,
        }
    }
}

impl From<PricePointRow> for PricePoint {
    fn from(row: PricePointRow) -> Self {
        let PricePointRow { time, open, high, low, close, volume, ticks } = row;
        PricePoint { time, open, high, low, close, volume, ticks }
    }
}

impl From<IndicatorRow> for Indicator {
    fn from(row: IndicatorRow) -> Self {
        let IndicatorRow { symbol, indicator, window_size, value, samples, as_of } = row;
        Indicator { symbol, indicator, window_size, value, samples, as_of }
    }
}

impl From<MoverRow> for Mover {
    fn from(row: MoverRow) -> Self {
        let MoverRow { symbol, open_price, last_price, high, low, change_pct } = row;
        Mover { symbol, open_price, last_price, high, low, change_pct }
    }
}

/// Rows as the GraphQL type they map to.
fn mapped<R, T: From<R>>(rows: Vec<R>) -> Vec<T> {
    rows.into_iter().map(T::from).collect()
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
        let rows = queries::latest_prices(&state(ctx).pool, symbols.as_deref()).await.map_err(database)?;
        Ok(mapped(rows))
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
        let rows = queries::price_history(&state(ctx).pool, &symbol, interval.into(), limit).await.map_err(database)?;
        Ok(mapped(rows))
    }

    /// SMA and EMA values of a symbol, per window.
    async fn indicators(&self, ctx: &Context<'_>, symbol: String) -> Result<Vec<Indicator>> {
        principal(ctx)?;
        Ok(mapped(queries::indicators(&state(ctx).pool, &symbol).await.map_err(database)?))
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
        let movers = queries::movers(&state(ctx).pool, trading_day, limit).await.map_err(database)?;
        Ok(movers.map(|m| Movers { trading_day: m.trading_day, gainers: mapped(m.gainers), losers: mapped(m.losers) }))
    }
}
