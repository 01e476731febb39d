//! In-process serialisation of commands per aggregate.
//!
//! Optimistic locking alone makes N concurrent commands on one aggregate cost O(N²) attempts. Queuing them on
//! an async mutex per aggregate inside the process leaves the database lock for the rare cross-process
//! collision. Entries are removed when their last holder or waiter leaves, so the map only holds aggregates
//! with commands in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default)]
pub struct AggregateLocks {
    locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

pub struct AggregateGuard<'a> {
    guard: Option<OwnedMutexGuard<()>>,
    key: String,
    owner: &'a AggregateLocks,
}

impl AggregateLocks {
    pub async fn lock(&self, key: String) -> AggregateGuard<'_> {
        let mutex = {
            let mut locks = self.locks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            Arc::clone(locks.entry(key.clone()).or_default())
        };
        let guard = mutex.lock_owned().await;
        AggregateGuard { guard: Some(guard), key, owner: self }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().unwrap().len()
    }
}

impl Drop for AggregateGuard<'_> {
    fn drop(&mut self) {
        let mut locks = self.owner.locks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        drop(self.guard.take());
        // Only the map still refers to the mutex: nobody holds or awaits it.
        if locks.get(&self.key).is_some_and(|m| Arc::strong_count(m) == 1) {
            locks.remove(&self.key);
        }
    }
}

/// A PostgreSQL session advisory lock on one aggregate, held across processes.
///
/// Optimistic locking is unfair: under sustained cross-process contention one writer can lose every race
/// until it runs out of attempts. After a few conflicts the service queues the command on this lock instead
/// (PostgreSQL grants waiters in arrival order), so every instance's writer gets its turn. The lock lives on a
/// connection of its own, outside the pool: waiters parked on pooled connections would starve the lock holder
/// of the connection it needs to commit. Dropping the guard drops the connection, which ends the session and
/// releases the lock on the server, so a cancelled command cannot leave the lock behind.
pub struct DatabaseLock {
    conn: sqlx::PgConnection,
}

impl DatabaseLock {
    pub async fn acquire(pool: &sqlx::PgPool, key: &str) -> Result<Self, sqlx::Error> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect_with(&pool.connect_options()).await?;
        sqlx::query("select pg_advisory_lock(hashtextextended($1, 0))").bind(key).execute(&mut conn).await?;
        Ok(Self { conn })
    }

    /// The session holding the lock.
    pub fn connection(&mut self) -> &mut sqlx::PgConnection {
        &mut self.conn
    }

    /// Ends the session, releasing the lock.
    pub async fn release(self) {
        use sqlx::Connection;
        let _ = self.conn.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn serialises_per_key_and_cleans_up() {
        let locks = Arc::new(AggregateLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max_inside = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (locks, inside, max_inside) = (locks.clone(), inside.clone(), max_inside.clone());
                tokio::spawn(async move {
                    let _guard = locks.lock("Portfolio/1".into()).await;
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max_inside.fetch_max(now, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(max_inside.load(Ordering::SeqCst), 1);
        assert_eq!(locks.len(), 0);
    }
}
