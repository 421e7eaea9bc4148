//! Built-in job kinds, so a fresh worker is useful and testable:
//!
//! | kind | payload | does |
//! | --- | --- | --- |
//! | `noop` | any JSON | nothing; for throughput tests |
//! | `io.sleep` | `{"ms": N}` | waits N ms without blocking the runtime |
//! | `io.http_get` | `{"url": "http://...", "timeout_ms": N}` | GETs the URL; result `{"status", "bytes"}` |
//!
//! `io.http_get` speaks plain HTTP/1.1 (no TLS in this build): an `https://`
//! URL is a permanent error that says so. 5xx answers and connection errors
//! are retryable, 4xx answers permanent.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use taskmill_core::JobError;
use taskmill_worker::{JobContext, WorkerBuilder};

/// Payload of `io.sleep`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sleep {
    /// Milliseconds to wait.
    pub ms: u64,
}

/// Payload of `io.http_get`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpGet {
    /// An `http://` URL.
    pub url: String,
    /// Timeout of the whole request, default 10 000 ms (the kind's hard
    /// timeout still applies).
    #[serde(default = "default_http_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_http_timeout_ms() -> u64 {
    10_000
}

/// Result of `io.http_get`.
#[derive(Debug, Serialize)]
pub struct HttpGetResult {
    /// HTTP status code.
    pub status: u16,
    /// Length of the body in bytes.
    pub bytes: usize,
}

/// Registers the built-in kinds on `builder`.
pub fn register(builder: WorkerBuilder) -> WorkerBuilder {
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    builder
        .io("noop", |_ctx, _p: serde::de::IgnoredAny| async { Ok(()) })
        .io("io.sleep", |_ctx, p: Sleep| async move {
            tokio::time::sleep(Duration::from_millis(p.ms)).await;
            Ok(())
        })
        .io("io.http_get", move |ctx: JobContext, p: HttpGet| {
            let client = client.clone();
            async move { http_get(&client, &ctx, p).await }
        })
}

async fn http_get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<bytes::Bytes>>,
    ctx: &JobContext,
    p: HttpGet,
) -> Result<HttpGetResult, JobError> {
    let uri: hyper::Uri = p
        .url
        .parse()
        .map_err(|e| JobError::permanent(format!("invalid url {:?}: {e}", p.url)))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(JobError::permanent(
                "https is not supported by the built-in io.http_get (this build has no TLS)",
            ));
        }
        _ => {
            return Err(JobError::permanent(format!(
                "url {:?} is not http://",
                p.url
            )));
        }
    }
    let limit = Duration::from_millis(p.timeout_ms).min(ctx.remaining());
    let fetch = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| JobError::retryable(format!("GET {}: {e}", p.url)))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| JobError::retryable(format!("reading body of {}: {e}", p.url)))?
            .to_bytes();
        Ok::<_, JobError>((status, body.len()))
    };
    let (status, bytes) = tokio::time::timeout(limit, fetch)
        .await
        .map_err(|_| JobError::retryable(format!("GET {} timed out after {limit:?}", p.url)))??;
    if status.is_server_error() {
        return Err(JobError::retryable(format!(
            "GET {} answered {status}",
            p.url
        )));
    }
    if status.is_client_error() {
        return Err(JobError::permanent(format!(
            "GET {} answered {status}",
            p.url
        )));
    }
    Ok(HttpGetResult {
        status: status.as_u16(),
        bytes,
    })
}
