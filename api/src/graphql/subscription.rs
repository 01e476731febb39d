//! Subscriptions (graphql-transport-ws on `/graphql/ws`, authenticated in `connection_init`).
//!
//! Every message carries where it is in its stream — the log position for log-derived updates, `(ts, seq)`
//! for ticks — so a client that reconnects passes the last one back (`after`) and misses nothing. A client
//! that reads too slowly gets a `RESYNC_REQUIRED` error and the stream ends: the server never buffers without
//! bound.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_graphql::{Context, Result, SimpleObject, Subscription};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use ledger::domain::{Order as OrderAggregate, OrderEvent, Portfolio as PortfolioAggregate};
use ledger::log::RecordedEvent;
use rust_decimal::Decimal;
use uuid::Uuid;

use super::errors::{coded, forbidden, internal};
use super::orders::portfolio_owner;
use super::scalars::LogPosition;
use super::types::{Event, OrderStatusGql, Position, Valuation};
use super::{principal, state, AppState};
use crate::graphql::feeds::FeedError;

/// Minimum interval between price-driven valuation updates of one portfolio subscription.
pub const VALUATION_UPDATE_INTERVAL_MS: u64 = 1_000;
/// Symbols one `priceTicks` subscription may name.
pub const TICK_SYMBOLS_MAX: usize = 100;

fn feed_error(error: FeedError) -> async_graphql::Error {
    match error {
        FeedError::Resync => coded("RESYNC_REQUIRED", error.to_string()),
        FeedError::Closed | FeedError::Database => coded("UNAVAILABLE", error.to_string()),
    }
}

#[derive(SimpleObject, Clone)]
pub struct TickUpdate {
    pub symbol: String,
    pub price: Decimal,
    pub ts: DateTime<Utc>,
    /// With `ts`, the tick's order within its symbol.
    pub seq: i64,
    pub volume: Option<Decimal>,
}

#[derive(SimpleObject, Clone)]
pub struct OrderUpdate {
    pub position: LogPosition,
    pub order_id: Uuid,
    pub portfolio_id: Uuid,
    pub sequence: i64,
    pub event_type: String,
    pub status: OrderStatusGql,
    pub cum_quantity: Decimal,
    pub leaves_quantity: Decimal,
    pub average_price: Option<Decimal>,
}

#[derive(SimpleObject, Clone)]
pub struct PortfolioUpdate {
    /// The portfolio's last event reflected (unchanged by price updates).
    pub position: Option<LogPosition>,
    pub sequence: i64,
    /// The event that caused the update, or `PRICE` for a price move of a held symbol.
    pub cause: String,
    pub cash: Decimal,
    pub reserved: Decimal,
    pub buying_power: Decimal,
    pub realized_pnl: Decimal,
    pub positions: Vec<Position>,
    pub valuation: Valuation,
}

#[derive(SimpleObject, Clone)]
pub struct AlertFiredUpdate {
    /// Its position in the firings' own commit-safe order (not the event log's): pass the last one received as
    /// `alertFired(after:)` to resume without gaps or repeats.
    pub position: LogPosition,
    pub firing_id: Uuid,
    pub alert_id: Uuid,
    pub portfolio_id: Uuid,
    pub arming: i32,
    pub kind: String,
    pub symbol: String,
    pub price: Decimal,
    pub observed_value: Decimal,
    pub fired_at: DateTime<Utc>,
}

async fn authorize_read(state: &AppState, ctx: &Context<'_>, portfolio_id: Uuid) -> Result<()> {
    let principal = principal(ctx)?;
    if !principal.can_read_portfolios() {
        return Err(forbidden());
    }
    // Another owner's portfolio answers like an unknown one.
    match portfolio_owner(state, portfolio_id).await? {
        Some(owner) if principal.can_read_portfolio(&owner) => Ok(()),
        _ => Err(coded("PORTFOLIO_NOT_FOUND", "no such portfolio")),
    }
}

/// The portfolio id an order event belongs to (the event names it, or the order's first event does).
async fn order_portfolio(state: &AppState, event: &RecordedEvent, known: &mut HashMap<String, Uuid>) -> Option<Uuid> {
    if let Some(id) = known.get(&event.aggregate_id) {
        return Some(*id);
    }
    let named = event.decode::<OrderEvent>().ok()?.portfolio_id().map(|id| id.0);
    let id = match named {
        Some(id) => id,
        None => state.commands.load::<OrderAggregate>(&event.aggregate_id).await.ok()?.0.terms?.portfolio_id.0,
    };
    if known.len() > 10_000 {
        known.clear();
    }
    known.insert(event.aggregate_id.clone(), id);
    Some(id)
}

/// The portfolio's state and its valuation at the latest prices, from the aggregate.
async fn portfolio_snapshot(
    state: &AppState,
    id: Uuid,
    cause: String,
    position: Option<LogPosition>,
) -> Result<(PortfolioUpdate, BTreeSet<String>)> {
    let (portfolio, sequence) =
        state.commands.load::<PortfolioAggregate>(&id.to_string()).await.map_err(super::errors::command)?;
    let positions: Vec<Position> = portfolio.positions.iter().map(|(symbol, p)| Position::of(symbol, p)).collect();
    let held: BTreeSet<String> = positions.iter().filter(|p| !p.quantity.is_zero()).map(|p| p.symbol.clone()).collect();
    let symbols: Vec<String> = held.iter().cloned().collect();
    let prices: HashMap<String, (Decimal, DateTime<Utc>)> =
        ledger::queries::market::latest_prices(&state.pool, Some(&symbols))
            .await
            .map_err(super::errors::database)?
            .into_iter()
            .map(|row| (row.symbol, (row.price, row.as_of)))
            .collect();
    let now = state.clock.now();
    let valued = positions
        .iter()
        .filter(|p| !p.quantity.is_zero())
        .map(|p| {
            ledger::projections::valuation::PositionValuation::at_price(
                &p.symbol,
                p.quantity,
                p.cost_basis,
                p.realized_pnl,
                prices.get(&p.symbol).copied(),
                state.valuation_stale_after,
                now,
            )
        })
        .collect();
    let valuation = ledger::projections::valuation::PortfolioValuation::compose(id, portfolio.cash, valued);
    Ok((
        PortfolioUpdate {
            position,
            sequence: sequence as i64,
            cause,
            cash: portfolio.cash,
            reserved: portfolio.reserved_cash,
            buying_power: portfolio.buying_power(),
            realized_pnl: portfolio.realized_pnl,
            positions,
            valuation: valuation.into(),
        },
        held,
    ))
}

pub struct SubscriptionRoot;

#[Subscription(name = "Subscription")]
impl SubscriptionRoot {
    /// Committed events of the global log after `after` (from now when omitted). Auditors and admins only.
    async fn log_events(
        &self,
        ctx: &Context<'_>,
        after: Option<LogPosition>,
    ) -> Result<impl Stream<Item = Result<Event>>> {
        if !principal(ctx)?.can_read_log() {
            return Err(forbidden());
        }
        let hub = state(ctx).hub.clone();
        Ok(hub
            .log_events(after.map(|a| a.0), |_| true)
            .await
            .map_err(feed_error)?
            .map(|item| item.map(|e| Event::from(e.as_ref())).map_err(feed_error)))
    }

    /// Changes of the orders of a portfolio, after `after` (from now when omitted).
    async fn order_updates(
        &self,
        ctx: &Context<'_>,
        portfolio_id: Uuid,
        after: Option<LogPosition>,
    ) -> Result<impl Stream<Item = Result<OrderUpdate>>> {
        let state = state(ctx).clone();
        authorize_read(&state, ctx, portfolio_id).await?;
        let events = state.hub.log_events(after.map(|a| a.0), |e| e.aggregate_type == "Order").await;
        let mut events = Box::pin(events.map_err(feed_error)?);
        Ok(crate::graphql::feeds::spawn_stream(move |sender| async move {
            let mut known: HashMap<String, Uuid> = HashMap::new();
            while let Some(item) = events.next().await {
                let message = match item {
                    Err(error) => {
                        let _ = sender.send(Err(feed_error(error))).await;
                        return;
                    }
                    Ok(event) => match order_portfolio(&state, &event, &mut known).await {
                        Some(id) if id == portfolio_id => order_update(&state, &event, id).await,
                        _ => continue,
                    },
                };
                if sender.send(message).await.is_err() {
                    return;
                }
            }
        }))
    }

    /// The portfolio after each of its events (cash, positions, valuation), and on price moves of the symbols
    /// it holds (at most once per second, `cause: PRICE`).
    async fn portfolio_updates(
        &self,
        ctx: &Context<'_>,
        id: Uuid,
        after: Option<LogPosition>,
    ) -> Result<impl Stream<Item = Result<PortfolioUpdate>>> {
        let state = state(ctx).clone();
        authorize_read(&state, ctx, id).await?;
        let aggregate_id = id.to_string();
        let events = state
            .hub
            .log_events(after.map(|a| a.0), move |e| e.aggregate_type == "Portfolio" && e.aggregate_id == aggregate_id)
            .await;
        let mut events = Box::pin(events.map_err(feed_error)?);
        let mut ticks = Box::pin(state.hub.broadcast_stream(state.hub.subscribe_ticks()));
        let (_, mut held) = portfolio_snapshot(&state, id, String::new(), None).await?;
        Ok(crate::graphql::feeds::spawn_stream(move |sender| async move {
            let mut last_position: Option<LogPosition> = after;
            // Long enough ago that the first tick is sent at once.
            let mut last_price_update =
                tokio::time::Instant::now() - Duration::from_millis(VALUATION_UPDATE_INTERVAL_MS);
            loop {
                let next = tokio::select! {
                    event = events.next() => Cause::Event(event),
                    tick = ticks.next() => Cause::Tick(tick),
                };
                let update = match next {
                    Cause::Event(None) | Cause::Tick(None) => return,
                    Cause::Event(Some(Err(error))) | Cause::Tick(Some(Err(error))) => {
                        let _ = sender.send(Err(feed_error(error))).await;
                        return;
                    }
                    Cause::Event(Some(Ok(event))) => {
                        last_position = Some(LogPosition(event.position));
                        portfolio_snapshot(&state, id, event.event_type.clone(), last_position).await
                    }
                    Cause::Tick(Some(Ok(tick))) => {
                        let due = last_price_update.elapsed() >= Duration::from_millis(VALUATION_UPDATE_INTERVAL_MS);
                        if !held.contains(tick.symbol.as_str()) || !due {
                            continue;
                        }
                        last_price_update = tokio::time::Instant::now();
                        portfolio_snapshot(&state, id, "PRICE".to_string(), last_position).await
                    }
                };
                let message = update.map(|(update, now_held)| {
                    held = now_held;
                    update
                });
                if sender.send(message).await.is_err() {
                    return;
                }
            }
        }))
    }

    /// Ticks of `symbols` (of every symbol when omitted), as they arrive.
    async fn price_ticks(
        &self,
        ctx: &Context<'_>,
        symbols: Option<Vec<String>>,
    ) -> Result<impl Stream<Item = Result<TickUpdate>>> {
        principal(ctx)?;
        let state = state(ctx);
        if !state.hub.ticks_available() {
            return Err(coded("UNAVAILABLE", "this server has no market-data feed (KAFKA_BROKERS is not set)"));
        }
        if symbols.as_ref().is_some_and(|s| s.len() > TICK_SYMBOLS_MAX) {
            return Err(super::errors::invalid(format!("at most {TICK_SYMBOLS_MAX} symbols")));
        }
        let wanted: Option<BTreeSet<String>> = symbols.map(|s| s.into_iter().collect());
        Ok(state.hub.broadcast_stream(state.hub.subscribe_ticks()).filter_map(move |item| {
            let keep = match &item {
                Ok(tick) => wanted.as_ref().is_none_or(|w| w.contains(tick.symbol.as_str())),
                Err(_) => true,
            };
            let message = item
                .map(|tick| TickUpdate {
                    symbol: tick.symbol.to_string(),
                    price: tick.price.value(),
                    ts: tick.ts,
                    seq: tick.seq,
                    volume: tick.volume,
                })
                .map_err(feed_error);
            async move { keep.then_some(message) }
        }))
    }

    /// Firings of the portfolio's alerts, as they happen; with `after` (a firing's `position`), first those
    /// after it that were missed, without gaps or repeats.
    async fn alert_fired(
        &self,
        ctx: &Context<'_>,
        portfolio_id: Uuid,
        after: Option<LogPosition>,
    ) -> Result<impl Stream<Item = Result<AlertFiredUpdate>>> {
        let state = state(ctx);
        authorize_read(state, ctx, portfolio_id).await?;
        Ok(state.hub.alert_firings(portfolio_id, after.map(|a| a.0)).map(|item| {
            let notice = item.map_err(feed_error)?;
            let firing = &notice.firing;
            Ok(AlertFiredUpdate {
                position: LogPosition(notice.position),
                firing_id: firing.firing_id,
                alert_id: firing.alert_id,
                portfolio_id: firing.portfolio_id,
                arming: firing.arming,
                kind: firing.kind.clone(),
                symbol: firing.symbol.clone(),
                price: firing.price,
                observed_value: firing.observed_value,
                fired_at: firing.fired_at,
            })
        }))
    }
}

enum Cause<E, T> {
    Event(Option<E>),
    Tick(Option<T>),
}

async fn order_update(state: &AppState, event: &RecordedEvent, portfolio_id: Uuid) -> Result<OrderUpdate> {
    let (order, _) =
        state.commands.load::<OrderAggregate>(&event.aggregate_id).await.map_err(super::errors::command)?;
    Ok(OrderUpdate {
        position: LogPosition(event.position),
        order_id: Uuid::parse_str(&event.aggregate_id).map_err(internal)?,
        portfolio_id,
        sequence: event.sequence,
        event_type: event.event_type.clone(),
        status: order.status.into(),
        cum_quantity: order.cum_quantity,
        leaves_quantity: order.leaves_quantity,
        average_price: order.average_price(),
    })
}
