//! The world of an API test: its own database, its own topics on the test broker, one or more API instances
//! on random ports (the first also runs the relay, the process manager and the projection workers), tokens for
//! every role, and two GraphQL clients — HTTP, and a small graphql-transport-ws client.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use ledger::kafka::KafkaConfig;
use ledger::market::{Tick, TickPublisher, TICK_VERSION};
use ledger_api::app::{start, AppConfig, Running};
use ledger_api::auth::{Role, TokenKeys};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub const SECRET: &str = "test-secret-of-at-least-thirty-two-bytes";

pub fn admin_url() -> String {
    std::env::var("LEDGER_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own for a test that runs the binary (no API instance, no topics).
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let admin = admin_url();
        let name = format!("ledger_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin).await.unwrap();
        sqlx::query(&format!("create database {name}")).execute(&mut conn).await.unwrap();
        let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
        TestDb { name, url }
    }

    pub async fn drop(self) {
        let mut conn = PgConnection::connect(&admin_url()).await.unwrap();
        sqlx::query(&format!("drop database if exists {} with (force)", self.name)).execute(&mut conn).await.unwrap();
    }
}

/// A child process's output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub struct Stack {
    pub name: String,
    pub pool: PgPool,
    pub kafka: KafkaConfig,
    pub instances: Vec<Running>,
    keys: TokenKeys,
    pub http: reqwest::Client,
}

pub fn init_tracing() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ledger=info,ledger_api=info"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

impl Stack {
    /// A new world with `instances` API instances.
    pub async fn start(instances: usize) -> Stack {
        Self::start_with(instances, |_| {}).await
    }

    pub async fn start_with(instances: usize, adjust: impl Fn(&mut AppConfig)) -> Stack {
        init_tracing();
        let admin = admin_url();
        let name = format!("ledger_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin).await.unwrap();
        sqlx::query(&format!("create database {name}")).execute(&mut conn).await.unwrap();
        conn.close().await.ok();
        let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
        let pool = ledger::db::connect(&url, 40).await.unwrap();
        ledger::db::migrate(&pool).await.unwrap();
        let brokers = std::env::var("KAFKA_BROKERS").expect("API tests need KAFKA_BROKERS: run ./scripts/test");
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let mut kafka = KafkaConfig::new(brokers);
        kafka.events_topic = format!("test.events.{suffix}");
        kafka.prices_topic = format!("test.prices.{suffix}");
        kafka.dead_letter_topic = format!("test.dlq.{suffix}");
        kafka.partitions = 4;
        kafka.ensure_topics().await.unwrap();
        let keys = TokenKeys::new(SECRET).unwrap();
        let mut running = Vec::new();
        for index in 0..instances {
            let mut config = AppConfig::new(keys.clone(), Some(kafka.clone()));
            config.with_relay = index == 0;
            config.with_process_manager = index == 0;
            config.with_workers = index == 0;
            config.workers.group_prefix = format!("test-{suffix}");
            adjust(&mut config);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            running.push(start(pool.clone(), config, listener).await.unwrap());
        }
        Stack { name, pool, kafka, instances: running, keys, http: reqwest::Client::new() }
    }

    pub fn token(&self, subject: &str, role: Role) -> String {
        self.keys.issue(subject, role, chrono::Duration::hours(1), chrono::Utc::now())
    }

    pub fn url(&self, instance: usize, path: &str) -> String {
        format!("http://{}{path}", self.instances[instance].address)
    }

    pub fn ws_url(&self, instance: usize) -> String {
        format!("ws://{}/graphql/ws", self.instances[instance].address)
    }

    /// POSTs a GraphQL request; returns the whole response body (`data` and `errors`).
    pub async fn gql_on(&self, instance: usize, token: Option<&str>, query: &str, variables: Value) -> Value {
        let mut request =
            self.http.post(self.url(instance, "/graphql")).json(&json!({ "query": query, "variables": variables }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        response.json().await.unwrap()
    }

    pub async fn gql(&self, token: &str, query: &str, variables: Value) -> Value {
        self.gql_on(0, Some(token), query, variables).await
    }

    /// Like [`Stack::gql`], but panics on any error and returns `data`.
    pub async fn ok(&self, token: &str, query: &str, variables: Value) -> Value {
        let response = self.gql(token, query, variables).await;
        assert!(response.get("errors").is_none_or(|e| e.is_null()), "unexpected errors: {response}");
        response["data"].clone()
    }

    /// Like [`Stack::ok`] for a query with `waitFor`: asks again while it answers `NOT_YET_VISIBLE` (the
    /// documented remedy), so a slow machine makes the test slower, not red.
    pub async fn ok_visible(&self, token: &str, query: &str, variables: Value) -> Value {
        let deadline = tokio::time::Instant::now() + CONDITION_WAIT_MAX;
        loop {
            let response = self.gql(token, query, variables.clone()).await;
            if error_code(&response).as_deref() != Some("NOT_YET_VISIBLE") || tokio::time::Instant::now() > deadline {
                assert!(response.get("errors").is_none_or(|e| e.is_null()), "unexpected errors: {response}");
                return response["data"].clone();
            }
        }
    }

    /// `/metrics` of instance 0, as an auditor (the route needs an auditor or admin token).
    pub async fn metrics(&self) -> String {
        let auditor = self.token("metrics-reader", Role::Auditor);
        let response = self.http.get(self.url(0, "/metrics")).bearer_auth(auditor).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// Waits until a series of `/metrics` has `expected` (database-derived series are cached for a few seconds).
    pub async fn wait_metric(&self, series: &str, expected: f64) {
        let last = std::sync::Mutex::new(None);
        let reached = eventually(|| async {
            let value = metric_value(&self.metrics().await, series);
            *last.lock().unwrap() = value;
            value == Some(expected)
        })
        .await;
        assert!(reached, "{series} never reached {expected}: last {:?}", last.lock().unwrap());
    }

    /// Waits until `instance` has at least `count` live subscriptions (each receives everything committed from
    /// then on).
    pub async fn wait_subscriptions(&self, instance: usize, count: i64) {
        let hub = &self.instances[instance].hub;
        let live = eventually(|| async { hub.subscriptions.load(std::sync::atomic::Ordering::Relaxed) >= count }).await;
        assert!(live, "instance {instance} never had {count} live subscriptions");
    }

    pub async fn publish_tick(&self, symbol: &str, price: &str, seq: i64) {
        self.publish_tick_at(symbol, price, seq, chrono::Utc::now()).await;
    }

    /// A tick of `symbol` stamped `ts`.
    pub async fn publish_tick_at(&self, symbol: &str, price: &str, seq: i64, ts: chrono::DateTime<chrono::Utc>) {
        let tick = Tick {
            version: TICK_VERSION,
            symbol: ledger::domain::values::Symbol::new(symbol).unwrap(),
            price: ledger::domain::values::Price::new(price.parse().unwrap()).unwrap(),
            ts,
            seq,
            volume: None,
            source: "test".into(),
        };
        TickPublisher::new(&self.kafka).unwrap().publish(&tick).await.unwrap();
    }

    pub async fn stop(self) {
        for instance in self.instances {
            instance.stop().await.unwrap();
        }
        self.pool.close().await;
        if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
            let _ =
                sqlx::query(&format!("drop database if exists {} with (force)", self.name)).execute(&mut conn).await;
        }
    }
}

/// The value of a series in Prometheus text (the first line starting with it).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// The first error code of a response, if any.
pub fn error_code(response: &Value) -> Option<String> {
    response["errors"][0]["extensions"]["code"].as_str().map(str::to_string)
}

/// How long a test waits for a condition before it declares the system stuck. A condition normally holds
/// within milliseconds; this bound only turns a hang into a failure, so it is generous enough for a slow machine
/// busy with other work (tests assert what happens, never how fast: speed is for `ledger-lab bench`).
pub const CONDITION_WAIT_MAX: Duration = Duration::from_secs(180);

/// Polls `check` every 25 ms until it returns true (→ true) or [`CONDITION_WAIT_MAX`] passes (→ false).
pub async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + CONDITION_WAIT_MAX;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A minimal graphql-transport-ws client (one subscription per connection).
pub struct WsSubscription {
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

impl WsSubscription {
    /// Connects, authenticates with `token` in `connection_init`, and subscribes. `Err` carries the server's
    /// refusal (connection closed, or an `error` message).
    pub async fn open(url: &str, token: Option<&str>, query: &str, variables: Value) -> Result<WsSubscription, String> {
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.map_err(|e| e.to_string())?;
        let init = match token {
            Some(token) => {
                json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } })
            }
            None => json!({ "type": "connection_init", "payload": {} }),
        };
        socket.send(Message::text(init.to_string())).await.map_err(|e| e.to_string())?;
        let ack = tokio::time::timeout(CONDITION_WAIT_MAX, socket.next())
            .await
            .map_err(|_| "no connection_ack".to_string())?;
        match ack {
            Some(Ok(Message::Text(text))) if text.contains("connection_ack") => {}
            other => return Err(format!("connection refused: {other:?}")),
        }
        let subscribe =
            json!({ "id": "1", "type": "subscribe", "payload": { "query": query, "variables": variables } });
        socket.send(Message::text(subscribe.to_string())).await.map_err(|e| e.to_string())?;
        Ok(WsSubscription { socket })
    }

    /// The next `next` payload (`data`/`errors`), or `None` on `complete`, close, or after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let message = tokio::time::timeout(remaining, self.socket.next()).await.ok()??;
            match message {
                Ok(Message::Text(text)) => {
                    let value: Value = serde_json::from_str(&text).ok()?;
                    match value["type"].as_str() {
                        Some("next") => return Some(value["payload"].clone()),
                        Some("error") => return Some(json!({ "errors": value["payload"] })),
                        Some("complete") => return None,
                        Some("ping") => {
                            let _ = self.socket.send(Message::text(json!({ "type": "pong" }).to_string())).await;
                        }
                        _ => {}
                    }
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// What a socket said: a protocol message, or the close frame's code.
#[derive(Debug, Clone, PartialEq)]
pub enum WsEvent {
    Message(Value),
    Closed(Option<u16>),
}

/// A graphql-transport-ws client speaking the protocol message by message (several subscriptions, raw
/// frames, pongs on request), for the WebSocket's limits.
pub struct WsClient {
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    /// Answer the server's pings (a well-behaved client); off to play a dead one.
    pub answer_pings: bool,
}

impl WsClient {
    /// Connects and sends `connection_init` with `token`; `Ok` once acknowledged, `Err` with what came instead.
    pub async fn connect(url: &str, token: &str) -> Result<WsClient, WsEvent> {
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse().unwrap());
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let (socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), false)
            .await
            .map_err(|_| WsEvent::Closed(None))?;
        let mut client = WsClient { socket, answer_pings: true };
        let init = json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } });
        client.send(&init).await;
        match client.next().await {
            WsEvent::Message(message) if message["type"] == "connection_ack" => Ok(client),
            other => Err(other),
        }
    }

    pub async fn send(&mut self, message: &Value) {
        let _ = self.socket.send(Message::text(message.to_string())).await;
    }

    pub async fn send_raw(&mut self, text: String) {
        let _ = self.socket.send(Message::text(text)).await;
    }

    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        let message = json!({ "id": id, "type": "subscribe", "payload": { "query": query, "variables": variables } });
        self.send(&message).await;
    }

    /// The next protocol message other than a ping (answered when `answer_pings`), or the close.
    pub async fn next(&mut self) -> WsEvent {
        self.next_within(CONDITION_WAIT_MAX).await.unwrap_or(WsEvent::Closed(None))
    }

    /// The next `next` or `error` message of subscription `id` (skipping `complete`s and other subscriptions'
    /// messages), or the close.
    pub async fn answer(&mut self, id: &str) -> WsEvent {
        loop {
            match self.next().await {
                WsEvent::Message(message) if message["id"] != id || message["type"] == "complete" => continue,
                other => return other,
            }
        }
    }

    /// Like [`WsClient::next`], `None` when nothing came within `wait` (for a socket that must stay open).
    pub async fn next_within(&mut self, wait: Duration) -> Option<WsEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = match tokio::time::timeout(remaining, self.socket.next()).await {
                Err(_) => return None,
                Ok(frame) => frame,
            };
            match frame {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    if value["type"] == "ping" {
                        if self.answer_pings {
                            self.send(&json!({ "type": "pong" })).await;
                        }
                        continue;
                    }
                    return Some(WsEvent::Message(value));
                }
                Some(Ok(Message::Close(frame))) => return Some(WsEvent::Closed(frame.map(|f| f.code.into()))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Some(WsEvent::Closed(None)),
            }
        }
    }
}

/// Ticks per round of a flood: well under the feeds' buffer, so a client that reads keeps up whatever the
/// machine's speed.
pub const FLOOD_ROUND: i64 = 500;

/// No keep-alive deadline on the sockets: in a flood, the client that does not read answers no pings either.
pub fn without_keep_alive(config: &mut AppConfig) {
    let never = Duration::from_secs(3_600);
    config.keep_alive = ledger_api::http::ws::KeepAlive { ping_interval: never, timeout: never };
}

/// `total` ticks of `symbol` in rounds of [`FLOOD_ROUND`], numbered from 1 and priced at their number.
pub fn flood_rounds(symbol: &str, total: i64) -> impl Iterator<Item = Vec<Tick>> + '_ {
    (0..total / FLOOD_ROUND).map(move |round| {
        let first = round * FLOOD_ROUND + 1;
        (first..first + FLOOD_ROUND)
            .map(|seq| Tick {
                version: TICK_VERSION,
                symbol: ledger::domain::values::Symbol::new(symbol).unwrap(),
                price: ledger::domain::values::Price::new(rust_decimal::Decimal::from(seq)).unwrap(),
                ts: chrono::Utc::now(),
                seq,
                volume: None,
                source: "test".into(),
            })
            .collect()
    })
}
