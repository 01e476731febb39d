//! Alert delivery by webhook: the endpoints a portfolio's owner registers, and the delivery outbox.
//!
//! Every alert firing of a portfolio (the deficit notice included) becomes one delivery per live endpoint, written
//! by a trigger in the transaction that records the firing (`migrations/0008_webhooks.sql`): nothing is lost on a
//! crash and nothing is enqueued twice. A deliverer (`ledger webhooks`, or `ledger serve --with-webhooks`; any
//! number may run) claims due deliveries with a lease ([`LEASE_SECONDS_DEFAULT`]) — committed at once, so no transaction
//! stays open during the HTTP call —, POSTs each stored body as it is (the same bytes and delivery id on every
//! attempt: at least once, and receivers deduplicate by id), and records the outcome here. A failure is retried
//! after a delay doubling from [`WebhookPolicy::retry_first_delay`] up to [`RETRY_DELAY_MAX_MS`]; a delivery
//! still failing [`WebhookPolicy::retry_for`] after it was created is dead. The HTTP side (signing, posting,
//! refusing private addresses) is the API crate's `webhooks` module.
//!
//! Endpoints are delivery settings, not ledger facts: a plain table, not events (they are not replayed, and a
//! rebuild of the read models does not deliver anything again — firings are not rebuilt).

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// Live endpoints one portfolio may have.
pub const WEBHOOKS_PER_PORTFOLIO_MAX: i64 = 10;
/// Longest endpoint URL accepted.
pub const URL_LEN_MAX: usize = 2_048;
/// Bytes of randomness in an endpoint's secret (hex-encoded: twice as many characters).
pub const SECRET_BYTES: usize = 32;
/// How long a claimed delivery is held by its deliverer before another may take it over, by default.
pub const LEASE_SECONDS_DEFAULT: u64 = 60;
/// Longest wait between two attempts of one delivery.
pub const RETRY_DELAY_MAX_MS: i64 = 600_000;
/// Characters of an error kept with a delivery.
pub const ERROR_LEN_MAX: usize = 300;
/// Deliveries listed per endpoint, at most.
pub const DELIVERIES_LISTED_MAX: i64 = 100;

/// How deliveries are retried.
#[derive(Debug, Clone, Copy)]
pub struct WebhookPolicy {
    /// Wait before the second attempt; doubled for each further one, up to [`RETRY_DELAY_MAX_MS`].
    pub retry_first_delay: Duration,
    /// A delivery still failing this long after it was created is dead.
    pub retry_for: Duration,
}

impl Default for WebhookPolicy {
    fn default() -> Self {
        Self { retry_first_delay: Duration::seconds(1), retry_for: Duration::hours(24) }
    }
}

impl WebhookPolicy {
    /// The wait after `attempts` failed attempts (≥ 1).
    pub fn delay_after(&self, attempts: i32) -> Duration {
        let doublings = attempts.saturating_sub(1).clamp(0, 30) as u32;
        let delay = self.retry_first_delay.num_milliseconds().saturating_mul(1_i64 << doublings);
        Duration::milliseconds(delay.clamp(0, RETRY_DELAY_MAX_MS))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    InvalidUrl(String),
    #[error("a portfolio has at most {WEBHOOKS_PER_PORTFOLIO_MAX} webhooks")]
    TooMany,
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// One registered endpoint (without its secret, which is shown only when it is created).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct WebhookRow {
    pub webhook_id: Uuid,
    pub portfolio_id: Uuid,
    pub url: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub removed_at: Option<DateTime<Utc>>,
}

/// One delivery of a firing to an endpoint, as its log shows it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DeliveryRow {
    pub delivery_id: Uuid,
    pub webhook_id: Uuid,
    pub firing_id: Uuid,
    /// `pending`, `delivered` or `dead`.
    pub status: String,
    pub attempts: i32,
    /// The HTTP status of the last attempt, if it got an answer.
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A delivery claimed for one attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueDelivery {
    pub delivery_id: Uuid,
    pub url: String,
    pub secret: String,
    pub body: String,
    /// Attempts including this one.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
}

/// Checks an endpoint URL: `http://` or `https://` with a host, no credentials, at most [`URL_LEN_MAX`].
pub fn check_url(url: &str) -> Result<(), WebhookError> {
    let invalid = |reason: &str| Err(WebhookError::InvalidUrl(format!("webhook url: {reason}")));
    if url.len() > URL_LEN_MAX {
        return invalid(&format!("longer than {URL_LEN_MAX} bytes"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return invalid("contains white space or control characters");
    }
    let Some((scheme, rest)) = url.split_once("://") else { return invalid("give the scheme, https:// or http://") };
    if !matches!(scheme, "http" | "https") {
        return invalid("only https:// and http:// are delivered to");
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return invalid("credentials in the URL are not accepted (the signature authenticates the ledger)");
    }
    if authority.is_empty() || authority.starts_with(':') {
        return invalid("no host");
    }
    Ok(())
}

/// Registers an endpoint of `portfolio_id`; returns it with its new secret (hex), which is not shown again.
pub async fn register(
    pool: &PgPool,
    portfolio_id: Uuid,
    url: &str,
    created_by: &str,
) -> Result<(WebhookRow, String), WebhookError> {
    check_url(url)?;
    // `thread_rng` (behind `random`) is a CSPRNG seeded from the operating system.
    let secret = hex::encode(rand::random::<[u8; SECRET_BYTES]>());
    let mut tx = pool.begin().await?;
    // One registration per portfolio at a time, so the count below cannot be raced past the limit.
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('ledger.webhooks.' || $1::text, 0))")
        .bind(portfolio_id)
        .execute(&mut *tx)
        .await?;
    let live: i64 =
        sqlx::query_scalar("select count(*) from webhook_endpoints where portfolio_id = $1 and removed_at is null")
            .bind(portfolio_id)
            .fetch_one(&mut *tx)
            .await?;
    if live >= WEBHOOKS_PER_PORTFOLIO_MAX {
        return Err(WebhookError::TooMany);
    }
    let row: WebhookRow = sqlx::query_as(
        "insert into webhook_endpoints (webhook_id, portfolio_id, url, secret, created_by)
         values ($1, $2, $3, $4, $5)
         returning webhook_id, portfolio_id, url, created_by, created_at, removed_at",
    )
    .bind(Uuid::new_v4())
    .bind(portfolio_id)
    .bind(url)
    .bind(&secret)
    .bind(created_by)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((row, secret))
}

/// An endpoint by id (removed ones too).
pub async fn webhook(pool: &PgPool, webhook_id: Uuid) -> Result<Option<WebhookRow>, sqlx::Error> {
    sqlx::query_as(
        "select webhook_id, portfolio_id, url, created_by, created_at, removed_at
           from webhook_endpoints where webhook_id = $1",
    )
    .bind(webhook_id)
    .fetch_optional(pool)
    .await
}

/// The live endpoints of a portfolio, oldest first.
pub async fn webhooks(pool: &PgPool, portfolio_id: Uuid) -> Result<Vec<WebhookRow>, sqlx::Error> {
    sqlx::query_as(
        "select webhook_id, portfolio_id, url, created_by, created_at, removed_at
           from webhook_endpoints where portfolio_id = $1 and removed_at is null order by created_at, webhook_id",
    )
    .bind(portfolio_id)
    .fetch_all(pool)
    .await
}

/// Removes an endpoint: no new deliveries, and its pending ones are not attempted again (they stay in its
/// log). True if it was live.
pub async fn remove(pool: &PgPool, webhook_id: Uuid) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let removed =
        sqlx::query("update webhook_endpoints set removed_at = now() where webhook_id = $1 and removed_at is null")
            .bind(webhook_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
    sqlx::query(
        "update webhook_deliveries set status = 'dead', last_error = 'the webhook was removed', finished_at = now()
          where webhook_id = $1 and status = 'pending'",
    )
    .bind(webhook_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(removed)
}

/// The newest `limit` deliveries to an endpoint (at most [`DELIVERIES_LISTED_MAX`]), newest first.
pub async fn deliveries(pool: &PgPool, webhook_id: Uuid, limit: i64) -> Result<Vec<DeliveryRow>, sqlx::Error> {
    sqlx::query_as(
        "select delivery_id, webhook_id, firing_id, status, attempts, last_status, last_error, next_attempt_at,
                created_at, finished_at
           from webhook_deliveries where webhook_id = $1 order by created_at desc, delivery_id limit $2",
    )
    .bind(webhook_id)
    .bind(limit.clamp(1, DELIVERIES_LISTED_MAX))
    .fetch_all(pool)
    .await
}

/// Claims up to `limit` due deliveries for one attempt each: their lease starts and their attempt is counted
/// (committed before any is sent, so a crash mid-call shows as an attempt, and the lease's end frees them).
pub async fn claim_due(pool: &PgPool, limit: i64, lease: std::time::Duration) -> Result<Vec<DueDelivery>, sqlx::Error> {
    // One statement: the due deliveries of live endpoints are leased; those of a removed endpoint (a firing
    // that committed while the endpoint was being removed) die instead.
    sqlx::query_as(
        "with due as (
             select delivery_id from webhook_deliveries
              where status = 'pending' and next_attempt_at <= now() and (leased_until is null or leased_until < now())
              order by next_attempt_at limit $1 for update skip locked),
         removed as (
             update webhook_deliveries d
                set status = 'dead', last_error = 'the webhook was removed', finished_at = now()
               from due, webhook_endpoints e
              where d.delivery_id = due.delivery_id and e.webhook_id = d.webhook_id and e.removed_at is not null)
         update webhook_deliveries d
            set attempts = d.attempts + 1, leased_until = now() + make_interval(secs => $2)
           from due, webhook_endpoints e
          where d.delivery_id = due.delivery_id and e.webhook_id = d.webhook_id and e.removed_at is null
         returning d.delivery_id, e.url, e.secret, d.body, d.attempts, d.created_at",
    )
    .bind(limit)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// The outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The endpoint answered 2xx.
    Delivered { status: u16 },
    /// No answer, or another status.
    Failed { status: Option<u16>, error: String },
}

/// Records an attempt of a claimed delivery: delivered; or failed, to be retried after the policy's delay, or
/// dead once the policy's time is up. Returns the delivery's status afterwards. Fenced by the attempt number: a
/// deliverer whose lease ran out (and whose delivery another one claimed again) changes nothing.
pub async fn record(
    pool: &PgPool,
    due: &DueDelivery,
    attempt: &Attempt,
    policy: &WebhookPolicy,
    now: DateTime<Utc>,
) -> Result<&'static str, sqlx::Error> {
    let (status, code, error, next) = match attempt {
        Attempt::Delivered { status } => ("delivered", Some(*status), None, now),
        Attempt::Failed { status, error } => {
            let next = now + policy.delay_after(due.attempts);
            let dead = next > due.created_at + policy.retry_for;
            let error: String = error.chars().take(ERROR_LEN_MAX).collect();
            (if dead { "dead" } else { "pending" }, *status, Some(error), next)
        }
    };
    sqlx::query(
        "update webhook_deliveries
            set status = $2, last_status = $3, last_error = $4, next_attempt_at = $5, leased_until = null,
                finished_at = case when $2 = 'pending' then null else now() end
          where delivery_id = $1 and status = 'pending' and attempts = $6",
    )
    .bind(due.delivery_id)
    .bind(status)
    .bind(code.map(i32::from))
    .bind(error)
    .bind(next)
    .bind(due.attempts)
    .execute(pool)
    .await?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let policy = WebhookPolicy { retry_first_delay: Duration::seconds(1), retry_for: Duration::hours(24) };
        let waits: Vec<i64> = (1..=4).map(|a| policy.delay_after(a).num_seconds()).collect();
        assert_eq!(waits, [1, 2, 4, 8]);
        assert_eq!(policy.delay_after(40).num_milliseconds(), RETRY_DELAY_MAX_MS);
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("https://hooks.example.com/ledger?x=1").is_ok());
        assert!(check_url("http://127.0.0.1:9000/hook").is_ok());
        for bad in ["ftp://x", "hooks.example.com", "https://user:pw@example.com/", "https:///path", "https://a b"] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert!(check_url(&format!("https://example.com/{}", "a".repeat(URL_LEN_MAX))).is_err());
    }
}
