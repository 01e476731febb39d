//! What operators read: the dead letters of the projection workers (messages a projection could not apply).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// One dead letter, newest first in listings.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DeadLetterRow {
    pub id: i64,
    pub projection: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub message_key: Option<String>,
    /// The message body as text (bytes outside printable ASCII escaped as `\ooo`).
    pub payload: Option<String>,
    pub error: String,
    pub recorded_at: DateTime<Utc>,
}

/// Up to `limit` dead letters with an id below `before` (all when `None`), newest first.
pub async fn dead_letters(pool: &PgPool, before: Option<i64>, limit: i64) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
    sqlx::query_as(
        "select id, projection, source_topic, source_partition, source_offset, message_key,
                encode(payload, 'escape') as payload, error, recorded_at
           from dead_letters where $1::bigint is null or id < $1 order by id desc limit $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}
