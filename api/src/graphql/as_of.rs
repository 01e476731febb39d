//! Time travel, shared by portfolios and orders: `asOf` / `atPosition` resolved to a point of the log, and an
//! aggregate's own events as a connection (up to that point when there is one). The reads are the log's
//! (`ledger::log::{AsOf, aggregate_events, replay_as_of}`).

use async_graphql::connection::{Connection, Edge};
use async_graphql::Result;
use chrono::{DateTime, Utc};
use ledger::log::AsOf;
use sqlx::PgPool;

use super::errors::{database, invalid, not_found};
use super::page_size;
use super::scalars::LogPosition;
use super::types::Event;

/// Resolves `asOf` / `atPosition` to a point of the log (the time of the event at that position).
pub async fn resolve_as_of(
    pool: &PgPool,
    as_of: Option<DateTime<Utc>>,
    at_position: Option<LogPosition>,
) -> Result<Option<AsOf>> {
    match (as_of, at_position) {
        (Some(_), Some(_)) => Err(invalid("give asOf or atPosition, not both")),
        (Some(time), None) => Ok(Some(AsOf::time(time))),
        (None, Some(LogPosition(position))) => {
            let point = AsOf::position(pool, position).await.map_err(database)?;
            Ok(Some(point.ok_or_else(|| not_found("log position"))?))
        }
        (None, None) => Ok(None),
    }
}

/// An aggregate's events by sequence, up to `until` when given (the same bound as the time-travel replay: a
/// log position, or a time); the cursor is the sequence number.
pub async fn aggregate_history(
    pool: &PgPool,
    aggregate_type: &str,
    id: &str,
    until: Option<&AsOf>,
    first: Option<i32>,
    after: Option<String>,
) -> Result<Connection<String, Event>> {
    let limit = page_size(first);
    let after_sequence: i64 =
        after.as_deref().map(|a| a.parse().map_err(|_| invalid("bad cursor"))).transpose()?.unwrap_or(0);
    let events = ledger::log::aggregate_events(pool, aggregate_type, id, after_sequence, limit as i64 + 1, until)
        .await
        .map_err(database)?;
    let mut connection = Connection::new(after.is_some(), events.len() > limit);
    for event in events.iter().take(limit) {
        connection.edges.push(Edge::new(event.sequence.to_string(), Event::from(event)));
    }
    Ok(connection)
}
