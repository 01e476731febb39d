//! Reading the sealed chain: its head, and sealed events with their hashes in chain order, batch by batch.
//!
//! Batches are keyset-paginated on `chain_index` (one short statement each, never a cursor held open across
//! the whole export), and bounded above by the chain's length when the reader was created, so an export is a
//! consistent prefix of the chain even while the sealer keeps going.

use sqlx::postgres::PgRow;
use sqlx::{PgExecutor, PgPool, Row};

use super::canonical::ChainHash;
use super::filter::ExportFilter;
use super::AuditError;
use crate::log::{decode_event, LogPosition, RecordedEvent};

/// Sealed events per batch when exporting: bounds the memory of one read (about 1 KB per event).
pub const EXPORT_BATCH_SIZE: usize = 2_000;

/// One event of the log with its place in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedEvent {
    /// 1 for the first sealed event, then 2, 3… with no holes.
    pub chain_index: i64,
    pub event: RecordedEvent,
    pub previous_hash: ChainHash,
    pub chain_hash: ChainHash,
}

/// The last sealed event (or the genesis state before the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// Events sealed so far (= the chain index of the last one).
    pub event_count: i64,
    pub position: LogPosition,
    pub hash: ChainHash,
}

impl ChainHead {
    pub const GENESIS: ChainHead =
        ChainHead { event_count: 0, position: LogPosition::START, hash: super::canonical::GENESIS_HASH };
}

/// The current head of the sealed chain.
pub async fn chain_head<'e>(executor: impl PgExecutor<'e>) -> Result<ChainHead, AuditError> {
    let row: Option<(i64, String, i64, Vec<u8>)> = sqlx::query_as(
        "select chain_index, transaction_id::text, global_position, chain_hash
           from audit_chain order by chain_index desc limit 1",
    )
    .fetch_optional(executor)
    .await?;
    let Some((event_count, transaction_id, global_position, hash)) = row else {
        return Ok(ChainHead::GENESIS);
    };
    Ok(ChainHead {
        event_count,
        position: LogPosition { transaction_id: parse_xid8(&transaction_id)?, global_position },
        hash: hash_column(&hash, global_position)?,
    })
}

pub(crate) fn parse_xid8(text: &str) -> Result<u64, AuditError> {
    text.parse().map_err(|_| AuditError::Chain(format!("transaction id {text:?} is not an xid8")))
}

pub(crate) fn hash_column(bytes: &[u8], position: i64) -> Result<ChainHash, AuditError> {
    ChainHash::from_slice(bytes)
        .ok_or_else(|| AuditError::Chain(format!("hash of position {position} has {} bytes, not 32", bytes.len())))
}

/// Reads sealed events matching a filter, in chain order, up to the chain's head at creation.
pub struct SealedReader {
    pool: PgPool,
    filter: ExportFilter,
    after_index: i64,
    through_index: i64,
    batch_size: usize,
    predicates: String,
}

impl SealedReader {
    /// A reader over the chain as sealed now. Fails on an invalid filter.
    pub async fn new(pool: PgPool, filter: ExportFilter) -> Result<SealedReader, AuditError> {
        filter.validate()?;
        let head = chain_head(&pool).await?;
        let predicates = predicates(&filter);
        Ok(SealedReader {
            pool,
            filter,
            after_index: 0,
            through_index: head.event_count,
            batch_size: EXPORT_BATCH_SIZE,
            predicates,
        })
    }

    /// Events per batch, clamped to `1..=EXPORT_BATCH_SIZE * 5`.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.clamp(1, EXPORT_BATCH_SIZE * 5);
        self
    }

    /// The chain length this reader stops at.
    pub fn sealed_event_count(&self) -> i64 {
        self.through_index
    }

    /// How many events the filter selects (for a progress bar; one pass over the candidates).
    pub async fn count(&self) -> Result<u64, AuditError> {
        if self.filter.is_everything() {
            return Ok(self.through_index as u64);
        }
        let sql = format!(
            "select count(*) from audit_chain c left join events e on e.global_position = c.global_position
              where c.chain_index > $1 and c.chain_index <= $2 {}",
            self.predicates
        );
        let query = bind_filter(sqlx::query_scalar(&sql).bind(0i64).bind(self.through_index), &self.filter);
        let count: i64 = query.fetch_one(&self.pool).await?;
        Ok(count as u64)
    }

    /// The next batch in chain order; empty at the end. A sealed event missing from the log is an error
    /// (`ledger verify --db` says more), never silently skipped.
    pub async fn next_batch(&mut self) -> Result<Vec<SealedEvent>, AuditError> {
        if self.after_index >= self.through_index {
            return Ok(Vec::new());
        }
        let sql = format!(
            "select c.chain_index, c.global_position as sealed_position, c.previous_hash, c.chain_hash,
                    e.transaction_id::text as transaction_id_text, e.global_position, e.event_id,
                    e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
                    e.payload, e.metadata, e.recorded_at
               from audit_chain c left join events e on e.global_position = c.global_position
              where c.chain_index > $1 and c.chain_index <= $2 {}
              order by c.chain_index
              limit {}",
            self.predicates, self.batch_size
        );
        let query = bind_filter(sqlx::query(&sql).bind(self.after_index).bind(self.through_index), &self.filter);
        let rows = query.fetch_all(&self.pool).await?;
        let batch = rows.iter().map(decode_sealed).collect::<Result<Vec<_>, _>>()?;
        match batch.last() {
            Some(last) => self.after_index = last.chain_index,
            None => self.after_index = self.through_index,
        }
        Ok(batch)
    }
}

/// The SQL conditions of a filter, numbered from `$3` (after the chain-index bounds), in the order
/// [`bind_filter`] binds them. Conditions on the sealed row (`c.`) keep missing events visible.
fn predicates(filter: &ExportFilter) -> String {
    let mut sql = String::new();
    let mut n = 2;
    let mut next = || {
        n += 1;
        n
    };
    if filter.from_position.is_some() {
        sql += &format!(" and c.global_position >= ${}", next());
    }
    if filter.to_position.is_some() {
        sql += &format!(" and c.global_position <= ${}", next());
    }
    if filter.from_time.is_some() {
        sql += &format!(" and e.recorded_at >= ${}", next());
    }
    if filter.to_time.is_some() {
        sql += &format!(" and e.recorded_at < ${}", next());
    }
    if filter.aggregate_id.is_some() {
        sql += &format!(" and e.aggregate_id = ${}", next());
    }
    if filter.portfolio_id.is_some() {
        let p = next();
        sql += &format!(
            " and (e.aggregate_id = ${p}::text
                   or (e.aggregate_type = 'Order' and e.aggregate_id in (
                         select o.aggregate_id from events o
                          where o.aggregate_type = 'Order' and o.event_type = 'OrderPlaced'
                            and o.payload -> 'OrderPlaced' ->> 'portfolio_id' = ${p}::text)))"
        );
    }
    sql
}

fn bind_filter<'q, Q: Bindable<'q>>(mut query: Q, filter: &'q ExportFilter) -> Q {
    if let Some(from) = filter.from_position {
        query = query.bind_i64(from);
    }
    if let Some(to) = filter.to_position {
        query = query.bind_i64(to);
    }
    if let Some(from) = filter.from_time {
        query = query.bind_time(from);
    }
    if let Some(to) = filter.to_time {
        query = query.bind_time(to);
    }
    if let Some(id) = &filter.aggregate_id {
        query = query.bind_str(id);
    }
    if let Some(portfolio) = filter.portfolio_id {
        query = query.bind_string(portfolio.to_string());
    }
    query
}

/// The few bind calls [`bind_filter`] needs, over both `query` and `query_scalar`.
trait Bindable<'q>: Sized {
    fn bind_i64(self, value: i64) -> Self;
    fn bind_time(self, value: chrono::DateTime<chrono::Utc>) -> Self;
    fn bind_str(self, value: &'q str) -> Self;
    fn bind_string(self, value: String) -> Self;
}

type PgArguments = sqlx::postgres::PgArguments;

impl<'q> Bindable<'q> for sqlx::query::Query<'q, sqlx::Postgres, PgArguments> {
    fn bind_i64(self, value: i64) -> Self {
        self.bind(value)
    }
    fn bind_time(self, value: chrono::DateTime<chrono::Utc>) -> Self {
        self.bind(value)
    }
    fn bind_str(self, value: &'q str) -> Self {
        self.bind(value)
    }
    fn bind_string(self, value: String) -> Self {
        self.bind(value)
    }
}

impl<'q, O> Bindable<'q> for sqlx::query::QueryScalar<'q, sqlx::Postgres, O, PgArguments> {
    fn bind_i64(self, value: i64) -> Self {
        self.bind(value)
    }
    fn bind_time(self, value: chrono::DateTime<chrono::Utc>) -> Self {
        self.bind(value)
    }
    fn bind_str(self, value: &'q str) -> Self {
        self.bind(value)
    }
    fn bind_string(self, value: String) -> Self {
        self.bind(value)
    }
}

fn decode_sealed(row: &PgRow) -> Result<SealedEvent, AuditError> {
    let sealed_position: i64 = row.try_get("sealed_position")?;
    let event_position: Option<i64> = row.try_get("global_position")?;
    if event_position.is_none() {
        return Err(AuditError::Chain(format!(
            "sealed event at position {sealed_position} is missing from the log (run `ledger verify --db`)"
        )));
    }
    let previous: Vec<u8> = row.try_get("previous_hash")?;
    let chain: Vec<u8> = row.try_get("chain_hash")?;
    Ok(SealedEvent {
        chain_index: row.try_get("chain_index")?,
        event: decode_event(row)?,
        previous_hash: hash_column(&previous, sealed_position)?,
        chain_hash: hash_column(&chain, sealed_position)?,
    })
}
