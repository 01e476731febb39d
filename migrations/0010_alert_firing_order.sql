-- alertFired(after:) resumes without gaps or repeats. Firings get the commit-safe order the event log has
-- (migrations/0001): the writing transaction's id and an identity. Readers follow (transaction_id, position) and
-- read only rows below the oldest running transaction (pg_snapshot_xmin), so a firing that commits late can
-- never appear behind a reader that has moved on. Rows already there share the migration's transaction.
alter table alert_firings
    add column transaction_id xid8   not null default pg_current_xact_id(),
    add column position       bigint generated always as identity;
create index alert_firings_commit_order on alert_firings (transaction_id, position);
create index alert_firings_portfolio_order on alert_firings (portfolio_id, transaction_id, position);
