//! Alert rules belong to a portfolio: created, cancelled and re-armed by commands on the Portfolio aggregate.
//!
//! The aggregate knows only the rules and their arming number; whether a rule has fired is decided by the
//! alerts projection against market ticks, which records one firing per arming under a deterministic id.
//! Re-arming starts a new arming, so the rule can fire once more.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::domain::values::{Price, Symbol};

/// Rules a portfolio may hold at once.
pub const ALERTS_PER_PORTFOLIO_MAX: usize = 100;
/// Largest percentage a %-change rule may name (±).
pub const ALERT_PERCENT_MAX: Decimal = Decimal::from_parts(1000, 0, 0, false, 0);

/// When an alert fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum AlertCondition {
    /// The last price is at or above `level` (checked on every tick while armed).
    PriceAbove { symbol: Symbol, level: Price },
    /// The last price is at or below `level`.
    PriceBelow { symbol: Symbol, level: Price },
    /// The price moves from below `level` to at or above it (needs a previous tick: edge-triggered).
    CrossingUp { symbol: Symbol, level: Price },
    /// The price moves from above `level` to at or below it.
    CrossingDown { symbol: Symbol, level: Price },
    /// The price has moved by `percent` % from `reference` (positive: a rise of at least that much; negative:
    /// a fall of at least that much).
    PercentChange { symbol: Symbol, reference: Price, percent: Decimal },
    /// The unrealized P&L of the portfolio's position in `symbol` is at or above `threshold`.
    PositionPnlAbove { symbol: Symbol, threshold: Decimal },
    /// The unrealized P&L of the portfolio's position in `symbol` is at or below `threshold`.
    PositionPnlBelow { symbol: Symbol, threshold: Decimal },
}

impl AlertCondition {
    pub fn symbol(&self) -> &Symbol {
        match self {
            Self::PriceAbove { symbol, .. }
            | Self::PriceBelow { symbol, .. }
            | Self::CrossingUp { symbol, .. }
            | Self::CrossingDown { symbol, .. }
            | Self::PercentChange { symbol, .. }
            | Self::PositionPnlAbove { symbol, .. }
            | Self::PositionPnlBelow { symbol, .. } => symbol,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::PriceAbove { .. } => "PriceAbove",
            Self::PriceBelow { .. } => "PriceBelow",
            Self::CrossingUp { .. } => "CrossingUp",
            Self::CrossingDown { .. } => "CrossingDown",
            Self::PercentChange { .. } => "PercentChange",
            Self::PositionPnlAbove { .. } => "PositionPnlAbove",
            Self::PositionPnlBelow { .. } => "PositionPnlBelow",
        }
    }

    /// Why the rule can never be meaningful, if so.
    pub fn invalid_reason(&self) -> Option<String> {
        match self {
            Self::PercentChange { percent, .. } if percent.is_zero() => Some("percent must not be zero".into()),
            Self::PercentChange { percent, .. } if percent.abs() > ALERT_PERCENT_MAX => {
                Some(format!("percent must be within ±{ALERT_PERCENT_MAX}"))
            }
            _ => None,
        }
    }
}

/// A rule as the aggregate keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRule {
    pub condition: AlertCondition,
    /// 1 when created; each re-arm adds one. A firing is recorded at most once per arming.
    pub arming: u32,
    pub canceled: bool,
}
