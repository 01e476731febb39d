//! `GET /graphql/ws`: GraphQL subscriptions over `graphql-transport-ws`, with the limits an HTTP request has
//! and a few of its own.
//!
//! - **Subscriptions only.** A query or mutation sent on the socket is refused (`SUBSCRIPTIONS_ONLY`): they go
//!   through `POST /graphql`, where every request is rate limited and its body bounded.
//! - **Each operation costs a token** of the subject's rate limit, like an HTTP request.
//! - **Messages** are capped at [`WS_MESSAGE_MAX_BYTES`] (a larger one closes the socket).
//! - **Caps**: [`SUBSCRIPTIONS_PER_CONNECTION_MAX`] live subscriptions per socket,
//!   [`SUBSCRIPTIONS_PER_SUBJECT_MAX`] per token subject over all its sockets, [`SOCKETS_PER_SUBJECT_MAX`]
//!   sockets per subject (`TOO_MANY_SUBSCRIPTIONS`, or the socket refused at `connection_init`). Each catch-up
//!   holds one small batch of the log (see `crate::graphql::feeds`), so memory per subscriber is bounded whatever the log's size.
//! - **The token's lifetime is the socket's**: when it expires the server closes the socket with 4401; the
//!   client reconnects with a fresh token and resumes (`after:`).
//! - **Keep-alive**: the server pings every [`SERVER_PING_INTERVAL_MS`]; graphql-ws clients answer with a pong,
//!   so a healthy but quiet client is never cut off, and a dead one is closed after
//!   [`KEEPALIVE_TIMEOUT_MS`] without a word from it.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_graphql::http::{WebSocketProtocols, WsMessage};
use async_graphql::parser::types::{DocumentOperations, OperationType};
use async_graphql::{Data, Executor, Request, Response, ServerError};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};

use crate::auth::Principal;
use crate::graphql::LedgerSchema;
use crate::http::ratelimit::RateLimiter;

/// Largest WebSocket message (or frame) accepted: the HTTP body limit.
pub const WS_MESSAGE_MAX_BYTES: usize = super::REQUEST_BODY_MAX_BYTES;
/// Read buffer of a socket. The WebSocket library zeroes its read buffer's free space before every read
/// attempt, and the protocol polls the socket's input each time it sends: at the library's default (128 KiB)
/// that was a 128 KiB `memset` per delivered message and 128 KiB of memory per socket. Clients send little
/// (subscribe, complete, pong); a larger message still arrives whole (the buffer grows to the frame's length,
/// within [`WS_MESSAGE_MAX_BYTES`]).
pub const WS_READ_BUFFER_BYTES: usize = 4 * 1024;
/// Live subscriptions one socket may hold.
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 32;
/// Live subscriptions one token subject may hold over all its sockets (on one API instance).
pub const SUBSCRIPTIONS_PER_SUBJECT_MAX: usize = 128;
/// Sockets one token subject may hold open at once (on one API instance).
pub const SOCKETS_PER_SUBJECT_MAX: usize = 16;
/// How often the server pings a socket.
pub const SERVER_PING_INTERVAL_MS: u64 = 15_000;
/// A socket whose client sent nothing (not even a pong) for this long is closed (graphql-ws code 3008).
pub const KEEPALIVE_TIMEOUT_MS: u64 = 45_000;
/// Close code when the token that opened the socket expires (graphql-ws: 4401 Unauthorized).
pub const CLOSE_TOKEN_EXPIRED: u16 = 4401;
/// Stands for an expiry too far away to represent as an instant (never reached by a live socket).
const EXPIRY_FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3_600);
/// Close code after a message beyond [`WS_MESSAGE_MAX_BYTES`] (or a broken frame) (RFC 6455: 1009).
pub const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;

/// Sockets and subscriptions per token subject.
#[derive(Default)]
pub struct SubjectCounts {
    counts: Mutex<HashMap<String, (usize, usize)>>,
}

impl SubjectCounts {
    fn with<T>(&self, subject: &str, change: impl FnOnce(&mut (usize, usize)) -> T) -> T {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let entry = counts.entry(subject.to_string()).or_default();
        let result = change(entry);
        if *entry == (0, 0) {
            counts.remove(subject);
        }
        result
    }
}

/// One open socket of a subject, counted while it lives (it is kept in the connection's data).
pub struct SocketPermit {
    counts: Arc<SubjectCounts>,
    subject: String,
    /// Live subscriptions of this socket.
    subscriptions: AtomicUsize,
}

impl SocketPermit {
    /// A socket for `subject`, unless it holds [`SOCKETS_PER_SUBJECT_MAX`] already.
    pub fn acquire(counts: &Arc<SubjectCounts>, subject: &str) -> Option<SocketPermit> {
        let granted = counts.with(subject, |(sockets, _)| {
            let granted = *sockets < SOCKETS_PER_SUBJECT_MAX;
            *sockets += usize::from(granted);
            granted
        });
        granted.then(|| SocketPermit {
            counts: counts.clone(),
            subject: subject.to_string(),
            subscriptions: AtomicUsize::new(0),
        })
    }
}

impl Drop for SocketPermit {
    fn drop(&mut self) {
        self.counts.with(&self.subject, |(sockets, _)| *sockets = sockets.saturating_sub(1));
    }
}

/// One live subscription, counted against its socket and its subject while its stream lives.
struct SubscriptionPermit {
    socket: Arc<SocketPermit>,
}

impl SubscriptionPermit {
    fn acquire(socket: &Arc<SocketPermit>) -> Option<SubscriptionPermit> {
        if socket.subscriptions.fetch_add(1, Ordering::SeqCst) >= SUBSCRIPTIONS_PER_CONNECTION_MAX {
            socket.subscriptions.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let granted = socket.counts.with(&socket.subject, |(_, subscriptions)| {
            let granted = *subscriptions < SUBSCRIPTIONS_PER_SUBJECT_MAX;
            *subscriptions += usize::from(granted);
            granted
        });
        if !granted {
            socket.subscriptions.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(SubscriptionPermit { socket: socket.clone() })
    }
}

impl Drop for SubscriptionPermit {
    fn drop(&mut self) {
        self.socket.subscriptions.fetch_sub(1, Ordering::SeqCst);
        self.socket
            .counts
            .with(&self.socket.subject, |(_, subscriptions)| *subscriptions = subscriptions.saturating_sub(1));
    }
}

/// What the socket's `connection_init` established: who, until when, and the socket's permit.
pub struct Connection {
    pub principal: Principal,
    pub expires_at: DateTime<Utc>,
    pub socket: Arc<SocketPermit>,
}

/// Executes the operations of a socket: subscriptions only, each charged to the subject's rate limit and
/// counted against the caps.
#[derive(Clone)]
pub struct SubscriptionExecutor {
    pub schema: LedgerSchema,
    pub limiter: Arc<RateLimiter>,
}

fn refused(code: &str, message: &str) -> BoxStream<'static, Response> {
    let error = ServerError::new(message, None);
    let mut extensions = async_graphql::ErrorExtensionValues::default();
    extensions.set("code", code);
    let error = ServerError { extensions: Some(extensions), ..error };
    futures::stream::once(async move { Response::from_errors(vec![error]) }).boxed()
}

/// Whether the operation a request selects is a subscription (an unparsable request is left to the schema,
/// which answers it with the parse error).
fn selects_a_subscription(request: &Request) -> bool {
    let Ok(document) = async_graphql::parser::parse_query(&request.query) else { return true };
    let operation = match (&document.operations, request.operation_name.as_deref()) {
        (DocumentOperations::Single(operation), _) => Some(operation),
        (DocumentOperations::Multiple(operations), Some(name)) => operations.get(name),
        (DocumentOperations::Multiple(operations), None) if operations.len() == 1 => operations.values().next(),
        (DocumentOperations::Multiple(_), None) => None,
    };
    operation.is_none_or(|operation| operation.node.ty == OperationType::Subscription)
}

impl Executor for SubscriptionExecutor {
    async fn execute(&self, request: Request) -> Response {
        // Not used by the socket (every operation goes through `execute_stream`); answered as a refusal.
        let _ = request;
        Response::from_errors(vec![ServerError::new("only subscriptions are served on the WebSocket", None)])
    }

    fn execute_stream(&self, request: Request, session_data: Option<Arc<Data>>) -> BoxStream<'static, Response> {
        let connection = session_data
            .as_ref()
            .and_then(|data| data.get(&TypeId::of::<Arc<Connection>>()))
            .and_then(|data| data.downcast_ref::<Arc<Connection>>())
            .cloned();
        let (Some(connection), Some(session_data)) = (connection, session_data) else {
            return refused("UNAUTHENTICATED", "a valid bearer token is required in connection_init");
        };
        if !self.limiter.allow(&format!("sub:{}", connection.principal.subject)) {
            return refused("RATE_LIMITED", "too many requests; slow down");
        }
        if !selects_a_subscription(&request) {
            return refused(
                "SUBSCRIPTIONS_ONLY",
                "only subscriptions are served on the WebSocket; send queries and mutations to POST /graphql",
            );
        }
        let Some(permit) = SubscriptionPermit::acquire(&connection.socket) else {
            return refused(
                "TOO_MANY_SUBSCRIPTIONS",
                "too many live subscriptions for this socket or this token; complete some first",
            );
        };
        self.schema
            .execute_stream_with_session_data(request, session_data)
            .map(move |response| {
                let _held = &permit;
                response
            })
            .boxed()
    }
}

/// How often the server pings, and how long it waits for a word from the client.
#[derive(Debug, Clone, Copy)]
pub struct KeepAlive {
    pub ping_interval: Duration,
    pub timeout: Duration,
}

impl Default for KeepAlive {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_millis(SERVER_PING_INTERVAL_MS),
            timeout: Duration::from_millis(KEEPALIVE_TIMEOUT_MS),
        }
    }
}

/// Serves one upgraded socket: the graphql-ws protocol from async-graphql, plus server pings and the close at
/// the token's expiry. `on_init` authenticates `connection_init` and returns the connection.
pub async fn serve<F, Fut>(
    socket: WebSocket,
    executor: SubscriptionExecutor,
    protocol: WebSocketProtocols,
    keep_alive: KeepAlive,
    on_init: F,
) where
    F: FnOnce(serde_json::Value) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = async_graphql::Result<Arc<Connection>>> + Send + 'static,
{
    let (mut sink, stream) = socket.split();
    // A read error (a message beyond the size limit, a broken frame) ends the input; the socket is then closed
    // with 1009 (message too big) rather than dropped.
    let read_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed = read_failed.clone();
    let input = stream
        .take_while(move |message| {
            if let Err(error) = message {
                tracing::debug!(%error, "WebSocket read failed; closing");
                failed.store(true, Ordering::Relaxed);
            }
            futures::future::ready(message.is_ok())
        })
        .filter_map(|message| {
            futures::future::ready(match message {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => Some(message.into_data()),
                _ => None,
            })
        });
    let (expiry_tx, mut expiry_rx) = tokio::sync::watch::channel::<Option<DateTime<Utc>>>(None);
    let graphql_ws = protocol == WebSocketProtocols::GraphQLWS;
    let mut protocol_stream = async_graphql::http::WebSocket::new(executor, input, protocol)
        .on_connection_init(move |payload| async move {
            let connection = on_init(payload).await?;
            let _ = expiry_tx.send(Some(connection.expires_at));
            let mut data = Data::default();
            data.insert(connection.principal.clone());
            data.insert(connection);
            Ok(data)
        })
        // graphql-ws clients answer the server's pings; the legacy protocol has no pongs, so no timeout there.
        .keepalive_timeout(graphql_ws.then_some(keep_alive.timeout))
        .boxed();
    let mut pings = tokio::time::interval(keep_alive.ping_interval);
    pings.tick().await;
    let mut expiry_open = true;
    // One timer for the token's expiry, armed when `connection_init` sets it (not one per message sent: a
    // timer registered and dropped for every delivery costs more than the delivery at thousands of sockets).
    let mut expires = false;
    let until_expiry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(until_expiry);
    loop {
        let outgoing = tokio::select! {
            message = protocol_stream.next() => match message {
                Some(WsMessage::Text(text)) => Message::Text(text.into()),
                Some(WsMessage::Close(code, reason)) => {
                    let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
                    return;
                }
                None => {
                    if read_failed.load(Ordering::Relaxed) {
                        let close = CloseFrame { code: CLOSE_MESSAGE_TOO_BIG, reason: "message too big or malformed".into() };
                        let _ = sink.send(Message::Close(Some(close))).await;
                    }
                    return;
                }
            },
            _ = pings.tick() => {
                let ping = if graphql_ws { r#"{"type":"ping"}"# } else { r#"{"type":"ka"}"# };
                Message::Text(ping.into())
            }
            _ = &mut until_expiry, if expires => {
                let close = CloseFrame { code: CLOSE_TOKEN_EXPIRED, reason: "token expired".into() };
                let _ = sink.send(Message::Close(Some(close))).await;
                return;
            }
            changed = expiry_rx.changed(), if expiry_open => {
                // The init callback gone (answered or dropped), nothing will change any more: serve with what
                // was set. (Polling a closed channel again would answer at once, for ever: a busy loop.)
                expiry_open = changed.is_ok();
                if let Some(at) = *expiry_rx.borrow() {
                    let left = (at - Utc::now()).to_std().unwrap_or_default();
                    let now = tokio::time::Instant::now();
                    until_expiry.as_mut().reset(now.checked_add(left).unwrap_or(now + EXPIRY_FAR_FUTURE));
                    expires = true;
                }
                continue;
            }
        };
        if sink.send(outgoing).await.is_err() {
            return;
        }
    }
}
