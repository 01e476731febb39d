//! Who may in: the refusals every route answers with, the bearer-token check behind the per-address limits,
//! and the admission of market-data requests (`Admitted`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::state::ServerState;
use crate::auth::AuthError;

pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "errors": [{ "message": message, "extensions": { "code": code } }] });
    (status, axum::Json(body)).into_response()
}

pub(super) fn rate_limited(state: &ServerState) -> Response {
    state.http.rate_limited.fetch_add(1, Ordering::Relaxed);
    error_response(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", "too many requests; slow down")
}

/// Why a request was refused before it reached its handler.
pub(super) enum Refusal {
    RateLimited,
    Unauthenticated(AuthError),
}

impl Refusal {
    pub(super) fn response(self, state: &ServerState) -> Response {
        match self {
            Refusal::RateLimited => rate_limited(state),
            Refusal::Unauthenticated(error) => {
                state.http.unauthorized.fetch_add(1, Ordering::Relaxed);
                error_response(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", &error.to_string())
            }
        }
    }
}

/// Authenticates a request's `Authorization` header, after the per-address checks: too many requests from the
/// address, or too many failed authentications from it while carrying a token, are refused (429) before the
/// token is looked at. `Ok(None)`: no token.
pub(super) fn authenticate(
    state: &ServerState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<Option<(crate::auth::Principal, chrono::DateTime<chrono::Utc>)>, Refusal> {
    let address = peer.ip().to_string();
    if !state.address_limiter.allow(&address) {
        return Err(Refusal::RateLimited);
    }
    let authorization = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if authorization.is_some() && state.auth_failures.exhausted(&address) {
        return Err(Refusal::RateLimited);
    }
    match state.keys.verify_header_until(authorization, state.app.clock.now()) {
        Ok(verified) => Ok(Some(verified)),
        Err(AuthError::Missing) => Ok(None),
        Err(error) => {
            state.auth_failures.allow(&address);
            Err(Refusal::Unauthenticated(error))
        }
    }
}

/// Lets a market-data request in: the client address's rate limit first; then, unless market data is public,
/// a valid token (any role) and its subject's rate limit. Through [`Admitted`] (the raw price WebSocket too).
fn admit(state: &ServerState, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Refusal> {
    if state.public_market_data {
        return if state.address_limiter.allow(&peer.ip().to_string()) { Ok(()) } else { Err(Refusal::RateLimited) };
    }
    match authenticate(state, peer, headers)? {
        Some((principal, _)) if state.limiter.allow(&principal.subject) => Ok(()),
        Some(_) => Err(Refusal::RateLimited),
        None => Err(Refusal::Unauthenticated(AuthError::Missing)),
    }
}

/// A request let in to the market data (see [`admit`]). An extractor, first among a handler's arguments, so that
/// no handler can forget the check.
pub struct Admitted;

impl FromRequestParts<Arc<ServerState>> for Admitted {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<ServerState>) -> Result<Self, Response> {
        // The server is always served with the client's address (`into_make_service_with_connect_info`).
        let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>().copied() else {
            return Err(error_response(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "no client address"));
        };
        admit(state, peer, &parts.headers).map(|()| Admitted).map_err(|refusal| refusal.response(state))
    }
}
