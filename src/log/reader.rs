//! [`LogReader`]: batches of committed events after a cursor, in commit-safe order.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

use super::{LogPosition, RawEvent, RecordedEvent, WireEvent};

/// Events per batch unless configured otherwise.
pub const BATCH_SIZE_DEFAULT: usize = 1_000;
/// Upper bound on a batch, whatever is configured: bounds the memory one read can take.
pub const BATCH_SIZE_MAX: usize = 10_000;
/// How often a waiting reader polls when no notification arrives.
pub const POLL_INTERVAL_MS_DEFAULT: u64 = 100;
/// The channel the `events` statement trigger notifies.
pub const LISTEN_CHANNEL: &str = "ledger_events";

// The text rendering of the xid8 gets its own alias: `ORDER BY transaction_id` would otherwise bind to an
// output column named `transaction_id` and sort as text ("100" < "99"), breaking commit order.
pub(super) const SELECT_COLUMNS: &str = "events.transaction_id::text as transaction_id_text, global_position, event_id,
    aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, recorded_at";

/// The columns of a [`RawEvent`].
const RAW_COLUMNS: &str = "events.transaction_id::text as transaction_id_text, global_position, aggregate_type,
    aggregate_id, sequence, event_version, payload, recorded_at, event_id, event_type";

/// How the reader orders and bounds the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadOrder {
    /// `(transaction_id, global_position)` below the oldest running transaction: never skips an event.
    #[default]
    CommitSafe,
    /// `global_position` alone. **Skips events** of transactions that commit late: never use it to follow
    /// the log. It exists so that a test can demonstrate the failure the commit-safe order prevents.
    GlobalPositionOnly,
}

pub struct LogReader {
    pool: PgPool,
    after: LogPosition,
    batch_size: usize,
    poll_interval: Duration,
    order: ReadOrder,
    listener: Option<PgListener>,
}

impl LogReader {
    /// A reader that will return the events after `after`.
    pub fn new(pool: PgPool, after: LogPosition) -> Self {
        Self {
            pool,
            after,
            batch_size: BATCH_SIZE_DEFAULT,
            poll_interval: Duration::from_millis(POLL_INTERVAL_MS_DEFAULT),
            order: ReadOrder::CommitSafe,
            listener: None,
        }
    }

    /// Events per batch, clamped to `1..=BATCH_SIZE_MAX`.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.clamp(1, BATCH_SIZE_MAX);
        self
    }

    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    pub fn with_read_order(mut self, order: ReadOrder) -> Self {
        self.order = order;
        self
    }

    /// The position of the last event returned (or the starting position).
    pub fn position(&self) -> LogPosition {
        self.after
    }

    /// Moves the reader to just after `position`.
    pub fn seek(&mut self, position: LogPosition) {
        self.after = position;
    }

    /// The next batch after the cursor, possibly empty; does not wait. Advances the cursor past the batch.
    pub async fn read_batch(&mut self) -> Result<Vec<RecordedEvent>, sqlx::Error> {
        self.read_decoded(SELECT_COLUMNS, decode_event).await
    }

    /// As [`Self::read_batch`], each event as a [`RawEvent`] (payload undecoded, no metadata): for a replay.
    pub async fn read_raw_batch(&mut self) -> Result<Vec<RawEvent>, sqlx::Error> {
        self.read_decoded(RAW_COLUMNS, decode_raw_event).await
    }

    /// The next batch with `columns`, decoded; the cursor moves past it only once all of it decoded.
    async fn read_decoded<T>(
        &mut self,
        columns: &str,
        decode: fn(&PgRow) -> Result<T, sqlx::Error>,
    ) -> Result<Vec<T>, sqlx::Error> {
        let rows = self.fetch(columns).await?;
        let decoded = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
        if let Some(last) = rows.last() {
            self.after = position(last)?;
        }
        Ok(decoded)
    }

    /// The rows of the next batch after the cursor, with `columns`.
    async fn fetch(&self, columns: &str) -> Result<Vec<PgRow>, sqlx::Error> {
        let limit = self.batch_size as i64;
        let rows = match self.order {
            ReadOrder::CommitSafe => {
                sqlx::query(&format!(
                    "select {columns} from events
                      where (transaction_id, global_position) > ($1::text::xid8, $2)
                        and transaction_id < pg_snapshot_xmin(pg_current_snapshot())
                      order by events.transaction_id, events.global_position
                      limit $3"
                ))
                .bind(self.after.transaction_id.to_string())
                .bind(self.after.global_position)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            ReadOrder::GlobalPositionOnly => {
                sqlx::query(&format!(
                    "select {columns} from events where global_position > $1 order by global_position limit $2"
                ))
                .bind(self.after.global_position)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(rows)
    }

    /// The next non-empty batch, waiting for one (notification or poll). `None` when `cancel` fires first.
    pub async fn next_batch(&mut self, cancel: &CancellationToken) -> Result<Option<Vec<RecordedEvent>>, sqlx::Error> {
        self.next_decoded(decode_event, cancel).await
    }

    /// As [`Self::next_batch`], each event as a [`WireEvent`]: for the relay.
    pub async fn next_wire_batch(&mut self, cancel: &CancellationToken) -> Result<Option<Vec<WireEvent>>, sqlx::Error> {
        self.next_decoded(decode_wire_event, cancel).await
    }

    /// The next non-empty batch of every column ([`SELECT_COLUMNS`]) decoded with `decode`, waiting for one.
    async fn next_decoded<T>(
        &mut self,
        decode: fn(&PgRow) -> Result<T, sqlx::Error>,
        cancel: &CancellationToken,
    ) -> Result<Option<Vec<T>>, sqlx::Error> {
        loop {
            // Listen before reading, so that a commit between the read and the wait still wakes us.
            self.ensure_listening().await;
            let batch = self.read_decoded(SELECT_COLUMNS, decode).await?;
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
            if !self.wait(cancel).await {
                return Ok(None);
            }
        }
    }

    /// The last event after the cursor that [`Self::read_batch`] would return now, over as many batches as it
    /// takes (the log's head in the reader's order and bounds), found without reading the events' bodies and
    /// **without moving the cursor**; `None` if there is nothing new. [`Self::seek`] to it to skip everything
    /// up to it.
    pub async fn head(&self) -> Result<Option<LogPosition>, sqlx::Error> {
        let row = match self.order {
            ReadOrder::CommitSafe => {
                sqlx::query(
                    "select transaction_id::text as transaction_id_text, global_position from events
                      where (transaction_id, global_position) > ($1::text::xid8, $2)
                        and transaction_id < pg_snapshot_xmin(pg_current_snapshot())
                      order by transaction_id desc, global_position desc
                      limit 1",
                )
                .bind(self.after.transaction_id.to_string())
                .bind(self.after.global_position)
                .fetch_optional(&self.pool)
                .await?
            }
            ReadOrder::GlobalPositionOnly => {
                sqlx::query(
                    "select transaction_id::text as transaction_id_text, global_position from events
                      where global_position > $1 order by global_position desc limit 1",
                )
                .bind(self.after.global_position)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        row.map(|row| position(&row)).transpose()
    }

    /// Stops listening for commits (returning the listening connection to the pool) until the next
    /// [`Self::next_batch`]: a reader that is only asked from time to time need not be woken by every commit.
    pub fn stop_listening(&mut self) {
        self.listener = None;
    }

    /// Waits for a notification, or the poll interval; false when `cancel` fires first.
    async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let notified = async {
            match self.listener.as_mut() {
                Some(listener) => listener.try_recv().await.map(|_| ()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return false,
            result = notified => {
                if result.is_err() {
                    // Lost the listening connection: fall back to polling until it reconnects.
                    self.listener = None;
                }
            }
            _ = tokio::time::sleep(self.poll_interval) => {}
        }
        true
    }

    async fn ensure_listening(&mut self) {
        if self.listener.is_some() {
            return;
        }
        match PgListener::connect_with(&self.pool).await {
            Ok(mut listener) => {
                if listener.listen(LISTEN_CHANNEL).await.is_ok() {
                    self.listener = Some(listener);
                }
            }
            Err(error) => tracing::debug!(%error, "LISTEN unavailable, polling"),
        }
    }
}

/// One event by its id, if it exists.
pub async fn event_by_id<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    event_id: uuid::Uuid,
) -> Result<Option<RecordedEvent>, sqlx::Error> {
    let row = sqlx::query(&format!("select {SELECT_COLUMNS} from events where event_id = $1"))
        .bind(event_id)
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(decode_event).transpose()
}

/// The event at a global position, if there is one.
pub async fn event_at<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    global_position: i64,
) -> Result<Option<RecordedEvent>, sqlx::Error> {
    let row = sqlx::query(&format!("select {SELECT_COLUMNS} from events where global_position = $1"))
        .bind(global_position)
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(decode_event).transpose()
}

/// The position of a row selected with the reader's columns (`transaction_id_text`, `global_position`).
fn position(row: &PgRow) -> Result<LogPosition, sqlx::Error> {
    LogPosition::from_columns(row.try_get("transaction_id_text")?, row.try_get("global_position")?)
}

/// Decodes a row selected with the reader's columns (`transaction_id_text`, `global_position`, …).
pub fn decode_event(row: &PgRow) -> Result<RecordedEvent, sqlx::Error> {
    Ok(RecordedEvent {
        position: position(row)?,
        event_id: row.try_get("event_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
        recorded_at: row.try_get("recorded_at")?,
    })
}

/// Decodes a row selected with the raw columns (by index, in the order of [`RAW_COLUMNS`]); the payload is kept as
/// the JSON text PostgreSQL sent, unparsed.
fn decode_raw_event(row: &PgRow) -> Result<RawEvent, sqlx::Error> {
    let bytes = jsonb_text(row, 6)?;
    Ok(RawEvent {
        position: LogPosition::from_columns(row.try_get(0)?, row.try_get(1)?)?,
        aggregate_type: row.try_get(2)?,
        aggregate_id: row.try_get(3)?,
        sequence: row.try_get(4)?,
        event_version: row.try_get(5)?,
        payload: bytes.into(),
        recorded_at: row.try_get(7)?,
        event_id: row.try_get(8)?,
        event_type: row.try_get(9)?,
    })
}

/// The JSON text of the jsonb column `index`, as PostgreSQL sent it.
fn jsonb_text(row: &PgRow, index: usize) -> Result<&[u8], sqlx::Error> {
    let value = row.try_get_raw(index)?;
    match value.format() {
        // jsonb in binary: a version byte (1), then the text.
        sqlx::postgres::PgValueFormat::Binary => match value.as_bytes().map_err(sqlx::Error::Decode)? {
            [1, text @ ..] => Ok(text),
            _ => Err(sqlx::Error::Decode("unknown jsonb version".into())),
        },
        sqlx::postgres::PgValueFormat::Text => value.as_bytes().map_err(sqlx::Error::Decode),
    }
}

/// Decodes a row selected with the reader's columns ([`SELECT_COLUMNS`], by index) into a [`WireEvent`].
fn decode_wire_event(row: &PgRow) -> Result<WireEvent, sqlx::Error> {
    let text = |index| -> Result<Box<str>, sqlx::Error> {
        let bytes = jsonb_text(row, index)?;
        Ok(std::str::from_utf8(bytes).map_err(|e| sqlx::Error::Decode(e.into()))?.into())
    };
    Ok(WireEvent {
        position: LogPosition::from_columns(row.try_get(0)?, row.try_get(1)?)?,
        event_id: row.try_get(2)?,
        aggregate_type: row.try_get(3)?,
        aggregate_id: row.try_get(4)?,
        sequence: row.try_get(5)?,
        event_type: row.try_get(6)?,
        event_version: row.try_get(7)?,
        payload: text(8)?,
        metadata: text(9)?,
        recorded_at: row.try_get(10)?,
    })
}
