//! What every subcommand family shares: the read-model options, the database connection (with the
//! pool size of `--db-connections`), the shutdown signal and the progress bar.

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Simulated symbols with their starting prices, as `--symbols AAPL:190,MSFT:420` gives them.
#[derive(Debug, Clone)]
pub struct SymbolList(pub Vec<ledger::market::SymbolSpec>);

impl std::str::FromStr for SymbolList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        ledger::market::SymbolSpec::parse_list(text).map(SymbolList)
    }
}

/// Longest consumer-group prefix accepted (Kafka allows 255 for the whole group id).
const GROUP_PREFIX_LEN_MAX: usize = 100;

/// Settings of the read models.
#[derive(Debug, Clone, clap::Args)]
pub struct ProjectionArgs {
    /// Windows (in ticks) of the SMA and EMA indicators.
    #[arg(long, env = "LEDGER_INDICATOR_WINDOWS", value_delimiter = ',', default_value = "5,20", global = true)]
    pub indicator_windows: Vec<u32>,
    /// Ticks kept per symbol in the price history.
    #[arg(long, env = "LEDGER_PRICE_HISTORY_TICKS", default_value_t = 500, global = true)]
    pub price_history_ticks: usize,
    /// A price older than this makes a valuation stale.
    #[arg(long, env = "LEDGER_VALUATION_STALE_AFTER_MS", default_value_t = ledger::projections::valuation::VALUATION_STALE_AFTER_MS_DEFAULT, global = true)]
    pub valuation_stale_after_ms: u64,
    /// Consumer-group prefix of the projection workers (groups `<prefix>.<projection>`): ledgers that share a
    /// broker need different ones.
    #[arg(long, env = "LEDGER_GROUP_PREFIX", default_value = "ledger", global = true)]
    pub group_prefix: String,
}

impl ProjectionArgs {
    /// The workers' settings: the defaults, in this consumer-group prefix.
    pub fn worker_config(&self) -> anyhow::Result<ledger::projections::worker::WorkerConfig> {
        anyhow::ensure!(
            !self.group_prefix.is_empty()
                && self.group_prefix.len() <= GROUP_PREFIX_LEN_MAX
                && self.group_prefix.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "the group prefix must be 1 to {GROUP_PREFIX_LEN_MAX} characters of A-Z, a-z, 0-9, '.', '_' and '-'"
        );
        Ok(ledger::projections::worker::WorkerConfig { group_prefix: self.group_prefix.clone(), ..Default::default() })
    }

    pub fn settings(&self) -> anyhow::Result<ledger::projections::ProjectionSettings> {
        anyhow::ensure!(
            !self.indicator_windows.is_empty() && self.indicator_windows.iter().all(|w| (1..=1_000).contains(w)),
            "indicator windows must be 1 to 1000 ticks"
        );
        anyhow::ensure!((1..=100_000).contains(&self.price_history_ticks), "price history must be 1 to 100000 ticks");
        Ok(ledger::projections::ProjectionSettings {
            price_history_ticks: self.price_history_ticks,
            indicator_windows: self.indicator_windows.clone(),
        })
    }
}

/// The pool size every command's `connect_and_migrate` uses (set once from `--db-connections`).
static DB_CONNECTIONS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Sets the pool size of every later `connect_and_migrate` (the first call wins).
pub fn set_db_connections(connections: u32) {
    let _ = DB_CONNECTIONS.set(connections);
}

/// Connects (creating the database if needed) and migrates, with an error that says what to do.
pub async fn connect_and_migrate(url: &str) -> anyhow::Result<PgPool> {
    let connections = DB_CONNECTIONS.get().copied().unwrap_or(ledger::db::POOL_CONNECTIONS_MAX);
    ledger::db::connect_and_migrate(url, connections).await
}

/// A token cancelled on Ctrl-C or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate => {}
        }
        tracing::info!("shutdown requested");
        token.cancel();
    });
    cancel
}

/// Settings of alert webhook delivery (`ledger webhooks`, `serve --with-webhooks`).
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookArgs {
    /// Deliver to loopback, private and link-local addresses too (off: a portfolio owner cannot make the ledger
    /// call into its own network).
    #[arg(long, env = "LEDGER_WEBHOOK_ALLOW_PRIVATE", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook_allow_private: bool,
    /// Wait before a failed delivery's second attempt, in ms (doubling for each further one, up to 10 minutes).
    #[arg(long, env = "LEDGER_WEBHOOK_RETRY_FIRST_MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub webhook_retry_first_ms: u64,
    /// Hours a failing delivery is retried before it is dead.
    #[arg(long, env = "LEDGER_WEBHOOK_RETRY_HOURS", default_value_t = 24,
          value_parser = clap::value_parser!(u32).range(1..=168))]
    pub webhook_retry_hours: u32,
    /// Certificates (PEM) to trust for https:// endpoints besides the Mozilla roots (a private CA's).
    #[arg(long, env = "LEDGER_WEBHOOK_CA_FILE")]
    pub webhook_ca_file: Option<std::path::PathBuf>,
}

impl WebhookArgs {
    pub fn config(&self) -> ledger_api::webhooks::WebhookConfig {
        ledger_api::webhooks::WebhookConfig {
            policy: ledger::webhooks::WebhookPolicy {
                retry_first_delay: chrono::Duration::milliseconds(self.webhook_retry_first_ms as i64),
                retry_for: chrono::Duration::hours(i64::from(self.webhook_retry_hours)),
            },
            allow_private_targets: self.webhook_allow_private,
            ca_file: self.webhook_ca_file.clone(),
            ..Default::default()
        }
    }
}

/// A progress bar counting `unit`s with their rate and the time left; its message names the work.
pub fn progress_bar(unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{msg:>10}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{per_sec}}  ETA {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}
