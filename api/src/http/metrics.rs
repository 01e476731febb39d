//! `/metrics` in the Prometheus text format, gathered at scrape time from the components' own counters and a
//! few cheap queries.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use ledger::metrics::Histogram;

use crate::graphql::AppState;

/// Histogram bounds, in seconds.
const LATENCY_BOUNDS: [f64; 12] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];

/// Counters of the HTTP layer.
#[derive(Default)]
pub struct HttpMetrics {
    pub requests: std::sync::atomic::AtomicU64,
    pub rate_limited: std::sync::atomic::AtomicU64,
    pub unauthorized: std::sync::atomic::AtomicU64,
    pub request_duration: Histogram,
    /// Raw price sockets open (`/ws/prices`).
    pub price_sockets_open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn histogram(out: &mut String, name: &str, help: &str, histogram: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (bound, count) in LATENCY_BOUNDS.iter().zip(histogram.cumulative(&LATENCY_BOUNDS)) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", histogram.count());
    let _ = writeln!(out, "{name}_sum {}", histogram.sum_seconds());
    let _ = writeln!(out, "{name}_count {}", histogram.count());
}

fn counter(out: &mut String, name: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn gauge(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// This instance's own counters (cheap: no database).
pub fn render(state: &AppState, http: &HttpMetrics) -> String {
    let mut out = String::new();
    let commands = state.commands.metrics();
    counter(
        &mut out,
        "ledger_commands_total",
        "Commands handled by this instance, by outcome.",
        &[
            ("{outcome=\"committed\"}", commands.committed.load(Ordering::Relaxed)),
            ("{outcome=\"duplicate\"}", commands.duplicates.load(Ordering::Relaxed)),
            ("{outcome=\"rejected\"}", commands.rejected.load(Ordering::Relaxed)),
            ("{outcome=\"failed\"}", commands.failed.load(Ordering::Relaxed)),
        ],
    );
    counter(
        &mut out,
        "ledger_command_conflicts_total",
        "Optimistic-lock conflicts retried.",
        &[("", commands.conflicts.load(Ordering::Relaxed))],
    );
    counter(
        &mut out,
        "ledger_command_exclusive_attempts_total",
        "Commands starved by another process's writes, written holding back every writer of the log.",
        &[("", commands.exclusive_attempts.load(Ordering::Relaxed))],
    );
    let rejections: Vec<(String, u64)> =
        commands.rejections_by_code().into_iter().map(|(code, n)| (format!("{{code=\"{code}\"}}"), n)).collect();
    let rejections: Vec<(&str, u64)> = rejections.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    counter(&mut out, "ledger_command_rejections_total", "Commands refused, by error code.", &rejections);
    histogram(
        &mut out,
        "ledger_command_duration_seconds",
        "Time to execute a command (load, handle, commit).",
        &commands.latency,
    );
    counter(
        &mut out,
        "ledger_command_batches_total",
        "Command batches (cashBatch) executed; their commands count in ledger_commands_total.",
        &[("", commands.batches.load(Ordering::Relaxed))],
    );
    histogram(
        &mut out,
        "ledger_command_batch_duration_seconds",
        "Time to execute a command batch (lookups, load, handle, one commit).",
        &commands.batch_latency,
    );
    counter(
        &mut out,
        "ledger_http_requests_total",
        "GraphQL HTTP requests.",
        &[("", http.requests.load(Ordering::Relaxed))],
    );
    counter(
        &mut out,
        "ledger_http_rate_limited_total",
        "Requests refused by the rate limit.",
        &[("", http.rate_limited.load(Ordering::Relaxed))],
    );
    counter(
        &mut out,
        "ledger_http_unauthorized_total",
        "Requests with an invalid token.",
        &[("", http.unauthorized.load(Ordering::Relaxed))],
    );
    histogram(
        &mut out,
        "ledger_http_request_duration_seconds",
        "GraphQL HTTP request duration.",
        &http.request_duration,
    );
    gauge(
        &mut out,
        "ledger_subscriptions_open",
        "Open GraphQL subscriptions on this instance.",
        &[(String::new(), state.hub.subscriptions.load(Ordering::Relaxed) as f64)],
    );
    gauge(
        &mut out,
        "ledger_price_sockets_open",
        "Open raw price WebSockets (/ws/prices) on this instance.",
        &[(String::new(), http.price_sockets_open.load(Ordering::Relaxed) as f64)],
    );
    let pool = &state.pool;
    gauge(
        &mut out,
        "ledger_db_pool_connections",
        "Database pool connections of this instance.",
        &[
            ("{state=\"idle\"}".into(), pool.num_idle() as f64),
            ("{state=\"used\"}".into(), (pool.size() as usize).saturating_sub(pool.num_idle()) as f64),
        ],
    );
    out
}

/// What the database says (log head, followers' and projections' lag, dead letters, process failures,
/// deficits): a few queries, so the server caches it between scrapes (`server::METRICS_CACHE_MS`).
pub async fn render_database(pool: &sqlx::PgPool) -> String {
    let mut out = String::new();
    // Log head, dead letters, and the lag of every log follower (relay, process manager, sealer, catch-ups).
    if let Ok((head, head_age)) = ledger::log::head(pool).await {
        gauge(
            &mut out,
            "ledger_log_head_position",
            "Global position of the newest event.",
            &[(String::new(), head.unwrap_or(0) as f64)],
        );
        gauge(
            &mut out,
            "ledger_log_head_age_seconds",
            "Age of the newest event.",
            &[(String::new(), head_age.unwrap_or(0.0))],
        );
    }
    if let Ok(rows) = sqlx::query_as::<_, (String, i64)>(
        "select projection, count(*) from dead_letters where resolved_at is null group by projection",
    )
    .fetch_all(pool)
    .await
    {
        let samples: Vec<(String, f64)> =
            rows.into_iter().map(|(p, n)| (format!("{{projection=\"{p}\"}}"), n as f64)).collect();
        gauge(
            &mut out,
            "ledger_dead_letters",
            "Open dead letters (neither replayed nor discarded), by projection.",
            &samples,
        );
    }
    if let Ok(rows) = ledger::log::cursor_lags(pool).await {
        let label = |name: &str| format!("{{follower=\"{name}\"}}");
        let events: Vec<(String, f64)> = rows.iter().map(|(n, lag)| (label(n), lag.events as f64)).collect();
        let seconds: Vec<(String, f64)> = rows.iter().map(|(n, lag)| (label(n), lag.seconds)).collect();
        gauge(
            &mut out,
            "ledger_follower_lag_events",
            "Committed events after a log follower's cursor (relay, process manager, …).",
            &events,
        );
        gauge(
            &mut out,
            "ledger_follower_lag_seconds",
            "Age of the oldest event a log follower has not passed.",
            &seconds,
        );
    }
    projection_metrics(&mut out, pool).await;
    operations_metrics(&mut out, pool).await;
    out
}

/// What needs an operator: process-manager steps not applied, portfolios in deficit.
async fn operations_metrics(out: &mut String, pool: &sqlx::PgPool) {
    if let Ok(open) = ledger::process::failures::open_count(pool).await {
        gauge(
            out,
            "ledger_process_failures",
            "Process-manager steps refused and not yet retried or dismissed (see processFailures).",
            &[("{state=\"open\"}".into(), open as f64)],
        );
    }
    if let Ok((count, total)) = ledger::queries::portfolios::deficit_totals(pool).await {
        gauge(
            out,
            "ledger_portfolios_in_deficit",
            "Portfolios whose buying power is below zero (a fill cost more than was available).",
            &[(String::new(), count as f64)],
        );
        gauge(
            out,
            "ledger_deficit_total",
            "Sum of those deficits, in the portfolios' base currencies.",
            &[(String::new(), total.to_string().parse().unwrap_or(f64::NAN))],
        );
    }
}

/// Lag (events and seconds) of each projection's workers behind the log, and their group's rebalances, from
/// what the workers record in `projection_status` (they may run in other processes).
async fn projection_metrics(out: &mut String, pool: &sqlx::PgPool) {
    let Ok(rows) = sqlx::query_as::<_, (String, String, i64, i64)>(
        "select projection, transaction_id::text, global_position, rebalances from projection_status order by projection",
    )
    .fetch_all(pool)
    .await
    else {
        return;
    };
    let settings = ledger::projections::ProjectionSettings::default();
    let (mut events, mut seconds, mut rebalances) = (Vec::new(), Vec::new(), Vec::new());
    for (name, transaction_id, global_position, count) in rows {
        let label = format!("{{projection=\"{name}\"}}");
        rebalances.push((label.clone(), count as u64));
        let Some(aggregate_type) = ledger::projections::by_name(&name, &settings).and_then(|p| p.aggregate_type())
        else {
            continue; // tick-driven only
        };
        let Ok(position) = ledger::log::LogPosition::from_columns(&transaction_id, global_position) else {
            continue;
        };
        if let Ok(lag) = ledger::log::lag_after(pool, position, Some(aggregate_type)).await {
            events.push((label.clone(), lag.events as f64));
            seconds.push((label, lag.seconds));
        }
    }
    gauge(
        out,
        "ledger_projection_lag_events",
        "Events of its aggregate type after the highest a projection has applied.",
        &events,
    );
    gauge(out, "ledger_projection_lag_seconds", "Age of the oldest such event.", &seconds);
    let rebalances: Vec<(&str, u64)> = rebalances.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    counter(
        out,
        "ledger_consumer_rebalances_total",
        "Partition assignments and revocations of a projection's consumer group.",
        &rebalances,
    );
}
