//! Alert rules (from Portfolio events) and their firings (from ticks).
//!
//! A firing's id is a UUID v5 of `(alert id, arming)`: redelivered or replayed ticks cannot fire an arming twice
//! (the id is the primary key and the rule leaves the `armed` state in the same transaction). Firings and the
//! last price seen per symbol are kept across rebuilds — a rebuild recreates the rules from the log and reads
//! their state from the firings, so it never fires anything again.
//!
//! Evaluation, on each tick of the rule's symbol: above/below compare the price with the level; crossings
//! need the previous tick (below → at or above the level, or the reverse); % change compares with the
//! reference price; P&L rules value the portfolio's position at the tick's price (quantity × price − cost basis,
//! from the positions read model).

use async_trait::async_trait;
use rust_decimal::Decimal;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::{aggregate_uuid, ApplyError, Projection};
use crate::domain::portfolio::AlertCondition;
use crate::domain::PortfolioEvent;
use crate::log::RecordedEvent;
use crate::market::Tick;

/// Namespace of firing ids (UUID v5).
pub const FIRING_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_6467_6572_2d61_6c65_7274_2d66_6972);

/// The deterministic id of the firing of `alert_id` at `arming`.
pub fn firing_id(alert_id: Uuid, arming: i32) -> Uuid {
    Uuid::new_v5(&FIRING_NAMESPACE, format!("{alert_id}/{arming}").as_bytes())
}

/// The alert id under which a portfolio's deficit notices are recorded (one per portfolio; the arming is the
/// sequence of the `DeficitIncurred` event).
pub fn deficit_notice_id(portfolio_id: Uuid) -> Uuid {
    Uuid::new_v5(&FIRING_NAMESPACE, format!("deficit/{portfolio_id}").as_bytes())
}

pub struct AlertsProjection;

/// What a tick makes of a rule: fire (with the value that triggered it) or not.
pub fn evaluate(
    condition: &AlertCondition,
    price: Decimal,
    previous: Option<Decimal>,
    position: Option<(Decimal, Decimal)>,
) -> Option<Decimal> {
    match condition {
        AlertCondition::PriceAbove { level, .. } => (price >= level.value()).then_some(price),
        AlertCondition::PriceBelow { level, .. } => (price <= level.value()).then_some(price),
        AlertCondition::CrossingUp { level, .. } => {
            previous.filter(|p| *p < level.value() && price >= level.value()).map(|_| price)
        }
        AlertCondition::CrossingDown { level, .. } => {
            previous.filter(|p| *p > level.value() && price <= level.value()).map(|_| price)
        }
        AlertCondition::PercentChange { reference, percent, .. } => {
            let change = (price - reference.value()) * Decimal::ONE_HUNDRED / reference.value();
            let hit = if percent.is_sign_positive() { change >= *percent } else { change <= *percent };
            hit.then_some(change.round_dp(4))
        }
        AlertCondition::PositionPnlAbove { threshold, .. } => {
            position.map(|(quantity, cost)| quantity * price - cost).filter(|pnl| pnl >= threshold)
        }
        AlertCondition::PositionPnlBelow { threshold, .. } => {
            position.map(|(quantity, cost)| quantity * price - cost).filter(|pnl| pnl <= threshold)
        }
    }
}

async fn status_for(conn: &mut PgConnection, alert_id: Uuid, arming: i32) -> Result<&'static str, ApplyError> {
    let fired: bool =
        sqlx::query_scalar("select exists (select 1 from public.alert_firings where alert_id = $1 and arming = $2)")
            .bind(alert_id)
            .bind(arming)
            .fetch_one(conn)
            .await?;
    Ok(if fired { "fired" } else { "armed" })
}

#[async_trait]
impl Projection for AlertsProjection {
    fn name(&self) -> &'static str {
        "alerts"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["rm_alert_rules"]
    }

    fn aggregate_type(&self) -> Option<&'static str> {
        Some("Portfolio")
    }

    fn consumes_ticks(&self) -> bool {
        true
    }

    fn rebuilds_from_ticks(&self) -> bool {
        false
    }

    /// A rule rebuilt as armed whose arming fired while the rebuild ran (its status was read from the firings
    /// when its event was applied) is fired.
    async fn settle_rebuilt(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        sqlx::query(
            "update rm_alert_rules r set status = 'fired'
              where r.status = 'armed'
                and exists (select 1 from public.alert_firings f where f.alert_id = r.alert_id and f.arming = r.arming)",
        )
        .execute(conn)
        .await?;
        Ok(())
    }

    fn applies_event_type(&self, event_type: &str) -> bool {
        event_type.starts_with("Alert") || event_type == "DeficitIncurred"
    }

    async fn apply_event(&self, conn: &mut PgConnection, event: &RecordedEvent) -> Result<(), ApplyError> {
        if !self.applies_event_type(&event.event_type) {
            return Ok(());
        }
        let portfolio_event: PortfolioEvent = event.decode()?;
        let portfolio = aggregate_uuid(&event.aggregate_id)?;
        match portfolio_event {
            // The owner's notice that a fill left the portfolio in deficit: a firing of its own kind, pushed like
            // any other (`alertFired`), once per event (its id derives from the event's).
            PortfolioEvent::DeficitIncurred { symbol, deficit, .. } => {
                sqlx::query(
                    "insert into public.alert_firings (firing_id, alert_id, portfolio_id, arming, kind, symbol, price,
                            observed_value, tick_ts, tick_seq, fired_at)
                     values ($1, $2, $3, $4, 'DEFICIT', $5, 0, $6, $7, $8, $7)
                     on conflict do nothing",
                )
                .bind(Uuid::new_v5(&FIRING_NAMESPACE, event.event_id.as_bytes()))
                .bind(deficit_notice_id(portfolio))
                .bind(portfolio)
                .bind(i32::try_from(event.sequence).map_err(|e| ApplyError::Poison(e.to_string()))?)
                .bind(symbol.as_str())
                .bind(deficit)
                .bind(event.recorded_at)
                .bind(event.sequence)
                .execute(conn)
                .await?;
            }
            PortfolioEvent::AlertCreated { alert_id, condition, at } => {
                let status = status_for(conn, alert_id.0, 1).await?;
                sqlx::query(
                    "insert into rm_alert_rules (alert_id, portfolio_id, kind, symbol, condition, arming, status,
                            created_at, updated_at)
                     values ($1, $2, $3, $4, $5, 1, $6, $7, $7) on conflict (alert_id) do nothing",
                )
                .bind(alert_id.0)
                .bind(portfolio)
                .bind(condition.kind())
                .bind(condition.symbol().as_str())
                .bind(serde_json::to_value(&condition)?)
                .bind(status)
                .bind(at)
                .execute(conn)
                .await?;
            }
            PortfolioEvent::AlertCanceled { alert_id, at } => {
                sqlx::query("update rm_alert_rules set status = 'canceled', updated_at = $2 where alert_id = $1")
                    .bind(alert_id.0)
                    .bind(at)
                    .execute(conn)
                    .await?;
            }
            PortfolioEvent::AlertRearmed { alert_id, arming, at } => {
                let status = status_for(conn, alert_id.0, arming as i32).await?;
                sqlx::query("update rm_alert_rules set arming = $2, status = $3, updated_at = $4 where alert_id = $1")
                    .bind(alert_id.0)
                    .bind(arming as i32)
                    .bind(status)
                    .bind(at)
                    .execute(conn)
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn apply_tick(&self, conn: &mut PgConnection, tick: &Tick) -> Result<(), ApplyError> {
        let symbol = tick.symbol.as_str();
        let price = tick.price.value();
        let previous: Option<Decimal> =
            sqlx::query_scalar("select last_price from public.alert_tick_state where symbol = $1")
                .bind(symbol)
                .fetch_optional(&mut *conn)
                .await?;
        let rules = sqlx::query(
            "select alert_id, portfolio_id, arming, condition from rm_alert_rules
              where symbol = $1 and status = 'armed' order by alert_id",
        )
        .bind(symbol)
        .fetch_all(&mut *conn)
        .await?;
        for rule in rules {
            let alert_id: Uuid = rule.get("alert_id");
            let portfolio: Uuid = rule.get("portfolio_id");
            let arming: i32 = rule.get("arming");
            let condition: AlertCondition = serde_json::from_value(rule.get("condition"))?;
            let position = match condition {
                AlertCondition::PositionPnlAbove { .. } | AlertCondition::PositionPnlBelow { .. } => {
                    sqlx::query_as::<_, (Decimal, Decimal)>(
                        "select quantity, cost_basis from public.rm_positions
                          where portfolio_id = $1 and symbol = $2 and quantity <> 0",
                    )
                    .bind(portfolio)
                    .bind(symbol)
                    .fetch_optional(&mut *conn)
                    .await?
                }
                _ => None,
            };
            let Some(observed) = evaluate(&condition, price, previous, position) else { continue };
            sqlx::query(
                "insert into public.alert_firings (firing_id, alert_id, portfolio_id, arming, kind, symbol, price,
                        observed_value, tick_ts, tick_seq)
                 values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) on conflict do nothing",
            )
            .bind(firing_id(alert_id, arming))
            .bind(alert_id)
            .bind(portfolio)
            .bind(arming)
            .bind(condition.kind())
            .bind(symbol)
            .bind(price)
            .bind(observed)
            .bind(tick.ts)
            .bind(tick.seq)
            .execute(&mut *conn)
            .await?;
            // updated_at follows the rule's own events only, so a rebuilt table equals the live one.
            sqlx::query("update rm_alert_rules set status = 'fired' where alert_id = $1 and arming = $2")
                .bind(alert_id)
                .bind(arming)
                .execute(&mut *conn)
                .await?;
        }
        sqlx::query(
            "insert into public.alert_tick_state (symbol, last_price, last_ts, last_seq) values ($1, $2, $3, $4)
             on conflict (symbol) do update set last_price = excluded.last_price, last_ts = excluded.last_ts,
                                                last_seq = excluded.last_seq",
        )
        .bind(symbol)
        .bind(price)
        .bind(tick.ts)
        .bind(tick.seq)
        .execute(conn)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::values::{Price, Symbol};

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn level(s: &str) -> Price {
        Price::new(d(s)).unwrap()
    }

    #[test]
    fn each_condition() {
        let symbol = Symbol::new("ACME").unwrap();
        let above = AlertCondition::PriceAbove { symbol: symbol.clone(), level: level("100") };
        assert_eq!(evaluate(&above, d("100"), None, None), Some(d("100")));
        assert_eq!(evaluate(&above, d("99.99"), None, None), None);
        let below = AlertCondition::PriceBelow { symbol: symbol.clone(), level: level("100") };
        assert_eq!(evaluate(&below, d("100.01"), None, None), None);
        let up = AlertCondition::CrossingUp { symbol: symbol.clone(), level: level("100") };
        assert_eq!(evaluate(&up, d("101"), None, None), None, "no previous tick: no crossing");
        assert_eq!(evaluate(&up, d("101"), Some(d("101")), None), None, "already above: no crossing");
        assert_eq!(evaluate(&up, d("100"), Some(d("99")), None), Some(d("100")));
        let down = AlertCondition::CrossingDown { symbol: symbol.clone(), level: level("100") };
        assert_eq!(evaluate(&down, d("99"), Some(d("100.5")), None), Some(d("99")));
        assert_eq!(evaluate(&down, d("99"), Some(d("100")), None), None);
        let rise = AlertCondition::PercentChange { symbol: symbol.clone(), reference: level("50"), percent: d("10") };
        assert_eq!(evaluate(&rise, d("55"), None, None), Some(d("10")));
        assert_eq!(evaluate(&rise, d("54.99"), None, None), None);
        let fall = AlertCondition::PercentChange { symbol: symbol.clone(), reference: level("50"), percent: d("-10") };
        assert_eq!(evaluate(&fall, d("45"), None, None), Some(d("-10")));
        let pnl = AlertCondition::PositionPnlAbove { symbol: symbol.clone(), threshold: d("100") };
        assert_eq!(evaluate(&pnl, d("12"), None, Some((d("50"), d("500")))), Some(d("100")));
        assert_eq!(evaluate(&pnl, d("11.99"), None, Some((d("50"), d("500")))), None);
        assert_eq!(evaluate(&pnl, d("100"), None, None), None, "no position: no P&L");
        let loss = AlertCondition::PositionPnlBelow { symbol, threshold: d("-50") };
        assert_eq!(evaluate(&loss, d("9"), None, Some((d("50"), d("500")))), Some(d("-50")));
    }

    #[test]
    fn firing_ids_are_deterministic_per_arming() {
        let alert = Uuid::now_v7();
        assert_eq!(firing_id(alert, 1), firing_id(alert, 1));
        assert_ne!(firing_id(alert, 1), firing_id(alert, 2));
    }
}
