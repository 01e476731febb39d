-- Alert delivery by webhook. A portfolio's owner registers endpoints; every alert firing of the portfolio (the
-- deficit notice included) becomes one delivery per live endpoint, written by a trigger in the transaction that
-- records the firing: an outbox, so a firing is never lost and never enqueued twice (firings are written once).
-- Deliverers claim due rows with a short lease (no transaction is held open during the HTTP call), POST the
-- stored body as it is (the same bytes on every attempt), and record the outcome; a delivery retried past its
-- time limit is dead (kept, with its last error, for the owner to see). Kinds are spelled as GraphQL spells them
-- (PRICE_ABOVE, DEFICIT), amounts as exact text.

create table webhook_endpoints (
    webhook_id   uuid        primary key,
    portfolio_id uuid        not null,
    url          text        not null,
    -- The HMAC-SHA256 key of the signatures: shown once, when the endpoint is created.
    secret       text        not null,
    created_by   text        not null,
    created_at   timestamptz not null default now(),
    removed_at   timestamptz
);
create index webhook_endpoints_live on webhook_endpoints (portfolio_id) where removed_at is null;

create table webhook_deliveries (
    delivery_id     uuid        primary key,
    webhook_id      uuid        not null references webhook_endpoints,
    firing_id       uuid        not null,
    -- The JSON body, exactly as signed and sent.
    body            text        not null,
    status          text        not null default 'pending' check (status in ('pending', 'delivered', 'dead')),
    attempts        int         not null default 0,
    next_attempt_at timestamptz not null default now(),
    -- A deliverer holds the delivery until then (a crashed one's lease runs out and another takes over).
    leased_until    timestamptz,
    last_status     int,
    last_error      text,
    created_at      timestamptz not null default now(),
    finished_at     timestamptz,
    unique (webhook_id, firing_id)
);
create index webhook_deliveries_due on webhook_deliveries (next_attempt_at) where status = 'pending';
create index webhook_deliveries_by_webhook on webhook_deliveries (webhook_id, created_at desc);

create function ledger_enqueue_webhook_deliveries() returns trigger language plpgsql as $$
begin
    insert into webhook_deliveries (delivery_id, webhook_id, firing_id, body)
    select d.delivery_id, d.webhook_id, new.firing_id,
           json_build_object(
               'id', d.delivery_id, 'type', 'alert.fired', 'created_at', clock_timestamp(),
               'data', json_build_object(
                   'firing_id', new.firing_id, 'alert_id', new.alert_id, 'portfolio_id', new.portfolio_id,
                   'arming', new.arming, 'kind', upper(regexp_replace(new.kind, '([a-z0-9])([A-Z])', '\1_\2', 'g')),
                   'symbol', new.symbol, 'price', new.price::text,
                   'observed_value', new.observed_value::text, 'fired_at', new.fired_at))::text
      -- One id per endpoint: a subquery with a volatile call in its select list is evaluated row by row.
      from (select gen_random_uuid() as delivery_id, e.webhook_id
              from webhook_endpoints e
             where e.portfolio_id = new.portfolio_id and e.removed_at is null) d
    on conflict (webhook_id, firing_id) do nothing;
    if found then
        perform pg_notify('webhook_due', '');
    end if;
    return null;
end $$;

create trigger alert_firings_webhooks after insert on alert_firings
    for each row execute function ledger_enqueue_webhook_deliveries();
