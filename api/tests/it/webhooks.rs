//! Alert webhooks end to end: a real alert firing, a receiver (a small HTTP server in the test) that fails
//! twice, a deliverer stopped in the middle of a delivery and another one taking over; the signature checked
//! as a receiver would; dead deliveries; private addresses refused.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use ledger_api::auth::Role;
use ledger_api::webhooks::{Deliverer, WebhookConfig};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::graphql::open_funded;
use crate::support::{eventually, Stack};

const CREATE: &str = "mutation($p: UUID!, $url: String!) {
    createWebhook(portfolioId: $p, url: $url) { secret webhook { id url } }
}";
const DELIVERIES: &str = "query($p: UUID!) {
    webhooks(portfolioId: $p) { id deliveries { id status attempts lastStatus lastError } }
}";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: String,
}

/// What the receiver answers, request by request (200 once the script is used up), and what it got.
#[derive(Default)]
struct Receiver {
    script: Mutex<VecDeque<StatusCode>>,
    received: Mutex<Vec<Received>>,
    /// Told when a request arrives; the answer to the first request waits for `release`.
    arrived: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

async fn receive(State(receiver): State<Arc<Receiver>>, headers: HeaderMap, body: String) -> StatusCode {
    let status = receiver.script.lock().unwrap().pop_front().unwrap_or(StatusCode::OK);
    let first = {
        let mut received = receiver.received.lock().unwrap();
        received.push(Received { headers, body });
        received.len() == 1
    };
    receiver.arrived.notify_one();
    if first {
        receiver.release.notified().await;
    }
    status
}

/// Serves `receiver` on a loopback port; its URL.
async fn serve(receiver: Arc<Receiver>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(receiver);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}/hook")
}

fn config(allow_private_targets: bool) -> WebhookConfig {
    let mut config = WebhookConfig { allow_private_targets, ..WebhookConfig::default() };
    config.policy.retry_first_delay = chrono::Duration::milliseconds(200);
    config.poll_interval = Duration::from_millis(50);
    // A deliverer stopped mid-call leaves its delivery to another one after this.
    config.lease = Duration::from_secs(1);
    config
}

fn start(stack: &Stack, config: WebhookConfig) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let cancel = CancellationToken::new();
    let deliverer = Deliverer::new(stack.pool.clone(), config).unwrap();
    (cancel.clone(), tokio::spawn(deliverer.run(cancel)))
}

/// Makes the portfolio's PRICE_ABOVE alert on ACME fire: publishes ticks above the level until a firing is
/// recorded (the rule reaches the alerts projection asynchronously; once fired it does not fire again).
async fn fire_alert(stack: &Stack, token: &str, portfolio: &str) {
    let alert = json!({ "kind": "PRICE_ABOVE", "symbol": "ACME", "level": "20" });
    let create = "mutation($p: UUID!, $c: AlertConditionInput!) { createAlert(portfolioId: $p, condition: $c, idempotencyKey: \"w1\") { alertId } }";
    stack.ok(token, create, json!({ "p": portfolio, "c": alert })).await;
    let mut seq = 0;
    let fired = eventually(|| {
        seq += 1;
        async move {
            stack.publish_tick("ACME", "25", seq).await;
            let firings: i64 =
                sqlx::query_scalar("select count(*) from alert_firings").fetch_one(&stack.pool).await.unwrap();
            firings > 0
        }
    })
    .await;
    assert!(fired, "the alert never fired");
}

async fn deliveries(stack: &Stack, token: &str, portfolio: &str) -> Vec<Value> {
    let data = stack.ok(token, DELIVERIES, json!({ "p": portfolio })).await;
    data["webhooks"][0]["deliveries"].as_array().cloned().unwrap_or_default()
}

/// Checks `Ledger-Signature` as a receiver does: HMAC-SHA256 of "<t>.<body>" with the secret.
fn signature_is_valid(secret: &str, received: &Received) -> bool {
    let header = received.headers["ledger-signature"].to_str().unwrap();
    let (t, v1) = header.split_once(',').unwrap();
    let (t, v1) = (t.strip_prefix("t=").unwrap(), v1.strip_prefix("v1=").unwrap());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{}", received.body).as_bytes());
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let fresh = (chrono::Utc::now().timestamp() - t.parse::<i64>().unwrap()).abs() < 300;
    expected == v1 && fresh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fired_alert_is_delivered_once_through_failures_and_a_restart() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let portfolio = open_funded(&stack, &alice, "100").await;
    let receiver = Arc::new(Receiver::default());
    receiver.script.lock().unwrap().extend([StatusCode::INTERNAL_SERVER_ERROR, StatusCode::INTERNAL_SERVER_ERROR]);
    let url = serve(receiver.clone()).await;
    let created = stack.ok(&alice, CREATE, json!({ "p": portfolio, "url": url })).await;
    let secret = created["createWebhook"]["secret"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 64);

    let (cancel, first) = start(&stack, config(true));
    fire_alert(&stack, &alice, &portfolio).await;
    // The first attempt reaches the receiver; its deliverer stops before the answer (a crash mid-call).
    receiver.arrived.notified().await;
    cancel.cancel();
    first.await.unwrap().unwrap();
    receiver.release.notify_one();
    // Another deliverer takes over once the lease runs out: 500, then 200.
    let (cancel, second) = start(&stack, config(true));
    let delivered = eventually(|| async {
        deliveries(&stack, &alice, &portfolio).await.first().is_some_and(|d| d["status"] == "DELIVERED")
    })
    .await;
    assert!(delivered, "never delivered: {:?}", deliveries(&stack, &alice, &portfolio).await);
    cancel.cancel();
    second.await.unwrap().unwrap();

    let log = deliveries(&stack, &alice, &portfolio).await;
    assert_eq!(log.len(), 1, "one delivery per firing: {log:?}");
    assert_eq!((&log[0]["attempts"], &log[0]["lastStatus"]), (&json!(3), &json!(200)), "{log:?}");
    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(received.len(), 3, "three attempts reached the receiver");
    let id = log[0]["id"].as_str().unwrap();
    for request in &received {
        assert_eq!(request.headers["ledger-delivery-id"], id, "the same delivery id on every attempt");
        assert_eq!(request.headers["ledger-event"], "alert.fired");
        assert!(signature_is_valid(&secret, request), "bad signature on {request:?}");
        assert_eq!(request.body, received[0].body, "the same bytes on every attempt");
    }
    let body: Value = serde_json::from_str(&received[0].body).unwrap();
    assert_eq!(body["id"], id);
    assert_eq!(body["type"], "alert.fired");
    assert_eq!((&body["data"]["portfolio_id"], &body["data"]["kind"]), (&json!(portfolio), &json!("PRICE_ABOVE")));
    assert_eq!((&body["data"]["symbol"], &body["data"]["price"]), (&json!("ACME"), &json!("25")));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_die_after_their_retry_time_and_private_addresses_are_refused() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let bob = stack.token("bob", Role::Trader);
    let portfolio = open_funded(&stack, &alice, "100").await;
    let receiver = Arc::new(Receiver::default());
    receiver.release.notify_one();
    let url = serve(receiver.clone()).await;
    stack.ok(&alice, CREATE, json!({ "p": portfolio, "url": url })).await;

    // Private addresses refused (the default): every attempt fails without a request, until the retry time
    // (zero here) is up and the delivery is dead.
    let mut refusing = config(false);
    refusing.policy.retry_for = chrono::Duration::zero();
    let (cancel, deliverer) = start(&stack, refusing);
    fire_alert(&stack, &alice, &portfolio).await;
    let dead = eventually(|| async {
        deliveries(&stack, &alice, &portfolio).await.first().is_some_and(|d| d["status"] == "DEAD")
    })
    .await;
    let log = deliveries(&stack, &alice, &portfolio).await;
    assert!(dead, "never dead: {log:?}");
    assert!(log[0]["lastError"].as_str().unwrap().contains("non-public"), "{log:?}");
    assert_eq!(log[0]["attempts"], 1);
    assert!(receiver.received.lock().unwrap().is_empty(), "a private address was called");
    cancel.cancel();
    deliverer.await.unwrap().unwrap();

    // Bad URLs, the limit, and other owners.
    let bad = stack.gql(&alice, CREATE, json!({ "p": portfolio, "url": "ftp://example.com/x" })).await;
    assert_eq!(crate::support::error_code(&bad).as_deref(), Some("INVALID_INPUT"), "{bad}");
    let other = stack.gql(&bob, CREATE, json!({ "p": portfolio, "url": "http://example.com/x" })).await;
    assert_eq!(crate::support::error_code(&other).as_deref(), Some("PORTFOLIO_NOT_FOUND"), "{other}");
    assert_eq!(stack.ok(&bob, DELIVERIES, json!({ "p": portfolio })).await["webhooks"], json!([]));
    for _ in 1..ledger::webhooks::WEBHOOKS_PER_PORTFOLIO_MAX {
        stack.ok(&alice, CREATE, json!({ "p": portfolio, "url": "http://example.com/x" })).await;
    }
    let over = stack.gql(&alice, CREATE, json!({ "p": portfolio, "url": "http://example.com/x" })).await;
    assert_eq!(crate::support::error_code(&over).as_deref(), Some("LIMIT_EXCEEDED"), "{over}");
    // Removing one makes room; bob cannot remove alice's.
    let id = stack.ok(&alice, DELIVERIES, json!({ "p": portfolio })).await["webhooks"][0]["id"].clone();
    let remove = "mutation($id: UUID!) { removeWebhook(webhookId: $id) { removedAt } }";
    let refused = stack.gql(&bob, remove, json!({ "id": id })).await;
    assert_eq!(crate::support::error_code(&refused).as_deref(), Some("NOT_FOUND"), "{refused}");
    let removed = stack.ok(&alice, remove, json!({ "id": id })).await;
    assert!(removed["removeWebhook"]["removedAt"].is_string());
    stack.ok(&alice, CREATE, json!({ "p": portfolio, "url": "http://example.com/x" })).await;
    stack.stop().await;
}

/// An axum listener serving TLS with the test's certificate.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, address)) = self.tcp.accept().await else { continue };
            // A client that does not trust the certificate fails its handshake: wait for the next one.
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, address);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Serves `receiver` over TLS on a loopback port with a new self-signed certificate for `localhost`; the URL and
/// a PEM file of the certificate (to trust it).
async fn serve_tls(receiver: Arc<Receiver>) -> (String, std::path::PathBuf) {
    use tokio_rustls::rustls::pki_types::PrivateKeyDer;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca_file = std::env::temp_dir().join(format!("ledger-test-ca-{}.pem", uuid::Uuid::new_v4()));
    std::fs::write(&ca_file, certified.cert.pem()).unwrap();
    let key = PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    #[allow(deprecated)] // the client's provider (see `ledger_api::http::client`)
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let listener = TlsListener { tcp, acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)) };
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(receiver);
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("https://localhost:{port}/hook"), ca_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_endpoints_are_delivered_to_once_their_certificate_is_trusted() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let portfolio = open_funded(&stack, &alice, "100").await;
    let receiver = Arc::new(Receiver::default());
    receiver.release.notify_one();
    let (url, ca_file) = serve_tls(receiver.clone()).await;
    stack.ok(&alice, CREATE, json!({ "p": portfolio, "url": url })).await;

    // The self-signed certificate is not trusted: the attempt fails in the TLS handshake.
    let (cancel, untrusting) = start(&stack, config(true));
    fire_alert(&stack, &alice, &portfolio).await;
    let refused = eventually(|| async {
        let log = deliveries(&stack, &alice, &portfolio).await;
        log.first().is_some_and(|d| d["lastError"].as_str().is_some_and(|e| e.contains("TLS")))
    })
    .await;
    assert!(refused, "no TLS failure: {:?}", deliveries(&stack, &alice, &portfolio).await);
    cancel.cancel();
    untrusting.await.unwrap().unwrap();
    assert!(receiver.received.lock().unwrap().is_empty());

    // Trusted through the CA file: delivered.
    let (cancel, trusting) = start(&stack, WebhookConfig { ca_file: Some(ca_file.clone()), ..config(true) });
    let delivered = eventually(|| async {
        deliveries(&stack, &alice, &portfolio).await.first().is_some_and(|d| d["status"] == "DELIVERED")
    })
    .await;
    assert!(delivered, "never delivered: {:?}", deliveries(&stack, &alice, &portfolio).await);
    cancel.cancel();
    trusting.await.unwrap().unwrap();
    assert_eq!(receiver.received.lock().unwrap().len(), 1);
    std::fs::remove_file(ca_file).unwrap();
    stack.stop().await;
}
