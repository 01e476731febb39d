-- A minute bar's open and close are its earliest and latest ticks by (ts, seq), whatever order ticks arrive in
-- (a dead letter's replay applies a tick late). Bars written before this have no tick times: their open stays,
-- and the next tick of the minute is taken as the newer (as before). A rebuild (`ledger replay prices`) fills
-- the times in; until then `--verify` reports those bars as different.
alter table price_bars_1m
    add column open_ts   timestamptz,
    add column open_seq  bigint,
    add column close_ts  timestamptz,
    add column close_seq bigint;
