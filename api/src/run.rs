//! Long-running and operational subcommands: projection workers, rebuilds, market-data sources.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use ledger::kafka::KafkaConfig;
use ledger::market::{read_csv, Simulator, SimulatorConfig, SymbolSpec, TickPublisher};
use ledger::projections::rebuild::{rebuild, RebuildMode};
use ledger::projections::worker::WorkerConfig;
use ledger::projections::{all, by_name, Projection, ProjectionSettings, NAMES};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The projections named on the command line (`all` or one name).
pub fn select(name: &str, settings: &ProjectionSettings) -> anyhow::Result<Vec<Arc<dyn Projection>>> {
    if name == "all" {
        return Ok(all(settings));
    }
    match by_name(name, settings) {
        Some(projection) => Ok(vec![projection]),
        None => bail!("unknown projection {name:?}; expected one of {} or all", NAMES.join(", ")),
    }
}

/// Runs the workers of `projections` until `cancel` fires.
pub async fn workers(
    pool: PgPool,
    kafka: KafkaConfig,
    projections: Vec<Arc<dyn Projection>>,
    config: WorkerConfig,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    ledger::projections::worker::run_workers(pool, kafka, projections, config, cancel).await?;
    Ok(())
}

/// `ledger replay`: rebuilds (or verifies) projections with a progress bar; fails if verification differs.
pub async fn replay(pool: &PgPool, projections: Vec<Arc<dyn Projection>>, verify: bool) -> anyhow::Result<()> {
    let mode = if verify { RebuildMode::Verify } else { RebuildMode::Swap };
    let mut differing = Vec::new();
    for projection in projections {
        let bar = ProgressBar::new(0).with_message(projection.name());
        bar.set_style(
            ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} inputs  {per_sec}  ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let report = rebuild(pool, projection.as_ref(), mode, &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
        .await
        .with_context(|| format!("rebuilding {}", projection.name()))?;
        bar.finish_and_clear();
        let inputs = report.events + report.ticks;
        let rate = inputs as f64 / report.seconds.max(1e-9);
        match mode {
            RebuildMode::Swap => println!(
                "{:<10} rebuilt from {} events and {} ticks in {:.2} s ({:.0} inputs/s), swapped in",
                report.projection, report.events, report.ticks, report.seconds, rate
            ),
            RebuildMode::Verify if report.differences.is_empty() => println!(
                "{:<10} verified: identical to a rebuild from {} events and {} ticks ({:.2} s)",
                report.projection, report.events, report.ticks, report.seconds
            ),
            RebuildMode::Verify => {
                for difference in &report.differences {
                    println!(
                        "{:<10} DIFFERS: {} has {} live rows, {} rebuilt (or different content)",
                        report.projection, difference.table, difference.live_rows, difference.rebuilt_rows
                    );
                }
                differing.push(report.projection);
            }
        }
    }
    if !differing.is_empty() {
        bail!("{} differ from a rebuild: {}", differing.len(), differing.join(", "));
    }
    Ok(())
}

/// `ledger simulate`: publishes seeded GBM ticks of `symbols` (the demo's five when `None`) until `cancel` fires.
pub async fn simulate(
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
pub async fn feed(
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
