//! The command service: the one entry point that changes aggregates.
//!
//! # How a command runs
//! 1. Take the in-process lock of the aggregate, so that commands on one aggregate inside one process are
//!    decided one after the other (conflicts then only happen between processes).
//! 2. Take the aggregate's state from the cache (`cache`), or load it — its snapshot and the events after it,
//!    one statement — and run `handle`.
//! 3. Hand the events to the writer (`writer`) while still holding the lock, record the new state in the cache
//!    (the next command on the aggregate decides on top of it), release the lock and wait for the writer: it
//!    commits whatever is queued — events, due snapshots, `command_log` rows with their stored answers — with
//!    one statement (group commit). The events primary key `(aggregate_type, aggregate_id, sequence)` is the
//!    optimistic lock: a conflict (another process wrote the aggregate) drops the cached state and the command is
//!    decided again on a fresh load, with jittered backoff, a bounded number of times, then on a database lock,
//!    and at last in one transaction that holds back every other writer of the log (so that a process with a
//!    warm cache cannot starve another's retries).
//! 4. Idempotency is folded into the commit: the `command_log` primary key refuses a key used before, and the
//!    command is then answered from the log (the same request: its first answer; another: refused).
//! 5. A command that writes nothing (refused, or a no-op) is answered once the log confirms the state it was
//!    decided on: the commands decided before it on the aggregate committed, nobody else wrote the aggregate,
//!    and its key has no stored answer.
//!
//! Why not `CqrsFramework::execute`: it commits through `PersistedEventRepository::persist`, one transaction per
//! command, which cannot include our idempotency row, and it returns nothing about what was written. We use the
//! same building blocks (the `Aggregate` trait, `EventSink`; postgres-es's event store for [`CommandService::load`])
//! and own the commit. Nothing is published from the command path: the events table is the outbox (see
//! `crate::log`).
//!
//! Batched intake ([`CommandService::execute_batch`], the GraphQL `cashBatch` mutation) decides up to
//! [`BATCH_COMMANDS_MAX`] commands together and hands them to the same writer; see `batch`.

mod batch;
mod cache;
mod context;
mod loader;
mod locks;
mod metrics;
mod service;
mod writer;

pub use batch::{BatchItem, BATCH_COMMANDS_MAX};
pub use cache::{Cacheable, AGGREGATE_CACHE_BYTES_MAX, AGGREGATE_CACHE_ENTRIES_MAX};
pub use context::{CommandContext, Idempotency, IDEMPOTENCY_KEY_LEN_MAX};
pub use metrics::CommandMetrics;
pub use service::{CommandConfig, CommandService, LedgerAggregate};
pub use writer::{GROUP_COMMANDS_MAX, GROUP_EVENTS_MAX, WRITER_QUEUE_MAX};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{OrderError, PortfolioError};
use crate::log::LogPosition;

/// Longest aggregate id accepted, in bytes.
pub const AGGREGATE_ID_LEN_MAX: usize = 128;

/// One event a command wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedEvent {
    pub sequence: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub position: LogPosition,
}

/// What a command did. For a repeated idempotent request this is the first execution's outcome and
/// `duplicate` is true.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutcome {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub events: Vec<CommittedEvent>,
    #[serde(skip)]
    pub duplicate: bool,
}

impl CommandOutcome {
    /// The log position of the last event written, if any: wait for a read model to pass it to read your
    /// own writes.
    pub fn last_position(&self) -> Option<LogPosition> {
        self.events.last().map(|e| e.position)
    }
}

/// Why a command was not executed. Business refusals carry the aggregate's typed error; infrastructure
/// failures carry their cause for the log, and must be shown to clients only as a generic message.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Order(#[from] OrderError),
    #[error(transparent)]
    Portfolio(#[from] PortfolioError),
    #[error("idempotency key {key:?} was already used for a different request")]
    IdempotencyKeyReused { key: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Refused by a check of the caller's (e.g. authorization in a batch), with its own code.
    #[error("{message}")]
    Refused { code: &'static str, message: String },
    #[error("gave up after {attempts} attempts: the aggregate kept changing concurrently")]
    Contention { attempts: u32 },
    #[error("event store error: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl CommandError {
    /// Stable machine-readable code (GraphQL `extensions.code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Order(e) => e.code(),
            Self::Portfolio(e) => e.code(),
            Self::IdempotencyKeyReused { .. } => "IDEMPOTENCY_KEY_REUSED",
            Self::Invalid(_) => "INVALID_INPUT",
            Self::Refused { code, .. } => code,
            Self::Contention { .. } => "CONTENTION",
            Self::Store(_) => "INTERNAL",
        }
    }

    /// True for refusals the caller caused (as opposed to infrastructure failures worth retrying later).
    pub fn is_business(&self) -> bool {
        !matches!(self, Self::Store(_) | Self::Contention { .. })
    }

    pub(crate) fn store(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Store(Box::new(error))
    }
}
