//! Read models built from the event log and the market-data stream.
//!
//! | projection | input | tables (rebuilt and swapped as a unit) |
//! |------------|-------|----------------------------------------|
//! | `orders` | Order events | `rm_orders`, `rm_executions` |
//! | `positions` | Portfolio events | `rm_portfolios`, `rm_positions`, `rm_lots` |
//! | `prices` | ticks | `latest_prices`, `price_ticks`, `price_bars_1m` |
//! | `analytics` | ticks | `rm_indicators`, `rm_daily_stats`, `analytics_window` |
//! | `alerts` | Portfolio events (rules), ticks (firings) | `rm_alert_rules` (firings are kept across rebuilds) |
//! | `performance` | Portfolio events | `rm_portfolio_flows` (with `price_bars_1m`: equity and returns over time) |
//!
//! Valuations are the view `rm_position_valuations` (positions × latest prices): a tick updates one row of
//! `latest_prices` instead of one row per portfolio holding the symbol.
//!
//! # Exactly-once effect
//! A [`Projection`] only says how one event or tick changes its tables. The [`applier`] wraps every batch in one
//! transaction that locks the projection's progress rows (`<name>_progress`: last sequence per aggregate;
//! `<name>_tick_progress`: last `(ts, seq)` per symbol) in sorted order, skips what was already applied, fills a
//! sequence gap from the PostgreSQL log, applies the rest and moves the progress rows — so an event is applied
//! once whatever Kafka redelivers, even when two workers briefly own a partition during a rebalance. Kafka
//! offsets are committed after the transaction ([`worker`]).

pub mod alerts;
pub mod analytics;
pub mod applier;
pub mod catch_up;
pub mod dead_letters;
pub mod orders;
pub mod performance;
pub mod positions;
pub mod prices;
pub mod rebuild;
pub mod valuation;
pub mod visibility;
pub mod worker;

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::PgConnection;

use crate::log::{RawEvent, RecordedEvent};
use crate::market::Tick;

/// Why one event or tick could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The input itself is bad (cannot be decoded, violates a constraint): dead-letter it and go on.
    #[error("{0}")]
    Poison(String),
    /// The database failed: retry the batch.
    #[error("database: {0}")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for ApplyError {
    fn from(error: sqlx::Error) -> Self {
        // Data exceptions (22xxx) and integrity violations (23xxx) are caused by the input; anything else
        // (connection, timeout, serialization) is worth retrying.
        let poison = matches!(&error, sqlx::Error::Database(db)
            if db.code().is_some_and(|code| code.starts_with("22") || code.starts_with("23")));
        if poison {
            ApplyError::Poison(error.to_string())
        } else {
            ApplyError::Database(error)
        }
    }
}

impl From<serde_json::Error> for ApplyError {
    fn from(error: serde_json::Error) -> Self {
        ApplyError::Poison(format!("undecodable payload: {error}"))
    }
}

/// An event's aggregate id as the UUID the read models key on; anything else is poison.
pub(crate) fn aggregate_uuid(aggregate_id: &str) -> Result<uuid::Uuid, ApplyError> {
    uuid::Uuid::parse_str(aggregate_id).map_err(|e| ApplyError::Poison(e.to_string()))
}

/// How one projection turns inputs into rows. Implementations write unqualified table names: a rebuild runs
/// them with `search_path = shadow` to fill the shadow copies.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// The tables rebuilt and swapped as a unit (without the progress tables, which are implied).
    fn tables(&self) -> &'static [&'static str];
    /// The aggregate type whose events it applies, if any.
    fn aggregate_type(&self) -> Option<&'static str> {
        None
    }
    fn consumes_ticks(&self) -> bool {
        false
    }
    /// Whether a tick older than those already applied may be applied (a dead letter's replay): true only where
    /// every row keeps the newest by time whatever the order of arrival.
    fn applies_late_ticks(&self) -> bool {
        false
    }
    /// Whether a rebuild replays ticks (from the `market_ticks` archive, which the applier fills for such a
    /// projection before each tick it applies) into its tables.
    fn rebuilds_from_ticks(&self) -> bool {
        self.consumes_ticks()
    }
    async fn apply_event(&self, _conn: &mut PgConnection, _event: &RecordedEvent) -> Result<(), ApplyError> {
        Ok(())
    }
    /// Applies several events (of this projection's aggregate type, new ones only, in log order) at once.
    /// The default applies them one by one; projections with many events override it with a set-based
    /// version (load the rows they touch, fold the events in memory, write back in a few statements).
    async fn apply_events(&self, conn: &mut PgConnection, events: &[&RecordedEvent]) -> Result<(), ApplyError> {
        for event in events {
            self.apply_event(conn, event).await?;
        }
        Ok(())
    }
    async fn apply_tick(&self, _conn: &mut PgConnection, _tick: &Tick) -> Result<(), ApplyError> {
        Ok(())
    }
    /// Whether an event of this type can change the projection's tables: a rebuild of a projection without a
    /// [`ReplayFold`] parses and applies only those (the live path applies every event of the aggregate type,
    /// which must leave the others without effect). The default is every type.
    fn applies_event_type(&self, _event_type: &str) -> bool {
        true
    }
    /// Called at the end of a rebuild, under the projection's lock (the live worker paused) and with the rebuilt
    /// tables first on the search path, before they are swapped in or compared: for state the rebuild derives
    /// from outside the log, which may have changed while it ran.
    async fn settle_rebuilt(&self, _conn: &mut PgConnection) -> Result<(), ApplyError> {
        Ok(())
    }
    /// A fold for the bulk phase of a rebuild, if the projection has one (see [`ReplayFold`]); without one a
    /// rebuild applies each read of the log through [`Projection::apply_events`] (events without their
    /// metadata: projections do not read it).
    fn replay_fold(&self) -> Option<Box<dyn ReplayFold>> {
        None
    }
}

/// A projection's state held in memory across the batches of a rebuild: the log is folded into it at the speed
/// of reading, and the net rows are written once (or whenever the state outgrows its memory bound) instead of
/// a read-modify-write of the rows per batch. (A fold may also hold nothing and write each read's rows at once,
/// as an append-only projection does.) Folding the same events must give the same rows as
/// [`Projection::apply_events`] does; the rebuild's verify mode compares the two. The memory bound is on the
/// folds' own estimates ([`ReplayFold::held_bytes`]) summed over the projections rebuilt together; when the sum
/// passes the limit, a fold that gathered its share of it since its last flush flushes.
#[async_trait]
pub trait ReplayFold: Send {
    /// Folds events of the projection's aggregate type (new ones only, in log order). Rows written by an
    /// earlier [`ReplayFold::flush`] are read back through `conn` when an event needs them. An event that
    /// cannot be decoded or applied is skipped (the live worker dead-letters it): its index and the reason are
    /// returned.
    async fn fold(&mut self, conn: &mut PgConnection, events: &[&RawEvent])
        -> Result<Vec<(usize, String)>, ApplyError>;
    /// Roughly the bytes of state held in memory.
    fn held_bytes(&self) -> usize;
    /// Writes the state held to the projection's tables (set-based statements) and forgets it.
    async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), ApplyError>;
}

/// One event of a rebuild's batch, decoded: its aggregate, its log record and its payload.
pub type Decoded<'a, E> = (uuid::Uuid, &'a RawEvent, E);
/// One event of a rebuild's batch that could not be decoded or applied: its index in the batch and the reason.
pub type Skipped = (usize, String);

/// A rebuild batch's events of one aggregate type decoded for a [`ReplayFold`] (payload JSON straight into
/// `E`): each decoded event with its aggregate and its log record, in log order, and the (index, reason) of
/// each one that could not be decoded, as [`ReplayFold::fold`] reports them.
pub fn decode_batch<'a, E: crate::domain::upcast::Stored>(
    events: &[&'a RawEvent],
) -> (Vec<Decoded<'a, E>>, Vec<Skipped>) {
    let mut decoded = Vec::with_capacity(events.len());
    let mut skipped = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let payload = aggregate_uuid(&event.aggregate_id).and_then(|id| Ok((id, event.decode::<E>()?)));
        match payload {
            Ok((id, payload)) => decoded.push((id, *event, payload)),
            Err(error) => skipped.push((index, error.to_string())),
        }
    }
    (decoded, skipped)
}

/// The name of a projection's event progress table.
pub fn progress_table(projection: &dyn Projection) -> String {
    format!("{}_progress", projection.name())
}

/// The name of a projection's tick progress table.
pub fn tick_progress_table(projection: &dyn Projection) -> String {
    format!("{}_tick_progress", projection.name())
}

/// Every table a rebuild of `projection` recreates: its own tables and the progress tables that describe them.
pub fn rebuilt_tables(projection: &dyn Projection) -> Vec<String> {
    let mut tables: Vec<String> = projection.tables().iter().map(|t| t.to_string()).collect();
    if projection.aggregate_type().is_some() {
        tables.push(progress_table(projection));
    }
    if projection.rebuilds_from_ticks() {
        tables.push(tick_progress_table(projection));
    }
    tables
}

/// Settings of the projections that have any.
#[derive(Debug, Clone)]
pub struct ProjectionSettings {
    /// Ticks kept per symbol in `price_ticks`.
    pub price_history_ticks: usize,
    /// Windows (in ticks) of the SMA and EMA indicators.
    pub indicator_windows: Vec<u32>,
}

impl Default for ProjectionSettings {
    fn default() -> Self {
        Self { price_history_ticks: 500, indicator_windows: vec![5, 20] }
    }
}

/// All projections, in the order `--all` processes them.
pub fn all(settings: &ProjectionSettings) -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(orders::OrdersProjection),
        Arc::new(positions::PositionsProjection),
        Arc::new(prices::PricesProjection { history_ticks: settings.price_history_ticks }),
        Arc::new(analytics::AnalyticsProjection { windows: settings.indicator_windows.clone() }),
        Arc::new(alerts::AlertsProjection),
        Arc::new(performance::PerformanceProjection),
    ]
}

/// The projection called `name`.
pub fn by_name(name: &str, settings: &ProjectionSettings) -> Option<Arc<dyn Projection>> {
    all(settings).into_iter().find(|p| p.name() == name)
}

/// The names accepted by [`by_name`].
pub const NAMES: [&str; 6] = ["orders", "positions", "prices", "analytics", "alerts", "performance"];
