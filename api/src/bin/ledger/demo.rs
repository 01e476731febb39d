//! `ledger demo`: the whole system in one process, live, until Ctrl-C.
//!
//! PostgreSQL at `DATABASE_URL` (default: the local server; the database is created and migrated), Kafka at
//! `KAFKA_BROKERS` or, when unset, librdkafka's in-process mock cluster (a Kafka-protocol broker inside this
//! process). Then: the relay, the process manager, every projection worker, the GraphQL API with the web
//! dashboard, the market simulator, the paper executor, and a few trading bots — all deterministic for a given
//! `--seed` (the same portfolios, the same price paths), so a re-run continues the previous run's portfolios.
//!
//! Everything the bots do goes through the same command service as the API's mutations, and every fill goes
//! through `RecordExecution` from the paper executor, exactly as an external broker's fills would.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use ledger::commands::{CommandContext, CommandService, Idempotency};
use ledger::domain::order::PlaceOrder;
use ledger::domain::portfolio::AlertCondition;
use ledger::domain::values::{
    AlertId, Amount, ClientOrderId, Currency, OrderId, Owner, PortfolioId, Price, Quantity, Symbol,
};
use ledger::domain::{CostBasisMethod, OrderCommand, OrderType, Portfolio, PortfolioCommand, Side, TimeInForce};
use ledger::execution::{spawn_tick_consumer, PaperConfig, PaperExecutor};
use ledger::kafka::KafkaConfig;
use ledger::market::{SimulatorConfig, SymbolSpec};
use ledger_api::app::{start, AppConfig};
use ledger_api::auth::{Role, TokenKeys};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::mocking::MockCluster;
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;

/// The owner of the portfolio the printed token trades.
pub const DEMO_TRADER: &str = "demo-trader";
/// Largest number of bots.
pub const BOTS_MAX: usize = 50;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Address of the API and dashboard.
    #[arg(long, env = "LEDGER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Seed of the simulator and the bots (same seed: same portfolios and price paths).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Trading bots (0 to 50).
    #[arg(long, default_value_t = 3)]
    pub bots: usize,
    /// Milliseconds between simulated price steps.
    #[arg(long, default_value_t = 500)]
    pub tick_ms: u64,
    /// Seconds between a bot's orders (on average).
    #[arg(long, default_value_t = 3)]
    pub bot_pace_secs: u64,
    /// Signing secret of the tokens (a random one per run when unset).
    #[arg(long, env = "LEDGER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// The simulated market: symbols and starting prices, e.g. `AAPL:190,MSFT:420` (at most 100; default:
    /// ACME, GLOBEX, INITECH, UMBRELLA, HOOLI). The demo trader's alerts and first trade are on the first one.
    #[arg(long, env = "LEDGER_SYMBOLS")]
    pub symbols: Option<crate::shared::SymbolList>,
}

pub async fn run(
    database_url: &str,
    kafka_args: &ledger_api::options::KafkaArgs,
    projection_args: &crate::shared::ProjectionArgs,
    args: DemoArgs,
) -> anyhow::Result<()> {
    anyhow::ensure!(args.bots <= BOTS_MAX, "--bots must be 0 to {BOTS_MAX}");
    anyhow::ensure!((10..=60_000).contains(&args.tick_ms), "--tick-ms must be 10 to 60000");
    anyhow::ensure!((1..=3_600).contains(&args.bot_pace_secs), "--bot-pace-secs must be 1 to 3600");
    let market = match &args.symbols {
        Some(list) => list.0.clone(),
        None => SimulatorConfig::demo(args.seed).symbols,
    };
    let lead = market.first().cloned().context("the market needs at least one symbol")?;
    let pool = crate::shared::connect_and_migrate(database_url).await?;
    println!("ledger demo — PostgreSQL at {}", ledger::db::redact(database_url));
    let (embedded, brokers) = broker(kafka_args)?;
    let kafka = kafka_args.config(&brokers);
    let keys = token_keys(&args)?;
    let config = app_config(keys.clone(), &kafka, projection_args, embedded.is_none())?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (in use? pass --listen 127.0.0.1:PORT)", args.listen))?;
    let running = start(pool.clone(), config, listener).await?;
    let commands = running.commands.clone();
    let cancel = CancellationToken::new();
    let mut tasks = market_tasks(&kafka, &commands, &market, &args, &cancel)?;

    // The demo trader's portfolio (the dashboard's), and the bots.
    let mut seeds = StdRng::seed_from_u64(args.seed);
    let trader = seed_portfolio(&commands, &mut seeds, args.seed, DEMO_TRADER, "100000").await?;
    seed_alerts(&commands, trader, args.seed, &lead).await?;
    {
        let (commands, pool, cancel, seed) = (commands.clone(), pool.clone(), cancel.clone(), args.seed);
        let lead = lead.clone();
        tasks.push(tokio::spawn(async move { first_trade(&commands, &pool, trader, seed, &lead, cancel).await }));
    }
    for n in 1..=args.bots {
        let owner = format!("bot-{n}");
        let portfolio = seed_portfolio(&commands, &mut seeds, args.seed, &owner, "250000").await?;
        let bot = Bot {
            commands: commands.clone(),
            pool: pool.clone(),
            portfolio,
            owner,
            pace: Duration::from_secs(args.bot_pace_secs),
            market: market.iter().map(|spec| spec.symbol.to_string()).collect(),
        };
        let (cancel, rng) = (cancel.clone(), StdRng::seed_from_u64(args.seed.wrapping_add(n as u64)));
        tasks.push(tokio::spawn(async move { bot.run(rng, cancel).await }));
    }

    print_welcome(&keys, &format!("http://{}", running.address), trader, &args);
    crate::shared::shutdown_on_signal().cancelled().await;
    println!("stopping…");
    cancel.cancel();
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(error = format!("{error:#}"), "a demo task ended with an error"),
            Err(error) => tracing::warn!(%error, "a demo task panicked"),
        }
    }
    running.stop().await?;
    drop(embedded);
    println!("stopped");
    Ok(())
}

/// librdkafka's mock cluster, the demo's broker when none is given.
type InProcessBroker = MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// The broker: `KAFKA_BROKERS` when set, else an in-process Kafka-protocol broker (librdkafka's mock cluster,
/// kept alive by the caller) with the topics created through it.
fn broker(kafka_args: &ledger_api::options::KafkaArgs) -> anyhow::Result<(Option<InProcessBroker>, String)> {
    if let Some(brokers) = &kafka_args.brokers {
        println!("Kafka: brokers {brokers} (KAFKA_BROKERS)");
        return Ok((None, brokers.clone()));
    }
    let cluster = MockCluster::new(1).context("starting the in-process Kafka mock cluster")?;
    // The mock cluster has no admin API: create the topics through it directly.
    for topic in [&kafka_args.events_topic, &kafka_args.prices_topic, &kafka_args.dead_letter_topic] {
        cluster.create_topic(topic, kafka_args.kafka_partitions, 1).context("creating a mock topic")?;
    }
    let brokers = cluster.bootstrap_servers();
    println!("Kafka: KAFKA_BROKERS not set — using an in-process Kafka-protocol broker (librdkafka mock) at {brokers}");
    Ok((Some(cluster), brokers))
}

/// The token keys: `--jwt-secret`, or a random secret for this run.
fn token_keys(args: &DemoArgs) -> anyhow::Result<TokenKeys> {
    let secret = match &args.jwt_secret {
        Some(secret) => secret.clone(),
        None => {
            let bytes: [u8; 32] = rand::thread_rng().gen();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    TokenKeys::new(secret.into_bytes()).map_err(|e| anyhow::anyhow!(e))
}

/// The API with every role in the process; `create_topics` off with the mock broker (it has no admin API).
fn app_config(
    keys: TokenKeys,
    kafka: &KafkaConfig,
    projection_args: &crate::shared::ProjectionArgs,
    create_topics: bool,
) -> anyhow::Result<AppConfig> {
    let mut config = AppConfig::new(keys, Some(kafka.clone()));
    // The demo is for exploring: introspection and GraphiQL on, market data without a token (both off by
    // default in `ledger serve`).
    config.introspection = true;
    config.public_market_data = true;
    config.settings = projection_args.settings()?;
    config.valuation_stale_after = chrono::Duration::milliseconds(projection_args.valuation_stale_after_ms as i64);
    config.with_relay = true;
    config.with_process_manager = true;
    config.with_workers = true;
    config.with_webhooks = true;
    // Receivers in a demo are on the same machine.
    config.webhooks.allow_private_targets = true;
    config.relay.create_topics = create_topics;
    config.workers = projection_args.worker_config()?;
    config.workers.create_topics = create_topics;
    Ok(config)
}

/// Market data (the simulator) and paper execution, until `cancel` fires.
fn market_tasks(
    kafka: &KafkaConfig,
    commands: &Arc<CommandService>,
    market: &[SymbolSpec],
    args: &DemoArgs,
    cancel: &CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    let mut tasks = Vec::new();
    {
        let (kafka, cancel, seed, tick_ms) = (kafka.clone(), cancel.clone(), args.seed, args.tick_ms);
        let symbols = Some(market.to_vec());
        tasks.push(tokio::spawn(async move {
            crate::roles::publish_simulated(&kafka, seed, tick_ms, symbols, cancel).await
        }));
    }
    let executor = PaperExecutor::new(commands.clone(), PaperConfig::default()).map_err(|e| anyhow::anyhow!(e))?;
    let (sender, ticks) = tokio::sync::mpsc::channel(ledger::execution::TICK_QUEUE);
    let consumer = spawn_tick_consumer(kafka, sender, cancel.clone())?;
    let cancel = cancel.clone();
    tasks.push(tokio::spawn(async move {
        executor.run(ticks, cancel).await.context("paper executor")?;
        consumer.await.context("tick consumer")?;
        Ok(())
    }));
    Ok(tasks)
}

/// The URLs and the tokens, on stdout.
fn print_welcome(keys: &TokenKeys, base: &str, trader: PortfolioId, args: &DemoArgs) {
    let token = keys.issue(DEMO_TRADER, Role::Trader, chrono::Duration::days(DEMO_TOKEN_DAYS), Utc::now());
    let admin = keys.issue("demo-admin", Role::Admin, chrono::Duration::days(DEMO_TOKEN_DAYS), Utc::now());
    println!();
    println!("  dashboard   {base}/#token={token}");
    println!("  GraphiQL    {base}/graphql   (header  Authorization: Bearer <token>)");
    println!("  metrics     {base}/metrics");
    println!(
        "  prices      {base}/api/v1/prices   (no token; OpenAPI at /api/v1/openapi.json, live at ws://…/ws/prices)"
    );
    println!("  trader token ({DEMO_TRADER}, portfolio {trader}):");
    println!("    {token}");
    println!("  admin token:");
    println!("    {admin}");
    println!();
    println!(
        "{} bots trading, prices every {} ms (seed {}). Ctrl-C stops everything.",
        args.bots, args.tick_ms, args.seed
    );
}

fn seeded_uuid(rng: &mut StdRng) -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rng.gen()).into_uuid()
}

fn keyed(key: String) -> anyhow::Result<CommandContext> {
    Ok(CommandContext::new("demo").with_idempotency(Idempotency::new(key.clone(), &key)?))
}

/// Opens (once per seed) a funded portfolio for `owner`; returns its id.
async fn seed_portfolio(
    commands: &CommandService,
    rng: &mut StdRng,
    seed: u64,
    owner: &str,
    cash: &str,
) -> anyhow::Result<PortfolioId> {
    let id = PortfolioId(seeded_uuid(rng));
    let open = PortfolioCommand::OpenPortfolio {
        portfolio_id: id,
        owner: Owner::new(owner)?,
        base_currency: Currency::new("USD")?,
        cost_basis_method: CostBasisMethod::Fifo,
        opened_at: Utc::now(),
    };
    commands.execute_portfolio(&keyed(format!("demo:{seed}:{owner}:open"))?, id, open).await?;
    let deposit =
        PortfolioCommand::DepositCash { amount: Amount::new(cash.parse()?)?, reference: None, at: Utc::now() };
    commands.execute_portfolio(&keyed(format!("demo:{seed}:{owner}:deposit"))?, id, deposit).await?;
    Ok(id)
}

/// The idempotency key of a seeded command: the default market keeps the keys it always had (a demo database
/// from before `--symbols` is not seeded twice); another lead symbol gets keys of its own (a reused key would
/// answer with the earlier result, and the alerts and first trade for the new symbol would never be made).
fn seed_key(seed: u64, lead: &Symbol, name: &str) -> String {
    if lead.as_str() == DEFAULT_LEAD_SYMBOL {
        format!("demo:{seed}:{name}")
    } else {
        format!("demo:{seed}:{lead}:{name}")
    }
}

/// What the demo trader's first trade may spend (a tenth of its cash).
const FIRST_TRADE_BUDGET: Decimal = Decimal::from_parts(10_000, 0, 0, false, 0);

/// The first symbol of the default market (the demo's alerts and first trade were always on it).
const DEFAULT_LEAD_SYMBOL: &str = "ACME";
/// How often the demo looks whether the lead symbol has a price yet.
const PRICE_POLL_MS: u64 = 200;
/// Validity of the tokens the demo prints.
const DEMO_TOKEN_DAYS: i64 = 7;

/// Two alerts on the demo trader's portfolio (±1 % from the lead symbol's starting price), so that the alerts
/// feed has something to show.
async fn seed_alerts(
    commands: &CommandService,
    portfolio: PortfolioId,
    seed: u64,
    lead: &SymbolSpec,
) -> anyhow::Result<()> {
    let conditions = [("up", Decimal::ONE), ("down", -Decimal::ONE)].map(|(name, percent)| {
        let condition =
            AlertCondition::PercentChange { symbol: lead.symbol.clone(), reference: lead.initial_price, percent };
        (name, condition)
    });
    for (name, condition) in conditions {
        let command = PortfolioCommand::CreateAlert { alert_id: AlertId::generate(), condition, at: Utc::now() };
        let context = keyed(seed_key(seed, &lead.symbol, &format!("alert:{name}")))?;
        commands.execute_portfolio(&context, portfolio, command).await?;
    }
    Ok(())
}

/// Once per seed: a market buy of the lead symbol (10, fewer when it is dear) for the demo trader as soon as it
/// has a price, so that the dashboard shows a position from the start.
async fn first_trade(
    commands: &CommandService,
    pool: &sqlx::PgPool,
    portfolio: PortfolioId,
    seed: u64,
    lead: &SymbolSpec,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let symbol = &lead.symbol;
    // Ten, or what a tenth of the trader's cash buys at the starting price (at least one).
    let quantity = (FIRST_TRADE_BUDGET / lead.initial_price.value()).floor().clamp(Decimal::ONE, Decimal::TEN);
    loop {
        let priced: bool = sqlx::query_scalar("select exists (select 1 from latest_prices where symbol = $1)")
            .bind(symbol.as_str())
            .fetch_one(pool)
            .await?;
        if priced {
            break;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(PRICE_POLL_MS)) => {}
        }
    }
    // The default market keeps the order id and client id it always had; another lead symbol gets its own.
    let (order_id, client_order_id) = if symbol.as_str() == DEFAULT_LEAD_SYMBOL {
        (seeded_uuid(&mut StdRng::seed_from_u64(seed ^ 0x5eed)), format!("demo-first-{seed}"))
    } else {
        let client_order_id = format!("demo-first-{seed}-{symbol}");
        (uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, client_order_id.as_bytes()), client_order_id)
    };
    let order_id = OrderId(order_id);
    let command = OrderCommand::PlaceOrder(PlaceOrder {
        order_id,
        portfolio_id: portfolio,
        client_order_id: ClientOrderId::new(client_order_id)?,
        symbol: symbol.clone(),
        side: Side::Buy,
        order_type: OrderType::Market,
        quantity: Quantity::new(quantity)?,
        time_in_force: TimeInForce::Day,
        placed_at: Utc::now(),
    });
    commands.execute_order(&keyed(seed_key(seed, symbol, "first-trade"))?, order_id, command).await?;
    Ok(())
}

/// A bot: every few seconds, a random market or limit order near the last price; sells only what it holds.
struct Bot {
    commands: Arc<CommandService>,
    pool: sqlx::PgPool,
    portfolio: PortfolioId,
    owner: String,
    pace: Duration,
    /// The simulated symbols (a database from an earlier run may hold prices of others, no longer moving).
    market: Vec<String>,
}

impl Bot {
    async fn run(self, mut rng: StdRng, cancel: CancellationToken) -> anyhow::Result<()> {
        loop {
            let wait = self.pace.mul_f64(rng.gen_range(0.5..1.5));
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
            if let Err(error) = self.trade(&mut rng).await {
                tracing::debug!(bot = %self.owner, error = format!("{error:#}"), "bot order not placed");
            }
        }
    }

    async fn trade(&self, rng: &mut StdRng) -> anyhow::Result<()> {
        let prices: Vec<(String, Decimal)> =
            sqlx::query_as("select symbol, price from latest_prices where symbol = any($1) order by symbol")
                .bind(&self.market)
                .fetch_all(&self.pool)
                .await?;
        if prices.is_empty() {
            return Ok(());
        }
        let (symbol, last) = prices[rng.gen_range(0..prices.len())].clone();
        let symbol = Symbol::new(symbol)?;
        let (state, _) = self.commands.load::<Portfolio>(&self.portfolio.to_string()).await?;
        let free = state.positions.get(&symbol).map(|p| p.quantity - p.reserved_quantity).unwrap_or_default();
        let side = if free >= Decimal::ONE && rng.gen_bool(0.45) { Side::Sell } else { Side::Buy };
        let budget = state.buying_power() * Decimal::new(5, 2); // at most 5 % of buying power per order
        let quantity = match side {
            Side::Buy => (budget / last).floor().min(Decimal::from(rng.gen_range(1..=20))),
            Side::Sell => free.floor().min(Decimal::from(rng.gen_range(1..=20))),
        };
        if quantity < Decimal::ONE {
            return Ok(());
        }
        let (order_type, time_in_force) = match rng.gen_range(0..10) {
            0..=3 => (OrderType::Market, TimeInForce::Day),
            4..=7 => {
                // A limit within ±0.5 % of the last price: some fill at once, some wait, some never fill.
                let offset = Decimal::new(rng.gen_range(-50..=50), 4);
                let limit = (last * (Decimal::ONE + offset)).round_dp(2);
                let tif = [TimeInForce::Day, TimeInForce::Gtc, TimeInForce::Ioc][rng.gen_range(0..3)];
                (OrderType::Limit { limit_price: Price::new(limit)? }, tif)
            }
            _ => {
                // A stop 0.05–0.3 % beyond the last price (a breakout buy, a stop-loss sell): the price stream
                // triggers some of them.
                let offset = Decimal::new(rng.gen_range(5..=30), 4);
                let stop = match side {
                    Side::Buy => last * (Decimal::ONE + offset),
                    Side::Sell => last * (Decimal::ONE - offset),
                };
                (OrderType::Stop { stop_price: Price::new(stop.round_dp(2))? }, TimeInForce::Day)
            }
        };
        let order_id = OrderId::generate();
        let command = OrderCommand::PlaceOrder(PlaceOrder {
            order_id,
            portfolio_id: self.portfolio,
            client_order_id: ClientOrderId::new(format!("{}-{}", self.owner, &order_id.to_string()[..8]))?,
            symbol,
            side,
            order_type,
            quantity: Quantity::new(quantity)?,
            time_in_force,
            placed_at: Utc::now(),
        });
        let context = keyed(format!("demo:{}:{order_id}", self.owner))?;
        self.commands.execute_order(&context, order_id, command).await?;
        Ok(())
    }
}
