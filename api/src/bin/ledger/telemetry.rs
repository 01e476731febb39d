//! Logging and traces: the log format (text or JSON lines) and level (`RUST_LOG`), and the optional
//! OpenTelemetry trace export.
//!
//! Traces are sent as OTLP/HTTP JSON to `<endpoint>/v1/traces` (an
//! OpenTelemetry Collector, Jaeger, Tempo… all accept it), enabled by setting `OTEL_EXPORTER_OTLP_ENDPOINT`.
//!
//! A [`tracing_subscriber::Layer`]: every closed span becomes an OTLP span with its fields as attributes. Its
//! trace id is the span's own `trace_id` field when it has one (the HTTP layer sets it from the caller's
//! `traceparent`), else its parent's, else a new one — so a GraphQL request and the command spans under it
//! form one trace, under the caller's trace when it sent one. A projection worker's span carries the trace
//! context its events were written in (`ledger::trace`: event metadata, then the relay's Kafka header), so
//! the trace goes on across processes: request → commit → relay → projection.
//!
//! Export never slows or blocks the ledger: spans go through a bounded queue ([`SPAN_QUEUE_MAX`]) to a thread
//! of its own that posts batches of at most [`EXPORT_BATCH_MAX`] spans every [`EXPORT_INTERVAL_MS`]; when the
//! queue is full or the collector is down, spans are dropped and counted (`dropped()`), never retried.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ledger_api::http::client::{Client, Target};
use serde_json::{json, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Log output: human-readable text or JSON lines.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber: `RUST_LOG` filters both the log lines (to stderr) and the exported spans.
pub fn init_logging(format: &LogFormat, quiet: bool, otlp: Option<(&str, &str)>) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // librdkafka reports every failed connection attempt as an error; the relay and the workers report broker
    // outages themselves, once per state change.
    let default = if quiet { "warn,rdkafka=off,librdkafka=off" } else { "info,sqlx=warn,rdkafka=off,librdkafka=off" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    // One filter (RUST_LOG) for both: the spans exported are those it enables (`info` by default).
    let otlp = match otlp {
        Some((endpoint, service)) => Some(OtlpLayer::start(endpoint, service)?),
        None => None,
    };
    let exporting = otlp.is_some();
    tracing_subscriber::registry().with(filter).with(fmt).with(otlp).try_init()?;
    ledger::trace::set_exporting(exporting);
    Ok(())
}

/// Span fields that set the exported span's ids instead of becoming attributes: `trace_id` (32 hex digits),
/// `span_id` and `parent_span_id` (16 each; the parent in another process, e.g. the request a projection
/// worker's batch comes from). A span without them takes its parent's trace, or a new one.
const ID_FIELDS: [&str; 3] = ["trace_id", "span_id", "parent_span_id"];

/// Spans waiting for export, at most.
pub const SPAN_QUEUE_MAX: usize = 10_000;
/// Spans per export request, at most.
pub const EXPORT_BATCH_MAX: usize = 512;
/// How often the exporter posts what it has.
pub const EXPORT_INTERVAL_MS: u64 = 1_000;
/// How long one export request may take.
const EXPORT_TIMEOUT_MS: u64 = 5_000;

/// What the layer keeps per open span.
struct SpanData {
    trace_id: u128,
    span_id: u64,
    parent_span_id: Option<u64>,
    start: SystemTime,
    attributes: Vec<(String, String)>,
}

#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_string(), format!("{value:?}")));
    }
}

/// The exporting layer; see the module docs.
pub struct OtlpLayer {
    sender: std::sync::mpsc::SyncSender<Value>,
    dropped: Arc<AtomicU64>,
}

impl OtlpLayer {
    /// A layer exporting to `endpoint` (e.g. `http://collector:4318`) as `service`, and its exporter thread.
    pub fn start(endpoint: &str, service: &str) -> anyhow::Result<Self> {
        let collector = Collector::parse(endpoint)
            .map_err(|reason| anyhow::anyhow!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?}: {reason}"))?;
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Value>(SPAN_QUEUE_MAX);
        let service = service.to_string();
        std::thread::Builder::new().name("otlp-export".into()).spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(export_loop(collector, service, receiver));
        })?;
        Ok(Self { sender, dropped: Arc::new(AtomicU64::new(0)) })
    }
}

/// The collector's traces endpoint: `<endpoint>/v1/traces` over HTTP/1.1 (a collector or agent beside the
/// ledger, which forwards to hosted back ends with their credentials).
struct Collector(Target, Client);

impl Collector {
    fn parse(endpoint: &str) -> Result<Collector, String> {
        let target = Target::parse(&format!("{}/v1/traces", endpoint.trim_end_matches('/')))?;
        Ok(Collector(target, Client::new(None)?))
    }

    /// Posts one JSON body on a connection of its own (an export wakes once a second and posts what is queued,
    /// in batches of at most [`EXPORT_BATCH_MAX`] spans); the response's status.
    async fn post(&self, body: Vec<u8>) -> Result<hyper::StatusCode, String> {
        let limit = Duration::from_millis(EXPORT_TIMEOUT_MS);
        let addresses = tokio::time::timeout(limit, self.0.resolve())
            .await
            .map_err(|_| format!("{} not resolved within {EXPORT_TIMEOUT_MS} ms", self.0.host))??;
        self.1.post(&self.0, &addresses, &[], bytes::Bytes::from(body), limit).await
    }
}

async fn export_loop(collector: Collector, service: String, receiver: std::sync::mpsc::Receiver<Value>) {
    let scheme = if collector.0.tls { "https" } else { "http" };
    let url = format!("{scheme}://{}{}", collector.0.authority, collector.0.path);
    let resource = json!({ "attributes": [ { "key": "service.name", "value": { "stringValue": service } } ] });
    let mut failing = false;
    loop {
        tokio::time::sleep(Duration::from_millis(EXPORT_INTERVAL_MS)).await;
        loop {
            let batch: Vec<Value> = receiver.try_iter().take(EXPORT_BATCH_MAX).collect();
            if batch.is_empty() {
                break;
            }
            let count = batch.len() as u64;
            let body = json!({ "resourceSpans": [ {
                "resource": resource,
                "scopeSpans": [ { "scope": { "name": "ledger" }, "spans": batch } ],
            } ] });
            match collector.post(body.to_string().into_bytes()).await {
                Ok(status) if status.is_success() => failing = false,
                outcome => {
                    if !failing {
                        // Not through `tracing`: this thread's own events would be exported too.
                        let reason = match outcome {
                            Ok(status) => format!("HTTP {status}"),
                            Err(error) => error,
                        };
                        eprintln!(
                            "otlp: exporting {count} spans to {url} failed ({reason}); dropping spans until it works"
                        );
                        failing = true;
                    }
                    break;
                }
            }
        }
    }
}

fn unix_nanos(time: SystemTime) -> String {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0).to_string()
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let parent = span.parent().and_then(|p| p.extensions().get::<SpanData>().map(|d| (d.trace_id, d.span_id)));
        let hex = |name: &str| fields.0.iter().find(|(field, _)| field == name).map(|(_, value)| value.as_str());
        let own_trace = hex("trace_id").and_then(|v| u128::from_str_radix(v, 16).ok()).filter(|id| *id != 0);
        let own_span = hex("span_id").and_then(|v| u64::from_str_radix(v, 16).ok()).filter(|id| *id != 0);
        let remote_parent = hex("parent_span_id").and_then(|v| u64::from_str_radix(v, 16).ok()).filter(|id| *id != 0);
        let trace_id = own_trace.or(parent.map(|p| p.0)).unwrap_or_else(|| rand::random::<u128>() | 1);
        let data = SpanData {
            trace_id,
            span_id: own_span.unwrap_or_else(|| rand::random::<u64>() | 1),
            parent_span_id: remote_parent.or(parent.filter(|p| p.0 == trace_id).map(|p| p.1)),
            start: SystemTime::now(),
            attributes: fields.0,
        };
        span.extensions_mut().insert(data);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        values.record(&mut fields);
        let mut extensions = span.extensions_mut();
        if let Some(data) = extensions.get_mut::<SpanData>() {
            data.attributes.extend(fields.0);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(data) = span.extensions_mut().remove::<SpanData>() else { return };
        let attributes: Vec<Value> = data
            .attributes
            .iter()
            .filter(|(name, _)| !ID_FIELDS.contains(&name.as_str()))
            .map(|(key, value)| json!({ "key": key, "value": { "stringValue": value } }))
            .collect();
        let mut otlp = json!({
            "traceId": format!("{:032x}", data.trace_id),
            "spanId": format!("{:016x}", data.span_id),
            "name": span.name(),
            "kind": 1,
            "startTimeUnixNano": unix_nanos(data.start),
            "endTimeUnixNano": unix_nanos(SystemTime::now()),
            "attributes": attributes,
        });
        if let Some(parent) = data.parent_span_id {
            otlp["parentSpanId"] = json!(format!("{parent:016x}"));
        }
        if self.sender.try_send(otlp).is_err() && self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            eprintln!("otlp: the span queue ({SPAN_QUEUE_MAX}) is full; dropping spans");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Collector;

    #[test]
    fn the_collector_is_an_http_endpoint_with_a_host() {
        let Collector(collector, _) = Collector::parse("http://collector:4318/").unwrap();
        assert_eq!((collector.host.as_str(), collector.port), ("collector", 4318));
        assert_eq!((collector.authority.as_str(), collector.path.as_str()), ("collector:4318", "/v1/traces"));
        let Collector(default_port, _) = Collector::parse("http://[::1]/otlp").unwrap();
        assert_eq!((default_port.host.as_str(), default_port.port), ("::1", 80));
        assert_eq!(default_port.path, "/otlp/v1/traces");
        assert!(Collector::parse("https://collector:4318").is_ok());
        assert!(Collector::parse("grpc://collector:4317").err().unwrap().contains("not supported"));
        assert!(Collector::parse("collector:4318").is_err());
        assert!(Collector::parse("http://").is_err());
    }
}
