-- Every API instance listens on `alert_fired` to push firings to `alertFired` subscribers, whichever
-- instance they are connected to. The payload is the firing (amounts as text, exact).
create function ledger_notify_alert_fired() returns trigger language plpgsql as $$
begin
    perform pg_notify('alert_fired', json_build_object(
        'firing_id', new.firing_id, 'alert_id', new.alert_id, 'portfolio_id', new.portfolio_id,
        'arming', new.arming, 'kind', new.kind, 'symbol', new.symbol, 'price', new.price::text,
        'observed_value', new.observed_value::text, 'fired_at', new.fired_at)::text);
    return null;
end $$;

create trigger alert_firings_notify after insert on alert_firings
    for each row execute function ledger_notify_alert_fired();
