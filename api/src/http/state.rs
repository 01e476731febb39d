//! What every route of the server shares: the state built once by `server::router`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ledger::kafka::KafkaConfig;

use crate::auth::TokenKeys;
use crate::graphql::{AppState, LedgerSchema};
use crate::http::metrics::HttpMetrics;
use crate::http::ratelimit::RateLimiter;

/// Raw price sockets open per client address.
pub type SocketsByAddress = Arc<Mutex<HashMap<IpAddr, usize>>>;

pub struct ServerState {
    pub schema: LedgerSchema,
    pub app: AppState,
    pub keys: TokenKeys,
    /// Per token subject: HTTP requests and WebSocket operations.
    pub limiter: Arc<RateLimiter>,
    /// Per client address, before any token is looked at.
    pub address_limiter: RateLimiter,
    /// Failed authentications per client address.
    pub auth_failures: RateLimiter,
    pub subjects: Arc<crate::http::ws::SubjectCounts>,
    pub http: HttpMetrics,
    pub kafka: Option<KafkaConfig>,
    pub graphiql: bool,
    pub keep_alive: crate::http::ws::KeepAlive,
    pub public_market_data: bool,
    /// Raw price sockets open per client address.
    pub price_sockets: SocketsByAddress,
    /// The database-derived part of `/metrics` and when it was rendered.
    pub(super) metrics_cache: tokio::sync::Mutex<Option<(Instant, String)>>,
}
