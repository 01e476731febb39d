-- Stop and stop-limit orders (FIX OrdType 3 and 4): the stop price, and when and at which price the order was
-- triggered (`OrderTriggered`). Null for the other types and for stop orders not triggered yet.
alter table rm_orders
    add column stop_price    numeric,
    add column triggered_at  timestamptz,
    add column trigger_price numeric;
