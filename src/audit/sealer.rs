//! The sealer: follows the log in commit-safe order and stores each event's chain hash.
//!
//! It reads with the same [`LogReader`] as every other follower, so it never skips an event of a transaction
//! that committed late, and the chain order is the log's commit order `(transaction_id, global_position)`.
//! Each batch's chain rows and the sealer's cursor are written in one transaction, run detached
//! ([`crate::db::detached`]) so that a cancelled caller cannot cut it in half; the head is also derivable from
//! the chain itself, and the two must agree when a sealer starts (checked, so that a chain written by an
//! older or foreign process is never extended from the wrong place).
//!
//! One sealer is active at a time (a session advisory lock, as for the relay); others stand by. Two sealers
//! racing anyway would collide on `audit_chain`'s primary key and the loser's transaction would roll back:
//! the chain cannot fork.
//!
//! A checkpoint (the head's count, position and hash) is written every `checkpoint_every_events` events, or
//! when `checkpoint_interval_ms` has passed with events sealed since the last one — in the same transaction as
//! the batch, or on its own when the log is idle.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::canonical::{canonical_event, ChainHash};
use super::sealed::{chain_head, parse_xid8, ChainHead};
use super::AuditError;
use crate::leadership::{lock_key, Leadership};
use crate::log::{load_cursor, newest_position, save_cursor, LogReader, Newest, RecordedEvent};
use crate::retry::Backoff;

/// The sealer's cursor in `log_cursors`, and the name its advisory lock is derived from.
pub const SEALER_NAME: &str = "audit-sealer";
/// How long [`seal_until_head`] waits for another, active sealer to reach the head.
pub const SEAL_WAIT_TIMEOUT_MS: u64 = 120_000;
/// How often [`seal_until_head`] looks at the active sealer's progress.
const SEAL_WAIT_POLL_MS: u64 = 50;
/// Longest pause between restarts after an error.
const RETRY_BACKOFF_MAX_MS: u64 = 10_000;
/// First wait before trying again after PostgreSQL failed the sealer.
const RETRY_FIRST_DELAY_MS: u64 = 100;

#[derive(Debug, Clone)]
pub struct SealerConfig {
    /// Events read and sealed per transaction (clamped to the reader's maximum).
    pub batch_size: usize,
    /// A checkpoint at least every this many events.
    pub checkpoint_every_events: i64,
    /// A checkpoint when this long has passed since the last one and events were sealed meanwhile.
    pub checkpoint_interval_ms: u64,
    /// How often the reader polls when no notification arrives.
    pub poll_interval_ms: u64,
    /// How often a standby sealer tries to take over.
    pub standby_poll_ms: u64,
}

impl Default for SealerConfig {
    fn default() -> Self {
        Self {
            batch_size: 2_000,
            checkpoint_every_events: 10_000,
            checkpoint_interval_ms: 60_000,
            poll_interval_ms: 100,
            standby_poll_ms: 1_000,
        }
    }
}

/// What a running sealer has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct SealerStatus {
    pub active: AtomicBool,
    /// Events sealed by this process.
    pub sealed: AtomicU64,
    /// Length of the chain (events sealed by anyone) as last seen.
    pub event_count: AtomicI64,
    pub checkpoints: AtomicU64,
}

pub struct Sealer {
    pool: PgPool,
    config: SealerConfig,
    status: Arc<SealerStatus>,
}

enum ActiveExit {
    Cancelled,
    LostLeadership,
}

impl Sealer {
    pub fn new(pool: PgPool, config: SealerConfig) -> Sealer {
        Sealer { pool, config, status: Arc::default() }
    }

    pub fn status(&self) -> Arc<SealerStatus> {
        self.status.clone()
    }

    /// Runs until `cancel` fires: stands by while another sealer holds the lock, seals while it holds it.
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), AuditError> {
        let key = lock_key(SEALER_NAME);
        let mut backoff =
            Backoff::new(Duration::from_millis(RETRY_FIRST_DELAY_MS), Duration::from_millis(RETRY_BACKOFF_MAX_MS));
        loop {
            let standby = || tracing::info!("sealer standing by: another sealer is active");
            let poll = Duration::from_millis(self.config.standby_poll_ms);
            let leadership = match Leadership::acquire(&self.pool, key, poll, &cancel, standby).await {
                Ok(Some(leadership)) => leadership,
                Ok(None) => return Ok(()),
                Err(error) => {
                    tracing::warn!(%error, "sealer cannot reach PostgreSQL; retrying");
                    if backoff.wait(&cancel).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            self.status.active.store(true, Ordering::SeqCst);
            let result = self.run_active(leadership, &cancel).await;
            self.status.active.store(false, Ordering::SeqCst);
            match result {
                Ok(ActiveExit::Cancelled) => return Ok(()),
                Ok(ActiveExit::LostLeadership) => tracing::warn!("sealer lost its lock session; standing by"),
                Err(error @ AuditError::Chain(_)) => return Err(error),
                Err(error) => {
                    tracing::error!(%error, "sealer stopped; restarting from the chain's head");
                    if backoff.wait(&cancel).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn run_active(
        &self,
        mut leadership: Leadership,
        cancel: &CancellationToken,
    ) -> Result<ActiveExit, AuditError> {
        let mut chain = ChainWriter::load(&self.pool, &self.config).await?;
        self.status.event_count.store(chain.head.event_count, Ordering::Relaxed);
        tracing::info!(events = chain.head.event_count, cursor = %chain.head.position, "sealer active");
        let mut reader = LogReader::new(self.pool.clone(), chain.head.position)
            .with_batch_size(self.config.batch_size)
            .with_poll_interval(Duration::from_millis(self.config.poll_interval_ms));
        loop {
            if cancel.is_cancelled() {
                leadership.release().await;
                return Ok(ActiveExit::Cancelled);
            }
            if !leadership.still_held().await {
                return Ok(ActiveExit::LostLeadership);
            }
            let due = chain.checkpoint_due_in();
            let batch = tokio::select! {
                batch = reader.next_batch(cancel) => batch?,
                _ = tokio::time::sleep(due.unwrap_or_default()), if due.is_some() => {
                    chain.checkpoint(&self.pool).await?;
                    self.status.checkpoints.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            let Some(batch) = batch else { continue };
            let outcome = chain.seal(&self.pool, batch).await?;
            self.status.sealed.fetch_add(outcome.sealed, Ordering::Relaxed);
            self.status.event_count.store(chain.head.event_count, Ordering::Relaxed);
            self.status.checkpoints.fetch_add(outcome.checkpoints, Ordering::Relaxed);
        }
    }
}

/// Seals every event committed before the call and returns the chain's head.
///
/// The log is read in commit-safe order, below the oldest transaction still running anywhere on the server
/// (see [`crate::log`]); so this first waits until every transaction that was running when it was called has
/// ended (a long transaction holds it back, at most [`SEAL_WAIT_TIMEOUT_MS`]). Then, when no sealer is active,
/// it seals (holding the sealer lock meanwhile) and ends with a checkpoint of the head; when one is, it waits
/// until that sealer has passed the last event committed before the call. Exports call it first, so that they
/// hold everything committed before they began.
pub async fn seal_until_head(pool: &PgPool) -> Result<ChainHead, AuditError> {
    let deadline = Instant::now() + Duration::from_millis(SEAL_WAIT_TIMEOUT_MS);
    let horizon: String =
        sqlx::query_scalar("select pg_snapshot_xmax(pg_current_snapshot())::text").fetch_one(pool).await?;
    loop {
        let passed: bool = sqlx::query_scalar("select pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8")
            .bind(&horizon)
            .fetch_one(pool)
            .await?;
        if passed {
            break;
        }
        if Instant::now() > deadline {
            return Err(AuditError::Timeout(format!(
                "a transaction older than this call kept the log's commit horizon back for {} s \
                 (a long-running transaction? see pg_stat_activity)",
                SEAL_WAIT_TIMEOUT_MS / 1_000
            )));
        }
        tokio::time::sleep(Duration::from_millis(SEAL_WAIT_POLL_MS)).await;
    }
    let config = SealerConfig::default();
    let try_once = CancellationToken::new();
    try_once.cancel();
    let poll = Duration::from_millis(config.standby_poll_ms);
    match Leadership::acquire(pool, lock_key(SEALER_NAME), poll, &try_once, || {}).await? {
        Some(leadership) => {
            let result = seal_available(pool, &config).await;
            leadership.release().await;
            result
        }
        None => wait_for_active_sealer(pool, &horizon, deadline).await,
    }
}

async fn seal_available(pool: &PgPool, config: &SealerConfig) -> Result<ChainHead, AuditError> {
    let mut chain = ChainWriter::load(pool, config).await?;
    let mut reader = LogReader::new(pool.clone(), chain.head.position).with_batch_size(config.batch_size);
    loop {
        let batch = reader.read_batch().await?;
        if batch.is_empty() {
            break;
        }
        chain.seal(pool, batch).await?;
    }
    if chain.head.event_count > chain.checkpointed_count {
        chain.checkpoint(pool).await?;
    }
    Ok(chain.head)
}

/// Waits until the active sealer's cursor has passed the last event of the transactions below `horizon`.
async fn wait_for_active_sealer(pool: &PgPool, horizon: &str, deadline: Instant) -> Result<ChainHead, AuditError> {
    let target = newest_position(pool, Newest::Before(parse_xid8(horizon)?)).await?;
    loop {
        if load_cursor(pool, SEALER_NAME).await? >= target {
            return chain_head(pool).await;
        }
        if Instant::now() > deadline {
            return Err(AuditError::Timeout(format!(
                "the active sealer did not reach position {target} within {} s; is it stuck? (see its log)",
                SEAL_WAIT_TIMEOUT_MS / 1_000
            )));
        }
        tokio::time::sleep(Duration::from_millis(SEAL_WAIT_POLL_MS)).await;
    }
}

/// What one sealed batch did.
struct SealOutcome {
    sealed: u64,
    checkpoints: u64,
}

/// The chain's head as this process extends it.
struct ChainWriter {
    head: ChainHead,
    checkpointed_count: i64,
    checkpointed_at: Instant,
    checkpoint_every_events: i64,
    checkpoint_interval: Duration,
}

/// The rows of one batch, as arrays for one `unnest` insert.
#[derive(Default)]
struct ChainRows {
    chain_index: Vec<i64>,
    global_position: Vec<i64>,
    transaction_id: Vec<String>,
    event_id: Vec<Uuid>,
    previous_hash: Vec<Vec<u8>>,
    chain_hash: Vec<Vec<u8>>,
}

impl ChainWriter {
    /// The head from the chain, checked against the sealer's cursor.
    async fn load(pool: &PgPool, config: &SealerConfig) -> Result<ChainWriter, AuditError> {
        let head = chain_head(pool).await?;
        let cursor = load_cursor(pool, SEALER_NAME).await?;
        if cursor != head.position {
            return Err(AuditError::Chain(format!(
                "the sealer's cursor is at {cursor} but the chain's last event is at {} ({} events); \
                 refusing to extend a chain from the wrong place",
                head.position, head.event_count
            )));
        }
        let checkpointed_count: Option<i64> =
            sqlx::query_scalar("select max(event_count) from audit_checkpoints").fetch_one(pool).await?;
        Ok(ChainWriter {
            head,
            checkpointed_count: checkpointed_count.unwrap_or(0),
            checkpointed_at: Instant::now(),
            checkpoint_every_events: config.checkpoint_every_events.max(1),
            checkpoint_interval: Duration::from_millis(config.checkpoint_interval_ms),
        })
    }

    /// When the time rule will call for a checkpoint (`None`: nothing sealed since the last one).
    fn checkpoint_due_in(&self) -> Option<Duration> {
        (self.head.event_count > self.checkpointed_count)
            .then(|| self.checkpoint_interval.saturating_sub(self.checkpointed_at.elapsed()))
    }

    /// Hashes `batch` onto the chain and stores it with the cursor (and a checkpoint when due), atomically.
    async fn seal(&mut self, pool: &PgPool, batch: Vec<RecordedEvent>) -> Result<SealOutcome, AuditError> {
        let mut rows = ChainRows::default();
        let mut head = self.head;
        // A checkpoint at every `checkpoint_every_events`-th event, and at the end when the time rule says so.
        let mut checkpoints: Vec<ChainHead> = Vec::new();
        let mut checkpointed = self.checkpointed_count;
        for event in &batch {
            // The reader returns commit order; a chain out of that order could never be verified.
            if event.position <= head.position {
                return Err(AuditError::Chain(format!(
                    "event at {} arrived after {}: not in commit order",
                    event.position, head.position
                )));
            }
            let previous = head.hash;
            let hash = previous.next(&canonical_event(event));
            head = ChainHead { event_count: head.event_count + 1, position: event.position, hash };
            rows.chain_index.push(head.event_count);
            rows.global_position.push(event.position.global_position);
            rows.transaction_id.push(event.position.transaction_id.to_string());
            rows.event_id.push(event.event_id);
            rows.previous_hash.push(previous.0.to_vec());
            rows.chain_hash.push(hash.0.to_vec());
            if head.event_count - checkpointed >= self.checkpoint_every_events {
                checkpoints.push(head);
                checkpointed = head.event_count;
            }
        }
        if head.event_count > checkpointed && self.checkpointed_at.elapsed() >= self.checkpoint_interval {
            checkpoints.push(head);
        }
        if rows.chain_index.is_empty() {
            return Ok(SealOutcome { sealed: 0, checkpoints: 0 });
        }
        let checkpointed = checkpoints.last().map(|c| c.event_count);
        let written = checkpoints.len() as u64;
        let work_pool = pool.clone();
        crate::db::detached(async move {
            let mut tx = work_pool.begin().await?;
            sqlx::query(
                "insert into audit_chain (chain_index, global_position, transaction_id, event_id, previous_hash, chain_hash)
                 select u.chain_index, u.global_position, u.transaction_id::xid8, u.event_id, u.previous_hash, u.chain_hash
                   from unnest($1::bigint[], $2::bigint[], $3::text[], $4::uuid[], $5::bytea[], $6::bytea[])
                        as u(chain_index, global_position, transaction_id, event_id, previous_hash, chain_hash)",
            )
            .bind(&rows.chain_index)
            .bind(&rows.global_position)
            .bind(&rows.transaction_id)
            .bind(&rows.event_id)
            .bind(&rows.previous_hash)
            .bind(&rows.chain_hash)
            .execute(&mut *tx)
            .await?;
            save_cursor(&mut *tx, SEALER_NAME, head.position).await?;
            for checkpoint in checkpoints {
                insert_checkpoint(&mut tx, checkpoint).await?;
            }
            tx.commit().await
        })
        .await??;
        let sealed = (head.event_count - self.head.event_count) as u64;
        self.head = head;
        if let Some(count) = checkpointed {
            self.mark_checkpointed(count);
        }
        Ok(SealOutcome { sealed, checkpoints: written })
    }

    /// A checkpoint of the current head, on its own.
    async fn checkpoint(&mut self, pool: &PgPool) -> Result<(), AuditError> {
        let head = self.head;
        let work_pool = pool.clone();
        crate::db::detached(async move {
            let mut tx = work_pool.begin().await?;
            insert_checkpoint(&mut tx, head).await?;
            tx.commit().await
        })
        .await??;
        self.mark_checkpointed(head.event_count);
        Ok(())
    }

    fn mark_checkpointed(&mut self, event_count: i64) {
        self.checkpointed_count = event_count;
        self.checkpointed_at = Instant::now();
        tracing::debug!(events = event_count, "audit checkpoint");
    }
}

async fn insert_checkpoint(tx: &mut sqlx::PgConnection, head: ChainHead) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into audit_checkpoints (event_count, global_position, transaction_id, chain_hash)
         values ($1, $2, $3::text::xid8, $4)
         on conflict (event_count) do nothing",
    )
    .bind(head.event_count)
    .bind(head.position.global_position)
    .bind(head.position.transaction_id.to_string())
    .bind(head.hash.0.to_vec())
    .execute(tx)
    .await?;
    Ok(())
}

/// The hash of one sealed event as stored, for callers that look a position up.
pub async fn sealed_hash(pool: &PgPool, global_position: i64) -> Result<Option<ChainHash>, AuditError> {
    let hash: Option<Vec<u8>> = sqlx::query_scalar("select chain_hash from audit_chain where global_position = $1")
        .bind(global_position)
        .fetch_optional(pool)
        .await?;
    hash.map(|bytes| super::sealed::hash_column(&bytes, global_position)).transpose()
}
