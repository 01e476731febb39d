//! The process manager: coordinates Order and Portfolio by following the log.
//!
//! | order event          | portfolio step                                  | then                                  |
//! |----------------------|-------------------------------------------------|---------------------------------------|
//! | `OrderPlaced` (buy)  | `ReserveFunds` (limit, or last price + collar)  | `AcceptOrder`, or `RejectOrder(why)`  |
//! | `OrderPlaced` (sell) | `ReserveQuantity` (market: last price − collar) | `AcceptOrder`, or `RejectOrder(why)`  |
//! | `ExecutionRecorded`  | `ApplyExecution`                                |                                       |
//! | `OrderCanceled/Expired` | `ReleaseReservation`                         |                                       |
//! | `OrderAmendRequested` | `AdjustReservation` (what grows)              | `ConfirmAmend`, or `RejectAmend(why)` |
//! | `OrderAmended`       | `AdjustReservation` (what shrinks)              |                                       |
//!
//! Stop orders reserve like market orders at their stop price (or the last price, if already beyond it) moved
//! by the collar, stop-limit orders like limit orders; their trigger needs no step.
//!
//! # One active instance
//! Run several for availability: one holds the advisory lock `ledger.process-manager` and works, the others
//! stand by and take over when its session ends (see `crate::leadership`).
//!
//! # Crash safety
//! Every step runs under the idempotency key `pm:{event id}:{step}`, so re-running an event after a crash
//! returns the first result instead of acting twice, whatever the step. The cursor is saved after each batch;
//! a crash re-runs at most one batch, converging to the same state. If an order was cancelled while it was
//! still pending, the acceptance fails and the reservation just made is released at once.
//!
//! Events of different portfolios run concurrently (bounded); the events of one portfolio — of all its orders
//! — run in log order. (Grouping by order was not enough: a sell placed right after a buy filled could reserve
//! its quantity before the fill was booked, and be rejected for want of a position it already had.) Within a
//! portfolio, consecutive placements are one run: their reservations go to the command service as one batch
//! (decided in order, one idempotency lookup, one group commit), then their acceptances or rejections as another;
//! consecutive fills likewise (their bookings in one batch). Each step keeps its own key, its own cause (the
//! event it follows from) and its own answer, so a run reads as the same steps one by one: a busy portfolio's
//! backlog costs a few statements per run instead of a few per event (`ledger-lab bench process`). One
//! difference: an order cancelled while pending is released after the run's other reservations, not before
//! the next one (whether that release came first was a race with the cancel anyway).
//! An infrastructure error retries the step with backoff (the cursor does not move past it); a business
//! refusal that should never happen (e.g. a fill the portfolio cannot book) is recorded in
//! `process_failures` and processing continues.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rust_decimal::prelude::*;
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::commands::{
    BatchItem, CommandContext, CommandError, CommandOutcome, CommandService, Idempotency, LedgerAggregate,
    BATCH_COMMANDS_MAX,
};
use crate::domain::order::{OrderRejectReason, RejectCode};
use crate::domain::portfolio::ReleaseReason;
use crate::domain::values::{
    FreeText, Money, OrderId, PortfolioId, Price, Quantity, Symbol, FREE_TEXT_LEN_MAX, PRICE_SCALE_MAX,
};
use crate::domain::{
    Order, OrderCommand, OrderError, OrderEvent, OrderType, Portfolio, PortfolioCommand, PortfolioError, Side,
};
use crate::leadership::{lock_key, Leadership};
use crate::log::{event_by_id, load_cursor, save_cursor, LogReader, RecordedEvent};
use crate::retry::Backoff;

pub mod agreement;
pub mod failures;

/// The cursor name and the actor recorded in the metadata of the commands it issues.
pub const PROCESS_MANAGER: &str = "process-manager";
/// The advisory lock one active process manager holds (per database).
const LOCK_NAME: &str = "ledger.process-manager";
/// First wait before running a step again after a transient failure (then doubling up to
/// `retry_backoff_max_ms`).
const STEP_RETRY_FIRST_DELAY: Duration = Duration::from_millis(20);
/// First wait before saving the cursor again.
const CURSOR_RETRY_FIRST_DELAY: Duration = Duration::from_millis(50);
/// Wait before reading the log again after a failed read.
const LOG_READ_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Market buys reserve at the last price raised by this many basis points and may not fill above it;
    /// market sells may not fill below the last price lowered by as much.
    pub market_collar_bps: u32,
    /// Extra cash reserved on every buy for fees, in basis points of the notional.
    pub fee_allowance_bps: u32,
    pub batch_size: usize,
    pub poll_interval_ms: u64,
    /// Portfolios processed at once within a batch.
    pub concurrency_max: usize,
    pub retry_backoff_max_ms: u64,
    /// How often a standby process manager tries to take over.
    pub standby_poll_ms: u64,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            market_collar_bps: 500,
            fee_allowance_bps: 100,
            batch_size: 100,
            poll_interval_ms: 50,
            concurrency_max: 16,
            retry_backoff_max_ms: 5_000,
            standby_poll_ms: 500,
        }
    }
}

/// An amendment's terms, old and new, as its events state them.
struct AmendTerms {
    order: OrderId,
    portfolio_id: PortfolioId,
    side: Side,
    quantity_delta: Decimal,
    order_type: OrderType,
    protection_price: Option<Price>,
    previous_order_type: OrderType,
    previous_protection_price: Option<Price>,
}

impl AmendTerms {
    /// A buy's reservation price before and after: its limit, or its protection price (none for a sell).
    fn reservation_prices(&self) -> (Option<Price>, Option<Price>) {
        match self.side {
            Side::Buy => (
                self.previous_order_type.limit_price().or(self.previous_protection_price),
                self.order_type.limit_price().or(self.protection_price),
            ),
            Side::Sell => (None, None),
        }
    }
}

/// Which events of one portfolio are handled together (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunKind {
    Placements,
    Fills,
    Single,
}

impl RunKind {
    fn of(event: &RecordedEvent) -> Self {
        match event.event_type.as_str() {
            "OrderPlaced" => RunKind::Placements,
            "ExecutionRecorded" => RunKind::Fills,
            _ => RunKind::Single,
        }
    }
}

/// A placed order of a run, with what it reserves (and its protection price) or why it is rejected outright.
struct Placement<'a> {
    event: &'a RecordedEvent,
    order: OrderId,
    portfolio_id: PortfolioId,
    side: Side,
    reservation: Result<(PortfolioCommand, Option<Price>), OrderRejectReason>,
}

/// An order's step after its reservation was answered.
enum OrderStep {
    Accept(Option<Price>),
    Reject(OrderRejectReason),
}

impl OrderStep {
    fn command(&self, at: chrono::DateTime<chrono::Utc>) -> OrderCommand {
        match self {
            OrderStep::Accept(protection_price) => {
                OrderCommand::AcceptOrder { protection_price: *protection_price, accepted_at: at }
            }
            OrderStep::Reject(reason) => OrderCommand::RejectOrder { reason: reason.clone(), rejected_at: at },
        }
    }

    /// The step's name in its idempotency key.
    fn name(&self) -> &'static str {
        match self {
            OrderStep::Accept(_) => "accept",
            OrderStep::Reject(_) => "reject",
        }
    }
}

/// What a process manager is doing (for tests and metrics).
#[derive(Debug, Default)]
pub struct ProcessStatus {
    /// True while this instance holds the lock and follows the log.
    pub active: AtomicBool,
    /// Events handled (each once per batch it was read in).
    pub handled: AtomicU64,
}

pub struct ProcessManager {
    commands: Arc<CommandService>,
    config: ProcessConfig,
    status: Arc<ProcessStatus>,
}

/// How an active spell ended.
enum ActiveExit {
    Cancelled,
    LostLeadership,
}

/// Why handling one event failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    /// Worth retrying: the database or the event store failed.
    #[error(transparent)]
    Transient(CommandError),
    /// Will never succeed: record it and move on.
    #[error("{code}: {message}")]
    Permanent { code: String, message: String },
}

impl From<CommandError> for StepError {
    fn from(error: CommandError) -> Self {
        if error.is_business() {
            StepError::Permanent { code: error.code().to_string(), message: error.to_string() }
        } else {
            StepError::Transient(error)
        }
    }
}

impl From<sqlx::Error> for StepError {
    fn from(error: sqlx::Error) -> Self {
        StepError::Transient(CommandError::store(error))
    }
}

impl ProcessManager {
    pub fn new(commands: Arc<CommandService>, config: ProcessConfig) -> Self {
        Self { commands, config, status: Arc::default() }
    }

    pub fn status(&self) -> Arc<ProcessStatus> {
        self.status.clone()
    }

    fn pool(&self) -> &PgPool {
        self.commands.pool()
    }

    /// The longest wait between two tries.
    fn retry_max(&self) -> Duration {
        Duration::from_millis(self.config.retry_backoff_max_ms)
    }

    /// Follows the log from the stored cursor until `cancel` fires, while it holds the process manager's lock
    /// (one active instance per database; others stand by and take over when its session ends). On
    /// cancellation it finishes the event in hand; the cursor moves only past completed batches.
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), sqlx::Error> {
        let key = lock_key(LOCK_NAME);
        loop {
            let standby = || tracing::info!("process manager standing by: another one is active");
            let poll = Duration::from_millis(self.config.standby_poll_ms);
            let Some(mut leadership) = Leadership::acquire(self.pool(), key, poll, &cancel, standby).await? else {
                return Ok(());
            };
            self.status.active.store(true, Ordering::SeqCst);
            let exit = self.run_active(&mut leadership, &cancel).await;
            self.status.active.store(false, Ordering::SeqCst);
            leadership.release().await;
            match exit? {
                ActiveExit::Cancelled => return Ok(()),
                ActiveExit::LostLeadership => tracing::warn!("process manager lost its lock session; standing by"),
            }
        }
    }

    async fn run_active(
        &self,
        leadership: &mut Leadership,
        cancel: &CancellationToken,
    ) -> Result<ActiveExit, sqlx::Error> {
        // Read only now: the previous active instance may have moved the cursor until its last moment. Saved at
        // once, so that a cursor row says a process manager runs here (`projections::visibility` relies on it).
        let start = load_cursor(self.pool(), PROCESS_MANAGER).await?;
        save_cursor(self.pool(), PROCESS_MANAGER, start).await?;
        let mut reader = LogReader::new(self.pool().clone(), start)
            .with_batch_size(self.config.batch_size)
            .with_poll_interval(Duration::from_millis(self.config.poll_interval_ms));
        tracing::info!(cursor = %start, "process manager active");
        loop {
            let batch = match reader.next_batch(cancel).await {
                Ok(Some(batch)) => batch,
                Ok(None) => return Ok(ActiveExit::Cancelled),
                Err(error) => {
                    tracing::warn!(%error, "reading the log failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(ActiveExit::Cancelled),
                        _ = tokio::time::sleep(LOG_READ_RETRY) => continue,
                    }
                }
            };
            let Some(last) = batch.last().map(|e| e.position) else { continue };
            if !leadership.still_held().await {
                return Ok(ActiveExit::LostLeadership);
            }
            let events = batch.len() as u64;
            if !self.handle_batch(batch, cancel).await {
                return Ok(ActiveExit::Cancelled);
            }
            self.status.handled.fetch_add(events, Ordering::Relaxed);
            self.save_cursor_retrying(last, cancel).await?;
        }
    }

    /// Handles a batch: portfolios concurrently, each portfolio's events in log order. Returns false if cancelled
    /// before every event was handled.
    pub async fn handle_batch(&self, batch: Vec<RecordedEvent>, cancel: &CancellationToken) -> bool {
        let mut by_portfolio: Vec<Vec<RecordedEvent>> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for event in batch.into_iter().filter(|e| e.aggregate_type == "Order") {
            // Events without a portfolio (acceptances, rejections) need no step; an undecodable one is
            // recorded as a failure in its own group.
            let group = event
                .payload
                .as_object()
                .and_then(|variant| variant.values().next())
                .and_then(|fields| fields.get("portfolio_id"))
                .and_then(|id| id.as_str())
                .map_or_else(|| format!("order:{}", event.aggregate_id), |id| format!("portfolio:{id}"));
            let slot = *index.entry(group).or_insert_with(|| {
                by_portfolio.push(Vec::new());
                by_portfolio.len() - 1
            });
            by_portfolio[slot].push(event);
        }
        let results: Vec<bool> = futures::stream::iter(by_portfolio)
            .map(|events| async move { self.handle_portfolio_events(&events, cancel).await })
            .buffer_unordered(self.config.concurrency_max.max(1))
            .collect()
            .await;
        results.into_iter().all(|done| done)
    }

    /// Handles one portfolio's events in log order. Consecutive placements, and consecutive fills, are handled
    /// as runs: each run's portfolio steps go in one batch (one idempotency lookup, one group commit), then its
    /// order steps in another — the same steps with the same keys as one by one, so a run re-read after a
    /// crash answers from the command log. Everything else goes one event at a time. Returns false if
    /// cancelled first.
    async fn handle_portfolio_events(&self, events: &[RecordedEvent], cancel: &CancellationToken) -> bool {
        let mut start = 0;
        while start < events.len() {
            let kind = RunKind::of(&events[start]);
            let length = match kind {
                RunKind::Single => 1,
                _ => events[start..]
                    .iter()
                    .take_while(|event| RunKind::of(event) == kind)
                    .take(BATCH_COMMANDS_MAX)
                    .count(),
            };
            let run = &events[start..start + length];
            let done = match (kind, length) {
                (RunKind::Placements, 2..) => self.handle_placements(run, cancel).await,
                (RunKind::Fills, 2..) => self.handle_fills(run, cancel).await,
                _ => self.handle_one_by_one(run, cancel).await,
            };
            if !done {
                return false;
            }
            start += length;
        }
        true
    }

    /// Books a run of fills of one portfolio with one batch (`ApplyExecution` under each event's key).
    async fn handle_fills(&self, run: &[RecordedEvent], cancel: &CancellationToken) -> bool {
        let items: Result<Vec<_>, StepError> = run
            .iter()
            .map(|event| {
                let fill = event.decode().map_err(|error| StepError::Permanent {
                    code: "UNDECODABLE_EVENT".into(),
                    message: error.to_string(),
                })?;
                let (portfolio_id, command) = booking(&event.aggregate_id, fill)?;
                self.batch_item(event, "apply", portfolio_id.to_string(), command)
            })
            .collect();
        // An event the batch cannot take (undecodable, a bad id) goes the one-by-one way, which records it.
        let Ok(items) = items else { return self.handle_one_by_one(run, cancel).await };
        let Some(results) = self.run_batch::<Portfolio>(items, cancel).await else { return false };
        for (event, result) in run.iter().zip(results) {
            if !self.finish(event, result.map(drop).map_err(StepError::from), cancel).await {
                return false;
            }
        }
        true
    }

    /// Places a run of orders of one portfolio: every reservation in one batch, then every acceptance or
    /// rejection in another, then what an answer asks for (a release for an order cancelled meanwhile).
    async fn handle_placements(&self, run: &[RecordedEvent], cancel: &CancellationToken) -> bool {
        let mut placed = Vec::with_capacity(run.len());
        for event in run {
            let Ok(OrderEvent::OrderPlaced { portfolio_id, symbol, side, order_type, quantity, .. }) = event.decode()
            else {
                return self.handle_one_by_one(run, cancel).await;
            };
            let Ok(order) = parse_order_id(&event.aggregate_id) else {
                return self.handle_one_by_one(run, cancel).await;
            };
            let mut backoff = Backoff::new(STEP_RETRY_FIRST_DELAY, self.retry_max());
            let reservation = loop {
                match self.reservation(order, symbol.clone(), side, order_type, quantity).await {
                    Ok(reservation) => break reservation,
                    Err(error) => {
                        tracing::warn!(event_id = %event.event_id, %error, "pricing a reservation failed; retrying")
                    }
                }
                if backoff.wait(cancel).await {
                    return false;
                }
            };
            placed.push(Placement { event, order, portfolio_id, side, reservation });
        }

        let mut reserve_items = Vec::new();
        for placement in &placed {
            if let Ok((reserve, _)) = &placement.reservation {
                let item =
                    self.batch_item(placement.event, "reserve", placement.portfolio_id.to_string(), reserve.clone());
                match item {
                    Ok(item) => reserve_items.push(item),
                    Err(_) => return self.handle_one_by_one(run, cancel).await,
                }
            }
        }
        let Some(mut reserved) = self.run_batch::<Portfolio>(reserve_items, cancel).await.map(Vec::into_iter) else {
            return false;
        };
        // Each order's step, or what stopped it (recorded, or the event run again alone).
        let mut steps: Vec<Result<OrderStep, StepError>> = Vec::with_capacity(placed.len());
        for placement in &placed {
            steps.push(match &placement.reservation {
                Ok((_, protection_price)) => {
                    let answer = reserved.next().unwrap_or_else(|| Err(CommandError::Store("no answer".into())));
                    self.order_step(placement.side, *protection_price, answer).await
                }
                Err(reason) => Ok(OrderStep::Reject(reason.clone())),
            });
        }

        let mut order_items = Vec::new();
        for (placement, step) in placed.iter().zip(&steps) {
            if let Ok(step) = step {
                let command = step.command(self.commands.clock().now());
                match self.batch_item(placement.event, step.name(), placement.order.to_string(), command) {
                    Ok(item) => order_items.push(item),
                    Err(_) => return self.handle_one_by_one(run, cancel).await,
                }
            }
        }
        let Some(mut answers) = self.run_batch::<Order>(order_items, cancel).await.map(Vec::into_iter) else {
            return false;
        };
        for (placement, step) in placed.iter().zip(steps) {
            let outcome = match step {
                Ok(step) => {
                    let answer = answers.next().unwrap_or_else(|| Err(CommandError::Store("no answer".into())));
                    self.after_order_step(placement.event, placement.order, placement.portfolio_id, &step, answer).await
                }
                Err(error) => Err(error),
            };
            if !self.finish(placement.event, outcome, cancel).await {
                return false;
            }
        }
        true
    }

    async fn handle_one_by_one(&self, run: &[RecordedEvent], cancel: &CancellationToken) -> bool {
        for event in run {
            if !self.handle_with_retry(event, cancel).await {
                return false;
            }
        }
        true
    }

    /// A step of `event` for a batch: its command under the key `pm:{event id}:{step}`, caused by the event.
    fn batch_item<C>(
        &self,
        event: &RecordedEvent,
        step: &str,
        aggregate_id: String,
        command: C,
    ) -> Result<BatchItem<C>, StepError> {
        let mut cause = self.context(event, step)?;
        let idempotency = cause.idempotency.take();
        Ok(BatchItem { aggregate_id, command, idempotency, cause: Some(cause) })
    }

    /// Runs a batch of steps; an infrastructure failure of the batch, or of any of its commands, runs the whole
    /// batch again after a backoff (the commands that committed answer from the command log, the others are
    /// decided again in order). Business answers are returned. `None` if cancelled first.
    async fn run_batch<A: LedgerAggregate>(
        &self,
        items: Vec<BatchItem<A::Command>>,
        cancel: &CancellationToken,
    ) -> Option<Vec<Result<CommandOutcome, CommandError>>> {
        if items.is_empty() {
            return Some(Vec::new());
        }
        let ctx = CommandContext::new(PROCESS_MANAGER);
        let mut backoff = Backoff::new(STEP_RETRY_FIRST_DELAY, self.retry_max());
        loop {
            match self.commands.execute_batch::<A>(&ctx, items.clone(), |_| Ok(())).await {
                Ok(results) => match results.iter().find_map(|r| r.as_ref().err().filter(|e| !e.is_business())) {
                    None => return Some(results),
                    Some(error) => tracing::warn!(%error, "a batched process step failed; running the batch again"),
                },
                Err(error) => tracing::warn!(%error, "a batch of process steps failed; running it again"),
            }
            if backoff.wait(cancel).await {
                return None;
            }
        }
    }

    /// Ends an event handled in a batch: a refusal is recorded in `process_failures` (as one by one), an
    /// infrastructure failure after the batch runs the event again alone (every step answers from its key).
    async fn finish(&self, event: &RecordedEvent, outcome: Result<(), StepError>, cancel: &CancellationToken) -> bool {
        match outcome {
            Ok(()) => true,
            Err(StepError::Permanent { code, message }) => {
                tracing::error!(event_id = %event.event_id, position = %event.position, %code, %message,
                    "process step refused; recorded in process_failures");
                match self.record_failure(event, &code, &message).await {
                    Ok(()) => true,
                    Err(_) => self.handle_with_retry(event, cancel).await,
                }
            }
            Err(StepError::Transient(_)) => self.handle_with_retry(event, cancel).await,
        }
    }

    /// Handles one event, retrying transient failures with backoff. Returns false if cancelled first.
    async fn handle_with_retry(&self, event: &RecordedEvent, cancel: &CancellationToken) -> bool {
        let mut backoff = Backoff::new(STEP_RETRY_FIRST_DELAY, self.retry_max());
        loop {
            match self.handle(event).await {
                Ok(()) => return true,
                Err(StepError::Permanent { code, message }) => {
                    tracing::error!(event_id = %event.event_id, position = %event.position, %code, %message,
                        "process step refused; recorded in process_failures");
                    if let Err(error) = self.record_failure(event, &code, &message).await {
                        tracing::warn!(%error, "recording a process failure failed; retrying the event");
                    } else {
                        return true;
                    }
                }
                Err(StepError::Transient(error)) => {
                    tracing::warn!(event_id = %event.event_id, error = %error, "process step failed; retrying");
                }
            }
            if backoff.wait(cancel).await {
                return false;
            }
        }
    }

    /// Reacts to one log event (ignores events it has no step for).
    async fn handle(&self, event: &RecordedEvent) -> Result<(), StepError> {
        if event.aggregate_type != "Order" {
            return Ok(());
        }
        let order_event: OrderEvent = match event.decode() {
            Ok(order_event) => order_event,
            Err(error) => {
                return Err(StepError::Permanent { code: "UNDECODABLE_EVENT".into(), message: error.to_string() })
            }
        };
        let order_id = event.aggregate_id.as_str();
        match order_event {
            OrderEvent::OrderPlaced { portfolio_id, symbol, side, order_type, quantity, .. } => {
                let order = parse_order_id(order_id)?;
                let step = match self.reservation(order, symbol, side, order_type, quantity).await? {
                    Ok((reserve, protection_price)) => {
                        let reserved = self
                            .commands
                            .execute_portfolio(&self.context(event, "reserve")?, portfolio_id, reserve)
                            .await;
                        self.order_step(side, protection_price, reserved).await?
                    }
                    Err(reason) => OrderStep::Reject(reason),
                };
                let command = step.command(self.commands.clock().now());
                let answer = self.commands.execute_order(&self.context(event, step.name())?, order, command).await;
                self.after_order_step(event, order, portfolio_id, &step, answer).await
            }
            fill @ OrderEvent::ExecutionRecorded { .. } => {
                let (portfolio_id, command) = booking(order_id, fill)?;
                self.commands.execute_portfolio(&self.context(event, "apply")?, portfolio_id, command).await?;
                Ok(())
            }
            OrderEvent::OrderCanceled { portfolio_id, .. } => {
                self.release(event, order_id, portfolio_id, ReleaseReason::Canceled).await
            }
            OrderEvent::OrderExpired { portfolio_id, .. } => {
                self.release(event, order_id, portfolio_id, ReleaseReason::Expired).await
            }
            OrderEvent::OrderAmendRequested {
                portfolio_id,
                request,
                symbol,
                side,
                quantity,
                order_type,
                previous_quantity,
                previous_order_type,
                previous_protection_price,
                ..
            } => {
                let terms = AmendTerms {
                    order: parse_order_id(order_id)?,
                    portfolio_id,
                    side,
                    quantity_delta: quantity.value() - previous_quantity,
                    previous_order_type,
                    previous_protection_price,
                    protection_price: self
                        .amended_protection(side, &symbol, order_type, previous_order_type, previous_protection_price)
                        .await?,
                    order_type,
                };
                self.amend(event, request, terms).await
            }
            OrderEvent::OrderAmended {
                portfolio_id,
                side,
                quantity,
                order_type,
                protection_price,
                previous_quantity,
                previous_order_type,
                previous_protection_price,
                ..
            } => {
                let terms = AmendTerms {
                    order: parse_order_id(order_id)?,
                    portfolio_id,
                    side,
                    quantity_delta: quantity.value() - previous_quantity,
                    order_type,
                    previous_order_type,
                    previous_protection_price,
                    protection_price,
                };
                self.give_back(event, terms).await
            }
            OrderEvent::OrderAccepted { .. }
            | OrderEvent::OrderRejected { .. }
            | OrderEvent::OrderTriggered { .. }
            | OrderEvent::OrderAmendRejected { .. } => Ok(()),
        }
    }

    /// What a placed order reserves on its portfolio — quantity for a sell, funds for a buy (at its limit, or
    /// the market price raised by the collar) — and the protection price of a market order; or why it is
    /// rejected before anything is reserved (no market price, a value no portfolio can hold).
    async fn reservation(
        &self,
        order: OrderId,
        symbol: Symbol,
        side: Side,
        order_type: OrderType,
        quantity: Quantity,
    ) -> Result<Result<(PortfolioCommand, Option<Price>), OrderRejectReason>, StepError> {
        let at = self.commands.clock().now();
        let no_market_price = |symbol: &Symbol| OrderRejectReason {
            code: RejectCode::NoMarketPrice,
            detail: format!("no market price known for {symbol}"),
        };
        match side {
            Side::Sell => {
                // A market sell may not fill below the last price lowered by the collar.
                let protection = match order_type {
                    OrderType::Limit { .. } | OrderType::StopLimit { .. } => None,
                    OrderType::Market => match self.market_price(&symbol, Side::Sell).await? {
                        Some(floor) => Some(floor),
                        None => return Ok(Err(no_market_price(&symbol))),
                    },
                    OrderType::Stop { stop_price } => self.stop_protection(stop_price, &symbol, Side::Sell).await?,
                };
                Ok(Ok((PortfolioCommand::ReserveQuantity { order_id: order, symbol, quantity, at }, protection)))
            }
            Side::Buy => {
                let price = match order_type {
                    OrderType::Limit { limit_price } | OrderType::StopLimit { limit_price, .. } => limit_price,
                    OrderType::Market => match self.market_price(&symbol, Side::Buy).await? {
                        Some(price) => price,
                        None => return Ok(Err(no_market_price(&symbol))),
                    },
                    OrderType::Stop { stop_price } => match self.stop_protection(stop_price, &symbol, Side::Buy).await?
                    {
                        Some(price) => price,
                        None => return Ok(Err(no_market_price(&symbol))),
                    },
                };
                let Some(amount) = self.reservation_amount(quantity.value(), price) else {
                    return Ok(Err(OrderRejectReason {
                        code: RejectCode::InsufficientFunds,
                        detail: "the order's value exceeds the largest amount a portfolio can hold".into(),
                    }));
                };
                let protection = order_type.is_protected().then_some(price);
                Ok(Ok((
                    PortfolioCommand::ReserveFunds { order_id: order, symbol, quantity, price, amount, at },
                    protection,
                )))
            }
        }
    }

    /// The order's step once its reservation is answered: accept it (a replayed buy reservation may have been
    /// made at an earlier price: protected at that one), or reject it with the portfolio's refusal.
    async fn order_step(
        &self,
        side: Side,
        protection_price: Option<Price>,
        reserved: Result<CommandOutcome, CommandError>,
    ) -> Result<OrderStep, StepError> {
        match reserved {
            Ok(outcome) => {
                Ok(OrderStep::Accept(match (protection_price, side, outcome.duplicate, outcome.events.first()) {
                    (Some(_), Side::Buy, true, Some(reserved)) => self.reserved_price(reserved.event_id).await?,
                    _ => protection_price,
                }))
            }
            Err(CommandError::Portfolio(error)) => {
                Ok(OrderStep::Reject(OrderRejectReason { code: reject_code(&error), detail: error.to_string() }))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// What the order's answer to its step asks for: nothing, or — accepted after it was cancelled while
    /// pending — giving back what was just reserved.
    async fn after_order_step(
        &self,
        event: &RecordedEvent,
        order: OrderId,
        portfolio_id: PortfolioId,
        step: &OrderStep,
        answer: Result<CommandOutcome, CommandError>,
    ) -> Result<(), StepError> {
        match (step, answer) {
            (OrderStep::Accept(_), Ok(_) | Err(CommandError::Order(OrderError::AlreadyAccepted))) => Ok(()),
            // Cancelled while pending: give back what was just reserved.
            (OrderStep::Accept(_), Err(CommandError::Order(OrderError::Terminal { .. }))) => {
                let release = PortfolioCommand::ReleaseReservation {
                    order_id: order,
                    reason: ReleaseReason::CanceledBeforeAcceptance,
                    at: self.commands.clock().now(),
                };
                self.commands.execute_portfolio(&self.context(event, "release")?, portfolio_id, release).await?;
                Ok(())
            }
            // Already cancelled (or otherwise decided): nothing was reserved, nothing to undo.
            (
                OrderStep::Reject(_),
                Ok(_) | Err(CommandError::Order(OrderError::Terminal { .. } | OrderError::AlreadyAccepted)),
            ) => Ok(()),
            (_, Err(error)) => Err(error.into()),
        }
    }

    /// The protection price an amended order will have: a stop order's follows a new stop as at placement (the
    /// stop, or the last price if already beyond it, moved by the collar), a market order's stays, a limit
    /// protects the others.
    async fn amended_protection(
        &self,
        side: Side,
        symbol: &Symbol,
        order_type: OrderType,
        previous_order_type: OrderType,
        previous_protection_price: Option<Price>,
    ) -> Result<Option<Price>, StepError> {
        Ok(match order_type {
            OrderType::Stop { stop_price } if previous_order_type.stop_price() != Some(stop_price) => {
                self.stop_protection(stop_price, symbol, side).await?.or(previous_protection_price)
            }
            order_type if order_type.is_protected() => previous_protection_price,
            _ => None,
        })
    }

    /// Carries out an amendment request (`request`): what grows — more units, a higher buy price — is reserved
    /// before the order takes the new terms; what shrinks is given back once it has (on `OrderAmended`, by
    /// when every fill under the old terms is booked). So the reservation always covers the fills the order
    /// accepts. A portfolio that cannot cover the growth turns the amendment down; if the order can no longer
    /// take it (filled, cancelled or triggered meanwhile) the growth is given back and the amendment turned down.
    async fn amend(&self, event: &RecordedEvent, request: u32, mut terms: AmendTerms) -> Result<(), StepError> {
        let at = self.commands.clock().now();
        let (before, after) = terms.reservation_prices();
        let raised = matches!((before, after), (Some(before), Some(after)) if after > before);
        let grow = terms.quantity_delta.max(Decimal::ZERO);
        let grows = grow > Decimal::ZERO || raised;
        let adjust = |quantity_delta: Decimal, price: Option<Price>| PortfolioCommand::AdjustReservation {
            order_id: terms.order,
            quantity_delta,
            price,
            at,
        };
        let portfolio_id = terms.portfolio_id;
        if grows {
            let up = adjust(grow, after.filter(|_| raised));
            match self.commands.execute_portfolio(&self.context(event, "adjust-up")?, portfolio_id, up).await {
                // A growth replayed after a crash was made at its first run's price (the last price may have
                // moved since): a market or stop buy is protected at that one.
                Ok(outcome) if outcome.duplicate && terms.side == Side::Buy && terms.order_type.is_protected() => {
                    if let Some(adjusted) = outcome.events.first() {
                        terms.protection_price =
                            self.reserved_price(adjusted.event_id).await?.or(terms.protection_price);
                    }
                }
                Ok(_) => {}
                Err(CommandError::Portfolio(refusal)) => {
                    return self.reject_amend(event, terms.order, request, &refusal).await
                }
                Err(error) => return Err(error.into()),
            }
        }
        let confirm =
            OrderCommand::ConfirmAmend { request, protection_price: terms.protection_price, confirmed_at: at };
        match self.commands.execute_order(&self.context(event, "confirm-amend")?, terms.order, confirm).await {
            Ok(_) => Ok(()),
            Err(CommandError::Order(refusal)) => {
                if grows {
                    let undo = adjust(-grow, before.filter(|_| raised));
                    self.commands.execute_portfolio(&self.context(event, "adjust-undo")?, portfolio_id, undo).await?;
                }
                self.reject_amend(event, terms.order, request, &refusal).await
            }
            Err(error) => Err(error.into()),
        }
    }

    /// On `OrderAmended`: gives back what the amendment shrank (fewer units, a lower buy price).
    async fn give_back(&self, event: &RecordedEvent, terms: AmendTerms) -> Result<(), StepError> {
        let (before, after) = terms.reservation_prices();
        let lowered = matches!((before, after), (Some(before), Some(after)) if after < before);
        let shrink = terms.quantity_delta.min(Decimal::ZERO);
        if shrink < Decimal::ZERO || lowered {
            let down = PortfolioCommand::AdjustReservation {
                order_id: terms.order,
                quantity_delta: shrink,
                price: after.filter(|_| lowered),
                at: self.commands.clock().now(),
            };
            match self.commands.execute_portfolio(&self.context(event, "adjust-down")?, terms.portfolio_id, down).await
            {
                // The reservation is gone (the order is done): nothing left to give back.
                Ok(_) | Err(CommandError::Portfolio(PortfolioError::NoReservation(_))) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    async fn reject_amend(
        &self,
        event: &RecordedEvent,
        order: OrderId,
        request: u32,
        why: &(dyn std::fmt::Display + Sync),
    ) -> Result<(), StepError> {
        let mut text = why.to_string();
        while text.len() > FREE_TEXT_LEN_MAX {
            text.pop();
        }
        let reason = FreeText::new("reason", text)
            .map_err(|e| StepError::Permanent { code: "INVALID_REASON".into(), message: e.to_string() })?;
        let command = OrderCommand::RejectAmend { request, reason, rejected_at: self.commands.clock().now() };
        match self.commands.execute_order(&self.context(event, "reject-amend")?, order, command).await {
            // Already decided (a step run again after a crash): nothing left to do.
            Ok(_) | Err(CommandError::Order(OrderError::NoAmendPending)) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Gives back what the portfolio still reserves for a canceled or expired order.
    async fn release(
        &self,
        event: &RecordedEvent,
        order_id: &str,
        portfolio_id: PortfolioId,
        reason: ReleaseReason,
    ) -> Result<(), StepError> {
        let order_id = parse_order_id(order_id)?;
        let command = PortfolioCommand::ReleaseReservation { order_id, reason, at: self.commands.clock().now() };
        self.commands.execute_portfolio(&self.context(event, "release")?, portfolio_id, command).await?;
        Ok(())
    }

    /// The context of step `step` for `event`: idempotency key `pm:{event id}:{step}`.
    fn context(&self, event: &RecordedEvent, step: &str) -> Result<CommandContext, StepError> {
        #[derive(Serialize)]
        struct StepFingerprint<'a> {
            event_id: uuid::Uuid,
            step: &'a str,
        }
        let key = format!("pm:{}:{step}", event.event_id);
        let idempotency = Idempotency::new(key, &StepFingerprint { event_id: event.event_id, step })?;
        Ok(CommandContext::caused_by(PROCESS_MANAGER, event).with_idempotency(idempotency))
    }

    /// The protection price of a market order: the last price moved against the order by the collar — raised
    /// and rounded up to the cent for a buy (it is also what the buy reserves at), lowered and rounded down for a
    /// sell (below a cent: to 8 decimals, so that a sub-penny price never rounds to zero); `None` when no price
    /// was ever seen.
    async fn market_price(&self, symbol: &Symbol, side: Side) -> Result<Option<Price>, StepError> {
        Ok(self.last_price(symbol).await?.and_then(|price| self.collared(price, side)))
    }

    /// The protection price of a stop order: it becomes a market order at a price at or beyond its stop, so it is
    /// protected (and a buy reserved) at the stop, or at the last price if that is already beyond it, moved by
    /// the collar.
    async fn stop_protection(&self, stop: Price, symbol: &Symbol, side: Side) -> Result<Option<Price>, StepError> {
        let basis = match (side, self.last_price(symbol).await?) {
            (Side::Buy, Some(last)) => stop.value().max(last),
            (Side::Sell, Some(last)) => stop.value().min(last),
            (_, None) => stop.value(),
        };
        Ok(self.collared(basis, side))
    }

    /// The symbol's last price (`latest_prices`), if one was seen.
    async fn last_price(&self, symbol: &Symbol) -> Result<Option<Decimal>, StepError> {
        Ok(sqlx::query_scalar("select price from latest_prices where symbol = $1")
            .bind(symbol.as_str())
            .fetch_optional(self.pool())
            .await?)
    }

    /// `price` moved against the side by the collar (a buy's ceiling, a sell's floor).
    fn collared(&self, price: Decimal, side: Side) -> Option<Price> {
        let collar = Decimal::new(self.config.market_collar_bps.into(), 4);
        let (moved, rounding) = match side {
            Side::Buy => (price * (Decimal::ONE + collar), RoundingStrategy::AwayFromZero),
            Side::Sell => (price * (Decimal::ONE - collar), RoundingStrategy::ToZero),
        };
        // To the cent; below a cent (a sub-penny instrument), to the finest price scale instead of zero.
        let cents = moved.round_dp_with_strategy(2, rounding);
        let rounded = if cents.is_zero() { moved.round_dp_with_strategy(PRICE_SCALE_MAX, rounding) } else { cents };
        Price::new(rounded).ok()
    }

    /// The price basis recorded in a `FundsReserved` or `ReservationAdjusted` event.
    async fn reserved_price(&self, event_id: uuid::Uuid) -> Result<Option<Price>, StepError> {
        let event = event_by_id(self.pool(), event_id).await?;
        Ok(event.and_then(|e| match e.decode() {
            Ok(crate::domain::PortfolioEvent::FundsReserved { price, .. }) => Some(price),
            Ok(crate::domain::PortfolioEvent::ReservationAdjusted { price, .. }) => price,
            _ => None,
        }))
    }

    /// quantity × price × (1 + fee allowance), rounded up to 8 decimals; `None` if no portfolio could hold it.
    fn reservation_amount(&self, quantity: Decimal, price: Price) -> Option<Money> {
        let allowance = Decimal::ONE + Decimal::new(self.config.fee_allowance_bps.into(), 4);
        let amount = quantity.checked_mul(price.value())?.checked_mul(allowance)?;
        Money::new(amount.round_dp_with_strategy(8, RoundingStrategy::AwayFromZero)).ok()
    }

    async fn record_failure(&self, event: &RecordedEvent, code: &str, message: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "insert into process_failures (process, event_id, global_position, error_code, error)
             values ($1, $2, $3, $4, $5) on conflict (process, event_id) do nothing",
        )
        .bind(PROCESS_MANAGER)
        .bind(event.event_id)
        .bind(event.position.global_position)
        .bind(code)
        .bind(message)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn save_cursor_retrying(
        &self,
        position: crate::log::LogPosition,
        cancel: &CancellationToken,
    ) -> Result<(), sqlx::Error> {
        let mut backoff = Backoff::new(CURSOR_RETRY_FIRST_DELAY, self.retry_max());
        loop {
            match save_cursor(self.pool(), PROCESS_MANAGER, position).await {
                Ok(()) => {
                    crate::log::notify_progress(self.pool(), PROCESS_MANAGER).await;
                    return Ok(());
                }
                Err(error) if !cancel.is_cancelled() => {
                    tracing::warn!(%error, "saving the process manager cursor failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(error) => return Err(error),
            }
        }
    }
}

/// The booking of a fill on its portfolio: `ApplyExecution` with the fill's terms.
fn booking(order_id: &str, fill: OrderEvent) -> Result<(PortfolioId, PortfolioCommand), StepError> {
    let OrderEvent::ExecutionRecorded {
        portfolio_id, symbol, side, exec_id, quantity, price, fee, executed_at, ..
    } = fill
    else {
        return Err(StepError::Permanent { code: "NOT_A_FILL".into(), message: format!("{fill:?}") });
    };
    let command = PortfolioCommand::ApplyExecution {
        order_id: parse_order_id(order_id)?,
        exec_id,
        symbol,
        side,
        quantity,
        price,
        fee,
        executed_at,
    };
    Ok((portfolio_id, command))
}

fn parse_order_id(order_id: &str) -> Result<OrderId, StepError> {
    order_id.parse().map_err(|_| StepError::Permanent {
        code: "BAD_ORDER_ID".into(),
        message: format!("order id {order_id} is not a UUID"),
    })
}

fn reject_code(error: &PortfolioError) -> RejectCode {
    match error {
        PortfolioError::InsufficientFunds { .. } => RejectCode::InsufficientFunds,
        PortfolioError::InDeficit { .. } => RejectCode::PortfolioInDeficit,
        PortfolioError::InsufficientQuantity { .. } => RejectCode::InsufficientQuantity,
        PortfolioError::NotFound => RejectCode::UnknownPortfolio,
        _ => RejectCode::PortfolioRejected,
    }
}
