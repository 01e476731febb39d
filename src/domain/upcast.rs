//! Stored events of an older shape, read as the current one.
//!
//! Every event is stored with its `event_version` and is never rewritten (the audit chain is over what was
//! written; exports keep those bytes and that version). Everything that decodes an event — the log reader, the
//! Kafka envelope, the command service's loader, time travel, rebuilds — passes the payload through [`upcast`]
//! first, so aggregates, projections, the process manager and the executor only ever see the current shape.
//! docs/events.md ("Changing an event") says when a change needs a new version and how to write its upcaster.
//!
//! | aggregate | versions | change |
//! |-----------|----------|--------|
//! | Portfolio | 1 → 2 | `ReservationReleased.reason`: the process manager's trigger as text (`OrderCanceled`, `OrderExpired`, `OrderCanceledBeforeAcceptance`) became a [`ReleaseReason`](super::portfolio::ReleaseReason) (`CANCELED`, `EXPIRED`, `CANCELED_BEFORE_ACCEPTANCE`; any other text `OTHER`) |

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::order::ORDER_EVENT_VERSION;
use super::portfolio::PORTFOLIO_EVENT_VERSION;

/// The current version of an aggregate type's events (`None` for a type the ledger does not know).
pub fn current_version(aggregate_type: &str) -> Option<&'static str> {
    match aggregate_type {
        "Order" => Some(ORDER_EVENT_VERSION),
        "Portfolio" => Some(PORTFOLIO_EVENT_VERSION),
        _ => None,
    }
}

/// Whether a payload of this type and version needs upcasting.
pub fn is_current(aggregate_type: &str, event_version: &str) -> bool {
    current_version(aggregate_type).is_none_or(|current| current == event_version)
}

/// Brings `payload`, stored as `event_version` of `aggregate_type`, to the current version, one version at a
/// time; returns the version it is now. A version this ledger does not know is left as it is (decoding it then
/// fails loudly, and the consumer dead-letters or reports it).
pub fn upcast(aggregate_type: &str, event_version: &str, payload: &mut Value) -> String {
    let mut version = event_version.to_string();
    loop {
        version = match (aggregate_type, version.as_str()) {
            ("Portfolio", "1") => {
                portfolio_1_to_2(payload);
                "2".into()
            }
            _ => return version,
        };
    }
}

/// Portfolio 1 → 2: `ReservationReleased.reason` from the trigger's event type to a `ReleaseReason`.
fn portfolio_1_to_2(payload: &mut Value) {
    let Some(reason) = payload.pointer_mut("/ReservationReleased/reason") else { return };
    let upcast = match reason.as_str() {
        Some("OrderCanceled") => "CANCELED",
        Some("OrderExpired") => "EXPIRED",
        Some("OrderCanceledBeforeAcceptance") => "CANCELED_BEFORE_ACCEPTANCE",
        _ => "OTHER",
    };
    *reason = Value::String(upcast.into());
}

/// [`upcast`] as cqrs-es applies upcasters: the event stores of the command service load aggregates through it.
pub struct LedgerUpcaster;

impl cqrs_es::persist::EventUpcaster for LedgerUpcaster {
    fn can_upcast(&self, _event_type: &str, _event_version: &str) -> bool {
        // The aggregate type is needed to tell, and only `upcast` sees it; for a current event it changes nothing.
        true
    }

    fn upcast(&self, mut event: cqrs_es::persist::SerializedEvent) -> cqrs_es::persist::SerializedEvent {
        if !is_current(&event.aggregate_type, &event.event_version) {
            event.event_version = upcast(&event.aggregate_type, &event.event_version, &mut event.payload);
        }
        event
    }
}

/// An event type whose stored payloads may need upcasting before they decode.
pub trait Stored: DeserializeOwned {
    /// The aggregate type whose events these are.
    const AGGREGATE_TYPE: &'static str;

    /// Decodes a stored payload's JSON text of version `event_version` (upcast first when it is older).
    fn decode_stored(event_version: &str, payload: &[u8]) -> Result<Self, serde_json::Error> {
        if is_current(Self::AGGREGATE_TYPE, event_version) {
            return serde_json::from_slice(payload);
        }
        let mut value: Value = serde_json::from_slice(payload)?;
        upcast(Self::AGGREGATE_TYPE, event_version, &mut value);
        serde_json::from_value(value)
    }

    /// Decodes a stored payload of version `event_version` (upcast first, on a copy, when it is older).
    fn decode_ref(event_version: &str, payload: &Value) -> Result<Self, serde_json::Error> {
        if is_current(Self::AGGREGATE_TYPE, event_version) {
            return Self::deserialize(payload);
        }
        let mut value = payload.clone();
        upcast(Self::AGGREGATE_TYPE, event_version, &mut value);
        serde_json::from_value(value)
    }
}

impl Stored for super::OrderEvent {
    const AGGREGATE_TYPE: &'static str = "Order";
}

impl Stored for super::PortfolioEvent {
    const AGGREGATE_TYPE: &'static str = "Portfolio";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::portfolio::ReleaseReason;
    use crate::domain::PortfolioEvent;

    /// A `ReservationReleased` as version 1 of the ledger stored it (also in tests/fixtures).
    const RELEASED_V1: &str = include_str!("../../tests/fixtures/portfolio-v1-reservation-released.json");

    #[test]
    fn a_version_1_release_reads_as_version_2() {
        let event = PortfolioEvent::decode_stored("1", RELEASED_V1.as_bytes()).unwrap();
        let PortfolioEvent::ReservationReleased { reason, cash_released, .. } = event else { panic!("{event:?}") };
        assert_eq!(reason, ReleaseReason::Canceled);
        assert_eq!(cash_released.to_string(), "1001.5");
        // The current version decodes as it is; an unknown text becomes OTHER.
        let current = serde_json::to_vec(&PortfolioEvent::decode_stored("1", RELEASED_V1.as_bytes()).unwrap()).unwrap();
        assert!(PortfolioEvent::decode_stored("2", &current).is_ok());
        let mut odd: Value = serde_json::from_str(RELEASED_V1).unwrap();
        odd["ReservationReleased"]["reason"] = "Something".into();
        assert_eq!(upcast("Portfolio", "1", &mut odd), "2");
        assert_eq!(odd["ReservationReleased"]["reason"], "OTHER");
    }

    #[test]
    fn other_events_and_types_pass_through() {
        let mut deposit = serde_json::json!({ "CashDeposited": { "amount": "5", "reference": null, "cash_after": "5", "at": "2026-01-01T00:00:00Z" } });
        let before = deposit.clone();
        assert_eq!(upcast("Portfolio", "1", &mut deposit), "2");
        assert_eq!(deposit, before);
        assert!(is_current("Order", "1") && is_current("Portfolio", "2") && !is_current("Portfolio", "1"));
        assert_eq!(upcast("Order", "1", &mut deposit), "1");
        assert_eq!(upcast("Portfolio", "9", &mut deposit), "9");
    }
}
