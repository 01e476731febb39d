//! Operators' one-shot subcommands: `migrate`, `token`, `schema`, `openapi`, `check`, `process-failures …`
//! (what an operator does about steps the process manager could not apply) and `dead-letters …` (messages a
//! projection could not apply). The work is in the library; this module parses options and prints one line
//! per item.

use std::sync::Arc;

use anyhow::bail;
use ledger::commands::{CommandConfig, CommandService};
use ledger::process::failures::{self, RetryOutcome};
use ledger::process::{ProcessConfig, ProcessManager};
use ledger::projections::dead_letters::ReplayOutcome;
use uuid::Uuid;

use crate::shared::connect_and_migrate;

/// Longest validity of a token `ledger token` issues, in hours (a year).
const TOKEN_TTL_HOURS_MAX: i64 = 24 * 366;

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
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
}

/// `ledger migrate`: creates the database if missing and applies every migration.
pub async fn migrate(database_url: &str) -> anyhow::Result<()> {
    connect_and_migrate(database_url).await?;
    println!("database {} is migrated", ledger::db::redact(database_url));
    Ok(())
}

/// `ledger token`: prints a signed bearer token.
pub fn token(args: TokenArgs) -> anyhow::Result<()> {
    let role: ledger_api::auth::Role = args.role.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    anyhow::ensure!(
        (1..=TOKEN_TTL_HOURS_MAX).contains(&args.ttl_hours),
        "ttl-hours must be 1 to {TOKEN_TTL_HOURS_MAX}"
    );
    ledger::domain::values::Owner::new(args.subject.clone())?;
    let keys = ledger_api::auth::TokenKeys::new(args.jwt_secret.into_bytes()).map_err(|e| anyhow::anyhow!(e))?;
    let ttl = chrono::Duration::hours(args.ttl_hours);
    println!("{}", keys.issue(&args.subject, role, ttl, chrono::Utc::now()));
    Ok(())
}

/// `ledger schema`: the GraphQL SDL, as committed in `api/schema.graphql`.
pub fn schema() {
    print!("{}", ledger_api::graphql::sdl());
}

/// `ledger openapi`: the REST market data's OpenAPI 3 document, as committed in `api/openapi.json`.
pub fn openapi() {
    print!("{}", ledger_api::http::market_data::openapi_json());
}

/// How listings print a time.
const LISTED_TIME: &str = "%Y-%m-%dT%H:%M:%SZ";

/// " — <how> by <who>" for an item an operator resolved, nothing for an open one.
fn resolved(resolution: Option<&str>, by: Option<&str>) -> String {
    match (resolution, by) {
        (Some(how), Some(by)) => format!(" — {how} by {by}"),
        _ => String::new(),
    }
}

/// Who an operator's actions are recorded as (the OS user running the command).
fn operator() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

#[derive(Debug, clap::Subcommand)]
pub enum ProcessFailuresCommand {
    /// List the failures, oldest first (the open ones unless --all).
    List {
        #[arg(long)]
        all: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Run the failed step of an event again (same idempotency keys: it cannot act twice); exit 1 if it is
    /// refused again.
    Retry { event_id: Uuid },
    /// Record that a failure was dealt with outside the ledger.
    Dismiss { event_id: Uuid },
}

pub async fn process_failures(database_url: &str, command: ProcessFailuresCommand) -> anyhow::Result<()> {
    let pool = connect_and_migrate(database_url).await?;
    match command {
        ProcessFailuresCommand::List { all, limit } => {
            let rows = failures::list(&pool, !all, None, limit).await?;
            for row in &rows {
                let resolved = resolved(row.resolution.as_deref(), row.resolved_by.as_deref());
                println!(
                    "{} event {} at position {}: {} {}{resolved}",
                    row.recorded_at.format(LISTED_TIME),
                    row.event_id,
                    row.global_position,
                    row.error_code,
                    row.error
                );
            }
            println!("{} failure(s){}", rows.len(), if all { "" } else { " open" });
            Ok(())
        }
        ProcessFailuresCommand::Retry { event_id } => {
            let commands = Arc::new(CommandService::new(pool, CommandConfig::default()));
            let manager = ProcessManager::new(commands, ProcessConfig::default());
            match manager.retry_failure(event_id, &operator()).await? {
                RetryOutcome::Applied => {
                    println!("retried: the step for event {event_id} is applied and the failure resolved");
                    Ok(())
                }
                RetryOutcome::StillFailing { code, message } => bail!("refused again: {code}: {message}"),
                RetryOutcome::NotOpen => bail!("no open failure for event {event_id}"),
            }
        }
        ProcessFailuresCommand::Dismiss { event_id } => {
            if !failures::dismiss(&pool, event_id, &operator()).await? {
                bail!("no open failure for event {event_id}");
            }
            println!("dismissed the failure of event {event_id}");
            Ok(())
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum DeadLettersCommand {
    /// List dead letters, newest first (the open ones unless --all).
    List {
        #[arg(long)]
        all: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
    },
    /// Print one dead letter in full (its message as text).
    Show { id: i64 },
    /// Apply a dead letter to its projection once its cause is fixed, and mark it replayed (at most once; exit 1
    /// if its projection refuses it again).
    Replay { id: i64 },
    /// Mark a dead letter as dealt with, with the reason.
    Discard {
        id: i64,
        #[arg(long)]
        reason: String,
    },
}

/// `ledger dead-letters …`.
pub async fn dead_letters(
    database_url: &str,
    projection_args: &crate::shared::ProjectionArgs,
    command: DeadLettersCommand,
) -> anyhow::Result<()> {
    let pool = connect_and_migrate(database_url).await?;
    match command {
        DeadLettersCommand::List { all, limit } => {
            let rows = ledger::queries::operations::dead_letters(&pool, !all, None, limit).await?;
            for row in &rows {
                let resolved = resolved(row.resolution.as_deref(), row.resolved_by.as_deref());
                println!(
                    "#{} {} {} from {}[{}]@{}: {}{resolved}",
                    row.id,
                    row.recorded_at.format(LISTED_TIME),
                    row.projection,
                    row.source_topic,
                    row.source_partition,
                    row.source_offset,
                    row.error
                );
            }
            println!("{} dead letter(s){}", rows.len(), if all { "" } else { " open" });
            Ok(())
        }
        DeadLettersCommand::Show { id } => {
            let Some(row) = ledger::queries::operations::dead_letter(&pool, id).await? else {
                bail!("no dead letter #{id}")
            };
            println!("{row:#?}");
            Ok(())
        }
        DeadLettersCommand::Replay { id } => {
            let projections = ledger::projections::all(&projection_args.settings()?);
            match ledger::projections::dead_letters::replay(&pool, &projections, id, &operator()).await? {
                ReplayOutcome::Applied => {
                    println!("replayed: dead letter #{id} is applied to its projection and resolved");
                    Ok(())
                }
                ReplayOutcome::NotOpen => bail!("no open dead letter #{id}"),
                ReplayOutcome::Refused(reason) => bail!("refused again: {reason}"),
            }
        }
        DeadLettersCommand::Discard { id, reason } => {
            let reason = ledger::domain::values::FreeText::new("reason", reason)?;
            if !ledger::projections::dead_letters::discard(&pool, id, &operator(), reason.as_str()).await? {
                bail!("no open dead letter #{id}");
            }
            println!("discarded dead letter #{id}");
            Ok(())
        }
    }
}

/// `ledger check`: one line and exit 0 when every order agrees with its portfolio, the disagreements and exit 1
/// otherwise. Run it with the process manager caught up (a step in flight shows as a disagreement).
pub async fn check(database_url: &str) -> anyhow::Result<()> {
    let pool = connect_and_migrate(database_url).await?;
    let commands = CommandService::new(pool, CommandConfig::default());
    let disagreements = ledger::process::agreement::check(&commands).await?;
    if disagreements.is_empty() {
        println!("orders and portfolios agree");
        return Ok(());
    }
    for disagreement in &disagreements {
        println!("{disagreement}");
    }
    bail!("{} disagreement(s) between orders and portfolios", disagreements.len())
}
