//! Exports of the sealed chain: one data file (JSON Lines, CSV or Parquet) and `manifest.json`.
//!
//! Memory stays bounded whatever the export's size: the database is read in batches of
//! [`EXPORT_BATCH_SIZE`](super::sealed::EXPORT_BATCH_SIZE) events, at most [`BATCHES_IN_FLIGHT_MAX`] batches
//! wait for the writer (a blocking thread, so that reading and writing overlap on two cores), Parquet row
//! groups are capped, and the file's SHA-256 is computed as the bytes go out. Nothing holds the whole export.
//!
//! Every record carries its position, previous hash and chain hash, so one record can be checked alone
//! (`SHA-256(previous ‖ canonical bytes) = chain hash`) and consecutive records link (`previous = chain hash of
//! the record before`). The data file is written first and the manifest last; a failed export removes its
//! partial file and leaves no manifest.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::Stream;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::canonical::{event_fields, format_recorded_at, write_canonical, write_object, ChainHash, Field};
use super::filter::ExportFilter;
use super::manifest::{ExportFormat, FileEntry, Manifest, MANIFEST_FILE, MANIFEST_VERSION};
use super::parquet_file::ParquetSink;
use super::sealed::{SealedEvent, SealedReader};
use super::{AuditError, ProgressFn};

/// Batches read from the database but not yet written.
pub const BATCHES_IN_FLIGHT_MAX: usize = 2;
/// Write buffer of the data file.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// The columns of a CSV export, in order (also the header row).
pub const CSV_COLUMNS: [&str; 13] = [
    "global_position",
    "transaction_id",
    "event_id",
    "aggregate_type",
    "aggregate_id",
    "sequence",
    "event_type",
    "event_version",
    "recorded_at",
    "payload",
    "metadata",
    "previous_hash",
    "chain_hash",
];

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub format: ExportFormat,
    pub out_dir: PathBuf,
    pub filter: ExportFilter,
}

/// Writes the export of the sealed chain (as sealed when it starts) described by `options`; returns its
/// manifest. Call [`seal_until_head`](super::seal_until_head) first to include everything committed so far.
/// `progress` receives `(records written, records selected)`.
pub async fn export(pool: &PgPool, options: &ExportOptions, progress: ProgressFn<'_>) -> Result<Manifest, AuditError> {
    options.filter.validate()?;
    let data_path = prepare_directory(&options.out_dir, options.format)?;
    let result = write_export(pool, options, &data_path, progress).await;
    if result.is_err() {
        let _ = std::fs::remove_file(&data_path);
    }
    result
}

async fn write_export(
    pool: &PgPool,
    options: &ExportOptions,
    data_path: &Path,
    progress: ProgressFn<'_>,
) -> Result<Manifest, AuditError> {
    let mut reader = SealedReader::new(pool.clone(), options.filter.clone()).await?;
    let total = reader.count().await?;
    progress(0, total);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(data_path)
        .map_err(AuditError::io("cannot open the export file", data_path))?;
    let format = options.format;
    let path = data_path.to_path_buf();
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Vec<SealedEvent>>(BATCHES_IN_FLIGHT_MAX);
    let writer = tokio::task::spawn_blocking(move || -> Result<FileSummary, AuditError> {
        let mut sink = RecordSink::new(format, HashingWriter::new(BufWriter::with_capacity(WRITE_BUFFER_BYTES, file)))?;
        let mut summary = FileSummary::default();
        while let Some(batch) = receiver.blocking_recv() {
            for record in &batch {
                sink.write(record)?;
                summary.add(record);
            }
        }
        let hashing = sink.finish()?;
        let (digest, bytes, buffered) = hashing.finish();
        let file = buffered.into_inner().map_err(|e| AuditError::io("cannot write", &path)(e.into_error()))?;
        file.sync_all().map_err(AuditError::io("cannot write", &path))?;
        summary.sha256 = hex::encode(digest);
        summary.bytes = bytes;
        Ok(summary)
    });

    let mut written = 0u64;
    let read_result: Result<(), AuditError> = async {
        loop {
            let batch = reader.next_batch().await?;
            if batch.is_empty() {
                return Ok(());
            }
            let count = batch.len() as u64;
            if sender.send(batch).await.is_err() {
                return Ok(()); // the writer stopped: its error is reported below
            }
            written += count;
            progress(written, total.max(written));
        }
    }
    .await;
    drop(sender);
    let summary = writer.await.map_err(|e| AuditError::Invalid(format!("export writer failed: {e}")))?;
    read_result?;
    let summary = summary?;
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        tool: "ledger".into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        chain_version: super::canonical::CHAIN_VERSION,
        hash_algorithm: "sha256".into(),
        format,
        filters: options.filter.clone(),
        exported_at: chrono::Utc::now(),
        sealed_event_count: reader.sealed_event_count(),
        count: summary.records,
        first_position: summary.first.map(|r| r.0),
        last_position: summary.last.map(|r| r.0),
        first_previous_hash: summary.first.map(|r| r.1),
        first_chain_hash: summary.first.map(|r| r.2),
        last_chain_hash: summary.last.map(|r| r.2),
        contiguous: summary.contiguous,
        files: vec![FileEntry {
            name: format.file_name().into(),
            records: summary.records,
            bytes: summary.bytes,
            sha256: summary.sha256,
        }],
    };
    manifest.write(&options.out_dir)?;
    Ok(manifest)
}

/// Creates the directory if needed and the (empty) data file; refuses a directory that already holds an
/// export, so that one export never overwrites another.
fn prepare_directory(dir: &Path, format: ExportFormat) -> Result<PathBuf, AuditError> {
    if dir.exists() && !dir.is_dir() {
        return Err(AuditError::Invalid(format!("--out {} exists and is not a directory", dir.display())));
    }
    std::fs::create_dir_all(dir).map_err(AuditError::io("cannot create the export directory", dir))?;
    if dir.join(MANIFEST_FILE).exists() {
        return Err(AuditError::Invalid(format!(
            "{} already holds an export ({MANIFEST_FILE}); choose a new directory",
            dir.display()
        )));
    }
    let path = dir.join(format.file_name());
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(_) => Ok(path),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Err(AuditError::Invalid(format!(
            "{} already exists (a previous export?); choose a new directory",
            path.display()
        ))),
        Err(error) => Err(AuditError::io("cannot create the export file", path)(error)),
    }
}

/// What the writer saw: count, first and last `(position, previous hash, chain hash)`, contiguity.
#[derive(Default)]
struct FileSummary {
    records: u64,
    first: Option<(i64, ChainHash, ChainHash)>,
    last: Option<(i64, ChainHash, ChainHash)>,
    contiguous: bool,
    sha256: String,
    bytes: u64,
}

impl FileSummary {
    fn add(&mut self, record: &SealedEvent) {
        let entry = (record.event.position.global_position, record.previous_hash, record.chain_hash);
        match self.last {
            None => {
                self.first = Some(entry);
                self.contiguous = true;
            }
            Some(last) => self.contiguous &= record.previous_hash == last.2,
        }
        self.last = Some(entry);
        self.records += 1;
    }
}

/// Appends one JSON Lines record: the canonical object of the event's fields plus `previous_hash` and
/// `chain_hash` (hex), and a newline. The line is itself in canonical form.
pub fn jsonl_line(record: &SealedEvent, out: &mut Vec<u8>) {
    let event_id = record.event.event_id.to_string();
    let recorded_at = format_recorded_at(&record.event.recorded_at);
    let previous = record.previous_hash.to_hex();
    let chain = record.chain_hash.to_hex();
    let [f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10] = event_fields(&record.event, &event_id, &recorded_at);
    let mut fields = [
        f0,
        f1,
        f2,
        f3,
        f4,
        f5,
        f6,
        f7,
        f8,
        f9,
        f10,
        ("previous_hash", Field::Str(&previous)),
        ("chain_hash", Field::Str(&chain)),
    ];
    write_object(&mut fields, out);
    out.push(b'\n');
}

/// The JSON Lines export of the sealed events selected by `filter`, as a stream of byte chunks (one chunk per
/// batch of events, in chain order) — the same lines `ledger export --format jsonl` writes, for serving
/// `GET /audit/export` without holding the export in memory. The filter is checked before the stream is
/// returned ([`AuditError::is_user_error`] tells a bad request from a server error). Only sealed events are
/// included: run the sealer or call [`seal_until_head`](super::seal_until_head) first. Each chunk is read
/// when the consumer polls for it, so a slow client slows the reads down rather than filling memory.
pub async fn jsonl_stream(
    pool: PgPool,
    filter: ExportFilter,
) -> Result<impl Stream<Item = Result<Bytes, AuditError>> + Send + 'static, AuditError> {
    let reader = SealedReader::new(pool, filter).await?;
    Ok(futures::stream::try_unfold(reader, |mut reader| async move {
        let batch = reader.next_batch().await?;
        if batch.is_empty() {
            return Ok(None);
        }
        let mut chunk = Vec::with_capacity(batch.len() * 700);
        for record in &batch {
            jsonl_line(record, &mut chunk);
        }
        Ok(Some((Bytes::from(chunk), reader)))
    }))
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// Flushes and returns `(SHA-256, bytes written, inner writer)`.
    pub fn finish(mut self) -> ([u8; 32], u64, W) {
        let _ = self.inner.flush();
        (self.hasher.finalize().into(), self.bytes, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

type FileWriter = HashingWriter<BufWriter<std::fs::File>>;

/// The format-specific writer of records.
enum RecordSink {
    Jsonl { out: FileWriter, line: Vec<u8> },
    Csv { out: Box<csv::Writer<FileWriter>>, payload: Vec<u8>, metadata: Vec<u8> },
    Parquet(Box<ParquetSink<FileWriter>>),
}

impl RecordSink {
    fn new(format: ExportFormat, out: FileWriter) -> Result<RecordSink, AuditError> {
        Ok(match format {
            ExportFormat::Jsonl => RecordSink::Jsonl { out, line: Vec::with_capacity(4096) },
            ExportFormat::Csv => {
                let mut writer = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(out);
                writer.write_record(CSV_COLUMNS)?;
                RecordSink::Csv { out: Box::new(writer), payload: Vec::new(), metadata: Vec::new() }
            }
            ExportFormat::Parquet => RecordSink::Parquet(Box::new(ParquetSink::new(out)?)),
        })
    }

    fn write(&mut self, record: &SealedEvent) -> Result<(), AuditError> {
        match self {
            RecordSink::Jsonl { out, line } => {
                line.clear();
                jsonl_line(record, line);
                out.write_all(line).map_err(|e| AuditError::io("cannot write", "the JSON Lines file")(e))
            }
            RecordSink::Csv { out, payload, metadata } => {
                let event = &record.event;
                payload.clear();
                write_canonical(&event.payload, payload);
                metadata.clear();
                write_canonical(&event.metadata, metadata);
                out.write_record([
                    event.position.global_position.to_string().as_bytes(),
                    event.position.transaction_id.to_string().as_bytes(),
                    event.event_id.to_string().as_bytes(),
                    event.aggregate_type.as_bytes(),
                    event.aggregate_id.as_bytes(),
                    event.sequence.to_string().as_bytes(),
                    event.event_type.as_bytes(),
                    event.event_version.as_bytes(),
                    format_recorded_at(&event.recorded_at).as_bytes(),
                    payload,
                    metadata,
                    record.previous_hash.to_hex().as_bytes(),
                    record.chain_hash.to_hex().as_bytes(),
                ])?;
                Ok(())
            }
            RecordSink::Parquet(sink) => sink.write(record),
        }
    }

    fn finish(self) -> Result<FileWriter, AuditError> {
        match self {
            RecordSink::Jsonl { out, .. } => Ok(out),
            RecordSink::Csv { out, .. } => {
                out.into_inner().map_err(|e| AuditError::io("cannot write", "the CSV file")(e.into_error()))
            }
            RecordSink::Parquet(sink) => sink.finish(),
        }
    }
}
