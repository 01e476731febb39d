-- performance projection: every change of a portfolio's cash, holdings and net deposits, at the time it
-- happened (the event's own time, which a statement import sets in the past). Equity at any time is these
-- changes up to it plus the prices then (price_bars_1m, and the fills' own prices): see docs/performance.md.
create table rm_portfolio_flows (
    portfolio_id   uuid        not null,
    sequence       bigint      not null,
    at             timestamptz not null,
    cash_delta     numeric     not null,
    -- deposits (+) and withdrawals (−): the flows time-weighted and money-weighted returns take out
    deposit_delta  numeric     not null,
    symbol         text,
    quantity_delta numeric     not null,
    -- a fill's price: an observation of the symbol's price at `at`
    price          numeric,
    primary key (portfolio_id, sequence)
);
create index rm_portfolio_flows_time on rm_portfolio_flows (portfolio_id, at);

create table performance_progress (
    aggregate_id  text   primary key,
    last_sequence bigint not null
);

