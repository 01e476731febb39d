//! Value types that reject bad input at construction ("parse, don't validate").
//!
//! Every amount is a [`Decimal`]: binary floats cannot represent 0.10 and must never touch money. Each type
//! bounds its scale and magnitude so that products such as `quantity × price` stay far inside `Decimal`'s
//! 28 significant digits, and serialises as a JSON string so that no consumer parses it into a float.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest ticker symbol accepted, in characters.
pub const SYMBOL_LEN_MAX: usize = 12;
/// Most decimal places a quantity may carry (fractional shares, crypto units).
pub const QUANTITY_SCALE_MAX: u32 = 8;
/// Largest quantity of one order or position.
pub const QUANTITY_MAX: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);
/// Most decimal places a price may carry, before the instrument's tick size is applied.
pub const PRICE_SCALE_MAX: u32 = 8;
/// Largest price per unit.
pub const PRICE_MAX: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);
/// Most decimal places of a money amount (fees can be fractions of a cent).
pub const MONEY_SCALE_MAX: u32 = 8;
/// Largest money amount of a single movement: 10^15.
pub const MONEY_MAX: Decimal = Decimal::from_parts(2_764_472_320, 232_830, 0, false, 0);
/// Longest client-supplied identifier (client order id, execution id, owner), in bytes.
pub const EXTERNAL_ID_LEN_MAX: usize = 64;
/// Longest free text a client attaches to a command (a reference, a reason), in bytes: it is written to the
/// append-only log for ever.
pub const FREE_TEXT_LEN_MAX: usize = 256;
/// Most bytes of a refused input an error message repeats.
pub const ECHO_LEN_MAX: usize = 40;

/// A refused input as an error message shows it: at most [`ECHO_LEN_MAX`] bytes (cut at a character boundary,
/// with the full length), so that an error never echoes a huge or hostile input whole.
pub fn echo(value: &str) -> String {
    if value.len() <= ECHO_LEN_MAX {
        return value.to_string();
    }
    let mut end = ECHO_LEN_MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &value[..end], value.len())
}

/// Why a value was refused. The message names the rule and the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ValueError {
    #[error("symbol {0:?} must be 1 to 12 characters of A-Z, 0-9, '.', '-' or '/', starting with a letter")]
    Symbol(String),
    #[error("quantity {0} must be greater than zero")]
    QuantityNotPositive(Decimal),
    #[error("quantity {0} has more than 8 decimal places")]
    QuantityScale(Decimal),
    #[error("quantity {0} exceeds the maximum of 1000000000")]
    QuantityTooLarge(Decimal),
    #[error("price {0} must be greater than zero")]
    PriceNotPositive(Decimal),
    #[error("price {0} has more than 8 decimal places")]
    PriceScale(Decimal),
    #[error("price {0} exceeds the maximum of 1000000000")]
    PriceTooLarge(Decimal),
    #[error("amount {0} must not be negative")]
    MoneyNegative(Decimal),
    #[error("amount {0} must be greater than zero")]
    AmountNotPositive(Decimal),
    #[error("amount {0} has more than 8 decimal places")]
    MoneyScale(Decimal),
    #[error("amount {0} exceeds the maximum of 10^15")]
    MoneyTooLarge(Decimal),
    #[error("tick size {0} must be greater than zero with at most 8 decimal places")]
    TickSize(Decimal),
    #[error("currency {0:?} must be a three-letter ISO 4217 code such as USD")]
    Currency(String),
    #[error("{field} must be 1 to 64 printable characters, got {value:?}")]
    ExternalId { field: &'static str, value: String },
    #[error("{field} must be 1 to 256 bytes without control characters, got {value:?}")]
    FreeText { field: &'static str, value: String },
    #[error("{0:?} is not a valid UUID")]
    Id(String),
    #[error("{0:?} is not a decimal number")]
    NotADecimal(String),
}

fn scale_of(value: Decimal) -> u32 {
    value.normalize().scale()
}

/// The bounds a decimal value type shares: at most so many decimals, at most so large (each with the error that
/// names the type); the value normalised (no trailing zeros) when within them.
fn bounded(
    value: Decimal,
    (scale_max, scale_error): (u32, fn(Decimal) -> ValueError),
    (max, too_large): (Decimal, fn(Decimal) -> ValueError),
) -> Result<Decimal, ValueError> {
    if scale_of(value) > scale_max {
        Err(scale_error(value))
    } else if value > max {
        Err(too_large(value))
    } else {
        Ok(value.normalize())
    }
}

macro_rules! decimal_newtype_common {
    ($name:ident) => {
        impl $name {
            /// The exact decimal value.
            pub fn value(self) -> Decimal {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.normalize(), f)
            }
        }

        impl TryFrom<Decimal> for $name {
            type Error = ValueError;
            fn try_from(value: Decimal) -> Result<Self, ValueError> {
                Self::new(value)
            }
        }

        impl From<$name> for Decimal {
            fn from(value: $name) -> Decimal {
                value.0
            }
        }

        impl FromStr for $name {
            type Err = ValueError;
            fn from_str(s: &str) -> Result<Self, ValueError> {
                let value = Decimal::from_str_exact(s.trim()).map_err(|_| ValueError::NotADecimal(echo(s)))?;
                Self::new(value)
            }
        }
    };
}

/// What every checked string newtype has: `as_str`, conversion from a `String` through its check (serde
/// deserialises through it; `Self::new(value)` unless another check is given), back into a `String`, and
/// `Display` as the text itself.
macro_rules! string_newtype_common {
    ($name:ident) => {
        string_newtype_common!($name, |value| Self::new(value));
    };
    ($name:ident, |$value:ident| $check:expr) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValueError;
            fn try_from($value: String) -> Result<Self, ValueError> {
                $check
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// A number of units of an instrument: > 0, at most [`QUANTITY_SCALE_MAX`] decimals, at most [`QUANTITY_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "Decimal", into = "Decimal")]
pub struct Quantity(Decimal);

impl Quantity {
    pub fn new(value: Decimal) -> Result<Self, ValueError> {
        if value <= Decimal::ZERO {
            return Err(ValueError::QuantityNotPositive(value));
        }
        bounded(value, (QUANTITY_SCALE_MAX, ValueError::QuantityScale), (QUANTITY_MAX, ValueError::QuantityTooLarge))
            .map(Self)
    }
}
decimal_newtype_common!(Quantity);

/// A price per unit: > 0, at most [`PRICE_SCALE_MAX`] decimals, at most [`PRICE_MAX`].
/// Whether it lies on an instrument's tick grid is checked with [`Price::is_on_tick`] where the tick is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "Decimal", into = "Decimal")]
pub struct Price(Decimal);

impl Price {
    pub fn new(value: Decimal) -> Result<Self, ValueError> {
        if value <= Decimal::ZERO {
            return Err(ValueError::PriceNotPositive(value));
        }
        bounded(value, (PRICE_SCALE_MAX, ValueError::PriceScale), (PRICE_MAX, ValueError::PriceTooLarge)).map(Self)
    }

    /// True when the price is a whole multiple of the tick size.
    pub fn is_on_tick(self, tick: TickSize) -> bool {
        (self.0 % tick.0).is_zero()
    }

    /// The nearest price on the tick grid (ties away from zero), never below one tick.
    pub fn round_to_tick(value: Decimal, tick: TickSize) -> Result<Self, ValueError> {
        let ticks = (value / tick.0).round_dp_with_strategy(0, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
        Self::new((ticks.max(Decimal::ONE) * tick.0).normalize())
    }
}
decimal_newtype_common!(Price);

/// The smallest price increment of an instrument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "Decimal", into = "Decimal")]
pub struct TickSize(Decimal);

impl TickSize {
    /// One cent, the default tick of the demo instruments.
    pub const CENT: TickSize = TickSize(Decimal::from_parts(1, 0, 0, false, 2));

    pub fn new(value: Decimal) -> Result<Self, ValueError> {
        if value <= Decimal::ZERO || scale_of(value) > PRICE_SCALE_MAX || value > PRICE_MAX {
            return Err(ValueError::TickSize(value));
        }
        Ok(Self(value.normalize()))
    }
}
decimal_newtype_common!(TickSize);

/// A non-negative amount of money in the portfolio's base currency (fees, balances).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(try_from = "Decimal", into = "Decimal")]
pub struct Money(Decimal);

impl Money {
    pub const ZERO: Money = Money(Decimal::ZERO);

    pub fn new(value: Decimal) -> Result<Self, ValueError> {
        if value.is_sign_negative() && !value.is_zero() {
            return Err(ValueError::MoneyNegative(value));
        }
        bounded(value, (MONEY_SCALE_MAX, ValueError::MoneyScale), (MONEY_MAX, ValueError::MoneyTooLarge)).map(Self)
    }
}
decimal_newtype_common!(Money);

/// A strictly positive amount of money: what a deposit or withdrawal moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "Decimal", into = "Decimal")]
pub struct Amount(Decimal);

impl Amount {
    pub fn new(value: Decimal) -> Result<Self, ValueError> {
        if value <= Decimal::ZERO {
            return Err(ValueError::AmountNotPositive(value));
        }
        Money::new(value).map(|m| Self(m.0))
    }
}
decimal_newtype_common!(Amount);

/// A ticker symbol: 1 to [`SYMBOL_LEN_MAX`] characters, upper-case letters, digits, `.`, `-`, `/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Symbol(String);

impl Symbol {
    pub fn new(value: impl Into<String>) -> Result<Self, ValueError> {
        let value = value.into();
        let valid = !value.is_empty()
            && value.len() <= SYMBOL_LEN_MAX
            && value.as_bytes()[0].is_ascii_uppercase()
            && value.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'/'));
        if valid {
            Ok(Self(value))
        } else {
            Err(ValueError::Symbol(echo(&value)))
        }
    }
}

string_newtype_common!(Symbol);

/// An ISO 4217 currency code (three upper-case letters).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency(String);

impl Currency {
    pub fn new(value: impl Into<String>) -> Result<Self, ValueError> {
        let value = value.into();
        if value.len() == 3 && value.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Self(value))
        } else {
            Err(ValueError::Currency(echo(&value)))
        }
    }
}

string_newtype_common!(Currency);

fn check_external_id(field: &'static str, value: String) -> Result<String, ValueError> {
    let valid = !value.is_empty() && value.len() <= EXTERNAL_ID_LEN_MAX && value.chars().all(|c| !c.is_control());
    if valid {
        Ok(value)
    } else {
        Err(ValueError::ExternalId { field, value: echo(&value) })
    }
}

macro_rules! external_id {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, ValueError> {
                check_external_id($field, value.into()).map(Self)
            }
        }

        string_newtype_common!($name);
    };
}

external_id!(
    /// The identifier a client gives its order (FIX ClOrdID).
    ClientOrderId,
    "client order id"
);
external_id!(
    /// The identifier of one execution report (FIX ExecID); unique per order, dedupes replayed fills.
    ExecId,
    "execution id"
);
external_id!(
    /// Who owns a portfolio: the subject of the tokens allowed to trade it.
    Owner,
    "owner"
);

/// Free text a client attaches to a command — a deposit's reference, a cancel's reason: 1 to
/// [`FREE_TEXT_LEN_MAX`] bytes without control characters (NUL included, which PostgreSQL cannot store). Events
/// keep such text as a plain string: they are facts of the past, some recorded before this rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FreeText(String);

impl FreeText {
    pub fn new(field: &'static str, value: impl Into<String>) -> Result<Self, ValueError> {
        let value = value.into();
        let valid = !value.is_empty() && value.len() <= FREE_TEXT_LEN_MAX && !value.chars().any(char::is_control);
        if valid {
            Ok(Self(value))
        } else {
            Err(ValueError::FreeText { field, value: echo(&value) })
        }
    }
}

string_newtype_common!(FreeText, |value| Self::new("text", value));

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new time-ordered (v7) id.
            pub fn generate() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl FromStr for $name {
            type Err = ValueError;
            fn from_str(s: &str) -> Result<Self, ValueError> {
                Uuid::parse_str(s).map(Self).map_err(|_| ValueError::Id(echo(s)))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    };
}

uuid_id!(
    /// Identifies an Order aggregate.
    OrderId
);
uuid_id!(
    /// Identifies a Portfolio aggregate.
    PortfolioId
);
uuid_id!(
    /// Identifies an alert rule within a portfolio.
    AlertId
);

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn quantity_rejects_zero_negative_and_excess_scale() {
        assert_eq!(Quantity::new(dec!(0)), Err(ValueError::QuantityNotPositive(dec!(0))));
        assert_eq!(Quantity::new(dec!(-1)), Err(ValueError::QuantityNotPositive(dec!(-1))));
        assert_eq!(Quantity::new(dec!(0.000000001)), Err(ValueError::QuantityScale(dec!(0.000000001))));
        assert!(Quantity::new(dec!(1000000001)).is_err());
        assert_eq!(Quantity::new(dec!(1.50)).unwrap().value().to_string(), "1.5");
    }

    #[test]
    fn trailing_zeros_do_not_count_as_scale() {
        assert!(Quantity::new(dec!(2.000000000000)).is_ok());
        assert!(Price::new(dec!(10.1000000000)).is_ok());
    }

    #[test]
    fn price_tick_checks() {
        let tick = TickSize::CENT;
        assert!(Price::new(dec!(10.01)).unwrap().is_on_tick(tick));
        assert!(!Price::new(dec!(10.015)).unwrap().is_on_tick(tick));
        assert_eq!(Price::round_to_tick(dec!(10.015), tick).unwrap().value(), dec!(10.02));
        assert_eq!(Price::round_to_tick(dec!(0.001), tick).unwrap().value(), dec!(0.01));
        assert!(Price::new(dec!(0)).is_err());
    }

    #[test]
    fn money_and_amount_bounds() {
        assert!(Money::new(dec!(0)).is_ok());
        assert_eq!(Money::new(dec!(-0.01)), Err(ValueError::MoneyNegative(dec!(-0.01))));
        assert_eq!(Amount::new(dec!(0)), Err(ValueError::AmountNotPositive(dec!(0))));
        assert!(Money::new(dec!(1000000000000000)).is_ok());
        assert!(Money::new(dec!(1000000000000001)).is_err());
    }

    #[test]
    fn symbols_and_currencies() {
        assert!(Symbol::new("AAPL").is_ok());
        assert!(Symbol::new("BRK.B").is_ok());
        assert!(Symbol::new("BTC/USD").is_ok());
        for bad in ["", "aapl", "1ABC", "TOOLONGSYMBOL1", "A B"] {
            assert!(Symbol::new(bad).is_err(), "{bad}");
        }
        assert!(Currency::new("USD").is_ok());
        assert!(Currency::new("usd").is_err());
    }

    #[test]
    fn free_text_is_bounded_and_has_no_control_characters() {
        assert_eq!(FreeText::new("reference", "wire 2026-12-06").unwrap().as_str(), "wire 2026-12-06");
        assert!(FreeText::new("reference", "é".repeat(128)).is_ok(), "256 bytes of UTF-8");
        for bad in [String::new(), "x".repeat(257), "a\0b".into(), "line\nbreak".into(), "\u{7f}".into()] {
            assert!(FreeText::new("reference", bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refused_inputs_are_echoed_short() {
        let long = "A".repeat(10_000);
        let message = Symbol::new(long).unwrap_err().to_string();
        assert!(message.len() < 200, "{message}");
        assert!(message.contains("(10000 bytes)"), "{message}");
        assert_eq!(echo("é".repeat(30).as_str()), format!("{}… (60 bytes)", "é".repeat(20)));
    }

    #[test]
    fn serde_round_trips_as_strings_and_validates() {
        let q = Quantity::new(dec!(12.5)).unwrap();
        assert_eq!(serde_json::to_string(&q).unwrap(), "\"12.5\"");
        assert_eq!(serde_json::from_str::<Quantity>("\"12.5\"").unwrap(), q);
        assert!(serde_json::from_str::<Quantity>("\"-3\"").is_err());
        assert!(serde_json::from_str::<Symbol>("\"bad sym\"").is_err());
    }
}
