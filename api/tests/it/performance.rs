//! `performance` end to end: a statement imported, ticks published with their historical times, and the
//! figures of docs/performance.md's worked example read back over GraphQL, with the `performance` and `prices`
//! projections running against the real PostgreSQL and the test broker.

use ledger_api::auth::Role;
use serde_json::json;

use crate::graphql::{dec, OPEN};
use crate::support::{eventually, Stack};

const IMPORT: &str = "mutation($id: UUID!, $csv: String!) {
    importStatement(portfolioId: $id, csv: $csv) { applied errors { line reason } lastPosition }
}";
const PERFORMANCE: &str = "query($id: UUID!, $from: DateTime, $to: DateTime, $w: LogPosition) {
    performance(portfolioId: $id, from: $from, to: $to, interval: DAY, waitFor: $w) {
        startEquity endEquity netFlows timeWeightedReturn moneyWeightedReturn maxDrawdown
        points { at equity cash netDeposits cumulativeReturn }
    }
}";

/// docs/performance.md's example: 1,000 in ACME at 100, a fall to 80, 1,100 more at 110, 121 at the end.
const STATEMENT: &str = "\
date,symbol,side,quantity,price,fee
2021-01-01,ACME,buy,10,100,0
2022-01-01,ACME,buy,10,110,0
date,type,amount
2021-01-01,deposit,1000
2022-01-01,deposit,1100
";

fn day(text: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(&format!("{text}T00:00:00Z")).unwrap().into()
}

#[tokio::test]
async fn performance_answers_the_worked_example_of_the_docs() {
    let stack = Stack::start(1).await;
    let alice = stack.token("alice", Role::Trader);
    let opened = stack.ok(&alice, OPEN, json!({ "key": "open-for-performance" })).await;
    let id = opened["openPortfolio"]["aggregateId"].as_str().unwrap().to_string();
    let imported = stack.ok(&alice, IMPORT, json!({ "id": id, "csv": STATEMENT })).await["importStatement"].clone();
    assert_eq!(imported["applied"], 4, "{imported}");

    // The market, at its own times: published to the prices topic, projected into one-minute bars.
    for (seq, (date, price)) in [("2021-07-01", "80"), ("2022-01-01", "110"), ("2023-01-01", "121")].iter().enumerate()
    {
        stack.publish_tick_at("ACME", price, seq as i64 + 1, day(date)).await;
    }
    let barred = eventually(|| async {
        let bars: i64 = sqlx::query_scalar("select count(*) from price_bars_1m where symbol = 'ACME'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
        bars == 3
    })
    .await;
    assert!(barred, "the ticks never reached the price bars");

    let variables = json!({ "id": id, "from": "2021-01-01T00:00:00Z", "to": "2023-01-01T00:00:00Z", "w": imported["lastPosition"] });
    let performance = stack.ok_visible(&alice, PERFORMANCE, variables.clone()).await["performance"].clone();
    assert_eq!(dec(&performance["startEquity"]), "1000".parse().unwrap(), "{performance}");
    assert_eq!(dec(&performance["endEquity"]), "2420".parse().unwrap(), "{performance}");
    assert_eq!(dec(&performance["netFlows"]), "1100".parse().unwrap(), "{performance}");
    assert_eq!(dec(&performance["timeWeightedReturn"]), "0.21".parse().unwrap(), "{performance}");
    assert_eq!(dec(&performance["moneyWeightedReturn"]), "0.1".parse().unwrap(), "{performance}");
    assert_eq!(dec(&performance["maxDrawdown"]), "0.2".parse().unwrap(), "{performance}");
    let points = performance["points"].as_array().unwrap();
    assert_eq!(points.len(), 731);
    let at = |date: &str| points.iter().find(|p| p["at"].as_str().unwrap().starts_with(date)).unwrap().clone();
    assert_eq!(
        (dec(&at("2021-06-30")["equity"]), dec(&at("2021-07-01")["equity"])),
        ("1000".parse().unwrap(), "800".parse().unwrap())
    );
    assert_eq!(dec(&at("2022-01-01")["netDeposits"]), "2100".parse().unwrap());
    assert_eq!(dec(&at("2022-01-01")["cumulativeReturn"]), "0.1".parse().unwrap());

    // Someone else's portfolio answers null; too many points is a clear error.
    let bob = stack.token("bob", Role::Trader);
    assert!(stack.ok(&bob, PERFORMANCE, variables).await["performance"].is_null());
    let minutes = stack
        .gql(&alice, "query($id: UUID!) { performance(portfolioId: $id, from: \"2021-01-01T00:00:00Z\", to: \"2022-01-01T00:00:00Z\", interval: MINUTE) { endEquity } }", json!({ "id": id }))
        .await;
    assert_eq!(crate::support::error_code(&minutes).as_deref(), Some("INVALID_INPUT"), "{minutes}");
    stack.stop().await;
}
