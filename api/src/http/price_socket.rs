//! `GET /ws/prices?symbols=A,B`: price ticks over a plain WebSocket, for clients that want `{symbol, price}`
//! pushed to them without GraphQL. One JSON text message per tick:
//! `{"symbol":"AAPL","price":"190.12","volume":"100","timestamp":"2026-12-07T12:00:00.123Z"}` (decimals as
//! strings, `volume` null when unknown), every tick of the listed symbols (of every symbol without `symbols`)
//! published after the handshake answered.
//!
//! - **Serialised once.** The feed turns each tick into its JSON text once (`crate::graphql::feeds::PriceFrame`);
//!   every socket sends those same bytes, so a socket's work per tick is a symbol check and a write.
//! - **Access** as the REST market data (`crate::http::market_data`): rate-limited per client address, and a
//!   bearer token (`Authorization` header of the handshake) unless market data is public.
//! - **Bounded.** A socket that falls more than [`FEED_BUFFER`](crate::graphql::feeds::FEED_BUFFER) ticks behind the feed is closed with
//!   [`CLOSE_LAGGED`] (reconnect to resume from the latest ticks): the rule a GraphQL subscription's
//!   `RESYNC_REQUIRED` follows. At most [`PRICE_SOCKETS_MAX`] sockets per instance and
//!   [`SYMBOLS_PER_SOCKET_MAX`] symbols per socket, [`PRICE_SOCKETS_PER_ADDRESS_MAX`] sockets per client address;
//!   what a client sends is ignored, each message at most [`CLIENT_MESSAGE_MAX_BYTES`]. A client that does not
//!   take what is written to it for the keep-alive timeout is dropped.
//! - **Keep-alive** as on `/graphql/ws`: a ping every interval; a client silent (not even a pong) for the
//!   timeout is closed. When the API stops, sockets are closed with 1001 (going away).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::extract::{ConnectInfo, Query, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use ledger::domain::values::Symbol;
use tokio::sync::broadcast;

use super::access::{error_response, Admitted};
use super::state::ServerState;
pub use super::state::SocketsByAddress;
use crate::graphql::feeds::PriceFrame;
use crate::http::ws::KeepAlive;

/// Raw price sockets one API instance holds open at once.
pub const PRICE_SOCKETS_MAX: usize = 20_000;
/// Raw price sockets one client address may hold open on one instance (clients behind one proxy share its
/// address).
pub const PRICE_SOCKETS_PER_ADDRESS_MAX: usize = 2_000;
/// How long writing the close frame may take (the client may not be reading).
const CLOSE_WRITE_MS: u64 = 1_000;
/// Symbols one socket may ask for.
pub const SYMBOLS_PER_SOCKET_MAX: usize = crate::graphql::market::SYMBOLS_PER_QUERY_MAX;
/// Largest message a client may send (clients have nothing to say; pongs and close frames are small).
pub const CLIENT_MESSAGE_MAX_BYTES: usize = 4 * 1024;
/// Close code of a socket that fell too far behind the feed: reconnect.
pub const CLOSE_LAGGED: u16 = 4000;
/// Close code when the API stops (RFC 6455: going away).
const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code of a client silent beyond the keep-alive timeout (RFC 6455: policy violation).
const CLOSE_SILENT: u16 = 1008;

/// `GET /ws/prices`: checks access and the symbols, subscribes to the feed, then upgrades. The subscription is
/// made before the handshake is answered, so every tick published after the client sees it is delivered.
pub async fn upgrade(
    _: Admitted,
    State(state): State<Arc<ServerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let symbols = match symbols(query.get("symbols").map(String::as_str)) {
        Ok(symbols) => symbols,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, "BAD_REQUEST", &message),
    };
    let hub = &state.app.hub;
    if !hub.ticks_available() {
        let message = "no live prices: this server reads no broker";
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message);
    }
    let permit = match SocketPermit::acquire(&state.http.price_sockets_open, &state.price_sockets, peer.ip()) {
        Ok(permit) => permit,
        Err(message) => return error_response(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", &message),
    };
    let feed = Feed {
        prices: hub.subscribe_prices(),
        symbols,
        keep_alive: state.keep_alive,
        stopping: hub.stopping().clone(),
    };
    upgrade
        .max_message_size(CLIENT_MESSAGE_MAX_BYTES)
        .max_frame_size(CLIENT_MESSAGE_MAX_BYTES)
        .read_buffer_size(crate::http::ws::WS_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            let closed_with = feed.serve(socket).await;
            tracing::debug!(?closed_with, "price socket ended");
        })
}

/// The `symbols` parameter: comma-separated symbols (none: every symbol).
fn symbols(parameter: Option<&str>) -> Result<Option<HashSet<String>>, String> {
    let Some(list) = parameter.filter(|list| !list.trim().is_empty()) else { return Ok(None) };
    let symbols: HashSet<String> = list
        .split(',')
        .map(|symbol| Symbol::new(symbol.trim()).map(String::from).map_err(|error| error.to_string()))
        .collect::<Result<_, _>>()?;
    if symbols.len() > SYMBOLS_PER_SOCKET_MAX {
        return Err(format!("at most {SYMBOLS_PER_SOCKET_MAX} symbols per socket"));
    }
    Ok(Some(symbols))
}

/// One open price socket, counted (in all and for its client address) while it lives.
struct SocketPermit {
    open: Arc<AtomicUsize>,
    by_address: SocketsByAddress,
    address: IpAddr,
}

impl SocketPermit {
    /// A socket for `address`, unless the instance or the address holds as many as allowed; why not otherwise.
    fn acquire(open: &Arc<AtomicUsize>, by_address: &SocketsByAddress, address: IpAddr) -> Result<Self, String> {
        {
            let mut counts = by_address.lock().unwrap_or_else(|p| p.into_inner());
            let count = counts.entry(address).or_default();
            if *count >= PRICE_SOCKETS_PER_ADDRESS_MAX {
                return Err(format!(
                    "too many price sockets from this address (at most {PRICE_SOCKETS_PER_ADDRESS_MAX})"
                ));
            }
            *count += 1;
        }
        let permit = SocketPermit { open: open.clone(), by_address: by_address.clone(), address };
        if open.fetch_add(1, Ordering::SeqCst) >= PRICE_SOCKETS_MAX {
            return Err(format!("too many price sockets (at most {PRICE_SOCKETS_MAX})"));
        }
        Ok(permit)
    }
}

impl Drop for SocketPermit {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        let mut counts = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

/// What one socket follows.
struct Feed {
    prices: broadcast::Receiver<Arc<PriceFrame>>,
    symbols: Option<HashSet<String>>,
    keep_alive: KeepAlive,
    /// Fires when the API stops.
    stopping: tokio_util::sync::CancellationToken,
}

impl Feed {
    fn wants(&self, frame: &PriceFrame) -> bool {
        self.symbols.as_ref().is_none_or(|symbols| symbols.contains(&frame.symbol))
    }

    /// Sends the ticks until the client leaves (`None`), or the socket is closed because it fell behind, went
    /// silent or the API stops (`Some` close code).
    async fn serve(mut self, socket: WebSocket) -> Option<u16> {
        let (mut sink, mut incoming) = socket.split();
        let mut ping = tokio::time::interval(self.keep_alive.ping_interval);
        ping.tick().await; // the first tick is immediate
        let mut heard = tokio::time::Instant::now();
        let stopping = self.stopping.clone();
        loop {
            let outcome = tokio::select! {
                _ = stopping.cancelled() => Err(close(CLOSE_GOING_AWAY, "the server is stopping")),
                frame = self.prices.recv() => self.send_bounded(&mut sink, frame, &stopping).await,
                message = incoming.next() => match message {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                    Some(Ok(_)) => {
                        heard = tokio::time::Instant::now();
                        Ok(())
                    }
                },
                _ = ping.tick() => {
                    if heard.elapsed() > self.keep_alive.timeout {
                        Err(close(CLOSE_SILENT, "no word from the client within the keep-alive timeout"))
                    } else {
                        sink.send(Message::Ping(Default::default())).await.map_err(|_| Message::Close(None))
                    }
                }
            };
            if let Err(message) = outcome {
                let code = match &message {
                    Message::Close(Some(frame)) => frame.code,
                    _ => return None,
                };
                let _ = tokio::time::timeout(Duration::from_millis(CLOSE_WRITE_MS), sink.send(message)).await;
                return Some(code);
            }
        }
    }

    /// [`Feed::send_ready`], bounded: a client that does not take what is ready within the keep-alive timeout, or
    /// an API that stops meanwhile, ends the socket without a close frame (nothing more can be written to it).
    async fn send_bounded(
        &mut self,
        sink: &mut (impl futures::Sink<Message> + Unpin),
        first: Result<Arc<PriceFrame>, broadcast::error::RecvError>,
        stopping: &tokio_util::sync::CancellationToken,
    ) -> Result<(), Message> {
        let limit = self.keep_alive.timeout;
        tokio::select! {
            _ = stopping.cancelled() => Err(Message::Close(None)),
            sent = tokio::time::timeout(limit, self.send_ready(sink, first)) => sent.unwrap_or(Err(Message::Close(None))),
        }
    }

    /// Writes `first` and every further frame already waiting, then flushes once. `Err` carries the close
    /// message to end with (`Close(None)`: the connection broke).
    async fn send_ready(
        &mut self,
        sink: &mut (impl futures::Sink<Message> + Unpin),
        first: Result<Arc<PriceFrame>, broadcast::error::RecvError>,
    ) -> Result<(), Message> {
        let mut next = first;
        loop {
            match next {
                Ok(frame) => {
                    if self.wants(&frame) && sink.feed(Message::Text(frame.text.clone())).await.is_err() {
                        return Err(Message::Close(None));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return Err(close(CLOSE_LAGGED, "fell behind the price feed; reconnect"))
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(close(CLOSE_GOING_AWAY, "the price feed stopped"))
                }
            }
            next = match self.prices.try_recv() {
                Ok(frame) => Ok(frame),
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Lagged(n)) => Err(broadcast::error::RecvError::Lagged(n)),
                Err(broadcast::error::TryRecvError::Closed) => Err(broadcast::error::RecvError::Closed),
            };
        }
        sink.flush().await.map_err(|_| Message::Close(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_are_checked_and_bounded() {
        assert_eq!(symbols(None), Ok(None));
        assert_eq!(symbols(Some("")), Ok(None));
        assert_eq!(symbols(Some("AAPL, MSFT")), Ok(Some(HashSet::from(["AAPL".into(), "MSFT".into()]))));
        assert!(symbols(Some("aapl")).is_err());
        let many: Vec<String> = (0..=SYMBOLS_PER_SOCKET_MAX).map(|i| format!("S{i}")).collect();
        assert!(symbols(Some(&many.join(","))).is_err());
    }
}
