//! What operators watch and act on: process-manager steps that could not be applied (listed for auditors and
//! admins, retried or dismissed by admins), dead letters (replayed or discarded by admins; listed by
//! `deadLetters`) and portfolios in deficit. Both are also metrics
//! (`ledger_process_failures`, `ledger_portfolios_in_deficit`); docs/operations.md says what to do about each.

use async_graphql::connection::{Connection, Edge};
use async_graphql::{Context, Object, Result, SimpleObject};
use chrono::{DateTime, Utc};
use ledger::process::failures::{self, ProcessFailure as FailureRow, RetryOutcome};
use ledger::process::{ProcessConfig, ProcessManager};
use ledger::projections::dead_letters::{self, ReplayOutcome};
use ledger::queries::portfolios::{in_deficit, DeficitRow};
use rust_decimal::Decimal;
use uuid::Uuid;

use super::errors::{command, database, forbidden, invalid};
use super::{page_size, principal, state};
use crate::auth::Principal;

/// A step of the process manager that was refused, with how it was resolved (if it was).
#[derive(SimpleObject, Clone, Debug)]
pub struct ProcessFailure {
    /// The order event the step reacted to.
    pub event_id: Uuid,
    pub global_position: i64,
    /// The refusal's code (e.g. `NO_RESERVATION`), the latest if it was retried.
    pub error_code: String,
    pub error: String,
    pub recorded_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<String>,
    /// `retried` (the step then succeeded) or `dismissed`.
    pub resolution: Option<String>,
}

impl From<FailureRow> for ProcessFailure {
    fn from(row: FailureRow) -> Self {
        Self {
            event_id: row.event_id,
            global_position: row.global_position,
            error_code: row.error_code,
            error: row.error,
            recorded_at: row.recorded_at,
            resolved_at: row.resolved_at,
            resolved_by: row.resolved_by,
            resolution: row.resolution,
        }
    }
}

/// A portfolio whose buying power is below zero.
#[derive(SimpleObject, Clone, Debug)]
pub struct PortfolioDeficit {
    pub portfolio_id: Uuid,
    pub owner: String,
    pub cash: Decimal,
    pub reserved: Decimal,
    /// reserved − cash.
    pub deficit: Decimal,
    pub updated_at: DateTime<Utc>,
}

impl From<DeficitRow> for PortfolioDeficit {
    fn from(row: DeficitRow) -> Self {
        Self {
            portfolio_id: row.portfolio_id,
            owner: row.owner,
            cash: row.cash,
            reserved: row.reserved_cash,
            deficit: row.deficit,
            updated_at: row.updated_at,
        }
    }
}

/// What `replayDeadLetter` did.
#[derive(SimpleObject, Clone, Debug)]
pub struct ReplayDeadLetterPayload {
    /// True when the message was applied to its projection and the dead letter is resolved.
    pub replayed: bool,
    /// `REFUSED` (its projection still cannot apply it; it stays open) or `NOT_OPEN`.
    pub error_code: Option<String>,
    pub error: Option<String>,
}

/// What `retryProcessFailure` did.
#[derive(SimpleObject, Clone, Debug)]
pub struct RetryProcessFailurePayload {
    /// True when the step succeeded now and the failure is resolved.
    pub resolved: bool,
    /// Why it was refused again (the failure stays open), or `NOT_OPEN` when there was no open failure.
    pub error_code: Option<String>,
    pub error: Option<String>,
}

fn operator<'a>(ctx: &Context<'a>) -> Result<&'a Principal> {
    let principal = principal(ctx)?;
    if principal.can_read_log() {
        Ok(principal)
    } else {
        Err(forbidden())
    }
}

fn admin<'a>(ctx: &Context<'a>) -> Result<&'a Principal> {
    let principal = principal(ctx)?;
    if principal.is_admin() {
        Ok(principal)
    } else {
        Err(forbidden())
    }
}

fn id_cursor(after: Option<&str>) -> Result<Option<i64>> {
    after.map(|a| a.parse().map_err(|_| invalid("bad cursor"))).transpose()
}

#[derive(Default)]
pub struct OperationsQuery;

#[Object]
impl OperationsQuery {
    /// Steps the process manager could not apply, oldest first (`open: false` includes resolved ones). Auditors
    /// and admins. Remedy: fix the cause, then `retryProcessFailure` (or dismiss it); see docs/operations.md.
    #[graphql(complexity = "super::page_size(first) * child_complexity")]
    async fn process_failures(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = true)] open: bool,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, ProcessFailure>> {
        operator(ctx)?;
        let limit = page_size(first);
        let rows = failures::list(&state(ctx).pool, open, id_cursor(after.as_deref())?, limit as i64 + 1)
            .await
            .map_err(database)?;
        let mut connection = Connection::new(after.is_some(), rows.len() > limit);
        connection
            .edges
            .extend(rows.into_iter().take(limit).map(|row| Edge::new(row.id.to_string(), ProcessFailure::from(row))));
        Ok(connection)
    }

    /// Portfolios in deficit (buying power below zero), by id. Auditors and admins.
    #[graphql(complexity = "super::page_size(first) * child_complexity")]
    async fn portfolios_in_deficit(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, PortfolioDeficit>> {
        operator(ctx)?;
        let limit = page_size(first);
        let after_id = after.as_deref().map(|a| Uuid::parse_str(a).map_err(|_| invalid("bad cursor"))).transpose()?;
        let rows = in_deficit(&state(ctx).pool, after_id, limit as i64 + 1).await.map_err(database)?;
        let mut connection = Connection::new(after.is_some(), rows.len() > limit);
        connection.edges.extend(
            rows.into_iter()
                .take(limit)
                .map(|row| Edge::new(row.portfolio_id.to_string(), PortfolioDeficit::from(row))),
        );
        Ok(connection)
    }
}

#[derive(Default)]
pub struct OperationsMutation;

#[Object]
impl OperationsMutation {
    /// Runs a failed process-manager step again, under the idempotency keys of its first run (it can never act
    /// twice), and resolves the failure if it succeeds. Admins only.
    async fn retry_process_failure(&self, ctx: &Context<'_>, event_id: Uuid) -> Result<RetryProcessFailurePayload> {
        let principal = admin(ctx)?;
        let manager = ProcessManager::new(state(ctx).commands.clone(), ProcessConfig::default());
        let outcome = manager.retry_failure(event_id, &principal.subject).await.map_err(command)?;
        Ok(match outcome {
            RetryOutcome::Applied => RetryProcessFailurePayload { resolved: true, error_code: None, error: None },
            RetryOutcome::StillFailing { code, message } => {
                RetryProcessFailurePayload { resolved: false, error_code: Some(code), error: Some(message) }
            }
            RetryOutcome::NotOpen => RetryProcessFailurePayload {
                resolved: false,
                error_code: Some("NOT_OPEN".into()),
                error: Some("no open failure for this event".into()),
            },
        })
    }

    /// Marks a failure as dealt with outside the ledger (it stays listed with `open: false`). Admins only.
    /// Returns false when there was no open failure for the event.
    async fn dismiss_process_failure(&self, ctx: &Context<'_>, event_id: Uuid) -> Result<bool> {
        let principal = admin(ctx)?;
        failures::dismiss(&state(ctx).pool, event_id, &principal.subject).await.map_err(database)
    }

    /// Applies a dead letter to its projection once its cause is fixed, and marks it replayed by the caller (in
    /// one transaction: at most once). Admins only. See docs/operations.md.
    async fn replay_dead_letter(&self, ctx: &Context<'_>, id: i64) -> Result<ReplayDeadLetterPayload> {
        let (principal, state) = (admin(ctx)?, state(ctx));
        let projections = ledger::projections::all(&state.settings);
        let outcome =
            dead_letters::replay(&state.pool, &projections, id, &principal.subject).await.map_err(database)?;
        Ok(match outcome {
            ReplayOutcome::Applied => ReplayDeadLetterPayload { replayed: true, error_code: None, error: None },
            ReplayOutcome::NotOpen => ReplayDeadLetterPayload {
                replayed: false,
                error_code: Some("NOT_OPEN".into()),
                error: Some("no open dead letter with this id".into()),
            },
            ReplayOutcome::Refused(reason) => {
                ReplayDeadLetterPayload { replayed: false, error_code: Some("REFUSED".into()), error: Some(reason) }
            }
        })
    }

    /// Marks a dead letter as dealt with, with the reason (it stays listed with its resolution). Admins only.
    /// Returns false when there was no open dead letter with this id.
    async fn discard_dead_letter(&self, ctx: &Context<'_>, id: i64, reason: String) -> Result<bool> {
        let principal = admin(ctx)?;
        let reason = ledger::domain::values::FreeText::new("reason", reason).map_err(super::errors::value)?;
        dead_letters::discard(&state(ctx).pool, id, &principal.subject, reason.as_str()).await.map_err(database)
    }
}
