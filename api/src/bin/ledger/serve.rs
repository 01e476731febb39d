//! `ledger serve`: the GraphQL API, and on request the relay, process manager and projection workers in the
//! same process (production runs them as separate processes: `ledger relay`, `ledger process-manager`,
//! `ledger worker all`).

use anyhow::Context;
use ledger_api::app::{start, AppConfig};
use ledger_api::auth::TokenKeys;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "LEDGER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Secret signing the bearer tokens (at least 32 bytes).
    #[arg(long, env = "LEDGER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// Allow schema introspection and serve GraphiQL at GET /graphql (off by default: the schema is published
    /// as api/schema.graphql).
    #[arg(long, env = "LEDGER_INTROSPECTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub introspection: bool,
    /// Serve market data (/api/v1/prices…, /ws/prices) without a token, rate-limited per client address (off by
    /// default: any valid token is needed).
    #[arg(long, env = "LEDGER_PUBLIC_MARKET_DATA", default_value_t = false, action = clap::ArgAction::Set)]
    pub public_market_data: bool,
    /// Requests (and WebSocket operations) per second and token subject (or client address without a token).
    #[arg(long, env = "LEDGER_RATE_LIMIT_PER_SECOND", default_value_t = 200)]
    pub rate_limit_per_second: u32,
    /// Burst above that rate.
    #[arg(long, env = "LEDGER_RATE_LIMIT_BURST", default_value_t = 400)]
    pub rate_limit_burst: u32,
    /// Requests per second per client address, checked before any token is looked at.
    #[arg(long, env = "LEDGER_RATE_LIMIT_PER_ADDRESS_PER_SECOND", default_value_t = 1_000)]
    pub rate_limit_per_address_per_second: u32,
    /// Burst above that rate.
    #[arg(long, env = "LEDGER_RATE_LIMIT_PER_ADDRESS_BURST", default_value_t = 2_000)]
    pub rate_limit_per_address_burst: u32,
    /// Also serve /metrics without a token on this address (bind it to an internal network for the scraper;
    /// on the API address /metrics needs an auditor or admin token).
    #[arg(long, env = "LEDGER_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Also run the relay in this process (one is active per topic; others stand by).
    #[arg(long, env = "LEDGER_SERVE_RELAY")]
    pub with_relay: bool,
    /// Also run the process manager in this process.
    #[arg(long, env = "LEDGER_SERVE_PROCESS_MANAGER")]
    pub with_process_manager: bool,
    /// Also run every projection worker in this process.
    #[arg(long, env = "LEDGER_SERVE_WORKERS")]
    pub with_workers: bool,
    /// Also deliver alert webhooks from this process (any number of processes may).
    #[arg(long, env = "LEDGER_SERVE_WEBHOOKS")]
    pub with_webhooks: bool,
    #[command(flatten)]
    pub webhooks: crate::shared::WebhookArgs,
}

pub async fn run(
    database_url: &str,
    kafka_args: &ledger_api::options::KafkaArgs,
    projection_args: &crate::shared::ProjectionArgs,
    args: ServeArgs,
) -> anyhow::Result<()> {
    // The secret first: a weak one stops the command before it touches anything.
    let keys = TokenKeys::new(args.jwt_secret.clone().into_bytes()).map_err(|e| anyhow::anyhow!(e))?;
    let pool = crate::shared::connect_and_migrate(database_url).await?;
    let kafka = kafka_args.brokers.as_deref().map(|brokers| kafka_args.config(brokers));
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let mut config = AppConfig::new(keys, kafka);
    config.introspection = args.introspection;
    config.public_market_data = args.public_market_data;
    config.rate_limit_per_second = args.rate_limit_per_second;
    config.rate_limit_burst = args.rate_limit_burst;
    config.rate_limit_per_address_per_second = args.rate_limit_per_address_per_second;
    config.rate_limit_per_address_burst = args.rate_limit_per_address_burst;
    config.metrics_listen = args.metrics_listen.clone();
    config.valuation_stale_after = chrono::Duration::milliseconds(projection_args.valuation_stale_after_ms as i64);
    config.settings = projection_args.settings()?;
    config.with_relay = args.with_relay;
    config.with_process_manager = args.with_process_manager;
    config.with_workers = args.with_workers;
    config.with_webhooks = args.with_webhooks;
    config.webhooks = args.webhooks.config();
    config.workers = projection_args.worker_config()?;
    let running = start(pool, config, listener).await?;
    tracing::info!(address = %running.address, metrics = ?running.metrics_address,
        "GraphQL API listening (POST /graphql, /graphql/ws, /api/v1, /ws/prices, /metrics)");
    crate::shared::shutdown_on_signal().cancelled().await;
    running.stop().await
}
