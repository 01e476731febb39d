//! The HTTP server: GraphQL over HTTP and WebSocket, GraphiQL, health, readiness and metrics.
//!
//! | route | what |
//! |-------|------|
//! | `GET /` | the web dashboard (`/static/…` its files; the token in the URL fragment `#token=…`) |
//! | `POST /graphql` | queries and mutations; `Authorization: Bearer <token>` |
//! | `GET /graphql` | GraphiQL, served from the binary (only when introspection is on) |
//! | `GET /graphql/ws` | subscriptions (`graphql-transport-ws`; token in `connection_init`: `{"authorization": "Bearer …"}`; see `ws`) |
//! | `GET /healthz` | the process is up |
//! | `GET /readyz` | database reachable and migrated, broker reachable (when configured) |
//! | `GET /metrics` | Prometheus text (auditor or admin token; or without a token on `LEDGER_METRICS_LISTEN`) |
//! | `GET /audit/export` | the sealed audit trail as JSON Lines (auditor or admin; filters as query parameters) |
//! | `GET /api/v1/…` | market data over REST, and its OpenAPI document (see `market_data`) |
//! | `GET /ws/prices` | a raw WebSocket of price ticks as JSON (see `price_socket`) |
//!
//! Limits: request bodies of at most [`REQUEST_BODY_MAX_BYTES`](super::REQUEST_BODY_MAX_BYTES); a token bucket per client address, checked
//! before any token is looked at, and a strict one for failed authentications per address; a token bucket per
//! token subject (HTTP requests and WebSocket operations alike); query depth, complexity and aliases (see
//! `graphql`). Every refusal is a JSON GraphQL error with a stable `extensions.code`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::http::WebSocketProtocols;
use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql_axum::{GraphQLRequest, GraphQLResponse};
use axum::extract::{ConnectInfo, DefaultBodyLimit, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ledger::kafka::KafkaConfig;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenKeys;
use crate::graphql::{build_schema, AppState, RequestIds, SchemaOptions};
use crate::http::metrics::HttpMetrics;
use crate::http::ratelimit::RateLimiter;
use tracing::Instrument;

use super::access::{authenticate, error_response, rate_limited};
pub use super::state::ServerState;
use super::REQUEST_BODY_MAX_BYTES;

/// How long readiness checks may take.
const READY_CHECK_TIMEOUT_MS: u64 = 2_000;
/// Failed authentications one client address may make per second, and in a burst: beyond it, requests carrying
/// a token are refused (429) before the token is even checked.
pub const AUTH_FAILURES_PER_SECOND: u32 = 5;
pub const AUTH_FAILURES_BURST: u32 = 20;
/// How long the database-derived part of `/metrics` (lags, counts) is reused between scrapes.
pub const METRICS_CACHE_MS: u64 = 5_000;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub keys: TokenKeys,
    /// Schema introspection, and GraphiQL with it.
    pub introspection: bool,
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    pub rate_limit_per_address_per_second: u32,
    pub rate_limit_per_address_burst: u32,
    pub keep_alive: crate::http::ws::KeepAlive,
    /// The broker checked by `/readyz`, if any.
    pub kafka: Option<KafkaConfig>,
    /// Market data (`/api/v1/…`, `/ws/prices`) without a token (rate-limited per client address).
    pub public_market_data: bool,
}

pub fn router(app: AppState, config: ServerConfig) -> (Router, Arc<ServerState>) {
    let schema = build_schema(app.clone(), &SchemaOptions { introspection: config.introspection });
    let state = Arc::new(ServerState {
        schema,
        app,
        keys: config.keys,
        limiter: Arc::new(RateLimiter::new(config.rate_limit_per_second, config.rate_limit_burst)),
        address_limiter: RateLimiter::new(
            config.rate_limit_per_address_per_second,
            config.rate_limit_per_address_burst,
        ),
        auth_failures: RateLimiter::new(AUTH_FAILURES_PER_SECOND, AUTH_FAILURES_BURST),
        subjects: Arc::default(),
        http: HttpMetrics::default(),
        kafka: config.kafka,
        graphiql: config.introspection,
        keep_alive: config.keep_alive,
        public_market_data: config.public_market_data,
        price_sockets: Arc::default(),
        metrics_cache: tokio::sync::Mutex::new(None),
    });
    let router = Router::new()
        .route("/", get(crate::http::dashboard::index))
        .route("/static/{*path}", get(crate::http::dashboard::asset))
        .route("/graphql", get(graphiql).post(graphql))
        .route("/graphql/ws", get(subscriptions))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/audit/export", get(audit_export))
        .route("/ws/prices", get(crate::http::price_socket::upgrade))
        .merge(crate::http::market_data::routes())
        // The GraphQL extractor reads the body itself, so axum's DefaultBodyLimit alone would not apply.
        .layer(tower_http::limit::RequestBodyLimitLayer::new(REQUEST_BODY_MAX_BYTES))
        .layer(DefaultBodyLimit::max(REQUEST_BODY_MAX_BYTES))
        .with_state(state.clone());
    (router, state)
}

/// The router of the separate metrics listener (`LEDGER_METRICS_LISTEN`): `/metrics` without a token, for a
/// scraper on an internal network.
pub fn metrics_router(state: Arc<ServerState>) -> Router {
    Router::new().route("/metrics", get(open_metrics)).with_state(state)
}

/// Serves `router` on `listener` until `cancel` fires, finishing requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // No Nagle delay: a subscription's frame (or a response) written while the previous one is not yet
    // acknowledged would otherwise wait for that acknowledgement — up to a delayed ACK's 40 ms.
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

async fn graphiql(State(state): State<Arc<ServerState>>) -> Response {
    if !state.graphiql {
        return error_response(StatusCode::NOT_FOUND, "NOT_FOUND", "GraphiQL is off (LEDGER_INTROSPECTION=false)");
    }
    crate::http::dashboard::graphiql()
}

async fn graphql(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    request: GraphQLRequest<RequestRejected>,
) -> Response {
    let started = Instant::now();
    state.http.requests.fetch_add(1, Ordering::Relaxed);
    let ids = request_ids(&headers);
    // The span's ids are the request's own (see `RequestIds`): the `traceparent` answered and the one its
    // commands record name this span, so a projection's span is its child.
    let caller = ids.caller_span_id.map(|id| format!("{id:016x}")).unwrap_or_default();
    let span = tracing::info_span!("request", trace_id = %format!("{:032x}", ids.trace_id),
        span_id = %format!("{:016x}", ids.span_id), parent_span_id = %caller,
        correlation_id = %ids.correlation_id, subject = tracing::field::Empty);
    let mut response = graphql_in_span(&state, peer, &headers, request, ids).instrument(span).await;
    let response_headers = response.headers_mut();
    if let Ok(value) = ids.correlation_id.to_string().parse() {
        response_headers.insert("x-correlation-id", value);
    }
    if let Ok(value) = ids.traceparent().to_string().parse() {
        response_headers.insert("traceparent", value);
    }
    state.http.request_duration.observe(started.elapsed().as_secs_f64());
    response
}

/// The caller's W3C trace (`traceparent: 00-<trace id>-<parent id>-<flags>`) and correlation id
/// (`x-correlation-id`, a UUID) when given and well formed; new ones otherwise. The request's own span id is
/// new either way.
pub fn request_ids(headers: &HeaderMap) -> RequestIds {
    let caller = headers
        .get(ledger::trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(ledger::trace::TraceParent::parse);
    let trace_id = caller.map_or_else(|| rand::random::<u128>() | 1, |c| c.trace_id);
    let correlation_id = headers
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| uuid::Uuid::parse_str(v).ok())
        .unwrap_or_else(uuid::Uuid::now_v7);
    RequestIds {
        trace_id,
        span_id: rand::random::<u64>() | 1,
        caller_span_id: caller.map(|c| c.span_id),
        trace_flags: caller.map_or(ledger::trace::SAMPLED, |c| c.flags),
        correlation_id,
    }
}

async fn graphql_in_span(
    state: &ServerState,
    peer: SocketAddr,
    headers: &HeaderMap,
    request: GraphQLRequest<RequestRejected>,
    ids: RequestIds,
) -> Response {
    let principal = match authenticate(state, peer, headers) {
        Ok(verified) => verified.map(|(principal, _)| principal),
        Err(refusal) => return refusal.response(state),
    };
    let bucket = principal.as_ref().map_or_else(|| format!("ip:{}", peer.ip()), |p| format!("sub:{}", p.subject));
    if !state.limiter.allow(&bucket) {
        return rate_limited(state);
    }
    let mut request = request.into_inner().data(ids);
    if let Some(principal) = principal {
        tracing::Span::current().record("subject", principal.subject.as_str());
        request = request.data(principal);
    }
    let answer = state.schema.execute(request).await;
    if let Some(error) = answer.errors.first() {
        let code = match error.extensions.as_ref().and_then(|e| e.get("code")) {
            Some(async_graphql::Value::String(code)) => code.clone(),
            _ => String::new(),
        };
        tracing::debug!(errors = answer.errors.len(), %code, error = %error.message, "request answered with errors");
    }
    GraphQLResponse::from(answer).into_response()
}

/// A request the GraphQL extractor could not read (not JSON, not a GraphQL request, too large): answered with a
/// JSON error and a bounded generic message, never the parser's debug text.
pub struct RequestRejected(async_graphql::ParseRequestError);

impl From<async_graphql::ParseRequestError> for RequestRejected {
    fn from(error: async_graphql::ParseRequestError) -> Self {
        Self(error)
    }
}

impl IntoResponse for RequestRejected {
    fn into_response(self) -> Response {
        match self.0 {
            async_graphql::ParseRequestError::PayloadTooLarge => error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                &format!("the request body exceeds {REQUEST_BODY_MAX_BYTES} bytes"),
            ),
            error => {
                tracing::debug!(%error, "unreadable GraphQL request");
                error_response(
                    StatusCode::BAD_REQUEST,
                    "BAD_REQUEST",
                    "not a GraphQL request: send JSON {\"query\": …, \"variables\": …} as application/json",
                )
            }
        }
    }
}

#[derive(serde::Deserialize, Default)]
struct ConnectionInit {
    authorization: Option<String>,
    #[serde(alias = "Authorization")]
    authorization_capital: Option<String>,
    token: Option<String>,
}

async fn subscriptions(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !state.address_limiter.allow(&peer.ip().to_string()) {
        return rate_limited(&state);
    }
    let protocol = headers
        .get(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|value| value.to_str().ok())
        .and_then(|protocols| protocols.split(',').find_map(|p| p.trim().parse::<WebSocketProtocols>().ok()));
    let Some(protocol) = protocol else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "a WebSocket subprotocol is required: graphql-transport-ws (or graphql-ws)",
        );
    };
    let executor =
        crate::http::ws::SubscriptionExecutor { schema: state.schema.clone(), limiter: state.limiter.clone() };
    let keep_alive = state.keep_alive;
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(crate::http::ws::WS_MESSAGE_MAX_BYTES)
        .max_frame_size(crate::http::ws::WS_MESSAGE_MAX_BYTES)
        .read_buffer_size(crate::http::ws::WS_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            crate::http::ws::serve(socket, executor, protocol, keep_alive, move |payload| async move {
                let init: ConnectionInit = serde_json::from_value(payload).unwrap_or_default();
                let header =
                    init.authorization.or(init.authorization_capital).or(init.token.map(|t| format!("Bearer {t}")));
                let address = peer.ip().to_string();
                if state.auth_failures.exhausted(&address) {
                    return Err(async_graphql::Error::new("too many failed authentications; slow down"));
                }
                let (principal, expires_at) =
                    state.keys.verify_header_until(header.as_deref(), state.app.clock.now()).map_err(|e| {
                        state.auth_failures.allow(&address);
                        async_graphql::Error::new(format!("unauthenticated: {e}"))
                    })?;
                let socket =
                    crate::http::ws::SocketPermit::acquire(&state.subjects, &principal.subject).ok_or_else(|| {
                        async_graphql::Error::new(format!(
                            "too many sockets for this token (at most {})",
                            crate::http::ws::SOCKETS_PER_SUBJECT_MAX
                        ))
                    })?;
                Ok(Arc::new(crate::http::ws::Connection { principal, expires_at, socket: Arc::new(socket) }))
            })
        })
}

async fn ready(State(state): State<Arc<ServerState>>) -> Response {
    let timeout = Duration::from_millis(READY_CHECK_TIMEOUT_MS);
    let mut problems = Vec::new();
    let migrations = tokio::time::timeout(timeout, async {
        sqlx::query_as::<_, (i64, bool)>("select count(*), coalesce(bool_and(success), true) from _sqlx_migrations")
            .fetch_one(&state.app.pool)
            .await
    })
    .await;
    match migrations {
        Ok(Ok((applied, success))) => {
            let known = ledger::db::MIGRATOR.iter().count() as i64;
            if applied < known || !success {
                problems.push(format!("migrations: {applied} of {known} applied"));
            }
        }
        Ok(Err(error)) => problems.push(format!("database: {error}")),
        Err(_) => problems.push("database: no answer".into()),
    }
    if let Some(kafka) = &state.kafka {
        if let Err(error) = kafka.cluster_id(timeout).await {
            problems.push(format!("broker: {error}"));
        }
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n")).into_response()
    }
}

/// `/metrics` on the API listener: auditors and admins only (or use `LEDGER_METRICS_LISTEN`).
async fn metrics(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    match authenticate(&state, peer, &headers) {
        Ok(Some((principal, _))) if principal.can_read_log() => {}
        Ok(Some(_)) => {
            return error_response(StatusCode::FORBIDDEN, "FORBIDDEN", "metrics are for auditors and admins")
        }
        Ok(None) => {
            return error_response(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", "a valid bearer token is required")
        }
        Err(refusal) => return refusal.response(&state),
    }
    open_metrics(State(state)).await
}

/// `/metrics` without authentication (the separate metrics listener, or after the check above). The database
/// part is rendered at most once per [`METRICS_CACHE_MS`], however often it is scraped.
async fn open_metrics(State(state): State<Arc<ServerState>>) -> Response {
    let database_part = {
        let mut cache = state.metrics_cache.lock().await;
        match cache.as_ref() {
            Some((at, text)) if at.elapsed() < Duration::from_millis(METRICS_CACHE_MS) => text.clone(),
            _ => {
                let text = crate::http::metrics::render_database(&state.app.pool).await;
                *cache = Some((Instant::now(), text.clone()));
                text
            }
        }
    };
    let body = crate::http::metrics::render(&state.app, &state.http) + &database_part;
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Filters of `GET /audit/export`, as `ledger export` takes them: `from_position`, `to_position`, `from_time`,
/// `to_time` (RFC 3339 or a date), `aggregate`, `portfolio`.
#[derive(serde::Deserialize, Default)]
struct AuditExportQuery {
    from_position: Option<i64>,
    to_position: Option<i64>,
    from_time: Option<String>,
    to_time: Option<String>,
    aggregate: Option<String>,
    portfolio: Option<String>,
}

impl AuditExportQuery {
    fn filter(self) -> Result<ledger::audit::ExportFilter, String> {
        let time = |text: Option<String>| text.map(|t| ledger::audit::filter::parse_time(&t)).transpose();
        let portfolio = self
            .portfolio
            .map(|p| uuid::Uuid::parse_str(&p).map_err(|_| format!("portfolio {p:?} is not a UUID")))
            .transpose()?;
        let filter = ledger::audit::ExportFilter {
            from_position: self.from_position,
            to_position: self.to_position,
            from_time: time(self.from_time)?,
            to_time: time(self.to_time)?,
            aggregate_id: self.aggregate,
            portfolio_id: portfolio,
        };
        filter.validate().map_err(|e| e.to_string())?;
        Ok(filter)
    }
}

/// Streams the sealed audit trail as JSON Lines (the lines `ledger export --format jsonl` writes), after
/// sealing everything committed before the request. The chain head it sealed to is in the response headers
/// `x-ledger-chain-count`, `x-ledger-chain-position` and `x-ledger-chain-hash`.
async fn audit_export(
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<AuditExportQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let principal = match authenticate(&state, peer, &headers) {
        Ok(Some((principal, _))) => principal,
        Ok(None) => {
            return error_response(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", "a valid bearer token is required")
        }
        Err(refusal) => return refusal.response(&state),
    };
    if !principal.can_read_log() {
        return error_response(StatusCode::FORBIDDEN, "FORBIDDEN", "the audit trail is for auditors and admins");
    }
    if !state.limiter.allow(&format!("sub:{}", principal.subject)) {
        return rate_limited(&state);
    }
    let filter = match query.map_err(|e| e.body_text()).and_then(|q| q.0.filter()) {
        Ok(filter) => filter,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, "BAD_REQUEST", &message),
    };
    let head = match ledger::audit::seal_until_head(&state.app.pool).await {
        Ok(head) => head,
        Err(error) => {
            tracing::error!(%error, "sealing before an audit export failed");
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the audit chain could not be sealed; retry",
            );
        }
    };
    let stream = match ledger::audit::jsonl_stream(state.app.pool.clone(), filter).await {
        Ok(stream) => stream,
        Err(error) if error.is_user_error() => {
            return error_response(StatusCode::BAD_REQUEST, "BAD_REQUEST", &error.to_string())
        }
        Err(error) => {
            tracing::error!(%error, "starting an audit export failed");
            return error_response(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "internal error");
        }
    };
    let body = axum::body::Body::from_stream(futures::TryStreamExt::inspect_err(stream, |error| {
        // The status line is sent already: the client sees a truncated body (and no final newline).
        tracing::error!(%error, "an audit export stream failed midway");
    }));
    (
        [
            (axum::http::header::CONTENT_TYPE, "application/x-ndjson".to_string()),
            (axum::http::HeaderName::from_static("x-ledger-chain-count"), head.event_count.to_string()),
            (axum::http::HeaderName::from_static("x-ledger-chain-position"), head.position.to_string()),
            (axum::http::HeaderName::from_static("x-ledger-chain-hash"), head.hash.to_string()),
        ],
        body,
    )
        .into_response()
}
