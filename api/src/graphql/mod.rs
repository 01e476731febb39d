//! The GraphQL schema: roots split by area and merged.
//!
//! | area | queries | mutations | subscriptions |
//! |------|---------|-----------|---------------|
//! | portfolios | `myPortfolios`, `portfolio(id, asOf, atPosition, waitFor)`, `performance(portfolioId, from, to, interval)` | open, deposit, withdraw, alerts, importStatement | `portfolioUpdates`, `alertFired` |
//! | orders | `order(id, asOf, atPosition, waitFor)` | place, cancel, record execution | `orderUpdates` |
//! | market | `prices`, `priceHistory`, `indicators`, `movers` | — | `priceTicks` |
//! | log | `log`, aggregate `history`, `deadLetters` | — | `logEvents(after)` |
//! | operations | `processFailures`, `portfoliosInDeficit` | retry or dismiss a process failure; replay or discard a dead letter | — |
//! | webhooks | `webhooks(portfolioId)` with each one's `deliveries` | `createWebhook`, `removeWebhook` | — |
//!
//! Limits (named constants below): query depth, complexity, aliases, page size; request size and per-token
//! rate limits live in the HTTP layer (`crate::http`).

pub mod as_of;
pub mod errors;
pub mod feeds;
pub mod market;
pub mod mutation;
pub mod operations;
pub mod orders;
pub mod portfolio;
pub mod scalars;
pub mod subscription;
pub mod system;
pub mod types;
pub mod webhooks;

use std::sync::Arc;

use async_graphql::{Context, MergedObject, Schema};
use ledger::clock::Clock;
use ledger::commands::CommandService;
use sqlx::PgPool;

use crate::auth::Principal;
use errors::unauthenticated;
use feeds::Hub;

/// Deepest query accepted: enough for the standard introspection query (15 levels: GraphiQL and code
/// generators send it), and the complexity limit bounds the work whatever the depth.
pub const QUERY_DEPTH_MAX: usize = 16;
/// Highest query complexity accepted (each field costs 1; a list multiplies its items' cost by its page size,
/// or by a weight when it is not paginated).
pub const QUERY_COMPLEXITY_MAX: usize = 5_000;
/// Most aliases one operation may use (aliases multiply work without deepening the query).
pub const QUERY_ALIASES_MAX: usize = 30;
/// Items per page when a connection's `first` is not given.
pub const PAGE_SIZE_DEFAULT: usize = 20;
/// Items per page at most; a larger `first` is capped.
pub const PAGE_SIZE_MAX: usize = 100;
/// What an unpaginated list field counts for in the complexity limit: a multiple of its items' cost, as a
/// paginated field counts its page size. Positions are one per symbol held; executions one per fill.
pub const POSITIONS_WEIGHT: usize = 10;
pub const EXECUTIONS_WEIGHT: usize = 10;
/// Portfolios `myPortfolios` returns unless `first` says otherwise, and at most.
pub const MY_PORTFOLIOS_DEFAULT: usize = 100;
pub const MY_PORTFOLIOS_MAX: usize = 1_000;
/// Fields with `waitFor` one request may hold (each waits up to 5 s).
pub const WAIT_FOR_PER_REQUEST_MAX: usize = 1;
/// How long `placeOrder(waitForAcceptanceMs)` may wait at most.
pub const ACCEPTANCE_WAIT_MS_MAX: u64 = 10_000;
/// How often a mutation waiting for an order's acceptance looks at the order.
pub const ACCEPTANCE_POLL_MS: u64 = 10;

/// What resolvers share.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub commands: Arc<CommandService>,
    pub hub: Arc<Hub>,
    pub clock: Arc<dyn Clock>,
    pub valuation_stale_after: chrono::Duration,
    /// The read models' settings (a dead letter's replay runs its projection as the workers do).
    pub settings: ledger::projections::ProjectionSettings,
}

#[derive(MergedObject, Default)]
#[graphql(name = "Query")]
pub struct QueryRoot(
    portfolio::PortfolioQuery,
    orders::OrderQuery,
    market::MarketQuery,
    system::LogQuery,
    operations::OperationsQuery,
    webhooks::WebhookQuery,
);

#[derive(MergedObject, Default)]
#[graphql(name = "Mutation")]
pub struct MutationRoot(
    mutation::PortfolioMutation,
    mutation::OrderMutation,
    mutation::AlertMutation,
    operations::OperationsMutation,
    webhooks::WebhookMutation,
);

pub type LedgerSchema = Schema<QueryRoot, MutationRoot, subscription::SubscriptionRoot>;

#[derive(Debug, Clone)]
pub struct SchemaOptions {
    pub introspection: bool,
}

pub fn build_schema(state: AppState, options: &SchemaOptions) -> LedgerSchema {
    let mut builder = Schema::build(QueryRoot::default(), MutationRoot::default(), subscription::SubscriptionRoot)
        .data(async_graphql::dataloader::DataLoader::new(types::Loaders { pool: state.pool.clone() }, tokio::spawn))
        .data(state)
        .limit_depth(QUERY_DEPTH_MAX)
        .limit_complexity(QUERY_COMPLEXITY_MAX)
        .extension(system::QueryLimits::new(QUERY_ALIASES_MAX));
    if !options.introspection {
        builder = builder.disable_introspection();
    }
    builder.finish()
}

/// The schema as SDL (committed as `api/schema.graphql`).
pub fn sdl() -> String {
    Schema::build(QueryRoot::default(), MutationRoot::default(), subscription::SubscriptionRoot).finish().sdl()
}

pub(crate) fn state<'a>(ctx: &Context<'a>) -> &'a AppState {
    ctx.data_unchecked::<AppState>()
}

/// The authenticated caller (set by the HTTP layer or the WebSocket `connection_init`).
pub(crate) fn principal<'a>(ctx: &Context<'a>) -> async_graphql::Result<&'a Principal> {
    ctx.data_opt::<Principal>().ok_or_else(unauthenticated)
}

/// Ids of one HTTP request (set by the HTTP layer): every log line of the request carries them (JSON logs:
/// the `request` span's fields) and every event it writes records the correlation id in its metadata.
#[derive(Debug, Clone, Copy)]
pub struct RequestIds {
    /// W3C trace id (from the caller's `traceparent` header, or new).
    pub trace_id: u128,
    /// The request's own span id (new): what its commands record as their parent.
    pub span_id: u64,
    /// The caller's span, the parent of the request's (from its `traceparent`).
    pub caller_span_id: Option<u64>,
    /// The caller's trace flags (sampled when it sent none).
    pub trace_flags: u8,
    /// From the caller's `x-correlation-id` header (a UUID), or new.
    pub correlation_id: uuid::Uuid,
}

impl RequestIds {
    /// The request's span as the parent of what follows from it.
    pub fn traceparent(&self) -> ledger::trace::TraceParent {
        ledger::trace::TraceParent { trace_id: self.trace_id, span_id: self.span_id, flags: self.trace_flags }
    }
}

/// A command context for the caller, in the request's correlation and trace when there is one.
pub(crate) fn command_context(ctx: &Context<'_>, principal: &Principal) -> ledger::commands::CommandContext {
    let mut command = ledger::commands::CommandContext::new(principal.subject.clone());
    if let Some(ids) = ctx.data_opt::<RequestIds>() {
        command.correlation_id = ids.correlation_id;
        command.traceparent = Some(ids.traceparent());
    }
    command
}

/// Waits (at most [`portfolio::READ_WAIT_MS_MAX`]) until `read_model` shows `position` for the aggregate and
/// the process manager's reactions to it, woken by the hub's progress notifications; `NOT_YET_VISIBLE` when it
/// does not in time (see `ledger::projections::visibility`).
pub(crate) async fn wait_visible(
    state: &AppState,
    read_model: ledger::projections::visibility::ReadModel,
    aggregate_id: &str,
    position: ledger::log::LogPosition,
) -> async_graphql::Result<()> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(portfolio::READ_WAIT_MS_MAX);
    let hub = state.hub.clone();
    let woken = move || hub.next_progress();
    let visible = ledger::projections::visibility::wait_until_visible(
        &state.pool,
        read_model,
        aggregate_id,
        position,
        deadline,
        woken,
    )
    .await
    .map_err(errors::database)?;
    if visible {
        Ok(())
    } else {
        Err(errors::not_yet_visible())
    }
}

/// `first` for `myPortfolios`: [`MY_PORTFOLIOS_DEFAULT`] when absent, capped to [`MY_PORTFOLIOS_MAX`].
pub(crate) fn my_portfolios_limit(first: Option<i32>) -> usize {
    first.map_or(MY_PORTFOLIOS_DEFAULT, |n| n.max(1) as usize).min(MY_PORTFOLIOS_MAX)
}

/// `first` capped to [`PAGE_SIZE_MAX`] (and at least 1).
pub(crate) fn page_size(first: Option<i32>) -> usize {
    first.map_or(PAGE_SIZE_DEFAULT, |n| n.max(1) as usize).min(PAGE_SIZE_MAX)
}
