-- Audit trail: the sealed hash chain over the event log, its checkpoints, and the log made append-only.
-- The canonical bytes of an event and the chain are defined in docs/audit.md.
--
-- audit_chain: one row per event, in the log's commit order (transaction_id, global_position), numbered
-- densely from 1 by chain_index. chain_hash = SHA-256(previous_hash || canonical bytes of the event), and the
-- previous hash of the first event is 32 zero bytes. The previous hash is stored on every row (it is the
-- chain_hash of row chain_index - 1) so that a row, and an exported record, can be checked on its own.
-- Written only by the sealer (src/audit/sealer.rs), in the same transaction as its cursor in log_cursors.

create table audit_chain (
    chain_index     bigint      primary key check (chain_index >= 1),
    global_position bigint      not null,
    transaction_id  xid8        not null,
    event_id        uuid        not null,
    previous_hash   bytea       not null check (length(previous_hash) = 32),
    chain_hash      bytea       not null check (length(chain_hash) = 32),
    sealed_at       timestamptz not null default clock_timestamp()
);

create unique index audit_chain_global_position_key on audit_chain (global_position);

-- A checkpoint every N events or T seconds: the chain's head at that moment. Publishing a checkpoint's hash
-- outside the database (a ticket, an e-mail to the auditor, WORM storage) anchors everything before it.
create table audit_checkpoints (
    event_count     bigint      primary key check (event_count >= 1), -- = chain_index of the head
    global_position bigint      not null,
    transaction_id  xid8        not null,
    chain_hash      bytea       not null check (length(chain_hash) = 32),
    created_at      timestamptz not null default clock_timestamp()
);

-- Append-only: any UPDATE, DELETE or TRUNCATE of the log or of the sealed chain fails, whoever runs it.
-- Statement-level, so that even a statement matching no row fails (and costs nothing per row).
-- A superuser can still bypass triggers with `set session_replication_role = replica` (the tamper tests do);
-- production protection is a role without those privileges — see docs/audit.md.
create function ledger_forbid_change() returns trigger language plpgsql as $$
begin
    raise exception '% on % is not allowed: the table is append-only', tg_op, tg_table_name
        using errcode = 'insufficient_privilege',
              hint = 'The event log and the audit chain are never changed; see docs/audit.md.';
end $$;

create trigger events_append_only before update or delete or truncate on events
    for each statement execute function ledger_forbid_change();
create trigger audit_chain_append_only before update or delete or truncate on audit_chain
    for each statement execute function ledger_forbid_change();
create trigger audit_checkpoints_append_only before update or delete or truncate on audit_checkpoints
    for each statement execute function ledger_forbid_change();
