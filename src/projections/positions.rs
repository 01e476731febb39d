//! Portfolios (cash, reserved, realized P&L), positions (quantity, reserved, cost basis under the portfolio's
//! method, FIFO cost basis, realized P&L) and open lots. Every number is copied from the Portfolio events,
//! which carry the accounting already done by the aggregate.
//!
//! Set-based: a batch loads the rows it touches, folds its events in memory and writes them back with one
//! statement per table — a few round trips per batch instead of several per event. A single event is a batch
//! of one, so there is one implementation. A rebuild keeps the same rows in memory across all its batches
//! ([`PositionsFold`]) and writes the net state with the same statements.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{FromRow, PgConnection, Row};
use uuid::Uuid;

use super::{aggregate_uuid, decode_batch, ApplyError, Projection, ReplayFold};
use crate::domain::PortfolioEvent;
use crate::log::{RawEvent, RecordedEvent};

pub struct PositionsProjection;

#[derive(Debug, Clone, sqlx::FromRow)]
struct PortfolioRow {
    owner: String,
    base_currency: String,
    cost_basis_method: String,
    cash: Decimal,
    reserved_cash: Decimal,
    realized_pnl: Decimal,
    opened_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    last_position: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct PositionRow {
    quantity: Decimal,
    reserved_quantity: Decimal,
    cost_basis: Decimal,
    fifo_cost_basis: Decimal,
    realized_pnl: Decimal,
    updated_at: DateTime<Utc>,
}

impl PositionRow {
    fn empty(at: DateTime<Utc>) -> Self {
        Self {
            quantity: Decimal::ZERO,
            reserved_quantity: Decimal::ZERO,
            cost_basis: Decimal::ZERO,
            fifo_cost_basis: Decimal::ZERO,
            realized_pnl: Decimal::ZERO,
            updated_at: at,
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct LotRow {
    symbol: String,
    quantity: Decimal,
    cost: Decimal,
    acquired_at: DateTime<Utc>,
}

/// The rows a batch touches, in memory.
#[derive(Default)]
struct Rows {
    portfolios: HashMap<Uuid, PortfolioRow>,
    positions: BTreeMap<(Uuid, String), PositionRow>,
    touched_positions: BTreeSet<(Uuid, String)>,
    lots: BTreeMap<(Uuid, String), Option<LotRow>>,
    touched_portfolios: BTreeSet<Uuid>,
}

impl Rows {
    fn touch(&mut self, id: Uuid, at: DateTime<Utc>, position: i64) -> Option<&mut PortfolioRow> {
        let row = self.portfolios.get_mut(&id)?;
        row.updated_at = at;
        row.last_position = position;
        self.touched_portfolios.insert(id);
        Some(row)
    }

    /// Adds the rows of `loaded` this set does not hold yet (untouched).
    fn merge_absent(&mut self, loaded: Rows) {
        for (id, row) in loaded.portfolios {
            self.portfolios.entry(id).or_insert(row);
        }
        for (key, row) in loaded.positions {
            self.positions.entry(key).or_insert(row);
        }
        for (key, lot) in loaded.lots {
            self.lots.entry(key).or_insert(lot);
        }
    }

    /// The position row, created empty (as of `at`) if absent.
    fn position(&mut self, id: Uuid, symbol: &str, at: DateTime<Utc>) -> &mut PositionRow {
        let key = (id, symbol.to_string());
        self.touched_positions.insert(key.clone());
        self.positions.entry(key).or_insert_with(|| PositionRow::empty(at))
    }

    /// Folds one event: `position` is its global position, `recorded_at` its commit time.
    fn apply(&mut self, id: Uuid, position: i64, recorded_at: DateTime<Utc>, portfolio_event: PortfolioEvent) {
        match portfolio_event {
            PortfolioEvent::PortfolioOpened { owner, base_currency, cost_basis_method, opened_at, .. } => {
                self.portfolios.entry(id).or_insert_with(|| PortfolioRow {
                    owner: owner.to_string(),
                    base_currency: base_currency.to_string(),
                    cost_basis_method: cost_basis_method.as_str().into(),
                    cash: Decimal::ZERO,
                    reserved_cash: Decimal::ZERO,
                    realized_pnl: Decimal::ZERO,
                    opened_at,
                    updated_at: opened_at,
                    last_position: position,
                });
                self.touched_portfolios.insert(id);
            }
            PortfolioEvent::CashDeposited { cash_after, at, .. }
            | PortfolioEvent::CashWithdrawn { cash_after, at, .. } => {
                if let Some(row) = self.touch(id, at, position) {
                    row.cash = cash_after;
                }
            }
            PortfolioEvent::FundsReserved { reserved_cash_after, at, .. } => {
                if let Some(row) = self.touch(id, at, position) {
                    row.reserved_cash = reserved_cash_after;
                }
            }
            PortfolioEvent::QuantityReserved { symbol, reserved_quantity_after, at, .. } => {
                let row = self.position(id, symbol.as_str(), at);
                row.reserved_quantity = reserved_quantity_after;
                row.updated_at = at;
                self.touch(id, at, position);
            }
            PortfolioEvent::ReservationAdjusted {
                symbol,
                quantity_delta,
                reserved_cash_after,
                reserved_quantity_after,
                at,
                ..
            } => {
                if let Some(row) = self.touch(id, at, position) {
                    row.reserved_cash = reserved_cash_after;
                }
                if !quantity_delta.is_zero() {
                    let key = (id, symbol.to_string());
                    if let Some(row) = self.positions.get_mut(&key) {
                        row.reserved_quantity = reserved_quantity_after;
                        row.updated_at = at;
                        self.touched_positions.insert(key);
                    }
                }
            }
            PortfolioEvent::ReservationReleased { symbol, cash_released, quantity_released, at, .. } => {
                if let Some(row) = self.touch(id, at, position) {
                    row.reserved_cash -= cash_released;
                }
                let key = (id, symbol.to_string());
                if !quantity_released.is_zero() {
                    if let Some(row) = self.positions.get_mut(&key) {
                        row.reserved_quantity -= quantity_released;
                        row.updated_at = at;
                        self.touched_positions.insert(key);
                    }
                }
            }
            PortfolioEvent::ExecutionApplied {
                symbol,
                cash_after,
                reserved_cash_released,
                reserved_quantity_released,
                lot_opened,
                lots_consumed,
                realized_pnl,
                position_quantity_after,
                position_cost_basis_after,
                executed_at,
                ..
            } => {
                if let Some(row) = self.touch(id, executed_at, position) {
                    row.cash = cash_after;
                    row.reserved_cash -= reserved_cash_released;
                    row.realized_pnl += realized_pnl;
                }
                let fifo_delta = lot_opened.as_ref().map_or(Decimal::ZERO, |l| l.cost)
                    - lots_consumed.iter().map(|c| c.cost).sum::<Decimal>();
                let row = self.position(id, symbol.as_str(), executed_at);
                row.quantity = position_quantity_after;
                row.cost_basis = position_cost_basis_after;
                row.reserved_quantity -= reserved_quantity_released;
                row.realized_pnl += realized_pnl;
                row.fifo_cost_basis += fifo_delta;
                row.updated_at = executed_at;
                if let Some(lot) = lot_opened {
                    let slot = self.lots.entry((id, lot.lot_id.clone())).or_insert(None);
                    // A lot consumed to nothing is deleted when written: opening its id again starts it afresh,
                    // whether or not the write happened in between.
                    if slot.as_ref().is_none_or(|l| l.quantity.is_zero()) {
                        *slot = Some(LotRow {
                            symbol: symbol.to_string(),
                            quantity: lot.quantity,
                            cost: lot.cost,
                            acquired_at: lot.acquired_at,
                        });
                    }
                }
                for consumed in lots_consumed {
                    if let Some(Some(lot)) = self.lots.get_mut(&(id, consumed.lot_id.clone())) {
                        lot.quantity -= consumed.quantity;
                        lot.cost -= consumed.cost;
                    }
                }
            }
            // The deficit is reserved − cash, which the row already has; the markers only move its position.
            PortfolioEvent::DeficitIncurred { .. }
            | PortfolioEvent::DeficitCovered { .. }
            | PortfolioEvent::AlertCreated { .. }
            | PortfolioEvent::AlertCanceled { .. }
            | PortfolioEvent::AlertRearmed { .. } => {
                self.touch(id, recorded_at, position);
            }
        }
    }
}

/// The portfolio and its event, decoded from the log's record.
fn decode(event: &RecordedEvent) -> Result<(Uuid, PortfolioEvent), ApplyError> {
    Ok((aggregate_uuid(&event.aggregate_id)?, event.decode::<PortfolioEvent>()?))
}

/// Lots a batch touches: the ones it opens or consumes.
fn lot_keys(id: Uuid, event: &PortfolioEvent, keys: &mut BTreeSet<(Uuid, String)>) {
    if let PortfolioEvent::ExecutionApplied { lot_opened, lots_consumed, .. } = event {
        keys.extend(lot_opened.iter().map(|l| (id, l.lot_id.clone())));
        keys.extend(lots_consumed.iter().map(|c| (id, c.lot_id.clone())));
    }
}

async fn load(conn: &mut PgConnection, ids: &[Uuid], lot_keys: &BTreeSet<(Uuid, String)>) -> Result<Rows, sqlx::Error> {
    let mut rows = Rows::default();
    for row in sqlx::query(
        "select portfolio_id, owner, base_currency, cost_basis_method, cash, reserved_cash, realized_pnl, opened_at,
                updated_at, last_position
           from rm_portfolios where portfolio_id = any($1)",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?
    {
        rows.portfolios.insert(row.try_get("portfolio_id")?, PortfolioRow::from_row(&row)?);
    }
    for row in sqlx::query(
        "select portfolio_id, symbol, quantity, reserved_quantity, cost_basis, fifo_cost_basis, realized_pnl, updated_at
           from rm_positions where portfolio_id = any($1)",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?
    {
        rows.positions.insert((row.try_get("portfolio_id")?, row.try_get("symbol")?), PositionRow::from_row(&row)?);
    }
    if !lot_keys.is_empty() {
        let (lot_portfolios, lot_ids): (Vec<Uuid>, Vec<String>) = lot_keys.iter().cloned().unzip();
        for key in lot_keys {
            rows.lots.insert(key.clone(), None);
        }
        for row in sqlx::query(
            "select l.portfolio_id, l.lot_id, l.symbol, l.quantity, l.cost, l.acquired_at
               from rm_lots l join unnest($1::uuid[], $2::text[]) as k(portfolio_id, lot_id)
                 on l.portfolio_id = k.portfolio_id and l.lot_id = k.lot_id",
        )
        .bind(&lot_portfolios)
        .bind(&lot_ids)
        .fetch_all(&mut *conn)
        .await?
        {
            rows.lots.insert((row.try_get("portfolio_id")?, row.try_get("lot_id")?), Some(LotRow::from_row(&row)?));
        }
    }
    Ok(rows)
}

/// Writes `rows`: upserts, or — `fresh`: the tables hold none of them (a rebuild's first flush into empty
/// tables) — plain inserts, without the work of `on conflict` (1.8 s → 0.95 s for 490,000 lots in `psql`).
async fn write(conn: &mut PgConnection, rows: Rows, fresh: bool) -> Result<(), sqlx::Error> {
    let upsert = |clause: &'static str| if fresh { "" } else { clause };
    if !rows.touched_portfolios.is_empty() {
        let mut columns = PortfolioColumns::default();
        for id in &rows.touched_portfolios {
            if let Some(row) = rows.portfolios.get(id) {
                columns.push(*id, row);
            }
        }
        sqlx::query(&format!(
            "insert into rm_portfolios (portfolio_id, owner, base_currency, cost_basis_method, cash, reserved_cash,
                    realized_pnl, opened_at, updated_at, last_position)
             select * from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::numeric[], $6::numeric[],
                                  $7::numeric[], $8::timestamptz[], $9::timestamptz[], $10::bigint[]) {}",
            upsert(
                "on conflict (portfolio_id) do update
                    set cash = excluded.cash, reserved_cash = excluded.reserved_cash,
                        realized_pnl = excluded.realized_pnl, updated_at = excluded.updated_at,
                        last_position = excluded.last_position"
            )
        ))
        .bind(&columns.ids)
        .bind(&columns.owners)
        .bind(&columns.currencies)
        .bind(&columns.methods)
        .bind(&columns.cash)
        .bind(&columns.reserved)
        .bind(&columns.realized)
        .bind(&columns.opened)
        .bind(&columns.updated)
        .bind(&columns.positions)
        .execute(&mut *conn)
        .await?;
    }
    if !rows.touched_positions.is_empty() {
        let mut ids = Vec::new();
        let mut symbols = Vec::new();
        let (mut quantity, mut reserved, mut cost, mut fifo, mut realized, mut updated) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for key in &rows.touched_positions {
            let row = &rows.positions[key];
            ids.push(key.0);
            symbols.push(key.1.clone());
            quantity.push(row.quantity);
            reserved.push(row.reserved_quantity);
            cost.push(row.cost_basis);
            fifo.push(row.fifo_cost_basis);
            realized.push(row.realized_pnl);
            updated.push(row.updated_at);
        }
        sqlx::query(&format!(
            "insert into rm_positions (portfolio_id, symbol, quantity, reserved_quantity, cost_basis, fifo_cost_basis,
                    realized_pnl, updated_at)
             select * from unnest($1::uuid[], $2::text[], $3::numeric[], $4::numeric[], $5::numeric[], $6::numeric[],
                                  $7::numeric[], $8::timestamptz[]) {}",
            upsert(
                "on conflict (portfolio_id, symbol) do update
                    set quantity = excluded.quantity, reserved_quantity = excluded.reserved_quantity,
                        cost_basis = excluded.cost_basis, fifo_cost_basis = excluded.fifo_cost_basis,
                        realized_pnl = excluded.realized_pnl, updated_at = excluded.updated_at"
            )
        ))
        .bind(&ids)
        .bind(&symbols)
        .bind(&quantity)
        .bind(&reserved)
        .bind(&cost)
        .bind(&fifo)
        .bind(&realized)
        .bind(&updated)
        .execute(&mut *conn)
        .await?;
    }
    let (mut keep, mut gone): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
    for (key, lot) in rows.lots {
        match lot {
            Some(lot) if !lot.quantity.is_zero() => keep.push((key, lot)),
            _ => gone.push(key),
        }
    }
    if !keep.is_empty() {
        sqlx::query(&format!(
            "insert into rm_lots (portfolio_id, lot_id, symbol, quantity, cost, acquired_at)
             select * from unnest($1::uuid[], $2::text[], $3::text[], $4::numeric[], $5::numeric[], $6::timestamptz[])
             {}",
            upsert(
                "on conflict (portfolio_id, lot_id) do update set quantity = excluded.quantity, cost = excluded.cost"
            )
        ))
        .bind(keep.iter().map(|(k, _)| k.0).collect::<Vec<_>>())
        .bind(keep.iter().map(|(k, _)| k.1.as_str()).collect::<Vec<_>>())
        .bind(keep.iter().map(|(_, l)| l.symbol.as_str()).collect::<Vec<_>>())
        .bind(keep.iter().map(|(_, l)| l.quantity).collect::<Vec<_>>())
        .bind(keep.iter().map(|(_, l)| l.cost).collect::<Vec<_>>())
        .bind(keep.iter().map(|(_, l)| l.acquired_at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    if !gone.is_empty() && !fresh {
        let (portfolios, lot_ids): (Vec<Uuid>, Vec<String>) = gone.into_iter().unzip();
        sqlx::query(
            "delete from rm_lots l using unnest($1::uuid[], $2::text[]) as k(portfolio_id, lot_id)
              where l.portfolio_id = k.portfolio_id and l.lot_id = k.lot_id",
        )
        .bind(&portfolios)
        .bind(&lot_ids)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

#[derive(Default)]
struct PortfolioColumns {
    ids: Vec<Uuid>,
    owners: Vec<String>,
    currencies: Vec<String>,
    methods: Vec<String>,
    cash: Vec<Decimal>,
    reserved: Vec<Decimal>,
    realized: Vec<Decimal>,
    opened: Vec<DateTime<Utc>>,
    updated: Vec<DateTime<Utc>>,
    positions: Vec<i64>,
}

impl PortfolioColumns {
    fn push(&mut self, id: Uuid, row: &PortfolioRow) {
        self.ids.push(id);
        self.owners.push(row.owner.clone());
        self.currencies.push(row.base_currency.clone());
        self.methods.push(row.cost_basis_method.clone());
        self.cash.push(row.cash);
        self.reserved.push(row.reserved_cash);
        self.realized.push(row.realized_pnl);
        self.opened.push(row.opened_at);
        self.updated.push(row.updated_at);
        self.positions.push(row.last_position);
    }
}

#[async_trait]
impl Projection for PositionsProjection {
    fn name(&self) -> &'static str {
        "positions"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["rm_portfolios", "rm_positions", "rm_lots"]
    }

    fn aggregate_type(&self) -> Option<&'static str> {
        Some("Portfolio")
    }

    async fn apply_event(&self, conn: &mut PgConnection, event: &RecordedEvent) -> Result<(), ApplyError> {
        self.apply_events(conn, &[event]).await
    }

    async fn apply_events(&self, conn: &mut PgConnection, events: &[&RecordedEvent]) -> Result<(), ApplyError> {
        let mut decoded = Vec::with_capacity(events.len());
        let mut ids = BTreeSet::new();
        let mut lots = BTreeSet::new();
        for event in events {
            let (id, portfolio_event) = decode(event)?;
            ids.insert(id);
            lot_keys(id, &portfolio_event, &mut lots);
            decoded.push((id, *event, portfolio_event));
        }
        let ids: Vec<Uuid> = ids.into_iter().collect();
        let mut rows = load(conn, &ids, &lots).await?;
        for (id, event, portfolio_event) in decoded {
            rows.apply(id, event.position.global_position, event.recorded_at, portfolio_event);
        }
        write(conn, rows, false).await?;
        Ok(())
    }

    fn replay_fold(&self) -> Option<Box<dyn ReplayFold>> {
        Some(Box::<PositionsFold>::default())
    }
}

/// Rough bytes of one row held in memory (key, values, map overhead), for the fold's memory bound.
const PORTFOLIO_ROW_BYTES: usize = 256;
const POSITION_ROW_BYTES: usize = 192;
const LOT_ROW_BYTES: usize = 192;

/// The positions read model held in memory during a rebuild (see [`ReplayFold`]): the same [`Rows`] and the
/// same fold as a live batch, kept across batches; a flush writes them with the live statements.
#[derive(Default)]
pub struct PositionsFold {
    rows: Rows,
    /// Portfolios with rows written by a flush: read back before their next event is folded.
    flushed: HashSet<Uuid>,
    /// Flushed portfolios read back since the last flush.
    reloaded: HashSet<Uuid>,
}

#[async_trait]
impl ReplayFold for PositionsFold {
    async fn fold(
        &mut self,
        conn: &mut PgConnection,
        events: &[&RawEvent],
    ) -> Result<Vec<(usize, String)>, ApplyError> {
        let (decoded, skipped) = decode_batch::<PortfolioEvent>(events);
        // Portfolios flushed earlier: their rows (once) and the lots their events touch are read back first.
        let (mut reload, mut reload_lots) = (BTreeSet::new(), BTreeSet::new());
        for (id, _, portfolio_event) in &decoded {
            if self.flushed.contains(id) {
                if !self.reloaded.contains(id) {
                    reload.insert(*id);
                }
                let mut keys = BTreeSet::new();
                lot_keys(*id, portfolio_event, &mut keys);
                reload_lots.extend(keys.into_iter().filter(|key| !self.rows.lots.contains_key(key)));
            }
        }
        if !reload.is_empty() || !reload_lots.is_empty() {
            let ids: Vec<Uuid> = reload.iter().copied().collect();
            self.rows.merge_absent(load(conn, &ids, &reload_lots).await?);
            self.reloaded.extend(reload);
        }
        for (id, event, portfolio_event) in decoded {
            self.rows.apply(id, event.position.global_position, event.recorded_at, portfolio_event);
        }
        Ok(skipped)
    }

    fn held_bytes(&self) -> usize {
        self.rows.portfolios.len() * PORTFOLIO_ROW_BYTES
            + self.rows.positions.len() * POSITION_ROW_BYTES
            + self.rows.lots.len() * LOT_ROW_BYTES
            + (self.flushed.len() + self.reloaded.len()) * std::mem::size_of::<Uuid>() * 2
    }

    async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        let rows = std::mem::take(&mut self.rows);
        // Nothing flushed before: the shadow tables are empty.
        let fresh = self.flushed.is_empty();
        // Every portfolio with a row of any kind: positions and lots can exist without the portfolio's row.
        self.flushed.extend(rows.portfolios.keys().copied());
        self.flushed.extend(rows.positions.keys().map(|(id, _)| *id));
        self.flushed.extend(rows.lots.keys().map(|(id, _)| *id));
        self.reloaded.clear();
        write(conn, rows, fresh).await?;
        Ok(())
    }
}
