-- Fills are facts: a fill is booked whatever it costs, so a portfolio can be in deficit (buying power, i.e.
-- cash − reserved, below zero); operators list such portfolios. Process-manager steps that could not be applied
-- are visible and can be retried or dismissed, with who did it. Order reject codes are spelled as clients see
-- every other code (INSUFFICIENT_FUNDS, not InsufficientFunds).

alter table process_failures
    add column resolved_at timestamptz,
    add column resolved_by text,
    add column resolution  text check (resolution in ('retried', 'dismissed'));
create index process_failures_open on process_failures (recorded_at) where resolved_at is null;

create index rm_portfolios_in_deficit on rm_portfolios (portfolio_id) where reserved_cash > cash;

update rm_orders
   set reject_code = case reject_code
                         when 'InsufficientFunds' then 'INSUFFICIENT_FUNDS'
                         when 'InsufficientQuantity' then 'INSUFFICIENT_QUANTITY'
                         when 'NoMarketPrice' then 'NO_MARKET_PRICE'
                         when 'UnknownPortfolio' then 'PORTFOLIO_NOT_FOUND'
                         when 'PortfolioRejected' then 'PORTFOLIO_REJECTED'
                         else reject_code
                     end
 where reject_code is not null;
