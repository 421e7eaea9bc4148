//! W3C trace context (`traceparent`, `tracestate`) in and out of `tracing`
//! spans, independent of any transport: the same strings travel in AMQP
//! headers (producer -> worker) and in the CPU frame header (worker -> child).
//!
//! Every function works without an OpenTelemetry layer installed: reading
//! gives `None`, setting a parent does nothing.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The OpenTelemetry context a `traceparent` (and optional `tracestate`)
/// describe: a remote span context to parent spans on. A missing or invalid
/// `traceparent` gives an empty context (no span).
pub fn context_from_traceparent(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let Some(tp) = traceparent.map(str::trim).filter(|t| !t.is_empty()) else {
        return Context::new();
    };
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert(TRACEPARENT.to_string(), tp.to_string());
    if let Some(ts) = tracestate.map(str::trim).filter(|t| !t.is_empty()) {
        carrier.insert(TRACESTATE.to_string(), ts.to_string());
    }
    TraceContextPropagator::new().extract_with_context(&Context::new(), &carrier)
}

/// Makes `span` a child of the remote span `traceparent` names. Call it
/// before the span is first entered (the helpers in [`super::spans`] do).
/// Returns whether the parent was set: `false` when `traceparent` is missing
/// or invalid (the span keeps its local parent, or starts a new trace), when
/// no OpenTelemetry layer is installed, when the span is disabled, or when it
/// was already entered.
pub fn set_parent(
    span: &tracing::Span,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> bool {
    let cx = context_from_traceparent(traceparent, tracestate);
    if !cx.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

/// The `traceparent` and `tracestate` (`None` when empty) of `span`, to send
/// along with work done on its behalf. `None` without an OpenTelemetry layer
/// or for a disabled span.
///
/// This starts the span's OpenTelemetry side: its parent cannot be changed
/// afterwards, so call [`set_parent`] first.
pub fn traceparent_of(span: &tracing::Span) -> Option<(String, Option<String>)> {
    if span.is_disabled() {
        return None;
    }
    inject(&span.context())
}

/// The `traceparent` and `tracestate` of the current `tracing` span: what a
/// producer puts in the message headers and what the worker passes to a CPU
/// child in the frame header. `None` when there is no current span or no
/// OpenTelemetry layer.
pub fn current_traceparent() -> Option<(String, Option<String>)> {
    traceparent_of(&tracing::Span::current())
}

fn inject(cx: &Context) -> Option<(String, Option<String>)> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    let tp = carrier.remove(TRACEPARENT)?;
    let ts = carrier.remove(TRACESTATE).filter(|s| !s.is_empty());
    Some((tp, ts))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn parses_a_valid_traceparent() {
        let cx = context_from_traceparent(Some(TP), Some("k=v"));
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert_eq!(sc.trace_state().header(), "k=v");
        assert_eq!(inject(&cx), Some((TP.to_string(), Some("k=v".to_string()))));
    }

    #[test]
    fn invalid_or_missing_gives_an_empty_context() {
        for tp in [
            None,
            Some(""),
            Some("garbage"),
            Some("00-00000000000000000000000000000000-b7ad6b7169203331-01"),
        ] {
            let cx = context_from_traceparent(tp, None);
            assert!(!cx.span().span_context().is_valid(), "{tp:?}");
            assert_eq!(inject(&cx), None);
        }
    }

    #[test]
    fn without_a_layer_everything_is_a_no_op() {
        // No subscriber at all in this thread.
        let span = tracing::info_span!("x");
        assert!(!set_parent(&span, Some(TP), None));
        assert_eq!(traceparent_of(&span), None);
        let _g = span.enter();
        assert_eq!(current_traceparent(), None);
        // A subscriber without the OpenTelemetry layer.
        let _d = tracing::subscriber::set_default(tracing_subscriber::registry());
        let span = tracing::info_span!("y");
        assert!(!set_parent(&span, Some(TP), None));
        let _g = span.enter();
        assert_eq!(current_traceparent(), None);
    }
}
