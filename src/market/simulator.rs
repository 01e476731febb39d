//! A seeded geometric-Brownian-motion price simulator.
//!
//! Each step moves every symbol by `S·exp((μ − σ²/2)·dt + σ·√dt·Z)` with `Z ~ N(0, 1)` from a seeded generator,
//! rounds to the instrument's tick, and gives each tick a volume. The same seed and the same step times give
//! the same ticks. `time_scale` speeds the clock up (3600: each real second moves prices like an hour) so that
//! a demo shows movement.

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use rust_decimal::Decimal;

use super::tick::{Tick, TICK_VERSION};
use crate::domain::values::{echo, Price, Symbol, TickSize, PRICE_MAX};

const SECONDS_PER_YEAR: f64 = 365.25 * 24.0 * 3600.0;

#[derive(Debug, Clone)]
pub struct SymbolSpec {
    pub symbol: Symbol,
    pub initial_price: Price,
    /// Annual drift μ (0.05 = 5 %).
    pub drift: f64,
    /// Annual volatility σ (0.3 = 30 %).
    pub volatility: f64,
    pub tick_size: TickSize,
}

/// Most symbols one simulator publishes (each one is a tick per step).
pub const SIMULATED_SYMBOLS_MAX: usize = 100;
/// Highest starting price accepted for a simulated symbol: a thousandth of the largest price the ledger takes,
/// so that a simulated path has room to move (the simulator also keeps every step within valid prices).
pub const STARTING_PRICE_MAX: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);
/// Annual drift of a symbol given only by name and price.
pub const DRIFT_DEFAULT: f64 = 0.05;
/// Annual volatility of a symbol given only by name and price.
pub const VOLATILITY_DEFAULT: f64 = 0.30;

impl SymbolSpec {
    /// A symbol with a starting price, the default drift and volatility, and a tick of one cent.
    pub fn new(symbol: Symbol, initial_price: Price) -> Self {
        Self { symbol, initial_price, drift: DRIFT_DEFAULT, volatility: VOLATILITY_DEFAULT, tick_size: TickSize::CENT }
    }

    /// Parses `SYMBOL:PRICE[,SYMBOL:PRICE…]` (e.g. `AAPL:190,MSFT:420`): at least one, at most
    /// [`SIMULATED_SYMBOLS_MAX`], each symbol once, each price on the cent grid, from one cent to
    /// [`STARTING_PRICE_MAX`]. The error names the bad entry.
    pub fn parse_list(text: &str) -> Result<Vec<SymbolSpec>, String> {
        let mut specs: Vec<SymbolSpec> = Vec::new();
        for (index, entry) in text.split(',').map(str::trim).enumerate() {
            let shown = format!("{:?}", echo(entry));
            if index == SIMULATED_SYMBOLS_MAX {
                return Err(format!("at most {SIMULATED_SYMBOLS_MAX} symbols"));
            }
            let (symbol, price) =
                entry.split_once(':').ok_or_else(|| format!("{shown}: expected SYMBOL:PRICE, e.g. AAPL:190"))?;
            let symbol = Symbol::new(symbol.trim()).map_err(|e| format!("{shown}: {e}"))?;
            let price = Decimal::from_str_exact(price.trim())
                .map_err(|e| format!("{shown}: price: {e}"))
                .and_then(|price| Price::new(price).map_err(|e| format!("{shown}: {e}")))?;
            if !price.is_on_tick(TickSize::CENT) || price.value() > STARTING_PRICE_MAX {
                return Err(format!("{shown}: price must be whole cents from 0.01 to {STARTING_PRICE_MAX}"));
            }
            if specs.iter().any(|spec| spec.symbol == symbol) {
                return Err(format!("{shown}: {symbol} is listed twice"));
            }
            specs.push(SymbolSpec::new(symbol, price));
        }
        Ok(specs)
    }
}

#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    pub symbols: Vec<SymbolSpec>,
    /// Real milliseconds between steps.
    pub interval_ms: u64,
    pub seed: u64,
    /// Simulated seconds per real second.
    pub time_scale: f64,
    /// Mean units available per tick (volumes are uniform in [mean/2, 3·mean/2]).
    pub volume_mean: u32,
}

impl SimulatorConfig {
    /// Five demo instruments with different volatilities.
    pub fn demo(seed: u64) -> Self {
        let spec = |symbol: &str, price: &str, drift: f64, volatility: f64| SymbolSpec {
            symbol: Symbol::new(symbol).expect("demo symbol"),
            initial_price: Price::new(price.parse().expect("demo price")).expect("demo price"),
            drift,
            volatility,
            tick_size: TickSize::CENT,
        };
        Self {
            symbols: vec![
                spec("ACME", "101.25", 0.08, 0.35),
                spec("GLOBEX", "48.10", 0.05, 0.25),
                spec("INITECH", "12.40", 0.02, 0.60),
                spec("UMBRELLA", "250.00", 0.10, 0.20),
                spec("HOOLI", "730.50", 0.12, 0.45),
            ],
            interval_ms: 500,
            seed,
            time_scale: 3_600.0,
            volume_mean: 500,
        }
    }

    /// The demo's settings with these symbols instead of its five.
    pub fn with_symbols(mut self, symbols: Vec<SymbolSpec>) -> Self {
        self.symbols = symbols;
        self
    }
}

pub struct Simulator {
    config: SimulatorConfig,
    prices: Vec<f64>,
    rng: StdRng,
    seq: i64,
}

impl Simulator {
    pub fn new(config: SimulatorConfig) -> Self {
        let prices = config.symbols.iter().map(|s| s.initial_price.value().to_f64().unwrap_or(1.0)).collect();
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, prices, rng, seq: 0 }
    }

    pub fn config(&self) -> &SimulatorConfig {
        &self.config
    }

    /// A standard normal draw (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.gen();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Advances every symbol by one step and returns their ticks, stamped `now`.
    pub fn step(&mut self, now: DateTime<Utc>) -> Vec<Tick> {
        let dt = self.config.interval_ms as f64 / 1_000.0 * self.config.time_scale / SECONDS_PER_YEAR;
        let mut ticks = Vec::with_capacity(self.config.symbols.len());
        for index in 0..self.config.symbols.len() {
            let z = self.normal();
            let spec = &self.config.symbols[index];
            let (mu, sigma) = (spec.drift, spec.volatility);
            let next = self.prices[index] * ((mu - sigma * sigma / 2.0) * dt + sigma * dt.sqrt() * z).exp();
            // Within the prices the ledger accepts: a path is held at one tick or at the maximum rather than
            // published as something else (a rounding failure used to publish one tick for any price).
            let tick_size = spec.tick_size;
            let lowest = tick_size.value().to_f64().unwrap_or(0.01);
            let next = next.clamp(lowest, PRICE_MAX.to_f64().unwrap_or(f64::MAX));
            self.prices[index] = next;
            let symbol = spec.symbol.clone();
            let price = Decimal::from_f64(next)
                .and_then(|d| Price::round_to_tick(d, tick_size).ok())
                .unwrap_or(Price::round_to_tick(tick_size.value(), tick_size).expect("one tick is a valid price"));
            let mean = self.config.volume_mean.max(2);
            let volume = self.rng.gen_range(mean / 2..=mean + mean / 2);
            self.seq += 1;
            ticks.push(Tick {
                version: TICK_VERSION,
                symbol,
                price,
                ts: super::tick::to_micros(now),
                seq: self.seq,
                volume: Some(Decimal::from(volume)),
                source: "sim".to_string(),
            });
        }
        ticks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symbol_list_gives_symbols_and_starting_prices() {
        let specs = SymbolSpec::parse_list("AAPL:190, MSFT:420.5").unwrap();
        let named: Vec<(String, String)> =
            specs.iter().map(|s| (s.symbol.to_string(), s.initial_price.value().to_string())).collect();
        assert_eq!(named, [("AAPL".into(), "190".into()), ("MSFT".into(), "420.5".into())]);
        let mut simulator = Simulator::new(SimulatorConfig::demo(7).with_symbols(specs));
        let ticks = simulator.step(Utc::now());
        let symbols: Vec<&str> = ticks.iter().map(|t| t.symbol.as_str()).collect();
        assert_eq!(symbols, ["AAPL", "MSFT"], "one tick per configured symbol, no demo symbol");
    }

    #[test]
    fn a_path_stays_within_valid_prices() {
        let symbols = SymbolSpec::parse_list("HIGH:1000000,LOW:0.01").unwrap();
        let mut config = SimulatorConfig::demo(1).with_symbols(symbols);
        // Paths that leave any range within a few dozen steps: one straight up, one straight down.
        config.symbols[0].drift = 10_000.0;
        config.symbols[1].drift = -10_000.0;
        let mut simulator = Simulator::new(config);
        let (mut highest, mut lowest) = (Decimal::ZERO, PRICE_MAX);
        for _ in 0..2_000 {
            for tick in simulator.step(Utc::now()) {
                highest = highest.max(tick.price.value());
                lowest = lowest.min(tick.price.value());
            }
        }
        assert_eq!(highest, PRICE_MAX, "held at the maximum, never published as one tick instead");
        assert_eq!(lowest, TickSize::CENT.value());
    }

    #[test]
    fn a_bad_symbol_list_is_refused_naming_the_entry() {
        for (text, expected) in [
            ("", "expected SYMBOL:PRICE"),
            ("AAPL", "\"AAPL\": expected SYMBOL:PRICE"),
            ("AAPL:abc", "\"AAPL:abc\": price"),
            ("AAPL:0", "\"AAPL:0\""),
            ("AAPL:-5", "\"AAPL:-5\""),
            ("AAPL:0.001", "whole cents"),
            ("AAPL:190.123", "whole cents"),
            ("AAPL:1000000.01", "whole cents from 0.01 to 1000000"),
            ("AAPL:1,AAPL:2", "listed twice"),
            ("AAPL:1,,MSFT:2", "expected SYMBOL:PRICE"),
            ("A B:1", "\"A B:1\""),
        ] {
            let error = SymbolSpec::parse_list(text).err().unwrap_or_else(|| panic!("{text:?} accepted"));
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        let too_many: Vec<String> = (0..=SIMULATED_SYMBOLS_MAX).map(|i| format!("S{i}:1")).collect();
        assert!(SymbolSpec::parse_list(&too_many.join(",")).unwrap_err().contains("at most"));
        assert_eq!(SymbolSpec::parse_list("AAPL:1000000,B:0.01").unwrap().len(), 2, "the bounds themselves");
        let most: Vec<String> = (0..SIMULATED_SYMBOLS_MAX).map(|i| format!("S{i}:1")).collect();
        assert_eq!(SymbolSpec::parse_list(&most.join(",")).unwrap().len(), SIMULATED_SYMBOLS_MAX);
    }

    #[test]
    fn the_same_seed_gives_the_same_prices() {
        let now = Utc::now();
        let mut a = Simulator::new(SimulatorConfig::demo(42));
        let mut b = Simulator::new(SimulatorConfig::demo(42));
        let mut c = Simulator::new(SimulatorConfig::demo(43));
        let (mut same, mut different) = (true, false);
        for _ in 0..50 {
            let (ta, tb, tc) = (a.step(now), b.step(now), c.step(now));
            same &= ta == tb;
            different |= ta.iter().zip(&tc).any(|(x, y)| x.price != y.price);
        }
        assert!(same);
        assert!(different);
    }

    #[test]
    fn prices_stay_on_the_tick_grid_and_move() {
        let mut simulator = Simulator::new(SimulatorConfig::demo(1));
        let first = simulator.step(Utc::now());
        let mut last = first.clone();
        for _ in 0..200 {
            last = simulator.step(Utc::now());
            for tick in &last {
                assert!(tick.price.is_on_tick(TickSize::CENT));
                assert!(tick.volume.unwrap() >= Decimal::from(250));
            }
        }
        assert!(first.iter().zip(&last).any(|(a, b)| a.price != b.price));
        assert!(last.windows(2).all(|w| w[0].seq < w[1].seq));
    }
}
