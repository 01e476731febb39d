//! The commit transaction: events, snapshot and idempotency record, all or nothing.

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{CommandOutcome, CommittedEvent};
use crate::log::LogPosition;

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

/// Everything one commit writes; owned, so that the commit can run in its own task.
pub struct PendingCommit {
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    /// The sequence the aggregate was loaded at; the first new event gets `loaded_sequence + 1`.
    pub loaded_sequence: usize,
    pub events: Vec<NewEvent>,
    pub metadata: Value,
    /// `(state after the events, snapshot number)` when a snapshot is due.
    pub snapshot: Option<(Value, usize)>,
    pub record: Option<CommandRecord>,
}

pub enum CommitError {
    /// Another writer appended to the aggregate since it was loaded (events primary key).
    Conflict,
    /// Another request committed the same idempotency key first (`command_log` primary key).
    DuplicateKey,
    Database(sqlx::Error),
}

impl From<sqlx::Error> for CommitError {
    fn from(error: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &error {
            if db.code().as_deref() == Some("23505") {
                match db.constraint() {
                    Some("events_pkey") => return Self::Conflict,
                    Some("command_log_pkey") => return Self::DuplicateKey,
                    _ => {}
                }
            }
        }
        Self::Database(error)
    }
}

/// Commits in a task of its own and waits for it (see [`crate::db::detached`]: a cancelled caller must never
/// cut a commit in half — seen in the process-manager crash test before this was detached).
pub async fn commit(pool: &PgPool, pending: PendingCommit) -> Result<CommandOutcome, CommitError> {
    let pool = pool.clone();
    match tokio::spawn(async move { commit_in_transaction(&pool, pending).await }).await {
        Ok(result) => result,
        Err(join_error) => {
            Err(CommitError::Database(sqlx::Error::Protocol(format!("commit task failed: {join_error}"))))
        }
    }
}

async fn commit_in_transaction(pool: &PgPool, pending: PendingCommit) -> Result<CommandOutcome, CommitError> {
    let count = pending.events.len();
    let first = pending.loaded_sequence as i64 + 1;
    let sequences: Vec<i64> = (first..first + count as i64).collect();
    let event_ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    let mut types = Vec::with_capacity(count);
    let mut versions = Vec::with_capacity(count);
    let mut payloads = Vec::with_capacity(count);
    for event in pending.events {
        types.push(event.event_type);
        versions.push(event.event_version);
        payloads.push(event.payload);
    }

    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, String)> = if count == 0 {
        Vec::new()
    } else {
        sqlx::query_as(
            "insert into events
                    (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, event_id)
             select $1, $2, u.sequence, u.event_type, u.event_version, u.payload, $7, u.event_id
               from unnest($3::bigint[], $4::text[], $5::text[], $6::jsonb[], $8::uuid[])
                    as u(sequence, event_type, event_version, payload, event_id)
             returning global_position, transaction_id::text",
        )
        .bind(pending.aggregate_type)
        .bind(&pending.aggregate_id)
        .bind(&sequences)
        .bind(&types)
        .bind(&versions)
        .bind(&payloads)
        .bind(&pending.metadata)
        .bind(&event_ids)
        .fetch_all(&mut *tx)
        .await?
    };

    if let Some((state, snapshot_number)) = &pending.snapshot {
        sqlx::query(
            "insert into snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
             values ($1, $2, $3, $4, $5)
             on conflict (aggregate_type, aggregate_id) do update
                set last_sequence = excluded.last_sequence,
                    current_snapshot = excluded.current_snapshot,
                    payload = excluded.payload
              where snapshots.last_sequence < excluded.last_sequence",
        )
        .bind(pending.aggregate_type)
        .bind(&pending.aggregate_id)
        .bind(first - 1 + count as i64)
        .bind(*snapshot_number as i64)
        .bind(state)
        .execute(&mut *tx)
        .await?;
    }

    let outcome = CommandOutcome {
        aggregate_type: pending.aggregate_type.to_string(),
        aggregate_id: pending.aggregate_id.clone(),
        events: rows
            .into_iter()
            .zip(sequences)
            .zip(event_ids)
            .zip(types)
            .map(|((((global_position, transaction_id), sequence), event_id), event_type)| CommittedEvent {
                sequence,
                event_id,
                event_type,
                position: LogPosition { transaction_id: transaction_id.parse().unwrap_or(0), global_position },
            })
            .collect(),
        duplicate: false,
    };

    if let Some(record) = &pending.record {
        let result =
            serde_json::to_value(&outcome).map_err(|e| CommitError::Database(sqlx::Error::Encode(e.into())))?;
        sqlx::query(
            "insert into command_log
                    (actor, idempotency_key, request_hash, aggregate_type, aggregate_id, command_type, result)
             values ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&record.actor)
        .bind(&record.key)
        .bind(&record.fingerprint[..])
        .bind(pending.aggregate_type)
        .bind(&pending.aggregate_id)
        .bind(record.command_type)
        .bind(&result)
        .execute(&mut *tx)
        .await?;
    }

    tx.commit().await?;
    Ok(outcome)
}

/// The stored outcome of `(actor, key)` and the fingerprint of the request that produced it.
pub async fn lookup(pool: &PgPool, actor: &str, key: &str) -> Result<Option<(Vec<u8>, CommandOutcome)>, sqlx::Error> {
    let row: Option<(Vec<u8>, Value)> =
        sqlx::query_as("select request_hash, result from command_log where actor = $1 and idempotency_key = $2")
            .bind(actor)
            .bind(key)
            .fetch_optional(pool)
            .await?;
    row.map(|(hash, result)| {
        let mut outcome: CommandOutcome =
            serde_json::from_value(result).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        outcome.duplicate = true;
        Ok((hash, outcome))
    })
    .transpose()
}
