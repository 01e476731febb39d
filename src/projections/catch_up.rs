//! Applying the PostgreSQL side to a projection: the event log from a cursor, and the tick archive.
//!
//! Used when a worker starts behind what Kafka still holds (fresh group, new or truncated topic) and by
//! rebuilds, which run it with `search_path = shadow` to fill the shadow tables. Each batch is one transaction
//! holding the projection's advisory lock (shared when writing live tables, so that a swap can pause writers;
//! a rebuild's shadow writes take none), and stores the cursor with the batch.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};

use super::applier::{apply_events, apply_ticks, Applied};
use super::{ApplyError, Projection};
use crate::domain::values::{Price, Symbol};
use crate::leadership::lock_key;
use crate::log::{save_cursor, LogReader, RecordedEvent};
use crate::market::{Tick, TICK_VERSION};

/// Where the writes of a catch-up go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The live tables; every transaction holds the projection's advisory lock in shared mode.
    Live,
    /// The `shadow` schema (a rebuild); no lock.
    Shadow,
}

/// The advisory lock a projection's writers share and a swap takes exclusively.
pub fn projection_lock(projection: &dyn Projection) -> i64 {
    lock_key(&format!("projection:{}", projection.name()))
}

/// Opens the transaction settings for `target` on `conn` (inside a transaction).
pub async fn enter(conn: &mut PgConnection, projection: &dyn Projection, target: Target) -> Result<(), sqlx::Error> {
    match target {
        Target::Live => {
            sqlx::query("select pg_advisory_xact_lock_shared($1)")
                .bind(projection_lock(projection))
                .execute(conn)
                .await?;
        }
        Target::Shadow => {
            sqlx::query("set local search_path = shadow, public").execute(conn).await?;
        }
    }
    Ok(())
}

/// Applies `events` in one transaction, on a task of its own (see `db::detached`), retrying with isolation if
/// one is poison; records poisoned events as dead letters (source `log`, offset = global position) and moves
/// `cursor` in the same transaction.
pub async fn apply_log_batch(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
    target: Target,
    events: Vec<RecordedEvent>,
    cursor: String,
) -> Result<Applied, ApplyError> {
    let pool = pool.clone();
    crate::db::detached(async move { apply_log_batch_here(&pool, projection.as_ref(), target, &events, &cursor).await })
        .await
        .map_err(ApplyError::Database)?
}

async fn apply_log_batch_here(
    pool: &PgPool,
    projection: &dyn Projection,
    target: Target,
    events: &[RecordedEvent],
    cursor: &str,
) -> Result<Applied, ApplyError> {
    let Some(last) = events.last().map(|e| e.position) else { return Ok(Applied::default()) };
    let mut isolate = false;
    loop {
        let mut tx = pool.begin().await.map_err(ApplyError::Database)?;
        enter(&mut tx, projection, target).await.map_err(ApplyError::Database)?;
        match apply_events(&mut tx, projection, events, isolate).await {
            Ok(applied) => {
                for poisoned in &applied.poisoned {
                    let event = poisoned.index.map(|i| &events[i]);
                    record_dead_letter(
                        &mut tx,
                        projection.name(),
                        "log",
                        0,
                        event.map_or(0, |e| e.position.global_position),
                        event.map(|e| e.aggregate_id.as_str()),
                        event.map(|e| e.payload.to_string().into_bytes()),
                        &poisoned.error,
                    )
                    .await
                    .map_err(ApplyError::Database)?;
                }
                save_cursor(&mut *tx, cursor, last).await.map_err(ApplyError::Database)?;
                tx.commit().await.map_err(ApplyError::Database)?;
                return Ok(applied);
            }
            Err(ApplyError::Poison(_)) if !isolate => {
                tx.rollback().await.map_err(ApplyError::Database)?;
                isolate = true;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Applies the log from `cursor` up to its current head. Calls `progress` with the events read so far.
pub async fn catch_up_from_log(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
    target: Target,
    cursor: &str,
    batch_size: usize,
    mut progress: impl FnMut(u64),
) -> Result<Applied, ApplyError> {
    let start = crate::log::load_cursor(pool, cursor).await.map_err(ApplyError::Database)?;
    let mut reader = LogReader::new(pool.clone(), start).with_batch_size(batch_size);
    let mut total = Applied::default();
    let mut read = 0u64;
    loop {
        let batch = reader.read_batch().await.map_err(ApplyError::Database)?;
        if batch.is_empty() {
            return Ok(total);
        }
        read += batch.len() as u64;
        let applied = apply_log_batch(pool, projection.clone(), target, batch, cursor.to_string()).await?;
        total.applied += applied.applied;
        total.duplicates += applied.duplicates;
        total.gap_filled += applied.gap_filled;
        total.poisoned.extend(applied.poisoned);
        progress(read);
    }
}

/// The symbols in the tick archive: of the ticks `projection` applied, or of every projection's (`None`).
pub async fn archive_symbols(conn: &mut PgConnection, projection: Option<&str>) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "select distinct symbol from public.market_ticks where ($1::text is null or projection = $1) order by symbol",
    )
    .bind(projection)
    .fetch_all(conn)
    .await
}

/// Archived ticks of `symbol` after `(ts, seq)`, in order: those `projection` applied, or (`None`) those any
/// projection applied.
///
/// Always per symbol: two workers archive ticks, each a symbol's ticks in order, so per symbol the archive is
/// a gap-free prefix at any moment — but across symbols a tick with an older timestamp can be archived after
/// newer ticks of other symbols, and a scan over all symbols in time order could pass it by.
pub async fn read_archive(
    conn: &mut PgConnection,
    projection: Option<&str>,
    symbol: &str,
    after: Option<(DateTime<Utc>, i64)>,
    limit: i64,
) -> Result<Vec<Tick>, sqlx::Error> {
    let (ts, seq) = after.map_or((None, 0), |(ts, seq)| (Some(ts), seq));
    let rows = sqlx::query(
        "select distinct on (ts, seq) symbol, ts, seq, price, volume, source from public.market_ticks
          where symbol = $1 and ($2::text is null or projection = $2)
            and ($3::timestamptz is null or (ts, seq) > ($3, $4))
          order by ts, seq limit $5",
    )
    .bind(symbol)
    .bind(projection)
    .bind(ts)
    .bind(seq)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            let symbol: String = row.try_get("symbol")?;
            let price: rust_decimal::Decimal = row.try_get("price")?;
            Ok(Tick {
                version: TICK_VERSION,
                symbol: Symbol::new(symbol).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                price: Price::new(price).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                ts: row.try_get("ts")?,
                seq: row.try_get("seq")?,
                volume: row.try_get("volume")?,
                source: row.try_get("source")?,
            })
        })
        .collect()
}

/// Applies the tick archive, symbol by symbol (ticks already applied are skipped by the progress check).
pub async fn catch_up_from_archive(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
    target: Target,
    batch_size: usize,
    mut progress: impl FnMut(u64),
) -> Result<Applied, ApplyError> {
    let mut total = Applied::default();
    let mut read = 0u64;
    let symbols = {
        let mut conn = pool.acquire().await.map_err(ApplyError::Database)?;
        archive_symbols(&mut conn, None).await.map_err(ApplyError::Database)?
    };
    for symbol in symbols {
        let mut after = None;
        loop {
            let mut conn = pool.acquire().await.map_err(ApplyError::Database)?;
            let ticks =
                read_archive(&mut conn, None, &symbol, after, batch_size as i64).await.map_err(ApplyError::Database)?;
            drop(conn);
            let Some(last) = ticks.last() else { break };
            after = Some(last.order_key());
            read += ticks.len() as u64;
            let applied = apply_tick_batch(pool, projection.clone(), target, ticks).await?;
            total.applied += applied.applied;
            total.duplicates += applied.duplicates;
            total.poisoned.extend(applied.poisoned);
            progress(read);
        }
    }
    Ok(total)
}

/// Applies ticks in one transaction on a task of its own (isolating a poisoned one on a second attempt).
pub async fn apply_tick_batch(
    pool: &PgPool,
    projection: Arc<dyn Projection>,
    target: Target,
    ticks: Vec<Tick>,
) -> Result<Applied, ApplyError> {
    let pool = pool.clone();
    crate::db::detached(async move { apply_tick_batch_here(&pool, projection.as_ref(), target, &ticks).await })
        .await
        .map_err(ApplyError::Database)?
}

async fn apply_tick_batch_here(
    pool: &PgPool,
    projection: &dyn Projection,
    target: Target,
    ticks: &[Tick],
) -> Result<Applied, ApplyError> {
    let mut isolate = false;
    loop {
        let mut tx = pool.begin().await.map_err(ApplyError::Database)?;
        enter(&mut tx, projection, target).await.map_err(ApplyError::Database)?;
        match apply_ticks(&mut tx, projection, ticks, isolate).await {
            Ok(applied) => {
                tx.commit().await.map_err(ApplyError::Database)?;
                return Ok(applied);
            }
            Err(ApplyError::Poison(_)) if !isolate => {
                tx.rollback().await.map_err(ApplyError::Database)?;
                isolate = true;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Records a message that could not be processed.
#[allow(clippy::too_many_arguments)]
pub async fn record_dead_letter(
    conn: &mut PgConnection,
    projection: &str,
    source_topic: &str,
    source_partition: i32,
    source_offset: i64,
    key: Option<&str>,
    payload: Option<Vec<u8>>,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into public.dead_letters (projection, source_topic, source_partition, source_offset, message_key,
                payload, error)
         values ($1, $2, $3, $4, $5, $6, $7)
         on conflict (projection, source_topic, source_partition, source_offset) do nothing",
    )
    .bind(projection)
    .bind(source_topic)
    .bind(source_partition)
    .bind(source_offset)
    .bind(key)
    .bind(payload)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}
