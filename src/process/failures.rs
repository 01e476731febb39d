//! Steps the process manager could not apply. A business refusal that should never happen (a fill for an order
//! the portfolio holds no reservation for, an undecodable event) is recorded in `process_failures` instead of
//! stopping the process manager. Operators see them (GraphQL `processFailures`, the `ledger_process_failures`
//! metric, `ledger process-failures list`), fix the cause, then retry the step — it runs under its original
//! idempotency keys, so it can never act twice — or dismiss it; either is recorded with who did it.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{ProcessManager, StepError, PROCESS_MANAGER};
use crate::commands::CommandError;
use crate::log::event_by_id;

/// Failures listed per page at most.
pub const FAILURES_PAGE_MAX: i64 = 1_000;

/// One recorded failure.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ProcessFailure {
    pub id: i64,
    pub event_id: Uuid,
    pub global_position: i64,
    pub error_code: String,
    pub error: String,
    pub recorded_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<String>,
    /// `retried` (the step then succeeded) or `dismissed`.
    pub resolution: Option<String>,
}

/// What retrying a failure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The step succeeded now; the failure is resolved.
    Applied,
    /// Refused again; the failure stays open with the new reason.
    StillFailing { code: String, message: String },
    /// No open failure for that event.
    NotOpen,
}

/// Failures oldest first (only the unresolved ones when `open_only`), after the id `after`.
pub async fn list(
    pool: &PgPool,
    open_only: bool,
    after: Option<i64>,
    limit: i64,
) -> Result<Vec<ProcessFailure>, sqlx::Error> {
    sqlx::query_as(
        "select id, event_id, global_position, error_code, error, recorded_at, resolved_at, resolved_by, resolution
           from process_failures
          where process = $1 and (not $2 or resolved_at is null) and id > $3
          order by id limit $4",
    )
    .bind(PROCESS_MANAGER)
    .bind(open_only)
    .bind(after.unwrap_or(0))
    .bind(limit.clamp(1, FAILURES_PAGE_MAX))
    .fetch_all(pool)
    .await
}

/// Unresolved failures.
pub async fn open_count(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select count(*) from process_failures where process = $1 and resolved_at is null")
        .bind(PROCESS_MANAGER)
        .fetch_one(pool)
        .await
}

/// Marks the open failure of `event_id` dismissed by `actor`; false when there is none.
pub async fn dismiss(pool: &PgPool, event_id: Uuid, actor: &str) -> Result<bool, sqlx::Error> {
    resolve(pool, event_id, actor, "dismissed").await
}

async fn resolve(pool: &PgPool, event_id: Uuid, actor: &str, resolution: &str) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "update process_failures set resolved_at = clock_timestamp(), resolved_by = $3, resolution = $4
          where process = $1 and event_id = $2 and resolved_at is null",
    )
    .bind(PROCESS_MANAGER)
    .bind(event_id)
    .bind(actor)
    .bind(resolution)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

impl ProcessManager {
    /// Runs the failed step for `event_id` again (same idempotency keys as the first time) on behalf of
    /// `actor`, and resolves the failure when it succeeds.
    pub async fn retry_failure(&self, event_id: Uuid, actor: &str) -> Result<RetryOutcome, CommandError> {
        let open: bool = sqlx::query_scalar(
            "select exists (select 1 from process_failures
                             where process = $1 and event_id = $2 and resolved_at is null)",
        )
        .bind(PROCESS_MANAGER)
        .bind(event_id)
        .fetch_one(self.pool())
        .await
        .map_err(CommandError::store)?;
        if !open {
            return Ok(RetryOutcome::NotOpen);
        }
        let Some(event) = event_by_id(self.pool(), event_id).await.map_err(CommandError::store)? else {
            return Ok(RetryOutcome::NotOpen);
        };
        match self.handle(&event).await {
            Ok(()) => {
                resolve(self.pool(), event_id, actor, "retried").await.map_err(CommandError::store)?;
                tracing::info!(%event_id, actor, "process failure retried and resolved");
                Ok(RetryOutcome::Applied)
            }
            Err(StepError::Permanent { code, message }) => {
                sqlx::query(
                    "update process_failures set error_code = $3, error = $4
                      where process = $1 and event_id = $2 and resolved_at is null",
                )
                .bind(PROCESS_MANAGER)
                .bind(event_id)
                .bind(&code)
                .bind(&message)
                .execute(self.pool())
                .await
                .map_err(CommandError::store)?;
                Ok(RetryOutcome::StillFailing { code, message })
            }
            Err(StepError::Transient(error)) => Err(error),
        }
    }
}
