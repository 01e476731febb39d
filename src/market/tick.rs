//! One price observation. Identity and order per symbol: `(ts, seq)` — `seq` disambiguates ticks with the same
//! timestamp. Consumers apply a tick only if its `(ts, seq)` is after the last one applied for the symbol, so
//! redelivered ticks change nothing and a restarted source (new `ts`) continues cleanly.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::domain::values::{Price, Symbol};

/// Version of the tick message's shape.
pub const TICK_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    #[serde(default = "version")]
    pub version: u32,
    pub symbol: Symbol,
    pub price: Price,
    pub ts: DateTime<Utc>,
    pub seq: i64,
    /// Units available at this price (used by the paper executor to limit fills); none means unlimited.
    #[serde(default)]
    pub volume: Option<Decimal>,
    /// Where the tick came from (`sim`, `csv:<file>`, an exchange name…).
    pub source: String,
}

fn version() -> u32 {
    TICK_VERSION
}

#[derive(Debug, thiserror::Error)]
pub enum TickError {
    #[error("not a tick: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported tick version {0}")]
    Version(u32),
    #[error("volume must not be negative")]
    NegativeVolume,
}

impl Tick {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, TickError> {
        let tick: Tick = serde_json::from_slice(bytes)?;
        if tick.version != TICK_VERSION {
            return Err(TickError::Version(tick.version));
        }
        if tick.volume.is_some_and(|v| v.is_sign_negative() && !v.is_zero()) {
            return Err(TickError::NegativeVolume);
        }
        Ok(Tick { ts: to_micros(tick.ts), ..tick })
    }

    /// The ordering key within the symbol, at PostgreSQL's precision (microseconds): keys read back from the
    /// database must compare equal to the tick's own, or a redelivered tick would look newer than itself.
    pub fn order_key(&self) -> (DateTime<Utc>, i64) {
        (to_micros(self.ts), self.seq)
    }
}

/// A time truncated to whole microseconds, the precision of PostgreSQL's `timestamptz`.
pub fn to_micros(time: DateTime<Utc>) -> DateTime<Utc> {
    chrono::SubsecRound::trunc_subsecs(time, 6)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the chaos test: a tick with nanoseconds, redelivered after its progress was stored (with
    /// microseconds), compared as newer than itself and was applied twice.
    #[test]
    fn order_keys_have_database_precision() {
        let ts = DateTime::parse_from_rfc3339("2026-12-02T01:51:44.620644123Z").unwrap().with_timezone(&Utc);
        let stored = DateTime::parse_from_rfc3339("2026-12-02T01:51:44.620644Z").unwrap().with_timezone(&Utc);
        let tick = Tick {
            version: TICK_VERSION,
            symbol: Symbol::new("ACME").unwrap(),
            price: Price::new("1".parse().unwrap()).unwrap(),
            ts,
            seq: 7,
            volume: None,
            source: "test".into(),
        };
        assert_eq!(tick.order_key(), (stored, 7));
        assert_eq!(Tick::decode(&tick.encode()).unwrap().ts, stored);
    }

    #[test]
    fn ticks_round_trip_and_validate() {
        let tick = Tick {
            version: TICK_VERSION,
            symbol: Symbol::new("ACME").unwrap(),
            price: Price::new("101.25".parse().unwrap()).unwrap(),
            ts: to_micros(Utc::now()),
            seq: 4,
            volume: Some("300".parse().unwrap()),
            source: "sim".into(),
        };
        assert_eq!(Tick::decode(&tick.encode()).unwrap(), tick);
        assert!(Tick::decode(br#"{"symbol": "acme"}"#).is_err());
        let bad_price = br#"{"symbol":"ACME","price":"-1","ts":"2026-01-01T00:00:00Z","seq":1,"source":"x"}"#;
        assert!(Tick::decode(bad_price).is_err());
        let future = br#"{"version":9,"symbol":"ACME","price":"1","ts":"2026-01-01T00:00:00Z","seq":1,"source":"x"}"#;
        assert!(matches!(Tick::decode(future), Err(TickError::Version(9))));
    }
}
