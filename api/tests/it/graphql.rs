//! The GraphQL API over HTTP on a random port, against a real PostgreSQL and the test broker, with the relay,
//! process manager and workers running: a full trading flow, authorization, limits, time travel, idempotency.

use ledger_api::auth::Role;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::support::{error_code, eventually, metric_value, Stack};

pub const OPEN: &str = "mutation($key: String!) {
    openPortfolio(input: { baseCurrency: \"USD\", costBasisMethod: FIFO }, idempotencyKey: $key) { aggregateId lastPosition }
}";
pub const DEPOSIT: &str = "mutation($id: UUID!, $amount: Decimal!, $key: String!) {
    deposit(portfolioId: $id, amount: $amount, idempotencyKey: $key) { aggregateId lastPosition events { sequence eventType position } }
}";
pub const PLACE: &str = "mutation($input: PlaceOrderInput!, $key: String!) {
    placeOrder(input: $input, idempotencyKey: $key, waitForAcceptanceMs: 8000) { orderId status result { aggregateId lastPosition } }
}";
pub const PLACE_NO_WAIT: &str = "mutation($input: PlaceOrderInput!, $key: String!) {
    placeOrder(input: $input, idempotencyKey: $key) { orderId result { aggregateId lastPosition } }
}";
const FILL: &str = "mutation($input: RecordExecutionInput!, $key: String!) {
    recordExecution(input: $input, idempotencyKey: $key) { aggregateId lastPosition }
}";
const CANCEL: &str =
    "mutation($id: UUID!, $key: String!) { cancelOrder(orderId: $id, idempotencyKey: $key) { lastPosition } }";
const PORTFOLIO: &str = "query($id: UUID!, $w: LogPosition) {
    portfolio(id: $id, waitFor: $w) {
        id owner cash reserved buyingPower realizedPnl
        positions { symbol quantity costBasis averageCost fifoCostBasis realizedPnl }
        valuation { marketValue unrealizedPnl totalEquity stale missingReason positions { symbol lastPrice unrealizedPnl } }
        orders(first: 10) { edges { node { id status side type cumQuantity leavesQuantity averagePrice executions { execId price } } } }
        history(first: 100) { edges { cursor node { eventType sequence position } } }
    }
}";

pub fn dec(value: &Value) -> Decimal {
    value.as_str().unwrap_or_else(|| panic!("not a decimal: {value}")).parse().unwrap()
}

/// Opens a portfolio for `token`'s subject with `cash`; returns its id.
pub async fn open_funded(stack: &Stack, token: &str, cash: &str) -> String {
    let key = uuid::Uuid::new_v4().to_string();
    let data = stack.ok(token, OPEN, json!({ "key": key })).await;
    let id = data["openPortfolio"]["aggregateId"].as_str().unwrap().to_string();
    stack.ok(token, DEPOSIT, json!({ "id": id, "amount": cash, "key": format!("{key}-dep") })).await;
    id
}

/// Places an order and returns its id and status once the process manager decided it (`waitForAcceptanceMs`
/// first; on a slow machine the decision may come later, then `order(waitFor:)` waits for it).
pub async fn place(stack: &Stack, token: &str, input: Value) -> (String, String) {
    let data = stack.ok(token, PLACE, json!({ "input": input, "key": uuid::Uuid::new_v4().to_string() })).await;
    let id = data["placeOrder"]["orderId"].as_str().unwrap().to_string();
    let mut status = data["placeOrder"]["status"].as_str().unwrap().to_string();
    if status == "PENDING_NEW" {
        let placed = data["placeOrder"]["result"]["lastPosition"].clone();
        let query = "query($id: UUID!, $w: LogPosition) { order(id: $id, waitFor: $w) { status } }";
        let order = stack.ok_visible(token, query, json!({ "id": id, "w": placed })).await;
        status = order["order"]["status"].as_str().unwrap().to_string();
    }
    (id, status)
}

pub async fn fill(stack: &Stack, broker: &str, order: &str, exec: &str, quantity: &str, price: &str, fee: &str) {
    let input = json!({ "orderId": order, "execId": exec, "quantity": quantity, "price": price, "fee": fee });
    stack.ok(broker, FILL, json!({ "input": input, "key": format!("{order}-{exec}") })).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_trading_flow_over_http() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let broker = stack.token("gateway", Role::Broker);
    stack.publish_tick("ACME", "100", 1).await;
    let id = open_funded(&stack, &alice, "10000").await;

    // A limit buy and a market buy (reserved at the last price + 5 %), filled by the broker.
    let limit_buy = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "LIMIT", "quantity": "10", "limitPrice": "101" });
    let (first, status) = place(&stack, &alice, limit_buy).await;
    assert_eq!(status, "NEW");
    fill(&stack, &broker, &first, "x1", "10", "100.5", "1").await;
    let priced = eventually(|| async {
        let data = stack.ok(&alice, "{ prices(symbols: [\"ACME\"]) { price } }", json!({})).await;
        data["prices"].as_array().is_some_and(|p| !p.is_empty())
    })
    .await;
    assert!(priced, "the price never reached the read model");
    let market_buy = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "MARKET", "quantity": "5" });
    let (second, status) = place(&stack, &alice, market_buy).await;
    assert_eq!(status, "NEW");
    fill(&stack, &broker, &second, "x1", "5", "100.8", "1").await;

    // A limit sell, partly filled, then cancelled by the trader.
    let sell = json!({ "portfolioId": id, "symbol": "ACME", "side": "SELL", "type": "LIMIT", "quantity": "8", "limitPrice": "110" });
    let (third, status) = place(&stack, &alice, sell).await;
    assert_eq!(status, "NEW");
    fill(&stack, &broker, &third, "x1", "3", "110", "0").await;
    let canceled = stack.ok(&alice, CANCEL, json!({ "id": third, "key": "cancel-3" })).await["cancelOrder"]
        ["lastPosition"]
        .clone();

    // buys: 10 × 100.5 + 1 = 1006 and 5 × 100.8 + 1 = 505; sell 3 × 110 = 330 against 3 of the first lot
    // (1006 × 3/10 = 301.8): realized 28.2, 12 left at 1209.2, cash 8819; valued at 100: −9.2.
    let settled = eventually(|| async {
        let p = &stack.ok(&alice, PORTFOLIO, json!({ "id": id })).await["portfolio"];
        // Fields are null until the read models have seen the portfolio.
        p["reserved"].as_str().and_then(|r| r.parse::<Decimal>().ok()).is_some_and(|r| r.is_zero())
            && p["positions"][0]["quantity"] == "12"
            && p["orders"]["edges"].as_array().is_some_and(|e| e.iter().any(|e| e["node"]["status"] == "CANCELED"))
            && !p["valuation"]["totalEquity"].is_null()
    })
    .await;
    // With `waitFor` the cancel's position: the process manager has released the reservation, and the
    // portfolio read model shows it.
    let portfolio = stack.ok_visible(&alice, PORTFOLIO, json!({ "id": id, "w": canceled })).await["portfolio"].clone();
    assert!(settled, "read models never settled: {portfolio:#}");
    assert_eq!(dec(&portfolio["cash"]), "8819".parse().unwrap());
    assert_eq!(dec(&portfolio["realizedPnl"]), "28.2".parse().unwrap());
    assert_eq!(dec(&portfolio["positions"][0]["costBasis"]), "1209.2".parse().unwrap());
    assert_eq!(dec(&portfolio["valuation"]["marketValue"]), "1200".parse().unwrap());
    assert_eq!(dec(&portfolio["valuation"]["unrealizedPnl"]), "-9.2".parse().unwrap());
    assert_eq!(dec(&portfolio["valuation"]["totalEquity"]), "10019".parse().unwrap());
    let orders = portfolio["orders"]["edges"].as_array().unwrap();
    assert_eq!(orders.len(), 3);
    let canceled = orders.iter().find(|e| e["node"]["id"] == third.as_str()).unwrap();
    assert_eq!(
        (canceled["node"]["cumQuantity"].as_str(), canceled["node"]["leavesQuantity"].as_str()),
        (Some("3"), Some("0"))
    );
    let history: Vec<&str> = portfolio["history"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["eventType"].as_str().unwrap())
        .collect();
    assert_eq!(history[..2], ["PortfolioOpened", "CashDeposited"]);
    assert_eq!(history.iter().filter(|t| **t == "ExecutionApplied").count(), 3);
    assert!(history.contains(&"ReservationReleased"));

    // The order's own history and state.
    let order = stack
        .ok(
            &alice,
            "query($id: UUID!) { order(id: $id) { status history { edges { node { eventType } } } } }",
            json!({ "id": third }),
        )
        .await;
    assert_eq!(order["order"]["status"], "CANCELED");
    assert_eq!(order["order"]["history"]["edges"].as_array().unwrap().len(), 4);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_key_twice_has_one_effect_and_the_same_response() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let id = open_funded(&stack, &alice, "100").await;
    let vars = json!({ "id": id, "amount": "25", "key": "dep-twice" });
    let first = stack.gql(&alice, DEPOSIT, vars.clone()).await;
    let second = stack.gql(&alice, DEPOSIT, vars).await;
    assert_eq!(first, second, "a repeated request gets the first answer");
    let other = stack.gql(&alice, DEPOSIT, json!({ "id": id, "amount": "26", "key": "dep-twice" })).await;
    assert_eq!(error_code(&other).as_deref(), Some("IDEMPOTENCY_KEY_REUSED"));
    let input = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "LIMIT", "quantity": "1", "limitPrice": "10" });
    let order_a = stack.ok(&alice, PLACE, json!({ "input": input, "key": "order-once" })).await;
    let order_b = stack.ok(&alice, PLACE, json!({ "input": input, "key": "order-once" })).await;
    assert_eq!(order_a["placeOrder"]["orderId"], order_b["placeOrder"]["orderId"]);
    assert_eq!(order_a["placeOrder"]["result"], order_b["placeOrder"]["result"]);
    let last = first["data"]["deposit"]["lastPosition"].clone();
    let cash = stack
        .ok(
            &alice,
            "query($id: UUID!, $w: LogPosition) { portfolio(id: $id, waitFor: $w) { cash } }",
            json!({ "id": id, "w": last }),
        )
        .await;
    assert_eq!(cash["portfolio"]["cash"], "125");
    let placed: i64 = sqlx::query_scalar("select count(*) from events where event_type = 'OrderPlaced'")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(placed, 1);
    stack.stop().await;
}

/// One row of the authorization matrix: name, (query, variables), token, expected error code.
type Case<'a> = (&'a str, &'a (&'a str, Value), Option<&'a str>, Option<&'a str>);

/// Every root field refuses what the matrix says: traders see and change only their own portfolios, no token
/// gets nothing, auditors change nothing, only brokers and admins record executions, only auditors and
/// admins read the log, only admins the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_authorization_matrix_holds_for_every_query_and_mutation() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let bob = stack.token("bob", Role::Trader);
    let auditor = stack.token("audit", Role::Auditor);
    let broker = stack.token("gateway", Role::Broker);
    let admin = stack.token("root", Role::Admin);
    let id = open_funded(&stack, &alice, "1000").await;
    let input = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "LIMIT", "quantity": "1", "limitPrice": "10" });
    let (order, _) = place(&stack, &alice, input.clone()).await;
    // Another owner's portfolio or order answers exactly like an unknown one: null for queries,
    // PORTFOLIO_NOT_FOUND / ORDER_NOT_FOUND for mutations. FORBIDDEN is only for what a role may never do.
    let alert = json!({ "kind": "PRICE_ABOVE", "symbol": "ACME", "level": "20" });
    let alert_id = stack
        .ok(&alice, "mutation($p: UUID!, $c: AlertConditionInput!) { createAlert(portfolioId: $p, condition: $c, idempotencyKey: \"a1\") { alertId } }", json!({ "p": id, "c": alert }))
        .await["createAlert"]["alertId"]
        .clone();

    let read_portfolio = ("query($id: UUID!) { portfolio(id: $id) { cash } }", json!({ "id": id }));
    let read_order = ("query($id: UUID!) { order(id: $id) { status } }", json!({ "id": order }));
    let read_log = ("{ log(first: 1) { edges { cursor } } }", json!({}));
    let read_dead = ("{ deadLetters(first: 1) { edges { cursor } } }", json!({}));
    let read_prices = ("{ prices { symbol } }", json!({}));
    let deposit = (DEPOSIT, json!({ "id": id, "amount": "1", "key": uuid::Uuid::new_v4().to_string() }));
    let withdraw = (
        "mutation($id: UUID!) { withdraw(portfolioId: $id, amount: \"1\", idempotencyKey: \"w\") { lastPosition } }",
        json!({ "id": id }),
    );
    let place_order = (PLACE, json!({ "input": input, "key": "matrix-order" }));
    let cancel = (CANCEL, json!({ "id": order, "key": "matrix-cancel" }));
    let record = (
        FILL,
        json!({ "input": { "orderId": order, "execId": "m1", "quantity": "1", "price": "10" }, "key": "matrix-fill" }),
    );
    let create_alert = ("mutation($p: UUID!, $c: AlertConditionInput!) { createAlert(portfolioId: $p, condition: $c, idempotencyKey: \"m\") { alertId } }", json!({ "p": id, "c": alert }));
    let cancel_alert = ("mutation($p: UUID!, $a: UUID!) { cancelAlert(portfolioId: $p, alertId: $a, idempotencyKey: \"m\") { lastPosition } }", json!({ "p": id, "a": alert_id }));
    let rearm_alert = ("mutation($p: UUID!, $a: UUID!) { rearmAlert(portfolioId: $p, alertId: $a, idempotencyKey: \"m\") { lastPosition } }", json!({ "p": id, "a": alert_id }));
    let open_for_alice =
        ("mutation { openPortfolio(input: { owner: \"alice\" }, idempotencyKey: \"m\") { aggregateId } }", json!({}));

    // (operation, token, expected error code or None for success)
    let cases: Vec<Case> = vec![
        ("portfolio/bob", &read_portfolio, Some(&bob), None),
        ("portfolio/broker", &read_portfolio, Some(&broker), Some("FORBIDDEN")),
        ("portfolio/anonymous", &read_portfolio, None, Some("UNAUTHENTICATED")),
        ("portfolio/auditor", &read_portfolio, Some(&auditor), None),
        ("portfolio/alice", &read_portfolio, Some(&alice), None),
        ("order/bob", &read_order, Some(&bob), None),
        ("order/broker", &read_order, Some(&broker), None),
        ("order/anonymous", &read_order, None, Some("UNAUTHENTICATED")),
        ("log/alice", &read_log, Some(&alice), Some("FORBIDDEN")),
        ("log/broker", &read_log, Some(&broker), Some("FORBIDDEN")),
        ("log/auditor", &read_log, Some(&auditor), None),
        ("deadLetters/auditor", &read_dead, Some(&auditor), Some("FORBIDDEN")),
        ("deadLetters/admin", &read_dead, Some(&admin), None),
        ("prices/anonymous", &read_prices, None, Some("UNAUTHENTICATED")),
        ("deposit/bob", &deposit, Some(&bob), Some("PORTFOLIO_NOT_FOUND")),
        ("deposit/auditor", &deposit, Some(&auditor), Some("FORBIDDEN")),
        ("deposit/broker", &deposit, Some(&broker), Some("FORBIDDEN")),
        ("deposit/anonymous", &deposit, None, Some("UNAUTHENTICATED")),
        ("withdraw/bob", &withdraw, Some(&bob), Some("PORTFOLIO_NOT_FOUND")),
        ("withdraw/auditor", &withdraw, Some(&auditor), Some("FORBIDDEN")),
        ("placeOrder/bob", &place_order, Some(&bob), Some("PORTFOLIO_NOT_FOUND")),
        ("placeOrder/auditor", &place_order, Some(&auditor), Some("FORBIDDEN")),
        ("cancelOrder/bob", &cancel, Some(&bob), Some("ORDER_NOT_FOUND")),
        ("cancelOrder/auditor", &cancel, Some(&auditor), Some("FORBIDDEN")),
        ("recordExecution/alice", &record, Some(&alice), Some("FORBIDDEN")),
        ("recordExecution/auditor", &record, Some(&auditor), Some("FORBIDDEN")),
        ("createAlert/bob", &create_alert, Some(&bob), Some("PORTFOLIO_NOT_FOUND")),
        ("cancelAlert/bob", &cancel_alert, Some(&bob), Some("PORTFOLIO_NOT_FOUND")),
        ("rearmAlert/auditor", &rearm_alert, Some(&auditor), Some("FORBIDDEN")),
        ("openPortfolio-for-alice/bob", &open_for_alice, Some(&bob), Some("FORBIDDEN")),
        ("openPortfolio/auditor", &open_for_alice, Some(&auditor), Some("FORBIDDEN")),
        ("openPortfolio-for-alice/admin", &open_for_alice, Some(&admin), None),
    ];
    for (name, (query, variables), token, expected) in cases {
        let response = stack.gql_on(0, token, query, variables.clone()).await;
        assert_eq!(error_code(&response).as_deref(), expected, "{name}: {response}");
    }
    // What the readers saw: nothing for bob, the portfolio and the order for alice and the auditor (read
    // models or, before they caught up, the aggregates).
    for (token, visible) in [(&bob, false), (&alice, true), (&auditor, true)] {
        let portfolio = stack.ok(token, read_portfolio.0, read_portfolio.1.clone()).await;
        assert_eq!(!portfolio["portfolio"].is_null(), visible, "{portfolio}");
        let order = stack.ok(token, read_order.0, read_order.1.clone()).await;
        assert_eq!(!order["order"].is_null(), visible, "{order}");
    }
    let mine = stack.ok(&bob, "{ myPortfolios { id } }", json!({})).await;
    assert_eq!(mine["myPortfolios"], json!([]), "bob sees none of alice's portfolios");
    // Auditors see every portfolio: alice's own and the one the admin opened for her (once projected).
    let both = eventually(|| async {
        let all = stack.ok(&auditor, "{ myPortfolios { id } }", json!({})).await;
        all["myPortfolios"].as_array().is_some_and(|p| p.len() == 2)
    })
    .await;
    assert!(both, "the auditor should see both portfolios");

    // A bad token is refused outright (401), as is a token signed with another key.
    let forged = ledger_api::auth::TokenKeys::new("another-secret-of-at-least-32-bytes!!").unwrap().issue(
        "alice",
        Role::Admin,
        chrono::Duration::hours(1),
        chrono::Utc::now(),
    );
    let response = stack.gql_on(0, Some(&forged), read_portfolio.0, read_portfolio.1.clone()).await;
    assert_eq!(error_code(&response).as_deref(), Some("UNAUTHENTICATED"));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_deep_over_complex_and_alias_heavy_queries_are_refused_and_pages_are_capped() {
    let stack = Stack::start_with(1, |config| config.introspection = true).await;
    let alice = stack.token("alice", Role::Trader);
    let id = open_funded(&stack, &alice, "1").await;

    let of_types = 16;
    let deep = format!(
        "{{ __schema {{ types {{ fields {{ type {{ {} name {} }} }} }} }} }}",
        "ofType { ".repeat(of_types),
        "} ".repeat(of_types)
    );
    let response = stack.gql(&alice, &deep, json!({})).await;
    assert!(response["errors"][0]["message"].as_str().unwrap().contains("nested too deep"), "{response}");

    let complex = "query($id: UUID!) { portfolio(id: $id) { orders(first: 100) { edges { node { history(first: 100) { edges { node { eventType payload metadata } } } } } } } }";
    let response = stack.gql(&alice, complex, json!({ "id": id })).await;
    assert!(response["errors"][0]["message"].as_str().unwrap().contains("too complex"), "{response}");

    let aliases: String = (0..31).map(|i| format!("p{i}: prices {{ symbol }} ")).collect();
    let response = stack.gql(&alice, &format!("{{ {aliases} }}"), json!({})).await;
    assert_eq!(error_code(&response).as_deref(), Some("QUERY_TOO_MANY_ALIASES"), "{response}");

    // 120 deposits: asking for 1000 history entries gets at most 100, with a next page.
    let mut last = Value::Null;
    for n in 0..120 {
        last = stack.ok(&alice, DEPOSIT, json!({ "id": id, "amount": "1", "key": format!("page-{n}") })).await
            ["deposit"]["lastPosition"]
            .clone();
    }
    let page = stack
        .ok(&alice, "query($id: UUID!, $w: LogPosition) { portfolio(id: $id, waitFor: $w) { history(first: 1000) { pageInfo { hasNextPage } edges { cursor } } } }", json!({ "id": id, "w": last }))
        .await;
    assert_eq!(page["portfolio"]["history"]["edges"].as_array().unwrap().len(), 100);
    assert_eq!(page["portfolio"]["history"]["pageInfo"]["hasNextPage"], true);

    // Oversized requests are refused before they are parsed.
    let huge = "x".repeat(300 * 1024);
    let response = reqwest::Client::new()
        .post(stack.url(0, "/graphql"))
        .bearer_auth(&alice)
        .json(&json!({ "query": format!("{{ prices {{ symbol }} }} # {huge}") }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rate_limit_refuses_a_burst_beyond_its_budget() {
    let stack = Stack::start_with(1, |config| {
        config.rate_limit_per_second = 1;
        config.rate_limit_burst = 5;
    })
    .await;
    let alice = stack.token("alice", Role::Trader);
    // 50 requests at once against a bucket of 5 refilled at 1 per second: the burst passes, then at most one
    // more per second elapsed (however slow the machine), and everything else is refused.
    let started = std::time::Instant::now();
    let mut codes = Vec::new();
    for _ in 0..50 {
        codes.push(error_code(&stack.gql(&alice, "{ prices { symbol } }", json!({})).await));
    }
    let refills = started.elapsed().as_secs() as usize + 1;
    let passed = codes.iter().filter(|c| c.is_none()).count();
    assert!(codes[..5].iter().all(Option::is_none), "{codes:?}");
    assert!((5..=5 + refills).contains(&passed), "{passed} passed in {refills} s: {codes:?}");
    assert!(codes.iter().all(|c| c.is_none() || c.as_deref() == Some("RATE_LIMITED")), "{codes:?}");
    stack.stop().await;
}

/// Time travel: the portfolio as it was before later trades, by time and by log position.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn time_travel_returns_the_earlier_state() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let broker = stack.token("gateway", Role::Broker);
    let id = open_funded(&stack, &alice, "5000").await;
    let after_deposit = stack.ok(&alice, DEPOSIT, json!({ "id": id, "amount": "1000", "key": "tt-dep" })).await
        ["deposit"]["lastPosition"]
        .clone();
    // `asOf` the moment the deposit was recorded: it includes the deposit and nothing later.
    let between: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("select recorded_at from events where aggregate_id = $1 order by sequence desc limit 1")
            .bind(&id)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    let input = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "LIMIT", "quantity": "10", "limitPrice": "50" });
    let (order, _) = place(&stack, &alice, input).await;
    let filled = stack
        .ok(
            &broker,
            FILL,
            json!({ "input": { "orderId": order, "execId": "x1", "quantity": "10", "price": "50" }, "key": "tt-fill" }),
        )
        .await["recordExecution"]["lastPosition"]
        .clone();
    let booked = stack
        .ok_visible(
            &alice,
            "query($id: UUID!, $w: LogPosition) { portfolio(id: $id, waitFor: $w) { cash } }",
            json!({ "id": id, "w": filled }),
        )
        .await;
    assert_eq!(booked["portfolio"]["cash"], "5500");

    let query = "query($id: UUID!, $at: LogPosition, $asOf: DateTime) {
        portfolio(id: $id, atPosition: $at, asOf: $asOf) { cash reserved asOf positions { symbol quantity } orders { edges { node { status } } } }
    }";
    for variables in [json!({ "id": id, "at": after_deposit }), json!({ "id": id, "asOf": between })] {
        let then = stack.ok(&alice, query, variables.clone()).await["portfolio"].clone();
        assert_eq!(then["cash"], "6000", "{variables}: {then}");
        assert_eq!(then["positions"], json!([]));
        assert_eq!(then["orders"]["edges"], json!([]), "no order existed yet");
        assert!(!then["asOf"].is_null());
    }
    let now = stack
        .ok(&alice, "query($id: UUID!) { portfolio(id: $id) { cash positions { quantity } } }", json!({ "id": id }))
        .await;
    assert_eq!(now["portfolio"]["positions"][0]["quantity"], "10");
    // The order as it was right after it was accepted: New, nothing filled.
    let accepted_at: (String, i64) = sqlx::query_as(
        "select transaction_id::text, global_position from events where aggregate_id = $1 and event_type = 'OrderAccepted'",
    )
    .bind(&order)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    let at = format!("{}:{}", accepted_at.0, accepted_at.1);
    let then = stack
        .ok(
            &alice,
            "query($id: UUID!, $at: LogPosition) { order(id: $id, atPosition: $at) { status cumQuantity } }",
            json!({ "id": order, "at": at }),
        )
        .await;
    assert_eq!((then["order"]["status"].as_str(), then["order"]["cumQuantity"].as_str()), (Some("NEW"), Some("0")));
    let both = stack.gql(&alice, query, json!({ "id": id, "at": after_deposit, "asOf": between })).await;
    assert_eq!(error_code(&both).as_deref(), Some("INVALID_INPUT"));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_refusals_are_typed_and_bad_input_is_invalid_input() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let id = open_funded(&stack, &alice, "100").await;
    let withdraw = "mutation($id: UUID!, $a: Decimal!) { withdraw(portfolioId: $id, amount: $a, idempotencyKey: \"w1\") { lastPosition } }";
    let response = stack.gql(&alice, withdraw, json!({ "id": id, "a": "100.01" })).await;
    assert_eq!(error_code(&response).as_deref(), Some("INSUFFICIENT_FUNDS"));
    let response = stack.gql(&alice, withdraw, json!({ "id": id, "a": "-5" })).await;
    assert_eq!(error_code(&response).as_deref(), Some("INVALID_INPUT"));
    let bad_order = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "LIMIT", "quantity": "0", "limitPrice": "10" });
    let response = stack.gql(&alice, PLACE, json!({ "input": bad_order, "key": "bad" })).await;
    assert_eq!(error_code(&response).as_deref(), Some("INVALID_INPUT"));
    let off_tick = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "LIMIT", "quantity": "1", "limitPrice": "10.001" });
    let response = stack.gql(&alice, PLACE, json!({ "input": off_tick, "key": "tick" })).await;
    assert_eq!(error_code(&response).as_deref(), Some("PRICE_OFF_TICK"));
    let no_limit = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "LIMIT", "quantity": "1" });
    let response = stack.gql(&alice, PLACE, json!({ "input": no_limit, "key": "nolimit" })).await;
    assert_eq!(error_code(&response).as_deref(), Some("INVALID_INPUT"));
    for (kind, prices) in [
        ("STOP", json!({ "limitPrice": "10" })),
        ("STOP_LIMIT", json!({ "stopPrice": "10" })),
        ("MARKET", json!({ "stopPrice": "10" })),
    ] {
        let mut input = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": kind, "quantity": "1" });
        input.as_object_mut().unwrap().extend(prices.as_object().unwrap().clone());
        let response = stack.gql(&alice, PLACE, json!({ "input": input, "key": format!("stop-{kind}") })).await;
        assert_eq!(error_code(&response).as_deref(), Some("INVALID_INPUT"), "{kind}: {response}");
    }
    // A stop order needs no market price: accepted, waiting for its trigger, its stop shown.
    let stop = json!({ "portfolioId": id, "symbol": "NOPRICE", "side": "BUY", "type": "STOP", "quantity": "0.5", "stopPrice": "10" });
    let placed = stack.ok(&alice, PLACE, json!({ "input": stop, "key": "stop" })).await["placeOrder"].clone();
    assert_eq!(placed["status"], "NEW", "{placed}");
    let query = "query($id: UUID!, $w: LogPosition) {
        order(id: $id, waitFor: $w) { type stopPrice limitPrice triggeredAt protectionPrice } }";
    let variables = json!({ "id": placed["orderId"], "w": placed["result"]["lastPosition"] });
    let order = stack.ok_visible(&alice, query, variables).await["order"].clone();
    assert_eq!(
        order,
        json!({ "type": "STOP", "stopPrice": "10", "limitPrice": null, "triggeredAt": null, "protectionPrice": "10.5" })
    );
    let missing = stack.gql(&alice, DEPOSIT, json!({ "id": uuid::Uuid::now_v7(), "amount": "1", "key": "k" })).await;
    assert_eq!(error_code(&missing).as_deref(), Some("PORTFOLIO_NOT_FOUND"));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_schema_matches_the_code() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql")).unwrap();
    assert!(
        committed == ledger_api::graphql::sdl(),
        "api/schema.graphql is out of date: run `cargo run -- schema > api/schema.graphql`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let stack = Stack::start_with(1, |config| config.introspection = true).await;
    let http = reqwest::Client::new();
    assert_eq!(http.get(stack.url(0, "/healthz")).send().await.unwrap().text().await.unwrap(), "ok");
    let ready = http.get(stack.url(0, "/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
    let graphiql = http.get(stack.url(0, "/graphql")).send().await.unwrap().text().await.unwrap();
    assert!(graphiql.contains("GraphiQL"));

    let before = stack.metrics().await;
    for name in [
        "ledger_commands_total",
        "ledger_command_duration_seconds_bucket",
        "ledger_http_requests_total",
        "ledger_subscriptions_open",
        "ledger_db_pool_connections",
        "ledger_log_head_position",
        "ledger_follower_lag_events",
    ] {
        assert!(before.contains(name), "missing {name} in\n{before}");
    }
    let value = |text: &str, series: &str| metric_value(text, series).unwrap_or(0.0);
    let alice = stack.token("alice", Role::Trader);
    open_funded(&stack, &alice, "10").await;
    let bad = stack.gql(&alice, "mutation { withdraw(portfolioId: \"00000000-0000-0000-0000-000000000000\", amount: \"1\", idempotencyKey: \"x\") { lastPosition } }", json!({})).await;
    assert!(error_code(&bad).is_some());
    let after = stack.metrics().await;
    assert!(
        value(&after, "ledger_commands_total{outcome=\"committed\"}")
            >= value(&before, "ledger_commands_total{outcome=\"committed\"}") + 2.0
    );
    assert!(value(&after, "ledger_http_requests_total") > value(&before, "ledger_http_requests_total"));
    // The database part is cached for a few seconds: wait for the log head to move.
    let head_before = value(&before, "ledger_log_head_position");
    let moved = eventually(|| async { value(&stack.metrics().await, "ledger_log_head_position") > head_before }).await;
    assert!(moved, "the log head never moved in /metrics");
    // The workers (in this stack's process) report their position and rebalances; the lag drains to 0.
    let last = std::sync::Mutex::new(String::new());
    let reported = eventually(|| async {
        let text = stack.metrics().await;
        let done = value(&text, "ledger_consumer_rebalances_total{projection=\"positions\"}") >= 1.0
            && text.contains("ledger_projection_lag_seconds{projection=\"positions\"}")
            && text.contains("ledger_projection_lag_events{projection=\"positions\"} 0");
        *last.lock().unwrap() = text;
        done
    })
    .await;
    assert!(reported, "projection metrics missing or lag not drained:\n{}", last.lock().unwrap());
    stack.stop().await;
}

/// `GET /audit/export` streams the same JSON Lines as `ledger export --format jsonl`, to auditors only, with
/// the chain head it sealed to in its headers, and refuses a bad filter with a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_download_streams_the_same_json_lines_as_the_export_command() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let auditor = stack.token("audit", Role::Auditor);
    let id = open_funded(&stack, &alice, "100").await;
    for n in 0..5 {
        stack.ok(&alice, DEPOSIT, json!({ "id": id, "amount": "1", "key": format!("audit-{n}") })).await;
    }
    let get = |token: Option<String>, query: &'static str| {
        let mut request = reqwest::Client::new().get(format!("{}?{query}", stack.url(0, "/audit/export")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(get(None, "").await.unwrap().status(), 401);
    assert_eq!(get(Some(alice.clone()), "").await.unwrap().status(), 403);
    let bad = get(Some(auditor.clone()), "from_position=9&to_position=2").await.unwrap();
    assert_eq!(bad.status(), 400);

    let response = get(Some(auditor.clone()), "").await.unwrap();
    assert_eq!(response.status(), 200);
    let count: i64 = response.headers()["x-ledger-chain-count"].to_str().unwrap().parse().unwrap();
    let downloaded = response.bytes().await.unwrap();
    assert_eq!(count, 7, "open, first deposit and five more deposits are sealed");

    let dir = std::env::temp_dir().join(format!("ledger-audit-http-{}", uuid::Uuid::new_v4().simple()));
    let options = ledger::audit::ExportOptions {
        format: ledger::audit::ExportFormat::Jsonl,
        out_dir: dir.clone(),
        filter: ledger::audit::ExportFilter::default(),
    };
    let manifest = ledger::audit::export(&stack.pool, &options, &mut |_, _| {}).await.unwrap();
    let file = std::fs::read(dir.join(&manifest.files[0].name)).unwrap();
    assert_eq!(manifest.count, 7);
    assert_eq!(downloaded.as_ref(), file.as_slice(), "the download and the export file differ");

    // A position range selects exactly the lines in it.
    let lines: Vec<Value> =
        file.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
    let (second, third) =
        (lines[1]["global_position"].as_i64().unwrap(), lines[2]["global_position"].as_i64().unwrap());
    let query = format!("from_position={second}&to_position={third}");
    let request =
        reqwest::Client::new().get(format!("{}?{query}", stack.url(0, "/audit/export"))).bearer_auth(&auditor);
    let range = request.send().await.unwrap().text().await.unwrap();
    let expected: Vec<&[u8]> = file.split(|b| *b == b'\n').skip(1).take(2).collect();
    assert_eq!(range.lines().map(str::as_bytes).collect::<Vec<_>>(), expected);
    std::fs::remove_dir_all(dir).ok();
    stack.stop().await;
}

const CASH_BATCH: &str = "mutation($m: [CashMovementInput!]!) {
    cashBatch(movements: $m) { result { aggregateId lastPosition events { sequence eventType } } error { code message } }
}";

/// `cashBatch`: one answer per movement, in order; refusals (funds, authorization, unknown portfolio, bad
/// amount) are per movement and write nothing; repeating the batch answers from the idempotency log; the
/// request's correlation id (from `x-correlation-id`) is in the events' metadata and in the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cash_batches_answer_per_movement_and_repeat_idempotently() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let bob = stack.token("bob", Role::Trader);
    let mine = open_funded(&stack, &alice, "100").await;
    let theirs = open_funded(&stack, &bob, "100").await;
    let movement = |id: &str, kind: &str, amount: &str, key: &str| json!({ "portfolioId": id, "kind": kind, "amount": amount, "idempotencyKey": key });
    let movements = json!([
        movement(&mine, "DEPOSIT", "10", "b1"),
        movement(&mine, "WITHDRAW", "500", "b2"),
        movement(&theirs, "DEPOSIT", "1", "b3"),
        movement("00000000-0000-0000-0000-000000000000", "DEPOSIT", "1", "b4"),
        movement(&mine, "DEPOSIT", "-1", "b5"),
        movement(&mine, "WITHDRAW", "110", "b6"),
    ]);
    let correlation = uuid::Uuid::now_v7();
    let response = reqwest::Client::new()
        .post(stack.url(0, "/graphql"))
        .bearer_auth(&alice)
        .header("x-correlation-id", correlation.to_string())
        .json(&json!({ "query": CASH_BATCH, "variables": { "m": movements } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-correlation-id"].to_str().unwrap(), correlation.to_string());
    assert!(response.headers()["traceparent"].to_str().unwrap().starts_with("00-"));
    let body: Value = response.json().await.unwrap();
    let answers = body["data"]["cashBatch"].as_array().unwrap_or_else(|| panic!("no answers: {body}")).clone();
    let codes: Vec<Option<&str>> = answers.iter().map(|a| a["error"]["code"].as_str()).collect();
    assert_eq!(
        codes,
        [
            None,
            Some("INSUFFICIENT_FUNDS"),
            Some("PORTFOLIO_NOT_FOUND"),
            Some("PORTFOLIO_NOT_FOUND"),
            Some("INVALID_INPUT"),
            None
        ]
    );
    assert_eq!(answers[0]["result"]["events"][0]["sequence"], 3);
    assert_eq!(answers[5]["result"]["events"][0]["sequence"], 4, "the withdrawal saw the deposit before it");

    let (cash, correlations): (Decimal, Vec<String>) = {
        let cash: Decimal = sqlx::query_scalar(
            "select (payload->'CashWithdrawn'->>'cash_after')::numeric from events
              where aggregate_id = $1 and sequence = 4",
        )
        .bind(&mine)
        .fetch_one(&stack.pool)
        .await
        .unwrap();
        let correlations = sqlx::query_scalar(
            "select metadata->>'correlation_id' from events where aggregate_id = $1 and sequence > 2 order by sequence",
        )
        .bind(&mine)
        .fetch_all(&stack.pool)
        .await
        .unwrap();
        (cash, correlations)
    };
    assert_eq!(cash, Decimal::ZERO);
    assert_eq!(correlations, [correlation.to_string(), correlation.to_string()]);
    let untouched: i64 = sqlx::query_scalar("select count(*) from events where aggregate_id = $1")
        .bind(&theirs)
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(untouched, 2);

    // The same batch again: the same answers, nothing written.
    let again = stack.gql(&alice, CASH_BATCH, json!({ "m": movements })).await;
    assert_eq!(again["data"]["cashBatch"][0]["result"], answers[0]["result"]);
    assert_eq!(again["data"]["cashBatch"][5]["result"], answers[5]["result"]);
    let events: i64 = sqlx::query_scalar("select count(*) from events where aggregate_id = $1")
        .bind(&mine)
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(events, 4);

    let too_many: Vec<Value> = (0..1_001).map(|n| movement(&mine, "DEPOSIT", "1", &format!("many-{n}"))).collect();
    let refused = stack.gql(&alice, CASH_BATCH, json!({ "m": too_many })).await;
    assert_eq!(error_code(&refused).as_deref(), Some("INVALID_INPUT"), "{refused}");

    let metrics = stack.metrics().await;
    let batches = metrics.lines().find(|l| l.starts_with("ledger_command_batches_total")).unwrap_or_default();
    assert!(batches.ends_with(" 2"), "two batches ran: {batches}");
    stack.stop().await;
}

const AMEND: &str = "mutation($id: UUID!, $q: Decimal, $limit: Decimal, $key: String!) {
    amendOrder(orderId: $id, quantity: $q, limitPrice: $limit, idempotencyKey: $key) { lastPosition }
}";

/// `amendOrder` over HTTP: a larger order's reservation grows with it and the order shows the new version in
/// its history; an amendment below the filled quantity and one on someone else's order are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_amended_over_http_shows_its_new_terms_and_reservation() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let broker = stack.token("gateway", Role::Broker);
    let id = open_funded(&stack, &alice, "1000").await;
    let buy = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "LIMIT", "quantity": "10", "limitPrice": "50" });
    let (order, status) = place(&stack, &alice, buy).await;
    assert_eq!(status, "NEW");

    let amended = stack.ok(&alice, AMEND, json!({ "id": order, "q": "15", "key": "amend-1" })).await;
    let query = "query($o: UUID!, $w: LogPosition) {
        order(id: $o, waitFor: $w) { quantity leavesQuantity limitPrice history(first: 10) { edges { node { eventType } } } } }";
    let w = amended["amendOrder"]["lastPosition"].clone();
    let data = stack.ok_visible(&alice, query, json!({ "o": order, "w": w })).await;
    assert_eq!(
        (dec(&data["order"]["quantity"]), dec(&data["order"]["leavesQuantity"])),
        (dec(&json!("15")), dec(&json!("15")))
    );
    let events: Vec<&str> = data["order"]["history"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["eventType"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["OrderPlaced", "OrderAccepted", "OrderAmendRequested", "OrderAmended"]);
    // 15 × 50 × 1.01 reserved (the portfolio read model may trail the order's: asked again until it shows it).
    let reserved = eventually(|| async {
        let p = stack.ok(&alice, "query($id: UUID!) { portfolio(id: $id) { reserved } }", json!({ "id": id })).await;
        p["portfolio"]["reserved"].as_str().and_then(|r| r.parse::<Decimal>().ok()) == Some("757.5".parse().unwrap())
    })
    .await;
    assert!(reserved, "the reservation should grow to 757.5");

    fill(&stack, &broker, &order, "x1", "6", "50", "0").await;
    let below = stack.gql(&alice, AMEND, json!({ "id": order, "q": "5", "key": "amend-2" })).await;
    assert_eq!(error_code(&below).as_deref(), Some("AMEND_BELOW_FILLED"), "{below}");
    let bob = stack.token("bob", Role::Trader);
    let foreign = stack.gql(&bob, AMEND, json!({ "id": order, "q": "20", "key": "amend-3" })).await;
    assert_eq!(error_code(&foreign).as_deref(), Some("ORDER_NOT_FOUND"), "{foreign}");
    stack.stop().await;
}
