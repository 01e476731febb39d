//! The ledger's roles, one subcommand each: the relay, the process manager, projection workers and their
//! rebuilds (`replay`), the paper executor, and the market-data sources (`simulate`, `feed`). Each runs until
//! interrupted (Ctrl-C or SIGTERM), except `replay` and `feed`, which end when done.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ledger::commands::{CommandConfig, CommandService};
use ledger::kafka::KafkaConfig;
use ledger::market::{read_csv, Simulator, SimulatorConfig, SymbolSpec, TickPublisher};
use ledger::process::{ProcessConfig, ProcessManager};
use ledger::projections::rebuild::{rebuild_together, RebuildMode, ReplayLimits};
use ledger::projections::worker::WorkerConfig;
use ledger::projections::{all, by_name, Projection, ProjectionSettings, NAMES};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use ledger_api::options::KafkaArgs;

use crate::shared::{connect_and_migrate, progress_bar, shutdown_on_signal, ProjectionArgs, SymbolList};

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// orders, positions, prices, analytics, alerts, or all.
    projection: String,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The projection to rebuild (orders, positions, prices, analytics, alerts).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    projection: Option<String>,
    /// Rebuild every projection.
    #[arg(long)]
    all: bool,
    /// Compare a rebuild with the live tables instead of swapping; exit code 1 on any difference.
    #[arg(long)]
    verify: bool,
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Milliseconds between ticks of each symbol.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    /// Symbols and their starting prices, e.g. `AAPL:190,MSFT:420` (at most 100; default: the demo's five).
    #[arg(long, env = "LEDGER_SYMBOLS")]
    symbols: Option<SymbolList>,
}

#[derive(Debug, clap::Args)]
pub struct ExecutorArgs {
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
}

#[derive(Debug, clap::Args)]
pub struct FeedArgs {
    #[arg(long)]
    csv: std::path::PathBuf,
    /// Replay speed relative to the file's timestamps (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    speed: f64,
}

/// `ledger relay`: mirrors the event log to Kafka.
pub async fn relay(database_url: &str, kafka: &KafkaArgs) -> anyhow::Result<()> {
    let kafka = kafka.required()?;
    let pool = connect_and_migrate(database_url).await?;
    let relay = ledger::relay::Relay::new(pool, kafka, ledger::relay::RelayConfig::default());
    relay.run(shutdown_on_signal()).await?;
    Ok(())
}

/// `ledger webhooks`: delivers alert webhooks (any number may run: deliveries are leased one by one).
pub async fn webhooks(database_url: &str, args: crate::shared::WebhookArgs) -> anyhow::Result<()> {
    let pool = connect_and_migrate(database_url).await?;
    ledger_api::webhooks::Deliverer::new(pool, args.config())?.run(shutdown_on_signal()).await
}

/// `ledger process-manager`: coordinates orders and portfolios.
pub async fn process_manager(database_url: &str) -> anyhow::Result<()> {
    let pool = connect_and_migrate(database_url).await?;
    let commands = Arc::new(CommandService::new(pool, CommandConfig::default()));
    ProcessManager::new(commands, ProcessConfig::default()).run(shutdown_on_signal()).await?;
    Ok(())
}

/// `ledger worker NAME`: the projection workers of NAME (or all).
pub async fn worker(
    database_url: &str,
    kafka: &KafkaArgs,
    projection_args: &ProjectionArgs,
    args: WorkerArgs,
) -> anyhow::Result<()> {
    let projections = select(&args.projection, &projection_args.settings()?)?;
    let config = projection_args.worker_config()?;
    let kafka = kafka.required()?;
    let pool = connect_and_migrate(database_url).await?;
    run_workers(pool, kafka, projections, config, shutdown_on_signal()).await
}

/// `ledger replay`: rebuilds (or verifies) the projections named.
pub async fn replay(database_url: &str, projections: &ProjectionArgs, args: ReplayArgs) -> anyhow::Result<()> {
    let name = if args.all { "all".to_string() } else { args.projection.unwrap_or_default() };
    let projections = select(&name, &projections.settings()?)?;
    let pool = connect_and_migrate(database_url).await?;
    rebuild_and_report(&pool, projections, args.verify).await
}

/// `ledger simulate`.
pub async fn simulate(kafka: &KafkaArgs, args: SimulateArgs) -> anyhow::Result<()> {
    let kafka = kafka.required()?;
    let symbols = args.symbols.map(|list| list.0);
    publish_simulated(&kafka, args.seed, args.interval_ms, symbols, shutdown_on_signal()).await
}

/// `ledger executor`: the paper-trading executor and its tick consumer.
pub async fn executor(database_url: &str, kafka: &KafkaArgs, args: ExecutorArgs) -> anyhow::Result<()> {
    let ExecutorArgs { slippage_bps, fee_bps, fee_min, participation, day_end_utc } = args;
    let day_end_utc = chrono::NaiveTime::parse_from_str(&day_end_utc, "%H:%M")
        .map_err(|_| anyhow::anyhow!("--day-end-utc must be HH:MM, not {day_end_utc:?}"))?;
    let config = ledger::execution::PaperConfig { slippage_bps, fee_bps, fee_min, participation, day_end_utc };
    let kafka = kafka.required()?;
    let pool = connect_and_migrate(database_url).await?;
    let commands = Arc::new(CommandService::new(pool, CommandConfig::default()));
    let executor = ledger::execution::PaperExecutor::new(commands, config).map_err(|e| anyhow::anyhow!(e))?;
    let cancel = shutdown_on_signal();
    let (sender, ticks) = tokio::sync::mpsc::channel(ledger::execution::TICK_QUEUE);
    let consumer = ledger::execution::spawn_tick_consumer(&kafka, sender, cancel.clone())?;
    executor.run(ticks, cancel).await.context("paper executor")?;
    consumer.await.context("tick consumer")?;
    Ok(())
}

/// `ledger feed --csv FILE`.
pub async fn feed(kafka: &KafkaArgs, args: FeedArgs) -> anyhow::Result<()> {
    let kafka = kafka.required()?;
    publish_csv(&kafka, &args.csv, args.speed, shutdown_on_signal()).await
}

/// The projections named on the command line (`all` or one name).
fn select(name: &str, settings: &ProjectionSettings) -> anyhow::Result<Vec<Arc<dyn Projection>>> {
    if name == "all" {
        return Ok(all(settings));
    }
    match by_name(name, settings) {
        Some(projection) => Ok(vec![projection]),
        None => bail!("unknown projection {name:?}; expected one of {} or all", NAMES.join(", ")),
    }
}

/// Runs the workers of `projections` until `cancel` fires.
async fn run_workers(
    pool: PgPool,
    kafka: KafkaConfig,
    projections: Vec<Arc<dyn Projection>>,
    config: WorkerConfig,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    ledger::projections::worker::run_workers(pool, kafka, projections, config, cancel).await?;
    Ok(())
}

/// `ledger replay`: rebuilds (or verifies) projections with a progress bar — all of them together, so the log is
/// read once — and fails if verification differs.
async fn rebuild_and_report(pool: &PgPool, projections: Vec<Arc<dyn Projection>>, verify: bool) -> anyhow::Result<()> {
    let mode = if verify { RebuildMode::Verify } else { RebuildMode::Swap };
    let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
    let bar = progress_bar("inputs").with_message(if names.len() == 1 { names[0] } else { "all" });
    let reports = rebuild_together(pool, &projections, mode, ReplayLimits::default(), &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await
    .with_context(|| format!("rebuilding {}", names.join(", ")))?;
    bar.finish_and_clear();
    let mut differing = Vec::new();
    for report in &reports {
        let inputs = report.events + report.ticks;
        // Rebuilt together, each one's time runs from the common start: a rate of its own would mislead.
        let rate = match reports.len() {
            1 => format!(" ({:.0} inputs/s)", inputs as f64 / report.seconds.max(1e-9)),
            _ => String::new(),
        };
        match mode {
            RebuildMode::Swap => println!(
                "{:<11} rebuilt from {} events and {} ticks in {:.2} s{rate}, swapped in",
                report.projection, report.events, report.ticks, report.seconds
            ),
            RebuildMode::Verify if report.differences.is_empty() => println!(
                "{:<11} verified: identical to a rebuild from {} events and {} ticks ({:.2} s)",
                report.projection, report.events, report.ticks, report.seconds
            ),
            RebuildMode::Verify => {
                for difference in &report.differences {
                    println!(
                        "{:<11} DIFFERS: {} has {} live rows, {} rebuilt (or different content)",
                        report.projection, difference.table, difference.live_rows, difference.rebuilt_rows
                    );
                }
                differing.push(report.projection);
            }
        }
    }
    if reports.len() > 1 {
        let seconds = reports.iter().map(|r| r.seconds).fold(0.0, f64::max);
        let read = reports.iter().map(|r| r.events).max().unwrap_or(0);
        println!(
            "{} projections from one read of the log ({read} events) in {seconds:.2} s ({:.0} events/s); each line's \
             time runs from the start",
            reports.len(),
            read as f64 / seconds.max(1e-9)
        );
    }
    if !differing.is_empty() {
        bail!("{} differ from a rebuild: {}", differing.len(), differing.join(", "));
    }
    Ok(())
}

/// `ledger simulate`: publishes seeded GBM ticks of `symbols` (the demo's five when `None`) until `cancel` fires.
pub async fn publish_simulated(
    kafka: &KafkaConfig,
    seed: u64,
    interval_ms: u64,
    symbols: Option<Vec<SymbolSpec>>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let publisher = TickPublisher::new(kafka)?;
    let mut config = SimulatorConfig::demo(seed);
    if let Some(symbols) = symbols {
        config = config.with_symbols(symbols);
    }
    config.interval_ms = interval_ms.max(1);
    let mut simulator = Simulator::new(config);
    let symbols: Vec<String> = simulator.config().symbols.iter().map(|s| s.symbol.to_string()).collect();
    tracing::info!(seed, interval_ms, symbols = %symbols.join(","), topic = %kafka.prices_topic, "simulator started");
    let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms.max(1)));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let ticks = simulator.step(chrono::Utc::now());
        if let Err(error) = publisher.publish_all(&ticks).await {
            tracing::warn!(%error, "publishing ticks failed; continuing");
        }
    }
}

/// `ledger feed --csv`: publishes a CSV file's ticks, paced by their timestamps divided by `speed` (0: at once).
async fn publish_csv(
    kafka: &KafkaConfig,
    path: &std::path::Path,
    speed: f64,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let ticks = read_csv(path)?;
    let publisher = TickPublisher::new(kafka)?;
    println!("feeding {} ticks from {} to {}", ticks.len(), path.display(), kafka.prices_topic);
    let mut previous: Option<chrono::DateTime<chrono::Utc>> = None;
    for tick in &ticks {
        if speed > 0.0 {
            if let Some(previous) = previous {
                let gap = (tick.ts - previous).to_std().unwrap_or_default().div_f64(speed);
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(gap) => {}
                }
            }
            previous = Some(tick.ts);
        }
        publisher.publish(tick).await?;
    }
    println!("fed {} ticks", ticks.len());
    Ok(())
}
