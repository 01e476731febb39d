//! The message the relay writes to `ledger.events`: one event of the log as a JSON envelope, plus headers that
//! let consumers route and deduplicate without parsing the body. Documented in `docs/events.md`.

use chrono::{DateTime, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::log::{LogPosition, RecordedEvent, WireEvent};

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
    /// The W3C trace context of the request that wrote the event, when it had one (`crate::trace`).
    pub const TRACEPARENT: &str = crate::trace::TRACEPARENT;
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

impl Envelope {
    /// The JSON body for `event`: the fields of [`Envelope`], with the payload and metadata written as the
    /// text the log holds (not parsed and serialised again: the relay's largest cost per event before).
    /// Decodes as an [`Envelope`] equal to the event (`relay::envelope` tests).
    pub fn encode(event: &WireEvent) -> Vec<u8> {
        use std::io::Write;
        let mut out = Vec::with_capacity(ENCODED_FIELDS_BYTES + event.payload.len() + event.metadata.len());
        // Writing into a Vec cannot fail; strings go through serde_json for their escaping.
        let _ = write!(
            out,
            r#"{{"envelope_version":{ENVELOPE_VERSION},"event_id":"{}","aggregate_type":"#,
            event.event_id.hyphenated()
        );
        let _ = serde_json::to_writer(&mut out, &event.aggregate_type);
        out.extend_from_slice(br#","aggregate_id":"#);
        let _ = serde_json::to_writer(&mut out, &event.aggregate_id);
        let _ = write!(out, r#","sequence":{},"event_type":"#, event.sequence);
        let _ = serde_json::to_writer(&mut out, &event.event_type);
        out.extend_from_slice(br#","event_version":"#);
        let _ = serde_json::to_writer(&mut out, &event.event_version);
        let _ = write!(
            out,
            r#","global_position":{},"transaction_id":{},"recorded_at":"#,
            event.position.global_position, event.position.transaction_id
        );
        let _ = serde_json::to_writer(&mut out, &event.recorded_at);
        out.extend_from_slice(br#","payload":"#);
        out.extend_from_slice(event.payload.as_bytes());
        out.extend_from_slice(br#","metadata":"#);
        out.extend_from_slice(event.metadata.as_bytes());
        out.push(b'}');
        out
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

/// Room for the envelope's fields other than the payload and metadata (an estimate; the buffer grows if needed).
const ENCODED_FIELDS_BYTES: usize = 320;

/// The metadata fields headers carry, read from the metadata's text without building a tree.
#[derive(Deserialize)]
struct HeaderFields<'a> {
    #[serde(borrow, default)]
    correlation_id: Option<Text<'a>>,
    #[serde(borrow, default)]
    traceparent: Option<Text<'a>>,
}

/// A metadata value: a string (carried as a header), or anything else (no header, and no effect on the other
/// fields). Read in place: no value is buffered to find out which it is.
enum Text<'a> {
    String(std::borrow::Cow<'a, str>),
    Other,
}

impl Text<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Text::String(text) => Some(text),
            Text::Other => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> serde::de::Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Text<'de>, E> {
                Ok(Text::String(std::borrow::Cow::Borrowed(text)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Text<'de>, E> {
                Ok(Text::String(std::borrow::Cow::Owned(text.to_string())))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Text<'de>, E> {
                Ok(Text::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Text<'de>, E> {
                Ok(Text::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Text<'de>, E> {
                Ok(Text::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Text<'de>, E> {
                Ok(Text::Other)
            }
            fn visit_unit<E>(self) -> Result<Text<'de>, E> {
                Ok(Text::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Text<'de>, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Text::Other)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Text<'de>, A::Error> {
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(Text::Other)
            }
        }
        deserializer.deserialize_any(TextVisitor)
    }
}

/// The headers of the message for `event`.
pub fn headers_for(event: &WireEvent) -> OwnedHeaders {
    let event_id = event.event_id.to_string();
    let sequence = event.sequence.to_string();
    let position = event.position.global_position.to_string();
    let transaction = event.position.transaction_id.to_string();
    let version = ENVELOPE_VERSION.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(10)
        .insert(Header { key: headers::EVENT_ID, value: Some(&event_id) })
        .insert(Header { key: headers::AGGREGATE_TYPE, value: Some(&event.aggregate_type) })
        .insert(Header { key: headers::SEQUENCE, value: Some(&sequence) })
        .insert(Header { key: headers::GLOBAL_POSITION, value: Some(&position) })
        .insert(Header { key: headers::TRANSACTION_ID, value: Some(&transaction) })
        .insert(Header { key: headers::EVENT_TYPE, value: Some(&event.event_type) })
        .insert(Header { key: headers::EVENT_VERSION, value: Some(&event.event_version) })
        .insert(Header { key: headers::ENVELOPE_VERSION, value: Some(&version) });
    // A field that is not a string (or metadata that is not an object) gets no header, as before.
    // (The derived decoder would also take an array as the struct's fields in order: objects only.)
    let metadata = event
        .metadata
        .trim_start()
        .starts_with('{')
        .then(|| serde_json::from_str::<HeaderFields>(&event.metadata).ok())
        .flatten();
    if let Some(correlation) = metadata.as_ref().and_then(|m| m.correlation_id.as_ref()?.as_str()) {
        headers = headers.insert(Header { key: headers::CORRELATION_ID, value: Some(correlation) });
    }
    if let Some(traceparent) = metadata.as_ref().and_then(|m| m.traceparent.as_ref()?.as_str()) {
        headers = headers.insert(Header { key: headers::TRACEPARENT, value: Some(traceparent) });
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
        let decoded = Envelope::decode(&Envelope::encode(&WireEvent::from(&event))).unwrap();
        assert_eq!(decoded.envelope_version, ENVELOPE_VERSION);
        assert_eq!(decoded.into_recorded(), event);
    }

    #[test]
    fn strings_that_need_escaping_round_trip() {
        let mut event = event();
        event.aggregate_id = "quote \" back\\slash \u{1} ünï".into();
        event.event_type = "Line\nBreak".into();
        event.payload = serde_json::json!({"note": "tab\t\"quoted\"", "n": [1.5, -2, null]});
        let decoded = Envelope::decode(&Envelope::encode(&WireEvent::from(&event))).unwrap();
        assert_eq!(decoded.into_recorded(), event);
    }

    proptest::proptest! {
        /// Whatever the strings, the hand-written envelope decodes to the event it was written from.
        #[test]
        fn any_event_round_trips(aggregate_id in ".*", event_type in ".*", note in ".*", sequence in 0i64.., position in 0i64..) {
            let mut event = event();
            event.aggregate_id = aggregate_id;
            event.event_type = event_type;
            event.sequence = sequence;
            event.position.global_position = position;
            event.payload = serde_json::json!({ "note": note });
            let decoded = Envelope::decode(&Envelope::encode(&WireEvent::from(&event))).unwrap();
            proptest::prop_assert_eq!(decoded.into_recorded(), event);
        }
    }

    #[test]
    fn headers_carry_routing_and_dedup_fields() {
        let headers = headers_for(&WireEvent::from(&event()));
        let get = |name: &str| {
            headers.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).to_string())
        };
        assert_eq!(get(headers::SEQUENCE).as_deref(), Some("3"));
        assert_eq!(get(headers::GLOBAL_POSITION).as_deref(), Some("77"));
        assert_eq!(get(headers::AGGREGATE_TYPE).as_deref(), Some("Order"));
        assert_eq!(get(headers::CORRELATION_ID).as_deref(), Some("c-9"));
        assert_eq!(headers.count(), 9);
    }

    #[test]
    fn the_trace_context_of_the_metadata_becomes_a_traceparent_header() {
        let mut event = event();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        event.metadata = serde_json::json!({"correlation_id": "c-9", "traceparent": traceparent});
        let headers = headers_for(&WireEvent::from(&event));
        let value = headers.iter().find(|h| h.key == headers::TRACEPARENT).and_then(|h| h.value);
        assert_eq!(value, Some(traceparent.as_bytes()));
        assert_eq!(headers.count(), 10);
        // A field that is not a string gets no header and costs the other field nothing.
        event.metadata = serde_json::json!({"correlation_id": "c-9", "traceparent": 7});
        let headers = headers_for(&WireEvent::from(&event));
        assert!(headers.iter().any(|h| h.key == headers::CORRELATION_ID));
        assert_eq!(headers.count(), 9);
    }

    #[test]
    fn no_correlation_header_unless_the_metadata_has_a_string_one() {
        use serde_json::json;
        let mut event = event();
        for metadata in [json!({"actor": "pm"}), json!({"correlation_id": 7}), json!([]), json!(["c-9"])] {
            event.metadata = metadata;
            assert_eq!(headers_for(&WireEvent::from(&event)).count(), 8);
        }
    }
}
