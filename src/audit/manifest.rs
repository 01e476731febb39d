//! `manifest.json`: what an export holds and how to check it — written last, so its presence means the data
//! file is complete.
//!
//! The manifest is not signed: it catches accidents and edits of the data file alone. Its `last_chain_hash`
//! is what ties an export to the database (`audit_chain`) or to a checkpoint published elsewhere; an auditor
//! compares it there to rule out an export rewritten together with its manifest.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::canonical::ChainHash;
use super::filter::ExportFilter;
use super::AuditError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Jsonl,
    Csv,
    Parquet,
}

impl ExportFormat {
    pub const ALL: [ExportFormat; 3] = [ExportFormat::Jsonl, ExportFormat::Csv, ExportFormat::Parquet];

    /// The data file's name in the export directory.
    pub fn file_name(self) -> &'static str {
        match self {
            ExportFormat::Jsonl => "events.jsonl",
            ExportFormat::Csv => "events.csv",
            ExportFormat::Parquet => "events.parquet",
        }
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExportFormat::Jsonl => "jsonl",
            ExportFormat::Csv => "csv",
            ExportFormat::Parquet => "parquet",
        })
    }
}

impl FromStr for ExportFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "jsonl" => Ok(ExportFormat::Jsonl),
            "csv" => Ok(ExportFormat::Csv),
            "parquet" => Ok(ExportFormat::Parquet),
            _ => Err(format!("{s:?} is not an export format (jsonl, csv or parquet)")),
        }
    }
}

/// The first thing that does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Failure {
    /// The global position of the failing record, when it could be read.
    pub position: Option<i64>,
    /// The position of the last record that verified before it.
    pub after_position: Option<i64>,
    /// Where: `events.jsonl line 7`, `manifest.json`, `audit_chain index 7`…
    pub location: String,
    pub reason: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.position, self.after_position) {
            (Some(position), _) => write!(f, "verification failed at position {position}")?,
            (None, Some(after)) => write!(f, "verification failed after position {after}")?,
            (None, None) => write!(f, "verification failed")?,
        }
        write!(f, " ({}): {}", self.location, self.reason)
    }
}

impl Failure {
    /// A failure of the manifest itself (no record position).
    pub(crate) fn manifest(reason: impl Into<String>) -> Failure {
        Failure { position: None, after_position: None, location: MANIFEST_FILE.into(), reason: reason.into() }
    }
}

/// The manifest's file name inside an export directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Version of the manifest's shape.
pub const MANIFEST_VERSION: u32 = 1;
/// A manifest larger than this is not ours (bounds what `verify` reads into memory).
pub const MANIFEST_BYTES_MAX: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub manifest_version: u32,
    /// `ledger`.
    pub tool: String,
    /// The version of the tool that exported (`CARGO_PKG_VERSION`).
    pub tool_version: String,
    /// Version of the canonical form and chain rule (docs/audit.md).
    pub chain_version: u32,
    /// `sha256` (of the chain and of the files).
    pub hash_algorithm: String,
    pub format: ExportFormat,
    pub filters: ExportFilter,
    pub exported_at: DateTime<Utc>,
    /// Length of the sealed chain the export was taken from.
    pub sealed_event_count: i64,
    /// Records in the export.
    pub count: u64,
    pub first_position: Option<i64>,
    pub last_position: Option<i64>,
    /// The previous hash of the first record (the chain hash of the event before it, zeros at the start).
    pub first_previous_hash: Option<ChainHash>,
    pub first_chain_hash: Option<ChainHash>,
    pub last_chain_hash: Option<ChainHash>,
    /// True when every record follows the one before it in the chain (always so without an aggregate,
    /// portfolio or time filter); `verify` then also requires every link.
    pub contiguous: bool,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// A plain file name in the export directory.
    pub name: String,
    pub records: u64,
    pub bytes: u64,
    /// SHA-256 of the file's bytes, lowercase hex.
    pub sha256: String,
}

impl Manifest {
    /// Reads `dir/manifest.json`. A missing manifest is the caller's error (not an export directory); one that
    /// cannot be read as a manifest is a verification failure.
    pub fn read(dir: &Path) -> Result<Manifest, AuditError> {
        let path = dir.join(MANIFEST_FILE);
        if !dir.is_dir() {
            return Err(AuditError::Invalid(format!("{} is not a directory", dir.display())));
        }
        let metadata = match std::fs::metadata(&path) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(AuditError::Invalid(format!(
                    "{} has no {MANIFEST_FILE}: not an export directory, or its manifest was removed",
                    dir.display()
                )))
            }
            Err(error) => return Err(AuditError::io("cannot read", &path)(error)),
        };
        if metadata.len() > MANIFEST_BYTES_MAX {
            return Err(Failure::manifest(format!("{MANIFEST_FILE} is larger than {MANIFEST_BYTES_MAX} bytes")).into());
        }
        let bytes = std::fs::read(&path).map_err(AuditError::io("cannot read", &path))?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|error| Failure::manifest(format!("{MANIFEST_FILE} is not a valid manifest: {error}")))?;
        manifest.check_shape()?;
        Ok(manifest)
    }

    /// Refuses what this version cannot verify, and file names that would leave the directory.
    fn check_shape(&self) -> Result<(), Failure> {
        if self.manifest_version != MANIFEST_VERSION {
            return Err(Failure::manifest(format!(
                "manifest version {} is not supported (this tool reads version {MANIFEST_VERSION})",
                self.manifest_version
            )));
        }
        if self.chain_version != super::canonical::CHAIN_VERSION || self.hash_algorithm != "sha256" {
            return Err(Failure::manifest(format!(
                "chain version {} / {} is not supported (this tool verifies version {} / sha256)",
                self.chain_version,
                self.hash_algorithm,
                super::canonical::CHAIN_VERSION
            )));
        }
        let expected = self.format.file_name();
        match self.files.as_slice() {
            [file] if file.name == expected => Ok(()),
            _ => Err(Failure::manifest(format!("a {} export lists exactly one file, {expected}", self.format))),
        }
    }

    /// Writes the manifest next to the data (via a temporary file and a rename, so it appears whole or not at
    /// all).
    pub fn write(&self, dir: &Path) -> Result<(), AuditError> {
        let path = dir.join(MANIFEST_FILE);
        let temporary = dir.join(format!("{MANIFEST_FILE}.partial"));
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| AuditError::Invalid(e.to_string()))?;
        bytes.push(b'\n');
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)
        };
        write().map_err(AuditError::io("cannot write", &path))
    }
}
