//! Alert webhooks: a portfolio's owner (or an admin) registers and removes endpoints; whoever may read the
//! portfolio sees them and their delivery log. The secret that signs the deliveries is shown once, in
//! `createWebhook`'s answer. Delivery itself is `crate::webhooks`; the outbox is `ledger::webhooks`.

use async_graphql::{ComplexObject, Context, Enum, Object, Result, SimpleObject};
use chrono::{DateTime, Utc};
use ledger::webhooks::{self as outbox, DeliveryRow, WebhookError, WebhookRow};
use uuid::Uuid;

use super::errors::{coded, database, forbidden, invalid, not_found};
use super::mutation::authorize_portfolio;
use super::orders::portfolio_owner;
use super::{page_size, principal, state};

/// A registered endpoint.
#[derive(SimpleObject, Clone, Debug)]
#[graphql(complex)]
pub struct Webhook {
    pub id: Uuid,
    pub portfolio_id: Uuid,
    pub url: String,
    /// The token subject that registered it.
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    /// Set once it is removed (it then receives nothing more).
    pub removed_at: Option<DateTime<Utc>>,
}

impl From<WebhookRow> for Webhook {
    fn from(row: WebhookRow) -> Self {
        let WebhookRow { webhook_id: id, portfolio_id, url, created_by, created_at, removed_at } = row;
        Webhook { id, portfolio_id, url, created_by, created_at, removed_at }
    }
}

#[ComplexObject]
impl Webhook {
    /// Its newest deliveries, newest first (at most 100).
    #[graphql(complexity = "super::page_size(first) * child_complexity")]
    async fn deliveries(&self, ctx: &Context<'_>, first: Option<i32>) -> Result<Vec<WebhookDelivery>> {
        let rows = outbox::deliveries(&state(ctx).pool, self.id, page_size(first) as i64).await.map_err(database)?;
        rows.into_iter().map(WebhookDelivery::try_from).collect()
    }
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Not delivered yet: waiting for its next attempt.
    Pending,
    /// The endpoint answered 2xx.
    Delivered,
    /// Retried for the whole retry period without success, or its webhook was removed.
    Dead,
}

/// One firing's delivery to an endpoint.
#[derive(SimpleObject, Clone, Debug)]
pub struct WebhookDelivery {
    /// Sent as `Ledger-Delivery-Id` (and the body's `id`): the same on every attempt.
    pub id: Uuid,
    pub firing_id: Uuid,
    pub status: DeliveryStatus,
    pub attempts: i32,
    /// The HTTP status of the last attempt, if it got an answer.
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    /// When a pending delivery is attempted next.
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl TryFrom<DeliveryRow> for WebhookDelivery {
    type Error = async_graphql::Error;

    fn try_from(row: DeliveryRow) -> Result<Self> {
        let status = match row.status.as_str() {
            "pending" => DeliveryStatus::Pending,
            "delivered" => DeliveryStatus::Delivered,
            "dead" => DeliveryStatus::Dead,
            other => return Err(super::errors::internal(format!("unknown delivery status {other:?}"))),
        };
        Ok(WebhookDelivery {
            id: row.delivery_id,
            firing_id: row.firing_id,
            status,
            attempts: row.attempts,
            last_status: row.last_status,
            last_error: row.last_error,
            next_attempt_at: row.next_attempt_at,
            created_at: row.created_at,
            finished_at: row.finished_at,
        })
    }
}

/// What `createWebhook` answers.
#[derive(SimpleObject, Clone, Debug)]
pub struct CreatedWebhook {
    pub webhook: Webhook,
    /// The HMAC-SHA256 key of the `Ledger-Signature` header (64 hex characters). Shown only here: keep it.
    pub secret: String,
}

#[derive(Default)]
pub struct WebhookQuery;

#[Object]
impl WebhookQuery {
    /// The live webhooks of a portfolio, oldest first (owner, auditors, admins).
    async fn webhooks(&self, ctx: &Context<'_>, portfolio_id: Uuid) -> Result<Vec<Webhook>> {
        let (principal, state) = (principal(ctx)?, state(ctx));
        if !principal.can_read_portfolios() {
            return Err(forbidden());
        }
        match portfolio_owner(state, portfolio_id).await? {
            Some(owner) if principal.can_read_portfolio(&owner) => {}
            _ => return Ok(Vec::new()),
        }
        let rows = outbox::webhooks(&state.pool, portfolio_id).await.map_err(database)?;
        Ok(rows.into_iter().map(Webhook::from).collect())
    }
}

#[derive(Default)]
pub struct WebhookMutation;

#[Object]
impl WebhookMutation {
    /// Registers an endpoint to which every alert firing of the portfolio (and its deficit notices) is POSTed,
    /// signed; at most 10 per portfolio. Not keyed: a repeated request registers another endpoint (remove it).
    async fn create_webhook(&self, ctx: &Context<'_>, portfolio_id: Uuid, url: String) -> Result<CreatedWebhook> {
        let (principal, state) = (principal(ctx)?, state(ctx));
        authorize_portfolio(state, principal, portfolio_id).await?;
        match outbox::register(&state.pool, portfolio_id, &url, &principal.subject).await {
            Ok((row, secret)) => Ok(CreatedWebhook { webhook: row.into(), secret }),
            Err(WebhookError::InvalidUrl(reason)) => Err(invalid(reason)),
            Err(error @ WebhookError::TooMany) => Err(coded("LIMIT_EXCEEDED", error.to_string())),
            Err(WebhookError::Database(error)) => Err(database(error)),
        }
    }

    /// Removes an endpoint: it receives nothing more, and its pending deliveries are not attempted again.
    async fn remove_webhook(&self, ctx: &Context<'_>, webhook_id: Uuid) -> Result<Webhook> {
        let (principal, state) = (principal(ctx)?, state(ctx));
        let webhook = outbox::webhook(&state.pool, webhook_id).await.map_err(database)?;
        if !principal.can_trade() {
            return Err(forbidden());
        }
        let Some(webhook) = webhook.filter(|w| w.removed_at.is_none()) else { return Err(not_found("webhook")) };
        // Another owner's webhook answers like an unknown one.
        authorize_portfolio(state, principal, webhook.portfolio_id).await.map_err(|_| not_found("webhook"))?;
        outbox::remove(&state.pool, webhook_id).await.map_err(database)?;
        let removed = outbox::webhook(&state.pool, webhook_id).await.map_err(database)?;
        removed.map(Webhook::from).ok_or_else(|| not_found("webhook"))
    }
}
