//! Who issues a command, why, and under which idempotency key. Recorded in every event's metadata.

use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::CommandError;
use crate::log::RecordedEvent;
use crate::trace::{TraceParent, TRACEPARENT};

/// Longest idempotency key accepted, in bytes (matches the `command_log` check constraint).
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 200;

/// A client key plus the fingerprint of the request it was first used for.
///
/// The caller decides what "the same request" means by choosing what to fingerprint: the API hashes the
/// client's input (not the ids and timestamps it generates itself), the process manager hashes the event it
/// reacts to. Retrying with the same key and the same input then returns the first result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub fingerprint: [u8; 32],
}

impl Idempotency {
    pub fn new(key: impl Into<String>, request: &impl Serialize) -> Result<Self, CommandError> {
        let key = key.into();
        if key.is_empty() || key.len() > IDEMPOTENCY_KEY_LEN_MAX || key.chars().any(char::is_control) {
            return Err(CommandError::Invalid(format!(
                "idempotency key must be 1 to {IDEMPOTENCY_KEY_LEN_MAX} bytes long, without control characters"
            )));
        }
        let bytes = serde_json::to_vec(request).map_err(|e| CommandError::Invalid(e.to_string()))?;
        Ok(Self { key, fingerprint: Sha256::digest(&bytes).into() })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandContext {
    /// The authenticated principal (user subject, or a system component such as `process-manager`).
    pub actor: String,
    /// Shared by everything that follows from one original request.
    pub correlation_id: Uuid,
    /// The event that caused this command, when a process reacts to the log.
    pub causation_id: Option<Uuid>,
    pub idempotency: Option<Idempotency>,
    /// The trace the command belongs to (recorded in its events' metadata as `traceparent`).
    pub traceparent: Option<TraceParent>,
}

impl CommandContext {
    /// A fresh request by `actor`, starting a new correlation.
    pub fn new(actor: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            correlation_id: Uuid::now_v7(),
            causation_id: None,
            idempotency: None,
            traceparent: None,
        }
    }

    /// A command issued in reaction to `event`: same correlation and trace, caused by that event.
    pub fn caused_by(actor: impl Into<String>, event: &RecordedEvent) -> Self {
        let correlation_id =
            event.metadata_str("correlation_id").and_then(|s| Uuid::parse_str(s).ok()).unwrap_or(event.event_id);
        Self {
            actor: actor.into(),
            correlation_id,
            causation_id: Some(event.event_id),
            idempotency: None,
            traceparent: event.metadata_str(TRACEPARENT).and_then(TraceParent::parse),
        }
    }

    /// The same command in the trace `traceparent`.
    pub fn with_traceparent(mut self, traceparent: TraceParent) -> Self {
        self.traceparent = Some(traceparent);
        self
    }

    pub fn with_idempotency(mut self, idempotency: Idempotency) -> Self {
        self.idempotency = Some(idempotency);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{LogPosition, RecordedEvent};

    fn event(metadata: serde_json::Value) -> RecordedEvent {
        RecordedEvent {
            position: LogPosition::START,
            event_id: Uuid::from_u128(9),
            aggregate_type: "Order".into(),
            aggregate_id: Uuid::from_u128(1).to_string(),
            sequence: 1,
            event_type: "OrderPlaced".into(),
            event_version: "1".into(),
            payload: serde_json::json!({}),
            metadata,
            recorded_at: chrono::Utc::now(),
        }
    }

    /// A reaction to an event stays in the event's correlation and trace, caused by it.
    #[test]
    fn a_reaction_inherits_the_correlation_and_the_trace_of_its_event() {
        let correlation = Uuid::from_u128(5);
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let metadata = serde_json::json!({ "correlation_id": correlation.to_string(), TRACEPARENT: traceparent });
        let reaction = CommandContext::caused_by("process-manager", &event(metadata));
        assert_eq!(reaction.correlation_id, correlation);
        assert_eq!(reaction.causation_id, Some(Uuid::from_u128(9)));
        assert_eq!(reaction.traceparent, TraceParent::parse(traceparent));
        // Without them: a new correlation (the event's id) and no trace.
        let bare = CommandContext::caused_by("process-manager", &event(serde_json::json!({ TRACEPARENT: "junk" })));
        assert_eq!((bare.correlation_id, bare.traceparent), (Uuid::from_u128(9), None));
    }
}
