//! A projection worker: one Kafka consumer group per projection, on `ledger.events` and/or `market.prices`.
//!
//! Loop: collect a batch of messages; apply it in one PostgreSQL transaction through the [`applier`] (which
//! dedupes by sequence and records progress in the same transaction); commit the Kafka offsets after. A crash
//! between the two replays the batch, which the progress rows turn into no-ops.
//!
//! Start-up: if the group has no committed offset for some partition, or one outside what the topic holds
//! (a fresh group, a new or truncated topic), Kafka cannot be trusted to hold everything after the read model.
//! - Events: the worker records each partition's high watermark, catches up from the event log (from the
//!   projection's own cursor) and starts those partitions at the recorded watermarks: every message before them
//!   was committed to the log before the catch-up began, so the catch-up covered it.
//! - Ticks: the topic is their source of truth and the archive (`market_ticks`) only holds what workers have
//!   seen, so the worker restores what the archive has and then reads those partitions from the earliest
//!   offset still held; ticks it already applied are skipped by `(ts, seq)`.
//!
//! The same holds for a group far behind on the events topic ([`CATCH_UP_LAG_MESSAGES`] on a partition at
//! start-up, [`FAR_BEHIND_MESSAGES`] while following, checked after a batch at most every
//! [`LAG_CHECK_INTERVAL_MS`]): reading the
//! backlog from the log is much faster than re-reading the topic, so the worker stops following, catches up from
//! PostgreSQL and follows again from the high watermarks. The same checks move the projection's log cursor (where a
//! catch-up starts) forward while the worker follows, and notice a topic that lost messages the group had not
//! consumed (see `LagCheck`).
//!
//! Poison: a message that cannot be decoded or applied is recorded in `dead_letters` (same transaction) and
//! produced to the dead-letter topic with the error and its source topic, partition and offset; the worker
//! moves on.
//!
//! [`applier`]: super::applier

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::applier::{apply_events, apply_ticks, Applied};
use super::catch_up::{catch_up_from_archive, catch_up_from_log, enter, record_dead_letter, Target};
use super::{ApplyError, Projection};
use crate::kafka::KafkaConfig;
use crate::log::{LogPosition, RecordedEvent};
use crate::market::Tick;
use crate::relay::Envelope;
use crate::retry::Backoff;
use crate::trace::{TraceParent, TRACEPARENT};

/// How long a metadata, offset or watermark request may take.
const KAFKA_REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Traces one batch opens a span in, at most (a batch of events from many requests opens one span per request's
/// trace, up to this many).
pub const TRACE_SPANS_PER_BATCH_MAX: usize = 64;
/// First wait before restarting a failed worker (then doubling up to `retry_backoff_max_ms`).
const RESTART_FIRST_DELAY_MS: u64 = 200;
/// First wait before applying a batch again after PostgreSQL failed it.
const BATCH_RETRY_FIRST_DELAY_MS: u64 = 50;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Consumer group id prefix; the group is `<prefix>.<projection>`.
    pub group_prefix: String,
    /// Messages applied per transaction, at most.
    pub batch_size_max: usize,
    /// How long after a batch's first message the worker waits for more (what is already waiting is always
    /// taken, up to `batch_size_max`). 0 by default: natural batching, no added delay when the stream is light;
    /// under load, what arrived while the previous batch was being applied makes the next batch.
    pub batch_wait_ms: u64,
    /// Events per transaction when catching up from PostgreSQL.
    pub catch_up_batch_size: usize,
    pub retry_backoff_max_ms: u64,
    /// How long the broker may hold a fetch waiting for data (librdkafka `fetch.wait.max.ms`): the bound on
    /// the delay between a message's arrival and its delivery to an idle worker.
    pub fetch_wait_max_ms: u32,
    /// Create the topics through the admin API at start-up (off where something else creates them).
    pub create_topics: bool,
    /// While following Kafka, how often the worker compares its group's committed offsets with the events
    /// topic's high watermarks (after a batch, at most this often).
    pub lag_check_interval_ms: u64,
    /// A group this many messages behind on a partition of the events topic while following stops reading the
    /// topic, catches up from PostgreSQL and follows again from the high watermark (as at start-up).
    pub far_behind_messages: i64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            group_prefix: "ledger".to_string(),
            batch_size_max: 500,
            batch_wait_ms: 0,
            catch_up_batch_size: 1_000,
            retry_backoff_max_ms: 5_000,
            fetch_wait_max_ms: 10,
            create_topics: true,
            lag_check_interval_ms: LAG_CHECK_INTERVAL_MS,
            far_behind_messages: FAR_BEHIND_MESSAGES,
        }
    }
}

/// What a worker has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    /// Messages received from Kafka (applied, duplicate, skipped or dead-lettered).
    pub messages: AtomicU64,
    pub applied: AtomicU64,
    pub duplicates: AtomicU64,
    pub dead_letters: AtomicU64,
    pub batches: AtomicU64,
    pub rebalances: AtomicU64,
    /// Partitions currently assigned to this worker.
    pub assigned_partitions: AtomicI64,
    /// Catch-ups from PostgreSQL, one per topic, each time the consumer starts (the first start, after a failure,
    /// after falling far behind or after the topic lost messages).
    pub catch_ups: AtomicU64,
    /// True once the start-up check (and catch-up, if any) is done and the worker follows Kafka.
    pub following: AtomicBool,
    /// Global position of the newest event applied (events only).
    pub last_position: AtomicI64,
    /// The highest log position applied, in commit order (events only).
    pub highest_applied: Mutex<Option<crate::log::LogPosition>>,
    /// Per event: from `recorded_at` to the commit of the batch that applied it.
    pub commit_to_applied: crate::metrics::Histogram,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("catch-up: {0}")]
    CatchUp(#[from] ApplyError),
}

/// Counts rebalances (and logs them) for the status, and starts partitions the start-up catch-up covered at
/// the offsets it recorded.
pub struct WorkerContext {
    status: Arc<WorkerStatus>,
    projection: &'static str,
    /// `(topic, partition)` → the offset to start from when the partition is assigned (taken once).
    start_at: Mutex<HashMap<(String, i32), i64>>,
    /// Set before the consumer is closed: an assignment that completes during the close commits nothing.
    /// librdkafka aborts the process (`rd_kafka_cgrp_terminated: assert: !rd_kafka_assignment_in_progress`)
    /// when a commit is started after its group has begun terminating (seen once in a test binary whose
    /// workers stop right after they start; this commit is the likely one, the abort was not reproduced).
    closing: std::sync::atomic::AtomicBool,
}

impl WorkerContext {
    /// Applies the recorded start offsets to an assignment; returns the offsets applied.
    fn take_start_offsets(&self, assignment: &mut TopicPartitionList) -> TopicPartitionList {
        let mut applied = TopicPartitionList::new();
        let mut start_at = self.start_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if start_at.is_empty() {
            return applied;
        }
        let assigned: Vec<(String, i32)> =
            assignment.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        for (topic, partition) in assigned {
            if let Some(offset) = start_at.remove(&(topic.clone(), partition)) {
                let _ = assignment.set_partition_offset(&topic, partition, Offset::Offset(offset));
                let _ = applied.add_partition_offset(&topic, partition, Offset::Offset(offset));
            }
        }
        applied
    }
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    /// As rdkafka's default (assign or revoke, incrementally under the cooperative protocol), except that an
    /// assignment starts the partitions the catch-up covered at the offsets it recorded. Setting them here,
    /// not by a commit before subscribing, is what works on a group that still has members: a consumer that
    /// has not joined yet has its commits refused (`UnknownMemberId`).
    fn rebalance(&self, base_consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(base_consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let started = self.take_start_offsets(tpl);
                let assigned =
                    if cooperative { base_consumer.incremental_assign(tpl) } else { base_consumer.assign(tpl) };
                if assigned.is_ok() && started.count() > 0 && !self.closing.load(Ordering::SeqCst) {
                    tracing::info!(
                        projection = self.projection,
                        partitions = started.count(),
                        "partitions start after the catch-up from PostgreSQL"
                    );
                    // Now a member of the group: record the start so that the next owner starts there too.
                    if let Err(error) = base_consumer.commit(&started, CommitMode::Async) {
                        tracing::debug!(projection = self.projection, %error, "committing start offsets failed");
                    }
                }
                assigned.map(|()| Rebalance::Assign(tpl))
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked =
                    if cooperative { base_consumer.incremental_unassign(tpl) } else { base_consumer.unassign() };
                revoked.map(|()| Rebalance::Revoke(tpl))
            }
            other => Ok(Rebalance::Error(KafkaError::Rebalance(other.into()))),
        };
        match result {
            Ok(rebalance) => self.post_rebalance(base_consumer, &rebalance),
            Err(error) => tracing::warn!(projection = self.projection, %error, "applying a rebalance failed"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.status.rebalances.fetch_add(1, Ordering::Relaxed);
        match rebalance {
            // Cooperative protocol: assignments and revocations are incremental.
            Rebalance::Assign(partitions) => {
                self.status.assigned_partitions.fetch_add(partitions.count() as i64, Ordering::Relaxed);
                tracing::info!(projection = self.projection, partitions = partitions.count(), "partitions assigned")
            }
            Rebalance::Revoke(partitions) => {
                self.status.assigned_partitions.fetch_sub(partitions.count() as i64, Ordering::Relaxed);
                tracing::info!(projection = self.projection, partitions = partitions.count(), "partitions revoked")
            }
            Rebalance::Error(error) => tracing::warn!(projection = self.projection, %error, "rebalance error"),
        }
    }
}

type WorkerConsumer = StreamConsumer<WorkerContext>;

pub struct ProjectionWorker {
    pool: PgPool,
    kafka: KafkaConfig,
    projection: Arc<dyn Projection>,
    config: WorkerConfig,
    status: Arc<WorkerStatus>,
}

/// What a worker last wrote to `projection_status`.
#[derive(Default)]
struct Reported {
    initialized: bool,
    rebalances: u64,
    position: Option<crate::log::LogPosition>,
}

/// A decoded message of a batch.
enum Input {
    Event(RecordedEvent),
    Tick(Tick),
}

/// What a dead letter records of its message.
struct MessageMeta {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<String>,
    payload: Option<Vec<u8>>,
}

/// A batch, decoded and owned (so that its transaction can run on a task of its own).
#[derive(Default)]
struct Decoded {
    messages: Vec<MessageMeta>,
    events: Vec<RecordedEvent>,
    event_index: Vec<usize>,
    ticks: Vec<Tick>,
    tick_index: Vec<usize>,
    undecodable: Vec<(usize, String)>,
}

/// One transaction: events, ticks, dead letters. Returns the messages dead-lettered and what was applied.
async fn apply_batch(
    pool: PgPool,
    projection: Arc<dyn Projection>,
    batch: Arc<Decoded>,
    isolate: bool,
) -> Result<(Vec<(usize, String)>, Applied, Applied), ApplyError> {
    let projection = projection.as_ref();
    let mut tx = pool.begin().await.map_err(ApplyError::Database)?;
    enter(&mut tx, projection, Target::Live).await.map_err(ApplyError::Database)?;
    let from_events = apply_events(&mut tx, projection, &batch.events, isolate).await?;
    let from_ticks = apply_ticks(&mut tx, projection, &batch.ticks, isolate).await?;
    let mut poisoned: Vec<(usize, String)> = batch.undecodable.clone();
    poisoned
        .extend(from_events.poisoned.iter().filter_map(|p| p.index.map(|i| (batch.event_index[i], p.error.clone()))));
    poisoned.extend(from_ticks.poisoned.iter().filter_map(|p| p.index.map(|i| (batch.tick_index[i], p.error.clone()))));
    for (index, error) in &poisoned {
        let message = &batch.messages[*index];
        record_dead_letter(
            &mut tx,
            projection.name(),
            &message.topic,
            message.partition,
            message.offset,
            message.key.as_deref(),
            message.payload.clone(),
            error,
        )
        .await
        .map_err(ApplyError::Database)?;
    }
    tx.commit().await.map_err(ApplyError::Database)?;
    Ok((poisoned, from_events, from_ticks))
}

impl ProjectionWorker {
    pub fn new(pool: PgPool, kafka: KafkaConfig, projection: Arc<dyn Projection>, config: WorkerConfig) -> Self {
        Self { pool, kafka, projection, config, status: Arc::default() }
    }

    /// The longest wait between two tries.
    fn retry_max(&self) -> Duration {
        Duration::from_millis(self.config.retry_backoff_max_ms)
    }

    pub fn status(&self) -> Arc<WorkerStatus> {
        self.status.clone()
    }

    pub fn group_id(&self) -> String {
        format!("{}.{}", self.config.group_prefix, self.projection.name())
    }

    /// The log cursor of this projection's catch-ups from PostgreSQL.
    pub fn log_cursor(&self) -> String {
        format!("projection:{}", self.projection.name())
    }

    fn topics(&self) -> Vec<String> {
        let mut topics = Vec::new();
        if self.projection.aggregate_type().is_some() {
            topics.push(self.kafka.events_topic.clone());
        }
        if self.projection.consumes_ticks() {
            topics.push(self.kafka.prices_topic.clone());
        }
        topics
    }

    /// Runs until `cancel` fires, restarting (with a new consumer and start-up check) after failures, and when
    /// it fell far behind while following (the start-up check then catches up from PostgreSQL).
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), WorkerError> {
        let mut backoff = Backoff::new(Duration::from_millis(RESTART_FIRST_DELAY_MS), self.retry_max());
        // Whether the next start must catch up whatever the offsets say: kept until a start got past it.
        let mut catch_up = false;
        let mut restarted: Option<Instant> = None;
        loop {
            let outcome = self.run_once(&cancel, catch_up).await;
            if outcome.is_ok() {
                catch_up = false;
            }
            if matches!(outcome, Ok(Followed::FarBehind | Followed::Lost)) {
                // At most one such restart per check interval: each one makes the group rebalance.
                let gap = Duration::from_millis(self.config.lag_check_interval_ms);
                if let Some(wait) = restarted.and_then(|at| gap.checked_sub(at.elapsed())) {
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                restarted = Some(Instant::now());
            }
            match outcome {
                Ok(Followed::Cancelled) => return Ok(()),
                Ok(Followed::FarBehind) => {
                    tracing::info!(
                        projection = self.projection.name(),
                        "far behind on the events topic while following; catching up from PostgreSQL"
                    );
                }
                Ok(Followed::Lost) => {
                    catch_up = true;
                    tracing::warn!(
                        projection = self.projection.name(),
                        "the events topic lost messages the group had not consumed (recreated, truncated or past \
                         retention); catching up from PostgreSQL"
                    );
                }
                Err(error) => {
                    self.status.following.store(false, Ordering::SeqCst);
                    tracing::warn!(projection = self.projection.name(), %error, "worker failed; restarting");
                    if backoff.wait(&cancel).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn consumer(&self) -> Result<Arc<WorkerConsumer>, KafkaError> {
        let context = WorkerContext {
            status: self.status.clone(),
            projection: self.projection.name(),
            start_at: Mutex::default(),
            closing: Default::default(),
        };
        let consumer: WorkerConsumer = self
            .kafka
            .client_config()
            .set("client.id", format!("ledger-{}", self.projection.name()))
            .set("group.id", self.group_id())
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", self.config.fetch_wait_max_ms.to_string())
            .create_with_context(context)?;
        Ok(Arc::new(consumer))
    }

    /// One consumer's life; with `catch_up`, the start-up check catches up on the events topic whatever the
    /// group's offsets say.
    async fn run_once(&self, cancel: &CancellationToken, catch_up: bool) -> Result<Followed, WorkerError> {
        let consumer = self.consumer()?;
        let result = self.follow(&consumer, cancel, catch_up).await;
        consumer.context().closing.store(true, Ordering::SeqCst);
        crate::kafka::close_off_runtime(consumer, "projection-worker").await;
        result
    }

    async fn follow(
        &self,
        consumer: &Arc<WorkerConsumer>,
        cancel: &CancellationToken,
        catch_up: bool,
    ) -> Result<Followed, WorkerError> {
        self.catch_up_if_needed(consumer, catch_up).await?;
        let topics = self.topics();
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topic_refs)?;
        self.status.following.store(true, Ordering::SeqCst);
        tracing::info!(projection = self.projection.name(), group = %self.group_id(), "following Kafka");
        let dead_letters: FutureProducer =
            self.kafka.client_config().set("client.id", "ledger-dead-letters").create()?;
        let mut reported = Reported::default();
        self.report_status(&mut reported).await;
        let lag_check_interval = Duration::from_millis(self.config.lag_check_interval_ms);
        let mut lag_checked = Instant::now();
        let mut lag = LagCheck::default();
        loop {
            let batch = self.collect(consumer, cancel).await?;
            if batch.is_empty() {
                return Ok(Followed::Cancelled);
            }
            tracing::debug!(projection = self.projection.name(), messages = batch.len(), "batch collected");
            let poisoned = self.process(&batch, cancel).await?;
            tracing::debug!(projection = self.projection.name(), "batch applied");
            let Some(poisoned) = poisoned else { return Ok(Followed::Cancelled) };
            self.publish_dead_letters(&dead_letters, &batch, &poisoned).await;
            self.commit_offsets(consumer, &batch);
            self.report_status(&mut reported).await;
            if lag_checked.elapsed() >= lag_check_interval {
                lag_checked = Instant::now();
                match lag.check(self, consumer).await {
                    Ok(Lag::FarBehind) => {
                        self.status.following.store(false, Ordering::SeqCst);
                        return Ok(Followed::FarBehind);
                    }
                    Ok(Lag::Lost) => {
                        self.status.following.store(false, Ordering::SeqCst);
                        return Ok(Followed::Lost);
                    }
                    Ok(Lag::Near) => {}
                    // Only a check: following goes on, and the next one may succeed.
                    Err(error) => tracing::warn!(projection = self.projection.name(), %error, "lag check failed"),
                }
            }
        }
    }

    /// Waits for one message, then takes what is already waiting and what arrives until `batch_wait_ms` after
    /// that first message (by default none: what is already waiting, give or take the timer's millisecond), up to
    /// `batch_size_max`. The wait is bounded from the first message, not from the latest one: a steady stream
    /// (one message a millisecond at 1,000 commands/s) would otherwise keep a batch open until it is full, and
    /// its first message waiting for all the others.
    async fn collect(
        &self,
        consumer: &WorkerConsumer,
        cancel: &CancellationToken,
    ) -> Result<Vec<OwnedMessage>, KafkaError> {
        let first = tokio::select! {
            _ = cancel.cancelled() => return Ok(Vec::new()),
            message = consumer.recv() => message?.detach(),
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.config.batch_wait_ms);
        while batch.len() < self.config.batch_size_max {
            // Past the deadline this still takes a message that is already waiting (the receive is polled first).
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(message)) => batch.push(message.detach()),
                Ok(Err(error)) => return Err(error),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    /// Applies a batch; returns the poisoned messages (index, error), or `None` if cancelled while retrying.
    async fn process(
        &self,
        batch: &[OwnedMessage],
        cancel: &CancellationToken,
    ) -> Result<Option<Vec<(usize, String)>>, WorkerError> {
        // Open until the batch is applied, so that each span's duration is the batch's.
        let _trace_spans = self.trace_spans(batch);
        let mut decoded = Decoded::default();
        for (index, message) in batch.iter().enumerate() {
            decoded.messages.push(MessageMeta {
                topic: message.topic().to_string(),
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                payload: message.payload().map(<[u8]>::to_vec),
            });
            match self.decode(message) {
                Ok(Input::Event(event)) => {
                    decoded.events.push(event);
                    decoded.event_index.push(index);
                }
                Ok(Input::Tick(tick)) => {
                    decoded.ticks.push(tick);
                    decoded.tick_index.push(index);
                }
                Err(error) => decoded.undecodable.push((index, error)),
            }
        }
        let decoded = Arc::new(decoded);
        let mut backoff = Backoff::new(Duration::from_millis(BATCH_RETRY_FIRST_DELAY_MS), self.retry_max());
        let mut isolate = false;
        loop {
            // Detached (see `db::detached`): killing the worker mid-batch must not cut the transaction in half.
            let job = apply_batch(self.pool.clone(), self.projection.clone(), decoded.clone(), isolate);
            let result = crate::db::detached(job).await.map_err(ApplyError::Database).and_then(|r| r);
            match result {
                Ok((poisoned, from_events, from_ticks)) => {
                    self.status.messages.fetch_add(decoded.messages.len() as u64, Ordering::Relaxed);
                    self.record(&from_events, &from_ticks, &decoded.events, poisoned.len());
                    return Ok(Some(poisoned));
                }
                Err(ApplyError::Poison(_)) if !isolate => isolate = true,
                Err(ApplyError::Poison(error)) => return Err(WorkerError::CatchUp(ApplyError::Poison(error))),
                Err(ApplyError::Database(error)) => {
                    tracing::warn!(projection = self.projection.name(), %error, "applying a batch failed; retrying");
                    if backoff.wait(cancel).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Records in `projection_status` the rebalances since the last report and the highest position applied
    /// (for /metrics). Outside the batch transaction, best effort: a failure only delays the figures.
    async fn report_status(&self, reported: &mut Reported) {
        let rebalances = self.status.rebalances.load(Ordering::Relaxed);
        let position = *self.status.highest_applied.lock().unwrap_or_else(|p| p.into_inner());
        if reported.initialized && rebalances == reported.rebalances && position == reported.position {
            return;
        }
        let position_or_start = position.unwrap_or(crate::log::LogPosition::START);
        let result = sqlx::query(
            "insert into projection_status as s (projection, transaction_id, global_position, rebalances)
             values ($1, $2::text::xid8, $3, $4)
             on conflict (projection) do update set
                 transaction_id = case when (excluded.transaction_id, excluded.global_position)
                                            > (s.transaction_id, s.global_position)
                                       then excluded.transaction_id else s.transaction_id end,
                 global_position = case when (excluded.transaction_id, excluded.global_position)
                                             > (s.transaction_id, s.global_position)
                                        then excluded.global_position else s.global_position end,
                 rebalances = s.rebalances + excluded.rebalances,
                 updated_at = clock_timestamp()",
        )
        .bind(self.projection.name())
        .bind(position_or_start.transaction_id.to_string())
        .bind(position_or_start.global_position)
        .bind((rebalances - reported.rebalances) as i64)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => *reported = Reported { initialized: true, rebalances, position },
            Err(error) => tracing::debug!(projection = self.projection.name(), %error, "reporting status failed"),
        }
    }

    /// A span for applying this batch in the trace of each request that wrote one of its events (the relay's
    /// `traceparent` header; see `crate::trace`), so that a trace shows request → commit → projection; one per
    /// trace (the first event's parent span), and only when this process exports spans. Messages without a
    /// context (ticks, events of system processes) open none.
    fn trace_spans(&self, batch: &[OwnedMessage]) -> Vec<tracing::Span> {
        if !crate::trace::exporting() {
            return Vec::new();
        }
        let mut traces = HashSet::new();
        batch
            .iter()
            .filter_map(|message| {
                let headers = message.headers()?;
                let header = headers.iter().find(|h| h.key == TRACEPARENT)?;
                TraceParent::parse(std::str::from_utf8(header.value?).ok()?)
            })
            .filter(|parent| traces.insert(parent.trace_id))
            .take(TRACE_SPANS_PER_BATCH_MAX)
            .map(|parent| {
                tracing::info_span!(
                    "projection",
                    projection = self.projection.name(),
                    trace_id = %parent.trace_id_hex(),
                    parent_span_id = %parent.span_id_hex(),
                )
            })
            .collect()
    }

    fn decode(&self, message: &OwnedMessage) -> Result<Input, String> {
        let payload = message.payload().ok_or("empty message")?;
        if message.topic() == self.kafka.events_topic {
            let envelope = Envelope::decode(payload).map_err(|e| format!("not an event envelope: {e}"))?;
            if envelope.envelope_version != crate::relay::ENVELOPE_VERSION {
                return Err(format!("unsupported envelope version {}", envelope.envelope_version));
            }
            Ok(Input::Event(envelope.into_recorded()))
        } else {
            Tick::decode(payload).map(Input::Tick).map_err(|e| e.to_string())
        }
    }

    fn record(&self, from_events: &Applied, from_ticks: &Applied, events: &[RecordedEvent], dead: usize) {
        let status = &self.status;
        status.applied.fetch_add((from_events.applied + from_ticks.applied) as u64, Ordering::Relaxed);
        status.duplicates.fetch_add((from_events.duplicates + from_ticks.duplicates) as u64, Ordering::Relaxed);
        status.dead_letters.fetch_add(dead as u64, Ordering::Relaxed);
        status.batches.fetch_add(1, Ordering::Relaxed);
        let now = chrono::Utc::now();
        let relevant = events.iter().filter(|e| Some(e.aggregate_type.as_str()) == self.projection.aggregate_type());
        let mut batch_highest = None;
        for event in relevant {
            status.last_position.fetch_max(event.position.global_position, Ordering::Relaxed);
            batch_highest = batch_highest.max(Some(event.position));
            let delay = (now - event.recorded_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            status.commit_to_applied.observe(delay);
        }
        if batch_highest.is_some() {
            let mut highest = status.highest_applied.lock().unwrap_or_else(|p| p.into_inner());
            *highest = (*highest).max(batch_highest);
        }
    }

    async fn publish_dead_letters(
        &self,
        producer: &FutureProducer,
        batch: &[OwnedMessage],
        poisoned: &[(usize, String)],
    ) {
        for (index, error) in poisoned {
            let message = &batch[*index];
            let partition = message.partition().to_string();
            let offset = message.offset().to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: "error", value: Some(error.as_str()) })
                .insert(Header { key: "source_topic", value: Some(message.topic()) })
                .insert(Header { key: "source_partition", value: Some(&partition) })
                .insert(Header { key: "source_offset", value: Some(&offset) })
                .insert(Header { key: "projection", value: Some(self.projection.name()) });
            let mut record = FutureRecord::to(&self.kafka.dead_letter_topic).headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            // The dead_letters table already holds it; the topic copy is best effort.
            if let Err((error, _)) = producer.send(record, Duration::from_millis(KAFKA_REQUEST_TIMEOUT_MS)).await {
                tracing::warn!(projection = self.projection.name(), %error, "producing a dead letter failed");
            }
            tracing::warn!(projection = self.projection.name(), topic = message.topic(), partition = message.partition(),
                offset = message.offset(), %error, "message dead-lettered");
        }
    }

    fn commit_offsets(&self, consumer: &WorkerConsumer, batch: &[OwnedMessage]) {
        let mut next: HashMap<(String, i32), i64> = HashMap::new();
        for message in batch {
            let entry = next.entry((message.topic().to_string(), message.partition())).or_insert(0);
            *entry = (*entry).max(message.offset() + 1);
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            let _ = offsets.add_partition_offset(&topic, partition, Offset::Offset(offset));
        }
        // A partition revoked meanwhile refuses the commit: its new owner replays, and the progress rows make
        // that a no-op.
        if let Err(error) = consumer.commit(&offsets, CommitMode::Async) {
            tracing::debug!(projection = self.projection.name(), %error, "offset commit refused");
        }
    }

    /// The start-up check described in the module docs.
    async fn catch_up_if_needed(&self, consumer: &Arc<WorkerConsumer>, force: bool) -> Result<(), WorkerError> {
        if self.config.create_topics {
            self.kafka.ensure_topics().await?;
        }
        for topic in self.topics() {
            let check = {
                let consumer = consumer.clone();
                let topic = topic.clone();
                // Never above the following threshold: a worker restarted for being far behind catches up.
                let threshold = CATCH_UP_LAG_MESSAGES.min(self.config.far_behind_messages);
                tokio::task::spawn_blocking(move || stale_partitions(&consumer, &topic, threshold))
                    .await
                    .map_err(|_| KafkaError::Canceled)??
            };
            let mut check = check;
            if topic == self.kafka.events_topic {
                // Far behind (a worker restarted after a long stop or a crash loop): reading the log from
                // PostgreSQL is much faster than re-reading the topic. Every message below the high watermark
                // seen here was committed before the catch-up starts, so the catch-up covers it.
                check.stale.append(&mut check.behind);
                if force {
                    check.stale = check.highs.iter().map(|(&partition, &high)| (partition, high)).collect();
                }
            }
            if check.stale.is_empty() {
                continue;
            }
            tracing::info!(projection = self.projection.name(), %topic, partitions = check.stale.len(),
                "Kafka lacks the history after this read model, or the group is far behind; catching up from PostgreSQL");
            self.status.catch_ups.fetch_add(1, Ordering::Relaxed);
            let projection = self.projection.clone();
            let batch_size = self.config.catch_up_batch_size;
            let applied = if topic == self.kafka.events_topic {
                catch_up_from_log(&self.pool, projection, Target::Live, &self.log_cursor(), batch_size, |_| {}).await?
            } else {
                catch_up_from_archive(&self.pool, projection, Target::Live, batch_size, |_| {}).await?
            };
            tracing::info!(projection = self.projection.name(), %topic, applied = applied.applied,
                "caught up from PostgreSQL");
            if topic != self.kafka.events_topic {
                continue; // ticks: start from the earliest offset (auto.offset.reset)
            }
            // Applied when the group assigns these partitions (see `WorkerContext::rebalance`).
            let mut start_at = consumer.context().start_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for (partition, high) in check.stale {
                start_at.insert((topic.clone(), partition), high);
            }
        }
        Ok(())
    }
}

/// A group this many messages behind on a partition of the events topic at start-up catches up from PostgreSQL
/// instead.
pub const CATCH_UP_LAG_MESSAGES: i64 = 200;
/// A following worker this many messages behind on a partition of the events topic catches up from PostgreSQL
/// (10 full batches: far more than the commits in flight; in the chaos test, a broker keeping its log in
/// PostgreSQL delivered a backlog so slowly that the workers were still minutes behind after ten minutes, where
/// the same backlog took seconds from the log).
pub const FAR_BEHIND_MESSAGES: i64 = 5_000;
/// How often a following worker checks whether it fell that far behind, at most.
pub const LAG_CHECK_INTERVAL_MS: u64 = 10_000;

/// A following worker's look at its lag on the events topic (every [`WorkerConfig::lag_check_interval_ms`]).
///
/// It also keeps the projection's log cursor (where a catch-up from PostgreSQL starts) moving while the worker
/// follows: each check reads the relay's cursor `R`, then the topic's watermarks; every event up to `R` was
/// acknowledged by the broker before `R` was stored, so it lies below the high watermarks `H` read after it. Once
/// the group's committed offsets reach `H` on every partition (a later check), every event up to `R` has been
/// applied, and the cursor moves to `R` (forward only). A catch-up then reads only what came after, not
/// everything since the last one. That needs the topic to have kept what the group had not consumed: a high
/// watermark that went down (the topic recreated or truncated) or a low watermark past the group's previous
/// offset (retention overtook it, and the consumer skipped to the earliest message) saves nothing and makes the
/// worker catch up from the cursor where it is.
#[derive(Default)]
struct LagCheck {
    /// The relay's cursor, once the cluster could be named (tried again at each check until then).
    relay_cursor: Option<String>,
    /// The previous check: the relay's position read before it, and its watermarks and committed offsets.
    previous: Option<(Option<LogPosition>, PartitionCheck)>,
}

/// What a lag check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lag {
    Near,
    /// [`WorkerConfig::far_behind_messages`] behind on a partition of this member.
    FarBehind,
    /// The topic lost messages the group had not consumed.
    Lost,
}

impl LagCheck {
    /// Checks as described above; moves the log cursor forward when it can.
    async fn check(&mut self, worker: &ProjectionWorker, consumer: &Arc<WorkerConsumer>) -> Result<Lag, WorkerError> {
        if worker.projection.aggregate_type().is_none() {
            return Ok(Lag::Near);
        }
        if self.relay_cursor.is_none() {
            self.relay_cursor = crate::relay::cursor_name(&worker.kafka).await.ok();
        }
        let relayed = match &self.relay_cursor {
            Some(name) => Some(crate::log::load_cursor(&worker.pool, name).await.map_err(ApplyError::Database)?),
            None => None,
        };
        let check = {
            let consumer = consumer.clone();
            let topic = worker.kafka.events_topic.clone();
            let threshold = worker.config.far_behind_messages;
            tokio::task::spawn_blocking(move || stale_partitions(&consumer, &topic, threshold))
                .await
                .map_err(|_| KafkaError::Canceled)??
        };
        if let Some((relayed_before, before)) = self.previous.take() {
            let lost = before.highs.iter().any(|(partition, high)| {
                let truncated = check.highs.get(partition).is_none_or(|now| now < high);
                let skipped = before
                    .committed
                    .get(partition)
                    .is_some_and(|c| check.lows.get(partition).is_some_and(|low| low > c));
                truncated || skipped
            });
            if lost {
                return Ok(Lag::Lost);
            }
            let applied =
                before.highs.iter().all(|(partition, high)| check.committed.get(partition).is_some_and(|c| c >= high));
            if let (true, Some(position)) = (applied, relayed_before) {
                crate::log::save_cursor(&worker.pool, &worker.log_cursor(), position)
                    .await
                    .map_err(ApplyError::Database)?;
            }
        }
        let assigned: HashSet<i32> = consumer
            .assignment()?
            .elements_for_topic(&worker.kafka.events_topic)
            .iter()
            .map(|element| element.partition())
            .collect();
        let far_behind = check.behind.iter().any(|(partition, _)| assigned.contains(partition));
        self.previous = Some((relayed, check));
        Ok(if far_behind { Lag::FarBehind } else { Lag::Near })
    }
}

/// How following Kafka ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Followed {
    Cancelled,
    /// The group fell [`WorkerConfig::far_behind_messages`] behind: start again (the start-up check catches up).
    FarBehind,
    /// The topic lost messages the group had not consumed: start again and catch up whatever the offsets say.
    Lost,
}

struct PartitionCheck {
    /// Partitions whose committed offset is missing or outside the topic, with their high watermark.
    stale: Vec<(i32, i64)>,
    /// Partitions with a valid offset at least the threshold behind, with their high watermark.
    behind: Vec<(i32, i64)>,
    /// Every partition's high watermark.
    highs: HashMap<i32, i64>,
    /// Every partition's low watermark.
    lows: HashMap<i32, i64>,
    /// The committed offset of each partition that has a valid one.
    committed: HashMap<i32, i64>,
}

/// Compares the group's committed offsets with each partition's watermarks (blocking calls); `behind` lists
/// those at least `threshold` messages behind.
fn stale_partitions(consumer: &WorkerConsumer, topic: &str, threshold: i64) -> Result<PartitionCheck, KafkaError> {
    let timeout = Duration::from_millis(KAFKA_REQUEST_TIMEOUT_MS);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        assignment.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(assignment, timeout)?;
    let mut check = PartitionCheck {
        stale: Vec::new(),
        behind: Vec::new(),
        highs: HashMap::new(),
        lows: HashMap::new(),
        committed: HashMap::new(),
    };
    for &partition in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
        check.highs.insert(partition, high);
        check.lows.insert(partition, low);
        match committed.find_partition(topic, partition).map(|p| p.offset()) {
            Some(Offset::Offset(o)) if o >= low && o <= high => {
                check.committed.insert(partition, o);
                if high - o >= threshold {
                    check.behind.push((partition, high));
                }
            }
            _ => check.stale.push((partition, high)),
        }
    }
    Ok(check)
}

/// Runs one worker per projection until `cancel` fires; fails if one of them fails for good.
pub async fn run_workers(
    pool: PgPool,
    kafka: KafkaConfig,
    projections: Vec<Arc<dyn Projection>>,
    config: WorkerConfig,
    cancel: CancellationToken,
) -> Result<(), WorkerError> {
    let tasks: Vec<_> = projections
        .into_iter()
        .map(|projection| {
            let worker = ProjectionWorker::new(pool.clone(), kafka.clone(), projection, config.clone());
            let cancel = cancel.clone();
            tokio::spawn(async move { worker.run(cancel).await })
        })
        .collect();
    for task in tasks {
        task.await.map_err(|_| WorkerError::Kafka(KafkaError::Canceled))??;
    }
    Ok(())
}
