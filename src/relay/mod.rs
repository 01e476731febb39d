//! The relay: mirrors the event log to Kafka, at least once, in per-aggregate order, never skipping.
//!
//! The events table is the outbox. The relay reads it with the commit-safe [`LogReader`] from its cursor,
//! produces each event to `ledger.events` (key = aggregate id, so one aggregate's events share a partition
//! and keep their order), waits for the broker's acknowledgement of a whole batch, and only then stores the
//! cursor. A crash between produce and cursor store re-produces that batch: duplicates, which consumers drop by
//! `(aggregate_id, sequence)`, never a loss.
//!
//! # Why the delivery timeout is infinite
//! librdkafka's idempotent producer keeps a partition's messages gapless and ordered — except when a message
//! times out locally: a later message of the same partition may still be delivered after an earlier one
//! failed, and re-producing the failed one would put sequence 1 after sequence 2. So `message.timeout.ms` is
//! 0 (retry until delivered): while the broker is down, batches wait in the producer, the relay reports the
//! state change once, and resumes by itself when the broker is back. Only a fatal producer error (which stops
//! the producer before any gap) makes the relay recreate its producer and re-produce from its cursor.
//!
//! Batches are pipelined: a task of its own reads the log (ahead of the producing while there is a backlog,
//! [`READ_AHEAD_BATCHES`]); each batch read is produced at once while earlier ones wait for their
//! acknowledgements, up to `batches_in_flight_max` in flight; cursors are stored in order as batches complete.
//! A wait for acknowledgements is resumable: at shutdown the batch being waited for stays first in line, so the
//! drain never stores a cursor past a batch that was not acknowledged. Events are read as [`WireEvent`]s: payload and metadata go into the envelope as
//! the text PostgreSQL sent, never parsed.
//!
//! # One cursor per target cluster
//! The cursor (and the lock that makes one relay active) is named `relay:{cluster id}:{topic}`. A cursor per
//! topic alone would treat events mirrored to one cluster as mirrored to any: pointing the ledger at a new,
//! empty Kafka cluster (or the demo's throw-away in-process one, then a real one) would leave the new cluster
//! without the history. A new cluster id starts from the beginning of the log.

mod envelope;

pub use envelope::{headers, headers_for, Envelope, ENVELOPE_VERSION};

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{join_all, JoinAll};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::kafka::KafkaConfig;
use crate::leadership::{lock_key, Leadership};
use crate::log::{load_cursor, save_cursor, LogPosition, LogReader, WireEvent};
use crate::retry::Backoff;

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Events read from the log and produced per batch.
    pub batch_size: usize,
    /// Batches produced before the oldest must be acknowledged.
    pub batches_in_flight_max: usize,
    /// How often the reader polls when no notification arrives.
    pub poll_interval_ms: u64,
    /// How often a standby relay tries to take over.
    pub standby_poll_ms: u64,
    /// librdkafka `linger.ms`. 0 by default: a light stream is sent at once, and under load the producer still
    /// batches what queues while its requests are in flight (throughput measured the same at 0 and 5 ms).
    pub linger_ms: u32,
    /// Bound of the producer's queue, in messages.
    pub queue_messages_max: u32,
    /// `none`, `gzip`, `lz4`, `snappy` or `zstd` (as the broker allows).
    pub compression: String,
    /// A batch unacknowledged this long marks the broker as unreachable (logged once per state change).
    pub slow_delivery_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// On shutdown, how long to wait for batches already produced to be acknowledged.
    pub shutdown_grace_ms: u64,
    /// Create the topics through the admin API when becoming active. Off where something else creates them
    /// (librdkafka's mock cluster does not implement the admin API).
    pub create_topics: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 1_000,
            batches_in_flight_max: 8,
            poll_interval_ms: 20,
            standby_poll_ms: 500,
            linger_ms: 0,
            queue_messages_max: 100_000,
            compression: "lz4".to_string(),
            slow_delivery_ms: 5_000,
            retry_backoff_max_ms: 5_000,
            shutdown_grace_ms: 5_000,
            create_topics: true,
        }
    }
}

/// What the relay is doing, for metrics and tests. Updated as it goes; read without locks.
#[derive(Debug, Default)]
pub struct RelayStatus {
    pub active: AtomicBool,
    pub broker_unreachable: AtomicBool,
    /// Messages acknowledged by the broker.
    pub produced: AtomicU64,
    pub batches: AtomicU64,
    /// Batches that failed and were re-produced.
    pub failed_batches: AtomicU64,
    pub cursor_transaction_id: AtomicU64,
    pub cursor_global_position: AtomicI64,
    /// `recorded_at` (Unix ms) of the last event acknowledged.
    pub last_recorded_at_ms: AtomicI64,
    /// `relay:{cluster id}:{topic}`, known once the relay has reached the cluster.
    pub cursor_name: std::sync::OnceLock<String>,
    /// Per event: from `recorded_at` (the database's clock at insert) to the broker's acknowledgement.
    pub commit_to_ack: crate::metrics::Histogram,
}

/// How far the relay is behind the log.
pub type RelayLag = crate::log::Lag;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("the relay's log reader stopped unexpectedly")]
    ReaderStopped,
}

/// Batches the relay's reader holds ready while there is a backlog (plus the one it has read and waits to
/// hand over: at most two batches read ahead of the one being produced).
pub const READ_AHEAD_BATCHES: usize = 1;
/// First wait before reaching the broker or PostgreSQL again (then doubling up to `retry_backoff_max_ms`).
const RECONNECT_FIRST_DELAY_MS: u64 = 100;
/// First wait before producing again from the cursor after a batch was not acknowledged.
const REPRODUCE_FIRST_DELAY_MS: u64 = 50;
/// Wait before offering a message again to a full producer queue (it drains as acknowledgements come).
const QUEUE_FULL_WAIT_MS: u64 = 5;
/// How long the relay waits for the broker to name its cluster (the cursor and lock name include it).
const CLUSTER_ID_TIMEOUT_MS: u64 = 5_000;

enum ActiveExit {
    Cancelled,
    LostLeadership,
}

/// A produced batch waiting for its acknowledgements.
struct InFlight {
    produced_at: std::time::Instant,
    last: LogPosition,
    last_recorded_at_ms: i64,
    /// `recorded_at` of each event, in Unix microseconds (for the commit → ack histogram).
    recorded_at_us: Vec<i64>,
    /// Every message's acknowledgement; polled across waits (see [`Relay::await_acknowledgements`]).
    acknowledgements: Pin<Box<JoinAll<DeliveryFuture>>>,
}

/// What the relay's loop woke up for.
enum Next {
    Read(Option<Result<Vec<WireEvent>, sqlx::Error>>),
    Acknowledged(Option<Result<u64, KafkaError>>),
}

pub struct Relay {
    pool: PgPool,
    kafka: KafkaConfig,
    config: RelayConfig,
    status: Arc<RelayStatus>,
}

impl Relay {
    pub fn new(pool: PgPool, kafka: KafkaConfig, config: RelayConfig) -> Self {
        Self { pool, kafka, config, status: Arc::default() }
    }

    pub fn status(&self) -> Arc<RelayStatus> {
        self.status.clone()
    }

    /// The longest wait between two tries.
    fn retry_max(&self) -> Duration {
        Duration::from_millis(self.config.retry_backoff_max_ms)
    }

    /// Runs until `cancel` fires: stands by while another relay holds the lock, relays while it holds it.
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), RelayError> {
        let mut backoff = Backoff::new(Duration::from_millis(RECONNECT_FIRST_DELAY_MS), self.retry_max());
        let name = loop {
            match cursor_name(&self.kafka).await {
                Ok(name) => break name,
                Err(error) => {
                    if !self.status.broker_unreachable.swap(true, Ordering::SeqCst) {
                        tracing::warn!(%error, brokers = %self.kafka.brokers, "relay cannot reach Kafka yet; retrying");
                    }
                    if backoff.wait(&cancel).await {
                        return Ok(());
                    }
                }
            }
        };
        self.status.broker_unreachable.store(false, Ordering::SeqCst);
        let name = self.status.cursor_name.get_or_init(|| name).clone();
        let key = lock_key(&name);
        loop {
            let standby =
                || tracing::info!(topic = %self.kafka.events_topic, "relay standing by: another relay is active");
            let acquired = Leadership::acquire(
                &self.pool,
                key,
                Duration::from_millis(self.config.standby_poll_ms),
                &cancel,
                standby,
            )
            .await;
            let leadership = match acquired {
                Ok(Some(leadership)) => leadership,
                Ok(None) => return Ok(()),
                Err(error) => {
                    tracing::warn!(%error, "relay cannot reach PostgreSQL; retrying");
                    if backoff.wait(&cancel).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            self.status.active.store(true, Ordering::SeqCst);
            let result = self.run_active(leadership, &name, &cancel).await;
            self.status.active.store(false, Ordering::SeqCst);
            match result {
                Ok(ActiveExit::Cancelled) => return Ok(()),
                Ok(ActiveExit::LostLeadership) => {
                    tracing::warn!("relay lost its lock session; standing by");
                }
                Err(error) => {
                    tracing::error!(%error, "relay stopped; restarting from its cursor");
                    if backoff.wait(&cancel).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn create_producer(&self) -> Result<FutureProducer, KafkaError> {
        let mut config = self.kafka.client_config();
        config
            .set("client.id", "ledger-relay")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0")
            .set("linger.ms", self.config.linger_ms.to_string())
            .set("queue.buffering.max.messages", self.config.queue_messages_max.to_string())
            .set("compression.type", &self.config.compression);
        config.create()
    }

    async fn run_active(
        &self,
        mut leadership: Leadership,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<ActiveExit, RelayError> {
        if self.config.create_topics {
            self.kafka.ensure_topics().await?;
        }
        let mut saved = load_cursor(&self.pool, name).await?;
        self.publish_cursor(saved, None);
        tracing::info!(topic = %self.kafka.events_topic, cursor = %saved, "relay active");
        let mut batches = self.read_ahead(saved, cancel);
        let mut producer = self.create_producer()?;
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut backoff = Backoff::new(Duration::from_millis(REPRODUCE_FIRST_DELAY_MS), self.retry_max());

        loop {
            if cancel.is_cancelled() {
                self.drain_on_shutdown(&mut in_flight, name).await;
                leadership.release().await;
                return Ok(ActiveExit::Cancelled);
            }
            // Produce each batch as soon as it is read (room permitting) while waiting for the oldest batch's
            // acknowledgements; the wait is resumable, so a batch is never dropped unacknowledged.
            let room = in_flight.len() < self.config.batches_in_flight_max.max(1);
            let next = match in_flight.front_mut() {
                None => Next::Read(batches.recv().await),
                Some(oldest) => tokio::select! {
                    biased;
                    acknowledged = self.await_acknowledgements(oldest, cancel) => Next::Acknowledged(acknowledged),
                    read = batches.recv(), if room => Next::Read(read),
                },
            };
            let acknowledged = match next {
                Next::Read(Some(batch)) => {
                    let batch = batch?;
                    if !leadership.still_held().await {
                        return Ok(ActiveExit::LostLeadership);
                    }
                    in_flight.push_back(self.produce(&producer, &batch).await?);
                    continue;
                }
                Next::Read(None) if cancel.is_cancelled() => continue,
                Next::Read(None) => return Err(RelayError::ReaderStopped),
                // Cancelled while waiting: the batch stays first in line for the drain at the top of the loop.
                Next::Acknowledged(None) => continue,
                Next::Acknowledged(Some(acknowledged)) => acknowledged,
            };
            let Some(batch) = in_flight.pop_front() else { continue };
            let produced_at = batch.produced_at;
            match acknowledged {
                Ok(count) => {
                    tracing::debug!(
                        events = count,
                        ack_ms = produced_at.elapsed().as_millis() as u64,
                        in_flight = in_flight.len(),
                        "batch acknowledged"
                    );
                    let acknowledged_us = chrono::Utc::now().timestamp_micros();
                    for recorded_us in &batch.recorded_at_us {
                        self.status.commit_to_ack.observe((acknowledged_us - recorded_us) as f64 / 1e6);
                    }
                    save_cursor(&self.pool, name, batch.last).await?;
                    saved = batch.last;
                    self.status.produced.fetch_add(count, Ordering::Relaxed);
                    self.status.batches.fetch_add(1, Ordering::Relaxed);
                    self.publish_cursor(saved, Some(batch.last_recorded_at_ms));
                    backoff.reset();
                }
                Err(error) => {
                    self.status.failed_batches.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, cursor = %saved, "a batch was not acknowledged; re-producing from the cursor");
                    in_flight.clear();
                    if let Some((code, reason)) = producer.client().fatal_error() {
                        tracing::warn!(?code, %reason, "producer hit a fatal error; creating a new one");
                        producer = self.create_producer()?;
                    }
                    batches = self.read_ahead(saved, cancel);
                    if backoff.wait(cancel).await {
                        continue;
                    }
                }
            }
        }
    }

    /// Batches of the log after `after`, read on a task of its own, while there is a backlog up to
    /// [`READ_AHEAD_BATCHES`] ahead of the producing (reading a batch — mostly PostgreSQL rendering the
    /// payloads — took as long as producing it, one after the other). Each batch is non-empty; the task waits
    /// for new events (notification or poll), ends after sending an error, and stops when the receiver is
    /// dropped or `cancel` fires.
    fn read_ahead(
        &self,
        after: LogPosition,
        cancel: &CancellationToken,
    ) -> tokio::sync::mpsc::Receiver<Result<Vec<WireEvent>, sqlx::Error>> {
        let (sender, receiver) = tokio::sync::mpsc::channel(READ_AHEAD_BATCHES);
        let mut reader = LogReader::new(self.pool.clone(), after)
            .with_batch_size(self.config.batch_size)
            .with_poll_interval(Duration::from_millis(self.config.poll_interval_ms));
        let cancel = cancel.clone();
        // The reader's own bound on a batch (it clamps what is configured).
        let batch_size = self.config.batch_size.clamp(1, crate::log::BATCH_SIZE_MAX);
        tokio::spawn(async move {
            let mut backlog = false;
            loop {
                // Ahead of the relay only while there is a backlog (the last batch was full). A steady trickle
                // is read once the relay has taken the previous batch: reading it eagerly made a query, a
                // produce and a cursor write per event or two, slowing everything beside the relay.
                let permit = if backlog {
                    None
                } else {
                    match sender.reserve().await {
                        Ok(permit) => Some(permit),
                        Err(_) => return,
                    }
                };
                let read = tokio::select! {
                    _ = sender.closed() => return,
                    read = reader.next_wire_batch(&cancel) => read,
                };
                let (batch, failed) = match read {
                    Ok(Some(batch)) => {
                        backlog = batch.len() >= batch_size;
                        (Ok(batch), false)
                    }
                    Ok(None) => return,
                    Err(error) => (Err(error), true),
                };
                match permit {
                    Some(permit) => permit.send(batch),
                    None if sender.send(batch).await.is_err() => return,
                    None => {}
                }
                if failed {
                    return;
                }
            }
        });
        receiver
    }

    /// Enqueues every event of `batch` (waiting while the producer's queue is full).
    async fn produce(&self, producer: &FutureProducer, batch: &[WireEvent]) -> Result<InFlight, RelayError> {
        let mut deliveries = Vec::with_capacity(batch.len());
        for event in batch {
            let payload = Envelope::encode(event);
            let mut record = FutureRecord::to(&self.kafka.events_topic)
                .key(event.aggregate_id.as_str())
                .payload(payload.as_slice())
                .headers(headers_for(event));
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        record = returned;
                        tokio::time::sleep(Duration::from_millis(QUEUE_FULL_WAIT_MS)).await;
                    }
                    Err((error, _)) => return Err(error.into()),
                }
            }
        }
        let last = batch.last().map_or(LogPosition::START, |e| e.position);
        let last_recorded_at_ms = batch.last().map_or(0, |e| e.recorded_at.timestamp_millis());
        let recorded_at_us = batch.iter().map(|e| e.recorded_at.timestamp_micros()).collect();
        Ok(InFlight {
            produced_at: std::time::Instant::now(),
            last,
            last_recorded_at_ms,
            recorded_at_us,
            acknowledgements: Box::pin(join_all(deliveries)),
        })
    }

    /// Waits for every acknowledgement of a batch. `None` if cancelled first. Reports an unreachable broker
    /// once when acknowledgements stall, and its recovery once.
    ///
    /// The wait can be given up and resumed: the acknowledgements stay in `batch`, so a batch whose wait was
    /// cancelled is still awaited by the shutdown's drain (whose cursor must not pass it). Not to be called
    /// again once it has answered `Some`.
    async fn await_acknowledgements(
        &self,
        batch: &mut InFlight,
        cancel: &CancellationToken,
    ) -> Option<Result<u64, KafkaError>> {
        let results = loop {
            tokio::select! {
                results = batch.acknowledgements.as_mut() => break results,
                _ = tokio::time::sleep(Duration::from_millis(self.config.slow_delivery_ms)) => {
                    if !self.status.broker_unreachable.swap(true, Ordering::SeqCst) {
                        tracing::warn!(brokers = %self.kafka.brokers,
                            "broker is not acknowledging; messages stay queued and are retried until delivered");
                    }
                }
                _ = cancel.cancelled() => return None,
            }
        };
        if self.status.broker_unreachable.swap(false, Ordering::SeqCst) {
            tracing::info!(brokers = %self.kafka.brokers, "broker acknowledging again");
        }
        for result in &results {
            match result {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Some(Err(error.clone())),
                Err(_) => return Some(Err(KafkaError::Canceled)),
            }
        }
        Some(Ok(results.len() as u64))
    }

    /// On shutdown: give batches already produced a bounded time to be acknowledged, storing cursors in order.
    async fn drain_on_shutdown(&self, in_flight: &mut VecDeque<InFlight>, name: &str) {
        let grace = CancellationToken::new();
        let timer = {
            let grace = grace.clone();
            let wait = Duration::from_millis(self.config.shutdown_grace_ms);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                grace.cancel();
            })
        };
        while let Some(mut batch) = in_flight.pop_front() {
            match self.await_acknowledgements(&mut batch, &grace).await {
                Some(Ok(count)) => {
                    if save_cursor(&self.pool, name, batch.last).await.is_err() {
                        break;
                    }
                    self.status.produced.fetch_add(count, Ordering::Relaxed);
                    self.publish_cursor(batch.last, Some(batch.last_recorded_at_ms));
                }
                _ => break,
            }
        }
        timer.abort();
    }

    fn publish_cursor(&self, position: LogPosition, recorded_at_ms: Option<i64>) {
        self.status.cursor_transaction_id.store(position.transaction_id, Ordering::Relaxed);
        self.status.cursor_global_position.store(position.global_position, Ordering::Relaxed);
        if let Some(ms) = recorded_at_ms {
            self.status.last_recorded_at_ms.store(ms, Ordering::Relaxed);
        }
    }
}

/// The cursor (and lock) name of the relay of `kafka.events_topic` on the cluster `kafka.brokers` points at.
pub async fn cursor_name(kafka: &KafkaConfig) -> Result<String, KafkaError> {
    let cluster = kafka.cluster_id(Duration::from_millis(CLUSTER_ID_TIMEOUT_MS)).await?;
    Ok(format!("relay:{cluster}:{}", kafka.events_topic))
}

/// The relay's lag behind the log: committed events after its cursor and the age of the oldest of them.
pub async fn relay_lag(pool: &PgPool, cursor_name: &str) -> Result<RelayLag, sqlx::Error> {
    crate::log::cursor_lag(pool, cursor_name).await
}
