//! Command-line interface: subcommands, shared options and logging set-up.

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ledger::commands::{CommandConfig, CommandService};
use ledger::process::{ProcessConfig, ProcessManager};
use ledger::relay::RelayConfig;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "ledger", version, about = "Event-sourced CQRS trading ledger")]
pub struct Cli {
    /// A file of NAME=value settings (the environment's names), applied under the environment (see README).
    #[arg(long, env = "LEDGER_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,

    /// Largest number of PostgreSQL connections this process opens (its pool).
    #[arg(long, env = "LEDGER_DB_CONNECTIONS", default_value_t = ledger::db::POOL_CONNECTIONS_MAX, value_parser = clap::value_parser!(u32).range(1..=256), global = true)]
    pub db_connections: u32,

    /// PostgreSQL URL. The database is created if missing and migrated at startup.
    #[arg(long, env = "DATABASE_URL", default_value = ledger::db::DATABASE_URL_DEFAULT, global = true)]
    pub database_url: String,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    #[command(flatten)]
    pub projections: ProjectionArgs,

    /// Log output: human-readable text or JSON lines.
    #[arg(long, env = "LEDGER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// OpenTelemetry: export spans as OTLP/HTTP JSON to this collector (e.g. http://collector:4318); off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,

    /// OpenTelemetry `service.name` of the exported spans.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "ledger", global = true)]
    pub otel_service_name: String,

    #[command(subcommand)]
    pub command: Command,
}

/// Simulated symbols with their starting prices, as `--symbols AAPL:190,MSFT:420` gives them.
#[derive(Debug, Clone)]
pub struct SymbolList(pub Vec<ledger::market::SymbolSpec>);

impl std::str::FromStr for SymbolList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        ledger::market::SymbolSpec::parse_list(text).map(SymbolList)
    }
}

/// Kafka settings shared by every subcommand that talks to the broker.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (host:port,…). `demo` starts an in-process broker when this is not set.
    #[arg(long = "kafka-brokers", env = "KAFKA_BROKERS", global = true)]
    pub brokers: Option<String>,
    /// Topic the relay mirrors the event log to.
    #[arg(long, env = "LEDGER_EVENTS_TOPIC", default_value = ledger::kafka::EVENTS_TOPIC_DEFAULT, global = true)]
    pub events_topic: String,
    /// Topic of market-data ticks.
    #[arg(long, env = "LEDGER_PRICES_TOPIC", default_value = ledger::kafka::PRICES_TOPIC_DEFAULT, global = true)]
    pub prices_topic: String,
    /// Dead-letter topic for messages consumers cannot process.
    #[arg(long, env = "LEDGER_DEAD_LETTER_TOPIC", default_value = ledger::kafka::DEAD_LETTER_TOPIC_DEFAULT, global = true)]
    pub dead_letter_topic: String,
    /// Partitions of the topics the ledger creates.
    #[arg(long, env = "LEDGER_KAFKA_PARTITIONS", default_value_t = ledger::kafka::PARTITIONS_DEFAULT, global = true)]
    pub kafka_partitions: i32,
    /// Replication factor of the topics the ledger creates.
    #[arg(long, env = "LEDGER_KAFKA_REPLICATION", default_value_t = 1, global = true)]
    pub kafka_replication: i32,
}

impl KafkaArgs {
    /// The Kafka configuration for `brokers`.
    pub fn config(&self, brokers: &str) -> ledger::kafka::KafkaConfig {
        let mut config = ledger::kafka::KafkaConfig::new(brokers);
        config.events_topic = self.events_topic.clone();
        config.prices_topic = self.prices_topic.clone();
        config.dead_letter_topic = self.dead_letter_topic.clone();
        config.partitions = self.kafka_partitions;
        config.replication_factor = self.kafka_replication;
        config
    }

    /// The configured brokers, or an error saying how to set them.
    pub fn required(&self) -> anyhow::Result<ledger::kafka::KafkaConfig> {
        let brokers =
            self.brokers.as_deref().context("set KAFKA_BROKERS (or --kafka-brokers) to the Kafka bootstrap servers")?;
        Ok(self.config(brokers))
    }
}

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
}

impl ProjectionArgs {
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

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole system live (broker, relay, workers, API, dashboard, simulator, paper executor, bots)
    /// until Ctrl-C; prints the dashboard URL and a token.
    Demo(crate::demo::DemoArgs),
    /// Run the GraphQL API server (optionally with the relay, process manager and workers in-process).
    Serve(crate::serve::ServeArgs),
    /// Issue a bearer token for the API (signed with LEDGER_JWT_SECRET).
    Token {
        /// Who the token is for (a trader's portfolios are those whose owner is this subject).
        #[arg(long)]
        subject: String,
        /// trader, broker, auditor or admin.
        #[arg(long, default_value = "trader")]
        role: String,
        /// Validity in hours.
        #[arg(long, default_value_t = 24)]
        ttl_hours: i64,
        #[arg(long, env = "LEDGER_JWT_SECRET", hide_env_values = true)]
        jwt_secret: String,
    },
    /// Print the GraphQL schema (SDL), as committed in api/schema.graphql.
    Schema,
    /// Create the database if missing and apply all migrations, then exit.
    Migrate,
    /// Run the process manager (Order ↔ Portfolio coordination) until interrupted (one active per database;
    /// others stand by).
    ProcessManager,
    /// Steps the process manager could not apply: list, retry (once the cause is fixed) or dismiss them.
    ProcessFailures {
        #[command(subcommand)]
        command: crate::operations::ProcessFailuresCommand,
    },
    /// Check that every order agrees with its portfolio (fills booked, reservations released); exit 1 if not.
    Check,
    /// Mirror the event log to Kafka until interrupted (one active relay per topic; others stand by).
    Relay,
    /// Run projection workers (one consumer group each) until interrupted.
    Worker {
        /// orders, positions, prices, analytics, alerts, or all.
        projection: String,
    },
    /// Rebuild read models from the log into shadow tables and swap them in (or, with --verify, compare).
    Replay {
        /// The projection to rebuild (orders, positions, prices, analytics, alerts).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        projection: Option<String>,
        /// Rebuild every projection.
        #[arg(long)]
        all: bool,
        /// Compare a rebuild with the live tables instead of swapping; exit code 1 on any difference.
        #[arg(long)]
        verify: bool,
    },
    /// Publish simulated prices (seeded geometric Brownian motion) to the prices topic until interrupted.
    Simulate {
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Milliseconds between ticks of each symbol.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
        /// Symbols and their starting prices, e.g. `AAPL:190,MSFT:420` (at most 100; default: the demo's five).
        #[arg(long, env = "LEDGER_SYMBOLS")]
        symbols: Option<SymbolList>,
    },
    /// Run the paper-trading executor: fill accepted orders against the prices topic until interrupted.
    Executor {
        /// Price moved against each fill, in basis points.
        #[arg(long, env = "LEDGER_PAPER_SLIPPAGE_BPS", default_value_t = 5)]
        slippage_bps: u32,
        /// Fee in basis points of each fill's value.
        #[arg(long, env = "LEDGER_PAPER_FEE_BPS", default_value_t = 5)]
        fee_bps: u32,
        /// Minimum fee per fill.
        #[arg(long, env = "LEDGER_PAPER_FEE_MIN", default_value = "0")]
        fee_min: rust_decimal::Decimal,
        /// Share of a tick's volume one order may take (0 < p ≤ 1).
        #[arg(long, env = "LEDGER_PAPER_PARTICIPATION", default_value = "1")]
        participation: rust_decimal::Decimal,
        /// Time of day (UTC, HH:MM) at which Day orders expire.
        #[arg(long, env = "LEDGER_PAPER_DAY_END_UTC", default_value = "21:00")]
        day_end_utc: String,
    },
    /// Chaos test: load through two API instances while processes are killed and the broker and PostgreSQL
    /// restart; then check that nothing was lost or doubled (see `scripts/chaos`).
    Chaos(crate::chaos::ChaosArgs),
    /// Publish the ticks of a CSV file (ts,symbol,price[,volume]) to the prices topic.
    Feed {
        #[arg(long)]
        csv: std::path::PathBuf,
        /// Replay speed relative to the file's timestamps (0: as fast as possible).
        #[arg(long, default_value_t = 0.0)]
        speed: f64,
    },
    /// Seal the event log into the audit hash chain until interrupted (one active sealer; others stand by).
    Seal,
    /// Export the sealed audit trail (JSON Lines, CSV or Parquet) with a manifest; seals up to the head first.
    Export(crate::audit::ExportArgs),
    /// Verify an export directory, or with --db the log against the sealed chain; exit code 1 on any change.
    Verify(crate::audit::VerifyArgs),
    /// Measure throughput and latency (see docs/benchmarks.md).
    Bench {
        #[command(subcommand)]
        suite: BenchSuite,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchSuite {
    /// Seal, export (each format) and verify a synthetic log; events/s and peak RSS of each export.
    Export {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Export formats to measure (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "jsonl,csv,parquet", value_parser = |s: &str| s.parse::<ledger::audit::ExportFormat>())]
        formats: Vec<ledger::audit::ExportFormat>,
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// GraphQL deposit mutations over HTTP from concurrent clients, with pgbench's single-row insert for reference.
    Commands {
        /// Concurrent clients (comma-separated for several runs, e.g. 1,32).
        #[arg(long, value_delimiter = ',', default_value = "1,32")]
        clients: Vec<usize>,
        /// Seconds per run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Runs per client count; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// All clients deposit into one portfolio (a hot aggregate) instead of one portfolio each.
        #[arg(long)]
        hot: bool,
        /// Run the relay, the process manager and the projection workers beside the API, as deployed (needs
        /// KAFKA_BROKERS); waits for them to reach the log's head first, and reports how far the relay was behind.
        #[arg(long)]
        with_system: bool,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// N subscribers of priceTicks on one API instance: tick → subscriber delay. Needs KAFKA_BROKERS.
    Fanout {
        /// Subscribers (comma-separated for several runs).
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        subscribers: Vec<usize>,
        /// Ticks published per run.
        #[arg(long, default_value_t = 50)]
        ticks: usize,
        /// Ticks per second.
        #[arg(long, default_value_t = 10)]
        rate: u32,
        /// Runs per subscriber count; the run with the median p99 is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// DepositCash in a loop from concurrent tasks, each on its own portfolio.
    Deposits {
        /// Concurrent tasks (comma-separated for several runs, e.g. 1,16).
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        tasks: Vec<usize>,
        /// Seconds per run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Runs per task count; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Send every command with an idempotency key.
        #[arg(long)]
        keyed: bool,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Rebuild speed of the positions read model from a synthetic log (scratch database `<name>_bench`).
    Replay {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Commit → read-model delay at a steady command rate (relay and positions worker). Needs KAFKA_BROKERS.
    E2e {
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Tick → valuation delay with many portfolios holding the symbol. Needs KAFKA_BROKERS.
    Valuation {
        #[arg(long, default_value_t = 10_000)]
        portfolios: usize,
        #[arg(long, default_value_t = 200)]
        ticks: usize,
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Batched intake: `cashBatch` mutations of many deposits over HTTP, one transaction each; events/s.
    Intake {
        /// Concurrent clients (comma-separated for several runs), each on its own portfolios.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        clients: Vec<usize>,
        /// Deposits per batch (at most 1000).
        #[arg(long, default_value_t = 1_000)]
        batch_size: usize,
        /// Seconds per run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Runs per client count; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Relay throughput (pre-filled log → fresh topic) and commit → acknowledgement delay. Needs KAFKA_BROKERS.
    Relay {
        /// Events in the pre-filled log.
        #[arg(long, default_value_t = 200_000)]
        events: i64,
        /// Relay batch sizes to try (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1000")]
        batch_sizes: Vec<usize>,
        /// Runs per batch size; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Producer linger (librdkafka `linger.ms`) for the throughput runs.
        #[arg(long, default_value_t = RelayConfig::default().linger_ms)]
        linger_ms: u32,
        /// Events per second of the latency run (one event per transaction).
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        /// Seconds of the latency run.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

/// `  ours/pgbench 0.42` for a throughput (higher is better), or nothing without a reference.
fn throughput_ratio(pgbench: Option<crate::bench_api::Pgbench>, ours: f64) -> String {
    pgbench.map(|p| format!("  ours/pgbench {:.2} (throughput)", ours / p.tps)).unwrap_or_default()
}

/// `  ours/pgbench 12.3` for a latency against pgbench's average insert latency (lower is better).
fn latency_ratio(pgbench: Option<crate::bench_api::Pgbench>, ours_ms: f64) -> String {
    pgbench.map(|p| format!("  ours/pgbench {:.1} (latency)", ours_ms / p.latency_ms)).unwrap_or_default()
}

/// A suite's JSON with the pgbench reference and the ratio added (both null without pgbench).
fn with_reference(
    mut value: serde_json::Value,
    pgbench: Option<crate::bench_api::Pgbench>,
    ratio: impl Fn(&crate::bench_api::Pgbench) -> f64,
) -> serde_json::Value {
    if let Some(object) = value.as_object_mut() {
        object.insert("pgbench".into(), serde_json::to_value(pgbench).unwrap_or_default());
        object.insert("ratio".into(), pgbench.as_ref().map(ratio).into());
    }
    value
}

/// The median run by `key` (of a non-empty list of runs).
fn median_by<T>(mut results: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    results.sort_by(|a, b| key(a).total_cmp(&key(b)));
    results.swap_remove(results.len() / 2)
}

pub fn init_logging(format: &LogFormat, quiet: bool, otlp: Option<(&str, &str)>) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    // librdkafka reports every failed connection attempt as an error; the relay and the workers report broker
    // outages themselves, once per state change.
    let default = if quiet { "warn,rdkafka=off,librdkafka=off" } else { "info,sqlx=warn,rdkafka=off,librdkafka=off" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    // One filter (RUST_LOG) for both: the spans exported are those it enables (`info` by default).
    let otlp = match otlp {
        Some((endpoint, service)) => Some(crate::otel::OtlpLayer::start(endpoint, service)?),
        None => None,
    };
    tracing_subscriber::registry().with(filter).with(fmt).with(otlp).try_init()?;
    Ok(())
}

/// The pool size every command's `connect_and_migrate` uses (set once from `--db-connections`).
static DB_CONNECTIONS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

pub async fn run(args: Cli) -> anyhow::Result<()> {
    let _ = DB_CONNECTIONS.set(args.db_connections);
    match args.command {
        Command::Demo(demo) => crate::demo::run(&args.database_url, &args.kafka, &args.projections, demo).await,
        Command::Serve(serve) => crate::serve::run(&args.database_url, &args.kafka, &args.projections, serve).await,
        Command::Token { subject, role, ttl_hours, jwt_secret } => {
            let role: ledger_api::auth::Role = role.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            anyhow::ensure!((1..=24 * 366).contains(&ttl_hours), "ttl-hours must be 1 to 8784");
            ledger::domain::values::Owner::new(subject.clone())?;
            let keys = ledger_api::auth::TokenKeys::new(jwt_secret.into_bytes()).map_err(|e| anyhow::anyhow!(e))?;
            println!("{}", keys.issue(&subject, role, chrono::Duration::hours(ttl_hours), chrono::Utc::now()));
            Ok(())
        }
        Command::Schema => {
            print!("{}", ledger_api::graphql::sdl());
            Ok(())
        }
        Command::Relay => {
            let kafka = args.kafka.required()?;
            let pool = connect_and_migrate(&args.database_url).await?;
            let relay = ledger::relay::Relay::new(pool, kafka, ledger::relay::RelayConfig::default());
            relay.run(shutdown_on_signal()).await?;
            Ok(())
        }
        Command::Migrate => {
            connect_and_migrate(&args.database_url).await?;
            println!("database {} is migrated", redact(&args.database_url));
            Ok(())
        }
        Command::Bench { suite: BenchSuite::Commands { clients, seconds, runs, hot, with_system, json } } => {
            let system = if with_system { Some(args.kafka.required()?) } else { None };
            let options = crate::bench_api::CommandsOptions { hot, system };
            let mut medians = Vec::new();
            for count in clients {
                let mut results = Vec::new();
                for _ in 0..runs.max(1) {
                    let duration = std::time::Duration::from_secs(seconds);
                    let result = crate::bench_api::commands(&args.database_url, count, duration, &options).await?;
                    crate::bench_api::print(&result);
                    results.push(result);
                }
                let median = median_by(results, |r| r.commands_per_second);
                print!("median: ");
                crate::bench_api::print(&median);
                medians.push(median);
            }
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&medians)?)?;
            }
            Ok(())
        }
        Command::Bench { suite: BenchSuite::Fanout { subscribers, ticks, rate, runs, json } } => {
            let kafka = args.kafka.required()?;
            let single = crate::bench_api::reference(&args.database_url, 1, 10, None).await;
            let mut results = Vec::new();
            for count in subscribers {
                let mut of_count = Vec::new();
                for _ in 0..runs.max(1) {
                    let result =
                        crate::bench_api::fanout(&args.database_url, kafka.clone(), count, ticks, rate).await?;
                    crate::bench_api::print_fanout(&result);
                    of_count.push(result);
                }
                let every_delivery = of_count.iter().all(|r| r.deliveries == r.expected_deliveries);
                of_count.sort_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
                let median = &of_count[of_count.len() / 2];
                println!(
                    "median: subscribers {count:>6}  p99 {:>7.2} ms  every delivery made in every run: {}{}",
                    median.p99_ms,
                    if every_delivery { "yes" } else { "NO" },
                    latency_ratio(single, median.p99_ms)
                );
                results.push(with_reference(serde_json::to_value(median)?, single, |p| median.p99_ms / p.latency_ms));
            }
            write_json(json, &results)
        }
        Command::Bench { suite: BenchSuite::Deposits { tasks, seconds, runs, keyed, json } } => {
            let mut medians = Vec::new();
            for task_count in tasks {
                let pgbench = crate::bench_api::reference(&args.database_url, task_count, seconds, None).await;
                let mut results = Vec::new();
                for _ in 0..runs.max(1) {
                    let result = crate::bench::deposits(
                        &args.database_url,
                        task_count,
                        std::time::Duration::from_secs(seconds),
                        keyed,
                    )
                    .await?;
                    crate::bench::print(&result);
                    results.push(result);
                }
                let median = median_by(results, |r| r.commands_per_second);
                print!("median: ");
                crate::bench::print(&median);
                println!("{}", throughput_ratio(pgbench, median.commands_per_second));
                medians.push(with_reference(serde_json::to_value(&median)?, pgbench, |p| {
                    median.commands_per_second / p.tps
                }));
            }
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&medians)?)?;
            }
            Ok(())
        }
        Command::Bench { suite: BenchSuite::Intake { clients, batch_size, seconds, runs, json } } => {
            let mut medians = Vec::new();
            for count in clients {
                let pgbench = crate::bench_api::reference(&args.database_url, count, seconds, None).await;
                let mut results = Vec::new();
                for _ in 0..runs.max(1) {
                    let duration = std::time::Duration::from_secs(seconds);
                    let result =
                        crate::bench_intake::intake(&args.database_url, count, batch_size, duration, pgbench).await?;
                    crate::bench_intake::print(&result);
                    results.push(result);
                }
                let median = median_by(results, |r| r.events_per_second);
                print!("median: ");
                crate::bench_intake::print(&median);
                medians.push(median);
            }
            write_json(json, &medians)
        }
        Command::Bench { suite: BenchSuite::Relay { events, batch_sizes, runs, linger_ms, rate, seconds, json } } => {
            let kafka = args.kafka.required()?;
            let single = crate::bench_api::reference(&args.database_url, 1, 10, None).await;
            let mut report = Vec::new();
            for batch_size in batch_sizes {
                let mut results = Vec::new();
                for _ in 0..runs.max(1) {
                    let result =
                        crate::bench::relay_throughput(&args.database_url, &kafka, events, batch_size, linger_ms)
                            .await?;
                    println!(
                        "relay  batch {:>5}  {:>8} events in {:>6.2} s  {:>9.0} events/s",
                        result.batch_size, result.events, result.seconds, result.events_per_second
                    );
                    results.push(result);
                }
                let median = median_by(results, |r| r.events_per_second);
                println!(
                    "median: batch {:>5}  {:>9.0} events/s{}",
                    median.batch_size,
                    median.events_per_second,
                    throughput_ratio(single, median.events_per_second)
                );
                report
                    .push(with_reference(serde_json::to_value(&median)?, single, |p| median.events_per_second / p.tps));
            }
            let latency = crate::bench::relay_latency(&args.database_url, &kafka, rate, seconds).await?;
            let paced = crate::bench_api::reference(&args.database_url, 1, 10, Some(rate)).await;
            println!(
                "commit → broker ack at {} events/s: {} events, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms{}",
                latency.rate_per_second,
                latency.events,
                latency.p50_ms,
                latency.p99_ms,
                latency.p999_ms,
                latency_ratio(paced, latency.p99_ms)
            );
            report.push(with_reference(serde_json::to_value(&latency)?, paced, |p| latency.p99_ms / p.latency_ms));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
            }
            Ok(())
        }
        Command::Worker { projection } => {
            let projections = crate::run::select(&projection, &args.projections.settings()?)?;
            let kafka = args.kafka.required()?;
            let pool = connect_and_migrate(&args.database_url).await?;
            let config = ledger::projections::worker::WorkerConfig::default();
            crate::run::workers(pool, kafka, projections, config, shutdown_on_signal()).await
        }
        Command::Replay { projection, all, verify } => {
            let name = if all { "all".to_string() } else { projection.unwrap_or_default() };
            let projections = crate::run::select(&name, &args.projections.settings()?)?;
            let pool = connect_and_migrate(&args.database_url).await?;
            crate::run::replay(&pool, projections, verify).await
        }
        Command::Simulate { seed, interval_ms, symbols } => {
            let kafka = args.kafka.required()?;
            let symbols = symbols.map(|list| list.0);
            crate::run::simulate(&kafka, seed, interval_ms, symbols, shutdown_on_signal()).await
        }
        Command::Executor { slippage_bps, fee_bps, fee_min, participation, day_end_utc } => {
            let day_end_utc = chrono::NaiveTime::parse_from_str(&day_end_utc, "%H:%M")
                .map_err(|_| anyhow::anyhow!("--day-end-utc must be HH:MM, not {day_end_utc:?}"))?;
            let config = ledger::execution::PaperConfig { slippage_bps, fee_bps, fee_min, participation, day_end_utc };
            let kafka = args.kafka.required()?;
            let pool = connect_and_migrate(&args.database_url).await?;
            let commands = std::sync::Arc::new(ledger::commands::CommandService::new(pool, Default::default()));
            let executor = ledger::execution::PaperExecutor::new(commands, config).map_err(|e| anyhow::anyhow!(e))?;
            let cancel = shutdown_on_signal();
            let (sender, ticks) = tokio::sync::mpsc::channel(ledger::execution::TICK_QUEUE);
            let consumer = ledger::execution::spawn_tick_consumer(&kafka, sender, cancel.clone())?;
            executor.run(ticks, cancel).await.context("paper executor")?;
            consumer.await.context("tick consumer")?;
            Ok(())
        }
        Command::Chaos(chaos) => crate::chaos::run(&args.database_url, chaos).await,
        Command::Feed { csv, speed } => {
            let kafka = args.kafka.required()?;
            crate::run::feed(&kafka, &csv, speed, shutdown_on_signal()).await
        }
        Command::Bench { suite: BenchSuite::Replay { events, runs, json } } => {
            let mut results = crate::bench::replay(&args.database_url, events, runs).await?;
            results.sort_by(|a, b| a.events_per_second.total_cmp(&b.events_per_second));
            let median = &results[results.len() / 2];
            let single = crate::bench_api::reference(&args.database_url, 1, 10, None).await;
            println!(
                "median: {:.0} events/s{}",
                median.events_per_second,
                throughput_ratio(single, median.events_per_second)
            );
            let report = serde_json::json!({ "runs": results, "median_events_per_second": median.events_per_second });
            write_json(json, &with_reference(report, single, |p| median.events_per_second / p.tps))
        }
        Command::Bench { suite: BenchSuite::E2e { rate, seconds, json } } => {
            let kafka = args.kafka.required()?;
            let result = crate::bench::end_to_end(&args.database_url, &kafka, rate, seconds).await?;
            let paced = crate::bench_api::reference(&args.database_url, 1, 10, Some(rate)).await;
            println!(
                "commit → read model at {} commands/s ({:.0} achieved): {} events, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms{}",
                result.rate_per_second,
                result.achieved_rate_per_second,
                result.commands,
                result.p50_ms,
                result.p99_ms,
                result.p999_ms,
                latency_ratio(paced, result.p99_ms)
            );
            println!(
                "commit → subscriber at {} commands/s: {} events, p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms{}",
                result.rate_per_second,
                result.subscriber_events,
                result.subscriber_p50_ms,
                result.subscriber_p99_ms,
                result.subscriber_p999_ms,
                latency_ratio(paced, result.subscriber_p99_ms)
            );
            write_json(json, &with_reference(serde_json::to_value(&result)?, paced, |p| result.p99_ms / p.latency_ms))
        }
        Command::Bench { suite: BenchSuite::Valuation { portfolios, ticks, json } } => {
            let kafka = args.kafka.required()?;
            let result = crate::bench::valuation(&args.database_url, &kafka, portfolios, ticks).await?;
            let single = crate::bench_api::reference(&args.database_url, 1, 10, None).await;
            println!(
                "tick → valuation with {} holders: p50 {:.1} ms, p99 {:.1} ms over {} ticks; valuing all {:.1} ms{}",
                result.portfolios,
                result.p50_ms,
                result.p99_ms,
                result.ticks,
                result.full_read_ms,
                latency_ratio(single, result.p99_ms)
            );
            write_json(json, &with_reference(serde_json::to_value(&result)?, single, |p| result.p99_ms / p.latency_ms))
        }
        Command::Seal => crate::audit::seal(&args.database_url).await,
        Command::Export(export) => crate::audit::export(&args.database_url, export).await,
        Command::Verify(verify) => crate::audit::verify(&args.database_url, verify).await,
        Command::Bench { suite: BenchSuite::Export { events, formats, json } } => {
            let results = crate::bench_export::run(&args.database_url, events, &formats).await?;
            let single = crate::bench_api::reference(&args.database_url, 1, 10, None).await;
            let mut report = Vec::new();
            for result in &results {
                println!("{:<22} {}", result.operation, throughput_ratio(single, result.events_per_second).trim());
                report
                    .push(with_reference(serde_json::to_value(result)?, single, |p| result.events_per_second / p.tps));
            }
            write_json(json, &report)
        }
        Command::ProcessFailures { command } => crate::operations::process_failures(&args.database_url, command).await,
        Command::Check => crate::operations::check(&args.database_url).await,
        Command::ProcessManager => {
            let pool = connect_and_migrate(&args.database_url).await?;
            let commands = Arc::new(CommandService::new(pool, CommandConfig::default()));
            let cancel = shutdown_on_signal();
            ProcessManager::new(commands, ProcessConfig::default()).run(cancel).await?;
            Ok(())
        }
    }
}

fn write_json(path: Option<std::path::PathBuf>, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(&path, serde_json::to_vec_pretty(value)?)?;
    }
    Ok(())
}

/// Connects (creating the database if needed) and migrates, with an error that says what to do.
pub async fn connect_and_migrate(url: &str) -> anyhow::Result<PgPool> {
    let unreachable = || {
        format!(
            "cannot reach PostgreSQL at {} — start it (e.g. `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
             or `docker compose up -d postgres`) or set DATABASE_URL",
            redact(url)
        )
    };
    ledger::db::ensure_database(url).await.with_context(unreachable)?;
    let connections = DB_CONNECTIONS.get().copied().unwrap_or(ledger::db::POOL_CONNECTIONS_MAX);
    let pool = ledger::db::connect(url, connections).await.with_context(unreachable)?;
    ledger::db::migrate(&pool).await.context("applying migrations")?;
    Ok(pool)
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
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

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://postgres@127.0.0.1/db"), "postgres://postgres@127.0.0.1/db");
    }
}
