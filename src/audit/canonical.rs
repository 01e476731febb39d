//! Canonical bytes of an event and the hash chain over them.
//!
//! The canonical bytes are the UTF-8 of one JSON object holding the event's eleven fields, written in the
//! canonical form of RFC 8785 (JSON Canonicalization Scheme): object keys sorted by their UTF-16 code units,
//! no whitespace, strings with the minimal escapes, numbers in ECMAScript form — except that integers are
//! written exactly, digit for digit (JCS would round integers above 2^53 through a double). JSON is chosen so
//! that anyone can recompute a hash with ordinary tools (`docs/audit.md` has a ten-line Python check); the
//! canonical form makes the bytes independent of how a tool orders keys or spaces its output.
//!
//! `chain_hash = SHA-256(previous_hash ‖ canonical bytes)`, and the previous hash of the first event of the
//! log is 32 zero bytes ([`GENESIS_HASH`]).

use std::fmt;
use std::str::FromStr;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::log::RecordedEvent;

/// Version of the canonical form and chain rule, recorded in every manifest.
pub const CHAIN_VERSION: u32 = 1;

/// The fields of the canonical event object, in canonical (sorted) order.
pub const EVENT_FIELDS: [&str; 11] = [
    "aggregate_id",
    "aggregate_type",
    "event_id",
    "event_type",
    "event_version",
    "global_position",
    "metadata",
    "payload",
    "recorded_at",
    "sequence",
    "transaction_id",
];

/// `recorded_at` in the canonical bytes: UTC, always six fractional digits (PostgreSQL keeps microseconds).
pub const RECORDED_AT_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// A SHA-256 chain hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChainHash(pub [u8; 32]);

/// The previous hash of the first event of the log.
pub const GENESIS_HASH: ChainHash = ChainHash([0; 32]);

impl ChainHash {
    /// `SHA-256(self ‖ canonical)`: the hash of the event whose canonical bytes are `canonical`, following
    /// the event whose hash is `self`.
    pub fn next(&self, canonical: &[u8]) -> ChainHash {
        let mut hasher = Sha256::new();
        hasher.update(self.0);
        hasher.update(canonical);
        ChainHash(hasher.finalize().into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// From 32 bytes (as stored in `bytea`).
    pub fn from_slice(bytes: &[u8]) -> Option<ChainHash> {
        bytes.try_into().ok().map(ChainHash)
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({})", self.to_hex())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a chain hash (expected 64 lowercase hex digits)")]
pub struct ChainHashParseError(pub String);

impl FromStr for ChainHash {
    type Err = ChainHashParseError;

    /// Exactly 64 lowercase hex digits: a hash has one spelling, so that text comparisons agree with byte ones.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lowercase = s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let mut bytes = [0u8; 32];
        match hex::decode_to_slice(s, &mut bytes) {
            Ok(()) if lowercase => Ok(ChainHash(bytes)),
            _ => Err(ChainHashParseError(s.chars().take(80).collect())),
        }
    }
}

impl serde::Serialize for ChainHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ChainHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A value of a field of the canonical object, borrowed from wherever the event lives.
#[derive(Debug, Clone, Copy)]
pub enum Field<'a> {
    Str(&'a str),
    Int(i64),
    UInt(u64),
    Json(&'a Value),
}

/// Writes a JSON object with `fields` in canonical form. The keys must be distinct.
pub fn write_object(fields: &mut [(&str, Field<'_>)], out: &mut Vec<u8>) {
    fields.sort_unstable_by(|a, b| utf16_order(a.0, b.0));
    out.push(b'{');
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(key, out);
        out.push(b':');
        match value {
            Field::Str(s) => write_string(s, out),
            Field::Int(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Field::UInt(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Field::Json(v) => write_canonical(v, out),
        }
    }
    out.push(b'}');
}

/// The event's fields as they enter the canonical object; `recorded_at` is passed in already formatted.
pub fn event_fields<'a>(
    event: &'a RecordedEvent,
    event_id: &'a str,
    recorded_at: &'a str,
) -> [(&'a str, Field<'a>); 11] {
    [
        ("aggregate_id", Field::Str(&event.aggregate_id)),
        ("aggregate_type", Field::Str(&event.aggregate_type)),
        ("event_id", Field::Str(event_id)),
        ("event_type", Field::Str(&event.event_type)),
        ("event_version", Field::Str(&event.event_version)),
        ("global_position", Field::Int(event.position.global_position)),
        ("metadata", Field::Json(&event.metadata)),
        ("payload", Field::Json(&event.payload)),
        ("recorded_at", Field::Str(recorded_at)),
        ("sequence", Field::Int(event.sequence)),
        ("transaction_id", Field::UInt(event.position.transaction_id)),
    ]
}

/// `recorded_at` as it appears in the canonical bytes and in exports.
pub fn format_recorded_at(at: &chrono::DateTime<chrono::Utc>) -> String {
    at.format(RECORDED_AT_FORMAT).to_string()
}

/// Appends the canonical bytes of `event` to `out`.
pub fn write_event(event: &RecordedEvent, out: &mut Vec<u8>) {
    let event_id = event.event_id.to_string();
    let recorded_at = format_recorded_at(&event.recorded_at);
    write_object(&mut event_fields(event, &event_id, &recorded_at), out);
}

/// The canonical bytes of `event`.
pub fn canonical_event(event: &RecordedEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    write_event(event, &mut out);
    out
}

/// The canonical form of any JSON value.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

/// Appends the canonical form of `value` to `out`.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                write_ecmascript_number(n.as_f64().unwrap_or(0.0), out);
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| utf16_order(a.0, b.0));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_canonical(item, out);
            }
            out.push(b'}');
        }
    }
}

/// RFC 8785 §3.2.3: keys compare as sequences of UTF-16 code units (differs from code-point order only
/// between characters above U+FFFF and those in U+E000–U+FFFF).
fn utf16_order(a: &str, b: &str) -> std::cmp::Ordering {
    if a.is_ascii() && b.is_ascii() {
        return a.cmp(b);
    }
    a.encode_utf16().cmp(b.encode_utf16())
}

/// RFC 8785 §3.2.2.2: `"` and `\` escaped, control characters as `\b \t \n \f \r` or `\u00xx` (lowercase),
/// everything else as is (UTF-8, no `\u` for non-ASCII, `/` not escaped).
fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match byte {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            0x08 => Some(b"\\b"),
            b'\t' => Some(b"\\t"),
            b'\n' => Some(b"\\n"),
            0x0c => Some(b"\\f"),
            b'\r' => Some(b"\\r"),
            0x00..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(escape) => out.extend_from_slice(escape),
            None => out.extend_from_slice(format!("\\u{byte:04x}").as_bytes()),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// ECMAScript `Number.prototype.toString` (RFC 8785 §3.2.2.3) for a finite double: the shortest digits that
/// round-trip, in plain notation for exponents −6 < n ≤ 21, otherwise `d.ddde±x`. The ledger's own events
/// carry no such numbers (decimals are strings); this keeps foreign payloads canonical too.
fn write_ecmascript_number(value: f64, out: &mut Vec<u8>) {
    if value == 0.0 || !value.is_finite() {
        out.push(b'0');
        return;
    }
    if value < 0.0 {
        out.push(b'-');
    }
    // Rust's `{:e}` prints the shortest round-trip digits: "1.2345e-7", "1e21".
    let formatted = format!("{:e}", value.abs());
    let (mantissa, exponent) = formatted.split_once('e').unwrap_or((&formatted, "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let k = digits.len() as i64;
    let n = exponent.parse::<i64>().unwrap_or(0) + 1;
    let text = if k <= n && n <= 21 {
        format!("{digits}{}", "0".repeat((n - k) as usize))
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..n as usize], &digits[n as usize..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", "0".repeat((-n) as usize))
    } else {
        let sign = if n - 1 < 0 { '-' } else { '+' };
        let fraction = if k == 1 { String::new() } else { format!(".{}", &digits[1..]) };
        format!("{}{fraction}e{sign}{}", &digits[..1], (n - 1).abs())
    };
    out.extend_from_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogPosition;
    use serde_json::json;

    fn canonical(value: Value) -> String {
        String::from_utf8(canonical_json(&value)).unwrap()
    }

    #[test]
    fn objects_are_sorted_and_compact_at_every_depth() {
        let value = json!({"b": [3, {"z": null, "a": true}], "a": {"y": "x", "x": false}, "A": 1});
        assert_eq!(canonical(value), r#"{"A":1,"a":{"x":false,"y":"x"},"b":[3,{"a":true,"z":null}]}"#);
    }

    #[test]
    fn strings_use_the_minimal_escapes() {
        let value =
            json!("quote \" backslash \\ slash / tab \t nl \n cr \r bs \u{8} ff \u{c} nul \u{0} us \u{1f} é € 😀");
        assert_eq!(
            canonical(value),
            "\"quote \\\" backslash \\\\ slash / tab \\t nl \\n cr \\r bs \\b ff \\f nul \\u0000 us \\u001f é € 😀\""
        );
    }

    #[test]
    fn keys_sort_by_utf16_code_units() {
        // U+1F600 is D83D DE00 in UTF-16, which sorts before U+FB01 (code-point order says the opposite).
        let value = json!({"\u{fb01}": 1, "\u{1f600}": 2, "a": 3});
        assert_eq!(canonical(value), "{\"a\":3,\"\u{1f600}\":2,\"\u{fb01}\":1}");
    }

    #[test]
    fn numbers_follow_ecmascript_and_integers_stay_exact() {
        let cases = [
            (json!(0), "0"),
            (json!(-0.0), "0"),
            (json!(1.0), "1"),
            (json!(1.5), "1.5"),
            (json!(-12.25), "-12.25"),
            (json!(1e21), "1e+21"),
            (json!(1e20), "100000000000000000000"),
            (json!(123456789012.5), "123456789012.5"),
            (json!(0.000001), "0.000001"),
            (json!(0.0000001), "1e-7"),
            (json!(1.2345e-7), "1.2345e-7"),
            (json!(5e-324), "5e-324"),
            (json!(1.7976931348623157e308), "1.7976931348623157e+308"),
            (json!(9007199254740993u64), "9007199254740993"),
            (json!(u64::MAX), "18446744073709551615"),
            (json!(i64::MIN), "-9223372036854775808"),
        ];
        for (value, expected) in cases {
            assert_eq!(canonical(value.clone()), expected, "{value:?}");
        }
    }

    pub(crate) fn sample_event() -> RecordedEvent {
        RecordedEvent {
            position: LogPosition { transaction_id: 80151, global_position: 718 },
            event_id: "01a2024a-854c-7185-8a6c-9e30a6041589".parse().unwrap(),
            aggregate_type: "Portfolio".into(),
            aggregate_id: "01a2024a-8111-70bb-8c62-cdc837764cd7".into(),
            sequence: 2,
            event_type: "CashDeposited".into(),
            event_version: "1".into(),
            payload: json!({"CashDeposited": {"amount": "2500.00", "reference": null, "cash_after": "2500.00", "at": "2026-11-22T08:06:08.001234Z"}}),
            metadata: json!({"actor": "alice", "correlation_id": "c-1", "command_type": "DepositCash"}),
            recorded_at: "2026-11-22T08:06:08.007620Z".parse().unwrap(),
        }
    }

    /// The worked example of docs/audit.md: keep the two in step.
    #[test]
    fn the_documented_example_hashes_as_documented() {
        let event = sample_event();
        let bytes = String::from_utf8(canonical_event(&event)).unwrap();
        assert_eq!(
            bytes,
            r#"{"aggregate_id":"01a2024a-8111-70bb-8c62-cdc837764cd7","aggregate_type":"Portfolio","event_id":"01a2024a-854c-7185-8a6c-9e30a6041589","event_type":"CashDeposited","event_version":"1","global_position":718,"metadata":{"actor":"alice","command_type":"DepositCash","correlation_id":"c-1"},"payload":{"CashDeposited":{"amount":"2500.00","at":"2026-11-22T08:06:08.001234Z","cash_after":"2500.00","reference":null}},"recorded_at":"2026-11-22T08:06:08.007620Z","sequence":2,"transaction_id":80151}"#
        );
        let first = GENESIS_HASH.next(bytes.as_bytes());
        assert_eq!(first.to_hex(), "9e756fef1c58743c5b01d50d2caae252da77be3b668cbcd4563f2806c3101af3");
    }

    #[test]
    fn the_fast_path_matches_the_generic_canonical_form() {
        let event = sample_event();
        let as_value = json!({
            "transaction_id": event.position.transaction_id,
            "global_position": event.position.global_position,
            "event_id": event.event_id.to_string(),
            "aggregate_type": event.aggregate_type,
            "aggregate_id": event.aggregate_id,
            "sequence": event.sequence,
            "event_type": event.event_type,
            "event_version": event.event_version,
            "payload": event.payload,
            "metadata": event.metadata,
            "recorded_at": format_recorded_at(&event.recorded_at),
        });
        assert_eq!(canonical_event(&event), canonical_json(&as_value));
        let keys: Vec<&str> = as_value.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, EVENT_FIELDS);
    }

    #[test]
    fn hashes_have_one_spelling() {
        let hash = GENESIS_HASH.next(b"x");
        assert_eq!(hash.to_hex().parse::<ChainHash>().unwrap(), hash);
        assert!(hash.to_hex().to_uppercase().parse::<ChainHash>().is_err());
        assert!("abc".parse::<ChainHash>().is_err());
        assert_eq!(serde_json::to_string(&GENESIS_HASH).unwrap(), format!("\"{}\"", "0".repeat(64)));
    }
}
