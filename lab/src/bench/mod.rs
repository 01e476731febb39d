//! `ledger-lab bench SUITE`: throughput and latency measurements anyone can repeat (see docs/benchmarks.md).
//! Every suite measures PostgreSQL's own `pgbench` in the same run and reports its figure as a ratio to it.
//!
//! | module | suites |
//! |--------|--------|
//! | `library` | `deposits`, `relay`, `replay`, `e2e`, `valuation`: the library driven directly |
//! | `api` | `commands`, `fanout`: the GraphQL API over HTTP and WebSocket |
//! | `intake` | `intake`: batched `cashBatch` mutations |
//! | `export` | `export`: the audit trail's seal, export and verify |

pub mod api;
pub mod export;
pub mod intake;
pub mod library;
pub mod process;

use clap::Subcommand;
use ledger::kafka::KafkaConfig;

use crate::pgbench::{latency_ratio, median_by, reference, repeat, throughput_ratio, with_reference, write_json};

#[derive(Debug, Subcommand)]
pub enum BenchSuite {
    /// Seal, export (each format) and verify a synthetic log; events/s and peak RSS of each export.
    Export(ExportArgs),
    /// GraphQL deposit mutations over HTTP from concurrent clients, with pgbench's single-row insert for reference.
    Commands(CommandsArgs),
    /// N subscribers of priceTicks on one API instance: tick → subscriber delay. Needs KAFKA_BROKERS.
    Fanout(FanoutArgs),
    /// DepositCash in a loop from concurrent tasks, each on its own portfolio.
    Deposits(DepositsArgs),
    /// Rebuild speed of a read model, or of all together, from a synthetic log (scratch database `<name>_bench`).
    Replay(ReplayArgs),
    /// Commit → read-model delay at a steady command rate (relay and positions worker). Needs KAFKA_BROKERS.
    E2e(E2eArgs),
    /// Tick → valuation delay with many portfolios holding the symbol. Needs KAFKA_BROKERS.
    Valuation(ValuationArgs),
    /// Batched intake: `cashBatch` mutations of many deposits over HTTP, one transaction each; events/s.
    Intake(IntakeArgs),
    /// Relay throughput (pre-filled log → fresh topic) and commit → acknowledgement delay. Needs KAFKA_BROKERS.
    Relay(RelayArgs),
    /// The process manager working through a backlog: orders reserved and accepted/s, fills booked/s.
    Process(ProcessArgs),
}

/// Runs one suite against `database_url` (and the broker of `kafka`, for the suites that need one).
pub async fn run(database_url: &str, kafka: Option<KafkaConfig>, suite: BenchSuite) -> anyhow::Result<()> {
    let kafka = kafka.as_ref();
    match suite {
        BenchSuite::Export(args) => export(database_url, args).await,
        BenchSuite::Commands(args) => commands(database_url, kafka, args).await,
        BenchSuite::Fanout(args) => fanout(database_url, kafka, args).await,
        BenchSuite::Deposits(args) => deposits(database_url, args).await,
        BenchSuite::Replay(args) => replay(database_url, args).await,
        BenchSuite::E2e(args) => e2e(database_url, kafka, args).await,
        BenchSuite::Valuation(args) => valuation(database_url, kafka, args).await,
        BenchSuite::Intake(args) => intake(database_url, args).await,
        BenchSuite::Relay(args) => relay(database_url, kafka, args).await,
        BenchSuite::Process(args) => process(database_url, args).await,
    }
}

/// The broker, or an error saying how to set it.
fn required(kafka: Option<&KafkaConfig>) -> anyhow::Result<KafkaConfig> {
    kafka
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("set KAFKA_BROKERS (or --kafka-brokers) to the Kafka bootstrap servers"))
}

/// Where a suite writes its results besides the terminal.
#[derive(Debug, clap::Args)]
pub struct Output {
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// How long and how often a timed suite runs each of its settings (client or task count).
#[derive(Debug, clap::Args)]
pub struct Timed {
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Runs per setting; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// Options of `bench export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Export formats to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "jsonl,csv,parquet", value_parser = |s: &str| s.parse::<ledger::audit::ExportFormat>())]
    pub formats: Vec<ledger::audit::ExportFormat>,
    #[command(flatten)]
    pub output: Output,
}

async fn export(database_url: &str, args: ExportArgs) -> anyhow::Result<()> {
    let ExportArgs { events, formats, output: Output { json } } = args;
    let results = export::run(database_url, events, &formats).await?;
    let single = reference(database_url, 1, 10, None).await;
    let mut report = Vec::new();
    for result in &results {
        println!("{:<22} {}", result.operation, throughput_ratio(single, result.events_per_second).trim());
        report.push(with_reference(serde_json::to_value(result)?, single, |p| result.events_per_second / p.tps));
    }
    write_json(json, &report)
}

/// Options of `bench commands`.
#[derive(Debug, clap::Args)]
pub struct CommandsArgs {
    /// Concurrent clients (comma-separated for several runs, e.g. 1,32).
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub clients: Vec<usize>,
    #[command(flatten)]
    pub timed: Timed,
    /// All clients deposit into one portfolio (a hot aggregate) instead of one portfolio each.
    #[arg(long)]
    pub hot: bool,
    /// Run the relay, the process manager and the projection workers beside the API, as deployed (needs
    /// KAFKA_BROKERS); waits for them to reach the log's head first, and reports how far the relay was behind.
    #[arg(long)]
    pub with_system: bool,
    #[command(flatten)]
    pub output: Output,
}

async fn commands(database_url: &str, kafka: Option<&KafkaConfig>, args: CommandsArgs) -> anyhow::Result<()> {
    let CommandsArgs { clients, timed: Timed { seconds, runs }, hot, with_system, output: Output { json } } = args;
    let system = if with_system { Some(required(kafka)?) } else { None };
    let options = api::CommandsOptions { hot, system };
    let mut medians = Vec::new();
    let duration = std::time::Duration::from_secs(seconds);
    for count in clients {
        let results = repeat(runs, || api::commands(database_url, count, duration, &options), api::print).await?;
        let median = median_by(results, |r| r.commands_per_second);
        print!("median: ");
        api::print(&median);
        medians.push(median);
    }
    write_json(json, &medians)
}

/// Options of `bench fanout`.
#[derive(Debug, clap::Args)]
pub struct FanoutArgs {
    /// Subscribers (comma-separated for several runs).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub subscribers: Vec<usize>,
    /// Ticks published per run.
    #[arg(long, default_value_t = 50)]
    pub ticks: usize,
    /// Ticks per second.
    #[arg(long, default_value_t = 10)]
    pub rate: u32,
    /// Runs per subscriber count; the run with the median p99 is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[command(flatten)]
    pub output: Output,
}

async fn fanout(database_url: &str, kafka: Option<&KafkaConfig>, args: FanoutArgs) -> anyhow::Result<()> {
    let FanoutArgs { subscribers, ticks, rate, runs, output: Output { json } } = args;
    let kafka = required(kafka)?;
    let single = reference(database_url, 1, 10, None).await;
    let mut results = Vec::new();
    for count in subscribers {
        let mut of_count =
            repeat(runs, || api::fanout(database_url, kafka.clone(), count, ticks, rate), api::print_fanout).await?;
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

/// Options of `bench deposits`.
#[derive(Debug, clap::Args)]
pub struct DepositsArgs {
    /// Concurrent tasks (comma-separated for several runs, e.g. 1,16).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub tasks: Vec<usize>,
    #[command(flatten)]
    pub timed: Timed,
    /// Send every command with an idempotency key.
    #[arg(long)]
    pub keyed: bool,
    #[command(flatten)]
    pub output: Output,
}

async fn deposits(database_url: &str, args: DepositsArgs) -> anyhow::Result<()> {
    let DepositsArgs { tasks, timed: Timed { seconds, runs }, keyed, output: Output { json } } = args;
    let mut medians = Vec::new();
    for task_count in tasks {
        let pgbench = reference(database_url, task_count, seconds, None).await;
        let duration = std::time::Duration::from_secs(seconds);
        let results =
            repeat(runs, || library::deposits(database_url, task_count, duration, keyed), library::print).await?;
        let median = median_by(results, |r| r.commands_per_second);
        print!("median: ");
        library::print(&median);
        println!("{}", throughput_ratio(pgbench, median.commands_per_second));
        medians.push(with_reference(serde_json::to_value(&median)?, pgbench, |p| median.commands_per_second / p.tps));
    }
    write_json(json, &medians)
}

/// Options of `bench replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The read model rebuilt, or `all` (every projection together, from one read of the log).
    #[arg(long, default_value = "positions")]
    pub projection: String,
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[command(flatten)]
    pub output: Output,
}

async fn replay(database_url: &str, args: ReplayArgs) -> anyhow::Result<()> {
    let ReplayArgs { projection, events, runs, output: Output { json } } = args;
    let mut results = library::replay(database_url, &projection, events, runs).await?;
    results.sort_by(|a, b| a.events_per_second.total_cmp(&b.events_per_second));
    let median = &results[results.len() / 2];
    let single = reference(database_url, 1, 10, None).await;
    println!("median: {:.0} events/s{}", median.events_per_second, throughput_ratio(single, median.events_per_second));
    let report = serde_json::json!({ "runs": results, "median_events_per_second": median.events_per_second });
    write_json(json, &with_reference(report, single, |p| median.events_per_second / p.tps))
}

/// Options of `bench e2e`.
#[derive(Debug, clap::Args)]
pub struct E2eArgs {
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    #[command(flatten)]
    pub output: Output,
}

async fn e2e(database_url: &str, kafka: Option<&KafkaConfig>, args: E2eArgs) -> anyhow::Result<()> {
    let E2eArgs { rate, seconds, output: Output { json } } = args;
    let kafka = required(kafka)?;
    let result = library::end_to_end(database_url, &kafka, rate, seconds).await?;
    let paced = reference(database_url, 1, 10, Some(rate)).await;
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

/// Options of `bench valuation`.
#[derive(Debug, clap::Args)]
pub struct ValuationArgs {
    #[arg(long, default_value_t = 10_000)]
    pub portfolios: usize,
    #[arg(long, default_value_t = 200)]
    pub ticks: usize,
    #[command(flatten)]
    pub output: Output,
}

async fn valuation(database_url: &str, kafka: Option<&KafkaConfig>, args: ValuationArgs) -> anyhow::Result<()> {
    let ValuationArgs { portfolios, ticks, output: Output { json } } = args;
    let kafka = required(kafka)?;
    let result = library::valuation(database_url, &kafka, portfolios, ticks).await?;
    let single = reference(database_url, 1, 10, None).await;
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

/// Options of `bench intake`.
#[derive(Debug, clap::Args)]
pub struct IntakeArgs {
    /// Concurrent clients (comma-separated for several runs), each on its own portfolios.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub clients: Vec<usize>,
    /// Deposits per batch (at most 1000).
    #[arg(long, default_value_t = 1_000)]
    pub batch_size: usize,
    #[command(flatten)]
    pub timed: Timed,
    #[command(flatten)]
    pub output: Output,
}

async fn intake(database_url: &str, args: IntakeArgs) -> anyhow::Result<()> {
    let IntakeArgs { clients, batch_size, timed: Timed { seconds, runs }, output: Output { json } } = args;
    let mut medians = Vec::new();
    let duration = std::time::Duration::from_secs(seconds);
    for count in clients {
        let pgbench = reference(database_url, count, seconds, None).await;
        let run = || intake::intake(database_url, count, batch_size, duration, pgbench);
        let results = repeat(runs, run, intake::print).await?;
        let median = median_by(results, |r| r.events_per_second);
        print!("median: ");
        intake::print(&median);
        medians.push(median);
    }
    write_json(json, &medians)
}

/// Options of `bench relay`.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Events in the pre-filled log.
    #[arg(long, default_value_t = 200_000)]
    pub events: i64,
    /// Relay batch sizes to try (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub batch_sizes: Vec<usize>,
    /// Runs per batch size; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Producer linger (librdkafka `linger.ms`) for the throughput runs.
    #[arg(long, default_value_t = ledger::relay::RelayConfig::default().linger_ms)]
    pub linger_ms: u32,
    /// Events per second of the latency run (one event per transaction).
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    #[command(flatten)]
    pub output: Output,
}

async fn relay(database_url: &str, kafka: Option<&KafkaConfig>, args: RelayArgs) -> anyhow::Result<()> {
    let RelayArgs { events, batch_sizes, runs, linger_ms, rate, seconds, output: Output { json } } = args;
    let kafka = required(kafka)?;
    let single = reference(database_url, 1, 10, None).await;
    let mut report = Vec::new();
    for batch_size in batch_sizes {
        let print = |result: &library::RelayThroughput| {
            println!(
                "relay  batch {:>5}  {:>8} events in {:>6.2} s  {:>9.0} events/s",
                result.batch_size, result.events, result.seconds, result.events_per_second
            )
        };
        let run = || library::relay_throughput(database_url, &kafka, events, batch_size, linger_ms);
        let results = repeat(runs, run, print).await?;
        let median = median_by(results, |r| r.events_per_second);
        println!(
            "median: batch {:>5}  {:>9.0} events/s{}",
            median.batch_size,
            median.events_per_second,
            throughput_ratio(single, median.events_per_second)
        );
        report.push(with_reference(serde_json::to_value(&median)?, single, |p| median.events_per_second / p.tps));
    }
    let latency = library::relay_latency(database_url, &kafka, rate, seconds).await?;
    let paced = reference(database_url, 1, 10, Some(rate)).await;
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

/// Options of `bench process`.
#[derive(Debug, clap::Args)]
pub struct ProcessArgs {
    /// Portfolios the orders are spread over.
    #[arg(long, default_value_t = 100)]
    pub portfolios: usize,
    /// Limit buys placed (each reserved and accepted by the process manager).
    #[arg(long, default_value_t = 20_000)]
    pub orders: usize,
    /// Executions per order (each booked by the process manager).
    #[arg(long, default_value_t = 2)]
    pub fills: usize,
    /// Runs; the median of each rate is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[command(flatten)]
    pub output: Output,
}

async fn process(database_url: &str, args: ProcessArgs) -> anyhow::Result<()> {
    let ProcessArgs { portfolios, orders, fills, runs, output: Output { json } } = args;
    let results = repeat(runs, || process::run(database_url, portfolios, orders, fills), process::print).await?;
    let median = |key: fn(&process::ProcessResult) -> f64| {
        let mut values: Vec<f64> = results.iter().map(key).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let (placements, fills_booked) = (median(|r| r.placements_per_second), median(|r| r.fills_per_second));
    let single = reference(database_url, 1, 10, None).await;
    println!("median: {placements:.0} orders reserved and accepted/s{}", throughput_ratio(single, placements));
    println!("median: {fills_booked:.0} fills booked/s{}", throughput_ratio(single, fills_booked));
    let report = serde_json::json!({
        "runs": results,
        "median_placements_per_second": placements,
        "median_fills_per_second": fills_booked,
    });
    write_json(json, &with_reference(report, single, |p| fills_booked / p.tps))
}
