//! W3C trace context (`traceparent`, `tracestate`) in and out of `tracing`
//! spans, independent of any transport: the same strings travel in AMQP
//! headers (producer -> worker) and in the CPU frame header (worker -> child).
//!
//! Written on the OpenTelemetry API alone (the SDK's propagator is not
//! needed to read or write two headers), so a producer that links this crate
//! pulls in no SDK or exporter.
//!
//! Every function works without an OpenTelemetry layer installed: reading
//! gives `None`, setting a parent does nothing.

use std::str::FromStr;

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C version this crate writes.
const VERSION: &str = "00";

/// Parses a `traceparent` (`00-<32 hex trace id>-<16 hex span id>-<2 hex
/// flags>`): `None` when it is malformed, has an all-zero id, or is of the
/// forbidden version `ff`. A later version is read by its first four fields,
/// as the W3C recommendation asks.
fn parse_traceparent(tp: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let mut parts = tp.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !hex(version, 2) || version == "ff" || (version == VERSION && rest.is_some()) {
        return None;
    }
    if !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
    ))
}

/// The OpenTelemetry context a `traceparent` (and optional `tracestate`)
/// describe: a remote span context to parent spans on. A missing or invalid
/// `traceparent` gives an empty context (no span); an invalid `tracestate`
/// is dropped, the parent kept.
pub fn context_from_traceparent(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let Some((trace_id, span_id, flags)) = traceparent
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .and_then(parse_traceparent)
    else {
        return Context::new();
    };
    let state = tracestate
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .and_then(|ts| TraceState::from_str(ts).ok())
        .unwrap_or_default();
    let sc = SpanContext::new(trace_id, span_id, flags, true, state);
    Context::new().with_remote_span_context(sc)
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
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    let flags = (sc.trace_flags() & TraceFlags::SAMPLED).to_u8();
    let tp = format!("{VERSION}-{}-{}-{flags:02x}", sc.trace_id(), sc.span_id());
    let ts = sc.trace_state().header();
    Some((tp, Some(ts).filter(|s| !s.is_empty())))
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
    fn reads_later_versions_and_drops_a_bad_tracestate() {
        let later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra";
        let cx = context_from_traceparent(Some(later), Some("not a valid state ,,=="));
        assert!(cx.span().span_context().is_valid());
        assert_eq!(inject(&cx), Some((TP.to_string(), None)));
        for bad in [
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
        ] {
            assert!(
                !context_from_traceparent(Some(bad), None)
                    .span()
                    .span_context()
                    .is_valid(),
                "{bad}"
            );
        }
    }

    /// What the SDK's W3C propagator writes and reads, this module writes and
    /// reads the same way.
    #[test]
    fn agrees_with_the_sdk_propagator() {
        use opentelemetry::propagation::TextMapPropagator;
        use opentelemetry_sdk::propagation::TraceContextPropagator;
        use std::collections::HashMap;
        for (tp, ts) in [
            (TP, Some("k=v,a=b")),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                None,
            ),
        ] {
            let mut carrier = HashMap::new();
            carrier.insert("traceparent".to_string(), tp.to_string());
            if let Some(ts) = ts {
                carrier.insert("tracestate".to_string(), ts.to_string());
            }
            let theirs = TraceContextPropagator::new().extract(&carrier);
            let ours = context_from_traceparent(Some(tp), ts);
            assert_eq!(ours.span().span_context(), theirs.span().span_context());
            let mut out = HashMap::new();
            TraceContextPropagator::new().inject_context(&ours, &mut out);
            assert_eq!(
                inject(&ours),
                Some((
                    out["traceparent"].clone(),
                    out.get("tracestate").cloned().filter(|s| !s.is_empty())
                ))
            );
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
