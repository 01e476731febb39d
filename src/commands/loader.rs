//! Loading aggregates from the log: one statement for any number of them — each one's snapshot (if its type is
//! snapshotted) and the events after it, read from one snapshot of the database, replayed in memory.

use std::collections::BTreeMap;

use serde_json::Value;

use cqrs_es::Aggregate;

use super::CommandError;

/// An aggregate as the log has it.
pub(super) struct Loaded<A> {
    pub state: A,
    /// Its last event's sequence (0: no events).
    pub sequence: i64,
    /// Its snapshot's number (0: none).
    pub snapshot_number: i64,
}

/// The aggregates `ids` (distinct) of type `A`, by id; from their snapshots when `snapshotted`.
pub(super) async fn load<'e, A: Aggregate>(
    executor: impl sqlx::PgExecutor<'e>,
    ids: &[String],
    snapshotted: bool,
) -> Result<BTreeMap<String, Loaded<A>>, CommandError> {
    let rows: Vec<(i32, String, i64, i64, Value, String)> = sqlx::query_as(
        "select 0, aggregate_id, last_sequence, current_snapshot, payload, ''
           from snapshots where $3 and aggregate_type = $1 and aggregate_id = any($2)
         union all
         select 1, e.aggregate_id, e.sequence, 0, e.payload, e.event_version
           from events e
           left join snapshots s on $3 and s.aggregate_type = e.aggregate_type and s.aggregate_id = e.aggregate_id
          where e.aggregate_type = $1 and e.aggregate_id = any($2) and e.sequence > coalesce(s.last_sequence, 0)
          order by 2, 1, 3",
    )
    .bind(A::TYPE)
    .bind(ids)
    .bind(snapshotted)
    .fetch_all(executor)
    .await
    .map_err(CommandError::store)?;
    let mut loaded: BTreeMap<String, Loaded<A>> =
        ids.iter().map(|id| (id.clone(), Loaded { state: A::default(), sequence: 0, snapshot_number: 0 })).collect();
    for (part, id, sequence, snapshot_number, mut payload, event_version) in rows {
        let Some(aggregate) = loaded.get_mut(&id) else { continue };
        if part == 0 {
            aggregate.state = serde_json::from_value(payload).map_err(CommandError::store)?;
            aggregate.snapshot_number = snapshot_number;
        } else {
            // Stored in an older shape: upcast first (see `crate::domain::upcast`).
            crate::domain::upcast::upcast(A::TYPE, &event_version, &mut payload);
            let event: A::Event = serde_json::from_value(payload).map_err(CommandError::store)?;
            aggregate.state.apply(event);
        }
        aggregate.sequence = sequence;
    }
    Ok(loaded)
}
