//! The one writer of `events`, `snapshots` and `command_log`: group commit.
//!
//! Every command that writes — from GraphQL mutations, the process manager, the paper executor, batches — is
//! handed to this process's committer task as a [`CommitRequest`]. The committer takes the first request that
//! arrives and everything queued behind it (at most [`GROUP_COMMANDS_MAX`] commands and [`GROUP_EVENTS_MAX`]
//! events) and writes them with **one statement**: the events (one multi-row insert, `unnest` of arrays), the
//! `command_log` rows (their stored answers built from the events' log positions inside the statement) and the
//! due snapshots, committed at once — one round trip and one flush for the whole group. Nothing waits on
//! purpose: an idle committer writes the first command at once, and the ones arriving during that write form
//! the next group (natural batching, as PostgreSQL's own group commit does).
//!
//! Each command keeps its guarantees on its own. The statement is all or nothing; if it fails on a key
//! (another process wrote one of the aggregates: `events_pkey`; the same idempotency key committed elsewhere:
//! `command_log_pkey`), the group is written again one command at a time, in order, so that only the command at
//! fault is refused — and with it the commands decided on top of it (same aggregate, same cache generation),
//! which are answered `Conflict` and decided again by their callers.
//!
//! Up to [`GROUPS_IN_FLIGHT_MAX`] groups are written at once, on connections of their own, so that one group's
//! flush overlaps the next one's statement. Groups in flight never share an aggregate: a command whose aggregate
//! a group in flight is writing waits (with every later command of that aggregate, in order) until that group's
//! outcome is known — it may have been decided on that group's state, and must not reach the log if that group
//! failed. So the commands of one aggregate reach the log in the order they were decided.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::cache::{AggregateCache, AggregateKey};
use super::metrics::CommandMetrics;
use super::{CommandOutcome, CommittedEvent};
use crate::log::LogPosition;

/// Most commands written by one statement.
pub const GROUP_COMMANDS_MAX: usize = 1_000;
/// Most events written by one statement.
pub const GROUP_EVENTS_MAX: usize = 4_000;
/// Commands waiting for the committer at most; beyond it, callers wait to hand theirs over (back-pressure).
pub const WRITER_QUEUE_MAX: usize = 10_000;
/// Groups written at once (on different connections), their aggregates disjoint: one group's flush overlaps
/// the next group's statement.
pub const GROUPS_IN_FLIGHT_MAX: usize = 2;
/// Connections of the committer's own pool: one per group in flight, and a spare while a broken one is
/// replaced.
pub const COMMITTER_CONNECTIONS: u32 = GROUPS_IN_FLIGHT_MAX as u32 + 1;
/// A committer connection unused this long is closed (a quiet process keeps none open).
const COMMITTER_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Largest group written with the generic plan (see [`committer_pool`]); larger ones are planned for their size.
pub const GENERIC_PLAN_GROUP_MAX: usize = 64;
/// Failed generations remembered (their successors, decided before the failure was known, are refused), oldest
/// forgotten first.
const FAILED_GENERATIONS_MAX: usize = 100_000;

/// An event ready to be inserted.
pub struct NewEvent {
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
}

/// The `command_log` row written with the events.
pub struct CommandRecord {
    pub actor: String,
    pub key: String,
    pub fingerprint: [u8; 32],
    pub command_type: &'static str,
}

/// One command for the writer.
pub struct CommitRequest {
    pub key: AggregateKey,
    /// The cache generation the command was decided on.
    pub generation: u64,
    /// The first new event gets `loaded_sequence + 1`.
    pub loaded_sequence: i64,
    pub events: Vec<NewEvent>,
    pub metadata: Value,
    /// `(state after the events, snapshot number)` when a snapshot is due.
    pub snapshot: Option<(Value, i64)>,
    pub record: Option<CommandRecord>,
    pub reply: oneshot::Sender<Result<CommandOutcome, CommitError>>,
}

#[derive(Debug)]
pub enum CommitError {
    /// Another writer appended to the aggregate since it was loaded, or the command was decided on a state
    /// that another command's failure took away: decide again on a fresh load.
    Conflict,
    /// Another request committed the same idempotency key first (`command_log` primary key).
    DuplicateKey,
    Database(sqlx::Error),
}

/// The violated unique constraint of a failed write, if that is why it failed.
pub(super) fn key_conflict(error: &sqlx::Error) -> Option<CommitError> {
    let sqlx::Error::Database(db) = error else { return None };
    if db.code().as_deref() != Some("23505") {
        return None;
    }
    match db.constraint() {
        Some("events_pkey") => Some(CommitError::Conflict),
        Some("command_log_pkey") => Some(CommitError::DuplicateKey),
        _ => None,
    }
}

/// Hands requests to the committer task (started on first use, ended when the service is dropped).
pub struct Writer {
    sender: std::sync::OnceLock<mpsc::Sender<CommitRequest>>,
    pool: PgPool,
    cache: Arc<AggregateCache>,
    metrics: Arc<CommandMetrics>,
}

impl Writer {
    pub(super) fn new(pool: &PgPool, cache: Arc<AggregateCache>, metrics: Arc<CommandMetrics>) -> Self {
        Self { sender: std::sync::OnceLock::new(), pool: pool.clone(), cache, metrics }
    }

    /// Requests waiting for the committer (not counting the group it is writing).
    pub(super) fn queued(&self) -> usize {
        self.sender.get().map_or(0, |sender| sender.max_capacity() - sender.capacity())
    }

    /// Queues a request (waiting while the queue is full); false if the committer is gone.
    pub(super) async fn submit(&self, request: CommitRequest) -> bool {
        let sender = self.sender.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(WRITER_QUEUE_MAX);
            let committer = Committer {
                pool: self.pool.clone(),
                planned_once: committer_pool(&self.pool),
                cache: self.cache.clone(),
                metrics: self.metrics.clone(),
                failed: FailedGenerations::default(),
            };
            tokio::spawn(committer.run(receiver));
            sender
        });
        sender.send(request).await.is_ok()
    }
}

/// The committer's own connections to the server of `pool`, with `plan_cache_mode = force_generic_plan`.
///
/// Its statement always has the same shape, but with array parameters PostgreSQL's plan cache kept choosing a
/// custom plan, so every group was planned again — a sixth of the server's CPU at one command per group. A
/// generic plan is made once per connection; `ledger-lab bench commands` went from 4,728 to 5,938 commands/s at 32
/// clients (docs/benchmarks.md). The generic plan assumes small arrays, so only groups of at most
/// [`GENERIC_PLAN_GROUP_MAX`] commands use it. Other statements keep the server's default.
fn committer_pool(pool: &PgPool) -> PgPool {
    let options = pool.connect_options().as_ref().clone().options([("plan_cache_mode", "force_generic_plan")]);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(COMMITTER_CONNECTIONS)
        .min_connections(0)
        .acquire_timeout(std::time::Duration::from_millis(crate::db::POOL_ACQUIRE_TIMEOUT_MS))
        .idle_timeout(std::time::Duration::from_millis(COMMITTER_IDLE_TIMEOUT_MS))
        .connect_lazy_with(options)
}

struct Committer {
    /// For large groups: planned for their sizes (a generic plan joins them badly).
    pool: PgPool,
    /// For groups of at most [`GENERIC_PLAN_GROUP_MAX`] commands: planned once per connection.
    planned_once: PgPool,
    cache: Arc<AggregateCache>,
    metrics: Arc<CommandMetrics>,
    /// Generations one of whose commands failed: their later commands were decided on a state that never was.
    failed: FailedGenerations,
}

/// A bounded set of failed generations (generations only grow, so the oldest go first).
#[derive(Default)]
struct FailedGenerations {
    set: HashSet<u64>,
    order: std::collections::VecDeque<u64>,
}

impl FailedGenerations {
    fn insert(&mut self, generation: u64) {
        if self.set.insert(generation) {
            self.order.push_back(generation);
            if self.order.len() > FAILED_GENERATIONS_MAX {
                if let Some(oldest) = self.order.pop_front() {
                    self.set.remove(&oldest);
                }
            }
        }
    }

    fn contains(&self, generation: &u64) -> bool {
        self.set.contains(generation)
    }
}

/// A group being written: its aggregates, and the task writing it.
type InFlight = std::pin::Pin<Box<dyn std::future::Future<Output = (Vec<AggregateKey>, Written)> + Send>>;
/// What a group's task hands back: the group, the statement's result, when it started (`None`: the task died,
/// and with it the group's reply channels, so its callers hear that the writer stopped).
type Written = Option<(Vec<CommitRequest>, Result<Vec<CommandOutcome>, sqlx::Error>, std::time::Instant)>;

impl Committer {
    /// Forms groups and writes up to [`GROUPS_IN_FLIGHT_MAX`] of them at once; see [`Committer::next_group`]
    /// for what may share a group and what must wait.
    async fn run(mut self, mut receiver: mpsc::Receiver<CommitRequest>) {
        let mut pending: VecDeque<CommitRequest> = VecDeque::new();
        let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
        let mut busy: HashSet<AggregateKey> = HashSet::new();
        let mut open = true;
        loop {
            if !open && in_flight.is_empty() && pending.is_empty() {
                return;
            }
            if in_flight.len() < GROUPS_IN_FLIGHT_MAX {
                let group = next_group(&mut pending, &mut receiver, &busy);
                if !group.is_empty() {
                    if let Some(started) = self.start(group, &mut busy) {
                        in_flight.push(started);
                    }
                    continue;
                }
            }
            tokio::select! {
                Some((keys, written)) = in_flight.next() => {
                    for key in &keys {
                        busy.remove(key);
                    }
                    if let Some((group, result, started)) = written {
                        let size = group.len();
                        self.finish(group, result).await;
                        self.metrics.group_commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.metrics.group_commands.fetch_add(size as u64, std::sync::atomic::Ordering::Relaxed);
                        self.metrics.group_latency.observe(started.elapsed().as_secs_f64());
                    }
                }
                request = receiver.recv(), if open && in_flight.len() < GROUPS_IN_FLIGHT_MAX => match request {
                    Some(request) => pending.push_back(request),
                    None => open = false,
                },
            }
        }
    }

    /// Answers the group's commands decided on a failed predecessor, and starts writing the rest (their
    /// aggregates marked busy until it is done).
    fn start(&mut self, group: Vec<CommitRequest>, busy: &mut HashSet<AggregateKey>) -> Option<InFlight> {
        let (live, doomed): (Vec<_>, Vec<_>) =
            group.into_iter().partition(|r| r.events.is_empty() || !self.failed.contains(&r.generation));
        for request in doomed {
            self.cache.invalidate(&request.key, request.generation);
            let _ = request.reply.send(Err(CommitError::Conflict));
        }
        if live.is_empty() {
            return None;
        }
        let keys: Vec<AggregateKey> = live.iter().map(|r| r.key.clone()).filter(|k| busy.insert(k.clone())).collect();
        let pool = self.pool_for(live.len()).clone();
        let task = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = write(&pool, &live).await;
            (live, result, started)
        });
        Some(Box::pin(async move { (keys, task.await.ok()) }))
    }

    /// Answers a written group's commands.
    async fn finish(&mut self, live: Vec<CommitRequest>, result: Result<Vec<CommandOutcome>, sqlx::Error>) {
        match result {
            Ok(outcomes) => {
                for (request, outcome) in live.into_iter().zip(outcomes) {
                    self.answer(request, Ok(outcome));
                }
            }
            Err(error) if key_conflict(&error).is_some() => {
                // Someone else's key: find whose, one command at a time, in order.
                self.metrics.group_fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                for request in live {
                    if !request.events.is_empty() && self.failed.contains(&request.generation) {
                        self.answer(request, Err(CommitError::Conflict));
                        continue;
                    }
                    let result = match write(&self.planned_once, std::slice::from_ref(&request)).await {
                        Ok(mut outcomes) => outcomes.pop().ok_or_else(|| {
                            CommitError::Database(sqlx::Error::Protocol("a write returned no outcome".into()))
                        }),
                        Err(error) => Err(key_conflict(&error).unwrap_or(CommitError::Database(error))),
                    };
                    self.answer(request, result);
                }
            }
            Err(error) => {
                tracing::warn!(%error, commands = live.len(), "group commit failed");
                let message = error.to_string();
                for request in live {
                    let failure = sqlx::Error::Protocol(format!("group commit failed: {message}"));
                    self.answer(request, Err(CommitError::Database(failure)));
                }
            }
        }
    }

    /// Small groups (the concurrent commands of a busy desk) gain from a plan made once; a large group (a batch
    /// of a thousand deposits) needs a plan made for its size, and its planning costs little beside it.
    fn pool_for(&self, commands: usize) -> &PgPool {
        if commands <= GENERIC_PLAN_GROUP_MAX {
            &self.planned_once
        } else {
            &self.pool
        }
    }

    fn answer(&mut self, request: CommitRequest, result: Result<CommandOutcome, CommitError>) {
        match &result {
            Ok(_) => {
                let last = request.loaded_sequence + request.events.len() as i64;
                self.cache.committed(&request.key, request.generation, last);
            }
            // A request without events (a keyed no-op's answer) is nobody's predecessor.
            Err(_) if request.events.is_empty() => {}
            Err(_) => {
                // Its successors (decided on top of it) must not be written, and nobody may decide on the cached
                // state any more — whether or not its caller is still there to hear of it.
                self.failed.insert(request.generation);
                self.cache.invalidate(&request.key, request.generation);
            }
        }
        let _ = request.reply.send(result);
    }
}

/// The next group to write: the oldest waiting commands, then what is queued, up to [`GROUP_COMMANDS_MAX`]
/// commands and [`GROUP_EVENTS_MAX`] events — except the commands of an aggregate a group in flight is writing
/// (`busy`), and any later command of theirs, which wait in `pending`, in order, for that group's outcome (they
/// may have been decided on its state). Never waits.
fn next_group(
    pending: &mut VecDeque<CommitRequest>,
    receiver: &mut mpsc::Receiver<CommitRequest>,
    busy: &HashSet<AggregateKey>,
) -> Vec<CommitRequest> {
    let mut next = NextGroup { group: Vec::new(), events: 0, held: HashSet::new(), waiting: VecDeque::new(), busy };
    while !next.full() {
        match pending.pop_front() {
            Some(request) => next.take(request),
            None => break,
        }
    }
    while !next.full() && next.waiting.len() + pending.len() < GROUP_COMMANDS_MAX {
        match receiver.try_recv() {
            Ok(request) => next.take(request),
            Err(_) => break,
        }
    }
    // Held commands came before whatever is left of `pending` (the group filled up) and after nothing else.
    next.waiting.append(pending);
    *pending = next.waiting;
    next.group
}

/// A group being formed by [`next_group`].
struct NextGroup<'a> {
    group: Vec<CommitRequest>,
    events: usize,
    /// Aggregates with a command waiting: their later commands wait too (in order).
    held: HashSet<AggregateKey>,
    waiting: VecDeque<CommitRequest>,
    busy: &'a HashSet<AggregateKey>,
}

impl NextGroup<'_> {
    fn full(&self) -> bool {
        self.group.len() >= GROUP_COMMANDS_MAX || self.events >= GROUP_EVENTS_MAX
    }

    fn take(&mut self, request: CommitRequest) {
        if self.busy.contains(&request.key) || self.held.contains(&request.key) {
            self.held.insert(request.key.clone());
            self.waiting.push_back(request);
        } else {
            self.events += request.events.len();
            self.group.push(request);
        }
    }
}

/// Writes `requests` with one statement (see the module docs); their outcomes, in order. Outside the committer
/// only for the exclusive last attempt of a starving command (`CommandService::attempt_exclusive`).
pub(super) async fn write<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    requests: &[CommitRequest],
) -> Result<Vec<CommandOutcome>, sqlx::Error> {
    let mut columns = Columns::default();
    let mut event_ids: Vec<Vec<(i64, Uuid, String)>> = Vec::with_capacity(requests.len());
    let mut snapshots: HashMap<&AggregateKey, (i64, i64, &Value)> = HashMap::new();
    for request in requests {
        let (aggregate_type, aggregate_id) = (&request.key.0, &request.key.1);
        let mut planned = Vec::with_capacity(request.events.len());
        // The 1-based index of this command's `command_log` row in the statement (0: it has none).
        let record = if request.record.is_some() { columns.actors.len() as i32 + 1 } else { 0 };
        for (offset, event) in request.events.iter().enumerate() {
            let sequence = request.loaded_sequence + 1 + offset as i64;
            let event_id = Uuid::now_v7();
            columns.types.push(aggregate_type.to_string());
            columns.ids.push(aggregate_id.clone());
            columns.sequences.push(sequence);
            columns.event_types.push(event.event_type.clone());
            columns.versions.push(event.event_version.clone());
            columns.payloads.push(&event.payload);
            columns.metadata.push(&request.metadata);
            columns.event_ids.push(event_id);
            columns.event_records.push(record);
            planned.push((sequence, event_id, event.event_type.clone()));
        }
        let last = request.loaded_sequence + request.events.len() as i64;
        if let Some(record) = &request.record {
            columns.actors.push(&record.actor);
            columns.keys.push(&record.key);
            columns.hashes.push(&record.fingerprint[..]);
            columns.log_types.push(aggregate_type.to_string());
            columns.log_ids.push(aggregate_id.clone());
            columns.command_types.push(record.command_type);
        }
        if let Some((state, number)) = &request.snapshot {
            // One snapshot per aggregate and statement: the latest.
            snapshots.insert(&request.key, (last, *number, state));
        }
        event_ids.push(planned);
    }
    let (snapshot_types, snapshot_ids): (Vec<&str>, Vec<&str>) =
        snapshots.keys().map(|(t, id)| (*t, id.as_str())).unzip();
    let snapshot_lasts: Vec<i64> = snapshots.values().map(|s| s.0).collect();
    let snapshot_numbers: Vec<i64> = snapshots.values().map(|s| s.1).collect();
    let snapshot_states: Vec<&Value> = snapshots.values().map(|s| s.2).collect();

    let rows: Vec<(String, String, i64, i64, String)> = sqlx::query_as(
        "with e as (
             insert into events
                    (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, event_id)
             select * from unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[],
                                  $7::jsonb[], $8::uuid[])
             returning aggregate_type, aggregate_id, sequence, event_id, event_type, global_position, transaction_id
         ), answered as (
             -- each recorded command's events, found by event id (a hash join: linear in the group's size)
             select r.record, jsonb_agg(jsonb_build_object(
                        'sequence', e.sequence, 'event_id', e.event_id, 'event_type', e.event_type,
                        'position', jsonb_build_object(
                            'transaction_id', e.transaction_id::text::numeric,
                            'global_position', e.global_position))
                    order by e.sequence) as events
               from e join unnest($8::uuid[], $15::int[]) as r(event_id, record) using (event_id)
              where r.record > 0
              group by r.record
         ), c as (
             insert into command_log
                    (actor, idempotency_key, request_hash, aggregate_type, aggregate_id, command_type, result)
             select k.actor, k.key, k.hash, k.aggregate_type, k.aggregate_id, k.command_type,
                    jsonb_build_object(
                        'aggregate_type', k.aggregate_type,
                        'aggregate_id', k.aggregate_id,
                        'events', coalesce(answered.events, '[]'::jsonb))
               from unnest($9::text[], $10::text[], $11::bytea[], $12::text[], $13::text[], $14::text[])
                    with ordinality as k(actor, key, hash, aggregate_type, aggregate_id, command_type, record)
                    left join answered on answered.record = k.record
             returning 1
         ), s as (
             insert into snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
             select * from unnest($16::text[], $17::text[], $18::bigint[], $19::bigint[], $20::jsonb[])
             on conflict (aggregate_type, aggregate_id) do update
                set last_sequence = excluded.last_sequence,
                    current_snapshot = excluded.current_snapshot,
                    payload = excluded.payload
              where snapshots.last_sequence < excluded.last_sequence
             returning 1
         )
         select aggregate_type, aggregate_id, sequence, global_position, transaction_id::text from e",
    )
    .bind(&columns.types)
    .bind(&columns.ids)
    .bind(&columns.sequences)
    .bind(&columns.event_types)
    .bind(&columns.versions)
    .bind(&columns.payloads)
    .bind(&columns.metadata)
    .bind(&columns.event_ids)
    .bind(&columns.actors)
    .bind(&columns.keys)
    .bind(&columns.hashes)
    .bind(&columns.log_types)
    .bind(&columns.log_ids)
    .bind(&columns.command_types)
    .bind(&columns.event_records)
    .bind(&snapshot_types)
    .bind(&snapshot_ids)
    .bind(&snapshot_lasts)
    .bind(&snapshot_numbers)
    .bind(&snapshot_states)
    .fetch_all(executor)
    .await?;
    let mut positions: HashMap<(String, String, i64), LogPosition> = HashMap::with_capacity(rows.len());
    for (aggregate_type, aggregate_id, sequence, global_position, transaction_id) in rows {
        positions.insert(
            (aggregate_type, aggregate_id, sequence),
            LogPosition::from_columns(&transaction_id, global_position)?,
        );
    }
    requests
        .iter()
        .zip(event_ids)
        .map(|(request, planned)| {
            let events = planned
                .into_iter()
                .map(|(sequence, event_id, event_type)| {
                    let key = (request.key.0.to_string(), request.key.1.clone(), sequence);
                    let position = positions.get(&key).copied().ok_or_else(|| {
                        sqlx::Error::Protocol(format!("event {}/{}#{sequence} was not returned", key.0, key.1))
                    })?;
                    Ok(CommittedEvent { sequence, event_id, event_type, position })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            Ok(CommandOutcome {
                aggregate_type: request.key.0.to_string(),
                aggregate_id: request.key.1.clone(),
                events,
                duplicate: false,
            })
        })
        .collect()
}

/// The statement's parameters, column by column.
#[derive(Default)]
struct Columns<'a> {
    types: Vec<String>,
    ids: Vec<String>,
    sequences: Vec<i64>,
    event_types: Vec<String>,
    versions: Vec<String>,
    payloads: Vec<&'a Value>,
    metadata: Vec<&'a Value>,
    event_ids: Vec<Uuid>,
    /// Per event: the 1-based index of its command's `command_log` row (0: none).
    event_records: Vec<i32>,
    actors: Vec<&'a str>,
    keys: Vec<&'a str>,
    hashes: Vec<&'a [u8]>,
    log_types: Vec<String>,
    log_ids: Vec<String>,
    command_types: Vec<&'static str>,
}

/// The stored outcome of `(actor, key)` and the fingerprint of the request that produced it.
pub async fn lookup(pool: &PgPool, actor: &str, key: &str) -> Result<Option<(Vec<u8>, CommandOutcome)>, sqlx::Error> {
    let row: Option<(Vec<u8>, Value)> =
        sqlx::query_as("select request_hash, result from command_log where actor = $1 and idempotency_key = $2")
            .bind(actor)
            .bind(key)
            .fetch_optional(pool)
            .await?;
    row.map(|(hash, result)| Ok((hash, stored_outcome(result)?))).transpose()
}

/// A `command_log` result as the answer to a repeated request.
pub fn stored_outcome(result: Value) -> Result<CommandOutcome, sqlx::Error> {
    let mut outcome: CommandOutcome = serde_json::from_value(result).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    outcome.duplicate = true;
    Ok(outcome)
}

/// What the log says about a command that wrote nothing: the aggregate's head sequence, and the stored answer
/// of its idempotency key if the key was used.
pub async fn head_and_key(
    pool: &PgPool,
    key: &AggregateKey,
    idempotency: Option<(&str, &str)>,
) -> Result<(i64, Option<(Vec<u8>, Value)>), sqlx::Error> {
    let (actor, idempotency_key) = idempotency.unzip();
    let (head, hash, result): (i64, Option<Vec<u8>>, Option<Value>) = sqlx::query_as(
        "select coalesce((select sequence from events where aggregate_type = $1 and aggregate_id = $2
                           order by sequence desc limit 1), 0),
                c.request_hash, c.result
           from (select 1) one
           left join command_log c on c.actor = $3 and c.idempotency_key = $4",
    )
    .bind(key.0)
    .bind(&key.1)
    .bind(actor)
    .bind(idempotency_key)
    .fetch_one(pool)
    .await?;
    Ok((head, hash.zip(result)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(aggregate: &str, events: usize) -> CommitRequest {
        let (reply, _) = oneshot::channel();
        CommitRequest {
            key: ("Portfolio", aggregate.to_string()),
            generation: 1,
            loaded_sequence: 0,
            events: (0..events)
                .map(|_| NewEvent { event_type: "Deposited".into(), event_version: "1".into(), payload: Value::Null })
                .collect(),
            metadata: Value::Null,
            snapshot: None,
            record: None,
            reply,
        }
    }

    fn aggregates(requests: impl IntoIterator<Item = CommitRequest>) -> Vec<String> {
        requests.into_iter().map(|r| r.key.1).collect()
    }

    #[test]
    fn a_group_leaves_out_the_aggregates_in_flight_and_their_later_commands_in_order() {
        let (sender, mut receiver) = mpsc::channel(16);
        let mut pending: VecDeque<CommitRequest> = [request("k", 1), request("l", 1)].into();
        for aggregate in ["k", "m", "l", "k"] {
            sender.try_send(request(aggregate, 1)).unwrap();
        }
        let busy: HashSet<AggregateKey> = [("Portfolio", "k".to_string())].into();

        let group = next_group(&mut pending, &mut receiver, &busy);

        // "l" twice: consecutive commands of one aggregate may share a group.
        assert_eq!(aggregates(group), ["l", "m", "l"]);
        assert_eq!(aggregates(pending.drain(..)), ["k", "k", "k"]);
    }

    #[test]
    fn once_its_aggregate_is_done_a_held_command_goes_first() {
        let (sender, mut receiver) = mpsc::channel(16);
        let mut pending: VecDeque<CommitRequest> = [request("k", 1), request("k", 2)].into();
        sender.try_send(request("k", 1)).unwrap();
        sender.try_send(request("m", 1)).unwrap();

        let group = next_group(&mut pending, &mut receiver, &HashSet::new());

        assert_eq!(aggregates(group), ["k", "k", "k", "m"]);
        assert!(pending.is_empty());
    }

    #[test]
    fn a_full_group_leaves_the_rest_waiting_in_order() {
        let (sender, mut receiver) = mpsc::channel(16);
        let mut pending: VecDeque<CommitRequest> =
            [request("a", GROUP_EVENTS_MAX - 1), request("b", 1), request("c", 1)].into();
        sender.try_send(request("d", 1)).unwrap();

        let group = next_group(&mut pending, &mut receiver, &HashSet::new());

        assert_eq!(aggregates(group), ["a", "b"]);
        assert_eq!(aggregates(pending.drain(..)), ["c"]);
        assert_eq!(receiver.try_recv().map(|r| r.key.1).ok().as_deref(), Some("d"));
    }
}
