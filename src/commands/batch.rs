//! Batched intake: many commands decided together and written by the group committer.
//!
//! [`CommandService::execute_batch`] runs up to [`BATCH_COMMANDS_MAX`] commands on aggregates of one type with
//! the same guarantees as [`CommandService::execute`] one by one — idempotency per command, per-aggregate
//! order, a refusal changes nothing — at a fraction of the cost per command:
//! 1. One `command_log` lookup for every idempotency key of the batch; repeats answer from it.
//! 2. The in-process locks of every aggregate touched, taken in sorted order (no deadlock with other batches
//!    or single commands); the aggregates not in the cache loaded with one statement.
//! 3. Each command in order against the state in memory; a refused command (or one its `authorize` check
//!    refuses) gets its error and leaves no trace, the others see each other's effects. The state is copied
//!    out of the cache once per aggregate and batch (not once per command: a portfolio with thousands of open
//!    lots is large), and the cache takes the result when every command is decided.
//! 4. The commands that write go to the writer together (one group commit for up to
//!    [`super::GROUP_COMMANDS_MAX`] of them).
//! 5. A refusal stands once the log confirms the state it was made on: a later command of the batch on the
//!    same aggregate committed (a stale state would have conflicted), or the aggregate's head is where the
//!    batch found it. A command whose commit conflicted (another writer got in) runs again through
//!    [`CommandService::execute`], as does a refusal the log does not confirm.
//! 6. One aggregate's commands reach the log in the batch's order: once one fails for want of the database (not
//!    a refusal), the later ones of its aggregate are answered with a failure too, not run — a caller that runs
//!    the batch again (every command under its key) applies them in order.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;

use cqrs_es::event_sink::EventSink;
use serde_json::Value;

use super::cache::AggregateKey;
use super::context::{CommandContext, Idempotency};
use super::service::{CommandService, LedgerAggregate};
use super::writer::{stored_outcome, CommitError};
use super::{CommandError, CommandOutcome, AGGREGATE_ID_LEN_MAX};

/// Most commands in one batch.
pub const BATCH_COMMANDS_MAX: usize = 1_000;

/// One command of a batch.
#[derive(Clone)]
pub struct BatchItem<C> {
    pub aggregate_id: String,
    pub command: C,
    pub idempotency: Option<Idempotency>,
    /// What caused this command (correlation, causation, trace), when not the batch's: the process manager
    /// batches steps that follow from different events. Its actor must be the batch's (the idempotency keys
    /// are looked up under the batch's actor); its own idempotency key, if any, is ignored for `idempotency`.
    pub cause: Option<CommandContext>,
}

type ItemResult = Result<CommandOutcome, CommandError>;
type Reply = tokio::sync::oneshot::Receiver<Result<CommandOutcome, CommitError>>;

/// An aggregate's state within a batch: as its commands so far left it, with what they added.
struct Working<A> {
    state: A,
    /// Sequence and snapshot number of `state` (pending commands included).
    sequence: i64,
    snapshot_number: i64,
    generation: u64,
    /// Events and snapshots the batch handed to the writer, not yet in the cache.
    events: i64,
    snapshots: i64,
}

/// How an item of the batch stands after the decisions.
enum Decided {
    Answered(ItemResult),
    /// Refused on the state at `sequence` of `generation`: confirmed (or decided again) after the writes.
    Refused {
        error: CommandError,
        generation: u64,
        sequence: i64,
    },
    /// Handed to the writer.
    Written {
        generation: u64,
        reply: Reply,
    },
    /// Wrote nothing without a refusal, or could not be decided here: through `execute`.
    Again,
}

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
        let mut decided: Vec<Option<Decided>> = self.answer_repeats(ctx, &items).await?;

        // Aggregates touched, in sorted order (the lock order); the ones the cache lacks, loaded together.
        let ids: BTreeSet<String> = items
            .iter()
            .zip(&decided)
            .filter(|(_, d)| d.is_none())
            .map(|(item, _)| item.aggregate_id.clone())
            .collect();
        let mut guards = Vec::with_capacity(ids.len());
        if self.config.serialize_in_process {
            for id in &ids {
                guards.push(self.locks.lock(format!("{}/{id}", A::TYPE)).await);
            }
        }
        self.warm::<A>(&ids).await?;

        // Each aggregate's state as the batch's decisions leave it; the cache takes it once they are all made (one
        // copy of a large portfolio per batch, not one per command). Until then the in-process locks keep every
        // other command of this process off these aggregates; a batch dropped halfway leaves the cache behind the
        // writer, and a command decided on that conflicts at commit and is decided again on the log.
        let mut working: HashMap<String, Option<Working<A>>> = HashMap::new();
        let mut stopped = None;
        for (n, item) in items.iter().enumerate() {
            if decided[n].is_none() {
                match self.decide_item::<A>(ctx, item, &authorize, &mut working).await {
                    Ok(decision) => decided[n] = Some(decision),
                    Err(error) => {
                        stopped = Some(error);
                        break;
                    }
                }
            }
        }
        for (id, state) in working {
            if let Some(Working { state, generation, events, snapshots, .. }) = state.filter(|w| w.events > 0) {
                self.cache.advance(&(A::TYPE, id), generation, state, events, snapshots);
            }
        }
        drop(guards);
        if let Some(error) = stopped {
            return Err(error);
        }
        let decided_ms = started.elapsed().as_secs_f64() * 1e3;

        // The writer's answers, then the refusals the log must confirm.
        let mut results: Vec<Option<ItemResult>> = (0..items.len()).map(|_| None).collect();
        // Aggregates with a write of this batch committed, and with one refused by the writer.
        let mut written: HashSet<String> = HashSet::new();
        let mut failed: HashSet<String> = HashSet::new();
        let mut again = Vec::new();
        let mut refused = Vec::new();
        // Per aggregate, the first command that failed for want of the database: its later ones are not run.
        let mut broken: HashMap<String, usize> = HashMap::new();
        for (n, decision) in decided.into_iter().enumerate() {
            let key: AggregateKey = (A::TYPE, items[n].aggregate_id.clone());
            match decision {
                Some(Decided::Answered(result)) => results[n] = Some(result),
                Some(Decided::Written { generation, reply }) => match reply.await {
                    Ok(Ok(outcome)) => {
                        written.insert(key.1);
                        results[n] = Some(Ok(outcome));
                    }
                    Ok(Err(CommitError::Database(error))) => {
                        self.cache.invalidate(&key, generation);
                        broken.entry(key.1.clone()).or_insert(n);
                        failed.insert(key.1);
                        results[n] = Some(Err(CommandError::store(error)));
                    }
                    Ok(Err(CommitError::Conflict | CommitError::DuplicateKey)) => {
                        self.cache.invalidate(&key, generation);
                        failed.insert(key.1);
                        again.push(n);
                    }
                    // The writer went away with it: written or not, unknown — a failure, like the database's.
                    Err(_) => {
                        self.cache.invalidate(&key, generation);
                        broken.entry(key.1.clone()).or_insert(n);
                        failed.insert(key.1);
                        results[n] = Some(Err(CommandError::Store("the writer stopped before answering".into())));
                    }
                },
                Some(Decided::Refused { error, generation, sequence }) => {
                    refused.push((n, error, generation, sequence))
                }
                Some(Decided::Again) | None => again.push(n),
            }
        }
        let unconfirmed = self.confirm_refusals::<A>(&items, refused, (&written, &failed), &mut results).await?;
        again.extend(unconfirmed);
        again.sort_unstable();
        let fell_back = !again.is_empty();
        // Answered here without `execute` (which counts what it runs): counted with the batch.
        let mut blocked = Vec::new();
        for n in &again {
            // Each through the full path (fresh state, retries, database lock): a failure here must not hide the
            // commands already answered.
            let item = &items[*n];
            if let Some(first) = broken.get(&item.aggregate_id).filter(|first| **first < *n) {
                // Run after the failed one it follows, it would reach the log before it: answered with the failure
                // instead, so that a retry of the batch applies the aggregate's commands in order.
                let why = format!("not run: command {first} of this batch, on the same aggregate, failed");
                results[*n] = Some(Err(CommandError::Store(why.into())));
                blocked.push(*n);
                continue;
            }
            let item_ctx = item_context(ctx, item);
            let authorized = self.load::<A>(&item.aggregate_id).await.and_then(|(state, _)| authorize(&state));
            let result = match authorized {
                Ok(()) => self.execute::<A>(&item_ctx, &item.aggregate_id, item.command.clone()).await,
                Err(refusal) => Err(refusal),
            };
            if result.as_ref().is_err_and(|error| !error.is_business()) {
                // Earlier than a failure the writer reported (a refusal decided again): the new bound.
                broken.entry(item.aggregate_id.clone()).and_modify(|first| *first = (*first).min(*n)).or_insert(*n);
            }
            results[*n] = Some(result);
        }
        if fell_back {
            self.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        let results: Vec<ItemResult> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(CommandError::Store("batch item left unanswered".into()))))
            .collect();
        tracing::debug!(
            commands = items.len(),
            aggregates = ids.len(),
            again = again.len(),
            decided_ms,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "batch executed"
        );
        again.retain(|n| !blocked.contains(n));
        self.count_batch(&results, &again, started.elapsed().as_secs_f64());
        Ok(results)
    }

    /// Loads into the cache the aggregates of `ids` it does not hold, with one statement.
    async fn warm<A: LedgerAggregate>(&self, ids: &BTreeSet<String>) -> Result<(), CommandError> {
        let missing: Vec<String> =
            ids.iter().filter(|id| !self.cache.contains(&(A::TYPE, (*id).clone()))).cloned().collect();
        if missing.is_empty() {
            return Ok(());
        }
        for (id, loaded) in super::loader::load::<A>(&self.pool, &missing, A::SNAPSHOTTED).await? {
            self.cache.insert_loaded((A::TYPE, id), loaded.state, loaded.sequence, loaded.snapshot_number);
        }
        Ok(())
    }

    /// Decides one item on its aggregate's state in `working` (taken from the cache at its first command in the
    /// batch); hands what it writes to the writer.
    async fn decide_item<A: LedgerAggregate>(
        &self,
        ctx: &CommandContext,
        item: &BatchItem<A::Command>,
        authorize: &impl Fn(&A) -> Result<(), CommandError>,
        working: &mut HashMap<String, Option<Working<A>>>,
    ) -> Result<Decided, CommandError> {
        let key: AggregateKey = (A::TYPE, item.aggregate_id.clone());
        let entry = match working.entry(item.aggregate_id.clone()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let Some((state, sequence, snapshot_number, generation)) = self.cache.get::<A>(&key) else {
                    // Not cached (evicted since `warm`): this and the aggregate's later commands go the full way,
                    // in order.
                    entry.insert(None);
                    return Ok(Decided::Again);
                };
                entry.insert(Some(Working { state, sequence, snapshot_number, generation, events: 0, snapshots: 0 }))
            }
        };
        // A refusal that left the state unknown: the aggregate's later commands go the full way.
        let Some(current) = entry else { return Ok(Decided::Again) };
        let (generation, sequence) = (current.generation, current.sequence);
        if let Err(error) = authorize(&current.state) {
            return Ok(Decided::Refused { error, generation, sequence });
        }
        // As `CommandService::decide`: `handle` applies what it decides to the state it runs on.
        let sink = EventSink::default();
        if let Err(refusal) = current.state.handle(item.command.clone(), A::services(self), &sink).await {
            if !A::refusal_keeps_state(&refusal) {
                if current.events > 0 {
                    self.cache.invalidate(&key, generation);
                }
                *entry = None;
            }
            return Ok(Decided::Refused { error: refusal.into(), generation, sequence });
        }
        let events = sink.collect().await;
        if events.is_empty() {
            return Ok(Decided::Again);
        }
        let item_ctx = item_context(ctx, item);
        let command_type = A::command_name(&item.command);
        let metadata = self.metadata(&item_ctx, command_type);
        let decision =
            super::service::Decision { generation, sequence, snapshot_number: current.snapshot_number, command_type };
        let submitted = match self.request::<A>(&item_ctx, &key, decision, &current.state, events, &metadata) {
            Ok((request, reply)) => {
                let (new_events, snapshots) = (request.events.len() as i64, i64::from(request.snapshot.is_some()));
                if self.writer.submit(request).await {
                    Ok((reply, new_events, snapshots))
                } else {
                    Err(CommandError::Store("the writer stopped".into()))
                }
            }
            Err(error) => Err(error),
        };
        let (reply, new_events, snapshots) = match submitted {
            Ok(submitted) => submitted,
            Err(error) => {
                // The state holds a decision that will never be written: neither the cache nor a later command
                // of the batch may use it.
                self.cache.invalidate(&key, generation);
                *entry = None;
                return Err(error);
            }
        };
        if let Some(current) = entry {
            current.sequence += new_events;
            current.snapshot_number += snapshots;
            current.events += new_events;
            current.snapshots += snapshots;
        }
        Ok(Decided::Written { generation, reply })
    }

    /// Answers the refusals the log confirms (see the module docs); returns the items to decide again. A refusal
    /// on an aggregate where a write of the batch failed may rest on that write: decided again.
    async fn confirm_refusals<A: LedgerAggregate>(
        &self,
        items: &[BatchItem<A::Command>],
        refused: Vec<(usize, CommandError, u64, i64)>,
        (written, failed): (&HashSet<String>, &HashSet<String>),
        results: &mut [Option<ItemResult>],
    ) -> Result<Vec<usize>, CommandError> {
        let unconfirmed_ids: Vec<String> = refused
            .iter()
            .map(|(n, ..)| items[*n].aggregate_id.clone())
            .filter(|id| !written.contains(id) && !failed.contains(id))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let heads: HashMap<String, i64> = if unconfirmed_ids.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as::<_, (String, i64)>(
                // One backward index probe per aggregate.
                "select a.id, coalesce((select sequence from events e
                                         where e.aggregate_type = $1 and e.aggregate_id = a.id
                                         order by sequence desc limit 1), 0)
                   from unnest($2::text[]) as a(id)",
            )
            .bind(A::TYPE)
            .bind(&unconfirmed_ids)
            .fetch_all(&self.pool)
            .await
            .map_err(CommandError::store)?
            .into_iter()
            .collect()
        };
        let mut again = Vec::new();
        for (n, error, generation, sequence) in refused {
            let id = &items[n].aggregate_id;
            let confirmed = !failed.contains(id) && (written.contains(id) || heads.get(id) == Some(&sequence));
            if confirmed {
                results[n] = Some(Err(error));
            } else {
                self.cache.invalidate(&(A::TYPE, id.clone()), generation);
                again.push(n);
            }
        }
        Ok(again)
    }

    /// Invalid ids, keys repeated inside the batch, and keys already in `command_log` (stored answer, or
    /// `IDEMPOTENCY_KEY_REUSED` for a different request); `None` for the items to decide.
    async fn answer_repeats<C>(
        &self,
        ctx: &CommandContext,
        items: &[BatchItem<C>],
    ) -> Result<Vec<Option<Decided>>, CommandError> {
        let mut decided: Vec<Option<Decided>> = (0..items.len()).map(|_| None).collect();
        let mut seen = HashSet::new();
        let mut keys = Vec::new();
        for (n, item) in items.iter().enumerate() {
            if item.aggregate_id.is_empty() || item.aggregate_id.len() > AGGREGATE_ID_LEN_MAX {
                let error = CommandError::Invalid(format!("aggregate id must be 1 to {AGGREGATE_ID_LEN_MAX} bytes"));
                decided[n] = Some(Decided::Answered(Err(error)));
            } else if item.cause.as_ref().is_some_and(|cause| cause.actor != ctx.actor) {
                let error = CommandError::Invalid("a batch item's cause must have the batch's actor".into());
                decided[n] = Some(Decided::Answered(Err(error)));
            } else if let Some(idempotency) = &item.idempotency {
                if seen.insert(idempotency.key.as_str()) {
                    keys.push(idempotency.key.clone());
                } else {
                    let error = CommandError::Invalid(format!(
                        "idempotency key {:?} appears twice in the batch",
                        idempotency.key
                    ));
                    decided[n] = Some(Decided::Answered(Err(error)));
                }
            }
        }
        if keys.is_empty() {
            return Ok(decided);
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
            let (Some(idempotency), None) = (&item.idempotency, &decided[n]) else { continue };
            let Some((hash, result)) = stored.get(&idempotency.key) else { continue };
            decided[n] = Some(Decided::Answered(if hash[..] == idempotency.fingerprint[..] {
                stored_outcome(result.clone()).map_err(CommandError::store)
            } else {
                Err(CommandError::IdempotencyKeyReused { key: idempotency.key.clone() })
            }));
        }
        Ok(decided)
    }

    fn count_batch(&self, results: &[ItemResult], counted: &[usize], seconds: f64) {
        for (n, result) in results.iter().enumerate() {
            // Commands that went through `execute` were counted there.
            if counted.binary_search(&n).is_err() {
                self.metrics.count(result);
            }
        }
        self.metrics.batches.fetch_add(1, Ordering::Relaxed);
        self.metrics.batch_latency.observe(seconds);
    }
}

/// The context of one item: the batch's, with the item's idempotency key.
fn item_context<C>(ctx: &CommandContext, item: &BatchItem<C>) -> CommandContext {
    let mut item_ctx = item.cause.as_ref().unwrap_or(ctx).clone();
    item_ctx.idempotency = item.idempotency.clone();
    item_ctx
}
