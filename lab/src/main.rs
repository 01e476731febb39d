//! `ledger-lab`: the ledger's lab, a binary of its own that is never shipped. It measures the ledger
//! (`ledger-lab bench SUITE`, each suite beside PostgreSQL's own `pgbench`) and tortures it
//! (`ledger-lab chaos`: processes killed, the broker and PostgreSQL restarted under load, then proof that
//! nothing was lost or doubled). Whatever runs as a separate process is the `ledger` binary (see
//! `support::ledger_binary`), exactly as deployed.
//!
//! | module | what |
//! |--------|------|
//! | `bench` | the suites and their options |
//! | `chaos` | the chaos test |
//! | `pgbench` | the reference measurement and the ratios every suite prints |
//! | `support` | scratch databases, synthetic logs, portfolios, percentiles, waiting for the system to settle |

mod bench;
mod chaos;
mod pgbench;
mod support;

use clap::{Parser, Subcommand};

/// The same allocator as the `ledger` binary, so that suites running the API in this process measure what the
/// deployed binary does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "ledger-lab", version, about = "Benchmarks and the chaos test of the ledger")]
struct Cli {
    /// PostgreSQL URL (suites make scratch databases beside it; the chaos test makes its own).
    #[arg(long, env = "DATABASE_URL", default_value = ledger::db::DATABASE_URL_DEFAULT, global = true)]
    database_url: String,
    /// The broker and topic settings, as the `ledger` binary takes them (the suites that need a broker; most
    /// make fresh topics of their own, `bench commands --with-system` uses these).
    #[command(flatten)]
    kafka: ledger_api::options::KafkaArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure throughput and latency (see docs/benchmarks.md).
    Bench {
        #[command(subcommand)]
        suite: bench::BenchSuite,
    },
    /// Chaos test: load through two API instances while processes are killed and the broker and PostgreSQL
    /// restart; then check that nothing was lost or doubled (see `scripts/chaos`).
    Chaos(chaos::ChaosArgs),
}

fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,rdkafka=off,librdkafka=off"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let kafka = args.kafka.brokers.as_deref().map(|brokers| args.kafka.config(brokers));
    let outcome = runtime.block_on(async {
        match args.command {
            Command::Bench { suite } => bench::run(&args.database_url, kafka, suite).await,
            Command::Chaos(chaos) => chaos::run(&args.database_url, chaos).await,
        }
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
