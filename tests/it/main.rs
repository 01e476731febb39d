//! Integration tests against a real PostgreSQL (and, from the relay on, a real Kafka-protocol broker).
//! One test binary for the crate: each binary links the whole dependency tree, so we build it once.

mod audit;
mod batch;
mod commands;
mod execution;
mod fills;
mod group_commit;
mod log_order;
mod process_manager;
mod projections;
mod relay;
mod schema_evolution;
mod support;
