//! The ledger's API: GraphQL (queries, mutations, subscriptions) on axum, bearer-token auth, the subscription
//! feeds, limits and metrics. The `ledger` binary (`src/main.rs`) runs it with `ledger serve` and `ledger demo`.

pub mod app;
pub mod auth;
pub mod dashboard;
pub mod graphql;
pub mod hub;
pub mod metrics;
pub mod ratelimit;
pub mod server;
pub mod ws;
