//! The domain: aggregates, their commands, events and errors, and the value types they are made of.
//!
//! Nothing here touches infrastructure — no sqlx, axum or rdkafka — and nothing reads the clock: every
//! command carries the time it was issued. That keeps every rule testable with given/when/then and lets a
//! replay reproduce exactly the state the live system had.

pub mod order;
pub mod portfolio;
pub mod values;

pub use order::{
    Order, OrderCommand, OrderError, OrderEvent, OrderServices, OrderStatus, OrderType, Side, TimeInForce,
};
pub use portfolio::{CostBasisMethod, Portfolio, PortfolioCommand, PortfolioError, PortfolioEvent};
