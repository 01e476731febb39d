//! # ledger
//!
//! An event-sourced CQRS trading ledger. The layout, from the inside out:
//!
//! - [`domain`]: the Order and Portfolio aggregates (cqrs-es), their commands, events, errors and value
//!   types. No I/O.
//! - [`commands`]: the command service — the one way to change an aggregate: idempotency keys, per-aggregate
//!   serialisation, optimistic-lock retries, and one transaction per command in PostgreSQL.
//! - [`log`]: the event log reader every follower uses, in commit-safe `(transaction_id, global_position)`
//!   order.
//! - [`process`]: the process manager that coordinates Order and Portfolio through the log.
//! - [`execution`]: the paper-trading executor (fills, IOC/FOK cancels, Day expiry) through the broker's commands.
//! - [`import`]: statement import — a broker's trade history (CSV) booked on a portfolio, each row exactly once.
//! - [`relay`]: mirrors the log to Kafka (`ledger.events`), at least once, in per-aggregate order.
//! - [`kafka`]: Kafka settings and topic creation shared by the relay and the consumers.
//! - [`projections`]: read models built from the log.
//! - [`audit`]: the hash chain sealed over the log, exports (JSON Lines, CSV, Parquet) and their verification.
//! - [`webhooks`]: alert delivery by webhook — the endpoints and the delivery outbox.
//! - [`db`], [`clock`], [`metrics`], [`leadership`], [`trace`], [`retry`]: connections and migrations; where
//!   time comes from; latency histograms; one active instance of a singleton process (advisory lock); the W3C
//!   trace context that follows a request into its events and their projection; retry delays.
//!
//! The `ledger` binary (GraphQL API, workers and operations commands) lives in the `api` workspace member.

pub mod audit;
pub mod clock;
pub mod commands;
pub mod db;
pub mod domain;
pub mod execution;
pub mod import;
pub mod kafka;
pub mod leadership;
pub mod log;
pub mod market;
pub mod metrics;
pub mod process;
pub mod projections;
pub mod queries;
pub mod relay;
pub mod retry;
pub mod trace;
pub mod webhooks;
