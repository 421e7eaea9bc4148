//! Child-side handler registry: job kind name -> plain blocking function.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Kinds starting with this prefix are reserved for the pool's own use
/// (for example [`crate::NOOP_KIND`]).
pub const RESERVED_KIND_PREFIX: &str = "__taskmill";

/// What a CPU handler gets to see of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInput<'a> {
    /// Job id (for logs and tracing).
    pub job_id: String,
    /// Job kind (the registry key that selected this handler).
    pub kind: String,
    /// Delivery attempt, starting at 1.
    pub attempt: u32,
    /// W3C `traceparent` of the parent span, to continue the trace in the child.
    pub traceparent: Option<String>,
    /// The job's payload exactly as the producer sent it (normally JSON).
    pub payload: &'a [u8],
}

impl JobInput<'_> {
    /// Parses the payload as JSON; a failure is a [`HandlerError::Permanent`]
    /// because retrying the same bytes cannot succeed.
    pub fn payload_json<P: DeserializeOwned>(&self) -> Result<P, HandlerError> {
        serde_json::from_slice(self.payload).map_err(|e| HandlerError::Permanent {
            message: format!("invalid payload for kind {}: {e}", self.kind),
        })
    }
}

/// An error returned by a CPU handler. It crosses the process boundary as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HandlerError {
    /// Worth retrying later (for example a transient resource shortage).
    #[error("retryable error: {message}")]
    Retryable {
        /// Human-readable reason.
        message: String,
        /// Optional hint for the retry delay, overriding the backoff policy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// Will never succeed for this input; dead-letter it.
    #[error("permanent error: {message}")]
    Permanent {
        /// Human-readable reason.
        message: String,
    },
}

impl HandlerError {
    /// A retryable error without a retry hint.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable {
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
        }
    }

    /// Whether a retry may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }

    /// The human-readable reason.
    pub fn message(&self) -> &str {
        match self {
            Self::Retryable { message, .. } | Self::Permanent { message } => message,
        }
    }
}

/// A registered CPU handler: runs on the child's main thread, blocking, and
/// returns the JSON-encoded result.
pub type CpuHandler = Arc<dyn Fn(&JobInput<'_>) -> Result<Vec<u8>, HandlerError> + Send + Sync>;

/// Maps job kind names to CPU handlers.
///
/// Build the same registry in the parent (to know which kinds are CPU kinds)
/// and in the child (to run them): the child re-enters the same code path, so
/// a kind is found by the same name on both sides.
#[derive(Clone, Default)]
pub struct CpuRegistry {
    handlers: HashMap<String, CpuHandler>,
}

impl fmt::Debug for CpuRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kinds: Vec<&str> = self.kinds().collect();
        kinds.sort_unstable();
        f.debug_struct("CpuRegistry")
            .field("kinds", &kinds)
            .finish()
    }
}

impl CpuRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an already shared handler.
    ///
    /// # Panics
    /// If `kind` is already registered or uses the reserved `__taskmill`
    /// prefix: both are programming errors that must fail at start-up, not
    /// silently route jobs to the wrong function.
    pub fn register_handler(&mut self, kind: impl Into<String>, handler: CpuHandler) -> &mut Self {
        let kind = kind.into();
        assert!(
            !kind.starts_with(RESERVED_KIND_PREFIX),
            "CPU job kind {kind:?} uses the reserved prefix {RESERVED_KIND_PREFIX:?}"
        );
        let previous = self.handlers.insert(kind.clone(), handler);
        assert!(
            previous.is_none(),
            "CPU job kind {kind:?} is registered twice"
        );
        self
    }

    /// Registers a handler working on raw bytes (payload in, JSON result out).
    ///
    /// # Panics
    /// Like [`register_handler`](Self::register_handler).
    pub fn register_fn<F>(&mut self, kind: impl Into<String>, f: F) -> &mut Self
    where
        F: Fn(&JobInput<'_>) -> Result<Vec<u8>, HandlerError> + Send + Sync + 'static,
    {
        self.register_handler(kind, Arc::new(f))
    }

    /// Registers a typed handler: the payload is parsed as `P` (a parse
    /// failure is `Permanent("invalid payload for kind X: ...")`) and the
    /// returned `R` is serialised as the JSON result.
    ///
    /// # Panics
    /// Like [`register_handler`](Self::register_handler).
    pub fn register_json<P, R, F>(&mut self, kind: impl Into<String>, f: F) -> &mut Self
    where
        P: DeserializeOwned,
        R: Serialize,
        F: Fn(&JobInput<'_>, P) -> Result<R, HandlerError> + Send + Sync + 'static,
    {
        self.register_fn(kind, move |input: &JobInput<'_>| {
            let payload: P = input.payload_json()?;
            let result = f(input, payload)?;
            serde_json::to_vec(&result).map_err(|e| HandlerError::Permanent {
                message: format!("cannot serialise the result for kind {}: {e}", input.kind),
            })
        })
    }

    /// The handler for `kind`, if registered.
    pub fn get(&self, kind: &str) -> Option<&CpuHandler> {
        self.handlers.get(kind)
    }

    /// Whether `kind` is registered.
    pub fn contains(&self, kind: &str) -> bool {
        self.handlers.contains_key(kind)
    }

    /// Registered kind names, in no particular order.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }

    /// Number of registered kinds.
    pub fn len(&self) -> usize {
        self.handlers.len()
    }

    /// Whether no kind is registered.
    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }

    /// Runs the handler for `input.kind` on the current thread. An unknown
    /// kind is a permanent error (the child and parent disagree on the
    /// registry; retrying on the same build cannot help).
    pub fn call(&self, input: &JobInput<'_>) -> Result<Vec<u8>, HandlerError> {
        match self.handlers.get(&input.kind) {
            Some(handler) => handler(input),
            None => Err(HandlerError::Permanent {
                message: format!("unknown CPU job kind {:?} in worker process", input.kind),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(kind: &str, payload: &'a [u8]) -> JobInput<'a> {
        JobInput {
            job_id: "j".into(),
            kind: kind.into(),
            attempt: 1,
            traceparent: None,
            payload,
        }
    }

    #[derive(Deserialize)]
    struct Add {
        a: i64,
        b: i64,
    }

    #[test]
    fn typed_handlers_parse_payload_and_encode_result() {
        let mut reg = CpuRegistry::new();
        reg.register_json("add", |_, p: Add| Ok(p.a + p.b));
        assert_eq!(reg.call(&input("add", br#"{"a":2,"b":3}"#)).unwrap(), b"5");
        let err = reg.call(&input("add", b"nope")).unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.message().starts_with("invalid payload for kind add: "),
            "{err}"
        );
    }

    #[test]
    fn unknown_kind_is_permanent() {
        let reg = CpuRegistry::new();
        let err = reg.call(&input("nope", b"{}")).unwrap_err();
        assert!(matches!(err, HandlerError::Permanent { .. }));
        assert!(err.message().contains("unknown CPU job kind \"nope\""));
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn duplicate_kinds_panic() {
        let mut reg = CpuRegistry::new();
        reg.register_fn("x", |_| Ok(Vec::new()));
        reg.register_fn("x", |_| Ok(Vec::new()));
    }

    #[test]
    #[should_panic(expected = "reserved prefix")]
    fn reserved_prefix_panics() {
        CpuRegistry::new().register_fn("__taskmill.x", |_| Ok(Vec::new()));
    }

    #[test]
    fn handler_error_json_shape() {
        let e = HandlerError::Retryable {
            message: "m".into(),
            retry_after_ms: Some(7),
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"type":"retryable","message":"m","retry_after_ms":7}"#
        );
        assert_eq!(serde_json::from_str::<HandlerError>(&json).unwrap(), e);
        let p: HandlerError =
            serde_json::from_str(r#"{"type":"permanent","message":"x"}"#).unwrap();
        assert_eq!(p, HandlerError::permanent("x"));
    }
}
