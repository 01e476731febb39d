//! Market data: the tick message on `market.prices`, a seeded geometric-Brownian-motion simulator and a CSV
//! replay feed. Both sources publish the same [`Tick`], keyed by symbol, so consumers cannot tell them apart.

mod csv_feed;
mod publisher;
mod simulator;
mod tick;

pub use csv_feed::{read_csv, CsvError};
pub use publisher::TickPublisher;
pub use simulator::{Simulator, SimulatorConfig, SymbolSpec};
pub use tick::{Tick, TickError, TICK_VERSION};
