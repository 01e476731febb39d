//! The `ledger` binary, run as users run it, against a real PostgreSQL.

mod accounting;
mod cli;
mod crash;
mod dead_letters;
mod demo;
mod graphql;
mod import;
mod market_data;
mod performance;
mod security;
mod subscriptions;
mod support;
mod webhooks;
