//! Snapshots of PostgreSQL's commit state: whether a transaction had committed when a snapshot was taken. A
//! subscriber that starts from "now" uses one to tell the events it already saw (committed before it started)
//! from those it must still deliver.

/// A PostgreSQL snapshot (`pg_current_snapshot()`): which transactions had committed when it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    in_progress: Vec<u64>,
}

impl Snapshot {
    /// The snapshot a statement would take now.
    pub async fn now(pool: &sqlx::PgPool) -> Result<Snapshot, sqlx::Error> {
        let text: String = sqlx::query_scalar("select pg_current_snapshot()::text").fetch_one(pool).await?;
        Snapshot::parse(&text).ok_or_else(|| sqlx::Error::Protocol(format!("unexpected snapshot {text:?}")))
    }

    /// `xmin:xmax:xip,xip,…`
    fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let in_progress = match parts.next()? {
            "" => Vec::new(),
            list => list.split(',').map(|x| x.parse().ok()).collect::<Option<Vec<u64>>>()?,
        };
        Some(Snapshot { xmin, xmax, in_progress })
    }

    /// Whether the transaction's effects were visible (it had committed) when the snapshot was taken.
    pub fn sees(&self, transaction: u64) -> bool {
        transaction < self.xmin || (transaction < self.xmax && !self.in_progress.contains(&transaction))
    }
}

#[cfg(test)]
mod tests {
    use super::Snapshot;

    #[test]
    fn a_snapshot_sees_what_had_committed() {
        let snapshot = Snapshot::parse("100:110:102,105").unwrap();
        assert!(snapshot.sees(99) && snapshot.sees(101) && snapshot.sees(109));
        assert!(!snapshot.sees(102) && !snapshot.sees(105) && !snapshot.sees(110) && !snapshot.sees(200));
        assert_eq!(Snapshot::parse("5:5:").unwrap(), Snapshot { xmin: 5, xmax: 5, in_progress: vec![] });
        assert!(Snapshot::parse("garbage").is_none());
    }
}
