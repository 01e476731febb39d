//! Dead letters resolved by an operator: a tick the prices projection could not apply (a constraint refused it)
//! is replayed once the cause is fixed — applied exactly once, even with two replays at the same time — and
//! another is discarded with a reason; who did it is recorded.

use chrono::DurationRound;
use ledger_api::auth::Role;
use serde_json::{json, Value};

use crate::support::{error_code, eventually, Stack};

const DEAD: &str = "query($open: Boolean!) {
    deadLetters(open: $open, first: 10) { edges { node { id projection payload error resolution resolvedBy resolutionNote } } }
}";
const REPLAY: &str = "mutation($id: Int!) { replayDeadLetter(id: $id) { replayed errorCode error } }";
const DISCARD: &str = "mutation($id: Int!, $reason: String!) { discardDeadLetter(id: $id, reason: $reason) }";

async fn dead_letters(stack: &Stack, token: &str, open: bool) -> Vec<Value> {
    let data = stack.ok(token, DEAD, json!({ "open": open })).await;
    data["deadLetters"]["edges"].as_array().unwrap().iter().map(|e| e["node"].clone()).collect()
}

fn d(text: &str) -> rust_decimal::Decimal {
    text.parse().unwrap()
}

async fn latest_price(stack: &Stack, symbol: &str) -> Option<String> {
    sqlx::query_scalar::<_, rust_decimal::Decimal>("select price from latest_prices where symbol = $1")
        .bind(symbol)
        .fetch_optional(&stack.pool)
        .await
        .unwrap()
        .map(|price| price.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_fixed_and_replayed_is_applied_exactly_once() {
    let stack = Stack::start(1).await;
    let admin = stack.token("root", Role::Admin);
    let trader = stack.token("alice", Role::Trader);
    // The cause: a constraint the prices projection's rows break (what a bad deployment or data fix can do).
    sqlx::query("alter table latest_prices add constraint blocked check (symbol not like 'BLOCKED%')")
        .execute(&stack.pool)
        .await
        .unwrap();
    // Two ticks of one minute; the first is refused now and replayed after the second was applied.
    let minute = chrono::Utc::now().duration_trunc(chrono::TimeDelta::minutes(1)).unwrap();
    let publish = |symbol: &'static str, price: rust_decimal::Decimal, seq: i64, second: i64| {
        let tick = ledger::market::Tick {
            version: ledger::market::TICK_VERSION,
            symbol: ledger::domain::values::Symbol::new(symbol).unwrap(),
            price: ledger::domain::values::Price::new(price).unwrap(),
            ts: minute + chrono::TimeDelta::seconds(second),
            seq,
            volume: None,
            source: "test".into(),
        };
        let publisher = ledger::market::TickPublisher::new(&stack.kafka).unwrap();
        async move { publisher.publish(&tick).await.unwrap() }
    };
    publish("BLOCKED", d("12.5"), 1, 10).await;
    publish("BLOCKEDTOO", d("3"), 1, 10).await;
    let both = eventually(|| async { dead_letters(&stack, &admin, true).await.len() == 2 }).await;
    assert!(both, "the ticks were never dead-lettered: {:?}", dead_letters(&stack, &admin, false).await);
    let letters = dead_letters(&stack, &admin, true).await;
    assert!(letters.iter().all(|l| l["projection"] == "prices" && l["error"].as_str().unwrap().contains("blocked")));
    let of = |symbol: &str| {
        let wanted = format!("\"symbol\":\"{symbol}\"");
        letters.iter().find(|l| l["payload"].as_str().unwrap().contains(&wanted)).unwrap()["id"].clone()
    };
    let (blocked, too) = (of("BLOCKED"), of("BLOCKEDTOO"));

    // Not fixed yet: refused again, and it stays open. Traders may not touch dead letters.
    let refused = stack.ok(&admin, REPLAY, json!({ "id": blocked })).await;
    assert_eq!(
        (&refused["replayDeadLetter"]["replayed"], &refused["replayDeadLetter"]["errorCode"]),
        (&json!(false), &json!("REFUSED"))
    );
    assert_eq!(dead_letters(&stack, &admin, true).await.len(), 2);
    let forbidden = stack.gql(&trader, REPLAY, json!({ "id": blocked })).await;
    assert_eq!(error_code(&forbidden).as_deref(), Some("FORBIDDEN"));

    // Fixed; a later tick of the same minute is applied first.
    sqlx::query("alter table latest_prices drop constraint blocked").execute(&stack.pool).await.unwrap();
    publish("BLOCKED", d("13"), 2, 20).await;
    assert!(eventually(|| async { latest_price(&stack, "BLOCKED").await.as_deref() == Some("13") }).await);
    // Two replays at once: one applies it, where it belongs in time.
    let (first, second) = tokio::join!(
        stack.ok(&admin, REPLAY, json!({ "id": blocked })),
        stack.ok(&admin, REPLAY, json!({ "id": blocked }))
    );
    let outcomes = [&first["replayDeadLetter"], &second["replayDeadLetter"]];
    assert_eq!(outcomes.iter().filter(|o| o["replayed"] == true).count(), 1, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| o["errorCode"] == "NOT_OPEN").count(), 1, "{outcomes:?}");
    assert_eq!(latest_price(&stack, "BLOCKED").await.as_deref(), Some("13"), "the newer price stays the latest");
    let bar: (rust_decimal::Decimal, rust_decimal::Decimal, i32) =
        sqlx::query_as("select open, close, ticks from price_bars_1m where symbol = 'BLOCKED' and minute = $1")
            .bind(minute)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(bar, (d("12.5"), d("13"), 2), "the late tick opens its minute's bar; the close stays the newer");
    let archived: i64 =
        sqlx::query_scalar("select count(*) from market_ticks where projection = 'prices' and symbol = 'BLOCKED'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(archived, 2, "both ticks archived once each (the replayed one too), for the projection's rebuilds");

    // The other is discarded with a reason; nothing stays open, and both say who resolved them.
    let discarded = stack.ok(&admin, DISCARD, json!({ "id": too, "reason": "test ticks" })).await;
    assert_eq!(discarded["discardDeadLetter"], true);
    assert_eq!(stack.ok(&admin, DISCARD, json!({ "id": too, "reason": "again" })).await["discardDeadLetter"], false);
    assert_eq!(latest_price(&stack, "BLOCKEDTOO").await, None);
    assert!(dead_letters(&stack, &admin, true).await.is_empty());
    let resolved = dead_letters(&stack, &admin, false).await;
    let by_id = |id: &Value| resolved.iter().find(|l| &l["id"] == id).unwrap().clone();
    assert_eq!((&by_id(&blocked)["resolution"], &by_id(&blocked)["resolvedBy"]), (&json!("replayed"), &json!("root")));
    let too = by_id(&too);
    assert_eq!((&too["resolution"], &too["resolutionNote"]), (&json!("discarded"), &json!("test ticks")));
    stack.stop().await;
}
