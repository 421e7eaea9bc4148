//! JSON lines with the trace and span ids of the current span, so a log line
//! leads to its trace in Jaeger and back.
//!
//! One object per event: `timestamp`, `level`, `target`, the event's fields
//! (`message` included) at the top level, `span` (the current span's name and
//! fields), `spans` (its ancestors, root first) and, when an OpenTelemetry
//! span is current, `trace_id` and `span_id` as lowercase hex.

use std::fmt;

use opentelemetry::trace::TraceContextExt;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event format of JSON logs; use it with
/// [`tracing_subscriber::fmt::format::JsonFields`] as the field formatter so
/// span fields are JSON too.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonWithTraceIds;

/// The trace and span ids (hex) of the OpenTelemetry context that is current
/// on this thread, if any. The OpenTelemetry layer makes a span's context
/// current while the span is entered, so inside an event this is the span the
/// event belongs to. (`tracing::Span::current()` cannot be used there: the
/// subscriber is busy while it handles the event.)
pub fn current_trace_ids() -> Option<(String, String)> {
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

struct FieldsToJson<'a>(&'a mut Map<String, Value>);

impl Visit for FieldsToJson<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_string(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), Value::from(format!("{value:?}")));
    }
}

/// A span as an object: its fields (as the field formatter stored them) and
/// `name`.
fn span_object<S, N>(span: &tracing_subscriber::registry::SpanRef<'_, S>) -> Value
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let ext = span.extensions();
    let mut obj = match ext.get::<FormattedFields<N>>() {
        Some(f) if !f.fields.is_empty() => match serde_json::from_str::<Value>(&f.fields) {
            Ok(Value::Object(m)) => m,
            _ => {
                let mut m = Map::new();
                m.insert("fields".into(), Value::from(f.fields.as_str()));
                m
            }
        },
        _ => Map::new(),
    };
    obj.insert("name".into(), Value::from(span.metadata().name()));
    Value::Object(obj)
}

impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut obj = Map::new();
        let mut ts = String::new();
        if SystemTime.format_time(&mut Writer::new(&mut ts)).is_ok() {
            obj.insert("timestamp".into(), Value::from(ts));
        }
        let meta = event.metadata();
        obj.insert("level".into(), Value::from(meta.level().as_str()));
        let mut fields = Map::new();
        event.record(&mut FieldsToJson(&mut fields));
        for (k, v) in fields {
            // Event fields never overwrite the envelope keys.
            obj.entry(k).or_insert(v);
        }
        obj.insert("target".into(), Value::from(meta.target()));
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope.from_root().map(|s| span_object::<S, N>(&s)).collect();
            if let Some(current) = spans.last() {
                obj.insert("span".into(), current.clone());
            }
            obj.insert("spans".into(), Value::Array(spans));
        }
        if let Some((trace_id, span_id)) = current_trace_ids() {
            obj.insert("trace_id".into(), Value::from(trace_id));
            obj.insert("span_id".into(), Value::from(span_id));
        }
        let line = serde_json::to_string(&Value::Object(obj)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}
