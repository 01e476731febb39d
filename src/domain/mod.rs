//! The domain: aggregates, their commands, events and errors, and the value types they are made of.
//!
//! Nothing here touches infrastructure — no sqlx, axum or rdkafka — and nothing reads the clock: every
//! command carries the time it was issued. That keeps every rule testable with given/when/then and lets a
//! replay reproduce exactly the state the live system had.

pub mod order;
pub mod portfolio;
pub mod upcast;
pub mod values;

pub use order::{
    Order, OrderCommand, OrderError, OrderEvent, OrderServices, OrderStatus, OrderType, Side, TimeInForce,
};
pub use portfolio::{CostBasisMethod, Portfolio, PortfolioCommand, PortfolioError, PortfolioEvent};

#[cfg(test)]
mod stored_names {
    use super::{CostBasisMethod, OrderStatus, Side, TimeInForce};

    /// The names read models store are the ones rows written before `as_str` existed hold (`{:?}`).
    #[test]
    fn stored_names_match_the_rows_already_written() {
        for side in [Side::Buy, Side::Sell] {
            assert_eq!(side.as_str(), format!("{side:?}"));
        }
        for tif in [TimeInForce::Day, TimeInForce::Gtc, TimeInForce::Ioc, TimeInForce::Fok] {
            assert_eq!(tif.as_str(), format!("{tif:?}"));
        }
        for method in [CostBasisMethod::Fifo, CostBasisMethod::AverageCost] {
            assert_eq!(method.as_str(), format!("{method:?}"));
        }
        use OrderStatus::*;
        for status in [PendingNew, New, PartiallyFilled, Filled, Canceled, Rejected, Expired] {
            assert_eq!(status.as_str(), format!("{status:?}"));
        }
    }
}
