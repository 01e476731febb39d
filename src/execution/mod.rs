//! Paper trading: fills accepted orders against market prices through the same `RecordExecution` command an
//! external broker's gateway uses, and cancels or expires what its time in force says.
//!
//! - [`book`]: the pure matching rules (execution price, slippage, fees, partial fills, IOC/FOK/Day/GTC).
//! - [`PaperExecutor`]: follows the order events in the log and the ticks of `market.prices`, and turns the
//!   book's actions into commands with idempotency keys `paper:<order>:<exec id>` (fills),
//!   `paper:<order>:trigger` (stop orders), `paper:<order>:cancel` and `paper:<order>:expire`.
//!
//! On start the executor reads the order events of the whole log to rebuild its book (orders still working and
//! the execution ids already used), then follows the log's head. It keeps no state of its own, so a restart is
//! safe: a fill committed just before a crash is in the log the next instance reads, and a fill retried after an
//! ambiguous failure carries the same idempotency key. Run one executor per ledger; a second one would race
//! the first for the same fills (the keys keep that harmless, not useful).

pub mod book;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use book::{Action, PaperBook, PaperConfig};

use crate::commands::{CommandContext, CommandError, CommandService, Idempotency};
use crate::domain::order::RecordExecution;
use crate::domain::values::{FreeText, OrderId};
use crate::domain::{OrderCommand, OrderEvent};
use crate::kafka::KafkaConfig;
use crate::log::{LogPosition, LogReader, RecordedEvent};
use crate::market::Tick;
use crate::retry::Backoff;

/// The actor recorded in the metadata of the executor's commands.
pub const PAPER_EXECUTOR: &str = "paper-executor";
/// How often Day orders are checked for expiry.
pub const EXPIRY_CHECK_MS: u64 = 1_000;
/// Ticks waiting for the executor before the consumer waits too.
pub const TICK_QUEUE: usize = 4_096;
/// Attempts per action when the database fails (business refusals are not retried).
const ACTION_ATTEMPTS_MAX: u32 = 5;
/// First wait before trying an action again, and the longest.
const ACTION_RETRY_FIRST_DELAY_MS: u64 = 50;
const ACTION_RETRY_MAX_MS: u64 = 1_000;
/// Wait before reading the log again after a failed read.
const LOG_READ_RETRY_MS: u64 = 500;
/// Pause after an error of the tick consumer (librdkafka reconnects by itself).
const TICK_ERROR_PAUSE_MS: u64 = 100;

/// What the executor has done (for metrics and tests).
#[derive(Debug, Default)]
pub struct PaperStatus {
    /// Ticks handled (counted once the fills and cancels they caused are recorded).
    pub ticks: AtomicU64,
    /// Stop orders triggered.
    pub triggers: AtomicU64,
    pub fills: AtomicU64,
    pub cancels: AtomicU64,
    pub expiries: AtomicU64,
    /// Actions the ledger refused or that failed after retries.
    pub failures: AtomicU64,
    /// Set once the book holds the whole log's history.
    pub caught_up: std::sync::atomic::AtomicBool,
}

pub struct PaperExecutor {
    commands: Arc<CommandService>,
    config: PaperConfig,
    status: Arc<PaperStatus>,
}

#[derive(Serialize)]
struct ActionFingerprint<'a> {
    order: OrderId,
    action: &'a str,
}

impl PaperExecutor {
    pub fn new(commands: Arc<CommandService>, config: PaperConfig) -> Result<Self, String> {
        config.validate()?;
        Ok(Self { commands, config, status: Arc::default() })
    }

    pub fn status(&self) -> Arc<PaperStatus> {
        self.status.clone()
    }

    /// Runs until `cancel` fires: the log's order events and `ticks` drive the book; its actions become
    /// commands.
    pub async fn run(&self, ticks: mpsc::Receiver<Tick>, cancel: CancellationToken) -> Result<(), sqlx::Error> {
        let mut ticks = Some(ticks);
        let mut book = PaperBook::new(self.config.clone());
        let mut reader = LogReader::new(self.commands.pool().clone(), LogPosition::START);
        // Catch up with the history first, so that no order is judged on part of its story.
        loop {
            let batch = reader.read_batch().await?;
            if batch.is_empty() {
                break;
            }
            for event in &batch {
                // No price is known yet: history can produce no action.
                apply_recorded(&mut book, event);
            }
        }
        self.status.caught_up.store(true, Ordering::Relaxed);
        tracing::info!(working = book.working(), position = %reader.position(), "paper executor caught up with the log");
        let (events_tx, mut events) = mpsc::channel::<Vec<RecordedEvent>>(16);
        let follower_cancel = cancel.child_token();
        let follower = tokio::spawn(follow_log(reader, events_tx, follower_cancel.clone()));
        let mut expiry = tokio::time::interval(Duration::from_millis(EXPIRY_CHECK_MS));
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let result = loop {
            let mut handling_tick = false;
            let actions = tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                batch = events.recv() => match batch {
                    Some(batch) => batch.iter().flat_map(|event| apply_recorded(&mut book, event)).collect(),
                    None => break Ok(()),
                },
                tick = next_tick(&mut ticks) => match tick {
                    Some(tick) => {
                        handling_tick = true;
                        book.on_tick(&tick)
                    }
                    // The tick source ended: keep following the log (expiries still apply).
                    None => { ticks = None; Vec::new() }
                },
                _ = expiry.tick() => book.expire_due(self.commands.clock().now()),
            };
            for action in actions {
                if !self.carry_out(&action, &cancel).await {
                    book.action_failed(&action);
                }
            }
            if handling_tick {
                self.status.ticks.fetch_add(1, Ordering::Relaxed);
            }
        };
        follower_cancel.cancel();
        let _ = follower.await;
        result
    }

    /// Executes one action; false when it did not happen.
    async fn carry_out(&self, action: &Action, cancel: &CancellationToken) -> bool {
        let now = self.commands.clock().now();
        let (key, name, command) = match action {
            Action::Fill { order_id, exec_id, quantity, price, fee } => (
                format!("paper:{order_id}:{exec_id}"),
                exec_id.to_string(),
                OrderCommand::RecordExecution(RecordExecution {
                    exec_id: exec_id.clone(),
                    quantity: *quantity,
                    price: *price,
                    fee: *fee,
                    executed_at: now,
                }),
            ),
            Action::Trigger { order_id, price, tick } => (
                format!("paper:{order_id}:trigger"),
                "trigger".into(),
                OrderCommand::TriggerOrder { price: *price, tick: Some(*tick), triggered_at: now },
            ),
            Action::Cancel { order_id, reason } => {
                let Ok(reason) = FreeText::new("reason", *reason) else {
                    tracing::error!(%order_id, reason, "paper executor: a cancel reason it cannot record");
                    return false;
                };
                (
                    format!("paper:{order_id}:cancel"),
                    "cancel".into(),
                    OrderCommand::CancelOrder { reason, canceled_at: now },
                )
            }
            Action::Expire { order_id } => {
                (format!("paper:{order_id}:expire"), "expire".into(), OrderCommand::ExpireOrder { expired_at: now })
            }
        };
        let order_id = action.order_id();
        let context = match Idempotency::new(key, &ActionFingerprint { order: order_id, action: &name }) {
            Ok(idempotency) => CommandContext::new(PAPER_EXECUTOR).with_idempotency(idempotency),
            Err(error) => {
                tracing::error!(%error, "paper executor: cannot key its command");
                return false;
            }
        };
        let mut backoff = Backoff::new(
            Duration::from_millis(ACTION_RETRY_FIRST_DELAY_MS),
            Duration::from_millis(ACTION_RETRY_MAX_MS),
        );
        for attempt in 1..=ACTION_ATTEMPTS_MAX {
            match self.commands.execute_order(&context, order_id, command.clone()).await {
                // Carried out before (the book acted again before the log told it): already counted.
                Ok(outcome) if outcome.duplicate => return true,
                Ok(_) => {
                    let counter = match action {
                        Action::Trigger { .. } => &self.status.triggers,
                        Action::Fill { .. } => &self.status.fills,
                        Action::Cancel { .. } => &self.status.cancels,
                        Action::Expire { .. } => &self.status.expiries,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(error @ (CommandError::Store(_) | CommandError::Contention { .. }))
                    if attempt < ACTION_ATTEMPTS_MAX =>
                {
                    tracing::warn!(%error, %order_id, attempt, "paper executor: command failed; retrying");
                    if backoff.wait(cancel).await {
                        return false;
                    }
                }
                Err(error) => {
                    // Refused (the order was cancelled meanwhile, …) or failing: the log keeps the book right.
                    tracing::info!(%error, %order_id, action = %name, "paper executor: action not carried out");
                    self.status.failures.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
        }
        false
    }
}

async fn next_tick(ticks: &mut Option<mpsc::Receiver<Tick>>) -> Option<Tick> {
    match ticks {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

fn apply_recorded(book: &mut PaperBook, event: &RecordedEvent) -> Vec<Action> {
    if event.aggregate_type != "Order" {
        return Vec::new();
    }
    let (Ok(order_id), Ok(order_event)) = (event.aggregate_id.parse::<OrderId>(), event.decode::<OrderEvent>()) else {
        tracing::warn!(position = %event.position, "paper executor: skipping an undecodable order event");
        return Vec::new();
    };
    book.apply_event(order_id, &order_event)
}

async fn follow_log(mut reader: LogReader, sender: mpsc::Sender<Vec<RecordedEvent>>, cancel: CancellationToken) {
    loop {
        match reader.next_batch(&cancel).await {
            Ok(Some(batch)) => {
                if sender.send(batch).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "paper executor: reading the log failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(LOG_READ_RETRY_MS)) => {}
                }
            }
        }
    }
}

/// Consumes `market.prices` from its latest offset (a group of its own, offsets not committed: the executor
/// only cares about prices from now on) into `sender` until `cancel` fires.
pub fn spawn_tick_consumer(
    kafka: &KafkaConfig,
    sender: mpsc::Sender<Tick>,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, rdkafka::error::KafkaError> {
    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", format!("ledger.paper-executor.{}", uuid::Uuid::new_v4().simple()))
        .set("client.id", "ledger-paper-executor")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    consumer.subscribe(&[kafka.prices_topic.as_str()])?;
    Ok(tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = cancel.cancelled() => break,
                message = consumer.recv() => message,
            };
            let decoded = match message {
                Ok(message) => message.payload().map(Tick::decode),
                Err(error) => {
                    tracing::debug!(%error, "paper executor: tick consumer error");
                    tokio::time::sleep(Duration::from_millis(TICK_ERROR_PAUSE_MS)).await;
                    continue;
                }
            };
            let tick = match decoded {
                Some(Ok(tick)) => tick,
                Some(Err(error)) => {
                    tracing::debug!(%error, "paper executor: skipping an undecodable tick");
                    continue;
                }
                None => continue,
            };
            if sender.send(tick).await.is_err() {
                break;
            }
        }
        crate::kafka::close_off_runtime(consumer, "paper-executor").await;
    }))
}
