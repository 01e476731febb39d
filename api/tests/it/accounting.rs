//! Fills are facts, seen through the API: a fill the portfolio cannot pay is booked and the deficit is visible
//! everywhere (the portfolio, a notice to its owner, an operator query, metrics); steps the process manager
//! could not apply are listed and retried by admins; `waitFor` waits for the process manager or says it could
//! not; time travel bounds the history; open lots are listed; reject codes are spelled like error codes.

use ledger_api::auth::Role;
use serde_json::{json, Value};

use crate::graphql::{fill, open_funded, place, DEPOSIT};
use crate::support::{error_code, eventually, Stack, WsSubscription, CONDITION_WAIT_MAX};

const FILL_AT: &str = "mutation($input: RecordExecutionInput!, $key: String!) {
    recordExecution(input: $input, idempotencyKey: $key) { lastPosition }
}";
const PORTFOLIO: &str = "query($id: UUID!, $w: LogPosition) {
    portfolio(id: $id, waitFor: $w) {
        cash reserved buyingPower deficit
        positions { symbol quantity costBasis lots { lotId quantity cost unitCost } }
        executions(first: 10) { edges { node { execId fee } } }
        orders(first: 10) { edges { node { id status rejectCode } } }
    }
}";

/// The example of the outside accounting check, over GraphQL: buy 1 NVDA at limit 122.64 (123.8664 reserved),
/// withdraw down to 0.5 of buying power, fill 1 at 122.64 with a fee of 4.4733. The order is filled, the fill
/// booked and listed, the reservation released, the deficit of 2.7469 shown on the portfolio, to operators, in
/// the metrics, and pushed to the owner as a DEFICIT notice; withdrawals and buys are refused until a deposit
/// covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_the_portfolio_cannot_pay_is_booked_and_the_deficit_is_visible() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let broker = stack.token("gateway", Role::Broker);
    let auditor = stack.token("audit", Role::Auditor);
    let id = open_funded(&stack, &alice, "200").await;
    let mut notices = WsSubscription::open(
        &stack.ws_url(0),
        Some(&alice),
        "subscription($p: UUID!) { alertFired(portfolioId: $p) { kind symbol observedValue } }",
        json!({ "p": id }),
    )
    .await
    .unwrap();
    stack.wait_subscriptions(0, 1).await;

    let buy = json!({ "portfolioId": id, "symbol": "NVDA", "side": "BUY", "type": "LIMIT", "quantity": "1", "limitPrice": "122.64" });
    let (order, status) = place(&stack, &alice, buy).await;
    assert_eq!(status, "NEW");
    let withdraw = "mutation($id: UUID!) { withdraw(portfolioId: $id, amount: \"75.6336\", idempotencyKey: \"w-1\") { lastPosition } }";
    stack.ok(&alice, withdraw, json!({ "id": id })).await;
    let input = json!({ "orderId": order, "execId": "n1", "quantity": "1", "price": "122.64", "fee": "4.4733" });
    let filled = stack.ok(&broker, FILL_AT, json!({ "input": input, "key": "fill-n1" })).await["recordExecution"]
        ["lastPosition"]
        .clone();

    // waitFor the fill: the process manager has booked it and the read model shows the booking.
    let portfolio = stack.ok_visible(&alice, PORTFOLIO, json!({ "id": id, "w": filled })).await["portfolio"].clone();
    assert_eq!(
        (&portfolio["cash"], &portfolio["reserved"], &portfolio["buyingPower"], &portfolio["deficit"]),
        (&json!("-2.7469"), &json!("0"), &json!("-2.7469"), &json!("2.7469")),
        "{portfolio:#}"
    );
    assert_eq!(
        portfolio["positions"][0]["lots"],
        json!([{ "lotId": format!("{order}/n1"), "quantity": "1", "cost": "127.1133", "unitCost": "127.1133" }])
    );
    let order_status = stack
        .ok_visible(
            &alice,
            "query($id: UUID!, $w: LogPosition) { order(id: $id, waitFor: $w) { status executions { execId } } }",
            json!({ "id": order, "w": filled }),
        )
        .await;
    assert_eq!(order_status["order"], json!({ "status": "FILLED", "executions": [{ "execId": "n1" }] }));

    // The owner is told.
    let notice = notices.next(CONDITION_WAIT_MAX).await.expect("a deficit notice");
    assert_eq!(notice["data"]["alertFired"], json!({ "kind": "DEFICIT", "symbol": "NVDA", "observedValue": "2.7469" }));
    notices.close().await;

    // Operators see it, in a query and in the metrics; traders may not ask.
    let query = "{ portfoliosInDeficit(first: 10) { edges { node { portfolioId owner deficit } } } }";
    let listed = stack.ok(&auditor, query, json!({})).await;
    assert_eq!(
        listed["portfoliosInDeficit"]["edges"],
        json!([{ "node": { "portfolioId": id, "owner": "alice", "deficit": "2.7469" } }])
    );
    assert_eq!(error_code(&stack.gql(&alice, query, json!({})).await).as_deref(), Some("FORBIDDEN"));
    stack.wait_metric("ledger_portfolios_in_deficit", 1.0).await;
    stack.wait_metric("ledger_deficit_total", 2.7469).await;
    stack.wait_metric("ledger_process_failures{state=\"open\"}", 0.0).await;

    // Until covered: no withdrawal, no new buy (rejected with the reason, spelled like the error codes).
    let more =
        "mutation($id: UUID!) { withdraw(portfolioId: $id, amount: \"1\", idempotencyKey: \"w-2\") { lastPosition } }";
    assert_eq!(
        error_code(&stack.gql(&alice, more, json!({ "id": id })).await).as_deref(),
        Some("PORTFOLIO_IN_DEFICIT")
    );
    let small = json!({ "portfolioId": id, "symbol": "NVDA", "side": "BUY", "type": "LIMIT", "quantity": "1", "limitPrice": "1" });
    let placed = stack.ok(&alice, crate::graphql::PLACE_NO_WAIT, json!({ "input": small, "key": "small" })).await;
    let order_query = "query($id: UUID!, $w: LogPosition) { order(id: $id, waitFor: $w) { status rejectCode } }";
    let variables =
        json!({ "id": placed["placeOrder"]["orderId"], "w": placed["placeOrder"]["result"]["lastPosition"] });
    let rejected = stack.ok_visible(&alice, order_query, variables).await;
    assert_eq!(rejected["order"], json!({ "status": "REJECTED", "rejectCode": "PORTFOLIO_IN_DEFICIT" }));
    let covered = stack.ok(&alice, DEPOSIT, json!({ "id": id, "amount": "10", "key": "cover" })).await;
    let types: Vec<&str> =
        covered["deposit"]["events"].as_array().unwrap().iter().map(|e| e["eventType"].as_str().unwrap()).collect();
    assert_eq!(types, ["CashDeposited", "DeficitCovered"]);
    let last = covered["deposit"]["lastPosition"].clone();
    let portfolio = stack.ok_visible(&alice, PORTFOLIO, json!({ "id": id, "w": last })).await["portfolio"].clone();
    assert_eq!((&portfolio["deficit"], &portfolio["buyingPower"]), (&json!("0"), &json!("7.2531")));
    assert_eq!(stack.ok(&auditor, query, json!({})).await["portfoliosInDeficit"]["edges"], json!([]));
    stack.stop().await;
}

/// A step the process manager could not apply shows up for operators (query and metric) and an admin can
/// retry it once its cause is fixed, or dismiss it; who did it is recorded. Traders and auditors cannot act.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn process_failures_are_listed_and_an_admin_retries_or_dismisses_them() {
    let stack = Stack::start(1).await;
    let admin = stack.token("root", Role::Admin);
    let auditor = stack.token("audit", Role::Auditor);
    let alice = stack.token("alice", Role::Trader);
    // An order event the process manager cannot decode (written by a faulty tool straight into the log).
    let event_id = uuid::Uuid::now_v7();
    sqlx::query(
        "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, event_id)
         values ('Order', $1, 1, 'OrderPlaced', '1', '{\"OrderPlaced\": {\"garbage\": true}}', '{}', $2)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(event_id)
    .execute(&stack.pool)
    .await
    .unwrap();
    let list = "{ processFailures { edges { node { eventId errorCode resolution resolvedBy } } } }";
    let listed = eventually(|| async {
        stack.ok(&auditor, list, json!({})).await["processFailures"]["edges"].as_array().is_some_and(|e| e.len() == 1)
    })
    .await;
    assert!(listed, "the failure was never listed");
    let node = stack.ok(&auditor, list, json!({})).await["processFailures"]["edges"][0]["node"].clone();
    assert_eq!((&node["eventId"], &node["errorCode"]), (&json!(event_id), &json!("UNDECODABLE_EVENT")));
    stack.wait_metric("ledger_process_failures{state=\"open\"}", 1.0).await;
    assert_eq!(error_code(&stack.gql(&alice, list, json!({})).await).as_deref(), Some("FORBIDDEN"));

    let retry = "mutation($e: UUID!) { retryProcessFailure(eventId: $e) { resolved errorCode } }";
    let dismiss = "mutation($e: UUID!) { dismissProcessFailure(eventId: $e) }";
    assert_eq!(error_code(&stack.gql(&auditor, retry, json!({ "e": event_id })).await).as_deref(), Some("FORBIDDEN"));
    let again = stack.ok(&admin, retry, json!({ "e": event_id })).await;
    assert_eq!(again["retryProcessFailure"], json!({ "resolved": false, "errorCode": "UNDECODABLE_EVENT" }));
    assert_eq!(stack.ok(&admin, dismiss, json!({ "e": event_id })).await["dismissProcessFailure"], true);
    assert_eq!(stack.ok(&admin, dismiss, json!({ "e": event_id })).await["dismissProcessFailure"], false);
    assert_eq!(stack.ok(&auditor, list, json!({})).await["processFailures"]["edges"], json!([]));
    let all = "{ processFailures(open: false) { edges { node { resolution resolvedBy } } } }";
    assert_eq!(
        stack.ok(&auditor, all, json!({})).await["processFailures"]["edges"][0]["node"],
        json!({ "resolution": "dismissed", "resolvedBy": "root" })
    );
    stack.wait_metric("ledger_process_failures{state=\"open\"}", 0.0).await;
    stack.stop().await;
}

/// `waitFor` never answers with a stale row: while the process manager is down, a position it has not passed
/// is `NOT_YET_VISIBLE` (after the bounded wait); once it runs, the same query answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_for_says_not_yet_visible_instead_of_answering_stale() {
    let stack = Stack::start_with(1, |config| config.with_process_manager = false).await;
    let alice = stack.token("alice", Role::Trader);
    // A process manager ran here before (its cursor is at the start) and is down now.
    ledger::log::save_cursor(&stack.pool, ledger::process::PROCESS_MANAGER, ledger::log::LogPosition::START)
        .await
        .unwrap();
    let id = open_funded(&stack, &alice, "100").await;
    let placed = stack
        .ok(
            &alice,
            crate::graphql::PLACE_NO_WAIT,
            json!({ "input": { "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "LIMIT", "quantity": "1", "limitPrice": "10" }, "key": "o-1" }),
        )
        .await["placeOrder"]["result"]["lastPosition"]
        .clone();
    let query = "query($id: UUID!, $w: LogPosition) { portfolio(id: $id, waitFor: $w) { reserved } }";
    let stale = stack.gql(&alice, query, json!({ "id": id, "w": placed })).await;
    assert_eq!(error_code(&stale).as_deref(), Some("NOT_YET_VISIBLE"), "{stale}");

    let commands = stack.instances[0].commands.clone();
    let manager = ledger::process::ProcessManager::new(commands, ledger::process::ProcessConfig::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn({
        let cancel = cancel.clone();
        async move { manager.run(cancel).await }
    });
    let reserved = stack.ok_visible(&alice, query, json!({ "id": id, "w": placed })).await;
    assert_eq!(reserved["portfolio"]["reserved"], "10.1");
    cancel.cancel();
    running.await.unwrap().unwrap();
    stack.stop().await;
}

/// Time travel bounds everything: the history of a portfolio `atPosition` stops at that position, and open
/// lots are those of then.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_in_time_travel_stops_at_the_point_asked_for() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let broker = stack.token("gateway", Role::Broker);
    let id = open_funded(&stack, &alice, "1000").await;
    let deposited = stack.ok(&alice, DEPOSIT, json!({ "id": id, "amount": "5", "key": "tt-5" })).await["deposit"]
        ["lastPosition"]
        .clone();
    let buy = json!({ "portfolioId": id, "symbol": "ACME", "side": "BUY", "type": "LIMIT", "quantity": "2", "limitPrice": "10" });
    let (order, _) = place(&stack, &alice, buy).await;
    fill(&stack, &broker, &order, "x1", "2", "10", "0").await;
    let query = "query($id: UUID!, $at: LogPosition) {
        portfolio(id: $id, atPosition: $at) { positions { quantity } history(first: 50) { edges { node { eventType } } } }
    }";
    let then = stack.ok(&alice, query, json!({ "id": id, "at": deposited })).await["portfolio"].clone();
    let types: Vec<Value> =
        then["history"]["edges"].as_array().unwrap().iter().map(|e| e["node"]["eventType"].clone()).collect();
    assert_eq!(types, [json!("PortfolioOpened"), json!("CashDeposited"), json!("CashDeposited")]);
    assert_eq!(then["positions"], json!([]));
    stack.stop().await;
}
