-- Read models, built by the projection workers (src/projections). Documented in docs/read-models.md.
--
-- Every projection owns a set of tables that is rebuilt and swapped as a unit, including its progress tables:
--   <projection>_progress       last applied sequence per aggregate (events: exactly-once effect);
--   <projection>_tick_progress  last applied (ts, seq) per symbol (ticks).
-- A rebuild fills copies of those tables in the `shadow` schema and swaps them in (see src/projections/rebuild.rs).

create schema if not exists shadow;

-- Messages a worker could not decode or apply: also produced to the dead-letter topic.
create table dead_letters (
    id               bigint generated always as identity primary key,
    projection       text        not null,
    source_topic     text        not null,
    source_partition int         not null,
    source_offset    bigint      not null,
    message_key      text,
    payload          bytea,
    error            text        not null,
    recorded_at      timestamptz not null default clock_timestamp(),
    unique (projection, source_topic, source_partition, source_offset)
);

-- Raw market-data archive: every tick a price worker saw, for rebuilding price read models.
create table market_ticks (
    symbol      text        not null,
    ts          timestamptz not null,
    seq         bigint      not null,
    price       numeric     not null check (price > 0),
    volume      numeric,
    source      text        not null,
    received_at timestamptz not null default clock_timestamp(),
    primary key (symbol, ts, seq)
);

-- orders projection ---------------------------------------------------------------------------------------------

create table rm_orders (
    order_id         uuid        primary key,
    portfolio_id     uuid        not null,
    client_order_id  text        not null,
    symbol           text        not null,
    side             text        not null,
    order_type       text        not null,
    limit_price      numeric,
    protection_price numeric,
    quantity         numeric     not null,
    time_in_force    text        not null,
    status           text        not null,
    cum_quantity     numeric     not null default 0,
    leaves_quantity  numeric     not null,
    average_price    numeric,
    fees             numeric     not null default 0,
    reject_code      text,
    reject_reason    text,
    placed_at        timestamptz not null,
    updated_at       timestamptz not null,
    last_position    bigint      not null
);
create index rm_orders_by_portfolio on rm_orders (portfolio_id, placed_at desc, order_id desc);
create index rm_orders_open on rm_orders (symbol) where status in ('New', 'PartiallyFilled');

create table rm_executions (
    order_id        uuid        not null,
    exec_id         text        not null,
    portfolio_id    uuid        not null,
    symbol          text        not null,
    side            text        not null,
    quantity        numeric     not null,
    price           numeric     not null,
    fee             numeric     not null,
    executed_at     timestamptz not null,
    global_position bigint      not null,
    primary key (order_id, exec_id)
);
create index rm_executions_by_portfolio on rm_executions (portfolio_id, executed_at desc, global_position desc);

create table orders_progress (
    aggregate_id  text   primary key,
    last_sequence bigint not null
);

-- positions projection ------------------------------------------------------------------------------------------

create table rm_portfolios (
    portfolio_id      uuid        primary key,
    owner             text        not null,
    base_currency     text        not null,
    cost_basis_method text        not null,
    cash              numeric     not null default 0,
    reserved_cash     numeric     not null default 0,
    realized_pnl      numeric     not null default 0,
    opened_at         timestamptz not null,
    updated_at        timestamptz not null,
    last_position     bigint      not null
);
create index rm_portfolios_by_owner on rm_portfolios (owner, portfolio_id);

create table rm_positions (
    portfolio_id      uuid        not null,
    symbol            text        not null,
    quantity          numeric     not null default 0,
    reserved_quantity numeric     not null default 0,
    cost_basis        numeric     not null default 0,
    fifo_cost_basis   numeric     not null default 0,
    realized_pnl      numeric     not null default 0,
    updated_at        timestamptz not null,
    primary key (portfolio_id, symbol)
);
create index rm_positions_by_symbol on rm_positions (symbol) where quantity <> 0;

create table rm_lots (
    portfolio_id uuid        not null,
    symbol       text        not null,
    lot_id       text        not null,
    quantity     numeric     not null,
    cost         numeric     not null,
    acquired_at  timestamptz not null,
    primary key (portfolio_id, lot_id)
);

create table positions_progress (
    aggregate_id  text   primary key,
    last_sequence bigint not null
);

-- prices projection (latest_prices already exists: the process manager reads it) ----------------------------------

alter table latest_prices add column seq bigint not null default 0;

create table price_ticks (
    symbol text        not null,
    ts     timestamptz not null,
    seq    bigint      not null,
    price  numeric     not null,
    volume numeric,
    primary key (symbol, ts, seq)
);

create table price_bars_1m (
    symbol text        not null,
    minute timestamptz not null,
    open   numeric     not null,
    high   numeric     not null,
    low    numeric     not null,
    close  numeric     not null,
    volume numeric     not null default 0,
    ticks  int         not null,
    primary key (symbol, minute)
);

create table prices_tick_progress (
    symbol   text        primary key,
    last_ts  timestamptz not null,
    last_seq bigint      not null
);

-- analytics projection ------------------------------------------------------------------------------------------

create table rm_indicators (
    symbol      text        not null,
    indicator   text        not null,
    window_size int         not null,
    value       numeric     not null,
    samples     int         not null,
    as_of       timestamptz not null,
    primary key (symbol, indicator, window_size)
);

create table rm_daily_stats (
    symbol      text        not null,
    trading_day date        not null,
    open_price  numeric     not null,
    last_price  numeric     not null,
    high        numeric     not null,
    low         numeric     not null,
    change_pct  numeric     not null,
    ticks       int         not null,
    updated_at  timestamptz not null,
    primary key (symbol, trading_day)
);
create index rm_daily_stats_by_change on rm_daily_stats (trading_day, change_pct);

-- The last prices of each symbol the indicators need (the longest window).
create table analytics_window (
    symbol text        not null,
    ts     timestamptz not null,
    seq    bigint      not null,
    price  numeric     not null,
    primary key (symbol, ts, seq)
);

create table analytics_tick_progress (
    symbol   text        primary key,
    last_ts  timestamptz not null,
    last_seq bigint      not null
);

-- alerts projection ---------------------------------------------------------------------------------------------
-- Rules come from Portfolio events (rebuildable); firings come from ticks and are kept across rebuilds.

create table rm_alert_rules (
    alert_id     uuid        primary key,
    portfolio_id uuid        not null,
    kind         text        not null,
    symbol       text        not null,
    condition    jsonb       not null,
    arming       int         not null,
    status       text        not null check (status in ('armed', 'fired', 'canceled')),
    created_at   timestamptz not null,
    updated_at   timestamptz not null
);
create index rm_alert_rules_armed on rm_alert_rules (symbol) where status = 'armed';
create index rm_alert_rules_by_portfolio on rm_alert_rules (portfolio_id);

create table alerts_progress (
    aggregate_id  text   primary key,
    last_sequence bigint not null
);

create table alert_firings (
    firing_id      uuid        primary key,
    alert_id       uuid        not null,
    portfolio_id   uuid        not null,
    arming         int         not null,
    kind           text        not null,
    symbol         text        not null,
    price          numeric     not null,
    observed_value numeric     not null,
    tick_ts        timestamptz not null,
    tick_seq       bigint      not null,
    fired_at       timestamptz not null default clock_timestamp(),
    unique (alert_id, arming)
);
create index alert_firings_by_portfolio on alert_firings (portfolio_id, fired_at desc);

create table alert_tick_state (
    symbol     text        primary key,
    last_price numeric     not null,
    last_ts    timestamptz not null,
    last_seq   bigint      not null
);

create table alerts_tick_progress (
    symbol   text        primary key,
    last_ts  timestamptz not null,
    last_seq bigint      not null
);

-- valuations: a view, so that a tick updates one row (latest_prices), not one per portfolio holding the symbol.
-- `stale` depends on a configured age and is decided by the reader (src/projections/valuation.rs).
-- Views bind to tables, and a rebuild swaps tables: so the view is (re)created by a function that the swap calls.
create function ledger_create_views() returns void language plpgsql as $$
begin
    create or replace view public.rm_position_valuations as
    select p.portfolio_id,
           p.symbol,
           p.quantity,
           p.cost_basis,
           p.realized_pnl,
           lp.price                                        as last_price,
           lp.as_of                                        as price_as_of,
           p.quantity * lp.price                           as market_value,
           p.quantity * lp.price - p.cost_basis            as unrealized_pnl,
           case when lp.price is null then 'NO_PRICE' end  as missing_reason
      from public.rm_positions p
      left join public.latest_prices lp on lp.symbol = p.symbol
     where p.quantity <> 0;
end $$;

create schema if not exists retired;
select ledger_create_views();
