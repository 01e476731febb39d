//! [`CommandService`]: idempotency, per-aggregate serialisation, bounded retries on conflict.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateError, DomainEvent, EventStore};
use postgres_es::PostgresEventRepository;
use rand::Rng;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::context::CommandContext;
use super::locks::{AggregateLocks, DatabaseLock};
use super::store::{self, CommandRecord, CommitError, NewEvent, PendingCommit};
use super::{CommandError, CommandOutcome, AGGREGATE_ID_LEN_MAX};
use crate::clock::{Clock, SystemClock};
use crate::domain::{Order, OrderCommand, OrderServices, Portfolio, PortfolioCommand};

/// Tuning of the command service. Every field is bounded; see the defaults for sensible values.
#[derive(Debug, Clone)]
pub struct CommandConfig {
    /// Attempts per command when the aggregate changes underneath it (optimistic-lock conflicts).
    pub retry_attempts_max: u32,
    pub retry_backoff_initial_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// After this many conflicts a command queues on a database advisory lock for its aggregate (fair across
    /// processes) instead of racing again; 0 disables the escalation.
    pub retry_lock_after: u32,
    /// Write a portfolio snapshot every this many events (0 disables snapshots).
    pub portfolio_snapshot_every: usize,
    /// Queue commands per aggregate inside this process (see `locks`). Off only to test the retry path.
    pub serialize_in_process: bool,
}

impl Default for CommandConfig {
    fn default() -> Self {
        Self {
            retry_attempts_max: 50,
            retry_backoff_initial_ms: 2,
            retry_backoff_max_ms: 100,
            retry_lock_after: 3,
            portfolio_snapshot_every: 50,
            serialize_in_process: true,
        }
    }
}

/// Counters of what the service did (exported to Prometheus by the API).
#[derive(Debug, Default)]
pub struct CommandMetrics {
    pub committed: AtomicU64,
    pub rejected: AtomicU64,
    pub conflicts: AtomicU64,
    pub duplicates: AtomicU64,
    pub failed: AtomicU64,
    /// Time to execute a command, from the idempotency lookup to the commit.
    pub latency: crate::metrics::Histogram,
    /// Batches run by `execute_batch` (their commands count in the counters above).
    pub batches: AtomicU64,
    /// Time to execute a batch.
    pub batch_latency: crate::metrics::Histogram,
    rejections: std::sync::Mutex<BTreeMap<&'static str, u64>>,
}

impl CommandMetrics {
    /// Refusals so far, by error code.
    pub fn rejections_by_code(&self) -> Vec<(&'static str, u64)> {
        let rejections = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
        rejections.iter().map(|(code, n)| (*code, *n)).collect()
    }

    pub(super) fn count_rejection(&self, code: &'static str) {
        let mut rejections = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
        *rejections.entry(code).or_default() += 1;
    }
}

/// An aggregate the service can execute commands on.
pub trait LedgerAggregate:
    Aggregate<Command: Clone + Send + Sync, Error: Into<CommandError>> + Clone + 'static
{
    /// Whether this aggregate type is snapshotted.
    const SNAPSHOTTED: bool;
    fn store(service: &CommandService) -> &PersistedEventStore<PostgresEventRepository, Self>;
    fn services(service: &CommandService) -> &Self::Services;
    fn command_name(command: &Self::Command) -> &'static str;
}

impl LedgerAggregate for Order {
    const SNAPSHOTTED: bool = false;
    fn store(service: &CommandService) -> &PersistedEventStore<PostgresEventRepository, Self> {
        &service.orders
    }
    fn services(service: &CommandService) -> &OrderServices {
        &service.order_services
    }
    fn command_name(command: &OrderCommand) -> &'static str {
        command.name()
    }
}

impl LedgerAggregate for Portfolio {
    const SNAPSHOTTED: bool = true;
    fn store(service: &CommandService) -> &PersistedEventStore<PostgresEventRepository, Self> {
        &service.portfolios
    }
    fn services(_service: &CommandService) -> &() {
        &()
    }
    fn command_name(command: &PortfolioCommand) -> &'static str {
        command.name()
    }
}

pub struct CommandService {
    pub(super) pool: PgPool,
    orders: PersistedEventStore<PostgresEventRepository, Order>,
    portfolios: PersistedEventStore<PostgresEventRepository, Portfolio>,
    order_services: OrderServices,
    pub(super) locks: AggregateLocks,
    pub(super) config: CommandConfig,
    clock: Arc<dyn Clock>,
    pub(super) metrics: Arc<CommandMetrics>,
    /// Connections this service may hold for database aggregate locks at once.
    lock_slots: Arc<tokio::sync::Semaphore>,
    /// States batches left aggregates in (see `batch`).
    pub(super) batch_cache: super::batch::BatchCache,
}

/// Aggregate locks (each on a connection of its own) one service holds or waits for at once.
pub const DATABASE_LOCKS_MAX: usize = 8;

impl CommandService {
    pub fn new(pool: PgPool, config: CommandConfig) -> Self {
        let snapshot_every = config.portfolio_snapshot_every.max(1);
        Self {
            orders: PersistedEventStore::new_event_store(PostgresEventRepository::new(pool.clone())),
            portfolios: PersistedEventStore::new_snapshot_store(
                PostgresEventRepository::new(pool.clone()),
                snapshot_every,
            ),
            pool,
            order_services: OrderServices::default(),
            locks: AggregateLocks::default(),
            config,
            clock: Arc::new(SystemClock),
            metrics: Arc::default(),
            lock_slots: Arc::new(tokio::sync::Semaphore::new(DATABASE_LOCKS_MAX)),
            batch_cache: Default::default(),
        }
    }

    pub fn with_order_services(mut self, services: OrderServices) -> Self {
        self.order_services = services;
        self
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn metrics(&self) -> &Arc<CommandMetrics> {
        &self.metrics
    }

    /// Executes `command` on the aggregate `aggregate_id` (see the module docs for the steps).
    #[tracing::instrument(skip_all, fields(aggregate = A::TYPE, id = aggregate_id, command = A::command_name(&command), actor = %ctx.actor))]
    pub async fn execute<A: LedgerAggregate>(
        &self,
        ctx: &CommandContext,
        aggregate_id: &str,
        command: A::Command,
    ) -> Result<CommandOutcome, CommandError> {
        if aggregate_id.is_empty() || aggregate_id.len() > AGGREGATE_ID_LEN_MAX {
            return Err(CommandError::Invalid(format!("aggregate id must be 1 to {AGGREGATE_ID_LEN_MAX} bytes")));
        }
        let started = std::time::Instant::now();
        if let Some(outcome) = self.replay_idempotent(ctx).await? {
            self.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(outcome);
        }
        let _guard = match self.config.serialize_in_process {
            true => Some(self.locks.lock(format!("{}/{aggregate_id}", A::TYPE)).await),
            false => None,
        };
        let result = self.execute_with_retries::<A>(ctx, aggregate_id, command).await;
        let counter = match &result {
            Ok(outcome) if outcome.duplicate => &self.metrics.duplicates,
            Ok(_) => &self.metrics.committed,
            Err(e) if e.is_business() => &self.metrics.rejected,
            Err(_) => &self.metrics.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = &result {
            if error.is_business() {
                self.metrics.count_rejection(error.code());
            }
        }
        self.metrics.latency.observe(started.elapsed().as_secs_f64());
        result
    }

    pub async fn execute_order(
        &self,
        ctx: &CommandContext,
        order_id: &str,
        command: OrderCommand,
    ) -> Result<CommandOutcome, CommandError> {
        self.execute::<Order>(ctx, order_id, command).await
    }

    pub async fn execute_portfolio(
        &self,
        ctx: &CommandContext,
        portfolio_id: &str,
        command: PortfolioCommand,
    ) -> Result<CommandOutcome, CommandError> {
        self.execute::<Portfolio>(ctx, portfolio_id, command).await
    }

    /// The current state of an aggregate and its sequence (0 and the default state if it has no events).
    pub async fn load<A: LedgerAggregate>(&self, aggregate_id: &str) -> Result<(A, usize), CommandError> {
        let context = A::store(self).load_aggregate(aggregate_id).await.map_err(load_error)?;
        Ok((context.aggregate, context.current_sequence))
    }

    async fn replay_idempotent(&self, ctx: &CommandContext) -> Result<Option<CommandOutcome>, CommandError> {
        let Some(idempotency) = &ctx.idempotency else { return Ok(None) };
        match store::lookup(&self.pool, &ctx.actor, &idempotency.key).await.map_err(CommandError::store)? {
            None => Ok(None),
            Some((fingerprint, outcome)) if fingerprint == idempotency.fingerprint => Ok(Some(outcome)),
            Some(_) => Err(CommandError::IdempotencyKeyReused { key: idempotency.key.clone() }),
        }
    }

    async fn execute_with_retries<A: LedgerAggregate>(
        &self,
        ctx: &CommandContext,
        aggregate_id: &str,
        command: A::Command,
    ) -> Result<CommandOutcome, CommandError> {
        let command_type = A::command_name(&command);
        let metadata = self.metadata(ctx, command_type);
        let mut attempt = 0;
        let mut db_lock: Option<(DatabaseLock, tokio::sync::OwnedSemaphorePermit)> = None;
        let result = loop {
            attempt += 1;
            if db_lock.is_none() && self.config.retry_lock_after > 0 && attempt > self.config.retry_lock_after {
                // Bounded: without a free slot the command keeps retrying optimistically.
                if let Ok(slot) = self.lock_slots.clone().try_acquire_owned() {
                    let key = format!("ledger.aggregate:{}/{aggregate_id}", A::TYPE);
                    let lock = DatabaseLock::acquire(&self.pool, &key).await.map_err(CommandError::store)?;
                    db_lock = Some((lock, slot));
                }
            }
            match self.attempt::<A>(ctx, aggregate_id, &command, &metadata, command_type, attempt).await {
                Ok(Some(outcome)) => break Ok(outcome),
                Ok(None) => tokio::time::sleep(self.backoff(attempt)).await,
                Err(error) => break Err(error),
            }
        };
        if let Some((lock, _slot)) = db_lock {
            lock.release().await;
        }
        result
    }

    /// One load–decide–commit round; `Ok(None)` when it lost an optimistic-lock race and should be retried.
    async fn attempt<A: LedgerAggregate>(
        &self,
        ctx: &CommandContext,
        aggregate_id: &str,
        command: &A::Command,
        metadata: &Value,
        command_type: &'static str,
        attempt: u32,
    ) -> Result<Option<CommandOutcome>, CommandError> {
        let mut context = A::store(self).load_aggregate(aggregate_id).await.map_err(load_error)?;
        let sink = EventSink::default();
        if let Err(refusal) = context.aggregate.handle(command.clone(), A::services(self), &sink).await {
            // If this request's key committed after our first lookup (a concurrent retry of it), the state
            // we just loaded includes its effect and may refuse it; its stored answer is ours.
            if let Some(outcome) = self.replay_idempotent(ctx).await? {
                return Ok(Some(outcome));
            }
            return Err(refusal.into());
        }
        let events = sink.collect().await;
        let pending = self.pending_commit::<A>(ctx, aggregate_id, &context, events, metadata, command_type)?;
        match store::commit(&self.pool, pending).await {
            Ok(outcome) => Ok(Some(outcome)),
            Err(CommitError::Conflict) => {
                self.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
                // The writer we collided with may have been this very request (a client retry, or a
                // restarted process racing its predecessor's last commit): then its answer is ours.
                if let Some(outcome) = self.replay_idempotent(ctx).await? {
                    return Ok(Some(outcome));
                }
                if attempt >= self.config.retry_attempts_max {
                    return Err(CommandError::Contention { attempts: attempt });
                }
                Ok(None)
            }
            // The same key committed concurrently by another request: answer as for a repeat.
            Err(CommitError::DuplicateKey) => {
                self.replay_idempotent(ctx).await?.map(Some).ok_or_else(|| {
                    CommandError::Store("idempotency record vanished after a duplicate-key error".into())
                })
            }
            Err(CommitError::Database(e)) => Err(CommandError::store(e)),
        }
    }

    fn pending_commit<A: LedgerAggregate>(
        &self,
        ctx: &CommandContext,
        aggregate_id: &str,
        context: &cqrs_es::persist::EventStoreAggregateContext<A>,
        events: Vec<A::Event>,
        metadata: &Value,
        command_type: &'static str,
    ) -> Result<PendingCommit, CommandError> {
        let loaded = context.current_sequence;
        let every = self.config.portfolio_snapshot_every;
        let snapshot_due = A::SNAPSHOTTED && every > 0 && loaded / every != (loaded + events.len()) / every;
        let snapshot = if snapshot_due {
            let state = serde_json::to_value(&context.aggregate).map_err(CommandError::store)?;
            Some((state, context.current_snapshot.map_or(1, |n| n + 1)))
        } else {
            None
        };
        let events = events
            .into_iter()
            .map(|event| {
                Ok(NewEvent {
                    event_type: event.event_type(),
                    event_version: event.event_version(),
                    payload: serde_json::to_value(&event).map_err(CommandError::store)?,
                })
            })
            .collect::<Result<Vec<_>, CommandError>>()?;
        let record = ctx.idempotency.as_ref().map(|i| CommandRecord {
            actor: ctx.actor.clone(),
            key: i.key.clone(),
            fingerprint: i.fingerprint,
            command_type,
        });
        Ok(PendingCommit {
            aggregate_type: A::TYPE,
            aggregate_id: aggregate_id.to_string(),
            loaded_sequence: loaded,
            events,
            metadata: metadata.clone(),
            snapshot,
            record,
        })
    }

    /// Event metadata. Every value is a string: cqrs-es reads metadata back as `HashMap<String, String>`.
    pub(super) fn metadata(&self, ctx: &CommandContext, command_type: &str) -> Value {
        let mut fields = BTreeMap::new();
        fields.insert("command_id", Uuid::now_v7().to_string());
        fields.insert("command_type", command_type.to_string());
        fields.insert("correlation_id", ctx.correlation_id.to_string());
        fields.insert("actor", ctx.actor.clone());
        fields.insert("issued_at", self.clock.now().to_rfc3339());
        if let Some(causation) = ctx.causation_id {
            fields.insert("causation_id", causation.to_string());
        }
        if let Some(idempotency) = &ctx.idempotency {
            fields.insert("idempotency_key", idempotency.key.clone());
        }
        serde_json::to_value(fields).unwrap_or(Value::Null)
    }

    /// Full-jitter exponential backoff: uniform in `[0, min(max, initial × 2^attempt)]`.
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .config
            .retry_backoff_initial_ms
            .saturating_mul(1 << attempt.min(16))
            .min(self.config.retry_backoff_max_ms)
            .max(1);
        Duration::from_millis(rand::thread_rng().gen_range(0..=ceiling))
    }
}

fn load_error<E: std::error::Error>(error: AggregateError<E>) -> CommandError {
    match error {
        AggregateError::DatabaseConnectionError(e)
        | AggregateError::DeserializationError(e)
        | AggregateError::UnexpectedError(e) => CommandError::Store(e),
        other => CommandError::Store(other.to_string().into()),
    }
}
