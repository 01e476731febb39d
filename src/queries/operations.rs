//! What operators read: the dead letters of the projection workers (messages a projection could not apply).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// One dead letter, newest first in listings.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject), graphql(name = "DeadLetter"))]
pub struct DeadLetterRow {
    pub id: i64,
    /// The projection that could not apply it.
    pub projection: String,
    /// Where it came from: a topic, or `log` for an event read from PostgreSQL during a catch-up (then the
    /// offset is its global position).
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub message_key: Option<String>,
    /// The message body as text (bytes outside printable ASCII escaped as `\ooo`).
    pub payload: Option<String>,
    pub error: String,
    pub recorded_at: DateTime<Utc>,
    /// When an operator replayed or discarded it (open while none).
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<String>,
    /// `replayed` (applied to its projection) or `discarded`.
    pub resolution: Option<String>,
    /// The reason given for a discard.
    pub resolution_note: Option<String>,
}

const DEAD_LETTER_COLUMNS: &str = "id, projection, source_topic, source_partition, source_offset, message_key,
    encode(payload, 'escape') as payload, error, recorded_at, resolved_at, resolved_by, resolution, resolution_note";

/// Up to `limit` dead letters with an id below `before` (all when `None`), newest first; only the open ones
/// (neither replayed nor discarded) with `open_only`.
pub async fn dead_letters(
    pool: &PgPool,
    open_only: bool,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "select {DEAD_LETTER_COLUMNS} from dead_letters
          where ($1::bigint is null or id < $1) and (not $2 or resolved_at is null) order by id desc limit $3"
    ))
    .bind(before)
    .bind(open_only)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// One dead letter by id.
pub async fn dead_letter(pool: &PgPool, id: i64) -> Result<Option<DeadLetterRow>, sqlx::Error> {
    sqlx::query_as(&format!("select {DEAD_LETTER_COLUMNS} from dead_letters where id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}
