//! Core types of taskmill. This crate does no IO: it is the shared vocabulary of
//! every other crate and the one place where the wire protocol's rules live.
//!
//! Layout:
//! - [`celery`]: Celery protocol v2: decoding Celery task messages into an
//!   envelope, and the result messages of Celery's `rpc://` backend.
//! - [`wire`]: protocol v1: header names, the [`wire::Envelope`] a producer
//!   publishes and its decoding with reasons for everything a worker must refuse.
//! - [`dead_letter`]: [`dead_letter::DeadLetter`], the headers a dead-letter
//!   copy carries (reason, detail, queue, worker, times, attempts), written by
//!   the worker and read by the DLQ tools through the same codec.
//! - [`bounds`]: the size limits on everything written onto a copy.
//! - [`error`]: [`error::JobError`], the handler error whose variant decides what
//!   the runtime does (retry, dead-letter), and [`error::Outcome`], the bounded
//!   set of outcomes used in metrics and logs.
//! - [`config`]: the worker configuration: TOML file < `TASKMILL_*` env < flags.
//! - [`redact`]: hiding credentials in URLs before they reach logs or output.
//! - [`retry`]: the retry policy and its backoff schedule.
//!
//! No IO: the clock, random ids, the host name and files come in as
//! arguments (`taskmill_broker::now_us`, `new_job_id`, the binary's config
//! loader).
//!
//! ```
//! use taskmill_core::wire::Envelope;
//! let env = Envelope::new("job-1", "io.sleep", "default", br#"{"ms": 10}"#.to_vec());
//! assert_eq!(env.attempt, 1);
//! ```

pub mod bounds;
pub mod celery;
pub mod config;
pub mod dead_letter;
pub mod error;
pub mod redact;
pub mod retry;
pub mod wire;

pub use dead_letter::DeadLetter;
pub use error::{JobError, Outcome};
pub use wire::{DeadReason, DecodeError, Envelope, HeaderValue};
