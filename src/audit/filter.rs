//! Which sealed events an export holds: position range, time range, one aggregate, or one portfolio with its
//! orders. Checked before any work starts, so a bad filter is an immediate, clear error.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AuditError;

/// Longest aggregate id accepted in a filter (the domain's own ids are at most 128 bytes).
pub const AGGREGATE_ID_BYTES_MAX: usize = 128;

/// An export's selection. Every bound is optional; all given bounds apply together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportFilter {
    /// Lowest `global_position`, inclusive.
    pub from_position: Option<i64>,
    /// Highest `global_position`, inclusive.
    pub to_position: Option<i64>,
    /// Earliest `recorded_at`, inclusive.
    pub from_time: Option<DateTime<Utc>>,
    /// Latest `recorded_at`, exclusive (so that consecutive daily exports neither overlap nor leave a gap).
    pub to_time: Option<DateTime<Utc>>,
    /// One aggregate's events (any aggregate type).
    pub aggregate_id: Option<String>,
    /// One portfolio's events plus the events of its orders (orders name their portfolio in `OrderPlaced`).
    pub portfolio_id: Option<Uuid>,
}

impl ExportFilter {
    /// Rejects contradictory or out-of-range bounds with a message that names the option.
    pub fn validate(&self) -> Result<(), AuditError> {
        let invalid = |message: String| Err(AuditError::Invalid(message));
        for (name, value) in [("from-position", self.from_position), ("to-position", self.to_position)] {
            if let Some(value) = value {
                if value < 1 {
                    return invalid(format!("--{name} must be a log position (1 or more), not {value}"));
                }
            }
        }
        if let (Some(from), Some(to)) = (self.from_position, self.to_position) {
            if from > to {
                return invalid(format!("--from-position {from} is after --to-position {to}"));
            }
        }
        if let (Some(from), Some(to)) = (self.from_time, self.to_time) {
            if from >= to {
                return invalid(format!(
                    "--from-time {} is not before --to-time {} (the range is [from, to))",
                    from.to_rfc3339(),
                    to.to_rfc3339()
                ));
            }
        }
        if let Some(id) = &self.aggregate_id {
            if id.is_empty() || id.len() > AGGREGATE_ID_BYTES_MAX || id.chars().any(char::is_control) {
                return invalid(format!(
                    "--aggregate must be an aggregate id of 1 to {AGGREGATE_ID_BYTES_MAX} bytes without control characters"
                ));
            }
        }
        if self.aggregate_id.is_some() && self.portfolio_id.is_some() {
            return invalid("--aggregate and --portfolio cannot be combined".into());
        }
        Ok(())
    }

    /// True when the filter selects the whole chain.
    pub fn is_everything(&self) -> bool {
        *self == ExportFilter::default()
    }
}

/// Parses a time bound: RFC 3339 (`2026-11-22T08:00:00Z`, any offset) or a date (`2026-11-22`, midnight UTC).
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        if let Some(midnight) = date.and_hms_opt(0, 0, 0) {
            return Ok(midnight.and_utc());
        }
    }
    Err(format!("{text:?} is not a time: use RFC 3339 (2026-11-22T08:00:00Z) or a date (2026-11-22, midnight UTC)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_bounds_are_refused_with_the_option_named() {
        let error = |filter: ExportFilter| filter.validate().unwrap_err().to_string();
        assert!(error(ExportFilter { from_position: Some(0), ..Default::default() }).contains("--from-position"));
        assert!(error(ExportFilter { from_position: Some(5), to_position: Some(4), ..Default::default() })
            .contains("is after --to-position 4"));
        let t = parse_time("2026-11-22").unwrap();
        assert!(
            error(ExportFilter { from_time: Some(t), to_time: Some(t), ..Default::default() }).contains("not before")
        );
        assert!(error(ExportFilter { aggregate_id: Some(String::new()), ..Default::default() }).contains("--aggregate"));
        assert!(error(ExportFilter {
            aggregate_id: Some("a".into()),
            portfolio_id: Some(Uuid::nil()),
            ..Default::default()
        })
        .contains("cannot be combined"));
        assert!(ExportFilter::default().validate().is_ok());
        assert!(ExportFilter::default().is_everything());
    }

    #[test]
    fn times_parse_as_rfc3339_or_dates() {
        assert_eq!(parse_time("2026-11-22T09:30:00+01:00").unwrap().to_rfc3339(), "2026-11-22T08:30:00+00:00");
        assert_eq!(parse_time("2026-11-22").unwrap().to_rfc3339(), "2026-11-22T00:00:00+00:00");
        assert!(parse_time("yesterday").unwrap_err().contains("not a time"));
    }
}
