//! Batched intake: many commands, one transaction.
//!
//! [`CommandService::execute_batch`] runs up to [`BATCH_COMMANDS_MAX`] commands on aggregates of one type with
//! the same guarantees as [`CommandService::execute`] one by one — idempotency per command, per-aggregate
//! order, a refusal changes nothing — at a fraction of the cost per command:
//! 1. One `command_log` lookup for every idempotency key of the batch; repeats answer from it.
//! 2. The in-process locks of every aggregate touched, taken in sorted order (no deadlock with other batches
//!    or single commands).
//! 3. One read (a repeatable-read snapshot) of every aggregate: its snapshot row and the events after it.
//! 4. Each command in order against the state in memory; a refused command (or one its `authorize` check
//!    refuses) gets its error and leaves no trace, the others see each other's effects.
//! 5. One transaction: all events (one multi-row insert), due snapshots, `command_log` rows.
//!
//! If another writer got in between (an events or `command_log` key conflict), nothing of the batch was
//! written and each command not yet answered runs through [`CommandService::execute`] (retries, database
//! lock), so a batch never fails as a whole because of a concurrent writer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;

use cqrs_es::event_sink::EventSink;
use cqrs_es::DomainEvent as _;
use serde_json::Value;
use uuid::Uuid;

use super::context::{CommandContext, Idempotency};
use super::service::{CommandService, LedgerAggregate};
use super::store::CommitError;
use super::{CommandError, CommandOutcome, CommittedEvent, AGGREGATE_ID_LEN_MAX};
use crate::log::LogPosition;

/// Most commands in one batch.
pub const BATCH_COMMANDS_MAX: usize = 1_000;

/// Aggregate states kept between batches, at most (per service).
pub const BATCH_CACHE_AGGREGATES_MAX: usize = 10_000;

/// An aggregate's state after a committed batch, valid while its head sequence is still `sequence`.
pub(super) struct CachedAggregate {
    sequence: i64,
    snapshot_number: i64,
    state: Box<dyn std::any::Any + Send + Sync>,
}

/// `(aggregate type, id)` → the state a batch left it in.
pub(super) type BatchCache = std::sync::Mutex<HashMap<(&'static str, String), CachedAggregate>>;

/// One command of a batch.
pub struct BatchItem<C> {
    pub aggregate_id: String,
    pub command: C,
    pub idempotency: Option<Idempotency>,
}

/// A command accepted in memory, waiting for the batch's commit.
struct Staged {
    item: usize,
    aggregate: usize,
    command_type: &'static str,
    metadata: Value,
    first_sequence: i64,
    events: Vec<(String, String, Value)>,
}

/// An aggregate as the batch sees it.
struct Loaded<A> {
    id: String,
    state: A,
    /// Sequence in the database when loaded.
    loaded_sequence: i64,
    /// Sequence after the commands staged so far.
    sequence: i64,
    /// Snapshot number in the database (0: none).
    snapshot_number: i64,
}

type ItemResult = Result<CommandOutcome, CommandError>;

impl CommandService {
    /// Runs `items` as described in the module docs; one result per item, in order. `authorize` sees each
    /// aggregate's state (as of the commands before it in the batch) and may refuse the command.
    /// Errors as a whole only for an invalid batch (too large) or when the database is unreachable.
    pub async fn execute_batch<A: LedgerAggregate>(
        &self,
        ctx: &CommandContext,
        items: Vec<BatchItem<A::Command>>,
        authorize: impl Fn(&A) -> Result<(), CommandError>,
    ) -> Result<Vec<ItemResult>, CommandError> {
        if items.len() > BATCH_COMMANDS_MAX {
            return Err(CommandError::Invalid(format!("a batch holds at most {BATCH_COMMANDS_MAX} commands")));
        }
        let started = std::time::Instant::now();
        let mut results: Vec<Option<ItemResult>> = (0..items.len()).map(|_| None).collect();
        self.answer_repeats(ctx, &items, &mut results).await?;
        let looked_up = started.elapsed();

        // Aggregates to load, in sorted order (the lock order).
        let ids: Vec<String> = items
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .map(|(item, _)| item.aggregate_id.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut guards = Vec::with_capacity(ids.len());
        if self.config.serialize_in_process {
            for id in &ids {
                guards.push(self.locks.lock(format!("{}/{id}", A::TYPE)).await);
            }
        }
        let locked = started.elapsed();
        let mut aggregates = self.load_many::<A>(&ids).await?;
        let loaded_at = started.elapsed();
        let index: HashMap<String, usize> = ids.iter().cloned().enumerate().map(|(i, id)| (id, i)).collect();

        let mut staged = Vec::new();
        // Items decided here (accepted in memory or refused); a conflict at commit sends them all back.
        let decided: Vec<usize> = (0..items.len()).filter(|&n| results[n].is_none()).collect();
        for &n in &decided {
            let item = &items[n];
            let aggregate = index[&item.aggregate_id];
            let loaded = &mut aggregates[aggregate];
            if let Err(refusal) = authorize(&loaded.state) {
                results[n] = Some(Err(refusal));
                continue;
            }
            let mut state = loaded.state.clone();
            let sink = EventSink::default();
            if let Err(refusal) = state.handle(item.command.clone(), A::services(self), &sink).await {
                results[n] = Some(Err(refusal.into()));
                continue;
            }
            let events = sink.collect().await;
            let mut encoded = Vec::with_capacity(events.len());
            for event in events {
                let payload = serde_json::to_value(&event).map_err(CommandError::store)?;
                encoded.push((event.event_type(), event.event_version(), payload));
            }
            let command_type = A::command_name(&item.command);
            let item_ctx = match &item.idempotency {
                Some(idempotency) => ctx.clone().with_idempotency(idempotency.clone()),
                None => ctx.clone(),
            };
            staged.push(Staged {
                item: n,
                aggregate,
                command_type,
                metadata: self.metadata(&item_ctx, command_type),
                first_sequence: loaded.sequence + 1,
                events: encoded,
            });
            loaded.sequence += staged.last().map_or(0, |s| s.events.len() as i64);
            loaded.state = state;
        }

        let handled = started.elapsed();
        let mut fell_back = false;
        match self.commit_batch::<A>(ctx, &items, &aggregates, &staged).await {
            Ok((outcomes, snapshotted)) => {
                for (n, outcome) in outcomes {
                    results[n] = Some(Ok(outcome));
                }
                self.remember(aggregates, &snapshotted);
            }
            Err(CommitError::Conflict | CommitError::DuplicateKey) => {
                // Someone else wrote first and nothing of ours was written: every decision above may rest on a
                // stale state. One by one, through the full retry path.
                drop(guards);
                fell_back = true;
                self.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
                for &n in &decided {
                    let item = &items[n];
                    let item_ctx = match &item.idempotency {
                        Some(idempotency) => ctx.clone().with_idempotency(idempotency.clone()),
                        None => ctx.clone(),
                    };
                    // Each answered on its own: a failure here must not hide the commands already run.
                    results[n] =
                        Some(match self.load::<A>(&item.aggregate_id).await.map(|(state, _)| authorize(&state)) {
                            Ok(Ok(())) => self.execute::<A>(&item_ctx, &item.aggregate_id, item.command.clone()).await,
                            Ok(Err(refusal)) | Err(refusal) => Err(refusal),
                        });
                }
            }
            Err(CommitError::Database(error)) => return Err(CommandError::store(error)),
        }

        let results: Vec<ItemResult> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(CommandError::Store("batch item left unanswered".into()))))
            .collect();
        tracing::debug!(
            commands = items.len(),
            aggregates = ids.len(),
            looked_up_ms = looked_up.as_secs_f64() * 1e3,
            locked_ms = locked.as_secs_f64() * 1e3,
            loaded_ms = loaded_at.as_secs_f64() * 1e3,
            handled_ms = handled.as_secs_f64() * 1e3,
            committed_ms = started.elapsed().as_secs_f64() * 1e3,
            fell_back,
            "batch executed"
        );
        // Commands that went through `execute` were counted there.
        let counted: &[usize] = if fell_back { &decided } else { &[] };
        self.count_batch(&results, counted, started.elapsed().as_secs_f64());
        Ok(results)
    }

    /// Invalid ids, keys repeated inside the batch, and keys already in `command_log` (stored answer, or
    /// `IDEMPOTENCY_KEY_REUSED` for a different request).
    async fn answer_repeats<C>(
        &self,
        ctx: &CommandContext,
        items: &[BatchItem<C>],
        results: &mut [Option<ItemResult>],
    ) -> Result<(), CommandError> {
        let mut seen = HashSet::new();
        let mut keys = Vec::new();
        for (n, item) in items.iter().enumerate() {
            if item.aggregate_id.is_empty() || item.aggregate_id.len() > AGGREGATE_ID_LEN_MAX {
                results[n] =
                    Some(Err(CommandError::Invalid(format!("aggregate id must be 1 to {AGGREGATE_ID_LEN_MAX} bytes"))));
            } else if let Some(idempotency) = &item.idempotency {
                if seen.insert(idempotency.key.as_str()) {
                    keys.push(idempotency.key.clone());
                } else {
                    results[n] = Some(Err(CommandError::Invalid(format!(
                        "idempotency key {:?} appears twice in the batch",
                        idempotency.key
                    ))));
                }
            }
        }
        if keys.is_empty() {
            return Ok(());
        }
        let stored: Vec<(String, Vec<u8>, Value)> = sqlx::query_as(
            "select idempotency_key, request_hash, result from command_log
              where actor = $1 and idempotency_key = any($2)",
        )
        .bind(&ctx.actor)
        .bind(&keys)
        .fetch_all(&self.pool)
        .await
        .map_err(CommandError::store)?;
        let stored: HashMap<String, (Vec<u8>, Value)> =
            stored.into_iter().map(|(key, hash, result)| (key, (hash, result))).collect();
        for (n, item) in items.iter().enumerate() {
            let (Some(idempotency), None) = (&item.idempotency, &results[n]) else { continue };
            let Some((hash, result)) = stored.get(&idempotency.key) else { continue };
            results[n] = Some(if hash[..] == idempotency.fingerprint[..] {
                self.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                serde_json::from_value::<CommandOutcome>(result.clone())
                    .map(|mut outcome| {
                        outcome.duplicate = true;
                        outcome
                    })
                    .map_err(CommandError::store)
            } else {
                Err(CommandError::IdempotencyKeyReused { key: idempotency.key.clone() })
            });
        }
        Ok(())
    }

    /// Every aggregate of `ids` (sorted, distinct) from one consistent read: each one's head sequence; the
    /// state kept from an earlier batch when it is still at that sequence (events never change, so it is
    /// exact), else its snapshot and the events after it.
    async fn load_many<A: LedgerAggregate>(&self, ids: &[String]) -> Result<Vec<Loaded<A>>, CommandError> {
        let mut tx = self.pool.begin().await.map_err(CommandError::store)?;
        sqlx::query("set transaction isolation level repeatable read, read only")
            .execute(&mut *tx)
            .await
            .map_err(CommandError::store)?;
        let heads: Vec<(String, i64)> = sqlx::query_as(
            // One backward index probe per aggregate (a `group by` would read all their events).
            "select a.id, h.sequence
               from unnest($2::text[]) as a(id)
               cross join lateral (select sequence from events e
                                    where e.aggregate_type = $1 and e.aggregate_id = a.id
                                    order by sequence desc limit 1) h",
        )
        .bind(A::TYPE)
        .bind(ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(CommandError::store)?;
        let heads: HashMap<String, i64> = heads.into_iter().collect();

        let mut by_id: BTreeMap<&str, Loaded<A>> = BTreeMap::new();
        let mut missing: Vec<&str> = Vec::new();
        {
            let cache = self.batch_cache.lock().unwrap_or_else(|p| p.into_inner());
            for id in ids {
                let head = heads.get(id).copied().unwrap_or(0);
                let cached = cache.get(&(A::TYPE, id.clone())).filter(|entry| entry.sequence == head);
                match cached.and_then(|entry| entry.state.downcast_ref::<A>().map(|state| (entry, state))) {
                    Some((entry, state)) => {
                        by_id.insert(
                            id.as_str(),
                            Loaded {
                                id: id.clone(),
                                state: state.clone(),
                                loaded_sequence: head,
                                sequence: head,
                                snapshot_number: entry.snapshot_number,
                            },
                        );
                    }
                    None if head == 0 => {
                        by_id.insert(
                            id.as_str(),
                            Loaded {
                                id: id.clone(),
                                state: A::default(),
                                loaded_sequence: 0,
                                sequence: 0,
                                snapshot_number: 0,
                            },
                        );
                    }
                    None => missing.push(id.as_str()),
                }
            }
        }
        if missing.is_empty() {
            tx.commit().await.map_err(CommandError::store)?;
            return Ok(by_id.into_values().collect());
        }

        let snapshots: Vec<(String, i64, i64, Value)> = if A::SNAPSHOTTED {
            sqlx::query_as(
                "select aggregate_id, last_sequence, current_snapshot, payload from snapshots
                  where aggregate_type = $1 and aggregate_id = any($2)",
            )
            .bind(A::TYPE)
            .bind(&missing)
            .fetch_all(&mut *tx)
            .await
            .map_err(CommandError::store)?
        } else {
            Vec::new()
        };
        let events: Vec<(String, i64, Value)> = sqlx::query_as(
            "select e.aggregate_id, e.sequence, e.payload
               from events e
               left join snapshots s
                 on $3 and s.aggregate_type = e.aggregate_type and s.aggregate_id = e.aggregate_id
              where e.aggregate_type = $1 and e.aggregate_id = any($2)
                and e.sequence > coalesce(s.last_sequence, 0)
              order by e.aggregate_id, e.sequence",
        )
        .bind(A::TYPE)
        .bind(&missing)
        .bind(A::SNAPSHOTTED)
        .fetch_all(&mut *tx)
        .await
        .map_err(CommandError::store)?;
        tx.commit().await.map_err(CommandError::store)?;

        for id in missing {
            by_id.insert(
                id,
                Loaded { id: id.to_string(), state: A::default(), loaded_sequence: 0, sequence: 0, snapshot_number: 0 },
            );
        }
        for (id, last_sequence, number, payload) in snapshots {
            if let Some(loaded) = by_id.get_mut(id.as_str()) {
                loaded.state = serde_json::from_value(payload).map_err(CommandError::store)?;
                loaded.loaded_sequence = last_sequence;
                loaded.snapshot_number = number;
            }
        }
        for (id, sequence, payload) in events {
            if let Some(loaded) = by_id.get_mut(id.as_str()) {
                let event: A::Event = serde_json::from_value(payload).map_err(CommandError::store)?;
                loaded.state.apply(event);
                loaded.loaded_sequence = sequence;
            }
        }
        Ok(by_id
            .into_values()
            .map(|mut loaded| {
                loaded.sequence = loaded.loaded_sequence;
                loaded
            })
            .collect())
    }

    /// Keeps the states a committed batch ended with (bounded: the cache is emptied when full).
    fn remember<A: LedgerAggregate>(&self, aggregates: Vec<Loaded<A>>, snapshotted: &HashSet<String>) {
        let mut cache = self.batch_cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() + aggregates.len() > BATCH_CACHE_AGGREGATES_MAX {
            cache.clear();
        }
        for loaded in aggregates {
            let snapshot_number = loaded.snapshot_number + i64::from(snapshotted.contains(&loaded.id));
            let entry = CachedAggregate { sequence: loaded.sequence, snapshot_number, state: Box::new(loaded.state) };
            cache.insert((A::TYPE, loaded.id), entry);
        }
    }

    /// The batch's one transaction (in a task of its own: a cancelled caller must not cut it short); the
    /// outcome of each staged item.
    async fn commit_batch<A: LedgerAggregate>(
        &self,
        ctx: &CommandContext,
        items: &[BatchItem<A::Command>],
        aggregates: &[Loaded<A>],
        staged: &[Staged],
    ) -> Result<(Vec<(usize, CommandOutcome)>, HashSet<String>), CommitError> {
        if staged.is_empty() {
            return Ok((Vec::new(), HashSet::new()));
        }
        let mut write = BatchWrite { aggregate_type: A::TYPE, actor: ctx.actor.clone(), ..BatchWrite::default() };
        for s in staged {
            for (offset, (event_type, version, payload)) in s.events.iter().enumerate() {
                write.aggregate_ids.push(aggregates[s.aggregate].id.clone());
                write.sequences.push(s.first_sequence + offset as i64);
                write.event_types.push(event_type.clone());
                write.versions.push(version.clone());
                write.payloads.push(payload.clone());
                write.metadata.push(s.metadata.clone());
                write.event_ids.push(Uuid::now_v7());
            }
        }
        // Snapshots due: an aggregate crossing a multiple of the interval gets its state after the batch.
        let every = self.config.portfolio_snapshot_every as i64;
        let mut snapshotted = HashSet::new();
        if A::SNAPSHOTTED && every > 0 {
            for loaded in aggregates {
                if loaded.sequence != loaded.loaded_sequence
                    && loaded.loaded_sequence / every != loaded.sequence / every
                {
                    let state = serde_json::to_value(&loaded.state)
                        .map_err(|e| CommitError::Database(sqlx::Error::Encode(e.into())))?;
                    write.snapshots.push((loaded.id.clone(), loaded.sequence, loaded.snapshot_number + 1, state));
                    snapshotted.insert(loaded.id.clone());
                }
            }
        }
        let mut planned = Vec::with_capacity(staged.len());
        let mut event_n = 0;
        for s in staged {
            let mut events = Vec::with_capacity(s.events.len());
            for (offset, (event_type, _, _)) in s.events.iter().enumerate() {
                events.push((s.first_sequence + offset as i64, write.event_ids[event_n], event_type.clone()));
                event_n += 1;
            }
            planned.push(Planned {
                item: s.item,
                aggregate_id: aggregates[s.aggregate].id.clone(),
                command_type: s.command_type,
                key: items[s.item].idempotency.as_ref().map(|i| (i.key.clone(), i.fingerprint.to_vec())),
                events,
            });
        }
        let pool = self.pool.clone();
        let outcomes = crate::db::detached(async move {
            let mut tx = pool.begin().await?;
            let positions = write.insert_events(&mut tx).await?;
            write.upsert_snapshots(&mut tx).await?;
            let mut outcomes = Vec::with_capacity(planned.len());
            let mut log = CommandLogRows::default();
            for plan in planned {
                let mut events = Vec::with_capacity(plan.events.len());
                for (sequence, event_id, event_type) in plan.events {
                    let position = positions.get(&(plan.aggregate_id.clone(), sequence)).copied().ok_or_else(|| {
                        CommitError::Database(sqlx::Error::Protocol("an inserted event was not returned".into()))
                    })?;
                    events.push(CommittedEvent { sequence, event_id, event_type, position });
                }
                let outcome = CommandOutcome {
                    aggregate_type: write.aggregate_type.to_string(),
                    aggregate_id: plan.aggregate_id,
                    events,
                    duplicate: false,
                };
                if let Some((key, hash)) = plan.key {
                    log.keys.push(key);
                    log.hashes.push(hash);
                    log.ids.push(outcome.aggregate_id.clone());
                    log.command_types.push(plan.command_type);
                    log.results.push(
                        serde_json::to_value(&outcome)
                            .map_err(|e| CommitError::Database(sqlx::Error::Encode(e.into())))?,
                    );
                }
                outcomes.push((plan.item, outcome));
            }
            log.insert(&mut tx, &write.actor, write.aggregate_type).await?;
            tx.commit().await?;
            Ok::<_, CommitError>(outcomes)
        })
        .await
        .map_err(CommitError::Database)??;
        Ok((outcomes, snapshotted))
    }

    fn count_batch(&self, results: &[ItemResult], counted: &[usize], seconds: f64) {
        let metrics = &self.metrics;
        for (n, result) in results.iter().enumerate() {
            if counted.binary_search(&n).is_ok() {
                continue;
            }
            match result {
                Ok(outcome) if outcome.duplicate => {} // counted when answered
                Ok(_) => {
                    metrics.committed.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) if error.is_business() => {
                    metrics.rejected.fetch_add(1, Ordering::Relaxed);
                    metrics.count_rejection(error.code());
                }
                Err(_) => {
                    metrics.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        metrics.batches.fetch_add(1, Ordering::Relaxed);
        metrics.batch_latency.observe(seconds);
    }
}

/// Everything a batch inserts into `events` and `snapshots`, owned (the transaction runs in its own task).
#[derive(Default)]
struct BatchWrite {
    aggregate_type: &'static str,
    actor: String,
    aggregate_ids: Vec<String>,
    sequences: Vec<i64>,
    event_types: Vec<String>,
    versions: Vec<String>,
    payloads: Vec<Value>,
    metadata: Vec<Value>,
    event_ids: Vec<Uuid>,
    /// `(aggregate id, last sequence, snapshot number, state)`.
    snapshots: Vec<(String, i64, i64, Value)>,
}

impl BatchWrite {
    /// One multi-row insert; the log position of each `(aggregate id, sequence)`.
    async fn insert_events(
        &self,
        tx: &mut sqlx::PgConnection,
    ) -> Result<HashMap<(String, i64), LogPosition>, CommitError> {
        let rows: Vec<(i64, String, String, i64)> = sqlx::query_as(
            "insert into events
                    (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, event_id)
             select $1, u.aggregate_id, u.sequence, u.event_type, u.event_version, u.payload, u.metadata, u.event_id
               from unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[], $8::uuid[])
                    as u(aggregate_id, sequence, event_type, event_version, payload, metadata, event_id)
             returning global_position, transaction_id::text, aggregate_id, sequence",
        )
        .bind(self.aggregate_type)
        .bind(&self.aggregate_ids)
        .bind(&self.sequences)
        .bind(&self.event_types)
        .bind(&self.versions)
        .bind(&self.payloads)
        .bind(&self.metadata)
        .bind(&self.event_ids)
        .fetch_all(&mut *tx)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(global_position, transaction_id, id, sequence)| {
                ((id, sequence), LogPosition { transaction_id: transaction_id.parse().unwrap_or(0), global_position })
            })
            .collect())
    }

    async fn upsert_snapshots(&self, tx: &mut sqlx::PgConnection) -> Result<(), CommitError> {
        if self.snapshots.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = self.snapshots.iter().map(|s| s.0.as_str()).collect();
        let lasts: Vec<i64> = self.snapshots.iter().map(|s| s.1).collect();
        let numbers: Vec<i64> = self.snapshots.iter().map(|s| s.2).collect();
        let states: Vec<&Value> = self.snapshots.iter().map(|s| &s.3).collect();
        sqlx::query(
            "insert into snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
             select $1, u.id, u.last, u.number, u.state
               from unnest($2::text[], $3::bigint[], $4::bigint[], $5::jsonb[]) as u(id, last, number, state)
             on conflict (aggregate_type, aggregate_id) do update
                set last_sequence = excluded.last_sequence,
                    current_snapshot = excluded.current_snapshot,
                    payload = excluded.payload
              where snapshots.last_sequence < excluded.last_sequence",
        )
        .bind(self.aggregate_type)
        .bind(&ids)
        .bind(&lasts)
        .bind(&numbers)
        .bind(&states)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// What a staged command's outcome will be, once the log positions are known.
struct Planned {
    item: usize,
    aggregate_id: String,
    command_type: &'static str,
    /// `(idempotency key, request fingerprint)`.
    key: Option<(String, Vec<u8>)>,
    /// `(sequence, event id, event type)`.
    events: Vec<(i64, Uuid, String)>,
}

/// The `command_log` rows of a batch's keyed commands.
#[derive(Default)]
struct CommandLogRows {
    keys: Vec<String>,
    hashes: Vec<Vec<u8>>,
    ids: Vec<String>,
    command_types: Vec<&'static str>,
    results: Vec<Value>,
}

impl CommandLogRows {
    async fn insert(&self, tx: &mut sqlx::PgConnection, actor: &str, aggregate_type: &str) -> Result<(), CommitError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "insert into command_log
                    (actor, idempotency_key, request_hash, aggregate_type, aggregate_id, command_type, result)
             select $1, u.key, u.hash, $2, u.id, u.command_type, u.result
               from unnest($3::text[], $4::bytea[], $5::text[], $6::text[], $7::jsonb[])
                    as u(key, hash, id, command_type, result)",
        )
        .bind(actor)
        .bind(aggregate_type)
        .bind(&self.keys)
        .bind(&self.hashes)
        .bind(&self.ids)
        .bind(&self.command_types)
        .bind(&self.results)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}
