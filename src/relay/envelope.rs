//! The message the relay writes to `ledger.events`: one event of the log as a JSON envelope, plus headers that
//! let consumers route and deduplicate without parsing the body. Documented in `docs/events.md`.

use chrono::{DateTime, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::log::{LogPosition, RecordedEvent};

/// Version of the envelope's own shape (not of the event payload, which has `event_version`).
pub const ENVELOPE_VERSION: u32 = 1;

/// Header names, in the order they are written.
pub mod headers {
    pub const EVENT_ID: &str = "event_id";
    pub const AGGREGATE_TYPE: &str = "aggregate_type";
    pub const SEQUENCE: &str = "sequence";
    pub const GLOBAL_POSITION: &str = "global_position";
    pub const TRANSACTION_ID: &str = "transaction_id";
    pub const EVENT_TYPE: &str = "event_type";
    pub const EVENT_VERSION: &str = "event_version";
    pub const CORRELATION_ID: &str = "correlation_id";
    pub const ENVELOPE_VERSION: &str = "envelope_version";
}

/// The body of a `ledger.events` message (key = `aggregate_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub envelope_version: u32,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub global_position: i64,
    pub transaction_id: u64,
    pub recorded_at: DateTime<Utc>,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
}

/// The same fields, borrowed, so that encoding does not copy payloads.
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    envelope_version: u32,
    event_id: Uuid,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    sequence: i64,
    event_type: &'a str,
    event_version: &'a str,
    global_position: i64,
    transaction_id: u64,
    recorded_at: DateTime<Utc>,
    payload: &'a serde_json::Value,
    metadata: &'a serde_json::Value,
}

impl Envelope {
    /// The JSON body for `event`.
    pub fn encode(event: &RecordedEvent) -> Vec<u8> {
        let envelope = EnvelopeRef {
            envelope_version: ENVELOPE_VERSION,
            event_id: event.event_id,
            aggregate_type: &event.aggregate_type,
            aggregate_id: &event.aggregate_id,
            sequence: event.sequence,
            event_type: &event.event_type,
            event_version: &event.event_version,
            global_position: event.position.global_position,
            transaction_id: event.position.transaction_id,
            recorded_at: event.recorded_at,
            payload: &event.payload,
            metadata: &event.metadata,
        };
        // Serialising values that came out of jsonb columns cannot fail.
        serde_json::to_vec(&envelope).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn position(&self) -> LogPosition {
        LogPosition { transaction_id: self.transaction_id, global_position: self.global_position }
    }

    /// Back to the log's representation (what a consumer that also reads PostgreSQL handles).
    pub fn into_recorded(self) -> RecordedEvent {
        RecordedEvent {
            position: self.position(),
            event_id: self.event_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            event_type: self.event_type,
            event_version: self.event_version,
            payload: self.payload,
            metadata: self.metadata,
            recorded_at: self.recorded_at,
        }
    }
}

/// The headers of the message for `event`.
pub fn headers_for(event: &RecordedEvent) -> OwnedHeaders {
    let event_id = event.event_id.to_string();
    let sequence = event.sequence.to_string();
    let position = event.position.global_position.to_string();
    let transaction = event.position.transaction_id.to_string();
    let version = ENVELOPE_VERSION.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(9)
        .insert(Header { key: headers::EVENT_ID, value: Some(&event_id) })
        .insert(Header { key: headers::AGGREGATE_TYPE, value: Some(&event.aggregate_type) })
        .insert(Header { key: headers::SEQUENCE, value: Some(&sequence) })
        .insert(Header { key: headers::GLOBAL_POSITION, value: Some(&position) })
        .insert(Header { key: headers::TRANSACTION_ID, value: Some(&transaction) })
        .insert(Header { key: headers::EVENT_TYPE, value: Some(&event.event_type) })
        .insert(Header { key: headers::EVENT_VERSION, value: Some(&event.event_version) })
        .insert(Header { key: headers::ENVELOPE_VERSION, value: Some(&version) });
    if let Some(correlation) = event.metadata_str("correlation_id") {
        headers = headers.insert(Header { key: headers::CORRELATION_ID, value: Some(correlation) });
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn event() -> RecordedEvent {
        RecordedEvent {
            position: LogPosition { transaction_id: 812, global_position: 77 },
            event_id: Uuid::now_v7(),
            aggregate_type: "Order".into(),
            aggregate_id: "o-1".into(),
            sequence: 3,
            event_type: "OrderAccepted".into(),
            event_version: "1".into(),
            payload: serde_json::json!({"OrderAccepted": {"protection_price": null}}),
            metadata: serde_json::json!({"correlation_id": "c-9", "actor": "pm"}),
            recorded_at: Utc::now(),
        }
    }

    #[test]
    fn envelope_round_trips() {
        let event = event();
        let decoded = Envelope::decode(&Envelope::encode(&event)).unwrap();
        assert_eq!(decoded.envelope_version, ENVELOPE_VERSION);
        assert_eq!(decoded.into_recorded(), event);
    }

    #[test]
    fn headers_carry_routing_and_dedup_fields() {
        let headers = headers_for(&event());
        let get = |name: &str| {
            headers.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).to_string())
        };
        assert_eq!(get(headers::SEQUENCE).as_deref(), Some("3"));
        assert_eq!(get(headers::GLOBAL_POSITION).as_deref(), Some("77"));
        assert_eq!(get(headers::AGGREGATE_TYPE).as_deref(), Some("Order"));
        assert_eq!(get(headers::CORRELATION_ID).as_deref(), Some("c-9"));
        assert_eq!(headers.count(), 9);
    }
}
