-- The event log: postgres-es's `events` and `snapshots` tables, plus what a ledger needs on top.
--
-- postgres-es never names the extra columns in its statements, so their defaults fill them:
--   global_position  a total order over all aggregates (may have holes where a transaction aborted);
--   transaction_id   the writing transaction (xid8). Readers follow (transaction_id, global_position) and only
--                    read below the oldest running transaction (pg_snapshot_xmin), so a transaction that took
--                    its positions early and committed late is never skipped;
--   recorded_at      the commit-side wall clock (clock_timestamp(), not the transaction start);
--   event_id         a unique id per event for idempotent consumers and the audit trail.
-- payload and metadata are jsonb (postgres-es reads them as serde_json::Value either way).

create table events (
    aggregate_type  text        not null,
    aggregate_id    text        not null,
    sequence        bigint      not null check (sequence >= 1),
    event_type      text        not null,
    event_version   text        not null,
    payload         jsonb       not null,
    metadata        jsonb       not null,
    global_position bigint      generated always as identity,
    transaction_id  xid8        not null default pg_current_xact_id(),
    recorded_at     timestamptz not null default clock_timestamp(),
    event_id        uuid        not null default gen_random_uuid(),
    primary key (aggregate_type, aggregate_id, sequence)
);

create unique index events_global_position_key on events (global_position);
create index events_commit_order_idx on events (transaction_id, global_position);
create unique index events_event_id_key on events (event_id);

-- Readers sleep on LISTEN ledger_events; one notification per inserting statement, delivered at commit.
create function ledger_notify_events() returns trigger language plpgsql as $$
begin
    perform pg_notify('ledger_events', '');
    return null;
end $$;

create trigger events_notify after insert on events
    for each statement execute function ledger_notify_events();

-- Aggregate snapshots (postgres-es layout; one row per aggregate).
create table snapshots (
    aggregate_type   text   not null,
    aggregate_id     text   not null,
    last_sequence    bigint not null check (last_sequence >= 0),
    current_snapshot bigint not null check (current_snapshot >= 0),
    payload          jsonb  not null,
    primary key (aggregate_type, aggregate_id)
);

-- Idempotency: one row per (actor, client key), written in the same transaction as the command's events.
-- The same key with the same request returns `result`; with another request it is refused.
create table command_log (
    actor           text        not null,
    idempotency_key text        not null check (length(idempotency_key) between 1 and 200),
    request_hash    bytea       not null,
    aggregate_type  text        not null,
    aggregate_id    text        not null,
    command_type    text        not null,
    result          jsonb       not null,
    recorded_at     timestamptz not null default clock_timestamp(),
    primary key (actor, idempotency_key)
);

-- Where each log follower (process manager, relay, projections, sealer) has got to, in commit order.
create table log_cursors (
    name            text        primary key,
    transaction_id  xid8        not null default '0',
    global_position bigint      not null default 0,
    updated_at      timestamptz not null default clock_timestamp()
);

-- Latest known price per symbol. Written by the prices projection; read by the process manager to reserve
-- funds for market buys.
create table latest_prices (
    symbol text        primary key,
    price  numeric     not null check (price > 0),
    as_of  timestamptz not null
);

-- Steps the process manager could not complete (for example an execution the portfolio could not book).
-- It records them here and moves on; operators see them in metrics and through the API.
create table process_failures (
    id              bigint generated always as identity primary key,
    process         text        not null,
    event_id        uuid        not null,
    global_position bigint      not null,
    error_code      text        not null,
    error           text        not null,
    recorded_at     timestamptz not null default clock_timestamp(),
    unique (process, event_id)
);
