//! Durable cursors of log followers, stored in `log_cursors`, and the notification that a follower moved.
//!
//! Saving is monotonic: a cursor never moves backwards through [`save_cursor`] (a delayed write from a
//! superseded instance cannot rewind it); rewinding is an explicit [`reset_cursor`], used by replays.

use sqlx::{PgExecutor, PgPool};

use super::LogPosition;

/// The stored cursor, or [`LogPosition::START`] when the follower has never saved one.
pub async fn load_cursor<'e>(executor: impl PgExecutor<'e>, name: &str) -> Result<LogPosition, sqlx::Error> {
    let row: Option<(String, i64)> =
        sqlx::query_as("select transaction_id::text, global_position from log_cursors where name = $1")
            .bind(name)
            .fetch_optional(executor)
            .await?;
    row.map_or(Ok(LogPosition::START), |(tx, global_position)| LogPosition::from_columns(&tx, global_position))
}

/// Moves the cursor forward to `position` (no-op if it is already at or past it). Pass a transaction as the
/// executor to store the cursor atomically with the effects of the events it covers.
pub async fn save_cursor<'e>(
    executor: impl PgExecutor<'e>,
    name: &str,
    position: LogPosition,
) -> Result<(), sqlx::Error> {
    store_cursor(executor, name, position, true).await
}

/// Sets the cursor to `position` even if that moves it backwards.
pub async fn reset_cursor<'e>(
    executor: impl PgExecutor<'e>,
    name: &str,
    position: LogPosition,
) -> Result<(), sqlx::Error> {
    store_cursor(executor, name, position, false).await
}

/// Stores the cursor; with `forward_only`, only when `position` is past the stored one.
async fn store_cursor<'e>(
    executor: impl PgExecutor<'e>,
    name: &str,
    position: LogPosition,
    forward_only: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into log_cursors (name, transaction_id, global_position, updated_at)
         values ($1, $2::text::xid8, $3, clock_timestamp())
         on conflict (name) do update
            set transaction_id = excluded.transaction_id,
                global_position = excluded.global_position,
                updated_at = excluded.updated_at
          where not $4
             or (log_cursors.transaction_id, log_cursors.global_position)
              < (excluded.transaction_id, excluded.global_position)",
    )
    .bind(name)
    .bind(position.transaction_id.to_string())
    .bind(position.global_position)
    .bind(forward_only)
    .execute(executor)
    .await?;
    Ok(())
}

/// The channel notified (with the notifier's name) when a projection applied a batch or the process manager
/// moved its cursor.
pub const PROGRESS_CHANNEL: &str = "ledger_progress";

/// Tells waiters that `who` moved (best effort: a waiter also polls, so a lost notification only delays it).
pub async fn notify_progress(pool: &PgPool, who: &str) {
    if let Err(error) = sqlx::query("select pg_notify($1, $2)").bind(PROGRESS_CHANNEL).bind(who).execute(pool).await {
        tracing::debug!(%error, "progress notification failed");
    }
}
