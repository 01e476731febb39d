//! [`CommandService`]: decide on the cached (or freshly loaded) aggregate, hand the events to the group
//! committer, retry on conflict; idempotency folded into the commit.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
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

use super::cache::{AggregateCache, AggregateKey, Cacheable};
use super::context::CommandContext;
use super::locks::{AggregateLocks, DatabaseLock};
use super::metrics::CommandMetrics;
use super::writer::{
    head_and_key, lookup, stored_outcome, CommandRecord, CommitError, CommitRequest, NewEvent, Writer,
};
use super::{CommandError, CommandOutcome, AGGREGATE_ID_LEN_MAX};
use crate::clock::{Clock, SystemClock};
use crate::domain::upcast::LedgerUpcaster;
use crate::domain::values::{OrderId, PortfolioId};
use crate::domain::{Order, OrderCommand, OrderServices, Portfolio, PortfolioCommand, PortfolioError};

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
    /// After this many conflicts (holding the advisory lock, so at least `retry_lock_after`) a command is
    /// decided and written in one transaction that holds back every other writer of `events` (see
    /// [`CommandService::attempt_exclusive`]): the last resort that guarantees progress; 0 disables it.
    pub retry_exclusive_after: u32,
    /// Write a portfolio snapshot every this many events, or less often for a large one (see
    /// [`snapshot_interval`]); 0 disables snapshots.
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
            retry_exclusive_after: 8,
            portfolio_snapshot_every: 50,
            serialize_in_process: true,
        }
    }
}

/// An aggregate the service can execute commands on.
pub trait LedgerAggregate:
    Aggregate<Command: Clone + Send + Sync, Error: Into<CommandError>> + Cacheable + Clone + Send + Sync + 'static
{
    /// Whether this aggregate type is snapshotted.
    const SNAPSHOTTED: bool;
    fn store(service: &CommandService) -> &PersistedEventStore<PostgresEventRepository, Self>;
    fn services(service: &CommandService) -> &Self::Services;
    fn command_name(command: &Self::Command) -> &'static str;
    /// Whether a refusal of `handle` left the state it ran on as it was (a batch decides the next command of the
    /// aggregate on it). True unless the aggregate refuses after applying its decision.
    fn refusal_keeps_state(_error: &Self::Error) -> bool {
        true
    }
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
    /// The invariants are checked on the state with the decision applied (see `Portfolio::handle`).
    fn refusal_keeps_state(error: &PortfolioError) -> bool {
        !matches!(error, PortfolioError::InvariantViolated(_))
    }
}

pub struct CommandService {
    pub(super) pool: PgPool,
    /// postgres-es's event stores, for reads that must come from the log itself ([`CommandService::load`]).
    orders: PersistedEventStore<PostgresEventRepository, Order>,
    portfolios: PersistedEventStore<PostgresEventRepository, Portfolio>,
    order_services: OrderServices,
    pub(super) locks: AggregateLocks,
    pub(super) config: CommandConfig,
    clock: Arc<dyn Clock>,
    pub(super) metrics: Arc<CommandMetrics>,
    /// Connections this service may hold for database aggregate locks at once.
    lock_slots: Arc<tokio::sync::Semaphore>,
    pub(super) cache: Arc<AggregateCache>,
    pub(super) writer: Writer,
}

/// Aggregate locks (each on a connection of its own) one service holds or waits for at once.
pub const DATABASE_LOCKS_MAX: usize = 8;
/// How often a command decided on an uncommitted state looks whether the commands before it committed.
const COMMIT_WAIT_POLL_MS: u64 = 1;
/// How long a command that wrote nothing waits for the commands decided before it on the same aggregate to
/// reach the log, before it decides again from scratch.
const PENDING_WAIT_MS_MAX: u64 = 5_000;

/// State bytes a snapshot may cost per event it covers: a large state is snapshotted less often (see
/// [`snapshot_interval`]).
pub const SNAPSHOT_BYTES_PER_EVENT: usize = 4_096;

/// Events between two snapshots of a state of about `bytes`: `every`, or for a large state `every` doubled until it
/// reaches `bytes / SNAPSHOT_BYTES_PER_EVENT`. Writing a snapshot costs about its size (a portfolio with thousands
/// of open lots is a megabyte of JSON), so this bounds what snapshots cost per event, at the price of a longer
/// replay after the snapshot when such an aggregate is loaded (rare: it stays in the cache). A snapshot is due
/// when a command's events cross a multiple of the interval; as the interval only doubles, the multiples of a
/// longer one are multiples of the shorter ones, so a growing state is still snapshotted at least once per
/// interval (with any other length, the next multiple could move away as fast as the state grows). 0 when
/// `every` is 0 (no snapshots).
pub fn snapshot_interval(every: usize, bytes: usize) -> i64 {
    if every == 0 {
        return 0;
    }
    let wanted = bytes / SNAPSHOT_BYTES_PER_EVENT;
    let mut interval = every;
    while interval < wanted {
        interval = interval.saturating_mul(2);
    }
    i64::try_from(interval).unwrap_or(i64::MAX)
}

/// What a decision was made on.
pub(super) struct Decision {
    pub generation: u64,
    pub sequence: i64,
    pub snapshot_number: i64,
    pub command_type: &'static str,
}

/// What one attempt at a command came to.
enum Attempted {
    Done(Result<CommandOutcome, CommandError>),
    /// Decide again on a fresh state (a conflict, or the cache moved on).
    Again {
        conflict: bool,
    },
}

impl CommandService {
    pub fn new(pool: PgPool, config: CommandConfig) -> Self {
        let snapshot_every = config.portfolio_snapshot_every.max(1);
        let metrics: Arc<CommandMetrics> = Arc::default();
        let cache: Arc<AggregateCache> = Arc::default();
        Self {
            orders: PersistedEventStore::new_event_store(PostgresEventRepository::new(pool.clone()))
                .with_upcasters(vec![Box::new(LedgerUpcaster)]),
            portfolios: PersistedEventStore::new_snapshot_store(
                PostgresEventRepository::new(pool.clone()),
                snapshot_every,
            )
            .with_upcasters(vec![Box::new(LedgerUpcaster)]),
            writer: Writer::new(&pool, cache.clone(), metrics.clone()),
            pool,
            order_services: OrderServices::default(),
            locks: AggregateLocks::default(),
            config,
            clock: Arc::new(SystemClock),
            metrics,
            lock_slots: Arc::new(tokio::sync::Semaphore::new(DATABASE_LOCKS_MAX)),
            cache,
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

    /// Commands decided and waiting for the group committer (not counting the group being written).
    pub fn writer_queued(&self) -> usize {
        self.writer.queued()
    }

    /// Executes `command` on the aggregate `aggregate_id` (see the module docs for the steps).
    /// In the trace of its context (`trace_id`, `parent_span_id` fields: the OTLP exporter's ids), so that the
    /// process manager's reactions join the trace of the request they follow from.
    #[tracing::instrument(skip_all, fields(aggregate = A::TYPE, id = aggregate_id, command = A::command_name(&command), actor = %ctx.actor,
        trace_id = %ctx.traceparent.map(|t| t.trace_id_hex()).unwrap_or_default(),
        parent_span_id = %ctx.traceparent.map(|t| t.span_id_hex()).unwrap_or_default()))]
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
        let result = self.execute_with_retries::<A>(ctx, aggregate_id, command).await;
        self.metrics.count(&result);
        self.metrics.latency.observe(started.elapsed().as_secs_f64());
        result
    }

    /// Runs `command` on the order `order_id`.
    pub async fn execute_order(
        &self,
        ctx: &CommandContext,
        order_id: OrderId,
        command: OrderCommand,
    ) -> Result<CommandOutcome, CommandError> {
        self.execute::<Order>(ctx, &order_id.to_string(), command).await
    }

    /// Runs `command` on the portfolio `portfolio_id`.
    pub async fn execute_portfolio(
        &self,
        ctx: &CommandContext,
        portfolio_id: PortfolioId,
        command: PortfolioCommand,
    ) -> Result<CommandOutcome, CommandError> {
        self.execute::<Portfolio>(ctx, &portfolio_id.to_string(), command).await
    }

    /// The current state of an aggregate and its sequence (0 and the default state if it has no events), read
    /// from the log (postgres-es's event store): what other processes wrote included.
    pub async fn load<A: LedgerAggregate>(&self, aggregate_id: &str) -> Result<(A, usize), CommandError> {
        let context = A::store(self).load_aggregate(aggregate_id).await.map_err(load_error)?;
        Ok((context.aggregate, context.current_sequence))
    }

    /// The aggregate as this service last saw it (its cache), or from the log if it has not (or saw it without
    /// events: another process may have created it since). Possibly behind another process's later writes: for
    /// facts that never change once written (a portfolio's owner), not for decisions.
    pub async fn load_cached<A: LedgerAggregate>(&self, aggregate_id: &str) -> Result<A, CommandError> {
        let key = (A::TYPE, aggregate_id.to_string());
        match self.cache.get::<A>(&key) {
            Some((state, sequence, ..)) if sequence > 0 => Ok(state),
            _ => {
                let mut loaded =
                    super::loader::load::<A>(&self.pool, std::slice::from_ref(&key.1), A::SNAPSHOTTED).await?;
                let loaded = loaded.remove(&key.1).ok_or_else(|| CommandError::Store("the loader lost it".into()))?;
                if loaded.sequence > 0 && !self.cache.contains(&key) {
                    self.cache.insert_loaded(key, loaded.state.clone(), loaded.sequence, loaded.snapshot_number);
                }
                Ok(loaded.state)
            }
        }
    }

    /// The cached state of `key`, or a fresh load (then cached): state, sequence, snapshot number, generation.
    pub(super) async fn cached_or_loaded<A: LedgerAggregate>(
        &self,
        key: &AggregateKey,
    ) -> Result<(A, i64, i64, u64), CommandError> {
        if let Some(cached) = self.cache.get::<A>(key) {
            self.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(cached);
        }
        self.metrics.cache_misses.fetch_add(1, Ordering::Relaxed);
        let mut loaded = super::loader::load::<A>(&self.pool, std::slice::from_ref(&key.1), A::SNAPSHOTTED).await?;
        let super::loader::Loaded { state, sequence, snapshot_number } =
            loaded.remove(&key.1).ok_or_else(|| CommandError::Store("the loader lost an aggregate".into()))?;
        let generation = self.cache.insert_loaded(key.clone(), state.clone(), sequence, snapshot_number);
        Ok((state, sequence, snapshot_number, generation))
    }

    async fn execute_with_retries<A: LedgerAggregate>(
        &self,
        ctx: &CommandContext,
        aggregate_id: &str,
        command: A::Command,
    ) -> Result<CommandOutcome, CommandError> {
        let key: AggregateKey = (A::TYPE, aggregate_id.to_string());
        let command_type = A::command_name(&command);
        let metadata = self.metadata(ctx, command_type);
        let mut conflicts = 0;
        let mut rounds = 0;
        let mut db_lock: Option<(DatabaseLock, tokio::sync::OwnedSemaphorePermit)> = None;
        let result = loop {
            rounds += 1;
            if db_lock.is_none() && self.config.retry_lock_after > 0 && conflicts >= self.config.retry_lock_after {
                // Bounded: without a free slot the command keeps retrying optimistically.
                if let Ok(slot) = self.lock_slots.clone().try_acquire_owned() {
                    let lock_key = format!("ledger.aggregate:{}/{aggregate_id}", A::TYPE);
                    let lock = DatabaseLock::acquire(&self.pool, &lock_key).await.map_err(CommandError::store)?;
                    db_lock = Some((lock, slot));
                }
            }
            let exclusive = self.config.retry_exclusive_after > 0 && conflicts >= self.config.retry_exclusive_after;
            let attempted = match &mut db_lock {
                Some((lock, _)) if exclusive => {
                    self.attempt_exclusive::<A>(ctx, &key, &command, &metadata, command_type, lock.connection()).await
                }
                _ => self.attempt::<A>(ctx, &key, &command, &metadata, command_type).await,
            };
            match attempted {
                Attempted::Done(result) => break result,
                Attempted::Again { conflict } => {
                    conflicts += u32::from(conflict);
                    if conflict {
                        self.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
                    }
                    if conflicts >= self.config.retry_attempts_max || rounds > 4 * self.config.retry_attempts_max {
                        break Err(CommandError::Contention { attempts: rounds });
                    }
                    if conflict {
                        tokio::time::sleep(self.backoff(conflicts)).await;
                    }
                }
            }
        };
        if let Some((lock, _slot)) = db_lock {
            lock.release().await;
        }
        result
    }

    /// This process's turn on the aggregate (see `locks`), when commands are serialised in process.
    async fn in_process_turn(&self, key: &AggregateKey) -> Option<super::locks::AggregateGuard<'_>> {
        match self.config.serialize_in_process {
            true => Some(self.locks.lock(format!("{}/{}", key.0, key.1)).await),
            false => None,
        }
    }

    /// The command decided on `state`: the events it raised and the state after them, or its refusal.
    async fn decide<A: LedgerAggregate>(
        &self,
        state: A,
        command: &A::Command,
    ) -> Result<(Vec<A::Event>, A), CommandError> {
        // `handle` applies what it decides to the state it runs on (cqrs-es's `EventSink::write`): that is the
        // next state. A refusal drops it with whatever it holds.
        let mut next = state;
        let sink = EventSink::default();
        let decided = next.handle(command.clone(), A::services(self), &sink).await;
        let events = sink.collect().await;
        decided.map_err(Into::<CommandError>::into)?;
        Ok((events, next))
    }

    /// One decision on the aggregate's current state (cached, or loaded), handed to the writer; see the module
    /// docs.
    async fn attempt<A: LedgerAggregate>(
        &self,
        ctx: &CommandContext,
        key: &AggregateKey,
        command: &A::Command,
        metadata: &Value,
        command_type: &'static str,
    ) -> Attempted {
        let guard = self.in_process_turn(key).await;
        let (state, sequence, snapshot_number, generation) = match self.cached_or_loaded::<A>(key).await {
            Ok(loaded) => loaded,
            Err(error) => return Attempted::Done(Err(error)),
        };
        let (events, next) = match self.decide(state, command).await {
            Ok((events, next)) if !events.is_empty() => (events, next),
            decided => {
                drop(guard);
                let refusal = decided.err();
                return self.confirm_unwritten(ctx, key, generation, sequence, refusal, metadata, command_type).await;
            }
        };
        let decision = Decision { generation, sequence, snapshot_number, command_type };
        let request = match self.request::<A>(ctx, key, decision, &next, events, metadata) {
            Ok(request) => request,
            Err(error) => return Attempted::Done(Err(error)),
        };
        let (request, reply) = request;
        let (new_events, snapshotted) = (request.events.len() as i64, request.snapshot.is_some());
        // Queued while the aggregate is still locked, so the writer sees its commands in the order decided; then
        // (with no await in between: a cancelled caller cannot stop halfway) the cache takes the new state. A
        // request queued on a state the cache dropped meanwhile fails on its own (conflict, or refused as the
        // successor of a failed command) or is right.
        if !self.writer.submit(request).await {
            self.cache.invalidate(key, generation);
            return Attempted::Done(Err(CommandError::Store("the writer stopped".into())));
        }
        self.cache.advance(key, generation, next, new_events, i64::from(snapshotted));
        drop(guard);
        self.answer(ctx, key, generation, reply.await).await
    }

    /// The last resort of a command that lost [`CommandConfig::retry_exclusive_after`] races in a row: another
    /// process keeps writing its aggregate between its load and its commit (a warm cache decides faster than a
    /// load), and the advisory lock only queues those that also lost. On the lock's own session, one transaction
    /// takes `events` in `share row exclusive` mode — every other writer of the log waits (readers do not) — then
    /// loads, decides and writes with the writer's statement, and commits. Nobody can write the aggregate in
    /// between, so the attempt cannot conflict; the price is a stall of all writers for one load and one commit,
    /// only for a command already starved this long.
    #[allow(clippy::too_many_arguments)]
    async fn attempt_exclusive<A: LedgerAggregate>(
        &self,
        ctx: &CommandContext,
        key: &AggregateKey,
        command: &A::Command,
        metadata: &Value,
        command_type: &'static str,
        connection: &mut sqlx::PgConnection,
    ) -> Attempted {
        use sqlx::Connection;
        let _guard = self.in_process_turn(key).await;
        self.metrics.exclusive_attempts.fetch_add(1, Ordering::Relaxed);
        let result: Result<Result<(CommandOutcome, A, i64), CommandError>, CommandError> = async {
            let mut tx = connection.begin().await.map_err(CommandError::store)?;
            sqlx::query("lock table events in share row exclusive mode")
                .execute(&mut *tx)
                .await
                .map_err(CommandError::store)?;
            let mut loaded = super::loader::load::<A>(&mut *tx, std::slice::from_ref(&key.1), A::SNAPSHOTTED).await?;
            let super::loader::Loaded { state, sequence, snapshot_number } =
                loaded.remove(&key.1).ok_or_else(|| CommandError::Store("the loader lost an aggregate".into()))?;
            let (events, next) = match self.decide(state, command).await {
                Ok(decided) => decided,
                Err(refusal) => return Ok(Err(refusal)),
            };
            if events.is_empty() && ctx.idempotency.is_none() {
                let outcome = CommandOutcome {
                    aggregate_type: key.0.to_string(),
                    aggregate_id: key.1.clone(),
                    events: Vec::new(),
                    duplicate: false,
                };
                return Ok(Ok((outcome, next, snapshot_number)));
            }
            let decision = Decision { generation: 0, sequence, snapshot_number, command_type };
            let (request, _) = self.request::<A>(ctx, key, decision, &next, events, metadata)?;
            let snapshot_number = snapshot_number + i64::from(request.snapshot.is_some());
            let mut outcomes =
                super::writer::write(&mut *tx, std::slice::from_ref(&request)).await.map_err(|error| {
                    match super::writer::key_conflict(&error) {
                        Some(CommitError::DuplicateKey) => CommandError::Store("duplicate idempotency key".into()),
                        _ => CommandError::store(error),
                    }
                })?;
            tx.commit().await.map_err(CommandError::store)?;
            let outcome = outcomes.pop().ok_or_else(|| CommandError::Store("a write returned no outcome".into()))?;
            Ok(Ok((outcome, next, snapshot_number)))
        }
        .await;
        match result {
            Ok(Ok((outcome, state, snapshot_number))) => {
                let sequence = outcome.events.last().map_or(0, |e| e.sequence);
                if sequence > 0 {
                    self.cache.insert_loaded(key.clone(), state, sequence, snapshot_number);
                }
                Attempted::Done(Ok(outcome))
            }
            // A refusal, or the key taken by another request: if this request's key committed meanwhile (a
            // retry of it elsewhere), its stored answer is ours.
            Ok(Err(error)) | Err(error) => match self.replay_idempotent(ctx).await {
                Ok(Some(outcome)) => Attempted::Done(Ok(outcome)),
                Ok(None) => Attempted::Done(Err(error)),
                Err(replay_error) => Attempted::Done(Err(replay_error)),
            },
        }
    }

    /// The request for the writer of a decision that wrote `events`; `next` is the state after them (the
    /// snapshot, when one is due).
    pub(super) fn request<A: LedgerAggregate>(
        &self,
        ctx: &CommandContext,
        key: &AggregateKey,
        decision: Decision,
        next: &A,
        events: Vec<A::Event>,
        metadata: &Value,
    ) -> Result<(CommitRequest, tokio::sync::oneshot::Receiver<Result<CommandOutcome, CommitError>>), CommandError>
    {
        let Decision { generation, sequence, snapshot_number, command_type } = decision;
        let every = snapshot_interval(self.config.portfolio_snapshot_every, next.approximate_bytes());
        let after = sequence + events.len() as i64;
        let snapshot = if A::SNAPSHOTTED && every > 0 && sequence / every != after / every {
            Some((serde_json::to_value(next).map_err(CommandError::store)?, snapshot_number + 1))
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
        let (reply, receiver) = tokio::sync::oneshot::channel();
        let request = CommitRequest {
            key: key.clone(),
            generation,
            loaded_sequence: sequence,
            events,
            metadata: metadata.clone(),
            snapshot,
            record: self.record(ctx, command_type),
            reply,
        };
        Ok((request, receiver))
    }

    fn record(&self, ctx: &CommandContext, command_type: &'static str) -> Option<CommandRecord> {
        ctx.idempotency.as_ref().map(|i| CommandRecord {
            actor: ctx.actor.clone(),
            key: i.key.clone(),
            fingerprint: i.fingerprint,
            command_type,
        })
    }

    /// Turns the writer's answer into the command's.
    async fn answer(
        &self,
        ctx: &CommandContext,
        key: &AggregateKey,
        generation: u64,
        reply: Result<Result<CommandOutcome, CommitError>, tokio::sync::oneshot::error::RecvError>,
    ) -> Attempted {
        match reply {
            Ok(Ok(outcome)) => Attempted::Done(Ok(outcome)),
            Ok(Err(CommitError::Conflict)) => {
                self.cache.invalidate(key, generation);
                // The writer we collided with may have been this very request (a client retry, or a restarted
                // process racing its predecessor's last commit): then its answer is ours.
                match self.replay_idempotent(ctx).await {
                    Ok(Some(outcome)) => Attempted::Done(Ok(outcome)),
                    Ok(None) => Attempted::Again { conflict: true },
                    Err(error) => Attempted::Done(Err(error)),
                }
            }
            // The same key committed by another request first: answer as for a repeat.
            Ok(Err(CommitError::DuplicateKey)) => {
                self.cache.invalidate(key, generation);
                Attempted::Done(self.replay_idempotent(ctx).await.and_then(|outcome| {
                    outcome.ok_or_else(|| {
                        CommandError::Store("idempotency record vanished after a duplicate-key error".into())
                    })
                }))
            }
            Ok(Err(CommitError::Database(error))) => {
                self.cache.invalidate(key, generation);
                Attempted::Done(Err(CommandError::store(error)))
            }
            Err(_) => {
                self.cache.invalidate(key, generation);
                Attempted::Done(Err(CommandError::Store("the writer stopped before answering".into())))
            }
        }
    }

    /// A decision that writes no event — a refusal, or a no-op — is answered only once the log confirms the state
    /// it was made on: the commands decided before it on this aggregate have reached the log, nobody else wrote
    /// the aggregate since, and its idempotency key (if any) has no stored answer. A keyed no-op is then recorded
    /// like any command (its answer has no events).
    #[allow(clippy::too_many_arguments)]
    async fn confirm_unwritten(
        &self,
        ctx: &CommandContext,
        key: &AggregateKey,
        generation: u64,
        sequence: i64,
        refusal: Option<CommandError>,
        metadata: &Value,
        command_type: &'static str,
    ) -> Attempted {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(PENDING_WAIT_MS_MAX);
        loop {
            match self.cache.committed_sequence(key, generation) {
                Some(committed) if committed >= sequence => break,
                // Reloaded or invalidated meanwhile: the commands before it failed or the log moved.
                None => return Attempted::Again { conflict: false },
                Some(_) if tokio::time::Instant::now() > deadline => return Attempted::Again { conflict: false },
                Some(_) => tokio::time::sleep(Duration::from_millis(COMMIT_WAIT_POLL_MS)).await,
            }
        }
        let idempotency = ctx.idempotency.as_ref().map(|i| (ctx.actor.as_str(), i.key.as_str()));
        let (head, stored) = match head_and_key(&self.pool, key, idempotency).await {
            Ok(found) => found,
            Err(error) => return Attempted::Done(Err(CommandError::store(error))),
        };
        if let (Some((hash, result)), Some(idempotency)) = (stored, &ctx.idempotency) {
            // If this request's key committed meanwhile (a concurrent retry of it), the state includes its
            // effect and may refuse it; its stored answer is ours.
            return Attempted::Done(if hash[..] == idempotency.fingerprint[..] {
                stored_outcome(result).map_err(CommandError::store)
            } else {
                Err(CommandError::IdempotencyKeyReused { key: idempotency.key.clone() })
            });
        }
        if head != sequence {
            self.cache.invalidate(key, generation);
            return Attempted::Again { conflict: false };
        }
        if let Some(refusal) = refusal {
            return Attempted::Done(Err(refusal));
        }
        if ctx.idempotency.is_none() {
            return Attempted::Done(Ok(CommandOutcome {
                aggregate_type: key.0.to_string(),
                aggregate_id: key.1.clone(),
                events: Vec::new(),
                duplicate: false,
            }));
        }
        let (reply, receiver) = tokio::sync::oneshot::channel();
        let request = CommitRequest {
            key: key.clone(),
            generation: 0, // writes no event: depends on no other command
            loaded_sequence: sequence,
            events: Vec::new(),
            metadata: metadata.clone(),
            snapshot: None,
            record: self.record(ctx, command_type),
            reply,
        };
        if !self.writer.submit(request).await {
            return Attempted::Done(Err(CommandError::Store("the writer stopped".into())));
        }
        self.answer(ctx, key, 0, receiver.await).await
    }

    async fn replay_idempotent(&self, ctx: &CommandContext) -> Result<Option<CommandOutcome>, CommandError> {
        let Some(idempotency) = &ctx.idempotency else { return Ok(None) };
        match lookup(&self.pool, &ctx.actor, &idempotency.key).await.map_err(CommandError::store)? {
            None => Ok(None),
            Some((fingerprint, outcome)) if fingerprint == idempotency.fingerprint => Ok(Some(outcome)),
            Some(_) => Err(CommandError::IdempotencyKeyReused { key: idempotency.key.clone() }),
        }
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
        if let Some(traceparent) = ctx.traceparent {
            fields.insert(crate::trace::TRACEPARENT, traceparent.to_string());
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

#[cfg(test)]
mod tests {
    use super::{snapshot_interval, SNAPSHOT_BYTES_PER_EVENT};

    #[test]
    fn a_large_state_is_snapshotted_less_often_in_proportion_to_its_size() {
        assert_eq!(snapshot_interval(50, 10_000), 50);
        assert_eq!(snapshot_interval(50, 400 * SNAPSHOT_BYTES_PER_EVENT), 400);
        assert_eq!(snapshot_interval(50, 401 * SNAPSHOT_BYTES_PER_EVENT), 800);
        assert_eq!(snapshot_interval(0, 400 * SNAPSHOT_BYTES_PER_EVENT), 0, "0 still disables snapshots");
    }

    /// A state that grows with every event is still snapshotted once per interval: the rule `request` applies
    /// (`sequence / every != after / every`) with the interval of the state after each command.
    #[test]
    fn a_growing_state_keeps_being_snapshotted() {
        for bytes_per_event in [64, 100, 160, 320, 4_096] {
            let mut last_snapshot = 0;
            for sequence in 0..400_000_i64 {
                let after = sequence + 1;
                let every = snapshot_interval(50, 2_048 + bytes_per_event * after as usize);
                if sequence / every != after / every {
                    last_snapshot = after;
                }
                assert!(
                    after - last_snapshot <= every,
                    "{bytes_per_event} B/event: none since {last_snapshot} at {after}"
                );
            }
        }
    }
}
