//! Latest price per symbol, the last N ticks per symbol, and one-minute OHLC bars. Every tick it applies is
//! archived in `market_ticks` (by the applier, in the same transaction), which rebuilds replay.

use async_trait::async_trait;
use chrono::{DurationRound, TimeDelta};
use rust_decimal::Decimal;
use sqlx::PgConnection;

use super::{ApplyError, Projection};
use crate::market::Tick;

pub struct PricesProjection {
    /// Ticks kept per symbol in `price_ticks`.
    pub history_ticks: usize,
}

#[async_trait]
impl Projection for PricesProjection {
    fn name(&self) -> &'static str {
        "prices"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["latest_prices", "price_ticks", "price_bars_1m"]
    }

    fn consumes_ticks(&self) -> bool {
        true
    }

    /// `latest_prices` keeps the newest by `(as_of, seq)`, the history trims by time, and a bar's open and close
    /// are its earliest and latest ticks by `(ts, seq)`: a late tick lands where it belongs.
    fn applies_late_ticks(&self) -> bool {
        true
    }

    async fn apply_tick(&self, conn: &mut PgConnection, tick: &Tick) -> Result<(), ApplyError> {
        let symbol = tick.symbol.as_str();
        let price = tick.price.value();
        sqlx::query(
            "insert into latest_prices (symbol, price, as_of, seq) values ($1, $2, $3, $4)
             on conflict (symbol) do update set price = excluded.price, as_of = excluded.as_of, seq = excluded.seq
              where (latest_prices.as_of, latest_prices.seq) < (excluded.as_of, excluded.seq)",
        )
        .bind(symbol)
        .bind(price)
        .bind(tick.ts)
        .bind(tick.seq)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "insert into price_ticks (symbol, ts, seq, price, volume) values ($1, $2, $3, $4, $5)
             on conflict do nothing",
        )
        .bind(symbol)
        .bind(tick.ts)
        .bind(tick.seq)
        .bind(price)
        .bind(tick.volume)
        .execute(&mut *conn)
        .await?;
        // Keep the newest `history_ticks` of the symbol.
        sqlx::query(
            "delete from price_ticks t using (
                 select ts, seq from price_ticks where symbol = $1 order by ts desc, seq desc offset $2 limit 1
             ) cutoff
             where t.symbol = $1 and (t.ts, t.seq) <= (cutoff.ts, cutoff.seq)",
        )
        .bind(symbol)
        .bind(self.history_ticks as i64)
        .execute(&mut *conn)
        .await?;
        let minute = tick.ts.duration_trunc(TimeDelta::minutes(1)).map_err(|e| ApplyError::Poison(e.to_string()))?;
        sqlx::query(
            "insert into price_bars_1m (symbol, minute, open, high, low, close, volume, ticks,
                                        open_ts, open_seq, close_ts, close_seq)
             values ($1, $2, $3, $3, $3, $3, $4, 1, $5, $6, $5, $6)
             on conflict (symbol, minute) do update
                set high = greatest(price_bars_1m.high, excluded.high),
                    low = least(price_bars_1m.low, excluded.low),
                    open = case when (excluded.open_ts, excluded.open_seq) < (coalesce(price_bars_1m.open_ts, '-infinity'), coalesce(price_bars_1m.open_seq, 0)) then excluded.open else price_bars_1m.open end,
                    open_ts = case when (excluded.open_ts, excluded.open_seq) < (coalesce(price_bars_1m.open_ts, '-infinity'), coalesce(price_bars_1m.open_seq, 0)) then excluded.open_ts else price_bars_1m.open_ts end,
                    open_seq = case when (excluded.open_ts, excluded.open_seq) < (coalesce(price_bars_1m.open_ts, '-infinity'), coalesce(price_bars_1m.open_seq, 0)) then excluded.open_seq else price_bars_1m.open_seq end,
                    close = case when (excluded.close_ts, excluded.close_seq) >= (coalesce(price_bars_1m.close_ts, '-infinity'), coalesce(price_bars_1m.close_seq, 0)) then excluded.close else price_bars_1m.close end,
                    close_ts = case when (excluded.close_ts, excluded.close_seq) >= (coalesce(price_bars_1m.close_ts, '-infinity'), coalesce(price_bars_1m.close_seq, 0)) then excluded.close_ts else price_bars_1m.close_ts end,
                    close_seq = case when (excluded.close_ts, excluded.close_seq) >= (coalesce(price_bars_1m.close_ts, '-infinity'), coalesce(price_bars_1m.close_seq, 0)) then excluded.close_seq else price_bars_1m.close_seq end,
                    volume = price_bars_1m.volume + excluded.volume,
                    ticks = price_bars_1m.ticks + 1",
        )
        .bind(symbol)
        .bind(minute)
        .bind(price)
        .bind(tick.volume.unwrap_or(Decimal::ZERO))
        .bind(tick.ts)
        .bind(tick.seq)
        .execute(conn)
        .await?;
        Ok(())
    }
}
