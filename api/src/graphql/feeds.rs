//! The feeds behind subscriptions, one set per API instance.
//!
//! - **log**: a follower of the PostgreSQL event log (commit-safe reader, woken by `LISTEN`), so a change made
//!   through any instance — or any process — reaches every instance's subscribers.
//! - **ticks**: a Kafka consumer of the prices topic (its own group, from the latest offset). Besides the tick
//!   itself, each tick is serialised once into the JSON frame of the raw price WebSocket (`/ws/prices`, see
//!   `crate::http::price_socket`) while any such socket listens: every socket sends the same shared bytes.
//! - **alerts**: a follower of `alert_firings` in their commit-safe order (woken by `LISTEN alert_fired`, which a
//!   trigger sends), so `alertFired(after:)` resumes like `logEvents(after:)`.
//! - **progress**: `LISTEN ledger_progress` (projection workers after each batch, the process manager after each
//!   cursor move): wakes the queries waiting for their writes (`waitFor`) instead of letting them poll.
//!
//! Each feed is a bounded broadcast channel: a subscriber that falls more than [`FEED_BUFFER`] messages behind
//! is told to resync (and resumes from its last position), so a slow client can never make the server hold an
//! unbounded backlog.
//!
//! Resuming the log or the firings (`after`): subscribe to the feed first, then read the table from `after` until
//! caught up, then pass on feed messages newer than the last one delivered. Anything the feed carried before the
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

/// One alert firing, with its position in the firings' commit-safe order.
#[derive(Debug, Clone)]
pub struct FiringNotice {
    pub position: LogPosition,
    pub firing: ledger::queries::portfolios::AlertFiringRow,
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
        let firings_head = ledger::queries::portfolios::firings_head(&pool).await?;
        tokio::spawn(follow_firings(hub.clone(), firings_head, cancel.clone()));
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

    /// Firings of `portfolio_id`'s alerts after `after` (or from now when `None`), in their commit-safe order,
    /// resuming without gaps or repeats like [`Hub::log_events`]. Ends with `FeedError::Resync` if the subscriber
    /// lags.
    pub fn alert_firings(
        self: &Arc<Self>,
        portfolio_id: uuid::Uuid,
        after: Option<LogPosition>,
    ) -> impl Stream<Item = Result<Arc<FiringNotice>, FeedError>> + Send + 'static {
        let live = self.alerts.subscribe();
        let catch_up =
            after.map(|after| Box::new(FiringsCatchUp { pool: self.pool.clone(), portfolio_id, after }) as _);
        resumable(
            SubscriptionGuard::new(self.clone()),
            live,
            after,
            catch_up,
            |_| false,
            move |notice| notice.firing.portfolio_id == portfolio_id,
        )
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
        let live = self.log.subscribe();
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
        let catch_up = after.map(|start| {
            Box::new(LogReader::new(self.pool.clone(), start).with_batch_size(CATCH_UP_BATCH)) as Box<dyn CatchUp<_>>
        });
        // "From now": skip what had committed when the subscription started.
        let skip =
            move |event: &RecordedEvent| before_now.as_ref().is_some_and(|s| s.sees(event.position.transaction_id));
        Ok(resumable(guard, live, after, catch_up, skip, filter))
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

/// What a resumable feed carries: items with a position in a commit-safe order.
pub trait Positioned: Send + Sync + 'static {
    fn position(&self) -> LogPosition;
}

impl Positioned for RecordedEvent {
    fn position(&self) -> LogPosition {
        self.position
    }
}

impl Positioned for FiringNotice {
    fn position(&self) -> LogPosition {
        self.position
    }
}

/// Reads what a resuming subscriber missed, batch by batch in the feed's order (empty: caught up).
#[async_trait::async_trait]
trait CatchUp<T>: Send {
    async fn next_batch(&mut self) -> Result<Vec<Arc<T>>, sqlx::Error>;
}

#[async_trait::async_trait]
impl CatchUp<RecordedEvent> for LogReader {
    async fn next_batch(&mut self) -> Result<Vec<Arc<RecordedEvent>>, sqlx::Error> {
        Ok(self.read_batch().await?.into_iter().map(Arc::new).collect())
    }
}

/// One portfolio's firings after a position.
struct FiringsCatchUp {
    pool: PgPool,
    portfolio_id: uuid::Uuid,
    after: LogPosition,
}

#[async_trait::async_trait]
impl CatchUp<FiringNotice> for FiringsCatchUp {
    async fn next_batch(&mut self) -> Result<Vec<Arc<FiringNotice>>, sqlx::Error> {
        let rows = ledger::queries::portfolios::firings_after(
            &self.pool,
            Some(self.portfolio_id),
            self.after,
            CATCH_UP_BATCH as i64,
        )
        .await?;
        if let Some((position, _)) = rows.last() {
            self.after = *position;
        }
        Ok(rows.into_iter().map(|(position, firing)| Arc::new(FiringNotice { position, firing })).collect())
    }
}

/// A feed resumed after a position without gaps or repeats: `live` is subscribed first (by the caller), then
/// `catch_up` reads what was missed until caught up, then live items newer than the last one delivered pass on
/// (older ones the catch-up delivered). Anything the live feed carried before the subscription was committed
/// before the catch-up read, so the catch-up covers it. `skip` drops live items (what committed before a "from
/// now" subscription); `filter` chooses what is delivered. Ends with `Resync` when the subscriber lags.
fn resumable<T: Positioned>(
    guard: SubscriptionGuard,
    mut live: broadcast::Receiver<Arc<T>>,
    after: Option<LogPosition>,
    catch_up: Option<Box<dyn CatchUp<T>>>,
    skip: impl Fn(&T) -> bool + Send + 'static,
    filter: impl Fn(&T) -> bool + Send + Sync + 'static,
) -> impl Stream<Item = Result<Arc<T>, FeedError>> + Send + 'static {
    spawn_stream(move |sender| async move {
        let _guard = guard;
        let mut last = after;
        if let Some(mut catch_up) = catch_up {
            loop {
                let batch = match catch_up.next_batch().await {
                    Ok(batch) if batch.is_empty() => break,
                    Ok(batch) => batch,
                    Err(error) => {
                        tracing::warn!(%error, "subscription catch-up failed");
                        let _ = sender.send(Err(FeedError::Database)).await;
                        return;
                    }
                };
                for item in batch {
                    last = Some(item.position());
                    if filter(&item) && sender.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
            }
        }
        loop {
            match live.recv().await {
                Ok(item) => {
                    if last.is_some_and(|last| item.position() <= last) || skip(&item) {
                        continue; // delivered by the catch-up, or committed before the subscription
                    }
                    last = Some(item.position());
                    if filter(&item) && sender.send(Ok(item)).await.is_err() {
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
    })
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

/// How often the firings follower looks for new firings besides being woken by `alert_fired`.
const FIRINGS_POLL_MS: u64 = 250;
/// Firings the follower reads at once.
const FIRINGS_BATCH: i64 = 500;

/// Follows `alert_firings` in commit-safe order from `after`, broadcasting each firing; woken by the
/// `alert_fired` notification, polling as a fallback.
async fn follow_firings(hub: Arc<Hub>, mut after: LogPosition, cancel: CancellationToken) {
    let mut listener = None;
    loop {
        if listener.is_none() {
            listener = async {
                let mut listener = PgListener::connect_with(&hub.pool).await.ok()?;
                listener.listen("alert_fired").await.ok()?;
                Some(listener)
            }
            .await;
        }
        let batch = match ledger::queries::portfolios::firings_after(&hub.pool, None, after, FIRINGS_BATCH).await {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(%error, "alert feed: reading firings failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(FEED_RETRY_MS)) => continue,
                }
            }
        };
        let full = batch.len() as i64 == FIRINGS_BATCH;
        for (position, firing) in batch {
            after = position;
            let _ = hub.alerts.send(Arc::new(FiringNotice { position, firing }));
        }
        if full {
            continue;
        }
        let poll = Duration::from_millis(FIRINGS_POLL_MS);
        tokio::select! {
            _ = cancel.cancelled() => return,
            woken = async {
                match listener.as_mut() {
                    Some(listener) => tokio::time::timeout(poll, listener.recv()).await.ok().map(|r| r.is_ok()),
                    None => {
                        tokio::time::sleep(poll).await;
                        Some(true)
                    }
                }
            } => {
                // A failed LISTEN connection is made again before the next wait.
                if woken == Some(false) {
                    listener = None;
                }
            }
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
