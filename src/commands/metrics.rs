//! Counters and latency histograms of the command service, read by the API's `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{CommandError, CommandOutcome};

/// Counters of what the service did (exported to Prometheus by the API).
#[derive(Debug, Default)]
pub struct CommandMetrics {
    pub committed: AtomicU64,
    pub rejected: AtomicU64,
    pub conflicts: AtomicU64,
    pub duplicates: AtomicU64,
    pub failed: AtomicU64,
    /// Time to execute a command, from the first look at the aggregate to the answer.
    pub latency: crate::metrics::Histogram,
    /// Batches run by `execute_batch` (their commands count in the counters above).
    pub batches: AtomicU64,
    /// Time to execute a batch.
    pub batch_latency: crate::metrics::Histogram,
    /// Group commits (statements) and the commands they wrote: their ratio is the mean group size.
    pub group_commits: AtomicU64,
    pub group_commands: AtomicU64,
    /// Groups written again one command at a time (a key conflict inside).
    pub group_fallbacks: AtomicU64,
    /// Commands that lost so many races that they were written holding back every other writer
    /// ([`CommandService::attempt_exclusive`]).
    pub exclusive_attempts: AtomicU64,
    /// Time to write a group.
    pub group_latency: crate::metrics::Histogram,
    /// Commands decided on a cached aggregate (no read before deciding), and on a fresh load.
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
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

    /// Counts a command's result.
    pub(super) fn count(&self, result: &Result<CommandOutcome, CommandError>) {
        let counter = match result {
            Ok(outcome) if outcome.duplicate => &self.duplicates,
            Ok(_) => &self.committed,
            Err(e) if e.is_business() => &self.rejected,
            Err(_) => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = result {
            if error.is_business() {
                self.count_rejection(error.code());
            }
        }
    }
}
