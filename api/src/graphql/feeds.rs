//! The feeds behind subscriptions, one set per API instance.
//!
//! - **log**: a follower of the PostgreSQL event log (commit-safe reader, woken by `LISTEN`), so a change made
//!   through any instance — or any process — reaches every instance's subscribers.
//! - **ticks**: a Kafka consumer of the prices topic (its own group, from the latest offset). Besides the tick
//!   itself, each tick is serialised once into the JSON frame of the raw price WebSocket (`/ws/prices`, see
//!   `crate::http::price_socket`) while any such socket listens: every socket sends the same shared bytes.
//! - **alerts**: `LISTEN alert_fired` (a trigger on `alert_firings` notifies every instance).
//! - **progress**: `LISTEN ledger_progress` (projection workers after each batch, the process manager after each
//!   cursor move): wakes the queries waiting for their writes (`waitFor`) instead of letting them poll.
//!
//! Each feed is a bounded broadcast channel: a subscriber that falls more than [`FEED_BUFFER`] messages behind
//! is told to resync (and resumes from its last position), so a slow client can never make the server hold an
//! unbounded backlog.
//!
//! Resuming the log (`after`): subscribe to the feed first, then read the log from `after` until caught up,
//! then pass on feed messages newer than the last one delivered. Anything the feed carried before the
//! subscription was committed before the catch-up read, so the catch-up covers it: no gap, no repeat.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use ledger::kafka::KafkaConfig;
use ledger::log::{LogPosition, LogReader, RecordedEvent};
use ledger::market::Tick;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use serde::Deserialize;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Messages a subscriber may fall behind before it is told to resync.
pub const FEED_BUFFER: usize = 1_024;
/// Events read per batch when a subscriber catches up from the log: all a catching-up subscriber holds, so it
/// bounds its memory whatever the log's size (with the caps on subscriptions, see `crate::http::ws`).
pub const CATCH_UP_BATCH: usize = 100;
/// How often the log follower moves to the log's head while nobody subscribes (it reads nothing else then).
pub const LOG_IDLE_POLL_MS: u64 = 100;
/// Progress notifications a waiter may miss before it just looks again (they carry nothing).
const PROGRESS_BUFFER: usize = 16;
/// Wait before a feed reads or listens again after PostgreSQL failed it.
const FEED_RETRY_MS: u64 = 500;
/// How often the log follower looks for new events besides being woken by `LISTEN` (see `LogReader`).
const LOG_FOLLOW_POLL_MS: u64 = 20;
/// Pause after an error of the tick consumer (librdkafka reconnects by itself).
const TICK_ERROR_PAUSE_MS: u64 = 200;

/// One alert firing, as the `alert_fired` notification carries it.
#[derive(Debug, Clone, Deserialize)]
pub struct FiringNotice {
    pub firing_id: uuid::Uuid,
    pub alert_id: uuid::Uuid,
    pub portfolio_id: uuid::Uuid,
    pub arming: i32,
    pub kind: String,
    pub symbol: String,
    pub price: rust_decimal::Decimal,
    pub observed_value: rust_decimal::Decimal,
    pub fired_at: chrono::DateTime<chrono::Utc>,
}

/// A tick as the raw price WebSocket sends it, serialised once and shared by every socket (cloning the text
/// only counts a reference).
#[derive(Debug)]
pub struct PriceFrame {
    pub symbol: String,
    /// `{"symbol","price","volume","timestamp"}` (decimals as strings, `volume` null when unknown).
    pub text: axum::extract::ws::Utf8Bytes,
}

/// The fields of a [`PriceFrame`], in their order on the wire.
#[derive(serde::Serialize)]
struct PriceMessage<'a> {
    symbol: &'a str,
    price: rust_decimal::Decimal,
    volume: Option<rust_decimal::Decimal>,
    timestamp: chrono::DateTime<chrono::Utc>,
}

impl PriceFrame {
    pub fn of(tick: &Tick) -> PriceFrame {
        let message = PriceMessage {
            symbol: tick.symbol.as_str(),
            price: tick.price.value(),
            volume: tick.volume,
            timestamp: tick.ts,
        };
        // Serialising plain strings, decimals and a timestamp cannot fail.
        let text = serde_json::to_string(&message).unwrap_or_default();
        PriceFrame { symbol: tick.symbol.as_str().to_string(), text: text.into() }
    }
}

/// Why a subscription ended early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    #[error("the subscriber fell behind; resubscribe from the last position received")]
    Resync,
    #[error("the feed stopped")]
    Closed,
    #[error("reading the log failed")]
    Database,
}

pub struct Hub {
    pool: PgPool,
    log: broadcast::Sender<Arc<RecordedEvent>>,
    ticks: broadcast::Sender<Arc<Tick>>,
    /// The ticks as raw price WebSocket frames (filled only while a socket listens).
    prices: broadcast::Sender<Arc<PriceFrame>>,
    /// Fires when the API stops: the raw price sockets close.
    stopping: CancellationToken,
    alerts: broadcast::Sender<Arc<FiringNotice>>,
    progress: broadcast::Sender<()>,
    ticks_available: bool,
    /// Open subscriptions (for metrics), counted once their starting point is fixed: a subscription counted
    /// here receives every event committed from then on.
    pub subscriptions: AtomicI64,
    /// The log follower's position: every event up to it has been offered to the subscribers.
    log_position: std::sync::Mutex<LogPosition>,
    /// Signalled when a log subscription starts (an idle follower starts reading the events again).
    log_subscribed: tokio::sync::Notify,
    /// True once the tick consumer reads every partition from a known offset: a tick published after that
    /// reaches the subscribers.
    ticks_live: std::sync::atomic::AtomicBool,
}

impl Hub {
    /// Starts the feeds; they stop when `cancel` fires.
    pub async fn start(
        pool: PgPool,
        kafka: Option<KafkaConfig>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Arc<Hub>> {
        let (log, _) = broadcast::channel(FEED_BUFFER);
        let (ticks, _) = broadcast::channel(FEED_BUFFER);
        let (prices, _) = broadcast::channel(FEED_BUFFER);
        let (alerts, _) = broadcast::channel(FEED_BUFFER);
        let (progress, _) = broadcast::channel(PROGRESS_BUFFER);
        let hub = Arc::new(Hub {
            pool: pool.clone(),
            log,
            ticks,
            prices,
            stopping: cancel.clone(),
            alerts,
            progress,
            ticks_available: kafka.is_some(),
            subscriptions: AtomicI64::new(0),
            log_position: std::sync::Mutex::new(LogPosition::START),
            log_subscribed: tokio::sync::Notify::new(),
            ticks_live: std::sync::atomic::AtomicBool::new(false),
        });
        let head = ledger::log::newest_position(&pool, ledger::log::Newest::BelowHorizon).await?;
        *hub.log_position.lock().unwrap_or_else(|p| p.into_inner()) = head;
        tokio::spawn(follow_log(hub.clone(), head, cancel.clone()));
        tokio::spawn(follow_notifications(pool.clone(), "alert_fired", hub.clone(), cancel.clone(), |hub, payload| {
            match serde_json::from_str::<FiringNotice>(payload) {
                Ok(firing) => {
                    let _ = hub.alerts.send(Arc::new(firing));
                }
                Err(error) => tracing::warn!(%error, "undecodable alert_fired notification"),
            }
        }));
        let channel = ledger::log::PROGRESS_CHANNEL;
        tokio::spawn(follow_notifications(pool, channel, hub.clone(), cancel.clone(), |hub, _| {
            let _ = hub.progress.send(());
        }));
        if let Some(kafka) = kafka {
            tokio::spawn(follow_ticks(kafka, hub.clone(), cancel));
        }
        Ok(hub)
    }

    /// How far the log feed has read (every event up to here was offered to the subscribers).
    pub fn log_position(&self) -> LogPosition {
        *self.log_position.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the tick feed is live: it reads every partition of the prices topic from a known offset, so
    /// every tick published from now on reaches the subscribers.
    pub fn ticks_live(&self) -> bool {
        self.ticks_live.load(Ordering::Relaxed)
    }

    pub fn ticks_available(&self) -> bool {
        self.ticks_available
    }

    pub fn subscribe_ticks(&self) -> broadcast::Receiver<Arc<Tick>> {
        self.ticks.subscribe()
    }

    /// The ticks as raw price WebSocket frames, from now on (see [`PriceFrame`]).
    pub fn subscribe_prices(&self) -> broadcast::Receiver<Arc<PriceFrame>> {
        self.prices.subscribe()
    }

    /// Fires when the API stops.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    pub fn subscribe_alerts(&self) -> broadcast::Receiver<Arc<FiringNotice>> {
        self.alerts.subscribe()
    }

    /// A future that completes at the next progress notification (a projection applied a batch, the process
    /// manager moved); subscribed when called.
    pub fn next_progress(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut receiver = self.progress.subscribe();
        async move {
            let _ = receiver.recv().await;
        }
    }

    /// Committed events after `after` (or from now when `None`), matching `filter`, in log order, resuming
    /// without gaps or repeats (see the module docs). Ends with `FeedError::Resync` if the subscriber lags.
    ///
    /// The starting point is fixed before this returns (for "from now", a snapshot of what has committed), and
    /// only then is the subscription counted: a write made after the call returns is delivered. (Fixing it in
    /// the stream's task instead let a subscription that also follows ticks be counted by its tick feed first,
    /// and a write racing the snapshot was taken for "before now" and skipped.)
    pub async fn log_events<F>(
        self: &Arc<Self>,
        after: Option<LogPosition>,
        filter: F,
    ) -> Result<impl Stream<Item = Result<Arc<RecordedEvent>, FeedError>> + Send + 'static, FeedError>
    where
        F: Fn(&RecordedEvent) -> bool + Send + Sync + 'static,
    {
        let hub = self.clone();
        let mut live = self.log.subscribe();
        // Wakes an idle follower.
        self.log_subscribed.notify_one();
        // "From now": events of transactions that had committed when the subscription started (visible in the
        // snapshot taken now) are skipped, whatever this instance's follower had delivered by then.
        let before_now = match after {
            Some(_) => None,
            None => Some(ledger::log::Snapshot::now(&self.pool).await.map_err(|error| {
                tracing::warn!(%error, "subscription start failed");
                FeedError::Database
            })?),
        };
        let guard = SubscriptionGuard::new(self.clone());
        Ok(spawn_stream(move |sender| async move {
            let mut last = after;
            let _guard = guard;
            if let Some(start) = after {
                let mut reader = LogReader::new(hub.pool.clone(), start).with_batch_size(CATCH_UP_BATCH);
                loop {
                    let batch = match reader.read_batch().await {
                        Ok(batch) => batch,
                        Err(error) => {
                            tracing::warn!(%error, "subscription catch-up failed");
                            let _ = sender.send(Err(FeedError::Database)).await;
                            return;
                        }
                    };
                    if batch.is_empty() {
                        break;
                    }
                    for event in batch {
                        last = Some(event.position);
                        if filter(&event) && sender.send(Ok(Arc::new(event))).await.is_err() {
                            return;
                        }
                    }
                }
            }
            loop {
                match live.recv().await {
                    Ok(event) => {
                        if last.is_some_and(|last| event.position <= last) {
                            continue; // delivered by the catch-up
                        }
                        if before_now.as_ref().is_some_and(|s| s.sees(event.position.transaction_id)) {
                            continue; // committed before the subscription started
                        }
                        last = Some(event.position);
                        if filter(&event) && sender.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = sender.send(Err(FeedError::Resync)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = sender.send(Err(FeedError::Closed)).await;
                        return;
                    }
                }
            }
        }))
    }

    /// A stream over a broadcast feed: ends with `Resync` when lagging.
    ///
    /// The stream receives from the feed itself when polled (no task or channel of its own between the feed
    /// and the socket): with thousands of subscribers, a task hop per delivery is a good part of the cost.
    pub fn broadcast_stream<T: Clone + Send + 'static>(
        self: &Arc<Self>,
        receiver: broadcast::Receiver<T>,
    ) -> impl Stream<Item = Result<T, FeedError>> + Send + 'static {
        let guard = SubscriptionGuard::new(self.clone());
        futures::stream::unfold(Some((receiver, guard)), |state| async move {
            let (mut receiver, guard) = state?;
            match receiver.recv().await {
                Ok(item) => Some((Ok(item), Some((receiver, guard)))),
                Err(broadcast::error::RecvError::Lagged(_)) => Some((Err(FeedError::Resync), None)),
                Err(broadcast::error::RecvError::Closed) => Some((Err(FeedError::Closed), None)),
            }
        })
    }
}

/// Counts a subscription while its stream lives.
struct SubscriptionGuard(Arc<Hub>);

impl SubscriptionGuard {
    fn new(hub: Arc<Hub>) -> Self {
        hub.subscriptions.fetch_add(1, Ordering::Relaxed);
        Self(hub)
    }
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.0.subscriptions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream fed by a producer task through a channel of one: the task runs only as fast as the client reads,
/// and stops when the stream is dropped.
pub fn spawn_stream<T, F, Fut>(producer: F) -> impl Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    let task = tokio::spawn(producer(sender));
    futures::stream::unfold((receiver, AbortOnDrop(task)), |(mut receiver, task)| async move {
        receiver.recv().await.map(|item| (item, (receiver, task)))
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Offers every committed event to the log subscribers and keeps [`Hub::log_position`].
///
/// While nobody subscribes it reads nothing but the log's head, every [`LOG_IDLE_POLL_MS`] or as soon as
/// someone subscribes, and moves its position there; it does not listen for commits meanwhile (a busy desk
/// commits thousands of times a second, and each wake-up and read would cost both processes CPU).
///
/// Skipping is safe: the follower moves to a head only if there was still no subscriber *after* it read it.
/// A subscription that starts later takes its snapshot (from now) or reads its catch-up (`after`) later still,
/// so it sees every skipped event as already committed: it skips them (from now) or reads them itself.
async fn follow_log(hub: Arc<Hub>, from: LogPosition, cancel: CancellationToken) {
    let mut reader =
        LogReader::new(hub.pool.clone(), from).with_poll_interval(Duration::from_millis(LOG_FOLLOW_POLL_MS));
    loop {
        let result = if hub.log.receiver_count() == 0 {
            reader.stop_listening();
            match reader.head().await {
                Ok(head) => {
                    if let Some(head) = head.filter(|_| hub.log.receiver_count() == 0) {
                        reader.seek(head);
                    }
                    if hub.log.receiver_count() == 0 {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = hub.log_subscribed.notified() => {}
                            _ = tokio::time::sleep(Duration::from_millis(LOG_IDLE_POLL_MS)) => {}
                        }
                    }
                    Ok(())
                }
                Err(error) => Err(error),
            }
        } else {
            match reader.next_batch(&cancel).await {
                Ok(Some(batch)) => {
                    for event in batch {
                        let _ = hub.log.send(Arc::new(event)); // a subscriber may have gone: fine
                    }
                    Ok(())
                }
                Ok(None) => return,
                Err(error) => Err(error),
            }
        };
        match result {
            Ok(()) => *hub.log_position.lock().unwrap_or_else(|p| p.into_inner()) = reader.position(),
            Err(error) => {
                tracing::warn!(%error, "log feed: reading failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(FEED_RETRY_MS)) => {}
                }
            }
        }
    }
}

/// Relays notifications of `channel` to `deliver` until `cancel` fires, listening again after a failure.
async fn follow_notifications(
    pool: PgPool,
    channel: &'static str,
    hub: Arc<Hub>,
    cancel: CancellationToken,
    deliver: impl Fn(&Hub, &str) + Send + 'static,
) {
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(channel).await?;
            loop {
                let notification = listener.recv().await?;
                deliver(&hub, notification.payload());
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            result = listener => {
                if let Err(error) = result {
                    tracing::warn!(%error, channel, "listening failed; retrying");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(FEED_RETRY_MS)) => {}
        }
    }
}

/// Follows the prices topic from its end, every partition assigned explicitly (no consumer group: every
/// instance needs every tick). Once the end offsets are known the feed is live: a tick published from then on
/// reaches the subscribers. Partitions added to the topic later are picked up at the next restart.
async fn follow_ticks(kafka: KafkaConfig, hub: Arc<Hub>, cancel: CancellationToken) {
    let consumer = loop {
        let kafka = kafka.clone();
        match tokio::task::spawn_blocking(move || tick_consumer_at_the_end(&kafka)).await {
            Ok(Ok(consumer)) => break consumer,
            Ok(Err(error)) => tracing::warn!(%error, "tick feed: cannot start reading the prices topic; retrying"),
            Err(error) => tracing::warn!(%error, "tick feed: start-up task failed; retrying"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(TICKS_START_RETRY_MS)) => {}
        }
    };
    hub.ticks_live.store(true, Ordering::Relaxed);
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => {
                ledger::kafka::close_off_runtime(consumer, "tick-feed").await;
                return;
            }
            message = consumer.get().recv() => message,
        };
        match message {
            Ok(message) => {
                // A reused consumer may still hold a message of its previous feed's topic.
                if message.topic() != kafka.prices_topic {
                    continue;
                }
                if let Some(tick) = message.payload().and_then(|p| Tick::decode(p).ok()) {
                    if hub.prices.receiver_count() > 0 {
                        let _ = hub.prices.send(Arc::new(PriceFrame::of(&tick)));
                    }
                    let _ = hub.ticks.send(Arc::new(tick));
                }
            }
            Err(error) => {
                tracing::debug!(%error, "tick feed: consumer error");
                tokio::time::sleep(Duration::from_millis(TICK_ERROR_PAUSE_MS)).await;
            }
        }
    }
}

/// Wait before retrying to start the tick feed (broker unreachable, topic missing).
const TICKS_START_RETRY_MS: u64 = 1_000;
/// Bound on each metadata and watermark request of the tick feed's start.
const TICKS_START_REQUEST_TIMEOUT_MS: u64 = 10_000;

/// A consumer assigned every partition of the prices topic at its current end (blocking: run it off the runtime).
fn tick_consumer_at_the_end(kafka: &KafkaConfig) -> Result<TickConsumer, rdkafka::error::KafkaError> {
    let consumer = match TickConsumer::idle(&kafka.brokers) {
        Some(consumer) => consumer,
        // The group is never joined (partitions are assigned by hand, no offset is committed): librdkafka only
        // accepts an assignment from a consumer that names one.
        None => TickConsumer {
            brokers: kafka.brokers.clone(),
            consumer: Some(
                kafka
                    .client_config()
                    .set("client.id", "ledger-api-ticks")
                    .set("group.id", format!("ledger-api-{}", uuid::Uuid::new_v4().simple()))
                    .set("enable.auto.commit", "false")
                    .set("enable.auto.offset.store", "false")
                    .set("fetch.wait.max.ms", "10")
                    .create()?,
            ),
        },
    };
    let timeout = Duration::from_millis(TICKS_START_REQUEST_TIMEOUT_MS);
    let topic = kafka.prices_topic.as_str();
    let metadata = consumer.get().fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(rdkafka::error::KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::UnknownTopic));
    }
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in partitions {
        let (_, high) = consumer.get().fetch_watermarks(topic, partition, timeout)?;
        assignment.add_partition_offset(topic, partition, rdkafka::Offset::Offset(high))?;
    }
    consumer.get().assign(&assignment)?;
    Ok(consumer)
}

/// Tick consumers of stopped feeds, unassigned, kept for the next feed of this process (by broker list).
///
/// A tick consumer is never closed while its process runs: librdkafka 2.x aborts the process when a consumer is
/// closed while its assignment is being started or stopped (`rd_kafka_cgrp_terminated: assert:
/// !rd_kafka_assignment_in_progress`), which unassigning first and waiting 100 ms did not prevent on a busy
/// machine (1 run in 20 of the API suite under load aborted). An unassigned consumer fetches nothing; it is
/// reassigned by the next feed, so the pool never holds more consumers than there were feeds running at once
/// (one in a deployed server, a few in a test binary). The operating system ends them with the process.
static IDLE_TICK_CONSUMERS: std::sync::Mutex<Vec<TickConsumer>> = std::sync::Mutex::new(Vec::new());

/// The tick feed's consumer; dropping it unassigns it and parks it in [`IDLE_TICK_CONSUMERS`].
struct TickConsumer {
    brokers: String,
    /// Always `Some` until dropped.
    consumer: Option<StreamConsumer>,
}

impl TickConsumer {
    fn get(&self) -> &StreamConsumer {
        self.consumer.as_ref().expect("a tick consumer holds its consumer until dropped")
    }

    /// A parked consumer of `brokers`, if there is one.
    fn idle(brokers: &str) -> Option<TickConsumer> {
        let mut idle = IDLE_TICK_CONSUMERS.lock().unwrap_or_else(|p| p.into_inner());
        let index = idle.iter().position(|c| c.brokers == brokers)?;
        Some(idle.swap_remove(index))
    }
}

impl Drop for TickConsumer {
    fn drop(&mut self) {
        let Some(consumer) = self.consumer.take() else { return };
        if let Err(error) = consumer.unassign() {
            // Not reusable, and closing it is what aborts: leave it to the end of the process.
            tracing::debug!(%error, "tick feed: unassigning the consumer failed; it is left idle");
            std::mem::forget(consumer);
            return;
        }
        let parked = TickConsumer { brokers: std::mem::take(&mut self.brokers), consumer: Some(consumer) };
        IDLE_TICK_CONSUMERS.lock().unwrap_or_else(|p| p.into_inner()).push(parked);
    }
}
