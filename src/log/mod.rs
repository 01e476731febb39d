//! The event log reader: every follower of the log (process manager, Kafka relay, projections, replay,
//! export, subscriptions) reads through this module.
//!
//! # Why `(transaction_id, global_position)` and not `global_position`
//! An identity value is taken when a row is inserted but becomes visible when its transaction commits. A
//! reader that asks for "position > last seen" can see position 7 (committed) while position 6 is still in an
//! open transaction, move its cursor to 7 and never see 6. Instead, the reader orders by the writing
//! transaction's id and only reads rows whose transaction is older than the oldest transaction still running
//! (`pg_snapshot_xmin(pg_current_snapshot())`). Every transaction below that horizon has committed or aborted,
//! so nothing can appear behind the cursor later. The price: a long-running transaction anywhere on the
//! server holds every reader back ([`LogReader::holdback`] exposes it for metrics).
//!
//! Readers wake on `LISTEN ledger_events` (a statement trigger notifies at commit) and also poll, because the
//! transaction that held the horizon back may not have written events (and so never notifies).
//!
//! # Who reads `events`
//! This module: the followers' reader, cursors, lags and the head (`lag`), one aggregate's events and its
//! state as of a point (`history`). Besides it, only code whose question is not "the log in order" and that
//! joins it with tables of its own: the command side's event store (`commands::{writer, loader, batch}`:
//! it writes the log and loads aggregates from it), the audit trail (`audit::{sealed, verify}`: the chain
//! joined row by row to the events it seals), the order/portfolio agreement check (`process::agreement`) and a
//! rebuild's final delta (`projections::rebuild`, joined with the live and shadow progress tables).

mod cursor;
mod history;
mod lag;
mod reader;
mod snapshot;

pub use cursor::{load_cursor, notify_progress, reset_cursor, save_cursor, PROGRESS_CHANNEL};
pub use history::{aggregate_events, aggregate_events_between, replay_as_of, AsOf};
pub use lag::{aggregate_head, cursor_lag, cursor_lags, head, lag_after, Lag, LAG_COUNT_MAX};
pub use reader::{decode_event, event_at, event_by_id, LogReader, ReadOrder, BATCH_SIZE_MAX};
pub use snapshot::Snapshot;

use crate::domain::upcast::Stored;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A point in the log's commit order. Derived `Ord` compares the transaction first, as the reader does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct LogPosition {
    pub transaction_id: u64,
    pub global_position: i64,
}

impl LogPosition {
    /// Before the first event.
    pub const START: LogPosition = LogPosition { transaction_id: 0, global_position: 0 };

    /// A position from its columns as queried: `transaction_id::text` (see [`parse_transaction_id`]) and
    /// `global_position`.
    pub fn from_columns(transaction_id: &str, global_position: i64) -> Result<Self, sqlx::Error> {
        Ok(Self { transaction_id: parse_transaction_id(transaction_id).map_err(sqlx::Error::Decode)?, global_position })
    }
}

/// Which newest event [`newest_position`] finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Newest {
    /// The newest committed so far (visible now), whether or not older transactions are still running; a
    /// reader reaches it once they have ended.
    Committed,
    /// The newest below the horizon: what a commit-safe reader can read now.
    BelowHorizon,
    /// The newest written by a transaction older than this transaction id.
    Before(u64),
}

/// The position of the log's newest event in commit order ([`LogPosition::START`] when there is none).
///
/// The rendered id has an alias of its own and the sort names the table's column: `select transaction_id::text
/// … order by transaction_id` would sort the text output column ("99" after "100"), and so find an older event
/// as the newest whenever the log spans a power of ten in transaction ids.
pub async fn newest_position(pool: &sqlx::PgPool, newest: Newest) -> Result<LogPosition, sqlx::Error> {
    let below = match newest {
        Newest::Committed => "true",
        Newest::BelowHorizon => "events.transaction_id < pg_snapshot_xmin(pg_current_snapshot())",
        Newest::Before(_) => "events.transaction_id < $1::text::xid8",
    };
    let sql = format!(
        "select events.transaction_id::text as transaction_id_text, events.global_position from events
          where {below}
          order by events.transaction_id desc, events.global_position desc limit 1"
    );
    let mut query = sqlx::query_as::<_, (String, i64)>(&sql);
    if let Newest::Before(transaction_id) = newest {
        query = query.bind(transaction_id.to_string());
    }
    let row = query.fetch_optional(pool).await?;
    row.map_or(Ok(LogPosition::START), |(transaction_id, global_position)| {
        LogPosition::from_columns(&transaction_id, global_position)
    })
}

/// Rendered as `transaction_id:global_position`, the form used in cursors exposed to clients.
impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.transaction_id, self.global_position)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a log position (expected TRANSACTION:POSITION, e.g. 1234:56)")]
pub struct LogPositionParseError(pub String);

impl FromStr for LogPosition {
    type Err = LogPositionParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LogPositionParseError(s.to_string());
        let (tx, pos) = s.split_once(':').ok_or_else(err)?;
        let transaction_id = tx.parse().map_err(|_| err())?;
        let global_position = pos.parse().map_err(|_| err())?;
        if global_position < 0 {
            return Err(err());
        }
        Ok(Self { transaction_id, global_position })
    }
}

/// A transaction id as PostgreSQL renders an `xid8` (`transaction_id::text`). The one decoder of it: a value
/// that does not parse is an error, never a silent 0 (which would rewind a cursor to the start of the log).
pub fn parse_transaction_id(text: &str) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    text.parse::<u64>().map_err(|error| format!("transaction id {text:?}: {error}").into())
}

/// One committed event as stored in the log, its payload and metadata held as `Body`: parsed JSON
/// ([`RecordedEvent`]) or the JSON text PostgreSQL sent ([`WireEvent`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedEvent<Body> {
    pub position: LogPosition,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Body,
    pub metadata: Body,
    pub recorded_at: DateTime<Utc>,
}

/// One committed event as stored in the log, payload and metadata parsed.
pub type RecordedEvent = LoggedEvent<serde_json::Value>;

/// An event as the relay reads it ([`LogReader::next_wire_batch`]): every field of a [`RecordedEvent`], with the
/// payload and metadata kept as the JSON text PostgreSQL sent (jsonb's output, so valid JSON) to be written
/// into the Kafka envelope as they are — no `serde_json::Value` tree built, serialised and dropped per event.
pub type WireEvent = LoggedEvent<Box<str>>;

impl RecordedEvent {
    /// A metadata field (all metadata values are strings).
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(|v| v.as_str())
    }

    /// The payload as the current shape of `E` (an older version upcast first; see `crate::domain::upcast`).
    /// The event itself keeps what was stored: the audit chain is over that.
    pub fn decode<E: Stored>(&self) -> Result<E, serde_json::Error> {
        E::decode_ref(&self.event_version, &self.payload)
    }
}

/// An event as a replay reads it ([`LogReader::read_raw_batch`]): its place in the log and its payload as the
/// JSON text PostgreSQL sent, for a fold to decode straight into its typed event — no `serde_json::Value` tree
/// built and dropped per event, no metadata. The text is not parsed on reading: decoding it is the check.
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub position: LogPosition,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_version: String,
    pub payload: Box<[u8]>,
    pub recorded_at: DateTime<Utc>,
    pub event_id: Uuid,
    pub event_type: String,
}

impl RawEvent {
    /// The payload as the current shape of `E` (an older version upcast first; see `crate::domain::upcast`).
    pub fn decode<E: Stored>(&self) -> Result<E, serde_json::Error> {
        E::decode_stored(&self.event_version, &self.payload)
    }

    /// The event as a [`RecordedEvent`] with its payload parsed and without its metadata (null): what a
    /// projection's `apply_events` needs during a rebuild.
    pub fn to_recorded(&self) -> Result<RecordedEvent, serde_json::Error> {
        Ok(RecordedEvent {
            position: self.position,
            event_id: self.event_id,
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            sequence: self.sequence,
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
            payload: serde_json::from_slice(&self.payload)?,
            metadata: serde_json::Value::Null,
            recorded_at: self.recorded_at,
        })
    }
}

impl From<&RecordedEvent> for WireEvent {
    fn from(event: &RecordedEvent) -> Self {
        WireEvent {
            position: event.position,
            event_id: event.event_id,
            aggregate_type: event.aggregate_type.clone(),
            aggregate_id: event.aggregate_id.clone(),
            sequence: event.sequence,
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
            payload: event.payload.to_string().into(),
            metadata: event.metadata.to_string().into(),
            recorded_at: event.recorded_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_by_transaction_first() {
        let a = LogPosition { transaction_id: 10, global_position: 50 };
        let b = LogPosition { transaction_id: 11, global_position: 3 };
        assert!(a < b);
    }

    #[test]
    fn positions_round_trip_through_text() {
        let p = LogPosition { transaction_id: 987, global_position: 65 };
        assert_eq!(p.to_string().parse::<LogPosition>().unwrap(), p);
        assert!("12".parse::<LogPosition>().is_err());
        assert!("a:1".parse::<LogPosition>().is_err());
        assert!("1:-1".parse::<LogPosition>().is_err());
    }
}
