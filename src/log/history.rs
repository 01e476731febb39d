//! One aggregate's events, and its state replayed from them, as of a point of the log (time travel): the
//! history a query pages through, and the state it shows "as it was then"; and the events of an aggregate a
//! projection missed.

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use sqlx::{PgPool, Row};

use super::reader::SELECT_COLUMNS;
use super::{decode_event, LogPosition, RecordedEvent};

/// The point a time-travel read sees the log as of: a log position (the events up to it in commit order), or
/// when none is given a time (the events recorded by then). `time` is also the position's event's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsOf {
    pub time: DateTime<Utc>,
    pub position: Option<LogPosition>,
}

impl AsOf {
    /// As of a time.
    pub fn time(time: DateTime<Utc>) -> AsOf {
        AsOf { time, position: None }
    }

    /// As of the event at `position`, or `None` when no event is there.
    pub async fn position(pool: &PgPool, position: LogPosition) -> Result<Option<AsOf>, sqlx::Error> {
        let time: Option<DateTime<Utc>> = sqlx::query_scalar(
            "select recorded_at from events where transaction_id = $1::text::xid8 and global_position = $2",
        )
        .bind(position.transaction_id.to_string())
        .bind(position.global_position)
        .fetch_optional(pool)
        .await?;
        Ok(time.map(|time| AsOf { time, position: Some(position) }))
    }
}

/// The condition on `events` that keeps what an [`AsOf`] sees, bound as $3 (transaction id as text), $4 (global
/// position) and $5 (time, when there is no position); everything when they are null.
const AS_OF_FILTER: &str = "($3::text is null or (transaction_id, global_position) <= ($3::text::xid8, $4))
                            and ($5::timestamptz is null or recorded_at <= $5)";

/// Binds an [`AsOf`] (or nothing: all events) as [`AS_OF_FILTER`]'s parameters, after the two before them.
fn bind_as_of<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    as_of: Option<&AsOf>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let position = as_of.and_then(|a| a.position);
    query
        .bind(position.map(|p| p.transaction_id.to_string()))
        .bind(position.map_or(0, |p| p.global_position))
        .bind(as_of.filter(|a| a.position.is_none()).map(|a| a.time))
}

/// Up to `limit` events of one aggregate after `after_sequence`, by sequence, as of `until` (all when `None`).
pub async fn aggregate_events(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    after_sequence: i64,
    limit: i64,
    until: Option<&AsOf>,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let sql = format!(
        "select {SELECT_COLUMNS} from events
          where aggregate_type = $1 and aggregate_id = $2 and {AS_OF_FILTER} and sequence > $6
          order by sequence limit $7"
    );
    let query = bind_as_of(sqlx::query(&sql).bind(aggregate_type).bind(aggregate_id), until);
    let rows = query.bind(after_sequence).bind(limit).fetch_all(pool).await?;
    rows.iter().map(decode_event).collect()
}

/// One aggregate's events with a sequence strictly between `after` and `before`, by sequence (what a projection
/// missed of it), read with `executor` (a batch's transaction).
pub async fn aggregate_events_between<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    aggregate_type: &str,
    aggregate_id: &str,
    after: i64,
    before: i64,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "select {SELECT_COLUMNS} from events
          where aggregate_type = $1 and aggregate_id = $2 and sequence > $3 and sequence < $4
          order by sequence"
    ))
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(after)
    .bind(before)
    .fetch_all(executor)
    .await?;
    rows.iter().map(decode_event).collect()
}

/// Aggregate `A` `aggregate_id` replayed from its events as of `as_of`, with the global position of the last
/// event applied (`(A::default(), 0)` when it had none by then).
pub async fn replay_as_of<A: Aggregate>(
    pool: &PgPool,
    aggregate_id: &str,
    as_of: &AsOf,
) -> Result<(A, i64), sqlx::Error> {
    let sql = format!(
        "select payload, global_position, event_version from events
          where aggregate_type = $1 and aggregate_id = $2 and {AS_OF_FILTER} order by sequence"
    );
    let rows = bind_as_of(sqlx::query(&sql).bind(A::TYPE).bind(aggregate_id), Some(as_of)).fetch_all(pool).await?;
    let mut aggregate = A::default();
    let mut last_position = 0;
    for row in rows {
        let (mut payload, position, version): (serde_json::Value, i64, String) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        crate::domain::upcast::upcast(A::TYPE, &version, &mut payload);
        let event: A::Event = serde_json::from_value(payload).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        aggregate.apply(event);
        last_position = position;
    }
    Ok((aggregate, last_position))
}
