//! The API as an attacker probes it, one test per finding of the security review (H1…L7): the WebSocket route,
//! subscriptions, free text, the complexity and waiting limits, `/metrics`, introspection and GraphiQL, secrets,
//! error messages, rate limits before authentication, standard tokens, and GraphiQL served from the binary.

use std::time::Duration;

use ledger_api::auth::Role;
use serde_json::{json, Value};

use crate::graphql::{open_funded, place, DEPOSIT};
use crate::support::{error_code, eventually, Stack, WsClient, WsEvent, CONDITION_WAIT_MAX};

const TICKS: &str = "subscription { priceTicks { symbol price } }";

fn message_code(event: &WsEvent) -> Option<String> {
    match event {
        WsEvent::Message(message) => message["payload"][0]["extensions"]["code"]
            .as_str()
            .or_else(|| message["payload"]["errors"][0]["extensions"]["code"].as_str())
            .map(str::to_string),
        WsEvent::Closed(_) => None,
    }
}

/// H1: the socket serves subscriptions only, charges each operation to the subject's rate limit, and closes on
/// a message larger than a request body.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h1_the_websocket_serves_only_subscriptions_rate_limited_and_size_capped() {
    let stack = Stack::start_with(1, |config| {
        config.rate_limit_per_second = 1;
        config.rate_limit_burst = 4;
    })
    .await;
    let alice = stack.token("alice", Role::Trader);
    let id = open_funded(&stack, &alice, "100").await;
    let mut socket = WsClient::connect(&stack.ws_url(0), &alice).await.unwrap();
    let deposit = json!({ "id": id, "amount": "1", "key": "ws-deposit" });
    socket.subscribe("m", DEPOSIT, deposit).await;
    assert_eq!(message_code(&socket.answer("m").await).as_deref(), Some("SUBSCRIPTIONS_ONLY"));
    socket.subscribe("q", "{ prices { symbol } }", json!({})).await;
    assert_eq!(message_code(&socket.answer("q").await).as_deref(), Some("SUBSCRIPTIONS_ONLY"));
    let deposits: i64 = sqlx::query_scalar("select count(*) from events where event_type = 'CashDeposited'")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(deposits, 1, "only open_funded's deposit: nothing ran on the socket");
    // The bucket (4, refilled at 1/s) is spent by the operations above and the HTTP requests of open_funded;
    // subscribing in a burst soon meets RATE_LIMITED.
    for n in 0..20 {
        socket.subscribe(&format!("t{n}"), TICKS, json!({})).await;
    }
    // A subscription let through sends nothing (no tick is published); refusals answer at once. Twenty in a
    // burst are far beyond a bucket of 4 however slow the machine: a refusal must come.
    let refusal = loop {
        match socket.next().await {
            WsEvent::Message(message) if message["type"] == "complete" => continue,
            other => break other,
        }
    };
    assert_eq!(message_code(&refusal).as_deref(), Some("RATE_LIMITED"), "{refusal:?}");
    // A message beyond the request-body limit closes the socket (1009: message too big), unanswered.
    let mut big = WsClient::connect(&stack.ws_url(0), &stack.token("bob", Role::Trader)).await.unwrap();
    let padding = "x".repeat(300 * 1024);
    big.send_raw(
        json!({ "id": "big", "type": "subscribe", "payload": { "query": format!("{TICKS} # {padding}") } }).to_string(),
    )
    .await;
    assert_eq!(big.next().await, WsEvent::Closed(Some(1009)));
    stack.stop().await;
}

/// H2: subscriptions are capped per socket and per subject, and sockets per subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_subscriptions_and_sockets_are_capped_per_connection_and_per_subject() {
    use ledger_api::http::ws::{
        SOCKETS_PER_SUBJECT_MAX, SUBSCRIPTIONS_PER_CONNECTION_MAX, SUBSCRIPTIONS_PER_SUBJECT_MAX,
    };
    let stack = Stack::start_with(1, |config| config.rate_limit_burst = 10_000).await;
    let carol = stack.token("carol", Role::Auditor);
    // Sockets full to their cap, until the subject's cap is reached.
    let mut sockets = Vec::new();
    let mut live = 0;
    while live < SUBSCRIPTIONS_PER_SUBJECT_MAX {
        let mut socket = WsClient::connect(&stack.ws_url(0), &carol).await.unwrap();
        let take = SUBSCRIPTIONS_PER_CONNECTION_MAX.min(SUBSCRIPTIONS_PER_SUBJECT_MAX - live);
        for n in 0..take {
            socket.subscribe(&format!("s{n}"), TICKS, json!({})).await;
        }
        live += take;
        stack.wait_subscriptions(0, live as i64).await;
        sockets.push(socket);
    }
    // One more on a full socket, and one more for the subject on a fresh socket: both refused.
    sockets[0].subscribe("over", TICKS, json!({})).await;
    assert_eq!(message_code(&sockets[0].answer("over").await).as_deref(), Some("TOO_MANY_SUBSCRIPTIONS"));
    let mut fresh = WsClient::connect(&stack.ws_url(0), &carol).await.unwrap();
    fresh.subscribe("over", TICKS, json!({})).await;
    assert_eq!(message_code(&fresh.answer("over").await).as_deref(), Some("TOO_MANY_SUBSCRIPTIONS"));
    sockets.push(fresh);
    // Sockets up to their cap; one more is refused at connection_init.
    while sockets.len() < SOCKETS_PER_SUBJECT_MAX {
        sockets.push(WsClient::connect(&stack.ws_url(0), &carol).await.unwrap());
    }
    let refused = WsClient::connect(&stack.ws_url(0), &carol).await.err().expect("one socket too many");
    assert!(matches!(refused, WsEvent::Closed(Some(_))), "{refused:?}");
    // Another subject is not affected; closed sockets give their share back.
    assert!(WsClient::connect(&stack.ws_url(0), &stack.token("dave", Role::Auditor)).await.is_ok());
    drop(sockets);
    let hub = &stack.instances[0].hub;
    let freed = eventually(|| async { hub.subscriptions.load(std::sync::atomic::Ordering::Relaxed) == 0 }).await;
    assert!(freed, "closed sockets kept their subscriptions");
    let mut again = WsClient::connect(&stack.ws_url(0), &carol).await.unwrap();
    again.subscribe("again", TICKS, json!({})).await;
    stack.wait_subscriptions(0, 1).await;
    stack.stop().await;
}

/// M1: the socket ends when its token does (4401).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m1_a_socket_is_closed_when_its_token_expires() {
    let stack = Stack::start(1).await;
    let short = ledger_api::auth::TokenKeys::new(crate::support::SECRET).unwrap().issue(
        "alice",
        Role::Trader,
        chrono::Duration::seconds(2),
        chrono::Utc::now(),
    );
    let mut socket = WsClient::connect(&stack.ws_url(0), &short).await.unwrap();
    socket.subscribe("t", TICKS, json!({})).await;
    assert_eq!(socket.next().await, WsEvent::Closed(Some(4401)));
    stack.stop().await;
}

/// M2: the server pings; a client that answers stays connected however quiet, one that does not is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m2_server_pings_keep_quiet_clients_and_close_dead_ones() {
    let keep_alive = ledger_api::http::ws::KeepAlive {
        ping_interval: Duration::from_millis(200),
        timeout: Duration::from_millis(1_000),
    };
    let stack = Stack::start_with(1, |config| config.keep_alive = keep_alive).await;
    let alice = stack.token("alice", Role::Trader);
    let mut healthy = WsClient::connect(&stack.ws_url(0), &alice).await.unwrap();
    let mut dead = WsClient::connect(&stack.ws_url(0), &alice).await.unwrap();
    dead.answer_pings = false;
    // Five timeouts long, the healthy client (answering pings, sending nothing else) hears nothing but pings.
    assert_eq!(healthy.next_within(keep_alive.timeout * 5).await, None);
    assert_eq!(dead.next().await, WsEvent::Closed(Some(3008)));
    stack.stop().await;
}

/// M3: NUL and other control characters are invalid input, per item in a batch, never an internal error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m3_control_characters_are_invalid_input_per_item() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let id = open_funded(&stack, &alice, "100").await;
    let nul_key = stack.gql(&alice, DEPOSIT, json!({ "id": id, "amount": "1", "key": "a\u{0}b" })).await;
    assert_eq!(error_code(&nul_key).as_deref(), Some("INVALID_INPUT"), "{nul_key}");
    let with_reference = "mutation($id: UUID!, $r: String) { deposit(portfolioId: $id, amount: \"1\", reference: $r, idempotencyKey: \"r1\") { lastPosition } }";
    let nul_reference = stack.gql(&alice, with_reference, json!({ "id": id, "r": "wire\u{0}" })).await;
    assert_eq!(error_code(&nul_reference).as_deref(), Some("INVALID_INPUT"), "{nul_reference}");
    let batch =
        "mutation($m: [CashMovementInput!]!) { cashBatch(movements: $m) { result { aggregateId } error { code } } }";
    let movements = json!([
        { "portfolioId": id, "kind": "DEPOSIT", "amount": "1", "idempotencyKey": "b1" },
        { "portfolioId": id, "kind": "DEPOSIT", "amount": "1", "idempotencyKey": "b2", "reference": "x\u{0}y" },
        { "portfolioId": id, "kind": "DEPOSIT", "amount": "1", "idempotencyKey": "b\u{7}3" },
        { "portfolioId": id, "kind": "DEPOSIT", "amount": "1", "idempotencyKey": "b4" },
    ]);
    let answers = stack.ok(&alice, batch, json!({ "m": movements })).await["cashBatch"].clone();
    let codes: Vec<Option<&str>> = answers.as_array().unwrap().iter().map(|a| a["error"]["code"].as_str()).collect();
    assert_eq!(codes, [None, Some("INVALID_INPUT"), Some("INVALID_INPUT"), None]);
    stack.stop().await;
}

/// M4: free text written to the log is bounded (256 bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m4_free_text_is_bounded() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let id = open_funded(&stack, &alice, "100").await;
    let with_reference = "mutation($id: UUID!, $r: String) { deposit(portfolioId: $id, amount: \"1\", reference: $r, idempotencyKey: \"long\") { lastPosition } }";
    let long = stack.gql(&alice, with_reference, json!({ "id": id, "r": "r".repeat(200_000) })).await;
    assert_eq!(error_code(&long).as_deref(), Some("INVALID_INPUT"));
    let fits = stack.gql(&alice, with_reference, json!({ "id": id, "r": "r".repeat(256) })).await;
    assert!(error_code(&fits).is_none(), "{fits}");
    let input = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "LIMIT", "quantity": "1", "limitPrice": "1" });
    let (order, _) = place(&stack, &alice, input).await;
    let cancel = "mutation($o: UUID!, $r: String) { cancelOrder(orderId: $o, reason: $r, idempotencyKey: \"c\") { lastPosition } }";
    let long_reason = stack.gql(&alice, cancel, json!({ "o": order, "r": "why".repeat(100) })).await;
    assert_eq!(error_code(&long_reason).as_deref(), Some("INVALID_INPUT"));
    let stored: i64 = sqlx::query_scalar("select coalesce(max(length(payload::text)), 0)::bigint from events")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert!(stored < 2_000, "an event of {stored} bytes was stored");
    stack.stop().await;
}

/// M5: unpaginated lists count in the complexity limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m5_list_fields_are_weighted_in_the_complexity_limit() {
    let stack = Stack::start(1).await;
    let auditor = stack.token("audit", Role::Auditor);
    let fan_out = "{ myPortfolios { history(first: 100) { edges { node { eventType } } } } }";
    let refused = stack.gql(&auditor, fan_out, json!({})).await;
    assert!(refused["errors"][0]["message"].as_str().unwrap_or("").contains("too complex"), "{refused}");
    let modest = "{ myPortfolios(first: 10) { id positions { symbol } } }";
    assert!(error_code(&stack.gql(&auditor, modest, json!({})).await).is_none());
    stack.stop().await;
}

/// M6: one waiting field per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m6_one_wait_per_request() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let id = open_funded(&stack, &alice, "100").await;
    let aliases: String =
        (0..2).map(|n| format!("p{n}: portfolio(id: \"{id}\", waitFor: \"1:1\") {{ cash }} ")).collect();
    let response = stack.gql(&alice, &format!("{{ {aliases} }}"), json!({})).await;
    assert_eq!(error_code(&response).as_deref(), Some("QUERY_TOO_MANY_WAITS"), "{response}");
    let one = format!("{{ portfolio(id: \"{id}\", waitFor: \"1:1\") {{ cash }} }}");
    assert!(error_code(&stack.gql(&alice, &one, json!({})).await).is_none());
    stack.stop().await;
}

/// M7: `/metrics` needs an auditor or admin token on the API address; the separate metrics address serves it
/// to a scraper without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m7_metrics_need_a_token_or_their_own_address() {
    let stack = Stack::start_with(1, |config| config.metrics_listen = Some("127.0.0.1:0".into())).await;
    let http = reqwest::Client::new();
    let anonymous = http.get(stack.url(0, "/metrics")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let trader = http.get(stack.url(0, "/metrics")).bearer_auth(stack.token("alice", Role::Trader)).send().await;
    assert_eq!(trader.unwrap().status(), 403);
    assert!(stack.metrics().await.contains("ledger_commands_total"));
    let address = stack.instances[0].metrics_address.expect("a metrics listener");
    let scraped = http.get(format!("http://{address}/metrics")).send().await.unwrap();
    assert_eq!(scraped.status(), 200);
    assert!(scraped.text().await.unwrap().contains("ledger_follower_lag_events"));
    stack.stop().await;
}

/// L1: introspection and GraphiQL are off unless asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn l1_introspection_and_graphiql_are_off_by_default() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let introspection = stack.gql(&alice, "{ __schema { types { name } } }", json!({})).await;
    assert!(introspection["data"]["__schema"].is_null(), "the schema was revealed: {introspection}");
    let graphiql = reqwest::get(stack.url(0, "/graphql")).await.unwrap();
    assert_eq!(graphiql.status(), 404);
    stack.stop().await;
}

/// L2: `ledger serve` refuses an obviously weak secret and says how to make one.
#[tokio::test]
async fn l2_a_weak_secret_is_refused_at_start() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("LEDGER_JWT_SECRET", "a".repeat(32))
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/unreachable")
        .env_remove("KAFKA_BROKERS")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("too weak") && stderr.contains("openssl rand"), "{stderr}");
}

/// L3 (another owner's ids answer like unknown ones) is in `graphql::the_authorization_matrix_…`.
///
/// L4: error messages are bounded, and a request the server cannot read is a JSON GraphQL error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn l4_errors_are_bounded_json() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let id = open_funded(&stack, &alice, "100").await;
    let input = json!({ "portfolioId": id, "symbol": "A".repeat(10_000), "side": "BUY", "type": "LIMIT", "quantity": "1", "limitPrice": "1" });
    let response =
        stack.gql(&alice, crate::graphql::PLACE_NO_WAIT, json!({ "input": input, "key": "long-symbol" })).await;
    let message = response["errors"][0]["message"].as_str().unwrap();
    assert!(message.len() <= 300, "{} bytes: {message}", message.len());
    for (body, content_type) in [("{not json", "application/json"), ("query=1", "application/x-www-form-urlencoded")] {
        let answer = reqwest::Client::new()
            .post(stack.url(0, "/graphql"))
            .bearer_auth(&alice)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400);
        let json: Value = answer.json().await.expect("a JSON body");
        assert_eq!(error_code(&json).as_deref(), Some("BAD_REQUEST"), "{json}");
        assert!(!json.to_string().contains("Custom"), "{json}");
    }
    stack.stop().await;
}

/// L5: failed authentications are rate limited per address, before the token is looked at.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn l5_invalid_tokens_are_rate_limited() {
    let stack = Stack::start(1).await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..100 {
        let response = http
            .post(stack.url(0, "/graphql"))
            .bearer_auth("not.a.token")
            .json(&json!({ "query": "{ prices { symbol } }" }))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(refused >= 50, "{refused} of 100 refused: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429));
    stack.stop().await;
}

/// L6: a standard HS256 JWT without `typ` is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn l6_a_token_without_typ_is_accepted() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let stack = Stack::start(1).await;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#);
    let exp = (chrono::Utc::now() + chrono::Duration::hours(1)).timestamp();
    let claims = URL_SAFE_NO_PAD.encode(json!({ "sub": "alice", "role": "trader", "iat": 0, "exp": exp }).to_string());
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(crate::support::SECRET.as_bytes()).unwrap();
    mac.update(format!("{header}.{claims}").as_bytes());
    let token = format!("{header}.{claims}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
    let response = stack.gql(&token, "{ prices { symbol } }", json!({})).await;
    assert!(error_code(&response).is_none(), "{response}");
    stack.stop().await;
}

/// L7: GraphiQL (when on) loads nothing from another origin and works: headless Chromium opens it, runs a query
/// and a subscription with a token, and every request stays on the ledger's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn l7_graphiql_is_served_by_the_ledger_itself() {
    let modules = std::env::var("LEDGER_NODE_MODULES")
        .expect("set LEDGER_NODE_MODULES to a node_modules with playwright-core (./scripts/test does)");
    let stack = Stack::start_with(1, |config| config.introspection = true).await;
    let page = reqwest::get(stack.url(0, "/graphql")).await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"), "the page names another origin");
    // A steady market for the subscription GraphiQL opens: a tick every 200 ms until the browser is done.
    let hub = stack.instances[0].hub.clone();
    assert!(eventually(|| async { hub.ticks_live() }).await, "the tick feed never became live");
    let market = tokio::spawn({
        let publisher = ledger::market::TickPublisher::new(&stack.kafka).unwrap();
        async move {
            for seq in 1.. {
                let tick = ledger::market::Tick {
                    version: ledger::market::TICK_VERSION,
                    symbol: ledger::domain::values::Symbol::new("ACME").unwrap(),
                    price: ledger::domain::values::Price::new(rust_decimal::Decimal::new(10_000 + seq, 2)).unwrap(),
                    ts: chrono::Utc::now(),
                    seq,
                    volume: None,
                    source: "test".into(),
                };
                let _ = publisher.publish(&tick).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let screenshot = std::env::temp_dir().join(format!("graphiql-{}.png", uuid::Uuid::new_v4().simple()));
    let token = stack.token("alice", Role::Trader);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/graphiql.cjs");
    let output = tokio::time::timeout(
        CONDITION_WAIT_MAX,
        tokio::process::Command::new("node")
            .args([script, &stack.url(0, ""), screenshot.to_str().unwrap(), &token])
            .env("NODE_PATH", modules)
            .output(),
    )
    .await
    .expect("the browser test never ended")
    .expect("node");
    assert!(
        output.status.success(),
        "GraphiQL browser test failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    market.abort();
    std::fs::remove_file(screenshot).ok();
    stack.stop().await;
}
