//! The audit trail: a hash chain sealed over the event log, exports an auditor can read with ordinary tools,
//! and verification of both.
//!
//! - [`canonical`]: the canonical bytes of an event (RFC 8785 JSON) and the chain rule
//!   `chain_hash = SHA-256(previous_hash ‖ canonical bytes)`. Specified for outsiders in `docs/audit.md`.
//! - [`sealer`]: follows the log in commit-safe order and stores each event's chain hash (`audit_chain`),
//!   plus periodic checkpoints. One active sealer (advisory lock); [`seal_until_head`] for one-shot use.
//! - [`export`]: JSON Lines, CSV or Parquet files plus a `manifest.json`, streamed in bounded memory; and
//!   [`jsonl_stream`], the same JSON Lines as a byte stream for an HTTP download.
//! - [`verify`]: recomputes an export directory's chain, links, digests and manifest, or the database's chain
//!   against the sealed hashes; names the first position that fails.
//!
//! # Why a chain sealed in the database, and the log append-only
//! The log is the only source of truth, so an auditor must be able to tell that nothing in it was altered,
//! removed or reordered since it was written. Hashing at export time alone would only prove that the file is
//! what the database held at that moment; the sealer hashes events shortly after they commit, so a later
//! change to a sealed event shows up in `ledger verify --db`, and checkpoints published elsewhere anchor the
//! chain outside the database. Migration `0003_audit.sql` makes `events` (and the chain) append-only with a
//! trigger; the production role set-up that also keeps the table owner out is in `docs/audit.md`.
//!
//! The chain follows the commit order `(transaction_id, global_position)` that every log reader uses, not
//! `global_position`: positions are taken at insert and become visible at commit, so only the commit order is
//! final when an event is sealed.

pub mod canonical;
pub mod export;
pub mod filter;
pub mod manifest;
mod parquet_file;
pub mod sealed;
pub mod sealer;
pub mod verify;

pub use canonical::{canonical_event, ChainHash, CHAIN_VERSION, GENESIS_HASH};
pub use export::{export, jsonl_stream, ExportOptions};
pub use filter::ExportFilter;
pub use manifest::{ExportFormat, Failure, Manifest};
pub use sealed::{chain_head, ChainHead, SealedEvent, SealedReader};
pub use sealer::{seal_until_head, Sealer, SealerConfig, SealerStatus};
pub use verify::{verify_db, verify_dir, DbReport, DirReport};

use std::path::PathBuf;

/// Progress of a long operation: `(done, total)`; `total` is 0 when unknown.
pub type ProgressFn<'a> = &'a mut (dyn FnMut(u64, u64) + Send);

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The caller's request is wrong (bad filter, unusable output directory, not an export directory…).
    /// Safe to show to the user as is.
    #[error("{0}")]
    Invalid(String),
    /// Verification found a change: the first failing position and why.
    #[error(transparent)]
    Tampered(#[from] Failure),
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("writing Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("writing Arrow data: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("writing CSV: {0}")]
    Csv(#[from] csv::Error),
    /// The sealed chain contradicts itself or the sealer's cursor (an invariant, not user input).
    #[error("audit chain inconsistent: {0}")]
    Chain(String),
    #[error("{0}")]
    Timeout(String),
}

impl AuditError {
    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> AuditError {
        let path = path.into();
        move |source| AuditError::Io { context, path, source }
    }

    /// True when the error is the caller's to fix (an HTTP layer maps it to 400, everything else to 500).
    pub fn is_user_error(&self) -> bool {
        matches!(self, AuditError::Invalid(_))
    }
}
