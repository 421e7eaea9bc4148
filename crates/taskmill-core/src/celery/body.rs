//! The body of a Celery protocol v2 task message: `[args, kwargs, embed]`,
//! turned into the payload a handler reads, with canvas refused.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::wire::{DeadReason, DecodeError};

/// The canvas part of a v2 body; any of it set means a workflow taskmill does
/// not run.
#[derive(Debug, Default, Deserialize)]
struct Embed {
    #[serde(default)]
    callbacks: Option<serde_json::Value>,
    #[serde(default)]
    errbacks: Option<serde_json::Value>,
    #[serde(default)]
    chain: Option<serde_json::Value>,
    #[serde(default)]
    chord: Option<serde_json::Value>,
}

/// Whether the body is a Celery protocol v1 message (`task` and `id` in the
/// body), to name it in the refusal.
pub(super) fn looks_like_v1(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct V1 {
        #[allow(dead_code)]
        task: String,
        #[allow(dead_code)]
        id: String,
    }
    serde_json::from_slice::<V1>(body).is_ok()
}

/// `[args, kwargs, embed]` -> `{"args": args, "kwargs": kwargs}`, keeping the
/// argument JSON byte for byte.
pub(super) fn call_payload(body: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let parts: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => shape("it is not a JSON array"),
        _ => DecodeError::new(
            DeadReason::InvalidJson,
            format!("Celery body is not JSON: {e}"),
        ),
    })?;
    if !(2..=3).contains(&parts.len()) {
        return Err(shape(&format!("it has {} elements", parts.len())));
    }
    let (args, kwargs) = (parts[0].get(), parts[1].get());
    if !args.starts_with('[') {
        return Err(shape("args is not a list"));
    }
    if !kwargs.starts_with('{') {
        return Err(shape("kwargs is not a mapping"));
    }
    if let Some(embed) = parts.get(2) {
        let embed: Option<Embed> = serde_json::from_str(embed.get())
            .map_err(|e| shape(&format!("embed is not a mapping: {e}")))?;
        let embed = embed.unwrap_or_default();
        let used = |v: &Option<serde_json::Value>| match v {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        let canvas: Vec<&str> = [
            ("callbacks", &embed.callbacks),
            ("errbacks", &embed.errbacks),
            ("chain", &embed.chain),
            ("chord", &embed.chord),
        ]
        .into_iter()
        .filter(|(_, v)| used(v))
        .map(|(k, _)| k)
        .collect();
        if !canvas.is_empty() {
            return Err(DecodeError::new(
                DeadReason::UnsupportedProtocol,
                format!(
                    "Celery canvas is not supported (the message has {}): send the task alone",
                    canvas.join(", ")
                ),
            ));
        }
    }
    let mut out = Vec::with_capacity(args.len() + kwargs.len() + 20);
    out.extend_from_slice(b"{\"args\":");
    out.extend_from_slice(args.as_bytes());
    out.extend_from_slice(b",\"kwargs\":");
    out.extend_from_slice(kwargs.as_bytes());
    out.push(b'}');
    Ok(out)
}

fn shape(what: &str) -> DecodeError {
    DecodeError::new(
        DeadReason::InvalidPayload,
        format!("Celery body must be [args, kwargs, embed]: {what}"),
    )
}
