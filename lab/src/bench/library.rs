//! The suites that drive the library in this process (`e2e` also an API instance, for its subscriber):
//!
//! - `deposits`: each of N tasks loops `DepositCash` on its own portfolio through the command service
//!   (idempotency lookup, load, handle, one commit transaction) for a fixed duration.
//! - `relay`: events/s mirrored from a pre-filled log to a fresh topic, and the delay from commit to the
//!   broker's acknowledgement at a steady rate. Uses a scratch database `<name>_bench`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ledger::relay::{Relay, RelayConfig};
use tokio_util::sync::CancellationToken;

use chrono::Utc;
use ledger::commands::{CommandConfig, CommandContext, CommandService, Idempotency};
use ledger::domain::values::Amount;
use ledger::domain::PortfolioCommand;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::support::{fill_domain_log, gather_latencies, open_portfolios, percentile, scratch_database};

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub suite: &'static str,
    pub tasks: usize,
    pub seconds: f64,
    pub commands: usize,
    pub commands_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

/// Runs deposits from `tasks` concurrent tasks for `duration`; with `keyed`, each carries an idempotency key.
pub async fn deposits(
    database_url: &str,
    tasks: usize,
    duration: Duration,
    keyed: bool,
) -> anyhow::Result<BenchResult> {
    let pool = crate::support::connect_and_migrate(database_url).await?;
    let connections = (tasks as u32 + 4).min(ledger::db::POOL_CONNECTIONS_MAX * 4);
    let pool = {
        pool.close().await;
        ledger::db::connect(database_url, connections).await?
    };
    let commands = Arc::new(CommandService::new(pool, CommandConfig::default()));
    let portfolios = open_portfolios(&commands, tasks).await?;
    let started = Instant::now();
    let deadline = started + duration;
    let handles: Vec<_> = portfolios
        .into_iter()
        .enumerate()
        .map(|(t, portfolio)| {
            let commands = commands.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let amount = Amount::new(Decimal::ONE).expect("one is a valid amount");
                let id = portfolio;
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let mut ctx = CommandContext::new("bench");
                    if keyed {
                        ctx = ctx.with_idempotency(Idempotency::new(format!("bench-{t}-{n}"), &n)?);
                    }
                    let command = PortfolioCommand::DepositCash { amount, reference: None, at: Utc::now() };
                    let begin = Instant::now();
                    commands.execute_portfolio(&ctx, id, command).await?;
                    latencies.push(begin.elapsed());
                    n += 1;
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let latencies = gather_latencies(handles).await?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(BenchResult {
        suite: if keyed { "deposits-keyed" } else { "deposits" },
        tasks,
        seconds: elapsed,
        commands: latencies.len(),
        commands_per_second: latencies.len() as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        p999_ms: percentile(&latencies, 0.999),
    })
}

pub fn print(result: &BenchResult) {
    println!(
        "{:<16} tasks {:>3}  {:>8} commands in {:>5.1} s  {:>8.0} commands/s  p50 {:>6.2} ms  p99 {:>6.2} ms  p99.9 {:>6.2} ms",
        result.suite,
        result.tasks,
        result.commands,
        result.seconds,
        result.commands_per_second,
        result.p50_ms,
        result.p99_ms,
        result.p999_ms
    );
}

/// Inserts `count` events spread over 1,000 aggregates, in transactions of 50,000, with payloads of about
/// 400 bytes (the size of an `ExecutionApplied`).
async fn fill_log(pool: &sqlx::PgPool, count: i64) -> anyhow::Result<()> {
    const CHUNK: i64 = 50_000;
    let mut start = 0;
    while start < count {
        let end = (start + CHUNK).min(count);
        sqlx::query(
            "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             select 'Bench', 'agg-' || (g % 1000), g / 1000 + 1, 'Benched', '1',
                    jsonb_build_object('n', g, 'pad', repeat('x', 360)),
                    '{\"correlation_id\": \"bench\", \"actor\": \"bench\"}'
               from generate_series($1::bigint, $2::bigint - 1) g",
        )
        .bind(start)
        .bind(end)
        .execute(pool)
        .await?;
        start = end;
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct RelayThroughput {
    pub suite: &'static str,
    pub batch_size: usize,
    pub events: i64,
    pub seconds: f64,
    pub events_per_second: f64,
}

fn bench_kafka(kafka: &ledger::kafka::KafkaConfig) -> ledger::kafka::KafkaConfig {
    let mut kafka = kafka.clone();
    kafka.events_topic = format!("bench.events.{}", uuid::Uuid::new_v4().simple());
    kafka
}

/// Mirrors a pre-filled log of `events` events to a fresh topic; measures until the last is acknowledged.
pub async fn relay_throughput(
    database_url: &str,
    kafka: &ledger::kafka::KafkaConfig,
    events: i64,
    batch_size: usize,
    linger_ms: u32,
) -> anyhow::Result<RelayThroughput> {
    let (_, pool) = scratch_database(database_url).await?;
    fill_log(&pool, events).await?;
    let kafka = bench_kafka(kafka);
    kafka.ensure_topics().await?;
    let config = RelayConfig { batch_size, linger_ms, ..RelayConfig::default() };
    let relay = Relay::new(pool.clone(), kafka, config);
    let status = relay.status();
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let task = {
        let cancel = cancel.clone();
        tokio::spawn(async move { relay.run(cancel).await })
    };
    while status.produced.load(Ordering::Relaxed) < events as u64 {
        if task.is_finished() {
            anyhow::bail!("the relay stopped before mirroring the log");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    cancel.cancel();
    task.await??;
    pool.close().await;
    Ok(RelayThroughput { suite: "relay", batch_size, events, seconds, events_per_second: events as f64 / seconds })
}

#[derive(Debug, Serialize)]
pub struct RelayLatency {
    pub suite: &'static str,
    pub rate_per_second: u64,
    pub events: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

/// Commits one event per transaction at a steady `rate` for `seconds` while the relay runs; reports the delay
/// from each event's commit (its `recorded_at`) to the broker's acknowledgement.
pub async fn relay_latency(
    database_url: &str,
    kafka: &ledger::kafka::KafkaConfig,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<RelayLatency> {
    let (_, pool) = scratch_database(database_url).await?;
    let kafka = bench_kafka(kafka);
    kafka.ensure_topics().await?;
    let relay = Relay::new(pool.clone(), kafka, RelayConfig::default());
    let status = relay.status();
    let cancel = CancellationToken::new();
    let task = {
        let cancel = cancel.clone();
        tokio::spawn(async move { relay.run(cancel).await })
    };
    // Warm up: the first produce to a new topic waits for the producer id and metadata (about a second).
    sqlx::query(
        "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         values ('Bench', 'warm-up', 1, 'Benched', '1', '{}', '{}')",
    )
    .execute(&pool)
    .await?;
    while status.produced.load(Ordering::Relaxed) < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    status.commit_to_ack.reset();
    let warm = status.produced.load(Ordering::Relaxed);
    let total = rate * seconds;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..total as i64 {
        ticker.tick().await;
        sqlx::query(
            "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             values ('Bench', 'lat-' || ($1 % 100), $1 / 100 + 1, 'Benched', '1', jsonb_build_object('n', $1), '{}')",
        )
        .bind(n)
        .execute(&pool)
        .await?;
    }
    while status.produced.load(Ordering::Relaxed) < warm + total {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let histogram = &status.commit_to_ack;
    let ms = |q| histogram.quantile(q).unwrap_or(0.0) * 1_000.0;
    let result = RelayLatency {
        suite: "relay-latency",
        rate_per_second: rate,
        events: histogram.count(),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
    };
    cancel.cancel();
    task.await??;
    pool.close().await;
    Ok(result)
}

#[derive(Debug, Serialize)]
pub struct ReplayResult {
    pub suite: &'static str,
    pub projection: &'static str,
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    /// The benchmark process's peak resident set so far (`VmHWM`; it includes writing the synthetic log).
    pub peak_rss_mb: Option<f64>,
}

/// Rebuilds the read model `projection` (a name, or `all`: every projection together, from one read of the log)
/// from a synthetic log of `events` events (a scratch database); events/s counts the log's events once.
pub async fn replay(
    database_url: &str,
    projection: &str,
    events: usize,
    runs: usize,
) -> anyhow::Result<Vec<ReplayResult>> {
    let settings = Default::default();
    let projections =
        match projection {
            "all" => ledger::projections::all(&settings),
            name => vec![ledger::projections::by_name(name, &settings)
                .with_context(|| format!("unknown projection {name:?}"))?],
        };
    let (_, pool) = scratch_database(database_url).await?;
    println!("writing {events} events to the scratch database…");
    fill_domain_log(&pool, 10_000, events).await?;
    let mut results = Vec::new();
    for _ in 0..runs.max(1) {
        let reports = ledger::projections::rebuild::rebuild_together(
            &pool,
            &projections,
            ledger::projections::rebuild::RebuildMode::Swap,
            Default::default(),
            &mut |_, _| {},
        )
        .await?;
        let read = reports.iter().map(|r| r.events).max().unwrap_or(0);
        let seconds = reports.iter().map(|r| r.seconds).fold(0.0, f64::max);
        let result = ReplayResult {
            suite: "replay",
            projection: if reports.len() == 1 { reports[0].projection } else { "all" },
            events: read,
            seconds,
            events_per_second: read as f64 / seconds,
            peak_rss_mb: crate::support::high_water_mark_kb(std::path::Path::new("/proc/self/status"))
                .map(|kb| kb as f64 / 1024.0),
        };
        println!(
            "replay  {}  {} events in {:.1} s  {:.0} events/s  peak RSS {}",
            result.projection,
            result.events,
            result.seconds,
            result.events_per_second,
            result.peak_rss_mb.map_or("unknown".to_string(), |mb| format!("{mb:.0} MB"))
        );
        if reports.len() > 1 {
            let each: Vec<String> = reports.iter().map(|r| format!("{} {:.1} s", r.projection, r.seconds)).collect();
            println!("        done at: {}", each.join(", "));
        }
        results.push(result);
    }
    pool.close().await;
    Ok(results)
}

#[derive(Debug, Serialize)]
pub struct EndToEndResult {
    pub suite: &'static str,
    pub rate_per_second: u64,
    /// Commands per second actually sent (below the rate when the command path cannot keep up).
    pub achieved_rate_per_second: f64,
    /// Commit → read model (the positions worker's batch commit).
    pub commands: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Commit → a `logEvents` subscriber of an API instance (graphql-transport-ws).
    pub subscriber_events: usize,
    pub subscriber_p50_ms: f64,
    pub subscriber_p99_ms: f64,
    pub subscriber_p999_ms: f64,
}

/// A `logEvents` subscription on the API at `address`: the delay from each `CashDeposited`'s commit
/// (`recordedAt`) to its arrival, sent to `delays`. Returns once the subscription is acknowledged.
async fn subscribe_log(
    address: std::net::SocketAddr,
    token: &str,
    delays: tokio::sync::mpsc::UnboundedSender<Duration>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let mut request = format!("ws://{address}/graphql/ws").into_client_request()?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.context("opening the subscription")?;
    let init =
        serde_json::json!({ "type": "connection_init", "payload": { "authorization": format!("Bearer {token}") } });
    socket.send(Message::text(init.to_string())).await?;
    let subscribe = serde_json::json!({ "id": "1", "type": "subscribe",
        "payload": { "query": "subscription { logEvents { eventType recordedAt } }" } });
    socket.send(Message::text(subscribe.to_string())).await?;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .context("no connection_ack within 30 s")?
            .context("the subscription closed")??;
        if let Message::Text(text) = message {
            if text.contains("connection_ack") {
                break;
            }
        }
    }
    Ok(tokio::spawn(async move {
        while let Some(Ok(message)) = socket.next().await {
            let Message::Text(text) = message else { continue };
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
            let event = &value["payload"]["data"]["logEvents"];
            if event["eventType"] != "CashDeposited" {
                continue;
            }
            let Some(Ok(at)) = event["recordedAt"].as_str().map(chrono::DateTime::parse_from_rfc3339) else { continue };
            let delay = (Utc::now() - at.with_timezone(&Utc)).to_std().unwrap_or_default();
            if delays.send(delay).is_err() {
                return;
            }
        }
    }))
}

/// Deposits at a steady `rate` through the command service while the relay and the positions worker run;
/// reports, per event, the delay from its commit (`recorded_at`) to the commit of the read-model batch that
/// applied it, and to its arrival at a `logEvents` subscriber of an API instance started here.
pub async fn end_to_end(
    database_url: &str,
    kafka: &ledger::kafka::KafkaConfig,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<EndToEndResult> {
    use ledger::projections::worker::{ProjectionWorker, WorkerConfig};
    let (_, pool) = scratch_database(database_url).await?;
    let kafka = bench_kafka(kafka);
    kafka.ensure_topics().await?;
    let cancel = CancellationToken::new();
    let relay = Relay::new(pool.clone(), kafka.clone(), RelayConfig::default());
    let relay_task = {
        let cancel = cancel.clone();
        tokio::spawn(async move { relay.run(cancel).await })
    };
    let projection = ledger::projections::by_name("positions", &Default::default()).context("positions")?;
    let group_prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let worker =
        ProjectionWorker::new(pool.clone(), kafka, projection, WorkerConfig { group_prefix, ..Default::default() });
    let status = worker.status();
    let worker_task = {
        let cancel = cancel.clone();
        tokio::spawn(async move { worker.run(cancel).await })
    };
    while !status.following.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let commands = Arc::new(CommandService::new(pool.clone(), CommandConfig::default()));
    let portfolios = open_portfolios(&commands, 64).await?;
    while status.applied.load(Ordering::Relaxed) < portfolios.len() as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await; // warm-up: the pipeline is running
    }
    status.commit_to_applied.reset();
    // An API instance with one subscriber of the log (as a dashboard or a downstream service would be).
    let keys = ledger_api::auth::TokenKeys::new("bench-secret-of-at-least-thirty-two-bytes")
        .map_err(|e| anyhow::anyhow!(e))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api =
        ledger_api::app::start(pool.clone(), ledger_api::app::AppConfig::new(keys.clone(), None), listener).await?;
    let token = keys.issue("bench", ledger_api::auth::Role::Auditor, chrono::Duration::hours(1), Utc::now());
    let (delay_sender, mut delay_receiver) = tokio::sync::mpsc::unbounded_channel();
    let subscriber = subscribe_log(api.address, &token, delay_sender).await?;
    // The subscription starts "from now" when the server has taken it in: deposits start after that.
    while api.hub.subscriptions.load(Ordering::Relaxed) < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = rate * seconds;
    let sending = Instant::now();
    let amount = Amount::new(Decimal::ONE)?;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut in_flight = tokio::task::JoinSet::new();
    for n in 0..total {
        ticker.tick().await;
        let commands = commands.clone();
        let id = portfolios[(n as usize) % portfolios.len()];
        in_flight.spawn(async move {
            let deposit = PortfolioCommand::DepositCash { amount, reference: None, at: Utc::now() };
            commands.execute_portfolio(&CommandContext::new("bench"), id, deposit).await
        });
        while in_flight.len() > 256 {
            in_flight.join_next().await;
        }
    }
    while let Some(result) = in_flight.join_next().await {
        result??;
    }
    let achieved = total as f64 / sending.elapsed().as_secs_f64();
    let target = portfolios.len() as u64 + total;
    while status.applied.load(Ordering::Relaxed) < target {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut received = Vec::with_capacity(total as usize);
    while received.len() < total as usize {
        match tokio::time::timeout(Duration::from_secs(10), delay_receiver.recv()).await {
            Ok(Some(delay)) => received.push(delay),
            _ => break,
        }
    }
    subscriber.abort();
    api.stop().await?;
    if received.len() < total as usize {
        // The API closes a subscriber more than 1,024 messages behind (RESYNC_REQUIRED) rather than buffer.
        eprintln!("the subscriber received {} of {total} events: it fell behind and was closed", received.len());
    }
    received.sort();
    let histogram = &status.commit_to_applied;
    let ms = |q| histogram.quantile(q).unwrap_or(0.0) * 1_000.0;
    let result = EndToEndResult {
        suite: "e2e",
        rate_per_second: rate,
        commands: histogram.count(),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        achieved_rate_per_second: achieved,
        subscriber_events: received.len(),
        subscriber_p50_ms: percentile(&received, 0.5),
        subscriber_p99_ms: percentile(&received, 0.99),
        subscriber_p999_ms: percentile(&received, 0.999),
    };
    cancel.cancel();
    relay_task.await??;
    worker_task.await??;
    pool.close().await;
    Ok(result)
}

#[derive(Debug, Serialize)]
pub struct ValuationResult {
    pub suite: &'static str,
    pub portfolios: usize,
    pub ticks: usize,
    /// Tick published → its price visible in the valuation of a portfolio holding the symbol.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Reading all the portfolios' valuations of the symbol at once.
    pub full_read_ms: f64,
}

/// With `portfolios` portfolios holding one symbol, publishes ticks and measures how long each takes to show
/// in a portfolio's valuation (and how long valuing all of them takes).
pub async fn valuation(
    database_url: &str,
    kafka: &ledger::kafka::KafkaConfig,
    portfolios: usize,
    ticks: usize,
) -> anyhow::Result<ValuationResult> {
    use ledger::market::{Tick, TickPublisher, TICK_VERSION};
    use ledger::projections::worker::{ProjectionWorker, WorkerConfig};
    let (_, pool) = scratch_database(database_url).await?;
    // The positions read model of `portfolios` holders of ACME (as the positions projection writes it).
    sqlx::query(
        "insert into rm_portfolios (portfolio_id, owner, base_currency, cost_basis_method, cash, opened_at, updated_at, last_position)
         select gen_random_uuid(), 'bench', 'USD', 'Fifo', 1000, now(), now(), 0 from generate_series(1, $1)",
    )
    .bind(portfolios as i64)
    .execute(&pool)
    .await?;
    sqlx::query(
        "insert into rm_positions (portfolio_id, symbol, quantity, cost_basis, fifo_cost_basis, updated_at)
         select portfolio_id, 'ACME', 10, 1000, 1000, now() from rm_portfolios",
    )
    .execute(&pool)
    .await?;
    let probe: uuid::Uuid =
        sqlx::query_scalar("select portfolio_id from rm_portfolios limit 1").fetch_one(&pool).await?;
    let kafka = {
        let mut kafka = bench_kafka(kafka);
        kafka.prices_topic = format!("bench.prices.{}", uuid::Uuid::new_v4().simple());
        kafka
    };
    kafka.ensure_topics().await?;
    let projection = ledger::projections::by_name("prices", &Default::default()).context("prices")?;
    let group_prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let worker = ProjectionWorker::new(
        pool.clone(),
        kafka.clone(),
        projection,
        WorkerConfig { group_prefix, ..Default::default() },
    );
    let status = worker.status();
    let cancel = CancellationToken::new();
    let task = {
        let cancel = cancel.clone();
        tokio::spawn(async move { worker.run(cancel).await })
    };
    while !status.following.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let publisher = TickPublisher::new(&kafka)?;
    let mut delays = Vec::with_capacity(ticks);
    for n in 0..ticks + 5 {
        let price = Decimal::from(100) + Decimal::new(n as i64 % 50, 2);
        let tick = Tick {
            version: TICK_VERSION,
            symbol: ledger::domain::values::Symbol::new("ACME")?,
            price: ledger::domain::values::Price::new(price)?,
            ts: Utc::now(),
            seq: n as i64 + 1,
            volume: None,
            source: "bench".into(),
        };
        let started = Instant::now();
        publisher.publish(&tick).await?;
        loop {
            let shown: Option<Decimal> = sqlx::query_scalar(
                "select last_price from rm_position_valuations where portfolio_id = $1 and symbol = 'ACME'",
            )
            .bind(probe)
            .fetch_optional(&pool)
            .await?
            .flatten();
            if shown == Some(price) && tick.seq as u64 > 0 {
                let seen: i64 =
                    sqlx::query_scalar("select seq from latest_prices where symbol = 'ACME'").fetch_one(&pool).await?;
                if seen == tick.seq {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        if n >= 5 {
            delays.push(started.elapsed()); // the first ticks warm the worker up
        }
    }
    let started = Instant::now();
    let valued: i64 =
        sqlx::query_scalar("select count(market_value) from rm_position_valuations where symbol = 'ACME'")
            .fetch_one(&pool)
            .await?;
    let full_read_ms = started.elapsed().as_secs_f64() * 1_000.0;
    anyhow::ensure!(valued as usize == portfolios, "valued {valued} of {portfolios} positions");
    cancel.cancel();
    task.await??;
    pool.close().await;
    delays.sort();
    Ok(ValuationResult {
        suite: "valuation",
        portfolios,
        ticks,
        p50_ms: percentile(&delays, 0.5),
        p99_ms: percentile(&delays, 0.99),
        full_read_ms,
    })
}
