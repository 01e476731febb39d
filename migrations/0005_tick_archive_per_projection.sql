-- The tick archive records which projection applied each tick.
--
-- Ticks come from Kafka, and a broker that crashes can serve a consumer group a message it then loses (or
-- later re-appends after newer ones): two tick projections can end up having applied different ticks. A
-- rebuild must replay exactly what the projection it rebuilds applied, so each tick-driven projection archives
-- its own rows; catch-up from the archive reads the union. (A shared archive made a rebuild replay ticks of
-- every projection; the chaos test's broker restarts are where this can happen.)
alter table market_ticks add column projection text not null default 'prices';
alter table market_ticks drop constraint market_ticks_pkey;
insert into market_ticks (projection, symbol, ts, seq, price, volume, source, received_at)
    select 'analytics', symbol, ts, seq, price, volume, source, received_at from market_ticks;
alter table market_ticks add primary key (projection, symbol, ts, seq);
alter table market_ticks alter column projection drop default;
create index market_ticks_symbol_ts_idx on market_ticks (symbol, ts, seq);
