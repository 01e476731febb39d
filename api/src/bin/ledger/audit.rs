//! `ledger seal`, `ledger export` and `ledger verify`: the audit trail from the command line.
//!
//! The work is in `ledger::audit`; this module parses options, shows progress bars and prints the one-line
//! results. Failures (including a verification that finds a change) are returned as errors, which `main`
//! prints on one line and turns into exit code 1.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, Utc};
use ledger::audit::{ExportFilter, ExportFormat, ExportOptions, Sealer, SealerConfig};
use uuid::Uuid;

use crate::shared::{connect_and_migrate, progress_bar, shutdown_on_signal};

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// jsonl, csv or parquet.
    #[arg(long, value_parser = parse_format)]
    pub format: ExportFormat,
    /// Directory to write `events.<format>` and `manifest.json` to (created if missing; must not hold an export).
    #[arg(long)]
    pub out: PathBuf,
    /// Lowest global position, inclusive.
    #[arg(long)]
    pub from_position: Option<i64>,
    /// Highest global position, inclusive.
    #[arg(long)]
    pub to_position: Option<i64>,
    /// Earliest recorded time, inclusive (RFC 3339, or a date for midnight UTC).
    #[arg(long, value_parser = parse_time)]
    pub from_time: Option<DateTime<Utc>>,
    /// Latest recorded time, exclusive (RFC 3339, or a date for midnight UTC).
    #[arg(long, value_parser = parse_time)]
    pub to_time: Option<DateTime<Utc>>,
    /// Only this aggregate's events.
    #[arg(long, conflicts_with = "portfolio")]
    pub aggregate: Option<String>,
    /// Only this portfolio's events and those of its orders.
    #[arg(long, value_parser = parse_portfolio)]
    pub portfolio: Option<Uuid>,
    /// Export what is sealed already, without sealing up to the log's head first (for a read-only role).
    #[arg(long)]
    pub no_seal: bool,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// An export directory (with manifest.json) to verify.
    #[arg(required_unless_present = "db", conflicts_with = "db")]
    pub dir: Option<PathBuf>,
    /// Verify the database's log against the sealed chain instead.
    #[arg(long)]
    pub db: bool,
}

fn parse_format(text: &str) -> Result<ExportFormat, String> {
    text.parse()
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    ledger::audit::filter::parse_time(text)
}

fn parse_portfolio(text: &str) -> Result<Uuid, String> {
    Uuid::parse_str(text).map_err(|_| format!("{text:?} is not a portfolio id (a UUID)"))
}

/// `ledger seal`: seals the log until SIGINT/SIGTERM.
pub async fn seal(database_url: &str) -> anyhow::Result<()> {
    let pool = connect_and_migrate(database_url).await?;
    let sealer = Sealer::new(pool, SealerConfig::default());
    let status = sealer.status();
    sealer.run(shutdown_on_signal()).await.context("sealing the audit chain")?;
    let sealed = status.sealed.load(std::sync::atomic::Ordering::Relaxed);
    let length = status.event_count.load(std::sync::atomic::Ordering::Relaxed);
    println!("sealer stopped: sealed {sealed} events; the chain holds {length}");
    Ok(())
}

/// `ledger export`: seals up to the head (unless `--no-seal`), then writes the export with a progress bar.
pub async fn export(database_url: &str, args: ExportArgs) -> anyhow::Result<()> {
    let filter = ExportFilter {
        from_position: args.from_position,
        to_position: args.to_position,
        from_time: args.from_time,
        to_time: args.to_time,
        aggregate_id: args.aggregate,
        portfolio_id: args.portfolio,
    };
    filter.validate()?;
    let pool = connect_and_migrate(database_url).await?;
    if !args.no_seal {
        ledger::audit::seal_until_head(&pool).await.context("sealing up to the log's head before exporting")?;
    }
    let options = ExportOptions { format: args.format, out_dir: args.out, filter };
    let started = Instant::now();
    let bar = progress_bar("events").with_message("export");
    let manifest = ledger::audit::export(&pool, &options, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let range = match (manifest.first_position, manifest.last_position) {
        (Some(first), Some(last)) => format!("positions {first}–{last}"),
        _ => "no events matched".into(),
    };
    let file = &manifest.files[0];
    println!(
        "exported {} events ({range}) to {} in {seconds:.2} s ({:.0} events/s); {} bytes, SHA-256 {}",
        manifest.count,
        options.out_dir.join(&file.name).display(),
        manifest.count as f64 / seconds.max(1e-9),
        file.bytes,
        file.sha256
    );
    if let Some(hash) = manifest.last_chain_hash {
        println!("last chain hash {hash}; manifest {}", options.out_dir.join("manifest.json").display());
    }
    Ok(())
}

/// `ledger verify DIR` or `ledger verify --db`: exit 0 with a one-line summary, or an error naming the first
/// position that fails.
pub async fn verify(database_url: &str, args: VerifyArgs) -> anyhow::Result<()> {
    let bar = progress_bar("records").with_message("verify");
    let summary = match args.dir {
        Some(dir) => {
            let progress = bar.clone();
            let report = tokio::task::spawn_blocking(move || {
                ledger::audit::verify_dir(&dir, &mut |done, total| {
                    progress.set_length(total);
                    progress.set_position(done);
                })
            })
            .await
            .context("the verification task failed")?;
            bar.finish_and_clear();
            report?.summary()
        }
        None => {
            let pool = connect_and_migrate(database_url).await?;
            let report = ledger::audit::verify_db(&pool, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .await;
            bar.finish_and_clear();
            report?.summary()
        }
    };
    println!("{summary}");
    Ok(())
}
