//! The configuration file: the layer between the built-in defaults and the environment.
//!
//! Every setting is an environment variable with a typed command-line option (see `ledger --help` and the
//! README's table). A file named by `--config FILE` or `LEDGER_CONFIG` holds `NAME=value` lines with the same
//! names (`#` starts a comment; values may be quoted). Precedence, lowest first: defaults, the file, the
//! environment, command-line options. Unknown names are refused, so a typo does not silently do nothing.

use std::collections::{BTreeMap, BTreeSet};

/// Longest configuration file accepted.
pub const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// Every environment variable the command line declares (any subcommand), plus `RUST_LOG`.
pub fn known_settings() -> BTreeSet<String> {
    fn walk(command: &clap::Command, names: &mut BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                names.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, names);
        }
    }
    let mut names = BTreeSet::from(["RUST_LOG".to_string()]);
    walk(&<crate::cli::Cli as clap::CommandFactory>::command(), &mut names);
    names.remove("LEDGER_CONFIG");
    names
}

/// Parses a configuration file's text into `NAME → value`, refusing names not in `known`.
pub fn parse(text: &str, known: &BTreeSet<String>) -> Result<BTreeMap<String, String>, String> {
    let mut settings = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) =
            line.split_once('=').ok_or_else(|| format!("line {}: expected NAME=value, found {line:?}", number + 1))?;
        let name = name.trim().trim_start_matches("export ").trim();
        if !known.contains(name) {
            return Err(format!(
                "line {}: unknown setting {name:?} (see the README's configuration table)",
                number + 1
            ));
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        settings.insert(name.to_string(), value.to_string());
    }
    Ok(settings)
}

/// Finds the file (`--config FILE`, `--config=FILE` or `LEDGER_CONFIG`) and exports its settings that the
/// environment does not set. Called before the command line is parsed, while the process is single-threaded.
pub fn apply(args: &[String]) -> Result<(), String> {
    let from_args = args.iter().enumerate().find_map(|(i, arg)| {
        arg.strip_prefix("--config=")
            .map(str::to_string)
            .or_else(|| (arg == "--config").then(|| args.get(i + 1).cloned()).flatten())
    });
    let Some(path) = from_args.or_else(|| std::env::var("LEDGER_CONFIG").ok()) else { return Ok(()) };
    let metadata = std::fs::metadata(&path).map_err(|e| format!("configuration file {path}: {e}"))?;
    if metadata.len() > CONFIG_FILE_BYTES_MAX {
        return Err(format!("configuration file {path} is larger than {CONFIG_FILE_BYTES_MAX} bytes"));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("configuration file {path}: {e}"))?;
    let settings = parse(&text, &known_settings()).map_err(|e| format!("configuration file {path}, {e}"))?;
    for (name, value) in settings {
        if std::env::var_os(&name).is_none() {
            // Safety: called at the start of `main`, before any other thread exists.
            unsafe { std::env::set_var(name, value) };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{known_settings, parse};

    #[test]
    fn settings_comments_and_quotes() {
        let text =
            "# a comment\nDATABASE_URL=postgres://x/y\n\nLEDGER_LISTEN = \"0.0.0.0:80\"\nexport RUST_LOG='debug'\n";
        let parsed = parse(text, &known_settings()).unwrap();
        assert_eq!(parsed["DATABASE_URL"], "postgres://x/y");
        assert_eq!(parsed["LEDGER_LISTEN"], "0.0.0.0:80");
        assert_eq!(parsed["RUST_LOG"], "debug");
    }

    #[test]
    fn unknown_names_and_bad_lines_are_refused_with_their_line() {
        let known = known_settings();
        assert!(known.contains("LEDGER_PAPER_FEE_BPS") && known.contains("KAFKA_BROKERS"), "{known:?}");
        assert!(parse("DATABSE_URL=x", &known).unwrap_err().contains("line 1: unknown setting \"DATABSE_URL\""));
        assert!(parse("LEDGER_LISTN=x", &known).unwrap_err().contains("unknown setting \"LEDGER_LISTN\""));
        assert!(parse("\nnot a setting", &known).unwrap_err().contains("line 2: expected NAME=value"));
        assert!(parse("LEDGER_CONFIG=other", &known).is_err());
    }
}
