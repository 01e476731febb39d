//! The `ledger` command-line binary: one subcommand per role or operation (`cli`).
//!
//! | module | what |
//! |--------|------|
//! | `cli` | global options, the subcommands and their dispatch |
//! | `shared` | Kafka and read-model options, the database connection, the shutdown signal |
//! | `config_file` | `--config FILE`: settings applied to the environment before parsing |
//! | `telemetry` | log format and level, OpenTelemetry trace export |
//! | `roles` | relay, process manager, workers, replay, executor, simulator, CSV feed |
//! | `operations` | migrate, token, schema, check, process failures |
//! | `audit` | seal, export, verify |
//! | `serve`, `demo` | the API server; the whole system in one process |

mod audit;
mod cli;
mod config_file;
mod demo;
mod operations;
mod roles;
mod serve;
mod shared;
mod statement;
mod telemetry;

use clap::Parser;

/// mimalloc instead of the system allocator: the profile of a replay (and of the command path) spent about a
/// third of its time in glibc's `malloc`/`free` (arena locks, `malloc_consolidate` after a batch of JSON trees is
/// dropped on another thread); see docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // The configuration file is applied to the environment before any thread exists (see `config_file`).
    let raw: Vec<String> = std::env::args().collect();
    if let Err(error) = config_file::apply(&raw) {
        eprintln!("error: {error}");
        return std::process::ExitCode::FAILURE;
    }
    let args = cli::Cli::parse();
    // The demo prints its URLs and tokens to stdout; keep routine logging out of their way.
    let otlp = args.otlp_endpoint.as_deref().map(|endpoint| (endpoint, args.otel_service_name.as_str()));
    if let Err(error) = telemetry::init_logging(&args.log_format, matches!(args.command, cli::Command::Demo(_)), otlp) {
        eprintln!("error: {error:#}");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line a human can act on; the cause chain is in the log at debug level.
            tracing::debug!(error = ?error, "command failed");
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
