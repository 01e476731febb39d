//! Types shared by the roots: enums, plain objects, and the DataLoaders that batch list fan-out.

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::dataloader::Loader;
use async_graphql::{Enum, Json, SimpleObject};
use chrono::{DateTime, Utc};
use ledger::domain;
use ledger::queries::orders::ExecutionRow;
use ledger::queries::portfolios::{AlertFiringRow, AlertRuleRow};
use rust_decimal::Decimal;
use sqlx::PgPool;
use uuid::Uuid;

use super::scalars::LogPosition;

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(name = "Side")]
pub enum SideGql {
    Buy,
    Sell,
}

impl From<SideGql> for domain::Side {
    fn from(side: SideGql) -> Self {
        match side {
            SideGql::Buy => domain::Side::Buy,
            SideGql::Sell => domain::Side::Sell,
        }
    }
}

/// A stored name a read model holds that no GraphQL value matches: a corrupt or newer row, answered as an
/// internal error rather than read as some default.
fn unknown(what: &str, text: &str) -> String {
    format!("unknown {what} {text:?} in a read model")
}

impl SideGql {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "Buy" => Ok(SideGql::Buy),
            "Sell" => Ok(SideGql::Sell),
            _ => Err(unknown("side", text)),
        }
    }
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(name = "OrderType")]
pub enum OrderTypeGql {
    Market,
    Limit,
    /// FIX OrdType 3: a market order once a price reaches `stopPrice` (a buy's at or above, a sell's at or below).
    Stop,
    /// FIX OrdType 4: a limit order (at `limitPrice`) once a price reaches `stopPrice`.
    StopLimit,
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(name = "TimeInForce")]
pub enum TimeInForceGql {
    Day,
    Gtc,
    Ioc,
    Fok,
}

impl From<TimeInForceGql> for domain::TimeInForce {
    fn from(tif: TimeInForceGql) -> Self {
        match tif {
            TimeInForceGql::Day => domain::TimeInForce::Day,
            TimeInForceGql::Gtc => domain::TimeInForce::Gtc,
            TimeInForceGql::Ioc => domain::TimeInForce::Ioc,
            TimeInForceGql::Fok => domain::TimeInForce::Fok,
        }
    }
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(name = "OrderStatus")]
pub enum OrderStatusGql {
    PendingNew,
    New,
    PartiallyFilled,
    Filled,
    Canceled,
    Rejected,
    Expired,
}

impl From<domain::OrderStatus> for OrderStatusGql {
    fn from(status: domain::OrderStatus) -> Self {
        match status {
            domain::OrderStatus::PendingNew => Self::PendingNew,
            domain::OrderStatus::New => Self::New,
            domain::OrderStatus::PartiallyFilled => Self::PartiallyFilled,
            domain::OrderStatus::Filled => Self::Filled,
            domain::OrderStatus::Canceled => Self::Canceled,
            domain::OrderStatus::Rejected => Self::Rejected,
            domain::OrderStatus::Expired => Self::Expired,
        }
    }
}

impl OrderStatusGql {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "PendingNew" => Ok(Self::PendingNew),
            "New" => Ok(Self::New),
            "PartiallyFilled" => Ok(Self::PartiallyFilled),
            "Filled" => Ok(Self::Filled),
            "Canceled" => Ok(Self::Canceled),
            "Rejected" => Ok(Self::Rejected),
            "Expired" => Ok(Self::Expired),
            _ => Err(unknown("order status", text)),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PendingNew => "PendingNew",
            Self::New => "New",
            Self::PartiallyFilled => "PartiallyFilled",
            Self::Filled => "Filled",
            Self::Canceled => "Canceled",
            Self::Rejected => "Rejected",
            Self::Expired => "Expired",
        }
    }
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq, Default)]
#[graphql(name = "CostBasisMethod")]
pub enum CostBasisMethodGql {
    #[default]
    Fifo,
    AverageCost,
}

impl From<CostBasisMethodGql> for domain::CostBasisMethod {
    fn from(method: CostBasisMethodGql) -> Self {
        match method {
            CostBasisMethodGql::Fifo => domain::CostBasisMethod::Fifo,
            CostBasisMethodGql::AverageCost => domain::CostBasisMethod::AverageCost,
        }
    }
}

impl CostBasisMethodGql {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "Fifo" => Ok(Self::Fifo),
            "AverageCost" => Ok(Self::AverageCost),
            _ => Err(unknown("cost basis method", text)),
        }
    }
}

impl OrderTypeGql {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "Market" => Ok(Self::Market),
            "Limit" => Ok(Self::Limit),
            "Stop" => Ok(Self::Stop),
            "StopLimit" => Ok(Self::StopLimit),
            _ => Err(unknown("order type", text)),
        }
    }
}

/// A holding.
#[derive(SimpleObject, Clone, Debug)]
pub struct Position {
    pub symbol: String,
    pub quantity: Decimal,
    /// Units promised to open sell orders.
    pub reserved_quantity: Decimal,
    /// Cost of the units held under the portfolio's method (fees included).
    pub cost_basis: Decimal,
    /// cost basis ÷ quantity; null for a flat position.
    pub average_cost: Option<Decimal>,
    /// Σ open lot costs (FIFO), whatever the portfolio's method.
    pub fifo_cost_basis: Decimal,
    pub realized_pnl: Decimal,
    /// The open lots, oldest first: the order a FIFO sell consumes them in (see docs/accounting.md).
    pub lots: Vec<Lot>,
}

/// Units bought by one fill and not sold yet, at their full cost (quantity × price + fee, less what sells
/// consumed).
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct Lot {
    /// `order id/execution id` of the fill that opened it.
    pub lot_id: String,
    pub quantity: Decimal,
    pub cost: Decimal,
    /// cost ÷ quantity, to 8 decimals.
    pub unit_cost: Decimal,
    pub acquired_at: DateTime<Utc>,
}

impl Lot {
    pub fn new(lot_id: String, quantity: Decimal, cost: Decimal, acquired_at: DateTime<Utc>) -> Self {
        let unit_cost = if quantity.is_zero() { Decimal::ZERO } else { (cost / quantity).round_dp(8).normalize() };
        Self { lot_id, quantity, cost, unit_cost, acquired_at }
    }
}

impl Position {
    /// A position of an aggregate's state (time travel, subscription snapshots).
    pub fn of(symbol: &domain::values::Symbol, position: &domain::portfolio::Position) -> Self {
        let lots = position.lots.iter().map(|l| Lot::new(l.lot_id.clone(), l.quantity, l.cost, l.acquired_at));
        Self::new(
            symbol.to_string(),
            position.quantity,
            position.reserved_quantity,
            position.cost_basis,
            position.fifo_cost_basis(),
            position.realized_pnl,
            lots.collect(),
        )
    }

    pub fn new(
        symbol: String,
        quantity: Decimal,
        reserved: Decimal,
        cost: Decimal,
        fifo: Decimal,
        realized: Decimal,
        lots: Vec<Lot>,
    ) -> Self {
        let average_cost = (!quantity.is_zero()).then(|| (cost / quantity).round_dp(8).normalize());
        Self {
            symbol,
            quantity,
            reserved_quantity: reserved,
            cost_basis: cost,
            average_cost,
            fifo_cost_basis: fifo,
            realized_pnl: realized,
            lots,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct PositionValuation {
    pub symbol: String,
    pub quantity: Decimal,
    pub cost_basis: Decimal,
    pub last_price: Option<Decimal>,
    pub price_as_of: Option<DateTime<Utc>>,
    /// null when the symbol never had a price (see `missingReason`) — never 0.
    pub market_value: Option<Decimal>,
    pub unrealized_pnl: Option<Decimal>,
    /// The price is older than the configured age.
    pub stale: bool,
    pub missing_reason: Option<String>,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Valuation {
    pub cash: Decimal,
    pub market_value: Option<Decimal>,
    pub unrealized_pnl: Option<Decimal>,
    /// cash + market value; null (with `missingReason`) when a position has no price.
    pub total_equity: Option<Decimal>,
    pub stale: bool,
    pub missing_reason: Option<String>,
    pub positions: Vec<PositionValuation>,
}

impl From<ledger::projections::valuation::PortfolioValuation> for Valuation {
    fn from(v: ledger::projections::valuation::PortfolioValuation) -> Self {
        Valuation {
            cash: v.cash,
            market_value: v.market_value,
            unrealized_pnl: v.unrealized_pnl,
            total_equity: v.total_equity,
            stale: v.stale,
            missing_reason: v.missing_reason,
            positions: v
                .positions
                .into_iter()
                .map(|p| PositionValuation {
                    symbol: p.symbol,
                    quantity: p.quantity,
                    cost_basis: p.cost_basis,
                    last_price: p.last_price,
                    price_as_of: p.price_as_of,
                    market_value: p.market_value,
                    unrealized_pnl: p.unrealized_pnl,
                    stale: p.stale,
                    missing_reason: p.missing_reason,
                })
                .collect(),
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Execution {
    pub order_id: Uuid,
    pub exec_id: String,
    pub portfolio_id: Uuid,
    pub symbol: String,
    pub side: String,
    pub quantity: Decimal,
    pub price: Decimal,
    pub fee: Decimal,
    pub executed_at: DateTime<Utc>,
    /// Global position of the event that recorded it.
    pub global_position: i64,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct AlertRule {
    #[graphql(name = "id")]
    pub alert_id: Uuid,
    pub portfolio_id: Uuid,
    pub kind: String,
    pub symbol: String,
    pub condition: Json<serde_json::Value>,
    /// 1 when created; each re-arm adds one.
    pub arming: i32,
    /// `armed`, `fired` or `canceled`.
    pub status: String,
}

impl From<AlertRuleRow> for AlertRule {
    fn from(row: AlertRuleRow) -> Self {
        AlertRule {
            alert_id: row.alert_id,
            portfolio_id: row.portfolio_id,
            kind: row.kind,
            symbol: row.symbol,
            condition: Json(row.condition),
            arming: row.arming,
            status: row.status,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct AlertFiring {
    #[graphql(name = "id")]
    pub firing_id: Uuid,
    pub alert_id: Uuid,
    pub portfolio_id: Uuid,
    pub arming: i32,
    pub kind: String,
    pub symbol: String,
    pub price: Decimal,
    /// The price, % change or P&L that met the condition.
    pub observed_value: Decimal,
    pub fired_at: DateTime<Utc>,
}

impl From<AlertFiringRow> for AlertFiring {
    fn from(row: AlertFiringRow) -> Self {
        let AlertFiringRow { firing_id, alert_id, portfolio_id, arming, kind, symbol, price, observed_value, fired_at } =
            row;
        AlertFiring { firing_id, alert_id, portfolio_id, arming, kind, symbol, price, observed_value, fired_at }
    }
}

impl From<ExecutionRow> for Execution {
    fn from(row: ExecutionRow) -> Self {
        let ExecutionRow {
            order_id,
            exec_id,
            portfolio_id,
            symbol,
            side,
            quantity,
            price,
            fee,
            executed_at,
            global_position,
        } = row;
        Execution { order_id, exec_id, portfolio_id, symbol, side, quantity, price, fee, executed_at, global_position }
    }
}

/// One event of the log.
#[derive(SimpleObject, Clone, Debug)]
pub struct Event {
    pub position: LogPosition,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Json<serde_json::Value>,
    pub metadata: Json<serde_json::Value>,
    pub recorded_at: DateTime<Utc>,
}

impl From<&ledger::log::RecordedEvent> for Event {
    fn from(e: &ledger::log::RecordedEvent) -> Self {
        Event {
            position: LogPosition(e.position),
            event_id: e.event_id,
            aggregate_type: e.aggregate_type.clone(),
            aggregate_id: e.aggregate_id.clone(),
            sequence: e.sequence,
            event_type: e.event_type.clone(),
            event_version: e.event_version.clone(),
            payload: Json(e.payload.clone()),
            metadata: Json(e.metadata.clone()),
            recorded_at: e.recorded_at,
        }
    }
}

/// What a command wrote. Idempotent repeats return exactly the first answer.
#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct CommandResult {
    pub aggregate_id: String,
    pub events: Vec<CommittedEvent>,
    /// Position of the last event written (wait for read models to reach it to read your own writes).
    pub last_position: Option<LogPosition>,
}

#[derive(SimpleObject, Clone, Debug, PartialEq)]
pub struct CommittedEvent {
    pub sequence: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub position: LogPosition,
}

impl From<ledger::commands::CommandOutcome> for CommandResult {
    fn from(outcome: ledger::commands::CommandOutcome) -> Self {
        CommandResult {
            last_position: outcome.last_position().map(LogPosition),
            aggregate_id: outcome.aggregate_id,
            events: outcome
                .events
                .into_iter()
                .map(|e| CommittedEvent {
                    sequence: e.sequence,
                    event_id: e.event_id,
                    event_type: e.event_type,
                    position: LogPosition(e.position),
                })
                .collect(),
        }
    }
}

/// Batches the lists that fan out per portfolio or order.
pub struct Loaders {
    pub pool: PgPool,
}

/// Key: positions of a portfolio.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PositionsOf(pub Uuid);

/// Key: executions of an order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExecutionsOf(pub Uuid);

impl Loader<PositionsOf> for Loaders {
    type Value = Vec<Position>;
    type Error = Arc<sqlx::Error>;

    async fn load(&self, keys: &[PositionsOf]) -> Result<HashMap<PositionsOf, Vec<Position>>, Self::Error> {
        let ids: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
        let rows = ledger::queries::portfolios::positions(&self.pool, &ids).await.map_err(Arc::new)?;
        let mut lots: HashMap<(Uuid, String), Vec<Lot>> = HashMap::new();
        for lot in ledger::queries::portfolios::open_lots(&self.pool, &ids).await.map_err(Arc::new)? {
            lots.entry((lot.portfolio_id, lot.symbol)).or_default().push(Lot::new(
                lot.lot_id,
                lot.quantity,
                lot.cost,
                lot.acquired_at,
            ));
        }
        let mut out: HashMap<PositionsOf, Vec<Position>> = keys.iter().map(|k| (*k, Vec::new())).collect();
        for row in rows {
            let open = lots.remove(&(row.portfolio_id, row.symbol.clone())).unwrap_or_default();
            out.entry(PositionsOf(row.portfolio_id)).or_default().push(Position::new(
                row.symbol,
                row.quantity,
                row.reserved_quantity,
                row.cost_basis,
                row.fifo_cost_basis,
                row.realized_pnl,
                open,
            ));
        }
        Ok(out)
    }
}

impl Loader<ExecutionsOf> for Loaders {
    type Value = Vec<Execution>;
    type Error = Arc<sqlx::Error>;

    async fn load(&self, keys: &[ExecutionsOf]) -> Result<HashMap<ExecutionsOf, Vec<Execution>>, Self::Error> {
        let ids: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
        let rows = ledger::queries::orders::order_executions(&self.pool, &ids).await.map_err(Arc::new)?;
        let mut out: HashMap<ExecutionsOf, Vec<Execution>> = keys.iter().map(|k| (*k, Vec::new())).collect();
        for row in rows {
            out.entry(ExecutionsOf(row.order_id)).or_default().push(row.into());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name the projections store parses to the matching GraphQL value; anything else is an error, never
    /// a default.
    #[test]
    fn stored_names_parse_and_unknown_ones_are_errors() {
        use domain::OrderStatus::*;
        for status in [PendingNew, New, PartiallyFilled, Filled, Canceled, Rejected, Expired] {
            assert_eq!(OrderStatusGql::parse(status.as_str()), Ok(OrderStatusGql::from(status)));
        }
        for side in [domain::Side::Buy, domain::Side::Sell] {
            assert_eq!(domain::Side::from(SideGql::parse(side.as_str()).unwrap()), side);
        }
        for method in [domain::CostBasisMethod::Fifo, domain::CostBasisMethod::AverageCost] {
            assert_eq!(domain::CostBasisMethod::from(CostBasisMethodGql::parse(method.as_str()).unwrap()), method);
        }
        let limit = ledger::domain::values::Price::new(Decimal::ONE).unwrap();
        for (order_type, expected) in [
            (domain::OrderType::Market, OrderTypeGql::Market),
            (domain::OrderType::Limit { limit_price: limit }, OrderTypeGql::Limit),
            (domain::OrderType::Stop { stop_price: limit }, OrderTypeGql::Stop),
            (domain::OrderType::StopLimit { stop_price: limit, limit_price: limit }, OrderTypeGql::StopLimit),
        ] {
            assert_eq!(OrderTypeGql::parse(order_type.as_str()), Ok(expected));
        }
        assert!(SideGql::parse("sell").is_err() && SideGql::parse("").is_err());
        assert!(OrderStatusGql::parse("Done").is_err());
        assert!(CostBasisMethodGql::parse("Lifo").is_err());
        assert!(OrderTypeGql::parse("Trailing").is_err());
    }
}
