//! W3C trace context (`traceparent`), carried so that one trace shows a request, the events it committed, and
//! their projection: the API puts the request's context into its commands, the command service records it in
//! each event's metadata (`traceparent`), reactions of the process manager inherit it from the event they react
//! to, the relay copies it into a Kafka header of the same name, and projection workers open their spans in it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

/// The metadata field and the Kafka header that carry the context.
pub const TRACEPARENT: &str = "traceparent";
/// The `sampled` trace flag: the caller records this trace.
pub const SAMPLED: u8 = 0x01;

/// Whether this process exports spans (see [`set_exporting`]).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Says that this process exports spans (the binary, when it installs an exporter). Spans that exist only to be
/// exported (a projection batch's span per trace) are opened only then.
pub fn set_exporting(on: bool) {
    EXPORTING.store(on, Ordering::Relaxed);
}

/// Whether this process exports spans.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// A trace and the span in it that is the parent of what follows (`<version>-<trace id>-<span id>-<flags>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    /// The trace flags, as the caller sent them ([`SAMPLED`] when we start the trace).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent`: version 00 exactly, a later version by its first four fields (as W3C asks);
    /// `None` for anything else, for version `ff`, or for the all-zero ids the format forbids.
    pub fn parse(text: &str) -> Option<TraceParent> {
        let mut parts = text.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |part: &str, len: usize| part.len() == len && part.bytes().all(|b| b.is_ascii_hexdigit());
        let known_version = version == "00" && parts.next().is_none();
        let later_version = hex(version, 2) && version != "00" && !version.eq_ignore_ascii_case("ff");
        if !(known_version || later_version) || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|id| *id != 0)?;
        let span_id = u64::from_str_radix(span, 16).ok().filter(|id| *id != 0)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(TraceParent { trace_id, span_id, flags })
    }

    /// The trace id as 32 lowercase hex digits (what OTLP and the log lines show).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

impl fmt::Display for TraceParent {
    /// Version 00 (the one this code knows), with the flags as received.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::TraceParent;

    #[test]
    fn traceparents_round_trip_and_malformed_ones_are_refused() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(text).unwrap();
        assert_eq!(parsed.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(parsed.to_string(), text);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(TraceParent::parse(unsampled).unwrap().to_string(), unsampled, "the caller's flags are kept");
        let later = TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next");
        assert_eq!(later, Some(parsed), "a later version is read by its first four fields");
        for bad in [
            "",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }
}
