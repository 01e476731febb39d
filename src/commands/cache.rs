//! The aggregate cache: the state and sequence of recently used aggregates, so that a command on a warm
//! aggregate reads nothing before deciding.
//!
//! An entry holds the state *after every command decided on it*, some of which may still be on their way to
//! the database (pending): the next command on the aggregate decides on top of them, and they can share a group
//! commit. Entries are trusted only as far as the log agrees:
//! - a commit that conflicts (another process wrote the aggregate) or fails invalidates the entry, and every
//!   command decided on it (its *generation*) is answered `Conflict` and runs again on a fresh load;
//! - a command that writes nothing (refused, or a no-op) is checked against the log's head before it is
//!   answered, once the entry has no pending commands (see `service`).
//!
//! Bounded by count ([`AGGREGATE_CACHE_ENTRIES_MAX`]) and by approximate bytes ([`AGGREGATE_CACHE_BYTES_MAX`]);
//! the least recently used entries go first, never one with commands pending.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;

/// Aggregates kept at most per command service.
pub const AGGREGATE_CACHE_ENTRIES_MAX: usize = 100_000;
/// Approximate memory the cached states may take, in bytes.
pub const AGGREGATE_CACHE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// `(aggregate type, id)`.
pub type AggregateKey = (&'static str, String);

/// An aggregate the cache can hold: its rough size in memory.
pub trait Cacheable {
    fn approximate_bytes(&self) -> usize;
}

pub(super) struct Entry {
    /// Shared, so that a reader copies it outside the lock.
    pub state: Arc<dyn Any + Send + Sync>,
    /// Sequence of the state, pending commands included.
    pub sequence: i64,
    /// Sequence known to be in the log.
    pub committed_sequence: i64,
    /// Snapshot number in the log (0: none) as of `committed_sequence`, and after the pending ones.
    pub snapshot_number: i64,
    /// The load this entry descends from; commands carry it, so that a failed one fails its successors.
    pub generation: u64,
    bytes: usize,
}

pub(super) struct AggregateCache {
    entries: Mutex<(LruCache<AggregateKey, Entry>, usize)>,
    generations: AtomicU64,
    entries_max: usize,
    bytes_max: usize,
}

impl Default for AggregateCache {
    fn default() -> Self {
        Self::new(AGGREGATE_CACHE_ENTRIES_MAX, AGGREGATE_CACHE_BYTES_MAX)
    }
}

impl AggregateCache {
    pub fn new(entries_max: usize, bytes_max: usize) -> Self {
        Self {
            entries: Mutex::new((LruCache::unbounded(), 0)),
            generations: AtomicU64::new(1),
            entries_max: entries_max.max(1),
            bytes_max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (LruCache<AggregateKey, Entry>, usize)> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the cached state, its sequence, snapshot number and generation.
    pub fn get<A: Clone + Send + Sync + 'static>(&self, key: &AggregateKey) -> Option<(A, i64, i64, u64)> {
        let (state, sequence, snapshot_number, generation) = {
            let mut guard = self.lock();
            let entry = guard.0.get(key)?;
            (entry.state.clone(), entry.sequence, entry.snapshot_number, entry.generation)
        };
        // Copied outside the lock: a large portfolio takes a while, and every command of the process needs the lock.
        let state = state.downcast_ref::<A>()?.clone();
        Some((state, sequence, snapshot_number, generation))
    }

    /// Whether `key` has an entry (counts as a use, like `get`), without copying its state.
    pub fn contains(&self, key: &AggregateKey) -> bool {
        self.lock().0.get(key).is_some()
    }

    /// The sequence known to be in the log, for an entry of `generation`.
    pub fn committed_sequence(&self, key: &AggregateKey, generation: u64) -> Option<i64> {
        self.lock().0.peek(key).filter(|e| e.generation == generation).map(|e| e.committed_sequence)
    }

    /// Stores a state freshly loaded from the log; returns its generation.
    pub fn insert_loaded<A: Cacheable + Send + Sync + 'static>(
        &self,
        key: AggregateKey,
        state: A,
        sequence: i64,
        snapshot_number: i64,
    ) -> u64 {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let bytes = state.approximate_bytes();
        let entry = Entry {
            state: Arc::new(state),
            sequence,
            committed_sequence: sequence,
            snapshot_number,
            generation,
            bytes,
        };
        let mut guard = self.lock();
        let (entries, total) = &mut *guard;
        if let Some(old) = entries.put(key, entry) {
            *total -= old.bytes;
        }
        *total += bytes;
        Self::evict(entries, total, self.entries_max, self.bytes_max);
        generation
    }

    /// Records decisions of `generation`: the state after them, `events` more and `snapshots` more (pending until
    /// the writer commits them). False when the entry is gone or reloaded meanwhile.
    pub fn advance<A: Cacheable + Send + Sync + 'static>(
        &self,
        key: &AggregateKey,
        generation: u64,
        state: A,
        events: i64,
        snapshots: i64,
    ) -> bool {
        let mut guard = self.lock();
        let (entries, total) = &mut *guard;
        let Some(entry) = entries.get_mut(key).filter(|e| e.generation == generation) else { return false };
        let bytes = state.approximate_bytes();
        *total = *total - entry.bytes + bytes;
        entry.bytes = bytes;
        entry.state = Arc::new(state);
        entry.sequence += events;
        entry.snapshot_number += snapshots;
        true
    }

    /// The writer committed a command of `generation` that wrote up to `sequence`.
    pub fn committed(&self, key: &AggregateKey, generation: u64, sequence: i64) {
        let mut guard = self.lock();
        if let Some(entry) = guard.0.peek_mut(key).filter(|e| e.generation == generation) {
            entry.committed_sequence = entry.committed_sequence.max(sequence);
        }
    }

    /// Forgets the entry if it is still of `generation` (a commit of it failed, or the log moved on).
    pub fn invalidate(&self, key: &AggregateKey, generation: u64) {
        let mut guard = self.lock();
        let (entries, total) = &mut *guard;
        if entries.peek(key).is_some_and(|e| e.generation == generation) {
            if let Some(old) = entries.pop(key) {
                *total -= old.bytes;
            }
        }
    }

    fn evict(entries: &mut LruCache<AggregateKey, Entry>, total: &mut usize, entries_max: usize, bytes_max: usize) {
        // Least recently used first, skipping entries with pending commands (their successors depend on them).
        let mut skipped = Vec::new();
        while entries.len() > entries_max || *total > bytes_max {
            let Some((key, entry)) = entries.pop_lru() else { break };
            if entry.sequence > entry.committed_sequence {
                skipped.push((key, entry));
                if skipped.len() > entries_max {
                    break;
                }
                continue;
            }
            *total -= entry.bytes;
        }
        // Entries with pending commands go back (as recently used: they are in use).
        for (key, entry) in skipped {
            entries.put(key, entry);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().0.len()
    }
}

/// Rough sizes: the struct, plus per position, lot, reservation and alert what their fields take.
impl Cacheable for crate::domain::Portfolio {
    fn approximate_bytes(&self) -> usize {
        const ITEM_BYTES: usize = 160;
        let lots: usize = self.positions.values().map(|p| p.lots.len()).sum();
        let exec_ids: usize = self.reservations.values().map(|r| r.applied_exec_ids.len()).sum();
        std::mem::size_of::<Self>()
            + ITEM_BYTES * (self.positions.len() + lots + self.reservations.len() + self.alerts.len() + exec_ids)
    }
}

impl Cacheable for crate::domain::Order {
    fn approximate_bytes(&self) -> usize {
        const EXEC_ID_BYTES: usize = 64;
        std::mem::size_of::<Self>() + EXEC_ID_BYTES * self.exec_ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Sized(usize);

    impl Cacheable for Sized {
        fn approximate_bytes(&self) -> usize {
            self.0
        }
    }

    fn key(n: usize) -> AggregateKey {
        ("Test", n.to_string())
    }

    #[test]
    fn the_least_recently_used_go_first_by_count_and_by_bytes() {
        let cache = AggregateCache::new(3, 1_000);
        for n in 0..3 {
            cache.insert_loaded(key(n), Sized(10), 1, 0);
        }
        assert!(cache.get::<Sized>(&key(0)).is_some()); // 0 is now the most recently used
        cache.insert_loaded(key(3), Sized(10), 1, 0);
        assert_eq!(cache.len(), 3);
        assert!(cache.get::<Sized>(&key(1)).is_none(), "1 was the least recently used");
        cache.insert_loaded(key(4), Sized(990), 1, 0);
        assert!(cache.get::<Sized>(&key(4)).is_some());
        assert!(cache.len() < 3, "bytes bound the cache too");
    }

    #[test]
    fn entries_with_pending_commands_are_not_evicted() {
        let cache = AggregateCache::new(1, 1_000);
        let generation = cache.insert_loaded(key(0), Sized(10), 1, 0);
        assert!(cache.advance(&key(0), generation, Sized(10), 1, 0));
        cache.insert_loaded(key(1), Sized(10), 1, 0);
        assert_eq!(cache.get::<Sized>(&key(0)).map(|e| e.1), Some(2), "kept while its command is pending");
        cache.committed(&key(0), generation, 2);
        assert_eq!(cache.committed_sequence(&key(0), generation), Some(2));
    }

    #[test]
    fn a_stale_generation_neither_advances_nor_invalidates_a_reload() {
        let cache = AggregateCache::default();
        let old = cache.insert_loaded(key(0), Sized(1), 1, 0);
        let new = cache.insert_loaded(key(0), Sized(1), 2, 0);
        assert_ne!(old, new);
        assert!(!cache.advance(&key(0), old, Sized(1), 1, 0));
        cache.invalidate(&key(0), old);
        assert!(cache.get::<Sized>(&key(0)).is_some());
        cache.invalidate(&key(0), new);
        assert!(cache.get::<Sized>(&key(0)).is_none());
    }
}
