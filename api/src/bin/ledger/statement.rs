//! `ledger import`: a broker's statement (CSV) booked on a portfolio through the batch path, with a progress
//! bar and a per-line report. The format and the guarantees are `ledger::import`'s.

use std::path::PathBuf;

use anyhow::{bail, Context};
use ledger::clock::Clock;
use ledger::commands::{CommandConfig, CommandContext, CommandService};
use ledger::domain::values::PortfolioId;
use ledger::import::{import, Statement};
use uuid::Uuid;

use crate::shared::{connect_and_migrate, progress_bar};

/// Largest statement file read, in bytes.
const STATEMENT_FILE_MAX_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The portfolio to book on (its id).
    #[arg(long)]
    portfolio: Uuid,
    /// The statement: trade rows `date,symbol,side,quantity,price,fee` and cash rows `date,type,amount`.
    #[arg(long)]
    csv: PathBuf,
}

/// Reads, books and reports; exits 1 when a line was not applied (the others were).
pub async fn run(database_url: &str, args: ImportArgs) -> anyhow::Result<()> {
    let size = std::fs::metadata(&args.csv).with_context(|| format!("reading {}", args.csv.display()))?.len();
    if size > STATEMENT_FILE_MAX_BYTES {
        bail!("{} is {size} bytes; a statement may have at most {STATEMENT_FILE_MAX_BYTES}", args.csv.display());
    }
    let text = std::fs::read_to_string(&args.csv).with_context(|| format!("reading {}", args.csv.display()))?;
    let pool = connect_and_migrate(database_url).await?;
    let commands = CommandService::new(pool, CommandConfig::default());
    let statement = Statement::parse(&text, ledger::clock::SystemClock.now())?;
    let bar = progress_bar("rows").with_message("import");
    bar.set_length(statement.rows() as u64);
    let report = import(
        &commands,
        &CommandContext::new("operator"),
        PortfolioId(args.portfolio),
        statement,
        |_| Ok(()),
        |done, _| bar.set_position(done as u64),
    )
    .await
    .context("importing (what was booked stays; run the import again to book the rest)")?;
    bar.finish_and_clear();
    for error in &report.errors {
        println!("{error}");
    }
    println!(
        "{} rows: {} booked, {} already imported, {} lines not applied",
        report.rows,
        report.applied,
        report.already_imported,
        report.errors.len()
    );
    if !report.errors.is_empty() {
        bail!("{} lines not applied (listed above)", report.errors.len());
    }
    Ok(())
}
