//! Starting an API process: the HTTP server with its subscription feeds, and on request the relay, the
//! process manager and the projection workers in the same process. Used by `ledger serve`, `ledger demo`
//! and the tests (which start several instances side by side).

use std::sync::Arc;

use anyhow::Context;
use ledger::clock::SystemClock;
use ledger::commands::{CommandConfig, CommandService};
use ledger::kafka::KafkaConfig;
use ledger::process::{ProcessConfig, ProcessManager};
use ledger::projections::worker::WorkerConfig;
use ledger::projections::ProjectionSettings;
use ledger::relay::{Relay, RelayConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenKeys;
use crate::graphql::feeds::Hub;
use crate::graphql::AppState;
use crate::http::server::{router, serve, ServerConfig};

#[derive(Clone)]
pub struct AppConfig {
    pub keys: TokenKeys,
    pub introspection: bool,
    /// Market data (`/api/v1/…`, `/ws/prices`) without a token.
    pub public_market_data: bool,
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    pub rate_limit_per_address_per_second: u32,
    pub rate_limit_per_address_burst: u32,
    /// Serve `/metrics` without a token on this address too (an internal network's scraper).
    pub metrics_listen: Option<String>,
    /// WebSocket server pings and the silence after which a socket is closed.
    pub keep_alive: crate::http::ws::KeepAlive,
    pub valuation_stale_after: chrono::Duration,
    pub kafka: Option<KafkaConfig>,
    pub settings: ProjectionSettings,
    pub with_relay: bool,
    pub with_process_manager: bool,
    pub with_workers: bool,
    /// Also deliver alert webhooks (needs no broker).
    pub with_webhooks: bool,
    pub webhooks: crate::webhooks::WebhookConfig,
    pub relay: RelayConfig,
    pub workers: WorkerConfig,
}

impl AppConfig {
    pub fn new(keys: TokenKeys, kafka: Option<KafkaConfig>) -> Self {
        Self {
            keys,
            introspection: false,
            public_market_data: false,
            rate_limit_per_second: 200,
            rate_limit_burst: 400,
            rate_limit_per_address_per_second: 1_000,
            rate_limit_per_address_burst: 2_000,
            metrics_listen: None,
            keep_alive: crate::http::ws::KeepAlive::default(),
            valuation_stale_after: chrono::Duration::milliseconds(
                ledger::projections::valuation::VALUATION_STALE_AFTER_MS_DEFAULT as i64,
            ),
            kafka,
            settings: ProjectionSettings::default(),
            with_relay: false,
            with_process_manager: false,
            with_workers: false,
            with_webhooks: false,
            webhooks: crate::webhooks::WebhookConfig::default(),
            relay: RelayConfig::default(),
            workers: WorkerConfig::default(),
        }
    }
}

/// A running API process.
pub struct Running {
    pub cancel: CancellationToken,
    pub tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub address: std::net::SocketAddr,
    /// The metrics listener's address, when `metrics_listen` was set.
    pub metrics_address: Option<std::net::SocketAddr>,
    pub commands: Arc<CommandService>,
    /// The subscription feeds (their positions and counts are what a test waits for).
    pub hub: Arc<Hub>,
}

impl Running {
    /// Stops everything gracefully and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        for task in self.tasks {
            task.await.context("task")??;
        }
        Ok(())
    }
}

/// Starts the API on `listener` (and the components `config` asks for).
pub async fn start(pool: PgPool, config: AppConfig, listener: tokio::net::TcpListener) -> anyhow::Result<Running> {
    let cancel = CancellationToken::new();
    let commands = Arc::new(CommandService::new(pool.clone(), CommandConfig::default()));
    let hub = Hub::start(pool.clone(), config.kafka.clone(), cancel.clone()).await?;
    let app = AppState {
        pool: pool.clone(),
        commands: commands.clone(),
        hub: hub.clone(),
        clock: Arc::new(SystemClock),
        valuation_stale_after: config.valuation_stale_after,
        settings: config.settings.clone(),
    };
    let server = ServerConfig {
        keys: config.keys.clone(),
        introspection: config.introspection,
        rate_limit_per_second: config.rate_limit_per_second,
        rate_limit_burst: config.rate_limit_burst,
        rate_limit_per_address_per_second: config.rate_limit_per_address_per_second,
        rate_limit_per_address_burst: config.rate_limit_per_address_burst,
        keep_alive: config.keep_alive,
        kafka: config.kafka.clone(),
        public_market_data: config.public_market_data,
    };
    let (router, server_state) = router(app, server);
    let address = listener.local_addr()?;
    let mut tasks = Vec::new();
    {
        let cancel = cancel.clone();
        tasks.push(tokio::spawn(async move { serve(listener, router, cancel).await.context("HTTP server") }));
    }
    let mut metrics_address = None;
    if let Some(listen) = &config.metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening for metrics on {listen}"))?;
        metrics_address = Some(metrics_listener.local_addr()?);
        let (router, cancel) = (crate::http::server::metrics_router(server_state), cancel.clone());
        tasks
            .push(tokio::spawn(async move { serve(metrics_listener, router, cancel).await.context("metrics server") }));
    }
    if config.with_webhooks {
        let deliverer = crate::webhooks::Deliverer::new(pool.clone(), config.webhooks.clone())?;
        let cancel = cancel.clone();
        tasks.push(tokio::spawn(async move { deliverer.run(cancel).await.context("webhooks") }));
    }
    if config.with_process_manager {
        let manager = ProcessManager::new(commands.clone(), ProcessConfig::default());
        let cancel = cancel.clone();
        tasks.push(tokio::spawn(async move { manager.run(cancel).await.context("process manager") }));
    }
    match config.kafka {
        Some(kafka) => {
            if config.with_relay {
                let relay = Relay::new(pool.clone(), kafka.clone(), config.relay.clone());
                let cancel = cancel.clone();
                tasks.push(tokio::spawn(async move { relay.run(cancel).await.context("relay") }));
            }
            if config.with_workers {
                let projections = ledger::projections::all(&config.settings);
                let (pool, workers, cancel) = (pool.clone(), config.workers.clone(), cancel.clone());
                tasks.push(tokio::spawn(async move {
                    ledger::projections::worker::run_workers(pool, kafka, projections, workers, cancel)
                        .await
                        .context("workers")
                }));
            }
        }
        None if config.with_relay || config.with_workers => {
            anyhow::bail!("the relay and the workers need KAFKA_BROKERS")
        }
        None => {}
    }
    Ok(Running { cancel, tasks, address, metrics_address, commands, hub })
}
