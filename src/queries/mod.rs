//! Reads of the read models for the API and the operations commands: every query of a read-model table the
//! GraphQL API makes is here, next to the projections that write the tables, and returns plain rows; the
//! GraphQL layer maps them to its types and holds no SQL (the `/metrics` route still counts a few things of its
//! own). Reads of the event log itself (an aggregate's events and its state as of a point) are the log's
//! (`crate::log`).
//!
//! | module | tables |
//! |--------|--------|
//! | [`portfolios`] | `rm_portfolios`, `rm_positions`, `rm_lots`, `rm_alert_rules`, `alert_firings` |
//! | [`orders`] | `rm_orders`, `rm_executions` |
//! | [`market`] | `latest_prices`, `price_ticks`, `price_bars_1m`, `rm_indicators`, `rm_daily_stats`, `market_ticks` |
//! | [`operations`] | `dead_letters` |
//! | [`performance`] | `rm_portfolio_flows`, `price_bars_1m` |

pub mod market;
pub mod operations;
pub mod orders;
pub mod performance;
pub mod portfolios;
