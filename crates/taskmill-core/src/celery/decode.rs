//! Decoding a Celery protocol v2 task message.

use std::time::Duration;

use super::body::{call_payload, looks_like_v1};
use super::datetime::{MAX_TIME_LEN, parse_iso8601};
use super::*;
use crate::wire::{
    CONTENT_TYPE, DeadReason, DecodeError, Envelope, H_FIRST_FAILED_AT_MS, H_REPLAY, H_TRACEPARENT,
    H_TRACESTATE, HeaderValue, MAX_KIND_LEN, check_id, int_header, is_json_content_type,
    str_header, too_large, trace_context,
};

fn is_void(v: &HeaderValue) -> bool {
    matches!(v, HeaderValue::Other("void"))
}

/// A scalar header with Python's `None` treated as absent.
fn present(headers: &impl HeaderSource, name: &str) -> Option<HeaderValue> {
    headers.scalar(name).filter(|v| !is_void(v))
}

fn opt_str(headers: &impl HeaderSource, name: &str) -> Result<Option<String>, DecodeError> {
    present(headers, name)
        .map(|v| str_header(name, v))
        .transpose()
        .map(|s| s.filter(|s| !s.is_empty()))
}

fn serializer_name(content_type: &str) -> &str {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    match essence.to_ascii_lowercase().as_str() {
        "application/x-python-serialize" => "pickle",
        "application/x-yaml" | "application/yaml" => "yaml",
        "application/x-msgpack" | "application/msgpack" => "msgpack",
        "application/data" => "raw bytes",
        _ => essence,
    }
}

/// The task id of a Celery message: the `id` header, else `correlation_id`.
fn task_id(
    props: &CeleryProperties<'_>,
    headers: &impl HeaderSource,
) -> Result<Option<String>, DecodeError> {
    Ok(opt_str(headers, H_ID)?.or_else(|| {
        props
            .correlation_id
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }))
}

/// Where a result goes, if the client asked for one.
fn reply_to(
    props: &CeleryProperties<'_>,
    headers: &impl HeaderSource,
    task_id: &str,
) -> Result<Option<ReplyTo>, DecodeError> {
    let ignore = match present(headers, H_IGNORE_RESULT) {
        None => false,
        Some(HeaderValue::Bool(b)) => b,
        Some(HeaderValue::Int(n)) => n != 0,
        Some(other) => {
            return Err(DecodeError::new(
                DeadReason::BadHeader,
                format!("header {H_IGNORE_RESULT} must be a boolean, got {other:?}"),
            ));
        }
    };
    let Some(queue) = props.reply_to.filter(|q| !q.is_empty()) else {
        return Ok(None);
    };
    if ignore {
        return Ok(None);
    }
    Ok(Some(ReplyTo {
        task_id: task_id.to_string(),
        queue: queue.to_string(),
        group_id: opt_str(headers, H_GROUP)?,
        parent_id: opt_str(headers, H_PARENT_ID)?,
    }))
}

/// For a message refused at decode: where to report the refusal, when the
/// message says enough to know (a task id and a `reply_to`). Lenient: any
/// header that does not parse just means "no reply".
pub fn reply_hint(props: CeleryProperties<'_>, headers: &impl HeaderSource) -> Option<ReplyTo> {
    let id = task_id(&props, headers).ok()??;
    reply_to(&props, headers, &id).ok()?
}

fn time_header(headers: &impl HeaderSource, name: &str) -> Result<Option<u64>, DecodeError> {
    let Some(s) = opt_str(headers, name)? else {
        return Ok(None);
    };
    if s.len() > MAX_TIME_LEN {
        // Not quoted back: the detail goes into the dead letter's headers.
        return Err(DecodeError::new(
            DeadReason::BadHeader,
            format!(
                "header {name} is {} bytes; an ISO 8601 time is at most {MAX_TIME_LEN}",
                s.len()
            ),
        ));
    }
    parse_iso8601(&s).map(Some).ok_or_else(|| {
        DecodeError::new(
            DeadReason::BadHeader,
            format!("header {name} is not an ISO 8601 date and time: {s:?}"),
        )
    })
}

/// The hard limit of `timelimit` (`[hard, soft]`, seconds, each may be null).
/// The soft limit has no equivalent (a taskmill handler gets no in-job
/// signal), so only the hard one is used.
fn hard_time_limit(headers: &impl HeaderSource) -> Result<Option<Duration>, DecodeError> {
    let bad = |what: String| {
        DecodeError::new(
            DeadReason::BadHeader,
            format!("header {H_TIMELIMIT} must be [hard, soft] in seconds: {what}"),
        )
    };
    let items = match headers.list(H_TIMELIMIT) {
        Some(items) => items,
        None => match present(headers, H_TIMELIMIT) {
            None => return Ok(None),
            Some(other) => return Err(bad(format!("got {other:?}"))),
        },
    };
    let Some(hard) = items.first() else {
        return Ok(None);
    };
    let secs = match hard {
        HeaderValue::Int(n) => *n as f64,
        HeaderValue::Float(f) => *f,
        v if is_void(v) => return Ok(None),
        other => return Err(bad(format!("hard limit is {other:?}"))),
    };
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(bad(format!("hard limit {secs} is not a positive number")));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

/// Decodes a Celery protocol v2 task message consumed from `queue`.
///
/// The body is read, not taken: a Celery message keeps its bytes, so its
/// dead-letter and retry copies stay Celery messages. Checks run in this
/// order: body size; the `task` header (protocol v2); the task name; the task
/// id; `content_type`, `content_encoding` and `compression` (JSON only);
/// `retries`, `eta`, `expires`, `timelimit`, `ignore_result`; the body's
/// shape; no canvas.
pub fn decode(
    queue: &str,
    props: CeleryProperties<'_>,
    headers: &impl HeaderSource,
    body: &[u8],
    max_payload_bytes: usize,
) -> Result<(Envelope, CeleryTask), DecodeError> {
    if body.len() > max_payload_bytes {
        return Err(too_large(body.len(), max_payload_bytes));
    }
    let name = match present(headers, H_TASK) {
        Some(v) => str_header(H_TASK, v)?,
        None => {
            let detail = if headers.scalar(crate::wire::H_KIND).is_some() {
                "a taskmill protocol message on a Celery queue: publish taskmill jobs to a taskmill queue".to_string()
            } else if looks_like_v1(body) {
                "Celery protocol v1 (task and id in the body) is not supported: use task_protocol = 2, Celery's default since 4.0".to_string()
            } else {
                format!("header {H_TASK} is missing: not a Celery protocol v2 task message")
            };
            return Err(DecodeError::new(DeadReason::UnsupportedProtocol, detail));
        }
    };
    if name.is_empty() || name.len() > MAX_KIND_LEN {
        return Err(DecodeError::new(
            DeadReason::BadHeader,
            format!("header {H_TASK} (the task name) must be 1 to {MAX_KIND_LEN} bytes"),
        ));
    }
    let Some(id) = task_id(&props, headers)? else {
        return Err(DecodeError::new(
            DeadReason::MissingHeader,
            format!("header {H_ID} and property correlation_id (the task id) are missing"),
        ));
    };
    check_id(&format!("header {H_ID} (the task id)"), &id)?;
    match props.content_type {
        Some(ct) if is_json_content_type(ct) => {}
        Some(ct) => {
            return Err(DecodeError::new(
                DeadReason::UnsupportedSerializer,
                format!(
                    "content_type {ct:?} ({}) is refused: taskmill only decodes JSON; set task_serializer = \"json\"",
                    serializer_name(ct)
                ),
            ));
        }
        None => {
            return Err(DecodeError::new(
                DeadReason::MissingHeader,
                format!("property content_type is missing; expected {CONTENT_TYPE:?}"),
            ));
        }
    }
    if let Some(enc) = props.content_encoding
        && !(enc.is_empty()
            || enc.eq_ignore_ascii_case("utf-8")
            || enc.eq_ignore_ascii_case("utf8"))
    {
        return Err(DecodeError::new(
            DeadReason::UnsupportedSerializer,
            format!("content_encoding {enc:?} is refused: JSON bodies must be utf-8"),
        ));
    }
    if let Some(c) = opt_str(headers, H_COMPRESSION)? {
        return Err(DecodeError::new(
            DeadReason::UnsupportedSerializer,
            format!("compressed body ({c}) is refused: unset task_compression"),
        ));
    }
    let retries = match present(headers, H_RETRIES) {
        None => 0,
        Some(v) => {
            let n = int_header(H_RETRIES, v)?;
            u32::try_from(n)
                .ok()
                .filter(|n| *n < u32::MAX)
                .ok_or_else(|| {
                    DecodeError::new(
                        DeadReason::BadHeader,
                        format!("header {H_RETRIES} must be an integer >= 0, got {n}"),
                    )
                })?
        }
    };
    let eta_us = time_header(headers, H_ETA)?;
    let expires_us = time_header(headers, H_EXPIRES)?;
    let timeout = hard_time_limit(headers)?;
    let reply = reply_to(&props, headers, &id)?;
    let payload = call_payload(body)?;

    let (traceparent, tracestate) = trace_context(present(headers, H_TRACEPARENT), || {
        present(headers, H_TRACESTATE)
    });
    let first_failed_at_ms = match present(headers, H_FIRST_FAILED_AT_MS) {
        None => None,
        Some(v) => u64::try_from(int_header(H_FIRST_FAILED_AT_MS, v)?).ok(),
    };
    let env = Envelope {
        job_id: id.clone(),
        kind: name.clone(),
        queue: queue.to_string(),
        attempt: retries + 1,
        idempotency_key: Some(id),
        timeout,
        // Queue wait counts from the eta when there is one: it was not due before.
        enqueued_at_us: eta_us.or(props.timestamp.map(|s| s.saturating_mul(1_000_000))),
        traceparent,
        tracestate,
        first_failed_at_ms,
        replay: headers.scalar(H_REPLAY).is_some(),
        payload,
    };
    let task = CeleryTask {
        name,
        reply,
        retries,
        eta_us,
        expires_us,
    };
    Ok((env, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default, Clone)]
    struct Table {
        scalars: HashMap<&'static str, HeaderValue>,
        lists: HashMap<&'static str, Vec<HeaderValue>>,
    }

    impl HeaderSource for Table {
        fn scalar(&self, name: &str) -> Option<HeaderValue> {
            if self.lists.contains_key(name) {
                return Some(HeaderValue::Other("array"));
            }
            self.scalars.get(name).cloned()
        }
        fn list(&self, name: &str) -> Option<Vec<HeaderValue>> {
            self.lists.get(name).cloned()
        }
    }

    const VOID: HeaderValue = HeaderValue::Other("void");

    fn s(v: &str) -> HeaderValue {
        HeaderValue::Str(v.to_string())
    }

    /// Headers as Celery 5's `as_task_v2` writes them for
    /// `send_task("reports.render", args=[1, "a"], kwargs={"k": 2})`.
    fn celery_headers() -> Table {
        let mut t = Table::default();
        for (k, v) in [
            ("lang", s("py")),
            (H_TASK, s("reports.render")),
            (H_ID, s("6f1c2a8e-1111-4c8e-9c4b-4b9a8a5b0001")),
            ("shadow", VOID),
            (H_ETA, VOID),
            (H_EXPIRES, VOID),
            (H_GROUP, VOID),
            ("group_index", VOID),
            (H_RETRIES, HeaderValue::Int(0)),
            (H_ROOT_ID, s("6f1c2a8e-1111-4c8e-9c4b-4b9a8a5b0001")),
            (H_PARENT_ID, VOID),
            ("argsrepr", s("[1, 'a']")),
            ("kwargsrepr", s("{'k': 2}")),
            ("origin", s("gen1@host")),
            (H_IGNORE_RESULT, HeaderValue::Bool(false)),
            ("replaced_task_nesting", HeaderValue::Int(0)),
            ("stamped_headers", VOID),
            ("stamps", HeaderValue::Other("table")),
        ] {
            t.scalars.insert(k, v);
        }
        t.lists.insert(H_TIMELIMIT, vec![VOID, VOID]);
        t
    }

    fn props() -> CeleryProperties<'static> {
        CeleryProperties {
            correlation_id: Some("6f1c2a8e-1111-4c8e-9c4b-4b9a8a5b0001"),
            content_type: Some("application/json"),
            content_encoding: Some("utf-8"),
            reply_to: Some("a1b2c3d4-reply"),
            timestamp: None,
        }
    }

    const BODY: &[u8] =
        br#"[[1, "a"], {"k": 2}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;

    #[test]
    fn decodes_what_celery_sends() {
        let (env, task) = decode("celery", props(), &celery_headers(), BODY, 1024).unwrap();
        assert_eq!(env.kind, "reports.render");
        assert_eq!(env.job_id, "6f1c2a8e-1111-4c8e-9c4b-4b9a8a5b0001");
        assert_eq!(env.idempotency_key.as_deref(), Some(env.job_id.as_str()));
        assert_eq!(env.attempt, 1);
        assert_eq!(env.timeout, None);
        assert_eq!(env.queue, "celery");
        let call: CeleryCall = serde_json::from_slice(&env.payload).unwrap();
        assert_eq!(
            call.args,
            vec![serde_json::json!(1), serde_json::json!("a")]
        );
        assert_eq!(call.kwargs["k"], 2);
        let reply = task.reply.unwrap();
        assert_eq!(reply.queue, "a1b2c3d4-reply");
        assert_eq!(reply.task_id, env.job_id);
        assert_eq!(reply.group_id, None);
        assert_eq!(
            (task.retries, task.eta_us, task.expires_us),
            (0, None, None)
        );
    }

    #[test]
    fn retries_eta_expires_timelimit_and_trace() {
        let mut h = celery_headers();
        h.scalars.insert(H_RETRIES, HeaderValue::Int(2));
        h.scalars
            .insert(H_ETA, s("2024-05-01T12:00:02.500000+00:00"));
        h.scalars.insert(H_EXPIRES, s("2024-05-01T14:00:00+02:00"));
        h.lists.insert(
            H_TIMELIMIT,
            vec![HeaderValue::Float(1.5), HeaderValue::Int(1)],
        );
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.scalars.insert(H_TRACEPARENT, s(tp));
        h.scalars.insert(H_GROUP, s("g-1"));
        let (env, task) = decode("q", props(), &h, BODY, 1024).unwrap();
        assert_eq!(env.attempt, 3);
        assert_eq!(task.retries, 2);
        assert_eq!(env.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(env.traceparent.as_deref(), Some(tp));
        let eta = parse_iso8601("2024-05-01T12:00:02.5Z").unwrap();
        assert_eq!(task.eta_us, Some(eta));
        assert_eq!(env.enqueued_at_us, Some(eta));
        assert_eq!(task.expires_us, parse_iso8601("2024-05-01T12:00:00Z"));
        assert!(task.expired_at(eta));
        assert_eq!(task.wait_at(eta - 1_000), Some(Duration::from_millis(1)));
        assert_eq!(task.wait_at(eta), None);
        assert_eq!(task.reply.unwrap().group_id.as_deref(), Some("g-1"));
    }

    #[test]
    fn no_reply_without_reply_to_or_with_ignore_result() {
        let p = CeleryProperties {
            reply_to: Some(""),
            ..props()
        };
        assert_eq!(
            decode("q", p, &celery_headers(), BODY, 1024)
                .unwrap()
                .1
                .reply,
            None
        );
        let mut h = celery_headers();
        h.scalars.insert(H_IGNORE_RESULT, HeaderValue::Bool(true));
        assert_eq!(decode("q", props(), &h, BODY, 1024).unwrap().1.reply, None);
    }

    #[test]
    fn refusals_name_their_reason() {
        let v1 = br#"{"task": "reports.render", "id": "x", "args": [], "kwargs": {}}"#;
        let mut no_task = celery_headers();
        no_task.scalars.remove(H_TASK);
        let mut taskmill_msg = Table::default();
        taskmill_msg.scalars.insert(crate::wire::H_KIND, s("noop"));
        let mut no_id = celery_headers();
        no_id.scalars.remove(H_ID);
        let mut compressed = celery_headers();
        compressed
            .scalars
            .insert(H_COMPRESSION, s("application/x-gzip"));
        let mut bad_eta = celery_headers();
        bad_eta.scalars.insert(H_ETA, s("tomorrow"));
        let mut bad_retries = celery_headers();
        bad_retries.scalars.insert(H_RETRIES, HeaderValue::Int(-1));
        let mut bad_limit = celery_headers();
        bad_limit.lists.insert(H_TIMELIMIT, vec![s("ten"), VOID]);
        let ct = |c: &'static str| CeleryProperties {
            content_type: Some(c),
            ..props()
        };
        let chain = br#"[[], {}, {"callbacks": null, "errbacks": null, "chain": [{"task": "next"}], "chord": null}]"#;
        type Case<'a> = (Table, CeleryProperties<'a>, &'a [u8], DeadReason, &'a str);
        let cases: Vec<Case<'_>> = vec![
            (
                no_task.clone(),
                props(),
                v1,
                DeadReason::UnsupportedProtocol,
                "v1",
            ),
            (
                no_task,
                props(),
                BODY,
                DeadReason::UnsupportedProtocol,
                "task is missing",
            ),
            (
                taskmill_msg,
                props(),
                b"{}",
                DeadReason::UnsupportedProtocol,
                "taskmill",
            ),
            (
                no_id,
                CeleryProperties {
                    correlation_id: None,
                    ..props()
                },
                BODY,
                DeadReason::MissingHeader,
                "task id",
            ),
            (
                celery_headers(),
                ct("application/x-python-serialize"),
                b"\x80\x04\x95",
                DeadReason::UnsupportedSerializer,
                "pickle",
            ),
            (
                celery_headers(),
                ct("application/x-yaml"),
                b"- 1",
                DeadReason::UnsupportedSerializer,
                "yaml",
            ),
            (
                celery_headers(),
                ct("application/x-msgpack"),
                b"\x93",
                DeadReason::UnsupportedSerializer,
                "msgpack",
            ),
            (
                celery_headers(),
                CeleryProperties {
                    content_encoding: Some("binary"),
                    ..props()
                },
                BODY,
                DeadReason::UnsupportedSerializer,
                "binary",
            ),
            (
                compressed,
                props(),
                b"x",
                DeadReason::UnsupportedSerializer,
                "compressed",
            ),
            (bad_eta, props(), BODY, DeadReason::BadHeader, "eta"),
            (bad_retries, props(), BODY, DeadReason::BadHeader, "retries"),
            (bad_limit, props(), BODY, DeadReason::BadHeader, "timelimit"),
            (
                celery_headers(),
                props(),
                b"[[1], {}",
                DeadReason::InvalidJson,
                "not JSON",
            ),
            (
                celery_headers(),
                props(),
                b"{\"a\": 1}",
                DeadReason::InvalidPayload,
                "array",
            ),
            (
                celery_headers(),
                props(),
                b"[{}, {}, null]",
                DeadReason::InvalidPayload,
                "args",
            ),
            (
                celery_headers(),
                props(),
                b"[[], [], null]",
                DeadReason::InvalidPayload,
                "kwargs",
            ),
            (
                celery_headers(),
                props(),
                chain,
                DeadReason::UnsupportedProtocol,
                "chain",
            ),
            (
                celery_headers(),
                props(),
                &[b' '; 2000],
                DeadReason::PayloadTooLarge,
                "limit",
            ),
        ];
        for (i, (h, p, body, want, says)) in cases.into_iter().enumerate() {
            let err =
                decode("q", p, &h, body, 1024).expect_err(&format!("case {i} must be refused"));
            assert_eq!(err.reason, want, "case {i}: {err}");
            assert!(err.detail.contains(says), "case {i}: {err}");
        }
    }

    #[test]
    fn hostile_task_ids_and_times_are_refused() {
        let long = "t".repeat(crate::wire::MAX_ID_LEN + 1);
        for id in ["6f1c\0", "id\u{7f}", long.as_str()] {
            let mut h = celery_headers();
            h.scalars.insert(H_ID, s(id));
            let err = decode("q", props(), &h, BODY, 1024).expect_err(id);
            assert_eq!(err.reason, DeadReason::BadHeader);
            assert!(err.detail.contains("task id"), "{err}");
        }
        let mut h = celery_headers();
        h.scalars.remove(H_ID);
        let p = CeleryProperties {
            correlation_id: Some("corr\u{0}"),
            ..props()
        };
        assert_eq!(
            decode("q", p, &h, BODY, 1024).unwrap_err().reason,
            DeadReason::BadHeader
        );
        for name in [H_ETA, H_EXPIRES] {
            let mut h = celery_headers();
            let huge = format!("2024-05-01T12:00:00.{}+00:00", "0".repeat(70_000));
            h.scalars.insert(name, s(&huge));
            let err = decode("q", props(), &h, BODY, 1024).unwrap_err();
            assert_eq!(err.reason, DeadReason::BadHeader);
            assert!(
                err.detail.len() < 200,
                "the detail does not quote the value"
            );
        }
    }

    #[test]
    fn two_element_body_and_null_embed_are_accepted() {
        let (env, _) = decode(
            "q",
            props(),
            &celery_headers(),
            br#"[[], {"a": 1.50}]"#,
            1024,
        )
        .unwrap();
        // Arguments are kept byte for byte (no float reformatting).
        assert_eq!(env.payload, br#"{"args":[],"kwargs":{"a": 1.50}}"#);
        assert!(decode("q", props(), &celery_headers(), b"[[], {}, null]", 1024).is_ok());
        let empty_lists =
            br#"[[], {}, {"callbacks": [], "errbacks": [], "chain": [], "chord": null}]"#;
        assert!(decode("q", props(), &celery_headers(), empty_lists, 1024).is_ok());
    }

    #[test]
    fn reply_hint_of_a_refused_message() {
        let p = CeleryProperties {
            content_type: Some("application/x-python-serialize"),
            ..props()
        };
        let hint = reply_hint(p, &celery_headers()).unwrap();
        assert_eq!(hint.task_id, "6f1c2a8e-1111-4c8e-9c4b-4b9a8a5b0001");
        assert_eq!(hint.queue, "a1b2c3d4-reply");
        assert_eq!(
            reply_hint(p, &Table::default()).map(|r| r.task_id),
            Some("6f1c2a8e-1111-4c8e-9c4b-4b9a8a5b0001".into())
        );
        let no_reply = CeleryProperties {
            reply_to: None,
            ..p
        };
        assert_eq!(reply_hint(no_reply, &celery_headers()), None);
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = decode("q", props(), &celery_headers(), &body, 1024);
        }
    }
}
