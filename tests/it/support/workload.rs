//! A concurrent write workload over raw events: writers on disjoint aggregates, some transactions held open
//! before committing (so positions commit out of order), some rolled back (holes in global_position).

use std::time::Duration;

use rand::{Rng, SeedableRng};
use sqlx::{Acquire, PgPool};

#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub writers: usize,
    pub aggregates_per_writer: usize,
    pub transactions_per_writer: usize,
    pub events_per_transaction_min: i64,
    pub events_per_transaction_max: i64,
    /// One transaction in `hold_one_in` sleeps 20–120 ms before committing.
    pub hold_one_in: u32,
    /// One transaction in `rollback_one_in` rolls back (0: never).
    pub rollback_one_in: u32,
    pub seed: u64,
}

pub async fn insert_event(conn: &mut sqlx::PgConnection, aggregate_id: &str, sequence: i64) {
    sqlx::query(
        "insert into events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         values ('Test', $1, $2, 'Tested', '1', '{}', '{\"correlation_id\": \"workload\"}')",
    )
    .bind(aggregate_id)
    .bind(sequence)
    .execute(conn)
    .await
    .unwrap();
}

impl Workload {
    /// Runs the workload; returns the `(aggregate_id, sequence)` of every committed event.
    pub async fn run(self, pool: PgPool) -> Vec<(String, i64)> {
        // Collected, so that all writers are spawned before the first is awaited.
        let writers: Vec<_> = (0..self.writers)
            .map(|w| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed + w as u64);
                    let mut next_sequence = vec![1i64; self.aggregates_per_writer];
                    let mut committed = Vec::new();
                    let mut conn = pool.acquire().await.unwrap();
                    for _ in 0..self.transactions_per_writer {
                        let a = rng.gen_range(0..self.aggregates_per_writer);
                        let aggregate_id = format!("s{}-w{w}-a{a}", self.seed);
                        let count = rng.gen_range(self.events_per_transaction_min..=self.events_per_transaction_max);
                        let mut tx = conn.begin().await.unwrap();
                        for i in 0..count {
                            insert_event(&mut tx, &aggregate_id, next_sequence[a] + i).await;
                        }
                        if rng.gen_ratio(1, self.hold_one_in) {
                            tokio::time::sleep(Duration::from_millis(rng.gen_range(20..120))).await;
                        }
                        if self.rollback_one_in > 0 && rng.gen_ratio(1, self.rollback_one_in) {
                            tx.rollback().await.unwrap();
                            continue;
                        }
                        tx.commit().await.unwrap();
                        for i in 0..count {
                            committed.push((aggregate_id.clone(), next_sequence[a] + i));
                        }
                        next_sequence[a] += count;
                    }
                    committed
                })
            })
            .collect();
        let mut all = Vec::new();
        for writer in writers {
            all.extend(writer.await.unwrap());
        }
        all
    }
}
