//! Statement import: a broker's trade history, booked on a portfolio, each row exactly once.
//!
//! The statement is CSV (UTF-8) with two kinds of row, told apart by their number of fields:
//! - a trade: `date,symbol,side,quantity,price,fee` (`side` is `buy` or `sell`, in any case);
//! - cash: `date,type,amount` (`type` is `deposit` or `withdrawal`).
//!
//! One row per line. `date` is `YYYY-MM-DD` (midnight UTC) or an RFC 3339 time, and never in the future. Header
//! lines (first field `date`), blank lines and lines starting with `#` are skipped. Quantities, prices and amounts are positive
//! decimals, a fee zero or more; symbols as for orders (in any case: `acme` is `ACME`).
//!
//! Each row becomes one command through the batch path ([`CommandService::execute_batch`], up to
//! [`BATCH_COMMANDS_MAX`] rows per commit): a trade is `BookExternalTrade` (booked like a fill, with no order
//! and no reservation), cash is `DepositCash` or `WithdrawCash`, each at the row's date. Rows are applied in
//! date order — a file whose last row is older than its first is read backwards first — so a newest-first export
//! books like an oldest-first one, one date's rows in their order of execution.
//!
//! **Exactly once.** A row's idempotency key (and a trade's id) is derived from the portfolio, the row's
//! normalised content and how many identical rows came before it in the file (two equal trades on one day are
//! two trades): importing the same file again, or a later export that repeats its rows, books nothing twice.
//!
//! **Per line.** A line that cannot be read, or that the portfolio refuses (a sell of more than is held, a
//! withdrawal beyond the cash), is reported with its line number and reason and applies nothing; every other
//! line is applied. An infrastructure failure (database unreachable) stops the import with an error; what
//! was applied before it stays, and running the import again applies the rest.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::commands::{BatchItem, CommandContext, CommandError, CommandService, Idempotency, BATCH_COMMANDS_MAX};
use crate::domain::order::Side;
use crate::domain::portfolio::PortfolioCommand;
use crate::domain::values::{Amount, ExecId, FreeText, Money, PortfolioId, Price, Quantity, Symbol};
use crate::domain::{Portfolio, PortfolioError};
use crate::log::LogPosition;

/// Most lines a statement may have (comments and blank lines included).
pub const STATEMENT_LINES_MAX: usize = 1_000_000;

/// The actor of every command an import issues, whoever asked for it: the scope of the rows' idempotency keys,
/// so a statement imported from the command line and again through the API books nothing twice.
pub const IMPORT_ACTOR: &str = "statement-import";

/// The reference recorded on the cash movements of an import.
const CASH_REFERENCE: &str = "statement import";

/// One line the import did not apply, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject), graphql(name = "ImportLineError"))]
pub struct LineError {
    /// 1-based line number in the statement.
    pub line: u64,
    /// A stable code: `INVALID_LINE` for a line that cannot be read, else the portfolio's refusal
    /// (`INSUFFICIENT_QUANTITY`, `INSUFFICIENT_FUNDS`, `PORTFOLIO_IN_DEFICIT`…).
    pub code: String,
    pub reason: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {} ({})", self.line, self.reason, self.code)
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// Data lines (trades and cash, readable or not; headers, comments and blank lines not counted):
    /// `applied + already_imported + errors`.
    pub rows: usize,
    /// Rows booked by this import.
    pub applied: usize,
    /// Rows an earlier import had already booked (nothing written for them).
    pub already_imported: usize,
    /// Lines not applied, in line order.
    pub errors: Vec<LineError>,
    /// Where the last event this import wrote is in the log (wait for read models to reach it).
    pub last_position: Option<LogPosition>,
}

/// A statement row, read and checked.
#[derive(Debug, Clone, PartialEq)]
enum Row {
    Trade { symbol: Symbol, side: Side, quantity: Quantity, price: Price, fee: Money },
    Deposit { amount: Amount },
    Withdrawal { amount: Amount },
}

/// A row with where it came from and when it happened.
#[derive(Debug, Clone)]
struct Dated {
    line: u64,
    at: DateTime<Utc>,
    row: Row,
}

/// A statement, read: its rows in the order they are applied, and the lines that could not be read.
#[derive(Debug, Default)]
pub struct Statement {
    rows: Vec<Dated>,
    errors: Vec<LineError>,
}

impl Statement {
    /// Reads `text`; `now` bounds the dates. Errors only for a statement too long as a whole.
    pub fn parse(text: &str, now: DateTime<Utc>) -> Result<Self, CommandError> {
        let lines = text.lines().count();
        if lines > STATEMENT_LINES_MAX {
            return Err(CommandError::Invalid(format!(
                "a statement has at most {STATEMENT_LINES_MAX} lines, this one {lines}"
            )));
        }
        let mut statement = Self::default();
        let mut record = csv::StringRecord::new();
        for (index, text) in text.lines().enumerate() {
            let line = index as u64 + 1;
            let text = text.trim_start_matches('\u{feff}').trim(); // a byte-order mark (spreadsheet exports)
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            // One row per line (quoting as CSV allows, but no line breaks inside a field).
            let mut reader = csv::ReaderBuilder::new()
                .buffer_capacity(text.len() + 1) // not the default 8 KiB per line
                .has_headers(false)
                .flexible(true)
                .trim(csv::Trim::All)
                .from_reader(text.as_bytes());
            let parsed = match reader.read_record(&mut record) {
                Ok(_) if record.get(0).is_some_and(|first| first.eq_ignore_ascii_case("date")) => continue,
                Ok(_) => read_row(&record, now),
                Err(error) => Err(error.to_string()),
            };
            match parsed {
                Ok((at, row)) => statement.rows.push(Dated { line, at, row }),
                Err(reason) => statement.errors.push(LineError { line, code: "INVALID_LINE".into(), reason }),
            }
        }
        // Newest first (the file ends earlier than it starts): read it backwards, so that one date's rows keep
        // their order of execution; then by date, stably.
        if let (Some(first), Some(last)) = (statement.rows.first(), statement.rows.last()) {
            if first.at > last.at {
                statement.rows.reverse();
            }
        }
        statement.rows.sort_by_key(|row| row.at);
        Ok(statement)
    }

    /// Rows read (not counting the lines that could not be).
    pub fn rows(&self) -> usize {
        self.rows.len()
    }
}

fn read_row(record: &csv::StringRecord, now: DateTime<Utc>) -> Result<(DateTime<Utc>, Row), String> {
    let field = |i: usize| record.get(i).unwrap_or_default();
    let decimal = |i: usize, what: &str| {
        // Normalised, so that `1.50` and `1.5` are one value (and one row key).
        field(i)
            .parse::<Decimal>()
            .map(|d| d.normalize())
            .map_err(|_| format!("{what} {:?} is not a decimal number", field(i)))
    };
    let at = read_date(field(0))?;
    if at > now {
        return Err(format!("date {} is in the future", field(0)));
    }
    let row = match record.len() {
        6 => {
            let side = match field(2).to_ascii_lowercase().as_str() {
                "buy" => Side::Buy,
                "sell" => Side::Sell,
                other => return Err(format!("side {other:?} is neither buy nor sell")),
            };
            Row::Trade {
                symbol: Symbol::new(field(1).to_ascii_uppercase()).map_err(|e| e.to_string())?,
                side,
                quantity: Quantity::new(decimal(3, "quantity")?).map_err(|e| e.to_string())?,
                price: Price::new(decimal(4, "price")?).map_err(|e| e.to_string())?,
                fee: Money::new(decimal(5, "fee")?).map_err(|e| e.to_string())?,
            }
        }
        3 => {
            let amount = Amount::new(decimal(2, "amount")?).map_err(|e| e.to_string())?;
            match field(1).to_ascii_lowercase().as_str() {
                "deposit" => Row::Deposit { amount },
                "withdrawal" | "withdraw" => Row::Withdrawal { amount },
                other => return Err(format!("cash type {other:?} is neither deposit nor withdrawal")),
            }
        }
        n => {
            return Err(format!(
                "{n} fields: a trade has 6 (date,symbol,side,quantity,price,fee), cash 3 (date,type,amount)"
            ))
        }
    };
    Ok((at, row))
}

fn read_date(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| format!("date {text:?} is neither YYYY-MM-DD nor an RFC 3339 time"))
}

impl Dated {
    /// The row as canonical text: its time (RFC 3339, UTC, to the microsecond) and normalised fields. What
    /// identifies it, so it must never change: written out here rather than left to a serialisation format.
    fn canonical(&self) -> String {
        let at = self.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        match &self.row {
            Row::Trade { symbol, side, quantity, price, fee } => format!(
                "trade|{at}|{symbol}|{}|{}|{}|{}",
                side.as_str(),
                quantity.value().normalize(),
                price.value().normalize(),
                fee.value().normalize()
            ),
            Row::Deposit { amount } => format!("deposit|{at}|{}", amount.value().normalize()),
            Row::Withdrawal { amount } => format!("withdrawal|{at}|{}", amount.value().normalize()),
        }
    }
}

/// The row's key: the same for the same portfolio, content and occurrence, whatever its line or spelling
/// (`1.50` and `1.5` are one price).
fn row_key(
    portfolio_id: PortfolioId,
    canonical: &str,
    occurrence: usize,
) -> Result<(String, Idempotency), CommandError> {
    let mut digest = Sha256::new();
    digest.update(portfolio_id.0.as_bytes());
    digest.update(canonical.as_bytes());
    let key = format!("import:{}:{occurrence}", &hex::encode(digest.finalize())[..32]);
    let idempotency = Idempotency::new(key.clone(), &("importStatement", canonical))?;
    Ok((key, idempotency))
}

/// Books `statement` on `portfolio_id` as described in the module docs, as [`IMPORT_ACTOR`] in `requested`'s
/// correlation and trace (who asked is logged with the correlation id). `authorize` sees the portfolio first
/// (a refusal, or no such portfolio, is the import's error and books nothing) and again at each batch;
/// `progress` is called with (rows done, rows) after each batch. Otherwise errors for an infrastructure
/// failure only.
pub async fn import(
    commands: &CommandService,
    requested: &CommandContext,
    portfolio_id: PortfolioId,
    statement: Statement,
    authorize: impl Fn(&Portfolio) -> Result<(), CommandError>,
    mut progress: impl FnMut(usize, usize),
) -> Result<ImportReport, CommandError> {
    let (portfolio, _) = commands.load::<Portfolio>(&portfolio_id.to_string()).await?;
    if portfolio.terms.is_none() {
        return Err(PortfolioError::NotFound.into());
    }
    authorize(&portfolio)?;
    let ctx = CommandContext { actor: IMPORT_ACTOR.to_string(), idempotency: None, ..requested.clone() };
    tracing::info!(requested_by = %requested.actor, correlation_id = %ctx.correlation_id, portfolio = %portfolio_id,
        rows = statement.rows.len(), "statement import");
    let (total, rows) = (statement.rows.len(), statement.rows.len() + statement.errors.len());
    let mut report = ImportReport { rows, errors: statement.errors, ..Default::default() };
    let mut seen: HashMap<String, usize> = HashMap::new();
    let reference = FreeText::new("reference", CASH_REFERENCE).map_err(|e| CommandError::Invalid(e.to_string()))?;
    let mut done = 0;
    for chunk in statement.rows.chunks(BATCH_COMMANDS_MAX) {
        let mut items = Vec::with_capacity(chunk.len());
        for row in chunk {
            let canonical = row.canonical();
            let occurrence = *seen.entry(canonical.clone()).and_modify(|n| *n += 1).or_insert(1);
            let (key, idempotency) = row_key(portfolio_id, &canonical, occurrence)?;
            let command = match &row.row {
                Row::Trade { symbol, side, quantity, price, fee } => PortfolioCommand::BookExternalTrade {
                    trade_id: ExecId::new(key).map_err(|e| CommandError::Invalid(e.to_string()))?,
                    symbol: symbol.clone(),
                    side: *side,
                    quantity: *quantity,
                    price: *price,
                    fee: *fee,
                    executed_at: row.at,
                },
                Row::Deposit { amount } => {
                    PortfolioCommand::DepositCash { amount: *amount, reference: Some(reference.clone()), at: row.at }
                }
                Row::Withdrawal { amount } => {
                    PortfolioCommand::WithdrawCash { amount: *amount, reference: Some(reference.clone()), at: row.at }
                }
            };
            items.push(BatchItem {
                aggregate_id: portfolio_id.to_string(),
                command,
                idempotency: Some(idempotency),
                cause: None,
            });
        }
        let answers = commands.execute_batch::<Portfolio>(&ctx, items, &authorize).await?;
        for (row, answer) in chunk.iter().zip(answers) {
            match answer {
                Ok(outcome) if outcome.duplicate => report.already_imported += 1,
                Ok(outcome) => {
                    report.applied += 1;
                    report.last_position = report.last_position.max(outcome.last_position());
                }
                Err(error) if error.is_business() => report.errors.push(LineError {
                    line: row.line,
                    code: error.code().to_string(),
                    reason: error.to_string(),
                }),
                Err(error) => return Err(error),
            }
        }
        done += chunk.len();
        progress(done, total);
    }
    report.errors.sort_by_key(|e| e.line);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().with_timezone(&Utc)
    }

    fn keys(text: &str) -> Vec<String> {
        let statement = Statement::parse(text, now()).unwrap();
        let portfolio = PortfolioId(uuid::Uuid::from_u128(7));
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut keys = Vec::new();
        for row in &statement.rows {
            let canonical = row.canonical();
            let occurrence = *seen.entry(canonical.clone()).and_modify(|n| *n += 1).or_insert(1);
            keys.push(row_key(portfolio, &canonical, occurrence).unwrap().0);
        }
        keys
    }

    /// Line numbers count every line (comments, headers, blank lines); rows are sorted by date, stably.
    #[test]
    fn rows_are_read_in_date_order_and_bad_lines_are_reported_by_number() {
        let text = "# comment\ndate,symbol,side,quantity,price,fee\n\n2025-01-02,ACME,SELL,1,10,0\n\
                    2025-01-01T10:00:00+02:00,acme,buy,2,9.5,0.1\n2025-01-01,deposit,100\n2027-01-01,deposit,1\n\
                    2025-01-01,ACME,buy,1,10\n2025-01-01,ACME,buy,-1,10,0\n2025-01-01,dividend,5\n\
                    2025-01-01,ACME,buy,1,x,0\n";
        let statement = Statement::parse(text, now()).unwrap();
        let lines: Vec<u64> = statement.rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![6, 5, 4]);
        let errors: Vec<(u64, &str)> = statement.errors.iter().map(|e| (e.line, e.reason.as_str())).collect();
        assert_eq!(errors.iter().map(|e| e.0).collect::<Vec<_>>(), vec![7, 8, 9, 10, 11]);
        assert!(errors[0].1.contains("in the future"), "{errors:?}");
        assert!(errors[1].1.starts_with("5 fields"), "{errors:?}");
        assert!(errors[3].1.contains("neither deposit nor withdrawal"), "{errors:?}");
        assert!(errors[4].1.contains("price \"x\""), "{errors:?}");
    }

    /// The key is the row's content and occurrence, not its spelling or line: two equal trades are two keys,
    /// `1.50` is `1.5`, and the same rows in another order (or with other lines around them) keep their keys.
    #[test]
    fn a_row_keeps_its_key_whatever_its_line_or_spelling() {
        let first = keys("2025-01-01,ACME,buy,1,1.50,0\n2025-01-01,ACME,buy,1,1.50,0\n2025-01-03,deposit,10\n");
        assert_eq!(first.len(), 3);
        assert_ne!(first[0], first[1]);
        let respelled =
            keys("# again\n2025-01-03,Deposit,10.0\n2025-01-01,ACME,BUY,1,1.5,0.00\n2025-01-01,ACME,buy,1.0,1.5,0\n");
        assert_eq!(first, respelled);
        assert!(first.iter().all(|k| k.len() <= crate::domain::values::EXTERNAL_ID_LEN_MAX));
    }
}
