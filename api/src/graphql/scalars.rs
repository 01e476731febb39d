//! Custom scalars.

use async_graphql::{InputValueError, InputValueResult, Scalar, ScalarType, Value};

/// A position in the log's commit order, written `TRANSACTION:POSITION` (e.g. `"81234:567"`). Opaque to
/// clients: pass back what you received to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPosition(pub ledger::log::LogPosition);

#[Scalar(name = "LogPosition")]
impl ScalarType for LogPosition {
    fn parse(value: Value) -> InputValueResult<Self> {
        match &value {
            Value::String(s) => s
                .parse()
                .map(LogPosition)
                .map_err(|e: ledger::log::LogPositionParseError| InputValueError::custom(e.to_string())),
            _ => Err(InputValueError::expected_type(value)),
        }
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.to_string())
    }
}

impl async_graphql::connection::CursorType for LogPosition {
    type Error = ledger::log::LogPositionParseError;

    fn decode_cursor(s: &str) -> Result<Self, Self::Error> {
        s.parse().map(LogPosition)
    }

    fn encode_cursor(&self) -> String {
        self.0.to_string()
    }
}
