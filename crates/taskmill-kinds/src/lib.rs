//! taskmill's built-in job kinds, so a fresh worker is useful and testable.
//! The `taskmill` binary serves them, the bench runs its scenarios on them,
//! and a custom worker binary can add them beside its own with [`register`].
//!
//! Layout: this one file; [`register`] adds the kinds to a `WorkerBuilder`,
//! [`run_cpu_child_if_requested`] serves them in a CPU worker process (call
//! it first thing in `main`), [`hash_chain`] and [`count_primes`] are the CPU
//! kinds' work.
//!
//!
//! | kind | payload | does |
//! | --- | --- | --- |
//! | `noop` | any JSON | nothing; for throughput tests |
//! | `io.sleep` | `{"ms": N}` | waits N ms without blocking the runtime |
//! | `io.http_get` | `{"url": "http://...", "timeout_ms": N}` | GETs the URL; result `{"status", "bytes"}` |
//! | `cpu.hash` | `{"rounds": N}` | SHA-256 chain of N rounds in a CPU worker process (sequential work of known cost) |
//! | `cpu.primes` | `{"limit": N}` | counts primes below N with rayon, in a CPU worker process |
//!
//! Diagnostic kinds, registered only when `diagnostic_kinds` is on:
//!
//! | kind | payload | does |
//! | --- | --- | --- |
//! | `test.fail` | `{"times": N, "permanent": false}` | fails attempts 1..=N (retryable unless `permanent`) |
//! | `test.effect` | `{"name": "...", "transactional": false}` | appends `name` + newline to `$TASKMILL_EFFECTS_FILE` (O_APPEND), or with `transactional` inserts `name` into `test_effects(name text)` inside the completion transaction |
//! | `test.cpu_fail` | `{"times": N, "permanent": false}` | like `test.fail`, in a CPU worker process |
//! | `test.crash` | `{}` | the CPU worker process aborts |
//! | `test.panic` | `{}` | the CPU handler panics |
//! | `test.spin` | `{"ms": N}` | busy CPU loop of N ms in a CPU worker process |
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
use taskmill_store::Backend;
use taskmill_worker::{CompletionTx, CpuHandlerError, CpuJobInput, JobContext, WorkerBuilder};

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

/// Registers the built-in kinds on `builder`, and the diagnostic kinds when
/// `diagnostic` is set.
pub fn register(builder: WorkerBuilder, diagnostic: bool) -> WorkerBuilder {
    let builder = register_standard(builder);
    if diagnostic {
        register_diagnostic(builder)
    } else {
        builder
    }
}

/// In a CPU child process, serves every CPU kind (the parent only sends the
/// kinds it registered) and exits; otherwise returns.
pub fn run_cpu_child_if_requested() {
    if taskmill_cpu::is_child_mode() {
        let _ = register(
            WorkerBuilder::new(taskmill_core::config::Config::default()),
            true,
        )
        .run_child_if_requested();
    }
}

fn register_standard(builder: WorkerBuilder) -> WorkerBuilder {
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
        .cpu("cpu.hash", |_input: &CpuJobInput<'_>, p: Hash| {
            Ok(hash_chain(p.rounds))
        })
        .cpu("cpu.primes", |_input: &CpuJobInput<'_>, p: Primes| {
            Ok(serde_json::json!({ "limit": p.limit, "count": count_primes(p.limit) }))
        })
}

fn register_diagnostic(builder: WorkerBuilder) -> WorkerBuilder {
    builder
        .io("test.fail", |ctx: JobContext, p: Fail| async move {
            if ctx.attempt <= p.times {
                let msg = format!("test.fail: failing attempt {} of {}", ctx.attempt, p.times);
                return Err(if p.permanent {
                    JobError::permanent(msg)
                } else {
                    JobError::retryable(msg)
                });
            }
            Ok(serde_json::json!({ "succeeded_on_attempt": ctx.attempt }))
        })
        .io_transactional(
            "test.effect",
            |_ctx: JobContext, p: Effect, mut tx: CompletionTx| async move {
                if p.transactional {
                    let insert = match tx.backend() {
                        Backend::Postgres => "INSERT INTO test_effects (name) VALUES ($1)",
                        Backend::Sqlite => "INSERT INTO test_effects (name) VALUES (?)",
                    };
                    let store_err = |e: taskmill_store::StoreError| {
                        JobError::retryable(format!("test.effect: {e}"))
                    };
                    if tx.backend() == Backend::Postgres {
                        // Concurrent first CREATE TABLE IF NOT EXISTS race on
                        // PostgreSQL's catalog; serialise them.
                        tx.execute(
                            "SELECT pg_advisory_xact_lock(hashtext('test_effects'))",
                            &[],
                        )
                        .await
                        .map_err(store_err)?;
                    }
                    tx.execute("CREATE TABLE IF NOT EXISTS test_effects (name text)", &[])
                        .await
                        .map_err(store_err)?;
                    tx.execute(insert, &[&p.name]).await.map_err(store_err)?;
                } else {
                    append_effect(&p.name)?;
                }
                Ok((serde_json::json!({ "name": p.name }), tx))
            },
        )
        .cpu(
            "test.crash",
            |_input: &CpuJobInput<'_>, _p: serde::de::IgnoredAny| -> Result<(), CpuHandlerError> {
                std::process::abort()
            },
        )
        .cpu("test.cpu_fail", |input: &CpuJobInput<'_>, p: Fail| {
            if input.attempt <= p.times {
                let msg = format!(
                    "test.cpu_fail: failing attempt {} of {}",
                    input.attempt, p.times
                );
                return Err(if p.permanent {
                    CpuHandlerError::permanent(msg)
                } else {
                    CpuHandlerError::retryable(msg)
                });
            }
            Ok(serde_json::json!({ "succeeded_on_attempt": input.attempt }))
        })
        .cpu(
            "test.panic",
            |_input: &CpuJobInput<'_>, _p: serde::de::IgnoredAny| -> Result<(), CpuHandlerError> {
                panic!("test.panic: panicking on purpose")
            },
        )
        .cpu("test.spin", |_input: &CpuJobInput<'_>, p: Sleep| {
            let until = std::time::Instant::now() + Duration::from_millis(p.ms);
            let mut spins = 0u64;
            while std::time::Instant::now() < until {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
            Ok(serde_json::json!({ "spins": spins }))
        })
}

/// Payload of `cpu.hash`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hash {
    /// SHA-256 rounds.
    pub rounds: u64,
}

/// Payload of `cpu.primes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Primes {
    /// Count primes below this.
    pub limit: u64,
}

/// Payload of `test.fail`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fail {
    /// Attempts that fail.
    pub times: u32,
    /// Fail with a permanent error instead of a retryable one.
    #[serde(default)]
    pub permanent: bool,
}

/// Payload of `test.effect`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Effect {
    /// The line (or row) to write.
    pub name: String,
    /// Write the row inside the completion transaction.
    #[serde(default)]
    pub transactional: bool,
}

/// SHA-256 applied `rounds` times, starting from 32 zero bytes.
pub fn hash_chain(rounds: u64) -> serde_json::Value {
    use sha2::{Digest, Sha256};
    let mut d = [0u8; 32];
    for _ in 0..rounds {
        d = Sha256::digest(d).into();
    }
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({ "rounds": rounds, "digest": hex })
}

/// Primes below `limit`, counted in parallel with rayon.
pub fn count_primes(limit: u64) -> u64 {
    use rayon::prelude::*;
    if limit < 3 {
        return 0;
    }
    (2..limit).into_par_iter().filter(|n| is_prime(*n)).count() as u64
}

fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

fn append_effect(name: &str) -> Result<(), JobError> {
    use std::io::Write;
    let path = std::env::var_os("TASKMILL_EFFECTS_FILE")
        .ok_or_else(|| JobError::permanent("test.effect needs TASKMILL_EFFECTS_FILE"))?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| {
            JobError::retryable(format!("test.effect: open {}: {e}", path.to_string_lossy()))
        })?;
    // One write of the whole line with O_APPEND: lines of concurrent workers
    // never interleave.
    f.write_all(format!("{name}\n").as_bytes())
        .map_err(|e| JobError::retryable(format!("test.effect: write: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes_and_hashes() {
        assert_eq!(count_primes(100), 25);
        assert_eq!(count_primes(2), 0);
        assert_eq!(hash_chain(0)["digest"], "0".repeat(64));
        assert_ne!(hash_chain(1)["digest"], hash_chain(2)["digest"]);
    }
}
