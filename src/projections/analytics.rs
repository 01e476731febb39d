//! Moving averages and daily movers: SMA and EMA over configured windows (in ticks), and per trading day (UTC)
//! the open, last, high, low and change since the open — from which top gainers and losers are read.
//!
//! SMA(n) is the mean of the last n prices (of fewer while fewer have been seen; `samples` says how many).
//! EMA(n) starts at the first price and moves by α = 2 / (n + 1) toward each new price. Values are rounded to
//! 8 decimals at every step, so a rebuild reproduces them exactly.

use async_trait::async_trait;
use rust_decimal::{Decimal, RoundingStrategy};
use sqlx::PgConnection;

use super::{ApplyError, Projection};
use crate::market::Tick;

pub struct AnalyticsProjection {
    pub windows: Vec<u32>,
}

fn round8(value: Decimal) -> Decimal {
    value.round_dp_with_strategy(8, RoundingStrategy::MidpointNearestEven).normalize()
}

#[async_trait]
impl Projection for AnalyticsProjection {
    fn name(&self) -> &'static str {
        "analytics"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["rm_indicators", "rm_daily_stats", "analytics_window"]
    }

    fn consumes_ticks(&self) -> bool {
        true
    }

    async fn apply_tick(&self, conn: &mut PgConnection, tick: &Tick) -> Result<(), ApplyError> {
        let symbol = tick.symbol.as_str();
        let price = tick.price.value();
        let longest = self.windows.iter().copied().max().unwrap_or(1) as i64;
        sqlx::query(
            "insert into analytics_window (symbol, ts, seq, price) values ($1, $2, $3, $4) on conflict do nothing",
        )
        .bind(symbol)
        .bind(tick.ts)
        .bind(tick.seq)
        .bind(price)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "delete from analytics_window w using (
                 select ts, seq from analytics_window where symbol = $1 order by ts desc, seq desc offset $2 limit 1
             ) cutoff
             where w.symbol = $1 and (w.ts, w.seq) <= (cutoff.ts, cutoff.seq)",
        )
        .bind(symbol)
        .bind(longest)
        .execute(&mut *conn)
        .await?;

        for &window in &self.windows {
            let (sum, samples): (Option<Decimal>, i64) = sqlx::query_as(
                "select sum(price), count(*) from (
                     select price from analytics_window where symbol = $1 order by ts desc, seq desc limit $2
                 ) last_prices",
            )
            .bind(symbol)
            .bind(window as i64)
            .fetch_one(&mut *conn)
            .await?;
            let sma = round8(sum.unwrap_or(price) / Decimal::from(samples.max(1)));
            upsert_indicator(conn, symbol, "SMA", window, sma, samples, tick).await?;

            let previous: Option<(Decimal, i32)> = sqlx::query_as(
                "select value, samples from rm_indicators where symbol = $1 and indicator = 'EMA' and window_size = $2",
            )
            .bind(symbol)
            .bind(window as i32)
            .fetch_optional(&mut *conn)
            .await?;
            let alpha = Decimal::TWO / Decimal::from(window + 1);
            let (ema, ema_samples) = match previous {
                None => (price, 1),
                Some((value, seen)) => (round8(alpha * price + (Decimal::ONE - alpha) * value), seen as i64 + 1),
            };
            upsert_indicator(conn, symbol, "EMA", window, ema, ema_samples, tick).await?;
        }

        let day = tick.ts.date_naive();
        sqlx::query(
            "insert into rm_daily_stats (symbol, trading_day, open_price, last_price, high, low, change_pct, ticks, updated_at)
             values ($1, $2, $3, $3, $3, $3, 0, 1, $4)
             on conflict (symbol, trading_day) do update
                set last_price = excluded.last_price,
                    high = greatest(rm_daily_stats.high, excluded.last_price),
                    low = least(rm_daily_stats.low, excluded.last_price),
                    change_pct = round((excluded.last_price - rm_daily_stats.open_price) * 100
                                       / rm_daily_stats.open_price, 4),
                    ticks = rm_daily_stats.ticks + 1,
                    updated_at = excluded.updated_at",
        )
        .bind(symbol)
        .bind(day)
        .bind(price)
        .bind(tick.ts)
        .execute(conn)
        .await?;
        Ok(())
    }
}

async fn upsert_indicator(
    conn: &mut PgConnection,
    symbol: &str,
    indicator: &str,
    window: u32,
    value: Decimal,
    samples: i64,
    tick: &Tick,
) -> Result<(), ApplyError> {
    sqlx::query(
        "insert into rm_indicators (symbol, indicator, window_size, value, samples, as_of)
         values ($1, $2, $3, $4, $5, $6)
         on conflict (symbol, indicator, window_size) do update
            set value = excluded.value, samples = excluded.samples, as_of = excluded.as_of",
    )
    .bind(symbol)
    .bind(indicator)
    .bind(window as i32)
    .bind(value)
    .bind(samples as i32)
    .bind(tick.ts)
    .execute(conn)
    .await?;
    Ok(())
}
