//! `ledger-lab bench commands`: GraphQL `deposit` mutations over HTTP from C concurrent clients against an API
//! server started in this process, with `pgbench` running a single-row insert at the same concurrency on the
//! same server for reference (so that figures compare across machines as a ratio).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use ledger_api::app::{start, AppConfig};
use ledger_api::auth::{Role, TokenKeys};
use serde::Serialize;
use serde_json::json;

use crate::pgbench::pgbench_insert;
use crate::support::percentile;

#[derive(Debug, Serialize)]
pub struct ApiBenchResult {
    pub suite: &'static str,
    pub clients: usize,
    pub seconds: f64,
    pub commands: usize,
    pub commands_per_second: f64,
    /// With the system running: events the relay had yet to mirror when the clients stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_behind: Option<i64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub pgbench_tps: Option<f64>,
    pub ratio: Option<f64>,
}

pub fn print(result: &ApiBenchResult) {
    let reference = match (result.pgbench_tps, result.ratio) {
        (Some(tps), Some(ratio)) => format!("  pgbench {tps:>8.0} tps  ours/pgbench {ratio:.2}"),
        _ => "  pgbench n/a".into(),
    };
    let relay = result.relay_behind.map(|events| format!("  relay behind {events} events")).unwrap_or_default();
    println!(
        "{:<9} clients {:>3}  {:>7} commands  {:>7.0} commands/s  p50 {:>6.2} ms  p99 {:>6.2} ms  p99.9 {:>7.2} ms{reference}{relay}",
        result.suite, result.clients, result.commands, result.commands_per_second, result.p50_ms, result.p99_ms,
        result.p999_ms
    );
}

/// What runs beside the commands of `ledger-lab bench commands`.
#[derive(Debug, Clone, Default)]
pub struct CommandsOptions {
    /// Every client deposits into the same portfolio (one hot aggregate) instead of one portfolio each.
    pub hot: bool,
    /// The relay, the process manager and the projection workers run in the API process, on these brokers.
    pub system: Option<ledger::kafka::KafkaConfig>,
}

/// How long `--with-system` waits for the relay, the process manager and the projections to reach the log's
/// head before it measures (they start from their cursors: a database with a long unrelayed log takes a while).
const SYSTEM_SETTLE_SECS: u64 = 600;

/// One run: `clients` HTTP clients depositing for `duration`, each into its own portfolio (or all into one with
/// `hot`), with the rest of the system beside the API when `options.system` is set.
pub async fn commands(
    database_url: &str,
    clients: usize,
    duration: Duration,
    options: &CommandsOptions,
) -> anyhow::Result<ApiBenchResult> {
    anyhow::ensure!((1..=512).contains(&clients), "clients must be 1 to 512");
    let pool = crate::support::connect_and_migrate(database_url).await?;
    pool.close().await;
    let pool = ledger::db::connect(database_url, (clients as u32 + 8).min(128)).await?;
    let keys = TokenKeys::new("bench-secret-of-at-least-thirty-two-bytes").map_err(|e| anyhow::anyhow!(e))?;
    let token = keys.issue("bench", Role::Trader, chrono::Duration::hours(1), Utc::now());
    let mut config = AppConfig::new(keys.clone(), options.system.clone());
    config.rate_limit_per_second = 1_000_000;
    config.rate_limit_burst = 1_000_000;
    config.rate_limit_per_address_per_second = 1_000_000;
    config.rate_limit_per_address_burst = 1_000_000;
    if options.system.is_some() {
        config.with_relay = true;
        config.with_process_manager = true;
        config.with_workers = true;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = start(pool.clone(), config, listener).await?;
    if let Some(kafka) = &options.system {
        crate::support::settle(&pool, kafka, Duration::from_secs(SYSTEM_SETTLE_SECS))
            .await
            .context("the relay, process manager and projections never reached the log's head")?;
    }
    let url = format!("http://{}/graphql", running.address);
    let portfolios = if options.hot {
        let one = crate::support::open_portfolios(&running.commands, 1).await?[0];
        vec![one; clients]
    } else {
        crate::support::open_portfolios(&running.commands, clients).await?
    };
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).build()?;
    let started = Instant::now();
    let deadline = started + duration;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let handles: Vec<_> = portfolios
        .into_iter()
        .enumerate()
        .map(|(c, portfolio)| {
            let (http, url, token, run) = (http.clone(), url.clone(), token.clone(), run.clone());
            tokio::spawn(async move {
                let query = "mutation($id: UUID!, $k: String!) { deposit(portfolioId: $id, amount: \"1\", idempotencyKey: $k) { lastPosition } }";
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let body = json!({ "query": query, "variables": { "id": portfolio.to_string(), "k": format!("{run}-{c}-{n}") } });
                    let begin = Instant::now();
                    let response: serde_json::Value =
                        http.post(&url).bearer_auth(&token).json(&body).send().await?.json().await?;
                    if response.get("errors").is_some() {
                        bail!("the API refused a deposit: {response}");
                    }
                    latencies.push(begin.elapsed());
                    n += 1;
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let latencies = crate::support::gather_latencies(handles).await?;
    let elapsed = started.elapsed().as_secs_f64();
    // With the system running: how far the relay was behind the log when the clients stopped.
    let relay_behind = match &options.system {
        Some(kafka) => {
            let cursor = ledger::relay::cursor_name(kafka).await?;
            Some(ledger::relay::relay_lag(&pool, &cursor).await?.events)
        }
        None => None,
    };
    running.stop().await?;
    let pgbench_tps = match pgbench_insert(database_url, clients, duration).await {
        Ok(tps) => Some(tps),
        Err(error) => {
            eprintln!("pgbench reference skipped: {error:#}");
            None
        }
    };
    let commands_per_second = latencies.len() as f64 / elapsed;
    let suite = match (options.hot, options.system.is_some()) {
        (false, false) => "commands",
        (true, false) => "commands-hot",
        (false, true) => "commands+system",
        (true, true) => "commands-hot+system",
    };
    Ok(ApiBenchResult {
        suite,
        relay_behind,
        clients,
        seconds: elapsed,
        commands: latencies.len(),
        commands_per_second,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        p999_ms: percentile(&latencies, 0.999),
        pgbench_tps,
        ratio: pgbench_tps.map(|tps| commands_per_second / tps),
    })
}

#[derive(Debug, Serialize)]
pub struct FanoutResult {
    pub suite: &'static str,
    pub subscribers: usize,
    pub ticks: usize,
    pub deliveries: usize,
    pub expected_deliveries: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub fn print_fanout(result: &FanoutResult) {
    println!(
        "fanout  subscribers {:>6}  ticks {:>4}  deliveries {:>8}/{:<8}  delay p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        result.subscribers, result.ticks, result.deliveries, result.expected_deliveries, result.p50_ms, result.p99_ms,
        result.max_ms
    );
}

/// Connections (and requests) per second the fan-out server allows the bench's one address.
const FANOUT_ADDRESS_RATE: u32 = 100_000;

/// Read buffer of each fan-out client socket (see `ws::WS_READ_BUFFER_BYTES` for why it is small).
const FANOUT_CLIENT_READ_BUFFER_BYTES: usize = 4 * 1024;
/// Warm-up: ticks are published until one reaches a subscriber (each waited for this long), for at most
/// `WARM_UP_SECS`; then the feed settles before the measured ticks.
const WARM_UP_SECS: u64 = 30;
const WARM_UP_TICK_WAIT_MS: u64 = 500;
const SETTLE_AFTER_WARM_UP_MS: u64 = 2_000;
/// After the last tick: deliveries are collected for at most `DRAIN_SECS`, and until none came for
/// `DELIVERY_GAP_MAX_MS`.
const DRAIN_SECS: u64 = 30;
const DELIVERY_GAP_MAX_MS: u64 = 2_000;

/// What the fan-out client reads of a server message.
#[derive(serde::Deserialize)]
struct FanoutFrame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    payload: Option<FanoutPayload<'a>>,
}

#[derive(serde::Deserialize)]
struct FanoutPayload<'a> {
    #[serde(borrow)]
    data: Option<FanoutData<'a>>,
}

#[derive(serde::Deserialize)]
struct FanoutData<'a> {
    #[serde(rename = "priceTicks", borrow)]
    price_ticks: FanoutTick<'a>,
}

#[derive(serde::Deserialize)]
struct FanoutTick<'a> {
    ts: &'a str,
}

/// `subscribers` graphql-transport-ws subscriptions to `priceTicks` on one API instance; `ticks` ticks
/// published to Kafka at `rate` per second; the delay from each tick's timestamp to its arrival at each
/// subscriber.
pub async fn fanout(
    database_url: &str,
    kafka: ledger::kafka::KafkaConfig,
    subscribers: usize,
    ticks: usize,
    rate: u32,
) -> anyhow::Result<FanoutResult> {
    anyhow::ensure!((1..=20_000).contains(&subscribers), "subscribers must be 1 to 20000");
    anyhow::ensure!((1..=10_000).contains(&ticks), "ticks must be 1 to 10000");
    let pool = crate::support::connect_and_migrate(database_url).await?;
    let mut kafka = kafka;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    kafka.prices_topic = format!("bench.prices.{suffix}");
    kafka.partitions = 1;
    kafka.ensure_topics().await.context("creating the bench topic")?;
    pool.close().await;
    let secret = "bench-secret-of-at-least-thirty-two-bytes";
    let keys = TokenKeys::new(secret).map_err(|e| anyhow::anyhow!(e))?;
    let (mut server, port) = start_server(database_url, &kafka, secret).await?;
    let url = format!("ws://127.0.0.1:{port}/graphql/ws");
    let (sender, mut delays) = tokio::sync::mpsc::unbounded_channel::<f64>();
    let mut tasks = Vec::with_capacity(subscribers);
    let (ready_tx, mut ready) = tokio::sync::mpsc::unbounded_channel::<()>();
    for subscriber in 0..subscribers {
        // A subject of its own per subscriber, as real clients have (a subject's sockets are capped).
        let token = keys.issue(&format!("bench-{subscriber}"), Role::Trader, chrono::Duration::hours(1), Utc::now());
        tasks.push(subscribe_ticks(&url, &token, sender.clone(), ready_tx.clone()).await?);
    }
    drop(sender);
    for _ in 0..subscribers {
        tokio::time::timeout(Duration::from_secs(crate::support::READY_SECS), ready.recv())
            .await
            .context("subscriptions acknowledged")?;
    }
    // The API's tick consumer starts at the latest offset: give its assignment a moment, then warm up.
    let publisher = ledger::market::TickPublisher::new(&kafka)?;
    let tick = |seq: i64| -> anyhow::Result<ledger::market::Tick> {
        Ok(ledger::market::Tick {
            version: ledger::market::TICK_VERSION,
            symbol: ledger::domain::values::Symbol::new("BENCH")?,
            price: ledger::domain::values::Price::new(rust_decimal::Decimal::ONE_HUNDRED)?,
            ts: Utc::now(),
            seq,
            volume: None,
            source: "bench".into(),
        })
    };
    let mut seq = 0i64;
    let warm_until = Instant::now() + Duration::from_secs(WARM_UP_SECS);
    loop {
        seq += 1;
        publisher.publish(&tick(seq)?).await?;
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(WARM_UP_TICK_WAIT_MS), delays.recv()).await {
            break;
        }
        if Instant::now() > warm_until {
            bail!("no tick reached a subscriber within {WARM_UP_SECS} s");
        }
    }
    tokio::time::sleep(Duration::from_millis(SETTLE_AFTER_WARM_UP_MS)).await;
    while delays.try_recv().is_ok() {}
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    for _ in 0..ticks {
        seq += 1;
        publisher.publish(&tick(seq)?).await?;
        tokio::time::sleep(interval).await;
    }
    let expected = subscribers * ticks;
    let mut samples = Vec::with_capacity(expected);
    let drain_until = Instant::now() + Duration::from_secs(DRAIN_SECS);
    while samples.len() < expected && Instant::now() < drain_until {
        match tokio::time::timeout(Duration::from_millis(DELIVERY_GAP_MAX_MS), delays.recv()).await {
            Ok(Some(delay)) => samples.push(delay),
            _ => break,
        }
    }
    for task in tasks {
        task.abort();
    }
    let _ = server.start_kill();
    let _ = server.wait().await;
    samples.sort_by(f64::total_cmp);
    let at =
        |p: f64| samples.get(((samples.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0);
    Ok(FanoutResult {
        suite: "fanout",
        subscribers,
        ticks,
        deliveries: samples.len(),
        expected_deliveries: expected,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: samples.last().copied().unwrap_or(0.0),
    })
}

/// `ledger serve` in a process of its own (as in production; each side then holds one socket per subscriber,
/// within the usual per-process file limit), on a free port, once ready.
async fn start_server(
    database_url: &str,
    kafka: &ledger::kafka::KafkaConfig,
    secret: &str,
) -> anyhow::Result<(tokio::process::Child, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let server = tokio::process::Command::new(crate::support::ledger_binary()?)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", database_url)
        .env("KAFKA_BROKERS", &kafka.brokers)
        .env("LEDGER_PRICES_TOPIC", &kafka.prices_topic)
        .env("LEDGER_JWT_SECRET", secret)
        // Every subscriber connects from this one address: the per-address limit (meant for many clients
        // behind their own addresses) would refuse all but the first few thousand.
        .env("LEDGER_RATE_LIMIT_PER_ADDRESS_PER_SECOND", FANOUT_ADDRESS_RATE.to_string())
        .env("LEDGER_RATE_LIMIT_PER_ADDRESS_BURST", FANOUT_ADDRESS_RATE.to_string())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .context("starting ledger serve")?;
    crate::support::wait_ready(&[format!("http://127.0.0.1:{port}")]).await?;
    Ok((server, port))
}

/// One subscriber of `priceTicks` on its own socket (token `token`), sending each tick's delay in ms; it says
/// on `ready` when the server acknowledged the connection.
async fn subscribe_ticks(
    url: &str,
    token: &str,
    sender: tokio::sync::mpsc::UnboundedSender<f64>,
    ready_tx: tokio::sync::mpsc::UnboundedSender<()>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
    use tokio_tungstenite::tungstenite::Message;

    let mut request = url.into_client_request()?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    // A small read buffer, as the server's: the library zeroes the buffer's free space on every read.
    let config = WebSocketConfig::default().read_buffer_size(FANOUT_CLIENT_READ_BUFFER_BYTES);
    let (mut socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
        .context("opening a subscription")?;
    let init = json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } });
    socket.send(Message::text(init.to_string())).await?;
    let subscribe = json!({ "id": "1", "type": "subscribe",
            "payload": { "query": "subscription { priceTicks(symbols: [\"BENCH\"]) { ts seq } }" } });
    socket.send(Message::text(subscribe.to_string())).await?;
    Ok(tokio::spawn(async move {
        let mut acked = false;
        while let Some(Ok(message)) = socket.next().await {
            let Message::Text(text) = message else { continue };
            // Typed and borrowed: the client shares the machine with the server, so it decodes no more
            // than it needs.
            let Ok(frame) = serde_json::from_str::<FanoutFrame>(&text) else { continue };
            match frame.kind {
                "connection_ack" if !acked => {
                    acked = true;
                    let _ = ready_tx.send(());
                }
                "next" => {
                    let ts = frame.payload.and_then(|p| p.data).map(|d| d.price_ticks.ts).unwrap_or_default();
                    if let Ok(ts) = chrono::DateTime::parse_from_rfc3339(ts) {
                        let delay = (Utc::now() - ts.with_timezone(&Utc)).num_microseconds().unwrap_or(0);
                        if sender.send(delay as f64 / 1_000.0).is_err() {
                            return;
                        }
                    }
                }
                "ping" => {
                    let _ = socket.send(Message::text(json!({ "type": "pong" }).to_string())).await;
                }
                _ => {}
            }
        }
    }))
}
