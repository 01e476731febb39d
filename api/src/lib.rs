//! The ledger's API: GraphQL (queries, mutations, subscriptions and the feeds behind them) served over HTTP
//! by axum, with bearer-token auth, limits and metrics. The `ledger` binary (`src/bin/ledger`) runs it with
//! `ledger serve` and `ledger demo`; the lab (`lab/`, `ledger-lab`) measures and tortures it.
//!
//! | module | what |
//! |--------|------|
//! | [`app`] | one API instance: its state, feeds, server and shutdown |
//! | [`auth`] | bearer tokens and roles |
//! | [`graphql`] | the schema: queries, mutations, subscriptions and their feeds |
//! | [`http`] | the server, its routes, the WebSocket protocol, rate limits, `/metrics`, the dashboard |
//! | [`options`] | command-line options both binaries take (Kafka) |
//! | [`webhooks`] | the webhook deliverer: signed POSTs of the alert deliveries the library's outbox holds |

pub mod app;
pub mod auth;
pub mod graphql;
pub mod http;
pub mod options;
pub mod webhooks;
