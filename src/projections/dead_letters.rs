//! Resolving dead letters: messages a projection could not apply (recorded by the workers and the catch-up,
//! see `worker`), which an operator replays once the cause is fixed, or discards.
//!
//! A replay applies the message to its projection in the transaction that marks it replayed, with who did it:
//! it is applied at most once, and a replay that fails again changes nothing (the letter stays open with the
//! new reason returned). An event is taken from the log by its id (the log is the source of truth; the dead
//! letter only says which one), or by its global position for one dead-lettered during a catch-up; a tick from
//! the message itself. The replay runs as a live writer of the projection (a rebuild's swap waits for it) and
//! holds the progress row of the event's aggregate or the tick's symbol, as the workers' batches do. The
//! projection's progress is not moved: it passed the message when it was dead-lettered, so the replay applies
//! its effect now, after the inputs that followed it. A tick is replayed only into a projection that says a late
//! tick is safe ([`Projection::applies_late_ticks`]: prices, whose rows keep the newest by time); for the others,
//! and for a projection whose rows fold many events in order, rebuilding it (`ledger replay NAME`) applies the
//! log in order, after which its open dead letters are discarded.

use std::sync::Arc;

use sqlx::{PgConnection, PgPool, Row};

use super::applier::{run, Input};
use super::{ApplyError, Projection};
use crate::log::RecordedEvent;
use crate::market::Tick;
use crate::relay::Envelope;

/// Longest reason kept with a discard.
pub const DISCARD_REASON_LEN_MAX: usize = 300;

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Applied to its projection and marked replayed.
    Applied,
    /// No open dead letter with that id (unknown, or already replayed or discarded).
    NotOpen,
    /// Its projection does not apply it (again): the reason; the letter stays open.
    Refused(String),
}

/// The input a dead letter stands for.
enum Replayed {
    Event(Box<RecordedEvent>),
    Tick(Tick),
}

/// Replays open dead letter `id` into its projection (one of `projections`, by name), recording `by`.
pub async fn replay(
    pool: &PgPool,
    projections: &[Arc<dyn Projection>],
    id: i64,
    by: &str,
) -> Result<ReplayOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "select projection, source_topic, source_offset, payload from dead_letters
          where id = $1 and resolved_at is null for update",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(ReplayOutcome::NotOpen) };
    let name: String = row.try_get("projection")?;
    let Some(projection) = projections.iter().find(|p| p.name() == name) else {
        return Ok(ReplayOutcome::Refused(format!("no projection {name} in this ledger")));
    };
    // As a live writer: a rebuild's swap waits for the replay (and the replay for the swap).
    super::catch_up::enter(&mut tx, projection.as_ref(), super::catch_up::Target::Live).await?;
    let input = match input(
        &mut tx,
        &row.try_get::<String, _>("source_topic")?,
        row.try_get("source_offset")?,
        row.try_get("payload")?,
    )
    .await
    {
        Ok(input) => input,
        Err(reason) => return Ok(ReplayOutcome::Refused(reason)),
    };
    let applied = match &input {
        Replayed::Event(event) => {
            // Serialised with the workers on the same aggregate: they lock its progress row for their batch.
            let table = super::progress_table(projection.as_ref());
            sqlx::query(&format!("select 1 from {table} where aggregate_id = $1 for update"))
                .bind(&event.aggregate_id)
                .execute(&mut *tx)
                .await?;
            run(&mut tx, projection.as_ref(), Input::Event(event)).await
        }
        Replayed::Tick(_) if !projection.applies_late_ticks() => {
            return Ok(ReplayOutcome::Refused(format!(
                "{name} applies ticks in order only (a late one would count as the newest): rebuild it \
                 (ledger replay {name}) and discard this letter"
            )));
        }
        Replayed::Tick(tick) => {
            let table = super::tick_progress_table(projection.as_ref());
            sqlx::query(&format!("select 1 from {table} where symbol = $1 for update"))
                .bind(tick.symbol.as_str())
                .execute(&mut *tx)
                .await?;
            run(&mut tx, projection.as_ref(), Input::Tick(tick)).await
        }
    };
    match applied {
        Ok(()) => {}
        Err(ApplyError::Poison(reason)) => return Ok(ReplayOutcome::Refused(reason)),
        Err(ApplyError::Database(error)) => return Err(error),
    }
    sqlx::query("update dead_letters set resolved_at = now(), resolved_by = $2, resolution = 'replayed' where id = $1")
        .bind(id)
        .bind(by)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ReplayOutcome::Applied)
}

/// What a dead letter's message stands for: an event (read again from the log) or a tick.
async fn input(
    conn: &mut PgConnection,
    source_topic: &str,
    source_offset: i64,
    payload: Option<Vec<u8>>,
) -> Result<Replayed, String> {
    let event = if source_topic == "log" {
        crate::log::event_at(&mut *conn, source_offset).await
    } else if let Some(envelope) = payload.as_deref().and_then(|p| Envelope::decode(p).ok()) {
        crate::log::event_by_id(&mut *conn, envelope.event_id).await
    } else {
        let payload = payload.ok_or("the dead letter has no message")?;
        return Tick::decode(&payload)
            .map(Replayed::Tick)
            .map_err(|e| format!("neither an event envelope nor a tick: {e}"));
    };
    match event {
        Ok(Some(event)) => Ok(Replayed::Event(Box::new(event))),
        Ok(None) => Err("the event is not in the log".into()),
        Err(error) => Err(format!("reading the event: {error}")),
    }
}

/// Discards open dead letter `id` with `reason`, recording `by`; false if there was no open one.
pub async fn discard(pool: &PgPool, id: i64, by: &str, reason: &str) -> Result<bool, sqlx::Error> {
    let reason: String = reason.chars().take(DISCARD_REASON_LEN_MAX).collect();
    let result = sqlx::query(
        "update dead_letters set resolved_at = now(), resolved_by = $2, resolution = 'discarded', resolution_note = $3
          where id = $1 and resolved_at is null",
    )
    .bind(id)
    .bind(by)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(result.rows_affected() == 1)
}
