//! The market-data surface for clients that speak neither GraphQL nor tokens: read-only REST under `/api/v1`
//! and its OpenAPI 3 document (generated from these handlers and types; committed as `api/openapi.json`, which a
//! test compares with it). The raw price WebSocket is `crate::http::price_socket`.
//!
//! | route | answer |
//! |-------|--------|
//! | `GET /api/v1/prices` | `{"prices": [Price]}`: every symbol's latest price, by symbol |
//! | `GET /api/v1/prices/{symbol}` | `Price`; 404 when the symbol has no price |
//! | `GET /api/v1/prices/{symbol}/history?limit=&interval=` | `{"symbol", "interval", "points": [PricePoint]}`, oldest first |
//! | `GET /api/v1/symbols` | `{"symbols": ["AAPL", …]}`: the symbols with a price |
//! | `GET /api/v1/openapi.json` | this surface's OpenAPI 3 document |
//!
//! Decimals are JSON strings (exact), times RFC 3339 in UTC. Access: every request is first counted against
//! its client address's rate limit; then, unless market data is public (`LEDGER_PUBLIC_MARKET_DATA`, on in
//! `ledger demo`), it needs a valid bearer token of any role (and counts against its subject's limit). Errors
//! have the body every route of the server answers with: `{"errors": [{"message", "extensions": {"code"}}]}`
//! with `BAD_REQUEST` (400), `UNAUTHENTICATED` (401), `NOT_FOUND` (404), `RATE_LIMITED` (429) or `INTERNAL`
//! (500).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use ledger::domain::values::Symbol;
use ledger::queries::market::{self as queries, HistoryInterval};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use super::access::{error_response, Admitted};
use super::state::ServerState;
use crate::graphql::market::HISTORY_POINTS_MAX;

/// Points a history answers with when no `limit` is given.
pub const HISTORY_POINTS_DEFAULT: u32 = 100;

/// The routes of this surface.
pub fn routes() -> Router<Arc<ServerState>> {
    Router::new()
        .route("/api/v1/prices", get(prices))
        .route("/api/v1/prices/{symbol}", get(price))
        .route("/api/v1/prices/{symbol}/history", get(price_history))
        .route("/api/v1/symbols", get(symbols))
        .route("/api/v1/openapi.json", get(openapi))
}

/// The OpenAPI 3 document of this surface, as committed in `api/openapi.json`.
pub fn openapi_json() -> String {
    // The document is built from static types: serialising it cannot fail.
    MarketDataApi::openapi().to_pretty_json().unwrap_or_default() + "\n"
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ledger market data",
        description = "Read-only market data of a ledger: latest prices, a symbol's history, the symbols. \
                       Decimals are JSON strings. Without a token when the server's market data is public \
                       (LEDGER_PUBLIC_MARKET_DATA); otherwise with a bearer token of any role.",
        license(name = "Apache-2.0")
    ),
    paths(prices, price, price_history, symbols),
    modifiers(&BearerToken),
    tags((name = "market data", description = "Prices as the prices projection keeps them."))
)]
struct MarketDataApi;

/// Declares the optional bearer token.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// A symbol's latest price.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Price {
    #[schema(example = "AAPL")]
    pub symbol: String,
    #[schema(value_type = String, example = "190.12")]
    pub price: Decimal,
    /// Time of the tick.
    pub timestamp: DateTime<Utc>,
    /// The tick's sequence number at its source.
    pub seq: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PriceList {
    pub prices: Vec<Price>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SymbolList {
    /// Every symbol with a price, in order.
    pub symbols: Vec<String>,
}

/// The grain of a price history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    /// Every tick kept (the newest ones).
    Tick,
    /// One-minute OHLC bars.
    Minute,
}

/// One point of a price history: a tick (open = high = low = close) or a one-minute bar.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PricePoint {
    pub time: DateTime<Utc>,
    #[schema(value_type = String)]
    pub open: Decimal,
    #[schema(value_type = String)]
    pub high: Decimal,
    #[schema(value_type = String)]
    pub low: Decimal,
    #[schema(value_type = String)]
    pub close: Decimal,
    #[schema(value_type = String)]
    pub volume: Decimal,
    /// Ticks in the point (1 for a tick).
    pub ticks: i32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PriceHistory {
    pub symbol: String,
    pub interval: Interval,
    /// Oldest first.
    pub points: Vec<PricePoint>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// The newest this many points, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `tick` (default) or `minute`.
    pub interval: Option<Interval>,
}

/// The refusals every market-data route may answer with, before it looks at the request.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only documents the responses
enum Refused {
    /// Market data is not public here and no valid token was given
    #[response(status = 401)]
    Unauthenticated(ErrorBody),
    /// Too many requests from this address (or token)
    #[response(status = 429)]
    RateLimited(ErrorBody),
}

/// The error body of every route (as GraphQL errors are shaped).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub errors: Vec<ErrorEntry>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorEntry {
    pub message: String,
    pub extensions: ErrorCode,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorCode {
    /// `BAD_REQUEST`, `UNAUTHENTICATED`, `NOT_FOUND`, `RATE_LIMITED` or `INTERNAL`.
    pub code: String,
}

impl From<queries::PriceRow> for Price {
    fn from(row: queries::PriceRow) -> Self {
        Price { symbol: row.symbol, price: row.price, timestamp: row.as_of, seq: row.seq }
    }
}

impl From<queries::PricePointRow> for PricePoint {
    fn from(row: queries::PricePointRow) -> Self {
        let queries::PricePointRow { time, open, high, low, close, volume, ticks } = row;
        PricePoint { time, open, high, low, close, volume, ticks }
    }
}

/// Why a market-data request failed after it was let in.
enum Failure {
    BadRequest(String),
    NotFound(String),
    Database(sqlx::Error),
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        match self {
            Failure::BadRequest(message) => error_response(StatusCode::BAD_REQUEST, "BAD_REQUEST", &message),
            Failure::NotFound(symbol) => {
                error_response(StatusCode::NOT_FOUND, "NOT_FOUND", &format!("no price for symbol {symbol}"))
            }
            Failure::Database(error) => {
                tracing::error!(%error, "market data read failed");
                error_response(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "reading market data failed")
            }
        }
    }
}

/// Every symbol's latest price.
#[utoipa::path(
    get,
    path = "/api/v1/prices",
    tag = "market data",
    responses(
        (status = 200, description = "Every symbol's latest price, by symbol (at most 1,000)", body = PriceList),
        Refused,
    ),
    security((), ("bearer" = []))
)]
async fn prices(_: Admitted, State(state): State<Arc<ServerState>>) -> Result<Json<PriceList>, Failure> {
    let rows = queries::latest_prices(&state.app.pool, None).await.map_err(Failure::Database)?;
    Ok(Json(PriceList { prices: rows.into_iter().map(Price::from).collect() }))
}

/// A symbol's latest price.
#[utoipa::path(
    get,
    path = "/api/v1/prices/{symbol}",
    tag = "market data",
    params(("symbol" = String, Path, description = "Ticker symbol, e.g. AAPL")),
    responses(
        (status = 200, description = "The symbol's latest price", body = Price),
        (status = 400, description = "Not a symbol", body = ErrorBody),
        (status = 404, description = "The symbol has no price", body = ErrorBody),
        Refused,
    ),
    security((), ("bearer" = []))
)]
async fn price(
    _: Admitted,
    State(state): State<Arc<ServerState>>,
    Path(symbol): Path<String>,
) -> Result<Json<Price>, Failure> {
    latest(&state, &symbol).await.map(Json)
}

/// The latest price of `symbol`: 400 for what cannot be a symbol, 404 for one without a price.
async fn latest(state: &ServerState, symbol: &str) -> Result<Price, Failure> {
    let symbol = Symbol::new(symbol).map_err(|error| Failure::BadRequest(error.to_string()))?;
    let wanted = [String::from(symbol)];
    let rows = queries::latest_prices(&state.app.pool, Some(&wanted)).await.map_err(Failure::Database)?;
    let [symbol] = wanted;
    rows.into_iter().next().map(Price::from).ok_or(Failure::NotFound(symbol))
}

/// The newest points of a symbol's history, oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/prices/{symbol}/history",
    tag = "market data",
    params(("symbol" = String, Path, description = "Ticker symbol, e.g. AAPL"), HistoryQuery),
    responses(
        (status = 200, description = "The newest points, oldest first", body = PriceHistory),
        (status = 400, description = "Not a symbol, or a limit or interval out of range", body = ErrorBody),
        (status = 404, description = "The symbol has no price", body = ErrorBody),
        Refused,
    ),
    security((), ("bearer" = []))
)]
async fn price_history(
    _: Admitted,
    State(state): State<Arc<ServerState>>,
    Path(symbol): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<PriceHistory>, Failure> {
    let Query(query) = query.map_err(|rejection| Failure::BadRequest(rejection.body_text()))?;
    let limit = query.limit.unwrap_or(HISTORY_POINTS_DEFAULT);
    if !(1..=HISTORY_POINTS_MAX as u32).contains(&limit) {
        return Err(Failure::BadRequest(format!("limit must be 1 to {HISTORY_POINTS_MAX}")));
    }
    let interval = query.interval.unwrap_or(Interval::Tick);
    let latest = latest(&state, &symbol).await?;
    let grain = match interval {
        Interval::Tick => HistoryInterval::Tick,
        Interval::Minute => HistoryInterval::Minute,
    };
    let rows = queries::price_history(&state.app.pool, &latest.symbol, grain, i64::from(limit))
        .await
        .map_err(Failure::Database)?;
    Ok(Json(PriceHistory { symbol: latest.symbol, interval, points: rows.into_iter().map(PricePoint::from).collect() }))
}

/// The symbols with a price.
#[utoipa::path(
    get,
    path = "/api/v1/symbols",
    tag = "market data",
    responses(
        (status = 200, description = "Every symbol with a price, in order (at most 1,000)", body = SymbolList),
        Refused,
    ),
    security((), ("bearer" = []))
)]
async fn symbols(_: Admitted, State(state): State<Arc<ServerState>>) -> Result<Json<SymbolList>, Failure> {
    let rows = queries::latest_prices(&state.app.pool, None).await.map_err(Failure::Database)?;
    Ok(Json(SymbolList { symbols: rows.into_iter().map(|row| row.symbol).collect() }))
}

/// This surface's OpenAPI 3 document (public: it is documentation).
async fn openapi() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}
