//! Subscriptions over graphql-transport-ws: the npm `graphql-ws` client, two API instances, resuming the log,
//! slow clients, and who may subscribe to what.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ledger_api::auth::Role;
use serde_json::{json, Value};

use crate::graphql::{fill, open_funded, place, DEPOSIT};
use crate::support::{
    error_code, eventually, flood_rounds, without_keep_alive, Stack, WsSubscription, CONDITION_WAIT_MAX,
};

/// A subscription run by Node with the npm `graphql-ws` client; its output lines arrive on a channel.
struct NodeSubscriber {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl NodeSubscriber {
    fn start(url: &str, token: &str, query: &str, variables: Value) -> NodeSubscriber {
        let modules = std::env::var("LEDGER_NODE_MODULES")
            .expect("set LEDGER_NODE_MODULES to a node_modules with graphql-ws and ws (./scripts/test does)");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/subscribe.cjs");
        let mut child = Command::new("node")
            .args([script, url, token, query, &variables.to_string()])
            .env("NODE_PATH", modules)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str(&line) {
                    if sender.send(value).is_err() {
                        return;
                    }
                }
            }
        });
        NodeSubscriber { child, lines }
    }

    /// Waits (without blocking the runtime) for a line matching `wanted`.
    async fn wait_for(&self, wanted: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = std::time::Instant::now() + CONDITION_WAIT_MAX;
        while std::time::Instant::now() < deadline {
            match self.lines.try_recv() {
                Ok(line) if wanted(&line) => return Some(line),
                Ok(_) => {}
                Err(mpsc::TryRecvError::Empty) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(mpsc::TryRecvError::Disconnected) => return None,
            }
        }
        None
    }
}

impl Drop for NodeSubscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_graphql_ws_client_receives_order_portfolio_and_price_updates() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let broker = stack.token("gateway", Role::Broker);
    let id = open_funded(&stack, &alice, "10000").await;
    let url = stack.ws_url(0);
    let orders = NodeSubscriber::start(
        &url,
        &alice,
        "subscription($p: UUID!) { orderUpdates(portfolioId: $p) { position orderId eventType status cumQuantity } }",
        json!({ "p": id }),
    );
    let portfolio = NodeSubscriber::start(
        &url,
        &alice,
        "subscription($p: UUID!) { portfolioUpdates(id: $p) { position cause cash reserved positions { symbol quantity } } }",
        json!({ "p": id }),
    );
    let prices = NodeSubscriber::start(
        &url,
        &alice,
        "subscription { priceTicks(symbols: [\"ACME\"]) { symbol price seq } }",
        json!({}),
    );
    for subscriber in [&orders, &portfolio, &prices] {
        assert!(subscriber.wait_for(|l| l["type"] == "connected").await.is_some(), "no connection");
    }
    stack.wait_subscriptions(0, 3).await;
    let hub = &stack.instances[0].hub;
    assert!(eventually(|| async { hub.ticks_live() }).await, "the tick feed never became live");

    let input = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "LIMIT", "quantity": "4", "limitPrice": "50" });
    let (order, _) = place(&stack, &alice, input).await;
    fill(&stack, &broker, &order, "x1", "4", "49.5", "0").await;
    stack.publish_tick("ACME", "49.75", 1).await;

    let filled = orders.wait_for(|l| l["data"]["orderUpdates"]["status"] == "FILLED").await.expect("the order update");
    assert_eq!(filled["data"]["orderUpdates"]["orderId"], order.as_str());
    assert_eq!(filled["data"]["orderUpdates"]["cumQuantity"], "4");
    assert!(filled["data"]["orderUpdates"]["position"].as_str().unwrap().contains(':'));
    let booked = portfolio
        .wait_for(|l| l["data"]["portfolioUpdates"]["cause"] == "ExecutionApplied")
        .await
        .expect("the portfolio update");
    assert_eq!(booked["data"]["portfolioUpdates"]["cash"], "9802");
    assert_eq!(booked["data"]["portfolioUpdates"]["positions"][0]["quantity"], "4");
    let tick = prices.wait_for(|l| l["type"] == "next").await.expect("the price tick");
    assert_eq!(tick["data"]["priceTicks"], json!({ "symbol": "ACME", "price": "49.75", "seq": 1 }));
    drop((orders, portfolio, prices));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mutation_through_one_instance_reaches_a_subscriber_on_another() {
    let stack = Stack::start(2).await;
    let alice = stack.token("alice", Role::Trader);
    let id = open_funded(&stack, &alice, "1000").await;
    let mut subscriber = WsSubscription::open(
        &stack.ws_url(1),
        Some(&alice),
        "subscription($p: UUID!) { portfolioUpdates(id: $p) { cause cash } }",
        json!({ "p": id }),
    )
    .await
    .unwrap();
    stack.wait_subscriptions(1, 1).await;
    let deposit = stack.gql_on(0, Some(&alice), DEPOSIT, json!({ "id": id, "amount": "234", "key": "via-a" })).await;
    assert!(error_code(&deposit).is_none(), "{deposit}");
    // "From now" is the log's head when the subscription starts: the opening deposit is not repeated.
    let update = subscriber.next(CONDITION_WAIT_MAX).await.expect("an update on instance B");
    assert_eq!(update["data"]["portfolioUpdates"], json!({ "cause": "CashDeposited", "cash": "1234" }));
    subscriber.close().await;
    stack.stop().await;
}

/// A `logEvents` subscriber disconnects, changes are made, it reconnects with its last cursor: it receives
/// exactly the events after that cursor — nothing missing, nothing repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_events_resume_after_a_reconnect_without_gaps_or_repeats() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let auditor = stack.token("audit", Role::Auditor);
    let id = open_funded(&stack, &alice, "1").await;
    let query =
        "subscription($after: LogPosition) { logEvents(after: $after) { position aggregateId sequence eventType } }";
    let mut first =
        WsSubscription::open(&stack.ws_url(0), Some(&auditor), query, json!({ "after": null })).await.unwrap();
    stack.wait_subscriptions(0, 1).await;
    stack.ok(&alice, DEPOSIT, json!({ "id": id, "amount": "1", "key": "before-1" })).await;
    let seen = first.next(CONDITION_WAIT_MAX).await.expect("a live event");
    let last = seen["data"]["logEvents"]["position"].as_str().unwrap().to_string();
    first.close().await;

    for n in 0..5 {
        stack.ok(&alice, DEPOSIT, json!({ "id": id, "amount": "1", "key": format!("while-away-{n}") })).await;
    }
    let mut resumed =
        WsSubscription::open(&stack.ws_url(0), Some(&auditor), query, json!({ "after": last })).await.unwrap();
    let mut received = Vec::new();
    while received.len() < 5 {
        let Some(message) = resumed.next(CONDITION_WAIT_MAX).await else { break };
        received.push(message["data"]["logEvents"].clone());
    }
    // More changes continue the stream; nothing arrived in between (the comparison with the log below would
    // show an extra or repeated event).
    stack.ok(&alice, DEPOSIT, json!({ "id": id, "amount": "1", "key": "after-resume" })).await;
    received.push(resumed.next(CONDITION_WAIT_MAX).await.expect("live after resume")["data"]["logEvents"].clone());

    let expected: Vec<(String, i64)> = sqlx::query_as(
        "select transaction_id::text || ':' || global_position, sequence from events
          where (transaction_id, global_position) > ($1::text::xid8, $2) order by transaction_id, global_position",
    )
    .bind(last.split(':').next().unwrap())
    .bind(last.split(':').nth(1).unwrap().parse::<i64>().unwrap())
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let got: Vec<(String, i64)> = received
        .iter()
        .map(|e| (e["position"].as_str().unwrap().to_string(), e["sequence"].as_i64().unwrap()))
        .collect();
    assert_eq!(got, expected);
    let unique: HashSet<&String> = got.iter().map(|(p, _)| p).collect();
    assert_eq!(unique.len(), got.len());
    resumed.close().await;
    stack.stop().await;
}

/// A subscriber that does not read is told to resync instead of making the server buffer without bound.
/// Reads a subscription until it ends: how many messages it delivered, and the last one.
async fn read_to_the_end(subscription: &mut WsSubscription) -> (i64, Value) {
    let mut last = None;
    let mut received = 0;
    while let Some(message) = subscription.next(CONDITION_WAIT_MAX).await {
        received += 1;
        last = Some(message);
    }
    (received, last.expect("some messages"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_subscriber_is_told_to_resync() {
    let stack = Stack::start(1).await;
    let auditor = stack.token("audit", Role::Auditor);
    let mut slow = WsSubscription::open(
        &stack.ws_url(0),
        Some(&auditor),
        "subscription { logEvents { position payload metadata } }",
        json!({}),
    )
    .await
    .unwrap();
    stack.wait_subscriptions(0, 1).await;
    // 30,000 events with 1 KB payloads: far beyond the feed buffer and the socket buffers.
    for chunk in 0..30 {
        sqlx::query(
            "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             select 'Flood', 'flood-' || $1, g, 'Flooded', '1', jsonb_build_object('pad', repeat('x', 1000)), '{}'
               from generate_series(1, 1000) g",
        )
        .bind(chunk)
        .execute(&stack.pool)
        .await
        .unwrap();
    }
    // The feed has offered all of them to the subscriber, which read none: it is far behind.
    let head = ledger::log::newest_position(&stack.pool, ledger::log::Newest::Committed).await.unwrap();
    let hub = &stack.instances[0].hub;
    assert!(eventually(|| async { hub.log_position() >= head }).await, "the log feed never reached the head");
    let (received, last) = read_to_the_end(&mut slow).await;
    assert_eq!(error_code(&last).as_deref(), Some("RESYNC_REQUIRED"), "last message: {last}");
    assert!(received < 30_000, "the subscription ended early rather than delivering everything");
    stack.stop().await;
}

/// Ticks in all: their frames (~150 bytes each) are several times what the loopback sockets and the feed buffer
/// of the subscriber that does not read can hold.
const TICK_FLOOD: i64 = 80_000;

/// One broadcast feed, two subscribers: the one that stops reading falls more than the feed's buffer behind
/// and is cut off with `RESYNC_REQUIRED`; the other, on the same feed, receives every tick in order meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tick_subscriber_that_stops_reading_is_cut_off_while_another_gets_every_tick() {
    let stack = Stack::start_with(1, without_keep_alive).await;
    let query = "subscription { priceTicks(symbols: [\"FLOOD\"]) { symbol price ts seq volume } }";
    let url = stack.ws_url(0);
    let mut slow =
        WsSubscription::open(&url, Some(&stack.token("slow", Role::Trader)), query, json!({})).await.unwrap();
    let mut reader =
        WsSubscription::open(&url, Some(&stack.token("reader", Role::Trader)), query, json!({})).await.unwrap();
    stack.wait_subscriptions(0, 2).await;
    let hub = &stack.instances[0].hub;
    assert!(eventually(|| async { hub.ticks_live() }).await, "the tick feed never became live");
    let publisher = ledger::market::TickPublisher::new(&stack.kafka).unwrap();
    for round in flood_rounds("FLOOD", TICK_FLOOD) {
        publisher.publish_all(&round).await.unwrap();
        // The reader gets the whole round, in order, before the next one is published.
        for seq in round.iter().map(|tick| tick.seq) {
            let message = reader.next(CONDITION_WAIT_MAX).await.unwrap_or_else(|| panic!("tick {seq} never came"));
            assert_eq!(message["data"]["priceTicks"]["seq"], seq, "{message}");
        }
    }
    // Every tick was offered to both; the one that read nothing is told to resync once it reads.
    let (received, last) = read_to_the_end(&mut slow).await;
    assert_eq!(error_code(&last).as_deref(), Some("RESYNC_REQUIRED"), "last message: {last}");
    assert!(received < TICK_FLOOD, "the subscription delivered everything instead of being cut off");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriptions_are_authenticated_and_authorized() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let bob = stack.token("bob", Role::Trader);
    let id = open_funded(&stack, &alice, "1").await;
    let url = stack.ws_url(0);
    // No token: the connection is refused at connection_init.
    let refused = WsSubscription::open(&url, None, "subscription { priceTicks { symbol } }", json!({})).await;
    assert!(refused.is_err(), "an anonymous connection was accepted");
    let expired = ledger_api::auth::TokenKeys::new(crate::support::SECRET).unwrap().issue(
        "alice",
        Role::Trader,
        chrono::Duration::seconds(-1),
        chrono::Utc::now(),
    );
    assert!(WsSubscription::open(&url, Some(&expired), "subscription { priceTicks { symbol } }", json!({}))
        .await
        .is_err());

    for (query, variables) in [
        ("subscription($p: UUID!) { portfolioUpdates(id: $p) { cash } }", json!({ "p": id })),
        ("subscription($p: UUID!) { orderUpdates(portfolioId: $p) { status } }", json!({ "p": id })),
        ("subscription($p: UUID!) { alertFired(portfolioId: $p) { kind } }", json!({ "p": id })),
        ("subscription { logEvents { position } }", json!({})),
    ] {
        let mut subscription = WsSubscription::open(&url, Some(&bob), query, variables).await.unwrap();
        let answer = subscription.next(CONDITION_WAIT_MAX).await.expect("an answer");
        let expected = if query.contains("logEvents") { "FORBIDDEN" } else { "PORTFOLIO_NOT_FOUND" };
        assert_eq!(error_code(&answer).as_deref(), Some(expected), "{query}: {answer}");
        subscription.close().await;
    }
    stack.stop().await;
}

/// Publishes ACME ticks at `price` until the ledger holds `count` alert firings.
async fn fire_until(stack: &Stack, price: &str, count: i64, seq: &mut i64) {
    let fired = eventually(|| {
        *seq += 1;
        let seq = *seq;
        async move {
            stack.publish_tick("ACME", price, seq).await;
            let firings: i64 =
                sqlx::query_scalar("select count(*) from alert_firings").fetch_one(&stack.pool).await.unwrap();
            firings >= count
        }
    })
    .await;
    assert!(fired, "the alerts never fired {count} times");
}

/// `alertFired(after:)` resumes: a subscriber that was away when an alert fired gets it, and not the one it
/// already had.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alert_fired_resumes_after_the_last_firing_received() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let id = open_funded(&stack, &alice, "100").await;
    let create = "mutation($p: UUID!, $c: AlertConditionInput!, $k: String!) { createAlert(portfolioId: $p, condition: $c, idempotencyKey: $k) { alertId } }";
    let mut alerts = Vec::new();
    for level in ["20", "30"] {
        let condition = json!({ "kind": "PRICE_ABOVE", "symbol": "ACME", "level": level });
        let data = stack.ok(&alice, create, json!({ "p": id, "c": condition, "k": level })).await;
        alerts.push(data["createAlert"]["alertId"].clone());
    }
    let query = "subscription($p: UUID!, $a: LogPosition) { alertFired(portfolioId: $p, after: $a) { position alertId price } }";
    let url = stack.ws_url(0);
    let mut first = WsSubscription::open(&url, Some(&alice), query, json!({ "p": id })).await.unwrap();
    stack.wait_subscriptions(0, 1).await;
    let mut seq = 0;
    fire_until(&stack, "25", 1, &mut seq).await;
    let received = first.next(CONDITION_WAIT_MAX).await.expect("the first firing");
    let received = &received["data"]["alertFired"];
    assert_eq!(received["alertId"], alerts[0], "{received}");
    let position = received["position"].clone();
    first.close().await;

    // Away while the second alert fires; back after the first firing's position.
    fire_until(&stack, "35", 2, &mut seq).await;
    let mut back = WsSubscription::open(&url, Some(&alice), query, json!({ "p": id, "a": position })).await.unwrap();
    let missed = back.next(CONDITION_WAIT_MAX).await.expect("the firing missed while away");
    let missed = &missed["data"]["alertFired"];
    assert_eq!((&missed["alertId"], &missed["price"]), (&alerts[1], &json!("35")), "{missed}");
    assert_ne!(missed["position"], position);
    back.close().await;
    stack.stop().await;
}
