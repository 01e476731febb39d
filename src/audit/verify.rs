//! Verification: an export directory against itself and its manifest, or the database's log against the
//! sealed chain. Both stop at the first failure and name its position.
//!
//! For an export directory, in this order (so that the failure named is the most specific one):
//! 1. every record: `SHA-256(previous_hash ‖ canonical bytes of its fields) = chain_hash`;
//! 2. consecutive records: strictly increasing chain order `(transaction_id, global_position)`, and — when the
//!    manifest says the export is contiguous — `previous_hash` = the chain hash of the record before;
//! 3. the manifest: count, first and last position and hash, the first record's previous hash;
//! 4. the file's SHA-256 and size against the manifest (this also catches changes that leave every record's
//!    meaning intact, such as re-spaced JSON).
//!
//! For the database: every `audit_chain` row in order — dense indexes, previous hash = the row before's chain
//! hash, the event still in the log and still hashing to the sealed value — then that no event was slipped
//! into the sealed part of the log, and that the checkpoints agree with the chain.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};

use super::canonical::{canonical_event, canonical_json, ChainHash, EVENT_FIELDS, GENESIS_HASH};
use super::export::CSV_COLUMNS;
use super::manifest::{ExportFormat, Failure, Manifest, MANIFEST_FILE};
use super::parquet_file::{derived, ParquetRows, DECIMAL_COLUMNS};
use super::sealed::{hash_column, parse_xid8};
use super::sealer::SEALER_NAME;
use super::{AuditError, ProgressFn};
use crate::log::{decode_event, load_cursor, LogPosition};

/// Longest record (line) `verify` reads: a longer one is not ours, and reading it whole could exhaust memory.
pub const RECORD_BYTES_MAX: usize = 16 << 20;
/// Chain rows per query when verifying the database.
pub const VERIFY_BATCH_SIZE: i64 = 5_000;
/// How often (in records) progress is reported.
const PROGRESS_EVERY_RECORDS: u64 = 5_000;

/// An intact export directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirReport {
    pub format: ExportFormat,
    pub file: String,
    pub records: u64,
    pub first_position: Option<i64>,
    pub last_position: Option<i64>,
    pub last_chain_hash: Option<ChainHash>,
    pub contiguous: bool,
}

impl DirReport {
    /// One line for the terminal.
    pub fn summary(&self) -> String {
        let range = match (self.first_position, self.last_position) {
            (Some(first), Some(last)) => format!("positions {first}–{last}"),
            _ => "no events".into(),
        };
        let hash = self.last_chain_hash.map(|h| format!(", last chain hash {h}")).unwrap_or_default();
        let links = if self.contiguous { "every record linked" } else { "each record checked alone (filtered)" };
        format!(
            "intact: {} records in {} ({range}, {links}){hash}; file digest and manifest match",
            self.records, self.file
        )
    }
}

/// One record read from an export file: what the chain check needs.
struct FileRecord {
    position: LogPosition,
    canonical: Vec<u8>,
    previous_hash: ChainHash,
    chain_hash: ChainHash,
}

/// Why a record could not be read (with its position when that much could be).
struct RecordError {
    position: Option<i64>,
    reason: String,
}

impl RecordError {
    fn new(position: Option<i64>, reason: impl Into<String>) -> RecordError {
        RecordError { position, reason: reason.into() }
    }
}

/// Verifies the export in `dir` (see the module docs). Blocking file I/O: call it from a blocking thread.
/// `progress` receives `(records checked, records in the manifest)`.
pub fn verify_dir(dir: &Path, progress: ProgressFn<'_>) -> Result<DirReport, AuditError> {
    let manifest = Manifest::read(dir)?;
    let entry = &manifest.files[0];
    let path = dir.join(&entry.name);
    let file_failure =
        |reason: String| Failure { position: None, after_position: None, location: entry.name.clone(), reason };
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(file_failure("the data file listed in the manifest is missing".into()).into())
        }
        Err(error) => return Err(AuditError::io("cannot read", &path)(error)),
    };
    let mut source = match manifest.format {
        ExportFormat::Jsonl => Source::Jsonl(JsonlRecords::new(file, &entry.name)),
        ExportFormat::Csv => Source::Csv(CsvRecords::new(file, &entry.name).map_err(file_failure)?),
        ExportFormat::Parquet => {
            drop(file);
            Source::Parquet(ParquetRecords::open(&path, &entry.name).map_err(|e| match e {
                Ok(reason) => AuditError::from(file_failure(reason)),
                Err(error) => error,
            })?)
        }
    };

    let mut chain = ChainCheck::new(&manifest);
    let mut count = 0u64;
    progress(0, manifest.count);
    while let Some((location, record)) = source.next() {
        count += 1;
        let record = record.map_err(|e| Failure {
            position: e.position,
            after_position: chain.last_position(),
            location: location.clone(),
            reason: e.reason,
        })?;
        chain.check(&record, &location)?;
        if count % PROGRESS_EVERY_RECORDS == 0 {
            progress(count, manifest.count.max(count));
        }
    }
    progress(count, manifest.count.max(count));
    let (digest, bytes, last_byte) = source.finish().map_err(|e| AuditError::io("cannot read", &path)(e))?;
    if manifest.format != ExportFormat::Parquet && bytes > 0 && last_byte != Some(b'\n') {
        return Err(Failure {
            position: None,
            after_position: chain.last_position(),
            location: entry.name.clone(),
            reason: "the file is truncated: it does not end with a line end".into(),
        }
        .into());
    }
    chain.check_manifest(count)?;
    if hex::encode(digest) != entry.sha256 || bytes != entry.bytes || entry.records != count {
        return Err(file_failure(format!(
            "the file ({bytes} bytes, SHA-256 {}) is not the one the manifest describes ({} bytes, SHA-256 {}, {} records)",
            hex::encode(digest),
            entry.bytes,
            entry.sha256,
            entry.records
        ))
        .into());
    }
    Ok(DirReport {
        format: manifest.format,
        file: entry.name.clone(),
        records: count,
        first_position: manifest.first_position,
        last_position: manifest.last_position,
        last_chain_hash: manifest.last_chain_hash,
        contiguous: manifest.contiguous,
    })
}

/// The per-record and between-record checks, and the manifest's totals.
struct ChainCheck<'m> {
    manifest: &'m Manifest,
    first: Option<(i64, ChainHash, ChainHash)>,
    last: Option<(LogPosition, ChainHash)>,
}

impl<'m> ChainCheck<'m> {
    fn new(manifest: &'m Manifest) -> Self {
        Self { manifest, first: None, last: None }
    }

    fn last_position(&self) -> Option<i64> {
        self.last.map(|(position, _)| position.global_position)
    }

    fn check(&mut self, record: &FileRecord, location: &str) -> Result<(), Failure> {
        let position = record.position.global_position;
        let fail = |reason: String| Failure {
            position: Some(position),
            after_position: self.last_position(),
            location: location.to_string(),
            reason,
        };
        if record.previous_hash.next(&record.canonical) != record.chain_hash {
            return Err(fail("the record's content does not match its chain hash (changed after sealing?)".into()));
        }
        match self.last {
            None => {
                if self.manifest.first_previous_hash != Some(record.previous_hash) {
                    return Err(fail(
                        "the first record's previous hash is not the manifest's first_previous_hash".into(),
                    ));
                }
                self.first = Some((position, record.previous_hash, record.chain_hash));
            }
            Some((last, last_hash)) => {
                if record.position <= last {
                    return Err(fail(format!(
                        "out of chain order: it comes before position {} in the chain (records swapped or moved?)",
                        last.global_position
                    )));
                }
                if self.manifest.contiguous && record.previous_hash != last_hash {
                    return Err(fail(format!(
                        "does not follow the record before it (position {}): records are missing or out of place",
                        last.global_position
                    )));
                }
            }
        }
        self.last = Some((record.position, record.chain_hash));
        Ok(())
    }

    fn check_manifest(&self, count: u64) -> Result<(), Failure> {
        let manifest = self.manifest;
        let after = self.last_position();
        let fail = |position: Option<i64>, reason: String| Failure {
            position,
            after_position: after,
            location: MANIFEST_FILE.into(),
            reason,
        };
        if count != manifest.count {
            let end = manifest.last_position.map(|p| format!(" (its last position is {p})")).unwrap_or_default();
            return Err(fail(
                None,
                format!("the manifest lists {} records{end}, the file holds {count}", manifest.count),
            ));
        }
        let first = self.first.map(|f| f.0);
        if first != manifest.first_position || self.first.map(|f| f.2) != manifest.first_chain_hash {
            return Err(fail(
                first,
                "the manifest's first_position / first_chain_hash are not the first record's".into(),
            ));
        }
        if after != manifest.last_position || self.last.map(|l| l.1) != manifest.last_chain_hash {
            return Err(fail(after, "the manifest's last_position / last_chain_hash are not the last record's".into()));
        }
        if count == 0 && manifest.first_previous_hash.is_some() {
            return Err(fail(None, "an empty export has no first_previous_hash".into()));
        }
        Ok(())
    }
}

/// A reader that hashes, counts and remembers the last byte of what passes through it, and refuses lines
/// longer than [`RECORD_BYTES_MAX`] (so that no reader above it buffers an unbounded record).
struct HashingReader<R: Read> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    last_byte: Option<u8>,
    line_bytes: usize,
    line_limit: bool,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        Self { inner, hasher: Sha256::new(), bytes: 0, last_byte: None, line_bytes: 0, line_limit: false }
    }

    fn with_line_limit(mut self) -> Self {
        self.line_limit = true;
        self
    }

    /// Reads what is left, then returns `(SHA-256, bytes, last byte)` of the whole input.
    fn finish(mut self) -> std::io::Result<([u8; 32], u64, Option<u8>)> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        Ok((self.hasher.finalize().into(), self.bytes, self.last_byte))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.hasher.update(&buf[..n]);
            self.bytes += n as u64;
            self.last_byte = Some(buf[n - 1]);
            if self.line_limit {
                self.line_bytes = match buf[..n].iter().rposition(|b| *b == b'\n') {
                    Some(end) => n - end - 1,
                    None => self.line_bytes + n,
                };
                if self.line_bytes > RECORD_BYTES_MAX {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("a line is longer than {RECORD_BYTES_MAX} bytes"),
                    ));
                }
            }
        }
        Ok(n)
    }
}

enum Source {
    Jsonl(JsonlRecords),
    Csv(CsvRecords),
    Parquet(ParquetRecords),
}

impl Source {
    fn next(&mut self) -> Option<(String, Result<FileRecord, RecordError>)> {
        match self {
            Source::Jsonl(records) => records.next(),
            Source::Csv(records) => records.next(),
            Source::Parquet(records) => records.next(),
        }
    }

    fn finish(self) -> std::io::Result<([u8; 32], u64, Option<u8>)> {
        match self {
            Source::Jsonl(records) => records.reader.into_inner().finish(),
            Source::Csv(records) => records.reader.into_inner().finish(),
            Source::Parquet(records) => Ok(records.digest),
        }
    }
}

/// A record from the JSON object of its fields: the two hashes taken out, the rest canonicalised.
fn record_from_object(mut object: Map<String, Value>) -> Result<FileRecord, RecordError> {
    let position = object.get("global_position").and_then(Value::as_i64);
    let fail = |reason: String| RecordError::new(position, reason);
    let mut hash = |name: &str| -> Result<ChainHash, RecordError> {
        match object.remove(name) {
            Some(Value::String(text)) => text.parse().map_err(|e| fail(format!("{name}: {e}"))),
            Some(_) => Err(fail(format!("{name} is not a string"))),
            None => Err(fail(format!("{name} is missing"))),
        }
    };
    let previous_hash = hash("previous_hash")?;
    let chain_hash = hash("chain_hash")?;
    if let Some(missing) = EVENT_FIELDS.iter().find(|field| !object.contains_key(**field)) {
        return Err(fail(format!("field {missing} is missing")));
    }
    if object.len() != EVENT_FIELDS.len() {
        let extra = object.keys().find(|key| !EVENT_FIELDS.contains(&key.as_str())).cloned().unwrap_or_default();
        return Err(fail(format!("unexpected field {extra:?}")));
    }
    let global_position = position.ok_or_else(|| fail("global_position is not an integer".into()))?;
    let transaction_id = object
        .get("transaction_id")
        .and_then(Value::as_u64)
        .ok_or_else(|| fail("transaction_id is not an unsigned integer".into()))?;
    Ok(FileRecord {
        position: LogPosition { transaction_id, global_position },
        canonical: canonical_json(&Value::Object(object)),
        previous_hash,
        chain_hash,
    })
}

struct JsonlRecords {
    reader: BufReader<HashingReader<std::fs::File>>,
    name: String,
    line_number: u64,
    line: Vec<u8>,
    done: bool,
}

impl JsonlRecords {
    fn new(file: std::fs::File, name: &str) -> JsonlRecords {
        JsonlRecords {
            reader: BufReader::with_capacity(1 << 20, HashingReader::new(file)),
            name: name.to_string(),
            line_number: 0,
            line: Vec::new(),
            done: false,
        }
    }

    fn next(&mut self) -> Option<(String, Result<FileRecord, RecordError>)> {
        if self.done {
            return None;
        }
        self.line.clear();
        self.line_number += 1;
        let location = format!("{} line {}", self.name, self.line_number);
        let read = (&mut self.reader).take(RECORD_BYTES_MAX as u64 + 1).read_until(b'\n', &mut self.line);
        let result = match read {
            Ok(0) => return None,
            Err(error) => Err(RecordError::new(None, format!("cannot read: {error}"))),
            Ok(_) if self.line.last() != Some(&b'\n') && self.line.len() > RECORD_BYTES_MAX => {
                Err(RecordError::new(None, format!("the line is longer than {RECORD_BYTES_MAX} bytes")))
            }
            Ok(_) if self.line.last() != Some(&b'\n') => {
                Err(RecordError::new(None, "the record is truncated (the file ends inside it)"))
            }
            Ok(_) => match serde_json::from_slice::<Value>(&self.line) {
                Ok(Value::Object(object)) => record_from_object(object),
                Ok(_) => Err(RecordError::new(None, "the line is not a JSON object")),
                Err(error) => Err(RecordError::new(None, format!("the line is not valid JSON: {error}"))),
            },
        };
        if result.is_err() {
            self.done = true;
        }
        Some((location, result))
    }
}

struct CsvRecords {
    reader: csv::Reader<HashingReader<std::fs::File>>,
    name: String,
    record: csv::StringRecord,
    done: bool,
}

impl CsvRecords {
    fn new(file: std::fs::File, name: &str) -> Result<CsvRecords, String> {
        let mut reader =
            csv::ReaderBuilder::new().has_headers(true).from_reader(HashingReader::new(file).with_line_limit());
        let headers = reader.headers().map_err(|e| format!("line 1: not a CSV header: {e}"))?;
        if !headers.iter().eq(CSV_COLUMNS) {
            return Err(format!("line 1: the header is not {}", CSV_COLUMNS.join(",")));
        }
        Ok(CsvRecords { reader, name: name.to_string(), record: csv::StringRecord::new(), done: false })
    }

    fn next(&mut self) -> Option<(String, Result<FileRecord, RecordError>)> {
        if self.done {
            return None;
        }
        let read = self.reader.read_record(&mut self.record);
        let line = self.record.position().map(|p| p.line()).unwrap_or(0);
        let location = format!("{} line {line}", self.name);
        let result = match read {
            Ok(false) => return None,
            Err(error) => {
                let line = error.position().map(|p| p.line()).unwrap_or(line);
                self.done = true;
                return Some((
                    format!("{} line {line}", self.name),
                    Err(RecordError::new(None, format!("malformed CSV record (truncated or edited?): {error}"))),
                ));
            }
            Ok(true) => csv_record(&self.record),
        };
        if result.is_err() {
            self.done = true;
        }
        Some((location, result))
    }
}

fn csv_record(record: &csv::StringRecord) -> Result<FileRecord, RecordError> {
    let field = |i: usize| record.get(i).unwrap_or_default();
    let position = field(0).parse::<i64>().ok();
    let fail = |reason: String| RecordError::new(position, reason);
    let integer = |i: usize| -> Result<Value, RecordError> {
        let text = field(i);
        match (text.parse::<i64>(), text.parse::<u64>()) {
            (Ok(n), _) => Ok(Value::from(n)),
            (_, Ok(n)) => Ok(Value::from(n)),
            _ => Err(fail(format!("{} {text:?} is not an integer", CSV_COLUMNS[i]))),
        }
    };
    let json = |i: usize| -> Result<Value, RecordError> {
        serde_json::from_str(field(i)).map_err(|e| fail(format!("{} is not valid JSON: {e}", CSV_COLUMNS[i])))
    };
    let text = |i: usize| Value::String(field(i).to_string());
    let mut object = Map::new();
    object.insert("global_position".into(), integer(0)?);
    object.insert("transaction_id".into(), integer(1)?);
    object.insert("event_id".into(), text(2));
    object.insert("aggregate_type".into(), text(3));
    object.insert("aggregate_id".into(), text(4));
    object.insert("sequence".into(), integer(5)?);
    object.insert("event_type".into(), text(6));
    object.insert("event_version".into(), text(7));
    object.insert("recorded_at".into(), text(8));
    object.insert("payload".into(), json(9)?);
    object.insert("metadata".into(), json(10)?);
    object.insert("previous_hash".into(), text(11));
    object.insert("chain_hash".into(), text(12));
    record_from_object(object)
}

struct ParquetRecords {
    rows: ParquetRows,
    name: String,
    row: u64,
    digest: ([u8; 32], u64, Option<u8>),
    done: bool,
}

impl ParquetRecords {
    /// Hashes the file, then opens it for reading. `Err(Ok(reason))` is a failure, `Err(Err(_))` an I/O error.
    fn open(path: &Path, name: &str) -> Result<ParquetRecords, Result<String, AuditError>> {
        let file = std::fs::File::open(path).map_err(|e| Err(AuditError::io("cannot read", path)(e)))?;
        let digest = HashingReader::new(file).finish().map_err(|e| Err(AuditError::io("cannot read", path)(e)))?;
        let rows = ParquetRows::open(path).map_err(Ok)?;
        Ok(ParquetRecords { rows, name: name.to_string(), row: 0, digest, done: false })
    }

    fn next(&mut self) -> Option<(String, Result<FileRecord, RecordError>)> {
        if self.done {
            return None;
        }
        self.row += 1;
        let location = format!("{} row {}", self.name, self.row);
        let result = match self.rows.next()? {
            Ok(row) => parquet_record(row),
            Err(reason) => Err(RecordError::new(None, reason)),
        };
        if result.is_err() {
            self.done = true;
        }
        Some((location, result))
    }
}

fn parquet_record(row: super::parquet_file::ParquetRow) -> Result<FileRecord, RecordError> {
    let position = Some(row.global_position);
    let fail = |reason: String| RecordError::new(position, reason);
    let payload: Value =
        serde_json::from_str(&row.payload).map_err(|e| fail(format!("payload is not valid JSON: {e}")))?;
    let metadata: Value =
        serde_json::from_str(&row.metadata).map_err(|e| fail(format!("metadata is not valid JSON: {e}")))?;
    let (symbol, decimals) = derived(&payload);
    if symbol != row.symbol.as_deref() {
        return Err(fail("the symbol column differs from the payload".into()));
    }
    if let Some(k) = (0..decimals.len()).find(|k| decimals[*k] != row.decimals[*k]) {
        return Err(fail(format!("the {} column differs from the payload", DECIMAL_COLUMNS[k])));
    }
    let mut object = Map::new();
    object.insert("global_position".into(), Value::from(row.global_position));
    object.insert("transaction_id".into(), Value::from(row.transaction_id));
    object.insert("event_id".into(), Value::String(row.event_id));
    object.insert("aggregate_type".into(), Value::String(row.aggregate_type));
    object.insert("aggregate_id".into(), Value::String(row.aggregate_id));
    object.insert("sequence".into(), Value::from(row.sequence));
    object.insert("event_type".into(), Value::String(row.event_type));
    object.insert("event_version".into(), Value::String(row.event_version));
    object.insert("recorded_at".into(), Value::String(row.recorded_at));
    object.insert("payload".into(), payload);
    object.insert("metadata".into(), metadata);
    object.insert("previous_hash".into(), Value::String(hex::encode(row.previous_hash)));
    object.insert("chain_hash".into(), Value::String(hex::encode(row.chain_hash)));
    record_from_object(object)
}

/// An intact sealed chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbReport {
    /// Events in the chain.
    pub events: i64,
    pub last_position: Option<i64>,
    pub last_chain_hash: ChainHash,
    pub checkpoints: u64,
    /// Committed events after the sealed head, not sealed yet.
    pub unsealed: i64,
}

impl DbReport {
    /// One line for the terminal.
    pub fn summary(&self) -> String {
        let last = self.last_position.map(|p| format!(" up to position {p}")).unwrap_or_default();
        format!(
            "intact: {} sealed events{last}, chain hash {}, {} checkpoints agree; {} later events not sealed yet",
            self.events, self.last_chain_hash, self.checkpoints, self.unsealed
        )
    }
}

/// Recomputes the chain over the log and compares it with the sealed hashes (see the module docs).
/// `progress` receives `(events checked, events sealed)`.
pub async fn verify_db(pool: &PgPool, progress: ProgressFn<'_>) -> Result<DbReport, AuditError> {
    let total: i64 =
        sqlx::query_scalar("select coalesce(max(chain_index), 0) from audit_chain").fetch_one(pool).await?;
    progress(0, total as u64);
    let mut expected_index = 1i64;
    let mut running = GENESIS_HASH;
    let mut last: Option<LogPosition> = None;
    loop {
        let rows = sqlx::query(
            "select c.chain_index, c.global_position as sealed_position, c.previous_hash, c.chain_hash,
                    e.transaction_id::text as transaction_id_text, e.global_position, e.event_id,
                    e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
                    e.payload, e.metadata, e.recorded_at
               from audit_chain c left join events e on e.global_position = c.global_position
              where c.chain_index >= $1 and c.chain_index <= $2
              order by c.chain_index
              limit $3",
        )
        .bind(expected_index)
        .bind(total)
        .bind(VERIFY_BATCH_SIZE)
        .fetch_all(pool)
        .await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let chain_index: i64 = row.try_get("chain_index")?;
            let sealed_position: i64 = row.try_get("sealed_position")?;
            let location = format!("audit_chain index {chain_index}");
            let after_position = last.map(|p| p.global_position);
            let fail = |reason: String| Failure {
                position: Some(sealed_position),
                after_position,
                location: location.clone(),
                reason,
            };
            if chain_index != expected_index {
                return Err(Failure {
                    position: None,
                    after_position,
                    location: format!("audit_chain index {expected_index}"),
                    reason: format!("chain rows {expected_index}–{} are missing", chain_index - 1),
                }
                .into());
            }
            let previous = hash_column(&row.try_get::<Vec<u8>, _>("previous_hash")?, sealed_position)?;
            let sealed = hash_column(&row.try_get::<Vec<u8>, _>("chain_hash")?, sealed_position)?;
            if previous != running {
                return Err(fail(
                    "the sealed previous hash is not the chain hash before it (the chain was changed)".into(),
                )
                .into());
            }
            if row.try_get::<Option<i64>, _>("global_position")?.is_none() {
                return Err(fail("the sealed event is missing from the log (deleted?)".into()).into());
            }
            let event = decode_event(row)?;
            if last.is_some_and(|last| event.position <= last) {
                return Err(
                    fail("the chain is not in commit order here (the chain or the log was changed)".into()).into()
                );
            }
            let computed = running.next(&canonical_event(&event));
            if computed != sealed {
                return Err(fail(
                    "the event does not hash to its sealed chain hash: the event (or the sealed hash) was changed after sealing".into(),
                )
                .into());
            }
            running = sealed;
            last = Some(event.position);
            expected_index += 1;
        }
        progress((expected_index - 1) as u64, total as u64);
    }
    if expected_index - 1 != total {
        return Err(Failure {
            position: None,
            after_position: last.map(|p| p.global_position),
            location: format!("audit_chain index {expected_index}"),
            reason: format!("chain rows {expected_index}–{total} are missing"),
        }
        .into());
    }
    let head = last.unwrap_or(LogPosition::START);
    check_nothing_slipped_in(pool, head).await?;
    let checkpoints = check_checkpoints(pool).await?;
    let cursor = load_cursor(pool, SEALER_NAME).await?;
    // The cursor is saved with the chain rows, so it is never behind them (it may be ahead: a running sealer).
    if cursor < head {
        return Err(AuditError::Chain(format!("the sealer's cursor is at {cursor}, behind the chain's end at {head}")));
    }
    let unsealed: i64 = sqlx::query_scalar(
        "select count(*) from events where (transaction_id, global_position) > ($1::text::xid8, $2)",
    )
    .bind(head.transaction_id.to_string())
    .bind(head.global_position)
    .fetch_one(pool)
    .await?;
    Ok(DbReport {
        events: total,
        last_position: last.map(|p| p.global_position),
        last_chain_hash: running,
        checkpoints,
        unsealed,
    })
}

/// Fails when an event lies in the sealed part of the log (at or before its head) but is not in the chain.
async fn check_nothing_slipped_in(pool: &PgPool, head: LogPosition) -> Result<(), AuditError> {
    let slipped: Option<i64> = sqlx::query_scalar(
        "select e.global_position from events e
          where (e.transaction_id, e.global_position) <= ($1::text::xid8, $2)
            and not exists (select 1 from audit_chain c where c.global_position = e.global_position)
          order by e.transaction_id, e.global_position
          limit 1",
    )
    .bind(head.transaction_id.to_string())
    .bind(head.global_position)
    .fetch_optional(pool)
    .await?;
    match slipped {
        Some(position) => Err(Failure {
            position: Some(position),
            after_position: None,
            location: "events".into(),
            reason: "the event lies in the sealed part of the log but is not in the chain (inserted after sealing)"
                .into(),
        }
        .into()),
        None => Ok(()),
    }
}

/// Every checkpoint must name a chain row with the same position and hash. Returns how many there are.
async fn check_checkpoints(pool: &PgPool) -> Result<u64, AuditError> {
    /// `(event_count, position, transaction id, hash)` of a checkpoint and `(position, hash)` of its chain row.
    type CheckpointRow = (i64, i64, String, Vec<u8>, Option<i64>, Option<Vec<u8>>);
    let rows: Vec<CheckpointRow> = sqlx::query_as(
        "select k.event_count, k.global_position, k.transaction_id::text, k.chain_hash, c.global_position, c.chain_hash
           from audit_checkpoints k left join audit_chain c on c.chain_index = k.event_count
          order by k.event_count",
    )
    .fetch_all(pool)
    .await?;
    for (count, position, transaction_id, hash, sealed_position, sealed_hash) in &rows {
        parse_xid8(transaction_id)?;
        if Some(*position) != *sealed_position || Some(hash) != sealed_hash.as_ref() {
            return Err(Failure {
                position: Some(*position),
                after_position: None,
                location: format!("audit_checkpoints event_count {count}"),
                reason: "the checkpoint does not match the chain at that point".into(),
            }
            .into());
        }
    }
    Ok(rows.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_line_is_refused_not_buffered() {
        let endless = vec![b'x'; RECORD_BYTES_MAX + 10];
        let mut reader = HashingReader::new(&endless[..]).with_line_limit();
        let error = std::io::copy(&mut reader, &mut std::io::sink()).unwrap_err();
        assert!(error.to_string().contains("longer than"), "{error}");
        let mut lines = vec![b'x'; RECORD_BYTES_MAX - 1];
        lines.push(b'\n');
        lines.extend_from_slice(&lines.clone());
        let (_, bytes, last) = HashingReader::new(&lines[..]).with_line_limit().finish().unwrap();
        assert_eq!((bytes, last), (lines.len() as u64, Some(b'\n')));
    }

    #[test]
    fn failures_name_the_position_or_what_came_before() {
        let at =
            Failure { position: Some(7), after_position: Some(6), location: "f line 7".into(), reason: "r".into() };
        assert_eq!(at.to_string(), "verification failed at position 7 (f line 7): r");
        let after = Failure { position: None, ..at.clone() };
        assert_eq!(after.to_string(), "verification failed after position 6 (f line 7): r");
        assert_eq!(Failure::manifest("m").to_string(), "verification failed (manifest.json): m");
    }
}
