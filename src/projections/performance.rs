//! The flows behind a portfolio's performance: one row per event that changes its cash, holdings or net
//! deposits (`rm_portfolio_flows`), at the time the event says it happened. Equity at any time is these
//! changes up to it valued at the prices of that time; [`crate::queries::performance`] computes the equity
//! curve and the returns from them and the price bars (docs/performance.md).
//!
//! Append-only and set-based: a batch writes its rows with one statement; a repeated event (same portfolio and
//! sequence) writes nothing. A rebuild runs the same statement batch by batch.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{aggregate_uuid, ApplyError, Projection};
use crate::domain::order::Side;
use crate::domain::PortfolioEvent;
use crate::log::RecordedEvent;

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

    async fn apply_events(&self, conn: &mut PgConnection, events: &[&RecordedEvent]) -> Result<(), ApplyError> {
        let mut ids: Vec<Uuid> = Vec::with_capacity(events.len());
        let mut sequences = Vec::with_capacity(events.len());
        let mut times = Vec::with_capacity(events.len());
        let (mut cash, mut deposits, mut quantities) = (Vec::new(), Vec::new(), Vec::new());
        let (mut symbols, mut prices): (Vec<Option<String>>, Vec<Option<Decimal>>) = (Vec::new(), Vec::new());
        for event in events {
            let id = aggregate_uuid(&event.aggregate_id)?;
            let Some(flow) = flow(&event.decode::<PortfolioEvent>()?) else { continue };
            ids.push(id);
            sequences.push(event.sequence);
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
        if ids.is_empty() {
            return Ok(());
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
}
