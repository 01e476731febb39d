//! One active instance at a time (the relay, the process manager, the sealer): a session-level PostgreSQL
//! advisory lock held on a connection of its own.
//!
//! The lock lives as long as that session: when the active instance's process dies (or its task is aborted and
//! the connection dropped), the server ends the session and the lock is free; a standby polling
//! `pg_try_advisory_lock` takes over within one poll interval. The active instance checks its session before
//! every batch and steps down if it is gone. An instance cut off from the database can finish the batch in
//! hand; what each one does is idempotent (the relay: duplicates, never a gap; the process manager: steps
//! under idempotency keys), so a brief overlap repeats work and loses nothing.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// The advisory-lock key for a name: the first 8 bytes of its SHA-256.
pub fn lock_key(name: &str) -> i64 {
    let digest = Sha256::digest(name.as_bytes());
    i64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

pub struct Leadership {
    connection: PgConnection,
}

impl Leadership {
    /// Waits until this process holds the lock `key` (`Ok(None)` when cancelled first). Reports the standby
    /// state once, not on every attempt.
    pub async fn acquire(
        pool: &PgPool,
        key: i64,
        poll: Duration,
        cancel: &CancellationToken,
        on_standby: impl Fn(),
    ) -> Result<Option<Leadership>, sqlx::Error> {
        let mut connection = PgConnection::connect_with(&pool.connect_options()).await?;
        let mut reported = false;
        loop {
            let acquired: bool =
                sqlx::query_scalar("select pg_try_advisory_lock($1)").bind(key).fetch_one(&mut connection).await?;
            if acquired {
                return Ok(Some(Leadership { connection }));
            }
            if !reported {
                on_standby();
                reported = true;
            }
            tokio::select! {
                _ = cancel.cancelled() => {
                    connection.close().await.ok();
                    return Ok(None);
                }
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// True while the session holding the lock is alive.
    pub async fn still_held(&mut self) -> bool {
        self.connection.ping().await.is_ok()
    }

    /// Gives the lock up (closing the session releases it).
    pub async fn release(self) {
        self.connection.close().await.ok();
    }
}
