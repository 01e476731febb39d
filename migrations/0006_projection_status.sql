-- How far each projection's workers have got on the events topic, and how often their group rebalanced: read
-- by /metrics (projection lag in events and seconds, rebalances). Written after each batch commit, outside the
-- batch transaction (so that two instances of one projection never wait for each other on this row); the
-- position is the highest applied in commit order, so with partitions at different points the lag reads low.
create table projection_status (
    projection      text        primary key,
    transaction_id  xid8        not null default '0',
    global_position bigint      not null default 0,
    rebalances      bigint      not null default 0,
    updated_at      timestamptz not null default clock_timestamp()
);
