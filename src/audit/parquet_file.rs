//! The Parquet form of an export: typed columns, written and read row group by row group.
//!
//! Every field of the canonical event is a column of its natural type — positions and sequences as integers,
//! `transaction_id` as an unsigned 64-bit integer (xid8), `recorded_at` as a UTC timestamp in microseconds
//! (PostgreSQL's precision, so nothing is lost), payload and metadata as their canonical JSON text, hashes as
//! 32-byte binaries — so the chain can be recomputed from the file alone. Four business amounts found at the
//! top of most payloads (`quantity`, `price`, `fee`, `amount`) and the `symbol` are repeated as typed columns
//! (decimal(38, 18)) for analysis tools; they are derived from the payload, which stays authoritative, and are
//! null when the payload has no such field or its value does not fit decimal(38, 18) exactly. `verify`
//! checks them against the payload too, since they are not part of the hash.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{
    Decimal128Builder, FixedSizeBinaryBuilder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow_array::{
    Array, ArrayRef, Decimal128Array, FixedSizeBinaryArray, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rust_decimal::Decimal;
use serde_json::Value;

use super::canonical::{format_recorded_at, write_canonical};
use super::sealed::SealedEvent;
use super::AuditError;

/// Rows per Arrow batch handed to the Parquet writer (and read back by `verify`).
pub const PARQUET_BATCH_ROWS: usize = 8_192;
/// Rows per row group: the writer buffers one row group, so this bounds its memory.
pub const PARQUET_ROW_GROUP_ROWS_MAX: usize = 65_536;
/// Bytes per row group, whichever limit comes first.
pub const PARQUET_ROW_GROUP_BYTES_MAX: usize = 64 << 20;
/// Precision and scale of the decimal columns: 20 integer digits (money is at most 10^15) and 18 decimals
/// (a quantity × price has at most 16).
pub const DECIMAL_PRECISION: u8 = 38;
pub const DECIMAL_SCALE: i8 = 18;
/// The payload fields repeated as decimal columns.
pub const DECIMAL_COLUMNS: [&str; 4] = ["quantity", "price", "fee", "amount"];

/// The export's Arrow schema.
pub fn schema() -> SchemaRef {
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    let hash = |name: &str| Field::new(name, DataType::FixedSizeBinary(32), false);
    let decimal = |name: &str| Field::new(name, DataType::Decimal128(DECIMAL_PRECISION, DECIMAL_SCALE), true);
    Arc::new(Schema::new(vec![
        Field::new("global_position", DataType::Int64, false),
        Field::new("transaction_id", DataType::UInt64, false),
        text("event_id"),
        text("aggregate_type"),
        text("aggregate_id"),
        Field::new("sequence", DataType::Int64, false),
        text("event_type"),
        text("event_version"),
        Field::new("recorded_at", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
        text("payload"),
        text("metadata"),
        hash("previous_hash"),
        hash("chain_hash"),
        Field::new("symbol", DataType::Utf8, true),
        decimal(DECIMAL_COLUMNS[0]),
        decimal(DECIMAL_COLUMNS[1]),
        decimal(DECIMAL_COLUMNS[2]),
        decimal(DECIMAL_COLUMNS[3]),
    ]))
}

/// The fields derived from a payload: its `symbol` and the decimal columns (as decimal(38, 18) integers).
/// Payloads are externally tagged (`{"CashDeposited": {…}}`): the fields are looked up in the inner object.
pub fn derived(payload: &Value) -> (Option<&str>, [Option<i128>; 4]) {
    let body = match payload.as_object() {
        Some(outer) if outer.len() == 1 => outer.values().next().and_then(Value::as_object).unwrap_or(outer),
        Some(outer) => outer,
        None => return (None, [None; 4]),
    };
    let symbol = body.get("symbol").and_then(Value::as_str);
    let decimals = DECIMAL_COLUMNS.map(|name| body.get(name).and_then(Value::as_str).and_then(decimal_128));
    (symbol, decimals)
}

/// A decimal string as an integer scaled by 10^18, when it fits decimal(38, 18) exactly.
fn decimal_128(text: &str) -> Option<i128> {
    let mut value: Decimal = text.parse().ok()?;
    if value.scale() > DECIMAL_SCALE as u32 {
        value = value.normalize();
    }
    let scale = value.scale();
    if scale > DECIMAL_SCALE as u32 {
        return None;
    }
    let scaled = value.mantissa().checked_mul(10i128.checked_pow(DECIMAL_SCALE as u32 - scale)?)?;
    (scaled.unsigned_abs() < 10u128.pow(DECIMAL_PRECISION as u32)).then_some(scaled)
}

struct Builders {
    global_position: Int64Builder,
    transaction_id: UInt64Builder,
    event_id: StringBuilder,
    aggregate_type: StringBuilder,
    aggregate_id: StringBuilder,
    sequence: Int64Builder,
    event_type: StringBuilder,
    event_version: StringBuilder,
    recorded_at: TimestampMicrosecondBuilder,
    payload: StringBuilder,
    metadata: StringBuilder,
    previous_hash: FixedSizeBinaryBuilder,
    chain_hash: FixedSizeBinaryBuilder,
    symbol: StringBuilder,
    decimals: [Decimal128Builder; 4],
}

impl Builders {
    fn new() -> Builders {
        let decimal = || {
            Decimal128Builder::new()
                .with_precision_and_scale(DECIMAL_PRECISION, DECIMAL_SCALE)
                .unwrap_or_else(|_| Decimal128Builder::new())
        };
        Builders {
            global_position: Int64Builder::new(),
            transaction_id: UInt64Builder::new(),
            event_id: StringBuilder::new(),
            aggregate_type: StringBuilder::new(),
            aggregate_id: StringBuilder::new(),
            sequence: Int64Builder::new(),
            event_type: StringBuilder::new(),
            event_version: StringBuilder::new(),
            recorded_at: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            payload: StringBuilder::new(),
            metadata: StringBuilder::new(),
            previous_hash: FixedSizeBinaryBuilder::new(32),
            chain_hash: FixedSizeBinaryBuilder::new(32),
            symbol: StringBuilder::new(),
            decimals: [decimal(), decimal(), decimal(), decimal()],
        }
    }

    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, AuditError> {
        let [d0, d1, d2, d3] = &mut self.decimals;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.global_position.finish()),
            Arc::new(self.transaction_id.finish()),
            Arc::new(self.event_id.finish()),
            Arc::new(self.aggregate_type.finish()),
            Arc::new(self.aggregate_id.finish()),
            Arc::new(self.sequence.finish()),
            Arc::new(self.event_type.finish()),
            Arc::new(self.event_version.finish()),
            Arc::new(self.recorded_at.finish()),
            Arc::new(self.payload.finish()),
            Arc::new(self.metadata.finish()),
            Arc::new(self.previous_hash.finish()),
            Arc::new(self.chain_hash.finish()),
            Arc::new(self.symbol.finish()),
            Arc::new(d0.finish()),
            Arc::new(d1.finish()),
            Arc::new(d2.finish()),
            Arc::new(d3.finish()),
        ];
        Ok(RecordBatch::try_new(schema.clone(), columns)?)
    }
}

/// Writes records as Parquet, [`PARQUET_BATCH_ROWS`] at a time.
pub struct ParquetSink<W: Write + Send> {
    writer: ArrowWriter<W>,
    schema: SchemaRef,
    builders: Builders,
    rows: usize,
    json: Vec<u8>,
}

impl<W: Write + Send> ParquetSink<W> {
    pub fn new(out: W) -> Result<ParquetSink<W>, AuditError> {
        let schema = schema();
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(PARQUET_ROW_GROUP_ROWS_MAX))
            .set_max_row_group_bytes(Some(PARQUET_ROW_GROUP_BYTES_MAX))
            .set_created_by(format!("ledger {} (audit export)", env!("CARGO_PKG_VERSION")))
            .build();
        let writer = ArrowWriter::try_new(out, schema.clone(), Some(properties))?;
        Ok(ParquetSink { writer, schema, builders: Builders::new(), rows: 0, json: Vec::new() })
    }

    pub fn write(&mut self, record: &SealedEvent) -> Result<(), AuditError> {
        let event = &record.event;
        let b = &mut self.builders;
        b.global_position.append_value(event.position.global_position);
        b.transaction_id.append_value(event.position.transaction_id);
        b.event_id.append_value(event.event_id.to_string());
        b.aggregate_type.append_value(&event.aggregate_type);
        b.aggregate_id.append_value(&event.aggregate_id);
        b.sequence.append_value(event.sequence);
        b.event_type.append_value(&event.event_type);
        b.event_version.append_value(&event.event_version);
        b.recorded_at.append_value(event.recorded_at.timestamp_micros());
        self.json.clear();
        write_canonical(&event.payload, &mut self.json);
        b.payload.append_value(std::str::from_utf8(&self.json).unwrap_or_default());
        self.json.clear();
        write_canonical(&event.metadata, &mut self.json);
        b.metadata.append_value(std::str::from_utf8(&self.json).unwrap_or_default());
        b.previous_hash.append_value(record.previous_hash.0)?;
        b.chain_hash.append_value(record.chain_hash.0)?;
        let (symbol, decimals) = derived(&event.payload);
        b.symbol.append_option(symbol);
        for (builder, value) in b.decimals.iter_mut().zip(decimals) {
            builder.append_option(value);
        }
        self.rows += 1;
        if self.rows == PARQUET_BATCH_ROWS {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), AuditError> {
        if self.rows > 0 {
            let batch = self.builders.finish(&self.schema)?;
            self.writer.write(&batch)?;
            self.rows = 0;
        }
        Ok(())
    }

    /// Writes the last rows and the footer; returns the output.
    pub fn finish(mut self) -> Result<W, AuditError> {
        self.flush_batch()?;
        Ok(self.writer.into_inner()?)
    }
}

/// One row of a Parquet export, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct ParquetRow {
    pub global_position: i64,
    pub transaction_id: u64,
    pub event_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    /// In the canonical text form (`RECORDED_AT_FORMAT`).
    pub recorded_at: String,
    pub payload: String,
    pub metadata: String,
    pub previous_hash: [u8; 32],
    pub chain_hash: [u8; 32],
    pub symbol: Option<String>,
    pub decimals: [Option<i128>; 4],
}

/// Reads a Parquet export row by row (one decoded batch in memory at a time).
pub struct ParquetRows {
    reader: ParquetRecordBatchReader,
    batch: Option<RecordBatch>,
    row: usize,
}

impl ParquetRows {
    /// Opens `path` and checks that its schema is the export schema. Errors are reasons for a failure.
    pub fn open(path: &Path) -> Result<ParquetRows, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
        let builder = decoding(|| ParquetRecordBatchReaderBuilder::try_new(file))?
            .map_err(|e| format!("not a readable Parquet file (truncated or damaged?): {e}"))?;
        let expected = schema();
        let found = builder.schema();
        let matches = found.fields().len() == expected.fields().len()
            && found.fields().iter().zip(expected.fields()).all(|(f, e)| {
                f.name() == e.name() && f.data_type() == e.data_type() && f.is_nullable() == e.is_nullable()
            });
        if !matches {
            return Err(format!("the Parquet schema is not the export schema: {found}"));
        }
        let reader = builder
            .with_batch_size(PARQUET_BATCH_ROWS)
            .build()
            .map_err(|e| format!("not a readable Parquet file: {e}"))?;
        Ok(ParquetRows { reader, batch: None, row: 0 })
    }

    /// The next row; `Err` (once) when the file cannot be decoded further.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<ParquetRow, String>> {
        loop {
            if let Some(batch) = &self.batch {
                if self.row < batch.num_rows() {
                    let row = read_row(batch, self.row);
                    self.row += 1;
                    return Some(row);
                }
            }
            let next = match decoding(|| self.reader.next()) {
                Ok(next) => next?,
                Err(reason) => return Some(Err(reason)),
            };
            match next {
                Ok(batch) => {
                    self.batch = Some(batch);
                    self.row = 0;
                }
                Err(error) => return Some(Err(format!("the Parquet data cannot be decoded: {error}"))),
            }
        }
    }
}

/// Runs a step of the Parquet decoder, turning a panic on damaged input (the file is the user's input) into
/// a failure reason instead of a crash.
fn decoding<T>(step: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(step))
        .map_err(|_| "the Parquet data cannot be decoded (the decoder gave up on damaged data)".to_string())
}

fn column<T: 'static>(batch: &RecordBatch, index: usize) -> Result<&T, String> {
    batch
        .column(index)
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| format!("column {} has an unexpected type", batch.schema().field(index).name()))
}

fn required<A: Array>(array: &A, row: usize, name: &str) -> Result<(), String> {
    if array.is_null(row) {
        return Err(format!("{name} is null"));
    }
    Ok(())
}

fn read_row(batch: &RecordBatch, row: usize) -> Result<ParquetRow, String> {
    let int64 = |i: usize, name: &str| -> Result<i64, String> {
        let array = column::<Int64Array>(batch, i)?;
        required(array, row, name)?;
        Ok(array.value(row))
    };
    let text = |i: usize, name: &str| -> Result<String, String> {
        let array = column::<StringArray>(batch, i)?;
        required(array, row, name)?;
        Ok(array.value(row).to_string())
    };
    let hash = |i: usize, name: &str| -> Result<[u8; 32], String> {
        let array = column::<FixedSizeBinaryArray>(batch, i)?;
        required(array, row, name)?;
        array.value(row).try_into().map_err(|_| format!("{name} is not 32 bytes"))
    };
    let transaction_id = {
        let array = column::<UInt64Array>(batch, 1)?;
        required(array, row, "transaction_id")?;
        array.value(row)
    };
    let recorded_at = {
        let array = column::<TimestampMicrosecondArray>(batch, 8)?;
        required(array, row, "recorded_at")?;
        let micros = array.value(row);
        let at = chrono::DateTime::from_timestamp_micros(micros)
            .ok_or_else(|| format!("recorded_at {micros} µs is out of range"))?;
        format_recorded_at(&at)
    };
    let symbol = {
        let array = column::<StringArray>(batch, 13)?;
        (!array.is_null(row)).then(|| array.value(row).to_string())
    };
    let mut decimals = [None; 4];
    for (k, slot) in decimals.iter_mut().enumerate() {
        let array = column::<Decimal128Array>(batch, 14 + k)?;
        *slot = (!array.is_null(row)).then(|| array.value(row));
    }
    Ok(ParquetRow {
        global_position: int64(0, "global_position")?,
        transaction_id,
        event_id: text(2, "event_id")?,
        aggregate_type: text(3, "aggregate_type")?,
        aggregate_id: text(4, "aggregate_id")?,
        sequence: int64(5, "sequence")?,
        event_type: text(6, "event_type")?,
        event_version: text(7, "event_version")?,
        recorded_at,
        payload: text(9, "payload")?,
        metadata: text(10, "metadata")?,
        previous_hash: hash(11, "previous_hash")?,
        chain_hash: hash(12, "chain_hash")?,
        symbol,
        decimals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn amounts_become_exact_decimals_or_null() {
        let payload = json!({"ExecutionApplied": {"symbol": "ACME", "quantity": "4", "price": "99.5", "fee": "0.25"}});
        let (symbol, decimals) = derived(&payload);
        assert_eq!(symbol, Some("ACME"));
        let e18 = 10i128.pow(18);
        assert_eq!(decimals, [Some(4 * e18), Some(995 * e18 / 10), Some(e18 / 4), None]);
        // More than 18 decimals that are not trailing zeros, or more than 20 integer digits: null, not rounded.
        assert_eq!(decimal_128("0.1234567890123456789"), None);
        assert_eq!(decimal_128("1.5000000000000000000000"), Some(15 * e18 / 10));
        assert_eq!(decimal_128("123456789012345678901"), None);
        assert_eq!(decimal_128("-2500.00"), Some(-2500 * e18));
        assert_eq!(decimal_128("12abc"), None);
        assert_eq!(derived(&json!({})), (None, [None; 4]));
        assert_eq!(derived(&json!("x")), (None, [None; 4]));
    }
}
