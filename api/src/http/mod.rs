//! The HTTP face of the API: the axum server and its routes (`server`, with the state they share in `state` and
//! who may in: `access`), the GraphQL WebSocket protocol, the public market-data surface (REST and a raw price
//! WebSocket), rate limits, the `/metrics` exposition, the dashboard's static files, and the outgoing POSTs
//! (`client`: webhooks, trace export).

pub mod access;
pub mod client;
pub mod dashboard;
pub mod market_data;
pub mod metrics;
pub mod price_socket;
pub mod ratelimit;
pub mod server;
pub mod state;
pub mod ws;

/// Largest request body accepted, and largest WebSocket message: one bound for what a client may send at once.
pub const REQUEST_BODY_MAX_BYTES: usize = 256 * 1024;
