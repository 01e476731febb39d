//! The `ledger` command-line binary: one subcommand per role.

mod audit;
mod bench;
mod bench_export;
mod cli;
mod demo;
mod run;
mod serve;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(&args.log_format);
    match cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line a human can act on; the cause chain is in the log at debug level.
            tracing::debug!(error = ?error, "command failed");
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
