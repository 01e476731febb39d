//! The command line: global options, one subcommand per role or operation, and the dispatch to the module
//! that does each (`roles`, `operations`, `audit`, `serve`, `demo`). The lab's benchmarks and chaos test are
//! another binary, `ledger-lab` (`lab/`).

use clap::{Parser, Subcommand};

use ledger_api::options::KafkaArgs;

use crate::shared::ProjectionArgs;
use crate::telemetry::LogFormat;
use crate::{audit, demo, operations, roles, serve, statement};

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole system live (broker, relay, workers, API, dashboard, simulator, paper executor, bots)
    /// until Ctrl-C; prints the dashboard URL and a token.
    Demo(demo::DemoArgs),
    /// Run the GraphQL API server (optionally with the relay, process manager and workers in-process).
    Serve(serve::ServeArgs),
    /// Issue a bearer token for the API (signed with LEDGER_JWT_SECRET).
    Token(operations::TokenArgs),
    /// Print the GraphQL schema (SDL), as committed in api/schema.graphql.
    Schema,
    /// Print the OpenAPI 3 document of the REST market data, as committed in api/openapi.json.
    Openapi,
    /// Create the database if missing and apply all migrations, then exit.
    Migrate,
    /// Run the process manager (Order ↔ Portfolio coordination) until interrupted (one active per database;
    /// others stand by).
    ProcessManager,
    /// Messages a projection could not apply: list, show, replay (once the cause is fixed) or discard them.
    DeadLetters {
        #[command(subcommand)]
        command: operations::DeadLettersCommand,
    },
    /// Steps the process manager could not apply: list, retry (once the cause is fixed) or dismiss them.
    ProcessFailures {
        #[command(subcommand)]
        command: operations::ProcessFailuresCommand,
    },
    /// Import a broker's statement (CSV trades and cash movements) into a portfolio; each row once, however
    /// often the file is imported. Lists the lines not applied (and exits 1 if any).
    Import(statement::ImportArgs),
    /// Check that every order agrees with its portfolio (fills booked, reservations released); exit 1 if not.
    Check,
    /// Mirror the event log to Kafka until interrupted (one active relay per topic; others stand by).
    Relay,
    /// Deliver alert webhooks until SIGINT/SIGTERM (start several to share the work).
    Webhooks(crate::shared::WebhookArgs),
    /// Run projection workers (one consumer group each) until interrupted.
    Worker(roles::WorkerArgs),
    /// Rebuild read models from the log into shadow tables and swap them in (or, with --verify, compare).
    Replay(roles::ReplayArgs),
    /// Publish simulated prices (seeded geometric Brownian motion) to the prices topic until interrupted.
    Simulate(roles::SimulateArgs),
    /// Run the paper-trading executor: fill accepted orders against the prices topic until interrupted.
    Executor(roles::ExecutorArgs),
    /// Publish the ticks of a CSV file (ts,symbol,price[,volume]) to the prices topic.
    Feed(roles::FeedArgs),
    /// Seal the event log into the audit hash chain until interrupted (one active sealer; others stand by).
    Seal,
    /// Export the sealed audit trail (JSON Lines, CSV or Parquet) with a manifest; seals up to the head first.
    Export(audit::ExportArgs),
    /// Verify an export directory, or with --db the log against the sealed chain; exit code 1 on any change.
    Verify(audit::VerifyArgs),
}

/// Runs the subcommand.
pub async fn run(args: Cli) -> anyhow::Result<()> {
    crate::shared::set_db_connections(args.db_connections);
    let (url, kafka, projections) = (args.database_url.as_str(), &args.kafka, &args.projections);
    match args.command {
        Command::Demo(demo) => demo::run(url, kafka, projections, demo).await,
        Command::Serve(serve) => serve::run(url, kafka, projections, serve).await,
        Command::Token(token) => operations::token(token),
        Command::Schema => {
            operations::schema();
            Ok(())
        }
        Command::Openapi => {
            operations::openapi();
            Ok(())
        }
        Command::Migrate => operations::migrate(url).await,
        Command::ProcessManager => roles::process_manager(url).await,
        Command::ProcessFailures { command } => operations::process_failures(url, command).await,
        Command::DeadLetters { command } => operations::dead_letters(url, projections, command).await,
        Command::Check => operations::check(url).await,
        Command::Import(import) => statement::run(url, import).await,
        Command::Relay => roles::relay(url, kafka).await,
        Command::Webhooks(args) => roles::webhooks(url, args).await,
        Command::Worker(worker) => roles::worker(url, kafka, projections, worker).await,
        Command::Replay(replay) => roles::replay(url, projections, replay).await,
        Command::Simulate(simulate) => roles::simulate(kafka, simulate).await,
        Command::Executor(executor) => roles::executor(url, kafka, executor).await,
        Command::Feed(feed) => roles::feed(kafka, feed).await,
        Command::Seal => audit::seal(url).await,
        Command::Export(export) => audit::export(url, export).await,
        Command::Verify(verify) => audit::verify(url, verify).await,
    }
}
