//! How far a follower is behind the log, and the log's head: what the relay, `/metrics` and the read-your-
//! writes wait ask of the `events` table, asked here.

use sqlx::PgPool;

use super::{load_cursor, LogPosition};

/// Events counted behind a position, at most (the count is for dashboards; past this it says "at least").
pub const LAG_COUNT_MAX: i64 = 1_000_000;

/// What the log holds after a position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Committed events after it (counted up to [`LAG_COUNT_MAX`]).
    pub events: i64,
    /// Age of the oldest of them, in seconds (0 when there are none): the first in commit order.
    pub seconds: f64,
}

/// The lag of the committed log after `position` (of one aggregate type's events when given).
pub async fn lag_after(pool: &PgPool, position: LogPosition, aggregate_type: Option<&str>) -> Result<Lag, sqlx::Error> {
    let (events, seconds): (i64, Option<f64>) = sqlx::query_as(
        "select count(*), extract(epoch from clock_timestamp() - min(recorded_at))::float8
           from (select recorded_at from events
                  where (transaction_id, global_position) > ($1::text::xid8, $2)
                    and ($3::text is null or aggregate_type = $3)
                  order by transaction_id, global_position
                  limit $4) behind",
    )
    .bind(position.transaction_id.to_string())
    .bind(position.global_position)
    .bind(aggregate_type)
    .bind(LAG_COUNT_MAX)
    .fetch_one(pool)
    .await?;
    Ok(Lag { events, seconds: seconds.unwrap_or(0.0).max(0.0) })
}

/// The lag after the stored cursor `name` (from the start of the log when it has none).
pub async fn cursor_lag(pool: &PgPool, name: &str) -> Result<Lag, sqlx::Error> {
    lag_after(pool, load_cursor(pool, name).await?, None).await
}

/// Every stored cursor (relay, process manager, sealer, catch-ups) with its lag, by name.
pub async fn cursor_lags(pool: &PgPool) -> Result<Vec<(String, Lag)>, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar("select name from log_cursors order by name").fetch_all(pool).await?;
    let mut lags = Vec::with_capacity(names.len());
    for name in names {
        let lag = cursor_lag(pool, &name).await?;
        lags.push((name, lag));
    }
    Ok(lags)
}

/// The newest global position and the age of the newest event in seconds (`None` for an empty log).
pub async fn head(pool: &PgPool) -> Result<(Option<i64>, Option<f64>), sqlx::Error> {
    sqlx::query_as(
        "select max(global_position), extract(epoch from clock_timestamp() - max(recorded_at))::float8 from events",
    )
    .fetch_one(pool)
    .await
}

/// The sequence of one aggregate's newest event (0 when it has none).
pub async fn aggregate_head(pool: &PgPool, aggregate_type: &str, aggregate_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select coalesce(max(sequence), 0) from events where aggregate_type = $1 and aggregate_id = $2")
        .bind(aggregate_type)
        .bind(aggregate_id)
        .fetch_one(pool)
        .await
}
