//! Applies batches of events or ticks to a projection exactly once, inside the caller's transaction.
//!
//! Fast path: every input applied in one go. If one input turns out to be poison, the caller rolls the
//! transaction back and applies the batch again with `isolate = true`: each input under a savepoint, so the
//! poisoned one is skipped (and reported) while the others are applied.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

use super::{progress_table, tick_progress_table, ApplyError, Projection};
use crate::log::RecordedEvent;
use crate::market::Tick;

/// One input that could not be applied.
#[derive(Debug, Clone)]
pub struct Poisoned {
    /// Its index in the batch, or `None` for an event fetched from the log to fill a gap.
    pub index: Option<usize>,
    pub error: String,
}

#[derive(Debug, Default, Clone)]
pub struct Applied {
    pub applied: usize,
    pub duplicates: usize,
    /// Events missing from the stream (a sequence gap) that were read from the log and applied.
    pub gap_filled: usize,
    pub poisoned: Vec<Poisoned>,
}

/// Where a planned event comes from: the batch, or the log (a gap).
enum Planned {
    Batch(usize),
    Gap(usize),
}

/// One input to apply.
#[derive(Clone, Copy)]
pub(crate) enum Input<'a> {
    Event(&'a RecordedEvent),
    Tick(&'a Tick),
}

/// Applies one input as it is (ticks archived first for a projection rebuilt from them), without the progress
/// bookkeeping: the callers below do that, and a dead letter's replay needs none.
pub(crate) async fn run(
    conn: &mut PgConnection,
    projection: &dyn Projection,
    input: Input<'_>,
) -> Result<(), ApplyError> {
    match input {
        Input::Event(event) => projection.apply_event(conn, event).await,
        Input::Tick(tick) => {
            if projection.rebuilds_from_ticks() {
                archive_tick(conn, projection.name(), tick).await?;
            }
            projection.apply_tick(conn, tick).await
        }
    }
}

/// Stores the tick in the archive as applied by `projection` (idempotent). Done here, before the projection
/// applies the tick and in the same transaction, for every projection that is rebuilt from the archive
/// ([`Projection::rebuilds_from_ticks`]), so that its rebuild replays exactly the ticks it applied.
async fn archive_tick(conn: &mut PgConnection, projection: &str, tick: &Tick) -> Result<(), ApplyError> {
    sqlx::query(
        "insert into public.market_ticks (projection, symbol, ts, seq, price, volume, source)
         values ($1, $2, $3, $4, $5, $6, $7)
         on conflict (projection, symbol, ts, seq) do nothing",
    )
    .bind(projection)
    .bind(tick.symbol.as_str())
    .bind(tick.ts)
    .bind(tick.seq)
    .bind(tick.price.value())
    .bind(tick.volume)
    .bind(&tick.source)
    .execute(conn)
    .await?;
    Ok(())
}

/// Applies one input; with `isolate`, under a savepoint so that a poison error can be skipped.
async fn apply_one(
    conn: &mut PgConnection,
    projection: &dyn Projection,
    isolate: bool,
    index: Option<usize>,
    outcome: &mut Applied,
    input: Input<'_>,
) -> Result<(), ApplyError> {
    if !isolate {
        run(conn, projection, input).await?;
        outcome.applied += 1;
        return Ok(());
    }
    sqlx::query("savepoint apply_one").execute(&mut *conn).await.map_err(ApplyError::Database)?;
    match run(conn, projection, input).await {
        Ok(()) => {
            sqlx::query("release savepoint apply_one").execute(&mut *conn).await.map_err(ApplyError::Database)?;
            outcome.applied += 1;
            Ok(())
        }
        Err(ApplyError::Poison(error)) => {
            sqlx::query("rollback to savepoint apply_one").execute(&mut *conn).await.map_err(ApplyError::Database)?;
            outcome.poisoned.push(Poisoned { index, error });
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Applies the events of `events` that belong to the projection's aggregate type.
pub async fn apply_events(
    conn: &mut PgConnection,
    projection: &dyn Projection,
    events: &[RecordedEvent],
    isolate: bool,
) -> Result<Applied, ApplyError> {
    let mut outcome = Applied::default();
    let Some(aggregate_type) = projection.aggregate_type() else { return Ok(outcome) };
    let relevant: Vec<(usize, &RecordedEvent)> =
        events.iter().enumerate().filter(|(_, e)| e.aggregate_type == aggregate_type).collect();
    if relevant.is_empty() {
        return Ok(outcome);
    }
    let table = progress_table(projection);
    let mut ids: Vec<String> = relevant.iter().map(|(_, e)| e.aggregate_id.clone()).collect();
    ids.sort();
    ids.dedup();
    // Create missing rows, then lock all of them in a fixed order (no deadlock between two workers).
    sqlx::query(&format!(
        "insert into {table} (aggregate_id, last_sequence) select unnest($1::text[]), 0 on conflict do nothing"
    ))
    .bind(&ids)
    .execute(&mut *conn)
    .await
    .map_err(ApplyError::Database)?;
    let rows = sqlx::query(&format!(
        "select aggregate_id, last_sequence from {table} where aggregate_id = any($1) order by aggregate_id for update"
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(ApplyError::Database)?;
    let mut last: HashMap<String, i64> =
        rows.iter().map(|r| (r.get::<String, _>("aggregate_id"), r.get::<i64, _>("last_sequence"))).collect();

    // Decide what to apply (skipping duplicates, reading gaps from the log), then apply it.
    let mut gap_events: Vec<RecordedEvent> = Vec::new();
    let mut plan: Vec<(Option<usize>, Planned)> = Vec::new();
    for (index, event) in relevant {
        let current = last.get(&event.aggregate_id).copied().unwrap_or(0);
        if event.sequence <= current {
            outcome.duplicates += 1;
            continue;
        }
        if event.sequence > current + 1 {
            let missing = read_missing(conn, event, current).await.map_err(ApplyError::Database)?;
            for gap_event in missing {
                gap_events.push(gap_event);
                plan.push((None, Planned::Gap(gap_events.len() - 1)));
                outcome.gap_filled += 1;
            }
        }
        plan.push((Some(index), Planned::Batch(index)));
        last.insert(event.aggregate_id.clone(), event.sequence);
    }
    let resolve = |planned: &Planned| match planned {
        Planned::Batch(i) => &events[*i],
        Planned::Gap(i) => &gap_events[*i],
    };
    if isolate {
        for (index, planned) in &plan {
            apply_one(conn, projection, true, *index, &mut outcome, Input::Event(resolve(planned))).await?;
        }
    } else if !plan.is_empty() {
        let ordered: Vec<&RecordedEvent> = plan.iter().map(|(_, planned)| resolve(planned)).collect();
        projection.apply_events(conn, &ordered).await?;
        outcome.applied += ordered.len();
    }

    let (ids, sequences): (Vec<String>, Vec<i64>) = last.into_iter().unzip();
    sqlx::query(&format!(
        "update {table} p set last_sequence = u.last_sequence
           from unnest($1::text[], $2::bigint[]) as u(aggregate_id, last_sequence)
          where p.aggregate_id = u.aggregate_id"
    ))
    .bind(&ids)
    .bind(&sequences)
    .execute(&mut *conn)
    .await
    .map_err(ApplyError::Database)?;
    // Delivered at commit: readers waiting for their writes (`visibility`) look again.
    sqlx::query("select pg_notify($1, $2)")
        .bind(crate::log::PROGRESS_CHANNEL)
        .bind(projection.name())
        .execute(&mut *conn)
        .await
        .map_err(ApplyError::Database)?;
    Ok(outcome)
}

/// The events of `event`'s aggregate between `after` and `event.sequence` (exclusive), from the log.
async fn read_missing(
    conn: &mut PgConnection,
    event: &RecordedEvent,
    after: i64,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    crate::log::aggregate_events_between(conn, &event.aggregate_type, &event.aggregate_id, after, event.sequence).await
}

/// Applies ticks, each at most once per `(symbol, ts, seq)` and only if newer than the last one of its symbol.
pub async fn apply_ticks(
    conn: &mut PgConnection,
    projection: &dyn Projection,
    ticks: &[Tick],
    isolate: bool,
) -> Result<Applied, ApplyError> {
    let mut outcome = Applied::default();
    if !projection.consumes_ticks() || ticks.is_empty() {
        return Ok(outcome);
    }
    let table = tick_progress_table(projection);
    let mut symbols: Vec<String> = ticks.iter().map(|t| t.symbol.as_str().to_string()).collect();
    symbols.sort();
    symbols.dedup();
    // As for events: create missing rows (at the epoch, before any tick), then lock them in a fixed order.
    sqlx::query(&format!(
        "insert into {table} (symbol, last_ts, last_seq)
         select unnest($1::text[]), 'epoch'::timestamptz, 0 on conflict do nothing"
    ))
    .bind(&symbols)
    .execute(&mut *conn)
    .await
    .map_err(ApplyError::Database)?;
    let rows = sqlx::query(&format!(
        "select symbol, last_ts, last_seq from {table} where symbol = any($1) order by symbol for update"
    ))
    .bind(&symbols)
    .fetch_all(&mut *conn)
    .await
    .map_err(ApplyError::Database)?;
    let mut last: HashMap<String, (DateTime<Utc>, i64)> = rows
        .iter()
        .map(|r| (r.get::<String, _>("symbol"), (r.get::<DateTime<Utc>, _>("last_ts"), r.get::<i64, _>("last_seq"))))
        .collect();
    // Symbol by symbol (arrival order within a symbol): a fixed lock order for the rows a batch touches, so that
    // two transactions of one projection (two workers during a rebalance) wait for each other, never deadlock.
    let mut ordered: Vec<(usize, &Tick)> = ticks.iter().enumerate().collect();
    ordered.sort_by(|a, b| a.1.symbol.as_str().cmp(b.1.symbol.as_str()));
    for (index, tick) in ordered {
        let symbol = tick.symbol.as_str();
        if last.get(symbol).is_some_and(|&seen| tick.order_key() <= seen) {
            outcome.duplicates += 1;
            continue;
        }
        apply_one(conn, projection, isolate, Some(index), &mut outcome, Input::Tick(tick)).await?;
        last.insert(symbol.to_string(), tick.order_key());
    }
    let mut names = Vec::with_capacity(last.len());
    let mut times = Vec::with_capacity(last.len());
    let mut seqs = Vec::with_capacity(last.len());
    for (symbol, (ts, seq)) in last {
        names.push(symbol);
        times.push(ts);
        seqs.push(seq);
    }
    sqlx::query(&format!(
        "update {table} p set last_ts = u.last_ts, last_seq = u.last_seq
           from unnest($1::text[], $2::timestamptz[], $3::bigint[]) as u(symbol, last_ts, last_seq)
          where p.symbol = u.symbol"
    ))
    .bind(&names)
    .bind(&times)
    .bind(&seqs)
    .execute(&mut *conn)
    .await
    .map_err(ApplyError::Database)?;
    Ok(outcome)
}
