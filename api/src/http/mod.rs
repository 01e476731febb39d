//! The HTTP face of the API: the axum server and its routes, the GraphQL WebSocket protocol, rate limits, the
//! `/metrics` exposition and the dashboard's static files.

pub mod dashboard;
pub mod metrics;
pub mod ratelimit;
pub mod server;
pub mod ws;

/// Largest request body accepted, and largest WebSocket message: one bound for what a client may send at once.
pub const REQUEST_BODY_MAX_BYTES: usize = 256 * 1024;
