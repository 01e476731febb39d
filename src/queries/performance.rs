//! A portfolio's performance over a period: its equity curve, time-weighted and money-weighted returns and
//! maximum drawdown (definitions and a worked example: docs/performance.md).
//!
//! Computed when asked from two read models, so that it is exact at any time and interval without a row per
//! portfolio per minute: the portfolio's flows (`rm_portfolio_flows`, the `performance` projection) give its
//! cash, holdings and net deposits at any time; the prices at a time are the last one-minute bar of each symbol
//! closed by then (`price_bars_1m`), or the portfolio's own last fill of the symbol if that is later (a fill
//! is a price too: an imported history needs no market data of its own).
//!
//! Equity is evaluated at every point of the requested grid and at every deposit or withdrawal inside the
//! period, so the time-weighted return is exact (not an approximation between points).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, Utc};
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use rust_decimal::{Decimal, RoundingStrategy};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Most points one answer holds.
pub const POINTS_MAX: usize = 2_000;
/// Points a period has when the caller gives no start.
pub const POINTS_DEFAULT: i32 = 500;
/// Most times equity is evaluated at for one answer (points plus deposits and withdrawals inside the period).
pub const EVALUATIONS_MAX: usize = 20_000;
/// Most deposits, withdrawals and fills inside one period.
pub const PERIOD_FLOWS_MAX: usize = 100_000;
/// Most (time, symbol) prices looked up for one answer.
pub const PRICE_LOOKUPS_MAX: usize = 200_000;
/// Decimal places of the returns and the drawdown.
pub const RATIO_SCALE: u32 = 8;

/// The spacing of the points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum), graphql(name = "PerformanceInterval"))]
pub enum Interval {
    Minute,
    Hour,
    Day,
}

impl Interval {
    pub fn step(self) -> Duration {
        match self {
            Self::Minute => Duration::minutes(1),
            Self::Hour => Duration::hours(1),
            Self::Day => Duration::days(1),
        }
    }
}

/// The portfolio at one point of the curve.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject), graphql(name = "PerformancePoint"))]
pub struct Point {
    /// The time the portfolio is valued at (everything up to and including it counts).
    pub at: DateTime<Utc>,
    /// cash + market value.
    pub equity: Decimal,
    pub cash: Decimal,
    /// Σ quantity × the last price known at `at`.
    pub market_value: Decimal,
    /// Σ deposits − Σ withdrawals since the portfolio opened.
    pub net_deposits: Decimal,
    /// The time-weighted return from the period's start to this point.
    pub cumulative_return: Decimal,
}

/// The curve and the figures of one period.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject), graphql(name = "Performance"))]
pub struct Performance {
    /// The period's start.
    pub from: DateTime<Utc>,
    /// The period's end.
    pub to: DateTime<Utc>,
    /// `from`, a point every interval, and `to`.
    pub points: Vec<Point>,
    /// Equity at `from`.
    pub start_equity: Decimal,
    /// Equity at `to`.
    pub end_equity: Decimal,
    /// Deposits − withdrawals inside the period.
    pub net_flows: Decimal,
    /// The return of one unit invested for the whole period (0.21 = 21 %), deposits and withdrawals taken out
    /// (chain-linked between every flow); not annualised; `null` when nothing was invested in the period.
    pub time_weighted_return: Option<Decimal>,
    /// The annual rate (XIRR, 365-day years) at which the start equity, the flows and the end equity have a
    /// net present value of zero; `null` when there is no such rate (e.g. nothing invested).
    pub money_weighted_return: Option<Decimal>,
    /// The largest fall of the time-weighted index from a previous peak, as a fraction of the peak (0.2 = 20 %).
    pub max_drawdown: Decimal,
}

/// Why a period cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum PerformanceError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Per symbol, the last bar closed by each evaluation time (by its index): close and closing time.
pub type Bars = HashMap<String, Vec<Option<(Decimal, DateTime<Utc>)>>>;

/// One row of `rm_portfolio_flows`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct FlowRow {
    pub at: DateTime<Utc>,
    pub cash_delta: Decimal,
    pub deposit_delta: Decimal,
    pub symbol: Option<String>,
    pub quantity_delta: Decimal,
    pub price: Option<Decimal>,
}

/// The performance of `portfolio_id` from `from` (default: [`POINTS_DEFAULT`] intervals before `to`, not
/// before the portfolio opened) to `to` (default: now), a point every `interval` from `from` and one at `to`.
/// `None` when the read model has no flow of the portfolio (unknown, or not projected yet).
pub async fn performance(
    pool: &PgPool,
    portfolio_id: Uuid,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    interval: Interval,
    now: DateTime<Utc>,
) -> Result<Option<Performance>, PerformanceError> {
    let to = to.unwrap_or(now);
    // One snapshot for all the reads: a statement imported meanwhile is in all of them or in none.
    let mut tx = pool.begin().await?;
    sqlx::query("set transaction isolation level repeatable read, read only").execute(&mut *tx).await?;
    let first: Option<DateTime<Utc>> =
        sqlx::query_scalar("select min(at) from rm_portfolio_flows where portfolio_id = $1 and at <= $2")
            .bind(portfolio_id)
            .bind(to)
            .fetch_one(&mut *tx)
            .await?;
    let Some(first) = first else { return Ok(None) };
    let from = from.unwrap_or_else(|| (to - interval.step() * POINTS_DEFAULT).max(first));
    let grid = grid(from, to, interval)?;
    // The portfolio at `from`, summed in the database; then the flows of the period one by one.
    let start = Holdings::at(&mut tx, portfolio_id, from).await?;
    let flows: Vec<FlowRow> = sqlx::query_as(
        "select at, cash_delta, deposit_delta, symbol, quantity_delta, price from rm_portfolio_flows
          where portfolio_id = $1 and at > $2 and at <= $3 order by at, sequence limit $4",
    )
    .bind(portfolio_id)
    .bind(from)
    .bind(to)
    .bind(PERIOD_FLOWS_MAX as i64 + 1)
    .fetch_all(&mut *tx)
    .await?;
    if flows.len() > PERIOD_FLOWS_MAX {
        return Err(PerformanceError::Invalid(format!(
            "more than {PERIOD_FLOWS_MAX} deposits, withdrawals and fills in the period: shorten it"
        )));
    }
    let times = evaluation_times(&grid, &flows, from, to)?;
    let mut symbols: Vec<String> = start.held().chain(flows.iter().filter_map(|f| f.symbol.clone())).collect();
    symbols.sort();
    symbols.dedup();
    if times.len().saturating_mul(symbols.len()) > PRICE_LOOKUPS_MAX {
        return Err(PerformanceError::Invalid(format!(
            "{} times × {} symbols: at most {PRICE_LOOKUPS_MAX} prices per answer (shorten the period or widen the \
             interval)",
            times.len(),
            symbols.len()
        )));
    }
    let rows: Vec<(i64, String, Decimal, DateTime<Utc>)> = sqlx::query_as(
        "select e.i, s.symbol, b.close, b.closed_at
           from unnest($1::timestamptz[]) with ordinality as e(t, i)
          cross join unnest($2::text[]) as s(symbol)
          cross join lateral (
                select close, coalesce(close_ts, minute) as closed_at from price_bars_1m
                 where symbol = s.symbol and minute <= e.t and coalesce(close_ts, minute) <= e.t
                 order by minute desc limit 1) b",
    )
    .bind(&times)
    .bind(&symbols)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut bars: Bars = HashMap::with_capacity(symbols.len());
    for (index, symbol, close, closed_at) in rows {
        bars.entry(symbol).or_insert_with(|| vec![None; times.len()])[index as usize - 1] = Some((close, closed_at));
    }
    Ok(Some(compute(start, &flows, &grid, &times, &bars, from, to)))
}

/// `from`, then every `interval` after it, and `to`.
fn grid(from: DateTime<Utc>, to: DateTime<Utc>, interval: Interval) -> Result<Vec<DateTime<Utc>>, PerformanceError> {
    if from > to {
        return Err(PerformanceError::Invalid(format!("from ({from}) is after to ({to})")));
    }
    let step = interval.step();
    let (span, nanos) = ((to - from).num_nanoseconds().unwrap_or(i64::MAX), step.num_nanoseconds().unwrap_or(1));
    let count = span / nanos + i64::from(span % nanos != 0) + 1;
    if count as usize > POINTS_MAX {
        return Err(PerformanceError::Invalid(format!(
            "{count} points: at most {POINTS_MAX} per answer (shorten the period or widen the interval)"
        )));
    }
    let mut points: Vec<DateTime<Utc>> = (0..).map(|k| from + step * k).take_while(|t| *t < to).collect();
    points.push(to);
    Ok(points)
}

/// The grid and the time of every deposit or withdrawal inside the period, sorted, each once.
fn evaluation_times(
    grid: &[DateTime<Utc>],
    flows: &[FlowRow],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<DateTime<Utc>>, PerformanceError> {
    let mut times: Vec<DateTime<Utc>> = grid.to_vec();
    times.extend(flows.iter().filter(|f| !f.deposit_delta.is_zero() && f.at > from && f.at <= to).map(|f| f.at));
    times.sort();
    times.dedup();
    if times.len() > EVALUATIONS_MAX {
        return Err(PerformanceError::Invalid(format!(
            "{} deposits, withdrawals and points: at most {EVALUATIONS_MAX} (shorten the period)",
            times.len()
        )));
    }
    Ok(times)
}

/// The portfolio as the flows up to a time make it.
#[derive(Debug, Default)]
pub struct Holdings {
    cash: Decimal,
    net_deposits: Decimal,
    /// Per symbol: quantity and the last fill's price and time.
    positions: BTreeMap<String, (Decimal, Decimal, DateTime<Utc>)>,
}

impl Holdings {
    /// The portfolio at `at`: every flow up to it, summed in the database.
    pub async fn at(conn: &mut PgConnection, portfolio_id: Uuid, at: DateTime<Utc>) -> Result<Holdings, sqlx::Error> {
        let (cash, net_deposits): (Option<Decimal>, Option<Decimal>) = sqlx::query_as(
            "select sum(cash_delta), sum(deposit_delta) from rm_portfolio_flows where portfolio_id = $1 and at <= $2",
        )
        .bind(portfolio_id)
        .bind(at)
        .fetch_one(&mut *conn)
        .await?;
        let positions: Vec<(String, Decimal, Decimal, DateTime<Utc>)> = sqlx::query_as(
            "select symbol, sum(quantity_delta), (array_agg(price order by at desc, sequence desc))[1], max(at)
               from rm_portfolio_flows where portfolio_id = $1 and at <= $2 and symbol is not null group by symbol",
        )
        .bind(portfolio_id)
        .bind(at)
        .fetch_all(&mut *conn)
        .await?;
        Ok(Holdings {
            cash: cash.unwrap_or_default(),
            net_deposits: net_deposits.unwrap_or_default(),
            positions: positions.into_iter().map(|(symbol, q, price, at)| (symbol, (q, price, at))).collect(),
        })
    }

    /// The flows folded, in order.
    pub fn of<'a>(flows: impl IntoIterator<Item = &'a FlowRow>) -> Holdings {
        let mut holdings = Holdings::default();
        flows.into_iter().for_each(|flow| holdings.apply(flow));
        holdings
    }

    /// The symbols held (a quantity other than zero).
    fn held(&self) -> impl Iterator<Item = String> + '_ {
        self.positions.iter().filter(|(_, (quantity, ..))| !quantity.is_zero()).map(|(symbol, _)| symbol.clone())
    }

    fn apply(&mut self, flow: &FlowRow) {
        self.cash += flow.cash_delta;
        self.net_deposits += flow.deposit_delta;
        if let (Some(symbol), Some(price)) = (&flow.symbol, flow.price) {
            let entry = self.positions.entry(symbol.clone()).or_insert((Decimal::ZERO, price, flow.at));
            *entry = (entry.0 + flow.quantity_delta, price, flow.at);
        }
    }

    /// Σ quantity × the later of the bar price and the last fill price at evaluation `index`.
    fn market_value(&self, index: usize, bars: &Bars) -> Decimal {
        let mut value = Decimal::ZERO;
        for (symbol, (quantity, fill_price, filled_at)) in &self.positions {
            if quantity.is_zero() {
                continue;
            }
            let price = match bars.get(symbol).and_then(|closes| closes[index]) {
                Some((close, closed_at)) if closed_at > *filled_at => close,
                _ => *fill_price,
            };
            value += quantity * price;
        }
        value
    }
}

fn ratio(value: Decimal) -> Decimal {
    value.round_dp_with_strategy(RATIO_SCALE, RoundingStrategy::MidpointNearestEven).normalize()
}

/// The curve and the figures from the portfolio at `from` (`start`), the flows after it sorted by time, the
/// grid, the evaluation times (the grid and the flows' times, sorted) and the bar prices at each of them.
pub fn compute(
    start: Holdings,
    flows: &[FlowRow],
    grid: &[DateTime<Utc>],
    times: &[DateTime<Utc>],
    bars: &Bars,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Performance {
    let mut holdings = start;
    let mut next = 0;
    let mut points = Vec::with_capacity(grid.len());
    let mut grid_at = grid.iter().peekable();
    // Time-weighted index: the product of (equity − flows) / previous equity between evaluations.
    let (mut index, mut peak, mut max_drawdown) = (Decimal::ONE, Decimal::ONE, Decimal::ZERO);
    let (mut invested, mut overflowed) = (false, false);
    let mut previous: Option<Decimal> = None;
    let mut cash_flows: Vec<(DateTime<Utc>, f64)> = Vec::new();
    let (mut start_equity, mut end_equity, mut net_flows) = (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO);
    for (i, t) in times.iter().enumerate() {
        let mut flowed = Decimal::ZERO;
        while next < flows.len() && flows[next].at <= *t {
            holdings.apply(&flows[next]);
            if flows[next].at > from {
                flowed += flows[next].deposit_delta;
            }
            next += 1;
        }
        let market_value = holdings.market_value(i, bars);
        let equity = holdings.cash + market_value;
        match previous {
            None => {
                start_equity = equity;
                if !equity.is_zero() {
                    cash_flows.push((*t, -equity.to_f64().unwrap_or_default()));
                }
            }
            Some(before) => {
                net_flows += flowed;
                if !flowed.is_zero() {
                    cash_flows.push((*t, -flowed.to_f64().unwrap_or_default()));
                }
                if before > Decimal::ZERO && !overflowed {
                    invested = true;
                    // A tiny equity before a sub-period can make the factor huge: no figure rather than a panic.
                    match (equity - flowed).checked_div(before).and_then(|factor| index.checked_mul(factor)) {
                        Some(next) => index = next,
                        None => overflowed = true,
                    }
                    peak = peak.max(index);
                    if peak > Decimal::ZERO {
                        max_drawdown = max_drawdown.max((peak - index) / peak);
                    }
                }
            }
        }
        previous = Some(equity);
        end_equity = equity;
        if grid_at.peek() == Some(&t) {
            grid_at.next();
            points.push(Point {
                at: *t,
                equity,
                cash: holdings.cash,
                market_value,
                net_deposits: holdings.net_deposits,
                cumulative_return: ratio(index - Decimal::ONE),
            });
        }
    }
    if !end_equity.is_zero() {
        cash_flows.push((to, end_equity.to_f64().unwrap_or_default()));
    }
    Performance {
        from,
        to,
        points,
        start_equity,
        end_equity,
        net_flows,
        time_weighted_return: (invested && !overflowed).then(|| ratio(index - Decimal::ONE)),
        money_weighted_return: xirr(&cash_flows).and_then(Decimal::from_f64).map(ratio),
        max_drawdown: ratio(max_drawdown),
    }
}

/// The annual rate r at which Σ amount / (1 + r)^(years since the first flow) = 0, 365-day years. Newton's
/// method from 10 %, then bisection if it does not converge; `None` without both signs among the amounts.
pub fn xirr(flows: &[(DateTime<Utc>, f64)]) -> Option<f64> {
    let first = flows.first()?.0;
    let has_both = flows.iter().any(|f| f.1 > 0.0) && flows.iter().any(|f| f.1 < 0.0);
    if !has_both {
        return None;
    }
    let years: Vec<(f64, f64)> =
        flows.iter().map(|(t, amount)| ((*t - first).num_milliseconds() as f64 / 31_536_000_000.0, *amount)).collect();
    let npv = |r: f64| years.iter().map(|(y, a)| a / (1.0 + r).powf(*y)).sum::<f64>();
    let slope = |r: f64| years.iter().map(|(y, a)| -y * a / (1.0 + r).powf(y + 1.0)).sum::<f64>();
    let mut r = 0.1;
    for _ in 0..100 {
        let (value, derivative) = (npv(r), slope(r));
        if value.abs() < 1e-9 {
            return Some(r);
        }
        if derivative == 0.0 || !derivative.is_finite() {
            break;
        }
        let next = r - value / derivative;
        if !next.is_finite() || next <= -1.0 {
            break;
        }
        r = next;
    }
    // Bisection over (−100 %, 10^6 %): needs a sign change.
    let (mut low, mut high) = (-0.999_999_999, 1e4);
    let (mut at_low, at_high) = (npv(low), npv(high));
    if !at_low.is_finite() || !at_high.is_finite() || at_low.signum() == at_high.signum() {
        return None;
    }
    for _ in 0..200 {
        let middle = (low + high) / 2.0;
        let at_middle = npv(middle);
        if at_middle.abs() < 1e-9 {
            return Some(middle);
        }
        if at_middle.signum() == at_low.signum() {
            (low, at_low) = (middle, at_middle);
        } else {
            high = middle;
        }
    }
    Some((low + high) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("{text}T00:00:00Z")).unwrap().with_timezone(&Utc)
    }

    fn dec(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    fn cash(at: &str, amount: &str) -> FlowRow {
        let amount = dec(amount);
        FlowRow {
            at: day(at),
            cash_delta: amount,
            deposit_delta: amount,
            symbol: None,
            quantity_delta: Decimal::ZERO,
            price: None,
        }
    }

    fn buy(at: &str, quantity: &str, price: &str) -> FlowRow {
        FlowRow {
            at: day(at),
            cash_delta: -dec(quantity) * dec(price),
            deposit_delta: Decimal::ZERO,
            symbol: Some("ACME".into()),
            quantity_delta: dec(quantity),
            price: Some(dec(price)),
        }
    }

    /// docs/performance.md's worked example: 1,000 invested, a fall to 800, 1,100 added at a 10 % gain, another
    /// 10 % by the end: TWR 21 %, XIRR 10 %, maximum drawdown 20 %.
    #[test]
    fn the_worked_example_of_the_docs() {
        let flows = vec![
            cash("2021-01-01", "1000"),
            buy("2021-01-01", "10", "100"),
            cash("2022-01-01", "1100"),
            buy("2022-01-01", "10", "110"),
        ];
        let (from, to) = (day("2021-01-01"), day("2023-01-01"));
        let grid = grid(from, to, Interval::Day).unwrap();
        assert_eq!(grid.len(), 731);
        let (before, period): (Vec<_>, Vec<_>) = flows.into_iter().partition(|f| f.at <= from);
        let times = evaluation_times(&grid, &period, from, to).unwrap();
        assert_eq!(times, grid, "the deposit inside the period is on a grid point");
        // The market: 80 from mid-2021, 110 at the turn of the year, 121 at the end.
        let mut closes = vec![None; times.len()];
        for (i, t) in times.iter().enumerate() {
            let price = if *t >= day("2023-01-01") {
                Some((dec("121"), day("2023-01-01")))
            } else if *t >= day("2022-01-01") {
                Some((dec("110"), day("2022-01-01")))
            } else if *t >= day("2021-07-01") {
                Some((dec("80"), day("2021-07-01")))
            } else {
                None
            };
            if let Some(price) = price {
                closes[i] = Some(price);
            }
        }
        let bars = HashMap::from([("ACME".to_string(), closes)]);
        let performance = compute(Holdings::of(&before), &period, &grid, &times, &bars, from, to);
        assert_eq!(performance.start_equity, dec("1000"));
        assert_eq!(performance.end_equity, dec("2420"));
        assert_eq!(performance.net_flows, dec("1100"));
        assert_eq!(performance.time_weighted_return, Some(dec("0.21")));
        assert_eq!(performance.money_weighted_return, Some(dec("0.1")));
        assert_eq!(performance.max_drawdown, dec("0.2"));
        let at = |d: &str| performance.points.iter().find(|p| p.at == day(d)).unwrap().clone();
        assert_eq!((at("2021-07-01").equity, at("2021-07-01").cumulative_return), (dec("800"), dec("-0.2")));
        assert_eq!((at("2022-01-01").equity, at("2022-01-01").cumulative_return), (dec("2200"), dec("0.1")));
        assert_eq!(at("2022-01-01").net_deposits, dec("2100"));
    }

    /// Before the first deposit nothing is invested: no return, and no division by zero.
    #[test]
    fn an_empty_portfolio_has_no_return() {
        let flows = vec![cash("2021-01-01", "0")];
        let (from, to) = (day("2021-01-01"), day("2021-01-03"));
        let grid = grid(from, to, Interval::Day).unwrap();
        let performance = compute(Holdings::of(&flows), &[], &grid, &grid, &HashMap::new(), from, to);
        assert_eq!(performance.time_weighted_return, None);
        assert_eq!(performance.money_weighted_return, None);
        assert_eq!(performance.max_drawdown, Decimal::ZERO);
        assert_eq!(performance.points.len(), 3);
    }

    #[test]
    fn too_many_points_are_refused() {
        assert!(grid(day("2021-01-01"), day("2021-03-01"), Interval::Minute).is_err());
        assert!(grid(day("2021-03-01"), day("2021-01-01"), Interval::Day).is_err());
    }

    /// Two flows: XIRR is the compound rate, (end / start)^(1 / years) − 1.
    #[test]
    fn xirr_of_two_flows_is_the_compound_rate() {
        let rate = xirr(&[(day("2021-01-01"), -100.0), (day("2023-01-01"), 121.0)]).unwrap();
        assert!((rate - 0.1).abs() < 1e-9, "{rate}");
        assert_eq!(xirr(&[(day("2021-01-01"), 100.0)]), None);
    }
}
