//! Read your writes. A mutation answers with the log position of what it wrote; a query given that position
//! (`waitFor`) waits until its read model shows it — including what the process manager wrote in reaction (a
//! fill booked on the portfolio, a cancel's reservation released), so a caller never guesses how long to wait.
//!
//! "Shows it", for the read model of one aggregate (a portfolio in `positions`, an order in `orders`), means:
//! 1. the process manager's cursor has passed the position, so every reaction to the events up to it is in the
//!    log (skipped when no process manager has ever run against this database: nothing will react);
//! 2. then the projection has applied every event of the aggregate that was in the log at that moment.
//!
//! The target of step 2 is fixed once step 1 holds, so a busy aggregate cannot keep a waiter chasing its head.
//! A waiter looks again when woken — the projection workers and the process manager notify
//! [`PROGRESS_CHANNEL`](crate::log::PROGRESS_CHANNEL) when they move (the API's feed hub relays it) — or at the latest every
//! [`FALLBACK_POLL_MS`], and gives up at the caller's deadline.

use std::time::Duration;

use sqlx::PgPool;

use crate::log::LogPosition;
use crate::process::PROCESS_MANAGER;

/// Longest a waiter goes without looking again, in case a notification was missed.
pub const FALLBACK_POLL_MS: u64 = 1_000;

/// A read model that can be waited for, with the aggregate type whose events it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadModel {
    /// `positions`: a portfolio's cash, positions and lots.
    Portfolio,
    /// `orders`: an order's blotter row and executions.
    Order,
    /// `performance`: a portfolio's flows.
    Performance,
}

impl ReadModel {
    fn aggregate_type(self) -> &'static str {
        match self {
            Self::Portfolio | Self::Performance => "Portfolio",
            Self::Order => "Order",
        }
    }

    fn progress_query(self) -> &'static str {
        match self {
            Self::Portfolio => "select coalesce(max(last_sequence), 0) from positions_progress where aggregate_id = $1",
            Self::Order => "select coalesce(max(last_sequence), 0) from orders_progress where aggregate_id = $1",
            Self::Performance => {
                "select coalesce(max(last_sequence), 0) from performance_progress where aggregate_id = $1"
            }
        }
    }
}

/// Whether the process manager has passed `position` (true when no process manager ever ran).
pub async fn process_manager_passed(pool: &PgPool, position: LogPosition) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "select coalesce((select (transaction_id, global_position) >= ($2::text::xid8, $3)
                            from log_cursors where name = $1), true)",
    )
    .bind(PROCESS_MANAGER)
    .bind(position.transaction_id.to_string())
    .bind(position.global_position)
    .fetch_one(pool)
    .await
}

/// Waits until `read_model` shows `position` for `aggregate_id` (see the module docs); false if `deadline`
/// passed first. `woken()` is called before each look and returns what to await after it: a progress
/// notification (subscribe when called, so that one arriving during the look is not missed).
pub async fn wait_until_visible<W, F>(
    pool: &PgPool,
    read_model: ReadModel,
    aggregate_id: &str,
    position: LogPosition,
    deadline: tokio::time::Instant,
    mut woken: W,
) -> Result<bool, sqlx::Error>
where
    W: FnMut() -> F,
    F: std::future::Future<Output = ()>,
{
    let mut target: Option<i64> = None;
    loop {
        let wake = woken();
        if target.is_none() && process_manager_passed(pool, position).await? {
            target = Some(crate::log::aggregate_head(pool, read_model.aggregate_type(), aggregate_id).await?);
        }
        if let Some(target) = target {
            let applied: i64 =
                sqlx::query_scalar(read_model.progress_query()).bind(aggregate_id).fetch_one(pool).await?;
            if applied >= target {
                return Ok(true);
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let fallback = Duration::from_millis(FALLBACK_POLL_MS).min(deadline - now);
        tokio::select! {
            _ = wake => {}
            _ = tokio::time::sleep(fallback) => {}
        }
    }
}
