//! The command service: the one entry point that changes aggregates.
//!
//! # How a command runs
//! 1. With an idempotency key, look the key up in `command_log`: the same request returns the stored result
//!    and writes nothing; another request under the same key is refused.
//! 2. Take the in-process lock of the aggregate, so that commands on one aggregate inside one process queue
//!    instead of colliding (conflicts then only happen between processes).
//! 3. Load the aggregate with cqrs-es's `PersistedEventStore` over postgres-es's `PostgresEventRepository`
//!    (snapshot plus later events for portfolios, all events for orders), run `handle`.
//! 4. Commit in one transaction: the events (one multi-row insert), the snapshot when one is due, and the
//!    `command_log` row. The events primary key `(aggregate_type, aggregate_id, sequence)` is the optimistic
//!    lock: on a conflict the command is retried from step 3 with jittered exponential backoff, a bounded
//!    number of times.
//!
//! Why not `CqrsFramework::execute`: it commits through `PersistedEventRepository::persist`, which cannot
//! include our idempotency row in the same transaction, and it returns nothing about what was written. We use
//! the same building blocks (the `Aggregate` trait, `EventSink`, the event store's loading) and own the commit.
//! Nothing is published from the command path: the events table is the outbox (see `crate::log`).
//!
//! Batched intake ([`CommandService::execute_batch`], the GraphQL `cashBatch` mutation) runs up to
//! [`BATCH_COMMANDS_MAX`] commands with the same guarantees in one transaction; see `batch`.

mod batch;
mod context;
mod locks;
mod service;
mod store;

pub use batch::{BatchItem, BATCH_COMMANDS_MAX};
pub use context::{CommandContext, Idempotency, IDEMPOTENCY_KEY_LEN_MAX};
pub use service::{CommandConfig, CommandMetrics, CommandService, LedgerAggregate};

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
