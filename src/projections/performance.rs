//! The flows behind a portfolio's performance: one row per event that changes its cash, holdings or net
//! deposits (`rm_portfolio_flows`), at the time the event says it happened. Equity at any time is these
//! changes up to it valued at the prices of that time; [`crate::queries::performance`] computes the equity
//! curve and the returns from them and the price bars (docs/performance.md).
//!
//! Append-only and set-based: a batch writes its rows with one statement; a repeated event (same portfolio and
//! sequence) writes nothing. A rebuild runs the same statement for each read of the log (its fold holds nothing).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{aggregate_uuid, decode_batch, ApplyError, Projection, ReplayFold, Skipped};
use crate::domain::order::Side;
use crate::domain::PortfolioEvent;
use crate::log::{RawEvent, RecordedEvent};

pub struct PerformanceProjection;

/// One change of a portfolio, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    pub at: DateTime<Utc>,
    pub cash_delta: Decimal,
    pub deposit_delta: Decimal,
    /// A fill's symbol, quantity change (+ bought, − sold) and price.
    pub fill: Option<(String, Decimal, Decimal)>,
}

/// The flow an event makes, if it makes one. The opening makes an empty one: the start of the portfolio's
/// history.
pub fn flow(event: &PortfolioEvent) -> Option<Flow> {
    let cash = |at: DateTime<Utc>, delta: Decimal| Flow { at, cash_delta: delta, deposit_delta: delta, fill: None };
    match event {
        PortfolioEvent::PortfolioOpened { opened_at, .. } => Some(cash(*opened_at, Decimal::ZERO)),
        PortfolioEvent::CashDeposited { amount, at, .. } => Some(cash(*at, amount.value())),
        PortfolioEvent::CashWithdrawn { amount, at, .. } => Some(cash(*at, -amount.value())),
        PortfolioEvent::ExecutionApplied { symbol, side, quantity, price, cash_delta, executed_at, .. } => {
            let quantity = match side {
                Side::Buy => quantity.value(),
                Side::Sell => -quantity.value(),
            };
            Some(Flow {
                at: *executed_at,
                cash_delta: *cash_delta,
                deposit_delta: Decimal::ZERO,
                fill: Some((symbol.to_string(), quantity, price.value())),
            })
        }
        _ => None,
    }
}

#[async_trait]
impl Projection for PerformanceProjection {
    fn name(&self) -> &'static str {
        "performance"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["rm_portfolio_flows"]
    }

    fn aggregate_type(&self) -> Option<&'static str> {
        Some("Portfolio")
    }

    /// One event alone (a batch applied again event by event to skip a poison one, a dead letter's replay).
    async fn apply_event(&self, conn: &mut PgConnection, event: &RecordedEvent) -> Result<(), ApplyError> {
        self.apply_events(conn, &[event]).await
    }

    async fn apply_events(&self, conn: &mut PgConnection, events: &[&RecordedEvent]) -> Result<(), ApplyError> {
        let mut flows = Vec::with_capacity(events.len());
        for event in events {
            let id = aggregate_uuid(&event.aggregate_id)?;
            if let Some(flow) = flow(&event.decode::<PortfolioEvent>()?) {
                flows.push((id, event.sequence, flow));
            }
        }
        insert_flows(conn, flows).await
    }

    fn replay_fold(&self) -> Option<Box<dyn ReplayFold>> {
        Some(Box::new(PerformanceFold))
    }
}

/// A rebuild's fold: each read of the log decoded straight into typed events and its flows written with the
/// live statement (the table is append-only, so there is no state to hold between reads).
struct PerformanceFold;

#[async_trait]
impl ReplayFold for PerformanceFold {
    async fn fold(&mut self, conn: &mut PgConnection, events: &[&RawEvent]) -> Result<Vec<Skipped>, ApplyError> {
        let (decoded, skipped) = decode_batch::<PortfolioEvent>(events);
        let flows = decoded.into_iter().filter_map(|(id, raw, event)| Some((id, raw.sequence, flow(&event)?)));
        insert_flows(conn, flows.collect()).await?;
        Ok(skipped)
    }

    fn held_bytes(&self) -> usize {
        0
    }

    async fn flush(&mut self, _conn: &mut PgConnection) -> Result<(), ApplyError> {
        Ok(())
    }
}

/// Writes `(portfolio, sequence, flow)` rows with one statement; a row already there is left as it is.
async fn insert_flows(conn: &mut PgConnection, flows: Vec<(Uuid, i64, Flow)>) -> Result<(), ApplyError> {
    if flows.is_empty() {
        return Ok(());
    }
    let mut ids: Vec<Uuid> = Vec::with_capacity(flows.len());
    let mut sequences = Vec::with_capacity(flows.len());
    let mut times = Vec::with_capacity(flows.len());
    let (mut cash, mut deposits, mut quantities) = (Vec::new(), Vec::new(), Vec::new());
    let (mut symbols, mut prices): (Vec<Option<String>>, Vec<Option<Decimal>>) = (Vec::new(), Vec::new());
    for (id, sequence, flow) in flows {
        ids.push(id);
        sequences.push(sequence);
        times.push(flow.at);
        cash.push(flow.cash_delta);
        deposits.push(flow.deposit_delta);
        let (symbol, quantity, price) = match flow.fill {
            Some((symbol, quantity, price)) => (Some(symbol), quantity, Some(price)),
            None => (None, Decimal::ZERO, None),
        };
        symbols.push(symbol);
        quantities.push(quantity);
        prices.push(price);
    }
    sqlx::query(
        "insert into rm_portfolio_flows
                (portfolio_id, sequence, at, cash_delta, deposit_delta, symbol, quantity_delta, price)
         select * from unnest($1::uuid[], $2::bigint[], $3::timestamptz[], $4::numeric[], $5::numeric[],
                              $6::text[], $7::numeric[], $8::numeric[])
         on conflict (portfolio_id, sequence) do nothing",
    )
    .bind(&ids)
    .bind(&sequences)
    .bind(&times)
    .bind(&cash)
    .bind(&deposits)
    .bind(&symbols)
    .bind(&quantities)
    .bind(&prices)
    .execute(conn)
    .await?;
    Ok(())
}
