//! The CSV replay feed: `ts,symbol,price[,volume]` with an RFC 3339 timestamp, one tick per row. The row number
//! is the tick's `seq`, so ticks with equal timestamps keep the file's order.

use std::path::Path;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::tick::{Tick, TICK_VERSION};
use crate::domain::values::{Price, Symbol};

/// Largest file the feed reads into memory, in rows.
pub const CSV_ROWS_MAX: usize = 10_000_000;

#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("line {line}: {message}")]
    Row { line: usize, message: String },
    #[error("more than {CSV_ROWS_MAX} rows")]
    TooLarge,
}

/// Reads and validates a whole CSV file. A header line (`ts,symbol,price…`) and blank lines are skipped.
pub fn read_csv(path: &Path) -> Result<Vec<Tick>, CsvError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| CsvError::Io { path: path.display().to_string(), source })?;
    let source = format!("csv:{}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    let mut ticks = Vec::new();
    let mut last_ts: std::collections::HashMap<Symbol, DateTime<Utc>> = std::collections::HashMap::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        let line = line.trim();
        if line.is_empty() || (index == 0 && line.to_ascii_lowercase().starts_with("ts,")) {
            continue;
        }
        if ticks.len() >= CSV_ROWS_MAX {
            return Err(CsvError::TooLarge);
        }
        let row = |message: String| CsvError::Row { line: line_number, message };
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if !(3..=4).contains(&fields.len()) {
            return Err(row(format!("expected ts,symbol,price[,volume], got {} fields", fields.len())));
        }
        let ts: DateTime<Utc> = DateTime::parse_from_rfc3339(fields[0])
            .map_err(|e| row(format!("timestamp {:?}: {e}", fields[0])))?
            .with_timezone(&Utc);
        let symbol = Symbol::new(fields[1]).map_err(|e| row(e.to_string()))?;
        // Consumers apply a symbol's ticks in (ts, seq) order and drop older ones: refuse them here instead.
        if last_ts.get(&symbol).is_some_and(|previous| ts < *previous) {
            return Err(row(format!("ticks of {symbol} go back in time")));
        }
        last_ts.insert(symbol.clone(), ts);
        let price = fields[2]
            .parse::<Decimal>()
            .map_err(|_| row(format!("price {:?} is not a decimal", fields[2])))
            .and_then(|d| Price::new(d).map_err(|e| row(e.to_string())))?;
        let volume = match fields.get(3) {
            Some(v) if !v.is_empty() => {
                let volume = v.parse::<Decimal>().map_err(|_| row(format!("volume {v:?} is not a decimal")))?;
                if volume.is_sign_negative() {
                    return Err(row("volume must not be negative".into()));
                }
                Some(volume)
            }
            _ => None,
        };
        ticks.push(Tick {
            version: TICK_VERSION,
            symbol,
            price,
            ts,
            seq: line_number as i64,
            volume,
            source: source.clone(),
        });
    }
    Ok(ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(content: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("ticks-{}.csv", uuid::Uuid::new_v4()));
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn reads_rows_with_and_without_volume() {
        let path =
            write("ts,symbol,price,volume\n2026-01-02T14:30:00Z,ACME,101.25,300\n\n2026-01-02T14:30:01Z,ACME,101.30\n");
        let ticks = read_csv(&path).unwrap();
        assert_eq!(ticks.len(), 2);
        assert_eq!(ticks[0].volume, Some(Decimal::from(300)));
        assert_eq!(ticks[1].volume, None);
        assert_eq!((ticks[0].seq, ticks[1].seq), (2, 4));
        assert!(ticks[0].source.starts_with("csv:ticks-"));
    }

    #[test]
    fn bad_rows_name_their_line() {
        let path = write("2026-01-02T14:30:00Z,ACME,101.25\n2026-01-02T14:30:01Z,acme,1\n");
        let error = read_csv(&path).unwrap_err().to_string();
        assert!(error.starts_with("line 2:"), "{error}");
        let path = write("2026-01-02T14:30:00Z,ACME,-3\n");
        assert!(read_csv(&path).unwrap_err().to_string().starts_with("line 1:"));
        let path = write("2026-01-02T14:30:01Z,ACME,3\n2026-01-02T14:30:00Z,BBB,3\n2026-01-02T14:30:00Z,ACME,3\n");
        assert_eq!(read_csv(&path).unwrap_err().to_string(), "line 3: ticks of ACME go back in time");
    }
}
