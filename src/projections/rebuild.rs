//! Rebuilding a projection from the PostgreSQL log (and the tick archive) without stopping it.
//!
//! 1. Create empty copies of the projection's tables (and progress tables) in the `shadow` schema.
//! 2. Replay the log (and the archive) into them with `search_path = shadow`, while the live worker goes on:
//!    the log read in chunks of [`REPLAY_READ_BATCH`] (payloads as text, no metadata) and folded through the
//!    projection's [`ReplayFold`] — state held in memory, the net rows written once, or whenever the state held
//!    passes [`REPLAY_HELD_BYTES_MAX`] — or, for a projection without one, each chunk applied through its live
//!    `apply_events` (only the event types it applies). Projections rebuilt together
//!    ([`rebuild_together`], `ledger replay --all`) share one read of the log. The log is read
//!    at least up to the last event committed when the rebuild started: if a transaction elsewhere in the
//!    cluster holds the log's horizon below it, the rebuild waits for it (at most
//!    [`REBUILD_HORIZON_WAIT_MAX_SECS`]), so an offline `ledger replay` never leaves out what was committed.
//! 3. Catch the shadow up with what was committed meanwhile, without the lock; then take the projection's
//!    advisory lock exclusively (the live worker's transactions take it shared, so it pauses), replay the few
//!    events and ticks that arrived since, then, in the same transaction:
//!    - swap: move the live tables to `retired`, the shadow tables to `public`, drop the retired ones, recreate
//!      the views, and point the projection's catch-up cursor at the rebuilt position; or
//!    - verify: compare each rebuilt read-model table with its live twin (row count and an order-independent
//!      hash of the rows) and report the differences. A verifying rebuild applies exactly what the live
//!      projection says it has applied (events up to its progress per aggregate, ticks up to its progress per
//!      symbol), so a worker that is merely behind — or a horizon held back by a long transaction — is not a
//!      difference, while an event applied twice, skipped or applied wrongly is.
//! 4. Commit: the live worker resumes on the rebuilt tables. Its progress rows are the rebuilt ones, so every
//!    message it then sees is either already applied (skipped) or new.
//!
//! Alert firings are not part of a rebuild (they come from ticks, which the alerts projection does not
//! replay): rules are rebuilt from the log and take their state from the existing firings, so nothing fires
//! twice. (Deficit notices, which come from events, are written again as the rebuild meets them: their ids
//! derive from the event's, so each stays one row.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool};

use super::applier::{apply_events, apply_ticks};
use super::catch_up::{archive_symbols, enter, projection_lock, read_archive, Target};
use super::{progress_table, rebuilt_tables, tick_progress_table, ApplyError, Projection, ReplayFold, Skipped};
use crate::log::{reset_cursor, LogPosition, LogReader, RawEvent, RecordedEvent};
use crate::market::Tick;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildMode {
    /// Replace the live tables with the rebuilt ones.
    Swap,
    /// Compare the rebuilt tables with the live ones; change nothing.
    Verify,
}

/// One table whose rebuilt content differs from the live content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDifference {
    pub table: String,
    pub live_rows: i64,
    pub rebuilt_rows: i64,
}

#[derive(Debug, Clone)]
pub struct RebuildReport {
    pub projection: &'static str,
    pub events: u64,
    pub ticks: u64,
    pub seconds: f64,
    /// Verify mode: the tables that differ (empty when identical).
    pub differences: Vec<TableDifference>,
}

/// Progress of a rebuild: `(inputs read so far, inputs to read)`.
pub type ProgressFn<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

/// Ticks per transaction during a rebuild, and events per read of what was committed after the bulk (the catch-up
/// before the lock and the delta under it).
pub const REBUILD_BATCH_SIZE: usize = 2_000;
/// Events per read of the log in a rebuild's bulk.
pub const REPLAY_READ_BATCH: usize = crate::log::BATCH_SIZE_MAX;
/// The state the folds of a rebuild may hold together before those that gathered their share of it since their last
/// write write it to the shadow tables (and forget it).
pub const REPLAY_HELD_BYTES_MAX: usize = 256 << 20;
/// How long the statements of a fold's flush may take (the whole state is written in one statement per table).
pub const REPLAY_FLUSH_TIMEOUT_SECS: u64 = 600;
/// Rough bytes of one aggregate's progress entry held by a fold.
const PROGRESS_ENTRY_BYTES: usize = 96;

/// Bounds of a rebuild's replay fold; the defaults are [`REPLAY_READ_BATCH`] and [`REPLAY_HELD_BYTES_MAX`].
#[derive(Debug, Clone, Copy)]
pub struct ReplayLimits {
    /// Events per read of the log (clamped to the reader's maximum).
    pub read_batch: usize,
    /// State held in memory by all the folds together before a flush to the shadow tables (0: every fold that
    /// gathered anything since its last flush flushes after every read).
    pub held_bytes_max: usize,
}

impl Default for ReplayLimits {
    fn default() -> Self {
        Self { read_batch: REPLAY_READ_BATCH, held_bytes_max: REPLAY_HELD_BYTES_MAX }
    }
}

/// The bulk of one projection's rebuild: the log folded through its [`ReplayFold`] (or [`Applying`] when it has
/// none), with the progress per aggregate beside it.
struct Folding {
    fold: Box<dyn ReplayFold>,
    /// Last sequence folded per aggregate (kept across flushes: the next event of each must follow it), and whether
    /// it was folded since the last flush (its progress row is then written by the next one).
    last: HashMap<String, (i64, bool)>,
}

impl Folding {
    fn new(projection: &Arc<dyn Projection>) -> Self {
        let fold = projection.replay_fold().unwrap_or_else(|| Box::new(Applying { projection: projection.clone() }));
        Self { fold, last: HashMap::new() }
    }

    /// Roughly the bytes held in memory: the fold's state and the progress entries.
    fn held_bytes(&self) -> usize {
        self.fold.held_bytes() + self.last.len() * PROGRESS_ENTRY_BYTES
    }

    /// Folds `events` (of the projection's aggregate type, new ones only, in log order) in a transaction on the
    /// shadow tables.
    async fn take(
        &mut self,
        pool: &PgPool,
        projection: &dyn Projection,
        events: &[&RawEvent],
    ) -> Result<(), ApplyError> {
        for event in events {
            match self.last.get_mut(&event.aggregate_id) {
                // The log holds an aggregate's events in sequence order (a command is written only after the
                // previous one of its aggregate committed); anything else is a log the fold must not guess about.
                Some((last, _)) if event.sequence != *last + 1 => {
                    return Err(ApplyError::Database(sqlx::Error::Protocol(format!(
                        "rebuild: event {} of {} {} follows event {} in the log (at {})",
                        event.sequence, event.aggregate_type, event.aggregate_id, last, event.position
                    ))));
                }
                Some(last) => *last = (event.sequence, true),
                None => {
                    self.last.insert(event.aggregate_id.clone(), (event.sequence, true));
                }
            }
        }
        // A transaction on the shadow tables: the fold reads back rows it flushed earlier.
        let mut tx = pool.begin().await.map_err(ApplyError::Database)?;
        enter(&mut tx, projection, Target::Shadow).await.map_err(ApplyError::Database)?;
        let skipped = self.fold.fold(&mut tx, events).await?;
        tx.commit().await.map_err(ApplyError::Database)?;
        for (index, reason) in skipped {
            let event = events[index];
            tracing::warn!(projection = projection.name(), position = %event.position, %reason,
                "rebuild: skipped an event that cannot be applied (the live worker dead-letters it)");
        }
        Ok(())
    }

    /// Writes the state held and the progress of every aggregate folded since the last flush, in one
    /// transaction. (An aggregate's last sequence stays held, to check its next event.)
    async fn flush(&mut self, pool: &PgPool, projection: &dyn Projection) -> Result<(), ApplyError> {
        let mut tx = pool.begin().await.map_err(ApplyError::Database)?;
        enter(&mut tx, projection, Target::Shadow).await.map_err(ApplyError::Database)?;
        // One statement per table for everything held: more than the pool's statement timeout allows.
        sqlx::query(&format!("set local statement_timeout = '{REPLAY_FLUSH_TIMEOUT_SECS}s'"))
            .execute(&mut *tx)
            .await
            .map_err(ApplyError::Database)?;
        self.fold.flush(&mut tx).await?;
        let (mut ids, mut sequences) = (Vec::new(), Vec::new());
        for (id, (sequence, unflushed)) in self.last.iter_mut() {
            if std::mem::take(unflushed) {
                ids.push(id.as_str());
                sequences.push(*sequence);
            }
        }
        sqlx::query(&format!(
            "insert into {} (aggregate_id, last_sequence) select * from unnest($1::text[], $2::bigint[])
             on conflict (aggregate_id) do update set last_sequence = excluded.last_sequence",
            progress_table(projection)
        ))
        .bind(&ids)
        .bind(&sequences)
        .execute(&mut *tx)
        .await
        .map_err(ApplyError::Database)?;
        tx.commit().await.map_err(ApplyError::Database)
    }
}

/// The replay of a projection without a fold of its own: each read of the log applied through its live
/// [`Projection::apply_events`] in the rebuild's transaction — only the event types it applies
/// ([`Projection::applies_event_type`]), parsed without their metadata — holding nothing between reads. A read
/// with a poison event is applied again event by event, each under a savepoint, and the poison ones skipped (the
/// live worker dead-letters them too).
struct Applying {
    projection: Arc<dyn Projection>,
}

#[async_trait]
impl ReplayFold for Applying {
    async fn fold(&mut self, conn: &mut PgConnection, events: &[&RawEvent]) -> Result<Vec<Skipped>, ApplyError> {
        let mut skipped = Vec::new();
        let mut wanted = Vec::new();
        for (index, event) in events.iter().enumerate() {
            if !self.projection.applies_event_type(&event.event_type) {
                continue;
            }
            match event.to_recorded() {
                Ok(recorded) => wanted.push((index, recorded)),
                Err(error) => skipped.push((index, ApplyError::from(error).to_string())),
            }
        }
        if wanted.is_empty() {
            return Ok(skipped);
        }
        let all: Vec<&RecordedEvent> = wanted.iter().map(|(_, event)| event).collect();
        savepoint(conn, "savepoint replay_read").await?;
        match self.projection.apply_events(conn, &all).await {
            Ok(()) => {
                savepoint(conn, "release savepoint replay_read").await?;
                return Ok(skipped);
            }
            Err(ApplyError::Poison(_)) => savepoint(conn, "rollback to savepoint replay_read").await?,
            Err(error) => return Err(error),
        }
        for (index, event) in &wanted {
            savepoint(conn, "savepoint replay_event").await?;
            match self.projection.apply_events(conn, &[event]).await {
                Ok(()) => savepoint(conn, "release savepoint replay_event").await?,
                Err(ApplyError::Poison(reason)) => {
                    savepoint(conn, "rollback to savepoint replay_event").await?;
                    skipped.push((*index, reason));
                }
                Err(error) => return Err(error),
            }
        }
        savepoint(conn, "release savepoint replay_read").await?;
        skipped.sort_unstable_by_key(|(index, _)| *index);
        Ok(skipped)
    }

    fn held_bytes(&self) -> usize {
        0
    }

    async fn flush(&mut self, _conn: &mut PgConnection) -> Result<(), ApplyError> {
        Ok(())
    }
}

/// Runs a savepoint statement.
async fn savepoint(conn: &mut PgConnection, statement: &str) -> Result<(), ApplyError> {
    sqlx::query(statement).execute(conn).await.map(|_| ()).map_err(ApplyError::Database)
}

async fn prepare_shadow(pool: &PgPool, projection: &dyn Projection) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for table in rebuilt_tables(projection) {
        sqlx::query(&format!("drop table if exists shadow.{table}")).execute(&mut *tx).await?;
        sqlx::query(&format!("create table shadow.{table} (like public.{table} including all)"))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

async fn drop_shadow(pool: &PgPool, projection: &dyn Projection) -> Result<(), sqlx::Error> {
    for table in rebuilt_tables(projection) {
        sqlx::query(&format!("drop table if exists shadow.{table}")).execute(pool).await?;
    }
    Ok(())
}

/// Inputs a rebuild of `projections` will read, for the progress bar: the log's events (read once for all the
/// projections of events) and each projection's archived ticks.
async fn total_inputs(pool: &PgPool, projections: &[Arc<dyn Projection>]) -> Result<u64, sqlx::Error> {
    let mut total = 0i64;
    if projections.iter().any(|p| p.aggregate_type().is_some()) {
        total += sqlx::query_scalar::<_, i64>("select count(*) from events").fetch_one(pool).await?;
    }
    for projection in projections.iter().filter(|p| p.rebuilds_from_ticks()) {
        total += sqlx::query_scalar::<_, i64>("select count(*) from market_ticks where projection = $1")
            .bind(projection.name())
            .fetch_one(pool)
            .await?;
    }
    Ok(total as u64)
}

/// How long a rebuild waits at most for the log's horizon to pass what was committed before it started.
pub const REBUILD_HORIZON_WAIT_MAX_SECS: u64 = 300;
const REBUILD_HORIZON_POLL_MS: u64 = 20;

/// Rebuilds `projection` (see the module docs).
pub async fn rebuild(
    pool: &PgPool,
    projection: &Arc<dyn Projection>,
    mode: RebuildMode,
    progress: ProgressFn<'_>,
) -> Result<RebuildReport, ApplyError> {
    rebuild_with(pool, projection, mode, ReplayLimits::default(), progress).await
}

/// [`rebuild`] with the replay fold's bounds given.
pub async fn rebuild_with(
    pool: &PgPool,
    projection: &Arc<dyn Projection>,
    mode: RebuildMode,
    limits: ReplayLimits,
    progress: ProgressFn<'_>,
) -> Result<RebuildReport, ApplyError> {
    let mut reports = rebuild_together(pool, std::slice::from_ref(projection), mode, limits, progress).await?;
    Ok(reports.remove(0))
}

/// One projection's part of a rebuild.
struct Rebuilding {
    projection: Arc<dyn Projection>,
    /// The fold of the log's bulk, for a projection of events.
    folding: Option<Folding>,
    /// Verify mode: the live progress of each aggregate as first seen (see [`within_live_progress`]).
    live: HashMap<String, i64>,
}

impl Rebuilding {
    fn held_bytes(&self) -> usize {
        self.folding.as_ref().map_or(0, Folding::held_bytes)
    }

    /// Folds the events of `batch` of the projection's aggregate type (when verifying, those the live projection
    /// has applied).
    async fn take(&mut self, pool: &PgPool, batch: &[RawEvent], verify: bool) -> Result<(), ApplyError> {
        let (Some(aggregate_type), Some(folding)) = (self.projection.aggregate_type(), self.folding.as_mut()) else {
            return Ok(());
        };
        let mut events: Vec<&RawEvent> = batch.iter().filter(|e| e.aggregate_type == aggregate_type).collect();
        if verify {
            events = within_live_progress(pool, &*self.projection, &mut self.live, events).await?;
        }
        if !events.is_empty() {
            folding.take(pool, &*self.projection, &events).await?;
        }
        Ok(())
    }

    /// Writes what the fold holds (see [`Folding::flush`]).
    async fn flush(&mut self, pool: &PgPool) -> Result<(), ApplyError> {
        match self.folding.as_mut() {
            Some(folding) => folding.flush(pool, &*self.projection).await,
            None => Ok(()),
        }
    }
}

/// Reads of the log a projection's fold may lag behind the reading (each read is shared by all the folds).
const FOLD_BATCHES_AHEAD: usize = 2;

/// The state the folds of a rebuild hold, each as it last said, against their common bound.
struct HeldBytes {
    each: Vec<std::sync::atomic::AtomicUsize>,
    /// The bound's share of each fold.
    share: usize,
    max: usize,
}

impl HeldBytes {
    /// `slots` projections, `folds` of them with a fold of the log.
    fn new(slots: usize, folds: usize, max: usize) -> Self {
        Self { each: (0..slots).map(|_| Default::default()).collect(), share: max / folds.max(1), max }
    }

    /// Records what the fold in `slot` holds now (`held`, of which `kept` a flush cannot free: what it still held
    /// after its last flush); whether it is to flush: the folds together hold more than the bound, and this one
    /// has gathered at least its share since its last flush (with a bound of 0: anything). A fold holding little
    /// is left alone even when the sum is over: the one over its share flushes when it next reports.
    fn report(&self, slot: usize, held: usize, kept: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.each[slot].store(held, Relaxed);
        let sum: usize = self.each.iter().map(|each| each.load(Relaxed)).sum();
        let gathered = held.saturating_sub(kept);
        sum > self.max && gathered > 0 && gathered >= self.share
    }
}

/// The bulk of one projection's rebuild, on a task of its own (the folds decode on every core, and one waits
/// for PostgreSQL while another works): each read of the log from `batches`, in order, folded, and flushed
/// when it has gathered its share of the memory bound; at the end (the channel closed), everything it holds
/// written — unless the bulk was abandoned. A failure abandons the bulk (the other folds stop).
async fn fold_bulk(
    mut r: Rebuilding,
    mut batches: tokio::sync::mpsc::Receiver<Arc<Vec<RawEvent>>>,
    bulk: Bulk,
) -> (usize, Rebuilding, Result<(), ApplyError>) {
    let Bulk { pool, verify, held, slot, abandon } = bulk;
    let result = async {
        let mut kept = 0;
        while let Some(batch) = batches.recv().await {
            if abandon.is_cancelled() {
                return Ok(());
            }
            r.take(&pool, &batch, verify).await?;
            if abandon.is_cancelled() {
                return Ok(());
            }
            if held.report(slot, r.held_bytes(), kept) {
                r.flush(&pool).await?;
                kept = r.held_bytes();
                held.report(slot, kept, kept);
            }
        }
        if abandon.is_cancelled() {
            return Ok(());
        }
        r.flush(&pool).await
    }
    .await;
    if result.is_err() {
        abandon.cancel();
    }
    // Done: what it holds no longer counts against the others' bound.
    held.report(slot, 0, 0);
    (slot, r, result)
}

/// What a projection's [`fold_bulk`] shares with the rebuild.
struct Bulk {
    pool: PgPool,
    verify: bool,
    held: Arc<HeldBytes>,
    /// Its place in `held`.
    slot: usize,
    /// Set when the bulk has failed: stop, writing nothing more.
    abandon: tokio_util::sync::CancellationToken,
}

/// Rebuilds each of `projections` (see the module docs), reading the log once for all of them: each read of the
/// log is folded by every projection on a task of its own (each at its own pace, at most
/// [`FOLD_BATCHES_AHEAD`] reads queued for it), under one memory bound ([`ReplayLimits::held_bytes_max`] for the
/// folds' state together: once it is passed, a fold that gathered its share since its last flush flushes). Then
/// each projection in turn replays its ticks and swaps (or compares) its tables. Progress counts the log's events once, and each projection's ticks.
/// Each report's `events` are the log's events read in the bulk and those read after it for that projection
/// (before and under its lock); its `seconds` run from the start to its swap or comparison.
pub async fn rebuild_together(
    pool: &PgPool,
    projections: &[Arc<dyn Projection>],
    mode: RebuildMode,
    limits: ReplayLimits,
    progress: ProgressFn<'_>,
) -> Result<Vec<RebuildReport>, ApplyError> {
    let started = Instant::now();
    for (i, projection) in projections.iter().enumerate() {
        if projections[..i].iter().any(|p| p.name() == projection.name()) {
            return Err(ApplyError::Database(sqlx::Error::Protocol(format!(
                "rebuild: {} named twice (its shadow tables would be shared)",
                projection.name()
            ))));
        }
    }
    for projection in projections {
        prepare_shadow(pool, &**projection).await.map_err(ApplyError::Database)?;
    }
    let total = total_inputs(pool, projections).await.map_err(ApplyError::Database)?;
    let verify = mode == RebuildMode::Verify;
    let mut rebuilding: Vec<Rebuilding> = projections
        .iter()
        .map(|projection| Rebuilding {
            projection: projection.clone(),
            folding: projection.aggregate_type().map(|_| Folding::new(projection)),
            live: HashMap::new(),
        })
        .collect();
    let mut read = 0u64;
    let mut position = LogPosition::START;

    // 1. The bulk, while the live workers go on: at least everything committed before the rebuild started,
    //    even while a transaction elsewhere in the cluster holds the log's horizon back for a moment.
    if rebuilding.iter().any(|r| r.folding.is_some()) {
        let committed =
            crate::log::newest_position(pool, crate::log::Newest::Committed).await.map_err(ApplyError::Database)?;
        let mut batches = read_ahead(pool.clone(), position, limits.read_batch, committed);
        let folds = rebuilding.iter().filter(|r| r.folding.is_some()).count();
        let held = Arc::new(HeldBytes::new(rebuilding.len(), folds, limits.held_bytes_max));
        // Cancelled when the bulk fails: each fold then stops once the read it is folding is written, and writes
        // nothing more. (If this rebuild is dropped, so is `tasks`, which aborts them.)
        let abandon = tokio_util::sync::CancellationToken::new();
        let (mut senders, mut tasks) = (Vec::new(), tokio::task::JoinSet::new());
        // Each projection's part, in order, back from its fold's task (those without a fold have none).
        let mut done: Vec<Option<Rebuilding>> = Vec::with_capacity(rebuilding.len());
        for (slot, r) in rebuilding.drain(..).enumerate() {
            if r.folding.is_none() {
                done.push(Some(r));
                continue;
            }
            done.push(None);
            let (sender, receiver) = tokio::sync::mpsc::channel(FOLD_BATCHES_AHEAD);
            senders.push(sender);
            let bulk = Bulk { pool: pool.clone(), verify, held: held.clone(), slot, abandon: abandon.clone() };
            tasks.spawn(fold_bulk(r, receiver, bulk));
        }
        let mut failed = None;
        'reading: while let Some(result) = batches.recv().await {
            let (batch, after) = match result {
                Ok(read) => read,
                Err(error) => {
                    failed = Some(error);
                    abandon.cancel();
                    break;
                }
            };
            read += batch.len() as u64;
            let batch = Arc::new(batch);
            for sender in &senders {
                if sender.send(batch.clone()).await.is_err() {
                    abandon.cancel(); // That fold failed: its error is below.
                    break 'reading;
                }
            }
            position = after;
            progress(read, total);
        }
        drop((batches, senders));
        while let Some(task) = tasks.join_next().await {
            match task {
                Ok((slot, r, result)) => {
                    done[slot] = Some(r);
                    if let Err(error) = result {
                        failed.get_or_insert(error);
                    }
                }
                Err(panicked) => {
                    abandon.cancel();
                    failed.get_or_insert(ApplyError::Database(sqlx::Error::Protocol(format!(
                        "rebuild: a projection's fold failed: {panicked}"
                    ))));
                }
            }
        }
        if let Some(error) = failed {
            return Err(error);
        }
        rebuilding.extend(done.into_iter().flatten());
        if position < committed {
            // The reading task ended without an error: it panicked.
            return Err(ApplyError::Database(sqlx::Error::Protocol(format!(
                "the log reader stopped at {position}, before {committed}"
            ))));
        }
    }

    // 2. Each projection's ticks, its last delta and the swap (or comparison), with its live writer paused.
    let mut done = read;
    let mut reports = Vec::with_capacity(rebuilding.len());
    for r in &rebuilding {
        let events = if r.folding.is_some() { read } else { 0 };
        let report = finish(pool, &*r.projection, mode, position, events, started, &mut done, total, progress).await?;
        reports.push(report);
    }
    progress(done, total.max(done));
    Ok(reports)
}

/// Brings the shadow tables up to date after the bulk (which ended at `position`): when verifying, with the events
/// the live projection has applied; otherwise with the log up to what a reader can read now — everything the live
/// worker applied was relayed, so lies below it, and a log written faster than this applies it cannot keep it
/// going. `locked`: inside the transaction that holds the projection's lock; otherwise each read in a transaction
/// of its own. Returns the position reached (unchanged when verifying) and the events applied.
async fn shadow_delta(
    pool: &PgPool,
    projection: &dyn Projection,
    verify: bool,
    position: LogPosition,
    mut locked: Option<&mut PgConnection>,
) -> Result<(LogPosition, u64), ApplyError> {
    async fn apply(
        pool: &PgPool,
        projection: &dyn Projection,
        locked: Option<&mut PgConnection>,
        events: &[RecordedEvent],
    ) -> Result<(), ApplyError> {
        match locked {
            Some(conn) => apply_events(conn, projection, events, true).await.map(|_| ()),
            None => apply_to_shadow(pool, projection, ShadowInput::Events(events)).await,
        }
    }
    if verify {
        let missing = match locked.as_deref_mut() {
            Some(conn) => read_up_to_live_progress(conn, projection).await,
            None => {
                read_up_to_live_progress(&mut *pool.acquire().await.map_err(ApplyError::Database)?, projection).await
            }
        }
        .map_err(ApplyError::Database)?;
        apply(pool, projection, locked, &missing).await?;
        return Ok((position, missing.len() as u64));
    }
    let target =
        crate::log::newest_position(pool, crate::log::Newest::BelowHorizon).await.map_err(ApplyError::Database)?;
    let mut reader = LogReader::new(pool.clone(), position).with_batch_size(REBUILD_BATCH_SIZE);
    let mut applied = 0u64;
    while reader.position() < target {
        let batch = reader.read_batch().await.map_err(ApplyError::Database)?;
        if batch.is_empty() {
            break;
        }
        applied += batch.len() as u64;
        apply(pool, projection, locked.as_deref_mut(), &batch).await?;
    }
    Ok((reader.position(), applied))
}

/// The end of one projection's rebuild after the log's bulk (which ended at `position`, `events` read): its
/// ticks, then the last delta and the swap or comparison under its lock.
#[allow(clippy::too_many_arguments)]
async fn finish(
    pool: &PgPool,
    projection: &dyn Projection,
    mode: RebuildMode,
    mut position: LogPosition,
    mut events: u64,
    started: Instant,
    done: &mut u64,
    total: u64,
    progress: ProgressFn<'_>,
) -> Result<RebuildReport, ApplyError> {
    let verify = mode == RebuildMode::Verify;
    let mut ticks = 0u64;
    if projection.rebuilds_from_ticks() {
        let symbols = {
            let mut conn = pool.acquire().await.map_err(ApplyError::Database)?;
            archive_symbols(&mut conn, Some(projection.name())).await.map_err(ApplyError::Database)?
        };
        for symbol in symbols {
            let mut after = None;
            loop {
                let mut conn = pool.acquire().await.map_err(ApplyError::Database)?;
                let batch = read_archive(&mut conn, Some(projection.name()), &symbol, after, REBUILD_BATCH_SIZE as i64)
                    .await
                    .map_err(ApplyError::Database)?;
                drop(conn);
                let Some(last) = batch.last() else { break };
                after = Some(last.order_key());
                ticks += batch.len() as u64;
                *done += batch.len() as u64;
                let batch = if verify { ticks_within_live_progress(pool, projection, batch).await? } else { batch };
                apply_to_shadow(pool, projection, ShadowInput::Ticks(&batch)).await?;
                progress(*done, total);
            }
        }
    }

    // What arrived since the bulk, without the lock (projections rebuilt together finish one after the other):
    // the live writer then pauses only for what arrives while this one finishes.
    if projection.aggregate_type().is_some() {
        let applied;
        (position, applied) = shadow_delta(pool, projection, verify, position, None).await?;
        events += applied;
        *done += applied;
        progress(*done, total);
    }

    // 2. The last delta and the swap (or comparison), with the live writers paused.
    let mut tx = pool.begin().await.map_err(ApplyError::Database)?;
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(projection_lock(projection))
        .execute(&mut *tx)
        .await
        .map_err(ApplyError::Database)?;
    enter(&mut tx, projection, Target::Shadow).await.map_err(ApplyError::Database)?;
    if projection.aggregate_type().is_some() {
        // Its progress frozen under the lock: what the live projection has applied, or everything it can have.
        let applied;
        (position, applied) = shadow_delta(pool, projection, verify, position, Some(&mut tx)).await?;
        events += applied;
        *done += applied;
    }
    if projection.rebuilds_from_ticks() {
        ticks += apply_archive_delta(&mut tx, projection, verify).await?;
    }
    projection.settle_rebuilt(&mut tx).await?;
    let mut differences = Vec::new();
    match mode {
        RebuildMode::Swap => {
            for table in rebuilt_tables(projection) {
                for statement in [
                    format!("drop table if exists retired.{table}"),
                    format!("alter table public.{table} set schema retired"),
                    format!("alter table shadow.{table} set schema public"),
                    format!("drop table retired.{table} cascade"),
                ] {
                    sqlx::query(&statement).execute(&mut *tx).await.map_err(ApplyError::Database)?;
                }
            }
            sqlx::query("select public.ledger_create_views()").execute(&mut *tx).await.map_err(ApplyError::Database)?;
            if projection.aggregate_type().is_some() {
                let live_cursor = format!("projection:{}", projection.name());
                reset_cursor(&mut *tx, &live_cursor, position).await.map_err(ApplyError::Database)?;
            }
            tx.commit().await.map_err(ApplyError::Database)?;
            tracing::info!(projection = projection.name(), events, ticks, %position, "rebuild: swapped in");
        }
        RebuildMode::Verify => {
            // The read-model tables, not the progress bookkeeping: a dead-lettered message advances the live
            // progress without changing any row, and a rebuild never sees it.
            for table in projection.tables().iter().map(|t| t.to_string()) {
                let (live_rows, live_hash) =
                    table_fingerprint(&mut tx, "public", &table).await.map_err(ApplyError::Database)?;
                let (rebuilt_rows, rebuilt_hash) =
                    table_fingerprint(&mut tx, "shadow", &table).await.map_err(ApplyError::Database)?;
                if live_rows != rebuilt_rows || live_hash != rebuilt_hash {
                    differences.push(TableDifference { table, live_rows, rebuilt_rows });
                }
            }
            tx.rollback().await.map_err(ApplyError::Database)?;
            drop_shadow(pool, projection).await.map_err(ApplyError::Database)?;
        }
    }
    Ok(RebuildReport {
        projection: projection.name(),
        events,
        ticks,
        seconds: started.elapsed().as_secs_f64(),
        differences,
    })
}

/// Batches of the log read after `after` on a task of its own, one batch ahead of the rebuild (reading and
/// decoding overlap with applying), each with the position after it; the channel closes once the log has been
/// read up to `committed` at least. Waits for a horizon held below `committed` (at most
/// [`REBUILD_HORIZON_WAIT_MAX_SECS`], then an error). Stops as soon as the receiver is dropped.
fn read_ahead(
    pool: PgPool,
    after: LogPosition,
    batch_size: usize,
    committed: LogPosition,
) -> tokio::sync::mpsc::Receiver<Result<(Vec<RawEvent>, LogPosition), ApplyError>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let waiting_since = Instant::now();
        let mut reader = LogReader::new(pool, after).with_batch_size(batch_size);
        loop {
            let read = tokio::select! {
                _ = sender.closed() => return,
                read = reader.read_raw_batch() => read,
            };
            let read = match read {
                Ok(batch) if batch.is_empty() => {
                    if reader.position() >= committed {
                        return;
                    }
                    if waiting_since.elapsed() <= std::time::Duration::from_secs(REBUILD_HORIZON_WAIT_MAX_SECS) {
                        tokio::select! {
                            _ = sender.closed() => return,
                            _ = tokio::time::sleep(std::time::Duration::from_millis(REBUILD_HORIZON_POLL_MS)) => {}
                        }
                        continue;
                    }
                    Err(ApplyError::Database(sqlx::Error::Protocol(format!(
                        "the log's horizon stayed below {committed} (committed before the rebuild started) for \
                         {REBUILD_HORIZON_WAIT_MAX_SECS} s: a transaction is held open (see pg_stat_activity)"
                    ))))
                }
                Ok(batch) => Ok((batch, reader.position())),
                Err(error) => Err(ApplyError::Database(error)),
            };
            let failed = read.is_err();
            if sender.send(read).await.is_err() || failed {
                return;
            }
        }
    });
    receiver
}

enum ShadowInput<'a> {
    Events(&'a [RecordedEvent]),
    Ticks(&'a [Tick]),
}

/// Applies a batch to the shadow tables in its own transaction (a poison input is skipped: the live worker
/// dead-lettered it too).
async fn apply_to_shadow(pool: &PgPool, projection: &dyn Projection, input: ShadowInput<'_>) -> Result<(), ApplyError> {
    let mut isolate = false;
    loop {
        let mut tx = pool.begin().await.map_err(ApplyError::Database)?;
        enter(&mut tx, projection, Target::Shadow).await.map_err(ApplyError::Database)?;
        let result = match input {
            ShadowInput::Events(events) => apply_events(&mut tx, projection, events, isolate).await,
            ShadowInput::Ticks(ticks) => apply_ticks(&mut tx, projection, ticks, isolate).await,
        };
        match result {
            Ok(_) => return tx.commit().await.map_err(ApplyError::Database),
            Err(ApplyError::Poison(_)) if !isolate => isolate = true,
            Err(error) => return Err(error),
        }
    }
}

/// The events of `batch` the live projection has already applied: sequence ≤ its progress as it was when the
/// aggregate was first seen (kept in `live`). Not its progress now: a worker that moved on between two batches
/// would let a later event through after an earlier one was held back. So each aggregate's events form a prefix;
/// the rest, up to the live progress at the end, is applied under the lock (phase 2).
async fn within_live_progress<'e>(
    pool: &PgPool,
    projection: &dyn Projection,
    live: &mut HashMap<String, i64>,
    batch: Vec<&'e RawEvent>,
) -> Result<Vec<&'e RawEvent>, ApplyError> {
    let mut unseen: Vec<&str> =
        batch.iter().map(|e| e.aggregate_id.as_str()).filter(|id| !live.contains_key(*id)).collect();
    unseen.sort_unstable();
    unseen.dedup();
    if !unseen.is_empty() {
        let found: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(&format!(
            "select aggregate_id, last_sequence from public.{} where aggregate_id = any($1)",
            progress_table(projection)
        ))
        .bind(&unseen)
        .fetch_all(pool)
        .await
        .map_err(ApplyError::Database)?
        .into_iter()
        .collect();
        for id in unseen {
            live.insert(id.to_string(), found.get(id).copied().unwrap_or(0));
        }
    }
    Ok(batch.into_iter().filter(|e| live.get(&e.aggregate_id).is_some_and(|&last| e.sequence <= last)).collect())
}

/// The ticks of `batch` the live projection has already applied (`(ts, seq)` ≤ its progress).
async fn ticks_within_live_progress(
    pool: &PgPool,
    projection: &dyn Projection,
    batch: Vec<Tick>,
) -> Result<Vec<Tick>, ApplyError> {
    let live: HashMap<String, (chrono::DateTime<chrono::Utc>, i64)> =
        sqlx::query_as::<_, (String, chrono::DateTime<chrono::Utc>, i64)>(&format!(
            "select symbol, last_ts, last_seq from public.{}",
            tick_progress_table(projection)
        ))
        .fetch_all(pool)
        .await
        .map_err(ApplyError::Database)?
        .into_iter()
        .map(|(symbol, ts, seq)| (symbol, (ts, seq)))
        .collect();
    Ok(batch.into_iter().filter(|t| live.get(t.symbol.as_str()).is_some_and(|&last| t.order_key() <= last)).collect())
}

/// Events the shadow lacks up to the live progress of each aggregate, in log order.
async fn read_up_to_live_progress(
    conn: &mut PgConnection,
    projection: &dyn Projection,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let table = progress_table(projection);
    let rows = sqlx::query(&format!(
        "select e.transaction_id::text as transaction_id_text, e.global_position, e.event_id, e.aggregate_type,
                e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload, e.metadata, e.recorded_at
           from public.events e
           join public.{table} live on live.aggregate_id = e.aggregate_id
           left join shadow.{table} rebuilt on rebuilt.aggregate_id = e.aggregate_id
          where e.aggregate_type = $1
            and e.sequence > coalesce(rebuilt.last_sequence, 0) and e.sequence <= live.last_sequence
          order by e.transaction_id, e.global_position"
    ))
    .bind(projection.aggregate_type())
    .fetch_all(conn)
    .await?;
    rows.iter().map(crate::log::decode_event).collect()
}

/// Applies archived ticks newer than the shadow's progress of their symbol, symbol by symbol; when verifying,
/// only those the live projection has applied.
async fn apply_archive_delta(
    conn: &mut PgConnection,
    projection: &dyn Projection,
    verify: bool,
) -> Result<u64, ApplyError> {
    let table = tick_progress_table(projection);
    let rebuilt: HashMap<String, (chrono::DateTime<chrono::Utc>, i64)> =
        progress_by_symbol(conn, "shadow", &table).await?;
    let live = if verify { Some(progress_by_symbol(conn, "public", &table).await?) } else { None };
    let mut applied = 0u64;
    for symbol in archive_symbols(conn, Some(projection.name())).await.map_err(ApplyError::Database)? {
        let mut after = rebuilt.get(&symbol).copied();
        loop {
            let ticks = read_archive(conn, Some(projection.name()), &symbol, after, REBUILD_BATCH_SIZE as i64)
                .await
                .map_err(ApplyError::Database)?;
            let Some(last) = ticks.last() else { break };
            after = Some(last.order_key());
            let ticks: Vec<Tick> = match &live {
                Some(live) => ticks
                    .into_iter()
                    .filter(|t| live.get(t.symbol.as_str()).is_some_and(|&l| t.order_key() <= l))
                    .collect(),
                None => ticks,
            };
            applied += apply_ticks(conn, projection, &ticks, true).await?.applied as u64;
        }
    }
    Ok(applied)
}

async fn progress_by_symbol(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<HashMap<String, (chrono::DateTime<chrono::Utc>, i64)>, ApplyError> {
    Ok(sqlx::query_as::<_, (String, chrono::DateTime<chrono::Utc>, i64)>(&format!(
        "select symbol, last_ts, last_seq from {schema}.{table}"
    ))
    .fetch_all(conn)
    .await
    .map_err(ApplyError::Database)?
    .into_iter()
    .map(|(symbol, ts, seq)| (symbol, (ts, seq)))
    .collect())
}

/// Row count and an order-independent hash of a table's rows.
async fn table_fingerprint(conn: &mut PgConnection, schema: &str, table: &str) -> Result<(i64, String), sqlx::Error> {
    sqlx::query_as(&format!(
        "select count(*), coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)::text from {schema}.{table} t"
    ))
    .fetch_one(conn)
    .await
}
