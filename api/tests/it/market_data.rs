//! The public market-data surface: REST under `/api/v1` (documented JSON, 404 and 400, token or not as the
//! setting says), its committed OpenAPI document, and the raw price WebSocket with a thousand clients.

use futures::{SinkExt, StreamExt};
use ledger_api::auth::Role;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{error_code, eventually, flood_rounds, without_keep_alive, Stack, CONDITION_WAIT_MAX};

/// Clients of the raw price WebSocket in the fan-out test.
const PRICE_CLIENTS: usize = 1_000;
/// Ticks of the burst every client must receive (below the feed's buffer: nobody may be cut off).
const BURST_TICKS: i64 = 100;

async fn get(stack: &Stack, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = stack.http.get(stack.url(0, path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A stack whose market data needs no token.
async fn public_stack() -> Stack {
    Stack::start_with(1, |config| config.public_market_data = true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_market_data_answers_with_the_documented_json() {
    let stack = public_stack().await;
    let hub = &stack.instances[0].hub;
    assert!(eventually(|| async { hub.ticks_live() }).await, "the tick feed never became live");
    stack.publish_tick("ACME", "49.75", 1).await;
    stack.publish_tick("ACME", "50.25", 2).await;
    stack.publish_tick("BOLT", "7.5", 1).await;
    // The prices projection applies the ticks: wait until the latest of each is served.
    let served = eventually(|| async {
        let (status, body) = get(&stack, "/api/v1/prices", None).await;
        status == 200 && body["prices"].as_array().is_some_and(|p| p.len() == 2) && body["prices"][0]["seq"] == 2
    })
    .await;
    assert!(served, "the prices never reached the REST surface");

    let (status, body) = get(&stack, "/api/v1/prices", None).await;
    assert_eq!(status, 200);
    let prices = body["prices"].as_array().unwrap();
    let mut fields: Vec<&str> = prices[0].as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["price", "seq", "symbol", "timestamp"], "{body}");
    assert_eq!((&prices[0]["symbol"], &prices[0]["price"]), (&json!("ACME"), &json!("50.25")));
    assert_eq!(
        (&prices[1]["symbol"], &prices[1]["price"], &prices[1]["seq"]),
        (&json!("BOLT"), &json!("7.5"), &json!(1))
    );
    assert!(prices[0]["timestamp"].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().is_ok());

    let (status, body) = get(&stack, "/api/v1/prices/BOLT", None).await;
    assert_eq!((status, &body["price"], &body["seq"]), (200, &json!("7.5"), &json!(1)), "{body}");
    let (status, body) = get(&stack, "/api/v1/symbols", None).await;
    assert_eq!((status, body), (200, json!({ "symbols": ["ACME", "BOLT"] })));

    let (status, body) = get(&stack, "/api/v1/prices/ACME/history?limit=10", None).await;
    assert_eq!((status, &body["symbol"], &body["interval"]), (200, &json!("ACME"), &json!("tick")), "{body}");
    let closes: Vec<&Value> = body["points"].as_array().unwrap().iter().map(|p| &p["close"]).collect();
    assert_eq!(closes, [&json!("49.75"), &json!("50.25")], "oldest first: {body}");
    assert_eq!(body["points"][0]["ticks"], 1);
    let (status, body) = get(&stack, "/api/v1/prices/ACME/history?interval=minute&limit=1", None).await;
    assert_eq!((status, &body["interval"]), (200, &json!("minute")), "{body}");
    assert_eq!(body["points"].as_array().map(Vec::len), Some(1), "{body}");

    // Unknown, malformed, out of range: the error body every route answers with.
    let (status, body) = get(&stack, "/api/v1/prices/NOPE", None).await;
    assert_eq!((status, error_code(&body).as_deref()), (404, Some("NOT_FOUND")), "{body}");
    let (status, body) = get(&stack, "/api/v1/prices/NOPE/history", None).await;
    assert_eq!((status, error_code(&body).as_deref()), (404, Some("NOT_FOUND")), "{body}");
    for bad in [
        "/api/v1/prices/not%20a%20symbol",
        "/api/v1/prices/ACME/history?limit=0",
        "/api/v1/prices/ACME/history?limit=1001",
        "/api/v1/prices/ACME/history?interval=hour",
    ] {
        let (status, body) = get(&stack, bad, None).await;
        assert_eq!((status, error_code(&body).as_deref()), (400, Some("BAD_REQUEST")), "{bad}: {body}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn market_data_needs_a_token_unless_it_is_public() {
    let stack = Stack::start(1).await;
    let (status, body) = get(&stack, "/api/v1/prices", None).await;
    assert_eq!((status, error_code(&body).as_deref()), (401, Some("UNAUTHENTICATED")), "{body}");
    let (status, body) = get(&stack, "/api/v1/prices", Some("not-a-token")).await;
    assert_eq!((status, error_code(&body).as_deref()), (401, Some("UNAUTHENTICATED")), "{body}");
    let viewer = stack.token("viewer", Role::Trader);
    let (status, body) = get(&stack, "/api/v1/prices", Some(&viewer)).await;
    assert_eq!((status, body), (200, json!({ "prices": [] })));
    // The raw price socket follows the same rule at its handshake.
    let url = format!("ws://{}/ws/prices", stack.instances[0].address);
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("a price socket without a token was not refused: {:?}", other.map(|_| ())),
    }
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {viewer}").parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_ok(), "a token holder was refused");
    // The OpenAPI document is public: it is the documentation.
    let (status, _) = get(&stack, "/api/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_served_openapi_document_is_the_committed_one() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    assert!(
        committed == ledger_api::http::market_data::openapi_json(),
        "api/openapi.json is out of date: run `cargo run -- openapi > api/openapi.json`"
    );
    let stack = Stack::start(1).await;
    let served = stack.http.get(stack.url(0, "/api/v1/openapi.json")).send().await.unwrap().text().await.unwrap();
    assert_eq!(served, committed);
    let document: Value = serde_json::from_str(&served).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    for path in ["/api/v1/prices", "/api/v1/prices/{symbol}", "/api/v1/prices/{symbol}/history", "/api/v1/symbols"] {
        assert!(document["paths"][path]["get"].is_object(), "{path} is not documented");
    }
    stack.stop().await;
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next tick a price socket sends (answering pings on the way), or `None` if it closed or nothing came.
async fn next_tick(socket: &mut Socket) -> Option<Value> {
    loop {
        match tokio::time::timeout(CONDITION_WAIT_MAX, socket.next()).await.ok()?? {
            Ok(Message::Text(text)) => return serde_json::from_str(&text).ok(),
            Ok(Message::Ping(payload)) => socket.send(Message::Pong(payload)).await.ok()?,
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_price_socket_clients_receive_every_tick_of_a_burst() {
    let stack = public_stack().await;
    let hub = &stack.instances[0].hub;
    assert!(eventually(|| async { hub.ticks_live() }).await, "the tick feed never became live");
    let base = format!("ws://{}", stack.instances[0].address);
    // Every client is subscribed once its handshake is answered (the server subscribes before answering).
    let mut sockets = Vec::with_capacity(PRICE_CLIENTS);
    for _ in 0..PRICE_CLIENTS {
        let (socket, _) = tokio_tungstenite::connect_async(format!("{base}/ws/prices?symbols=BURST")).await.unwrap();
        sockets.push(socket);
    }
    // One client of every symbol, to see that the filter lets other symbols' ticks through to it.
    let (mut everything, _) = tokio_tungstenite::connect_async(format!("{base}/ws/prices")).await.unwrap();
    stack.wait_metric("ledger_price_sockets_open", (PRICE_CLIENTS + 1) as f64).await;

    let publisher = ledger::market::TickPublisher::new(&stack.kafka).unwrap();
    let tick = |symbol: &str, seq: i64| ledger::market::Tick {
        version: ledger::market::TICK_VERSION,
        symbol: ledger::domain::values::Symbol::new(symbol).unwrap(),
        price: ledger::domain::values::Price::new(rust_decimal::Decimal::new(10_000 + seq, 2)).unwrap(),
        ts: chrono::Utc::now(),
        seq,
        volume: Some(rust_decimal::Decimal::from(seq)),
        source: "test".into(),
    };
    let mut burst: Vec<_> = (1..=BURST_TICKS).map(|seq| tick("BURST", seq)).collect();
    burst.push(tick("OTHER", 1));
    publisher.publish_all(&burst).await.unwrap();

    let readers = sockets.into_iter().map(|mut socket| {
        tokio::spawn(async move {
            let mut prices = Vec::new();
            while (prices.len() as i64) < BURST_TICKS {
                let Some(tick) = next_tick(&mut socket).await else { break };
                assert_eq!(tick["symbol"], "BURST", "a tick of another symbol came through: {tick}");
                prices.push(tick["price"].as_str().unwrap().to_string());
            }
            prices
        })
    });
    let expected: Vec<String> =
        (1..=BURST_TICKS).map(|seq| rust_decimal::Decimal::new(10_000 + seq, 2).normalize().to_string()).collect();
    for (client, reader) in futures::future::join_all(readers).await.into_iter().enumerate() {
        assert_eq!(reader.unwrap(), expected, "client {client} missed or reordered ticks");
    }
    let first = next_tick(&mut everything).await.expect("the unfiltered client got nothing");
    let mut fields: Vec<&str> = first.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["price", "symbol", "timestamp", "volume"], "{first}");
    assert_eq!((&first["symbol"], &first["price"], &first["volume"]), (&json!("BURST"), &json!("100.01"), &json!("1")));
    let mut last = first;
    while last["symbol"] != "OTHER" {
        last = next_tick(&mut everything).await.expect("the unfiltered client missed the other symbol");
    }
    stack.stop().await;
}

/// Ticks of the flood: their frames (~100 bytes each) are several times what the loopback sockets and the feed
/// buffer of the client that does not read can hold.
const FLOOD_TICKS: i64 = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_price_socket_that_stops_reading_is_closed_while_another_gets_every_tick() {
    let stack = Stack::start_with(1, |config| {
        config.public_market_data = true;
        without_keep_alive(config);
    })
    .await;
    let hub = &stack.instances[0].hub;
    assert!(eventually(|| async { hub.ticks_live() }).await, "the tick feed never became live");
    let url = format!("ws://{}/ws/prices?symbols=FLOOD", stack.instances[0].address);
    let (mut slow, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut reader, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let publisher = ledger::market::TickPublisher::new(&stack.kafka).unwrap();
    for round in flood_rounds("FLOOD", FLOOD_TICKS) {
        publisher.publish_all(&round).await.unwrap();
        // The reader gets the whole round, in order, before the next one is published.
        for seq in round.iter().map(|tick| tick.seq) {
            let tick = next_tick(&mut reader).await.unwrap_or_else(|| panic!("tick {seq} never came"));
            assert_eq!(tick["price"], seq.to_string(), "{tick}");
        }
    }
    // Every tick was offered to both; the one that read nothing is closed with 4000 once it reads.
    let mut received = 0;
    let close = loop {
        match tokio::time::timeout(CONDITION_WAIT_MAX, slow.next()).await.expect("the slow socket was never closed") {
            Some(Ok(Message::Text(_))) => received += 1,
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("the slow socket ended without a close frame: {other:?}"),
        }
    };
    let code = close.map(|frame| u16::from(frame.code));
    assert_eq!(code, Some(ledger_api::http::price_socket::CLOSE_LAGGED), "after {received} ticks");
    assert!(received < FLOOD_TICKS, "the socket delivered everything instead of being closed");
    stack.stop().await;
}
