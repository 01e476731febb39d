//! Order and Portfolio agree — the check an auditor, the chaos test and the property tests run once the process
//! manager has caught up with the log. For every order:
//! - the fills booked on its portfolio (`ExecutionApplied`) add up to the order's cumulative quantity and fees
//!   (every fill the order accepted is booked, once);
//! - an order that is done (filled, cancelled, expired, rejected) holds no reservation;
//! - an open order's reservation is for exactly its leaves quantity.

use std::collections::HashMap;

use rust_decimal::Decimal;
use uuid::Uuid;

use crate::commands::{CommandError, CommandService};
use crate::domain::{Order, OrderStatus, Portfolio};

/// One way an order and its portfolio disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disagreement {
    pub order_id: String,
    pub what: String,
}

impl std::fmt::Display for Disagreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "order {}: {}", self.order_id, self.what)
    }
}

/// Σ quantity and Σ fee per order, from the events of one kind.
async fn fill_totals(
    commands: &CommandService,
    query: &'static str,
) -> Result<HashMap<String, (Decimal, Decimal)>, CommandError> {
    let rows: Vec<(String, Decimal, Decimal)> =
        sqlx::query_as(query).fetch_all(commands.pool()).await.map_err(CommandError::store)?;
    Ok(rows.into_iter().map(|(order, quantity, fee)| (order, (quantity, fee))).collect())
}

/// Every disagreement between the orders and the portfolios in the log (none: they agree).
pub async fn check(commands: &CommandService) -> Result<Vec<Disagreement>, CommandError> {
    let recorded = fill_totals(
        commands,
        "select aggregate_id, sum((payload->'ExecutionRecorded'->>'quantity')::numeric),
                sum((payload->'ExecutionRecorded'->>'fee')::numeric)
           from events where aggregate_type = 'Order' and event_type = 'ExecutionRecorded' group by aggregate_id",
    )
    .await?;
    let booked = fill_totals(
        commands,
        "select payload->'ExecutionApplied'->>'order_id', sum((payload->'ExecutionApplied'->>'quantity')::numeric),
                sum((payload->'ExecutionApplied'->>'fee')::numeric)
           from events where aggregate_type = 'Portfolio' and event_type = 'ExecutionApplied' group by 1",
    )
    .await?;
    let order_ids: Vec<String> =
        sqlx::query_scalar("select distinct aggregate_id from events where aggregate_type = 'Order' order by 1")
            .fetch_all(commands.pool())
            .await
            .map_err(CommandError::store)?;
    let mut portfolios: HashMap<Uuid, Portfolio> = HashMap::new();
    let mut disagreements = Vec::new();
    for order_id in order_ids {
        let (order, _) = commands.load::<Order>(&order_id).await?;
        let Some(terms) = &order.terms else { continue };
        let mut disagree = |what: String| disagreements.push(Disagreement { order_id: order_id.clone(), what });
        let zero = (Decimal::ZERO, Decimal::ZERO);
        let on_order = recorded.get(&order_id).copied().unwrap_or(zero);
        let on_portfolio = booked.get(&order_id).copied().unwrap_or(zero);
        if on_order != (order.cum_quantity, order.fees) {
            disagree(format!("its fills add up to {on_order:?}, its state says {}", order.cum_quantity));
        }
        if on_portfolio != on_order {
            disagree(format!("filled (quantity, fees) {on_order:?}, booked on the portfolio {on_portfolio:?}"));
        }
        let portfolio = match portfolios.get(&terms.portfolio_id.0) {
            Some(portfolio) => portfolio,
            None => {
                let (portfolio, _) = commands.load::<Portfolio>(&terms.portfolio_id.to_string()).await?;
                portfolios.entry(terms.portfolio_id.0).or_insert(portfolio)
            }
        };
        let reservation = portfolio.reservations.get(&terms.order_id);
        match (order.status, reservation) {
            // Not decided yet: the process manager may be between reserving and accepting.
            (OrderStatus::PendingNew, _) => {}
            (status, Some(reservation)) if status.is_terminal() => {
                disagree(format!("{status:?} but {} still reserved", reservation.open_quantity))
            }
            (status, None) if !status.is_terminal() => disagree(format!("{status:?} but nothing reserved")),
            (_, Some(reservation)) if reservation.open_quantity != order.leaves_quantity => {
                disagree(format!("leaves {} but {} reserved", order.leaves_quantity, reservation.open_quantity))
            }
            _ => {}
        }
    }
    Ok(disagreements)
}
