//! PostgreSQL connections and migrations.
//!
//! The schema is ours (postgres-es creates no tables): `migrations/` is embedded in the binary and applied at
//! startup by every process, serialised by sqlx's advisory lock, so a fresh database needs no manual step.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

/// The database the binary uses when `DATABASE_URL` is not set.
pub const DATABASE_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/ledger";
/// Connections per pool unless configured otherwise.
pub const POOL_CONNECTIONS_MAX: u32 = 16;
/// How long a caller waits for a pooled connection before giving up.
pub const POOL_ACQUIRE_TIMEOUT_MS: u64 = 5_000;
/// Longest any single statement may run (guards against runaway queries holding the log's xmin back).
pub const STATEMENT_TIMEOUT_MS: u64 = 30_000;
/// A session idle inside a transaction this long is ended by the server. Our own transactions never idle
/// (see `commands::writer`: one statement each); this is the safety net that keeps a leaked transaction from holding every
/// log reader's horizon back indefinitely.
pub const IDLE_IN_TRANSACTION_TIMEOUT_MS: u64 = 60_000;

pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Opens a pool with bounded size, acquire timeout and statement timeout.
pub async fn connect(url: &str, connections_max: u32) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?.application_name("ledger").options([
        ("statement_timeout", STATEMENT_TIMEOUT_MS.to_string()),
        ("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION_TIMEOUT_MS.to_string()),
    ]);
    PgPoolOptions::new()
        .max_connections(connections_max)
        .acquire_timeout(Duration::from_millis(POOL_ACQUIRE_TIMEOUT_MS))
        .connect_with(options)
        .await
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Creates the database named in `url` if it does not exist (connecting to the server's `postgres` database).
/// Returns true when it was created.
pub async fn ensure_database(url: &str) -> Result<bool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?;
    let name = options.get_database().unwrap_or("postgres").to_string();
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists: bool = sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await?;
    if !exists {
        let statement = format!("create database \"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&statement).execute(&mut admin).await {
            Ok(_) => {}
            // Another process created it between our check and our create.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e),
        }
    }
    admin.close().await?;
    Ok(!exists)
}

/// Connects to `url` (creating the database if needed) with a pool of at most `connections`, and applies every
/// pending migration; the error says what to do when the server cannot be reached.
pub async fn connect_and_migrate(url: &str, connections: u32) -> anyhow::Result<PgPool> {
    use anyhow::Context;
    let unreachable = || {
        format!(
            "cannot reach PostgreSQL at {} — start it (e.g. `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
             or `docker compose up -d postgres`) or set DATABASE_URL",
            redact(url)
        )
    };
    ensure_database(url).await.with_context(unreachable)?;
    let pool = connect(url, connections).await.with_context(unreachable)?;
    migrate(&pool).await.context("applying migrations")?;
    Ok(pool)
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Runs `work` (typically one whole transaction) on a task of its own and waits for it.
///
/// A future dropped in the middle of a transaction — an aborted task, a worker killed mid-batch, an HTTP request
/// whose client went away — leaves its pooled connection with a queued `ROLLBACK` that sqlx sends on the
/// connection's next use, which can land inside another transaction, rolling back part of it while the rest
/// autocommits. Detached, a transaction always runs to its end (commit or rollback) whatever happens to the
/// caller; the caller only stops waiting. `work` must own what it uses.
pub async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, sqlx::Error> {
    tokio::spawn(work).await.map_err(|error| sqlx::Error::Protocol(format!("transaction task failed: {error}")))
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://postgres@127.0.0.1/db"), "postgres://postgres@127.0.0.1/db");
    }
}
